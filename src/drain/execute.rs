//! The drain executor: carries out plans against the API, for the CLI and the controller alike.
//!
//! A drain reads top to bottom:
//!
//! 1. every named node must exist (a typo cordons nothing);
//! 2. every node is prepared ([`node::prepare`]: cordon, taint, LB label, drain record) before
//!    any pod is touched, so evicted pods never land on a node that is about to be drained too;
//! 3. pods (per node, by field selector), PDBs and ReplicaSets are listed once, and each node
//!    gets a [`Plan`]; refused pods (kubectl's `--force` / `--delete-emptydir-data` /
//!    `--ignore-daemonsets` cases) stop the drain here, before anything is evicted;
//! 4. one event loop drives every node at once: it starts the steps the plan says are due,
//!    learns that pods are gone from a watch per node (never by polling), follows PDB status
//!    through a watch to retry blocked evictions the moment a budget allows them, and sleeps
//!    until the next backoff retry, deadline moment or timeout otherwise.
//!
//! The loop is a single task with concurrent requests: PDB budgets and surges span nodes, and
//! one owner of that state needs no locks. API calls go through the client's rate limit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::evict::{self, DeleteOutcome, EvictOutcome};
use super::pdb_feed::PdbFeed;
use super::plan::{
    Owners, Plan, PlanInput, PlanOptions, Progress, StepIndex, StepState, WarningKind, plan,
};
use super::policy::{self, ClusterPolicy, Strategy};
use super::report::{
    Blocker, DrainOutcome, DrainReport, NodeReport, PdbSeen, PodChange, PodRef, PodReport,
    ProgressEvent,
};
use super::surge::{self, SurgeStart};
use crate::names;
use crate::node::{self, DrainRecord, NodeError, Phase, describe_api_error, is_forbidden};

/// Default of [`DrainConfig::evictions_per_pdb`].
pub const EVICTIONS_PER_PDB: usize = 1;

/// Tunables of the executor. The defaults suit both the CLI and the controller.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// First retry after a PDB refusal, throttling or a failed request; doubles (with up to
    /// 100% jitter, so pods blocked together do not retry together) up to `retry_max`. A
    /// PDB-blocked eviction is also retried at once when the PDB's status says it would pass,
    /// so these timers are the safety net, not the pace.
    pub retry_min: Duration,
    /// Cap of the backoff: a budget that frees up is noticed through the PDB watch anyway.
    pub retry_max: Duration,
    /// How often a pod covered by several PDBs is retried when no PDB changes: the Eviction API
    /// refuses it until one goes, so asking often only adds load.
    pub multiple_pdb_recheck: Duration,
    /// `reportingController` of the Events nodedrain writes.
    pub reporter: String,
    /// `reportingInstance` (the pod name of a controller replica); defaults to `reporter`.
    pub reporting_instance: Option<String>,
    /// Eviction requests of this process in flight at once against one PDB (at least 1).
    ///
    /// Every eviction of a PDB-covered pod rewrites that PDB's status, and the apiserver answers
    /// a write conflict by sleeping 500 ms and trying again (`EvictionsRetry` in its eviction
    /// handler), up to 20 times. Evictions sent side by side against one PDB make a conflict
    /// storm: one wins each round, the rest re-read and re-write, and under a burst the apiserver
    /// spends its CPU on that and answers 504 after a minute. One at a time per PDB (PDBs still
    /// go in parallel) had the fewest timeouts and the most evictions in the burst benchmark
    /// (docs/performance.md).
    pub evictions_per_pdb: usize,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(15),
            multiple_pdb_recheck: Duration::from_secs(30),
            reporter: names::FIELD_MANAGER.to_string(),
            reporting_instance: None,
            evictions_per_pdb: EVICTIONS_PER_PDB,
        }
    }
}

/// One drain of one or more nodes.
#[derive(Debug, Clone)]
pub struct DrainRequest {
    /// When the nodes go away. With a deadline and `options.voluntary == false`, a pod still
    /// blocked at `deadline - grace - margin` is deleted past its PDB.
    pub deadline: Option<Timestamp>,
    /// Flags and semantics; `options.voluntary` decides whether PDBs may ever be overridden.
    pub options: PlanOptions,
    pub policy: ClusterPolicy,
    /// Give up after this long with a report of what blocked (`None`: never).
    pub timeout: Option<Duration>,
    /// The record to write on each node; `None` makes a [`DrainRecord::manual`] one.
    pub record: Option<DrainRecord>,
    /// Cancelling ends the drain with [`DrainOutcome::Cancelled`]; nodes stay cordoned.
    pub cancel: CancellationToken,
}

impl DrainRequest {
    /// A voluntary drain with these options, no deadline, no timeout and no cluster policy.
    pub fn new(options: PlanOptions) -> Self {
        DrainRequest {
            deadline: None,
            options,
            policy: ClusterPolicy::default(),
            timeout: None,
            record: None,
            cancel: CancellationToken::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("no nodes to drain")]
    NoNodes,
    /// Checked before anything is changed.
    #[error("{}", not_found(nodes))]
    NodesNotFound { nodes: Vec<String> },
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The apiserver refused or failed a request the drain cannot do without.
    #[error("cannot {action}: {}", describe_api_error(source))]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
}

fn not_found(nodes: &[String]) -> String {
    let quoted: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    if nodes.len() == 1 {
        format!("node {} not found", quoted[0])
    } else {
        format!("nodes {} not found", quoted.join(", "))
    }
}

impl DrainError {
    /// An RBAC refusal (401/403): retrying will not help, the operator must grant rights.
    pub fn is_forbidden(&self) -> bool {
        match self {
            DrainError::Node(e) => e.is_forbidden(),
            DrainError::Api { source, .. } => is_forbidden(source),
            _ => false,
        }
    }
}

/// A node's plan, as `nodedrain plan` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub plan: Plan,
}

/// The drain engine. Cheap to clone; one per process is enough.
#[derive(Clone)]
pub struct Drainer {
    client: Client,
    config: DrainConfig,
    recorder: Recorder,
    /// Started by the first drain, shared by all (and by clones).
    pdb_feed: Arc<OnceLock<PdbFeed>>,
    pdb_ledger: Arc<PdbLedger>,
}

