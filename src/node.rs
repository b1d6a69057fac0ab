//! Node actions: cordon, nodedrain's taint, the load-balancer exclusion label and the durable
//! drain record, and undoing all of them.
//!
//! Everything a drain does to a Node goes through here, in as few writes as possible:
//! [`prepare`] is one patch, [`release`] one patch, [`set_phase`] one read and one patch. Lists
//! (taints) are replaced only under a `metadata.resourceVersion` precondition, so a taint another
//! controller adds at the same moment (the node lifecycle controller adds
//! `node.kubernetes.io/unschedulable` right after a cordon) is never lost: the apiserver answers
//! 409 and the write is recomputed from a fresh read.
//!
//! The drain record ([`DrainRecord`], annotation [`names::ANNOTATION_DRAIN_RECORD`]) is what a new
//! leader resumes from after a crash, so it carries everything needed to finish the job: why, by
//! when, and the Auto Scaling lifecycle hook to complete afterwards.

use std::fmt;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::interruption::events::{Interruption, InterruptionKind, LifecycleAction};
use crate::metrics::LabelValue;
use crate::names;

/// How often a write that lost an optimistic-concurrency race (409) is recomputed and retried.
/// Each retry starts from a fresh read; losing five times in a row means something rewrites the
/// Node continuously, which a sixth try will not fix.
const CONFLICT_RETRIES: usize = 5;

/// The kind of drains started by a person (`nodedrain drain`), as opposed to an AWS
/// interruption kind. Also the taint value.
pub const MANUAL_KIND: &str = "manual";

/// Why a node is drained: an AWS interruption, or a person. Written in the record and as the
/// value of the [`names::TAINT_INTERRUPTION`] taint by its [`as_str`](DrainKind::as_str), which is
/// always a valid label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainKind {
    Interruption(InterruptionKind),
    /// `nodedrain drain`: the controller never takes these over.
    Manual,
}

impl DrainKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            DrainKind::Interruption(kind) => kind.as_str(),
            DrainKind::Manual => MANUAL_KIND,
        }
    }

    /// The interruption behind the drain, if an interruption started it.
    pub const fn interruption(self) -> Option<InterruptionKind> {
        match self {
            DrainKind::Interruption(kind) => Some(kind),
            DrainKind::Manual => None,
        }
    }
}

impl LabelValue for DrainKind {
    fn label_value(&self) -> &'static str {
        self.as_str()
    }
}

impl fmt::Display for DrainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DrainKind {
    type Err = crate::interruption::events::UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == MANUAL_KIND {
            return Ok(DrainKind::Manual);
        }
        s.parse().map(DrainKind::Interruption)
    }
}

impl Serialize for DrainKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DrainKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node does not exist (HTTP 404).
    #[error("node {node:?} not found")]
    NotFound { node: String },
    /// The apiserver refused or failed a request; `action` says which (e.g. "patch").
    #[error("cannot {action} node {node:?}: {}", describe_api_error(source))]
    Api {
        node: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The annotation exists but is not a drain record nodedrain can read.
    #[error(
        "node {node:?}: annotation {} is not a valid drain record: {source}",
        names::ANNOTATION_DRAIN_RECORD
    )]
    InvalidRecord {
        node: String,
        #[source]
        source: serde_json::Error,
    },
    /// [`set_phase`] on a node that has no drain record.
    #[error(
        "node {node:?} has no drain record ({})",
        names::ANNOTATION_DRAIN_RECORD
    )]
    NoRecord { node: String },
    /// The record is in a phase the requested one cannot follow ([`Phase::may_become`]).
    #[error("node {node:?}: a drain record in phase {from} cannot become {to}")]
    PhaseOrder {
        node: String,
        from: Phase,
        to: Phase,
    },
    /// Every attempt lost an optimistic-concurrency race.
    #[error(
        "node {node:?} kept changing under us: gave up after {CONFLICT_RETRIES} conflicting writes"
    )]
    Conflict { node: String },
}

impl NodeError {
    /// Whether the apiserver said the caller may not do this (HTTP 401/403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, NodeError::Api { source, .. } if is_forbidden(source))
    }
}

