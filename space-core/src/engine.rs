//! The space engine: every operation of docs/ARCHITECTURE.md section 4 over entry documents.
//!
//! Entries are kept per entry type in a [`Shard`]: one mutex around the type's store, its
//! waiting readers/takers/claimers (in arrival order) and its subscriptions. Everything that
//! changes an entry happens under that lock, which gives the contract's guarantees plainly:
//!
//! - a write first announces itself to subscriptions, then is offered to waiters in the
//!   order they started waiting (readers get copies, the first matching taker gets the
//!   entry itself); only if nobody took it is it stored. So no wake-up is lost and the
//!   longest waiting taker wins;
//! - reads, takes and claims pick the oldest visible match (the store iterates in write
//!   order, through a field index where the query allows);
//! - waiting is done outside the lock on a one-shot [`Slot`]; giving up (timeout or a
//!   dropped future) and being served are mutually exclusive, and an entry handed to a
//!   future that is then dropped goes back into the space.
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

use crate::durable::{
    LogRecord, RecordImage, RemoveCause, ShardImage, Wal, from_wall_ms, to_wall_ms,
};
use crate::entry::{Key, NodeId};
use crate::error::{Result, SpaceError};
use crate::lease::{Lease, Now, timeout_deadline, wall_clock};
use crate::notify::{
    DEFAULT_QUEUE_CAPACITY, EventBudget, EventKind, EventKinds, Hub, SubShared, Subscription,
};
use crate::signal::{Slot, SlotFuture, Wakeup};
use crate::store::{ClaimState, Record, Store, Totals};
use crate::timers::{TimerKind, Timers};
use crate::wire::{RequestId, Response};

/// An entry as the engine hands it out: its key, version and fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// The entry's key.
    pub key: Key,
    /// The entry's version (1 when written, bumped by claims and releases).
    pub version: u64,
    /// The entry's fields.
    pub fields: Fields,
}

/// What a write returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The node that stored the entry.
    pub node: NodeId,
    /// The entry's key.
    pub key: Key,
    /// The entry's version.
    pub version: u64,
    /// When the entry's lease runs out (`None`: forever).
    pub expires: Option<SystemTime>,
}

/// Proof of a claim, needed to commit, release or renew it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClaimTicket {
    /// The claimed entry's type.
    pub entry_type: String,
    /// The claimed entry's key.
    pub key: Key,
    /// Identifies this claim: a later claim on the same entry has another token.
    pub token: u64,
}

impl AsRef<ClaimTicket> for ClaimTicket {
    fn as_ref(&self) -> &ClaimTicket {
        self
    }
}

/// A claimed entry: a copy of it, and the ticket to commit or release the claim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimedDocument {
    /// The entry as claimed.
    pub document: Document,
    /// The claim.
    pub ticket: ClaimTicket,
    /// When the claim runs out unless renewed or committed.
    pub expires: SystemTime,
}

/// An entry a take (or a commit) removed, with what it takes to put it back where it was
/// ([`Engine::untake`]): a node keeps these for a request whose caller may still give it
/// up, so that an answer nobody received loses nothing.
#[derive(Clone, Debug)]
pub struct Taken {
    entry_type: Arc<str>,
    seq: u64,
    record: Record,
}

impl Taken {
    /// A copy of the entry, as a take hands it out.
    pub fn document(&self) -> Document {
        self.record.document()
    }

    /// The entry, as a take hands it out.
    pub fn into_document(self) -> Document {
        self.record.into_document()
    }

    /// The entry's type.
    pub fn entry_type(&self) -> &str {
        &self.entry_type
    }
}

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
    /// Pending lease timers.
    pub timers: u64,
    /// Client connections open (filled in by a node).
    pub connections: u64,
    /// Clients with subscriptions pushed to them (filled in by a node).
    pub subscribers: u64,
    /// Members of a cluster that could not be reached for these counters (filled in by a
    /// client that merges the counters of several nodes; empty when all answered).
    pub unreachable: Vec<String>,
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
        self.timers += other.timers;
        self.connections += other.connections;
        self.subscribers += other.subscribers;
        self.unreachable.extend(other.unreachable.iter().cloned());
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
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
    pub ranges: Option<Arc<crate::wire::RangeSet>>,
    /// Durable engines: a log segment is closed past this many bytes.
    pub log_segment_bytes: u64,
    /// Durable engines: a snapshot is taken once the log grew by this many bytes (or by
    /// the size of the last snapshot, if larger), and older log segments are dropped.
    pub snapshot_after_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node: NodeId(0),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_entry_bytes: None,
            max_entries: None,
            max_bytes: None,
            max_entry_types: None,
            max_waiters: None,
            max_subscriptions: None,
            max_queued_events: None,
            ranges: None,
            log_segment_bytes: crate::durable::DEFAULT_SEGMENT_BYTES,
            snapshot_after_bytes: crate::durable::DEFAULT_SNAPSHOT_AFTER_BYTES,
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
    /// Entry type → shard. Read on every operation without a lock; replaced (copied) only
    /// when a new entry type appears, under `new_shard`.
    shards: ArcSwap<HashMap<Arc<str>, Arc<Shard>, foldhash::fast::RandomState>>,
    /// Held while the map of entry types is replaced; holds the size at which empty types
    /// are next swept out (doubling, so sweeps stay amortized).
    new_shard: Mutex<usize>,
    /// Blocked reads, takes and claims (counted by their waiters).
    waiters: Arc<AtomicUsize>,
    /// Events held by all subscriptions.
    events: Arc<EventBudget>,
    timers: Arc<Timers>,
    next_token: AtomicU64,
    next_sub: AtomicU64,
    /// Every live subscription by id (for resume, renew and cancel by id).
    subscriptions: Mutex<HashMap<u64, Arc<SubShared>>>,
    /// Entries and bytes held, for the limits.
    totals: Arc<Totals>,
    /// The operation log, when the engine is durable.
    wal: Option<Arc<Wal>>,
    /// Held while the engine owns its data directory.
    dir_lock: Mutex<Option<std::fs::File>>,
    /// The engine's threads, joined when it closes.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
    /// Answers of requests found in the log at recovery, for the node's retry handling.
    recovered_answers: Mutex<Vec<(RequestId, Response)>>,
}

