//! Shards: how the 1024 ranges are grouped into Raft groups and where their replicas
//! live ([`Layout`], fixed when the cluster is created and kept in the data directory),
//! and a node's members of all the shards it replicates ([`ShardSet`]), on one log host.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use space_core::server::{Answer, Engine, LogHost};
use space_core::wire::{
    MetaGroupInfo, NodeInfo, RANGES, RangeSet, RequestId, ShardInfo, Topology,
    first_range_of_shard, range_of, shard_of_range,
};
use space_core::{EngineConfig, Holdings, Key, NodeId, RoomCheck, SpaceError};

use super::meta::{META_GROUP, MetaGroup};
use super::{
    GroupId, GroupMember, Groups, Member, MemberId, PeerRouter, ReplicaError, ServingChanges,
};

/// The file a node keeps its cluster's layout in, in its data directory.
const LAYOUT_FILE: &str = "cluster.json";

/// How often a node looks for a shard to hand back to its preferred leader.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// How many looks in a row a returning preferred leader must be caught up before it is
/// handed the leadership: longer than a client takes to register its subscriptions on a
/// node that came back (it renews them every 10 s by default), so that the node does not
/// lead before it knows whom to tell of its shards' changes.
const HAND_BACK_AFTER: u32 = 15;

/// How long a shard's leader may go without a majority's acknowledgement before it
/// refuses new commands as having no quorum: over six heartbeats and three election
/// timeouts (a majority that is there answers every heartbeat).
const QUORUM_LOST_AFTER: Duration = Duration::from_secs(1);

/// How long a read waits for what it saw on a shard to be committed before it is
/// refused (a leader cut off from its replicas commits nothing).
const READ_COMMIT_WAIT: Duration = Duration::from_secs(1);

/// How many entries a preferred leader's log may lack and still be handed the
/// leadership (the leader goes on appending while it hands over).
const HAND_BACK_LAG: u64 = 16;

/// The shape of a replicated cluster, fixed at its creation: its nodes (member id `i + 1`
/// is `nodes[i]`), how many shards the ranges are grouped into, and how many replicas
/// each shard has. Shard `s` holds ranges `s * 1024 / shards` up to
/// `(s + 1) * 1024 / shards`; its replicas are the `replication` nodes from position
/// `s mod nodes` on, so that replicas, and the first leaders, spread evenly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The nodes' addresses, in member-id order.
    pub nodes: Vec<String>,
    /// How many shards (Raft groups) the ranges are grouped into.
    pub shards: u32,
    /// Replicas per shard.
    pub replication: usize,
}

impl Layout {
    /// A layout of `nodes` in `shards` shards of `replication` replicas.
    ///
    /// # Errors
    /// [`ReplicaError::Layout`] when there are no nodes, a node is listed twice, the
    /// shard count is not between 1 and 1024, or the replication factor is not 1, 3 or 5
    /// or exceeds the number of nodes.
    pub fn new(
        nodes: Vec<String>,
        shards: u32,
        replication: usize,
    ) -> Result<Layout, ReplicaError> {
        let bad = |reason: String| Err(ReplicaError::Layout { reason });
        if nodes.is_empty() {
            return bad("a cluster needs at least one node".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = nodes.iter().find(|n| !seen.insert(*n)) {
            return bad(format!("node {twice} is listed twice"));
        }
        if !(1..=RANGES).contains(&shards) {
            return bad(format!("{shards} shards: between 1 and {RANGES}"));
        }
        if ![1, 3, 5].contains(&replication) {
            return bad(format!("replication factor {replication}: 1, 3 or 5"));
        }
        if replication > nodes.len() {
            return bad(format!(
                "replication factor {replication} needs at least {replication} nodes, not {}",
                nodes.len()
            ));
        }
        Ok(Layout {
            nodes,
            shards,
            replication,
        })
    }

    /// The ranges shard `shard` holds.
    pub fn ranges_of(&self, shard: GroupId) -> std::ops::Range<u32> {
        first_range_of_shard(shard, self.shards)..first_range_of_shard(shard + 1, self.shards)
    }

    /// The shard holding range `range`.
    pub fn shard_of_range(&self, range: u32) -> GroupId {
        shard_of_range(range, self.shards)
    }

    /// The members that replicate shard `shard`, the first one first.
    pub fn replicas(&self, shard: GroupId) -> Vec<MemberId> {
        let n = self.nodes.len();
        (0..self.replication)
            .map(|k| ((shard as usize + k) % n) as MemberId + 1)
            .collect()
    }

    /// The member id of the node at `addr`.
    pub fn member_id(&self, addr: &str) -> Option<MemberId> {
        self.nodes
            .iter()
            .position(|n| n == addr)
            .map(|i| i as MemberId + 1)
    }

    /// Member `id` as a Raft group knows it (its address; empty for an id not in the
    /// layout).
    pub fn member(&self, id: MemberId) -> Member {
        Member {
            addr: self.address(id).unwrap_or_default().to_owned(),
        }
    }

    /// The address of member `id`.
    pub fn address(&self, id: MemberId) -> Option<&str> {
        let i = usize::try_from(id.checked_sub(1)?).ok()?;
        self.nodes.get(i).map(String::as_str)
    }

    /// A fingerprint of the layout (its nodes, shard count and replication factor), the
    /// same on every node created with the same `--initial-cluster` and settings. Peers
    /// show it when they connect: a node whose layout differs (another cluster at a reused
    /// address, or a node created with other settings) is refused, since the same group
    /// id would name different ranges.
    pub fn fingerprint(&self) -> u64 {
        // The JSON of a layout is deterministic (fields in order, no maps), and xxHash64
        // is a fixed algorithm: fingerprints do not change between builds.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        twox_hash::XxHash64::oneshot(0, &bytes)
    }

    /// Keeps the layout in `dir` (written whole, then renamed into place).
    ///
    /// # Errors
    /// [`ReplicaError::Storage`] when it cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), ReplicaError> {
        let storage = |e: std::io::Error| ReplicaError::Storage {
            group: 0,
            reason: format!("{}: {e}", dir.join(LAYOUT_FILE).display()),
        };
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| storage(std::io::Error::other(e)))?;
        let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
        std::fs::write(&tmp, bytes).map_err(storage)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(storage)?;
        std::fs::rename(&tmp, dir.join(LAYOUT_FILE)).map_err(storage)?;
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(storage)
    }

