//! Leader election on a `coordination.k8s.io/v1` Lease, the protocol of client-go's
//! `leaderelection` (kube 5 has none).
//!
//! - Every `retry_period` each replica reads the Lease. The holder renews it; the others take it
//!   over when it is free (no holder) or expired.
//! - "Expired" is judged on this replica's clock: the lease counts as alive for
//!   `leaseDurationSeconds` after this replica last *saw the record change*, not after the
//!   `renewTime` written by another machine, so clock skew between nodes cannot cause two
//!   leaders.
//! - Writes are replaces carrying the read `resourceVersion`: of two replicas racing for an
//!   expired lease, the apiserver accepts one and answers 409 to the other.
//! - A leader that cannot renew steps down once `renew_deadline` has passed since the start of
//!   its last successful renewal: an attempt never runs past that moment, and the check comes
//!   at most one `retry_period` late, so it stops acting within `renew_deadline + retry_period`.
//!   A standby takes over no sooner than `lease_duration` after it saw that renewal, which came
//!   after the attempt started. So two replicas never act at once *provided* the lease duration
//!   exceeds renew deadline + retry period, which `config` enforces; requests the old leader
//!   already sent are not recalled (see the README's High availability section).
//! - On shutdown the leader clears `holderIdentity`, and a standby takes over at its next try
//!   instead of after the lease expires.
//!
//! Consumers watch a `watch::Receiver<bool>` ("I am the leader now").

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{LeaseConfig, lease_seconds};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease {namespace}/{name}: no answer within the renew deadline")]
    Timeout { namespace: String, name: String },
}

// ---------------------------------------------------------------------------------------------
// Pure part

/// What this replica last saw of the lease record, and when (on its own clock).
#[derive(Debug, Clone, Default)]
struct Observed {
    record: Option<(Option<String>, Option<MicroTime>, Option<i32>)>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes the record; the clock restarts only when the record changed.
    fn observe(&mut self, spec: &LeaseSpec, now: Instant) {
        let record = Some((
            spec.holder_identity.clone(),
            spec.renew_time.clone(),
            spec.lease_duration_seconds,
        ));
        if self.record != record || self.at.is_none() {
            self.record = record;
            self.at = Some(now);
        }
    }
}

/// What to do with the lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// No Lease object: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it over.
    Acquire,
    /// Someone else holds a live lease.
    Follow { holder: String },
}

fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    observed: &Observed,
    default_duration: Duration,
    now: Instant,
) -> Step {
    let Some(spec) = spec else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Step::Acquire;
    }
    if holder == me {
        return Step::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_duration, Duration::from_secs);
    let expired = observed
        .at
        .is_some_and(|at| now.saturating_duration_since(at) >= duration);
    if expired {
        Step::Acquire
    } else {
        Step::Follow {
            holder: holder.to_string(),
        }
    }
}

fn duration_seconds(d: Duration) -> i32 {
    i32::try_from(lease_seconds(d)).unwrap_or(i32::MAX)
}

