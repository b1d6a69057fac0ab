//! ELBv2 target groups and targets as a drain sees them, and which of them a pod serves through.

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// AWS's default `deregistration_delay.timeout_seconds`.
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);

/// How a target group addresses its targets (`TargetType` in the ELBv2 API; `lambda` and `alb`
/// targets are never a node or a pod, so they are not modelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetType {
    /// An EC2 instance id and a port: the node, reached on a host port or a NodePort.
    Instance,
    /// An IP address and a port: a pod's IP and container port.
    Ip,
}

impl TargetType {
    /// The API's spelling, as in a TargetGroupBinding's `spec.targetType`.
    pub fn parse(value: &str) -> Option<TargetType> {
        match value {
            "instance" => Some(TargetType::Instance),
            "ip" => Some(TargetType::Ip),
            _ => None,
        }
    }
}

/// Who deregisters the group's targets of a draining node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A TargetGroupBinding: the AWS Load Balancer Controller deregisters the node's targets
    /// when it sees `node.kubernetes.io/exclude-from-external-load-balancers`, and a pod's IP
    /// target when the pod leaves its Service's endpoints. nodedrain only observes.
    Binding { namespace: String, name: String },
    /// Named in nodedrain's configuration (a Terraform or Pulumi NLB): nodedrain calls
    /// `DeregisterTargets` itself.
    Configured,
}

/// One target group and what a drain needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    pub arn: String,
    pub target_type: TargetType,
    /// `deregistration_delay.timeout_seconds`.
    pub deregistration_delay: Duration,
    pub owner: Owner,
}

/// ELBv2's `TargetHealth.State`, plus [`TargetState::Gone`] for a target the group no longer
/// lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetState {
    Initial,
    Healthy,
    Unhealthy,
    UnhealthyDraining,
    Unused,
    Draining,
    Unavailable,
    Gone,
}

impl TargetState {
    /// The API's spelling; `None` for a value this code does not know (treated as routed: see
    /// [`TargetState::routes_new_connections`]).
    pub fn parse(value: &str) -> Option<TargetState> {
        Some(match value {
            "initial" => TargetState::Initial,
            "healthy" => TargetState::Healthy,
            "unhealthy" => TargetState::Unhealthy,
            "unhealthy.draining" => TargetState::UnhealthyDraining,
            "unused" => TargetState::Unused,
            "draining" => TargetState::Draining,
            "unavailable" => TargetState::Unavailable,
            _ => return None,
        })
    }

    /// Whether the load balancer may still send this target new connections. `draining` (and a
    /// Gateway Load Balancer's `unhealthy.draining`): it finishes the connections it has and
    /// takes no new ones; `unused`: not registered or in no enabled zone; gone: not in the
    /// group. Every other state may receive traffic, `unhealthy` included: an NLB whose targets
    /// are all unhealthy fails open and routes to every one of them.
    pub fn routes_new_connections(self) -> bool {
        !matches!(
            self,
            TargetState::Draining
                | TargetState::UnhealthyDraining
                | TargetState::Unused
                | TargetState::Gone
        )
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Initial => "initial",
            TargetState::Healthy => "healthy",
            TargetState::Unhealthy => "unhealthy",
            TargetState::UnhealthyDraining => "unhealthy.draining",
            TargetState::Unused => "unused",
            TargetState::Draining => "draining",
            TargetState::Unavailable => "unavailable",
            TargetState::Gone => "gone",
        })
    }
}

/// A registered target: an instance id or an IP, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub group_arn: String,
    pub id: String,
    pub port: i32,
}

/// One target a pod serves through, with what a drain needs of its group: the plan's and the
/// engine's view of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodTarget {
    #[serde(flatten)]
    pub target: Target,
    #[serde(serialize_with = "target_type_name")]
    pub target_type: TargetType,
    /// The group's `deregistration_delay.timeout_seconds`.
    #[serde(rename = "deregistrationDelaySeconds", serialize_with = "seconds")]
    pub deregistration_delay: Duration,
    /// nodedrain deregisters this target itself: every IP target, and instance targets of
    /// configured groups. An instance target of a TargetGroupBinding is deregistered by the AWS
    /// Load Balancer Controller once the node carries the exclude label.
    pub deregistered_by_nodedrain: bool,
    /// `DescribeTargetHealth` when the plan was made.
    #[serde(serialize_with = "state_name")]
    pub state: TargetState,
    /// On an involuntary drain, how much longer than the time before the pod's latest start a
    /// full wait for this target would take: the wait will be cut by the deadline.
    #[serde(
        rename = "shortBySeconds",
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_seconds"
    )]
    pub short_by: Option<Duration>,
}

impl PodTarget {
    pub fn new(group: &TargetGroup, target: Target, state: TargetState) -> PodTarget {
        PodTarget {
            deregistered_by_nodedrain: group.target_type == TargetType::Ip
                || group.owner == Owner::Configured,
            target,
            target_type: group.target_type,
            deregistration_delay: group.deregistration_delay,
            state,
            short_by: None,
        }
    }
}

impl fmt::Display for PodTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = group_name(&self.target.group_arn);
        write!(
            f,
            "{group} {}:{} ({}, {}s delay)",
            self.target.id,
            self.target.port,
            self.state,
            self.deregistration_delay.as_secs()
        )
    }
}

/// The name part of a target group ARN (`...:targetgroup/NAME/ID`), for people; the ARN when
/// it has no such part.
pub fn group_name(arn: &str) -> &str {
    arn.split_once(":targetgroup/")
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|name| !name.is_empty())
        .unwrap_or(arn)
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn optional_seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(d.as_secs()),
        None => s.serialize_none(),
    }
}

