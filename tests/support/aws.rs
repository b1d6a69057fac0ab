//! AWS helpers for the controller-part tests: private queues on the sandbox's moto, and private
//! moto servers a test can stop and restart to simulate an outage.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;

use super::var;

/// An SDK configuration for the sandbox's credentials and region, at `endpoint`.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(var("AWS_REGION")))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "sandbox",
        ))
        // A test endpoint is local: fail fast when it is down instead of the SDK's own retries.
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .build(),
        )
        .load()
        .await
}

/// A queue of this test's own (name made unique per process and call), optionally with
/// attributes such as a redrive policy. Never the shared `nodedrain-interruptions` queue.
pub async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attributes: &[(QueueAttributeName, String)],
) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let unique = format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut request = sqs.create_queue().queue_name(unique);
    for (k, v) in attributes {
        request = request.attributes(k.clone(), v);
    }
    request
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url")
}

pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("get queue attributes")
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .expect("queue arn")
}

pub async fn send(sqs: &aws_sdk_sqs::Client, url: &str, body: &str) {
    sqs.send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .expect("send message");
}

/// (visible, in flight) message counts.
pub async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("get queue attributes")
        .attributes
        .unwrap_or_default();
    let count = |name| {
        attributes
            .get(&name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        count(QueueAttributeName::ApproximateNumberOfMessages),
        count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// Waits until the queue holds no message at all, visible or in flight.
pub async fn wait_empty(sqs: &aws_sdk_sqs::Client, url: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let d = depth(sqs, url).await;
        if d == (0, 0) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("queue {url} still holds (visible, in flight) = {d:?} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A private moto server on a fixed port, so a test can stop it and start it again at the same
/// address (its state is lost on stop, as after a real outage of a fresh endpoint).
pub struct Moto {
    pub port: u16,
    child: Option<Child>,
}

impl Moto {
    pub fn url(port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }

    pub async fn start(port: u16) -> Moto {
        let child = Command::new(var("NODEDRAIN_SANDBOX_PYTHON"))
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto {
            port,
            child: Some(child),
        };
        for _ in 0..150 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not listen on port {port} within 15s");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`CutProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Connections are closed, new ones closed on arrival: the client sees errors at once.
    Cut,
    /// Connections stay open and silent, new ones are accepted and never answered: the client's
    /// requests hang, as in a network partition.
    Stall,
}

/// A TCP proxy in front of an endpoint (SQS on moto, or the apiserver: TLS passes through) that a
/// test can cut off. The upstream only sees its side of each connection close, so a long poll it
/// is holding still takes messages and answers into the void.
pub struct CutProxy {
    pub port: u16,
    mode: tokio::sync::watch::Sender<Mode>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (mode, modes) = tokio::sync::watch::channel(Mode::Pass);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let modes = modes.clone();
                let upstream = upstream.clone();
                let current = *modes.borrow();
                match current {
                    Mode::Cut => drop(client),
                    Mode::Stall => {
                        tokio::spawn(hold_until_restored(client, modes));
                    }
                    Mode::Pass => {
                        tokio::spawn(forward(client, upstream, modes));
                    }
                }
            }
        });
        CutProxy { port, mode, accept }
    }

    /// The endpoint URL through the proxy, for a plain-HTTP upstream.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Leaves every connection open and unanswered, new ones too.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.mode.send_replace(Mode::Cut);
    }
}

async fn forward(
    mut client: tokio::net::TcpStream,
    upstream: String,
    mut modes: tokio::sync::watch::Receiver<Mode>,
) {
    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
        return;
    };
    let stalled = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        changed = modes.wait_for(|m| *m != Mode::Pass) => {
            changed.map(|m| *m == Mode::Stall).unwrap_or(false)
        }
    };
    drop(server);
    if stalled {
        hold_until_restored(client, modes).await;
    }
}

/// Keeps `client` open, reading nothing and answering nothing, until the proxy passes again.
async fn hold_until_restored(
    client: tokio::net::TcpStream,
    mut modes: tokio::sync::watch::Receiver<Mode>,
) {
    let _ = modes.wait_for(|m| *m != Mode::Stall).await;
    drop(client);
}

/// Creates the target group `request` describes, sets its deregistration delay to
/// `delay_seconds`, and returns its ARN.
pub async fn target_group_with_delay(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    request: aws_sdk_elasticloadbalancingv2::operation::create_target_group::builders::CreateTargetGroupFluentBuilder,
    delay_seconds: u64,
) -> String {
    let arn = request
        .send()
        .await
        .expect("create target group")
        .target_groups
        .and_then(|g| g.into_iter().next())
        .and_then(|g| g.target_group_arn)
        .expect("target group arn");
    elb.modify_target_group_attributes()
        .target_group_arn(&arn)
        .attributes(
            aws_sdk_elasticloadbalancingv2::types::TargetGroupAttribute::builder()
                .key("deregistration_delay.timeout_seconds")
                .value(delay_seconds.to_string())
                .build(),
        )
        .send()
        .await
        .expect("set the deregistration delay");
    arn
}

/// A load balancer `name` of `kind` in `subnets` whose listener on port 80 forwards to `group`:
/// from then on the group is in use and its targets' health checks start. Returns its ARN.
pub async fn load_balancer_for(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    name: &str,
    kind: aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum,
    subnets: &[String],
    protocol: aws_sdk_elasticloadbalancingv2::types::ProtocolEnum,
    group: &str,
) -> String {
    use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum};
    let lb = elb
        .create_load_balancer()
        .name(name)
        .r#type(kind)
        .set_subnets(Some(subnets.to_vec()))
        .send()
        .await
        .expect("create load balancer")
        .load_balancers
        .and_then(|l| l.into_iter().next())
        .and_then(|l| l.load_balancer_arn)
        .expect("load balancer arn");
    elb.create_listener()
        .load_balancer_arn(&lb)
        .protocol(protocol)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(group)
                .build(),
        )
        .send()
        .await
        .expect("create listener");
    lb
}
