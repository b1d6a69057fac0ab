//! The findings: one function per concern, each reading a workload through the planner's policy
//! functions and pushing what it finds. Severities follow one rule: `error` when the next drain
//! will block on the workload or requests to it will fail, `warning` when the drain goes through
//! but something is lost, `info` when the audit cannot tell.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::prestop::{self, PreStop};
use super::scheduling;
use super::workloads::{Workload, WorkloadKey};
use super::{AuditConfig, Finding, FindingId, Inventory, Severity, WorkloadReport};
use crate::drain::policy::{self, LabelSelectorExpr, PodPolicy, Strategy};
use crate::names;

/// The pod annotations nodedrain reads, for unknown-key and misplaced-annotation findings.
const KNOWN_ANNOTATIONS: [&str; 4] = [
    names::ANNOTATION_STRATEGY,
    names::ANNOTATION_ORDER,
    names::ANNOTATION_GRACE_PERIOD,
    names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS,
];

/// Pod annotations that do nothing on a workload's own metadata.
const POD_ONLY_ANNOTATIONS: [&str; 6] = [
    names::ANNOTATION_STRATEGY,
    names::ANNOTATION_ORDER,
    names::ANNOTATION_GRACE_PERIOD,
    names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS,
    names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
    names::ANNOTATION_CA_SAFE_TO_EVICT,
];

fn finding(id: FindingId, severity: Severity, message: String, fix: String) -> Finding {
    Finding {
        id,
        severity,
        message,
        fix,
    }
}

fn plural(n: impl Into<i64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Where the owner writes pod annotations and the pod spec for this kind of workload.
fn template_path(kind: &str) -> &'static str {
    match kind {
        "Pod" => "the pod's metadata (recreate the pod)",
        "CronJob" => "spec.jobTemplate.spec.template",
        _ => "spec.template",
    }
}

fn annotations_path(kind: &str) -> String {
    match kind {
        "Pod" => "the pod's metadata.annotations".to_string(),
        _ => format!("{}.metadata.annotations", template_path(kind)),
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    let shown: Vec<String> = labels
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "pod-template-hash"
                    | "controller-revision-hash"
                    | "statefulset.kubernetes.io/pod-name"
                    | "apps.kubernetes.io/pod-index"
                    | "batch.kubernetes.io/controller-uid"
                    | "controller-uid"
            )
        })
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    format!("{{{}}}", shown.join(", "))
}

fn names_of<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

/// Edit distance, for "did you mean" on annotation keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// PodDisruptionBudget arithmetic
// ---------------------------------------------------------------------------------------------

/// `intstr.GetScaledValueFromIntOrPercent(value, total, roundUp=true)`, as the disruption
/// controller uses it; `None` for a value the API would not have accepted.
fn scaled(value: &IntOrString, total: i32) -> Option<i32> {
    match value {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(s) => {
            let percent: i64 = s.trim().strip_suffix('%')?.parse().ok()?;
            let total = i64::from(total);
            Some(((percent * total + 99) / 100).clamp(0, i64::from(i32::MAX)) as i32)
        }
    }
}

/// The disruption controller's `disruptionsAllowed` when `healthy` of the `expected` pods are
/// healthy: maxUnavailable first, then minAvailable, else everything.
pub(crate) fn disruptions_allowed(
    pdb: &PodDisruptionBudget,
    expected: i32,
    healthy: i32,
) -> Option<i32> {
    let spec = pdb.spec.as_ref()?;
    let desired_healthy = if let Some(max) = &spec.max_unavailable {
        (expected - scaled(max, expected)?).max(0)
    } else if let Some(min) = &spec.min_available {
        scaled(min, expected)?
    } else {
        0
    };
    Some((healthy - desired_healthy).max(0))
}

fn budget_text(pdb: &PodDisruptionBudget) -> String {
    let spec = pdb.spec.as_ref();
    let show = |v: &IntOrString| match v {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    };
    if let Some(max) = spec.and_then(|s| s.max_unavailable.as_ref()) {
        format!("maxUnavailable: {}", show(max))
    } else if let Some(min) = spec.and_then(|s| s.min_available.as_ref()) {
        format!("minAvailable: {}", show(min))
    } else {
        "no budget".to_string()
    }
}

