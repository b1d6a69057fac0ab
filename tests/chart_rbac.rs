//! The chart's permissions, proven on the sandbox (RBAC on).
//!
//! Each run installs the chart into a namespace of its own, takes a TokenRequest token of the
//! chart's ServiceAccount, and runs the real `nodedrain controller` outside the cluster with a
//! kubeconfig holding only that token and exactly the environment of the chart's Deployment.
//! Then a spot interruption warning for a Karpenter node goes to a queue of the run's own in
//! moto, and the run checks what a drain must achieve: the node cordoned and tainted with its
//! record, every pod gone (a surged single-replica Deployment, a PDB-guarded Deployment, a pod
//! with the `delete` strategy), the replacements Ready on the other node, the NodeClaim deleted,
//! Events recorded; then a second interruption for the same node, whose repeated Events kube's
//! Recorder patches. The PDB-guarded pods are IP targets of an ELBv2 group in moto, bound by a
//! TargetGroupBinding as the AWS Load Balancer Controller would: the drain has to list the
//! cluster's bindings to know the group.
//!
//! With the chart's rules untouched everything must succeed without a single 403. Then every
//! rule, and every verb of every rule, is removed in turn (from the installed ClusterRole or
//! Role): each removal must make the run fail, either a check or a 403 for exactly what was
//! removed in the controller's log.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{Condition, await_condition};
use serde_json::{Value, json};
use support::aws::{create_queue, sdk_config, send};
use support::chart::{chart_dir, helm, ok, render, scratch_dir, value_args};
use support::controller::ensure_nodeclaim_crd;
use support::drain::instance_of;
use support::lbc::ensure_binding_crd;
use support::{Sandbox, Scope, TEST_KEY, is_pod_ready, var};

/// Grace period of every test pod: short, so a run takes seconds.
const GRACE: i64 = 1;
/// How long a run may take to drain the node. The full-permission run needs about 10 s; the
/// spot deadline (2 min after the warning, minus grace and the 10 s margin) is far enough that
/// a run missing the eviction permission cannot finish by overriding PDBs within this window.
const DRAIN_WINDOW: Duration = Duration::from_secs(45);
/// How long the second interruption may take to produce its repeated (patched) Event.
const REPEAT_WINDOW: Duration = Duration::from_secs(30);
/// Runs set up at a time (helm install, two KWOK nodes, a handful of pods each).
const PARALLEL_SETUPS: usize = 12;
/// How long the controllers may take to become Ready before the interruptions go out.
const SETTLE: Duration = Duration::from_secs(20);
/// Port of the test pods' IP targets.
const TARGET_PORT: i32 = 8080;
/// Deregistration delay of a run's target group. No load balancer forwards to the group, so its
/// targets are `unused` and no pod waits for them (the run is about permissions, not the wait);
/// short all the same, so that a drain that did wait would still fit in [`DRAIN_WINDOW`].
const TARGET_GROUP_DELAY: u64 = 5;

fn binding_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding"),
        "targetgroupbindings",
    )
}

fn nodeclaim_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"),
        "nodeclaims",
    )
}

/// Which rules the run's ServiceAccount lacks.
#[derive(Debug, Clone, PartialEq)]
enum Removal {
    Nothing,
    /// The whole rule `index` of the ClusterRole (`cluster`) or the Role.
    Rule {
        cluster: bool,
        index: usize,
    },
    /// One verb of that rule.
    Verb {
        cluster: bool,
        index: usize,
        verb: String,
    },
}

/// A removal, its label for the report, and the (verb, resource) pairs it takes away.
type Variant = (Removal, String, Vec<(String, String)>);

/// What a run achieved.
#[derive(Debug, Default, Clone)]
struct Checks {
    /// Cordoned, tainted `nodedrain.io/interruption`, drain record drained or handed over.
    node_prepared: bool,
    /// Every pod that was on the node is gone.
    pods_gone: bool,
    /// `web` (surge) restarted, its replacement Ready on the other node.
    surge_replaced: bool,
    /// `api` (PDB minAvailable 1) back to two Ready pods on the other node.
    api_replaced: bool,
    /// The node's Karpenter NodeClaim was deleted.
    claim_deleted: bool,
    /// DrainStarted and DrainSucceeded Events on the node.
    events: bool,
    /// After a second interruption, a repeated Event on the node (series count 2, a patch).
    repeated_event: bool,
    /// Other nodedrain controllers that published Events about the run's node: another process
    /// on the sandbox resumed this run's drain, so the run proves nothing.
    foreign: Vec<String>,
    /// The node's state as last seen, for failure messages.
    node_state: String,
}

