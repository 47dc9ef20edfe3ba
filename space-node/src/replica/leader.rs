//! Leading a shard group: while this member leads, an engine of its own serves the
//! group's calls.
//!
//! The serving engine starts from the committed state (an image of the replica engine)
//! once the new leader has applied everything before its term. It decides and applies
//! each command at once, as any engine does (so waiters, lease timers and subscriptions
//! work as on a single node), and proposes it to the group's log in the same order; a
//! call is answered once its commands are committed (the engine's `flush` waits on the
//! [`Session`]). The replica engine applies every committed command, the leader's
//! included: it is the state snapshots are made of, and the one a new leadership starts
//! from. When the leadership ends, the serving engine is closed (its state may hold
//! commands the log never commits) and every call waiting on it fails with
//! `SpaceError::WrongNode`: its outcome is unknown, and its retry (same request id) on
//! the new leader gets the first answer if it was committed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use parking_lot::{Condvar, Mutex};
use space_core::server::{Engine, LogHost, Proposals};
use space_core::{EngineConfig, SpaceError};

use super::{EngineSlot, MemberId, Origin, Proposal, ShardGroup};

/// One leadership of this member (a term in which it leads): numbers its proposals and
/// learns which are committed.
pub struct Session {
    /// This session, for the futures that wait on it.
    this: std::sync::Weak<Session>,
    term: u64,
    /// This member, the leader.
    leader: MemberId,
    /// Proposals in order, and the queue they enter the log from (none once the session
    /// ended: what its engine still decides goes nowhere); the number of the last one is
    /// `proposed`.
    outbox: Mutex<(u64, Option<tokio::sync::mpsc::UnboundedSender<Proposal>>)>,
    proposed: AtomicU64,
    committed: AtomicU64,
    ended: AtomicBool,
    changed: tokio::sync::Notify,
    changed_blocking: (Mutex<()>, Condvar),
}

impl Session {
    fn new(
        term: u64,
        leader: MemberId,
    ) -> (Arc<Session>, tokio::sync::mpsc::UnboundedReceiver<Proposal>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new_cyclic(|this| Session {
                this: this.clone(),
                term,
                leader,
                outbox: Mutex::new((0, Some(tx))),
                proposed: AtomicU64::new(0),
                committed: AtomicU64::new(0),
                ended: AtomicBool::new(false),
                changed: tokio::sync::Notify::new(),
                changed_blocking: (Mutex::new(()), Condvar::new()),
            }),
            rx,
        )
    }

    fn wake(&self) {
        self.changed.notify_waiters();
        let _guard = self.changed_blocking.0.lock();
        self.changed_blocking.1.notify_all();
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        // Proposals queued already still go to the log, under this leadership only.
        self.outbox.lock().1 = None;
        self.wake();
    }

    /// The origin of this session's proposal number `seq`.
    fn origin(&self, seq: u64) -> Origin {
        Origin {
            term: self.term,
            leader: self.leader,
            seq,
        }
    }

    /// Whether `origin` is one of this session's proposals.
    fn proposed_here(&self, origin: &Origin) -> bool {
        origin.same_leadership(&self.origin(0))
    }

    /// Whether everything up to `seq` is committed; an error once the session ended
    /// before it was.
    fn settled_to(&self, seq: u64) -> Option<Result<(), SpaceError>> {
        if self.committed.load(Ordering::Acquire) >= seq {
            Some(Ok(()))
        } else if self.ended.load(Ordering::Acquire) {
            Some(Err(SpaceError::WrongNode {
                epoch: self.term,
                owner: None,
            }))
        } else {
            None
        }
    }
}

impl Proposals for Session {
    fn propose(&self, command: Vec<u8>) -> u64 {
        // Numbered and queued under one lock, so the numbers follow the log's order.
        let mut outbox = self.outbox.lock();
        outbox.0 += 1;
        let seq = outbox.0;
        if let Some(queue) = &outbox.1 {
            let _ = queue.send(Proposal {
                origin: Some(self.origin(seq)),
                command,
            });
        }
        self.proposed.store(seq, Ordering::Release);
        seq
    }

    fn settled(&self) -> Pin<Box<dyn std::future::Future<Output = space_core::Result<()>> + Send>> {
        let seq = self.proposed.load(Ordering::Acquire);
        let Some(me) = self.this.upgrade() else {
            // Only a session being dropped has no strong handle; nothing waits on it.
            return Box::pin(async move {
                Err(SpaceError::WrongNode {
                    epoch: 0,
                    owner: None,
                })
            });
        };
        Box::pin(async move {
            loop {
                let changed = me.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(result) = me.settled_to(seq) {
                    return result;
                }
                changed.await;
            }
        })
    }

    fn settled_blocking(&self) -> space_core::Result<()> {
        let seq = self.proposed.load(Ordering::Acquire);
        let mut guard = self.changed_blocking.0.lock();
        loop {
            if let Some(result) = self.settled_to(seq) {
                return result;
            }
            self.changed_blocking
                .1
                .wait_for(&mut guard, Duration::from_millis(100));
        }
    }
}

