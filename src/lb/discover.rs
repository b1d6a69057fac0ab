//! Finding the target groups that can route to this cluster's nodes and pods, and what they have
//! registered: the I/O edge of load-balancer awareness.
//!
//! Two sources: TargetGroupBindings (`elbv2.k8s.aws/v1beta1`, written by the AWS Load Balancer
//! Controller for each Service or Ingress it exposes), and target groups the operator manages
//! outside Kubernetes, named by ARN or found by a tag in nodedrain's configuration. This module
//! also deregisters targets, and caches what a burst's drains share ([`LoadBalancers`]). Which of their targets a pod
//! serves through is decided by [`super::targets::served_by`].

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::Client as Elbv2;
use aws_sdk_elasticloadbalancingv2::error::DisplayErrorContext;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};

use aws_sdk_elasticloadbalancingv2::types::TargetDescription;

use super::config::LoadBalancerArgs;
use super::targets::{
    DEFAULT_DEREGISTRATION_DELAY, LoadBalancerView, Owner, Target, TargetGroup, TargetState,
    TargetType,
};
use crate::config::{AwsArgs, AwsConfig};
use crate::resolve::ManagedTag;

/// The attribute that holds a group's deregistration delay, in seconds.
const DEREGISTRATION_DELAY_ATTRIBUTE: &str = "deregistration_delay.timeout_seconds";

/// DescribeTargetGroups takes at most 20 ARNs a call.
const ARNS_PER_CALL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot list TargetGroupBindings: {0}")]
    Bindings(#[source] kube::Error),
    #[error("ELBv2 {operation} failed: {message}")]
    Elbv2 {
        operation: &'static str,
        message: String,
    },
}

/// A TargetGroupBinding, as far as a drain cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub namespace: String,
    pub name: String,
    pub target_group_arn: String,
    /// `spec.targetType`; `None` when the binding leaves it to the group.
    pub target_type: Option<TargetType>,
}

/// Reads a TargetGroupBinding object. `Err` says what is wrong with it, for a warning: a binding
/// without `spec.targetGroupARN` routes nothing. Pure.
pub fn binding_of(object: &DynamicObject) -> Result<Binding, String> {
    let spec = object.data.get("spec");
    let arn = spec
        .and_then(|s| s.get("targetGroupARN"))
        .and_then(|v| v.as_str())
        .filter(|arn| !arn.is_empty())
        .ok_or_else(|| "no spec.targetGroupARN".to_string())?;
    let target_type = match spec
        .and_then(|s| s.get("targetType"))
        .and_then(|v| v.as_str())
    {
        None => None,
        Some(value) => Some(
            TargetType::parse(value)
                .ok_or_else(|| format!("spec.targetType {value:?} is neither instance nor ip"))?,
        ),
    };
    Ok(Binding {
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
        target_group_arn: arn.to_string(),
        target_type,
    })
}

/// Reads `deregistration_delay.timeout_seconds` from a group's attributes; AWS's default when it
/// is missing or unreadable. Pure.
pub fn deregistration_delay<'a>(
    attributes: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Duration {
    attributes
        .into_iter()
        .find(|(key, _)| *key == DEREGISTRATION_DELAY_ATTRIBUTE)
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .map_or(DEFAULT_DEREGISTRATION_DELAY, Duration::from_secs)
}

/// Looks target groups and their targets up. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    client: Client,
    elbv2: Elbv2,
    /// Target groups named in the configuration: nodedrain deregisters their targets itself.
    configured: Vec<String>,
    /// Groups carrying this tag are configured too.
    tag: Option<ManagedTag>,
}

impl Discovery {
    pub fn new(client: Client, elbv2: Elbv2, configured: Vec<String>) -> Self {
        Discovery {
            client,
            elbv2,
            configured,
            tag: None,
        }
    }

    /// Also treat the groups carrying `tag` as configured.
    pub fn with_tag(mut self, tag: Option<ManagedTag>) -> Self {
        self.tag = tag;
        self
    }

