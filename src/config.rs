//! The controller's configuration: flags with `NODEDRAIN_*` environment fallbacks (clap), grouped
//! by concern, and [`ControllerArgs::validate`], which turns them into a typed
//! [`ControllerConfig`] or an error that names the flag, its variable and what to change.
//!
//! Syntax (unknown enum values, unparseable durations or addresses) is rejected by clap while
//! parsing, with the list of accepted values; `validate` checks meaning and combinations (a queue
//! URL SQS would reject, no region, lease timings that cannot work). docs/configuration.md lists
//! every setting; keep both in step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, ValueEnum};

use crate::drain::policy::parse_label_selector;
use crate::interruption::sqs::{IntakeConfig, MalformedPolicy};
use crate::kube_client::ClientArgs;
use crate::resolve::ManagedTag;

/// SQS refuses visibility timeouts above 12 hours.
const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// Below this, an extension (sent at half the timeout) could arrive after the message already
/// became visible again on a slow network, and another receiver would get it.
const MIN_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(10);
/// Auto Scaling keeps an instance in Terminating:Wait at most 48 hours, whatever the heartbeats.
const MAX_ASG_DRAIN_TIMEOUT: Duration = Duration::from_secs(48 * 3600);
/// A spot warning gives two minutes; a margin that large leaves no time to drain at all.
const MAX_DEADLINE_MARGIN: Duration = Duration::from_secs(119);
/// More receivers than this only add empty long polls: each already takes 10 messages a call.
const MAX_RECEIVERS: usize = 64;

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub behaviour: BehaviourArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub notify: crate::notify::NotifyArgs,
    #[command(flatten)]
    pub load_balancers: crate::lb::config::LoadBalancerArgs,
}

/// Kubernetes API client limits.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes API")]
pub struct KubeArgs {
    /// Client-side limit on API requests per second. A burst of interruptions needs several
    /// requests per node (cordon, record, evictions); too low a limit is what made other
    /// handlers take minutes to cordon 50 nodes.
    #[arg(long = "qps", env = "NODEDRAIN_QPS", default_value_t = 100.0)]
    pub qps: f64,
    /// A separate budget, in requests per second, for cordoning nodes (one patch per node), so
    /// that the evictions of running drains never hold a cordon back. A burst of this many
    /// interruptions is cordoned within the same second.
    #[arg(
        long = "cordon-qps",
        env = "NODEDRAIN_CORDON_QPS",
        default_value_t = 250.0
    )]
    pub cordon_qps: f64,
}

/// Where interruptions come from.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "SQS queue")]
pub struct QueueArgs {
    /// URL of the SQS queue the EventBridge rules (and ASG hooks) deliver to, e.g.
    /// https://sqs.us-east-1.amazonaws.com/123456789012/nodedrain.
    #[arg(long, env = "NODEDRAIN_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Concurrent long-polling receivers; each takes up to 10 messages per call.
    #[arg(long, env = "NODEDRAIN_RECEIVERS", default_value_t = 4)]
    pub receivers: usize,
    /// How long a message being handled stays invisible to other receivers; nodedrain extends it
    /// to this, at half this period, for as long as it is handling the message. (The receive
    /// itself asks for a short timeout, so an answer lost on the network hides nothing for long.)
    #[arg(long, env = "NODEDRAIN_VISIBILITY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub visibility_timeout: Duration,
    /// What to do with messages that cannot be parsed or are of an unknown type: delete them, or
    /// leave them for the queue's redrive policy to move to a dead-letter queue.
    #[arg(long, env = "NODEDRAIN_MALFORMED_MESSAGES", value_enum, default_value_t = MalformedMessages::Delete)]
    pub malformed_messages: MalformedMessages,
    /// Redeliveries of an (event, instance) pair already handled within this window are deleted
    /// without acting again (0 disables).
    #[arg(long, env = "NODEDRAIN_DEDUPE_WINDOW", default_value = "15m", value_parser = parse_duration)]
    pub dedupe_window: Duration,
}

/// How to reach AWS.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "AWS")]
pub struct AwsArgs {
    /// AWS region of the queue, the instances and the load balancers (default: $AWS_REGION,
    /// $AWS_DEFAULT_REGION, then, for the controller, the region named in the queue URL).
    #[arg(long, env = "NODEDRAIN_AWS_REGION")]
    pub aws_region: Option<String>,
    /// Endpoint for every AWS service (SQS, EC2, Auto Scaling) instead of the public one; for
    /// VPC endpoints and for tests against a local emulator.
    #[arg(long, env = "NODEDRAIN_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
}

