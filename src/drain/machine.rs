//! The drain engine's decisions: a state machine that does no I/O.
//!
//! [`Machine::on`] takes one [`Input`] (a drain to start or cancel, a pod, PDB or surge watch
//! event, a request's outcome, or just the passing of time) and the current time, updates its
//! state, and returns the [`Action`]s that follow: requests to send, watches to open or close,
//! records to write, Events to publish, progress to report, drains to end. [`Machine::next_wake`]
//! says when time alone will have something to do. The executor (`execute`) carries the actions
//! out and feeds their outcomes back; nothing here reads a clock or talks to the API, so every
//! decision is tested with plain `#[test]`s and properties over any interleaving of inputs.
//!
//! One machine serves every drain of a process: the PDB budgets, the per-PDB request limit and
//! surges span drains, and one owner of that state needs no locks.
//!
//! A drain reads top to bottom:
//! 1. its nodes arrive prepared (cordoned, tainted, recorded) with their plans; refused pods
//!    end it before anything is evicted;
//! 2. steps start wave by wave ([`Plan::due_to_start`]); each strategy becomes a phase;
//! 3. evictions pass a gate: the PDB's last status minus what this process has in flight or
//!    has not seen reflected yet, and at most `evictions_per_pdb` requests per PDB at a time;
//! 4. refusals back off, and are retried at once when the PDB's status says they would pass;
//! 5. at a step's latest start under an involuntary deadline, whatever still blocks it is
//!    overridden with a deletion;
//! 6. the pod watch says when pods are gone; the drain ends when every step is gone, its timeout
//!    passes, it is cancelled, or a request is refused for lack of rights.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;

use super::events::DrainEvent;
use super::evict::{DeleteOutcome, EvictOutcome};
use super::plan::{Plan, Progress, StepIndex, StepState, WarningKind};
use super::policy::{self, Strategy};
use super::report::{
    Blocker, DrainOutcome, DrainReport, NodeReport, PdbSeen, PodChange, PodRef, PodReport,
    ProgressEvent,
};
use super::surge::{self, SurgeStart};
use crate::lb::targets::{PodTarget, Target, TargetState, TargetType, group_name};
use crate::lb::wait::{self, Decision, Observed};
use crate::node::{DrainRecord, Phase};

pub use super::report::LoadBalancerCut;

/// How long a pod may sit in its PDB's `status.disruptedPods` without a deletionTimestamp before
/// the machine decides the approved eviction will never delete it. The apiserver writes the
/// entry and deletes the pod in one request, milliseconds apart; the slack covers a pod watch
/// that lags behind the PDB watch under load.
pub const EVICTION_SETTLE: Duration = Duration::from_secs(10);

/// Tunables of the machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// First retry after a refusal or failure; doubles up to `retry_max`. backon's jitter adds up
    /// to 100% of each delay, so a delay may reach twice the cap: pods blocked together do not
    /// retry together.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How often a pod covered by several PDBs is retried when no PDB changes.
    pub multiple_pdb_recheck: Duration,
    /// Eviction requests in flight at once against one PDB (at least 1).
    pub evictions_per_pdb: usize,
}

/// One call of `Drainer::drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrainId(pub u64);

/// One node of a running drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

/// One pod's step in one node's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId {
    pub node: NodeId,
    pub index: StepIndex,
}

/// One Deployment being surged, shared by every drain with pods of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SurgeId(pub u64);

/// A request that failed: the apiserver's words, and whether it was an RBAC refusal (fatal:
/// retrying will not help).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub forbidden: bool,
}

/// Why a drain could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    /// What was being done, e.g. "evict pod shop/web-1".
    pub action: String,
    pub failure: Failure,
}

/// A watch's events, as kube-runtime's watcher delivers them: a (re)list is `Init`, the objects,
/// `InitDone`; then changes.
#[derive(Debug, Clone)]
pub enum WatchEvent<K> {
    Init,
    InitApply(K),
    InitDone,
    Apply(K),
    Delete(K),
}

/// Whether a node's drain was begun by this call or carries on one an earlier leader (or run)
/// began: only the first publishes `DrainStarted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Fresh,
    Resumed,
}

/// A prepared node and its plan.
#[derive(Debug, Clone)]
pub struct NodeStart {
    pub name: String,
    /// For Events about the node.
    pub reference: ObjectReference,
    /// The record on the node, as prepared.
    pub record: DrainRecord,
    pub origin: Origin,
    pub plan: Plan,
    /// The pods the plan was made from (warnings name them; steps keep their metadata).
    pub pods: Vec<Pod>,
}

#[derive(Debug, Clone)]
pub struct NewDrain {
    pub id: DrainId,
    pub nodes: Vec<NodeStart>,
    /// When the caller began (the report's elapsed time counts from here).
    pub began: Timestamp,
    pub timeout_at: Option<Timestamp>,
    /// `--disable-eviction`: pods that would be evicted are deleted.
    pub disable_eviction: bool,
}

#[derive(Debug, Clone)]
pub enum Input {
    Start(NewDrain),
    Cancel(DrainId),
    NodePods {
        node: NodeId,
        event: WatchEvent<Pod>,
    },
    /// A watch that cannot go on (RBAC); other watch errors are retried by the executor.
    WatchRefused(Fatal),
    Pdbs(WatchEvent<PodDisruptionBudget>),
    SurgePods {
        surge: SurgeId,
        event: WatchEvent<Pod>,
    },
    Evicted {
        step: StepId,
        grace: i64,
        result: Result<EvictOutcome, Failure>,
    },
    Deleted {
        step: StepId,
        grace: i64,
        result: Result<DeleteOutcome, Failure>,
    },
    RolloutRestarted {
        surge: SurgeId,
        result: Result<SurgeStart, Failure>,
    },
    /// `DescribeTargetHealth` of a target group some step waits on: every target it has
    /// registered, with its state (a target it no longer lists is gone).
    TargetHealth {
        group: String,
        result: Result<Vec<(Target, TargetState)>, Failure>,
    },
    /// The answer to [`Action::DeregisterTargets`].
    Deregistered {
        group: String,
        targets: Vec<Target>,
        result: Result<(), Failure>,
    },
    /// Only time has passed.
    Tick,
}

/// What the executor must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Evict with the Eviction API, with this grace and a UID precondition.
    Evict {
        step: StepId,
        pod: PodRef,
        uid: Option<String>,
        grace: i64,
    },
    /// Delete with this grace and a UID precondition.
    Delete {
        step: StepId,
        pod: PodRef,
        uid: Option<String>,
        grace: i64,
    },
    /// Restart the Deployment's rollout unless it already restarted since `since`.
    RestartRollout {
        surge: SurgeId,
        namespace: String,
        deployment: String,
        since: Timestamp,
    },
    WatchSurgePods {
        surge: SurgeId,
        namespace: String,
        selector: String,
    },
    CloseSurgeWatch(SurgeId),
    WatchNodePods {
        node: NodeId,
        name: String,
    },
    CloseNodeWatch(NodeId),
    /// Ask a target group what it has registered (answered with [`Input::TargetHealth`]).
    DescribeTargetHealth {
        group: String,
    },
    /// Take these targets out of their group (answered with [`Input::Deregistered`]). A failed
    /// call only means the wait ends by the delay or the deadline.
    DeregisterTargets {
        group: String,
        targets: Vec<Target>,
    },
    /// The process-wide PDB watch: opened with the first drain, closed with the last.
    WatchPdbs,
    ClosePdbWatch,
    /// Overwrite the node's drain record; writes of one node go out in order.
    WriteRecord {
        drain: DrainId,
        node: String,
        record: DrainRecord,
    },
    Publish {
        drain: DrainId,
        event: DrainEvent,
    },
    Progress {
        drain: DrainId,
        event: ProgressEvent,
    },
    /// The drain is over: its last record writes and progress go out before the caller hears.
    Finish {
        drain: DrainId,
        result: Result<DrainReport, Fatal>,
    },
}

type PdbKey = (String, String);

