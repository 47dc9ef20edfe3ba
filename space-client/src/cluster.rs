//! The client's view of a cluster of nodes, and the [`RemoteBackend`] of a remote `Space`.
//!
//! The client caches the topology (which node owns each of the 1024 ranges, with an
//! epoch) and talks to nodes directly:
//!
//! - anything addressed by key (read or take by key, commit, release, renew, cancel, a
//!   write with a user key) goes to the key's owner; a node that does not own it answers
//!   `WrongNode`, and the client refreshes its topology and retries;
//! - a write without a key goes to a node chosen in turn; the node mints the key inside its
//!   own ranges, so FindFor finds the entry there later;
//! - a take by query first takes what is there now (a blocking take of one on the next node
//!   in turn, anything else node after node); otherwise it *claims* on every node at once,
//!   commits the first claim, abandons the other waits and releases any claim they made
//!   meanwhile, so an entry is never taken twice and never lost; a blocking take thus
//!   waits on all nodes at once and wakes on the first match anywhere;
//!   take_all gathers from node after node up to its maximum; reads race the nodes;
//!   counts, contents and stats merge;
//! - a subscription is registered on every node and the pushed streams merge into one,
//!   each event carrying its node id and that node's sequence number.
//!
//! With one node all of this reduces to talking to that node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use parking_lot::{Mutex, RwLock};
use space_core::wire::{self, NodeInfo, Request, RequestId, Response, Target, Topology};
use space_core::{
    BlockingSpace, Document, EventKinds, Key, Lease, NodeId, Query, Result, Space, SpaceError,
    Stats, Subscription, SubscriptionPosition,
    remote::{RemoteBackend, RemoteFeed},
};

use crate::connection::{ClientConfig, Connection, OVERDUE_AFTER, OwnedRuntime, Runtime};
use crate::revoke;
use crate::subscriber::{self, Delivered, Endpoint, Feed, FeedState, Spec, feed_channel};

/// A document to write, with its user key if it has one.
type NewEntry = (space_core::Fields, Option<Key>);
/// Where part of a write goes: a node, and on a replicated cluster the shard of its
/// keyed entries.
type WriteTarget = (String, Option<u32>);

/// How long a claim taken on behalf of a cross-node take may live before it is committed.
const TAKE_CLAIM_LEASE: Duration = Duration::from_secs(30);
/// Topology refreshes a call makes at once on wrong-node answers; past them it goes on
/// while the client's retry window lasts ([`Reroutes`]).
const REROUTES: usize = 3;

/// Longest pause between two asks of an owner that says it does not own the key yet.
const MOST_REROUTE_PAUSE: Duration = Duration::from_millis(500);

/// How a call follows wrong-node and unavailable answers: [`REROUTES`] times at once, then
/// on while [`ClientConfig::retry_for`] lasts from the call's start. A replicated shard's
/// election (at a cluster's start, or after its leader died) takes hundreds of
/// milliseconds, during which its members answer `WrongNode` with no owner, or the old one.
struct Reroutes {
    done: usize,
    /// Pauses given so far to owners that answered: each one is longer.
    answered_pauses: u32,
    until: Instant,
}

impl Reroutes {
    fn new(retry_for: Duration) -> Reroutes {
        Reroutes {
            done: 0,
            answered_pauses: 0,
            until: Instant::now() + retry_for,
        }
    }

    /// Whether the call may be rerouted once more; counts it.
    fn another(&mut self) -> bool {
        let allowed = self.done < REROUTES || Instant::now() < self.until;
        if allowed {
            self.done += 1;
        }
        allowed
    }

    /// How long to wait before asking an owner that answered it does not serve the key
    /// (yet) again: 50 ms longer each time, up to [`MOST_REROUTE_PAUSE`]. Only such
    /// pauses lengthen it: a new leader found after a dead owner was waited out gets
    /// the short first pause while it starts serving.
    fn pause(&mut self) -> Duration {
        self.answered_pauses = self.answered_pauses.saturating_add(1);
        (Duration::from_millis(50) * self.answered_pauses).min(MOST_REROUTE_PAUSE)
    }

    /// How long to wait, after `e` from an owner the topology still names, before the
    /// topology is asked again: a dead owner's shard names its next leader within about
    /// a second, so it is asked often (each ask is one small call to a live member);
    /// a live owner that answered is given longer each time.
    fn pause_after(&mut self, e: &SpaceError) -> Duration {
        if matches!(e, SpaceError::Down { .. }) {
            DEAD_OWNER_POLL
        } else {
            self.pause()
        }
    }
}

/// How often a call under way checks whether its owner died or froze and the key has
/// another owner ([`Cluster::owner_moved_from`]).
const OWNER_POLL: Duration = Duration::from_millis(100);
/// How often a call whose owner died asks for the topology while it waits for the
/// owner's shard to elect its next leader.
const DEAD_OWNER_POLL: Duration = Duration::from_millis(20);
/// How often a listing or count that a shard without a leader left incomplete is made
/// again, while the client's retry window lasts.
const COVER_POLL: Duration = Duration::from_millis(100);
/// Most times one call by query is made again on a node whose shards changed while it
/// waited (each change ends the wait; a failover brings a burst of them).
const MAX_ASKS: usize = 1_000;

/// A cluster of nodes, as one client sees it.
pub struct Cluster {
    seeds: Vec<String>,
    config: ClientConfig,
    runtime: Runtime,
    topology: RwLock<Topology>,
    conns: Mutex<HashMap<String, Arc<Connection>>>,
    /// Members never connected to, and when connecting to them last failed.
    failed_dials: Mutex<HashMap<String, Instant>>,
    /// (node address, entry type) pairs whose indexes this client already declared.
    declared: Mutex<HashSet<(String, String)>>,
    next_writer: AtomicUsize,
    /// Where the next take by query starts looking.
    next_taker: AtomicUsize,
    /// When a call whose owner left it unanswered last asked for the topology.
    overdue_refresh: Mutex<Option<Instant>>,
    endpoint: tokio::sync::OnceCell<Arc<Endpoint>>,
}

fn unexpected(r: Response) -> SpaceError {
    SpaceError::Protocol {
        reason: format!("unexpected answer {r:?}"),
    }
}

