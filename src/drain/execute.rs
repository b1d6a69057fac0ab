//! The drain executor: carries out the [`Machine`]'s actions against the API, for the CLI and
//! the controller alike.
//!
//! A drain reads top to bottom:
//!
//! 1. every named node must exist (a typo cordons nothing);
//! 2. the CLI prepares every node ([`node::prepare`]: cordon, taint, LB label, drain record)
//!    before any pod is touched, so evicted pods never land on a node that is about to be
//!    drained too; the controller hands over nodes it has prepared already;
//! 3. pods (per node, by field selector) and ReplicaSets are listed and PDBs read from the
//!    process's one PDB watch, and each node gets a [`Plan`];
//! 4. the plans go to the process's one engine task, which feeds the machine every input (watch
//!    events, request answers, time) and performs what it decides: requests, watches, record
//!    writes, Events, progress.
//!
//! The engine task is the only owner of the machine, so PDB budgets and surges span the drains
//! of a process without locks. API calls go through the client's rate limit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

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
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::events::{DrainEvent, Severity};
use super::evict;
use super::machine::{
    Action, DrainId, Failure, Fatal, Input, Machine, MachineConfig, NewDrain, NodeStart, Origin,
    WatchEvent,
};
use super::pdb_feed::{PdbFeed, describe_watch_error, watch_error_is_forbidden};
use super::plan::{Owners, Plan, PlanInput, PlanOptions, plan};
use super::policy::{self, ClusterPolicy};
use super::report::{DrainReport, ProgressEvent};
use super::surge;
use crate::interruption::events::instance_id_from_provider_id;
use crate::lb::discover::{Discovery, LoadBalancers};
use crate::names;
use crate::node::{self, DrainRecord, NodeError, Phase, describe_api_error, is_forbidden};

/// Default of [`DrainConfig::evictions_per_pdb`].
pub const EVICTIONS_PER_PDB: usize = 1;

/// Drains of one process reading their pods and ReplicaSets at once. A burst of 200 spot
/// warnings starts 200 drains together; each list is decoded whole before it is trimmed, so
/// unbounded they all sit in memory at the same moment. The API's own rate limit paces them
/// anyway, so more at once would not finish sooner.
pub const SNAPSHOT_CONCURRENCY: usize = 16;

/// How long a namespace's ReplicaSet list serves the drains that start after it: a burst's
/// drains plan within seconds of each other and would otherwise each list the same namespace.
/// The planner reads only owner references and the desired-replicas annotation, which change
/// on a rollout; a plan a few seconds behind one is no worse than one read just before it.
const OWNERS_TTL: Duration = Duration::from_secs(10);

/// Inputs decided on together at most: enough to absorb a burst's watch events, few enough that
/// a drain's requests go out without waiting long behind them.
const BATCH_LIMIT: usize = 512;

/// How long a finished drain waits for its last record writes and Events before its caller
/// hears: a result must not hang on Events.
const FINISH_WAIT: Duration = Duration::from_secs(10);

/// Tunables of the executor. The defaults suit both the CLI and the controller.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// First retry after a PDB refusal, throttling or a failed request; doubles up to
    /// `retry_max`. backon adds up to 100% jitter to each delay, so pods blocked together do
    /// not retry together, and a single delay may reach twice `retry_max`. A PDB-blocked
    /// eviction is also retried at once when the PDB's status says it would pass, so these
    /// timers are the safety net, not the pace.
    pub retry_min: Duration,
    /// Cap of the backoff (before jitter): a budget that frees up is noticed through the PDB
    /// watch anyway.
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

