//! `nodedrain controller` end to end on the sandbox, for the event kinds, wrappings and flags
//! that tests/controller.rs does not cover: state changes, capacity-reservation warnings,
//! rebalance recommendations in each `--rebalance` mode, the Karpenter handoff, Auto Scaling
//! hooks through EventBridge and SNS, instances that are no node, and an SQS outage.
//!
//! Like tests/controller.rs: the real binary as a child process, one private queue per test, and
//! one global lock, because every controller resumes the unfinished drain records of every node
//! in the cluster.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::aws::{Moto, create_queue, depth, free_port, sdk_config, send, wait_empty};
use support::controller::{
    Controller, LB_LABEL, Launch, Recorded, asg_eventbridge_body, autoscaling_recorder,
    capacity_reservation_body, complete_lifecycle_actions, create_node_claim, ensure_nodeclaim_crd,
    event_id, fixture, get_node, has_label, instance_id, interruption_taint, node_claims,
    node_event_count, non_daemonset_pods, phase, rebalance_body, record, report, setup,
    sns_asg_body, sns_spot_body, spot_body, sqs, state_change_body, unschedulable,
    victim_with_pods, wait_node,
};
use support::drain::{deployment, eventually, name_of, on_node, wait_schedulable, watch_ready};
use support::{Scope, ready_pods};

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODEPOOL_LABEL: &str = "karpenter.sh/nodepool";

/// Starts a controller without leader election and waits until it is ready.
async fn start(name: &str, queue_url: &str, extra: &[&str], env: &[(&str, String)]) -> Controller {
    let mut controller = Controller::start(Launch {
        name,
        queue_url,
        lease: None,
        extra,
        env,
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    controller
}

/// Waits until the victim is cordoned with a record, then checks what every interruption must
/// leave on the node before any eviction: the taint naming `kind`, the load-balancer label and
/// the record. Returns the record.
async fn wait_prepared(scope: &Scope, victim: &str, kind: &str, event: &str) -> Value {
    let node = wait_node(scope, victim, Duration::from_secs(30), "cordoned", |n| {
        unschedulable(n) && record(n).is_some()
    })
    .await;
    assert_eq!(interruption_taint(&node).as_deref(), Some(kind), "taint");
    assert!(has_label(&node, LB_LABEL), "load-balancer exclusion label");
    let rec = record(&node).unwrap();
    assert_eq!(rec["kind"], json!(kind));
    assert_eq!(rec["eventId"], json!(event));
    rec
}

/// Waits until no non-DaemonSet pod is left on `node` (terminating ones included).
async fn wait_node_empty(scope: &Scope, node: &str) {
    let client = scope.client.clone();
    let node = node.to_string();
    eventually(
        Duration::from_secs(60),
        &format!("node {node} empty of pods"),
        || {
            let client = client.clone();
            let node = node.clone();
            async move { non_daemonset_pods(&client, &node).await.is_empty() }
        },
    )
    .await;
}

async fn wait_phase(scope: &Scope, node: &str, expected: &str) -> Node {
    wait_node(
        scope,
        node,
        Duration::from_secs(30),
        &format!("phase {expected}"),
        |n| phase(n).as_deref() == Some(expected),
    )
    .await
}

/// The victim emptied, its record at `final_phase`, both replicas Ready elsewhere and the
/// message gone.
async fn assert_drained(
    scope: &Scope,
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    victim: &str,
    final_phase: &str,
) {
    wait_node_empty(scope, victim).await;
    let node = wait_phase(scope, victim, final_phase).await;
    assert!(unschedulable(&node), "still cordoned after the drain");
    ready_pods(&scope.pods(), "app=app", 2, Duration::from_secs(30)).await;
    wait_empty(sqs, queue, Duration::from_secs(15)).await;
}

/// Waits until the controller has no drain task left: the gauge covers the whole task, handover
/// included, so once it is 0 after the drain whatever the task does to the NodeClaim is done.
async fn wait_no_drain_running(controller: &Controller) {
    eventually(Duration::from_secs(15), "no drain task running", || async {
        controller.metric("nodedrain_nodes_draining").await == 0.0
    })
    .await;
}

fn rfc3339(value: &Value) -> Timestamp {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"))
        .parse()
        .expect("RFC 3339 timestamp")
}

/// Now, to the second, so a timestamp survives the round trip through a record unchanged.
fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_change_running_is_ignored_and_stopping_drains() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("state").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-state", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let instance = instance_id(&nodes[0]);
    let mut controller = start("state", &queue, &[], &[]).await;

    send(
        &sqs,
        &queue,
        &state_change_body(&event_id("running"), &instance, "running", now_seconds()),
    )
    .await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    assert_eq!(
        controller
            .metric("nodedrain_messages_ignored_total{reason=\"instance_state\"}")
            .await,
        1.0,
        "a running instance is no interruption\n{}",
        controller.metrics().await
    );
    // The message is deleted only after its decision, so the node is in its final state.
    let node = get_node(&scope, &victim).await;
    assert!(!unschedulable(&node), "running: not cordoned");
    assert_eq!(record(&node), None, "running: no drain record");
    assert_eq!(interruption_taint(&node), None, "running: no taint");
    assert_eq!(non_daemonset_pods(&scope.client, &victim).await.len(), 2);

    let id = event_id("stopping");
    let time = now_seconds();
    send(
        &sqs,
        &queue,
        &state_change_body(&id, &instance, "stopping", time),
    )
    .await;
    let rec = wait_prepared(&scope, &victim, "state-change", &id).await;
    // The instance is already stopping: due at the event's own time.
    assert_eq!(
        rfc3339(&rec["deadline"]),
        time,
        "deadline is the event time"
    );
    assert_eq!(rec["voluntary"], json!(false));
    assert_drained(&scope, &sqs, &queue, &victim, "drained").await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("state", started);
}

fn out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| {
            taints.iter().any(|t| {
                t.key == "node.kubernetes.io/out-of-service"
                    && t.value.as_deref() == Some("nodeshutdown")
                    && t.effect == "NoExecute"
            })
        })
}

