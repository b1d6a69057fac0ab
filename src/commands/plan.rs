//! `nodedrain plan`: what a drain would do and what would block it; changes nothing.

use std::process::ExitCode;

use jiff::Timestamp;

use super::drain::{PlanFlags, load_policy, parse_deadline, plan_options};
use crate::cli::{OutputFormat, PlanArgs};
use crate::drain::execute::{DrainConfig, Drainer};
use crate::kube_client;
use crate::lb::discover::LoadBalancers;
use crate::render;

/// Requests per second for planning: a handful of lists, so the limit hardly matters.
const PLAN_QPS: f64 = 50.0;

pub async fn run(args: PlanArgs) -> ExitCode {
    let output = args.output;
    match plan(args).await {
        Ok(code) => code,
        Err(message) => {
            if output == OutputFormat::Json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn plan(args: PlanArgs) -> Result<ExitCode, String> {
    let deadline = parse_deadline(args.deadline.as_deref(), Timestamp::now())?;
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
    let client = kube_client::connect(&args.client, PLAN_QPS)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let load_balancers =
        LoadBalancers::connect(client.clone(), &args.load_balancers, &args.aws).await;
    let unchecked = load_balancers.as_ref().err().cloned();
    let drainer =
        Drainer::new(client, DrainConfig::default()).with_load_balancers(load_balancers.ok());
    let mut plans = drainer
        .plan(&args.nodes, &options, &policy, deadline)
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
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": plans }))
                .unwrap_or_default()
        ),
        OutputFormat::Text => print!("{}", render::plans(&plans)),
    }
    Ok(ExitCode::SUCCESS)
}
