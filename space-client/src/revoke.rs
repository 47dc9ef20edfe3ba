//! Giving up remote takes and claims without losing entries.
//!
//! A take removes its entry on the node before the answer travels back. If the caller
//! drops the call meanwhile (a `timeout` around it, an aborted task, a `select!`), or a
//! take across nodes holds a claim it has not committed yet, the entry would be lost (or
//! hidden until a claim lease ran out). Two guards keep that from happening, at no cost in
//! round trips on the normal path:
//!
//! - **a call** that removes or claims entries ([`call`] with `TakeDirect` or `Claim`, and
//!   `Commit` inside an operation) revokes itself if it is dropped before its answer
//!   arrives, or fails without one: the node stops a request still waiting, and puts back
//!   what a finished one took (or releases what it claimed)
//!   ([`Request::Revoke`](space_core::wire::Request));
//! - **an operation** (one take or claim as the user asked for it, which may be several
//!   calls across nodes) records the calls that did complete, and revokes them too unless
//!   it hands its result to the caller: see [`guarded`].
//!
//! Revokes are sent in the background, on the client's runtime, with the connection's
//! usual retries; a node keeps what a revoke needs for its latest requests (the answer
//! table), so a revoke must arrive before that many newer requests did.
//!
//! On a replicated cluster what a call did lives in its shard's replicated answers, and
//! the node that ran it may have stopped leading that shard (or died) before the answer
//! came back. Its revoke then goes to every member too, until the leaders of all shards
//! have given back what the call did there ([`Response::Revoked`]).
//!
//! Revokes (and the other calls a client sends in the background to give entries back)
//! are counted while they run ([`GivingBack`]), so that a process about to exit can wait
//! for them ([`settled`]): a process that exits first (a command-line tool whose take
//! failed, say) drops them, and a take it gave up keeps its entry for good.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::wire::{Request, RequestId, Response};
use space_core::{Result, SpaceError};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::connection::Connection;

tokio::task_local! {
    /// The operation a call belongs to, if it runs inside [`guarded`].
    static OPERATION: Arc<Operation>;
}

/// Connections to every member of the cluster a call went to (those that can be reached):
/// where a revoke goes when the node that ran the call does not lead every shard.
pub(crate) type Members = Arc<dyn Fn() -> BoxFuture<'static, Vec<Arc<Connection>>> + Send + Sync>;

/// A call that completed inside an operation, and whether its answer is worth
/// acknowledging once the operation succeeds ([`worth_acknowledging`]).
type Completed = (Arc<Connection>, RequestId, bool);

/// The calls of one operation that completed: revoked unless the operation succeeds, and
/// acknowledged if it does.
struct Operation {
    completed: Mutex<Vec<Completed>>,
    /// The runtime the operation runs on (where its revokes are sent from, even when its
    /// future is dropped elsewhere).
    runtime: Option<Handle>,
    /// The cluster's members, for revokes on a replicated cluster.
    members: Option<Members>,
}

/// How many calls that give entries back run in the background in this process.
static GIVING_BACK: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::Sender::new(0));

/// One call giving entries back in the background, counted while it lives (its task's
/// end, or its task dropped with its runtime).
pub(crate) struct GivingBack(());

impl GivingBack {
    /// Counts a call that starts now.
    pub(crate) fn start() -> GivingBack {
        GIVING_BACK.send_modify(|n| *n += 1);
        GivingBack(())
    }
}

impl Drop for GivingBack {
    fn drop(&mut self) {
        GIVING_BACK.send_modify(|n| *n -= 1);
    }
}

/// How many calls giving entries back run in the background in this process now.
pub(crate) fn giving_back() -> usize {
    *GIVING_BACK.borrow()
}

/// Waits until no call giving entries back runs in the background in this process. Each
/// ends by itself: a revoke once its nodes answered it, or after trying for
/// [`REVOKE_FOR`]; a call sent with [`RemoteBackend::send`](space_core::remote::RemoteBackend::send)
/// once its retries are out. Cancel-safe (it only waits).
pub(crate) async fn settled() {
    let mut count = GIVING_BACK.subscribe();
    // The sender lives in a static, so the wait ends only when the count reaches 0.
    let _ = count.wait_for(|n| *n == 0).await;
}

