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
use space_core::wire::{self, Endpoint, Response};
use space_core::{Notification, SpaceError, Subscription};
use tokio::sync::watch;

use super::{GroupId, ShardSet};
use crate::push::{Link, Pushers, Route, Stopped, push};

/// How often the pushers are looked over even when no leadership changed (to start
/// those of new subscriptions and stop those of ended ones).
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Where a logged subscription's events go, as its log holds it: the endpoint and the
/// number its subscriber drew when it attached it, encoded. A new number (a resume)
/// makes a new attachment, whose pusher starts again from what the replica keeps.
/// Without an endpoint, the subscription is polled.
pub(crate) fn attachment(endpoint: Option<&Endpoint>, drawn: u64) -> Vec<u8> {
    postcard::to_stdvec(&(endpoint, drawn)).unwrap_or_default()
}

/// The endpoint an attachment names (`None` for a polled subscription).
fn endpoint_of(attachment: &[u8]) -> Option<Endpoint> {
    postcard::from_bytes::<(Option<Endpoint>, u64)>(attachment)
        .ok()
        .and_then(|(endpoint, _)| endpoint)
}

/// Refuses a new subscription of the client at `endpoint` on the shard `engine` leads
/// when that client holds `max` there already.
///
/// # Errors
/// [`SpaceError::Busy`] then.
pub(crate) fn check_room(
    engine: &Engine,
    endpoint: &Endpoint,
    max: usize,
) -> Result<(), SpaceError> {
    let held = engine
        .logged()
        .iter()
        .filter(|view| endpoint_of(&view.attachment).as_ref() == Some(endpoint))
        .count();
    if held >= max {
        return Err(SpaceError::Busy {
            node: String::new(),
            reason: format!("this client holds its maximum of {max} subscriptions on the node"),
        });
    }
    Ok(())
}

/// Most notifications one answer to a poll carries, over all its shards.
const POLL_BATCH: usize = 1024;

/// Answers a poll of subscription `id` on `entry_type` (see
/// [`Request::PollShards`](space_core::wire::Request::PollShards)): on each shard of
/// `positions` this node leads, the events after the number the client has there,
/// waiting up to `wait` for the first when none is there yet.
pub(crate) async fn poll(
    set: &ShardSet,
    id: u64,
    entry_type: &str,
    positions: Vec<(u32, u64)>,
    wait: Duration,
) -> Response {
    let mut led = Vec::new();
    let mut missing = Vec::new();
    let mut feeds = Vec::new();
    for (shard, after) in positions {
        if !set.leads(shard) || led.contains(&shard) {
            continue;
        }
        led.push(shard);
        let feed = set
            .replica_engine(shard)
            .and_then(|replica| replica.logged_feed(entry_type, id));
        match feed {
            Some(feed) => {
                // What the client has is not sent again; what it asked for after is,
                // even when an earlier answer carried it (and was lost).
                feed.rewind(after);
                feeds.push((shard, feed));
            }
            // Registered, and not applied by this replica yet: nothing to tell.
            None if held_by_leader(set, shard, entry_type, id) => {}
            None => missing.push(shard),
        }
    }
    let mut told: Vec<(u32, Vec<Notification>)> = Vec::new();
    let mut room = POLL_BATCH;
    drain(&mut told, &feeds, &mut room);
    let ended = |feeds: &[(u32, Subscription)]| -> Vec<u32> {
        feeds
            .iter()
            .filter(|(_, f)| f.is_closed())
            .map(|(s, _)| *s)
            .collect()
    };
    if told.is_empty() && ended(&feeds).is_empty() && !feeds.is_empty() {
        let first = futures::future::select_all(
            feeds
                .iter()
                .map(|(shard, feed)| Box::pin(async move { (*shard, feed.recv_async().await) })),
        );
        if let Ok(((shard, Some(n)), _, _)) =
            tokio::time::timeout(wait.min(wire::MAX_POLL_WAIT), first).await
        {
            told.push((shard, vec![n]));
            room -= 1;
            drain(&mut told, &feeds, &mut room);
        }
    }
    Response::ShardNotifications {
        led,
        missing,
        told,
        // Told only once everything before the end was answered.
        ended: if room > 0 { ended(&feeds) } else { Vec::new() },
    }
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

/// The pushers of a node, by shard and subscription.
#[derive(Default)]
struct Pushing {
    running: HashMap<(GroupId, u64), Running>,
    /// Pushers stopped (aborted) that may not have ended yet: the next pusher of the
    /// same subscription on the same shard waits for its end before it rewinds their
    /// shared feed, which the old one could still be taking from.
    stopping: HashMap<(GroupId, u64), tokio::task::JoinHandle<()>>,
}

impl Pushing {
    /// Stops the pusher of `key`, if one runs.
    fn stop(&mut self, key: (GroupId, u64)) {
        if let Some(old) = self.running.remove(&key) {
            old.task.abort();
            self.stopping.insert(key, old.task);
        }
    }
}

impl Drop for Pushing {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
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
    let mut pushing = Pushing::default();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(set) = shards.upgrade() else {
            return;
        };
        // Watched before looking, so that no change is missed.
        let changed = set.changes().next();
        look_over(&set, &shards, &pushers, &mut pushing);
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
    pushing: &mut Pushing,
) {
    pushing.stopping.retain(|_, task| !task.is_finished());
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
            if pushing
                .running
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
            pushing.stop(key);
            let before = pushing.stopping.remove(&key);
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
                if let Some(before) = before {
                    let _ = before.await;
                }
                // Everything the replica keeps: the subscriber drops what it had.
                feed.rewind(0);
                let stopped = push(config, Some(shard), Arc::new(feed), rx).await;
                if stopped != Stopped::Ended {
                    end_on(&shards, shard, &entry_type, id).await;
                }
            });
            pushing.running.insert(
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
    let gone: Vec<_> = pushing
        .running
        .keys()
        .filter(|key| !wanted.contains(key))
        .copied()
        .collect();
    for key in gone {
        pushing.stop(key);
    }
}

/// Moves what `feeds` hold now into `told`, `room` notifications at most.
fn drain(
    told: &mut Vec<(u32, Vec<Notification>)>,
    feeds: &[(u32, Subscription)],
    room: &mut usize,
) {
    for (shard, feed) in feeds {
        let mut got = Vec::new();
        while *room > 0 {
            match feed.try_recv() {
                Some(n) => {
                    got.push(n);
                    *room -= 1;
                }
                None => break,
            }
        }
        if !got.is_empty() {
            match told.iter_mut().find(|(s, _)| s == shard) {
                Some((_, more)) => more.extend(got),
                None => told.push((*shard, got)),
            }
        }
    }
}

/// Whether the engine that leads `shard` here holds subscription `id`.
fn held_by_leader(set: &ShardSet, shard: GroupId, entry_type: &str, id: u64) -> bool {
    set.serving()
        .iter()
        .any(|(s, e)| *s == shard && e.holds_logged(entry_type, id))
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
