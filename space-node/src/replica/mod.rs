//! Replicated shards: each shard of ranges is a Raft group (openraft) whose committed log
//! drives a replica [`Engine`](space_core::server::Engine) on every member
//! (docs/ARCHITECTURE.md section 9).
//!
//! This module is the one place that knows openraft's types: the rest of the node speaks
//! of [`ShardGroup`]s, [`Proposal`]s and [`Applied`] outcomes. Pieces:
//! - [`LogStore`] keeps a group's Raft log as one log of the node's shared write-ahead log
//!   ([`HostedLog`](space_core::server::HostedLog)): every group's appends share one
//!   `fdatasync`; the vote, the committed log id and the purge point are the log's
//!   metadata record.
//! - [`StateMachine`] applies committed commands to a replica engine through the engine's
//!   one apply, and makes and installs snapshots from the engine's state image.

mod across;
mod leader;
mod log_store;
mod meta;
mod notify;
mod peer;
mod shards;
mod state_machine;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use space_core::EngineConfig;
pub use space_core::server::Applied;
use space_core::server::LogHost;

pub use across::{claim_across, read_across, take_across};
pub use leader::{Leadership, ServingChanges, Session, follow_leadership};
pub use log_store::LogStore;
pub use meta::{CommittedLayout, META_GROUP, MetaGroup};
pub(crate) use notify::{
    attachment as notify_attachment, check_room, poll as poll_shards, push_led,
};
pub(crate) use peer::serve_peer_messages;
pub use peer::{GroupId, GroupNetwork, Groups, PEER_MAX_FRAME, PeerDoor, PeerRouter, serve_peers};
pub use shards::{Layout, ShardProgress, ShardSet, rebalance};
pub use state_machine::{EngineSlot, StateMachine};

/// A command for a shard's log: the bytes of a command the leader's engine decided (see
/// [`Engine::apply_logged`](space_core::server::Engine::apply_logged)), and which
/// leadership proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The proposing leadership and the command's place in its order; the leader learns
    /// from it that its command is committed.
    pub origin: Option<Origin>,
    /// The command.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
}

/// Where a proposal comes from: the leadership that proposed it, named by its term and
/// its leader (openraft may elect several leaders in one term, one after the other: a
/// candidate of a higher member id wins the term over a lower one), and its number among
/// that leadership's proposals (from 1, in log order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The leader's term.
    pub term: u64,
    /// The leader.
    pub leader: MemberId,
    /// The proposal's number in that leadership.
    pub seq: u64,
}

impl Origin {
    /// Whether `other` comes from the same leadership.
    pub fn same_leadership(&self, other: &Origin) -> bool {
        (self.term, self.leader) == (other.term, other.leader)
    }
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "command of {} bytes", self.command.len())
    }
}

/// The Raft types of a shard group: proposals in, applied outcomes out; members are
/// nodes by id, reached at the address their [`Member`] names. openraft's defaults
/// otherwise, but for the responder of a proposal, `leader::Refusal` (which
/// `declare_raft_types!` cannot name, hence the types spelled out).
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct Shard {}

impl openraft::RaftTypeConfig for Shard {
    type D = Proposal;
    type R = Applied;
    type NodeId = MemberId;
    type Node = Member;
    type Term = u64;
    type LeaderId = openraft::impls::leader_id_adv::LeaderId<Self::Term, Self::NodeId>;
    type Vote = openraft::impls::Vote<Self::LeaderId>;
    type Payload = openraft::impls::EntryPayload<Self::D, Self::NodeId, Self::Node>;
    type Entry = openraft::impls::Entry<
        <Self::LeaderId as openraft::vote::RaftLeaderId>::Committed,
        Self::Payload,
    >;
    type AsyncRuntime = openraft::impls::TokioRuntime;
    type Responder<T>
        = leader::Refusal
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// A member of shard groups: a node, by the id Raft knows it as (issued once, never
/// reused for another node).
pub type MemberId = u64;

/// A member of a shard group as Raft knows it: the address its node serves peers on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the node.
    pub addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A Raft entry of a shard's log.
pub type Entry = openraft::alias::EntryOf<Shard>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::alias::LogIdOf<Shard>;
/// A Raft vote.
pub type Vote = openraft::alias::VoteOf<Shard>;
/// A Raft node running one shard group on this node.
pub type ShardGroup = openraft::Raft<Shard, StateMachine>;

/// Why a member of a shard group could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// Its log or snapshot cannot be read, or its log is already open.
    #[error("group {group}: storage: {reason}")]
    Storage {
        /// The group.
        group: GroupId,
        /// What is wrong.
        reason: String,
    },
    /// The cluster's layout is not usable.
    #[error("cluster layout: {reason}")]
    Layout {
        /// What is wrong.
        reason: String,
    },
    /// Raft refused to start (its settings or its stored state are inconsistent).
    #[error("group {group}: raft: {reason}")]
    Raft {
        /// The group.
        group: GroupId,
        /// What Raft said.
        reason: String,
    },
}

/// Entries a shard's log grows by before it is snapshot, by default.
pub const SNAPSHOT_AFTER_ENTRIES: u64 = 10_000;

