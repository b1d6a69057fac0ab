//! The machine against a small model of the cluster: pods that stop after their grace, PDBs whose
//! status follows the pods, and an Eviction API that answers as the apiserver does (429 when the
//! budget is spent, the pod in `disruptedPods` when it is not). Time is a parameter; nothing
//! sleeps.

use std::collections::{BTreeMap, VecDeque};

use k8s_openapi::api::core::v1::PodCondition;
use k8s_openapi::api::policy::v1::{PodDisruptionBudgetSpec, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use proptest::prelude::{Just, ProptestConfig, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as _;

use super::*;
use crate::drain::plan::{Owners, PlanInput, PlanOptions, plan};
use crate::drain::policy::ClusterPolicy;
use crate::drain::policy::tests::{PodBuilder, match_labels};
use crate::names;

const NS: &str = "shop";
const NODE: &str = "ip-10-0-0-1";

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn config() -> MachineConfig {
    MachineConfig {
        retry_min: Duration::from_millis(500),
        retry_max: Duration::from_secs(15),
        multiple_pdb_recheck: Duration::from_secs(30),
        evictions_per_pdb: 1,
    }
}

fn ready(mut pod: Pod) -> Pod {
    pod.status.get_or_insert_with(Default::default).conditions = Some(vec![PodCondition {
        type_: "Ready".to_string(),
        status: "True".to_string(),
        ..Default::default()
    }]);
    pod.spec.get_or_insert_with(Default::default).node_name = Some(NODE.to_string());
    pod
}

/// A pod of `app` on the draining node.
fn app_pod(name: &str, app: &str, grace: i64) -> Pod {
    ready(
        PodBuilder::new(NS, name)
            .label("app", app)
            .controller("ReplicaSet", &format!("{app}-rs"))
            .grace(grace)
            .build(),
    )
}

/// A PDB in the model: `min_available` pods of `app` must stay healthy.
#[derive(Debug, Clone)]
struct ModelPdb {
    name: String,
    app: String,
    min_available: i32,
    /// `unhealthyPodEvictionPolicy: AlwaysAllow` (else the default, IfHealthyBudget).
    always_allow: bool,
    /// Pods whose eviction was approved, and when (the apiserver's `disruptedPods`).
    disrupted: BTreeMap<String, Timestamp>,
}

#[derive(Debug, Clone)]
struct ModelPod {
    pod: Pod,
    app: String,
    /// When a deleted pod's grace ends and it is gone.
    gone_at: Option<Timestamp>,
}

/// The cluster as far as one drain sees it.
#[derive(Debug, Default)]
struct Cluster {
    pods: BTreeMap<String, ModelPod>,
    pdbs: Vec<ModelPdb>,
}

impl Cluster {
    fn healthy(&self, pdb: &ModelPdb) -> i32 {
        self.pods
            .values()
            .filter(|p| p.app == pdb.app && p.gone_at.is_none())
            .filter(|p| policy::is_pod_ready(&p.pod))
            .filter(|p| {
                !pdb.disrupted
                    .contains_key(p.pod.metadata.name.as_ref().unwrap())
            })
            .count() as i32
    }

    fn allowed(&self, pdb: &ModelPdb) -> i32 {
        (self.healthy(pdb) - pdb.min_available).max(0)
    }

    fn pdb_object(&self, pdb: &ModelPdb) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: ObjectMeta {
                namespace: Some(NS.to_string()),
                name: Some(pdb.name.clone()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(pdb.min_available)),
                selector: Some(match_labels(&[("app", &pdb.app)])),
                unhealthy_pod_eviction_policy: pdb.always_allow.then(|| "AlwaysAllow".to_string()),
                ..Default::default()
            }),
            status: Some(PodDisruptionBudgetStatus {
                disruptions_allowed: Some(self.allowed(pdb)),
                current_healthy: Some(self.healthy(pdb)),
                desired_healthy: Some(pdb.min_available),
                expected_pods: Some(self.pods.values().filter(|p| p.app == pdb.app).count() as i32),
                observed_generation: Some(1),
                disrupted_pods: Some(
                    pdb.disrupted
                        .iter()
                        .map(|(k, v)| (k.clone(), Time(*v)))
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn covering(&self, app: &str) -> Vec<usize> {
        (0..self.pdbs.len())
            .filter(|&i| self.pdbs[i].app == app)
            .collect()
    }
}

/// A request the model holds back to answer later (to interleave answers with other inputs).
#[derive(Debug, Clone)]
struct Held {
    answer_at: Timestamp,
    action: Action,
}

/// The machine, the model, and a log of everything the machine did.
struct Sim {
    machine: Machine,
    now: Timestamp,
    cluster: Cluster,
    node: NodeId,
    plan: Plan,
    /// Every action with the time it was taken.
    log: Vec<(Timestamp, Action)>,
    held: Vec<Held>,
    /// How long the model takes to answer a request.
    latency: Duration,
    /// What the machine was last told of each PDB's `disruptionsAllowed`.
    told_allowed: BTreeMap<String, i32>,
    /// Evictions sent against each PDB (the covered pod's only PDB) and not yet reflected in what
    /// the machine was told: in flight, or accepted but not yet in a status it saw.
    unreflected: BTreeMap<String, Vec<String>>,
    finished: Option<Result<DrainReport, Fatal>>,
    /// Checked after every input.
    invariant: fn(&Sim),
    /// An ELBv2 target group in front of some pods: each target's state, and when a draining
    /// target is gone.
    targets: BTreeMap<Target, (TargetState, Option<Timestamp>)>,
    /// Whether DeregisterTargets succeeds and drains its targets (otherwise it is refused, as
    /// without the IAM permission, and the targets stay healthy).
    lb_responsive: bool,
    /// The AWS Load Balancer Controller registers a deregistered IP again at once while its pod
    /// is still Ready (its reconcile counts draining targets as absent).
    lb_reregisters: bool,
}

const GROUP: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/1";

fn ip_target(pod: &str) -> Target {
    Target {
        group_arn: GROUP.to_string(),
        id: format!(
            "10.0.{}.{}",
            pod.len(),
            pod.bytes().map(u32::from).sum::<u32>() % 250
        ),
        port: 8080,
    }
}

struct Setup {
    pods: Vec<Pod>,
    pdbs: Vec<(&'static str, &'static str, i32)>,
    /// PDBs (by name) with `unhealthyPodEvictionPolicy: AlwaysAllow`.
    always_allow: Vec<&'static str>,
    options: PlanOptions,
    deadline: Option<Timestamp>,
    timeout: Option<Duration>,
    owners: Owners,
    config: MachineConfig,
    latency: Duration,
    /// Pods that are IP targets of [`GROUP`], with its deregistration delay in seconds.
    lb: Vec<(String, u64)>,
    lb_responsive: bool,
}

impl Setup {
    fn new(pods: Vec<Pod>) -> Self {
        Setup {
            pods,
            pdbs: Vec::new(),
            always_allow: Vec::new(),
            options: PlanOptions::default(),
            deadline: None,
            timeout: Some(Duration::from_secs(600)),
            owners: Owners::new(),
            config: config(),
            latency: Duration::ZERO,
            lb: Vec::new(),
            lb_responsive: true,
        }
    }

    /// `pod` serves as an IP target of [`GROUP`], whose delay is `delay` seconds.
    fn target(mut self, pod: &str, delay: u64) -> Self {
        self.lb.push((pod.to_string(), delay));
        self
    }

    fn pdb(mut self, name: &'static str, app: &'static str, min_available: i32) -> Self {
        self.pdbs.push((name, app, min_available));
        self
    }

    fn involuntary(mut self, deadline: Timestamp) -> Self {
        self.options.voluntary = false;
        self.deadline = Some(deadline);
        self
    }

    fn start(self) -> Sim {
        let mut cluster = Cluster::default();
        for pod in &self.pods {
            let app = pod.labels().get("app").cloned().unwrap_or_default();
            cluster.pods.insert(
                pod.metadata.name.clone().unwrap(),
                ModelPod {
                    pod: pod.clone(),
                    app,
                    gone_at: None,
                },
            );
        }
        for (name, app, min) in &self.pdbs {
            cluster.pdbs.push(ModelPdb {
                name: name.to_string(),
                app: app.to_string(),
                min_available: *min,
                always_allow: self.always_allow.contains(name),
                disrupted: BTreeMap::new(),
            });
        }
        let pdbs: Vec<PodDisruptionBudget> =
            cluster.pdbs.iter().map(|p| cluster.pdb_object(p)).collect();
        let now = t(0);
        let plan = plan(PlanInput {
            pods: &self.pods,
            pdbs: &pdbs,
            owners: &self.owners,
            policy: &ClusterPolicy::default(),
            options: &self.options,
            now,
            deadline: self.deadline,
        });
        let mut plan = plan;
        let mut targets = BTreeMap::new();
        for (pod, delay) in &self.lb {
            let target = ip_target(pod);
            targets.insert(target.clone(), (TargetState::Healthy, None));
            let step = plan.steps.iter_mut().find(|s| s.name == *pod).unwrap();
            step.load_balancer.push(crate::lb::targets::PodTarget {
                target,
                target_type: TargetType::Ip,
                deregistration_delay: Duration::from_secs(*delay),
                deregistered_by_nodedrain: true,
                state: TargetState::Healthy,
                short_by: None,
            });
        }
        let record = DrainRecord::manual(now, self.deadline);
        let mut sim = Sim {
            targets,
            lb_responsive: self.lb_responsive,
            lb_reregisters: false,
            machine: Machine::new(self.config),
            now,
            cluster,
            node: NodeId(0),
            plan: plan.clone(),
            log: Vec::new(),
            held: Vec::new(),
            latency: self.latency,
            told_allowed: BTreeMap::new(),
            unreflected: BTreeMap::new(),
            finished: None,
            invariant: |_| {},
        };
        sim.feed(Input::Start(NewDrain {
            id: DrainId(1),
            nodes: vec![NodeStart {
                name: NODE.to_string(),
                reference: ObjectReference::default(),
                record,
                origin: Origin::Fresh,
                plan,
                pods: self.pods.clone(),
            }],
            began: now,
            timeout_at: self.timeout.map(|d| after(now, d)),
            disable_eviction: false,
        }));
        sim
    }
}

impl Sim {
    fn feed(&mut self, input: Input) {
        let actions = self.machine.on(input, self.now);
        for action in actions {
            self.log.push((self.now, action.clone()));
            self.take(action);
        }
        (self.invariant)(self);
    }

    /// The model's side of one action.
    fn take(&mut self, action: Action) {
        match &action {
            Action::WatchPdbs => {
                let mut events = vec![WatchEvent::Init];
                for pdb in &self.cluster.pdbs {
                    events.push(WatchEvent::InitApply(self.cluster.pdb_object(pdb)));
                }
                events.push(WatchEvent::InitDone);
                for pdb in &self.cluster.pdbs {
                    self.told_allowed
                        .insert(pdb.name.clone(), self.cluster.allowed(pdb));
                }
                for event in events {
                    self.feed(Input::Pdbs(event));
                }
            }
            Action::WatchNodePods { node, .. } => {
                let node = *node;
                let mut events = vec![WatchEvent::Init];
                for pod in self.cluster.pods.values() {
                    events.push(WatchEvent::InitApply(pod.pod.clone()));
                }
                events.push(WatchEvent::InitDone);
                for event in events {
                    self.feed(Input::NodePods { node, event });
                }
            }
            Action::Evict { pod, .. } => {
                // What the machine believes it may spend on this pod's only PDB.
                let app = self.cluster.pods[&pod.name].app.clone();
                // A not-Ready pod may pass without spending the budget; the tests that check
                // budgets use Ready pods only.
                let ready = policy::is_pod_ready(&self.cluster.pods[&pod.name].pod);
                if let ([i], true) = (&self.cluster.covering(&app)[..], ready) {
                    let i = *i;
                    let name = self.cluster.pdbs[i].name.clone();
                    self.unreflected
                        .entry(name)
                        .or_default()
                        .push(pod.name.clone());
                }
                self.hold(action);
            }
            Action::Delete { .. }
            | Action::RestartRollout { .. }
            | Action::DescribeTargetHealth { .. } => self.hold(action),
            Action::DeregisterTargets { .. } => self.hold(action),
            Action::Finish { result, .. } => self.finished = Some(result.clone()),
            _ => {}
        }
    }

    fn hold(&mut self, action: Action) {
        self.held.push(Held {
            answer_at: after(self.now, self.latency),
            action,
        });
    }

    /// The apiserver's answer to a held request, with the changes it makes.
    fn answer(&mut self, action: Action) {
        match action {
            Action::Evict {
                step, pod, grace, ..
            } => {
                let Some(model) = self.cluster.pods.get(&pod.name).cloned() else {
                    self.forget_unreflected(&pod.name);
                    return self.feed(Input::Evicted {
                        step,
                        grace,
                        result: Ok(EvictOutcome::Gone),
                    });
                };
                let covering = self.cluster.covering(&model.app);
                let outcome = if model.gone_at.is_some() {
                    EvictOutcome::Evicted
                } else {
                    let pdb = |i: usize| &self.cluster.pdbs[i];
                    // The apiserver's order: a not-Ready pod under AlwaysAllow, or while the
                    // budget is met, goes without spending it.
                    let unhealthy_passes = |i: usize| {
                        !policy::is_pod_ready(&model.pod)
                            && (pdb(i).always_allow
                                || (pdb(i).min_available > 0
                                    && self.cluster.healthy(pdb(i)) >= pdb(i).min_available))
                    };
                    match covering[..] {
                        [] => EvictOutcome::Evicted,
                        [i] if unhealthy_passes(i) => {
                            self.forget_unreflected(&pod.name);
                            EvictOutcome::Evicted
                        }
                        [i] if self.cluster.allowed(&self.cluster.pdbs[i]) > 0 => {
                            // The eviction handler writes the budget it spends (the pod in
                            // `disruptedPods`) before it deletes the pod.
                            self.cluster.pdbs[i]
                                .disrupted
                                .insert(pod.name.clone(), self.now);
                            self.publish_pdbs(&model.app, false);
                            EvictOutcome::Evicted
                        }
                        [i] => EvictOutcome::PdbBlocked {
                            pdb: Some(self.cluster.pdbs[i].name.clone()),
                            message: "needs more healthy pods".to_string(),
                        },
                        _ => EvictOutcome::MultiplePdbs {
                            message: "more than one PodDisruptionBudget".to_string(),
                        },
                    }
                };
                if outcome == EvictOutcome::Evicted {
                    self.stop_pod(&pod.name, grace);
                } else {
                    self.forget_unreflected(&pod.name);
                }
                self.feed(Input::Evicted {
                    step,
                    grace,
                    result: Ok(outcome),
                });
            }
            Action::Delete {
                step, pod, grace, ..
            } => {
                let outcome = if self.cluster.pods.contains_key(&pod.name) {
                    self.stop_pod(&pod.name, grace);
                    DeleteOutcome::Deleted
                } else {
                    DeleteOutcome::Gone
                };
                self.feed(Input::Deleted {
                    step,
                    grace,
                    result: Ok(outcome),
                });
            }
            Action::DeregisterTargets { group, targets } => {
                let result = if self.lb_responsive {
                    for target in &targets {
                        let delay = self.delay_of(target);
                        let state = if self.lb_reregisters {
                            (TargetState::Initial, None)
                        } else {
                            (TargetState::Draining, Some(after(self.now, delay)))
                        };
                        if let Some(entry) = self.targets.get_mut(target) {
                            *entry = state;
                        }
                    }
                    Ok(())
                } else {
                    Err(Failure {
                        message: "AccessDenied".to_string(),
                        forbidden: false,
                    })
                };
                self.feed(Input::Deregistered {
                    group,
                    targets,
                    result,
                });
            }
            Action::DescribeTargetHealth { group } => {
                let now = self.now;
                let registered = self
                    .targets
                    .iter()
                    .filter(|(_, (_, gone))| gone.is_none_or(|g| now < g))
                    .map(|(t, (state, _))| (t.clone(), *state))
                    .collect();
                self.feed(Input::TargetHealth {
                    group,
                    result: Ok(registered),
                });
            }
            Action::RestartRollout { surge, .. } => self.feed(Input::RolloutRestarted {
                surge,
                result: Ok(SurgeStart::Restarted {
                    selector: "app=web".to_string(),
                    patched: true,
                }),
            }),
            _ => {}
        }
    }

    fn delay_of(&self, target: &Target) -> Duration {
        self.plan
            .steps
            .iter()
            .flat_map(|s| &s.load_balancer)
            .find(|t| t.target == *target)
            .map_or(Duration::ZERO, |t| t.deregistration_delay)
    }

    /// When the first action matching `f` was taken.
    fn first(&self, f: impl Fn(&Action) -> bool) -> Option<Timestamp> {
        self.log.iter().find(|(_, a)| f(a)).map(|(t, _)| *t)
    }

    fn forget_unreflected(&mut self, pod: &str) {
        for pods in self.unreflected.values_mut() {
            pods.retain(|p| p != pod);
        }
    }

    /// The pod gets its deletionTimestamp now and is gone after `grace`; its PDBs' statuses
    /// change, and both watches say so.
    fn stop_pod(&mut self, name: &str, grace: i64) {
        let now = self.now;
        let Some(model) = self.cluster.pods.get_mut(name) else {
            return;
        };
        if model.gone_at.is_none() {
            model.gone_at = Some(after(now, Duration::from_secs(grace.max(1) as u64)));
            model.pod.metadata.deletion_timestamp = Some(Time(now));
        }
        let pod = model.pod.clone();
        let app = model.app.clone();
        self.publish_pdbs(&app, true);
        let node = self.node;
        self.feed(Input::NodePods {
            node,
            event: WatchEvent::Apply(pod),
        });
    }

    /// Publishes the statuses of `app`'s PDBs. `recompute`: as the disruption controller writes
    /// them, which drops terminating pods from `disruptedPods` (they no longer count as healthy
    /// either); otherwise as the eviction handler writes them.
    fn publish_pdbs(&mut self, app: &str, recompute: bool) {
        let terminating: Vec<String> = self
            .cluster
            .pods
            .iter()
            .filter(|(_, p)| p.gone_at.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for i in self.cluster.covering(app) {
            if recompute {
                self.cluster.pdbs[i]
                    .disrupted
                    .retain(|n, _| !terminating.contains(n));
            }
            let pdb = &self.cluster.pdbs[i];
            let object = self.cluster.pdb_object(pdb);
            let name = pdb.name.clone();
            self.told_allowed
                .insert(name.clone(), self.cluster.allowed(pdb));
            // This status accounts for the evictions it lists and for the terminating pods.
            let reflected: Vec<String> = pdb
                .disrupted
                .keys()
                .cloned()
                .chain(terminating.iter().cloned())
                .collect();
            if let Some(pods) = self.unreflected.get_mut(&name) {
                pods.retain(|p| !reflected.contains(p));
            }
            self.feed(Input::Pdbs(WatchEvent::Apply(object)));
        }
    }

    /// Runs until the drain has finished or `until`, answering requests after `latency` and
    /// removing pods whose grace ended.
    fn run(&mut self, until: Timestamp) {
        let mut guard = 0;
        while self.finished.is_none() && self.now <= until {
            guard += 1;
            assert!(guard < 100_000, "the machine does not settle");
            // Answers due now, in the order they were sent.
            if let Some(i) = self.held.iter().position(|h| h.answer_at <= self.now) {
                let held = self.held.remove(i);
                self.answer(held.action);
                continue;
            }
            let due: Vec<String> = self
                .cluster
                .pods
                .iter()
                .filter(|(_, p)| p.gone_at.is_some_and(|g| g <= self.now))
                .map(|(n, _)| n.clone())
                .collect();
            if !due.is_empty() {
                for name in due {
                    let model = self.cluster.pods.remove(&name).unwrap();
                    self.publish_pdbs(&model.app, true);
                    let node = self.node;
                    self.feed(Input::NodePods {
                        node,
                        event: WatchEvent::Delete(model.pod),
                    });
                }
                continue;
            }
            let next = [
                self.machine.next_wake(),
                self.held.iter().map(|h| h.answer_at).min(),
                self.cluster.pods.values().filter_map(|p| p.gone_at).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(next) if next > until => {
                    self.now = self.now.max(until);
                    break;
                }
                Some(next) if next > self.now => {
                    self.now = next;
                    self.feed(Input::Tick);
                }
                Some(_) => self.feed(Input::Tick),
                None => break,
            }
        }
    }

    fn report(&self) -> &DrainReport {
        match &self.finished {
            Some(Ok(report)) => report,
            other => panic!("the drain has not ended with a report: {other:?}"),
        }
    }

    /// When each pod was first asked to stop (an eviction the API accepted, or a deletion).
    fn stopped_at(&self) -> BTreeMap<String, Timestamp> {
        let mut at = BTreeMap::new();
        for (when, action) in &self.log {
            if let Action::Progress {
                event:
                    ProgressEvent::Pod {
                        pod,
                        change:
                            PodChange::Evicting { .. }
                            | PodChange::Deleting { .. }
                            | PodChange::DeadlineOverride { .. }
                            | PodChange::EvictionCompleted { .. },
                        ..
                    },
                ..
            } = action
            {
                at.entry(pod.name.clone()).or_insert(*when);
            }
        }
        at
    }

    fn deletes(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Delete { pod, .. } => Some(pod.name.clone()),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Examples
// ---------------------------------------------------------------------------------------------

#[test]
fn pods_without_a_budget_are_evicted_at_once_and_the_drain_ends_when_they_are_gone() {
    let mut sim = Setup::new(vec![app_pod("a", "a", 5), app_pod("b", "b", 5)]).start();
    sim.run(t(600));
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::Drained);
    assert!(report.nodes[0].pods.iter().all(|p| p.gone));
    assert_eq!(sim.stopped_at().values().max(), Some(&t(0)));
    // Draining is recorded when the first step starts, drained at the end.
    let phases: Vec<Phase> = sim
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::WriteRecord { record, .. } => Some(record.phase),
            _ => None,
        })
        .collect();
    assert_eq!(phases, vec![Phase::Draining, Phase::Drained]);
}

#[test]
fn evictions_against_one_budget_go_one_at_a_time_and_as_far_as_it_allows() {
    let pods = (0..4)
        .map(|i| app_pod(&format!("web-{i}"), "web", 5))
        .collect();
    let mut sim = Setup::new(pods).pdb("web", "web", 2).start();
    sim.latency = Duration::from_millis(200);
    sim.run(t(1));
    // Two of four may go at once; one request at a time against the PDB.
    let mut in_flight = 0;
    let mut most = 0;
    for (_, action) in &sim.log {
        match action {
            Action::Evict { .. } => {
                in_flight += 1;
                most = most.max(in_flight);
            }
            Action::Progress {
                event:
                    ProgressEvent::Pod {
                        change: PodChange::Evicting { .. } | PodChange::Blocked { .. },
                        ..
                    },
                ..
            } => in_flight -= 1,
            _ => {}
        }
    }
    assert_eq!(most, 1);
    assert_eq!(sim.stopped_at().len(), 2, "the budget allows two");
    // The model has no ReplicaSet to replace them: the other two stay, blocked by the PDB.
    sim.run(t(700));
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::TimedOut);
    let blocked = report.nodes[0]
        .pods
        .iter()
        .filter(|p| matches!(&p.blocker, Some(Blocker::Pdb { name, .. }) if name == "web"))
        .count();
    assert_eq!(blocked, 2);
}

#[test]
fn a_voluntary_drain_waits_for_a_spent_budget_and_says_so() {
    let mut sim = Setup::new(vec![app_pod("db-0", "db", 5)])
        .pdb("db", "db", 1)
        .start();
    sim.run(t(700));
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::TimedOut);
    let pod = &report.nodes[0].pods[0];
    assert!(!pod.gone);
    assert!(
        matches!(&pod.blocker, Some(Blocker::Pdb { name, disruptions_allowed: Some(0), .. }) if name == "db"),
        "{:?}",
        pod.blocker
    );
    assert!(sim.deletes().is_empty());
    // The status said 0 all along: no eviction was sent only to be refused.
    assert!(
        !sim.log
            .iter()
            .any(|(_, a)| matches!(a, Action::Evict { .. })),
        "an eviction the PDB's status refuses is not sent"
    );
    assert!(sim.log.iter().any(
        |(_, a)| matches!(a, Action::WriteRecord { record, .. } if record.phase == Phase::Failed)
    ));
}

#[test]
fn a_deadline_deletes_what_still_blocks_at_the_latest_start() {
    let mut sim = Setup::new(vec![app_pod("db-0", "db", 30)])
        .pdb("db", "db", 1)
        .involuntary(t(120))
        .start();
    sim.run(t(200));
    let latest = sim.plan.steps[0].latest_start.unwrap();
    assert_eq!(latest, t(80), "120 s - 30 s grace - 10 s margin");
    assert_eq!(sim.stopped_at()["db-0"], latest);
    assert_eq!(sim.deletes(), vec!["db-0".to_string()]);
    let report = sim.report();
    assert!(report.nodes[0].pods[0].deadline_override);
    assert!(sim.log.iter().any(|(_, a)| matches!(a,
        Action::Publish { event, .. } if event.reason == names::reasons::DEADLINE_OVERRIDE)));
}

#[test]
fn tiers_wait_for_the_earlier_one_to_be_gone() {
    let app = app_pod("app", "app", 20);
    let critical = ready(
        PodBuilder::new(NS, "dns")
            .label("app", "dns")
            .priority_class("system-cluster-critical")
            .grace(5)
            .build(),
    );
    let mut sim = Setup::new(vec![critical, app]).start();
    sim.run(t(600));
    let at = sim.stopped_at();
    assert_eq!(at["app"], t(0));
    assert_eq!(
        at["dns"],
        t(20),
        "the critical pod goes once the app pod is gone"
    );
}

#[test]
fn refused_pods_stop_the_drain_before_any_eviction() {
    let bare = ready(PodBuilder::new(NS, "bare").bare().build());
    let mut sim = Setup::new(vec![bare, app_pod("a", "a", 5)]).start();
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::Refused);
    sim.run(t(10));
    assert!(
        !sim.log
            .iter()
            .any(|(_, a)| matches!(a, Action::Evict { .. } | Action::Delete { .. }))
    );
    assert!(sim.log.iter().any(|(_, a)| matches!(
        a,
        Action::Progress {
            event: ProgressEvent::Refused { .. },
            ..
        }
    )));
    // The pod that could have gone did not, so the node's record says failed, not drained.
    let phases: Vec<Phase> = sim
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::WriteRecord { record, .. } => Some(record.phase),
            _ => None,
        })
        .collect();
    assert_eq!(phases, vec![Phase::Failed]);
}

