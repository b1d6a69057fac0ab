//! The Helm chart from the tests' side: running the sandbox's helm and kubectl, rendering the
//! chart into JSON objects, and comparing what the apiserver holds with what was rendered.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::var;

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/nodedrain")
}

/// A fresh directory for one test's files (values, manifests, kubeconfigs, logs), under the
/// system's temporary directory rather than the shared target directory, which a concurrent
/// `cargo clean` may remove mid-test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join("nodedrain-tests").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn run(mut command: Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// The sandbox's helm (`NODEDRAIN_HELM`) against the sandbox cluster.
pub fn helm(args: &[&str]) -> Output {
    let mut command = Command::new(var("NODEDRAIN_HELM"));
    command.args(args).env("KUBECONFIG", var("KUBECONFIG"));
    run(command)
}

/// The sandbox's kubectl (`NODEDRAIN_SANDBOX_BIN/kubectl`), with the sandbox's admin kubeconfig
/// unless `args` name another.
pub fn kubectl(args: &[&str]) -> Output {
    let mut command = Command::new(Path::new(&var("NODEDRAIN_SANDBOX_BIN")).join("kubectl"));
    command.args(args).env("KUBECONFIG", var("KUBECONFIG"));
    run(command)
}

/// stdout of a command that must succeed; otherwise a panic with its stderr.
pub fn ok(what: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// stderr of a command that must fail; otherwise a panic with its stdout.
pub fn fails(what: &str, output: Output) -> String {
    assert!(
        !output.status.success(),
        "{what} should have failed but succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `--set` pairs and an optional values file, as helm arguments.
pub fn value_args(values: Option<&Path>, set: &[(&str, &str)]) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(file) = values {
        args.push("--values".to_string());
        args.push(file.display().to_string());
    }
    for (key, value) in set {
        args.push("--set".to_string());
        args.push(format!("{key}={value}"));
    }
    args
}

/// `helm template` of the chart; Err(stderr) when helm refuses the values.
pub fn try_render(
    release: &str,
    namespace: &str,
    values: Option<&Path>,
    set: &[(&str, &str)],
) -> Result<Vec<Value>, String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec![
        "template".to_string(),
        release.to_string(),
        chart,
        "--namespace".to_string(),
        namespace.to_string(),
    ];
    args.extend(value_args(values, set));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = helm(&args);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(parse_manifests(&String::from_utf8_lossy(&output.stdout)))
}

pub fn render(
    release: &str,
    namespace: &str,
    values: Option<&Path>,
    set: &[(&str, &str)],
) -> Vec<Value> {
    try_render(release, namespace, values, set)
        .unwrap_or_else(|e| panic!("helm template failed:\n{e}"))
}

/// Every non-empty document of a multi-document YAML stream, as JSON.
pub fn parse_manifests(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm renders valid YAML")
        .into_iter()
        .filter(|value| !value.is_null())
        .collect()
}

/// The rendered object of `kind` (any name); panics unless there is exactly one.
pub fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, rendered: {:?}",
        kinds(objects)
    );
    found[0]
}

pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    kinds.sort();
    kinds
}

/// The controller container of the rendered Deployment.
pub fn container(objects: &[Value]) -> &Value {
    &the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

/// The container's environment: name -> plain value, or the JSON of its `valueFrom`.
pub fn env(objects: &[Value]) -> std::collections::BTreeMap<String, String> {
    container(objects)["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = match e.get("value") {
                Some(Value::String(s)) => s.clone(),
                _ => e["valueFrom"].to_string(),
            };
            (name, value)
        })
        .collect()
}

/// Where `actual` (an object read back from the apiserver, with defaults filled in) does not
/// contain `expected` (as rendered): every field rendered must be there with the same value;
/// fields the apiserver added are ignored. Lists must have the same length.
pub fn differences(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, ev) in e {
                match a.get(key) {
                    Some(av) => differences(ev, av, &format!("{path}.{key}"), out),
                    // An empty map or list rendered is the same as none.
                    None if is_empty(ev) => {}
                    None => out.push(format!("{path}.{key}: missing (expected {ev})")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                differences(ev, av, &format!("{path}[{i}]"), out);
            }
        }
        // Numbers may come back as strings where the API type is a string (env values), and
        // the other way round for int-or-string fields.
        (e, a) if e == a || scalar_text(e).is_some() && scalar_text(e) == scalar_text(a) => {}
        (e, a) => out.push(format!("{path}: expected {e}, found {a}")),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
