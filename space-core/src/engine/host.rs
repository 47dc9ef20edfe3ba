//! What engines share: the threads that serve them (one lease timer, one checkpoint
//! worker) and, for durable engines, a data directory whose write-ahead log holds one log
//! per engine ([`LogHost`]).
//!
//! An in-memory engine has services of its own. Durable engines opened on one host share
//! its services and its write-ahead log (one `fdatasync` covers what all of them appended
//! meanwhile); [`Engine::open`] is the case of a host with one engine (log 0).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::wal::{LogContents, LogId};

/// A due lease timer: the engine it belongs to, and what it is for.
pub(super) type Due = (Weak<Inner>, TimerKind);

/// The threads that serve engines besides their callers: the timer that decides lease
/// expiries and claim lapses, and (for durable engines) the worker that takes snapshots.
pub(super) struct Services {
    pub(super) clock: Clock,
    pub(super) timers: Arc<Timers<Due>>,
    /// The engines served, for the checkpoint worker.
    engines: Arc<Mutex<Vec<Weak<Inner>>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    checkpoints: Option<Arc<Checkpoints>>,
    stopped: AtomicBool,
}

impl Services {
    /// Starts the timer thread, and the checkpoint worker when `checkpoints` says when
    /// snapshots are due.
    pub(super) fn start(clock: Clock, checkpoints: Option<Arc<Checkpoints>>) -> Arc<Services> {
        let timers = Arc::new(Timers::new(clock.clone()));
        let engines: Arc<Mutex<Vec<Weak<Inner>>>> = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let reaper = timers.clone();
        match std::thread::Builder::new()
            .name("space-reaper".into())
            .spawn(move || expiry::reap(&reaper))
        {
            Ok(t) => threads.push(t),
            // Without the reaper, expired entries are still never returned (reads check
            // deadlines); they are only removed later, lazily.
            Err(e) => tracing::error!(error = %e, "could not start the lease reaper thread"),
        }
        if let Some(due) = checkpoints.clone() {
            let served = engines.clone();
            match std::thread::Builder::new()
                .name("space-checkpoint".into())
                .spawn(move || {
                    while due.wait_due() {
                        let live: Vec<Arc<Inner>> = {
                            let mut engines = served.lock();
                            engines.retain(|e| e.strong_count() > 0);
                            engines.iter().filter_map(Weak::upgrade).collect()
                        };
                        for inner in live {
                            if let Err(e) = Engine::internal(inner).checkpoint() {
                                tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds");
                            }
                        }
                    }
                }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::error!(error = %e, "could not start the checkpoint thread; the log will not be compacted")
                }
            }
        }
        Arc::new(Services {
            clock,
            timers,
            engines,
            threads: Mutex::new(threads),
            checkpoints,
            stopped: AtomicBool::new(false),
        })
    }

    /// Notes a snapshot of `bytes` just written: the log's growth counts from here.
    pub(super) fn snapshot_written(&self, bytes: u64) {
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.snapshot_written(bytes);
        }
    }

    /// Serves `engine` too (its snapshots are taken with the others').
    pub(super) fn serve(&self, engine: &Arc<Inner>) {
        self.engines.lock().push(Arc::downgrade(engine));
    }

    /// Stops the threads and waits for them (never for the calling thread itself). Once.
    pub(super) fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.timers.shutdown();
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
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A data directory that durable engines share: its write-ahead log holds one log per
/// engine, and its timer and checkpoint threads serve them all. The directory is locked
/// while the host exists; the host goes (its log written out, the directory released)
/// when the last engine opened on it closes and the caller's handle is dropped.
pub struct LogHost {
    dir: PathBuf,
    wal: Arc<Wal>,
    pub(super) services: Arc<Services>,
    /// What opening the write-ahead log found, per log, until its engine takes it.
    recovered: Mutex<HashMap<LogId, LogContents>>,
    opened: Mutex<HashSet<LogId>>,
    _lock: std::fs::File,
}

impl std::fmt::Debug for LogHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHost").field("dir", &self.dir).finish()
    }
}

