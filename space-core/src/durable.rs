//! Durability of the engine: its log on the node's write-ahead log, snapshots, recovery.
//!
//! The engine is one log (`ENGINE_LOG`) on the node's shared write-ahead log
//! ([`crate::wal`]). Every [`Command`] (see [`crate::state`]) is appended there, under its
//! entry type's lock and just before it is applied, tagged with its entry type; it gets
//! the log's next index. An operation is acknowledged only once the write-ahead log is
//! durable up to its commands (group commit).
//!
//! Now and then a snapshot (`snapshot-<index>.snap`) is written: every entry type's store,
//! each taken under its lock together with the log's index at that moment (the type's
//! *cut*), and the answer table. The entries up to the lowest cut are then purged, and the
//! write-ahead log deletes segments nothing needs any more. Recovery loads the newest
//! snapshot and hands the engine the commands above each type's cut, which it replays
//! through the same `apply` as live operations. What lapsed while the node was down is
//! then expired by commands the engine's timer decides, like any expiry.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use space_query::ValueKind;

use crate::entry::NodeId;
use crate::error::Result;
use crate::lease::Deadline;
use crate::state::{Answers, Command, LoggedSubscription};
use crate::store::Record;
use crate::wal::{LogContents, LogId, Wal, frame, frames, numbered, storage, sync_dir};

pub use crate::wal::DEFAULT_SEGMENT_BYTES;

/// A snapshot is taken once the log has grown by this much since the last one (or by the
/// size of the last snapshot, if that is larger), by default.
pub const DEFAULT_SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;

/// The engine's log among those on the node's write-ahead log.
pub(crate) const ENGINE_LOG: LogId = 0;

const SNAP_MAGIC: &[u8; 8] = b"SPCSNAP5";

/// One log entry as written: a command on one entry type (borrowed, so that appending
/// copies nothing but the encoding).
#[derive(Serialize)]
struct RecordRef<'a> {
    at: u64,
    entry_type: &'a str,
    command: &'a Command,
}

/// One log entry as read back.
#[derive(Deserialize)]
struct LogRecord {
    at: u64,
    entry_type: String,
    command: Command,
}

/// The bytes of a command on `entry_type` decided at `at` (the deciding engine's clock),
/// as the engine's log holds them and a replicated log carries them. Whoever applies
/// them applies them at that time, so what depends on time (which answers are old enough
/// to forget) comes out the same on every replica and on every replay.
pub(crate) fn encode(at: Deadline, entry_type: &str, command: &Command) -> Vec<u8> {
    postcard::to_stdvec(&RecordRef {
        at: at.to_ms(),
        entry_type,
        command,
    })
    .unwrap_or_default()
}

/// A command on an entry type, and when it was decided, read back from a log.
pub(crate) fn decode(
    bytes: &[u8],
) -> std::result::Result<(Deadline, String, Command), postcard::Error> {
    let record: LogRecord = postcard::from_bytes(bytes)?;
    Ok((
        Deadline::from_ms(record.at),
        record.entry_type,
        record.command,
    ))
}

fn snapshot_prefix(log: LogId) -> String {
    format!("snapshot-{log:04}-")
}

fn snapshot_name(log: LogId, index: u64) -> String {
    format!("{}{index:020}.snap", snapshot_prefix(log))
}

/// Decides when a snapshot is due: once the log grew by the configured bytes (or by the
/// size of the last snapshot, if larger) since the last one. The checkpoint thread waits
/// on it.
pub(crate) struct Checkpoints {
    after_bytes: u64,
    since: AtomicU64,
    last_bytes: AtomicU64,
    due: Mutex<Due>,
    cv: Condvar,
}

#[derive(Default)]
struct Due {
    due: bool,
    shutdown: bool,
}

impl Checkpoints {
    pub(crate) fn new(after_bytes: u64) -> Arc<Checkpoints> {
        Arc::new(Checkpoints {
            after_bytes,
            since: AtomicU64::new(0),
            last_bytes: AtomicU64::new(0),
            due: Mutex::new(Due::default()),
            cv: Condvar::new(),
        })
    }

    /// Counts bytes the log made durable.
    pub(crate) fn written(&self, bytes: u64) {
        let since = self.since.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if since
            > self
                .after_bytes
                .max(self.last_bytes.load(Ordering::Relaxed))
        {
            self.due.lock().due = true;
            self.cv.notify_one();
        }
    }