fn pdb_name(pdb: &PodDisruptionBudget) -> &str {
    pdb.metadata.name.as_deref().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The audit of one workload
// ---------------------------------------------------------------------------------------------

struct Context<'a> {
    inventory: &'a Inventory,
    config: &'a AuditConfig,
    spot_nodes: Vec<&'a Node>,
    nodes_by_name: BTreeMap<&'a str, &'a Node>,
    /// Per PDB (index into `inventory.pdbs`): the pods it expects, summed over the workloads
    /// it selects.
    expected: Vec<i32>,
}

struct Subject<'w, 'a> {
    w: &'w Workload<'a>,
    resolved: PodPolicy,
    /// After the planner's fallback: `surge` on a non-Deployment is evicted.
    strategy: Strategy,
    /// Indices into `inventory.pdbs`.
    pdbs: Vec<usize>,
    services: Vec<&'a Service>,
}

impl Subject<'_, '_> {
    fn kind(&self) -> &str {
        &self.w.kind
    }

    fn uses_eviction(&self) -> bool {
        matches!(self.strategy, Strategy::Evict | Strategy::Surge)
    }

    fn service_names(&self) -> String {
        names_of(
            self.services
                .iter()
                .map(|s| s.metadata.name.as_deref().unwrap_or_default()),
        )
    }
}

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(spec) = service.spec.as_ref() else {
        return false;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return false;
    };
    service.metadata.namespace == pod.metadata.namespace
        && selector
            .iter()
            .all(|(k, v)| policy::pod_labels(pod).get(k) == Some(v))
}

fn covering_pdbs(inventory: &Inventory, w: &Workload<'_>) -> Vec<usize> {
    let pods = w.pods();
    inventory
        .pdbs
        .iter()
        .enumerate()
        .filter(|(_, pdb)| pods.iter().any(|pod| policy::pdb_matches_pod(pdb, pod)))
        .map(|(i, _)| i)
        .collect()
}

/// Runs every check on every workload (and on the PDBs), honouring the selector.
pub(crate) fn run(
    inventory: &Inventory,
    config: &AuditConfig,
    workloads: &BTreeMap<WorkloadKey, Workload<'_>>,
) -> Vec<WorkloadReport> {
    let mut expected = vec![0; inventory.pdbs.len()];
    let mut covers = BTreeMap::new();
    for (key, w) in workloads {
        let pdbs = covering_pdbs(inventory, w);
        for &i in &pdbs {
            expected[i] += w.replicas.max(0);
        }
        covers.insert(key.clone(), pdbs);
    }
    let ctx = Context {
        inventory,
        config,
        spot_nodes: inventory
            .nodes
            .iter()
            .filter(|n| scheduling::is_spot_node(n))
            .collect(),
        nodes_by_name: inventory
            .nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n)))
            .collect(),
        expected,
    };

    let mut reports = Vec::new();
    for (key, w) in workloads {
        if let Some(selector) = &config.selector
            && !w
                .pods()
                .iter()
                .chain(std::iter::once(&&w.template))
                .any(|p| selector.matches(policy::pod_labels(p)))
        {
            continue;
        }
        let resolved = policy::pod_policy(&w.template, &config.policy, true);
        let strategy = match resolved.strategy {
            Strategy::Surge if w.kind != "Deployment" => Strategy::Evict,
            other => other,
        };
        let subject = Subject {
            w,
            strategy,
            resolved,
            pdbs: covers.get(key).cloned().unwrap_or_default(),
            services: inventory
                .services
                .iter()
                .filter(|s| w.pods().iter().any(|p| selects(s, p)))
                .collect(),
        };
        let mut findings = Vec::new();
        audit_workload(&ctx, &subject, &mut findings);
        reports.push(WorkloadReport {
            kind: w.kind.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            replicas: Some(w.replicas),
            critical: policy::is_critical(&w.template)
                || w.live.iter().any(|p| policy::is_critical(p)),
            findings,
        });
    }
    reports.extend(pdbs_selecting_nothing(inventory, config, workloads));
    reports
}

