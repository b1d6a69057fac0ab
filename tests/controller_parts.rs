//! The controller's building blocks against the sandbox: the SQS intake on moto (each test with
//! its own queue, or its own moto server for outages), the node resolver on the cluster and
//! moto's EC2, and leader election on a real Lease.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use nodedrain::admin::Readiness;
use nodedrain::config::LeaseConfig;
use nodedrain::controller::leader::LeaderElector;
use nodedrain::interruption::events::{Interruption, InterruptionKind};
use nodedrain::interruption::sqs::{self, Delivery, Intake, IntakeConfig, MalformedPolicy};
use nodedrain::metrics::Metrics;
use nodedrain::resolve::{ManagedTag, NodeWatch, Resolution, Resolver};
use prometheus_client::registry::Registry;
use serde_json::json;
use support::aws::{
    CutProxy, Moto, create_queue, depth, free_port, queue_arn, sdk_config, send, wait_empty,
};
use support::controller::{Controller, Launch};
use support::drain::{eventually, instance_of};
use support::{Sandbox, TEST_KEY, var};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/events/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A spot warning for `instance`, with its own event id.
fn spot(event_id: &str, instance: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&fixture("spot-interruption-warning.json")).unwrap();
    v["id"] = json!(event_id);
    v["detail"]["instance-id"] = json!(instance);
    v.to_string()
}

async fn sandbox_sqs() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&sdk_config(&var("AWS_ENDPOINT_URL")).await)
}

/// Everything the handler was given, in order.
type Seen = Arc<Mutex<Vec<Interruption>>>;

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    registry: Arc<Registry>,
}

impl Running {
    fn metrics_text(&self) -> String {
        nodedrain::metrics::encode(&self.registry)
    }

    fn metric(&self, series: &str) -> u64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn stop(self) {
        self.cancel.cancel();
        timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the intake stops within 15s of cancellation")
            .expect("the intake task did not panic");
    }
}

fn start<H: sqs::Handler>(
    sqs: aws_sdk_sqs::Client,
    config: IntakeConfig,
    handler: H,
    readiness: Option<Readiness>,
) -> Running {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, InterruptionKind::ALL);
    let mut intake = Intake::new(sqs, config, handler, metrics);
    if let Some(r) = readiness {
        intake = intake.with_readiness(r);
    }
    let cancel = CancellationToken::new();
    let task = tokio::spawn(intake.run(cancel.clone()));
    Running {
        cancel,
        task,
        registry: Arc::new(registry),
    }
}

/// A handler that records every interruption and deletes every message at once.
fn recording_handler(seen: Seen) -> impl sqs::Handler {
    move |batch: Vec<Delivery>| {
        let seen = seen.clone();
        async move {
            for delivery in batch {
                seen.lock()
                    .unwrap()
                    .extend(delivery.interruptions.iter().cloned());
                delivery.ack.delete();
            }
        }
    }
}

fn test_config(queue_url: &str) -> IntakeConfig {
    let mut config = IntakeConfig::new(queue_url);
    config.receivers = 2;
    config.visibility_timeout = Duration::from_secs(5);
    config.backoff_min = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(1);
    config
}

async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// SQS intake

#[tokio::test]
async fn messages_reach_the_handler_once_and_leave_the_queue() {
    let sqs = sandbox_sqs().await;
    let queue = create_queue(&sqs, "parts-intake", &[]).await;
    let spot_body = spot("spot-1", "i-0123456789abcdef0");
    for body in [
        spot_body.clone(),
        // A redelivery of the same event through a second message: handled once.
        spot_body,
        fixture("health-scheduled-change.json"),
        fixture("asg-test-notification.json"),
        fixture("state-change-stopping.json"),
    ] {
        send(&sqs, &queue, &body).await;
    }
    let seen = Seen::default();
    let running = start(
        sqs.clone(),
        test_config(&queue),
        recording_handler(seen.clone()),
        None,
    );
    wait_empty(&sqs, &queue, Duration::from_secs(30)).await;

    let seen = seen.lock().unwrap().clone();
    let mut got: Vec<(InterruptionKind, String)> = seen
        .iter()
        .map(|i| (i.kind, i.instance_id.clone()))
        .collect();
    got.sort();
    let kinds: Vec<InterruptionKind> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        kinds,
        [
            InterruptionKind::SpotInterruption,
            InterruptionKind::StateChange,
            InterruptionKind::ScheduledChange,
            InterruptionKind::ScheduledChange,
            InterruptionKind::ScheduledChange,
        ],
        "{got:?}"
    );
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"handled\"}"),
        3
    );
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"ignored\"}"),
        1
    );
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"duplicate\"}"),
        1
    );
    assert_eq!(
        running.metric("nodedrain_interruptions_total{kind=\"scheduled-change\"}"),
        3
    );
    running.stop().await;
}

