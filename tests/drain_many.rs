//! Several nodes drained at once: every node is cordoned before the first eviction, and the
//! nodes drain concurrently.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use nodedrain::drain::execute::DrainRequest;
use nodedrain::drain::report::ProgressEvent;
use serde_json::json;
use support::drain::{
    deployment_with, drain, lines, name_of, node_of, options, set_unschedulable, wait_schedulable,
};
use support::{Sandbox, TEST_KEY, ready_pods};

fn rv<K: kube::Resource>(object: &K) -> u64 {
    // resourceVersions are opaque by contract; on etcd they are its global revision, which is
    // exactly the order the writes happened in.
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("numeric resourceVersion")
}

#[tokio::test]
async fn several_nodes_are_all_cordoned_before_any_pod_is_evicted() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("many").await;
    let nodes = scope.nodes(4).await;
    let targets: Vec<String> = nodes[..3].iter().map(name_of).collect();
    let spare = name_of(&nodes[3]);
    let pods = scope.pods();
    wait_schedulable(&scope, &nodes).await;
    set_unschedulable(&scope, &spare, true).await;
    // Two per target: spread by hostname over the schedulable nodes.
    deployment_with(
        &scope,
        "spread",
        6,
        3,
        json!({}),
        json!({"topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "nodeTaintsPolicy": "Honor",
            "labelSelector": {"matchLabels": {"app": "spread"}},
        }]}),
    )
    .await;
    let placed = ready_pods(&pods, "app=spread", 6, Duration::from_secs(60)).await;
    set_unschedulable(&scope, &spare, false).await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &placed {
        *per_node.entry(node_of(pod).unwrap()).or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        3,
        "pods spread over the targets: {per_node:?}"
    );

    // Record, by resourceVersion, when each target was cordoned and each pod started to go.
    let cordoned: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let evicted: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let node_watch = {
        let cordoned = cordoned.clone();
        let api: Api<Node> = Api::all(scope.client.clone());
        let config = watcher::Config::default().labels(&format!("{TEST_KEY}={}", scope.id));
        tokio::spawn(async move {
            let mut stream = watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(Ok(node)) = stream.next().await {
                if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
                    cordoned
                        .lock()
                        .unwrap()
                        .entry(name_of(&node))
                        .or_insert(rv(&node));
                }
            }
        })
    };
    let pod_watch = {
        let evicted = evicted.clone();
        let api: Api<Pod> = scope.pods();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(Ok(pod)) = stream.next().await {
                if pod.metadata.deletion_timestamp.is_some() {
                    evicted
                        .lock()
                        .unwrap()
                        .entry(pod.metadata.name.clone().unwrap())
                        .or_insert(rv(&pod));
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    let (result, events) = drain(&scope, &targets, DrainRequest::new(options())).await;
    let took = started.elapsed();
    let report = result.expect("drain runs");
    let text = lines(&events).join("\n");
    println!("{text}");
    assert!(report.is_success(), "{text}");
    assert_eq!(report.nodes.len(), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    node_watch.abort();
    pod_watch.abort();

    let cordoned = cordoned.lock().unwrap().clone();
    let evicted = evicted.lock().unwrap().clone();
    assert_eq!(cordoned.len(), 3, "{cordoned:?}");
    assert_eq!(evicted.len(), 6, "{evicted:?}");
    let last_cordon = cordoned.values().max().unwrap();
    let first_eviction = evicted.values().min().unwrap();
    assert!(
        last_cordon < first_eviction,
        "a pod was evicted (rv {first_eviction}) before every node was cordoned (rv {last_cordon})"
    );
    // The progress stream says the same.
    let first_pod_event = events
        .iter()
        .position(|e| matches!(e, ProgressEvent::Pod { .. }))
        .unwrap();
    assert_eq!(
        events[..first_pod_event]
            .iter()
            .filter(|e| matches!(e, ProgressEvent::Cordoned { .. }))
            .count(),
        3
    );
    // Concurrent: three nodes with 3 s grace pods take about one grace period, not three.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let now = ready_pods(&pods, "app=spread", 6, Duration::from_secs(30)).await;
    assert!(
        now.iter()
            .all(|p| node_of(p).as_deref() == Some(spare.as_str()))
    );
    scope.cleanup().await;
}
