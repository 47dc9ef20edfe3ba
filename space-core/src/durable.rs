//! Durability: the operation log with group commit, snapshots, and recovery.
//!
//! Every [`Command`] (see [`crate::state`]) is appended, under its entry type's lock and
//! just before it is applied, to the operation log with a log sequence number (LSN),
//! tagged with its entry type. A writer thread writes what has accumulated and makes it
//! durable with one `fdatasync`, so concurrent operations share one sync (group commit); an
//! operation is acknowledged only once the log is durable up to its commands. The log is a
//! directory of segment files (`wal-<first lsn>.log`); each record is framed as
//! `[len u32][crc32 u32][lsn u64][postcard payload]`.
//!
//! Now and then a snapshot (`snapshot-<lsn>.snap`) is written: every entry type's store,
//! each taken under its lock together with the LSN of the log at that moment (the type's
//! *cut*), and the answer table. Segments whose records all fall under every cut are then
//! deleted, so the log stays bounded. Recovery loads the newest snapshot and hands the
//! engine the commands above each type's cut, which it replays through the same `apply`
//! as live operations; a torn tail of the last segment is truncated. What lapsed while the
//! node was down is then expired by commands the engine's timer decides, like any expiry.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use space_query::ValueKind;

use crate::entry::NodeId;
use crate::error::{Result, SpaceError};
use crate::state::{Answers, Command};
use crate::store::Record;

/// A segment is closed and a new one started past this size, by default.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// A snapshot is taken once the log has grown by this much since the last one (or by the
/// size of the last snapshot, if that is larger), by default.
pub const DEFAULT_SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;

/// How the log is cut into segments and compacted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogLimits {
    pub(crate) segment_bytes: u64,
    pub(crate) snapshot_after_bytes: u64,
}
const WAL_MAGIC: &[u8; 8] = b"SPCWAL02";
const SNAP_MAGIC: &[u8; 8] = b"SPCSNAP2";

/// One log record as written: a command on one entry type (borrowed, so that appending
/// copies nothing but the encoding).
#[derive(Serialize)]
struct RecordRef<'a> {
    entry_type: &'a str,
    command: &'a Command,
}

/// One log record as read back.
#[derive(Deserialize)]
struct LogRecord {
    entry_type: String,
    command: Command,
}

fn storage(path: &Path, what: impl std::fmt::Display) -> SpaceError {
    SpaceError::Storage {
        path: path.display().to_string(),
        reason: what.to_string(),
    }
}

fn frame(buf: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    crc.update(payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// What reading a file's frames found.
type Framed<'a> = (Vec<(u64, &'a [u8])>, usize, Option<String>);

/// The frames of `bytes` (after a file's header): `(lsn, payload)`, how many bytes were
/// whole and valid, and what stopped the reading early, if anything did.
fn frames(bytes: &[u8]) -> Framed<'_> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < 16 {
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
        let end = at + 16 + len;
        if end > bytes.len() {
            return (
                out,
                at,
                Some(format!(
                    "a frame at byte {at} runs past the end of the file"
                )),
            );
        }
        let payload = &bytes[at + 16..end];
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

fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.log")
}

fn snapshot_name(lsn: u64) -> String {
    format!("snapshot-{lsn:020}.snap")
}

fn number_in(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// Numbered files of one kind, sorted by number.
type Numbered = Vec<(u64, PathBuf)>;

/// The log segments and snapshots of a data directory, sorted.
fn listing(dir: &Path) -> Result<(Numbered, Numbered)> {
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))? {
        let entry = entry.map_err(|e| storage(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = number_in(&name, "wal-", ".log") {
            segments.push((n, entry.path()));
        } else if let Some(n) = number_in(&name, "snapshot-", ".snap") {
            snapshots.push((n, entry.path()));
        }
    }
    segments.sort();
    snapshots.sort();
    Ok((segments, snapshots))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| storage(dir, e))
}

// ---------------------------------------------------------------------------------------
// The log.

struct Pending {
    buf: Vec<u8>,
    next_lsn: u64,
    shutdown: bool,
}

