//! Notify: events, subscriptions and their bounded queues.
//!
//! Every change to an entry (written, taken, claimed, released, expired) is checked once,
//! under the entry type's lock, against the subscriptions of that type; each matching
//! subscription gets an [`Event`] with the next number of its own sequence. Because events
//! are produced under the lock, a subscription sees them in the order the changes
//! happened, numbered without gaps.
//!
//! Matching uses the [`Percolator`] of `space-query`, so one write costs a few hash lookups
//! however many subscriptions there are.
//!
//! Each subscription keeps a bounded log of its latest events, which serves two purposes:
//!
//! - it is the delivery queue: a subscriber that falls behind never slows writers; events
//!   that fall off the log before delivery are *counted*, and the subscriber receives one
//!   [`Notification::Gap`] naming the sequence numbers it missed before the next event;
//! - it is the replay buffer: a subscriber that went away and comes back with the last
//!   sequence number it saw (`Engine::resume`) receives what it
//!   missed, or a gap for the part that is no longer in the log.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::lease::Deadline;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use space_query::{Fields, Percolator, Query};

use crate::entry::{Key, NodeId};

/// What happened to an entry (more kinds may come: match with a wildcard arm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
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
    /// [`Notification::Gap`] says otherwise. On a replicated cluster, in its shard's
    /// sequence (`shard`).
    pub seq: u64,
    /// On a replicated cluster, the shard whose sequence `seq` is in (a subscription
    /// there is numbered per shard, whichever node leads it); `None` elsewhere (one
    /// sequence per node).
    #[serde(default)]
    pub shard: Option<u32>,
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
    /// Events may have been missed before this notice, how many is not known: the client
    /// registered the subscription again where it had been lost (a standalone node that
    /// restarted; shards of a replicated cluster that let go of it when its lease ran
    /// out there). Events after it may repeat some told before.
    Missed {
        /// 0: the notice is the client's own, in no node's or shard's numbering.
        seq: u64,
    },
}

impl Notification {
    /// The event, if this is one.
    pub fn event(&self) -> Option<&Event> {
        match self {
            Notification::Event(e) => Some(e),
            Notification::Gap { .. } | Notification::Missed { .. } => None,
        }
    }
}

/// Default number of events a subscription keeps: the most it queues for a slow
/// subscriber, and the window a returning subscriber can replay.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8_192;

struct Queue {
    /// The latest events, oldest first, with consecutive sequence numbers.
    log: VecDeque<Event>,
    /// For each event of `log`, the mark its gate must have released (0: none needed).
    marks: VecDeque<u64>,
    /// Sequence number of the next event.
    next_seq: u64,
    /// Sequence number of the next event to deliver.
    cursor: u64,
    /// Events that fell off the log before they were delivered.
    dropped: u64,
    waker: Option<Waker>,
    closed: bool,
    /// Closed by a cancel (what was queued is discarded), not by its lease running out.
    cancelled: bool,
    expires: Option<Deadline>,
}