    /// The ARNs of every target group carrying the configured tag (none without a tag).
    async fn tagged(&self) -> Result<Vec<String>, DiscoverError> {
        let Some(tag) = &self.tag else {
            return Ok(Vec::new());
        };
        let mut arns = Vec::new();
        let mut pages = self.elbv2.describe_target_groups().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| elbv2_error("DescribeTargetGroups", e))?;
            arns.extend(
                page.target_groups()
                    .iter()
                    .filter_map(|g| g.target_group_arn().map(str::to_string)),
            );
        }
        let mut tagged = Vec::new();
        for chunk in arns.chunks(ARNS_PER_CALL) {
            let out = self
                .elbv2
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| elbv2_error("DescribeTags", e))?;
            for description in out.tag_descriptions() {
                let tags = description
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value().unwrap_or_default())));
                if tag.matches(tags)
                    && let Some(arn) = description.resource_arn()
                {
                    tagged.push(arn.to_string());
                }
            }
        }
        Ok(tagged)
    }

    fn bindings_api(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding"),
            "targetgroupbindings",
        );
        Api::all_with(self.client.clone(), &resource)
    }

    /// Every TargetGroupBinding in the cluster; none when the CRD is not installed (no AWS Load
    /// Balancer Controller). Unusable bindings are skipped with a warning.
    pub async fn bindings(&self) -> Result<Vec<Binding>, DiscoverError> {
        let list = match self.bindings_api().list(&ListParams::default()).await {
            Ok(list) => list,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Vec::new()),
            Err(error) => return Err(DiscoverError::Bindings(error)),
        };
        Ok(list
            .items
            .iter()
            .filter_map(|object| match binding_of(object) {
                Ok(binding) => Some(binding),
                Err(problem) => {
                    tracing::warn!(namespace = object.namespace().unwrap_or_default(),
                        name = %object.name_any(), %problem, "TargetGroupBinding skipped");
                    None
                }
            })
            .collect())
    }

    /// The target groups behind the bindings and the configured ARNs, with their target type and
    /// deregistration delay. A group both bound and configured is the binding's: the AWS Load
    /// Balancer Controller deregisters its targets, and two deregistering parties would race.
    /// Lambda and ALB-type groups are left out: their targets are never a node or a pod.
    pub async fn target_groups(&self) -> Result<Vec<TargetGroup>, DiscoverError> {
        let mut owners: BTreeMap<String, Owner> = BTreeMap::new();
        for arn in self.configured.iter().cloned().chain(self.tagged().await?) {
            owners.insert(arn, Owner::Configured);
        }
        for binding in self.bindings().await? {
            owners.insert(
                binding.target_group_arn.clone(),
                Owner::Binding {
                    namespace: binding.namespace,
                    name: binding.name,
                },
            );
        }
        let arns: Vec<String> = owners.keys().cloned().collect();
        let mut groups = Vec::new();
        for chunk in arns.chunks(ARNS_PER_CALL) {
            for group in self.describe_groups(chunk).await? {
                let (Some(arn), Some(kind)) = (group.target_group_arn(), group.target_type())
                else {
                    continue;
                };
                let Some(target_type) = TargetType::parse(kind.as_str()) else {
                    continue;
                };
                let Some(owner) = owners.get(arn) else {
                    continue;
                };
                groups.push(TargetGroup {
                    arn: arn.to_string(),
                    target_type,
                    deregistration_delay: self.deregistration_delay_of(arn).await?,
                    owner: owner.clone(),
                });
            }
        }
        Ok(groups)
    }

    /// DescribeTargetGroups for `arns`. ELBv2 refuses the whole call when one of them no longer
    /// exists (a TargetGroupBinding left behind by a deleted load balancer, a stale ARN in the
    /// configuration); the others are then described one by one and the missing ones skipped
    /// with a warning, so one stale name does not blind every drain.
    async fn describe_groups(
        &self,
        arns: &[String],
    ) -> Result<Vec<aws_sdk_elasticloadbalancingv2::types::TargetGroup>, DiscoverError> {
        let call = |arns: Vec<String>| {
            self.elbv2
                .describe_target_groups()
                .set_target_group_arns(Some(arns))
                .send()
        };
        match call(arns.to_vec()).await {
            Ok(out) => Ok(out.target_groups().to_vec()),
            Err(error) if is_not_found(&error) => {
                let mut found = Vec::new();
                for arn in arns {
                    match call(vec![arn.clone()]).await {
                        Ok(out) => found.extend(out.target_groups().iter().cloned()),
                        Err(e) if is_not_found(&e) => {
                            tracing::warn!(target_group = %arn, "target group not found; skipped");
                        }
                        Err(e) => return Err(elbv2_error("DescribeTargetGroups", e)),
                    }
                }
                Ok(found)
            }
            Err(error) => Err(elbv2_error("DescribeTargetGroups", error)),
        }
    }

    async fn deregistration_delay_of(&self, arn: &str) -> Result<Duration, DiscoverError> {
        let out = self
            .elbv2
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| elbv2_error("DescribeTargetGroupAttributes", e))?;
        Ok(deregistration_delay(
            out.attributes()
                .iter()
                .filter_map(|a| Some((a.key()?, a.value()?))),
        ))
    }

    /// What `group` has registered, and each target's state.
    pub async fn registered(
        &self,
        group: &TargetGroup,
    ) -> Result<Vec<(Target, TargetState)>, DiscoverError> {
        self.target_health(&group.arn).await
    }

    /// What the group `arn` has registered, and each target's state.
    pub async fn target_health(
        &self,
        arn: &str,
    ) -> Result<Vec<(Target, TargetState)>, DiscoverError> {
        let out = self
            .elbv2
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| elbv2_error("DescribeTargetHealth", e))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|description| {
                let target = description.target()?;
                let state = description
                    .target_health()
                    .and_then(|h| h.state())
                    .and_then(|s| TargetState::parse(s.as_str()))
                    // A state this code does not know may route traffic: treat it as healthy
                    // rather than let a pod stop under it.
                    .unwrap_or(TargetState::Healthy);
                Some((
                    Target {
                        group_arn: arn.to_string(),
                        id: target.id()?.to_string(),
                        port: target.port()?,
                    },
                    state,
                ))
            })
            .collect())
    }
}

