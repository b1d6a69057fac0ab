//! The sandbox's AWS endpoint reports ELBv2 target health the way AWS does (sandbox/moto/
//! elbv2_health.py, docs/sandbox.md "ELBv2 target health"): a load-balancer wait of a drain is
//! only meaningful if a deregistered target stays `draining` for the group's deregistration delay
//! instead of vanishing at once, as moto alone reports it.
//!
//! Talks to the sandbox's moto (`AWS_ENDPOINT_URL`) through the SDK nodedrain uses; each test
//! makes its own VPC, instances, target group and load balancer.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::InstanceType;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{
    LoadBalancerTypeEnum, ProtocolEnum, TargetDescription, TargetGroupAttribute,
    TargetHealthStateEnum, TargetTypeEnum,
};

const DELAY_KEY: &str = "deregistration_delay.timeout_seconds";
/// Short enough to keep the test quick, long enough to tell "draining for the delay" from "gone
/// at once" on a busy machine.
const DELAY: Duration = Duration::from_secs(3);
/// HealthCheckIntervalSeconds x HealthyThresholdCount of the test's group: 5 s x 2.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How late past its due time a transition may be observed: the poll interval plus a loaded
/// two-core machine's request latency.
const SLACK: Duration = Duration::from_secs(5);

struct Aws {
    ec2: aws_sdk_ec2::Client,
    elb: elbv2::Client,
}

async fn aws() -> Aws {
    let config = support::aws::sdk_config(&support::var("AWS_ENDPOINT_URL")).await;
    Aws {
        ec2: aws_sdk_ec2::Client::new(&config),
        elb: elbv2::Client::new(&config),
    }
}

/// A name of at most 32 characters (the limit for target groups and load balancers), unique to
/// this process and call.
fn unique(kind: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "it-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A VPC with a subnet in each of two zones, as a load balancer needs.
async fn network(aws: &Aws) -> (String, Vec<String>) {
    let vpc = aws
        .ec2
        .create_vpc()
        .cidr_block("10.77.0.0/16")
        .send()
        .await
        .expect("create vpc")
        .vpc
        .and_then(|v| v.vpc_id)
        .expect("vpc id");
    let mut subnets = Vec::new();
    for (index, zone) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let subnet = aws
            .ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(format!("10.77.{index}.0/24"))
            .availability_zone(*zone)
            .send()
            .await
            .expect("create subnet")
            .subnet
            .and_then(|s| s.subnet_id)
            .expect("subnet id");
        subnets.push(subnet);
    }
    (vpc, subnets)
}

async fn instances(aws: &Aws, subnet: &str, count: i32) -> Vec<String> {
    let image = support::moto_image(&aws.ec2).await;
    aws.ec2
        .run_instances()
        .image_id(image)
        .min_count(count)
        .max_count(count)
        .instance_type(InstanceType::M5Large)
        .subnet_id(subnet)
        .send()
        .await
        .expect("run instances")
        .instances
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.instance_id.expect("instance id"))
        .collect()
}

/// A TCP target group as behind an NLB (instance targets on a host port, or pods' IPs on a
/// container port), whose health check passes after `HEALTHY_AFTER`, with a deregistration delay
/// of `DELAY`.
async fn target_group(aws: &Aws, vpc: &str, kind: TargetTypeEnum, port: i32) -> String {
    support::lb::target_group(&aws.elb, vpc, &unique("tg"), kind, port, DELAY.as_secs()).await
}

/// An NLB whose listener forwards to the group: from then on the group is in use and its targets'
/// health checks start.
async fn attach_to_nlb(aws: &Aws, subnets: &[String], group: &str) {
    support::aws::load_balancer_for(
        &aws.elb,
        &unique("nlb"),
        LoadBalancerTypeEnum::Network,
        subnets,
        ProtocolEnum::Tcp,
        group,
    )
    .await;
}

