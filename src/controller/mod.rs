//! `nodedrain controller`: the wiring from AWS events to drains.
//!
//! Read top to bottom, a message goes: SQS intake → resolve instance ids to nodes → prepare every
//! node of the batch (cordon, taint, load-balancer label, drain record) → delete the message →
//! drain each node with the engine → hand the node over (Auto Scaling hook, Karpenter NodeClaim).
//! Every replica watches nodes; only the lease holder reads the queue and drains. A new leader
//! resumes every unfinished drain from the records on the nodes.

pub mod burst;
pub mod leader;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use self::burst::{BurstHold, Release};
use self::leader::LeaderElector;
use crate::admin::{AdminError, AdminServer, Readiness};
use crate::config::{ControllerConfig, NodeNotFound, RebalanceMode};
use crate::drain::execute::{DrainConfig, DrainRequest, Drainer, Prepared};
use crate::drain::machine::Origin;
use crate::drain::plan::{DaemonSetHandling, PlanOptions};
use crate::drain::policy::{ClusterPolicy, PolicyError};
use crate::drain::report::{Blocker, DrainOutcome, DrainReport, PodChange, ProgressEvent};
use crate::handoff::Handoff;
use crate::handoff::out_of_service::OutOfService;
use crate::interruption::events::{Interruption, InterruptionKind, instance_id_from_provider_id};
use crate::interruption::sqs::{self, Delivery, Intake};
use crate::kube_client::{self, ClientError};
use crate::lb::discover::{Discovery, LoadBalancers};
use crate::metrics::{DrainResult, EvictionOutcome, Metrics};
use crate::names;
use crate::node::{self, DrainKind, DrainRecord, Phase};
use crate::notify::{Notice, Notifier, NotifyError, NotifyEvent, NotifyMetrics};
use crate::resolve::{self, NodeWatch, Resolution, Resolver};

/// How long a message waits before it is offered again when its node cannot be found yet (a
/// node that is still registering) or the apiserver failed: long enough not to spin, short
/// enough to act well within a two-minute warning.
const RETRY_DELAY: Duration = Duration::from_secs(10);

