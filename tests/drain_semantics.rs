//! Newer Kubernetes and Karpenter semantics on a real cluster: a `karpenter.sh/do-not-disrupt`
//! duration that holds a pod and then lets the drain go on, a PDB's
//! `unhealthyPodEvictionPolicy` deciding whether a not-Ready pod may leave (as `plan` predicts
//! and the apiserver decides), and `nodedrain audit` naming the pods behind its PDB findings.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use nodedrain::drain::execute::DrainRequest;
use nodedrain::drain::report::{Blocker, DrainOutcome, PodChange, ProgressEvent};
use serde_json::{Value, json};
use support::drain::{
    deployment, deployment_on_first_node, drain, lines, name_of, on_node, options, pdb, rest,
    spawn_drain, until, wait_for_budget,
};
use support::{Sandbox, ready_pods, wait_for};

/// Runs the real binary with the sandbox's kubeconfig and returns its stdout as JSON.
fn nodedrain_json(sandbox: &Sandbox, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_nodedrain"))
        .args(args)
        .env("KUBECONFIG", &sandbox.kubeconfig)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nodedrain");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!(
        "$ nodedrain {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).expect("JSON output")
}

fn pod_event<'e>(event: &'e ProgressEvent, pod: &str) -> Option<&'e PodChange> {
    match event {
        ProgressEvent::Pod { pod: p, change, .. } if p.name == pod => Some(change),
        _ => None,
    }
}

async fn pod_names(scope: &support::Scope, selector: &str) -> Vec<String> {
    let mut names: Vec<String> = scope
        .pods()
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_do_not_disrupt_duration_holds_its_pod_until_then_the_drain_evicts_it() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("dndhold").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    let pods = scope.pods();
    on_node(&scope, &nodes, &target, || async {
        deployment(
            &scope,
            "batch",
            1,
            1,
            json!({"karpenter.sh/do-not-disrupt": "15s"}),
        )
        .await;
        deployment(&scope, "web", 1, 1, json!({})).await;
        ready_pods(&pods, "app=batch", 1, Duration::from_secs(60)).await;
        ready_pods(&pods, "app=web", 1, Duration::from_secs(60)).await;
    })
    .await;
    let batch = ready_pods(&pods, "app=batch", 1, Duration::from_secs(5)).await;
    let batch_name = batch[0].metadata.name.clone().unwrap();
    let started: Timestamp = batch[0]
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .expect("the kubelet (KWOK) set startTime")
        .0;
    let hold_ends = started + SignedDuration::from_secs(15);
    let web_name = pod_names(&scope, "app=web").await.remove(0);

    // The plan says until when, counted from the pod's start as Karpenter counts it.
    let plan = nodedrain_json(&sandbox, &["plan", &target, "-o", "json"]);
    let step = plan["nodes"][0]["plan"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == batch_name.as_str())
        .expect("batch is a step")
        .clone();
    assert_eq!(step["strategy"], "evict");
    assert_eq!(step["hold"]["until"], hold_ends.to_string());
    assert_eq!(step["hold"]["fromPodStart"], true);
    assert!(
        step["blocker"]
            .as_str()
            .unwrap()
            .contains(&format!("holds it until {hold_ends}")),
        "{step}"
    );

    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(60));
    let (handle, mut receiver) = spawn_drain(&scope, std::slice::from_ref(&target), request);
    let mut seen = Vec::new();
    // The drain names the hold and its end.
    until(&mut receiver, &mut seen, Duration::from_secs(20), |e| {
        matches!(pod_event(e, &batch_name), Some(PodChange::Blocked {
            blocker: Blocker::DoNotDisrupt { value, until }
        }) if value == "15s" && *until == hold_ends)
    })
    .await;
    // The other pod does not wait for it, and the held one is not touched before its end.
    until(&mut receiver, &mut seen, Duration::from_secs(20), |e| {
        matches!(pod_event(e, &web_name), Some(PodChange::Gone { .. }))
    })
    .await;
    assert!(
        Timestamp::now() < hold_ends,
        "the test was too slow to see the hold"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(pod_event(e, &batch_name), Some(PodChange::Evicting { .. }))),
        "{}",
        lines(&seen).join("\n")
    );
    // When the hold ends the drain proceeds: evicted then, not before.
    until(&mut receiver, &mut seen, Duration::from_secs(30), |e| {
        matches!(pod_event(e, &batch_name), Some(PodChange::Evicting { .. }))
    })
    .await;
    let evicted_at = Timestamp::now();
    let report = handle.await.unwrap().expect("drain runs");
    rest(receiver, &mut seen).await;
    let text = lines(&seen).join("\n");
    println!("{text}");
    assert!(
        evicted_at >= hold_ends,
        "evicted at {evicted_at}, hold ends {hold_ends}"
    );
    assert!(
        evicted_at < hold_ends + SignedDuration::from_secs(3),
        "evicted at {evicted_at}, hold ended {hold_ends}"
    );
    assert_eq!(report.outcome, DrainOutcome::Drained, "{text}");
    scope.cleanup().await;
}

/// Makes the pod not Ready the way a failing readiness probe does (KWOK leaves a Ready pod's
/// status alone), and waits until the disruption controller counts it out.
async fn make_not_ready(scope: &support::Scope, pod: &str, pdb: &str, healthy: i32) {
    scope
        .pods()
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "ReadinessProbeFailed"},
                {"type": "ContainersReady", "status": "False"},
            ]}})),
        )
        .await
        .expect("patch pod status");
    wait_for(
        &scope.api::<PodDisruptionBudget>(),
        pdb,
        Duration::from_secs(30),
        move |p: Option<&PodDisruptionBudget>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.current_healthy == Some(healthy))
        },
    )
    .await;
}

