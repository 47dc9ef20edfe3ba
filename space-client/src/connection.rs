//! A connection to one `space-node`.
//!
//! Calls go over one multiplexed connection (any number of requests at once: the node
//! bounds them). A call that fails because the connection broke is retried on a new
//! connection, with backoff, for up to [`ClientConfig::retry_for`], with the *same request
//! id*, so the node answers a retried take or write with its first answer. Blocking calls
//! set their deadline beyond their own timeout (at most [`wire::MAX_CALL_WAIT`]).
//!
//! A node that cannot be reached is remembered as down: a new call to it fails at once with
//! `Unreachable` (a call already under way keeps retrying, to get its answer), and at most
//! one call per [`ClientConfig::probe_after`] tries to connect again.
//!
//! Requests are checked against the node's limits (told in its handshake) before they are
//! sent: an oversized entry or request gets a typed error and never reaches the wire.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::wire::{
    self, Envelope, Hello, Limits, Request, RequestId, Response, SpaceServiceClient, Welcome,
};
use space_core::{NodeId, Result, SpaceError};
use tarpc::client::RpcError;
use tarpc::{client, context};
use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// How a client reaches a node.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The node's auth token, if it requires one.
    pub token: Option<String>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a node may take to answer, on top of the call's own timeout.
    pub call_timeout: Duration,
    /// How long to keep reconnecting before a call fails with `Unreachable`; on a
    /// replicated cluster, also how long a call follows a shard's failover (a call by key
    /// to the shard's next leader, a count or listing until every shard has a leader)
    /// before it fails with `Unavailable`.
    pub retry_for: Duration,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// Where to serve the endpoint nodes push notify events to.
    pub subscriber_bind: SocketAddr,
    /// The endpoint address to give nodes (default: the bound address).
    pub subscriber_advertise: Option<SocketAddr>,
    /// Lease of a subscription asked for without one; renewed while its handle lives, so a
    /// client that dies stops costing the node.
    pub subscription_lease: Duration,
    /// After a node could not be reached, new calls to it fail at once for this long;
    /// the next call after it tries to connect again.
    pub probe_after: Duration,
    /// How notify events reach this client.
    pub delivery: Delivery,
}

/// How notify events travel from the nodes to a client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Pushed to the client's endpoint; when a node cannot connect to it (a client behind
    /// NAT, or advertising an address the node cannot reach), carried over the client's
    /// own connection instead, from then on.
    #[default]
    Auto,
    /// Pushed to the client's endpoint only: a node that cannot connect to it refuses the
    /// subscription ([`SpaceError::EndpointUnreachable`](space_core::SpaceError)).
    Push,
    /// Carried over the client's own connection (long polls): for clients that cannot
    /// accept connections at all. Costs a waiting request per subscription and node.
    Poll,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            token: None,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(10),
            max_frame: wire::DEFAULT_MAX_FRAME,
            subscriber_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            subscriber_advertise: None,
            subscription_lease: Duration::from_secs(30),
            probe_after: Duration::from_millis(500),
            delivery: Delivery::Auto,
        }
    }
}

/// The runtime remote calls run on: the caller's, or one the client owns (blocking use).
#[derive(Clone)]
pub(crate) enum Runtime {
    Borrowed(Handle),
    Owned(Arc<OwnedRuntime>),
}

pub(crate) struct OwnedRuntime(pub(crate) Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            // Dropping a runtime may happen on a runtime thread: do not block there.
            rt.shutdown_background();
        }
    }
}

impl Runtime {
    pub(crate) fn handle(&self) -> Handle {
        match self {
            Runtime::Borrowed(h) => h.clone(),
            Runtime::Owned(rt) => {
                rt.0.as_ref()
                    .map(|r| r.handle().clone())
                    .unwrap_or_else(Handle::current)
            }
        }
    }

    /// Binds `fut` to the runtime: it can be awaited on any tokio runtime, or blocked on
    /// from a plain thread, and always runs its I/O and timers on the client's runtime.
    /// (No task is spawned: awaiting it costs no hand-over between threads.)
    pub(crate) fn bind<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T>> {
        Box::pin(tokio_util::context::TokioContext::new(fut, self.handle()))
    }
}

