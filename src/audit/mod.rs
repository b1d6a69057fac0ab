//! `nodedrain audit`: find the workloads that will break the next drain, before it happens.
//!
//! The core is pure: [`audit`] turns an [`Inventory`] (everything listed once from the API) and an
//! [`AuditConfig`] into a [`Report`]. Every question about what a pod's annotations mean is
//! answered by the drain planner's policy code ([`crate::drain::policy`]), so the audit and the
//! drain can never disagree about a strategy. Listing the objects ([`collect`]) is the only I/O,
//! and it only reads.
//!
//! The audit looks at workloads (a Deployment, not its ReplicaSets and pods): findings are about
//! what the owner must change, which is the pod template. Live pods add what templates cannot
//! say: where they run (spot nodes) and which PodDisruptionBudgets select them.

mod checks;
mod collect;
mod load_balancers;
mod prestop;
mod scheduling;
#[cfg(test)]
mod tests;
mod text;
mod workloads;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use serde::Serialize;

use crate::drain::plan::DEFAULT_MARGIN;
use crate::drain::policy::{ClusterPolicy, LabelSelectorExpr};

pub use collect::{AuditError, collect};
pub use load_balancers::{
    AuditedBinding, AwsAccess, AwsArgsError, DescribedGroup, LoadBalancers, aws_access,
    collect as collect_load_balancers,
};

/// How long AWS warns before it reclaims a spot instance (the EventBridge "EC2 Spot Instance
/// Interruption Warning" comes two minutes ahead).
pub const SPOT_WARNING: Duration = Duration::from_secs(120);

/// Version of the JSON report; bumped only for changes that break readers (new finding ids and
/// new optional fields are not breaking). Documented by `docs/audit-report.schema.json`.
pub const REPORT_API_VERSION: &str = "nodedrain.io/v1";

/// What [`collect`] lists: one namespace, or all of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditScope {
    /// `None` means every namespace.
    pub namespace: Option<String>,
}

/// Everything the audit looks at, listed once. Namespaced kinds hold the scope's objects;
/// Nodes and PriorityClasses are cluster-wide.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub scope: AuditScope,
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
    pub replica_sets: Vec<ReplicaSet>,
    pub daemon_sets: Vec<DaemonSet>,
    pub jobs: Vec<Job>,
    pub pods: Vec<Pod>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub services: Vec<Service>,
    pub priority_classes: Vec<PriorityClass>,
    pub nodes: Vec<Node>,
    /// TargetGroupBindings, their namespaces' labels, and what ELBv2 says of the target groups
    /// ([`collect_load_balancers`]); empty without them.
    pub load_balancers: LoadBalancers,
    /// What could not be listed and what the audit therefore cannot judge (for example Nodes
    /// without cluster-wide read access: no spot detection). Copied into [`Report::notes`].
    pub notes: Vec<String>,
}

/// The audit's settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The notice a spot interruption gives; [`SPOT_WARNING`].
    pub spot_warning: Duration,
    /// The planner's slack before a deadline; [`DEFAULT_MARGIN`].
    pub margin: Duration,
    /// A deadline the operator's drains run under (e.g. an ASG lifecycle hook's heartbeat). When
    /// set, grace periods are measured against it instead of the spot warning.
    pub deadline: Option<Duration>,
    /// The cluster drain policy, as the planner applies it.
    pub policy: ClusterPolicy,
    /// Only workloads whose pods match (`--selector`); PDBs without pods match by their own
    /// labels. The selector's text for the report is in [`AuditConfig::selector_text`].
    pub selector: Option<LabelSelectorExpr>,
    /// The selector as the user wrote it, echoed in the report.
    pub selector_text: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            spot_warning: SPOT_WARNING,
            margin: DEFAULT_MARGIN,
            deadline: None,
            policy: ClusterPolicy::default(),
            selector: None,
            selector_text: None,
        }
    }
}

impl AuditConfig {
    /// The longest grace a pod can get before its node goes: the deadline (or spot warning)
    /// minus the planner's margin, in whole seconds, never negative.
    pub fn grace_limit_seconds(&self) -> i64 {
        let budget = self.deadline.unwrap_or(self.spot_warning);
        budget.saturating_sub(self.margin).as_secs() as i64
    }
}

