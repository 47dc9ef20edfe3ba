//! The space engine (the executor): every operation of docs/ARCHITECTURE.md section 4 over
//! entry documents.
//!
//! Entries are kept per entry type in a [`TypeCell`]: one mutex around the type's store, its
//! waiting readers/takers/claimers (in arrival order) and its subscriptions. Every change is
//! *decided* here under that lock (the clock, minted keys, claim tokens, the oldest match,
//! the waiter a new entry goes to), written down as a [`Command`], appended to the log of a
//! durable engine, and *applied* by the pure [`state::apply`] (section 8); waiters and
//! subscriptions are served from the [`Outcome`]. Holding the lock from decision to
//! outcome gives the contract's guarantees plainly:
//!
//! - a write first announces itself to subscriptions and gives waiting readers copies;
//!   the taker or claimer that waited longest gets the entry itself (the hand-off is part
//!   of the write's command); only if nobody takes it is it stored. So no wake-up is lost
//!   and the longest waiting taker wins;
//! - reads, takes and claims pick the oldest visible match (the store iterates in write
//!   order, through a field index where the query allows);
//! - waiting is done outside the lock on a one-shot [`Slot`]; giving up (timeout or a
//!   dropped future) and being served are mutually exclusive, and an entry handed to a
//!   future that is then dropped goes back into the space (by a command).
//!
//! Lease expiry and claim lapse are decided by the timer thread on the engine's [`Clock`]
//! and enter the log as commands too.
//!
//! This module holds the engine's types, the lookup and locking of entry types, and the
//! one place a command is appended and applied ([`Engine::execute`]). The operations live
//! beside it by responsibility: `writes` (new entries, hand-offs, entries given back,
//! indexes), `takes` (reads, takes, claims and their commits and releases), `expiry`
//! (lease timers, renewals, cancels), `events` (subscriptions), `waiting` (blocked calls
//! and giving up), `log` (opening a durable engine, snapshots, the answer table).
//!
//! The typed, user-facing handle is [`Space`](crate::Space); this engine speaks documents
//! so that the node can serve it over the network unchanged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use space_query::{Fields, Query};

use crate::document::{ClaimTicket, ClaimedDocument, Document, Receipt, RequestId};
use crate::durable::{Checkpoints, Snapshot, TypeImage};
use crate::entry::{Key, NodeId};
use crate::error::{Result, SpaceError};
use crate::lease::{Clock, Deadline, Lease, Now, timeout_deadline};
use crate::notify::{
    DEFAULT_QUEUE_CAPACITY, EventBudget, EventGate, EventKind, EventKinds, Hub, Keeper, SubShared,
    Subscription,
};
use crate::signal::{Slot, SlotFuture, Wakeup};
use crate::state::{
    self, Answer, Answers, BatchMarks, Cause, Command, GiveBack, HandOff, Outcome, Taken,
};
use crate::store::{Record, Store, Totals};
use crate::timers::Timers;

mod events;
mod expiry;
mod host;
mod log;
mod logged;
mod replica;

use host::Services;
pub use host::{HostedLog, LogHost, LogImage, LogMark};
pub use logged::{LOGGED_ID_BIT, LoggedView, Registered, new_logged_id};
use replica::Mode;
pub use replica::{Applied, Proposals};
mod takes;
mod waiting;
mod writes;
use crate::wal::Wal;

/// Counters describing the engine's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Entries stored (visible, claimed, or expired but not yet reaped).
    pub entries: u64,
    /// Approximate bytes of entry documents.
    pub bytes: u64,
    /// Entry types with a store.
    pub entry_types: u64,
    /// Blocked reads, takes and claims.
    pub waiters: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Events the subscriptions hold (queued for delivery, or kept for a resume).
    pub queued_events: u64,
    /// The subscriber lag: the most events one subscription has been told that its
    /// subscriber has not had yet (over several nodes, the largest).
    pub subscriber_lag: u64,
    /// Pending lease timers.
    pub timers: u64,
    /// Client connections open (filled in by a node).
    pub connections: u64,
    /// Clients with subscriptions pushed to them (filled in by a node).
    pub subscribers: u64,
    /// Requests the node has received since it started (filled in by a node; summed over
    /// several nodes). Two readings a second apart give operations per second.
    pub operations: u64,
    /// Members of a cluster that could not be reached for these counters (filled in by a
    /// client that merges the counters of several nodes; empty when all answered).
    pub unreachable: Vec<String>,
    /// The entry types that hold entries or have waiters, by name, with their counters.
    pub types: Vec<TypeStats>,
}

/// One entry type's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeStats {
    /// The entry type.
    pub entry_type: String,
    /// Entries stored (visible, claimed, or expired but not yet reaped).
    pub entries: u64,
    /// Approximate bytes of their documents.
    pub bytes: u64,
    /// Blocked reads, takes and claims on the type.
    pub waiters: u64,
}

impl Stats {
    /// Adds the counters of another node (entry types: the larger count, since types are
    /// usually present on every node).
    pub fn add(&mut self, other: &Stats) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.entry_types = self.entry_types.max(other.entry_types);
        self.waiters += other.waiters;
        self.subscriptions += other.subscriptions;
        self.queued_events += other.queued_events;
        self.subscriber_lag = self.subscriber_lag.max(other.subscriber_lag);
        self.operations += other.operations;
        self.timers += other.timers;
        self.connections += other.connections;
        self.subscribers += other.subscribers;
        self.unreachable.extend(other.unreachable.iter().cloned());
        for t in &other.types {
            match self
                .types
                .binary_search_by(|mine| mine.entry_type.cmp(&t.entry_type))
            {
                Ok(i) => {
                    self.types[i].entries += t.entries;
                    self.types[i].bytes += t.bytes;
                    self.types[i].waiters += t.waiters;
                }
                Err(i) => self.types.insert(i, t.clone()),
            }
        }
    }
}

