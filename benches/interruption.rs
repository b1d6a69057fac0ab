//! The same burst of spot warnings handled by nodedrain and by AWS node-termination-handler
//! (NTH), one after another on the same sandbox, with AWS playing its part: at each instance's
//! deadline the instance dies, and so does every pod still on its node.
//!
//! ```sh
//! cargo bench --bench interruption
//! BENCH_ROWS=fit BENCH_FIT=5x4 cargo bench --bench interruption
//! ```
//!
//! Handlers (`BENCH_HANDLERS` [nodedrain,nth-release,nth-main]), each with a queue of its own:
//! - `nodedrain`: `nodedrain controller` with its defaults, watching the run's nodes;
//! - `nth-release`: NTH `$NTH_RELEASE` (sandbox/versions.env) in queue mode with its defaults;
//! - `nth-main`: NTH `$NTH_MAIN` tuned as its PR #1281 was tested: `KUBE_API_QPS=100`,
//!   `KUBE_API_BURST=200`, `WORKERS=50`.
//!
//! NTH is built by `sandbox/build.sh nth` (cached) and runs with in-cluster configuration
//! supplied by the harness (`tests/support/nth.rs`, docs/sandbox.md).
//!
//! Rows (`BENCH_ROWS` [ceiling,cordon,fit,mixed,stress], run in that order, each printed as it
//! ends; sizes `NODESxPODS`):
//! - `ceiling`: the sandbox's own limit: `BENCH_CEILING` [20x30] pods (ReplicaSets, one
//!   replica per node, no PDB) on cordoned nodes, all evicted at once by a raw loop; pods moved
//!   per second = pods / time until every replacement is Ready. No handler runs.
//! - `fit`: `BENCH_FIT` sized so a perfect handler can keep every budget: by default the pods
//!   the measured ceiling moves in a third of the 108 s a drain has (10 pods per node), 20x10
//!   without a ceiling row;
//! - `stress`: `BENCH_STRESS` [200x30], where the ceiling decides;
//! - `cordon`: `BENCH_CORDON` [200x1], for cordon latency;
//! - `mixed`: `BENCH_MIXED_NODES` [10] nodes with the sandbox's workload mix: replicated
//!   Deployments under PDBs, a single replica with `surge` and one without under `minAvailable:
//!   1`, a StatefulSet, a Job still running, a bare pod, emptyDir, a 600 s grace period under
//!   `maxUnavailable: 0`, a critical Deployment and a DaemonSet.
//!
//! The `NODESxPODS` rows spread `PODS` ReplicaSets with one replica on every node, each under a
//! PDB `maxUnavailable: 20%`, grace 2 s; spare nodes without instances take the replacements.
//!
//! For each run, one spot warning per node is sent at once once the sandbox has settled
//! (`BENCH_QUIET_CORES` [0.5] over a second, waiting at most `BENCH_QUIET_MAX` [120] s). At
//! send time + 120 s, the harness terminates the node's moto instance, force-removes the node's
//! pods (grace 0: they die without SIGTERM) and deletes the Node. Measured (DaemonSet pods left
//! out: they die with every node whatever a handler does):
//! - event-to-cordon (send → a node watch sees `unschedulable`, before the node died);
//! - pods of the interrupted nodes; asked to stop before the instance died (deletion requested
//!   before the deadline: `deletionTimestamp − deletionGracePeriodSeconds`, or gone by then);
//!   died without SIGTERM (still on the node, never asked); grace cut by the death (asked, but
//!   `deletionTimestamp` after the deadline);
//! - Ready below each PDB's floor, integrated over time (replica-seconds), from the send until
//!   every replacement is Ready;
//! - workloads that had 0 Ready pods, and for how long;
//! - time from the send until every workload has all its replicas Ready again (waiting at most
//!   `BENCH_SETTLE` [300] s after the last death);
//! - the handler's peak RSS (`VmHWM`) and CPU seconds, and every sandbox process's CPU seconds.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "../tests/support/nth.rs"]
mod nth;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, EvictParams, ListParams};
use kube::runtime::wait::Condition as _;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use support::bench::{
    Launched, cpu_seconds, create_all, env_list, env_or, measured_processes, mib, proc_status_kib,
    quantile, remove_scope, send_spot_warnings, spare_nodes, spread_replica_sets, wait_all_ready,
    wait_pdbs, wait_pods, wait_quiet, watch_cordons,
};
use support::cgroup::{Cgroup, CgroupStats, ChartLimits};
use support::controller::instance_id;
use support::drain::{name_of, node_of, pdb, set_unschedulable, wait_schedulable};
use support::{Sandbox, Scope, TEST_KEY, is_pod_ready};

/// This harness's command name as the kernel keeps it (cut to 15 characters, hash included):
/// its watches share the CPUs with what it measures.
const HARNESS: &str = "interruption-";
/// A spot instance dies two minutes after its warning.
const WARNING: Duration = Duration::from_secs(120);
/// What the spread rows' pods ask for.
const GRACE: i64 = 2;
/// The part of the warning a drain can use: nodedrain's default margin (10 s) and the grace.
const DRAIN_WINDOW: f64 = 120.0 - 10.0 - GRACE as f64;
/// Prefix of this bench's scopes: not `bench-`, whose nodes the controller tests remove as
/// stale when they start, which would end a run of this bench half-way.
const PREFIX: &str = "int-";

