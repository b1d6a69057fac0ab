//! The drain plan: which pods leave a node, how, in which order, and by when; and the pure
//! decision of which steps may start now.
//!
//! Nothing here does I/O or reads a clock. The executor lists pods and PDBs, calls [`plan`] once,
//! then loops: report each step's [`StepState`] in a [`Progress`], act on
//! [`Plan::due_to_start`], and for steps still blocked ask [`Plan::must_override`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::lb::targets::{LoadBalancerView, PodTarget, TargetType, served_by};

use super::policy::{self, AnnotationWarning, ClusterPolicy, LabelSelectorExpr, Strategy};

/// Annotation the Deployment controller keeps on its ReplicaSets: the Deployment's replicas.
const DEPLOYMENT_DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";

/// Which Deployment owns which ReplicaSet, and how many replicas it wants. Pods only name their
/// ReplicaSet, and `surge` must act on the Deployment, so the executor builds this from the
/// ReplicaSets it lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owners {
    /// (namespace, ReplicaSet name) → Deployment name.
    deployments: BTreeMap<(String, String), String>,
    /// (namespace, ReplicaSet name) → its desired replicas.
    replicas: BTreeMap<(String, String), i32>,
}

impl Owners {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        namespace: impl Into<String>,
        replica_set: impl Into<String>,
        deployment: impl Into<String>,
    ) {
        self.deployments
            .insert((namespace.into(), replica_set.into()), deployment.into());
    }

    pub fn set_replicas(
        &mut self,
        namespace: impl Into<String>,
        replica_set: impl Into<String>,
        replicas: i32,
    ) {
        self.replicas
            .insert((namespace.into(), replica_set.into()), replicas);
    }

    /// The desired replicas of a ReplicaSet, as last listed.
    pub fn replicas_of(&self, namespace: &str, replica_set: &str) -> Option<i32> {
        self.replicas
            .get(&(namespace.to_string(), replica_set.to_string()))
            .copied()
    }

    /// From listed ReplicaSets, via their controller owner reference of kind Deployment.
    pub fn from_replica_sets<'a>(replica_sets: impl IntoIterator<Item = &'a ReplicaSet>) -> Self {
        let mut owners = Self::new();
        for rs in replica_sets {
            let controller = rs
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|r| r.controller == Some(true) && r.kind == "Deployment");
            if let (Some(ns), Some(name), Some(deployment)) = (
                rs.metadata.namespace.as_deref(),
                rs.metadata.name.as_deref(),
                controller,
            ) {
                owners.insert(ns, name, deployment.name.clone());
                // The Deployment controller writes its desired count on each of its
                // ReplicaSets, so a metadata-only list carries it.
                let desired = rs
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEPLOYMENT_DESIRED_REPLICAS))
                    .and_then(|v| v.parse().ok())
                    .or_else(|| rs.spec.as_ref().and_then(|s| s.replicas));
                if let Some(replicas) = desired {
                    owners.set_replicas(ns, name, replicas);
                }
            }
        }
        owners
    }

    pub fn deployment_of(&self, namespace: &str, replica_set: &str) -> Option<&str> {
        self.deployments
            .get(&(namespace.to_string(), replica_set.to_string()))
            .map(String::as_str)
    }
}

/// What to do with DaemonSet pods, mirroring kubectl's `--ignore-daemonsets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonSetHandling {
    /// kubectl without `--ignore-daemonsets`: the drain is refused.
    Refuse,
    /// kubectl with `--ignore-daemonsets`; nodedrain's default, since the DaemonSet controller
    /// would put an evicted pod straight back on the cordoned node.
    #[default]
    Ignore,
    /// Remove them too, in the last tier (useful when a node agent must stop last, e.g. a log
    /// shipper flushing the other pods' logs).
    Drain,
}

/// Node-level options, with kubectl drain's semantics where kubectl has the same flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    pub daemonsets: DaemonSetHandling,
    /// Allow pods with emptyDir volumes (their data is lost); else they are refused.
    pub delete_emptydir_data: bool,
    /// Allow pods without a controller (nothing recreates them); else they are refused.
    pub force: bool,
    /// Delete instead of evicting, bypassing PDBs (kubectl `--disable-eviction`).
    pub disable_eviction: bool,
    /// `--grace-period`: beats every annotation and the pod's own grace, because the person at
    /// the keyboard decides for this run. Negative means unset, as in kubectl.
    pub grace_period_override: Option<i64>,
    /// Voluntary drains (CLI, rebalance recommendation) honour the Karpenter / autoscaler
    /// opt-outs and never override PDBs. Defaults to `true` so that forgetting to set it can
    /// only make a drain too careful, never delete past a PDB.
    pub voluntary: bool,
    /// Slack kept between the last SIGTERM's grace and the deadline. It absorbs the API round
    /// trips and backoff between deciding and the kubelet acting, clock skew between us and the
    /// cloud's termination clock, and the kubelet's SIGKILL path. 10 s covers a few throttled
    /// calls while leaving 110 s of a 2-minute spot warning to the pods.
    pub margin: Duration,
    /// `--pod-selector`: pods not matching are left alone (ignored, not refused).
    pub pod_selector: Option<LabelSelectorExpr>,
    /// Surge, rather than evict, a Deployment pod whose eviction would wait or be an outage:
    /// its only PDB allows no disruption right now (a single replica under `minAvailable: 1`),
    /// or it has no PDB and its Deployment runs one replica. Not when an annotation or policy
    /// rule chose its strategy. For drains with time to spare (a rebalance recommendation
    /// handed over to Karpenter): the pod moves without downtime.
    pub surge_when_blocked: bool,
}

/// See [`PlanOptions::margin`].
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(10);

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            daemonsets: DaemonSetHandling::default(),
            delete_emptydir_data: false,
            force: false,
            disable_eviction: false,
            grace_period_override: None,
            voluntary: true,
            margin: DEFAULT_MARGIN,
            pod_selector: None,
            surge_when_blocked: false,
        }
    }
}

/// Everything the planner looks at; borrowed, so building a plan copies nothing it need not.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Pods on the node(s) being drained.
    pub pods: &'a [Pod],
    /// PDBs of (at least) the pods' namespaces.
    pub pdbs: &'a [PodDisruptionBudget],
    pub owners: &'a Owners,
    pub policy: &'a ClusterPolicy,
    pub options: &'a PlanOptions,
    pub now: Timestamp,
    /// When the node dies (involuntary drains). `None`: no deadline, nothing is ever forced.
    pub deadline: Option<Timestamp>,
}

/// Built-in order after `nodedrain.io/order`: workloads first, then the critical pods they
/// depend on (DNS, CNI...), then DaemonSet pods (only with [`DaemonSetHandling::Drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Workload,
    Critical,
    DaemonSet,
}

impl Tier {
    /// A bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Workload => "workload",
            Tier::Critical => "critical",
            Tier::DaemonSet => "daemonset",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pod's controller, resolved to the Deployment when its ReplicaSet belongs to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerSummary {
    pub kind: String,
    pub name: String,
}

impl fmt::Display for OwnerSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// A PDB covering a step's pod, as it was when planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PdbRef {
    pub name: String,
    /// `status.disruptionsAllowed`; `None` until the disruption controller has computed it.
    pub disruptions_allowed: Option<i32>,
}

/// A `karpenter.sh/do-not-disrupt` duration holding a step back on a voluntary drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DoNotDisruptHold {
    /// The annotation's value, e.g. `30m`.
    pub value: String,
    /// The step does nothing to the pod before this moment, then carries out its strategy: the
    /// pod's `status.startTime` plus the duration, as Karpenter reckons it (the plan's time plus
    /// the duration for a pod that has no start time yet, so the wait stays bounded).
    pub until: Timestamp,
    /// Whether `until` counts from the pod's start time (else from the plan's time).
    pub from_pod_start: bool,
}

impl fmt::Display for DoNotDisruptHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={} holds it until {} ({} after {})",
            crate::names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
            self.value,
            self.until,
            self.value,
            if self.from_pod_start {
                "the pod started"
            } else {
                "the drain started, the pod has no start time"
            }
        )
    }
}

/// Index of a step in [`Plan::steps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StepIndex(pub usize);

/// One pod that must leave the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    /// For the Eviction / Delete UID precondition, so a same-named successor is never hit.
    pub uid: Option<String>,
    /// `None` for bare pods.
    pub owner: Option<OwnerSummary>,
    /// Effective strategy: never `Skip` (those are ignored); `Evict` already turned into
    /// `Delete` under `disable_eviction`, and `Surge` into `Evict` for non-Deployment pods.
    /// A `Surge` step under `disable_eviction` ends with a delete instead of an eviction.
    pub strategy: Strategy,
    pub order: i32,
    pub tier: Tier,
    /// Index into [`Plan::waves`].
    pub wave: usize,
    /// Grace to request if the step starts at plan time; always >= 1 because 0 is a force
    /// deletion, which drops the pod from the API before its containers have stopped. With a
    /// deadline it never exceeds `deadline - now - margin`. Starting later? Use
    /// [`Plan::grace_at`].
    pub grace_seconds: i64,
    /// `deadline - grace_seconds - margin`: the last moment SIGTERM may be sent for the pod to
    /// get its full grace. `None` without a deadline.
    pub latest_start: Option<Timestamp>,
    /// PDBs covering the pod, sorted by name.
    pub pdbs: Vec<PdbRef>,
    /// More than one PDB: the Eviction API refuses to evict such a pod at all.
    pub multiple_pdbs: bool,
    /// Already has a deletionTimestamp: the executor only needs to wait for it to go.
    pub terminating: bool,
    /// Why this strategy and tier, for humans.
    pub reason: String,
    /// On a voluntary drain, a `karpenter.sh/do-not-disrupt` duration that has not elapsed yet:
    /// once started, the step waits until then before it carries out `strategy`.
    pub hold: Option<DoNotDisruptHold>,
    /// What, as planned, will stop the step from completing; `None` when nothing known does.
    pub blocker: Option<String>,
    /// The ELBv2 targets the pod serves through (empty: none, or load balancers not checked):
    /// its eviction waits until none of them is routed new connections ([`crate::lb::wait`]).
    /// Filled in by the executor after planning, from `DescribeTargetHealth`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer: Vec<PodTarget>,
}

