//! A shard group's Raft log on the node's shared write-ahead log.
//!
//! Raft index `i` is entry `i + 1` of the hosted log (the write-ahead log can truncate
//! after an index but not before its first, and Raft logs start at index 0). Entries are
//! also kept in memory from the purge point on, so that followers are fed without reading
//! files; a group purges its log once a snapshot covers it, which bounds that memory.
//! Appends return at once; the callback openraft waits on fires once the shared group
//! commit made them durable.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use space_core::server::{HostedLog, LogImage};

use super::{Entry, LogId, Shard, Vote, io_error};

/// What the log's metadata record holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

struct Kept {
    /// Entries after the purge point, by Raft index.
    entries: BTreeMap<u64, Entry>,
    meta: Meta,
}

/// A shard group's Raft log store (openraft's `RaftLogStorage`), on one log of the
/// node's write-ahead log. Cloning gives another handle on the same log (the reader).
#[derive(Clone)]
pub struct LogStore {
    log: Arc<HostedLog>,
    kept: Arc<Mutex<Kept>>,
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
        let mut entries = BTreeMap::new();
        for (index, bytes) in &image.entries {
            let entry: Entry = postcard::from_bytes(bytes)
                .map_err(|e| io_error(format!("log {} entry {index}: {e}", log.id())))?;
            entries.insert(entry.log_id.index, entry);
        }
        if let Some(purged) = &meta.last_purged {
            entries = entries.split_off(&(purged.index + 1));
        }
        Ok(LogStore {
            log: Arc::new(log),
            kept: Arc::new(Mutex::new(Kept { entries, meta })),
        })
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
        Ok(kept.entries.range(range).map(|(_, e)| e.clone()).collect())
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
            .map(|(_, e)| e.log_id)
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
        {
            let mut kept = self.kept.lock();
            for entry in entries {
                let bytes = postcard::to_stdvec(&entry).map_err(io_error)?;
                last = Some(self.log.append(hosted(entry.log_id.index), &bytes));
                kept.entries.insert(entry.log_id.index, entry);
            }
        }
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
        let from = match last {
            Some(l) => Bound::Excluded(l.index),
            None => Bound::Unbounded,
        };
        let gone: Vec<u64> = kept
            .entries
            .range((from, Bound::Unbounded))
            .map(|(i, _)| *i)
            .collect();
        for i in gone {
            kept.entries.remove(&i);
        }
        // Ordered before every later append in the write-ahead log, so a later append's
        // durability covers it.
        self.log.truncate_after(keep_to);
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> io::Result<()> {
        let mark = {
            let mut kept = self.kept.lock();
            kept.entries = kept.entries.split_off(&(upto.index + 1));
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
