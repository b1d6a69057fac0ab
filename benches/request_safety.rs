//! Request safety during drains (issue 16): for how long a load balancer keeps sending new
//! connections to a backend that is already stopping or gone, with nodedrain (load-balancer wait
//! on and off) and with plain `kubectl drain`, on the same fixtures, with AWS and the AWS Load
//! Balancer Controller playing their parts.
//!
//! ```sh
//! flock /tmp/nodedrain-heavy.lock cargo bench --bench request_safety   # the whole matrix
//! BENCH_SCENARIOS=voluntary-30 cargo bench --bench request_safety      # a short check
//! ```
//!
//! Each run has a namespace and nodes of its own: `BENCH_NODES` [2] KWOK nodes backed by moto spot
//! instances, each running one `edge-proxy` pod on host port 30080 (an instance target of an NLB
//! target group managed outside Kubernetes, registered by the harness as Terraform would) and
//! `BENCH_WEB_PER_NODE` [2] `web` pods on container port 8080 (IP targets of an ALB target group
//! bound to the `web` Service by a TargetGroupBinding, kept equal to the Service's Ready endpoints
//! by the Load Balancer Controller stand-in, tests/support/lbc.rs, which acts `BENCH_LBC_REACTION`
//! [1.0] s after an endpoint change, as the controller does on a quiet cluster; on the sandbox it
//! would otherwise act within tens of milliseconds); grace period `BENCH_GRACE`
//! [30] s; a spare node without an instance takes the replacements (the NLB never gets a target
//! there: nobody registers one). Every instance-backed node is drained. Both target groups and
//! their load balancers are made for the run (health checks pass 10 s after registration) and
//! removed afterwards, as are the nodes and the namespace, also when the run fails.
//!
//! Scenarios (`BENCH_SCENARIOS` [spot-30,spot-300,voluntary-30,voluntary-300]; the number is both
//! groups' deregistration delay in seconds):
//! - `spot-N`: one spot warning per node; at send time + 120 s AWS plays its part as in
//!   benches/interruption.rs: the instance is terminated (its NLB target starts draining), the
//!   node's remaining pods are force-removed (grace 0) and the Node is deleted;
//! - `voluntary-N`: one drain command for all the nodes; the instances live on.
//!
//! Handlers (`BENCH_HANDLERS` [nodedrain,nodedrain-no-wait,kubectl]):
//! - `nodedrain`: its defaults (load-balancer wait on) and `--lb-target-groups <the NLB group>`, so
//!   that it deregisters the NLB's targets itself; `nodedrain controller` with a queue of its own
//!   for spot runs, `nodedrain drain NODE...` for voluntary ones;
//! - `nodedrain-no-wait`: the same with `--lb-wait=false`;
//! - `kubectl`: `kubectl drain --ignore-daemonsets --delete-emptydir-data --force`, one process per
//!   node started at the warning's send time in spot runs (as node-termination-handler would),
//!   one for all the nodes in voluntary runs.
//!
//! A nodedrain build without the load-balancer flags is run without them, and the handler's name
//! in the table says so.
//!
//! Measured: every 100 ms a sampler asks DescribeTargetHealth of both groups and looks each
//! target's backend up in watches of the run's pods and nodes: the pods that serve through it, as
//! `nodedrain::lb::targets::served_by` decides (the pod with the IP target's address and port; the
//! pod with the instance target's port as host port on that instance's node). A backend is
//! *stopping* when every pod of it has a deletionTimestamp, *gone* when no pod of it is left, its
//! node was deleted or its instance terminated. From the start (warnings sent, drain command
//! started) until the handler is done (spot: every instance has died; voluntary: the command has
//! exited), and then until no target points at a stopping or gone backend, at most `BENCH_TAIL`
//! [30] s longer, each run reports (columns of the table):
//! - `NLB` and `ALB`, `stopping / gone`: target-seconds during which a target in a state that
//!   routes new connections (`TargetState::routes_new_connections`: anything but draining, unused
//!   and gone) pointed at a stopping backend, and at a gone one; each sample counts until the
//!   next;
//! - `most at once`: the most such targets in one sample; `left at end`: how many there still
//!   were when the run ended (non-zero: the run's numbers grow with `BENCH_TAIL`);
//! - `fewest live NLB / ALB`: the fewest targets per group that routed to a live backend;
//! - `drain`: the drain command's time and exit status (voluntary), or the pods still on the
//!   nodes when they died (spot), of which how many had not been asked to stop;
//! - `samples`: how many, and the mean time between them (the integration's step).
//!
//! `BENCH_TIMEOUT` [900] s bounds a voluntary drain; `BENCH_KEEP_LOGS=1` keeps the handlers' logs
//! in the temporary directory.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::error::DisplayErrorContext;
use elbv2::types::{LoadBalancerTypeEnum, ProtocolEnum, TargetDescription, TargetTypeEnum};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nodedrain::lb::targets::{Owner, Target, TargetGroup, TargetState, TargetType, served_by};
use serde_json::json;
use support::bench::{
    Launched, env_list, env_or, remove_scope, send_spot_warnings, spare_nodes, tail, wait_all_ready,
};
use support::controller::{instance_id, remove_stale_nodes};
use support::drain::{deployment_with, name_of, wait_schedulable};
use support::lbc::{IpBinding, Lbc, create_ip_binding, ensure_binding_crd, target_health};
use support::{BENCH_NODE_LABEL, Sandbox, Scope, TEST_KEY};