impl Checks {
    fn drained(&self) -> bool {
        self.node_prepared
            && self.pods_gone
            && self.surge_replaced
            && self.api_replaced
            && self.claim_deleted
            && self.events
    }

    fn all(&self) -> bool {
        self.drained() && self.repeated_event
    }

    fn failed(&self) -> Vec<&'static str> {
        let mut failed = Vec::new();
        for (ok, name) in [
            (self.node_prepared, "node prepared"),
            (self.pods_gone, "pods gone"),
            (self.surge_replaced, "surge replacement Ready"),
            (self.api_replaced, "PDB-guarded replacements Ready"),
            (self.claim_deleted, "NodeClaim deleted"),
            (self.events, "Events recorded"),
            // Only tried once the first drain succeeded.
            (
                self.repeated_event || !self.drained(),
                "repeated Event patched",
            ),
        ] {
            if !ok {
                failed.push(name);
            }
        }
        failed
    }
}

struct Outcome {
    label: String,
    /// (verb, resource) pairs the removal took away.
    removed: Vec<(String, String)>,
    checks: Checks,
    /// Every `cannot <verb> resource "<resource>"` refusal in the controller's log.
    forbidden: Vec<(String, String)>,
    log: PathBuf,
    drain_seconds: Option<f64>,
    peak_rss_kib: Option<u64>,
}

impl Outcome {
    fn refused_what_was_removed(&self) -> Vec<&(String, String)> {
        self.removed
            .iter()
            .filter(|r| self.forbidden.contains(r))
            .collect()
    }
}

/// The `cannot VERB resource "RESOURCE"` refusals the apiserver sent, as the controller logged
/// them (JSON logs escape the quotes).
fn refusals(log: &str) -> Vec<(String, String)> {
    let log = log.replace("\\\"", "\"");
    let mut found = Vec::new();
    for piece in log.split("cannot ").skip(1) {
        let mut words = piece.splitn(3, ' ');
        let (Some(verb), Some("resource"), Some(rest)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(resource) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
            continue;
        };
        let pair = (verb.to_string(), resource.to_string());
        if !found.contains(&pair) {
            found.push(pair);
        }
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// GET over plain HTTP/1.0; the status code, or None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Until `node` has no taints but the scope's own (the node lifecycle controller removes
/// `node.kubernetes.io/not-ready` shortly after the node is Ready).
async fn wait_schedulable(client: &kube::Client, node: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let cond = |n: Option<&Node>| {
        n.and_then(|n| n.spec.as_ref())
            .is_some_and(|s| s.taints.iter().flatten().all(|t| t.key == TEST_KEY))
    };
    tokio::time::timeout(Duration::from_secs(60), await_condition(nodes, node, cond))
        .await
        .expect("node schedulable in time")
        .expect("watch node");
}

fn name_of(node: &Node) -> String {
    node.metadata.name.clone().expect("node name")
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

async fn deployment(scope: &Scope, name: &str, replicas: i32, annotations: Value) {
    let mut spec = scope.pod_spec(GRACE);
    spec["containers"][0]["name"] = json!(name);
    spec["containers"][0]["ports"] = json!([{"containerPort": TARGET_PORT}]);
    let object: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}, "annotations": annotations}, "spec": spec},
        }
    }))
    .unwrap();
    scope
        .api::<Deployment>()
        .create(&PostParams::default(), &object)
        .await
        .expect("create deployment");
}

fn spot_warning(instance: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/events/spot-interruption-warning.json"
    );
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["id"] = json!(format!("rbac-spot-{instance}"));
    v["time"] = json!(
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    );
    v["detail"]["instance-id"] = json!(instance);
    v["resources"] = json!([format!(
        "arn:aws:ec2:us-east-1:123456789012:instance/{instance}"
    )]);
    v.to_string()
}

