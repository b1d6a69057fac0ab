//! Load-balancer findings (issue 16): target groups whose deregistration delay outlasts what a
//! spot warning leaves, IP targets whose pods stop serving before their group stops sending to
//! them, and TargetGroupBindings in namespaces where the AWS Load Balancer Controller injects no
//! pod readiness gates.
//!
//! [`check`] decides, from what is in the [`Inventory`]; [`collect`] is the I/O: the bindings
//! and their namespaces' labels from Kubernetes, target groups and their targets from ELBv2
//! through [`Discovery`]. Nothing here fails the audit: what cannot be read becomes a note that
//! says which checks it costs, because a report without the load-balancer part is still worth
//! more than no report.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};

use super::checks::pod_list;
use super::workloads::{Workload, WorkloadKey};
use super::{AuditConfig, AuditScope, Finding, FindingId, Inventory, Severity, WorkloadReport};
use crate::config::{AwsArgs, AwsConfig};
use crate::drain::policy::{self, LabelSelectorExpr};
use crate::interruption::events::instance_id_from_provider_id;
use crate::lb::config::LoadBalancerArgs;
use crate::lb::discover::{Binding, Discovery, binding_of};
use crate::lb::targets::{Owner, Target, TargetGroup, TargetType, served_by};
use crate::names;

/// Longest the ELBv2 part may take. The SDK retries on its own; past this the audit reports
/// without it rather than hang a CI job on an unreachable endpoint.
const ELBV2_TIMEOUT: Duration = Duration::from_secs(60);

/// Kind under which a target group managed outside Kubernetes is reported (it has no namespace).
const TARGET_GROUP_KIND: &str = "TargetGroup";
const BINDING_KIND: &str = "TargetGroupBinding";

/// A TargetGroupBinding in the audit's scope, with its own labels (for `--selector`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedBinding {
    pub binding: Binding,
    pub labels: BTreeMap<String, String>,
}

/// A target group ELBv2 described, and the targets it has registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedGroup {
    pub group: TargetGroup,
    pub targets: Vec<Target>,
}

/// What the load-balancer checks read.
#[derive(Debug, Clone, Default)]
pub struct LoadBalancers {
    /// TargetGroupBindings in the audit's scope.
    pub bindings: Vec<AuditedBinding>,
    /// Labels of the bindings' namespaces. A namespace missing here could not be read; its
    /// bindings are not judged (a note says so).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Every group behind a binding (cluster-wide) or named in the configuration, as ELBv2
    /// described it; empty when ELBv2 was not asked or failed (a note says so).
    pub groups: Vec<DescribedGroup>,
}

/// The group's name, from its ARN (`...:targetgroup/NAME/ID`); the ARN itself if it has none.
fn group_name(arn: &str) -> &str {
    arn.split_once(":targetgroup/")
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|name| !name.is_empty())
        .unwrap_or(arn)
}

/// Instance id of each node, from its providerID.
fn instances(inventory: &Inventory) -> BTreeMap<&str, &str> {
    inventory
        .nodes
        .iter()
        .filter_map(|n| {
            let id = n.spec.as_ref()?.provider_id.as_deref()?;
            Some((
                n.metadata.name.as_deref()?,
                instance_id_from_provider_id(id)?,
            ))
        })
        .collect()
}

/// A group with the ids (IPs or instance ids) of its targets, so that most pods are ruled out
/// without matching ports: a cluster has thousands of pods and a group thousands of targets.
struct Indexed<'a> {
    described: &'a DescribedGroup,
    ids: BTreeSet<&'a str>,
}

impl<'a> Indexed<'a> {
    fn new(described: &'a DescribedGroup) -> Self {
        Indexed {
            described,
            ids: described.targets.iter().map(|t| t.id.as_str()).collect(),
        }
    }

    /// The group's targets `pod` serves through (see [`served_by`]).
    fn served_by(&self, pod: &Pod, instance: Option<&str>) -> Vec<Target> {
        let status = pod.status.as_ref();
        let candidate = instance.is_some_and(|i| self.ids.contains(i))
            || status.is_some_and(|s| {
                s.pod_ip.iter().any(|ip| self.ids.contains(ip.as_str()))
                    || s.pod_ips
                        .iter()
                        .flatten()
                        .any(|ip| self.ids.contains(ip.ip.as_str()))
            });
        if !candidate {
            return Vec::new();
        }
        let group = &self.described.group;
        served_by(
            pod,
            instance,
            self.described.targets.iter().map(|t| (group, t)),
        )
    }
}