/// Sends revokes for `calls`, newest first, in the background on `runtime`.
fn revoke_all(runtime: Option<&Handle>, calls: Vec<Completed>, members: Option<Members>) {
    if calls.is_empty() {
        return;
    }
    let Some(runtime) = runtime.cloned().or_else(|| Handle::try_current().ok()) else {
        tracing::warn!("no runtime to revoke abandoned calls on; their leases will return claims");
        return;
    };
    let counted = GivingBack::start();
    drop(runtime.spawn(async move {
        let _counted = counted;
        for (conn, id, _) in calls.into_iter().rev() {
            revoke(&conn, id, members.as_ref()).await;
        }
    }));
}

/// Revokes call `id` made on `conn`, in the background: for a call that answered
/// without a result but may have done something meanwhile (a wait ended by a shard's
/// failover).
pub(crate) fn abandon(conn: &Arc<Connection>, id: RequestId) {
    let (runtime, members) = OPERATION
        .try_with(|op| (op.runtime.clone(), op.members.clone()))
        .unwrap_or_else(|_| (Handle::try_current().ok(), None));
    revoke_all(runtime.as_ref(), vec![(conn.clone(), id, false)], members);
}

/// How long a revoke keeps trying to reach its node (one that is down for longer has lost
/// the answer table a revoke needs, unless it keeps its data durably).
const REVOKE_FOR: Duration = Duration::from_secs(60);

/// The shards of a replicated cluster where a revoke was done, as nodes answered it.
#[derive(Default)]
struct Coverage {
    covered: BTreeSet<u32>,
    /// The cluster's number of shards, once a replicated node answered.
    shards: Option<u32>,
}

impl Coverage {
    fn note(&mut self, answer: &Result<Response>, addr: &str) {
        match answer {
            Ok(Response::Revoked { shards, of }) => {
                self.covered.extend(shards);
                self.shards = Some(*of);
            }
            Ok(_) => {}
            Err(e) if e.is_unreachable() => {
                tracing::debug!(node = %addr, error = %e, "a revoke waits for a node");
            }
            Err(e) => tracing::warn!(node = %addr, error = %e, "a node refused a revoke"),
        }
    }

    /// Whether every shard of a replicated cluster was covered.
    fn complete(&self) -> bool {
        self.shards
            .is_some_and(|n| self.covered.len() >= n as usize)
    }
}

/// Revokes call `id` made on `conn`, retrying while nodes cannot be reached.
///
/// The node that ran the call is asked until it answers (it stops the call if it still
/// runs there). A node that is not replicated has then undone everything. On a
/// replicated cluster, each node answers for the shards it leads; every member of
/// `members` is asked as well, round after round, until the shards covered add up to
/// all of them.
async fn revoke(conn: &Arc<Connection>, id: RequestId, members: Option<&Members>) {
    revoke_from(Some(conn), id, members, Coverage::default()).await;
}

/// Revokes request `id` on the members `members` names (asked anew each round), for a
/// replicated node that gave up a call of a client that went away and could give back
/// only part of what it did itself: `here` is the node's own answer to the revoke
/// (`Response::Revoked` with the shards it covered). The members are asked round after
/// round, while they cannot be reached, until the shards covered add up to all of them,
/// for a minute at most.
///
/// Only a call whose id its client sends to no other node may be revoked so: a call by
/// query. A call by key may be sent again by its client, with its id, to the key's new
/// owner, and be handed its answer there before this revoke arrives.
///
/// # Cancel safety
/// Dropped, it stops asking; what the members answered so far is done.
pub async fn revoke_on_members(
    id: RequestId,
    here: &Response,
    members: impl Fn() -> Vec<Arc<Connection>> + Send + Sync + 'static,
) {
    if !matches!(here, Response::Revoked { .. }) {
        // Not a replicated node's answer: it undid everything itself.
        return;
    }
    let mut coverage = Coverage::default();
    coverage.note(&Ok(here.clone()), "this node");
    let members: Members = Arc::new(move || {
        let reached = members();
        Box::pin(async move { reached })
    });
    revoke_from(None, id, Some(&members), coverage).await;
}

