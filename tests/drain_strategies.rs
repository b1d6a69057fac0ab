//! Every strategy on a real cluster: evict, surge, wait, delete, skip; and the warning Event for
//! an annotation nodedrain cannot use.

mod support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use nodedrain::drain::execute::DrainRequest;
use nodedrain::drain::report::{DrainOutcome, PodChange, ProgressEvent};
use nodedrain::names;
use serde_json::json;
use support::drain::{
    deployment, drain, events_about, lines, name_of, node_of, on_node, options, pdb,
    wait_for_budget, watch_ready,
};
use support::{Sandbox, ready_pods};

fn changes_of<'a>(events: &'a [ProgressEvent], prefix: &str) -> Vec<&'a PodChange> {
    events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Pod { pod, change, .. } if pod.name.starts_with(prefix) => Some(change),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn evict_wait_delete_and_skip_each_do_their_part() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("strategies").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    let other = name_of(&nodes[1]);
    let pods = scope.pods();

    on_node(&scope, &nodes, &target, || async {
        // evict, under a PDB that allows one at a time; its grace annotation is unusable.
        deployment(
            &scope,
            "web",
            2,
            1,
            json!({names::ANNOTATION_GRACE_PERIOD: "-5"}),
        )
        .await;
        pdb(&scope, "web", "web", json!({"maxUnavailable": 1})).await;
        // delete: its PDB never allows a disruption, delete does not ask.
        deployment(
            &scope,
            "ops",
            1,
            1,
            json!({names::ANNOTATION_STRATEGY: "delete"}),
        )
        .await;
        pdb(&scope, "ops", "ops", json!({"minAvailable": 1})).await;
        // skip: stays.
        deployment(
            &scope,
            "keep",
            1,
            1,
            json!({names::ANNOTATION_STRATEGY: "skip"}),
        )
        .await;
        // wait: a Job that completes 4 s after it starts.
        let mut spec = scope.pod_spec(1);
        spec["restartPolicy"] = json!("Never");
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "batch"},
            "spec": {"template": {
                "metadata": {"labels": {"app": "batch"}, "annotations": {
                    names::ANNOTATION_STRATEGY: "wait",
                    "sandbox.nodedrain.io/complete-after": "4s",
                }},
                "spec": spec,
            }},
        }))
        .unwrap();
        scope
            .api::<Job>()
            .create(&PostParams::default(), &job)
            .await
            .expect("create job");
        ready_pods(&pods, "app=web", 2, Duration::from_secs(60)).await;
        ready_pods(&pods, "app=ops", 1, Duration::from_secs(60)).await;
        ready_pods(&pods, "app=keep", 1, Duration::from_secs(60)).await;
        ready_pods(&pods, "app=batch", 1, Duration::from_secs(60)).await;
    })
    .await;
    wait_for_budget(&scope, "web", 1).await;
    wait_for_budget(&scope, "ops", 0).await;
    let ops_pod = ready_pods(&pods, "app=ops", 1, Duration::from_secs(5)).await[0]
        .metadata
        .name
        .clone()
        .unwrap();

    let (result, events) = drain(
        &scope,
        std::slice::from_ref(&target),
        DrainRequest::new(options()),
    )
    .await;
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    assert_eq!(report.outcome, DrainOutcome::Drained, "{text}");
    assert!(report.is_success(), "{text}");
    let node = &report.nodes[0];
    assert_eq!(node.pods.len(), 4, "{text}");

    // evict: both web pods left one by one (the PDB allows 1), replacements run elsewhere.
    let web = changes_of(&events, "web-");
    assert_eq!(
        web.iter()
            .filter(|c| matches!(c, PodChange::Evicting { .. }))
            .count(),
        2,
        "{text}"
    );
    let web_now = ready_pods(&pods, "app=web", 2, Duration::from_secs(30)).await;
    assert!(
        web_now
            .iter()
            .all(|p| node_of(p).as_deref() == Some(other.as_str()))
    );

    // delete: gone although its PDB allows nothing.
    assert!(
        changes_of(&events, &ops_pod)
            .iter()
            .any(|c| matches!(c, PodChange::Deleting { .. })),
        "{text}"
    );
    assert!(pods.get_opt(&ops_pod).await.unwrap().is_none());

    // wait: nobody deleted it; it completed and is still there, Succeeded.
    let batch = changes_of(&events, "batch-");
    assert!(
        batch.iter().any(|c| matches!(c, PodChange::Waiting)),
        "{text}"
    );
    assert!(
        batch.iter().any(|c| matches!(
            c,
            PodChange::Gone {
                completed: true,
                ..
            }
        )),
        "{text}"
    );
    let job_pods = pods
        .list(&ListParams::default().labels("app=batch"))
        .await
        .unwrap()
        .items;
    assert_eq!(job_pods.len(), 1);
    assert!(job_pods[0].metadata.deletion_timestamp.is_none());
    assert_eq!(
        job_pods[0].status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );

    // skip: untouched, still on the drained node.
    let keep: Vec<Pod> = pods
        .list(&ListParams::default().labels("app=keep"))
        .await
        .unwrap()
        .items;
    assert_eq!(keep.len(), 1);
    assert_eq!(node_of(&keep[0]).as_deref(), Some(target.as_str()));
    assert!(keep[0].metadata.deletion_timestamp.is_none());
    assert!(
        node.ignored
            .iter()
            .any(|i| i.name == keep[0].metadata.name.clone().unwrap())
    );

    // The unusable annotation is reported on the pod it is on.
    assert!(
        node.warnings
            .iter()
            .any(|w| w.to_string().contains(names::ANNOTATION_GRACE_PERIOD)),
        "{:?}",
        node.warnings
    );
    let warned = node
        .warnings
        .iter()
        .find(|w| w.name.starts_with("web-"))
        .unwrap()
        .name
        .clone();
    let invalid = events_about(&scope, &warned, names::reasons::INVALID_ANNOTATION).await;
    assert_eq!(invalid.len(), 1, "one InvalidAnnotation Event on {warned}");
    assert_eq!(invalid[0].type_.as_deref(), Some("Warning"));
    scope.cleanup().await;
}

