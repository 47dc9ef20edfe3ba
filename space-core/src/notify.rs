//! Notify: events, subscriptions and their bounded queues.
//!
//! Every change to an entry (written, taken, claimed, released, expired) is checked once,
//! under the entry type's lock, against the subscriptions of that type; each matching
//! subscription gets an [`Event`] with the next number of its own sequence. Because events
//! are produced under the lock, a subscription sees them in the order the changes
//! happened, numbered without gaps.
//!
//! A subscription's queue is bounded. A subscriber that falls behind never slows writers:
//! events that do not fit are dropped *and counted*, and the subscriber receives one
//! [`Notification::Gap`] naming the sequence numbers it missed before the next event.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use space_query::Query;

use crate::entry::{Key, NodeId};

/// What happened to an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A new entry was written (or an entry came back after a cancelled hand-off).
    Written,
    /// The entry was taken (by a take, a take by key, or a committed claim).
    Taken,
    /// The entry was claimed and is hidden until committed or released.
    Claimed,
    /// A claim was released or ran out; the entry is visible again.
    Released,
    /// The entry's lease ran out or was cancelled; the entry is gone.
    Expired,
}

impl EventKind {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of event kinds a subscription wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventKinds(u8);

impl EventKinds {
    /// Every kind.
    pub const ALL: EventKinds = EventKinds(0b1_1111);
    /// Only writes: the usual "tell me about new work" subscription.
    pub const WRITTEN: EventKinds = EventKinds(1);

