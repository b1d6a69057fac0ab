//! AWS node-termination-handler (NTH), the benchmarks' peer, as a process beside the sandbox.
//!
//! NTH only knows in-cluster configuration (`rest.InClusterConfig`), so the harness supplies
//! what a pod would get: a ServiceAccount with its own chart's RBAC (rendered by `helm template`
//! from the chart kept beside the binary), a token from the TokenRequest API, the cluster's CA,
//! `KUBERNETES_SERVICE_HOST`/`PORT`, and the service-account files where client-go reads them
//! (`/var/run/secrets/kubernetes.io/serviceaccount/`, a constant that no setting overrides).
//! Those files are bind-mounted in a private mount namespace of NTH's own (`unshare --mount`),
//! so nothing is written to the machine's `/run` and two NTH processes never share a token.
//! docs/sandbox.md describes it for a person doing it by hand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::support::{TEST_KEY, var};

/// The line NTH logs once its monitors run; with its probes server off it has no readiness
/// endpoint.
const STARTED: &str = "Node Termination Handler has started successfully";
/// Where client-go's `InClusterConfig` reads the token and CA: fixed in client-go.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `script` with `sandbox/lib.sh` sourced and returns its output.
fn sandbox_shell(script: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source sandbox/lib.sh && {script}"))
        .arg("bash")
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The two NTH versions of `sandbox/versions.env`: (release, main).
pub fn versions() -> (String, String) {
    let both = sandbox_shell("echo \"$NTH_RELEASE $NTH_MAIN\"", &[]);
    let (release, main) = both.split_once(' ').expect("two NTH versions");
    (release.to_string(), main.to_string())
}

/// Builds both NTH versions unless cached (`sandbox/build.sh nth`), so the benchmark alone pays
/// for the Go build; returns the folder of `version`'s binary and chart.
pub fn build(version: &str) -> PathBuf {
    let status = Command::new(repo_root().join("sandbox/build.sh"))
        .arg("nth")
        .status()
        .expect("run sandbox/build.sh nth");
    assert!(status.success(), "sandbox/build.sh nth failed");
    PathBuf::from(sandbox_shell("nth_bin \"$1\"", &[version]))
}

/// NTH's identity in the cluster: a namespace, its chart's ServiceAccount, ClusterRole and
/// ClusterRoleBinding, and how a pod would reach the API server.
pub struct Identity {
    pub namespace: String,
    account: String,
    /// The rendered RBAC, kept to delete exactly what was applied.
    manifests: String,
    host: String,
    port: String,
    ca: Vec<u8>,
}

fn kubectl(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = Command::new(PathBuf::from(var("NODEDRAIN_SANDBOX_BIN")).join("kubectl"))
        .args(["--kubeconfig", &var("KUBECONFIG")])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to kubectl");
    assert!(child.wait().expect("kubectl").success(), "kubectl {args:?}");
}

impl Identity {
    /// Creates `namespace` and applies the RBAC of the chart in `nth_dir` (queue mode).
    pub async fn create(client: &kube::Client, namespace: &str, nth_dir: &Path) -> Identity {
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": namespace, "labels": {TEST_KEY: "true"}}}),
                )
                .unwrap(),
            )
            .await
            .expect("create NTH namespace");
        let chart = nth_dir.join("chart");
        // The release is named after the namespace: its ClusterRole is cluster-wide, and two
        // benchmark processes must not share one.
        let out = Command::new(var("NODEDRAIN_HELM"))
            .args(["template", namespace])
            .arg(&chart)
            .args(["--namespace", namespace])
            .args(["--set", "enableSqsTerminationDraining=true"])
            .args(["--show-only", "templates/serviceaccount.yaml"])
            .args(["--show-only", "templates/clusterrole.yaml"])
            .args(["--show-only", "templates/clusterrolebinding.yaml"])
            .output()
            .expect("run helm template");
        assert!(
            out.status.success(),
            "helm template {}: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let manifests = String::from_utf8(out.stdout).expect("utf-8");
        let account = manifests
            .split("\n---")
            .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
            .find(|doc| doc["kind"] == "ServiceAccount")
            .and_then(|doc| doc["metadata"]["name"].as_str().map(str::to_string))
            .expect("the chart renders a ServiceAccount");
        kubectl(&["apply", "-f", "-"], &manifests);
        let (host, port, ca) = api_server();
        Identity {
            namespace: namespace.to_string(),
            account,
            manifests,
            host,
            port,
            ca,
        }
    }

    /// A token for the ServiceAccount from the TokenRequest API, as the kubelet would project.
    async fn token(&self, client: &kube::Client) -> String {
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": {"audiences": [], "expirationSeconds": 7200}
        }))
        .unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), &self.namespace)
            .create_token_request(&self.account, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .and_then(|s| s.token)
            .expect("a token in the TokenRequest's status")
    }

    pub async fn remove(self, client: &kube::Client) {
        kubectl(
            &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
            &self.manifests,
        );
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

/// The API server's host, port and CA certificate (PEM) from the sandbox's kubeconfig.
fn api_server() -> (String, String, Vec<u8>) {
    let path = PathBuf::from(var("KUBECONFIG"));
    let config = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cluster = config
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .expect("a cluster in the kubeconfig");
    let server = cluster.server.expect("server");
    let authority = server
        .strip_prefix("https://")
        .expect("an https server")
        .trim_end_matches('/');
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    let ca = match (
        cluster.certificate_authority_data,
        cluster.certificate_authority,
    ) {
        (Some(data), _) => {
            let out = Command::new("base64")
                .arg("-d")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(data.as_bytes())?;
                    child.wait_with_output()
                })
                .expect("base64 -d");
            out.stdout
        }
        (None, Some(file)) => {
            let file = path.parent().unwrap_or(Path::new("/")).join(file);
            std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        }
        (None, None) => panic!("the kubeconfig names no CA"),
    };
    (
        host.trim_matches(['[', ']']).to_string(),
        port.to_string(),
        ca,
    )
}

