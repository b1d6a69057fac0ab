//! `nodedrain audit`'s load-balancer findings on the sandbox, run as the real binary: a Deployment
//! whose pods are IP targets of a moto ELBv2 group with AWS's default 300 s delay, bound by a
//! TargetGroupBinding in a namespace without readiness-gate injection; then what changes with
//! the label, with a longer deadline, without a region and with ELBv2 unreachable.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{ProtocolEnum, TargetTypeEnum};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::json_schema::validate;
use support::lbc::ensure_binding_crd;
use support::{Sandbox, Scope, ready_pods, var};

const READINESS_LABEL: &str = "elbv2.k8s.aws/pod-readiness-gate-inject";

/// A Deployment `name` of `replicas` pods on `node` serving on 8080, grace 30 s, with or
/// without a preStop. The template names the node: the pods skip the scheduler, whose queue a
/// benchmark on the shared sandbox may hold for minutes.
async fn deployment(scope: &Scope, node: &str, name: &str, replicas: i32, prestop: bool) {
    let mut spec = scope.pod_spec(30);
    spec["nodeName"] = json!(node);
    spec["containers"][0]["ports"] = json!([{"containerPort": 8080}]);
    if prestop {
        spec["containers"][0]["lifecycle"] = json!({"preStop": {"sleep": {"seconds": 15}}});
    }
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))
    .unwrap();
    scope
        .api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
}

/// Runs the binary against the sandbox; `env` entries with `None` are removed.
async fn nodedrain(args: Vec<String>, env: Vec<(&'static str, Option<String>)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nodedrain"));
        command
            .args(&args)
            .env("KUBECONFIG", var("KUBECONFIG"))
            .env_remove("RUST_LOG");
        for (key, value) in env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        command.output().expect("run nodedrain")
    })
    .await
    .unwrap()
}

fn report_of(output: &Output) -> Value {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/audit-report.schema.json"),
        )
        .expect("read the schema"),
    )
    .expect("the schema is JSON");
    let errors = validate(&schema, &report);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    report
}

/// The finding `id` of `kind/name`, if the report has it.
fn finding<'r>(report: &'r Value, kind: &str, name: &str, id: &str) -> Option<&'r Value> {
    report["workloads"]
        .as_array()?
        .iter()
        .filter(|w| w["kind"] == kind && w["name"] == name)
        .flat_map(|w| w["findings"].as_array().into_iter().flatten())
        .find(|f| f["id"] == id)
}