#[test]
fn a_node_with_only_refused_pods_is_failed_too() {
    let bare = ready(PodBuilder::new(NS, "bare").bare().build());
    let sim = Setup::new(vec![bare]).start();
    assert_eq!(sim.report().outcome, DrainOutcome::Refused);
    assert!(sim.log.iter().any(|(_, a)| matches!(a,
        Action::WriteRecord { record, .. } if record.phase == Phase::Failed)));
}

#[test]
fn a_cancelled_drain_leaves_its_record_for_the_next_leader() {
    let mut sim = Setup::new(vec![app_pod("db-0", "db", 5)])
        .pdb("db", "db", 1)
        .start();
    sim.run(t(5));
    let writes_before = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::WriteRecord { .. }))
        .count();
    sim.feed(Input::Cancel(DrainId(1)));
    assert_eq!(sim.report().outcome, DrainOutcome::Cancelled);
    let writes_after = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::WriteRecord { .. }))
        .count();
    assert_eq!(writes_before, writes_after);
    assert!(sim.machine.is_idle());
    assert!(
        sim.log
            .iter()
            .any(|(_, a)| matches!(a, Action::ClosePdbWatch))
    );
}

#[test]
fn a_resumed_drain_says_resumed_not_started() {
    let setup = Setup::new(vec![app_pod("a", "a", 5)]);
    let mut machine = Machine::new(setup.config.clone());
    let plan = plan(PlanInput {
        pods: &setup.pods,
        pdbs: &[],
        owners: &setup.owners,
        policy: &ClusterPolicy::default(),
        options: &setup.options,
        now: t(0),
        deadline: None,
    });
    let actions = machine.on(
        Input::Start(NewDrain {
            id: DrainId(7),
            nodes: vec![NodeStart {
                name: NODE.to_string(),
                reference: ObjectReference::default(),
                record: DrainRecord::manual(t(-300), None),
                origin: Origin::Resumed,
                plan,
                pods: setup.pods.clone(),
            }],
            began: t(0),
            timeout_at: None,
            disable_eviction: false,
        }),
        t(0),
    );
    let reasons: Vec<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { event, .. } => Some(event.reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec![names::reasons::DRAIN_RESUMED]);
}