    /// Blocks until a snapshot is due; `false` once shut down.
    pub(crate) fn wait_due(&self) -> bool {
        let mut due = self.due.lock();
        while !due.due && !due.shutdown {
            self.cv.wait(&mut due);
        }
        due.due = false;
        !due.shutdown
    }

    /// Notes a snapshot of `bytes` just written: the log's growth counts from here.
    pub(crate) fn snapshot_written(&self, bytes: u64) {
        self.since.store(0, Ordering::Relaxed);
        self.last_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn shutdown(&self) {
        self.due.lock().shutdown = true;
        self.cv.notify_all();
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
    /// Commands on this type at or below this index of the engine's log are in this
    /// image.
    pub(crate) cut: u64,
    pub(crate) records: Vec<(u64, Record)>,
    /// The subscriptions registered through the log on this type, each with the number
    /// its next event gets.
    pub(crate) subscriptions: Vec<(LoggedSubscription, u64)>,
}

#[derive(Serialize, Deserialize)]
enum SnapshotFrame {
    Header {
        next_token: u64,
        node: NodeId,
        floor: u64,
        durable_to: u64,
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
    /// A subscription registered through the log, on the entry type before it.
    Subscription {
        subscription: LoggedSubscription,
        next_seq: u64,
    },
}

/// What a snapshot holds (see [`write_snapshot`]).
pub(crate) struct Snapshot {
    pub(crate) next_token: u64,
    pub(crate) types: Vec<TypeImage>,
    pub(crate) answers: Answers,
    /// An index of the engine's log at or below every type's cut: the entries up to it
    /// are no longer needed.
    pub(crate) floor: u64,
    /// The log was durable up to this index before the snapshot was written (it holds
    /// nothing past it, answers included).
    pub(crate) durable_to: u64,
}

/// A snapshot as bytes: the magic, then checksummed frames (header, each entry type and its
/// entries, the answers, an end frame that counts them).
pub(crate) fn snapshot_bytes(snapshot: &Snapshot, node: NodeId) -> Vec<u8> {
    let mut buf = SNAP_MAGIC.to_vec();
    let mut n = 0u64;
    let mut put = |buf: &mut Vec<u8>, f: &SnapshotFrame| {
        n += 1;
        frame(buf, n, &[&postcard::to_stdvec(f).unwrap_or_default()]);
    };
    put(
        &mut buf,
        &SnapshotFrame::Header {
            next_token: snapshot.next_token,
            node,
            floor: snapshot.floor,
            durable_to: snapshot.durable_to,
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
        for (subscription, next_seq) in &t.subscriptions {
            put(
                &mut buf,
                &SnapshotFrame::Subscription {
                    subscription: subscription.clone(),
                    next_seq: *next_seq,
                },
            );
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
    buf
}

/// Writes a snapshot of `log` (named after its floor). Returns its size in bytes.
pub(crate) fn write_snapshot(
    dir: &Path,
    log: LogId,
    snapshot: &Snapshot,
    node: NodeId,
) -> Result<u64> {
    let buf = snapshot_bytes(snapshot, node);
    let path = dir.join(snapshot_name(log, snapshot.floor));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(log, snapshot.floor)));
    let mut f = File::create(&tmp).map_err(|e| storage(&tmp, e))?;
    f.write_all(&buf)
        .and_then(|()| f.sync_all())
        .map_err(|e| storage(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| storage(&path, e))?;
    sync_dir(dir)?;
    // A standalone durable space has one log: its snapshots are reported as shard "all".
    metrics::gauge!("space_snapshot_bytes", "shard" => "all").set(buf.len() as f64);
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("space_snapshot_created_timestamp_seconds", "shard" => "all").set(at);
    Ok(buf.len() as u64)
}

pub(crate) fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| storage(path, e))?;
    parse_snapshot(&bytes, path)
}

/// Reads a snapshot from its bytes ([`snapshot_bytes`]); errors name `path` (where the
/// bytes came from).
pub(crate) fn parse_snapshot(bytes: &[u8], path: &Path) -> Result<Snapshot> {
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
        durable_to: 0,
    };
    let mut ended = false;
    for (_, payload) in frames {
        let f: SnapshotFrame = postcard::from_bytes(payload)
            .map_err(|e| storage(path, format!("corrupt snapshot frame: {e}")))?;
        match f {
            SnapshotFrame::Header {
                next_token,
                floor,
                durable_to,
                ..
            } => {
                snap.next_token = next_token;
                snap.floor = floor;
                snap.durable_to = durable_to;
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
                subscriptions: Vec::new(),
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
            SnapshotFrame::Subscription {
                subscription,
                next_seq,
            } => match snap.types.last_mut() {
                Some(t) => t.subscriptions.push((subscription, next_seq)),
                None => {
                    return Err(storage(
                        path,
                        "corrupt snapshot: a subscription before any entry type",
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

/// What recovery hands an engine: its newest snapshot, and the commands logged after it,
/// to be replayed through [`apply`](crate::state::apply) in log order.
pub(crate) struct Recovered {
    pub(crate) snapshot: Snapshot,
    /// `(index, when decided, entry type, command)`, oldest first; only commands above
    /// their type's cut.
    pub(crate) commands: Vec<(u64, Deadline, String, Command)>,
}

/// Opens a data directory: creates and locks it, drops interrupted snapshots, and opens
/// the write-ahead log (cutting a torn tail). Returns the log, what it holds per log, and
/// the lock (held as long as the directory is in use).
///
/// # Errors
/// [`SpaceError::Storage`](crate::SpaceError::Storage) naming the file, for a directory in
/// use by another process, a foreign or corrupt segment, or an I/O failure.
pub(crate) fn open_dir(
    dir: &Path,
    segment_bytes: u64,
) -> Result<(Arc<Wal>, HashMap<LogId, LogContents>, File)> {
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
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))?.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            // An interrupted snapshot: never valid, never referenced.
            let _ = fs::remove_file(entry.path());
        }
    }
    let (wal, logs) = Wal::open(dir, segment_bytes)?;
    Ok((wal, logs, lock))
}

/// The snapshots of `log` in `dir`, oldest first (by the index they cover).
pub(crate) fn snapshots(dir: &Path, log: LogId) -> Result<Vec<(u64, std::path::PathBuf)>> {
    numbered(dir, &snapshot_prefix(log), ".snap")
}

/// Recovers one engine's log: its newest snapshot, and its commands after it (decoded).
///
/// # Errors
/// [`SpaceError::Storage`](crate::SpaceError::Storage) naming the file, for a corrupt
/// snapshot or entry, or a log purged past what its newest snapshot holds.
pub(crate) fn recover_log(dir: &Path, log: LogId, contents: LogContents) -> Result<Recovered> {
    let snapshot = match snapshots(dir, log)?.last() {
        Some((_, path)) => read_snapshot(path)?,
        None => Snapshot {
            next_token: 1,
            types: Vec::new(),
            answers: Answers::default(),
            floor: 0,
            durable_to: 0,
        },
    };
    if contents.purged_before > snapshot.floor + 1 {
        return Err(storage(
            dir,
            format!(
                "log {log} was purged up to entry {} but its newest snapshot only covers {}: a snapshot file is missing",
                contents.purged_before - 1,
                snapshot.floor
            ),
        ));
    }
    let cuts: HashMap<&str, u64> = snapshot
        .types
        .iter()
        .map(|t| (t.entry_type.as_str(), t.cut))
        .collect();
    let mut commands = Vec::new();
    for (index, bytes) in contents.entries {
        if index <= snapshot.floor {
            continue;
        }
        let (at, entry_type, command) = decode(&bytes)
            .map_err(|e| storage(dir, format!("corrupt entry {index} of log {log}: {e}")))?;
        if index <= cuts.get(entry_type.as_str()).copied().unwrap_or(0) {
            continue;
        }
        commands.push((index, at, entry_type, command));
    }
    Ok(Recovered { snapshot, commands })
}

/// After a snapshot of `log` at `floor`: the log's entries up to it are purged, the
/// segments no log needs any more deleted, and the log's older snapshots removed.
pub(crate) fn compact(wal: &Wal, log: LogId, floor: u64) -> Result<()> {
    wal.purge(log, floor + 1);
    wal.compact()?;
    let dir = wal.dir();
    for (index, path) in snapshots(dir, log)? {
        if index < floor {
            fs::remove_file(&path).map_err(|e| storage(&path, e))?;
        }
    }
    sync_dir(dir)
}