/// Where one step is.
#[derive(Debug, Clone, PartialEq)]
enum StepPhase {
    NotStarted,
    /// Wants (another) eviction.
    Evict,
    /// Wants a deletion, for this reason.
    Delete(DeleteReason),
    /// `surge`: waiting for the restart and a Ready replacement.
    Surge(SurgeId),
    /// `wait`: waiting for completion.
    Wait,
    /// `karpenter.sh/do-not-disrupt` with a duration: left alone until this moment, then the
    /// step's strategy starts (see [`super::plan::PodPlan::hold`]).
    Hold(Timestamp),
    /// Eviction or deletion accepted; waiting for the pod to go.
    Terminating,
    Gone {
        after: Duration,
        completed: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum DeleteReason {
    /// Strategy `delete`, `--disable-eviction`, or a surge fallback under it.
    Asked,
    /// The deadline left no more time; this is what still blocked the pod.
    DeadlineOverride(Option<Blocker>),
    /// Its PDB already counts it as evicted.
    CompleteEviction { pdb: String },
}

/// A request of this machine whose answer has not come back.
#[derive(Debug, Clone)]
enum Request {
    /// `gate`: the PDB the eviction was counted against, and its `disruptionsAllowed` then.
    Evict {
        gate: Option<(PdbKey, Option<i32>)>,
    },
    Delete(DeleteReason),
    /// Not a request to the apiserver: the step would be evicted (or deleted) now, but a load
    /// balancer still routes to it. Kept here so that the step is not attempted again and the
    /// PDB budget its eviction will spend stays reserved (`gate`) while it waits: a pod taken
    /// out of its load balancer is already out of service.
    LoadBalancer {
        gate: Option<(PdbKey, Option<i32>)>,
        /// When this step's own targets began to be deregistered.
        since: Timestamp,
        /// When the wait is decided again at the latest (a poll may end it sooner).
        until: Option<Timestamp>,
    },
}

/// When to try a blocked step again.
#[derive(Debug, Default)]
struct Retry {
    /// As soon as the gate allows (a PDB changed, a step started, a request limit freed).
    now: bool,
    /// No later than this, whatever the PDB says (the backoff safety net).
    at: Option<Timestamp>,
    backoff: Option<ExponentialBackoff>,
}

#[derive(Debug)]
struct StepRun {
    /// The pod's metadata only (labels for PDB selectors and surges, uid, namespace, name).
    pod: Pod,
    key: PodRef,
    phase: StepPhase,
    started_at: Option<Timestamp>,
    retry: Retry,
    /// PDBs whose selector covers the pod; `None` until computed or after a PDB in the
    /// namespace appeared, went or changed its selector.
    covering: Option<Vec<PdbKey>>,
    /// Last blocker reported, so each distinct one is reported once.
    blocker: Option<Blocker>,
    /// Deleted past its blocker by the deadline (kept for the report).
    overridden: bool,
    /// The pod watch has shown a deletionTimestamp.
    deleting: bool,
    /// Readiness and phase as last seen: the Eviction API lets a not-Ready (or Pending) pod go
    /// past a PDB that allows no disruption in some cases ([`policy::budget_bypass`]), and the
    /// gate must not hold back what the apiserver would accept.
    health: policy::PodHealth,
    /// The load balancers no longer route to it (or it serves through none): it may stop.
    lb_clear: bool,
}

impl StepRun {
    fn is_gone(&self) -> bool {
        matches!(self.phase, StepPhase::Gone { .. })
    }
}

#[derive(Debug)]
struct NodeRun {
    drain: DrainId,
    name: String,
    reference: ObjectReference,
    record: DrainRecord,
    plan: Plan,
    progress: Progress,
    steps: Vec<StepRun>,
    by_uid: HashMap<String, StepIndex>,
    /// UIDs seen since the pod watch (re)started listing.
    relist: Option<HashSet<String>>,
    drained_reported: bool,
}

impl NodeRun {
    fn all_gone(&self) -> bool {
        self.steps.iter().all(StepRun::is_gone)
    }
    fn forcing(&self) -> bool {
        !self.plan.voluntary && self.plan.deadline.is_some()
    }
}

#[derive(Debug)]
struct DrainRun {
    nodes: Vec<NodeId>,
    began: Timestamp,
    timeout_at: Option<Timestamp>,
    disable_eviction: bool,
    fatal: Option<Fatal>,
}

/// A PDB as the machine follows it: its last status, and what that status does not show yet.
#[derive(Debug)]
struct PdbState {
    pdb: PodDisruptionBudget,
    /// Evictions counted against this PDB whose answer has not come back.
    in_flight: usize,
    /// Pods this machine evicted whose eviction no status seen yet accounts for, so
    /// `disruptionsAllowed` is too high by their number. An eviction writes the PDB status with
    /// the pod in `disruptedPods` before it answers; every later status (the disruption
    /// controller drops the pod from that map once it is terminating, and no longer counts it
    /// healthy) accounts for it too.
    unseen: BTreeSet<String>,
    /// Pod names seen in `disruptedPods` while evictions were in flight: an eviction whose
    /// status update arrived before its answer is never counted as unseen.
    reflected: BTreeSet<String>,
}

impl PdbState {
    fn new(pdb: PodDisruptionBudget) -> Self {
        let reflected = disrupted_pods(&pdb).into_keys().collect();
        PdbState {
            pdb,
            in_flight: 0,
            unseen: BTreeSet::new(),
            reflected,
        }
    }

    /// Takes a new copy of the PDB; returns whether its selector changed.
    fn update(&mut self, pdb: PodDisruptionBudget) -> bool {
        let selector = |p: &PodDisruptionBudget| p.spec.as_ref().and_then(|s| s.selector.clone());
        let changed = selector(&self.pdb) != selector(&pdb);
        let disrupted: BTreeSet<String> = disrupted_pods(&pdb).into_keys().collect();
        self.unseen.retain(|name| !disrupted.contains(name));
        if self.in_flight == 0 {
            // Nothing can be answered late any more: what the status lists is all there is.
            self.reflected = disrupted;
        } else {
            self.reflected.extend(disrupted);
        }
        self.pdb = pdb;
        changed
    }

    /// `disruptionsAllowed`, when the disruption controller has computed it for the current spec.
    fn allowed(&self) -> Option<i32> {
        let status = self.pdb.status.as_ref()?;
        let current =
            status.observed_generation.unwrap_or(0) >= self.pdb.metadata.generation.unwrap_or(0);
        current.then_some(status.disruptions_allowed?)
    }

    /// What is left of the budget for this process.
    fn budget(&self) -> Option<i32> {
        Some(self.allowed()? - self.in_flight as i32 - self.unseen.len() as i32)
    }

    fn name(&self) -> String {
        self.pdb.metadata.name.clone().unwrap_or_default()
    }
}

#[derive(Debug)]
enum SurgeState {
    Starting,
    Restarted,
    Fallback(String),
}

#[derive(Debug)]
struct SurgeRun {
    deployment: String,
    state: SurgeState,
    /// Surge steps of this Deployment, in the order they started.
    steps: Vec<StepId>,
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
    /// The PDB's budget would allow it, but this process already has as many requests in flight
    /// against it as it may. The blocker names the PDB: past the step's latest start, waiting
    /// for those answers is waiting on the PDB, and the deadline overrides it like any other.
    Busy(Blocker),
    Closed(Blocker),
    Multiple,
}

/// The state machine. See the module documentation.
pub struct Machine {
    config: MachineConfig,
    backoff: ExponentialBuilder,
    drains: BTreeMap<DrainId, DrainRun>,
    nodes: BTreeMap<NodeId, NodeRun>,
    next_node: u64,
    /// Every step of a running drain by its pod, to find the pods a PDB's status names.
    by_pod: HashMap<PodRef, StepId>,
    requests: HashMap<StepId, Request>,
    pdbs: BTreeMap<PdbKey, PdbState>,
    pdb_relist: Option<HashSet<PdbKey>>,
    /// The PDB watch has delivered a complete list since it was opened.
    pdbs_listed: bool,
    surges: BTreeMap<SurgeId, SurgeRun>,
    surge_index: HashMap<PdbKey, SurgeId>,
    next_surge: u64,
    /// Target groups some step waits on, by ARN.
    lb_groups: BTreeMap<String, LbGroup>,
    /// Targets this machine deregistered, and when ELBv2 said so. A successful DeregisterTargets
    /// has put the target in `draining`: until a `DescribeTargetHealth` asked after that moment
    /// says otherwise, the target takes no new connections. Waiting for the next poll instead
    /// would give the AWS Load Balancer Controller time to register a Ready pod's IP again (it
    /// does, on its next reconcile, for a target that is draining while the pod is still in the
    /// Service's ready endpoints), and the pod would wait the group's whole delay.
    deregistered: HashMap<Target, Timestamp>,
    actions: Vec<Action>,
}

/// How often a target group is asked while steps wait on it: NLB and ALB targets go `draining`
/// within a second or two of a deregistration, and each ask is one ELBv2 call per group (not
/// per pod), far below ELBv2's request limits.
pub const LB_POLL: Duration = Duration::from_secs(2);

/// A target group as the machine follows it.
#[derive(Debug, Default)]
struct LbGroup {
    /// The last answer: each registered target's state.
    states: Option<HashMap<Target, TargetState>>,
    /// When the question that `states` answers was asked.
    states_asked_at: Option<Timestamp>,
    asked_at: Option<Timestamp>,
    asking: bool,
}

fn after(at: Timestamp, delay: Duration) -> Timestamp {
    at.checked_add(SignedDuration::try_from(delay).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// One DeregisterTargets per group for `targets`.
fn deregistrations<'a>(targets: impl Iterator<Item = &'a PodTarget>) -> Vec<Action> {
    let mut by_group: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    for target in targets {
        by_group
            .entry(target.target.group_arn.clone())
            .or_default()
            .push(target.target.clone());
    }
    by_group
        .into_iter()
        .map(|(group, targets)| Action::DeregisterTargets { group, targets })
        .collect()
}

fn since(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

fn pod_uid(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref()
}

/// The pod names in the PDB's `status.disruptedPods`, with when each was evicted.
fn disrupted_pods(pdb: &PodDisruptionBudget) -> BTreeMap<String, Timestamp> {
    pdb.status
        .as_ref()
        .and_then(|s| s.disrupted_pods.as_ref())
        .map(|d| d.iter().map(|(k, t)| (k.clone(), t.0)).collect())
        .unwrap_or_default()
}

fn pdb_key(pdb: &PodDisruptionBudget) -> PdbKey {
    (
        pdb.metadata.namespace.clone().unwrap_or_default(),
        pdb.metadata.name.clone().unwrap_or_default(),
    )
}

/// The pod as a step keeps it: what the decisions read (metadata without `managedFields`).
fn metadata_only(pod: &Pod) -> Pod {
    let mut metadata = pod.metadata.clone();
    metadata.managed_fields = None;
    metadata.annotations = None;
    Pod {
        metadata,
        spec: None,
        status: None,
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

impl Machine {
    pub fn new(config: MachineConfig) -> Self {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(config.retry_min)
            .with_max_delay(config.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Machine {
            config: MachineConfig {
                evictions_per_pdb: config.evictions_per_pdb.max(1),
                ..config
            },
            backoff,
            drains: BTreeMap::new(),
            nodes: BTreeMap::new(),
            next_node: 0,
            by_pod: HashMap::new(),
            requests: HashMap::new(),
            pdbs: BTreeMap::new(),
            pdb_relist: None,
            pdbs_listed: false,
            surges: BTreeMap::new(),
            surge_index: HashMap::new(),
            next_surge: 0,
            lb_groups: BTreeMap::new(),
            deregistered: HashMap::new(),
            actions: Vec::new(),
        }
    }

    /// No drain runs.
    pub fn is_idle(&self) -> bool {
        self.drains.is_empty()
    }

    /// Takes one input at `now` and returns what to do about it.
    pub fn on(&mut self, input: Input, now: Timestamp) -> Vec<Action> {
        self.on_all([input], now)
    }

    /// Takes inputs that arrived together, then decides once: in a burst, hundreds of watch
    /// events arrive between two decisions, and each decision looks at every step.
    pub fn on_all(
        &mut self,
        inputs: impl IntoIterator<Item = Input>,
        now: Timestamp,
    ) -> Vec<Action> {
        for input in inputs {
            self.apply(input, now);
        }
        self.advance(now);
        std::mem::take(&mut self.actions)
    }

    fn apply(&mut self, input: Input, now: Timestamp) {
        match input {
            Input::Start(drain) => self.start(drain, now),
            Input::Cancel(id) => self.finish(id, DrainOutcome::Cancelled, now),
            Input::NodePods { node, event } => self.on_pod_event(node, event, now),
            Input::WatchRefused(fatal) => {
                // Every running drain needs the watches it refuses.
                for drain in self.drains.values_mut() {
                    drain.fatal.get_or_insert_with(|| fatal.clone());
                }
            }
            Input::Pdbs(event) => self.on_pdb_event(event),
            Input::SurgePods { surge, event } => self.on_surge_pods(surge, event),
            Input::Evicted {
                step,
                grace,
                result,
            } => self.on_evicted(step, grace, result, now),
            Input::Deleted {
                step,
                grace,
                result,
            } => self.on_deleted(step, grace, result, now),
            Input::RolloutRestarted { surge, result } => self.on_rollout_restarted(surge, result),
            Input::TargetHealth { group, result } => self.on_target_health(group, result),
            Input::Deregistered {
                targets,
                result: Ok(()),
                ..
            } => {
                for target in targets {
                    self.deregistered.insert(target, now);
                }
            }
            // The wait goes on with what DescribeTargetHealth says; the executor logged it.
            Input::Deregistered { result: Err(_), .. } => {}
            Input::Tick => {}
        }
    }

    /// When time alone will next have something to do (a retry, a step's latest start, a
    /// timeout, an approved eviction to complete); `None`: only inputs will.
    pub fn next_wake(&self) -> Option<Timestamp> {
        let mut wake: Option<Timestamp> = None;
        let mut at = |t: Timestamp| wake = Some(wake.map_or(t, |w| w.min(t)));
        for drain in self.drains.values() {
            if let Some(t) = drain.timeout_at {
                at(t);
            }
        }
        for (&node, run) in &self.nodes {
            let forcing = run.forcing();
            for (i, step) in run.steps.iter().enumerate() {
                let id = StepId {
                    node,
                    index: StepIndex(i),
                };
                if let Some(Request::LoadBalancer {
                    until: Some(until), ..
                }) = self.requests.get(&id)
                {
                    at(*until);
                }
                if self.requests.contains_key(&id) {
                    continue;
                }
                if matches!(step.phase, StepPhase::Evict | StepPhase::Delete(_))
                    && let Some(t) = step.retry.at
                {
                    at(t);
                }
                if let StepPhase::Hold(until) = step.phase {
                    at(until);
                }
                let waits_for_latest = match step.phase {
                    StepPhase::NotStarted => true,
                    StepPhase::Evict => forcing && step.blocker.is_some() && !step.overridden,
                    StepPhase::Surge(_) | StepPhase::Wait | StepPhase::Hold(_) => {
                        forcing && !step.overridden
                    }
                    _ => false,
                };
                if waits_for_latest && let Some(latest) = run.plan.steps[i].latest_start {
                    at(latest);
                }
            }
        }
        for (key, live) in &self.pdbs {
            for (name, evicted) in disrupted_pods(&live.pdb) {
                let pod = PodRef {
                    namespace: key.0.clone(),
                    name,
                };
                if let Some(step) = self.by_pod.get(&pod)
                    && self.completable(*step)
                {
                    at(after(evicted, EVICTION_SETTLE));
                }
            }
        }
        for group in self.lb_groups.values() {
            if !group.asking {
                at(group.asked_at.map_or(Timestamp::MIN, |t| after(t, LB_POLL)));
            }
        }
        wake
    }

    fn step(&self, id: StepId) -> Option<&StepRun> {
        self.nodes.get(&id.node)?.steps.get(id.index.0)
    }

    fn step_mut(&mut self, id: StepId) -> Option<&mut StepRun> {
        self.nodes.get_mut(&id.node)?.steps.get_mut(id.index.0)
    }

    fn step_ids(&self) -> Vec<StepId> {
        self.nodes
            .iter()
            .flat_map(|(&node, run)| {
                (0..run.steps.len()).map(move |i| StepId {
                    node,
                    index: StepIndex(i),
                })
            })
            .collect()
    }

    fn emit(&mut self, id: StepId, change: PodChange) {
        let Some(run) = self.nodes.get(&id.node) else {
            return;
        };
        let event = ProgressEvent::Pod {
            node: run.name.clone(),
            pod: run.steps[id.index.0].key.clone(),
            change,
        };
        self.actions.push(Action::Progress {
            drain: run.drain,
            event,
        });
    }

    /// Reports a blocker once per distinct value.
    fn block(&mut self, id: StepId, blocker: Blocker) {
        let Some(step) = self.step_mut(id) else {
            return;
        };
        let new = step
            .blocker
            .as_ref()
            .is_none_or(|known| !same_blocker(known, &blocker));
        step.blocker = Some(blocker.clone());
        if new {
            self.emit(id, PodChange::Blocked { blocker });
        }
    }

    fn next_backoff(&mut self, id: StepId) -> Duration {
        let builder = self.backoff;
        let retry_max = self.config.retry_max;
        let Some(step) = self.step_mut(id) else {
            return retry_max;
        };
        step.retry
            .backoff
            .get_or_insert_with(|| builder.build())
            .next()
            .unwrap_or(retry_max)
    }

    // --- drains coming and going ---

    fn start(&mut self, drain: NewDrain, now: Timestamp) {
        if self.drains.is_empty() {
            self.actions.push(Action::WatchPdbs);
        }
        let id = drain.id;
        let mut node_ids = Vec::with_capacity(drain.nodes.len());
        let refused = drain.nodes.iter().any(|n| !n.plan.refused.is_empty());
        for start in drain.nodes {
            let node = NodeId(self.next_node);
            self.next_node += 1;
            node_ids.push(node);
            let event = match start.origin {
                Origin::Fresh => DrainEvent::drain_started(start.reference.clone(), &start.record),
                Origin::Resumed => {
                    DrainEvent::drain_resumed(start.reference.clone(), &start.record)
                }
            };
            self.actions.push(Action::Publish { drain: id, event });
            self.actions.push(Action::Progress {
                drain: id,
                event: ProgressEvent::Cordoned {
                    node: start.name.clone(),
                },
            });
            self.add_node(id, node, start);
        }
        self.drains.insert(
            id,
            DrainRun {
                nodes: node_ids.clone(),
                began: drain.began,
                timeout_at: drain.timeout_at,
                disable_eviction: drain.disable_eviction,
                fatal: None,
            },
        );
        // Refused pods stop everything before the first eviction, like kubectl.
        if refused {
            for node in &node_ids {
                let run = &self.nodes[node];
                if !run.plan.refused.is_empty() {
                    self.actions.push(Action::Progress {
                        drain: id,
                        event: ProgressEvent::Refused {
                            node: run.name.clone(),
                            pods: run.plan.refused.clone(),
                        },
                    });
                }
            }
            self.finish(id, DrainOutcome::Refused, now);
            return;
        }
        for node in node_ids {
            let name = self.nodes[&node].name.clone();
            self.actions.push(Action::WatchNodePods { node, name });
        }
    }

    fn add_node(&mut self, drain: DrainId, node: NodeId, start: NodeStart) {
        let NodeStart {
            name,
            reference,
            record,
            plan,
            pods,
            ..
        } = start;
        self.actions.push(Action::Progress {
            drain,
            event: ProgressEvent::Planned {
                node: name.clone(),
                steps: plan.steps.len(),
                ignored: plan.ignored.len(),
                refused: plan.refused.len(),
            },
        });
        for warning in &plan.warnings {
            self.actions.push(Action::Progress {
                drain,
                event: ProgressEvent::Warning {
                    node: name.clone(),
                    warning: warning.clone(),
                },
            });
            let pod = pods
                .iter()
                .find(|p| warning.uid.is_some() && p.metadata.uid == warning.uid);
            if let Some(pod) = pod {
                let note = match &warning.kind {
                    WarningKind::Annotation(w) => format!("{w}; the default applies"),
                    _ => warning.to_string(),
                };
                self.actions.push(Action::Publish {
                    drain,
                    event: DrainEvent::invalid_annotation(pod.object_ref(&()), note),
                });
            }
        }
        let by_uid_pods: HashMap<&str, &Pod> =
            pods.iter().filter_map(|p| Some((pod_uid(p)?, p))).collect();
        let steps: Vec<StepRun> = plan
            .steps
            .iter()
            .map(|step| {
                let full = step.uid.as_deref().and_then(|uid| by_uid_pods.get(uid));
                let pod = full.map(|p| metadata_only(p)).unwrap_or_default();
                // A pod we know nothing of counts as Ready: the gate then holds it to the budget,
                // the careful side.
                let health = full.map_or(
                    policy::PodHealth {
                        ready: true,
                        pending: false,
                    },
                    |p| policy::PodHealth::of(p),
                );
                StepRun {
                    health,
                    lb_clear: step.load_balancer.is_empty(),
                    deleting: pod.metadata.deletion_timestamp.is_some(),
                    pod,
                    key: PodRef {
                        namespace: step.namespace.clone(),
                        name: step.name.clone(),
                    },
                    phase: StepPhase::NotStarted,
                    started_at: None,
                    retry: Retry::default(),
                    covering: None,
                    blocker: None,
                    overridden: false,
                }
            })
            .collect();
        let by_uid: HashMap<String, StepIndex> = plan
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.uid.clone().map(|uid| (uid, StepIndex(i))))
            .collect();
        for (i, step) in steps.iter().enumerate() {
            self.by_pod.insert(
                step.key.clone(),
                StepId {
                    node,
                    index: StepIndex(i),
                },
            );
        }
        // The node's instance targets in groups nodedrain deregisters itself leave their load
        // balancers now, like the exclude label takes them out of the AWS Load Balancer
        // Controller's groups: every pod behind them waits for that.
        self.actions
            .extend(deregistrations(plan.node_targets.iter().filter(|t| {
                t.deregistered_by_nodedrain && t.state.routes_new_connections()
            })));
        let progress = plan.progress();
        self.nodes.insert(
            node,
            NodeRun {
                drain,
                name,
                reference,
                record,
                plan,
                progress,
                steps,
                by_uid,
                relist: None,
                drained_reported: false,
            },
        );
    }

    /// Ends a drain: its records and Events, its report, and everything it held.
    fn finish(&mut self, id: DrainId, outcome: DrainOutcome, now: Timestamp) {
        let Some(drain) = self.drains.remove(&id) else {
            return;
        };
        let fatal = drain.fatal.clone();
        for node in &drain.nodes {
            let Some(run) = self.nodes.get_mut(node) else {
                continue;
            };
            let phase = match (&fatal, outcome) {
                (Some(_), _) => Phase::Failed,
                (None, DrainOutcome::Drained) => Phase::Drained,
                (None, DrainOutcome::Cancelled) => run.record.phase,
                // Nothing was evicted, whatever the other nodes' plans held.
                (None, DrainOutcome::Refused) => Phase::Failed,
                (None, _) if run.all_gone() => Phase::Drained,
                (None, _) => Phase::Failed,
            };
            run.record.enter(phase);
            let phase = run.record.phase;
            // A cancelled drain leaves its record as it is: the next leader resumes from it.
            if fatal.is_some() || outcome != DrainOutcome::Cancelled {
                self.actions.push(Action::WriteRecord {
                    drain: id,
                    node: run.name.clone(),
                    record: run.record.clone(),
                });
                let event = if phase == Phase::Drained {
                    DrainEvent::drain_succeeded(run.reference.clone(), run.plan.steps.len())
                } else {
                    let remaining: Vec<String> = run
                        .steps
                        .iter()
                        .filter(|s| !s.is_gone())
                        .take(10)
                        .map(|s| s.key.to_string())
                        .collect();
                    let why = match (&fatal, outcome) {
                        (None, DrainOutcome::Refused) => {
                            "pods need --force / --delete-emptydir-data / --ignore-daemonsets"
                                .to_string()
                        }
                        (None, DrainOutcome::TimedOut) => {
                            format!("timed out; remaining: {}", remaining.join(", "))
                        }
                        _ => format!("stopped; remaining: {}", remaining.join(", ")),
                    };
                    DrainEvent::drain_failed(run.reference.clone(), why)
                };
                self.actions.push(Action::Publish { drain: id, event });
            }
        }
        let result = match fatal {
            Some(fatal) => Err(fatal),
            None => Ok(self.report(&drain, outcome, now)),
        };
        // Waits for load balancers hold PDB budget and have no answer to come: release them.
        let waits: Vec<StepId> = self
            .requests
            .iter()
            .filter(|(id, r)| {
                drain.nodes.contains(&id.node) && matches!(r, Request::LoadBalancer { .. })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in waits {
            self.answered(id);
        }
        // Forget the drain: its watches, its surges' steps, its pods' unseen evictions.
        for node in &drain.nodes {
            let Some(run) = self.nodes.remove(node) else {
                continue;
            };
            self.actions.push(Action::CloseNodeWatch(*node));
            for step in &run.steps {
                self.by_pod.remove(&step.key);
                for (key, live) in self.pdbs.iter_mut() {
                    if key.0 == step.key.namespace {
                        live.unseen.remove(&step.key.name);
                    }
                }
            }
        }
        let finished: Vec<SurgeId> = self
            .surges
            .iter_mut()
            .filter_map(|(&id, surge)| {
                surge.steps.retain(|s| !drain.nodes.contains(&s.node));
                surge.steps.is_empty().then_some(id)
            })
            .collect();
        for surge in finished {
            self.surges.remove(&surge);
            self.surge_index.retain(|_, s| *s != surge);
            self.actions.push(Action::CloseSurgeWatch(surge));
        }
        self.actions.push(Action::Finish { drain: id, result });
        if self.drains.is_empty() {
            self.actions.push(Action::ClosePdbWatch);
            self.pdbs.clear();
            self.pdb_relist = None;
            self.pdbs_listed = false;
            self.deregistered.clear();
        }
    }

    /// Decides what time and state allow now, then ends the drains that are over.
    fn advance(&mut self, now: Timestamp) {
        self.start_due(now);
        // Before the attempts, so a step whose hold ends now sends its request in this round.
        self.release_holds(now);
        self.complete_approved_evictions(now);
        self.attempt(now);
        // Right after the attempts: a wait that began in them and whose targets are already
        // out of service ends in this round.
        self.load_balancer_waits(now);
        self.ask_target_groups(now);
        // After the attempts: a step whose gate has just closed at its latest start is
        // overridden now, not on the next input.
        self.deadline_overrides(now);
        let ids: Vec<DrainId> = self.drains.keys().copied().collect();
        for id in ids {
            let drain = &self.drains[&id];
            let outcome = if drain.fatal.is_some() {
                Some(DrainOutcome::Cancelled)
            } else if drain.nodes.iter().all(|n| self.nodes[n].all_gone()) {
                Some(DrainOutcome::Drained)
            } else if drain.timeout_at.is_some_and(|t| now >= t) {
                Some(DrainOutcome::TimedOut)
            } else {
                None
            };
            if let Some(outcome) = outcome {
                self.finish(id, outcome, now);
            }
        }
    }

    // --- starting steps ---

    fn start_due(&mut self, now: Timestamp) {
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        for node in nodes {
            let run = &self.nodes[&node];
            let due = run.plan.due_to_start(&run.progress, now);
            for index in due {
                let id = StepId { node, index };
                if self
                    .step(id)
                    .is_some_and(|s| s.phase == StepPhase::NotStarted)
                {
                    self.start_step(id, now);
                }
            }
        }
    }

    fn start_step(&mut self, id: StepId, now: Timestamp) {
        let Some(run) = self.nodes.get_mut(&id.node) else {
            return;
        };
        if run.record.phase == Phase::Cordoned && run.record.enter(Phase::Draining) {
            self.actions.push(Action::WriteRecord {
                drain: run.drain,
                node: run.name.clone(),
                record: run.record.clone(),
            });
        }
        run.progress.set(id.index, StepState::Started);
        let plan = &run.plan.steps[id.index.0];
        let terminating = plan.terminating;
        let hold = plan.hold.clone();
        let step = &mut run.steps[id.index.0];
        step.started_at = Some(now);
        if terminating || step.deleting {
            step.phase = StepPhase::Terminating;
            return;
        }
        // Karpenter's do-not-disrupt duration: nothing is done to the pod before it elapses.
        // An elapsed hold (a wave that started late) is no hold.
        if let Some(hold) = hold.filter(|h| now < h.until) {
            step.phase = StepPhase::Hold(hold.until);
            self.block(
                id,
                Blocker::DoNotDisrupt {
                    value: hold.value,
                    until: hold.until,
                },
            );
            return;
        }
        self.begin_strategy(id, now);
    }

    /// Steps whose do-not-disrupt hold has ended go on with their strategy.
    fn release_holds(&mut self, now: Timestamp) {
        for id in self.step_ids() {
            if self
                .step(id)
                .is_some_and(|s| matches!(s.phase, StepPhase::Hold(until) if now >= until))
            {
                if let Some(step) = self.step_mut(id) {
                    // The next blocker, if any, is news.
                    step.blocker = None;
                }
                self.begin_strategy(id, now);
            }
        }
    }

    /// Carries out a started step's strategy.
    fn begin_strategy(&mut self, id: StepId, now: Timestamp) {
        let Some(run) = self.nodes.get_mut(&id.node) else {
            return;
        };
        let disable_eviction = self
            .drains
            .get(&run.drain)
            .is_some_and(|d| d.disable_eviction);
        let strategy = run.plan.steps[id.index.0].strategy;
        let step = &mut run.steps[id.index.0];
        match strategy {
            Strategy::Evict if disable_eviction => {
                step.phase = StepPhase::Delete(DeleteReason::Asked);
                step.retry.now = true;
            }
            Strategy::Evict => {
                step.phase = StepPhase::Evict;
                step.retry.now = true;
            }
            Strategy::Delete => {
                step.phase = StepPhase::Delete(DeleteReason::Asked);
                step.retry.now = true;
            }
            Strategy::Wait => {
                step.phase = StepPhase::Wait;
                self.emit(id, PodChange::Waiting);
            }
            Strategy::Surge => self.start_surge(id, now),
            // The planner never makes skip steps; nothing to do if one appears.
            Strategy::Skip => self.mark_gone(id, false, now),
        }
    }

    fn start_surge(&mut self, id: StepId, now: Timestamp) {
        let run = &self.nodes[&id.node];
        let step = &run.steps[id.index.0];
        let namespace = step.key.namespace.clone();
        let hash = step
            .pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(surge::POD_TEMPLATE_HASH))
            .cloned();
        let deployment = match run.plan.steps[id.index.0].owner.as_ref() {
            Some(owner) if owner.kind == "Deployment" => owner.name.clone(),
            _ => {
                self.fall_back(id, "the pod's Deployment is unknown".to_string());
                return;
            }
        };
        let since = run.record.started.min(now);
        let key = (namespace.clone(), deployment.clone());
        let surge = match self.surge_index.get(&key) {
            Some(&surge) => surge,
            None => {
                let surge = SurgeId(self.next_surge);
                self.next_surge += 1;
                self.surges.insert(
                    surge,
                    SurgeRun {
                        deployment: deployment.clone(),
                        state: SurgeState::Starting,
                        steps: Vec::new(),
                        old_hashes: BTreeSet::new(),
                        pods: HashMap::new(),
                        relist: None,
                    },
                );
                self.surge_index.insert(key, surge);
                self.actions.push(Action::RestartRollout {
                    surge,
                    namespace,
                    deployment: deployment.clone(),
                    since,
                });
                surge
            }
        };
        if let Some(step) = self.step_mut(id) {
            step.phase = StepPhase::Surge(surge);
        }
        let run = self
            .surges
            .get_mut(&surge)
            .expect("surge inserted or indexed above");
        run.steps.push(id);
        if let Some(hash) = hash {
            run.old_hashes.insert(hash);
        }
        match &run.state {
            SurgeState::Starting => {}
            SurgeState::Fallback(reason) => {
                let reason = reason.clone();
                self.fall_back(id, reason);
            }
            SurgeState::Restarted => {
                let deployment = run.deployment.clone();
                self.emit(
                    id,
                    PodChange::Surging {
                        deployment,
                        restarted: false,
                    },
                );
                self.check_surge(surge);
            }
        }
    }

    /// A surge that cannot happen: the pod is evicted (or deleted) instead.
    fn fall_back(&mut self, id: StepId, reason: String) {
        let Some(run) = self.nodes.get(&id.node) else {
            return;
        };
        let disable_eviction = self
            .drains
            .get(&run.drain)
            .is_some_and(|d| d.disable_eviction);
        let Some(step) = self.step_mut(id) else {
            return;
        };
        if !matches!(step.phase, StepPhase::Surge(_) | StepPhase::NotStarted) {
            return;
        }
        step.phase = if disable_eviction {
            StepPhase::Delete(DeleteReason::Asked)
        } else {
            StepPhase::Evict
        };
        step.retry.now = true;
        self.emit(id, PodChange::SurgeFallback { reason });
    }

    fn draining_names(&self) -> BTreeSet<String> {
        self.nodes.values().map(|n| n.name.clone()).collect()
    }

    /// Lets surge steps go once enough Ready replacements exist on nodes not being drained: the
    /// k-th old pod of a Deployment leaves when k replacements are Ready.
    fn check_surge(&mut self, surge: SurgeId) {
        let draining = self.draining_names();
        let Some(run) = self.surges.get(&surge) else {
            return;
        };
        if !matches!(run.state, SurgeState::Restarted) {
            return;
        }
        let first = run.steps.first().copied();
        let ready = run
            .pods
            .values()
            .filter(|p| surge::is_replacement(p, &run.old_hashes, &draining))
            .filter(|p| first.is_none_or(|step| self.replacement_serves(step, p)))
            .count();
        let deployment = run.deployment.clone();
        let steps = run.steps.clone();
        let mut released = steps
            .iter()
            .filter(|id| {
                self.step(**id)
                    .is_some_and(|s| !matches!(s.phase, StepPhase::Surge(_)))
            })
            .count();
        for id in steps {
            let Some(drain) = self.nodes.get(&id.node).map(|n| n.drain) else {
                continue;
            };
            let disable_eviction = self.drains.get(&drain).is_some_and(|d| d.disable_eviction);
            let Some(step) = self.step_mut(id) else {
                continue;
            };
            if !matches!(step.phase, StepPhase::Surge(_)) {
                continue;
            }
            if ready > released {
                released += 1;
                step.phase = if disable_eviction {
                    StepPhase::Delete(DeleteReason::Asked)
                } else {
                    StepPhase::Evict
                };
                step.retry.now = true;
                step.blocker = None;
                self.emit(
                    id,
                    PodChange::ReplacementReady {
                        deployment: deployment.clone(),
                    },
                );
            } else {
                self.block(
                    id,
                    Blocker::SurgeNotReady {
                        deployment: deployment.clone(),
                        ready,
                        wanted: released + 1,
                    },
                );
            }
        }
    }

    fn surges_of(&self, id: StepId) -> Vec<SurgeId> {
        self.surges
            .iter()
            .filter(|(_, s)| s.steps.contains(&id))
            .map(|(&surge, _)| surge)
            .collect()
    }

    // --- load balancers ---

    /// Step `id` would be evicted (gated by `gate`) or deleted now. If a load balancer may still
    /// route new connections to it, its own targets start leaving their groups, the PDB budget
    /// is reserved, and it waits ([`Machine::load_balancer_waits`]); returns whether it does.
    fn wait_for_load_balancers(
        &mut self,
        id: StepId,
        gate: Option<PdbKey>,
        now: Timestamp,
    ) -> bool {
        let Some(run) = self.nodes.get(&id.node) else {
            return false;
        };
        let step = &run.steps[id.index.0];
        // A deletion past the deadline, or one that completes an approved eviction, does not
        // wait: the instance goes regardless, or the pod is already counted as gone.
        if step.lb_clear
            || matches!(
                step.phase,
                StepPhase::Delete(DeleteReason::DeadlineOverride(_))
                    | StepPhase::Delete(DeleteReason::CompleteEviction { .. })
            )
        {
            return false;
        }
        let targets = &run.plan.steps[id.index.0].load_balancer;
        for target in targets {
            self.lb_groups
                .entry(target.target.group_arn.clone())
                .or_default();
        }
        // Instance targets left with the node at cordon; an IP target is the pod's own.
        self.actions.extend(deregistrations(
            targets
                .iter()
                .filter(|t| t.deregistered_by_nodedrain && t.target_type == TargetType::Ip),
        ));
        let gate = self.reserve(gate);
        self.requests.insert(
            id,
            Request::LoadBalancer {
                gate,
                since: now,
                until: None,
            },
        );
        let step = self.step_mut(id).expect("step looked up above");
        step.retry.now = false;
        step.retry.at = None;
        true
    }

    /// Decides every load-balancer wait: still held, or over (the targets are out of service,
    /// their delay has passed, or the deadline has come), in which case the step's request goes
    /// out with the budget it reserved.
    fn load_balancer_waits(&mut self, now: Timestamp) {
        let waiting: Vec<(StepId, Timestamp)> = self
            .requests
            .iter()
            .filter_map(|(id, r)| match r {
                Request::LoadBalancer { since, .. } => Some((*id, *since)),
                _ => None,
            })
            .collect();
        for (id, since) in waiting {
            let Some(run) = self.nodes.get(&id.node) else {
                continue;
            };
            let step = &run.steps[id.index.0];
            if step.is_gone() || step.deleting {
                // Gone or deleted by someone else meanwhile: nothing to send.
                self.answered(id);
                continue;
            }
            let node_since = run.record.started.min(since);
            let plan = &run.plan.steps[id.index.0];
            let observed: Vec<Observed> = plan
                .load_balancer
                .iter()
                .map(|t| Observed {
                    target: t.target.clone(),
                    state: self.target_state(&t.target).unwrap_or(t.state),
                    deregistration_delay: t.deregistration_delay,
                    since: match t.target_type {
                        TargetType::Instance => node_since,
                        TargetType::Ip => since,
                    },
                })
                .collect();
            let latest_start = if run.forcing() {
                plan.latest_start
            } else {
                None
            };
            let ended = match wait::decide(&observed, now, latest_start) {
                Decision::Hold {
                    until,
                    target,
                    state,
                } => {
                    if let Some(Request::LoadBalancer { until: u, .. }) = self.requests.get_mut(&id)
                    {
                        *u = Some(until);
                    }
                    self.block(
                        id,
                        Blocker::LoadBalancer {
                            group: group_name(&target.group_arn).to_string(),
                            target: format!("{}:{}", target.id, target.port),
                            state: state.to_string(),
                            until,
                        },
                    );
                    continue;
                }
                Decision::Clear => None,
                Decision::DelayElapsed { target, state } => {
                    Some((LoadBalancerCut::DelayElapsed, target, state))
                }
                Decision::DeadlineOverride { target, state } => {
                    Some((LoadBalancerCut::Deadline, target, state))
                }
            };
            self.end_load_balancer_wait(id, ended, now);
        }
    }

    /// A wait is over: the step's request goes out now, with the budget it reserved. A wait
    /// cut short (`cut`) is reported as an Event and a progress change, never silently.
    fn end_load_balancer_wait(
        &mut self,
        id: StepId,
        cut: Option<(LoadBalancerCut, Target, TargetState)>,
        now: Timestamp,
    ) {
        let Some(Request::LoadBalancer { gate, .. }) = self.requests.remove(&id) else {
            return;
        };
        let Some(run) = self.nodes.get_mut(&id.node) else {
            return;
        };
        let grace = run.plan.grace_at(id.index, now).unwrap_or(1);
        let drain = run.drain;
        let step = &mut run.steps[id.index.0];
        step.lb_clear = true;
        step.blocker = None;
        if let Some((reason, target, state)) = cut {
            let event = DrainEvent::load_balancer_wait_cut(
                step.pod.object_ref(&()),
                group_name(&target.group_arn),
                &format!("{}:{}", target.id, target.port),
                &state.to_string(),
                reason,
            );
            self.actions.push(Action::Publish { drain, event });
            self.emit(
                id,
                PodChange::LoadBalancerWaitCut {
                    reason,
                    group: group_name(&target.group_arn).to_string(),
                    target: format!("{}:{}", target.id, target.port),
                    state: state.to_string(),
                },
            );
        }
        let phase = self.step(id).map(|s| s.phase.clone());
        match phase {
            Some(StepPhase::Evict) => self.send_reserved_evict(id, grace, gate),
            Some(StepPhase::Delete(_)) => {
                // A deletion spends no budget: give back what was reserved.
                if let Some((key, _)) = gate
                    && let Some(live) = self.pdbs.get_mut(&key)
                {
                    live.in_flight = live.in_flight.saturating_sub(1);
                    self.pdb_changed(&key, false);
                }
                self.send_delete(id, grace);
            }
            _ => {
                if let Some((key, _)) = gate
                    && let Some(live) = self.pdbs.get_mut(&key)
                {
                    live.in_flight = live.in_flight.saturating_sub(1);
                    self.pdb_changed(&key, false);
                }
            }
        }
    }

    /// The last known state of a target: what `DescribeTargetHealth` said, unless this machine
    /// deregistered it after that question was asked (then `draining`); `None` when neither is
    /// known.
    fn target_state(&self, target: &Target) -> Option<TargetState> {
        let group = self.lb_groups.get(&target.group_arn);
        let observed = group.and_then(|g| {
            let states = g.states.as_ref()?;
            Some((
                states.get(target).copied().unwrap_or(TargetState::Gone),
                g.states_asked_at,
            ))
        });
        match (observed, self.deregistered.get(target)) {
            (Some((state, Some(asked))), Some(deregistered)) if asked >= *deregistered => {
                Some(state)
            }
            (_, Some(_)) => Some(TargetState::Draining),
            (Some((state, _)), None) => Some(state),
            (None, None) => None,
        }
    }

    /// The groups steps wait on (a load-balancer wait, or a surge whose replacement must be
    /// healthy in the old pod's groups).
    fn wanted_groups(&self) -> BTreeSet<String> {
        let mut wanted = BTreeSet::new();
        for (&node, run) in &self.nodes {
            for (i, step) in run.steps.iter().enumerate() {
                let id = StepId {
                    node,
                    index: StepIndex(i),
                };
                let waiting = matches!(self.requests.get(&id), Some(Request::LoadBalancer { .. }))
                    || matches!(step.phase, StepPhase::Surge(_));
                if waiting {
                    wanted.extend(
                        run.plan.steps[i]
                            .load_balancer
                            .iter()
                            .map(|t| t.target.group_arn.clone()),
                    );
                }
            }
        }
        wanted
    }

    /// Asks the wanted groups again every [`LB_POLL`]; forgets the others.
    fn ask_target_groups(&mut self, now: Timestamp) {
        let wanted = self.wanted_groups();
        self.lb_groups.retain(|arn, _| wanted.contains(arn));
        for arn in wanted {
            let group = self.lb_groups.entry(arn.clone()).or_default();
            let due = group.asked_at.is_none_or(|t| now >= after(t, LB_POLL));
            if !group.asking && due {
                group.asking = true;
                group.asked_at = Some(now);
                self.actions
                    .push(Action::DescribeTargetHealth { group: arn });
            }
        }
    }

    fn on_target_health(
        &mut self,
        group: String,
        result: Result<Vec<(Target, TargetState)>, Failure>,
    ) {
        let Some(live) = self.lb_groups.get_mut(&group) else {
            return;
        };
        live.asking = false;
        // A failed ask keeps the last answer: the waits still end by their delay or deadline.
        if let Ok(registered) = result {
            live.states = Some(registered.into_iter().collect());
            live.states_asked_at = live.asked_at;
        }
        let surges: Vec<SurgeId> = self.surges.keys().copied().collect();
        for surge in surges {
            self.check_surge(surge);
        }
    }

    /// Whether a surge replacement serves where the pod it replaces did: `healthy` in each of
    /// the IP-target groups of `step` (Ready is not enough while the load balancer's health
    /// check has not passed). Pods that are no IP target need nothing more than Ready.
    fn replacement_serves(&self, step: StepId, replacement: &Pod) -> bool {
        let Some(plan) = self
            .nodes
            .get(&step.node)
            .and_then(|r| r.plan.steps.get(step.index.0))
        else {
            return true;
        };
        let groups: Vec<&str> = plan
            .load_balancer
            .iter()
            .filter(|t| t.target_type == TargetType::Ip)
            .map(|t| t.target.group_arn.as_str())
            .collect();
        if groups.is_empty() {
            return true;
        }
        let ips: Vec<&str> = replacement
            .status
            .iter()
            .flat_map(|s| {
                s.pod_ips
                    .iter()
                    .flatten()
                    .map(|ip| ip.ip.as_str())
                    .chain(s.pod_ip.as_deref())
            })
            .collect();
        let observed: Vec<Observed> = groups
            .iter()
            .filter_map(|g| self.lb_groups.get(*g)?.states.as_ref())
            .flat_map(|states| states.iter())
            .filter(|(target, _)| ips.contains(&target.id.as_str()))
            .map(|(target, state)| Observed {
                target: target.clone(),
                state: *state,
                deregistration_delay: Duration::ZERO,
                since: Timestamp::MIN,
            })
            .collect();
        wait::replacement_serves(&groups, &observed)
    }

    // --- the deadline ---

    /// Deletes blocked pods whose last safe moment has come (involuntary drains only).
    fn deadline_overrides(&mut self, now: Timestamp) {
        for id in self.step_ids() {
            if self.requests.contains_key(&id) {
                continue;
            }
            let run = &self.nodes[&id.node];
            if !run.forcing() {
                continue;
            }
            let step = &run.steps[id.index.0];
            if step.overridden {
                continue;
            }
            let blocker = match step.phase {
                // Evictions get their try first: they may well pass.
                StepPhase::Evict if step.blocker.is_some() => step.blocker.clone(),
                StepPhase::Surge(_) | StepPhase::Hold(_) => step.blocker.clone(),
                StepPhase::Wait => Some(Blocker::StillRunning),
                _ => continue,
            };
            let Some(grace) = run.plan.must_override(id.index, now) else {
                continue;
            };
            let step = self.step_mut(id).expect("step listed above");
            step.overridden = true;
            step.phase = StepPhase::Delete(DeleteReason::DeadlineOverride(blocker));
            self.send_delete(id, grace);
        }
    }

    // --- approved evictions that never happened ---

    /// Whether step `id` may have its approved eviction completed: not leaving already, and no
    /// request of this machine for it in flight (whose own answer will say what happened).
    fn completable(&self, id: StepId) -> bool {
        !self.requests.contains_key(&id)
            && self.step(id).is_some_and(|s| {
                !s.deleting && !matches!(s.phase, StepPhase::Terminating | StepPhase::Gone { .. })
            })
    }

    /// A pod of a running drain listed in its PDB's `disruptedPods` has had its eviction approved
    /// and its budget charged. If the pod still has no deletionTimestamp after
    /// [`EVICTION_SETTLE`], the request that approved it never deleted it (cut off with its
    /// sender), and the budget stays spent until the disruption controller expires the entry
    /// (two minutes). Deleting it with its grace and a UID precondition finishes that eviction.
    fn complete_approved_evictions(&mut self, now: Timestamp) {
        let mut due = Vec::new();
        for (key, live) in &self.pdbs {
            for (name, evicted) in disrupted_pods(&live.pdb) {
                if now < after(evicted, EVICTION_SETTLE) {
                    continue;
                }
                let pod = PodRef {
                    namespace: key.0.clone(),
                    name,
                };
                if let Some(&id) = self.by_pod.get(&pod)
                    && self.completable(id)
                {
                    due.push((id, key.1.clone()));
                }
            }
        }
        for (id, pdb) in due {
            let Some(grace) = self.nodes[&id.node].plan.grace_at(id.index, now) else {
                continue;
            };
            let run = self.nodes.get_mut(&id.node).expect("step found above");
            if run.progress.get(id.index) == StepState::NotStarted {
                run.progress.set(id.index, StepState::Started);
            }
            let step = &mut run.steps[id.index.0];
            step.started_at.get_or_insert(now);
            step.phase = StepPhase::Delete(DeleteReason::CompleteEviction { pdb });
            self.send_delete(id, grace);
        }
    }

    // --- requests ---

    /// The PDBs covering step `id`, from the cache when it is current.
    fn covering(&mut self, id: StepId) -> Vec<PdbKey> {
        let Some(step) = self.step(id) else {
            return Vec::new();
        };
        if let Some(keys) = &step.covering {
            return keys.clone();
        }
        let namespace = step.key.namespace.clone();
        let keys: Vec<PdbKey> = self
            .pdbs
            .range((namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == namespace)
            .filter(|(_, live)| policy::pdb_matches_pod(&live.pdb, &step.pod))
            .map(|(key, _)| key.clone())
            .collect();
        if let Some(step) = self.step_mut(id) {
            step.covering = Some(keys.clone());
        }
        keys
    }

    fn gate(&mut self, id: StepId) -> Gate {
        let covering = self.covering(id);
        let matching: Vec<(&PdbKey, &PdbState)> = covering
            .iter()
            .filter_map(|key| self.pdbs.get_key_value(key))
            .collect();
        let health = self.step(id).map(|s| s.health);
        match matching.as_slice() {
            [] => Gate::Open,
            // The apiserver evicts it without spending the budget (a not-Ready pod under
            // AlwaysAllow, say): nothing to gate or count.
            [(_, live)]
                if health.is_some_and(|h| policy::budget_bypass(h, &live.pdb).is_some()) =>
            {
                Gate::Open
            }
            [(key, live)] => match live.budget() {
                Some(budget) if budget <= 0 => Gate::Closed(Blocker::Pdb {
                    name: live.name(),
                    disruptions_allowed: live.allowed(),
                    message: (live.allowed().unwrap_or(0) > 0)
                        .then(|| "taken by this drain's evictions in progress".to_string()),
                }),
                _ if live.in_flight >= self.config.evictions_per_pdb => Gate::Busy(Blocker::Pdb {
                    name: live.name(),
                    disruptions_allowed: live.allowed(),
                    message: Some("waiting for this drain's evictions in progress".to_string()),
                }),
                // A budget to spend, or none computed yet (only the Eviction API can say).
                _ => Gate::Pdb((*key).clone()),
            },
            _ => Gate::Multiple,
        }
    }

    fn attempt(&mut self, now: Timestamp) {
        // Until the PDB watch has listed once, no budget is known: an eviction sent now could
        // not be gated. Deletions (which bypass PDBs) need no budget.
        let pdbs_known = self.pdbs_listed;
        for id in self.step_ids() {
            if self.requests.contains_key(&id) {
                continue;
            }
            let step = &self.nodes[&id.node].steps[id.index.0];
            if !matches!(step.phase, StepPhase::Evict | StepPhase::Delete(_)) {
                continue;
            }
            let due = step.retry.at.is_some_and(|at| at <= now);
            if !(step.retry.now || due) {
                continue;
            }
            let grace = self.nodes[&id.node]
                .plan
                .grace_at(id.index, now)
                .unwrap_or(1);
            if matches!(step.phase, StepPhase::Delete(_)) {
                if !self.wait_for_load_balancers(id, None, now) {
                    self.send_delete(id, grace);
                }
                continue;
            }
            if !pdbs_known {
                continue;
            }
            let has_blocker = step.blocker.is_some();
            let gate = match self.gate(id) {
                Gate::Open => None,
                Gate::Pdb(key) => Some(key),
                // Ready to go when one of this PDB's requests answers (the answer is an input,
                // so no timer is needed meanwhile).
                Gate::Busy(blocker) => {
                    let step = self.step_mut(id).expect("step listed above");
                    step.retry.now = true;
                    step.retry.at = None;
                    self.block(id, blocker);
                    continue;
                }
                // The PDB's status says the eviction would be refused, so it is not sent: the
                // apiserver would answer 429 and spend a status write on it. The PDB's next
                // status sets `retry.now`; the backoff timer only looks again.
                Gate::Closed(blocker) => {
                    let schedule = due || self.step(id).is_some_and(|s| s.retry.at.is_none());
                    let delay = schedule.then(|| self.next_backoff(id));
                    let step = self.step_mut(id).expect("step listed above");
                    step.retry.now = false;
                    if let Some(delay) = delay {
                        step.retry.at = Some(after(now, delay));
                    }
                    self.block(id, blocker);
                    continue;
                }
                Gate::Multiple if !due && has_blocker => {
                    self.step_mut(id).expect("step listed above").retry.now = false;
                    continue;
                }
                Gate::Multiple => None,
            };
            if !self.wait_for_load_balancers(id, gate.clone(), now) {
                self.send_evict(id, grace, gate);
            }
        }
    }

    /// Counts an eviction about to go out (or a load-balancer wait before it) against its PDB.
    fn reserve(&mut self, gate: Option<PdbKey>) -> Option<(PdbKey, Option<i32>)> {
        gate.map(|key| {
            let live = self.pdbs.get_mut(&key);
            let allowed = live.as_ref().and_then(|l| l.allowed());
            if let Some(live) = live {
                live.in_flight += 1;
            }
            (key, allowed)
        })
    }

    fn send_evict(&mut self, id: StepId, grace: i64, gate: Option<PdbKey>) {
        let gate = self.reserve(gate);
        self.send_reserved_evict(id, grace, gate);
    }

    fn send_reserved_evict(&mut self, id: StepId, grace: i64, gate: Option<(PdbKey, Option<i32>)>) {
        self.requests.insert(id, Request::Evict { gate });
        let step = self.step_mut(id).expect("evicting a known step");
        step.retry.now = false;
        step.retry.at = None;
        let action = Action::Evict {
            step: id,
            pod: step.key.clone(),
            uid: pod_uid(&step.pod).map(str::to_string),
            grace,
        };
        self.actions.push(action);
    }

    fn send_delete(&mut self, id: StepId, grace: i64) {
        let step = self.step_mut(id).expect("deleting a known step");
        let StepPhase::Delete(reason) = step.phase.clone() else {
            return;
        };
        step.retry.now = false;
        step.retry.at = None;
        let action = Action::Delete {
            step: id,
            pod: step.key.clone(),
            uid: pod_uid(&step.pod).map(str::to_string),
            grace,
        };
        self.requests.insert(id, Request::Delete(reason));
        self.actions.push(action);
    }

    /// A request's answer: the request is no longer in flight, and its PDB's count drops.
    fn answered(&mut self, id: StepId) -> Option<Request> {
        let request = self.requests.remove(&id)?;
        if let Request::Evict {
            gate: Some((key, _)),
        }
        | Request::LoadBalancer {
            gate: Some((key, _)),
            ..
        } = &request
            && let Some(live) = self.pdbs.get_mut(key)
        {
            live.in_flight = live.in_flight.saturating_sub(1);
            // A freed turn: whatever waited for it may go.
            self.pdb_changed(&key.clone(), false);
        }
        Some(request)
    }

    fn on_evicted(
        &mut self,
        id: StepId,
        grace: i64,
        result: Result<EvictOutcome, Failure>,
        now: Timestamp,
    ) {
        let Some(Request::Evict { gate }) = self.answered(id) else {
            return;
        };
        if self.step(id).is_none_or(StepRun::is_gone) {
            return;
        }
        match result {
            Ok(EvictOutcome::Evicted) => {
                let name = self.step(id).expect("checked above").key.name.clone();
                let pdb = gate.as_ref().and_then(|(key, allowed)| {
                    let live = self.pdbs.get_mut(key)?;
                    if !live.reflected.contains(&name) {
                        live.unseen.insert(name.clone());
                    }
                    Some(PdbSeen {
                        name: live.name(),
                        disruptions_allowed: *allowed,
                    })
                });
                let step = self.step_mut(id).expect("checked above");
                step.phase = StepPhase::Terminating;
                step.blocker = None;
                self.emit(
                    id,
                    PodChange::Evicting {
                        grace_seconds: grace,
                        pdb,
                    },
                );
            }
            Ok(EvictOutcome::Gone) => self.mark_gone(id, false, now),
            Ok(EvictOutcome::PdbBlocked { pdb, message }) => {
                let step = self.step(id).expect("checked above");
                let namespace = step.key.namespace.clone();
                let pdb_name = pdb
                    .or_else(|| gate.as_ref().map(|(k, _)| k.1.clone()))
                    .or_else(|| {
                        self.nodes[&id.node].plan.steps[id.index.0]
                            .pdbs
                            .first()
                            .map(|p| p.name.clone())
                    })
                    .unwrap_or_else(|| "?".to_string());
                let allowed = self
                    .pdbs
                    .get(&(namespace, pdb_name.clone()))
                    .and_then(PdbState::allowed);
                let delay = self.next_backoff(id);
                self.step_mut(id).expect("checked above").retry.at = Some(after(now, delay));
                self.block(
                    id,
                    Blocker::Pdb {
                        name: pdb_name,
                        disruptions_allowed: allowed,
                        message: Some(message),
                    },
                );
            }
            Ok(EvictOutcome::MultiplePdbs { .. }) => {
                let names = self.covering(id).into_iter().map(|(_, n)| n).collect();
                let recheck = self.config.multiple_pdb_recheck;
                self.step_mut(id).expect("checked above").retry.at = Some(after(now, recheck));
                self.block(id, Blocker::MultiplePdbs { names });
            }
            Ok(EvictOutcome::Throttled {
                retry_after,
                message,
            }) => {
                let delay = self.next_backoff(id);
                self.step_mut(id).expect("checked above").retry.at =
                    Some(after(now, retry_after.unwrap_or(delay)));
                self.block(id, Blocker::Throttled { message });
            }
            Err(failure) => self.request_failed(id, "evict", failure, now),
        }
    }

    fn on_deleted(
        &mut self,
        id: StepId,
        grace: i64,
        result: Result<DeleteOutcome, Failure>,
        now: Timestamp,
    ) {
        let Some(Request::Delete(reason)) = self.answered(id) else {
            return;
        };
        if self.step(id).is_none_or(StepRun::is_gone) {
            return;
        }
        match result {
            Ok(DeleteOutcome::Deleted) => {
                let step = self.step_mut(id).expect("checked above");
                step.phase = StepPhase::Terminating;
                step.blocker = None;
                match reason {
                    DeleteReason::DeadlineOverride(blocker) => {
                        let run = &self.nodes[&id.node];
                        let event = DrainEvent::deadline_override(
                            run.steps[id.index.0].pod.object_ref(&()),
                            &run.name,
                            grace,
                            run.plan.deadline,
                            blocker.as_ref(),
                        );
                        let drain = run.drain;
                        self.actions.push(Action::Publish { drain, event });
                        self.emit(
                            id,
                            PodChange::DeadlineOverride {
                                grace_seconds: grace,
                                blocker,
                            },
                        );
                    }
                    DeleteReason::CompleteEviction { pdb } => {
                        let run = &self.nodes[&id.node];
                        let event = DrainEvent::eviction_completed(
                            run.steps[id.index.0].pod.object_ref(&()),
                            &pdb,
                            grace,
                        );
                        let drain = run.drain;
                        self.actions.push(Action::Publish { drain, event });
                        self.emit(
                            id,
                            PodChange::EvictionCompleted {
                                pdb,
                                grace_seconds: grace,
                            },
                        );
                    }
                    DeleteReason::Asked => self.emit(
                        id,
                        PodChange::Deleting {
                            grace_seconds: grace,
                        },
                    ),
                }
            }
            Ok(DeleteOutcome::Gone) => self.mark_gone(id, false, now),
            Err(failure) => {
                // A completion that failed is no longer owed: a retry of the eviction (or the
                // next look at the PDB) decides again.
                if matches!(reason, DeleteReason::CompleteEviction { .. })
                    && let Some(step) = self.step_mut(id)
                {
                    step.phase = StepPhase::Evict;
                }
                self.request_failed(id, "delete", failure, now)
            }
        }
    }

    fn request_failed(&mut self, id: StepId, verb: &str, failure: Failure, now: Timestamp) {
        let Some(run) = self.nodes.get(&id.node) else {
            return;
        };
        if failure.forbidden {
            let action = format!("{verb} pod {}", run.steps[id.index.0].key);
            if let Some(drain) = self.drains.get_mut(&run.drain) {
                drain.fatal.get_or_insert(Fatal { action, failure });
            }
            return;
        }
        let delay = self.next_backoff(id);
        self.step_mut(id).expect("checked above").retry.at = Some(after(now, delay));
        self.block(
            id,
            Blocker::ApiError {
                message: failure.message,
            },
        );
    }

    fn on_rollout_restarted(&mut self, surge: SurgeId, result: Result<SurgeStart, Failure>) {
        let Some(run) = self.surges.get(&surge) else {
            return;
        };
        let result = match result {
            Err(failure) if failure.forbidden => {
                let action = format!("restart Deployment {} for a surge", run.deployment);
                for id in run.steps.clone() {
                    if let Some(drain) = self
                        .nodes
                        .get(&id.node)
                        .and_then(|n| self.drains.get_mut(&n.drain))
                    {
                        drain.fatal.get_or_insert(Fatal {
                            action: action.clone(),
                            failure: failure.clone(),
                        });
                    }
                }
                return;
            }
            Err(failure) => SurgeStart::Fallback {
                reason: format!("cannot restart it: {}", failure.message),
            },
            Ok(start) => start,
        };
        let steps = run.steps.clone();
        match result {
            SurgeStart::Fallback { reason } => {
                if let Some(run) = self.surges.get_mut(&surge) {
                    run.state = SurgeState::Fallback(reason.clone());
                }
                for id in steps {
                    self.fall_back(id, reason.clone());
                }
            }
            SurgeStart::Restarted { selector, patched } => {
                let run = self.surges.get_mut(&surge).expect("looked up above");
                run.state = SurgeState::Restarted;
                let deployment = run.deployment.clone();
                let namespace = steps
                    .first()
                    .and_then(|id| self.step(*id))
                    .map(|s| s.key.namespace.clone())
                    .unwrap_or_default();
                for id in steps {
                    if matches!(self.step(id).map(|s| &s.phase), Some(StepPhase::Surge(_))) {
                        self.emit(
                            id,
                            PodChange::Surging {
                                deployment: deployment.clone(),
                                restarted: patched,
                            },
                        );
                    }
                }
                self.actions.push(Action::WatchSurgePods {
                    surge,
                    namespace,
                    selector,
                });
            }
        }
    }

    // --- watches ---

    fn on_surge_pods(&mut self, surge: SurgeId, event: WatchEvent<Pod>) {
        let Some(run) = self.surges.get_mut(&surge) else {
            return;
        };
        match event {
            WatchEvent::Init => run.relist = Some(HashSet::new()),
            WatchEvent::InitApply(pod) | WatchEvent::Apply(pod) => {
                if let Some(uid) = pod_uid(&pod).map(str::to_string) {
                    if let Some(seen) = run.relist.as_mut() {
                        seen.insert(uid.clone());
                    }
                    run.pods.insert(uid, pod);
                }
            }
            WatchEvent::InitDone => {
                if let Some(seen) = run.relist.take() {
                    run.pods.retain(|uid, _| seen.contains(uid));
                }
            }
            WatchEvent::Delete(pod) => {
                if let Some(uid) = pod_uid(&pod) {
                    run.pods.remove(uid);
                }
            }
        }
        self.check_surge(surge);
    }

    fn on_pod_event(&mut self, node: NodeId, event: WatchEvent<Pod>, now: Timestamp) {
        let Some(run) = self.nodes.get_mut(&node) else {
            return;
        };
        match event {
            WatchEvent::Init => run.relist = Some(HashSet::new()),
            WatchEvent::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (run.relist.as_mut(), pod_uid(&pod)) {
                    seen.insert(uid.to_string());
                }
                self.on_pod_apply(node, &pod, now);
            }
            WatchEvent::InitDone => {
                if let Some(seen) = run.relist.take() {
                    let vanished: Vec<StepIndex> = run
                        .by_uid
                        .iter()
                        .filter(|(uid, _)| !seen.contains(*uid))
                        .map(|(_, i)| *i)
                        .collect();
                    for index in vanished {
                        self.mark_gone(StepId { node, index }, false, now);
                    }
                }
            }
            WatchEvent::Apply(pod) => self.on_pod_apply(node, &pod, now),
            WatchEvent::Delete(pod) => {
                if let Some(&index) = pod_uid(&pod).and_then(|u| run.by_uid.get(u)) {
                    self.mark_gone(StepId { node, index }, false, now);
                }
            }
        }
    }

    fn on_pod_apply(&mut self, node: NodeId, pod: &Pod, now: Timestamp) {
        let Some(run) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(&index) = pod_uid(pod).and_then(|u| run.by_uid.get(u)) else {
            return;
        };
        let id = StepId { node, index };
        if policy::is_finished(pod) {
            self.mark_gone(id, true, now);
            return;
        }
        let health = policy::PodHealth::of(pod);
        if let Some(step) = self.step_mut(id)
            && step.health != health
        {
            step.health = health;
            // Not Ready any more may open its gate: look again now rather than at the backoff.
            if matches!(step.phase, StepPhase::Evict) {
                step.retry.now = true;
            }
        }
        if pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let in_flight = self.requests.contains_key(&id);
        let run = self.nodes.get_mut(&node).expect("looked up above");
        let step = &mut run.steps[index.0];
        step.deleting = true;
        if in_flight || matches!(step.phase, StepPhase::Terminating | StepPhase::Gone { .. }) {
            return;
        }
        if step.phase == StepPhase::NotStarted {
            step.started_at = Some(now);
            run.progress.set(index, StepState::Started);
        }
        step.phase = StepPhase::Terminating;
        step.blocker = None;
        self.emit(id, PodChange::TerminatingElsewhere);
        for surge in self.surges_of(id) {
            self.check_surge(surge);
        }
    }

    fn mark_gone(&mut self, id: StepId, completed: bool, now: Timestamp) {
        let Some(run) = self.nodes.get_mut(&id.node) else {
            return;
        };
        let step = &mut run.steps[id.index.0];
        if step.is_gone() {
            return;
        }
        let after = step.started_at.map(|s| since(now, s)).unwrap_or_default();
        step.phase = StepPhase::Gone { after, completed };
        step.blocker = None;
        step.retry = Retry::default();
        run.progress.set(id.index, StepState::Gone);
        let key = step.key.clone();
        let mut freed = Vec::new();
        for (pdb, live) in self.pdbs.iter_mut() {
            if pdb.0 == key.namespace && live.unseen.remove(&key.name) {
                freed.push(pdb.clone());
            }
        }
        // Its budget was held back for it: what was blocked on it may go now.
        for pdb in freed {
            self.pdb_changed(&pdb, false);
        }
        self.emit(id, PodChange::Gone { after, completed });
        let run = self.nodes.get_mut(&id.node).expect("looked up above");
        if !run.drained_reported && run.all_gone() {
            run.drained_reported = true;
            let after = run
                .steps
                .iter()
                .filter_map(|s| s.started_at)
                .min()
                .map(|s| since(now, s))
                .unwrap_or_default();
            self.actions.push(Action::Progress {
                drain: run.drain,
                event: ProgressEvent::NodeDrained {
                    node: run.name.clone(),
                    after,
                },
            });
        }
        // A surge step gone frees a replacement for the next old pod.
        for surge in self.surges_of(id) {
            self.check_surge(surge);
        }
    }

    fn on_pdb_event(&mut self, event: WatchEvent<PodDisruptionBudget>) {
        match event {
            WatchEvent::Init => self.pdb_relist = Some(HashSet::new()),
            WatchEvent::InitApply(pdb) => {
                if let Some(seen) = self.pdb_relist.as_mut() {
                    seen.insert(pdb_key(&pdb));
                }
                self.upsert_pdb(pdb);
            }
            WatchEvent::InitDone => {
                self.pdbs_listed = true;
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
            WatchEvent::Apply(pdb) => self.upsert_pdb(pdb),
            WatchEvent::Delete(pdb) => {
                let key = pdb_key(&pdb);
                self.pdbs.remove(&key);
                self.pdb_changed(&key, true);
            }
        }
    }

    fn upsert_pdb(&mut self, pdb: PodDisruptionBudget) {
        let key = pdb_key(&pdb);
        let membership_changed = match self.pdbs.get_mut(&key) {
            Some(live) => live.update(pdb),
            None => {
                self.pdbs.insert(key.clone(), PdbState::new(pdb));
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
        let budget = self.pdbs.get(key).and_then(PdbState::budget);
        for run in self.nodes.values_mut() {
            for step in &mut run.steps {
                if step.key.namespace != key.0 {
                    continue;
                }
                if membership_changed {
                    step.covering = None;
                }
                if step.phase != StepPhase::Evict {
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
                    step.retry.now = true;
                }
            }
        }
    }

    // --- the report ---

    fn report(&self, drain: &DrainRun, outcome: DrainOutcome, now: Timestamp) -> DrainReport {
        let nodes = drain
            .nodes
            .iter()
            .filter_map(|n| self.nodes.get(n))
            .map(|run| NodeReport {
                node: run.name.clone(),
                drained: run.all_gone(),
                phase: run.record.phase,
                pods: run
                    .plan
                    .steps
                    .iter()
                    .zip(&run.steps)
                    .enumerate()
                    .map(|(i, (plan, step))| {
                        let (gone, gone_after) = match step.phase {
                            StepPhase::Gone { after, .. } => (true, Some(after)),
                            _ => (false, None),
                        };
                        PodReport {
                            pod: step.key.clone(),
                            owner: plan.owner.clone(),
                            strategy: plan.strategy,
                            tier: plan.tier,
                            order: plan.order,
                            gone,
                            gone_after,
                            deadline_override: step.overridden,
                            blocker: (!gone).then(|| self.remaining_blocker(run, i)),
                        }
                    })
                    .collect(),
                ignored: run.plan.ignored.clone(),
                refused: run.plan.refused.clone(),
                warnings: run.plan.warnings.clone(),
            })
            .collect();
        DrainReport {
            outcome,
            elapsed: since(now, drain.began),
            nodes,
        }
    }

    /// Why a pod that did not leave is still there, with the PDB status as last seen.
    fn remaining_blocker(&self, run: &NodeRun, i: usize) -> Blocker {
        let step = &run.steps[i];
        let plan = &run.plan.steps[i];
        match &step.phase {
            StepPhase::NotStarted => Blocker::EarlierWave {
                order: plan.order,
                tier: plan.tier,
            },
            StepPhase::Terminating => Blocker::Terminating,
            StepPhase::Wait => Blocker::StillRunning,
            StepPhase::Hold(until) => Blocker::DoNotDisrupt {
                value: plan
                    .hold
                    .as_ref()
                    .map(|h| h.value.clone())
                    .unwrap_or_default(),
                until: *until,
            },
            StepPhase::Surge(_) => match &step.blocker {
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
                Some(Blocker::Pdb { name, message, .. }) => Blocker::Pdb {
                    name: name.clone(),
                    disruptions_allowed: self
                        .pdbs
                        .get(&(step.key.namespace.clone(), name.clone()))
                        .and_then(PdbState::allowed),
                    message: message.clone(),
                },
                Some(other) => other.clone(),
                None => Blocker::ApiError {
                    message: "no answer yet".to_string(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests;
