//! A shard group's Raft log on the node's shared write-ahead log.
//!
//! Raft index `i` is entry `i + 1` of the hosted log (the write-ahead log can truncate
//! after an index but not before its first, and Raft logs start at index 0). Entries are
//! also kept in memory from the purge point on, so that followers are fed without reading
//! files; a group purges its log once a snapshot covers it, which bounds that memory.
//! Appends return at once; the callback openraft waits on fires once the shared group
//! commit made them durable.
//!
//! Snapshots by entry count alone would let a log of large entries grow without bound
//! (10,000 entries of a MiB each, per shard) while the state stays small (each entry
//! written, then taken). [`bound_log`] keeps every group's log within a share of bytes:
//! it has the group snapshot once the entries after its last snapshot come to the share
//! (or to that snapshot's size, if larger: no more than about as many bytes written
//! again as appended), and keeps no more than the share of entries behind a snapshot for
//! followers that lag.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use space_core::server::{HostedLog, LogImage};

use super::state_machine::SnapshotSize;
use super::{Entry, LogId, Shard, ShardGroup, Vote, io_error};

/// What the log's metadata record holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

struct Kept {
    /// Entries after the purge point, by Raft index.
    entries: BTreeMap<u64, Held>,
    /// Their bytes (as encoded).
    bytes: u64,
    meta: Meta,
}

/// An entry kept in memory, with its size as encoded.
struct Held {
    entry: Entry,
    bytes: u64,
}

impl Kept {
    fn insert(&mut self, entry: Entry, bytes: u64) {
        self.bytes += bytes;
        if let Some(old) = self
            .entries
            .insert(entry.log_id.index, Held { entry, bytes })
        {
            self.bytes -= old.bytes;
        }
    }

    /// Forgets the entries at `from` and after.
    fn cut_from(&mut self, from: u64) {
        let gone = self.entries.split_off(&from);
        self.bytes -= gone.values().map(|h| h.bytes).sum::<u64>();
    }

    /// Forgets the entries before `from`.
    fn cut_before(&mut self, from: u64) {
        let after = self.entries.split_off(&from);
        let gone = std::mem::replace(&mut self.entries, after);
        self.bytes -= gone.values().map(|h| h.bytes).sum::<u64>();
    }
}

/// Bytes of entries one append to a follower carries at most (an entry larger than that
/// goes alone). Every group on a node sends to a peer over one
/// connection, and a heartbeat waits behind the appends before it there: bounded appends
/// keep it within its deadline (150 ms) while logs of large entries replicate. Unbounded,
/// an append carried openraft's `max_payload_entries` (300) entries, 9 MiB of 32 KiB
/// entries; a few groups' such appends held a connection's heartbeats and votes past
/// their deadlines, leaders lost their quorum and writes failed.
pub(crate) const APPEND_BYTES: u64 = 256 * 1024;

/// How many bytes a log has taken in, and the mark past which its keeper is told.
struct Growth {
    appended: AtomicU64,
    tell_at: AtomicU64,
    reached: tokio::sync::Notify,
}

/// A shard group's Raft log store (openraft's `RaftLogStorage`), on one log of the
/// node's write-ahead log. Cloning gives another handle on the same log (the reader).
#[derive(Clone)]
pub struct LogStore {
    log: Arc<HostedLog>,
    kept: Arc<Mutex<Kept>>,
    growth: Arc<Growth>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("log", &self.log).finish()
    }
}

/// The hosted log's index of Raft index `index`.
fn hosted(index: u64) -> u64 {
    index + 1
}

