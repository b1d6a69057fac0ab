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

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde_json::Value;
use support::bench::{
    Launched, bound_pod, cpu_seconds, create_all, env_list, env_or, kwok_node, measured_processes,
    mib, proc_status_kib, quantile, remove_scope, send_spot_warnings, spare_nodes,
    spread_replica_sets, wait_quiet, watch_cordons, watch_pods, when_empty,
};
use support::cgroup::{Cgroup, CgroupStats, ChartLimits};
use support::drain::{name_of, wait_schedulable};
use support::{Sandbox, TEST_KEY};

/// This harness's command name as the kernel keeps it (15 characters): its pod watch shares the
/// CPUs, so its CPU time is reported with the sandbox's.
const HARNESS: &str = "controller_burs";

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
    spare_nodes(&scope, count * per_node).await;
    eprintln!("burst: {} pods in {per_node} ReplicaSets", count * per_node);
    let floors = spread_replica_sets(&scope, &nodes, per_node, grace, Some(&max_unavailable)).await;
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
    let processes = measured_processes(HARNESS);
    let (waited, load) = wait_quiet(&processes, quiet_cores, Duration::from_secs(300)).await;
    eprintln!(
        "burst: sandbox at {load:.2} cores after waiting {:.0?} for it to settle",
        waited
    );

    let cpu_before = cpu_seconds(&processes, Some(pid));
    eprintln!("burst: sending {count} spot warnings at once");
    let first_send = Instant::now();
    let sent_at = send_spot_warnings(&sqs, &queue, &nodes, "burst").await;
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
    let cpu: Vec<(String, f64)> = cpu_seconds(&processes, Some(pid))
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