/// How often nodes that survived a rebalance recommendation are looked at, at most: a short
/// uncordon-after is looked at four times as often as it lasts, so it is kept to within a quarter.
const REBALANCE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Concurrent node preparations in one batch. The intake runs a few batches at once, so a burst
/// has several times this many PATCHes in flight: enough to keep the apiserver busy, few enough
/// that a cold client does not open (and TLS-handshake) a connection per node first. Measured on
/// the sandbox with 200 warnings: 16 per batch cordoned the burst faster than 64.
const PREPARE_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("admin server: {0}")]
    Admin(#[from] AdminError),
    #[error("cannot read the cluster policy {path}: {source}")]
    ReadPolicy {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster policy {path}: {source}")]
    Policy {
        path: String,
        #[source]
        source: PolicyError,
    },
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// Everything a leader term's tasks share.
struct Shared {
    nodes: Api<Node>,
    /// The same nodes through the cordon client (see [`run`]).
    cordon_nodes: Api<Node>,
    drainer: Drainer,
    resolver: Resolver,
    watch: NodeWatch,
    handoff: Handoff,
    /// Present with `--out-of-service-taint`.
    out_of_service: Option<OutOfService>,
    metrics: Metrics,
    notifier: Notifier,
    config: ControllerConfig,
    policy: ClusterPolicy,
    /// Drain tasks running in this process, by node: a redelivered message or a resume does not
    /// start a second one, and a more urgent interruption restarts the running one.
    draining: Mutex<HashMap<String, RunningDrain>>,
    /// Drains prepared by the queue's batches, held until a burst is cordoned (see [`burst`]).
    held: Mutex<BurstHold<(String, DrainRecord)>>,
    held_changed: Notify,
    tasks: TaskTracker,
}

/// Runs the controller until `shutdown` fires: then it stops reading the queue, lets drains stop
/// (nodes stay cordoned with their records, for the next leader), and releases the lease.
pub async fn run(
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let policy = load_policy(&config)?;
    let kube_config = kube_client::load_config(&config.client).await?;
    let default_namespace = kube_config.default_namespace.clone();
    // Cordons get their own client and budget: a burst of interruptions is cordoned at once even
    // while running drains spend the main budget on evictions.
    let cordon_client =
        kube_client::client_with_rate_limit(kube_config.clone(), config.cordon_qps)?;
    let client = kube_client::client_with_rate_limit(kube_config, config.qps)?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, InterruptionKind::ALL);
    let notify_metrics = NotifyMetrics::register(&mut registry);
    // Stopped after the drains, so their last notices still go out.
    let notify_stop = CancellationToken::new();
    let (notifier, notify_task) = match config.notify.clone() {
        Some(notify) => {
            let (notifier, task) = Notifier::start(notify, notify_metrics, notify_stop.clone())?;
            (notifier, Some(task))
        }
        None => (Notifier::disabled(), None),
    };
    let readiness = Readiness::new(&[resolve::READINESS_COMPONENT, sqs::READINESS_COMPONENT]);
    let admin = AdminServer::bind(config.admin_addr, Arc::new(registry), readiness.clone()).await?;
    info!(addr = %config.admin_addr, "admin server listening");
    let admin_task = tokio::spawn(
        admin
            .serve(shutdown.clone())
            .instrument(info_span!("admin")),
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let (node_watch, watch_future) = NodeWatch::with_selector(
        nodes.clone(),
        config.behaviour.node_selector.clone(),
        Some(readiness.clone()),
        shutdown.clone(),
    );
    tokio::spawn(watch_future.instrument(info_span!("node_watch")));

    let aws = config.aws.load().await;
    let resolver = Resolver::new(
        node_watch.clone(),
        aws_sdk_ec2::Client::new(&aws),
        config.behaviour.managed_tag.clone(),
        metrics.clone(),
    );
    let sqs_client = aws_sdk_sqs::Client::new(&aws);
    let identity = config
        .lease
        .as_ref()
        .map(|l| l.identity.clone())
        .unwrap_or_else(|| names::FIELD_MANAGER.to_string());
    let drain_config = DrainConfig {
        reporting_instance: Some(identity),
        ..DrainConfig::default()
    };
    // Runs for the life of the process; only a leader registers nodes with it.
    let (out_of_service, out_of_service_task) = if config.behaviour.out_of_service_taint {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: drain_config.reporter.clone(),
                instance: drain_config.reporting_instance.clone(),
            },
        );
        let (handle, task) =
            OutOfService::start(nodes.clone(), resolver.clone(), recorder, shutdown.clone());
        (Some(handle), Some(task))
    } else {
        (None, None)
    };
    let load_balancers = LoadBalancers::new(
        Discovery::new(
            client.clone(),
            aws_sdk_elasticloadbalancingv2::Client::new(&aws),
            config.load_balancers.target_group_arns(),
        )
        .with_tag(config.load_balancers.target_group_tag.clone()),
        config.load_balancers.wait,
    );
    let drainer =
        Drainer::new(client.clone(), drain_config).with_load_balancers(Some(load_balancers));

    // Without leader election this replica always leads; the sender lives as long as `run`, so
    // the receiver never reports a closed channel.
    let (_always_leader, always_leading) = watch::channel(true);
    let (is_leader, elector_task) = match config.lease.clone() {
        Some(lease) => {
            let elector =
                LeaderElector::new(client.clone(), lease.into_lease_config(&default_namespace))
                    .with_metrics(metrics.clone());
            let is_leader = elector.subscribe();
            let task = tokio::spawn(
                elector
                    .run(shutdown.clone())
                    .instrument(info_span!("leader")),
            );
            (is_leader, Some(task))
        }
        None => {
            metrics.set_leader(true);
            (always_leading, None)
        }
    };

    let shared = Arc::new(Shared {
        nodes,
        cordon_nodes: Api::all(cordon_client),
        handoff: Handoff::new(client, aws_sdk_autoscaling::Client::new(&aws)),
        out_of_service,
        drainer,
        resolver,
        watch: node_watch,
        metrics,
        notifier,
        policy,
        config: config.clone(),
        draining: Mutex::new(HashMap::new()),
        held: Mutex::new(BurstHold::default()),
        held_changed: Notify::new(),
        tasks: TaskTracker::new(),
    });
    lead_while_elected(&shared, is_leader, sqs_client, readiness, &shutdown).await;

    shared.tasks.close();
    shared.tasks.wait().await;
    notify_stop.cancel();
    if let Some(task) = notify_task {
        let _ = task.await;
    }
    if let Some(task) = elector_task {
        let _ = task.await;
    }
    if let Some(task) = out_of_service_task {
        let _ = task.await;
    }
    let _ = admin_task.await;
    info!("controller stopped");
    Ok(())
}

