//! Each finding on hand-built objects: the case that must be reported and the nearby one that
//! must not.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use super::checks::disruptions_allowed;
use super::*;
use crate::drain::policy::parse_label_selector;

const NS: &str = "shop";

fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

/// A pod template for `app` with one serving container (port, readiness probe 5 s × 3, preStop
/// sleep 20 s), grace 30 s: the well-behaved case. Tests change what they need.
fn template(app: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": app}, "annotations": {}},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": app,
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080},
                                   "periodSeconds": 5, "failureThreshold": 3},
                "lifecycle": {"preStop": {"sleep": {"seconds": 20}}},
            }],
        },
    })
}

fn annotate(mut template: Value, key: &str, value: &str) -> Value {
    template["metadata"]["annotations"][key] = json!(value);
    template
}

fn deployment(name: &str, replicas: i32, template: Value) -> Deployment {
    from(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": template},
    }))
}

fn stateful_set(name: &str, replicas: i32, template: Value) -> StatefulSet {
    from(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": replicas, "serviceName": name,
                 "selector": {"matchLabels": {"app": name}}, "template": template},
    }))
}

fn pdb(name: &str, app: &str, budget: Value) -> PodDisruptionBudget {
    let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
    for (k, v) in budget.as_object().unwrap() {
        spec[k] = v.clone();
    }
    from(json!({"metadata": {"name": name, "namespace": NS}, "spec": spec}))
}

fn service(name: &str, app: &str) -> Service {
    from(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80}]},
    }))
}

fn node(name: &str, capacity: &str) -> Node {
    from(json!({"metadata": {"name": name, "labels": {"karpenter.sh/capacity-type": capacity}}}))
}

/// Live pods of a Deployment (through its ReplicaSet) on `node`.
fn run_pods(inventory: &mut Inventory, deployment: &str, count: usize, node: &str) {
    let rs = format!("{deployment}-rs");
    inventory.replica_sets.push(from(json!({
        "metadata": {"name": rs, "namespace": NS, "ownerReferences": [{"apiVersion": "apps/v1",
            "kind": "Deployment", "name": deployment, "uid": "u", "controller": true}]},
        "spec": {"replicas": count, "selector": {}, "template": template(deployment)},
    })));
    for i in 0..count {
        let mut pod = template(deployment);
        pod["metadata"]["name"] = json!(format!("{rs}-{i}"));
        pod["metadata"]["namespace"] = json!(NS);
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
            "kind": "ReplicaSet", "name": rs, "uid": "u", "controller": true}]);
        pod["spec"]["nodeName"] = json!(node);
        pod["status"] = json!({"phase": "Running"});
        inventory.pods.push(from(pod));
    }
}

fn inventory() -> Inventory {
    Inventory {
        scope: AuditScope {
            namespace: Some(NS.to_string()),
        },
        ..Default::default()
    }
}

fn run(inventory: &Inventory) -> Report {
    audit(inventory, &AuditConfig::default())
}

/// The findings of one workload (`Kind/name`), as (id, severity).
fn of(report: &Report, workload: &str) -> Vec<(&'static str, Severity)> {
    let (kind, name) = workload.split_once('/').unwrap();
    report
        .workloads
        .iter()
        .find(|w| w.kind == kind && w.name == name)
        .unwrap_or_else(|| panic!("{workload} not in the report: {report:#?}"))
        .findings
        .iter()
        .map(|f| (f.id.as_str(), f.severity))
        .collect()
}

fn ids(report: &Report, workload: &str) -> BTreeSet<&'static str> {
    of(report, workload).into_iter().map(|(id, _)| id).collect()
}

fn has(report: &Report, workload: &str, id: FindingId) -> bool {
    ids(report, workload).contains(id.as_str())
}

fn finding<'r>(report: &'r Report, workload: &str, id: FindingId) -> &'r Finding {
    let (kind, name) = workload.split_once('/').unwrap();
    report
        .workloads
        .iter()
        .find(|w| w.kind == kind && w.name == name)
        .and_then(|w| w.findings.iter().find(|f| f.id == id))
        .unwrap_or_else(|| panic!("{workload} has no {id}: {report:#?}"))
}

// --- PodDisruptionBudgets ---

#[test]
fn disruption_arithmetic_matches_the_disruption_controller() {
    let budget = |b: Value| pdb("b", "x", b);
    let allowed = |b: Value, n: i32| disruptions_allowed(&budget(b), n, n);
    assert_eq!(allowed(json!({"minAvailable": 1}), 1), Some(0));
    assert_eq!(allowed(json!({"minAvailable": 1}), 2), Some(1));
    assert_eq!(allowed(json!({"minAvailable": 3}), 2), Some(0));
    assert_eq!(allowed(json!({"minAvailable": "50%"}), 2), Some(1));
    assert_eq!(
        allowed(json!({"minAvailable": "60%"}), 2),
        Some(0),
        "rounds up"
    );
    assert_eq!(allowed(json!({"minAvailable": "100%"}), 5), Some(0));
    assert_eq!(allowed(json!({"maxUnavailable": 0}), 5), Some(0));
    assert_eq!(allowed(json!({"maxUnavailable": "0%"}), 5), Some(0));
    assert_eq!(
        allowed(json!({"maxUnavailable": "10%"}), 5),
        Some(1),
        "rounds up"
    );
    assert_eq!(allowed(json!({"maxUnavailable": 1}), 1), Some(1));
    assert_eq!(
        allowed(json!({}), 3),
        Some(3),
        "no budget allows everything"
    );
    assert_eq!(allowed(json!({"minAvailable": "lots"}), 3), None);
    assert_eq!(
        disruptions_allowed(&budget(json!({"maxUnavailable": 1})), 3, 2),
        Some(0),
        "an unhealthy pod uses up the budget"
    );
}

#[test]
fn pdb_blocking_all_disruptions_at_the_replica_count() {
    let mut inv = inventory();
    for (name, replicas, budget) in [
        ("single-min1", 1, json!({"minAvailable": 1})),
        ("pair-max0", 2, json!({"maxUnavailable": 0})),
        ("trio-min100", 3, json!({"minAvailable": "100%"})),
        ("trio-min3", 3, json!({"minAvailable": 3})),
        ("pair-min60", 2, json!({"minAvailable": "60%"})),
        // Negatives: each allows one disruption.
        ("trio-min2", 3, json!({"minAvailable": 2})),
        ("pair-min50", 2, json!({"minAvailable": "50%"})),
        ("pair-max1", 2, json!({"maxUnavailable": 1})),
    ] {
        inv.deployments
            .push(deployment(name, replicas, template(name)));
        inv.pdbs.push(pdb(name, name, budget));
    }
    let report = run(&inv);
    for blocked in [
        "single-min1",
        "pair-max0",
        "trio-min100",
        "trio-min3",
        "pair-min60",
    ] {
        let f = finding(
            &report,
            &format!("Deployment/{blocked}"),
            FindingId::PdbBlocksAllDisruptions,
        );
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("allows 0 disruptions"), "{}", f.message);
    }
    for fine in ["trio-min2", "pair-min50", "pair-max1"] {
        assert!(
            !has(
                &report,
                &format!("Deployment/{fine}"),
                FindingId::PdbBlocksAllDisruptions
            ),
            "{fine}"
        );
    }
    assert!(
        finding(
            &report,
            "Deployment/single-min1",
            FindingId::PdbBlocksAllDisruptions
        )
        .fix
        .contains("nodedrain.io/strategy: surge")
    );
    assert_eq!(
        finding(
            &report,
            "Deployment/pair-max0",
            FindingId::PdbBlocksAllDisruptions
        )
        .fix,
        "set maxUnavailable: 1 on PDB pair-max0"
    );
    assert!(
        finding(
            &report,
            "Deployment/trio-min3",
            FindingId::PdbBlocksAllDisruptions
        )
        .fix
        .contains("lower minAvailable to 2")
    );
}