#[tokio::test]
async fn malformed_messages_are_deleted_when_so_configured() {
    let sqs = sandbox_sqs().await;
    let queue = create_queue(&sqs, "parts-malformed", &[]).await;
    send(&sqs, &queue, "this is not JSON").await;
    send(
        &sqs,
        &queue,
        &json!({"id": "x", "detail-type": "EC2 AMI State Change", "time": "2024-05-14T09:31:07Z", "detail": {}})
            .to_string(),
    )
    .await;
    let seen = Seen::default();
    let mut config = test_config(&queue);
    config.malformed = MalformedPolicy::Delete;
    let running = start(sqs.clone(), config, recording_handler(seen.clone()), None);
    wait_empty(&sqs, &queue, Duration::from_secs(30)).await;
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"malformed_deleted\"}"),
        2
    );
    assert_eq!(
        running.metric("nodedrain_messages_malformed_total{error=\"malformed_json\"}"),
        1
    );
    assert_eq!(
        running.metric("nodedrain_messages_malformed_total{error=\"unknown_event\"}"),
        1
    );
    running.stop().await;
}

#[tokio::test]
async fn malformed_messages_are_left_for_the_redrive_policy_when_so_configured() {
    let sqs = sandbox_sqs().await;
    let dead_letters = create_queue(&sqs, "parts-dlq", &[]).await;
    let arn = queue_arn(&sqs, &dead_letters).await;
    let redrive = json!({"deadLetterTargetArn": arn, "maxReceiveCount": "2"}).to_string();
    let queue = create_queue(
        &sqs,
        "parts-redrive",
        &[(QueueAttributeName::RedrivePolicy, redrive)],
    )
    .await;
    send(&sqs, &queue, "{ broken").await;
    send(&sqs, &queue, &spot("spot-ok", "i-0123456789abcdef1")).await;
    let seen = Seen::default();
    let mut config = test_config(&queue);
    config.malformed = MalformedPolicy::DeadLetter;
    // Short, so the broken message comes back (and is received again) quickly.
    config.visibility_timeout = Duration::from_secs(1);
    let running = start(sqs.clone(), config, recording_handler(seen.clone()), None);

    // Received more than maxReceiveCount times, it moves to the dead-letter queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if depth(&sqs, &dead_letters).await.0 == 1 && depth(&sqs, &queue).await == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the malformed message did not reach the dead-letter queue; queue {:?}, DLQ {:?}",
            depth(&sqs, &queue).await,
            depth(&sqs, &dead_letters).await
        );
        sleep(Duration::from_millis(200)).await;
    }
    let moved = sqs
        .receive_message()
        .queue_url(&dead_letters)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(moved[0].body(), Some("{ broken"));
    // The good message was handled as usual.
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(running.metric("nodedrain_messages_total{outcome=\"malformed_dead_letter\"}") >= 2);
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"malformed_deleted\"}"),
        0
    );
    running.stop().await;
}