fn load_policy(config: &ControllerConfig) -> Result<ClusterPolicy, ControllerError> {
    let Some(path) = &config.behaviour.policy else {
        return Ok(ClusterPolicy::default());
    };
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ControllerError::ReadPolicy {
        path: display.clone(),
        source,
    })?;
    ClusterPolicy::from_yaml(&text).map_err(|source| ControllerError::Policy {
        path: display,
        source,
    })
}

/// One leader term after another until shutdown. A standby reads nothing from the queue (a
/// message it received would be invisible to the leader), but it reports the intake ready so
/// that a rollout does not wait on standbys forever.
async fn lead_while_elected(
    shared: &Arc<Shared>,
    mut is_leader: watch::Receiver<bool>,
    sqs_client: aws_sdk_sqs::Client,
    readiness: Readiness,
    shutdown: &CancellationToken,
) {
    loop {
        readiness.set(sqs::READINESS_COMPONENT, true);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = is_leader.wait_for(|leader| *leader) => if changed.is_err() { return },
        }
        info!("leading: resuming drains and reading the queue");
        let term = shutdown.child_token();
        // The node watch must have listed once, or resume would miss records.
        tokio::select! {
            _ = term.cancelled() => return,
            _ = shared.watch.wait_ready() => {}
        }
        lock(&shared.held).clear();
        resume(shared, &term);
        let starter = tokio::spawn(start_held_drains(Arc::clone(shared), term.clone()));
        let handler_shared = Arc::clone(shared);
        let handler = move |batch: Vec<Delivery>| {
            let shared = Arc::clone(&handler_shared);
            async move { handle_batch(&shared, batch).await }
        };
        let intake = Intake::new(
            sqs_client.clone(),
            shared.config.intake.clone(),
            handler,
            shared.metrics.clone(),
        )
        .with_readiness(readiness.clone());
        let intake_task = tokio::spawn(intake.run(term.clone()).instrument(info_span!("intake")));
        let sweeper = tokio::spawn(sweep_rebalanced(Arc::clone(shared), term.clone()));

        tokio::select! {
            _ = shutdown.cancelled() => {}
            lost = is_leader.wait_for(|leader| !*leader) => {
                // On shutdown the elector steps down to hand the lease over, and this may see
                // that before the shutdown itself: not a lost lease.
                if lost.is_ok() && !shutdown.is_cancelled() {
                    warn!("lost the lease: stopping the queue and the drains");
                } else if lost.is_err() {
                    // The elector is gone (it only stops at shutdown): wait for that.
                    shutdown.cancelled().await;
                }
            }
        }
        term.cancel();
        if let Some(out_of_service) = &shared.out_of_service {
            out_of_service.clear();
        }
        let _ = intake_task.await;
        let _ = sweeper.await;
        let _ = starter.await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

struct RunningDrain {
    record: DrainRecord,
    cancel: CancellationToken,
    /// Cancelled when the task ends; a replacement task waits for it so two drains of one node
    /// never run at once.
    done: CancellationToken,
}

/// A node one interruption points at, with the record to write.
struct Target {
    delivery: usize,
    node: String,
    record: DrainRecord,
    event_time: Timestamp,
    received_at: Timestamp,
    kind: InterruptionKind,
}

/// Takes a batch over: resolve, prepare every node, settle each message, start the drains.
async fn handle_batch(shared: &Arc<Shared>, batch: Vec<Delivery>) {
    let began = Instant::now();
    let mut held = HeldBatch::new(shared);
    let ids: Vec<&str> = batch
        .iter()
        .flat_map(|d| d.interruptions.iter().map(|i| i.instance_id.as_str()))
        .collect();
    let mut resolutions = shared.resolver.resolve(&ids).await.into_iter();
    let resolved = began.elapsed();

    let now = Timestamp::now();
    let mut targets = Vec::new();
    // Per delivery: whether every interruption in it is taken care of.
    let mut complete = vec![true; batch.len()];
    for (index, delivery) in batch.iter().enumerate() {
        // The intake counted each interruption (nodedrain_interruptions_total) when it arrived.
        for interruption in &delivery.interruptions {
            match resolutions.next() {
                Some(Ok(Resolution::Node(node))) => {
                    let fresh = record_for(interruption, now, &shared.config);
                    let record = match current_record(shared, &node) {
                        Some(current) => merge_records(current, fresh),
                        None => fresh,
                    };
                    targets.push(Target {
                        delivery: index,
                        node,
                        record,
                        event_time: interruption.event_time,
                        received_at: delivery.received_at,
                        kind: interruption.kind,
                    })
                }
                Some(Ok(Resolution::NotManaged)) => {
                    info!(instance = %interruption.instance_id, message = %delivery.message_id,
                        "instance is not managed by this cluster; ignoring");
                }
                Some(Ok(Resolution::NotFound)) => {
                    warn!(instance = %interruption.instance_id, message = %delivery.message_id,
                        kind = interruption.kind.as_str(), "no node for this instance");
                    if shared.config.behaviour.node_not_found == NodeNotFound::Retry {
                        complete[index] = false;
                    }
                }
                Some(Err(error)) => {
                    warn!(instance = %interruption.instance_id, %error, "cannot resolve the instance yet");
                    complete[index] = false;
                }
                None => complete[index] = false,
            }
        }
    }

    // Every node of the batch is prepared before any drain starts, so pods evicted from one do
    // not land on another that is about to go.
    let prepared: Vec<(Target, bool, Duration)> = futures::stream::iter(targets)
        .map(|target| async move {
            let patch_began = Instant::now();
            // The watch's copy saves a read; if it is stale the patch gets a 409 and is redone
            // from a fresh one.
            let prepared = match shared.watch.store().get(&ObjectRef::new(&target.node)) {
                Some(cached) => node::prepare_from(&shared.cordon_nodes, &cached, &target.record).await,
                None => node::prepare(&shared.cordon_nodes, &target.node, &target.record).await,
            };
            let ok = match prepared {
                Ok(_) => {
                    let now = Timestamp::now();
                    let latency = now.duration_since(target.event_time).as_secs_f64();
                    shared.metrics.event_to_cordon(&target.kind, latency);
                    let own = now.duration_since(target.received_at).as_secs_f64();
                    shared.metrics.receive_to_cordon(own);
                    shared.notifier.notify(Notice::about(
                        NotifyEvent::Received,
                        &target.node,
                        &target.record,
                    ));
                    true
                }
                Err(error) => {
                    warn!(node = %target.node, %error, "cannot cordon the node; the message will be retried");
                    false
                }
            };
            (target, ok, patch_began.elapsed())
        })
        .buffer_unordered(PREPARE_CONCURRENCY)
        .collect()
        .await;
    let slowest_ms = prepared
        .iter()
        .map(|(_, _, took)| took.as_millis() as u64)
        .max();
    for (target, ok, _) in &prepared {
        if !ok {
            complete[target.delivery] = false;
        }
    }
    debug!(
        messages = batch.len(),
        nodes = prepared.len(),
        resolve_ms = resolved.as_millis() as u64,
        prepare_ms = (began.elapsed() - resolved).as_millis() as u64,
        slowest_node_ms = slowest_ms,
        "batch prepared"
    );

    // The records are on the nodes: the messages may go.
    for (delivery, complete) in batch.into_iter().zip(complete) {
        if complete {
            delivery.ack.delete();
        } else {
            delivery.ack.retry_after(RETRY_DELAY);
        }
    }

    held.prepared = prepared
        .into_iter()
        .filter(|(_, ok, _)| *ok)
        .map(|(target, _, _)| (target.node, target.record))
        .collect();
}

/// A batch in progress for the burst hold; dropping it ends the batch and hands over its
/// prepared drains, however the handler returns.
struct HeldBatch<'a> {
    shared: &'a Shared,
    prepared: Vec<(String, DrainRecord)>,
}