/// One node, connected: calls with retry.
pub struct Connection {
    addr: String,
    config: ClientConfig,
    node: NodeId,
    limits: Limits,
    client: Mutex<Option<Live>>,
    dialing: tokio::sync::Mutex<()>,
    /// When connecting last failed, while the node is believed down.
    down_since: Mutex<Option<Instant>>,
    /// Requests whose answers reached their callers for good, to be acknowledged with
    /// the next call ([`acknowledge`](Connection::acknowledge)).
    acknowledged: Mutex<VecDeque<RequestId>>,
    /// The calls under way, each by when its answer is due (its wait and
    /// [`OVERDUE_AFTER`]) and a number of its own.
    under_way: Mutex<BTreeSet<(Instant, u64)>>,
    next_call: AtomicU64,
    /// What the node's answers say of its silence ([`Connection::is_silent`]).
    silence: Mutex<Silence>,
}

/// When a node last answered, and when it was last found silent.
#[derive(Clone, Copy, Debug, Default)]
struct Silence {
    answered_at: Option<Instant>,
    silent_at: Option<Instant>,
}

impl Silence {
    /// Notes, at `now`, whether the oldest call under way (due at `oldest_due`) is overdue
    /// with no answer from the node since it fell due; and says whether the node is
    /// silent: found so within the last `memory`, with no answer since.
    fn look(&mut self, oldest_due: Option<Instant>, now: Instant, memory: Duration) -> bool {
        let overdue =
            oldest_due.is_some_and(|due| due <= now && self.answered_at.is_none_or(|a| a < due));
        if overdue {
            self.silent_at = Some(now);
        }
        self.silent_at
            .is_some_and(|t| now.duration_since(t) < memory)
    }

    /// Notes an answer from the node at `now`: it is not silent.
    fn answered(&mut self, now: Instant) {
        self.answered_at = Some(now);
        self.silent_at = None;
    }
}

/// How long past its own wait a call may go unanswered before its node is taken for
/// silent ([`Connection::is_silent`]): well beyond what a live node takes, short beside a
/// replicated shard's failover of about half a second.
pub(crate) const OVERDUE_AFTER: Duration = Duration::from_millis(500);

/// A call under way on a connection, counted in [`Connection::is_silent`] until it ends
/// (answered, failed or dropped).
struct UnderWay<'a> {
    conn: &'a Connection,
    entry: (Instant, u64),
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.conn.under_way.lock().remove(&self.entry);
        // A call that ends (given up, or failed) overdue with nothing heard from the
        // node since it fell due leaves the node silent, whether or not anyone looked
        // while it was under way.
        self.conn.silence.lock().look(
            Some(self.entry.0),
            Instant::now(),
            self.conn.config.call_timeout,
        );
    }
}

