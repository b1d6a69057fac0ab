//! What a drain tells its caller while it runs ([`ProgressEvent`]) and when it ends
//! ([`DrainReport`]). Plain data: the CLI renders it, the controller turns it into metrics and
//! Events, tests assert on it.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::plan::{IgnoredPod, OwnerSummary, PlanWarning, RefusedPod, Tier};
use super::policy::Strategy;
use crate::node::Phase;

/// A pod by namespace and name, printed `namespace/name` like kubectl.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod has not left yet. Everything a stuck drain can be waiting for, named precisely
/// enough to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Blocker {
    /// A PodDisruptionBudget refuses the eviction. `disruptions_allowed` is its status as last
    /// seen (`None`: not computed yet); `message` the apiserver's explanation when it gave one.
    #[serde(rename_all = "camelCase")]
    Pdb {
        name: String,
        disruptions_allowed: Option<i32>,
        message: Option<String>,
    },
    /// Covered by several PDBs: the Eviction API refuses such a pod whatever the budgets say.
    MultiplePdbs { names: Vec<String> },
    /// `surge`: the Deployment has fewer Ready replacements on other nodes than needed.
    SurgeNotReady {
        deployment: String,
        ready: usize,
        wanted: usize,
    },
    /// `wait`: the pod has not completed.
    StillRunning,
    /// `karpenter.sh/do-not-disrupt` with a duration (voluntary drains): the pod is left alone
    /// until `until`; then the step carries out its strategy.
    DoNotDisrupt {
        value: String,
        until: jiff::Timestamp,
    },
    /// Evicted or deleted; its containers are still stopping.
    Terminating,
    /// Not started: earlier pods (lower order or tier) are not gone yet.
    #[serde(rename_all = "camelCase")]
    EarlierWave { order: i32, tier: Tier },
    /// A load balancer still routes new connections to the pod: its eviction waits until the
    /// target is `draining` or gone, the group's delay has passed, or the deadline comes.
    LoadBalancer {
        group: String,
        target: String,
        state: String,
        until: jiff::Timestamp,
    },
    /// The apiserver asked us to slow down (API Priority and Fairness).
    Throttled { message: String },
    /// The last request failed; retried with backoff.
    ApiError { message: String },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::Pdb {
                name,
                disruptions_allowed,
                message,
            } => {
                match disruptions_allowed {
                    Some(1) => write!(f, "PDB {name} allows 1 disruption")?,
                    Some(n) => write!(f, "PDB {name} allows {n} disruptions")?,
                    None => write!(f, "PDB {name} has no status yet")?,
                }
                if let Some(message) = message {
                    write!(f, " ({message})")?;
                }
                Ok(())
            }
            Blocker::MultiplePdbs { names } => write!(
                f,
                "covered by {} PDBs ({}): the Eviction API refuses pods with more than one PDB",
                names.len(),
                names.join(", ")
            ),
            Blocker::SurgeNotReady {
                deployment,
                ready,
                wanted,
            } => write!(
                f,
                "surge replacement not Ready: Deployment {deployment} has {ready} of {wanted} \
                 new Ready pods on other nodes"
            ),
            Blocker::StillRunning => f.write_str("wait: pod still running"),
            Blocker::DoNotDisrupt { value, until } => write!(
                f,
                "{}={value}: left alone until {until}, then drained",
                crate::names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT
            ),
            Blocker::Terminating => f.write_str("terminating: containers still stopping"),
            Blocker::EarlierWave { order, tier } => write!(
                f,
                "not started: waiting for pods before order {order} / tier {tier} to be gone"
            ),
            Blocker::LoadBalancer {
                group,
                target,
                state,
                until,
            } => write!(
                f,
                "load balancer: target group {group} still routes new connections to {target} \
                 ({state}); waiting until it drains, at most until {until}"
            ),
            Blocker::Throttled { message } => write!(f, "apiserver throttling: {message}"),
            Blocker::ApiError { message } => write!(f, "API error (retrying): {message}"),
        }
    }
}

/// Why a load-balancer wait ended while a target still took new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerCut {
    /// The pod's latest start under the deadline came.
    Deadline,
    /// The group's deregistration delay passed since deregistration began.
    DelayElapsed,
}

impl LoadBalancerCut {
    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            LoadBalancerCut::Deadline => "deadline",
            LoadBalancerCut::DelayElapsed => "delay",
        }
    }
}

impl fmt::Display for LoadBalancerCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadBalancerCut::Deadline => "the deadline came",
            LoadBalancerCut::DelayElapsed => "its deregistration delay passed",
        })
    }
}