/// A StatefulSet `name` of one replica whose pod the drain leaves where it is (`strategy: skip`):
/// only the out-of-service taint moves it.
async fn skipped_stateful_set(scope: &Scope, name: &str) {
    let mut spec = scope.pod_spec(1);
    spec["containers"][0]["name"] = json!(name);
    let object: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": {"nodedrain.io/strategy": "skip"},
                },
                "spec": spec,
            },
        }
    }))
    .unwrap();
    scope
        .api::<StatefulSet>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create statefulset");
    ready_pods(
        &scope.pods(),
        &format!("app={name}"),
        1,
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_service_taint_only_once_ec2_says_the_instance_is_gone() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("oos").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-oos", &[]).await;
    // gone: its instance is terminated; alive: a late `stopped` event for an instance that runs;
    // spare: takes the StatefulSet's replacement.
    let nodes = scope.nodes(3).await;
    let gone = name_of(&nodes[0]);
    let alive = name_of(&nodes[1]);
    on_node(&scope, &nodes, &gone, || skipped_stateful_set(&scope, "db")).await;
    wait_schedulable(&scope, &nodes).await;
    let db = scope.pods().get("db-0").await.expect("db-0");
    assert_eq!(on_node_name(&db), Some(gone.clone()));
    let db_uid = db.metadata.uid.clone().unwrap();

    let mut controller = start("oos", &queue, &["--out-of-service-taint=true"], &[]).await;

    // EC2 still says running: the event is not enough.
    send(
        &sqs,
        &queue,
        &state_change_body(
            &event_id("alive"),
            &instance_id(&nodes[1]),
            "stopped",
            now_seconds(),
        ),
    )
    .await;
    // What AWS does: the instance is terminated, then its state-change event arrives.
    let ec2 = aws_sdk_ec2::Client::new(&scope.aws);
    ec2.terminate_instances()
        .instance_ids(instance_id(&nodes[0]))
        .send()
        .await
        .expect("terminate the instance");
    send(
        &sqs,
        &queue,
        &state_change_body(
            &event_id("gone"),
            &instance_id(&nodes[0]),
            "terminated",
            now_seconds(),
        ),
    )
    .await;

    wait_node(
        &scope,
        &gone,
        Duration::from_secs(60),
        "out of service",
        out_of_service,
    )
    .await;
    // The taint, not the drain (which skips it), moved the StatefulSet's pod: a new db-0
    // elsewhere.
    let client = scope.client.clone();
    let pods = scope.pods();
    eventually(
        Duration::from_secs(60),
        "db-0 recreated on another node",
        || {
            let pods = pods.clone();
            let gone = gone.clone();
            let db_uid = db_uid.clone();
            async move {
                match pods.get_opt("db-0").await {
                    Ok(Some(pod)) => {
                        pod.metadata.uid.as_deref() != Some(db_uid.as_str())
                            && on_node_name(&pod).is_some_and(|n| n != gone)
                    }
                    _ => false,
                }
            }
        },
    )
    .await;
    assert_eq!(node_event_count(&client, &gone, "OutOfService").await, 1);

    // The alive node was drained and checked in the same rounds as the gone one, and after.
    wait_phase(&scope, &alive, "drained").await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let node = get_node(&scope, &alive).await;
    assert!(
        !out_of_service(&node),
        "a node whose instance runs is never marked out of service"
    );
    assert_eq!(node_event_count(&client, &alive, "OutOfService").await, 0);
    controller.assert_running();

    drop(controller);
    let _ = scope
        .api::<StatefulSet>()
        .delete("db", &DeleteParams::default())
        .await;
    scope.cleanup().await;
    report("oos", started);
}