#[test]
fn no_eviction_is_sent_before_the_pdbs_are_known() {
    let setup = Setup::new(vec![app_pod("web-0", "web", 5)]).pdb("web", "web", 0);
    let mut machine = Machine::new(config());
    let plan = plan(PlanInput {
        pods: &setup.pods,
        pdbs: &[],
        owners: &setup.owners,
        policy: &ClusterPolicy::default(),
        options: &setup.options,
        now: t(0),
        deadline: None,
    });
    let actions = machine.on(
        Input::Start(NewDrain {
            id: DrainId(1),
            nodes: vec![NodeStart {
                name: NODE.to_string(),
                reference: ObjectReference::default(),
                record: DrainRecord::manual(t(0), None),
                origin: Origin::Fresh,
                plan,
                pods: setup.pods.clone(),
            }],
            began: t(0),
            timeout_at: None,
            disable_eviction: false,
        }),
        t(0),
    );
    assert!(actions.iter().any(|a| matches!(a, Action::WatchPdbs)));
    assert!(!actions.iter().any(|a| matches!(a, Action::Evict { .. })));
    let actions = machine.on(Input::Pdbs(WatchEvent::Init), t(1));
    assert!(!actions.iter().any(|a| matches!(a, Action::Evict { .. })));
    let actions = machine.on(Input::Pdbs(WatchEvent::InitDone), t(1));
    assert!(actions.iter().any(|a| matches!(a, Action::Evict { .. })));
}