// ---------------------------------------------------------------------------------------------
// The elector

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    metrics: Option<Metrics>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            leader: watch::channel(false).0,
            metrics: None,
        }
    }

    /// Keeps `nodedrain_leader` in step with the signal.
    pub fn with_metrics(mut self, metrics: Metrics) -> LeaderElector {
        self.metrics = Some(metrics);
        self
    }

    /// "Is leader" signal: true while this replica holds the lease. Act only while true, and
    /// stop acting as soon as it turns false.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Campaigns and renews until `cancel`; then, if leading, steps down and releases the lease.
    /// Dropping the future instead (a crash) leaves the lease to expire.
    pub async fn run(self, cancel: CancellationToken) {
        let mut observed = Observed::default();
        let mut last_renew: Option<Instant> = None;
        info!(
            lease = %format!("{}/{}", self.config.namespace, self.config.name),
            identity = %self.config.identity,
            "campaigning for leadership"
        );
        loop {
            let started = Instant::now();
            let budget = match last_renew {
                // A leader's attempt may not outlive its renew deadline: a hung request must not
                // keep it acting after a standby may have taken over.
                Some(renewed) if *self.leader.borrow() => {
                    (renewed + self.config.renew_deadline).saturating_duration_since(started)
                }
                _ => self.config.renew_deadline,
            };
            let attempt = tokio::time::timeout(budget, self.try_acquire_or_renew(&mut observed))
                .await
                .unwrap_or_else(|_| {
                    Err(LeaderError::Timeout {
                        namespace: self.config.namespace.clone(),
                        name: self.config.name.clone(),
                    })
                });
            let now = Instant::now();
            match attempt {
                Ok(true) => {
                    // The apiserver wrote the renewal after this attempt started, and standbys
                    // count from when they saw it: counting from the start errs on the safe side.
                    last_renew = Some(started);
                    self.set_leader(true);
                }
                Ok(false) => {
                    last_renew = None;
                    self.set_leader(false);
                }
                Err(e) => {
                    let leading = *self.leader.borrow();
                    if leading
                        && last_renew.is_none_or(|t| {
                            now.saturating_duration_since(t) >= self.config.renew_deadline
                        })
                    {
                        warn!(error = %e, "could not renew the lease within the renew deadline; stepping down");
                        last_renew = None;
                        self.set_leader(false);
                    } else {
                        warn!(error = %e, leading, "lease update failed; retrying");
                    }
                }
            }
            // Standbys add jitter (as client-go does) so replicas started together do not keep
            // hitting the apiserver in the same millisecond.
            let mut delay = self.config.retry_period;
            if !*self.leader.borrow() {
                delay = delay.mul_f64(rand::rng().random_range(1.0..1.2));
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if *self.leader.borrow() {
            // Stop acting first, then hand the lease over.
            info!("shutting down: stepping down and handing the lease over");
            self.set_leader(false);
            match tokio::time::timeout(self.config.renew_deadline, self.release()).await {
                Ok(Ok(())) => info!("released the lease"),
                Ok(Err(e)) => warn!(error = %e, "could not release the lease; it will expire"),
                Err(_) => warn!("releasing the lease timed out; it will expire"),
            }
        }
    }

    fn set_leader(&self, leading: bool) {
        let changed = self.leader.send_if_modified(|l| {
            let changed = *l != leading;
            *l = leading;
            changed
        });
        if changed {
            if leading {
                info!(identity = %self.config.identity, "became the leader");
            } else {
                info!(identity = %self.config.identity, "no longer the leader");
            }
        }
        if let Some(m) = &self.metrics {
            m.set_leader(leading);
        }
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// One round: read, decide, write. Ok(true) when we hold the lease afterwards.
    async fn try_acquire_or_renew(&self, observed: &mut Observed) -> Result<bool, LeaderError> {
        let current = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let now = Instant::now();
        if let Some(spec) = current.as_ref().and_then(|l| l.spec.as_ref()) {
            observed.observe(spec, now);
        }
        let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        let step = decide(
            spec.as_ref(),
            &self.config.identity,
            observed,
            self.config.lease_duration,
            now,
        );
        let stamp = Some(MicroTime(Timestamp::now()));
        let result = match step {
            Step::Follow { .. } => return Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(duration_seconds(self.config.lease_duration)),
                        acquire_time: stamp.clone(),
                        renew_time: stamp,
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Step::Renew | Step::Acquire => {
                // Present: Create is the only step without a current object.
                let Some(mut lease) = current else {
                    return Ok(false);
                };
                let mut spec = lease.spec.take().unwrap_or_default();
                if step == Step::Acquire {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = stamp.clone();
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = stamp;
                spec.lease_duration_seconds = Some(duration_seconds(self.config.lease_duration));
                lease.spec = Some(spec);
                // `lease` still carries the resourceVersion we read: a concurrent writer makes
                // this a 409 instead of a silent overwrite.
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(lease) => {
                if let Some(spec) = &lease.spec {
                    observed.observe(spec, Instant::now());
                }
                Ok(true)
            }
            // Lost a race (409 Conflict on replace, AlreadyExists on create): someone else
            // wrote first; we are not the leader this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Clears the holder if it is still us, so a standby may take over at once.
    async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error(e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote since we read: then it is not ours to clear any more.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.api_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renew_secs: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(Timestamp::from_second(renew_secs).unwrap())),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[tokio::test(start_paused = true)]
    async fn a_missing_free_or_own_lease_is_taken() {
        let now = Instant::now();
        let seen = Observed::default();
        assert_eq!(decide(None, "me", &seen, D, now), Step::Create);
        assert_eq!(
            decide(Some(&spec(None, 0, 15)), "me", &seen, D, now),
            Step::Acquire
        );
        assert_eq!(
            decide(Some(&spec(Some(""), 0, 15)), "me", &seen, D, now),
            Step::Acquire
        );
        assert_eq!(
            decide(Some(&spec(Some("me"), 0, 15)), "me", &seen, D, now),
            Step::Renew
        );
    }

    #[tokio::test(start_paused = true)]
    async fn another_holder_expires_a_lease_duration_after_its_last_change_on_our_clock() {
        let mut seen = Observed::default();
        let t0 = Instant::now();
        // The renewTime is far in the past by the wall clock (skew): irrelevant.
        let held = spec(Some("other"), 0, 15);
        seen.observe(&held, t0);
        let follow = Step::Follow {
            holder: "other".into(),
        };
        assert_eq!(decide(Some(&held), "me", &seen, D, t0), follow);
        tokio::time::advance(Duration::from_secs(10)).await;
        // Renewed: the record changed, the clock restarts.
        let renewed = spec(Some("other"), 10, 15);
        seen.observe(&renewed, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            decide(Some(&renewed), "me", &seen, D, Instant::now()),
            follow
        );
        // Unchanged for 15 s: expired.
        seen.observe(&renewed, Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            decide(Some(&renewed), "me", &seen, D, Instant::now()),
            Step::Acquire
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_says_how_long_it_lasts() {
        let mut seen = Observed::default();
        let short = spec(Some("other"), 0, 1);
        seen.observe(&short, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            decide(Some(&short), "me", &seen, D, Instant::now()),
            Step::Acquire
        );
        // Without a duration in the lease, ours applies.
        let mut no_duration = spec(Some("other"), 0, 1);
        no_duration.lease_duration_seconds = None;
        let mut seen = Observed::default();
        seen.observe(&no_duration, Instant::now());
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(matches!(
            decide(Some(&no_duration), "me", &seen, D, Instant::now()),
            Step::Follow { .. }
        ));
    }

    #[test]
    fn defaults_match_client_go() {
        let c = LeaseConfig::new("nodedrain", "kube-system", "pod-a");
        assert_eq!(
            (c.lease_duration, c.renew_deadline, c.retry_period),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        assert_eq!(duration_seconds(Duration::from_millis(300)), 1);
    }
}
