//! The remote space: a connection to a `space-node`, the [`RemoteBackend`] that makes a
//! [`Space`] out of it, and the subscriber endpoint nodes push notify events to.
//!
//! Calls go over one multiplexed connection (many requests at once). A call that fails
//! because the connection broke is retried on a new connection, with backoff, for up to
//! [`ClientConfig::retry_for`], with the *same request id*, so the node answers a retried
//! take or write with its first answer. Blocking calls set their deadline beyond their own
//! timeout.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::wire::{
    self, Envelope, Hello, Request, RequestId, Response, SpaceServiceClient, SubscriberService,
    Welcome,
};
use space_core::{
    BlockingSpace, EventKinds, Lease, NodeId, Notification, Query, RemoteBackend, RemoteFeed,
    Result, Space, SpaceError, Subscription,
};
use tarpc::client::RpcError;
use tarpc::server::{BaseChannel, Channel};
use tarpc::{client, context};
use tokio::net::{TcpListener, TcpStream};
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
    /// How long to keep reconnecting before a call fails with `Unreachable`.
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
        }
    }
}

/// The runtime remote calls run on: the caller's, or one the client owns (blocking use).
#[derive(Clone)]
enum Runtime {
    Borrowed(Handle),
    Owned(Arc<OwnedRuntime>),
}

struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            // Dropping a runtime may happen on a runtime thread: do not block there.
            rt.shutdown_background();
        }
    }
}