/// How bad a finding is. Ordered: `Info < Warning < Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; nothing is known to break.
    Info,
    /// The drain goes through, but something is lost or slower than it needs to be (downtime
    /// of a workload nobody calls through a Service, lost scratch data, a restarted Job).
    Warning,
    /// The next drain will block on it, or requests will fail during it.
    Error,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stable code of a finding; its kebab-case name is part of the JSON contract (CI gates may
/// match on it) and is listed in `docs/audit-report.schema.json` and `docs/audit.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingId {
    /// A PDB allows no disruption at the workload's replica count.
    PdbBlocksAllDisruptions,
    /// One replica, and the strategy is not `surge`: downtime on every drain.
    SingleReplicaWithoutSurge,
    /// `surge` on a pod no Deployment owns: the planner evicts it instead.
    SurgeNeedsDeployment,
    /// A pod is selected by more than one PDB: the Eviction API refuses it.
    MultiplePdbs,
    /// Pods not Ready now under a PDB with `unhealthyPodEvictionPolicy: IfHealthyBudget` whose
    /// budget is not met: the Eviction API refuses them although they serve nothing.
    UnhealthyPodsBlockEviction,
    /// A PDB that selects no pod and no pod template.
    PdbSelectsNothing,
    /// A workload that can run on spot nodes and has no PDB.
    NoPdbOnSpot,
    /// The pod's grace is longer than the deadline (spot warning) minus the margin leaves.
    GraceExceedsDeadline,
    /// Behind a Service, and a serving container has no preStop hook.
    NoPrestopBehindService,
    /// Behind a Service, and the preStop hook ends before the readiness probe can fail.
    PrestopShorterThanReadinessWindow,
    /// Behind a Service, and how long the preStop hook lasts cannot be read from the spec.
    PrestopDurationUnknown,
    /// A pod no controller recreates.
    BarePod,
    /// emptyDir volumes without `nodedrain.io/allow-local-data-loss: "true"`.
    EmptydirWithoutDataLossOptIn,
    /// A Job (or CronJob) whose pods are evicted instead of waited for.
    JobWithoutWait,
    /// A nodedrain (or Karpenter / cluster-autoscaler) annotation with an unusable value.
    InvalidAnnotation,
    /// A `nodedrain.io/` annotation key nodedrain does not read (a typo, usually).
    UnknownAnnotation,
    /// A pod annotation written on the workload's own metadata instead of its pod template.
    AnnotationOnWorkloadMetadata,
    /// A target group keeps deregistered targets draining for longer than the deadline (spot
    /// warning) minus the margin leaves.
    DeregistrationDelayExceedsDeadline,
    /// Pods that are IP targets have no preStop hook and a grace shorter than their group's
    /// deregistration delay.
    IpTargetWithoutPrestop,
    /// A TargetGroupBinding with IP targets in a namespace without the AWS Load Balancer
    /// Controller's readiness-gate injection label.
    ReadinessGateNotInjected,
}

impl FindingId {
    /// Every id, in documentation order.
    pub const ALL: [FindingId; 20] = [
        FindingId::PdbBlocksAllDisruptions,
        FindingId::SingleReplicaWithoutSurge,
        FindingId::SurgeNeedsDeployment,
        FindingId::MultiplePdbs,
        FindingId::UnhealthyPodsBlockEviction,
        FindingId::PdbSelectsNothing,
        FindingId::NoPdbOnSpot,
        FindingId::GraceExceedsDeadline,
        FindingId::NoPrestopBehindService,
        FindingId::PrestopShorterThanReadinessWindow,
        FindingId::PrestopDurationUnknown,
        FindingId::BarePod,
        FindingId::EmptydirWithoutDataLossOptIn,
        FindingId::JobWithoutWait,
        FindingId::InvalidAnnotation,
        FindingId::UnknownAnnotation,
        FindingId::AnnotationOnWorkloadMetadata,
        FindingId::DeregistrationDelayExceedsDeadline,
        FindingId::IpTargetWithoutPrestop,
        FindingId::ReadinessGateNotInjected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingId::PdbBlocksAllDisruptions => "pdb-blocks-all-disruptions",
            FindingId::SingleReplicaWithoutSurge => "single-replica-without-surge",
            FindingId::SurgeNeedsDeployment => "surge-needs-deployment",
            FindingId::MultiplePdbs => "multiple-pdbs",
            FindingId::UnhealthyPodsBlockEviction => "unhealthy-pods-block-eviction",
            FindingId::PdbSelectsNothing => "pdb-selects-nothing",
            FindingId::NoPdbOnSpot => "no-pdb-on-spot",
            FindingId::GraceExceedsDeadline => "grace-exceeds-deadline",
            FindingId::NoPrestopBehindService => "no-prestop-behind-service",
            FindingId::PrestopShorterThanReadinessWindow => "prestop-shorter-than-readiness-window",
            FindingId::PrestopDurationUnknown => "prestop-duration-unknown",
            FindingId::BarePod => "bare-pod",
            FindingId::EmptydirWithoutDataLossOptIn => "emptydir-without-data-loss-opt-in",
            FindingId::JobWithoutWait => "job-without-wait",
            FindingId::InvalidAnnotation => "invalid-annotation",
            FindingId::UnknownAnnotation => "unknown-annotation",
            FindingId::AnnotationOnWorkloadMetadata => "annotation-on-workload-metadata",
            FindingId::DeregistrationDelayExceedsDeadline => {
                "deregistration-delay-exceeds-deadline"
            }
            FindingId::IpTargetWithoutPrestop => "ip-target-without-prestop",
            FindingId::ReadinessGateNotInjected => "readiness-gate-not-injected",
        }
    }
}

impl fmt::Display for FindingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FindingId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One problem with one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: FindingId,
    pub severity: Severity,
    /// What is wrong and what it does to a drain, with the numbers that show it.
    pub message: String,
    /// The concrete change that removes the finding.
    pub fix: String,
}

