//! Shared by the benchmarks (`benches/`): settings from the environment, a pod watcher that
//! counts PDB floor violations and sees nodes empty, fixtures and waits for them, the
//! `nodedrain controller` process, spot warnings sent at once, and process memory and CPU.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::wait::Condition as _;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::cgroup::Cgroup;
use super::controller::{admin_get, instance_id, spot_body};
use super::drain::{name_of, node_of, pdb};
use super::{BENCH_NODE_LABEL, Scope, TEST_KEY, is_pod_ready};

pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn env_list(key: &str, default: &str) -> Vec<String> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// What the watcher saw during one run.
#[derive(Default)]
pub struct Seen {
    /// Pods (uid → (node, deployment, ready and not terminating)).
    pub pods: BTreeMap<String, (String, String, bool)>,
    pub violations: usize,
    pub min_margin: Option<i64>,
    pub below: BTreeSet<String>,
    /// Ready pods per app, kept in step with `pods`.
    ready: BTreeMap<String, i64>,
    /// Pods on the drained nodes, kept in step with `pods`.
    on_drained: usize,
}

impl Seen {
    /// Adds (`sign` 1) or takes away (-1) one pod's share of the running counts.
    fn count(&mut self, pod: &(String, String, bool), drained: &BTreeSet<String>, sign: i64) {
        let (node, app, ready) = pod;
        if *ready {
            *self.ready.entry(app.clone()).or_default() += sign;
        }
        if drained.contains(node) {
            self.on_drained = self.on_drained.saturating_add_signed(sign as isize);
        }
    }
}

/// Watches the namespace: reports through `empty` when no pod is left on `drained`, and counts
/// PDB floor violations per Deployment (`floors`: app → minimum Ready).
///
/// Counts are kept by difference, not recounted per event: at 6,000 pods a recount on every
/// event took a whole core away from the sandbox being measured.
pub fn watch_pods(
    scope: &Scope,
    drained: BTreeSet<String>,
    floors: BTreeMap<String, i64>,
) -> (
    Arc<Mutex<Seen>>,
    watch::Receiver<Option<Instant>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (empty_tx, empty_rx) = watch::channel(None);
    let api: Api<Pod> = scope.pods();
    let shared = seen.clone();
    let handle = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut initialised = false;
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            let mut seen = shared.lock().unwrap();
            match event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let app = p
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app").cloned())
                        .unwrap_or_default();
                    let ready = p.metadata.deletion_timestamp.is_none()
                        && is_pod_ready().matches_object(Some(&p));
                    let entry = (node_of(&p).unwrap_or_default(), app, ready);
                    seen.count(&entry, &drained, 1);
                    let uid = p.metadata.uid.clone().unwrap_or_default();
                    if let Some(old) = seen.pods.insert(uid, entry) {
                        seen.count(&old, &drained, -1);
                    }
                }
                watcher::Event::Delete(p) => {
                    let uid = p.metadata.uid.as_deref().unwrap_or_default();
                    if let Some(old) = seen.pods.remove(uid) {
                        seen.count(&old, &drained, -1);
                    }
                }
                watcher::Event::InitDone => initialised = true,
                // A relist starts from nothing; the InitApply events that follow refill it, and
                // nothing is judged until it is complete.
                watcher::Event::Init => {
                    initialised = false;
                    seen.pods.clear();
                    seen.ready.clear();
                    seen.on_drained = 0;
                }
            }
            if !initialised {
                continue;
            }
            let mut below = BTreeSet::new();
            let mut min_margin: Option<i64> = seen.min_margin;
            for (app, floor) in &floors {
                let margin = seen.ready.get(app).copied().unwrap_or(0) - floor;
                min_margin = Some(min_margin.map_or(margin, |m| m.min(margin)));
                if margin < 0 {
                    below.insert(app.clone());
                }
            }
            let new = below.difference(&seen.below).count();
            seen.violations += new;
            seen.below = below;
            seen.min_margin = min_margin;
            if seen.on_drained == 0 && empty_tx.borrow().is_none() {
                let _ = empty_tx.send(Some(Instant::now()));
            }
        }
    });
    (seen, empty_rx, handle)
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub async fn wait_all_ready(scope: &Scope, count: usize) {
    wait_pods(scope, count, "Ready", Duration::from_secs(300), |p| {
        is_pod_ready().matches_object(Some(p))
    })
    .await;
}

