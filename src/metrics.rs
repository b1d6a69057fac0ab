//! Prometheus metrics, all prefixed `nodedrain_`.
//!
//! Every label value is a `&'static str` taken from a fixed enum variant (never a node, pod, queue
//! or error text), so the number of series is bounded whatever the cluster or the queue holds.
//! Label values of the single-label families are created at registration, so dashboards see
//! zeros rather than missing series; the per-error, per-reason and drain-duration families
//! appear at their first observation (pre-creating every kind × result histogram would add
//! hundreds of mostly empty lines).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nodedrain_messages_total` | counter | `outcome` ([`MessageOutcome`]) |
//! | `nodedrain_messages_malformed_total` | counter | `error` (the parse error's kind) |
//! | `nodedrain_messages_ignored_total` | counter | `reason` (why the message needs no drain) |
//! | `nodedrain_interruptions_total` | counter | `kind` (the interruption kind) |
//! | `nodedrain_event_to_cordon_seconds` | histogram | `kind` |
//! | `nodedrain_receive_to_cordon_seconds` | histogram | — |
//! | `nodedrain_drain_duration_seconds` | histogram | `kind` (interruption kind, or `manual`), `result` ([`DrainResult`]) |
//! | `nodedrain_evictions_total` | counter | `outcome` ([`EvictionOutcome`]) |
//! | `nodedrain_eviction_pdb_blocked_total` | counter | — |
//! | `nodedrain_deadline_overrides_total` | counter | — |
//! | `nodedrain_lb_wait_cut_total` | counter | `reason` (`deadline`, `delay`: [`LoadBalancerCut`]) |
//! | `nodedrain_nodes_draining` | gauge | — |
//! | `nodedrain_leader` | gauge (0/1) | — |
//! | `nodedrain_sqs_errors_total` | counter | `operation` ([`SqsOperation`]) |
//! | `nodedrain_resolutions_total` | counter | `result` ([`ResolveOutcome`]) |
//! | `nodedrain_notifications_total` | counter | `event`, `outcome` (registered by [`crate::notify::NotifyMetrics`]) |
//! | `nodedrain_notification_events_total` | counter | `event`, `outcome` (the same) |
//!

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::drain::report::LoadBalancerCut;

/// One label, name and value both static: the only label shape this module creates.
type Label = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds from the event's own time (AWS's clock) to the node being unschedulable. The goal is
/// ≤ 1 s at p99, so resolution is fine below a second; the tail reaches the two-minute warning,
/// past which a cordon is useless anyway.
const EVENT_TO_CORDON_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Seconds from drain start to its end: spot drains end within two minutes, ASG hooks within
/// their timeout (often 5-15 minutes), voluntary drains can wait on PDBs for an hour.
const DRAIN_DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A label value from a fixed set. The enums whose variants name series (interruption kinds,
/// parse errors, ignore reasons, drain kinds) implement it where they are defined: this module
/// then depends on none of them, and a label can only come from an enum, never from free text.
pub trait LabelValue {
    fn label_value(&self) -> &'static str;
}

/// What became of one SQS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageOutcome {
    /// The handler finished with it and it was deleted.
    Handled,
    /// Well-formed but needs no action (test notification, harmless state...); deleted.
    Ignored,
    /// Every interruption in it was already handled within the dedupe window; deleted.
    Duplicate,
    /// Unparseable or of an unknown type, and deleted (`--malformed-messages delete`).
    MalformedDeleted,
    /// Unparseable or of an unknown type, and left for the queue's redrive policy
    /// (`--malformed-messages dead-letter`).
    MalformedDeadLetter,
    /// The handler asked to see it again later (e.g. node not found, apiserver down).
    Retried,
    /// Given back without a decision (shutdown, handler dropped it); redelivered.
    Released,
}

