//! `nodedrain audit` on the sandbox's standard workload mix (`sandbox/fixtures.py workloads`),
//! run as the real binary: the exact findings, the JSON document against its documented schema,
//! and the exit status `--fail-on` gives.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::json_schema::validate;
use support::{Sandbox, var};

fn schema() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/audit-report.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read the schema"))
        .expect("the schema is JSON")
}

/// Runs the binary with the sandbox's kubeconfig (or `kubeconfig` when given), without an AWS
/// region: the workload findings alone. On the shared sandbox a pod may get an IP that another
/// test left registered in an ELBv2 group, which is a real ip-target-without-prestop finding but
/// not one this test can predict; tests/audit_load_balancers.rs covers the ELBv2 checks.
async fn nodedrain(args: &[&str], kubeconfig: Option<&str>) -> Output {
    let kubeconfig = kubeconfig.map_or_else(|| var("KUBECONFIG"), str::to_string);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nodedrain"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env_remove("NODEDRAIN_AWS_REGION")
            .output()
            .expect("run nodedrain")
    })
    .await
    .unwrap()
}

fn exit_code(output: &Output) -> i32 {
    output.status.code().expect("exited normally")
}

/// Applies the standard workload mix in `namespace` and waits until its Deployments are
/// Available (fixtures.py does the waiting).
async fn workload_mix(namespace: &str) {
    let namespace = namespace.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(var("NODEDRAIN_SANDBOX_PYTHON"))
            .arg(PathBuf::from(var("NODEDRAIN_SANDBOX_DIR")).join("fixtures.py"))
            .args(["workloads", "--namespace", &namespace])
            .env("KUBECONFIG", var("KUBECONFIG"))
            .env("NODEDRAIN_SANDBOX_BIN", var("NODEDRAIN_SANDBOX_BIN"))
            .output()
            .expect("run sandbox/fixtures.py")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "fixtures.py workloads failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `no-pdb-on-spot` needs a spot node the fixture's pods may use; `sandbox/sandbox up` makes
/// some (every node but each third is spot, untainted).
async fn assert_untainted_spot_node_exists(sandbox: &Sandbox) {
    let nodes: Api<Node> = Api::all(sandbox.client.clone());
    let spot = nodes
        .list(&ListParams::default().labels("karpenter.sh/capacity-type=spot"))
        .await
        .expect("list nodes");
    assert!(
        spot.items.iter().any(|n| n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_none_or(|t| t.is_empty())),
        "the sandbox has no untainted spot node; start it with its fixtures (`sandbox/sandbox up`)"
    );
}

#[tokio::test]
async fn audit_finds_exactly_what_breaks_the_next_drain_of_the_workload_mix() {
    let sandbox = Sandbox::connect().await;
    assert_untainted_spot_node_exists(&sandbox).await;
    let scope = sandbox.scope("audit").await;
    let ns = scope.id.clone();
    workload_mix(&ns).await;

    let output = nodedrain(
        &["audit", "-n", &ns, "-o", "json", "--fail-on", "never"],
        None,
    )
    .await;
    assert_eq!(
        exit_code(&output),
        0,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");

    let errors = validate(&schema(), &report);
    assert!(
        errors.is_empty(),
        "the report does not match docs/audit-report.schema.json:\n{}",
        errors.join("\n")
    );

    let workloads: BTreeSet<String> = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            format!(
                "{}/{}",
                w["kind"].as_str().unwrap(),
                w["name"].as_str().unwrap()
            )
        })
        .collect();
    let expected_workloads: BTreeSet<String> = [
        "DaemonSet/node-agent",
        "Deployment/api",
        "Deployment/checkout",
        "Deployment/ledger",
        "Deployment/thumbnailer",
        "Deployment/video-encoder",
        "Deployment/web",
        "Job/nightly-report",
        "Pod/debug-shell",
        "StatefulSet/cache",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(workloads, expected_workloads);

    let findings: BTreeSet<(String, String)> = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| {
            let workload = format!(
                "{}/{}",
                w["kind"].as_str().unwrap(),
                w["name"].as_str().unwrap()
            );
            w["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |f| (workload.clone(), f["id"].as_str().unwrap().to_string()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        // minAvailable: 1 on one replica without surge (checkout, with surge, is fine).
        ("Deployment/ledger", "pdb-blocks-all-disruptions"),
        ("Deployment/ledger", "single-replica-without-surge"),
        // maxUnavailable: 0, and a 600 s grace against 120 s - 10 s.
        ("Deployment/video-encoder", "pdb-blocks-all-disruptions"),
        ("Deployment/video-encoder", "grace-exceeds-deadline"),
        ("Pod/debug-shell", "bare-pod"),
        (
            "Deployment/thumbnailer",
            "emptydir-without-data-loss-opt-in",
        ),
        ("Deployment/thumbnailer", "no-pdb-on-spot"),
        ("Job/nightly-report", "job-without-wait"),
    ]
    .into_iter()
    .map(|(w, id)| (w.to_string(), id.to_string()))
    .collect();
    assert_eq!(
        findings,
        expected,
        "report: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );

    assert_eq!(report["scope"], json!({"namespace": ns, "selector": null}));
    assert_eq!(report["summary"]["workloads"], 10);
    assert_eq!(report["summary"]["workloadsWithFindings"], 5);
    assert_eq!(report["summary"]["highestSeverity"], "error");
    let ledger = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "ledger")
        .unwrap();
    let blocked = &ledger["findings"][0];
    assert_eq!(blocked["id"], "pdb-blocks-all-disruptions");
    assert_eq!(blocked["severity"], "error");
    assert!(
        blocked["message"]
            .as_str()
            .unwrap()
            .contains("PDB ledger (minAvailable: 1) allows 0 disruptions at 1 replica"),
        "{blocked}"
    );
    assert!(
        blocked["fix"]
            .as_str()
            .unwrap()
            .contains("nodedrain.io/strategy: surge"),
        "{blocked}"
    );

    // --fail-on: errors exist, so error and warning fail; a selection with warnings only fails
    // only on warning; a clean selection passes everything.
    for (args, code) in [
        (vec![], 1),
        (vec!["--fail-on", "error"], 1),
        (vec!["--fail-on", "warning"], 1),
        (vec!["--fail-on", "never"], 0),
        (vec!["-l", "app=thumbnailer", "--fail-on", "error"], 0),
        (vec!["-l", "app=thumbnailer", "--fail-on", "warning"], 1),
        (vec!["-l", "app=web", "--fail-on", "warning"], 0),
    ] {
        let mut all = vec!["audit", "-n", ns.as_str()];
        all.extend(args.iter().copied());
        let output = nodedrain(&all, None).await;
        assert_eq!(
            exit_code(&output),
            code,
            "{all:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // The text report names every workload with findings, each finding and its fix.
    let output = nodedrain(&["audit", "-n", &ns], None).await;
    let text = String::from_utf8(output.stdout).unwrap();
    for needle in [
        format!("Deployment {ns}/ledger (1 replica)"),
        "ERROR    pdb-blocks-all-disruptions".to_string(),
        "WARNING  no-pdb-on-spot".to_string(),
        "fix: set maxUnavailable: 1 on PDB video-encoder".to_string(),
        "10 workloads audited, 5 with findings".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in:\n{text}");
    }

    scope.cleanup().await;
}

#[tokio::test]
async fn audit_exits_2_when_no_report_can_be_made() {
    let output = nodedrain(&["audit", "-n", "default", "-l", "app in ()"], None).await;
    assert_eq!(exit_code(&output), 2);
    assert!(String::from_utf8_lossy(&output.stderr).contains("--selector"));

    let missing = std::env::temp_dir().join("nodedrain-audit-no-such-kubeconfig");
    let output = nodedrain(&["audit", "-n", "default"], Some(missing.to_str().unwrap())).await;
    assert_eq!(
        exit_code(&output),
        2,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = nodedrain(&["audit", "--fail-on", "sometimes"], None).await;
    assert_eq!(exit_code(&output), 2, "clap rejects the value");
}

#[test]
fn json_schema_validator_catches_what_it_claims() {
    let schema = json!({
        "type": "object",
        "required": ["a"],
        "additionalProperties": false,
        "properties": {
            "a": {"$ref": "#/$defs/small"},
            "b": {"type": ["string", "null"], "minLength": 1},
            "c": {"type": "array", "items": {"enum": ["x", "y"]}},
            "d": {"anyOf": [{"const": 1}, {"type": "null"}]},
        },
        "$defs": {"small": {"type": "integer", "minimum": 0}},
    });
    assert!(validate(&schema, &json!({"a": 1, "b": null, "c": ["x"], "d": 1})).is_empty());
    for bad in [
        json!({}),
        json!({"a": -1}),
        json!({"a": 1.5}),
        json!({"a": 1, "b": ""}),
        json!({"a": 1, "c": ["z"]}),
        json!({"a": 1, "d": 2}),
        json!({"a": 1, "e": true}),
    ] {
        assert!(!validate(&schema, &bad).is_empty(), "{bad} passed");
    }
    assert!(
        !validate(&json!({"pattern": "x"}), &json!("x")).is_empty(),
        "unknown keywords are errors"
    );
}

#[test]
fn the_documented_schema_uses_only_keywords_the_validator_checks() {
    assert_eq!(unsupported_keywords(&schema()), Vec::<String>::new());
}

/// A report with every finding id (built by the library from hand-made objects) matches the
/// schema: the sandbox's mix does not produce all of them.
#[test]
fn every_kind_of_finding_matches_the_schema() {
    use nodedrain::audit::{
        AuditConfig, AuditScope, AuditedBinding, DescribedGroup, FindingId, Inventory,
        LoadBalancers, audit,
    };
    use nodedrain::lb::discover::Binding;
    use nodedrain::lb::targets::{Owner, Target, TargetGroup, TargetType};

    fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).unwrap()
    }
    let template = |app: &str, annotations: Value, spec: Value| {
        let mut container = json!({"name": app, "ports": [{"containerPort": 80}],
            "readinessProbe": {"periodSeconds": 5, "failureThreshold": 3,
                               "tcpSocket": {"port": 80}}});
        if let Some(hook) = spec.get("preStop") {
            container["lifecycle"] = json!({"preStop": hook});
        }
        let mut pod_spec = json!({"containers": [container]});
        for (k, v) in spec.as_object().unwrap() {
            if k != "preStop" {
                pod_spec[k] = v.clone();
            }
        }
        json!({"metadata": {"labels": {"app": app}, "annotations": annotations}, "spec": pod_spec})
    };
    let deployment = |name: &str, replicas: i32, t: Value| {
        from(json!({"metadata": {"name": name, "namespace": "ns",
            "annotations": {"nodedrain.io/order": "1"}},
            "spec": {"replicas": replicas, "selector": {}, "template": t}}))
    };
    let pdb = |name: &str, app: &str, budget: Value| {
        let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
        for (k, v) in budget.as_object().unwrap() {
            spec[k] = v.clone();
        }
        from(json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}))
    };
    let service = |app: &str| {
        from(json!({"metadata": {"name": app, "namespace": "ns"},
            "spec": {"selector": {"app": app}}}))
    };
    let inventory = Inventory {
        scope: AuditScope {
            namespace: Some("ns".into()),
        },
        deployments: vec![
            // pdb-blocks-all-disruptions, single-replica-without-surge, grace-exceeds-deadline,
            // no-prestop-behind-service, invalid/unknown annotations, annotation on metadata.
            deployment(
                "a",
                1,
                template(
                    "a",
                    json!({"nodedrain.io/strategy": "yeet", "nodedrain.io/stratgy": "surge"}),
                    json!({"terminationGracePeriodSeconds": 600}),
                ),
            ),
            // multiple-pdbs, prestop-shorter-than-readiness-window, emptyDir.
            deployment(
                "b",
                2,
                template(
                    "b",
                    json!({}),
                    json!({
                "preStop": {"sleep": {"seconds": 1}},
                "volumes": [{"name": "tmp", "emptyDir": {}}]}),
                ),
            ),
            // no-pdb-on-spot, prestop-duration-unknown.
            deployment(
                "c",
                2,
                template(
                    "c",
                    json!({}),
                    json!({"preStop": {"httpGet": {"path": "/drain", "port": 80}}}),
                ),
            ),
        ],
        stateful_sets: vec![from(json!({"metadata": {"name": "d", "namespace": "ns"},
            "spec": {"replicas": 2, "serviceName": "d", "selector": {},
                     "template": template("d", json!({"nodedrain.io/strategy": "surge"}),
                                          json!({}))}}))],
        jobs: vec![from(json!({"metadata": {"name": "e", "namespace": "ns"},
            "spec": {"template": template("e", json!({}), json!({}))}}))],
        // bare-pod; unhealthy-pods-block-eviction (not Ready, under PDB f short of its budget).
        // g: ip-target-without-prestop (an IP target of group web, no preStop, grace 30 s).
        pods: vec![
            from(
                json!({"metadata": {"name": "f", "namespace": "ns", "labels": {"app": "f"}},
                "spec": {"containers": [{"name": "f"}]}, "status": {"phase": "Running"}}),
            ),
            from(
                json!({"metadata": {"name": "g", "namespace": "ns", "labels": {"app": "g"}},
                "spec": {"containers": [{"name": "g", "ports": [{"containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": "10.0.0.7"}}),
            ),
        ],
        // deregistration-delay-exceeds-deadline (300 s) and readiness-gate-not-injected
        // (namespace ns has no injection label) on TargetGroupBinding ns/web.
        load_balancers: {
            let arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/1";
            LoadBalancers {
                bindings: vec![AuditedBinding {
                    binding: Binding {
                        namespace: "ns".into(),
                        name: "web".into(),
                        target_group_arn: arn.into(),
                        target_type: Some(TargetType::Ip),
                    },
                    labels: Default::default(),
                }],
                namespace_labels: [("ns".to_string(), Default::default())].into(),
                groups: vec![DescribedGroup {
                    group: TargetGroup {
                        arn: arn.into(),
                        target_type: TargetType::Ip,
                        deregistration_delay: std::time::Duration::from_secs(300),
                        owner: Owner::Binding {
                            namespace: "ns".into(),
                            name: "web".into(),
                        },
                    },
                    targets: vec![Target {
                        group_arn: arn.into(),
                        id: "10.0.0.7".into(),
                        port: 8080,
                    }],
                }],
            }
        },
        pdbs: vec![
            pdb("a", "a", json!({"minAvailable": 1})),
            pdb("b1", "b", json!({"maxUnavailable": 1})),
            pdb("b2", "b", json!({"maxUnavailable": 1})),
            pdb("d", "d", json!({"maxUnavailable": 1})),
            pdb("nothing", "zzz", json!({"maxUnavailable": 1})),
            {
                let mut f: k8s_openapi::api::policy::v1::PodDisruptionBudget =
                    pdb("f", "f", json!({"minAvailable": 1}));
                f.status = Some(from(json!({"currentHealthy": 0, "desiredHealthy": 1,
                    "disruptionsAllowed": 0, "expectedPods": 1})));
                f
            },
        ],
        services: vec![service("a"), service("b"), service("c")],
        nodes: vec![from(
            json!({"metadata": {"name": "n", "labels": {"karpenter.sh/capacity-type": "spot"}}}),
        )],
        ..Default::default()
    };
    let report = audit(&inventory, &AuditConfig::default());
    let seen: BTreeSet<FindingId> = report
        .finding_pairs()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let all: BTreeSet<FindingId> = FindingId::ALL.into_iter().collect();
    assert_eq!(seen, all, "{report:#?}");
    let document = serde_json::to_value(&report).unwrap();
    let errors = validate(&schema(), &document);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Keywords anywhere in `schema` that [`validate`] would not check.
fn unsupported_keywords(schema: &Value) -> Vec<String> {
    const KNOWN: [&str; 17] = [
        "$schema",
        "$id",
        "title",
        "description",
        "$comment",
        "$defs",
        "$ref",
        "type",
        "const",
        "enum",
        "minimum",
        "minLength",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "anyOf",
    ];
    let mut found = Vec::new();
    let Some(object) = schema.as_object() else {
        return found;
    };
    for (keyword, value) in object {
        if !KNOWN.contains(&keyword.as_str()) {
            found.push(keyword.clone());
        }
        match keyword.as_str() {
            "properties" | "$defs" => {
                for child in value.as_object().into_iter().flat_map(|o| o.values()) {
                    found.extend(unsupported_keywords(child));
                }
            }
            "items" | "additionalProperties" => found.extend(unsupported_keywords(value)),
            "anyOf" => {
                for child in value.as_array().into_iter().flatten() {
                    found.extend(unsupported_keywords(child));
                }
            }
            _ => {}
        }
    }
    found
}
