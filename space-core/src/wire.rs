//! The wire: the one RPC service nodes serve and clients call, its messages, the codec and
//! the handshake. Defined here so that `space-node` and `space-client` share one
//! definition; this module knows messages and frames, not sockets.
//!
//! A connection is a stream of length-delimited frames (at most
//! [`DEFAULT_MAX_FRAME`] bytes unless configured). The first frame each way is the
//! handshake: the client's [`Hello`] (magic, protocol version, optional token) and the node's
//! [`Welcome`]. After it, the frames carry tarpc messages encoded with postcard (a compact,
//! maintained serde format): [`SpaceService::call`] with an [`Envelope`], one spawned task
//! per request on the node. Every mutating request carries a [`RequestId`]; a node answers
//! a repeated id with the first answer, so a client that retries after a lost reply neither
//! loses a taken entry nor writes one twice.
//!
//! Notify events travel the other way: the client serves [`SubscriberService`] and the node
//! pushes batches of [`Notification`]s to it.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use space_query::{Fields, Query};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::document::{ClaimTicket, ClaimedDocument, Document, Receipt};
use crate::engine::Stats;
use crate::entry::{Key, NodeId};
use crate::error::SpaceError;
use crate::lease::Lease;
use crate::notify::{EventKinds, Notification};

/// The first bytes of every handshake.
pub const MAGIC: [u8; 4] = *b"SPC1";
/// The protocol version this build speaks (peers too: a shard's commands between nodes
/// carry the time their leader decided them since version 9; a topology names its shard
/// count since version 10; a node tells of its cluster's meta group, and a replicated node
/// which shards a read by query that found nothing searched, since version 11; a node
/// names itself when it connects to a subscriber endpoint since version 12; a call
/// carries the ids of answers its client acknowledges since version 13; a notification
/// says that events may have been missed, how many not known, since version 14; a call
/// says whether its id was ever sent before, since version 15; and whether its client
/// would revoke it if it gave it up, since version 16).
pub const PROTOCOL_VERSION: u16 = 17;
/// The most request ids one call acknowledges ([`Envelope::acknowledged`]); a call with
/// more is refused.
pub const MAX_ACKNOWLEDGED: usize = 1024;
/// The longest a [`Request::Poll`] waits for an event.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// The default largest frame, in bytes (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
pub use crate::hash::{RANGES, RangeSet, first_range_of_shard, range_of, shard_of_range};

pub use crate::document::RequestId;

/// What a read or take addresses: one key, or the oldest match of a query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Target {
    /// The entry with this key (ReadDirect / TakeDirect by key).
    Key {
        /// The entry type.
        entry_type: String,
        /// The key.
        key: Key,
    },
    /// Matches of a query, oldest first.
    Query(Query),
}

/// Where a client serves [`SubscriberService`], and the secret a node must present there
/// (as the token of its [`Hello`]) for its pushes to be accepted: the client makes it up
/// and hands it only to the nodes it subscribes with, so nobody else can push events to it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The address.
    pub addr: SocketAddr,
    /// The secret.
    pub secret: u128,
}

impl Endpoint {
    /// The secret as a [`Hello`] token carries it.
    pub fn token(&self) -> String {
        format!("{:032x}", self.secret)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A node and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub node: NodeId,
    /// The address clients connect to.
    pub address: String,
    /// The node's labels (`zone=a`).
    pub labels: Vec<(String, String)>,
}

/// Which node is primary for each of the [`RANGES`] hash ranges, with an epoch that grows
/// on every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Grows with every change of ownership.
    pub epoch: u64,
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
    /// For each range, the index in `nodes` of its primary.
    pub owners: Vec<u32>,
    /// Whether a range whose primary is lost gets another: on a replicated cluster its
    /// shard elects a new leader within about a second, so a call to a dead primary is
    /// worth making again; with one copy (replication 1, or a standalone node) the range
    /// waits for its node.
    pub failover: bool,
    /// A replicated cluster's shards: its ranges are grouped into this many runs (see
    /// [`shard_of_range`]), each owned by its shard's leader. 0 for a standalone node,
    /// whose ranges are not grouped.
    pub shards: u32,
}

impl Topology {
    /// A fixed topology of `nodes`, in that order (a standalone node's: one node owning
    /// everything): the ranges split evenly, node `i`
    /// owning ranges `i * 1024 / n` up to `(i + 1) * 1024 / n`.
    pub fn even(nodes: Vec<NodeInfo>, epoch: u64) -> Topology {
        let n = nodes.len().max(1) as u64;
        let owners = (0..u64::from(RANGES))
            .map(|r| (r * n / u64::from(RANGES)) as u32)
            .collect();
        Topology {
            epoch,
            nodes,
            owners,
            failover: false,
            shards: 0,
        }
    }

