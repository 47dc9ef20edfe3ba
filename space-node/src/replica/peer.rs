//! Raft traffic between nodes: every shard group's messages to one peer travel over one
//! connection (openraft-multi's adapter binds a group and a target to the shared
//! [`PeerRouter`]); the serving side runs each message as its own task, so groups never
//! wait for each other.
//!
//! A peer connection starts with the node's handshake (the same token as the data port).
//! Snapshots travel in chunks of [`SNAPSHOT_CHUNK`] bytes, one message each, so that a
//! shard of any size can be sent and the other groups' messages on the connection
//! (heartbeats above all) pass between its chunks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::alias::SnapshotMetaOf;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkFactory};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use parking_lot::{Mutex, RwLock};
use serde_bytes::ByteBuf;
use space_core::NodeId;
use space_core::wire;
use tarpc::server::{BaseChannel, Channel};
use tarpc::{client, context};
use tokio::net::TcpListener;

use super::{Member, MemberId, Shard, ShardGroup, Vote};
use crate::handshake::{self, Door, HANDSHAKE_MAX_FRAME};

/// A shard group's id, the same on every node.
pub type GroupId = u32;

/// Largest message between peers (a batch of log entries).
pub const PEER_MAX_FRAME: usize = 256 << 20;

/// Bytes of a snapshot sent in one message: small enough that a heartbeat of another
/// group waits behind at most one chunk on the shared connection (about 10 ms on a
/// 1 Gbit/s link), large enough that the round trip per chunk costs little.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// The messages Raft sends between the members of a group, tagged with the group.
#[tarpc::service]
pub(crate) trait PeerService {
    /// Append entries (or a heartbeat) to `group`'s log on this node.
    async fn append(
        group: GroupId,
        rpc: AppendEntriesRequest<Shard>,
    ) -> Result<AppendEntriesResponse<Shard>, String>;
    /// Ask this node's member of `group` for its vote.
    async fn vote(group: GroupId, rpc: VoteRequest<Shard>) -> Result<VoteResponse<Shard>, String>;
    /// Ask whether this node's member of `group` would vote (no term change).
    async fn pre_vote(
        group: GroupId,
        rpc: VoteRequest<Shard>,
    ) -> Result<VoteResponse<Shard>, String>;
    /// `group`'s leader hands its leadership to this node's member (which takes it once
    /// its log holds the leader's last entry).
    async fn transfer_leader(
        group: GroupId,
        rpc: TransferLeaderRequest<Shard>,
    ) -> Result<TransferLeaderResponse<Shard>, String>;
    /// The index up to which a reader must have applied `group`'s log to see everything
    /// committed before this call: openraft's read index, from this node's member, which
    /// must lead the group (confirmed by a majority).
    async fn read_index(group: GroupId) -> Result<u64, String>;
    /// One chunk of a snapshot of `group`'s state. Chunks come in order, the first at
    /// offset 0 (which starts the snapshot over); the last installs it, and answers.
    async fn snapshot(
        group: GroupId,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResponse<Shard>>, String>;
}

/// One chunk of a snapshot: `bytes` at `offset` of an image of `total` bytes, sent under
/// `vote` with the snapshot's `meta`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotChunk {
    vote: Vote,
    meta: SnapshotMetaOf<Shard>,
    offset: u64,
    total: u64,
    bytes: ByteBuf,
}

/// The groups this node runs, by id, for peers' messages to reach. Cloning shares them.
#[derive(Clone, Default)]
pub struct Groups(Arc<RwLock<HashMap<GroupId, ShardGroup>>>);

impl Groups {
    /// Lets peers reach `raft` as group `group`.
    pub fn insert(&self, group: GroupId, raft: ShardGroup) {
        self.0.write().insert(group, raft);
    }

    /// Stops serving group `group` to peers; returns its Raft node.
    pub fn remove(&self, group: GroupId) -> Option<ShardGroup> {
        self.0.write().remove(&group)
    }

    /// Group `group`'s Raft node on this node.
    pub fn get(&self, group: GroupId) -> Option<ShardGroup> {
        self.0.read().get(&group).cloned()
    }

    fn find(&self, group: GroupId) -> Result<ShardGroup, String> {
        self.get(group)
            .ok_or_else(|| format!("group {group} does not run on this node"))
    }
}

#[derive(Clone)]
struct PeerServer {
    groups: Groups,
    /// The snapshots being received on this connection, by group.
    incoming: Arc<Mutex<HashMap<GroupId, Incoming>>>,
}

/// A snapshot being received chunk by chunk.
struct Incoming {
    vote: Vote,
    meta: SnapshotMetaOf<Shard>,
    total: u64,
    image: Vec<u8>,
}

