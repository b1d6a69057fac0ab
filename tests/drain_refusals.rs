//! What stops a drain before it starts: pods that need a flag, a node that does not exist, an
//! apiserver that refuses (RBAC).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use nodedrain::drain::execute::{DrainConfig, DrainError, DrainRequest, Drainer};
use nodedrain::drain::plan::RefusalReason;
use nodedrain::drain::report::{DrainOutcome, ProgressEvent};
use nodedrain::node::{self, Phase};
use nodedrain::render;
use serde_json::json;
use support::drain::{
    client_from, deployment, drain, lines, name_of, node_of, on_node, options, pod,
    remove_cluster_roles, service_account_kubeconfig,
};
use support::{Sandbox, ready_pods};
use tokio::sync::mpsc;

fn unschedulable(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
}

#[tokio::test]
async fn bare_and_emptydir_pods_refuse_the_drain_until_the_flags_allow_them() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("refusals").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    let other = name_of(&nodes[1]);
    let pods = scope.pods();
    on_node(&scope, &nodes, &target, || async {
        pod(
            &scope,
            "bare",
            json!({"app": "bare"}),
            json!({}),
            None,
            json!({}),
            1,
        )
        .await;
        let mut spec = scope.pod_spec(1);
        spec["volumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
        deployment(&scope, "cache", 1, 1, json!({})).await;
        // The Deployment's pods get an emptyDir through a template patch.
        scope
            .api::<k8s_openapi::api::apps::v1::Deployment>()
            .patch(
                "cache",
                &Default::default(),
                &kube::api::Patch::Strategic(
                    json!({"spec": {"template": {"spec": {"volumes": spec["volumes"]}}}}),
                ),
            )
            .await
            .expect("add emptyDir");
        ready_pods(&pods, "app=bare", 1, Duration::from_secs(60)).await;
        support::drain::eventually(
            Duration::from_secs(60),
            "cache pod with emptyDir Ready",
            || async {
                ready_pods(&pods, "app=cache", 1, Duration::from_secs(30))
                    .await
                    .iter()
                    .any(nodedrain::drain::policy::uses_empty_dir)
                    && pods
                        .list(&kube::api::ListParams::default().labels("app=cache"))
                        .await
                        .unwrap()
                        .items
                        .len()
                        == 1
            },
        )
        .await;
    })
    .await;
    let cache = ready_pods(&pods, "app=cache", 1, Duration::from_secs(5)).await[0].clone();

    // Without the flags: refused, nothing evicted, the node stays cordoned.
    let (result, events) = drain(
        &scope,
        std::slice::from_ref(&target),
        DrainRequest::new(options()),
    )
    .await;
    let report = result.expect("a refusal is a report, not an error");
    let text = lines(&events).join("\n");
    assert_eq!(report.outcome, DrainOutcome::Refused, "{text}");
    assert!(!report.is_success());
    let refused = &report.nodes[0].refused;
    assert_eq!(refused.len(), 2, "{refused:?}");
    let reasons = |name: &str| {
        refused
            .iter()
            .find(|r| r.name.starts_with(name))
            .map(|r| r.reasons.clone())
            .unwrap()
    };
    assert_eq!(reasons("bare"), vec![RefusalReason::BarePod]);
    assert_eq!(reasons("cache"), vec![RefusalReason::EmptyDir]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ProgressEvent::Refused { .. }))
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ProgressEvent::Pod { .. })),
        "no pod was touched: {text}"
    );
    let summary = render::summary(&report);
    assert!(
        summary.contains(&format!(
            "cannot delete Pods that declare no controller (use --force to override): {}/bare",
            scope.id
        )),
        "{summary}"
    );
    assert!(
        summary.contains(
            "cannot delete Pods with local storage (use --delete-emptydir-data to override)"
        ),
        "{summary}"
    );
    assert!(summary.contains("Nothing was evicted"), "{summary}");
    assert!(summary.contains("stays cordoned"), "{summary}");
    for name in ["bare", cache.metadata.name.as_deref().unwrap()] {
        let pod = pods.get(name).await.expect("still there");
        assert!(
            pod.metadata.deletion_timestamp.is_none(),
            "{name} untouched"
        );
    }
    let node_api: Api<Node> = Api::all(scope.client.clone());
    assert!(unschedulable(&node_api.get(&target).await.unwrap()));
    assert_eq!(
        node::read_record(&node_api, &target)
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Failed
    );

    // With --force and --delete-emptydir-data: drained.
    let mut flags = options();
    flags.force = true;
    flags.delete_emptydir_data = true;
    let (result, events) = drain(
        &scope,
        std::slice::from_ref(&target),
        DrainRequest::new(flags),
    )
    .await;
    let report = result.expect("drain runs");
    assert!(report.is_success(), "{}", lines(&events).join("\n"));
    assert!(
        pods.get_opt("bare").await.unwrap().is_none(),
        "nothing recreates a bare pod"
    );
    let cache_now = ready_pods(&pods, "app=cache", 1, Duration::from_secs(30)).await;
    assert_eq!(node_of(&cache_now[0]).as_deref(), Some(other.as_str()));
    assert_eq!(
        node::read_record(&node_api, &target)
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Drained
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn a_missing_node_is_named_and_nothing_is_cordoned() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("missing").await;
    let nodes = scope.nodes(1).await;
    let real = name_of(&nodes[0]);
    let (sender, _receiver) = mpsc::channel(16);
    let error = Drainer::new(scope.client.clone(), DrainConfig::default())
        .drain(
            &[real.clone(), "no-such-node".to_string()],
            DrainRequest::new(options()),
            sender,
        )
        .await
        .expect_err("a missing node is an error");
    assert!(
        matches!(&error, DrainError::NodesNotFound { nodes } if nodes == &["no-such-node".to_string()]),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "node \"no-such-node\" not found");
    let node_api: Api<Node> = Api::all(scope.client.clone());
    assert!(
        !unschedulable(&node_api.get(&real).await.unwrap()),
        "the existing node was not cordoned"
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn an_rbac_refusal_is_a_readable_error() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("rbac").await;
    let nodes = scope.nodes(1).await;
    let target = name_of(&nodes[0]);

    // No rights at all: the first request (reading the node) is refused.
    let nobody = service_account_kubeconfig(&scope, &sandbox.kubeconfig, "nobody", json!([])).await;
    let (sender, _receiver) = mpsc::channel(16);
    let error = Drainer::new(client_from(&nobody).await, DrainConfig::default())
        .drain(
            std::slice::from_ref(&target),
            DrainRequest::new(options()),
            sender,
        )
        .await
        .expect_err("refused");
    assert!(error.is_forbidden(), "{error:?}");
    let message = render::error(&error);
    println!("{message}");
    assert!(
        message.contains(&format!("cannot get node \"{target}\"")),
        "{message}"
    );
    assert!(message.contains("Forbidden (403)"), "{message}");
    assert!(
        message.contains(&format!("system:serviceaccount:{}:nobody", scope.id)),
        "{message}"
    );
    assert!(
        message.contains("cannot get resource \"nodes\""),
        "{message}"
    );
    assert!(message.contains("hint:"), "{message}");

    // Read-only on nodes: the cordon (a patch) is refused, and says so.
    let reader = service_account_kubeconfig(
        &scope,
        &sandbox.kubeconfig,
        "reader",
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]),
    )
    .await;
    let client = client_from(&reader).await;
    // RBAC bindings take a moment to reach the authorizer's cache.
    support::drain::eventually(Duration::from_secs(10), "binding effective", || {
        let api: Api<Node> = Api::all(client.clone());
        let target = target.clone();
        async move { api.get(&target).await.is_ok() }
    })
    .await;
    let (sender, _receiver) = mpsc::channel(16);
    let error = Drainer::new(client, DrainConfig::default())
        .drain(
            std::slice::from_ref(&target),
            DrainRequest::new(options()),
            sender,
        )
        .await
        .expect_err("refused");
    let message = render::error(&error);
    println!("{message}");
    assert!(error.is_forbidden(), "{error:?}");
    assert!(
        message.contains(&format!("cannot patch node \"{target}\"")),
        "{message}"
    );
    assert!(
        message.contains("cannot patch resource \"nodes\""),
        "{message}"
    );

    // The binary says the same and exits non-zero.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nodedrain"))
        .args(["drain", &target, "--ignore-daemonsets", "--kubeconfig"])
        .arg(&nobody)
        .output()
        .expect("run nodedrain");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Forbidden (403)"), "{stderr}");
    assert!(stderr.contains("cannot get resource \"nodes\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let _ = std::fs::remove_file(&nobody);
    let _ = std::fs::remove_file(&reader);
    remove_cluster_roles(&scope).await;
    scope.cleanup().await;
}
