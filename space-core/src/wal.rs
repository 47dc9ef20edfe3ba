//! The write-ahead log of a node, shared by every log the node hosts (docs/ARCHITECTURE.md
//! section 8).
//!
//! A node hosts several independent logs (today the engine's one; with replication, one
//! per shard). They share one sequence of segment files and one writer thread: whatever
//! all logs appended while the writer was busy is written and made durable by one
//! `fdatasync` (group commit). Every record is tagged with its log's id:
//!
//! - an *entry* at the log's next index (its own numbering, 1, 2, 3, ...);
//! - *truncate after* `i`: the log's entries past `i` are gone (a Raft log overwritten
//!   by a new leader), and its next entry gets `i + 1`;
//! - *purge before* `i`: the log's entries before `i` are no longer needed (a snapshot
//!   holds them);
//! - *metadata*: a small record the log keeps beside its entries (what a Raft log store
//!   must keep: the vote, the committed index); the last one counts.
//!
//! Records are framed `[len u32][crc32 u32][lsn u64][log u32][kind u8][number u64][data]`;
//! the LSN is the node-wide order, used to wait for durability. Opening the log reads every
//! segment in LSN order and gives each log back exactly as its records leave it; a torn
//! tail of the last segment is cut off. [`Wal::compact`] deletes the oldest segments once
//! every log has purged what they hold, writing each log's purge mark and metadata again
//! first so that they outlive the segments.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Result, SpaceError};

/// Names one log among those sharing a node's write-ahead log.
pub type LogId = u32;

/// A segment is closed and a new one started past this size, by default.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Zeros written ahead of a segment's end at a time (or the segment's size, when
/// smaller): see [`SegmentFile`].
const PREALLOCATE_BYTES: u64 = 1 << 20;

const WAL_MAGIC: &[u8; 8] = b"SPCWAL04";
/// Bytes of a frame before its record: length, checksum, LSN.
const FRAME_HEADER: usize = 16;
/// Bytes of a record before its data: log id, kind, number.
const RECORD_HEADER: usize = 13;

/// The kinds of record.
pub(crate) const ENTRY: u8 = 0;
const TRUNCATE: u8 = 1;
const PURGE: u8 = 2;
const META: u8 = 3;

/// An I/O or format problem with a file, as the error names it.
pub(crate) fn storage(path: &Path, what: impl std::fmt::Display) -> SpaceError {
    SpaceError::Storage {
        path: path.display().to_string(),
        reason: what.to_string(),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| storage(dir, e))
}

/// Appends one frame holding `parts` (concatenated) to `buf`.
pub(crate) fn frame(buf: &mut Vec<u8>, lsn: u64, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    for p in parts {
        crc.update(p);
    }
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&lsn.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// What reading a file's frames found.
pub(crate) type Framed<'a> = (Vec<(u64, &'a [u8])>, usize, Option<String>);

/// The frames of `bytes` (after a file's header): `(lsn, payload)`, how many bytes were
/// whole and valid, and what stopped the reading early, if anything did.
pub(crate) fn frames(bytes: &[u8]) -> Framed<'_> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < FRAME_HEADER {
            return (
                out,
                at,
                Some(format!("a partial frame header at byte {at}")),
            );
        }
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let mut lsn_bytes = [0u8; 8];
        lsn_bytes.copy_from_slice(&bytes[at + 8..at + 16]);
        let lsn = u64::from_le_bytes(lsn_bytes);
        let end = at + FRAME_HEADER + len;
        if end > bytes.len() {
            return (
                out,
                at,
                Some(format!(
                    "a frame at byte {at} runs past the end of the file"
                )),
            );
        }
        let payload = &bytes[at + FRAME_HEADER..end];
        let mut h = crc32fast::Hasher::new();
        h.update(&lsn_bytes);
        h.update(payload);
        if h.finalize() != crc {
            return (
                out,
                at,
                Some(format!("a frame at byte {at} fails its checksum")),
            );
        }
        out.push((lsn, payload));
        at = end;
    }
    (out, at, None)
}

/// The frames of a segment's bytes (after its header), as [`frames`] reads them, except
/// that zeros to the end of the file are where the writer had made room for frames it
/// never wrote ([`SegmentFile`]): the clean end, not damage.
pub(crate) fn segment_frames(bytes: &[u8]) -> Framed<'_> {
    let (out, valid, problem) = frames(bytes);
    if problem.is_some() && bytes[valid..].iter().all(|b| *b == 0) {
        return (out, valid, None);
    }
    (out, valid, problem)
}

fn record_header(log: LogId, kind: u8, number: u64) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[..4].copy_from_slice(&log.to_le_bytes());
    h[4] = kind;
    h[5..].copy_from_slice(&number.to_le_bytes());
    h
}

/// One record read back: its log, kind, number and data.
pub(crate) fn parse_record(payload: &[u8]) -> Option<(LogId, u8, u64, &[u8])> {
    if payload.len() < RECORD_HEADER {
        return None;
    }
    let log = u32::from_le_bytes(payload[..4].try_into().ok()?);
    let number = u64::from_le_bytes(payload[5..RECORD_HEADER].try_into().ok()?);
    Some((log, payload[4], number, &payload[RECORD_HEADER..]))
}

fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.log")
}

/// The number in a file name `<prefix><number><suffix>`.
pub(crate) fn number_in(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// Files of one kind in `dir` (`<prefix><number><suffix>`), sorted by number.
pub(crate) fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))? {
        let entry = entry.map_err(|e| storage(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = number_in(&name, prefix, suffix) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// One log as the write-ahead log holds it on opening.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LogContents {
    /// The entries, by index: those after the purge mark, not truncated away.
    pub(crate) entries: BTreeMap<u64, Vec<u8>>,
    /// Entries before this index were purged.
    pub(crate) purged_before: u64,
    /// The index of the last entry appended (and not truncated), even if purged.
    pub(crate) last_index: u64,
    /// The last metadata record, if any.
    pub(crate) meta: Option<Vec<u8>>,
}

impl LogContents {
    fn apply(&mut self, kind: u8, number: u64, data: &[u8]) -> std::result::Result<(), String> {
        match kind {
            ENTRY => {
                if number >= self.purged_before {
                    self.entries.insert(number, data.to_vec());
                }
                self.last_index = number;
            }
            TRUNCATE => {
                self.entries.split_off(&(number + 1));
                self.last_index = self.last_index.min(number);
            }
            PURGE => {
                self.entries = self.entries.split_off(&number);
                self.purged_before = self.purged_before.max(number);
                self.last_index = self.last_index.max(number.saturating_sub(1));
            }
            META => self.meta = Some(data.to_vec()),
            other => return Err(format!("unknown record kind {other}")),
        }
        Ok(())
    }
}

/// Where one log stands, as the writer keeps it.
#[derive(Clone, Debug, Default)]
struct Tail {
    last_index: u64,
    purged_before: u64,
    meta: Option<Vec<u8>>,
}

/// The highest entry index each log has in one segment.
#[derive(Debug)]
struct Segment {
    first_lsn: u64,
    path: PathBuf,
    max_index: HashMap<LogId, u64>,
}

struct Pending {
    buf: Vec<u8>,
    next_lsn: u64,
    /// The highest entry index each log appended in `buf`.
    max_index: HashMap<LogId, u64>,
    logs: HashMap<LogId, Tail>,
    /// Something waits for what `buf` holds (an append, or a wait for durability): the
    /// writer writes `buf` only then, so that records kept lazily ride along with the next
    /// group commit instead of starting one of their own.
    wanted: bool,
    shutdown: bool,
}

/// Told the bytes of every group the writer made durable.
type OnWritten = Box<dyn Fn(u64) + Send + Sync>;

/// Where an entry went: its place in the node-wide order (wait for durability on it) and
/// its index in its own log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Appended {
    pub(crate) lsn: u64,
    pub(crate) index: u64,
}

/// The segment being written, and how far.
///
/// The file is kept filled with zeros some way past its last frame (written, not just
/// allocated, and made durable with the frames before them), so that an `fdatasync`
/// after an append finds the file's size unchanged and writes the frames' pages alone,
/// not the file's metadata too: on ext4 that is one write and one wait less per group
/// commit (a tenth of a replicated node's CPU went to `fdatasync`, a third of that to
/// writing the inode). Reading a segment takes zeros to its end for its clean end
/// ([`segment_frames`]).
struct SegmentFile {
    file: File,
    /// Where the next frame goes.
    end: u64,
    /// How far the file holds zeros written ahead.
    filled: u64,
}

impl SegmentFile {
    /// Creates the segment starting at `first_lsn` in `dir`, its header and `ahead`
    /// zeros made durable, and its name in the directory too.
    fn create(dir: &Path, first_lsn: u64, ahead: u64) -> Result<SegmentFile> {
        let path = dir.join(segment_name(first_lsn));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| storage(&path, e))?;
        let mut header = WAL_MAGIC.to_vec();
        header.extend_from_slice(&first_lsn.to_le_bytes());
        let mut segment = SegmentFile {
            file,
            end: 0,
            filled: 0,
        };
        segment
            .append(&header, ahead)
            .and_then(|()| segment.file.sync_all())
            .map_err(|e| storage(&path, e))?;
        sync_dir(dir)?;
        Ok(segment)
    }

    /// Writes `bytes` at the end, first filling `ahead` more zeros past them when the
    /// zeros written so far do not reach that far. Not durable until the file is synced.
    fn append(&mut self, bytes: &[u8], ahead: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.end + bytes.len() as u64;
        if end > self.filled {
            let len = usize::try_from(end + ahead - self.filled).map_err(|_| {
                std::io::Error::other("zeros to write ahead past the address space")
            })?;
            self.file.write_all_at(&vec![0u8; len], self.filled)?;
            self.filled = end + ahead;
        }
        self.file.write_all_at(bytes, self.end)?;
        self.end = end;
        Ok(())
    }
}

