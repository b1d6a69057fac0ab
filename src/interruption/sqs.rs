//! The SQS intake: long-poll the queue, parse, dedupe, hand batches to a [`Handler`], keep
//! in-flight messages invisible while they are handled, and delete them when told.
//!
//! Shape, and why:
//! - `receivers` tasks long-poll concurrently (20 s wait, 10 messages a call): one poller caps
//!   throughput at ~10 messages per round trip, which a burst of 200 spot warnings exceeds.
//! - Every message is parsed at once; `Ignore`d ones and duplicates are deleted, malformed ones
//!   deleted or left for the redrive policy ([`MalformedPolicy`]), without the handler.
//! - Actionable messages become [`Delivery`]s. One dispatcher coalesces what all receivers
//!   produced (everything queued, plus [`IntakeConfig::batch_window`]) into one batch and calls
//!   the handler with it; the next batch waits until the handler returns. So a burst reaches the
//!   handler as a few large batches, and it can cordon every node of a batch before evicting.
//! - Receives ask for a short visibility timeout ([`IntakeConfig::receive_visibility`]): SQS marks
//!   messages in flight when it answers, whether or not the answer arrives, so a response lost
//!   with a dropped connection hides its messages for that long. Each [`Delivery`] carries an
//!   [`Ack`]; until it is settled, one keeper task extends the message's visibility (to
//!   [`IntakeConfig::visibility_timeout`]) at half the time it has left. `Ack::delete` is the only
//!   way a handled message leaves the queue, so the handler decides when (after the drain record
//!   is on the Node).
//! - No error is fatal: receives, deletes and queue checks are retried with capped, jittered
//!   exponential backoff; a failed visibility extension is retried after a fixed second instead,
//!   because it must land before the message's current timeout runs out. So an SQS outage or
//!   throttling shows up as log lines and `nodedrain_sqs_errors_total`, never as a crash loop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::events::{Interruption, Parsed, parse_message};
use crate::admin::Readiness;
use crate::metrics::{MessageOutcome, Metrics, SqsOperation};

/// SQS's longest long poll; fewer empty receives cost less and add no latency.
pub const MAX_WAIT_TIME: Duration = Duration::from_secs(20);
/// SQS's largest batch for ReceiveMessage, DeleteMessageBatch and ChangeMessageVisibilityBatch.
pub const MAX_BATCH: usize = 10;
/// SQS refuses visibility timeouts above 12 hours.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// The readiness component this intake marks once the queue answered.
pub const READINESS_COMPONENT: &str = "sqs-intake";
/// At most this many deliveries in one handler call: bounds the work one call holds up, while
/// still covering a 200-node burst in a single batch.
const MAX_DISPATCH: usize = 500;
/// Batches handled at once. A burst read by several receivers arrives while the first batch is
/// still being cordoned; its nodes should not wait for that batch's slowest PATCH.
const BATCHES_IN_FLIGHT: usize = 4;
/// How long shutdown may spend flushing deletes and releasing in-flight messages.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// ReceiveMessage's visibility timeout. A response lost on a dropped connection costs its
/// messages this much delay (instead of the full visibility timeout), and the first extension at
/// half of it leaves five one-second retries before the message would reappear. Most messages
/// are deleted before that first extension is due.
pub const DEFAULT_RECEIVE_VISIBILITY: Duration = Duration::from_secs(10);

/// What to do with a body that does not parse, or parses to an unknown event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedPolicy {
    /// Log, count, delete.
    Delete,
    /// Log, count, and leave it: each receive counts towards the queue's `maxReceiveCount`, after
    /// which the redrive policy moves it to the dead-letter queue for a person to read.
    DeadLetter,
}