#[tokio::test]
async fn visibility_is_extended_while_a_slow_handler_holds_the_message() {
    let sqs = sandbox_sqs().await;
    let queue = create_queue(&sqs, "parts-slow", &[]).await;
    send(&sqs, &queue, &spot("spot-slow", "i-0123456789abcdef2")).await;
    let deliveries = Arc::new(Mutex::new(0u32));
    let counter = deliveries.clone();
    // The handler returns at once and settles the ack 8 s later from a task of its own, as the
    // controller does with acks it settles after writing a node's record.
    let handler = move |batch: Vec<Delivery>| {
        let counter = counter.clone();
        async move {
            for delivery in batch {
                *counter.lock().unwrap() += 1;
                tokio::spawn(async move {
                    sleep(Duration::from_secs(8)).await;
                    delivery.ack.delete();
                });
            }
        }
    };
    let mut config = test_config(&queue);
    // Four times shorter than the handler: without extensions it would reappear thrice.
    config.visibility_timeout = Duration::from_secs(2);
    let running = start(sqs.clone(), config, handler, None);
    wait_until(
        "the handler got the message",
        Duration::from_secs(10),
        || *deliveries.lock().unwrap() == 1,
    )
    .await;

    // Another consumer polling meanwhile never sees it: it stays invisible.
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let got = sqs
            .receive_message()
            .queue_url(&queue)
            .wait_time_seconds(1)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
        assert!(
            got.messages.unwrap_or_default().is_empty(),
            "the message became visible while still being handled"
        );
    }
    wait_empty(&sqs, &queue, Duration::from_secs(15)).await;
    assert_eq!(*deliveries.lock().unwrap(), 1, "no redelivery");
    assert_eq!(
        running.metric("nodedrain_messages_total{outcome=\"handled\"}"),
        1
    );
    running.stop().await;
}

#[tokio::test]
async fn the_intake_survives_sqs_being_down_and_recovers_when_it_is_back() {
    let port = free_port();
    let endpoint = Moto::url(port);
    let sqs = aws_sdk_sqs::Client::new(&sdk_config(&endpoint).await);
    let name = format!("parts-outage-{}", std::process::id());
    let queue = format!("{endpoint}/123456789012/{name}");
    let seen = Seen::default();
    let readiness = Readiness::new(&[sqs::READINESS_COMPONENT]);
    let running = start(
        sqs.clone(),
        test_config(&queue),
        recording_handler(seen.clone()),
        Some(readiness.clone()),
    );

    // Nothing listens yet: the intake retries with backoff (after the SDK's own few retries of
    // each call) and is not ready.
    wait_until(
        "errors counted while SQS is down",
        Duration::from_secs(15),
        || running.metric("nodedrain_sqs_errors_total{operation=\"get_queue_attributes\"}") >= 2,
    )
    .await;
    assert!(!readiness.is_ready());
    assert!(!running.task.is_finished());

    let mut moto = Moto::start(port).await;
    sqs.create_queue().queue_name(&name).send().await.unwrap();
    wait_until("ready once SQS answers", Duration::from_secs(10), || {
        readiness.is_ready()
    })
    .await;
    send(&sqs, &queue, &spot("before", "i-0123456789abcdef3")).await;
    wait_until("first message handled", Duration::from_secs(15), || {
        seen.lock().unwrap().len() == 1
    })
    .await;

    // SQS goes away while receivers are long-polling.
    moto.stop();
    wait_until(
        "receive errors while SQS is down",
        Duration::from_secs(15),
        || running.metric("nodedrain_sqs_errors_total{operation=\"receive\"}") >= 2,
    )
    .await;
    assert!(!running.task.is_finished(), "no crash while SQS is down");

    // And comes back (empty, like a fresh endpoint): the intake picks up new messages.
    let _moto = Moto::start(port).await;
    sqs.create_queue().queue_name(&name).send().await.unwrap();
    send(&sqs, &queue, &spot("after", "i-0123456789abcdef4")).await;
    wait_until(
        "message after the outage handled",
        Duration::from_secs(20),
        || seen.lock().unwrap().len() == 2,
    )
    .await;
    wait_empty(&sqs, &queue, Duration::from_secs(10)).await;
    let events: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|i| i.event_id.clone())
        .collect();
    assert_eq!(events, ["before", "after"]);
    running.stop().await;
}

