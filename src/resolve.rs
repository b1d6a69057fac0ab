//! Instance id → Node name.
//!
//! The hot path asks no one: a node watch keeps an index of `spec.providerID`
//! (`aws:///<az>/<instance-id>`), so resolving a burst of 200 interruptions is 200 map lookups.
//! EC2 `DescribeInstances` is asked only for instances the index does not know (nodes registered
//! without a providerID are matched by the instance's private DNS name, the default node name on
//! EKS) and, when a managed tag is configured, once per instance to read its tags (cached).
//!
//! The index itself ([`NodeIndex`]) is pure: it folds watcher events, so it is tested without a
//! cluster.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::Filter;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::Readiness;
use crate::interruption::events::instance_id_from_provider_id;
use crate::metrics::{Metrics, ResolveOutcome};

/// The readiness component the node watch marks once its first list is complete.
pub const READINESS_COMPONENT: &str = "node-watch";
/// How long an instance's managed-tag verdict is trusted. Tags on a running instance almost never
/// change; ten minutes bounds the damage of one that does, at one EC2 call per instance per ten
/// minutes at most.
const TAG_CACHE_TTL: Duration = Duration::from_secs(600);
/// Bound on cached verdicts (an instance id and a bool each), well above any cluster's node count.
const TAG_CACHE_MAX: usize = 50_000;
/// Instance ids per DescribeInstances call: EC2 accepts up to 200 values in one filter.
const EC2_IDS_PER_CALL: usize = 100;
/// Annotation kubectl writes on `kubectl apply`; a whole copy of the object, useless here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Where an interruption's instance lives in this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The Node's name.
    Node(String),
    /// No node of this cluster is this instance.
    NotFound,
    /// The instance lacks the managed tag: not ours to touch.
    NotManaged,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The node watch has not completed its first list; a miss would be meaningless.
    #[error("the node list is not loaded yet")]
    NotReady,
    #[error("EC2 DescribeInstances failed: {0}")]
    Ec2(String),
}

// ---------------------------------------------------------------------------------------------
// Managed tag

/// An EC2 tag an instance must carry to be handled: `key` (any value) or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedTag {
    pub key: String,
    pub value: Option<String>,
}

impl ManagedTag {
    /// Parses `key` or `key=value` (EC2 limits: key 1-128 characters, value up to 256).
    pub fn parse(text: &str) -> Result<ManagedTag, String> {
        let (key, value) = match text.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (text.trim(), None),
        };
        if key.is_empty() {
            return Err("the tag key is empty; use `key` or `key=value`".into());
        }
        if key.chars().count() > 128 {
            return Err("the tag key is longer than EC2's 128 characters".into());
        }
        if value.is_some_and(|v| v.chars().count() > 256) {
            return Err("the tag value is longer than EC2's 256 characters".into());
        }
        Ok(ManagedTag {
            key: key.to_string(),
            value: value.map(str::to_string),
        })
    }

    pub fn matches<'a>(&self, mut tags: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        tags.any(|(k, v)| k == self.key && self.value.as_deref().is_none_or(|want| want == v))
    }
}

// ---------------------------------------------------------------------------------------------
// The index (pure)

/// What the index remembers of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeKeys {
    /// From `spec.providerID`, when it names an EC2 instance.
    instance: Option<String>,
    /// Names EC2 may know the node by, for nodes without an instance in their providerID: the
    /// node name, `kubernetes.io/hostname`, and InternalDNS / Hostname / InternalIP addresses.
    addresses: Vec<String>,
}

impl NodeKeys {
    fn of(node: &Node) -> NodeKeys {
        let instance = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(instance_id_from_provider_id)
            .map(str::to_string);
        let mut addresses = Vec::new();
        if instance.is_none() {
            addresses.push(node.name_any());
            if let Some(h) = node.labels().get("kubernetes.io/hostname") {
                addresses.push(h.clone());
            }
            let status = node.status.as_ref().and_then(|s| s.addresses.as_ref());
            for a in status.into_iter().flatten() {
                if matches!(a.type_.as_str(), "InternalDNS" | "Hostname" | "InternalIP") {
                    addresses.push(a.address.clone());
                }
            }
            addresses.sort();
            addresses.dedup();
        }
        NodeKeys {
            instance,
            addresses,
        }
    }
}

