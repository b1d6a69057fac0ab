//! PodDisruptionBudgets on a real cluster: a blocked eviction that unblocks, pods under two
//! PDBs, a voluntary drain that times out with a report, and the deadline override.

mod support;

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::DeleteParams;
use nodedrain::drain::execute::DrainRequest;
use nodedrain::drain::report::{Blocker, DrainOutcome, PodChange, ProgressEvent};
use nodedrain::names;
use serde_json::json;
use support::drain::{
    deployment_on_first_node, drain, events_about, lines, options, pdb, rest, scale, spawn_drain,
    until, wait_for_budget,
};
use support::{Sandbox, ready_pods};

fn is_blocked(event: &ProgressEvent, pred: impl Fn(&Blocker) -> bool) -> bool {
    matches!(event, ProgressEvent::Pod { change: PodChange::Blocked { blocker }, .. } if pred(blocker))
}

#[tokio::test]
async fn a_pdb_blocked_eviction_goes_through_once_the_budget_allows() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("unblock").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "web", 2, 1, json!({})).await;
    let pods = scope.pods();
    pdb(&scope, "web", "web", json!({"minAvailable": 2})).await;
    wait_for_budget(&scope, "web", 0).await;

    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(60));
    let (handle, mut receiver) = spawn_drain(&scope, std::slice::from_ref(&target), request);
    let mut seen = Vec::new();
    until(&mut receiver, &mut seen, Duration::from_secs(20), |e| {
        is_blocked(e, |b| {
            matches!(b, Blocker::Pdb { name, disruptions_allowed: Some(0), .. } if name == "web")
        })
    })
    .await;
    // Still blocked a moment later: nothing is evicted past the budget.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ready_pods(&pods, "app=web", 2, Duration::from_secs(1))
            .await
            .len(),
        2
    );
    // Two more replicas (on the other node) make room for two disruptions.
    let scaled = Instant::now();
    scale(&scope, "web", 4).await;
    let report = handle.await.unwrap().expect("drain runs");
    rest(receiver, &mut seen).await;
    let text = lines(&seen).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    assert!(
        scaled.elapsed() < Duration::from_secs(15),
        "took {:?} after the scale-up",
        scaled.elapsed()
    );
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(
                e,
                ProgressEvent::Pod {
                    change: PodChange::Evicting { .. },
                    ..
                }
            ))
            .count(),
        2,
        "{text}"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn a_pod_under_two_pdbs_is_reported_and_rechecked_when_a_pdb_goes() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("twopdbs").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "dual", 2, 1, json!({})).await;
    pdb(&scope, "dual-a", "dual", json!({"maxUnavailable": 1})).await;
    pdb(&scope, "dual-b", "dual", json!({"maxUnavailable": 1})).await;
    wait_for_budget(&scope, "dual-a", 1).await;
    wait_for_budget(&scope, "dual-b", 1).await;

    // A voluntary drain with a timeout reports exactly that.
    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(4));
    let (result, events) = drain(&scope, std::slice::from_ref(&target), request).await;
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    assert_eq!(report.outcome, DrainOutcome::TimedOut, "{text}");
    let remaining: Vec<_> = report.nodes[0].remaining().collect();
    assert_eq!(remaining.len(), 2, "{text}");
    for pod in remaining {
        assert_eq!(
            pod.blocker,
            Some(Blocker::MultiplePdbs {
                names: vec!["dual-a".into(), "dual-b".into()]
            }),
            "{text}"
        );
    }
    // Reported once per pod, not once per retry.
    assert_eq!(
        events
            .iter()
            .filter(|e| is_blocked(e, |b| matches!(b, Blocker::MultiplePdbs { .. })))
            .count(),
        2,
        "{text}"
    );

    // Again, and this time one PDB goes: the drain notices at once, not at the slow recheck.
    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(60));
    let (handle, mut receiver) = spawn_drain(&scope, std::slice::from_ref(&target), request);
    let mut seen = Vec::new();
    until(&mut receiver, &mut seen, Duration::from_secs(20), |e| {
        is_blocked(e, |b| matches!(b, Blocker::MultiplePdbs { .. }))
    })
    .await;
    let removed = Instant::now();
    scope
        .api::<PodDisruptionBudget>()
        .delete("dual-b", &DeleteParams::default())
        .await
        .expect("delete pdb");
    let report = handle.await.unwrap().expect("drain runs");
    rest(receiver, &mut seen).await;
    let text = lines(&seen).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    assert!(
        removed.elapsed() < Duration::from_secs(20),
        "took {:?} after the PDB went",
        removed.elapsed()
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn at_the_deadline_a_blocked_pod_is_deleted_with_an_event() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("deadline").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "stuck", 1, 2, json!({})).await;
    let pods = scope.pods();
    // A budget that never allows a disruption of a single replica.
    pdb(&scope, "stuck", "stuck", json!({"minAvailable": 1})).await;
    wait_for_budget(&scope, "stuck", 0).await;
    let pod = ready_pods(&pods, "app=stuck", 1, Duration::from_secs(5)).await[0].clone();
    let pod_name = pod.metadata.name.clone().unwrap();

    let deadline = Timestamp::now() + SignedDuration::from_secs(15);
    let margin = Duration::from_secs(5);
    let mut options = options();
    options.voluntary = false;
    options.margin = margin;
    let mut request = DrainRequest::new(options);
    request.deadline = Some(deadline);
    let (handle, mut receiver) = spawn_drain(&scope, std::slice::from_ref(&target), request);
    let mut seen = Vec::new();
    until(&mut receiver, &mut seen, Duration::from_secs(10), |e| {
        is_blocked(e, |b| matches!(b, Blocker::Pdb { .. }))
    })
    .await;
    let override_event = until(&mut receiver, &mut seen, Duration::from_secs(20), |e| {
        matches!(
            e,
            ProgressEvent::Pod {
                change: PodChange::DeadlineOverride { .. },
                ..
            }
        )
    })
    .await;
    let overridden_at = Timestamp::now();
    let report = handle.await.unwrap().expect("drain runs");
    rest(receiver, &mut seen).await;
    let text = lines(&seen).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    assert!(report.nodes[0].pods[0].deadline_override, "{text}");
    let ProgressEvent::Pod {
        change: PodChange::DeadlineOverride { grace_seconds, .. },
        ..
    } = override_event
    else {
        unreachable!()
    };
    // The remaining grace, rounded down: waking a few milliseconds after the last safe moment
    // leaves 1.99 s, so 1 (the margin absorbs such lateness; never 0, a force deletion).
    assert!((1..=2).contains(&grace_seconds), "{text}");
    // Deleted at deadline - grace - margin (= 8 s from the start), give or take a second.
    let latest_start =
        deadline - SignedDuration::from_secs(2) - SignedDuration::try_from(margin).unwrap();
    let late_by = overridden_at.duration_since(latest_start);
    assert!(
        late_by >= SignedDuration::from_millis(-200) && late_by < SignedDuration::from_millis(1500),
        "overridden {late_by:?} after the last safe moment"
    );
    assert!(
        Timestamp::now() < deadline,
        "the pod was gone before the deadline"
    );
    let events = events_about(&scope, &pod_name, names::reasons::DEADLINE_OVERRIDE).await;
    assert_eq!(events.len(), 1, "one DeadlineOverride Event on the pod");
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.contains("PDB stuck allows 0"), "{note}");
    assert!(note.contains(&target), "{note}");
    scope.cleanup().await;
}