fn on_node_name(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_reservation_interruption_drains_by_its_termination_time() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("odcr").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-odcr", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let mut controller = start("odcr", &queue, &[], &[]).await;

    let id = event_id("odcr");
    // Not the two-minute fallback, so a deadline computed from the event time would show.
    let termination = now_seconds() + Duration::from_secs(100);
    send(
        &sqs,
        &queue,
        &capacity_reservation_body(&id, &instance_id(&nodes[0]), termination),
    )
    .await;
    let rec = wait_prepared(&scope, &victim, "capacity-reservation-interruption", &id).await;
    assert_eq!(rfc3339(&rec["deadline"]), termination);
    assert_eq!(rec["voluntary"], json!(false));
    assert_drained(&scope, &sqs, &queue, &victim, "drained").await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("odcr", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_cordons_only_by_default_and_releases_the_survivor() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("rebal-cordon").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-rebal-cordon", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let pods_before: BTreeSet<String> = non_daemonset_pods(&scope.client, &victim)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    assert_eq!(pods_before.len(), 2);
    // No --rebalance: the default mode is under test.
    let mut controller = start(
        "rebal-cordon",
        &queue,
        &["--rebalance-uncordon-after", "4s"],
        &[],
    )
    .await;

    let id = event_id("rebal-cordon");
    send(&sqs, &queue, &rebalance_body(&id, &instance_id(&nodes[0]))).await;
    let rec = wait_prepared(&scope, &victim, "rebalance-recommendation", &id).await;
    assert_eq!(rec["voluntary"], json!(true));
    assert!(rec.get("deadline").is_none(), "a rebalance has no deadline");
    let cordoned_at = rfc3339(&rec["started"]);
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;

    // Until the sweep releases the node, its pods stay where they are, untouched.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last_seen_cordoned = cordoned_at;
    let node = loop {
        let seen_at = Timestamp::now();
        let node = get_node(&scope, &victim).await;
        let pods = non_daemonset_pods(&scope.client, &victim).await;
        let uids: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        assert_eq!(uids, pods_before, "cordon-only moves no pod");
        assert!(
            pods.iter().all(|p| p.metadata.deletion_timestamp.is_none()),
            "cordon-only evicts no pod"
        );
        if !unschedulable(&node) {
            break node;
        }
        assert_eq!(phase(&node).as_deref(), Some("cordoned"), "never drained");
        last_seen_cordoned = seen_at;
        assert!(
            tokio::time::Instant::now() < end,
            "the survivor is not released within 20 s of a 4 s uncordon-after; record {:?}",
            record(&node)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(record(&node), None, "record removed with the cordon");
    assert_eq!(interruption_taint(&node), None, "taint removed");
    assert!(!has_label(&node, LB_LABEL), "load-balancer label removed");
    let kept = last_seen_cordoned.duration_since(cordoned_at);
    assert!(
        kept >= jiff::SignedDuration::from_secs(3),
        "released {kept:?} after the recommendation, before --rebalance-uncordon-after 4s"
    );
    assert_eq!(
        controller
            .metric("nodedrain_evictions_total{outcome=\"evicted\"}")
            .await,
        0.0
    );
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("rebal-cordon", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_in_drain_mode_drains_as_a_voluntary_drain() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("rebal-drain").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-rebal-drain", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let mut controller = start("rebal-drain", &queue, &["--rebalance", "drain"], &[]).await;

    let id = event_id("rebal-drain");
    send(&sqs, &queue, &rebalance_body(&id, &instance_id(&nodes[0]))).await;
    let rec = wait_prepared(&scope, &victim, "rebalance-recommendation", &id).await;
    assert_eq!(rec["voluntary"], json!(true));
    assert_drained(&scope, &sqs, &queue, &victim, "drained").await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("rebal-drain", started);
}

/// Gives the victim the NodePool label and a NodeClaim, as Karpenter would; returns the claim's
/// name. Labelled before the controller starts, so its node watch sees the label from the start.
async fn karpenter_node(scope: &Scope, node: &Node) -> String {
    ensure_nodeclaim_crd(&scope.client).await;
    let nodes: Api<Node> = Api::all(scope.client.clone());
    nodes
        .patch(
            &name_of(node),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {NODEPOOL_LABEL: "default"}}})),
        )
        .await
        .expect("label node");
    let claim = format!("claim-{}", scope.id);
    create_node_claim(&scope.client, &claim, node).await;
    claim
}