// ---------------------------------------------------------------------------------------------
// handlers

#[derive(Clone)]
enum Handler {
    Nodedrain,
    Nth {
        label: String,
        dir: PathBuf,
        env: Vec<(&'static str, &'static str)>,
    },
}

impl Handler {
    fn label(&self) -> String {
        match self {
            Handler::Nodedrain => "nodedrain".to_string(),
            Handler::Nth { label, .. } => label.clone(),
        }
    }
}

fn handlers() -> Vec<Handler> {
    let (release, main) = nth::versions();
    env_list("BENCH_HANDLERS", "nodedrain,nth-release,nth-main")
        .iter()
        .map(|name| match name.as_str() {
            "nodedrain" => Handler::Nodedrain,
            "nth-release" => Handler::Nth {
                label: format!("NTH {release} defaults"),
                dir: nth::build(&release),
                env: vec![],
            },
            "nth-main" => Handler::Nth {
                label: format!("NTH {main} tuned"),
                dir: nth::build(&main),
                env: vec![
                    ("KUBE_API_QPS", "100"),
                    ("KUBE_API_BURST", "200"),
                    ("WORKERS", "50"),
                ],
            },
            other => panic!("unknown handler {other} (nodedrain, nth-release, nth-main)"),
        })
        .collect()
}

enum Running {
    /// The controller, and the cgroup with the chart's limits it runs in (dropped after it).
    Nodedrain(Launched, Option<Cgroup>),
    Nth(nth::Nth),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Nodedrain(c, _) => c.pid(),
            Running::Nth(n) => n.pid(),
        }
    }

    /// What the kernel counted in nodedrain's cgroup: OOM kills and throttling under the chart's
    /// limits.
    fn cgroup_stats(&self) -> Option<(ChartLimits, CgroupStats)> {
        match self {
            Running::Nodedrain(_, Some(cgroup)) => Some((cgroup.limits, cgroup.stats())),
            _ => None,
        }
    }
}

async fn start(
    handler: &Handler,
    scope: &Scope,
    identity: Option<&nth::Identity>,
    queue: &str,
) -> Running {
    match handler {
        Handler::Nodedrain => {
            let selector = format!("{TEST_KEY}={}", scope.id);
            // As installed: the chart's resources.limits, unless BENCH_CGROUP=off (as in
            // controller_burst). NTH's chart sets no limits, so NTH runs without.
            let cgroup = (std::env::var("BENCH_CGROUP").as_deref() != Ok("off")).then(|| {
                let limits = ChartLimits::from_values().expect("the chart's resources.limits");
                Cgroup::create(&format!("nodedrain-int-{}", std::process::id()), limits)
                    .expect("a cgroup with the chart's limits")
            });
            let mut controller = Launched::start(queue, Some(&selector), cgroup.as_ref());
            controller.wait_ready(Duration::from_secs(60)).await;
            Running::Nodedrain(controller, cgroup)
        }
        Handler::Nth { dir, env, .. } => {
            let identity = identity.expect("NTH's identity");
            // The node NTH's pod would run on: one that stays.
            let node = format!("{}-spare-0", scope.id);
            let mut nth = nth::Nth::start(
                &scope.client,
                identity,
                &dir.join("node-termination-handler"),
                queue,
                &node,
                env,
            )
            .await;
            nth.wait_started(Duration::from_secs(60)).await;
            Running::Nth(nth)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// what happens to the pods

#[derive(Clone)]
struct PodState {
    node: String,
    app: String,
    /// Ready and not terminating.
    ready: bool,
}

/// Counts kept by a pod watch, and their integrals over time.
#[derive(Default)]
struct Tracker {
    pods: HashMap<String, PodState>,
    ready: HashMap<String, i64>,
    floors: BTreeMap<String, i64>,
    desired: BTreeMap<String, i64>,
    interrupted: BTreeSet<String>,
    dead: BTreeSet<String>,
    /// Pods (uid) seen on an interrupted node while it was alive, DaemonSet pods left out.
    victims: BTreeSet<String>,
    integrating: bool,
    last: Option<Instant>,
    below_floor: f64,
    at_zero: BTreeMap<String, f64>,
    /// When every workload last became whole again.
    whole_since: Option<Instant>,
}

impl Tracker {
    fn advance(&mut self, now: Instant) {
        if let (true, Some(last)) = (self.integrating, self.last) {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            for (app, floor) in &self.floors {
                let ready = self.ready.get(app).copied().unwrap_or(0);
                self.below_floor += (floor - ready).max(0) as f64 * dt;
            }
            for (app, want) in &self.desired {
                if *want > 0 && self.ready.get(app).copied().unwrap_or(0) == 0 {
                    *self.at_zero.entry(app.clone()).or_default() += dt;
                }
            }
        }
        self.last = Some(now);
    }

    fn whole(&self) -> bool {
        self.desired
            .iter()
            .all(|(app, want)| self.ready.get(app).copied().unwrap_or(0) >= *want)
    }

    fn count(&mut self, pod: &PodState, sign: i64) {
        if pod.ready {
            *self.ready.entry(pod.app.clone()).or_default() += sign;
        }
    }

    fn apply(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let daemon = is_daemon(pod);
        let state = PodState {
            node: node_of(pod).unwrap_or_default(),
            app: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app").cloned())
                .unwrap_or_default(),
            ready: pod.metadata.deletion_timestamp.is_none()
                && is_pod_ready().matches_object(Some(pod)),
        };
        if !daemon && self.interrupted.contains(&state.node) && !self.dead.contains(&state.node) {
            self.victims.insert(uid.clone());
        }
        self.count(&state, 1);
        if let Some(old) = self.pods.insert(uid, state) {
            self.count(&old, -1);
        }
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            self.count(&old, -1);
        }
    }

    fn after_event(&mut self, now: Instant) {
        if !self.integrating {
            return;
        }
        if !self.whole() {
            self.whole_since = None;
        } else if self.whole_since.is_none() {
            self.whole_since = Some(now);
        }
    }
}

fn track(scope: &Scope, tracker: Arc<Mutex<Tracker>>) -> tokio::task::JoinHandle<()> {
    let api: Api<Pod> = scope.pods();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            let now = Instant::now();
            let mut t = tracker.lock().unwrap();
            t.advance(now);
            match event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => t.apply(&p),
                watcher::Event::Delete(p) => t.remove(p.metadata.uid.as_deref().unwrap_or("")),
                watcher::Event::Init => {
                    t.pods.clear();
                    t.ready.clear();
                }
                watcher::Event::InitDone => {}
            }
            t.after_event(now);
        }
    })
}

