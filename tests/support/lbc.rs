//! The AWS Load Balancer Controller's part, played for the sandbox, which runs no such controller:
//! without it, a TargetGroupBinding's IP targets would stay as the fixture registered them while
//! the pods behind them move, and no drain test or benchmark could see what a real cluster sees.
//!
//! What it imitates (the controller's TargetGroupBinding reconciler, aws-load-balancer-controller
//! v2, `pkg/targetgroupbinding` and `pkg/backend/endpoint_resolver.go`):
//! - **IP mode** ([`Lbc::ip`]): the group's targets are kept equal to the Ready endpoints of the
//!   bound Service, read from its EndpointSlices (the controller's own input): an endpoint whose
//!   `conditions.ready` is true is registered on the binding's port; one that is not Ready, is
//!   terminating (`ready` is false for a terminating endpoint) or has left the slices is
//!   deregistered, and the load balancer then drains it for the group's deregistration delay. So a
//!   pod's IP is deregistered only once the pod has left the Ready endpoints, i.e. once it is
//!   terminating or fails its readiness: the controller does not know a drain is coming.
//! - **Instance mode, exclusion only** ([`Lbc::instance`]): an instance target of a node labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers` (any value) is deregistered. Which
//!   nodes are registered in the first place is left to the caller (the controller registers
//!   every suitable node on the Service's NodePort).
//! - **Timing**: the controller reconciles within about a second of an endpoint change on a quiet
//!   cluster (its work queue, then DescribeTargetHealth and Register/DeregisterTargets calls to
//!   AWS). [`Lbc::ip`] acts at once on each watch event (tens of milliseconds on the sandbox: tests
//!   need not wait); [`Lbc::ip_reacting_after`] acts a chosen time after the first event of a
//!   change, for a benchmark that measures the exposure that lag causes. Both also resync every
//!   [`RESYNC`]. Neither models how long the load balancer itself takes to stop routing to a
//!   target it reports `draining`. Readiness gates (`target-health.elbv2.k8s.aws/...`) are not imitated: a pod is not
//!   held un-Ready until its target is healthy.
//!
//! The controller owns its group: every target the imitation does not want is deregistered, so a
//! group it follows must not also be written to by anyone else (the same holds on AWS).
//!
//! Errors from the Kubernetes watches and from ELBv2 never end the task: they are recorded in
//! [`Activity::errors`] and the next event or resync tries again.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::error::DisplayErrorContext;
use elbv2::types::TargetDescription;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::controller::LB_LABEL;

/// How often the group is compared with the cluster without an event: a failed ELBv2 call is
/// retried this soon, and a target that was draining when its pod became Ready again (it can
/// only be registered once it has left the group) is registered within this.
pub const RESYNC: Duration = Duration::from_secs(1);

/// The label that names an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How many error messages [`Activity::errors`] keeps (the newest); [`Activity::error_count`]
/// counts them all.
const KEPT_ERRORS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum LbcError {
    #[error("ELBv2 {operation} on {group}: {message}")]
    Elbv2 {
        operation: &'static str,
        group: String,
        message: String,
    },
    #[error("watch of {what}: {source}")]
    Watch {
        what: String,
        #[source]
        source: watcher::Error,
    },
}

/// A TargetGroupBinding in IP mode: the Ready endpoints of `namespace/service` are the group's
/// targets, on `port` (the container port the Service's `targetPort` names).
#[derive(Debug, Clone)]
pub struct IpBinding {
    pub namespace: String,
    pub service: String,
    pub group_arn: String,
    pub port: i32,
}

/// A target group in instance mode whose targets on nodes labelled out of external load
/// balancers are deregistered; only nodes matching `node_selector` (a label selector) are
/// looked at, so a test never acts on another test's nodes.
#[derive(Debug, Clone)]
pub struct InstanceBinding {
    pub group_arn: String,
    pub node_selector: String,
}

/// What the imitation has done so far.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Comparisons of the group with the cluster that ended without an error.
    pub syncs: u64,
    /// Targets registered and deregistered, counted per target.
    pub registered: u64,
    pub deregistered: u64,
    /// The newest [`KEPT_ERRORS`] errors, oldest first.
    pub errors: Vec<String>,
    pub error_count: u64,
}

impl Activity {
    fn error(&mut self, error: &LbcError) {
        self.error_count += 1;
        if self.errors.len() == KEPT_ERRORS {
            self.errors.remove(0);
        }
        self.errors.push(error.to_string());
    }
}

/// One running imitation of the controller for one group; stops when dropped.
pub struct Lbc {
    task: JoinHandle<()>,
    activity: Arc<Mutex<Activity>>,
}

/// A target as the group keys it: an IP or instance id, and a port.
pub type Key = (String, i32);

/// What one comparison decided: targets to register and to deregister.
type Changes = (BTreeSet<Key>, BTreeSet<Key>);

