//! What a node knows of the cluster's members for placement: each member's latest status
//! (its labels, the bytes it holds and its limit), polled every [`POLL`], so that any
//! node can answer FindPlaceFor for the whole cluster and fill the labels into the
//! topology it gives out. Which member owns which range is not decided here: a replicated
//! node reads it from its shards (their leaders, docs/ARCHITECTURE.md section 9), and a
//! standalone node owns everything.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use space_client::{ClientConfig, Connection};
use space_core::wire::{NodeInfo, NodeStatus, Request, Response, Topology};
use space_core::{RoomCheck, SpaceError};

/// The members (this node among them) and what was last heard from each.
pub(crate) struct Members {
    /// In member order (node id `i + 1` at `i`).
    nodes: Vec<NodeInfo>,
    /// Where each member is reached, when not at its listed address (`--peer-via`): its
    /// status is asked there, as its Raft messages go.
    via: Vec<Option<String>>,
    /// This node's index in `nodes`.
    me: usize,
    /// The latest status of each member (this node's own is filled on demand).
    status: Mutex<Vec<Option<NodeStatus>>>,
    /// The connection each other member's status was last asked on, while it answers.
    conns: Mutex<Vec<Option<Arc<Connection>>>>,
}

/// Bytes a member has room for, by its status.
fn room(s: &NodeStatus) -> u64 {
    s.max_bytes
        .map_or(u64::MAX, |m| m.saturating_sub(s.held_bytes))
}

/// Why a member, by its status, has no room for `entries` more entries holding `bytes`
/// bytes of documents (its `--max-entries`, then its `--max-bytes`); `None` if it has.
fn no_room(s: &NodeStatus, entries: u64, bytes: u64) -> Option<String> {
    let node = s.info.node.0;
    if let Some(max) = s.max_entries
        && s.held_entries.saturating_add(entries) > max
    {
        return Some(format!(
            "node {node} holds {} entries and its limit is {max}",
            s.held_entries
        ));
    }
    let max = s.max_bytes?;
    (room(s) < bytes).then(|| {
        format!(
            "node {node} holds {} bytes of entries and its limit is {max}",
            s.held_bytes
        )
    })
}

/// How often a node asks the other members for their status.
const POLL: Duration = Duration::from_millis(300);

impl Members {
    /// The members at `addresses` (in order, node ids 1, 2, ...), this node being the one
    /// at `me`, carrying `labels`; `routes` name members reached elsewhere (listed
    /// address, address to reach it at).
    pub(crate) fn new(
        addresses: &[String],
        me: usize,
        labels: &[(String, String)],
        routes: &[(String, String)],
    ) -> Members {
        let nodes: Vec<NodeInfo> = addresses
            .iter()
            .enumerate()
            .map(|(i, address)| NodeInfo {
                node: space_core::NodeId(i as u64 + 1),
                address: address.clone(),
                labels: if i == me { labels.to_vec() } else { Vec::new() },
            })
            .collect();
        let via = addresses
            .iter()
            .map(|a| {
                routes
                    .iter()
                    .find(|(member, _)| member == a)
                    .map(|(_, via)| via.clone())
            })
            .collect();
        Members {
            status: Mutex::new(vec![None; nodes.len()]),
            conns: Mutex::new(vec![None; nodes.len()]),
            nodes,
            via,
            me,
        }
    }

    /// A standalone node: the only member.
    pub(crate) fn single(info: NodeInfo) -> Members {
        Members {
            nodes: vec![info],
            via: vec![None],
            me: 0,
            status: Mutex::new(vec![None]),
            conns: Mutex::new(vec![None]),
        }
    }

    /// The topology of a standalone node: it owns every range.
    pub(crate) fn alone(&self) -> Topology {
        Topology::even(vec![self.nodes[self.me].clone()], 1)
    }

    /// `topology` (whose nodes are these members, in order) with each member's labels as
    /// last heard from it.
    pub(crate) fn labelled(&self, mut topology: Topology) -> Topology {
        let status = self.status.lock();
        for (i, node) in topology.nodes.iter_mut().enumerate() {
            if i == self.me {
                node.labels = self.nodes[i].labels.clone();
            } else if let Some(Some(s)) = status.get(i) {
                node.labels = s.info.labels.clone();
            }
        }
        topology
    }