/// An eviction the apiserver approved but never carried out: its handler wrote the PDB status
/// that spends the budget on the pod (`disruptedPods`), and its sender was cut off before the
/// pod was deleted. The disruption controller keeps such an entry for two minutes, and every
/// other eviction under the PDB gets 429 meanwhile. The test writes that status itself, as the
/// eviction handler does (status subresource, the pod in `disruptedPods`, the budget spent):
/// cutting a real request between those two writes is a race of milliseconds.
#[tokio::test]
async fn an_approved_eviction_that_never_deleted_its_pod_is_completed() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("approved").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "web", 2, 2, json!({})).await;
    let pods = scope.pods();
    pdb(&scope, "web", "web", json!({"minAvailable": 1})).await;
    wait_for_budget(&scope, "web", 1).await;
    let victim = ready_pods(&pods, "app=web", 2, Duration::from_secs(5)).await[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let pdbs = scope.api::<PodDisruptionBudget>();
    let charged = json!({"status": {
        "disruptedPods": {victim.clone(): Timestamp::now().to_string()},
        "disruptionsAllowed": 0,
    }});
    pdbs.patch_status(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&charged),
    )
    .await
    .expect("write the status an approved eviction leaves");
    // The disruption controller keeps the entry and the spent budget.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = pdbs.get("web").await.unwrap().status.unwrap();
    assert_eq!(status.disruptions_allowed, Some(0), "{status:?}");
    assert!(
        status
            .disrupted_pods
            .unwrap_or_default()
            .contains_key(&victim)
    );

    let started = Instant::now();
    let mut request = DrainRequest::new(options());
    request.timeout = Some(Duration::from_secs(90));
    let (handle, mut receiver) = spawn_drain(&scope, std::slice::from_ref(&target), request);
    let mut seen = Vec::new();
    until(&mut receiver, &mut seen, Duration::from_secs(30), |e| {
        matches!(e, ProgressEvent::Pod { pod, change: PodChange::EvictionCompleted { pdb, .. }, .. }
            if pod.name == victim && pdb == "web")
    })
    .await;
    let completed_after = started.elapsed();
    let report = handle.await.unwrap().expect("drain runs");
    rest(receiver, &mut seen).await;
    let text = lines(&seen).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    // Well before the disruption controller's two minutes would have freed the budget.
    assert!(
        completed_after < Duration::from_secs(30),
        "completed after {completed_after:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "the drain took {:?}",
        started.elapsed()
    );
    let events = events_about(&scope, &victim, names::reasons::EVICTION_COMPLETED).await;
    assert_eq!(events.len(), 1, "{events:?}");
    scope.cleanup().await;
}
