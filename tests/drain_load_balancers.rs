//! Load-balancer-aware drains on the sandbox (issue 16): a pod that serves through an ELBv2
//! target stops only once the load balancer no longer routes new connections to it, and a wait
//! the deadline cannot fit is cut at the pod's latest start and reported.
//!
//! The load balancers are moto's ELBv2 with the sandbox's target-health model
//! (docs/sandbox.md, "ELBv2 target health"): DeregisterTargets puts a target in `draining`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{LoadBalancerTypeEnum, ProtocolEnum, TargetTypeEnum};
use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use nodedrain::drain::execute::{DrainRequest, Drainer};
use nodedrain::drain::report::{DrainOutcome, PodChange, ProgressEvent};
use nodedrain::lb::discover::{Discovery, LoadBalancers};
use nodedrain::names;
use serde_json::json;
use support::drain::{drain_with, drainer, events_about, instance_of, name_of, on_node, options};
use support::lb::{ip_of, pod, register, states, subnet, target_group, vpc};
use support::lbc::ensure_binding_crd;
use support::{Sandbox, Scope, ready_pods};

fn with_load_balancers(scope: &Scope, elb: &elbv2::Client, configured: Vec<String>) -> Drainer {
    drainer(scope).with_load_balancers(Some(LoadBalancers::new(
        Discovery::new(scope.client.clone(), elb.clone(), configured),
        true,
    )))
}

fn routes(state: &str) -> bool {
    !matches!(state, "draining" | "unused" | "unhealthy.draining")
}

/// One look, every 100 ms: for each watched pod, whether it is terminating or gone, and whether
/// its target still routes new connections.
#[derive(Debug, Clone)]
struct Sample {
    pod: &'static str,
    stopping: bool,
    routed: bool,
}