/// A node someone else has prepared (cordoned, tainted, recorded) already: the controller.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The record on the node.
    pub record: DrainRecord,
    /// The node, for Events about it (its UID makes `kubectl describe node` show them).
    pub reference: Option<ObjectReference>,
    pub origin: Origin,
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
    /// `None`: the drain prepares its nodes itself with a [`DrainRecord::manual`] record (the
    /// CLI). `Some`: they are prepared already, with this record.
    pub prepared: Option<Prepared>,
    /// Cancelling ends the drain with [`DrainOutcome::Cancelled`]; nodes stay cordoned.
    ///
    /// [`DrainOutcome::Cancelled`]: super::report::DrainOutcome::Cancelled
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
            prepared: None,
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
    /// A watch or request the running drain needs was refused (by RBAC when `forbidden`).
    #[error("cannot {action}: {message}")]
    Refused {
        action: String,
        message: String,
        forbidden: bool,
    },
    /// The engine task is gone (its runtime is shutting down).
    #[error("the drain engine stopped")]
    EngineStopped,
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
            DrainError::Refused { forbidden, .. } => *forbidden,
            _ => false,
        }
    }
}

impl From<Fatal> for DrainError {
    fn from(fatal: Fatal) -> Self {
        DrainError::Refused {
            action: fatal.action,
            message: fatal.failure.message,
            forbidden: fatal.failure.forbidden,
        }
    }
}

/// A node's plan, as `nodedrain plan` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub plan: Plan,
}

/// The drain engine. Cheap to clone; one per process is enough (clones share everything).
#[derive(Clone)]
pub struct Drainer {
    client: Client,
    config: DrainConfig,
    recorder: Recorder,
    /// Started by the first plan or drain, shared by all (and by clones).
    pdb_feed: Arc<OnceLock<Arc<PdbFeed>>>,
    /// The engine task's inbox, started with the first drain.
    engine: Arc<OnceLock<mpsc::UnboundedSender<Command>>>,
    next_drain: Arc<AtomicU64>,
    snapshots: Arc<Semaphore>,
    owners: Arc<OwnersCache>,
    /// `None`: load balancers are not looked at (no AWS access configured).
    lb: Option<LoadBalancers>,
}