/// Leader election: only the holder of the Lease acts; the other replicas stand by.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Leader election")]
pub struct LeaseArgs {
    /// Elect a leader through a coordination.k8s.io Lease. Turn off only for a single replica.
    #[arg(long, env = "NODEDRAIN_LEADER_ELECT", action = ArgAction::Set, default_value_t = true)]
    pub leader_elect: bool,
    /// Name of the Lease object.
    #[arg(long, env = "NODEDRAIN_LEASE_NAME", default_value = "nodedrain")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the namespace of the kubeconfig context or the pod).
    #[arg(long, env = "NODEDRAIN_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// A standby takes over this long after the leader's last renewal.
    #[arg(long, env = "NODEDRAIN_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long. It notices within one retry
    /// period, so renew deadline + retry period must be shorter than the lease duration: then it
    /// stops acting before a standby may start.
    #[arg(long, env = "NODEDRAIN_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,
    /// How often the leader renews and a standby retries.
    #[arg(long, env = "NODEDRAIN_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,
    /// This replica's name in the Lease (default: the pod name, else hostname and process id).
    /// Set it from the downward API (`metadata.name`).
    #[arg(long, env = "NODEDRAIN_POD_NAME")]
    pub identity: Option<String>,
}

/// The admin server.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admin server")]
pub struct AdminArgs {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "NODEDRAIN_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
}

