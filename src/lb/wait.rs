//! When a pod that serves through load-balancer targets may stop. Pure: the clock and what
//! `DescribeTargetHealth` last said come in as parameters.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::targets::{Target, TargetState};

/// One of a pod's targets as last observed, with its group's deregistration delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub target: Target,
    pub state: TargetState,
    pub deregistration_delay: Duration,
    /// When deregistration of this target began: the node's preparation for an instance target
    /// (the exclude label, or nodedrain's own DeregisterTargets), the request for an IP target.
    pub since: Timestamp,
}

/// What to do with the pod now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No target sends it new connections any more (or it serves through none): it may stop.
    Clear,
    /// A target still routes new connections to it: ask again by `until` (the earlier of the
    /// deregistration delay's end and the pod's latest start).
    Hold {
        until: Timestamp,
        target: Target,
        state: TargetState,
    },
    /// Every still-routed target's group delay has passed since deregistration began: the load
    /// balancer has had the time it was configured to need. The pod may stop; the target that
    /// never reported `draining` is named, because that is worth a Warning.
    DelayElapsed { target: Target, state: TargetState },
    /// The pod's latest start under the deadline has come while a target still routes to it:
    /// stop it anyway (the instance goes regardless), and report it as an override.
    DeadlineOverride { target: Target, state: TargetState },
}

/// Decides for one pod. `latest_start`: the last moment the pod may get SIGTERM and still end
/// before the deadline (`None`: no deadline).
pub fn decide(observed: &[Observed], now: Timestamp, latest_start: Option<Timestamp>) -> Decision {
    let routed: Vec<&Observed> = observed
        .iter()
        .filter(|o| o.state.routes_new_connections())
        .collect();
    // The target that keeps the pod longest names the wait.
    let Some(longest) = routed
        .iter()
        .max_by_key(|o| after(o.since, o.deregistration_delay))
    else {
        return Decision::Clear;
    };
    let delay_end = after(longest.since, longest.deregistration_delay);
    let target = longest.target.clone();
    let state = longest.state;
    match latest_start {
        Some(latest) if latest <= delay_end && now >= latest => {
            Decision::DeadlineOverride { target, state }
        }
        _ if now >= delay_end => Decision::DelayElapsed { target, state },
        _ => Decision::Hold {
            until: latest_start.map_or(delay_end, |l| l.min(delay_end)),
            target,
            state,
        },
    }
}

/// Whether a full wait fits before the pod's latest start: `None` when it does (or there is no
/// deadline), else how much time the deadline is short by. For `nodedrain plan`.
pub fn shortfall(
    deregistration_delay: Duration,
    since: Timestamp,
    latest_start: Option<Timestamp>,
) -> Option<Duration> {
    let latest = latest_start?;
    let delay_end = after(since, deregistration_delay);
    (delay_end > latest)
        .then(|| Duration::try_from(delay_end.duration_since(latest)).unwrap_or(Duration::ZERO))
}

/// Surge: a replacement pod counts only once it is `healthy` in every group the pod it replaces
/// serves in (Ready is not enough: the load balancer's health check may not have passed yet).
/// `replacement`: the replacement's targets as observed, by group.
pub fn replacement_serves(groups: &[&str], replacement: &[Observed]) -> bool {
    groups.iter().all(|group| {
        replacement
            .iter()
            .any(|o| o.target.group_arn == *group && o.state == TargetState::Healthy)
    })
}

