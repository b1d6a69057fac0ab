//! `surge`: a Ready replacement on another node before the old pod leaves.
//!
//! nodedrain surges by restarting the Deployment's rollout (the pod-template annotation
//! `kubectl.kubernetes.io/restartedAt`, exactly what `kubectl rollout restart` writes), and only
//! when the Deployment's rolling-update parameters make that a true surge: `maxSurge` resolves to
//! at least 1 and `maxUnavailable` to 0 for its replica count. Then the Deployment controller
//! itself starts new pods (which the scheduler puts on nodes that are not cordoned) and removes
//! an old pod only once a new one is available. nodedrain evicts the pod on the draining node
//! once a replacement is Ready elsewhere, which only speeds up what the rollout would do anyway.
//!
//! Why a restart rather than a temporary extra replica: nothing has to be undone. If nodedrain
//! dies half-way (a CLI user presses Ctrl-C, the controller loses its lease) the rollout simply
//! completes; an extra replica would stay until something restores the count. A restart also
//! does not fight a HorizontalPodAutoscaler or a GitOps tool over `spec.replicas`. The price is
//! that every replica is replaced, which is why `surge` is opt-in and meant for the small
//! (1-3 replica) Deployments whose PDB would otherwise block a drain forever.
//!
//! When a restart would not be a surge (paused, `Recreate`, `maxUnavailable` ≥ 1), the step
//! falls back to a plain eviction under the PDB and the reason is reported.

use std::collections::BTreeSet;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::names;

/// The label the Deployment controller puts on every pod: the hash of its ReplicaSet's
/// template. A pod with another hash than the old pod's comes from the restarted template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Whether restarting the rollout is a surge for this Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SurgeDecision {
    Restart,
    /// Evict instead; the reason is for humans.
    Fallback {
        reason: String,
    },
}

/// Kubernetes' `GetScaledValueFromIntOrPercent`: an int as is, `"N%"` of `total` rounded up or
/// down. `None` for values the apiserver would have rejected.
fn scaled(value: &IntOrString, total: i32, round_up: bool) -> Option<i32> {
    match value {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(s) => {
            let percent: i64 = s.trim().strip_suffix('%')?.parse().ok()?;
            let product = percent * i64::from(total);
            let value = if round_up {
                (product + 99).div_euclid(100)
            } else {
                product.div_euclid(100)
            };
            i32::try_from(value).ok()
        }
    }
}

/// `(maxSurge, maxUnavailable)` resolved for `replicas`, with the Deployment controller's
/// defaults (25% each) and fencepost rule (both 0 means 1 unavailable).
pub fn resolve_fenceposts(
    max_surge: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    replicas: i32,
) -> Option<(i32, i32)> {
    let default = IntOrString::String("25%".to_string());
    let surge = scaled(max_surge.unwrap_or(&default), replicas, true)?;
    let mut unavailable = scaled(max_unavailable.unwrap_or(&default), replicas, false)?;
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Some((surge, unavailable))
}

/// Decides from the Deployment's spec alone. Pure.
pub fn decide(deployment: &Deployment) -> SurgeDecision {
    let fallback = |reason: String| SurgeDecision::Fallback { reason };
    let Some(spec) = deployment.spec.as_ref() else {
        return fallback("the Deployment has no spec".into());
    };
    if spec.paused == Some(true) {
        return fallback("the Deployment is paused, so a rollout restart would not start".into());
    }
    let strategy = spec.strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return fallback(
            "the Deployment uses the Recreate strategy, which stops old pods before starting new ones"
                .into(),
        );
    }
    let replicas = spec.replicas.unwrap_or(1);
    if replicas < 1 {
        return fallback("the Deployment is scaled to 0".into());
    }
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let Some((surge, unavailable)) = resolve_fenceposts(
        rolling.and_then(|r| r.max_surge.as_ref()),
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
    ) else {
        return fallback("the Deployment's maxSurge/maxUnavailable cannot be read".into());
    };
    if unavailable > 0 {
        return fallback(format!(
            "maxUnavailable resolves to {unavailable} of {replicas} replicas, so a rollout restart \
             could stop a pod before its replacement is Ready"
        ));
    }
    if surge < 1 {
        return fallback(format!(
            "maxSurge resolves to 0 of {replicas} replicas, so a rollout restart cannot add a pod"
        ));
    }
    SurgeDecision::Restart
}

/// Whether the template was already restarted at or after `since` (by an earlier run of this
/// drain, before a crash or a leader change): then it must not be restarted again.
pub fn restarted_since(deployment: &Deployment, since: Timestamp) -> bool {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(names::ANNOTATION_RESTARTED_AT))
        .and_then(|v| v.parse::<Timestamp>().ok())
        .is_some_and(|at| at >= since)
}

/// The Deployment's pod selector in list-option syntax, for a watch of its pods.
pub fn selector_of(deployment: &Deployment) -> Option<String> {
    let selector = deployment.spec.as_ref()?.selector.clone();
    let parsed = kube::core::Selector::try_from(selector).ok()?;
    let text = parsed.to_string();
    // An empty selector would watch the whole namespace; the API forbids it on Deployments.
    (!text.is_empty()).then_some(text)
}

/// What starting a surge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SurgeStart {
    /// The rollout is restarting (or already was since the drain began).
    Restarted {
        /// Label selector of the Deployment's pods.
        selector: String,
        /// `false` when an earlier run had already restarted it.
        patched: bool,
    },
    Fallback {
        reason: String,
    },
}