/// SQS marks messages in flight when it answers a receive, whether or not the answer arrives. A
/// network cut during open long polls loses those answers; the messages must come back after the
/// receive's short visibility timeout, not after the full one a handled message is extended to.
#[tokio::test]
async fn messages_answered_into_a_cut_connection_come_back_within_seconds() {
    let sqs = sandbox_sqs().await;
    let queue = create_queue(&sqs, "parts-cut", &[]).await;
    let moto = var("AWS_ENDPOINT_URL");
    let proxy = CutProxy::start(moto.trim_start_matches("http://").to_string()).await;
    let through_proxy = aws_sdk_sqs::Client::new(&sdk_config(&proxy.url()).await);
    let seen = Seen::default();
    let mut config = test_config(&queue);
    config.visibility_timeout = Duration::from_secs(60);
    assert_eq!(config.receive_visibility, Duration::from_secs(10));
    let running = start(through_proxy, config, recording_handler(seen.clone()), None);

    send(&sqs, &queue, &spot("cut-before", "i-0123456789abcdef5")).await;
    wait_until("first message handled", Duration::from_secs(15), || {
        seen.lock().unwrap().len() == 1
    })
    .await;
    // Both receivers are back in a long poll (20 s) on moto.
    sleep(Duration::from_secs(1)).await;

    proxy.cut();
    let sent = Instant::now();
    for n in 0..5 {
        send(
            &sqs,
            &queue,
            &spot(&format!("cut-{n}"), &format!("i-0123456789abcde{n:02x}")),
        )
        .await;
    }
    sleep(Duration::from_secs(2)).await;
    // The open long polls took messages and answered into the cut connections.
    let (_, in_flight) = depth(&sqs, &queue).await;
    assert!(
        in_flight >= 1,
        "no message was taken by a cut long poll; the test did not cut anything"
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing got through the cut");
    proxy.restore();

    wait_until(
        "every message sent during the cut handled",
        Duration::from_secs(25),
        || seen.lock().unwrap().len() == 6,
    )
    .await;
    // Bounded above by the receive's 10 s, the receivers' backoff and a long poll's turn; the
    // full visibility timeout would have hidden them for 60 s.
    eprintln!(
        "{in_flight} messages answered into the cut were handled {:?} after sending",
        sent.elapsed()
    );
    wait_empty(&sqs, &queue, Duration::from_secs(10)).await;
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Resolver

/// Launches one instance in moto, tagged or not; returns (instance id, private DNS name).
async fn launch(ec2: &aws_sdk_ec2::Client, tag: Option<(&str, &str)>) -> (String, String) {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let image = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .unwrap()
        .images
        .and_then(|i| i.into_iter().next())
        .and_then(|i| i.image_id)
        .expect("moto has an image");
    let mut run = ec2
        .run_instances()
        .image_id(image)
        .min_count(1)
        .max_count(1);
    if let Some((k, v)) = tag {
        run = run.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(k).value(v).build())
                .build(),
        );
    }
    let out = run.send().await.unwrap();
    let instance = &out.instances()[0];
    (
        instance.instance_id().unwrap().to_string(),
        instance.private_dns_name().unwrap().to_string(),
    )
}

/// A node object without KWOK behind it (the index only reads metadata and spec).
fn bare_node(name: &str, provider_id: Option<&str>, test_id: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {TEST_KEY: test_id, "kubernetes.io/hostname": name}},
        "spec": {
            "providerID": provider_id,
            "taints": [{"key": TEST_KEY, "value": test_id, "effect": "NoSchedule"}],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn the_resolver_finds_nodes_by_provider_id_and_by_private_dns_name() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("resolve").await;
    let ec2 = aws_sdk_ec2::Client::new(&scope.aws);
    let nodes = scope.nodes(2).await;
    let (i1, i2) = (instance_of(&nodes[0]), instance_of(&nodes[1]));
    let (n1, n2) = (
        nodes[0].metadata.name.clone().unwrap(),
        nodes[1].metadata.name.clone().unwrap(),
    );
    // A node registered without a providerID, named by its instance's private DNS name.
    let (i3, dns3) = launch(&ec2, Some((TEST_KEY, &scope.id))).await;
    let node_api: Api<Node> = Api::all(sandbox.client.clone());
    node_api
        .create(&PostParams::default(), &bare_node(&dns3, None, &scope.id))
        .await
        .unwrap();
    // An instance of no node, without the managed tag.
    let (i4, _) = launch(&ec2, None).await;
    let unknown = "i-0000000000000dead";

    let readiness = Readiness::new(&[]);
    let cancel = CancellationToken::new();
    let (watch, run) = NodeWatch::new(node_api.clone(), Some(readiness.clone()), cancel.clone());
    let task = tokio::spawn(run);
    assert!(!readiness.pending().is_empty() || watch.is_ready());
    assert!(
        timeout(Duration::from_secs(30), watch.wait_ready())
            .await
            .expect("node list loads within 30s")
    );
    assert!(readiness.is_ready());

    let ids = [i1.as_str(), &i2, &i3, &i4, unknown];
    let plain = Resolver::new(watch.clone(), ec2.clone(), None, Metrics::default());
    let got: Vec<Resolution> = plain
        .resolve(&ids)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        [
            Resolution::Node(n1.clone()),
            Resolution::Node(n2),
            Resolution::Node(dns3.clone()),
            Resolution::NotFound,
            Resolution::NotFound,
        ]
    );

    let tag = ManagedTag::parse(&format!("{TEST_KEY}={}", scope.id)).unwrap();
    let managed = Resolver::new(watch.clone(), ec2.clone(), Some(tag), Metrics::default());
    let got: Vec<Resolution> = managed
        .resolve(&ids)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        [
            Resolution::Node(n1),
            Resolution::Node(nodes[1].metadata.name.clone().unwrap()),
            Resolution::Node(dns3),
            Resolution::NotManaged,
            Resolution::NotFound,
        ]
    );

    // The index follows the watch: a node that appears later is found, and forgotten on delete.
    let late = "i-0123456789abcdef7";
    let late_name = format!("late-{}", scope.id);
    node_api
        .create(
            &PostParams::default(),
            &bare_node(
                &late_name,
                Some(&format!("aws:///us-east-1a/{late}")),
                &scope.id,
            ),
        )
        .await
        .unwrap();
    wait_until("new node indexed", Duration::from_secs(10), || {
        watch.node_for_instance(late).as_deref() == Some(late_name.as_str())
    })
    .await;
    node_api
        .delete(&late_name, &DeleteParams::default())
        .await
        .unwrap();
    wait_until("deleted node forgotten", Duration::from_secs(10), || {
        watch.node_for_instance(late).is_none()
    })
    .await;

    cancel.cancel();
    timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    scope.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Leader election

