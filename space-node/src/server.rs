//! The node: an engine served over TCP.
//!
//! Each connection starts with the handshake (a small first frame, read with a short
//! timeout: anything that is not a well-formed `Hello` of this protocol, or carries the
//! wrong token, is refused and the connection closed). Then the connection carries tarpc
//! requests, each run in its own task, with a cap on the requests in flight per connection
//! and the frame size bounded. Blocking requests (take, read, claim with a timeout) are
//! allowed their timeout: the client sets the call's deadline beyond it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use space_core::server::{Answer, Engine};
use space_core::wire::{
    self, Envelope, NodeInfo, NodeStatus, Request, Response, SpaceService, Target,
};
use space_core::{EngineConfig, NodeId, SpaceError, Stats};
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::dedupe::{Dedupe, Finished, GiveBack, Outcome};
use crate::handshake::{self, Door, HANDSHAKE_MAX_FRAME};
use crate::members::Members;
use crate::push::{PushConfig, Pushers};
use crate::replica::{Layout, PeerRouter, ReplicaError, ShardSet, raft_settings};
use crate::stall::FrameDeadline;
use space_core::server::LogHost;

/// Everything a node needs to know to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The address clients are told to use (defaults to `listen`).
    pub advertise: Option<String>,
    /// This node's id.
    pub node: NodeId,
    /// Labels this node carries (`zone=a`), for FindPlaceFor.
    pub labels: Vec<(String, String)>,
    /// The token clients must present; required to listen beyond loopback.
    pub token: Option<String>,
    /// Largest frame accepted, in bytes.
    pub max_frame: usize,
    /// Most requests in flight on one connection (more are answered `Busy`).
    pub max_in_flight: usize,
    /// Most client connections at once (more are refused with `Busy`).
    pub max_connections: usize,
    /// Most blocked reads, takes and claims at once, over all connections.
    pub max_waiters: usize,
    /// Most subscriptions at once, over all clients.
    pub max_subscriptions: usize,
    /// Most subscriptions one client (one subscriber endpoint) holds.
    pub max_subscriptions_per_client: usize,
    /// Most events all subscriptions hold at once (past it they drop their oldest).
    pub max_queued_events: usize,
    /// Most entry types held (empty ones are forgotten).
    pub max_entry_types: usize,
    /// How long a frame may take to arrive once its first byte has.
    pub frame_timeout: Duration,
    /// How long a subscriber endpoint may stay unreachable before its subscriptions are
    /// cancelled.
    pub subscriber_timeout: Duration,
    /// A durable standalone node snapshots its state once its log grew by this many bytes
    /// (or by the size of the last snapshot, if larger). A replicated node shares them
    /// among its shard groups: each snapshots once its Raft log grew by its share (or by
    /// the size of its last snapshot, if larger) and keeps at most its share of entries
    /// behind its snapshot.
    pub snapshot_after_bytes: u64,
    /// A replicated node snapshots a shard once its log grew by this many entries (or by
    /// its share of `snapshot_after_bytes`, whichever comes first).
    pub snapshot_after_entries: u64,
    /// Fault injection: each `fdatasync` of the data directory's log takes this much
    /// longer (a slow disk; zero in service).
    pub sync_delay: Duration,
    /// Fault injection: the data directory's disk is full once its log wrote this many
    /// more bytes (`None` in service).
    pub full_after_bytes: Option<u64>,
    /// Largest entry accepted, in bytes.
    pub max_entry_bytes: u64,
    /// Most entries held.
    pub max_entries: Option<u64>,
    /// Most bytes of entries held.
    pub max_bytes: Option<u64>,
    /// Finished answers kept for retried requests.
    pub dedupe_capacity: usize,
    /// Where the node keeps its entries durably; `None`: in memory only.
    pub data_dir: Option<std::path::PathBuf>,
    /// A replicated cluster's nodes (addresses, the same list on every node, this node's
    /// among them): the ranges are grouped into shards replicated by Raft. Used when the
    /// data directory holds no cluster yet; afterwards the node restarts from it alone.
    pub initial_cluster: Vec<String>,
    /// Shards of a replicated cluster created by this node.
    pub shards: u32,
    /// Replicas per shard of a replicated cluster created by this node (default: 3, or 1
    /// with fewer than 3 nodes).
    pub replication: Option<usize>,
    /// Peers of a replicated cluster reached elsewhere than at their listed address:
    /// (the member's address in the cluster list, where to reach it instead), for a
    /// tunnel, a translated address, or a fault-injecting proxy in tests.
    pub peer_routes: Vec<(String, String)>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            advertise: None,
            node: NodeId(1),
            labels: Vec::new(),
            token: None,
            max_frame: wire::DEFAULT_MAX_FRAME,
            max_in_flight: 20_000,
            max_connections: 4_096,
            max_waiters: 50_000,
            max_subscriptions: 10_000,
            max_subscriptions_per_client: 1_000,
            max_queued_events: 1_000_000,
            max_entry_types: 10_000,
            frame_timeout: Duration::from_secs(30),
            subscriber_timeout: Duration::from_secs(30),
            snapshot_after_bytes: space_core::DEFAULT_SNAPSHOT_AFTER_BYTES,
            snapshot_after_entries: crate::replica::SNAPSHOT_AFTER_ENTRIES,
            sync_delay: Duration::ZERO,
            full_after_bytes: None,
            max_entry_bytes: 1 << 20,
            max_entries: None,
            max_bytes: None,
            dedupe_capacity: 65_536,
            data_dir: None,
            initial_cluster: Vec::new(),
            shards: 64,
            replication: None,
            peer_routes: Vec::new(),
        }
    }
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// The data directory cannot be used.
    #[error("{0}")]
    Storage(#[source] SpaceError),
    /// Listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// How long a node whose data directory failed waits before it stops, so that the
/// calls the failure refused get their typed answers rather than a closed connection.
const STORAGE_FAILURE_GRACE: Duration = Duration::from_millis(250);

/// TCP keepalive on client connections: probed after this long without traffic, every
/// [`KEEPALIVE_INTERVAL`], and closed after [`KEEPALIVE_PROBES`] unanswered probes. A client
/// host that vanished without closing its connections (power loss, a partition) is found
/// within about half a minute, and its waiting calls are dropped like those of a client
/// that closed its connection (see [`run_or_spawn`]).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// Between two keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered keepalive probes that close a connection.
const KEEPALIVE_PROBES: u32 = 3;

/// Turns on TCP keepalive on a client connection ([`KEEPALIVE_IDLE`]).
fn keep_alive(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )
}