    /// The shard of `key`'s range on a replicated cluster; `None` on a static one.
    pub fn shard_of(&self, key: &Key) -> Option<u32> {
        (self.shards > 0).then(|| shard_of_range(range_of(key), self.shards))
    }

    /// The index in `nodes` of the primary of `range`.
    pub fn owner_of_range(&self, range: u32) -> Option<usize> {
        self.owners.get(range as usize).map(|&o| o as usize)
    }

    /// The primary of `key`'s range.
    pub fn owner_of(&self, key: &Key) -> Option<&NodeInfo> {
        self.owner_of_range(range_of(key))
            .and_then(|i| self.nodes.get(i))
    }

    /// Which ranges node `index` owns, as a bitmap over the 1024 ranges.
    pub fn ranges_of(&self, index: usize) -> RangeSet {
        RangeSet(self.owners.iter().map(|&o| o as usize == index).collect())
    }
}

/// One shard of a replicated cluster (a Raft group holding a run of ranges), as one node
/// sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The shard's number.
    pub shard: u32,
    /// Its ranges: `first..=last`.
    pub first_range: u32,
    /// The last of its ranges.
    pub last_range: u32,
    /// The nodes holding a replica, first replica first.
    pub replicas: Vec<NodeId>,
    /// Its leader, when the node asked knows it (it replicates the shard and has heard
    /// from a leader).
    pub leader: Option<NodeId>,
    /// Its Raft term as the node asked knows it (0: it does not replicate the shard).
    pub term: u64,
}

/// A replicated cluster's meta group, as one node sees it: the Raft group, on every node,
/// that holds the cluster's layout (its nodes, shards, their ranges and replicas). Shard
/// groups are formed only from the layout it committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaGroupInfo {
    /// Its voting members.
    pub voters: Vec<NodeId>,
    /// Its other members, which replicate it without voting.
    pub learners: Vec<NodeId>,
    /// Its leader, when the node asked knows it.
    pub leader: Option<NodeId>,
    /// Its Raft term as the node asked knows it.
    pub term: u64,
    /// The version of the layout it committed, as the node asked has applied it (0: none
    /// applied yet, and the node's shards are not formed).
    pub layout_version: u64,
    /// The committed layout's fingerprint (0 while none is applied).
    pub layout_fingerprint: u64,
}

/// A node's state, as its peers see it (for placement).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub info: NodeInfo,
    /// Bytes of entries held.
    pub held_bytes: u64,
    /// Its limit, if it has one.
    pub max_bytes: Option<u64>,
    /// Entries held.
    pub held_entries: u64,
    /// Its limit on entries, if it has one.
    pub max_entries: Option<u64>,
}