impl Inner {
    /// Stops the engine's threads and waits for them, writes out the log, and releases
    /// the data directory. Once only.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.timers.shutdown();
        if let Some(wal) = &self.wal {
            wal.shutdown();
        }
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        if let Some(wal) = &self.wal {
            wal.close();
        }
        self.dir_lock.lock().take();
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
pub(crate) struct Shard {
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
    /// this shard looks the type up again.
    retired: bool,
}

impl TypeState {
    /// Whether nothing would be lost by forgetting this entry type: no entries, nobody
    /// waiting, no subscriptions, no declared indexes.
    fn is_empty(&self) -> bool {
        self.store.len() == 0
            && self.waiters.is_empty()
            && self.hub.len() == 0
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

impl Shard {
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

/// The lock on an entry type; see [`Shard::lock`].
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

/// The fate of a record offered to the waiters.
enum Offered {
    /// A taker took it.
    Taken,
    /// Keep it in the store (claimed, if a claimer got it).
    Keep(Record),
}

impl Record {
    /// The record as logged: deadlines in wall-clock time.
    fn image(&self) -> RecordImage {
        RecordImage {
            key: self.key.clone(),
            mapped_key: self.mapped_key,
            version: self.version,
            fields: self.fields.clone(),
            expires: self.expires.map(to_wall_ms),
            claim: self.claim.map(|c| (c.token, to_wall_ms(c.expires))),
        }
    }

    fn document(&self) -> Document {
        Document {
            key: self.key.clone(),
            version: self.version,
            fields: self.fields.clone(),
        }
    }

    fn into_document(self) -> Document {
        Document {
            key: self.key,
            version: self.version,
            fields: self.fields,
        }
    }
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
        Self::build(config, None, None, 1)
    }

    fn build(
        config: EngineConfig,
        wal: Option<Arc<Wal>>,
        dir_lock: Option<std::fs::File>,
        next_token: u64,
    ) -> Engine {
        let timers = Arc::new(Timers::new());
        let events = EventBudget::new(config.max_queued_events);
        let inner = Arc::new(Inner {
            config,
            shards: ArcSwap::from_pointee(HashMap::default()),
            new_shard: Mutex::new(SWEEP_TYPES_ABOVE),
            waiters: Arc::new(AtomicUsize::new(0)),
            events,
            timers: timers.clone(),
            next_token: AtomicU64::new(next_token),
            next_sub: AtomicU64::new(1),
            subscriptions: Mutex::new(HashMap::new()),
            totals: Arc::new(Totals::default()),
            wal,
            dir_lock: Mutex::new(dir_lock),
            threads: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            recovered_answers: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        match std::thread::Builder::new()
            .name("space-reaper".into())
            .spawn(move || reap(&timers, &weak))
        {
            Ok(t) => inner.threads.lock().push(t),
            // Without the reaper, expired entries are still never returned (reads check
            // deadlines); they are only removed later, lazily.
            Err(e) => tracing::error!(error = %e, "could not start the lease reaper thread"),
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

    /// Closes the engine now, whatever other clones exist: its threads stop, a durable
    /// engine's log is written out and its data directory released before this returns.
    /// Dropping the last clone does the same. Changes made through a clone after this are
    /// not logged, and waiting for their durability fails with [`SpaceError::Storage`].
    pub fn close(&self) {
        self.inner.close();
    }

    /// Opens a durable engine on a data directory (created if missing): recovers what the
    /// directory holds (snapshot, then the operation log), and logs every change from now
    /// on. Operations are durable once [`flush`](Self::flush) (or the Space handle, which
    /// waits for it) returns. Blocks while it recovers.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a directory in use by another process,
    /// a foreign or corrupt file, or an I/O failure.
    pub fn open(dir: impl AsRef<std::path::Path>, config: EngineConfig) -> Result<Engine> {
        let dir = dir.as_ref();
        let started = Instant::now();
        let limits = crate::durable::LogLimits {
            segment_bytes: config.log_segment_bytes.max(4096),
            snapshot_after_bytes: config.snapshot_after_bytes.max(4096),
        };
        let recovered = crate::durable::recover(dir, config.node, limits)?;
        let engine = Self::build(
            config,
            Some(recovered.wal.clone()),
            Some(recovered.lock),
            recovered.next_token,
        );
        let mut entries = 0usize;
        for image in recovered.shards {
            entries += engine.install(image);
        }
        *engine.inner.recovered_answers.lock() = recovered.answers;
        tracing::info!(
            dir = %dir.display(),
            entries,
            replayed = recovered.replayed,
            took_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        let weak = Arc::downgrade(&engine.inner);
        let wal = recovered.wal;
        match std::thread::Builder::new()
            .name("space-checkpoint".into())
            .spawn(move || {
                while wal.wait_snapshot_due() {
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = Engine::internal(inner).checkpoint() {
                        tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds");
                    }
                }
            }) {
            Ok(t) => engine.inner.threads.lock().push(t),
            Err(e) => {
                tracing::error!(error = %e, "could not start the checkpoint thread; the log will not be compacted")
            }
        }
        Ok(engine)
    }

    /// Puts a recovered entry type into the engine; returns how many entries it holds.
    /// Entries whose lease ran out while the node was down are dropped; claims that ran out
    /// are released.
    fn install(&self, image: ShardImage) -> usize {
        let ShardImage {
            entry_type,
            next_seq,
            indexes,
            records,
            ..
        } = image;
        let installed = self.locked_in(&entry_type, Room::Always, |shard, st| {
            for field in &indexes {
                st.store.ensure_index(field);
            }
            st.store.skip_to(next_seq);
            let now = Instant::now();
            for (seq, img) in records {
                let expires = img.expires.map(from_wall_ms);
                if expires.is_some_and(|e| e <= now) {
                    continue;
                }
                let claim = img
                    .claim
                    .map(|(token, ms)| (token, from_wall_ms(ms)))
                    .filter(|(_, e)| *e > now)
                    .map(|(token, expires)| ClaimState { token, expires });
                self.expiry_timer(shard, seq, expires);
                if let Some(c) = claim {
                    self.claim_timer(shard, seq, c.token, c.expires);
                }
                st.store.insert(
                    seq,
                    Record {
                        key: img.key,
                        mapped_key: img.mapped_key,
                        version: img.version + u64::from(img.claim.is_some() && claim.is_none()),
                        fields: img.fields,
                        expires,
                        claim,
                    },
                );
            }
            st.store.len()
        });
        // Only a bounded creation can fail, and this one is not bounded.
        installed.unwrap_or_default()
    }

    /// Answers of requests found in the operation log at recovery, oldest first: a node
    /// seeds its retry handling with them, so a client retrying after a crash gets its
    /// first answer. Returns them once.
    pub fn take_recovered_answers(&self) -> Vec<(RequestId, Response)> {
        std::mem::take(&mut *self.inner.recovered_answers.lock())
    }

    /// Whether changes are logged to a data directory.
    pub fn is_durable(&self) -> bool {
        self.inner.wal.is_some()
    }

    /// Runs `f` as part of the request `id`: the changes it makes are logged with the id,
    /// so that after a crash the request's answer can be rebuilt from the log.
    pub fn with_request<R>(&self, id: RequestId, f: impl FnOnce() -> R) -> R {
        let previous = REQUEST.with(|r| r.replace(Some(id)));
        let out = f();
        REQUEST.with(|r| r.set(previous));
        out
    }

    /// Blocks until every change made so far is durable (no-op for an in-memory engine).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub fn flush_blocking(&self) -> Result<()> {
        match &self.inner.wal {
            Some(wal) => wal.wait_durable(wal.appended()),
            None => Ok(()),
        }
    }

    /// Waits until every change made so far is durable, without blocking a thread.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub async fn flush(&self) -> Result<()> {
        match &self.inner.wal {
            Some(wal) => wal.durable(wal.appended()).await,
            None => Ok(()),
        }
    }

    /// Writes a snapshot of everything and drops the log segments it makes unnecessary.
    /// Runs by itself when the log has grown; callable directly (tests, shutdown).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when writing fails (the log is then kept).
    pub fn checkpoint(&self) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        let floor = wal.appended();
        let shards: Vec<Arc<Shard>> = self.inner.shards.load().values().cloned().collect();
        let mut images = Vec::with_capacity(shards.len());
        for shard in shards {
            let st = shard.lock();
            let cut = wal.appended();
            let records = st.store.iter().map(|(seq, r)| (seq, r.image())).collect();
            images.push(ShardImage {
                entry_type: shard.name.to_string(),
                next_seq: st.store.last_seq(),
                indexes: st.store.indexed_fields(),
                cut,
                records,
            });
        }
        // The snapshot reflects only what the log already holds durably.
        let top = images
            .iter()
            .map(|i| i.cut)
            .max()
            .unwrap_or(floor)
            .max(floor);
        wal.wait_durable(top)?;
        let next_token = self.inner.next_token.load(Ordering::Relaxed);
        let bytes = crate::durable::write_snapshot(
            wal.dir(),
            &images,
            next_token,
            self.inner.config.node,
            floor,
        )?;
        crate::durable::compact(wal.dir(), floor)?;
        wal.snapshot_written(bytes);
        Ok(())
    }

    /// Appends a log record built by `record` (durable engines only).
    fn log(&self, record: impl FnOnce() -> LogRecord) {
        if let Some(wal) = &self.inner.wal {
            wal.append(&record());
        }
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
        f: impl FnOnce(&Arc<Shard>, &mut TypeState) -> R,
    ) -> Result<R> {
        self.locked_in(entry_type, Room::Bounded, f)
    }

    /// As [`locked`](Self::locked), creating the type past the limit of entry types when
    /// `room` says so (entries coming back must always have a place).
    fn locked_in<R>(
        &self,
        entry_type: &str,
        room: Room,
        f: impl FnOnce(&Arc<Shard>, &mut TypeState) -> R,
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
        f: impl FnOnce(&Arc<Shard>, &mut TypeState) -> R,
    ) -> Option<R> {
        self.try_locked(entry_type, f).ok()
    }

    /// Runs `f` with the store of `entry_type` locked, or gives `f` back when the type has
    /// no store.
    fn try_locked<R, F: FnOnce(&Arc<Shard>, &mut TypeState) -> R>(
        &self,
        entry_type: &str,
        f: F,
    ) -> std::result::Result<R, F> {
        loop {
            let shards = self.inner.shards.load();
            let Some(shard) = shards.get(entry_type) else {
                return Err(f);
            };
            let mut guard = shard.lock();
            if !guard.retired {
                return Ok(f(shard, &mut guard));
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
        let mut sweep_at = self.inner.new_shard.lock();
        let current = self.inner.shards.load_full();
        if current.contains_key(entry_type) {
            return Ok(());
        }
        let mut next = (*current).clone();
        let max = match room {
            Room::Bounded => self.inner.config.max_entry_types,
            Room::Always => None,
        };
        if next.len() >= *sweep_at || max.is_some_and(|m| next.len() >= m) {
            next.retain(|_, shard| {
                let mut st = shard.lock();
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
        let shard = Arc::new(Shard {
            name: name.clone(),
            declared: AtomicPtr::new(std::ptr::null_mut()),
            state: std::sync::Mutex::new(TypeState {
                name: name.clone(),
                store: Store::new(self.inner.totals.clone()),
                waiters: VecDeque::new(),
                hub: Hub::new(name.clone()),
                wakes: Vec::new(),
                retired: false,
            }),
        });
        next.insert(name, shard);
        self.inner.shards.store(Arc::new(next));
        Ok(())
    }

    /// Makes sure the store of `entry_type` indexes `fields` (existing entries are indexed
    /// on the spot). Cheap when the same static slice was declared before.
    ///
    /// # Errors
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn declare_indexes(&self, entry_type: &str, fields: &'static [&'static str]) -> Result<()> {
        self.locked(entry_type, |shard, st| self.declare(shard, st, fields))
    }

    /// Declares `fields` as indexed, unless this very slice was declared on `shard` before.
    fn declare(&self, shard: &Shard, st: &mut TypeState, fields: &'static [&'static str]) {
        if fields.is_empty() {
            return;
        }
        let ptr = fields.as_ptr().cast_mut();
        if shard.declared.load(Ordering::Acquire) == ptr {
            return;
        }
        for f in fields {
            if st.store.ensure_index(f) {
                self.log(|| LogRecord::Index {
                    entry_type: shard.name.to_string(),
                    field: (*f).to_owned(),
                });
            }
        }
        shard.declared.store(ptr, Ordering::Release);
    }

    /// Adds an index on a top-level field of `entry_type`.
    ///
    /// # Errors
    /// [`SpaceError::Query`] for a field name no query could address, and
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn create_index(&self, entry_type: &str, field: &str) -> Result<()> {
        space_query::validate_path(field)?;
        self.locked(entry_type, |_, st| {
            if st.store.ensure_index(field) {
                self.log(|| LogRecord::Index {
                    entry_type: entry_type.to_owned(),
                    field: field.to_owned(),
                });
            }
        })
    }

    // ----- writes -----

    /// Stores an entry. `key` is the user's routing key, or `None` to mint a UUID v7.
    /// Never blocks beyond the entry type's lock.
    ///
    /// # Errors
    /// [`SpaceError::InvalidLease`], [`SpaceError::FieldType`] when a field's kind
    /// differs from earlier entries of the type, [`SpaceError::KeyExists`].
    pub fn write(
        &self,
        entry_type: &str,
        fields: Fields,
        key: Option<Key>,
        lease: Lease,
    ) -> Result<Receipt> {
        self.write_indexed(entry_type, &[], fields, key, lease)
    }

    /// [`write`](Self::write) for an entry type that declares indexed fields (see
    /// [`declare_indexes`](Self::declare_indexes)).
    pub fn write_indexed(
        &self,
        entry_type: &str,
        indexes: &'static [&'static str],
        fields: Fields,
        key: Option<Key>,
        lease: Lease,
    ) -> Result<Receipt> {
        let now = Now::new();
        let expires = lease.deadline(&now)?;
        check_document(entry_type, &fields)?;
        self.check_limits(entry_type, &[&fields])?;
        let key = NewKey::new(key);
        self.locked(entry_type, |shard, st| {
            self.declare(shard, st, indexes);
            if Self::check_new(st, entry_type, &fields, key.user())? {
                st.store.learn_kinds(&fields);
            }
            Ok(self.insert_new(shard, st, fields, key, expires, &now))
        })?
    }

    /// Stores several entries of one type: all of them, or (on any error) none.
    pub fn write_all(
        &self,
        entry_type: &str,
        indexes: &'static [&'static str],
        entries: Vec<(Fields, Option<Key>)>,
        lease: Lease,
    ) -> Result<Vec<Receipt>> {
        let now = Now::new();
        let expires = lease.deadline(&now)?;
        for (fields, _) in &entries {
            check_document(entry_type, fields)?;
        }
        self.check_limits(
            entry_type,
            &entries.iter().map(|(f, _)| f).collect::<Vec<_>>(),
        )?;
        self.locked(entry_type, |shard, st| {
            self.declare(shard, st, indexes);
            // Check everything first, so that an error leaves the space unchanged.
            let mut batch_keys = std::collections::HashSet::new();
            let mut learn = false;
            for (fields, key) in &entries {
                learn |= Self::check_new(st, entry_type, fields, key.as_ref())?;
                if let Some(k) = key
                    && !batch_keys.insert(k)
                {
                    return Err(SpaceError::KeyExists {
                        entry_type: entry_type.to_owned(),
                        key: k.clone(),
                    });
                }
            }
            Ok(entries
                .into_iter()
                .map(|(fields, key)| {
                    if learn {
                        st.store.learn_kinds(&fields);
                    }
                    self.insert_new(shard, st, fields, NewKey::new(key), expires, &now)
                })
                .collect())
        })?
    }

    /// Refuses entries over the size limit, or that would take the engine over its limits.
    fn check_limits(&self, entry_type: &str, docs: &[&Fields]) -> Result<()> {
        let config = &self.inner.config;
        if config.max_entry_bytes.is_none()
            && config.max_entries.is_none()
            && config.max_bytes.is_none()
        {
            return Ok(());
        }
        let sizes: Vec<u64> = docs.iter().map(|f| f.approx_size() as u64).collect();
        if let Some(limit) = config.max_entry_bytes
            && let Some(&size) = sizes.iter().find(|&&s| s > limit)
        {
            return Err(SpaceError::TooLarge {
                entry_type: entry_type.to_owned(),
                size,
                limit,
            });
        }
        let held = self.inner.totals.entries.load(Ordering::Relaxed);
        if let Some(max) = config.max_entries
            && held + docs.len() as u64 > max
        {
            return Err(SpaceError::Full {
                reason: format!("it holds {held} entries and its limit is {max}"),
            });
        }
        let bytes = self.inner.totals.bytes.load(Ordering::Relaxed);
        if let Some(max) = config.max_bytes
            && bytes + sizes.iter().sum::<u64>() > max
        {
            return Err(SpaceError::Full {
                reason: format!("it holds {bytes} bytes of entries and its limit is {max}"),
            });
        }
        Ok(())
    }

    /// Bytes of documents held now, for placement decisions.
    pub fn held_bytes(&self) -> u64 {
        self.inner.totals.bytes.load(Ordering::Relaxed)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Checks a new entry against the type's schema and keys; returns whether it has
    /// fields the schema has not seen yet.
    fn check_new(
        st: &TypeState,
        entry_type: &str,
        fields: &Fields,
        key: Option<&Key>,
    ) -> Result<bool> {
        let learn = st
            .store
            .check_kinds(fields)
            .map_err(|c| SpaceError::FieldType {
                entry_type: entry_type.to_owned(),
                field: c.field,
                expected: c.expected,
                found: c.found,
            })?;
        match key {
            Some(k) if st.store.contains_key(k) => Err(SpaceError::KeyExists {
                entry_type: entry_type.to_owned(),
                key: k.clone(),
            }),
            _ => Ok(learn),
        }
    }

    /// Announces, offers and (unless taken at once) stores a checked new entry whose kinds
    /// the schema has learnt.
    fn insert_new(
        &self,
        shard: &Arc<Shard>,
        st: &mut TypeState,
        fields: Fields,
        key: NewKey,
        expires: Option<Instant>,
        now: &Now,
    ) -> Receipt {
        let seq = st.store.next_seq();
        let (key, mapped_key) = key.finish(seq, self.inner.config.ranges.as_deref());
        let record = Record {
            key,
            mapped_key,
            version: 1,
            fields,
            expires,
            claim: None,
        };
        let receipt = Receipt {
            node: self.inner.config.node,
            key: record.key.clone(),
            version: 1,
            expires: wall_clock(expires, now),
        };
        self.log(|| LogRecord::Write {
            entry_type: st.name.to_string(),
            seq,
            image: record.image(),
            request: current_request(),
        });
        self.emit(&mut st.hub, EventKind::Written, &record);
        self.expiry_timer(shard, seq, expires);
        self.settle(shard, st, seq, record, now);
        receipt
    }

    /// Offers a record that just became visible to the waiters and stores it unless a
    /// taker took it.
    fn settle(&self, shard: &Arc<Shard>, st: &mut TypeState, seq: u64, record: Record, now: &Now) {
        if let Offered::Keep(record) = self.offer(shard, st, seq, record, now) {
            st.store.insert(seq, record);
        }
    }

    /// Offers a visible record to the waiters: every matching reader gets a copy; then the
    /// matching takers and claimers, in the order they started waiting, until one of them
    /// gets the record itself (a claimer gets it claimed).
    fn offer(
        &self,
        shard: &Arc<Shard>,
        st: &mut TypeState,
        seq: u64,
        mut record: Record,
        now: &Now,
    ) -> Offered {
        let mut i = 0;
        while i < st.waiters.len() {
            let waiter = st.waiters[i].clone();
            let is_matching_reader =
                matches!(waiter.mode, WaitMode::Read) && waiter.query.matches(&record.fields);
            if is_matching_reader || !waiter.slot.is_waiting() {
                st.waiters.remove(i);
            } else {
                i += 1;
            }
            if is_matching_reader {
                // A reader that gave up meanwhile just does not get its copy.
                if let Ok(wakeup) = waiter.slot.offer(Delivery::Copy(record.document())) {
                    st.wakes.push((waiter, wakeup));
                }
            }
        }
        let mut i = 0;
        while i < st.waiters.len() {
            let waiter = st.waiters[i].clone();
            if !waiter.query.matches(&record.fields) {
                i += 1;
                continue;
            }
            st.waiters.remove(i);
            match waiter.mode {
                WaitMode::Read => {}
                WaitMode::Take => {
                    let targets = self.targets(&mut st.hub, EventKind::Taken, &record);
                    let key = record.key.clone();
                    let version = record.version;
                    let taken = Taken {
                        entry_type: st.name.clone(),
                        seq,
                        record,
                    };
                    match waiter.slot.offer(Delivery::Taken(taken)) {
                        Ok(wakeup) => {
                            self.log(|| LogRecord::Remove {
                                entry_type: st.name.to_string(),
                                seq,
                                cause: RemoveCause::Taken,
                                request: waiter.request,
                            });
                            st.wakes.push((waiter, wakeup));
                            for sub in targets {
                                sub.push(self.inner.config.node, &key, EventKind::Taken, version);
                            }
                            return Offered::Taken;
                        }
                        Err(Delivery::Taken(t)) => record = t.record,
                        Err(_) => unreachable!("a slot gives back what it was offered"),
                    }
                }
                WaitMode::Claim(lease) => {
                    let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
                    let expires = now.get() + lease;
                    let mut document = record.document();
                    document.version += 1;
                    let claimed = claimed_document(shard, document, token, expires, now);
                    if let Ok(wakeup) = waiter.slot.offer(Delivery::Claimed(claimed)) {
                        let request = waiter.request;
                        st.wakes.push((waiter, wakeup));
                        self.mark_claimed(shard, st, seq, &mut record, (token, expires), request);
                        return Offered::Keep(record);
                    }
                }
            }
        }
        Offered::Keep(record)
    }

    fn mark_claimed(
        &self,
        shard: &Arc<Shard>,
        st: &mut TypeState,
        seq: u64,
        record: &mut Record,
        (token, expires): (u64, Instant),
        request: Option<RequestId>,
    ) {
        record.claim = Some(ClaimState { token, expires });
        record.version += 1;
        self.log(|| LogRecord::Claim {
            entry_type: st.name.to_string(),
            seq,
            token,
            expires: to_wall_ms(expires),
            request,
        });
        self.emit(&mut st.hub, EventKind::Claimed, record);
        self.claim_timer(shard, seq, token, expires);
    }

    /// Schedules the expiry of entry `seq` of `shard`, if it has a lease.
    fn expiry_timer(&self, shard: &Arc<Shard>, seq: u64, expires: Option<Instant>) {
        if let Some(at) = expires {
            self.inner.timers.schedule(
                at,
                TimerKind::Entry {
                    shard: Arc::downgrade(shard),
                    seq,
                },
            );
        }
    }

    fn claim_timer(&self, shard: &Arc<Shard>, seq: u64, token: u64, expires: Instant) {
        self.inner.timers.schedule(
            expires,
            TimerKind::Claim {
                shard: Arc::downgrade(shard),
                seq,
                token,
            },
        );
    }

    /// The subscriptions that want to hear `kind` for this record.
    fn targets(&self, hub: &mut Hub, kind: EventKind, record: &Record) -> Vec<Arc<SubShared>> {
        let mut out = Vec::new();
        hub.each_interested(kind, &record.fields, |sub| out.push(sub.clone()));
        out
    }

    /// Announces a change to the subscriptions that want to hear it.
    fn emit(&self, hub: &mut Hub, kind: EventKind, record: &Record) {
        let node = self.inner.config.node;
        hub.each_interested(kind, &record.fields, |sub| {
            sub.push(node, &record.key, kind, record.version)
        });
    }

    /// Gives back a document that was taken but could not be used (it did not decode into
    /// the caller's type): it is written again with the same key and fields, so nothing is
    /// lost. It goes to the back of the order and keeps no lease.
    pub fn put_back(&self, entry_type: &str, document: Document) -> Result<Receipt> {
        self.write(
            entry_type,
            document.fields,
            Some(document.key),
            Lease::Forever,
        )
    }

    // ----- reads, takes, claims -----

    fn check_kinds(st: &TypeState, query: &Query) -> Result<()> {
        query.check_kinds(&|f| st.store.kind_of(f))?;
        Ok(())
    }

    fn first_match(st: &TypeState, query: &Query, now: &Now) -> Option<u64> {
        let mut found = None;
        st.store.for_each_match(query.filter(), now, |seq, _| {
            found = Some(seq);
            false
        });
        found
    }

    /// Removes a stored record and announces it as taken.
    fn remove_taken(&self, st: &mut TypeState, seq: u64, cause: RemoveCause) -> Option<Taken> {
        let record = st.store.remove(seq)?;
        self.log(|| LogRecord::Remove {
            entry_type: st.name.to_string(),
            seq,
            cause,
            request: current_request(),
        });
        self.emit(&mut st.hub, EventKind::Taken, &record);
        Some(Taken {
            entry_type: st.name.clone(),
            seq,
            record,
        })
    }

    /// Registers a waiter; the caller holds the lock and has found nothing.
    fn wait_for(
        &self,
        shard: &Arc<Shard>,
        st: &mut TypeState,
        query: &Query,
        mode: WaitMode,
        deadline: Option<Instant>,
    ) -> Result<WaitGuard> {
        let counted = Counted::take(&self.inner.waiters, self.inner.config.max_waiters)
            .ok_or_else(|| SpaceError::Busy {
                node: String::new(),
                reason: format!(
                    "it has its maximum of {} blocked reads, takes and claims",
                    self.inner.config.max_waiters.unwrap_or(usize::MAX)
                ),
            })?;
        let waiter = Arc::new(Waiter {
            query: query.clone(),
            mode,
            slot: Slot::new(),
            request: current_request(),
            _counted: counted,
        });
        st.waiters.push_back(waiter.clone());
        Ok(WaitGuard {
            engine: self.clone(),
            shard: shard.clone(),
            waiter,
            deadline,
            done: false,
        })
    }

    fn begin(&self, query: &Query, mode: WaitMode, timeout: Duration) -> Result<Begun> {
        query.validate()?;
        let run = |shard: &Arc<Shard>, st: &mut TypeState| {
            let now = Now::new();
            Self::check_kinds(st, query)?;
            if let Some(seq) = Self::first_match(st, query, &now) {
                let delivery = match mode {
                    WaitMode::Read => st.store.get(seq).map(|r| Delivery::Copy(r.document())),
                    WaitMode::Take => self
                        .remove_taken(st, seq, RemoveCause::Taken)
                        .map(Delivery::Taken),
                    WaitMode::Claim(lease) => self.claim_stored(shard, st, seq, lease, &now),
                };
                return Ok(Begun::Done(delivery));
            }
            if timeout.is_zero() {
                return Ok(Begun::Done(None));
            }
            let deadline = timeout_deadline(&now, timeout);
            Ok(Begun::Wait(
                self.wait_for(shard, st, query, mode, deadline)?,
            ))
        };
        if timeout.is_zero() {
            // Looking without waiting does not create the type.
            self.locked_if_exists(query.entry_type(), run)
                .unwrap_or(Ok(Begun::Done(None)))
        } else {
            self.locked(query.entry_type(), run)?
        }
    }

    fn claim_stored(
        &self,
        shard: &Arc<Shard>,
        st: &mut TypeState,
        seq: u64,
        lease: Duration,
        now: &Now,
    ) -> Option<Delivery> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let expires = now.get() + lease;
        let r = st.store.get_mut(seq)?;
        r.claim = Some(ClaimState { token, expires });
        r.version += 1;
        self.log(|| LogRecord::Claim {
            entry_type: st.name.to_string(),
            seq,
            token,
            expires: to_wall_ms(expires),
            request: current_request(),
        });
        let record = st.store.get(seq)?;
        self.emit(&mut st.hub, EventKind::Claimed, record);
        self.claim_timer(shard, seq, token, expires);
        Some(Delivery::Claimed(claimed_document(
            shard,
            record.document(),
            token,
            expires,
            now,
        )))
    }

    /// A copy of the oldest visible entry matching `query`, waiting up to `timeout` for
    /// one to be written (zero: do not wait).
    ///
    /// # Errors
    /// [`SpaceError::Query`] for an invalid query or one whose literals do not fit the
    /// kinds the type's fields hold.
    pub fn read(&self, query: &Query, timeout: Duration) -> Result<Pending<Option<Document>>> {
        Ok(self
            .begin(query, WaitMode::Read, timeout)?
            .map(Delivery::into_document))
    }

    /// Removes and returns the oldest visible entry matching `query`, waiting up to
    /// `timeout`. Each entry is taken at most once.
    pub fn take(&self, query: &Query, timeout: Duration) -> Result<Pending<Option<Document>>> {
        Ok(self
            .begin(query, WaitMode::Take, timeout)?
            .map(Delivery::into_document))
    }

    /// As [`take_all`](Self::take_all), handing out what was removed as [`Taken`] entries
    /// that [`untake`](Self::untake) can put back; and stopping before the entries exceed
    /// `max_bytes` of documents in all (the first entry is always taken), so that an answer
    /// fits in a frame.
    pub fn take_entries(
        &self,
        query: &Query,
        max: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Pending<Vec<Taken>>> {
        if max == 0 {
            return Err(SpaceError::ZeroMax);
        }
        let now_taken = self.take_now(query, max, max_bytes)?;
        if !now_taken.is_empty() || timeout.is_zero() {
            return Ok(Pending::ready(now_taken));
        }
        let first = self
            .begin(query, WaitMode::Take, timeout)?
            .map(Delivery::into_taken);
        let engine = self.clone();
        let query = query.clone();
        Ok(first.map(move |first| {
            let Some(first) = first else {
                return Vec::new();
            };
            let left = max_bytes.saturating_sub(first.record.fields.approx_size());
            let mut all = vec![first];
            if max > 1 && left > 0 {
                // The query was validated above; a failure here can only mean the type's
                // schema changed, and then there is simply nothing more to take.
                all.extend(engine.take_now(&query, max - 1, left).unwrap_or_default());
            }
            all
        }))
    }

    /// Claims the oldest visible matching entry for `lease`: it stays stored but hidden
    /// until [`commit`](Self::commit) removes it or [`release`](Self::release) (or the
    /// lease running out) puts it back.
    pub fn claim(
        &self,
        query: &Query,
        lease: Lease,
        timeout: Duration,
    ) -> Result<Pending<Option<ClaimedDocument>>> {
        let lease = match lease {
            Lease::For(d) => {
                Lease::For(d).deadline(&Now::new())?;
                d
            }
            Lease::Forever => {
                return Err(SpaceError::InvalidLease {
                    reason:
                        "a claim needs a finite lease, so that a crashed claimer's entry comes back"
                            .into(),
                });
            }
        };
        Ok(self
            .begin(query, WaitMode::Claim(lease), timeout)?
            .map(|d| match d {
                Delivery::Claimed(c) => Some(c),
                _ => None,
            }))
    }

    /// Takes at least one (waiting up to `timeout` for the first) and at most `max`
    /// matching entries, oldest first.
    pub fn take_all(
        &self,
        query: &Query,
        max: usize,
        timeout: Duration,
    ) -> Result<Pending<Vec<Document>>> {
        Ok(self
            .take_entries(query, max, usize::MAX, timeout)?
            .map(|taken| taken.into_iter().map(Taken::into_document).collect()))
    }

    /// Takes up to `max` matches there now, stopping before they exceed `max_bytes` of
    /// documents (the first is always taken).
    fn take_now(&self, query: &Query, max: usize, max_bytes: usize) -> Result<Vec<Taken>> {
        query.validate()?;
        self.locked_if_exists(query.entry_type(), |_, st| {
            let now = Now::new();
            Self::check_kinds(st, query)?;
            let mut seqs = Vec::new();
            let mut bytes = 0usize;
            st.store.for_each_match(query.filter(), &now, |seq, r| {
                bytes = bytes.saturating_add(r.fields.approx_size());
                if !seqs.is_empty() && bytes > max_bytes {
                    return false;
                }
                seqs.push(seq);
                seqs.len() < max
            });
            Ok(seqs
                .into_iter()
                .filter_map(|seq| self.remove_taken(st, seq, RemoveCause::Taken))
                .collect())
        })
        .unwrap_or(Ok(Vec::new()))
    }

    /// Copies of every visible entry matching `query`, oldest first (a snapshot).
    pub fn contents(&self, query: &Query) -> Result<Vec<Document>> {
        self.scan(query, |r, out: &mut Vec<Document>| out.push(r.document()))
    }

    /// A page of at most `limit` matching entries, oldest first, after the cursor `after`
    /// of the previous page (`None`: from the start). Returns the entries and the cursor
    /// of the next page (`None` when this is the last one).
    pub fn contents_page(
        &self,
        query: &Query,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Document>, Option<u64>)> {
        self.contents_page_within(query, after, limit, usize::MAX)
    }

    /// As [`contents_page`](Self::contents_page), ending the page before its documents
    /// exceed `max_bytes` (a page holds at least one entry), so that it fits in a frame.
    pub fn contents_page_within(
        &self,
        query: &Query,
        after: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Document>, Option<u64>)> {
        query.validate()?;
        let limit = limit.max(1);
        self.locked_if_exists(query.entry_type(), |_, st| {
            Self::check_kinds(st, query)?;
            let mut page = Vec::new();
            let mut more = false;
            let mut last = None;
            let mut bytes = 0usize;
            st.store
                .for_each_match(query.filter(), &Now::new(), |seq, r| {
                    if after.is_some_and(|a| seq <= a) {
                        return true;
                    }
                    bytes = bytes.saturating_add(r.fields.approx_size());
                    if page.len() == limit || (!page.is_empty() && bytes > max_bytes) {
                        more = true;
                        return false;
                    }
                    page.push(r.document());
                    last = Some(seq);
                    true
                });
            Ok((page, if more { last } else { None }))
        })
        .unwrap_or(Ok((Vec::new(), None)))
    }

    /// The number of visible entries matching `query`.
    pub fn count(&self, query: &Query) -> Result<u64> {
        self.scan(query, |_, n: &mut u64| *n += 1)
    }

    fn scan<A: Default>(&self, query: &Query, mut f: impl FnMut(&Record, &mut A)) -> Result<A> {
        query.validate()?;
        self.locked_if_exists(query.entry_type(), |_, st| {
            Self::check_kinds(st, query)?;
            let mut acc = A::default();
            st.store
                .for_each_match(query.filter(), &Now::new(), |_, r| {
                    f(r, &mut acc);
                    true
                });
            Ok(acc)
        })
        .unwrap_or_else(|| Ok(A::default()))
    }

    // ----- by key -----

    fn visible_seq(st: &TypeState, key: &Key, now: &Now) -> Option<u64> {
        let seq = st.store.seq_of(key)?;
        st.store.get(seq).filter(|r| r.visible(now)).map(|_| seq)
    }

    /// A copy of the visible entry with this key.
    pub fn read_key(&self, entry_type: &str, key: &Key) -> Option<Document> {
        self.locked_if_exists(entry_type, |_, st| {
            let seq = Self::visible_seq(st, key, &Now::new())?;
            st.store.get(seq).map(Record::document)
        })
        .flatten()
    }

    /// Removes and returns the visible entry with this key.
    pub fn take_key(&self, entry_type: &str, key: &Key) -> Option<Document> {
        self.take_key_entry(entry_type, key)
            .map(Taken::into_document)
    }

    /// As [`take_key`](Self::take_key), as a [`Taken`] entry.
    pub fn take_key_entry(&self, entry_type: &str, key: &Key) -> Option<Taken> {
        self.locked_if_exists(entry_type, |_, st| {
            let seq = Self::visible_seq(st, key, &Now::new())?;
            self.remove_taken(st, seq, RemoveCause::Taken)
        })
        .flatten()
    }

    // ----- claims -----

    /// Runs `f` on the record of a claim that is still held.
    fn with_claim<T>(
        &self,
        ticket: &ClaimTicket,
        f: impl FnOnce(&Engine, &Arc<Shard>, &mut TypeState, u64) -> T,
    ) -> Result<T> {
        let lost = || SpaceError::ClaimLost {
            entry_type: ticket.entry_type.clone(),
            key: ticket.key.clone(),
        };
        self.locked_if_exists(&ticket.entry_type, |shard, st| {
            let now = Now::new();
            let seq = st.store.seq_of(&ticket.key).ok_or_else(lost)?;
            let held = st.store.get(seq).is_some_and(|r| {
                !r.expired(&now)
                    && r.claim
                        .is_some_and(|c| c.token == ticket.token && c.expires > now.get())
            });
            if !held {
                return Err(lost());
            }
            Ok(f(self, shard, st, seq))
        })
        .unwrap_or_else(|| Err(lost()))
    }

    /// Removes a claimed entry for good.
    ///
    /// # Errors
    /// [`SpaceError::ClaimLost`] when the claim's lease ran out (or it was released)
    /// before the commit: the entry went back to the space.
    pub fn commit(&self, ticket: &ClaimTicket) -> Result<()> {
        self.commit_entry(ticket).map(drop)
    }

    /// As [`commit`](Self::commit), handing out the removed entry (`None` only if it
    /// vanished under the claim, which the claim prevents).
    pub fn commit_entry(&self, ticket: &ClaimTicket) -> Result<Option<Taken>> {
        self.with_claim(ticket, |engine, _, st, seq| {
            engine.remove_taken(st, seq, RemoveCause::Committed)
        })
    }

    /// Gives a claimed entry back to the space, where waiting takers see it at once.
    pub fn release(&self, ticket: &ClaimTicket) -> Result<()> {
        self.with_claim(ticket, |engine, shard, st, seq| {
            engine.unclaim(shard, st, seq)
        })
    }

    /// Extends a claim's lease from now.
    pub fn renew_claim(&self, ticket: &ClaimTicket, lease: Lease) -> Result<SystemTime> {
        let now = Now::new();
        let Some(expires) = lease.deadline(&now)? else {
            return Err(SpaceError::InvalidLease {
                reason: "a claim needs a finite lease".into(),
            });
        };
        self.with_claim(ticket, |engine, shard, st, seq| {
            if let Some(c) = st.store.get_mut(seq).and_then(|r| r.claim.as_mut()) {
                c.expires = expires;
            }
            engine.log(|| LogRecord::RenewClaim {
                entry_type: st.name.to_string(),
                seq,
                expires: to_wall_ms(expires),
            });
            engine.claim_timer(shard, seq, ticket.token, expires);
            wall_clock(Some(expires), &now).unwrap_or(SystemTime::now())
        })
    }

    /// Makes a claimed record visible again and offers it to the waiters.
    fn unclaim(&self, shard: &Arc<Shard>, st: &mut TypeState, seq: u64) {
        let Some(mut record) = st.store.remove(seq) else {
            return;
        };
        record.claim = None;
        record.version += 1;
        self.log(|| LogRecord::Unclaim {
            entry_type: st.name.to_string(),
            seq,
            request: current_request(),
        });
        self.emit(&mut st.hub, EventKind::Released, &record);
        self.settle(shard, st, seq, record, &Now::new());
    }

    // ----- entry leases -----

    /// Extends an entry's lease from now; returns the new expiry (`None`: forever).
    ///
    /// # Errors
    /// [`SpaceError::NotFound`] when no entry has this key (or it expired).
    pub fn renew(&self, entry_type: &str, key: &Key, lease: Lease) -> Result<Option<SystemTime>> {
        let now = Now::new();
        let expires = lease.deadline(&now)?;
        self.with_live_entry(entry_type, key, &now, |shard, st, seq| {
            if let Some(r) = st.store.get_mut(seq) {
                r.expires = expires;
            }
            self.log(|| LogRecord::Renew {
                entry_type: entry_type.to_owned(),
                seq,
                expires: expires.map(to_wall_ms),
            });
            self.expiry_timer(shard, seq, expires);
            wall_clock(expires, &now)
        })
    }

    /// Cancels an entry's lease: the entry is removed at once, with an `Expired` event.
    pub fn cancel(&self, entry_type: &str, key: &Key) -> Result<()> {
        self.with_live_entry(entry_type, key, &Now::new(), |_, st, seq| {
            self.expire(st, seq, RemoveCause::Cancelled)
        })
    }

    /// Runs `f` on the entry with this key that has not expired (claimed or not).
    ///
    /// # Errors
    /// [`SpaceError::NotFound`] when there is none.
    fn with_live_entry<R>(
        &self,
        entry_type: &str,
        key: &Key,
        now: &Now,
        f: impl FnOnce(&Arc<Shard>, &mut TypeState, u64) -> R,
    ) -> Result<R> {
        let not_found = || SpaceError::NotFound {
            entry_type: entry_type.to_owned(),
            key: key.clone(),
        };
        self.locked_if_exists(entry_type, |shard, st| {
            let seq = st
                .store
                .seq_of(key)
                .filter(|&seq| st.store.get(seq).is_some_and(|r| !r.expired(now)))
                .ok_or_else(not_found)?;
            Ok(f(shard, st, seq))
        })
        .unwrap_or_else(|| Err(not_found()))
    }

    fn expire(&self, st: &mut TypeState, seq: u64, cause: RemoveCause) {
        if let Some(mut record) = st.store.remove(seq) {
            self.log(|| LogRecord::Remove {
                entry_type: st.name.to_string(),
                seq,
                cause,
                request: current_request(),
            });
            record.version += 1;
            self.emit(&mut st.hub, EventKind::Expired, &record);
        }
    }

    // ----- notify -----

    /// Registers a subscription: every later change of a matching entry whose kind is in
    /// `kinds` is queued for it, numbered 1, 2, 3, ...
    pub fn subscribe(
        &self,
        query: &Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> Result<Subscription> {
        query.validate()?;
        let now = Now::new();
        let expires = lease.deadline(&now)?;
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SubShared::new(
            id,
            Arc::from(query.entry_type()),
            Arc::new(query.clone()),
            kinds,
            self.inner.config.queue_capacity,
            self.inner.events.clone(),
            expires,
        ));
        {
            let mut all = self.inner.subscriptions.lock();
            if let Some(max) = self.inner.config.max_subscriptions
                && all.len() >= max
            {
                return Err(SpaceError::Busy {
                    node: String::new(),
                    reason: format!("it holds its maximum of {max} subscriptions"),
                });
            }
            all.insert(id, shared.clone());
        }
        let added = self.locked(query.entry_type(), |_, st| {
            Self::check_kinds(st, query)?;
            st.hub.add(shared.clone())?;
            Ok(())
        });
        if let Err(e) = added.and_then(|r| r) {
            self.inner.subscriptions.lock().remove(&id);
            return Err(e);
        }
        if let Some(at) = expires {
            self.inner.timers.schedule(
                at,
                TimerKind::Subscription {
                    sub: Arc::downgrade(&shared),
                },
            );
        }
        Ok(Subscription::local(shared, self.clone()))
    }

    /// Ends a subscription: it is matched no more, and what it queued is discarded.
    pub(crate) fn unsubscribe(&self, sub: &Arc<SubShared>) {
        self.remove_subscription(sub);
        sub.close();
    }

    /// Ends a subscription whose lease ran out: it is matched no more, but what it was
    /// told while alive is still delivered, and then its stream ends.
    fn expire_subscription(&self, sub: &Arc<SubShared>) {
        self.remove_subscription(sub);
        sub.finish();
    }

    fn remove_subscription(&self, sub: &Arc<SubShared>) {
        self.locked_if_exists(&sub.entry_type, |_, st| st.hub.remove(sub.id));
        let mut all = self.inner.subscriptions.lock();
        all.remove(&sub.id);
        crate::shrink_if_sparse(&mut all);
    }

    /// Picks up a subscription that was [detached](Subscription::detach) (a subscriber
    /// that went away): delivery restarts after `last_seq`, the last sequence number the
    /// subscriber saw (0 if none); events no longer in the subscription's log come back as
    /// one [`Notification::Gap`](crate::Notification::Gap).
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`] when no live subscription has this id (it was
    /// cancelled, or its lease ran out).
    pub fn resume(&self, id: u64, last_seq: u64) -> Result<Subscription> {
        let shared = self
            .inner
            .subscriptions
            .lock()
            .get(&id)
            .cloned()
            .ok_or(SpaceError::SubscriptionClosed { id })?;
        shared.rewind(last_seq);
        Ok(Subscription::local(shared, self.clone()))
    }

    pub(crate) fn renew_subscription(&self, sub: &Arc<SubShared>, lease: Lease) -> Result<()> {
        let expires = lease.deadline(&Now::new())?;
        if sub.is_closed() {
            return Err(SpaceError::SubscriptionClosed { id: sub.id });
        }
        sub.set_expires(expires);
        if let Some(at) = expires {
            self.inner.timers.schedule(
                at,
                TimerKind::Subscription {
                    sub: Arc::downgrade(sub),
                },
            );
        }
        Ok(())
    }

    // ----- housekeeping -----

    /// Counters over all entry types.
    pub fn stats(&self) -> Stats {
        let shards: Vec<Arc<Shard>> = self.inner.shards.load().values().cloned().collect();
        let mut stats = Stats {
            entry_types: shards.len() as u64,
            timers: self.inner.timers.len() as u64,
            queued_events: self.inner.events.held() as u64,
            ..Stats::default()
        };
        for shard in shards {
            let st = shard.lock();
            stats.entries += st.store.len() as u64;
            stats.bytes += st.store.bytes() as u64;
            stats.waiters += st.waiters.len() as u64;
            stats.subscriptions += st.hub.len() as u64;
        }
        stats
    }

    fn fire(&self, timer: TimerKind) {
        let now = Now::new();
        match timer {
            TimerKind::Entry { shard, seq } => {
                let Some(shard) = shard.upgrade() else { return };
                let mut st = shard.lock();
                if st.store.get(seq).is_some_and(|r| r.expired(&now)) {
                    self.expire(&mut st, seq, RemoveCause::Cancelled);
                }
            }
            TimerKind::Claim { shard, seq, token } => {
                let Some(shard) = shard.upgrade() else { return };
                let mut guard = shard.lock();
                let st = &mut *guard;
                let due = st
                    .store
                    .get(seq)
                    .and_then(|r| r.claim)
                    .is_some_and(|c| c.token == token && c.expires <= now.get());
                if due {
                    self.unclaim(&shard, st, seq);
                }
            }
            TimerKind::Subscription { sub } => {
                let Some(sub) = sub.upgrade() else { return };
                if sub.expires().is_some_and(|e| e <= now.get()) {
                    self.expire_subscription(&sub);
                }
            }
        }
    }

    /// Puts back what was handed to a waiter that went away before using it.
    fn restore(&self, delivery: Delivery) {
        match delivery {
            Delivery::Copy(_) => {}
            Delivery::Taken(taken) => self.untake(vec![taken]),
            Delivery::Claimed(claimed) => {
                // Still held (we just got it), so this cannot fail; if it did, the claim's
                // lease would bring the entry back anyway.
                let _ = self.release(&claimed.ticket);
            }
        }
    }

    /// Puts entries that were taken back where they were (same key, place in the order,
    /// lease), announced as written and offered to waiting takers: for a take whose caller
    /// went away before it received them. An entry whose user key meanwhile belongs to a
    /// newer entry is not put back twice; that is logged.
    pub fn untake(&self, taken: Vec<Taken>) {
        for Taken {
            entry_type,
            seq,
            record,
        } in taken
        {
            let put_back = self.locked_in(&entry_type, Room::Always, |shard, st| {
                let mut record = record;
                if record.mapped_key && st.store.contains_key(&record.key) {
                    tracing::error!(
                        entry_type = %entry_type,
                        key = %record.key,
                        "an entry given back is not put back: its key was written again meanwhile"
                    );
                    return;
                }
                // Back in its place, unless the type was forgotten while empty and its
                // numbers started again: then at the end, found by its key.
                let seq = if st.store.get(seq).is_some() {
                    record.mapped_key = true;
                    st.store.next_seq()
                } else {
                    st.store.skip_to(seq);
                    seq
                };
                self.log(|| LogRecord::Write {
                    entry_type: st.name.to_string(),
                    seq,
                    image: record.image(),
                    request: None,
                });
                self.emit(&mut st.hub, EventKind::Written, &record);
                self.expiry_timer(shard, seq, record.expires);
                self.settle(shard, st, seq, record, &Now::new());
            });
            // Only a bounded creation can fail, and this one is not bounded.
            debug_assert!(put_back.is_ok());
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

fn claimed_document(
    shard: &Shard,
    document: Document,
    token: u64,
    expires: Instant,
    now: &Now,
) -> ClaimedDocument {
    ClaimedDocument {
        ticket: ClaimTicket {
            entry_type: shard.name.to_string(),
            key: document.key.clone(),
            token,
        },
        document,
        expires: wall_clock(Some(expires), now).unwrap_or_else(SystemTime::now),
    }
}

fn reap(timers: &Timers, engine: &Weak<Inner>) {
    while let Some(due) = timers.wait_due() {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let engine = Engine::internal(inner);
        for timer in due {
            engine.fire(timer);
        }
    }
}

impl Delivery {
    fn into_document(self) -> Option<Document> {
        match self {
            Delivery::Copy(d) => Some(d),
            Delivery::Taken(t) => Some(t.into_document()),
            Delivery::Claimed(c) => Some(c.document),
        }
    }

    fn into_taken(self) -> Option<Taken> {
        match self {
            Delivery::Taken(t) => Some(t),
            _ => None,
        }
    }
}

/// The key of an entry being written: the user's, or a fresh UUID v7 that gets the
/// store's sequence number once the entry type is locked.
enum NewKey {
    User(Key),
    Minted(uuid::Uuid),
}

impl NewKey {
    fn new(user: Option<Key>) -> NewKey {
        match user {
            Some(k) => NewKey::User(k),
            None => NewKey::Minted(uuid::Uuid::now_v7()),
        }
    }

    fn user(&self) -> Option<&Key> {
        match self {
            NewKey::User(k) => Some(k),
            NewKey::Minted(_) => None,
        }
    }

    /// The final key, and whether the store must keep it in its key map. A minted key
    /// falls inside `ranges` when the engine owns only some.
    fn finish(self, seq: u64, ranges: Option<&crate::wire::RangeSet>) -> (Key, bool) {
        match self {
            NewKey::User(k) => (k, true),
            NewKey::Minted(base) => {
                let key = match ranges {
                    Some(r) => Key::with_seq_in(base, seq, &|range| r.contains(range)),
                    None => Key::with_seq(base, seq),
                };
                match key {
                    Some(k) => (k, false),
                    None => (Key::Id(base), true),
                }
            }
        }
    }
}

enum Begun {
    Done(Option<Delivery>),
    Wait(WaitGuard),
}

impl Begun {
    fn map<T: 'static>(
        self,
        f: impl FnOnce(Delivery) -> Option<T> + Send + 'static,
    ) -> Pending<Option<T>> {
        match self {
            Begun::Done(d) => Pending::ready(d.and_then(f)),
            Begun::Wait(guard) => Pending {
                state: PendingState::Wait {
                    guard,
                    finish: Box::new(move |d: Option<Delivery>| d.and_then(f)),
                },
            },
        }
    }
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

impl<T: 'static> Pending<T> {
    pub(crate) fn ready(value: T) -> Self {
        Pending {
            state: PendingState::Ready(value),
        }
    }

    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Pending<U> {
        match self.state {
            PendingState::Ready(v) => Pending {
                state: PendingState::Ready(f(v)),
            },
            PendingState::Wait { guard, finish } => Pending {
                state: PendingState::Wait {
                    guard,
                    finish: Box::new(move |d| f(finish(d))),
                },
            },
        }
    }

    /// Whether the result is already there (no waiting needed).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, PendingState::Ready(_))
    }

    /// Blocks the calling thread until the result is there or the timeout passes.
    pub fn wait(self) -> T {
        match self.state {
            PendingState::Ready(v) => v,
            PendingState::Wait { guard, finish } => finish(guard.wait_blocking()),
        }
    }

    /// Waits without blocking the thread. Needs a tokio runtime with the time driver when
    /// the operation has a finite timeout.
    ///
    /// # Cancel safety
    /// Dropping the future gives up the wait; an entry that was handed to it in the
    /// meantime goes back into the space (a claim is released), so nothing is lost.
    pub async fn wait_async(self) -> T {
        match self.state {
            PendingState::Ready(v) => v,
            PendingState::Wait { guard, finish } => finish(guard.wait_async().await),
        }
    }
}

/// A registered waiter; removes itself on drop and returns anything handed to it that
/// was not collected.
struct WaitGuard {
    engine: Engine,
    shard: Arc<Shard>,
    waiter: Arc<Waiter>,
    deadline: Option<Instant>,
    done: bool,
}

impl WaitGuard {
    fn wait_blocking(mut self) -> Option<Delivery> {
        let delivery = self.waiter.slot.wait_blocking(self.deadline);
        self.finish(delivery)
    }

    async fn wait_async(mut self) -> Option<Delivery> {
        let future = SlotFuture(&self.waiter.slot);
        let delivery = match self.deadline {
            None => future.await,
            Some(deadline) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), future)
                    .await
                {
                    Ok(d) => d,
                    Err(_) => self.waiter.slot.abandon(),
                }
            }
        };
        self.finish(delivery)
    }

    fn finish(&mut self, delivery: Option<Delivery>) -> Option<Delivery> {
        self.done = true;
        if delivery.is_none() {
            self.remove_waiter();
        }
        delivery
    }

    fn remove_waiter(&self) {
        let mut st = self.shard.lock();
        if let Some(i) = st.waiters.iter().position(|w| Arc::ptr_eq(w, &self.waiter)) {
            st.waiters.remove(i);
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.waiter.slot.abandon() {
            Some(delivery) => self.engine.restore(delivery),
            None => self.remove_waiter(),
        }
    }
}