impl MessageOutcome {
    pub const ALL: [MessageOutcome; 7] = [
        MessageOutcome::Handled,
        MessageOutcome::Ignored,
        MessageOutcome::Duplicate,
        MessageOutcome::MalformedDeleted,
        MessageOutcome::MalformedDeadLetter,
        MessageOutcome::Retried,
        MessageOutcome::Released,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            MessageOutcome::Handled => "handled",
            MessageOutcome::Ignored => "ignored",
            MessageOutcome::Duplicate => "duplicate",
            MessageOutcome::MalformedDeleted => "malformed_deleted",
            MessageOutcome::MalformedDeadLetter => "malformed_dead_letter",
            MessageOutcome::Retried => "retried",
            MessageOutcome::Released => "released",
        }
    }
}

/// The end of one eviction attempt chain for one pod. A PDB refusal is not an outcome: it is
/// counted by [`Metrics::pdb_blocked_retry`] and the engine tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictionOutcome {
    /// The Eviction API accepted it.
    Evicted,
    /// Deleted directly (strategy `delete`, or a deadline override).
    Deleted,
    /// The pod was already gone (404) or replaced (UID precondition failed, 409).
    Gone,
    /// Gave up: a non-retryable error, or a voluntary drain's timeout while blocked.
    Failed,
}

impl EvictionOutcome {
    pub const ALL: [EvictionOutcome; 4] = [
        EvictionOutcome::Evicted,
        EvictionOutcome::Deleted,
        EvictionOutcome::Gone,
        EvictionOutcome::Failed,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            EvictionOutcome::Evicted => "evicted",
            EvictionOutcome::Deleted => "deleted",
            EvictionOutcome::Gone => "gone",
            EvictionOutcome::Failed => "failed",
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainResult {
    /// Every pod that had to leave has left.
    Succeeded,
    /// Ended with pods left (blocked, errors).
    Failed,
    /// A voluntary drain's timeout passed while something still blocked it.
    TimedOut,
    /// Stopped from outside: shutdown, lost leadership, the node was deleted.
    Cancelled,
}

impl DrainResult {
    pub const ALL: [DrainResult; 4] = [
        DrainResult::Succeeded,
        DrainResult::Failed,
        DrainResult::TimedOut,
        DrainResult::Cancelled,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            DrainResult::Succeeded => "succeeded",
            DrainResult::Failed => "failed",
            DrainResult::TimedOut => "timed_out",
            DrainResult::Cancelled => "cancelled",
        }
    }
}

/// The SQS call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqsOperation {
    Receive,
    Delete,
    ChangeVisibility,
    GetQueueAttributes,
}

impl SqsOperation {
    pub const ALL: [SqsOperation; 4] = [
        SqsOperation::Receive,
        SqsOperation::Delete,
        SqsOperation::ChangeVisibility,
        SqsOperation::GetQueueAttributes,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            SqsOperation::Receive => "receive",
            SqsOperation::Delete => "delete",
            SqsOperation::ChangeVisibility => "change_visibility",
            SqsOperation::GetQueueAttributes => "get_queue_attributes",
        }
    }
}

/// How an instance id was (or was not) turned into a Node name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveOutcome {
    /// Found in the providerID index (no AWS call).
    Index,
    /// Found through EC2 DescribeInstances and the node's private DNS name.
    Ec2Fallback,
    NotFound,
    /// The instance lacks the managed tag.
    NotManaged,
    /// EC2 could not be asked; the caller retries.
    Error,
}

impl ResolveOutcome {
    pub const ALL: [ResolveOutcome; 5] = [
        ResolveOutcome::Index,
        ResolveOutcome::Ec2Fallback,
        ResolveOutcome::NotFound,
        ResolveOutcome::NotManaged,
        ResolveOutcome::Error,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            ResolveOutcome::Index => "index",
            ResolveOutcome::Ec2Fallback => "ec2_fallback",
            ResolveOutcome::NotFound => "not_found",
            ResolveOutcome::NotManaged => "not_managed",
            ResolveOutcome::Error => "error",
        }
    }
}

fn event_to_cordon_histogram() -> Histogram {
    Histogram::new(EVENT_TO_CORDON_BUCKETS)
}