/// Prefix of this bench's scopes. `bench-`: the tests remove such nodes and namespaces once the
/// process that made them has ended (support::controller::remove_stale_nodes), and so does this
/// bench when it starts.
const PREFIX: &str = "bench-rs-";
/// Prefix of the AWS objects it makes (`rs-<kind>-<pid>-<n>`: names of target groups and load
/// balancers are at most 32 characters).
const AWS_PREFIX: &str = "rs-";
/// A spot instance dies two minutes after its warning.
const WARNING: Duration = Duration::from_secs(120);
/// The sampler's period: a tenth of a second resolves the LB controller's reaction (about a
/// second) and costs moto 20 requests a second.
const SAMPLE: Duration = Duration::from_millis(100);
const EDGE_PORT: i32 = 30080;
const WEB_PORT: i32 = 8080;
/// The run's groups check health every 5 s and need 2 passes: a target is healthy 10 s after
/// its registration, instead of the 150 s of AWS's defaults.
const HEALTH_INTERVAL: i32 = 5;
const HEALTHY_THRESHOLD: i32 = 2;
/// How long the fixture's targets may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{what}: {message}")]
    Step { what: String, message: String },
    #[error("panicked: {0}")]
    Panicked(String),
}

/// Maps an error of step `what` into a [`BenchError`]; AWS errors with their context.
fn failed<E: std::error::Error + 'static>(what: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |error| BenchError::Step {
        what: what.to_string(),
        message: DisplayErrorContext(error).to_string(),
    }
}