/// A connection made, and whether it has ended (its peer closed it, or it failed): a call
/// is never sent over an ended connection, so a node that went away is noticed before a
/// request goes out rather than after.
#[derive(Clone)]
struct Live {
    client: SpaceServiceClient,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Live {
    fn is_open(&self) -> bool {
        !self.ended.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// tarpc's client settings: no cap of its own on requests in flight (a capped client
/// queues calls behind blocked ones, and a worker pool sharing one handle starves); the
/// node bounds what it accepts and answers `Busy` past that.
fn rpc_config() -> client::Config {
    let mut config = client::Config::default();
    config.max_in_flight_requests = usize::MAX;
    config
}

async fn dial(addr: &str, config: &ClientConfig) -> Result<(Live, NodeId, Limits)> {
    let unreachable = |reason: String| SpaceError::Unreachable {
        node: addr.to_owned(),
        reason,
    };
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            unreachable(format!(
                "connecting took longer than {:?}",
                config.connect_timeout
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| unreachable(e.to_string()))?;
    let mut framed = wire::framed(stream, config.max_frame);
    wire::send_frame(
        &mut framed,
        &Hello::new(config.token.clone(), config.max_frame),
    )
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    let welcome = tokio::time::timeout(
        config.connect_timeout,
        wire::recv_frame::<_, Welcome>(&mut framed),
    )
    .await
    .map_err(|_| unreachable("no answer to the handshake".into()))?
    .map_err(|e| unreachable(format!("bad handshake answer: {e}")))?;
    match welcome {
        Some(Welcome::Accepted { node, limits }) => {
            let new = SpaceServiceClient::new(rpc_config(), wire::transport(framed));
            let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let dispatch = new.dispatch;
            let flag = ended.clone();
            tokio::spawn(async move {
                if let Err(e) = dispatch.await {
                    tracing::debug!(error = %e, "a connection to a node ended");
                }
                flag.store(true, std::sync::atomic::Ordering::Release);
            });
            Ok((
                Live {
                    client: new.client,
                    ended,
                },
                node,
                limits,
            ))
        }
        Some(Welcome::Refused { reason }) => Err(SpaceError::Rejected {
            node: addr.to_owned(),
            reason,
        }),
        Some(Welcome::Busy { reason }) => Err(SpaceError::Busy {
            node: addr.to_owned(),
            reason,
        }),
        None => Err(unreachable(
            "the node closed the connection during the handshake".into(),
        )),
    }
}

impl Connection {
    /// Connects to the node at `addr` (host:port), on the current tokio runtime.
    ///
    /// # Errors
    /// `Unreachable` when no connection can be made, `Rejected` for a wrong token or
    /// protocol.
    pub async fn open(addr: &str, config: ClientConfig) -> Result<Arc<Connection>> {
        Handle::try_current().map_err(|_| SpaceError::Protocol {
            reason: "connect needs a tokio runtime; use connect_blocking from plain threads".into(),
        })?;
        Self::open_on(addr, config).await
    }

    pub(crate) async fn open_on(addr: &str, config: ClientConfig) -> Result<Arc<Connection>> {
        let (client, node, limits) = dial(addr, &config).await?;
        Ok(Arc::new(Connection {
            addr: addr.to_owned(),
            config,
            node,
            limits,
            client: Mutex::new(Some(client)),
            dialing: tokio::sync::Mutex::new(()),
            down_since: Mutex::new(None),
            acknowledged: Mutex::new(VecDeque::new()),
            under_way: Mutex::new(BTreeSet::new()),
            next_call: AtomicU64::new(0),
            silence: Mutex::new(Silence::default()),
        }))
    }

    /// A connection to node `node` at `addr` that has not been made (for unit tests of
    /// what holds connections; a call through it dials `addr`).
    #[cfg(test)]
    pub(crate) fn unmade(addr: &str, node: NodeId) -> Arc<Connection> {
        Arc::new(Connection {
            addr: addr.to_owned(),
            config: ClientConfig::default(),
            node,
            limits: Limits {
                max_frame: 0,
                max_entry_bytes: 0,
            },
            client: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            down_since: Mutex::new(None),
            acknowledged: Mutex::new(VecDeque::new()),
            under_way: Mutex::new(BTreeSet::new()),
            next_call: AtomicU64::new(0),
            silence: Mutex::new(Silence::default()),
        })
    }

    /// The node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's limits, as it told them when the connection was made.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether the node could not be reached lately (new calls to it fail at once).
    pub fn is_down(&self) -> bool {
        self.down_since
            .lock()
            .is_some_and(|t| t.elapsed() < self.config.probe_after)
    }

    /// Whether the node leaves calls unanswered: a call on this connection went half a
    /// second past its own wait with no answer, and the node has answered nothing since
    /// that call fell due (for up to the call timeout after that was last seen, so that
    /// a node no call goes to any more is tried again in time). A frozen node, or one
    /// cut off with its connection left open, is silent; a node busy with one long call
    /// while it answers others is not.
    pub fn is_silent(&self) -> bool {
        let oldest_due = self.under_way.lock().first().map(|(due, _)| *due);
        self.silence
            .lock()
            .look(oldest_due, Instant::now(), self.config.call_timeout)
    }

    /// Counts a call that may wait `wait` as under way until the guard is dropped.
    fn under_way(&self, wait: Duration) -> UnderWay<'_> {
        let entry = (
            Instant::now() + wait + OVERDUE_AFTER,
            self.next_call.fetch_add(1, Ordering::Relaxed),
        );
        self.under_way.lock().insert(entry);
        UnderWay { conn: self, entry }
    }

    /// The open connection (dialled if there is none).
    fn open_client(&self) -> Option<SpaceServiceClient> {
        self.client
            .lock()
            .as_ref()
            .filter(|l| l.is_open())
            .map(|l| l.client.clone())
    }

    async fn current_client(&self) -> Result<SpaceServiceClient> {
        if let Some(c) = self.open_client() {
            return Ok(c);
        }
        // Reconnect; one caller at a time, the others then use its connection.
        let _one_dialer = self.dialing.lock().await;
        if let Some(c) = self.open_client() {
            return Ok(c);
        }
        match dial(&self.addr, &self.config).await {
            Ok((live, _, _)) => {
                let c = live.client.clone();
                *self.client.lock() = Some(live);
                *self.down_since.lock() = None;
                Ok(c)
            }
            Err(e) => {
                if matches!(e, SpaceError::Unreachable { .. }) {
                    *self.down_since.lock() = Some(Instant::now());
                }
                Err(e)
            }
        }
    }

    fn forget_client(&self) {
        *self.client.lock() = None;
    }

    /// Whether acknowledgements wait for a next call.
    pub(crate) fn has_acknowledgements(&self) -> bool {
        !self.acknowledged.lock().is_empty()
    }

    /// The acknowledgements waiting for the next call, taken for it.
    pub(crate) fn take_acknowledged(&self) -> Vec<RequestId> {
        self.acknowledged.lock().drain(..).collect()
    }

    /// Notes that the answer of request `id` (made on this connection) reached its caller
    /// for good: the next call tells the node, which then drops the entries it keeps with
    /// that answer for a retry or a revoke ([`Envelope::acknowledged`]). Best effort: an
    /// acknowledgement lost with its call (or past the [`wire::MAX_ACKNOWLEDGED`] waiting,
    /// oldest first) leaves the answer kept for its usual time.
    pub(crate) fn acknowledge(&self, id: RequestId) {
        let mut waiting = self.acknowledged.lock();
        if waiting.len() >= wire::MAX_ACKNOWLEDGED {
            waiting.pop_front();
        }
        waiting.push_back(id);
    }

    /// Sends one request and returns the node's answer. Retries on a broken connection
    /// with the same request id; blocking requests get a deadline past their timeout.
    ///
    /// # Errors
    /// The node's own error; `Down` when the node cannot be reached and nothing was sent;
    /// `Unreachable` / `TimedOut` when the call went out but its answer never came back
    /// (after retrying for [`ClientConfig::retry_for`]); `TooLarge` or `RequestTooLarge`
    /// for what the node would refuse; `Busy` when the node is at its limit of concurrent
    /// requests.
    ///
    /// A take or claim that the node gave up itself, because its connection broke after it
    /// was handed entries and before its answer went out, did nothing (the node gave the
    /// entries back); it is sent again with a new id, up to three times, before the call
    /// fails [`SpaceError::Revoked`].
    ///
    /// # Cancel safety
    /// A call dropped before its answer arrives may still have been done on the node; this
    /// plain form does not undo it. The `Space` handle and [`Cluster::call`](crate::Cluster)
    /// revoke a take or claim whose caller gives it up, so that nothing is lost.
    pub async fn call(self: &Arc<Self>, request: Request) -> Result<Response> {
        if !crate::revoke::revocable(&request) {
            return self.send(RequestId::new(), request, true).await;
        }
        let mut afresh = 0;
        loop {
            let answer = self.send(RequestId::new(), request.clone(), true).await;
            if !(crate::revoke::given_up_by_its_node(&answer) && afresh < crate::revoke::AFRESH) {
                return answer;
            }
            afresh += 1;
        }
    }

    /// As [`call`](Self::call), with a request id the caller chose (to retry a request
    /// across calls: the node answers a repeated id with its first answer).
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    pub async fn call_with_id(
        self: &Arc<Self>,
        id: RequestId,
        request: Request,
    ) -> Result<Response> {
        self.send(id, request, false).await
    }

    /// As [`call_with_id`](Self::call_with_id), marked as never sent before when `fresh`
    /// ([`Envelope::fresh`]; its resends on a broken connection are not). An id sent
    /// before, to any node, must not go as fresh, or the request may run twice.
    pub(crate) async fn send(
        self: &Arc<Self>,
        id: RequestId,
        request: Request,
        fresh: bool,
    ) -> Result<Response> {
        self.check_request(&request)?;
        if self.is_down() {
            // A new call to a node that was just found down fails at once.
            return Err(SpaceError::Down {
                node: self.addr.clone(),
                reason: "it could not be reached a moment ago".into(),
            });
        }
        let wait = request.wait().min(wire::MAX_CALL_WAIT);
        let _under_way = self.under_way(wait);
        let revocable = crate::revoke::revocable(&request);
        let mut envelope = Envelope {
            id,
            request: Arc::new(request),
            retry: false,
            fresh,
            acknowledged: self.take_acknowledged(),
            revocable,
        };
        let give_up = Instant::now() + self.config.retry_for;
        let mut backoff = Duration::from_millis(20);
        // Whether the request may have reached the node: then it is retried (same id) to
        // learn its answer; a request that cannot have reached it fails at once.
        let mut sent = false;
        loop {
            let failure = match self.current_client().await {
                Ok(client) => {
                    // Sent again: the node looks for the first run's answer first.
                    envelope.retry = sent;
                    envelope.fresh = fresh && !sent;
                    sent = true;
                    let mut ctx = context::current();
                    ctx.deadline = Instant::now() + wait + self.config.call_timeout;
                    match client.call(ctx, envelope.clone()).await {
                        Ok(answer) => {
                            // The node answers: it is not silent.
                            self.silence.lock().answered(Instant::now());
                            return answer;
                        }
                        Err(RpcError::DeadlineExceeded) => {
                            return Err(SpaceError::TimedOut {
                                node: self.addr.clone(),
                                after: wait + self.config.call_timeout,
                            });
                        }
                        Err(RpcError::Server(e)) if e.kind == std::io::ErrorKind::WouldBlock => {
                            // Throttled before it ran.
                            return Err(SpaceError::Busy {
                                node: self.addr.clone(),
                                reason: e.detail,
                            });
                        }
                        Err(e) => {
                            self.forget_client();
                            SpaceError::Unreachable {
                                node: self.addr.clone(),
                                reason: e.to_string(),
                            }
                        }
                    }
                }
                Err(e @ SpaceError::Rejected { .. }) => return Err(e),
                Err(e) if !sent => {
                    // Nothing went out.
                    return Err(match e {
                        SpaceError::Unreachable { node, reason } => {
                            SpaceError::Down { node, reason }
                        }
                        other => other,
                    });
                }
                Err(e) => e,
            };
            if Instant::now() + backoff > give_up {
                return Err(failure);
            }
            tracing::debug!(node = %self.addr, error = %failure, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Refuses what the node would refuse, before anything is sent: malformed queries and
    /// documents ([`Request::check`]), an entry over its entry limit, or a request over the
    /// frame limit (either side's).
    fn check_request(&self, request: &Request) -> Result<()> {
        request.check()?;
        let Request::WriteDirect {
            entry_type,
            entries,
            ..
        } = request
        else {
            return Ok(());
        };
        let mut total = 0u64;
        for (fields, _) in entries {
            let size = fields.approx_size() as u64;
            if size > self.limits.max_entry_bytes {
                return Err(SpaceError::TooLarge {
                    entry_type: entry_type.clone(),
                    size,
                    limit: self.limits.max_entry_bytes,
                });
            }
            total += size;
        }
        let limit = self
            .limits
            .max_frame
            .min(self.config.max_frame as u64)
            .saturating_sub(FRAME_OVERHEAD);
        // The estimate is within a factor of two of the encoded size; only a request near
        // the limit is encoded to measure it.
        if total.saturating_mul(2) + FRAME_OVERHEAD > limit {
            let size = wire::encode(request).len() as u64;
            if size > limit {
                return Err(SpaceError::RequestTooLarge { size, limit });
            }
        }
        Ok(())
    }
}

/// Bytes a request's frame holds besides the request (tarpc's envelope, ids, deadline).
const FRAME_OVERHEAD: u64 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: Duration = Duration::from_secs(10);

    #[test]
    fn a_node_is_silent_once_a_call_is_overdue_and_nothing_came_since() {
        let start = Instant::now();
        let due = start + OVERDUE_AFTER;
        let mut silence = Silence::default();
        assert!(!silence.look(None, start, MEMORY), "nothing under way");
        assert!(!silence.look(Some(due), start, MEMORY), "not due yet");
        assert!(
            silence.look(Some(due), due, MEMORY),
            "overdue, never answered"
        );

        // An answer from before the call fell due says nothing of it.
        let mut silence = Silence::default();
        silence.answered(start);
        assert!(silence.look(Some(due), due + OVERDUE_AFTER, MEMORY));
    }

    #[test]
    fn a_node_that_answers_other_calls_is_not_silent_for_one_long_call() {
        let start = Instant::now();
        let due = start + OVERDUE_AFTER;
        let mut silence = Silence::default();
        silence.answered(due + Duration::from_millis(1));
        assert!(!silence.look(Some(due), due + OVERDUE_AFTER, MEMORY));
    }

    #[test]
    fn silence_lasts_until_an_answer_or_for_its_memory() {
        let start = Instant::now();
        let due = start + OVERDUE_AFTER;
        let mut silence = Silence::default();
        assert!(silence.look(Some(due), due, MEMORY));
        // The overdue call was given up: the node is still taken for silent...
        assert!(silence.look(None, due + MEMORY / 2, MEMORY));
        // ...until its memory has gone by since it was last found so,
        assert!(!silence.look(None, due + MEMORY, MEMORY));
        // or until it answers.
        assert!(silence.look(Some(due), due, MEMORY));
        silence.answered(due + Duration::from_millis(1));
        assert!(!silence.look(None, due + Duration::from_millis(2), MEMORY));
    }
}
