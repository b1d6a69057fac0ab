//! Command-line interface: argument groups shared by the subcommands, and dispatch.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::parse_duration;
use crate::kube_client::ClientArgs;

/// Kubernetes node drain assistant and spot interruption handler.
#[derive(Debug, Parser)]
#[command(name = "nodedrain", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the interruption controller: read AWS events from SQS and drain the affected nodes.
    Controller(Box<crate::config::ControllerArgs>),
    /// Drain nodes now: cordon, then move pods off in policy order, respecting PDBs.
    Drain(DrainArgs),
    /// Show what a drain of these nodes would do and what would block it; changes nothing.
    Plan(PlanArgs),
    /// Make nodes schedulable again and remove nodedrain's taint, label and drain record.
    Uncordon(UncordonArgs),
    /// Report workloads that will break the next drain (single replicas, blocking PDBs, ...).
    Audit(AuditArgs),
    /// Print a shell completion script: `source <(nodedrain completion bash)`.
    Completion(crate::commands::completion::CompletionArgs),
    /// Print nodedrain's version and the Kubernetes API version it was built for.
    Version(crate::commands::version::VersionArgs),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Nodes to drain.
    #[arg(value_name = "NODE")]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Drain the nodes matching this label selector (in addition to those named).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Only drain pods matching this label selector.
    #[arg(long)]
    pub pod_selector: Option<String>,
    /// Give up after this long (0 = wait forever), e.g. 90s, 5m. Without --deadline PDBs are
    /// never overridden: the drain ends with a report of what blocked it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The node goes away at this time (RFC 3339) or after this long (e.g. 2m): pods still
    /// blocked by a PDB when their last safe moment arrives are deleted with the remaining grace.
    #[arg(long)]
    pub deadline: Option<String>,
    /// Grace period in seconds for every pod (-1 = the pod's own).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub grace_period: i64,
    /// Ignore DaemonSet-managed pods.
    #[arg(long)]
    pub ignore_daemonsets: bool,
    /// Continue even if there are pods using emptyDir (their local data is deleted).
    #[arg(long)]
    pub delete_emptydir_data: bool,
    /// Continue even if there are pods that no controller manages.
    #[arg(long)]
    pub force: bool,
    /// Delete pods instead of using the Eviction API (bypasses PodDisruptionBudgets).
    #[arg(long)]
    pub disable_eviction: bool,
    /// Only print what would be done.
    #[arg(long)]
    pub dry_run: bool,
    /// Cluster drain policy file (namespace and label selectors to strategy and order).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Client-side limit on API requests per second (watches count once, when opened).
    #[arg(long, default_value_t = 50.0)]
    pub qps: f64,
    #[command(flatten)]
    pub load_balancers: crate::lb::config::LoadBalancerArgs,
    #[command(flatten)]
    pub aws: crate::config::AwsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Nodes to plan a drain for.
    #[arg(value_name = "NODE", required = true)]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Cluster drain policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Plan as if the node goes away at this time (RFC 3339) or after this long (e.g. 2m).
    #[arg(long)]
    pub deadline: Option<String>,
    /// Only plan for pods matching this label selector.
    #[arg(long)]
    pub pod_selector: Option<String>,
    /// Grace period in seconds for every pod (-1 = the pod's own).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub grace_period: i64,
    /// Plan as `drain --ignore-daemonsets` would.
    #[arg(long)]
    pub ignore_daemonsets: bool,
    /// Plan as `drain --delete-emptydir-data` would.
    #[arg(long)]
    pub delete_emptydir_data: bool,
    /// Plan as `drain --force` would.
    #[arg(long)]
    pub force: bool,
    /// Plan as `drain --disable-eviction` would.
    #[arg(long)]
    pub disable_eviction: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub load_balancers: crate::lb::config::LoadBalancerArgs,
    #[command(flatten)]
    pub aws: crate::config::AwsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UncordonArgs {
    /// Nodes to uncordon.
    #[arg(value_name = "NODE", required = true)]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    /// Exit non-zero when any finding is a warning or an error.
    Warning,
    /// Exit non-zero only for errors.
    Error,
    /// Always exit zero when the report could be made.
    Never,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only this namespace (default: the kubeconfig context's namespace, like kubectl).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Only workloads whose pods match this label selector.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Cluster drain policy file, as for `drain`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Exit status 1 when findings of this severity or worse exist (for CI gates).
    #[arg(long, value_enum, default_value = "error")]
    pub fail_on: FailOn,
    /// Judge grace periods against this deadline (e.g. an ASG lifecycle hook's 5m heartbeat)
    /// instead of the 2-minute spot warning.
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Client-side limit on API requests per second (a fixed one-second window: at most this
    /// many at once, then the rest of the second waits).
    #[arg(long, default_value_t = 50.0)]
    pub qps: f64,
    // Target groups to audit besides those of TargetGroupBindings.
    #[command(flatten)]
    pub lb: crate::lb::config::LoadBalancerArgs,
    // Where ELBv2 is; without a region the ELBv2 checks are skipped (the report says so).
    #[command(flatten)]
    pub aws: crate::config::AwsArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