/// Short timings keep the tests quick; the ratios are the defaults' (15/10/2), and a leader that
/// stops renewing stops acting within renew deadline + retry period (2.4 s), before the lease
/// (3 s) lets a standby in.
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_PERIOD: Duration = Duration::from_millis(400);

fn elector(client: &kube::Client, namespace: &str, identity: &str) -> LeaderElector {
    let mut config = LeaseConfig::new("nodedrain-test", namespace, identity);
    config.lease_duration = Duration::from_secs(3);
    config.renew_deadline = RENEW_DEADLINE;
    config.retry_period = RETRY_PERIOD;
    LeaderElector::new(client.clone(), config)
}

async fn wait_leader(rx: &mut tokio::sync::watch::Receiver<bool>, limit: Duration) {
    timeout(limit, rx.wait_for(|l| *l))
        .await
        .unwrap_or_else(|_| panic!("did not become leader within {limit:?}"))
        .unwrap();
}

#[tokio::test]
async fn one_leader_at_a_time_and_the_standby_takes_over() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("leader").await;

    let a = elector(&sandbox.client, &scope.id, "a");
    let mut a_rx = a.subscribe();
    let a_cancel = CancellationToken::new();
    let a_task = tokio::spawn(a.run(a_cancel.clone()));
    wait_leader(&mut a_rx, Duration::from_secs(10)).await;

    let b = elector(&sandbox.client, &scope.id, "b");
    let mut b_rx = b.subscribe();
    let b_task = tokio::spawn(b.run(CancellationToken::new()));
    // While a renews, b never leads.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(*a_rx.borrow() && !*b_rx.borrow(), "exactly one leader");
        sleep(Duration::from_millis(50)).await;
    }

    // a shuts down and releases: b takes over at its next try, well before the lease expires.
    a_cancel.cancel();
    let released = Instant::now();
    timeout(Duration::from_secs(5), a_task)
        .await
        .unwrap()
        .unwrap();
    assert!(!*a_rx.borrow());
    wait_leader(&mut b_rx, Duration::from_secs(3)).await;
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "took over after release in {:?}",
        released.elapsed()
    );

    // c stands by; b dies without releasing (its future is dropped): c takes over only after
    // the lease expired.
    let c = elector(&sandbox.client, &scope.id, "c");
    let mut c_rx = c.subscribe();
    let c_task = tokio::spawn(c.run(CancellationToken::new()));
    sleep(Duration::from_secs(1)).await;
    assert!(!*c_rx.borrow());
    b_task.abort();
    let died = Instant::now();
    wait_leader(&mut c_rx, Duration::from_secs(10)).await;
    let took = died.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "took over {took:?} after the leader died, before its lease could expire"
    );
    c_task.abort();
    scope.cleanup().await;
}

