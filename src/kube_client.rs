//! Building a Kubernetes client the way kubectl finds its cluster, with a client-side rate limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use thiserror::Error;
use tower::limit::RateLimitLayer;

/// How to reach the cluster; the same precedence as kubectl.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG", hide_env_values = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no cluster configuration found (tried --kubeconfig, $KUBECONFIG, ~/.kube/config and the in-cluster service account): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Build(#[source] kube::Error),
    #[error("--qps must be a positive number, got {0}")]
    InvalidQps(f64),
}

/// Loads the cluster configuration with kubectl's precedence: `--kubeconfig` (or `$KUBECONFIG`),
/// then `~/.kube/config`, then the in-cluster service account; `--context` picks the context.
pub async fn load_config(args: &ClientArgs) -> Result<Config, ClientError> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let mut config = match &args.kubeconfig {
        Some(path) => from_file(path, &options).await?,
        // A named context only exists in a kubeconfig ($KUBECONFIG or ~/.kube/config).
        None if options.context.is_some() => {
            Config::from_kubeconfig(&options)
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into()),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    // kube retries 429 responses by itself, up to 15 times over minutes. For an eviction a 429 is
    // an answer (a PodDisruptionBudget said no) that the drain engine must see at once, to
    // report it, back off on its own schedule and honour the deadline.
    config.default_retry = false;
    Ok(config)
}

async fn from_file(path: &Path, options: &KubeConfigOptions) -> Result<Config, ClientError> {
    let display = path.display().to_string();
    let raw = Kubeconfig::read_from(path).map_err(|source| ClientError::ReadKubeconfig {
        path: display.clone(),
        source,
    })?;
    Config::from_custom_kubeconfig(raw, options)
        .await
        .map_err(|source| ClientError::Kubeconfig {
            path: display,
            source,
        })
}

/// A client that sends at most `qps` requests per second on average (bursts up to `qps` at the
/// start of each second), so that a drain of hundreds of pods does not trip API Priority and
/// Fairness for everyone else. Watches count once, when they are opened.
pub fn client_with_rate_limit(config: Config, qps: f64) -> Result<Client, ClientError> {
    if !(qps.is_finite() && qps > 0.0) {
        return Err(ClientError::InvalidQps(qps));
    }
    // A fixed window of one second; kube's Buffer in front of this layer queues callers while the
    // window is spent instead of failing them.
    let per_window = qps.ceil().max(1.0) as u64;
    let layer = RateLimitLayer::new(per_window, Duration::from_secs(1));
    let builder = kube::client::ClientBuilder::try_from(config).map_err(ClientError::Build)?;
    Ok(builder.with_layer(&layer).build())
}

/// Loads the configuration and builds a rate-limited client in one step.
pub async fn connect(args: &ClientArgs, qps: f64) -> Result<Client, ClientError> {
    client_with_rate_limit(load_config(args).await?, qps)
}