impl Runtime {
    fn handle(&self) -> Handle {
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
    fn bind<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T>> {
        Box::pin(tokio_util::context::TokioContext::new(fut, self.handle()))
    }
}

/// One node, connected: calls with retry, and the subscriber endpoint.
pub struct Connection {
    addr: String,
    config: ClientConfig,
    runtime: Runtime,
    node: NodeId,
    client: Mutex<Option<SpaceServiceClient>>,
    dialing: tokio::sync::Mutex<()>,
    /// Entry types whose indexes this client already declared to the node.
    declared: Mutex<HashSet<String>>,
    endpoint: tokio::sync::OnceCell<Arc<Endpoint>>,
}

async fn dial(addr: &str, config: &ClientConfig) -> Result<(SpaceServiceClient, NodeId)> {
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
    wire::send_frame(&mut framed, &Hello::new(config.token.clone()))
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
        Some(Welcome::Accepted { node }) => {
            let client =
                SpaceServiceClient::new(client::Config::default(), wire::transport(framed)).spawn();
            Ok((client, node))
        }
        Some(Welcome::Refused { reason }) => Err(SpaceError::Rejected {
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
        let handle = Handle::try_current().map_err(|_| SpaceError::Protocol {
            reason: "connect needs a tokio runtime; use connect_blocking from plain threads".into(),
        })?;
        Self::open_on(addr, config, Runtime::Borrowed(handle)).await
    }

    async fn open_on(
        addr: &str,
        config: ClientConfig,
        runtime: Runtime,
    ) -> Result<Arc<Connection>> {
        let (client, node) = dial(addr, &config).await?;
        Ok(Arc::new(Connection {
            addr: addr.to_owned(),
            config,
            runtime,
            node,
            client: Mutex::new(Some(client)),
            dialing: tokio::sync::Mutex::new(()),
            declared: Mutex::new(HashSet::new()),
            endpoint: tokio::sync::OnceCell::new(),
        }))
    }

    /// The node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn current_client(&self) -> Result<SpaceServiceClient> {
        if let Some(c) = self.client.lock().as_ref() {
            return Ok(c.clone());
        }
        // Reconnect; one caller at a time, the others then use its connection.
        let _one_dialer = self.dialing.lock().await;
        if let Some(c) = self.client.lock().as_ref() {
            return Ok(c.clone());
        }
        let (c, _) = dial(&self.addr, &self.config).await?;
        *self.client.lock() = Some(c.clone());
        Ok(c)
    }

    fn forget_client(&self) {
        *self.client.lock() = None;
    }

    /// Sends one request and returns the node's answer. Retries on a broken connection
    /// with the same request id; blocking requests get a deadline past their timeout.
    ///
    /// # Errors
    /// The node's own error, or `Unreachable` / `TimedOut`.
    pub async fn call(&self, request: Request) -> Result<Response> {
        self.call_with_id(RequestId::new(), request).await
    }

    /// As [`call`](Self::call), with a request id the caller chose (to retry a request
    /// across calls: the node answers a repeated id with its first answer).
    pub async fn call_with_id(&self, id: RequestId, request: Request) -> Result<Response> {
        let wait = request.wait();
        let envelope = Envelope {
            id,
            request: Arc::new(request),
        };
        let give_up = Instant::now() + self.config.retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            let failure = match self.current_client().await {
                Ok(client) => {
                    let mut ctx = context::current();
                    ctx.deadline = Instant::now() + wait + self.config.call_timeout;
                    match client.call(ctx, envelope.clone()).await {
                        Ok(answer) => return answer,
                        Err(RpcError::DeadlineExceeded) => {
                            return Err(SpaceError::TimedOut {
                                node: self.addr.clone(),
                                after: wait + self.config.call_timeout,
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

    async fn endpoint(&self) -> Result<Arc<Endpoint>> {
        self.endpoint
            .get_or_try_init(|| Endpoint::start(&self.config))
            .await
            .cloned()
    }

    /// Registers a subscription whose events this client's endpoint receives.
    pub async fn subscribe(
        self: &Arc<Self>,
        query: Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> Result<Subscription> {
        let endpoint = self.endpoint().await?;
        let (node_lease, renew) = match lease {
            Lease::Forever => (Lease::For(self.config.subscription_lease), true),
            finite => (finite, false),
        };
        let answer = self
            .call(Request::Subscribe {
                query: query.clone(),
                kinds,
                lease: node_lease,
                endpoint: endpoint.advertised,
            })
            .await?;
        let Response::Subscribed(id) = answer else {
            return Err(SpaceError::Protocol {
                reason: format!("unexpected answer to Subscribe: {answer:?}"),
            });
        };
        Ok(self.feed(query, id, 0, &endpoint, renew))
    }

    /// Picks up a detached subscription after `last_seq`.
    pub async fn resume(self: &Arc<Self>, id: u64, last_seq: u64) -> Result<Subscription> {
        let endpoint = self.endpoint().await?;
        let feed_query = Query::for_type("");
        let sub = self.feed(feed_query, id, last_seq, &endpoint, true);
        self.call(Request::Resume {
            id,
            last_seq,
            endpoint: endpoint.advertised,
        })
        .await?;
        Ok(sub)
    }

    fn feed(
        self: &Arc<Self>,
        query: Query,
        id: u64,
        last_seq: u64,
        endpoint: &Arc<Endpoint>,
        renew: bool,
    ) -> Subscription {
        let (tx, rx) = flume::bounded(FEED_CAPACITY);
        let state = Arc::new(FeedState {
            id,
            tx: Mutex::new(Some(tx)),
            last_seq: AtomicU64::new(last_seq),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        });
        endpoint.feeds.lock().insert(id, state.clone());
        if renew {
            let conn = Arc::downgrade(self);
            let weak = Arc::downgrade(&state);
            let lease = self.config.subscription_lease;
            self.runtime
                .handle()
                .spawn(renew_while_alive(conn, weak, lease));
        }
        Subscription::remote(
            query,
            Box::new(Feed {
                stream: Mutex::new(rx.clone().into_stream()),
                rx,
                state,
                conn: self.clone(),
                endpoint: endpoint.clone(),
            }),
        )
    }
}

/// Renews a subscription's lease at a third of its length while the handle lives.
async fn renew_while_alive(conn: Weak<Connection>, state: Weak<FeedState>, lease: Duration) {
    loop {
        tokio::time::sleep(lease / 3).await;
        let (Some(conn), Some(state)) = (conn.upgrade(), state.upgrade()) else {
            return;
        };
        if state.closed.load(Ordering::Acquire) || state.detached.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = conn
            .call(Request::RenewSubscription {
                id: state.id,
                lease: Lease::For(lease),
            })
            .await
        {
            tracing::warn!(subscription = state.id, error = %e, "could not renew a subscription");
            if matches!(e, SpaceError::SubscriptionClosed { .. }) {
                state.close();
                return;
            }
        }
    }
}

/// Notifications buffered per subscription on the client before deliveries wait.
const FEED_CAPACITY: usize = 65_536;

struct FeedState {
    id: u64,
    tx: Mutex<Option<flume::Sender<Notification>>>,
    /// The last sequence number received: deliveries at or below it are repeats.
    last_seq: AtomicU64,
    dropped: AtomicU64,
    closed: AtomicBool,
    detached: AtomicBool,
}

impl FeedState {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.tx.lock().take();
    }
}

fn seq_range(n: &Notification) -> (u64, u64) {
    match n {
        Notification::Event(e) => (e.seq, e.seq),
        Notification::Gap {
            first_seq,
            last_seq,
        } => (*first_seq, *last_seq),
    }
}

/// The endpoint nodes push events to.
struct Endpoint {
    advertised: SocketAddr,
    feeds: Mutex<HashMap<u64, Arc<FeedState>>>,
}

impl Endpoint {
    async fn start(config: &ClientConfig) -> Result<Arc<Endpoint>> {
        let listener = TcpListener::bind(config.subscriber_bind)
            .await
            .map_err(|e| SpaceError::Protocol {
                reason: format!(
                    "cannot serve the subscriber endpoint on {}: {e}",
                    config.subscriber_bind
                ),
            })?;
        let bound = listener.local_addr().map_err(|e| SpaceError::Protocol {
            reason: e.to_string(),
        })?;
        let endpoint = Arc::new(Endpoint {
            advertised: config.subscriber_advertise.unwrap_or(bound),
            feeds: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&endpoint);
        let max_frame = config.max_frame;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                tokio::spawn(serve_subscriber(endpoint, stream, max_frame));
            }
        });
        Ok(endpoint)
    }

    /// The feed of a subscription; waits briefly for one being registered (its first
    /// events can arrive before the answer to Subscribe does).
    async fn feed(&self, id: u64) -> Option<Arc<FeedState>> {
        for _ in 0..100 {
            if let Some(f) = self.feeds.lock().get(&id) {
                return Some(f.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

async fn serve_subscriber(endpoint: Arc<Endpoint>, stream: TcpStream, max_frame: usize) {
    let _ = stream.set_nodelay(true);
    let mut framed = wire::framed(stream, max_frame);
    match wire::recv_frame::<_, Hello>(&mut framed).await {
        Ok(Some(h)) if h.magic == wire::MAGIC && h.version == wire::PROTOCOL_VERSION => {}
        _ => return,
    }
    if wire::send_frame(&mut framed, &Welcome::Accepted { node: NodeId(0) })
        .await
        .is_err()
    {
        return;
    }
    BaseChannel::with_defaults(wire::transport(framed))
        .execute(Subscriber(endpoint).serve())
        .for_each(|response| async move {
            tokio::spawn(response);
        })
        .await;
}

#[derive(Clone)]
struct Subscriber(Arc<Endpoint>);

impl SubscriberService for Subscriber {
    async fn deliver(
        self,
        _: context::Context,
        subscription: u64,
        notifications: Vec<Notification>,
    ) -> bool {
        let Some(feed) = self.0.feed(subscription).await else {
            return false;
        };
        if feed.closed.load(Ordering::Acquire) {
            return false;
        }
        if feed.detached.load(Ordering::Acquire) {
            // Nobody reads it here any more; the node keeps the log for a resume.
            return true;
        }
        let Some(tx) = feed.tx.lock().clone() else {
            return false;
        };
        for n in notifications {
            let (first, last) = seq_range(&n);
            if last <= feed.last_seq.load(Ordering::Acquire) {
                continue; // a repeat after a retried delivery
            }
            feed.last_seq.store(last, Ordering::Release);
            if matches!(n, Notification::Gap { .. }) {
                feed.dropped.fetch_add(last - first + 1, Ordering::Relaxed);
            }
            if tx.send_async(n).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A remote subscription's receiving side.
struct Feed {
    rx: flume::Receiver<Notification>,
    stream: Mutex<flume::r#async::RecvStream<'static, Notification>>,
    state: Arc<FeedState>,
    conn: Arc<Connection>,
    endpoint: Arc<Endpoint>,
}

impl RemoteFeed for Feed {
    fn id(&self) -> u64 {
        self.state.id
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        match deadline {
            None => self.rx.recv().ok(),
            Some(d) => self.rx.recv_deadline(d).ok(),
        }
    }

    fn try_recv(&self) -> Option<Notification> {
        self.rx.try_recv().ok()
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.stream.lock().poll_next_unpin(cx)
    }

    fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }

    fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    fn renew(&self, lease: Lease) -> Result<()> {
        let conn = self.conn.clone();
        let id = self.state.id;
        let call = self
            .conn
            .runtime
            .bind(async move { conn.call(Request::RenewSubscription { id, lease }).await });
        futures::executor::block_on(call).map(|_| ())
    }

    fn cancel(&self) {
        if self.state.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.close();
        while self.rx.try_recv().is_ok() {}
        self.endpoint.feeds.lock().remove(&self.state.id);
        let conn = self.conn.clone();
        let id = self.state.id;
        // Fire and forget: the node also ends it when its lease runs out.
        drop(self.conn.runtime.handle().spawn(async move {
            let _ = conn.call(Request::CancelSubscription(id)).await;
        }));
    }

    fn detach(&self) {
        self.state.detached.store(true, Ordering::Release);
        self.endpoint.feeds.lock().remove(&self.state.id);
    }
}

/// The [`RemoteBackend`] of a [`Space`] on one node.
struct Remote {
    conn: Arc<Connection>,
}

impl RemoteBackend for Remote {
    fn node(&self) -> NodeId {
        self.conn.node
    }

    fn call(&self, mut request: Request) -> BoxFuture<'static, Result<Response>> {
        if let Request::WriteDirect {
            entry_type,
            indexes,
            ..
        } = &mut request
        {
            // Declare a type's indexes once per client, with its first write.
            if !indexes.is_empty() && !self.conn.declared.lock().insert(entry_type.clone()) {
                indexes.clear();
            }
        }
        let conn = self.conn.clone();
        self.conn
            .runtime
            .bind(async move { conn.call(request).await })
    }

    fn subscribe(
        &self,
        query: Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> BoxFuture<'static, Result<Subscription>> {
        let conn = self.conn.clone();
        self.conn
            .runtime
            .bind(async move { conn.subscribe(query, kinds, lease).await })
    }

    fn resume(&self, id: u64, last_seq: u64) -> BoxFuture<'static, Result<Subscription>> {
        let conn = self.conn.clone();
        self.conn
            .runtime
            .bind(async move { conn.resume(id, last_seq).await })
    }
}

/// A [`Space`] on the node at `addr` (host:port), with default settings. Call it inside a
/// tokio runtime; remote calls run on that runtime.
///
/// # Errors
/// `Unreachable` or `Rejected` when the node cannot be reached or refuses the connection.
pub async fn connect(addr: &str) -> Result<Space> {
    connect_with(addr, ClientConfig::default()).await
}

/// [`connect`] with settings (token, timeouts, subscriber endpoint).
pub async fn connect_with(addr: &str, config: ClientConfig) -> Result<Space> {
    let conn = Connection::open(addr, config).await?;
    Ok(space_of(conn))
}

/// The [`Space`] of an open connection.
pub fn space_of(conn: Arc<Connection>) -> Space {
    Space::from_remote(Arc::new(Remote { conn }))
}

/// A blocking handle on the node at `addr`, for plain threads: the client runs its own
/// small runtime. Do not call it from inside an async task.
pub fn connect_blocking(addr: &str) -> Result<BlockingSpace> {
    connect_blocking_with(addr, ClientConfig::default())
}

/// [`connect_blocking`] with settings.
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
    let open = runtime.bind({
        let runtime = runtime.clone();
        let addr = addr.to_owned();
        async move { Connection::open_on(&addr, config, runtime).await }
    });
    let conn = futures::executor::block_on(open)?;
    Ok(space_of(conn).blocking())
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