/// Everything listed once at the start of a drain.
struct Snapshot {
    pods: Vec<Vec<Pod>>,
    pdbs: Vec<PodDisruptionBudget>,
    owners: Owners,
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> DrainError {
    let action = action.into();
    move |source| DrainError::Api { action, source }
}

impl Drainer {
    pub fn new(client: Client, config: DrainConfig) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: config.reporter.clone(),
                instance: config.reporting_instance.clone(),
            },
        );
        Drainer {
            client,
            recorder,
            pdb_feed: Arc::default(),
            pdb_ledger: Arc::new(PdbLedger::new(config.evictions_per_pdb)),
            config,
        }
    }

    /// Plans a drain of `nodes` without changing anything (`nodedrain plan`, `--dry-run`).
    pub async fn plan(
        &self,
        nodes: &[String],
        options: &PlanOptions,
        policy: &ClusterPolicy,
        deadline: Option<Timestamp>,
    ) -> Result<Vec<NodePlan>, DrainError> {
        let nodes = dedupe(nodes)?;
        self.fetch_nodes(&nodes).await?;
        let snapshot = self.snapshot(&nodes).await?;
        let now = Timestamp::now();
        Ok(nodes
            .iter()
            .zip(&snapshot.pods)
            .map(|(node, pods)| NodePlan {
                node: node.clone(),
                plan: plan(PlanInput {
                    pods,
                    pdbs: &snapshot.pdbs,
                    owners: &snapshot.owners,
                    policy,
                    options,
                    now,
                    deadline,
                }),
            })
            .collect())
    }

    /// Drains `nodes`: cordons them all, then moves their pods off in plan order, under PDBs and
    /// the deadline, until they are empty, `request.timeout` passes, or `request.cancel` fires.
    ///
    /// Progress goes to `progress` as it happens; the receiver must be read concurrently (or
    /// dropped: a closed channel is fine). Returns `Err` only when the drain could not be carried
    /// out at all (a node does not exist, the apiserver refuses a request it needs); a drain
    /// that ends unfinished is an `Ok` report whose outcome and blockers say why.
    pub async fn drain(
        &self,
        nodes: &[String],
        request: DrainRequest,
        progress: mpsc::Sender<ProgressEvent>,
    ) -> Result<DrainReport, DrainError> {
        let started = Instant::now();
        let nodes = dedupe(nodes)?;
        let fetched = self.fetch_nodes(&nodes).await?;
        let now = Timestamp::now();
        let record = request
            .record
            .clone()
            .unwrap_or_else(|| DrainRecord::manual(now, request.deadline));
        let node_api: Api<Node> = Api::all(self.client.clone());

        // Every node is prepared before any pod of any node is touched.
        let prepared = futures::future::try_join_all(
            fetched
                .iter()
                .map(|node| node::prepare_from(&node_api, node, &record)),
        )
        .await?;
        let mut side = JoinSet::new();
        for (name, node) in nodes.iter().zip(&prepared) {
            let _ = progress
                .send(ProgressEvent::Cordoned { node: name.clone() })
                .await;
            self.publish(
                &mut side,
                node.object_ref(&()),
                EventType::Normal,
                names::reasons::DRAIN_STARTED,
                format!(
                    "Cordoned and tainted {}={} for a drain ({})",
                    names::TAINT_INTERRUPTION,
                    record.kind,
                    record.reason.as_deref().unwrap_or("no reason given")
                ),
            );
        }

        let snapshot = match self.snapshot(&nodes).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.fail_records(&nodes, &prepared, &record).await;
                return Err(e);
            }
        };
        let now = Timestamp::now();
        let mut runs = Vec::with_capacity(nodes.len());
        for ((name, node), pods) in nodes.iter().zip(prepared).zip(snapshot.pods) {
            let plan = plan(PlanInput {
                pods: &pods,
                pdbs: &snapshot.pdbs,
                owners: &snapshot.owners,
                policy: &request.policy,
                options: &request.options,
                now,
                deadline: request.deadline,
            });
            let node_record = node::record_of(&node)
                .ok()
                .flatten()
                .unwrap_or_else(|| record.clone());
            runs.push(NodeRun::new(name.clone(), node, node_record, plan, pods));
        }

        // Report the plans; warnings also go to the pods as Events.
        for run in &runs {
            let _ = progress
                .send(ProgressEvent::Planned {
                    node: run.name.clone(),
                    steps: run.plan.steps.len(),
                    ignored: run.plan.ignored.len(),
                    refused: run.plan.refused.len(),
                })
                .await;
            for warning in &run.plan.warnings {
                let _ = progress
                    .send(ProgressEvent::Warning {
                        node: run.name.clone(),
                        warning: warning.clone(),
                    })
                    .await;
                let pod = run
                    .all_pods
                    .iter()
                    .find(|p| p.metadata.uid == warning.uid && warning.uid.is_some());
                if let Some(pod) = pod {
                    let note = match &warning.kind {
                        WarningKind::Annotation(w) => format!("{w}; the default applies"),
                        _ => warning.to_string(),
                    };
                    self.publish(
                        &mut side,
                        pod.object_ref(&()),
                        EventType::Warning,
                        names::reasons::INVALID_ANNOTATION,
                        note,
                    );
                }
            }
        }

        // Refused pods stop everything before the first eviction, like kubectl.
        if runs.iter().any(|r| !r.plan.refused.is_empty()) {
            for run in &mut runs {
                if !run.plan.refused.is_empty() {
                    let _ = progress
                        .send(ProgressEvent::Refused {
                            node: run.name.clone(),
                            pods: run.plan.refused.clone(),
                        })
                        .await;
                }
                run.record.phase = Phase::Failed;
            }
            let outcome = DrainOutcome::Refused;
            self.finish_nodes(&mut side, &runs, outcome).await;
            drain_side(&mut side).await;
            return Ok(report(outcome, started, &runs, &BTreeMap::new()));
        }

        let mut engine = Engine::new(self, runs, snapshot.pdbs, &request, progress.clone());
        let result = engine.run(started, request.timeout, &request.cancel).await;
        let Engine {
            nodes: mut runs,
            pdbs,
            side: engine_side,
            ..
        } = engine;
        side.extend_from(engine_side);
        match result {
            Ok(outcome) => {
                for run in &mut runs {
                    run.record.phase = match outcome {
                        DrainOutcome::Drained => Phase::Drained,
                        DrainOutcome::Cancelled => run.record.phase,
                        _ if run.all_gone() => Phase::Drained,
                        _ => Phase::Failed,
                    };
                }
                if outcome != DrainOutcome::Cancelled {
                    self.finish_nodes(&mut side, &runs, outcome).await;
                }
                drain_side(&mut side).await;
                Ok(report(outcome, started, &runs, &pdbs))
            }
            Err(e) => {
                for run in &mut runs {
                    run.record.phase = Phase::Failed;
                }
                self.finish_nodes(&mut side, &runs, DrainOutcome::Cancelled)
                    .await;
                drain_side(&mut side).await;
                Err(e)
            }
        }
    }

    async fn fetch_nodes(&self, nodes: &[String]) -> Result<Vec<Node>, DrainError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let results =
            futures::future::join_all(nodes.iter().map(|name| node::get(&api, name))).await;
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for result in results {
            match result {
                Ok(node) => found.push(node),
                Err(NodeError::NotFound { node }) => missing.push(node),
                Err(e) => return Err(e.into()),
            }
        }
        if missing.is_empty() {
            Ok(found)
        } else {
            Err(DrainError::NodesNotFound { nodes: missing })
        }
    }

    async fn snapshot(&self, nodes: &[String]) -> Result<Snapshot, DrainError> {
        let pods_api: Api<Pod> = Api::all(self.client.clone());
        let pods = futures::future::try_join_all(nodes.iter().map(|name| {
            let api = pods_api.clone();
            async move {
                api.list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
                    .await
                    .map(|list| list.items.into_iter().map(trimmed).collect::<Vec<Pod>>())
                    .map_err(api_err(format!("list pods on node {name}")))
            }
        }));
        let pdbs = async {
            Api::<PodDisruptionBudget>::all(self.client.clone())
                .list(&ListParams::default())
                .await
                .map(|list| list.items)
                .map_err(api_err("list PodDisruptionBudgets"))
        };
        let (pods, pdbs) = futures::future::try_join(pods, pdbs).await?;
        // ReplicaSets only of namespaces where a pod on these nodes has one, metadata only: the
        // planner needs their owner references and nothing else.
        let namespaces: BTreeSet<String> = pods
            .iter()
            .flatten()
            .filter(|p| policy::controller_of(p).is_some_and(|c| c.kind == "ReplicaSet"))
            .filter_map(|p| p.metadata.namespace.clone())
            .collect();
        let replica_sets = futures::future::try_join_all(namespaces.iter().map(|ns| {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
            async move {
                api.list_metadata(&ListParams::default())
                    .await
                    .map(|list| list.items)
                    .map_err(api_err(format!("list ReplicaSets in namespace {ns}")))
            }
        }))
        .await?;
        let replica_sets: Vec<ReplicaSet> = replica_sets
            .into_iter()
            .flatten()
            .map(|meta| ReplicaSet {
                metadata: meta.metadata,
                ..ReplicaSet::default()
            })
            .collect();
        Ok(Snapshot {
            pods,
            pdbs,
            owners: Owners::from_replica_sets(&replica_sets),
        })
    }

    /// Publishes an Event in the background; a refused Event never fails a drain.
    fn publish(
        &self,
        side: &mut JoinSet<()>,
        reference: ObjectReference,
        type_: EventType,
        reason: &'static str,
        note: String,
    ) {
        let recorder = self.recorder.clone();
        side.spawn(async move {
            let event = KubeEvent {
                type_,
                reason: reason.to_string(),
                // The Events API limits notes to 1 kB.
                note: Some(truncate(&note, 1000)),
                action: "Drain".to_string(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(reason, error = %describe_api_error(&e), "cannot publish Event");
            }
        });
    }

    /// Writes each node's final record phase and a DrainSucceeded / DrainFailed Event.
    async fn finish_nodes(&self, side: &mut JoinSet<()>, runs: &[NodeRun], outcome: DrainOutcome) {
        let api: Api<Node> = Api::all(self.client.clone());
        let writes = runs.iter().map(|run| {
            let api = api.clone();
            async move {
                if let Err(e) = node::write_record(&api, &run.name, &run.record).await {
                    warn!(node = %run.name, error = %e, "cannot write the drain record");
                }
            }
        });
        futures::future::join_all(writes).await;
        for run in runs {
            let reference = run.node.object_ref(&());
            if run.record.phase == Phase::Drained {
                self.publish(
                    side,
                    reference,
                    EventType::Normal,
                    names::reasons::DRAIN_SUCCEEDED,
                    format!("{} pods left the node", run.plan.steps.len()),
                );
            } else {
                let remaining: Vec<String> = run
                    .steps
                    .iter()
                    .filter(|s| s.phase != StepPhase::Gone)
                    .take(10)
                    .map(|s| s.key.to_string())
                    .collect();
                let why = match outcome {
                    DrainOutcome::Refused => {
                        "pods need --force / --delete-emptydir-data / --ignore-daemonsets"
                            .to_string()
                    }
                    DrainOutcome::TimedOut => {
                        format!("timed out; remaining: {}", remaining.join(", "))
                    }
                    _ => format!("stopped; remaining: {}", remaining.join(", ")),
                };
                self.publish(
                    side,
                    reference,
                    EventType::Warning,
                    names::reasons::DRAIN_FAILED,
                    why,
                );
            }
        }
    }

    async fn fail_records(&self, names: &[String], nodes: &[Node], record: &DrainRecord) {
        let api: Api<Node> = Api::all(self.client.clone());
        for (name, node) in names.iter().zip(nodes) {
            let mut record = node::record_of(node)
                .ok()
                .flatten()
                .unwrap_or_else(|| record.clone());
            record.phase = Phase::Failed;
            let _ = node::write_record(&api, name, &record).await;
        }
    }
}

