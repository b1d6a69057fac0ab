//! `nodedrain drain`: kubectl drain's flags on nodedrain's engine, with live progress.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use tokio::sync::mpsc;

use crate::cli::{DrainArgs, OutputFormat};
use crate::config::parse_duration;
use crate::drain::execute::{DrainConfig, DrainRequest, Drainer};
use crate::drain::plan::{DaemonSetHandling, PlanOptions};
use crate::drain::policy::{ClusterPolicy, parse_label_selector};
use crate::drain::report::{PodChange, ProgressEvent};
use crate::kube_client;
use crate::lb::discover::LoadBalancers;
use crate::render;

/// The flags that shape a plan, shared by `drain` and `plan`.
pub(crate) struct PlanFlags<'a> {
    pub pod_selector: Option<&'a str>,
    pub grace_period: i64,
    pub ignore_daemonsets: bool,
    pub delete_emptydir_data: bool,
    pub force: bool,
    pub disable_eviction: bool,
    pub deadline: Option<Timestamp>,
}

/// kubectl drain's semantics: without `--ignore-daemonsets` DaemonSet pods refuse the drain.
/// A drain with a deadline is involuntary: the node goes away whatever PDBs say.
pub(crate) fn plan_options(flags: PlanFlags<'_>) -> Result<PlanOptions, String> {
    let pod_selector = flags
        .pod_selector
        .map(parse_label_selector)
        .transpose()
        .map_err(|e| format!("--pod-selector: {e}"))?;
    Ok(PlanOptions {
        daemonsets: if flags.ignore_daemonsets {
            DaemonSetHandling::Ignore
        } else {
            DaemonSetHandling::Refuse
        },
        delete_emptydir_data: flags.delete_emptydir_data,
        force: flags.force,
        disable_eviction: flags.disable_eviction,
        grace_period_override: (flags.grace_period >= 0).then_some(flags.grace_period),
        voluntary: flags.deadline.is_none(),
        pod_selector,
        ..PlanOptions::default()
    })
}

pub(crate) fn load_policy(path: Option<&Path>) -> Result<ClusterPolicy, String> {
    let Some(path) = path else {
        return Ok(ClusterPolicy::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
    ClusterPolicy::from_yaml(&text).map_err(|e| format!("policy file {}: {e}", path.display()))
}

/// `--deadline`: an RFC 3339 time, or a duration from now (`2m`, `90s`).
pub(crate) fn parse_deadline(
    text: Option<&str>,
    now: Timestamp,
) -> Result<Option<Timestamp>, String> {
    let Some(text) = text else {
        return Ok(None);
    };
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(Some(at));
    }
    let after = parse_duration(text).map_err(|e| {
        format!("--deadline {text:?}: neither an RFC 3339 time nor a duration ({e})")
    })?;
    let after = jiff::SignedDuration::try_from(after).map_err(|e| format!("--deadline: {e}"))?;
    now.checked_add(after)
        .map(Some)
        .map_err(|e| format!("--deadline: {e}"))
}

/// Nodes named on the command line plus those matching `--selector`, in that order.
pub(crate) async fn resolve_nodes(
    client: &kube::Client,
    named: &[String],
    selector: Option<&str>,
) -> Result<Vec<String>, String> {
    let mut nodes = named.to_vec();
    if let Some(selector) = selector {
        let api: Api<Node> = Api::all(client.clone());
        let listed = api
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| {
                format!(
                    "cannot list nodes matching {selector:?}: {}",
                    crate::node::describe_api_error(&e)
                )
            })?;
        for node in listed.items {
            if let Some(name) = node.metadata.name
                && !nodes.contains(&name)
            {
                nodes.push(name);
            }
        }
        if nodes.is_empty() {
            return Err(format!("no nodes match --selector {selector:?}"));
        }
    }
    if nodes.is_empty() {
        return Err("no nodes given: name them or use --selector".to_string());
    }
    Ok(nodes)
}

fn fail(output: OutputFormat, message: &str) -> ExitCode {
    if output == OutputFormat::Json {
        println!("{}", serde_json::json!({ "error": message }));
    }
    eprintln!("{message}");
    ExitCode::FAILURE
}

pub async fn run(args: DrainArgs) -> ExitCode {
    let output = args.output;
    match drain(args).await {
        Ok(code) => code,
        Err(message) => fail(output, &message),
    }
}

