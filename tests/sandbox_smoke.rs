//! The sandbox behaves like a real cluster where nodedrain depends on it: PDB-guarded evictions,
//! cordons, grace periods, and the AWS endpoint.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, EvictParams, ListParams, PostParams};
use kube::runtime::wait::conditions::is_deleted;
use serde_json::json;
use support::{Sandbox, Scope, ready_pods, wait_for};

async fn deployment(scope: &Scope, name: &str, replicas: i32, grace: i64) {
    let mut spec = scope.pod_spec(grace);
    spec["containers"][0]["name"] = json!(name);
    let object: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        }
    }))
    .unwrap();
    scope
        .api::<Deployment>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create deployment");
}

async fn pdb(scope: &Scope, app: &str, budget: serde_json::Value) {
    let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
    spec.as_object_mut()
        .unwrap()
        .extend(budget.as_object().unwrap().clone());
    let object: PodDisruptionBudget =
        serde_json::from_value(json!({"metadata": {"name": app}, "spec": spec})).unwrap();
    scope
        .api::<PodDisruptionBudget>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create pdb");
}

/// The disruption controller must have computed the budget before an eviction means anything.
async fn wait_for_budget(scope: &Scope, name: &str, allowed: i32) {
    wait_for(
        &scope.api::<PodDisruptionBudget>(),
        name,
        Duration::from_secs(30),
        move |pdb: Option<&PodDisruptionBudget>| {
            pdb.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                s.disruptions_allowed == Some(allowed)
                    && s.observed_generation.is_some_and(|g| g > 0)
            })
        },
    )
    .await;
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("pod is bound")
}