/// Whether an API error is an authorization refusal (401/403).
pub fn is_forbidden(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 401 || status.code == 403)
}

/// An API error as an operator reads it: the apiserver's own message (which names the verb,
/// resource and user for RBAC refusals) with its reason and code, without Rust debug noise.
pub fn describe_api_error(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                "Error"
            } else {
                status.reason.as_str()
            };
            let message = if status.message.is_empty() {
                "no message"
            } else {
                status.message.as_str()
            };
            format!("{reason} ({}): {message}", status.code)
        }
        other => other.to_string(),
    }
}

/// Where a drain is. Written by the drain engine and the controller; read on resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Cordoned, tainted and labelled; no pod touched yet.
    Cordoned,
    /// Pods are being moved off.
    Draining,
    /// Every pod that had to leave has left.
    Drained,
    /// The drain ended without emptying the node (timeout, refused pods, error).
    Failed,
    /// Drained and handed to whoever terminates the instance (ASG hook completed, Karpenter
    /// NodeClaim deleted): nothing left for nodedrain to do.
    HandedOver,
}

impl Phase {
    /// The only ways a record's phase moves; every writer goes through [`DrainRecord::enter`] or
    /// [`set_phase`], which check it. A new interruption starts a new record (`cordoned`) through
    /// [`prepare`] whatever the old one said.
    ///
    /// - `cordoned` → `draining` (the first pod is acted on), `drained`, `failed`;
    /// - `draining` → `drained`, `failed`;
    /// - `drained`, `failed` → `handedOver` (an Auto Scaling hook is completed either way);
    /// - staying in a phase is always allowed (a resumed drain rewrites it).
    pub fn may_become(self, next: Phase) -> bool {
        use Phase::*;
        self == next
            || matches!(
                (self, next),
                (Cordoned, Draining | Drained | Failed)
                    | (Draining, Drained | Failed)
                    | (Drained | Failed, HandedOver)
            )
    }

    /// A bounded metric label and the record's wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Cordoned => "cordoned",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
            Phase::Failed => "failed",
            Phase::HandedOver => "handedOver",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Auto Scaling lifecycle hook holding the instance, to complete once the node is drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleHook {
    pub hook_name: String,
    pub group_name: String,
    /// Absent in some messages; `CompleteLifecycleAction` accepts the instance id instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub instance_id: String,
}

impl From<&LifecycleAction> for LifecycleHook {
    fn from(action: &LifecycleAction) -> Self {
        LifecycleHook {
            hook_name: action.hook_name.clone(),
            group_name: action.group_name.clone(),
            token: action.token.clone(),
            instance_id: action.instance_id.clone(),
        }
    }
}

/// The durable drain record, stored as JSON in the node annotation
/// [`names::ANNOTATION_DRAIN_RECORD`]. Written before an SQS message is deleted; a new leader
/// resumes every drain from these records, and `nodedrain uncordon` removes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainRecord {
    /// Why: an interruption kind (`spot-interruption`, ...) or `manual`. Also the value of the
    /// [`names::TAINT_INTERRUPTION`] taint.
    pub kind: DrainKind,
    /// Short human text ("state stopping", `nodedrain drain` by a person); never parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The interruption's event id, for dedupe and for following the event in logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// When the node goes away; `None` when nobody said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// When the drain started (the first [`prepare`]); resumed drains keep it.
    pub started: Timestamp,
    /// Voluntary drains never override PodDisruptionBudgets.
    pub voluntary: bool,
    /// Present for Auto Scaling terminate hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_hook: Option<LifecycleHook>,
    pub phase: Phase,
    /// The node already had [`names::LABEL_EXCLUDE_FROM_LB`] before the drain, so [`release`]
    /// leaves it: somebody else wants the node out of load balancers. Filled in by [`prepare`].
    #[serde(default)]
    pub lb_label_preexisting: bool,
}

