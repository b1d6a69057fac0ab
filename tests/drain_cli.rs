//! The real binary: `nodedrain plan`, `drain` and `uncordon` against the sandbox, judged by
//! their output and exit status.

mod support;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use nodedrain::names;
use serde_json::{Value, json};
use support::drain::{
    deployment, deployment_on_first_node, name_of, on_node, pdb, pod, wait_for_budget,
};
use support::{Sandbox, ready_pods};

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn nodedrain(sandbox: &Sandbox, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_nodedrain"))
        .args(args)
        .env("KUBECONFIG", &sandbox.kubeconfig)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nodedrain");
    let out = Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    println!(
        "$ nodedrain {}\n{}{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

#[tokio::test]
async fn plan_drain_and_uncordon_from_the_command_line() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("cli").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    let pods = scope.pods();
    on_node(&scope, &nodes, &target, || async {
        deployment(&scope, "web", 2, 1, json!({})).await;
        pod(
            &scope,
            "bare",
            json!({"app": "bare"}),
            json!({}),
            None,
            json!({}),
            1,
        )
        .await;
        ready_pods(&pods, "app=web", 2, Duration::from_secs(60)).await;
        ready_pods(&pods, "app=bare", 1, Duration::from_secs(60)).await;
    })
    .await;
    pdb(&scope, "web", "web", json!({"maxUnavailable": 1})).await;
    wait_for_budget(&scope, "web", 1).await;
    let web: Vec<String> = ready_pods(&pods, "app=web", 2, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    let ns = scope.id.clone();

    // plan: the table, nothing changed.
    let plan = nodedrain(&sandbox, &["plan", &target]);
    assert_eq!(plan.code, Some(0));
    assert!(plan.stdout.contains("WAVE  POD"), "{}", plan.stdout);
    for name in &web {
        let row = plan
            .stdout
            .lines()
            .find(|l| l.contains(&format!("{ns}/{name}")))
            .unwrap_or_else(|| panic!("{name} in the plan"));
        assert!(row.contains("Deployment/web"), "{row}");
        assert!(row.contains("evict"), "{row}");
        assert!(row.contains("web (1)"), "{row}");
    }
    assert!(
        plan.stdout.contains(&format!(
            "Refused: cannot delete Pods that declare no controller (use --force to override): {ns}/bare"
        )),
        "{}",
        plan.stdout
    );
    let json_plan = nodedrain(&sandbox, &["plan", &target, "--force", "-o", "json"]);
    assert_eq!(json_plan.code, Some(0));
    let parsed: Value = serde_json::from_str(&json_plan.stdout).expect("json");
    assert_eq!(parsed["nodes"][0]["node"], target.as_str());
    assert_eq!(
        parsed["nodes"][0]["plan"]["steps"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let node_api: Api<Node> = Api::all(scope.client.clone());
    let untouched = node_api.get(&target).await.unwrap();
    assert_ne!(untouched.spec.as_ref().unwrap().unschedulable, Some(true));

    // plan of a node that does not exist.
    let missing = nodedrain(&sandbox, &["plan", "no-such-node"]);
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("node \"no-such-node\" not found"),
        "{}",
        missing.stderr
    );

    // drain --dry-run: the plan again, still nothing changed.
    let dry = nodedrain(
        &sandbox,
        &[
            "drain",
            &target,
            "--ignore-daemonsets",
            "--force",
            "--dry-run",
        ],
    );
    assert_eq!(dry.code, Some(0));
    assert!(dry.stdout.contains("dry run"), "{}", dry.stdout);
    assert_ne!(
        node_api
            .get(&target)
            .await
            .unwrap()
            .spec
            .unwrap()
            .unschedulable,
        Some(true)
    );

    // drain without --force: refused like kubectl, the node stays cordoned.
    let refused = nodedrain(&sandbox, &["drain", &target, "--ignore-daemonsets"]);
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains(&format!(
            "error: unable to drain node \"{target}\": cannot delete Pods that declare no controller (use --force to override): {ns}/bare"
        )),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("Nothing was evicted"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("stays cordoned"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        node_api
            .get(&target)
            .await
            .unwrap()
            .spec
            .unwrap()
            .unschedulable,
        Some(true)
    );

    // drain --force, piped: one line per pod state change, a summary, exit 0.
    let drained = nodedrain(
        &sandbox,
        &[
            "drain",
            &target,
            "--ignore-daemonsets",
            "--force",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(drained.code, Some(0), "{}", drained.stderr);
    let lines: Vec<&str> = drained.stdout.lines().collect();
    assert_eq!(lines[0], format!("node/{target} cordoned"));
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{ns}/"))
            && l.contains("  evicting (PDB web allows 1, grace 1s)")),
        "{}",
        drained.stdout
    );
    for name in web.iter().map(String::as_str).chain(["bare"]) {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{ns}/{name}  gone after "))),
            "{name}: {}",
            drained.stdout
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("drained node/{target} in ")),
        "{}",
        drained.stdout
    );

    // uncordon: everything nodedrain put on the node is gone again.
    let uncordoned = nodedrain(&sandbox, &["uncordon", &target]);
    assert_eq!(uncordoned.code, Some(0));
    assert_eq!(
        uncordoned.stdout.trim(),
        format!("node/{target} uncordoned")
    );
    let node = node_api.get(&target).await.unwrap();
    let spec = node.spec.clone().unwrap();
    assert_ne!(spec.unschedulable, Some(true));
    assert!(
        !spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == names::TAINT_INTERRUPTION)
    );
    assert!(
        !node
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .contains_key(names::LABEL_EXCLUDE_FROM_LB)
    );
    assert!(
        !node
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .contains_key(names::ANNOTATION_DRAIN_RECORD)
    );
    let again = nodedrain(&sandbox, &["uncordon", &target, "no-such-node"]);
    assert_eq!(again.code, Some(1));
    assert!(
        again
            .stdout
            .contains(&format!("node/{target} already uncordoned"))
    );
    assert!(
        again.stderr.contains("node \"no-such-node\" not found"),
        "{}",
        again.stderr
    );
    scope.cleanup().await;
}

#[tokio::test]
async fn a_voluntary_drain_that_times_out_names_what_blocked_it() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("cli-timeout").await;
    let (_, target) = deployment_on_first_node(&scope, 2, "stuck", 1, 1, json!({})).await;
    let pods = scope.pods();
    pdb(&scope, "stuck", "stuck", json!({"minAvailable": 1})).await;
    wait_for_budget(&scope, "stuck", 0).await;
    let stuck = ready_pods(&pods, "app=stuck", 1, Duration::from_secs(5)).await[0]
        .metadata
        .name
        .clone()
        .unwrap();

    let out = nodedrain(
        &sandbox,
        &["drain", &target, "--ignore-daemonsets", "--timeout", "3s"],
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("error: drain timed out after 3."),
        "{}",
        out.stderr
    );
    let row = out
        .stderr
        .lines()
        .find(|l| l.contains(&format!("{}/{stuck}", scope.id)))
        .unwrap_or_else(|| panic!("{stuck} named: {}", out.stderr));
    assert!(row.contains("PDB stuck allows 0 disruptions"), "{row}");
    assert!(out.stderr.contains("stays cordoned"), "{}", out.stderr);
    assert!(
        pods.get(&stuck)
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    // The same as JSON.
    let json_out = nodedrain(
        &sandbox,
        &[
            "drain",
            &target,
            "--ignore-daemonsets",
            "--timeout",
            "2s",
            "-o",
            "json",
        ],
    );
    assert_eq!(json_out.code, Some(1));
    let report: Value = serde_json::from_str(&json_out.stdout).expect("json report");
    assert_eq!(report["outcome"], "timedOut");
    let pod = &report["nodes"][0]["pods"][0];
    assert_eq!(pod["gone"], false);
    assert_eq!(pod["blocker"]["kind"], "pdb");
    assert_eq!(pod["blocker"]["name"], "stuck");
    assert_eq!(pod["blocker"]["disruptionsAllowed"], 0);
    scope.cleanup().await;
}