fn audit_workload(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    annotations(s, out);
    // DaemonSet pods stay on a draining node (the DaemonSet controller would put them straight
    // back) and `skip` pods are never touched: nothing else about them matters to a drain.
    if s.kind() == "DaemonSet" || s.resolved.strategy == Strategy::Skip {
        return;
    }
    // Scaled to zero: nothing to drain.
    if s.w.has_scale && s.w.replicas <= 0 && s.w.live.is_empty() {
        return;
    }
    bare_pod(s, out);
    job_without_wait(s, out);
    empty_dir(s, out);
    grace(ctx, s, out);
    surge_needs_deployment(s, out);
    single_replica(s, out);
    if s.uses_eviction() {
        multiple_pdbs(ctx, s, out);
        pdb_blocks(ctx, s, out);
        unhealthy_pods_blocked(ctx, s, out);
        no_pdb_on_spot(ctx, s, out);
    }
    prestop(s, out);
}

fn annotation_fix(key: &str) -> &'static str {
    match key {
        names::ANNOTATION_STRATEGY => {
            "set it to one of evict, surge, wait, delete, skip (lowercase), or remove it"
        }
        names::ANNOTATION_ORDER => {
            "set it to an integer such as \"10\" (lower drains first), or remove it"
        }
        names::ANNOTATION_GRACE_PERIOD => {
            "set it to a whole number of seconds such as \"30\", or remove it"
        }
        names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT => {
            "set it to \"true\" or to a duration in Go's syntax such as \"30m\" or \"1h30m\" \
             (Karpenter's grammar: no days, no spaces), or remove it"
        }
        names::ANNOTATION_CA_SAFE_TO_EVICT => "set it to \"false\" or \"true\"",
        _ => "set it to \"true\" or \"false\"",
    }
}

fn annotations(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    let path = annotations_path(s.kind());
    let mut warnings = s.resolved.warnings.clone();
    if let Err(warning) = policy::allows_local_data_loss(&s.w.template) {
        warnings.push(warning);
    }
    for warning in warnings {
        out.push(finding(
            FindingId::InvalidAnnotation,
            Severity::Warning,
            format!("{warning}; nodedrain applies the default instead"),
            format!(
                "{} ({} in {path})",
                annotation_fix(warning.annotation),
                warning.annotation
            ),
        ));
    }

    let template_annotations =
        s.w.template
            .metadata
            .annotations
            .clone()
            .unwrap_or_default();
    for key in template_annotations.keys() {
        if !key.starts_with(names::ANNOTATION_PREFIX) || KNOWN_ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        let nearest = KNOWN_ANNOTATIONS
            .iter()
            .map(|known| (distance(key, known), *known))
            .min()
            .filter(|(d, _)| *d <= 3);
        out.push(finding(
            FindingId::UnknownAnnotation,
            Severity::Warning,
            format!(
                "{key} is not an annotation nodedrain reads (it reads {}), so it has no effect",
                names_of(KNOWN_ANNOTATIONS)
            ),
            match nearest {
                Some((_, known)) => format!("rename it to {known} in {path}"),
                None => format!("remove it from {path}"),
            },
        ));
    }

    if s.kind() != "Pod" {
        for key in POD_ONLY_ANNOTATIONS {
            let Some(value) = s.w.own_annotations.get(key) else {
                continue;
            };
            if template_annotations.contains_key(key) {
                continue;
            }
            out.push(finding(
                FindingId::AnnotationOnWorkloadMetadata,
                Severity::Warning,
                format!(
                    "{key}: {value:?} is on the {}'s own metadata, which nodedrain never reads; \
                     its pods do not have it",
                    s.kind()
                ),
                format!("move it to {path}"),
            ));
        }
    }
}

fn bare_pod(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if s.kind() != "Pod" {
        return;
    }
    out.push(finding(
        FindingId::BarePod,
        Severity::Error,
        "no controller manages this pod: a drain refuses to start without --force, and once \
         the pod is deleted nothing recreates it"
            .to_string(),
        format!(
            "run it from a Deployment (long-running) or a Job (one-off work); if it may simply \
             die with the node, add {}: skip to its annotations",
            names::ANNOTATION_STRATEGY
        ),
    ));
}

