//! Webhook notifications about drains: Slack-compatible or generic JSON, optionally templated.
//!
//! The controller calls [`Notifier::notify`], which never waits: a notice goes into a bounded
//! queue, or is dropped and counted when the queue is full. Behind it one task coalesces notices
//! (a burst of 200 spot warnings is one "200 nodes cordoned" message), rate-limits posts, and
//! hands one message at a time to a poster with a timeout. So a webhook that fails, answers
//! slowly or hangs costs notifications, never time in a drain.
//!
//! Notices are not retried and not persisted: a failed post is counted
//! (`nodedrain_notifications_total{outcome!="sent"}`) and logged, and the next message carries
//! newer news. Notices waiting at shutdown get one last flush, bounded by [`SHUTDOWN_FLUSH`].

mod coalesce;
mod config;
mod format;
mod send;

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

pub use coalesce::{MAX_NAMED, Message, Pending, RateLimit};
pub use config::{NotifyArgs, NotifyConfig};
pub use format::{Renderer, text};

/// Notices waiting for the coalescer. It takes them as fast as they come (it only adds them to
/// a map), so this fills only if that task is starved; a burst of a few thousand nodes × 4 events
/// still fits.
const QUEUE_CAPACITY: usize = 4096;

/// Posts allowed at once before the per-minute rate applies: a burst's "cordoned" and
/// "draining" messages go out together, the drained ones then come at the configured rate.
const RATE_BURST: u32 = 5;

/// How long a stopping controller may spend posting what is still waiting: well inside the
/// chart's 30 s termination grace, after the lease is released.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// What happened to a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyEvent {
    /// An interruption was read and its node cordoned, tainted and recorded.
    Received,
    /// The drain started evicting (also after a new leader resumed it).
    Started,
    /// A pod was deleted at its last safe moment although its PDB still blocked eviction.
    /// (Before the end of its drain, in time and so in the order of a coalesced flush.)
    DeadlineOverride,
    /// Every pod that had to leave has left.
    Succeeded,
    /// The drain ended with pods left (blocked, timed out, errors).
    Failed,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 5] = [
        NotifyEvent::Received,
        NotifyEvent::Started,
        NotifyEvent::DeadlineOverride,
        NotifyEvent::Succeeded,
        NotifyEvent::Failed,
    ];

    /// Metric label and JSON value.
    pub const fn as_label(self) -> &'static str {
        match self {
            NotifyEvent::Received => "received",
            NotifyEvent::Started => "started",
            NotifyEvent::Succeeded => "succeeded",
            NotifyEvent::Failed => "failed",
            NotifyEvent::DeadlineOverride => "deadline-override",
        }
    }
}

/// Body format of the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NotifyFormat {
    /// `{"text": "..."}`: Slack incoming webhooks and the chat tools compatible with them.
    Slack,
    /// nodedrain's JSON fields (docs/notifications.md), or `--notify-template` over them.
    Json,
}

/// One thing that happened to one node's drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub event: NotifyEvent,
    /// `DrainKind::as_str`: the interruption kind, or `manual`.
    pub kind: &'static str,
    pub node: String,
    pub event_id: Option<String>,
    pub deadline: Option<Timestamp>,
    /// The pod of a deadline override (`namespace/name`), what a failed drain left.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "--notify-url / NODEDRAIN_NOTIFY_URL is not an http:// or https:// URL (not shown: it is a credential)"
    )]
    InvalidUrl,
    #[error("--notify-proxy / NODEDRAIN_NOTIFY_PROXY {0:?} is not an http:// or https:// URL")]
    InvalidProxy(String),
    #[error("cannot read --notify-template / NODEDRAIN_NOTIFY_TEMPLATE {path}: {problem}")]
    ReadTemplate { path: String, problem: String },
    #[error("--notify-template / NODEDRAIN_NOTIFY_TEMPLATE: {0}")]
    Template(String),
    #[error(
        "--notify-template needs --notify-format json: a Slack body is {{\"text\": ...}} and has no template"
    )]
    TemplateNeedsJson,
    #[error("--notify-max-per-minute / NODEDRAIN_NOTIFY_MAX_PER_MINUTE must be at least 1")]
    InvalidRate,
    #[error("--notify-timeout / NODEDRAIN_NOTIFY_TIMEOUT must be between 1s and 1m, got {0:?}")]
    InvalidTimeout(Duration),
    #[error("cannot build the webhook client: {0}")]
    Client(String),
}

/// How one post ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOutcome {
    /// A 2xx answer.
    Sent,
    /// Any other HTTP status.
    Rejected,
    /// No answer within `--notify-timeout`.
    Timeout,
    /// No connection, TLS or proxy failure, or the template failed on this message.
    Error,
}

impl PostOutcome {
    pub const ALL: [PostOutcome; 4] = [
        PostOutcome::Sent,
        PostOutcome::Rejected,
        PostOutcome::Timeout,
        PostOutcome::Error,
    ];

    pub const fn as_label(self) -> &'static str {
        match self {
            PostOutcome::Sent => "sent",
            PostOutcome::Rejected => "rejected",
            PostOutcome::Timeout => "timeout",
            PostOutcome::Error => "error",
        }
    }
}

type Labels2 = [(&'static str, &'static str); 2];