/// What the death of one node did to the pods still on it.
#[derive(Default)]
struct Fate {
    /// Never asked to stop: died without SIGTERM.
    killed: usize,
    /// Asked, but their grace period would have ended after the deadline.
    cut: usize,
}

/// AWS at `deadline`: the instance is terminated, the node's pods die, the Node goes.
async fn instance_dies(
    scope: &Scope,
    ec2: &aws_sdk_ec2::Client,
    node: &Node,
    deadline: SystemTime,
    tracker: &Arc<Mutex<Tracker>>,
) -> Fate {
    let name = name_of(node);
    tracker.lock().unwrap().dead.insert(name.clone());
    let _ = ec2
        .terminate_instances()
        .instance_ids(instance_id(node))
        .send()
        .await;
    let on_node = ListParams::default().fields(&format!("spec.nodeName={name}"));
    // Under load a list can time out; the pods' fate is the point of the run.
    let mut pods = Err(());
    for _ in 0..5 {
        pods = scope
            .pods()
            .list(&on_node)
            .await
            .map(|l| l.items)
            .map_err(|_| ());
        if pods.is_ok() {
            break;
        }
    }
    if pods.is_err() {
        eprintln!("{name}: could not list its pods at its death; its fate is not counted");
    }
    let mut fate = Fate::default();
    let deadline_s = deadline
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    for pod in pods.iter().flatten() {
        if is_daemon(pod) {
            continue;
        }
        if let Some(uid) = &pod.metadata.uid {
            tracker.lock().unwrap().victims.insert(uid.clone());
        }
        match &pod.metadata.deletion_timestamp {
            None => fate.killed += 1,
            Some(at) => {
                let ends = at.0.as_second() as f64;
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0) as f64;
                // The apiserver keeps whole seconds; a request in the deadline's own second
                // counts as in time.
                if ends - grace > deadline_s.ceil() {
                    fate.killed += 1;
                } else if ends > deadline_s.ceil() {
                    fate.cut += 1;
                }
            }
        }
    }
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    futures::stream::iter(pods.into_iter().flatten())
        .for_each_concurrent(16, |pod| {
            let api = scope.pods();
            let force = force.clone();
            async move {
                let _ = api.delete(&name_of_pod(&pod), &force).await;
            }
        })
        .await;
    let _ = Api::<Node>::all(scope.client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
    fate
}

/// A DaemonSet's pod: it dies with its node whatever a handler does, so it is left out.
fn is_daemon(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet")
}