/// The EC2 state change that follows a spot warning two minutes later.
fn shutting_down(instance: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/events/state-change-stopping.json"
    );
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["id"] = json!(format!("rbac-state-{instance}"));
    v["time"] = json!(
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    );
    v["detail"]["instance-id"] = json!(instance);
    v["detail"]["state"] = json!("shutting-down");
    v["resources"] = json!([format!(
        "arn:aws:ec2:us-east-1:123456789012:instance/{instance}"
    )]);
    v.to_string()
}

/// A kubeconfig for the sandbox's apiserver that authenticates with `token` only.
fn token_kubeconfig(dir: &Path, token: &str, namespace: &str) -> PathBuf {
    let text = std::fs::read_to_string(var("KUBECONFIG")).expect("sandbox kubeconfig");
    let sandbox: Value = serde_saphyr::from_str(&text).expect("kubeconfig yaml");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [sandbox["clusters"][0]],
        "users": [{"name": "nodedrain", "user": {"token": token}}],
        "contexts": [{"name": "nodedrain", "context": {
            "cluster": sandbox["clusters"][0]["name"], "user": "nodedrain", "namespace": namespace}}],
        "current-context": "nodedrain",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_saphyr::to_string(&config).unwrap()).expect("write kubeconfig");
    path
}

/// The rendered ClusterRole and Role rules for the values every run uses.
fn rendered_rules() -> (Vec<Value>, Vec<Value>) {
    let objects = render(
        "rules",
        "rules",
        None,
        &[("queue.url", "http://127.0.0.1:1/123456789012/q")],
    );
    let rules = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .and_then(|o| o["rules"].as_array())
            .unwrap_or_else(|| panic!("no {kind} rendered"))
            .clone()
    };
    (rules("ClusterRole"), rules("Role"))
}

