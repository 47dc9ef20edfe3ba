//! Notify on a replicated node (docs/ARCHITECTURE.md section 9).
//!
//! A client subscribes on every node; each node tells it of the
//! changes of the shards that node leads. A subscription is registered on the node's own
//! engine (which holds no entries: its queue, numbering, lease, resume and push are those
//! of any subscription), and a relay task feeds it from the node's *replica* engines,
//! one engine subscription per shard replicated here. A replica applies only committed
//! commands, so only committed changes are told.
//!
//! While this node leads a shard, that shard's events are relayed as they come. While it
//! follows, they are kept for [`REPLAY_WINDOW`]: when the node takes the shard over (its
//! leader died, or handed it over), what the shard told in that window is relayed first,
//! since the old leader may not have pushed it; the subscriber may get those twice, never
//! not at all. When events older than the window were dropped meanwhile (or more came in
//! the window than the subscription queues, or the replica was replaced by a snapshot, or
//! its queue overflowed), the takeover relays a gap first: the subscriber learns it may
//! have missed something.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use space_core::server::Engine;
use space_core::{EventKinds, Lease, Notification, Query, SpaceError, Subscription};

use super::{GroupId, ShardSet};

/// How long a follower keeps a shard's events for a takeover to relay.
pub(crate) const REPLAY_WINDOW: Duration = Duration::from_secs(10);

/// How often a relay looks at its shards even when nothing happens (to trim what it
/// keeps, notice a replaced replica, and end once its subscription has).
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// One shard's part of a relayed subscription.
struct Part {
    /// The replica engine subscribed on (a snapshot installed replaces it).
    replica: Engine,
    sub: Subscription,
    /// Relaying as events come (this node leads the shard).
    leading: bool,
    /// While following: the shard's events of the last [`REPLAY_WINDOW`], at most as many
    /// as the subscription queues (more could not be relayed at a takeover without its
    /// queue dropping the oldest anyway).
    kept: VecDeque<(Instant, Notification)>,
    /// Whether something may be missing from `kept` (older events dropped, the queue
    /// overflowed, the replica was replaced).
    missed: bool,
}

/// What a relay tells its subscription from.
struct Relay {
    node: Engine,
    id: u64,
    query: Query,
    kinds: EventKinds,
    parts: BTreeMap<GroupId, Part>,
}

/// Registers a subscription on `node` (a replicated node's own engine) and starts the
/// relay that feeds it the events of `shards` (see the module documentation). The
/// relay ends once the subscription does.
///
/// # Errors
/// The subscription's errors (a bad query, a kind the entry type's schema does not
/// allow, too many subscriptions).
pub(crate) fn subscribe(
    node: &Engine,
    shards: &Arc<ShardSet>,
    query: &Query,
    kinds: EventKinds,
    lease: Lease,
) -> Result<Subscription, SpaceError> {
    let sub = node.subscribe(query, kinds, lease)?;
    let mut relay = Relay {
        node: node.clone(),
        id: sub.id(),
        query: query.clone(),
        kinds,
        parts: BTreeMap::new(),
    };
    for shard in shards.replicated() {
        let Some(replica) = shards.replica_engine(shard) else {
            continue;
        };
        // From now on: nothing before the subscription is told, and nothing is missing.
        let part = relay.part_on(replica)?;
        relay.parts.insert(shard, part);
    }
    relay.sync(shards);
    tokio::spawn(relay.run(Arc::downgrade(shards)));
    Ok(sub)
}

impl Relay {
    fn part_on(&self, replica: Engine) -> Result<Part, SpaceError> {
        let sub = replica.subscribe(&self.query, self.kinds, Lease::Forever)?;
        Ok(Part {
            replica,
            sub,
            leading: false,
            kept: VecDeque::new(),
            missed: false,
        })
    }

