//! A shard group's state machine: a replica engine that applies what the group
//! committed, through the engine's one apply.
//!
//! Snapshots are the engine's state image cut at the last applied entry, with Raft's
//! metadata (last log id, membership). The newest one is kept in a file of the node's
//! data directory (`group-<id>.snap`, written whole and renamed into place), so that a
//! restarted member starts from it and Raft replays only the log after it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use futures::{Stream, TryStreamExt};
use openraft::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use space_core::EngineConfig;
use space_core::server::{Applied, Engine, LogHost};

use super::leader::Leadership;
use super::{LogId, Shard, io_error};

/// A snapshot as it is kept and sent: Raft's metadata and the engine's image. The
/// image is shared, not copied, between the file writer, the newest snapshot and the
/// followers it is sent to: a shard's image may be hundreds of MiB (its answers hold the
/// entries taken in the last minute).
#[derive(Clone)]
struct Kept {
    meta: SnapshotMetaOf<Shard>,
    image: Bytes,
}

/// A snapshot as its file holds it (postcard: the metadata, then the image's bytes).
#[derive(Serialize)]
struct KeptFile<'a> {
    meta: &'a SnapshotMetaOf<Shard>,
    #[serde(with = "serde_bytes")]
    image: &'a [u8],
}

/// A snapshot file read back (the layout of [`KeptFile`]).
#[derive(Deserialize)]
struct ReadFile {
    meta: SnapshotMetaOf<Shard>,
    #[serde(with = "serde_bytes")]
    image: Vec<u8>,
}

/// The replica engine of a group, replaced whole when a snapshot is installed. Clone it
/// to read the engine from outside the state machine.
#[derive(Clone)]
pub struct EngineSlot(Arc<Mutex<Engine>>);

impl EngineSlot {
    /// The engine now holding the group's state.
    pub fn engine(&self) -> Engine {
        self.0.lock().clone()
    }
}

/// The size of a group's newest snapshot (see [`StateMachine::snapshot_size`]).
#[derive(Clone)]
pub(crate) struct SnapshotSize(Arc<Mutex<Option<Kept>>>);

impl SnapshotSize {
    /// Bytes of the newest snapshot's image (0 before any).
    pub(crate) fn bytes(&self) -> u64 {
        self.0.lock().as_ref().map_or(0, |k| k.image.len() as u64)
    }
}

/// A shard group's state machine (openraft's `RaftStateMachine`) over a replica engine.
pub struct StateMachine {
    engine: EngineSlot,
    config: EngineConfig,
    applied: Option<LogId>,
    membership: StoredMembershipOf<Shard>,
    /// The newest snapshot, shared with the builders that make the next one.
    current: Arc<Mutex<Option<Kept>>>,
    /// Where the newest snapshot is kept (none: in memory only).
    file: Option<PathBuf>,
    /// The host whose threads the engines run on (none: threads of their own).
    host: Option<Arc<LogHost>>,
    /// This member's leadership, told which of its proposals are committed.
    leadership: Leadership,
    /// The group.
    group: super::GroupId,
}

impl StateMachine {
    /// A state machine for group `group` whose snapshots live in `host`'s directory and
    /// whose engines run on `host`'s threads (`None`: in memory only, threads of their
    /// own); starts from the snapshot kept there, if any. Blocks while it reads it.
    ///
    /// # Errors
    /// An `io::Error` naming the file when the kept snapshot cannot be read or is damaged.
    pub fn open(
        group: super::GroupId,
        host: Option<&Arc<LogHost>>,
        config: EngineConfig,
    ) -> io::Result<StateMachine> {
        let file = host.map(|h| h.dir().join(format!("group-{group:04}.snap")));
        let replica = Engine::replica(host.map(|h| &**h), config.clone());
        let mut machine = StateMachine {
            engine: EngineSlot(Arc::new(Mutex::new(replica))),
            host: host.cloned(),
            config,
            applied: None,
            membership: StoredMembershipOf::<Shard>::default(),
            current: Arc::new(Mutex::new(None)),
            file: file.clone(),
            leadership: Leadership::default(),
            group,
        };
        if let Some(path) = file.filter(|p| p.exists()) {
            let bytes =
                std::fs::read(&path).map_err(|e| io_error(format!("{}: {e}", path.display())))?;
            let file: ReadFile = postcard::from_bytes(&bytes)
                .map_err(|e| io_error(format!("{}: damaged snapshot: {e}", path.display())))?;
            let kept = Kept {
                meta: file.meta,
                image: file.image.into(),
            };
            let made = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| std::time::SystemTime::now());
            report_snapshot(group, &kept, made);
            let engine = machine.engine_of(&kept)?;
            machine.load(kept, engine);
        }
        Ok(machine)
    }

    /// The size of this group's newest snapshot, read from outside as it changes.
    pub(crate) fn snapshot_size(&self) -> SnapshotSize {
        SnapshotSize(self.current.clone())
    }

    /// The slot holding this group's engine, for reading it from outside.
    pub fn engine(&self) -> EngineSlot {
        self.engine.clone()
    }

    /// The index of the last entry applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.applied.as_ref().map_or(0, |l| l.index)
    }

    /// The host whose threads this group's engines run on, if any.
    pub fn host(&self) -> Option<Arc<LogHost>> {
        self.host.clone()
    }

    /// This member's leadership (shared): what leads the group from this member.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// A replica engine holding `kept`'s state (blocks while it decodes the image).
    fn engine_of(&self, kept: &Kept) -> io::Result<Engine> {
        Engine::replica_from_image(self.host.as_deref(), self.config.clone(), &kept.image)
            .map_err(io_error)
    }

    /// Replaces the state with a snapshot's, whose state `engine` holds.
    fn load(&mut self, kept: Kept, engine: Engine) {
        let old = std::mem::replace(&mut *self.engine.0.lock(), engine);
        old.close();
        self.applied = kept.meta.last_log_id;
        self.membership = kept.meta.last_membership.clone();
        *self.current.lock() = Some(kept);
    }
}