    /// A member with room for one more entry of `size` bytes (under its `--max-entries`
    /// and `--max-bytes`) that carries all of `labels`: the owner
    /// of the key (`Some(index)`) if one is given, else the one of `candidates` (indexes)
    /// with the most room. `me` is this node's current status.
    pub(crate) fn place(
        &self,
        owner: Option<usize>,
        candidates: &[usize],
        size: u64,
        labels: &[(String, String)],
        me: NodeStatus,
    ) -> Result<NodeInfo, SpaceError> {
        let mut statuses = self.status.lock().clone();
        statuses[self.me] = Some(me);
        let fits = |s: &NodeStatus| {
            labels.iter().all(|l| s.info.labels.contains(l)) && no_room(s, 1, size).is_none()
        };
        if let Some(owner) = owner {
            return match statuses.get(owner) {
                Some(Some(s)) if fits(s) => Ok(s.info.clone()),
                Some(Some(s)) => Err(SpaceError::Full {
                    reason: match no_room(s, 1, size) {
                        Some(why) => format!("the key's owner has no room: {why}"),
                        None => format!(
                            "the key's owner (node {}) lacks the labels {labels:?}",
                            s.info.node.0
                        ),
                    },
                }),
                _ => Err(SpaceError::Unreachable {
                    node: self
                        .nodes
                        .get(owner)
                        .map_or_else(|| format!("member {owner}"), |n| n.address.clone()),
                    reason: "its status is not known yet".into(),
                }),
            };
        }
        candidates
            .iter()
            .filter_map(|&i| statuses.get(i).cloned().flatten())
            .filter(|s| fits(s))
            .max_by_key(room)
            .map(|s| s.info)
            .ok_or_else(|| SpaceError::Full {
                reason: if labels.is_empty() {
                    format!("no node has room for another entry of {size} bytes")
                } else {
                    format!(
                        "no node with the labels {labels:?} has room for another entry of {size} bytes"
                    )
                },
            })
    }

    /// Whether the members at `others` (indexes: the other replicas of a shard) have room
    /// for a write, under their `--max-entries` and `--max-bytes`, as last heard from them
    /// (every [`POLL`]: what was written since is not counted). A member whose status is
    /// not known yet is not held against it.
    pub(crate) fn room_check(self: &Arc<Self>, others: Vec<usize>) -> RoomCheck {
        let members: Weak<Members> = Arc::downgrade(self);
        RoomCheck::new(move |entries, size| {
            let members = members.upgrade()?;
            let status = members.status.lock();
            others.iter().find_map(|&i| {
                let s = status.get(i)?.as_ref()?;
                no_room(s, entries, size).map(|why| format!("a replica of the shard: {why}"))
            })
        })
    }

    /// The connections to the other members that answered their last status poll (where
    /// a node sends on what a client would have asked every member, such as a revoke).
    pub(crate) fn reached(&self) -> Vec<Arc<Connection>> {
        self.conns.lock().iter().flatten().cloned().collect()
    }

    /// Polls the other members' status, each where it is reached (its route, else its
    /// listed address), for as long as these members are held (the polling holds them
    /// weakly: it ends with the node).
    pub(crate) fn start_polling(self: &Arc<Self>, token: Option<String>) {
        for (i, node) in self.nodes.iter().enumerate() {
            if i == self.me {
                continue;
            }
            let members = Arc::downgrade(self);
            let address = self.via[i].clone().unwrap_or_else(|| node.address.clone());
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
                    let Some(held) = members.upgrade() else {
                        return;
                    };
                    held.status.lock()[i] = status;
                    held.conns.lock()[i] = conn.clone();
                    drop(held);
                    tokio::time::sleep(POLL).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status polling ends with the node: it does not keep the members alive.
    #[tokio::test]
    async fn polling_lets_go_of_the_members_when_the_node_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = listener.local_addr().unwrap().to_string();
        let addresses = ["127.0.0.1:1".to_owned(), other];
        let members = Arc::new(Members::new(&addresses, 0, &[], &[]));
        members.start_polling(None);
        // The polling tasks start and try the other member once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = Arc::downgrade(&members);
        drop(members);
        assert!(
            held.upgrade().is_none(),
            "a polling task still holds the members"
        );
    }
}