fn job_without_wait(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if !matches!(s.kind(), "Job" | "CronJob") || s.resolved.strategy == Strategy::Wait {
        return;
    }
    let mut message = format!(
        "strategy {} ({}): a drain evicts the running pod and the Job starts it again from the \
         beginning on another node",
        s.resolved.strategy, s.resolved.strategy_reason
    );
    if let Some(job) = s.w.job
        && job.backoff_limit == 0
        && !job.has_pod_failure_policy
    {
        message
            .push_str("; with backoffLimit 0 and no podFailurePolicy the eviction fails the Job");
    }
    if s.w.job.is_some_and(|job| job.finished) && s.w.live.is_empty() {
        message.push_str(" (this run has finished: the finding is about the next one)");
    }
    out.push(finding(
        FindingId::JobWithoutWait,
        Severity::Warning,
        message,
        format!(
            "add {}: wait to {} so a drain lets the run finish (until the deadline of an \
             interruption)",
            names::ANNOTATION_STRATEGY,
            annotations_path(s.kind())
        ),
    ));
}

fn empty_dir(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if !policy::uses_empty_dir(&s.w.template)
        || policy::allows_local_data_loss(&s.w.template) == Ok(true)
    {
        return;
    }
    let volumes: Vec<&str> =
        s.w.template
            .spec
            .iter()
            .flat_map(|spec| spec.volumes.iter().flatten())
            .filter(|v| v.empty_dir.is_some())
            .map(|v| v.name.as_str())
            .collect();
    out.push(finding(
        FindingId::EmptydirWithoutDataLossOptIn,
        Severity::Warning,
        format!(
            "emptyDir {} {}: the data is deleted when the pod leaves the node, and a drain \
             refuses the pod without --delete-emptydir-data",
            if volumes.len() == 1 {
                "volume"
            } else {
                "volumes"
            },
            names_of(volumes.iter().copied())
        ),
        format!(
            "if the data may be lost, add {}: \"true\" to {}; otherwise keep it on a \
             PersistentVolume",
            names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS,
            annotations_path(s.kind())
        ),
    ));
}

fn grace(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    let limit = ctx.config.grace_limit_seconds();
    let from_annotation = s.resolved.grace_seconds.is_some()
        && s.w
            .template
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(names::ANNOTATION_GRACE_PERIOD))
            .is_some_and(|v| v.trim().parse::<i64>().is_ok_and(|g| g >= 0));
    let (grace, source) = match s.resolved.grace_seconds {
        Some(grace) if from_annotation => (grace, names::ANNOTATION_GRACE_PERIOD.to_string()),
        Some(grace) => (grace, "the cluster policy's gracePeriod".to_string()),
        None => (
            policy::pod_grace_seconds(&s.w.template),
            "terminationGracePeriodSeconds".to_string(),
        ),
    };
    if grace <= limit {
        return;
    }
    let margin = ctx.config.margin.as_secs();
    let budget = match ctx.config.deadline {
        Some(deadline) => format!("the {} s deadline", deadline.as_secs()),
        None => format!(
            "a spot interruption's {} s warning",
            ctx.config.spot_warning.as_secs()
        ),
    };
    let fix = if from_annotation {
        format!(
            "lower {} to {limit} or less in {}",
            names::ANNOTATION_GRACE_PERIOD,
            annotations_path(s.kind())
        )
    } else {
        format!(
            "make shutdown finish within {limit} s and set terminationGracePeriodSeconds: {limit} \
             or less in {}.spec (or {}: \"{limit}\" to ask for less only when nodedrain evicts)",
            template_path(s.kind()),
            names::ANNOTATION_GRACE_PERIOD
        )
    };
    out.push(finding(
        FindingId::GraceExceedsDeadline,
        Severity::Error,
        format!(
            "{source} is {grace} s, but {budget} minus the {margin} s margin leaves {limit} s: \
             nodedrain cuts the grace to {limit} s and the pod is killed {} s before its \
             shutdown would end",
            grace - limit
        ),
        fix,
    ));
}

fn surge_needs_deployment(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if s.resolved.strategy != Strategy::Surge || s.kind() == "Deployment" {
        return;
    }
    out.push(finding(
        FindingId::SurgeNeedsDeployment,
        Severity::Warning,
        format!(
            "strategy surge ({}) needs a Deployment to start a replacement first; nodedrain \
             evicts this {}'s pods instead",
            s.resolved.strategy_reason,
            s.kind()
        ),
        if s.kind() == "Pod" {
            format!(
                "remove {} from the pod's annotations",
                names::ANNOTATION_STRATEGY
            )
        } else {
            format!(
                "remove {} from {}, and run at least 2 replicas under a PDB with \
                 maxUnavailable: 1",
                names::ANNOTATION_STRATEGY,
                annotations_path(s.kind())
            )
        },
    ));
}