/// A PDB as it was when an eviction went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PdbSeen {
    pub name: String,
    pub disruptions_allowed: Option<i32>,
}

/// One change in one pod's drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum PodChange {
    /// The Eviction API accepted; the pod has `grace_seconds` to stop.
    #[serde(rename_all = "camelCase")]
    Evicting {
        grace_seconds: i64,
        pdb: Option<PdbSeen>,
    },
    /// Deleted (strategy `delete` or `--disable-eviction`).
    #[serde(rename_all = "camelCase")]
    Deleting { grace_seconds: i64 },
    /// `surge`: the Deployment's rollout restarts (`restarted` false: it already had).
    Surging { deployment: String, restarted: bool },
    /// `surge`: a replacement is Ready elsewhere; the old pod may go.
    ReplacementReady { deployment: String },
    /// `surge` is not possible for this Deployment; evicting instead.
    SurgeFallback { reason: String },
    /// `wait`: left alone until it completes (or the deadline).
    Waiting,
    /// Something refuses or delays it; reported once per distinct blocker.
    Blocked { blocker: Blocker },
    /// Deleted past its blocker because the deadline left no more time.
    #[serde(rename_all = "camelCase")]
    DeadlineOverride {
        grace_seconds: i64,
        blocker: Option<Blocker>,
    },
    /// Stopped while a load balancer still routed new connections to it (see
    /// [`LoadBalancerCut`]).
    LoadBalancerWaitCut {
        reason: LoadBalancerCut,
        group: String,
        target: String,
        state: String,
    },
    /// Terminating because someone else deleted it (a rollout, another tool).
    TerminatingElsewhere,
    /// Its PDB already counted it as evicted, but the approved eviction never deleted it (its
    /// request was cut off with its sender): deleted with the same grace, so the budget it holds
    /// is not stuck until the disruption controller expires the entry.
    #[serde(rename_all = "camelCase")]
    EvictionCompleted { pdb: String, grace_seconds: i64 },
    /// The pod no longer exists (or has completed); `after` counts from when nodedrain first
    /// acted on it.
    Gone {
        #[serde(with = "seconds")]
        after: Duration,
        completed: bool,
    },
}

impl fmt::Display for PodChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodChange::Evicting { grace_seconds, pdb } => match pdb {
                Some(PdbSeen {
                    name,
                    disruptions_allowed: Some(n),
                }) => write!(
                    f,
                    "evicting (PDB {name} allows {n}, grace {grace_seconds}s)"
                ),
                Some(PdbSeen { name, .. }) => {
                    write!(f, "evicting (PDB {name}, grace {grace_seconds}s)")
                }
                None => write!(f, "evicting (no PDB, grace {grace_seconds}s)"),
            },
            PodChange::Deleting { grace_seconds } => {
                write!(f, "deleting (grace {grace_seconds}s)")
            }
            PodChange::Surging {
                deployment,
                restarted: true,
            } => write!(
                f,
                "surging: restarted Deployment {deployment}, waiting for a Ready replacement"
            ),
            PodChange::Surging { deployment, .. } => write!(
                f,
                "surging: Deployment {deployment} already restarting, waiting for a Ready replacement"
            ),
            PodChange::ReplacementReady { deployment } => {
                write!(f, "replacement Ready (Deployment {deployment})")
            }
            PodChange::SurgeFallback { reason } => {
                write!(f, "cannot surge ({reason}); evicting instead")
            }
            PodChange::Waiting => f.write_str("waiting for it to complete (strategy wait)"),
            PodChange::Blocked { blocker } => write!(f, "blocked: {blocker}"),
            PodChange::DeadlineOverride {
                grace_seconds,
                blocker,
            } => {
                write!(f, "deadline: deleting with grace {grace_seconds}s")?;
                if let Some(blocker) = blocker {
                    write!(f, " past {blocker}")?;
                }
                Ok(())
            }
            PodChange::LoadBalancerWaitCut {
                reason,
                group,
                target,
                state,
            } => write!(
                f,
                "stopping although target group {group} still routes to {target} ({state}): {reason}"
            ),
            PodChange::TerminatingElsewhere => {
                f.write_str("terminating (deleted by another actor)")
            }
            PodChange::EvictionCompleted { pdb, grace_seconds } => write!(
                f,
                "completing an approved eviction (PDB {pdb} counts it evicted; grace {grace_seconds}s)"
            ),
            PodChange::Gone {
                after,
                completed: true,
            } => write!(f, "completed after {:.1}s", after.as_secs_f64()),
            PodChange::Gone { after, .. } => write!(f, "gone after {:.1}s", after.as_secs_f64()),
        }
    }
}