impl DrainRecord {
    /// A drain started by a person from the CLI; involuntary when they gave a deadline.
    pub fn manual(started: Timestamp, deadline: Option<Timestamp>) -> Self {
        DrainRecord {
            kind: DrainKind::Manual,
            reason: Some("nodedrain drain".to_string()),
            event_id: None,
            deadline,
            started,
            voluntary: deadline.is_none(),
            lifecycle_hook: None,
            phase: Phase::Cordoned,
            lb_label_preexisting: false,
        }
    }

    /// A drain caused by an AWS interruption.
    pub fn from_interruption(interruption: &Interruption, started: Timestamp) -> Self {
        DrainRecord {
            kind: DrainKind::Interruption(interruption.kind),
            reason: (!interruption.detail.is_empty()).then(|| interruption.detail.clone()),
            event_id: Some(interruption.event_id.clone()),
            deadline: interruption.deadline,
            started,
            voluntary: interruption.kind.is_voluntary(),
            lifecycle_hook: interruption.lifecycle.as_ref().map(LifecycleHook::from),
            phase: Phase::Cordoned,
            lb_label_preexisting: false,
        }
    }

    /// Moves the record to `phase` if [`Phase::may_become`] allows it; returns whether it did.
    pub fn enter(&mut self, phase: Phase) -> bool {
        let allowed = self.phase.may_become(phase);
        if allowed {
            self.phase = phase;
        }
        allowed
    }

    fn to_annotation(&self) -> String {
        // Serializing plain strings, numbers and timestamps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The drain record on a node, if any. Pure, for callers that already hold the Node (a
/// controller's reflector).
pub fn record_of(node: &Node) -> Result<Option<DrainRecord>, serde_json::Error> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_DRAIN_RECORD))
        .map(|text| serde_json::from_str(text))
        .transpose()
}

fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or_default()
}

fn is_our_taint(taint: &Taint) -> bool {
    taint.key == names::TAINT_INTERRUPTION && taint.effect == "NoSchedule"
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
#[cfg(test)]
fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && (value.is_empty()
            || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
                && value.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

/// The merge patch that makes `node` cordoned, tainted, labelled and annotated with `record`;
/// `None` when it already is. Carries the node's resourceVersion, because `spec.taints` is
/// replaced whole. Pure.
fn prepare_patch(node: &Node, record: &DrainRecord) -> Option<Value> {
    let spec = node.spec.clone().unwrap_or_default();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let existing = record_of(node).ok().flatten();
    let mut record = record.clone();
    // Whether the label was there before nodedrain touched the node: from an earlier record
    // when resuming (then the label is ours), else from the node as it is now.
    record.lb_label_preexisting = match &existing {
        Some(previous) => previous.lb_label_preexisting,
        None => labels.contains_key(names::LABEL_EXCLUDE_FROM_LB),
    };

    let ours = Taint {
        key: names::TAINT_INTERRUPTION.to_string(),
        value: Some(record.kind.as_str().to_string()),
        effect: "NoSchedule".to_string(),
        time_added: None,
    };
    let taints = spec.taints.clone().unwrap_or_default();
    let mut new_taints: Vec<Taint> = Vec::with_capacity(taints.len() + 1);
    let mut placed = false;
    for taint in taints {
        if is_our_taint(&taint) {
            if !placed {
                // Keep its position (and timeAdded) when the value is unchanged.
                new_taints.push(if taint.value == ours.value {
                    taint
                } else {
                    ours.clone()
                });
                placed = true;
            }
        } else {
            new_taints.push(taint);
        }
    }
    if !placed {
        new_taints.push(ours);
    }

    let annotation = record.to_annotation();
    let unchanged = spec.unschedulable == Some(true)
        && spec.taints.as_ref() == Some(&new_taints)
        && labels.contains_key(names::LABEL_EXCLUDE_FROM_LB)
        && existing.as_ref() == Some(&record);
    if unchanged {
        return None;
    }
    let mut patch = json!({
        "metadata": {
            "resourceVersion": node.metadata.resource_version,
            "annotations": {names::ANNOTATION_DRAIN_RECORD: annotation},
        },
        "spec": {"unschedulable": true, "taints": new_taints},
    });
    if !labels.contains_key(names::LABEL_EXCLUDE_FROM_LB) {
        patch["metadata"]["labels"] = json!({names::LABEL_EXCLUDE_FROM_LB: "true"});
    }
    Some(patch)
}

/// The merge patch undoing [`prepare`]: uncordon, remove the taint (whatever its value), the
/// record, and the label unless the record says it was there before. Without a record the label
/// is left alone: nodedrain cannot know who put it there. `None` when nothing is left to undo.
fn release_patch(node: &Node) -> Option<Value> {
    let spec = node.spec.clone().unwrap_or_default();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let record = record_of(node).ok().flatten();
    let taints = spec.taints.clone().unwrap_or_default();
    let kept: Vec<Taint> = taints
        .iter()
        .filter(|t| !is_our_taint(t))
        .cloned()
        .collect();
    let remove_label = labels.contains_key(names::LABEL_EXCLUDE_FROM_LB)
        && record.as_ref().is_some_and(|r| !r.lb_label_preexisting);
    let has_annotation = annotations.contains_key(names::ANNOTATION_DRAIN_RECORD);
    let taint_removed = kept.len() != taints.len();
    if spec.unschedulable != Some(true) && !taint_removed && !remove_label && !has_annotation {
        return None;
    }
    let mut patch = json!({
        "metadata": {"resourceVersion": node.metadata.resource_version},
        "spec": {"unschedulable": null},
    });
    if taint_removed {
        patch["spec"]["taints"] = if kept.is_empty() {
            Value::Null
        } else {
            json!(kept)
        };
    }
    if remove_label {
        patch["metadata"]["labels"] = json!({names::LABEL_EXCLUDE_FROM_LB: null});
    }
    if has_annotation {
        patch["metadata"]["annotations"] = json!({names::ANNOTATION_DRAIN_RECORD: null});
    }
    Some(patch)
}

/// Whether the node carries [`names::TAINT_OUT_OF_SERVICE`] with effect NoExecute.
pub fn is_out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| {
            taints
                .iter()
                .any(|t| t.key == names::TAINT_OUT_OF_SERVICE && t.effect == "NoExecute")
        })
}