/// Everything read once at the start of a drain.
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
            engine: Arc::default(),
            next_drain: Arc::default(),
            snapshots: Arc::new(Semaphore::new(SNAPSHOT_CONCURRENCY)),
            owners: Arc::default(),
            lb: None,
            config,
        }
    }

    /// Makes plans show, and drains wait for, the load balancers in front of the nodes' pods.
    pub fn with_load_balancers(mut self, lb: Option<LoadBalancers>) -> Self {
        self.lb = lb;
        self
    }

    /// Adds the load balancers' targets to freshly made plans. An ELBv2 failure is written on
    /// the plans and the drain goes on without load-balancer waits: a spot drain must never
    /// stall on an AWS API that is down or refuses us.
    async fn attach_load_balancers(&self, nodes: &[String], plans: &mut [(&mut Plan, &[Pod])]) {
        let Some(lb) = &self.lb else {
            return;
        };
        let view = match lb.view().await {
            Ok(view) => view,
            Err(error) => {
                warn!(%error, "load balancers not checked");
                for (plan, _) in plans.iter_mut() {
                    plan.load_balancers_unchecked = Some(error.to_string());
                }
                return;
            }
        };
        if view.registered.is_empty() {
            return;
        }
        let node_api: Api<Node> = Api::all(self.client.clone());
        for (name, (plan, pods)) in nodes.iter().zip(plans.iter_mut()) {
            // Only instance targets need the node's instance id.
            let instance_id = match node_api.get_opt(name).await {
                Ok(node) => node
                    .and_then(|n| n.spec?.provider_id)
                    .and_then(|p| instance_id_from_provider_id(&p).map(str::to_string)),
                Err(error) => {
                    warn!(node = %name, %error, "cannot read the node's instance id; its instance targets are not checked");
                    None
                }
            };
            plan.attach_load_balancers(pods, instance_id.as_deref(), &view, Timestamp::now());
        }
    }

    fn feed(&self) -> Arc<PdbFeed> {
        self.pdb_feed
            .get_or_init(|| Arc::new(PdbFeed::start(self.client.clone())))
            .clone()
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
        let mut plans: Vec<NodePlan> = nodes
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
            .collect();
        let mut with_pods: Vec<(&mut Plan, &[Pod])> = plans
            .iter_mut()
            .zip(&snapshot.pods)
            .map(|(p, pods)| (&mut p.plan, pods.as_slice()))
            .collect();
        self.attach_load_balancers(&nodes, &mut with_pods).await;
        Ok(plans)
    }

    /// Drains `nodes`: cordons them all (unless `request.prepared` says they are), then moves
    /// their pods off in plan order, under PDBs and the deadline, until they are empty,
    /// `request.timeout` passes, or `request.cancel` fires.
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
        let began = Timestamp::now();
        let nodes = dedupe(nodes)?;
        let starts: Vec<(ObjectReference, DrainRecord, Origin)> = match &request.prepared {
            None => {
                let fetched = self.fetch_nodes(&nodes).await?;
                let record = DrainRecord::manual(began, request.deadline);
                let node_api: Api<Node> = Api::all(self.client.clone());
                // Every node is prepared before any pod of any node is touched.
                let prepared = futures::future::try_join_all(
                    fetched
                        .iter()
                        .map(|node| node::prepare_from(&node_api, node, &record)),
                )
                .await?;
                prepared
                    .iter()
                    .map(|node| {
                        let record = node::record_of(node)
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| record.clone());
                        (node.object_ref(&()), record, Origin::Fresh)
                    })
                    .collect()
            }
            Some(prepared) => nodes
                .iter()
                .map(|name| {
                    let reference = prepared
                        .reference
                        .clone()
                        .filter(|r| r.name.as_deref() == Some(name))
                        .unwrap_or_else(|| node_reference(name));
                    (reference, prepared.record.clone(), prepared.origin)
                })
                .collect(),
        };

        let snapshot = match self.snapshot(&nodes).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.fail_records(&nodes, &starts).await;
                return Err(e);
            }
        };
        let now = Timestamp::now();
        let mut node_starts: Vec<NodeStart> = nodes
            .iter()
            .zip(starts)
            .zip(snapshot.pods)
            .map(|((name, (reference, record, origin)), pods)| NodeStart {
                plan: plan(PlanInput {
                    pods: &pods,
                    pdbs: &snapshot.pdbs,
                    owners: &snapshot.owners,
                    policy: &request.policy,
                    options: &request.options,
                    now,
                    deadline: request.deadline,
                }),
                name: name.clone(),
                reference,
                record,
                origin,
                pods,
            })
            .collect();
        drop(snapshot.pdbs);
        if self.lb.as_ref().is_some_and(|lb| lb.wait) {
            let mut with_pods: Vec<(&mut Plan, &[Pod])> = node_starts
                .iter_mut()
                .map(|s| (&mut s.plan, s.pods.as_slice()))
                .collect();
            self.attach_load_balancers(&nodes, &mut with_pods).await;
        }
        let id = DrainId(self.next_drain.fetch_add(1, Ordering::Relaxed));
        let drain = NewDrain {
            id,
            nodes: node_starts,
            began,
            timeout_at: request
                .timeout
                .and_then(|t| jiff::SignedDuration::try_from(t).ok())
                .and_then(|t| began.checked_add(t).ok()),
            disable_eviction: request.options.disable_eviction,
        };

        // Progress goes through an unbounded hop so a slow reader never stalls the engine, which
        // serves every drain of the process; this task keeps the caller's backpressure.
        let (to_forward, mut forwarded) = mpsc::unbounded_channel();
        let forwarder = tokio::spawn(async move {
            while let Some(event) = forwarded.recv().await {
                // A closed receiver only means nobody listens.
                let _ = progress.send(event).await;
            }
        });
        let (reply, answer) = oneshot::channel();
        let engine = self.engine();
        engine
            .send(Command::Start {
                drain: Box::new(drain),
                progress: to_forward,
                reply,
            })
            .map_err(|_| DrainError::EngineStopped)?;
        let mut answer = answer;
        let result = tokio::select! {
            result = &mut answer => result,
            () = request.cancel.cancelled() => {
                // The machine ends it and answers with a cancelled report.
                let _ = engine.send(Command::Cancel(id));
                answer.await
            }
        };
        let _ = forwarder.await;
        match result {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(fatal)) => Err(fatal.into()),
            Err(_) => Err(DrainError::EngineStopped),
        }
    }

    /// The engine task's inbox, starting the task on first use (in the caller's runtime).
    fn engine(&self) -> mpsc::UnboundedSender<Command> {
        self.engine
            .get_or_init(|| {
                let (sender, commands) = mpsc::unbounded_channel();
                let engine = Engine {
                    client: self.client.clone(),
                    recorder: self.recorder.clone(),
                    feed: self.feed(),
                    machine: Machine::new(MachineConfig {
                        retry_min: self.config.retry_min,
                        retry_max: self.config.retry_max,
                        multiple_pdb_recheck: self.config.multiple_pdb_recheck,
                        evictions_per_pdb: self.config.evictions_per_pdb,
                    }),
                    lb: self.lb.as_ref().map(|lb| lb.discovery.clone()),
                    commands,
                    drains: HashMap::new(),
                    requests: FuturesUnordered::new(),
                    watches: SelectAll::new(),
                    watch_stops: HashMap::new(),
                };
                tokio::spawn(engine.run().instrument(info_span!("drain_engine")));
                sender
            })
            .clone()
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
        // Closed never: the semaphore lives as long as the drainer.
        let _turn = self.snapshots.acquire().await.ok();
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
        let feed = self.feed();
        let pdbs = async {
            feed.list()
                .await
                .map(|pdbs| pdbs.iter().map(|p| (**p).clone()).collect::<Vec<_>>())
                .map_err(|failure| DrainError::Refused {
                    action: "list PodDisruptionBudgets".to_string(),
                    message: failure.message,
                    forbidden: failure.forbidden,
                })
        };
        let (pods, pdbs) = futures::future::try_join(pods, pdbs).await?;
        // ReplicaSets only of namespaces where a pod on these nodes has one: the planner needs
        // their owner references and replica counts and nothing else.
        let namespaces: BTreeSet<String> = pods
            .iter()
            .flatten()
            .filter(|p| policy::controller_of(p).is_some_and(|c| c.kind == "ReplicaSet"))
            .filter_map(|p| p.metadata.namespace.clone())
            .collect();
        let replica_sets = futures::future::try_join_all(
            namespaces
                .iter()
                .map(|ns| self.owners.replica_sets(&self.client, ns)),
        )
        .await?;
        Ok(Snapshot {
            pods,
            pdbs,
            owners: Owners::from_replica_sets(replica_sets.iter().flat_map(|rs| rs.iter())),
        })
    }

    async fn fail_records(
        &self,
        names: &[String],
        starts: &[(ObjectReference, DrainRecord, Origin)],
    ) {
        let api: Api<Node> = Api::all(self.client.clone());
        for (name, (_, record, _)) in names.iter().zip(starts) {
            let mut record = record.clone();
            record.enter(Phase::Failed);
            let _ = node::write_record(&api, name, &record).await;
        }
    }
}