/// The pods of the inventory the selector keeps, that are still running.
fn selected_pods<'a>(inventory: &'a Inventory, config: &AuditConfig) -> Vec<&'a Pod> {
    inventory
        .pods
        .iter()
        .filter(|p| !policy::is_finished(p))
        .filter(|p| {
            config
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(policy::pod_labels(p)))
        })
        .collect()
}

/// Adds the load-balancer findings: to the workloads already in `reports` (IP targets), and as
/// entries of their own for TargetGroupBindings and configured target groups. Pure.
pub(crate) fn check(
    inventory: &Inventory,
    config: &AuditConfig,
    workloads: &BTreeMap<WorkloadKey, Workload<'_>>,
    reports: &mut Vec<WorkloadReport>,
) {
    let lb = &inventory.load_balancers;
    let indexed: Vec<Indexed<'_>> = lb.groups.iter().map(Indexed::new).collect();
    let instances = instances(inventory);
    let instance_of = |pod: &Pod| {
        let node = pod.spec.as_ref()?.node_name.as_deref()?;
        instances.get(node).copied()
    };
    for report in reports.iter_mut() {
        let key = (
            report.namespace.clone(),
            report.kind.clone(),
            report.name.clone(),
        );
        if let Some(w) = workloads.get(&key) {
            ip_targets_without_prestop(&indexed, w, &mut report.findings);
        }
    }
    let serves_through =
        |pod: &Pod, group: &Indexed<'_>| !group.served_by(pod, instance_of(pod)).is_empty();

    let mut entries: BTreeMap<WorkloadKey, Vec<Finding>> = BTreeMap::new();
    let pods = selected_pods(inventory, config);
    let in_scope = |namespace: &str| {
        inventory
            .scope
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == namespace)
    };
    for group in &indexed {
        let described = group.described;
        let served = || pods.iter().any(|p| serves_through(p, group));
        let key = match &described.group.owner {
            Owner::Binding { namespace, name } => {
                let labelled = |selector: &LabelSelectorExpr| {
                    lb.bindings.iter().any(|b| {
                        b.binding.namespace == *namespace
                            && b.binding.name == *name
                            && selector.matches(&b.labels)
                    })
                };
                let selected = config
                    .selector
                    .as_ref()
                    .is_none_or(|s| labelled(s) || served());
                if !in_scope(namespace) || !selected {
                    continue;
                }
                (namespace.clone(), BINDING_KIND.to_string(), name.clone())
            }
            Owner::Configured => {
                // A group outside Kubernetes belongs to no namespace: a namespaced or selected
                // audit reports it only when one of its pods serves through it.
                let everything = inventory.scope.namespace.is_none() && config.selector.is_none();
                if !(everything || served()) {
                    continue;
                }
                (
                    String::new(),
                    TARGET_GROUP_KIND.to_string(),
                    group_name(&described.group.arn).to_string(),
                )
            }
        };
        if let Some(finding) = delay_exceeds_deadline(config, &described.group) {
            entries.entry(key).or_default().push(finding);
        }
    }

    for audited in &lb.bindings {
        let binding = &audited.binding;
        if !in_scope(&binding.namespace) {
            continue;
        }
        let group = indexed
            .iter()
            .find(|g| g.described.group.arn == binding.target_group_arn);
        if let Some(selector) = &config.selector
            && !selector.matches(&audited.labels)
            && !group.is_some_and(|g| pods.iter().any(|p| serves_through(p, g)))
        {
            continue;
        }
        let target_type = binding
            .target_type
            .or_else(|| group.map(|g| g.described.group.target_type));
        let Some(labels) = lb.namespace_labels.get(&binding.namespace) else {
            continue;
        };
        if let Some(finding) = readiness_gate_not_injected(binding, target_type, labels) {
            entries
                .entry((
                    binding.namespace.clone(),
                    BINDING_KIND.to_string(),
                    binding.name.clone(),
                ))
                .or_default()
                .push(finding);
        }
    }

    for ((namespace, kind, name), findings) in entries {
        reports.push(WorkloadReport {
            kind,
            namespace,
            name,
            replicas: None,
            critical: false,
            findings,
        });
    }
}