fn name_of_pod(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// fixtures

#[derive(Clone)]
enum Shape {
    Spread { per_node: usize },
    Mixed,
}

#[derive(Clone)]
struct Row {
    name: String,
    nodes: usize,
    shape: Shape,
}

impl Row {
    fn describe(&self) -> String {
        match self.shape {
            Shape::Spread { per_node } => format!(
                "{} nodes × {per_node} pods ({} pods), {per_node} ReplicaSets with one replica per node, PDB maxUnavailable 20%, grace {GRACE} s",
                self.nodes,
                self.nodes * per_node
            ),
            Shape::Mixed => format!(
                "{} nodes with the sandbox's workload mix (surge and plain single replicas under minAvailable 1, StatefulSet, Job, bare pod, emptyDir, 600 s grace under maxUnavailable 0, critical pods, DaemonSet)",
                self.nodes
            ),
        }
    }

    fn pods(&self) -> usize {
        match self.shape {
            Shape::Spread { per_node } => self.nodes * per_node,
            Shape::Mixed => 2 * self.nodes + 12,
        }
    }
}

/// Floors (app → PDB floor), desired replicas (app → count), and the workloads a handler could
/// have surged (Deployments).
struct Workloads {
    floors: BTreeMap<String, i64>,
    desired: BTreeMap<String, i64>,
    surgeable: BTreeSet<String>,
}

async fn fixtures(scope: &Scope, row: &Row, nodes: &[Node]) -> Workloads {
    match row.shape {
        Shape::Spread { per_node } => {
            spare_nodes(scope, row.pods()).await;
            let floors = spread_replica_sets(scope, nodes, per_node, GRACE, Some("20%")).await;
            let desired = floors
                .keys()
                .map(|app| (app.clone(), nodes.len() as i64))
                .collect();
            Workloads {
                floors,
                desired,
                surgeable: BTreeSet::new(),
            }
        }
        Shape::Mixed => mixed(scope, nodes.len()).await,
    }
}

/// The sandbox's workload mix (sandbox/fixtures.py) on this scope's nodes; the spare nodes
/// come once it runs, so every pod starts on an interrupted node.
async fn mixed(scope: &Scope, nodes: usize) -> Workloads {
    let template = |app: &str, grace: i64, extra: Value| {
        let mut spec = scope.pod_spec(grace);
        spec["containers"][0]["name"] = json!(app);
        spec["topologySpreadConstraints"] = json!([{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app": app}},
        }]);
        let mut annotations = json!({});
        if let Some(map) = extra.as_object() {
            for (k, v) in map {
                if k.contains('/') {
                    annotations[k] = v.clone();
                } else {
                    spec[k] = v.clone();
                }
            }
        }
        json!({"metadata": {"labels": {"app": app}, "annotations": annotations}, "spec": spec})
    };
    let deployment = |app: &str, replicas: usize, grace: i64, extra: Value| {
        json!({
            "metadata": {"name": app},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                     "template": template(app, grace, extra)},
        })
    };
    let replicas = nodes.max(3);
    let deployments = vec![
        deployment("web", replicas, 30, json!({})),
        deployment("api", replicas, 30, json!({})),
        deployment("checkout", 1, 30, json!({"nodedrain.io/strategy": "surge"})),
        deployment("ledger", 1, 30, json!({})),
        deployment(
            "thumbnailer",
            2,
            30,
            json!({"volumes": [{"name": "scratch", "emptyDir": {}}]}),
        ),
        deployment("video-encoder", 2, 600, json!({})),
        deployment(
            "dns-cache",
            2,
            30,
            json!({"priorityClassName": "system-cluster-critical"}),
        ),
    ];
    let budgets = [
        ("web", json!({"maxUnavailable": 1}), replicas as i64 - 1),
        (
            "api",
            json!({"minAvailable": "50%"}),
            replicas.div_ceil(2) as i64,
        ),
        ("checkout", json!({"minAvailable": 1}), 1),
        ("ledger", json!({"minAvailable": 1}), 1),
        ("cache", json!({"maxUnavailable": 1}), 1),
        ("video-encoder", json!({"maxUnavailable": 0}), 2),
        ("dns-cache", json!({"maxUnavailable": 1}), 1),
    ];
    let mut floors = BTreeMap::new();
    for (app, budget, floor) in budgets {
        pdb(scope, app, app, budget).await;
        floors.insert(app.to_string(), floor);
    }
    create_all(&scope.api::<Deployment>(), deployments).await;
    let cache = json!({
        "metadata": {"name": "cache"},
        "spec": {"serviceName": "cache", "replicas": 2, "selector": {"matchLabels": {"app": "cache"}},
                 "template": template("cache", 60, json!({}))},
    });
    create_all(&scope.api::<StatefulSet>(), vec![cache]).await;
    let mut job_template = template(
        "nightly-report",
        30,
        json!({"restartPolicy": "Never", "sandbox.nodedrain.io/complete-after": "900s"}),
    );
    job_template["spec"]
        .as_object_mut()
        .unwrap()
        .remove("topologySpreadConstraints");
    let job = json!({
        "metadata": {"name": "nightly-report"},
        "spec": {"backoffLimit": 0, "template": job_template},
    });
    create_all(&scope.api::<Job>(), vec![job]).await;
    let agent = json!({
        "metadata": {"name": "node-agent"},
        "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
                 "template": template("node-agent", 30, json!({}))},
    });
    create_all(&scope.api::<DaemonSet>(), vec![agent]).await;
    let mut bare = template("debug-shell", 30, json!({}));
    bare["metadata"]["name"] = json!("debug-shell");
    create_all(&scope.pods(), vec![bare]).await;
    // web, api, checkout, ledger, thumbnailer, video-encoder, dns-cache, cache, the Job's pod,
    // the bare pod and one node-agent per node.
    wait_all_ready(scope, 2 * replicas + 12 + nodes).await;
    wait_pdbs(scope, 4).await;
    spare_nodes(scope, 2 * replicas + 12).await;
    let desired: BTreeMap<String, i64> = [
        ("web", replicas),
        ("api", replicas),
        ("checkout", 1),
        ("ledger", 1),
        ("thumbnailer", 2),
        ("video-encoder", 2),
        ("dns-cache", 2),
        ("cache", 2),
    ]
    .into_iter()
    .map(|(app, n)| (app.to_string(), n as i64))
    .collect();
    let surgeable = [
        "web",
        "api",
        "checkout",
        "ledger",
        "thumbnailer",
        "video-encoder",
        "dns-cache",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    Workloads {
        floors,
        desired,
        surgeable,
    }
}

// ---------------------------------------------------------------------------------------------
// one run