/// A running node's shared state.
pub(crate) struct NodeState {
    pub(crate) config: NodeConfig,
    /// The node's engine. A replicated node's calls go to its shards instead, and this
    /// one holds nothing.
    pub(crate) engine: Engine,
    /// A replicated node's shards.
    pub(crate) shards: Option<Arc<ShardSet>>,
    /// The data directory's host (a durable or replicated node): its failure stops the
    /// node.
    pub(crate) storage: Option<Arc<LogHost>>,
    /// Keyless writes this replicated node made: whose turn it is among the shards it
    /// leads (see `sharded`).
    pub(crate) keyless_written: AtomicUsize,
    dedupe: Dedupe,
    pub(crate) pushers: Arc<Pushers>,
    address: String,
    /// The cluster's members and their latest status, for FindPlaceFor.
    pub(crate) members: Arc<Members>,
    /// Client connections open now.
    connections: Arc<AtomicUsize>,
    /// Requests received since the node started.
    operations: std::sync::atomic::AtomicU64,
    /// Permits for scans (counts, pages of contents) running at once: one per worker
    /// thread (see [`NodeState::scan_apart`]).
    scans: Arc<tokio::sync::Semaphore>,
}

impl crate::observed::Observed for NodeState {
    fn token(&self) -> Option<&str> {
        self.config.token.as_deref()
    }

    fn address(&self) -> &str {
        &self.address
    }

    fn topology(&self) -> futures::future::BoxFuture<'_, Option<wire::Topology>> {
        Box::pin(async move {
            match self.handle(Request::Topology, usize::MAX).await {
                Ok(Outcome::Answer(Response::Topology(t))) => Some(t),
                _ => None,
            }
        })
    }

    fn stats(&self) -> futures::future::BoxFuture<'_, Option<Stats>> {
        Box::pin(async move {
            match self.handle(Request::Stats, usize::MAX).await {
                Ok(Outcome::Answer(Response::Stats(stats))) => Some(stats),
                _ => None,
            }
        })
    }

    fn progress(&self) -> Vec<crate::replica::ShardProgress> {
        self.shards
            .as_ref()
            .map(|shards| shards.progress())
            .unwrap_or_default()
    }

    /// A replicated node is ready once its meta group has committed the cluster's layout
    /// (its shards are formed from it) and every shard it replicates has a leader. It
    /// knows the leaders of those only: on a cluster of more nodes than replicas, the
    /// others are no concern of its own.
    fn unready(&self) -> Option<String> {
        if let Some(reason) = self.storage.as_ref().and_then(|host| host.failure()) {
            return Some(format!("the data directory cannot be written: {reason}"));
        }
        let shards = self.shards.as_ref()?;
        if self.meta_group()?.layout_version == 0 {
            return Some("the meta group has not committed the cluster's layout yet".into());
        }
        let me = self.config.node;
        let leaderless = shards
            .shard_infos()
            .iter()
            .filter(|s| s.replicas.contains(&me) && s.leader.is_none())
            .count();
        (leaderless > 0).then(|| format!("{leaderless} shards replicated here have no leader"))
    }

    fn meta_group(&self) -> Option<wire::MetaGroupInfo> {
        self.shards.as_ref().map(|shards| shards.meta_group())
    }

    fn shards(&self) -> Option<(Vec<wire::ShardInfo>, usize)> {
        self.shards
            .as_ref()
            .map(|shards| (shards.shard_infos(), shards.serving().len()))
    }
}

/// The tarpc service: one per connection, sharing the node's state.
#[derive(Clone)]
struct Service {
    state: Arc<NodeState>,
    /// Most bytes of documents in one answer on this connection.
    reply_budget: usize,
}

impl SpaceService for Service {
    async fn call(
        self,
        _ctx: context::Context,
        envelope: Envelope,
    ) -> Result<Response, SpaceError> {
        let operation = envelope.request.kind();
        let started = std::time::Instant::now();
        self.state.operations.fetch_add(1, Ordering::Relaxed);
        // Boxed: an answer's future is about 8 KB, and the request's future (tarpc's,
        // holding this one) is moved several times on its way to its first poll; inline,
        // each move copied it whole (9.4 KB; boxed, 1 KB).
        let answer = Box::pin(self.answer(envelope)).await;
        crate::admin::count_operation(operation, answer.as_ref().err(), started.elapsed());
        answer
    }
}

impl Service {
    /// Runs one request (deduplicated when it mutates) and gives its answer.
    async fn answer(self, envelope: Envelope) -> Result<Response, SpaceError> {
        let state = self.state;
        let budget = self.reply_budget;
        if envelope.acknowledged.len() > wire::MAX_ACKNOWLEDGED {
            return Err(SpaceError::Protocol {
                reason: format!(
                    "a call acknowledges {} answers, more than the {} allowed",
                    envelope.acknowledged.len(),
                    wire::MAX_ACKNOWLEDGED
                ),
            });
        }
        state.acknowledge(&envelope.acknowledged);
        // Decoded fresh from the wire, the request is not shared: unwrapping copies nothing.
        let request = std::sync::Arc::unwrap_or_clone(envelope.request);
        if request.mutates() {
            let (id, retry, fresh, revocable) = (
                envelope.id,
                envelope.retry,
                envelope.fresh,
                envelope.revocable,
            );
            let keyless = request.routing_key().is_none();
            let give_back = match &request {
                _ if !revocable => GiveBack::Never,
                Request::TakeDirect {
                    target: Target::Query(_),
                    ..
                }
                | Request::Claim { .. } => GiveBack::Everywhere,
                _ => GiveBack::Here,
            };
            // A write batch answers with one receipt per entry; a shard's answer table
            // holds only that shard's part of a batch that spanned several.
            let entries = match &request {
                Request::WriteDirect { entries, .. } => Some(entries.len()),
                _ => None,
            };
            let answer = crate::engines_used::tracking_engines(state.dedupe.run_then(
                id,
                || async {
                    // A retry that crossed a shard's failover: its first answer is in
                    // the shard's replicated answer table. The serving engine's table
                    // holds what is not committed yet too (a retry of a request whose
                    // first run was dropped before it answered): the answer waits for
                    // the engine's changes to commit like any other. A request by key
                    // goes to its key's shard, which answers it or says who leads it; one
                    // sent again without a key may have run on any shard of this node.
                    // An id its client never sent before has no answer anywhere.
                    let known = match &state.shards {
                        Some(_) if fresh && !retry => None,
                        Some(shards) if retry && keyless => {
                            shards.answer_sent_again(id, SETTLE_AFTER_STEP_DOWN).await?
                        }
                        Some(shards) => shards.answer(id).map(|(s, e, a)| (s, Some(e), a)),
                        None => None,
                    };
                    if let Some((shard, engine, answer)) = known {
                        // A serving engine's answer waits for its changes to commit.
                        if let Some(engine) = engine {
                            crate::engines_used::note_used(shard, &engine);
                        }
                        return finished_of(answer);
                    }
                    // The changes are logged with the request id.
                    InRequest {
                        engine: &state.engine,
                        id,
                        inner: Box::pin(state.handle(request, budget)),
                    }
                    .await
                },
                // The answer goes out only once the changes are durable (committed).
                |finished| async {
                    match (state.flush().await, &state.shards) {
                        (Ok(()), _) => finished,
                        // A leadership ended before the changes were known committed.
                        (Err(e @ SpaceError::WrongNode { .. }), Some(shards)) => {
                            settle_after_step_down(shards, id, e).await
                        }
                        (Err(e), _) => Err(e),
                    }
                },
                // What a call its client would revoke took or claimed goes back if the
                // client goes away before the answer (a worker's commit stands).
                give_back,
            ))
            .await;
            let answer = whole(answer, entries);
            tracing::trace!(request = ?id, ?answer, "answered");
            answer
        } else if let (Some(shards), Request::ReadDirect { .. }) = (&state.shards, &request) {
            // A read on a replicated node is answered once the shards it read from
            // confirm it (see `ShardSet::confirm_read`).
            crate::engines_used::tracking_engines(async {
                let answer = state.handle(request, budget).await?.into_response();
                shards.confirm_read(&crate::engines_used::used()).await?;
                Ok(answer)
            })
            .await
        } else {
            state
                .handle(request, budget)
                .await
                .map(Outcome::into_response)
        }
    }
}