    /// The set holding exactly `kinds`.
    pub fn of(kinds: &[EventKind]) -> EventKinds {
        EventKinds(kinds.iter().fold(0, |acc, k| acc | k.bit()))
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// One change that matched a subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the subscription's own sequence: 1, 2, 3, ... without gaps unless a
    /// [`Notification::Gap`] says otherwise.
    pub seq: u64,
    /// The node that holds the entry (read or take it there).
    pub node: NodeId,
    /// The entry's type.
    pub entry_type: Arc<str>,
    /// The entry's key.
    pub key: Key,
    /// What happened.
    pub kind: EventKind,
    /// The entry's version after the change.
    pub version: u64,
}

/// What a subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notification {
    /// A matching change.
    Event(Event),
    /// Events `first_seq..=last_seq` were dropped because the subscriber fell behind.
    Gap {
        /// The first missed sequence number.
        first_seq: u64,
        /// The last missed sequence number.
        last_seq: u64,
    },
}

impl Notification {
    /// The event, if this is one.
    pub fn event(&self) -> Option<&Event> {
        match self {
            Notification::Event(e) => Some(e),
            Notification::Gap { .. } => None,
        }
    }
}

/// Default number of notifications a subscription queues before it starts dropping
/// (and reporting a gap).
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

struct Queue {
    items: VecDeque<Notification>,
    next_seq: u64,
    /// Dropped sequence numbers not yet reported: (first, last).
    gap: Option<(u64, u64)>,
    dropped: u64,
    waker: Option<Waker>,
    closed: bool,
    expires: Option<Instant>,
}

/// The shared state of one subscription: its query and its queue.
pub(crate) struct SubShared {
    pub(crate) id: u64,
    pub(crate) entry_type: Arc<str>,
    pub(crate) query: Query,
    pub(crate) kinds: EventKinds,
    capacity: usize,
    queue: Mutex<Queue>,
    cv: Condvar,
}

impl SubShared {
    pub(crate) fn new(
        id: u64,
        entry_type: Arc<str>,
        query: Query,
        kinds: EventKinds,
        capacity: usize,
        expires: Option<Instant>,
    ) -> Self {
        SubShared {
            id,
            entry_type,
            query,
            kinds,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                next_seq: 1,
                gap: None,
                dropped: 0,
                waker: None,
                closed: false,
                expires,
            }),
            cv: Condvar::new(),
        }
    }

    /// Queues an event (called under the entry type's lock, which orders the events).
    pub(crate) fn push(&self, node: NodeId, key: &Key, kind: EventKind, version: u64) {
        let mut q = self.queue.lock();
        if q.closed {
            return;
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        // A pending gap is reported in order: it needs a slot before the event does.
        let needed = 1 + usize::from(q.gap.is_some());
        if q.items.len() + needed > self.capacity {
            q.dropped += 1;
            q.gap = Some(match q.gap {
                Some((first, _)) => (first, seq),
                None => (seq, seq),
            });
            return;
        }
        if let Some((first_seq, last_seq)) = q.gap.take() {
            q.items.push_back(Notification::Gap {
                first_seq,
                last_seq,
            });
        }
        q.items.push_back(Notification::Event(Event {
            seq,
            node,
            entry_type: self.entry_type.clone(),
            key: key.clone(),
            kind,
            version,
        }));
        let waker = q.waker.take();
        drop(q);
        self.cv.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn pop(q: &mut Queue) -> Option<Notification> {
        if let Some(n) = q.items.pop_front() {
            return Some(n);
        }
        q.gap.take().map(|(first_seq, last_seq)| Notification::Gap {
            first_seq,
            last_seq,
        })
    }

    /// Closes the queue: nothing more is delivered, queued notifications are discarded.
    pub(crate) fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        q.items.clear();
        q.gap = None;
        let waker = q.waker.take();
        drop(q);
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.queue.lock().closed
    }

    pub(crate) fn expires(&self) -> Option<Instant> {
        self.queue.lock().expires
    }

    pub(crate) fn set_expires(&self, expires: Option<Instant>) {
        self.queue.lock().expires = expires;
    }

    /// Number of events dropped because the subscriber fell behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.queue.lock().dropped
    }

    pub(crate) fn try_recv(&self) -> Option<Notification> {
        Self::pop(&mut self.queue.lock())
    }

    /// Blocks until a notification arrives, the subscription closes (`None`), or the
    /// deadline passes (`None`).
    pub(crate) fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        let mut q = self.queue.lock();
        loop {
            if let Some(n) = Self::pop(&mut q) {
                return Some(n);
            }
            if q.closed {
                return None;
            }
            match deadline {
                None => self.cv.wait(&mut q),
                Some(d) => {
                    if self.cv.wait_until(&mut q, d).timed_out() {
                        return Self::pop(&mut q);
                    }
                }
            }
        }
    }

    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        let mut q = self.queue.lock();
        if let Some(n) = Self::pop(&mut q) {
            return Poll::Ready(Some(n));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A live subscription: a stream of [`Notification`]s for the changes that match its
/// query, from the moment it was registered.
///
/// Receive with the blocking [`recv`](Self::recv) / [`recv_timeout`](Self::recv_timeout)
/// / [`try_recv`](Self::try_recv) from threads, or use it as a `futures::Stream` from async
/// code. Dropping it (or [`cancel`](Self::cancel)) unsubscribes at once.
pub struct Subscription {
    pub(crate) shared: Arc<SubShared>,
    pub(crate) engine: crate::engine::Engine,
}

impl Subscription {
    /// The subscription's id on its node.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The query it matches.
    pub fn query(&self) -> &Query {
        &self.shared.query
    }

    /// Blocks until the next notification; `None` once the subscription is closed
    /// (cancelled or its lease ran out).
    pub fn recv(&self) -> Option<Notification> {
        self.shared.recv_until(None)
    }

    /// Waits up to `timeout` for the next notification; `None` on timeout or when closed.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Notification> {
        self.shared.recv_until(Instant::now().checked_add(timeout))
    }

    /// The next notification if one is queued; never waits.
    pub fn try_recv(&self) -> Option<Notification> {
        self.shared.try_recv()
    }

    /// How many events were dropped because this subscriber fell behind (each drop is also
    /// reported in order as a [`Notification::Gap`]).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped()
    }

    /// Whether the subscription has been cancelled or has expired.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Extends the subscription's lease from now.
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`](crate::SpaceError) when it already ended, and
    /// [`SpaceError::InvalidLease`](crate::SpaceError) for an unusable lease.
    pub fn renew(&self, lease: crate::Lease) -> crate::Result<()> {
        self.engine.renew_subscription(&self.shared, lease)
    }

    /// Unsubscribes. Nothing is delivered after this returns, not even notifications that
    /// were already queued.
    pub fn cancel(&self) {
        self.engine.unsubscribe(&self.shared);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl futures_core::Stream for Subscription {
    type Item = Notification;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.shared.poll_recv(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.shared.id)
            .field("query", &self.shared.query.to_string())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(capacity: usize) -> SubShared {
        SubShared::new(
            1,
            "T".into(),
            Query::for_type("T"),
            EventKinds::ALL,
            capacity,
            None,
        )
    }

    #[test]
    fn overflow_becomes_one_gap_in_order() {
        let s = shared(3);
        let key = Key::mint();
        for _ in 0..10 {
            s.push(NodeId(0), &key, EventKind::Written, 1);
        }
        let seqs: Vec<_> = std::iter::from_fn(|| s.try_recv()).collect();
        assert_eq!(seqs.len(), 4);
        assert_eq!(seqs[0].event().unwrap().seq, 1);
        assert_eq!(seqs[2].event().unwrap().seq, 3);
        assert_eq!(
            seqs[3],
            Notification::Gap {
                first_seq: 4,
                last_seq: 10
            }
        );
        assert_eq!(s.dropped(), 7);
        s.push(NodeId(0), &key, EventKind::Taken, 2);
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 11);
    }

    #[test]
    fn gap_comes_before_later_events() {
        let s = shared(2);
        let key = Key::mint();
        for _ in 0..4 {
            s.push(NodeId(0), &key, EventKind::Written, 1);
        }
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 1);
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 2);
        s.push(NodeId(0), &key, EventKind::Written, 1); // seq 5, room for gap + event
        assert_eq!(
            s.try_recv().unwrap(),
            Notification::Gap {
                first_seq: 3,
                last_seq: 4
            }
        );
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 5);
    }

    #[test]
    fn close_discards_and_ends() {
        let s = shared(8);
        s.push(NodeId(0), &Key::mint(), EventKind::Written, 1);
        s.close();
        assert_eq!(s.recv_until(None), None);
    }
}