/// What to do for each kind of event.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Behaviour")]
pub struct BehaviourArgs {
    /// What a rebalance recommendation does: only cordon the node, drain it (PDBs always
    /// respected), or drain it, surging the single replicas a PDB holds, and hand it to Karpenter.
    #[arg(long, env = "NODEDRAIN_REBALANCE", value_enum, default_value_t = RebalanceMode::CordonOnly)]
    pub rebalance: RebalanceMode,
    /// A node still alive this long after a rebalance recommendation is uncordoned and cleaned
    /// up (0 = never).
    #[arg(long, env = "NODEDRAIN_REBALANCE_UNCORDON_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub rebalance_uncordon_after: Duration,
    /// When an interruption names an instance that is no node of this cluster: delete the
    /// message, or leave it to be retried after the visibility timeout (a node that has not
    /// registered yet).
    #[arg(long, env = "NODEDRAIN_NODE_NOT_FOUND", value_enum, default_value_t = NodeNotFound::Delete)]
    pub node_not_found: NodeNotFound,
    /// Deadline for an Auto Scaling terminate hook, whose message carries none; past it PDBs are
    /// overridden and the hook is completed. Keep it below the hook's heartbeat timeout times
    /// the heartbeats nodedrain sends (at most 48h in all).
    #[arg(long, env = "NODEDRAIN_ASG_DRAIN_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub asg_drain_timeout: Duration,
    /// Safety margin before a deadline: a pod gets SIGTERM no later than
    /// deadline - its grace period - this margin.
    #[arg(long, env = "NODEDRAIN_DEADLINE_MARGIN", default_value = "10s", value_parser = parse_duration)]
    pub deadline_margin: Duration,
    /// Only act on instances carrying this EC2 tag (`key` or `key=value`); others are deleted
    /// from the queue untouched. Useful when several clusters share an account and a queue.
    #[arg(long, env = "NODEDRAIN_MANAGED_TAG")]
    pub managed_tag: Option<String>,
    /// After draining a Karpenter node (label karpenter.sh/nodepool), delete its NodeClaim so
    /// Karpenter replaces the capacity.
    #[arg(long, env = "NODEDRAIN_KARPENTER_HANDOFF", action = ArgAction::Set, default_value_t = true)]
    pub karpenter_handoff: bool,
    /// Once EC2 reports an interrupted node's instance `shutting-down`, `terminated` or `stopped`
    /// (checked from the deadline on), taint the node
    /// `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`, so its pods are deleted and
    /// their volumes detached without waiting for the dead kubelet. Never on a running instance.
    #[arg(long, env = "NODEDRAIN_OUT_OF_SERVICE_TAINT", action = ArgAction::Set, default_value_t = false)]
    pub out_of_service_taint: bool,
    /// Cluster drain policy file (namespace and label selectors to strategy and order).
    #[arg(long, env = "NODEDRAIN_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Only manage nodes matching this label selector (kubectl syntax, e.g.
    /// `karpenter.sh/capacity-type=spot`). Other nodes are not watched, not resumed and not
    /// drained: an interruption for their instances counts as "node not found".
    #[arg(long, env = "NODEDRAIN_NODE_SELECTOR", value_name = "SELECTOR")]
    pub node_selector: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log format: JSON lines (for the cluster), text (for a terminal), or auto (JSON unless
    /// stderr is a terminal).
    #[arg(long, env = "NODEDRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MalformedMessages {
    /// Delete them (after logging and counting).
    Delete,
    /// Leave them in the queue: after maxReceiveCount receives, the queue's redrive policy moves
    /// them to its dead-letter queue. Without a redrive policy they come back until retention.
    DeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RebalanceMode {
    /// Cordon and taint only; running pods stay.
    CordonOnly,
    /// Drain as a voluntary drain: PDBs are never overridden.
    Drain,
    /// Drain; a single-replica Deployment pod is surged instead of waited on or taken down.
    /// Then hand the empty node over to Karpenter (delete its NodeClaim).
    DrainAndHandover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeNotFound {
    /// Retry after the visibility timeout, until the queue's redrive policy or retention ends it.
    Retry,
    /// Delete the message: the instance is not part of this cluster.
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// The validated configuration, in the types each component takes.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub client: ClientArgs,
    /// Invariant: finite and positive.
    pub qps: f64,
    /// Invariant: finite and positive.
    pub cordon_qps: f64,
    pub intake: IntakeConfig,
    pub aws: AwsConfig,
    /// `None` when leader election is off (`--leader-elect=false`): this replica always acts.
    pub lease: Option<LeaseSettings>,
    pub admin_addr: SocketAddr,
    pub behaviour: Behaviour,
    pub log_format: LogFormat,
    /// `None`: no webhook notifications.
    pub notify: Option<crate::notify::NotifyConfig>,
    pub load_balancers: crate::lb::config::LoadBalancerArgs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub region: String,
    pub endpoint_url: Option<String>,
}

impl AwsConfig {
    /// The SDK configuration for SQS, EC2 and Auto Scaling clients: this region and endpoint,
    /// credentials from the standard chain (IRSA / Pod Identity in a cluster).
    pub async fn load(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()));
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        loader.load().await
    }
}

/// Lease settings; the namespace may still be unknown until a client exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    /// `None`: the client's default namespace (kubeconfig context, or the pod's namespace).
    pub namespace: Option<String>,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// The elector's configuration, given the namespace to fall back to.
    pub fn into_lease_config(self, default_namespace: &str) -> LeaseConfig {
        LeaseConfig {
            name: self.name,
            namespace: self
                .namespace
                .unwrap_or_else(|| default_namespace.to_string()),
            identity: self.identity,
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    pub rebalance: RebalanceMode,
    /// `None`: never uncordon a node that survived a rebalance recommendation.
    pub rebalance_uncordon_after: Option<Duration>,
    pub node_not_found: NodeNotFound,
    pub asg_drain_timeout: Duration,
    pub deadline_margin: Duration,
    pub managed_tag: Option<ManagedTag>,
    pub karpenter_handoff: bool,
    pub out_of_service_taint: bool,
    pub policy: Option<PathBuf>,
    /// Checked to parse; passed to the apiserver as written.
    pub node_selector: Option<String>,
}

/// A setting that cannot work, with the flag and variable that set it and what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no queue URL: set --queue-url or NODEDRAIN_QUEUE_URL to the SQS queue your EventBridge rules deliver to (https://sqs.<region>.amazonaws.com/<account id>/<queue name>)"
    )]
    MissingQueueUrl,
    #[error("--queue-url / NODEDRAIN_QUEUE_URL {url:?} is not an SQS queue URL: {problem}")]
    InvalidQueueUrl { url: String, problem: String },
    #[error(
        "no AWS region: set --aws-region (NODEDRAIN_AWS_REGION) or AWS_REGION, or use a queue URL that names its region (https://sqs.<region>.amazonaws.com/...)"
    )]
    MissingRegion,
    #[error("AWS region {region:?} is not a region name like us-east-1 ({source_name})")]
    InvalidRegion {
        region: String,
        source_name: &'static str,
    },
    #[error(
        "the queue URL names region {queue_region:?} but the AWS region is {region:?}: SQS answers only in the queue's region; fix --aws-region / NODEDRAIN_AWS_REGION / AWS_REGION or the URL"
    )]
    RegionMismatch {
        region: String,
        queue_region: String,
    },
    #[error(
        "--aws-endpoint-url / NODEDRAIN_AWS_ENDPOINT_URL {0:?} must start with http:// or https://"
    )]
    InvalidEndpoint(String),
    #[error("--qps / NODEDRAIN_QPS must be a positive number, got {0}")]
    InvalidQps(f64),
    #[error("--cordon-qps / NODEDRAIN_CORDON_QPS must be a positive number, got {0}")]
    InvalidCordonQps(f64),
    #[error("--node-selector / NODEDRAIN_NODE_SELECTOR {value:?}: {problem}")]
    InvalidNodeSelector { value: String, problem: String },
    #[error("--receivers / NODEDRAIN_RECEIVERS must be between 1 and {MAX_RECEIVERS}, got {0}")]
    InvalidReceivers(usize),
    #[error(
        "--visibility-timeout / NODEDRAIN_VISIBILITY_TIMEOUT must be whole seconds between 10s and 12h (SQS limits), got {0}"
    )]
    InvalidVisibilityTimeout(String),
    #[error(
        "--lease-name / NODEDRAIN_LEASE_NAME {0:?} is not a valid object name (lowercase letters, digits, '-' and '.')"
    )]
    InvalidLeaseName(String),
    #[error(
        "lease timings cannot work: need --lease-renew-deadline ({renew}) > --lease-retry-period ({retry}) > 0"
    )]
    InvalidLeaseTimings { renew: String, retry: String },
    /// A leader that stops renewing keeps acting until its next attempt runs past the renew
    /// deadline: up to renew deadline + retry period after its last renewal.
    #[error(
        "lease timings allow two leaders at once: lease duration must exceed renew deadline + retry period, got --lease-duration {duration} (as whole seconds in the Lease) <= --lease-renew-deadline {renew} + --lease-retry-period {retry}"
    )]
    LeaseShorterThanStepDown {
        duration: String,
        renew: String,
        retry: String,
    },
    #[error("--identity / NODEDRAIN_POD_NAME must not be empty")]
    EmptyIdentity,
    #[error(
        "--asg-drain-timeout / NODEDRAIN_ASG_DRAIN_TIMEOUT must be between 1s and 48h (Auto Scaling's limit for a lifecycle hook), got {0}"
    )]
    InvalidAsgDrainTimeout(String),
    #[error(
        "--deadline-margin / NODEDRAIN_DEADLINE_MARGIN must be below 2m (a spot warning's whole notice), got {0}"
    )]
    InvalidDeadlineMargin(String),
    #[error("--managed-tag / NODEDRAIN_MANAGED_TAG {value:?}: {problem}")]
    InvalidManagedTag { value: String, problem: String },
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
}