impl MalformedPolicy {
    fn as_str(self) -> &'static str {
        match self {
            MalformedPolicy::Delete => "delete",
            MalformedPolicy::DeadLetter => "dead-letter",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntakeConfig {
    pub queue_url: String,
    /// Concurrent long-polling tasks. Invariant: ≥ 1.
    pub receivers: usize,
    /// ReceiveMessage `WaitTimeSeconds` (whole seconds, ≤ 20).
    pub wait_time: Duration,
    /// ReceiveMessage `MaxNumberOfMessages` (1..=10).
    pub max_messages: i32,
    /// Visibility timeout requested by ReceiveMessage itself (whole seconds). Short, because
    /// messages in a response that never arrives stay invisible this long. Capped at
    /// `visibility_timeout`.
    pub receive_visibility: Duration,
    /// Visibility timeout set by each extension of a message being handled (whole seconds).
    pub visibility_timeout: Duration,
    pub malformed: MalformedPolicy,
    /// How long a handled (event id, instance id) pair is remembered; zero remembers nothing.
    pub dedupe_ttl: Duration,
    /// After the first delivery of a batch, how long to wait for more before calling the
    /// handler. Receivers woken by the same burst return within milliseconds of each other;
    /// this lets their messages share one batch at the cost of this much latency.
    pub batch_window: Duration,
    /// First delay between retries of a failing SQS call (before jitter).
    pub backoff_min: Duration,
    /// Where the exponential growth stops. backon's jitter adds up to as much again to each
    /// delay, so a retry waits up to twice this.
    pub backoff_max: Duration,
}

impl IntakeConfig {
    /// The defaults documented in docs/configuration.md.
    pub fn new(queue_url: impl Into<String>) -> IntakeConfig {
        IntakeConfig {
            queue_url: queue_url.into(),
            receivers: 4,
            wait_time: MAX_WAIT_TIME,
            max_messages: MAX_BATCH as i32,
            receive_visibility: DEFAULT_RECEIVE_VISIBILITY,
            visibility_timeout: Duration::from_secs(60),
            malformed: MalformedPolicy::Delete,
            dedupe_ttl: Duration::from_secs(15 * 60),
            batch_window: Duration::from_millis(50),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }

    /// The receive's timeout, never longer than what extensions set.
    fn first_visibility(&self) -> Duration {
        self.receive_visibility.min(self.visibility_timeout)
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .without_max_times()
            .build()
    }
}

/// One message that announced interruptions nodedrain must act on.
#[derive(Debug)]
pub struct Delivery {
    /// SQS message id, for logs.
    pub message_id: String,
    /// Invariant: non-empty. Already-handled (event id, instance id) pairs are removed.
    pub interruptions: Vec<Interruption>,
    /// How many times SQS has handed this message out (1 on first delivery; 0 if SQS did not
    /// say). A handler can give up on a message that keeps failing.
    pub receive_count: u32,
    /// When the message entered the queue, if SQS said.
    pub sent_at: Option<Timestamp>,
    /// When this process received it.
    pub received_at: Timestamp,
    /// Settles the message. Dropping it releases the message (see [`Ack`]).
    pub ack: Ack,
}

/// The handler's say over one message. Until settled, the message's visibility is extended.
/// - [`Ack::delete`]: handled; delete it (call only once the drain record is on the Node).
/// - [`Ack::retry_after`]: not handled now; let it reappear after the delay.
/// - dropped: not handled; extensions stop and it reappears when its visibility timeout ends.
#[derive(Debug)]
pub struct Ack {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    settled: bool,
}

impl Ack {
    /// Deletes the message (batched with others, retried on SQS errors). Its (event id,
    /// instance id) pairs count as handled for the dedupe window from now.
    pub fn delete(mut self) {
        self.settle(Command::Delete { id: self.id });
    }

    /// Makes the message visible again after `delay` (at most 12 h; zero for at once).
    pub fn retry_after(mut self, delay: Duration) {
        let delay = delay.min(MAX_VISIBILITY);
        self.settle(Command::Retry { id: self.id, delay });
    }

    /// Same as dropping: stop extending; SQS redelivers after the current visibility timeout.
    pub fn release(self) {}

    fn settle(&mut self, command: Command) {
        self.settled = true;
        // A closed channel means the intake stopped; SQS redelivers the message to whoever runs
        // next, which is the safe outcome.
        let _ = self.commands.send(command);
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.commands.send(Command::Release { id: self.id });
        }
    }
}

/// What the controller implements: take a batch of deliveries and settle each one's [`Ack`],
/// now or later (acks may be moved into spawned tasks). The intake runs a few batches at once
/// (a burst arrives while the first batch is still being cordoned) and no more until one
/// returns, so `handle` should return once it has taken the batch over (nodes cordoned, records
/// written, acks settled or handed off) rather than when the drains end, and promptly once the
/// controller is shutting down.
///
/// Any `Fn(Vec<Delivery>) -> impl Future<Output = ()>` is a handler.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, batch: Vec<Delivery>) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Vec<Delivery>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, batch: Vec<Delivery>) -> impl Future<Output = ()> + Send {
        self(batch)
    }
}

/// A failed SQS call, rendered with the SDK's full context (the SDK error types are large and
/// per-operation; logs and tests only need the text).
#[derive(Debug, Clone, thiserror::Error)]
#[error("SQS {operation} failed: {message}")]
pub struct SqsError {
    pub operation: &'static str,
    pub message: String,
}

