//! One PodDisruptionBudget watch per process, shared by every drain running in it.
//!
//! Each drain follows the PDBs of the whole cluster: a budget freed on one node lets a pod on
//! another go. The controller runs one drain per interrupted node, so a burst of 200 warnings
//! used to open 200 cluster-wide PDB watches: the apiserver sent every PDB status change 200
//! times (and the disruption controller rewrites a status for every pod that changes), and the
//! controller decoded and kept 200 copies. Now one watch feeds a store and a broadcast; each drain
//! subscribes and sees the same events its own watch would have given it.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::warn;

/// Events a slow drain may fall behind by before it is resynchronised from the store.
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
enum FeedEvent {
    Apply(Arc<PodDisruptionBudget>),
    Delete(Arc<PodDisruptionBudget>),
    /// The shared watch listed again (after an expired resourceVersion or an error): the store
    /// is the truth, deletions may have been missed.
    Resync,
}

/// How far the shared watch has come.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listing {
    Pending,
    /// The store holds a complete list.
    Listed,
    /// The watch failed before its first complete list; it retries with backoff, and callers
    /// that need the list now get this error, as a failed list request would give them.
    Failed(ListFailure),
}

/// Why the PDBs could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ListFailure {
    pub message: String,
    /// An RBAC refusal: retrying will not help.
    pub forbidden: bool,
}

/// The shared watch. Dropping the last handle stops it.
pub struct PdbFeed {
    store: Store<PodDisruptionBudget>,
    events: broadcast::Sender<FeedEvent>,
    listing: watch::Receiver<Listing>,
    _stop: DropGuard,
}

impl PdbFeed {
    /// Starts the watch in a task of the current runtime.
    pub fn start(client: Client) -> PdbFeed {
        let (store, writer) = reflector::store();
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (listing_tx, listing) = watch::channel(Listing::Pending);
        let stop = CancellationToken::new();
        let sender = events.clone();
        let cancel = stop.clone();
        tokio::spawn(async move {
            let api: Api<PodDisruptionBudget> = Api::all(client);
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|pdb| {
                    pdb.managed_fields_mut().clear();
                })
                .reflect(writer);
            futures::pin_mut!(stream);
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => return,
                    next = stream.next() => next,
                };
                // A send fails only when no drain is subscribed, which is fine.
                match next {
                    Some(Ok(watcher::Event::Apply(pdb))) => {
                        let _ = sender.send(FeedEvent::Apply(Arc::new(pdb)));
                    }
                    Some(Ok(watcher::Event::Delete(pdb))) => {
                        let _ = sender.send(FeedEvent::Delete(Arc::new(pdb)));
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        listing_tx.send_replace(Listing::Listed);
                        let _ = sender.send(FeedEvent::Resync);
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    // The backoff already waited; the watcher relists by itself.
                    Some(Err(error)) => {
                        warn!(%error, "PodDisruptionBudget watch failed; retrying");
                        listing_tx.send_if_modified(|state| {
                            if *state == Listing::Listed {
                                return false;
                            }
                            *state = Listing::Failed(ListFailure {
                                message: describe_watch_error(&error),
                                forbidden: watch_error_is_forbidden(&error),
                            });
                            true
                        });
                    }
                    None => return,
                }
            }
        });
        PdbFeed {
            store,
            events,
            listing,
            _stop: stop.drop_guard(),
        }
    }

    /// Every PDB of the cluster, once the shared watch has listed them; its error when it could
    /// not list yet.
    pub async fn list(&self) -> Result<Vec<Arc<PodDisruptionBudget>>, ListFailure> {
        let mut listing = self.listing.clone();
        let state = listing
            .wait_for(|l| *l != Listing::Pending)
            .await
            .map(|l| l.clone())
            .unwrap_or_else(|_| {
                Listing::Failed(ListFailure {
                    message: "the PodDisruptionBudget watch stopped".to_string(),
                    forbidden: false,
                })
            });
        match state {
            Listing::Failed(failure) => Err(failure),
            _ => Ok(self.store.state()),
        }
    }

    /// The PDB events from now on, shaped like a watcher's: first a complete list (once the
    /// shared watch has one), then changes; a relist whenever this subscriber fell behind or the
    /// shared watch listed again.
    pub fn subscribe(
        &self,
    ) -> impl Stream<Item = Result<watcher::Event<PodDisruptionBudget>, watcher::Error>> + Send + 'static
    {
        // Subscribed before the store is read: a change made in between arrives twice, an
        // idempotent upsert, rather than not at all.
        let state = Subscriber {
            events: self.events.subscribe(),
            store: self.store.clone(),
            listing: self.listing.clone(),
            pending: VecDeque::new(),
            started: false,
        };
        futures::stream::unfold(state, |mut s| async move {
            let event = s.next().await?;
            Some((Ok(event), s))
        })
    }
}

struct Subscriber {
    events: broadcast::Receiver<FeedEvent>,
    store: Store<PodDisruptionBudget>,
    listing: watch::Receiver<Listing>,
    pending: VecDeque<watcher::Event<PodDisruptionBudget>>,
    started: bool,
}

impl Subscriber {
    async fn next(&mut self) -> Option<watcher::Event<PodDisruptionBudget>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if !self.started {
                self.listing
                    .wait_for(|l| *l == Listing::Listed)
                    .await
                    .ok()?;
                self.started = true;
                self.relist();
                continue;
            }
            match self.events.recv().await {
                Ok(FeedEvent::Apply(pdb)) => return Some(watcher::Event::Apply((*pdb).clone())),
                Ok(FeedEvent::Delete(pdb)) => return Some(watcher::Event::Delete((*pdb).clone())),
                Ok(FeedEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.relist()
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn relist(&mut self) {
        self.pending.push_back(watcher::Event::Init);
        for pdb in self.store.state() {
            self.pending
                .push_back(watcher::Event::InitApply((*pdb).clone()));
        }
        self.pending.push_back(watcher::Event::InitDone);
    }
}

/// A watch error as a person reads it, with the apiserver's status when there is one.
pub fn describe_watch_error(error: &watcher::Error) -> String {
    match watch_error_status(error) {
        Some(status) => {
            crate::node::describe_api_error(&kube::Error::Api(Box::new(status.clone())))
        }
        None => error.to_string(),
    }
}

/// Whether the watch was refused for lack of rights (401/403): retrying will not help.
pub fn watch_error_is_forbidden(error: &watcher::Error) -> bool {
    watch_error_status(error).is_some_and(|s| s.code == 401 || s.code == 403)
}

fn watch_error_status(error: &watcher::Error) -> Option<&kube::core::Status> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => Some(status),
        _ => None,
    }
}