/// What a drain reports while it runs, in the order things happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum ProgressEvent {
    /// Cordoned, tainted, labelled, record written. Every node gets this before any pod moves.
    Cordoned { node: String },
    /// The plan for a node: how many pods must leave, stay, or are refused.
    Planned {
        node: String,
        steps: usize,
        ignored: usize,
        refused: usize,
    },
    /// Pods that need a flag; nothing is evicted anywhere.
    Refused { node: String, pods: Vec<RefusedPod> },
    /// Something the workload owner should fix (also sent as a Warning Event on the pod).
    Warning { node: String, warning: PlanWarning },
    /// A pod changed state.
    Pod {
        node: String,
        pod: PodRef,
        change: PodChange,
    },
    /// Every pod that had to leave this node has left.
    NodeDrained {
        node: String,
        #[serde(with = "seconds")]
        after: Duration,
    },
}

/// How the whole drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DrainOutcome {
    /// Every node is empty of pods that had to leave.
    Drained,
    /// Some pods need a flag (`--force`, `--delete-emptydir-data`, `--ignore-daemonsets`);
    /// nothing was evicted, the nodes stay cordoned.
    Refused,
    /// `timeout` passed first; the report says what blocked.
    TimedOut,
    /// The caller cancelled (Ctrl-C, lost leadership).
    Cancelled,
}

impl DrainOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainOutcome::Drained => "drained",
            DrainOutcome::Refused => "refused",
            DrainOutcome::TimedOut => "timedOut",
            DrainOutcome::Cancelled => "cancelled",
        }
    }
}

/// Where one pod ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub pod: PodRef,
    pub owner: Option<OwnerSummary>,
    pub strategy: Strategy,
    pub tier: Tier,
    pub order: i32,
    /// `true` once the pod no longer exists (or completed).
    pub gone: bool,
    /// Seconds from nodedrain's first action to the pod being gone.
    #[serde(with = "opt_seconds")]
    pub gone_after: Option<Duration>,
    /// Deleted past a blocker because of the deadline.
    pub deadline_override: bool,
    /// Why it is still there (`None` when gone).
    pub blocker: Option<Blocker>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    /// Every pod that had to leave has left.
    pub drained: bool,
    /// The drain record's phase as written at the end.
    pub phase: Phase,
    pub pods: Vec<PodReport>,
    pub ignored: Vec<IgnoredPod>,
    pub refused: Vec<RefusedPod>,
    pub warnings: Vec<PlanWarning>,
}

impl NodeReport {
    /// Pods that had to leave and did not.
    pub fn remaining(&self) -> impl Iterator<Item = &PodReport> {
        self.pods.iter().filter(|p| !p.gone)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    pub outcome: DrainOutcome,
    #[serde(with = "seconds")]
    pub elapsed: Duration,
    pub nodes: Vec<NodeReport>,
}

impl DrainReport {
    /// Exit-status truth: every node is empty of pods that had to leave.
    pub fn is_success(&self) -> bool {
        self.outcome == DrainOutcome::Drained && self.nodes.iter().all(|n| n.drained)
    }
}

/// Durations as fractional seconds in JSON, which every consumer can read.
mod seconds {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
    }
}

mod opt_seconds {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&((d.as_secs_f64() * 1000.0).round() / 1000.0)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_the_cli_promises() {
        let evicting = PodChange::Evicting {
            grace_seconds: 5,
            pdb: Some(PdbSeen {
                name: "web".into(),
                disruptions_allowed: Some(1),
            }),
        };
        assert_eq!(
            evicting.to_string(),
            "evicting (PDB web allows 1, grace 5s)"
        );
        let gone = PodChange::Gone {
            after: Duration::from_millis(5_140),
            completed: false,
        };
        assert_eq!(gone.to_string(), "gone after 5.1s");
        let blocked = Blocker::Pdb {
            name: "web".into(),
            disruptions_allowed: Some(0),
            message: None,
        };
        assert_eq!(blocked.to_string(), "PDB web allows 0 disruptions");
        let json = serde_json::to_value(ProgressEvent::Pod {
            node: "n".into(),
            pod: PodRef {
                namespace: "shop".into(),
                name: "web-1".into(),
            },
            change: gone,
        })
        .unwrap();
        assert_eq!(json["event"], "pod");
        assert_eq!(json["change"]["kind"], "gone");
        assert_eq!(json["change"]["after"], 5.14);
    }
}
