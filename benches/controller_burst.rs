//! `nodedrain controller` under a burst of spot warnings, and at rest in a large cluster, on the
//! sandbox.
//!
//! ```sh
//! cargo bench --bench controller_burst
//! BENCH_SCENARIOS=burst BENCH_BURST_NODES=20 cargo bench --bench controller_burst
//! ```
//!
//! Scenarios (`BENCH_SCENARIOS` [burst,idle]; sizes from the environment, defaults in brackets):
//! - **burst**: `BENCH_BURST_NODES` [200] spot nodes (moto instances, KWOK nodes) with
//!   `BENCH_BURST_PODS_PER_NODE` [30] pods each: as many ReplicaSets as pods per node, one
//!   replica on every node, each under a PDB `maxUnavailable: BENCH_BURST_MAX_UNAVAILABLE`
//!   ["20%"], grace `BENCH_BURST_GRACE` [2] s. Empty spare nodes take the replacements. One
//!   controller with default settings (plus `BENCH_CONTROLLER_ARGS`, space-separated) watches
//!   the bench's nodes; then one spot warning per node is sent, all at once (SendMessageBatch,
//!   10 per call, all calls concurrently).
//! - **idle**: `BENCH_IDLE_NODES` [5000] nodes and `BENCH_IDLE_PODS` [50000] pods (bound to the
//!   nodes, so the scheduler is not the bottleneck) are created; a controller watching every
//!   node of the cluster is started.
//!
//! Measured:
//! - event-to-cordon: from the moment the send call for a warning starts until a node watch
//!   sees the node `unschedulable` (p50, p99, max over all nodes);
//!   The warnings go out once the sandbox's processes use less than `BENCH_QUIET_CORES` [0.5]
//!   cores (at most 5 minutes of waiting): creating the fixtures keeps the controllers busy for
//!   minutes, and a burst sent into that measures the leftovers.
//! - time until every bench node is empty (no pod left on it), from the first send;
//! - PDB violations: times a watcher saw a ReplicaSet's Ready (not terminating) pods drop below
//!   its floor (replicas - maxUnavailable), and the lowest Ready - floor seen; deadline overrides
//!   as the controller counted them;
//! - `BENCH_CONTROLLER_WRAPPER` (space-separated) runs the controller under a tool, e.g. a heap
//!   profiler: `BENCH_CGROUP=off BENCH_CONTROLLER_WRAPPER="heaptrack -o /tmp/burst"`;
//! - for the burst, the controller runs in a cgroup with the chart's `resources.limits` (read
//!   from charts/nodedrain/values.yaml; `BENCH_CGROUP=off` runs it without): OOM kills and
//!   limit hits (`memory.oom_control`, `memory.failcnt`) and CPU throttling (`cpu.stat`);
//! - the controller's resident memory: peak (`VmHWM`) over the run, and for idle also the
//!   resident set (`VmRSS`) after `BENCH_IDLE_SETTLE` [30] s at rest; start-to-ready is process
//!   start until `/readyz` answers 200 (the node list is loaded and the queue is being read).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use support::bench::{
    cpu_seconds, env_list, env_or, mib, proc_status_kib, quantile, tail, wait_all_ready, wait_pdbs,
    wait_quiet, watch_pods, when_empty,
};
use support::cgroup::{Cgroup, CgroupStats, ChartLimits};
use support::controller::{admin_get, instance_id, spot_body};
use support::drain::{name_of, pdb, wait_schedulable};
use support::{Sandbox, Scope, TEST_KEY};

/// Sandbox processes whose CPU use is reported (command names, as in /proc/PID/comm).
const SANDBOX_PROCESSES: &[&str] = &[
    "kube-apiserver",
    "etcd",
    "kube-scheduler",
    "kube-controller",
    "kwok-controller",
    "moto_server",
    // This harness itself (its command name, cut to 15 characters): its pod watch shares the CPUs.
    "controller_burs",
];

/// Replacement pods each spare node takes.
const SPARE_NODE_PODS: usize = 500;
/// Requests in flight while creating fixtures.
const CREATE_CONCURRENCY: usize = 64;