/// One operation, as sent to a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Store entries of one type (all or none).
    WriteDirect {
        /// The entry type.
        entry_type: String,
        /// Fields the type indexes (sent with a client's first write of the type).
        indexes: Vec<String>,
        /// Documents, each with its user key if it has one.
        entries: Vec<(Fields, Option<Key>)>,
        /// Their lease.
        lease: Lease,
        /// Labels the node storing keyless entries must carry (`zone=a`); empty: any node.
        labels: Vec<(String, String)>,
    },
    /// A copy of an entry, waiting up to `timeout` for a query's first match.
    ReadDirect {
        /// What to read.
        target: Target,
        /// How long to wait (zero: do not wait).
        timeout: Duration,
    },
    /// Remove and return entries: at least one (waiting up to `timeout`), at most `max`.
    TakeDirect {
        /// What to take.
        target: Target,
        /// At most this many (1 for a plain take).
        max: u32,
        /// How long to wait (zero: do not wait).
        timeout: Duration,
    },
    /// A leased take.
    Claim {
        /// What to claim.
        query: Query,
        /// The claim's lease.
        lease: Lease,
        /// How long to wait.
        timeout: Duration,
    },
    /// Gives up the earlier request with this id, whose caller went away without its
    /// answer (a dropped future, a timeout around the call, the losing claims of a take
    /// across nodes): if it is still running it stops (a wait ends; anything handed to it
    /// goes back); if it finished, the entries it took are put back where they were and
    /// a claim it made is released. A request that arrives after its revoke is refused
    /// with [`SpaceError::Revoked`]. A node that is not replicated answers `Done`; a
    /// replicated node gives back what the request did on every shard it leads (whichever
    /// leader did it: the shard's answers say) and answers [`Response::Revoked`] with
    /// those shards, so that the caller asks on until every shard was covered.
    Revoke(RequestId),
    /// Remove a claimed entry for good.
    Commit(ClaimTicket),
    /// Give a claimed entry back.
    Release(ClaimTicket),
    /// Extend a claim.
    RenewClaim(ClaimTicket, Lease),
    /// Extend an entry's lease.
    Renew {
        /// The entry type.
        entry_type: String,
        /// The key.
        key: Key,
        /// The new lease, from now.
        lease: Lease,
    },
    /// Cancel an entry's lease (remove it).
    Cancel {
        /// The entry type.
        entry_type: String,
        /// The key.
        key: Key,
    },
    /// Count visible matches.
    Count(Query),
    /// A page of matching entries, oldest first, after a cursor from an earlier page.
    Contents {
        /// The query.
        query: Query,
        /// Where the previous page ended (`None`: from the start).
        after: Option<u64>,
        /// At most this many entries.
        limit: u32,
    },
    /// Which node holds (or would hold) this key.
    FindFor(Key),
    /// A node with room for `size` bytes that carries all the labels.
    FindPlaceFor {
        /// The key, if the entry has one.
        key: Option<Key>,
        /// The entry's size in bytes.
        size: u64,
        /// Labels the node must carry.
        labels: Vec<(String, String)>,
    },
    /// Register a subscription. With an `endpoint` the node pushes its events there, once
    /// it has made sure it can connect to it ([`SpaceError::EndpointUnreachable`] if not);
    /// without one the client fetches them over its own connection ([`Request::Poll`]).
    Subscribe {
        /// The query.
        query: Query,
        /// Which kinds of change to report.
        kinds: EventKinds,
        /// The subscription's lease.
        lease: Lease,
        /// Where the client serves [`SubscriberService`], and its secret; `None` for a
        /// subscription whose events are polled.
        endpoint: Option<Endpoint>,
    },
    /// The next events of a polled subscription after sequence number `after` (what the
    /// client has; events up to it are not sent again, later ones are, so an answer lost
    /// on the way is delivered again), waiting up to `wait` for the first. A polled
    /// subscription not polled for the node's subscriber timeout is cancelled.
    Poll {
        /// The subscription id.
        id: u64,
        /// The last sequence number the client has (0: none).
        after: u64,
        /// How long to wait for an event (at most [`MAX_POLL_WAIT`]).
        wait: Duration,
    },
    /// Pick up a subscription after `last_seq`, delivering to `endpoint`.
    Resume {
        /// The subscription id.
        id: u64,
        /// The last sequence number the client has (0: none).
        last_seq: u64,
        /// Where to deliver from now on.
        endpoint: Endpoint,
    },
    /// Extend a subscription's lease.
    RenewSubscription {
        /// The subscription id.
        id: u64,
        /// The new lease, from now.
        lease: Lease,
    },
    /// End a subscription.
    CancelSubscription(u64),
    /// Register subscription `id` (chosen by the client, with
    /// [`LOGGED_ID_BIT`](crate::server::LOGGED_ID_BIT) set) in the logs of those of
    /// `shards` that the node asked leads, so that every replica of them holds it and
    /// whichever leads them pushes their events (to `endpoint`), numbered per shard. The
    /// node first makes sure it can connect to the endpoint; without one, the client
    /// fetches the events from each shard's leader ([`Request::PollShards`]). Answered with
    /// [`Response::OnShards`] once the registrations are committed. A shard that holds
    /// the subscription already keeps it; registered with another `attachment` (a
    /// subscriber that resumed it), it sends its events there from now on, starting
    /// again from what its leader still keeps (the subscriber drops what it had). For a
    /// replicated cluster.
    SubscribeShards {
        /// The subscription's id, the same in every shard.
        id: u64,
        /// The query.
        query: Query,
        /// Which kinds of change to report.
        kinds: EventKinds,
        /// The subscription's lease, from now.
        lease: Lease,
        /// Where the client serves [`SubscriberService`], and its secret; `None` for a
        /// subscription whose events are polled.
        endpoint: Option<Endpoint>,
        /// A number the client draws each time it attaches the subscription (subscribes,
        /// or resumes it): the same in every try of one attachment.
        attachment: u64,
        /// The shards to register it on (at most the cluster's number of shards), each
        /// with the last number the client had from an earlier registration there (0:
        /// none): a shard that lost the subscription numbers its events after it.
        shards: Vec<(u32, u64)>,
    },
    /// Extend, through their logs, the lease of subscription `id` on those of `shards`
    /// the node leads. Answered with [`Response::OnShards`]: a shard led and not renewed
    /// no longer holds the subscription.
    RenewShards {
        /// The subscription's id.
        id: u64,
        /// The entry type its query is on.
        entry_type: String,
        /// The new lease, from now.
        lease: Lease,
        /// The shards to renew it on.
        shards: Vec<u32>,
    },
    /// The next events of a polled subscription of a replicated cluster on those of
    /// `positions`' shards the node leads: on each, those after the number the client
    /// has there (events up to it are not sent again, later ones are, so an answer lost
    /// on the way is delivered again), waiting up to `wait` for the first. Answered with
    /// [`Response::ShardNotifications`].
    PollShards {
        /// The subscription's id.
        id: u64,
        /// The entry type its query is on.
        entry_type: String,
        /// The shards, each with the last number the client has from it (0: none).
        positions: Vec<(u32, u64)>,
        /// How long to wait for an event (at most [`MAX_POLL_WAIT`]).
        wait: Duration,
    },
    /// End subscription `id`, through their logs, on those of `shards` the node leads.
    /// Answered with [`Response::OnShards`].
    CancelShards {
        /// The subscription's id.
        id: u64,
        /// The entry type its query is on.
        entry_type: String,
        /// The shards to end it on.
        shards: Vec<u32>,
    },
    /// The kinds of value each top-level field of an entry type's entries held so far
    /// (what the node learned from writes); for tools that warn about a field no entry
    /// ever had.
    Schema(String),
    /// The node's view of the cluster.
    Topology,
    /// The node's own state (labels, room), asked by its peers for placement.
    NodeStatus,
    /// Counters.
    Stats,
    /// A replicated cluster's shards, as the node asked sees them (none from a node that
    /// is not replicated).
    Shards,
    /// A replicated cluster's meta group (the Raft group holding its layout), as the node
    /// asked sees it (none from a node that is not replicated).
    MetaGroup,
}