/// Scans a node runs at once: one per worker thread of the runtime it starts on (one on
/// a single-threaded runtime). More would not finish sooner on that many cores.
fn scan_permits() -> usize {
    tokio::runtime::Handle::try_current()
        .map_or(1, |h| h.metrics().num_workers())
        .max(1)
}

/// Runs a request's future with the engine told which request it serves, on every poll
/// (the engine's calls happen inside polls, on whatever thread polls).
struct InRequest<'a, T> {
    engine: &'a Engine,
    id: wire::RequestId,
    inner: std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>,
}

impl<T> Future for InRequest<'_, T> {
    type Output = T;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        let this = &mut *self;
        this.engine
            .with_request(this.id, || this.inner.as_mut().poll(cx))
    }
}

/// How long a request whose shard leadership ended waits for the shard to settle, to
/// learn whether its changes were committed.
const SETTLE_AFTER_STEP_DOWN: Duration = Duration::from_secs(5);

/// The answer of request `id` whose changes were made by a shard leadership that ended
/// before they were known committed (`err` says so): the first answer the shard's log
/// committed for it, as this node's replica applies it once the shard has a new leader;
/// `err` when the log holds none (nothing was done, and a retry runs it anew).
///
/// # Errors
/// `err` when nothing was committed; [`SpaceError::Unavailable`] when it cannot be known
/// within [`SETTLE_AFTER_STEP_DOWN`] (the outcome is unknown).
async fn settle_after_step_down(
    shards: &ShardSet,
    id: wire::RequestId,
    err: SpaceError,
) -> Finished {
    for (shard, engine) in crate::engines_used::used() {
        if !engine.is_closed() {
            continue;
        }
        if let Some(answer) = shards
            .settled_answer(shard, id, SETTLE_AFTER_STEP_DOWN)
            .await?
        {
            return finished_of(answer);
        }
    }
    Err(err)
}

/// `answer` to a write of `entries` entries, unless it holds only part of the batch:
/// then what the rest did is not known, and the write's outcome is reported unknown
/// (`Unavailable`) rather than acknowledged whole. One shard's answers hold only its part
/// of a batch that spanned shards (a retry after a failover); a log keeps a batch whole
/// or not at all (one record, or one entry of a group's log), but a request id sent
/// again with other entries finds the first request's.
fn whole(
    answer: Result<Response, SpaceError>,
    entries: Option<usize>,
) -> Result<Response, SpaceError> {
    match (&answer, entries) {
        (Ok(Response::Receipts(r)), Some(n)) if r.len() < n => Err(SpaceError::Unavailable {
            reason: format!(
                "{} of the batch's {n} entries are known written; the outcome of the others is not known",
                r.len()
            ),
        }),
        _ => answer,
    }
}

/// A request's end as the answer the engine's state kept for it says.
fn finished_of(answer: Answer) -> Finished {
    Ok(Outcome::Answer(match answer {
        Answer::Receipts(r) => Response::Receipts(r),
        Answer::Documents(d) => Response::Documents(d),
        Answer::Claimed(c) => Response::Claimed(Some(c)),
        Answer::Done => Response::Done,
        Answer::Revoked => return Err(SpaceError::Revoked),
        Answer::Acknowledged => return Err(SpaceError::Acknowledged),
    }))
}