/// A run of consecutive steps with the same (order, tier). A wave starts once every pod of every
/// earlier wave is gone (not merely evicted: a terminating pod still serves its clients), or
/// step by step as the deadline forces each one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wave {
    pub order: i32,
    pub tier: Tier,
    /// Indices into [`Plan::steps`].
    pub steps: Range<usize>,
}

/// Why a pod on the node is left where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum IgnoreReason {
    /// Not matched by `--pod-selector`.
    NotSelected,
    /// A static pod's mirror; the kubelet owns it.
    MirrorPod,
    /// Succeeded or Failed: nothing runs.
    Finished,
    /// DaemonSet-managed, with [`DaemonSetHandling::Ignore`].
    DaemonSet,
    /// Strategy `skip`; `source` says where that came from.
    Skip { source: String },
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::NotSelected => f.write_str("not matched by --pod-selector"),
            IgnoreReason::MirrorPod => {
                f.write_str("mirror pod (static pod managed by the kubelet)")
            }
            IgnoreReason::Finished => f.write_str("finished (Succeeded or Failed)"),
            IgnoreReason::DaemonSet => f.write_str("DaemonSet-managed (ignored)"),
            IgnoreReason::Skip { source } => write!(f, "strategy skip ({source})"),
        }
    }
}

/// Why a pod stops the drain unless a flag allows it, in kubectl's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RefusalReason {
    DaemonSet,
    BarePod,
    EmptyDir,
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalReason::DaemonSet => "DaemonSet-managed; use --ignore-daemonsets",
            RefusalReason::BarePod => "bare pod (no controller); use --force",
            RefusalReason::EmptyDir => {
                "uses emptyDir (local data is deleted); use --delete-emptydir-data"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IgnoredPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub reason: IgnoreReason,
}

/// A pod that needs a flag. Like kubectl, the executor should not start a drain while any pod
/// is refused (or the node ends half-drained); the planner only reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// Every reason at once, so one rerun with the right flags is enough. Never empty.
    pub reasons: Vec<RefusalReason>,
}

/// Something about a pod the owner should fix; the plan went ahead with a fallback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum WarningKind {
    /// Unusable annotation value; the next source applied.
    Annotation(AnnotationWarning),
    /// `surge` asked for a pod that no known Deployment owns; it is evicted instead.
    SurgeWithoutDeployment { owner: Option<OwnerSummary> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanWarning {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub kind: WarningKind,
}

impl fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: ", self.namespace, self.name)?;
        match &self.kind {
            WarningKind::Annotation(w) => write!(f, "{w}"),
            WarningKind::SurgeWithoutDeployment { owner: Some(owner) } => write!(
                f,
                "strategy surge needs a Deployment pod, owner is {owner}; evicting instead"
            ),
            WarningKind::SurgeWithoutDeployment { owner: None } => {
                write!(
                    f,
                    "strategy surge needs a Deployment pod, pod is bare; evicting instead"
                )
            }
        }
    }
}

/// The whole plan. Every input pod is in exactly one of `steps`, `ignored`, `refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Sorted by (order, tier, namespace, name, uid), so plans are deterministic.
    pub steps: Vec<PodPlan>,
    /// Partition of `steps` into consecutive runs, in order.
    pub waves: Vec<Wave>,
    pub ignored: Vec<IgnoredPod>,
    pub refused: Vec<RefusedPod>,
    pub warnings: Vec<PlanWarning>,
    // The inputs the executor's loop still needs, kept here so that loop needs only the plan.
    pub deadline: Option<Timestamp>,
    pub margin: SignedDuration,
    /// Voluntary plans never override PDBs ([`Plan::must_override`] is always `None`).
    pub voluntary: bool,
    /// Surge steps end with a delete instead of an eviction.
    pub disable_eviction: bool,
    /// The node's own instance targets in the watched target groups, taken out of their load
    /// balancers at cordon (by the exclude label, or by nodedrain for configured groups).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub node_targets: Vec<PodTarget>,
    /// Why load balancers were not checked for this plan, when they were not (an ELBv2 error:
    /// the drain goes on without load-balancer waits rather than not at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancers_unchecked: Option<String>,
}

/// Where one step is, as the executor last observed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StepState {
    #[default]
    NotStarted,
    /// Evicted, deleted, surging or waiting: the executor has acted, the pod is still there.
    Started,
    /// The pod no longer exists (or its UID changed).
    Gone,
}

/// Per-step states, indexed like [`Plan::steps`]. Made by [`Plan::progress`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    states: Vec<StepState>,
}

impl Progress {
    /// States of steps the progress does not know of read as `NotStarted`.
    pub fn get(&self, step: StepIndex) -> StepState {
        self.states.get(step.0).copied().unwrap_or_default()
    }

    /// Out-of-range indices are ignored: they can only come from another plan.
    pub fn set(&mut self, step: StepIndex, state: StepState) {
        if let Some(slot) = self.states.get_mut(step.0) {
            *slot = state;
        }
    }

    pub fn states(&self) -> &[StepState] {
        &self.states
    }
}

fn to_signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

/// Seconds left for a pod's grace when SIGTERM goes out at `now`: `deadline - now - margin`,
/// rounded down (a rounded-up grace would end after the deadline).
fn remaining_seconds(deadline: Timestamp, now: Timestamp, margin: SignedDuration) -> i64 {
    deadline
        .duration_since(now)
        .saturating_sub(margin)
        .as_secs()
}

fn clamp_grace(
    grace: i64,
    deadline: Option<Timestamp>,
    now: Timestamp,
    margin: SignedDuration,
) -> i64 {
    let grace = match deadline {
        Some(deadline) => grace.min(remaining_seconds(deadline, now, margin)),
        None => grace,
    };
    grace.max(1)
}

impl Plan {
    pub fn step(&self, step: StepIndex) -> Option<&PodPlan> {
        self.steps.get(step.0)
    }

    /// A fresh progress: every step not started.
    pub fn progress(&self) -> Progress {
        Progress {
            states: vec![StepState::NotStarted; self.steps.len()],
        }
    }

    /// Every step gone: the drain is done.
    pub fn is_complete(&self, progress: &Progress) -> bool {
        (0..self.steps.len()).all(|i| progress.get(StepIndex(i)) == StepState::Gone)
    }

    /// Not-started steps that may start at `now`, in plan order: those whose earlier waves are
    /// all gone, and, whatever the waves, those whose `latest_start` has come (waiting longer
    /// would cut into their grace before the deadline). Call it again whenever a state changes
    /// or time passes; it is cheap (linear) and has no memory.
    pub fn due_to_start(&self, progress: &Progress, now: Timestamp) -> Vec<StepIndex> {
        let mut due = Vec::new();
        let mut earlier_gone = true;
        for wave in &self.waves {
            let mut wave_gone = true;
            for i in wave.steps.clone() {
                let index = StepIndex(i);
                let state = progress.get(index);
                wave_gone &= state == StepState::Gone;
                let forced = self
                    .steps
                    .get(i)
                    .and_then(|s| s.latest_start)
                    .is_some_and(|l| now >= l);
                if state == StepState::NotStarted && (earlier_gone || forced) {
                    due.push(index);
                }
            }
            earlier_gone &= wave_gone;
        }
        due
    }

    /// Grace to request for a step whose SIGTERM goes out at `now`: its planned grace, cut so
    /// that it still ends `margin` before the deadline; at least 1.
    pub fn grace_at(&self, step: StepIndex, now: Timestamp) -> Option<i64> {
        let plan = self.step(step)?;
        Some(clamp_grace(
            plan.grace_seconds,
            self.deadline,
            now,
            self.margin,
        ))
    }

    /// Adds what the load balancers route to this node and its pods: each step's targets
    /// ([`served_by`]) and the node's own instance targets. `pods`: those the plan was made
    /// from; `instance_id`: the node's EC2 instance, when known; `now`: when deregistration
    /// begins (the drain's start), to say which waits the deadline will cut.
    pub fn attach_load_balancers(
        &mut self,
        pods: &[Pod],
        instance_id: Option<&str>,
        view: &LoadBalancerView,
        now: Timestamp,
    ) {
        let voluntary = self.voluntary;
        let by_uid: BTreeMap<&str, &Pod> = pods
            .iter()
            .filter_map(|p| Some((p.metadata.uid.as_deref()?, p)))
            .collect();
        for step in &mut self.steps {
            let Some(pod) = step.uid.as_deref().and_then(|uid| by_uid.get(uid)) else {
                continue;
            };
            let latest_start = step.latest_start.filter(|_| !voluntary);
            step.load_balancer = served_by(pod, instance_id, view.pairs())
                .into_iter()
                .filter_map(|target| view.pod_target(target))
                .map(|mut target| {
                    target.short_by = target
                        .state
                        .routes_new_connections()
                        .then(|| {
                            crate::lb::wait::shortfall(
                                target.deregistration_delay,
                                now,
                                latest_start,
                            )
                        })
                        .flatten();
                    target
                })
                .collect();
        }
        self.node_targets = view
            .pairs()
            .filter(|(group, target)| {
                group.target_type == TargetType::Instance && instance_id == Some(target.id.as_str())
            })
            .filter_map(|(_, target)| view.pod_target(target.clone()))
            .collect();
    }

    /// For a step the executor reports as still blocked (PDB 429, surge replacement not Ready,
    /// `wait` pod still running): `Some(grace)` when the deadline says to stop asking and delete
    /// it now with that grace (`max(1, min(grace, deadline - now - margin))`); else `None`.
    ///
    /// Always `None` without a deadline and on voluntary drains: PDBs are overridden only when
    /// the node dies regardless. The executor should emit a `DeadlineOverride` Event when it acts.
    pub fn must_override(&self, step: StepIndex, now: Timestamp) -> Option<i64> {
        if self.voluntary || self.deadline.is_none() {
            return None;
        }
        let plan = self.step(step)?;
        if plan.latest_start.is_some_and(|l| now >= l) {
            self.grace_at(step, now)
        } else {
            None
        }
    }
}