impl<'a> HeldBatch<'a> {
    fn new(shared: &'a Shared) -> Self {
        lock(&shared.held).batch_started();
        shared.held_changed.notify_one();
        HeldBatch {
            shared,
            prepared: Vec::new(),
        }
    }
}

impl Drop for HeldBatch<'_> {
    fn drop(&mut self) {
        let prepared = std::mem::take(&mut self.prepared);
        lock(&self.shared.held).batch_ended(prepared, Instant::now());
        self.shared.held_changed.notify_one();
    }
}

/// Starts the drains the queue's batches prepared, once [`BurstHold`] lets them go.
async fn start_held_drains(shared: Arc<Shared>, term: CancellationToken) {
    loop {
        let release = lock(&shared.held).release(Instant::now());
        let wake = match release {
            Release::Start(drains) => {
                debug!(drains = drains.len(), "burst cordoned: starting its drains");
                for (node, record) in drains {
                    start_drain(&shared, &term, node, record, Origin::Fresh);
                }
                continue;
            }
            Release::WaitUntil(at) => Some(tokio::time::Instant::from_std(at)),
            Release::Idle => None,
        };
        tokio::select! {
            _ = term.cancelled() => return,
            _ = shared.held_changed.notified() => {}
            _ = async { tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)).await }, if wake.is_some() => {}
        }
    }
}