#[test]
fn surge_lifts_min_available_but_not_a_zero_budget() {
    let mut inv = inventory();
    let surge = |app: &str| annotate(template(app), "nodedrain.io/strategy", "surge");
    inv.deployments
        .push(deployment("checkout", 1, surge("checkout")));
    inv.pdbs
        .push(pdb("checkout", "checkout", json!({"minAvailable": 1})));
    inv.deployments
        .push(deployment("frozen", 1, surge("frozen")));
    inv.pdbs
        .push(pdb("frozen", "frozen", json!({"maxUnavailable": 0})));
    inv.deployments
        .push(deployment("greedy", 1, surge("greedy")));
    inv.pdbs
        .push(pdb("greedy", "greedy", json!({"minAvailable": 3})));
    let report = run(&inv);
    assert!(
        ids(&report, "Deployment/checkout").is_empty(),
        "{report:#?}"
    );
    assert!(has(
        &report,
        "Deployment/frozen",
        FindingId::PdbBlocksAllDisruptions
    ));
    assert!(
        has(
            &report,
            "Deployment/greedy",
            FindingId::PdbBlocksAllDisruptions
        ),
        "one extra replica is not enough for minAvailable 3"
    );
}

#[test]
fn strategies_that_do_not_evict_are_not_blocked_by_pdbs() {
    let mut inv = inventory();
    for (name, strategy) in [
        ("deleted", "delete"),
        ("waited", "wait"),
        ("skipped", "skip"),
    ] {
        inv.deployments.push(deployment(
            name,
            2,
            annotate(template(name), "nodedrain.io/strategy", strategy),
        ));
        inv.pdbs.push(pdb(name, name, json!({"maxUnavailable": 0})));
        inv.pdbs.push(pdb(
            &format!("{name}-2"),
            name,
            json!({"maxUnavailable": 0}),
        ));
    }
    let report = run(&inv);
    for name in ["deleted", "waited", "skipped"] {
        assert!(
            ids(&report, &format!("Deployment/{name}")).is_empty(),
            "{name}: {report:#?}"
        );
    }
}

#[test]
fn pods_selected_by_two_pdbs() {
    let mut inv = inventory();
    inv.deployments
        .push(deployment("cache", 3, template("cache")));
    inv.pdbs
        .push(pdb("cache", "cache", json!({"maxUnavailable": 1})));
    inv.pdbs
        .push(pdb("cache-extra", "cache", json!({"maxUnavailable": 1})));
    inv.deployments.push(deployment("web", 3, template("web")));
    inv.pdbs
        .push(pdb("web", "web", json!({"maxUnavailable": 1})));
    run_pods(&mut inv, "cache", 3, "n1");
    let report = run(&inv);
    let f = finding(&report, "Deployment/cache", FindingId::MultiplePdbs);
    assert_eq!(f.severity, Severity::Error);
    assert!(
        f.message
            .contains("3 of its 3 pods (cache-rs-0, cache-rs-1, cache-rs-2) are"),
        "{}",
        f.message
    );
    assert!(f.message.contains("cache, cache-extra"), "{}", f.message);
    assert!(!has(&report, "Deployment/web", FindingId::MultiplePdbs));
}

#[test]
fn pdbs_that_select_nothing() {
    let mut inv = inventory();
    inv.deployments.push(deployment("web", 0, template("web")));
    inv.pdbs
        .push(pdb("web", "web", json!({"maxUnavailable": 1})));
    inv.pdbs
        .push(pdb("typo", "wbe", json!({"maxUnavailable": 1})));
    inv.pdbs
        .push(from(json!({"metadata": {"name": "null", "namespace": NS},
                              "spec": {"maxUnavailable": 1}})));
    let report = run(&inv);
    let typo = finding(
        &report,
        "PodDisruptionBudget/typo",
        FindingId::PdbSelectsNothing,
    );
    assert_eq!(typo.severity, Severity::Warning);
    assert!(typo.message.contains("app=wbe"), "{}", typo.message);
    assert!(has(
        &report,
        "PodDisruptionBudget/null",
        FindingId::PdbSelectsNothing
    ));
    assert!(
        !report
            .workloads
            .iter()
            .any(|w| w.name == "web" && w.kind == "PodDisruptionBudget"),
        "a PDB of a workload scaled to zero still matches its template"
    );
    assert!(
        ids(&report, "Deployment/web").is_empty(),
        "scaled to zero: nothing to drain"
    );
}

#[test]
fn replicated_workloads_on_spot_without_a_pdb() {
    let spot_inventory = |nodes: Vec<Node>| {
        let mut inv = inventory();
        inv.nodes = nodes;
        inv.deployments
            .push(deployment("thumbnailer", 2, template("thumbnailer")));
        inv.deployments.push(deployment("web", 2, template("web")));
        inv.pdbs
            .push(pdb("web", "web", json!({"maxUnavailable": 1})));
        inv.deployments
            .push(deployment("single", 1, template("single")));
        inv.deployments.push(deployment("pinned", 2, {
            let mut t = template("pinned");
            t["spec"]["nodeSelector"] = json!({"karpenter.sh/capacity-type": "on-demand"});
            t
        }));
        inv
    };
    let report = run(&spot_inventory(vec![
        node("s1", "spot"),
        node("o1", "on-demand"),
    ]));
    let f = finding(&report, "Deployment/thumbnailer", FindingId::NoPdbOnSpot);
    assert_eq!(f.severity, Severity::Warning);
    assert!(
        f.message.contains("can be scheduled on 1 spot node"),
        "{}",
        f.message
    );
    assert!(f.fix.contains("{app: thumbnailer}"), "{}", f.fix);
    assert!(
        !has(&report, "Deployment/web", FindingId::NoPdbOnSpot),
        "has a PDB"
    );
    assert!(
        !has(&report, "Deployment/single", FindingId::NoPdbOnSpot),
        "one replica"
    );
    assert!(
        !has(&report, "Deployment/pinned", FindingId::NoPdbOnSpot),
        "nodeSelector"
    );

    let report = run(&spot_inventory(vec![node("o1", "on-demand")]));
    assert!(
        !has(&report, "Deployment/thumbnailer", FindingId::NoPdbOnSpot),
        "no spot nodes"
    );

    let mut tainted = node("s1", "spot");
    tainted.spec = Some(from(
        json!({"taints": [{"key": "spot", "effect": "NoSchedule"}]}),
    ));
    let report = run(&spot_inventory(vec![tainted]));
    assert!(
        !has(&report, "Deployment/thumbnailer", FindingId::NoPdbOnSpot),
        "taint"
    );

    // Where the pods run now counts even when the template would not go there any more.
    let mut inv = spot_inventory(vec![node("s1", "spot")]);
    run_pods(&mut inv, "pinned", 2, "s1");
    let report = run(&inv);
    let f = finding(&report, "Deployment/pinned", FindingId::NoPdbOnSpot);
    assert!(f.message.contains("(2 of 2)"), "{}", f.message);
}

