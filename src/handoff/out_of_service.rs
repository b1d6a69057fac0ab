//! The out-of-service taint (`--out-of-service-taint`): once EC2 says a drained node's instance
//! is gone, the node is tainted `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`.
//!
//! Why: when an instance dies, its kubelet never confirms the deletion of the pods still on the
//! node. A StatefulSet cannot start the replacement of a pod whose name is still taken, and the
//! attach-detach controller keeps its volumes attached for 6 minutes. Kubernetes' non-graceful
//! node shutdown (GA in 1.28) releases both at once for a node that carries this taint and is
//! not Ready. The taint is a promise that the machine is off, so it is only ever set on EC2's
//! word: `shutting-down`, `terminated` or `stopped`, or an instance EC2 no longer lists.
//!
//! [`Tracker`] decides (pure, clock as a parameter); [`OutOfService`] is the one task per
//! controller that asks EC2 for every waiting node in one DescribeInstances call per round, so a
//! burst of 200 interruptions costs one call every [`CHECK_INTERVAL`], not 200.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::Resource as _;
use kube::runtime::events::Recorder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::drain::events::DrainEvent;
use crate::drain::execute::{node_reference, publish, sleep_deadline, sleep_until};
use crate::node::{self, NodeError};
use crate::resolve::Resolver;

/// How often EC2 is asked about the instances whose nodes wait for the taint.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How long after the moment checks begin (the deadline, or the end of the drain if earlier) an
/// instance may keep running before nodedrain stops asking: a Health event's retirement can slip,
/// an Auto Scaling hook can be abandoned, and a node whose instance survives must stay as it is.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);

/// What EC2's answer means for the taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The machine is off or going off: the taint may go on.
    Gone,
    /// `pending`, `running`, `stopping` or a state this code does not know: the kubelet may
    /// still run, so no taint.
    MayRun,
}

/// `state`: EC2's instance-state name, `None` when DescribeInstances no longer lists the
/// instance (EC2 forgets terminated instances after about an hour).
pub fn verdict(state: Option<&str>) -> Verdict {
    match state {
        None | Some("shutting-down" | "terminated" | "stopped") => Verdict::Gone,
        Some(_) => Verdict::MayRun,
    }
}

/// One node waiting for its instance to go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    instance_id: String,
    check_from: Timestamp,
    give_up_at: Timestamp,
}

/// What to do about one node after a round of checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Taint {
        node: String,
        instance_id: String,
        state: Option<String>,
    },
    GiveUp {
        node: String,
        instance_id: String,
        state: String,
    },
}

/// The nodes waiting for their instance to go, and when each is next checked. Pure.
#[derive(Debug, Default)]
pub struct Tracker {
    waiting: BTreeMap<String, Waiting>,
}

impl Tracker {
    /// Checks `node`'s instance from `from` on, until [`GIVE_UP_AFTER`] later. Asked again for
    /// the same node (a resumed drain, the drain's end before its deadline), the earlier start
    /// and the later end win. A window that has already closed at `now` (a new leader reading an
    /// old record) is not opened: the node was given up on, or tainted, long ago.
    pub fn watch(&mut self, node: &str, instance_id: &str, from: Timestamp, now: Timestamp) {
        let give_up_at = from.saturating_add(GIVE_UP_AFTER).unwrap_or(from);
        if now >= give_up_at {
            return;
        }
        self.waiting
            .entry(node.to_string())
            .and_modify(|w| {
                w.instance_id = instance_id.to_string();
                w.check_from = w.check_from.min(from);
                w.give_up_at = w.give_up_at.max(give_up_at);
            })
            .or_insert(Waiting {
                instance_id: instance_id.to_string(),
                check_from: from,
                give_up_at,
            });
    }