fn notes(report: &Value) -> Vec<String> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_what_load_balancers_break_and_survives_without_elbv2() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("audit-lb").await;
    let ns = scope.id.clone();
    ensure_binding_crd(&scope.client).await;
    let nodes = scope.nodes(1).await;
    let node = nodes[0].metadata.name.clone().unwrap();
    deployment(&scope, &node, "web", 3, false).await;
    deployment(&scope, &node, "api", 1, true).await;
    let web = ready_pods(&scope.pods(), "app=web", 3, Duration::from_secs(120)).await;
    let api = ready_pods(&scope.pods(), "app=api", 1, Duration::from_secs(120)).await;

    let elb = elbv2::Client::new(&scope.aws);
    let vpc = support::lb::vpc(&scope.aws).await;
    let group = support::aws::target_group_with_delay(
        &elb,
        elb.create_target_group()
            .name(format!("it-audit-{}", std::process::id()))
            .protocol(ProtocolEnum::Http)
            .port(8080)
            .vpc_id(&vpc)
            .target_type(TargetTypeEnum::Ip),
        300,
    )
    .await;
    for pod in web.iter().chain(&api) {
        support::lb::register(&elb, &group, &support::lb::ip_of(pod), 8080).await;
    }
    support::lbc::create_ip_binding(&scope.client, &ns, "web", &group, "web", 80)
        .await
        .expect("create the TargetGroupBinding");

    let endpoint = var("AWS_ENDPOINT_URL");
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = ["audit", "-n", &ns, "-o", "json", "--fail-on", "never"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let with_region = || vec![("AWS_REGION", Some(var("AWS_REGION")))];

    // Everything on: all three findings, and no note about ELBv2.
    let report =
        report_of(&nodedrain(args(&["--aws-endpoint-url", &endpoint]), with_region()).await);
    assert!(
        !notes(&report).iter().any(|n| n.contains("ELBv2")),
        "{:?}",
        notes(&report)
    );
    let delay = finding(
        &report,
        "TargetGroupBinding",
        "web",
        "deregistration-delay-exceeds-deadline",
    )
    .unwrap_or_else(|| panic!("no delay finding: {report:#}"));
    assert_eq!(delay["severity"], "warning");
    let message = delay["message"].as_str().unwrap();
    assert!(message.contains(&group), "{message}");
    assert!(message.contains("drain for 300 s"), "{message}");
    assert!(message.contains("leaves 110 s"), "{message}");
    let gate = finding(
        &report,
        "TargetGroupBinding",
        "web",
        "readiness-gate-not-injected",
    )
    .unwrap_or_else(|| panic!("no readiness-gate finding: {report:#}"));
    assert!(
        gate["fix"].as_str().unwrap().starts_with(&format!(
            "kubectl label namespace {ns} {READINESS_LABEL}=enabled"
        )),
        "{gate:#}"
    );
    let ip = finding(&report, "Deployment", "web", "ip-target-without-prestop")
        .unwrap_or_else(|| panic!("no ip-target finding: {report:#}"));
    assert_eq!(ip["severity"], "error");
    let message = ip["message"].as_str().unwrap();
    assert!(message.starts_with("3 of its 3 pods ("), "{message}");
    for pod in &web {
        let name = pod.metadata.name.as_deref().unwrap();
        assert!(message.contains(name), "{name} not named: {message}");
    }
    assert!(message.contains("deregistration delay 300 s"), "{message}");
    // api is a target too, but its preStop hook covers the draining.
    assert!(finding(&report, "Deployment", "api", "ip-target-without-prestop").is_none());

    // No region: the readiness-gate check still runs, the ELBv2 ones are skipped and say why.
    let no_region = vec![
        ("AWS_REGION", None),
        ("AWS_DEFAULT_REGION", None),
        ("NODEDRAIN_AWS_REGION", None),
    ];
    let report = report_of(&nodedrain(args(&[]), no_region.clone()).await);
    assert!(
        finding(
            &report,
            "TargetGroupBinding",
            "web",
            "readiness-gate-not-injected"
        )
        .is_some()
    );
    assert!(
        finding(
            &report,
            "TargetGroupBinding",
            "web",
            "deregistration-delay-exceeds-deadline"
        )
        .is_none()
    );
    assert!(finding(&report, "Deployment", "web", "ip-target-without-prestop").is_none());
    assert!(
        notes(&report)
            .iter()
            .any(|n| n.contains("ELBv2 checks") && n.contains("skipped: no AWS region is known")),
        "{:?}",
        notes(&report)
    );
    let text = nodedrain(
        vec!["audit".into(), "-n".into(), ns.clone()],
        no_region.clone(),
    )
    .await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("TargetGroupBinding {ns}/web\n")),
        "{text}"
    );
    assert!(text.contains("Note: ELBv2 checks"), "{text}");

    // ELBv2 unreachable: a note, the rest of the report as usual, the exit status from findings.
    let dead = format!("http://127.0.0.1:{}", support::aws::free_port());
    let output = nodedrain(args(&["--aws-endpoint-url", &dead]), with_region()).await;
    let report = report_of(&output);
    assert!(
        notes(&report)
            .iter()
            .any(|n| n.contains("skipped: ELBv2 DescribeTargetGroups failed")),
        "{:?}",
        notes(&report)
    );
    assert!(
        finding(
            &report,
            "TargetGroupBinding",
            "web",
            "readiness-gate-not-injected"
        )
        .is_some()
    );
    let gated = nodedrain(
        vec![
            "audit".into(),
            "-n".into(),
            ns.clone(),
            "--fail-on".into(),
            "warning".into(),
            "--aws-endpoint-url".into(),
            dead.clone(),
        ],
        with_region(),
    )
    .await;
    assert_eq!(gated.status.code(), Some(1), "the warnings still gate");

    // The label on the namespace and a 10-minute deadline remove both binding findings; the
    // pods still stop 270 s before their group's delay ends.
    let namespaces: Api<Namespace> = Api::all(scope.client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {READINESS_LABEL: "enabled"}}})),
        )
        .await
        .expect("label the namespace");
    let report = report_of(
        &nodedrain(
            args(&["--aws-endpoint-url", &endpoint, "--deadline", "10m"]),
            with_region(),
        )
        .await,
    );
    assert!(
        report["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["kind"] != "TargetGroupBinding"),
        "{report:#}"
    );
    assert!(finding(&report, "Deployment", "web", "ip-target-without-prestop").is_some());

    let _ = support::lbc::bindings(&scope.client, &ns)
        .delete("web", &Default::default())
        .await;
    let _ = elb
        .delete_target_group()
        .target_group_arn(&group)
        .send()
        .await;
    scope.cleanup().await;
}