impl Request {
    /// The request's kind, for metrics and logs: one fixed word per variant.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::WriteDirect { .. } => "write",
            Request::ReadDirect { .. } => "read",
            Request::TakeDirect { .. } => "take",
            Request::Claim { .. } => "claim",
            Request::Revoke(_) => "revoke",
            Request::Commit(_) => "commit",
            Request::Release(_) => "release",
            Request::RenewClaim(..) => "renew_claim",
            Request::Renew { .. } => "renew",
            Request::Cancel { .. } => "cancel",
            Request::Count(_) => "count",
            Request::Contents { .. } => "contents",
            Request::FindFor(_) => "find_for",
            Request::FindPlaceFor { .. } => "find_place_for",
            Request::Subscribe { .. } => "subscribe",
            Request::Poll { .. } => "poll",
            Request::Resume { .. } => "resume",
            Request::RenewSubscription { .. } => "renew_subscription",
            Request::CancelSubscription(_) => "cancel_subscription",
            Request::SubscribeShards { .. } => "subscribe",
            Request::RenewShards { .. } => "renew_subscription",
            Request::CancelShards { .. } => "cancel_subscription",
            Request::PollShards { .. } => "poll",
            Request::Schema(_) => "schema",
            Request::Topology => "topology",
            Request::NodeStatus => "node_status",
            Request::Stats => "stats",
            Request::Shards => "shards",
            Request::MetaGroup => "meta_group",
        }
    }

    /// Whether a retried request must get the first answer rather than run again.
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Request::ReadDirect { .. }
                | Request::Count(_)
                | Request::Contents { .. }
                | Request::FindFor(_)
                | Request::FindPlaceFor { .. }
                | Request::Topology
                | Request::NodeStatus
                | Request::Stats
                | Request::Shards
                | Request::MetaGroup
                | Request::Revoke(_)
        )
    }

    /// The key a request is addressed to, if it is addressed by key: such a request goes
    /// to (and is only answered by) the owner of the key's range.
    pub fn routing_key(&self) -> Option<&Key> {
        match self {
            Request::ReadDirect {
                target: Target::Key { key, .. },
                ..
            }
            | Request::TakeDirect {
                target: Target::Key { key, .. },
                ..
            }
            | Request::Renew { key, .. }
            | Request::Cancel { key, .. } => Some(key),
            Request::Commit(t) | Request::Release(t) | Request::RenewClaim(t, _) => Some(&t.key),
            _ => None,
        }
    }

    /// Checks what the request carries before it is encoded: its queries and documents
    /// (nesting, field names, entry type names). A client runs this before sending, so a
    /// malformed request gets its typed error without a round trip, and nothing too deep
    /// to encode safely reaches the encoder.
    ///
    /// # Errors
    /// The errors of [`Query::validate`] and of writing the documents.
    pub fn check(&self) -> Result<(), SpaceError> {
        match self {
            Request::WriteDirect {
                entry_type,
                entries,
                ..
            } => entries
                .iter()
                .try_for_each(|(fields, _)| crate::engine::check_document(entry_type, fields)),
            Request::ReadDirect {
                target: Target::Query(q),
                ..
            }
            | Request::TakeDirect {
                target: Target::Query(q),
                ..
            }
            | Request::Claim { query: q, .. }
            | Request::Count(q)
            | Request::Contents { query: q, .. }
            | Request::Subscribe { query: q, .. }
            | Request::SubscribeShards { query: q, .. } => Ok(q.validate()?),
            _ => Ok(()),
        }
    }

    /// The same request with another wait (for requests that wait; others unchanged).
    pub fn with_wait(&self, wait: Duration) -> Request {
        let mut request = self.clone();
        match &mut request {
            Request::ReadDirect { timeout, .. }
            | Request::TakeDirect { timeout, .. }
            | Request::Claim { timeout, .. } => *timeout = wait,
            _ => {}
        }
        request
    }

    /// How long the node may legitimately take before answering (its own timeout).
    pub fn wait(&self) -> Duration {
        match self {
            Request::ReadDirect { timeout, .. }
            | Request::TakeDirect { timeout, .. }
            | Request::Claim { timeout, .. } => *timeout,
            Request::Poll { wait, .. } | Request::PollShards { wait, .. } => {
                (*wait).min(MAX_POLL_WAIT)
            }
            _ => Duration::ZERO,
        }
    }
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Receipts of a write.
    Receipts(Vec<Receipt>),
    /// A read's copy (or nothing).
    Document(Option<Document>),
    /// Taken entries.
    Documents(Vec<Document>),
    /// A claim (or nothing).
    Claimed(Option<ClaimedDocument>),
    /// Done, nothing to report.
    Done,
    /// A new expiry (`None`: forever).
    Expires(Option<SystemTime>),
    /// A count.
    Count(u64),
    /// A replicated node's count: the matches in each shard it leads, and the cluster's
    /// number of shards (so that a client counting on every node can tell a shard nobody
    /// counted).
    ShardCounts {
        /// Each shard led here, and its matches.
        counts: Vec<(u32, u64)>,
        /// The cluster's number of shards.
        of: u32,
    },
    /// A replicated node's answer to a read by query that found nothing: the shards it
    /// searched whose leadership confirmed it, and the cluster's number of shards (so
    /// that a client reading on every node can tell a shard nobody searched).
    NoneInShards {
        /// The shards searched.
        searched: Vec<u32>,
        /// The cluster's number of shards.
        of: u32,
    },
    /// A page of contents and the cursor of the next one.
    Page {
        /// The entries.
        documents: Vec<Document>,
        /// Pass as `after` for the next page; `None` when this was the last.
        next: Option<u64>,
        /// A replicated node's page: the shards whose entries it listed to their end (it
        /// lists only the shards it leads). Empty from other nodes.
        listed: Vec<u32>,
        /// A replicated node's page: the cluster's number of shards, so that a client
        /// listing every node can tell a shard nobody listed (it had no leader). 0 from
        /// other nodes.
        of: u32,
    },
    /// A node.
    Node(NodeInfo),
    /// An entry type's learned fields and their kinds, by name.
    Schema(Vec<(String, space_query::ValueKind)>),
    /// A subscription's id.
    Subscribed(u64),
    /// A polled subscription's next events; `ended` when its lease ended after them (or
    /// it was cancelled): no more will come.
    Notifications {
        /// The events and gaps, in order.
        notifications: Vec<Notification>,
        /// Whether the subscription is over.
        ended: bool,
    },
    /// The topology.
    Topology(Topology),
    /// A node's state.
    NodeStatus(NodeStatus),
    /// Counters.
    Stats(Stats),
    /// A replicated cluster's shards.
    Shards(Vec<ShardInfo>),
    /// A replicated cluster's meta group (none from a node that is not replicated).
    MetaGroup(Option<MetaGroupInfo>),
    /// A replicated node's answer to a revoke: the shards it leads, where what the revoked
    /// request did is given back (committed), of how many shards in all.
    Revoked {
        /// The shards covered.
        shards: Vec<u32>,
        /// The cluster's number of shards.
        of: u32,
    },
    /// A replicated node's answer about a subscription on shards
    /// ([`Request::SubscribeShards`], [`Request::RenewShards`],
    /// [`Request::CancelShards`]): of the shards asked about, those it leads, and those
    /// where it did what was asked (committed).
    OnShards {
        /// The shards asked about that the node leads.
        led: Vec<u32>,
        /// The shards where it was done.
        done: Vec<u32>,
        /// Of those, the shards where a subscription was registered anew: they did not
        /// hold it (a subscription resumed after its lease ran out there).
        anew: Vec<u32>,
        /// Of the shards led, those that do not hold the subscription (a renewal or a
        /// cancel there found it gone). A shard led and neither done nor missing may
        /// have done it or not: its leadership ended before it could tell.
        missing: Vec<u32>,
    },
    /// A replicated node's answer to [`Request::PollShards`].
    ShardNotifications {
        /// The shards asked about that the node leads.
        led: Vec<u32>,
        /// Of those, the shards that do not hold the subscription (its lease ran out
        /// there, or it was never registered there).
        missing: Vec<u32>,
        /// Each shard's next events and gaps, in order.
        told: Vec<(u32, Vec<Notification>)>,
        /// The shards where the subscription ended after what `told` holds (its lease
        /// ran out there).
        ended: Vec<u32>,
    },
}