/// Human form of a duration for error messages, e.g. `1m 30s`.
fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl ControllerArgs {
    /// Validates against the process environment (for `AWS_REGION`, `AWS_DEFAULT_REGION`,
    /// `HOSTNAME`) and this process id.
    pub fn validate(&self) -> Result<ControllerConfig, ConfigError> {
        self.validate_with(|key| std::env::var(key).ok(), std::process::id())
    }

    /// [`validate`](Self::validate) with the environment and process id as parameters, so it is
    /// a pure function for tests.
    pub fn validate_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
        pid: u32,
    ) -> Result<ControllerConfig, ConfigError> {
        let qps = self.kube.qps;
        if !(qps.is_finite() && qps > 0.0) {
            return Err(ConfigError::InvalidQps(qps));
        }
        let cordon_qps = self.kube.cordon_qps;
        if !(cordon_qps.is_finite() && cordon_qps > 0.0) {
            return Err(ConfigError::InvalidCordonQps(cordon_qps));
        }
        let queue_url = self
            .queue
            .queue_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or(ConfigError::MissingQueueUrl)?;
        let queue = parse_queue_url(queue_url).map_err(|problem| ConfigError::InvalidQueueUrl {
            url: queue_url.to_string(),
            problem,
        })?;
        let aws = self.aws(&queue, &env)?;
        let intake = self.intake(queue_url)?;
        let lease = self.lease(&env, pid)?;
        let behaviour = self.behaviour()?;
        let notify = self.notify.validate()?;
        Ok(ControllerConfig {
            client: self.client.clone(),
            qps,
            cordon_qps,
            intake,
            aws,
            lease,
            admin_addr: self.admin.admin_addr,
            behaviour,
            log_format: self.log.log_format,
            notify,
            load_balancers: self.load_balancers.clone(),
        })
    }

    fn aws(
        &self,
        queue: &QueueUrl,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<AwsConfig, ConfigError> {
        let nonempty =
            |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let (region, source_name) = if let Some(r) = nonempty(self.aws.aws_region.clone()) {
            (r, "--aws-region / NODEDRAIN_AWS_REGION")
        } else if let Some(r) = nonempty(env("AWS_REGION")) {
            (r, "AWS_REGION")
        } else if let Some(r) = nonempty(env("AWS_DEFAULT_REGION")) {
            (r, "AWS_DEFAULT_REGION")
        } else if let Some(r) = &queue.region {
            (r.clone(), "the queue URL")
        } else {
            return Err(ConfigError::MissingRegion);
        };
        if !is_region_like(&region) {
            return Err(ConfigError::InvalidRegion {
                region,
                source_name,
            });
        }
        if let Some(queue_region) = &queue.region
            && *queue_region != region
        {
            return Err(ConfigError::RegionMismatch {
                region,
                queue_region: queue_region.clone(),
            });
        }
        let endpoint_url = match self.aws.aws_endpoint_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u.to_string()),
            Some(u) => return Err(ConfigError::InvalidEndpoint(u.to_string())),
        };
        Ok(AwsConfig {
            region,
            endpoint_url,
        })
    }

    fn intake(&self, queue_url: &str) -> Result<IntakeConfig, ConfigError> {
        let q = &self.queue;
        if q.receivers == 0 || q.receivers > MAX_RECEIVERS {
            return Err(ConfigError::InvalidReceivers(q.receivers));
        }
        let vt = q.visibility_timeout;
        if vt < MIN_VISIBILITY_TIMEOUT || vt > MAX_VISIBILITY_TIMEOUT || vt.subsec_nanos() != 0 {
            return Err(ConfigError::InvalidVisibilityTimeout(show(vt)));
        }
        let mut intake = IntakeConfig::new(queue_url);
        intake.receivers = q.receivers;
        intake.visibility_timeout = vt;
        intake.malformed = match q.malformed_messages {
            MalformedMessages::Delete => MalformedPolicy::Delete,
            MalformedMessages::DeadLetter => MalformedPolicy::DeadLetter,
        };
        intake.dedupe_ttl = q.dedupe_window;
        Ok(intake)
    }

    fn lease(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        pid: u32,
    ) -> Result<Option<LeaseSettings>, ConfigError> {
        let l = &self.lease;
        if !l.leader_elect {
            return Ok(None);
        }
        if !is_object_name(&l.lease_name) {
            return Err(ConfigError::InvalidLeaseName(l.lease_name.clone()));
        }
        let (d, r, p) = (
            l.lease_duration,
            l.lease_renew_deadline,
            l.lease_retry_period,
        );
        if r <= p || p.is_zero() {
            return Err(ConfigError::InvalidLeaseTimings {
                renew: show(r),
                retry: show(p),
            });
        }
        // Standbys read the duration from the Lease, which holds whole seconds.
        if Duration::from_secs(lease_seconds(d)) <= r + p {
            return Err(ConfigError::LeaseShorterThanStepDown {
                duration: show(d),
                renew: show(r),
                retry: show(p),
            });
        }
        let identity = match &l.identity {
            Some(id) if id.trim().is_empty() => return Err(ConfigError::EmptyIdentity),
            Some(id) => id.trim().to_string(),
            // Outside a pod several processes may share a hostname (a laptop running two
            // replicas for a test); the pid keeps their identities apart.
            None => {
                let host = env("HOSTNAME")
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "nodedrain".to_string());
                format!("{host}-{pid}")
            }
        };
        let namespace = l
            .lease_namespace
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        Ok(Some(LeaseSettings {
            name: l.lease_name.clone(),
            namespace,
            identity,
            lease_duration: d,
            renew_deadline: r,
            retry_period: p,
        }))
    }

    fn behaviour(&self) -> Result<Behaviour, ConfigError> {
        let b = &self.behaviour;
        if b.asg_drain_timeout < Duration::from_secs(1)
            || b.asg_drain_timeout > MAX_ASG_DRAIN_TIMEOUT
        {
            return Err(ConfigError::InvalidAsgDrainTimeout(show(
                b.asg_drain_timeout,
            )));
        }
        if b.deadline_margin > MAX_DEADLINE_MARGIN {
            return Err(ConfigError::InvalidDeadlineMargin(show(b.deadline_margin)));
        }
        let managed_tag =
            match b.managed_tag.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(v) => Some(ManagedTag::parse(v).map_err(|problem| {
                    ConfigError::InvalidManagedTag {
                        value: v.to_string(),
                        problem,
                    }
                })?),
            };
        let node_selector = match b.node_selector.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => {
                parse_label_selector(v).map_err(|e| ConfigError::InvalidNodeSelector {
                    value: v.to_string(),
                    problem: e.to_string(),
                })?;
                Some(v.to_string())
            }
        };
        Ok(Behaviour {
            rebalance: b.rebalance,
            rebalance_uncordon_after: (!b.rebalance_uncordon_after.is_zero())
                .then_some(b.rebalance_uncordon_after),
            node_not_found: b.node_not_found,
            asg_drain_timeout: b.asg_drain_timeout,
            deadline_margin: b.deadline_margin,
            managed_tag,
            karpenter_handoff: b.karpenter_handoff,
            out_of_service_taint: b.out_of_service_taint,
            policy: b.policy.clone(),
            node_selector,
        })
    }
}

