//! Helpers for the end-to-end controller tests: the real `nodedrain controller` binary as a child
//! process (killed on drop, its log printed when a test fails), event bodies built from the
//! fixtures, node inspection, and a recording Auto Scaling endpoint.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::aws::free_port;
use super::{BENCH_NODE_LABEL, Scope, TEST_KEY, var};

/// Prefix of every scope name the controller tests use, so stale nodes of an earlier, aborted run
/// can be recognised and removed.
pub const SCOPE_PREFIX: &str = "ctl-";

/// The label that takes a node out of external load balancers.
pub const LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// An SQS client for the sandbox's moto.
pub async fn sqs() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&super::aws::sdk_config(&var("AWS_ENDPOINT_URL")).await)
}

/// The sandbox, cleared of stale controller-test and bench nodes, and a fresh scope `ctl-<name>`.
pub async fn setup(name: &str) -> (super::Sandbox, Scope) {
    let sandbox = super::Sandbox::connect().await;
    remove_stale_nodes(&sandbox.client).await;
    let scope = sandbox.scope(&format!("{SCOPE_PREFIX}{name}")).await;
    (sandbox, scope)
}

/// Prints a test's wall time.
pub fn report(test: &str, started: std::time::Instant) {
    eprintln!("{test}: {:.1}s", started.elapsed().as_secs_f64());
}

/// Two nodes; a Deployment `app` of two replicas with a 1 s grace period on the first (the
/// victim), so that its drain has pods to move and the second node room for them.
pub async fn victim_with_pods(scope: &Scope) -> (Vec<Node>, String) {
    let nodes = scope.nodes(2).await;
    let victim = super::drain::name_of(&nodes[0]);
    super::drain::on_node(scope, &nodes, &victim, || async {
        super::drain::deployment(scope, "app", 2, 1, serde_json::json!({})).await;
        super::ready_pods(&scope.pods(), "app=app", 2, Duration::from_secs(30)).await;
    })
    .await;
    super::drain::wait_schedulable(scope, &nodes).await;
    (nodes, victim)
}

/// Prefix of the benchmarks' scope names (`benches/`).
pub const BENCH_PREFIX: &str = "bench-";

pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/events/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

pub fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

/// A spot warning for `instance` sent now (deadline now + 2 min).
pub fn spot_body(event_id: &str, instance: &str) -> String {
    let mut v = fixture("spot-interruption-warning.json");
    v["id"] = json!(event_id);
    v["time"] = json!(now_rfc3339());
    v["resources"] = json!([format!("arn:aws:ec2:us-east-1a:instance/{instance}")]);
    v["detail"]["instance-id"] = json!(instance);
    v.to_string()
}

/// An AWS Health scheduled change for `instances`, starting `ahead` from now.
pub fn health_body(event_id: &str, instances: &[String], ahead: Duration) -> String {
    let mut v = fixture("health-scheduled-change.json");
    let start = Timestamp::now() + ahead;
    v["id"] = json!(event_id);
    v["time"] = json!(now_rfc3339());
    v["resources"] = json!(instances);
    v["detail"]["startTime"] = json!(start.to_string());
    v["detail"]["endTime"] = json!((start + Duration::from_secs(7200)).to_string());
    v["detail"]["affectedEntities"] = instances
        .iter()
        .map(|i| json!({"entityValue": i}))
        .collect();
    v.to_string()
}

/// A direct Auto Scaling terminate-hook notification for `instance`.
pub fn asg_direct_body(request_id: &str, instance: &str, token: &str) -> String {
    let mut v = fixture("asg-terminate-lifecycle-direct.json");
    v["RequestId"] = json!(request_id);
    v["Time"] = json!(now_rfc3339());
    v["EC2InstanceId"] = json!(instance);
    v["LifecycleActionToken"] = json!(token);
    v.to_string()
}

/// A rebalance recommendation for `instance` sent now.
pub fn rebalance_body(event_id: &str, instance: &str) -> String {
    let mut v = fixture("rebalance-recommendation.json");
    v["id"] = json!(event_id);
    v["time"] = json!(now_rfc3339());
    v["resources"] = json!([format!("arn:aws:ec2:us-east-1b:instance/{instance}")]);
    v["detail"]["instance-id"] = json!(instance);
    v.to_string()
}

/// An EC2 state-change notification: `instance` entered `state` at `time`.
pub fn state_change_body(event_id: &str, instance: &str, state: &str, time: Timestamp) -> String {
    let mut v = fixture("state-change-stopping.json");
    v["id"] = json!(event_id);
    v["time"] = json!(time.to_string());
    v["resources"] = json!([format!(
        "arn:aws:ec2:us-east-1:123456789012:instance/{instance}"
    )]);
    v["detail"]["instance-id"] = json!(instance);
    v["detail"]["state"] = json!(state);
    v.to_string()
}