/// The state behind these mutexes stays consistent under a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The record for an interruption. Auto Scaling hooks carry no deadline of their own: the
/// configured timeout stands in, counted from the event.
fn record_for(
    interruption: &Interruption,
    now: Timestamp,
    config: &ControllerConfig,
) -> DrainRecord {
    let mut record = DrainRecord::from_interruption(interruption, now);
    if record.deadline.is_none() && interruption.lifecycle.is_some() {
        let timeout = SignedDuration::try_from(config.behaviour.asg_drain_timeout)
            .unwrap_or(SignedDuration::MAX);
        record.deadline = interruption.event_time.checked_add(timeout).ok();
    }
    record
}

/// The unfinished drain record already on a node, from the watch's cache.
fn current_record(shared: &Shared, node: &str) -> Option<DrainRecord> {
    let cached = shared.watch.store().get(&ObjectRef::new(node))?;
    let record = node::record_of(&cached).ok()??;
    matches!(record.phase, Phase::Cordoned | Phase::Draining).then_some(record)
}

/// A second interruption for a node that is already draining: keep the drain (its start, its
/// phase) and take whatever is more urgent. The earlier deadline wins; an involuntary
/// interruption makes the drain involuntary (a spot warning after a rebalance recommendation);
/// a lifecycle hook is kept so it gets completed.
pub fn merge_records(current: DrainRecord, fresh: DrainRecord) -> DrainRecord {
    let deadline = match (current.deadline, fresh.deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let more_urgent = (current.voluntary && !fresh.voluntary) || deadline != current.deadline;
    DrainRecord {
        kind: if more_urgent {
            fresh.kind
        } else {
            current.kind
        },
        reason: if more_urgent {
            fresh.reason
        } else {
            current.reason
        },
        event_id: if more_urgent {
            fresh.event_id
        } else {
            current.event_id
        },
        deadline,
        voluntary: current.voluntary && fresh.voluntary,
        lifecycle_hook: fresh.lifecycle_hook.or(current.lifecycle_hook),
        ..current
    }
}

/// Whether two records ask for the same drain: a redelivery or a resume carries the running
/// record's start and phase, which must not restart it.
fn same_urgency(a: &DrainRecord, b: &DrainRecord) -> bool {
    a.deadline == b.deadline && a.voluntary == b.voluntary && a.lifecycle_hook == b.lifecycle_hook
}

/// Starts a drain task for `node`. If one runs already with the same record nothing happens;
/// with a more urgent record (merged by [`merge_records`]) the running one is cancelled and the
/// new one starts when it has stopped.
fn start_drain(
    shared: &Arc<Shared>,
    term: &CancellationToken,
    node: String,
    record: DrainRecord,
    origin: Origin,
) {
    if record.kind == DrainKind::Interruption(InterruptionKind::RebalanceRecommendation)
        && shared.config.behaviour.rebalance == RebalanceMode::CordonOnly
    {
        return;
    }
    let cancel = term.child_token();
    let done = CancellationToken::new();
    let (record, previous) = {
        let mut draining = lock(&shared.draining);
        // Batches run side by side, so a less urgent record may come second (a rebalance read
        // in the same burst as the spot warning): merged, it never weakens the running drain.
        let record = match draining.get(&node) {
            Some(existing) => {
                let merged = merge_records(existing.record.clone(), record);
                if same_urgency(&existing.record, &merged) {
                    return;
                }
                merged
            }
            None => record,
        };
        let running = RunningDrain {
            record: record.clone(),
            cancel: cancel.clone(),
            done: done.clone(),
        };
        (record, draining.insert(node.clone(), running))
    };
    if let Some(previous) = &previous {
        info!(node = %node, "a more urgent interruption: restarting the drain with it");
        previous.cancel.cancel();
    }
    let task_shared = Arc::clone(shared);
    let span = info_span!("drain", node = %node, kind = %record.kind);
    shared.tasks.spawn(
        async move {
            if let Some(previous) = previous {
                previous.done.cancelled().await;
            }
            drain_and_hand_over(&task_shared, &cancel, &node, record, origin).await;
            done.cancel();
            let mut draining = lock(&task_shared.draining);
            // Only this task's entry: a newer task may have replaced it already.
            if draining.get(&node).is_some_and(|r| r.cancel == cancel) {
                draining.remove(&node);
            }
        }
        .instrument(span),
    );
}

/// Resumes every drain whose record says it is unfinished.
fn resume(shared: &Arc<Shared>, term: &CancellationToken) {
    let mut resumed = 0;
    for node in shared.watch.store().state() {
        let record = match node::record_of(&node) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(error) => {
                warn!(node = %node.name_any(), %error, "unreadable drain record; leaving the node alone");
                continue;
            }
        };
        // A drain someone started from the CLI belongs to them; the controller does not finish
        // it behind their back.
        if record.kind == DrainKind::Manual {
            continue;
        }
        // A finished drain may still wait for its instance to go.
        if let Some(deadline) = record.deadline {
            watch_out_of_service(shared, &node, &record, deadline);
        }
        let unfinished = match record.phase {
            Phase::Cordoned | Phase::Draining => true,
            // Drained but not handed over: only the handoff is left, which the drain task does
            // after a (quick, empty) drain.
            Phase::Drained => {
                record.lifecycle_hook.is_some() || shared.config.behaviour.karpenter_handoff
            }
            Phase::Failed | Phase::HandedOver => false,
        };
        if unfinished {
            resumed += 1;
            start_drain(shared, term, node.name_any(), record, Origin::Resumed);
        }
    }
    info!(resumed, "resumed unfinished drains from node records");
}