// --- Replicas and strategies ---

#[test]
fn single_replicas_without_surge() {
    let mut inv = inventory();
    inv.deployments
        .push(deployment("ledger", 1, template("ledger")));
    inv.deployments
        .push(deployment("front", 1, template("front")));
    inv.services.push(service("front", "front"));
    inv.deployments.push(deployment(
        "checkout",
        1,
        annotate(template("checkout"), "nodedrain.io/strategy", "surge"),
    ));
    inv.deployments
        .push(deployment("pair", 2, template("pair")));
    inv.stateful_sets
        .push(stateful_set("db", 1, template("db")));
    let report = run(&inv);
    assert_eq!(
        of(&report, "Deployment/ledger"),
        [("single-replica-without-surge", Severity::Warning)]
    );
    let front = finding(
        &report,
        "Deployment/front",
        FindingId::SingleReplicaWithoutSurge,
    );
    assert_eq!(
        front.severity,
        Severity::Error,
        "behind a Service: requests fail"
    );
    assert!(front.message.contains("Service front"), "{}", front.message);
    assert!(ids(&report, "Deployment/checkout").is_empty());
    assert!(ids(&report, "Deployment/pair").is_empty());
    let db = finding(
        &report,
        "StatefulSet/db",
        FindingId::SingleReplicaWithoutSurge,
    );
    assert!(db.fix.contains("at least 2 replicas"), "{}", db.fix);
}

#[test]
fn the_cluster_policy_decides_like_the_planner() {
    let mut inv = inventory();
    inv.deployments
        .push(deployment("ledger", 1, template("ledger")));
    inv.jobs.push(from(json!({
        "metadata": {"name": "report", "namespace": NS},
        "spec": {"template": template("report")},
    })));
    let config = AuditConfig {
        policy: crate::drain::policy::ClusterPolicy::from_yaml(
            "rules:\n  - {selector: app=ledger, strategy: surge}\n  \
             - {selector: app=report, strategy: wait}\n",
        )
        .unwrap(),
        ..AuditConfig::default()
    };
    let report = audit(&inv, &config);
    assert!(ids(&report, "Deployment/ledger").is_empty(), "{report:#?}");
    assert!(ids(&report, "Job/report").is_empty(), "{report:#?}");
    assert_eq!(report.settings.policy_rules, 2);
}

#[test]
fn surge_on_something_else_than_a_deployment() {
    let mut inv = inventory();
    inv.stateful_sets.push(stateful_set(
        "db",
        2,
        annotate(template("db"), "nodedrain.io/strategy", "surge"),
    ));
    inv.deployments.push(deployment(
        "web",
        2,
        annotate(template("web"), "nodedrain.io/strategy", "surge"),
    ));
    let report = run(&inv);
    assert_eq!(
        of(&report, "StatefulSet/db"),
        [("surge-needs-deployment", Severity::Warning)]
    );
    assert!(ids(&report, "Deployment/web").is_empty());
}

// --- Grace periods ---

#[test]
fn grace_longer_than_the_spot_warning_allows() {
    let mut inv = inventory();
    for (name, grace) in [("encoder", 600), ("edge", 111), ("fits", 110)] {
        let mut t = template(name);
        t["spec"]["terminationGracePeriodSeconds"] = json!(grace);
        inv.deployments.push(deployment(name, 2, t));
    }
    let mut t = annotate(template("annotated"), "nodedrain.io/grace-period", "60");
    t["spec"]["terminationGracePeriodSeconds"] = json!(600);
    inv.deployments.push(deployment("annotated", 2, t));
    let report = run(&inv);
    let f = finding(
        &report,
        "Deployment/encoder",
        FindingId::GraceExceedsDeadline,
    );
    assert_eq!(f.severity, Severity::Error);
    assert!(f.message.contains("600 s"), "{}", f.message);
    assert!(f.message.contains("leaves 110 s"), "{}", f.message);
    assert!(has(
        &report,
        "Deployment/edge",
        FindingId::GraceExceedsDeadline
    ));
    assert!(!has(
        &report,
        "Deployment/fits",
        FindingId::GraceExceedsDeadline
    ));
    assert!(
        !has(
            &report,
            "Deployment/annotated",
            FindingId::GraceExceedsDeadline
        ),
        "nodedrain asks for the annotation's 60 s"
    );

    let config = AuditConfig {
        deadline: Some(Duration::from_secs(300)),
        ..AuditConfig::default()
    };
    let report = audit(&inv, &config);
    assert_eq!(report.settings.grace_limit_seconds, 290);
    assert!(has(
        &report,
        "Deployment/encoder",
        FindingId::GraceExceedsDeadline
    ));
    assert!(!has(
        &report,
        "Deployment/edge",
        FindingId::GraceExceedsDeadline
    ));
    assert!(
        finding(
            &report,
            "Deployment/encoder",
            FindingId::GraceExceedsDeadline
        )
        .message
        .contains("the 300 s deadline")
    );
}

// --- preStop behind Services ---