fn after(at: Timestamp, by: Duration) -> Timestamp {
    at.saturating_add(SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn observed(group: &str, state: TargetState, delay: u64) -> Observed {
        Observed {
            target: Target {
                group_arn: group.into(),
                id: "10.0.0.7".into(),
                port: 8080,
            },
            state,
            deregistration_delay: Duration::from_secs(delay),
            since: t(0),
        }
    }

    #[test]
    fn a_pod_behind_no_routed_target_stops_at_once() {
        assert_eq!(decide(&[], t(0), None), Decision::Clear);
        let drained = [
            observed("a", TargetState::Draining, 300),
            observed("b", TargetState::Gone, 300),
        ];
        assert_eq!(decide(&drained, t(1), Some(t(5))), Decision::Clear);
    }

    #[test]
    fn a_healthy_target_holds_the_pod_until_its_delay_or_latest_start() {
        let healthy = [observed("a", TargetState::Healthy, 30)];
        let Decision::Hold { until, .. } = decide(&healthy, t(10), None) else {
            panic!("held")
        };
        assert_eq!(until, t(30));
        let Decision::Hold { until, .. } = decide(&healthy, t(10), Some(t(20))) else {
            panic!("held")
        };
        assert_eq!(until, t(20), "the latest start comes first");
    }

    #[test]
    fn the_delay_or_the_deadline_ends_the_wait_whichever_is_first() {
        let healthy = [observed("a", TargetState::Healthy, 30)];
        assert!(matches!(
            decide(&healthy, t(30), Some(t(100))),
            Decision::DelayElapsed { .. }
        ));
        assert!(matches!(
            decide(&healthy, t(20), Some(t(20))),
            Decision::DeadlineOverride { .. }
        ));
        // Past both: the deadline came first, so it is an override.
        assert!(matches!(
            decide(&healthy, t(40), Some(t(20))),
            Decision::DeadlineOverride { .. }
        ));
    }

    #[test]
    fn the_longest_delay_of_the_routed_targets_names_the_wait() {
        let targets = [
            observed("short", TargetState::Healthy, 30),
            observed("long", TargetState::Initial, 300),
            observed("done", TargetState::Draining, 3600),
        ];
        let Decision::Hold {
            until,
            target,
            state,
        } = decide(&targets, t(40), None)
        else {
            panic!("held")
        };
        assert_eq!(
            (until, target.group_arn.as_str(), state),
            (t(300), "long", TargetState::Initial)
        );
    }

    #[test]
    fn plan_says_by_how_much_a_wait_does_not_fit() {
        let delay = Duration::from_secs(300);
        // A 2-minute warning: the pod's latest start is 100 s after preparation.
        assert_eq!(
            shortfall(delay, t(0), Some(t(100))),
            Some(Duration::from_secs(200))
        );
        assert_eq!(shortfall(Duration::from_secs(30), t(0), Some(t(100))), None);
        assert_eq!(shortfall(delay, t(0), None), None);
    }

    #[test]
    fn a_replacement_must_be_healthy_in_every_group() {
        let groups = ["a", "b"];
        let both = [
            observed("a", TargetState::Healthy, 0),
            observed("b", TargetState::Healthy, 0),
        ];
        assert!(replacement_serves(&groups, &both));
        let one_initial = [
            observed("a", TargetState::Healthy, 0),
            observed("b", TargetState::Initial, 0),
        ];
        assert!(!replacement_serves(&groups, &one_initial));
        assert!(!replacement_serves(&groups, &both[..1]));
        assert!(replacement_serves(&[], &[]), "a pod in no group needs none");
    }

    fn any_state() -> impl Strategy<Value = TargetState> {
        prop_oneof![
            Just(TargetState::Initial),
            Just(TargetState::Healthy),
            Just(TargetState::Unhealthy),
            Just(TargetState::UnhealthyDraining),
            Just(TargetState::Unused),
            Just(TargetState::Draining),
            Just(TargetState::Unavailable),
            Just(TargetState::Gone),
        ]
    }

    proptest! {
        /// Never cleared while a target routes to the pod; a hold ends in the future and never
        /// after the latest start; an override only at or past the latest start; and whatever
        /// the states, the wait has ended by the latest start.
        #[test]
        fn the_wait_is_safe_and_bounded(
            states in prop::collection::vec((any_state(), 0u64..600), 0..5),
            now in 0i64..900,
            latest in prop::option::of(0i64..900),
        ) {
            let observed: Vec<Observed> = states
                .iter()
                .enumerate()
                .map(|(i, (state, delay))| observed(&format!("g{i}"), *state, *delay))
                .collect();
            let routed = observed.iter().any(|o| o.state.routes_new_connections());
            let latest_start = latest.map(t);
            match decide(&observed, t(now), latest_start) {
                Decision::Clear => prop_assert!(!routed),
                Decision::Hold { until, .. } => {
                    prop_assert!(routed);
                    prop_assert!(until > t(now));
                    if let Some(l) = latest_start {
                        prop_assert!(until <= l);
                    }
                }
                Decision::DeadlineOverride { .. } => {
                    prop_assert!(routed);
                    prop_assert!(latest_start.is_some_and(|l| t(now) >= l));
                }
                Decision::DelayElapsed { .. } => prop_assert!(routed),
            }
            if let Some(l) = latest {
                let at_latest = decide(&observed, t(l.max(now)), latest_start);
                prop_assert!(!matches!(at_latest, Decision::Hold { .. }), "held past the latest start");
            }
        }
    }
}