fn single_replica(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if !s.w.has_scale || s.w.replicas != 1 || s.strategy == Strategy::Surge {
        return;
    }
    let (severity, serving) = if s.services.is_empty() {
        (Severity::Warning, "no pod of it runs".to_string())
    } else {
        (
            Severity::Error,
            format!(
                "Service {} has no pod to send requests to",
                s.service_names()
            ),
        )
    };
    let fix = if s.kind() == "Deployment" {
        format!(
            "add {}: surge to {} (a Ready replacement starts before the eviction), or run at \
             least 2 replicas",
            names::ANNOTATION_STRATEGY,
            annotations_path(s.kind())
        )
    } else if s.kind() == "StatefulSet" {
        "run at least 2 replicas (surge needs a Deployment: a StatefulSet pod keeps its \
         identity, so its replacement cannot start before it is gone)"
            .to_string()
    } else {
        "run at least 2 replicas (surge needs a Deployment)".to_string()
    };
    out.push(finding(
        FindingId::SingleReplicaWithoutSurge,
        severity,
        format!(
            "1 replica with strategy {} ({}): from the eviction until the replacement is Ready \
             elsewhere, {serving}",
            s.strategy, s.resolved.strategy_reason
        ),
        fix,
    ));
}

/// The names of up to five pods (of the workload's namespace), then how many more: enough to
/// find them with kubectl.
pub(crate) fn pod_list(pods: &[&Pod]) -> String {
    const SHOWN: usize = 5;
    let mut text = names_of(
        pods.iter()
            .take(SHOWN)
            .map(|p| p.metadata.name.as_deref().unwrap_or_default()),
    );
    if pods.len() > SHOWN {
        text.push_str(&format!(" and {} more", pods.len() - SHOWN));
    }
    text
}