/// One `nodedrain controller` process with its admin port and log.
struct Launched {
    child: Child,
    admin: u16,
    log: PathBuf,
    started: Instant,
}

impl Launched {
    /// `cgroup`: run it under the chart's limits there.
    fn start(queue_url: &str, node_selector: Option<&str>, cgroup: Option<&Cgroup>) -> Launched {
        let admin = support::aws::free_port();
        let log = std::env::temp_dir().join(format!("nodedrain-bench-controller-{admin}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let program = env!("CARGO_BIN_EXE_nodedrain");
        // BENCH_CONTROLLER_WRAPPER runs it under a profiler (e.g. "heaptrack -o /tmp/burst").
        let wrapper: Vec<String> = std::env::var("BENCH_CONTROLLER_WRAPPER")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut command = match (cgroup, wrapper.split_first()) {
            (Some(cgroup), None) => cgroup.command(program),
            (Some(cgroup), Some((tool, args))) => {
                let mut command = cgroup.command(tool);
                command.args(args).arg(program);
                command
            }
            (None, Some((tool, args))) => {
                let mut command = Command::new(tool);
                command.args(args).arg(program);
                command
            }
            (None, None) => Command::new(program),
        };
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().to_string();
            if key.starts_with("NODEDRAIN_") {
                command.env_remove(&key);
            }
        }
        command
            .env("KUBECONFIG", support::var("KUBECONFIG"))
            .env("AWS_ENDPOINT_URL", support::var("AWS_ENDPOINT_URL"))
            .env("AWS_REGION", support::var("AWS_REGION"))
            .env("AWS_ACCESS_KEY_ID", support::var("AWS_ACCESS_KEY_ID"))
            .env(
                "AWS_SECRET_ACCESS_KEY",
                support::var("AWS_SECRET_ACCESS_KEY"),
            )
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args([
                "controller",
                "--queue-url",
                queue_url,
                "--leader-elect=false",
            ])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--log-format", "json"]);
        if let Some(selector) = node_selector {
            command.args(["--node-selector", selector]);
        }
        if let Ok(extra) = std::env::var("BENCH_CONTROLLER_ARGS") {
            command.args(extra.split_whitespace());
        }
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start nodedrain controller");
        Launched {
            child,
            admin,
            log,
            started,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time from process start until `/readyz` answers 200.
    async fn wait_ready(&mut self, timeout: Duration) -> Duration {
        loop {
            if let Some((200, _)) = admin_get(self.admin, "/readyz").await {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("controller exited with {status}:\n{}", self.log_tail(30));
            }
            assert!(
                self.started.elapsed() < timeout,
                "controller not ready within {timeout:?}:\n{}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of a metric's series whose line starts with `prefix`.
    async fn metric_sum(&self, prefix: &str) -> f64 {
        let body = admin_get(self.admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A histogram's buckets (upper bound, cumulative count), `+Inf` as infinity.
    async fn histogram(&self, name: &str) -> Vec<(f64, f64)> {
        let body = admin_get(self.admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        let prefix = format!("{name}_bucket{{le=\"");
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (bound, rest) = rest.split_once('"')?;
                let count = rest.rsplit(' ').next()?.parse().ok()?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, count))
            })
            .collect()
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var("BENCH_KEEP_LOGS").is_err() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("controller log kept: {}", self.log.display());
        }
    }
}

/// Creates objects with bounded concurrency; panics on the first failure.
async fn create_all<K>(api: &Api<K>, objects: Vec<Value>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|object| async move {
            let object: K = serde_json::from_value(object).expect("valid object");
            api.create(&PostParams::default(), &object).await
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("create fixture objects");
}

/// A KWOK node of this scope, tainted like the scope's other nodes.
fn kwok_node(scope: &Scope, name: &str, pods: usize, provider_id: Option<String>) -> Value {
    let mut node = json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "m5.4xlarge",
                "topology.kubernetes.io/region": "us-east-1",
                "topology.kubernetes.io/zone": "us-east-1a",
                "karpenter.sh/capacity-type": "spot",
                "type": "kwok",
                TEST_KEY: scope.id,
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {
            "taints": [{"key": TEST_KEY, "value": scope.id, "effect": "NoSchedule"}],
        },
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": pods.to_string()},
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": pods.to_string()},
        },
    });
    if let Some(id) = provider_id {
        node["spec"]["providerID"] = json!(id);
    }
    node
}

/// A pod bound to `node` (no scheduling), labelled `app`.
fn bound_pod(scope: &Scope, name: &str, app: &str, node: &str, grace: i64) -> Value {
    let mut spec = scope.pod_spec(grace);
    spec["nodeName"] = json!(node);
    json!({
        "metadata": {"name": name, "labels": {"app": app, "tier": "web"}},
        "spec": spec,
    })
}

// ---------------------------------------------------------------------------------------------
// burst

struct Burst {
    nodes: usize,
    pods: usize,
    cordon_p50: Option<Duration>,
    cordon_p99: Option<Duration>,
    cordon_max: Option<Duration>,
    cordoned: usize,
    drained_after: Option<Duration>,
    violations: usize,
    min_margin: Option<i64>,
    overrides: f64,
    evicted: f64,
    peak_rss_kib: Option<u64>,
    /// The chart's limits the controller ran under, and what the kernel counted.
    cgroup: Option<(ChartLimits, CgroupStats)>,
    controller_p_sum: f64,
    sent_after: Duration,
    /// CPU cores the sandbox used in the second before the burst.
    load_before: f64,
    /// CPU seconds used during the burst, per process (`self` is the controller).
    cpu: Vec<(String, f64)>,
    blocked: f64,
    /// The controller's own receive-to-cordon histogram: (upper bound, cumulative count).
    own: Vec<(f64, f64)>,
}

/// Records, per node of the scope, when a watch first saw it unschedulable.
fn watch_cordons(
    scope: &Scope,
) -> (
    Arc<Mutex<HashMap<String, Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let api: Api<Node> = Api::all(scope.client.clone());
    let config = watcher::Config::default().labels(&format!("{TEST_KEY}={}", scope.id));
    let shared = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        // The watcher resumes by itself after an error; only the end of the stream ends this.
        while let Some(next) = stream.next().await {
            let at = Instant::now();
            match next {
                Ok(node) if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) => {
                    shared.lock().unwrap().entry(name_of(&node)).or_insert(at);
                }
                Ok(_) => {}
                Err(error) => eprintln!("node watch: {error}; resuming"),
            }
        }
    });
    (seen, task)
}

