//! Shared by the benchmarks (`benches/`): settings from the environment, a pod watcher that
//! counts PDB floor violations and sees nodes empty, waits for fixtures, and process memory.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::wait::Condition as _;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::drain::node_of;
use super::{Scope, is_pod_ready};

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
    let pods = scope.pods();
    let start = Instant::now();
    loop {
        let list = pods.list(&ListParams::default()).await.expect("list pods");
        let ready = list
            .items
            .iter()
            .filter(|p| is_pod_ready().matches_object(Some(*p)))
            .count();
        if ready >= count {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "only {ready} of {count} pods Ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
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