fn step(what: &str, message: impl Into<String>) -> BenchError {
    BenchError::Step {
        what: what.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// scenarios and handlers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Spot,
    Voluntary,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    kind: Kind,
    /// Both groups' deregistration delay, in seconds.
    delay: u64,
}

impl Scenario {
    fn parse(text: &str) -> Result<Scenario, String> {
        let (kind, delay) = text
            .rsplit_once('-')
            .ok_or_else(|| format!("{text}: expected spot-SECONDS or voluntary-SECONDS"))?;
        let kind = match kind {
            "spot" => Kind::Spot,
            "voluntary" => Kind::Voluntary,
            other => return Err(format!("{other}: neither spot nor voluntary")),
        };
        let delay = delay
            .parse()
            .map_err(|_| format!("{text}: {delay} is not a number of seconds"))?;
        Ok(Scenario { kind, delay })
    }

    fn name(&self) -> String {
        let kind = match self.kind {
            Kind::Spot => "spot",
            Kind::Voluntary => "voluntary",
        };
        format!("{kind}-{}", self.delay)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    Nodedrain,
    NodedrainNoWait,
    Kubectl,
}

impl Handler {
    fn parse(text: &str) -> Result<Handler, String> {
        match text {
            "nodedrain" => Ok(Handler::Nodedrain),
            "nodedrain-no-wait" => Ok(Handler::NodedrainNoWait),
            "kubectl" => Ok(Handler::Kubectl),
            other => Err(format!(
                "{other}: expected nodedrain, nodedrain-no-wait or kubectl"
            )),
        }
    }

    fn label(self, flags: LbFlags) -> String {
        let base = match self {
            Handler::Nodedrain => "nodedrain",
            Handler::NodedrainNoWait => "nodedrain --lb-wait=false",
            Handler::Kubectl => "kubectl drain",
        };
        if self != Handler::Kubectl && !flags.drain {
            format!("{base} (this build has no --lb-* flags: ran without)")
        } else {
            base.to_string()
        }
    }

    /// nodedrain's load-balancer arguments for this run; none where the build lacks them.
    fn lb_args(self, supported: bool, nlb: &str) -> Vec<String> {
        if !supported {
            return Vec::new();
        }
        let mut args = vec!["--lb-target-groups".to_string(), nlb.to_string()];
        if self == Handler::NodedrainNoWait {
            args.push("--lb-wait=false".to_string());
        }
        args
    }
}

/// Whether the nodedrain binary under test takes the load-balancer flags, per command: until
/// the drain engine's wait is merged, the harness must still run (and say what it ran).
#[derive(Debug, Clone, Copy)]
struct LbFlags {
    drain: bool,
    controller: bool,
}

impl LbFlags {
    fn probe() -> LbFlags {
        let has = |command: &str| {
            std::process::Command::new(env!("CARGO_BIN_EXE_nodedrain"))
                .args([command, "--help"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("--lb-wait"))
                .unwrap_or(false)
        };
        LbFlags {
            drain: has("drain"),
            controller: has("controller"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// what a run makes, and its removal

/// The AWS objects a run made, removed after it whatever happened.
#[derive(Default)]
struct Made {
    load_balancers: Vec<String>,
    groups: Vec<String>,
    queue: Option<String>,
}

impl Made {
    async fn remove(&self, elb: &elbv2::Client, sqs: &aws_sdk_sqs::Client) {
        // Deleting a load balancer deletes its listeners; a group can go once no listener
        // forwards to it.
        for arn in &self.load_balancers {
            if let Err(e) = elb
                .delete_load_balancer()
                .load_balancer_arn(arn)
                .send()
                .await
            {
                eprintln!("cleanup: load balancer {arn}: {}", DisplayErrorContext(e));
            }
        }
        for arn in &self.groups {
            if let Err(e) = elb.delete_target_group().target_group_arn(arn).send().await {
                eprintln!("cleanup: target group {arn}: {}", DisplayErrorContext(e));
            }
        }
        if let Some(url) = &self.queue
            && let Err(e) = sqs.delete_queue().queue_url(url).send().await
        {
            eprintln!("cleanup: queue {url}: {}", DisplayErrorContext(e));
        }
    }
}

/// A name for an AWS object of this process: `rs-<kind>-<pid>-<n>`.
fn aws_name(kind: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{AWS_PREFIX}{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether an [`aws_name`] belongs to a process that has ended (an aborted earlier run).
fn stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(AWS_PREFIX) else {
        return false;
    };
    match rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Removes the load balancers and target groups of aborted earlier runs.
async fn remove_stale_aws(aws: &aws_config::SdkConfig) {
    let elb = &elbv2::Client::new(aws);
    let mut made = Made::default();
    if let Ok(out) = elb.describe_load_balancers().send().await {
        made.load_balancers = out
            .load_balancers()
            .iter()
            .filter(|l| l.load_balancer_name().is_some_and(stale))
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
    }
    if let Ok(out) = elb.describe_target_groups().send().await {
        made.groups = out
            .target_groups()
            .iter()
            .filter(|g| g.target_group_name().is_some_and(stale))
            .filter_map(|g| g.target_group_arn().map(str::to_string))
            .collect();
    }
    if !made.load_balancers.is_empty() || !made.groups.is_empty() {
        eprintln!(
            "removing {} load balancers and {} target groups of aborted runs",
            made.load_balancers.len(),
            made.groups.len()
        );
        made.remove(elb, &aws_sdk_sqs::Client::new(aws)).await;
    }
}

/// A spawned task that ends with its owner, also when a run unwinds.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// fixtures

/// What the handlers drain and the sampler watches.
struct Fixture {
    nodes: Vec<Node>,
    nlb: TargetGroup,
    alb: TargetGroup,
}

/// One run's settings and clients.
struct Ctx<'a> {
    scope: &'a Scope,
    elb: elbv2::Client,
    ec2: aws_sdk_ec2::Client,
    sqs: aws_sdk_sqs::Client,
    scenario: Scenario,
    handler: Handler,
    flags: LbFlags,
    nodes: usize,
    web_per_node: usize,
    grace: i64,
}

/// Two subnets in different zones of the default VPC, as a load balancer needs, and the VPC.
async fn subnets(ec2: &aws_sdk_ec2::Client) -> Result<(String, Vec<String>), BenchError> {
    let out = ec2
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .map_err(failed("DescribeSubnets"))?;
    let mut zones = BTreeSet::new();
    let mut vpc = None;
    let mut chosen = Vec::new();
    for subnet in out.subnets() {
        let (Some(id), Some(zone), Some(of)) = (
            subnet.subnet_id(),
            subnet.availability_zone(),
            subnet.vpc_id(),
        ) else {
            continue;
        };
        if vpc.as_deref().is_none_or(|v| v == of) && zones.insert(zone.to_string()) {
            vpc = Some(of.to_string());
            chosen.push(id.to_string());
        }
        if chosen.len() == 2 {
            break;
        }
    }
    match vpc {
        Some(vpc) if chosen.len() == 2 => Ok((vpc, chosen)),
        _ => Err(step(
            "DescribeSubnets",
            "the default VPC has no subnets in two zones",
        )),
    }
}

/// A load balancer of `kind` whose listener forwards to `group`, recorded for removal.
async fn load_balancer(
    ctx: &Ctx<'_>,
    made: &mut Made,
    kind: LoadBalancerTypeEnum,
    subnets: &[String],
    protocol: ProtocolEnum,
    group: &str,
) {
    let arn =
        support::aws::load_balancer_for(&ctx.elb, &aws_name("lb"), kind, subnets, protocol, group)
            .await;
    made.load_balancers.push(arn);
}

/// The NLB group (edge-proxy's nodes, instance targets on the host port, managed outside
/// Kubernetes) and the ALB group (web's pods, IP targets, bound to the Service), each behind a
/// load balancer of its own, with the scenario's deregistration delay.
async fn groups(ctx: &Ctx<'_>, made: &mut Made) -> Result<(TargetGroup, TargetGroup), BenchError> {
    let (vpc, subnets) = subnets(&ctx.ec2).await?;
    let delay = ctx.scenario.delay;
    let nlb = ctx
        .elb
        .create_target_group()
        .name(aws_name("nlb"))
        .protocol(ProtocolEnum::Tcp)
        .port(EDGE_PORT)
        .vpc_id(&vpc)
        .target_type(TargetTypeEnum::Instance)
        .health_check_protocol(ProtocolEnum::Tcp)
        .health_check_interval_seconds(HEALTH_INTERVAL)
        // The default (10 s) may not exceed the interval.
        .health_check_timeout_seconds(HEALTH_INTERVAL)
        .healthy_threshold_count(HEALTHY_THRESHOLD);
    let nlb = support::aws::target_group_with_delay(&ctx.elb, nlb, delay).await;
    made.groups.push(nlb.clone());
    load_balancer(
        ctx,
        made,
        LoadBalancerTypeEnum::Network,
        &subnets,
        ProtocolEnum::Tcp,
        &nlb,
    )
    .await;
    let alb = ctx
        .elb
        .create_target_group()
        .name(aws_name("alb"))
        .protocol(ProtocolEnum::Http)
        .port(WEB_PORT)
        .vpc_id(&vpc)
        .target_type(TargetTypeEnum::Ip)
        .health_check_protocol(ProtocolEnum::Http)
        .health_check_path("/ready")
        .health_check_interval_seconds(HEALTH_INTERVAL)
        .health_check_timeout_seconds(HEALTH_INTERVAL - 1)
        .healthy_threshold_count(HEALTHY_THRESHOLD);
    let alb = support::aws::target_group_with_delay(&ctx.elb, alb, delay).await;
    made.groups.push(alb.clone());
    load_balancer(
        ctx,
        made,
        LoadBalancerTypeEnum::Application,
        &subnets,
        ProtocolEnum::Http,
        &alb,
    )
    .await;
    let group = |arn: String, target_type, owner| TargetGroup {
        arn,
        target_type,
        deregistration_delay: Duration::from_secs(delay),
        owner,
    };
    Ok((
        group(nlb, TargetType::Instance, Owner::Configured),
        group(
            alb,
            TargetType::Ip,
            Owner::Binding {
                namespace: ctx.scope.id.clone(),
                name: "web".into(),
            },
        ),
    ))
}

/// The nodes, workloads, Service, TargetGroupBinding and groups of one run, the NLB's instance
/// targets registered; the ALB's are the LB controller stand-in's to register.
async fn fixture(ctx: &Ctx<'_>, made: &mut Made) -> Result<Fixture, BenchError> {
    let scope = ctx.scope;
    let (nlb, alb) = groups(ctx, made).await?;
    let nodes = scope.nodes(ctx.nodes).await;
    // The controllers the tests start leave benchmark nodes alone.
    let node_api: Api<Node> = Api::all(scope.client.clone());
    for node in &nodes {
        node_api
            .patch(
                &name_of(node),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {BENCH_NODE_LABEL: "true"}}})),
            )
            .await
            .map_err(failed("label the bench nodes"))?;
    }
    wait_schedulable(scope, &nodes).await;

    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": WEB_PORT}]},
    }))
    .map_err(|e| step("the web Service", e.to_string()))?;
    scope
        .api::<Service>()
        .create(&PostParams::default(), &service)
        .await
        .map_err(failed("create the web Service"))?;
    // nodedrain finds the ALB group through this binding, as on a cluster with the controller.
    ensure_binding_crd(&scope.client).await;
    create_ip_binding(&scope.client, &scope.id, "web", &alb.arn, "web", 80)
        .await
        .map_err(failed("create the TargetGroupBinding"))?;

    // The host port allows one proxy per node; web spreads evenly over the drained nodes. The
    // spare node comes afterwards, so that every pod starts on a node that is drained.
    let container = |name: &str, port: serde_json::Value| {
        let image = format!("registry.example/{name}:1");
        json!([{"name": name, "image": image, "ports": [port]}])
    };
    deployment_with(
        scope,
        "edge-proxy",
        ctx.nodes as i32,
        ctx.grace,
        json!({}),
        json!({"containers": container("edge-proxy",
            json!({"containerPort": 8080, "hostPort": EDGE_PORT}))}),
    )
    .await;
    deployment_with(
        scope,
        "web",
        (ctx.nodes * ctx.web_per_node) as i32,
        ctx.grace,
        json!({}),
        json!({
            "containers": container("web", json!({"containerPort": WEB_PORT})),
            // Honor: a cordoned node (tainted unschedulable) is no domain, or the replacements
            // could not all go to the spare node while the drained nodes count zero.
            "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "Honor",
                "labelSelector": {"matchLabels": {"app": "web"}},
            }],
        }),
    )
    .await;
    wait_all_ready(scope, ctx.nodes * (1 + ctx.web_per_node)).await;
    spare_nodes(scope, ctx.nodes * (1 + ctx.web_per_node)).await;

    ctx.elb
        .register_targets()
        .target_group_arn(&nlb.arn)
        .set_targets(Some(
            nodes
                .iter()
                .map(|n| {
                    TargetDescription::builder()
                        .id(instance_id(n))
                        .port(EDGE_PORT)
                        .build()
                })
                .collect(),
        ))
        .send()
        .await
        .map_err(failed("register the NLB's instance targets"))?;
    Ok(Fixture { nodes, nlb, alb })
}

