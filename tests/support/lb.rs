//! ELBv2 pieces for the load-balancer tests: target groups in moto's ELBv2 (with the sandbox's
//! target-health model), in use by a load balancer, and pods that serve through them. The
//! TargetGroupBinding side is in [`super::lbc`].

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{ProtocolEnum, TargetDescription, TargetTypeEnum};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::json;

use super::Scope;

/// A VPC for target groups (moto wants one; nothing routes through it).
pub async fn vpc(aws: &aws_config::SdkConfig) -> String {
    aws_sdk_ec2::Client::new(aws)
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("create vpc")
        .vpc
        .and_then(|v| v.vpc_id)
        .expect("vpc id")
}

/// A subnet of `vpc`, for a load balancer.
pub async fn subnet(aws: &aws_config::SdkConfig, vpc: &str) -> String {
    aws_sdk_ec2::Client::new(aws)
        .create_subnet()
        .vpc_id(vpc)
        .cidr_block("10.0.1.0/24")
        .send()
        .await
        .expect("create subnet")
        .subnet
        .and_then(|s| s.subnet_id)
        .expect("subnet id")
}

/// The current state of each target of `group`, as `(id, port, state)`.
pub async fn states(elb: &elbv2::Client, group: &str) -> Vec<(String, i32, String)> {
    elb.describe_target_health()
        .target_group_arn(group)
        .send()
        .await
        .expect("describe target health")
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let target = d.target()?;
            Some((
                target.id()?.to_string(),
                target.port()?,
                d.target_health()?.state()?.as_str().to_string(),
            ))
        })
        .collect()
}

/// A TCP target group (an NLB's) whose health checks pass 10 s after registration (every 5 s,
/// healthy after 2), with `delay` as its deregistration delay.
pub async fn target_group(
    elb: &elbv2::Client,
    vpc: &str,
    name: &str,
    kind: TargetTypeEnum,
    port: i32,
    delay: u64,
) -> String {
    let request = elb
        .create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .vpc_id(vpc)
        .target_type(kind)
        .health_check_protocol(ProtocolEnum::Tcp)
        .health_check_interval_seconds(5)
        .health_check_timeout_seconds(5)
        .healthy_threshold_count(2);
    super::aws::target_group_with_delay(elb, request, delay).await
}

pub async fn register(elb: &elbv2::Client, group: &str, id: &str, port: i32) {
    elb.register_targets()
        .target_group_arn(group)
        .targets(TargetDescription::builder().id(id).port(port).build())
        .send()
        .await
        .expect("register target");
}

/// A pod `name` (label app=name) with one container and the given ports.
pub async fn pod(scope: &Scope, name: &str, ports: serde_json::Value) {
    let mut spec = scope.pod_spec(1);
    spec["containers"][0]["ports"] = ports;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    }))
    .unwrap();
    scope
        .pods()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
}

pub fn ip_of(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("a pod IP")
}