#[tokio::test]
async fn a_not_ready_pod_leaves_past_a_spent_budget_only_under_always_allow() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("unhealthy").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "web", 3, 1, json!({})).await;
    let pods = scope.pods();
    pdb(&scope, "web", "web", json!({"minAvailable": 3})).await;
    wait_for_budget(&scope, "web", 0).await;
    let names = pod_names(&scope, "app=web").await;
    let sick = names[0].clone();
    make_not_ready(&scope, &sick, "web", 2).await;

    // IfHealthyBudget (the default), 2 healthy of 3: the plan names the PDB, its policy and the
    // not-Ready pod...
    let plan = nodedrain_json(&sandbox, &["plan", &target, "-o", "json"]);
    let steps = plan["nodes"][0]["plan"]["steps"]
        .as_array()
        .unwrap()
        .clone();
    let blocker_of = |steps: &[Value], name: &str| -> Value {
        steps.iter().find(|s| s["name"] == name).expect("a step")["blocker"].clone()
    };
    let text = blocker_of(&steps, &sick);
    let text = text.as_str().expect("the not-Ready pod is blocked");
    assert!(
        text.starts_with(
            "PDB web allows 0 disruptions and its unhealthyPodEvictionPolicy is IfHealthyBudget"
        ),
        "{text}"
    );
    assert!(text.contains("(2 healthy, 3 needed)"), "{text}");
    assert!(text.contains(&format!("{}/{sick}", scope.id)), "{text}");
    // ...the apiserver agrees (nothing leaves)...
    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(5));
    let (result, events) = drain(&scope, std::slice::from_ref(&target), request).await;
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    assert_eq!(report.outcome, DrainOutcome::TimedOut, "{text}");
    assert_eq!(report.nodes[0].remaining().count(), 3, "{text}");
    // ...and the audit recommends AlwaysAllow, naming the pod.
    let audit = nodedrain_json(&sandbox, &["audit", "-n", &scope.id, "-o", "json"]);
    let finding = audit["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "Deployment" && w["name"] == "web")
        .flat_map(|w| w["findings"].as_array().unwrap().clone())
        .find(|f| f["id"] == "unhealthy-pods-block-eviction")
        .expect("unhealthy-pods-block-eviction reported");
    assert!(
        finding["message"].as_str().unwrap().contains(&sick),
        "{finding}"
    );
    assert!(
        finding["fix"]
            .as_str()
            .unwrap()
            .starts_with("set spec.unhealthyPodEvictionPolicy: AlwaysAllow on PDB web"),
        "{finding}"
    );

    // AlwaysAllow: the plan clears the not-Ready pod, the apiserver evicts it at 0 allowed, and
    // the Ready ones stay protected.
    scope
        .api::<PodDisruptionBudget>()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unhealthyPodEvictionPolicy": "AlwaysAllow"}})),
        )
        .await
        .expect("patch pdb");
    let plan = nodedrain_json(&sandbox, &["plan", &target, "-o", "json"]);
    let steps = plan["nodes"][0]["plan"]["steps"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(blocker_of(&steps, &sick), Value::Null);
    for ready in &names[1..] {
        assert_eq!(
            blocker_of(&steps, ready),
            json!("PDB web allows 0 disruptions")
        );
    }
    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(8));
    let began = Instant::now();
    let (result, events) = drain(&scope, std::slice::from_ref(&target), request).await;
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    let evicted: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Pod {
                pod,
                change: PodChange::Evicting { .. },
                ..
            } => Some(pod.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(evicted, vec![sick.as_str()], "{text}");
    assert_eq!(report.outcome, DrainOutcome::TimedOut, "{text}");
    let remaining: Vec<String> = report.nodes[0]
        .remaining()
        .map(|p| p.pod.name.clone())
        .collect();
    assert_eq!(remaining, names[1..].to_vec(), "{text}");
    assert!(began.elapsed() < Duration::from_secs(15));
    let gone = pods.get_opt(&sick).await.expect("get pod");
    assert!(
        gone.as_ref()
            .is_none_or(|p: &Pod| p.metadata.deletion_timestamp.is_some()),
        "the not-Ready pod was evicted"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn audit_names_the_pods_under_two_pdbs() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("auditdual").await;
    deployment_on_first_node(&scope, 1, "dual", 2, 1, json!({})).await;
    pdb(&scope, "dual-a", "dual", json!({"maxUnavailable": 1})).await;
    pdb(&scope, "dual-b", "dual", json!({"maxUnavailable": 1})).await;
    let names = pod_names(&scope, "app=dual").await;
    let audit = nodedrain_json(&sandbox, &["audit", "-n", &scope.id, "-o", "json"]);
    let finding = audit["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "Deployment" && w["name"] == "dual")
        .flat_map(|w| w["findings"].as_array().unwrap().clone())
        .find(|f| f["id"] == "multiple-pdbs")
        .expect("multiple-pdbs reported");
    let message = finding["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "2 of its 2 pods ({}, {}) are selected by 2 PDBs (dual-a, dual-b)",
            names[0], names[1]
        )),
        "{message}"
    );
    scope.cleanup().await;
}