impl Cluster {
    /// Connects to the cluster through any of `seeds` and learns its topology; on the
    /// current tokio runtime.
    ///
    /// # Errors
    /// `Unreachable` when no seed answers, `Rejected` for a wrong token.
    pub async fn open(seeds: &[&str], config: ClientConfig) -> Result<Arc<Cluster>> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| SpaceError::Protocol {
            reason: "connect needs a tokio runtime; use connect_blocking from plain threads".into(),
        })?;
        Self::open_on(seeds, config, Runtime::Borrowed(handle)).await
    }

    pub(crate) async fn open_on(
        seeds: &[&str],
        config: ClientConfig,
        runtime: Runtime,
    ) -> Result<Arc<Cluster>> {
        let mut last = None;
        for seed in seeds {
            match Connection::open_on(seed, config.clone()).await {
                Ok(conn) => match conn.call(Request::Topology).await {
                    Ok(Response::Topology(topology)) => {
                        let cluster = Arc::new(Cluster {
                            seeds: seeds.iter().map(|s| (*s).to_owned()).collect(),
                            config,
                            runtime,
                            topology: RwLock::new(topology),
                            conns: Mutex::new(HashMap::from([(seed.to_string(), conn)])),
                            failed_dials: Mutex::new(HashMap::new()),
                            declared: Mutex::new(HashSet::new()),
                            next_writer: AtomicUsize::new(0),
                            next_taker: AtomicUsize::new(0),
                            overdue_refresh: Mutex::new(None),
                            endpoint: tokio::sync::OnceCell::new(),
                        });
                        return Ok(cluster);
                    }
                    Ok(other) => last = Some(unexpected(other)),
                    Err(e) => last = Some(e),
                },
                Err(e @ SpaceError::Rejected { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| SpaceError::Unreachable {
            node: String::new(),
            reason: "no seed address given".into(),
        }))
    }

    /// The topology the client routes by.
    pub fn topology(&self) -> Topology {
        self.topology.read().clone()
    }

    /// The connection to the node at `addr`.
    ///
    /// # Errors
    /// `Unreachable` (at once, when connecting failed a moment ago) or `Rejected`.
    pub async fn node(&self, addr: &str) -> Result<Arc<Connection>> {
        if let Some(c) = self.conns.lock().get(addr) {
            return Ok(c.clone());
        }
        if self.is_down(addr) {
            return Err(SpaceError::Down {
                node: addr.to_owned(),
                reason: "it could not be reached a moment ago".into(),
            });
        }
        let conn = match Connection::open_on(addr, self.config.clone()).await {
            Ok(conn) => conn,
            Err(SpaceError::Unreachable { node, reason }) => {
                self.failed_dials
                    .lock()
                    .insert(addr.to_owned(), Instant::now());
                return Err(SpaceError::Down { node, reason });
            }
            Err(e) => return Err(e),
        };
        self.failed_dials.lock().remove(addr);
        Ok(self
            .conns
            .lock()
            .entry(addr.to_owned())
            .or_insert(conn)
            .clone())
    }

    fn addresses(&self) -> Vec<String> {
        self.topology
            .read()
            .nodes
            .iter()
            .map(|n| n.address.clone())
            .collect()
    }

    /// Asks the nodes (then the seeds) for the topology and keeps the newest.
    ///
    /// A replicated node knows the leaders of the shards it replicates only (on a cluster
    /// of more nodes than replicas, not all of them): there the owners of the ranges are
    /// completed from every live node's shards (see `guesses_owners` and
    /// `with_shard_leaders`).
    ///
    /// Silent nodes ([`Connection::is_silent`]) are asked last: a frozen node, or one cut
    /// off with its connection open, would hold the ask up for the whole call timeout.
    ///
    /// # Errors
    ///
    /// The last error met when no node or seed answered.
    pub async fn refresh(&self) -> Result<Topology> {
        let mut candidates = self.addresses();
        candidates.extend(self.seeds.iter().cloned());
        candidates.sort_by_cached_key(|a| self.is_silent(a));
        let mut last = None;
        for addr in candidates {
            let answer = match self.node(&addr).await {
                Ok(conn) => conn.call(Request::Topology).await,
                Err(e) => Err(e),
            };
            let answer = match answer {
                Ok(Response::Topology(t)) if guesses_owners(&t) => match self.shards().await {
                    Ok(Response::Shards(shards)) => {
                        Ok(Response::Topology(with_shard_leaders(t, &shards)))
                    }
                    // The topology as the node gave it is still worth having.
                    _ => Ok(Response::Topology(t)),
                },
                answer => answer,
            };
            match answer {
                Ok(Response::Topology(t)) => {
                    // A replicated cluster's epochs are each node's own view (the sum of
                    // the terms it has seen), so a lower one from a live node is still
                    // better than a topology naming owners that are down.
                    let stale = self.names_down_owner(&self.topology.read());
                    let mut current = self.topology.write();
                    if t.epoch >= current.epoch || stale {
                        *current = t;
                    }
                    return Ok(current.clone());
                }
                Ok(other) => last = Some(unexpected(other)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| SpaceError::Unreachable {
            node: String::new(),
            reason: "no node to ask for the topology".into(),
        }))
    }

    /// Whether `topology` names an owner that could not be reached a moment ago.
    fn names_down_owner(&self, topology: &Topology) -> bool {
        let down: Vec<bool> = topology
            .nodes
            .iter()
            .map(|n| self.is_down(&n.address))
            .collect();
        down.iter().any(|d| *d)
            && topology
                .owners
                .iter()
                .any(|o| down.get(*o as usize).copied().unwrap_or(false))
    }

    /// The owner of `key`'s range, as the cached topology has it.
    fn owner(&self, key: &Key) -> Result<NodeInfo> {
        self.topology
            .read()
            .owner_of(key)
            .cloned()
            .ok_or_else(|| SpaceError::Protocol {
                reason: "the topology has no owner for a range".into(),
            })
    }

    fn owner_addr(&self, key: &Key) -> Result<String> {
        self.owner(key).map(|n| n.address)
    }

    /// Completes once the topology names another owner for `key` than the node at
    /// `addr`, which a call was sent to and which has either not been reachable a moment
    /// ago or is silent ([`Connection::is_silent`]: it left a call unanswered
    /// [`OVERDUE_AFTER`] past its wait; a frozen node, or one cut off from the client
    /// without its connection closing). Never while `addr` is still the owner: a static
    /// cluster's owners do not change when a node dies. Polls every [`OWNER_POLL`]; for
    /// a silent owner the topology is asked for at most once per poll period for all the
    /// calls of this client.
    async fn owner_moved_from(&self, key: &Key, addr: &str) {
        loop {
            tokio::time::sleep(OWNER_POLL).await;
            let down = self.is_down(addr);
            if !down && !self.is_silent(addr) {
                continue;
            }
            if self.owner_addr(key).is_ok_and(|owner| owner != addr) {
                // Another call's refresh found the new owner already.
                return;
            }
            if down || self.may_refresh_now() {
                let _ = self.refresh().await;
                if self.owner_addr(key).is_ok_and(|owner| owner != addr) {
                    return;
                }
            }
        }
    }

    /// `call`, a call to the node at `addr` that may wait `wait` and that changes nothing
    /// (a read, count or listing), given up with `Unreachable` once the node stops
    /// answering while another node may answer instead: from [`OVERDUE_AFTER`] past its
    /// wait, the node is asked for its status on the same connection every
    /// [`OVERDUE_AFTER`], and one it leaves unanswered that long ends the call if some
    /// other member is neither down nor silent and, with [`Patience::UntilReplaced`],
    /// once the node's shards are led by others ([`replaced`](Self::replaced)). A node
    /// that is only slow waiting (on its log, or its peers) answers the status at once,
    /// and the call goes on waiting; a frozen node, or one cut off with its connection
    /// left open, would otherwise hold the call for the whole call timeout. With no other
    /// node to ask (a cluster of one), the call waits on; a node busy counting or
    /// listing answers the status meanwhile too (it scans apart from its other work). A
    /// node paused for a moment leaves the status unanswered: with
    /// [`Patience::UntilReplaced`] it is waited for while it leads its shards, since
    /// nobody else can answer for them.
    async fn unless_silent<T>(
        &self,
        addr: &str,
        wait: Duration,
        patience: Patience,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let silent = async {
            tokio::time::sleep(wait.min(wire::MAX_CALL_WAIT)).await;
            loop {
                // Every round waits first: a status that fails at once (a node found
                // down, with no other to ask) must not make this a busy loop.
                tokio::time::sleep(OVERDUE_AFTER).await;
                let status = async { self.node(addr).await?.call(Request::NodeStatus).await };
                let answered =
                    matches!(tokio::time::timeout(OVERDUE_AFTER, status).await, Ok(Ok(_)));
                if !answered
                    && self.another_live_than(addr)
                    && (patience == Patience::WhileSilent || self.replaced(addr).await)
                {
                    return;
                }
            }
        };
        tokio::select! {
            answer = call => answer,
            () = silent => Err(SpaceError::Unreachable {
                node: addr.to_owned(),
                reason: format!(
                    "it left a call and its status unanswered for {OVERDUE_AFTER:?} \
                     (frozen, or cut off)"
                ),
            }),
        }
    }

    /// Whether every shard the topology has the node at `addr` lead is led by another
    /// node now, as the other live nodes see the shards (each asked directly, for
    /// [`OVERDUE_AFTER`] at most): then giving up a call to it loses nothing, since the
    /// call asked again is answered for those shards by their new leaders. Always so on a
    /// cluster that is not sharded, whose answers leave out what a node that cannot be
    /// reached holds (and say so), and for a node that leads nothing.
    async fn replaced(&self, addr: &str) -> bool {
        let (node, led) = {
            let topology = self.topology.read();
            let Some(at) = topology.nodes.iter().position(|n| n.address == addr) else {
                return true;
            };
            if topology.shards == 0 {
                return true;
            }
            let led: BTreeSet<u32> = (0..)
                .zip(&topology.owners)
                .filter(|(_, owner)| **owner as usize == at)
                .map(|(range, _)| wire::shard_of_range(range, topology.shards))
                .collect();
            (topology.nodes[at].node, led)
        };
        if led.is_empty() {
            return true;
        }
        let views = self
            .addresses()
            .into_iter()
            .filter(|a| a != addr && !self.is_down(a) && !self.is_silent(a))
            .map(|other| async move {
                let asked = async { self.node(&other).await?.call(Request::Shards).await };
                tokio::time::timeout(OVERDUE_AFTER, asked).await
            });
        let mut merged = BTreeMap::new();
        for view in futures::future::join_all(views).await {
            if let Ok(Ok(Response::Shards(shards))) = view {
                merge_shards(&mut merged, shards);
            }
        }
        led.iter().all(|shard| {
            merged
                .get(shard)
                .and_then(|info| info.leader)
                .is_some_and(|leader| leader != node)
        })
    }

    /// Whether a member other than `addr` is neither down nor silent.
    fn another_live_than(&self, addr: &str) -> bool {
        self.addresses()
            .iter()
            .any(|a| a != addr && !self.is_down(a) && !self.is_silent(a))
    }

    /// Whether a refresh for an overdue call may go out now: none went out for that in
    /// the last [`OWNER_POLL`] (so that many slow calls on a loaded node ask the others
    /// for the topology ten times a second, not ten times a second each).
    fn may_refresh_now(&self) -> bool {
        let mut last = self.overdue_refresh.lock();
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < OWNER_POLL) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Whether a call by key that failed with `e` at its owner, still named the owner
    /// by the topology, waits for another: a node that answered (wrong node, or
    /// unavailable during an election) is asked again; a dead owner is waited out only
    /// on a cluster whose ranges fail over (a replicated shard elects a new leader),
    /// while on a static one the call fails at once.
    fn awaits_new_owner(&self, e: &SpaceError) -> bool {
        !matches!(e, SpaceError::Down { .. }) || self.topology.read().failover
    }

    /// Sends `request` to the owner of `key`, following topology changes.
    async fn to_owner(&self, key: &Key, request: Request) -> Result<Response> {
        // One id for every attempt: an attempt a failover cut off may have been done, and
        // the new owner answers a repeated id with its first answer. So attempts are not
        // revoked one by one: the call is, if it ends (or is dropped) without an answer.
        // A call the node gave up itself (its client would have revoked it) did nothing,
        // and goes again with a new id.
        let mut afresh = 0;
        loop {
            let id = RequestId::new();
            let mut guard = revoke::Resent::new(id, &request);
            let answer = self.to_owner_as(key, id, &request, &mut guard).await;
            guard.finish(&answer);
            if !(revoke::given_up_by_its_node(&answer) && afresh < revoke::AFRESH) {
                return answer;
            }
            afresh += 1;
        }
    }

    /// The attempts of [`to_owner`](Self::to_owner), each noted in `guard`.
    async fn to_owner_as(
        &self,
        key: &Key,
        id: RequestId,
        request: &Request,
        guard: &mut revoke::Resent,
    ) -> Result<Response> {
        let mut reroutes = Reroutes::new(self.config.retry_for);
        let mut moves = 0;
        // Whether an attempt went out before (then the id may be known somewhere).
        let mut attempted = false;
        loop {
            let addr = self.owner_addr(key)?;
            let first_attempt = !std::mem::replace(&mut attempted, true);
            let call = async {
                match self.node(&addr).await {
                    Ok(conn) => {
                        guard.at(&conn);
                        conn.send(id, request.clone(), first_attempt).await
                    }
                    Err(e) => Err(e),
                }
            };
            let answer = tokio::select! {
                answer = call => answer,
                () = self.owner_moved_from(key, &addr), if moves < REROUTES => {
                    // The owner died (or froze) with the call under way, and the key has
                    // a new owner (a replicated shard's new leader): the call is given up
                    // there and sent to the new owner, which answers the same id with its
                    // first answer if the old owner's change was committed.
                    moves += 1;
                    continue;
                }
            };
            match answer {
                // The owner moved (a replicated shard's leader changed), or the node that
                // owned it is gone and another may own it now: ask for the topology and
                // go on at the new owner. A call that fails with `Down` never reached
                // its node, so sending it again is safe.
                Err(
                    e @ (SpaceError::WrongNode { .. }
                    | SpaceError::Unavailable { .. }
                    | SpaceError::Down { .. }),
                ) if reroutes.another() => {
                    self.refresh().await?;
                    if self.owner_addr(key)? == addr {
                        if !self.awaits_new_owner(&e) {
                            return Err(e);
                        }
                        // An election may be under way: give it a moment.
                        tokio::time::sleep(reroutes.pause_after(&e)).await;
                    }
                }
                other => return other,
            }
        }
    }

    /// Sends `request`, which changes nothing, to every live node at once: their answers,
    /// and the addresses of the nodes that could not be reached (or went silent, see
    /// [`unless_silent`](Self::unless_silent)), or were passed over as down or silent
    /// already. Fails when no node could be reached, or with any other error a node
    /// answers.
    async fn gather(
        &self,
        request: &Request,
        patience: Patience,
    ) -> Result<(Vec<Response>, Vec<String>)> {
        let asked = self.asked_in_turn(&AtomicUsize::new(0), patience);
        // Members passed over (down, or silent) are named with those that fail.
        let mut unreachable: Vec<String> = self
            .addresses()
            .into_iter()
            .filter(|a| !asked.contains(a))
            .collect();
        let calls = asked.into_iter().map(|addr| {
            let request = request.clone();
            async move {
                let wait = request.wait();
                let call = async { self.node(&addr).await?.call(request).await };
                let answer = self.unless_silent(&addr, wait, patience, call).await;
                (addr, answer)
            }
        });
        let mut answers = Vec::new();
        let mut last = None;
        for (addr, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok(a) => answers.push(a),
                Err(e) if e.is_unreachable() => {
                    unreachable.push(addr);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if answers.is_empty()
            && let Some(e) = last
        {
            return Err(e);
        }
        if !unreachable.is_empty() {
            tracing::warn!(
                ?unreachable,
                "answered without the members that could not be reached"
            );
        }
        unreachable.sort();
        unreachable.dedup();
        Ok((answers, unreachable))
    }

    /// Sends now the acknowledgements that wait for a next call on each connection (a
    /// client's answers of takes, claims and commits, which the nodes keep for a retry
    /// until they are acknowledged, for a minute otherwise): for a client about to stop
    /// after its last take. Each goes with a node-status call, the least a node does, to
    /// all nodes at once (a node that cannot be reached holds the others up no longer
    /// than its own retries). Best effort: a node that cannot be reached keeps those
    /// answers for their minute.
    ///
    /// # Cancel safety
    /// Dropped half-way, the acknowledgements not sent yet are lost (the answers are kept
    /// for their minute).
    pub async fn send_acknowledgements(&self) {
        let waiting: Vec<Arc<Connection>> = self
            .conns
            .lock()
            .values()
            .filter(|c| c.has_acknowledgements())
            .cloned()
            .collect();
        let sends = waiting.into_iter().map(|conn| async move {
            if let Err(e) = conn.call(Request::NodeStatus).await {
                tracing::debug!(node = %conn.addr(), error = %e, "acknowledgements not sent");
            }
        });
        futures::future::join_all(sends).await;
    }

    /// What a process calls before it exits ([`Space::settle`]): sends the waiting
    /// acknowledgements, then waits until the calls this process sends in the background
    /// to give entries back (revokes of abandoned takes and claims, releases) are done.
    ///
    /// # Cancel safety
    /// It only waits: dropped, the calls go on while the runtime lives.
    pub async fn settle(&self) {
        self.send_acknowledgements().await;
        revoke::settled().await;
    }

    /// How many calls giving entries back run in the background in this process now
    /// (what [`settle`](Self::settle) waits for).
    pub fn giving_back(&self) -> usize {
        revoke::giving_back()
    }

    /// Runs one request as a user asked for it, routed as the module documentation says.
    /// A wait longer than [`wire::MAX_CALL_WAIT`] is made of successive calls.
    ///
    /// # Errors
    /// The nodes' errors, or `Unreachable` / `TimedOut`.
    ///
    /// # Cancel safety
    /// A take or claim whose future is dropped (or that fails) loses nothing: everything it
    /// took or claimed on any node goes back (the client's revokes).
    pub async fn call(self: &Arc<Self>, request: Request) -> Result<Response> {
        let guarded = matches!(request, Request::TakeDirect { .. } | Request::Claim { .. });
        let call = Box::pin(self.call_waiting(request));
        if guarded {
            revoke::guarded(Some(self.reach()), call).await
        } else {
            call.await
        }
    }

    /// Routes `request`, in successive calls of at most [`wire::MAX_CALL_WAIT`] each while
    /// they find nothing, up to its own timeout.
    async fn call_waiting(self: &Arc<Self>, request: Request) -> Result<Response> {
        let wait = request.wait();
        if wait <= wire::MAX_CALL_WAIT {
            return self.route(request).await;
        }
        let deadline = Instant::now().checked_add(wait);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let part = left.min(wire::MAX_CALL_WAIT);
            let answer = self.route(request.with_wait(part)).await?;
            let found_nothing =
                matches!(&answer, Response::Document(None) | Response::Claimed(None))
                    || matches!(&answer, Response::Documents(d) if d.is_empty());
            if !found_nothing || part == left {
                return Ok(answer);
            }
        }
    }

    /// Runs one request, routed as the module documentation says. Each kind's future is
    /// boxed: held inline, the largest made every call's future about 18 KB, copied
    /// whole each time it moved.
    async fn route(self: &Arc<Self>, request: Request) -> Result<Response> {
        if let Some(key) = request.routing_key() {
            let key = key.clone();
            return Box::pin(self.to_owner(&key, request)).await;
        }
        match request {
            Request::WriteDirect {
                entry_type,
                indexes,
                entries,
                lease,
                labels,
            } => Box::pin(self.write(entry_type, indexes, entries, lease, labels)).await,
            Request::ReadDirect {
                target: Target::Query(query),
                timeout,
            } => Box::pin(self.read(query, timeout)).await,
            Request::TakeDirect {
                target: Target::Query(query),
                max,
                timeout,
            } => Box::pin(self.take(query, max.max(1) as usize, timeout))
                .await
                .map(Response::Documents),
            Request::Claim {
                query,
                lease,
                timeout,
                ..
            } => Box::pin(self.claim(query, lease, timeout))
                .await
                .map(Response::Claimed),
            Request::Count(q) => Box::pin(self.until_covered(|| self.count(q.clone()))).await,
            Request::Contents { query, .. } => {
                Box::pin(self.until_covered(|| self.contents(query.clone()))).await
            }
            Request::FindFor(key) => self.owner(&key).map(Response::Node),
            Request::Stats => {
                let (answers, unreachable) =
                    Box::pin(self.gather(&Request::Stats, Patience::WhileSilent)).await?;
                let mut total = Stats {
                    unreachable,
                    ..Stats::default()
                };
                for answer in answers {
                    match answer {
                        Response::Stats(s) => total.add(&s),
                        other => return Err(unexpected(other)),
                    }
                }
                Ok(Response::Stats(total))
            }
            Request::Topology => Box::pin(self.refresh()).await.map(Response::Topology),
            Request::Shards => Box::pin(self.shards()).await,
            // Placement, status, and subscription bookkeeping: any live node answers.
            other => {
                let addr = self.next_node();
                let node = Box::pin(self.node(&addr)).await?;
                Box::pin(revoke::call(&node, other)).await
            }
        }
    }

    /// A replicated cluster's shards, from every live node: a node knows the leader and
    /// term of the shards it replicates only (on a cluster of more nodes than replicas,
    /// not all of them), so each shard is described as the node that saw its latest term
    /// (and its leader) sees it.
    async fn shards(&self) -> Result<Response> {
        let mut merged = BTreeMap::new();
        for answer in self
            .gather(&Request::Shards, Patience::WhileSilent)
            .await?
            .0
        {
            let Response::Shards(shards) = answer else {
                return Err(unexpected(answer));
            };
            merge_shards(&mut merged, shards);
        }
        Ok(Response::Shards(merged.into_values().collect()))
    }

    /// A live node for keyless writes, in turn.
    fn next_node(&self) -> String {
        self.live_in_turn(&self.next_writer)
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// The addresses of the nodes not known to be down or silent, starting with the next
    /// in `turn` (so callers spread over them); every node when all of them seem down or
    /// silent (calls to them then fail fast, or find them back).
    fn live_in_turn(&self, turn: &AtomicUsize) -> Vec<String> {
        let mut addrs = self.addresses();
        if !addrs.is_empty() {
            let first = turn.fetch_add(1, Ordering::Relaxed) % addrs.len();
            addrs.rotate_left(first);
        }
        let live: Vec<String> = addrs
            .iter()
            .filter(|a| !self.is_down(a) && !self.is_silent(a))
            .cloned()
            .collect();
        if live.is_empty() { addrs } else { live }
    }

    /// The nodes a call to every node goes to, starting with the next in `turn`: those
    /// [`live_in_turn`](Self::live_in_turn) names and, with [`Patience::UntilReplaced`]
    /// on a sharded cluster, silent nodes the topology names as owners, since nobody else
    /// answers for their shards (a node that answers again is so found back at once).
    fn asked_in_turn(&self, turn: &AtomicUsize, patience: Patience) -> Vec<String> {
        let mut addrs = self.live_in_turn(turn);
        if patience == Patience::UntilReplaced {
            let owners: Vec<String> = {
                let topology = self.topology.read();
                if topology.shards == 0 {
                    // A cluster that is not sharded: its answers may leave a node out.
                    Vec::new()
                } else {
                    let owners: BTreeSet<u32> = topology.owners.iter().copied().collect();
                    owners
                        .into_iter()
                        .filter_map(|o| topology.nodes.get(o as usize))
                        .map(|n| n.address.clone())
                        .collect()
                }
            };
            for owner in owners {
                if !addrs.contains(&owner) && !self.is_down(&owner) {
                    addrs.push(owner);
                }
            }
        }
        addrs
    }

    /// Whether the node at `addr` leaves calls unanswered ([`Connection::is_silent`]).
    fn is_silent(&self, addr: &str) -> bool {
        self.conns.lock().get(addr).is_some_and(|c| c.is_silent())
    }

    /// Whether the node at `addr` could not be reached a moment ago.
    fn is_down(&self, addr: &str) -> bool {
        match self.conns.lock().get(addr) {
            Some(conn) => conn.is_down(),
            None => self
                .failed_dials
                .lock()
                .get(addr)
                .is_some_and(|t| t.elapsed() < self.config.probe_after),
        }
    }

    /// The members that could not be reached a moment ago.
    pub fn down_members(&self) -> Vec<String> {
        self.addresses()
            .into_iter()
            .filter(|a| self.is_down(a))
            .collect()
    }

    async fn write(
        &self,
        entry_type: String,
        indexes: Vec<String>,
        entries: Vec<NewEntry>,
        lease: Lease,
        labels: Vec<(String, String)>,
    ) -> Result<Response> {
        // Group by target node: keyed entries by their owner, keyless ones together, on a
        // node chosen in turn, or by FindPlaceFor when labels are asked for. On a
        // replicated cluster keyed entries are grouped by shard too: each shard's part is
        // a request of its own, which follows its shard's leader across a failover and,
        // sent again, is answered from the shard's replicated answers, so a batch is
        // completed shard by shard whatever leaders change meanwhile.
        let sharded = self.topology.read().shards > 0;
        let mut groups: HashMap<WriteTarget, Vec<(usize, NewEntry)>> = HashMap::new();
        let keyless = if labels.is_empty() {
            self.next_node()
        } else {
            let size = entries.iter().map(|(f, _)| f.approx_size() as u64).sum();
            let request = Request::FindPlaceFor {
                key: None,
                size,
                labels: labels.clone(),
            };
            let any = self.next_node();
            match self.node(&any).await?.call(request).await? {
                Response::Node(n) => n.address,
                other => return Err(unexpected(other)),
            }
        };
        for (i, (fields, key)) in entries.into_iter().enumerate() {
            let target = match &key {
                Some(k) => (
                    self.owner_addr(k)?,
                    sharded.then(|| self.topology.read().shard_of(k)).flatten(),
                ),
                None => (keyless.clone(), None),
            };
            groups.entry(target).or_default().push((i, (fields, key)));
        }
        // The groups are written at once; each is tried whatever became of the others.
        let written = futures::future::join_all(groups.into_iter().map(|((addr, _), group)| {
            let (positions, batch): (Vec<usize>, Vec<_>) = group.into_iter().unzip();
            let (entry_type, indexes, labels) = (&entry_type, &indexes, &labels);
            async move {
                let got = self
                    .write_group(&addr, entry_type, indexes, batch, lease, labels)
                    .await?;
                Ok::<_, SpaceError>(positions.into_iter().zip(got))
            }
        }))
        .await;
        let mut receipts = Vec::new();
        for group in written {
            receipts.extend(group?);
        }
        receipts.sort_by_key(|(i, _)| *i);
        Ok(Response::Receipts(
            receipts.into_iter().map(|(_, r)| r).collect(),
        ))
    }

    async fn write_group(
        &self,
        addr: &str,
        entry_type: &str,
        indexes: &[String],
        batch: Vec<NewEntry>,
        lease: Lease,
        labels: &[(String, String)],
    ) -> Result<Vec<space_core::Receipt>> {
        let mut addr = addr.to_owned();
        let mut reroutes = Reroutes::new(self.config.retry_for);
        // A keyless batch may go to any member: one found down is passed over.
        let movable = labels.is_empty() && batch.iter().all(|(_, k)| k.is_none());
        let keyed = batch.iter().all(|(_, k)| k.is_some());
        // Whether an attempt reached a node (it may have run there).
        let mut reached = false;
        let mut moves = 0;
        // One id for every attempt (see `to_owner`).
        let id = RequestId::new();
        // Whether an attempt went out before (then the id may be known somewhere).
        let mut attempted = false;
        loop {
            // A type's indexes are declared once per node, with the first write there.
            let first = self
                .declared
                .lock()
                .insert((addr.clone(), entry_type.to_owned()));
            let request = Request::WriteDirect {
                entry_type: entry_type.to_owned(),
                indexes: if first { indexes.to_vec() } else { Vec::new() },
                entries: batch.clone(),
                lease,
                labels: labels.to_vec(),
            };
            let first_attempt = !std::mem::replace(&mut attempted, true);
            let call = async {
                match self.node(&addr).await {
                    Ok(conn) => conn.send(id, request, first_attempt).await,
                    Err(e) => Err(e),
                }
            };
            // Keyed entries follow their owner if it dies with the call under way (as
            // `to_owner_as` does): the new owner answers the same id with its first
            // answer if the old owner's write was committed.
            let followed = batch
                .iter()
                .find_map(|(_, k)| k.as_ref())
                .filter(|_| keyed && moves < REROUTES);
            // `None`: the owner died with the call under way, and the keys have another.
            let answer = match followed {
                Some(k) => tokio::select! {
                    answer = call => Some(answer),
                    () = self.owner_moved_from(k, &addr) => None,
                },
                None => Some(call.await),
            };
            let Some(answer) = answer else {
                moves += 1;
                reached = true;
                if first {
                    self.declared
                        .lock()
                        .remove(&(addr.clone(), entry_type.to_owned()));
                }
                if let Some(k) = followed {
                    addr = self.owner_addr(k)?;
                }
                continue;
            };
            if first && answer.is_err() {
                // Not written there (or not known to be): its indexes go with the next write.
                self.declared
                    .lock()
                    .remove(&(addr.clone(), entry_type.to_owned()));
            }
            match answer {
                Ok(Response::Receipts(r)) => return Ok(r),
                Ok(other) => return Err(unexpected(other)),
                // `Unavailable` is followed for keyed entries only: they go to their shards
                // whatever node is asked, and each shard answers a repeated id once. A
                // keyless batch answered `Unavailable` may have been written (a node asked
                // again after a lost answer that cannot tell, says so): sent to another
                // node, another shard would write it again.
                Err(e @ (SpaceError::WrongNode { .. } | SpaceError::Unavailable { .. }))
                    if (keyed || matches!(e, SpaceError::WrongNode { .. }))
                        && reroutes.another() =>
                {
                    // `WrongNode` to a keyless batch that reached no node before: nothing
                    // of it was done anywhere (a node that leads no shard takes nothing),
                    // and it has still reached none.
                    let done_nowhere =
                        movable && !reached && matches!(e, SpaceError::WrongNode { .. });
                    reached |= !done_nowhere;
                    self.refresh().await?;
                    // Keyed batches all have the same owner; follow it. A keyless one is
                    // asked again where it was: another node that has not seen its id
                    // would not look for an earlier run of it, and could write it twice;
                    // unless it was done nowhere, when the next other node takes it.
                    let next = match batch.iter().find_map(|(_, k)| k.as_ref()) {
                        Some(k) => self.owner_addr(k)?,
                        None if done_nowhere => self
                            .live_in_turn(&self.next_writer)
                            .into_iter()
                            .find(|a| *a != addr)
                            .unwrap_or_else(|| addr.clone()),
                        None => addr.clone(),
                    };
                    if next == addr {
                        // An election may be under way: give it a moment.
                        tokio::time::sleep(reroutes.pause()).await;
                    }
                    addr = next;
                }
                Err(e) => {
                    let others = self.addresses().len();
                    if movable && !reached && matches!(e, SpaceError::Down { .. }) && moves < others
                    {
                        // Nothing was sent there, nor anywhere before: the next live member
                        // takes the batch.
                        moves += 1;
                        addr = self.next_node();
                        continue;
                    }
                    if let (SpaceError::Down { .. }, Some(k)) =
                        (&e, batch.iter().find_map(|(_, k)| k.as_ref()))
                        && reroutes.another()
                    {
                        // Its owner is dead, and nothing was sent there: once the keys
                        // have a new owner (a replicated shard's new leader), the batch
                        // goes there, with the same id.
                        let _ = self.refresh().await;
                        let next = self.owner_addr(k)?;
                        if next != addr {
                            addr = next;
                            continue;
                        }
                        if self.awaits_new_owner(&e) {
                            tokio::time::sleep(reroutes.pause_after(&e)).await;
                            continue;
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A copy of a match from any node: the nodes race, the first match wins.
    ///
    /// On a replicated cluster each node searches the shards it leads, and "nothing" is
    /// the answer only once every shard was searched by a leader that confirmed it: while
    /// a shard was not (an election under way), the read is asked again (see
    /// [`until_covered`](Self::until_covered)), without waiting: the first attempt spent
    /// the caller's wait.
    async fn read(&self, query: Query, timeout: Duration) -> Result<Response> {
        let waited = AtomicBool::new(false);
        self.until_covered(|| {
            let wait = if waited.swap(true, Ordering::Relaxed) {
                Duration::ZERO
            } else {
                timeout
            };
            self.read_covered(&query, wait)
        })
        .await
    }

    /// One read on every live node at once ([`read_once`](Self::read_once)), its "nothing"
    /// refused with [`SpaceError::Unavailable`] unless every shard was searched.
    async fn read_covered(&self, query: &Query, timeout: Duration) -> Result<Response> {
        let (found, searched, of) = self.read_once(query, timeout).await?;
        if found.is_none() {
            every_shard_covered(&searched, of, "read")?;
        }
        Ok(Response::Document(found))
    }

    /// One read on every live node at once: the first match, or none with the shards the
    /// nodes searched (a replicated cluster's) and the cluster's number of shards (0 for
    /// nodes that are not replicated).
    async fn read_once(
        &self,
        query: &Query,
        timeout: Duration,
    ) -> Result<(Option<Document>, BTreeSet<u32>, u32)> {
        let mut calls: FuturesUnordered<_> = self
            .asked_in_turn(&self.next_taker, Patience::UntilReplaced)
            .into_iter()
            .map(|addr| async move {
                let read = self.query_on(&addr, timeout, |timeout| Request::ReadDirect {
                    target: Target::Query(query.clone()),
                    timeout,
                });
                self.unless_silent(&addr, timeout, Patience::UntilReplaced, read)
                    .await
            })
            .collect();
        let (mut answered, mut error) = (false, None);
        let (mut searched, mut of) = (BTreeSet::new(), 0);
        while let Some(answer) = calls.next().await {
            match answer {
                Ok(Response::Document(Some(d))) => return Ok((Some(d), searched, of)),
                Ok(Response::Document(None)) => answered = true,
                Ok(Response::NoneInShards { searched: s, of: n }) => {
                    answered = true;
                    searched.extend(s);
                    of = of.max(n);
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) if e.is_unreachable() => error = Some(e),
                Err(e) => return Err(e),
            }
        }
        match error {
            Some(e) if !answered => Err(e),
            _ => Ok((None, searched, of)),
        }
    }

    /// Claims a match on whichever node has one first, waiting up to `timeout` on all live
    /// nodes at once (starting with the next node in turn).
    ///
    /// Once one node answers with a claim, the other calls are dropped: each revokes itself
    /// ([`revoke`](crate::revoke)), which ends its wait on its node, or releases a claim it
    /// made meanwhile, at once rather than when its lease runs out.
    async fn claim(
        self: &Arc<Self>,
        query: Query,
        lease: Lease,
        timeout: Duration,
    ) -> Result<Option<space_core::ClaimedDocument>> {
        let addrs = self.live_in_turn(&self.next_taker);
        let mut calls: FuturesUnordered<_> = addrs
            .into_iter()
            .map(|addr| {
                let query = &query;
                async move {
                    let answer = self
                        .query_on(&addr, timeout, |timeout| Request::Claim {
                            query: query.clone(),
                            lease,
                            timeout,
                        })
                        .await;
                    (addr, answer)
                }
            })
            .collect();
        let (mut answered, mut error) = (false, None);
        while let Some((addr, answer)) = calls.next().await {
            match answer {
                Ok(Response::Claimed(Some(c))) => return Ok(Some(c)),
                Ok(Response::Claimed(None)) => answered = true,
                Ok(other) => return Err(unexpected(other)),
                Err(e) if e.is_unreachable() => {
                    tracing::debug!(node = %addr, error = %e, "a claim across nodes could not reach one node");
                    error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match error {
            Some(e) if !answered => Err(e),
            _ => Ok(None),
        }
    }

    /// Takes up to `max` matches across the live nodes, waiting up to `timeout` for the
    /// first.
    ///
    /// What is there now is taken first: a blocking take of one looks on the next node in
    /// turn, anything else sweeps every node; then, if nothing was found and the take may
    /// wait, it claims on all nodes at once and commits the first claim. Every take, claim
    /// and commit it makes is revoked if the take does not return (see
    /// [`revoke::guarded`](crate::revoke)).
    async fn take(
        self: &Arc<Self>,
        query: Query,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Document>> {
        let addrs = self.live_in_turn(&self.next_taker);
        if let [only] = addrs.as_slice() {
            return self.take_on(only, query, max, timeout).await;
        }
        let look = if max == 1 && !timeout.is_zero() {
            1
        } else {
            addrs.len()
        };
        let mut got = match self.sweep(&addrs[..look], &query, max).await {
            Ok(got) => got,
            // The node looked at first is gone: the claims below wait on the others.
            Err(e) if look < addrs.len() && e.is_unreachable() => Vec::new(),
            Err(e) => return Err(e),
        };
        if !got.is_empty() || timeout.is_zero() {
            return Ok(got);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(claimed) = self
                .claim(query.clone(), Lease::For(TAKE_CLAIM_LEASE), left)
                .await?
            else {
                return Ok(got);
            };
            let document = claimed.document;
            match self
                .to_owner(&claimed.ticket.key.clone(), Request::Commit(claimed.ticket))
                .await
            {
                Ok(_) => {
                    got.push(document);
                    break;
                }
                // The claim ran out before the commit (it went back): look again.
                Err(SpaceError::ClaimLost { .. }) if !left.is_zero() => continue,
                Err(e) => return Err(e),
            }
        }
        if max > 1 {
            got.extend(self.sweep(&addrs, &query, max - 1).await?);
        }
        Ok(got)
    }

    /// A take by query on one node.
    async fn take_on(
        &self,
        addr: &str,
        query: Query,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Document>> {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let request = |timeout| Request::TakeDirect {
            target: Target::Query(query.clone()),
            max,
            timeout,
        };
        match self.query_on(addr, timeout, request).await? {
            Response::Documents(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// A call by query on the node at `addr` that may wait up to `timeout`: `request`
    /// makes it for the time left. When the shards that node leads change while it
    /// waits (a replicated cluster's failover), the node ends the wait, having done
    /// nothing (`WrongNode`), and the call is made again for the time left; so is a call
    /// the node gave up itself when its connection closed (`Revoked`, see
    /// [`revoke::given_up_by_its_node`]).
    async fn query_on(
        &self,
        addr: &str,
        timeout: Duration,
        request: impl Fn(Duration) -> Request,
    ) -> Result<Response> {
        let deadline = Instant::now() + timeout;
        let mut again = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let conn = self.node(addr).await?;
            let id = RequestId::new();
            let answer = revoke::call_as(&conn, id, request(left)).await;
            if revoke::given_up_by_its_node(&answer) && again < revoke::AFRESH {
                again += 1;
                continue;
            }
            match answer {
                // Leaderships change in bursts (a failover moves many shards): asked
                // again while its time lasts, and a few times once it is out.
                Err(SpaceError::WrongNode { .. })
                    if again < REROUTES || (again < MAX_ASKS && Instant::now() < deadline) =>
                {
                    again += 1;
                    // The node did nothing it knows of, but a shard whose leadership
                    // ended may have handed the wait an entry just before: revoked, so
                    // the shard's leader of the moment gives it back.
                    revoke::abandon(&conn, id);
                    // A stale topology is refreshed; a failed refresh is no reason to
                    // stop (the call itself says whether the node is reachable).
                    let _ = self.refresh().await;
                }
                answer => return answer,
            }
        }
    }

    /// Takes what is there now on `addrs`, node after node, up to `max`. A replicated
    /// node takes from one of its shards per call, so the nodes are swept again while a
    /// pass found something and `max` is not reached.
    async fn sweep(&self, addrs: &[String], query: &Query, max: usize) -> Result<Vec<Document>> {
        let mut got = Vec::new();
        let (mut reached, mut skipped) = (false, None);
        let mut found_in_pass = true;
        while found_in_pass && got.len() < max {
            found_in_pass = false;
            for addr in addrs {
                if got.len() >= max {
                    break;
                }
                match self
                    .take_on(addr, query.clone(), max - got.len(), Duration::ZERO)
                    .await
                {
                    Ok(docs) => {
                        reached = true;
                        found_in_pass |= !docs.is_empty();
                        got.extend(docs);
                    }
                    // A node lost on the way: the others still serve (its call revokes
                    // itself).
                    Err(e) if e.is_unreachable() => skipped = Some(e),
                    Err(e) => return Err(e),
                }
            }
        }
        match skipped {
            Some(e) if !reached => Err(e),
            _ => Ok(got),
        }
    }

    /// Runs `attempt`, a read, listing or count made of what each shard's leader answers,
    /// again while it fails [`SpaceError::Unavailable`] (a shard had no leader that could
    /// be reached: an election under way) or [`SpaceError::WrongNode`] (a node's
    /// leadership of a shard it listed ended, or could not be confirmed), for
    /// [`ClientConfig::retry_for`] from the first failure (a blocking read's first
    /// attempt may have waited long before it).
    async fn until_covered<F: Future<Output = Result<Response>>>(
        &self,
        attempt: impl Fn() -> F,
    ) -> Result<Response> {
        let mut until = None;
        loop {
            match attempt().await {
                Err(SpaceError::Unavailable { .. } | SpaceError::WrongNode { .. })
                    if Instant::now()
                        < *until.get_or_insert_with(|| Instant::now() + self.config.retry_for) =>
                {
                    let _ = self.refresh().await;
                    tokio::time::sleep(COVER_POLL).await;
                }
                answer => return answer,
            }
        }
    }

    /// The matches on every node, counted: each node counts the shards it leads (a
    /// shard counted by two leaders in turn counts once); a shard no node counted makes
    /// the count fail with [`SpaceError::Unavailable`] rather than come back short.
    async fn count(&self, query: Query) -> Result<Response> {
        let mut total = 0;
        let (mut by_shard, mut shard_count) = (BTreeMap::new(), 0);
        for answer in self
            .gather(&Request::Count(query), Patience::UntilReplaced)
            .await?
            .0
        {
            match answer {
                Response::Count(n) => total += n,
                Response::ShardCounts { counts, of } => {
                    by_shard.extend(counts);
                    shard_count = shard_count.max(of);
                }
                other => return Err(unexpected(other)),
            }
        }
        every_shard_covered(by_shard.keys(), shard_count, "count")?;
        Ok(Response::Count(total + by_shard.values().sum::<u64>()))
    }

    /// Every match on every node (node after node, page by page).
    ///
    /// On a replicated cluster each node lists the shards it leads; a shard that no node
    /// listed (no leader could be reached) makes the listing fail with
    /// [`SpaceError::Unavailable`] rather than come back without its entries.
    async fn contents(&self, query: Query) -> Result<Response> {
        let mut documents = Vec::new();
        let (mut reached, mut failure) = (false, None);
        // A replicated cluster's nodes each list the shards they lead.
        let (mut shards, mut shard_count) = (BTreeSet::new(), 0);
        for addr in self.asked_in_turn(&AtomicUsize::new(0), Patience::UntilReplaced) {
            let mut after = None;
            loop {
                let request = Request::Contents {
                    query: query.clone(),
                    after,
                    limit: 1000,
                };
                let call = async { self.node(&addr).await?.call(request).await };
                let answer = match self
                    .unless_silent(&addr, Duration::ZERO, Patience::UntilReplaced, call)
                    .await
                {
                    Err(e) if e.is_unreachable() => {
                        tracing::warn!(node = %addr, "listing contents without a member that could not be reached");
                        failure = Some(e);
                        break;
                    }
                    answer => answer?,
                };
                reached = true;
                match answer {
                    Response::Page {
                        documents: page,
                        next,
                        listed,
                        of,
                    } => {
                        documents.extend(page);
                        shards.extend(listed);
                        shard_count = shard_count.max(of);
                        match next {
                            Some(n) => after = Some(n),
                            None => break,
                        }
                    }
                    other => return Err(unexpected(other)),
                }
            }
        }
        if let Some(e) = failure
            && !reached
        {
            return Err(e);
        }
        every_shard_covered(shards.iter(), shard_count, "listing")?;
        if shard_count > 0 {
            // A shard whose leadership moved while the nodes were asked in turn was
            // listed by both leaders.
            let mut seen = HashSet::new();
            documents.retain(|d| seen.insert(d.key.clone()));
        }
        Ok(Response::Page {
            documents,
            next: None,
            listed: Vec::new(),
            of: 0,
        })
    }

    /// The client's settings.
    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The runtime the client's tasks run on.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) async fn endpoint(&self) -> Result<Arc<Endpoint>> {
        self.endpoint
            .get_or_try_init(|| Endpoint::start(&self.config))
            .await
            .cloned()
    }

    /// Connections to the members this client can reach, made when asked: where the
    /// revokes of a replicated cluster go ([`revoke`](crate::revoke)).
    fn reach(self: &Arc<Self>) -> revoke::Members {
        let cluster = self.clone();
        Arc::new(move || {
            let cluster = cluster.clone();
            Box::pin(async move {
                cluster
                    .members()
                    .await
                    .into_iter()
                    .filter_map(|(_, conn)| conn.ok())
                    .collect()
            })
        })
    }

    /// The members and a connection to each (or why there is none).
    async fn members(&self) -> Vec<(String, Result<Arc<Connection>>)> {
        let mut out = Vec::new();
        for addr in self.addresses() {
            let conn = self.node(&addr).await;
            out.push((addr, conn));
        }
        out
    }

    /// Registers a subscription on every live member; their events arrive merged in one
    /// stream. A member that cannot be reached is named by the subscription's `unreached`
    /// and, for a subscription without a lease, registered later when it is back.
    ///
    /// # Errors
    /// A member's refusal (an invalid query, `Busy`), or `Unreachable` when no member
    /// could be reached.
    pub async fn subscribe(
        self: &Arc<Self>,
        query: Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> Result<Subscription> {
        if self.topology().shards > 0 {
            return self.subscribe_shards(query, kinds, lease).await;
        }
        let endpoint = self.endpoint().await?;
        let push_ends = endpoint.push_ends();
        let (node_lease, renew) = subscriber::lease_given(lease, &self.config);
        let (tx, rx) = feed_channel();
        let spec = Spec {
            query: query.clone(),
            kinds,
            lease: node_lease,
        };
        let state = FeedState::new(spec, Some(tx));
        let mut registered = 0;
        let mut last = None;
        for (addr, conn) in self.members().await {
            let result = match conn {
                Ok(conn) => state.register(&endpoint, conn, None).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => registered += 1,
                Err(e) if e.is_unreachable() => {
                    tracing::warn!(node = %addr, error = %e, "subscribing without a member that could not be reached");
                    state.unreached(&addr);
                    last = Some(e);
                }
                Err(e) => {
                    Feed::new(rx, state, endpoint, self.runtime.clone()).cancel();
                    return Err(e);
                }
            }
        }
        if registered == 0
            && let Some(e) = last
        {
            return Err(e);
        }
        let keep_alive = renew.then_some((self.config.subscription_lease, push_ends));
        Ok(self.feed(query, state, rx, endpoint, keep_alive, lease))
    }

    /// The subscription whose parts push into `rx`. Without a lease of its own it is kept
    /// alive (renewed for `keep_alive`'s lease, and registered again where it went
    /// missing) while it lives, hurried by the push connections that end
    /// ([`Endpoint::push_ends`] taken before its parts were registered); with one, it ends
    /// when that lease does.
    fn feed(
        self: &Arc<Self>,
        query: Query,
        state: Arc<FeedState>,
        rx: flume::Receiver<Delivered>,
        endpoint: Arc<Endpoint>,
        keep_alive: Option<(Duration, subscriber::PushEnds)>,
        lease: Lease,
    ) -> Subscription {
        match (keep_alive, lease) {
            (Some(renewal), _) => {
                let cluster = Arc::downgrade(self);
                self.runtime.handle().spawn(subscriber::keep_alive(
                    Arc::downgrade(&state),
                    endpoint.clone(),
                    renewal,
                    move || {
                        let cluster = cluster.clone();
                        async move {
                            match cluster.upgrade() {
                                Some(c) => c.members().await,
                                None => Vec::new(),
                            }
                        }
                    },
                ));
            }
            (None, Lease::For(d)) => {
                state.seal();
                self.runtime.handle().spawn(subscriber::end_after(
                    Arc::downgrade(&state),
                    endpoint.clone(),
                    d,
                ));
            }
            (None, Lease::Forever) => state.seal(),
        }
        Subscription::remote(
            query,
            Box::new(Feed::new(rx, state, endpoint, self.runtime.clone())),
        )
    }

    /// Picks up a detached subscription of a one-node cluster after `last_seq`.
    ///
    /// # Errors
    ///
    /// `SubscriptionClosed` when the node no longer has it; the node could not be reached;
    /// a cluster of several nodes (a subscription there has a part on each) or a
    /// replicated one (numbered per shard): `resume_at` picks those up.
    pub async fn resume(self: &Arc<Self>, id: u64, last_seq: u64) -> Result<Subscription> {
        if self.topology().shards > 0 {
            return Err(SpaceError::Protocol {
                reason: "a replicated cluster's subscription is numbered per shard: pick it up from its position (detach_at, resume_at)".into(),
            });
        }
        let addrs = self.addresses();
        let [addr] = &addrs[..] else {
            return Err(SpaceError::Protocol {
                reason: "resuming a subscription of a cluster of several nodes is not supported; subscribe again".into(),
            });
        };
        let endpoint = self.endpoint().await?;
        let push_ends = endpoint.push_ends();
        let conn = self.node(addr).await?;
        let (tx, rx) = feed_channel();
        let spec = Spec {
            query: Query::for_type(""),
            kinds: EventKinds::ALL,
            lease: Lease::For(self.config.subscription_lease),
        };
        let state = FeedState::new(spec, Some(tx));
        state
            .register(&endpoint, conn, Some((id, last_seq)))
            .await?;
        let lease = self.config.subscription_lease;
        Ok(self.feed(
            Query::for_type(""),
            state,
            rx,
            endpoint,
            Some((lease, push_ends)),
            Lease::Forever,
        ))
    }

    /// Picks up a detached subscription where `position` says it stands: on each member
    /// that still has it, after the last event handed out there; a member that lost it (a
    /// restart, or its lease ran out there) or that the position does not name gets it
    /// anew, after a gap. The subscription is kept alive from then on (renewed, as one
    /// made without a lease).
    ///
    /// # Errors
    ///
    /// `SubscriptionClosed` when no member has it any more (subscribe again); a member's
    /// refusal; `Unreachable` when no member could be reached.
    pub async fn resume_at(
        self: &Arc<Self>,
        position: SubscriptionPosition,
    ) -> Result<Subscription> {
        if position.parts.iter().any(|p| p.shard.is_some()) {
            return self.resume_shards(position).await;
        }
        let endpoint = self.endpoint().await?;
        let push_ends = endpoint.push_ends();
        let (tx, rx) = feed_channel();
        let lease = self.config.subscription_lease;
        let spec = Spec {
            query: position.query.clone(),
            kinds: position.kinds,
            lease: Lease::For(lease),
        };
        let state = FeedState::new(spec, Some(tx));
        let (mut resumed, mut lost, mut last) = (0, Vec::new(), None);
        for (addr, conn) in self.members().await {
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    state.unreached(&addr);
                    last = Some(e);
                    continue;
                }
            };
            let part = position.parts.iter().find(|p| p.node == conn.node());
            let result = match part {
                Some(p) => {
                    let at = Some((p.id, p.last_seq));
                    state.register(&endpoint, conn.clone(), at).await
                }
                None => Err(SpaceError::SubscriptionClosed { id: 0 }),
            };
            let result = match result {
                Ok(()) => {
                    resumed += 1;
                    Ok(())
                }
                // Lost there, or never there: registered anew, after a gap announced
                // before any of its events (something may be missing).
                Err(SpaceError::SubscriptionClosed { id }) => {
                    lost.push(id);
                    state.announce_missed();
                    state.register(&endpoint, conn, None).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {}
                Err(e) if e.is_unreachable() => {
                    state.unreached(&addr);
                    last = Some(e);
                }
                Err(e) => {
                    Feed::new(rx, state, endpoint, self.runtime.clone()).cancel();
                    return Err(e);
                }
            }
        }
        let subscription = self.feed(
            position.query,
            state.clone(),
            rx,
            endpoint,
            Some((lease, push_ends)),
            Lease::Forever,
        );
        if resumed == 0 {
            subscription.cancel();
            return Err(match last {
                Some(e) if lost.is_empty() => e,
                _ => SpaceError::SubscriptionClosed {
                    id: position.parts.first().map_or(0, |p| p.id),
                },
            });
        }
        if !lost.is_empty() {
            tracing::info!(lost = ?lost, "resumed a subscription that some members had lost: registered there anew, after a gap");
        }
        Ok(subscription)
    }
}

/// The [`RemoteBackend`] of a [`Space`] on a cluster (of one or more nodes).
struct Remote {
    cluster: Arc<Cluster>,
    node: NodeId,
}

impl RemoteBackend for Remote {
    fn node(&self) -> NodeId {
        self.node
    }

    fn call(&self, request: Request) -> BoxFuture<'static, Result<Response>> {
        let cluster = self.cluster.clone();
        self.cluster
            .runtime
            .bind(async move { cluster.call(request).await })
    }

    fn send(&self, request: Request) {
        let cluster = self.cluster.clone();
        let counted = revoke::GivingBack::start();
        drop(self.cluster.runtime.handle().spawn(async move {
            let _counted = counted;
            if let Err(e) = cluster.call(request).await {
                tracing::warn!(error = %e, "a request sent in the background failed");
            }
        }));
    }

    fn subscribe(
        &self,
        query: Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> BoxFuture<'static, Result<Subscription>> {
        let cluster = self.cluster.clone();
        self.cluster
            .runtime
            .bind(async move { cluster.subscribe(query, kinds, lease).await })
    }

    fn resume(&self, id: u64, last_seq: u64) -> BoxFuture<'static, Result<Subscription>> {
        let cluster = self.cluster.clone();
        self.cluster
            .runtime
            .bind(async move { cluster.resume(id, last_seq).await })
    }

    fn resume_at(
        &self,
        position: SubscriptionPosition,
    ) -> BoxFuture<'static, Result<Subscription>> {
        let cluster = self.cluster.clone();
        self.cluster
            .runtime
            .bind(async move { cluster.resume_at(position).await })
    }

    fn send_acknowledgements(&self) -> BoxFuture<'static, Result<()>> {
        let cluster = self.cluster.clone();
        self.cluster.runtime.bind(async move {
            cluster.send_acknowledgements().await;
            Ok(())
        })
    }

    fn settle(&self) -> BoxFuture<'static, Result<()>> {
        let cluster = self.cluster.clone();
        self.cluster.runtime.bind(async move {
            cluster.settle().await;
            Ok(())
        })
    }
}

/// The [`Space`] of a connected cluster.
pub fn space_of(cluster: Arc<Cluster>) -> Space {
    let node = cluster
        .topology
        .read()
        .nodes
        .first()
        .map_or(NodeId(0), |n: &NodeInfo| n.node);
    Space::from_remote(Arc::new(Remote { cluster, node }))
}

/// A [`Space`] on the node (or cluster) at `addr` (host:port), with default settings.
/// Call it inside a tokio runtime; remote calls run on that runtime.
///
/// # Errors
/// `Unreachable` or `Rejected` when the node cannot be reached or refuses the connection.
pub async fn connect(addr: &str) -> Result<Space> {
    connect_with(addr, ClientConfig::default()).await
}

/// [`connect`] with settings (token, timeouts, subscriber endpoint). `addr` may list
/// several seed addresses separated by commas.
///
/// # Errors
///
/// `Down` or `Unreachable` when no seed answers; `Rejected` when the node refuses the
/// handshake (a wrong token, another protocol version).
pub async fn connect_with(addr: &str, config: ClientConfig) -> Result<Space> {
    Ok(space_of(Cluster::open(&seeds(addr), config).await?))
}

/// The seed addresses `addr` lists, separated by commas (blanks around them ignored).
pub fn seeds(addr: &str) -> Vec<&str> {
    addr.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A blocking handle on the node (or cluster) at `addr`, for plain threads: the client runs
/// its own small runtime. Do not call it from inside an async task.
///
/// # Errors
///
/// As [`connect`]; also when the client's runtime cannot start.
pub fn connect_blocking(addr: &str) -> Result<BlockingSpace> {
    connect_blocking_with(addr, ClientConfig::default())
}

/// [`connect_blocking`] with settings.
///
/// # Errors
///
/// As [`connect_blocking`].
pub fn connect_blocking_with(addr: &str, config: ClientConfig) -> Result<BlockingSpace> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("space-client")
        .enable_all()
        .build()
        .map_err(|e| SpaceError::Protocol {
            reason: format!("cannot start the client's runtime: {e}"),
        })?;
    let runtime = Runtime::Owned(Arc::new(OwnedRuntime(Some(rt))));
    let seeds: Vec<String> = seeds(addr).into_iter().map(str::to_owned).collect();
    let open = runtime.bind({
        let runtime = runtime.clone();
        async move {
            let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
            Cluster::open_on(&seeds, config, runtime).await
        }
    });
    let cluster = futures::executor::block_on(open)?;
    Ok(space_of(cluster).blocking())
}

/// `Space::connect(addr)`: the remote constructors as methods of [`Space`].
pub trait Connect: Sized {
    /// A space on the node at `addr`; see [`connect`].
    fn connect(addr: &str) -> impl std::future::Future<Output = Result<Self>> + Send;
}

impl Connect for Space {
    fn connect(addr: &str) -> impl std::future::Future<Output = Result<Space>> + Send {
        let addr = addr.to_owned();
        async move { connect(&addr).await }
    }
}

/// Adds a node's view of `shards` to `merged`: each shard as the node that saw its latest
/// term (and, at the same term, its leader) describes it.
fn merge_shards(merged: &mut BTreeMap<u32, wire::ShardInfo>, shards: Vec<wire::ShardInfo>) {
    for shard in shards {
        let newer = merged.get(&shard.shard).is_none_or(|seen| {
            (shard.term, shard.leader.is_some()) > (seen.term, seen.leader.is_some())
        });
        if newer {
            merged.insert(shard.shard, shard);
        }
    }
}

/// How long a call that changes nothing waits for a node that left it and a status call
/// unanswered ([`Cluster::unless_silent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Patience {
    /// Given up as soon as another node may answer: for answers that may leave a node
    /// out and say so (statistics, the shards' leaders).
    WhileSilent,
    /// Given up only once the node's shards are led by others: for answers that must
    /// cover every shard (a count, a listing, a read by query), which the others cannot
    /// give while the node still leads some. A node that is only busy, or paused for a
    /// moment, is so waited for (its call timeout at most).
    UntilReplaced,
}

/// Whether a node's `topology` may name owners wrongly: a replicated node names the
/// first replica as the owner of the shards it does not replicate. That is their owner
/// with one replica (no failover); with 3 or 5 replicas it may be wrong after a failover,
/// unless every node replicates every shard, as with 3 nodes (replicas are at most as
/// many as nodes).
fn guesses_owners(topology: &Topology) -> bool {
    topology.shards > 0 && topology.failover && topology.nodes.len() > 3
}

/// `topology` (a replicated cluster's, as one node saw it) with each range owned by its
/// shard's leader as `shards` names it (the nodes' views merged), and an epoch no lower
/// than the sum of their terms.
fn with_shard_leaders(mut topology: Topology, shards: &[wire::ShardInfo]) -> Topology {
    let mut terms = 0;
    for shard in shards {
        terms += shard.term;
        let Some(owner) = shard
            .leader
            .and_then(|leader| topology.nodes.iter().position(|n| n.node == leader))
        else {
            continue;
        };
        for range in shard.first_range..=shard.last_range {
            if let Some(o) = topology.owners.get_mut(range as usize) {
                *o = owner as u32;
            }
        }
    }
    topology.epoch = topology.epoch.max(terms);
    topology
}

/// Whether `covered` names every one of a replicated cluster's `of` shards (`of` is 0 for
/// other clusters: nothing to check); an `Unavailable` error naming the missing shards
/// otherwise, since a `what` without them would be silently incomplete.
fn every_shard_covered<'a>(
    covered: impl IntoIterator<Item = &'a u32>,
    of: u32,
    what: &str,
) -> Result<()> {
    let covered: BTreeSet<u32> = covered.into_iter().copied().collect();
    let missing: Vec<u32> = (0..of).filter(|s| !covered.contains(s)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(SpaceError::Unavailable {
        reason: format!(
            "shards {missing:?} of {of} had no leader that could be reached (an election, or too few nodes up): a {what} without them would be incomplete"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that waited out a dead owner (many quick asks) and then finds the shard's
    /// new leader not serving yet gives it the short first pause, not the longest: the
    /// dead owner's asks do not lengthen the pauses given to owners that answer.
    #[test]
    fn waiting_out_a_dead_owner_does_not_lengthen_the_next_pause() {
        let mut reroutes = Reroutes::new(Duration::from_secs(10));
        let down = SpaceError::Down {
            node: "127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        for _ in 0..30 {
            assert!(reroutes.another());
            assert_eq!(reroutes.pause_after(&down), DEAD_OWNER_POLL);
        }
        let not_yet = SpaceError::WrongNode {
            epoch: 7,
            owner: None,
        };
        let pauses: Vec<Duration> = (0..12).map(|_| reroutes.pause_after(&not_yet)).collect();
        assert_eq!(pauses[0], Duration::from_millis(50));
        assert_eq!(pauses[1], Duration::from_millis(100));
        assert_eq!(pauses[9], MOST_REROUTE_PAUSE);
        assert_eq!(pauses[11], MOST_REROUTE_PAUSE);
    }
}