/// Polls the scope's pods until at least `count` of them satisfy `matches` (`what` names the
/// condition in the panic after `timeout`); returns the time it took.
pub async fn wait_pods(
    scope: &Scope,
    count: usize,
    what: &str,
    timeout: Duration,
    matches: impl Fn(&Pod) -> bool,
) -> Duration {
    let pods = scope.pods();
    let start = Instant::now();
    loop {
        let list = pods.list(&ListParams::default()).await.expect("list pods");
        let matching = list.items.iter().filter(|p| matches(p)).count();
        if matching >= count {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "only {matching} of {count} pods {what} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every PDB of the scope has a computed status for the current spec.
pub async fn wait_pdbs(scope: &Scope, count: usize) {
    let api = scope.api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>();
    let start = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await.expect("list pdbs");
        let done = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.observed_generation >= p.metadata.generation
                        && s.current_healthy == s.expected_pods
                        && s.disruptions_allowed.unwrap_or(0) > 0
                })
            })
            .count();
        if done >= count {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "PDBs not computed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `q` quantile (0..=1) of `values` by the nearest-rank method; `None` when empty.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM` — the peak resident set).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU seconds (user + system) each process whose command name starts with one of `names` has
/// used so far, summed per name; `pid` adds one more process under the name `"self"`.
pub fn cpu_seconds(names: &[&str], pid: Option<u32>) -> BTreeMap<String, f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces; fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let used = fields
            .get(11)
            .zip(fields.get(12))
            .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
            .unwrap_or(0.0)
            / ticks;
        let name = if Some(p) == pid {
            Some("self".to_string())
        } else {
            names
                .iter()
                .find(|n| comm.starts_with(*n))
                .map(|n| n.to_string())
        };
        if let Some(name) = name {
            *out.entry(name).or_default() += used;
        }
    }
    out
}