impl PeerServer {
    /// Adds a chunk to `group`'s snapshot; returns the snapshot once it is whole.
    ///
    /// # Errors
    /// A chunk that does not follow the one before (another snapshot, or a gap): the
    /// snapshot is dropped, and the sender starts over.
    fn receive(&self, group: GroupId, chunk: SnapshotChunk) -> Result<Option<Incoming>, String> {
        let SnapshotChunk {
            vote,
            meta,
            offset,
            total,
            bytes,
        } = chunk;
        let mut incoming = self.incoming.lock();
        if offset == 0 {
            incoming.insert(
                group,
                Incoming {
                    vote,
                    meta,
                    total,
                    image: Vec::new(),
                },
            );
        } else {
            let follows = incoming.get(&group).is_some_and(|i| {
                i.vote == vote
                    && i.meta == meta
                    && i.total == total
                    && i.image.len() as u64 == offset
            });
            if !follows {
                incoming.remove(&group);
                return Err(format!(
                    "group {group}: a snapshot chunk at offset {offset} does not follow the chunks received"
                ));
            }
        }
        let Some(snapshot) = incoming.get_mut(&group) else {
            return Err(format!("group {group}: no snapshot is being received"));
        };
        if offset + bytes.len() as u64 > snapshot.total {
            incoming.remove(&group);
            return Err(format!(
                "group {group}: a snapshot chunk runs past the snapshot's {total} bytes"
            ));
        }
        snapshot.image.extend_from_slice(&bytes);
        if snapshot.image.len() as u64 == snapshot.total {
            return Ok(incoming.remove(&group));
        }
        Ok(None)
    }
}

impl PeerService for PeerServer {
    async fn append(
        self,
        _: context::Context,
        group: GroupId,
        rpc: AppendEntriesRequest<Shard>,
    ) -> Result<AppendEntriesResponse<Shard>, String> {
        let raft = self.groups.find(group)?;
        raft.append_entries(rpc).await.map_err(|e| e.to_string())
    }

    async fn vote(
        self,
        _: context::Context,
        group: GroupId,
        rpc: VoteRequest<Shard>,
    ) -> Result<VoteResponse<Shard>, String> {
        let raft = self.groups.find(group)?;
        raft.vote(rpc).await.map_err(|e| e.to_string())
    }

    async fn pre_vote(
        self,
        _: context::Context,
        group: GroupId,
        rpc: VoteRequest<Shard>,
    ) -> Result<VoteResponse<Shard>, String> {
        let raft = self.groups.find(group)?;
        raft.pre_vote(rpc).await.map_err(|e| e.to_string())
    }

    async fn transfer_leader(
        self,
        _: context::Context,
        group: GroupId,
        rpc: TransferLeaderRequest<Shard>,
    ) -> Result<TransferLeaderResponse<Shard>, String> {
        let raft = self.groups.find(group)?;
        raft.handle_transfer_leader(rpc)
            .await
            .map_err(|e| e.to_string())
    }

    async fn read_index(self, _: context::Context, group: GroupId) -> Result<u64, String> {
        let raft = self.groups.find(group)?;
        raft.get_read_linearizer(openraft::ReadPolicy::ReadIndex)
            .await
            .map(|l| l.read_log_id().index())
            .map_err(|e| e.to_string())
    }