impl NodeState {
    /// Runs `scan`, a walk over an entry type (a count of a million entries takes a good
    /// part of a second; a page of contents), apart from the node's other work, once one
    /// of the node's scan permits is free: on a thread of its own (tokio's blocking
    /// pool), since a runtime thread busy in one task neither runs the others queued
    /// behind it nor polls the sockets for new requests (a status call sent behind a long
    /// count on the same connection, which the client uses to tell a frozen node from a
    /// busy one, waited for the whole count). At most one scan per worker thread runs at
    /// once, and the others wait without holding a thread: a flood of counts takes no
    /// more threads and cores than the node has workers, and writes and takes keep being
    /// served beside them.
    ///
    /// # Cancel safety
    /// Dropped while it waits, it gives its place up. Once running, the scan finishes,
    /// and holds its permit until it does (a caller that gives up does not free a place
    /// for another scan beside it).
    ///
    /// # Errors
    /// [`SpaceError::Unavailable`] if the permits were closed or the runtime is shutting
    /// down (neither happens while the node runs).
    pub(crate) async fn scan_apart<T: Send + 'static>(
        &self,
        scan: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SpaceError> {
        let stopping = || SpaceError::Unavailable {
            reason: "the node is stopping: no scan runs".into(),
        };
        let permit = self
            .scans
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopping())?;
        let ran = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            scan()
        })
        .await;
        match ran {
            Ok(done) => Ok(done),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(stopping()),
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            node: self.config.node,
            address: self.address.clone(),
            labels: self.config.labels.clone(),
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        NodeStatus {
            info: self.info(),
            // A replicated node's own engine holds nothing: what it holds is in its
            // replicas of the shards (what its limits bound).
            held_bytes: match &self.shards {
                Some(shards) => shards.held_bytes(),
                None => self.engine.held_bytes(),
            },
            max_bytes: self.config.max_bytes,
            held_entries: match &self.shards {
                Some(shards) => shards.held_entries(),
                None => self.engine.held_entries(),
            },
            max_entries: self.config.max_entries,
        }
    }

    /// Starts pushing `sub` to `endpoint`; returns the subscription's id.
    pub(crate) async fn push_to(
        &self,
        sub: space_core::Subscription,
        endpoint: Option<wire::Endpoint>,
    ) -> Result<u64, SpaceError> {
        self.pushers.start(sub, endpoint).await
    }

    /// The callers of `ids` have their answers ([`wire::Envelope::acknowledged`]): the
    /// entries kept with those answers, in this node's table of recent answers and (for
    /// answers large enough to be worth a logged command) in the answers of the engines
    /// that decide here (a durable engine's, or those of the shards this node leads,
    /// through their logs), are dropped. Answers kept elsewhere (a shard this node no
    /// longer leads) are forgotten with time, as before.
    fn acknowledge(&self, ids: &[wire::RequestId]) {
        if ids.is_empty() {
            return;
        }
        // Answers too small for an engine to log an acknowledgement of cost nothing more.
        let ids = self
            .dedupe
            .acknowledge(ids, space_core::server::ACKNOWLEDGE_FROM_BYTES);
        if ids.is_empty() {
            return;
        }
        let ids = ids.as_slice();
        match &self.shards {
            Some(shards) => {
                for (_, engine) in shards.serving().iter() {
                    engine.acknowledge(ids);
                }
            }
            None => {
                self.engine.acknowledge(ids);
            }
        }
    }

    /// Stops request `id` if it still runs here, and refuses it if it comes again
    /// ([`Request::Revoke`] on a replicated node, which gives back what a finished one
    /// did from its shards' answers instead).
    pub(crate) async fn stop_request(&self, id: wire::RequestId) {
        drop(self.dedupe.revoke(id).await);
    }

    /// Gives back what request `id` took or claimed, its caller having gone away
    /// before its answer went out (see `Dedupe::on_vanished`): as the caller's own revoke
    /// would, on this node, and, with [`GiveBack::Everywhere`], on the other members for
    /// the shards this node does not lead (the request's shard may have a new leader by
    /// now, which committed what the request did).
    async fn give_back_vanished(&self, id: wire::RequestId, reach: GiveBack) {
        let here = match self.handle(Request::Revoke(id), 0).await {
            Ok(done) => done.into_response(),
            Err(e) => {
                tracing::warn!(request = ?id, error = %e, "what a vanished caller's request took could not be given back");
                return;
            }
        };
        tracing::debug!(request = ?id, ?here, "gave back what a vanished caller's request took");
        if reach == GiveBack::Everywhere
            && let Response::Revoked { shards, of } = &here
            && shards.len() < *of as usize
        {
            let members = self.members.clone();
            space_client::revoke_on_members(id, &here, move || members.reached()).await;
        }
    }

    /// Undoes what a revoked request did that its caller never saw.
    fn undo(&self, finished: Finished) {
        match finished {
            Ok(Outcome::Taken(taken)) => {
                for t in taken {
                    if let Some(engine) = self.engine_for(t.key()) {
                        engine.untake(vec![t]);
                    }
                }
            }
            Ok(Outcome::Committed(Some(taken))) => {
                if let Some(engine) = self.engine_for(taken.key()) {
                    engine.untake(vec![taken]);
                }
            }
            Ok(Outcome::Answer(Response::Claimed(Some(claimed)))) => {
                // Fails only if the claim already ended, and then the entry is back anyway.
                if let Some(engine) = self.engine_for(&claimed.ticket.key) {
                    let _ = engine.release(&claimed.ticket);
                }
            }
            _ => {}
        }
    }

    /// Refuses keyless entries asking for labels this node does not carry.
    pub(crate) fn check_labels(&self, labels: &[(String, String)]) -> Result<(), SpaceError> {
        match labels.iter().find(|l| !self.config.labels.contains(l)) {
            Some((k, v)) => Err(SpaceError::Full {
                reason: format!("this node does not carry the label {k}={v}"),
            }),
            None => Ok(()),
        }
    }

    /// Client connections open now.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests received since the node started.
    pub(crate) fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// The engine that holds `key` here: the node's, or its shard's while this node
    /// leads it.
    fn engine_for(&self, key: &space_core::Key) -> Option<Engine> {
        match &self.shards {
            Some(shards) => crate::engines_used::serving_for(shards, key).ok(),
            None => Some(self.engine.clone()),
        }
    }

    /// Waits until every change made so far is durable (for shards: until what the
    /// request being served did is committed).
    async fn flush(&self) -> Result<(), SpaceError> {
        match &self.shards {
            // The engines the request was handed, serving or not any more: one whose
            // leadership ended fails unless what the request did there was committed.
            Some(_) => {
                for (_, engine) in crate::engines_used::used() {
                    engine.flush().await?;
                }
                Ok(())
            }
            None => self.engine.flush().await,
        }
    }

    /// Runs one request: on the shards of a replicated node (see `sharded`), else on the
    /// node's engine. Answers that carry many documents stop at `budget` bytes of them.
    pub(crate) async fn handle(&self, request: Request, budget: usize) -> Finished {
        if let Some(shards) = &self.shards {
            return self.handle_sharded(shards, request, budget).await;
        }
        self.handle_on(&self.engine, request, budget).await
    }

    /// Runs one request on `engine` (the node's, or the shard's that the request's key
    /// belongs to).
    pub(crate) async fn handle_on(
        &self,
        engine: &Engine,
        request: Request,
        budget: usize,
    ) -> Finished {
        let answer = match request {
            Request::WriteDirect {
                entry_type,
                indexes,
                entries,
                lease,
                labels,
            } => {
                self.check_labels(&labels)?;
                for field in &indexes {
                    engine.create_index(&entry_type, field)?;
                }
                Response::Receipts(engine.write_all(&entry_type, &[], entries, lease)?)
            }
            Request::ReadDirect { target, timeout } => Response::Document(match target {
                Target::Key { entry_type, key } => engine.read_key(&entry_type, &key),
                Target::Query(q) => engine.read(&q, timeout)?.wait_async().await,
            }),
            Request::TakeDirect {
                target,
                max,
                timeout,
            } => {
                return Ok(Outcome::Taken(match target {
                    Target::Key { entry_type, key } => engine
                        .take_key_entry(&entry_type, &key)
                        .into_iter()
                        .collect(),
                    Target::Query(q) => {
                        engine
                            .take_entries(&q, max.max(1) as usize, budget, timeout)?
                            .wait_async()
                            .await
                    }
                }));
            }
            Request::Claim {
                query,
                lease,
                timeout,
            } => Response::Claimed(engine.claim(&query, lease, timeout)?.wait_async().await),
            Request::Revoke(id) => {
                if let Some(finished) = self.dedupe.revoke(id).await {
                    self.undo(finished);
                }
                // A durable engine's answers know what the request did even across a
                // restart; given back once only.
                engine.give_back(id);
                self.flush().await?;
                Response::Done
            }
            Request::Commit(t) => return Ok(Outcome::Committed(engine.commit_entry(&t)?)),
            Request::Release(t) => engine.release(&t).map(|()| Response::Done)?,
            Request::RenewClaim(t, lease) => {
                Response::Expires(Some(engine.renew_claim(&t, lease)?))
            }
            Request::Renew {
                entry_type,
                key,
                lease,
            } => Response::Expires(engine.renew(&entry_type, &key, lease)?),
            Request::Cancel { entry_type, key } => {
                engine.cancel(&entry_type, &key).map(|()| Response::Done)?
            }
            Request::Count(q) => {
                let engine = engine.clone();
                Response::Count(self.scan_apart(move || engine.count(&q)).await??)
            }
            Request::Contents {
                query,
                after,
                limit,
            } => {
                let engine = engine.clone();
                let (documents, next) = self
                    .scan_apart(move || {
                        engine.contents_page_within(
                            &query,
                            after,
                            limit.clamp(1, 10_000) as usize,
                            budget,
                        )
                    })
                    .await??;
                Response::Page {
                    documents,
                    next,
                    listed: Vec::new(),
                    of: 0,
                }
            }
            // A standalone node owns every key.
            Request::FindFor(_) => Response::Node(self.info()),
            Request::FindPlaceFor { key, size, labels } => Response::Node(self.members.place(
                key.map(|_| 0),
                &[0],
                size,
                &labels,
                self.status(),
            )?),
            Request::Subscribe {
                query,
                kinds,
                lease,
                endpoint,
            } => {
                let sub = engine.subscribe(&query, kinds, lease)?;
                Response::Subscribed(self.push_to(sub, endpoint).await?)
            }
            Request::Poll { id, after, wait } => {
                let (notifications, ended) = self.pushers.poll(id, after, wait).await?;
                Response::Notifications {
                    notifications,
                    ended,
                }
            }
            Request::Resume {
                id,
                last_seq,
                endpoint,
            } => {
                self.pushers.resume(id, last_seq, endpoint)?;
                Response::Done
            }
            Request::RenewSubscription { id, lease } => match self.pushers.get(id) {
                Some(sub) => sub.renew(lease).map(|()| Response::Done)?,
                None => return Err(SpaceError::SubscriptionClosed { id }),
            },
            Request::CancelSubscription(id) => {
                self.pushers.cancel(id);
                Response::Done
            }
            Request::SubscribeShards { .. }
            | Request::RenewShards { .. }
            | Request::PollShards { .. }
            | Request::CancelShards { .. } => {
                return Err(SpaceError::Protocol {
                    reason: "this node is not part of a replicated cluster: it has no shards; subscribe with it directly".into(),
                });
            }
            Request::Topology => Response::Topology(self.members.alone()),
            // Not a replicated node: no shards, no meta group.
            Request::Shards => Response::Shards(Vec::new()),
            Request::MetaGroup => Response::MetaGroup(None),
            Request::Schema(entry_type) => Response::Schema(engine.schema(&entry_type)),
            Request::NodeStatus => Response::NodeStatus(self.status()),
            Request::Stats => Response::Stats(Stats {
                connections: self.connections() as u64,
                operations: self.operations(),
                subscribers: self.pushers.endpoints() as u64,
                ..engine.stats()
            }),
        };
        Ok(Outcome::Answer(answer))
    }
}