    /// The layout kept in `dir`, if there is one.
    ///
    /// # Errors
    /// [`ReplicaError::Storage`] when the file cannot be read or is not a layout.
    pub fn load(dir: &Path) -> Result<Option<Layout>, ReplicaError> {
        let path = dir.join(LAYOUT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ReplicaError::Storage {
                    group: 0,
                    reason: format!("{}: {e}", path.display()),
                });
            }
        };
        let layout: Layout = serde_json::from_slice(&bytes).map_err(|e| ReplicaError::Storage {
            group: 0,
            reason: format!("{}: not a cluster layout: {e}", path.display()),
        })?;
        Layout::new(layout.nodes, layout.shards, layout.replication).map(Some)
    }
}

/// How far one shard's log has come on this node, from its Raft metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardProgress {
    /// The shard.
    pub shard: GroupId,
    /// The index of the last entry in this member's log.
    pub last_log: u64,
    /// The index of the last entry this member knows committed.
    pub committed: u64,
    /// The index of the last entry this member applied.
    pub applied: u64,
    /// Bytes of log entries this member keeps (in memory, to feed followers) from its
    /// purge point on.
    pub log_bytes: u64,
    /// When this member leads the shard: each follower, and how many entries of the
    /// leader's log it lacks.
    pub followers: Vec<(MemberId, u64)>,
}

/// The fewest bytes of log a group keeps beyond its snapshot, whatever the node's
/// budget (`EngineConfig::snapshot_after_bytes`) divided among its groups comes to.
const MIN_LOG_SHARE: u64 = 64 << 10;

/// A node's members of every shard it replicates and of the meta group, on one log host
/// (one write-ahead log and one timer thread for all of them) and one peer router.
pub struct ShardSet {
    layout: Layout,
    me: MemberId,
    /// The group holding the layout: shards are formed from what it committed.
    meta: MetaGroup,
    members: BTreeMap<GroupId, GroupMember>,
    groups: Groups,
    changes: ServingChanges,
    /// What [`serving`](ShardSet::serving) last found, with the count of `changes` read
    /// before it looked: every call of every request asks, and the list changes only
    /// when a leadership starts or ends.
    serving: parking_lot::Mutex<(u64, Serving)>,
    /// What this node's replicas of every shard hold together.
    holdings: Holdings,
    /// The connections to the other members (for read indexes).
    router: PeerRouter,
    /// The node's data directory, which every group's log and snapshots are on.
    host: Arc<LogHost>,
}

/// The shards a node leads, with their serving engines, in shard order.
pub type Serving = Arc<[(GroupId, Engine)]>;