fn with_prestop(app: &str, prestop: Option<Value>) -> Value {
    let mut t = template(app);
    match prestop {
        Some(hook) => t["spec"]["containers"][0]["lifecycle"]["preStop"] = hook,
        None => {
            t["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("lifecycle");
        }
    }
    t
}

#[test]
fn prestop_hooks_of_pods_behind_services() {
    let mut inv = inventory();
    let cases = [
        ("none", None),
        ("short", Some(json!({"sleep": {"seconds": 10}}))),
        ("exact", Some(json!({"sleep": {"seconds": 15}}))),
        (
            "shell",
            Some(json!({"exec": {"command": ["sh", "-c", "sleep 20"]}})),
        ),
        (
            "http",
            Some(json!({"httpGet": {"path": "/drain", "port": 8080}})),
        ),
        (
            "partly",
            Some(json!({"exec": {"command": ["sh", "-c", "sleep 5 && nginx -s quit"]}})),
        ),
    ];
    for (name, hook) in cases.clone() {
        inv.deployments
            .push(deployment(name, 2, with_prestop(name, hook)));
        inv.services.push(service(name, name));
    }
    inv.deployments
        .push(deployment("internal", 2, with_prestop("internal", None)));
    let report = run(&inv);
    let none = finding(
        &report,
        "Deployment/none",
        FindingId::NoPrestopBehindService,
    );
    assert_eq!(none.severity, Severity::Error);
    assert!(none.message.contains("15 s (5 s × 3)"), "{}", none.message);
    assert!(none.fix.contains("sleep.seconds: 20"), "{}", none.fix);
    let short = finding(
        &report,
        "Deployment/short",
        FindingId::PrestopShorterThanReadinessWindow,
    );
    assert_eq!(short.severity, Severity::Warning);
    assert!(short.message.contains("lasts 10 s"), "{}", short.message);
    assert!(ids(&report, "Deployment/exact").is_empty());
    assert!(ids(&report, "Deployment/shell").is_empty());
    let http = finding(
        &report,
        "Deployment/http",
        FindingId::PrestopDurationUnknown,
    );
    assert_eq!(http.severity, Severity::Info);
    assert!(http.message.contains("/drain"), "{}", http.message);
    let partly = finding(
        &report,
        "Deployment/partly",
        FindingId::PrestopDurationUnknown,
    );
    assert!(
        partly.message.contains("nginx -s quit"),
        "{}",
        partly.message
    );
    assert!(ids(&report, "Deployment/internal").is_empty(), "no Service");
}

#[test]
fn only_serving_containers_need_a_prestop() {
    let mut inv = inventory();
    let mut t = template("web");
    t["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "log-shipper"}));
    inv.deployments.push(deployment("web", 2, t));
    inv.services.push(service("web", "web"));
    let mut t = with_prestop("bare", None);
    t["spec"]["containers"][0] = json!({"name": "bare"});
    inv.deployments.push(deployment("bare", 2, t));
    inv.services.push(service("bare", "bare"));
    let report = run(&inv);
    assert!(ids(&report, "Deployment/web").is_empty(), "{report:#?}");
    let f = finding(
        &report,
        "Deployment/bare",
        FindingId::NoPrestopBehindService,
    );
    assert!(
        f.message.contains("endpoints and load balancers"),
        "no readiness probe: {}",
        f.message
    );
}

// --- Pods, volumes, Jobs ---

#[test]
fn bare_pods() {
    let mut inv = inventory();
    let pod = |name: &str, phase: &str, annotations: Value| -> Pod {
        let mut p = template(name);
        p["metadata"]["name"] = json!(name);
        p["metadata"]["namespace"] = json!(NS);
        p["metadata"]["annotations"] = annotations;
        p["status"] = json!({"phase": phase});
        from(p)
    };
    inv.pods.push(pod("debug-shell", "Running", json!({})));
    inv.pods.push(pod("finished", "Succeeded", json!({})));
    inv.pods.push(pod(
        "kube-proxy-n1",
        "Running",
        json!({"kubernetes.io/config.mirror": "x"}),
    ));
    inv.pods.push(pod(
        "scratch",
        "Running",
        json!({"nodedrain.io/strategy": "skip"}),
    ));
    let report = run(&inv);
    assert_eq!(
        of(&report, "Pod/debug-shell"),
        [("bare-pod", Severity::Error)]
    );
    assert!(
        !report
            .workloads
            .iter()
            .any(|w| w.name == "finished" || w.name == "kube-proxy-n1"),
        "finished and mirror pods are not drained"
    );
    assert!(
        ids(&report, "Pod/scratch").is_empty(),
        "skip: never touched"
    );
}

#[test]
fn empty_dir_needs_the_data_loss_opt_in() {
    let mut inv = inventory();
    let with_scratch = |app: &str, opt_in: Option<&str>| {
        let mut t = template(app);
        t["spec"]["volumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
        match opt_in {
            Some(v) => annotate(t, "nodedrain.io/allow-local-data-loss", v),
            None => t,
        }
    };
    inv.deployments.push(deployment(
        "thumbnailer",
        2,
        with_scratch("thumbnailer", None),
    ));
    inv.deployments.push(deployment(
        "resizer",
        2,
        with_scratch("resizer", Some("true")),
    ));
    inv.deployments
        .push(deployment("typo", 2, with_scratch("typo", Some("yes"))));
    let report = run(&inv);
    let f = finding(
        &report,
        "Deployment/thumbnailer",
        FindingId::EmptydirWithoutDataLossOptIn,
    );
    assert_eq!(f.severity, Severity::Warning);
    assert!(f.message.contains("scratch"), "{}", f.message);
    assert!(
        f.fix
            .contains("nodedrain.io/allow-local-data-loss: \"true\""),
        "{}",
        f.fix
    );
    assert!(ids(&report, "Deployment/resizer").is_empty());
    assert_eq!(
        ids(&report, "Deployment/typo"),
        BTreeSet::from(["emptydir-without-data-loss-opt-in", "invalid-annotation"])
    );
}

#[test]
fn jobs_without_wait() {
    let mut inv = inventory();
    inv.jobs.push(from(json!({
        "metadata": {"name": "nightly", "namespace": NS},
        "spec": {"backoffLimit": 0, "template": template("nightly")},
    })));
    inv.jobs.push(from(json!({
        "metadata": {"name": "done", "namespace": NS},
        "spec": {"template": template("done")},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    })));
    inv.jobs.push(from(json!({
        "metadata": {"name": "patient", "namespace": NS},
        "spec": {"template": annotate(template("patient"), "nodedrain.io/strategy", "wait")},
    })));
    inv.jobs.push(from(json!({
        "metadata": {"name": "hourly-123", "namespace": NS, "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "CronJob", "name": "hourly", "uid": "u",
            "controller": true,
        }]},
        "spec": {"template": template("hourly")},
    })));
    let report = run(&inv);
    let f = finding(&report, "Job/nightly", FindingId::JobWithoutWait);
    assert_eq!(f.severity, Severity::Warning);
    assert!(f.message.contains("backoffLimit 0"), "{}", f.message);
    assert!(ids(&report, "Job/patient").is_empty());
    assert!(!f.message.contains("has finished"), "{}", f.message);
    let done = finding(&report, "Job/done", FindingId::JobWithoutWait);
    assert!(
        done.message.contains("this run has finished"),
        "{}",
        done.message
    );
    let cron = finding(&report, "CronJob/hourly", FindingId::JobWithoutWait);
    assert!(
        !cron.message.contains("backoffLimit"),
        "default backoffLimit 6"
    );
    assert!(
        cron.fix.contains("spec.jobTemplate.spec.template"),
        "{}",
        cron.fix
    );
}

// --- Annotations ---

#[test]
fn invalid_and_unknown_annotations() {
    let mut inv = inventory();
    let t = annotate(template("web"), "nodedrain.io/strategy", "Surge");
    let t = annotate(t, "nodedrain.io/order", "first");
    let t = annotate(t, "nodedrain.io/stratgy", "surge");
    let t = annotate(t, "nodedrain.io/whatever", "1");
    let t = annotate(t, "sandbox.nodedrain.io/complete-after", "90s");
    inv.deployments.push(deployment("web", 2, t));
    let t = annotate(template("api"), "nodedrain.io/strategy", "evict");
    let t = annotate(t, "nodedrain.io/order", "-3");
    let t = annotate(t, "nodedrain.io/grace-period", "20");
    inv.deployments.push(deployment("api", 2, t));
    let report = run(&inv);
    let web = &report
        .workloads
        .iter()
        .find(|w| w.name == "web")
        .unwrap()
        .findings;
    let invalid: Vec<&Finding> = web
        .iter()
        .filter(|f| f.id == FindingId::InvalidAnnotation)
        .collect();
    assert_eq!(invalid.len(), 2, "{web:#?}");
    assert!(invalid.iter().all(|f| f.severity == Severity::Warning));
    assert!(invalid.iter().any(|f| f.message.contains("\"Surge\"")));
    let unknown: Vec<&Finding> = web
        .iter()
        .filter(|f| f.id == FindingId::UnknownAnnotation)
        .collect();
    assert_eq!(unknown.len(), 2, "{web:#?}");
    assert!(unknown.iter().any(
        |f| f.fix == "rename it to nodedrain.io/strategy in spec.template.metadata.annotations"
    ));
    assert!(unknown.iter().any(|f| f.fix.starts_with("remove it")));
    assert!(ids(&report, "Deployment/api").is_empty(), "{report:#?}");
}

#[test]
fn annotations_on_the_workload_instead_of_the_pod_template() {
    let mut inv = inventory();
    let mut misplaced = deployment("ledger", 2, template("ledger"));
    misplaced.metadata.annotations = Some(
        [("nodedrain.io/strategy".to_string(), "surge".to_string())]
            .into_iter()
            .collect(),
    );
    inv.deployments.push(misplaced);
    let mut both = deployment(
        "checkout",
        2,
        annotate(template("checkout"), "nodedrain.io/strategy", "surge"),
    );
    both.metadata.annotations = Some(
        [("nodedrain.io/strategy".to_string(), "surge".to_string())]
            .into_iter()
            .collect(),
    );
    inv.deployments.push(both);
    let report = run(&inv);
    let f = finding(
        &report,
        "Deployment/ledger",
        FindingId::AnnotationOnWorkloadMetadata,
    );
    assert_eq!(f.fix, "move it to spec.template.metadata.annotations");
    assert!(ids(&report, "Deployment/checkout").is_empty());
}

// --- Exemptions, selection, the report ---

#[test]
fn daemonsets_are_only_checked_for_annotations() {
    let mut inv = inventory();
    let mut t = with_prestop("agent", None);
    t["spec"]["terminationGracePeriodSeconds"] = json!(600);
    t["spec"]["volumes"] = json!([{"name": "buffer", "emptyDir": {}}]);
    inv.daemon_sets.push(from(json!({
        "metadata": {"name": "agent", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": t},
        "status": {"desiredNumberScheduled": 1, "currentNumberScheduled": 1,
                   "numberMisscheduled": 0, "numberReady": 1},
    })));
    inv.pdbs
        .push(pdb("agent", "agent", json!({"maxUnavailable": 0})));
    inv.pdbs
        .push(pdb("agent-2", "agent", json!({"maxUnavailable": 0})));
    inv.services.push(service("agent", "agent"));
    inv.nodes.push(node("s1", "spot"));
    let report = run(&inv);
    assert!(ids(&report, "DaemonSet/agent").is_empty(), "{report:#?}");

    let t = annotate(template("agent2"), "nodedrain.io/order", "last");
    inv.daemon_sets.push(from(json!({
        "metadata": {"name": "agent2", "namespace": NS},
        "spec": {"selector": {}, "template": t},
    })));
    let report = run(&inv);
    assert_eq!(
        of(&report, "DaemonSet/agent2"),
        [("invalid-annotation", Severity::Warning)]
    );
}

#[test]
fn selector_limits_the_workloads() {
    let mut inv = inventory();
    inv.deployments
        .push(deployment("ledger", 1, template("ledger")));
    inv.deployments.push(deployment("web", 2, template("web")));
    inv.pdbs
        .push(pdb("typo", "wbe", json!({"maxUnavailable": 1})));
    let config = AuditConfig {
        selector: Some(parse_label_selector("app=web").unwrap()),
        selector_text: Some("app=web".to_string()),
        ..AuditConfig::default()
    };
    let report = audit(&inv, &config);
    let names: Vec<&str> = report.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    assert_eq!(report.scope.selector.as_deref(), Some("app=web"));
}

#[test]
fn report_is_sorted_summarised_and_serialised_with_stable_names() {
    let mut inv = inventory();
    inv.deployments
        .push(deployment("ledger", 1, template("ledger")));
    inv.pdbs
        .push(pdb("ledger", "ledger", json!({"minAvailable": 1})));
    inv.deployments.push(deployment("api", 2, template("api")));
    inv.stateful_sets
        .push(stateful_set("cache", 2, template("cache")));
    let report = run(&inv);
    let order: Vec<String> = report
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.kind, w.name))
        .collect();
    assert_eq!(
        order,
        ["Deployment/api", "Deployment/ledger", "StatefulSet/cache"]
    );
    assert_eq!(
        of(&report, "Deployment/ledger"),
        [
            ("pdb-blocks-all-disruptions", Severity::Error),
            ("single-replica-without-surge", Severity::Warning)
        ],
        "most severe first"
    );
    assert_eq!(
        report.summary,
        Summary {
            workloads: 3,
            workloads_with_findings: 1,
            errors: 1,
            warnings: 1,
            infos: 0,
            highest_severity: Some(Severity::Error),
        }
    );
    assert!(report.has_findings_at_or_above(Severity::Warning));
    assert!(report.has_findings_at_or_above(Severity::Error));
    assert_eq!(
        report.finding_pairs(),
        [
            (
                "Deployment/shop/ledger".to_string(),
                FindingId::PdbBlocksAllDisruptions
            ),
            (
                "Deployment/shop/ledger".to_string(),
                FindingId::SingleReplicaWithoutSurge
            ),
        ]
    );

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["apiVersion"], "nodedrain.io/v1");
    assert_eq!(json["kind"], "AuditReport");
    assert_eq!(json["summary"]["highestSeverity"], "error");
    assert_eq!(json["settings"]["graceLimitSeconds"], 110);
    assert_eq!(
        json["workloads"][1]["findings"][0]["id"],
        "pdb-blocks-all-disruptions"
    );
    assert_eq!(json["workloads"][1]["findings"][0]["severity"], "error");

    let text = report.to_text();
    assert!(
        text.contains("Deployment shop/ledger (1 replica)"),
        "{text}"
    );
    assert!(
        text.contains("  ERROR    pdb-blocks-all-disruptions"),
        "{text}"
    );
    assert!(text.contains("fix: "), "{text}");
    assert!(
        text.contains("No findings: Deployment shop/api, StatefulSet shop/cache"),
        "{text}"
    );
    assert!(
        text.ends_with("3 workloads audited, 1 with findings: 1 error, 1 warning, 0 info.\n"),
        "{text}"
    );

    let clean = run(&inventory());
    assert!(!clean.has_findings_at_or_above(Severity::Info));
    assert_eq!(clean.notes, ["no workloads found in namespace shop"]);
}