/// A capacity-reservation interruption warning for `instance`, terminating at `termination`.
pub fn capacity_reservation_body(event_id: &str, instance: &str, termination: Timestamp) -> String {
    let mut v = fixture("capacity-reservation-interruption.json");
    v["id"] = json!(event_id);
    v["time"] = json!(now_rfc3339());
    v["resources"] = json!([format!(
        "arn:aws:ec2:us-east-1:123456789012:instance/{instance}"
    )]);
    v["detail"]["instance-id"] = json!(instance);
    v["detail"]["instance-termination-time"] = json!(termination.to_string());
    v.to_string()
}

/// An Auto Scaling terminate-hook event delivered by EventBridge for `instance`.
pub fn asg_eventbridge_body(event_id: &str, instance: &str, token: &str) -> String {
    let mut v = fixture("asg-terminate-lifecycle-eventbridge.json");
    v["id"] = json!(event_id);
    v["time"] = json!(now_rfc3339());
    v["detail"]["EC2InstanceId"] = json!(instance);
    v["detail"]["LifecycleActionToken"] = json!(token);
    v.to_string()
}

/// The SNS notification fixture `name` with its `Message` (a JSON document in a string) edited
/// by `edit`.
fn sns_wrapped(name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut v = fixture(name);
    let mut inner: Value = serde_json::from_str(v["Message"].as_str().expect("SNS Message"))
        .expect("SNS Message is JSON");
    edit(&mut inner);
    v["Message"] = json!(inner.to_string());
    v["Timestamp"] = json!(now_rfc3339());
    v.to_string()
}

/// A direct Auto Scaling terminate-hook notification for `instance`, wrapped in SNS.
pub fn sns_asg_body(request_id: &str, instance: &str, token: &str) -> String {
    sns_wrapped("sns-asg-terminate-lifecycle.json", |m| {
        m["RequestId"] = json!(request_id);
        m["Time"] = json!(now_rfc3339());
        m["EC2InstanceId"] = json!(instance);
        m["LifecycleActionToken"] = json!(token);
    })
}

/// A spot warning for `instance` sent now, wrapped in SNS.
pub fn sns_spot_body(event_id: &str, instance: &str) -> String {
    sns_wrapped("sns-spot-interruption-warning.json", |m| {
        m["id"] = json!(event_id);
        m["time"] = json!(now_rfc3339());
        m["resources"] = json!([format!("arn:aws:ec2:us-east-1a:instance/{instance}")]);
        m["detail"]["instance-id"] = json!(instance);
    })
}

pub fn instance_id(node: &Node) -> String {
    let provider = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .expect("provider id");
    provider.rsplit('/').next().unwrap().to_string()
}

/// A unique event id for this run.
pub fn event_id(what: &str) -> String {
    format!(
        "{what}-{}-{}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    )
}

/// One `nodedrain controller` child process.
pub struct Controller {
    pub name: String,
    pub admin: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// Settings every test passes; `extra` adds or overrides flags.
pub struct Launch<'a> {
    pub name: &'a str,
    pub queue_url: &'a str,
    /// `None`: `--leader-elect=false`; else (lease namespace, lease name).
    pub lease: Option<(&'a str, &'a str)>,
    pub extra: &'a [&'a str],
    pub env: &'a [(&'a str, String)],
}