impl Discovery {
    /// Takes `targets` out of the group `arn`: the load balancer stops sending them new
    /// connections (`draining`) and lets the ones in flight finish for the group's delay.
    pub async fn deregister(&self, arn: &str, targets: &[Target]) -> Result<(), DiscoverError> {
        let descriptions = targets
            .iter()
            .map(|t| TargetDescription::builder().id(&t.id).port(t.port).build())
            .collect();
        self.elbv2
            .deregister_targets()
            .target_group_arn(arn)
            .set_targets(Some(descriptions))
            .send()
            .await
            .map_err(|e| elbv2_error("DeregisterTargets", e))?;
        Ok(())
    }
}

/// The drain engine's access to load balancers: discovery, and whether drains wait at all.
/// Cheap to clone.
#[derive(Clone)]
pub struct LoadBalancers {
    pub discovery: Discovery,
    /// `--lb-wait`: hold pods until their targets drain. Off, plans still show the targets.
    pub wait: bool,
    cache: std::sync::Arc<tokio::sync::Mutex<Cached>>,
}

/// The last view, and when its parts were read.
#[derive(Default)]
struct Cached {
    view: LoadBalancerView,
    groups_at: Option<std::time::Instant>,
    health_at: Option<std::time::Instant>,
}

/// How long one `DescribeTargetHealth` round serves the drains that start after it: a burst
/// of 200 spot warnings would otherwise ask every group 200 times within seconds, far above
/// ELBv2's request rate. The wait itself reads target health afresh every 2 s.
const HEALTH_TTL: Duration = Duration::from_secs(2);

/// How long a lookup of the watched target groups (TargetGroupBindings, tags, attributes)
/// serves later drains: a burst's drains start within seconds of each other, and groups and
/// their delays change rarely.
const GROUPS_TTL: Duration = Duration::from_secs(60);

impl LoadBalancers {
    pub fn new(discovery: Discovery, wait: bool) -> Self {
        LoadBalancers {
            discovery,
            wait,
            cache: Default::default(),
        }
    }