/// The merge patch adding `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`; `None`
/// when the node has it. Carries the resourceVersion because `spec.taints` is replaced whole.
/// Pure.
fn out_of_service_patch(node: &Node) -> Option<Value> {
    if is_out_of_service(node) {
        return None;
    }
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    taints.push(Taint {
        key: names::TAINT_OUT_OF_SERVICE.to_string(),
        value: Some(names::TAINT_OUT_OF_SERVICE_VALUE.to_string()),
        effect: "NoExecute".to_string(),
        time_added: None,
    });
    Some(json!({
        "metadata": {"resourceVersion": node.metadata.resource_version},
        "spec": {"taints": taints},
    }))
}

/// Taints the node `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`. Only for a node
/// whose instance EC2 reports gone: every pod without a matching toleration is evicted at once.
/// Returns the node as written, or `None` when it had the taint already.
pub async fn mark_out_of_service(api: &Api<Node>, name: &str) -> Result<Option<Node>, NodeError> {
    patch_with_retry(api, name, None, |node| Ok(out_of_service_patch(node)))
        .await
        .map(|(node, written)| written.then_some(node))
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(names::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    }
}

/// Reads a node; 404 becomes [`NodeError::NotFound`].
pub async fn get(api: &Api<Node>, name: &str) -> Result<Node, NodeError> {
    api.get_opt(name)
        .await
        .map_err(|source| NodeError::Api {
            node: name.to_string(),
            action: "get",
            source,
        })?
        .ok_or_else(|| NodeError::NotFound {
            node: name.to_string(),
        })
}

/// Applies `compute` (a merge patch carrying the read resourceVersion, or `None` for nothing to
/// do) with retries on 409 conflicts; returns the node as written.
async fn patch_with_retry(
    api: &Api<Node>,
    name: &str,
    mut current: Option<Node>,
    compute: impl Fn(&Node) -> Result<Option<Value>, NodeError>,
) -> Result<(Node, bool), NodeError> {
    for _ in 0..CONFLICT_RETRIES {
        let node = match current.take() {
            Some(node) => node,
            None => get(api, name).await?,
        };
        let Some(patch) = compute(&node)? else {
            return Ok((node, false));
        };
        match api
            .patch(name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(node) => return Ok((node, true)),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Err(NodeError::NotFound {
                    node: name.to_string(),
                });
            }
            Err(source) => {
                return Err(NodeError::Api {
                    node: name.to_string(),
                    action: "patch",
                    source,
                });
            }
        }
    }
    Err(NodeError::Conflict {
        node: name.to_string(),
    })
}

