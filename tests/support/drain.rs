//! Helpers for the drain tests: workloads placed on a chosen node, PDBs, running the engine,
//! and watchers that record what the cluster went through.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::Condition as _;
use kube::runtime::{WatchStreamExt, watcher};
use nodedrain::drain::execute::{DrainConfig, DrainError, DrainRequest, Drainer};
use nodedrain::drain::plan::{DaemonSetHandling, PlanOptions};
use nodedrain::drain::report::{DrainReport, ProgressEvent};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Scope, is_pod_ready, wait_for};

pub fn name_of(node: &Node) -> String {
    node.metadata.name.clone().unwrap()
}

/// The EC2 instance id of a test node, from its providerID (every sandbox test node has one).
pub fn instance_of(node: &Node) -> String {
    let provider_id = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.as_deref())
        .expect("providerID");
    nodedrain::interruption::events::instance_id_from_provider_id(provider_id)
        .expect("an instance id")
        .to_string()
}

pub fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

pub async fn set_unschedulable(scope: &Scope, node: &str, unschedulable: bool) {
    let api: Api<Node> = Api::all(scope.client.clone());
    api.patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})),
    )
    .await
    .expect("patch node");
}

/// Runs `create` while only `target` accepts pods: the other scope nodes are cordoned meanwhile
/// and uncordoned afterwards, so the workloads land on `target` and their replacements can go
/// elsewhere.
pub async fn on_node<F, Fut>(scope: &Scope, nodes: &[Node], target: &str, create: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    wait_schedulable(scope, nodes).await;
    let others: Vec<String> = nodes.iter().map(name_of).filter(|n| n != target).collect();
    for other in &others {
        set_unschedulable(scope, other, true).await;
    }
    create().await;
    for other in &others {
        set_unschedulable(scope, other, false).await;
    }
}

/// `node_count` nodes and a Deployment `name` of `replicas` Ready pods, all on the first node;
/// the others stay empty to take what the first node's drain moves. Returns the nodes and the
/// first one's name.
pub async fn deployment_on_first_node(
    scope: &Scope,
    node_count: usize,
    name: &str,
    replicas: i32,
    grace: i64,
    annotations: Value,
) -> (Vec<Node>, String) {
    let nodes = scope.nodes(node_count).await;
    let target = name_of(&nodes[0]);
    on_node(scope, &nodes, &target, || async {
        deployment(scope, name, replicas, grace, annotations).await;
        super::ready_pods(
            &scope.pods(),
            &format!("app={name}"),
            replicas as usize,
            Duration::from_secs(60),
        )
        .await;
    })
    .await;
    (nodes, target)
}

/// A Deployment `name` (label app=name) with pod-template annotations.
pub async fn deployment(scope: &Scope, name: &str, replicas: i32, grace: i64, annotations: Value) {
    deployment_with(scope, name, replicas, grace, annotations, json!({})).await;
}

/// [`deployment`] with extra pod spec fields (`extra_spec` extends the scope's pod spec).
pub async fn deployment_with(
    scope: &Scope,
    name: &str,
    replicas: i32,
    grace: i64,
    annotations: Value,
    extra_spec: Value,
) {
    let mut spec = scope.pod_spec(grace);
    spec["containers"][0]["name"] = json!(name);
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    let object: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": spec,
            },
        }
    }))
    .unwrap();
    scope
        .api::<Deployment>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create deployment");
}

pub async fn scale(scope: &Scope, name: &str, replicas: i32) {
    scope
        .api::<Deployment>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scale deployment");
}

/// A pod from raw JSON parts: `spec` extends the scope's pod spec.
pub async fn pod(
    scope: &Scope,
    name: &str,
    labels: Value,
    annotations: Value,
    owner: Option<Value>,
    extra_spec: Value,
    grace: i64,
) -> Pod {
    let mut spec = scope.pod_spec(grace);
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    let mut metadata = json!({"name": name, "labels": labels, "annotations": annotations});
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    let object: Pod = serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap();
    scope
        .pods()
        .create(&PostParams::default(), &object)
        .await
        .expect("create pod")
}