/// Registers the instances `ids` on the group's port.
async fn register(aws: &Aws, group: &str, ids: &[String]) {
    aws.elb
        .register_targets()
        .target_group_arn(group)
        .set_targets(Some(ids.iter().map(|id| target(id)).collect()))
        .send()
        .await
        .expect("register targets");
}

fn target(id: &str) -> TargetDescription {
    TargetDescription::builder().id(id).build()
}

/// What DescribeTargetHealth says: (instance id, state, reason code), for all the group's
/// targets or for the ones asked for.
#[derive(Debug, Clone, PartialEq)]
struct Health {
    id: String,
    state: TargetHealthStateEnum,
    reason: Option<String>,
}

async fn health(aws: &Aws, group: &str, asked: &[&str]) -> Vec<Health> {
    let mut request = aws.elb.describe_target_health().target_group_arn(group);
    for id in asked {
        request = request.targets(target(id));
    }
    request
        .send()
        .await
        .expect("describe target health")
        .target_health_descriptions
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            let health = d.target_health.expect("target health");
            Health {
                id: d.target.and_then(|t| t.id).expect("target id"),
                state: health.state.expect("state"),
                reason: health.reason.map(|r| r.as_str().to_string()),
            }
        })
        .collect()
}

fn of<'a>(all: &'a [Health], id: &str) -> Option<&'a Health> {
    all.iter().find(|h| h.id == id)
}

fn assert_state(all: &[Health], id: &str, state: TargetHealthStateEnum, reason: Option<&str>) {
    let h = of(all, id).unwrap_or_else(|| panic!("{id} is not listed: {all:?}"));
    assert_eq!(
        (&h.state, h.reason.as_deref()),
        (&state, reason),
        "{id}: {all:?}"
    );
}

