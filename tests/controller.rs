//! `nodedrain controller` end to end on the sandbox: the real binary as a child process, reading
//! a private SQS queue on moto, acting on KWOK nodes backed by moto EC2 instances.
//!
//! The controller resumes unfinished drain records of every node in the cluster when it starts
//! leading, so these tests never run at the same time as each other (one global lock), and each
//! removes its nodes at the end.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use support::aws::{create_queue, send, wait_empty};
use support::controller::{
    Controller, LB_LABEL, Launch, Recorded, asg_direct_body, autoscaling_recorder, event_id,
    fixture, has_label, health_body, instance_id, interruption_taint, node_event_count,
    non_daemonset_pods, phase, record, report, setup, spot_body, sqs, unschedulable,
    victim_with_pods, wait_node,
};
use support::drain::{
    deployment, eventually, name_of, node_of, on_node, pdb, scale, set_unschedulable,
    wait_for_budget, wait_schedulable, watch_ready,
};
use support::{Scope, ready_pods};

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no non-DaemonSet pod is left on `node` (terminating ones included).
async fn wait_node_empty(scope: &Scope, node: &str, timeout: Duration) {
    let client = scope.client.clone();
    let node = node.to_string();
    eventually(timeout, &format!("node {node} empty of pods"), || {
        let client = client.clone();
        let node = node.clone();
        async move { non_daemonset_pods(&client, &node).await.is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_interruption_cordons_drains_and_empties_the_queue() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("spot").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-spot", &[]).await;
    let nodes = scope.nodes(2).await;
    let victim = name_of(&nodes[0]);

    // web: one replica on each node, PDB maxUnavailable 1; single: one surge replica on the
    // victim.
    on_node(&scope, &nodes, &victim, || async {
        deployment(&scope, "web", 1, 1, json!({})).await;
        ready_pods(&scope.pods(), "app=web", 1, Duration::from_secs(30)).await;
        deployment(
            &scope,
            "single",
            1,
            1,
            json!({"nodedrain.io/strategy": "surge"}),
        )
        .await;
        ready_pods(&scope.pods(), "app=single", 1, Duration::from_secs(30)).await;
    })
    .await;
    set_unschedulable(&scope, &victim, true).await;
    scale(&scope, "web", 2).await;
    let web = ready_pods(&scope.pods(), "app=web", 2, Duration::from_secs(30)).await;
    set_unschedulable(&scope, &victim, false).await;
    let on_victim = web
        .iter()
        .filter(|p| node_of(p).as_deref() == Some(victim.as_str()))
        .count();
    assert_eq!(on_victim, 1, "web is spread over both nodes");
    pdb(&scope, "web", "web", json!({"maxUnavailable": 1})).await;
    wait_for_budget(&scope, "web", 1).await;
    wait_schedulable(&scope, &nodes).await;

    let mut controller = Controller::start(Launch {
        name: "spot",
        queue_url: &queue,
        lease: None,
        extra: &[],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;

    let id = event_id("spot");
    send(&sqs, &queue, &spot_body(&id, &instance_id(&nodes[0]))).await;

    let node = wait_node(&scope, &victim, Duration::from_secs(30), "cordoned", |n| {
        unschedulable(n) && record(n).is_some()
    })
    .await;
    assert_eq!(
        interruption_taint(&node).as_deref(),
        Some("spot-interruption")
    );
    assert!(has_label(&node, LB_LABEL), "load-balancer exclusion label");
    let rec = record(&node).unwrap();
    assert_eq!(rec["eventId"], json!(id));
    assert_eq!(rec["kind"], json!("spot-interruption"));
    assert!(rec["deadline"].is_string(), "a spot warning has a deadline");

    wait_node_empty(&scope, &victim, Duration::from_secs(60)).await;
    wait_node(
        &scope,
        &victim,
        Duration::from_secs(30),
        "phase drained",
        |n| phase(n).as_deref() == Some("drained"),
    )
    .await;
    ready_pods(&scope.pods(), "app=web", 2, Duration::from_secs(30)).await;
    ready_pods(&scope.pods(), "app=single", 1, Duration::from_secs(30)).await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("spot", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_event_naming_three_instances_cordons_all_three() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("health").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-health", &[]).await;
    let nodes = scope.nodes(3).await;
    let instances: Vec<String> = nodes.iter().map(instance_id).collect();

    let mut controller = Controller::start(Launch {
        name: "health",
        queue_url: &queue,
        lease: None,
        extra: &[],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    let id = event_id("health");
    send(
        &sqs,
        &queue,
        &health_body(&id, &instances, Duration::from_secs(300)),
    )
    .await;

    for node in &nodes {
        let node = wait_node(
            &scope,
            &name_of(node),
            Duration::from_secs(30),
            "cordoned for the scheduled change",
            |n| unschedulable(n) && record(n).is_some(),
        )
        .await;
        assert_eq!(
            interruption_taint(&node).as_deref(),
            Some("scheduled-change")
        );
        let rec = record(&node).unwrap();
        assert_eq!(rec["kind"], json!("scheduled-change"));
        assert_eq!(rec["eventId"], json!(id));
        assert!(rec["deadline"].is_string());
    }
    // Empty nodes: the drains end at once.
    for node in &nodes {
        wait_node(
            &scope,
            &name_of(node),
            Duration::from_secs(30),
            "phase drained",
            |n| phase(n).as_deref() == Some("drained"),
        )
        .await;
    }
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("health", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asg_terminate_hook_is_completed_after_the_drain() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("asg").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-asg", &[]).await;
    let (nodes, victim) = victim_with_pods(&scope).await;

    let recorded: Recorded = Arc::new(Mutex::new(Vec::new()));
    let endpoint = autoscaling_recorder(recorded.clone()).await;
    let mut controller = Controller::start(Launch {
        name: "asg",
        queue_url: &queue,
        lease: None,
        extra: &[],
        env: &[("AWS_ENDPOINT_URL_AUTO_SCALING", endpoint)],
    });
    controller.wait_ready(Duration::from_secs(30)).await;

    let instance = instance_id(&nodes[0]);
    let token = format!("token-{}", event_id("asg"));
    let request = event_id("asg-request");
    send(&sqs, &queue, &asg_direct_body(&request, &instance, &token)).await;
    let hook = fixture("asg-terminate-lifecycle-direct.json");

    let node = wait_node(&scope, &victim, Duration::from_secs(30), "cordoned", |n| {
        unschedulable(n) && record(n).is_some()
    })
    .await;
    assert_eq!(
        interruption_taint(&node).as_deref(),
        Some("asg-termination")
    );
    let rec = record(&node).unwrap();
    assert_eq!(rec["lifecycleHook"]["token"], json!(token));

    wait_node_empty(&scope, &victim, Duration::from_secs(60)).await;
    wait_node(
        &scope,
        &victim,
        Duration::from_secs(30),
        "phase handedOver",
        |n| phase(n).as_deref() == Some("handedOver"),
    )
    .await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;

    let requests: Vec<HashMap<String, String>> = recorded.lock().unwrap().clone();
    let completes: Vec<&HashMap<String, String>> = requests
        .iter()
        .filter(|r| r.get("Action").map(String::as_str) == Some("CompleteLifecycleAction"))
        .collect();
    assert_eq!(
        completes.len(),
        1,
        "one CompleteLifecycleAction: {requests:#?}"
    );
    let complete = completes[0];
    let field = |k: &str| complete.get(k).map(String::as_str);
    assert_eq!(
        field("LifecycleHookName"),
        hook["LifecycleHookName"].as_str()
    );
    assert_eq!(
        field("AutoScalingGroupName"),
        hook["AutoScalingGroupName"].as_str()
    );
    assert_eq!(field("LifecycleActionToken"), Some(token.as_str()));
    assert_eq!(field("LifecycleActionResult"), Some("CONTINUE"));
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
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("asg", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_messages_drain_once() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (sandbox, scope) = setup("dup").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-dup", &[]).await;
    let nodes = scope.nodes(2).await;
    let victim = name_of(&nodes[0]);
    on_node(&scope, &nodes, &victim, || async {
        deployment(&scope, "app", 2, 3, json!({})).await;
        ready_pods(&scope.pods(), "app=app", 2, Duration::from_secs(30)).await;
    })
    .await;
    wait_schedulable(&scope, &nodes).await;

    let mut controller = Controller::start(Launch {
        name: "dup",
        queue_url: &queue,
        lease: None,
        extra: &[],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    let body = spot_body(&event_id("dup"), &instance_id(&nodes[0]));
    send(&sqs, &queue, &body).await;
    wait_node(&scope, &victim, Duration::from_secs(30), "draining", |n| {
        phase(n).as_deref() == Some("draining")
    })
    .await;
    // The redelivery arrives while the first drain runs.
    send(&sqs, &queue, &body).await;
    wait_empty(&sqs, &queue, Duration::from_secs(30)).await;
    wait_node_empty(&scope, &victim, Duration::from_secs(60)).await;
    wait_node(
        &scope,
        &victim,
        Duration::from_secs(30),
        "phase drained",
        |n| phase(n).as_deref() == Some("drained"),
    )
    .await;
    // Events are published in the background: give a second one time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node_event_count(&sandbox.client, &victim, "DrainStarted").await,
        1,
        "one DrainStarted Event for two copies of one message"
    );
    assert_eq!(
        controller
            .metric("nodedrain_messages_total{outcome=\"duplicate\"}")
            .await,
        1.0,
        "the copy is counted as a duplicate"
    );
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("dup", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_foreign_messages_are_deleted_and_the_controller_goes_on() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (_sandbox, scope) = setup("bad").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-bad", &[]).await;
    let nodes = scope.nodes(1).await;
    let node = name_of(&nodes[0]);

    let mut controller = Controller::start(Launch {
        name: "bad",
        queue_url: &queue,
        lease: None,
        extra: &[
            "--malformed-messages",
            "delete",
            "--node-not-found",
            "delete",
        ],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;

    let mut unknown = fixture("spot-interruption-warning.json");
    unknown["detail-type"] = json!("EC2 Something Nobody Has Heard Of");
    unknown["id"] = json!(event_id("unknown"));
    send(&sqs, &queue, "{ this is not json \u{1F4A5}").await;
    send(&sqs, &queue, &unknown.to_string()).await;
    send(
        &sqs,
        &queue,
        &spot_body(&event_id("foreign"), "i-0000000000deadbee"),
    )
    .await;
    wait_empty(&sqs, &queue, Duration::from_secs(30)).await;
    controller.assert_running();
    assert_eq!(
        controller
            .metric("nodedrain_messages_total{outcome=\"malformed_deleted\"}")
            .await,
        2.0,
        "garbage and unknown detail-type: malformed, deleted\n{}",
        controller.metrics().await
    );

    // Still working: a valid warning afterwards is acted on.
    let id = event_id("after");
    send(&sqs, &queue, &spot_body(&id, &instance_id(&nodes[0]))).await;
    let n = wait_node(
        &scope,
        &node,
        Duration::from_secs(30),
        "cordoned after the bad messages",
        |n| unschedulable(n) && record(n).is_some(),
    )
    .await;
    assert_eq!(record(&n).unwrap()["eventId"], json!(id));
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    controller.assert_running();

    drop(controller);
    scope.cleanup().await;
    report("bad", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_drain_standby_finishes_it() {
    let _serial = LOCK.lock().await;
    let started = Instant::now();
    let (sandbox, scope) = setup("ha").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ctl-ha", &[]).await;
    let nodes = scope.nodes(2).await;
    let victim = name_of(&nodes[0]);
    // Four pods that take 6 s each to stop, one at a time: about 30 s of draining.
    on_node(&scope, &nodes, &victim, || async {
        deployment(&scope, "slow", 4, 6, json!({})).await;
        ready_pods(&scope.pods(), "app=slow", 4, Duration::from_secs(30)).await;
    })
    .await;
    pdb(&scope, "slow", "slow", json!({"maxUnavailable": 1})).await;
    wait_for_budget(&scope, "slow", 1).await;
    wait_schedulable(&scope, &nodes).await;
    let (timeline, watcher) = watch_ready(&scope, "app=slow");

    let lease_name = format!("nodedrain-{}", scope.id);
    let mut replicas = HashMap::new();
    for name in ["replica-a", "replica-b"] {
        let controller = Controller::start(Launch {
            name,
            queue_url: &queue,
            lease: Some((&scope.id, &lease_name)),
            extra: &[],
            env: &[],
        });
        replicas.insert(name.to_string(), controller);
    }
    for controller in replicas.values_mut() {
        controller.wait_ready(Duration::from_secs(30)).await;
    }
    let leases = scope.api::<Lease>();
    let holder = || async {
        leases
            .get_opt(&lease_name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    eventually(Duration::from_secs(15), "a leader is elected", || async {
        holder().await.is_some()
    })
    .await;

    send(
        &sqs,
        &queue,
        &spot_body(&event_id("ha"), &instance_id(&nodes[0])),
    )
    .await;
    wait_node(&scope, &victim, Duration::from_secs(30), "draining", |n| {
        phase(n).as_deref() == Some("draining")
    })
    .await;
    // Let the drain get under way (one pod evicted), then kill the leader.
    let client = sandbox.client.clone();
    let v = victim.clone();
    eventually(Duration::from_secs(20), "a first pod terminating", || {
        let client = client.clone();
        let v = v.clone();
        async move {
            non_daemonset_pods(&client, &v)
                .await
                .iter()
                .any(|p| p.metadata.deletion_timestamp.is_some())
        }
    })
    .await;
    let leader = holder().await.expect("a leader");
    let killed_at = Instant::now();
    replicas
        .get_mut(&leader)
        .unwrap_or_else(|| panic!("the lease holder {leader} is one of ours"))
        .kill();
    let standby = replicas
        .keys()
        .find(|k| **k != leader)
        .cloned()
        .expect("a standby");
    let left = non_daemonset_pods(&sandbox.client, &victim).await.len();
    assert!(left >= 2, "killed mid-drain: {left} pods still on the node");

    eventually(
        Duration::from_secs(20),
        "the standby takes the lease",
        || async { holder().await.as_deref() == Some(standby.as_str()) },
    )
    .await;
    wait_node_empty(&scope, &victim, Duration::from_secs(90)).await;
    let node = wait_node(
        &scope,
        &victim,
        Duration::from_secs(30),
        "phase drained",
        |n| phase(n).as_deref() == Some("drained"),
    )
    .await;
    eprintln!(
        "standby finished the drain {:.1}s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(unschedulable(&node), "still cordoned after the drain");
    ready_pods(&scope.pods(), "app=slow", 4, Duration::from_secs(30)).await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    let survivor = replicas.get_mut(&standby).unwrap();
    survivor.assert_running();
    // The standby's own drain task finished the node (other sessions may share the sandbox, so
    // the number of records it resumed is not asserted).
    let log = survivor.log();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("drain ended") && l.contains(victim.as_str()))
        .collect();
    assert!(
        !ended.is_empty(),
        "the standby resumed and ended the drain of {victim}; log:\n{}",
        survivor.log_tail(40)
    );
    assert!(log.contains("resumed unfinished drains"));
    // One leader started the drain and one resumed it: a leader change adds a DrainResumed, not
    // a second DrainStarted (Events may lag the drain by a moment: the recorder writes them
    // after the actions they describe).
    eventually(
        Duration::from_secs(10),
        "the resumed drain's Event",
        || async { node_event_count(&sandbox.client, &victim, "DrainResumed").await >= 1 },
    )
    .await;
    assert_eq!(
        node_event_count(&sandbox.client, &victim, "DrainStarted").await,
        1,
        "one DrainStarted Event across the leader change"
    );
    assert_eq!(
        node_event_count(&sandbox.client, &victim, "DrainResumed").await,
        1,
        "one DrainResumed Event from the one standby that resumed"
    );
    // The budget held across the handover: never fewer than 3 of 4 Ready.
    let min = timeline.lock().unwrap().min_after_reaching(4);
    assert_eq!(
        min,
        Some(3),
        "PDB maxUnavailable 1 respected: {:?}",
        timeline.lock().unwrap()
    );
    watcher.abort();

    drop(replicas);
    scope.cleanup().await;
    report("ha", started);
}
