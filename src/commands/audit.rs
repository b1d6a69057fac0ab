//! `nodedrain audit`: list the workloads once, audit them (pure), print, and map the findings to
//! the exit status `--fail-on` asks for. Never writes to the cluster.
//!
//! Exit status: 0 when the report has nothing at or above `--fail-on`, 1 when it has, 2 when no
//! report could be made (bad arguments, policy file, kubeconfig or connection).

use std::process::ExitCode;

use crate::audit::{self, AuditConfig, AuditScope, Severity};
use crate::cli::{AuditArgs, FailOn, OutputFormat};
use crate::drain::policy::{ClusterPolicy, parse_label_selector};

const FINDINGS: u8 = 1;
const UNUSABLE: u8 = 2;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("nodedrain: {message}");
    ExitCode::from(UNUSABLE)
}

/// The severity `--fail-on` trips at; `None` never trips.
pub fn threshold(fail_on: FailOn) -> Option<Severity> {
    match fail_on {
        FailOn::Warning => Some(Severity::Warning),
        FailOn::Error => Some(Severity::Error),
        FailOn::Never => None,
    }
}

fn config(args: &AuditArgs) -> Result<AuditConfig, String> {
    let selector = args
        .selector
        .as_deref()
        .map(parse_label_selector)
        .transpose()
        .map_err(|e| format!("--selector: {e}"))?;
    let policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --policy {}: {e}", path.display()))?;
            ClusterPolicy::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => ClusterPolicy::default(),
    };
    Ok(AuditConfig {
        deadline: args.deadline,
        policy,
        selector,
        selector_text: args.selector.clone(),
        ..AuditConfig::default()
    })
}

pub async fn run(args: AuditArgs) -> ExitCode {
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => return fail(message),
    };
    let aws = match audit::aws_access(&args.aws, |name| std::env::var(name).ok()) {
        Ok(aws) => aws,
        Err(e) => return fail(e),
    };
    let client = match crate::kube_client::connect(&args.client, args.qps).await {
        Ok(client) => client,
        Err(e) => return fail(e),
    };
    let scope = AuditScope {
        namespace: if args.all_namespaces {
            None
        } else {
            // Like kubectl: the context's namespace, else `default`.
            Some(
                args.namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_string()),
            )
        },
    };
    let mut inventory = match audit::collect(&client, &scope).await {
        Ok(inventory) => inventory,
        Err(e) => return fail(e),
    };
    inventory.load_balancers =
        audit::collect_load_balancers(&client, &scope, &args.lb, &aws, &mut inventory.notes).await;
    let report = audit::audit(&inventory, &config);
    match args.output {
        OutputFormat::Text => print!("{}", report.to_text()),
        OutputFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(format!("cannot serialise the report: {e}")),
        },
    }
    match threshold(args.fail_on) {
        Some(severity) if report.has_findings_at_or_above(severity) => ExitCode::from(FINDINGS),
        _ => ExitCode::SUCCESS,
    }
}