/// Polls until `done` holds for the group's health, or `SLACK` after `due`; returns when it was
/// first seen to hold.
async fn wait_until(
    aws: &Aws,
    group: &str,
    due: Instant,
    what: &str,
    done: impl Fn(&[Health]) -> bool,
) -> Instant {
    loop {
        let all = health(aws, group, &[]).await;
        let seen = Instant::now();
        if done(&all) {
            return seen;
        }
        assert!(
            seen < due + SLACK,
            "{what}: not seen {SLACK:?} after it was due: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `target` has left the group, and checks it stayed for the whole deregistration
/// delay counted from `since`.
async fn wait_gone(aws: &Aws, group: &str, target: &str, since: Instant, what: &str) {
    let gone = wait_until(aws, group, since + DELAY, &format!("{what} gone"), |all| {
        of(all, target).is_none()
    })
    .await;
    assert!(
        gone - since >= DELAY,
        "{what} gone after {:?}, before the deregistration delay of {DELAY:?}",
        gone - since
    );
}

/// Sleeps until `at`, if it is still ahead.
async fn sleep_until(at: Instant) {
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
}

#[tokio::test]
async fn targets_register_through_initial_and_drain_for_the_deregistration_delay() {
    let aws = aws().await;
    let (vpc, subnets) = network(&aws).await;
    let ids = instances(&aws, &subnets[0], 3).await;
    let (kept, deregistered, terminated) = (&ids[0], &ids[1], &ids[2]);
    let group = target_group(&aws, &vpc, TargetTypeEnum::Instance, 30080).await;

    register(&aws, &group, &ids).await;
    // No load balancer routes to the group yet: its targets are registered but unused.
    let all = health(&aws, &group, &[]).await;
    for id in &ids {
        assert_state(
            &all,
            id,
            TargetHealthStateEnum::Unused,
            Some("Target.NotInUse"),
        );
    }

    // Health checks start when a listener forwards to the group; the targets stay `initial`
    // until HealthyThresholdCount checks have passed.
    let attached = Instant::now();
    attach_to_nlb(&aws, &subnets, &group).await;
    let all = health(&aws, &group, &[]).await;
    for id in &ids {
        assert_state(
            &all,
            id,
            TargetHealthStateEnum::Initial,
            Some("Elb.RegistrationInProgress"),
        );
    }
    sleep_until(attached + HEALTHY_AFTER - Duration::from_secs(2)).await;
    let all = health(&aws, &group, &[]).await;
    assert_state(
        &all,
        kept,
        TargetHealthStateEnum::Initial,
        Some("Elb.RegistrationInProgress"),
    );
    let healthy = wait_until(
        &aws,
        &group,
        attached + HEALTHY_AFTER,
        "all targets healthy",
        |all| {
            all.len() == 3
                && all
                    .iter()
                    .all(|h| h.state == TargetHealthStateEnum::Healthy && h.reason.is_none())
        },
    )
    .await;
    assert!(
        healthy - attached >= HEALTHY_AFTER,
        "healthy after {:?}, before the health check could pass ({HEALTHY_AFTER:?})",
        healthy - attached
    );

    // Registering a registered target again (as an Auto Scaling group does whenever it changes)
    // does not start its registration over.
    aws.elb
        .register_targets()
        .target_group_arn(&group)
        .targets(target(kept))
        .send()
        .await
        .expect("register again");
    assert_state(
        &health(&aws, &group, &[kept]).await,
        kept,
        TargetHealthStateEnum::Healthy,
        None,
    );

    // DeregisterTargets: draining for the delay, then gone from the group.
    let deregistering = Instant::now();
    aws.elb
        .deregister_targets()
        .target_group_arn(&group)
        .targets(target(deregistered))
        .send()
        .await
        .expect("deregister target");
    let all = health(&aws, &group, &[]).await;
    assert_state(
        &all,
        deregistered,
        TargetHealthStateEnum::Draining,
        Some("Target.DeregistrationInProgress"),
    );
    assert_state(&all, kept, TargetHealthStateEnum::Healthy, None);
    // A second deregistration succeeds and does not restart the delay (checked by the timing
    // below); so does deregistering a target the group never had.
    aws.elb
        .deregister_targets()
        .target_group_arn(&group)
        .targets(target(deregistered))
        .targets(target("i-0123456789abcdef0"))
        .send()
        .await
        .expect("deregistering again, or an unknown target, succeeds");
    sleep_until(deregistering + DELAY - Duration::from_secs(1)).await;
    assert_state(
        &health(&aws, &group, &[]).await,
        deregistered,
        TargetHealthStateEnum::Draining,
        Some("Target.DeregistrationInProgress"),
    );
    wait_gone(
        &aws,
        &group,
        deregistered,
        deregistering,
        "deregistered target",
    )
    .await;
    // Asked for by id, a target that left the group is reported as not registered.
    assert_state(
        &health(&aws, &group, &[deregistered]).await,
        deregistered,
        TargetHealthStateEnum::Unused,
        Some("Target.NotRegistered"),
    );

    // A terminated instance is deregistered by the load balancer: draining, then gone.
    let terminating = Instant::now();
    aws.ec2
        .terminate_instances()
        .instance_ids(terminated)
        .send()
        .await
        .expect("terminate instance");
    let all = health(&aws, &group, &[]).await;
    assert_state(
        &all,
        terminated,
        TargetHealthStateEnum::Draining,
        Some("Target.DeregistrationInProgress"),
    );
    assert_state(&all, kept, TargetHealthStateEnum::Healthy, None);
    wait_gone(
        &aws,
        &group,
        terminated,
        terminating,
        "terminated instance's target",
    )
    .await;
    let all = health(&aws, &group, &[]).await;
    assert_eq!(all.len(), 1, "only the kept target remains: {all:?}");
    assert_state(&all, kept, TargetHealthStateEnum::Healthy, None);
}

#[tokio::test]
async fn the_deregistration_delay_is_300_s_by_default_and_accepts_0_to_3600() {
    let aws = aws().await;
    let (vpc, _) = network(&aws).await;
    let group = aws
        .elb
        .create_target_group()
        .name(unique("dl"))
        .protocol(ProtocolEnum::Tcp)
        .port(30080)
        .vpc_id(&vpc)
        .send()
        .await
        .expect("create target group")
        .target_groups
        .and_then(|g| g.into_iter().next())
        .and_then(|g| g.target_group_arn)
        .expect("target group arn");
    let delay = || async {
        aws.elb
            .describe_target_group_attributes()
            .target_group_arn(&group)
            .send()
            .await
            .expect("describe attributes")
            .attributes
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.key.as_deref() == Some(DELAY_KEY))
            .and_then(|a| a.value)
    };
    assert_eq!(delay().await.as_deref(), Some("300"));
    let set = |value: &'static str| {
        aws.elb
            .modify_target_group_attributes()
            .target_group_arn(&group)
            .attributes(
                TargetGroupAttribute::builder()
                    .key(DELAY_KEY)
                    .value(value)
                    .build(),
            )
            .send()
    };
    for value in ["0", "3600"] {
        set(value)
            .await
            .unwrap_or_else(|e| panic!("{value} is in range: {e:?}"));
        assert_eq!(delay().await.as_deref(), Some(value));
    }
    for value in ["3601", "-1", "soon"] {
        assert!(set(value).await.is_err(), "{value} must be refused");
        assert_eq!(delay().await.as_deref(), Some("3600"), "unchanged");
    }
}

/// A pod's IP, once it has one.
fn pod_ip(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("a Ready pod has an IP")
}

/// A test scope `name`, and a group of `kind` on `port` that a load balancer uses.
async fn stand_in_setup(
    name: &str,
    kind: TargetTypeEnum,
    port: i32,
) -> (support::Scope, Aws, String) {
    let sandbox = support::Sandbox::connect().await;
    let scope = sandbox.scope(name).await;
    let aws = aws().await;
    let (vpc, subnets) = network(&aws).await;
    let group = target_group(&aws, &vpc, kind, port).await;
    attach_to_nlb(&aws, &subnets, &group).await;
    (scope, aws, group)
}

/// Checks that the stand-in met no error and registered and deregistered that many targets,
/// then stops it.
fn stand_in_did(lbc: support::lbc::Lbc, registered: u64, deregistered: u64) {
    let activity = lbc.activity();
    assert!(activity.errors.is_empty(), "{activity:?}");
    assert_eq!(
        (activity.registered, activity.deregistered),
        (registered, deregistered),
        "{activity:?}"
    );
}

/// The stand-in for the AWS Load Balancer Controller (tests/support/lbc.rs) that drain tests and
/// benchmarks rely on, in IP mode: a Ready pod's IP is registered and goes healthy; a pod that
/// stops being Ready, or starts terminating, is deregistered while it still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_stand_in_keeps_ip_targets_equal_to_ready_endpoints() {
    use k8s_openapi::api::core::v1::{Pod, Service};
    use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
    use serde_json::json;
    use support::lbc::{IpBinding, Lbc};

    let (scope, aws, group) = stand_in_setup("lbc-ip", TargetTypeEnum::Ip, 8080).await;
    scope.nodes(1).await;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    scope
        .api::<Service>()
        .create(&PostParams::default(), &service)
        .await
        .expect("create service");
    let lbc = Lbc::ip(
        scope.client.clone(),
        aws.elb.clone(),
        IpBinding {
            namespace: scope.id.clone(),
            service: "web".into(),
            group_arn: group.clone(),
            port: 8080,
        },
    );
    let container = json!({"containers": [{"name": "web", "image": "registry.example/web:1",
                                           "ports": [{"containerPort": 8080}]}]});
    for name in ["web-a", "web-b"] {
        support::drain::pod(
            &scope,
            name,
            json!({"app": "web"}),
            json!({}),
            None,
            container.clone(),
            30,
        )
        .await;
    }
    let ready = support::ready_pods(&scope.pods(), "app=web", 2, Duration::from_secs(120)).await;
    let ready_at = Instant::now();
    let ip = |name: &str| {
        pod_ip(
            ready
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .expect("pod listed"),
        )
    };
    let (a, b) = (ip("web-a"), ip("web-b"));

    // Registered once Ready (the EndpointSlice controller and the stand-in each take a moment),
    // on the binding's port, then healthy once the health check has passed.
    let registered = wait_until(&aws, &group, ready_at, "both pods registered", |all| {
        of(all, &a).is_some() && of(all, &b).is_some()
    })
    .await;
    let all = health(&aws, &group, &[]).await;
    assert_eq!(all.len(), 2, "only the Service's pods: {all:?}");
    wait_until(
        &aws,
        &group,
        registered + HEALTHY_AFTER,
        "both pods healthy",
        |all| {
            all.iter()
                .all(|h| h.state == TargetHealthStateEnum::Healthy)
        },
    )
    .await;
    let ports: Vec<Option<i32>> = aws
        .elb
        .describe_target_health()
        .target_group_arn(&group)
        .send()
        .await
        .expect("describe target health")
        .target_health_descriptions()
        .iter()
        .map(|d| d.target().and_then(|t| t.port()))
        .collect();
    assert_eq!(ports, vec![Some(8080), Some(8080)]);

    // web-b fails its readiness: it leaves the Ready endpoints, and its target drains.
    let unready = Instant::now();
    scope
        .pods()
        .patch_status(
            "web-b",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "ContainersReady", "status": "False"},
            ]}})),
        )
        .await
        .expect("mark web-b not Ready");
    wait_until(&aws, &group, unready, "web-b draining", |all| {
        of(all, &b).is_some_and(|h| h.state == TargetHealthStateEnum::Draining)
    })
    .await;

    // web-a is deleted with a 30 s grace period: its target drains while it terminates.
    let deleting = Instant::now();
    scope
        .pods()
        .delete("web-a", &DeleteParams::default())
        .await
        .expect("delete web-a");
    wait_until(&aws, &group, deleting, "web-a draining", |all| {
        of(all, &a).is_some_and(|h| h.state == TargetHealthStateEnum::Draining)
    })
    .await;
    let terminating: Option<Pod> = scope.pods().get_opt("web-a").await.expect("get web-a");
    assert!(
        terminating.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "deregistered while the pod terminates, not once it is gone"
    );
    stand_in_did(lbc, 2, 2);
    scope.cleanup().await;
}