fn multiple_pdbs(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    let pods = s.w.pods();
    let mut overlapping = 0;
    let mut overlapping_pods: Vec<&Pod> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for pod in &pods {
        let matching: Vec<&str> = s
            .pdbs
            .iter()
            .map(|&i| &ctx.inventory.pdbs[i])
            .filter(|pdb| policy::pdb_matches_pod(pdb, pod))
            .map(pdb_name)
            .collect();
        if matching.len() > 1 {
            overlapping += 1;
            overlapping_pods.push(pod);
            for name in matching {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    if overlapping == 0 {
        return;
    }
    names.sort();
    // The pods by name, so `kubectl get pod` finds them; the template stands for pods to come.
    let which = if s.w.live.is_empty() {
        "its pods are".to_string()
    } else {
        format!(
            "{overlapping} of its {} ({}) {}",
            plural(pods.len() as i64, "pod", "pods"),
            pod_list(&overlapping_pods),
            if overlapping == 1 { "is" } else { "are" }
        )
    };
    out.push(finding(
        FindingId::MultiplePdbs,
        Severity::Error,
        format!(
            "{which} selected by {} PDBs ({}): the Eviction API refuses to evict a pod that \
             more than one PDB selects, so every eviction fails",
            names.len(),
            names_of(names.iter().copied())
        ),
        format!(
            "make the selectors of PDBs {} disjoint so each pod has exactly one, or merge them",
            names_of(names.iter().copied())
        ),
    ));
}

fn pdb_blocks(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    let surge = s.strategy == Strategy::Surge;
    for &i in &s.pdbs {
        let pdb = &ctx.inventory.pdbs[i];
        let expected = ctx.expected[i];
        if expected <= 0 {
            continue;
        }
        // A surge adds a Ready replica before the eviction (and the scale with it).
        let at = if surge { expected + 1 } else { expected };
        if disruptions_allowed(pdb, at, at) != Some(0) {
            continue;
        }
        let name = pdb_name(pdb);
        let budget = budget_text(pdb);
        let spec = pdb.spec.as_ref();
        let pods = if expected == s.w.replicas {
            plural(expected, "replica", "replicas")
        } else {
            format!("{} it selects", plural(expected, "pod", "pods"))
        };
        let message = if surge {
            format!(
                "PDB {name} ({budget}) allows 0 disruptions even after a surge adds a replica \
                 ({at} pods): every eviction is refused, so a drain waits until its timeout and \
                 a spot interruption deletes the pod past the PDB at the deadline"
            )
        } else {
            format!(
                "PDB {name} ({budget}) allows 0 disruptions at {pods}: every eviction is \
                 refused, so a drain waits until its timeout and a spot interruption deletes the \
                 pod past the PDB at the deadline"
            )
        };
        let fix = if spec.and_then(|s| s.max_unavailable.as_ref()).is_some() {
            format!("set maxUnavailable: 1 on PDB {name}")
        } else if expected == 1 && s.kind() == "Deployment" {
            format!(
                "add {}: surge to {} (the replacement starts first, so the PDB allows the \
                 eviction), or replace minAvailable with maxUnavailable: 1 on PDB {name}",
                names::ANNOTATION_STRATEGY,
                annotations_path(s.kind())
            )
        } else if let Some(IntOrString::Int(min)) = spec.and_then(|s| s.min_available.as_ref())
            && expected > 1
        {
            format!(
                "lower minAvailable to {} on PDB {name}, or scale to at least {} replicas \
                 (maxUnavailable: 1 keeps working at any scale)",
                expected - 1,
                min + 1
            )
        } else {
            format!("replace {budget} with maxUnavailable: 1 on PDB {name}")
        };
        out.push(finding(
            FindingId::PdbBlocksAllDisruptions,
            Severity::Error,
            message,
            fix,
        ));
    }
}

/// Pods that are not Ready now, under a PDB whose `unhealthyPodEvictionPolicy` is
/// `IfHealthyBudget` (the default) and whose healthy pods fall short: the Eviction API refuses
/// them (see [`policy::budget_bypass`]) although they serve nothing, so every drain of their
/// nodes waits. `AlwaysAllow` lets them go and still protects the Ready ones, which fits
/// interchangeable replicas; for a quorum workload it may not.
fn unhealthy_pods_blocked(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    for &i in &s.pdbs {
        let pdb = &ctx.inventory.pdbs[i];
        let policy = policy::unhealthy_pod_eviction_policy(pdb);
        if policy == policy::UnhealthyPodEvictionPolicy::AlwaysAllow {
            continue;
        }
        let Some(status) = pdb.status.as_ref() else {
            continue;
        };
        let (current, desired) = (
            status.current_healthy.unwrap_or(0),
            status.desired_healthy.unwrap_or(0),
        );
        let allowed = status.disruptions_allowed.unwrap_or(0);
        let stuck: Vec<&Pod> = s
            .w
            .live
            .iter()
            .copied()
            .filter(|p| policy::pdb_matches_pod(pdb, p) && p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let health = policy::PodHealth::of(p);
                // What the Eviction API refuses today: no bypass, and no budget to spend.
                allowed <= 0 && !health.ready && policy::budget_bypass(health, pdb).is_none()
            })
            .collect();
        if stuck.is_empty() {
            continue;
        }
        let name = pdb_name(pdb);
        let set = if pdb
            .spec
            .as_ref()
            .and_then(|s| s.unhealthy_pod_eviction_policy.as_ref())
            .is_some()
        {
            policy.to_string()
        } else {
            format!("unset, so {policy}")
        };
        let message = format!(
            "{} not Ready ({}), and PDB {name} (unhealthyPodEvictionPolicy {set}) has {current} \
             healthy of {desired} needed: the Eviction API refuses to evict a not-Ready pod \
             until the budget is met, so a drain of its node waits for a pod that serves \
             nothing, until its timeout (or, on a spot interruption, the deadline)",
            if stuck.len() == 1 {
                "1 pod is".to_string()
            } else {
                format!("{} pods are", stuck.len())
            },
            pod_list(&stuck),
        );
        let fix = if s.kind() == "StatefulSet" {
            format!(
                "find out why the pods are not Ready; set spec.unhealthyPodEvictionPolicy: \
                 AlwaysAllow on PDB {name} only if its members are interchangeable: for a quorum \
                 workload (etcd, ZooKeeper, Kafka, a database cluster) a not-Ready member may be \
                 catching up, and evicting it may cost the quorum the budget protects"
            )
        } else {
            format!(
                "set spec.unhealthyPodEvictionPolicy: AlwaysAllow on PDB {name}: not-Ready pods \
                 are then evicted whatever the budget, and the Ready ones stay protected (keep \
                 IfHealthyBudget only if a not-Ready pod still holds state others depend on, \
                 as a quorum member does)"
            )
        };
        out.push(finding(
            FindingId::UnhealthyPodsBlockEviction,
            Severity::Error,
            message,
            fix,
        ));
    }
}

/// Only for replicated workloads: a PDB cannot make a single replica's drain smooth (that is
/// `single-replica-without-surge`), and bare pods and Jobs have their own findings.
fn no_pdb_on_spot(ctx: &Context<'_>, s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if !s.pdbs.is_empty() || s.w.replicas < 2 || matches!(s.kind(), "Pod" | "Job" | "CronJob") {
        return;
    }
    let on_spot =
        s.w.live
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|spec| spec.node_name.as_deref())
                    .and_then(|n| ctx.nodes_by_name.get(n))
                    .is_some_and(|node| scheduling::is_spot_node(node))
            })
            .count();
    let schedulable =
        s.w.template
            .spec
            .as_ref()
            .map(|spec| {
                ctx.spot_nodes
                    .iter()
                    .filter(|n| scheduling::can_schedule_on(spec, n))
                    .count()
            })
            .unwrap_or(0);
    let where_ = if on_spot > 0 {
        format!(
            "its pods run on spot nodes ({on_spot} of {})",
            s.w.live.len()
        )
    } else if schedulable > 0 {
        format!(
            "it can be scheduled on {}",
            plural(schedulable as i64, "spot node", "spot nodes")
        )
    } else {
        return;
    };
    out.push(finding(
        FindingId::NoPdbOnSpot,
        Severity::Warning,
        format!(
            "{where_} and no PodDisruptionBudget covers it: when several spot nodes are \
             reclaimed together, nothing stops the drains from evicting {} at once",
            match s.w.replicas {
                2 => "both replicas".to_string(),
                n => format!("all {n} replicas"),
            }
        ),
        format!(
            "add a PodDisruptionBudget with maxUnavailable: 1 and selector.matchLabels {}",
            labels_text(policy::pod_labels(&s.w.template))
        ),
    ));
}

