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
    /// Proposals in order, and the queue they enter the log from (see [`Outbox`]); the
    /// number of the last one is `proposed`.
    outbox: Mutex<Outbox>,
    proposed: AtomicU64,
    committed: AtomicU64,
    ended: AtomicBool,
    changed: tokio::sync::Notify,
    changed_blocking: (Mutex<()>, Condvar),
}

/// Where a session's proposals go, in the order of their numbers.
struct Outbox {
    /// The number of the last proposal.
    last: u64,
    /// The queue they enter the log from (none once the session ended: what its engine
    /// still decides goes nowhere).
    queue: Option<tokio::sync::mpsc::UnboundedSender<Proposal>>,
    /// Proposals held back behind a number kept for a batch (`Proposals::reserve`), in
    /// order from the oldest kept number; each `None` until filled.
    held: std::collections::VecDeque<(u64, Option<Vec<u8>>)>,
}

impl Outbox {
    /// Sends the proposals at the front of `held` that are filled, up to the first
    /// that is not.
    fn send_ready(&mut self, session: &Session) {
        while let Some((seq, Some(_))) = self.held.front() {
            let seq = *seq;
            if let Some((_, Some(command))) = self.held.pop_front() {
                self.send(session, seq, command);
            }
        }
    }

    fn send(&self, session: &Session, seq: u64, command: Vec<u8>) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(Proposal {
                origin: Some(session.origin(seq)),
                command,
            });
        }
    }
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
                outbox: Mutex::new(Outbox {
                    last: 0,
                    queue: Some(tx),
                    held: std::collections::VecDeque::new(),
                }),
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
        self.outbox.lock().queue = None;
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

    /// Notes that this session's proposal `seq` is committed. Proposals enter the log in
    /// the order they were numbered, so they commit one after the other; false when `seq`
    /// skips one. openraft refuses a proposal without a word when the leader's lease ran
    /// out (no majority heard from for an election timeout) though it stays the leader of
    /// its term, and takes the next ones once its followers answer again: the skipped one
    /// was decided by the serving engine and never logged, and must not be counted as
    /// committed when the later ones are.
    pub(super) fn note_committed(&self, seq: u64) -> bool {
        let done = self.committed.load(Ordering::Acquire);
        if seq <= done {
            return true;
        }
        if seq != done + 1 {
            return false;
        }
        self.committed.store(seq, Ordering::Release);
        true
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
        outbox.last += 1;
        let seq = outbox.last;
        if outbox.held.is_empty() {
            outbox.send(self, seq, command);
        } else {
            outbox.held.push_back((seq, Some(command)));
        }
        self.proposed.store(seq, Ordering::Release);
        seq
    }

    fn reserve(&self) -> u64 {
        let mut outbox = self.outbox.lock();
        outbox.last += 1;
        let seq = outbox.last;
        outbox.held.push_back((seq, None));
        self.proposed.store(seq, Ordering::Release);
        seq
    }

    fn fill(&self, seq: u64, command: Vec<u8>) {
        let mut outbox = self.outbox.lock();
        if let Some((_, slot)) = outbox.held.iter_mut().find(|(s, _)| *s == seq) {
            *slot = Some(command);
        }
        outbox.send_ready(self);
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

/// openraft's responder for each proposal a session sends: nothing when the proposal is
/// applied (the state machine counts commits), and, when openraft refused it, a call
/// that gives the leadership up. openraft refuses a proposal without appending it when
/// its leader's lease ran out (no majority heard from for an election timeout) though it
/// stays the leader of its term, or when the leadership ended; only a responder hears of
/// it. Without one, a refused proposal was found only once a later one of the session
/// committed: meanwhile its calls, and every read of the shard (which waits for the
/// serving engine's proposals), waited, and with no later write they waited until the
/// leadership changed.
pub struct Refusal(Arc<dyn Fn() + Send + Sync>);

impl<T: openraft::OptionalSend + 'static> openraft::raft::responder::Responder<super::Shard, T>
    for Refusal
{
    fn on_complete(self, result: T) {
        // openraft calls it with `ClientWriteResult` (the only `T` a write's responder
        // is given); an error is a proposal refused, never appended.
        let refused = (&result as &dyn std::any::Any)
            .downcast_ref::<openraft::raft::ClientWriteResult<super::Shard>>()
            .is_some_and(Result::is_err);
        if refused {
            (self.0)();
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
    /// A term whose leadership was given up because the log lost one of its proposals.
    given_up: Arc<GivenUp>,
    /// Tests: until when starts of serving are made to fail (as when a majority does not
    /// confirm the leadership in time).
    #[cfg(test)]
    failing_starts: Arc<Mutex<Option<std::time::Instant>>>,
}

/// The term in which this member gave its leadership up (it is not served again: its
/// proposals could not be told from the lost one's), and the signal that tells the
/// watcher to hand the term over.
#[derive(Default)]
struct GivenUp {
    term: Mutex<Option<u64>>,
    told: tokio::sync::Notify,
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

    /// How many changes there were so far.
    pub fn count(&self) -> u64 {
        *self.0.borrow()
    }
}

struct Lead {
    session: Arc<Session>,
    engine: Engine,
}

impl Lead {
    /// Ends the leadership: the engine is closed first, so that a call that learns the
    /// session ended finds its engine closed (its server then learns its outcome from
    /// the log, see `settle_after_step_down`), then the session's calls fail.
    fn close(self) {
        self.engine.close();
        self.session.end();
    }
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

    /// The session that proposed `origin`, if it is this member's current one.
    pub(super) fn session_of(&self, origin: &Origin) -> Option<Arc<Session>> {
        self.lead
            .lock()
            .as_ref()
            .filter(|lead| lead.session.proposed_here(origin))
            .map(|lead| lead.session.clone())
    }

    /// Tells the calls waiting on the session that proposed `origin` what is committed
    /// (as its [`Session::note_committed`] counted it), and releases their events.
    pub(super) fn committed(&self, origin: Origin) {
        if let Some(lead) = &*self.lead.lock()
            && lead.session.proposed_here(&origin)
        {
            lead.session.wake();
            lead.engine
                .release_events(lead.session.committed.load(Ordering::Acquire));
        }
    }

    /// `session` lost a proposal (refused by openraft, see [`Refusal`], or found missing
    /// when a later one committed, see [`Session::note_committed`]): its serving engine
    /// holds a change the log does not, so the leadership is given up. Its calls fail
    /// and learn their outcome from the log; the term is not served again, and the
    /// watcher hands it to another member.
    pub(super) fn lost_proposal(&self, session: &Arc<Session>) {
        let ended = {
            let mut lead = self.lead.lock();
            match lead.take_if(|l| Arc::ptr_eq(&l.session, session)) {
                Some(ended) => ended,
                // Not the current session: its leadership ended already.
                None => return,
            }
        };
        tracing::warn!(
            term = session.term,
            "a proposal of this leadership was refused by the log: the leadership is given up"
        );
        *self.given_up.term.lock() = Some(session.term);
        ended.close();
        self.changed();
        self.given_up.told.notify_one();
    }

    /// Tests: starts of serving fail until `until`, as when a majority does not confirm
    /// the leadership in time.
    #[cfg(test)]
    pub(super) fn fail_starts_until(&self, until: std::time::Instant) {
        *self.failing_starts.lock() = Some(until);
    }

    /// The term this member gave up, if any.
    fn given_up(&self) -> Option<u64> {
        *self.given_up.term.lock()
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
            lead.close();
            self.changed();
        }
    }

    /// The term this member serves, if it serves the group.
    pub(super) fn term(&self) -> Option<u64> {
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
    // The term in which starting to serve failed last: told once per term at info (a
    // leader cut off tries every [`LEAD_AGAIN`] until it is deposed).
    let mut failed_in = None;
    loop {
        // Whether this member leads but could not start serving: tried again after a
        // pause, since nothing in the server metrics changes while it stays the leader.
        let mut lead_failed = false;
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
        // A term given up is not served again, but handed to another member (until one
        // takes it, or the term ends otherwise).
        let given_up = leads && leadership.given_up() == Some(term);
        if given_up {
            hand_term_over(&raft, id).await;
        } else if leads
            && leadership.term().is_none()
            && let Err(e) = lead(&raft, &slot, &leadership, term, host.clone(), &config).await
        {
            if failed_in == Some(term) {
                tracing::debug!(member = id, term, error = %e, "could not start leading yet");
            } else {
                tracing::info!(member = id, term, error = %e, "could not start leading; trying again");
            }
            failed_in = Some(term);
            lead_failed = true;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                // Raft stopped.
                leadership.end();
                return;
            },
            () = leadership.given_up.told.notified() => {}
            () = tokio::time::sleep(HAND_OVER_AGAIN), if given_up => {}
            () = tokio::time::sleep(LEAD_AGAIN), if lead_failed => {}
        }
    }
}

/// How long a leader that could not start serving (its leadership not confirmed by a
/// majority in time: a follower slow to answer, a link cut) waits before it tries again.
/// Before, it waited for a change of its Raft state, which a leader that stays the leader
/// never sees: it led without serving, and calls to its shards failed until the next
/// election.
const LEAD_AGAIN: Duration = Duration::from_millis(100);

/// How long a leader that gave its term up waits for the member it handed the term to
/// before it tries again.
const HAND_OVER_AGAIN: Duration = Duration::from_millis(300);

/// Asks the follower whose log is furthest along to take the leadership over.
async fn hand_term_over(raft: &ShardGroup, me: MemberId) {
    let to = {
        let m = raft.metrics();
        let m = m.borrow_watched();
        m.replication.as_ref().and_then(|followers| {
            followers
                .iter()
                .filter(|(id, _)| **id != me)
                .max_by_key(|(_, matched)| matched.as_ref().map(|l| l.index))
                .map(|(id, _)| *id)
        })
    };
    if let Some(to) = to {
        tracing::info!(to, "handing a given-up term over");
        let _ = raft.trigger().transfer_leader(to).await;
    }
}

/// Starts leading in `term`: waits until everything before the term is applied, then
/// starts the serving engine from the replica's state and the proposal pump.
async fn lead(
    raft: &ShardGroup,
    slot: &EngineSlot,
    leadership: &Leadership,
    term: u64,
    host: Option<Arc<LogHost>>,
    config: &EngineConfig,
) -> Result<(), String> {
    #[cfg(test)]
    if leadership
        .failing_starts
        .lock()
        .is_some_and(|until| std::time::Instant::now() < until)
    {
        return Err("a start made to fail by a test".into());
    }
    raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
        .map_err(|e| e.to_string())?;
    let slot = slot.clone();
    // Cut while the state machine's task waits, between two applies; encoded, and
    // decoded below, on blocking threads (a state of hundreds of MB would hold the
    // node's heartbeats up).
    let image = raft
        .with_state_machine(move |sm: &mut super::StateMachine| {
            let applied = sm.applied_index();
            let engine = slot.engine();
            Box::pin(super::state_machine::image_off_thread(engine, applied))
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
    let (config, proposals) = (config.clone(), session.clone());
    let engine = tokio::task::spawn_blocking(move || {
        Engine::leading(host.as_deref(), config, &image, proposals)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    *leadership.lead.lock() = Some(Lead {
        session: session.clone(),
        engine,
    });
    leadership.changed();
    let raft = raft.clone();
    let give_up: Arc<dyn Fn() + Send + Sync> = {
        let (leadership, session) = (leadership.clone(), Arc::downgrade(&session));
        Arc::new(move || {
            if let Some(session) = session.upgrade() {
                leadership.lost_proposal(&session);
            }
        })
    };
    tokio::spawn(async move {
        // Proposals enter the log in the order they were numbered.
        while let Some(proposal) = outbox.recv().await {
            let written = raft
                .write(proposal)
                .with_leader(under)
                .responder(Refusal(give_up.clone()))
                .await;
            if written.is_err() {
                session.end();
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proposal the log skipped (openraft refused it while the leader's lease was out,
    /// then took the next ones) is never counted as committed: the calls waiting on it
    /// and on the later ones fail (their server learns their outcome from the log), and
    /// the term is given up. Counting the highest committed number, as before, told
    /// the skipped proposal's call that it was committed.
    #[tokio::test]
    async fn a_proposal_the_log_skipped_is_never_counted_committed() {
        let (session, _outbox) = Session::new(4, 1);
        for _ in 0..3 {
            session.propose(Vec::new());
        }
        assert!(session.note_committed(1));
        assert_eq!(session.settled_to(1).map(|r| r.is_ok()), Some(true));
        assert!(
            !session.note_committed(3),
            "proposal 3 was counted though 2 never committed"
        );
        assert!(
            session.settled_to(2).is_none(),
            "a call waiting for proposal 2 was answered"
        );

        let leadership = Leadership::default();
        let engine = Engine::leading(
            None,
            EngineConfig::default(),
            &Engine::replica(None, EngineConfig::default()).image(0),
            session.clone(),
        )
        .unwrap();
        *leadership.lead.lock() = Some(Lead {
            session: session.clone(),
            engine: engine.clone(),
        });
        leadership.lost_proposal(&session);
        assert!(leadership.serving().is_none());
        assert!(engine.is_closed());
        assert!(matches!(
            session.settled_to(3),
            Some(Err(SpaceError::WrongNode { .. }))
        ));
        assert_eq!(leadership.given_up(), Some(4));
    }

    /// A batch's number is kept while the batch is decided: the proposals numbered after
    /// it wait until it is filled, so the log takes every proposal in the order of its
    /// number (which is how commits are counted).
    #[tokio::test]
    async fn proposals_after_a_kept_number_wait_for_it() {
        let (session, mut outbox) = Session::new(4, 1);
        let sent = |outbox: &mut tokio::sync::mpsc::UnboundedReceiver<Proposal>| {
            let mut seqs = Vec::new();
            while let Ok(p) = outbox.try_recv() {
                seqs.push((p.origin.map_or(0, |o| o.seq), p.command));
            }
            seqs
        };
        assert_eq!(session.propose(vec![1]), 1);
        let batch = session.reserve();
        assert_eq!(batch, 2);
        assert_eq!(session.propose(vec![3]), 3);
        let later = session.reserve();
        assert_eq!(session.propose(vec![5]), 5);
        assert_eq!(sent(&mut outbox), vec![(1, vec![1])]);
        // Filled out of order: nothing goes before the number in front.
        session.fill(later, vec![4]);
        assert_eq!(sent(&mut outbox), vec![]);
        session.fill(batch, vec![2]);
        assert_eq!(
            sent(&mut outbox),
            vec![(2, vec![2]), (3, vec![3]), (4, vec![4]), (5, vec![5])]
        );
        assert_eq!(session.propose(vec![6]), 6);
        assert_eq!(sent(&mut outbox), vec![(6, vec![6])]);
    }
}
