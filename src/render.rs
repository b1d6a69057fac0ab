//! Text for people: the plan table, one line per pod state change, the final summary and error
//! messages. Pure functions of the engine's data, so the wording is unit-tested.

use std::fmt::Write as _;

use crate::drain::execute::{DrainError, NodePlan};
use crate::drain::plan::{Plan, RefusalReason, RefusedPod};
use crate::drain::report::{DrainOutcome, DrainReport, ProgressEvent};

/// kubectl's wording for each refusal, so people who know kubectl drain recognise it.
fn refusal_text(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::DaemonSet => "DaemonSet-managed Pods (use --ignore-daemonsets to ignore)",
        RefusalReason::BarePod => "Pods that declare no controller (use --force to override)",
        RefusalReason::EmptyDir => {
            "Pods with local storage (use --delete-emptydir-data to override)"
        }
    }
}

/// `cannot delete <what>: ns/a, ns/b; cannot delete ...`, grouped by reason like kubectl.
pub fn refusals(refused: &[RefusedPod]) -> String {
    let mut parts = Vec::new();
    for reason in [
        RefusalReason::DaemonSet,
        RefusalReason::BarePod,
        RefusalReason::EmptyDir,
    ] {
        let pods: Vec<String> = refused
            .iter()
            .filter(|p| p.reasons.contains(&reason))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        if !pods.is_empty() {
            parts.push(format!(
                "cannot delete {}: {}",
                refusal_text(reason),
                pods.join(", ")
            ));
        }
    }
    parts.join("; ")
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The plan of one node as a table: pod, owner, strategy, wave (order/tier), grace, PDB with
/// `disruptionsAllowed`, and why, then what stays, what is refused and what to fix.
pub fn plan(node: &str, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Node {node}: {} to move, {} left in place, {} refused{}",
        pods(plan.steps.len()),
        plan.ignored.len(),
        plan.refused.len(),
        match plan.deadline {
            Some(d) if plan.voluntary => format!(" (deadline {d}, PDBs never overridden)"),
            Some(d) =>
                format!(" (deadline {d}: blocked pods are deleted at their last safe moment)"),
            None => String::new(),
        }
    );
    if !plan.steps.is_empty() {
        let mut rows = vec![
            [
                "WAVE",
                "POD",
                "OWNER",
                "STRATEGY",
                "ORDER/TIER",
                "GRACE",
                "PDB (ALLOWED)",
                "WHY",
            ]
            .map(String::from)
            .to_vec(),
        ];
        if plan.deadline.is_some() {
            rows[0].insert(6, "START BY".to_string());
        }
        for step in &plan.steps {
            let pdbs = if step.pdbs.is_empty() {
                "-".to_string()
            } else {
                step.pdbs
                    .iter()
                    .map(|p| match p.disruptions_allowed {
                        Some(n) => format!("{} ({n})", p.name),
                        None => format!("{} (?)", p.name),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut why = step.reason.clone();
            if step.terminating {
                why.push_str("; already terminating");
            }
            if let Some(blocker) = &step.blocker {
                let _ = write!(why, "; BLOCKED: {blocker}");
            }
            let mut row = vec![
                (step.wave + 1).to_string(),
                format!("{}/{}", step.namespace, step.name),
                step.owner
                    .as_ref()
                    .map_or_else(|| "<none>".to_string(), ToString::to_string),
                step.strategy.to_string(),
                format!("{}/{}", step.order, step.tier),
                format!("{}s", step.grace_seconds),
                pdbs,
                why,
            ];
            if plan.deadline.is_some() {
                let start_by = step
                    .latest_start
                    .map(|t| t.strftime("%H:%M:%S").to_string())
                    .unwrap_or_default();
                row.insert(6, start_by);
            }
            rows.push(row);
        }
        out.push_str(&table(&rows));
    }
    if !plan.ignored.is_empty() {
        out.push_str("Left in place:\n");
        let rows: Vec<Vec<String>> = plan
            .ignored
            .iter()
            .map(|p| {
                vec![
                    format!("  {}/{}", p.namespace, p.name),
                    p.reason.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    load_balancers(&mut out, plan);
    if !plan.refused.is_empty() {
        let _ = writeln!(out, "Refused: {}", refusals(&plan.refused));
    }
    for warning in &plan.warnings {
        let _ = writeln!(out, "Warning: {warning}");
    }
    out
}

/// What the load balancers route to the node and its pods, and how long each pod will wait.
fn load_balancers(out: &mut String, plan: &Plan) {
    if let Some(reason) = &plan.load_balancers_unchecked {
        let _ = writeln!(out, "Load balancers: {reason}");
        return;
    }
    let waiting: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| !s.load_balancer.is_empty())
        .collect();
    if plan.node_targets.is_empty() && waiting.is_empty() {
        return;
    }
    out.push_str("Load balancers:\n");
    for target in &plan.node_targets {
        let who = if target.deregistered_by_nodedrain {
            "nodedrain deregisters it at cordon"
        } else {
            "the AWS Load Balancer Controller deregisters it once the node is labelled out"
        };
        let _ = writeln!(out, "  node target {target}: {who}");
    }
    for step in waiting {
        let targets: Vec<String> = step.load_balancer.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "  {}/{} stops only once no load balancer routes to it: {}",
            step.namespace,
            step.name,
            targets.join(", ")
        );
        match step.load_balancer.iter().filter_map(|t| t.short_by).max() {
            Some(short) => {
                let _ = writeln!(
                    out,
                    "; DOES NOT FIT if a target never drains: its group's delay is {}s longer than \
                     the time before the pod's latest start, and the deadline would cut that wait",
                    short.as_secs()
                );
            }
            None => out.push_str("; fits\n"),
        }
    }
}

/// All node plans, separated by blank lines.
pub fn plans(plans: &[NodePlan]) -> String {
    plans
        .iter()
        .map(|p| plan(&p.node, &p.plan))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line per event, for logs and pipes: `shop/web-abc  evicting (PDB web allows 1, ...)`.
/// With several nodes the node name comes first.
pub fn progress_line(event: &ProgressEvent, several_nodes: bool) -> String {
    let prefix = |node: &str| {
        if several_nodes {
            format!("{node}  ")
        } else {
            String::new()
        }
    };
    match event {
        ProgressEvent::Cordoned { node } => format!("node/{node} cordoned"),
        ProgressEvent::Planned {
            node,
            steps,
            ignored,
            refused,
        } => format!(
            "{}{} to move, {ignored} left in place{}",
            prefix(node),
            pods(*steps),
            if *refused > 0 {
                format!(", {refused} refused")
            } else {
                String::new()
            }
        ),
        ProgressEvent::Refused { node, pods } => {
            format!("{}refused: {}", prefix(node), refusals(pods))
        }
        ProgressEvent::Warning { node, warning } => format!("{}warning: {warning}", prefix(node)),
        ProgressEvent::Pod { node, pod, change } => {
            format!("{}{pod}  {change}", prefix(node))
        }
        ProgressEvent::NodeDrained { node, after } => {
            format!("node/{node} drained after {:.1}s", after.as_secs_f64())
        }
    }
}

/// The closing text of a drain. For a drain that did not finish, each remaining pod with what
/// blocked it.
pub fn summary(report: &DrainReport) -> String {
    let mut out = String::new();
    let moved: usize = report
        .nodes
        .iter()
        .map(|n| n.pods.iter().filter(|p| p.gone).count())
        .sum();
    let overridden: usize = report
        .nodes
        .iter()
        .map(|n| n.pods.iter().filter(|p| p.deadline_override).count())
        .sum();
    let nodes: Vec<&str> = report.nodes.iter().map(|n| n.node.as_str()).collect();
    let elapsed = report.elapsed.as_secs_f64();
    if report.is_success() {
        let _ = write!(
            out,
            "drained {} in {elapsed:.1}s: {} moved",
            node_list(&nodes),
            pods(moved)
        );
        if overridden > 0 {
            let _ = write!(out, " ({overridden} deleted at the deadline)");
        }
        out.push('\n');
        return out;
    }
    match report.outcome {
        DrainOutcome::Refused => {
            for node in report.nodes.iter().filter(|n| !n.refused.is_empty()) {
                let _ = writeln!(
                    out,
                    "error: unable to drain node {:?}: {}",
                    node.node,
                    refusals(&node.refused)
                );
            }
            let _ = writeln!(
                out,
                "Nothing was evicted. {} cordoned (`nodedrain uncordon {}` undoes it).",
                stays(&nodes),
                nodes.join(" ")
            );
            return out;
        }
        DrainOutcome::TimedOut => {
            let _ = writeln!(out, "error: drain timed out after {elapsed:.1}s");
        }
        DrainOutcome::Cancelled => {
            let _ = writeln!(out, "error: drain cancelled after {elapsed:.1}s");
        }
        DrainOutcome::Drained => {
            let _ = writeln!(out, "error: drain ended with pods left");
        }
    }
    for node in &report.nodes {
        let remaining: Vec<_> = node.remaining().collect();
        if remaining.is_empty() {
            let _ = writeln!(out, "node/{} drained", node.node);
            continue;
        }
        let _ = writeln!(
            out,
            "node/{}: {} of {} pods remain:",
            node.node,
            remaining.len(),
            node.pods.len()
        );
        let rows: Vec<Vec<String>> = remaining
            .iter()
            .map(|p| {
                vec![
                    format!("  {}", p.pod),
                    p.strategy.to_string(),
                    p.blocker
                        .as_ref()
                        .map_or_else(|| "unknown".to_string(), ToString::to_string),
                ]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    let _ = writeln!(
        out,
        "{} cordoned (`nodedrain uncordon {}` undoes it).",
        stays(&nodes),
        nodes.join(" ")
    );
    out
}

fn pods(n: usize) -> String {
    if n == 1 {
        "1 pod".to_string()
    } else {
        format!("{n} pods")
    }
}

fn node_list(nodes: &[&str]) -> String {
    match nodes {
        [one] => format!("node/{one}"),
        many => format!("{} nodes", many.len()),
    }
}

fn stays(nodes: &[&str]) -> String {
    match nodes {
        [one] => format!("Node {one} stays"),
        many => format!("Nodes {} stay", many.join(", ")),
    }
}

/// An engine error for people, with a hint for RBAC refusals.
pub fn error(err: &DrainError) -> String {
    let mut text = format!("error: {err}");
    if err.is_forbidden() {
        text.push_str(
            "\nhint: the credentials in use lack a permission nodedrain needs (get/list/watch/patch \
             nodes; list/watch pods in all namespaces; create pods/eviction; delete pods; \
             list/watch poddisruptionbudgets; list replicasets; get/patch deployments; \
             create/patch events.k8s.io events)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::plan::Tier;
    use crate::drain::policy::Strategy;
    use crate::drain::report::{Blocker, NodeReport, PodRef, PodReport};
    use crate::node::Phase;
    use std::time::Duration;

    fn refused(name: &str, reasons: Vec<RefusalReason>) -> RefusedPod {
        RefusedPod {
            namespace: "shop".into(),
            name: name.into(),
            uid: None,
            reasons,
        }
    }

    #[test]
    fn refusals_read_like_kubectl() {
        let text = refusals(&[
            refused(
                "bare",
                vec![RefusalReason::BarePod, RefusalReason::EmptyDir],
            ),
            refused("cache", vec![RefusalReason::EmptyDir]),
        ]);
        assert_eq!(
            text,
            "cannot delete Pods that declare no controller (use --force to override): shop/bare; \
             cannot delete Pods with local storage (use --delete-emptydir-data to override): shop/bare, shop/cache"
        );
    }

    #[test]
    fn timeouts_name_each_pod_and_its_blocker() {
        let report = DrainReport {
            outcome: DrainOutcome::TimedOut,
            elapsed: Duration::from_secs(30),
            nodes: vec![NodeReport {
                node: "n1".into(),
                drained: false,
                phase: Phase::Failed,
                pods: vec![PodReport {
                    pod: PodRef {
                        namespace: "shop".into(),
                        name: "web-1".into(),
                    },
                    owner: None,
                    strategy: Strategy::Evict,
                    tier: Tier::Workload,
                    order: 0,
                    gone: false,
                    gone_after: None,
                    deadline_override: false,
                    blocker: Some(Blocker::Pdb {
                        name: "web".into(),
                        disruptions_allowed: Some(0),
                        message: None,
                    }),
                }],
                ignored: vec![],
                refused: vec![],
                warnings: vec![],
            }],
        };
        let text = summary(&report);
        assert!(
            text.starts_with("error: drain timed out after 30.0s"),
            "{text}"
        );
        assert!(
            text.contains("shop/web-1  evict  PDB web allows 0 disruptions"),
            "{text}"
        );
        assert!(text.contains("Node n1 stays cordoned"), "{text}");
    }
}
