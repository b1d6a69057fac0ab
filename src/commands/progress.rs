//! What the live progress line of `nodedrain drain` says: the pod that blocks the drain now,
//! and the time elapsed the way kubectl users read durations.
//!
//! The engine reports a blocker once per distinct blocker, so the last blocker reported is not
//! what blocks now: after `checkout` (PDB allows 0) is gone, `video-encoder` may still be
//! blocked by what it was blocked by before. [`NodeProgress`] keeps the current state of every
//! pod and answers from that.

use std::fmt::Write as _;
use std::time::Duration;

use crate::drain::report::{Blocker, PodChange, PodRef};

/// One pod's state as far as the progress line cares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodState {
    /// Cannot leave yet, for this reason.
    Blocked(Blocker),
    /// Evicted or deleted: its containers are stopping.
    Stopping,
    /// Waiting for pods before it (order, tier): not a blocker of its own.
    Queued,
    /// Being worked on (surge started, wait started) without a blocker reported.
    Busy,
}

/// The pods of one node that have not left, in the order they were first reported.
#[derive(Debug, Default)]
pub struct NodeProgress {
    pods: Vec<(PodRef, PodState)>,
}

impl NodeProgress {
    pub fn apply(&mut self, pod: &PodRef, change: &PodChange) {
        let state = match change {
            PodChange::Gone { .. } => {
                self.pods.retain(|(p, _)| p != pod);
                return;
            }
            PodChange::Blocked {
                blocker: Blocker::Terminating,
            } => PodState::Stopping,
            PodChange::Blocked {
                blocker: Blocker::EarlierWave { .. },
            } => PodState::Queued,
            PodChange::Blocked { blocker } => PodState::Blocked(blocker.clone()),
            PodChange::Waiting => PodState::Blocked(Blocker::StillRunning),
            PodChange::Evicting { .. }
            | PodChange::Deleting { .. }
            | PodChange::DeadlineOverride { .. }
            | PodChange::TerminatingElsewhere
            | PodChange::LoadBalancerWaitCut { .. }
            | PodChange::EvictionCompleted { .. } => PodState::Stopping,
            PodChange::Surging { .. }
            | PodChange::ReplacementReady { .. }
            | PodChange::SurgeFallback { .. } => PodState::Busy,
        };
        match self.pods.iter_mut().find(|(p, _)| p == pod) {
            Some((_, current)) => *current = state,
            None => self.pods.push((pod.clone(), state)),
        }
    }

    /// What the drain waits for now: the longest-blocked pod and its blocker, else the pods
    /// still stopping; `None` when nothing is known to hold it.
    pub fn message(&self) -> Option<String> {
        let blocked: Vec<_> = self
            .pods
            .iter()
            .filter_map(|(pod, state)| match state {
                PodState::Blocked(blocker) => Some((pod, blocker)),
                _ => None,
            })
            .collect();
        if let Some((pod, blocker)) = blocked.first() {
            let mut text = format!("{pod}: {blocker}");
            if blocked.len() > 1 {
                let _ = write!(text, " (+{} more blocked)", blocked.len() - 1);
            }
            return Some(text);
        }
        let stopping: Vec<_> = self
            .pods
            .iter()
            .filter(|(_, state)| *state == PodState::Stopping)
            .map(|(pod, _)| pod)
            .collect();
        match stopping.as_slice() {
            [] => None,
            [pod] => Some(format!("{pod}: stopping")),
            [pod, rest @ ..] => Some(format!("{pod} and {} more: stopping", rest.len())),
        }
    }
}

/// Elapsed time as Go (and so kubectl's own messages) prints a duration, to the second:
/// `45s`, `1m34s`, `1h0m5s`.
pub fn kubectl_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn pdb(name: &str) -> PodChange {
        PodChange::Blocked {
            blocker: Blocker::Pdb {
                name: name.into(),
                disruptions_allowed: Some(0),
                message: None,
            },
        }
    }

    /// The case: once checkout is gone, the line names video-encoder, which has been
    /// blocked all along but was reported before checkout.
    #[test]
    fn the_line_names_what_blocks_now_not_the_last_report() {
        let mut progress = NodeProgress::default();
        progress.apply(&pod("video-encoder"), &PodChange::Waiting);
        progress.apply(&pod("checkout"), &pdb("checkout"));
        assert_eq!(
            progress.message().as_deref(),
            Some("shop/video-encoder: wait: pod still running (+1 more blocked)")
        );
        progress.apply(
            &pod("checkout"),
            &PodChange::Evicting {
                grace_seconds: 30,
                pdb: None,
            },
        );
        assert_eq!(
            progress.message().as_deref(),
            Some("shop/video-encoder: wait: pod still running")
        );
        progress.apply(
            &pod("checkout"),
            &PodChange::Gone {
                after: Duration::from_secs(3),
                completed: false,
            },
        );
        progress.apply(
            &pod("video-encoder"),
            &PodChange::Gone {
                after: Duration::from_secs(94),
                completed: true,
            },
        );
        assert_eq!(progress.message(), None);
    }

    #[test]
    fn stopping_pods_are_named_when_nothing_blocks() {
        let mut progress = NodeProgress::default();
        progress.apply(
            &pod("web-1"),
            &PodChange::Blocked {
                blocker: Blocker::EarlierWave {
                    order: 0,
                    tier: crate::drain::plan::Tier::Critical,
                },
            },
        );
        assert_eq!(progress.message(), None, "queued pods block nothing");
        progress.apply(&pod("web-0"), &PodChange::Deleting { grace_seconds: 5 });
        assert_eq!(progress.message().as_deref(), Some("shop/web-0: stopping"));
        progress.apply(
            &pod("web-1"),
            &PodChange::Blocked {
                blocker: Blocker::Terminating,
            },
        );
        assert_eq!(
            progress.message().as_deref(),
            Some("shop/web-1 and 1 more: stopping")
        );
        // A blocker that goes away with a new state: PDB, then evicted.
        progress.apply(&pod("db-0"), &pdb("db"));
        assert_eq!(
            progress.message().as_deref(),
            Some("shop/db-0: PDB db allows 0 disruptions")
        );
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(kubectl_duration(Duration::from_millis(900)), "0s");
        assert_eq!(kubectl_duration(Duration::from_secs(59)), "59s");
        assert_eq!(kubectl_duration(Duration::from_secs(94)), "1m34s");
        assert_eq!(kubectl_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(kubectl_duration(Duration::from_secs(3605)), "1h0m5s");
    }
}