impl Controller {
    pub fn start(launch: Launch<'_>) -> Controller {
        let admin = free_port();
        let log = std::env::temp_dir().join(format!(
            "nodedrain-controller-test-{}-{}-{}.log",
            launch.name,
            std::process::id(),
            admin
        ));
        let file = std::fs::File::create(&log).expect("create log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_nodedrain"));
        // The test's own environment may carry sandbox settings (`eval "$(sandbox/sandbox env)"`)
        // such as the shared queue: the child gets only what is set here.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().to_string();
            if key.starts_with("NODEDRAIN_") || key.starts_with("AWS_") || key == "KUBECONFIG" {
                command.env_remove(&key);
            }
        }
        command
            .env("KUBECONFIG", var("KUBECONFIG"))
            .env("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL"))
            .env("AWS_REGION", var("AWS_REGION"))
            .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
            .env("RUST_LOG", "info,nodedrain=debug")
            .args([
                "controller",
                "--queue-url",
                launch.queue_url,
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
                "--log-format",
                "text",
                "--visibility-timeout",
                "10s",
                "--receivers",
                "2",
            ]);
        match launch.lease {
            None => {
                command.arg("--leader-elect=false");
            }
            Some((namespace, lease)) => {
                command.args([
                    "--lease-namespace",
                    namespace,
                    "--lease-name",
                    lease,
                    "--identity",
                    launch.name,
                    // Just above renew deadline + retry period, the shortest the controller
                    // accepts: a standby takes over soon after a kill.
                    "--lease-duration",
                    "5s",
                    "--lease-renew-deadline",
                    "3s",
                    "--lease-retry-period",
                    "1s",
                ]);
            }
        }
        command.args(launch.extra);
        if !launch
            .extra
            .iter()
            .any(|a| a.starts_with("--node-selector"))
        {
            command.args(["--node-selector", &format!("!{BENCH_NODE_LABEL}")]);
        }
        for (key, value) in launch.env {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start nodedrain controller");
        Controller {
            name: launch.name.to_string(),
            admin,
            child: Some(child),
            log,
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            self.assert_running();
            assert!(
                tokio::time::Instant::now() < end,
                "controller {} not ready within {timeout:?}; log:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A raw HTTP/1.0 GET on the admin port: (status, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        admin_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of one metric series (exact name with labels), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "controller {} exited with {status}; log:\n{}",
                self.name,
                self.log_tail(60)
            );
        }
    }

    /// SIGTERM, as Kubernetes stops a pod: waits up to `timeout` for the process to exit and
    /// returns how it exited.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the controller is running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the controller") {
                return status;
            }
            if tokio::time::Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "controller {} still running {timeout:?} after SIGTERM; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no lease release, no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- controller {} log (last 80 lines) ----\n{}",
                self.name,
                self.log_tail(80)
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A raw HTTP/1.0 GET on a controller's admin port: (status, body).
pub async fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether a scope id (`{name}-{pid}-{n}`, see `Sandbox::scope`) belongs to a process that has
/// ended. A live process's scope is never stale: on this shared sandbox it may be a benchmark
/// or another engineer's test running right now.
fn owner_ended(scope_id: &str) -> bool {
    let mut parts = scope_id.rsplitn(3, '-');
    let (_, pid) = (parts.next(), parts.next());
    match pid.and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Deletes nodes (and namespaces) left by an aborted earlier run of the tests or benchmarks
/// (a process that has ended): the controller resumes unfinished drains of every node it sees.
pub async fn remove_stale_nodes(client: &kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mine = format!("-{}-", std::process::id());
    let Ok(list) = nodes.list(&ListParams::default().labels(TEST_KEY)).await else {
        return;
    };
    for node in list.items {
        let owner = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TEST_KEY))
            .cloned()
            .unwrap_or_default();
        // A benchmark's nodes carry drain records too; one it could not clean up would be
        // resumed by every controller the tests start.
        let ours = owner.starts_with(SCOPE_PREFIX) || owner.starts_with(BENCH_PREFIX);
        if ours && !owner.contains(&mine) && owner_ended(&owner) {
            let name = node.metadata.name.clone().unwrap_or_default();
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let Ok(list) = namespaces
        .list(&ListParams::default().labels(TEST_KEY))
        .await
    else {
        return;
    };
    for namespace in list.items {
        let name = namespace.metadata.name.clone().unwrap_or_default();
        let ours = name.starts_with(SCOPE_PREFIX) || name.starts_with(BENCH_PREFIX);
        if ours && !name.contains(&mine) && owner_ended(&name) {
            let _ = namespaces.delete(&name, &DeleteParams::default()).await;
        }
    }
}

pub async fn get_node(scope: &Scope, name: &str) -> Node {
    Api::<Node>::all(scope.client.clone())
        .get(name)
        .await
        .expect("get node")
}

/// The drain record on a node, as JSON.
pub fn record(node: &Node) -> Option<Value> {
    let text = node
        .metadata
        .annotations
        .as_ref()?
        .get("nodedrain.io/drain")?;
    Some(serde_json::from_str(text).expect("drain record is JSON"))
}

pub fn phase(node: &Node) -> Option<String> {
    record(node)?.get("phase")?.as_str().map(str::to_string)
}

pub fn interruption_taint(node: &Node) -> Option<String> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|t| t.key == "nodedrain.io/interruption" && t.effect == "NoSchedule")
        .map(|t| t.value.clone().unwrap_or_default())
}

pub fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

pub fn has_label(node: &Node, key: &str) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(key))
}