/// A PDB named `name` over app=`app`, with `budget` (e.g. `{"minAvailable": 1}`).
pub async fn pdb(scope: &Scope, name: &str, app: &str, budget: Value) {
    let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
    spec.as_object_mut()
        .unwrap()
        .extend(budget.as_object().unwrap().clone());
    let object: PodDisruptionBudget =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    scope
        .api::<PodDisruptionBudget>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create pdb");
}

/// Waits until the disruption controller has computed the budget.
pub async fn wait_for_budget(scope: &Scope, name: &str, allowed: i32) {
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

/// Drain options for tests: like the CLI without flags, but DaemonSets ignored.
pub fn options() -> PlanOptions {
    PlanOptions {
        daemonsets: DaemonSetHandling::Ignore,
        ..PlanOptions::default()
    }
}

pub fn drainer(scope: &Scope) -> Drainer {
    Drainer::new(scope.client.clone(), DrainConfig::default())
}

/// Runs a drain, collecting every progress event.
pub async fn drain(
    scope: &Scope,
    nodes: &[String],
    request: DrainRequest,
) -> (Result<DrainReport, DrainError>, Vec<ProgressEvent>) {
    drain_with(&drainer(scope), nodes, request).await
}

/// Runs a drain on `drainer`, collecting every progress event.
pub async fn drain_with(
    drainer: &Drainer,
    nodes: &[String],
    request: DrainRequest,
) -> (Result<DrainReport, DrainError>, Vec<ProgressEvent>) {
    let (sender, mut receiver) = mpsc::channel(1024);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(event) = receiver.recv().await {
            events.push(event);
        }
        events
    });
    let result = drainer.drain(nodes, request, sender).await;
    let events = collector.await.unwrap();
    (result, events)
}

pub fn lines(events: &[ProgressEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| nodedrain::render::progress_line(e, true))
        .collect()
}

/// Events (events.k8s.io) about `pod` with `reason`.
pub async fn events_about(scope: &Scope, pod: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(scope.client.clone(), &scope.id);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .collect()
}

/// Polls (tests only) until `check` passes or `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a watcher on a label selector saw: the Ready-and-not-terminating count after every
/// event, with the event's pod.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// (seconds since the watch started, ready count, what happened).
    pub points: Vec<(f64, usize, String)>,
}

impl Timeline {
    /// The lowest Ready count after the count first reached `from`.
    pub fn min_after_reaching(&self, from: usize) -> Option<usize> {
        let start = self.points.iter().position(|(_, n, _)| *n >= from)?;
        self.points[start..].iter().map(|(_, n, _)| *n).min()
    }
}

/// Watches pods matching `selector` in the scope's namespace and records the Ready count.
pub fn watch_ready(scope: &Scope, selector: &str) -> (Arc<Mutex<Timeline>>, JoinHandle<()>) {
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let api = scope.pods();
    let config = watcher::Config::default().labels(selector);
    let shared = timeline.clone();
    let handle = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            let what = match event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let what = describe(&p);
                    pods.insert(p.metadata.uid.clone().unwrap_or_default(), p);
                    what
                }
                watcher::Event::Delete(p) => {
                    pods.remove(p.metadata.uid.as_deref().unwrap_or_default());
                    format!("deleted {}", p.metadata.name.unwrap_or_default())
                }
                _ => continue,
            };
            let ready = pods
                .values()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && is_pod_ready().matches_object(Some(p))
                })
                .count();
            shared
                .lock()
                .unwrap()
                .points
                .push((started.elapsed().as_secs_f64(), ready, what));
        }
    });
    (timeline, handle)
}

fn describe(pod: &Pod) -> String {
    format!(
        "{} on {} ready={} terminating={}",
        pod.metadata.name.clone().unwrap_or_default(),
        node_of(pod).unwrap_or_default(),
        is_pod_ready().matches_object(Some(pod)),
        pod.metadata.deletion_timestamp.is_some()
    )
}

/// Starts a drain in the background; progress arrives on the receiver as it happens.
pub fn spawn_drain(
    scope: &Scope,
    nodes: &[String],
    request: DrainRequest,
) -> (
    JoinHandle<Result<DrainReport, DrainError>>,
    mpsc::Receiver<ProgressEvent>,
) {
    let (sender, receiver) = mpsc::channel(1024);
    let drainer = drainer(scope);
    let nodes = nodes.to_vec();
    let handle = tokio::spawn(async move { drainer.drain(&nodes, request, sender).await });
    (handle, receiver)
}

