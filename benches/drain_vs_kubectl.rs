//! `nodedrain drain` against `kubectl drain` on the same fixtures, side by side, on the sandbox.
//!
//! ```sh
//! cargo bench --bench drain_vs_kubectl
//! BENCH_B_NODES=4 BENCH_B_PODS_PER_NODE=10 BENCH_A_PODS=30 cargo bench --bench drain_vs_kubectl
//! ```
//!
//! Scenarios (sizes from the environment, defaults in brackets):
//! - (a) one node with `BENCH_A_PODS` [110] evictable pods (one Deployment, no PDB), grace
//!   `BENCH_A_GRACE` [5] s; one empty spare node takes the replacements.
//! - (b) `BENCH_B_NODES` [20] nodes × `BENCH_B_PODS_PER_NODE` [30] pods: as many Deployments as
//!   pods per node, each with one replica per node (required pod anti-affinity on the hostname)
//!   and a PDB `maxUnavailable: BENCH_B_MAX_UNAVAILABLE` ["20%"]; grace `BENCH_B_GRACE` [2] s;
//!   as many empty spare nodes as drained ones. All nodes are drained by one command. kubectl
//!   drains the nodes of one command one after another, so (b) also runs one kubectl per node in
//!   parallel, as an operator scripting around that would.
//!
//! `BENCH_SCENARIOS` [a,b] picks scenarios; `BENCH_TOOLS` [nodedrain,kubectl,kubectl-parallel]
//! picks tools; `BENCH_KEEP_LOGS=DIR` keeps each tool's request log there. Every run gets a fresh
//! namespace and fresh nodes.
//!
//! Measured:
//! - wall time until a watcher sees the drained nodes empty (and the tool's exit status);
//! - API requests per drained pod, twice: the tool's own requests (counted from its request log:
//!   kubectl `-v=6` "Response" lines, nodedrain's kube-client "requesting" debug events), and the
//!   delta of the apiserver's own `apiserver_request_total` over the run. The sandbox apiserver
//!   runs without API Priority and Fairness and its metrics carry no user or user agent, so that
//!   delta counts every client: the controllers and KWOK replacing the pods as well as the tool
//!   (and any test running at the same time).
//! - PDB violations: times a watcher saw a Deployment's Ready (and not terminating) pods drop
//!   below its PDB's floor (replicas − maxUnavailable), and the lowest Ready − floor seen.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde_json::json;
use support::bench::{env_list, env_or, tail, wait_all_ready, wait_pdbs, watch_pods, when_empty};
use support::drain::{deployment_with, name_of, pdb, wait_schedulable};
use support::{Sandbox, Scope};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Nodedrain,
    Kubectl,
    KubectlParallel,
}

impl Tool {
    fn label(self, nodes: usize) -> String {
        match self {
            Tool::Nodedrain => "nodedrain drain".to_string(),
            Tool::Kubectl => "kubectl drain".to_string(),
            Tool::KubectlParallel => format!("kubectl drain ×{nodes} in parallel"),
        }
    }
}

struct Measured {
    scenario: String,
    tool: String,
    pods: usize,
    wall: Option<Duration>,
    exit_ok: bool,
    tool_requests: usize,
    apiserver_requests: u64,
    violations: Option<(usize, i64)>,
}