async fn burst(sandbox: &Sandbox) -> Burst {
    let count: usize = env_or("BENCH_BURST_NODES", 200);
    let per_node: usize = env_or("BENCH_BURST_PODS_PER_NODE", 30);
    let grace: i64 = env_or("BENCH_BURST_GRACE", 2);
    let max_unavailable: String = env_or("BENCH_BURST_MAX_UNAVAILABLE", "20%".to_string());
    let scope = sandbox.scope("bench-burst").await;
    let phase = Instant::now();

    eprintln!("burst: {count} spot nodes (moto instances + KWOK nodes)");
    let nodes = scope.nodes(count).await;
    wait_schedulable(&scope, &nodes).await;
    let spare_count = (count * per_node * 6 / 5).div_ceil(SPARE_NODE_PODS).max(1);
    let node_api: Api<Node> = Api::all(scope.client.clone());
    let spares: Vec<Value> = (0..spare_count)
        .map(|i| {
            kwok_node(
                &scope,
                &format!("{}-spare-{i}", scope.id),
                SPARE_NODE_PODS,
                None,
            )
        })
        .collect();
    create_all(&node_api, spares).await;

    eprintln!("burst: {} pods in {per_node} ReplicaSets", count * per_node);
    let mut pods = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for app in 0..per_node {
            let app = format!("app{app:02}");
            pods.push(bound_pod(
                &scope,
                &format!("{app}-n{i}"),
                &app,
                &name_of(node),
                grace,
            ));
        }
    }
    create_all(&scope.pods(), pods).await;
    // The ReplicaSets come after their pods and adopt them: none is created or scheduled.
    let budget = match max_unavailable.strip_suffix('%') {
        Some(p) => json!({"maxUnavailable": format!("{p}%")}),
        None => json!({"maxUnavailable": max_unavailable.parse::<i32>().unwrap_or(1)}),
    };
    // The disruption controller rounds a percentage up.
    let unavailable: i64 = match max_unavailable.strip_suffix('%') {
        Some(p) => (p.parse::<i64>().unwrap_or(0) * count as i64 + 99) / 100,
        None => max_unavailable.parse().unwrap_or(1),
    };
    let mut floors = BTreeMap::new();
    let mut sets = Vec::new();
    for app in 0..per_node {
        let app = format!("app{app:02}");
        let mut template_spec = scope.pod_spec(grace);
        template_spec["containers"][0]["name"] = json!(app);
        sets.push(json!({
            "metadata": {"name": app},
            "spec": {
                "replicas": count,
                "selector": {"matchLabels": {"app": app}},
                "template": {"metadata": {"labels": {"app": app, "tier": "web"}}, "spec": template_spec},
            },
        }));
        pdb(&scope, &app, &app, budget.clone()).await;
        floors.insert(app, count as i64 - unavailable);
    }
    create_all(&scope.api::<ReplicaSet>(), sets).await;
    wait_all_ready(&scope, count * per_node).await;
    wait_adopted(&scope, count * per_node).await;
    wait_pdbs(&scope, per_node).await;
    eprintln!("burst: fixtures ready in {:.0?}", phase.elapsed());

    let sqs = aws_sdk_sqs::Client::new(&scope.aws);
    let queue = support::aws::create_queue(&sqs, "bench-burst", &[]).await;
    let selector = format!("{TEST_KEY}={}", scope.id);
    // As installed: the chart's resources.limits, unless BENCH_CGROUP=off.
    let cgroup = (std::env::var("BENCH_CGROUP").as_deref() != Ok("off")).then(|| {
        let limits = ChartLimits::from_values().expect("the chart's resources.limits");
        Cgroup::create(&format!("nodedrain-bench-{}", std::process::id()), limits)
            .expect("a cgroup with the chart's limits")
    });
    let mut controller = Launched::start(&queue, Some(&selector), cgroup.as_ref());
    controller.wait_ready(Duration::from_secs(60)).await;
    let pid = controller.pid();

    let drained: BTreeSet<String> = nodes.iter().map(name_of).collect();
    let (cordons, cordon_task) = watch_cordons(&scope);
    let (seen, mut empty, pod_task) = watch_pods(&scope, drained.clone(), floors);
    // Both watches have listed and the controller has settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet_cores: f64 = env_or("BENCH_QUIET_CORES", 0.5);
    let (waited, load) = wait_quiet(SANDBOX_PROCESSES, quiet_cores, Duration::from_secs(300)).await;
    eprintln!(
        "burst: sandbox at {load:.2} cores after waiting {:.0?} for it to settle",
        waited
    );

    let cpu_before = cpu_seconds(SANDBOX_PROCESSES, Some(pid));
    eprintln!("burst: sending {count} spot warnings at once");
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let first_send = Instant::now();
    let batches: Vec<Vec<(String, String)>> = nodes
        .chunks(10)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let body = spot_body(
                        &format!("bench-{}-{b}-{i}", std::process::id()),
                        &instance_id(node),
                    );
                    (name_of(node), body)
                })
                .collect()
        })
        .collect();
    let sends = batches.into_iter().map(|batch| {
        let sqs = sqs.clone();
        let queue = queue.clone();
        async move {
            let at = Instant::now();
            let mut request = sqs.send_message_batch().queue_url(&queue);
            for (i, (_, body)) in batch.iter().enumerate() {
                request = request.entries(
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body)
                        .build()
                        .expect("entry"),
                );
            }
            let out = request.send().await.expect("send message batch");
            assert!(out.failed.is_empty(), "rejected entries: {:?}", out.failed);
            batch.into_iter().map(move |(node, _)| (node, at))
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent_at.extend(sent);
    }
    // moto takes its time to accept a burst; real SQS answers in milliseconds. Reported apart.
    let sent_after = first_send.elapsed();

    let all_cordoned = tokio::time::timeout(Duration::from_secs(120), async {
        while cordons.lock().unwrap().len() < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    if !all_cordoned {
        eprintln!("burst: not every node was cordoned within 2 minutes");
    }
    let latencies: Vec<Duration> = {
        let cordons = cordons.lock().unwrap();
        sent_at
            .iter()
            .filter_map(|(node, at)| Some(cordons.get(node)?.saturating_duration_since(*at)))
            .collect()
    };
    let drained_at = when_empty(&mut empty, Duration::from_secs(600)).await;
    let peak_rss_kib = proc_status_kib(pid, "VmHWM");
    let cgroup_stats = cgroup.as_ref().map(|c| (c.limits, c.stats()));
    let cpu: Vec<(String, f64)> = cpu_seconds(SANDBOX_PROCESSES, Some(pid))
        .into_iter()
        .map(|(name, after)| {
            let before = cpu_before.get(&name).copied().unwrap_or(0.0);
            (name, after - before)
        })
        .collect();
    let blocked = controller
        .metric_sum("nodedrain_eviction_pdb_blocked_total")
        .await;
    let overrides = controller
        .metric_sum("nodedrain_deadline_overrides_total")
        .await;
    let evicted = controller
        .metric_sum("nodedrain_evictions_total{outcome=\"evicted\"}")
        .await;
    let controller_p_sum = controller
        .metric_sum("nodedrain_event_to_cordon_seconds_sum")
        .await;
    let own = controller
        .histogram("nodedrain_receive_to_cordon_seconds")
        .await;
    cordon_task.abort();
    pod_task.abort();
    let (violations, min_margin) = {
        let seen = seen.lock().unwrap();
        (seen.violations, seen.min_margin)
    };
    if drained_at.is_none() {
        eprintln!(
            "burst: nodes not empty after 10 minutes; controller log:\n{}",
            controller.log_tail(20)
        );
    }
    drop(controller);
    drop(cgroup);
    let _ = sqs.delete_queue().queue_url(&queue).send().await;
    remove_scope(scope).await;

    Burst {
        cgroup: cgroup_stats,
        nodes: count,
        pods: count * per_node,
        cordon_p50: quantile(&latencies, 0.50),
        cordon_p99: quantile(&latencies, 0.99),
        cordon_max: quantile(&latencies, 1.0),
        cordoned: latencies.len(),
        drained_after: drained_at.map(|at| at.saturating_duration_since(first_send)),
        violations,
        min_margin,
        overrides,
        evicted,
        peak_rss_kib,
        controller_p_sum,
        sent_after,
        load_before: load,
        own,
        cpu,
        blocked,
    }
}

/// Waits until the ReplicaSets own all `count` pods, so the drain sees workload pods, not bare
/// ones.
async fn wait_adopted(scope: &Scope, count: usize) {
    let start = Instant::now();
    loop {
        let list = scope
            .pods()
            .list(&ListParams::default())
            .await
            .expect("list pods");
        let owned = list
            .items
            .iter()
            .filter(|p| {
                p.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| !o.is_empty())
            })
            .count();
        if owned >= count {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "only {owned} of {count} pods adopted by their ReplicaSets"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes the scope's pods at once (grace 0), then its nodes and namespace.
async fn remove_scope(scope: Scope) {
    // At 50,000 pods one collection delete runs out of time part-way. Pods left behind when
    // their nodes go are deleted by the namespace controller one grace period at a time, which
    // kept the sandbox busy for half an hour after an idle run.
    let pods = scope.pods();
    let everything = ListParams::default().limit(1);
    for _ in 0..30 {
        let _ = pods
            .delete_collection(
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
                &ListParams::default(),
            )
            .await;
        match pods.list_metadata(&everything).await {
            Ok(list) if list.items.is_empty() => break,
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
    let nodes: Api<Node> = Api::all(scope.client.clone());
    let mine = ListParams::default().labels(&format!("{TEST_KEY}={}", scope.id));
    // Under load a collection delete can time out part-way; nodes left with drain records would
    // be resumed by the next controller anyone starts on this sandbox.
    for _ in 0..30 {
        let _ = nodes
            .delete_collection(&DeleteParams::default(), &mine)
            .await;
        match nodes.list_metadata(&mine).await {
            Ok(list) if list.items.is_empty() => break,
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
    scope.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// idle

struct Idle {
    nodes: usize,
    pods: usize,
    cluster_nodes: usize,
    start_to_ready: Duration,
    rss_kib: Option<u64>,
    /// The resident set at rest split into heap and stacks (anonymous) and the binary's own
    /// pages (file-backed).
    rss_anon_kib: Option<u64>,
    rss_file_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
}

async fn idle(sandbox: &Sandbox) -> Idle {
    let count: usize = env_or("BENCH_IDLE_NODES", 5000);
    let pod_count: usize = env_or("BENCH_IDLE_PODS", 50_000);
    let settle = Duration::from_secs(env_or("BENCH_IDLE_SETTLE", 30));
    let scope = sandbox.scope("bench-idle").await;
    let phase = Instant::now();

    eprintln!("idle: {count} nodes");
    let node_api: Api<Node> = Api::all(scope.client.clone());
    let names: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "ip-10-{}-{}-{}.ec2.internal",
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect();
    let objects: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            kwok_node(
                &scope,
                name,
                110,
                Some(format!("aws:///us-east-1a/i-{:017x}", 0xbe0000 + i)),
            )
        })
        .collect();
    create_all(&node_api, objects).await;

    eprintln!(
        "idle: {pod_count} pods (created in {:.0?} so far)",
        phase.elapsed()
    );
    let pods: Vec<Value> = (0..pod_count)
        .map(|i| {
            let app = format!("svc{:03}", i % 500);
            bound_pod(&scope, &format!("{app}-{i}"), &app, &names[i % count], 30)
        })
        .collect();
    create_all(&scope.pods(), pods).await;
    eprintln!("idle: fixtures created in {:.0?}", phase.elapsed());
    let cluster_nodes = node_api
        .list_metadata(&ListParams::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0);

    let sqs = aws_sdk_sqs::Client::new(&scope.aws);
    let queue = support::aws::create_queue(&sqs, "bench-idle", &[]).await;
    let mut controller = Launched::start(&queue, None, None);
    let start_to_ready = controller.wait_ready(Duration::from_secs(300)).await;
    tokio::time::sleep(settle).await;
    let pid = controller.pid();
    let rss_kib = proc_status_kib(pid, "VmRSS");
    let rss_anon_kib = proc_status_kib(pid, "RssAnon");
    let rss_file_kib = proc_status_kib(pid, "RssFile");
    let peak_rss_kib = proc_status_kib(pid, "VmHWM");
    drop(controller);
    let _ = sqs.delete_queue().queue_url(&queue).send().await;
    eprintln!("idle: cleaning up");
    remove_scope(scope).await;
    Idle {
        nodes: count,
        pods: pod_count,
        cluster_nodes,
        start_to_ready,
        rss_kib,
        rss_anon_kib,
        rss_file_kib,
        peak_rss_kib,
    }
}

// ---------------------------------------------------------------------------------------------

/// The smallest bucket bound that holds the `q` quantile of a cumulative histogram.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    (total > 0.0)
        .then(|| {
            buckets
                .iter()
                .find(|(_, c)| *c >= q * total)
                .map(|(b, _)| *b)
        })
        .flatten()
}

fn at_most(bound: Option<f64>) -> String {
    bound.map_or("—".to_string(), |b| format!("≤ {b} s"))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("—".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn mem(kib: Option<u64>) -> String {
    kib.map_or("—".to_string(), |k| format!("{:.1} MiB", mib(k)))
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let sandbox = Sandbox::connect().await;
        let scenarios = env_list("BENCH_SCENARIOS", "burst,idle");
        let burst = if scenarios.iter().any(|s| s == "burst") {
            Some(burst(&sandbox).await)
        } else {
            None
        };
        let idle = if scenarios.iter().any(|s| s == "idle") {
            Some(idle(&sandbox).await)
        } else {
            None
        };

        if let Some(b) = burst {
            println!();
            println!(
                "burst: {} spot warnings at once, {} nodes × {} pods ({} pods), PDB per ReplicaSet",
                b.nodes,
                b.nodes,
                b.pods / b.nodes.max(1),
                b.pods
            );
            println!();
            println!("| measure | value | goal |");
            println!("|---|---|---|");
            println!(
                "| event-to-cordon p50 (send → unschedulable, seen by a watch) | {} | |",
                secs(b.cordon_p50)
            );
            println!("| event-to-cordon p99 | {} | ≤ 1 s |", secs(b.cordon_p99));
            println!("| event-to-cordon max | {} | |", secs(b.cordon_max));
            println!(
                "| all send calls answered (by moto) | {} | |",
                secs(Some(b.sent_after))
            );
            println!(
                "| sandbox CPU in the second before the burst | {:.2} cores | |",
                b.load_before
            );
            println!("| nodes cordoned | {} of {} | all |", b.cordoned, b.nodes);
            println!(
                "| all nodes empty, from the first send | {} | |",
                secs(b.drained_after)
            );
            println!(
                "| PDB violations (lowest Ready − floor) | {} ({}) | 0 |",
                b.violations,
                b.min_margin.map_or("—".to_string(), |m| m.to_string())
            );
            println!(
                "| evictions / deadline overrides / evictions refused by a PDB (429) | {} / {} / {} | |",
                b.evicted, b.overrides, b.blocked
            );
            println!(
                "| controller's own event-to-cordon mean (event time → patched) | {} | |",
                secs(
                    (b.cordoned > 0)
                        .then(|| Duration::from_secs_f64(b.controller_p_sum / b.nodes as f64))
                )
            );
            println!(
                "| controller's own part (receive → cordon) p50 / p99, its histogram | {} / {} | |",
                at_most(bucket_quantile(&b.own, 0.5)),
                at_most(bucket_quantile(&b.own, 0.99))
            );
            println!("| controller peak RSS | {} | ≤ 128 MiB |", mem(b.peak_rss_kib));
            match &b.cgroup {
                Some((limits, stats)) => {
                    println!(
                        "| chart limits it ran under (values.yaml) | {} MiB, {} CPU | |",
                        limits.memory_bytes >> 20,
                        limits.cpu_cores
                    );
                    println!(
                        "| OOM kills / memory limit hits (failcnt) | {} / {} | 0 |",
                        stats.oom_kills, stats.failcnt
                    );
                    println!(
                        "| cgroup peak memory (RSS and page cache) | {:.1} MiB | |",
                        stats.max_usage_bytes as f64 / 1048576.0
                    );
                    println!(
                        "| CPU throttled: periods / seconds | {} of {} / {:.1} s | |",
                        stats.throttled_periods, stats.periods, stats.throttled_seconds
                    );
                }
                None => println!("| chart limits | not applied (BENCH_CGROUP=off) | |"),
            }
            let cpu: Vec<String> = b
                .cpu
                .iter()
                .map(|(name, s)| {
                    let name = match name.as_str() {
                        "self" => "nodedrain",
                        "controller_burs" => "harness",
                        name => name,
                    };
                    format!("{name} {s:.0}")
                })
                .collect();
            println!("| CPU seconds used during the burst | {} | |", cpu.join(", "));
        }
        if let Some(i) = idle {
            println!();
            println!(
                "idle: {} nodes created ({} in the cluster), {} pods",
                i.nodes, i.cluster_nodes, i.pods
            );
            println!();
            println!("| measure | value | goal |");
            println!("|---|---|---|");
            println!(
                "| start to ready (/readyz 200) | {} | |",
                secs(Some(i.start_to_ready))
            );
            println!("| RSS at rest | {} | ≤ 64 MiB |", mem(i.rss_kib));
            println!(
                "| of which anonymous (heap, stacks) / file-backed (the binary) | {} / {} | |",
                mem(i.rss_anon_kib),
                mem(i.rss_file_kib)
            );
            println!(
                "| peak RSS (start-up included) | {} | |",
                mem(i.peak_rss_kib)
            );
        }
    });
}
