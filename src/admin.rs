//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`.
//!
//! Readiness is a set of named components (node watch, SQS intake, ...), each false until it has
//! proved itself once; `/readyz` answers 200 only when all are true and otherwise names the
//! missing ones, so `kubectl describe pod` tells an operator what the replica is waiting for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Media type of the OpenMetrics text exposition that prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin server (--admin-addr): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Named readiness flags. Cheap to clone; every clone sees the same flags.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Readiness that waits for each of `components` to be marked ready.
    pub fn new(components: &[&'static str]) -> Readiness {
        let readiness = Readiness::default();
        for &c in components {
            readiness.set(c, false);
        }
        readiness
    }

    /// Marks `component` ready or not; an unknown name is added.
    pub fn set(&self, component: &'static str, ready: bool) {
        self.lock().insert(component, ready);
    }

    /// True when every component is ready (and vacuously when there are none).
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|&r| r)
    }

    /// Components not ready yet, in name order.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(c, _)| *c)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A panic while holding this lock cannot leave the map half-written (single inserts), so
        // a poisoned lock is still a valid map.
        self.components
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// The admin routes, for embedding or testing without a socket.
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            registry,
            readiness,
        })
}

/// Liveness: the process answers HTTP. Deliberately checks nothing else: a lost apiserver or
/// SQS connection is retried inside, and restarting the pod would not fix either.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        crate::metrics::encode(&state.registry),
    )
        .into_response()
}

/// A bound, not yet serving, admin server; binding first lets the caller learn the port (tests
/// bind port 0) and fail at start on a taken address.
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
}

impl AdminServer {
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        readiness: Readiness,
    ) -> Result<AdminServer, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(AdminServer {
            listener,
            router: router(registry, readiness),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, AdminError> {
        self.listener.local_addr().map_err(AdminError::Serve)
    }

    /// Serves until `cancel` fires, then finishes in-flight requests and returns.
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), AdminError> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
            .map_err(AdminError::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 GET over a raw socket: the real server path, without an HTTP client crate.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    #[test]
    fn readiness_waits_for_every_component() {
        let r = Readiness::new(&["sqs", "nodes"]);
        assert!(!r.is_ready());
        assert_eq!(r.pending(), ["nodes", "sqs"]);
        r.set("nodes", true);
        let clone = r.clone();
        clone.set("sqs", true);
        assert!(r.is_ready());
        r.set("sqs", false);
        assert_eq!(r.pending(), ["sqs"]);
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics_over_http() {
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::register(
            &mut registry,
            crate::interruption::events::InterruptionKind::ALL,
        );
        metrics.set_leader(true);
        let readiness = Readiness::new(&["node-watch", "sqs-intake"]);
        let server = AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(registry),
            readiness.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.serve(cancel.clone()));

        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: waiting for node-watch, sqs-intake\n");
        readiness.set("node-watch", true);
        readiness.set("sqs-intake", true);
        assert_eq!(get(addr, "/readyz").await.0, 200);

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.contains("nodedrain_leader 1"), "{body}");
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/nope").await.0, 404);
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_readable_error() {
        let first = AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::default(),
            Readiness::default(),
        )
        .await
        .unwrap();
        let addr = first.local_addr().unwrap();
        let Err(e) = AdminServer::bind(addr, Arc::default(), Readiness::default()).await else {
            panic!("second bind on {addr} succeeded");
        };
        assert!(e.to_string().contains("--admin-addr"), "{e}");
    }
}
