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

/// The shared watch. Dropping the last handle stops it.
pub struct PdbFeed {
    store: Store<PodDisruptionBudget>,
    events: broadcast::Sender<FeedEvent>,
    listed: watch::Receiver<bool>,
    _stop: DropGuard,
}

impl PdbFeed {
    /// Starts the watch in a task of the current runtime.
    pub fn start(client: Client) -> PdbFeed {
        let (store, writer) = reflector::store();
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (listed_tx, listed) = watch::channel(false);
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
                        listed_tx.send_replace(true);
                        let _ = sender.send(FeedEvent::Resync);
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    // The backoff already waited; the watcher relists by itself.
                    Some(Err(error)) => {
                        warn!(%error, "PodDisruptionBudget watch failed; retrying")
                    }
                    None => return,
                }
            }
        });
        PdbFeed {
            store,
            events,
            listed,
            _stop: stop.drop_guard(),
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
            listed: self.listed.clone(),
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
    listed: watch::Receiver<bool>,
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
                self.listed.wait_for(|l| *l).await.ok()?;
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
