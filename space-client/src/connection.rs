//! A connection to one `space-node`.
//!
//! Calls go over one multiplexed connection (many requests at once). A call that fails
//! because the connection broke is retried on a new connection, with backoff, for up to
//! [`ClientConfig::retry_for`], with the *same request id*, so the node answers a retried
//! take or write with its first answer. Blocking calls set their deadline beyond their own
//! timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::wire::{
    self, Envelope, Hello, Request, RequestId, Response, SpaceServiceClient, Welcome,
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

/// One node, connected: calls with retry, and the subscriber endpoint.
pub struct Connection {
    addr: String,
    config: ClientConfig,
    node: NodeId,
    client: Mutex<Option<SpaceServiceClient>>,
    dialing: tokio::sync::Mutex<()>,
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
        let _ = handle;
        Self::open_on(addr, config).await
    }

    pub(crate) async fn open_on(addr: &str, config: ClientConfig) -> Result<Arc<Connection>> {
        let (client, node) = dial(addr, &config).await?;
        Ok(Arc::new(Connection {
            addr: addr.to_owned(),
            config,
            node,
            client: Mutex::new(Some(client)),
            dialing: tokio::sync::Mutex::new(()),
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
}