    /// For the CLI: ELBv2 access from `--aws-region` / `AWS_REGION` / `AWS_DEFAULT_REGION` and
    /// the standard credential chain. `Err` says why load balancers cannot be checked (no
    /// region), for the command to print.
    pub async fn connect(
        client: Client,
        args: &LoadBalancerArgs,
        aws: &AwsArgs,
    ) -> Result<LoadBalancers, String> {
        let region = aws
            .aws_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| {
                "load balancers not checked: no AWS region (set --aws-region or AWS_REGION)"
                    .to_string()
            })?;
        let sdk = AwsConfig {
            region,
            endpoint_url: aws.aws_endpoint_url.clone(),
        }
        .load()
        .await;
        let discovery = Discovery::new(client, Elbv2::new(&sdk), args.target_group_arns())
            .with_tag(args.target_group_tag.clone());
        Ok(LoadBalancers::new(discovery, args.wait))
    }

    /// The watched groups and what they have registered: the groups from a cache of up to
    /// [`GROUPS_TTL`], their targets from one of up to [`HEALTH_TTL`].
    pub async fn view(&self) -> Result<LoadBalancerView, DiscoverError> {
        let mut cached = self.cache.lock().await;
        let fresh =
            |at: Option<std::time::Instant>, ttl: Duration| at.is_some_and(|at| at.elapsed() < ttl);
        if !fresh(cached.groups_at, GROUPS_TTL) {
            cached.view.groups = self.discovery.target_groups().await?;
            cached.groups_at = Some(std::time::Instant::now());
            cached.health_at = None;
        }
        if !fresh(cached.health_at, HEALTH_TTL) {
            let groups = &cached.view.groups;
            cached.view.registered =
                futures::future::try_join_all(groups.iter().map(|g| self.discovery.registered(g)))
                    .await?
                    .into_iter()
                    .flatten()
                    .collect();
            cached.health_at = Some(std::time::Instant::now());
        }
        Ok(cached.view.clone())
    }
}

fn is_not_found(
    error: &aws_sdk_elasticloadbalancingv2::error::SdkError<
        aws_sdk_elasticloadbalancingv2::operation::describe_target_groups::DescribeTargetGroupsError,
    >,
) -> bool {
    error
        .as_service_error()
        .is_some_and(|e| e.is_target_group_not_found_exception())
}

fn elbv2_error<E: std::error::Error + 'static>(
    operation: &'static str,
    error: aws_sdk_elasticloadbalancingv2::error::SdkError<E>,
) -> DiscoverError {
    DiscoverError::Elbv2 {
        operation,
        message: DisplayErrorContext(error).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "elbv2.k8s.aws/v1beta1",
            "kind": "TargetGroupBinding",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_binding_names_its_group_and_target_type() {
        let binding = binding_of(&object(json!({
            "targetGroupARN": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/1",
            "targetType": "ip",
            "serviceRef": {"name": "web", "port": 80},
        })))
        .unwrap();
        assert_eq!(binding.namespace, "shop");
        assert_eq!(binding.name, "web");
        assert_eq!(binding.target_type, Some(TargetType::Ip));
        assert!(binding.target_group_arn.ends_with("targetgroup/web/1"));
        let untyped = binding_of(&object(json!({"targetGroupARN": "arn:x"}))).unwrap();
        assert_eq!(untyped.target_type, None);
    }

    #[test]
    fn an_unusable_binding_says_why() {
        assert!(
            binding_of(&object(json!({})))
                .unwrap_err()
                .contains("targetGroupARN")
        );
        assert!(
            binding_of(&object(
                json!({"targetGroupARN": "arn:x", "targetType": "lambda"})
            ))
            .unwrap_err()
            .contains("lambda")
        );
    }

    #[test]
    fn the_delay_is_the_attribute_or_aws_default() {
        assert_eq!(
            deregistration_delay([
                ("stickiness.enabled", "false"),
                (DEREGISTRATION_DELAY_ATTRIBUTE, "30")
            ]),
            Duration::from_secs(30)
        );
        assert_eq!(deregistration_delay([]), DEFAULT_DEREGISTRATION_DELAY);
        assert_eq!(
            deregistration_delay([(DEREGISTRATION_DELAY_ATTRIBUTE, "soon")]),
            DEFAULT_DEREGISTRATION_DELAY
        );
    }
}