// ---------------------------------------------------------------------------------------------
// An eviction approved but never carried out
// ---------------------------------------------------------------------------------------------

/// A PDB whose status already counts `web-0` as evicted at `evicted`, as an earlier leader's
/// cut-off eviction left it.
fn charged_sim(evicted: Timestamp) -> Sim {
    let pods = (0..3)
        .map(|i| app_pod(&format!("web-{i}"), "web", 20))
        .collect();
    let mut sim = Setup::new(pods).pdb("web", "web", 2).start();
    sim.cluster.pdbs[0]
        .disrupted
        .insert("web-0".to_string(), evicted);
    let object = sim.cluster.pdb_object(&sim.cluster.pdbs[0]);
    sim.feed(Input::Pdbs(WatchEvent::Apply(object)));
    sim
}

#[test]
fn an_approved_eviction_that_never_deleted_its_pod_is_completed_after_the_settle_time() {
    let mut sim = charged_sim(t(0));
    // Nothing may go meanwhile: the budget is spent on web-0.
    sim.run(t(9));
    assert!(sim.deletes().is_empty(), "not before the settle time");
    sim.run(t(11));
    assert_eq!(sim.deletes(), vec!["web-0".to_string()]);
    let completed = sim.log.iter().any(|(when, a)| {
        *when == t(10)
            && matches!(a, Action::Progress { event: ProgressEvent::Pod {
                change: PodChange::EvictionCompleted { pdb, grace_seconds: 20 }, .. }, .. } if pdb == "web")
    });
    assert!(completed, "completed at 10 s with the pod's grace");
    assert!(sim.log.iter().any(|(_, a)| matches!(a,
        Action::Publish { event, .. } if event.reason == names::reasons::EVICTION_COMPLETED)));
    sim.run(t(700));
    let gone: Vec<&str> = sim.report().nodes[0]
        .pods
        .iter()
        .filter(|p| p.gone)
        .map(|p| p.pod.name.as_str())
        .collect();
    assert_eq!(
        gone,
        vec!["web-0"],
        "the budget it held is the only one there was"
    );
}