/// One NTH process in queue mode.
pub struct Nth {
    child: Child,
    log: PathBuf,
    secrets: PathBuf,
    started: Instant,
}

impl Nth {
    /// Starts `binary` in queue mode on `queue_url`, with the settings of docs/sandbox.md plus
    /// `extra` (`KEY=value` pairs that override them). `node_name` is the node it would run on:
    /// NTH refuses to start without one, even in queue mode, where it does not use it.
    pub async fn start(
        client: &kube::Client,
        identity: &Identity,
        binary: &Path,
        queue_url: &str,
        node_name: &str,
        extra: &[(&str, &str)],
    ) -> Nth {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            crate::support::aws::free_port()
        );
        let secrets = std::env::temp_dir().join(format!("nth-serviceaccount-{tag}"));
        std::fs::create_dir_all(&secrets).expect("create service-account folder");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
        }
        std::fs::write(secrets.join("token"), identity.token(client).await).expect("token");
        std::fs::write(secrets.join("ca.crt"), &identity.ca).expect("ca.crt");
        std::fs::write(secrets.join("namespace"), &identity.namespace).expect("namespace");
        let log = std::env::temp_dir().join(format!("nth-bench-{tag}.log"));
        let file = std::fs::File::create(&log).expect("create NTH log");
        // /var/run is /run; a tmpfs over /run in NTH's own mount namespace holds the mount point,
        // so the machine's /run is left as it was. `exec` keeps one process id from unshare to
        // NTH, so its CPU and memory are read from the child's pid.
        let script = format!(
            "mount -t tmpfs -o size=1m,mode=755 nth-run /run && mkdir -p {SERVICE_ACCOUNT_DIR} \
             && mount --bind \"$1\" {SERVICE_ACCOUNT_DIR} && exec \"$2\""
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(script)
            .arg("nth")
            .arg(&secrets)
            .arg(binary)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // The AWS SDK reads shared config from HOME; the machine's must not leak in.
            .env("HOME", &secrets)
            .env("KUBERNETES_SERVICE_HOST", &identity.host)
            .env("KUBERNETES_SERVICE_PORT", &identity.port)
            .env("NODE_NAME", node_name)
            .env("POD_NAME", "aws-node-termination-handler-bench")
            .env("NAMESPACE", &identity.namespace)
            .env("ENABLE_SQS_TERMINATION_DRAINING", "true")
            .env("QUEUE_URL", queue_url)
            .env("AWS_REGION", var("AWS_REGION"))
            .env("AWS_ENDPOINT", var("AWS_ENDPOINT_URL"))
            .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
            // The bench's instances carry no aws-node-termination-handler/managed tag.
            .env("CHECK_TAG_BEFORE_DRAINING", "false")
            .env("IGNORE_DAEMON_SETS", "true")
            .env("DELETE_LOCAL_DATA", "true")
            // -1: each pod's own terminationGracePeriodSeconds.
            .env("POD_TERMINATION_GRACE_PERIOD", "-1");
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start NTH under unshare");
        Nth {
            child,
            log,
            secrets,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the start-up log line; returns the time since the process started.
    pub async fn wait_started(&mut self, timeout: Duration) -> Duration {
        loop {
            if self.log().contains(STARTED) {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("NTH exited with {status}:\n{}", self.log_tail(30));
            }
            assert!(
                self.started.elapsed() < timeout,
                "NTH not started within {timeout:?}:\n{}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::support::bench::tail(&self.log(), lines)
    }
}

impl Drop for Nth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.secrets);
        if std::env::var("BENCH_KEEP_LOGS").is_err() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("NTH log kept: {}", self.log.display());
        }
    }
}