/// The group keeps a deregistered target's connections open for longer than the node has left
/// after a spot warning: the instance goes first and cuts them.
fn delay_exceeds_deadline(config: &AuditConfig, group: &TargetGroup) -> Option<Finding> {
    let limit = config.grace_limit_seconds();
    let delay = group.deregistration_delay.as_secs();
    if i64::try_from(delay).is_ok_and(|d| d <= limit) {
        return None;
    }
    let margin = config.margin.as_secs();
    let budget = match config.deadline {
        Some(deadline) => format!("the {} s deadline", deadline.as_secs()),
        None => format!(
            "a spot interruption's {} s warning",
            config.spot_warning.as_secs()
        ),
    };
    let targets = match group.target_type {
        TargetType::Instance => "the node's instance target",
        TargetType::Ip => "a pod's IP target",
    };
    let name = group_name(&group.arn);
    let attribute = format!("deregistration_delay.timeout_seconds={limit}");
    let fix = match &group.owner {
        Owner::Binding { .. } => format!(
            "lower the delay to {limit} s or less where the group is defined: for a Service, the \
             annotation service.beta.kubernetes.io/aws-load-balancer-target-group-attributes: \
             {attribute}; for an Ingress, alb.ingress.kubernetes.io/target-group-attributes: \
             {attribute}; for a group made outside the controller, the group's attribute in AWS"
        ),
        Owner::Configured => format!(
            "set the group's attribute {attribute} or less where it is managed (Terraform: \
             deregistration_delay = {limit} on aws_lb_target_group)"
        ),
    };
    Some(Finding {
        id: FindingId::DeregistrationDelayExceedsDeadline,
        severity: Severity::Warning,
        message: format!(
            "target group {name} ({}) lets {targets} drain for {delay} s after deregistration, \
             but {budget} minus the {margin} s margin leaves {limit} s: requests still in flight \
             when the instance goes are cut {} s before the delay would end, and a target that \
             never reports draining holds its pods until their deadline override",
            group.arn,
            delay.saturating_sub(limit.max(0) as u64)
        ),
        fix,
    })
}