/// [`revoke`], from `coverage` already had: `origin` (the node that ran the call, when
/// it is not the caller) is asked until it answers, and `members` until the shards
/// covered add up to all of them.
async fn revoke_from(
    origin: Option<&Arc<Connection>>,
    id: RequestId,
    members: Option<&Members>,
    mut coverage: Coverage,
) {
    let give_up = Instant::now() + REVOKE_FOR;
    let mut backoff = Duration::from_millis(50);
    let (mut origin_answered, mut origin_unreachable) = (origin.is_none(), false);
    let origin_addr = origin.map_or("this node", |c| c.addr());
    loop {
        if let Some(conn) = origin.filter(|_| !origin_answered) {
            let answer = conn.call(Request::Revoke(id)).await;
            match &answer {
                Ok(Response::Revoked { .. }) => origin_answered = true,
                // A node that is not replicated undid everything the call did.
                Ok(_) => return,
                Err(e) if e.is_unreachable() => origin_unreachable = true,
                Err(e) => {
                    tracing::warn!(node = %conn.addr(), error = %e, "could not revoke an abandoned call");
                    return;
                }
            }
            coverage.note(&answer, conn.addr());
        }
        if let Some(members) = members
            && !coverage.complete()
            && (coverage.shards.is_some() || origin_unreachable)
        {
            for member in members().await {
                if origin_answered && member.addr() == origin_addr {
                    continue;
                }
                let answer = member.call(Request::Revoke(id)).await;
                coverage.note(&answer, member.addr());
            }
        }
        if origin_answered && coverage.complete() {
            return;
        }
        if Instant::now() + backoff >= give_up {
            tracing::warn!(
                node = %origin_addr,
                covered = ?coverage.covered,
                shards = ?coverage.shards,
                "could not revoke an abandoned call everywhere; claims it made lapse with their leases"
            );
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs one take or claim so that the removing calls it made are revoked unless it returns
/// `Ok` to its caller: if it fails, or the future is dropped first, what they took goes
/// back and what they claimed is released. If it returns `Ok`, their answers are
/// acknowledged ([`Connection::acknowledge`]) where they are worth it.
///
/// `members` reaches the cluster's other nodes, for revokes on a replicated cluster.
pub(crate) async fn guarded<T>(
    members: Option<Members>,
    op: impl Future<Output = Result<T>>,
) -> Result<T> {
    struct Disarm(Option<Arc<Operation>>);
    impl Drop for Disarm {
        fn drop(&mut self) {
            if let Some(op) = self.0.take() {
                revoke_all(
                    op.runtime.as_ref(),
                    std::mem::take(&mut *op.completed.lock()),
                    op.members.clone(),
                );
            }
        }
    }
    let operation = Arc::new(Operation {
        completed: Mutex::new(Vec::new()),
        runtime: Handle::try_current().ok(),
        members,
    });
    let mut guard = Disarm(Some(operation.clone()));
    let result = OPERATION.scope(operation.clone(), op).await;
    if result.is_ok() {
        guard.0 = None;
        for (conn, id, worth) in std::mem::take(&mut *operation.completed.lock()) {
            if worth {
                conn.acknowledge(id);
            }
        }
    }
    result
}

/// Sends `request` on `conn`; a take or claim (and a commit inside an operation) is
/// guarded: given up before its answer arrives, or failed without one (`Unreachable`,
/// `TimedOut`), it is revoked.
pub(crate) async fn call(conn: &Arc<Connection>, request: Request) -> Result<Response> {
    call_as(conn, RequestId::new(), request).await
}

/// As [`call`], with request id `id`, new (never sent before), which the caller keeps
/// (to give the request up by it).
pub(crate) async fn call_as(
    conn: &Arc<Connection>,
    id: RequestId,
    request: Request,
) -> Result<Response> {
    let mut guard = Resent::new(id, &request);
    guard.at(conn);
    let answer = conn.send(id, request, true).await;
    guard.finish(&answer);
    answer
}

/// The guard of a request sent, perhaps again and again with the same id (to a new
/// owner after a failover), until an attempt answers: revoked once if the whole call is
/// given up without an answer, never attempt by attempt, since a later attempt gets the
/// answer of an earlier one that was done (and a revoke would undo what it answers).
pub(crate) struct Resent {
    id: RequestId,
    revocable: bool,
    /// The node keeps entries with the request's answer (a take, claim or commit): the
    /// answer is acknowledged once it reaches its caller for good.
    holds_entries: bool,
    /// Where the last attempt went.
    conn: Option<Arc<Connection>>,
    guard: Option<CallGuard>,
}

impl Resent {
    /// Guards request `request` of id `id` (a take or claim, or a commit inside an
    /// operation; anything else needs no guard).
    pub(crate) fn new(id: RequestId, request: &Request) -> Resent {
        Resent {
            id,
            revocable: revocable(request),
            holds_entries: matches!(
                request,
                Request::TakeDirect { .. } | Request::Claim { .. } | Request::Commit(_)
            ),
            conn: None,
            guard: None,
        }
    }

    /// The next attempt goes to `conn` (where a revoke goes first).
    pub(crate) fn at(&mut self, conn: &Arc<Connection>) {
        if self.holds_entries {
            self.conn = Some(conn.clone());
        }
        if !self.revocable {
            return;
        }
        match &mut self.guard {
            Some(guard) => guard.call = Some((conn.clone(), self.id)),
            None => self.guard = Some(CallGuard::new(conn.clone(), self.id)),
        }
    }

    /// The call ended with `answer`: with no answer (`Unreachable`, `TimedOut`: it may
    /// have been done) or an unknown outcome (`Unavailable`: a replicated node could not
    /// learn what it did, e.g. across a failover or a restart) it is revoked; otherwise
    /// the node answered, or nothing was sent, and it goes to its operation. An answer
    /// that reached its caller for good (outside an operation, or once its operation
    /// succeeds) is acknowledged where it is worth it.
    pub(crate) fn finish(mut self, answer: &Result<Response>) {
        let worth = answer.as_ref().is_ok_and(worth_acknowledging);
        let Some(guard) = self.guard.take() else {
            // Not revocable: the answer is the caller's now.
            if let (true, Some(conn)) = (worth, &self.conn) {
                conn.acknowledge(self.id);
            }
            return;
        };
        match answer {
            Err(
                SpaceError::Unreachable { .. }
                | SpaceError::TimedOut { .. }
                | SpaceError::Unavailable { .. },
            ) => drop(guard),
            // The node gave the request up itself (see [`given_up_by_its_node`]): nothing
            // of it is left to revoke.
            Err(SpaceError::Revoked) => guard.given_back(),
            _ => guard.answered(worth),
        }
    }
}

/// Whether an answer is worth acknowledging: it holds entries the node keeps with it
/// (for a retry or a revoke) that an acknowledgement lets the node drop. A commit always
/// (the node keeps the entry it removed, which its answer does not show); entries taken
/// or claimed when they come to
/// [`ACKNOWLEDGE_FROM_BYTES`](space_core::server::ACKNOWLEDGE_FROM_BYTES) or more, the
/// least for which the node logs an acknowledgement (smaller answers are forgotten with
/// time, and their acknowledgements would cost every take a lookup on the node).
fn worth_acknowledging(answer: &Response) -> bool {
    let large = |bytes: usize| bytes >= space_core::server::ACKNOWLEDGE_FROM_BYTES;
    match answer {
        Response::Documents(documents) => {
            large(documents.iter().map(|d| d.fields.approx_size()).sum())
        }
        Response::Claimed(Some(claimed)) => large(claimed.document.fields.approx_size()),
        Response::Done => true,
        _ => false,
    }
}

/// How many times a call its node gave up itself ([`given_up_by_its_node`]) is sent again
/// with a new id before the caller gets [`SpaceError::Revoked`].
pub(crate) const AFRESH: usize = 3;

/// Whether `answer` says that the node gave the request up itself: a call that its
/// client would revoke ([`revocable`]) whose connection closed after it was handed
/// entries, before its answer went out (the
/// node cannot tell a client that died from one that lost its connection), is revoked by
/// the node, which gives back what it took or claimed, and answers a retry of it
/// [`SpaceError::Revoked`]. This client revokes only calls it has given up, and so
/// never waits for the answer of one it revoked: the call did nothing, and is sent again
/// with a new id.
pub(crate) fn given_up_by_its_node(answer: &Result<Response>) -> bool {
    matches!(answer, Err(SpaceError::Revoked))
}

/// Whether a call of `request` must be revoked when its caller gives it up (told to the
/// node with the call, [`Envelope::revocable`](space_core::wire::Envelope)).
pub(crate) fn revocable(request: &Request) -> bool {
    match request {
        Request::TakeDirect { .. } | Request::Claim { .. } => true,
        // A commit the user asked for stands (the user holds the entry); a commit inside a
        // take is undone if the take does not return the entry.
        Request::Commit(_) => OPERATION.try_with(|_| ()).is_ok(),
        _ => false,
    }
}

/// Revokes its call when dropped before [`answered`](Self::answered).
struct CallGuard {
    call: Option<(Arc<Connection>, RequestId)>,
    runtime: Option<Handle>,
    members: Option<Members>,
}

impl CallGuard {
    /// Guards the call `id` on `conn` (made on the current runtime, in the current
    /// operation if there is one).
    fn new(conn: Arc<Connection>, id: RequestId) -> CallGuard {
        CallGuard {
            call: Some((conn, id)),
            runtime: Handle::try_current().ok(),
            members: OPERATION.try_with(|op| op.members.clone()).ok().flatten(),
        }
    }

    /// The node gave back what the call did: nothing to revoke.
    fn given_back(mut self) {
        self.call = None;
    }

    /// The node answered and the answer reaches the caller: the call is handed to its
    /// operation, if it has one; otherwise the answer is the caller's for good, and is
    /// acknowledged if it is `worth` it.
    fn answered(mut self, worth: bool) {
        if let Some((conn, id)) = self.call.take() {
            let handed =
                OPERATION.try_with(|op| op.completed.lock().push((conn.clone(), id, worth)));
            if handed.is_err() && worth {
                conn.acknowledge(id);
            }
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some((conn, id)) = self.call.take() {
            revoke_all(
                self.runtime.as_ref(),
                vec![(conn, id, false)],
                self.members.take(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Document;
    use space_core::{Fields, Key, NodeId, Value};

    fn document(bytes: usize) -> Document {
        let mut fields = Fields::new();
        fields.push("body", Value::Str("x".repeat(bytes)));
        Document {
            key: Key::Name("k".into()),
            version: 1,
            fields,
        }
    }

    #[test]
    fn answers_holding_large_entries_and_commits_are_worth_acknowledging() {
        use space_core::server::ACKNOWLEDGE_FROM_BYTES;
        let of = |sizes: &[usize]| {
            worth_acknowledging(&Response::Documents(
                sizes.iter().map(|&n| document(n)).collect(),
            ))
        };
        assert!(!of(&[]));
        assert!(!of(&[100, 100]));
        assert!(of(&[ACKNOWLEDGE_FROM_BYTES]));
        // Entries that are small one by one but large together.
        assert!(of(&[ACKNOWLEDGE_FROM_BYTES / 2; 3]));
        assert!(worth_acknowledging(&Response::Done));
        assert!(!worth_acknowledging(&Response::Count(1)));
        assert!(!worth_acknowledging(&Response::Claimed(None)));
    }

    #[tokio::test]
    async fn settling_waits_for_the_calls_giving_entries_back() {
        let giving_back = GivingBack::start();
        assert!(self::giving_back() >= 1);
        let settling = tokio::spawn(settled());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !settling.is_finished(),
            "settled while a call was giving entries back"
        );
        drop(giving_back);
        tokio::time::timeout(Duration::from_secs(10), settling)
            .await
            .expect("settled once the call was done")
            .expect("the wait ran");
    }

    #[test]
    fn a_connection_keeps_the_newest_acknowledgements_up_to_the_bound() {
        let conn = Connection::unmade("127.0.0.1:1", NodeId(1));
        let ids: Vec<RequestId> = (0..space_core::wire::MAX_ACKNOWLEDGED + 2)
            .map(|_| RequestId::new())
            .collect();
        for id in &ids {
            conn.acknowledge(*id);
        }
        let waiting = conn.take_acknowledged();
        assert_eq!(waiting, ids[2..]);
        assert!(conn.take_acknowledged().is_empty());
    }
}
