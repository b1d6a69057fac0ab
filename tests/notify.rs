//! Webhook notifications end to end on the sandbox: the real controller binary posting to a
//! local HTTP receiver this test starts, for real drains.
//!
//! Each controller here runs with `--node-selector` on its own scope's nodes: it neither resumes
//! other tests' drain records nor needs the stale-node sweep of tests/controller.rs (which
//! would delete the nodes of controller tests running at the same time in another process).

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};
use support::aws::{create_queue, send, wait_empty};
use support::controller::{
    Controller, Launch, event_id, instance_id, phase, report, sqs, state_change_body, wait_node,
};
use support::drain::{deployment, eventually, name_of, on_node, pdb, wait_for_budget};
use support::{Sandbox, Scope, TEST_KEY, ready_pods};

/// How the receiver answers.
const ANSWER_OK: u8 = 0;
const ANSWER_500: u8 = 1;
/// Never answers (holds the connection open).
const ANSWER_HANG: u8 = 2;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    /// As on the request line: absolute (`http://host/path`) when it came through a proxy.
    uri: String,
    host: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Received>>>,
    answer: Arc<AtomicU8>,
}

impl Receiver {
    /// Starts the receiver on a free local port; returns it and its base URL.
    async fn start() -> (Receiver, String) {
        async fn handle(
            State(receiver): State<Receiver>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let body = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            receiver.requests.lock().unwrap().push(Received {
                uri: uri.to_string(),
                host: headers
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body,
            });
            match receiver.answer.load(Ordering::SeqCst) {
                ANSWER_500 => StatusCode::INTERNAL_SERVER_ERROR,
                ANSWER_HANG => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                ANSWER_OK => StatusCode::OK,
                other => unreachable!("no answer {other}"),
            }
        }
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (receiver, format!("http://{addr}"))
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    fn bodies_of(&self, event: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .map(|r| r.body)
            .filter(|b| b["event"] == json!(event))
            .collect()
    }
}

/// A controller acting only on `scope`'s nodes, posting notifications as `notify` says.
async fn start(scope: &Scope, name: &str, queue: &str, notify: &[&str]) -> Controller {
    let selector = format!("{TEST_KEY}={}", scope.id);
    let mut extra = vec![
        "--node-selector",
        selector.as_str(),
        "--deadline-margin",
        MARGIN,
    ];
    extra.extend_from_slice(notify);
    let mut controller = Controller::start(Launch {
        name,
        queue_url: queue,
        lease: None,
        extra: &extra,
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    controller
}

/// A state change to `stopping`, dated [`DEADLINE_IN`] ahead: the drain's deadline. With
/// [`MARGIN`] and the pods' 1 s grace, a pod whose PDB blocks its eviction is deleted about
/// 11 s after the message (sooner, with the deadline already past, the engine would delete it
/// without asking its PDB first, which is no override).
fn stopping(node: &Node) -> String {
    let at = Timestamp::from_second(Timestamp::now().as_second() + DEADLINE_IN).unwrap();
    state_change_body(&event_id("stop"), &instance_id(node), "stopping", at)
}

const DEADLINE_IN: i64 = 14;
const MARGIN: &str = "2s";

async fn wait_drained(scope: &Scope, node: &str) {
    wait_node(scope, node, Duration::from_secs(60), "phase drained", |n| {
        phase(n).as_deref() == Some("drained")
    })
    .await;
}

fn nodes_of(body: &Value) -> BTreeSet<String> {
    body["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {body}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_drains_is_notified_coalesced_through_the_proxy() {
    let started = Instant::now();
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("ntf-burst").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ntf-burst", &[]).await;
    let nodes = scope.nodes(4).await;
    let victims: BTreeSet<String> = nodes[..3].iter().map(name_of).collect();
    let guarded_node = name_of(&nodes[0]);
    // A single replica whose PDB never allows a disruption, on the first victim: deleted at
    // the deadline.
    on_node(&scope, &nodes, &guarded_node, || async {
        deployment(&scope, "guarded", 1, 1, json!({})).await;
        ready_pods(&scope.pods(), "app=guarded", 1, Duration::from_secs(30)).await;
    })
    .await;
    pdb(&scope, "guarded", "guarded", json!({"maxUnavailable": 0})).await;
    wait_for_budget(&scope, "guarded", 0).await;
    let guarded_pod = ready_pods(&scope.pods(), "app=guarded", 1, Duration::from_secs(5)).await[0]
        .metadata
        .name
        .clone()
        .unwrap();

    // The webhook's host does not resolve: only the proxy (the receiver) can deliver.
    let (receiver, proxy) = Receiver::start().await;
    let mut controller = start(
        &scope,
        "ntf-burst",
        &queue,
        &[
            "--notify-url",
            "http://hooks.nodedrain.invalid/services/T0/B0/secret",
            "--notify-proxy",
            &proxy,
            "--notify-format",
            "json",
            "--notify-coalesce-window",
            "2s",
        ],
    )
    .await;

    for node in &nodes[..3] {
        send(&sqs, &queue, &stopping(node)).await;
    }
    for victim in &victims {
        wait_drained(&scope, victim).await;
    }
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    let drained_nodes = |r: &Receiver| {
        r.bodies_of("succeeded")
            .iter()
            .flat_map(nodes_of)
            .collect::<BTreeSet<_>>()
    };
    eventually(
        Duration::from_secs(30),
        "every drain notified as succeeded",
        || {
            let receiver = receiver.clone();
            let victims = victims.clone();
            async move { drained_nodes(&receiver) == victims }
        },
    )
    .await;

    let requests = receiver.requests();
    for request in &requests {
        assert_eq!(
            request.uri, "http://hooks.nodedrain.invalid/services/T0/B0/secret",
            "through the proxy, in absolute form"
        );
        assert_eq!(request.host, "hooks.nodedrain.invalid");
        assert_eq!(request.body["source"], json!("nodedrain"));
        assert_eq!(request.body["kind"], json!("state-change"));
    }

    // Three interruptions read together: one message for all three.
    let received = receiver.bodies_of("received");
    assert_eq!(received.len(), 1, "one coalesced message: {received:#?}");
    assert_eq!(received[0]["count"], json!(3));
    assert_eq!(nodes_of(&received[0]), victims);
    assert_eq!(
        received[0]["eventId"],
        Value::Null,
        "three events, no single id"
    );
    assert!(
        received[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("3 nodes cordoned for state-change: "),
        "{}",
        received[0]["text"]
    );
    let started_nodes: BTreeSet<String> = receiver
        .bodies_of("started")
        .iter()
        .flat_map(nodes_of)
        .collect();
    assert_eq!(started_nodes, victims);

    let overrides = receiver.bodies_of("deadline-override");
    assert_eq!(overrides.len(), 1, "{overrides:#?}");
    assert_eq!(
        nodes_of(&overrides[0]),
        BTreeSet::from([guarded_node.clone()])
    );
    assert_eq!(
        overrides[0]["details"],
        json!([format!("{}/{guarded_pod}", scope.id)])
    );
    assert!(receiver.bodies_of("failed").is_empty());

    // 3 received + 3 started + 3 succeeded + 1 override = 10 notices, in far fewer posts.
    let metrics = controller.metrics().await;
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sum("nodedrain_notification_events_total{event=\"received\",outcome=\"queued\"}"),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        sum("nodedrain_notification_events_total{"),
        10.0,
        "{metrics}"
    );
    let sent = sum("nodedrain_notifications_total{");
    assert_eq!(sent as usize, requests.len(), "{metrics}");
    assert!(
        requests.len() <= 6,
        "{} posts for 10 notices",
        requests.len()
    );
    assert_eq!(
        controller
            .metric("nodedrain_notifications_total{event=\"received\",outcome=\"sent\"}")
            .await,
        1.0
    );
    assert!(
        !controller.log().contains("secret"),
        "the webhook URL is a credential and never logged"
    );
    controller.assert_running();
    drop(controller);
    scope.cleanup().await;
    report("notify burst", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_500_or_hanging_changes_nothing_in_the_drain() {
    let started = Instant::now();
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("ntf-fail").await;
    let sqs = sqs().await;
    let queue = create_queue(&sqs, "ntf-fail", &[]).await;
    let nodes = scope.nodes(3).await;
    let (first, second) = (name_of(&nodes[0]), name_of(&nodes[1]));
    // A single replica behind a PDB that allows no disruption on each victim: every drain
    // has a deadline override, the notice most worth having.
    for (node, app) in [(&first, "one"), (&second, "two")] {
        on_node(&scope, &nodes, node, || async {
            deployment(&scope, app, 1, 1, json!({})).await;
            ready_pods(
                &scope.pods(),
                &format!("app={app}"),
                1,
                Duration::from_secs(30),
            )
            .await;
        })
        .await;
        pdb(&scope, app, app, json!({"maxUnavailable": 0})).await;
        wait_for_budget(&scope, app, 0).await;
    }

    let (receiver, url) = Receiver::start().await;
    receiver.answer.store(ANSWER_500, Ordering::SeqCst);
    let mut controller = start(
        &scope,
        "ntf-fail",
        &queue,
        &[
            "--notify-url",
            &format!("{url}/hook"),
            "--notify-coalesce-window",
            "1s",
            // Longer than the whole drain below: if a post held the drain up, the drain would
            // end after the first timeout.
            "--notify-timeout",
            "40s",
        ],
    )
    .await;

    // Every post refused with 500.
    let began = Instant::now();
    send(&sqs, &queue, &stopping(&nodes[0])).await;
    wait_drained(&scope, &first).await;
    let with_500 = began.elapsed();
    ready_pods(&scope.pods(), "app=one", 1, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(30), "refused posts counted", || async {
        controller
            .metric("nodedrain_notifications_total{event=\"succeeded\",outcome=\"rejected\"}")
            .await
            == 1.0
    })
    .await;
    // Slack's body: text only.
    let bodies: Vec<Value> = receiver.requests().into_iter().map(|r| r.body).collect();
    let texts: Vec<&str> = bodies.iter().filter_map(|b| b["text"].as_str()).collect();
    assert!(
        texts.iter().any(|t| t.starts_with(&format!(
            "Node {first} cordoned for state-change; deadline "
        ))),
        "{bodies:#?}"
    );
    assert!(
        texts.iter().any(|t| t.starts_with(&format!(
                "Deadline reached on node {first} (state-change): 1 pod deleted although a PodDisruptionBudget blocked it ({}/one-",
            scope.id
        ))),
        "{bodies:#?}"
    );
    assert!(bodies.iter().all(|b| b.as_object().unwrap().len() == 1));

    // Now the webhook takes every request and never answers.
    receiver.answer.store(ANSWER_HANG, Ordering::SeqCst);
    let before = receiver.requests().len();
    let began = Instant::now();
    send(&sqs, &queue, &stopping(&nodes[1])).await;
    wait_drained(&scope, &second).await;
    let with_hang = began.elapsed();
    ready_pods(&scope.pods(), "app=two", 1, Duration::from_secs(30)).await;
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    assert!(
        receiver.requests().len() > before,
        "the hanging webhook got a post"
    );
    // The drain was over before the first hanging post could even time out.
    assert_eq!(
        controller
            .metric("nodedrain_notifications_total{event=\"received\",outcome=\"timeout\"}")
            .await,
        0.0
    );
    assert!(
        with_hang < Duration::from_secs(40),
        "drain took {with_hang:?} with a hanging webhook"
    );
    eprintln!("drain with a 500 webhook: {with_500:?}; with a hanging one: {with_hang:?}");
    // Nothing was dropped: the queue never filled.
    let metrics = controller.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("outcome=\"dropped\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
    controller.assert_running();

    // A stop is not held up by the hanging post beyond the shutdown flush.
    let stopping_at = Instant::now();
    controller.terminate(Duration::from_secs(20)).await;
    assert!(
        stopping_at.elapsed() < Duration::from_secs(15),
        "stopped in {:?}",
        stopping_at.elapsed()
    );
    drop(controller);
    scope.cleanup().await;
    report("notify failing webhook", started);
}