/// A reference to a node by name, for a caller that has no copy of it.
pub(crate) fn node_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Node".to_string()),
        name: Some(name.to_string()),
        ..ObjectReference::default()
    }
}

/// ReplicaSets by namespace (metadata only), shared by the drains of a process for
/// [`OWNERS_TTL`]. Drains that ask for a namespace while it is being listed wait for that list.
#[derive(Default)]
struct OwnersCache {
    entries: Mutex<HashMap<String, OwnersEntry>>,
}

type ReplicaSets = Arc<Vec<ReplicaSet>>;

struct OwnersEntry {
    listed_at: tokio::time::Instant,
    cell: Arc<tokio::sync::OnceCell<ReplicaSets>>,
}

impl OwnersCache {
    async fn replica_sets(
        &self,
        client: &Client,
        namespace: &str,
    ) -> Result<ReplicaSets, DrainError> {
        let cell = {
            let mut entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = tokio::time::Instant::now();
            entries.retain(|_, e| now.duration_since(e.listed_at) < OWNERS_TTL);
            entries
                .entry(namespace.to_string())
                .or_insert_with(|| OwnersEntry {
                    listed_at: now,
                    cell: Arc::default(),
                })
                .cell
                .clone()
        };
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
        cell.get_or_try_init(|| async {
            api.list_metadata(&ListParams::default())
                .await
                .map(|list| {
                    Arc::new(
                        list.items
                            .into_iter()
                            .map(|mut meta| {
                                meta.metadata.managed_fields = None;
                                ReplicaSet {
                                    metadata: meta.metadata,
                                    ..ReplicaSet::default()
                                }
                            })
                            .collect(),
                    )
                })
                .map_err(api_err(format!(
                    "list ReplicaSets in namespace {namespace}"
                )))
        })
        .await
        .cloned()
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

/// A pod without its `managedFields`: nothing here reads them, and they are most of a pod's size.
fn trimmed(mut pod: Pod) -> Pod {
    pod.managed_fields_mut().clear();
    pod
}

fn failure_of(error: &kube::Error) -> Failure {
    Failure {
        message: describe_api_error(error),
        forbidden: is_forbidden(error),
    }
}

// ---------------------------------------------------------------------------------------------
// The engine task
// ---------------------------------------------------------------------------------------------

enum Command {
    Start {
        drain: Box<NewDrain>,
        progress: mpsc::UnboundedSender<ProgressEvent>,
        reply: oneshot::Sender<Result<DrainReport, Fatal>>,
    },
    Cancel(DrainId),
}

/// What the engine keeps of a drain's caller.
struct DrainIo {
    progress: mpsc::UnboundedSender<ProgressEvent>,
    reply: oneshot::Sender<Result<DrainReport, Fatal>>,
    /// Record writes go out one after another (each waits for the one before), so a later phase
    /// never lands before an earlier one.
    last_write: Option<JoinHandle<()>>,
    /// Events of this drain still being published.
    events: Vec<JoinHandle<()>>,
}

/// Which watch a stop token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WatchKey {
    Node(super::machine::NodeId),
    Surge(super::machine::SurgeId),
    Pdbs,
}

struct Engine {
    client: Client,
    recorder: Recorder,
    feed: Arc<PdbFeed>,
    machine: Machine,
    lb: Option<Discovery>,
    commands: mpsc::UnboundedReceiver<Command>,
    drains: HashMap<DrainId, DrainIo>,
    requests: FuturesUnordered<BoxFuture<'static, Input>>,
    watches: SelectAll<BoxStream<'static, Input>>,
    watch_stops: HashMap<WatchKey, CancellationToken>,
}

impl Engine {
    async fn run(mut self) {
        loop {
            let wake = self.machine.next_wake().map(sleep_deadline);
            let input = tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Start { drain, progress, reply }) => {
                        self.drains.insert(drain.id, DrainIo {
                            progress,
                            reply,
                            last_write: None,
                            events: Vec::new(),
                        });
                        Input::Start(*drain)
                    }
                    Some(Command::Cancel(id)) => Input::Cancel(id),
                    // Every drainer handle is gone, so no drain can be waiting.
                    None => return,
                },
                Some(input) = self.requests.next(), if !self.requests.is_empty() => input,
                Some(input) = self.watches.next() => input,
                () = sleep_until(wake), if wake.is_some() => Input::Tick,
            };
            // Whatever else has arrived meanwhile is decided on together (see `Machine::on_all`).
            let mut inputs = vec![input];
            while inputs.len() < BATCH_LIMIT {
                if let Some(Some(input)) = self.requests.next().now_or_never() {
                    inputs.push(input);
                } else if let Some(Some(input)) = self.watches.next().now_or_never() {
                    inputs.push(input);
                } else {
                    break;
                }
            }
            let actions = self.machine.on_all(inputs, Timestamp::now());
            for action in actions {
                self.perform(action);
            }
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Evict {
                step,
                pod,
                uid,
                grace,
            } => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
                self.requests.push(
                    async move {
                        let result = evict::evict(
                            &api,
                            &pod.namespace,
                            &pod.name,
                            uid.as_deref(),
                            Some(grace),
                        )
                        .await
                        .map_err(|e| failure_of(&e));
                        if let Err(failure) = &result {
                            warn!(pod = %pod, error = %failure.message, "eviction failed");
                        }
                        Input::Evicted {
                            step,
                            grace,
                            result,
                        }
                    }
                    .boxed(),
                );
            }
            Action::Delete {
                step,
                pod,
                uid,
                grace,
            } => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
                self.requests.push(
                    async move {
                        let result = evict::delete(&api, &pod.name, uid.as_deref(), grace)
                            .await
                            .map_err(|e| failure_of(&e));
                        if let Err(failure) = &result {
                            warn!(pod = %pod, error = %failure.message, "deletion failed");
                        }
                        Input::Deleted {
                            step,
                            grace,
                            result,
                        }
                    }
                    .boxed(),
                );
            }
            Action::RestartRollout {
                surge,
                namespace,
                deployment,
                since,
            } => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), &namespace);
                self.requests.push(
                    async move {
                        let result = surge::start(&api, &deployment, since, Timestamp::now())
                            .await
                            .map_err(|e| failure_of(&e));
                        Input::RolloutRestarted { surge, result }
                    }
                    .boxed(),
                );
            }
            Action::WatchSurgePods {
                surge,
                namespace,
                selector,
            } => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let stream = watcher(api, watcher::Config::default().labels(&selector))
                    .default_backoff()
                    .modify(|pod| {
                        pod.managed_fields_mut().clear();
                    });
                let what = format!("watch the pods of a surging Deployment in {namespace}");
                self.open_watch(WatchKey::Surge(surge), what, stream, move |event| {
                    Input::SurgePods { surge, event }
                });
            }
            Action::DescribeTargetHealth { group } => {
                let lb = self.lb.clone();
                self.requests.push(
                    async move {
                        let result = match lb {
                            Some(lb) => lb.target_health(&group).await.map_err(|e| {
                                warn!(group = %group, error = %e, "cannot read target health");
                                Failure {
                                    message: e.to_string(),
                                    forbidden: false,
                                }
                            }),
                            None => Err(Failure {
                                message: "no ELBv2 access configured".to_string(),
                                forbidden: false,
                            }),
                        };
                        Input::TargetHealth { group, result }
                    }
                    .boxed(),
                );
            }
            Action::DeregisterTargets { group, targets } => {
                let lb = self.lb.clone();
                self.requests.push(
                    async move {
                        let result = match lb {
                            Some(lb) => lb.deregister(&group, &targets).await.map_err(|e| {
                                warn!(group = %group, error = %e,
                                    "cannot deregister targets; their wait ends at the group's delay or the deadline");
                                Failure {
                                    message: e.to_string(),
                                    forbidden: false,
                                }
                            }),
                            None => Err(Failure {
                                message: "no ELBv2 access configured".to_string(),
                                forbidden: false,
                            }),
                        };
                        if result.is_ok() {
                            info!(group = %group, targets = targets.len(), "deregistered targets");
                        }
                        Input::Deregistered {
                            group,
                            targets,
                            result,
                        }
                    }
                    .boxed(),
                );
            }
            Action::CloseSurgeWatch(surge) => self.close_watch(WatchKey::Surge(surge)),
            Action::WatchNodePods { node, name } => {
                let api: Api<Pod> = Api::all(self.client.clone());
                let stream = watcher(
                    api,
                    watcher::Config::default().fields(&format!("spec.nodeName={name}")),
                )
                .default_backoff();
                let what = format!("watch pods on node {name}");
                self.open_watch(WatchKey::Node(node), what, stream, move |event| {
                    Input::NodePods { node, event }
                });
            }
            Action::CloseNodeWatch(node) => self.close_watch(WatchKey::Node(node)),
            Action::WatchPdbs => {
                let stream = self.feed.subscribe();
                self.open_watch(
                    WatchKey::Pdbs,
                    "watch PodDisruptionBudgets".to_string(),
                    stream,
                    Input::Pdbs,
                );
            }
            Action::ClosePdbWatch => self.close_watch(WatchKey::Pdbs),
            Action::WriteRecord {
                drain,
                node: name,
                record,
            } => {
                let Some(io) = self.drains.get_mut(&drain) else {
                    return;
                };
                let previous = io.last_write.take();
                let api: Api<Node> = Api::all(self.client.clone());
                io.last_write = Some(tokio::spawn(async move {
                    if let Some(previous) = previous {
                        let _ = previous.await;
                    }
                    if let Err(e) = node::write_record(&api, &name, &record).await {
                        warn!(node = %name, error = %e, "cannot write the drain record");
                    }
                }));
            }
            Action::Publish { drain, event } => {
                let task = tokio::spawn(publish(self.recorder.clone(), event));
                if let Some(io) = self.drains.get_mut(&drain) {
                    io.events.push(task);
                }
            }
            Action::Progress { drain, event } => {
                if let Some(io) = self.drains.get(&drain) {
                    let _ = io.progress.send(event);
                }
            }
            Action::Finish { drain, result } => {
                let Some(io) = self.drains.remove(&drain) else {
                    return;
                };
                let DrainIo {
                    progress,
                    reply,
                    last_write,
                    events,
                } = io;
                drop(progress);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(FINISH_WAIT, async {
                        if let Some(write) = last_write {
                            let _ = write.await;
                        }
                        futures::future::join_all(events).await;
                    })
                    .await;
                    let _ = reply.send(result);
                });
            }
        }
    }

    /// Adds a watch whose events become inputs; its stop token ends it. Errors that retrying
    /// cannot cure (RBAC) become a [`Input::WatchRefused`]; others only delay it (the watcher
    /// backs off and lists again by itself).
    fn open_watch<K, S>(
        &mut self,
        key: WatchKey,
        what: String,
        stream: S,
        input: impl Fn(WatchEvent<K>) -> Input + Send + 'static,
    ) where
        K: Send + 'static,
        S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        if let Some(previous) = self.watch_stops.insert(key, stop.clone()) {
            previous.cancel();
        }
        let stream = stream
            .take_until(stop.cancelled_owned())
            .filter_map(move |event| {
                let input = match event {
                    Ok(event) => Some(input(match event {
                        watcher::Event::Init => WatchEvent::Init,
                        watcher::Event::InitApply(k) => WatchEvent::InitApply(k),
                        watcher::Event::InitDone => WatchEvent::InitDone,
                        watcher::Event::Apply(k) => WatchEvent::Apply(k),
                        watcher::Event::Delete(k) => WatchEvent::Delete(k),
                    })),
                    Err(error) if watch_error_is_forbidden(&error) => {
                        Some(Input::WatchRefused(Fatal {
                            action: what.clone(),
                            failure: Failure {
                                message: describe_watch_error(&error),
                                forbidden: true,
                            },
                        }))
                    }
                    Err(error) => {
                        debug!(what, %error, "watch interrupted");
                        None
                    }
                };
                futures::future::ready(input)
            });
        self.watches.push(stream.boxed());
    }

    fn close_watch(&mut self, key: WatchKey) {
        if let Some(stop) = self.watch_stops.remove(&key) {
            stop.cancel();
        }
    }
}

