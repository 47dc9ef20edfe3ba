//! The static cluster: nodes started with the same member list agree on one topology (the
//! 1024 ranges split evenly in list order, with an epoch given at start), answer for the
//! ranges they own, and refuse keys of other ranges with a typed wrong-node error that
//! carries the epoch and the owner. Each node polls its peers' status (labels, room) so that
//! it can answer FindPlaceFor for the whole cluster.
//!
//! Replication, failover and joining at run time come later (docs/ARCHITECTURE.md section 9): the
//! topology already has their shape (ranges, owners, epoch).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use space_client::{ClientConfig, Connection};
use space_core::wire::{NodeInfo, NodeStatus, RangeSet, Request, Response, Topology, range_of};
use space_core::{Key, NodeId, SpaceError};

/// This node's place in the cluster.
pub(crate) struct Cluster {
    topology: Topology,
    me: usize,
    owned: Arc<RangeSet>,
    /// The latest status of each member (this node's own entry is filled on demand).
    status: Mutex<Vec<Option<NodeStatus>>>,
}

/// How often a node asks its peers for their status.
const POLL: Duration = Duration::from_millis(300);

impl Cluster {
    /// A cluster of the members `peers` (addresses, in order), this node being `me`.
    pub(crate) fn new(
        peers: &[String],
        me: usize,
        epoch: u64,
        labels: &[(String, String)],
    ) -> Cluster {
        let nodes: Vec<NodeInfo> = peers
            .iter()
            .enumerate()
            .map(|(i, address)| NodeInfo {
                node: NodeId(i as u64 + 1),
                address: address.clone(),
                labels: if i == me { labels.to_vec() } else { Vec::new() },
            })
            .collect();
        let topology = Topology::even(nodes, epoch);
        let owned = Arc::new(topology.ranges_of(me));
        Cluster {
            status: Mutex::new(vec![None; topology.nodes.len()]),
            topology,
            me,
            owned,
        }
    }

    /// A cluster of one: this node owns everything.
    pub(crate) fn single(info: NodeInfo) -> Cluster {
        let mut cluster = Cluster::new(std::slice::from_ref(&info.address), 0, 1, &info.labels);
        cluster.topology.nodes[0].node = info.node;
        cluster
    }

    /// The ranges this node owns.
    pub(crate) fn owned(&self) -> Arc<RangeSet> {
        self.owned.clone()
    }

    /// This node's id in the cluster.
    pub(crate) fn node(&self) -> NodeId {
        self.topology.nodes[self.me].node
    }

    /// The topology, with the labels learnt from the peers.
    pub(crate) fn topology(&self) -> Topology {
        Topology {
            nodes: (0..self.topology.nodes.len())
                .map(|i| self.member(i))
                .collect(),
            ..self.topology.clone()
        }
    }

    /// Member `i`, with the labels learnt from it.
    fn member(&self, i: usize) -> NodeInfo {
        let mut info = self.topology.nodes[i].clone();
        if let Some(s) = &self.status.lock()[i] {
            info.labels = s.info.labels.clone();
        }
        info
    }

    /// Refuses a key this node does not own.
    pub(crate) fn check(&self, key: &Key) -> Result<(), SpaceError> {
        if self.owned.contains(range_of(key)) {
            return Ok(());
        }
        Err(SpaceError::WrongNode {
            epoch: self.topology.epoch,
            owner: self.topology.owner_of(key).map(|n| n.address.clone()),
        })
    }

    /// The member owning `key`.
    pub(crate) fn owner(&self, key: &Key) -> Option<NodeInfo> {
        let i = self.topology.owner_of_range(range_of(key))?;
        Some(self.member(i))
    }

    /// A member with room for `size` more bytes that carries all of `labels`: the owner of
    /// `key` if one is given, else the one with the most room. `me` is this node's current
    /// status.
    pub(crate) fn place(
        &self,
        key: Option<&Key>,
        size: u64,
        labels: &[(String, String)],
        me: NodeStatus,
    ) -> Result<NodeInfo, SpaceError> {
        let mut statuses = self.status.lock().clone();
        statuses[self.me] = Some(me);
        let room = |s: &NodeStatus| {
            s.max_bytes
                .map_or(u64::MAX, |m| m.saturating_sub(s.held_bytes))
        };
        let fits =
            |s: &NodeStatus| labels.iter().all(|l| s.info.labels.contains(l)) && room(s) >= size;
        if let Some(key) = key {
            let owner = self
                .topology
                .owner_of_range(range_of(key))
                .unwrap_or(self.me);
            return match &statuses[owner] {
                Some(s) if fits(s) => Ok(s.info.clone()),
                Some(_) => Err(SpaceError::Full {
                    reason: format!(
                        "the owner of key {key} has no room for {size} bytes or lacks the labels {labels:?}"
                    ),
                }),
                None => Err(SpaceError::Unreachable {
                    node: self.topology.nodes[owner].address.clone(),
                    reason: "its status is not known yet".into(),
                }),
            };
        }
        statuses
            .iter()
            .flatten()
            .filter(|s| fits(s))
            .max_by_key(|s| room(s))
            .map(|s| s.info.clone())
            .ok_or_else(|| SpaceError::Full {
                reason: if labels.is_empty() {
                    format!("no node has room for {size} more bytes")
                } else {
                    format!("no node with the labels {labels:?} has room for {size} more bytes")
                },
            })
    }

    /// Polls the peers' status until the process ends.
    pub(crate) fn start_polling(self: &Arc<Self>, token: Option<String>) {
        for (i, node) in self.topology.nodes.iter().enumerate() {
            if i == self.me {
                continue;
            }
            let cluster = self.clone();
            let address = node.address.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let config = ClientConfig {
                    token,
                    retry_for: Duration::ZERO,
                    connect_timeout: Duration::from_secs(1),
                    ..ClientConfig::default()
                };
                let mut conn: Option<Arc<Connection>> = None;
                loop {
                    if conn.is_none() {
                        conn = Connection::open(&address, config.clone()).await.ok();
                    }
                    let status = match &conn {
                        Some(c) => match c.call(Request::NodeStatus).await {
                            Ok(Response::NodeStatus(s)) => Some(s),
                            _ => {
                                conn = None;
                                None
                            }
                        },
                        None => None,
                    };
                    cluster.status.lock()[i] = status;
                    tokio::time::sleep(POLL).await;
                }
            });
        }
    }
}
