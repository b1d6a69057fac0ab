//! Which nodes are spot capacity, and whether a pod template can be scheduled on a node: enough
//! of the scheduler's filters (node name, nodeSelector, required node affinity, taints) to tell
//! whether a workload may land on spot nodes, not only whether it runs there now.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint};

use crate::names;

/// Whether the node is spot capacity, by the labels Karpenter, EKS managed node groups and the
/// community lifecycle convention put on it.
pub(crate) fn is_spot_node(node: &Node) -> bool {
    let Some(labels) = node.metadata.labels.as_ref() else {
        return false;
    };
    let is = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
    is(names::LABEL_KARPENTER_CAPACITY_TYPE, "spot")
        || is(names::LABEL_EKS_CAPACITY_TYPE, "SPOT")
        || is(names::LABEL_NODE_LIFECYCLE, "spot")
}

/// Taints that say what a node is going through, not what it is: the node lifecycle
/// controller's condition taints, and the marks of a drain in progress (nodedrain's own,
/// Karpenter's). A pod that cannot tolerate them now will be able to once they are gone.
fn is_transient_taint(taint: &Taint) -> bool {
    taint.key.starts_with("node.kubernetes.io/")
        || taint.key.starts_with("node.cloudprovider.kubernetes.io/")
        || taint.key == names::TAINT_INTERRUPTION
        || taint.key == "karpenter.sh/disrupted"
        || taint.key == "karpenter.sh/unregistered"
        || taint.key == "ToBeDeletedByClusterAutoscaler"
}

fn tolerated(spec: &PodSpec, taint: &Taint) -> bool {
    spec.tolerations.iter().flatten().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key = t.key.as_deref().unwrap_or_default();
        match t.operator.as_deref().unwrap_or("Equal") {
            "Exists" => effect_ok && (key.is_empty() || key == taint.key),
            _ => {
                effect_ok
                    && key == taint.key
                    && t.value.as_deref().unwrap_or_default()
                        == taint.value.as_deref().unwrap_or_default()
            }
        }
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (
                value.and_then(|v| number(v)),
                values.first().and_then(|v| number(v)),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                have > bound
            } else {
                have < bound
            }
        }
        _ => false,
    }
}

/// An empty term matches no node, as in the scheduler.
fn term_matches(
    term: &NodeSelectorTerm,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let name = node_name.to_string();
    expressions
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(&name)))
}

/// Whether the scheduler could put a pod with this spec on the node, as far as node name,
/// nodeSelector, required node affinity and (lasting) NoSchedule/NoExecute taints go.
/// Resources, pod (anti-)affinity and topology spread are not considered: they change with
/// what else runs.
pub(crate) fn can_schedule_on(spec: &PodSpec, node: &Node) -> bool {
    let node_name = node.metadata.name.as_deref().unwrap_or_default();
    if let Some(pinned) = spec.node_name.as_deref()
        && !pinned.is_empty()
    {
        return pinned == node_name;
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity_ok = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|required| {
            required
                .node_selector_terms
                .iter()
                .any(|term| term_matches(term, node_name, labels))
        });
    let taints_ok = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"))
        .filter(|t| !is_transient_taint(t))
        .all(|t| tolerated(spec, t));
    selector_ok && affinity_ok && taints_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": labels},
            "spec": {"taints": taints},
        }))
        .unwrap()
    }

    fn spec(value: serde_json::Value) -> PodSpec {
        let mut value = value;
        value["containers"] = json!([]);
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn spot_labels() {
        let spot = |labels| is_spot_node(&node(labels, json!([])));
        assert!(spot(json!({"karpenter.sh/capacity-type": "spot"})));
        assert!(spot(json!({"eks.amazonaws.com/capacityType": "SPOT"})));
        assert!(spot(json!({"node.kubernetes.io/lifecycle": "spot"})));
        assert!(!spot(json!({"karpenter.sh/capacity-type": "on-demand"})));
        assert!(!spot(
            json!({"eks.amazonaws.com/capacityType": "ON_DEMAND"})
        ));
        assert!(!spot(json!({})));
    }

    #[test]
    fn node_selector_and_affinity() {
        let n = node(json!({"zone": "a", "gen": "5", "kind": "spot"}), json!([]));
        assert!(can_schedule_on(&spec(json!({})), &n));
        assert!(can_schedule_on(
            &spec(json!({"nodeSelector": {"zone": "a"}})),
            &n
        ));
        assert!(!can_schedule_on(
            &spec(json!({"nodeSelector": {"zone": "b"}})),
            &n
        ));
        assert!(can_schedule_on(&spec(json!({"nodeName": "n1"})), &n));
        assert!(!can_schedule_on(&spec(json!({"nodeName": "n2"})), &n));
        let affinity = |terms: serde_json::Value| {
            spec(json!({"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}))
        };
        let expr = |key: &str, op: &str, values: &[&str]| {
            let requirement = json!({"key": key, "operator": op, "values": values});
            json!([{ "matchExpressions": [requirement] }])
        };
        assert!(can_schedule_on(
            &affinity(expr("kind", "In", &["spot"])),
            &n
        ));
        assert!(!can_schedule_on(
            &affinity(expr("kind", "NotIn", &["spot"])),
            &n
        ));
        assert!(can_schedule_on(
            &affinity(expr("missing", "DoesNotExist", &[])),
            &n
        ));
        assert!(can_schedule_on(&affinity(expr("gen", "Gt", &["4"])), &n));
        assert!(!can_schedule_on(&affinity(expr("gen", "Lt", &["4"])), &n));
        assert!(!can_schedule_on(&affinity(json!([{}])), &n), "empty term");
        assert!(can_schedule_on(
            &affinity(json!([{}, {"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": ["n1"]}
            ]}])),
            &n
        ));
    }

    #[test]
    fn taints_need_tolerations_unless_transient() {
        let tainted = |key: &str, effect: &str| {
            node(
                json!({}),
                json!([{"key": key, "value": "v", "effect": effect}]),
            )
        };
        let plain = spec(json!({}));
        assert!(!can_schedule_on(
            &plain,
            &tainted("dedicated", "NoSchedule")
        ));
        assert!(!can_schedule_on(&plain, &tainted("dedicated", "NoExecute")));
        assert!(can_schedule_on(
            &plain,
            &tainted("dedicated", "PreferNoSchedule")
        ));
        assert!(can_schedule_on(
            &plain,
            &tainted("node.kubernetes.io/unschedulable", "NoSchedule")
        ));
        assert!(can_schedule_on(
            &plain,
            &tainted("nodedrain.io/interruption", "NoSchedule")
        ));
        let tolerating = |toleration: serde_json::Value| spec(json!({"tolerations": [toleration]}));
        let n = tainted("dedicated", "NoSchedule");
        assert!(can_schedule_on(
            &tolerating(json!({"key": "dedicated", "value": "v"})),
            &n
        ));
        assert!(!can_schedule_on(
            &tolerating(json!({"key": "dedicated", "value": "w"})),
            &n
        ));
        assert!(can_schedule_on(
            &tolerating(json!({"key": "dedicated", "operator": "Exists"})),
            &n
        ));
        assert!(can_schedule_on(
            &tolerating(json!({"operator": "Exists"})),
            &n
        ));
        assert!(!can_schedule_on(
            &tolerating(json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"})),
            &n
        ));
    }
}