impl SqsError {
    fn new(operation: SqsOperation, error: impl std::error::Error) -> SqsError {
        SqsError {
            operation: operation.as_label(),
            message: DisplayErrorContext(error).to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dedupe (pure)

/// (event id, instance id): a Health event names several instances under one id, and the same
/// event can arrive twice (SQS at-least-once delivery, or through two rules).
type DedupeKey = (String, String);

fn key(i: &Interruption) -> DedupeKey {
    (i.event_id.clone(), i.instance_id.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Delivered to the handler and not settled yet.
    InFlight,
    /// Deleted as handled at this time.
    Done(Instant),
}

/// What to do with a parsed message, given what was seen before.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Hand these (the not yet handled ones) to the handler.
    Deliver(Vec<Interruption>),
    /// All of it was handled within the window: delete it.
    Duplicate,
    /// Another copy is being handled right now. Leave this copy alone (no extension): if the
    /// other copy's handling fails, this one comes back as the retry; if it succeeds, this one
    /// comes back as a duplicate and is deleted.
    InFlight,
}

#[derive(Debug)]
struct Dedupe {
    ttl: Duration,
    seen: HashMap<DedupeKey, Seen>,
    last_purge: Option<Instant>,
}

impl Dedupe {
    fn new(ttl: Duration) -> Dedupe {
        Dedupe {
            ttl,
            seen: HashMap::new(),
            last_purge: None,
        }
    }

    fn admit(&mut self, interruptions: Vec<Interruption>, now: Instant) -> Admit {
        self.purge(now);
        let fresh: Vec<Interruption> = interruptions
            .into_iter()
            .filter(|i| !matches!(self.seen.get(&key(i)), Some(Seen::Done(at)) if now.saturating_duration_since(*at) < self.ttl))
            .collect();
        if fresh.is_empty() {
            return Admit::Duplicate;
        }
        if fresh
            .iter()
            .any(|i| self.seen.get(&key(i)) == Some(&Seen::InFlight))
        {
            return Admit::InFlight;
        }
        for i in &fresh {
            self.seen.insert(key(i), Seen::InFlight);
        }
        Admit::Deliver(fresh)
    }

    fn done(&mut self, keys: &[DedupeKey], now: Instant) {
        for k in keys {
            if self.ttl.is_zero() {
                self.seen.remove(k);
            } else {
                self.seen.insert(k.clone(), Seen::Done(now));
            }
        }
    }

    fn forget(&mut self, keys: &[DedupeKey]) {
        for k in keys {
            if self.seen.get(k) == Some(&Seen::InFlight) {
                self.seen.remove(k);
            }
        }
    }

    /// Drops expired entries, at most every quarter window so a burst does not scan the map
    /// once per message.
    fn purge(&mut self, now: Instant) {
        if self
            .last_purge
            .is_some_and(|t| now.saturating_duration_since(t) < self.ttl / 4)
        {
            return;
        }
        self.last_purge = Some(now);
        let ttl = self.ttl;
        self.seen.retain(|_, s| match s {
            Seen::InFlight => true,
            Seen::Done(at) => now.saturating_duration_since(*at) < ttl,
        });
    }
}

fn lock(dedupe: &Mutex<Dedupe>) -> std::sync::MutexGuard<'_, Dedupe> {
    // Every Dedupe method leaves the map consistent at each step; a panic elsewhere while
    // holding the lock cannot corrupt it.
    dedupe.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Visibility extension schedule (pure)

/// When each in-flight message needs its next extension. Extensions go out at half the
/// visibility timeout, so one late or failed call still leaves half a period to retry.
#[derive(Debug, Default)]
struct Schedule {
    next: HashMap<u64, Instant>,
}

impl Schedule {
    fn insert(&mut self, id: u64, at: Instant) {
        self.next.insert(id, at);
    }

    fn remove(&mut self, id: u64) {
        self.next.remove(&id);
    }

    /// Ids due at `now`, in id order (stable batches for tests and logs).
    fn due(&self, now: Instant) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .next
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn earliest(&self) -> Option<Instant> {
        self.next.values().min().copied()
    }
}

// ---------------------------------------------------------------------------------------------
// The intake

enum Command {
    /// A message was handed out; extend it until settled.
    Track {
        id: u64,
        receipt: String,
        message_id: String,
        keys: Vec<DedupeKey>,
    },
    /// Delete a message the receiver settled itself (ignored, duplicate, malformed).
    DeleteUntracked {
        receipt: String,
        message_id: String,
        outcome: MessageOutcome,
    },
    Delete {
        id: u64,
    },
    /// Set an untracked message's visibility to the full timeout (see [`Receiver::hide`]).
    Hide {
        receipt: String,
        message_id: String,
    },
    Retry {
        id: u64,
        delay: Duration,
    },
    Release {
        id: u64,
    },
}

struct Tracked {
    receipt: String,
    message_id: String,
    keys: Vec<DedupeKey>,
}

struct PendingDelete {
    receipt: String,
    message_id: String,
    outcome: MessageOutcome,
}

struct PendingVisibility {
    receipt: String,
    message_id: String,
    timeout: Duration,
}

/// The running intake. Build it, then `run` it until its token is cancelled.
pub struct Intake<H> {
    sqs: aws_sdk_sqs::Client,
    config: IntakeConfig,
    handler: Arc<H>,
    metrics: Metrics,
    readiness: Option<Readiness>,
}

impl<H: Handler> Intake<H> {
    pub fn new(
        sqs: aws_sdk_sqs::Client,
        config: IntakeConfig,
        handler: H,
        metrics: Metrics,
    ) -> Intake<H> {
        Intake {
            sqs,
            config,
            handler: Arc::new(handler),
            metrics,
            readiness: None,
        }
    }

    /// Marks [`READINESS_COMPONENT`] ready once the queue has answered (GetQueueAttributes),
    /// which proves the URL, the region, the credentials and the permissions.
    pub fn with_readiness(mut self, readiness: Readiness) -> Intake<H> {
        readiness.set(READINESS_COMPONENT, false);
        self.readiness = Some(readiness);
        self
    }

    /// Receives until `cancel` fires, then stops receiving, flushes pending deletes and makes
    /// unsettled messages visible at once so another replica takes them over without waiting
    /// for their timeouts. Never fails: SQS errors are retried with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let Intake {
            sqs,
            config,
            handler,
            metrics,
            readiness,
        } = self;
        let config = Arc::new(config);
        if !check_queue(&sqs, &config, &metrics, &cancel).await {
            return;
        }
        if let Some(r) = &readiness {
            r.set(READINESS_COMPONENT, true);
        }
        info!(
            queue = %config.queue_url,
            receivers = config.receivers,
            "receiving interruption events"
        );

        let dedupe = Arc::new(Mutex::new(Dedupe::new(config.dedupe_ttl)));
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let keeper_stop = CancellationToken::new();
        let keeper = tokio::spawn(
            Keeper {
                sqs: sqs.clone(),
                config: config.clone(),
                metrics: metrics.clone(),
                dedupe: dedupe.clone(),
                tracked: HashMap::new(),
                schedule: Schedule::default(),
                deletes: Vec::new(),
                visibility: Vec::new(),
            }
            .run(commands_rx, keeper_stop.clone())
            .instrument(info_span!("sqs_keeper")),
        );

        // Bounded: when the handler falls behind, receivers stop polling instead of holding
        // ever more messages in memory (those held are extended meanwhile).
        let (deliveries_tx, deliveries_rx) = mpsc::channel(config.receivers.max(1) * MAX_BATCH * 2);
        let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut receivers = Vec::new();
        for index in 0..config.receivers.max(1) {
            let receiver = Receiver {
                sqs: sqs.clone(),
                config: config.clone(),
                metrics: metrics.clone(),
                dedupe: dedupe.clone(),
                commands: commands_tx.clone(),
                deliveries: deliveries_tx.clone(),
                next_id: next_id.clone(),
            };
            receivers.push(tokio::spawn(
                receiver
                    .run(cancel.clone())
                    .instrument(info_span!("sqs_receiver", receiver = index)),
            ));
        }
        drop(deliveries_tx);

        dispatch(deliveries_rx, &handler, &config, &cancel).await;

        for r in receivers {
            let _ = r.await;
        }
        // Queued-but-undispatched deliveries were dropped with the channel: their acks sent
        // Release before this point, so the keeper sees them before it stops.
        drop(commands_tx);
        keeper_stop.cancel();
        let _ = keeper.await;
        if let Some(r) = &readiness {
            r.set(READINESS_COMPONENT, false);
        }
        info!("stopped receiving interruption events");
    }
}

/// Asks the queue for its attributes until it answers (or `cancel`); false if cancelled.
async fn check_queue(
    sqs: &aws_sdk_sqs::Client,
    config: &IntakeConfig,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = config.backoff();
    loop {
        let call = sqs
            .get_queue_attributes()
            .queue_url(&config.queue_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send();
        let result = tokio::select! {
            _ = cancel.cancelled() => return false,
            r = call => r,
        };
        match result {
            Ok(out) => {
                let redrive = out
                    .attributes()
                    .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
                    .is_some_and(|p| !p.is_empty());
                if config.malformed == MalformedPolicy::DeadLetter && !redrive {
                    warn!(
                        queue = %config.queue_url,
                        "--malformed-messages dead-letter, but the queue has no redrive policy: malformed messages will come back until the queue's retention period ends"
                    );
                }
                return true;
            }
            Err(e) => {
                metrics.sqs_error(SqsOperation::GetQueueAttributes);
                let delay = backoff.next().unwrap_or(config.backoff_max);
                warn!(
                    queue = %config.queue_url,
                    error = %DisplayErrorContext(&e),
                    retry_in = ?delay,
                    "cannot reach the SQS queue; retrying"
                );
                if !sleep_or_cancel(delay, cancel).await {
                    return false;
                }
            }
        }
    }
}

/// Sleeps; false if cancelled first.
async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Coalesces deliveries into batches and hands them to the handler, up to
/// [`BATCHES_IN_FLIGHT`] at once.
async fn dispatch<H: Handler>(
    mut rx: mpsc::Receiver<Delivery>,
    handler: &Arc<H>,
    config: &IntakeConfig,
    cancel: &CancellationToken,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            d = rx.recv(), if running.len() < BATCHES_IN_FLIGHT => match d {
                Some(d) => d,
                None => break,
            },
        };
        let mut batch = vec![first];
        let window_end = Instant::now() + config.batch_window;
        while batch.len() < MAX_DISPATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => {
                    let more = tokio::select! {
                        _ = tokio::time::sleep_until(window_end) => None,
                        d = rx.recv() => d,
                    };
                    match more {
                        Some(d) => batch.push(d),
                        None => break,
                    }
                }
            }
        }
        // Where a burst's time goes before the handler: in the queue (sent → received) and in
        // this batch window (received → now).
        let now = Timestamp::now();
        let first_sent = batch.iter().filter_map(|d| d.sent_at).min();
        let first_received = batch.iter().map(|d| d.received_at).min();
        let millis = |from: Option<Timestamp>, to: Timestamp| {
            from.map(|f| to.duration_since(f).as_millis() as i64)
        };
        debug!(
            messages = batch.len(),
            sent_to_received_ms = first_received.and_then(|r| millis(first_sent, r)),
            received_to_dispatch_ms = millis(first_received, now),
            "dispatching a batch"
        );
        let handler = Arc::clone(handler);
        running.spawn(async move { handler.handle(batch).await }.in_current_span());
    }
    // Batches taken over finish: their nodes get cordoned and their acks settled.
    while running.join_next().await.is_some() {}
}