/// The stand-in's instance-mode rule: a node labelled out of external load balancers has its
/// instance targets deregistered; other nodes' targets stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_stand_in_deregisters_nodes_labelled_out_of_load_balancers() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams};
    use serde_json::json;
    use support::lbc::{InstanceBinding, Lbc};

    let (scope, aws, group) = stand_in_setup("lbc-instance", TargetTypeEnum::Instance, 30080).await;
    let nodes = scope.nodes(2).await;
    let ids: Vec<String> = nodes.iter().map(support::controller::instance_id).collect();
    register(&aws, &group, &ids).await;
    let lbc = Lbc::instance(
        scope.client.clone(),
        aws.elb.clone(),
        InstanceBinding {
            group_arn: group.clone(),
            node_selector: format!("{}={}", support::TEST_KEY, scope.id),
        },
    );
    // Given time to act, it leaves unlabelled nodes alone.
    tokio::time::sleep(support::lbc::RESYNC * 2).await;
    let all = health(&aws, &group, &[]).await;
    assert!(
        all.iter()
            .all(|h| h.state != TargetHealthStateEnum::Draining),
        "{all:?}"
    );

    let labelled = Instant::now();
    Api::<Node>::all(scope.client.clone())
        .patch(
            &support::drain::name_of(&nodes[0]),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {support::controller::LB_LABEL: "true"}}})),
        )
        .await
        .expect("label the node");
    wait_until(
        &aws,
        &group,
        labelled,
        "the labelled node draining",
        |all| of(all, &ids[0]).is_some_and(|h| h.state == TargetHealthStateEnum::Draining),
    )
    .await;
    let all = health(&aws, &group, &[]).await;
    assert!(
        of(&all, &ids[1]).is_some_and(|h| h.state != TargetHealthStateEnum::Draining),
        "{all:?}"
    );
    stand_in_did(lbc, 0, 1);
    scope.cleanup().await;
}
