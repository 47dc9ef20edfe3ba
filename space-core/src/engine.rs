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
use crate::durable::{Checkpoints, ENGINE_LOG, Snapshot, TypeImage};
use crate::entry::{Key, NodeId};
use crate::error::{Result, SpaceError};
use crate::lease::{Clock, Deadline, Lease, Now, timeout_deadline};
use crate::notify::{
    DEFAULT_QUEUE_CAPACITY, EventBudget, EventKind, EventKinds, Hub, Keeper, SubShared,
    Subscription,
};
use crate::signal::{Slot, SlotFuture, Wakeup};
use crate::state::{self, Answer, Answers, Cause, Command, HandOff, Outcome, Taken};
use crate::store::{Record, Store, Totals};
use crate::timers::Timers;
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
    pub ranges: Option<Arc<crate::hash::RangeSet>>,
    /// Durable engines: a log segment is closed past this many bytes.
    pub log_segment_bytes: u64,
    /// Durable engines: a snapshot is taken once the log grew by this many bytes (or by
    /// the size of the last snapshot, if larger), and older log segments are dropped.
    pub snapshot_after_bytes: u64,
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
            max_entry_types: None,
            max_waiters: None,
            max_subscriptions: None,
            max_queued_events: None,
            ranges: None,
            log_segment_bytes: crate::durable::DEFAULT_SEGMENT_BYTES,
            snapshot_after_bytes: crate::durable::DEFAULT_SNAPSHOT_AFTER_BYTES,
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
    timers: Arc<Timers<TimerKind>>,
    /// The next claim token to hand out (decided, then carried by the command).
    next_token: AtomicU64,
    next_sub: AtomicU64,
    /// Every live subscription by id (for resume, renew and cancel by id).
    subscriptions: Mutex<HashMap<u64, Arc<SubShared>>>,
    /// Entries and bytes held, for the limits.
    totals: Arc<Totals>,
    /// The write-ahead log the engine's log is on, when the engine is durable.
    wal: Option<Arc<Wal>>,
    /// When snapshots are due (durable engines).
    checkpoints: Option<Arc<Checkpoints>>,
    /// Held while the engine owns its data directory.
    dir_lock: Mutex<Option<std::fs::File>>,
    /// The engine's threads, joined when it closes.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
    /// The answers of recent requests: part of the state, changed only by `apply`
    /// (taken after an entry type's lock, never before one).
    answers: Mutex<Answers>,
    /// Every applied command's log place and outcome, for the determinism tests.
    #[cfg(test)]
    trace: Mutex<Vec<(u64, String)>>,
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
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.shutdown();
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
        Self::build(config, None, None, 1)
    }

    fn build(
        config: EngineConfig,
        wal: Option<Arc<Wal>>,
        dir_lock: Option<std::fs::File>,
        next_token: u64,
    ) -> Engine {
        let timers = Arc::new(Timers::new(config.clock.clone()));
        let events = EventBudget::new(config.max_queued_events);
        let checkpoints = wal.as_ref().map(|wal| {
            let checkpoints = Checkpoints::new(config.snapshot_after_bytes.max(4096));
            let counter = checkpoints.clone();
            wal.on_written(move |bytes| counter.written(bytes));
            checkpoints
        });
        let inner = Arc::new(Inner {
            config,
            cells: ArcSwap::from_pointee(HashMap::default()),
            new_type: Mutex::new(SWEEP_TYPES_ABOVE),
            waiters: Arc::new(AtomicUsize::new(0)),
            events,
            timers: timers.clone(),
            next_token: AtomicU64::new(next_token),
            next_sub: AtomicU64::new(1),
            subscriptions: Mutex::new(HashMap::new()),
            totals: Arc::new(Totals::default()),
            wal,
            checkpoints,
            dir_lock: Mutex::new(dir_lock),
            threads: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            answers: Mutex::new(Answers::default()),
            #[cfg(test)]
            trace: Mutex::new(Vec::new()),
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
        let recovered = crate::durable::recover(dir, config.log_segment_bytes)?;
        let mut next_token = recovered.snapshot.next_token;
        for (_, _, command) in &recovered.commands {
            if let Some(token) = command.token() {
                next_token = next_token.max(token + 1);
            }
        }
        let engine = Self::build(
            config,
            Some(recovered.wal.clone()),
            Some(recovered.lock),
            next_token,
        );
        let replayed = recovered.commands.len();
        engine.recover_state(recovered.snapshot, recovered.commands);
        let entries = engine.inner.totals.entries.load(Ordering::Relaxed);
        tracing::info!(
            dir = %dir.display(),
            entries,
            replayed,
            took_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        let weak = Arc::downgrade(&engine.inner);
        let Some(checkpoints) = engine.inner.checkpoints.clone() else {
            return Ok(engine);
        };
        match std::thread::Builder::new()
            .name("space-checkpoint".into())
            .spawn(move || {
                while checkpoints.wait_due() {
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

    /// Rebuilds the state from a snapshot and the commands logged after it, replayed
    /// through [`state::apply`] in log order, then arms the lease timers: what lapsed while
    /// the node was down is expired by commands the timer decides, like any expiry.
    fn recover_state(&self, snapshot: Snapshot, commands: Vec<(u64, String, Command)>) {
        *self.inner.answers.lock() = snapshot.answers;
        for image in snapshot.types {
            let TypeImage {
                entry_type,
                next_seq,
                indexes,
                schema,
                records,
                ..
            } = image;
            self.each_type_always(&entry_type, |_, st| {
                for field in &indexes {
                    st.store.ensure_index(field);
                }
                st.store.set_schema(schema);
                st.store.skip_to(next_seq);
                for (seq, record) in records {
                    st.store.insert(seq, record);
                }
            });
        }
        for (index, entry_type, command) in commands {
            self.each_type_always(&entry_type, |_, st| {
                self.apply(st, Some(index), command);
            });
        }
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        for cell in cells {
            let st = cell.lock();
            for (seq, record) in st.store.iter() {
                self.expiry_timer(&cell, seq, record.expires);
                if let Some(claim) = record.claim {
                    self.claim_timer(&cell, seq, claim.token, claim.expires);
                }
            }
        }
    }

    /// Runs `f` on the locked store of `entry_type`, created past the limit of entry
    /// types if need be (what recovery brings back always has a place).
    fn each_type_always(&self, entry_type: &str, f: impl FnOnce(&Arc<TypeCell>, &mut TypeState)) {
        // Only a bounded creation can fail, and this one is not bounded.
        let _ = self.locked_in(entry_type, Room::Always, f);
    }

    /// The answer the request `id` got, if the state of this durable engine still keeps it
    /// (the answers of the last 65,536 requests that changed the space, across restarts):
    /// a node gives a request retried after a restart its first answer from here. An
    /// in-memory engine keeps none (its node's own table serves retries while it runs).
    pub fn answer(&self, id: RequestId) -> Option<Answer> {
        let mut answer = self.inner.answers.lock().get(id).cloned()?;
        if let Answer::Receipts(receipts) = &mut answer {
            for r in receipts {
                r.node = self.inner.config.node;
            }
        }
        Some(answer)
    }

    /// Every answer the state keeps, oldest first (see [`answer`](Self::answer)).
    pub fn answers(&self) -> Vec<(RequestId, Answer)> {
        let ids: Vec<RequestId> = self.inner.answers.lock().iter().map(|(id, _)| id).collect();
        ids.into_iter()
            .filter_map(|id| self.answer(id).map(|a| (id, a)))
            .collect()
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
        let floor = wal.last_index(ENGINE_LOG);
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut types = Vec::with_capacity(cells.len());
        for cell in cells {
            let st = cell.lock();
            let cut = wal.last_index(ENGINE_LOG);
            let records = st.store.iter().map(|(seq, r)| (seq, r.clone())).collect();
            types.push(TypeImage {
                entry_type: cell.name.to_string(),
                next_seq: st.store.last_seq(),
                indexes: st.store.indexed_fields(),
                schema: st.store.schema(),
                cut,
                records,
            });
        }
        // Taken after every cut, so it holds the answers of everything under them; those
        // of commands above a cut are not recorded twice on replay (see `state::apply`).
        let answers = self.inner.answers.lock().clone();
        // The snapshot reflects only what the log already holds durably.
        wal.wait_durable(wal.appended())?;
        let snapshot = Snapshot {
            next_token: self.inner.next_token.load(Ordering::Relaxed),
            types,
            answers,
            floor,
        };
        let bytes = crate::durable::write_snapshot(wal.dir(), &snapshot, self.inner.config.node)?;
        crate::durable::compact(wal, floor)?;
        if let Some(checkpoints) = &self.inner.checkpoints {
            checkpoints.snapshot_written(bytes);
        }
        Ok(())
    }

    /// Appends `command` to the log (a durable engine) and applies it: the one way the
    /// space changes (see [`crate::state`]). Called under the entry type's lock, so the
    /// log holds each type's commands in the order they were applied.
    fn execute(&self, st: &mut TypeState, command: Command) -> Outcome {
        let index = self.inner.wal.as_ref().map(|wal| {
            wal.append(ENGINE_LOG, &crate::durable::encode(&st.name, &command))
                .index
        });
        self.apply(st, index, command)
    }

    /// Applies a command to the locked entry type through [`state::apply`] (live, after
    /// it was appended at `index` of the engine's log, or replayed from there).
    fn apply(&self, st: &mut TypeState, index: Option<u64>, command: Command) -> Outcome {
        // Only a log needs the answers in the state: it outlives the process, and a replay
        // must answer retries. Without one, the node's own table of recent answers serves
        // retries, and keeping a second copy here would cost every call a copy of its
        // answer.
        let keep = self.inner.wal.is_some() && command.answers();
        let mut answers = keep.then(|| self.inner.answers.lock());
        let outcome = state::apply(
            &st.name,
            &mut st.store,
            answers.as_deref_mut(),
            index,
            command,
        );
        #[cfg(test)]
        self.inner
            .trace
            .lock()
            .push((index.unwrap_or(0), format!("{}: {outcome:?}", st.name)));
        outcome
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
            }),
        });
        next.insert(name, cell);
        self.inner.cells.store(Arc::new(next));
        Ok(())
    }

    /// Makes sure the store of `entry_type` indexes `fields` (existing entries are indexed
    /// on the spot). Cheap when the same static slice was declared before.
    ///
    /// # Errors
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn declare_indexes(&self, entry_type: &str, fields: &'static [&'static str]) -> Result<()> {
        self.locked(entry_type, |cell, st| self.declare(cell, st, fields))
    }

    /// Declares `fields` as indexed, unless this very slice was declared on `cell` before.
    fn declare(&self, cell: &TypeCell, st: &mut TypeState, fields: &'static [&'static str]) {
        if fields.is_empty() {
            return;
        }
        let ptr = fields.as_ptr().cast_mut();
        if cell.declared.load(Ordering::Acquire) == ptr {
            return;
        }
        for f in fields {
            self.index(st, f);
        }
        cell.declared.store(ptr, Ordering::Release);
    }

    /// Adds an index on a top-level field of `entry_type`.
    ///
    /// # Errors
    /// [`SpaceError::Query`] for a field name no query could address, and
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn create_index(&self, entry_type: &str, field: &str) -> Result<()> {
        space_query::validate_path(field)?;
        self.locked(entry_type, |_, st| self.index(st, field))
    }

    /// Indexes `field` of the locked type, unless it is indexed already.
    fn index(&self, st: &mut TypeState, field: &str) {
        if !st.store.has_index(field) {
            self.execute(
                st,
                Command::Index {
                    field: field.to_owned(),
                },
            );
        }
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
        let now = self.now();
        let expires = lease.deadline(&now)?;
        check_document(entry_type, &fields)?;
        self.check_limits(entry_type, &[&fields])?;
        let key = NewKey::new(key);
        self.locked(entry_type, |cell, st| {
            self.declare(cell, st, indexes);
            let learn = Self::check_new(st, entry_type, &fields, key.user())?;
            Ok(self.insert_new(cell, st, fields, key, expires, learn, &now))
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
        let now = self.now();
        let expires = lease.deadline(&now)?;
        for (fields, _) in &entries {
            check_document(entry_type, fields)?;
        }
        self.check_limits(
            entry_type,
            &entries.iter().map(|(f, _)| f).collect::<Vec<_>>(),
        )?;
        self.locked(entry_type, |cell, st| {
            self.declare(cell, st, indexes);
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
                    self.insert_new(cell, st, fields, NewKey::new(key), expires, learn, &now)
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

    /// Brings a checked new entry into the space (see [`bring`](Self::bring)).
    #[allow(clippy::too_many_arguments)]
    fn insert_new(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        fields: Fields,
        key: NewKey,
        expires: Option<Deadline>,
        learn: bool,
        now: &Now,
    ) -> Receipt {
        let seq = st.store.upcoming_seq();
        let (key, mapped_key) = key.finish(seq, self.inner.config.ranges.as_deref());
        let receipt = Receipt {
            node: self.inner.config.node,
            key: key.clone(),
            version: 1,
            expires: expires.map(Deadline::to_system_time),
        };
        let record = Record {
            key,
            mapped_key,
            version: 1,
            fields,
            expires,
            claim: None,
        };
        self.bring(
            cell,
            st,
            seq,
            record,
            Bring::New {
                learn,
                request: current_request(),
            },
            now,
        );
        receipt
    }

    /// Brings `record` into the space as `seq` (a new entry, or one given back): announces
    /// it as written, gives every waiting reader a copy, and hands it to the taker or
    /// claimer that waited longest for it (the hand-off is part of the write's command);
    /// stores it otherwise.
    fn bring(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        record: Record,
        how: Bring,
        now: &Now,
    ) {
        let (learn, request) = match how {
            Bring::New { learn, request } => (learn, request),
            Bring::Back | Bring::Quietly => (false, None),
        };
        if !matches!(how, Bring::Quietly) {
            self.emit(&mut st.hub, EventKind::Written, &record);
        }
        self.serve_readers(st, &record);
        let waiter = self.first_waiting(st, &record.fields);
        let to = waiter.as_ref().map(|(waiter, lease)| match lease {
            None => HandOff::Taken {
                request: waiter.request,
            },
            Some(lease) => HandOff::Claimed {
                token: self.inner.next_token.fetch_add(1, Ordering::Relaxed),
                expires: now.after(*lease).unwrap_or(Deadline::from_ms(u64::MAX)),
                request: waiter.request,
            },
        });
        let Record {
            key,
            mapped_key,
            version,
            fields,
            expires,
            ..
        } = record;
        let outcome = self.execute(
            st,
            Command::Write {
                seq,
                key,
                mapped_key,
                version,
                fields,
                expires,
                learn,
                to,
                request,
            },
        );
        self.expiry_timer(cell, seq, expires);
        if let Some((waiter, _)) = waiter {
            self.hand_over(cell, st, seq, outcome, waiter, now);
        }
    }

    /// Gives a record that is stored and visible to the waiters: every waiting reader gets
    /// a copy, and the taker or claimer that waited longest gets the record itself (for a
    /// release, or a hand-off that fell through).
    fn offer_stored(&self, cell: &Arc<TypeCell>, st: &mut TypeState, seq: u64, now: &Now) {
        let Some(record) = st.store.get(seq) else {
            return;
        };
        if !st.waiters.is_empty() {
            let record = record.clone();
            self.serve_readers(st, &record);
            if let Some((waiter, lease)) = self.first_waiting(st, &record.fields) {
                let command = match lease {
                    None => Command::Remove {
                        seq,
                        cause: Cause::Taken,
                        request: waiter.request,
                    },
                    Some(lease) => Command::Claim {
                        seq,
                        token: self.inner.next_token.fetch_add(1, Ordering::Relaxed),
                        expires: now.after(lease).unwrap_or(Deadline::from_ms(u64::MAX)),
                        request: waiter.request,
                    },
                };
                let outcome = self.execute(st, command);
                self.hand_over(cell, st, seq, outcome, waiter, now);
            }
        }
    }

    /// Delivers what applying a hand-off (a take or claim for `waiter`) gave: the taken
    /// record, or the claimed one still in the store. A waiter that gave up just before
    /// gets nothing, and the entry comes back as it was (by a command), for the next one.
    fn hand_over(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        outcome: Outcome,
        waiter: Arc<Waiter>,
        now: &Now,
    ) {
        match outcome {
            Outcome::HandedOff(record) | Outcome::Removed(record) => {
                let targets = self.targets(&mut st.hub, EventKind::Taken, &record);
                let (key, version) = (record.key.clone(), record.version);
                let taken = Taken {
                    entry_type: st.name.clone(),
                    seq,
                    record,
                };
                match waiter.slot.offer(Delivery::Taken(taken)) {
                    Ok(wakeup) => {
                        st.wakes.push((waiter, wakeup));
                        for sub in targets {
                            sub.push(self.inner.config.node, &key, EventKind::Taken, version);
                        }
                    }
                    // It was never announced as taken: it is simply there again.
                    Err(Delivery::Taken(taken)) => {
                        self.bring(cell, st, seq, taken.record, Bring::Quietly, now);
                    }
                    Err(_) => unreachable!("a slot gives back what it was offered"),
                }
            }
            Outcome::Stored | Outcome::Changed => {
                let Some(record) = st.store.get(seq) else {
                    return;
                };
                let claimed = state::claimed(&st.name, record);
                self.emit(&mut st.hub, EventKind::Claimed, record);
                if let Some(c) = record.claim {
                    self.claim_timer(cell, seq, c.token, c.expires);
                }
                match waiter.slot.offer(Delivery::Claimed(claimed)) {
                    Ok(wakeup) => st.wakes.push((waiter, wakeup)),
                    Err(_) => self.unclaim(cell, st, seq, false, now),
                }
            }
            Outcome::Missing => {}
        }
    }

    /// Schedules the expiry of entry `seq` of `cell`, if it has a lease.
    fn expiry_timer(&self, cell: &Arc<TypeCell>, seq: u64, expires: Option<Deadline>) {
        if let Some(at) = expires {
            self.inner.timers.schedule(
                at,
                TimerKind::Entry {
                    cell: Arc::downgrade(cell),
                    seq,
                },
            );
        }
    }

    fn claim_timer(&self, cell: &Arc<TypeCell>, seq: u64, token: u64, expires: Deadline) {
        self.inner.timers.schedule(
            expires,
            TimerKind::Claim {
                cell: Arc::downgrade(cell),
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

    /// Gives a copy of `record` to every waiting reader whose query it matches (they stop
    /// waiting); forgets waiters that gave up.
    fn serve_readers(&self, st: &mut TypeState, record: &Record) {
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
    }

    /// Takes out of the queue the taker or claimer that has waited longest for an entry
    /// with these fields, with its claim's lease (`None`: a taker).
    fn first_waiting(
        &self,
        st: &mut TypeState,
        fields: &Fields,
    ) -> Option<(Arc<Waiter>, Option<Duration>)> {
        let i = st.waiters.iter().position(|w| {
            !matches!(w.mode, WaitMode::Read) && w.slot.is_waiting() && w.query.matches(fields)
        })?;
        let waiter = st.waiters.remove(i)?;
        let lease = match waiter.mode {
            WaitMode::Claim(lease) => Some(lease),
            WaitMode::Read | WaitMode::Take => None,
        };
        Some((waiter, lease))
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

    /// Removes a stored record for the current request and announces it as taken.
    fn remove_taken(&self, st: &mut TypeState, seq: u64, cause: Cause) -> Option<Taken> {
        let command = Command::Remove {
            seq,
            cause,
            request: current_request(),
        };
        let Outcome::Removed(record) = self.execute(st, command) else {
            return None;
        };
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
        cell: &Arc<TypeCell>,
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
            cell: cell.clone(),
            waiter,
            deadline,
            done: false,
        })
    }

    fn begin(&self, query: &Query, mode: WaitMode, timeout: Duration) -> Result<Begun> {
        query.validate()?;
        let run = |cell: &Arc<TypeCell>, st: &mut TypeState| {
            let now = self.now();
            Self::check_kinds(st, query)?;
            if let Some(seq) = Self::first_match(st, query, &now) {
                let delivery = match mode {
                    WaitMode::Read => st.store.get(seq).map(|r| Delivery::Copy(r.document())),
                    WaitMode::Take => self
                        .remove_taken(st, seq, Cause::Taken)
                        .map(Delivery::Taken),
                    WaitMode::Claim(lease) => self.claim_stored(cell, st, seq, lease, &now),
                };
                return Ok(Begun::Done(delivery));
            }
            if timeout.is_zero() {
                return Ok(Begun::Done(None));
            }
            let deadline = timeout_deadline(timeout);
            Ok(Begun::Wait(self.wait_for(cell, st, query, mode, deadline)?))
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
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        lease: Duration,
        now: &Now,
    ) -> Option<Delivery> {
        let command = Command::Claim {
            seq,
            token: self.inner.next_token.fetch_add(1, Ordering::Relaxed),
            expires: now.after(lease)?,
            request: current_request(),
        };
        if let Outcome::Missing = self.execute(st, command) {
            return None;
        }
        let record = st.store.get(seq)?;
        self.emit(&mut st.hub, EventKind::Claimed, record);
        let claim = record.claim?;
        self.claim_timer(cell, seq, claim.token, claim.expires);
        Some(Delivery::Claimed(state::claimed(&st.name, record)))
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
                Lease::For(d).deadline(&self.now())?;
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
            let now = self.now();
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
                .filter_map(|seq| self.remove_taken(st, seq, Cause::Taken))
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
                .for_each_match(query.filter(), &self.now(), |seq, r| {
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
                .for_each_match(query.filter(), &self.now(), |_, r| {
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
            let seq = Self::visible_seq(st, key, &self.now())?;
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
            let seq = Self::visible_seq(st, key, &self.now())?;
            self.remove_taken(st, seq, Cause::Taken)
        })
        .flatten()
    }

    // ----- claims -----

    /// Runs `f` on the record of a claim that is still held.
    fn with_claim<T>(
        &self,
        ticket: &ClaimTicket,
        f: impl FnOnce(&Engine, &Arc<TypeCell>, &mut TypeState, u64) -> T,
    ) -> Result<T> {
        let lost = || SpaceError::ClaimLost {
            entry_type: ticket.entry_type.clone(),
            key: ticket.key.clone(),
        };
        self.locked_if_exists(&ticket.entry_type, |cell, st| {
            let now = self.now();
            let seq = st.store.seq_of(&ticket.key).ok_or_else(lost)?;
            let held = st.store.get(seq).is_some_and(|r| {
                !r.expired(&now)
                    && r.claim
                        .is_some_and(|c| c.token == ticket.token && c.expires > now.get())
            });
            if !held {
                return Err(lost());
            }
            Ok(f(self, cell, st, seq))
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
            engine.remove_taken(st, seq, Cause::Committed)
        })
    }

    /// Gives a claimed entry back to the space, where waiting takers see it at once.
    pub fn release(&self, ticket: &ClaimTicket) -> Result<()> {
        self.with_claim(ticket, |engine, cell, st, seq| {
            let now = engine.now();
            engine.unclaim(cell, st, seq, false, &now)
        })
    }

    /// Extends a claim's lease from now.
    pub fn renew_claim(&self, ticket: &ClaimTicket, lease: Lease) -> Result<SystemTime> {
        let now = self.now();
        let Some(expires) = lease.deadline(&now)? else {
            return Err(SpaceError::InvalidLease {
                reason: "a claim needs a finite lease".into(),
            });
        };
        self.with_claim(ticket, |engine, cell, st, seq| {
            engine.execute(st, Command::RenewClaim { seq, expires });
            engine.claim_timer(cell, seq, ticket.token, expires);
            expires.to_system_time()
        })
    }

    /// Makes the claimed record `seq` visible again (a release, or a claim whose lease ran
    /// out: `lapsed`) and offers it to the waiters.
    fn unclaim(&self, cell: &Arc<TypeCell>, st: &mut TypeState, seq: u64, lapsed: bool, now: &Now) {
        let command = Command::Release {
            seq,
            lapsed,
            request: if lapsed { None } else { current_request() },
        };
        if let Outcome::Missing = self.execute(st, command) {
            return;
        }
        if let Some(record) = st.store.get(seq) {
            let record = record.clone();
            self.emit(&mut st.hub, EventKind::Released, &record);
        }
        self.offer_stored(cell, st, seq, now);
    }

    // ----- entry leases -----

    /// Extends an entry's lease from now; returns the new expiry (`None`: forever).
    ///
    /// # Errors
    /// [`SpaceError::NotFound`] when no entry has this key (or it expired).
    pub fn renew(&self, entry_type: &str, key: &Key, lease: Lease) -> Result<Option<SystemTime>> {
        let now = self.now();
        let expires = lease.deadline(&now)?;
        self.with_live_entry(entry_type, key, &now, |cell, st, seq| {
            self.execute(st, Command::Renew { seq, expires });
            self.expiry_timer(cell, seq, expires);
            expires.map(Deadline::to_system_time)
        })
    }

    /// Cancels an entry's lease: the entry is removed at once, with an `Expired` event.
    pub fn cancel(&self, entry_type: &str, key: &Key) -> Result<()> {
        let now = self.now();
        self.with_live_entry(entry_type, key, &now, |_, st, seq| {
            self.expire(st, seq, Cause::Cancelled)
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
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState, u64) -> R,
    ) -> Result<R> {
        let not_found = || SpaceError::NotFound {
            entry_type: entry_type.to_owned(),
            key: key.clone(),
        };
        self.locked_if_exists(entry_type, |cell, st| {
            let seq = st
                .store
                .seq_of(key)
                .filter(|&seq| st.store.get(seq).is_some_and(|r| !r.expired(now)))
                .ok_or_else(not_found)?;
            Ok(f(cell, st, seq))
        })
        .unwrap_or_else(|| Err(not_found()))
    }

    /// Removes an entry whose lease ran out or was cancelled, with an `Expired` event.
    fn expire(&self, st: &mut TypeState, seq: u64, cause: Cause) {
        let request = match cause {
            Cause::Cancelled => current_request(),
            _ => None,
        };
        if let Outcome::Removed(record) = self.execute(
            st,
            Command::Remove {
                seq,
                cause,
                request,
            },
        ) {
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
        let now = self.now();
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
        Ok(Subscription::local(shared, Box::new(self.clone())))
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
        Ok(Subscription::local(shared, Box::new(self.clone())))
    }

    // ----- housekeeping -----

    /// Counters over all entry types.
    pub fn stats(&self) -> Stats {
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut stats = Stats {
            entry_types: cells.len() as u64,
            timers: self.inner.timers.len() as u64,
            queued_events: self.inner.events.held() as u64,
            ..Stats::default()
        };
        for cell in cells {
            let st = cell.lock();
            stats.entries += st.store.len() as u64;
            stats.bytes += st.store.bytes() as u64;
            stats.waiters += st.waiters.len() as u64;
            stats.subscriptions += st.hub.len() as u64;
        }
        stats
    }

    /// Carries out a lease timer that came due: the node's clock decides that an entry's
    /// lease or a claim ran out, and the decision enters the log as a command.
    fn fire(&self, timer: TimerKind) {
        let now = self.now();
        match timer {
            TimerKind::Entry { cell, seq } => {
                let Some(cell) = cell.upgrade() else { return };
                let mut st = cell.lock();
                if st.store.get(seq).is_some_and(|r| r.expired(&now)) {
                    self.expire(&mut st, seq, Cause::Expired);
                }
            }
            TimerKind::Claim { cell, seq, token } => {
                let Some(cell) = cell.upgrade() else { return };
                let mut guard = cell.lock();
                let st = &mut *guard;
                let due = st
                    .store
                    .get(seq)
                    .and_then(|r| r.claim)
                    .is_some_and(|c| c.token == token && c.expires <= now.get());
                if due {
                    self.unclaim(&cell, st, seq, true, &now);
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
            let put_back = self.locked_in(&entry_type, Room::Always, |cell, st| {
                let mut record = record;
                record.claim = None;
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
                    st.store.upcoming_seq()
                } else {
                    seq
                };
                let now = self.now();
                self.bring(cell, st, seq, record, Bring::Back, &now);
            });
            // Only a bounded creation can fail, and this one is not bounded.
            debug_assert!(put_back.is_ok());
        }
    }
}

#[cfg(test)]
impl Engine {
    /// Everything the state holds, in a canonical order (entry types by name, records by
    /// sequence number, answers oldest first), for comparing two states.
    pub(crate) fn state_digest(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        cells.sort_by(|a, b| a.name.cmp(&b.name));
        for cell in cells {
            let st = cell.lock();
            if st.store.len() == 0 && st.store.indexed_fields().is_empty() {
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
        }
        for (id, answer) in self.inner.answers.lock().iter() {
            let _ = writeln!(out, "answer {id:?} {answer:?}");
        }
        out
    }

    /// The log place and outcome of every command applied so far, in log order.
    pub(crate) fn applied(&self) -> Vec<(u64, String)> {
        let mut trace = self.inner.trace.lock().clone();
        trace.sort_by_key(|(index, _)| *index);
        trace
    }

    /// Fires the lease timers that are due by the engine's clock, now, on this thread.
    pub(crate) fn fire_due(&self) {
        for timer in self.inner.timers.take_due() {
            self.fire(timer);
        }
    }
}

impl Keeper for Engine {
    fn renew_subscription(&self, sub: &Arc<SubShared>, lease: Lease) -> Result<()> {
        let expires = lease.deadline(&self.now())?;
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

    fn unsubscribe(&self, sub: &Arc<SubShared>) {
        self.remove_subscription(sub);
        sub.close();
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

fn reap(timers: &Timers<TimerKind>, engine: &Weak<Inner>) {
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

/// How [`Engine::bring`] brings a record in.
enum Bring {
    /// A new entry, written by `request`; its fields teach the schema new kinds (`learn`).
    New {
        learn: bool,
        request: Option<RequestId>,
    },
    /// An entry given back after its taker went away: announced as written again.
    Back,
    /// An entry whose hand-off fell through before anyone heard of it.
    Quietly,
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
    fn finish(self, seq: u64, ranges: Option<&crate::hash::RangeSet>) -> (Key, bool) {
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
    cell: Arc<TypeCell>,
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
        let mut st = self.cell.lock();
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