/// Entries and bytes held by a node's replica engines together (see
/// [`EngineConfig::holdings`]). Cloning shares the count.
#[derive(Clone, Default)]
pub struct Holdings(Arc<Totals>);

impl Holdings {
    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.0.entries.load(Ordering::Relaxed)
    }

    /// Bytes of documents held.
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Holdings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holdings")
            .field("entries", &self.entries())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Where an engine that starts with nothing counts its subscription ids and claim tokens
/// from: the wall-clock time in microseconds (then up by one each). Neither a node's
/// subscriptions nor, in memory, its claims outlive its process, and the next process
/// hands out none of the last one's numbers: a client that renews, resumes or cancels a
/// subscription a restarted node lost finds it gone (and registers it anew) instead of
/// reaching another subscription that took its id, and a claim ticket from before a
/// restart cannot commit or release a later claim of an entry written again under the
/// same key. A durable engine's tokens, and those of an engine that leads a shard,
/// continue from its log or its shard's state, but never from below this either: a
/// ticket from a data directory that was wiped, or from a cluster created anew at the
/// same addresses (whose shards start from nothing), is no later claim's. Below 2^53 for
/// centuries, so the numbers stay exact as JSON numbers.
fn fresh_numbers_from() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| u64::try_from(t.as_micros()).unwrap_or(1).max(1))
}

/// Whether the other nodes that replicate a shard have room for a write, asked by the
/// engine that leads the shard before it decides the write (see
/// [`EngineConfig::replicas_room`]). Cloning shares the check.
#[derive(Clone)]
pub struct RoomCheck(Arc<dyn Fn(u64, u64) -> Option<String> + Send + Sync>);

impl RoomCheck {
    /// A check that gives, for a write of that many entries and bytes of documents, why
    /// a replica has no room for it, or `None` when they all have.
    pub fn new(check: impl Fn(u64, u64) -> Option<String> + Send + Sync + 'static) -> RoomCheck {
        RoomCheck(Arc::new(check))
    }

    /// Why a write of `entries` entries holding `bytes` bytes of documents does not fit
    /// on some replica.
    pub fn refusal(&self, entries: u64, bytes: u64) -> Option<String> {
        (self.0)(entries, bytes)
    }
}

impl std::fmt::Debug for RoomCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomCheck")
    }
}

/// Engine settings. Start from [`EngineConfig::default`] and set the fields you need
/// (`let mut config = EngineConfig::default(); config.max_entries = Some(1_000_000);`):
/// new settings may be added without breaking that.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineConfig {
    /// The node id stamped on receipts and events.
    pub node: NodeId,
    /// How many notifications a subscription queues before it reports a gap.
    pub queue_capacity: usize,
    /// Largest entry accepted, in bytes of document (`None`: no limit).
    pub max_entry_bytes: Option<u64>,
    /// Most entries held at once; writes beyond get [`SpaceError::Full`].
    pub max_entries: Option<u64>,
    /// Most bytes of documents held at once; writes beyond get [`SpaceError::Full`].
    pub max_bytes: Option<u64>,
    /// What a node holds in all the replicas it keeps (a replicated node's shards): each
    /// replica engine given it counts its entries there too, and an engine that leads a
    /// replicated log checks `max_entries` and `max_bytes` against it rather than
    /// against itself, so that the limits bound the node, not each shard.
    pub holdings: Option<Holdings>,
    /// For an engine that leads a replicated log: whether the nodes of the log's other
    /// replicas have room for a write, asked after this node's own limits; a refusal
    /// fails the write [`SpaceError::Full`] with its reason (each node's limits bound
    /// what it holds of every shard it replicates, not only of those it leads).
    pub replicas_room: Option<RoomCheck>,
    /// Most entry types held at once; a write that would add one more gets
    /// [`SpaceError::Full`]. Entry types left empty (no entries, waiters, subscriptions or
    /// declared indexes) are forgotten to make room.
    pub max_entry_types: Option<usize>,
    /// Most blocked reads, takes and claims at once; one more gets [`SpaceError::Busy`].
    pub max_waiters: Option<usize>,
    /// Most live subscriptions at once; one more gets [`SpaceError::Busy`].
    pub max_subscriptions: Option<usize>,
    /// Most events all subscriptions hold at once (delivery queues and replay logs);
    /// past it a subscription drops its own oldest event (a gap) to take a new one.
    pub max_queued_events: Option<usize>,
    /// The ranges this node owns: keys it mints fall inside them (`None`: all ranges).
    pub ranges: Option<Arc<crate::hash::RangeSet>>,
    /// Durable engines: a log segment is closed past this many bytes.
    pub log_segment_bytes: u64,
    /// Durable engines: a snapshot is taken once the log grew by this many bytes (or by
    /// the size of the last snapshot, if larger), and older log segments are dropped.
    /// The replica engine of a shard group: the same of the group's Raft log, which also
    /// keeps at most this many bytes of entries behind its snapshot.
    pub snapshot_after_bytes: u64,
    /// Durable engines: each `fdatasync` of the write-ahead log is made to take this much
    /// longer, a slow disk for fault tests (zero, the default, in service).
    pub sync_delay: std::time::Duration,
    /// Durable engines: the disk is full once the write-ahead log wrote this many more
    /// bytes (the log then fails as on `ENOSPC`), for fault tests (`None`, the default,
    /// in service).
    pub full_after_bytes: Option<u64>,
    /// Where the engine reads the time for leases, claims and expiries (the system clock
    /// unless a test sets a [`Clock::manual`]).
    pub clock: Clock,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node: NodeId(0),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_entry_bytes: None,
            max_entries: None,
            max_bytes: None,
            holdings: None,
            replicas_room: None,
            max_entry_types: None,
            max_waiters: None,
            max_subscriptions: None,
            max_queued_events: None,
            ranges: None,
            log_segment_bytes: crate::durable::DEFAULT_SEGMENT_BYTES,
            snapshot_after_bytes: crate::durable::DEFAULT_SNAPSHOT_AFTER_BYTES,
            sync_delay: std::time::Duration::ZERO,
            full_after_bytes: None,
            clock: Clock::system(),
        }
    }
}