/// Instance id and address → node name, folded from node watcher events.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: HashMap<String, NodeKeys>,
    by_instance: HashMap<String, String>,
    by_address: HashMap<String, String>,
    /// During a (re-)list: the nodes seen so far, swapped in at `InitDone`, so a relist never
    /// shows a half-empty index.
    relist: Option<HashMap<String, NodeKeys>>,
    listed: bool,
}

impl NodeIndex {
    pub fn apply(&mut self, event: &watcher::Event<Node>) {
        match event {
            watcher::Event::Apply(node) => self.upsert(node.name_any(), NodeKeys::of(node)),
            watcher::Event::Delete(node) => self.remove(&node.name_any()),
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(node) => {
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(node.name_any(), NodeKeys::of(node));
            }
            watcher::Event::InitDone => {
                let nodes = self.relist.take().unwrap_or_default();
                *self = NodeIndex {
                    listed: true,
                    ..NodeIndex::default()
                };
                for (name, keys) in nodes {
                    self.upsert(name, keys);
                }
            }
        }
    }

    /// True once a complete list has been folded in.
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// Number of nodes indexed.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node whose providerID names `instance_id`.
    pub fn by_instance(&self, instance_id: &str) -> Option<&str> {
        self.by_instance.get(instance_id).map(String::as_str)
    }

    /// The providerID-less node known by this DNS name, hostname or IP.
    pub fn by_address(&self, address: &str) -> Option<&str> {
        self.by_address.get(address).map(String::as_str)
    }

    fn upsert(&mut self, name: String, keys: NodeKeys) {
        if self.nodes.get(&name) == Some(&keys) {
            return;
        }
        self.remove(&name);
        if let Some(i) = &keys.instance {
            self.by_instance.insert(i.clone(), name.clone());
        }
        for a in &keys.addresses {
            self.by_address.insert(a.clone(), name.clone());
        }
        self.nodes.insert(name, keys);
    }

    fn remove(&mut self, name: &str) {
        let Some(old) = self.nodes.remove(name) else {
            return;
        };
        // Only drop a mapping that still points at this node: another node may have claimed the
        // same key since (a re-registered instance under a new name).
        if let Some(i) = old.instance
            && self.by_instance.get(&i).is_some_and(|n| n == name)
        {
            self.by_instance.remove(&i);
        }
        for a in old.addresses {
            if self.by_address.get(&a).is_some_and(|n| n == name) {
                self.by_address.remove(&a);
            }
        }
    }
}

/// What EC2 says about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceInfo {
    pub private_dns_name: Option<String>,
    pub private_ip: Option<String>,
    pub tags: Vec<(String, String)>,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    pub state: Option<String>,
}