/// (verb, resource) pairs a removal takes away.
fn removed_pairs(
    removal: &Removal,
    cluster_rules: &[Value],
    role_rules: &[Value],
) -> Vec<(String, String)> {
    let rule = |cluster: bool, index: usize| -> &Value {
        if cluster {
            &cluster_rules[index]
        } else {
            &role_rules[index]
        }
    };
    let pairs = |rule: &Value, verbs: Vec<String>| -> Vec<(String, String)> {
        let resources: Vec<String> = rule["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        verbs
            .iter()
            .flat_map(|v| resources.iter().map(move |r| (v.clone(), r.clone())))
            .collect()
    };
    match removal {
        Removal::Nothing => Vec::new(),
        Removal::Rule { cluster, index } => {
            let r = rule(*cluster, *index);
            let verbs = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            pairs(r, verbs)
        }
        Removal::Verb {
            cluster,
            index,
            verb,
        } => pairs(rule(*cluster, *index), vec![verb.clone()]),
    }
}

fn describe(removal: &Removal, cluster_rules: &[Value], role_rules: &[Value]) -> String {
    let what = |cluster: bool, index: usize| {
        let r = if cluster {
            &cluster_rules[index]
        } else {
            &role_rules[index]
        };
        let group = r["apiGroups"][0].as_str().unwrap_or_default();
        let group = if group.is_empty() { "core" } else { group };
        format!(
            "{} rule {index} ({group} {})",
            if cluster { "ClusterRole" } else { "Role" },
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    match removal {
        Removal::Nothing => "nothing removed".to_string(),
        Removal::Rule { cluster, index } => format!("without {}", what(*cluster, *index)),
        Removal::Verb {
            cluster,
            index,
            verb,
        } => format!("without `{verb}` of {}", what(*cluster, *index)),
    }
}

async fn remove(client: &kube::Client, namespace: &str, name: &str, removal: &Removal) {
    let edit = |rules: &mut Vec<k8s_openapi::api::rbac::v1::PolicyRule>,
                index: usize,
                verb: Option<&str>| {
        match verb {
            None => {
                rules.remove(index);
            }
            Some(verb) => rules[index].verbs.retain(|v| v != verb),
        }
    };
    let (cluster, index, verb) = match removal {
        Removal::Nothing => return,
        Removal::Rule { cluster, index } => (*cluster, *index, None),
        Removal::Verb {
            cluster,
            index,
            verb,
        } => (*cluster, *index, Some(verb.as_str())),
    };
    if cluster {
        let api: Api<ClusterRole> = Api::all(client.clone());
        let mut role = api.get(name).await.expect("get ClusterRole");
        edit(role.rules.as_mut().expect("rules"), index, verb);
        api.replace(name, &PostParams::default(), &role)
            .await
            .expect("replace ClusterRole");
    } else {
        let api: Api<Role> = Api::namespaced(client.clone(), namespace);
        let mut role = api.get(name).await.expect("get Role");
        edit(role.rules.as_mut().expect("rules"), index, verb);
        api.replace(name, &PostParams::default(), &role)
            .await
            .expect("replace Role");
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// What the cluster shows of the drain right now.
async fn observe(p: &Prepared) -> Checks {
    let client = &p.scope.client;
    let (scope, node_a, node_b) = (&p.scope, p.node_a.as_str(), p.node_b.as_str());
    let (original_pods, web_hash, claim, identity) = (
        &p.original_pods,
        p.web_hash.as_str(),
        p.claim.as_str(),
        p.identity.as_str(),
    );
    let mut checks = Checks::default();
    let nodes: Api<Node> = Api::all(client.clone());
    if let Ok(node) = nodes.get(node_a).await {
        let spec = node.spec.clone().unwrap_or_default();
        let tainted = spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == "nodedrain.io/interruption" && t.effect == "NoSchedule");
        let phase = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("nodedrain.io/drain"))
            .and_then(|r| serde_json::from_str::<Value>(r).ok())
            .and_then(|r| r["phase"].as_str().map(str::to_string));
        checks.node_prepared = spec.unschedulable == Some(true)
            && tainted
            && matches!(phase.as_deref(), Some("drained" | "handedOver"));
        checks.node_state = format!(
            "unschedulable={:?} tainted={tainted} phase={phase:?}",
            spec.unschedulable
        );
    }
    let pods = scope
        .pods()
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    checks.pods_gone = !pods.iter().any(|p| {
        p.metadata
            .uid
            .as_ref()
            .is_some_and(|uid| original_pods.contains(uid))
    });
    let ready_on_b = |app: &str| -> Vec<&Pod> {
        pods.iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app"))
                    .map(String::as_str)
                    == Some(app)
                    && node_of(p) == Some(node_b)
                    && p.metadata.deletion_timestamp.is_none()
                    && is_pod_ready().matches_object(Some(p))
            })
            .collect()
    };
    checks.surge_replaced = ready_on_b("web").iter().any(|p| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .is_some_and(|h| h != web_hash)
    });
    checks.api_replaced = ready_on_b("api").len() == 2;
    let claims: Api<DynamicObject> = Api::all_with(client.clone(), &nodeclaim_resource());
    checks.claim_deleted = matches!(claims.get_opt(claim).await, Ok(None));
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let (about_node, foreign): (Vec<Event>, Vec<Event>) = events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node_a)
                && e.reporting_controller.as_deref() == Some("nodedrain")
        })
        .partition(|e| e.reporting_instance.as_deref() == Some(identity));
    checks.foreign = foreign
        .iter()
        .filter_map(|e| e.reporting_instance.clone())
        .collect();
    checks.foreign.sort();
    checks.foreign.dedup();
    let has = |reason: &str| {
        about_node
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason))
    };
    checks.events = has("DrainStarted") && has("DrainSucceeded");
    checks.repeated_event = about_node
        .iter()
        .any(|e| e.series.as_ref().is_some_and(|s| s.count >= 2));
    checks
}

/// A run set up and ready to start: the chart installed with `removal` applied, its nodes,
/// workloads, NodeClaim, queue, and the controller's command line.
struct Prepared {
    label: String,
    removed: Vec<(String, String)>,
    scope: Scope,
    identity: String,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    node_a: String,
    instance_a: String,
    node_b: String,
    original_pods: Vec<String>,
    web_hash: String,
    claim: String,
    command: Command,
    port: u16,
    log: PathBuf,
}