async fn drain(args: DrainArgs) -> Result<ExitCode, String> {
    let now = Timestamp::now();
    let deadline = parse_deadline(args.deadline.as_deref(), now)?;
    let options = plan_options(PlanFlags {
        pod_selector: args.pod_selector.as_deref(),
        grace_period: args.grace_period,
        ignore_daemonsets: args.ignore_daemonsets,
        delete_emptydir_data: args.delete_emptydir_data,
        force: args.force,
        disable_eviction: args.disable_eviction,
        deadline,
    })?;
    let policy = load_policy(args.policy.as_deref())?;
    let client = kube_client::connect(&args.client, args.qps)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let nodes = resolve_nodes(&client, &args.nodes, args.selector.as_deref())
        .await
        .map_err(|e| format!("error: {e}"))?;
    let load_balancers =
        LoadBalancers::connect(client.clone(), &args.load_balancers, &args.aws).await;
    let unchecked = load_balancers.as_ref().err().cloned();
    let drainer =
        Drainer::new(client, DrainConfig::default()).with_load_balancers(load_balancers.ok());

    if args.dry_run {
        let mut plans = drainer
            .plan(&nodes, &options, &policy, deadline)
            .await
            .map_err(|e| render::error(&e))?;
        if let Some(reason) = &unchecked {
            for plan in &mut plans {
                plan.plan.load_balancers_unchecked = Some(reason.clone());
            }
        }
        match args.output {
            OutputFormat::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"dryRun": true, "nodes": plans}))
                    .unwrap_or_default()
            ),
            OutputFormat::Text => {
                print!("{}", render::plans(&plans));
                println!("(dry run: nothing was cordoned or evicted)");
            }
        }
        let refused = plans.iter().any(|p| !p.plan.refused.is_empty());
        return Ok(if refused {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }

    let mut request = DrainRequest::new(options);
    request.deadline = deadline;
    request.policy = policy;
    request.timeout = (!args.timeout.is_zero()).then_some(args.timeout);
    let cancel = request.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
        }
    });

    let (sender, receiver) = mpsc::channel(1024);
    let several = nodes.len() > 1;
    let display = match args.output {
        OutputFormat::Json => tokio::spawn(discard(receiver)),
        OutputFormat::Text if std::io::stdout().is_terminal() => {
            tokio::spawn(live(receiver, several))
        }
        OutputFormat::Text => tokio::spawn(lines(receiver, several)),
    };
    let result = drainer.drain(&nodes, request, sender).await;
    let _ = display.await;
    let report = result.map_err(|e| render::error(&e))?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        OutputFormat::Text => {
            let text = render::summary(&report);
            if report.is_success() {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
        }
    }
    Ok(if report.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn discard(mut receiver: mpsc::Receiver<ProgressEvent>) {
    while receiver.recv().await.is_some() {}
}

/// One line per event: for pipes, CI logs and `| grep`.
async fn lines(mut receiver: mpsc::Receiver<ProgressEvent>, several: bool) {
    while let Some(event) = receiver.recv().await {
        println!("{}", render::progress_line(&event, several));
    }
}

/// A progress bar per node on a terminal, with each pod's changes printed above the bars.
async fn live(mut receiver: mpsc::Receiver<ProgressEvent>, several: bool) {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{spinner:.cyan} {prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {kubectl_elapsed:>6} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "kubectl_elapsed",
        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&super::progress::kubectl_duration(state.elapsed()));
        },
    )
    .progress_chars("=> ");
    let mut bars: Vec<(String, ProgressBar)> = Vec::new();
    let mut progress: std::collections::HashMap<String, super::progress::NodeProgress> =
        std::collections::HashMap::new();
    let mut bar_for = |multi: &MultiProgress, node: &str| -> ProgressBar {
        if let Some((_, bar)) = bars.iter().find(|(n, _)| n == node) {
            return bar.clone();
        }
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style.clone());
        bar.set_prefix(node.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bars.push((node.to_string(), bar.clone()));
        bar
    };
    while let Some(event) = receiver.recv().await {
        let line = render::progress_line(&event, several);
        match &event {
            ProgressEvent::Cordoned { node } => {
                bar_for(&multi, node).set_message("cordoned");
            }
            ProgressEvent::Planned { node, steps, .. } => {
                let bar = bar_for(&multi, node);
                bar.set_length(*steps as u64);
                bar.set_message("draining");
            }
            ProgressEvent::Pod { node, pod, change } => {
                let bar = bar_for(&multi, node);
                if let PodChange::Gone { .. } = change {
                    bar.inc(1);
                }
                // What blocks the drain now, not the last blocker reported.
                let now = progress.entry(node.clone()).or_default();
                now.apply(pod, change);
                bar.set_message(now.message().unwrap_or_else(|| "draining".to_string()));
                let _ = multi.println(&line);
            }
            ProgressEvent::NodeDrained { node, .. } => {
                bar_for(&multi, node).finish_with_message("drained");
            }
            ProgressEvent::Refused { .. } | ProgressEvent::Warning { .. } => {
                let _ = multi.println(&line);
            }
        }
    }
    for (_, bar) in &bars {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_times_or_durations() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(parse_deadline(None, now), Ok(None));
        assert_eq!(
            parse_deadline(Some("2m"), now),
            Ok(Some("2026-01-01T00:02:00Z".parse().unwrap()))
        );
        assert_eq!(
            parse_deadline(Some("2026-01-01T00:05:00Z"), now),
            Ok(Some("2026-01-01T00:05:00Z".parse().unwrap()))
        );
        assert!(parse_deadline(Some("soon"), now).is_err());
    }

    #[test]
    fn flags_mean_what_they_mean_in_kubectl() {
        let options = plan_options(PlanFlags {
            pod_selector: Some("app=web"),
            grace_period: -1,
            ignore_daemonsets: false,
            delete_emptydir_data: true,
            force: false,
            disable_eviction: false,
            deadline: None,
        })
        .unwrap();
        assert_eq!(options.daemonsets, DaemonSetHandling::Refuse);
        assert_eq!(options.grace_period_override, None);
        assert!(options.voluntary && options.delete_emptydir_data);
        let involuntary = plan_options(PlanFlags {
            pod_selector: None,
            grace_period: 5,
            ignore_daemonsets: true,
            delete_emptydir_data: false,
            force: true,
            disable_eviction: false,
            deadline: Some(Timestamp::now()),
        })
        .unwrap();
        assert!(!involuntary.voluntary);
        assert_eq!(involuntary.grace_period_override, Some(5));
        assert!(
            plan_options(PlanFlags {
                pod_selector: Some("a in ("),
                grace_period: -1,
                ignore_daemonsets: false,
                delete_emptydir_data: false,
                force: false,
                disable_eviction: false,
                deadline: None,
            })
            .is_err()
        );
    }
}