fn dedupe(nodes: &[String]) -> Result<Vec<String>, DrainError> {
    let mut seen = HashSet::new();
    let nodes: Vec<String> = nodes
        .iter()
        .filter(|n| seen.insert(n.as_str()))
        .cloned()
        .collect();
    if nodes.is_empty() {
        Err(DrainError::NoNodes)
    } else {
        Ok(nodes)
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Waits for background Event writes, briefly: a drain's result must not hang on Events.
async fn drain_side(side: &mut JoinSet<()>) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while side.join_next().await.is_some() {}
    })
    .await;
}

trait JoinSetExt {
    fn extend_from(&mut self, other: JoinSet<()>);
}

impl JoinSetExt for JoinSet<()> {
    /// Keeps `other`'s tasks running and awaited: detaching them would lose Events at exit.
    fn extend_from(&mut self, mut other: JoinSet<()>) {
        self.spawn(async move { while other.join_next().await.is_some() {} });
    }
}

// ---------------------------------------------------------------------------------------------
// The event loop
// ---------------------------------------------------------------------------------------------

/// Where one step is, in more detail than the planner's [`StepState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepPhase {
    NotStarted,
    /// Wants (another) eviction.
    Evict,
    /// Wants a deletion.
    Delete,
    /// `surge`: waiting for the restart and a Ready replacement.
    Surge,
    /// `wait`: waiting for completion.
    Wait,
    /// Eviction or deletion accepted; waiting for the pod to go.
    Terminating,
    Gone,
}

struct StepRun {
    pod: Pod,
    key: PodRef,
    phase: StepPhase,
    started_at: Option<Instant>,
    gone_after: Option<Duration>,
    /// Try the eviction / deletion as soon as the PDB budget allows.
    try_now: bool,
    /// Retry no later than this, whatever the budget says (the backoff safety net).
    retry_at: Option<Instant>,
    backoff: Option<ExponentialBackoff>,
    /// The last backoff delay taken: once it reaches `retry_max`, a retry is sent even when the
    /// PDB's status says it would be refused (the safety net against a view gone wrong).
    last_delay: Duration,
    in_flight: bool,
    /// The PDB an in-flight eviction was counted against.
    gate: Option<PdbKey>,
    /// The gate PDB's `disruptionsAllowed` when the in-flight eviction was sent.
    gate_allowed: Option<i32>,
    /// PDBs whose selector covers the pod; `None` until computed or after a PDB in the
    /// namespace appeared, went or changed its selector.
    covering: Option<Vec<PdbKey>>,
    /// Last blocker reported, so each distinct one is reported once.
    blocker: Option<Blocker>,
    overridden: bool,
    /// Set when the deadline forced a deletion: what the pod was deleted past (kept for a
    /// retry of that deletion).
    override_blocker: Option<Option<Blocker>>,
    completed: bool,
}

struct NodeRun {
    name: String,
    node: Node,
    record: DrainRecord,
    plan: Plan,
    progress: Progress,
    steps: Vec<StepRun>,
    all_pods: Vec<Pod>,
    by_uid: HashMap<String, usize>,
    /// UIDs seen since the pod watch (re)started listing.
    relist: Option<HashSet<String>>,
    drained_reported: bool,
    draining_written: bool,
}

impl NodeRun {
    fn new(name: String, node: Node, record: DrainRecord, plan: Plan, pods: Vec<Pod>) -> Self {
        let steps: Vec<StepRun> = plan
            .steps
            .iter()
            .map(|step| {
                let pod = pods
                    .iter()
                    .find(|p| p.metadata.uid == step.uid)
                    .cloned()
                    .unwrap_or_default();
                StepRun {
                    pod,
                    key: PodRef {
                        namespace: step.namespace.clone(),
                        name: step.name.clone(),
                    },
                    phase: StepPhase::NotStarted,
                    started_at: None,
                    gone_after: None,
                    try_now: false,
                    retry_at: None,
                    backoff: None,
                    last_delay: Duration::ZERO,
                    in_flight: false,
                    gate: None,
                    gate_allowed: None,
                    covering: None,
                    blocker: None,
                    overridden: false,
                    override_blocker: None,
                    completed: false,
                }
            })
            .collect();
        let by_uid = plan
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.uid.clone().map(|uid| (uid, i)))
            .collect();
        let progress = plan.progress();
        NodeRun {
            name,
            node,
            record,
            plan,
            progress,
            steps,
            all_pods: pods,
            by_uid,
            relist: None,
            drained_reported: false,
            draining_written: false,
        }
    }

    fn all_gone(&self) -> bool {
        self.steps.iter().all(|s| s.phase == StepPhase::Gone)
    }
}

type PdbKey = (String, String);

struct PdbLive {
    pdb: PodDisruptionBudget,
    /// Shared by every drain of this process that follows the PDB (see [`PdbLedger`]).
    counts: Arc<Mutex<PdbCounts>>,
}

/// What the PDB's status does not show yet: the evictions of this process that its
/// `disruptionsAllowed` does not account for.
#[derive(Debug)]
struct PdbCounts {
    /// Evictions counted against this PDB whose answer has not come back.
    in_flight: i32,
    /// Pods we evicted whose eviction no status we have seen accounts for yet, so
    /// `disruptionsAllowed` is too high by their number. An eviction writes the PDB status with
    /// the pod in `disruptedPods` before it answers; every later status (the disruption
    /// controller drops the pod from that map once it is terminating, and no longer counts it
    /// healthy) accounts for it too.
    unseen: BTreeSet<String>,
    /// Every pod name seen in `disruptedPods`: an eviction whose status update arrived before
    /// its answer is never counted as unseen.
    reflected: BTreeSet<String>,
    /// Turns to send an eviction against this PDB ([`DrainConfig::evictions_per_pdb`]).
    requests: Arc<tokio::sync::Semaphore>,
}

impl PdbCounts {
    /// Folds in a status that lists `disrupted`.
    fn saw(&mut self, disrupted: BTreeSet<String>) {
        self.unseen.retain(|name| !disrupted.contains(name));
        self.reflected.extend(disrupted);
    }
}

/// The [`PdbCounts`] of every PDB some drain of this process follows. The controller runs one
/// drain per node; if each counted only its own evictions, a burst of drains would all spend
/// the same budget at once and the apiserver would answer most of them 429. Entries go when no
/// drain holds them any more.
struct PdbLedger {
    entries: Mutex<HashMap<PdbKey, std::sync::Weak<Mutex<PdbCounts>>>>,
    requests_per_pdb: usize,
}

impl Default for PdbLedger {
    fn default() -> Self {
        PdbLedger::new(EVICTIONS_PER_PDB)
    }
}

impl PdbLedger {
    fn new(requests_per_pdb: usize) -> Self {
        PdbLedger {
            entries: Mutex::default(),
            requests_per_pdb: requests_per_pdb.max(1),
        }
    }

    fn counts(&self, key: &PdbKey, disrupted: BTreeSet<String>) -> Arc<Mutex<PdbCounts>> {
        let mut ledger = lock(&self.entries);
        if let Some(counts) = ledger.get(key).and_then(std::sync::Weak::upgrade) {
            lock(&counts).saw(disrupted);
            return counts;
        }
        ledger.retain(|_, counts| counts.strong_count() > 0);
        let counts = Arc::new(Mutex::new(PdbCounts {
            in_flight: 0,
            unseen: BTreeSet::new(),
            reflected: disrupted,
            requests: Arc::new(tokio::sync::Semaphore::new(self.requests_per_pdb)),
        }));
        ledger.insert(key.clone(), Arc::downgrade(&counts));
        counts
    }
}

/// Counts stay consistent under a panic elsewhere (each update is one field operation).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PdbLive {
    /// `disruptionsAllowed`, when the disruption controller has computed it for the current spec.
    fn allowed(&self) -> Option<i32> {
        let status = self.pdb.status.as_ref()?;
        let current =
            status.observed_generation.unwrap_or(0) >= self.pdb.metadata.generation.unwrap_or(0);
        current.then_some(status.disruptions_allowed?)
    }

    fn budget(&self) -> Option<i32> {
        let counts = lock(&self.counts);
        Some(self.allowed()? - counts.in_flight - counts.unseen.len() as i32)
    }

    fn name(&self) -> String {
        self.pdb.metadata.name.clone().unwrap_or_default()
    }
}

enum SurgeState {
    Starting,
    Restarted,
    Fallback(String),
}