/// The controller process; killed when dropped, whatever happened.
struct Controller {
    child: Child,
}

impl Controller {
    /// Peak resident memory so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs the chart, applies `removal` to its roles, and builds the scenario.
async fn prepare(sandbox: &Sandbox, ledger: &Ledger, variant: Variant) -> Prepared {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let (removal, label, removed) = variant;
    let client = sandbox.client.clone();
    let scope = sandbox.scope("rbac").await;
    let namespace = scope.id.clone();
    ledger.note(Created::Namespace(namespace.clone()));
    let release = format!(
        "rb-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let fullname = format!("{release}-nodedrain");
    let identity = format!("{fullname}-test-0");
    let dir = scratch_dir(&release);
    let sqs = aws_sdk_sqs::Client::new(&sdk_config(&var("AWS_ENDPOINT_URL")).await);
    let queue_url = create_queue(&sqs, "rbac", &[]).await;
    ledger.note(Created::Queue(queue_url.clone()));

    // The chart, installed as an operator would, except that its pods are never scheduled:
    // the controller under test runs outside the cluster.
    let values = dir.join("values.yaml");
    std::fs::write(
        &values,
        serde_saphyr::to_string(&json!({
            "queue": {"url": queue_url},
            "aws": {"region": var("AWS_REGION"), "endpointUrl": var("AWS_ENDPOINT_URL")},
            "nodeSelector": {"sandbox.nodedrain.io/nowhere": "true"},
        }))
        .unwrap(),
    )
    .unwrap();
    {
        let mut args: Vec<String> = vec![
            "install".into(),
            release.clone(),
            chart_dir().display().to_string(),
            "--namespace".into(),
            namespace.clone(),
        ];
        args.extend(value_args(Some(&values), &[]));
        ledger.note(Created::Release {
            name: release.clone(),
            namespace: namespace.clone(),
        });
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ok("helm install", helm(&args));
        })
        .await;
    }
    remove(&client, &namespace, &fullname, &removal).await;