/// Waits until every target the fixture should have is healthy: one per node in the NLB group,
/// one per web pod in the ALB group.
async fn wait_healthy(ctx: &Ctx<'_>, fixture: &Fixture) -> Result<(), BenchError> {
    let want = [
        (&fixture.nlb.arn, ctx.nodes),
        (&fixture.alb.arn, ctx.nodes * ctx.web_per_node),
    ];
    let start = Instant::now();
    loop {
        let mut healthy = Vec::new();
        for (arn, _) in want {
            let targets = target_health(&ctx.elb, arn)
                .await
                .map_err(|e| step("DescribeTargetHealth", e.to_string()))?;
            healthy.push(targets.iter().filter(|t| t.state == "healthy").count());
        }
        if healthy.iter().zip(want).all(|(h, (_, n))| *h >= n) {
            return Ok(());
        }
        if start.elapsed() > HEALTHY_WITHIN {
            return Err(step(
                "the fixture's targets",
                format!("healthy NLB / ALB targets {healthy:?} after {HEALTHY_WITHIN:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// the sampler

/// What the sampler needs to know of the backends: the run's pods and nodes (watched), and the
/// instances the harness has terminated.
#[derive(Clone)]
struct World {
    pods: Store<Pod>,
    nodes: Store<Node>,
    terminated: Arc<Mutex<BTreeSet<String>>>,
}

/// A reflector store of `api` kept current by a task.
fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, Task)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(event) = stream.next().await {
            // The watcher backs off and relists by itself.
            if let Err(error) = event {
                eprintln!("watch: {error}; resuming");
            }
        }
    });
    (store, Task(task))
}

/// What stands behind a target, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Backend {
    Live,
    Stopping,
    Gone,
}

/// One sample: routed targets by group (0 NLB, 1 ALB) and backend.
#[derive(Debug, Clone, Default)]
struct Sample {
    routed: [BTreeMap<Backend, usize>; 2],
}

impl Sample {
    fn bad(&self) -> usize {
        self.routed
            .iter()
            .flat_map(|m| m.iter())
            .filter(|(b, _)| **b != Backend::Live)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Classifies every routed target of `answers` (group index, targets) by its backend.
fn classify(
    groups: &[TargetGroup; 2],
    answers: &[Vec<(Target, bool)>; 2],
    world: &World,
) -> Sample {
    let terminated = world
        .terminated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // A node serves only while it exists and its instance runs.
    let live_nodes: HashMap<String, Option<String>> = world
        .nodes
        .state()
        .iter()
        .filter_map(|node| {
            let instance = node
                .spec
                .as_ref()
                .and_then(|s| s.provider_id.as_deref())
                .and_then(|p| p.rsplit('/').next())
                .map(str::to_string);
            if instance.as_ref().is_some_and(|i| terminated.contains(i)) {
                return None;
            }
            Some((name_of(node), instance))
        })
        .collect();
    let routed: Vec<(&TargetGroup, &Target)> = groups
        .iter()
        .zip(answers)
        .flat_map(|(group, targets)| {
            targets
                .iter()
                .filter(|(_, routes)| *routes)
                .map(move |(target, _)| (group, target))
        })
        .collect();
    let mut backends: HashMap<Target, Backend> = HashMap::new();
    for pod in world.pods.state() {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let Some(instance) = node.and_then(|n| live_nodes.get(n)) else {
            // On a deleted or dead node: it serves nothing.
            continue;
        };
        let state = if pod.metadata.deletion_timestamp.is_some() {
            Backend::Stopping
        } else {
            Backend::Live
        };
        for target in served_by(&pod, instance.as_deref(), routed.iter().copied()) {
            let best = backends.entry(target).or_insert(state);
            *best = (*best).min(state);
        }
    }
    let mut sample = Sample::default();
    for (index, targets) in answers.iter().enumerate() {
        for (target, routes) in targets {
            if *routes {
                let backend = backends.get(target).copied().unwrap_or(Backend::Gone);
                *sample.routed[index].entry(backend).or_default() += 1;
            }
        }
    }
    sample
}

/// The integrals of the samples.
#[derive(Debug, Default)]
struct Tally {
    /// Target-seconds routed to a stopping ([0]) and a gone ([1]) backend, per group.
    seconds: [[f64; 2]; 2],
    most: usize,
    fewest_live: [Option<usize>; 2],
    samples: usize,
    first: Option<Instant>,
    last: Option<(Instant, Sample)>,
    errors: usize,
    last_error: Option<String>,
}

impl Tally {
    /// The previous sample holds until `at`.
    fn integrate(&mut self, at: Instant) {
        if let Some((since, sample)) = &self.last {
            let dt = at.saturating_duration_since(*since).as_secs_f64();
            for (group, routed) in sample.routed.iter().enumerate() {
                for (backend, column) in [(Backend::Stopping, 0), (Backend::Gone, 1)] {
                    self.seconds[group][column] +=
                        routed.get(&backend).copied().unwrap_or(0) as f64 * dt;
                }
            }
        }
    }

    fn record(&mut self, at: Instant, sample: Sample) {
        self.integrate(at);
        self.most = self.most.max(sample.bad());
        for (group, routed) in sample.routed.iter().enumerate() {
            let live = routed.get(&Backend::Live).copied().unwrap_or(0);
            self.fewest_live[group] = Some(self.fewest_live[group].map_or(live, |f| f.min(live)));
        }
        self.samples += 1;
        self.first.get_or_insert(at);
        self.last = Some((at, sample));
    }

    fn bad_now(&self) -> usize {
        self.last.as_ref().map_or(0, |(_, s)| s.bad())
    }
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|e| e.into_inner())
}

/// Samples both groups every [`SAMPLE`] until dropped.
fn sampler(
    elb: elbv2::Client,
    groups: [TargetGroup; 2],
    world: World,
    tally: Arc<Mutex<Tally>>,
) -> Task {
    Task(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE);
        // A slow answer delays the next sample instead of bunching them up.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (nlb, alb) = futures::join!(
                target_health(&elb, &groups[0].arn),
                target_health(&elb, &groups[1].arn)
            );
            let at = Instant::now();
            let (nlb, alb) = match (nlb, alb) {
                (Ok(nlb), Ok(alb)) => (nlb, alb),
                // The last good sample holds until the next one.
                (Err(e), _) | (_, Err(e)) => {
                    let mut t = lock(&tally);
                    t.errors += 1;
                    t.last_error = Some(e.to_string());
                    continue;
                }
            };
            let answers = [(&groups[0], nlb), (&groups[1], alb)].map(|(group, rows)| {
                rows.into_iter()
                    .map(|row| {
                        // A state this code does not know may route: count it as routing.
                        let routes = TargetState::parse(&row.state)
                            .is_none_or(TargetState::routes_new_connections);
                        let target = Target {
                            group_arn: group.arn.clone(),
                            id: row.id,
                            port: row.port,
                        };
                        (target, routes)
                    })
                    .collect::<Vec<_>>()
            });
            let sample = classify(&groups, &answers, &world);
            lock(&tally).record(at, sample);
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// the handlers

/// A drain command's process, its log, and when it started.
struct DrainProcess {
    child: tokio::process::Child,
    log: PathBuf,
    started: Instant,
}

impl DrainProcess {
    fn spawn(ctx: &Ctx<'_>, nodes: &[String], nlb: &str) -> Result<DrainProcess, BenchError> {
        let log = std::env::temp_dir().join(format!(
            "nodedrain-bench-rs-{}-{}.log",
            ctx.scope.id,
            nodes.join("+")
        ));
        let file = std::fs::File::create(&log).map_err(|e| step("the log file", e.to_string()))?;
        let err = file
            .try_clone()
            .map_err(|e| step("the log file", e.to_string()))?;
        let common = ["--ignore-daemonsets", "--delete-emptydir-data", "--force"];
        let mut command = match ctx.handler {
            Handler::Kubectl => {
                let mut c = tokio::process::Command::new(format!(
                    "{}/kubectl",
                    support::var("NODEDRAIN_SANDBOX_BIN")
                ));
                c.arg("drain").args(nodes).args(common);
                c
            }
            Handler::Nodedrain | Handler::NodedrainNoWait => {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodedrain"));
                // The sandbox's NODEDRAIN_* settings are not this run's.
                for (key, _) in std::env::vars_os() {
                    if key.to_string_lossy().starts_with("NODEDRAIN_") {
                        c.env_remove(&key);
                    }
                }
                c.arg("drain")
                    .args(nodes)
                    .args(common)
                    .args(["--timeout", "15m"])
                    .args(ctx.handler.lb_args(ctx.flags.drain, nlb));
                for key in [
                    "AWS_ENDPOINT_URL",
                    "AWS_REGION",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                ] {
                    c.env(key, support::var(key));
                }
                c
            }
        };
        let child = command
            .env("KUBECONFIG", support::var("KUBECONFIG"))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| step("start the drain command", e.to_string()))?;
        Ok(DrainProcess {
            child,
            log,
            started: Instant::now(),
        })
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 5)
    }
}