fn drain_duration_histogram() -> Histogram {
    Histogram::new(DRAIN_DURATION_BUCKETS)
}

/// Handles to every nodedrain metric. Cheap to clone (each handle is an `Arc`); pass a clone to
/// each component.
#[derive(Debug, Clone)]
pub struct Metrics {
    messages: Family<Label, Counter>,
    malformed: Family<Label, Counter>,
    ignored: Family<Label, Counter>,
    interruptions: Family<Label, Counter>,
    event_to_cordon: HistogramFamily<Label>,
    receive_to_cordon: Histogram,
    drain_duration: HistogramFamily<Labels2>,
    evictions: Family<Label, Counter>,
    pdb_blocked: Counter,
    deadline_overrides: Counter,
    lb_wait_cut: Family<Label, Counter>,
    nodes_draining: Gauge,
    leader: Gauge,
    sqs_errors: Family<Label, Counter>,
    resolutions: Family<Label, Counter>,
}

impl Default for Metrics {
    /// Metrics registered nowhere: for tests and for CLI commands that share engine code.
    fn default() -> Self {
        Metrics::register::<&str>(&mut Registry::default(), &[])
    }
}

impl Metrics {
    /// Creates every metric and registers it in `registry` (give it a plain registry; the
    /// `nodedrain_` prefix is added here).
    /// `kinds` are the interruption kinds, created with zeros so dashboards see every one.
    pub fn register<K: LabelValue>(registry: &mut Registry, kinds: &[K]) -> Metrics {
        let r = registry.sub_registry_with_prefix("nodedrain");
        let metrics = Metrics {
            messages: Family::default(),
            malformed: Family::default(),
            ignored: Family::default(),
            interruptions: Family::default(),
            event_to_cordon: Family::new_with_constructor(event_to_cordon_histogram),
            receive_to_cordon: event_to_cordon_histogram(),
            drain_duration: Family::new_with_constructor(drain_duration_histogram),
            evictions: Family::default(),
            pdb_blocked: Counter::default(),
            deadline_overrides: Counter::default(),
            lb_wait_cut: Family::default(),
            nodes_draining: Gauge::default(),
            leader: Gauge::default(),
            sqs_errors: Family::default(),
            resolutions: Family::default(),
        };
        r.register(
            "messages",
            "SQS messages by what became of them",
            metrics.messages.clone(),
        );
        r.register(
            "messages_malformed",
            "SQS messages that could not be parsed, by parse error",
            metrics.malformed.clone(),
        );
        r.register(
            "messages_ignored",
            "Well-formed SQS messages that needed no drain, by reason",
            metrics.ignored.clone(),
        );
        r.register(
            "interruptions",
            "Interruptions taken from the queue (after dedupe), by kind",
            metrics.interruptions.clone(),
        );
        r.register(
            "event_to_cordon_seconds",
            "Seconds from the AWS event time to the node being cordoned",
            metrics.event_to_cordon.clone(),
        );
        r.register(
            "receive_to_cordon_seconds",
            "Seconds from this process receiving the message to the node being cordoned: the part of event_to_cordon that is nodedrain's own (the rest is the event's way through EventBridge and SQS)",
            metrics.receive_to_cordon.clone(),
        );
        r.register(
            "drain_duration_seconds",
            "Seconds from drain start to drain end, by kind and result",
            metrics.drain_duration.clone(),
        );
        r.register(
            "evictions",
            "Pods that left a draining node, by how",
            metrics.evictions.clone(),
        );
        r.register(
            "eviction_pdb_blocked",
            "Eviction attempts refused by a PodDisruptionBudget (each is retried)",
            metrics.pdb_blocked.clone(),
        );
        r.register(
            "deadline_overrides",
            "Pods deleted past a PodDisruptionBudget because the node's deadline arrived",
            metrics.deadline_overrides.clone(),
        );
        r.register(
            "lb_wait_cut",
            "Pods stopped while a load balancer still routed new connections to them, by what ended the wait (deadline, or the target group's deregistration delay)",
            metrics.lb_wait_cut.clone(),
        );
        r.register(
            "nodes_draining",
            "Nodes with a drain in progress",
            metrics.nodes_draining.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease, else 0",
            metrics.leader.clone(),
        );
        r.register(
            "sqs_errors",
            "Failed SQS calls (all are retried with backoff), by operation",
            metrics.sqs_errors.clone(),
        );
        r.register(
            "resolutions",
            "Instance id to Node lookups, by result",
            metrics.resolutions.clone(),
        );
        metrics.precreate(kinds);
        metrics
    }

