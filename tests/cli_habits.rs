//! What people used to kubectl expect from the binary: it runs as the kubectl plugin
//! `kubectl-nodedrain`, prints shell completions and its versions. Against the sandbox where a
//! cluster is involved.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::{Value, json};
use support::drain::{deployment, name_of, on_node};
use support::{Sandbox, ready_pods, var};

/// A directory holding `kubectl-nodedrain`, a symlink to the binary under test, as
/// docs/install.md and the image create it.
fn plugin_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodedrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_nodedrain"),
        dir.join("kubectl-nodedrain"),
    )
    .unwrap();
    dir
}

/// The sandbox's kubectl with `dir` first on PATH.
fn kubectl(sandbox: &Sandbox, dir: &Path, args: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(Path::new(&var("NODEDRAIN_SANDBOX_BIN")).join("kubectl"))
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &sandbox.kubeconfig)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kubectl");
    println!(
        "$ kubectl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn kubectl_runs_nodedrain_as_a_plugin() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("plugin").await;
    let nodes = scope.nodes(2).await;
    let target = name_of(&nodes[0]);
    on_node(&scope, &nodes, &target, || async {
        deployment(&scope, "app", 1, 1, json!({})).await;
        ready_pods(&scope.pods(), "app=app", 1, Duration::from_secs(30)).await;
    })
    .await;
    let dir = plugin_dir("plugin");

    let list = kubectl(&sandbox, &dir, &["plugin", "list"]);
    assert!(
        stdout(&list).contains(&dir.join("kubectl-nodedrain").display().to_string()),
        "kubectl finds the plugin"
    );
    let help = kubectl(&sandbox, &dir, &["nodedrain", "--help"]);
    assert!(help.status.success());
    assert!(
        stdout(&help).contains("Usage: kubectl nodedrain <COMMAND>"),
        "usage names the plugin as typed"
    );
    let error = kubectl(&sandbox, &dir, &["nodedrain", "drian"]);
    assert_eq!(error.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&error.stderr).contains("Usage: kubectl nodedrain"));

    // A real drain through kubectl: same engine, same exit status.
    let drain = kubectl(
        &sandbox,
        &dir,
        &["nodedrain", "drain", &target, "--timeout", "60s"],
    );
    assert!(drain.status.success(), "drain through kubectl");
    assert!(stdout(&drain).contains(&format!("node/{target} cordoned")));
    let node = Api::<Node>::all(scope.client.clone())
        .get(&target)
        .await
        .unwrap();
    assert_eq!(node.spec.unwrap().unschedulable, Some(true));
    let left: Vec<_> = scope
        .pods()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(target.as_str())
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    assert!(left.is_empty(), "pods left on {target}: {left:?}");
    let uncordon = kubectl(&sandbox, &dir, &["nodedrain", "uncordon", &target]);
    assert!(uncordon.status.success());

    let _ = std::fs::remove_dir_all(&dir);
    scope.cleanup().await;
}

/// The Kubernetes API version `nodedrain version` reports is the one of the cluster the tests
/// run against (the sandbox runs the version k8s-openapi's feature names).
#[tokio::test]
async fn version_names_the_kubernetes_api_the_sandbox_serves() {
    let sandbox = Sandbox::connect().await;
    let output = Command::new(env!("CARGO_BIN_EXE_nodedrain"))
        .args(["version", "-o", "json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let ours: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(ours["version"], env!("CARGO_PKG_VERSION"));
    let server = sandbox.client.apiserver_version().await.unwrap();
    assert_eq!(
        ours["kubernetesApi"],
        json!(format!(
            "{}.{}",
            server.major,
            server.minor.trim_end_matches('+')
        ))
    );
    let text = Command::new(env!("CARGO_BIN_EXE_nodedrain"))
        .arg("version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("nodedrain {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Kubernetes API: v{}\n",
            ours["kubernetesApi"].as_str().unwrap()
        )),
        "{text}"
    );
}

/// The bash script loads in bash and completes subcommands and flags.
#[test]
fn the_bash_completion_loads_and_completes() {
    let script = format!(
        r#"source <("{bin}" completion bash) || exit 3
complete -p nodedrain || exit 4
COMP_WORDS=(nodedrain dr); COMP_CWORD=1; _nodedrain nodedrain dr nodedrain; echo "${{COMPREPLY[@]}}"
COMP_WORDS=(nodedrain drain --pod-s); COMP_CWORD=2; _nodedrain nodedrain --pod-s drain; echo "${{COMPREPLY[@]}}""#,
        bin = env!("CARGO_BIN_EXE_nodedrain")
    );
    let output = Command::new("bash").arg("-c").arg(script).output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    println!("{out}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success());
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("complete") && lines[0].ends_with("nodedrain"),
        "{out}"
    );
    assert_eq!(lines[1], "drain", "{out}");
    assert_eq!(lines[2], "--pod-selector", "{out}");
}