impl ShardSet {
    /// Starts member `me`'s part of `layout` on `host`: every shard it replicates,
    /// recovered from the host's write-ahead log and snapshots. Each shard's engines are
    /// configured by `engine`, minting keys inside the shard's ranges, and count what
    /// their replicas hold into one `Holdings` (`engine`'s, or a new one), so that
    /// `max_entries` and `max_bytes` bound the node, not each shard; `replicas_room`
    /// gives, for a shard's other replicas, the check of their nodes' room its leading
    /// engine makes (see [`EngineConfig::replicas_room`]).
    ///
    /// # Errors
    /// [`ReplicaError`] when a shard's stored state cannot be read or `me` is not in the
    /// layout.
    pub async fn start(
        layout: Layout,
        me: MemberId,
        host: &Arc<LogHost>,
        router: &PeerRouter,
        raft: Arc<openraft::Config>,
        mut engine: EngineConfig,
        replicas_room: &(dyn Fn(&[MemberId]) -> Option<RoomCheck> + Sync),
    ) -> Result<ShardSet, ReplicaError> {
        if layout.address(me).is_none() {
            return Err(ReplicaError::Layout {
                reason: format!("member {me} is not in the layout"),
            });
        }
        let groups = Groups::default();
        let changes = ServingChanges::default();
        // The node's bytes of log beyond snapshots, shared among its groups (the meta
        // group's among them).
        let replicated = (0..layout.shards)
            .filter(|shard| layout.replicas(*shard).contains(&me))
            .count() as u64;
        engine.snapshot_after_bytes =
            (engine.snapshot_after_bytes / (replicated + 1)).max(MIN_LOG_SHARE);
        // The layout is not what a node's limits count.
        let mut meta_engine = engine.clone();
        meta_engine.holdings = None;
        let holdings = engine.holdings.get_or_insert_default().clone();
        let meta = MetaGroup::start(&layout, me, host, router, raft.clone(), meta_engine).await?;
        groups.insert(META_GROUP, meta.member().raft.clone());
        let mut members = BTreeMap::new();
        for shard in 0..layout.shards {
            if !layout.replicas(shard).contains(&me) {
                continue;
            }
            // Keys a shard's engines mint fall inside the shard's ranges.
            let mut config = engine.clone();
            let others: Vec<MemberId> = layout
                .replicas(shard)
                .iter()
                .copied()
                .filter(|id| *id != me)
                .collect();
            config.replicas_room = replicas_room(&others);
            let ranges = layout.ranges_of(shard);
            config.ranges = Some(Arc::new(RangeSet(
                (0..RANGES).map(|r| ranges.contains(&r)).collect(),
            )));
            let member = super::start_member(me, shard, host, router, raft.clone(), config).await?;
            member.leadership.report_changes_to(changes.clone());
            groups.insert(shard, member.raft.clone());
            members.insert(shard, member);
        }
        Ok(ShardSet {
            layout,
            me,
            meta,
            members,
            groups,
            changes,
            serving: parking_lot::Mutex::new((u64::MAX, Arc::from([]))),
            holdings,
            router: router.clone(),
            host: host.clone(),
        })
    }

    /// Grows whenever this node starts or stops leading a shard: a call waiting across
    /// the shards served here ends when it changes, for its caller to ask again.
    pub fn changes(&self) -> &ServingChanges {
        &self.changes
    }