fn state_name<S: serde::Serializer>(state: &TargetState, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(state)
}

fn target_type_name<S: serde::Serializer>(kind: &TargetType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match kind {
        TargetType::Instance => "instance",
        TargetType::Ip => "ip",
    })
}

/// The watched target groups and what each has registered, as one `DescribeTargetHealth`
/// round saw them.
#[derive(Debug, Clone, Default)]
pub struct LoadBalancerView {
    pub groups: Vec<TargetGroup>,
    pub registered: Vec<(Target, TargetState)>,
}

impl LoadBalancerView {
    /// Every registered target with its group.
    pub fn pairs(&self) -> impl Iterator<Item = (&TargetGroup, &Target)> {
        self.registered.iter().filter_map(|(target, _)| {
            let group = self.groups.iter().find(|g| g.arn == target.group_arn)?;
            Some((group, target))
        })
    }

    pub fn pod_target(&self, target: Target) -> Option<PodTarget> {
        let group = self.groups.iter().find(|g| g.arn == target.group_arn)?;
        let state = self
            .registered
            .iter()
            .find(|(t, _)| *t == target)
            .map_or(TargetState::Gone, |(_, s)| *s);
        Some(PodTarget::new(group, target, state))
    }
}

/// The targets among `registered` (each with its group) that `pod` on the node of instance
/// `instance_id` serves through:
/// - an IP target whose address is the pod's IP and whose port is one of its container ports;
/// - an instance target of this node whose port is one of the pod's host ports (the pattern of
///   a reverse proxy run as a host-port DaemonSet or Deployment behind an NLB).
///
/// A NodePort instance target is not a pod's: kube-proxy forwards its connections to any
/// endpoint of the Service, on any node. Pure.
pub fn served_by<'a>(
    pod: &Pod,
    instance_id: Option<&str>,
    registered: impl IntoIterator<Item = (&'a TargetGroup, &'a Target)>,
) -> Vec<Target> {
    let ips: Vec<&str> = pod
        .status
        .as_ref()
        .map(|s| {
            s.pod_ips
                .iter()
                .flatten()
                .map(|ip| ip.ip.as_str())
                .chain(s.pod_ip.as_deref())
                .collect()
        })
        .unwrap_or_default();
    let ports = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten());
    let (container_ports, host_ports): (Vec<i32>, Vec<i32>) = ports.fold(
        (Vec::new(), Vec::new()),
        |(mut container, mut host), port| {
            container.push(port.container_port);
            if let Some(host_port) = port.host_port {
                host.push(host_port);
            }
            (container, host)
        },
    );
    let mut served: Vec<Target> = registered
        .into_iter()
        .filter(|(group, target)| match group.target_type {
            TargetType::Ip => {
                ips.contains(&target.id.as_str()) && container_ports.contains(&target.port)
            }
            TargetType::Instance => {
                instance_id == Some(target.id.as_str()) && host_ports.contains(&target.port)
            }
        })
        .map(|(_, target)| target.clone())
        .collect();
    served.sort();
    served.dedup();
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ip: &str, ports: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "ports": ports}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    fn group(arn: &str, target_type: TargetType) -> TargetGroup {
        TargetGroup {
            arn: arn.into(),
            target_type,
            deregistration_delay: Duration::from_secs(30),
            owner: Owner::Configured,
        }
    }

    fn target(group: &str, id: &str, port: i32) -> Target {
        Target {
            group_arn: group.into(),
            id: id.into(),
            port,
        }
    }

    #[test]
    fn an_ip_target_is_the_pod_with_that_ip_and_container_port() {
        let alb = group("alb", TargetType::Ip);
        let p = pod("10.0.0.7", json!([{"containerPort": 8080}]));
        let mine = target("alb", "10.0.0.7", 8080);
        let other_port = target("alb", "10.0.0.7", 9090);
        let other_pod = target("alb", "10.0.0.8", 8080);
        let served = served_by(
            &p,
            Some("i-1"),
            [(&alb, &mine), (&alb, &other_port), (&alb, &other_pod)],
        );
        assert_eq!(served, vec![mine]);
    }

    #[test]
    fn an_instance_target_is_the_pod_on_that_node_with_that_host_port() {
        let nlb = group("nlb", TargetType::Instance);
        let proxy = pod("10.0.0.7", json!([{"containerPort": 443, "hostPort": 443}]));
        let app = pod("10.0.0.8", json!([{"containerPort": 443}]));
        let this_node = target("nlb", "i-1", 443);
        let other_node = target("nlb", "i-2", 443);
        let node_port = target("nlb", "i-1", 30443);
        let registered = [(&nlb, &this_node), (&nlb, &other_node), (&nlb, &node_port)];
        assert_eq!(
            served_by(&proxy, Some("i-1"), registered),
            vec![this_node.clone()]
        );
        // No host port: a NodePort's connections go to any endpoint, not this pod's.
        assert!(served_by(&app, Some("i-1"), registered).is_empty());
        // A node without an instance id serves no instance target.
        assert!(served_by(&proxy, None, registered).is_empty());
    }

    #[test]
    fn only_draining_unused_and_gone_targets_take_no_new_connections() {
        for (text, routes) in [
            ("initial", true),
            ("healthy", true),
            ("unhealthy", true),
            ("unhealthy.draining", false),
            ("unavailable", true),
            ("draining", false),
            ("unused", false),
        ] {
            let state = TargetState::parse(text).unwrap();
            assert_eq!(state.to_string(), text);
            assert_eq!(state.routes_new_connections(), routes, "{text}");
        }
        assert!(!TargetState::Gone.routes_new_connections());
        assert_eq!(TargetState::parse("warming"), None);
    }
}
