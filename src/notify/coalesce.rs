//! Coalescing and rate limiting of notices, as pure state: time comes in as a parameter.
//!
//! Notices are grouped by (event, interruption kind) while they wait: 200 spot warnings read in
//! one burst become one "200 nodes cordoned for spot-interruption" message, not 200. Memory is
//! bounded by the number of distinct nodes (each group keeps a set of node names, and a node is
//! one entry however often it is named) plus at most [`MAX_NAMED`] details per group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;

use super::{Notice, NotifyEvent};

/// Details (pods overridden, what a failed drain left) one message lists before "and N more":
/// a chat line stays readable, and a webhook body stays small.
pub const MAX_NAMED: usize = 10;

/// One message to post: every waiting notice of one event and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub event: NotifyEvent,
    /// The interruption kind (`spot-interruption`, ...) or `manual`.
    pub kind: &'static str,
    /// How many notices this message stands for: drains, or pods for deadline overrides.
    pub count: usize,
    /// Every node concerned, sorted.
    pub nodes: Vec<String>,
    /// Up to [`MAX_NAMED`] details (`namespace/pod`, what a failed drain left), in arrival order.
    pub details: Vec<String>,
    /// Details left out of `details`.
    pub more_details: usize,
    /// The interruption's event id when the message is about one notice.
    pub event_id: Option<String>,
    /// The earliest deadline among the notices.
    pub deadline: Option<Timestamp>,
}

#[derive(Debug, Default)]
struct Group {
    count: usize,
    nodes: BTreeSet<String>,
    details: Vec<String>,
    more_details: usize,
    event_id: Option<String>,
    deadline: Option<Timestamp>,
}

/// Notices waiting to be posted.
#[derive(Debug, Default)]
pub struct Pending {
    /// Ordered by event first, so a flush posts "cordoned" before "drained".
    groups: BTreeMap<(NotifyEvent, &'static str), Group>,
}

impl Pending {
    pub fn add(&mut self, notice: Notice) {
        let group = self.groups.entry((notice.event, notice.kind)).or_default();
        group.count += 1;
        group.nodes.insert(notice.node);
        if let Some(detail) = notice.detail {
            if group.details.len() < MAX_NAMED {
                group.details.push(detail);
            } else {
                group.more_details += 1;
            }
        }
        if group.count == 1 {
            group.event_id = notice.event_id;
        }
        group.deadline = match (group.deadline, notice.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Takes up to `max` messages out, earliest event first; the rest keep waiting (and keep
    /// coalescing).
    pub fn take(&mut self, max: usize) -> Vec<Message> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(((event, kind), group)) = self.groups.pop_first() else {
                break;
            };
            out.push(Message {
                event,
                kind,
                count: group.count,
                nodes: group.nodes.into_iter().collect(),
                details: group.details,
                more_details: group.more_details,
                event_id: if group.count == 1 {
                    group.event_id
                } else {
                    None
                },
                deadline: group.deadline,
            });
        }
        out
    }
}

/// Fractions of a token below this are rounding, not missing time (a millionth of a post).
const TOKEN_EPSILON: f64 = 1e-6;

/// The shortest wait [`RateLimit::next_at`] asks for: the timer's own resolution.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A token bucket: at most `burst` posts at once, refilled at `per_minute`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    burst: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl RateLimit {
    /// Starts full. `per_minute` must be positive (the configuration checks it).
    pub fn new(per_minute: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit {
            burst,
            per_second: f64::from(per_minute.max(1)) / 60.0,
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.updated = now;
    }

    /// Whole posts allowed now. Refills are sums of floating-point fractions: a token that is
    /// "whole" up to rounding counts, or [`next_at`](Self::next_at) would say "now" forever.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        (self.tokens + TOKEN_EPSILON).floor() as usize
    }

    /// Spends `posts` tokens (at most what is available).
    pub fn spend(&mut self, posts: usize, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - posts as f64).max(0.0);
    }