/// What leads a group from this member: the current session and its serving engine, if
/// this member leads. Shared by the state machine (which reports commits) and the
/// watcher that follows the member's Raft state. Cloning shares it.
#[derive(Clone, Default)]
pub struct Leadership {
    lead: Arc<Mutex<Option<Lead>>>,
    /// Told whenever this member starts or stops leading (set once, by its node).
    changes: Arc<std::sync::OnceLock<ServingChanges>>,
}

/// A counter that grows whenever one of a node's members starts or stops leading, so
/// that a call waiting across the shards a node serves learns that the set changed.
/// Cloning shares it.
#[derive(Clone)]
pub struct ServingChanges(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for ServingChanges {
    fn default() -> ServingChanges {
        ServingChanges(Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl ServingChanges {
    /// Resolves at the first change after this call. Cancel-safe.
    pub fn next(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut changes = self.0.subscribe();
        async move {
            // An error means the sender is gone: nothing will change any more.
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn bump(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

struct Lead {
    session: Arc<Session>,
    engine: Engine,
}

impl Leadership {
    /// Tells `changes` whenever this member starts or stops leading (the first call
    /// counts; later ones are ignored).
    pub fn report_changes_to(&self, changes: ServingChanges) {
        let _ = self.changes.set(changes);
    }

    fn changed(&self) {
        if let Some(changes) = self.changes.get() {
            changes.bump();
        }
    }

    /// Reports that the proposal `origin` is committed.
    pub(super) fn committed(&self, origin: Origin) {
        if let Some(lead) = &*self.lead.lock()
            && lead.session.proposed_here(&origin)
        {
            lead.session
                .committed
                .fetch_max(origin.seq, Ordering::AcqRel);
            lead.session.wake();
            lead.engine.release_events(origin.seq);
        }
    }

    /// The engine serving the group's calls while this member leads.
    pub fn serving(&self) -> Option<Engine> {
        self.lead.lock().as_ref().map(|l| l.engine.clone())
    }

    /// Ends the current leadership, if any: its engine is closed and its waiting calls
    /// fail.
    fn end(&self) {
        let ended = self.lead.lock().take();
        if let Some(lead) = ended {
            lead.session.end();
            lead.engine.close();
            self.changed();
        }
    }

    fn term(&self) -> Option<u64> {
        self.lead.lock().as_ref().map(|l| l.session.term)
    }
}

/// Follows member `id`'s Raft state for as long as `raft` runs: when it becomes the
/// leader of a term, starts a session and its serving engine (on `host`'s threads, if
/// given) from the committed state (after applying everything before the term); when it
/// stops leading, ends them.
pub async fn follow_leadership(
    id: MemberId,
    raft: ShardGroup,
    slot: EngineSlot,
    leadership: Leadership,
    host: Option<Arc<LogHost>>,
    config: EngineConfig,
) {
    // The server metrics change only with the vote, state and membership, not with every
    // entry appended or applied (which would wake this for each command).
    let mut metrics = raft.server_metrics();
    loop {
        let (leads, term) = {
            let m = metrics.borrow_watched();
            (
                m.state == ServerState::Leader && m.current_leader == Some(id),
                m.vote.leader_id.term,
            )
        };
        if !leads || leadership.term().is_some_and(|t| t != term) {
            leadership.end();
        }
        if leads
            && leadership.term().is_none()
            && let Err(e) = lead(&raft, &slot, &leadership, term, host.as_deref(), &config).await
        {
            tracing::debug!(member = id, term, error = %e, "could not start leading");
        }
        if metrics.changed().await.is_err() {
            // Raft stopped.
            leadership.end();
            return;
        }
    }
}

/// Starts leading in `term`: waits until everything before the term is applied, then
/// starts the serving engine from the replica's state and the proposal pump.
async fn lead(
    raft: &ShardGroup,
    slot: &EngineSlot,
    leadership: &Leadership,
    term: u64,
    host: Option<&LogHost>,
    config: &EngineConfig,
) -> Result<(), String> {
    raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
        .map_err(|e| e.to_string())?;
    let slot = slot.clone();
    // Cut on the state machine's task, between two applies.
    let image = raft
        .with_state_machine(move |sm: &mut super::StateMachine| {
            let applied = sm.applied_index();
            let image = slot.engine().image(applied);
            Box::pin(async move { image })
        })
        .await
        .map_err(|e| e.to_string())?;
    // Proposals enter the log only under this leadership: once it ends, one still
    // queued is refused rather than appended under a later one (whose engine never
    // decided it).
    let leader = raft.as_leader().map_err(|e| e.to_string())?;
    let under = leader.to_committed_leader_id();
    if under.term != term {
        return Err(format!("the leadership of term {term} already ended"));
    }
    let (session, mut outbox) = Session::new(term, under.node_id);
    let engine = Engine::leading(host, config.clone(), &image, session.clone())
        .map_err(|e| e.to_string())?;
    *leadership.lead.lock() = Some(Lead {
        session: session.clone(),
        engine,
    });
    leadership.changed();
    let raft = raft.clone();
    tokio::spawn(async move {
        // Proposals enter the log in the order they were numbered.
        while let Some(proposal) = outbox.recv().await {
            if raft.write(proposal).with_leader(under).await.is_err() {
                session.end();
                return;
            }
        }
    });
    Ok(())
}