/// Publishes one Event; a refused Event never fails a drain.
pub(crate) async fn publish(recorder: Recorder, event: DrainEvent) {
    let kube_event = KubeEvent {
        type_: match event.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: event.reason.to_string(),
        note: Some(event.note),
        action: "Drain".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&kube_event, &event.regarding).await {
        warn!(reason = event.reason, error = %describe_api_error(&e), "cannot publish Event");
    }
}

/// The tokio instant at which the wall-clock moment `at` comes.
pub(crate) fn sleep_deadline(at: Timestamp) -> tokio::time::Instant {
    let ahead = at.duration_since(Timestamp::now());
    let ahead = Duration::try_from(ahead).unwrap_or(Duration::ZERO);
    // A moment further than a day is no moment worth waking for; it also keeps the sum finite.
    tokio::time::Instant::now() + ahead.min(Duration::from_secs(86_400))
}

pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

    #[test]
    fn a_refusal_of_the_machine_is_a_forbidden_drain_error() {
        let error = DrainError::from(Fatal {
            action: "evict pod shop/web-1".to_string(),
            failure: Failure {
                message: "pods \"web-1\" is forbidden".to_string(),
                forbidden: true,
            },
        });
        assert!(error.is_forbidden());
        assert_eq!(
            error.to_string(),
            "cannot evict pod shop/web-1: pods \"web-1\" is forbidden"
        );
    }
}
