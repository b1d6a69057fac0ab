//! The text form of a report: workloads with findings, each followed by its findings (severity,
//! id, then the reason and the fix wrapped under them), then the clean workloads on one line and
//! a summary.

use std::fmt::Write;

use super::{Report, Severity, WorkloadReport};

/// Wrap width of messages and fixes; the indent counts.
const WIDTH: usize = 100;
const INDENT: &str = "           ";

fn wrap(out: &mut String, first_prefix: &str, text: &str) {
    wrap_units(out, first_prefix, text.split_whitespace(), " ");
}

/// Fills lines up to [`WIDTH`] with `units` joined by `separator`, never splitting a unit;
/// continuation lines start with [`INDENT`].
fn wrap_units<'a>(
    out: &mut String,
    first_prefix: &str,
    units: impl IntoIterator<Item = &'a str>,
    separator: &str,
) {
    let mut line = String::from(first_prefix);
    let mut empty = true;
    for unit in units {
        if !empty && line.len() + separator.len() + unit.len() > WIDTH {
            out.push_str(line.trim_end());
            out.push_str(separator.trim_end());
            out.push('\n');
            line = String::from(INDENT);
            empty = true;
        }
        if !empty {
            line.push_str(separator);
        }
        line.push_str(unit);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// `Kind namespace/name`, or `Kind name` for an object outside namespaces (a target group).
fn object(w: &WorkloadReport) -> String {
    if w.namespace.is_empty() {
        format!("{} {}", w.kind, w.name)
    } else {
        format!("{} {}/{}", w.kind, w.namespace, w.name)
    }
}

fn title(w: &WorkloadReport) -> String {
    let mut title = object(w);
    let mut details = Vec::new();
    if let Some(n) = w.replicas {
        match w.kind.as_str() {
            "Pod" | "PodDisruptionBudget" => {}
            "Job" | "CronJob" => details.push(format!("parallelism {n}")),
            "DaemonSet" => details.push(plural(n.max(0) as usize, "pod", "pods")),
            _ => details.push(plural(n.max(0) as usize, "replica", "replicas")),
        }
    }
    if w.critical {
        details.push("critical".to_string());
    }
    if !details.is_empty() {
        let _ = write!(title, " ({})", details.join(", "));
    }
    title
}

fn label(severity: Severity) -> &'static str {
    match severity {
        Severity::Error => "ERROR  ",
        Severity::Warning => "WARNING",
        Severity::Info => "INFO   ",
    }
}

pub(crate) fn render(report: &Report) -> String {
    let mut out = String::new();
    let scope = match (&report.scope.namespace, &report.scope.selector) {
        (Some(ns), Some(sel)) => format!("namespace {ns}, selector {sel}"),
        (Some(ns), None) => format!("namespace {ns}"),
        (None, Some(sel)) => format!("all namespaces, selector {sel}"),
        (None, None) => "all namespaces".to_string(),
    };
    let settings = &report.settings;
    let budget = match settings.deadline_seconds {
        Some(d) => format!("deadline {d} s"),
        None => format!("spot warning {} s", settings.spot_warning_seconds),
    };
    let _ = writeln!(
        out,
        "Drain readiness of {scope} (grace limit {} s = {budget} - {} s margin)\n",
        settings.grace_limit_seconds, settings.margin_seconds
    );
    let mut with_findings: Vec<&WorkloadReport> = report
        .workloads
        .iter()
        .filter(|w| !w.findings.is_empty())
        .collect();
    // Worst first; the report's own order (namespace, kind, name) within a severity.
    with_findings.sort_by_key(|w| std::cmp::Reverse(w.highest_severity()));
    for w in &with_findings {
        let _ = writeln!(out, "{}", title(w));
        for f in &w.findings {
            let _ = writeln!(out, "  {}  {}", label(f.severity), f.id);
            wrap(&mut out, INDENT, &f.message);
            wrap(&mut out, &format!("{INDENT}fix: "), &f.fix);
        }
        out.push('\n');
    }
    let clean: Vec<String> = report
        .workloads
        .iter()
        .filter(|w| w.findings.is_empty())
        .map(object)
        .collect();
    if !clean.is_empty() {
        wrap_units(
            &mut out,
            "No findings: ",
            clean.iter().map(String::as_str),
            ", ",
        );
        out.push('\n');
    }
    for note in &report.notes {
        wrap(&mut out, "Note: ", note);
    }
    let s = &report.summary;
    let _ = writeln!(
        out,
        "{} audited, {} with findings: {}, {}, {}.",
        plural(s.workloads, "workload", "workloads"),
        s.workloads_with_findings,
        plural(s.errors, "error", "errors"),
        plural(s.warnings, "warning", "warnings"),
        plural(s.infos, "info", "info"),
    );
    out
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_with_a_hanging_indent() {
        let mut out = String::new();
        let text = "word ".repeat(40);
        wrap(&mut out, INDENT, &text);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 1);
        assert!(
            lines
                .iter()
                .all(|l| l.len() <= WIDTH && l.starts_with(INDENT))
        );
        // A word longer than the width is never split.
        let mut out = String::new();
        wrap(&mut out, "x: ", &"y".repeat(150));
        assert_eq!(out.lines().count(), 1);
    }
}