    /// Forgets every node: another replica leads now, and resumes them from the node records.
    pub fn clear(&mut self) {
        self.waiting.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The instances to ask EC2 about at `now`.
    pub fn due(&self, now: Timestamp) -> Vec<String> {
        let mut ids: Vec<String> = self
            .waiting
            .values()
            .filter(|w| w.check_from <= now)
            .map(|w| w.instance_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// When the next check is due; `None` with nobody waiting.
    pub fn next_check(&self) -> Option<Timestamp> {
        self.waiting.values().map(|w| w.check_from).min()
    }

    /// EC2 did not answer: every due node is asked again a round later.
    pub fn postpone(&mut self, now: Timestamp) {
        let next = later(now, CHECK_INTERVAL);
        for w in self.waiting.values_mut().filter(|w| w.check_from <= now) {
            w.check_from = next;
        }
    }

    /// Applies EC2's answer about the due instances (`states`: state name by instance id, only
    /// the instances EC2 still lists). Gone: taint, and forget the node. Still running: check
    /// again a round later, or give up past its time.
    pub fn settle(
        &mut self,
        states: &HashMap<String, Option<String>>,
        now: Timestamp,
    ) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let next = later(now, CHECK_INTERVAL);
        self.waiting.retain(|node, w| {
            if w.check_from > now {
                return true;
            }
            let state = states.get(&w.instance_id).cloned().flatten();
            match verdict(state.as_deref()) {
                Verdict::Gone => {
                    decisions.push(Decision::Taint {
                        node: node.clone(),
                        instance_id: w.instance_id.clone(),
                        state,
                    });
                    false
                }
                Verdict::MayRun if now >= w.give_up_at => {
                    decisions.push(Decision::GiveUp {
                        node: node.clone(),
                        instance_id: w.instance_id.clone(),
                        state: state.unwrap_or_default(),
                    });
                    false
                }
                Verdict::MayRun => {
                    w.check_from = next;
                    true
                }
            }
        });
        decisions
    }
}

fn later(now: Timestamp, by: Duration) -> Timestamp {
    now.saturating_add(SignedDuration::try_from(by).unwrap_or(SignedDuration::ZERO))
        .unwrap_or(now)
}

enum Command {
    Watch {
        node: String,
        instance_id: String,
        from: Timestamp,
    },
    Clear,
}

/// The handle the controller registers nodes with. Cheap to clone; the task ends when every
/// handle is dropped or `stop` fires.
#[derive(Clone)]
pub struct OutOfService {
    commands: mpsc::UnboundedSender<Command>,
}

impl OutOfService {
    /// Starts the task that checks and taints.
    pub fn start(
        nodes: Api<Node>,
        resolver: Resolver,
        recorder: Recorder,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(receiver, nodes, resolver, recorder, stop));
        (OutOfService { commands }, task)
    }

    /// Taints `node` once `instance_id` is gone, checking from `from` on (see
    /// [`Tracker::watch`]).
    pub fn watch(&self, node: &str, instance_id: &str, from: Timestamp) {
        let _ = self.commands.send(Command::Watch {
            node: node.to_string(),
            instance_id: instance_id.to_string(),
            from,
        });
    }

    /// Forgets every waiting node (the lease is lost; the next leader resumes them).
    pub fn clear(&self) {
        let _ = self.commands.send(Command::Clear);
    }
}

async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    nodes: Api<Node>,
    resolver: Resolver,
    recorder: Recorder,
    stop: CancellationToken,
) {
    let mut tracker = Tracker::default();
    loop {
        let wake = tracker.next_check().map(sleep_deadline);
        tokio::select! {
            _ = stop.cancelled() => return,
            command = commands.recv() => {
                match command {
                    None => return,
                    Some(Command::Watch { node, instance_id, from }) => {
                        tracker.watch(&node, &instance_id, from, Timestamp::now())
                    }
                    Some(Command::Clear) => tracker.clear(),
                }
                continue;
            }
            _ = sleep_until(wake) => {}
        }
        let now = Timestamp::now();
        let due = tracker.due(now);
        if due.is_empty() {
            continue;
        }
        let ids: Vec<&str> = due.iter().map(String::as_str).collect();
        let states = match resolver.instance_states(&ids).await {
            Ok(states) => states,
            Err(error) => {
                warn!(%error, instances = ids.len(), "cannot ask EC2 whether the instances are gone; asking again");
                tracker.postpone(now);
                continue;
            }
        };
        for decision in tracker.settle(&states, now) {
            match decision {
                Decision::Taint {
                    node,
                    instance_id,
                    state,
                } => match node::mark_out_of_service(&nodes, &node).await {
                    Ok(Some(tainted)) => {
                        info!(node = %node, instance = %instance_id, state = state.as_deref().unwrap_or("not listed"),
                            "instance gone: node tainted out of service");
                        let event = DrainEvent::out_of_service(
                            tainted.object_ref(&()),
                            &instance_id,
                            state.as_deref(),
                        );
                        tokio::spawn(publish(recorder.clone(), event));
                    }
                    Ok(None) => {}
                    // Deleted already (Karpenter, the cloud controller): nothing left to release.
                    Err(NodeError::NotFound { .. }) => {}
                    Err(error) => {
                        warn!(node = %node, %error, "cannot taint the node out of service; trying again");
                        tracker.watch(&node, &instance_id, later(now, CHECK_INTERVAL), now);
                    }
                },
                Decision::GiveUp {
                    node,
                    instance_id,
                    state,
                } => {
                    let waited = humantime::format_duration(GIVE_UP_AFTER).to_string();
                    warn!(node = %node, instance = %instance_id, %state,
                        "instance still not gone; the node is not marked out of service");
                    let event = DrainEvent::out_of_service_skipped(
                        node_reference(&node),
                        &instance_id,
                        &state,
                        &waited,
                    );
                    tokio::spawn(publish(recorder.clone(), event));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn states(pairs: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(id, s)| (id.to_string(), s.map(str::to_string)))
            .collect()
    }

    #[test]
    fn only_ec2_states_of_a_machine_that_is_off_are_gone() {
        for state in [
            None,
            Some("shutting-down"),
            Some("terminated"),
            Some("stopped"),
        ] {
            assert_eq!(verdict(state), Verdict::Gone, "{state:?}");
        }
        for state in ["pending", "running", "stopping", "rebooting", ""] {
            assert_eq!(verdict(Some(state)), Verdict::MayRun, "{state}");
        }
    }

    #[test]
    fn nothing_is_checked_before_the_deadline() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(120), t(0));
        assert!(tracker.due(t(119)).is_empty());
        assert_eq!(tracker.next_check(), Some(t(120)));
        // Even an answer saying "terminated" does not taint a node not yet due.
        let decisions = tracker.settle(&states(&[("i-1", Some("terminated"))]), t(119));
        assert!(decisions.is_empty());
        assert_eq!(tracker.due(t(120)), vec!["i-1".to_string()]);
    }

    #[test]
    fn a_running_instance_is_asked_again_and_never_tainted() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(0), t(0));
        let running = states(&[("i-1", Some("running"))]);
        assert!(tracker.settle(&running, t(0)).is_empty());
        assert_eq!(tracker.next_check(), Some(t(10)));
        assert!(tracker.due(t(9)).is_empty());
        assert!(tracker.settle(&running, t(10)).is_empty());
        let gone = tracker.settle(&states(&[("i-1", Some("shutting-down"))]), t(20));
        assert_eq!(
            gone,
            vec![Decision::Taint {
                node: "n1".into(),
                instance_id: "i-1".into(),
                state: Some("shutting-down".into()),
            }]
        );
        assert!(tracker.is_empty());
    }

    #[test]
    fn an_instance_ec2_no_longer_lists_is_gone() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(0), t(0));
        let decisions = tracker.settle(&HashMap::new(), t(0));
        assert!(matches!(
            &decisions[..],
            [Decision::Taint { state: None, .. }]
        ));
    }

    #[test]
    fn a_survivor_is_given_up_on_after_the_window() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(0), t(0));
        let window = GIVE_UP_AFTER.as_secs() as i64;
        let running = states(&[("i-1", Some("running"))]);
        assert!(tracker.settle(&running, t(window - 1)).is_empty());
        // The first check at or past the window gives up.
        let next = tracker.next_check().unwrap();
        assert!(next >= t(window));
        let decisions = tracker.settle(&running, next);
        assert_eq!(
            decisions,
            vec![Decision::GiveUp {
                node: "n1".into(),
                instance_id: "i-1".into(),
                state: "running".into(),
            }]
        );
        assert!(tracker.is_empty());
    }

    #[test]
    fn watching_again_keeps_the_earlier_start_and_the_later_end() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(120), t(0));
        // The drain ended at 30 s, before the deadline: checks begin now.
        tracker.watch("n1", "i-1", t(30), t(0));
        assert_eq!(tracker.next_check(), Some(t(30)));
        let window = GIVE_UP_AFTER.as_secs() as i64;
        let running = states(&[("i-1", Some("running"))]);
        // The window runs from the deadline registered first, the later of the two ends.
        assert!(tracker.settle(&running, t(120 + window - 1)).is_empty());
        let next = tracker.next_check().unwrap();
        assert_eq!(tracker.settle(&running, next).len(), 1);
    }

    #[test]
    fn a_window_already_closed_is_not_opened() {
        let mut tracker = Tracker::default();
        let window = GIVE_UP_AFTER.as_secs() as i64;
        tracker.watch("n1", "i-1", t(0), t(window));
        assert!(tracker.is_empty());
        tracker.watch("n1", "i-1", t(0), t(window - 1));
        assert_eq!(tracker.due(t(window - 1)), vec!["i-1".to_string()]);
    }

    #[test]
    fn ec2_unreachable_postpones_only_the_due_nodes() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(0), t(0));
        tracker.watch("n2", "i-2", t(100), t(0));
        tracker.postpone(t(5));
        assert_eq!(tracker.next_check(), Some(t(15)));
        assert_eq!(tracker.due(t(15)), vec!["i-1".to_string()]);
        assert_eq!(tracker.due(t(100)).len(), 2);
    }

    #[test]
    fn one_call_asks_for_every_due_instance_once() {
        let mut tracker = Tracker::default();
        tracker.watch("n1", "i-1", t(0), t(0));
        tracker.watch("n2", "i-2", t(0), t(0));
        tracker.watch("n3", "i-3", t(50), t(0));
        assert_eq!(
            tracker.due(t(0)),
            vec!["i-1".to_string(), "i-2".to_string()]
        );
        let decisions = tracker.settle(
            &states(&[("i-1", Some("terminated")), ("i-2", Some("running"))]),
            t(0),
        );
        assert_eq!(decisions.len(), 1);
        assert_eq!(tracker.due(t(10)), vec!["i-2".to_string()]);
        tracker.clear();
        assert!(tracker.is_empty());
    }
}