/// The sum of `apiserver_request_total` over all label sets, from the apiserver's /metrics.
async fn apiserver_requests(client: &kube::Client) -> u64 {
    let request = kube::core::Request::new("")
        .get("metrics", &Default::default())
        .expect("metrics request");
    let text = client.request_text(request).await.expect("read /metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Runs the tool to completion; returns (exit ok, its own request count).
fn run_tool(tool: Tool, nodes: &[String], kubeconfig: &std::path::Path) -> (bool, usize) {
    let kubectl = format!("{}/kubectl", support::var("NODEDRAIN_SANDBOX_BIN"));
    let common = ["--ignore-daemonsets", "--delete-emptydir-data", "--force"];
    let spawn = |nodes: &[String]| match tool {
        Tool::Nodedrain => Command::new(env!("CARGO_BIN_EXE_nodedrain"))
            .arg("drain")
            .args(nodes)
            .args(common)
            .args(["--timeout", "20m"])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn,kube_client::client::builder=debug")
            .env("NODEDRAIN_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nodedrain"),
        Tool::Kubectl | Tool::KubectlParallel => Command::new(&kubectl)
            .arg("drain")
            .args(nodes)
            .args(common)
            .args(["--timeout=20m", "-v=6"])
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl"),
    };
    let children: Vec<_> = match tool {
        Tool::KubectlParallel => nodes
            .iter()
            .map(|n| spawn(std::slice::from_ref(n)))
            .collect(),
        _ => vec![spawn(nodes)],
    };
    let mut ok = true;
    let mut requests = 0;
    for child in children {
        let output = child.wait_with_output().expect("wait for the tool");
        ok &= output.status.success();
        let log = String::from_utf8_lossy(&output.stderr);
        if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
            let path = std::path::Path::new(&dir).join(format!(
                "{}-{}.log",
                tag(tool),
                nodes.first().map(String::as_str).unwrap_or("none")
            ));
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(path, log.as_bytes());
        }
        requests += log
            .lines()
            .filter(|l| match tool {
                Tool::Nodedrain => l.contains("\"requesting\""),
                _ => l.contains("\"Response\" verb="),
            })
            .count();
        if !output.status.success() {
            eprintln!("{} failed:\n{}", tool.label(nodes.len()), tail(&log, 20));
        }
    }
    (ok, requests)
}

struct Fixture {
    scope: Scope,
    drained: Vec<String>,
    pods: usize,
    floors: BTreeMap<String, i64>,
}

async fn fixture_a(sandbox: &Sandbox, tag: &str, pods: usize, grace: i64) -> Fixture {
    let scope = sandbox.scope(&format!("bench-a-{tag}")).await;
    let nodes = scope.nodes(1).await;
    wait_schedulable(&scope, &nodes).await;
    deployment_with(&scope, "a", pods as i32, grace, json!({}), json!({})).await;
    wait_all_ready(&scope, pods).await;
    let spare = scope.nodes(1).await;
    wait_schedulable(&scope, &spare).await;
    Fixture {
        drained: nodes.iter().map(name_of).collect(),
        scope,
        pods,
        floors: BTreeMap::new(),
    }
}

async fn fixture_b(
    sandbox: &Sandbox,
    tag: &str,
    nodes: usize,
    per_node: usize,
    max_unavailable: &str,
    grace: i64,
) -> Fixture {
    let scope = sandbox.scope(&format!("bench-b-{tag}")).await;
    let drained = scope.nodes(nodes).await;
    wait_schedulable(&scope, &drained).await;
    let budget = if let Some(p) = max_unavailable.strip_suffix('%') {
        json!({"maxUnavailable": format!("{p}%")})
    } else {
        json!({"maxUnavailable": max_unavailable.parse::<i32>().unwrap_or(1)})
    };
    // The disruption controller rounds a percentage up.
    let unavailable: i64 = match max_unavailable.strip_suffix('%') {
        Some(p) => (p.parse::<i64>().unwrap_or(0) * nodes as i64 + 99) / 100,
        None => max_unavailable.parse().unwrap_or(1),
    };
    let mut floors = BTreeMap::new();
    for d in 0..per_node {
        let app = format!("d{d}");
        deployment_with(
            &scope,
            &app,
            nodes as i32,
            grace,
            json!({}),
            json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": {"app": app}},
                "topologyKey": "kubernetes.io/hostname",
            }]}}}),
        )
        .await;
        pdb(&scope, &app, &app, budget.clone()).await;
        floors.insert(app, nodes as i64 - unavailable);
    }
    wait_all_ready(&scope, nodes * per_node).await;
    wait_pdbs(&scope, per_node).await;
    let spares = scope.nodes(nodes).await;
    wait_schedulable(&scope, &spares).await;
    Fixture {
        drained: drained.iter().map(name_of).collect(),
        scope,
        pods: nodes * per_node,
        floors,
    }
}

async fn measure(sandbox: &Sandbox, scenario: &str, tool: Tool, fixture: Fixture) -> Measured {
    let Fixture {
        scope,
        drained,
        pods,
        floors,
    } = fixture;
    let has_pdbs = !floors.is_empty();
    let (seen, mut empty, watch_task) =
        watch_pods(&scope, drained.iter().cloned().collect(), floors);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = apiserver_requests(&sandbox.client).await;
    let started = Instant::now();
    let nodes = drained.clone();
    let kubeconfig = sandbox.kubeconfig.clone();
    let (exit_ok, tool_requests) =
        tokio::task::spawn_blocking(move || run_tool(tool, &nodes, &kubeconfig))
            .await
            .expect("tool thread");
    let emptied = when_empty(&mut empty, Duration::from_secs(60)).await;
    let after = apiserver_requests(&sandbox.client).await;
    watch_task.abort();
    let violations = {
        let seen = seen.lock().unwrap();
        has_pdbs.then(|| (seen.violations, seen.min_margin.unwrap_or(0)))
    };
    let measured = Measured {
        scenario: scenario.to_string(),
        tool: tool.label(drained.len()),
        pods,
        wall: emptied.map(|at| at.saturating_duration_since(started)),
        exit_ok,
        tool_requests,
        apiserver_requests: after.saturating_sub(before),
        violations,
    };
    // Nodes first, so the namespace's pods are not rescheduled while it goes.
    let node_api: Api<Node> = Api::all(scope.client.clone());
    let _ = node_api
        .delete_collection(
            &Default::default(),
            &ListParams::default().labels(&format!("{}={}", support::TEST_KEY, scope.id)),
        )
        .await;
    scope.cleanup().await;
    measured
}