/// SIGTERM is the normal way a replica stops (a rollout, a node drained): the leader hands the
/// lease over and says so, without a warning that reads like a failure.
#[tokio::test]
async fn a_clean_sigterm_hands_the_lease_over_without_a_lost_lease_warning() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("sigterm").await;
    let sqs = sandbox_sqs().await;
    let queue = create_queue(&sqs, "parts-sigterm", &[]).await;
    let lease_name = format!("nodedrain-{}", scope.id);
    let mut controller = Controller::start(Launch {
        name: "sigterm",
        queue_url: &queue,
        lease: Some((&scope.id, &lease_name)),
        extra: &[],
        env: &[],
    });
    controller.wait_ready(Duration::from_secs(30)).await;
    eventually(Duration::from_secs(15), "the replica leads", || async {
        controller.metric("nodedrain_leader").await == 1.0
    })
    .await;

    let status = controller.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
    let log = controller.log();
    assert!(
        log.contains("shutting down: stepping down and handing the lease over"),
        "{log}"
    );
    assert!(log.contains("released the lease"), "{log}");
    assert!(!log.contains("lost the lease"), "{log}");
    let holder = scope
        .api::<k8s_openapi::api::coordination::v1::Lease>()
        .get(&lease_name)
        .await
        .expect("the lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the lease is free for the standby");
    scope.cleanup().await;
}

/// A client for the sandbox's apiserver that goes through a [`CutProxy`] (TLS passes through it
/// untouched, and the certificate names the loopback address, not the port).
async fn client_through_proxy(sandbox: &Sandbox) -> (kube::Client, CutProxy) {
    let raw = kube::config::Kubeconfig::read_from(&sandbox.kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(raw, &Default::default())
        .await
        .expect("kubeconfig is usable");
    let upstream = config
        .cluster_url
        .authority()
        .expect("apiserver address")
        .to_string();
    let proxy = CutProxy::start(upstream).await;
    config.cluster_url = format!("https://127.0.0.1:{}", proxy.port)
        .parse()
        .expect("proxy URL");
    (kube::Client::try_from(config).expect("kube client"), proxy)
}

/// A leader cut off from the apiserver must stop acting before a standby may take over: within
/// renew deadline + retry period of its last renewal, which the lease duration exceeds. Its
/// requests first fail at once (connections refused), then hang (a partition: no error, no
/// answer): an attempt that starts hanging just before the renew deadline must not carry the
/// leader past it.
#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_stops_before_the_standby_starts() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("leader-cut").await;
    let (through_proxy, proxy) = client_through_proxy(&sandbox).await;

    let a = elector(&through_proxy, &scope.id, "a");
    let mut a_rx = a.subscribe();
    let a_task = tokio::spawn(a.run(CancellationToken::new()));
    wait_leader(&mut a_rx, Duration::from_secs(10)).await;
    let b = elector(&sandbox.client, &scope.id, "b");
    let mut b_rx = b.subscribe();
    let b_task = tokio::spawn(b.run(CancellationToken::new()));
    sleep(Duration::from_secs(1)).await;
    assert!(*a_rx.borrow() && !*b_rx.borrow(), "a leads, b stands by");

    proxy.cut();
    let cut = Instant::now();
    let (_, a_stopped, b_started) = timeout(Duration::from_secs(20), async {
        tokio::join!(
            async {
                sleep(RENEW_DEADLINE - Duration::from_millis(500)).await;
                proxy.stall();
            },
            async {
                a_rx.wait_for(|l| !*l).await.unwrap();
                Instant::now()
            },
            async {
                b_rx.wait_for(|l| *l).await.unwrap();
                Instant::now()
            },
        )
    })
    .await
    .expect("a stepped down and b took over");
    // a renewed last at most one retry period before the cut.
    let stopped_after = a_stopped - cut;
    assert!(
        stopped_after <= RENEW_DEADLINE + RETRY_PERIOD + Duration::from_millis(300),
        "a kept acting {stopped_after:?} into the partition"
    );
    assert!(
        a_stopped < b_started,
        "two leaders: b started {:?} before a stopped",
        a_stopped - b_started
    );
    eprintln!(
        "a stopped {stopped_after:?} into the partition, b started {:?} after that",
        b_started - a_stopped
    );
    a_task.abort();
    b_task.abort();
    scope.cleanup().await;
}