/// The events all subscriptions of an engine hold in their logs, against a limit: past it,
/// a subscription makes room for a new event by dropping its own oldest one (a gap for its
/// subscriber if it was not delivered yet) instead of growing.
#[derive(Debug)]
pub(crate) struct EventBudget {
    held: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl EventBudget {
    pub(crate) fn new(max: Option<usize>) -> Arc<EventBudget> {
        Arc::new(EventBudget {
            held: 0.into(),
            max: max.unwrap_or(usize::MAX),
        })
    }

    /// Takes room for one more event, unless the limit is reached.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes room for one more event whatever the limit (a subscription always keeps the
    /// event it is told last).
    fn force(&self) {
        self.held.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Events held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The shared state of one subscription: its query and its queue.
pub(crate) struct SubShared {
    pub(crate) id: u64,
    pub(crate) entry_type: Arc<str>,
    pub(crate) query: Arc<Query>,
    pub(crate) kinds: EventKinds,
    capacity: usize,
    budget: Arc<EventBudget>,
    /// Holds back events until the commands that told them are committed (a serving
    /// engine of a replicated log).
    gate: Option<Arc<EventGate>>,
    queue: Mutex<Queue>,
    cv: Condvar,
}

/// Where the events of an engine that leads a replicated log wait until the commands
/// that told them are committed: each event carries the number of its command's
/// proposal (its mark), and is delivered once the gate has released that mark.
#[derive(Default)]
pub(crate) struct EventGate {
    released: std::sync::atomic::AtomicU64,
    /// Async receivers waiting for a release.
    wakers: Mutex<Vec<Waker>>,
}

impl EventGate {
    fn lets_through(&self, mark: u64) -> bool {
        mark <= self.released.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Releases every event marked up to `upto`.
    pub(crate) fn release(&self, upto: u64) {
        self.released
            .fetch_max(upto, std::sync::atomic::Ordering::AcqRel);
        let wakers = std::mem::take(&mut *self.wakers.lock());
        for w in wakers {
            w.wake();
        }
    }
}

impl Drop for SubShared {
    fn drop(&mut self) {
        self.budget.release(self.queue.get_mut().log.len());
    }
}

impl SubShared {
    pub(crate) fn new(
        id: u64,
        entry_type: Arc<str>,
        query: Arc<Query>,
        kinds: EventKinds,
        capacity: usize,
        budget: Arc<EventBudget>,
        expires: Option<Deadline>,
    ) -> Self {
        SubShared {
            id,
            entry_type,
            query,
            kinds,
            capacity: capacity.max(1),
            budget,
            gate: None,
            queue: Mutex::new(Queue {
                log: VecDeque::new(),
                marks: VecDeque::new(),
                next_seq: 1,
                cursor: 1,
                dropped: 0,
                waker: None,
                closed: false,
                cancelled: false,
                expires,
            }),
            cv: Condvar::new(),
        }
    }

    /// The subscription with its first event numbered `next_seq` (one registered through
    /// a log, picked up from an image that had numbered events before).
    pub(crate) fn numbered_from(self, next_seq: u64) -> Self {
        {
            let mut q = self.queue.lock();
            q.next_seq = next_seq.max(1);
            q.cursor = q.next_seq;
        }
        self
    }

    /// The number the next event gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.queue.lock().next_seq
    }

    /// The subscription with its events held behind `gate` (see [`EventGate`]).
    pub(crate) fn with_gate(mut self, gate: Option<Arc<EventGate>>) -> Self {
        self.gate = gate;
        self
    }

    /// Logs an event (called under the entry type's lock, which orders the events),
    /// delivered once the subscription's gate (if any) has released `mark`.
    pub(crate) fn push(&self, node: NodeId, key: &Key, kind: EventKind, version: u64, mark: u64) {
        let mut q = self.queue.lock();
        if q.closed {
            return;
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        // Room for the event: a full log (or an engine out of room for events) gives up
        // its oldest one.
        let grow = q.log.len() < self.capacity && self.budget.take();
        if !grow {
            q.marks.pop_front();
            match q.log.pop_front() {
                Some(old) if old.seq >= q.cursor => q.dropped += 1,
                Some(_) => {}
                None => self.budget.force(),
            }
        }
        q.marks.push_back(mark);
        q.log.push_back(Event {
            seq,
            shard: None,
            node,
            entry_type: self.entry_type.clone(),
            key: key.clone(),
            kind,
            version,
        });
        let waker = q.waker.take();
        drop(q);
        self.cv.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next notification to deliver: a gap if the cursor is behind the log; none
    /// while the next event is held by the gate.
    fn pop(q: &mut Queue, gate: Option<&EventGate>) -> Option<Notification> {
        if q.cursor >= q.next_seq {
            return None;
        }
        let first = q.log.front().map_or(q.next_seq, |e| e.seq);
        if q.cursor < first {
            let gap = Notification::Gap {
                first_seq: q.cursor,
                last_seq: first - 1,
            };
            q.cursor = first;
            return Some(gap);
        }
        let at = (q.cursor - first) as usize;
        if let (Some(gate), Some(mark)) = (gate, q.marks.get(at))
            && !gate.lets_through(*mark)
        {
            return None;
        }
        let event = q.log.get(at).cloned()?;
        q.cursor += 1;
        Some(Notification::Event(event))
    }

    /// Delivers again from the event after `last_seq` (0: from the start); what is no
    /// longer in the log comes back as one gap.
    pub(crate) fn rewind(&self, last_seq: u64) {
        let mut q = self.queue.lock();
        q.cursor = last_seq.saturating_add(1).min(q.next_seq);
        let waker = q.waker.take();
        drop(q);
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Closes the queue: nothing more is delivered, queued notifications are discarded.
    pub(crate) fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        q.cancelled = true;
        self.budget.release(q.log.len());
        q.log.clear();
        q.marks.clear();
        q.cursor = q.next_seq;
        let waker = q.waker.take();
        drop(q);
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends the subscription but keeps what it queued: it is delivered, then the stream
    /// ends (a lease that ran out).
    pub(crate) fn finish(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
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

    pub(crate) fn is_cancelled(&self) -> bool {
        self.queue.lock().cancelled
    }

    pub(crate) fn expires(&self) -> Option<Deadline> {
        self.queue.lock().expires
    }

    pub(crate) fn set_expires(&self, expires: Option<Deadline>) {
        self.queue.lock().expires = expires;
    }

    /// The sequence number of the last notification handed to the subscriber (0: none).
    pub(crate) fn handed(&self) -> u64 {
        self.queue.lock().cursor.saturating_sub(1)
    }

    /// Events told to this subscription that its subscriber has not had yet.
    pub(crate) fn lag(&self) -> u64 {
        let q = self.queue.lock();
        q.next_seq.saturating_sub(q.cursor)
    }

    /// Number of events dropped because the subscriber fell behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.queue.lock().dropped
    }

    pub(crate) fn try_recv(&self) -> Option<Notification> {
        Self::pop(&mut self.queue.lock(), self.gate.as_deref())
    }

    /// Whether events wait behind the gate (the queue is not empty, but nothing is
    /// deliverable yet).
    fn held(&self, q: &Queue) -> bool {
        self.gate.is_some() && q.cursor < q.next_seq
    }

    /// Blocks until a notification arrives, the subscription closes (`None`), or the
    /// deadline passes (`None`).
    pub(crate) fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        let gate = self.gate.as_deref();
        let mut q = self.queue.lock();
        loop {
            if let Some(n) = Self::pop(&mut q, gate) {
                return Some(n);
            }
            if q.closed {
                return None;
            }
            // Held events are looked at again shortly (a release wakes only async
            // receivers).
            let soon = Instant::now() + Duration::from_millis(5);
            let until = match (deadline, self.held(&q)) {
                (d, false) => d,
                (None, true) => Some(soon),
                (Some(d), true) => Some(d.min(soon)),
            };
            match until {
                None => self.cv.wait(&mut q),
                Some(until) => {
                    self.cv.wait_until(&mut q, until);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Self::pop(&mut q, gate);
                    }
                }
            }
        }
    }

    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        let mut q = self.queue.lock();
        if let Some(n) = Self::pop(&mut q, self.gate.as_deref()) {
            return Poll::Ready(Some(n));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        if let Some(gate) = &self.gate
            && self.held(&q)
        {
            gate.wakers.lock().push(cx.waker().clone());
            // A release between the pop above and now would have found no waker.
            if let Some(n) = Self::pop(&mut q, Some(gate)) {
                return Poll::Ready(Some(n));
            }
        }
        Poll::Pending
    }
}

/// The subscriptions of one entry type and the percolator that matches entries to them.
pub(crate) struct Hub {
    entry_type: Arc<str>,
    percolator: Percolator,
    subs: std::collections::HashMap<u64, Arc<SubShared>, foldhash::fast::RandomState>,
    scratch: Vec<u64>,
}

impl Hub {
    pub(crate) fn new(entry_type: Arc<str>) -> Hub {
        Hub {
            entry_type,
            percolator: Percolator::new(),
            subs: Default::default(),
            scratch: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, sub: Arc<SubShared>) -> Result<(), space_query::QueryError> {
        self.percolator.register(sub.id, sub.query.clone())?;
        self.subs.insert(sub.id, sub);
        Ok(())
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Arc<SubShared>> {
        self.percolator.unregister(id);
        let sub = self.subs.remove(&id);
        crate::shrink_if_sparse(&mut self.subs);
        sub
    }

    pub(crate) fn len(&self) -> usize {
        self.subs.len()
    }

    /// The most events one of these subscriptions was told that its subscriber has not
    /// had yet.
    pub(crate) fn lag(&self) -> u64 {
        self.subs.values().map(|s| s.lag()).max().unwrap_or(0)
    }

    /// Calls `f` for each subscription that wants to hear `kind` about an entry with these
    /// fields, in ascending id order.
    pub(crate) fn each_interested(
        &mut self,
        kind: EventKind,
        fields: &Fields,
        mut f: impl FnMut(&Arc<SubShared>),
    ) {
        if self.subs.is_empty() {
            return;
        }
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        self.percolator
            .match_entry(&self.entry_type, fields, &mut ids);
        for id in &ids {
            if let Some(sub) = self.subs.get(id)
                && sub.kinds.contains(kind)
            {
                f(sub);
            }
        }
        self.scratch = ids;
    }
}

/// Where a subscription stands, to pick it up later with `Space::resume_at` (after
/// [`Subscription::detach_at`], or from a process that started again): what it matches,
/// and on each node its id there and the last sequence number handed to the subscriber.
/// It serializes, so that a worker can keep it with its own progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionPosition {
    /// The subscription's query (a node that lost the subscription gets it anew).
    pub query: Query,
    /// The kinds of events it wants.
    pub kinds: EventKinds,
    /// Its registration on each node.
    pub parts: Vec<PartPosition>,
}

/// A subscription's registration on one node, in a [`SubscriptionPosition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartPosition {
    /// The node (its events carry this id).
    pub node: NodeId,
    /// The subscription's id on that node.
    pub id: u64,
    /// The last sequence number of that node's events handed to the subscriber (0: none).
    /// On a replicated cluster, of that shard's events (`shard`).
    pub last_seq: u64,
    /// On a replicated cluster, the shard this is the position in (`node` is then 0: a
    /// subscription there is numbered per shard, whichever node leads it); `None`
    /// elsewhere.
    #[serde(default)]
    pub shard: Option<u32>,
}

/// A subscription held on a node, from the client's side: what a remote [`Subscription`]
/// is backed by. Implemented by `space-client`.
pub trait RemoteFeed: Send + Sync {
    /// The subscription's id on its node.
    fn id(&self) -> u64;
    /// The kinds of events it wants, and on each node it is registered on its id there
    /// and the last sequence number handed to the subscriber from that registration.
    fn parts(&self) -> (EventKinds, Vec<PartPosition>);
    /// Blocks until the next notification, the subscription closes, or the deadline.
    fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification>;
    /// The next notification if one has arrived.
    fn try_recv(&self) -> Option<Notification>;
    /// Polls for the next notification.
    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>>;
    /// Events lost to gaps so far.
    fn dropped(&self) -> u64;
    /// Whether the subscription has ended.
    fn is_closed(&self) -> bool;
    /// Members of the cluster the subscription is not registered on (they could not be
    /// reached): their changes are not reported until it is. On a replicated cluster,
    /// the leaders of the shards it is not registered on.
    fn unreached(&self) -> Vec<String>;
    /// Extends the lease on the node.
    ///
    /// # Errors
    ///
    /// When the subscription is gone, or the lease is unusable.
    fn renew(&self, lease: crate::Lease) -> crate::Result<()>;
    /// Ends the subscription on the node.
    fn cancel(&self);
    /// Lets go without cancelling (the node keeps it until its lease runs out).
    fn detach(&self);
}

/// What keeps an in-process subscription: the engine, seen from here only as what a
/// subscription asks of it.
pub(crate) trait Keeper: Send + Sync {
    /// The node its events carry.
    fn node(&self) -> NodeId;
    /// Extends the subscription's lease.
    fn renew_subscription(&self, sub: &Arc<SubShared>, lease: crate::Lease) -> crate::Result<()>;
    /// Ends the subscription: matched no more, what it queued discarded.
    fn unsubscribe(&self, sub: &Arc<SubShared>);
}

enum Backing {
    Local {
        shared: Arc<SubShared>,
        engine: Box<dyn Keeper>,
    },
    Remote(Box<dyn RemoteFeed>),
}

/// A live subscription: a stream of [`Notification`]s for the changes that match its
/// query, from the moment it was registered.
///
/// Receive with the blocking [`recv`](Self::recv) / [`recv_timeout`](Self::recv_timeout)
/// / [`try_recv`](Self::try_recv) from threads, or use it as a `futures::Stream` from async
/// code. Dropping it (or [`cancel`](Self::cancel)) unsubscribes at once. The same type is
/// returned by the in-process space and by a remote one.
#[must_use = "dropping a subscription unsubscribes at once"]
pub struct Subscription {
    backing: Backing,
    query: Arc<Query>,
    /// Set by [`detach`](Self::detach): dropping then does not unsubscribe.
    detached: bool,
}

impl Subscription {
    pub(crate) fn local(shared: Arc<SubShared>, engine: Box<dyn Keeper>) -> Subscription {
        let query = shared.query.clone();
        Subscription {
            backing: Backing::Local { shared, engine },
            query,
            detached: false,
        }
    }

    /// A subscription backed by a node (for `space-client`).
    pub fn remote(query: Query, feed: Box<dyn RemoteFeed>) -> Subscription {
        Subscription {
            backing: Backing::Remote(feed),
            query: Arc::new(query),
            detached: false,
        }
    }

    /// The subscription's id on its node.
    pub fn id(&self) -> u64 {
        match &self.backing {
            Backing::Local { shared, .. } => shared.id,
            Backing::Remote(feed) => feed.id(),
        }
    }

    /// The query it matches.
    pub fn query(&self) -> &Query {
        &self.query
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        match &self.backing {
            Backing::Local { shared, .. } => shared.recv_until(deadline),
            Backing::Remote(feed) => feed.recv_until(deadline),
        }
    }

    /// Where the subscription stands: on each node, its id there and the last sequence
    /// number handed out from that registration (what is still queued on this side is
    /// not counted, so a resume gets it again; a node that registered the subscription
    /// anew, numbering from 1 again, counts from there).
    pub fn position(&self) -> SubscriptionPosition {
        let (kinds, parts) = match &self.backing {
            Backing::Local { shared, engine } => (
                shared.kinds,
                vec![PartPosition {
                    node: engine.node(),
                    id: shared.id,
                    last_seq: shared.handed(),
                    shard: None,
                }],
            ),
            Backing::Remote(feed) => feed.parts(),
        };
        SubscriptionPosition {
            query: (*self.query).clone(),
            kinds,
            parts,
        }
    }

    /// Blocks until the next notification; `None` once the subscription is closed
    /// (cancelled or its lease ran out).
    pub fn recv(&self) -> Option<Notification> {
        self.recv_until(None)
    }

    /// Waits up to `timeout` for the next notification; `None` on timeout or when closed.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Notification> {
        self.recv_until(Instant::now().checked_add(timeout))
    }

    /// The next notification if one is queued; never waits.
    pub fn try_recv(&self) -> Option<Notification> {
        match &self.backing {
            Backing::Local { shared, .. } => shared.try_recv(),
            Backing::Remote(feed) => feed.try_recv(),
        }
    }

    /// How many events were dropped because this subscriber fell behind (each drop is also
    /// reported in order as a [`Notification::Gap`]).
    pub fn dropped(&self) -> u64 {
        match &self.backing {
            Backing::Local { shared, .. } => shared.dropped(),
            Backing::Remote(feed) => feed.dropped(),
        }
    }

    /// Whether the subscription has been cancelled or has expired.
    pub fn is_closed(&self) -> bool {
        match &self.backing {
            Backing::Local { shared, .. } => shared.is_closed(),
            Backing::Remote(feed) => feed.is_closed(),
        }
    }

    /// Members of a cluster this subscription is not registered on, because they could not
    /// be reached: changes there are not reported until it is (a subscription without a
    /// lease registers itself again when they are back). On a replicated cluster, the
    /// leaders (as the client last knew them) of the shards it is not registered on.
    /// Empty in-process.
    pub fn unreached(&self) -> Vec<String> {
        match &self.backing {
            Backing::Local { .. } => Vec::new(),
            Backing::Remote(feed) => feed.unreached(),
        }
    }

    /// Whether the subscription was cancelled (rather than ended by its lease, after which
    /// what it matched is still delivered).
    pub fn is_cancelled(&self) -> bool {
        match &self.backing {
            Backing::Local { shared, .. } => shared.is_cancelled(),
            Backing::Remote(feed) => feed.is_closed(),
        }
    }

    /// Extends the subscription's lease from now. For a remote subscription this is a
    /// call to the node and blocks until it answers.
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`](crate::SpaceError) when it already ended, and
    /// [`SpaceError::InvalidLease`](crate::SpaceError) for an unusable lease.
    pub fn renew(&self, lease: crate::Lease) -> crate::Result<()> {
        match &self.backing {
            Backing::Local { shared, engine } => engine.renew_subscription(shared, lease),
            Backing::Remote(feed) => feed.renew(lease),
        }
    }

    /// Unsubscribes. Nothing is delivered after this returns, not even notifications that
    /// were already queued.
    pub fn cancel(&self) {
        match &self.backing {
            Backing::Local { shared, engine } => engine.unsubscribe(shared),
            Backing::Remote(feed) => feed.cancel(),
        }
    }

    /// Delivers again from the event after `last_seq` (what is no longer kept comes back
    /// as one gap). Used by the node to re-send what a subscriber did not acknowledge.
    pub fn rewind(&self, last_seq: u64) {
        if let Backing::Local { shared, .. } = &self.backing {
            shared.rewind(last_seq);
        }
    }

    /// Lets go of this handle without unsubscribing, as a subscriber that disconnects
    /// does: events keep being logged (up to the log's capacity) until the subscription's
    /// lease runs out, and `resume` with the returned id and the last sequence number seen
    /// picks up from there. Give such a subscription a lease, or it lives until cancelled.
    pub fn detach(mut self) -> u64 {
        if let Backing::Remote(feed) = &self.backing {
            feed.detach();
        }
        self.detached = true;
        self.id()
    }

    /// [`detach`](Self::detach), returning where the subscription stands on every node
    /// (see [`position`](Self::position)): `Space::resume_at` picks it up from there,
    /// on a cluster as on one node. Each node keeps a detached subscription's events
    /// until its lease runs out (a subscription made without a lease has one of the
    /// client's `subscription_lease`, renewed while it is held).
    pub fn detach_at(self) -> SubscriptionPosition {
        let position = self.position();
        self.detach();
        position
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.detached {
            self.cancel();
        }
    }
}

impl Subscription {
    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        match &self.backing {
            Backing::Local { shared, .. } => shared.poll_recv(cx),
            Backing::Remote(feed) => feed.poll_recv(cx),
        }
    }

    /// Waits for the next notification without blocking a thread; `None` once the
    /// subscription is closed. (The same as the `Stream` implementation, through `&self`.)
    ///
    /// # Cancel safety
    /// Dropping the future loses nothing: a notification is taken only when it is returned.
    pub async fn recv_async(&self) -> Option<Notification> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl futures_core::Stream for Subscription {
    type Item = Notification;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.poll_recv(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id())
            .field("query", &self.query.to_string())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(capacity: usize) -> SubShared {
        shared_within(capacity, EventBudget::new(None))
    }

    fn shared_within(capacity: usize, budget: Arc<EventBudget>) -> SubShared {
        SubShared::new(
            1,
            "T".into(),
            Arc::new(Query::for_type("T")),
            EventKinds::ALL,
            capacity,
            budget,
            None,
        )
    }

    #[test]
    fn subscriptions_share_a_budget_of_events() {
        let budget = EventBudget::new(Some(10));
        let (a, b) = (
            shared_within(100, budget.clone()),
            shared_within(100, budget.clone()),
        );
        let key = Key::mint();
        for _ in 0..8 {
            a.push(NodeId(0), &key, EventKind::Written, 1, 0);
        }
        for _ in 0..8 {
            b.push(NodeId(0), &key, EventKind::Written, 1, 0);
        }
        assert_eq!(
            budget.held(),
            10,
            "the engine holds no more than its budget"
        );
        // b keeps its latest events and reports the rest as a gap.
        let got: Vec<_> = std::iter::from_fn(|| b.try_recv()).collect();
        assert_eq!(
            got[0],
            Notification::Gap {
                first_seq: 1,
                last_seq: 6
            }
        );
        assert_eq!(got.len(), 3);
        drop(a);
        assert_eq!(budget.held(), 2, "a gave its room back");
        b.close();
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn overflow_becomes_one_gap_in_order() {
        let s = shared(3);
        let key = Key::mint();
        for _ in 0..10 {
            s.push(NodeId(0), &key, EventKind::Written, 1, 0);
        }
        let got: Vec<_> = std::iter::from_fn(|| s.try_recv()).collect();
        assert_eq!(
            got[0],
            Notification::Gap {
                first_seq: 1,
                last_seq: 7
            }
        );
        let seqs: Vec<u64> = got[1..].iter().map(|n| n.event().unwrap().seq).collect();
        assert_eq!(seqs, vec![8, 9, 10]);
        assert_eq!(s.dropped(), 7);
        s.push(NodeId(0), &key, EventKind::Taken, 2, 0);
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 11);
    }

    #[test]
    fn rewinding_replays_what_is_still_logged() {
        let s = shared(4);
        let key = Key::mint();
        for _ in 0..3 {
            s.push(NodeId(0), &key, EventKind::Written, 1, 0);
        }
        assert_eq!(std::iter::from_fn(|| s.try_recv()).count(), 3);
        s.rewind(1);
        let seqs: Vec<u64> = std::iter::from_fn(|| s.try_recv())
            .map(|n| n.event().unwrap().seq)
            .collect();
        assert_eq!(seqs, vec![2, 3]);
        for _ in 0..4 {
            s.push(NodeId(0), &key, EventKind::Written, 1, 0);
        }
        s.rewind(1);
        assert_eq!(
            s.try_recv(),
            Some(Notification::Gap {
                first_seq: 2,
                last_seq: 3
            })
        );
        assert_eq!(s.try_recv().unwrap().event().unwrap().seq, 4);
    }

    #[test]
    fn close_discards_and_ends() {
        let s = shared(8);
        s.push(NodeId(0), &Key::mint(), EventKind::Written, 1, 0);
        s.close();
        assert_eq!(s.recv_until(None), None);
    }

    #[test]
    fn a_gate_holds_events_until_their_mark_is_released() {
        let gate = Arc::new(EventGate::default());
        let s = Arc::new(
            SubShared::new(
                1,
                "T".into(),
                Arc::new(Query::for_type("T")),
                EventKinds::ALL,
                16,
                EventBudget::new(None),
                None,
            )
            .with_gate(Some(gate.clone())),
        );
        let key = Key::mint();
        s.push(NodeId(0), &key, EventKind::Written, 1, 1);
        s.push(NodeId(0), &key, EventKind::Taken, 2, 2);
        assert!(
            s.try_recv().is_none(),
            "an event went out before its release"
        );
        gate.release(1);
        assert!(matches!(s.try_recv(), Some(Notification::Event(e)) if e.seq == 1));
        assert!(s.try_recv().is_none());

        // An async receiver is woken by the release.
        let waiting = {
            let s = s.clone();
            std::thread::spawn(move || {
                futures::executor::block_on(futures::future::poll_fn(|cx| s.poll_recv(cx)))
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        gate.release(2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !waiting.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(waiting.is_finished(), "the release woke no async receiver");
        assert!(matches!(waiting.join().unwrap(), Some(Notification::Event(e)) if e.seq == 2));

        // A blocking receiver sees a release too.
        s.push(NodeId(0), &key, EventKind::Written, 3, 3);
        let blocked = {
            let s = s.clone();
            std::thread::spawn(move || s.recv_until(Some(Instant::now() + Duration::from_secs(5))))
        };
        std::thread::sleep(Duration::from_millis(50));
        gate.release(3);
        assert!(matches!(blocked.join().unwrap(), Some(Notification::Event(e)) if e.seq == 3));
    }
}