/// The data directory of a replicated node: one that was given `--initial-cluster`, or
/// whose directory holds a cluster already. `None` for a standalone node.
fn replicated_dir(config: &NodeConfig) -> Result<Option<&std::path::Path>, NodeError> {
    let Some(dir) = config.data_dir.as_deref() else {
        if config.initial_cluster.is_empty() {
            return Ok(None);
        }
        return Err(NodeError::Config(
            "a replicated cluster (--initial-cluster) needs --data-dir".into(),
        ));
    };
    let created = Layout::load(dir)
        .map_err(|e| NodeError::Config(e.to_string()))?
        .is_some();
    if !created && config.initial_cluster.is_empty() {
        return Ok(None);
    }
    Ok(Some(dir))
}

/// A replicated node's layout, kept in `dir` or made from the configuration (and kept
/// there), and the node's member id in it (also its node id).
fn cluster_layout(
    config: &NodeConfig,
    dir: &std::path::Path,
    address: &str,
) -> Result<(Layout, crate::replica::MemberId), NodeError> {
    let bad = |e: ReplicaError| NodeError::Config(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| {
        NodeError::Storage(SpaceError::Storage {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })
    })?;
    let layout = match Layout::load(dir).map_err(bad)? {
        Some(layout) => {
            if !config.initial_cluster.is_empty() && config.initial_cluster != layout.nodes {
                return Err(NodeError::Config(format!(
                    "{} holds a cluster of {:?}, not {:?}",
                    dir.display(),
                    layout.nodes,
                    config.initial_cluster
                )));
            }
            layout
        }
        None => {
            let n = config.initial_cluster.len();
            let replication = config.replication.unwrap_or(if n >= 3 { 3 } else { 1 });
            let layout = Layout::new(config.initial_cluster.clone(), config.shards, replication)
                .map_err(bad)?;
            layout.save(dir).map_err(bad)?;
            layout
        }
    };
    let me = layout.member_id(address).ok_or_else(|| {
        NodeError::Config(format!(
            "this node's address {address} is not among the cluster's nodes {:?}; pass --advertise with its address in the list",
            layout.nodes
        ))
    })?;
    Ok((layout, me))
}