impl InstanceInfo {
    fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The pure decision for one instance, given the index and (when asked) EC2's answer.
/// `ec2` is `None` when EC2 was not asked, `Some(None)` when EC2 does not know the instance.
fn conclude(
    index: &NodeIndex,
    instance_id: &str,
    ec2: Option<Option<&InstanceInfo>>,
    managed: Option<&ManagedTag>,
    cached_managed: Option<bool>,
) -> (Resolution, ResolveOutcome) {
    let info = ec2.flatten();
    // The filter first: an instance without the tag is not ours, whatever node it is.
    if let Some(tag) = managed {
        let is_managed = cached_managed.or_else(|| info.map(|i| tag.matches(i.tags())));
        if is_managed != Some(true) {
            // Unknown to EC2 and to the index: nothing to protect, say NotFound; otherwise we
            // cannot prove it is managed, so it is not.
            return if is_managed.is_none() && index.by_instance(instance_id).is_none() {
                (Resolution::NotFound, ResolveOutcome::NotFound)
            } else {
                (Resolution::NotManaged, ResolveOutcome::NotManaged)
            };
        }
    }
    if let Some(name) = index.by_instance(instance_id) {
        return (Resolution::Node(name.to_string()), ResolveOutcome::Index);
    }
    let fallback = info.and_then(|i| {
        let dns = i.private_dns_name.as_deref().filter(|d| !d.is_empty());
        dns.and_then(|d| {
            index
                .by_address(d)
                // Clusters that name nodes by the short hostname (`ip-10-0-0-1`).
                .or_else(|| {
                    d.split('.')
                        .next()
                        .and_then(|short| index.by_address(short))
                })
        })
        .or_else(|| i.private_ip.as_deref().and_then(|ip| index.by_address(ip)))
    });
    match fallback {
        Some(name) => (
            Resolution::Node(name.to_string()),
            ResolveOutcome::Ec2Fallback,
        ),
        None => (Resolution::NotFound, ResolveOutcome::NotFound),
    }
}

// ---------------------------------------------------------------------------------------------
// The node watch

/// Nodes per page of the node watch's list. Each page is decoded whole, untrimmed, and the
/// allocator keeps that high-water mark in every thread's arena: at 5,000 nodes, pages of 500
/// (kube's default) left the controller at 70-72 MiB resident at rest, pages of 100 at 51-53 MiB,
/// for the same time to ready (measured side by side, docs/performance.md).
const NODE_LIST_PAGE_SIZE: u32 = 100;

/// The cluster's nodes, kept current by one watch: a reflector store (objects, for whoever needs
/// them: resume, node state) and the instance index.
#[derive(Clone)]
pub struct NodeWatch {
    store: Store<Node>,
    index: Arc<RwLock<NodeIndex>>,
    ready: watch::Receiver<bool>,
}

impl NodeWatch {
    /// Starts nothing: returns the handle and the future that runs the watch until `cancel`.
    /// Spawn the future. `readiness` gets [`READINESS_COMPONENT`] marked after the first list.
    ///
    /// Objects in the store are trimmed to what the controller reads: metadata without
    /// `managedFields` and the last-applied annotation, the spec, and `status.addresses` (see
    /// `trim`).
    pub fn new(
        api: Api<Node>,
        readiness: Option<Readiness>,
        cancel: CancellationToken,
    ) -> (NodeWatch, impl Future<Output = ()> + Send + 'static) {
        NodeWatch::with_selector(api, None, readiness, cancel)
    }

    /// [`NodeWatch::new`] for only the nodes matching `label_selector` (kubectl syntax): the
    /// others are neither indexed nor kept.
    pub fn with_selector(
        api: Api<Node>,
        label_selector: Option<String>,
        readiness: Option<Readiness>,
        cancel: CancellationToken,
    ) -> (NodeWatch, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let index = Arc::new(RwLock::new(NodeIndex::default()));
        let (ready_tx, ready) = watch::channel(false);
        if let Some(r) = &readiness {
            r.set(READINESS_COMPONENT, false);
        }
        let watch = NodeWatch {
            store,
            index: index.clone(),
            ready,
        };
        let run = async move {
            let mut config = watcher::Config::default().page_size(NODE_LIST_PAGE_SIZE);
            if let Some(selector) = &label_selector {
                config = config.labels(selector);
            }
            let stream = watcher(api, config)
                .default_backoff()
                .modify(trim)
                .reflect(writer);
            futures::pin_mut!(stream);
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => break,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(event)) => {
                        let listed = {
                            let mut index = write(&index);
                            let before = index.is_listed();
                            index.apply(&event);
                            (!before && index.is_listed()).then(|| index.len())
                        };
                        if let Some(nodes) = listed {
                            info!(nodes, "node list loaded");
                            ready_tx.send_replace(true);
                            if let Some(r) = &readiness {
                                r.set(READINESS_COMPONENT, true);
                            }
                        }
                    }
                    // The backoff already waited; the watcher relists by itself.
                    Some(Err(e)) => warn!(error = %e, "node watch failed; retrying"),
                    None => break,
                }
            }
        };
        (watch, run)
    }

    /// Nodes as last seen (trimmed, see [`NodeWatch::new`]).
    pub fn store(&self) -> &Store<Node> {
        &self.store
    }

    /// True once the first complete list has been loaded.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for the first complete list; returns false if the watch stopped before.
    pub async fn wait_ready(&self) -> bool {
        let mut ready = self.ready.clone();
        ready.wait_for(|r| *r).await.is_ok()
    }

    /// The node whose providerID names this instance, from the index alone.
    pub fn node_for_instance(&self, instance_id: &str) -> Option<String> {
        read(&self.index)
            .by_instance(instance_id)
            .map(str::to_string)
    }
}