#[tokio::test]
async fn a_single_replica_surge_is_a_handover_without_downtime() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("surge").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    let other = name_of(&nodes[1]);
    let pods = scope.pods();
    on_node(&scope, &nodes, &target, || async {
        deployment(
            &scope,
            "db",
            1,
            2,
            json!({names::ANNOTATION_STRATEGY: "surge"}),
        )
        .await;
        ready_pods(&pods, "app=db", 1, Duration::from_secs(60)).await;
    })
    .await;
    // The classic drain-incompatible workload: one replica, minAvailable 1.
    pdb(&scope, "db", "db", json!({"minAvailable": 1})).await;
    wait_for_budget(&scope, "db", 0).await;
    let old = ready_pods(&pods, "app=db", 1, Duration::from_secs(5)).await[0].clone();
    let (timeline, watch) = watch_ready(&scope, "app=db");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (result, events) = drain(
        &scope,
        std::slice::from_ref(&target),
        DrainRequest::new(options()),
    )
    .await;
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    let changes = changes_of(&events, old.metadata.name.as_deref().unwrap());
    assert!(
        changes.iter().any(|c| matches!(
            c,
            PodChange::Surging {
                restarted: true,
                ..
            }
        )),
        "{text}"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, PodChange::ReplacementReady { .. })),
        "{text}"
    );
    assert!(
        pods.get_opt(old.metadata.name.as_deref().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    let new = ready_pods(&pods, "app=db", 1, Duration::from_secs(30)).await;
    assert_eq!(node_of(&new[0]).as_deref(), Some(other.as_str()));

    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();
    let timeline = timeline.lock().unwrap().clone();
    assert_eq!(
        timeline.min_after_reaching(1),
        Some(1),
        "Ready replicas of db dropped to 0: {:#?}",
        timeline.points
    );
    // The old pod started terminating only once a Ready pod ran on the other node.
    let old_name = old.metadata.name.clone().unwrap();
    let terminating_at = timeline
        .points
        .iter()
        .position(|(_, _, what)| what.starts_with(&old_name) && what.ends_with("terminating=true"))
        .expect("the old pod was seen terminating");
    assert!(
        timeline.points[..terminating_at]
            .iter()
            .any(|(_, _, what)| what.contains(&format!("on {other} ready=true terminating=false"))),
        "{:#?}",
        timeline.points
    );
    scope.cleanup().await;
}