#[test]
fn ids_and_severities_match_the_documented_schema() {
    let schema: Value =
        serde_json::from_str(include_str!("../../docs/audit-report.schema.json")).unwrap();
    let ids: Vec<&str> = schema["$defs"]["findingId"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = FindingId::ALL.iter().map(|id| id.as_str()).collect();
    assert_eq!(ids, ours);
    let severities: Vec<&str> = schema["$defs"]["severity"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = Severity::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(severities, ours);
    let doc = include_str!("../../docs/audit.md");
    for id in FindingId::ALL {
        assert!(
            doc.contains(&format!("`{id}`")),
            "docs/audit.md does not document {id}"
        );
    }
}

#[test]
fn never_panics_on_empty_objects() {
    let inv = Inventory {
        deployments: vec![Deployment::default()],
        stateful_sets: vec![StatefulSet::default()],
        replica_sets: vec![ReplicaSet::default()],
        daemon_sets: vec![DaemonSet::default()],
        jobs: vec![Job::default()],
        pods: vec![Pod::default()],
        pdbs: vec![PodDisruptionBudget::default()],
        services: vec![Service::default()],
        priority_classes: vec![PriorityClass::default()],
        nodes: vec![Node::default()],
        ..Default::default()
    };
    let report = run(&inv);
    assert!(!report.workloads.is_empty());
}

/// Marks the live pods named `names` Ready, the others not.
fn set_ready(inv: &mut Inventory, ready: &[&str]) {
    for pod in &mut inv.pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = if ready.contains(&name.as_str()) {
            "True"
        } else {
            "False"
        };
        pod.status.get_or_insert_with(Default::default).conditions =
            Some(vec![from(json!({"type": "Ready", "status": status}))]);
    }
}

fn with_status(mut pdb: PodDisruptionBudget, current: i32, desired: i32) -> PodDisruptionBudget {
    pdb.status = Some(from(json!({
        "currentHealthy": current,
        "desiredHealthy": desired,
        "disruptionsAllowed": (current - desired).max(0),
        "expectedPods": 3,
    })));
    pdb
}

#[test]
fn not_ready_pods_under_if_healthy_budget_are_named_and_always_allow_is_recommended() {
    let mut inv = inventory();
    inv.deployments.push(deployment("web", 3, template("web")));
    run_pods(&mut inv, "web", 3, "n1");
    set_ready(&mut inv, &["web-rs-0"]);
    inv.pdbs.push(with_status(
        pdb("web", "web", json!({"minAvailable": 2})),
        1,
        2,
    ));
    let report = run(&inv);
    let f = finding(
        &report,
        "Deployment/web",
        FindingId::UnhealthyPodsBlockEviction,
    );
    assert_eq!(f.severity, Severity::Error);
    assert_eq!(
        f.message,
        "2 pods are not Ready (web-rs-1, web-rs-2), and PDB web (unhealthyPodEvictionPolicy \
         unset, so IfHealthyBudget) has 1 healthy of 2 needed: the Eviction API refuses to evict \
         a not-Ready pod until the budget is met, so a drain of its node waits for a pod that \
         serves nothing, until its timeout (or, on a spot interruption, the deadline)"
    );
    assert!(
        f.fix
            .starts_with("set spec.unhealthyPodEvictionPolicy: AlwaysAllow on PDB web"),
        "{}",
        f.fix
    );

    // AlwaysAllow already: nothing to say.
    inv.pdbs[0] = with_status(
        pdb(
            "web",
            "web",
            json!({"minAvailable": 2, "unhealthyPodEvictionPolicy": "AlwaysAllow"}),
        ),
        1,
        2,
    );
    assert!(!has(
        &run(&inv),
        "Deployment/web",
        FindingId::UnhealthyPodsBlockEviction
    ));
    // The budget met: the apiserver evicts the not-Ready pods anyway.
    inv.pdbs[0] = with_status(pdb("web", "web", json!({"minAvailable": 1})), 1, 1);
    assert!(!has(
        &run(&inv),
        "Deployment/web",
        FindingId::UnhealthyPodsBlockEviction
    ));
    // Everything Ready: nothing blocked by health.
    inv.pdbs[0] = with_status(pdb("web", "web", json!({"minAvailable": 3})), 3, 3);
    set_ready(&mut inv, &["web-rs-0", "web-rs-1", "web-rs-2"]);
    assert!(!has(
        &run(&inv),
        "Deployment/web",
        FindingId::UnhealthyPodsBlockEviction
    ));
}

#[test]
fn always_allow_is_not_pressed_on_a_quorum_workload() {
    let mut inv = inventory();
    inv.stateful_sets
        .push(stateful_set("etcd", 3, template("etcd")));
    for i in 0..3 {
        let mut pod = template("etcd");
        pod["metadata"]["name"] = json!(format!("etcd-{i}"));
        pod["metadata"]["namespace"] = json!(NS);
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
            "kind": "StatefulSet", "name": "etcd", "uid": "u", "controller": true}]);
        pod["spec"]["nodeName"] = json!("n1");
        pod["status"] = json!({"phase": "Running"});
        inv.pods.push(from(pod));
    }
    set_ready(&mut inv, &["etcd-0"]);
    inv.pdbs.push(with_status(
        pdb(
            "etcd",
            "etcd",
            json!({"minAvailable": 2, "unhealthyPodEvictionPolicy": "IfHealthyBudget"}),
        ),
        1,
        2,
    ));
    let report = run(&inv);
    let f = finding(
        &report,
        "StatefulSet/etcd",
        FindingId::UnhealthyPodsBlockEviction,
    );
    assert!(
        f.message
            .contains("unhealthyPodEvictionPolicy IfHealthyBudget)"),
        "{}",
        f.message
    );
    assert!(
        f.fix.starts_with("find out why the pods are not Ready"),
        "{}",
        f.fix
    );
    assert!(f.fix.contains("quorum"), "{}", f.fix);
}