impl Lbc {
    /// Follows an IP-mode binding (see the module documentation), acting at once.
    pub fn ip(client: kube::Client, elb: elbv2::Client, binding: IpBinding) -> Lbc {
        Lbc::ip_reacting_after(client, elb, binding, Duration::ZERO)
    }

    /// [`Lbc::ip`], acting `reaction` after the first watch event of a change, as the real
    /// controller does about a second later.
    pub fn ip_reacting_after(
        client: kube::Client,
        elb: elbv2::Client,
        binding: IpBinding,
        reaction: Duration,
    ) -> Lbc {
        let api: Api<EndpointSlice> = Api::namespaced(client, &binding.namespace);
        let config =
            watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", binding.service));
        let what = format!("{}/{} endpoints", binding.namespace, binding.service);
        let port = binding.port;
        Lbc::spawn(
            (api, config, what),
            (elb, binding.group_arn),
            reaction,
            move |slices, current| {
                let wanted: BTreeSet<Key> = ready_addresses(slices)
                    .into_iter()
                    .map(|ip| (ip, port))
                    .collect();
                (
                    wanted.difference(current).cloned().collect(),
                    current.difference(&wanted).cloned().collect(),
                )
            },
        )
    }

    /// Follows an instance-mode group's exclusion rule (see the module documentation).
    pub fn instance(client: kube::Client, elb: elbv2::Client, binding: InstanceBinding) -> Lbc {
        let api: Api<Node> = Api::all(client);
        let config = watcher::Config::default().labels(&binding.node_selector);
        let what = format!("nodes {}", binding.node_selector);
        Lbc::spawn(
            (api, config, what),
            (elb, binding.group_arn),
            Duration::ZERO,
            |nodes, current| {
                let excluded = excluded_instances(nodes);
                (
                    BTreeSet::new(),
                    current
                        .iter()
                        .filter(|(id, _)| excluded.contains(id))
                        .cloned()
                        .collect(),
                )
            },
        )
    }

    /// What it has done so far.
    pub fn activity(&self) -> Activity {
        lock(&self.activity).clone()
    }

    /// Follows `watched` (what to watch, and its name for errors and the task's span) and keeps
    /// `group` as `decide` says, `reaction` after a change.
    fn spawn<K>(
        watched: (Api<K>, watcher::Config, String),
        (elb, group): (elbv2::Client, String),
        reaction: Duration,
        decide: impl Fn(&[Arc<K>], &BTreeSet<Key>) -> Changes + Send + Sync + 'static,
    ) -> Lbc
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (api, config, what) = watched;
        let span = tracing::info_span!("lbc", watched = %what, group = %group);
        let activity = Arc::new(Mutex::new(Activity::default()));
        let shared = activity.clone();
        let task = tokio::spawn(
            async move {
                let (store, writer) = reflector::store();
                let mut stream = watcher(api, config)
                    .default_backoff()
                    .reflect(writer)
                    .boxed();
                let mut resync = tokio::time::interval(RESYNC);
                resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Nothing is decided on a partial list: an endpoint not yet listed would be
                // deregistered.
                let mut listed = false;
                // When the next comparison is due. The stream is polled meanwhile, so that the
                // comparison sees the latest state, and a burst of events waits `reaction` once.
                let mut due: Option<tokio::time::Instant> = None;
                loop {
                    let wait = async {
                        match due {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        next = stream.next() => {
                            match next {
                                Some(Ok(watcher::Event::InitDone)) => listed = true,
                                Some(Ok(_)) => {}
                                Some(Err(source)) => {
                                    // The watcher backs off and relists by itself.
                                    let error = LbcError::Watch { what: what.clone(), source };
                                    lock(&shared).error(&error);
                                    continue;
                                }
                                None => return,
                            }
                            let at = tokio::time::Instant::now() + reaction;
                            due = Some(due.map_or(at, |d| d.min(at)));
                            continue;
                        }
                        // A resync never brings a pending reaction forward.
                        _ = resync.tick() => {
                            due.get_or_insert_with(tokio::time::Instant::now);
                            continue;
                        }
                        _ = wait => {}
                    }
                    due = None;
                    if !listed {
                        continue;
                    }
                    match sync(&elb, &group, &store, &decide).await {
                        Ok((registered, deregistered)) => {
                            let mut activity = lock(&shared);
                            activity.syncs += 1;
                            activity.registered += registered as u64;
                            activity.deregistered += deregistered as u64;
                        }
                        Err(error) => lock(&shared).error(&error),
                    }
                }
            }
            .instrument(span),
        );
        Lbc { task, activity }
    }
}

impl Drop for Lbc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A poisoned lock only means a panic elsewhere; the counts are still worth reading.
fn lock(activity: &Mutex<Activity>) -> std::sync::MutexGuard<'_, Activity> {
    activity.lock().unwrap_or_else(|e| e.into_inner())
}