struct SurgeRun {
    namespace: String,
    deployment: String,
    state: SurgeState,
    /// Surge steps of this Deployment, in plan order.
    steps: Vec<(usize, usize)>,
    /// pod-template-hash of the old pods on the draining nodes.
    old_hashes: BTreeSet<String>,
    /// The Deployment's pods, from its watch.
    pods: HashMap<String, Pod>,
    relist: Option<HashSet<String>>,
}

enum Gate {
    Open,
    /// Exactly one PDB, whose budget allows one more eviction.
    Pdb(PdbKey),
    Closed(Blocker),
    Multiple,
}

enum Completion {
    Evict {
        node: usize,
        step: usize,
        grace: i64,
        result: Result<EvictOutcome, kube::Error>,
    },
    Delete {
        node: usize,
        step: usize,
        grace: i64,
        overriding: Option<Option<Blocker>>,
        result: Result<DeleteOutcome, kube::Error>,
    },
    Surge {
        surge: usize,
        result: Result<SurgeStart, kube::Error>,
    },
}

enum Input {
    Pods {
        node: usize,
        event: Result<watcher::Event<Pod>, watcher::Error>,
    },
    Pdbs(Result<watcher::Event<PodDisruptionBudget>, watcher::Error>),
    SurgePods {
        surge: usize,
        event: Result<watcher::Event<Pod>, watcher::Error>,
    },
}

struct Engine<'a> {
    drainer: &'a Drainer,
    client: Client,
    nodes: Vec<NodeRun>,
    draining: BTreeSet<String>,
    pdbs: BTreeMap<PdbKey, PdbLive>,
    pdb_relist: Option<HashSet<PdbKey>>,
    surges: Vec<SurgeRun>,
    surge_index: HashMap<PdbKey, usize>,
    actions: FuturesUnordered<BoxFuture<'static, Completion>>,
    inputs: SelectAll<BoxStream<'static, Input>>,
    side: JoinSet<()>,
    pending: Vec<ProgressEvent>,
    progress: mpsc::Sender<ProgressEvent>,
    backoff: ExponentialBuilder,
    multiple_pdb_recheck: Duration,
    retry_max: Duration,
    disable_eviction: bool,
    drain_started: Timestamp,
    fatal: Option<DrainError>,
}

fn watch_error_is_fatal(error: &watcher::Error) -> Option<&kube::Error> {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e)
            if is_forbidden(e) =>
        {
            Some(e)
        }
        _ => None,
    }
}

/// Whether two blockers say the same thing to a person: the same PDB (whatever its count and
/// the apiserver's wording, which change with every replacement), the same kind of API trouble.
fn same_blocker(a: &Blocker, b: &Blocker) -> bool {
    match (a, b) {
        (Blocker::Pdb { name: a, .. }, Blocker::Pdb { name: b, .. }) => a == b,
        (Blocker::Throttled { .. }, Blocker::Throttled { .. })
        | (Blocker::ApiError { .. }, Blocker::ApiError { .. }) => true,
        (a, b) => a == b,
    }
}

fn pod_uid(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref()
}