/// Prepares a node for draining in one patch: cordon, taint
/// `nodedrain.io/interruption=<record.kind>:NoSchedule`, label
/// `node.kubernetes.io/exclude-from-external-load-balancers=true`, and the drain record.
///
/// Idempotent: calling it again with the same record writes nothing; with another record it
/// replaces the record and the taint's value. Other taints, labels and annotations are kept.
/// Returns the node as it is afterwards (its record has `lb_label_preexisting` filled in).
pub async fn prepare(api: &Api<Node>, name: &str, record: &DrainRecord) -> Result<Node, NodeError> {
    patch_with_retry(api, name, None, |node| Ok(prepare_patch(node, record)))
        .await
        .map(|(node, _)| node)
}

/// [`prepare`] starting from a node the caller has just read (saves a request; a stale copy
/// only costs a 409 and a fresh read).
pub async fn prepare_from(
    api: &Api<Node>,
    node: &Node,
    record: &DrainRecord,
) -> Result<Node, NodeError> {
    let name = node_name(node).to_string();
    patch_with_retry(api, &name, Some(node.clone()), |node| {
        Ok(prepare_patch(node, record))
    })
    .await
    .map(|(node, _)| node)
}

/// Overwrites the drain record (annotation only) with one merge patch, without reading the node
/// first. For the engine, which holds the record it wrote; others use [`set_phase`].
pub async fn write_record(
    api: &Api<Node>,
    name: &str,
    record: &DrainRecord,
) -> Result<Node, NodeError> {
    let patch = json!({"metadata": {"annotations": {
        names::ANNOTATION_DRAIN_RECORD: record.to_annotation()
    }}});
    api.patch(name, &patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|source| match source {
            kube::Error::Api(status) if status.code == 404 => NodeError::NotFound {
                node: name.to_string(),
            },
            source => NodeError::Api {
                node: name.to_string(),
                action: "patch",
                source,
            },
        })
}

/// Sets the phase of the node's drain record (read, then a patch under the read
/// resourceVersion). Errors with [`NodeError::NoRecord`] when the node has none.
pub async fn set_phase(
    api: &Api<Node>,
    name: &str,
    phase: Phase,
) -> Result<DrainRecord, NodeError> {
    let (node, _) = patch_with_retry(api, name, None, |node| {
        let mut record = record_of(node)
            .map_err(|source| NodeError::InvalidRecord {
                node: node_name(node).to_string(),
                source,
            })?
            .ok_or_else(|| NodeError::NoRecord {
                node: name.to_string(),
            })?;
        if record.phase == phase {
            return Ok(None);
        }
        if !record.enter(phase) {
            return Err(NodeError::PhaseOrder {
                node: name.to_string(),
                from: record.phase,
                to: phase,
            });
        }
        Ok(Some(json!({"metadata": {
            "resourceVersion": node.metadata.resource_version,
            "annotations": {names::ANNOTATION_DRAIN_RECORD: record.to_annotation()},
        }})))
    })
    .await?;
    record_of(&node)
        .map_err(|source| NodeError::InvalidRecord {
            node: name.to_string(),
            source,
        })?
        .ok_or_else(|| NodeError::NoRecord {
            node: name.to_string(),
        })
}

/// The node's drain record, `None` when it has none.
pub async fn read_record(api: &Api<Node>, name: &str) -> Result<Option<DrainRecord>, NodeError> {
    let node = get(api, name).await?;
    record_of(&node).map_err(|source| NodeError::InvalidRecord {
        node: name.to_string(),
        source,
    })
}

