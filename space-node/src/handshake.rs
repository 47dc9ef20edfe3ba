//! The handshake every connection a node makes or accepts starts with: the connecting
//! side sends a [`Hello`] (protocol, version, token), the accepting side answers a
//! [`Welcome`] (accepted with its limits, refused, or busy); tarpc frames follow.

use std::time::Duration;

use space_core::NodeId;
use space_core::wire::{self, Hello, Limits, Welcome};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Largest handshake frame: a `Hello` is tens of bytes (plus the token).
pub(crate) const HANDSHAKE_MAX_FRAME: usize = 4096;
/// How long a new connection has to send its `Hello`.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to another process may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `given` is the token `expected` (no token expected: any). Constant time.
fn token_matches(expected: &Option<String>, given: &Option<String>) -> bool {
    match (expected, given) {
        (None, _) => true,
        (Some(e), Some(g)) => bool::from(e.as_bytes().ct_eq(g.as_bytes())),
        (Some(_), None) => false,
    }
}

/// What the accepting side checks a connection against.
pub(crate) struct Door<'a> {
    /// The token connections must give, if any.
    pub(crate) token: &'a Option<String>,
    /// This node's id, told to the connecting side.
    pub(crate) node: NodeId,
    /// The limits told to the connecting side; the frame limit is raised to
    /// `limits.max_frame` once accepted.
    pub(crate) limits: Limits,
    /// Connections open counting this one, and the most accepted.
    pub(crate) open: usize,
    pub(crate) max_connections: usize,
    /// Whether clients' calls are served here.
    pub(crate) clients: bool,
    /// When other nodes' Raft messages are served here: the fingerprint of this node's
    /// cluster layout, which a peer's must match.
    pub(crate) peers: Option<u64>,
}

/// Counts a refused connection by `why` (a fixed word) and gives back `reason`.
fn rejected(why: &'static str, reason: String) -> String {
    metrics::counter!("space_rejected_connections_total", "reason" => why).increment(1);
    reason
}

/// Reads the connection's hello and answers it. On success the frame limit is the
/// door's; the hello is returned. Otherwise the refusal was sent and is returned.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    door: Door<'_>,
) -> Result<Hello, String> {
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::recv_frame::<_, Hello>(framed))
        .await
        .map_err(|_| rejected("handshake", "no handshake in time".to_string()))?
        .map_err(|e| rejected("handshake", format!("bad handshake: {e}")))?
        .ok_or_else(|| rejected("handshake", "closed before the handshake".to_string()))?;
    // Why a connection is refused: a fixed word for the metrics, and the words for the
    // other side.
    let refusal = if hello.magic != wire::MAGIC {
        Some((
            "protocol",
            "this is a space node; the connection did not speak its protocol".to_string(),
        ))
    } else if hello.version != wire::PROTOCOL_VERSION {
        Some((
            "version",
            format!(
                "protocol version {} is not supported (this node speaks {})",
                hello.version,
                wire::PROTOCOL_VERSION
            ),
        ))
    } else if !token_matches(door.token, &hello.token) {
        Some(("token", "wrong or missing auth token".to_string()))
    } else if hello.peer && door.peers.is_none() {
        Some((
            "not_replicated",
            "this node serves no replicated shards: no peer connections".to_string(),
        ))
    } else if hello.peer && door.peers != Some(hello.cluster) {
        Some((
            "other_cluster",
            "a node of another cluster: its layout (nodes, shards, replication) is not this node's"
                .to_string(),
        ))
    } else if !hello.peer && !door.clients {
        Some((
            "peers_only",
            "this port serves only other nodes of the cluster".to_string(),
        ))
    } else {
        None
    };
    if let Some((why, reason)) = refusal {
        // A wrong token (or a stranger on the port) is worth an operator's attention.
        tracing::warn!(%reason, "refused a connection");
        let reason = rejected(why, reason);
        let _ = wire::send_frame(
            framed,
            &Welcome::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    if door.open > door.max_connections {
        let reason = rejected(
            "connections",
            format!(
                "the node serves its maximum of {} connections",
                door.max_connections
            ),
        );
        let _ = wire::send_frame(
            framed,
            &Welcome::Busy {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    wire::send_frame(
        framed,
        &Welcome::Accepted {
            node: door.node,
            limits: door.limits,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    framed
        .codec_mut()
        .set_max_frame_length(door.limits.max_frame as usize);
    Ok(hello)
}

/// Connects to `addr` and says `hello` (whose frame limit is what this side reads);
/// returns the framed connection once accepted, with the other side's id and limits.
///
/// # Errors
/// An `io::Error` when connecting fails or times out, or the other side refuses (its
/// reason is the error's text).
pub(crate) async fn dial(
    addr: impl tokio::net::ToSocketAddrs,
    hello: Hello,
) -> std::io::Result<(Framed<TcpStream, LengthDelimitedCodec>, NodeId, Limits)> {
    let max_frame = usize::try_from(hello.max_frame).unwrap_or(usize::MAX);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
    stream.set_nodelay(true)?;
    let mut framed = wire::framed(stream, max_frame);
    wire::send_frame(&mut framed, &hello).await?;
    match wire::recv_frame::<_, Welcome>(&mut framed).await? {
        Some(Welcome::Accepted { node, limits }) => Ok((framed, node, limits)),
        Some(Welcome::Refused { reason } | Welcome::Busy { reason }) => {
            Err(std::io::Error::other(reason))
        }
        None => Err(std::io::Error::other(
            "the other side closed the connection",
        )),
    }
}