    // Node A, a Karpenter node, gets the workloads; node B comes afterwards for replacements.
    let node_a_object = scope.nodes(1).await.remove(0);
    let node_a = name_of(&node_a_object);
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &node_a,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"karpenter.sh/nodepool": "default"}}})),
        )
        .await
        .expect("label node");
    wait_schedulable(&client, &node_a).await;
    deployment(&scope, "web", 1, json!({"nodedrain.io/strategy": "surge"})).await;
    deployment(&scope, "api", 2, json!({})).await;
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "api"}}},
    }))
    .unwrap();
    scope
        .api::<PodDisruptionBudget>()
        .create(&PostParams::default(), &pdb)
        .await
        .expect("create pdb");
    let mut bare = scope.pod_spec(GRACE);
    bare["containers"][0]["name"] = json!("scratch");
    let bare: Pod = serde_json::from_value(json!({
        "metadata": {"name": "scratch", "labels": {"app": "scratch"},
                     "annotations": {"nodedrain.io/strategy": "delete"}},
        "spec": bare,
    }))
    .unwrap();
    scope
        .pods()
        .create(&PostParams::default(), &bare)
        .await
        .expect("create pod");
    let original = support::ready_pods(&scope.pods(), "app", 4, Duration::from_secs(60)).await;
    assert!(original.iter().all(|p| node_of(p) == Some(node_a.as_str())));
    let original_pods: Vec<String> = original
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let web_hash = original
        .iter()
        .find(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("web-"))
        })
        .and_then(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("pod-template-hash")
                .cloned()
        })
        .expect("web pod");
    // The api pods behind an ALB in IP mode, as the AWS Load Balancer Controller binds them.
    let elb =
        aws_sdk_elasticloadbalancingv2::Client::new(&sdk_config(&var("AWS_ENDPOINT_URL")).await);
    let vpc = aws_sdk_ec2::Client::new(&sdk_config(&var("AWS_ENDPOINT_URL")).await)
        .describe_vpcs()
        .send()
        .await
        .expect("describe vpcs")
        .vpcs
        .and_then(|v| v.into_iter().find_map(|v| v.vpc_id))
        .expect("a VPC in moto");
    let group = support::aws::target_group_with_delay(
        &elb,
        elb.create_target_group()
            .name(&release)
            .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
            .port(TARGET_PORT)
            .vpc_id(vpc)
            .target_type(aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Ip),
        TARGET_GROUP_DELAY,
    )
    .await;
    ledger.note(Created::TargetGroup(group.clone()));
    for pod in original.iter().filter(|p| {
        p.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("api-"))
    }) {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod IP");
        elb.register_targets()
            .target_group_arn(&group)
            .targets(
                aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
                    .id(ip)
                    .port(TARGET_PORT)
                    .build(),
            )
            .send()
            .await
            .expect("register target");
    }
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "elbv2.k8s.aws/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": "api"},
        "spec": {"targetGroupARN": group, "targetType": "ip",
                 "serviceRef": {"name": "api", "port": 80}},
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &binding_resource())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the TargetGroupBinding");

    let node_b = name_of(&scope.nodes(1).await.remove(0));
    wait_schedulable(&client, &node_b).await;

    // The node's NodeClaim, as Karpenter would have it.
    let claims: Api<DynamicObject> = Api::all_with(client.clone(), &nodeclaim_resource());
    let claim = format!("claim-{namespace}");
    let mut object = DynamicObject::new(&claim, &nodeclaim_resource());
    object.data = json!({"spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}}});
    ledger.note(Created::Claim(claim.clone()));
    claims
        .create(&PostParams::default(), &object)
        .await
        .expect("create NodeClaim");
    let status = json!({"status": {"nodeName": node_a,
        "providerID": node_a_object.spec.as_ref().and_then(|s| s.provider_id.clone())}});
    claims
        .patch_status(&claim, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("NodeClaim status");

    // The chart's ServiceAccount, through a TokenRequest, is all the controller gets.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let token = accounts
        .create_token_request(&fullname, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
        .expect("token");
    let kubeconfig = token_kubeconfig(&dir, &token, &namespace);

    // Exactly the container's environment, from the installed Deployment and ConfigMap.
    let installed = scope
        .api::<Deployment>()
        .get(&fullname)
        .await
        .expect("installed deployment");
    let container = installed
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers
        .remove(0);
    let policy_map = scope
        .api::<ConfigMap>()
        .get(&format!("{fullname}-policy"))
        .await
        .expect("policy configmap");
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, &policy_map.data.unwrap()["policy.yaml"]).unwrap();
    let port = free_port();
    let log = dir.join("controller.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodedrain"));
    command.env_clear().args(container.args.unwrap_or_default());
    for var in container.env.unwrap_or_default() {
        let value = match var.name.as_str() {
            "NODEDRAIN_POD_NAME" => identity.clone(),
            "NODEDRAIN_POLICY" => policy.display().to_string(),
            "NODEDRAIN_ADMIN_ADDR" => format!("127.0.0.1:{port}"),
            _ => var.value.expect("plain value"),
        };
        command.env(var.name, value);
    }
    command
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", &dir)
        .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
        .stdout(Stdio::null());

    Prepared {
        label,
        removed,
        instance_a: instance_of(&node_a_object),
        scope,
        identity,
        sqs,
        queue_url,
        node_a,
        node_b,
        original_pods,
        web_hash,
        claim,
        command,
        port,
        log,
    }
}

fn start(p: &mut Prepared) -> Controller {
    p.command
        .stderr(std::fs::File::create(&p.log).expect("log file"));
    Controller {
        child: p.command.spawn().expect("start nodedrain controller"),
    }
}

/// Sends the spot warning and watches the drain; then, when it drained, the state change that
/// follows two minutes later in real life, and watches for the repeated (patched) Event.
async fn interrupt(p: &Prepared) -> (Checks, Option<f64>) {
    send(&p.sqs, &p.queue_url, &spot_warning(&p.instance_a)).await;
    let sent = Instant::now();
    let look = || observe(p);
    let mut checks = look().await;
    while !checks.drained() && sent.elapsed() < DRAIN_WINDOW {
        tokio::time::sleep(Duration::from_millis(500)).await;
        checks = look().await;
    }
    let drain_seconds = checks.drained().then(|| sent.elapsed().as_secs_f64());
    if checks.drained() {
        send(&p.sqs, &p.queue_url, &shutting_down(&p.instance_a)).await;
        let again = Instant::now();
        while !checks.repeated_event && again.elapsed() < REPEAT_WINDOW {
            tokio::time::sleep(Duration::from_millis(500)).await;
            checks = look().await;
        }
    }
    (checks, drain_seconds)
}

/// What the runs created outside their files.
enum Created {
    Namespace(String),
    Release { name: String, namespace: String },
    Claim(String),
    Queue(String),
    TargetGroup(String),
}

/// Everything created, noted as soon as it exists, so that all of it is removed even when a
/// run fails half-way (a ClusterRole outlives its namespace).
#[derive(Default)]
struct Ledger(std::sync::Mutex<Vec<Created>>);

impl Ledger {
    fn note(&self, created: Created) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(created);
    }

    async fn clean(&self, client: &kube::Client) {
        let created = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let sdk = sdk_config(&var("AWS_ENDPOINT_URL")).await;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
        let claims: Api<DynamicObject> = Api::all_with(client.clone(), &nodeclaim_resource());
        let nodes: Api<Node> = Api::all(client.clone());
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        futures::future::join_all(created.into_iter().map(|c| {
            let (sqs, elb, claims, nodes, namespaces) = (&sqs, &elb, &claims, &nodes, &namespaces);
            async move {
                match c {
                    Created::Claim(name) => {
                        let _ = claims.delete(&name, &DeleteParams::default()).await;
                    }
                    Created::Queue(url) => {
                        let _ = sqs.delete_queue().queue_url(url).send().await;
                    }
                    Created::TargetGroup(arn) => {
                        let _ = elb.delete_target_group().target_group_arn(arn).send().await;
                    }
                    Created::Release { name, namespace } => {
                        blocking(move || helm(&["uninstall", &name, "--namespace", &namespace]))
                            .await;
                    }
                    Created::Namespace(id) => {
                        let selector = ListParams::default().labels(&format!("{TEST_KEY}={id}"));
                        let _ = nodes
                            .delete_collection(&DeleteParams::default(), &selector)
                            .await;
                        let _ = namespaces.delete(&id, &DeleteParams::default()).await;
                    }
                }
            }
        }))
        .await;
    }
}