fn meta_str(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn owner_summary(pod: &Pod, namespace: &str, owners: &Owners) -> Option<OwnerSummary> {
    let controller = policy::controller_of(pod)?;
    if controller.kind == "ReplicaSet"
        && let Some(deployment) = owners.deployment_of(namespace, &controller.name)
    {
        return Some(OwnerSummary {
            kind: "Deployment".to_string(),
            name: deployment.to_string(),
        });
    }
    Some(OwnerSummary {
        kind: controller.kind.clone(),
        name: controller.name.clone(),
    })
}

/// Whether a PDB forbids every voluntary disruption however many replicas run, which a surge
/// cannot fix: `maxUnavailable: 0` / `"0%"`, or `minAvailable: "100%"`.
fn pdb_never_allows(pdb: &PodDisruptionBudget) -> bool {
    let Some(spec) = pdb.spec.as_ref() else {
        return false;
    };
    let max_zero = match &spec.max_unavailable {
        Some(IntOrString::Int(0)) => true,
        Some(IntOrString::String(s)) => s.trim() == "0%" || s.trim() == "0",
        _ => false,
    };
    let min_all = matches!(&spec.min_available, Some(IntOrString::String(s)) if s.trim() == "100%");
    max_zero || min_all
}

/// What stops an eviction the PDB's status refuses, for a pod that is not Ready under the
/// default `IfHealthyBudget`: the one case where the pod serves nothing and still waits.
fn unhealthy_blocked_text(
    pdb: &PodDisruptionBudget,
    pdb_ref: &PdbRef,
    allowed: i32,
    not_ready: &[String],
) -> String {
    let status = pdb.status.as_ref();
    let current = status.and_then(|s| s.current_healthy).unwrap_or(0);
    let desired = status.and_then(|s| s.desired_healthy).unwrap_or(0);
    // A large Deployment may have many; the first few name the problem.
    const SHOWN: usize = 5;
    let mut named = not_ready
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if not_ready.len() > SHOWN {
        named.push_str(&format!(" and {} more", not_ready.len() - SHOWN));
    }
    format!(
        "PDB {} allows {allowed} disruptions and its unhealthyPodEvictionPolicy is {}: the pod \
         is not Ready, and the Eviction API evicts a not-Ready pod only while the budget is met \
         ({current} healthy, {desired} needed) or with AlwaysAllow (not Ready here: {})",
        pdb_ref.name,
        policy::unhealthy_pod_eviction_policy(pdb),
        named
    )
}

fn pdb_blocker(
    strategy: Strategy,
    disable_eviction: bool,
    pdbs: &[(&PodDisruptionBudget, PdbRef)],
    health: policy::PodHealth,
    not_ready: &dyn Fn(&PodDisruptionBudget) -> Vec<String>,
) -> Option<String> {
    let uses_eviction = !disable_eviction && matches!(strategy, Strategy::Evict | Strategy::Surge);
    if !uses_eviction {
        return None;
    }
    if pdbs.len() > 1 {
        let names: Vec<&str> = pdbs.iter().map(|(_, r)| r.name.as_str()).collect();
        return Some(format!(
            "covered by {} PDBs ({}): the Eviction API refuses such pods",
            pdbs.len(),
            names.join(", ")
        ));
    }
    let (pdb, pdb_ref) = pdbs.first()?;
    match strategy {
        // A surge adds a Ready replica before evicting, which raises disruptionsAllowed; only
        // a budget that never allows a disruption still blocks.
        Strategy::Surge => pdb_never_allows(pdb).then(|| {
            format!(
                "PDB {} never allows a disruption (maxUnavailable 0 or minAvailable 100%)",
                pdb_ref.name
            )
        }),
        // What the Eviction API lets go without spending the budget, it lets go at 0 too.
        _ if policy::budget_bypass(health, pdb).is_some() => None,
        _ => match pdb_ref.disruptions_allowed {
            Some(n) if n > 0 => None,
            Some(n) if !health.ready => {
                Some(unhealthy_blocked_text(pdb, pdb_ref, n, &not_ready(pdb)))
            }
            Some(n) => Some(format!("PDB {} allows {n} disruptions", pdb_ref.name)),
            None => Some(format!(
                "PDB {} has no status yet: the Eviction API refuses until it is computed",
                pdb_ref.name
            )),
        },
    }
}

enum Disposition {
    Step(Box<PodPlan>),
    Ignored(IgnoreReason),
    Refused(Vec<RefusalReason>),
}

/// Builds the plan. Total: never fails and never panics, whatever the pods look like; unusable
/// values become warnings and defaults.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let options = input.options;
    let margin = to_signed(options.margin);
    let mut steps = Vec::new();
    let mut ignored = Vec::new();
    let mut refused = Vec::new();
    let mut warnings = Vec::new();

    for pod in input.pods {
        let namespace = meta_str(&pod.metadata.namespace);
        let name = meta_str(&pod.metadata.name);
        let uid = pod.metadata.uid.clone();
        let mut pod_warnings = Vec::new();
        let disposition = dispose(pod, &namespace, input, margin, &mut pod_warnings);
        warnings.extend(pod_warnings.into_iter().map(|kind| PlanWarning {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            kind,
        }));
        match disposition {
            Disposition::Step(step) => steps.push(*step),
            Disposition::Ignored(reason) => ignored.push(IgnoredPod {
                namespace,
                name,
                uid,
                reason,
            }),
            Disposition::Refused(reasons) => refused.push(RefusedPod {
                namespace,
                name,
                uid,
                reasons,
            }),
        }
    }

    steps.sort_by(|a, b| {
        (a.order, a.tier, &a.namespace, &a.name, &a.uid).cmp(&(
            b.order,
            b.tier,
            &b.namespace,
            &b.name,
            &b.uid,
        ))
    });
    let mut waves: Vec<Wave> = Vec::new();
    for (i, step) in steps.iter_mut().enumerate() {
        match waves.last_mut() {
            Some(wave) if wave.order == step.order && wave.tier == step.tier => {
                wave.steps.end = i + 1
            }
            _ => waves.push(Wave {
                order: step.order,
                tier: step.tier,
                steps: i..i + 1,
            }),
        }
        step.wave = waves.len() - 1;
    }
    // Stable sorts: a pod's own warnings keep the order they were found in.
    ignored.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
    refused.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
    warnings.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));

    Plan {
        steps,
        waves,
        ignored,
        refused,
        warnings,
        deadline: input.deadline,
        margin,
        voluntary: options.voluntary,
        disable_eviction: options.disable_eviction,
        node_targets: Vec::new(),
        load_balancers_unchecked: None,
    }
}