/// The parts of an SQS queue URL that validation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueUrl {
    /// From the host when it is an AWS one (`sqs.<region>.amazonaws.com`,
    /// `<region>.queue.amazonaws.com`, VPC endpoints); `None` for emulators on localhost.
    region: Option<String>,
}

/// Checks `scheme://host[:port]/<12-digit account>/<queue name>`, the only shape SQS accepts.
fn parse_queue_url(url: &str) -> Result<QueueUrl, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("it must start with https:// (or http:// for a local emulator)")?;
    let (authority, path) = rest
        .split_once('/')
        .ok_or("it has no /<account id>/<queue name> path")?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _port)| host);
    if host.is_empty() {
        return Err("it has no host".into());
    }
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let [account, name] = segments.as_slice() else {
        return Err(format!(
            "the path must be /<account id>/<queue name>, got /{path}"
        ));
    };
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{account:?} is not a 12-digit AWS account id (did you pass the queue ARN or name instead of its URL?)"
        ));
    }
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    if base.is_empty()
        || name.len() > 80
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{name:?} is not a queue name (1-80 letters, digits, '-' or '_')"
        ));
    }
    let region = host
        .split('.')
        .find(|l| is_region_like(l))
        .map(str::to_string);
    Ok(QueueUrl { region })
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `cn-north-1`, `ap-southeast-5`: letters and
/// dashes ending in `-<digits>`, with at least two dashes.
fn is_region_like(s: &str) -> bool {
    let Some((head, number)) = s.rsplit_once('-') else {
        return false;
    };
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && head.contains('-')
        && head
            .split('-')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// A DNS subdomain name, which is what a Lease name must be.
fn is_object_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
}