/// Runs the scenario for every removal at once. Every controller sees every node of the
/// cluster and, when it becomes the leader, resumes every unfinished drain record it finds,
/// whoever wrote it. So all runs are set up first, all controllers started and settled, and
/// only then are the interruptions sent: no controller can pick up another run's drain.
async fn run_all(sandbox: &Sandbox, variants: Vec<Variant>) -> Vec<Outcome> {
    let ledger = Ledger::default();
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run_variants(
        sandbox, &ledger, variants,
    )))
    .await;
    ledger.clean(&sandbox.client).await;
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

async fn run_variants(sandbox: &Sandbox, ledger: &Ledger, variants: Vec<Variant>) -> Vec<Outcome> {
    let mut prepared: Vec<Prepared> = futures::stream::iter(
        variants
            .into_iter()
            .map(|variant| prepare(sandbox, ledger, variant)),
    )
    .buffer_unordered(PARALLEL_SETUPS)
    .collect()
    .await;
    let controllers: Vec<Controller> = prepared.iter_mut().map(start).collect();
    // Settled: Ready (node list loaded; as the leader, the queue answered and the resume done),
    // or never going to be for lack of a permission.
    let settle = Instant::now();
    while settle.elapsed() < SETTLE
        && !prepared
            .iter()
            .all(|p| http_status(p.port, "/readyz") == Some(200))
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let results = futures::future::join_all(prepared.iter().map(interrupt)).await;
    let mut outcomes = Vec::new();
    for ((p, controller), (checks, drain_seconds)) in prepared.iter().zip(controllers).zip(results)
    {
        let peak_rss_kib = controller.peak_rss_kib();
        drop(controller);
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        outcomes.push(Outcome {
            label: p.label.clone(),
            removed: p.removed.clone(),
            checks,
            forbidden: refusals(&log),
            log: p.log.clone(),
            drain_seconds,
            peak_rss_kib,
        });
    }
    outcomes
}

