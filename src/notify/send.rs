//! The two tasks behind a [`super::Notifier`]: the coalescer, which gathers notices and lets
//! messages out at the configured rate, and the poster, which sends one at a time.
//!
//! They meet through a channel of one message: while a post hangs, the coalescer cannot hand
//! over the next one and keeps coalescing instead. So a hanging webhook costs one message per
//! `--notify-timeout`, holds at most a message in flight plus one waiting, and never reaches
//! back into the controller (whose only contact is a `try_send` into the notice queue).

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::coalesce::{Message, Pending, RateLimit};
use super::format::Renderer;
use super::{
    Notice, NotifyConfig, NotifyError, NotifyMetrics, PostOutcome, RATE_BURST, SHUTDOWN_FLUSH,
};

/// How soon to look again when the rate would allow a post but the poster is still busy.
const POSTER_BUSY_RECHECK: Duration = Duration::from_secs(1);

/// Builds the client and returns the future running both tasks until `shutdown` and the last
/// flush.
pub(super) fn spawn(
    config: NotifyConfig,
    metrics: NotifyMetrics,
    notices: mpsc::Receiver<Notice>,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, NotifyError> {
    let renderer = Renderer::new(config.format, config.template.clone())?;
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .user_agent(concat!("nodedrain/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = &config.proxy {
        let proxy = reqwest::Proxy::all(proxy.clone())
            .map_err(|e| NotifyError::Client(e.without_url().to_string()))?;
        builder = builder.proxy(proxy);
    }
    let client = builder
        .build()
        .map_err(|e| NotifyError::Client(e.without_url().to_string()))?;
    let poster = Poster {
        client,
        url: config.url,
        renderer,
        metrics,
    };
    let (posts, to_post) = mpsc::channel(1);
    Ok(async move {
        let posting = tokio::spawn(poster.run(to_post));
        let flush_deadline = coalesce(
            notices,
            posts,
            config.coalesce_window,
            config.max_per_minute,
            shutdown,
        )
        .await;
        // The coalescer dropped its sender: the poster ends after what it holds, or is cut off.
        let abort = posting.abort_handle();
        if tokio::time::timeout_at(flush_deadline, posting)
            .await
            .is_err()
        {
            abort.abort();
            warn!("notifications still unsent at shutdown were dropped");
        }
    })
}

/// Gathers notices and hands messages to the poster when the window has passed, the rate
/// allows and the poster is free. Returns at shutdown (or when every [`super::Notifier`] is gone)
/// after handing over what waits, with the deadline for the poster to finish.
async fn coalesce(
    mut notices: mpsc::Receiver<Notice>,
    posts: mpsc::Sender<Message>,
    window: Duration,
    per_minute: u32,
    shutdown: CancellationToken,
) -> Instant {
    let mut pending = Pending::default();
    let mut limit = RateLimit::new(per_minute, RATE_BURST, Instant::now().into_std());
    let mut flush_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            notice = notices.recv() => match notice {
                Some(notice) => {
                    pending.add(notice);
                    flush_at.get_or_insert_with(|| Instant::now() + window);
                }
                None => break,
            },
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                let now = Instant::now();
                let mut allowed = limit.available(now.into_std());
                let mut handed = 0;
                while allowed > 0 && !pending.is_empty() {
                    let Ok(permit) = posts.try_reserve() else { break };
                    let Some(message) = pending.take(1).pop() else { break };
                    permit.send(message);
                    allowed -= 1;
                    handed += 1;
                }
                limit.spend(handed, now.into_std());
                flush_at = if pending.is_empty() {
                    None
                } else if allowed == 0 {
                    Some(Instant::from_std(limit.next_at(now.into_std())))
                } else {
                    Some(now + POSTER_BUSY_RECHECK)
                };
            }
        }
    }
    // Last flush: what is still queued, then everything waiting, past the rate limit (a
    // stopping controller posts no more after it), within the shutdown budget.
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    while let Ok(notice) = notices.try_recv() {
        pending.add(notice);
    }
    for message in pending.take(usize::MAX) {
        if tokio::time::timeout_at(deadline, posts.send(message))
            .await
            .is_err()
        {
            warn!("the webhook is too slow to post what waited at shutdown");
            break;
        }
    }
    deadline
}

struct Poster {
    client: reqwest::Client,
    url: reqwest::Url,
    renderer: Renderer,
    metrics: NotifyMetrics,
}

impl Poster {
    async fn run(self, mut messages: mpsc::Receiver<Message>) {
        while let Some(message) = messages.recv().await {
            let outcome = self.post(&message).await;
            self.metrics.post(message.event, outcome);
        }
    }