/// `nodedrain_notifications_total{event, outcome}` counts posts (one post may stand for many
/// notices); `nodedrain_notification_events_total{event, outcome="queued|dropped"}` counts
/// notices. All label values are fixed, and every series exists from the start.
#[derive(Debug, Clone)]
pub struct NotifyMetrics {
    posts: Family<Labels2, Counter>,
    notices: Family<Labels2, Counter>,
}

impl Default for NotifyMetrics {
    /// Registered nowhere: for tests.
    fn default() -> Self {
        NotifyMetrics::register(&mut Registry::default())
    }
}

impl NotifyMetrics {
    pub fn register(registry: &mut Registry) -> NotifyMetrics {
        let r = registry.sub_registry_with_prefix("nodedrain");
        let metrics = NotifyMetrics {
            posts: Family::default(),
            notices: Family::default(),
        };
        r.register(
            "notifications",
            "Webhook posts by the drain event they report and how they ended",
            metrics.posts.clone(),
        );
        r.register(
            "notification_events",
            "Drain events for notifications: queued, or dropped because the queue was full",
            metrics.notices.clone(),
        );
        for event in NotifyEvent::ALL {
            for outcome in PostOutcome::ALL {
                let _ = metrics
                    .posts
                    .get_or_create(&[("event", event.as_label()), ("outcome", outcome.as_label())]);
            }
            for outcome in ["queued", "dropped"] {
                let _ = metrics
                    .notices
                    .get_or_create(&[("event", event.as_label()), ("outcome", outcome)]);
            }
        }
        metrics
    }

    fn post(&self, event: NotifyEvent, outcome: PostOutcome) {
        self.posts
            .get_or_create(&[("event", event.as_label()), ("outcome", outcome.as_label())])
            .inc();
    }

    fn notice(&self, event: NotifyEvent, outcome: &'static str) {
        self.notices
            .get_or_create(&[("event", event.as_label()), ("outcome", outcome)])
            .inc();
    }
}

/// The controller's handle: cheap to clone, never blocks. A disabled one does nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    queue: mpsc::Sender<Notice>,
    events: Vec<NotifyEvent>,
    metrics: NotifyMetrics,
}

impl Notifier {
    /// Notifications off.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Starts the coalescer and the poster; they stop when `shutdown` fires, after one last
    /// flush of at most [`SHUTDOWN_FLUSH`]. The returned task ends when both have.
    pub fn start(
        config: NotifyConfig,
        metrics: NotifyMetrics,
        shutdown: CancellationToken,
    ) -> Result<(Notifier, JoinHandle<()>), NotifyError> {
        let (queue, notices) = mpsc::channel(QUEUE_CAPACITY);
        let events = config.events.clone();
        let task = send::spawn(config, metrics.clone(), notices, shutdown)?;
        let notifier = Notifier {
            inner: Some(Arc::new(Inner {
                queue,
                events,
                metrics,
            })),
        };
        Ok((
            notifier,
            tokio::spawn(task.instrument(info_span!("notify"))),
        ))
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues a notice for the webhook; drops it (and counts that) when the queue is full.
    pub fn notify(&self, notice: Notice) {
        let Some(inner) = &self.inner else {
            return;
        };
        if !inner.events.contains(&notice.event) {
            return;
        }
        let event = notice.event;
        match inner.queue.try_send(notice) {
            Ok(()) => inner.metrics.notice(event, "queued"),
            Err(_) => inner.metrics.notice(event, "dropped"),
        }
    }
}

impl Notice {
    /// A notice about the drain `record` describes.
    pub fn about(event: NotifyEvent, node: &str, record: &crate::node::DrainRecord) -> Notice {
        Notice {
            event,
            kind: record.kind.as_str(),
            node: node.to_string(),
            event_id: record.event_id.clone(),
            deadline: record.deadline,
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Notice {
        self.detail = Some(detail.into());
        self
    }
}

/// What a failed drain left, for its notice: the outcome and the first pods still there with
/// what blocked them (`timed out: shop/checkout-0 (PDB checkout allows 0 disruptions)`).
pub fn failure_detail(report: &crate::drain::report::DrainReport) -> String {
    /// Pods named in one failure; the chat line says how many more.
    const PODS: usize = 3;
    let remaining: Vec<_> = report.nodes.iter().flat_map(|n| n.remaining()).collect();
    use crate::drain::report::DrainOutcome;
    let mut detail = match report.outcome {
        DrainOutcome::Drained => "pods left",
        DrainOutcome::Refused => "refused",
        DrainOutcome::TimedOut => "timed out",
        DrainOutcome::Cancelled => "cancelled",
    }
    .to_string();
    let refused: usize = report.nodes.iter().map(|n| n.refused.len()).sum();
    if refused > 0 {
        detail.push_str(&format!(": {refused} pods refused"));
    }
    for (i, pod) in remaining.iter().take(PODS).enumerate() {
        detail.push_str(if i == 0 && refused == 0 { ": " } else { ", " });
        match &pod.blocker {
            Some(blocker) => detail.push_str(&format!("{} ({blocker})", pod.pod)),
            None => detail.push_str(&pod.pod.to_string()),
        }
    }
    if remaining.len() > PODS {
        detail.push_str(&format!(" and {} more pods", remaining.len() - PODS));
    }
    detail
}