/// A request with its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Identifies the request across retries.
    pub id: RequestId,
    /// The operation (shared, so a client keeps it for a retry without copying it; it
    /// travels as the plain request).
    pub request: std::sync::Arc<Request>,
    /// The request may have reached the node before (its connection broke before the
    /// answer came back): a node that no longer knows the id looks for its first answer
    /// before it runs it again (see the node's replicated answers).
    pub retry: bool,
    /// The request's first send: its client never sent this id before, to any node, so
    /// no node holds an answer for it and the node does not look for one (a replicated
    /// node would otherwise look in the answer table of every shard it serves). A client
    /// that sets it on an id it sent before may have the request run twice.
    pub fresh: bool,
    /// Earlier requests on the same connection whose answers (entries taken, claimed or
    /// committed)
    /// reached their callers for good: the node drops the entries it keeps with those
    /// answers for retries and revokes, and refuses the ids if they come again
    /// ([`SpaceError::Acknowledged`]). At most [`MAX_ACKNOWLEDGED`].
    pub acknowledged: Vec<RequestId>,
    /// Its client would revoke it if it gave it up (a take, a claim, the commit of a
    /// claim made to take an entry): if the request takes or claims entries and its
    /// connection closes before the answer goes out, the node gives them back itself, as
    /// the revoke would (its client may have died). A commit a worker sends after its
    /// work is not: it stands.
    pub revocable: bool,
}