#[test]
fn a_do_not_disrupt_duration_is_valid_and_a_bad_one_is_explained() {
    let mut inv = inventory();
    let good = annotate(template("batch"), "karpenter.sh/do-not-disrupt", "1h30m");
    inv.deployments.push(deployment("batch", 2, good));
    let bad = annotate(template("train"), "karpenter.sh/do-not-disrupt", "2 hours");
    inv.deployments.push(deployment("train", 2, bad));
    let report = run(&inv);
    assert!(!has(
        &report,
        "Deployment/batch",
        FindingId::InvalidAnnotation
    ));
    let f = finding(&report, "Deployment/train", FindingId::InvalidAnnotation);
    assert!(
        f.message
            .contains("expected \"true\" or a duration such as \"30m\" or \"1h30m\""),
        "{}",
        f.message
    );
    assert!(f.fix.contains("Go's syntax"), "{}", f.fix);
}

// ---------------------------------------------------------------------------------------------
// Load balancers
// ---------------------------------------------------------------------------------------------

mod load_balancers {
    use super::*;
    use crate::config::AwsArgs;
    use crate::lb::discover::Binding;
    use crate::lb::targets::{Owner, Target, TargetGroup, TargetType};
    use crate::names;

    const WEB_ARN: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/1";
    const EDGE_ARN: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/edge/2";

