//! The chart's optional PrometheusRule and Grafana dashboard: rendered, linted, and every metric
//! their expressions use checked against the `/metrics` of a running controller, so a renamed
//! metric breaks this test rather than an alert in somebody's cluster.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use support::Sandbox;
use support::aws::{create_queue, send};
use support::chart::{helm, ok, render, the, value_args};
use support::controller::{Controller, Launch, event_id, instance_id, sqs, state_change_body};

const QUEUE: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/nodedrain-interruptions";

const ENABLED: &[(&str, &str)] = &[
    ("queue.url", QUEUE),
    ("prometheusRule.enabled", "true"),
    ("prometheusRule.labels.release", "kube-prometheus-stack"),
    ("prometheusRule.noLeaderFor", "10m"),
    ("prometheusRule.deadlineOverridesPerHour", "20"),
    ("grafanaDashboard.enabled", "true"),
    ("grafanaDashboard.namespace", "monitoring"),
    ("grafanaDashboard.annotations.grafana_folder", "Kubernetes"),
];

fn rendered() -> Vec<Value> {
    render("nodedrain", "nodedrain", None, ENABLED)
}

fn rules(objects: &[Value]) -> Vec<Value> {
    the(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .clone()
}

fn dashboard(objects: &[Value]) -> Value {
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "nodedrain-dashboard")
        .expect("dashboard ConfigMap");
    serde_json::from_str(config_map["data"]["nodedrain.json"].as_str().unwrap())
        .expect("the dashboard is JSON")
}

/// Every PromQL expression of the alerts and the dashboard.
fn expressions(objects: &[Value]) -> Vec<String> {
    let mut all: Vec<String> = rules(objects)
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    for panel in dashboard(objects)["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            all.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    all
}

/// The `nodedrain_*` series names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("nodedrain_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn off_by_default_and_lint_clean_when_on() {
    let defaults = render("nodedrain", "nodedrain", None, &[("queue.url", QUEUE)]);
    assert!(!defaults.iter().any(|o| o["kind"] == "PrometheusRule"));
    assert!(
        !defaults
            .iter()
            .any(|o| o["metadata"]["name"] == "nodedrain-dashboard")
    );
    let chart = support::chart::chart_dir().display().to_string();
    let mut args = vec!["lint".to_string(), chart, "--strict".to_string()];
    args.extend(value_args(None, ENABLED));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok("helm lint", helm(&args));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn the_rule_has_an_alert_for_each_failure_the_issue_names() {
    let objects = rendered();
    let rule = the(&objects, "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "nodedrain");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let by_name: BTreeMap<String, Value> = rules(&objects)
        .into_iter()
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(
        by_name.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "NodedrainDeadlineOverrides",
            "NodedrainDrainFailed",
            "NodedrainDrainStuck",
            "NodedrainMessagesDeadLettered",
            "NodedrainMessagesMalformed",
            "NodedrainNoLeader",
            "NodedrainNotificationsFailing",
            "NodedrainSqsReceiveFailing",
        ]
    );
    for (name, rule) in &by_name {
        let expr = rule["expr"].as_str().unwrap();
        assert!(
            expr.contains(r#"namespace="nodedrain""#),
            "{name} is scoped to the release: {expr}"
        );
        assert!(rule["labels"]["severity"].is_string(), "{name}");
        assert!(rule["annotations"]["summary"].is_string(), "{name}");
    }
    assert_eq!(by_name["NodedrainNoLeader"]["for"], "10m");
    assert_eq!(by_name["NodedrainSqsReceiveFailing"]["for"], "5m");
    assert!(
        by_name["NodedrainDeadlineOverrides"]["expr"]
            .as_str()
            .unwrap()
            .ends_with("[1h])) > 20")
    );
    assert!(
        by_name["NodedrainDrainStuck"]["expr"]
            .as_str()
            .unwrap()
            .contains("[30m:1m]")
    );
}

#[test]
fn the_dashboard_is_a_labelled_config_map_of_panels() {
    let objects = rendered();
    let config_map = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "nodedrain-dashboard")
        .unwrap();
    assert_eq!(config_map["metadata"]["namespace"], "monitoring");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        config_map["metadata"]["annotations"],
        json!({"grafana_folder": "Kubernetes"})
    );
    let dashboard = dashboard(&objects);
    assert_eq!(dashboard["uid"], "nodedrain");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            assert!(
                target["expr"]
                    .as_str()
                    .unwrap()
                    .contains(r#"namespace=~"$namespace""#),
                "{}",
                panel["title"]
            );
        }
    }
}

/// Reads `/metrics` of a controller running against the sandbox and checks that every metric
/// the alerts and the dashboard read is registered, with the type its suffix implies.
#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_read_is_served() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("obs-metrics").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "obs-metrics", &[]).await;
    // A selector no node matches: this controller touches nothing in the shared cluster.
    let selector = format!("{}={}", support::TEST_KEY, scope.id);
    let mut controller = Controller::start(Launch {
        name: "obs-metrics",
        queue_url: &queue,
        lease: None,
        extra: &[
            "--node-selector",
            &selector,
            "--notify-url",
            "http://127.0.0.1:9/unused",
        ],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    // Families with a per-error or per-result label appear at their first observation: one
    // drain (of an empty node of this scope) and one unparseable message create them.
    let node = &scope.nodes(1).await[0];
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap();
    send(
        &sqs,
        &queue,
        &state_change_body(&event_id("obs"), &instance_id(node), "stopping", now),
    )
    .await;
    send(&sqs, &queue, "not an EventBridge event").await;
    support::drain::eventually(
        Duration::from_secs(30),
        "a drain and a malformed message counted",
        || async {
            let text = controller.metrics().await;
            text.contains("nodedrain_drain_duration_seconds_count")
                && text.contains("nodedrain_messages_malformed_total")
        },
    )
    .await;
    let text = controller.metrics().await;
    let served: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split(' ');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    assert!(served.len() >= 14, "{text}");

    let objects = rendered();
    let mut used = BTreeSet::new();
    for expr in expressions(&objects) {
        used.extend(metric_names(&expr));
    }
    assert!(used.len() >= 14, "{used:?}");
    for name in &used {
        let (family, kind) = if let Some(base) = name.strip_suffix("_total") {
            (base, "counter")
        } else if let Some(base) = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
        {
            (base, "histogram")
        } else {
            (name.as_str(), "gauge")
        };
        assert_eq!(
            served.get(family).map(String::as_str),
            Some(kind),
            "{name} (read by an alert or the dashboard) is not served as a {kind}:\n{text}"
        );
    }
    controller.assert_running();
    drop(controller);
    scope.cleanup().await;
}