struct Receiver {
    sqs: aws_sdk_sqs::Client,
    config: Arc<IntakeConfig>,
    metrics: Metrics,
    dedupe: Arc<Mutex<Dedupe>>,
    commands: mpsc::UnboundedSender<Command>,
    deliveries: mpsc::Sender<Delivery>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl Receiver {
    async fn run(self, cancel: CancellationToken) {
        let mut backoff = self.config.backoff();
        let mut failing = false;
        loop {
            let call = self
                .sqs
                .receive_message()
                .queue_url(&self.config.queue_url)
                .max_number_of_messages(self.config.max_messages)
                .wait_time_seconds(secs(self.config.wait_time))
                .visibility_timeout(secs(self.config.first_visibility()))
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .send();
            // Dropping an in-flight long poll on shutdown may lose the messages SQS was about to
            // return; they stay invisible for one visibility timeout, then come back.
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = call => r,
            };
            match result {
                Ok(out) => {
                    if failing {
                        info!("SQS receive works again");
                        failing = false;
                    }
                    backoff = self.config.backoff();
                    for message in out.messages.unwrap_or_default() {
                        if !self.accept(message).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    self.metrics.sqs_error(SqsOperation::Receive);
                    failing = true;
                    let delay = backoff.next().unwrap_or(self.config.backoff_max);
                    warn!(
                        error = %DisplayErrorContext(&e),
                        retry_in = ?delay,
                        "SQS receive failed; retrying"
                    );
                    if !sleep_or_cancel(delay, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Parses one message and routes it; false once the dispatcher is gone (shutting down).
    async fn accept(&self, message: aws_sdk_sqs::types::Message) -> bool {
        let message_id = message.message_id().unwrap_or("<no id>").to_string();
        let Some(receipt) = message.receipt_handle().map(str::to_string) else {
            // Without a receipt handle the message cannot be deleted or extended; SQS always
            // sends one, so this is only a broken endpoint.
            warn!(message_id, "SQS message without a receipt handle; skipped");
            return true;
        };
        let attributes = message.attributes();
        let attribute = |name: MessageSystemAttributeName| {
            attributes.and_then(|a| a.get(&name)).map(String::as_str)
        };
        let receive_count = attribute(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let sent_at = attribute(MessageSystemAttributeName::SentTimestamp)
            .and_then(|t| t.parse::<i64>().ok())
            .and_then(|ms| Timestamp::from_millisecond(ms).ok());

        let received_at = Timestamp::now();
        let parsed = parse_message(message.body().unwrap_or_default(), received_at);
        let interruptions = match parsed {
            Ok(Parsed::Interruptions(list)) => {
                // Fallbacks are the message's, shared by all its interruptions: one line each,
                // not one per instance of a Health event naming thousands.
                if let Some(first) = list.first() {
                    for f in &first.fallbacks {
                        warn!(
                            message_id,
                            event_id = %first.event_id,
                            instances = list.len(),
                            field = f.field,
                            found = %f.found,
                            "{f}; draining anyway"
                        );
                    }
                }
                list
            }
            Ok(Parsed::Ignore { reason }) => {
                info!(message_id, %reason, "message needs no drain; deleting it");
                self.metrics.ignored(&reason);
                self.delete_untracked(receipt, message_id, MessageOutcome::Ignored);
                return true;
            }
            Err(error) => {
                let policy = self.config.malformed;
                warn!(
                    message_id,
                    %error,
                    receive_count,
                    policy = policy.as_str(),
                    "cannot use this message"
                );
                self.metrics.malformed(&error);
                match policy {
                    MalformedPolicy::Delete => {
                        self.delete_untracked(receipt, message_id, MessageOutcome::MalformedDeleted)
                    }
                    MalformedPolicy::DeadLetter => {
                        self.metrics.message(MessageOutcome::MalformedDeadLetter);
                        self.hide(receipt, message_id);
                    }
                }
                return true;
            }
        };

        let admitted = lock(&self.dedupe).admit(interruptions, Instant::now());
        let interruptions = match admitted {
            Admit::Deliver(list) => list,
            Admit::Duplicate => {
                debug!(
                    message_id,
                    "every interruption in it was handled already; deleting it"
                );
                self.delete_untracked(receipt, message_id, MessageOutcome::Duplicate);
                return true;
            }
            Admit::InFlight => {
                debug!(
                    message_id,
                    "a copy is being handled; leaving this one for later"
                );
                self.hide(receipt, message_id);
                return true;
            }
        };
        for i in &interruptions {
            self.metrics.interruption(&i.kind);
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.commands.send(Command::Track {
            id,
            receipt,
            message_id: message_id.clone(),
            keys: interruptions.iter().map(key).collect(),
        });
        let delivery = Delivery {
            message_id,
            interruptions,
            receive_count,
            sent_at,
            received_at,
            ack: Ack {
                id,
                commands: self.commands.clone(),
                settled: false,
            },
        };
        // A failed send drops the delivery, and with it its ack: the message is released.
        self.deliveries.send(delivery).await.is_ok()
    }

    /// Keeps a message nodedrain leaves alone invisible for the full visibility timeout: with
    /// only the receive's short one, it would come back every few seconds, each time counting
    /// towards the queue's `maxReceiveCount`.
    fn hide(&self, receipt: String, message_id: String) {
        let _ = self.commands.send(Command::Hide {
            receipt,
            message_id,
        });
    }

    fn delete_untracked(&self, receipt: String, message_id: String, outcome: MessageOutcome) {
        let _ = self.commands.send(Command::DeleteUntracked {
            receipt,
            message_id,
            outcome,
        });
    }
}

/// Whole seconds for an SQS parameter, saturating (config validation keeps them in range).
fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Owns every in-flight receipt: extends visibility on schedule, batches deletes and visibility
/// changes, retries them with backoff.
struct Keeper {
    sqs: aws_sdk_sqs::Client,
    config: Arc<IntakeConfig>,
    metrics: Metrics,
    dedupe: Arc<Mutex<Dedupe>>,
    tracked: HashMap<u64, Tracked>,
    schedule: Schedule,
    deletes: Vec<PendingDelete>,
    visibility: Vec<PendingVisibility>,
}

impl Keeper {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        stop: CancellationToken,
    ) {
        let mut backoff = self.config.backoff();
        // When set, pending deletes/visibility changes wait until then (after a failed call).
        let mut retry_at: Option<Instant> = None;
        loop {
            let pending = !self.deletes.is_empty() || !self.visibility.is_empty();
            let flush_at = if pending { retry_at } else { None };
            let wake = match (self.schedule.earliest(), flush_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Flush right away when something is pending and no retry delay is running.
            let flush_now = pending && retry_at.is_none();
            if !flush_now {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    c = commands.recv() => match c {
                        Some(c) => self.apply(c),
                        None => break,
                    },
                    _ = sleep => {}
                }
            }
            // Take every command already queued, so a burst of acks becomes few batch calls.
            while let Ok(c) = commands.try_recv() {
                self.apply(c);
            }
            let now = Instant::now();
            if retry_at.is_some_and(|t| t <= now) {
                retry_at = None;
            }
            self.extend_due(now).await;
            if retry_at.is_none() && (!self.deletes.is_empty() || !self.visibility.is_empty()) {
                if self.flush().await {
                    backoff = self.config.backoff();
                } else {
                    let delay = backoff.next().unwrap_or(self.config.backoff_max);
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
        self.shutdown(commands).await;
    }

    fn apply(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Track {
                id,
                receipt,
                message_id,
                keys,
            } => {
                self.tracked.insert(
                    id,
                    Tracked {
                        receipt,
                        message_id,
                        keys,
                    },
                );
                // The receive's own short timeout runs from about now.
                self.schedule
                    .insert(id, now + self.config.first_visibility() / 2);
            }
            Command::DeleteUntracked {
                receipt,
                message_id,
                outcome,
            } => self.deletes.push(PendingDelete {
                receipt,
                message_id,
                outcome,
            }),
            Command::Hide {
                receipt,
                message_id,
            } => self.visibility.push(PendingVisibility {
                receipt,
                message_id,
                timeout: self.config.visibility_timeout,
            }),
            Command::Delete { id } => {
                if let Some(t) = self.untrack(id) {
                    lock(&self.dedupe).done(&t.keys, now);
                    self.deletes.push(PendingDelete {
                        receipt: t.receipt,
                        message_id: t.message_id,
                        outcome: MessageOutcome::Handled,
                    });
                }
            }
            Command::Retry { id, delay } => {
                if let Some(t) = self.untrack(id) {
                    lock(&self.dedupe).forget(&t.keys);
                    self.metrics.message(MessageOutcome::Retried);
                    self.visibility.push(PendingVisibility {
                        receipt: t.receipt,
                        message_id: t.message_id,
                        timeout: delay,
                    });
                }
            }
            Command::Release { id } => {
                if let Some(t) = self.untrack(id) {
                    lock(&self.dedupe).forget(&t.keys);
                    self.metrics.message(MessageOutcome::Released);
                    debug!(message_id = t.message_id, "released without a decision");
                }
            }
        }
    }

    fn untrack(&mut self, id: u64) -> Option<Tracked> {
        self.schedule.remove(id);
        self.tracked.remove(&id)
    }

    /// Extends every message whose extension is due. A failed call is retried on the next
    /// wake-up a second later; half a timeout of slack remains.
    async fn extend_due(&mut self, now: Instant) {
        let due = self.schedule.due(now);
        if due.is_empty() {
            return;
        }
        let timeout = self.config.visibility_timeout;
        for chunk in due.chunks(MAX_BATCH) {
            let entries: Vec<(u64, &str)> = chunk
                .iter()
                .filter_map(|id| self.tracked.get(id).map(|t| (*id, t.receipt.as_str())))
                .collect();
            let result =
                change_visibility(&self.sqs, &self.config.queue_url, &entries, timeout).await;
            match result {
                Ok(failed) => {
                    for id in chunk {
                        self.schedule.insert(*id, now + timeout / 2);
                    }
                    for (id, error) in failed {
                        // The receipt is no longer valid (the message was deleted, or its
                        // 12-hour limit passed): no later extension can succeed.
                        let message_id = self.tracked.get(&id).map(|t| t.message_id.clone());
                        warn!(?message_id, %error, "cannot extend visibility; it may be redelivered");
                        self.schedule.remove(id);
                    }
                }
                Err(e) => {
                    self.metrics.sqs_error(SqsOperation::ChangeVisibility);
                    warn!(%e, "cannot extend visibility; retrying in 1s");
                    for id in chunk {
                        self.schedule.insert(*id, now + Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Sends pending deletes and visibility changes; false if any call failed as a whole (the
    /// failed entries stay pending).
    async fn flush(&mut self) -> bool {
        let mut ok = true;
        let deletes = std::mem::take(&mut self.deletes);
        for chunk in deletes.chunks(MAX_BATCH) {
            match delete_batch(&self.sqs, &self.config.queue_url, chunk).await {
                Ok(failed) => {
                    for (index, pending) in chunk.iter().enumerate() {
                        match failed.iter().find(|(i, _, _)| *i == index) {
                            None => self.metrics.message(pending.outcome),
                            Some((_, sender_fault, error)) => {
                                self.metrics.sqs_error(SqsOperation::Delete);
                                if *sender_fault {
                                    // An expired receipt: the message is visible again and will
                                    // be deduped when it comes back.
                                    warn!(message_id = pending.message_id, %error, "cannot delete message");
                                } else {
                                    self.deletes.push(PendingDelete {
                                        receipt: pending.receipt.clone(),
                                        message_id: pending.message_id.clone(),
                                        outcome: pending.outcome,
                                    });
                                    ok = false;
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    self.metrics.sqs_error(SqsOperation::Delete);
                    warn!(%e, messages = chunk.len(), "cannot delete messages; retrying");
                    self.deletes.extend(chunk.iter().map(|p| PendingDelete {
                        receipt: p.receipt.clone(),
                        message_id: p.message_id.clone(),
                        outcome: p.outcome,
                    }));
                    ok = false;
                }
            }
        }
        let mut changes = std::mem::take(&mut self.visibility);
        // One batch call takes one timeout for all its entries here, so group by timeout (at
        // shutdown they are all zero; during operation retries are rare).
        changes.sort_by_key(|p| p.timeout);
        for group in changes.chunk_by(|a, b| a.timeout == b.timeout) {
            for chunk in group.chunks(MAX_BATCH) {
                let entries: Vec<(u64, &str)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u64, p.receipt.as_str()))
                    .collect();
                let timeout = chunk[0].timeout;
                match change_visibility(&self.sqs, &self.config.queue_url, &entries, timeout).await
                {
                    Ok(failed) => {
                        for (i, error) in failed {
                            let message_id = chunk.get(i as usize).map(|p| p.message_id.as_str());
                            warn!(?message_id, %error, "cannot change visibility");
                        }
                    }
                    Err(e) => {
                        self.metrics.sqs_error(SqsOperation::ChangeVisibility);
                        warn!(%e, messages = chunk.len(), "cannot change visibility; retrying");
                        self.visibility
                            .extend(chunk.iter().map(|p| PendingVisibility {
                                receipt: p.receipt.clone(),
                                message_id: p.message_id.clone(),
                                timeout: p.timeout,
                            }));
                        ok = false;
                    }
                }
            }
        }
        ok
    }

    /// Final flush: settle what is queued, delete what was acked, and make every unsettled
    /// message visible now so the next leader need not wait out its timeout. Bounded in time.
    async fn shutdown(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        while let Ok(c) = commands.try_recv() {
            self.apply(c);
        }
        let ids: Vec<u64> = self.tracked.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.untrack(id) {
                self.metrics.message(MessageOutcome::Released);
                self.visibility.push(PendingVisibility {
                    receipt: t.receipt,
                    message_id: t.message_id,
                    timeout: Duration::ZERO,
                });
            }
        }
        if self.deletes.is_empty() && self.visibility.is_empty() {
            return;
        }
        if tokio::time::timeout(SHUTDOWN_FLUSH, self.flush())
            .await
            .is_err()
        {
            warn!(
                "SQS did not answer in time at shutdown; unsettled messages reappear after their visibility timeout"
            );
        }
    }
}

/// Failed entries of a batch call: (index in the chunk, sender fault, error text).
type BatchFailures = Vec<(usize, bool, String)>;

async fn delete_batch(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    chunk: &[PendingDelete],
) -> Result<BatchFailures, SqsError> {
    let entries = chunk
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&p.receipt)
                .build()
                .ok()
        })
        .collect::<Vec<_>>();
    let out = sqs
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| SqsError::new(SqsOperation::Delete, e))?;
    Ok(out
        .failed()
        .iter()
        .filter_map(|f| {
            let index = f.id().parse().ok()?;
            Some((index, f.sender_fault(), error_text(f.code(), f.message())))
        })
        .collect())
}

/// Changes the visibility of `entries` (caller's id, receipt); returns the ids SQS refused.
async fn change_visibility(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    entries: &[(u64, &str)],
    timeout: Duration,
) -> Result<Vec<(u64, String)>, SqsError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let request = entries
        .iter()
        .enumerate()
        .filter_map(|(i, (_, receipt))| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(*receipt)
                .visibility_timeout(secs(timeout))
                .build()
                .ok()
        })
        .collect::<Vec<_>>();
    let out = sqs
        .change_message_visibility_batch()
        .queue_url(queue_url)
        .set_entries(Some(request))
        .send()
        .await
        .map_err(|e| SqsError::new(SqsOperation::ChangeVisibility, e))?;
    Ok(out
        .failed()
        .iter()
        .filter_map(|f| {
            let index: usize = f.id().parse().ok()?;
            let (id, _) = entries.get(index)?;
            Some((*id, error_text(f.code(), f.message())))
        })
        .collect())
}

fn error_text(code: &str, message: Option<&str>) -> String {
    match message {
        Some(m) => format!("{code}: {m}"),
        None => code.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interruption::events::InterruptionKind;

    fn interruption(event: &str, instance: &str) -> Interruption {
        Interruption {
            kind: InterruptionKind::SpotInterruption,
            instance_id: instance.into(),
            event_id: event.into(),
            event_time: Timestamp::UNIX_EPOCH,
            deadline: None,
            lifecycle: None,
            detail: String::new(),
            fallbacks: Vec::new(),
        }
    }

    fn ids(list: &[Interruption]) -> Vec<&str> {
        list.iter().map(|i| i.instance_id.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_delivers_once_per_event_and_instance_within_the_window() {
        let ttl = Duration::from_secs(600);
        let mut d = Dedupe::new(ttl);
        let t0 = Instant::now();
        let health = || {
            vec![
                interruption("e1", "i-00000001"),
                interruption("e1", "i-00000002"),
            ]
        };
        let Admit::Deliver(first) = d.admit(health(), t0) else {
            panic!("first copy is delivered")
        };
        assert_eq!(ids(&first), ["i-00000001", "i-00000002"]);
        // A second copy while the first is in flight waits.
        assert_eq!(d.admit(health(), t0), Admit::InFlight);
        // Handled: copies are duplicates for the window...
        d.done(&first.iter().map(key).collect::<Vec<_>>(), t0);
        assert_eq!(d.admit(health(), t0 + ttl / 2), Admit::Duplicate);
        // ...a different event for the same instance is not...
        assert!(matches!(
            d.admit(vec![interruption("e2", "i-00000001")], t0),
            Admit::Deliver(_)
        ));
        // ...and after the window the pair is new again.
        assert!(matches!(d.admit(health(), t0 + ttl), Admit::Deliver(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_passes_on_only_the_unhandled_part_and_forgets_failures() {
        let mut d = Dedupe::new(Duration::from_secs(60));
        let now = Instant::now();
        d.done(&[key(&interruption("e1", "i-00000001"))], now);
        let msg = vec![
            interruption("e1", "i-00000001"),
            interruption("e1", "i-00000003"),
        ];
        let Admit::Deliver(rest) = d.admit(msg.clone(), now) else {
            panic!()
        };
        assert_eq!(ids(&rest), ["i-00000003"]);
        // Released or retried: the next copy is handled again.
        d.forget(&rest.iter().map(key).collect::<Vec<_>>());
        assert!(matches!(d.admit(msg, now), Admit::Deliver(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_with_zero_window_remembers_only_what_is_in_flight() {
        let mut d = Dedupe::new(Duration::ZERO);
        let now = Instant::now();
        let msg = || vec![interruption("e1", "i-00000001")];
        let Admit::Deliver(got) = d.admit(msg(), now) else {
            panic!()
        };
        assert_eq!(d.admit(msg(), now), Admit::InFlight);
        d.done(&got.iter().map(key).collect::<Vec<_>>(), now);
        assert!(matches!(d.admit(msg(), now), Admit::Deliver(_)));
        assert!(d.seen.len() <= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_purges_expired_entries() {
        let ttl = Duration::from_secs(40);
        let mut d = Dedupe::new(ttl);
        let t0 = Instant::now();
        for n in 0..100 {
            d.done(&[(format!("e{n}"), "i-00000001".into())], t0);
        }
        d.admit(
            vec![interruption("x", "i-00000002")],
            t0 + ttl + Duration::from_secs(1),
        );
        assert_eq!(d.seen.len(), 1, "only the in-flight entry remains");
    }

    #[tokio::test(start_paused = true)]
    async fn extensions_are_due_at_half_the_timeout_and_rescheduled() {
        let half = Duration::from_secs(30);
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.insert(2, t0 + half);
        s.insert(1, t0 + half);
        s.insert(3, t0 + half + Duration::from_secs(5));
        assert_eq!(s.earliest(), Some(t0 + half));
        assert!(s.due(t0).is_empty());
        tokio::time::advance(half).await;
        let now = Instant::now();
        assert_eq!(s.due(now), [1, 2]);
        for id in s.due(now) {
            s.insert(id, now + half);
        }
        assert_eq!(s.earliest(), Some(t0 + half + Duration::from_secs(5)));
        s.remove(3);
        assert_eq!(s.earliest(), Some(now + half));
        s.remove(1);
        s.remove(2);
        assert_eq!(s.earliest(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn acks_send_exactly_one_settlement() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ack = |id| Ack {
            id,
            commands: tx.clone(),
            settled: false,
        };
        ack(1).delete();
        ack(2).retry_after(Duration::from_secs(100_000));
        ack(3).release();
        drop(ack(4));
        let mut seen = Vec::new();
        while let Ok(c) = rx.try_recv() {
            seen.push(match c {
                Command::Delete { id } => format!("delete {id}"),
                Command::Retry { id, delay } => format!("retry {id} {}", delay.as_secs()),
                Command::Release { id } => format!("release {id}"),
                _ => "other".into(),
            });
        }
        assert_eq!(
            seen,
            ["delete 1", "retry 2 43200", "release 3", "release 4"]
        );
    }

    /// Delivery `n` as a receiver queues it for the dispatcher: one interruption of `instance`.
    fn queued_delivery(
        n: u64,
        instance: &str,
        commands: &mpsc::UnboundedSender<Command>,
    ) -> Delivery {
        Delivery {
            message_id: n.to_string(),
            interruptions: vec![interruption("e", instance)],
            receive_count: 1,
            sent_at: None,
            received_at: Timestamp::UNIX_EPOCH,
            ack: Ack {
                id: n,
                commands: commands.clone(),
                settled: false,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dispatcher_coalesces_what_arrives_within_the_window() {
        let (tx, rx) = mpsc::channel(100);
        let (ack_tx, _ack_rx) = mpsc::unbounded_channel();
        let delivery = |n: u64| queued_delivery(n, "i-00000001", &ack_tx);
        let mut config = IntakeConfig::new("q");
        config.batch_window = Duration::from_millis(50);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let handler = move |batch: Vec<Delivery>| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap().push(batch.len());
            }
        };
        let cancel = CancellationToken::new();
        let producer = async {
            for n in 0..3 {
                tx.send(delivery(n)).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(delivery(3)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(delivery(4)).await.unwrap();
            drop(tx);
        };
        let handler = Arc::new(handler);
        tokio::join!(producer, dispatch(rx, &handler, &config, &cancel));
        assert_eq!(*sizes.lock().unwrap(), [4, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_batch_does_not_hold_back_the_next_but_the_limit_does() {
        let (tx, rx) = mpsc::channel(100);
        let (ack_tx, _ack_rx) = mpsc::unbounded_channel();
        let delivery = |n: u64| queued_delivery(n, &format!("i-{n:08}"), &ack_tx);
        let config = IntakeConfig::new("q");
        let start = Instant::now();
        // (first message id of the batch, when its handling began)
        let began = Arc::new(Mutex::new(Vec::new()));
        let recorded = began.clone();
        // Every batch takes 10 s, as a batch whose cordons hang would.
        let handler = move |batch: Vec<Delivery>| {
            let recorded = recorded.clone();
            async move {
                let id: u64 = batch[0].message_id.parse().unwrap();
                recorded.lock().unwrap().push((id, start.elapsed()));
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        };
        let cancel = CancellationToken::new();
        let producer = async {
            // One batch more than may run at once, each 1 s after the last.
            for n in 0..=BATCHES_IN_FLIGHT as u64 {
                tx.send(delivery(n)).await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            drop(tx);
        };
        let handler = Arc::new(handler);
        tokio::join!(producer, dispatch(rx, &handler, &config, &cancel));
        let began = began.lock().unwrap().clone();
        assert_eq!(began.len(), BATCHES_IN_FLIGHT + 1);
        for (id, at) in &began[..BATCHES_IN_FLIGHT] {
            // Each handled as it arrived (plus the batch window), while the earlier ones run.
            assert!(
                *at < Duration::from_secs(*id) + Duration::from_millis(100),
                "batch {id} began at {at:?}"
            );
        }
        // The one past the limit waits until the first batch is done.
        let (id, at) = began[BATCHES_IN_FLIGHT];
        assert_eq!(id, BATCHES_IN_FLIGHT as u64);
        assert!(
            at >= Duration::from_secs(10),
            "batch past the limit began at {at:?}"
        );
    }
}