/// Undoes [`prepare`] in one patch: uncordon, remove nodedrain's taint, the drain record, and the
/// load-balancer label unless it predates the drain. Idempotent; other taints are kept. Works on
/// nodes cordoned by anyone (it is `kubectl uncordon` plus nodedrain's cleanup). Returns whether
/// anything had to change.
pub async fn release(api: &Api<Node>, name: &str) -> Result<bool, NodeError> {
    patch_with_retry(api, name, None, |node| Ok(release_patch(node)))
        .await
        .map(|(_, changed)| changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn node(taints: Vec<Taint>, labels: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some("42".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn taint(key: &str, value: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }
    }

    /// Applies a JSON merge patch (RFC 7386), as the apiserver would.
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(fields) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let object = target.as_object_mut().unwrap();
                for (key, value) in fields {
                    if value.is_null() {
                        object.remove(key);
                    } else {
                        merge(object.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    fn apply(node: &Node, patch: &Value) -> Node {
        let mut value = serde_json::to_value(node).unwrap();
        merge(&mut value, patch);
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn out_of_service_taint_is_added_once_and_keeps_other_taints() {
        let before = node(
            vec![taint(names::TAINT_INTERRUPTION, "spot-interruption")],
            &[],
        );
        assert!(!is_out_of_service(&before));
        let patch = out_of_service_patch(&before).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], json!("42"));
        let after = apply(&before, &patch);
        assert!(is_out_of_service(&after));
        let taints = after.spec.unwrap().taints.unwrap();
        assert_eq!(taints.len(), 2, "{taints:?}");
        assert_eq!(taints[0].key, names::TAINT_INTERRUPTION);
        assert_eq!(taints[1].value.as_deref(), Some("nodeshutdown"));
        assert_eq!(taints[1].effect, "NoExecute");
    }

    #[test]
    fn out_of_service_taint_already_there_writes_nothing() {
        let mut present = taint(names::TAINT_OUT_OF_SERVICE, "anything");
        present.effect = "NoExecute".into();
        assert_eq!(out_of_service_patch(&node(vec![present], &[])), None);
        // The same key with another effect is not the controllers' signal: added beside it.
        let no_schedule = taint(names::TAINT_OUT_OF_SERVICE, "nodeshutdown");
        assert!(out_of_service_patch(&node(vec![no_schedule], &[])).is_some());
    }

    #[test]
    fn record_round_trips_with_camel_case_fields() {
        let mut record = DrainRecord::manual(t(0), Some(t(120)));
        record.lifecycle_hook = Some(LifecycleHook {
            hook_name: "h".into(),
            group_name: "g".into(),
            token: None,
            instance_id: "i-0123456789abcdef0".into(),
        });
        let text = record.to_annotation();
        assert!(text.contains("\"lifecycleHook\""), "{text}");
        assert!(text.contains("\"phase\":\"cordoned\""), "{text}");
        assert!(!record.voluntary);
        let back: DrainRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, record);
        // Records written by older versions (fewer fields) still read.
        let old: DrainRecord = serde_json::from_str(
            r#"{"kind":"spot-interruption","started":"2027-01-15T08:00:00Z","voluntary":false,"phase":"draining"}"#,
        )
        .unwrap();
        assert_eq!(old.phase, Phase::Draining);
        assert!(!old.lb_label_preexisting);
    }

    #[test]
    fn prepare_keeps_other_taints_and_is_idempotent() {
        let before = node(
            vec![
                taint("dedicated", "gpu"),
                taint(names::TAINT_INTERRUPTION, "old"),
            ],
            &[("a", "b")],
        );
        let record = DrainRecord::manual(t(0), None);
        let patch = prepare_patch(&before, &record).expect("changes needed");
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let after = apply(&before, &patch);
        let spec = after.spec.clone().unwrap();
        assert_eq!(spec.unschedulable, Some(true));
        assert_eq!(
            spec.taints.unwrap(),
            vec![
                taint("dedicated", "gpu"),
                taint(names::TAINT_INTERRUPTION, MANUAL_KIND)
            ]
        );
        let labels: BTreeMap<_, _> = after.metadata.labels.clone().unwrap();
        assert_eq!(labels.get(names::LABEL_EXCLUDE_FROM_LB).unwrap(), "true");
        assert_eq!(labels.get("a").unwrap(), "b");
        let written = record_of(&after).unwrap().unwrap();
        assert!(!written.lb_label_preexisting);
        assert_eq!(
            prepare_patch(&after, &record),
            None,
            "second prepare is a no-op"
        );

        // Releasing restores the original taints (minus ours) and removes our label.
        let released = apply(&after, &release_patch(&after).unwrap());
        let spec = released.spec.clone().unwrap();
        assert_eq!(spec.unschedulable, None);
        assert_eq!(spec.taints.unwrap(), vec![taint("dedicated", "gpu")]);
        assert!(
            !released
                .metadata
                .labels
                .clone()
                .unwrap()
                .contains_key(names::LABEL_EXCLUDE_FROM_LB)
        );
        assert_eq!(record_of(&released).unwrap(), None);
        assert_eq!(release_patch(&released), None, "second release is a no-op");
    }

    #[test]
    fn a_preexisting_lb_label_survives_release() {
        let before = node(vec![], &[(names::LABEL_EXCLUDE_FROM_LB, "true")]);
        let record = DrainRecord::manual(t(0), None);
        let after = apply(&before, &prepare_patch(&before, &record).unwrap());
        assert!(record_of(&after).unwrap().unwrap().lb_label_preexisting);
        // A resumed prepare keeps knowing the label was not ours.
        let again = prepare_patch(&after, &record);
        assert_eq!(again, None);
        let released = apply(&after, &release_patch(&after).unwrap());
        assert!(
            released
                .metadata
                .labels
                .unwrap()
                .contains_key(names::LABEL_EXCLUDE_FROM_LB)
        );
        assert_eq!(released.spec.unwrap().taints, None);
    }

    #[test]
    fn release_without_record_only_uncordons_and_untaints() {
        let mut before = node(
            vec![taint(names::TAINT_INTERRUPTION, "spot-interruption")],
            &[(names::LABEL_EXCLUDE_FROM_LB, "true")],
        );
        before.spec.as_mut().unwrap().unschedulable = Some(true);
        let patch = release_patch(&before).unwrap();
        assert_eq!(patch["spec"]["unschedulable"], Value::Null);
        assert_eq!(patch["spec"]["taints"], Value::Null);
        assert!(patch["metadata"].get("labels").is_none());
        assert_eq!(release_patch(&node(vec![], &[])), None);
    }

    #[test]
    fn a_record_moves_only_forward() {
        use Phase::*;
        let mut record = DrainRecord::manual(Timestamp::UNIX_EPOCH, None);
        assert!(record.enter(Draining));
        assert!(!record.enter(Cordoned), "never back to cordoned");
        assert!(record.enter(Drained));
        assert!(!record.enter(Failed), "a drained node stays drained");
        assert!(!record.enter(Draining));
        assert!(record.enter(HandedOver));
        assert_eq!(record.phase, HandedOver);
        for phase in [Cordoned, Draining, Drained, Failed] {
            assert!(!HandedOver.may_become(phase), "handedOver is the end");
            assert!(phase.may_become(phase));
        }
        assert!(
            Failed.may_become(HandedOver),
            "a hook is completed after a failed drain too"
        );
        assert!(
            !Cordoned.may_become(HandedOver),
            "only after the drain ended"
        );
    }

    #[test]
    fn every_drain_kind_is_a_taint_value_and_reads_back() {
        assert!(!valid_label_value("-x"));
        assert!(!valid_label_value("a b"));
        assert!(!valid_label_value(&"x".repeat(64)));
        let kinds = InterruptionKind::ALL
            .iter()
            .map(|k| DrainKind::Interruption(*k))
            .chain([DrainKind::Manual]);
        for kind in kinds {
            assert!(valid_label_value(kind.as_str()), "{kind}");
            assert_eq!(kind.as_str().parse::<DrainKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<DrainKind>(&json).unwrap(), kind);
        }
        assert!("spot".parse::<DrainKind>().is_err());
        // A record with a kind this version does not know is unreadable, not misread.
        assert!(serde_json::from_str::<DrainKind>("\"hibernation\"").is_err());
    }
}