struct Outcome {
    handler: String,
    /// Event-to-cordon per node; a node not cordoned before its instance died counts as the
    /// whole warning ([`WARNING`]), a lower bound.
    cordons: Vec<Duration>,
    cordoned: usize,
    nodes: usize,
    victims: usize,
    killed: usize,
    cut: usize,
    below_floor: f64,
    at_zero: BTreeMap<String, f64>,
    surgeable_at_zero: usize,
    whole_after: Option<Duration>,
    peak_rss_kib: Option<u64>,
    /// The limits the handler ran under and what the kernel counted (nodedrain only).
    cgroup: Option<(ChartLimits, CgroupStats)>,
    cpu: BTreeMap<String, f64>,
    load_before: f64,
}

async fn run(
    sandbox: &Sandbox,
    row: &Row,
    handler: &Handler,
    identity: Option<&nth::Identity>,
) -> Outcome {
    let label = handler.label();
    let scope = sandbox.scope(&format!("{PREFIX}{}", row.name)).await;
    let phase = Instant::now();
    eprintln!("{} / {label}: fixtures: {}", row.name, row.describe());
    let nodes = scope.nodes(row.nodes).await;
    wait_schedulable(&scope, &nodes).await;
    let workloads = fixtures(&scope, row, &nodes).await;
    eprintln!(
        "{} / {label}: fixtures ready in {:.0?}",
        row.name,
        phase.elapsed()
    );

    let sqs = aws_sdk_sqs::Client::new(&scope.aws);
    let ec2 = aws_sdk_ec2::Client::new(&scope.aws);
    let queue = support::aws::create_queue(&sqs, &format!("{PREFIX}{}", row.name), &[]).await;
    let running = start(handler, &scope, identity, &queue).await;
    let pid = running.pid();

    let interrupted: BTreeSet<String> = nodes.iter().map(name_of).collect();
    let tracker = Arc::new(Mutex::new(Tracker {
        floors: workloads.floors.clone(),
        desired: workloads.desired.clone(),
        interrupted,
        ..Tracker::default()
    }));
    let (cordons, cordon_task) = watch_cordons(&scope);
    let track_task = track(&scope, tracker.clone());
    // Both watches have listed and the handler has settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let processes = measured_processes(HARNESS);
    let (waited, load_before) = wait_quiet(
        &processes,
        env_or("BENCH_QUIET_CORES", 0.5),
        Duration::from_secs(env_or("BENCH_QUIET_MAX", 120)),
    )
    .await;
    eprintln!(
        "{} / {label}: sandbox at {load_before:.2} cores after {waited:.0?}; sending {} spot warnings",
        row.name,
        nodes.len()
    );

    let cpu_before = cpu_seconds(&processes, Some(pid));
    {
        let mut t = tracker.lock().unwrap();
        t.integrating = true;
        t.advance(Instant::now());
    }
    let first_send = Instant::now();
    let first_send_wall = SystemTime::now();
    let tag = format!("{}-{}", row.name, label.replace(' ', "-"));
    let sent_at = send_spot_warnings(&sqs, &queue, &nodes, &tag).await;

    // AWS plays its part at each node's deadline.
    let deaths = nodes.iter().map(|node| {
        let at = sent_at[&name_of(node)];
        let deadline_wall = first_send_wall + at.saturating_duration_since(first_send) + WARNING;
        let (scope, ec2, tracker) = (&scope, &ec2, &tracker);
        async move {
            tokio::time::sleep_until((at + WARNING).into()).await;
            instance_dies(scope, ec2, node, deadline_wall, tracker).await
        }
    });
    let fates = futures::future::join_all(deaths).await;
    eprintln!(
        "{} / {label}: every instance has died; waiting for the replacements",
        row.name
    );
    let settle = Duration::from_secs(env_or("BENCH_SETTLE", 300));
    let waiting = Instant::now();
    while !tracker.lock().unwrap().whole() && waiting.elapsed() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (below_floor, at_zero, whole_after, victims) = {
        let mut t = tracker.lock().unwrap();
        t.advance(Instant::now());
        t.integrating = false;
        (
            t.below_floor,
            t.at_zero.clone(),
            t.whole_since
                .filter(|_| t.whole())
                .map(|at| at.saturating_duration_since(first_send)),
            t.victims.len(),
        )
    };
    support::bench::assert_sandbox_intact(&format!("{} / {label}", row.name));
    let peak_rss_kib = proc_status_kib(pid, "VmHWM");
    let cgroup = running.cgroup_stats();
    let cpu: BTreeMap<String, f64> = cpu_seconds(&processes, Some(pid))
        .into_iter()
        .map(|(name, after)| {
            let before = cpu_before.get(&name).copied().unwrap_or(0.0);
            (name, after - before)
        })
        .collect();
    let in_time: Vec<Option<Duration>> = {
        let cordons = cordons.lock().unwrap();
        sent_at
            .iter()
            .map(|(node, at)| {
                let seen = *cordons.get(node)?;
                (seen < *at + WARNING).then(|| seen.saturating_duration_since(*at))
            })
            .collect()
    };
    let cordoned = in_time.iter().flatten().count();
    let cordon_latencies = in_time.into_iter().map(|d| d.unwrap_or(WARNING)).collect();
    cordon_task.abort();
    track_task.abort();
    drop(running);
    let _ = sqs.delete_queue().queue_url(&queue).send().await;
    remove_scope(scope).await;
    let surgeable_at_zero = at_zero
        .keys()
        .filter(|app| workloads.surgeable.contains(*app))
        .count();
    Outcome {
        handler: label,
        cordons: cordon_latencies,
        cordoned,
        nodes: nodes.len(),
        victims,
        killed: fates.iter().map(|f| f.killed).sum(),
        cut: fates.iter().map(|f| f.cut).sum(),
        below_floor,
        at_zero,
        surgeable_at_zero,
        whole_after,
        peak_rss_kib,
        cgroup,
        cpu,
        load_before,
    }
}