/// The containers that receive traffic: those with a readiness probe or a port; all of them
/// when none has either.
fn serving_containers(pod: &Pod) -> Vec<&Container> {
    let containers: Vec<&Container> = pod.spec.iter().flat_map(|s| s.containers.iter()).collect();
    let serving: Vec<&Container> = containers
        .iter()
        .copied()
        .filter(|c| c.readiness_probe.is_some() || c.ports.as_ref().is_some_and(|p| !p.is_empty()))
        .collect();
    if serving.is_empty() {
        containers
    } else {
        serving
    }
}

fn prestop(s: &Subject<'_, '_>, out: &mut Vec<Finding>) {
    if s.services.is_empty() {
        return;
    }
    let services = format!(
        "{} {}",
        if s.services.len() == 1 {
            "Service"
        } else {
            "Services"
        },
        s.service_names()
    );
    let window_text = |c: &Container| match prestop::readiness_window(c) {
        Some((period, threshold)) => format!(
            "the {} s ({period} s × {threshold}) its readiness probe needs to fail",
            period * threshold
        ),
        None => "the seconds endpoints and load balancers need to notice".to_string(),
    };
    let spec_path = format!("{}.spec.containers", template_path(s.kind()));
    let mut missing = Vec::new();
    let mut short = Vec::new();
    let mut unknown = Vec::new();
    for container in serving_containers(&s.w.template) {
        let window = prestop::readiness_window(container).map(|(p, t)| p * t);
        match (prestop::prestop_of(container), window) {
            (PreStop::Missing, _) => missing.push((container, window)),
            (PreStop::Known(seconds), Some(window)) if seconds < window as f64 => {
                short.push((container, window, seconds))
            }
            (PreStop::AtLeast { seconds, other }, Some(window)) if seconds < window as f64 => {
                unknown.push((
                    container,
                    window,
                    format!(
                        "sleeps {} and then runs `{other}`",
                        prestop::seconds(seconds)
                    ),
                ))
            }
            (PreStop::Unknown(what), Some(window)) => unknown.push((container, window, what)),
            _ => {}
        }
    }
    let suggest = |window: Option<i64>| window.map_or(15, |w| w + 5);
    if !missing.is_empty() {
        let message = missing
            .iter()
            .map(|(c, _)| format!("container {} has no preStop hook", c.name))
            .collect::<Vec<_>>()
            .join("; ");
        let fix = missing
            .iter()
            .map(|(c, w)| {
                format!(
                    "add lifecycle.preStop.sleep.seconds: {} to container {}",
                    suggest(*w),
                    c.name
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(finding(
            FindingId::NoPrestopBehindService,
            Severity::Error,
            format!(
                "{services} sends it traffic and {message}: on SIGTERM it stops serving while \
                 requests still arrive, for {}",
                window_text(missing[0].0)
            ),
            format!(
                "{fix} in {spec_path}, and keep terminationGracePeriodSeconds above the preStop \
                 plus the shutdown time"
            ),
        ));
    }
    if !short.is_empty() {
        let message = short
            .iter()
            .map(|(c, _, seconds)| {
                format!(
                    "container {}'s preStop lasts {}, less than {}",
                    c.name,
                    prestop::seconds(*seconds),
                    window_text(c)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let fix = short
            .iter()
            .map(|(c, window, _)| {
                format!(
                    "raise container {}'s preStop to at least {window} s (e.g. \
                     lifecycle.preStop.sleep.seconds: {})",
                    c.name,
                    window + 5
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(finding(
            FindingId::PrestopShorterThanReadinessWindow,
            Severity::Warning,
            format!(
                "{services} sends it traffic and {message}: requests still arrive after the \
                 preStop ends and the container stops"
            ),
            format!("{fix} in {spec_path}"),
        ));
    }
    if !unknown.is_empty() {
        let message = unknown
            .iter()
            .map(|(c, window, what)| {
                format!(
                    "container {}'s preStop is {what}, and whether it outlasts the {window} s \
                     readiness window cannot be read from the spec",
                    c.name
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let fix = unknown
            .iter()
            .map(|(c, window, _)| {
                format!(
                    "make sure container {}'s preStop takes at least {window} s (start it with \
                     `sleep {window}`, or use lifecycle.preStop.sleep)",
                    c.name
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(finding(
            FindingId::PrestopDurationUnknown,
            Severity::Info,
            format!("{services} sends it traffic; {message}"),
            fix,
        ));
    }
}

fn pdbs_selecting_nothing(
    inventory: &Inventory,
    config: &AuditConfig,
    workloads: &BTreeMap<WorkloadKey, Workload<'_>>,
) -> Vec<WorkloadReport> {
    let mut reports = Vec::new();
    for pdb in &inventory.pdbs {
        let namespace = pdb.metadata.namespace.clone().unwrap_or_default();
        let name = pdb_name(pdb).to_string();
        if let Some(selector) = &config.selector {
            let labels = pdb.metadata.labels.clone().unwrap_or_default();
            if !selector.matches(&labels) {
                continue;
            }
        }
        let selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref());
        let problem = match selector.map(LabelSelectorExpr::from_api) {
            None => Some(
                "has no selector: in policy/v1 a PDB without a selector selects no pods"
                    .to_string(),
            ),
            Some(Err(e)) => Some(format!(
                "has a selector the API cannot use ({e}), so it selects no pods"
            )),
            Some(Ok(expr)) => {
                let live = inventory
                    .pods
                    .iter()
                    .filter(|p| !policy::is_finished(p))
                    .any(|p| policy::pdb_matches_pod(pdb, p));
                let templates = workloads
                    .values()
                    .any(|w| policy::pdb_matches_pod(pdb, &w.template));
                (!live && !templates).then(|| {
                    format!(
                        "selector `{}` matches no pod and no pod template in namespace \
                         {namespace}: it protects nothing",
                        if expr.requirements().is_empty() {
                            "(everything)".to_string()
                        } else {
                            expr.to_string()
                        }
                    )
                })
            }
        };
        let findings = problem
            .map(|message| {
                vec![finding(
                    FindingId::PdbSelectsNothing,
                    Severity::Warning,
                    message,
                    "set spec.selector to the labels of the pods it is meant to protect (their \
                     pod template's labels), or delete the PDB"
                        .to_string(),
                )]
            })
            .unwrap_or_default();
        if findings.is_empty() {
            // PDBs that do select pods are reported with those pods' workloads.
            continue;
        }
        reports.push(WorkloadReport {
            kind: "PodDisruptionBudget".to_string(),
            namespace,
            name,
            replicas: None,
            critical: false,
            findings,
        });
    }
    reports
}