impl LogHost {
    /// Opens (creating if missing) and locks a data directory, and reads its write-ahead
    /// log. `config` gives the segment size, when snapshots are due, and the clock every
    /// engine on this host uses. Blocks while it reads.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a directory in use by another process,
    /// a foreign or corrupt file, or an I/O failure.
    pub fn open(dir: impl AsRef<std::path::Path>, config: &EngineConfig) -> Result<Arc<LogHost>> {
        let dir = dir.as_ref();
        let (wal, recovered, lock) = crate::durable::open_dir(dir, config.log_segment_bytes)?;
        wal.slow_down(config.sync_delay);
        if let Some(bytes) = config.full_after_bytes {
            wal.fill_after(bytes);
        }
        let checkpoints = Checkpoints::new(config.snapshot_after_bytes.max(4096));
        let counter = checkpoints.clone();
        wal.on_written(move |bytes| counter.written(bytes));
        let services = Services::start(config.clock.clone(), Some(checkpoints));
        Ok(Arc::new(LogHost {
            dir: dir.to_path_buf(),
            wal,
            services,
            recovered: Mutex::new(recovered),
            opened: Mutex::new(HashSet::new()),
            _lock: lock,
        }))
    }

    /// The data directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Why the data directory can no longer be written, once its write-ahead log failed
    /// (an I/O error, a full disk) or [`fail`](Self::fail) was called: nothing appended
    /// since becomes durable, and the state the engines hold in memory may be ahead of
    /// what the disk holds.
    pub fn failure(&self) -> Option<String> {
        self.wal.failure()
    }

    /// Completes once the data directory can no longer be written (at once if so), with
    /// why. Cancel-safe.
    pub async fn failed(&self) -> String {
        self.wal.failed().await
    }

    /// Marks the data directory as failed for `reason` (a file beside the log could not
    /// be written, say a snapshot): from now on the log makes nothing durable, as if its
    /// own write had failed.
    pub fn fail(&self, reason: String) {
        self.wal.fail(reason);
    }

    /// The number of times the write-ahead log was made durable (`fdatasync` calls), for
    /// all the logs on it.
    pub fn syncs(&self) -> u64 {
        self.wal.syncs()
    }

    /// How many of those `fdatasync` calls made appends of more than one log durable at
    /// once (one call covering every log's appends is what sharing the log buys).
    pub fn shared_syncs(&self) -> u64 {
        self.wal.shared_syncs()
    }

    /// Claims log `log` for one engine and hands over what the write-ahead log held for it.
    fn take(&self, log: LogId) -> Result<LogContents> {
        if !self.opened.lock().insert(log) {
            return Err(crate::wal::storage(
                &self.dir,
                format!("log {log} is already open on this data directory"),
            ));
        }
        Ok(self.recovered.lock().remove(&log).unwrap_or_default())
    }
}

impl LogHost {
    /// Opens log `log` for an owner that numbers and keeps its own entries (a Raft group's
    /// log store) instead of an engine, and hands over what the write-ahead log holds of
    /// it. The log shares the host's group commit with every other log on it. A log is
    /// open once per host at a time.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log is already open on this host.
    pub fn open_log(self: &Arc<Self>, log: LogId) -> Result<(HostedLog, LogImage)> {
        let contents = self.take(log)?;
        let image = LogImage {
            entries: contents.entries,
            meta: contents.meta,
        };
        Ok((
            HostedLog {
                host: self.clone(),
                log,
            },
            image,
        ))
    }
}

/// What the write-ahead log held of one log when it was opened: its entries (after its
/// purge mark, without those truncated away) and its last metadata record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogImage {
    /// The entries by index.
    pub entries: std::collections::BTreeMap<u64, Vec<u8>>,
    /// The last metadata record written, if any.
    pub meta: Option<Vec<u8>>,
}

/// A place in the write-ahead log's order: once it is durable, so is every record the
/// call that returned it wrote (and everything written before).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogMark(u64);

/// One log on a [`LogHost`]'s write-ahead log, kept by its own owner (see
/// [`LogHost::open_log`]). Every call returns at once, before its record is durable; wait
/// for the returned [`LogMark`] with [`durable`](Self::durable). Records of one log are
/// durable in the order they were written. The log stays claimed after the handle is
/// dropped: it can be opened again only once the host is reopened.
pub struct HostedLog {
    host: Arc<LogHost>,
    log: LogId,
}

impl std::fmt::Debug for HostedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedLog")
            .field("dir", &self.host.dir)
            .field("log", &self.log)
            .finish()
    }
}

impl HostedLog {
    /// This log's id on its host.
    pub fn id(&self) -> LogId {
        self.log
    }

