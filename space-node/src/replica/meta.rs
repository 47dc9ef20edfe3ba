//! The meta group: one more Raft group on the same machinery as the shards (the node's
//! shared write-ahead log, snapshots, the peer transport, an engine as its state machine)
//! that holds the cluster's layout: its nodes, its shards with their ranges and replicas,
//! and the layout's version. Its voters are the first three nodes (all of them when
//! fewer); every other node replicates it as a learner. Its leader writes the layout it
//! was created with once, as an entry; a node forms its shard groups only once its replica
//! of the meta group has applied that entry and found it the layout the node holds, so
//! which nodes replicate which ranges is decided by the meta group alone (and who leads
//! each shard by the shard's own group).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use space_core::server::{Engine, LogHost};
use space_core::wire::{MetaGroupInfo, RANGES};
use space_core::{EngineConfig, Fields, Key, Lease, NodeId, SpaceError, Value};

use super::{GroupId, GroupMember, Layout, Member, MemberId, PeerRouter, ReplicaError};

/// The meta group's id: above every shard's (shards are numbered from 0 to at most 1023).
pub const META_GROUP: GroupId = RANGES;

/// The entry type and key of the layout entry in the meta group's engine.
const LAYOUT_TYPE: &str = "ClusterLayout";
const LAYOUT_KEY: &str = "layout";

/// The version of the layout the meta group is created with (layouts are fixed at
/// creation today; a change of membership would write the next).
const FIRST_VERSION: i64 = 1;

/// How often a node looks again while it waits for the meta group's layout.
const AGREEMENT_POLL: Duration = Duration::from_millis(50);

/// Most voters of the meta group.
const MAX_VOTERS: usize = 3;

/// The layout the meta group committed, as a replica applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedLayout {
    /// The layout.
    pub layout: Layout,
    /// Its version.
    pub version: u64,
}

/// This node's member of the meta group.
pub struct MetaGroup {
    member: GroupMember,
    layout: Layout,
    me: MemberId,
}

impl MetaGroup {
    /// Starts member `me`'s replica of the meta group of a cluster this node holds as
    /// `layout`, on `host` (recovered from its log and snapshot like a shard's).
    ///
    /// # Errors
    /// [`ReplicaError`] when its stored state cannot be read.
    pub async fn start(
        layout: &Layout,
        me: MemberId,
        host: &Arc<LogHost>,
        router: &PeerRouter,
        raft: Arc<openraft::Config>,
        mut engine: EngineConfig,
    ) -> Result<MetaGroup, ReplicaError> {
        // The meta group's engine holds the layout, not entries of any range.
        engine.ranges = None;
        let member = super::start_member(me, META_GROUP, host, router, raft, engine).await?;
        Ok(MetaGroup {
            member,
            layout: layout.clone(),
            me,
        })
    }

    /// Its Raft node.
    pub fn member(&self) -> &GroupMember {
        &self.member
    }

    /// The meta group's voters: the first `MAX_VOTERS` nodes of the layout.
    pub fn voters(layout: &Layout) -> Vec<MemberId> {
        (1..=layout.nodes.len().min(MAX_VOTERS) as MemberId).collect()
    }

    /// Creates the meta group, when this node is its first voter and it is not created
    /// yet: its voters form the group, and the first of them campaigns first.
    ///
    /// # Errors
    /// [`ReplicaError::Raft`] when Raft refuses.
    pub async fn create(&self) -> Result<(), ReplicaError> {
        let voters = Self::voters(&self.layout);
        if voters.first() != Some(&self.me)
            || self.member.raft.is_initialized().await.unwrap_or(false)
        {
            return Ok(());
        }
        let membership: BTreeMap<MemberId, Member> = voters
            .iter()
            .map(|id| (*id, self.layout.member(*id)))
            .collect();
        self.member
            .raft
            .initialize(membership)
            .await
            .map_err(|e| ReplicaError::Raft {
                group: META_GROUP,
                reason: e.to_string(),
            })
    }