/// Panics unless every part of the sandbox still runs (`sandbox/sandbox status`): a run during
/// which the scheduler exited (it does when it loses its lease under load) measured a cluster
/// that could place no replacement, and its numbers must not be reported.
pub fn assert_sandbox_intact(what: &str) {
    let output = std::process::Command::new(super::repo_root().join("sandbox/sandbox"))
        .arg("status")
        .output()
        .expect("run sandbox/sandbox status");
    assert!(
        output.status.success(),
        "{what}: the sandbox lost a part during the run, so its numbers are not reported:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// When [`watch_pods`] saw the drained nodes empty, waiting up to `timeout`; `None` if not by then.
pub async fn when_empty(
    empty: &mut watch::Receiver<Option<Instant>>,
    timeout: Duration,
) -> Option<Instant> {
    tokio::time::timeout(timeout, async {
        loop {
            if let Some(at) = *empty.borrow() {
                return at;
            }
            if empty.changed().await.is_err() {
                return Instant::now();
            }
        }
    })
    .await
    .ok()
}

/// Waits until `processes` together use less than `cores` of CPU over one second, or `max` has
/// passed; returns how long it waited and the last second's use. Creating thousands of fixture
/// objects leaves the controllers busy for a while; a burst sent into that measures the
/// leftovers, not the burst.
pub async fn wait_quiet(processes: &[&str], cores: f64, max: Duration) -> (Duration, f64) {
    let start = Instant::now();
    loop {
        let before: f64 = cpu_seconds(processes, None).values().sum();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used: f64 = cpu_seconds(processes, None).values().sum::<f64>() - before;
        if used < cores || start.elapsed() >= max {
            return (start.elapsed(), used);
        }
    }
}

/// Sandbox processes whose CPU use is reported (command names, as in /proc/PID/comm).
pub const SANDBOX_PROCESSES: &[&str] = &[
    "kube-apiserver",
    "etcd",
    "kube-scheduler",
    "kube-controller",
    "kwok-controller",
    "moto_server",
];

/// [`SANDBOX_PROCESSES`] and the harness itself (`harness`: its command name, cut to 15
/// characters): a harness's watches share the CPUs with what it measures.
pub fn measured_processes(harness: &'static str) -> Vec<&'static str> {
    let mut all = SANDBOX_PROCESSES.to_vec();
    all.push(harness);
    all
}

/// Replacement pods each spare node takes.
pub const SPARE_NODE_PODS: usize = 500;
/// Requests in flight while creating fixtures.
const CREATE_CONCURRENCY: usize = 64;

/// One `nodedrain controller` process with its admin port and log.
pub struct Launched {
    child: Child,
    pub admin: u16,
    log: PathBuf,
    started: Instant,
}

impl Launched {
    /// `cgroup`: run it under the chart's limits there.
    pub fn start(
        queue_url: &str,
        node_selector: Option<&str>,
        cgroup: Option<&Cgroup>,
    ) -> Launched {
        Launched::start_with(queue_url, node_selector, cgroup, &[])
    }

    /// [`Launched::start`] with more arguments for the controller (before any in
    /// `BENCH_CONTROLLER_ARGS`), for a benchmark that compares settings.
    pub fn start_with(
        queue_url: &str,
        node_selector: Option<&str>,
        cgroup: Option<&Cgroup>,
        extra: &[String],
    ) -> Launched {
        let admin = super::aws::free_port();
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
            .env("KUBECONFIG", super::var("KUBECONFIG"))
            .env("AWS_ENDPOINT_URL", super::var("AWS_ENDPOINT_URL"))
            .env("AWS_REGION", super::var("AWS_REGION"))
            .env("AWS_ACCESS_KEY_ID", super::var("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", super::var("AWS_SECRET_ACCESS_KEY"))
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
        command.args(extra);
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time from process start until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Duration {
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
    pub async fn metric_sum(&self, prefix: &str) -> f64 {
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
    pub async fn histogram(&self, name: &str) -> Vec<(f64, f64)> {
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

    pub fn log_tail(&self, lines: usize) -> String {
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
pub async fn create_all<K>(api: &Api<K>, objects: Vec<Value>)
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
pub fn kwok_node(scope: &Scope, name: &str, pods: usize, provider_id: Option<String>) -> Value {
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
                BENCH_NODE_LABEL: "true",
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
pub fn bound_pod(scope: &Scope, name: &str, app: &str, node: &str, grace: i64) -> Value {
    let mut spec = scope.pod_spec(grace);
    spec["nodeName"] = json!(node);
    json!({
        "metadata": {"name": name, "labels": {"app": app, "tier": "web"}},
        "spec": spec,
    })
}

/// Records, per node of the scope, when a watch first saw it unschedulable.
pub fn watch_cordons(
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

/// KWOK nodes without instances, enough to take the replacements of `pods` pods with a fifth to
/// spare.
pub async fn spare_nodes(scope: &Scope, pods: usize) {
    let spare_count = (pods * 6 / 5).div_ceil(SPARE_NODE_PODS).max(1);
    let spares: Vec<Value> = (0..spare_count)
        .map(|i| {
            kwok_node(
                scope,
                &format!("{}-spare-{i}", scope.id),
                SPARE_NODE_PODS,
                None,
            )
        })
        .collect();
    create_all(&Api::<Node>::all(scope.client.clone()), spares).await;
}

/// `per_node` ReplicaSets with one replica on each of `nodes`, each under a PDB
/// `maxUnavailable: max_unavailable` (none when `None`), grace `grace` seconds; waits until all
/// are Ready, adopted and their PDBs computed. Returns each ReplicaSet's floor (replicas −
/// maxUnavailable).
pub async fn spread_replica_sets(
    scope: &Scope,
    nodes: &[Node],
    per_node: usize,
    grace: i64,
    max_unavailable: Option<&str>,
) -> BTreeMap<String, i64> {
    let count = nodes.len();
    let mut pods = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for app in 0..per_node {
            let app = format!("app{app:02}");
            pods.push(bound_pod(
                scope,
                &format!("{app}-n{i}"),
                &app,
                &name_of(node),
                grace,
            ));
        }
    }
    create_all(&scope.pods(), pods).await;
    // The ReplicaSets come after their pods and adopt them: none is created or scheduled.
    let budget = max_unavailable.map(|m| match m.strip_suffix('%') {
        Some(p) => json!({"maxUnavailable": format!("{p}%")}),
        None => json!({"maxUnavailable": m.parse::<i32>().unwrap_or(1)}),
    });
    // The disruption controller rounds a percentage up.
    let unavailable: i64 = match max_unavailable {
        None => count as i64,
        Some(m) => match m.strip_suffix('%') {
            Some(p) => (p.parse::<i64>().unwrap_or(0) * count as i64 + 99) / 100,
            None => m.parse().unwrap_or(1),
        },
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
        if let Some(budget) = &budget {
            pdb(scope, &app, &app, budget.clone()).await;
        }
        floors.insert(app, count as i64 - unavailable);
    }
    create_all(&scope.api::<ReplicaSet>(), sets).await;
    wait_all_ready(scope, count * per_node).await;
    wait_adopted(scope, count * per_node).await;
    if budget.is_some() {
        wait_pdbs(scope, per_node).await;
    }
    floors
}

/// Sends one spot warning per node, all at once (SendMessageBatch, 10 per call, all calls
/// concurrently); returns when each node's warning was sent (the start of its call). `tag` keeps
/// event ids unique across the runs of one process.
pub async fn send_spot_warnings(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    nodes: &[Node],
    tag: &str,
) -> HashMap<String, Instant> {
    let batches: Vec<Vec<(String, String)>> = nodes
        .chunks(10)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let body = spot_body(
                        &format!("bench-{}-{tag}-{b}-{i}", std::process::id()),
                        &instance_id(node),
                    );
                    (name_of(node), body)
                })
                .collect()
        })
        .collect();
    let sends = batches.into_iter().map(|batch| async move {
        let at = Instant::now();
        let mut request = sqs.send_message_batch().queue_url(queue);
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
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Waits until the ReplicaSets own all `count` pods, so the drain sees workload pods, not bare
/// ones.
pub async fn wait_adopted(scope: &Scope, count: usize) {
    wait_pods(
        scope,
        count,
        "adopted by their ReplicaSets",
        Duration::from_secs(300),
        |p| {
            p.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| !o.is_empty())
        },
    )
    .await;
}

/// Deletes the scope's pods at once (grace 0), then its nodes and namespace.
pub async fn remove_scope(scope: Scope) {
    // At 50,000 pods one collection delete runs out of time part-way. Pods left behind when
    // their nodes go are deleted by the namespace controller one grace period at a time, which
    // kept the sandbox busy for half an hour after an idle run.
    // The workloads go first: while their controllers live, each collection delete of the pods
    // is answered by a new set of replicas, and the loop below deleted a ReplicaSet-backed scope
    // thirty times over (ten minutes at 600 pods).
    let all = ListParams::default();
    let background = DeleteParams::background();
    let _ = scope
        .api::<ReplicaSet>()
        .delete_collection(&background, &all)
        .await;
    let _ = scope
        .api::<Deployment>()
        .delete_collection(&background, &all)
        .await;
    let _ = scope
        .api::<StatefulSet>()
        .delete_collection(&background, &all)
        .await;
    let _ = scope
        .api::<DaemonSet>()
        .delete_collection(&background, &all)
        .await;
    let _ = scope
        .api::<Job>()
        .delete_collection(&background, &all)
        .await;
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