/// One node's drain, then its handover. `cancel` stops it (lost lease, shutdown, or a more urgent
/// interruption for the same node).
async fn drain_and_hand_over(
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    name: &str,
    record: DrainRecord,
    origin: Origin,
) {
    let _draining = shared.metrics.draining_guard();
    let started_notice = Notice::about(NotifyEvent::Started, name, &record);
    shared.notifier.notify(match origin {
        Origin::Resumed => started_notice.with_detail("resumed"),
        Origin::Fresh => started_notice,
    });
    let started = Instant::now();
    if let Some(deadline) = record.deadline
        && let Some(node) = shared.watch.store().get(&ObjectRef::new(name))
    {
        watch_out_of_service(shared, &node, &record, deadline);
    }
    let kind = record.kind.interruption();
    let handover = kind != Some(InterruptionKind::RebalanceRecommendation)
        || shared.config.behaviour.rebalance == RebalanceMode::DrainAndHandover;
    let options = PlanOptions {
        // The node is going away: DaemonSet pods go with it, and pods no controller recreates
        // or with local data cannot be saved by refusing to drain.
        daemonsets: DaemonSetHandling::Ignore,
        delete_emptydir_data: true,
        force: true,
        voluntary: record.voluntary,
        margin: shared.config.behaviour.deadline_margin,
        // A rebalance handed over to Karpenter has time to move a single replica first.
        surge_when_blocked: kind == Some(InterruptionKind::RebalanceRecommendation)
            && shared.config.behaviour.rebalance == RebalanceMode::DrainAndHandover,
        ..PlanOptions::default()
    };
    let request = DrainRequest {
        deadline: record.deadline,
        options,
        policy: shared.policy.clone(),
        timeout: None,
        // Prepared by the batch that read the interruption, or by an earlier leader.
        prepared: Some(Prepared {
            record: record.clone(),
            reference: shared
                .watch
                .store()
                .get(&ObjectRef::new(name))
                .map(|node| node.object_ref(&())),
            origin,
        }),
        cancel: cancel.clone(),
    };

    let (progress, events) = mpsc::channel(256);
    let metrics_task = tokio::spawn(count_progress(
        shared.metrics.clone(),
        events,
        shared.notifier.clone(),
        Notice::about(NotifyEvent::DeadlineOverride, name, &record),
    ));
    let heartbeat = record.lifecycle_hook.clone().map(|hook| {
        let handoff = shared.handoff.clone();
        let stop = cancel.child_token();
        tokio::spawn(async move { handoff.heartbeat(&hook, stop).await })
    });
    let result = shared
        .drainer
        .drain(&[name.to_string()], request, progress)
        .await;
    if let Some(task) = heartbeat {
        task.abort();
    }
    let _ = metrics_task.await;

    let outcome = match &result {
        Ok(report) => {
            log_report(report);
            drain_result(report)
        }
        Err(error) => {
            warn!(%error, "drain failed");
            DrainResult::Failed
        }
    };
    shared
        .metrics
        .drain_finished(&record.kind, outcome, started.elapsed().as_secs_f64());
    match (outcome, &result) {
        (DrainResult::Succeeded, _) => {
            shared
                .notifier
                .notify(Notice::about(NotifyEvent::Succeeded, name, &record))
        }
        (DrainResult::Failed | DrainResult::TimedOut, result) => shared.notifier.notify(
            Notice::about(NotifyEvent::Failed, name, &record).with_detail(match result {
                Ok(report) => crate::notify::failure_detail(report),
                Err(error) => error.to_string(),
            }),
        ),
        (DrainResult::Cancelled, _) => {}
    }
    if outcome == DrainResult::Cancelled {
        // Lost the lease or shutting down: the next leader resumes from the record.
        return;
    }

    let karpenter =
        handover && outcome == DrainResult::Succeeded && shared.config.behaviour.karpenter_handoff;
    let node = shared.watch.store().get(&ObjectRef::new(name));
    shared
        .handoff
        .hand_over(name, node.as_deref(), &record, karpenter)
        .await;
    // Handed over (an Auto Scaling hook completed, a spot node emptied early): the instance may
    // go before the deadline, so its checks begin now.
    if let Some(node) = &node {
        watch_out_of_service(shared, node, &record, Timestamp::now());
    }
}