/// Starts member `me` of a replicated cluster of `layout` on `dir`; creates the shards
/// this node is first replica of. A shard's leading engine checks the room of its other
/// replicas' nodes as `members` last heard it.
async fn start_shards(
    config: &NodeConfig,
    dir: &std::path::Path,
    layout: Layout,
    me: crate::replica::MemberId,
    engine: &EngineConfig,
    members: &Arc<Members>,
) -> Result<Arc<ShardSet>, NodeError> {
    let bad = |e: ReplicaError| NodeError::Config(e.to_string());
    let host = {
        let dir = dir.to_path_buf();
        let config = engine.clone();
        tokio::task::spawn_blocking(move || LogHost::open(dir, &config))
            .await
            .map_err(|e| NodeError::Config(format!("recovery did not finish: {e}")))?
            .map_err(NodeError::Storage)?
    };
    let router = PeerRouter::new(me, config.token.clone(), layout.fingerprint());
    for (member, via) in &config.peer_routes {
        let id = layout.member_id(member).ok_or_else(|| {
            NodeError::Config(format!(
                "--peer-via names {member}, which is not among the cluster's nodes {:?}",
                layout.nodes
            ))
        })?;
        router.route_via(id, via.clone());
    }
    let set = ShardSet::start(
        layout,
        me,
        &host,
        &router,
        raft_settings(config.snapshot_after_entries).map_err(bad)?,
        engine.clone(),
        &|others| {
            let indexes = others.iter().map(|id| (*id - 1) as usize).collect();
            Some(members.room_check(indexes))
        },
    )
    .await
    .map_err(bad)?;
    let set = Arc::new(set);
    tokio::spawn(crate::replica::rebalance(Arc::downgrade(&set)));
    let creating = set.clone();
    tokio::spawn(async move {
        if let Err(e) = creating.create().await {
            tracing::error!(error = %e, "could not create this node's shards");
        }
    });
    Ok(set)
}