/// Reports a shard's newest snapshot: its size, and when it was made.
fn report_snapshot(group: super::GroupId, kept: &Kept, made: std::time::SystemTime) {
    let shard = group.to_string();
    metrics::gauge!("space_snapshot_bytes", "shard" => shard.clone()).set(kept.image.len() as f64);
    let at = made
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("space_snapshot_created_timestamp_seconds", "shard" => shard).set(at);
}

/// Writes `kept` to `file` whole (a temporary file, fsynced, renamed into place),
/// streamed: the image is not copied into one more buffer first. A failure fails the
/// node's data directory (`host`): a disk that cannot take a snapshot stops the node, as
/// one that cannot take its log does, rather than leave the group without its state
/// machine.
fn keep(file: &std::path::Path, kept: &Kept, host: Option<&LogHost>) -> io::Result<()> {
    let written = write_whole(file, kept);
    if let (Err(e), Some(host)) = (&written, host) {
        host.fail(format!(
            "writing the snapshot {} failed: {e}",
            file.display()
        ));
    }
    written
}

fn write_whole(file: &std::path::Path, kept: &Kept) -> io::Result<()> {
    let tmp = file.with_extension("snap.tmp");
    let mut out = Noting {
        inner: io::BufWriter::new(std::fs::File::create(&tmp)?),
        error: None,
    };
    let view = KeptFile {
        meta: &kept.meta,
        image: &kept.image,
    };
    if let Err(e) = postcard::to_io(&view, &mut out) {
        return Err(out.error.take().unwrap_or_else(|| io_error(e)));
    }
    out.inner
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A writer that keeps the first I/O error it met: postcard reports any error of its
/// writer as a full serialize buffer, which would hide a full disk.
struct Noting<W> {
    inner: W,
    error: Option<io::Error>,
}

impl<W> Noting<W> {
    fn note(&mut self, e: io::Error) -> io::Error {
        let told = io::Error::new(e.kind(), e.to_string());
        self.error.get_or_insert(e);
        told
    }
}

impl<W: io::Write> io::Write for Noting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.note(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.note(e))
    }
}

/// `engine`'s state image as of `applied` (`Engine::image`), cut on a blocking thread
/// while the caller waits: called from the state machine's task, nothing applies
/// meanwhile, and the node's other tasks (heartbeats among them) keep its worker thread
/// while a large state is encoded.
pub(super) async fn image_off_thread(engine: Engine, applied: u64) -> Vec<u8> {
    let cut = engine.clone();
    match tokio::task::spawn_blocking(move || cut.image(applied)).await {
        Ok(image) => image,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // No blocking thread (the runtime is shutting down): cut here.
        Err(_) => engine.image(applied),
    }
}

/// Makes one snapshot: the image was cut when the builder was made (between two
/// applies), so building only writes it down.
pub struct SnapshotBuilder {
    group: super::GroupId,
    kept: Kept,
    current: Arc<Mutex<Option<Kept>>>,
    file: Option<PathBuf>,
    host: Option<Arc<LogHost>>,
}