    /// Writes `data` as the entry at `index`. Entries after `index` must have been
    /// truncated first ([`truncate_after`](Self::truncate_after)); the log does not check.
    pub fn append(&self, index: u64, data: &[u8]) -> LogMark {
        LogMark(self.host.wal.append_at(self.log, index, data).lsn)
    }

    /// Drops the entries after `index`.
    pub fn truncate_after(&self, index: u64) -> LogMark {
        LogMark(self.host.wal.truncate(self.log, index))
    }

    /// Marks the entries before `index` as no longer needed; the files holding only such
    /// entries (of every log on the host) are deleted by the host's compaction.
    pub fn purge_before(&self, index: u64) -> LogMark {
        LogMark(self.host.wal.purge(self.log, index))
    }

    /// Keeps `data` as this log's metadata (the last one written is what opening finds).
    pub fn set_meta(&self, data: &[u8]) -> LogMark {
        LogMark(self.host.wal.set_meta(self.log, data))
    }

    /// As [`HostedLog::set_meta`], for metadata nothing waits on: written with the next
    /// group commit something else starts (an append, or a wait for durability), at no
    /// `fdatasync` of its own.
    pub fn set_meta_lazily(&self, data: &[u8]) -> LogMark {
        LogMark(self.host.wal.set_meta_lazily(self.log, data))
    }

    /// Waits, without blocking a thread, until the record of `mark` is durable (on disk
    /// after `fdatasync`). Cancel-safe: dropping the future only stops the waiting.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the write-ahead log failed or was closed before it
    /// got there.
    pub async fn durable(&self, mark: LogMark) -> Result<()> {
        self.host.wal.durable(mark.0).await
    }

    /// Deletes the log files every log on the host has purged.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when a file cannot be written or deleted.
    pub fn compact(&self) -> Result<usize> {
        self.host.wal.compact()
    }
}

impl Drop for LogHost {
    fn drop(&mut self) {
        self.services.stop();
        self.wal.close();
    }
}

impl Engine {
    /// Opens a durable engine on a data directory (created if missing): recovers what the
    /// directory holds (snapshot, then the operation log), and logs every change from now
    /// on. Operations are durable once [`flush`](Self::flush) (or the Space handle, which
    /// waits for it) returns. Blocks while it recovers. The engine is log 0 of a
    /// [`LogHost`] of its own.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a directory in use by another process,
    /// a foreign or corrupt file, or an I/O failure.
    pub fn open(dir: impl AsRef<std::path::Path>, config: EngineConfig) -> Result<Engine> {
        let host = LogHost::open(dir, &config)?;
        Engine::open_on(&host, crate::durable::ENGINE_LOG, config)
    }

    /// Opens the engine whose log is `log` on `host`'s write-ahead log, recovering it
    /// (its newest snapshot, then its commands after it); the engine uses the host's clock.
    /// Engines on one host share its group commit, timer and checkpoint threads; each is
    /// recovered from its own log only. Blocks while it recovers.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a log already open on this host, a
    /// foreign or corrupt snapshot or log entry, or an I/O failure.
    pub fn open_on(host: &Arc<LogHost>, log: LogId, config: EngineConfig) -> Result<Engine> {
        let started = Instant::now();
        let contents = host.take(log)?;
        let recovered = crate::durable::recover_log(&host.dir, log, contents);
        let recovered = match recovered {
            Ok(r) => r,
            Err(e) => {
                host.opened.lock().remove(&log);
                return Err(e);
            }
        };
        let mut next_token = recovered.snapshot.next_token;
        for (_, _, _, command) in &recovered.commands {
            if let Some(token) = command.token() {
                next_token = next_token.max(token + 1);
            }
        }
        let mut config = config;
        config.clock = host.services.clock.clone();
        let engine = Self::build(
            config,
            host.services.clone(),
            Some(Durable {
                host: Mutex::new(Some(host.clone())),
                wal: host.wal.clone(),
                log,
                checkpointing: Mutex::new(()),
            }),
            next_token,
        );
        let replayed = recovered.commands.len();
        engine.recover_state(recovered.snapshot, recovered.commands);
        let entries = engine.inner.totals.entries.load(Ordering::Relaxed);
        tracing::info!(
            dir = %host.dir.display(),
            log,
            entries,
            replayed,
            took_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        Ok(engine)
    }
}