    async fn post(&self, message: &Message) -> PostOutcome {
        let event = message.event.as_label();
        let body = match self.renderer.render(message) {
            Ok(body) => body,
            Err(error) => {
                warn!(event, %error, "the notification template failed on this message");
                return PostOutcome::Error;
            }
        };
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        // The URL never goes into a log line: it is the webhook's credential.
        match sent {
            Ok(response) if response.status().is_success() => {
                debug!(event, nodes = message.nodes.len(), "notification sent");
                PostOutcome::Sent
            }
            Ok(response) => {
                warn!(
                    event,
                    status = response.status().as_u16(),
                    "the webhook refused the notification"
                );
                PostOutcome::Rejected
            }
            Err(error) if error.is_timeout() => {
                warn!(
                    event,
                    "the webhook did not answer in time; notification dropped"
                );
                PostOutcome::Timeout
            }
            Err(error) => {
                warn!(event, error = %error.without_url(), "cannot post the notification");
                PostOutcome::Error
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::NotifyEvent;

    fn notice(event: NotifyEvent, node: &str) -> Notice {
        Notice {
            event,
            kind: "spot-interruption",
            node: node.into(),
            event_id: None,
            deadline: None,
            detail: None,
        }
    }

    /// The coalescer alone, on a paused clock: what it hands the poster, and when.
    #[tokio::test(start_paused = true)]
    async fn a_burst_waits_one_window_then_goes_out_coalesced_and_rate_limited() {
        let (tx, rx) = mpsc::channel(4096);
        let (posts, mut to_post) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let window = Duration::from_secs(5);
        let task = tokio::spawn(coalesce(rx, posts, window, 6, shutdown.clone()));
        let start = Instant::now();
        for i in 0..200 {
            tx.send(notice(NotifyEvent::Received, &format!("n{i}")))
                .await
                .unwrap();
            tx.send(notice(NotifyEvent::Started, &format!("n{i}")))
                .await
                .unwrap();
        }
        let first = to_post.recv().await.unwrap();
        assert_eq!(start.elapsed(), window, "held for the window");
        assert_eq!(
            (first.event, first.nodes.len()),
            (NotifyEvent::Received, 200)
        );
        let second = to_post.recv().await.unwrap();
        assert_eq!(
            (second.event, second.nodes.len()),
            (NotifyEvent::Started, 200)
        );

        // Drained one at a time: after the burst of 5, one post every 10 s (6 a minute), and
        // what arrives meanwhile is coalesced into the next.
        let at = Instant::now();
        for i in 0..5 {
            tx.send(notice(NotifyEvent::Succeeded, &format!("a{i}")))
                .await
                .unwrap();
            let m = to_post.recv().await.unwrap();
            assert_eq!(m.count, 1);
        }
        tx.send(notice(NotifyEvent::Failed, "b")).await.unwrap();
        tx.send(notice(NotifyEvent::Succeeded, "c")).await.unwrap();
        tx.send(notice(NotifyEvent::Succeeded, "d")).await.unwrap();
        let m = to_post.recv().await.unwrap();
        assert!(
            at.elapsed() >= Duration::from_secs(9),
            "rate-limited: {:?}",
            at.elapsed()
        );
        assert_eq!((m.event, m.count), (NotifyEvent::Succeeded, 2));
        let m = to_post.recv().await.unwrap();
        assert_eq!((m.event, m.count), (NotifyEvent::Failed, 1));

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_poster_never_blocks_the_queue_and_waiting_notices_coalesce() {
        let (tx, rx) = mpsc::channel(16);
        let (posts, mut to_post) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(coalesce(
            rx,
            posts,
            Duration::from_secs(1),
            600,
            shutdown.clone(),
        ));
        // Nobody reads `to_post` (a hanging webhook): the coalescer still drains its queue,
        // far beyond the queue's 16.
        for i in 0..1000 {
            tokio::time::timeout(
                Duration::from_secs(1),
                tx.send(notice(NotifyEvent::Received, &format!("n{}", i % 50))),
            )
            .await
            .expect("the notice queue never stays full")
            .expect("the coalescer is running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One message went into the channel; all the rest waits as one group of 50 nodes.
        let first = to_post.recv().await.unwrap();
        let rest = to_post.recv().await.unwrap();
        assert_eq!(first.count + rest.count, 1000);
        assert_eq!(rest.nodes.len(), 50);
        shutdown.cancel();
        task.await.unwrap();
    }
}