/// The operation log: appends under the entry types' locks, made durable by a writer thread
/// in groups.
pub(crate) struct Wal {
    dir: PathBuf,
    limits: LogLimits,
    pending: Mutex<Pending>,
    work: Condvar,
    durable: AtomicU64,
    durable_lock: Mutex<()>,
    durable_cv: Condvar,
    notify: tokio::sync::Notify,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Bytes appended since the last snapshot, and the size of that snapshot.
    since_snapshot: AtomicU64,
    last_snapshot_bytes: AtomicU64,
    /// Set when a snapshot is due; the checkpointer waits on it.
    snapshot_due: Mutex<bool>,
    snapshot_cv: Condvar,
    /// The writer thread, joined by [`close`](Self::close).
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Wal {
    /// Opens the log for appending in `dir`, continuing at `next_lsn`.
    fn start(dir: &Path, next_lsn: u64, limits: LogLimits) -> Result<Arc<Wal>> {
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            limits,
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                next_lsn,
                shutdown: false,
            }),
            work: Condvar::new(),
            durable: AtomicU64::new(next_lsn.saturating_sub(1)),
            durable_lock: Mutex::new(()),
            durable_cv: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            since_snapshot: AtomicU64::new(0),
            last_snapshot_bytes: AtomicU64::new(0),
            snapshot_due: Mutex::new(false),
            snapshot_cv: Condvar::new(),
            writer: Mutex::new(None),
        });
        let file = Self::new_segment(dir, next_lsn)?;
        let writer = wal.clone();
        let thread = std::thread::Builder::new()
            .name("space-wal".into())
            .spawn(move || writer.write_loop(file, next_lsn))
            .map_err(|e| storage(dir, format!("cannot start the log writer: {e}")))?;
        *wal.writer.lock() = Some(thread);
        Ok(wal)
    }

    /// Stops the writer once what is pending is written, and waits for it; from then on
    /// waiting for durability fails instead of waiting forever.
    pub(crate) fn close(&self) {
        self.shutdown();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        if self.failure.lock().is_none() {
            *self.failure.lock() = Some("the space was closed".into());
        }
        self.failed.store(true, Ordering::Release);
        self.wake_waiters();
    }

    fn new_segment(dir: &Path, first_lsn: u64) -> Result<File> {
        let path = dir.join(segment_name(first_lsn));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| storage(&path, e))?;
        let mut header = WAL_MAGIC.to_vec();
        header.extend_from_slice(&first_lsn.to_le_bytes());
        file.write_all(&header).map_err(|e| storage(&path, e))?;
        file.sync_all().map_err(|e| storage(&path, e))?;
        sync_dir(dir)?;
        Ok(file)
    }

    /// Appends a command on `entry_type`; returns its LSN. Called under the entry type's
    /// lock, so the commands of one type are in the log in the order they are applied.
    pub(crate) fn append(&self, entry_type: &str, command: &Command) -> u64 {
        let payload = postcard::to_stdvec(&RecordRef {
            entry_type,
            command,
        })
        .unwrap_or_default();
        let mut p = self.pending.lock();
        let lsn = p.next_lsn;
        p.next_lsn += 1;
        frame(&mut p.buf, lsn, &payload);
        drop(p);
        self.work.notify_one();
        lsn
    }

    /// The LSN of the last record appended.
    pub(crate) fn appended(&self) -> u64 {
        self.pending.lock().next_lsn - 1
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            let reason = self.failure.lock().clone().unwrap_or_default();
            return Err(storage(&self.dir, reason));
        }
        Ok(())
    }

    /// Blocks until the log is durable up to `lsn`.
    pub(crate) fn wait_durable(&self, lsn: u64) -> Result<()> {
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

    fn write_loop(&self, mut file: File, mut segment_first: u64) {
        let mut segment_bytes = 16u64;
        loop {
            let (batch, last_lsn) = {
                let mut p = self.pending.lock();
                while p.buf.is_empty() && !p.shutdown {
                    self.work.wait(&mut p);
                }
                if p.buf.is_empty() {
                    return;
                }
                (std::mem::take(&mut p.buf), p.next_lsn - 1)
            };
            let written = file.write_all(&batch).and_then(|()| file.sync_data());
            if let Err(e) = written {
                // Nothing is acknowledged past this point: every waiter gets the error.
                *self.failure.lock() = Some(format!("writing the operation log failed: {e}"));
                self.failed.store(true, Ordering::Release);
                self.wake_waiters();
                tracing::error!(error = %e, dir = %self.dir.display(), "the operation log cannot be written");
                return;
            }
            self.durable.store(last_lsn, Ordering::Release);
            self.wake_waiters();
            segment_bytes += batch.len() as u64;
            let since = self
                .since_snapshot
                .fetch_add(batch.len() as u64, Ordering::Relaxed)
                + batch.len() as u64;
            if since
                > self
                    .limits
                    .snapshot_after_bytes
                    .max(self.last_snapshot_bytes.load(Ordering::Relaxed))
            {
                *self.snapshot_due.lock() = true;
                self.snapshot_cv.notify_one();
            }
            if segment_bytes > self.limits.segment_bytes {
                match Self::new_segment(&self.dir, last_lsn + 1) {
                    Ok(f) => {
                        file = f;
                        segment_first = last_lsn + 1;
                        segment_bytes = 16;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, segment = segment_first, "cannot start a new log segment; continuing this one")
                    }
                }
            }
        }
    }

    fn wake_waiters(&self) {
        let _guard = self.durable_lock.lock();
        self.durable_cv.notify_all();
        self.notify.notify_waiters();
    }

    /// Stops the writer once what is pending is written.
    pub(crate) fn shutdown(&self) {
        self.pending.lock().shutdown = true;
        self.work.notify_all();
        *self.snapshot_due.lock() = true;
        self.snapshot_cv.notify_all();
    }

    /// Blocks until a snapshot is due; `false` when the log shuts down.
    pub(crate) fn wait_snapshot_due(&self) -> bool {
        let mut due = self.snapshot_due.lock();
        while !*due {
            self.snapshot_cv.wait(&mut due);
        }
        *due = false;
        !self.pending.lock().shutdown
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes a snapshot of `bytes` just written: the log's growth counts from here.
    pub(crate) fn snapshot_written(&self, bytes: u64) {
        self.since_snapshot.store(0, Ordering::Relaxed);
        self.last_snapshot_bytes.store(bytes, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots.

/// One entry type's state in a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TypeImage {
    pub(crate) entry_type: String,
    pub(crate) next_seq: u64,
    pub(crate) indexes: Vec<String>,
    pub(crate) schema: Vec<(String, ValueKind)>,
    /// Commands on this type with an LSN at or below it are in this image.
    pub(crate) cut: u64,
    pub(crate) records: Vec<(u64, Record)>,
}

#[derive(Serialize, Deserialize)]
enum SnapshotFrame {
    Header {
        next_token: u64,
        node: NodeId,
        floor: u64,
    },
    Type {
        entry_type: String,
        next_seq: u64,
        indexes: Vec<String>,
        schema: Vec<(String, ValueKind)>,
        cut: u64,
        count: u64,
    },
    Entry {
        seq: u64,
        record: Record,
    },
    Answers(Answers),
    End {
        types: u64,
        entries: u64,
    },
}

/// What a snapshot holds (see [`write_snapshot`]).
pub(crate) struct Snapshot {
    pub(crate) next_token: u64,
    pub(crate) types: Vec<TypeImage>,
    pub(crate) answers: Answers,
    /// Log segments entirely below this LSN are no longer needed.
    pub(crate) floor: u64,
}

/// Writes a snapshot; `floor` is an LSN at or below every type's cut (log segments
/// entirely below it can go). Returns the snapshot's size in bytes.
pub(crate) fn write_snapshot(dir: &Path, snapshot: &Snapshot, node: NodeId) -> Result<u64> {
    let mut buf = SNAP_MAGIC.to_vec();
    let mut n = 0u64;
    let mut put = |buf: &mut Vec<u8>, f: &SnapshotFrame| {
        n += 1;
        frame(buf, n, &postcard::to_stdvec(f).unwrap_or_default());
    };
    put(
        &mut buf,
        &SnapshotFrame::Header {
            next_token: snapshot.next_token,
            node,
            floor: snapshot.floor,
        },
    );
    let mut entries = 0u64;
    for t in &snapshot.types {
        put(
            &mut buf,
            &SnapshotFrame::Type {
                entry_type: t.entry_type.clone(),
                next_seq: t.next_seq,
                indexes: t.indexes.clone(),
                schema: t.schema.clone(),
                cut: t.cut,
                count: t.records.len() as u64,
            },
        );
        for (seq, record) in &t.records {
            put(
                &mut buf,
                &SnapshotFrame::Entry {
                    seq: *seq,
                    record: record.clone(),
                },
            );
            entries += 1;
        }
    }
    put(&mut buf, &SnapshotFrame::Answers(snapshot.answers.clone()));
    put(
        &mut buf,
        &SnapshotFrame::End {
            types: snapshot.types.len() as u64,
            entries,
        },
    );
    let path = dir.join(snapshot_name(snapshot.floor));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(snapshot.floor)));
    let mut f = File::create(&tmp).map_err(|e| storage(&tmp, e))?;
    f.write_all(&buf)
        .and_then(|()| f.sync_all())
        .map_err(|e| storage(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| storage(&path, e))?;
    sync_dir(dir)?;
    Ok(buf.len() as u64)
}

fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| storage(path, e))?;
    if bytes.len() < 8 || &bytes[..8] != SNAP_MAGIC {
        return Err(storage(
            path,
            "not a space snapshot (bad magic): a foreign or damaged file",
        ));
    }
    let (frames, _, problem) = frames(&bytes[8..]);
    if let Some(p) = problem {
        return Err(storage(path, format!("corrupt snapshot: {p}")));
    }
    let mut snap = Snapshot {
        next_token: 1,
        types: Vec::new(),
        answers: Answers::default(),
        floor: 0,
    };
    let mut ended = false;
    for (_, payload) in frames {
        let f: SnapshotFrame = postcard::from_bytes(payload)
            .map_err(|e| storage(path, format!("corrupt snapshot frame: {e}")))?;
        match f {
            SnapshotFrame::Header {
                next_token, floor, ..
            } => {
                snap.next_token = next_token;
                snap.floor = floor;
            }
            SnapshotFrame::Type {
                entry_type,
                next_seq,
                indexes,
                schema,
                cut,
                count,
            } => snap.types.push(TypeImage {
                entry_type,
                next_seq,
                indexes,
                schema,
                cut,
                records: Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 16)),
            }),
            SnapshotFrame::Entry { seq, record } => match snap.types.last_mut() {
                Some(t) => t.records.push((seq, record)),
                None => {
                    return Err(storage(
                        path,
                        "corrupt snapshot: an entry before any entry type",
                    ));
                }
            },
            SnapshotFrame::Answers(answers) => snap.answers = answers,
            SnapshotFrame::End { entries, .. } => {
                let got: u64 = snap.types.iter().map(|t| t.records.len() as u64).sum();
                if got != entries {
                    return Err(storage(
                        path,
                        format!("corrupt snapshot: {got} entries, the end says {entries}"),
                    ));
                }
                ended = true;
            }
        }
    }
    if !ended {
        return Err(storage(path, "incomplete snapshot: no end frame"));
    }
    Ok(snap)
}

