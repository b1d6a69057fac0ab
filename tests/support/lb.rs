//! ELBv2 pieces for the load-balancer tests: the TargetGroupBinding CRD, target groups in
//! moto's ELBv2 (with the sandbox's target-health model), and pods that serve through them.

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{ProtocolEnum, TargetDescription, TargetTypeEnum};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{await_condition, conditions};
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

/// Installs the TargetGroupBinding CRD the sandbox ships, unless it is there.
pub async fn ensure_binding_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "targetgroupbindings.elbv2.k8s.aws";
    if crds.get_opt(name).await.expect("get crd").is_none() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sandbox/crds/targetgroupbindings.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the CRD manifest");
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("CRD yaml");
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create the TargetGroupBinding CRD: {e}"),
        }
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watch the CRD");
}

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
        .target_type(kind);
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
