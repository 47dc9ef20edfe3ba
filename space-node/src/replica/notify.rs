//! Notify on a replicated node: subscriptions registered through every shard's log
//! (docs/ARCHITECTURE.md section 9).
//!
//! A client registers a subscription in the log of every shard
//! ([`Request::SubscribeShards`](space_core::wire::Request::SubscribeShards), sent to
//! each shard's leader), with where its events go. Every replica of a shard then holds
//! it, and numbers the shard's events for it alike, in log order (see
//! `space_core::server::Engine::logged_feed`). This node pushes the events of the shards
//! it leads, from its replica engines (which apply only what is committed), one pusher
//! per shard and subscription. When it takes a shard over, it pushes everything its
//! replica still keeps for each subscription, from the oldest (what it no longer keeps
//! comes first as one gap): the subscriber drops what it had already from the old leader
//! (it knows the last number it had from each shard) and learns exactly what it missed
//! when something did go missing. A node that restarts holds every subscription again
//! from its log, and nothing is registered anew.
//!
//! A pusher whose subscriber no longer wants the subscription, or whose endpoint stays
//! unreachable for the subscriber timeout, ends the subscription on its shard through the
//! log.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use space_core::server::Engine;
use space_core::wire::Endpoint;
use tokio::sync::watch;

use super::{GroupId, ShardSet};
use crate::push::{Link, Pushers, Route, Stopped, push};

/// How often the pushers are looked over even when no leadership changed (to start
/// those of new subscriptions and stop those of ended ones).
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Where a logged subscription's events go, as its log holds it: the endpoint and the
/// number its subscriber drew when it attached it, encoded. A new number (a resume)
/// makes a new attachment, whose pusher starts again from what the replica keeps.
pub(crate) fn attachment(endpoint: &Endpoint, drawn: u64) -> Vec<u8> {
    postcard::to_stdvec(&(endpoint, drawn)).unwrap_or_default()
}

/// The endpoint an attachment names (`None` for one that names none).
fn endpoint_of(attachment: &[u8]) -> Option<Endpoint> {
    postcard::from_bytes::<(Endpoint, u64)>(attachment)
        .ok()
        .map(|(endpoint, _)| endpoint)
}

/// A pusher running for one subscription on one shard this node leads.
struct Running {
    /// The replica engine it pushes from (a snapshot installed replaces it).
    replica: Engine,
    /// Where it pushes to.
    attachment: Vec<u8>,
    /// Keeps the pusher's route open.
    _route: watch::Sender<Route>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pusher's hold on its link, given back however the pusher ends (aborted too).
struct LinkHold {
    pushers: Arc<Pushers>,
    link: Arc<Link>,
}

impl Drop for LinkHold {
    fn drop(&mut self) {
        self.pushers.unlink(&self.link);
    }
}

/// Pushes the logged subscriptions' events of the shards this node leads, for as long as
/// the shards run: looks the pushers over at every change of leadership and every
/// [`LOOK_EVERY`].
pub(crate) async fn push_led(shards: Weak<ShardSet>, pushers: Arc<Pushers>) {
    let mut running: HashMap<(GroupId, u64), Running> = HashMap::new();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(set) = shards.upgrade() else {
            return;
        };
        // Watched before looking, so that no change is missed.
        let changed = set.changes().next();
        look_over(&set, &shards, &pushers, &mut running);
        drop(set);
        tokio::select! {
            () = changed => {}
            _ = tick.tick() => {}
        }
    }
}

/// Starts the pushers of the subscriptions on the shards this node leads that have none
/// (or whose replica was replaced, or who were re-attached elsewhere), and stops those
/// of shards it no longer leads and subscriptions that ended.
fn look_over(
    set: &ShardSet,
    shards: &Weak<ShardSet>,
    pushers: &Arc<Pushers>,
    running: &mut HashMap<(GroupId, u64), Running>,
) {
    let mut wanted = HashSet::new();
    for shard in set.replicated() {
        if !set.leads(shard) {
            continue;
        }
        let Some(replica) = set.replica_engine(shard) else {
            continue;
        };
        for view in replica.logged() {
            let key = (shard, view.id);
            wanted.insert(key);
            if running
                .get(&key)
                .is_some_and(|r| r.replica.same_as(&replica) && r.attachment == view.attachment)
            {
                // Running, or stopped and ending the subscription through the log.
                continue;
            }
            let Some(endpoint) = endpoint_of(&view.attachment) else {
                continue;
            };
            let Some(feed) = replica.logged_feed(&view.entry_type, view.id) else {
                continue;
            };
            // Everything the replica keeps: the subscriber drops what it had.
            feed.rewind(0);
            let link = pushers.link_for(endpoint);
            let (route, rx) = watch::channel(Route {
                link: link.clone(),
                resume_after: None,
            });
            let hold = LinkHold {
                pushers: pushers.clone(),
                link,
            };
            let config = pushers.config();
            let (shards, entry_type, id) = (shards.clone(), view.entry_type.clone(), view.id);
            let task = tokio::spawn(async move {
                let _hold = hold;
                let stopped = push(config, Some(shard), Arc::new(feed), rx).await;
                if stopped != Stopped::Ended {
                    end_on(&shards, shard, &entry_type, id).await;
                }
            });
            running.insert(
                key,
                Running {
                    replica: replica.clone(),
                    attachment: view.attachment,
                    _route: route,
                    task,
                },
            );
        }
    }
    running.retain(|key, _| wanted.contains(key));
}

/// Ends subscription `id` on `shard` through its log, if this node still leads it.
async fn end_on(shards: &Weak<ShardSet>, shard: GroupId, entry_type: &str, id: u64) {
    let engine = shards.upgrade().and_then(|set| {
        set.serving()
            .iter()
            .find(|(s, _)| *s == shard)
            .map(|(_, e)| e.clone())
    });
    let Some(engine) = engine else {
        return;
    };
    match engine.unsubscribe_logged(entry_type, id) {
        Ok(true) => {
            if let Err(e) = engine.flush().await {
                tracing::debug!(shard, subscription = id, error = %e, "ending a subscription did not commit");
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(shard, subscription = id, error = %e, "could not end a subscription")
        }
    }
}