    /// Follows the shards this node leads and their replicas. Returns `false` once the
    /// subscription is gone.
    fn sync(&mut self, shards: &ShardSet) -> bool {
        let mut alive = true;
        for (shard, part) in &mut self.parts {
            if let Some(replica) = shards.replica_engine(*shard)
                && !replica.same_as(&part.replica)
            {
                // A snapshot replaced the replica: what happened in between is unknown.
                match replica.subscribe(&self.query, self.kinds, Lease::Forever) {
                    Ok(sub) => {
                        part.sub = sub;
                        part.replica = replica;
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "a relay could not follow a replaced replica");
                    }
                }
                part.kept.clear();
                part.missed = true;
                if part.leading {
                    alive &= self.node.relay(self.id, &missed());
                    part.missed = false;
                }
            }
            let leads = shards.leads(*shard);
            if leads && !part.leading {
                // Taken over: what the old leader may not have pushed comes first.
                if std::mem::take(&mut part.missed) {
                    alive &= self.node.relay(self.id, &missed());
                }
                for (_, n) in part.kept.drain(..) {
                    alive &= self.node.relay(self.id, &n);
                }
            }
            part.leading = leads;
        }
        alive && self.drain()
    }

    /// Relays (or keeps) what every part holds now. Returns `false` once the
    /// subscription is gone.
    fn drain(&mut self) -> bool {
        let now = Instant::now();
        let mut alive = true;
        for part in self.parts.values_mut() {
            while let Some(n) = part.sub.try_recv() {
                alive &= take_in(&self.node, self.id, part, n, now);
            }
            while part
                .kept
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > REPLAY_WINDOW)
            {
                part.kept.pop_front();
                part.missed = true;
            }
        }
        alive
    }

    /// Relays until the subscription ends: follows the shards at every change of the
    /// shards this node leads and every [`LOOK_EVERY`]; between looks, relays (or keeps)
    /// what the parts hold as it comes.
    async fn run(mut self, shards: Weak<ShardSet>) {
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = true;
        loop {
            let Some(set) = shards.upgrade() else {
                return;
            };
            // Watched before looking, so that no change is missed.
            let changed = set.changes().next();
            let alive = if look { self.sync(&set) } else { self.drain() };
            drop(set);
            if !alive {
                return;
            }
            let next = async {
                if self.parts.is_empty() {
                    return std::future::pending().await;
                }
                let (got, _, _) =
                    futures::future::select_all(self.parts.iter_mut().map(|(shard, part)| {
                        Box::pin(async move { (*shard, part.sub.next().await) })
                    }))
                    .await;
                got
            };
            tokio::select! {
                (shard, Some(n)) = next => {
                    look = false;
                    if let Some(part) = self.parts.get_mut(&shard)
                        && !take_in(&self.node, self.id, part, n, Instant::now())
                    {
                        return;
                    }
                }
                () = changed => look = true,
                _ = tick.tick() => look = true,
            }
        }
    }
}

/// Relays `n` from `part` (or keeps it, while following). Returns `false` once the
/// subscription is gone.
fn take_in(node: &Engine, id: u64, part: &mut Part, n: Notification, now: Instant) -> bool {
    if part.leading {
        return node.relay(id, &n);
    }
    if matches!(n, Notification::Gap { .. } | Notification::Missed { .. }) {
        part.missed = true;
    } else {
        part.kept.push_back((now, n));
        if part.kept.len() > node.config().queue_capacity {
            part.kept.pop_front();
            part.missed = true;
        }
    }
    true
}

/// A notice that events may have been missed (its place in the numbering is the relay's).
fn missed() -> Notification {
    Notification::Missed { seq: 0 }
}

#[cfg(test)]
mod tests {
    use space_core::{EngineConfig, Event, EventKind, Key, NodeId};

    use super::*;

    /// A follower keeps no more of a shard's events than the subscription queues; what it
    /// drops makes the takeover tell a gap first.
    #[test]
    fn a_follower_keeps_at_most_a_queue_of_events() {
        let mut config = EngineConfig::default();
        config.queue_capacity = 4;
        let node = Engine::new(config);
        let replica = Engine::new(EngineConfig::default());
        let query = Query::for_type("Job");
        let mut part = Part {
            sub: replica
                .subscribe(&query, EventKinds::ALL, Lease::Forever)
                .unwrap(),
            replica,
            leading: false,
            kept: VecDeque::new(),
            missed: false,
        };
        let event = |seq: u64| {
            Notification::Event(Event {
                seq,
                shard: None,
                node: NodeId(1),
                entry_type: "Job".into(),
                key: Key::Name("k".into()),
                kind: EventKind::Written,
                version: 1,
            })
        };
        let now = Instant::now();
        for seq in 1..=4 {
            assert!(take_in(&node, 1, &mut part, event(seq), now));
        }
        assert_eq!(part.kept.len(), 4);
        assert!(!part.missed);
        for seq in 5..=10 {
            assert!(take_in(&node, 1, &mut part, event(seq), now));
        }
        let kept: Vec<u64> = part
            .kept
            .iter()
            .filter_map(|(_, n)| n.event().map(|e| e.seq))
            .collect();
        assert_eq!(kept, vec![7, 8, 9, 10]);
        assert!(part.missed, "dropped events are not told as a gap");
    }
}