/// One comparison: reads the group's targets, registers and deregisters what `decide` says;
/// returns how many of each.
async fn sync<K>(
    elb: &elbv2::Client,
    group: &str,
    store: &Store<K>,
    decide: &impl Fn(&[Arc<K>], &BTreeSet<Key>) -> Changes,
) -> Result<(usize, usize), LbcError>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    // A draining target is on its way out: the controller neither counts it as registered nor
    // deregisters it again; a Ready pod whose IP still drains is registered anew.
    let current: BTreeSet<Key> = target_health(elb, group)
        .await?
        .into_iter()
        .filter(|t| t.state != "draining")
        .map(|t| (t.id, t.port))
        .collect();
    let (register, deregister) = decide(&store.state(), &current);
    let descriptions = |keys: &BTreeSet<Key>| -> Vec<TargetDescription> {
        keys.iter()
            .map(|(id, port)| TargetDescription::builder().id(id).port(*port).build())
            .collect()
    };
    if !register.is_empty() {
        elb.register_targets()
            .target_group_arn(group)
            .set_targets(Some(descriptions(&register)))
            .send()
            .await
            .map_err(|e| elbv2_error("RegisterTargets", group, e))?;
    }
    if !deregister.is_empty() {
        elb.deregister_targets()
            .target_group_arn(group)
            .set_targets(Some(descriptions(&deregister)))
            .send()
            .await
            .map_err(|e| elbv2_error("DeregisterTargets", group, e))?;
    }
    Ok((register.len(), deregister.len()))
}

/// One row of DescribeTargetHealth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHealth {
    pub id: String,
    pub port: i32,
    /// The API's spelling (`initial`, `healthy`, `draining`, ...); empty when the answer had
    /// none.
    pub state: String,
}

/// Every target `group` lists, with its state. Rows without an id or port are left out: a
/// target is addressed by both.
pub async fn target_health(
    elb: &elbv2::Client,
    group: &str,
) -> Result<Vec<TargetHealth>, LbcError> {
    let out = elb
        .describe_target_health()
        .target_group_arn(group)
        .send()
        .await
        .map_err(|e| elbv2_error("DescribeTargetHealth", group, e))?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let target = d.target()?;
            Some(TargetHealth {
                id: target.id()?.to_string(),
                port: target.port()?,
                state: d
                    .target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            })
        })
        .collect())
}

fn elbv2_error<E: std::error::Error + 'static>(
    operation: &'static str,
    group: &str,
    error: elbv2::error::SdkError<E>,
) -> LbcError {
    LbcError::Elbv2 {
        operation,
        group: group.to_string(),
        message: DisplayErrorContext(error).to_string(),
    }
}

/// The addresses of Ready endpoints. The controller takes `ready: true` only (a nil `ready`,
/// which the API says to read as true, is not written by the EndpointSlice controller for pods);
/// a terminating endpoint is never Ready. IPv4 slices only: the sandbox's pods have no IPv6.
pub fn ready_addresses(slices: &[Arc<EndpointSlice>]) -> BTreeSet<String> {
    slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| {
            e.conditions
                .as_ref()
                .is_some_and(|c| c.ready == Some(true) && c.terminating != Some(true))
        })
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// The instance ids (from `spec.providerID`, `aws:///<zone>/<instance-id>`) of nodes labelled out
/// of external load balancers.
pub fn excluded_instances(nodes: &[Arc<Node>]) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LB_LABEL))
        })
        .filter_map(|n| n.spec.as_ref()?.provider_id.as_deref()?.rsplit('/').next())
        .filter(|id| id.starts_with("i-"))
        .map(str::to_string)
        .collect()
}

/// The TargetGroupBindings of `namespace`.
pub fn bindings(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding"),
            "targetgroupbindings",
        ),
    )
}

/// Creates the TargetGroupBinding `name` in `namespace` that binds Service `service` (its port
/// `port`) to the IP-mode group `group_arn`, as the controller's users write one.
pub async fn create_ip_binding(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    group_arn: &str,
    service: &str,
    port: i32,
) -> Result<DynamicObject, kube::Error> {
    let binding: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "elbv2.k8s.aws/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": name},
        "spec": {
            "targetGroupARN": group_arn,
            "targetType": "ip",
            "serviceRef": {"name": service, "port": port},
        },
    }))
    .map_err(kube::Error::SerdeError)?;
    bindings(client, namespace)
        .create(&PostParams::default(), &binding)
        .await
}

/// Installs the TargetGroupBinding CRD the sandbox ships, unless it is there.
pub async fn ensure_binding_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "targetgroupbindings.elbv2.k8s.aws";
    if crds.get_opt(name).await.expect("get crd").is_none() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sandbox/crds/targetgroupbindings.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the CRD manifest");
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("CRD yaml");
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create the TargetGroupBinding CRD: {e}"),
        }
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watch the CRD");
}