/// The service every node serves.
#[tarpc::service]
pub trait SpaceService {
    /// Runs one operation.
    async fn call(envelope: Envelope) -> Result<Response, SpaceError>;
}

/// The service a subscribing client serves, for nodes to push events to.
#[tarpc::service]
pub trait SubscriberService {
    /// Delivers events of one subscription of node `node`, in order. Returns false when the
    /// client no longer wants the subscription (the node then cancels it).
    ///
    /// A subscription of a replicated cluster is numbered per shard: its events come
    /// from the node that leads `shard` now (`None` for a subscription of the node's
    /// own, numbered by the node).
    async fn deliver(
        node: NodeId,
        shard: Option<u32>,
        subscription: u64,
        notifications: Vec<Notification>,
    ) -> bool;
    /// Tells that a subscription of node `node` ended (its lease ran out, or the node let
    /// it go): every event it matched was delivered before this.
    async fn end(node: NodeId, shard: Option<u32>, subscription: u64);
}

/// The first frame of a connection, from the connecting side.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The node's auth token, when it requires one.
    pub token: Option<String>,
    /// The largest frame the connecting side reads: answers are kept within it.
    pub max_frame: u64,
    /// The connecting side is a node of the same cluster and carries the Raft messages of
    /// replicated shards (a node's peer service), not calls of the space.
    pub peer: bool,
    /// For a peer: the fingerprint of its cluster's layout (nodes, shards, replication);
    /// a node refuses peers of another cluster. 0 for clients.
    pub cluster: u64,
    /// For a node connecting to a subscriber endpoint to push events: the node's id, so
    /// that the client knows whose connection ended should it end (and renews only that
    /// node's subscriptions at once). `None` on every other connection.
    pub pusher: Option<NodeId>,
}

impl Hello {
    /// A hello of this build, with an optional token, from a side that reads frames of up
    /// to `max_frame` bytes.
    pub fn new(token: Option<String>, max_frame: usize) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token,
            max_frame: max_frame as u64,
            peer: false,
            cluster: 0,
            pusher: None,
        }
    }

    /// The hello of node `node` connecting to a subscriber endpoint (whose secret is
    /// `token`) to push events.
    pub fn new_pusher(token: Option<String>, max_frame: usize, node: NodeId) -> Hello {
        Hello {
            pusher: Some(node),
            ..Hello::new(token, max_frame)
        }
    }

    /// The hello of a node opening a peer connection to another node of its cluster,
    /// whose layout has the fingerprint `cluster`.
    pub fn new_peer(token: Option<String>, max_frame: usize, cluster: u64) -> Hello {
        Hello {
            peer: true,
            cluster,
            ..Hello::new(token, max_frame)
        }
    }
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Hello")
            .field("magic", &self.magic)
            .field("version", &self.version)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_frame", &self.max_frame)
            .field("peer", &self.peer)
            .field("cluster", &self.cluster)
            .field("pusher", &self.pusher)
            .finish()
    }
}