fn sample(
    scope: &Scope,
    elb: &elbv2::Client,
    watched: Vec<(&'static str, String, String, i32)>,
) -> (Arc<Mutex<Vec<Sample>>>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let (pods, elb, out) = (scope.pods(), elb.clone(), samples.clone());
    let task = tokio::spawn(async move {
        loop {
            for (name, group, id, port) in &watched {
                let stopping = match pods.get_opt(name).await {
                    Ok(Some(p)) => p.metadata.deletion_timestamp.is_some(),
                    Ok(None) => true,
                    Err(_) => continue,
                };
                let routed = states(&elb, group)
                    .await
                    .iter()
                    .any(|(i, p, s)| i == id && p == port && routes(s));
                out.lock().unwrap().push(Sample {
                    pod: name,
                    stopping,
                    routed,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (samples, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_stops_only_once_its_load_balancer_targets_drain() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("lb-drain").await;
    let nodes = scope.nodes(2).await;
    let node = name_of(&nodes[0]);
    let instance = instance_of(&nodes[0]);
    on_node(&scope, &nodes, &node, || async {
        pod(
            &scope,
            "proxy",
            json!([{"containerPort": 443, "hostPort": 30443}]),
        )
        .await;
        pod(&scope, "web", json!([{"containerPort": 8080}])).await;
        pod(&scope, "batch", json!([])).await;
        for app in ["proxy", "web", "batch"] {
            ready_pods(
                &scope.pods(),
                &format!("app={app}"),
                1,
                Duration::from_secs(30),
            )
            .await;
        }
    })
    .await;
    let web = scope.pods().get("web").await.unwrap();
    let elb = elbv2::Client::new(&scope.aws);
    let vpc = vpc(&scope.aws).await;
    let suffix = std::process::id();
    // Both groups are the operator's own (Terraform): nodedrain deregisters their targets.
    let edge = target_group(
        &elb,
        &vpc,
        &format!("dr-edge-{suffix}"),
        TargetTypeEnum::Instance,
        30443,
        30,
    )
    .await;
    register(&elb, &edge, &instance, 30443).await;
    let web_group = target_group(
        &elb,
        &vpc,
        &format!("dr-web-{suffix}"),
        TargetTypeEnum::Ip,
        8080,
        300,
    )
    .await;
    register(&elb, &web_group, &ip_of(&web), 8080).await;
    // Health checks run only for groups a load balancer uses (else the targets are `unused`).
    let subnets = vec![subnet(&scope.aws, &vpc).await];
    let nlb = support::aws::load_balancer_for(
        &elb,
        &format!("dr-nlb-{suffix}"),
        LoadBalancerTypeEnum::Network,
        &subnets,
        ProtocolEnum::Tcp,
        &edge,
    )
    .await;
    // An NLB in IP mode: the same kind of target as an ALB's, on a TCP group.
    let alb = support::aws::load_balancer_for(
        &elb,
        &format!("dr-ip-{suffix}"),
        LoadBalancerTypeEnum::Network,
        &subnets,
        ProtocolEnum::Tcp,
        &web_group,
    )
    .await;
    // The model's targets become healthy after a health check or two.
    support::drain::eventually(Duration::from_secs(30), "targets healthy", || async {
        states(&elb, &edge).await.iter().all(|t| t.2 == "healthy")
            && states(&elb, &web_group)
                .await
                .iter()
                .all(|t| t.2 == "healthy")
    })
    .await;

    let (samples, sampler) = sample(
        &scope,
        &elb,
        vec![
            ("proxy", edge.clone(), instance.clone(), 30443),
            ("web", web_group.clone(), ip_of(&web), 8080),
        ],
    );
    let drainer = with_load_balancers(&scope, &elb, vec![edge.clone(), web_group.clone()]);
    let began = Instant::now();
    // The pods are bare (no controller): as `drain --force`.
    let options = nodedrain::drain::plan::PlanOptions {
        force: true,
        ..options()
    };
    let request = DrainRequest {
        timeout: Some(Duration::from_secs(120)),
        ..DrainRequest::new(options)
    };
    let (result, events) = drain_with(&drainer, std::slice::from_ref(&node), request).await;
    let took = began.elapsed();
    // A last look after the pods are gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sampler.abort();
    let report = result.expect("drain");
    assert_eq!(report.outcome, DrainOutcome::Drained, "{events:?}");

    let samples = samples.lock().unwrap().clone();
    for pod in ["proxy", "web"] {
        let of_pod: Vec<&Sample> = samples.iter().filter(|s| s.pod == pod).collect();
        assert!(of_pod.iter().any(|s| s.stopping), "{pod} seen stopping");
        // Never a stopping pod behind a target that still takes new connections.
        let unsafe_looks: Vec<&&Sample> =
            of_pod.iter().filter(|s| s.stopping && s.routed).collect();
        assert!(unsafe_looks.is_empty(), "{pod}: {unsafe_looks:?}");
    }
    // The wait ended when the targets drained, not at the groups' 30 s and 300 s delays.
    assert!(took < Duration::from_secs(25), "took {took:?}");
    let cut = events.iter().any(|e| {
        matches!(
            e,
            ProgressEvent::Pod {
                change: PodChange::LoadBalancerWaitCut { .. },
                ..
            }
        )
    });
    assert!(!cut, "no wait was cut short");
    for arn in [&nlb, &alb] {
        let _ = elb
            .delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await;
    }
    for arn in [&edge, &web_group] {
        let _ = elb.delete_target_group().target_group_arn(arn).send().await;
    }
    scope.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_the_deadline_cannot_fit_is_planned_cut_at_the_latest_start_and_reported() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("lb-deadline").await;
    ensure_binding_crd(&scope.client).await;
    let nodes = scope.nodes(2).await;
    let node = name_of(&nodes[0]);
    let instance = instance_of(&nodes[0]);
    on_node(&scope, &nodes, &node, || async {
        pod(
            &scope,
            "proxy",
            json!([{"containerPort": 443, "hostPort": 30444}]),
        )
        .await;
        ready_pods(&scope.pods(), "app=proxy", 1, Duration::from_secs(30)).await;
    })
    .await;
    let elb = elbv2::Client::new(&scope.aws);
    let vpc = vpc(&scope.aws).await;
    // A group behind a TargetGroupBinding: the AWS Load Balancer Controller would deregister the
    // node's target once it is labelled out; there is none in the sandbox, so the target stays
    // healthy, as it would with a controller that is down.
    let edge = target_group(
        &elb,
        &vpc,
        &format!("dl-edge-{}", std::process::id()),
        TargetTypeEnum::Instance,
        30444,
        300,
    )
    .await;
    register(&elb, &edge, &instance, 30444).await;
    let subnets = vec![subnet(&scope.aws, &vpc).await];
    let nlb = support::aws::load_balancer_for(
        &elb,
        &format!("dl-nlb-{}", std::process::id()),
        LoadBalancerTypeEnum::Network,
        &subnets,
        ProtocolEnum::Tcp,
        &edge,
    )
    .await;
    support::drain::eventually(Duration::from_secs(30), "target healthy", || async {
        states(&elb, &edge).await.iter().all(|t| t.2 == "healthy")
    })
    .await;
    let bindings = Api::<DynamicObject>::namespaced_with(
        scope.client.clone(),
        &scope.id,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding"),
            "targetgroupbindings",
        ),
    );
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "elbv2.k8s.aws/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": "edge"},
        "spec": {"targetGroupARN": edge, "targetType": "instance",
                 "serviceRef": {"name": "edge", "port": 443}},
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the TargetGroupBinding");

    let drainer = with_load_balancers(&scope, &elb, Vec::new());
    let deadline = Timestamp::now() + SignedDuration::from_secs(40);
    let mut options = options();
    options.force = true;
    options.voluntary = false;
    options.margin = Duration::from_secs(5);

    // `plan` says the wait does not fit before anything moves.
    let plans = drainer
        .plan(
            std::slice::from_ref(&node),
            &options,
            &Default::default(),
            Some(deadline),
        )
        .await
        .expect("plan");
    let step = plans[0]
        .plan
        .steps
        .iter()
        .find(|s| s.name == "proxy")
        .expect("proxy planned");
    assert_eq!(step.load_balancer.len(), 1, "{:?}", step.load_balancer);
    let short = step.load_balancer[0].short_by.expect("does not fit");
    assert!(
        short > Duration::from_secs(250) && short < Duration::from_secs(300),
        "short by {short:?}"
    );
    let text = nodedrain::render::plans(&plans);
    assert!(text.contains("DOES NOT FIT"), "{text}");
    assert!(
        !plans[0].plan.node_targets[0].deregistered_by_nodedrain,
        "the binding's controller owns the node's target"
    );

    let request = DrainRequest {
        deadline: Some(deadline),
        timeout: Some(Duration::from_secs(90)),
        ..DrainRequest::new(options)
    };
    let (result, events) = drain_with(&drainer, std::slice::from_ref(&node), request).await;
    let report = result.expect("drain");
    assert_eq!(report.outcome, DrainOutcome::Drained, "{events:?}");
    let latest_start = step.latest_start.expect("a latest start");
    let cut_at = events.iter().find_map(|e| match e {
        ProgressEvent::Pod {
            change: PodChange::LoadBalancerWaitCut { state, .. },
            ..
        } => Some(state.clone()),
        _ => None,
    });
    assert_eq!(cut_at.as_deref(), Some("healthy"), "{events:?}");
    // Held until its latest start, not evicted at once.
    assert!(Timestamp::now() >= latest_start);
    let published = events_about(&scope, "proxy", names::reasons::LOAD_BALANCER_WAIT_CUT).await;
    assert_eq!(
        published.len(),
        1,
        "one LoadBalancerWaitCut Event on the pod"
    );
    let _ = bindings.delete("edge", &Default::default()).await;
    let _ = elb
        .delete_load_balancer()
        .load_balancer_arn(&nlb)
        .send()
        .await;
    let _ = elb
        .delete_target_group()
        .target_group_arn(&edge)
        .send()
        .await;
    scope.cleanup().await;
}