/// Keeps what the controller reads (labels, annotations, spec, addresses). Conditions, capacity,
/// node info, images and managed fields are most of a node and, at 5,000 nodes, most of the
/// controller's memory.
fn trim(node: &mut Node) {
    node.meta_mut().managed_fields = None;
    node.annotations_mut().remove(LAST_APPLIED);
    if let Some(status) = node.status.take() {
        node.status = Some(NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }
}

fn read(index: &RwLock<NodeIndex>) -> std::sync::RwLockReadGuard<'_, NodeIndex> {
    // Index updates are a sequence of map operations that each leave it usable; a poisoned lock
    // still holds a usable index.
    index.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(index: &RwLock<NodeIndex>) -> std::sync::RwLockWriteGuard<'_, NodeIndex> {
    index.write().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// The resolver

/// Resolves instance ids to nodes. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    watch: NodeWatch,
    ec2: aws_sdk_ec2::Client,
    managed: Option<ManagedTag>,
    tag_cache: Arc<Mutex<HashMap<String, (bool, Instant)>>>,
    metrics: Metrics,
}

impl Resolver {
    pub fn new(
        watch: NodeWatch,
        ec2: aws_sdk_ec2::Client,
        managed: Option<ManagedTag>,
        metrics: Metrics,
    ) -> Resolver {
        Resolver {
            watch,
            ec2,
            managed,
            tag_cache: Arc::default(),
            metrics,
        }
    }

