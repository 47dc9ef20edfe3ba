//! An engine whose state a replicated log drives (a shard's Raft group): its commands
//! arrive already decided and committed, and are applied through the same
//! [`state::apply`] as live calls and recovery (docs/ARCHITECTURE.md section 9).

use super::*;
use host::LogHost;

/// What applying one logged command did, as the log's owner sees it (the answer a
/// replicated call waits for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Applied {
    /// A write was stored, under this key.
    Stored(Key),
    /// A write went straight to the waiting taker or claimer named in its command.
    HandedOff(Key),
    /// The entry with this key left the space (taken, committed, expired or cancelled).
    Removed(Key),
    /// A claim, release, renewal or index took effect.
    Changed,
    /// Nothing had the command's entry (or the claim it names): nothing changed.
    Missing,
}

/// Where the commands of an engine that leads a replicated log go (see
/// [`Engine::leading`]): the log orders them and tells when they are committed.
pub trait Proposals: Send + Sync + 'static {
    /// Takes the next command; returns its number among the proposals (from 1, in the
    /// log's order). The engine calls it under the entry type's lock, so each type's
    /// commands reach the log in the order they were applied. Returns at once. The
    /// events the command tells are held until [`Engine::release_events`] releases its
    /// number.
    fn propose(&self, command: Vec<u8>) -> u64;

    /// Keeps the next number for a command proposed later with [`fill`](Self::fill) (a
    /// batch, decided over several steps under the entry type's lock): the proposals
    /// numbered after it are held back until it is filled, so the log still takes them
    /// in the order of their numbers. Returns at once.
    fn reserve(&self) -> u64;

    /// Proposes `command` under the number `seq` that [`reserve`](Self::reserve) gave,
    /// and lets the proposals held back behind it go. Returns at once.
    fn fill(&self, seq: u64, command: Vec<u8>);

    /// Waits until every command proposed so far is committed. Cancel-safe.
    ///
    /// # Errors
    /// A [`SpaceError`] when they may never be (this engine no longer leads the log):
    /// the caller's request has an unknown outcome and is retried with its id elsewhere.
    fn settled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

    /// The same as [`settled`](Self::settled), blocking the thread.
    ///
    /// # Errors
    /// As [`settled`](Self::settled).
    fn settled_blocking(&self) -> Result<()>;
}

/// How an engine's changes are kept (see the constructors).
pub(super) enum Mode {
    /// In memory, or in its own log on a data directory.
    Local,
    /// Driven by a replicated log ([`Engine::replica`]).
    Replica,
    /// Leading a replicated log ([`Engine::leading`]).
    Leading(Arc<dyn Proposals>),
}

impl Engine {
    /// An engine that leads a replicated log, starting from the log's committed state
    /// `image` (made by [`image`](Self::image) on the replica that holds it). It decides
    /// and applies like any engine (waiters, lease timers, subscriptions live here), and
    /// every command it applies goes to `proposals`; [`flush`](Self::flush) waits for
    /// their commit. Close it when the leadership ends: its state may hold commands the
    /// log never commits. On `host` it shares the host's threads (its lease timers run
    /// on the host's timer thread) and clock.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the image is damaged.
    pub fn leading(
        host: Option<&LogHost>,
        config: EngineConfig,
        image: &[u8],
        proposals: Arc<dyn Proposals>,
    ) -> Result<Engine> {
        let snapshot = crate::durable::parse_snapshot(image, std::path::Path::new("snapshot"))?;
        let (config, services, owns) = Self::services_on(host, config);
        let engine = Self::build_as(
            config,
            services,
            owns,
            None,
            snapshot.next_token,
            Mode::Leading(proposals),
        );
        engine.recover_state(snapshot, Vec::new());
        Ok(engine)
    }