impl LogStore {
    /// Takes over `log` with what it held when the host opened (`image`).
    ///
    /// # Errors
    /// An `io::Error` when an entry or the metadata does not decode (a damaged or foreign
    /// log).
    pub fn open(log: HostedLog, image: LogImage) -> io::Result<LogStore> {
        let meta = match &image.meta {
            Some(bytes) => postcard::from_bytes(bytes)
                .map_err(|e| io_error(format!("log {} metadata: {e}", log.id())))?,
            None => Meta::default(),
        };
        let mut kept = Kept {
            entries: BTreeMap::new(),
            bytes: 0,
            meta,
        };
        for (index, bytes) in &image.entries {
            let entry: Entry = postcard::from_bytes(bytes)
                .map_err(|e| io_error(format!("log {} entry {index}: {e}", log.id())))?;
            kept.insert(entry, bytes.len() as u64);
        }
        if let Some(purged) = kept.meta.last_purged {
            kept.cut_before(purged.index + 1);
        }
        Ok(LogStore {
            log: Arc::new(log),
            kept: Arc::new(Mutex::new(kept)),
            growth: Arc::new(Growth {
                appended: AtomicU64::new(0),
                tell_at: AtomicU64::new(u64::MAX),
                reached: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Bytes of the entries kept (those after the purge point), as encoded.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.lock().bytes
    }

    /// Bytes appended since this store opened.
    fn appended(&self) -> u64 {
        self.growth.appended.load(Ordering::Acquire)
    }

    /// Notes `bytes` appended; tells the keeper when they reach its mark.
    fn grew(&self, bytes: u64) {
        let now = self.growth.appended.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if now >= self.growth.tell_at.load(Ordering::Acquire) {
            self.growth.tell_at.store(u64::MAX, Ordering::Release);
            self.growth.reached.notify_one();
        }
    }

    /// Tells the keeper once `allowance` more bytes are appended from now.
    fn tell_after(&self, allowance: u64) {
        let at = self.appended().saturating_add(allowance);
        self.growth.tell_at.store(at, Ordering::Release);
        if self.appended() >= at {
            self.growth.tell_at.store(u64::MAX, Ordering::Release);
            self.growth.reached.notify_one();
        }
    }

    /// Bytes of the entries kept after index `covered` (all of them for `None`).
    fn bytes_after(&self, covered: Option<u64>) -> u64 {
        let kept = self.kept.lock();
        match covered {
            None => kept.bytes,
            Some(index) => kept.entries.range(index + 1..).map(|(_, h)| h.bytes).sum(),
        }
    }

    /// The index up to which to purge so that at most `share` bytes of entries are kept
    /// at and before `snapshot` (the last index a snapshot covers); `None` when they
    /// already fit.
    fn purge_point(&self, snapshot: u64, share: u64) -> Option<u64> {
        let kept = self.kept.lock();
        let mut behind = 0u64;
        for (index, held) in kept.entries.range(..=snapshot).rev() {
            behind += held.bytes;
            if behind > share {
                return Some(*index);
            }
        }
        None
    }

    /// Writes the metadata record; returns its mark.
    fn write_meta(&self, meta: &Meta) -> io::Result<space_core::server::LogMark> {
        let bytes = postcard::to_stdvec(meta).map_err(io_error)?;
        Ok(self.log.set_meta(&bytes))
    }

    /// As [`LogStore::write_meta`], for metadata nothing waits on: it goes to disk with
    /// the next group commit, rather than starting one of its own.
    fn write_meta_lazily(&self, meta: &Meta) -> io::Result<()> {
        let bytes = postcard::to_stdvec(meta).map_err(io_error)?;
        self.log.set_meta_lazily(&bytes);
        Ok(())
    }

    /// Waits until `mark` is durable.
    async fn durable(&self, mark: space_core::server::LogMark) -> io::Result<()> {
        self.log.durable(mark).await.map_err(io_error)
    }
}

impl RaftLogReader<Shard> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let kept = self.kept.lock();
        Ok(kept
            .entries
            .range(range)
            .map(|(_, h)| h.entry.clone())
            .collect())
    }

    /// The entries from `start` before `end` that fit in `APPEND_BYTES` (at least the
    /// first): what one append to a follower carries.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let kept = self.kept.lock();
        let mut bytes = 0u64;
        Ok(kept
            .entries
            .range(start..end)
            .enumerate()
            .take_while(|(i, (_, h))| {
                bytes += h.bytes;
                *i == 0 || bytes <= APPEND_BYTES
            })
            .map(|(_, (_, h))| h.entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(self.kept.lock().meta.vote)
    }
}

impl RaftLogStorage<Shard> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<Shard>> {
        let kept = self.kept.lock();
        let last_purged = kept.meta.last_purged;
        let last = kept
            .entries
            .last_key_value()
            .map(|(_, h)| h.entry.log_id)
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    /// Durable before it returns, as Raft requires of a vote.
    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mark = {
            let mut kept = self.kept.lock();
            kept.meta.vote = Some(*vote);
            self.write_meta(&kept.meta)?
        };
        self.durable(mark).await
    }

    /// Written with the next group commit something else starts; not waited for (Raft
    /// does not need it durable: it only saves re-applying after a restart). Written
    /// eagerly, every commit of a leader started a group commit of its own: a second
    /// `fdatasync` per round, for a record no one waits on.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let mut kept = self.kept.lock();
        kept.meta.committed = committed;
        self.write_meta_lazily(&kept.meta)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.kept.lock().meta.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Shard>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut last = None;
        let mut appended = 0;
        {
            let mut kept = self.kept.lock();
            for entry in entries {
                let bytes = postcard::to_stdvec(&entry).map_err(io_error)?;
                last = Some(self.log.append(hosted(entry.log_id.index), &bytes));
                appended += bytes.len() as u64;
                kept.insert(entry, bytes.len() as u64);
            }
        }
        self.grew(appended);
        let Some(mark) = last else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // The entries are readable now; they are acknowledged once the shared group
        // commit has them on disk.
        let store = self.clone();
        tokio::spawn(async move {
            callback.io_completed(store.durable(mark).await);
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let mut kept = self.kept.lock();
        let keep_to = last.map_or(0, |l| hosted(l.index));
        kept.cut_from(last.map_or(0, |l| l.index + 1));
        // Ordered before every later append in the write-ahead log, so a later append's
        // durability covers it.
        self.log.truncate_after(keep_to);
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> io::Result<()> {
        let mark = {
            let mut kept = self.kept.lock();
            kept.cut_before(upto.index + 1);
            kept.meta.last_purged = Some(upto);
            self.write_meta(&kept.meta)?;
            self.log.purge_before(hosted(upto.index) + 1)
        };
        self.durable(mark).await?;
        // Files only this log's purged entries held can go now.
        self.log.compact().map_err(io_error)?;
        Ok(())
    }
}

/// How long [`bound_log`] waits for a snapshot it asked for (or for the one being built
/// when it asked, which openraft finishes instead) before it gives up on it: a snapshot
/// that failed never lands.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// Keeps the log of `raft` (whose store is `store`) within `share` bytes beyond its
/// snapshot, until the group shuts down: asks for a snapshot once the entries after the
/// last one come to `share` bytes, or to the size of that snapshot (`snapshot`) if
/// larger; and after every snapshot (its own or one openraft made by entry count) purges
/// the entries behind it past `share` bytes. Runs as a task of its own.
pub(crate) async fn bound_log(
    raft: ShardGroup,
    store: LogStore,
    snapshot: SnapshotSize,
    share: u64,
) {
    let mut snapshots = raft.watch_snapshot_progress();
    loop {
        let beyond = store.bytes_after(snapshots.get().map(|l| l.index));
        store.tell_after(share.max(snapshot.bytes()).saturating_sub(beyond));
        tokio::select! {
            () = store.growth.reached.notified() => {
                if raft.trigger().snapshot().await.is_err() {
                    return;
                }
                match tokio::time::timeout(SNAPSHOT_WAIT, snapshots.changed()).await {
                    Ok(Err(_)) => return,
                    Ok(Ok(())) => {}
                    // None made (it failed): asked again.
                    Err(_) => continue,
                }
            }
            changed = snapshots.changed() => if changed.is_err() {
                return;
            },
        }
        let Some(covered) = snapshots.get() else {
            continue;
        };
        if let Some(upto) = store.purge_point(covered.index, share)
            && raft.trigger().purge_log(upto).await.is_err()
        {
            return;
        }
    }
}