// ---------------------------------------------------------------------------------------------
// the sandbox's ceiling

/// Pods moved per second by a raw eviction loop: every pod of cordoned nodes evicted at once,
/// until every replacement is Ready.
async fn ceiling(sandbox: &Sandbox, nodes: usize, per_node: usize) -> (usize, Duration, f64) {
    let scope = sandbox.scope(&format!("{PREFIX}ceiling")).await;
    eprintln!("ceiling: {nodes} nodes × {per_node} pods, evicted at once");
    let drained = scope.nodes(nodes).await;
    wait_schedulable(&scope, &drained).await;
    spare_nodes(&scope, nodes * per_node).await;
    spread_replica_sets(&scope, &drained, per_node, GRACE, None).await;
    for node in &drained {
        set_unschedulable(&scope, &name_of(node), true).await;
    }
    let names: BTreeSet<String> = drained.iter().map(name_of).collect();
    // The ReplicaSets adopt the bound pods, but one that sees a pod late creates a surplus
    // replica and deletes it again: a list taken now held 605 pods for 600 replicas, and the
    // wait below never saw 605 replacements. Count the replicas, evict what is on the nodes.
    let count = nodes * per_node;
    let pods: Vec<Pod> = scope
        .pods()
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && names.contains(&node_of(p).unwrap_or_default())
        })
        .collect();
    let start = Instant::now();
    futures::stream::iter(pods)
        .for_each_concurrent(64, |pod| {
            let api = scope.pods();
            async move {
                let _ = api.evict(&name_of_pod(&pod), &EvictParams::default()).await;
            }
        })
        .await;
    wait_pods(
        &scope,
        count,
        "replaced and Ready",
        Duration::from_secs(600),
        |p| {
            p.metadata.deletion_timestamp.is_none()
                && !names.contains(&node_of(p).unwrap_or_default())
                && is_pod_ready().matches_object(Some(p))
        },
    )
    .await;
    let took = start.elapsed();
    remove_scope(scope).await;
    (count, took, count as f64 / took.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// the table

fn size(key: &str, default: &str) -> (usize, usize) {
    let text = std::env::var(key).unwrap_or_else(|_| default.to_string());
    let (n, p) = text
        .split_once('x')
        .unwrap_or_else(|| panic!("{key}={text}: expected NODESxPODS"));
    (
        n.trim().parse().expect("nodes"),
        p.trim().parse().expect("pods per node"),
    )
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("—".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// A cordon quantile; the warning's length means "not cordoned before the instance died".
fn cordon_secs(d: Option<Duration>) -> String {
    match d {
        Some(d) if d >= WARNING => format!("≥ {} s (not cordoned)", WARNING.as_secs()),
        d => secs(d),
    }
}

/// `theirs / ours` as "N×", or why there is no ratio.
fn ratio(ours: f64, theirs: f64) -> String {
    if ours > 0.0 {
        format!("{:.1}×", theirs / ours)
    } else if theirs > 0.0 {
        "∞ (0 here)".to_string()
    } else {
        "— (both 0)".to_string()
    }
}

/// A number read from one run's outcome.
type Number = Box<dyn Fn(&Outcome) -> f64>;

struct Measure {
    name: &'static str,
    text: Box<dyn Fn(&Outcome) -> String>,
    /// The number ratios are taken of; `None` for text only.
    value: Option<Number>,
}

impl Measure {
    fn new(
        name: &'static str,
        text: impl Fn(&Outcome) -> String + 'static,
        value: Option<Number>,
    ) -> Measure {
        Measure {
            name,
            text: Box::new(text),
            value,
        }
    }
}

fn p(o: &Outcome, q: f64) -> Option<Duration> {
    quantile(&o.cordons, q)
}

fn cordon_measure(name: &'static str, q: f64) -> Measure {
    Measure::new(
        name,
        move |o| cordon_secs(p(o, q)),
        num(move |o| p(o, q).map_or(f64::NAN, |d| d.as_secs_f64())),
    )
}

/// A number to take ratios of.
fn num(f: impl Fn(&Outcome) -> f64 + 'static) -> Option<Number> {
    Some(Box::new(f))
}

fn measures() -> Vec<Measure> {
    vec![
        cordon_measure("event-to-cordon p50", 0.5),
        cordon_measure("event-to-cordon p99", 0.99),
        cordon_measure("event-to-cordon max", 1.0),
        Measure::new(
            "nodes cordoned before the instance died",
            |o| format!("{} of {}", o.cordoned, o.nodes),
            None,
        ),
        Measure::new(
            "pods on the interrupted nodes (DaemonSets aside)",
            |o| o.victims.to_string(),
            None,
        ),
        Measure::new(
            "pods asked to stop before the instance died",
            |o| (o.victims - o.killed).to_string(),
            num(|o| (o.victims - o.killed) as f64),
        ),
        Measure::new(
            "pods that died without SIGTERM",
            |o| o.killed.to_string(),
            num(|o| o.killed as f64),
        ),
        Measure::new(
            "pods whose grace period the death cut short",
            |o| o.cut.to_string(),
            num(|o| o.cut as f64),
        ),
        Measure::new(
            "Ready below the PDB floor (replica-seconds)",
            |o| format!("{:.0}", o.below_floor),
            num(|o| o.below_floor),
        ),
        Measure::new(
            "workloads at 0 Ready (seconds each)",
            |o| {
                if o.at_zero.is_empty() {
                    "none".to_string()
                } else {
                    o.at_zero
                        .iter()
                        .map(|(app, s)| format!("{app} {s:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            },
            num(|o| o.at_zero.len() as f64),
        ),
        Measure::new(
            "every replacement Ready, from the send",
            |o| secs(o.whole_after),
            num(|o| o.whole_after.map_or(f64::NAN, |d| d.as_secs_f64())),
        ),
        Measure::new(
            "handler peak RSS",
            |o| {
                o.peak_rss_kib
                    .map_or("—".to_string(), |k| format!("{:.1} MiB", mib(k)))
            },
            num(|o| o.peak_rss_kib.map_or(f64::NAN, |k| k as f64)),
        ),
        Measure::new(
            "handler's limits: CPU throttled periods / seconds, OOM kills",
            |o| match &o.cgroup {
                Some((limits, stats)) => format!(
                    "{} MiB, {} CPU: {} of {} / {:.1} s, {}",
                    limits.memory_bytes >> 20,
                    limits.cpu_cores,
                    stats.throttled_periods,
                    stats.periods,
                    stats.throttled_seconds,
                    stats.oom_kills
                ),
                None => "none".to_string(),
            },
            None,
        ),
        Measure::new(
            "handler CPU seconds",
            |o| format!("{:.1}", cpu_of(o, "self")),
            num(|o| cpu_of(o, "self")),
        ),
        Measure::new(
            "apiserver CPU seconds",
            |o| format!("{:.0}", cpu_of(o, "kube-apiserver")),
            num(|o| cpu_of(o, "kube-apiserver")),
        ),
        Measure::new(
            "CPU seconds: etcd / controller-manager / scheduler / kwok / moto / harness",
            |o| {
                [
                    "etcd",
                    "kube-controller",
                    "kube-scheduler",
                    "kwok-controller",
                    "moto_server",
                    HARNESS,
                ]
                .iter()
                .map(|n| format!("{:.0}", cpu_of(o, n)))
                .collect::<Vec<_>>()
                .join(" / ")
            },
            None,
        ),
        Measure::new(
            "sandbox CPU in the second before the send (cores)",
            |o| format!("{:.2}", o.load_before),
            None,
        ),
    ]
}

fn cpu_of(o: &Outcome, name: &str) -> f64 {
    o.cpu.get(name).copied().unwrap_or(0.0)
}

/// The goals of issue 15, judged on the measured numbers of one row.
fn goals(row: &Row, outcomes: &[Outcome], ceiling: Option<f64>) -> Vec<String> {
    let Some(ours) = outcomes.iter().find(|o| o.handler == "nodedrain") else {
        return vec![];
    };
    let peers: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.handler != "nodedrain")
        .collect();
    let mut lines = Vec::new();
    let verdict = |met: bool| if met { "met" } else { "**not met**" };
    let p99 = |o: &Outcome| p(o, 0.99).map_or(f64::INFINITY, |d| d.as_secs_f64());
    let fits = ceiling.map(|c| row.pods() as f64 / DRAIN_WINDOW <= c);
    for peer in &peers {
        let met = p99(peer) >= 50.0 * p99(ours);
        lines.push(format!(
            "cordon p99 at least 50× lower than {}: {:.1}× — {}",
            peer.handler,
            p99(peer) / p99(ours),
            verdict(met)
        ));
        let killed_goal = if fits == Some(true) {
            (ours.killed == 0, "0, the ceiling allows it".to_string())
        } else {
            (
                ours.killed as f64 <= peer.killed as f64 / 10.0,
                format!("at most a tenth of {}'s {}", peer.handler, peer.killed),
            )
        };
        lines.push(format!(
            "pods dying without SIGTERM: {} ({}) — {}",
            ours.killed,
            killed_goal.1,
            verdict(killed_goal.0)
        ));
        lines.push(format!(
            "replica-seconds below the PDB floor at most a tenth of {}'s {:.0}: {:.0} — {}",
            peer.handler,
            peer.below_floor,
            ours.below_floor,
            verdict(ours.below_floor <= peer.below_floor / 10.0)
        ));
    }
    // Only the mix has single replicas a surge can hand over; the spread rows' ReplicaSets
    // never reach 0 while most of their replicas run elsewhere.
    if matches!(row.shape, Shape::Mixed) {
        lines.push(format!(
            "no workload at 0 Ready where a surge was possible (Deployments): {} such — {}",
            ours.surgeable_at_zero,
            verdict(ours.surgeable_at_zero == 0)
        ));
    }
    lines
}

fn print_row(row: &Row, outcomes: &[Outcome], ceiling: Option<f64>) {
    println!();
    println!("### {}: {}", row.name, row.describe());
    if let Some(c) = ceiling {
        let needed = row.pods() as f64 / DRAIN_WINDOW;
        println!();
        println!(
            "Moving {} pods in the {DRAIN_WINDOW:.0} s a drain has needs {needed:.1} pods/s; the sandbox's ceiling is {c:.1} pods/s ({}).",
            row.pods(),
            if needed <= c {
                "within it"
            } else {
                "beyond it: the ceiling decides"
            }
        );
    }
    let ours = outcomes.iter().find(|o| o.handler == "nodedrain");
    let peers: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.handler != "nodedrain")
        .collect();
    println!();
    let mut header = vec!["measure".to_string()];
    header.extend(outcomes.iter().map(|o| o.handler.clone()));
    if ours.is_some() {
        header.extend(peers.iter().map(|o| format!("{} ÷ nodedrain", o.handler)));
    }
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for m in measures() {
        let mut cells = vec![m.name.to_string()];
        cells.extend(outcomes.iter().map(|o| (m.text)(o)));
        if let Some(ours) = ours {
            for peer in &peers {
                cells.push(match &m.value {
                    Some(value) if !value(ours).is_nan() && !value(peer).is_nan() => {
                        ratio(value(ours), value(peer))
                    }
                    _ => String::new(),
                });
            }
        }
        println!("| {} |", cells.join(" | "));
    }
    let goals = goals(row, outcomes, ceiling);
    if !goals.is_empty() {
        println!();
        for line in goals {
            println!("- {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Removes what an aborted earlier run of this bench left (another process id).
async fn remove_stale(client: &kube::Client) {
    let mine = format!("-{}-", std::process::id());
    let nodes: Api<Node> = Api::all(client.clone());
    if let Ok(list) = nodes.list(&ListParams::default().labels(TEST_KEY)).await {
        for node in list.items {
            let owner = node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(TEST_KEY))
                .cloned()
                .unwrap_or_default();
            if owner.starts_with(PREFIX) && !owner.contains(&mine) {
                let _ = nodes
                    .delete(&name_of(&node), &DeleteParams::default())
                    .await;
            }
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Ok(list) = namespaces
        .list(&ListParams::default().labels(TEST_KEY))
        .await
    {
        for namespace in list.items {
            let name = namespace.metadata.name.clone().unwrap_or_default();
            if name.starts_with(PREFIX) && !name.contains(&mine) {
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let sandbox = Sandbox::connect().await;
        remove_stale(&sandbox.client).await;
        let handlers = handlers();
        let rows = env_list("BENCH_ROWS", "ceiling,cordon,fit,mixed,stress");
        let mut ceiling_rate = None;
        if rows.iter().any(|r| r == "ceiling") {
            let (n, per) = size("BENCH_CEILING", "20x30");
            let (pods, took, rate) = ceiling(&sandbox, n, per).await;
            println!();
            println!(
                "sandbox ceiling: {pods} pods evicted at once from {n} cordoned nodes, every replacement Ready after {:.1} s: {rate:.1} pods/s",
                took.as_secs_f64()
            );
            ceiling_rate = Some(rate);
        }
        let identity = if handlers.iter().any(|h| matches!(h, Handler::Nth { .. })) {
            let Handler::Nth { dir, .. } = handlers
                .iter()
                .find(|h| matches!(h, Handler::Nth { .. }))
                .unwrap()
            else {
                unreachable!()
            };
            let namespace = format!("{PREFIX}nth-{}", std::process::id());
            Some(nth::Identity::create(&sandbox.client, &namespace, dir).await)
        } else {
            None
        };
        let fit = match (std::env::var("BENCH_FIT").ok(), ceiling_rate) {
            (Some(_), _) | (None, None) => size("BENCH_FIT", "20x10"),
            // A third of what the ceiling moves in the drain window: room for the PDBs' waves.
            (None, Some(rate)) => (
                ((rate * DRAIN_WINDOW / 3.0 / 10.0) as usize).clamp(2, 100),
                10,
            ),
        };
        for name in rows.iter().filter(|r| *r != "ceiling") {
            let row = match name.as_str() {
                "fit" => Row {
                    name: "fit".into(),
                    nodes: fit.0,
                    shape: Shape::Spread { per_node: fit.1 },
                },
                "stress" | "cordon" => {
                    let (key, default) = if name == "stress" {
                        ("BENCH_STRESS", "200x30")
                    } else {
                        ("BENCH_CORDON", "200x1")
                    };
                    let (n, per) = size(key, default);
                    Row {
                        name: name.clone(),
                        nodes: n,
                        shape: Shape::Spread { per_node: per },
                    }
                }
                "mixed" => Row {
                    name: "mixed".into(),
                    nodes: env_or("BENCH_MIXED_NODES", 10),
                    shape: Shape::Mixed,
                },
                other => panic!("unknown row {other} (ceiling, fit, stress, cordon, mixed)"),
            };
            let mut outcomes = Vec::new();
            for handler in &handlers {
                outcomes.push(run(&sandbox, &row, handler, identity.as_ref()).await);
            }
            print_row(&row, &outcomes, ceiling_rate);
        }
        if let Some(identity) = identity {
            identity.remove(&sandbox.client).await;
        }
    });
}