/// Live pods of the workload that are IP targets, have no preStop hook on the container behind
/// the target, and a grace shorter than the group's delay: on SIGTERM they stop serving while
/// the load balancer still sends them requests (the AWS Load Balancer Controller deregisters a
/// pod only once it is terminating, and the target takes seconds to stop receiving).
fn ip_targets_without_prestop(groups: &[Indexed<'_>], w: &Workload<'_>, out: &mut Vec<Finding>) {
    let ip_groups: Vec<&Indexed<'_>> = groups
        .iter()
        .filter(|g| g.described.group.target_type == TargetType::Ip)
        .collect();
    if ip_groups.is_empty() {
        return;
    }
    let mut pods: Vec<&Pod> = Vec::new();
    // The group whose delay is longest names the finding: it is the one the pods fall shortest of.
    let mut longest: Option<&TargetGroup> = None;
    // The longest grace among them: the finding holds for every pod, so the best case is shown.
    let mut grace_shown = 0;
    for pod in &w.live {
        let grace = policy::pod_grace_seconds(pod);
        let containers = pod.spec.iter().flat_map(|s| &s.containers);
        let mut hit: Option<&TargetGroup> = None;
        for indexed in &ip_groups {
            let described = indexed.described;
            let targets = indexed.served_by(pod, None);
            let delay = described.group.deregistration_delay.as_secs();
            let stops_early = targets.iter().any(|target| {
                containers.clone().any(|c| {
                    c.ports
                        .iter()
                        .flatten()
                        .any(|p| p.container_port == target.port)
                        && c.lifecycle
                            .as_ref()
                            .and_then(|l| l.pre_stop.as_ref())
                            .is_none()
                })
            }) && u64::try_from(grace).is_ok_and(|g| g < delay);
            if stops_early
                && hit.is_none_or(|h| h.deregistration_delay < described.group.deregistration_delay)
            {
                hit = Some(&described.group);
            }
        }
        if let Some(group) = hit {
            pods.push(pod);
            grace_shown = grace_shown.max(grace);
            if longest.is_none_or(|l| l.deregistration_delay < group.deregistration_delay) {
                longest = Some(group);
            }
        }
    }
    let Some(group) = longest else {
        return;
    };
    let delay = group.deregistration_delay.as_secs();
    let total = w.live.len();
    let which = format!(
        "{} of its {total} {} ({}) {}",
        pods.len(),
        if total == 1 { "pod" } else { "pods" },
        pod_list(&pods),
        if pods.len() == 1 { "is" } else { "are" }
    );
    let path = if w.kind == "Pod" {
        "the pod's spec.containers".to_string()
    } else {
        "spec.template.spec.containers".to_string()
    };
    out.push(Finding {
        id: FindingId::IpTargetWithoutPrestop,
        severity: Severity::Error,
        message: format!(
            "{which} an IP target of target group {} (deregistration delay {delay} s) with no \
             preStop hook and a grace of {grace_shown} s: on SIGTERM the pod stops serving while \
             the load balancer still sends it new requests, and it is gone before requests in \
             flight may finish",
            group_name(&group.arn)
        ),
        fix: format!(
            "add lifecycle.preStop.sleep.seconds: 15 (longer than the load balancer takes to \
             stop routing) to the serving container in {path}, and keep \
             terminationGracePeriodSeconds above the preStop plus the shutdown time"
        ),
    });
}

/// An IP-target binding in a namespace without readiness-gate injection: a new pod counts as
/// Ready before its target is healthy in the group.
fn readiness_gate_not_injected(
    binding: &Binding,
    target_type: Option<TargetType>,
    namespace_labels: &BTreeMap<String, String>,
) -> Option<Finding> {
    // The controller injects gates only for IP targets: an instance target is the node, and the
    // load balancer knows nothing of the pods behind it.
    if target_type != Some(TargetType::Ip) {
        return None;
    }
    let label = names::LABEL_ELBV2_POD_READINESS_GATE_INJECT;
    let enabled = names::LABEL_ELBV2_POD_READINESS_GATE_INJECT_ENABLED;
    if namespace_labels.get(label).map(String::as_str) == Some(enabled) {
        return None;
    }
    let namespace = &binding.namespace;
    Some(Finding {
        id: FindingId::ReadinessGateNotInjected,
        severity: Severity::Warning,
        message: format!(
            "namespace {namespace} lacks the label {label}={enabled}, so the AWS Load Balancer \
             Controller gives the pods behind target group {} no readiness gate: a replacement \
             pod counts as Ready (for PDBs, rollouts and surge) while its target is still \
             initial, so a drain can evict the pods that serve while the group has no healthy \
             target left",
            group_name(&binding.target_group_arn)
        ),
        fix: format!(
            "kubectl label namespace {namespace} {label}={enabled}, then restart the workloads \
             behind the binding (kubectl rollout restart) so their pods are created with the gate"
        ),
    })
}

/// Where the ELBv2 checks get AWS from, or why they are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsAccess {
    Use(AwsConfig),
    /// No region is known: the checks that need ELBv2 are skipped, the others still run.
    Skip(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AwsArgsError {
    #[error("--aws-endpoint-url {0:?} is not an http:// or https:// URL")]
    InvalidEndpoint(String),
}

/// The region (flag or `NODEDRAIN_AWS_REGION`, then `AWS_REGION`, then `AWS_DEFAULT_REGION`)
/// and endpoint of the ELBv2 checks. The audit has no queue URL to take a region from, and
/// guessing one would describe another region's groups. Pure: `env` is the environment.
pub fn aws_access(
    args: &AwsArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<AwsAccess, AwsArgsError> {
    let nonempty = |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let region = nonempty(args.aws_region.clone())
        .or_else(|| nonempty(env("AWS_REGION")))
        .or_else(|| nonempty(env("AWS_DEFAULT_REGION")));
    let endpoint_url = match nonempty(args.aws_endpoint_url.clone()) {
        None => None,
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
        Some(u) => return Err(AwsArgsError::InvalidEndpoint(u)),
    };
    Ok(match region {
        Some(region) => AwsAccess::Use(AwsConfig {
            region,
            endpoint_url,
        }),
        None => AwsAccess::Skip(
            "no AWS region is known (--aws-region, AWS_REGION or AWS_DEFAULT_REGION)".to_string(),
        ),
    })
}

fn bindings_api(client: &Client, scope: &AuditScope) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", BINDING_KIND),
        "targetgroupbindings",
    );
    match &scope.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

const ELBV2_CHECKS: &str = "deregistration-delay-exceeds-deadline and ip-target-without-prestop";

/// Reads what [`check`] needs. Never fails: each part that cannot be read adds a note to `notes`
/// and leaves its checks without data.
pub async fn collect(
    client: &Client,
    scope: &AuditScope,
    lb: &LoadBalancerArgs,
    aws: &AwsAccess,
    notes: &mut Vec<String>,
) -> LoadBalancers {
    let mut out = LoadBalancers::default();
    match bindings_api(client, scope)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for object in &list.items {
                match binding_of(object) {
                    Ok(binding) => out.bindings.push(AuditedBinding {
                        binding,
                        labels: object.labels().clone(),
                    }),
                    Err(problem) => notes.push(format!(
                        "TargetGroupBinding {}/{} is not audited: {problem}",
                        object.namespace().unwrap_or_default(),
                        object.name_any()
                    )),
                }
            }
        }
        // No CRD: no AWS Load Balancer Controller, so no bindings to judge.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => notes.push(format!(
            "cannot list TargetGroupBindings ({error}): no readiness-gate-not-injected findings, \
             and bound target groups are not audited"
        )),
    }

    let mut namespaces: Vec<&str> = out
        .bindings
        .iter()
        .map(|b| b.binding.namespace.as_str())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    let api: Api<Namespace> = Api::all(client.clone());
    for namespace in namespaces {
        match api.get_opt(namespace).await {
            Ok(Some(object)) => {
                out.namespace_labels
                    .insert(namespace.to_string(), object.labels().clone());
            }
            // Deleted since the list: its bindings go with it.
            Ok(None) => {}
            Err(error) => notes.push(format!(
                "cannot read namespace {namespace} ({error}): its TargetGroupBindings are not \
                 checked for readiness-gate injection"
            )),
        }
    }

    let config = match aws {
        AwsAccess::Use(config) => config,
        AwsAccess::Skip(why) => {
            notes.push(format!("ELBv2 checks ({ELBV2_CHECKS}) skipped: {why}"));
            return out;
        }
    };
    let sdk = config.load().await;
    let discovery = Discovery::new(
        client.clone(),
        aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
        lb.target_group_arns(),
    )
    .with_tag(lb.target_group_tag.clone());
    let described = tokio::time::timeout(ELBV2_TIMEOUT, async {
        let groups = discovery.target_groups().await?;
        let mut described = Vec::new();
        let mut problems = Vec::new();
        for group in groups {
            match discovery.registered(&group).await {
                Ok(registered) => described.push(DescribedGroup {
                    group,
                    targets: registered.into_iter().map(|(t, _)| t).collect(),
                }),
                // The group's delay is still worth judging; only its targets are unknown.
                Err(error) => {
                    problems.push(format!(
                        "targets of target group {} unknown ({error}): no \
                         ip-target-without-prestop findings for it",
                        group_name(&group.arn)
                    ));
                    described.push(DescribedGroup {
                        group,
                        targets: Vec::new(),
                    });
                }
            }
        }
        Ok::<_, crate::lb::discover::DiscoverError>((described, problems))
    })
    .await;
    match described {
        Ok(Ok((groups, problems))) => {
            out.groups = groups;
            notes.extend(problems);
        }
        Ok(Err(error)) => notes.push(format!("ELBv2 checks ({ELBV2_CHECKS}) skipped: {error}")),
        Err(_) => notes.push(format!(
            "ELBv2 checks ({ELBV2_CHECKS}) skipped: ELBv2 did not answer within {} s",
            ELBV2_TIMEOUT.as_secs()
        )),
    }
    out
}