/// A workload and its findings. Pods without a controller are their own workload (kind `Pod`);
/// a PDB that selects nothing is reported as a workload of kind `PodDisruptionBudget`, a
/// TargetGroupBinding with findings as kind `TargetGroupBinding`, and a target group named in
/// the configuration as kind `TargetGroup` with an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadReport {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Desired replicas (Deployment, StatefulSet, ReplicaSet), scheduled pods (DaemonSet),
    /// parallelism (Job), 1 for a pod; `None` for a PDB.
    pub replicas: Option<i32>,
    /// Drained in the critical tier (system-*-critical priority), after the other pods.
    pub critical: bool,
    /// Most severe first, then by id; may be empty (the workload was audited and is fine).
    pub findings: Vec<Finding>,
}

impl WorkloadReport {
    /// The most severe finding's severity.
    pub fn highest_severity(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }
}

/// What was audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportScope {
    /// `None` means every namespace.
    pub namespace: Option<String>,
    pub selector: Option<String>,
}

/// The numbers the findings were judged by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportSettings {
    pub spot_warning_seconds: u64,
    pub margin_seconds: u64,
    pub deadline_seconds: Option<u64>,
    /// `(deadline or spot warning) - margin`: the longest grace a pod can get.
    pub grace_limit_seconds: i64,
    /// Rules in the cluster policy file (0 without `--policy`).
    pub policy_rules: usize,
}

/// Counts over the whole report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Workloads audited (including PDBs reported as workloads).
    pub workloads: usize,
    pub workloads_with_findings: usize,
    pub errors: usize,
    pub warnings: usize,
    pub infos: usize,
    pub highest_severity: Option<Severity>,
}

/// The audit's result; serialised as the `--output json` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// [`REPORT_API_VERSION`].
    pub api_version: &'static str,
    /// Always `AuditReport`.
    pub kind: &'static str,
    pub scope: ReportScope,
    pub settings: ReportSettings,
    pub summary: Summary,
    /// Limits of this report (objects that could not be listed).
    pub notes: Vec<String>,
    /// Sorted by namespace, kind, name.
    pub workloads: Vec<WorkloadReport>,
}

impl Report {
    /// Whether any finding is at least this severe (for `--fail-on`).
    pub fn has_findings_at_or_above(&self, severity: Severity) -> bool {
        self.summary
            .highest_severity
            .is_some_and(|highest| highest >= severity)
    }

    /// The readable form (`--output text`): findings grouped by workload, then a summary.
    pub fn to_text(&self) -> String {
        text::render(self)
    }

    /// Every (workload, finding id) pair, as `Kind/namespace/name` strings; handy for tests and
    /// scripts.
    pub fn finding_pairs(&self) -> Vec<(String, FindingId)> {
        self.workloads
            .iter()
            .flat_map(|w| {
                w.findings
                    .iter()
                    .map(move |f| (format!("{}/{}/{}", w.kind, w.namespace, w.name), f.id))
            })
            .collect()
    }
}

/// Audits every workload in the inventory. Total: never fails and never panics, whatever the
/// objects look like.
pub fn audit(inventory: &Inventory, config: &AuditConfig) -> Report {
    let workloads = workloads::group(inventory);
    let mut reports = checks::run(inventory, config, &workloads);
    load_balancers::check(inventory, config, &workloads, &mut reports);
    reports.sort_by(|a, b| (&a.namespace, &a.kind, &a.name).cmp(&(&b.namespace, &b.kind, &b.name)));
    for report in &mut reports {
        report
            .findings
            .sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(&b.id)));
    }

    let mut summary = Summary {
        workloads: reports.len(),
        ..Summary::default()
    };
    let mut by_severity: BTreeMap<Severity, usize> = BTreeMap::new();
    for report in &reports {
        if !report.findings.is_empty() {
            summary.workloads_with_findings += 1;
        }
        for finding in &report.findings {
            *by_severity.entry(finding.severity).or_default() += 1;
        }
    }
    summary.errors = by_severity.get(&Severity::Error).copied().unwrap_or(0);
    summary.warnings = by_severity.get(&Severity::Warning).copied().unwrap_or(0);
    summary.infos = by_severity.get(&Severity::Info).copied().unwrap_or(0);
    summary.highest_severity = by_severity.keys().next_back().copied();

    let mut notes = inventory.notes.clone();
    if reports.is_empty() {
        notes.push(match &inventory.scope.namespace {
            Some(ns) => format!("no workloads found in namespace {ns}"),
            None => "no workloads found".to_string(),
        });
    }

    Report {
        api_version: REPORT_API_VERSION,
        kind: "AuditReport",
        scope: ReportScope {
            namespace: inventory.scope.namespace.clone(),
            selector: config.selector_text.clone(),
        },
        settings: ReportSettings {
            spot_warning_seconds: config.spot_warning.as_secs(),
            margin_seconds: config.margin.as_secs(),
            deadline_seconds: config.deadline.map(|d| d.as_secs()),
            grace_limit_seconds: config.grace_limit_seconds(),
            policy_rules: config.policy.rules.len(),
        },
        summary,
        notes,
        workloads: reports,
    }
}