async fn claim_exists(scope: &Scope, claim: &str) -> bool {
    node_claims(&scope.client)
        .get_opt(claim)
        .await
        .expect("get NodeClaim")
        .is_some()
}

async fn remove_claim(scope: &Scope, claim: &str) {
    let _ = node_claims(&scope.client)
        .delete(claim, &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_drain_and_handover_drains_and_deletes_the_node_claim() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("rebal-handover").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-rebal-handover", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let claim = karpenter_node(&scope, &nodes[0]).await;
    let mut controller = start(
        "rebal-handover",
        &queue,
        &["--rebalance", "drain-and-handover"],
        &[],
    )
    .await;

    let id = event_id("rebal-handover");
    send(&sqs, &queue, &rebalance_body(&id, &instance_id(&nodes[0]))).await;
    wait_prepared(&scope, &victim, "rebalance-recommendation", &id).await;
    assert_drained(&scope, &sqs, &queue, &victim, "handedOver").await;
    assert!(!claim_exists(&scope, &claim).await, "NodeClaim deleted");
    controller.assert_running();

    drop(controller);
    remove_claim(&scope, &claim).await;
    scope.cleanup().await;
    report("rebal-handover", started);
}

/// docs/configuration.md: `drain-and-handover` drains "with surge (a Ready replacement first
/// for Deployment pods)". A single-replica Deployment shows it plainly: evicted, it has no Ready
/// pod until the replacement is up; surged, it always has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_drain_and_handover_starts_the_replacement_before_evicting() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("rebal-surge").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-rebal-surge", &[]).await;
    let nodes = scope.nodes(2).await;
    let victim = name_of(&nodes[0]);
    // No strategy annotation: the mode alone must ask for the surge.
    on_node(&scope, &nodes, &victim, || async {
        deployment(&scope, "single", 1, 1, json!({})).await;
        ready_pods(&scope.pods(), "app=single", 1, Duration::from_secs(30)).await;
    })
    .await;
    wait_schedulable(&scope, &nodes).await;
    let claim = karpenter_node(&scope, &nodes[0]).await;
    let (timeline, watcher) = watch_ready(&scope, "app=single");
    let mut controller = start(
        "rebal-surge",
        &queue,
        &["--rebalance", "drain-and-handover"],
        &[],
    )
    .await;

    let id = event_id("rebal-surge");
    send(&sqs, &queue, &rebalance_body(&id, &instance_id(&nodes[0]))).await;
    wait_prepared(&scope, &victim, "rebalance-recommendation", &id).await;
    wait_node_empty(&scope, &victim).await;
    wait_phase(&scope, &victim, "handedOver").await;
    ready_pods(&scope.pods(), "app=single", 1, Duration::from_secs(30)).await;
    watcher.abort();
    let min = timeline.lock().unwrap().min_after_reaching(1);
    assert_eq!(
        min,
        Some(1),
        "the replacement is Ready before the old pod goes: {:?}",
        timeline.lock().unwrap()
    );
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    remove_claim(&scope, &claim).await;
    scope.cleanup().await;
    report("rebal-surge", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_interruption_of_a_nodepool_node_deletes_its_node_claim() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("handoff").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-handoff", &[]).await;
    let nodes = scope.nodes(1).await;
    let victim = name_of(&nodes[0]);
    let claim = karpenter_node(&scope, &nodes[0]).await;
    let mut controller = start("handoff", &queue, &[], &[]).await;

    let id = event_id("handoff");
    send(&sqs, &queue, &spot_body(&id, &instance_id(&nodes[0]))).await;
    wait_prepared(&scope, &victim, "spot-interruption", &id).await;
    // An empty node: the drain ends at once and the handover follows.
    wait_phase(&scope, &victim, "handedOver").await;
    assert!(!claim_exists(&scope, &claim).await, "NodeClaim deleted");
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    remove_claim(&scope, &claim).await;
    scope.cleanup().await;
    report("handoff", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn karpenter_handoff_false_leaves_the_node_claim() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("no-handoff").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-no-handoff", &[]).await;
    let nodes = scope.nodes(1).await;
    let victim = name_of(&nodes[0]);
    let claim = karpenter_node(&scope, &nodes[0]).await;
    let mut controller = start("no-handoff", &queue, &["--karpenter-handoff=false"], &[]).await;

    let id = event_id("no-handoff");
    send(&sqs, &queue, &spot_body(&id, &instance_id(&nodes[0]))).await;
    wait_prepared(&scope, &victim, "spot-interruption", &id).await;
    wait_phase(&scope, &victim, "drained").await;
    wait_no_drain_running(&controller).await;
    assert!(claim_exists(&scope, &claim).await, "NodeClaim kept");
    assert_eq!(
        phase(&get_node(&scope, &victim).await).as_deref(),
        Some("drained"),
        "not handed over"
    );
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    remove_claim(&scope, &claim).await;
    scope.cleanup().await;
    report("no-handoff", started);
}

/// The one CompleteLifecycleAction the recorder got, and that it got no other call but
/// heartbeats.
fn assert_completed(recorded: &Recorded, hook: &str, group: &str, token: &str) {
    let requests: Vec<HashMap<String, String>> = recorded.lock().unwrap().clone();
    let completes = complete_lifecycle_actions(recorded);
    assert_eq!(
        completes.len(),
        1,
        "one CompleteLifecycleAction: {requests:#?}"
    );
    let field = |k: &str| completes[0].get(k).cloned();
    assert_eq!(field("LifecycleHookName").as_deref(), Some(hook));
    assert_eq!(field("AutoScalingGroupName").as_deref(), Some(group));
    assert_eq!(field("LifecycleActionToken").as_deref(), Some(token));
    assert_eq!(field("LifecycleActionResult").as_deref(), Some("CONTINUE"));
    let others: Vec<&HashMap<String, String>> = requests
        .iter()
        .filter(|r| {
            !matches!(
                r.get("Action").map(String::as_str),
                Some("CompleteLifecycleAction" | "RecordLifecycleActionHeartbeat")
            )
        })
        .collect();
    assert!(others.is_empty(), "no other Auto Scaling call: {others:#?}");
}

/// An Auto Scaling terminate hook in the wrapping `body` builds (event id, instance, token):
/// drained, then completed with the hook and group named in `hook`.
async fn asg_hook_is_completed(name: &str, body: fn(&str, &str, &str) -> String, hook: Value) {
    let started = Instant::now();
    let (_sandbox, scope) = setup(name).await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, &format!("ctl-{name}"), &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let recorded: Recorded = Arc::new(Mutex::new(Vec::new()));
    let endpoint = autoscaling_recorder(recorded.clone()).await;
    let mut controller = start(
        name,
        &queue,
        &[],
        &[("AWS_ENDPOINT_URL_AUTO_SCALING", endpoint)],
    )
    .await;

    let instance = instance_id(&nodes[0]);
    let token = format!("token-{}", event_id(name));
    let id = event_id(name);
    send(&sqs, &queue, &body(&id, &instance, &token)).await;
    let rec = wait_prepared(&scope, &victim, "asg-termination", &id).await;
    let hook_name = hook["LifecycleHookName"].as_str().unwrap();
    let group = hook["AutoScalingGroupName"].as_str().unwrap();
    assert_eq!(
        rec["lifecycleHook"],
        json!({"hookName": hook_name, "groupName": group, "token": token, "instanceId": instance})
    );
    // Completing the hook lets Auto Scaling terminate the instance: never while pods are left.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !non_daemonset_pods(&scope.client, &victim).await.is_empty() {
        assert!(
            complete_lifecycle_actions(&recorded).is_empty(),
            "hook completed while pods were still on the node"
        );
        assert!(
            tokio::time::Instant::now() < end,
            "node {victim} not empty within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_drained(&scope, &sqs, &queue, &victim, "handedOver").await;
    assert_completed(&recorded, hook_name, group, &token);
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report(name, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asg_terminate_hook_via_eventbridge_is_completed_after_the_drain() {
    let _serial = LOCK.lock().await;
    let hook = fixture("asg-terminate-lifecycle-eventbridge.json")["detail"].clone();
    asg_hook_is_completed("asg-eb", asg_eventbridge_body, hook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asg_terminate_hook_via_sns_is_completed_after_the_drain() {
    let _serial = LOCK.lock().await;
    let sns = fixture("sns-asg-terminate-lifecycle.json");
    let hook: Value = serde_json::from_str(sns["Message"].as_str().unwrap()).unwrap();
    asg_hook_is_completed("asg-sns", sns_asg_body, hook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_wrapped_spot_warning_drains() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("sns-spot").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-sns-spot", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;
    let mut controller = start("sns-spot", &queue, &[], &[]).await;

    // The record names the inner EventBridge id, not the SNS MessageId.
    let id = event_id("sns-spot");
    send(&sqs, &queue, &sns_spot_body(&id, &instance_id(&nodes[0]))).await;
    let rec = wait_prepared(&scope, &victim, "spot-interruption", &id).await;
    assert!(rec["deadline"].is_string(), "a spot warning has a deadline");
    assert_drained(&scope, &sqs, &queue, &victim, "drained").await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("sns-spot", started);
}

/// An instance id that neither the cluster nor EC2 knows.
fn unknown_instance() -> String {
    format!(
        "i-{:017x}",
        Timestamp::now().as_nanosecond() as u64 & 0xffff_ffff_ffff
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instance_with_node_not_found_delete_is_deleted() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("nnf-delete").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-nnf-delete", &[]).await;
    let mut controller = start("nnf-delete", &queue, &["--node-not-found", "delete"], &[]).await;

    send(
        &sqs,
        &queue,
        &spot_body(&event_id("nnf-delete"), &unknown_instance()),
    )
    .await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    assert_eq!(
        controller
            .metric("nodedrain_resolutions_total{result=\"not_found\"}")
            .await,
        1.0,
        "{}",
        controller.metrics().await
    );
    assert_eq!(
        controller
            .metric("nodedrain_messages_total{outcome=\"retried\"}")
            .await,
        0.0
    );
    assert_eq!(controller.get("/healthz").await.map(|r| r.0), Some(200));
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("nnf-delete", started);
}

/// `--node-not-found retry` is for a node that has not registered yet: the message comes back
/// until it has, and is acted on then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instance_with_node_not_found_retry_is_acted_on_once_the_node_registers() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("nnf-retry").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-nnf-retry", &[]).await;
    // A node whose instance exists but which is not registered (yet): removed from the cluster
    // now, put back later.
    let nodes = scope.nodes(1).await;
    let victim = name_of(&nodes[0]);
    let instance = instance_id(&nodes[0]);
    let api: Api<Node> = Api::all(scope.client.clone());
    api.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete node");
    eventually(Duration::from_secs(15), "node deleted", || async {
        api.get_opt(&victim).await.ok().flatten().is_none()
    })
    .await;
    let mut controller = start("nnf-retry", &queue, &["--node-not-found", "retry"], &[]).await;

    let id = event_id("nnf-retry");
    send(&sqs, &queue, &spot_body(&id, &instance)).await;
    eventually(Duration::from_secs(15), "the message retried", || async {
        controller
            .metric("nodedrain_messages_total{outcome=\"retried\"}")
            .await
            >= 1.0
    })
    .await;
    let (visible, in_flight) = depth(&sqs, &queue).await;
    assert_eq!(visible + in_flight, 1, "the message stays in the queue");
    controller.assert_running();

    let mut again = nodes[0].clone();
    again.metadata.resource_version = None;
    again.metadata.uid = None;
    again.metadata.creation_timestamp = None;
    again.metadata.managed_fields = None;
    api.create(&PostParams::default(), &again)
        .await
        .expect("register the node again");

    // The redelivery after the retry delay finds it.
    let node = wait_node(
        &scope,
        &victim,
        Duration::from_secs(40),
        "cordoned on redelivery",
        |n| unschedulable(n) && record(n).is_some(),
    )
    .await;
    assert_eq!(record(&node).unwrap()["eventId"], json!(id));
    assert_eq!(
        interruption_taint(&node).as_deref(),
        Some("spot-interruption")
    );
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("nnf-retry", started);
}

/// Creates the queue `name` exactly (same name, same URL), unlike [`create_queue`].
async fn create_named_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_outage_the_controller_keeps_running_and_recovers() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("outage").await;
    let (nodes, victim) = victim_with_pods(&scope).await;

    // SQS alone on a private moto that can go down; EC2 and Auto Scaling stay on the sandbox's.
    let port = free_port();
    let mut moto = Moto::start(port).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk_config(&Moto::url(port)).await);
    let name = format!("ctl-outage-{}", std::process::id());
    let queue = create_named_queue(&sqs, &name).await;
    let mut controller = start(
        "outage",
        &queue,
        &[],
        &[("AWS_ENDPOINT_URL_SQS", Moto::url(port))],
    )
    .await;

    moto.stop();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        controller.assert_running();
        assert_eq!(
            controller.get("/healthz").await.map(|r| r.0),
            Some(200),
            "/healthz during the outage"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        controller
            .metric("nodedrain_sqs_errors_total{operation=\"receive\"}")
            .await
            >= 1.0,
        "{}",
        controller.metrics().await
    );
    assert!(
        controller.log().contains("SQS receive failed; retrying"),
        "a backoff warning in the log:\n{}",
        controller.log_tail(30)
    );

    // A restarted endpoint has lost its state: the queue comes back under the same URL.
    let _moto = Moto::start(port).await;
    assert_eq!(create_named_queue(&sqs, &name).await, queue);
    let id = event_id("outage");
    send(&sqs, &queue, &spot_body(&id, &instance_id(&nodes[0]))).await;
    // The receivers may be in their longest backoff sleep yet.
    let node = wait_node(
        &scope,
        &victim,
        Duration::from_secs(60),
        "cordoned after the outage",
        |n| unschedulable(n) && record(n).is_some(),
    )
    .await;
    assert_eq!(record(&node).unwrap()["eventId"], json!(id));
    assert_drained(&scope, &sqs, &queue, &victim, "drained").await;
    assert!(
        controller.log().contains("SQS receive works again"),
        "recovery logged:\n{}",
        controller.log_tail(30)
    );
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("outage", started);
}