impl RaftSnapshotBuilder<Shard> for SnapshotBuilder {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<Shard, Bytes>> {
        if let Some(file) = self.file.clone() {
            let (kept, host) = (self.kept.clone(), self.host.clone());
            tokio::task::spawn_blocking(move || keep(&file, &kept, host.as_deref()))
                .await
                .map_err(io_error)??;
        }
        report_snapshot(self.group, &self.kept, std::time::SystemTime::now());
        *self.current.lock() = Some(self.kept.clone());
        Ok(SnapshotOf::<Shard, Bytes> {
            meta: self.kept.meta.clone(),
            snapshot: self.kept.image.clone(),
        })
    }
}

impl RaftStateMachine<Shard> for StateMachine {
    type SnapshotData = Bytes;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembershipOf<Shard>)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<Shard>>> + Unpin + OptionalSend,
    {
        let engine = self.engine.engine();
        // The leader's proposals this batch committed, told once per leadership at its
        // end (or where the leadership changes): each report wakes every call waiting on
        // the leadership.
        let mut last_origin: Option<super::Origin> = None;
        // This member's session that proposed the entries being applied, if it did:
        // each of its proposals is counted, in order (a skipped one was lost).
        let mut session = None;
        loop {
            let (entry, responder) = match entries.try_next().await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(e) => {
                    if let Some(origin) = last_origin {
                        self.leadership.committed(origin);
                    }
                    return Err(e);
                }
            };
            let index = entry.log_id.index;
            let applied = match entry.payload {
                EntryPayload::Normal(proposal) => {
                    // Every replica gets the same bytes and runs the same code: a command
                    // that does not decode is refused alike everywhere, so the replicas
                    // stay equal.
                    let applied = engine.apply_logged(index, &proposal.command).unwrap_or_else(|e| {
                        tracing::error!(index, error = %e, "a committed command does not apply");
                        Applied::Missing
                    });
                    if let Some(origin) = proposal.origin {
                        if last_origin.is_none_or(|last| !last.same_leadership(&origin)) {
                            if let Some(last) = last_origin {
                                self.leadership.committed(last);
                            }
                            session = self.leadership.session_of(&origin);
                        }
                        if let Some(lost) = session.take_if(|s| !s.note_committed(origin.seq)) {
                            self.leadership.lost_proposal(&lost);
                        }
                        last_origin = Some(origin);
                    }
                    applied
                }
                EntryPayload::Membership(membership) => {
                    self.membership =
                        StoredMembershipOf::<Shard>::new(Some(entry.log_id), membership);
                    Applied::Changed
                }
                EntryPayload::Blank => Applied::Changed,
            };
            tracing::trace!(log_id = %entry.log_id, ?applied, "applied");
            self.applied = Some(entry.log_id);
            if let Some(responder) = responder {
                responder.send(applied);
            }
        }
        if let Some(origin) = last_origin {
            self.leadership.committed(origin);
        }
        Ok(())
    }

    /// Cuts the image on a blocking thread (`image_off_thread`).
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        let applied_index = self.applied.as_ref().map_or(0, |l| l.index);
        let image = image_off_thread(self.engine.engine(), applied_index).await;
        SnapshotBuilder {
            kept: Kept {
                meta: SnapshotMetaOf::<Shard> {
                    last_log_id: self.applied,
                    last_membership: self.membership.clone(),
                },
                image: image.into(),
            },
            current: self.current.clone(),
            file: self.file.clone(),
            group: self.group,
            host: self.host.clone(),
        }
    }

    /// Writes the snapshot down and decodes its state on a blocking thread (see
    /// [`get_snapshot_builder`](Self::get_snapshot_builder)).
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<Shard>,
        snapshot: Bytes,
    ) -> io::Result<()> {
        let kept = Kept {
            meta: meta.clone(),
            image: snapshot,
        };
        let (file, decode) = (self.file.clone(), kept.clone());
        let (host, config) = (self.host.clone(), self.config.clone());
        let engine = tokio::task::spawn_blocking(move || {
            if let Some(file) = file {
                keep(&file, &decode, host.as_deref())?;
            }
            Engine::replica_from_image(host.as_deref(), config, &decode.image).map_err(io_error)
        })
        .await
        .map_err(io_error)??;
        report_snapshot(self.group, &kept, std::time::SystemTime::now());
        self.load(kept, engine);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<Shard, Bytes>>> {
        Ok(self
            .current
            .lock()
            .clone()
            .map(|k| SnapshotOf::<Shard, Bytes> {
                meta: k.meta,
                snapshot: k.image,
            }))
    }
}