/// The two tests run one after the other: a controller of one would resume the other's drains.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spot_interruption_drains_with_exactly_the_charts_permissions() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::connect().await;
    ensure_nodeclaim_crd(&sandbox.client).await;
    ensure_binding_crd(&sandbox.client).await;
    let outcome = run_all(
        &sandbox,
        vec![(Removal::Nothing, "nothing removed".into(), Vec::new())],
    )
    .await
    .remove(0);
    let log = std::fs::read_to_string(&outcome.log).unwrap_or_default();
    assert!(
        outcome.checks.foreign.is_empty(),
        "other nodedrain controllers ({:?}) acted on this run's node: the result proves nothing; \
         run this test while no other controller runs on the sandbox",
        outcome.checks.foreign
    );
    assert!(
        outcome.checks.all(),
        "the drain did not complete with the chart's permissions: {:?} failed ({})\nlog {}:\n{log}",
        outcome.checks.failed(),
        outcome.checks.node_state,
        outcome.log.display()
    );
    assert!(
        outcome.forbidden.is_empty(),
        "the controller was refused {:?} with the chart's permissions\nlog:\n{log}",
        outcome.forbidden
    );
    eprintln!(
        "drained in {:.1}s; controller peak RSS {} KiB",
        outcome.drain_seconds.unwrap_or_default(),
        outcome.peak_rss_kib.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_any_rule_or_verb_makes_the_drain_fail() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::connect().await;
    ensure_nodeclaim_crd(&sandbox.client).await;
    ensure_binding_crd(&sandbox.client).await;
    let (cluster_rules, role_rules) = rendered_rules();
    let mut removals = Vec::new();
    for (cluster, rules) in [(true, &cluster_rules), (false, &role_rules)] {
        for (index, rule) in rules.iter().enumerate() {
            let verbs = rule["verbs"].as_array().unwrap();
            removals.push(Removal::Rule { cluster, index });
            if verbs.len() > 1 {
                for verb in verbs {
                    removals.push(Removal::Verb {
                        cluster,
                        index,
                        verb: verb.as_str().unwrap().to_string(),
                    });
                }
            }
        }
    }
    let removals = removals
        .into_iter()
        .map(|removal| {
            let label = describe(&removal, &cluster_rules, &role_rules);
            let removed = removed_pairs(&removal, &cluster_rules, &role_rules);
            (removal, label, removed)
        })
        .collect();
    let outcomes = run_all(&sandbox, removals).await;

    let mut report = String::new();
    let mut unproven = Vec::new();
    for o in &outcomes {
        let refused = o.refused_what_was_removed();
        let failed = o.checks.failed();
        report.push_str(&format!(
            "{:<62} | failed: {:<45} | 403: {}\n",
            o.label,
            if failed.is_empty() {
                "nothing".to_string()
            } else {
                failed.join(", ")
            },
            if refused.is_empty() {
                "-".to_string()
            } else {
                refused
                    .iter()
                    .map(|(v, r)| format!("{v} {r}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        if failed.is_empty() && refused.is_empty() {
            unproven.push(format!("{} (log {})", o.label, o.log.display()));
        }
        if !o.checks.foreign.is_empty() {
            report.push_str(&format!(
                "    (other nodedrain controllers acted on this run's node too: {:?})\n",
                o.checks.foreign
            ));
        }
    }
    eprintln!("{report}");
    assert!(
        unproven.is_empty(),
        "these removals broke nothing, so the chart grants more than the code needs (unless \
         another controller on the sandbox stepped in, see the report):\n{}\n\n{report}",
        unproven.join("\n")
    );
}

#[test]
fn refusals_are_read_from_json_logs() {
    let line = r#"{"level":"WARN","error":"Forbidden (403): pods \"web-1\" is forbidden: User \"system:serviceaccount:a:b\" cannot create resource \"pods/eviction\" in API group \"\" in the namespace \"a\"","message":"x"}"#;
    assert_eq!(
        refusals(line),
        vec![("create".to_string(), "pods/eviction".to_string())]
    );
}