    /// What the meta group's leader has to do, done once if this node leads it: write
    /// the layout when none is committed yet (and wait until it is), and add the nodes of
    /// the layout that are not members yet as learners, one after the other. Does nothing
    /// on a follower. Called while a node waits for the layout and then for as long as it
    /// runs, so that a leader elected after the layout was written adds the learners its
    /// predecessor did not.
    pub async fn tend(&self) {
        let Some(engine) = self.member.leadership.serving() else {
            return;
        };
        if engine.read_key(LAYOUT_TYPE, &layout_key()).is_none() {
            match write_layout(&engine, &self.layout) {
                Ok(()) => {
                    if let Err(e) = engine.flush().await {
                        tracing::warn!(error = %e, "the meta group did not commit the layout yet");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the meta group could not write the layout"),
            }
        }
        let members: Vec<MemberId> = {
            let metrics = self.member.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect()
        };
        let missing = (1..=self.layout.nodes.len() as MemberId).filter(|id| !members.contains(id));
        for id in missing {
            // One membership change at a time: each returns once it is committed. One
            // refused (the leadership moved) is left to the next look.
            if let Err(e) = self
                .member
                .raft
                .add_learner(id, self.layout.member(id), false)
                .await
            {
                tracing::debug!(error = %e, learner = id, "the meta group did not add a learner yet");
                break;
            }
        }
    }

    /// The layout the meta group committed, as this node's replica has applied it.
    ///
    /// # Errors
    /// [`ReplicaError::Layout`] when the entry there is not a layout.
    pub fn committed(&self) -> Result<Option<CommittedLayout>, ReplicaError> {
        let Some(doc) = self
            .member
            .replica
            .engine()
            .read_key(LAYOUT_TYPE, &layout_key())
        else {
            return Ok(None);
        };
        let bad = |what: &str| ReplicaError::Layout {
            reason: format!("the meta group's layout entry {what}"),
        };
        let version = match doc.fields.get("version") {
            Some(Value::I64(v)) => u64::try_from(*v).map_err(|_| bad("has a negative version"))?,
            _ => return Err(bad("has no version")),
        };
        let Some(Value::Str(text)) = doc.fields.get("layout") else {
            return Err(bad("holds no layout"));
        };
        let layout: Layout =
            serde_json::from_str(text).map_err(|e| bad(&format!("is not a layout: {e}")))?;
        Ok(Some(CommittedLayout { layout, version }))
    }

    /// Waits until this node's replica of the meta group has applied a layout, doing the
    /// leader's part meanwhile whenever this node leads the group. Returns once the
    /// committed layout is the one this node holds. Cancel-safe.
    ///
    /// # Errors
    /// [`ReplicaError::Layout`] when the meta group committed another layout (this node
    /// was created with other settings than the cluster); [`ReplicaError::Raft`] when
    /// the meta group's Raft node stopped.
    pub async fn agreed(&self) -> Result<CommittedLayout, ReplicaError> {
        loop {
            if let Some(committed) = self.committed()? {
                if committed.layout != self.layout {
                    return Err(ReplicaError::Layout {
                        reason: format!(
                            "the meta group committed a layout other than this node's: {:?}, not {:?}",
                            committed.layout, self.layout
                        ),
                    });
                }
                return Ok(committed);
            }
            if let Err(e) = &self.member.raft.metrics().borrow_watched().running_state {
                return Err(ReplicaError::Raft {
                    group: META_GROUP,
                    reason: e.to_string(),
                });
            }
            self.tend().await;
            tokio::time::sleep(AGREEMENT_POLL).await;
        }
    }

    /// The meta group as this node sees it.
    pub fn info(&self) -> MetaGroupInfo {
        let (voters, learners, leader, term) = {
            let metrics = self.member.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().map(NodeId).collect();
            let learners: Vec<NodeId> = membership.learner_ids().map(NodeId).collect();
            (
                voters,
                learners,
                m.current_leader.map(NodeId),
                m.current_term,
            )
        };
        let committed = self.committed().ok().flatten();
        MetaGroupInfo {
            voters,
            learners,
            leader,
            term,
            layout_version: committed.as_ref().map_or(0, |c| c.version),
            layout_fingerprint: committed.map_or(0, |c| c.layout.fingerprint()),
        }
    }

    /// Stops the member.
    pub async fn stop(&self) {
        let _ = self.member.raft.shutdown().await;
    }
}

fn layout_key() -> Key {
    Key::Name(LAYOUT_KEY.to_owned())
}

/// Writes `layout` as the layout entry, on the meta group leader's serving engine.
fn write_layout(engine: &Engine, layout: &Layout) -> Result<(), SpaceError> {
    let text = serde_json::to_string(layout).map_err(|e| SpaceError::Unavailable {
        reason: format!("the layout cannot be written out: {e}"),
    })?;
    let mut fields = Fields::new();
    fields.push("version", Value::I64(FIRST_VERSION));
    fields.push("layout", Value::Str(text));
    match engine.write(LAYOUT_TYPE, fields, Some(layout_key()), Lease::Forever) {
        Ok(_) | Err(SpaceError::KeyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