/// Reads progress until `matches` accepts an event (returned with everything seen before).
pub async fn until(
    receiver: &mut mpsc::Receiver<ProgressEvent>,
    seen: &mut Vec<ProgressEvent>,
    timeout: Duration,
    matches: impl Fn(&ProgressEvent) -> bool,
) -> ProgressEvent {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(end, receiver.recv()).await {
            Ok(Some(event)) => {
                seen.push(event.clone());
                if matches(&event) {
                    return event;
                }
            }
            Ok(None) => panic!("the drain ended first:\n{}", lines(seen).join("\n")),
            Err(_) => panic!(
                "no such event within {timeout:?}:\n{}",
                lines(seen).join("\n")
            ),
        }
    }
}

/// Everything left on the receiver (after the drain ended).
pub async fn rest(mut receiver: mpsc::Receiver<ProgressEvent>, seen: &mut Vec<ProgressEvent>) {
    while let Some(event) = receiver.recv().await {
        seen.push(event);
    }
}

/// A ServiceAccount in the scope's namespace and a kubeconfig that authenticates as it (a
/// TokenRequest token in place of the sandbox's admin certificate). `rules` (RBAC PolicyRules)
/// are granted cluster-wide through a ClusterRole named after the scope; `[]` grants nothing.
pub async fn service_account_kubeconfig(
    scope: &Scope,
    sandbox_kubeconfig: &std::path::Path,
    name: &str,
    rules: Value,
) -> std::path::PathBuf {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let accounts: Api<ServiceAccount> = Api::namespaced(scope.client.clone(), &scope.id);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .expect("create service account");
    if rules.as_array().is_some_and(|r| !r.is_empty()) {
        let role_name = format!("{}-{name}", scope.id);
        Api::<ClusterRole>::all(scope.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": role_name, "labels": {super::TEST_KEY: scope.id}},
                    "rules": rules,
                }))
                .unwrap(),
            )
            .await
            .expect("create cluster role");
        Api::<ClusterRoleBinding>::all(scope.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": role_name, "labels": {super::TEST_KEY: scope.id}},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": scope.id}],
                }))
                .unwrap(),
            )
            .await
            .expect("create cluster role binding");
    }
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .unwrap();
    let token = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token")
        .token;
    let text = std::fs::read_to_string(sandbox_kubeconfig).expect("read kubeconfig");
    let mut config: Value = serde_saphyr::from_str(&text).expect("kubeconfig yaml");
    config["users"][0]["user"] = json!({"token": token});
    let path = std::env::temp_dir().join(format!("{}-{name}.kubeconfig", scope.id));
    std::fs::write(&path, serde_saphyr::to_string(&config).unwrap()).expect("write kubeconfig");
    path
}

/// Removes what [`service_account_kubeconfig`] created outside the namespace.
pub async fn remove_cluster_roles(scope: &Scope) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let selector = ListParams::default().labels(&format!("{}={}", super::TEST_KEY, scope.id));
    let _ = Api::<ClusterRoleBinding>::all(scope.client.clone())
        .delete_collection(&Default::default(), &selector)
        .await;
    let _ = Api::<ClusterRole>::all(scope.client.clone())
        .delete_collection(&Default::default(), &selector)
        .await;
}

/// A kube client from a kubeconfig file, with kube's own 429 retries off like nodedrain's.
pub async fn client_from(path: &std::path::Path) -> kube::Client {
    let raw = kube::config::Kubeconfig::read_from(path).expect("read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(raw, &Default::default())
        .await
        .expect("usable kubeconfig");
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// Waits until the node lifecycle controller has removed the start-up taints
/// (`node.kubernetes.io/not-ready`) from `nodes`: until then the scheduler skips them.
pub async fn wait_schedulable(scope: &Scope, nodes: &[Node]) {
    let api: Api<Node> = Api::all(scope.client.clone());
    for node in nodes {
        let name = name_of(node);
        wait_for(
            &api,
            &name,
            Duration::from_secs(30),
            |node: Option<&Node>| {
                node.and_then(|n| n.spec.as_ref())
                    .is_some_and(|s| s.taints.iter().flatten().all(|t| t.key == super::TEST_KEY))
            },
        )
        .await;
    }
}