/// Reads the Deployment, decides, and restarts its rollout unless that already happened since
/// `since`. A vanished Deployment is a fallback, not an error.
pub async fn start(
    api: &Api<Deployment>,
    name: &str,
    since: Timestamp,
    now: Timestamp,
) -> Result<SurgeStart, kube::Error> {
    let Some(deployment) = api.get_opt(name).await? else {
        return Ok(SurgeStart::Fallback {
            reason: format!("Deployment {name} not found"),
        });
    };
    if let SurgeDecision::Fallback { reason } = decide(&deployment) {
        return Ok(SurgeStart::Fallback { reason });
    }
    let Some(selector) = selector_of(&deployment) else {
        return Ok(SurgeStart::Fallback {
            reason: "the Deployment's selector cannot be used to watch its pods".into(),
        });
    };
    if restarted_since(&deployment, since) {
        return Ok(SurgeStart::Restarted {
            selector,
            patched: false,
        });
    }
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        names::ANNOTATION_RESTARTED_AT: now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    }}}}});
    let params = PatchParams {
        field_manager: Some(names::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch)).await?;
    Ok(SurgeStart::Restarted {
        selector,
        patched: true,
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `pod` is a Ready replacement: from another template than the old pods
/// (`old_hashes`), not terminating, and on a node that is not being drained. Pure.
pub fn is_replacement(
    pod: &Pod,
    old_hashes: &BTreeSet<String>,
    draining: &BTreeSet<String>,
) -> bool {
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(POD_TEMPLATE_HASH));
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_ref());
    hash.is_some_and(|h| !old_hashes.contains(h))
        && node.is_some_and(|n| !draining.contains(n))
        && pod.metadata.deletion_timestamp.is_none()
        && is_ready(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};

    fn deployment(
        replicas: i32,
        surge: Option<IntOrString>,
        unavailable: Option<IntOrString>,
    ) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: surge,
                        max_unavailable: unavailable,
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pct(s: &str) -> Option<IntOrString> {
        Some(IntOrString::String(s.into()))
    }

    #[test]
    fn fenceposts_round_like_the_deployment_controller() {
        let p = |s: &str| IntOrString::String(s.into());
        assert_eq!(resolve_fenceposts(None, None, 1), Some((1, 0)));
        assert_eq!(resolve_fenceposts(None, None, 3), Some((1, 0)));
        assert_eq!(resolve_fenceposts(None, None, 4), Some((1, 1)));
        assert_eq!(resolve_fenceposts(None, None, 10), Some((3, 2)));
        assert_eq!(
            resolve_fenceposts(Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0)), 5),
            Some((0, 1)),
            "both zero means one unavailable"
        );
        assert_eq!(resolve_fenceposts(Some(&p("x")), None, 5), None);
    }

    #[test]
    fn restart_only_when_it_is_a_surge() {
        // The default strategy is a surge for 1-3 replicas.
        assert_eq!(decide(&deployment(1, None, None)), SurgeDecision::Restart);
        assert_eq!(decide(&deployment(3, None, None)), SurgeDecision::Restart);
        assert!(matches!(
            decide(&deployment(4, None, None)),
            SurgeDecision::Fallback { reason } if reason.contains("maxUnavailable resolves to 1 of 4")
        ));
        assert_eq!(
            decide(&deployment(10, pct("10%"), Some(IntOrString::Int(0)))),
            SurgeDecision::Restart
        );
        let mut paused = deployment(1, None, None);
        paused.spec.as_mut().unwrap().paused = Some(true);
        assert!(matches!(decide(&paused), SurgeDecision::Fallback { .. }));
        let mut recreate = deployment(1, None, None);
        recreate.spec.as_mut().unwrap().strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        assert!(
            matches!(decide(&recreate), SurgeDecision::Fallback { reason } if reason.contains("Recreate"))
        );
        assert!(matches!(
            decide(&deployment(0, None, None)),
            SurgeDecision::Fallback { .. }
        ));
        assert!(matches!(
            decide(&Deployment::default()),
            SurgeDecision::Fallback { .. }
        ));
    }

    #[test]
    fn restarted_since_reads_the_template_annotation() {
        let mut d = deployment(1, None, None);
        let since: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert!(!restarted_since(&d, since));
        d.spec.as_mut().unwrap().template.metadata = Some(
            serde_json::from_value(
                json!({"annotations": {names::ANNOTATION_RESTARTED_AT: "2026-01-01T00:00:05Z"}}),
            )
            .unwrap(),
        );
        assert!(restarted_since(&d, since));
        assert!(!restarted_since(
            &d,
            "2026-01-01T00:01:00Z".parse().unwrap()
        ));
    }

    #[test]
    fn replacements_are_ready_new_pods_elsewhere() {
        let pod = |hash: &str, node: &str, ready: bool, terminating: bool| -> Pod {
            let mut value = json!({
                "metadata": {"name": "p", "labels": {POD_TEMPLATE_HASH: hash}},
                "spec": {"nodeName": node, "containers": []},
                "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            });
            if terminating {
                value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            serde_json::from_value(value).unwrap()
        };
        let old: BTreeSet<String> = ["aaa".to_string()].into();
        let draining: BTreeSet<String> = ["n1".to_string()].into();
        assert!(is_replacement(
            &pod("bbb", "n2", true, false),
            &old,
            &draining
        ));
        assert!(!is_replacement(
            &pod("aaa", "n2", true, false),
            &old,
            &draining
        ));
        assert!(!is_replacement(
            &pod("bbb", "n1", true, false),
            &old,
            &draining
        ));
        assert!(!is_replacement(
            &pod("bbb", "n2", false, false),
            &old,
            &draining
        ));
        assert!(!is_replacement(
            &pod("bbb", "n2", true, true),
            &old,
            &draining
        ));
    }

    #[test]
    fn selectors_render_for_list_options() {
        let d: Deployment = serde_json::from_value(json!({
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {}}
        }))
        .unwrap();
        assert_eq!(selector_of(&d).as_deref(), Some("app=web"));
    }
}