    /// An in-memory engine that a replicated log drives: it keeps the answer table (so a
    /// request retried on another replica gets its first answer) and arms no lease
    /// timers (expiries are decided by the log's leader and arrive as commands). Reads
    /// still never return an entry past its deadline. On `host` it shares the host's
    /// threads and clock with every engine there (a node's many groups cost no thread
    /// each); without one it has threads of its own.
    pub fn replica(host: Option<&LogHost>, config: EngineConfig) -> Engine {
        let (config, services, owns) = Self::services_on(host, config);
        Self::build_as(config, services, owns, None, 1, Mode::Replica)
    }

    /// The threads an engine runs on: `host`'s (with its clock), shared with the other
    /// engines there, or (no host) threads of its own. Also says whether they are its
    /// own.
    fn services_on(
        host: Option<&LogHost>,
        mut config: EngineConfig,
    ) -> (EngineConfig, Arc<Services>, bool) {
        match host {
            Some(host) => {
                config.clock = host.services.clock.clone();
                (config, host.services.clone(), false)
            }
            None => {
                let services = Services::start(config.clock.clone(), None);
                (config, services, true)
            }
        }
    }

    /// An engine like [`replica`](Self::replica) holding the state of `image` (made by
    /// [`image`](Self::image), on this or another replica).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the image is damaged or not an image of a space.
    pub fn replica_from_image(
        host: Option<&LogHost>,
        config: EngineConfig,
        image: &[u8],
    ) -> Result<Engine> {
        let snapshot = crate::durable::parse_snapshot(image, std::path::Path::new("snapshot"))?;
        let engine = Engine::replica(host, config);
        engine
            .inner
            .next_token
            .store(snapshot.next_token, Ordering::Relaxed);
        engine.recover_state(snapshot, Vec::new());
        Ok(engine)
    }

    /// Applies the command logged at `index` (bytes a durable engine's log holds, or a
    /// replicated log carries) through the one apply. Commands must come in log order,
    /// from one caller at a time. Blocks only on the entry type's lock.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the bytes are not a command (nothing changes).
    pub fn apply_logged(&self, index: u64, command: &[u8]) -> Result<Applied> {
        let (at, entry_type, command) = crate::durable::decode(command).map_err(|e| {
            crate::wal::storage(
                std::path::Path::new("replicated log"),
                format!("entry {index} is not a command: {e}"),
            )
        })?;
        if let Some(token) = command.token() {
            self.inner
                .next_token
                .fetch_max(token + 1, Ordering::Relaxed);
        }
        tracing::trace!(index, %entry_type, ?command, "applying a committed command");
        let key_of = |record: &Record| record.key.clone();
        let mut applied = Applied::Missing;
        self.each_type_always(&entry_type, |_, st| {
            let written = match &command {
                Command::Write { record, .. } => Some(record.key.clone()),
                _ => None,
            };
            applied = match self.apply(st, Some(index), Some(at), command) {
                Outcome::Stored => written.map_or(Applied::Changed, Applied::Stored),
                Outcome::HandedOff(r) => Applied::HandedOff(key_of(&r)),
                Outcome::Removed(r) => Applied::Removed(key_of(&r)),
                Outcome::Changed => Applied::Changed,
                Outcome::Missing => Applied::Missing,
            };
        });
        Ok(applied)
    }

    /// Releases the events told by the proposals numbered up to `upto` (now committed) to
    /// the subscriptions of this leading engine. Other engines hold nothing back.
    pub fn release_events(&self, upto: u64) {
        if let Some(gate) = &self.inner.gate {
            gate.release(upto);
        }
    }

    /// The whole state (entries, claims, deadlines, schemas, indexes, answers) as bytes,
    /// cut at log index `applied` (the last command applied): what a snapshot of a
    /// replicated log holds. Call it between applies.
    pub fn image(&self, applied: u64) -> Vec<u8> {
        let mut snapshot = self.capture(|| applied);
        snapshot.floor = applied;
        snapshot.durable_to = applied;
        crate::durable::snapshot_bytes(&snapshot, self.inner.config.node)
    }
}