    fn bound_group(arn: &str, target_type: TargetType, delay: u64) -> TargetGroup {
        TargetGroup {
            arn: arn.into(),
            target_type,
            deregistration_delay: Duration::from_secs(delay),
            owner: Owner::Binding {
                namespace: NS.into(),
                name: "web".into(),
            },
        }
    }

    fn binding(arn: &str, target_type: Option<TargetType>) -> AuditedBinding {
        AuditedBinding {
            binding: Binding {
                namespace: NS.into(),
                name: "web".into(),
                target_group_arn: arn.into(),
                target_type,
            },
            labels: BTreeMap::from([("team".to_string(), "web".to_string())]),
        }
    }

    /// `count` live pods of Deployment `app` with IPs 10.1.0.1.., their container (port 8080)
    /// without a preStop hook, grace 30 s, all registered as IP targets of `group` on `port`.
    fn ip_targets(inv: &mut Inventory, app: &str, count: usize, group: TargetGroup, port: i32) {
        let mut t = template(app);
        t["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("lifecycle");
        inv.deployments
            .push(deployment(app, count as i32, t.clone()));
        let before = inv.pods.len();
        run_pods(inv, app, count, "n1");
        let mut targets = Vec::new();
        for (i, pod) in inv.pods[before..].iter_mut().enumerate() {
            let ip = format!("10.1.0.{}", i + 1);
            let spec: k8s_openapi::api::core::v1::PodSpec = from(t["spec"].clone());
            pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("n1".into()),
                ..spec
            });
            pod.status = Some(from(json!({"phase": "Running", "podIP": ip})));
            targets.push(Target {
                group_arn: group.arn.clone(),
                id: ip,
                port,
            });
        }
        inv.load_balancers
            .groups
            .push(DescribedGroup { group, targets });
    }

    fn namespace_labels(inv: &mut Inventory, labels: &[(&str, &str)]) {
        inv.load_balancers.namespace_labels.insert(
            NS.into(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    #[test]
    fn a_delay_longer_than_the_spot_warning_leaves_is_reported_on_its_binding() {
        let mut inv = inventory();
        inv.load_balancers
            .bindings
            .push(binding(WEB_ARN, Some(TargetType::Ip)));
        namespace_labels(
            &mut inv,
            &[(names::LABEL_ELBV2_POD_READINESS_GATE_INJECT, "enabled")],
        );
        inv.load_balancers.groups.push(DescribedGroup {
            group: bound_group(WEB_ARN, TargetType::Ip, 300),
            targets: Vec::new(),
        });
        let report = run(&inv);
        let f = finding(
            &report,
            "TargetGroupBinding/web",
            FindingId::DeregistrationDelayExceedsDeadline,
        );
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("for 300 s"), "{}", f.message);
        assert!(
            f.message
                .contains("120 s warning minus the 10 s margin leaves 110 s"),
            "{}",
            f.message
        );
        assert!(f.message.contains("cut 190 s before"), "{}", f.message);
        assert!(
            f.fix.contains("deregistration_delay.timeout_seconds=110"),
            "{}",
            f.fix
        );
        let entry = report
            .workloads
            .iter()
            .find(|w| w.kind == "TargetGroupBinding")
            .unwrap();
        assert_eq!((entry.namespace.as_str(), entry.replicas), (NS, None));

        // Exactly the limit fits; one second more does not.
        for (delay, reported) in [(110, false), (111, true)] {
            inv.load_balancers.groups[0].group.deregistration_delay = Duration::from_secs(delay);
            let report = run(&inv);
            assert_eq!(
                report
                    .finding_pairs()
                    .iter()
                    .any(|(_, id)| *id == FindingId::DeregistrationDelayExceedsDeadline),
                reported,
                "delay {delay}: {report:#?}"
            );
        }
    }

    #[test]
    fn the_delay_is_judged_against_the_deadline_when_one_is_given() {
        let mut inv = inventory();
        inv.load_balancers.groups.push(DescribedGroup {
            group: bound_group(WEB_ARN, TargetType::Ip, 300),
            targets: Vec::new(),
        });
        inv.load_balancers
            .bindings
            .push(binding(WEB_ARN, Some(TargetType::Ip)));
        let five_minutes = AuditConfig {
            deadline: Some(Duration::from_secs(300)),
            ..AuditConfig::default()
        };
        let f = audit(&inv, &five_minutes);
        let f = finding(
            &f,
            "TargetGroupBinding/web",
            FindingId::DeregistrationDelayExceedsDeadline,
        );
        assert!(
            f.message
                .contains("the 300 s deadline minus the 10 s margin leaves 290 s")
        );
        let ten_minutes = AuditConfig {
            deadline: Some(Duration::from_secs(600)),
            ..AuditConfig::default()
        };
        assert!(
            !audit(&inv, &ten_minutes)
                .finding_pairs()
                .iter()
                .any(|(_, id)| *id == FindingId::DeregistrationDelayExceedsDeadline)
        );
    }

    #[test]
    fn a_configured_group_belongs_to_a_namespaced_audit_only_through_its_pods() {
        let mut inv = inventory();
        let configured = TargetGroup {
            owner: Owner::Configured,
            ..bound_group(EDGE_ARN, TargetType::Ip, 300)
        };
        inv.load_balancers.groups.push(DescribedGroup {
            group: configured.clone(),
            targets: vec![Target {
                group_arn: EDGE_ARN.into(),
                id: "10.9.9.9".into(),
                port: 8080,
            }],
        });
        // No pod of this namespace serves through it.
        assert!(run(&inv).finding_pairs().is_empty(), "{:#?}", run(&inv));
        // An audit of every namespace reports it, under its name and no namespace.
        let mut everything = inv.clone();
        everything.scope.namespace = None;
        let report = run(&everything);
        assert!(has(
            &report,
            "TargetGroup/edge",
            FindingId::DeregistrationDelayExceedsDeadline
        ));
        let text = report.to_text();
        assert!(text.contains("\nTargetGroup edge\n"), "{text}");
        assert!(text.contains("(arn:aws:elasticloadbalancing:"), "{text}");
        // A pod of the namespace behind it brings it into the namespaced audit.
        inv.load_balancers.groups.clear();
        ip_targets(&mut inv, "api", 1, configured, 8080);
        assert!(has(
            &run(&inv),
            "TargetGroup/edge",
            FindingId::DeregistrationDelayExceedsDeadline
        ));
    }

    #[test]
    fn ip_targets_without_prestop_and_a_grace_shorter_than_the_delay_are_named() {
        let mut inv = inventory();
        ip_targets(
            &mut inv,
            "web",
            7,
            bound_group(WEB_ARN, TargetType::Ip, 300),
            8080,
        );
        let report = run(&inv);
        let f = finding(&report, "Deployment/web", FindingId::IpTargetWithoutPrestop);
        assert_eq!(f.severity, Severity::Error);
        assert!(
            f.message.starts_with(
                "7 of its 7 pods (web-rs-0, web-rs-1, web-rs-2, web-rs-3, web-rs-4 and 2 more) \
                 are an IP target of target group web (deregistration delay 300 s)"
            ),
            "{}",
            f.message
        );
        assert!(f.message.contains("a grace of 30 s"), "{}", f.message);
        assert!(f.fix.contains("lifecycle.preStop"), "{}", f.fix);
    }

    #[test]
    fn ip_targets_are_fine_with_a_prestop_a_long_grace_or_another_port() {
        let group = || bound_group(WEB_ARN, TargetType::Ip, 300);
        // A preStop hook on the serving container.
        let mut inv = inventory();
        ip_targets(&mut inv, "web", 2, group(), 8080);
        for pod in &mut inv.pods {
            pod.spec.as_mut().unwrap().containers[0].lifecycle =
                Some(from(json!({"preStop": {"sleep": {"seconds": 15}}})));
        }
        assert!(!has(
            &run(&inv),
            "Deployment/web",
            FindingId::IpTargetWithoutPrestop
        ));
        // A grace as long as the delay: the pod outlives the draining.
        let mut inv = inventory();
        ip_targets(&mut inv, "web", 2, group(), 8080);
        for pod in &mut inv.pods {
            pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(300);
        }
        assert!(!has(
            &run(&inv),
            "Deployment/web",
            FindingId::IpTargetWithoutPrestop
        ));
        // Registered on a port the pod does not serve: not its target.
        let mut inv = inventory();
        ip_targets(&mut inv, "web", 2, group(), 9090);
        assert!(!has(
            &run(&inv),
            "Deployment/web",
            FindingId::IpTargetWithoutPrestop
        ));
        // Only some pods registered: the count says so.
        let mut inv = inventory();
        ip_targets(&mut inv, "web", 3, group(), 8080);
        inv.load_balancers.groups[0].targets.truncate(1);
        let report = run(&inv);
        let f = finding(&report, "Deployment/web", FindingId::IpTargetWithoutPrestop);
        assert!(
            f.message
                .starts_with("1 of its 3 pods (web-rs-0) is an IP target"),
            "{}",
            f.message
        );
    }

    #[test]
    fn an_ip_binding_needs_the_readiness_gate_label_on_its_namespace() {
        let label = names::LABEL_ELBV2_POD_READINESS_GATE_INJECT;
        let mut inv = inventory();
        inv.load_balancers
            .bindings
            .push(binding(WEB_ARN, Some(TargetType::Ip)));
        namespace_labels(&mut inv, &[("kubernetes.io/metadata.name", NS)]);
        let report = run(&inv);
        let f = finding(
            &report,
            "TargetGroupBinding/web",
            FindingId::ReadinessGateNotInjected,
        );
        assert_eq!(f.severity, Severity::Warning);
        assert!(
            f.message
                .contains(&format!("namespace {NS} lacks the label {label}=enabled")),
            "{}",
            f.message
        );
        assert!(
            f.fix
                .starts_with(&format!("kubectl label namespace {NS} {label}=enabled")),
            "{}",
            f.fix
        );
        // Any other value does not turn injection on.
        namespace_labels(&mut inv, &[(label, "disabled")]);
        assert!(has(
            &run(&inv),
            "TargetGroupBinding/web",
            FindingId::ReadinessGateNotInjected
        ));
        namespace_labels(&mut inv, &[(label, "enabled")]);
        assert!(run(&inv).workloads.is_empty(), "{:#?}", run(&inv));
    }

    #[test]
    fn the_readiness_gate_matters_only_for_ip_targets() {
        let mut inv = inventory();
        namespace_labels(&mut inv, &[]);
        // Instance targets: the load balancer knows nothing of the pods.
        inv.load_balancers
            .bindings
            .push(binding(WEB_ARN, Some(TargetType::Instance)));
        assert!(run(&inv).workloads.is_empty());
        // No targetType on the binding: the group's, when ELBv2 was asked.
        inv.load_balancers.bindings[0].binding.target_type = None;
        assert!(run(&inv).workloads.is_empty());
        inv.load_balancers.groups.push(DescribedGroup {
            group: bound_group(WEB_ARN, TargetType::Ip, 30),
            targets: Vec::new(),
        });
        assert!(has(
            &run(&inv),
            "TargetGroupBinding/web",
            FindingId::ReadinessGateNotInjected
        ));
        // A namespace whose labels could not be read is not judged.
        inv.load_balancers.namespace_labels.clear();
        assert!(run(&inv).workloads.is_empty());
    }

    #[test]
    fn a_selector_keeps_bindings_by_their_labels_or_their_pods() {
        let mut inv = inventory();
        inv.load_balancers
            .bindings
            .push(binding(WEB_ARN, Some(TargetType::Ip)));
        namespace_labels(&mut inv, &[]);
        let selected = |text: &str| AuditConfig {
            selector: Some(parse_label_selector(text).unwrap()),
            selector_text: Some(text.into()),
            ..AuditConfig::default()
        };
        let pairs = |inv: &Inventory, s: &str| audit(inv, &selected(s)).finding_pairs();
        assert_eq!(pairs(&inv, "team=web").len(), 1);
        assert!(pairs(&inv, "team=api").is_empty());
        // A selected pod behind the binding's group brings the binding in.
        ip_targets(
            &mut inv,
            "api",
            1,
            bound_group(WEB_ARN, TargetType::Ip, 30),
            8080,
        );
        let with_pod = pairs(&inv, "app=api");
        assert!(
            with_pod.contains(&(
                format!("TargetGroupBinding/{NS}/web"),
                FindingId::ReadinessGateNotInjected
            )),
            "{with_pod:?}"
        );
    }

    #[test]
    fn the_region_comes_from_the_flag_then_the_environment_else_the_checks_are_skipped() {
        let args = |region: Option<&str>, endpoint: Option<&str>| AwsArgs {
            aws_region: region.map(String::from),
            aws_endpoint_url: endpoint.map(String::from),
        };
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let region = |access: AwsAccess| match access {
            AwsAccess::Use(config) => config.region,
            AwsAccess::Skip(why) => panic!("skipped: {why}"),
        };
        let both: &[(&str, &str)] = &[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "us-east-2"),
        ];
        assert_eq!(
            region(aws_access(&args(Some("ap-south-1"), None), env(both)).unwrap()),
            "ap-south-1"
        );
        assert_eq!(
            region(aws_access(&args(None, None), env(both)).unwrap()),
            "eu-west-1"
        );
        assert_eq!(
            region(
                aws_access(
                    &args(Some(" "), None),
                    env(&[("AWS_DEFAULT_REGION", "us-east-2")])
                )
                .unwrap()
            ),
            "us-east-2"
        );
        match aws_access(&args(None, Some("http://127.0.0.1:5000")), env(&[])).unwrap() {
            AwsAccess::Skip(why) => assert!(why.contains("no AWS region"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            aws_access(&args(Some("us-east-1"), Some("localhost:5000")), env(&[])),
            Err(AwsArgsError::InvalidEndpoint("localhost:5000".into()))
        );
        match aws_access(
            &args(Some("us-east-1"), Some("http://127.0.0.1:5000")),
            env(&[]),
        )
        .unwrap()
        {
            AwsAccess::Use(config) => {
                assert_eq!(
                    config.endpoint_url.as_deref(),
                    Some("http://127.0.0.1:5000")
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