/// The Lease the replicas elect a leader on, and its timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Written to `holderIdentity`; unique per replica (pod name).
    pub identity: String,
    /// Invariant: lease_duration (in whole seconds, as the Lease stores it) > renew_deadline +
    /// retry_period, and renew_deadline > retry_period > 0 (checked by config).
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s / 10 s / 2 s. A standby takes over at most ~17 s after the
    /// leader dies; the leader renews at 0.5 writes per second; a leader cut off from the
    /// apiserver stops acting within 12 s, 3 s before anyone may take over.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> LeaseConfig {
        LeaseConfig {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// `leaseDurationSeconds` as written for `d`: whole seconds, at least one. Standbys judge expiry
/// by this value, not by `d`.
pub fn lease_seconds(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// Parses a duration as the flags take it: `90s`, `5m`, `1h30m`, `250ms` (humantime's syntax, so
/// `2days` works too), or a bare number of seconds as the Kubernetes API writes them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (e.g. 90s, 5m, 1h30m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_parse_like_kubectl() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("invalid duration")
        );
        assert!(parse_duration("m5").is_err());
        assert!(parse_duration("").is_err());
    }

    #[derive(Debug, Parser)]
    struct Test {
        #[command(flatten)]
        args: ControllerArgs,
    }

    const QUEUE: &str = "https://sqs.eu-west-1.amazonaws.com/123456789012/nodedrain";

    /// Parses flags the way the binary does, but never reads the process environment for the
    /// settings under test: each flag below is given explicitly so an exported NODEDRAIN_* in
    /// the developer's shell cannot change the result.
    fn args(extra: &[&str]) -> ControllerArgs {
        let mut argv = vec!["test", "--queue-url", QUEUE];
        argv.extend_from_slice(extra);
        let mut args = Test::try_parse_from(argv).expect("parses").args;
        // Clear the optional settings clap may have filled from the environment.
        for (flag, field) in [
            ("--aws-region", &mut args.aws.aws_region),
            ("--aws-endpoint-url", &mut args.aws.aws_endpoint_url),
            ("--lease-namespace", &mut args.lease.lease_namespace),
            ("--identity", &mut args.lease.identity),
            ("--managed-tag", &mut args.behaviour.managed_tag),
            ("--node-selector", &mut args.behaviour.node_selector),
            ("--notify-url", &mut args.notify.notify_url),
            ("--notify-proxy", &mut args.notify.notify_proxy),
        ] {
            if !extra.contains(&flag) {
                *field = None;
            }
        }
        args
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn validate(args: &ControllerArgs) -> Result<ControllerConfig, ConfigError> {
        args.validate_with(no_env, 42)
    }

    #[test]
    fn defaults_validate_into_typed_settings() {
        let c = validate(&args(&[])).expect("valid");
        assert_eq!(c.aws.region, "eu-west-1");
        assert_eq!(c.aws.endpoint_url, None);
        assert_eq!(c.intake.queue_url, QUEUE);
        assert_eq!(c.intake.receivers, 4);
        assert_eq!(c.intake.visibility_timeout, Duration::from_secs(60));
        assert_eq!(c.intake.malformed, MalformedPolicy::Delete);
        assert_eq!(c.intake.wait_time, Duration::from_secs(20));
        assert_eq!(c.intake.max_messages, 10);
        let lease = c.lease.expect("leader election on by default");
        assert_eq!(lease.name, "nodedrain");
        assert_eq!(lease.identity, "nodedrain-42");
        assert_eq!(
            (
                lease.lease_duration,
                lease.renew_deadline,
                lease.retry_period
            ),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        assert_eq!(
            lease.into_lease_config("kube-system").namespace,
            "kube-system"
        );
        let b = c.behaviour;
        assert_eq!(b.rebalance, RebalanceMode::CordonOnly);
        assert_eq!(b.rebalance_uncordon_after, Some(Duration::from_secs(3600)));
        assert_eq!(b.node_not_found, NodeNotFound::Delete);
        assert_eq!(b.asg_drain_timeout, Duration::from_secs(600));
        assert_eq!(b.deadline_margin, crate::drain::plan::DEFAULT_MARGIN);
        assert_eq!(b.managed_tag, None);
        assert!(b.karpenter_handoff);
        assert!(!b.out_of_service_taint, "opt-in");
        assert_eq!(b.node_selector, None);
        assert_eq!(c.cordon_qps, 250.0);
        assert_eq!(c.admin_addr, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn every_setting_can_be_changed() {
        let c = validate(&args(&[
            "--qps",
            "20",
            "--cordon-qps",
            "40",
            "--node-selector",
            "karpenter.sh/capacity-type=spot,team notin (batch)",
            "--receivers",
            "8",
            "--visibility-timeout",
            "2m",
            "--malformed-messages",
            "dead-letter",
            "--dedupe-window",
            "0",
            "--aws-region",
            "eu-west-1",
            "--aws-endpoint-url",
            "http://127.0.0.1:5000",
            "--leader-elect=true",
            "--lease-name",
            "nd",
            "--lease-namespace",
            "ops",
            "--lease-duration",
            "30s",
            "--lease-renew-deadline",
            "20s",
            "--lease-retry-period",
            "5s",
            "--identity",
            "nodedrain-7d9f-abcde",
            "--admin-addr",
            "127.0.0.1:9000",
            "--rebalance",
            "drain-and-handover",
            "--rebalance-uncordon-after",
            "0",
            "--node-not-found",
            "retry",
            "--asg-drain-timeout",
            "1h",
            "--deadline-margin",
            "5s",
            "--managed-tag",
            "team=platform",
            "--karpenter-handoff=false",
            "--out-of-service-taint=true",
            "--policy",
            "/etc/nodedrain/policy.yaml",
            "--log-format",
            "json",
        ]))
        .expect("valid");
        assert_eq!(c.qps, 20.0);
        assert_eq!(c.cordon_qps, 40.0);
        assert_eq!(
            c.behaviour.node_selector.as_deref(),
            Some("karpenter.sh/capacity-type=spot,team notin (batch)")
        );
        assert_eq!(c.intake.receivers, 8);
        assert_eq!(c.intake.visibility_timeout, Duration::from_secs(120));
        assert_eq!(c.intake.malformed, MalformedPolicy::DeadLetter);
        assert_eq!(c.intake.dedupe_ttl, Duration::ZERO);
        assert_eq!(c.aws.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
        let lease = c.lease.unwrap();
        assert_eq!(lease.namespace.as_deref(), Some("ops"));
        assert_eq!(lease.identity, "nodedrain-7d9f-abcde");
        assert_eq!(lease.renew_deadline, Duration::from_secs(20));
        assert_eq!(c.admin_addr.port(), 9000);
        let b = c.behaviour;
        assert_eq!(b.rebalance, RebalanceMode::DrainAndHandover);
        assert_eq!(b.rebalance_uncordon_after, None);
        assert_eq!(b.node_not_found, NodeNotFound::Retry);
        assert_eq!(b.asg_drain_timeout, Duration::from_secs(3600));
        assert_eq!(
            b.managed_tag,
            Some(ManagedTag::parse("team=platform").unwrap())
        );
        assert!(!b.karpenter_handoff);
        assert!(b.out_of_service_taint);
        assert_eq!(c.log_format, LogFormat::Json);
        let off = validate(&args(&["--leader-elect=false"])).unwrap();
        assert_eq!(off.lease, None);
    }

    #[test]
    fn unknown_values_and_bad_durations_are_rejected_with_the_accepted_ones() {
        for (argv, needle) in [
            (
                vec!["--rebalance", "evict"],
                "[possible values: cordon-only, drain, drain-and-handover]",
            ),
            (
                vec!["--node-not-found", "ignore"],
                "[possible values: retry, delete]",
            ),
            (
                vec!["--malformed-messages", "keep"],
                "[possible values: delete, dead-letter]",
            ),
            (
                vec!["--log-format", "yaml"],
                "[possible values: auto, json, text]",
            ),
            (vec!["--asg-drain-timeout", "5x"], "unknown time unit \"x\""),
            (vec!["--admin-addr", "localhost"], "invalid socket address"),
        ] {
            let mut full = vec!["test", "--queue-url", QUEUE];
            full.extend(argv.iter().copied());
            let e = Test::try_parse_from(&full)
                .expect_err("rejected")
                .to_string();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }

    #[test]
    fn missing_or_bad_queue_url_says_what_to_set() {
        let mut a = args(&[]);
        a.queue.queue_url = None;
        let e = validate(&a).unwrap_err();
        assert_eq!(e, ConfigError::MissingQueueUrl);
        assert!(e.to_string().contains("NODEDRAIN_QUEUE_URL"));

        for (url, problem) in [
            (
                "sqs.us-east-1.amazonaws.com/123456789012/q",
                "must start with https://",
            ),
            (
                "https://sqs.us-east-1.amazonaws.com",
                "has no /<account id>/<queue name>",
            ),
            (
                "arn:aws:sqs:us-east-1:123456789012:q",
                "must start with https://",
            ),
            (
                "https://sqs.us-east-1.amazonaws.com/nodedrain",
                "the path must be /<account id>/<queue name>",
            ),
            (
                "https://sqs.us-east-1.amazonaws.com/1234/q",
                "not a 12-digit AWS account id",
            ),
            (
                "https://sqs.us-east-1.amazonaws.com/123456789012/bad%20name",
                "is not a queue name",
            ),
        ] {
            let mut a = args(&[]);
            a.queue.queue_url = Some(url.into());
            let e = validate(&a).unwrap_err().to_string();
            assert!(e.contains(problem), "{url}: {e}");
            assert!(e.contains("--queue-url"), "{url}: {e}");
        }
    }

    #[test]
    fn region_comes_from_flag_env_or_queue_url_and_must_agree() {
        let mut a = args(&[]);
        a.queue.queue_url = Some("http://127.0.0.1:4566/123456789012/q".into());
        assert_eq!(validate(&a).unwrap_err(), ConfigError::MissingRegion);
        let env = |k: &str| (k == "AWS_DEFAULT_REGION").then(|| "ap-south-1".to_string());
        assert_eq!(a.validate_with(env, 1).unwrap().aws.region, "ap-south-1");
        a.aws.aws_region = Some("us-gov-west-1".into());
        assert_eq!(validate(&a).unwrap().aws.region, "us-gov-west-1");
        a.aws.aws_region = Some("US East".into());
        assert!(matches!(
            validate(&a).unwrap_err(),
            ConfigError::InvalidRegion { .. }
        ));

        let b = args(&["--aws-region", "us-east-1"]);
        let e = validate(&b).unwrap_err();
        assert_eq!(
            e,
            ConfigError::RegionMismatch {
                region: "us-east-1".into(),
                queue_region: "eu-west-1".into()
            }
        );
        // Legacy and VPC endpoint hosts name the region too.
        for url in [
            "https://eu-west-1.queue.amazonaws.com/123456789012/q",
            "https://vpce-0a1b-xyz.sqs.eu-west-1.vpce.amazonaws.com/123456789012/q.fifo",
        ] {
            let mut a = args(&[]);
            a.queue.queue_url = Some(url.into());
            assert_eq!(validate(&a).unwrap().aws.region, "eu-west-1", "{url}");
        }
    }

    #[test]
    fn ranges_and_combinations_are_checked() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--receivers", "0"], "--receivers"),
            (vec!["--visibility-timeout", "5s"], "between 10s and 12h"),
            (vec!["--visibility-timeout", "13h"], "between 10s and 12h"),
            (vec!["--visibility-timeout", "10500ms"], "whole seconds"),
            (vec!["--qps", "0"], "--qps"),
            (vec!["--cordon-qps", "0"], "--cordon-qps"),
            (vec!["--node-selector", "team in ("], "--node-selector"),
            (vec!["--node-selector", "a==b=c"], "NODEDRAIN_NODE_SELECTOR"),
            (
                vec!["--lease-renew-deadline", "2s"],
                "need --lease-renew-deadline (2s) > --lease-retry-period (2s) > 0",
            ),
            (
                vec!["--lease-retry-period", "0s"],
                "--lease-retry-period (0s)",
            ),
            (vec!["--lease-name", "Node_Drain"], "--lease-name"),
            (vec!["--identity", " "], "NODEDRAIN_POD_NAME"),
            (vec!["--asg-drain-timeout", "49h"], "48h"),
            (vec!["--deadline-margin", "2m"], "below 2m"),
            (vec!["--managed-tag", "=x"], "--managed-tag"),
            (vec!["--aws-endpoint-url", "localhost:5000"], "http://"),
        ];
        for (argv, needle) in cases {
            let e = validate(&args(&argv)).unwrap_err().to_string();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }

    /// A leader steps down at most renew deadline + retry period after its last renewal; a
    /// standby may take over a lease duration after it saw that renewal. The duration must be
    /// longer, or both act at once.
    #[test]
    fn lease_duration_must_exceed_renew_deadline_plus_retry_period() {
        let timings = |d: &str, r: &str, p: &str| {
            validate(&args(&[
                "--lease-duration",
                d,
                "--lease-renew-deadline",
                r,
                "--lease-retry-period",
                p,
            ]))
        };
        // The example: accepted before, two leaders possible for up to a second.
        let e = timings("15s", "14s", "2s").unwrap_err();
        assert_eq!(
            e.to_string(),
            "lease timings allow two leaders at once: lease duration must exceed renew deadline + retry period, got --lease-duration 15s (as whole seconds in the Lease) <= --lease-renew-deadline 14s + --lease-retry-period 2s"
        );
        // The boundary: equal is refused, one second more is accepted.
        assert!(matches!(
            timings("12s", "10s", "2s"),
            Err(ConfigError::LeaseShorterThanStepDown { .. })
        ));
        assert!(timings("13s", "10s", "2s").is_ok());
        // The Lease stores whole seconds: 12.9 s is written, and read by standbys, as 12.
        assert!(matches!(
            timings("12900ms", "10s", "2s"),
            Err(ConfigError::LeaseShorterThanStepDown { .. })
        ));
        assert!(timings("12s", "9500ms", "2s").is_ok());
        // client-go's defaults pass.
        assert!(timings("15s", "10s", "2s").is_ok());
    }

    #[test]
    fn region_names() {
        for ok in [
            "us-east-1",
            "us-gov-west-1",
            "cn-northwest-1",
            "ap-southeast-5",
        ] {
            assert!(is_region_like(ok), "{ok}");
        }
        for bad in ["", "us", "us-east", "east-1", "US-EAST-1", "us--1", "127"] {
            assert!(!is_region_like(bad), "{bad}");
        }
    }
}