/// Registers `node` for the out-of-service taint, checked from `from` on, when the flag is on
/// and the drain is one whose instance is going away.
fn watch_out_of_service(shared: &Shared, node: &Node, record: &DrainRecord, from: Timestamp) {
    let Some(out_of_service) = &shared.out_of_service else {
        return;
    };
    // A rebalance recommendation or a voluntary drain leaves a running instance behind.
    if record.voluntary || record.kind == DrainKind::Manual {
        return;
    }
    if node::is_out_of_service(node) {
        return;
    }
    let instance = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.as_deref())
        .and_then(instance_id_from_provider_id);
    match instance {
        Some(instance) => out_of_service.watch(&node.name_any(), instance, from),
        None => {
            warn!(node = %node.name_any(), "no EC2 instance id in the node's providerID: it cannot be marked out of service")
        }
    }
}

fn drain_result(report: &DrainReport) -> DrainResult {
    match report.outcome {
        DrainOutcome::Drained if report.is_success() => DrainResult::Succeeded,
        DrainOutcome::Drained | DrainOutcome::Refused => DrainResult::Failed,
        DrainOutcome::TimedOut => DrainResult::TimedOut,
        DrainOutcome::Cancelled => DrainResult::Cancelled,
    }
}

fn log_report(report: &DrainReport) {
    for node in &report.nodes {
        let remaining: Vec<String> = node
            .remaining()
            .map(|p| match &p.blocker {
                Some(blocker) => format!("{} ({blocker})", p.pod),
                None => p.pod.to_string(),
            })
            .collect();
        info!(
            node = %node.node,
            outcome = report.outcome.as_str(),
            seconds = report.elapsed.as_secs_f64(),
            pods = node.pods.len(),
            remaining = ?remaining,
            "drain ended"
        );
    }
}