    /// When the next whole token is there; never sooner than [`MIN_WAIT`] from `now`, so a
    /// caller sleeping until then always lets time pass.
    pub fn next_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let missing = (1.0 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / self.per_second).max(MIN_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(event: NotifyEvent, node: &str, detail: Option<&str>) -> Notice {
        Notice {
            event,
            kind: "spot-interruption",
            node: node.to_string(),
            event_id: Some(format!("ev-{node}")),
            deadline: None,
            detail: detail.map(str::to_string),
        }
    }

    #[test]
    fn a_burst_of_one_event_becomes_one_message_naming_every_node_once() {
        let mut pending = Pending::default();
        for i in 0..200 {
            pending.add(notice(NotifyEvent::Received, &format!("n{i:03}"), None));
        }
        // A redelivered warning names a node again: still one node.
        pending.add(notice(NotifyEvent::Received, "n000", None));
        let messages = pending.take(10);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].count, 201);
        assert_eq!(messages[0].nodes.len(), 200);
        assert_eq!(messages[0].event_id, None, "many events: no single id");
        assert!(pending.is_empty());
    }

    #[test]
    fn one_notice_keeps_its_event_id_and_messages_come_in_event_order() {
        let mut pending = Pending::default();
        pending.add(notice(NotifyEvent::Succeeded, "a", None));
        pending.add(notice(NotifyEvent::Received, "b", None));
        pending.add(notice(NotifyEvent::Started, "b", None));
        let first = pending.take(1);
        assert_eq!(first[0].event, NotifyEvent::Received);
        assert_eq!(first[0].event_id.as_deref(), Some("ev-b"));
        // What was not taken keeps waiting and keeps coalescing.
        pending.add(notice(NotifyEvent::Started, "c", None));
        let rest = pending.take(10);
        assert_eq!(
            rest.iter().map(|m| (m.event, m.count)).collect::<Vec<_>>(),
            [(NotifyEvent::Started, 2), (NotifyEvent::Succeeded, 1)]
        );
    }

    #[test]
    fn details_are_capped_and_the_rest_counted() {
        let mut pending = Pending::default();
        for i in 0..25 {
            pending.add(notice(
                NotifyEvent::DeadlineOverride,
                "n1",
                Some(&format!("ns/p{i}")),
            ));
        }
        let message = pending.take(1).remove(0);
        assert_eq!(message.count, 25);
        assert_eq!(message.nodes, ["n1"]);
        assert_eq!(message.details.len(), MAX_NAMED);
        assert_eq!(message.details[0], "ns/p0");
        assert_eq!(message.more_details, 25 - MAX_NAMED);
    }

    #[test]
    fn the_earliest_deadline_wins() {
        let mut pending = Pending::default();
        let at = |s| Some(Timestamp::from_second(1_800_000_000i64 + s).unwrap());
        for (node, deadline) in [("a", at(120)), ("b", None), ("c", at(60))] {
            let mut n = notice(NotifyEvent::Received, node, None);
            n.deadline = deadline;
            pending.add(n);
        }
        assert_eq!(pending.take(1)[0].deadline, at(60));
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(6, 3, start);
        assert_eq!(limit.available(start), 3);
        limit.spend(3, start);
        assert_eq!(limit.available(start), 0);
        // 6 a minute: one every 10 s.
        assert_eq!(limit.next_at(start), start + Duration::from_secs(10));
        assert_eq!(limit.available(start + Duration::from_secs(9)), 0);
        assert_eq!(limit.available(start + Duration::from_secs(10)), 1);
        // Spent down to a rounding error below one, the next token is whole at once, and the
        // wait is never zero.
        limit.spend(1, start + Duration::from_secs(10));
        let t = start + Duration::from_secs(10) + Duration::from_nanos(9_999_999_999);
        assert_eq!(limit.available(t), 1);
        limit.spend(1, t);
        assert!(limit.next_at(t) >= t + MIN_WAIT);
        // Never more than the burst, however long it was idle.
        assert_eq!(limit.available(start + Duration::from_secs(3600)), 3);
    }
}