fn print_table(runs: &[Measured]) {
    let header = [
        "scenario",
        "tool",
        "pods",
        "wall to empty",
        "exit",
        "tool requests/pod",
        "apiserver Δ/pod (all clients)",
        "PDB violations (min Ready−floor)",
    ];
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|m| {
            vec![
                m.scenario.clone(),
                m.tool.clone(),
                m.pods.to_string(),
                m.wall.map_or_else(
                    || "not empty".into(),
                    |w| format!("{:.1} s", w.as_secs_f64()),
                ),
                if m.exit_ok { "0".into() } else { "≠0".into() },
                format!(
                    "{:.2} ({})",
                    m.tool_requests as f64 / m.pods as f64,
                    m.tool_requests
                ),
                format!(
                    "{:.2} ({})",
                    m.apiserver_requests as f64 / m.pods as f64,
                    m.apiserver_requests
                ),
                m.violations
                    .map_or_else(|| "n/a (no PDB)".into(), |(v, min)| format!("{v} ({min})")),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in rows {
        println!("{}", line(row));
    }
    for scenario in runs
        .iter()
        .map(|m| m.scenario.clone())
        .collect::<BTreeSet<_>>()
    {
        let of = |label: &str| {
            runs.iter()
                .find(|m| m.scenario == scenario && m.tool.starts_with(label))
                .and_then(|m| m.wall)
        };
        if let (Some(ours), Some(theirs)) = (of("nodedrain"), of("kubectl drain")) {
            println!(
                "{scenario}: nodedrain takes {:.2}× kubectl drain's wall time",
                ours.as_secs_f64() / theirs.as_secs_f64()
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sandbox = Sandbox::connect().await;
        let scenarios = env_list("BENCH_SCENARIOS", "a,b");
        let tools: Vec<Tool> = env_list("BENCH_TOOLS", "nodedrain,kubectl,kubectl-parallel")
            .iter()
            .filter_map(|t| match t.as_str() {
                "nodedrain" => Some(Tool::Nodedrain),
                "kubectl" => Some(Tool::Kubectl),
                "kubectl-parallel" => Some(Tool::KubectlParallel),
                _ => None,
            })
            .collect();
        let a_pods: usize = env_or("BENCH_A_PODS", 110);
        let a_grace: i64 = env_or("BENCH_A_GRACE", 5);
        let b_nodes: usize = env_or("BENCH_B_NODES", 20);
        let b_per_node: usize = env_or("BENCH_B_PODS_PER_NODE", 30);
        let b_unavailable: String = env_or("BENCH_B_MAX_UNAVAILABLE", "20%".to_string());
        let b_grace: i64 = env_or("BENCH_B_GRACE", 2);
        let mut runs = Vec::new();
        if scenarios.iter().any(|s| s == "a") {
            let name = format!("(a) 1 node × {a_pods} pods, {a_grace} s grace");
            // kubectl drains one node the same way in one process or many.
            for tool in tools.iter().filter(|t| **t != Tool::KubectlParallel) {
                eprintln!("{name}: {}", tool.label(1));
                let fixture = fixture_a(&sandbox, tag(*tool), a_pods, a_grace).await;
                runs.push(measure(&sandbox, &name, *tool, fixture).await);
            }
        }
        if scenarios.iter().any(|s| s == "b") {
            let name = format!(
                "(b) {b_nodes} nodes × {b_per_node} pods, PDB maxUnavailable {b_unavailable}, {b_grace} s grace"
            );
            for tool in &tools {
                eprintln!("{name}: {}", tool.label(b_nodes));
                let fixture = fixture_b(
                    &sandbox,
                    tag(*tool),
                    b_nodes,
                    b_per_node,
                    &b_unavailable,
                    b_grace,
                )
                .await;
                runs.push(measure(&sandbox, &name, *tool, fixture).await);
            }
        }
        print_table(&runs);
    });
}

fn tag(tool: Tool) -> &'static str {
    match tool {
        Tool::Nodedrain => "nd",
        Tool::Kubectl => "kc",
        Tool::KubectlParallel => "kcp",
    }
}