    /// Creates every label value with a zero, so absent series never hide a silent component.
    fn precreate<K: LabelValue>(&self, kinds: &[K]) {
        for o in MessageOutcome::ALL {
            let _ = self.messages.get_or_create(&[("outcome", o.as_label())]);
        }
        for k in kinds {
            let _ = self
                .interruptions
                .get_or_create(&[("kind", k.label_value())]);
            let _ = self
                .event_to_cordon
                .get_or_create(&[("kind", k.label_value())]);
        }
        for o in EvictionOutcome::ALL {
            let _ = self.evictions.get_or_create(&[("outcome", o.as_label())]);
        }
        for cut in [LoadBalancerCut::Deadline, LoadBalancerCut::DelayElapsed] {
            let _ = self
                .lb_wait_cut
                .get_or_create(&[("reason", cut.as_label())]);
        }
        for o in SqsOperation::ALL {
            let _ = self
                .sqs_errors
                .get_or_create(&[("operation", o.as_label())]);
        }
        for o in ResolveOutcome::ALL {
            let _ = self.resolutions.get_or_create(&[("result", o.as_label())]);
        }
    }

    pub fn message(&self, outcome: MessageOutcome) {
        self.messages
            .get_or_create(&[("outcome", outcome.as_label())])
            .inc();
    }

    /// Counts a malformed message by its parse error (the outcome is counted by [`message`]).
    ///
    /// [`message`]: Metrics::message
    pub fn malformed(&self, error: &impl LabelValue) {
        self.malformed
            .get_or_create(&[("error", error.label_value())])
            .inc();
    }

    /// Counts an ignored message by reason (the outcome is counted by [`message`]).
    ///
    /// [`message`]: Metrics::message
    pub fn ignored(&self, reason: &impl LabelValue) {
        self.ignored
            .get_or_create(&[("reason", reason.label_value())])
            .inc();
    }

    pub fn interruption(&self, kind: &impl LabelValue) {
        self.interruptions
            .get_or_create(&[("kind", kind.label_value())])
            .inc();
    }

    /// Records one event-to-cordon latency. Negative values (AWS's clock ahead of ours) are
    /// recorded as zero rather than dropped, so the count matches the number of cordons.
    pub fn event_to_cordon(&self, kind: &impl LabelValue, seconds: f64) {
        self.event_to_cordon
            .get_or_create(&[("kind", kind.label_value())])
            .observe(seconds.max(0.0));
    }

    /// Records one receive-to-cordon latency.
    pub fn receive_to_cordon(&self, seconds: f64) {
        self.receive_to_cordon.observe(seconds.max(0.0));
    }

    /// Records a finished drain by its kind (an interruption kind, or `manual`).
    pub fn drain_finished(&self, kind: &impl LabelValue, result: DrainResult, seconds: f64) {
        self.drain_duration
            .get_or_create(&[("kind", kind.label_value()), ("result", result.as_label())])
            .observe(seconds.max(0.0));
    }

    pub fn eviction(&self, outcome: EvictionOutcome) {
        self.evictions
            .get_or_create(&[("outcome", outcome.as_label())])
            .inc();
    }

    pub fn pdb_blocked_retry(&self) {
        self.pdb_blocked.inc();
    }

    pub fn deadline_override(&self) {
        self.deadline_overrides.inc();
    }