/// The space engine over documents; cheap to clone (one shared instance).
///
/// The engine closes when the last clone goes (or on [`close`](Self::close)): its threads
/// stop, a durable engine's log is written out and its data directory released before the
/// drop returns, so the directory can be opened again at once.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    /// Shared by the clones users hold; absent in the engine's own threads, so that only a
    /// user's drop closes the engine (never one of its threads, which could not wait for
    /// itself).
    _handle: Option<Arc<Handle>>,
}

/// Closes the engine when the last user-held clone drops.
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close();
    }
}

struct Inner {
    config: EngineConfig,
    /// Entry type → cell. Read on every operation without a lock; replaced (copied) only
    /// when a new entry type appears, under `new_type`.
    cells: ArcSwap<HashMap<Arc<str>, Arc<TypeCell>, foldhash::fast::RandomState>>,
    /// Held while the map of entry types is replaced; holds the size at which empty types
    /// are next swept out (doubling, so sweeps stay amortized).
    new_type: Mutex<usize>,
    /// Blocked reads, takes and claims (counted by their waiters).
    waiters: Arc<AtomicUsize>,
    /// Events held by all subscriptions.
    events: Arc<EventBudget>,
    /// The threads that serve the engine (shared with the other engines of its host).
    services: Arc<Services>,
    /// Whether those threads are this engine's own (stopped when it closes).
    owns_services: bool,
    /// This engine, for its timers to find it again.
    me: Weak<Inner>,
    /// The next claim token to hand out (decided, then carried by the command).
    next_token: AtomicU64,
    /// The next subscription id ([`fresh_numbers_from`] at first).
    next_sub: AtomicU64,
    /// The subscriptions registered through the log that the engine holds, over all
    /// entry types (against the limit of subscriptions).
    logged_count: AtomicUsize,
    /// Every live subscription by id (for resume, renew and cancel by id).
    subscriptions: Mutex<HashMap<u64, Arc<SubShared>>>,
    /// Entries and bytes held, for the limits.
    totals: Arc<Totals>,
    /// The engine's log, when it is durable.
    durable: Option<Durable>,
    /// Whether the state keeps the answer table (a log of the engine's own, or a
    /// replicated one, outlives this process: a retry must find its first answer).
    keeps_answers: bool,
    /// A replicated log drives this engine: the log's leader decides expiries, so it arms
    /// no lease timers of its own.
    replica: bool,
    /// This engine leads a replicated log: its commands are proposed there (and applied
    /// here at once); waiting for durability waits for their commit.
    proposals: Option<Arc<dyn Proposals>>,
    /// Holds back this leading engine's events until their commands are committed.
    gate: Option<Arc<EventGate>>,
    closed: std::sync::atomic::AtomicBool,
    /// Tells [`Engine::closed`] waiters that the engine closed.
    on_close: tokio::sync::Notify,
    /// The answers of recent requests: part of the state, changed only by `apply`
    /// (taken after an entry type's lock, never before one).
    answers: Mutex<Answers>,
    /// Held shared while a batch is decided and logged ([`Engine::batched`]), and
    /// exclusively while a snapshot copies the answers: a batch's answers are recorded
    /// before the batch has its place in the log, and a copy of them without that
    /// place, taken after the batch's type was cut, would be recorded again on replay.
    batches: parking_lot::RwLock<()>,
    /// Every applied command's log place and outcome, for the determinism tests.
    #[cfg(test)]
    trace: Mutex<Vec<(u64, String)>>,
    /// Called in tests where a race can fall: between a snapshot's cuts and its copy of
    /// the answers, and when a batch is decided but not logged yet.
    #[cfg(test)]
    hooks: Mutex<TestHooks>,
    /// Every event told, for the determinism tests: log index, type, key, kind, version.
    #[cfg(test)]
    told: Mutex<Vec<Told>>,
}

/// An event as the determinism tests see it: log index, type, key, kind, version.
#[cfg(test)]
pub(crate) type Told = (u64, String, Key, EventKind, u64);

/// Calls a test makes at points where a race can fall (see [`Inner`]'s `hooks`).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestHooks {
    /// Once a snapshot has cut every entry type, before it copies the answers.
    pub(crate) cut: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Once a batch is decided, before it is logged.
    pub(crate) batch_decided: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Where a durable engine's log is.
struct Durable {
    /// The host of the data directory, held until the engine closes.
    host: Mutex<Option<Arc<LogHost>>>,
    wal: Arc<Wal>,
    log: crate::wal::LogId,
    /// Held while a snapshot of this log is written: the host's checkpoint worker and a
    /// direct [`Engine::checkpoint`] would otherwise write and rename the same file.
    checkpointing: Mutex<()>,
}

/// What a lease timer is for.
enum TimerKind {
    /// An entry's lease.
    Entry { cell: Weak<TypeCell>, seq: u64 },
    /// A claim's lease.
    Claim {
        cell: Weak<TypeCell>,
        seq: u64,
        token: u64,
    },
    /// A subscription's lease.
    Subscription { sub: Weak<SubShared> },
    /// The lease of a subscription registered through the log.
    Logged { entry_type: Arc<str>, id: u64 },
}