    /// Resolves a batch, in order. One DescribeInstances call (per 100 ids) covers every id that
    /// needs EC2; ids the index answers do not wait for EC2 to fail. An EC2 failure is an error
    /// for exactly the ids that needed EC2; the caller retries those.
    pub async fn resolve(&self, instance_ids: &[&str]) -> Vec<Result<Resolution, ResolveError>> {
        if !self.watch.is_ready() {
            return instance_ids
                .iter()
                .map(|_| Err(ResolveError::NotReady))
                .collect();
        }
        let now = Instant::now();
        let cached: Vec<Option<bool>> = instance_ids
            .iter()
            .map(|id| self.cached_verdict(id, now))
            .collect();
        let need_ec2: Vec<&str> = {
            let index = read(&self.watch.index);
            instance_ids
                .iter()
                .zip(&cached)
                .filter(|(id, cached)| {
                    let tag_unknown = self.managed.is_some() && cached.is_none();
                    tag_unknown || index.by_instance(id).is_none()
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let ec2 = if need_ec2.is_empty() {
            Ok(HashMap::new())
        } else {
            self.describe(&need_ec2).await
        };
        let index = read(&self.watch.index);
        let mut out = Vec::with_capacity(instance_ids.len());
        for (id, cached) in instance_ids.iter().zip(cached) {
            let asked = need_ec2.contains(id);
            let answer = match (&ec2, asked) {
                (_, false) => None,
                (Ok(found), true) => Some(found.get(*id)),
                (Err(e), true) => {
                    self.metrics.resolution(ResolveOutcome::Error);
                    out.push(Err(e.clone()));
                    continue;
                }
            };
            if let (Some(tag), Some(Some(info))) = (&self.managed, answer) {
                self.remember_verdict(id, tag.matches(info.tags()), now);
            }
            let (resolution, outcome) = conclude(&index, id, answer, self.managed.as_ref(), cached);
            self.metrics.resolution(outcome);
            debug!(
                instance_id = id,
                ?resolution,
                via = outcome.as_label(),
                "resolved"
            );
            out.push(Ok(resolution));
        }
        out
    }

    /// Resolves one instance id.
    pub async fn resolve_one(&self, instance_id: &str) -> Result<Resolution, ResolveError> {
        self.resolve(&[instance_id])
            .await
            .pop()
            .unwrap_or(Err(ResolveError::NotReady))
    }

    fn cached_verdict(&self, instance_id: &str, now: Instant) -> Option<bool> {
        self.managed.as_ref()?;
        let cache = self
            .tag_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache
            .get(instance_id)
            .filter(|(_, at)| now.saturating_duration_since(*at) < TAG_CACHE_TTL)
            .map(|(managed, _)| *managed)
    }

    fn remember_verdict(&self, instance_id: &str, managed: bool, now: Instant) {
        let mut cache = self
            .tag_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= TAG_CACHE_MAX {
            cache.retain(|_, (_, at)| now.saturating_duration_since(*at) < TAG_CACHE_TTL);
            if cache.len() >= TAG_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(instance_id.to_string(), (managed, now));
    }

    /// EC2's state name of each instance in `ids` that DescribeInstances still lists; EC2 stops
    /// listing a terminated instance about an hour after it ended, so a missing id is gone too.
    pub async fn instance_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, Option<String>>, ResolveError> {
        Ok(self
            .describe(ids)
            .await?
            .into_iter()
            .map(|(id, info)| (id, info.state))
            .collect())
    }

    /// DescribeInstances by an `instance-id` filter rather than `InstanceIds`: with ids, one
    /// unknown id fails the whole call (InvalidInstanceID.NotFound); a filter just omits it.
    async fn describe(&self, ids: &[&str]) -> Result<HashMap<String, InstanceInfo>, ResolveError> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(EC2_IDS_PER_CALL) {
            let filter = Filter::builder()
                .name("instance-id")
                .set_values(Some(chunk.iter().map(|s| s.to_string()).collect()))
                .build();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .ec2
                    .describe_instances()
                    .filters(filter.clone())
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| ResolveError::Ec2(DisplayErrorContext(e).to_string()))?;
                for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = instance.instance_id() else {
                        continue;
                    };
                    found.insert(
                        id.to_string(),
                        InstanceInfo {
                            private_dns_name: instance.private_dns_name().map(str::to_string),
                            private_ip: instance.private_ip_address().map(str::to_string),
                            tags: instance
                                .tags()
                                .iter()
                                .filter_map(|t| {
                                    Some((t.key()?.to_string(), t.value()?.to_string()))
                                })
                                .collect(),
                            state: instance
                                .state()
                                .and_then(|s| s.name())
                                .map(|n| n.as_str().to_string()),
                        },
                    );
                }
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => break,
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, provider_id: Option<&str>, addresses: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"providerID": provider_id},
            "status": {"addresses": addresses},
        }))
        .unwrap()
    }

    const I1: &str = "i-0123456789abcdef0";
    const I2: &str = "i-0fedcba9876543210";

    fn pid(i: &str) -> String {
        format!("aws:///us-east-1a/{i}")
    }

    #[test]
    fn index_follows_applies_and_deletes() {
        let mut index = NodeIndex::default();
        let a = node("a", Some(&pid(I1)), &[]);
        index.apply(&watcher::Event::Apply(a.clone()));
        assert_eq!(index.by_instance(I1), Some("a"));
        // A node whose providerID changes (set late by the cloud controller) moves.
        index.apply(&watcher::Event::Apply(node("a", Some(&pid(I2)), &[])));
        assert_eq!(index.by_instance(I1), None);
        assert_eq!(index.by_instance(I2), Some("a"));
        index.apply(&watcher::Event::Delete(a));
        assert_eq!(index.by_instance(I2), None);
        assert!(index.is_empty());
    }

    #[test]
    fn nodes_without_provider_id_are_found_by_address() {
        let mut index = NodeIndex::default();
        let n = node(
            "ip-10-0-0-1.ec2.internal",
            None,
            &[
                ("InternalIP", "10.0.0.1"),
                ("InternalDNS", "ip-10-0-0-1.ec2.internal"),
            ],
        );
        index.apply(&watcher::Event::Apply(n));
        // A non-AWS providerID counts as none.
        index.apply(&watcher::Event::Apply(node(
            "fargate",
            Some("aws:///us-east-1a/fargate-ip-10-0-0-9.ec2.internal"),
            &[],
        )));
        assert_eq!(
            index.by_address("10.0.0.1"),
            Some("ip-10-0-0-1.ec2.internal")
        );
        assert_eq!(index.by_address("fargate"), Some("fargate"));
        // Nodes with an instance in their providerID are not indexed by address.
        index.apply(&watcher::Event::Apply(node(
            "b",
            Some(&pid(I1)),
            &[("InternalIP", "10.0.0.2")],
        )));
        assert_eq!(index.by_address("10.0.0.2"), None);
    }

    #[test]
    fn relist_swaps_atomically_and_marks_listed() {
        let mut index = NodeIndex::default();
        assert!(!index.is_listed());
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(node("a", Some(&pid(I1)), &[])));
        assert_eq!(index.by_instance(I1), None, "not visible before InitDone");
        index.apply(&watcher::Event::InitDone);
        assert!(index.is_listed());
        assert_eq!(index.by_instance(I1), Some("a"));
        // A relist that no longer has `a` drops it, but only at InitDone.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(node("b", Some(&pid(I2)), &[])));
        assert_eq!(index.by_instance(I1), Some("a"));
        index.apply(&watcher::Event::InitDone);
        assert_eq!(index.by_instance(I1), None);
        assert_eq!(index.by_instance(I2), Some("b"));
        assert_eq!(index.len(), 1);
        assert!(index.is_listed());
    }

    #[test]
    fn deleting_an_old_node_keeps_a_newer_claim_on_its_instance() {
        let mut index = NodeIndex::default();
        let old = node("old", Some(&pid(I1)), &[]);
        index.apply(&watcher::Event::Apply(old.clone()));
        index.apply(&watcher::Event::Apply(node("new", Some(&pid(I1)), &[])));
        index.apply(&watcher::Event::Delete(old));
        assert_eq!(index.by_instance(I1), Some("new"));
    }

    fn info(dns: &str, tags: &[(&str, &str)]) -> InstanceInfo {
        InstanceInfo {
            private_dns_name: Some(dns.into()),
            private_ip: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: Some("running".into()),
        }
    }

    #[test]
    fn conclusions() {
        let mut index = NodeIndex::default();
        index.apply(&watcher::Event::Apply(node("a", Some(&pid(I1)), &[])));
        index.apply(&watcher::Event::Apply(node("ip-10-0-0-7", None, &[])));
        let tag = ManagedTag::parse("team=platform").unwrap();
        let ours = info("x", &[("team", "platform")]);
        let theirs = info("x", &[("team", "data")]);
        let short = info("ip-10-0-0-7.ec2.internal", &[]);
        let node_a = Resolution::Node("a".into());

        // Hot path: index hit, EC2 not asked.
        assert_eq!(conclude(&index, I1, None, None, None).0, node_a);
        // Fallback by private DNS name (here its short form).
        assert_eq!(
            conclude(&index, I2, Some(Some(&short)), None, None),
            (
                Resolution::Node("ip-10-0-0-7".into()),
                ResolveOutcome::Ec2Fallback
            )
        );
        assert_eq!(
            conclude(&index, I2, Some(None), None, None).0,
            Resolution::NotFound
        );
        // Managed tag: checked first, from EC2 or from the cache.
        assert_eq!(
            conclude(&index, I1, Some(Some(&ours)), Some(&tag), None).0,
            node_a
        );
        assert_eq!(
            conclude(&index, I1, Some(Some(&theirs)), Some(&tag), None).0,
            Resolution::NotManaged
        );
        assert_eq!(conclude(&index, I1, None, Some(&tag), Some(true)).0, node_a);
        assert_eq!(
            conclude(&index, I1, None, Some(&tag), Some(false)).0,
            Resolution::NotManaged
        );
        // Known node, unknown to EC2: cannot prove it is managed.
        assert_eq!(
            conclude(&index, I1, Some(None), Some(&tag), None).0,
            Resolution::NotManaged
        );
        assert_eq!(
            conclude(&index, I2, Some(None), Some(&tag), None).0,
            Resolution::NotFound
        );
    }

    #[test]
    fn managed_tags() {
        let any = ManagedTag::parse("nodedrain/managed").unwrap();
        assert_eq!(any.value, None);
        assert!(any.matches([("nodedrain/managed", "")].into_iter()));
        assert!(!any.matches([("other", "x")].into_iter()));
        let exact = ManagedTag::parse(" team = platform ").unwrap();
        assert_eq!(
            (exact.key.as_str(), exact.value.as_deref()),
            ("team", Some("platform"))
        );
        assert!(exact.matches([("team", "platform")].into_iter()));
        assert!(!exact.matches([("team", "data")].into_iter()));
        assert!(ManagedTag::parse("=v").is_err());
        assert!(ManagedTag::parse(&"k".repeat(129)).is_err());
    }
}