/// Polls the node until `check` holds; panics with the node's record after `timeout`.
pub async fn wait_node(
    scope: &Scope,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Node) -> bool,
) -> Node {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let node = get_node(scope, name).await;
        if check(&node) {
            return node;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "node {name}: {what} not within {timeout:?}; record {:?}, taints {:?}, unschedulable {}",
            record(&node),
            node.spec.as_ref().and_then(|s| s.taints.clone()),
            unschedulable(&node)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pods on `node` (any namespace) that are not DaemonSet pods, including terminating ones.
pub async fn non_daemonset_pods(client: &kube::Client, node: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::all(client.clone());
    pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| {
            !p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "DaemonSet")
        })
        .collect()
}

/// Occurrences of Events with `reason` about Node `node` (a repeated Event counts its series).
pub async fn node_event_count(client: &kube::Client, node: &str, reason: &str) -> i32 {
    let api: Api<Event> = Api::all(client.clone());
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Node") && r.name.as_deref() == Some(node)
                })
        })
        .map(|e| e.series.map(|s| s.count).unwrap_or(1))
        .sum()
}

/// What the recording Auto Scaling endpoint received: the form fields of each request.
pub type Recorded = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// A local Auto Scaling Query-API endpoint answering `CompleteLifecycleAction` and
/// `RecordLifecycleActionHeartbeat` (which moto does not implement), recording every request and
/// refusing every other action with HTTP 400. Returns its URL.
pub async fn autoscaling_recorder(recorded: Recorded) -> String {
    use axum::Form;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    async fn handle(
        State(recorded): State<Recorded>,
        Form(fields): Form<Vec<(String, String)>>,
    ) -> axum::response::Response {
        let fields: HashMap<String, String> = fields.into_iter().collect();
        let action = fields.get("Action").cloned().unwrap_or_default();
        recorded.lock().unwrap().push(fields);
        match action.as_str() {
            "CompleteLifecycleAction" | "RecordLifecycleActionHeartbeat" => (
                StatusCode::OK,
                [("content-type", "text/xml")],
                format!(
                    "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
                     <{action}Result/><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata>\
                     </{action}Response>"
                ),
            )
                .into_response(),
            _ => (
                StatusCode::BAD_REQUEST,
                [("content-type", "text/xml")],
                "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code>\
                 <Message>not recorded here</Message></Error><RequestId>x</RequestId></ErrorResponse>"
                    .to_string(),
            )
                .into_response(),
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind recorder");
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::post(handle))
        .fallback(|| async { StatusCode::BAD_REQUEST })
        .with_state(recorded);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// The CompleteLifecycleAction requests the recording endpoint received.
pub fn complete_lifecycle_actions(recorded: &Recorded) -> Vec<HashMap<String, String>> {
    recorded
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.get("Action").map(String::as_str) == Some("CompleteLifecycleAction"))
        .cloned()
        .collect()
}

pub fn nodeclaim_resource() -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"),
        "nodeclaims",
    )
}

pub fn node_claims(client: &kube::Client) -> Api<kube::api::DynamicObject> {
    Api::all_with(client.clone(), &nodeclaim_resource())
}

/// Installs a minimal Karpenter NodeClaim CRD (as far as nodedrain reads it) unless one exists,
/// and waits until it is served. Never removed: other tests and runs share it.
pub async fn ensure_nodeclaim_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::PostParams;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "nodeclaims.karpenter.sh";
    if crds.get_opt(name).await.expect("get crd").is_none() {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "group": "karpenter.sh",
                "scope": "Cluster",
                "names": {"kind": "NodeClaim", "listKind": "NodeClaimList", "plural": "nodeclaims", "singular": "nodeclaim"},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            }
        }))
        .unwrap();
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create NodeClaim CRD: {e}"),
        }
    }
    let established = |crd: Option<&CustomResourceDefinition>| {
        crd.and_then(|c| c.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(crds, name, established),
    )
    .await
    .expect("the NodeClaim CRD is established in time")
    .expect("watch crd");
    // Established can precede the first successful list by a moment.
    let claims = node_claims(client);
    for _ in 0..50 {
        if claims.list(&ListParams::default().limit(1)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("NodeClaims are not served");
}

/// A NodeClaim `name` for `node`, with the status Karpenter gives it (set through the status
/// subresource, which is what the apiserver keeps).
pub async fn create_node_claim(client: &kube::Client, name: &str, node: &Node) {
    use kube::api::{DynamicObject, Patch, PatchParams, PostParams};

    let claims = node_claims(client);
    let mut object = DynamicObject::new(name, &nodeclaim_resource());
    object.data = json!({"spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}}});
    claims
        .create(&PostParams::default(), &object)
        .await
        .expect("create NodeClaim");
    let status = json!({"status": {
        "nodeName": node.metadata.name,
        "providerID": node.spec.as_ref().and_then(|s| s.provider_id.clone()),
    }});
    claims
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("NodeClaim status");
}