/// Raft settings for shard groups: heartbeats every 150 ms, a leader lease of 300 ms,
/// and elections after 160-300 ms more of silence. openraft counts a follower's election
/// timeout from the end of the lease its leader's last heartbeat gave (the longest
/// election timeout), and a voter refuses other candidates until that lease has passed:
/// a leader's death is replaced 460-600 ms after its last heartbeat, about 0.55 s after
/// the death. Each group's fixed cost is most of what an idle node spends (64 groups,
/// two followers each): openraft runs every group's core loop at each tick
/// (`heartbeat * 13 / 64`, 30 ms here) and each heartbeat costs both ends a message. An
/// idle 3-node cluster kept 0.6 of 2 cores busy with heartbeats every 50 ms, 0.35 at 100
/// ms and 0.30 at 150 ms, with the same failover time; at 200 ms 0.26, but failover's
/// p99 rose to 0.7 s and a lease of 300 ms would be renewed with 60 ms to spare. Pre-vote
/// is on: a member that has not heard from its leader asks the others whether they would
/// vote before it starts a term, so a member cut off (or paused, or restarted) campaigns
/// without raising its term and, once back, deposes no leader the others still hear. A
/// snapshot after `snapshot_after_entries` entries ([`SNAPSHOT_AFTER_ENTRIES`] by
/// default), keeping 1,000 entries behind it for followers that lag a little (further
/// behind, they get the snapshot).
///
/// A restarted leader does not take its old leadership up again (openraft's leader
/// restore is off): it leads again only once elected, in a later term. Every leadership
/// is then one term of one member, which starts with a blank entry of its own: its
/// serving engine starts from everything committed before it, and its proposals are told
/// from every earlier leadership's by (term, leader). A leadership restored after a
/// restart would share its term with the one that died, whose last proposals (logged
/// here or on a follower, never known committed) could commit after the restored
/// engine's image was cut: missing from the engine that serves, and counted as the new
/// session's proposals of the same numbers, so that its calls were answered before their
/// own commands committed.
///
/// # Errors
/// [`ReplicaError::Raft`] when openraft refuses the settings (no snapshot interval).
pub fn raft_settings(snapshot_after_entries: u64) -> Result<Arc<openraft::Config>, ReplicaError> {
    let config = openraft::Config {
        cluster_name: "space".into(),
        heartbeat_interval: 150,
        election_timeout_min: 160,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_after_entries),
        max_in_snapshot_log_to_keep: 1_000,
        enable_pre_vote: Some(true),
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| ReplicaError::Raft {
            group: 0,
            reason: e.to_string(),
        })
}

/// This node's member of one shard group.
#[derive(Clone)]
pub struct GroupMember {
    /// Its Raft node.
    pub raft: ShardGroup,
    /// The replica engine its committed log drives.
    pub replica: EngineSlot,
    /// While it leads: the engine that serves the group's calls.
    pub leadership: Leadership,
    /// Its Raft log store (read: the bytes it keeps).
    pub log: LogStore,
}

/// Starts this node's member `id` of group `group`: its Raft log is log `group + 1` of
/// `host`'s write-ahead log (log 0 is a standalone engine's), its snapshots are kept in
/// `host`'s directory, and it reaches the other members through `router`. Whenever it
/// becomes the leader, a serving engine configured by `engine` starts (see
/// [`follow_leadership`]). Its log is kept within `engine.snapshot_after_bytes` bytes
/// beyond its snapshot (see `log_store::bound_log`). Blocks while it reads its
/// snapshot.
///
/// # Errors
/// [`ReplicaError`] when the log is already open, a stored file is damaged, or Raft
/// refuses the stored state.
pub async fn start_member(
    id: MemberId,
    group: GroupId,
    host: &Arc<LogHost>,
    router: &PeerRouter,
    raft: Arc<openraft::Config>,
    engine: EngineConfig,
) -> Result<GroupMember, ReplicaError> {
    let storage = |reason: String| ReplicaError::Storage { group, reason };
    let (log, image) = host
        .open_log(group + 1)
        .map_err(|e| storage(e.to_string()))?;
    let store = LogStore::open(log, image).map_err(|e| storage(e.to_string()))?;
    let machine = StateMachine::open(group, Some(host), engine.clone())
        .map_err(|e| storage(e.to_string()))?;
    let replica = machine.engine();
    let leadership = machine.leadership();
    let snapshot = machine.snapshot_size();
    let raft = ShardGroup::new(id, raft, router.network(group), store.clone(), machine)
        .await
        .map_err(|e| ReplicaError::Raft {
            group,
            reason: e.to_string(),
        })?;
    tokio::spawn(log_store::bound_log(
        raft.clone(),
        store.clone(),
        snapshot,
        engine.snapshot_after_bytes,
    ));
    tokio::spawn(follow_leadership(
        id,
        raft.clone(),
        replica.clone(),
        leadership.clone(),
        Some(host.clone()),
        engine,
    ));
    Ok(GroupMember {
        raft,
        replica,
        leadership,
        log: store,
    })
}

/// An `io::Error` for what a store finds wrong (openraft's storage traits speak
/// `io::Error`).
fn io_error(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(what.to_string())
}

#[cfg(test)]
mod tests;