    pub fn load_balancer_wait_cut(&self, reason: LoadBalancerCut) {
        self.lb_wait_cut
            .get_or_create(&[("reason", reason.as_label())])
            .inc();
    }

    /// A guard that counts one node as draining until dropped, so an early return or a panic in
    /// a drain task cannot leave the gauge high.
    pub fn draining_guard(&self) -> DrainingGuard {
        self.nodes_draining.inc();
        DrainingGuard(self.nodes_draining.clone())
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn sqs_error(&self, operation: SqsOperation) {
        self.sqs_errors
            .get_or_create(&[("operation", operation.as_label())])
            .inc();
    }

    pub fn resolution(&self, outcome: ResolveOutcome) {
        self.resolutions
            .get_or_create(&[("result", outcome.as_label())])
            .inc();
    }
}

/// See [`Metrics::draining_guard`].
#[derive(Debug)]
pub struct DrainingGuard(Gauge);

impl Drop for DrainingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Renders a registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the Result only exists for generic writers.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Plain strings, for callers that register no kinds (`Metrics::default`).
impl LabelValue for &'static str {
    fn label_value(&self) -> &'static str {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interruption::events::InterruptionKind;
    use crate::node::DrainKind;

    fn rendered(f: impl FnOnce(&Metrics)) -> String {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, InterruptionKind::ALL);
        f(&metrics);
        encode(&registry)
    }

    #[test]
    fn every_design_metric_is_exposed_with_zeros() {
        let text = rendered(|_| {});
        for name in [
            "nodedrain_messages_total{outcome=\"handled\"} 0",
            "nodedrain_messages_total{outcome=\"malformed_dead_letter\"} 0",
            "nodedrain_interruptions_total{kind=\"spot-interruption\"} 0",
            "nodedrain_event_to_cordon_seconds_bucket{le=\"1.0\",kind=\"rebalance-recommendation\"} 0",
            "nodedrain_evictions_total{outcome=\"evicted\"} 0",
            "nodedrain_eviction_pdb_blocked_total 0",
            "nodedrain_deadline_overrides_total 0",
            "nodedrain_lb_wait_cut_total{reason=\"deadline\"} 0",
            "nodedrain_nodes_draining 0",
            "nodedrain_leader 0",
            "nodedrain_sqs_errors_total{operation=\"receive\"} 0",
            "nodedrain_resolutions_total{result=\"index\"} 0",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
    }

    #[test]
    fn recordings_show_up_under_bounded_labels() {
        let text = rendered(|m| {
            m.message(MessageOutcome::Handled);
            m.message(MessageOutcome::Handled);
            m.malformed(
                &crate::interruption::events::parse_message("nope", jiff::Timestamp::UNIX_EPOCH)
                    .expect_err("malformed"),
            );
            m.interruption(&InterruptionKind::SpotInterruption);
            m.event_to_cordon(&InterruptionKind::SpotInterruption, 0.3);
            m.event_to_cordon(&InterruptionKind::SpotInterruption, -2.0);
            m.drain_finished(&DrainKind::Manual, DrainResult::Succeeded, 42.0);
            m.set_leader(true);
            let guard = m.draining_guard();
            let second = m.draining_guard();
            drop(guard);
            // Still draining when the registry is rendered.
            std::mem::forget(second);
        });
        assert!(text.contains("nodedrain_messages_total{outcome=\"handled\"} 2"));
        assert!(text.contains("nodedrain_messages_malformed_total{error=\"malformed_json\"} 1"));
        assert!(text.contains("nodedrain_interruptions_total{kind=\"spot-interruption\"} 1"));
        assert!(text.contains(
            "nodedrain_event_to_cordon_seconds_bucket{le=\"0.5\",kind=\"spot-interruption\"} 2"
        ));
        assert!(text.contains(
            "nodedrain_drain_duration_seconds_count{kind=\"manual\",result=\"succeeded\"} 1"
        ));
        assert!(text.contains("nodedrain_leader 1"));
        assert!(text.contains("nodedrain_nodes_draining 1"));
    }
}