impl Inner {
    /// Closes the engine, once: an in-memory engine stops its threads; a durable one lets
    /// go of its host, which (when no other engine holds it) stops its threads, writes
    /// its log out and releases the data directory before this returns.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.on_close.notify_waiters();
        match &self.durable {
            Some(durable) => drop(durable.host.lock().take()),
            None if self.owns_services => self.services.stop(),
            // Threads shared with the other engines of a host go with the host.
            None => {}
        }
    }

    /// The write-ahead log of a durable engine.
    fn wal(&self) -> Option<&Arc<Wal>> {
        self.durable.as_ref().map(|d| &d.wal)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

thread_local! {
    /// The id of the request the current thread is running (see [`Engine::with_request`]).
    static REQUEST: std::cell::Cell<Option<RequestId>> = const { std::cell::Cell::new(None) };
}

fn current_request() -> Option<RequestId> {
    REQUEST.with(|r| r.get())
}

/// Everything about one entry type, behind one lock.
pub(crate) struct TypeCell {
    name: Arc<str>,
    /// The `INDEXES` slice last declared for this type (a fast "already applied" check).
    declared: AtomicPtr<&'static str>,
    state: std::sync::Mutex<TypeState>,
}

struct TypeState {
    /// The entry type's name.
    name: Arc<str>,
    store: Store,
    waiters: VecDeque<Arc<Waiter>>,
    /// The type's subscriptions and their percolator.
    hub: Hub,
    /// Waiters served under the lock, to be woken once it is released.
    wakes: Vec<(Arc<Waiter>, Wakeup)>,
    /// Set when the type was found empty and taken out of the map: whoever still holds
    /// this cell looks the type up again.
    retired: bool,
    /// The commands of the batch being decided under the lock now, if one is
    /// ([`Engine::batched`]).
    batch: Option<OpenBatch>,
    /// The subscriptions registered through the log, by id ([`logged`]).
    logged: std::collections::BTreeMap<u64, logged::Logged>,
}

/// The commands of a batch decided so far (see [`Engine::batched`]): applied as they are
/// decided, logged together at its end.
struct OpenBatch {
    /// When the batch was decided (every command of it, as its one log record says).
    at: Deadline,
    commands: Vec<Command>,
    /// The proposal number kept for it, once a command was decided (a leading engine).
    proposal: Option<u64>,
}

impl TypeState {
    /// Whether nothing would be lost by forgetting this entry type: no entries, nobody
    /// waiting, no subscriptions, no declared indexes.
    fn is_empty(&self) -> bool {
        self.store.len() == 0
            && self.waiters.is_empty()
            && self.hub.len() == 0
            && self.logged.is_empty()
            && self.store.indexed_fields().is_empty()
    }
}

/// Whether creating an entry type heeds the limit of entry types.
#[derive(Clone, Copy)]
enum Room {
    /// A new type counts against the limit.
    Bounded,
    /// Entries coming back (recovered, or given back by a take whose caller went away)
    /// always get their type.
    Always,
}

/// The number of entry types past which empty ones are swept out of the map.
const SWEEP_TYPES_ABOVE: usize = 1024;

impl TypeCell {
    /// Locks the entry type. Waiters served while the lock is held are woken when the
    /// returned guard is dropped, after the lock is released.
    fn lock(&self) -> Locked<'_> {
        Locked(Some(
            self.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

/// The lock on an entry type; see [`TypeCell::lock`].
struct Locked<'a>(Option<std::sync::MutexGuard<'a, TypeState>>);

impl std::ops::Deref for Locked<'_> {
    type Target = TypeState;
    fn deref(&self) -> &TypeState {
        self.0
            .as_deref()
            .unwrap_or_else(|| unreachable!("only taken in drop"))
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut TypeState {
        self.0
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("only taken in drop"))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(mut guard) = self.0.take() {
            if guard.wakes.is_empty() {
                return;
            }
            let wakes = std::mem::take(&mut guard.wakes);
            drop(guard);
            for (waiter, wakeup) in wakes {
                waiter.slot.wake(wakeup);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum WaitMode {
    Read,
    Take,
    Claim(Duration),
}

struct Waiter {
    query: Query,
    mode: WaitMode,
    slot: Slot<Delivery>,
    /// The request the waiter belongs to (logged with what it is handed).
    request: Option<RequestId>,
    /// Counts the waiter in the engine's total while it exists.
    _counted: Counted,
}

/// One unit of a shared count, given back when dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Takes one unit of `count` unless it is at `max` already.
    fn take(count: &Arc<AtomicUsize>, max: Option<usize>) -> Option<Counted> {
        let max = max.unwrap_or(usize::MAX);
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Counted(count.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a waiter is handed.
enum Delivery {
    Copy(Document),
    Taken(Taken),
    Claimed(ClaimedDocument),
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(EngineConfig::default())
    }
}

impl Engine {
    /// Starts an engine (and its lease reaper thread, which ends when the last clone of
    /// the engine is dropped).
    pub fn new(config: EngineConfig) -> Engine {
        let services = Services::start(config.clock.clone(), None);
        Self::build(config, services, None, 1)
    }

    fn build(
        config: EngineConfig,
        services: Arc<Services>,
        durable: Option<Durable>,
        next_token: u64,
    ) -> Engine {
        let owns_services = durable.is_none();
        Self::build_as(
            config,
            services,
            owns_services,
            durable,
            next_token,
            Mode::Local,
        )
    }

    /// Builds an engine in `mode` (see [`Mode`]) that hands out claim tokens from
    /// `next_token` on, or from [`fresh_numbers_from`] when that is larger: every engine
    /// that decides claims does. A replica decides none: it takes `next_token` as given
    /// and follows the tokens its leader's commands carry, the same on every replica.
    fn build_as(
        config: EngineConfig,
        services: Arc<Services>,
        owns_services: bool,
        durable: Option<Durable>,
        next_token: u64,
        mode: Mode,
    ) -> Engine {
        let (replica, proposals) = match mode {
            Mode::Local => (false, None),
            Mode::Replica => (true, None),
            Mode::Leading(p) => (false, Some(p)),
        };
        let next_token = if replica {
            next_token
        } else {
            next_token.max(fresh_numbers_from())
        };
        let events = EventBudget::new(config.max_queued_events);
        let is_durable = durable.is_some();
        // Only replicas count into the node's holdings: a leading engine holds the same
        // entries as its shard's replica on the node.
        let holdings = match &config.holdings {
            Some(h) if replica => Some(h.0.clone()),
            _ => None,
        };
        let inner = Arc::new_cyclic(|me| Inner {
            config,
            cells: ArcSwap::from_pointee(HashMap::default()),
            new_type: Mutex::new(SWEEP_TYPES_ABOVE),
            waiters: Arc::new(AtomicUsize::new(0)),
            events,
            services: services.clone(),
            owns_services,
            me: me.clone(),
            next_token: AtomicU64::new(next_token),
            next_sub: AtomicU64::new(fresh_numbers_from()),
            logged_count: AtomicUsize::new(0),
            subscriptions: Mutex::new(HashMap::new()),
            totals: Arc::new(Totals::counted_in(holdings)),
            keeps_answers: replica || proposals.is_some() || durable.is_some(),
            replica,
            gate: proposals.as_ref().map(|_| Arc::new(EventGate::default())),
            proposals,
            durable,
            closed: std::sync::atomic::AtomicBool::new(false),
            on_close: tokio::sync::Notify::new(),
            answers: Mutex::new(Answers::default()),
            batches: parking_lot::RwLock::new(()),
            #[cfg(test)]
            trace: Mutex::new(Vec::new()),
            #[cfg(test)]
            hooks: Mutex::new(TestHooks::default()),
            #[cfg(test)]
            told: Mutex::new(Vec::new()),
        });
        if is_durable {
            services.serve(&inner);
        }
        Engine {
            _handle: Some(Arc::new(Handle(inner.clone()))),
            inner,
        }
    }

    /// The engine as its own threads use it (their clones do not keep it open).
    fn internal(inner: Arc<Inner>) -> Engine {
        Engine {
            inner,
            _handle: None,
        }
    }

    /// Whether `other` is a clone of this engine.
    pub fn same_as(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Closes the engine now, whatever other clones exist: its threads stop, a durable
    /// engine's log is written out and its data directory released before this returns.
    /// Dropping the last clone does the same. Changes made through a clone after this are
    /// not logged, and waiting for their durability fails with [`SpaceError::Storage`].
    pub fn close(&self) {
        self.inner.close();
    }

    /// Whether the engine was closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Completes once the engine is closed (at once if it is). A server races the calls
    /// that wait in an engine with this: when a replicated log's leadership ends and its
    /// serving engine closes, those calls are answered with an error instead of waiting
    /// out their timeouts (dropping a wait gives back what it was handed). Cancel-safe.
    pub async fn closed(&self) {
        loop {
            let notified = self.inner.on_close.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Runs `f` as part of the request `id`: the changes it makes are logged with the id,
    /// so that after a crash the request's answer can be rebuilt from the log.
    pub fn with_request<R>(&self, id: RequestId, f: impl FnOnce() -> R) -> R {
        let previous = REQUEST.with(|r| r.replace(Some(id)));
        let out = f();
        REQUEST.with(|r| r.set(previous));
        out
    }

    /// Appends `command` to the log (a durable engine) and applies it: the one way the
    /// space changes (see [`crate::state`]). Called under the entry type's lock, so the
    /// log holds each type's commands in the order they were applied.
    #[inline]
    fn execute(&self, st: &mut TypeState, command: Command) -> Outcome {
        if let Some(batch) = st.batch.as_mut() {
            let at = batch.at;
            let mark = match &self.inner.proposals {
                Some(proposals) => *batch.proposal.get_or_insert_with(|| proposals.reserve()),
                None => 0,
            };
            batch.commands.push(command.clone());
            // Its place in the log is known once the batch is logged (see `batched`).
            events::EVENT_MARK.with(|m| m.set(mark));
            let outcome = self.apply(st, None, Some(at), command);
            events::EVENT_MARK.with(|m| m.set(0));
            return outcome;
        }
        // The time a logged command is decided goes into the log with it.
        let clock = &self.inner.config.clock;
        if let Some(proposals) = &self.inner.proposals {
            let at = clock.read();
            let mark = proposals.propose(crate::durable::encode(at, &st.name, &command));
            // The events this command tells wait for its commit.
            events::EVENT_MARK.with(|m| m.set(mark));
            let outcome = self.apply(st, None, Some(at), command);
            events::EVENT_MARK.with(|m| m.set(0));
            return outcome;
        }
        match self.log_to() {
            Some((wal, log)) => {
                let at = clock.read();
                let index = wal
                    .append(log, &crate::durable::encode(at, &st.name, &command))
                    .index;
                self.apply(st, Some(index), Some(at), command)
            }
            None => self.apply(st, None, None, command),
        }
    }

    /// Runs `decide` on the locked entry type as one batch: the commands it decides are
    /// applied as they are decided, and logged (or proposed) together as one
    /// [`Command::Batch`] when it returns, so that a crash in the middle of the log's
    /// group commit, or a leader's death before the log committed everything, keeps all
    /// of them or none. A leading engine keeps the batch's proposal number from its
    /// first command (the events it tells wait for it), and the proposals after it wait
    /// for it to be filled. An engine without a log decides as usual.
    fn batched<T>(&self, st: &mut TypeState, decide: impl FnOnce(&mut TypeState) -> T) -> T {
        if self.inner.proposals.is_none() && self.log_to().is_none() {
            return decide(st);
        }
        let _open = self.inner.batches.read();
        st.batch = Some(OpenBatch {
            at: self.inner.config.clock.read(),
            commands: Vec::new(),
            proposal: None,
        });
        #[cfg(test)]
        let noted = (self.inner.trace.lock().len(), self.inner.told.lock().len());
        let (result, recorded) = BatchMarks::applying(|| decide(st));
        let Some(batch) = st.batch.take() else {
            return result;
        };
        if batch.commands.is_empty() {
            return result;
        }
        #[cfg(test)]
        self.run_hook(|h| h.batch_decided.clone());
        let command = Command::Batch {
            commands: batch.commands,
        };
        let bytes = crate::durable::encode(batch.at, &st.name, &command);
        if let (Some(proposals), Some(seq)) = (&self.inner.proposals, batch.proposal) {
            proposals.fill(seq, bytes);
        } else if let Some((wal, log)) = self.log_to() {
            let index = wal.append(log, &bytes).index;
            if self.inner.keeps_answers && !recorded.is_empty() {
                self.inner.answers.lock().place(&recorded, index);
            }
            #[cfg(test)]
            self.note_batch_at(noted, index);
        }
        result
    }

    /// Applies a command to the locked entry type through [`state::apply`] (live, after
    /// it was appended at `index` of the engine's log, or replayed from there), decided
    /// at `at`. A batch's commands are applied one after the other, at its index.
    #[inline]
    fn apply(
        &self,
        st: &mut TypeState,
        index: Option<u64>,
        at: Option<Deadline>,
        command: Command,
    ) -> Outcome {
        let command = match command {
            Command::Batch { commands } => {
                BatchMarks::applying(|| {
                    for command in commands {
                        self.apply(st, index, at, command);
                    }
                });
                return Outcome::Changed;
            }
            Command::Subscribe { subscription } => {
                let first = subscription.first_seq;
                return self.apply_subscribe(st, *subscription, first);
            }
            Command::RenewSubscriptions { ids, expires } => {
                return self.apply_renew_subscriptions(st, &ids, expires);
            }
            Command::Attach { id, attachment } => return logged::attach(st, id, attachment),
            Command::Unsubscribe { id, expired } => {
                return self.apply_unsubscribe(st, id, expired);
            }
            command => command,
        };
        // Events come from what applying did, the same way live and on replay (where no
        // subscription listens yet): a write is told before it is applied, the change
        // that follows it (a hand-off, a removal, a claim, a release) after.
        if let Command::Write { record, .. } = &command {
            events::announce(&self.inner, &mut st.hub, EventKind::Written, record);
            #[cfg(test)]
            self.note_told(index, &st.name, EventKind::Written, record);
        }
        let then = events::after(&command);
        // Only a log needs the answers in the state: it outlives the process, and a replay
        // must answer retries. Without one, the node's own table of recent answers serves
        // retries, and keeping a second copy here would cost every call a copy of its
        // answer.
        let keep = self.inner.keeps_answers && command.answers();
        let mut answers = keep.then(|| self.inner.answers.lock());
        let outcome = state::apply(
            &st.name,
            &mut st.store,
            answers.as_deref_mut(),
            index,
            at,
            command,
        );
        if let Some((kind, seq)) = then {
            let record = match &outcome {
                Outcome::HandedOff(r) | Outcome::Removed(r) => Some(r),
                Outcome::Stored | Outcome::Changed => st.store.get(seq),
                Outcome::Missing => None,
            };
            if let Some(record) = record {
                events::announce(&self.inner, &mut st.hub, kind, record);
                #[cfg(test)]
                self.note_told(index, &st.name, kind, record);
            }
        }
        #[cfg(test)]
        self.inner
            .trace
            .lock()
            .push((index.unwrap_or(0), format!("{}: {outcome:?}", st.name)));
        outcome
    }

    /// The host of a durable engine's data directory (`None` in memory, or once closed).
    pub fn log_host(&self) -> Option<Arc<LogHost>> {
        self.inner.durable.as_ref()?.host.lock().clone()
    }

    /// The log a change goes to: none for an in-memory engine, or one closed (changes
    /// made through a clone after [`close`](Self::close) are not logged).
    fn log_to(&self) -> Option<(&Arc<Wal>, crate::wal::LogId)> {
        let durable = self.inner.durable.as_ref()?;
        (!self.inner.closed.load(Ordering::Relaxed)).then_some((&durable.wal, durable.log))
    }

    /// Decides a new claim: its token, and its deadline `lease` from now (claim leases
    /// are checked against the longest lease first, so the clock can always hold it).
    fn claim_terms(&self, lease: Duration, now: &Now) -> (u64, Deadline) {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        (
            token,
            now.after(lease).unwrap_or(Deadline::from_ms(u64::MAX)),
        )
    }

    /// Arranges for `kind` to fire at `at` on the engine's timer.
    fn schedule(&self, at: Deadline, kind: TimerKind) {
        if self.inner.replica {
            return;
        }
        self.inner
            .services
            .timers
            .schedule(at, (self.inner.me.clone(), kind));
    }

    /// "Now" on the engine's clock, read when first needed.
    fn now(&self) -> Now<'_> {
        Now::new(&self.inner.config.clock)
    }

    /// This engine's node id.
    pub fn node(&self) -> NodeId {
        self.inner.config.node
    }

    /// Runs `f` with the store of `entry_type` locked, creating the store if the type has
    /// none yet.
    ///
    /// The store is borrowed from the current map of entry types without touching its
    /// reference count (a shared counter every thread would fight over); a store retired
    /// meanwhile (an empty type forgotten, see [`Self::create_type`]) is looked up again.
    /// `f` must not wait: it runs while a reference to the map is held. Waiters it serves
    /// are woken when the lock is released.
    ///
    /// # Errors
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of
    /// entry types.
    fn locked<R>(
        &self,
        entry_type: &str,
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState) -> R,
    ) -> Result<R> {
        self.locked_in(entry_type, Room::Bounded, f)
    }

    /// As [`locked`](Self::locked), creating the type past the limit of entry types when
    /// `room` says so (entries coming back must always have a place).
    fn locked_in<R>(
        &self,
        entry_type: &str,
        room: Room,
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState) -> R,
    ) -> Result<R> {
        let mut f = f;
        loop {
            match self.try_locked(entry_type, f) {
                Ok(out) => return Ok(out),
                Err(back) => f = back,
            }
            self.create_type(entry_type, room)?;
        }
    }

    /// As [`locked`](Self::locked), but for a type without a store nothing runs (`None`):
    /// for operations that only look, so that asking about a type does not create it.
    fn locked_if_exists<R>(
        &self,
        entry_type: &str,
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState) -> R,
    ) -> Option<R> {
        self.try_locked(entry_type, f).ok()
    }

    /// Runs `f` with the store of `entry_type` locked, or gives `f` back when the type has
    /// no store.
    fn try_locked<R, F: FnOnce(&Arc<TypeCell>, &mut TypeState) -> R>(
        &self,
        entry_type: &str,
        f: F,
    ) -> std::result::Result<R, F> {
        loop {
            let cells = self.inner.cells.load();
            let Some(cell) = cells.get(entry_type) else {
                return Err(f);
            };
            let mut guard = cell.lock();
            if !guard.retired {
                return Ok(f(cell, &mut guard));
            }
        }
    }

    /// Adds a store for `entry_type` (if another thread has not meanwhile). Past a size
    /// that doubles each time, empty types are first swept out of the map (retired), so an
    /// entry type used once and emptied does not cost memory forever.
    ///
    /// # Errors
    /// [`SpaceError::Full`] at the engine's maximum of entry types.
    fn create_type(&self, entry_type: &str, room: Room) -> Result<()> {
        let mut sweep_at = self.inner.new_type.lock();
        let current = self.inner.cells.load_full();
        if current.contains_key(entry_type) {
            return Ok(());
        }
        let mut next = (*current).clone();
        let max = match room {
            Room::Bounded => self.inner.config.max_entry_types,
            Room::Always => None,
        };
        if next.len() >= *sweep_at || max.is_some_and(|m| next.len() >= m) {
            next.retain(|_, cell| {
                let mut st = cell.lock();
                if st.is_empty() {
                    st.retired = true;
                }
                !st.retired
            });
            *sweep_at = (next.len() * 2).max(SWEEP_TYPES_ABOVE);
        }
        if let Some(max) = max
            && next.len() >= max
        {
            return Err(SpaceError::Full {
                reason: format!("it holds its maximum of {max} entry types"),
            });
        }
        let name: Arc<str> = Arc::from(entry_type);
        let cell = Arc::new(TypeCell {
            name: name.clone(),
            declared: AtomicPtr::new(std::ptr::null_mut()),
            state: std::sync::Mutex::new(TypeState {
                name: name.clone(),
                store: Store::new(self.inner.totals.clone()),
                waiters: VecDeque::new(),
                hub: Hub::new(name.clone()),
                wakes: Vec::new(),
                retired: false,
                batch: None,
                logged: std::collections::BTreeMap::new(),
            }),
        });
        next.insert(name, cell);
        self.inner.cells.store(Arc::new(next));
        Ok(())
    }

    // ----- writes -----

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    // ----- reads, takes, claims -----

    // ----- by key -----

    // ----- claims -----

    // ----- entry leases -----

    // ----- notify -----

    // ----- housekeeping -----

    /// Counters over all entry types.
    pub fn stats(&self) -> Stats {
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut stats = Stats {
            entry_types: cells.len() as u64,
            timers: self.inner.services.timers.len() as u64,
            queued_events: self.inner.events.held() as u64,
            ..Stats::default()
        };
        for cell in cells {
            let st = cell.lock();
            let (entries, bytes) = (st.store.len() as u64, st.store.bytes() as u64);
            stats.entries += entries;
            stats.bytes += bytes;
            let waiters = st.waiters.len() as u64;
            stats.waiters += waiters;
            stats.subscriptions += st.hub.len() as u64;
            stats.subscriber_lag = stats.subscriber_lag.max(st.hub.lag());
            if entries > 0 || waiters > 0 {
                stats.types.push(TypeStats {
                    entry_type: cell.name.to_string(),
                    entries,
                    bytes,
                    waiters,
                });
            }
        }
        stats.types.sort_by(|a, b| a.entry_type.cmp(&b.entry_type));
        stats
    }

    /// The kinds of value each top-level field of `entry_type`'s entries held so far (the
    /// learned schema), by field name; empty for a type nothing was written to.
    pub fn schema(&self, entry_type: &str) -> Vec<(String, space_query::ValueKind)> {
        self.locked_if_exists(entry_type, |_, st| st.store.schema())
            .unwrap_or_default()
    }

    /// Everything the state holds, as text in a canonical order (entry types by name,
    /// records by sequence number, answers oldest first): two engines hold the same state
    /// exactly when their digests are equal (replicas, replays). Takes each entry type's
    /// lock in turn; costly on a large state.
    pub fn state_digest(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        cells.sort_by(|a, b| a.name.cmp(&b.name));
        for cell in cells {
            let st = cell.lock();
            if st.store.len() == 0 && st.store.indexed_fields().is_empty() && st.logged.is_empty() {
                // An empty type is not state: the engine may forget it at any time.
                continue;
            }
            let _ = writeln!(
                out,
                "type {} next {} indexes {:?} schema {:?}",
                cell.name,
                st.store.last_seq(),
                st.store.indexed_fields(),
                st.store.schema()
            );
            for (seq, r) in st.store.iter() {
                let _ = writeln!(out, "  {seq} {r:?}");
            }
            // Their definitions: the numbers their events get are told by the engines
            // that tell them, not by one that leads the log.
            for (subscription, _) in Self::logged_image(&st) {
                let _ = writeln!(out, "  subscription {subscription:?}");
            }
        }
        for line in self.inner.answers.lock().describe() {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

#[cfg(test)]
impl Engine {
    /// The log place and outcome of every command applied so far, in log order.
    pub(crate) fn applied(&self) -> Vec<(u64, String)> {
        let mut trace = self.inner.trace.lock().clone();
        trace.sort_by_key(|(index, _)| *index);
        trace
    }

    fn note_told(&self, index: Option<u64>, entry_type: &str, kind: EventKind, record: &Record) {
        self.inner.told.lock().push((
            index.unwrap_or(0),
            entry_type.to_owned(),
            record.key.clone(),
            kind,
            record.version,
        ));
    }

    /// Runs the hook `which` picks, if a test set it.
    fn run_hook(&self, which: impl Fn(&TestHooks) -> Option<Arc<dyn Fn() + Send + Sync>>) {
        let hook = which(&self.inner.hooks.lock());
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Sets the hooks a test calls where a race can fall.
    pub(crate) fn set_hooks(&self, hooks: TestHooks) {
        *self.inner.hooks.lock() = hooks;
    }

    /// Gives what a batch's commands noted since `from` (lengths of the trace and of the
    /// events told) the batch's index: they were applied before it was logged. (Tests
    /// that compare them decide on one thread.)
    fn note_batch_at(&self, from: (usize, usize), index: u64) {
        for noted in self.inner.trace.lock().iter_mut().skip(from.0) {
            if noted.0 == 0 {
                noted.0 = index;
            }
        }
        for told in self.inner.told.lock().iter_mut().skip(from.1) {
            if told.0 == 0 {
                told.0 = index;
            }
        }
    }

    /// Every event applying commands told so far, in log order within each entry type.
    pub(crate) fn told(&self) -> Vec<Told> {
        let mut told = self.inner.told.lock().clone();
        told.sort_by_key(|t| t.0);
        told
    }

    /// Replays `commands` into this (fresh) engine, as recovery does after a snapshot.
    pub(crate) fn replay(&self, commands: Vec<(u64, Deadline, String, Command)>) {
        self.recover_state(
            Snapshot {
                next_token: 1,
                types: Vec::new(),
                answers: Answers::default(),
                floor: 0,
                durable_to: 0,
            },
            commands,
        );
    }

    /// Fires the lease timers that are due by the engine's clock, now, on this thread.
    pub(crate) fn fire_due(&self) {
        for (engine, timer) in self.inner.services.timers.take_due() {
            if let Some(inner) = engine.upgrade() {
                Engine::internal(inner).fire(timer);
            }
        }
    }
}

/// Checks that an entry can be stored: a usable entry type name, field names a query can
/// address, and nesting within the limit (before anything walks the document further).
pub(crate) fn check_document(entry_type: &str, fields: &Fields) -> Result<()> {
    space_query::validate_entry_type(entry_type).map_err(|reason| {
        SpaceError::InvalidEntryType {
            entry_type: entry_type.to_owned(),
            reason: reason.to_owned(),
        }
    })?;
    fields.validate().map_err(|problem| SpaceError::Document {
        entry_type: entry_type.to_owned(),
        problem,
    })
}

/// How [`Engine::bring`] brings a record in.
enum Bring {
    /// A new entry, written by `request`; its fields teach the schema new kinds (`learn`).
    New {
        learn: bool,
        request: Option<RequestId>,
    },
    /// An entry given back after its taker went away: announced as written again. When
    /// the taker was a request with an id, its answer notes the entry is back.
    Back { gives_back: Option<RequestId> },
}

/// The key of an entry being written: the user's, or a fresh UUID v7 that gets the
/// store's sequence number once the entry type is locked.
enum NewKey {
    User(Key),
    Minted(uuid::Uuid),
}

enum Begun {
    Done(Option<Delivery>),
    Wait(WaitGuard),
}

/// The result of an operation that may have to wait: either ready now, or registered as a
/// waiter. Finish it with [`wait`](Self::wait) (blocking the thread) or
/// [`wait_async`](Self::wait_async).
///
/// Dropping a `Pending` gives up the wait; anything handed to it meanwhile goes back into
/// the space.
pub struct Pending<T> {
    state: PendingState<T>,
}

type Finish<T> = Box<dyn FnOnce(Option<Delivery>) -> T + Send>;

enum PendingState<T> {
    Ready(T),
    Wait { guard: WaitGuard, finish: Finish<T> },
}

/// A registered waiter; removes itself on drop and returns anything handed to it that
/// was not collected.
struct WaitGuard {
    engine: Engine,
    cell: Arc<TypeCell>,
    waiter: Arc<Waiter>,
    deadline: Option<Instant>,
    done: bool,
}