#[tokio::test]
async fn eviction_is_refused_by_an_exhausted_pdb_and_allowed_by_a_permissive_one() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("evict").await;
    let nodes = scope.nodes(2).await;
    let pods = scope.pods();

    deployment(&scope, "single", 1, 1).await;
    pdb(&scope, "single", json!({"minAvailable": 1})).await;
    deployment(&scope, "pair", 2, 1).await;
    pdb(&scope, "pair", json!({"maxUnavailable": 1})).await;
    let single = ready_pods(&pods, "app=single", 1, Duration::from_secs(60)).await;
    let pair = ready_pods(&pods, "app=pair", 2, Duration::from_secs(60)).await;
    wait_for_budget(&scope, "single", 0).await;
    wait_for_budget(&scope, "pair", 1).await;

    let name = single[0].metadata.name.clone().unwrap();
    match pods.evict(&name, &EvictParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 429, "{status:?}"),
        other => panic!("eviction past minAvailable=1 must be refused with 429, got {other:?}"),
    }

    // Cordon the victim's node so the replacement has exactly one place to go.
    let victim = &pair[0];
    let victim_node = node_of(victim);
    let node_api: Api<Node> = Api::all(sandbox.client.clone());
    node_api.cordon(&victim_node).await.expect("cordon");
    let victim_name = victim.metadata.name.clone().unwrap();
    pods.evict(&victim_name, &EvictParams::default())
        .await
        .expect("eviction allowed by maxUnavailable=1");
    let replacement = loop {
        let all = ready_pods(&pods, "app=pair", 2, Duration::from_secs(60)).await;
        if let Some(new) = all.into_iter().find(|p| {
            p.metadata.name.as_deref() != Some(&victim_name)
                && p.metadata.uid != victim.metadata.uid
                && !pair.iter().any(|old| old.metadata.uid == p.metadata.uid)
        }) {
            break new;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let other_node = nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .find(|n| *n != victim_node)
        .unwrap();
    assert_eq!(
        node_of(&replacement),
        other_node,
        "the scheduler bound the replacement elsewhere"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn a_cordoned_node_receives_no_new_pods() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("cordon").await;
    let nodes = scope.nodes(2).await;
    let cordoned = nodes[0].metadata.name.clone().unwrap();
    let open = nodes[1].metadata.name.clone().unwrap();
    Api::<Node>::all(sandbox.client.clone())
        .cordon(&cordoned)
        .await
        .expect("cordon");

    deployment(&scope, "spread", 6, 1).await;
    let pods = ready_pods(&scope.pods(), "app=spread", 6, Duration::from_secs(60)).await;
    let placed: Vec<String> = pods.iter().map(node_of).collect();
    assert!(
        placed.iter().all(|n| *n == open),
        "pods landed on {placed:?}, cordoned: {cordoned}"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn an_evicted_pod_is_gone_only_after_its_grace_period() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("grace").await;
    scope.nodes(1).await;
    let pods = scope.pods();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "slow", "labels": {"app": "slow"}},
        "spec": scope.pod_spec(5),
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let pod = ready_pods(&pods, "app=slow", 1, Duration::from_secs(60))
        .await
        .remove(0);
    let uid = pod.metadata.uid.clone().unwrap();

    let started = Instant::now();
    pods.evict("slow", &EvictParams::default())
        .await
        .expect("evict");
    let terminating = pods
        .get("slow")
        .await
        .expect("still there while terminating");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    wait_for(&pods, "slow", Duration::from_secs(30), is_deleted(&uid)).await;
    let took = started.elapsed();
    // deletionTimestamp has whole-second resolution (the apiserver truncates now + grace), so a
    // 5 s grace ends between 4 and 5 s after the eviction; a kubelet behaves the same.
    assert!(
        took >= Duration::from_millis(3900) && took < Duration::from_secs(9),
        "a 5 s grace period took {took:?}"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn sqs_sends_and_receives_on_the_sandbox_queue() {
    let sandbox = Sandbox::connect().await;
    let sqs = aws_sdk_sqs::Client::new(&sandbox.aws);
    // A queue of its own: the shared interruption queue belongs to controller tests.
    let queue = sqs
        .create_queue()
        .queue_name(format!("smoke-{}", std::process::id()))
        .send()
        .await
        .expect("create queue")
        .queue_url
        .unwrap();
    let body = r#"{"detail-type":"EC2 Spot Instance Interruption Warning"}"#;
    sqs.send_message()
        .queue_url(&queue)
        .message_body(body)
        .send()
        .await
        .expect("send");
    let received = sqs
        .receive_message()
        .queue_url(&queue)
        .wait_time_seconds(5)
        .max_number_of_messages(10)
        .send()
        .await
        .expect("receive");
    let messages = received.messages.unwrap_or_default();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body(), Some(body));
    // The interruption queue exists with its dead-letter redrive.
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&sandbox.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .expect("queue attributes of the interruption queue");
    assert!(attrs.attributes().is_some_and(|a| !a.is_empty()));
}

#[tokio::test]
async fn ec2_describes_the_instances_behind_the_nodes() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("ec2").await;
    let nodes = scope.nodes(3).await;
    let ec2 = aws_sdk_ec2::Client::new(&sandbox.aws);
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| {
            let provider = n.spec.as_ref().and_then(|s| s.provider_id.clone()).unwrap();
            provider.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    let described = ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .expect("describe instances");
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 3);
    for instance in instances {
        assert!(ids.contains(&instance.instance_id().unwrap().to_string()));
        assert_eq!(
            instance.instance_lifecycle().map(|l| l.as_str()),
            Some("spot")
        );
        let tag = instance
            .tags()
            .iter()
            .find(|t| t.key() == Some(support::TEST_KEY));
        assert_eq!(tag.and_then(|t| t.value()), Some(scope.id.as_str()));
        let node_name = instance.private_dns_name().unwrap();
        assert!(
            nodes
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(node_name))
        );
    }
    // The standing fixture nodes are backed by tagged instances too.
    let fixture_nodes = Api::<Node>::all(sandbox.client.clone())
        .list(&ListParams::default().labels("sandbox.nodedrain.io/fixture"))
        .await
        .expect("list fixture nodes");
    let tagged = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:kubernetes.io/cluster/nodedrain")
                .values("owned")
                .build(),
        )
        .send()
        .await
        .expect("describe by tag");
    let tagged_count: usize = tagged
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    assert!(tagged_count >= fixture_nodes.items.len() && !fixture_nodes.items.is_empty());
    scope.cleanup().await;
}
