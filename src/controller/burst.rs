//! Drains of a burst of interruptions start once the whole burst is cordoned.
//!
//! Spot reclaims come in waves: hundreds of warnings within a second or two, read from the queue
//! in several batches. Every node of one batch is cordoned before any of its drains starts (so
//! evicted pods do not land on a node that goes next); the same reason holds across the batches
//! of a burst. Drains started after the first batch would also load the apiserver with
//! evictions, replacement pods and scheduling while the later batches still wait for their
//! cordons. So drains prepared by a batch are held while batches keep coming, and start when
//! the intake has been quiet for [`SETTLE`], or at the latest [`MAX_HOLD`] after the first was
//! held. Both are small against the two minutes of a spot warning.

use std::time::{Duration, Instant};

/// Quiet time after the last batch before held drains start: longer than the intake's batch
/// window plus a receive, so a burst read by several receivers counts as one.
pub const SETTLE: Duration = Duration::from_millis(300);

/// The longest a drain is held, however long a burst goes on.
pub const MAX_HOLD: Duration = Duration::from_secs(3);

/// What [`BurstHold::release`] says to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Release<T> {
    /// Start these now.
    Start(Vec<T>),
    /// Nothing to start yet; look again at this moment, or when a batch starts or ends.
    WaitUntil(Instant),
    /// Nothing is held.
    Idle,
}

/// Drain starts held back while a burst is being cordoned. Pure: the caller passes the time.
#[derive(Debug)]
pub struct BurstHold<T> {
    held: Vec<T>,
    batches_running: usize,
    last_batch_end: Option<Instant>,
    first_held: Option<Instant>,
    settle: Duration,
    max_hold: Duration,
}

impl<T> Default for BurstHold<T> {
    fn default() -> Self {
        BurstHold::new(SETTLE, MAX_HOLD)
    }
}

impl<T> BurstHold<T> {
    pub fn new(settle: Duration, max_hold: Duration) -> Self {
        BurstHold {
            held: Vec::new(),
            batches_running: 0,
            last_batch_end: None,
            first_held: None,
            settle,
            max_hold,
        }
    }

    /// A batch of messages is being resolved and cordoned.
    pub fn batch_started(&mut self) {
        self.batches_running += 1;
    }

    /// A batch is done; `prepared` are the drains it wants started.
    pub fn batch_ended(&mut self, prepared: impl IntoIterator<Item = T>, now: Instant) {
        self.batches_running = self.batches_running.saturating_sub(1);
        self.last_batch_end = Some(now);
        let before = self.held.len();
        self.held.extend(prepared);
        if before == 0 && !self.held.is_empty() {
            self.first_held = Some(now);
        }
    }

    /// Forgets everything (a new leader term: its resume starts what the records say).
    pub fn clear(&mut self) {
        *self = BurstHold::new(self.settle, self.max_hold);
    }

    pub fn release(&mut self, now: Instant) -> Release<T> {
        let Some(first_held) = self.first_held.filter(|_| !self.held.is_empty()) else {
            return Release::Idle;
        };
        let forced = first_held + self.max_hold;
        let settled = match (self.batches_running, self.last_batch_end) {
            (0, Some(end)) => Some(end + self.settle),
            (0, None) => Some(now),
            _ => None,
        };
        let due = settled.map_or(forced, |settled| settled.min(forced));
        if due <= now {
            self.first_held = None;
            Release::Start(std::mem::take(&mut self.held))
        } else {
            Release::WaitUntil(due)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn hold() -> BurstHold<&'static str> {
        BurstHold::new(300 * MS, 3000 * MS)
    }

    #[test]
    fn nothing_held_is_idle() {
        let t0 = Instant::now();
        let mut hold = hold();
        assert_eq!(hold.release(t0), Release::Idle);
        hold.batch_started();
        hold.batch_ended(Vec::new(), t0);
        assert_eq!(hold.release(t0 + 10_000 * MS), Release::Idle);
    }

    #[test]
    fn a_lone_batch_starts_its_drains_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut hold = hold();
        hold.batch_started();
        hold.batch_ended(["a", "b"], t0);
        assert_eq!(
            hold.release(t0 + 100 * MS),
            Release::WaitUntil(t0 + 300 * MS)
        );
        assert_eq!(hold.release(t0 + 300 * MS), Release::Start(vec!["a", "b"]));
        assert_eq!(hold.release(t0 + 400 * MS), Release::Idle);
    }

    #[test]
    fn batches_of_one_burst_start_together_once_it_is_quiet() {
        let t0 = Instant::now();
        let mut hold = hold();
        hold.batch_started();
        hold.batch_ended(["a"], t0);
        hold.batch_started();
        // A batch in progress holds everything back, up to the cap.
        assert_eq!(
            hold.release(t0 + 500 * MS),
            Release::WaitUntil(t0 + 3000 * MS)
        );
        hold.batch_ended(["b"], t0 + 600 * MS);
        assert_eq!(
            hold.release(t0 + 700 * MS),
            Release::WaitUntil(t0 + 900 * MS)
        );
        assert_eq!(hold.release(t0 + 900 * MS), Release::Start(vec!["a", "b"]));
    }

    #[test]
    fn a_burst_that_goes_on_cannot_hold_a_drain_past_the_cap() {
        let t0 = Instant::now();
        let mut hold = hold();
        hold.batch_started();
        hold.batch_ended(["a"], t0);
        // A batch every 200 ms up to 2.8 s: never quiet for 300 ms.
        for step in 1..=14 {
            let now = t0 + step * 200 * MS;
            hold.batch_started();
            hold.batch_ended(["x"], now);
            assert!(matches!(hold.release(now), Release::WaitUntil(_)));
        }
        match hold.release(t0 + 3000 * MS) {
            Release::Start(started) => assert_eq!(started.first(), Some(&"a")),
            other => panic!("expected a start at the cap, got {other:?}"),
        }
        // The cap counts from the first drain held after a release, not from the burst's start.
        hold.batch_started();
        hold.batch_ended(["y"], t0 + 3100 * MS);
        hold.batch_started();
        assert_eq!(
            hold.release(t0 + 3200 * MS),
            Release::WaitUntil(t0 + 6100 * MS)
        );
    }

    #[test]
    fn clearing_forgets_held_drains_and_running_batches() {
        let t0 = Instant::now();
        let mut hold = hold();
        hold.batch_started();
        hold.batch_ended(["a"], t0);
        hold.batch_started();
        hold.clear();
        assert_eq!(hold.release(t0 + 10_000 * MS), Release::Idle);
        hold.batch_ended(["b"], t0 + 10_000 * MS);
        // batch_ended after a clear does not underflow, and the drain still starts.
        assert_eq!(hold.release(t0 + 10_300 * MS), Release::Start(vec!["b"]));
    }
}