/// Turns the engine's progress into metrics (bounded labels only), and deadline overrides into
/// notices (`override_notice` with the pod added).
async fn count_progress(
    metrics: Metrics,
    mut events: mpsc::Receiver<ProgressEvent>,
    notifier: Notifier,
    override_notice: Notice,
) {
    while let Some(event) = events.recv().await {
        let ProgressEvent::Pod { change, pod, .. } = event else {
            continue;
        };
        match change {
            PodChange::Evicting { .. } => metrics.eviction(EvictionOutcome::Evicted),
            PodChange::Deleting { .. } => metrics.eviction(EvictionOutcome::Deleted),
            PodChange::LoadBalancerWaitCut { reason, .. } => metrics.load_balancer_wait_cut(reason),
            PodChange::DeadlineOverride { .. } => {
                metrics.deadline_override();
                notifier.notify(override_notice.clone().with_detail(pod.to_string()));
                metrics.eviction(EvictionOutcome::Deleted);
            }
            PodChange::Blocked {
                blocker: Blocker::Pdb { .. } | Blocker::MultiplePdbs { .. },
            } => metrics.pdb_blocked_retry(),
            PodChange::Blocked {
                blocker: Blocker::ApiError { .. },
            } => metrics.eviction(EvictionOutcome::Failed),
            _ => {}
        }
    }
}

/// Uncordons nodes that survived a rebalance recommendation for longer than configured.
async fn sweep_rebalanced(shared: Arc<Shared>, term: CancellationToken) {
    let Some(after_std) = shared.config.behaviour.rebalance_uncordon_after else {
        return;
    };
    let Ok(after) = SignedDuration::try_from(after_std) else {
        return;
    };
    let period = REBALANCE_SWEEP_INTERVAL
        .min(after_std / 4)
        .max(Duration::from_secs(1));
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Timestamp::now();
        for node in shared.watch.store().state() {
            let Ok(Some(record)) = node::record_of(&node) else {
                continue;
            };
            let survived = record.kind
                == DrainKind::Interruption(InterruptionKind::RebalanceRecommendation)
                && record.phase != Phase::HandedOver
                && record.started.checked_add(after).is_ok_and(|t| t <= now);
            let name = node.name_any();
            if !survived || lock(&shared.draining).contains_key(&name) {
                continue;
            }
            match node::release(&shared.nodes, &name).await {
                Ok(_) => info!(node = %name, "survived its rebalance recommendation: uncordoned"),
                Err(error) => {
                    warn!(node = %name, %error, "cannot uncordon after a rebalance recommendation")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPOT: DrainKind = DrainKind::Interruption(InterruptionKind::SpotInterruption);

    fn record(kind: &str, deadline: Option<i64>, voluntary: bool, started: i64) -> DrainRecord {
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        DrainRecord {
            deadline: deadline.map(at),
            voluntary,
            kind: kind.parse().unwrap(),
            ..DrainRecord::manual(at(started), None)
        }
    }

    #[test]
    fn a_redelivery_is_the_same_drain_and_keeps_its_start() {
        let mut running = record("spot-interruption", Some(120), false, 0);
        running.phase = Phase::Draining;
        let merged = merge_records(
            running.clone(),
            record("spot-interruption", Some(120), false, 5),
        );
        assert_eq!(merged.started, running.started);
        assert_eq!(merged.phase, Phase::Draining);
        assert!(same_urgency(
            &merged,
            &record("spot-interruption", Some(120), false, 0)
        ));
    }

    #[test]
    fn a_spot_warning_after_a_rebalance_makes_the_drain_involuntary_with_its_deadline() {
        let rebalance = record("rebalance-recommendation", None, true, 0);
        let spot = record("spot-interruption", Some(130), false, 10);
        let merged = merge_records(rebalance.clone(), spot);
        assert!(!merged.voluntary);
        assert_eq!(merged.kind, SPOT);
        assert_eq!(merged.started, rebalance.started);
        assert!(!same_urgency(&merged, &rebalance));
        // The earlier deadline wins whichever message comes second.
        let later = merge_records(
            merged.clone(),
            record("scheduled-change", Some(900), false, 20),
        );
        assert_eq!(later.deadline, merged.deadline);
        assert_eq!(later.kind, SPOT);
    }

    #[test]
    fn a_rebalance_read_after_the_spot_warning_leaves_the_drain_as_it_is() {
        let spot = record("spot-interruption", Some(120), false, 0);
        let merged = merge_records(
            spot.clone(),
            record("rebalance-recommendation", None, true, 1),
        );
        assert!(same_urgency(&merged, &spot));
        assert_eq!(merged.kind, SPOT);
        assert!(!merged.voluntary);
    }
}