/// The answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    /// Go ahead: tarpc frames follow.
    Accepted {
        /// The node's id.
        node: NodeId,
        /// What the accepting side takes, so the other side can refuse oversized
        /// requests itself with a typed error instead of sending them.
        limits: Limits,
    },
    /// The connection is refused and will be closed.
    Refused {
        /// Why.
        reason: String,
    },
    /// The accepting side is at its limit of connections; try again later.
    Busy {
        /// Which limit.
        reason: String,
    },
}

/// The sizes a serving side accepts, told in its [`Welcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame it reads, in bytes.
    pub max_frame: u64,
    /// Largest entry it stores, in bytes of document
    /// ([`Fields::approx_size`](space_query::Fields::approx_size)).
    pub max_entry_bytes: u64,
}

/// Length-delimited framing with a bounded frame size.
pub fn framed<S: AsyncRead + AsyncWrite>(
    io: S,
    max_frame: usize,
) -> Framed<S, LengthDelimitedCodec> {
    Framed::new(
        io,
        LengthDelimitedCodec::builder()
            .max_frame_length(max_frame)
            .new_codec(),
    )
}

/// Encodes a message as frames carry it (postcard).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a growable buffer cannot fail for the wire's types.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes a frame's body.
///
/// # Errors
/// When the bytes are not a valid encoding of `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SpaceError> {
    postcard::from_bytes(bytes).map_err(|e| SpaceError::Protocol {
        reason: format!("cannot decode a frame: {e}"),
    })
}

/// Sends one postcard-encoded frame.
///
/// # Errors
///
/// The stream's I/O errors; a value that does not encode.
pub async fn send_frame<S, T>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    value: &T,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Serialize,
{
    framed.send(encode_frame(value)?).await
}

/// Receives one postcard-encoded frame; `None` when the peer closed the connection.
///
/// # Errors
///
/// The stream's I/O errors; a frame larger than the limit, or that does not decode.
pub async fn recv_frame<S, T>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
) -> std::io::Result<Option<T>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: DeserializeOwned,
{
    match framed.next().await {
        None => Ok(None),
        Some(frame) => {
            let frame = frame?;
            postcard::from_bytes(&frame)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        }
    }
}

/// The postcard codec for tarpc's serde transport.
pub struct Postcard<Item, SinkItem>(PhantomData<fn(SinkItem) -> Item>);

impl<Item, SinkItem> Default for Postcard<Item, SinkItem> {
    fn default() -> Self {
        Postcard(PhantomData)
    }
}

/// Encodes an outgoing message of a transport.
fn encode_frame<T: Serialize>(item: &T) -> std::io::Result<Bytes> {
    postcard::to_stdvec(item)
        .map(Bytes::from)
        .map_err(std::io::Error::other)
}

impl<Item, SinkItem: Serialize> tokio_serde::Serializer<SinkItem> for Postcard<Item, SinkItem> {
    type Error = std::io::Error;
    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, Self::Error> {
        encode_frame(item)
    }
}