    async fn snapshot(
        self,
        _: context::Context,
        group: GroupId,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResponse<Shard>>, String> {
        let raft = self.groups.find(group)?;
        let Some(whole) = self.receive(group, chunk)? else {
            return Ok(None);
        };
        let snapshot = openraft::alias::SnapshotOf::<Shard, bytes::Bytes> {
            meta: whole.meta,
            snapshot: whole.image.into(),
        };
        raft.install_full_snapshot(whole.vote, snapshot)
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// Who may connect to the peer port, and as whom this node answers.
#[derive(Clone, Debug)]
pub struct PeerDoor {
    /// The token peers must give (the node's), if any.
    pub token: Option<String>,
    /// This node's id.
    pub node: NodeId,
    /// The most peer connections served at once.
    pub max_connections: usize,
    /// The fingerprint of this node's cluster layout ([`Layout::fingerprint`]), which
    /// peers' must match.
    ///
    /// [`Layout::fingerprint`]: super::Layout::fingerprint
    pub cluster: u64,
}

/// Serves peers' Raft messages for `groups` on `listener` until `shutdown` completes.
/// Each connection, and each message on it, runs as its own task.
pub async fn serve_peers(
    listener: TcpListener,
    groups: Groups,
    door: PeerDoor,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let (groups, door, open) = (groups.clone(), door.clone(), open.clone());
                    tokio::spawn(async move {
                        let count = open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
                        if let Err(reason) = serve_peer(stream, groups, &door, count).await {
                            tracing::debug!(%from, %reason, "peer connection closed");
                        }
                        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_peer(
    stream: tokio::net::TcpStream,
    groups: Groups,
    door: &PeerDoor,
    open: usize,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut framed = wire::framed(stream, HANDSHAKE_MAX_FRAME);
    handshake::accept(
        &mut framed,
        Door {
            token: &door.token,
            node: door.node,
            limits: wire::Limits {
                max_frame: PEER_MAX_FRAME as u64,
                max_entry_bytes: PEER_MAX_FRAME as u64,
            },
            open,
            max_connections: door.max_connections,
            clients: false,
            peers: Some(door.cluster),
        },
    )
    .await?;
    serve_peer_messages(framed, groups).await;
    Ok(())
}

/// Serves the Raft messages of a peer connection whose handshake is done (on a port of
/// its own, or a node's data port), each as its own task, until the peer closes it.
pub(crate) async fn serve_peer_messages<S>(
    framed: tokio_util::codec::Framed<S, tokio_util::codec::LengthDelimitedCodec>,
    groups: Groups,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    BaseChannel::with_defaults(wire::server_transport(framed))
        .execute(
            PeerServer {
                groups,
                incoming: Arc::default(),
            }
            .serve(),
        )
        .for_each(|answer| async {
            tokio::spawn(answer);
        })
        .await;
}

/// The connections to peers that all groups of this node share: one per peer, made when
/// first needed and made again after it fails. Cloning shares them.
#[derive(Clone)]
pub struct PeerRouter {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    /// This node's member id (named in the timeouts it reports).
    me: MemberId,
    token: Option<String>,
    /// The fingerprint of this node's cluster layout, told to peers.
    cluster: u64,
    /// Where each peer is, as group memberships name it.
    addrs: Mutex<HashMap<MemberId, String>>,
    /// Where to reach a peer instead of where memberships say (see
    /// [`PeerRouter::route_via`]).
    routes: Mutex<HashMap<MemberId, String>>,
    /// The live connection to each peer.
    clients: Mutex<HashMap<MemberId, PeerServiceClient>>,
    /// Bytes of a snapshot per message ([`SNAPSHOT_CHUNK`]; smaller in tests).
    snapshot_chunk: std::sync::atomic::AtomicUsize,
}

impl PeerRouter {
    /// The router of member `me`, which gives `token` to peers, as a node of the cluster
    /// whose layout has the fingerprint `cluster`.
    pub fn new(me: MemberId, token: Option<String>, cluster: u64) -> PeerRouter {
        PeerRouter {
            inner: Arc::new(RouterInner {
                me,
                token,
                cluster,
                addrs: Mutex::new(HashMap::new()),
                routes: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                snapshot_chunk: std::sync::atomic::AtomicUsize::new(SNAPSHOT_CHUNK),
            }),
        }
    }

    /// Sends snapshots in chunks of `bytes` (at least 1).
    #[cfg(test)]
    pub(crate) fn set_snapshot_chunk(&self, bytes: usize) {
        self.inner
            .snapshot_chunk
            .store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Reaches member `target` at `addr` rather than at the address group memberships
    /// name for it (a translated address, or a fault-injecting proxy in tests). Takes
    /// effect from the next connection.
    pub fn route_via(&self, target: MemberId, addr: String) {
        self.inner.routes.lock().insert(target, addr);
        self.forget(target);
    }

    /// The network through which group `group` reaches its members.
    pub fn network(&self, group: GroupId) -> GroupNetwork {
        GroupNetwork {
            router: self.clone(),
            group,
        }
    }

    /// The connection to `target`, made if there is none.
    async fn client(&self, target: MemberId) -> Result<PeerServiceClient, Unreachable<Shard>> {
        if let Some(client) = self.inner.clients.lock().get(&target) {
            return Ok(client.clone());
        }
        let routed = self.inner.routes.lock().get(&target).cloned();
        let addr = routed
            .or_else(|| self.inner.addrs.lock().get(&target).cloned())
            .ok_or_else(|| Unreachable::from_string(format!("no address for node {target}")))?;
        let hello =
            wire::Hello::new_peer(self.inner.token.clone(), PEER_MAX_FRAME, self.inner.cluster);
        let (framed, _, _) = handshake::dial(addr.as_str(), hello)
            .await
            .map_err(|e| Unreachable::from_string(format!("node {target} at {addr}: {e}")))?;
        let client =
            PeerServiceClient::new(client::Config::default(), wire::transport(framed)).spawn();
        self.inner.clients.lock().insert(target, client.clone());
        Ok(client)
    }

    /// `group`'s read index from its leader `leader` (see `PeerService::read_index`),
    /// within `ttl`.
    ///
    /// # Errors
    /// The leader cannot be reached, or is not the leader.
    pub(crate) async fn read_index(
        &self,
        leader: MemberId,
        group: GroupId,
        ttl: Duration,
    ) -> Result<u64, String> {
        self.call(leader, RPCTypes::AppendEntries, ttl, |c, ctx| async move {
            c.read_index(ctx, group).await
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Drops the connection to `target` after it failed; the next message makes a new one.
    fn forget(&self, target: MemberId) {
        self.inner.clients.lock().remove(&target);
    }

    /// Sends one message (an `action`) to `target` within `ttl`: a peer too slow to
    /// answer is a `Timeout`, the connection's failure `Unreachable` (see
    /// [`rpc_failure`]), the peer's refusal a network error.
    async fn call<T, F, Fut>(
        &self,
        target: MemberId,
        action: RPCTypes,
        ttl: Duration,
        send: F,
    ) -> Result<T, RPCError<Shard>>
    where
        F: FnOnce(PeerServiceClient, context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, String>, tarpc::client::RpcError>>,
    {
        let client = self.client(target).await?;
        let mut ctx = context::current();
        ctx.deadline = Instant::now() + ttl;
        match send(client, ctx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(refused)) => Err(RPCError::Network(
                openraft::error::NetworkError::from_string(refused),
            )),
            Err(e) => {
                let failure = rpc_failure(self.inner.me, target, action, ttl, e);
                if matches!(failure, RPCError::Unreachable(_)) {
                    self.forget(target);
                }
                Err(failure)
            }
        }
    }
}

/// What a message from `me` to `target` that got no answer tells openraft.
///
/// Past its deadline it is a `Timeout`: the peer is there but slow (a long `fdatasync`,
/// a busy thread), and openraft sends again at once, backing off only after many in a
/// row. Anything else (the connection broke or could not be made) is `Unreachable`, after
/// which openraft waits (200 ms) before it sends to that peer again. A slow answer taken
/// for that held a shard's replication to a follower up for that wait each time one
/// message missed its deadline (a heartbeat's is 150 ms).
fn rpc_failure(
    me: MemberId,
    target: MemberId,
    action: RPCTypes,
    ttl: Duration,
    e: tarpc::client::RpcError,
) -> RPCError<Shard> {
    match e {
        tarpc::client::RpcError::DeadlineExceeded => RPCError::Timeout(Timeout {
            action,
            id: me,
            target,
            timeout: ttl,
        }),
        e => RPCError::Unreachable(Unreachable::from_string(format!("node {target}: {e}"))),
    }
}

impl GroupRouter<Shard, GroupId> for PeerRouter {
    type SnapshotData = bytes::Bytes;

    async fn append_entries(
        &self,
        target: MemberId,
        group: GroupId,
        rpc: AppendEntriesRequest<Shard>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<Shard>, RPCError<Shard>> {
        self.call(
            target,
            RPCTypes::AppendEntries,
            option.hard_ttl(),
            |c, ctx| async move { c.append(ctx, group, rpc).await },
        )
        .await
    }

    async fn vote(
        &self,
        target: MemberId,
        group: GroupId,
        rpc: VoteRequest<Shard>,
        option: RPCOption,
    ) -> Result<VoteResponse<Shard>, RPCError<Shard>> {
        self.call(
            target,
            RPCTypes::Vote,
            option.hard_ttl(),
            |c, ctx| async move { c.vote(ctx, group, rpc).await },
        )
        .await
    }

    async fn pre_vote(
        &self,
        target: MemberId,
        group: GroupId,
        rpc: VoteRequest<Shard>,
        option: RPCOption,
    ) -> Result<VoteResponse<Shard>, RPCError<Shard>> {
        self.call(
            target,
            RPCTypes::Vote,
            option.hard_ttl(),
            |c, ctx| async move { c.pre_vote(ctx, group, rpc).await },
        )
        .await
    }

    async fn transfer_leader(
        &self,
        target: MemberId,
        group: GroupId,
        rpc: TransferLeaderRequest<Shard>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<Shard>, RPCError<Shard>> {
        self.call(
            target,
            RPCTypes::TransferLeader,
            option.hard_ttl(),
            |c, ctx| async move { c.transfer_leader(ctx, group, rpc).await },
        )
        .await
    }

    async fn full_snapshot(
        &self,
        target: MemberId,
        group: GroupId,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<Shard, bytes::Bytes>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<Shard>, StreamingError<Shard>> {
        let (meta, image) = (snapshot.meta, snapshot.snapshot);
        let chunk = self
            .inner
            .snapshot_chunk
            .load(std::sync::atomic::Ordering::Relaxed);
        let total = image.len() as u64;
        // Chunk after chunk, each answered before the next goes (at least one, for an
        // empty image); the last one's answer is the snapshot's.
        let send = async {
            let mut offset = 0;
            loop {
                let end = (offset + chunk).min(image.len());
                let chunk = SnapshotChunk {
                    vote,
                    meta: meta.clone(),
                    offset: offset as u64,
                    total,
                    bytes: ByteBuf::from(image[offset..end].to_vec()),
                };
                let answer = self
                    .call(
                        target,
                        RPCTypes::InstallSnapshot,
                        option.hard_ttl(),
                        |c, ctx| async move { c.snapshot(ctx, group, chunk).await },
                    )
                    .await?;
                offset = end;
                match answer {
                    Some(installed) => return Ok(installed),
                    None if offset < image.len() => {}
                    None => {
                        return Err(RPCError::Network(
                            openraft::error::NetworkError::from_string(format!(
                                "node {target} did not install the snapshot after its last chunk"
                            )),
                        ));
                    }
                }
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = send => sent.map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::RemoteError(r) => StreamingError::Network(
                    openraft::error::NetworkError::from_string(r.to_string()),
                ),
            }),
        }
    }
}

/// How one group reaches its members (openraft's network factory): through the node's
/// shared [`PeerRouter`].
pub struct GroupNetwork {
    router: PeerRouter,
    group: GroupId,
}

impl RaftNetworkFactory<Shard> for GroupNetwork {
    type Network = GroupNetworkAdapter<Shard, GroupId, PeerRouter>;

    async fn new_client(&mut self, target: MemberId, node: &Member) -> Self::Network {
        self.router
            .inner
            .addrs
            .lock()
            .insert(target, node.addr.clone());
        GroupNetworkAdapter::new(self.router.clone(), target, self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that answers late is slow, not gone: openraft sends to it again at once
    /// for a `Timeout`, and waits before it does for `Unreachable`.
    #[test]
    fn a_message_past_its_deadline_is_a_timeout_and_a_broken_connection_unreachable() {
        let ttl = Duration::from_millis(150);
        let late = rpc_failure(
            1,
            2,
            RPCTypes::AppendEntries,
            ttl,
            tarpc::client::RpcError::DeadlineExceeded,
        );
        assert!(
            matches!(&late, RPCError::Timeout(t) if t.id == 1 && t.target == 2 && t.timeout == ttl),
            "{late:?}"
        );
        let broken = rpc_failure(
            1,
            2,
            RPCTypes::AppendEntries,
            ttl,
            tarpc::client::RpcError::Shutdown,
        );
        assert!(matches!(broken, RPCError::Unreachable(_)), "{broken:?}");
    }

    #[test]
    fn snapshot_chunks_are_taken_in_order_and_a_first_chunk_starts_over() {
        let server = PeerServer {
            groups: Groups::default(),
            incoming: Arc::default(),
        };
        let vote = Vote::new(1, 1);
        let meta = SnapshotMetaOf::<Shard>::default();
        let chunk = |offset: u64, total: u64, bytes: &[u8]| SnapshotChunk {
            vote,
            meta: meta.clone(),
            offset,
            total,
            bytes: ByteBuf::from(bytes.to_vec()),
        };
        let receive = |offset: u64, bytes: &[u8]| {
            server
                .receive(7, chunk(offset, 6, bytes))
                .map(|whole| whole.map(|w| w.image))
        };
        assert_eq!(receive(0, b"ab"), Ok(None));
        // A gap: refused, and the snapshot is dropped.
        assert!(receive(4, b"ef").is_err());
        assert!(receive(2, b"cd").is_err(), "a dropped snapshot went on");
        // Started over, in order: whole at the last chunk.
        assert_eq!(receive(0, b"ab"), Ok(None));
        assert_eq!(receive(2, b"cd"), Ok(None));
        assert_eq!(receive(4, b"ef"), Ok(Some(b"abcdef".to_vec())));
        // Past the end: refused.
        assert_eq!(receive(0, b"abcd"), Ok(None));
        assert!(receive(4, b"efgh").is_err());
        // An empty snapshot is whole at once.
        let empty = server.receive(8, chunk(0, 0, b""));
        assert!(matches!(empty, Ok(Some(w)) if w.image.is_empty()));
    }
}