    /// Creates the meta group when this member is its first voter, waits until the meta
    /// group has committed the layout and this node's replica of it has applied it (as
    /// long as that takes: a quorum of the meta group's voters must be up), then creates
    /// the shards this member is first replica of (each becomes a Raft group of its
    /// replicas, and this member campaigns first, so first leaders spread like first
    /// replicas). A group already created is left as it is. Cancel-safe.
    ///
    /// # Errors
    /// [`ReplicaError::Layout`] when the meta group committed a layout other than this
    /// node's; [`ReplicaError::Raft`] when Raft refuses for another reason.
    pub async fn create(&self) -> Result<(), ReplicaError> {
        self.meta.create().await?;
        let agreed = self.meta.agreed().await?;
        for (shard, member) in &self.members {
            let replicas = agreed.layout.replicas(*shard);
            if replicas.first() != Some(&self.me) {
                continue;
            }
            let membership: BTreeMap<MemberId, Member> = replicas
                .iter()
                .map(|id| (*id, agreed.layout.member(*id)))
                .collect();
            if member.raft.is_initialized().await.unwrap_or(false) {
                continue;
            }
            member
                .raft
                .initialize(membership)
                .await
                .map_err(|e| ReplicaError::Raft {
                    group: *shard,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The node's data directory.
    pub fn host(&self) -> &Arc<LogHost> {
        &self.host
    }

    /// The meta group, as this node sees it.
    pub fn meta_group(&self) -> MetaGroupInfo {
        self.meta.info()
    }

    /// The groups, for the peer service to reach them.
    pub fn groups(&self) -> Groups {
        self.groups.clone()
    }

    /// This node's member of shard `shard`, if it replicates it.
    pub fn member(&self, shard: GroupId) -> Option<&GroupMember> {
        self.members.get(&shard)
    }

    /// Every shard this node replicates, with its member.
    pub fn members(&self) -> impl Iterator<Item = (GroupId, &GroupMember)> {
        self.members.iter().map(|(s, m)| (*s, m))
    }

    /// The leader of shard `shard` as this node last heard (none: unknown, or a shard
    /// this node does not replicate), and the shard's term.
    fn leader_of(&self, shard: GroupId) -> (Option<MemberId>, u64) {
        match self.members.get(&shard) {
            Some(m) => {
                let metrics = m.raft.metrics();
                let m = metrics.borrow_watched();
                (m.current_leader, m.current_term)
            }
            None => (None, 0),
        }
    }

    /// The leader and term of every shard, in shard order (see `leader_of`).
    fn leaders(&self) -> impl Iterator<Item = (Option<MemberId>, u64)> + '_ {
        (0..self.layout.shards).map(|shard| self.leader_of(shard))
    }

    /// The routing epoch of `leaders` (every shard's leader and term): the sum of the
    /// terms, so it grows whenever a leader changes.
    fn epoch_of(leaders: impl Iterator<Item = (Option<MemberId>, u64)>) -> u64 {
        leaders.map(|(_, term)| term).sum()
    }

    /// The routing epoch as this node sees it (see `epoch_of`).
    pub fn epoch(&self) -> u64 {
        Self::epoch_of(self.leaders())
    }

    /// The topology as this node sees it: every range's owner is its shard's leader (its
    /// first replica while unknown), at the epoch of those leaders (each shard's leader
    /// and term read once, together).
    pub fn topology(&self) -> Topology {
        let leaders: Vec<(Option<MemberId>, u64)> = self.leaders().collect();
        let epoch = Self::epoch_of(leaders.iter().copied());
        let owner_of_shard: Vec<u32> = leaders
            .iter()
            .zip(0..)
            .map(|(&(leader, _), shard)| {
                let owner = leader.unwrap_or_else(|| self.layout.replicas(shard)[0]);
                (owner - 1) as u32
            })
            .collect();
        let nodes = self
            .layout
            .nodes
            .iter()
            .enumerate()
            .map(|(i, address)| NodeInfo {
                node: NodeId(i as u64 + 1),
                address: address.clone(),
                labels: Vec::new(),
            })
            .collect();
        let owners = (0..RANGES)
            .map(|r| owner_of_shard[self.layout.shard_of_range(r) as usize])
            .collect();
        Topology {
            epoch,
            nodes,
            owners,
            // With one replica, a shard whose node is lost has nobody to elect.
            failover: self.layout.replication > 1,
            shards: self.layout.shards,
        }
    }

    /// How far each shard this node replicates has come here, with each follower's lag
    /// for the shards it leads.
    pub fn progress(&self) -> Vec<ShardProgress> {
        self.members
            .iter()
            .map(|(shard, member)| {
                let metrics = member.raft.metrics();
                let m = metrics.borrow_watched();
                let last_log = m.last_log_index.unwrap_or(0);
                let followers = m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.iter()
                            .filter(|(id, _)| **id != self.me)
                            .map(|(id, matched)| {
                                let have = matched.as_ref().map_or(0, |l| l.index);
                                (*id, last_log.saturating_sub(have))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ShardProgress {
                    shard: *shard,
                    last_log,
                    committed: m.local_committed.as_ref().map_or(0, |l| l.index),
                    applied: m.last_applied.as_ref().map_or(0, |l| l.index),
                    log_bytes: member.log.kept_bytes(),
                    followers,
                }
            })
            .collect()
    }

    /// Every shard as this node sees it: its ranges, replicas, leader and term (leader
    /// unknown and term 0 for shards it does not replicate).
    pub fn shard_infos(&self) -> Vec<ShardInfo> {
        (0..self.layout.shards)
            .map(|shard| {
                let ranges = self.layout.ranges_of(shard);
                let (leader, term) = self.leader_of(shard);
                ShardInfo {
                    shard,
                    first_range: ranges.start,
                    last_range: ranges.end.saturating_sub(1),
                    replicas: self
                        .layout
                        .replicas(shard)
                        .iter()
                        .map(|m| NodeId(*m))
                        .collect(),
                    leader: leader.map(NodeId),
                    term,
                }
            })
            .collect()
    }

    /// The engine serving `key`'s shard here.
    ///
    /// # Errors
    /// [`SpaceError::WrongNode`] when this node does not lead that shard (now), with the
    /// leader's address when known; for a shard not replicated here, its first replica's
    /// (which knows the leader; with replication 1 it is the leader).
    pub fn serving_for(&self, key: &Key) -> Result<Engine, SpaceError> {
        let shard = self.layout.shard_of_range(range_of(key));
        if let Some(engine) = self
            .members
            .get(&shard)
            .and_then(|m| m.leadership.serving())
        {
            self.check_quorum(shard)?;
            return Ok(engine);
        }
        let (leader, term) = self.leader_of(shard);
        let replicated_here = self.members.contains_key(&shard);
        let owner = match leader {
            Some(leader) => Some(leader),
            None if !replicated_here => self.layout.replicas(shard).first().copied(),
            None => None,
        };
        Err(SpaceError::WrongNode {
            epoch: term,
            owner: owner
                .and_then(|l| self.layout.address(l))
                .map(str::to_owned),
        })
    }

    /// Refuses new commands for `shard`, which this node leads, when no majority of its
    /// replicas has acknowledged the leader for `QUORUM_LOST_AFTER`: they could not
    /// commit, and would wait out their caller's time. Refused, nothing is done, and the
    /// caller may try again (an election may give the shard a leader with a quorum).
    ///
    /// # Errors
    /// [`SpaceError::Unavailable`] naming the shard and how long it has been.
    pub fn check_quorum(&self, shard: GroupId) -> Result<(), SpaceError> {
        let Some(member) = self.members.get(&shard) else {
            return Ok(());
        };
        if self.layout.replication < 2 {
            return Ok(());
        }
        let metrics = member.raft.metrics();
        let silent = metrics
            .borrow_watched()
            .last_quorum_acked
            .as_ref()
            .map(|at| openraft::Instant::elapsed(&**at));
        match silent {
            Some(silent) if silent > QUORUM_LOST_AFTER => Err(SpaceError::Unavailable {
                reason: format!(
                    "shard {shard} has no quorum: no majority of its replicas answered its leader for {} ms",
                    silent.as_millis()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Confirms a read that the serving engines `used` (of shards this node leads)
    /// answered, before the answer goes out: reads are linearizable. For each engine,
    /// what the read saw is committed (it waits for the engine's proposals so far, up to
    /// `READ_COMMIT_WAIT`), so it never tells of a change a failover could undo; and
    /// then this node still leads the shard by openraft's leader lease (a majority
    /// acknowledged it within the last election timeout, so none of them can have
    /// elected another leader since the read, who might have changed what it saw). A
    /// lease read costs no message to the other replicas. Cancel-safe.
    ///
    /// # Errors
    /// [`SpaceError::WrongNode`] when a leadership ended first, or
    /// [`SpaceError::Unavailable`] when a shard's commit or lease cannot be confirmed in
    /// time: either way the read is not answered, and its caller asks again.
    pub async fn confirm_read(&self, used: &[(GroupId, Engine)]) -> Result<(), SpaceError> {
        self.confirm_each(used).await.into_iter().collect()
    }

    /// The shards of `used` whose engines confirm what was read from them
    /// ([`ShardSet::confirm_read`] shard by shard, all at once), in `used`'s order. For an
    /// answer made of parts per shard (a count, a read that found nothing), which keeps
    /// the confirmed parts and leaves the others to their shards' leaders of the moment.
    /// Cancel-safe.
    pub async fn confirmed(&self, used: &[(GroupId, Engine)]) -> Vec<GroupId> {
        used.iter()
            .zip(self.confirm_each(used).await)
            .filter_map(|((shard, _), confirmed)| confirmed.is_ok().then_some(*shard))
            .collect()
    }

    /// Whether each engine of `used` confirms what was read from it, in `used`'s order.
    async fn confirm_each(&self, used: &[(GroupId, Engine)]) -> Vec<Result<(), SpaceError>> {
        futures::future::join_all(
            used.iter()
                .map(|(shard, engine)| self.confirm(*shard, engine)),
        )
        .await
    }

    /// Confirms a read of `shard` from its serving `engine` (see
    /// [`ShardSet::confirm_read`]).
    async fn confirm(&self, shard: GroupId, engine: &Engine) -> Result<(), SpaceError> {
        match tokio::time::timeout(READ_COMMIT_WAIT, engine.flush()).await {
            Ok(committed) => committed?,
            Err(_) => {
                return Err(SpaceError::Unavailable {
                    reason: format!(
                        "shard {shard}: what a read saw was not committed within {} ms",
                        READ_COMMIT_WAIT.as_millis()
                    ),
                });
            }
        }
        let Some(member) = self.members.get(&shard) else {
            return Ok(());
        };
        member
            .raft
            .ensure_linearizable(openraft::ReadPolicy::LeaseRead)
            .await
            .map(|_| ())
            .map_err(|e| SpaceError::Unavailable {
                reason: format!(
                    "shard {shard}: this node's leadership cannot be confirmed for a read: {e}"
                ),
            })
    }

    /// The shards this node replicates.
    pub fn replicated(&self) -> Vec<GroupId> {
        self.members.keys().copied().collect()
    }

    /// This node's replica engine of `shard`: it applies the shard's committed log (a
    /// snapshot installed replaces it).
    pub fn replica_engine(&self, shard: GroupId) -> Option<Engine> {
        self.members.get(&shard).map(|m| m.replica.engine())
    }

    /// Whether this node serves `shard` now (leads it, with its serving engine started).
    pub fn leads(&self, shard: GroupId) -> bool {
        self.members
            .get(&shard)
            .is_some_and(|m| m.leadership.serving().is_some())
    }

    /// Bytes of documents this node holds in its replicas of every shard (what
    /// `--max-bytes` bounds).
    pub fn held_bytes(&self) -> u64 {
        self.holdings.bytes()
    }

    /// Entries this node holds in its replicas of every shard (what `--max-entries`
    /// bounds).
    pub fn held_entries(&self) -> u64 {
        self.holdings.entries()
    }

    /// The cluster's number of shards.
    pub fn shard_count(&self) -> u32 {
        self.layout.shards
    }

    /// The shards this node leads now, with their serving engines. Looked up again only
    /// after a leadership started or ended: the count of changes is read before the
    /// members are looked at, and a leadership changes before it is counted, so a list
    /// that missed a change is kept under an older count than the one that follows it.
    pub fn serving(&self) -> Serving {
        let count = self.changes.count();
        let mut kept = self.serving.lock();
        if kept.0 != count {
            let found: Serving = self
                .members
                .iter()
                .filter_map(|(s, m)| m.leadership.serving().map(|e| (*s, e)))
                .collect();
            *kept = (count, found);
        }
        kept.1.clone()
    }

    /// Indexes `fields` of `entry_type` in every shard this node leads. A client declares
    /// a type's indexes with its first write to a node, which goes to one shard: the
    /// others led here get them too (through their logs, so their replicas, and the next
    /// leaders that start from them, have them as well).
    ///
    /// # Errors
    /// [`SpaceError::Query`] for a field no query could address. A shard full of types is
    /// passed over: the write that goes there fails on its own when it adds the type, and
    /// one that goes elsewhere is no reason to fail.
    pub fn declare_indexes(&self, entry_type: &str, fields: &[String]) -> Result<(), SpaceError> {
        for (_, engine) in self.serving().iter() {
            for field in fields {
                match engine.create_index(entry_type, field) {
                    Ok(()) | Err(SpaceError::Full { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The first answer request `id` got, if a shard this node serves keeps it, with
    /// that shard and its serving engine: a request retried on a new leader is answered
    /// from here rather than run again. The serving engine's answers include changes not
    /// committed yet: the answer may go out only once the engine's changes are
    /// (`Engine::flush`).
    pub fn answer(&self, id: RequestId) -> Option<(GroupId, Engine, Answer)> {
        self.serving()
            .iter()
            .find_map(|(shard, e)| e.answer(id).map(|a| (*shard, e.clone(), a)))
    }

    /// As [`answer`](Self::answer), for a request sent again after its connection broke
    /// (it may have run before this node restarted, or on a shard it has stopped leading
    /// since): also looks in the replicas of the shards this node does not lead. A replica
    /// may lag (a restarted one replays its log before it learns how far the leader got),
    /// so each is read once it has applied its shard's read index, asked of the shard's
    /// leader (openraft's read index, confirmed by a majority): everything committed
    /// before, the first run's commands included if they ever will be, is applied then.
    /// All shards are looked at together; an answer from a replica is committed already
    /// (no engine to wait on).
    ///
    /// # Errors
    /// [`SpaceError::Unavailable`] when a shard's leader is not known, cannot be reached,
    /// or its replica here does not catch up within `within`: the outcome is unknown, and
    /// the caller revokes the request (every shard's leader undoes it).
    pub async fn answer_sent_again(
        &self,
        id: RequestId,
        within: std::time::Duration,
    ) -> Result<Option<(GroupId, Option<Engine>, Answer)>, SpaceError> {
        // One look at what this node serves, for the serving engines and the replicas
        // alike (not `answer`, which looks again): a shard that began to be served
        // between two looks would be missed by both.
        let serving = self.serving();
        if let Some(found) = serving
            .iter()
            .find_map(|(shard, e)| e.answer(id).map(|a| (*shard, Some(e.clone()), a)))
        {
            return Ok(Some(found));
        }
        let unknown = |shard: GroupId| SpaceError::Unavailable {
            reason: format!(
                "a request sent again may have been done by shard {shard}, whose leader could \
                 not be asked how far its log is committed: its outcome is not known here"
            ),
        };
        let looks = self
            .members
            .iter()
            .filter(|(shard, _)| !serving.iter().any(|(s, _)| s == *shard))
            .map(|(shard, member)| async move {
                let leader = member.raft.metrics().borrow_watched().current_leader;
                let leader = leader
                    .filter(|l| *l != self.me)
                    .ok_or_else(|| unknown(*shard))?;
                let index = self
                    .router
                    .read_index(leader, *shard, within)
                    .await
                    .map_err(|_| unknown(*shard))?;
                member
                    .raft
                    .wait(Some(within))
                    .applied_index_at_least(Some(index), "the leader's read index")
                    .await
                    .map_err(|_| unknown(*shard))?;
                Ok::<_, SpaceError>(member.replica.engine().answer(id).map(|a| (*shard, a)))
            });
        let mut answer = None;
        for found in futures::future::join_all(looks).await {
            if let Some((shard, a)) = found? {
                answer.get_or_insert((shard, None, a));
            }
        }
        Ok(answer)
    }

    /// The first answer request `id` got from shard `shard`, as this node's replica of
    /// the shard has applied it, once the replica has applied an entry of the shard's
    /// current leader (so that, after this node's leadership ended, every command of it
    /// that will ever be committed is applied here). Waits up to `within` for that. Only
    /// for a leadership that ended in this process: a restarted node's stored state
    /// can make an old leadership look current (see `answer_sent_again`).
    ///
    /// # Errors
    /// [`SpaceError::Unavailable`] when the shard is not replicated here or the replica
    /// does not get there within `within`.
    pub async fn settled_answer(
        &self,
        shard: GroupId,
        id: RequestId,
        within: std::time::Duration,
    ) -> Result<Option<Answer>, SpaceError> {
        let unknown = || SpaceError::Unavailable {
            reason: format!(
                "the leadership of shard {shard} changed and the request's outcome is not known yet"
            ),
        };
        let member = self.members.get(&shard).ok_or_else(unknown)?;
        let mut metrics = member.raft.metrics();
        let caught_up = async {
            loop {
                {
                    // An entry of the current leader applied: everything committed
                    // before its leadership is applied too (term alone does not name a
                    // leadership: a term may have several leaders, one after the other).
                    // That leader is another member, or this one serving a later
                    // leadership: one that gave its term up (`Leadership::lost_proposal`)
                    // may still be the leader of that term, committing what it proposed.
                    let m = metrics.borrow_watched();
                    let applied = m
                        .last_applied
                        .map(|l| (l.leader_id.term, l.leader_id.node_id));
                    let leader = m.current_leader.map(|l| (m.current_term, l));
                    let moved_on = leader.is_some_and(|(term, l)| {
                        l != self.me || member.leadership.term() == Some(term)
                    });
                    if moved_on && applied == leader {
                        return true;
                    }
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(within, caught_up).await {
            Ok(true) => Ok(member.replica.engine().answer(id)),
            _ => Err(unknown()),
        }
    }

    /// One look for a shard to hand back: the first shard this node leads whose preferred
    /// leader (its first replica: first replicas spread evenly over the nodes) is another
    /// node whose log is within [`HAND_BACK_LAG`] entries of the leader's, at
    /// [`HAND_BACK_AFTER`] looks in a row (`ready` counts them), is handed to it. Returns
    /// that shard.
    async fn hand_back_one(
        &self,
        ready: &mut BTreeMap<GroupId, u32>,
    ) -> Option<(GroupId, MemberId)> {
        let mut now_ready = BTreeMap::new();
        let mut handed = None;
        for (shard, member) in &self.members {
            let Some(&preferred) = self.layout.replicas(*shard).first() else {
                continue;
            };
            if preferred == self.me {
                continue;
            }
            let caught_up = {
                let m = member.raft.metrics();
                let m = m.borrow_watched();
                let leads = m.state == ServerState::Leader && m.current_leader == Some(self.me);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&preferred).cloned().flatten())
                    .map(|l| l.index);
                leads && matched.is_some_and(|i| i + HAND_BACK_LAG >= m.last_log_index.unwrap_or(0))
            };
            if !caught_up {
                continue;
            }
            let looks = ready.get(shard).copied().unwrap_or(0) + 1;
            now_ready.insert(*shard, looks);
            if handed.is_none()
                && looks >= HAND_BACK_AFTER
                && member
                    .raft
                    .trigger()
                    .transfer_leader(preferred)
                    .await
                    .is_ok()
            {
                handed = Some((*shard, preferred));
            }
        }
        *ready = now_ready;
        handed
    }

    /// Stops every member (Raft and serving engines), the meta group's too.
    pub async fn stop(&self) {
        for member in self.members.values() {
            let _ = member.raft.shutdown().await;
        }
        self.meta.stop().await;
    }
}

/// Hands leaderships back to their preferred leaders for as long as `set` runs: a node
/// that comes back after a failover moved its shards away gets its share of leaders
/// back, one shard per `REBALANCE_EVERY` from each node that holds more. Also does the
/// meta group leader's part when this node leads it (see `MetaGroup::tend`).
pub async fn rebalance(set: Weak<ShardSet>) {
    let mut ready = BTreeMap::new();
    loop {
        tokio::time::sleep(REBALANCE_EVERY).await;
        let Some(set) = set.upgrade() else {
            return;
        };
        set.meta.tend().await;
        if let Some((shard, to)) = set.hand_back_one(&mut ready).await {
            tracing::info!(
                shard,
                to,
                "handing a shard's leadership back to its preferred leader"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect()
    }

    #[test]
    fn shards_partition_the_ranges_and_spread_their_replicas() {
        for shards in [1, 3, 7, 64, 1000, 1024] {
            let layout = Layout::new(nodes(5), shards, 3).unwrap();
            let mut next = 0;
            for s in 0..shards {
                let r = layout.ranges_of(s);
                assert_eq!(r.start, next, "{shards} shards: shard {s} leaves a hole");
                assert!(!r.is_empty(), "{shards} shards: shard {s} is empty");
                next = r.end;
                for range in r {
                    assert_eq!(
                        layout.shard_of_range(range),
                        s,
                        "{shards} shards, range {range}"
                    );
                }
            }
            assert_eq!(next, RANGES);
        }
        let layout = Layout::new(nodes(3), 64, 3).unwrap();
        let mut first = [0; 3];
        for s in 0..64 {
            let replicas = layout.replicas(s);
            let distinct: std::collections::HashSet<_> = replicas.iter().collect();
            assert_eq!(distinct.len(), 3);
            first[replicas[0] as usize - 1] += 1;
        }
        assert!(first.iter().all(|n| (21..=22).contains(n)), "{first:?}");
        assert_eq!(layout.member_id("127.0.0.1:7001"), Some(2));
        assert_eq!(layout.address(3), Some("127.0.0.1:7002"));
        assert_eq!(layout.address(0), None);
        assert_eq!(layout.address(4), None);
    }

    #[test]
    fn a_layout_is_checked_and_kept() {
        assert!(Layout::new(vec![], 64, 1).is_err());
        assert!(Layout::new(nodes(3), 0, 3).is_err());
        assert!(Layout::new(nodes(3), 1025, 3).is_err());
        assert!(Layout::new(nodes(3), 64, 2).is_err());
        assert!(Layout::new(nodes(3), 64, 5).is_err());
        let mut twice = nodes(3);
        twice[2] = twice[0].clone();
        assert!(Layout::new(twice, 64, 3).is_err());

        let dir = space_tests::TempDir::new("layout");
        assert_eq!(Layout::load(&dir.0).unwrap(), None);
        let layout = Layout::new(nodes(5), 64, 5).unwrap();
        layout.save(&dir.0).unwrap();
        assert_eq!(Layout::load(&dir.0).unwrap(), Some(layout));
        std::fs::write(dir.0.join(LAYOUT_FILE), b"{\"nodes\": 3}").unwrap();
        assert!(matches!(
            Layout::load(&dir.0),
            Err(ReplicaError::Storage { .. })
        ));
    }
}
