//! Connects integration tests to the running sandbox (`sandbox/sandbox up`).
//!
//! Every test gets its own namespace and its own KWOK nodes, each backed by an EC2 instance in
//! moto, so tests run in parallel without seeing each other's pods. Test nodes carry a taint that
//! only the test's own pods tolerate: fixture workloads and DaemonSets stay off them.
#![allow(dead_code)]

pub mod json_schema;

pub mod bench;

pub mod cgroup;

pub mod aws;

pub mod chart;

pub mod drain;

pub mod controller;

pub mod lb;

pub mod lbc;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Client, Config};
use serde_json::json;

/// Label and taint key that mark a test's nodes; the value is the test id.
pub const TEST_KEY: &str = "sandbox.nodedrain.io/test";
/// Label of every benchmark node. The controllers the tests start leave such nodes alone
/// (`--node-selector !sandbox.nodedrain.io/bench`): on the shared sandbox a test run beside a
/// benchmark would otherwise resume the benchmark's drains from their records.
pub const BENCH_NODE_LABEL: &str = "sandbox.nodedrain.io/bench";

pub struct Sandbox {
    pub client: Client,
    pub aws: aws_config::SdkConfig,
    pub queue_url: String,
    pub kubeconfig: PathBuf,
}

pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sandbox's environment file (`sandbox/sandbox env`), read once.
fn sandbox_env() -> &'static BTreeMap<String, String> {
    static ENV: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let state = std::env::var_os("NODEDRAIN_SANDBOX_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".sandbox"));
        let path = state.join("env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the sandbox is not up ({}: {e}); start it with `sandbox/sandbox up`",
                path.display()
            )
        });
        text.lines()
            .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect()
    })
}

/// A sandbox setting: the process environment wins (`eval "$(sandbox/sandbox env)"`), else the
/// sandbox's environment file, so `cargo test` works right after `sandbox/sandbox up`.
pub fn var(key: &str) -> String {
    std::env::var(key).ok().unwrap_or_else(|| {
        sandbox_env()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} is not set by the sandbox"))
    })
}

impl Sandbox {
    pub async fn connect() -> Sandbox {
        let kubeconfig = PathBuf::from(var("KUBECONFIG"));
        let raw =
            kube::config::Kubeconfig::read_from(&kubeconfig).expect("read sandbox kubeconfig");
        let mut config = Config::from_custom_kubeconfig(raw, &Default::default())
            .await
            .expect("sandbox kubeconfig is usable");
        // kube retries 429 by itself (up to 15 times, minutes in all); a PDB refusal is an
        // answer the tests need to see.
        config.default_retry = false;
        let client = Client::try_from(config).expect("kube client");
        let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(var("AWS_ENDPOINT_URL"))
            .region(aws_config::Region::new(var("AWS_REGION")))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                var("AWS_ACCESS_KEY_ID"),
                var("AWS_SECRET_ACCESS_KEY"),
                None,
                None,
                "sandbox",
            ))
            .load()
            .await;
        Sandbox {
            client,
            aws,
            queue_url: var("NODEDRAIN_QUEUE_URL"),
            kubeconfig,
        }
    }

    /// A fresh namespace and test id for one test.
    pub async fn scope(&self, name: &str) -> Scope {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}-{}",
            name,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": id, "labels": {TEST_KEY: "true"}}}),
                )
                .unwrap(),
            )
            .await
            .expect("create test namespace");
        // Pods cannot be created until the namespace's default ServiceAccount exists.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &id);
        for _ in 0..100 {
            if sa.get_opt("default").await.ok().flatten().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Scope {
            id,
            client: self.client.clone(),
            aws: self.aws.clone(),
        }
    }
}

/// One test's namespace and nodes.
pub struct Scope {
    pub id: String,
    pub client: Client,
    pub aws: aws_config::SdkConfig,
}

impl Scope {
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.id)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.id)
    }

    /// Launches `count` spot instances in moto and registers a KWOK node for each, named by the
    /// instance's private DNS name like EKS nodes; waits until they are Ready.
    pub async fn nodes(&self, count: usize) -> Vec<Node> {
        let ec2 = aws_sdk_ec2::Client::new(&self.aws);
        let image = moto_image(&ec2).await;
        let run = ec2
            .run_instances()
            .image_id(image)
            .min_count(count as i32)
            .max_count(count as i32)
            .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
            .instance_market_options(
                aws_sdk_ec2::types::InstanceMarketOptionsRequest::builder()
                    .market_type(aws_sdk_ec2::types::MarketType::Spot)
                    .build(),
            )
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(TEST_KEY)
                            .value(&self.id)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("run instances in moto");
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut created = Vec::new();
        for instance in run.instances() {
            let zone = instance
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or("us-east-1a");
            let name = instance
                .private_dns_name()
                .expect("private dns name")
                .to_string();
            let node: Node = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "topology.kubernetes.io/zone": zone,
                        "karpenter.sh/capacity-type": "spot",
                        "type": "kwok",
                        TEST_KEY: self.id,
                    },
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                },
                "spec": {
                    "providerID": format!("aws:///{zone}/{}", instance.instance_id().unwrap_or_default()),
                    "taints": [{"key": TEST_KEY, "value": self.id, "effect": "NoSchedule"}],
                },
                "status": {
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                },
            }))
            .unwrap();
            created.push(
                nodes
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create node"),
            );
        }
        for node in &created {
            let name = node.metadata.name.clone().unwrap();
            wait_for(&nodes, &name, Duration::from_secs(60), is_node_ready()).await;
        }
        created
    }

    /// A pod template spec that runs only on this scope's nodes.
    pub fn pod_spec(&self, grace_seconds: i64) -> serde_json::Value {
        json!({
            "nodeSelector": {TEST_KEY: self.id},
            "tolerations": [{"key": TEST_KEY, "operator": "Equal", "value": self.id, "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": grace_seconds,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        })
    }

    /// Deletes the scope's nodes and namespace; the sandbox itself stays up.
    pub async fn cleanup(self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let _ = nodes
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&format!("{TEST_KEY}={}", self.id)),
            )
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.id, &DeleteParams::default()).await;
    }
}

/// An image id moto serves, for RunInstances.
pub async fn moto_image(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("describe images")
        .images
        .and_then(|i| i.into_iter().next())
        .and_then(|i| i.image_id)
        .expect("moto has an image")
}

pub fn is_node_ready() -> impl Condition<Node> {
    |node: Option<&Node>| {
        node.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }
}

pub fn is_pod_ready() -> impl Condition<Pod> {
    |pod: Option<&Pod>| {
        pod.and_then(|p| p.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }
}

/// Waits (with a watch, not polling) until `name` satisfies `condition`; panics with the object's
/// last state after `timeout`.
pub async fn wait_for<K, C>(api: &Api<K>, name: &str, timeout: Duration, condition: C) -> Option<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    C: Condition<K>,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(object)) => object,
        Ok(Err(e)) => panic!("watching {name}: {e}"),
        Err(_) => panic!(
            "{name} did not reach the expected state within {timeout:?}; last seen: {:#?}",
            api.get_opt(name).await
        ),
    }
}

/// Waits until `count` pods matching `selector` are Ready and returns them.
pub async fn ready_pods(
    api: &Api<Pod>,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Pod> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pods = api
            .list(&ListParams::default().labels(selector))
            .await
            .expect("list pods");
        let ready: Vec<Pod> = pods
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none() && is_pod_ready().matches_object(Some(p))
            })
            .collect();
        if ready.len() >= count {
            return ready;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "only {} of {count} pods `{selector}` Ready after {timeout:?}",
                ready.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
