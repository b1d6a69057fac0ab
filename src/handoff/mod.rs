//! The last step of a drain: handing the node to whoever ends the instance. An Auto Scaling
//! terminate hook is kept alive while the drain runs and completed when it ends; a Karpenter
//! NodeClaim is deleted once the node is empty, so the replacement capacity comes now rather than
//! after the instance is gone. The record then says `handedOver`. Once EC2 says the instance is
//! gone, [`out_of_service`] may taint the node so its pods and volumes are released.

pub mod out_of_service;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::names;
use crate::node::{self, DrainRecord, LifecycleHook, Phase};

/// Auto Scaling keeps an instance in Terminating:Wait for the hook's heartbeat timeout (one hour
/// by default, often set to minutes). A heartbeat every minute keeps any timeout of two minutes
/// or more from expiring while the drain runs.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The clients a handover needs. Cheap to clone.
#[derive(Clone)]
pub struct Handoff {
    client: Client,
    autoscaling: aws_sdk_autoscaling::Client,
}

impl Handoff {
    pub fn new(client: Client, autoscaling: aws_sdk_autoscaling::Client) -> Self {
        Handoff {
            client,
            autoscaling,
        }
    }

    /// Keeps the instance in Terminating:Wait until `stop`.
    pub async fn heartbeat(&self, hook: &LifecycleHook, stop: CancellationToken) {
        let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let mut request = self
                .autoscaling
                .record_lifecycle_action_heartbeat()
                .lifecycle_hook_name(&hook.hook_name)
                .auto_scaling_group_name(&hook.group_name);
            request = match &hook.token {
                Some(token) => request.lifecycle_action_token(token),
                None => request.instance_id(&hook.instance_id),
            };
            if let Err(error) = request.send().await {
                warn!(hook = %hook.hook_name, error = %aws_sdk_autoscaling::error::DisplayErrorContext(&error),
                    "lifecycle heartbeat failed");
            }
        }
    }

    /// Hands the node over after its drain ended (not after a cancelled one: the next leader
    /// resumes that). The Auto Scaling hook is completed whether or not the drain emptied the
    /// node: the deadline has come either way, and holding the instance longer only delays its
    /// replacement. `karpenter`: the node is empty and Karpenter may replace it now. `node`: the
    /// node as last seen, to find its NodeClaim.
    pub async fn hand_over(
        &self,
        name: &str,
        node: Option<&Node>,
        record: &DrainRecord,
        karpenter: bool,
    ) -> bool {
        let mut handed_over = false;
        if let Some(hook) = &record.lifecycle_hook {
            handed_over |= self.complete_lifecycle_action(hook).await;
        }
        if karpenter && let Some(node) = node {
            handed_over |= self.delete_node_claim(name, node).await;
        }
        if handed_over {
            let api: Api<Node> = Api::all(self.client.clone());
            if let Err(error) = node::set_phase(&api, name, Phase::HandedOver).await {
                warn!(%error, "cannot record the handover");
            }
        }
        handed_over
    }

    /// `CompleteLifecycleAction` with CONTINUE: Auto Scaling may terminate the instance now.
    async fn complete_lifecycle_action(&self, hook: &LifecycleHook) -> bool {
        let mut request = self
            .autoscaling
            .complete_lifecycle_action()
            .lifecycle_hook_name(&hook.hook_name)
            .auto_scaling_group_name(&hook.group_name)
            .lifecycle_action_result("CONTINUE");
        request = match &hook.token {
            Some(token) => request.lifecycle_action_token(token),
            None => request.instance_id(&hook.instance_id),
        };
        match request.send().await {
            Ok(_) => {
                info!(hook = %hook.hook_name, group = %hook.group_name, "lifecycle action completed");
                true
            }
            Err(error) => {
                warn!(hook = %hook.hook_name, error = %aws_sdk_autoscaling::error::DisplayErrorContext(&error),
                    "cannot complete the lifecycle action; Auto Scaling will continue at the hook's timeout");
                false
            }
        }
    }

    fn node_claims(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"),
            "nodeclaims",
        );
        Api::all_with(self.client.clone(), &resource)
    }

    /// Deletes the Karpenter NodeClaim behind a drained node. Only for nodes of a NodePool.
    async fn delete_node_claim(&self, name: &str, node: &Node) -> bool {
        if !node.labels().contains_key(names::LABEL_KARPENTER_NODEPOOL) {
            return false;
        }
        let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.clone());
        let api = self.node_claims();
        let claims = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(error) => {
                warn!(%error, "cannot list Karpenter NodeClaims; leaving the node to Karpenter");
                return false;
            }
        };
        let claim = claims.into_iter().find(|claim| {
            let status = claim.data.get("status");
            let node_name = status
                .and_then(|s| s.get("nodeName"))
                .and_then(|v| v.as_str());
            let claim_provider = status
                .and_then(|s| s.get("providerID"))
                .and_then(|v| v.as_str());
            node_name == Some(name)
                || (provider_id.is_some() && claim_provider == provider_id.as_deref())
        });
        let Some(claim) = claim else {
            warn!("no Karpenter NodeClaim found for the node");
            return false;
        };
        match api
            .delete(&claim.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {
                info!(nodeclaim = %claim.name_any(), "deleted the NodeClaim: Karpenter replaces the capacity");
                true
            }
            Err(error) => {
                warn!(nodeclaim = %claim.name_any(), %error, "cannot delete the NodeClaim");
                false
            }
        }
    }
}