/// Decides one pod. The filters run in kubectl's order (selector, then what cannot or need not
/// be drained, then what needs a flag), with `skip` before the refusals: a pod we never touch
/// needs no permission.
fn dispose(
    pod: &Pod,
    namespace: &str,
    input: PlanInput<'_>,
    margin: SignedDuration,
    warnings: &mut Vec<WarningKind>,
) -> Disposition {
    let options = input.options;
    if let Some(selector) = &options.pod_selector
        && !selector.matches(policy::pod_labels(pod))
    {
        return Disposition::Ignored(IgnoreReason::NotSelected);
    }
    if policy::is_mirror_pod(pod) {
        return Disposition::Ignored(IgnoreReason::MirrorPod);
    }
    if policy::is_finished(pod) {
        return Disposition::Ignored(IgnoreReason::Finished);
    }
    let daemonset = policy::is_daemonset_pod(pod);
    if daemonset && options.daemonsets == DaemonSetHandling::Ignore {
        return Disposition::Ignored(IgnoreReason::DaemonSet);
    }

    let resolved = policy::pod_policy(pod, input.policy, options.voluntary);
    warnings.extend(
        resolved
            .warnings
            .iter()
            .cloned()
            .map(WarningKind::Annotation),
    );
    if resolved.strategy == Strategy::Skip {
        return Disposition::Ignored(IgnoreReason::Skip {
            source: resolved.strategy_reason,
        });
    }

    let mut refusals = Vec::new();
    if daemonset && options.daemonsets == DaemonSetHandling::Refuse {
        refusals.push(RefusalReason::DaemonSet);
    }
    if policy::is_bare_pod(pod) && !options.force {
        refusals.push(RefusalReason::BarePod);
    }
    if policy::uses_empty_dir(pod) && !options.delete_emptydir_data {
        // The workload's owner may accept losing the scratch data for this pod alone; an invalid
        // value counts as "no" and is reported like any other bad annotation.
        let accepted = match policy::allows_local_data_loss(pod) {
            Ok(accepted) => accepted,
            Err(warning) => {
                warnings.push(WarningKind::Annotation(warning));
                false
            }
        };
        if !accepted {
            refusals.push(RefusalReason::EmptyDir);
        }
    }
    if !refusals.is_empty() {
        return Disposition::Refused(refusals);
    }

    let owner = owner_summary(pod, namespace, input.owners);
    let strategy_is_default = resolved.strategy_is_default;
    let mut reason = resolved.strategy_reason;
    let mut strategy = resolved.strategy;
    if strategy == Strategy::Surge && owner.as_ref().is_none_or(|o| o.kind != "Deployment") {
        warnings.push(WarningKind::SurgeWithoutDeployment {
            owner: owner.clone(),
        });
        strategy = Strategy::Evict;
        reason.push_str("; surge needs a Deployment pod, evicting instead");
    }
    if strategy == Strategy::Evict && options.disable_eviction {
        strategy = Strategy::Delete;
        reason.push_str("; delete instead of evict (--disable-eviction)");
    }

    let tier = if daemonset {
        Tier::DaemonSet
    } else if policy::is_critical(pod) {
        Tier::Critical
    } else {
        Tier::Workload
    };
    match tier {
        Tier::Workload => {}
        Tier::Critical => reason.push_str("; critical tier (system-*-critical priority)"),
        Tier::DaemonSet => reason.push_str("; DaemonSet tier (DaemonSet pods drained last)"),
    }

    let grace = options
        .grace_period_override
        .filter(|g| *g >= 0)
        .or(resolved.grace_seconds)
        .unwrap_or_else(|| policy::pod_grace_seconds(pod));
    let grace_seconds = clamp_grace(grace, input.deadline, input.now, margin);
    let latest_start = input.deadline.map(|deadline| {
        deadline
            .saturating_sub(SignedDuration::from_secs(grace_seconds))
            .and_then(|t| t.saturating_sub(margin))
            .unwrap_or(Timestamp::MIN)
    });

    let mut matching: Vec<(&PodDisruptionBudget, PdbRef)> = input
        .pdbs
        .iter()
        .filter(|pdb| policy::pdb_matches_pod(pdb, pod))
        .map(|pdb| {
            let pdb_ref = PdbRef {
                name: meta_str(&pdb.metadata.name),
                disruptions_allowed: pdb.status.as_ref().and_then(|s| s.disruptions_allowed),
            };
            (pdb, pdb_ref)
        })
        .collect();
    matching.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    if options.surge_when_blocked
        && strategy_is_default
        && strategy == Strategy::Evict
        && owner.as_ref().is_some_and(|o| o.kind == "Deployment")
    {
        let why = match matching.as_slice() {
            [(pdb, pdb_ref)]
                if pdb_ref.disruptions_allowed == Some(0) && !pdb_never_allows(pdb) =>
            {
                Some(format!("PDB {} allows no eviction now", pdb_ref.name))
            }
            [] if policy::controller_of(pod)
                .and_then(|rs| input.owners.replicas_of(namespace, &rs.name))
                == Some(1) =>
            {
                Some("a single replica without a PDB".to_string())
            }
            _ => None,
        };
        if let Some(why) = why {
            strategy = Strategy::Surge;
            reason.push_str(&format!(
                "; surge: {why}, and there is time to move it first"
            ));
        }
    }
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let health = policy::PodHealth::of(pod);
    if let ([(pdb, pdb_ref)], false, Strategy::Evict) = (matching.as_slice(), terminating, strategy)
        && pdb_ref.disruptions_allowed.is_none_or(|n| n <= 0)
    {
        match policy::budget_bypass(health, pdb) {
            Some(policy::BudgetBypass::Pending) => reason.push_str(&format!(
                "; Pending: the Eviction API deletes it without asking PDB {}",
                pdb_ref.name
            )),
            Some(policy::BudgetBypass::AlwaysAllow) => reason.push_str(&format!(
                "; not Ready: PDB {} (unhealthyPodEvictionPolicy AlwaysAllow) lets it be evicted \
                 whatever its budget",
                pdb_ref.name
            )),
            Some(policy::BudgetBypass::BudgetMet) => reason.push_str(&format!(
                "; not Ready: PDB {} has its healthy pods, so the Eviction API lets it go \
                 without spending the budget",
                pdb_ref.name
            )),
            None => {}
        }
    }
    let hold = match resolved.hold {
        Some(hold) if !terminating => {
            let start = policy::pod_start_time(pod);
            let until = start
                .unwrap_or(input.now)
                .checked_add(to_signed(hold.duration))
                .unwrap_or(Timestamp::MAX);
            if until > input.now {
                Some(DoNotDisruptHold {
                    value: hold.value,
                    until,
                    from_pod_start: start.is_some(),
                })
            } else {
                reason.push_str(&format!(
                    "; {}={} elapsed at {until}",
                    crate::names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
                    hold.value
                ));
                None
            }
        }
        _ => None,
    };
    let blocker = if terminating {
        None
    } else {
        let not_ready = |pdb: &PodDisruptionBudget| -> Vec<String> {
            input
                .pods
                .iter()
                .filter(|p| {
                    !policy::is_pod_ready(p)
                        && !policy::is_finished(p)
                        && p.metadata.deletion_timestamp.is_none()
                        && policy::pdb_matches_pod(pdb, p)
                })
                .map(|p| format!("{namespace}/{}", meta_str(&p.metadata.name)))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let after = pdb_blocker(
            strategy,
            options.disable_eviction,
            &matching,
            health,
            &not_ready,
        );
        match (&hold, after) {
            (Some(hold), Some(after)) => Some(format!("{hold}; then {after}")),
            (Some(hold), None) => Some(hold.to_string()),
            (None, after) => after,
        }
    };
    let pdbs: Vec<PdbRef> = matching.into_iter().map(|(_, r)| r).collect();

    Disposition::Step(Box::new(PodPlan {
        namespace: namespace.to_string(),
        name: meta_str(&pod.metadata.name),
        uid: pod.metadata.uid.clone(),
        owner,
        strategy,
        order: resolved.order,
        tier,
        wave: 0,
        grace_seconds,
        latest_start,
        multiple_pdbs: pdbs.len() > 1,
        pdbs,
        terminating,
        reason,
        hold,
        blocker,
        load_balancer: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::policy::tests::{PodBuilder, match_labels, pdb};
    use crate::names;
    use k8s_openapi::api::policy::v1::PodDisruptionBudgetSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, ObjectMeta, OwnerReference,
    };

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    struct Fixture {
        pods: Vec<Pod>,
        pdbs: Vec<PodDisruptionBudget>,
        owners: Owners,
        policy: ClusterPolicy,
        options: PlanOptions,
        deadline: Option<Timestamp>,
    }

    impl Fixture {
        fn new(pods: Vec<Pod>) -> Self {
            Fixture {
                pods,
                pdbs: Vec::new(),
                owners: Owners::new(),
                policy: ClusterPolicy::default(),
                options: PlanOptions::default(),
                deadline: None,
            }
        }

        fn plan(&self) -> Plan {
            plan(PlanInput {
                pods: &self.pods,
                pdbs: &self.pdbs,
                owners: &self.owners,
                policy: &self.policy,
                options: &self.options,
                now: t(0),
                deadline: self.deadline,
            })
        }
    }

    fn names_of(plan: &Plan) -> Vec<&str> {
        plan.steps.iter().map(|s| s.name.as_str()).collect()
    }

    fn step<'a>(plan: &'a Plan, name: &str) -> &'a PodPlan {
        plan.steps.iter().find(|s| s.name == name).unwrap()
    }

    fn index(plan: &Plan, name: &str) -> StepIndex {
        StepIndex(plan.steps.iter().position(|s| s.name == name).unwrap())
    }

    #[test]
    fn steps_follow_order_then_tier_then_name() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("b", "web").build(),
            PodBuilder::new("a", "web").build(),
            PodBuilder::new("kube-system", "dns")
                .priority_class("system-cluster-critical")
                .build(),
            PodBuilder::new("kube-system", "proxy")
                .controller("DaemonSet", "kube-proxy")
                .priority_class("system-node-critical")
                .build(),
            PodBuilder::new("x", "first")
                .annotation(names::ANNOTATION_ORDER, "-1")
                .build(),
            PodBuilder::new("x", "late")
                .annotation(names::ANNOTATION_ORDER, "5")
                .build(),
        ]);
        f.options.daemonsets = DaemonSetHandling::Drain;
        let plan = f.plan();
        assert_eq!(
            names_of(&plan),
            ["first", "web", "web", "dns", "proxy", "late"]
        );
        assert_eq!(plan.steps[1].namespace, "a");
        let waves: Vec<(i32, Tier, Range<usize>)> = plan
            .waves
            .iter()
            .map(|w| (w.order, w.tier, w.steps.clone()))
            .collect();
        assert_eq!(
            waves,
            [
                (-1, Tier::Workload, 0..1),
                (0, Tier::Workload, 1..3),
                (0, Tier::Critical, 3..4),
                (0, Tier::DaemonSet, 4..5),
                (5, Tier::Workload, 5..6),
            ]
        );
        let wave_of: Vec<usize> = plan.steps.iter().map(|s| s.wave).collect();
        assert_eq!(wave_of, [0, 1, 1, 2, 3, 4]);
        assert!(step(&plan, "dns").reason.contains("critical tier"));
        assert!(step(&plan, "proxy").reason.contains("DaemonSet tier"));
    }

    #[test]
    fn pods_that_need_no_drain_are_ignored() {
        let f = Fixture::new(vec![
            PodBuilder::new("ns", "mirror").mirror().build(),
            PodBuilder::new("ns", "done")
                .phase("Succeeded")
                .bare()
                .empty_dir()
                .build(),
            PodBuilder::new("ns", "ds")
                .controller("DaemonSet", "agent")
                .build(),
            PodBuilder::new("ns", "skipped")
                .annotation(names::ANNOTATION_STRATEGY, "skip")
                .bare()
                .empty_dir()
                .build(),
            PodBuilder::new("ns", "web").build(),
        ]);
        let plan = f.plan();
        assert_eq!(names_of(&plan), ["web"]);
        assert!(plan.refused.is_empty());
        let ignored: Vec<(&str, IgnoreReason)> = plan
            .ignored
            .iter()
            .map(|i| (i.name.as_str(), i.reason.clone()))
            .collect();
        assert_eq!(
            ignored,
            [
                ("done", IgnoreReason::Finished),
                ("ds", IgnoreReason::DaemonSet),
                ("mirror", IgnoreReason::MirrorPod),
                (
                    "skipped",
                    IgnoreReason::Skip {
                        source: "annotation nodedrain.io/strategy=skip".to_string()
                    }
                ),
            ]
        );
    }

    #[test]
    fn pod_selector_leaves_unmatched_pods_alone() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "web").label("app", "web").build(),
            PodBuilder::new("ns", "bare")
                .label("app", "other")
                .bare()
                .build(),
        ]);
        f.options.pod_selector = Some(policy::parse_label_selector("app=web").unwrap());
        let plan = f.plan();
        assert_eq!(names_of(&plan), ["web"]);
        assert_eq!(plan.ignored[0].reason, IgnoreReason::NotSelected);
        assert!(plan.refused.is_empty(), "unselected pods need no flag");
    }

    #[test]
    fn an_emptydir_pod_whose_owner_accepts_data_loss_is_drained_without_the_flag() {
        let pods = vec![
            PodBuilder::new("ns", "ok")
                .empty_dir()
                .annotation(names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS, "true")
                .build(),
            PodBuilder::new("ns", "no")
                .empty_dir()
                .annotation(names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS, "false")
                .build(),
            PodBuilder::new("ns", "typo")
                .empty_dir()
                .annotation(names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS, "yes")
                .build(),
        ];
        let plan = Fixture::new(pods).plan();
        let steps: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(steps, ["ok"]);
        let mut refused: Vec<&str> = plan.refused.iter().map(|r| r.name.as_str()).collect();
        refused.sort();
        assert_eq!(refused, ["no", "typo"]);
        assert!(plan.warnings.iter().any(|w| w.name == "typo"
            && matches!(&w.kind, WarningKind::Annotation(a) if a.annotation == names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS)));
    }

    #[test]
    fn refusals_match_kubectl_and_list_every_reason() {
        let pods = vec![
            PodBuilder::new("ns", "bare").bare().build(),
            PodBuilder::new("ns", "scratch").empty_dir().build(),
            PodBuilder::new("ns", "both").bare().empty_dir().build(),
            PodBuilder::new("ns", "ds")
                .controller("DaemonSet", "agent")
                .build(),
        ];
        let mut f = Fixture::new(pods);
        f.options.daemonsets = DaemonSetHandling::Refuse;
        let plan = f.plan();
        assert!(plan.steps.is_empty());
        let refused: Vec<(&str, Vec<RefusalReason>)> = plan
            .refused
            .iter()
            .map(|r| (r.name.as_str(), r.reasons.clone()))
            .collect();
        assert_eq!(
            refused,
            [
                ("bare", vec![RefusalReason::BarePod]),
                (
                    "both",
                    vec![RefusalReason::BarePod, RefusalReason::EmptyDir]
                ),
                ("ds", vec![RefusalReason::DaemonSet]),
                ("scratch", vec![RefusalReason::EmptyDir]),
            ]
        );
        assert_eq!(
            RefusalReason::BarePod.to_string(),
            "bare pod (no controller); use --force"
        );
        assert_eq!(
            RefusalReason::EmptyDir.to_string(),
            "uses emptyDir (local data is deleted); use --delete-emptydir-data"
        );
        assert_eq!(
            RefusalReason::DaemonSet.to_string(),
            "DaemonSet-managed; use --ignore-daemonsets"
        );

        f.options.force = true;
        f.options.delete_emptydir_data = true;
        f.options.daemonsets = DaemonSetHandling::Drain;
        let plan = f.plan();
        assert!(plan.refused.is_empty());
        assert_eq!(plan.steps.len(), 4);
        assert_eq!(step(&plan, "bare").owner, None);
    }

    #[test]
    fn surge_needs_a_deployment() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "web")
                .controller("ReplicaSet", "web-7d9")
                .annotation(names::ANNOTATION_STRATEGY, "surge")
                .build(),
            PodBuilder::new("ns", "db")
                .controller("StatefulSet", "db")
                .annotation(names::ANNOTATION_STRATEGY, "surge")
                .build(),
            PodBuilder::new("ns", "orphan-rs")
                .controller("ReplicaSet", "lonely")
                .annotation(names::ANNOTATION_STRATEGY, "surge")
                .build(),
        ]);
        f.owners.insert("ns", "web-7d9", "web");
        let plan = f.plan();
        let web = step(&plan, "web");
        assert_eq!(web.strategy, Strategy::Surge);
        assert_eq!(web.owner.as_ref().unwrap().to_string(), "Deployment/web");
        let db = step(&plan, "db");
        assert_eq!(db.strategy, Strategy::Evict);
        assert_eq!(db.owner.as_ref().unwrap().to_string(), "StatefulSet/db");
        assert!(db.reason.contains("evicting instead"));
        assert_eq!(step(&plan, "orphan-rs").strategy, Strategy::Evict);
        let warned: Vec<String> = plan.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            warned,
            [
                "ns/db: strategy surge needs a Deployment pod, owner is StatefulSet/db; evicting instead",
                "ns/orphan-rs: strategy surge needs a Deployment pod, owner is ReplicaSet/lonely; evicting instead",
            ]
        );
        assert_eq!(plan.warnings[0].uid.as_deref(), Some("uid-ns-db"));
    }

    #[test]
    fn owners_from_replica_sets() {
        let rs = |name: &str, deployment: Option<&str>| ReplicaSet {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                owner_references: deployment.map(|d| {
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "Deployment".into(),
                        name: d.into(),
                        uid: "u".into(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut single = rs("db-1", Some("db"));
        single.metadata.annotations = Some(
            [(DEPLOYMENT_DESIRED_REPLICAS.to_string(), "1".to_string())]
                .into_iter()
                .collect(),
        );
        let owners =
            Owners::from_replica_sets(&[rs("web-1", Some("web")), rs("solo", None), single]);
        assert_eq!(owners.deployment_of("ns", "web-1"), Some("web"));
        assert_eq!(owners.deployment_of("ns", "solo"), None);
        assert_eq!(owners.deployment_of("other", "web-1"), None);
        assert_eq!(owners.replicas_of("ns", "db-1"), Some(1));
        assert_eq!(owners.replicas_of("ns", "web-1"), None, "nothing says");
    }

    #[test]
    fn disable_eviction_turns_evict_into_delete_past_pdbs() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "web")
                .label("app", "web")
                .ready()
                .build(),
        ]);
        f.pdbs = vec![pdb(
            "ns",
            "web-pdb",
            Some(match_labels(&[("app", "web")])),
            Some(0),
        )];
        assert_eq!(
            f.plan().steps[0].blocker.as_deref(),
            Some("PDB web-pdb allows 0 disruptions")
        );
        f.options.disable_eviction = true;
        let plan = f.plan();
        assert_eq!(plan.steps[0].strategy, Strategy::Delete);
        assert_eq!(plan.steps[0].blocker, None);
        assert!(plan.steps[0].reason.contains("--disable-eviction"));
        assert!(plan.disable_eviction);
    }

    #[test]
    fn pdb_blockers_depend_on_strategy() {
        let app = |name: &str, strategy: &str| {
            PodBuilder::new("ns", name)
                .label("app", name)
                .controller("ReplicaSet", &format!("{name}-rs"))
                .annotation(names::ANNOTATION_STRATEGY, strategy)
                .ready()
                .build()
        };
        let mut f = Fixture::new(vec![
            app("open", "evict"),
            app("closed", "evict"),
            app("fresh", "evict"),
            app("double", "evict"),
            app("surge", "surge"),
            app("frozen", "surge"),
            app("doomed", "delete"),
            app("patient", "wait"),
            PodBuilder::new("ns", "going")
                .label("app", "closed")
                .terminating()
                .build(),
        ]);
        for name in ["surge", "frozen"] {
            f.owners.insert("ns", format!("{name}-rs"), name);
        }
        let sel = |app: &str| Some(match_labels(&[("app", app)]));
        let mut frozen = pdb("ns", "frozen-pdb", sel("frozen"), Some(0));
        frozen.spec = Some(PodDisruptionBudgetSpec {
            selector: sel("frozen"),
            max_unavailable: Some(IntOrString::Int(0)),
            ..Default::default()
        });
        f.pdbs = vec![
            pdb("ns", "open-pdb", sel("open"), Some(1)),
            pdb("ns", "closed-pdb", sel("closed"), Some(0)),
            pdb("ns", "fresh-pdb", sel("fresh"), None),
            pdb("ns", "b-double", sel("double"), Some(5)),
            pdb("ns", "a-double", sel("double"), Some(5)),
            pdb("ns", "surge-pdb", sel("surge"), Some(0)),
            frozen,
            pdb("ns", "doomed-pdb", sel("doomed"), Some(0)),
            pdb("ns", "patient-pdb", sel("patient"), Some(0)),
            pdb(
                "other",
                "elsewhere",
                Some(LabelSelector::default()),
                Some(0),
            ),
        ];
        let plan = f.plan();
        let blocker = |name: &str| step(&plan, name).blocker.clone();
        assert_eq!(blocker("open"), None);
        assert_eq!(
            blocker("closed").unwrap(),
            "PDB closed-pdb allows 0 disruptions"
        );
        assert!(blocker("fresh").unwrap().contains("no status yet"));
        assert_eq!(
            blocker("double").unwrap(),
            "covered by 2 PDBs (a-double, b-double): the Eviction API refuses such pods"
        );
        assert!(step(&plan, "double").multiple_pdbs);
        assert!(!step(&plan, "open").multiple_pdbs);
        assert_eq!(blocker("surge"), None, "surge makes room before it evicts");
        assert!(blocker("frozen").unwrap().contains("never allows"));
        assert_eq!(blocker("doomed"), None);
        assert_eq!(blocker("patient"), None);
        assert_eq!(blocker("going"), None);
        assert!(step(&plan, "going").terminating);
        assert_eq!(
            step(&plan, "closed").pdbs,
            [PdbRef {
                name: "closed-pdb".into(),
                disruptions_allowed: Some(0)
            }]
        );
    }

    #[test]
    fn surge_when_blocked_moves_only_default_deployment_pods_a_pdb_holds() {
        let pod = |name: &str, controller: &str| {
            PodBuilder::new("ns", name)
                .label("app", name)
                .controller("ReplicaSet", controller)
        };
        let mut f = Fixture::new(vec![
            pod("single", "single-rs").build(),
            pod("roomy", "roomy-rs").build(),
            pod("frozen", "frozen-rs").build(),
            pod("annotated", "annotated-rs")
                .annotation(names::ANNOTATION_STRATEGY, "evict")
                .build(),
            pod("bare-rs", "orphan-rs").build(),
            pod("alone", "alone-rs").build(),
            pod("many", "many-rs").build(),
        ]);
        for name in ["single", "roomy", "frozen", "annotated", "alone", "many"] {
            f.owners.insert("ns", format!("{name}-rs"), name);
        }
        f.owners.set_replicas("ns", "alone-rs", 1);
        f.owners.set_replicas("ns", "many-rs", 3);
        let sel = |app: &str| Some(match_labels(&[("app", app)]));
        let mut frozen = pdb("ns", "frozen-pdb", sel("frozen"), Some(0));
        frozen.spec = Some(PodDisruptionBudgetSpec {
            selector: sel("frozen"),
            max_unavailable: Some(IntOrString::Int(0)),
            ..Default::default()
        });
        f.pdbs = vec![
            pdb("ns", "single-pdb", sel("single"), Some(0)),
            pdb("ns", "roomy-pdb", sel("roomy"), Some(1)),
            frozen,
            pdb("ns", "annotated-pdb", sel("annotated"), Some(0)),
            pdb("ns", "bare-rs-pdb", sel("bare-rs"), Some(0)),
        ];
        let off = f.plan();
        assert!(off.steps.iter().all(|s| s.strategy == Strategy::Evict));

        f.options.surge_when_blocked = true;
        let plan = f.plan();
        let strategy = |name: &str| step(&plan, name).strategy;
        assert_eq!(strategy("single"), Strategy::Surge);
        assert_eq!(step(&plan, "single").blocker, None);
        assert!(
            step(&plan, "single")
                .reason
                .contains("PDB single-pdb allows no eviction")
        );
        assert_eq!(strategy("roomy"), Strategy::Evict, "its PDB lets it go now");
        assert_eq!(
            strategy("frozen"),
            Strategy::Evict,
            "a surge cannot unfreeze it"
        );
        assert_eq!(strategy("annotated"), Strategy::Evict, "its owner chose");
        assert_eq!(
            strategy("bare-rs"),
            Strategy::Evict,
            "no Deployment to restart"
        );
        assert_eq!(
            strategy("alone"),
            Strategy::Surge,
            "evicting it is an outage"
        );
        assert!(
            step(&plan, "alone")
                .reason
                .contains("a single replica without a PDB")
        );
        assert_eq!(
            strategy("many"),
            Strategy::Evict,
            "others serve while it moves"
        );
    }

    #[test]
    fn grace_sources_and_precedence() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "own").grace(90).build(),
            PodBuilder::new("ns", "default").build(),
            PodBuilder::new("ns", "annotated")
                .grace(90)
                .annotation(names::ANNOTATION_GRACE_PERIOD, "5")
                .build(),
            PodBuilder::new("ns", "zero").grace(0).build(),
            PodBuilder::new("ruled", "by-policy").grace(90).build(),
        ]);
        f.policy = ClusterPolicy::from_yaml("rules:\n  - {namespaces: [ruled], gracePeriod: 20}\n")
            .unwrap();
        let plan = f.plan();
        let grace = |plan: &Plan, name: &str| step(plan, name).grace_seconds;
        assert_eq!(grace(&plan, "own"), 90);
        assert_eq!(grace(&plan, "default"), 30);
        assert_eq!(grace(&plan, "annotated"), 5);
        assert_eq!(grace(&plan, "zero"), 1, "0 would be a force deletion");
        assert_eq!(grace(&plan, "by-policy"), 20);
        assert!(plan.steps.iter().all(|s| s.latest_start.is_none()));

        f.options.grace_period_override = Some(7);
        let plan = f.plan();
        assert!(
            plan.steps.iter().all(|s| s.grace_seconds == 7),
            "--grace-period wins"
        );
        f.options.grace_period_override = Some(-1);
        assert_eq!(
            grace(&f.plan(), "own"),
            90,
            "negative means unset, as in kubectl"
        );
    }

    #[test]
    fn deadline_clamps_grace_and_sets_latest_start() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "quick").grace(10).build(),
            PodBuilder::new("ns", "slow").grace(600).build(),
        ]);
        f.deadline = Some(t(120));
        let plan = f.plan();
        let quick = step(&plan, "quick");
        assert_eq!(quick.grace_seconds, 10);
        assert_eq!(quick.latest_start, Some(t(100)));
        let slow = step(&plan, "slow");
        assert_eq!(slow.grace_seconds, 110, "120 s left minus the 10 s margin");
        assert_eq!(slow.latest_start, Some(t(0)));

        // Deadline already (nearly) here: grace is 1, the minimum.
        f.deadline = Some(t(5));
        let plan = f.plan();
        assert!(plan.steps.iter().all(|s| s.grace_seconds == 1));
        assert_eq!(step(&plan, "quick").latest_start, Some(t(-6)));

        // Sub-second deadlines round the grace down, never past the deadline.
        f.deadline = Some(
            t(120)
                .checked_add(SignedDuration::from_millis(900))
                .unwrap(),
        );
        assert_eq!(step(&f.plan(), "slow").grace_seconds, 110);
    }

    #[test]
    fn waves_start_when_earlier_waves_are_gone() {
        let f = Fixture::new(vec![
            PodBuilder::new("ns", "a1").build(),
            PodBuilder::new("ns", "a2").build(),
            PodBuilder::new("kube-system", "dns")
                .priority(2_000_000_000)
                .build(),
            PodBuilder::new("ns", "last")
                .annotation(names::ANNOTATION_ORDER, "1")
                .build(),
        ]);
        let plan = f.plan();
        let mut progress = plan.progress();
        let now = t(0);
        let (a1, a2, dns, last) = (
            index(&plan, "a1"),
            index(&plan, "a2"),
            index(&plan, "dns"),
            index(&plan, "last"),
        );
        assert_eq!(plan.due_to_start(&progress, now), [a1, a2]);
        progress.set(a1, StepState::Started);
        assert_eq!(plan.due_to_start(&progress, now), [a2]);
        progress.set(a2, StepState::Started);
        assert!(plan.due_to_start(&progress, now).is_empty());
        progress.set(a1, StepState::Gone);
        assert!(
            plan.due_to_start(&progress, now).is_empty(),
            "evicted is not gone"
        );
        progress.set(a2, StepState::Gone);
        assert_eq!(plan.due_to_start(&progress, now), [dns]);
        progress.set(dns, StepState::Gone);
        assert_eq!(plan.due_to_start(&progress, now), [last]);
        assert!(!plan.is_complete(&progress));
        progress.set(last, StepState::Gone);
        assert!(plan.due_to_start(&progress, now).is_empty());
        assert!(plan.is_complete(&progress));
    }

    #[test]
    fn deadline_forces_later_waves() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "app").grace(30).build(),
            PodBuilder::new("kube-system", "dns")
                .priority_class("system-node-critical")
                .grace(60)
                .build(),
        ]);
        f.deadline = Some(t(120));
        f.options.voluntary = false;
        let plan = f.plan();
        let (app, dns) = (index(&plan, "app"), index(&plan, "dns"));
        assert_eq!(step(&plan, "dns").latest_start, Some(t(50)));
        let mut progress = plan.progress();
        progress.set(app, StepState::Started);
        assert!(plan.due_to_start(&progress, t(49)).is_empty());
        assert_eq!(plan.due_to_start(&progress, t(50)), [dns]);
        assert_eq!(plan.grace_at(dns, t(50)), Some(60));
        assert_eq!(plan.grace_at(dns, t(80)), Some(30));
        assert_eq!(plan.grace_at(StepIndex(99), t(80)), None);
    }

    #[test]
    fn must_override_only_with_a_deadline_on_involuntary_drains() {
        let mut f = Fixture::new(vec![PodBuilder::new("ns", "web").grace(30).build()]);
        let s = StepIndex(0);
        // No deadline: never.
        f.options.voluntary = false;
        assert_eq!(f.plan().must_override(s, t(10_000)), None);

        f.deadline = Some(t(120));
        let plan = f.plan();
        assert_eq!(plan.steps[0].latest_start, Some(t(80)));
        assert_eq!(plan.must_override(s, t(79)), None);
        assert_eq!(plan.must_override(s, t(80)), Some(30));
        assert_eq!(plan.must_override(s, t(100)), Some(10));
        assert_eq!(plan.must_override(s, t(115)), Some(1));
        assert_eq!(plan.must_override(s, t(500)), Some(1));
        assert_eq!(plan.must_override(StepIndex(1), t(500)), None);

        // Voluntary drains never override PDBs, even with a deadline.
        f.options.voluntary = true;
        assert_eq!(f.plan().must_override(s, t(100)), None);
    }

    #[test]
    fn a_do_not_disrupt_duration_holds_the_step_until_the_pod_has_run_that_long() {
        let held = |name: &str, value: &str| {
            PodBuilder::new("ns", name)
                .label("app", name)
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, value)
                .ready()
        };
        let mut f = Fixture::new(vec![
            held("fresh", "30m").started(t(-600)).build(),
            held("old", "30m").started(t(-7200)).build(),
            held("unstarted", "1h").build(),
            held("guarded", "10m").started(t(0)).build(),
            held("typo", "30 minutes").started(t(0)).build(),
        ]);
        f.pdbs = vec![pdb(
            "ns",
            "guarded-pdb",
            Some(match_labels(&[("app", "guarded")])),
            Some(0),
        )];
        let plan = f.plan();

        // Karpenter counts from status.startTime: started 10 minutes ago, held 20 more.
        let fresh = step(&plan, "fresh");
        assert_eq!(fresh.strategy, Strategy::Evict);
        let hold = fresh.hold.as_ref().unwrap();
        assert_eq!((hold.until, hold.from_pod_start), (t(1200), true));
        assert_eq!(
            fresh.blocker.as_deref().unwrap(),
            format!(
                "karpenter.sh/do-not-disrupt=30m holds it until {} (30m after the pod started)",
                t(1200)
            )
        );
        // Elapsed before the drain: nothing to wait for, and the reason says so.
        let old = step(&plan, "old");
        assert_eq!((old.hold.as_ref(), old.blocker.as_ref()), (None, None));
        assert!(
            old.reason.contains(&format!(
                "karpenter.sh/do-not-disrupt=30m elapsed at {}",
                t(-5400)
            )),
            "{}",
            old.reason
        );
        // No start time yet: counted from the plan, so the wait stays bounded.
        let unstarted = step(&plan, "unstarted").hold.as_ref().unwrap();
        assert_eq!(
            (unstarted.until, unstarted.from_pod_start),
            (t(3600), false)
        );
        // The PDB still has its say once the hold is over.
        assert!(
            step(&plan, "guarded")
                .blocker
                .as_deref()
                .unwrap()
                .ends_with("; then PDB guarded-pdb allows 0 disruptions")
        );
        // Unparseable: a warning, and drained as if the annotation were absent.
        assert_eq!(step(&plan, "typo").hold, None);
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.name == "typo"
                    && w.to_string().contains("expected \"true\" or a duration"))
        );

        // Involuntary drains ignore it.
        f.options.voluntary = false;
        f.deadline = Some(t(120));
        let plan = f.plan();
        assert!(plan.steps.iter().all(|s| s.hold.is_none()));
        assert!(
            step(&plan, "fresh")
                .reason
                .contains("karpenter.sh/do-not-disrupt=30m ignored on an involuntary drain")
        );
    }

    #[test]
    fn a_not_ready_pod_is_blocked_as_the_eviction_api_decides() {
        use k8s_openapi::api::policy::v1::PodDisruptionBudgetStatus;
        let pod = |name: &str, app: &str| {
            PodBuilder::new("ns", name)
                .label("app", app)
                .controller("ReplicaSet", &format!("{app}-rs"))
        };
        // A PDB allowing 0 disruptions, with its policy and healthy counts.
        let budget =
            |app: &str, policy: Option<&str>, current: i32, desired: i32| PodDisruptionBudget {
                metadata: ObjectMeta {
                    namespace: Some("ns".to_string()),
                    name: Some(format!("{app}-pdb")),
                    ..Default::default()
                },
                spec: Some(PodDisruptionBudgetSpec {
                    selector: Some(match_labels(&[("app", app)])),
                    min_available: Some(IntOrString::Int(desired)),
                    unhealthy_pod_eviction_policy: policy.map(str::to_string),
                    ..Default::default()
                }),
                status: Some(PodDisruptionBudgetStatus {
                    disruptions_allowed: Some(0),
                    current_healthy: Some(current),
                    desired_healthy: Some(desired),
                    ..Default::default()
                }),
            };
        let mut f = Fixture::new(vec![
            pod("always-0", "always").build(),
            pod("always-1", "always").ready().build(),
            pod("default-0", "default").build(),
            pod("default-1", "default").build(),
            pod("default-2", "default").ready().build(),
            pod("met-0", "met").build(),
            pod("starting-0", "starting").phase("Pending").build(),
        ]);
        f.pdbs = vec![
            budget("always", Some("AlwaysAllow"), 1, 1),
            budget("default", None, 1, 2),
            budget("met", Some("IfHealthyBudget"), 2, 2),
            budget("starting", None, 0, 1),
        ];
        let plan = f.plan();
        let blocker = |name: &str| step(&plan, name).blocker.clone();
        // AlwaysAllow: the not-Ready pod goes at 0 allowed; the Ready one still waits.
        assert_eq!(blocker("always-0"), None);
        assert!(step(&plan, "always-0").reason.contains("AlwaysAllow"));
        assert_eq!(
            blocker("always-1").as_deref(),
            Some("PDB always-pdb allows 0 disruptions")
        );
        // IfHealthyBudget (unset) below its desired count: named, with the policy and the
        // not-Ready pods.
        assert_eq!(
            blocker("default-0").as_deref(),
            Some(
                "PDB default-pdb allows 0 disruptions and its unhealthyPodEvictionPolicy is \
                 IfHealthyBudget: the pod is not Ready, and the Eviction API evicts a not-Ready \
                 pod only while the budget is met (1 healthy, 2 needed) or with AlwaysAllow \
                 (not Ready here: ns/default-0, ns/default-1)"
            )
        );
        assert!(blocker("default-1").unwrap().contains("IfHealthyBudget"));
        assert_eq!(
            blocker("default-2").as_deref(),
            Some("PDB default-pdb allows 0 disruptions")
        );
        // IfHealthyBudget with the budget met: the apiserver lets the unhealthy pod go.
        assert_eq!(blocker("met-0"), None);
        // Pending: PDBs are not consulted at all.
        assert_eq!(blocker("starting-0"), None);
        assert!(step(&plan, "starting-0").reason.contains("Pending"));
    }

    #[test]
    fn plan_is_total_on_garbage() {
        let mut nameless = PodBuilder::new("ns", "x")
            .annotation(names::ANNOTATION_STRATEGY, "\u{0}💥")
            .annotation(names::ANNOTATION_ORDER, "-2147483649")
            .annotation(names::ANNOTATION_GRACE_PERIOD, "9223372036854775807")
            .build();
        nameless.metadata.name = None;
        nameless.metadata.namespace = None;
        nameless.metadata.uid = None;
        nameless.spec = None;
        nameless.status = None;
        let pods = vec![Pod::default(), nameless];
        let pdbs = vec![
            PodDisruptionBudget::default(),
            pdb("", "", Some(LabelSelector::default()), None),
        ];
        let mut f = Fixture::new(pods);
        f.pdbs = pdbs;
        f.options.force = true;
        f.options.margin = Duration::MAX;
        for deadline in [None, Some(Timestamp::MAX), Some(Timestamp::MIN), Some(t(1))] {
            f.deadline = deadline;
            let plan = f.plan();
            assert_eq!(plan.steps.len(), 2);
            let progress = plan.progress();
            let _ = plan.due_to_start(&progress, Timestamp::MAX);
            let _ = plan.must_override(StepIndex(0), Timestamp::MIN);
            let _ = serde_json::to_string(&plan).unwrap();
        }
        f.deadline = None;
        f.options.margin = DEFAULT_MARGIN;
        let plan = f.plan();
        assert_eq!(
            plan.warnings.len(),
            2,
            "strategy and order; the huge grace is valid"
        );
        let grace: Vec<i64> = plan.steps.iter().map(|s| s.grace_seconds).collect();
        assert!(grace.contains(&i64::MAX));
    }

    #[test]
    fn plan_serializes_for_output_json() {
        let mut f = Fixture::new(vec![
            PodBuilder::new("ns", "web").build(),
            PodBuilder::new("ns", "m").mirror().build(),
        ]);
        f.deadline = Some(t(120));
        let json = serde_json::to_value(f.plan()).unwrap();
        assert_eq!(json["steps"][0]["strategy"], "evict");
        assert_eq!(json["steps"][0]["tier"], "workload");
        assert_eq!(json["steps"][0]["graceSeconds"], 30);
        assert!(json["steps"][0]["latestStart"].is_string());
        assert_eq!(json["ignored"][0]["reason"]["kind"], "mirrorPod");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::select;
        use proptest::strategy::Strategy;

        /// A random pod, described by its parts so failures shrink to readable cases.
        #[derive(Debug, Clone)]
        struct PodCase {
            namespace: Option<&'static str>,
            has_name: bool,
            controller: Option<&'static str>,
            app: Option<&'static str>,
            strategy: Option<String>,
            order: Option<String>,
            grace_annotation: Option<String>,
            do_not_disrupt: Option<String>,
            safe_to_evict: Option<String>,
            priority_class: Option<&'static str>,
            priority: Option<i32>,
            grace: Option<i64>,
            mirror: bool,
            empty_dir: bool,
            phase: Option<&'static str>,
            has_spec: bool,
            terminating: bool,
        }

        fn text(known: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
            proptest::option::of(prop_oneof![
                3 => select(known).prop_map(str::to_string),
                1 => any::<String>(),
            ])
        }

        fn pod_case() -> impl Strategy<Value = PodCase> {
            (
                (
                    proptest::option::weighted(0.95, select(&["a", "b", "kube-system"][..])),
                    proptest::bool::weighted(0.95),
                    proptest::option::of(select(
                        &["ReplicaSet", "StatefulSet", "DaemonSet", "Job", "Node"][..],
                    )),
                    proptest::option::of(select(&["web", "db", "dns"][..])),
                    text(&["evict", "surge", "wait", "delete", "skip", "Evict", ""]),
                    text(&["-3", "0", "1", "2", "10", "x", "99999999999"]),
                ),
                (
                    text(&["0", "5", "30", "600", "-1", "1.5", "9223372036854775807"]),
                    text(&["true", "false", "yes", "30m", "1h30m", "0s", "1d", "-5m"]),
                    text(&["true", "false", "no"]),
                    proptest::option::of(select(
                        &["system-node-critical", "system-cluster-critical", "high"][..],
                    )),
                    proptest::option::of(prop_oneof![
                        Just(2_000_000_000),
                        Just(i32::MAX),
                        any::<i32>()
                    ]),
                ),
                (
                    proptest::option::of(prop_oneof![-5i64..700, any::<i64>()]),
                    proptest::bool::weighted(0.1),
                    proptest::bool::weighted(0.2),
                    proptest::option::of(select(
                        &["Running", "Pending", "Succeeded", "Failed", "Unknown"][..],
                    )),
                    proptest::bool::weighted(0.95),
                    proptest::bool::weighted(0.1),
                ),
            )
                .prop_map(
                    |(
                        (namespace, has_name, controller, app, strategy, order),
                        (grace_annotation, do_not_disrupt, safe_to_evict, priority_class, priority),
                        (grace, mirror, empty_dir, phase, has_spec, terminating),
                    )| PodCase {
                        namespace,
                        has_name,
                        controller,
                        app,
                        strategy,
                        order,
                        grace_annotation,
                        do_not_disrupt,
                        safe_to_evict,
                        priority_class,
                        priority,
                        grace,
                        mirror,
                        empty_dir,
                        phase,
                        has_spec,
                        terminating,
                    },
                )
        }

        fn build(case: &PodCase, i: usize) -> Pod {
            let namespace = case.namespace.unwrap_or("a");
            let mut b = PodBuilder::new(namespace, &format!("p{i}"));
            b = match case.controller {
                Some(kind) => b.controller(kind, &format!("owner{}", i % 3)),
                None => b.bare(),
            };
            if let Some(app) = case.app {
                b = b.label("app", app);
            }
            for (key, value) in [
                (names::ANNOTATION_STRATEGY, &case.strategy),
                (names::ANNOTATION_ORDER, &case.order),
                (names::ANNOTATION_GRACE_PERIOD, &case.grace_annotation),
                (
                    names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
                    &case.do_not_disrupt,
                ),
                (names::ANNOTATION_CA_SAFE_TO_EVICT, &case.safe_to_evict),
            ] {
                if let Some(value) = value {
                    b = b.annotation(key, value);
                }
            }
            if let Some(class) = case.priority_class {
                b = b.priority_class(class);
            }
            if let Some(priority) = case.priority {
                b = b.priority(priority);
            }
            if let Some(grace) = case.grace {
                b = b.grace(grace);
            }
            if case.empty_dir {
                b = b.empty_dir();
            }
            if let Some(phase) = case.phase {
                b = b.phase(phase);
            }
            if case.terminating {
                b = b.terminating();
            }
            let mut pod = b.build();
            if case.mirror {
                pod.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(names::ANNOTATION_MIRROR_POD.into(), "x".into());
            }
            if case.namespace.is_none() {
                pod.metadata.namespace = None;
            }
            if !case.has_name {
                pod.metadata.name = None;
            }
            if !case.has_spec {
                pod.spec = None;
            }
            // Unique, so every pod can be found again in the plan.
            pod.metadata.uid = Some(format!("uid{i}"));
            pod
        }

        fn pdb_case() -> impl Strategy<Value = PodDisruptionBudget> {
            (
                select(&["a", "b", "kube-system"][..]),
                0u8..4,
                select(&["web", "db", "dns"][..]),
                proptest::option::of(-1i32..3),
                proptest::option::of(prop_oneof![
                    Just(IntOrString::Int(0)),
                    Just(IntOrString::Int(1)),
                    Just(IntOrString::String("0%".into())),
                ]),
                0u32..1000,
            )
                .prop_map(|(namespace, shape, app, allowed, max_unavailable, n)| {
                    let selector = match shape {
                        0 => None,
                        1 => Some(LabelSelector::default()),
                        _ => Some(match_labels(&[("app", app)])),
                    };
                    let mut pdb = pdb(namespace, &format!("pdb{n}"), selector, allowed);
                    if let Some(spec) = pdb.spec.as_mut() {
                        spec.max_unavailable = max_unavailable;
                    }
                    pdb
                })
        }

        fn options() -> impl Strategy<Value = PlanOptions> {
            (
                select(
                    &[
                        DaemonSetHandling::Refuse,
                        DaemonSetHandling::Ignore,
                        DaemonSetHandling::Drain,
                    ][..],
                ),
                any::<(bool, bool, bool, bool, bool)>(),
                proptest::option::of(-5i64..200),
                0u64..30_000,
                proptest::option::of(select(&["app", "app in (web,db)", "app!=dns", "!app"][..])),
            )
                .prop_map(
                    |(
                        daemonsets,
                        (
                            delete_emptydir_data,
                            force,
                            disable_eviction,
                            voluntary,
                            surge_when_blocked,
                        ),
                        grace_period_override,
                        margin_ms,
                        selector,
                    )| {
                        PlanOptions {
                            daemonsets,
                            delete_emptydir_data,
                            force,
                            disable_eviction,
                            grace_period_override,
                            voluntary,
                            margin: Duration::from_millis(margin_ms),
                            pod_selector: selector
                                .map(|s| policy::parse_label_selector(s).unwrap()),
                            surge_when_blocked,
                        }
                    },
                )
        }

        #[derive(Debug, Clone)]
        struct Case {
            pods: Vec<PodCase>,
            pdbs: Vec<PodDisruptionBudget>,
            options: PlanOptions,
            /// Milliseconds from `t(0)`.
            deadline: Option<i64>,
            with_policy: bool,
        }

        fn case() -> impl Strategy<Value = Case> {
            (
                proptest::collection::vec(pod_case(), 0..25),
                proptest::collection::vec(pdb_case(), 0..6),
                options(),
                proptest::option::of(-100_000i64..700_000),
                any::<bool>(),
            )
                .prop_map(|(pods, pdbs, options, deadline, with_policy)| Case {
                    pods,
                    pdbs,
                    options,
                    deadline,
                    with_policy,
                })
        }

        fn at(ms: i64) -> Timestamp {
            t(0).checked_add(SignedDuration::from_millis(ms)).unwrap()
        }

        const POLICY: &str = "
rules:
  - {namespaces: [kube-system], order: 100}
  - {selector: 'app=db', strategy: surge, gracePeriod: 45}
  - {selector: 'app=web', strategy: skip}
";

        fn plan_pods(case: &Case, pods: &[Pod]) -> Plan {
            let mut owners = Owners::new();
            owners.insert("a", "owner0", "web");
            owners.insert("b", "owner1", "api");
            let policy = if case.with_policy {
                ClusterPolicy::from_yaml(POLICY).unwrap()
            } else {
                ClusterPolicy::default()
            };
            plan(PlanInput {
                pods,
                pdbs: &case.pdbs,
                owners: &owners,
                policy: &policy,
                options: &case.options,
                now: t(0),
                deadline: case.deadline.map(at),
            })
        }

        fn run(case: &Case) -> (Vec<Pod>, Plan) {
            let pods: Vec<Pod> = case
                .pods
                .iter()
                .enumerate()
                .map(|(i, c)| build(c, i))
                .collect();
            let plan = plan_pods(case, &pods);
            (pods, plan)
        }

        fn progress_strategy() -> impl Strategy<Value = Vec<StepState>> {
            proptest::collection::vec(
                select(&[StepState::NotStarted, StepState::Started, StepState::Gone][..]),
                25,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Property 1: every input pod appears exactly once.
            #[test]
            fn every_pod_is_accounted_for_once(case in case()) {
                let (pods, plan) = run(&case);
                let mut seen: Vec<&str> = plan
                    .steps
                    .iter()
                    .map(|s| s.uid.as_deref().unwrap())
                    .chain(plan.ignored.iter().map(|p| p.uid.as_deref().unwrap()))
                    .chain(plan.refused.iter().map(|p| p.uid.as_deref().unwrap()))
                    .collect();
                seen.sort_unstable();
                let mut expected: Vec<&str> =
                    pods.iter().map(|p| p.metadata.uid.as_deref().unwrap()).collect();
                expected.sort_unstable();
                prop_assert_eq!(seen, expected);
                prop_assert!(plan.refused.iter().all(|r| !r.reasons.is_empty()));
                prop_assert!(plan.steps.iter().all(|s| s.strategy != policy::Strategy::Skip));
            }

            /// Property 2: DaemonSet and mirror pods are never steps by default.
            #[test]
            fn daemonset_and_mirror_pods_stay_by_default(mut case in case()) {
                case.options.daemonsets = DaemonSetHandling::Ignore;
                let (pods, plan) = run(&case);
                for step in &plan.steps {
                    let pod = pods.iter().find(|p| p.metadata.uid == step.uid).unwrap();
                    prop_assert!(!policy::is_daemonset_pod(pod));
                    prop_assert!(!policy::is_mirror_pod(pod));
                    prop_assert!(step.tier != Tier::DaemonSet);
                }
                // Mirror pods stay whatever the options.
                case.options.daemonsets = DaemonSetHandling::Drain;
                let (pods, plan) = run(&case);
                for step in &plan.steps {
                    let pod = pods.iter().find(|p| p.metadata.uid == step.uid).unwrap();
                    prop_assert!(!policy::is_mirror_pod(pod));
                }
            }

            /// Property: a do-not-disrupt hold exists only on voluntary plans, for a pod that
            /// asks for a valid duration, and ends after the plan's time.
            #[test]
            fn holds_are_voluntary_and_in_the_future(case in case()) {
                let (pods, plan) = run(&case);
                for step in &plan.steps {
                    let Some(hold) = &step.hold else { continue };
                    prop_assert!(plan.voluntary);
                    prop_assert!(hold.until > at(0));
                    let pod = pods.iter().find(|p| p.metadata.uid == step.uid).unwrap();
                    let value = pod.metadata.annotations.as_ref()
                        .and_then(|a| a.get(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT));
                    prop_assert!(
                        matches!(value.map(|v| policy::parse_do_not_disrupt(v)),
                            Some(Ok(Some(policy::DoNotDisrupt::For(_))))),
                        "{:?}", value
                    );
                    prop_assert!(step.blocker.as_deref().is_some_and(|b| b.contains(&hold.until.to_string())));
                }
            }

            /// Property 3: a later wave never starts before earlier waves are gone, unless its
            /// latest start has come; and everything else that may start is returned.
            #[test]
            fn due_steps_respect_waves(
                case in case(),
                states in progress_strategy(),
                now_ms in -100_000i64..800_000,
            ) {
                let (_, plan) = run(&case);
                let mut progress = plan.progress();
                for (i, state) in states.iter().take(plan.steps.len()).enumerate() {
                    progress.set(StepIndex(i), *state);
                }
                let now = at(now_ms);
                let due = plan.due_to_start(&progress, now);
                for (i, step) in plan.steps.iter().enumerate() {
                    let earlier_gone = (0..plan.waves[step.wave].steps.start)
                        .all(|j| progress.get(StepIndex(j)) == StepState::Gone);
                    let forced = step.latest_start.is_some_and(|l| now >= l);
                    let expected = progress.get(StepIndex(i)) == StepState::NotStarted
                        && (earlier_gone || forced);
                    prop_assert_eq!(due.contains(&StepIndex(i)), expected, "step {}", i);
                }
                prop_assert!(due.windows(2).all(|w| w[0] < w[1]));
            }

            /// Property 4: with a deadline, SIGTERM at latest_start leaves the full grace and
            /// the margin before the deadline, and a step whose moment has come is due.
            #[test]
            fn deadline_math_holds(
                mut case in case(),
                deadline_ms in -100_000i64..700_000,
                late_by_ms in 0i64..200_000,
            ) {
                case.deadline = Some(deadline_ms);
                let (_, plan) = run(&case);
                let deadline = at(deadline_ms);
                let margin = plan.margin.as_nanos();
                let progress = plan.progress();
                for (i, step) in plan.steps.iter().enumerate() {
                    prop_assert!(step.grace_seconds >= 1);
                    prop_assert!(
                        step.grace_seconds == 1
                            || i128::from(step.grace_seconds) * 1_000_000_000
                                <= deadline.duration_since(t(0)).as_nanos() - margin
                    );
                    let latest = step.latest_start.unwrap();
                    prop_assert!(
                        latest.as_nanosecond()
                            + i128::from(step.grace_seconds) * 1_000_000_000
                            + margin
                            <= deadline.as_nanosecond()
                    );
                    let late = latest.checked_add(SignedDuration::from_millis(late_by_ms)).unwrap();
                    prop_assert!(plan.due_to_start(&progress, late).contains(&StepIndex(i)));
                    let forced = plan.must_override(StepIndex(i), late);
                    if plan.voluntary {
                        prop_assert_eq!(forced, None);
                    } else {
                        let grace = forced.unwrap();
                        prop_assert!((1..=step.grace_seconds).contains(&grace));
                    }
                }
            }

            /// Property 5: steps sorted by (order, tier); waves partition them.
            #[test]
            fn steps_are_sorted_and_waves_partition_them(case in case()) {
                let (_, plan) = run(&case);
                prop_assert!(plan
                    .steps
                    .windows(2)
                    .all(|w| (w[0].order, w[0].tier) <= (w[1].order, w[1].tier)));
                let mut next = 0;
                for (n, wave) in plan.waves.iter().enumerate() {
                    prop_assert_eq!(wave.steps.start, next);
                    prop_assert!(!wave.steps.is_empty());
                    for i in wave.steps.clone() {
                        let step = &plan.steps[i];
                        prop_assert_eq!(
                            (step.order, step.tier, step.wave),
                            (wave.order, wave.tier, n)
                        );
                    }
                    next = wave.steps.end;
                }
                prop_assert_eq!(next, plan.steps.len());
                prop_assert!(plan
                    .waves
                    .windows(2)
                    .all(|w| (w[0].order, w[0].tier) < (w[1].order, w[1].tier)));
            }

            /// Plans do not depend on the order the API listed pods in.
            #[test]
            fn plan_ignores_input_order(case in case(), seed in any::<u64>()) {
                let (_, expected) = run(&case);
                // A permutation from the seed (multiplying by an odd number and rotating are
                // both bijections on u64), keeping each pod's uid.
                let mut indexed: Vec<(usize, &PodCase)> = case.pods.iter().enumerate().collect();
                indexed.sort_by_key(|(i, _)| (*i as u64).wrapping_mul(seed | 1).rotate_left(17));
                let pods: Vec<Pod> = indexed.iter().map(|(i, c)| build(c, *i)).collect();
                prop_assert_eq!(plan_pods(&case, &pods), expected);
            }
        }
    }
}