/// The node's write-ahead log: appends from any thread, made durable by a writer thread in
/// groups.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    pending: Mutex<Pending>,
    work: Condvar,
    /// The segments, oldest first; the last is being written.
    segments: Mutex<Vec<Segment>>,
    durable: AtomicU64,
    durable_lock: Mutex<()>,
    durable_cv: Condvar,
    notify: tokio::sync::Notify,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Woken once, when the log fails.
    on_failure: tokio::sync::Notify,
    syncs: AtomicU64,
    /// Of those, the ones that made appends of more than one log durable at once.
    shared_syncs: AtomicU64,
    /// Called by the writer after each group it made durable (with the bytes written).
    on_written: Mutex<Option<OnWritten>>,
    /// How much longer each `fdatasync` is made to take, in microseconds (a slow disk,
    /// for fault tests; zero in service).
    sync_delay_micros: AtomicU64,
    /// Bytes the writer may still write before the disk is full (a full disk, for fault
    /// tests; `u64::MAX` in service).
    room_bytes: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Wal {
    /// Opens the log in `dir` (created if missing): reads every segment, cuts a torn tail
    /// off the last one, and starts the writer. Returns the log and every log's contents.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a foreign or corrupt segment, or an
    /// I/O failure.
    pub(crate) fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Arc<Wal>, HashMap<LogId, LogContents>)> {
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let listed = numbered(dir, "wal-", ".log")?;
        let mut logs: HashMap<LogId, LogContents> = HashMap::new();
        let mut segments = Vec::new();
        let mut last_lsn = 0;
        for (i, (first, path)) in listed.iter().enumerate() {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| storage(path, e))?;
            let is_last = i + 1 == listed.len();
            if bytes.len() < 16 || &bytes[..8] != WAL_MAGIC {
                if is_last
                    && bytes.len() < 16
                    && WAL_MAGIC.starts_with(&bytes[..bytes.len().min(8)])
                {
                    // Created but never written past its header: nothing in it.
                    let _ = fs::remove_file(path);
                    continue;
                }
                return Err(storage(
                    path,
                    "not a space log segment of this version (bad magic): a foreign, older or damaged file",
                ));
            }
            let (frames, valid, problem) = segment_frames(&bytes[16..]);
            if let Some(p) = problem {
                if !is_last {
                    return Err(storage(path, format!("corrupt log segment: {p}")));
                }
                // A torn tail: the last writes before a crash, never acknowledged.
                tracing::warn!(file = %path.display(), problem = %p, "truncating a torn tail of the write-ahead log");
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| storage(path, e))?;
                f.set_len((16 + valid) as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| storage(path, e))?;
            }
            if frames.is_empty() && is_last {
                // Nothing was written to it: the new segment takes its place (and name).
                let _ = fs::remove_file(path);
                continue;
            }
            let mut max_index = HashMap::new();
            for (lsn, payload) in frames {
                if lsn < *first || lsn <= last_lsn {
                    return Err(storage(
                        path,
                        format!("corrupt log segment: record {lsn} out of order"),
                    ));
                }
                last_lsn = lsn;
                let (log, kind, number, data) = parse_record(payload)
                    .ok_or_else(|| storage(path, format!("corrupt log record {lsn}: too short")))?;
                logs.entry(log)
                    .or_default()
                    .apply(kind, number, data)
                    .map_err(|e| storage(path, format!("corrupt log record {lsn}: {e}")))?;
                if kind == ENTRY {
                    let m = max_index.entry(log).or_insert(0);
                    *m = number.max(*m);
                }
            }
            segments.push(Segment {
                first_lsn: *first,
                path: path.clone(),
                max_index,
            });
        }
        let next_lsn = last_lsn + 1;
        let path = dir.join(segment_name(next_lsn));
        let segment_bytes = segment_bytes.max(4096);
        let file = SegmentFile::create(dir, next_lsn, PREALLOCATE_BYTES.min(segment_bytes))?;
        segments.push(Segment {
            first_lsn: next_lsn,
            path,
            max_index: HashMap::new(),
        });
        let tails = logs
            .iter()
            .map(|(id, c)| {
                (
                    *id,
                    Tail {
                        last_index: c.last_index,
                        purged_before: c.purged_before,
                        meta: c.meta.clone(),
                    },
                )
            })
            .collect();
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                next_lsn,
                max_index: HashMap::new(),
                logs: tails,
                wanted: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            segments: Mutex::new(segments),
            durable: AtomicU64::new(last_lsn),
            durable_lock: Mutex::new(()),
            durable_cv: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            on_failure: tokio::sync::Notify::new(),
            syncs: AtomicU64::new(0),
            shared_syncs: AtomicU64::new(0),
            on_written: Mutex::new(None),
            sync_delay_micros: AtomicU64::new(0),
            room_bytes: AtomicU64::new(u64::MAX),
            writer: Mutex::new(None),
        });
        let writer = wal.clone();
        let thread = std::thread::Builder::new()
            .name("space-wal".into())
            .spawn(move || writer.write_loop(file))
            .map_err(|e| storage(dir, format!("cannot start the log writer: {e}")))?;
        *wal.writer.lock() = Some(thread);
        Ok((wal, logs))
    }

    fn new_segment(&self, first_lsn: u64) -> Result<SegmentFile> {
        SegmentFile::create(&self.dir, first_lsn, self.preallocate())
    }

    /// Zeros written ahead of a segment's end at a time.
    fn preallocate(&self) -> u64 {
        PREALLOCATE_BYTES.min(self.segment_bytes)
    }

    /// Calls `f` with the bytes of every group the writer made durable (the engine counts
    /// them to decide when to snapshot).
    pub(crate) fn on_written(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *self.on_written.lock() = Some(Box::new(f));
    }

    /// Adds one record to what the writer writes next; returns its LSN.
    fn push(&self, p: &mut Pending, log: LogId, kind: u8, number: u64, data: &[u8]) -> u64 {
        let lsn = p.next_lsn;
        p.next_lsn += 1;
        frame(&mut p.buf, lsn, &[&record_header(log, kind, number), data]);
        lsn
    }

    /// Hands what `buf` holds to the writer (unless it holds nothing: then whatever was
    /// pushed is being written already).
    fn wake_writer(&self, mut p: MutexGuard<'_, Pending>) {
        if !p.buf.is_empty() {
            p.wanted = true;
            drop(p);
            self.work.notify_one();
        }
    }

    /// Appends an entry to `log`, at its next index.
    pub(crate) fn append(&self, log: LogId, data: &[u8]) -> Appended {
        let mut p = self.pending.lock();
        let tail = p.logs.entry(log).or_default();
        tail.last_index += 1;
        let index = tail.last_index;
        let lsn = self.push(&mut p, log, ENTRY, index, data);
        let m = p.max_index.entry(log).or_insert(0);
        *m = index.max(*m);
        self.wake_writer(p);
        Appended { lsn, index }
    }

    /// Appends an entry to `log` at `index`, which the caller chose (a Raft log numbers its
    /// own entries); the entries after it are expected to have been truncated first.
    pub(crate) fn append_at(&self, log: LogId, index: u64, data: &[u8]) -> Appended {
        let mut p = self.pending.lock();
        p.logs.entry(log).or_default().last_index = index;
        let lsn = self.push(&mut p, log, ENTRY, index, data);
        let m = p.max_index.entry(log).or_insert(0);
        *m = index.max(*m);
        self.wake_writer(p);
        Appended { lsn, index }
    }

    /// Drops the entries of `log` past `after`; its next entry gets `after + 1`. Returns
    /// the record's LSN. (A Raft log store needs it; the engine's own log never truncates.)
    pub(crate) fn truncate(&self, log: LogId, after: u64) -> u64 {
        let mut p = self.pending.lock();
        let tail = p.logs.entry(log).or_default();
        tail.last_index = tail.last_index.min(after);
        let lsn = self.push(&mut p, log, TRUNCATE, after, &[]);
        self.wake_writer(p);
        lsn
    }

    /// Marks the entries of `log` before `before` as no longer needed, so that segments
    /// holding only such entries can go ([`compact`](Self::compact)). Returns the record's
    /// LSN.
    pub(crate) fn purge(&self, log: LogId, before: u64) -> u64 {
        let mut p = self.pending.lock();
        let tail = p.logs.entry(log).or_default();
        tail.purged_before = tail.purged_before.max(before);
        tail.last_index = tail.last_index.max(before.saturating_sub(1));
        let lsn = self.push(&mut p, log, PURGE, before, &[]);
        self.wake_writer(p);
        lsn
    }

    /// Keeps `data` as the metadata of `log` (the last one written counts). Returns the
    /// record's LSN.
    pub(crate) fn set_meta(&self, log: LogId, data: &[u8]) -> u64 {
        let lsn = self.set_meta_lazily(log, data);
        self.wake_writer(self.pending.lock());
        lsn
    }

    /// As [`Wal::set_meta`], but the writer is not woken for it: the record is written
    /// with the next group commit that something else (an append, or a wait for
    /// durability) starts. For metadata nothing waits on (a Raft log's committed index),
    /// so that keeping it costs no `fdatasync` of its own. Returns the record's LSN.
    pub(crate) fn set_meta_lazily(&self, log: LogId, data: &[u8]) -> u64 {
        let mut p = self.pending.lock();
        p.logs.entry(log).or_default().meta = Some(data.to_vec());
        self.push(&mut p, log, META, 0, data)
    }

    /// The index of the last entry of `log` (0 when it has none).
    pub(crate) fn last_index(&self, log: LogId) -> u64 {
        self.pending
            .lock()
            .logs
            .get(&log)
            .map_or(0, |t| t.last_index)
    }

    /// The LSN of the last record appended.
    pub(crate) fn appended(&self) -> u64 {
        self.pending.lock().next_lsn - 1
    }

    /// How many times the writer made the log durable (`fdatasync` calls).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// How many of those made appends of more than one log durable at once.
    pub(crate) fn shared_syncs(&self) -> u64 {
        self.shared_syncs.load(Ordering::Relaxed)
    }

    fn check_failed(&self) -> Result<()> {
        match self.failure() {
            Some(reason) => Err(storage(&self.dir, reason)),
            None => Ok(()),
        }
    }

    /// Blocks until the log is durable up to `lsn`.
    pub(crate) fn wait_durable(&self, lsn: u64) -> Result<()> {
        if self.durable.load(Ordering::Acquire) < lsn {
            // What `lsn` names may have been added without waking the writer.
            self.wake_writer(self.pending.lock());
        }
        let mut guard = self.durable_lock.lock();
        while self.durable.load(Ordering::Acquire) < lsn {
            self.check_failed()?;
            self.durable_cv
                .wait_for(&mut guard, Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits (without blocking a thread) until the log is durable up to `lsn`.
    pub(crate) async fn durable(&self, lsn: u64) -> Result<()> {
        if self.durable.load(Ordering::Acquire) < lsn {
            // What `lsn` names may have been added without waking the writer.
            self.wake_writer(self.pending.lock());
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.durable.load(Ordering::Acquire) >= lsn {
                return Ok(());
            }
            self.check_failed()?;
            notified.await;
        }
    }

    /// Makes each `fdatasync` take `delay` longer from now on: the disk of a fault test
    /// turns slow (every append waits that much longer to become durable).
    pub(crate) fn slow_down(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.sync_delay_micros.store(micros, Ordering::Relaxed);
    }

    /// Makes the disk full once the writer wrote `bytes` more (the log then fails as it
    /// does on `ENOSPC`): the disk of a fault test fills up.
    pub(crate) fn fill_after(&self, bytes: u64) {
        self.room_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Takes room for `bytes` more from what a fault test's disk has left (only the
    /// writer takes room).
    fn take_room(&self, bytes: usize) -> std::io::Result<()> {
        let room = self.room_bytes.load(Ordering::Relaxed);
        if room == u64::MAX {
            return Ok(());
        }
        match room.checked_sub(bytes as u64) {
            Some(left) => {
                self.room_bytes.store(left, Ordering::Relaxed);
                Ok(())
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on the device (a fault test's full disk)",
            )),
        }
    }

    /// Why the log failed, once it did: nothing appended since becomes durable.
    pub(crate) fn failure(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) {
            return Some(self.failure.lock().clone().unwrap_or_default());
        }
        None
    }

    /// Completes once the log has failed (at once if it has), with why. Cancel-safe.
    pub(crate) async fn failed(&self) -> String {
        loop {
            let notified = self.on_failure.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.failure() {
                return reason;
            }
            notified.await;
        }
    }

    fn write_loop(&self, mut file: SegmentFile) {
        loop {
            let (batch, last_lsn, max_index) = {
                let mut p = self.pending.lock();
                while (p.buf.is_empty() || !p.wanted) && !p.shutdown {
                    self.work.wait(&mut p);
                }
                p.wanted = false;
                if self.failed.load(Ordering::Acquire) {
                    // Failed from outside (`LogHost::fail`): nothing more becomes durable.
                    return;
                }
                if p.buf.is_empty() {
                    drop(p);
                    // Shut down: whatever is appended from now on never becomes durable,
                    // and waiting for it fails at once.
                    self.fail("the log was closed".into());
                    return;
                }
                (
                    std::mem::take(&mut p.buf),
                    p.next_lsn - 1,
                    std::mem::take(&mut p.max_index),
                )
            };
            let started = std::time::Instant::now();
            let written = self
                .take_room(batch.len())
                .and_then(|()| file.append(&batch, self.preallocate()))
                .and_then(|()| file.file.sync_data());
            let delay = self.sync_delay_micros.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_micros(delay));
            }
            // No-ops unless the process installed a metrics recorder (a node's admin
            // listener does).
            metrics::histogram!("space_log_fsync_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("space_log_batch_bytes").record(batch.len() as f64);
            if let Err(e) = written {
                // Nothing is acknowledged past this point: every waiter gets the error.
                self.fail(format!("writing the write-ahead log failed: {e}"));
                tracing::error!(error = %e, dir = %self.dir.display(), "the write-ahead log cannot be written");
                return;
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
            if max_index.len() > 1 {
                self.shared_syncs.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(current) = self.segments.lock().last_mut() {
                for (log, index) in max_index {
                    let m = current.max_index.entry(log).or_insert(0);
                    *m = index.max(*m);
                }
            }
            let appended = last_lsn.saturating_sub(self.durable.load(Ordering::Acquire));
            metrics::counter!("space_log_appends_total").increment(appended);
            self.durable.store(last_lsn, Ordering::Release);
            self.wake_waiters();
            if let Some(f) = &*self.on_written.lock() {
                f(batch.len() as u64);
            }
            if file.end > self.segment_bytes {
                let first = last_lsn + 1;
                match self.new_segment(first) {
                    Ok(f) => {
                        file = f;
                        self.segments.lock().push(Segment {
                            first_lsn: first,
                            path: self.dir.join(segment_name(first)),
                            max_index: HashMap::new(),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a new log segment; continuing this one")
                    }
                }
            }
        }
    }

    /// From now on, waiting for durability fails with `reason` (the first one given).
    pub(crate) fn fail(&self, reason: String) {
        self.failure.lock().get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
        self.wake_waiters();
        self.on_failure.notify_waiters();
    }

    fn wake_waiters(&self) {
        let _guard = self.durable_lock.lock();
        self.durable_cv.notify_all();
        self.notify.notify_waiters();
    }

    /// Deletes the oldest segments whose entries every log has purged. The purge mark and
    /// metadata of every log are written again (and made durable) first, so that they
    /// outlive the segments that held them. Returns how many segments went.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written or a file deleted.
    pub(crate) fn compact(&self) -> Result<usize> {
        let tails: HashMap<LogId, Tail> = self.pending.lock().logs.clone();
        // The closed segments at the front that hold nothing any log still needs. Counted
        // again just before deleting: another compaction may have deleted some meanwhile.
        let dead_in = |segments: &[Segment]| {
            let closed = segments.len().saturating_sub(1);
            segments[..closed]
                .iter()
                .take_while(|s| {
                    s.max_index
                        .iter()
                        .all(|(log, max)| tails.get(log).is_some_and(|t| *max < t.purged_before))
                })
                .count()
        };
        if dead_in(&self.segments.lock()) == 0 {
            return Ok(0);
        }
        let mut last = 0;
        for (log, tail) in &tails {
            if tail.purged_before > 0 {
                last = self.purge(*log, tail.purged_before);
            }
            if let Some(meta) = &tail.meta {
                last = self.set_meta(*log, meta);
            }
        }
        self.wait_durable(last)?;
        let gone: Vec<Segment> = {
            let mut segments = self.segments.lock();
            // The segment being written is never among them, whatever its records.
            let dead = dead_in(&segments);
            segments.drain(..dead).collect()
        };
        for s in &gone {
            fs::remove_file(&s.path).map_err(|e| storage(&s.path, e))?;
        }
        sync_dir(&self.dir)?;
        tracing::debug!(
            segments = gone.len(),
            first = gone.first().map(|s| s.first_lsn),
            "write-ahead log compacted"
        );
        Ok(gone.len())
    }

    /// Stops the writer once what is pending is written.
    pub(crate) fn shutdown(&self) {
        self.pending.lock().shutdown = true;
        self.work.notify_all();
    }

    /// Stops the writer once what is pending is written, and waits for it; from then on
    /// waiting for durability fails instead of waiting forever.
    pub(crate) fn close(&self) {
        self.shutdown();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        self.fail("the log was closed".into());
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "space-wal-{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn data(log: LogId, i: u64) -> Vec<u8> {
        format!("log {log} entry {i}").into_bytes()
    }

    fn expect(log: &LogContents, range: std::ops::RangeInclusive<u64>, id: LogId) {
        let want: BTreeMap<u64, Vec<u8>> = range.map(|i| (i, data(id, i))).collect();
        assert_eq!(log.entries, want, "log {id}");
    }

    #[test]
    fn frames_round_trip_and_stop_at_damage() {
        let mut buf = Vec::new();
        frame(&mut buf, 1, &[b"one"]);
        frame(&mut buf, 2, &[b"t", b"wo"]);
        let whole = buf.len();
        frame(&mut buf, 3, &[b"three"]);
        let (f, valid, problem) = frames(&buf);
        assert_eq!((f.len(), valid, problem), (3, buf.len(), None));
        assert_eq!(f[1], (2, &b"two"[..]));
        let torn = &buf[..buf.len() - 2];
        let (f, valid, problem) = frames(torn);
        assert_eq!((f.len(), valid), (2, whole));
        assert!(problem.unwrap().contains("past the end"));
        let mut flipped = buf.clone();
        flipped[whole + 20] ^= 1;
        let (f, _, problem) = frames(&flipped);
        assert_eq!(f.len(), 2);
        assert!(problem.unwrap().contains("checksum"));
    }

    /// Many logs append at once from many threads; one fdatasync covers what all of them
    /// appended meanwhile; each log comes back exactly.
    #[test]
    fn many_logs_share_one_group_commit() {
        let dir = Dir::new("group");
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        assert!(logs.is_empty());
        const LOGS: u32 = 8;
        const EACH: u64 = 500;
        std::thread::scope(|s| {
            for log in 0..LOGS {
                let wal = &wal;
                s.spawn(move || {
                    for i in 1..=EACH {
                        let at = wal.append(log, &data(log, i));
                        assert_eq!(at.index, i);
                        if i % 50 == 0 {
                            wal.wait_durable(at.lsn).unwrap();
                        }
                    }
                });
            }
        });
        wal.wait_durable(wal.appended()).unwrap();
        let appends = u64::from(LOGS) * EACH;
        let syncs = wal.syncs();
        assert!(
            syncs * 10 < appends,
            "{syncs} fdatasyncs for {appends} appends: appends are not grouped"
        );
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(logs.len(), LOGS as usize);
        for (id, log) in &logs {
            expect(log, 1..=EACH, *id);
            assert_eq!(log.last_index, EACH);
        }
        // Appending goes on after the last index of each log.
        assert_eq!(wal.append(3, b"next").index, EACH + 1);
        wal.close();
    }

    /// A slowed disk (fault tests): an append becomes durable only once the slower
    /// `fdatasync` is over, and what it wrote comes back as written.
    #[test]
    fn a_slowed_disk_makes_appends_wait_for_it() {
        let dir = Dir::new("slow");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        let delay = std::time::Duration::from_millis(200);
        wal.slow_down(delay);
        let started = std::time::Instant::now();
        let at = wal.append(1, &data(1, 1));
        wal.wait_durable(at.lsn).unwrap();
        assert!(
            started.elapsed() >= delay,
            "durable after {:?}, before the slowed fdatasync ended",
            started.elapsed()
        );
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        expect(&logs[&1], 1..=1, 1);
        wal.close();
    }

    /// Truncate, purge and metadata are per log and survive a restart; entries written
    /// again after a truncate replace the old ones.
    #[test]
    fn truncate_purge_and_metadata_are_kept_per_log() {
        let dir = Dir::new("marks");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        for i in 1..=10 {
            wal.append(1, b"old");
            if i <= 5 {
                wal.append(2, &data(2, i));
            }
        }
        wal.truncate(1, 6);
        for i in 7..=9 {
            assert_eq!(wal.append(1, &data(1, i)).index, i);
        }
        wal.purge(1, 4);
        wal.set_meta(1, b"vote 1");
        wal.set_meta(2, b"vote 7");
        wal.set_meta(1, b"vote 2, committed 8");
        wal.wait_durable(wal.appended()).unwrap();
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        let one = &logs[&1];
        let mut want: BTreeMap<u64, Vec<u8>> = (4..=6).map(|i| (i, b"old".to_vec())).collect();
        want.extend((7..=9).map(|i| (i, data(1, i))));
        assert_eq!(one.entries, want);
        assert_eq!((one.purged_before, one.last_index), (4, 9), "log 1 marks");
        assert_eq!(one.meta.as_deref(), Some(&b"vote 2, committed 8"[..]));
        let two = &logs[&2];
        expect(two, 1..=5, 2);
        assert_eq!(two.meta.as_deref(), Some(&b"vote 7"[..]));
        assert_eq!(wal.append(1, b"x").index, 10);
        assert_eq!(wal.append(2, b"x").index, 6);
        wal.close();
    }

    /// A crash in the middle of a record: that record (whatever its log) is gone, every
    /// log keeps all that came before it, and appending goes on from there.
    #[test]
    fn a_torn_tail_loses_only_the_last_record_of_any_log() {
        let dir = Dir::new("torn");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        for i in 1..=10 {
            wal.append(1, &data(1, i));
            wal.append(2, &data(2, i));
        }
        wal.wait_durable(wal.appended()).unwrap();
        wal.close();
        let (_, path) = numbered(&dir.0, "wal-", ".log").unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let (_, valid, problem) = segment_frames(&bytes[16..]);
        assert_eq!(problem, None);
        assert!(
            bytes.len() > 16 + valid,
            "zeros are written ahead of the last frame"
        );
        // The last record's last bytes never reached the disk: zeros where they were.
        bytes[16 + valid - 3..16 + valid].fill(0);
        fs::write(&path, &bytes).unwrap();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        expect(&logs[&1], 1..=10, 1);
        expect(&logs[&2], 1..=9, 2);
        assert_eq!(wal.append(2, &data(2, 10)).index, 10);
        wal.wait_durable(wal.appended()).unwrap();
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        expect(&logs[&2], 1..=10, 2);
        wal.close();
    }

    /// Appends go into zeros written ahead, so a group commit leaves the file's size (its
    /// metadata) as it was, until the zeros run out and more are written at once.
    #[test]
    fn appends_fill_zeros_written_ahead() {
        let dir = Dir::new("ahead");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        let (_, path) = numbered(&dir.0, "wal-", ".log").unwrap().pop().unwrap();
        let created = fs::metadata(&path).unwrap().len();
        assert_eq!(created, 16 + PREALLOCATE_BYTES);
        for i in 1..=100 {
            wal.append(1, &data(1, i));
            wal.wait_durable(wal.appended()).unwrap();
        }
        assert_eq!(fs::metadata(&path).unwrap().len(), created);
        let big = vec![7u8; PREALLOCATE_BYTES as usize];
        wal.append(1, &big);
        wal.wait_durable(wal.appended()).unwrap();
        let grown = fs::metadata(&path).unwrap().len();
        assert!(grown > created + PREALLOCATE_BYTES, "{grown}");
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(logs[&1].last_index, 101);
        wal.close();
    }

    /// Metadata kept lazily starts no group commit of its own, not even when the writer
    /// is still finishing the previous one; the next append's carries it, and waiting for
    /// it starts one.
    #[test]
    fn lazy_metadata_rides_with_the_next_group_commit() {
        let dir = Dir::new("lazy");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, b"a");
        wal.wait_durable(wal.appended()).unwrap();
        let syncs = wal.syncs();
        let lazy = wal.set_meta_lazily(1, b"committed 1");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(wal.syncs(), syncs, "lazy metadata woke the writer");
        assert!(wal.durable.load(Ordering::Acquire) < lazy);
        wal.append(1, b"b");
        wal.wait_durable(wal.appended()).unwrap();
        assert_eq!(wal.syncs(), syncs + 1);
        // Kept while the writer is still finishing a group commit (held there by its
        // hook), it waits for the next one all the same.
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let held_rx = Mutex::new(held_rx);
        wal.on_written(move |_| {
            let _ = held_rx.lock().recv_timeout(Duration::from_secs(5));
        });
        wal.append(1, b"c");
        wal.wait_durable(wal.appended()).unwrap();
        let syncs = wal.syncs();
        wal.set_meta_lazily(1, b"kept while the writer is busy");
        held_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            wal.syncs(),
            syncs,
            "lazy metadata had a group commit of its own"
        );
        drop(held_tx);
        // Waited for on its own, it is written at once.
        let lazy = wal.set_meta_lazily(1, b"committed 2");
        wal.wait_durable(lazy).unwrap();
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(logs[&1].meta.as_deref(), Some(&b"committed 2"[..]));
        wal.close();
    }

    /// Zeros followed by anything else are damage, not room written ahead.
    #[test]
    fn bytes_after_the_zeros_are_damage() {
        let mut bytes = Vec::new();
        frame(&mut bytes, 1, &[&record_header(1, ENTRY, 1), b"x"]);
        let whole = bytes.len();
        bytes.extend_from_slice(&[0; 64]);
        assert_eq!(segment_frames(&bytes).1, whole);
        assert_eq!(segment_frames(&bytes).2, None);
        bytes.push(1);
        let (f, valid, problem) = segment_frames(&bytes);
        assert_eq!((f.len(), valid), (1, whole));
        assert!(problem.is_some());
    }

    /// Segments go only once every log has purged what they hold; purge marks and
    /// metadata outlive them.
    #[test]
    fn compaction_waits_for_every_log() {
        let dir = Dir::new("compact");
        let (wal, _) = Wal::open(&dir.0, 4096).unwrap();
        for i in 1..=400 {
            wal.append(1, &data(1, i));
            wal.append(2, &data(2, i));
            if i % 20 == 0 {
                wal.wait_durable(wal.appended()).unwrap();
            }
        }
        wal.set_meta(2, b"term 3");
        wal.wait_durable(wal.appended()).unwrap();
        let segment_numbers = || -> Vec<u64> {
            numbered(&dir.0, "wal-", ".log")
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        let segments = segment_numbers().len();
        assert!(segments > 3, "{segments} segments");
        // Log 1 no longer needs its entries, log 2 still does: nothing goes.
        wal.purge(1, 401);
        assert_eq!(wal.compact().unwrap(), 0);
        // Now log 2 needs only its last 50.
        wal.purge(2, 351);
        let before = segment_numbers();
        let gone = wal.compact().unwrap();
        assert!(gone > 0);
        // The oldest `gone` segments are deleted and every other one is kept. (Compaction
        // first writes the purge marks and metadata again, which may open a new segment.)
        let after = segment_numbers();
        assert!(
            before[..gone].iter().all(|n| !after.contains(n)),
            "{before:?} -> {after:?}"
        );
        assert!(
            before[gone..].iter().all(|n| after.contains(n)),
            "{before:?} -> {after:?}"
        );
        assert!(
            after.len() <= before.len() - gone + 1,
            "{before:?} -> {after:?}"
        );
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, 4096).unwrap();
        let one = &logs[&1];
        assert!(one.entries.is_empty());
        assert_eq!((one.purged_before, one.last_index), (401, 400));
        expect(&logs[&2], 351..=400, 2);
        assert_eq!(logs[&2].meta.as_deref(), Some(&b"term 3"[..]));
        assert_eq!(wal.append(1, b"x").index, 401);
        wal.close();
    }

    /// Two compactions at once (checkpoints of two logs on one host) delete each dead
    /// segment once, and never one that a log still needs.
    #[test]
    fn compactions_at_the_same_time_delete_only_dead_segments() {
        let dir = Dir::new("compact-twice");
        let (wal, _) = Wal::open(&dir.0, 4096).unwrap();
        let mut kept_from = 1;
        for round in 0..20u64 {
            for i in round * 100 + 1..=round * 100 + 100 {
                wal.append(1, &data(1, i));
            }
            wal.wait_durable(wal.appended()).unwrap();
            // The log needs only its last 20 entries.
            kept_from = round * 100 + 81;
            wal.purge(1, kept_from);
            std::thread::scope(|s| {
                let a = s.spawn(|| wal.compact());
                let b = s.spawn(|| wal.compact());
                a.join().unwrap().unwrap();
                b.join().unwrap().unwrap();
            });
        }
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, 4096).unwrap();
        expect(&logs[&1], kept_from..=2000, 1);
        wal.close();
    }

    /// A session that wrote nothing leaves a segment with only its header; the next one
    /// writes a segment of the same name, which compaction must never take for an old one.
    #[test]
    fn an_empty_segment_is_not_mistaken_for_an_old_one() {
        let dir = Dir::new("empty");
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &data(1, 1));
        wal.purge(1, 2);
        wal.wait_durable(wal.appended()).unwrap();
        wal.close();
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        wal.close();
        let (wal, _) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &data(1, 2));
        wal.purge(1, 2);
        wal.wait_durable(wal.appended()).unwrap();
        wal.compact().unwrap();
        wal.close();
        let (wal, logs) = Wal::open(&dir.0, DEFAULT_SEGMENT_BYTES).unwrap();
        expect(&logs[&1], 2..=2, 1);
        wal.close();
    }
}