impl<Item: DeserializeOwned, SinkItem> tokio_serde::Deserializer<Item>
    for Postcard<Item, SinkItem>
{
    type Error = std::io::Error;
    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, Self::Error> {
        postcard::from_bytes(src)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// A tarpc transport over framed bytes, with the postcard codec.
pub type Transport<S, Item, SinkItem> =
    tarpc::serde_transport::Transport<S, Item, SinkItem, Postcard<Item, SinkItem>>;

/// The longest one call may wait at a node (a blocking read, take or claim). A client
/// makes a longer wait of successive calls, so that every deadline on the wire stays
/// small.
pub const MAX_CALL_WAIT: Duration = Duration::from_secs(3600);

/// The furthest deadline a server accepts on an incoming call; one further away is
/// brought back to this (a deadline is decoded as "now plus a duration", and absurd ones
/// would overflow the clock or the server's timers).
pub const MAX_DEADLINE: Duration = Duration::from_secs(2 * 3600);

/// An incoming call as it travels (tarpc's `ClientMessage`, field for field), with the
/// deadline kept as the plain duration it is sent as.
#[derive(Deserialize)]
enum IncomingMessage<T> {
    Request(IncomingRequest<T>),
    Cancel {
        trace_context: tarpc::trace::Context,
        request_id: u64,
    },
}

#[derive(Deserialize)]
struct IncomingRequest<T> {
    context: IncomingContext,
    id: u64,
    message: T,
}

#[derive(Deserialize)]
struct IncomingContext {
    deadline: Duration,
    trace_context: tarpc::trace::Context,
}

impl<T> IncomingMessage<T> {
    /// tarpc's message, the deadline capped at [`MAX_DEADLINE`] from now.
    fn into_client_message(self) -> tarpc::ClientMessage<T> {
        match self {
            IncomingMessage::Request(r) => {
                let mut context = tarpc::context::current();
                context.deadline = std::time::Instant::now() + r.context.deadline.min(MAX_DEADLINE);
                context.trace_context = r.context.trace_context;
                tarpc::ClientMessage::Request(tarpc::Request {
                    context,
                    id: r.id,
                    message: r.message,
                })
            }
            IncomingMessage::Cancel {
                trace_context,
                request_id,
            } => tarpc::ClientMessage::Cancel {
                trace_context,
                request_id,
            },
        }
    }
}

/// The postcard codec of a serving side: answers go out as [`Postcard`] sends them;
/// incoming calls are decoded with their deadlines capped ([`MAX_DEADLINE`]).
pub struct ServerCodec<Req, Resp>(PhantomData<fn(Resp) -> Req>);

impl<Req, Resp> Default for ServerCodec<Req, Resp> {
    fn default() -> Self {
        ServerCodec(PhantomData)
    }
}

impl<Req, Resp: Serialize> tokio_serde::Serializer<tarpc::Response<Resp>>
    for ServerCodec<Req, Resp>
{
    type Error = std::io::Error;
    fn serialize(self: Pin<&mut Self>, item: &tarpc::Response<Resp>) -> Result<Bytes, Self::Error> {
        encode_frame(item)
    }
}

impl<Req: DeserializeOwned, Resp> tokio_serde::Deserializer<tarpc::ClientMessage<Req>>
    for ServerCodec<Req, Resp>
{
    type Error = std::io::Error;
    fn deserialize(
        self: Pin<&mut Self>,
        src: &BytesMut,
    ) -> Result<tarpc::ClientMessage<Req>, Self::Error> {
        postcard::from_bytes::<IncomingMessage<Req>>(src)
            .map(IncomingMessage::into_client_message)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// The transport of a serving side (a node, or a client's subscriber endpoint).
pub type ServerTransport<S, Req, Resp> = tarpc::serde_transport::Transport<
    S,
    tarpc::ClientMessage<Req>,
    tarpc::Response<Resp>,
    ServerCodec<Req, Resp>,
>;

/// Turns a framed stream (after the handshake) into the transport of a serving side.
pub fn server_transport<S, Req, Resp>(
    framed: Framed<S, LengthDelimitedCodec>,
) -> ServerTransport<S, Req, Resp>
where
    S: AsyncRead + AsyncWrite,
    Req: DeserializeOwned,
    Resp: Serialize,
{
    tarpc::serde_transport::new(framed, ServerCodec::default())
}

/// Turns a framed stream (after the handshake) into a tarpc transport.
pub fn transport<S, Item, SinkItem>(
    framed: Framed<S, LengthDelimitedCodec>,
) -> Transport<S, Item, SinkItem>
where
    S: AsyncRead + AsyncWrite,
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    tarpc::serde_transport::new(framed, Postcard::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_postcard() {
        let req = Envelope {
            id: RequestId::new(),
            request: std::sync::Arc::new(Request::TakeDirect {
                target: Target::Query(Query::for_type("Job").eq("kind", "x").gt("size", 2.5)),
                max: 3,
                timeout: Duration::from_millis(250),
            }),
            retry: false,
            fresh: false,
            acknowledged: vec![RequestId::new()],
            revocable: true,
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        let back: Envelope = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        let mut f = Fields::new();
        f.push("a", space_query::Value::Bytes(vec![1, 2, 3]));
        f.push(
            "b",
            space_query::Value::List(vec![space_query::Value::F64(1.5), space_query::Value::Null]),
        );
        let write = Request::WriteDirect {
            entry_type: "T".into(),
            indexes: vec!["a".into()],
            entries: vec![(f, Some(Key::Name("k".into())))],
            lease: Lease::secs(5),
            labels: vec![("zone".into(), "a".into())],
        };
        let back: Request = postcard::from_bytes(&postcard::to_stdvec(&write).unwrap()).unwrap();
        assert_eq!(back, write);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [&[][..], &[0xff; 7][..], &[3, 200, 200, 200, 200, 200][..]] {
            assert!(postcard::from_bytes::<Envelope>(junk).is_err());
        }
    }
}
