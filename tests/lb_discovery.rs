//! Load-balancer discovery on the sandbox (issue 16, item 1): the target groups behind
//! TargetGroupBindings and in the configuration, their deregistration delays, what they have
//! registered, and which of those targets each pod serves through.

mod support;

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::TargetTypeEnum;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use nodedrain::lb::discover::Discovery;
use nodedrain::lb::targets::{Owner, TargetType, served_by};
use serde_json::json;
use support::drain::{instance_of, name_of, on_node};
use support::lb::{ip_of, pod, register, target_group, vpc};
use support::lbc::ensure_binding_crd;
use support::{Sandbox, ready_pods};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_found_through_bindings_and_configuration_and_mapped_to_pods() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("lb-discovery").await;
    ensure_binding_crd(&scope.client).await;
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
    let pods = scope.pods();
    let proxy = pods.get("proxy").await.unwrap();
    let web = pods.get("web").await.unwrap();
    let batch = pods.get("batch").await.unwrap();

    let aws = &scope.aws;
    let elb = elbv2::Client::new(aws);
    let vpc = vpc(aws).await;
    let suffix = std::process::id();
    // An NLB group the operator runs with Terraform: instance targets on the proxy's host port.
    let edge = target_group(
        &elb,
        &vpc,
        &format!("it-edge-{suffix}"),
        TargetTypeEnum::Instance,
        30443,
        30,
    )
    .await;
    register(&elb, &edge, &instance, 30443).await;
    // An ALB group in IP mode behind a TargetGroupBinding: the web pod's IP and port.
    let web_group = target_group(
        &elb,
        &vpc,
        &format!("it-web-{suffix}"),
        TargetTypeEnum::Ip,
        8080,
        300,
    )
    .await;
    register(&elb, &web_group, &ip_of(&web), 8080).await;
    // Another pod's IP on another port is not the web pod's target.
    register(&elb, &web_group, &ip_of(&batch), 9090).await;
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
        "metadata": {"name": "web"},
        "spec": {
            "targetGroupARN": web_group,
            "targetType": "ip",
            "serviceRef": {"name": "web", "port": 80},
        },
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the TargetGroupBinding");

    // A stale ARN in the configuration (its load balancer deleted) costs only itself.
    let stale = edge.replace(&format!("it-edge-{suffix}"), &format!("it-gone-{suffix}"));
    let discovery = Discovery::new(scope.client.clone(), elb.clone(), vec![edge.clone(), stale]);
    let groups: Vec<_> = discovery
        .target_groups()
        .await
        .expect("target groups")
        .into_iter()
        .filter(|g| g.arn == edge || g.arn == web_group)
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let edge_group = groups.iter().find(|g| g.arn == edge).unwrap();
    assert_eq!(edge_group.target_type, TargetType::Instance);
    assert_eq!(edge_group.owner, Owner::Configured);
    assert_eq!(edge_group.deregistration_delay, Duration::from_secs(30));
    let bound = groups.iter().find(|g| g.arn == web_group).unwrap();
    assert_eq!(bound.target_type, TargetType::Ip);
    assert_eq!(
        bound.owner,
        Owner::Binding {
            namespace: scope.id.clone(),
            name: "web".into()
        }
    );
    assert_eq!(bound.deregistration_delay, Duration::from_secs(300));

    let mut registered = Vec::new();
    for group in &groups {
        for (target, _) in discovery.registered(group).await.expect("registered") {
            registered.push((group.clone(), target));
        }
    }
    assert_eq!(registered.len(), 3, "{registered:?}");
    let pairs = || registered.iter().map(|(g, t)| (g, t));
    let of_proxy = served_by(&proxy, Some(&instance), pairs());
    assert_eq!(of_proxy.len(), 1, "{of_proxy:?}");
    assert_eq!(
        (of_proxy[0].group_arn.as_str(), of_proxy[0].port),
        (edge.as_str(), 30443)
    );
    let of_web = served_by(&web, Some(&instance), pairs());
    assert_eq!(of_web.len(), 1, "{of_web:?}");
    assert_eq!(
        (of_web[0].group_arn.as_str(), of_web[0].id.clone()),
        (web_group.as_str(), ip_of(&web))
    );
    assert!(
        served_by(&batch, Some(&instance), pairs()).is_empty(),
        "batch serves no target"
    );
    // The proxy on another node does not serve through this node's instance target.
    assert!(served_by(&proxy, Some("i-0000000000000000f"), pairs()).is_empty());

    let _ = bindings.delete("web", &Default::default()).await;
    for arn in [&edge, &web_group] {
        let _ = elb.delete_target_group().target_group_arn(arn).send().await;
    }
    scope.cleanup().await;
}