fn pod_ns(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

/// A pod without its `managedFields`: a drain keeps every pod of its nodes for its whole run, and
/// those fields (which nothing here reads) are most of a pod's size.
fn trimmed(mut pod: Pod) -> Pod {
    pod.managed_fields_mut().clear();
    pod
}

/// The pod names in the PDB's `status.disruptedPods`.
fn disrupted_pods(pdb: &PodDisruptionBudget) -> BTreeSet<String> {
    pdb.status
        .as_ref()
        .and_then(|s| s.disrupted_pods.as_ref())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

fn pdb_key(pdb: &PodDisruptionBudget) -> PdbKey {
    (
        pdb.metadata.namespace.clone().unwrap_or_default(),
        pdb.metadata.name.clone().unwrap_or_default(),
    )
}

fn instant_of(at: Timestamp, now_ts: Timestamp, now: Instant) -> Instant {
    let ahead = at.duration_since(now_ts);
    if ahead.is_negative() {
        now
    } else {
        now + Duration::try_from(ahead).unwrap_or(Duration::ZERO)
    }
}

impl<'a> Engine<'a> {
    fn new(
        drainer: &'a Drainer,
        nodes: Vec<NodeRun>,
        pdbs: Vec<PodDisruptionBudget>,
        request: &DrainRequest,
        progress: mpsc::Sender<ProgressEvent>,
    ) -> Self {
        let client = drainer.client.clone();
        let config = &drainer.config;
        let mut inputs: SelectAll<BoxStream<'static, Input>> = SelectAll::new();
        for (i, run) in nodes.iter().enumerate() {
            let stream = watcher(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={}", run.name)),
            )
            .default_backoff()
            .map(move |event| Input::Pods { node: i, event });
            inputs.push(stream.boxed());
        }
        let feed = drainer
            .pdb_feed
            .get_or_init(|| PdbFeed::start(client.clone()));
        inputs.push(feed.subscribe().map(Input::Pdbs).boxed());
        let draining = nodes.iter().map(|n| n.name.clone()).collect();
        let pdbs = pdbs
            .into_iter()
            .map(|pdb| {
                let key = pdb_key(&pdb);
                let counts = drainer.pdb_ledger.counts(&key, disrupted_pods(&pdb));
                (key, PdbLive { pdb, counts })
            })
            .collect();
        Engine {
            drainer,
            client,
            nodes,
            draining,
            pdbs,
            pdb_relist: None,
            surges: Vec::new(),
            surge_index: HashMap::new(),
            actions: FuturesUnordered::new(),
            inputs,
            side: JoinSet::new(),
            pending: Vec::new(),
            progress,
            backoff: ExponentialBuilder::default()
                .with_min_delay(config.retry_min)
                .with_max_delay(config.retry_max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
            multiple_pdb_recheck: config.multiple_pdb_recheck,
            retry_max: config.retry_max,
            disable_eviction: request.options.disable_eviction,
            drain_started: Timestamp::now(),
            fatal: None,
        }
    }

    async fn run(
        &mut self,
        started: Instant,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<DrainOutcome, DrainError> {
        let timeout_at = timeout.map(|t| started + t);
        loop {
            if let Some(e) = self.fatal.take() {
                self.flush().await;
                return Err(e);
            }
            let now_ts = Timestamp::now();
            let now = Instant::now();
            self.start_due(now_ts, now);
            self.deadline_overrides(now_ts);
            self.attempt(now_ts, now);
            self.flush().await;
            if self.nodes.iter().all(NodeRun::all_gone) {
                return Ok(DrainOutcome::Drained);
            }
            if timeout_at.is_some_and(|t| now >= t) {
                return Ok(DrainOutcome::TimedOut);
            }
            let wake = self.next_wake(now_ts, now, timeout_at);
            tokio::select! {
                () = cancel.cancelled() => return Ok(DrainOutcome::Cancelled),
                Some(completion) = self.actions.next(), if !self.actions.is_empty() => {
                    self.on_completion(completion);
                }
                Some(input) = self.inputs.next() => self.on_input(input),
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn flush(&mut self) {
        for event in self.pending.drain(..) {
            // A closed receiver only means nobody listens.
            let _ = self.progress.send(event).await;
        }
    }

    fn emit(&mut self, node: usize, step: usize, change: PodChange) {
        let run = &self.nodes[node];
        self.pending.push(ProgressEvent::Pod {
            node: run.name.clone(),
            pod: run.steps[step].key.clone(),
            change,
        });
    }

    /// Reports a blocker once per distinct value.
    fn block(&mut self, node: usize, step: usize, blocker: Blocker) {
        let known = self.nodes[node].steps[step].blocker.as_ref();
        let new = known.is_none_or(|known| !same_blocker(known, &blocker));
        self.nodes[node].steps[step].blocker = Some(blocker.clone());
        if new {
            self.emit(node, step, PodChange::Blocked { blocker });
        }
    }

    fn next_backoff(&mut self, node: usize, step: usize) -> Duration {
        let builder = self.backoff;
        let s = &mut self.nodes[node].steps[step];
        let delay = s
            .backoff
            .get_or_insert_with(|| builder.build())
            .next()
            .unwrap_or(self.retry_max);
        s.last_delay = delay;
        delay
    }

    // --- starting steps ---

    fn start_due(&mut self, now_ts: Timestamp, now: Instant) {
        for n in 0..self.nodes.len() {
            let due = self.nodes[n]
                .plan
                .due_to_start(&self.nodes[n].progress, now_ts);
            for StepIndex(i) in due {
                if self.nodes[n].steps[i].phase == StepPhase::NotStarted {
                    self.start_step(n, i, now);
                }
            }
        }
    }

    fn start_step(&mut self, n: usize, i: usize, now: Instant) {
        if !self.nodes[n].draining_written {
            self.nodes[n].draining_written = true;
            self.nodes[n].record.phase = Phase::Draining;
            let api: Api<Node> = Api::all(self.client.clone());
            let name = self.nodes[n].name.clone();
            let record = self.nodes[n].record.clone();
            self.side.spawn(async move {
                if let Err(e) = node::write_record(&api, &name, &record).await {
                    warn!(node = %name, error = %e, "cannot write the drain record");
                }
            });
        }
        let run = &mut self.nodes[n];
        run.progress.set(StepIndex(i), StepState::Started);
        let plan = &run.plan.steps[i];
        let strategy = plan.strategy;
        let terminating = plan.terminating;
        let step = &mut run.steps[i];
        step.started_at = Some(now);
        if terminating {
            step.phase = StepPhase::Terminating;
            return;
        }
        match strategy {
            Strategy::Evict => {
                step.phase = StepPhase::Evict;
                step.try_now = true;
            }
            Strategy::Delete => {
                step.phase = StepPhase::Delete;
                step.try_now = true;
            }
            Strategy::Wait => {
                step.phase = StepPhase::Wait;
                self.emit(n, i, PodChange::Waiting);
            }
            Strategy::Surge => {
                step.phase = StepPhase::Surge;
                self.start_surge(n, i);
            }
            // The planner never makes skip steps; nothing to do if one appears.
            Strategy::Skip => self.mark_gone(n, i, false),
        }
    }

    fn start_surge(&mut self, n: usize, i: usize) {
        let pod = &self.nodes[n].steps[i].pod;
        let namespace = pod_ns(pod).to_string();
        let hash = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(surge::POD_TEMPLATE_HASH))
            .cloned();
        let deployment = match self.nodes[n].plan.steps[i].owner.as_ref() {
            Some(owner) if owner.kind == "Deployment" => owner.name.clone(),
            _ => {
                self.fallback_step(n, i, "the pod's Deployment is unknown".to_string());
                return;
            }
        };
        let key = (namespace.clone(), deployment.clone());
        let index = match self.surge_index.get(&key) {
            Some(&index) => index,
            None => {
                let index = self.surges.len();
                self.surges.push(SurgeRun {
                    namespace: namespace.clone(),
                    deployment: deployment.clone(),
                    state: SurgeState::Starting,
                    steps: Vec::new(),
                    old_hashes: BTreeSet::new(),
                    pods: HashMap::new(),
                    relist: None,
                });
                self.surge_index.insert(key, index);
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), &namespace);
                let since = self.nodes[n].record.started.min(self.drain_started);
                self.actions.push(
                    async move {
                        let result = surge::start(&api, &deployment, since, Timestamp::now()).await;
                        Completion::Surge {
                            surge: index,
                            result,
                        }
                    }
                    .boxed(),
                );
                index
            }
        };
        let run = &mut self.surges[index];
        run.steps.push((n, i));
        if let Some(hash) = hash {
            run.old_hashes.insert(hash);
        }
        match &run.state {
            SurgeState::Starting => {}
            SurgeState::Fallback(reason) => {
                let reason = reason.clone();
                self.fallback_step(n, i, reason);
            }
            SurgeState::Restarted => {
                let deployment = run.deployment.clone();
                self.emit(
                    n,
                    i,
                    PodChange::Surging {
                        deployment,
                        restarted: false,
                    },
                );
                self.check_surge(index);
            }
        }
    }

    fn fallback_step(&mut self, n: usize, i: usize, reason: String) {
        let step = &mut self.nodes[n].steps[i];
        if step.phase != StepPhase::Surge {
            return;
        }
        step.phase = if self.disable_eviction {
            StepPhase::Delete
        } else {
            StepPhase::Evict
        };
        step.try_now = true;
        self.emit(n, i, PodChange::SurgeFallback { reason });
    }

    /// Lets surge steps go once enough Ready replacements exist on other nodes: the k-th old
    /// pod of a Deployment leaves when k replacements are Ready.
    fn check_surge(&mut self, index: usize) {
        let run = &self.surges[index];
        if !matches!(run.state, SurgeState::Restarted) {
            return;
        }
        let ready = run
            .pods
            .values()
            .filter(|p| surge::is_replacement(p, &run.old_hashes, &self.draining))
            .count();
        let deployment = run.deployment.clone();
        let steps = run.steps.clone();
        let mut released = steps
            .iter()
            .filter(|(n, i)| {
                !matches!(
                    self.nodes[*n].steps[*i].phase,
                    StepPhase::Surge | StepPhase::NotStarted
                )
            })
            .count();
        for (n, i) in steps {
            if self.nodes[n].steps[i].phase != StepPhase::Surge {
                continue;
            }
            if ready > released {
                released += 1;
                let step = &mut self.nodes[n].steps[i];
                step.phase = if self.disable_eviction {
                    StepPhase::Delete
                } else {
                    StepPhase::Evict
                };
                step.try_now = true;
                self.emit(
                    n,
                    i,
                    PodChange::ReplacementReady {
                        deployment: deployment.clone(),
                    },
                );
            } else {
                self.block(
                    n,
                    i,
                    Blocker::SurgeNotReady {
                        deployment: deployment.clone(),
                        ready,
                        wanted: released + 1,
                    },
                );
            }
        }
    }

    // --- deadline ---

    /// Deletes blocked pods whose last safe moment has come (involuntary drains only).
    fn deadline_overrides(&mut self, now_ts: Timestamp) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].plan.voluntary || self.nodes[n].plan.deadline.is_none() {
                continue;
            }
            for i in 0..self.nodes[n].steps.len() {
                let step = &self.nodes[n].steps[i];
                if step.in_flight || step.overridden {
                    continue;
                }
                let blocked = match step.phase {
                    // Evictions get their try first: they may well pass.
                    StepPhase::Evict => step.blocker.is_some(),
                    StepPhase::Surge | StepPhase::Wait => true,
                    _ => false,
                };
                if !blocked {
                    continue;
                }
                let Some(grace) = self.nodes[n].plan.must_override(StepIndex(i), now_ts) else {
                    continue;
                };
                let blocker = match step.phase {
                    StepPhase::Wait => Some(Blocker::StillRunning),
                    _ => step.blocker.clone(),
                };
                self.push_delete(n, i, grace, Some(blocker));
            }
        }
    }

    // --- requests ---

    /// The PDBs covering step `i` of node `n`, from the cache when it is current.
    fn covering(&mut self, n: usize, i: usize) -> Vec<PdbKey> {
        if let Some(keys) = &self.nodes[n].steps[i].covering {
            return keys.clone();
        }
        let pod = &self.nodes[n].steps[i].pod;
        let namespace = pod_ns(pod);
        let keys: Vec<PdbKey> = self
            .pdbs
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter(|(_, live)| policy::pdb_matches_pod(&live.pdb, pod))
            .map(|(key, _)| key.clone())
            .collect();
        self.nodes[n].steps[i].covering = Some(keys.clone());
        keys
    }

    fn gate(&mut self, n: usize, i: usize) -> Gate {
        let covering = self.covering(n, i);
        let matching: Vec<(&PdbKey, &PdbLive)> = covering
            .iter()
            .filter_map(|key| self.pdbs.get_key_value(key))
            .collect();
        match matching.as_slice() {
            [] => Gate::Open,
            [(key, live)] => match live.budget() {
                Some(budget) if budget > 0 => Gate::Pdb((*key).clone()),
                Some(_) => Gate::Closed(Blocker::Pdb {
                    name: live.name(),
                    disruptions_allowed: live.allowed(),
                    message: (live.allowed().unwrap_or(0) > 0)
                        .then(|| "taken by this drain's evictions in progress".to_string()),
                }),
                // Not computed yet: only the Eviction API can say.
                None => Gate::Pdb((*key).clone()),
            },
            _ => Gate::Multiple,
        }
    }

    fn attempt(&mut self, now_ts: Timestamp, now: Instant) {
        for n in 0..self.nodes.len() {
            for i in 0..self.nodes[n].steps.len() {
                let step = &self.nodes[n].steps[i];
                if step.in_flight || !matches!(step.phase, StepPhase::Evict | StepPhase::Delete) {
                    continue;
                }
                let due = step.retry_at.is_some_and(|at| at <= now);
                if !(step.try_now || due) {
                    continue;
                }
                let grace = self.nodes[n]
                    .plan
                    .grace_at(StepIndex(i), now_ts)
                    .unwrap_or(1);
                if step.phase == StepPhase::Delete {
                    let overriding = step.override_blocker.clone();
                    self.push_delete(n, i, grace, overriding);
                    continue;
                }
                let gate = self.gate(n, i);
                let gate = match gate {
                    Gate::Open => None,
                    Gate::Pdb(key) => Some(key),
                    // The PDB's status says the eviction would be refused: wait for the PDB to
                    // change (its watch sets try_now) or, on the backoff's schedule, skip the
                    // request until the backoff reaches its cap, then ask anyway.
                    Gate::Closed(blocker)
                        if !due || self.nodes[n].steps[i].last_delay < self.retry_max =>
                    {
                        self.nodes[n].steps[i].try_now = false;
                        if due || self.nodes[n].steps[i].retry_at.is_none() {
                            let delay = self.next_backoff(n, i);
                            self.nodes[n].steps[i].retry_at = Some(now + delay);
                        }
                        self.block(n, i, blocker);
                        continue;
                    }
                    Gate::Closed(_) => None,
                    Gate::Multiple if !due && self.nodes[n].steps[i].blocker.is_some() => {
                        self.nodes[n].steps[i].try_now = false;
                        continue;
                    }
                    Gate::Multiple => None,
                };
                self.push_evict(n, i, grace, gate);
            }
        }
    }

    fn push_evict(&mut self, n: usize, i: usize, grace: i64, gate: Option<PdbKey>) {
        let mut allowed = None;
        let mut turns = None;
        if let Some(key) = &gate
            && let Some(live) = self.pdbs.get_mut(key)
        {
            allowed = live.allowed();
            let mut counts = lock(&live.counts);
            counts.in_flight += 1;
            turns = Some(counts.requests.clone());
        }
        let step = &mut self.nodes[n].steps[i];
        step.gate_allowed = allowed;
        step.in_flight = true;
        step.try_now = false;
        step.retry_at = None;
        step.gate = gate;
        let namespace = step.key.namespace.clone();
        let name = step.key.name.clone();
        let uid = pod_uid(&step.pod).map(str::to_string);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        self.actions.push(
            async move {
                // Held until the answer is in. The semaphore is never closed.
                let _turn = match turns {
                    Some(turns) => turns.acquire_owned().await.ok(),
                    None => None,
                };
                let result =
                    evict::evict(&api, &namespace, &name, uid.as_deref(), Some(grace)).await;
                Completion::Evict {
                    node: n,
                    step: i,
                    grace,
                    result,
                }
            }
            .boxed(),
        );
    }

    /// `overriding`: `Some(blocker)` when the deadline forces this deletion.
    fn push_delete(&mut self, n: usize, i: usize, grace: i64, overriding: Option<Option<Blocker>>) {
        let step = &mut self.nodes[n].steps[i];
        step.in_flight = true;
        step.try_now = false;
        step.retry_at = None;
        step.gate = None;
        if overriding.is_some() {
            step.overridden = true;
            step.phase = StepPhase::Delete;
            step.override_blocker = overriding.clone();
        }
        let namespace = step.key.namespace.clone();
        let name = step.key.name.clone();
        let uid = pod_uid(&step.pod).map(str::to_string);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        self.actions.push(
            async move {
                let result = evict::delete(&api, &name, uid.as_deref(), grace).await;
                Completion::Delete {
                    node: n,
                    step: i,
                    grace,
                    overriding,
                    result,
                }
            }
            .boxed(),
        );
    }

    fn on_completion(&mut self, completion: Completion) {
        let now = Instant::now();
        match completion {
            Completion::Evict {
                node: n,
                step: i,
                grace,
                result,
            } => {
                let gate = self.nodes[n].steps[i].gate.take();
                self.nodes[n].steps[i].in_flight = false;
                let gate_live = gate.as_ref().and_then(|k| self.pdbs.get_mut(k));
                if let Some(live) = gate_live {
                    lock(&live.counts).in_flight -= 1;
                }
                if self.nodes[n].steps[i].phase == StepPhase::Gone {
                    return;
                }
                match result {
                    Ok(EvictOutcome::Evicted) => {
                        let allowed = self.nodes[n].steps[i].gate_allowed;
                        let pdb =
                            gate.as_ref()
                                .and_then(|key| self.pdbs.get_mut(key))
                                .map(|live| {
                                    let seen = PdbSeen {
                                        name: live.name(),
                                        disruptions_allowed: allowed,
                                    };
                                    let name = &self.nodes[n].steps[i].key.name;
                                    let mut counts = lock(&live.counts);
                                    if !counts.reflected.contains(name) {
                                        counts.unseen.insert(name.clone());
                                    }
                                    seen
                                });
                        let step = &mut self.nodes[n].steps[i];
                        step.phase = StepPhase::Terminating;
                        step.blocker = None;
                        self.emit(
                            n,
                            i,
                            PodChange::Evicting {
                                grace_seconds: grace,
                                pdb,
                            },
                        );
                    }
                    Ok(EvictOutcome::Gone) => self.mark_gone(n, i, false),
                    Ok(EvictOutcome::PdbBlocked { pdb, message }) => {
                        let pdb_name = pdb
                            .or_else(|| gate.as_ref().map(|k| k.1.clone()))
                            .or_else(|| {
                                self.nodes[n].plan.steps[i]
                                    .pdbs
                                    .first()
                                    .map(|p| p.name.clone())
                            })
                            .unwrap_or_else(|| "?".to_string());
                        let key = (
                            self.nodes[n].steps[i].key.namespace.clone(),
                            pdb_name.clone(),
                        );
                        let allowed = self.pdbs.get(&key).and_then(PdbLive::allowed);
                        let delay = self.next_backoff(n, i);
                        self.nodes[n].steps[i].retry_at = Some(now + delay);
                        self.block(
                            n,
                            i,
                            Blocker::Pdb {
                                name: pdb_name,
                                disruptions_allowed: allowed,
                                message: Some(message),
                            },
                        );
                    }
                    Ok(EvictOutcome::MultiplePdbs { .. }) => {
                        let names = self.matching_pdb_names(n, i);
                        self.nodes[n].steps[i].retry_at = Some(now + self.multiple_pdb_recheck);
                        self.block(n, i, Blocker::MultiplePdbs { names });
                    }
                    Ok(EvictOutcome::Throttled {
                        retry_after,
                        message,
                    }) => {
                        let delay = self.next_backoff(n, i);
                        self.nodes[n].steps[i].retry_at = Some(now + retry_after.unwrap_or(delay));
                        self.block(n, i, Blocker::Throttled { message });
                    }
                    Err(e) => self.request_failed(n, i, "evict", e),
                }
            }
            Completion::Delete {
                node: n,
                step: i,
                grace,
                overriding,
                result,
            } => {
                self.nodes[n].steps[i].in_flight = false;
                if self.nodes[n].steps[i].phase == StepPhase::Gone {
                    return;
                }
                match result {
                    Ok(DeleteOutcome::Deleted) => {
                        self.nodes[n].steps[i].phase = StepPhase::Terminating;
                        self.nodes[n].steps[i].blocker = None;
                        match overriding {
                            Some(blocker) => {
                                self.override_event(n, i, grace, blocker.as_ref());
                                self.emit(
                                    n,
                                    i,
                                    PodChange::DeadlineOverride {
                                        grace_seconds: grace,
                                        blocker,
                                    },
                                );
                            }
                            None => self.emit(
                                n,
                                i,
                                PodChange::Deleting {
                                    grace_seconds: grace,
                                },
                            ),
                        }
                    }
                    Ok(DeleteOutcome::Gone) => self.mark_gone(n, i, false),
                    Err(e) => self.request_failed(n, i, "delete", e),
                }
            }
            Completion::Surge {
                surge: index,
                result,
            } => self.on_surge_started(index, result),
        }
    }

    fn request_failed(&mut self, n: usize, i: usize, verb: &str, error: kube::Error) {
        let key = self.nodes[n].steps[i].key.clone();
        if is_forbidden(&error) {
            self.fatal = Some(DrainError::Api {
                action: format!("{verb} pod {key}"),
                source: error,
            });
            return;
        }
        warn!(pod = %key, verb, error = %describe_api_error(&error), "request failed; retrying");
        let delay = self.next_backoff(n, i);
        self.nodes[n].steps[i].retry_at = Some(Instant::now() + delay);
        self.block(
            n,
            i,
            Blocker::ApiError {
                message: describe_api_error(&error),
            },
        );
    }

    fn override_event(&mut self, n: usize, i: usize, grace: i64, blocker: Option<&Blocker>) {
        let run = &self.nodes[n];
        let deadline = run.plan.deadline.map(|d| d.to_string()).unwrap_or_default();
        let why = blocker.map_or_else(|| "it was still blocked".to_string(), |b| b.to_string());
        let note = format!(
            "Deleted with a {grace}s grace period although {why}: node {} goes away at {deadline} \
             and this was the last moment to stop the pod in time",
            run.name
        );
        let reference = run.steps[i].pod.object_ref(&());
        self.drainer.publish(
            &mut self.side,
            reference,
            EventType::Warning,
            names::reasons::DEADLINE_OVERRIDE,
            note,
        );
    }

    fn matching_pdb_names(&mut self, n: usize, i: usize) -> Vec<String> {
        self.covering(n, i)
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    }

    fn on_surge_started(&mut self, index: usize, result: Result<SurgeStart, kube::Error>) {
        let result = match result {
            Err(e) if is_forbidden(&e) => {
                let run = &self.surges[index];
                self.fatal = Some(DrainError::Api {
                    action: format!(
                        "restart Deployment {}/{} for a surge",
                        run.namespace, run.deployment
                    ),
                    source: e,
                });
                return;
            }
            Err(e) => SurgeStart::Fallback {
                reason: format!("cannot restart it: {}", describe_api_error(&e)),
            },
            Ok(start) => start,
        };
        let steps = self.surges[index].steps.clone();
        match result {
            SurgeStart::Fallback { reason } => {
                self.surges[index].state = SurgeState::Fallback(reason.clone());
                for (n, i) in steps {
                    self.fallback_step(n, i, reason.clone());
                }
            }
            SurgeStart::Restarted { selector, patched } => {
                self.surges[index].state = SurgeState::Restarted;
                let deployment = self.surges[index].deployment.clone();
                for (n, i) in steps {
                    if self.nodes[n].steps[i].phase == StepPhase::Surge {
                        self.emit(
                            n,
                            i,
                            PodChange::Surging {
                                deployment: deployment.clone(),
                                restarted: patched,
                            },
                        );
                    }
                }
                let api: Api<Pod> =
                    Api::namespaced(self.client.clone(), &self.surges[index].namespace);
                let stream = watcher(api, watcher::Config::default().labels(&selector))
                    .default_backoff()
                    .modify(|pod| {
                        pod.managed_fields_mut().clear();
                    })
                    .map(move |event| Input::SurgePods {
                        surge: index,
                        event,
                    });
                self.inputs.push(stream.boxed());
            }
        }
    }

    // --- watches ---

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Pods { node, event } => match event {
                Ok(event) => self.on_pod_event(node, event),
                Err(e) => {
                    self.watch_failed(format!("watch pods on node {}", self.nodes[node].name), e)
                }
            },
            Input::Pdbs(event) => match event {
                Ok(event) => self.on_pdb_event(event),
                Err(e) => self.watch_failed("watch PodDisruptionBudgets".to_string(), e),
            },
            Input::SurgePods {
                surge: index,
                event,
            } => match event {
                Ok(event) => {
                    let run = &mut self.surges[index];
                    match event {
                        watcher::Event::Init => run.relist = Some(HashSet::new()),
                        watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                            if let Some(uid) = pod_uid(&pod).map(str::to_string) {
                                if let Some(seen) = run.relist.as_mut() {
                                    seen.insert(uid.clone());
                                }
                                run.pods.insert(uid, pod);
                            }
                        }
                        watcher::Event::InitDone => {
                            if let Some(seen) = run.relist.take() {
                                run.pods.retain(|uid, _| seen.contains(uid));
                            }
                        }
                        watcher::Event::Delete(pod) => {
                            if let Some(uid) = pod_uid(&pod) {
                                run.pods.remove(uid);
                            }
                        }
                    }
                    self.check_surge(index);
                }
                Err(e) => self.watch_failed("watch a surging Deployment's pods".to_string(), e),
            },
        }
    }

    fn watch_failed(&mut self, what: String, error: watcher::Error) {
        if let Some(e) = watch_error_is_fatal(&error) {
            // The error is behind a reference; describe it, keeping the code for is_forbidden.
            let status = match e {
                kube::Error::Api(status) => status.clone(),
                _ => return,
            };
            self.fatal = Some(DrainError::Api {
                action: what,
                source: kube::Error::Api(status),
            });
        } else {
            // The watcher backs off and re-lists by itself.
            debug!(what, %error, "watch interrupted");
        }
    }

    fn on_pod_event(&mut self, n: usize, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.nodes[n].relist = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (self.nodes[n].relist.as_mut(), pod_uid(&pod)) {
                    seen.insert(uid.to_string());
                }
                self.on_pod_apply(n, &pod);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.nodes[n].relist.take() {
                    let vanished: Vec<usize> = self.nodes[n]
                        .by_uid
                        .iter()
                        .filter(|(uid, _)| !seen.contains(*uid))
                        .map(|(_, i)| *i)
                        .collect();
                    for i in vanished {
                        self.mark_gone(n, i, false);
                    }
                }
            }
            watcher::Event::Apply(pod) => self.on_pod_apply(n, &pod),
            watcher::Event::Delete(pod) => {
                if let Some(&i) = pod_uid(&pod).and_then(|u| self.nodes[n].by_uid.get(u)) {
                    self.mark_gone(n, i, false);
                }
            }
        }
    }

    fn on_pod_apply(&mut self, n: usize, pod: &Pod) {
        let Some(&i) = pod_uid(pod).and_then(|u| self.nodes[n].by_uid.get(u)) else {
            return;
        };
        if policy::is_finished(pod) {
            self.mark_gone(n, i, true);
            return;
        }
        let step = &mut self.nodes[n].steps[i];
        if pod.metadata.deletion_timestamp.is_some()
            && !step.in_flight
            && !matches!(step.phase, StepPhase::Terminating | StepPhase::Gone)
        {
            if step.phase == StepPhase::NotStarted {
                step.started_at = Some(Instant::now());
                self.nodes[n].progress.set(StepIndex(i), StepState::Started);
            }
            let step = &mut self.nodes[n].steps[i];
            step.phase = StepPhase::Terminating;
            step.blocker = None;
            self.emit(n, i, PodChange::TerminatingElsewhere);
            for index in 0..self.surges.len() {
                if self.surges[index].steps.contains(&(n, i)) {
                    self.check_surge(index);
                }
            }
        }
    }

    fn mark_gone(&mut self, n: usize, i: usize, completed: bool) {
        let run = &mut self.nodes[n];
        let step = &mut run.steps[i];
        if step.phase == StepPhase::Gone {
            return;
        }
        let after = step.started_at.map(|s| s.elapsed()).unwrap_or_default();
        step.phase = StepPhase::Gone;
        step.gone_after = Some(after);
        step.completed = completed;
        step.blocker = None;
        step.try_now = false;
        step.retry_at = None;
        run.progress.set(StepIndex(i), StepState::Gone);
        let name = step.key.name.clone();
        let namespace = step.key.namespace.clone();
        let mut freed = Vec::new();
        for (key, live) in self.pdbs.iter_mut() {
            if key.0 == namespace && lock(&live.counts).unseen.remove(&name) {
                freed.push(key.clone());
            }
        }
        // Its budget was held back for it: what was blocked on it may go now.
        for key in freed {
            self.pdb_changed(&key, false);
        }
        self.emit(n, i, PodChange::Gone { after, completed });
        let run = &mut self.nodes[n];
        if !run.drained_reported && run.all_gone() {
            run.drained_reported = true;
            let after = run
                .steps
                .iter()
                .filter_map(|s| s.started_at)
                .min()
                .map(|s| s.elapsed())
                .unwrap_or_default();
            self.pending.push(ProgressEvent::NodeDrained {
                node: run.name.clone(),
                after,
            });
        }
        // A surge step gone frees a replacement for the next old pod.
        for index in 0..self.surges.len() {
            if self.surges[index].steps.contains(&(n, i)) {
                self.check_surge(index);
            }
        }
    }

    fn on_pdb_event(&mut self, event: watcher::Event<PodDisruptionBudget>) {
        match event {
            watcher::Event::Init => self.pdb_relist = Some(HashSet::new()),
            watcher::Event::InitApply(pdb) => {
                if let Some(seen) = self.pdb_relist.as_mut() {
                    seen.insert(pdb_key(&pdb));
                }
                self.upsert_pdb(pdb);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.pdb_relist.take() {
                    let gone: Vec<PdbKey> = self
                        .pdbs
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.pdbs.remove(&key);
                        self.pdb_changed(&key, true);
                    }
                }
            }
            watcher::Event::Apply(pdb) => self.upsert_pdb(pdb),
            watcher::Event::Delete(pdb) => {
                let key = pdb_key(&pdb);
                self.pdbs.remove(&key);
                self.pdb_changed(&key, true);
            }
        }
    }

    fn upsert_pdb(&mut self, pdb: PodDisruptionBudget) {
        let key = pdb_key(&pdb);
        let disrupted = disrupted_pods(&pdb);
        let selector = |p: &PodDisruptionBudget| p.spec.as_ref().and_then(|s| s.selector.clone());
        let membership_changed = match self.pdbs.get_mut(&key) {
            Some(live) => {
                let changed = selector(&live.pdb) != selector(&pdb);
                live.pdb = pdb;
                lock(&live.counts).saw(disrupted);
                changed
            }
            None => {
                let counts = self.drainer.pdb_ledger.counts(&key, disrupted);
                self.pdbs.insert(key.clone(), PdbLive { pdb, counts });
                true
            }
        };
        self.pdb_changed(&key, membership_changed);
    }

    /// A PDB changed. When it appeared, went or changed its selector, every pod of its
    /// namespace may be covered differently: their caches are dropped and blocked evictions
    /// retried. When only its status changed, the evictions it blocked are retried if its budget
    /// allows any; the gate then lets only as many through as the budget allows.
    fn pdb_changed(&mut self, key: &PdbKey, membership_changed: bool) {
        let budget = self.pdbs.get(key).and_then(PdbLive::budget);
        for run in &mut self.nodes {
            for step in &mut run.steps {
                if step.key.namespace != key.0 {
                    continue;
                }
                if membership_changed {
                    step.covering = None;
                }
                if step.phase != StepPhase::Evict || step.in_flight {
                    continue;
                }
                let retry = match &step.blocker {
                    Some(Blocker::MultiplePdbs { .. }) => membership_changed,
                    Some(Blocker::Pdb { name, .. }) => {
                        membership_changed || (*name == key.1 && budget.is_none_or(|b| b > 0))
                    }
                    _ => false,
                };
                if retry {
                    step.try_now = true;
                }
            }
        }
    }

    fn next_wake(&self, now_ts: Timestamp, now: Instant, timeout_at: Option<Instant>) -> Instant {
        // With nothing scheduled, the watches and requests wake the loop; an hour is only a
        // ceiling that keeps the arithmetic simple.
        let mut wake = now + Duration::from_secs(3600);
        if let Some(t) = timeout_at {
            wake = wake.min(t);
        }
        for run in &self.nodes {
            let forcing = !run.plan.voluntary && run.plan.deadline.is_some();
            for (i, step) in run.steps.iter().enumerate() {
                if step.in_flight {
                    continue;
                }
                match step.phase {
                    StepPhase::Evict | StepPhase::Delete => {
                        if let Some(at) = step.retry_at {
                            wake = wake.min(at);
                        }
                    }
                    _ => {}
                }
                let latest = run.plan.steps[i].latest_start;
                let waits_for_latest = match step.phase {
                    StepPhase::NotStarted => true,
                    StepPhase::Evict => forcing && step.blocker.is_some() && !step.overridden,
                    StepPhase::Surge | StepPhase::Wait => forcing && !step.overridden,
                    _ => false,
                };
                if waits_for_latest && let Some(latest) = latest {
                    wake = wake.min(instant_of(latest, now_ts, now));
                }
            }
        }
        wake
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn report(
    outcome: DrainOutcome,
    started: Instant,
    runs: &[NodeRun],
    pdbs: &BTreeMap<PdbKey, PdbLive>,
) -> DrainReport {
    let nodes = runs
        .iter()
        .map(|run| {
            let pods = run
                .plan
                .steps
                .iter()
                .zip(&run.steps)
                .enumerate()
                .map(|(i, (plan, step))| {
                    let gone = step.phase == StepPhase::Gone;
                    PodReport {
                        pod: step.key.clone(),
                        owner: plan.owner.clone(),
                        strategy: plan.strategy,
                        tier: plan.tier,
                        order: plan.order,
                        gone,
                        gone_after: step.gone_after,
                        deadline_override: step.overridden,
                        blocker: (!gone).then(|| remaining_blocker(run, i, pdbs)),
                    }
                })
                .collect();
            NodeReport {
                node: run.name.clone(),
                drained: run.all_gone(),
                phase: run.record.phase,
                pods,
                ignored: run.plan.ignored.clone(),
                refused: run.plan.refused.clone(),
                warnings: run.plan.warnings.clone(),
            }
        })
        .collect();
    DrainReport {
        outcome,
        elapsed: started.elapsed(),
        nodes,
    }
}

/// Why a pod that did not leave is still there, with the PDB status as last seen.
fn remaining_blocker(run: &NodeRun, i: usize, pdbs: &BTreeMap<PdbKey, PdbLive>) -> Blocker {
    let step = &run.steps[i];
    let plan = &run.plan.steps[i];
    match step.phase {
        StepPhase::NotStarted => Blocker::EarlierWave {
            order: plan.order,
            tier: plan.tier,
        },
        StepPhase::Terminating => Blocker::Terminating,
        StepPhase::Wait => Blocker::StillRunning,
        StepPhase::Surge => match &step.blocker {
            Some(b @ Blocker::SurgeNotReady { .. }) => b.clone(),
            _ => Blocker::SurgeNotReady {
                deployment: plan
                    .owner
                    .as_ref()
                    .map(|o| o.name.clone())
                    .unwrap_or_default(),
                ready: 0,
                wanted: 1,
            },
        },
        _ => match &step.blocker {
            // Refresh the PDB's numbers with its last observed status.
            Some(Blocker::Pdb { name, message, .. }) => {
                let allowed = pdbs
                    .get(&(step.key.namespace.clone(), name.clone()))
                    .and_then(PdbLive::allowed);
                Blocker::Pdb {
                    name: name.clone(),
                    disruptions_allowed: allowed,
                    message: message.clone(),
                }
            }
            Some(other) => other.clone(),
            None => Blocker::ApiError {
                message: "no answer yet".to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_every_missing_node() {
        assert_eq!(not_found(&["a".into()]), "node \"a\" not found");
        assert_eq!(
            not_found(&["a".into(), "b".into()]),
            "nodes \"a\", \"b\" not found"
        );
    }

    #[test]
    fn duplicate_nodes_are_drained_once() {
        assert_eq!(
            dedupe(&["a".into(), "b".into(), "a".into()]).unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(matches!(dedupe(&[]), Err(DrainError::NoNodes)));
    }

    fn pdb_with(allowed: i32, disrupted: &[&str]) -> PodDisruptionBudget {
        let disrupted: serde_json::Map<String, serde_json::Value> = disrupted
            .iter()
            .map(|name| (name.to_string(), "2026-01-01T00:00:00Z".into()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "generation": 1},
            "status": {
                "disruptionsAllowed": allowed,
                "observedGeneration": 1,
                "currentHealthy": 3, "desiredHealthy": 2, "expectedPods": 3,
                "disruptedPods": disrupted,
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_budget_counts_evictions_the_status_does_not_show_yet() {
        let ledger = PdbLedger::default();
        let key = ("shop".to_string(), "web".to_string());
        let mut live = PdbLive {
            pdb: pdb_with(2, &[]),
            counts: ledger.counts(&key, BTreeSet::new()),
        };
        lock(&live.counts).in_flight = 1;
        assert_eq!(live.budget(), Some(1), "one eviction on its way");
        lock(&live.counts).in_flight = 0;
        lock(&live.counts).unseen.insert("web-1".into());
        assert_eq!(live.budget(), Some(1), "answered, not yet in the status");
        // The status written by that eviction lists the pod and already counts it.
        live.pdb = pdb_with(1, &["web-1"]);
        lock(&live.counts).saw(disrupted_pods(&live.pdb));
        assert_eq!(live.budget(), Some(1));
        // A status the disruption controller has not computed for the current spec says nothing.
        live.pdb.metadata.generation = Some(2);
        assert_eq!(live.allowed(), None);
        assert_eq!(live.budget(), None);
    }

    #[test]
    fn drains_of_one_process_share_a_budget_and_forget_it_together() {
        let ledger = PdbLedger::default();
        let key = ("shop".to_string(), "web".to_string());
        let first = PdbLive {
            pdb: pdb_with(2, &[]),
            counts: ledger.counts(&key, BTreeSet::new()),
        };
        let second = PdbLive {
            pdb: pdb_with(2, &[]),
            counts: ledger.counts(&key, BTreeSet::new()),
        };
        lock(&first.counts).in_flight += 1;
        assert_eq!(
            second.budget(),
            Some(1),
            "the other drain's eviction counts"
        );
        lock(&second.counts).unseen.insert("web-2".into());
        assert_eq!(first.budget(), Some(0));
        // A status seen by either drain settles it for both.
        lock(&second.counts).saw(["web-2".to_string()].into());
        assert_eq!(first.budget(), Some(1));
        drop((first, second));
        let fresh = ledger.counts(&key, BTreeSet::new());
        assert_eq!(
            lock(&fresh).in_flight,
            0,
            "nothing outlives the drains that held it"
        );
        assert_eq!(lock(&ledger.entries).len(), 1);
    }

    #[test]
    fn blockers_repeat_only_when_they_say_something_new() {
        let pdb = |allowed, message: Option<&str>| Blocker::Pdb {
            name: "web".into(),
            disruptions_allowed: Some(allowed),
            message: message.map(String::from),
        };
        assert!(same_blocker(
            &pdb(0, None),
            &pdb(1, Some("needs 2 healthy pods"))
        ));
        assert!(!same_blocker(
            &pdb(0, None),
            &Blocker::MultiplePdbs {
                names: vec!["a".into(), "b".into()]
            }
        ));
        assert!(same_blocker(
            &Blocker::ApiError {
                message: "a".into()
            },
            &Blocker::ApiError {
                message: "b".into()
            }
        ));
    }

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 + '…'.len_utf8());
        assert_eq!(truncate("short", 1000), "short");
    }
}