// ---------------------------------------------------------------------------------------
// Recovery.

/// What recovery hands the engine: the newest snapshot, and the commands logged after
/// it, to be replayed through [`apply`](crate::state::apply) in log order.
pub(crate) struct Recovered {
    pub(crate) snapshot: Snapshot,
    /// `(lsn, entry type, command)`, oldest first; only commands above their type's cut.
    pub(crate) commands: Vec<(u64, String, Command)>,
    pub(crate) wal: Arc<Wal>,
    pub(crate) lock: File,
}

/// Opens a data directory: locks it, loads the newest snapshot, reads the log after it,
/// truncates a torn tail, and starts the log for appending.
///
/// # Errors
/// [`SpaceError::Storage`] naming the file, for a directory in use by another process, a
/// foreign or corrupt snapshot or segment, or an I/O failure.
pub(crate) fn recover(dir: &Path, limits: LogLimits) -> Result<Recovered> {
    fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| storage(&lock_path, e))?;
    lock.try_lock().map_err(|_| {
        storage(
            &lock_path,
            "the data directory is in use by another process",
        )
    })?;
    let (segments, snapshots) = listing(dir)?;
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))?.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            // An interrupted snapshot: never valid, never referenced.
            let _ = fs::remove_file(entry.path());
        }
    }
    let snapshot = match snapshots.last() {
        Some((_, path)) => read_snapshot(path)?,
        None => Snapshot {
            next_token: 1,
            types: Vec::new(),
            answers: Answers::default(),
            floor: 0,
        },
    };
    let cuts: HashMap<&str, u64> = snapshot
        .types
        .iter()
        .map(|t| (t.entry_type.as_str(), t.cut))
        .collect();
    let mut last_lsn = cuts
        .values()
        .copied()
        .max()
        .unwrap_or(0)
        .max(snapshot.floor);
    let mut commands = Vec::new();
    for (i, (first, path)) in segments.iter().enumerate() {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| storage(path, e))?;
        let is_last = i + 1 == segments.len();
        if bytes.len() < 16 || &bytes[..8] != WAL_MAGIC {
            if is_last && bytes.len() < 16 && WAL_MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
                // Created but never written past its header: nothing to replay.
                continue;
            }
            return Err(storage(
                path,
                "not a space log segment (bad magic): a foreign or damaged file",
            ));
        }
        let (frames, valid, problem) = frames(&bytes[16..]);
        if let Some(p) = problem {
            if !is_last {
                return Err(storage(path, format!("corrupt log segment: {p}")));
            }
            // A torn tail: the last writes before a crash. They were never acknowledged.
            tracing::warn!(file = %path.display(), problem = %p, "truncating a torn tail of the operation log");
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| storage(path, e))?;
            f.set_len((16 + valid) as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| storage(path, e))?;
        }
        for (lsn, payload) in frames {
            if lsn < *first {
                return Err(storage(
                    path,
                    format!("corrupt log segment: record {lsn} before the segment's first {first}"),
                ));
            }
            let record: LogRecord = postcard::from_bytes(payload)
                .map_err(|e| storage(path, format!("corrupt log record {lsn}: {e}")))?;
            last_lsn = last_lsn.max(lsn);
            if lsn <= cuts.get(record.entry_type.as_str()).copied().unwrap_or(0) {
                continue;
            }
            commands.push((lsn, record.entry_type, record.command));
        }
    }
    let wal = Wal::start(dir, last_lsn + 1, limits)?;
    Ok(Recovered {
        snapshot,
        commands,
        wal,
        lock,
    })
}

/// After a snapshot at `floor`: removes the segments entirely below it and older snapshots.
pub(crate) fn compact(dir: &Path, floor: u64) -> Result<()> {
    let (segments, snapshots) = listing(dir)?;
    for w in segments.windows(2) {
        let (_, path) = &w[0];
        let (next_first, _) = w[1];
        if next_first <= floor + 1 {
            fs::remove_file(path).map_err(|e| storage(path, e))?;
        }
    }
    for (lsn, path) in &snapshots {
        if *lsn < floor {
            fs::remove_file(path).map_err(|e| storage(path, e))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_stop_at_damage() {
        let mut buf = Vec::new();
        frame(&mut buf, 1, b"one");
        frame(&mut buf, 2, b"two");
        let whole = buf.len();
        frame(&mut buf, 3, b"three");
        let (f, valid, problem) = frames(&buf);
        assert_eq!((f.len(), valid, problem), (3, buf.len(), None));
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
}
