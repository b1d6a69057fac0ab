//! The Kubernetes Events a drain publishes, each built by a named constructor (as Karpenter's
//! `terminator/events` does), so their reasons and wording live in one place and the state
//! machine only says which one happened.

use k8s_openapi::api::core::v1::ObjectReference;

use super::report::{Blocker, LoadBalancerCut};
use crate::names;
use crate::node::DrainRecord;

/// Normal or Warning, as the Events API knows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// One Event to publish about a node or a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainEvent {
    pub regarding: ObjectReference,
    pub severity: Severity,
    pub reason: &'static str,
    pub note: String,
}

/// The Events API limits notes to 1 kB.
const NOTE_LIMIT: usize = 1000;

impl DrainEvent {
    fn new(
        regarding: ObjectReference,
        severity: Severity,
        reason: &'static str,
        note: String,
    ) -> Self {
        DrainEvent {
            regarding,
            severity,
            reason,
            note: truncate(&note, NOTE_LIMIT),
        }
    }

    /// The node is cordoned and the drain begins.
    pub fn drain_started(node: ObjectReference, record: &DrainRecord) -> Self {
        DrainEvent::new(
            node,
            Severity::Normal,
            names::reasons::DRAIN_STARTED,
            format!(
                "Cordoned and tainted {}={} for a drain ({})",
                names::TAINT_INTERRUPTION,
                record.kind,
                record.reason.as_deref().unwrap_or("no reason given")
            ),
        )
    }

    /// Another leader (or an earlier run of this one) started this drain; this one carries it on.
    pub fn drain_resumed(node: ObjectReference, record: &DrainRecord) -> Self {
        DrainEvent::new(
            node,
            Severity::Normal,
            names::reasons::DRAIN_RESUMED,
            format!(
                "Resumed the {} drain started at {} ({})",
                record.kind,
                record.started,
                record.reason.as_deref().unwrap_or("no reason given")
            ),
        )
    }

    pub fn drain_succeeded(node: ObjectReference, pods: usize) -> Self {
        DrainEvent::new(
            node,
            Severity::Normal,
            names::reasons::DRAIN_SUCCEEDED,
            format!("{pods} pods left the node"),
        )
    }

    /// `why` says how the drain ended and what is left.
    pub fn drain_failed(node: ObjectReference, why: String) -> Self {
        DrainEvent::new(node, Severity::Warning, names::reasons::DRAIN_FAILED, why)
    }

    /// EC2 reported the instance gone and the node was tainted out of service.
    pub fn out_of_service(node: ObjectReference, instance_id: &str, state: Option<&str>) -> Self {
        let state = state.unwrap_or("no longer listed");
        DrainEvent::new(
            node,
            Severity::Normal,
            names::reasons::OUT_OF_SERVICE,
            format!(
                "Instance {instance_id} is {state}: tainted {}={}:NoExecute so the node's pods \
                 are deleted and their volumes detached without waiting for the kubelet",
                names::TAINT_OUT_OF_SERVICE,
                names::TAINT_OUT_OF_SERVICE_VALUE
            ),
        )
    }

    /// The instance still ran when nodedrain stopped waiting for it to go.
    pub fn out_of_service_skipped(
        node: ObjectReference,
        instance_id: &str,
        state: &str,
        waited: &str,
    ) -> Self {
        DrainEvent::new(
            node,
            Severity::Warning,
            names::reasons::OUT_OF_SERVICE_SKIPPED,
            format!(
                "Instance {instance_id} is still {state} {waited} after the drain's deadline: \
                 the node is not tainted {}; a node whose instance runs is never marked out of \
                 service",
                names::TAINT_OUT_OF_SERVICE
            ),
        )
    }

    /// An annotation (or another planner warning) on the pod could not be honoured.
    pub fn invalid_annotation(pod: ObjectReference, note: String) -> Self {
        DrainEvent::new(
            pod,
            Severity::Warning,
            names::reasons::INVALID_ANNOTATION,
            note,
        )
    }

    /// The deadline forced a deletion past whatever still blocked the pod.
    pub fn deadline_override(
        pod: ObjectReference,
        node: &str,
        grace: i64,
        deadline: Option<jiff::Timestamp>,
        blocker: Option<&Blocker>,
    ) -> Self {
        let deadline = deadline.map(|d| d.to_string()).unwrap_or_default();
        let why = blocker.map_or_else(|| "it was still blocked".to_string(), |b| b.to_string());
        DrainEvent::new(
            pod,
            Severity::Warning,
            names::reasons::DEADLINE_OVERRIDE,
            format!(
                "Deleted with a {grace}s grace period although {why}: node {node} goes away at \
                 {deadline} and this was the last moment to stop the pod in time"
            ),
        )
    }

    /// A load-balancer wait ended while a target still took new connections: the deadline came
    /// (the instance goes regardless) or the group's deregistration delay passed without the
    /// target ever reporting `draining`.
    pub fn load_balancer_wait_cut(
        pod: ObjectReference,
        group: &str,
        target: &str,
        state: &str,
        reason: LoadBalancerCut,
    ) -> Self {
        let why = match reason {
            LoadBalancerCut::Deadline => {
                "this was its last moment to stop before the node goes away"
            }
            LoadBalancerCut::DelayElapsed => {
                "the group's deregistration delay has passed since deregistration began"
            }
        };
        DrainEvent::new(
            pod,
            Severity::Warning,
            names::reasons::LOAD_BALANCER_WAIT_CUT,
            format!(
                "Stopping the pod although target group {group} still routes new connections to                  {target} (state {state}): {why}; requests it receives now may fail"
            ),
        )
    }

    /// The pod's PDB had already been charged for its eviction, but the pod was never deleted
    /// (the request was cut off with its sender): nodedrain finished the eviction.
    pub fn eviction_completed(pod: ObjectReference, pdb: &str, grace: i64) -> Self {
        DrainEvent::new(
            pod,
            Severity::Normal,
            names::reasons::EVICTION_COMPLETED,
            format!(
                "Deleted with a {grace}s grace period: PDB {pdb} already counts this pod as \
                 evicted (status.disruptedPods), but the eviction that was approved never \
                 deleted it"
            ),
        )
    }
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 + '…'.len_utf8());
        assert_eq!(truncate("short", 1000), "short");
        let event = DrainEvent::drain_failed(ObjectReference::default(), text);
        assert!(event.note.len() <= NOTE_LIMIT + '…'.len_utf8());
    }
}