#[test]
fn a_pod_that_is_already_terminating_is_not_completed_again() {
    let mut sim = charged_sim(t(0));
    // The eviction did delete it; the pod watch says so.
    sim.stop_pod("web-0", 20);
    sim.run(t(15));
    assert!(sim.deletes().is_empty());
}

#[test]
fn an_own_eviction_in_flight_is_left_to_its_answer() {
    let pods = (0..2)
        .map(|i| app_pod(&format!("web-{i}"), "web", 20))
        .collect();
    let mut sim = Setup::new(pods).pdb("web", "web", 1).start();
    // The first eviction is sent at 0 and its answer takes a minute; the apiserver already wrote
    // the PDB status that counts it.
    let evicting: Vec<String> = sim
        .held
        .iter()
        .filter_map(|h| match &h.action {
            Action::Evict { pod, .. } => Some(pod.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(evicting.len(), 1);
    for held in &mut sim.held {
        held.answer_at = t(60);
    }
    sim.cluster.pdbs[0]
        .disrupted
        .insert(evicting[0].clone(), t(0));
    let object = sim.cluster.pdb_object(&sim.cluster.pdbs[0]);
    sim.feed(Input::Pdbs(WatchEvent::Apply(object)));
    sim.now = t(30);
    sim.feed(Input::Tick);
    assert!(sim.deletes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// karpenter.sh/do-not-disrupt durations
// ---------------------------------------------------------------------------------------------

/// A pod of `app` that started at `started` and asks Karpenter's do-not-disrupt for `value`.
fn held_pod(name: &str, app: &str, value: &str, started: Timestamp) -> Pod {
    let mut pod = app_pod(name, app, 5);
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT.to_string(),
            value.to_string(),
        );
    pod.status.get_or_insert_with(Default::default).start_time = Some(Time(started));
    pod
}

/// Every blocker reported for `pod`, with when.
fn blockers_of(sim: &Sim, pod: &str) -> Vec<(Timestamp, Blocker)> {
    sim.log
        .iter()
        .filter_map(|(at, action)| match action {
            Action::Progress {
                event:
                    ProgressEvent::Pod {
                        pod: p,
                        change: PodChange::Blocked { blocker },
                        ..
                    },
                ..
            } if p.name == pod => Some((*at, blocker.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_do_not_disrupt_duration_holds_its_pod_then_the_drain_proceeds() {
    // Started 10 minutes before the drain with "30m": held until 20 minutes into it.
    let pods = vec![
        held_pod("batch-0", "batch", "30m", t(-600)),
        app_pod("web-0", "web", 5),
    ];
    let mut setup = Setup::new(pods);
    setup.timeout = Some(Duration::from_secs(3600));
    let mut sim = setup.start();
    sim.run(t(1199));
    assert_eq!(
        blockers_of(&sim, "batch-0"),
        vec![(
            t(0),
            Blocker::DoNotDisrupt {
                value: "30m".to_string(),
                until: t(1200)
            }
        )],
        "the hold is reported once, with its end"
    );
    let stopped = sim.stopped_at();
    assert_eq!(stopped.get("web-0"), Some(&t(0)), "the others do not wait");
    assert_eq!(
        stopped.get("batch-0"),
        None,
        "nothing is sent during the hold"
    );
    assert_eq!(
        sim.machine.next_wake(),
        Some(t(1200)),
        "time alone ends the hold"
    );
    sim.run(t(3600));
    assert_eq!(sim.stopped_at()["batch-0"], t(1200));
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::Drained);
    assert!(sim.deletes().is_empty(), "evicted, not deleted");
}

#[test]
fn a_hold_past_the_timeout_ends_the_drain_naming_it() {
    let mut sim = Setup::new(vec![held_pod("batch-0", "batch", "2h", t(0))]).start();
    sim.run(t(700));
    let report = sim.report();
    assert_eq!(report.outcome, DrainOutcome::TimedOut);
    assert_eq!(
        report.nodes[0].pods[0].blocker,
        Some(Blocker::DoNotDisrupt {
            value: "2h".to_string(),
            until: t(7200)
        })
    );
    assert!(sim.stopped_at().is_empty());
    assert_eq!(
        report.nodes[0].pods[0]
            .blocker
            .as_ref()
            .unwrap()
            .to_string(),
        format!(
            "karpenter.sh/do-not-disrupt=2h: left alone until {}, then drained",
            t(7200)
        )
    );
}

#[test]
fn a_hold_that_ended_while_earlier_waves_drained_does_not_wait_again() {
    // The held pod is critical, so it starts once the app pod (grace 20 s) is gone.
    let mut critical = held_pod("dns-0", "dns", "10s", t(0));
    critical
        .spec
        .get_or_insert_with(Default::default)
        .priority_class_name = Some("system-cluster-critical".to_string());
    let mut sim = Setup::new(vec![critical, app_pod("app-0", "app", 20)]).start();
    sim.run(t(600));
    assert_eq!(sim.stopped_at()["dns-0"], t(20));
    assert!(
        blockers_of(&sim, "dns-0")
            .iter()
            .all(|(_, b)| !matches!(b, Blocker::DoNotDisrupt { .. }))
    );
}

#[test]
fn an_involuntary_drain_ignores_the_hold() {
    let mut sim = Setup::new(vec![held_pod("batch-0", "batch", "30m", t(0))])
        .involuntary(t(120))
        .start();
    sim.run(t(200));
    assert_eq!(sim.stopped_at()["batch-0"], t(0));
}

// ---------------------------------------------------------------------------------------------
// unhealthyPodEvictionPolicy
// ---------------------------------------------------------------------------------------------

fn not_ready(mut pod: Pod) -> Pod {
    pod.status.get_or_insert_with(Default::default).conditions = Some(vec![PodCondition {
        type_: "Ready".to_string(),
        status: "False".to_string(),
        ..Default::default()
    }]);
    pod
}

#[test]
fn a_not_ready_pod_under_always_allow_is_evicted_at_a_spent_budget() {
    // minAvailable 2 of 2, one not Ready: the budget allows nothing.
    let pods = || {
        vec![
            app_pod("web-0", "web", 5),
            not_ready(app_pod("web-1", "web", 5)),
        ]
    };
    let mut setup = Setup::new(pods()).pdb("web", "web", 2);
    setup.always_allow.push("web");
    let mut sim = setup.start();
    sim.run(t(700));
    assert_eq!(sim.stopped_at().get("web-1"), Some(&t(0)));
    let report = sim.report();
    assert_eq!(
        report.outcome,
        DrainOutcome::TimedOut,
        "the Ready pod still waits"
    );
    let web0 = report.nodes[0]
        .pods
        .iter()
        .find(|p| p.pod.name == "web-0")
        .unwrap();
    assert!(matches!(&web0.blocker, Some(Blocker::Pdb { name, .. }) if name == "web"));

    // The default policy: the not-Ready pod waits with the others.
    let mut sim = Setup::new(pods()).pdb("web", "web", 2).start();
    sim.run(t(700));
    assert!(sim.stopped_at().is_empty());
    assert!(
        sim.log
            .iter()
            .all(|(_, a)| !matches!(a, Action::Evict { .. }))
    );
}

#[test]
fn a_pod_that_turns_not_ready_is_looked_at_again_at_once() {
    let mut setup = Setup::new(vec![app_pod("web-0", "web", 5), app_pod("web-1", "web", 5)])
        .pdb("web", "web", 2);
    setup.always_allow.push("web");
    let mut sim = setup.start();
    sim.run(t(5));
    assert!(sim.stopped_at().is_empty(), "both Ready, budget spent");
    let sick = not_ready(sim.cluster.pods["web-1"].pod.clone());
    sim.cluster.pods.get_mut("web-1").unwrap().pod = sick.clone();
    sim.now = t(6);
    let node = sim.node;
    sim.feed(Input::NodePods {
        node,
        event: WatchEvent::Apply(sick),
    });
    sim.run(t(6));
    assert_eq!(
        sim.stopped_at().get("web-1"),
        Some(&t(6)),
        "not at the next backoff"
    );
}

// ---------------------------------------------------------------------------------------------
// Surge
// ---------------------------------------------------------------------------------------------

fn surge_setup() -> Setup {
    let old = ready(
        PodBuilder::new(NS, "web-old")
            .label("app", "web")
            .label(surge::POD_TEMPLATE_HASH, "old")
            .controller("ReplicaSet", "web-old-rs")
            .annotation(names::ANNOTATION_STRATEGY, "surge")
            .grace(5)
            .build(),
    );
    let mut setup = Setup::new(vec![old]).pdb("web", "web", 1);
    setup.owners.insert(NS, "web-old-rs", "web");
    setup.owners.set_replicas(NS, "web-old-rs", 1);
    setup
}

fn replacement(ready_now: bool) -> Pod {
    let mut pod = PodBuilder::new(NS, "web-new")
        .label("app", "web")
        .label(surge::POD_TEMPLATE_HASH, "new")
        .controller("ReplicaSet", "web-new-rs")
        .build();
    pod.spec.get_or_insert_with(Default::default).node_name = Some("ip-10-0-0-2".to_string());
    if ready_now { ready_elsewhere(pod) } else { pod }
}

fn ready_elsewhere(pod: Pod) -> Pod {
    let mut pod = ready(pod);
    pod.spec.as_mut().unwrap().node_name = Some("ip-10-0-0-2".to_string());
    pod
}

fn surge_of(sim: &Sim) -> SurgeId {
    sim.log
        .iter()
        .find_map(|(_, a)| match a {
            Action::WatchSurgePods { surge, .. } => Some(*surge),
            _ => None,
        })
        .expect("the surge's pods are watched")
}

#[test]
fn a_surge_evicts_the_old_pod_only_once_a_replacement_is_ready_elsewhere() {
    let mut sim = surge_setup().start();
    sim.run(t(1));
    let surge = surge_of(&sim);
    let old = sim.cluster.pods["web-old"].pod.clone();
    sim.feed(Input::SurgePods {
        surge,
        event: WatchEvent::Apply(old),
    });
    sim.feed(Input::SurgePods {
        surge,
        event: WatchEvent::Apply(replacement(false)),
    });
    sim.run(t(30));
    assert!(sim.stopped_at().is_empty(), "no Ready replacement yet");
    // The replacement counts towards the PDB once Ready: the model adds it.
    let new = replacement(true);
    sim.cluster.pods.insert(
        "web-new".to_string(),
        ModelPod {
            pod: new.clone(),
            app: "web".to_string(),
            gone_at: None,
        },
    );
    sim.publish_pdbs("web", true);
    sim.feed(Input::SurgePods {
        surge,
        event: WatchEvent::Apply(new),
    });
    sim.run(t(31));
    assert_eq!(sim.stopped_at()["web-old"], t(30));
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// A node of pods of a few apps, each app with or without a PDB.
fn cluster_strategy() -> impl proptest::strategy::Strategy<Value = (Vec<Pod>, Vec<(usize, i32)>)> {
    (1usize..4, 1usize..5, 0i64..60).prop_flat_map(|(apps, per_app, grace)| {
        let pods: Vec<Pod> = (0..apps)
            .flat_map(|a| {
                (0..per_app).map(move |i| {
                    app_pod(
                        &format!("app{a}-{i}"),
                        &format!("app{a}"),
                        grace + a as i64 * 7,
                    )
                })
            })
            .collect();
        let pdbs = proptest::collection::vec((0..apps, 0..=per_app as i32), 0..=apps);
        (Just(pods), pdbs)
    })
}

const APPS: [&str; 4] = ["app0", "app1", "app2", "app3"];

fn setup_from(pods: Vec<Pod>, pdbs: &[(usize, i32)]) -> Setup {
    let mut setup = Setup::new(pods);
    let mut seen = BTreeSet::new();
    for &(app, min) in pdbs {
        // One PDB per app: several are a case of their own (the Eviction API refuses them).
        if seen.insert(app) {
            setup = setup.pdb(APPS[app], APPS[app], min);
        }
    }
    setup
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_voluntary_drain_never_deletes_a_pod_past_a_pdb(
        (pods, pdbs) in cluster_strategy(),
        latency_ms in 0u64..2000,
    ) {
        let mut sim = setup_from(pods, &pdbs).start();
        sim.latency = Duration::from_millis(latency_ms);
        sim.run(t(700));
        prop_assert!(sim.deletes().is_empty());
        prop_assert!(sim.finished.is_some(), "the timeout ends it");
    }

    #[test]
    fn evictions_in_flight_never_exceed_what_the_status_allows(
        (pods, pdbs) in cluster_strategy(),
        latency_ms in 0u64..3000,
        per_pdb in 1usize..4,
    ) {
        let mut setup = setup_from(pods, &pdbs);
        setup.config.evictions_per_pdb = per_pdb;
        let mut sim = setup.start();
        sim.latency = Duration::from_millis(latency_ms);
        sim.invariant = |sim| {
            for (pdb, pods) in &sim.unreflected {
                let allowed = sim.told_allowed.get(pdb).copied().unwrap_or(0);
                assert!(
                    pods.len() as i32 <= allowed.max(0),
                    "PDB {pdb}: {} evictions not in its status, which allows {allowed}",
                    pods.len()
                );
            }
        };
        sim.run(t(700));
    }

    #[test]
    fn with_a_deadline_every_pod_is_asked_to_stop_by_its_latest_start(
        (pods, pdbs) in cluster_strategy(),
        deadline in 30i64..240,
        latency_ms in 0u64..500,
        // Every pod behind a load balancer with this delay, which may never drain.
        lb in proptest::option::of((0u64..400, proptest::bool::ANY)),
    ) {
        let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        let mut setup = setup_from(pods, &pdbs).involuntary(t(deadline));
        if let Some((delay, responsive)) = lb {
            for name in &names {
                setup = setup.target(name, delay);
            }
            setup.lb_responsive = responsive;
        }
        let mut sim = setup.start();
        sim.latency = Duration::from_millis(latency_ms);
        sim.run(t(deadline + 60));
        let stopped = sim.stopped_at();
        let latency = jiff::SignedDuration::try_from(Duration::from_millis(latency_ms)).unwrap();
        for step in &sim.plan.steps {
            let latest = step.latest_start.expect("involuntary steps have a latest start");
            let at = stopped.get(&step.name);
            // A request sent at the latest start is answered `latency` later.
            prop_assert!(
                at.is_some_and(|at| *at <= latest.max(t(0)) + latency + latency),
                "{} asked at {:?}, latest start {latest}", step.name, at
            );
        }
    }

    #[test]
    fn a_tier_starts_only_after_the_earlier_one_is_gone(
        orders in proptest::collection::vec(-2i32..3, 1..8),
        graces in proptest::collection::vec(1i64..40, 8),
    ) {
        let pods: Vec<Pod> = orders
            .iter()
            .enumerate()
            .map(|(i, order)| {
                let mut pod = app_pod(&format!("p{i}"), &format!("a{i}"), graces[i]);
                pod.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(names::ANNOTATION_ORDER.to_string(), order.to_string());
                pod
            })
            .collect();
        let mut sim = Setup::new(pods).start();
        sim.invariant = |sim| {
            let Some(run) = sim.machine.nodes.get(&sim.node) else { return };
            for wave in run.plan.waves.iter() {
                for i in wave.steps.clone() {
                    if matches!(run.steps[i].phase, StepPhase::NotStarted) {
                        continue;
                    }
                    for earlier in run.plan.waves.iter().take_while(|w| w.steps != wave.steps) {
                        for j in earlier.steps.clone() {
                            assert!(
                                run.steps[j].is_gone(),
                                "{} started before {} was gone",
                                run.steps[i].key, run.steps[j].key
                            );
                        }
                    }
                }
            }
        };
        sim.run(t(700));
        prop_assert_eq!(sim.report().outcome, DrainOutcome::Drained);
    }

    #[test]
    fn a_surge_never_stops_the_last_ready_pod_while_a_replacement_can_come(
        ready_after in 0i64..120,
        latency_ms in 0u64..1000,
    ) {
        let mut sim = surge_setup().start();
        sim.latency = Duration::from_millis(latency_ms);
        sim.run(t(2));
        let surge = surge_of(&sim);
        sim.feed(Input::SurgePods { surge, event: WatchEvent::Init });
        let old = sim.cluster.pods["web-old"].pod.clone();
        sim.feed(Input::SurgePods { surge, event: WatchEvent::InitApply(old) });
        sim.feed(Input::SurgePods { surge, event: WatchEvent::InitApply(replacement(false)) });
        sim.feed(Input::SurgePods { surge, event: WatchEvent::InitDone });
        let ready_at = t(2 + ready_after);
        sim.run(ready_at);
        prop_assert!(sim.stopped_at().is_empty(), "stopped before its replacement was Ready");
        let new = replacement(true);
        sim.cluster.pods.insert("web-new".to_string(), ModelPod {
            pod: new.clone(),
            app: "web".to_string(),
            gone_at: None,
        });
        sim.publish_pdbs("web", true);
        sim.feed(Input::SurgePods { surge, event: WatchEvent::Apply(new) });
        sim.run(t(700));
        prop_assert_eq!(sim.report().outcome, DrainOutcome::Drained);
        prop_assert!(sim.stopped_at()["web-old"] >= ready_at);
    }

    #[test]
    fn a_held_pod_is_left_alone_until_its_hold_ends_and_no_longer(
        holds in proptest::collection::vec((proptest::option::of(1i64..900), 0i64..900), 1..6),
        latency_ms in 0u64..2000,
    ) {
        // Each pod its own app without a PDB, so nothing but the hold can delay it.
        let pods: Vec<Pod> = holds
            .iter()
            .enumerate()
            .map(|(i, (hold, age))| match hold {
                Some(secs) => held_pod(&format!("p{i}"), &format!("a{i}"), &format!("{secs}s"), t(-age)),
                None => app_pod(&format!("p{i}"), &format!("a{i}"), 5),
            })
            .collect();
        let mut setup = Setup::new(pods);
        setup.timeout = Some(Duration::from_secs(3600));
        let mut sim = setup.start();
        sim.latency = Duration::from_millis(latency_ms);
        sim.run(t(3600));
        prop_assert_eq!(sim.report().outcome, DrainOutcome::Drained);
        let stopped = sim.stopped_at();
        let latency = jiff::SignedDuration::try_from(Duration::from_millis(latency_ms)).unwrap();
        for (i, (hold, age)) in holds.iter().enumerate() {
            let until = match hold {
                Some(secs) => t(secs - age).max(t(0)),
                None => t(0),
            };
            let at = stopped[&format!("p{i}")];
            // The eviction is sent at `until` and accepted `latency` later.
            prop_assert!(at >= until, "p{} stopped at {} before its hold ended at {}", i, at, until);
            prop_assert!(at <= until + latency, "p{} stopped at {}, its hold ended at {}", i, at, until);
        }
    }

    #[test]
    fn any_interleaving_ends_with_every_pod_gone_or_blocked_by_something_real(
        (pods, pdbs) in cluster_strategy(),
        answers in proptest::collection::vec(0u8..6, 0..40),
        deadline in proptest::option::of(30i64..300),
    ) {
        let mut setup = setup_from(pods, &pdbs);
        if let Some(d) = deadline {
            setup = setup.involuntary(t(d));
        }
        let mut sim = setup.start();
        let mut answers = VecDeque::from(answers);
        // Requests are answered by the model, or by a scripted trouble in their place.
        let mut guard = 0;
        while sim.finished.is_none() && guard < 20_000 {
            guard += 1;
            if !sim.held.is_empty() {
                let held = sim.held.remove(0);
                match (answers.pop_front(), held.action.clone()) {
                    (Some(0), Action::Evict { step, grace, .. }) => sim.feed(Input::Evicted {
                        step, grace, result: Ok(EvictOutcome::Throttled {
                            retry_after: Some(Duration::from_secs(1)),
                            message: "slow down".to_string(),
                        }),
                    }),
                    (Some(1), Action::Evict { step, grace, pod, .. }) => {
                        sim.forget_unreflected(&pod.name);
                        sim.feed(Input::Evicted {
                            step, grace, result: Err(Failure {
                                message: "connection reset".to_string(),
                                forbidden: false,
                            }),
                        })
                    }
                    (Some(2), Action::Delete { step, grace, .. }) => sim.feed(Input::Deleted {
                        step, grace, result: Err(Failure {
                            message: "etcdserver: request timed out".to_string(),
                            forbidden: false,
                        }),
                    }),
                    (Some(3), _) => {
                        // Someone else deletes a pod meanwhile.
                        let victim = sim.cluster.pods.keys().next().cloned();
                        sim.held.insert(0, held);
                        if let Some(victim) = victim {
                            sim.stop_pod(&victim, 3);
                        }
                    }
                    (_, action) => sim.answer(action),
                }
                continue;
            }
            let before = sim.now;
            sim.run(sim.now);
            if sim.finished.is_none() && sim.held.is_empty() {
                sim.now = before + jiff::SignedDuration::from_secs(1);
                sim.feed(Input::Tick);
            }
        }
        let report = sim.report();
        let pdb_names: Vec<&str> = sim.cluster.pdbs.iter().map(|p| p.name.as_str()).collect();
        for pod in &report.nodes[0].pods {
            prop_assert_eq!(pod.gone, pod.gone_after.is_some());
            match &pod.blocker {
                None => prop_assert!(pod.gone, "{} neither gone nor blocked", pod.pod),
                Some(Blocker::Pdb { name, .. }) => {
                    prop_assert!(pdb_names.contains(&name.as_str()), "unknown PDB {}", name);
                    // The PDB of the pod's own app.
                    prop_assert_eq!(name.as_str(), pod.pod.name.split('-').next().unwrap());
                }
                Some(_) => prop_assert!(!pod.gone),
            }
        }
        if deadline.is_none() {
            prop_assert!(sim.deletes().is_empty(), "a voluntary drain deleted a pod");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load balancers
// ---------------------------------------------------------------------------------------------

fn evicted_at(sim: &Sim, name: &str) -> Option<Timestamp> {
    sim.first(
        |a| matches!(a, Action::Evict { pod, .. } | Action::Delete { pod, .. } if pod.name == name),
    )
}

fn deregistered_at(sim: &Sim, name: &str) -> Option<Timestamp> {
    let target = ip_target(name);
    sim.first(
        |a| matches!(a, Action::DeregisterTargets { targets, .. } if targets.contains(&target)),
    )
}

fn cuts(sim: &Sim) -> Vec<(String, LoadBalancerCut)> {
    sim.log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Progress {
                event:
                    ProgressEvent::Pod {
                        pod,
                        change: PodChange::LoadBalancerWaitCut { reason, .. },
                        ..
                    },
                ..
            } => Some((pod.name.clone(), *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_pod_behind_a_load_balancer_is_evicted_only_once_its_target_drains() {
    let mut sim = Setup::new(vec![
        app_pod("web", "web", 5),
        app_pod("worker", "worker", 5),
    ])
    .target("web", 300)
    .start();
    sim.run(t(600));
    assert_eq!(sim.report().outcome, DrainOutcome::Drained);
    // The pod without a target is not held back.
    assert_eq!(evicted_at(&sim, "worker"), Some(t(0)));
    let position = |f: &dyn Fn(&Action) -> bool| sim.log.iter().position(|(_, a)| f(a));
    let deregistered = position(&|a| matches!(a, Action::DeregisterTargets { .. }))
        .expect("its IP target is deregistered");
    let evicted = position(&|a| matches!(a, Action::Evict { pod, .. } if pod.name == "web"))
        .expect("evicted");
    let asked = position(&|a| matches!(a, Action::DescribeTargetHealth { .. })).unwrap();
    // Deregistered first, then asked, then evicted: the answer that shows it draining frees it,
    // long before the 300 s delay.
    assert!(deregistered < asked && asked < evicted);
    assert!(evicted_at(&sim, "web").unwrap() < t(10));
    assert!(cuts(&sim).is_empty(), "nothing was cut short");
}

#[test]
fn a_target_that_never_drains_ends_its_wait_at_the_delay_and_says_so() {
    let mut setup = Setup::new(vec![app_pod("web", "web", 5)]).target("web", 30);
    setup.lb_responsive = false;
    let mut sim = setup.start();
    sim.run(t(600));
    assert_eq!(sim.report().outcome, DrainOutcome::Drained);
    let evicted = evicted_at(&sim, "web").unwrap();
    assert!(evicted >= t(30) && evicted < t(33), "evicted at {evicted}");
    assert_eq!(
        cuts(&sim),
        vec![("web".to_string(), LoadBalancerCut::DelayElapsed)]
    );
    assert!(blockers_of(&sim, "web").iter().any(|(_, b)| matches!(
        b,
        Blocker::LoadBalancer { state, group, .. } if state == "healthy" && group == "web"
    )));
    assert!(sim.log.iter().any(|(_, a)| matches!(
        a,
        Action::Publish { event, .. } if event.reason == names::reasons::LOAD_BALANCER_WAIT_CUT
    )));
}

#[test]
fn the_deadline_cuts_a_wait_that_does_not_fit_at_the_pods_latest_start() {
    let mut setup = Setup::new(vec![app_pod("web", "web", 5)])
        .target("web", 300)
        .involuntary(t(100));
    setup.lb_responsive = false;
    let mut sim = setup.start();
    sim.run(t(600));
    let latest = sim.plan.steps[0].latest_start.unwrap();
    let evicted = evicted_at(&sim, "web").unwrap();
    assert!(evicted >= latest && evicted < after(latest, Duration::from_secs(1)));
    assert_eq!(
        cuts(&sim),
        vec![("web".to_string(), LoadBalancerCut::Deadline)]
    );
}

#[test]
fn a_deregistration_spends_the_budget_so_no_more_targets_leave_than_it_allows() {
    // minAvailable 2 of 3 allows one disruption. Deregistering a second pod while the first
    // waits would take two backends out of the load balancer: the wait holds the budget.
    let mut setup = Setup::new(vec![
        app_pod("web-a", "web", 5),
        app_pod("web-b", "web", 5),
        app_pod("web-c", "web", 5),
    ])
    .pdb("web", "web", 2)
    .target("web-a", 300)
    .target("web-b", 300)
    .target("web-c", 300);
    setup.latency = Duration::from_secs(1);
    // Two requests in flight per PDB are allowed, so only the budget can hold the second.
    setup.config.evictions_per_pdb = 2;
    let mut sim = setup.start();
    sim.run(t(60));
    let deregistered: Vec<&str> = ["web-a", "web-b", "web-c"]
        .into_iter()
        .filter(|p| deregistered_at(&sim, p).is_some())
        .collect();
    assert_eq!(deregistered.len(), 1, "deregistered: {deregistered:?}");
    assert!(evicted_at(&sim, deregistered[0]).is_some());
}

#[test]
fn a_surge_replacement_must_be_healthy_in_the_old_pods_target_group_not_only_ready() {
    let mut sim = surge_setup().target("web-old", 300).start();
    sim.run(t(1));
    let surge = surge_of(&sim);
    let mut new = replacement(true);
    new.status.get_or_insert_with(Default::default).pod_ip = Some(ip_target("web-new").id);
    sim.cluster.pods.insert(
        "web-new".to_string(),
        ModelPod {
            pod: new.clone(),
            app: "web".to_string(),
            gone_at: None,
        },
    );
    sim.publish_pdbs("web", true);
    sim.feed(Input::SurgePods {
        surge,
        event: WatchEvent::Apply(new),
    });
    // Ready, but the load balancer has not registered it yet, then sees it only `initial`.
    sim.run(t(20));
    sim.targets
        .insert(ip_target("web-new"), (TargetState::Initial, None));
    sim.run(t(40));
    assert!(
        deregistered_at(&sim, "web-old").is_none() && evicted_at(&sim, "web-old").is_none(),
        "the old pod stays in service until its replacement serves"
    );
    sim.targets
        .insert(ip_target("web-new"), (TargetState::Healthy, None));
    sim.run(t(60));
    let healthy_seen = deregistered_at(&sim, "web-old").expect("deregistered once it serves");
    assert!(
        healthy_seen >= t(40) && healthy_seen <= t(43),
        "at {healthy_seen}"
    );
    assert!(evicted_at(&sim, "web-old").is_some_and(|e| e >= healthy_seen));
}

#[test]
fn a_successful_deregistration_frees_the_pod_before_a_controller_can_register_it_again() {
    // The AWS Load Balancer Controller registers a Ready pod's IP again on its next reconcile;
    // every DescribeTargetHealth after the deregistration shows it `initial`. ELBv2's answer to
    // DeregisterTargets says it is draining now: that is the moment to stop the pod.
    let mut setup = Setup::new(vec![app_pod("web", "web", 5)]).target("web", 300);
    setup.latency = Duration::from_millis(500);
    let mut sim = setup.start();
    sim.lb_reregisters = true;
    sim.run(t(600));
    assert_eq!(sim.report().outcome, DrainOutcome::Drained);
    let evicted = evicted_at(&sim, "web").unwrap();
    assert!(
        evicted <= t(1),
        "evicted at {evicted}, not after the 300 s delay"
    );
    assert!(cuts(&sim).is_empty(), "nothing was cut short");
}