/// Whether listening on `addr` needs a token: anything but loopback does.
fn needs_token(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// A node bound to its address, ready to serve.
pub struct Node {
    state: Arc<NodeState>,
    listener: TcpListener,
}

impl Node {
    /// Checks the configuration and binds the listening socket.
    ///
    /// # Errors
    /// [`NodeError::Config`] when listening beyond loopback without a token, or for bad
    /// limits; [`NodeError::Listen`] when the address cannot be bound.
    pub async fn bind(config: NodeConfig) -> Result<Node, NodeError> {
        if needs_token(&config.listen) && config.token.as_deref().is_none_or(str::is_empty) {
            return Err(NodeError::Config(format!(
                "listening on {} (beyond loopback) requires an auth token: pass --auth-token or --auth-token-file",
                config.listen
            )));
        }
        if config.max_frame < 1024 {
            return Err(NodeError::Config(
                "the frame limit must be at least 1024 bytes".into(),
            ));
        }
        if config.max_entry_bytes > config.max_frame as u64 / 2 {
            return Err(NodeError::Config(format!(
                "the entry limit ({} bytes) must be at most half the frame limit ({} bytes), so that every entry fits in an answer",
                config.max_entry_bytes, config.max_frame
            )));
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| NodeError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
        let address = config
            .advertise
            .clone()
            .unwrap_or_else(|| local.to_string());
        let mut config = config;
        let replicated = match replicated_dir(&config)? {
            Some(dir) => {
                let dir = dir.to_path_buf();
                let (layout, me) = cluster_layout(&config, &dir, &address)?;
                // A replicated node's id is its member id, as the topology names it.
                config.node = NodeId(me);
                Some((dir, layout, me))
            }
            None => None,
        };
        let members = Arc::new(match &replicated {
            Some((_, layout, me)) => Members::new(
                &layout.nodes,
                (me - 1) as usize,
                &config.labels,
                &config.peer_routes,
            ),
            None => Members::single(NodeInfo {
                node: config.node,
                address: address.clone(),
                labels: config.labels.clone(),
            }),
        });
        let mut engine_config = EngineConfig::default();
        engine_config.node = config.node;
        engine_config.max_entry_bytes = Some(config.max_entry_bytes);
        engine_config.max_entries = config.max_entries;
        engine_config.max_bytes = config.max_bytes;
        engine_config.max_entry_types = Some(config.max_entry_types);
        engine_config.max_waiters = Some(config.max_waiters);
        engine_config.max_subscriptions = Some(config.max_subscriptions);
        engine_config.max_queued_events = Some(config.max_queued_events);
        engine_config.snapshot_after_bytes = config.snapshot_after_bytes;
        engine_config.sync_delay = config.sync_delay;
        engine_config.full_after_bytes = config.full_after_bytes;
        let shards = match replicated {
            Some((dir, layout, me)) => {
                Some(start_shards(&config, &dir, layout, me, &engine_config, &members).await?)
            }
            None => None,
        };
        let engine = match &config.data_dir {
            // A replicated node keeps its shards in the data directory; its own engine
            // holds nothing.
            Some(_) if shards.is_some() => Engine::new(engine_config),
            Some(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || Engine::open(dir, engine_config))
                    .await
                    .map_err(|e| NodeError::Config(format!("recovery did not finish: {e}")))?
                    .map_err(NodeError::Storage)?
            }
            None => Engine::new(engine_config),
        };
        let storage = match &shards {
            Some(shards) => Some(shards.host().clone()),
            None => engine.log_host(),
        };
        let dedupe = Dedupe::new(config.dedupe_capacity);
        // Answers found in the log: a client retrying across the crash gets them.
        for (id, answer) in engine.answers() {
            dedupe.seed(id, finished_of(answer));
        }
        if shards.is_some() {
            members.start_polling(config.token.clone());
        }
        let state = Arc::new(NodeState {
            members,
            dedupe,
            pushers: Arc::new(Pushers::new(PushConfig {
                node: config.node,
                max_frame: config.max_frame,
                subscriber_timeout: config.subscriber_timeout,
                max_per_endpoint: config.max_subscriptions_per_client,
            })),
            connections: Arc::new(AtomicUsize::new(0)),
            operations: 0.into(),
            config,
            engine,
            shards,
            storage,
            keyless_written: AtomicUsize::new(0),
            address,
            scans: Arc::new(tokio::sync::Semaphore::new(scan_permits())),
        });
        if let Some(set) = &state.shards {
            tokio::spawn(crate::replica::push_led(
                Arc::downgrade(set),
                state.pushers.clone(),
            ));
        }
        let node = Arc::downgrade(&state);
        state.dedupe.on_vanished(Box::new(move |id, reach| {
            if let (Some(state), Ok(runtime)) =
                (node.upgrade(), tokio::runtime::Handle::try_current())
            {
                runtime.spawn(async move { state.give_back_vanished(id, reach).await });
            }
        }));
        Ok(Node { state, listener })
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves the admin endpoints (`/metrics`, `/health/live`, `/health/ready`; see
    /// `admin`) on `addr`, from now until the process ends; returns the bound address.
    ///
    /// # Errors
    /// [`NodeError::Config`] beyond loopback without a token, or when the metrics
    /// recorder cannot be installed; [`NodeError::Listen`] when `addr` cannot be bound.
    pub async fn serve_admin(&self, addr: SocketAddr) -> Result<SocketAddr, NodeError> {
        if needs_token(&addr) && self.state.config.token.as_deref().is_none_or(str::is_empty) {
            return Err(NodeError::Config(format!(
                "the admin listener on {addr} (beyond loopback) requires an auth token: pass --auth-token or --auth-token-file"
            )));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NodeError::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| NodeError::Listen { addr, source })?;
        crate::admin::serve(listener, self.state.clone()).map_err(NodeError::Config)?;
        Ok(bound)
    }

    /// Serves until `shutdown` completes: accepts connections, then stops accepting, ends
    /// subscriptions and returns. Requests already running finish on their own tasks.
    ///
    /// # Errors
    /// [`NodeError::Storage`] at once when the data directory can no longer be written
    /// (its log failed: a full disk, an I/O error). Nothing is acknowledged from then on,
    /// and what the engines hold in memory may be ahead of the disk, so the caller should
    /// stop the process as a crash would (the node's binary exits), not serve on: a
    /// restarted node recovers what the disk holds, and a replicated node's shards fail
    /// over to their other replicas meanwhile.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let state = self.state;
        let config = &state.config;
        let durability = match (&config.data_dir, &state.shards) {
            (Some(_), Some(_)) => "replicated",
            (Some(_), None) => "durable",
            (None, _) => "memory",
        };
        tracing::info!(
            version = %env!("CARGO_PKG_VERSION"),
            node = %config.node,
            address = %state.address,
            %durability,
            data_dir = ?config.data_dir,
            auth = config.token.is_some(),
            max_entries = ?config.max_entries,
            max_bytes = ?config.max_bytes,
            max_entry_bytes = config.max_entry_bytes,
            max_connections = config.max_connections,
            max_waiters = config.max_waiters,
            max_subscriptions = config.max_subscriptions,
            dedupe_capacity = state.dedupe.capacity(),
            "serving"
        );
        tokio::pin!(shutdown);
        let storage = state.storage.clone();
        let storage_failed = async move {
            match storage {
                Some(host) => (host.dir().display().to_string(), host.failed().await),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(storage_failed);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                (path, reason) = &mut storage_failed => {
                    tracing::error!(dir = %path, %reason, "the data directory cannot be written: the node stops");
                    // The calls the failure refused get their answers out first.
                    tokio::time::sleep(STORAGE_FAILURE_GRACE).await;
                    return Err(NodeError::Storage(SpaceError::Storage { path, reason }));
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let state = state.clone();
                        tokio::spawn(async move {
                            if let Err(reason) = serve_connection(state, stream).await {
                                tracing::debug!(%peer, %reason, "connection closed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        state.pushers.cancel_all();
        if config.data_dir.is_none() {
            // What a memory-mode node holds goes with it.
            let entries = state.engine.stats().entries;
            if entries > 0 {
                tracing::warn!(
                    entries,
                    "stopping a memory-mode node: its entries are discarded"
                );
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Counts a connection while it is open.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(state: Arc<NodeState>, stream: TcpStream) -> Result<(), String> {
    let open = state.connections.fetch_add(1, Ordering::AcqRel) + 1;
    let _open = Open(state.connections.clone());
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    keep_alive(&stream).map_err(|e| e.to_string())?;
    let stream = FrameDeadline::new(stream, state.config.frame_timeout);
    let closed = stream.closed();
    let mut framed = wire::framed(stream, HANDSHAKE_MAX_FRAME);
    let hello = handshake::accept(
        &mut framed,
        Door {
            token: &state.config.token,
            node: state.config.node,
            limits: wire::Limits {
                max_frame: state.config.max_frame as u64,
                max_entry_bytes: state.config.max_entry_bytes,
            },
            open,
            max_connections: state.config.max_connections,
            clients: true,
            peers: state.shards.as_ref().map(|s| s.layout().fingerprint()),
        },
    )
    .await?;
    if hello.peer {
        if let Some(shards) = &state.shards {
            crate::replica::serve_peer_messages(framed, shards.groups()).await;
        }
        return Ok(());
    }
    let transport = wire::server_transport(framed);
    let max_in_flight = state.config.max_in_flight;
    // Answers stay well within what the client reads (and what this node sends).
    let reply_budget = (hello.max_frame.min(state.config.max_frame as u64) / 2) as usize;
    BaseChannel::with_defaults(transport)
        .max_concurrent_requests(max_in_flight)
        .execute(
            Service {
                state,
                reply_budget,
            }
            .serve(),
        )
        .for_each(|response| run_or_spawn(response, closed.clone()))
        .await;
    Ok(())
}

/// Runs a request on the connection's task as far as it goes without waiting (most
/// requests finish there: the engine answers at once), and spawns what is left of it (a
/// blocking take, a durable write waiting for its flush) as a task of its own.
///
/// Answering in place saves a task and two wake-ups per request; the answer is written
/// by the same task when it next polls the connection. A request that waits goes on
/// polling on its own task, whose waker replaces the connection's.
///
/// A request still waiting when the client closes the connection (`closed`: its process
/// exited, say; or the keepalive found its host gone, which ends the connection) is
/// dropped, as a caller's drop would: a blocking take of a client that is
/// gone would otherwise wait on and take the next matching entry, to be kept for a retry
/// that never comes. What it did before is in the answer tables as for any dropped call.
async fn run_or_spawn(
    response: impl Future<Output = ()> + Send + 'static,
    closed: CancellationToken,
) {
    let mut response = Box::pin(response);
    if futures::poll!(response.as_mut()).is_pending() {
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = response => {}
                () = closed.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use space_core::Receipt;

    fn receipts(n: usize) -> Result<Response, SpaceError> {
        Ok(Response::Receipts(
            (0..n)
                .map(|i| Receipt {
                    node: NodeId(1),
                    key: space_core::Key::Name(format!("k{i}")),
                    version: 1,
                    expires: None,
                })
                .collect(),
        ))
    }

    /// An entry whose body makes it as large as a test needs.
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Parcel {
        body: String,
    }
    space_client::entry!(Parcel, "Parcel");

    /// A durable node on `dir`, serving on a free loopback port: its state and address.
    async fn durable_node(dir: &space_tests::TempDir) -> (Arc<NodeState>, String) {
        let node = Node::bind(NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: Some(dir.0.clone()),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let state = node.state.clone();
        let addr = node.local_addr().unwrap().to_string();
        tokio::spawn(node.serve(std::future::pending()));
        (state, addr)
    }

    /// Client connections probe a silent peer: one whose host vanished is closed within
    /// `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL`, not kept for hours.
    #[tokio::test]
    async fn client_connections_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (stream, _) = accepted.unwrap();
        keep_alive(&stream).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    /// A batch whose answer the node's log holds only in part (here: a first write of one
    /// entry under the batch's id; across shards, a shard's part after a failover) is not
    /// acknowledged by a retry: the retry is told that the outcome of the rest is
    /// unknown, not handed the part's receipts as if they were the batch's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_batch_its_log_kept_only_in_part_is_not_acknowledged() {
        let dir = space_tests::TempDir::new("partial-batch");
        let id = wire::RequestId::new();
        let entry = |n: i64| {
            let mut fields = space_core::Fields::new();
            fields.push("n", space_core::Value::I64(n));
            (fields, None)
        };
        // What the log kept of the batch: its first entry, under the request's id.
        {
            let engine = Engine::open(&dir.0, EngineConfig::default()).unwrap();
            engine
                .with_request(id, || {
                    engine.write_all("Item", &[], vec![entry(1)], space_core::Lease::Forever)
                })
                .unwrap();
            engine.flush_blocking().unwrap();
            engine.close();
        }
        let (_, addr) = durable_node(&dir).await;
        let conn = space_client::Connection::open(&addr, space_client::ClientConfig::default())
            .await
            .unwrap();
        let batch = Request::WriteDirect {
            entry_type: "Item".into(),
            indexes: Vec::new(),
            entries: vec![entry(1), entry(2)],
            lease: space_core::Lease::Forever,
            labels: Vec::new(),
        };
        let answer = conn.call_with_id(id, batch).await;
        assert!(
            matches!(&answer, Err(SpaceError::Unavailable { reason }) if reason.contains("1 of the batch's 2")),
            "the retry of a batch kept in part was answered {answer:?}"
        );
    }

    /// A client's take of a large entry, once its answer is the caller's, is
    /// acknowledged with the client's next call: the durable node drops the entry from
    /// its engine's answers (through its log) and from its table of recent answers. A
    /// small entry's answer is left to be forgotten with time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clients_large_take_is_acknowledged_and_its_entry_dropped_from_the_answers() {
        let dir = space_tests::TempDir::new("acknowledged-takes");
        let (state, addr) = durable_node(&dir).await;
        let space = space_client::connect(&addr).await.unwrap();
        let large = Parcel {
            body: "x".repeat(2 * space_core::server::ACKNOWLEDGE_FROM_BYTES),
        };
        let small = Parcel {
            body: "small".into(),
        };
        space.write(&large).await.unwrap();
        space.write(&small).await.unwrap();
        let query = space_core::Query::of::<Parcel>();
        let taken: Vec<Parcel> = vec![
            space.take_if_exists(&query).await.unwrap().unwrap(),
            space.take_if_exists(&query).await.unwrap().unwrap(),
        ];
        assert_eq!(taken, vec![large.clone(), small.clone()]);
        // The next call carries the acknowledgements.
        assert_eq!(space.count(&query).await.unwrap(), 0);
        let kept = |answers: Vec<(wire::RequestId, Answer)>| {
            let acknowledged: Vec<wire::RequestId> = answers
                .iter()
                .filter(|(_, a)| matches!(a, Answer::Acknowledged))
                .map(|(id, _)| *id)
                .collect();
            let bodies: Vec<usize> = answers
                .into_iter()
                .filter_map(|(_, a)| match a {
                    Answer::Documents(d) => Some(d),
                    _ => None,
                })
                .flatten()
                .map(|d| d.fields.approx_size())
                .collect();
            (acknowledged, bodies)
        };
        let (acknowledged, bodies) = kept(state.engine.answers());
        assert_eq!(
            acknowledged.len(),
            1,
            "the large take's answer was not acknowledged"
        );
        assert!(
            bodies.len() == 1 && bodies[0] < space_core::server::ACKNOWLEDGE_FROM_BYTES,
            "the small take's answer is not kept whole, or the large one is: {bodies:?}"
        );
        // A client about to stop sends what waits for a next call.
        space.write(&large).await.unwrap();
        let last: Option<Parcel> = space.take_if_exists(&query).await.unwrap();
        assert_eq!(last, Some(large.clone()));
        let waiting = kept(state.engine.answers()).0.len();
        space.send_acknowledgements().await.unwrap();
        assert_eq!(
            (waiting, kept(state.engine.answers()).0.len()),
            (1, 2),
            "the last take's answer was not acknowledged when the client was told to"
        );
        // The node's own table refuses the acknowledged take if it comes again.
        let conn = space_client::Connection::open(&addr, space_client::ClientConfig::default())
            .await
            .unwrap();
        let again = conn
            .call_with_id(
                acknowledged[0],
                Request::TakeDirect {
                    target: Target::Query(query.clone()),
                    max: 1,
                    timeout: Duration::ZERO,
                },
            )
            .await;
        assert!(
            matches!(again, Err(SpaceError::Acknowledged)),
            "an acknowledged take sent again was answered {:?}",
            again
                .as_ref()
                .map(|_| "an answer")
                .map_err(ToString::to_string)
        );
    }

    #[test]
    fn one_shards_part_of_a_batch_is_not_taken_for_the_whole_answer() {
        assert!(matches!(
            whole(receipts(2), Some(3)),
            Err(SpaceError::Unavailable { .. })
        ));
        assert!(whole(receipts(3), Some(3)).is_ok());
        assert!(whole(Ok(Response::Done), None).is_ok());
    }
}