impl Drop for DrainProcess {
    fn drop(&mut self) {
        if std::env::var("BENCH_KEEP_LOGS").is_ok() {
            eprintln!("log kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// AWS at a spot instance's deadline: the instance is terminated, the pods still on its node are
/// force-removed, the Node is deleted. Returns (pods still there, of which never asked to stop).
async fn dies(
    ctx: &Ctx<'_>,
    node: &Node,
    terminated: &Mutex<BTreeSet<String>>,
) -> Result<(usize, usize), BenchError> {
    let name = name_of(node);
    let instance = instance_id(node);
    terminated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(instance.clone());
    ctx.ec2
        .terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .map_err(failed("TerminateInstances"))?;
    let pods = ctx.scope.pods();
    let on_node = ListParams::default().fields(&format!("spec.nodeName={name}"));
    let left = pods
        .list(&on_node)
        .await
        .map_err(failed("list the dead node's pods"))?
        .items;
    let never_asked = left
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete_collection(&now, &on_node)
        .await
        .map_err(failed("force-remove the dead node's pods"))?;
    Api::<Node>::all(ctx.scope.client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .map_err(failed("delete the dead node"))?;
    Ok((left.len(), never_asked))
}

/// A spot run: warnings (or kubectl at their send time), then each instance's death 120 s
/// later. Returns the `drain` column's text.
async fn spot(
    ctx: &Ctx<'_>,
    fixture: &Fixture,
    queue: Option<&str>,
    terminated: &Mutex<BTreeSet<String>>,
) -> Result<String, BenchError> {
    let mut commands = Vec::new();
    let sent_at: HashMap<String, Instant> = match ctx.handler {
        Handler::Kubectl => {
            let at = Instant::now();
            for node in &fixture.nodes {
                commands.push(DrainProcess::spawn(
                    ctx,
                    std::slice::from_ref(&name_of(node)),
                    &fixture.nlb.arn,
                )?);
            }
            fixture.nodes.iter().map(|n| (name_of(n), at)).collect()
        }
        Handler::Nodedrain | Handler::NodedrainNoWait => {
            let queue = queue.ok_or_else(|| step("spot warnings", "no queue"))?;
            let tag = format!("{}-{}", ctx.scenario.name(), ctx.scope.id);
            send_spot_warnings(&ctx.sqs, queue, &fixture.nodes, &tag).await
        }
    };
    let sent_at = &sent_at;
    let deaths = fixture.nodes.iter().map(|node| async move {
        let at = sent_at
            .get(&name_of(node))
            .copied()
            .unwrap_or_else(Instant::now);
        tokio::time::sleep_until((at + WARNING).into()).await;
        dies(ctx, node, terminated).await
    });
    let mut left = 0;
    let mut never_asked = 0;
    for death in futures::future::join_all(deaths).await {
        let (l, n) = death?;
        left += l;
        never_asked += n;
    }
    // kubectl has nothing left to wait for once the pods are gone; it is killed if it still runs.
    drop(commands);
    Ok(format!(
        "{left} pods on the nodes at their death, {never_asked} never asked to stop"
    ))
}

/// A voluntary run: one drain command for every node. Returns the `drain` column's text.
async fn voluntary(ctx: &Ctx<'_>, fixture: &Fixture) -> Result<String, BenchError> {
    let names: Vec<String> = fixture.nodes.iter().map(name_of).collect();
    let mut command = DrainProcess::spawn(ctx, &names, &fixture.nlb.arn)?;
    let limit = Duration::from_secs(env_or("BENCH_TIMEOUT", 900));
    match tokio::time::timeout(limit, command.child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(format!(
            "{:.1} s, exit 0",
            command.started.elapsed().as_secs_f64()
        )),
        Ok(Ok(status)) => Ok(format!(
            "{:.1} s, {status}: {}",
            command.started.elapsed().as_secs_f64(),
            command.log_tail().replace('\n', " / ")
        )),
        Ok(Err(e)) => Err(step("wait for the drain command", e.to_string())),
        Err(_) => Ok(format!(
            "still running after {limit:?}, killed: {}",
            command.log_tail().replace('\n', " / ")
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// one run

struct Outcome {
    scenario: String,
    handler: String,
    result: Result<Measured, BenchError>,
}

struct Measured {
    tally: Tally,
    drain: String,
    notes: Vec<String>,
}

async fn measure(ctx: &Ctx<'_>, made: &mut Made) -> Result<Measured, BenchError> {
    let scope = ctx.scope;
    let fixture = fixture(ctx, made).await?;
    let lbc = Lbc::ip_reacting_after(
        scope.client.clone(),
        ctx.elb.clone(),
        IpBinding {
            namespace: scope.id.clone(),
            service: "web".into(),
            group_arn: fixture.alb.arn.clone(),
            port: WEB_PORT,
        },
        Duration::from_secs_f64(env_or("BENCH_LBC_REACTION", 1.0)),
    );
    wait_healthy(ctx, &fixture).await?;

    let (pods, _pods_task) = reflect(scope.pods(), watcher::Config::default());
    let (nodes, _nodes_task) = reflect(
        Api::<Node>::all(scope.client.clone()),
        watcher::Config::default().labels(&format!("{TEST_KEY}={}", scope.id)),
    );
    pods.wait_until_ready()
        .await
        .map_err(|e| step("the pod watch", e.to_string()))?;
    nodes
        .wait_until_ready()
        .await
        .map_err(|e| step("the node watch", e.to_string()))?;
    let world = World {
        pods,
        nodes,
        terminated: Arc::default(),
    };

    // The controller is up and has listed before the clock starts, as one in a cluster would be.
    let _controller = match (ctx.scenario.kind, ctx.handler) {
        (Kind::Spot, Handler::Nodedrain | Handler::NodedrainNoWait) => {
            let queue = support::aws::create_queue(&ctx.sqs, &scope.id, &[]).await;
            made.queue = Some(queue.clone());
            let selector = format!("{TEST_KEY}={}", scope.id);
            let args = ctx.handler.lb_args(ctx.flags.controller, &fixture.nlb.arn);
            let mut controller = Launched::start_with(&queue, Some(&selector), None, &args);
            controller.wait_ready(Duration::from_secs(60)).await;
            Some(controller)
        }
        _ => None,
    };

    let tally = Arc::new(Mutex::new(Tally::default()));
    let groups = [fixture.nlb.clone(), fixture.alb.clone()];
    let sampling = sampler(ctx.elb.clone(), groups, world.clone(), tally.clone());
    eprintln!(
        "{} / {}: start",
        ctx.scenario.name(),
        ctx.handler.label(ctx.flags)
    );
    let drain = match ctx.scenario.kind {
        Kind::Spot => spot(ctx, &fixture, made.queue.as_deref(), &world.terminated).await?,
        Kind::Voluntary => voluntary(ctx, &fixture).await?,
    };
    // Until nothing routes to a stopping or gone backend, or the tail has passed.
    let tail_end = Instant::now() + Duration::from_secs(env_or("BENCH_TAIL", 30));
    while Instant::now() < tail_end && lock(&tally).bad_now() > 0 {
        tokio::time::sleep(SAMPLE).await;
    }
    drop(sampling);
    let end = Instant::now();
    let mut tally = std::mem::take(&mut *lock(&tally));
    tally.integrate(end);
    let mut notes = Vec::new();
    if tally.errors > 0 {
        notes.push(format!(
            "{} samples failed (last: {})",
            tally.errors,
            tally.last_error.as_deref().unwrap_or("")
        ));
    }
    let activity = lbc.activity();
    if activity.error_count > 0 {
        notes.push(format!(
            "LB controller stand-in: {} errors (last: {})",
            activity.error_count,
            activity.errors.last().map_or("", String::as_str)
        ));
    }
    Ok(Measured {
        tally,
        drain,
        notes,
    })
}

async fn run(sandbox: &Sandbox, scenario: Scenario, handler: Handler, flags: LbFlags) -> Outcome {
    let scope = sandbox
        .scope(&format!("{PREFIX}{}", scenario.name().replace('-', "")))
        .await;
    let ctx = Ctx {
        scope: &scope,
        elb: elbv2::Client::new(&scope.aws),
        ec2: aws_sdk_ec2::Client::new(&scope.aws),
        sqs: aws_sdk_sqs::Client::new(&scope.aws),
        scenario,
        handler,
        flags,
        nodes: env_or("BENCH_NODES", 2),
        web_per_node: env_or("BENCH_WEB_PER_NODE", 2),
        grace: env_or("BENCH_GRACE", 30),
    };
    let mut made = Made::default();
    // The support helpers panic on a failed call; a failed run is reported, and whatever it made
    // is removed before the next one.
    let result = AssertUnwindSafe(measure(&ctx, &mut made))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(BenchError::Panicked(message))
        });
    made.remove(&ctx.elb, &ctx.sqs).await;
    drop(ctx);
    remove_scope(scope).await;
    Outcome {
        scenario: scenario.name(),
        handler: handler.label(flags),
        result,
    }
}

// ---------------------------------------------------------------------------------------------
// the table

fn header() -> String {
    [
        "| scenario | handler | NLB stopping / gone (target-s) | ALB stopping / gone (target-s) | most at once | left at end | fewest live NLB / ALB | drain | samples (mean step) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    .join("\n")
}

fn row(outcome: &Outcome) -> String {
    let Ok(m) = &outcome.result else {
        let error = outcome
            .result
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        // An AWS error's context runs to kilobytes; its message comes first.
        let short: String = error.chars().take(300).collect();
        return format!(
            "| {} | {} | — | — | — | — | — | — | — | failed: {} |",
            outcome.scenario,
            outcome.handler,
            short.replace('|', "/").replace('\n', " ")
        );
    };
    let t = &m.tally;
    let live = |g: usize| t.fewest_live[g].map_or("—".to_string(), |n| n.to_string());
    let step = match (t.first, &t.last) {
        (Some(first), Some((last, _))) if t.samples > 1 => format!(
            "{:.2} s",
            last.saturating_duration_since(first).as_secs_f64() / (t.samples - 1) as f64
        ),
        _ => "—".to_string(),
    };
    format!(
        "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} | {} / {} | {} | {} ({step}) | {} |",
        outcome.scenario,
        outcome.handler,
        t.seconds[0][0],
        t.seconds[0][1],
        t.seconds[1][0],
        t.seconds[1][1],
        t.most,
        t.bad_now(),
        live(0),
        live(1),
        m.drain.replace('|', "/"),
        t.samples,
        m.notes.join("; ").replace('|', "/"),
    )
}

fn main() {
    let scenarios: Result<Vec<Scenario>, String> = env_list(
        "BENCH_SCENARIOS",
        "spot-30,spot-300,voluntary-30,voluntary-300",
    )
    .iter()
    .map(|s| Scenario::parse(s))
    .collect();
    let handlers: Result<Vec<Handler>, String> =
        env_list("BENCH_HANDLERS", "nodedrain,nodedrain-no-wait,kubectl")
            .iter()
            .map(|h| Handler::parse(h))
            .collect();
    let (scenarios, handlers) = match (scenarios, handlers) {
        (Ok(s), Ok(h)) => (s, h),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("request_safety: {e}");
            std::process::exit(2);
        }
    };
    let flags = LbFlags::probe();
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("request_safety: cannot start a tokio runtime");
        std::process::exit(1);
    };
    runtime.block_on(async {
        let sandbox = Sandbox::connect().await;
        remove_stale_nodes(&sandbox.client).await;
        remove_stale_aws(&sandbox.aws).await;
        let mut outcomes = Vec::new();
        for scenario in &scenarios {
            for handler in &handlers {
                let outcome = run(&sandbox, *scenario, *handler, flags).await;
                eprintln!("{}", row(&outcome));
                outcomes.push(outcome);
            }
        }
        println!();
        println!("{}", header());
        for outcome in &outcomes {
            println!("{}", row(outcome));
        }
    });
}
