//! The cluster's picture, for the admin page: which nodes answer, who leads each shard,
//! what the space holds, how fast requests are answered, how far subscribers lag, and what
//! changed lately.
//!
//! Every node with an admin listener draws the picture once a second ([`EVERY`]): it reads
//! its own counters, and asks every other member of its topology for theirs (`Stats` and
//! `Shards`, over the data port, each node through one kept connection). A member that does
//! not answer within [`PATIENCE`] is drawn as down. So the page shows the same cluster from
//! any node, and needs no node to be the one that is up. The last ten minutes of
//! operations per second and the last [`CHANGES_KEPT`] changes are kept in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use space_client::{ClientConfig, Connection};
use space_core::wire::{Request, Response, ShardInfo, Topology};
use space_core::{NodeId, Stats, TypeStats};
use tokio::sync::watch;

use crate::observed::Observed;

/// How often the picture is drawn again.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// How long a member has to answer before it is drawn as down.
const PATIENCE: Duration = Duration::from_millis(800);

/// Samples of operations per second kept: ten minutes, one per [`EVERY`].
const HISTORY_KEPT: usize = 600;

/// Changes kept, newest first.
const CHANGES_KEPT: usize = 50;

/// The cluster as one node sees it at one moment (what the admin page draws).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Picture {
    /// When it was drawn, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The node that drew it.
    pub me: u64,
    /// Whether the ranges are grouped into replicated shards.
    pub replicated: bool,
    /// Every member of the topology.
    pub nodes: Vec<NodePicture>,
    /// Every shard, with its leader as the freshest answer knows it (empty when the node
    /// is not replicated).
    pub shards: Vec<ShardPicture>,
    /// Entry types with entries, over the nodes that answered.
    pub types: Vec<TypeStats>,
    /// Requests answered per second over the nodes that answered, oldest first.
    pub history: Vec<Rate>,
    /// Recent changes, newest first.
    pub changes: Vec<Change>,
}

/// One member.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct NodePicture {
    pub id: u64,
    pub address: String,
    /// It answered this time.
    pub up: bool,
    /// Why it is drawn as down.
    pub reason: Option<String>,
    /// Shards it leads.
    pub leads: usize,
    /// Requests it answered per second since the last picture.
    pub ops_per_s: f64,
    pub entries: u64,
    pub bytes: u64,
    pub waiters: u64,
    pub connections: u64,
    pub subscriptions: u64,
    pub queued_events: u64,
    pub subscriber_lag: u64,
}

/// One shard.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ShardPicture {
    pub shard: u32,
    pub first_range: u32,
    pub last_range: u32,
    pub replicas: Vec<u64>,
    /// Its leader, when one is known and answers.
    pub leader: Option<u64>,
    pub term: u64,
    /// `led` (a leader, every replica up), `degraded` (a leader, a replica down) or
    /// `leaderless`.
    pub health: &'static str,
}

/// Requests answered per second at one moment.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Rate {
    pub at_ms: u64,
    pub ops_per_s: f64,
}

/// Something that changed between two pictures.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Change {
    pub at_ms: u64,
    pub what: String,
}

/// What one member answered.
struct Answer {
    stats: Stats,
    shards: Vec<ShardInfo>,
}

/// Draws the picture every [`EVERY`] and publishes it.
struct Painter {
    observed: Arc<dyn Observed>,
    /// One kept connection per member address.
    peers: HashMap<String, Arc<Connection>>,
    /// Each member's operations counter at the last picture.
    counted: HashMap<u64, (u64, Instant)>,
    history: VecDeque<Rate>,
    changes: VecDeque<Change>,
    last: Option<Picture>,
}

/// Starts drawing the picture; the receiver always holds the latest.
pub(crate) fn start(observed: Arc<dyn Observed>) -> watch::Receiver<Arc<Picture>> {
    let (tx, rx) = watch::channel(Arc::new(Picture::default()));
    let mut painter = Painter {
        observed,
        peers: HashMap::new(),
        counted: HashMap::new(),
        history: VecDeque::new(),
        changes: VecDeque::new(),
        last: None,
    };
    tokio::spawn(async move {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let picture = painter.draw().await;
            if tx.send(Arc::new(picture)).is_err() {
                return;
            }
        }
    });
    rx
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Painter {
    async fn draw(&mut self) -> Picture {
        let at_ms = now_ms();
        let topology = self.observed.topology().await.unwrap_or_else(|| Topology {
            epoch: 0,
            nodes: Vec::new(),
            owners: Vec::new(),
            failover: false,
            shards: 0,
        });
        let me = topology
            .nodes
            .iter()
            .find(|n| n.address == self.observed.address())
            .map_or(NodeId(0), |n| n.node);
        // Every member at once: this node from its own state, the others over the wire.
        let asks = topology.nodes.iter().map(|n| {
            let address = n.address.clone();
            let kept = self.peers.get(&address).cloned();
            let token = self.observed.token().map(str::to_owned);
            let observed = self.observed.clone();
            let mine = n.node == me;
            async move {
                if mine {
                    let stats = observed.stats().await.unwrap_or_default();
                    let shards = observed.shards().map(|(s, _)| s).unwrap_or_default();
                    return (address, None, Ok(Answer { stats, shards }));
                }
                let asked = tokio::time::timeout(PATIENCE, ask(&address, kept, token)).await;
                match asked {
                    Ok(Ok((conn, answer))) => (address, Some(conn), Ok(answer)),
                    Ok(Err(reason)) => (address, None, Err(reason)),
                    Err(_) => (
                        address,
                        None,
                        Err(format!("no answer within {} ms", PATIENCE.as_millis())),
                    ),
                }
            }
        });
        let answers = futures::future::join_all(asks).await;
        let mut by_address: HashMap<String, Result<Answer, String>> = HashMap::new();
        for (address, conn, answer) in answers {
            match conn {
                Some(conn) => {
                    self.peers.insert(address.clone(), conn);
                }
                None => {
                    self.peers.remove(&address);
                }
            }
            by_address.insert(address, answer);
        }

        let now = Instant::now();
        let mut nodes = Vec::with_capacity(topology.nodes.len());
        let mut total = Stats::default();
        let mut told: Vec<&ShardInfo> = Vec::new();
        for info in &topology.nodes {
            let id = info.node.0;
            let mut node = NodePicture {
                id,
                address: info.address.clone(),
                ..NodePicture::default()
            };
            match by_address.get(&info.address) {
                Some(Ok(answer)) => {
                    let s = &answer.stats;
                    node.up = true;
                    node.ops_per_s = match self.counted.insert(id, (s.operations, now)) {
                        Some((before, then)) => {
                            s.operations.saturating_sub(before) as f64
                                / now.duration_since(then).as_secs_f64().max(1e-3)
                        }
                        None => 0.0,
                    };
                    node.entries = s.entries;
                    node.bytes = s.bytes;
                    node.waiters = s.waiters;
                    node.connections = s.connections;
                    node.subscriptions = s.subscriptions;
                    node.queued_events = s.queued_events;
                    node.subscriber_lag = s.subscriber_lag;
                    total.add(s);
                    told.extend(answer.shards.iter());
                }
                Some(Err(reason)) => {
                    self.counted.remove(&id);
                    node.reason = Some(reason.clone());
                }
                None => node.reason = Some("not asked".into()),
            }
            nodes.push(node);
        }

        let up: BTreeMap<u64, bool> = nodes.iter().map(|n| (n.id, n.up)).collect();
        let shards = merge_shards(&told, &up);
        for node in &mut nodes {
            node.leads = shards.iter().filter(|s| s.leader == Some(node.id)).count();
        }
        let ops_per_s = nodes.iter().map(|n| n.ops_per_s).sum();
        self.history.push_back(Rate { at_ms, ops_per_s });
        while self.history.len() > HISTORY_KEPT {
            self.history.pop_front();
        }
        let mut picture = Picture {
            at_ms,
            me: me.0,
            replicated: !shards.is_empty(),
            nodes,
            shards,
            types: total.types,
            history: self.history.iter().copied().collect(),
            changes: Vec::new(),
        };
        for what in changes_between(self.last.as_ref(), &picture) {
            self.changes.push_front(Change { at_ms, what });
        }
        self.changes.truncate(CHANGES_KEPT);
        picture.changes = self.changes.iter().cloned().collect();
        self.last = Some(picture.clone());
        picture
    }
}

/// Asks the member at `address` for its counters and shards, over `kept` or a new
/// connection.
async fn ask(
    address: &str,
    kept: Option<Arc<Connection>>,
    token: Option<String>,
) -> Result<(Arc<Connection>, Answer), String> {
    let conn = match kept {
        Some(conn) => conn,
        None => {
            let config = ClientConfig {
                token,
                retry_for: Duration::ZERO,
                connect_timeout: PATIENCE,
                ..ClientConfig::default()
            };
            Connection::open(address, config)
                .await
                .map_err(|e| e.to_string())?
        }
    };
    let (stats, shards) = tokio::join!(conn.call(Request::Stats), conn.call(Request::Shards));
    let stats = match stats.map_err(|e| e.to_string())? {
        Response::Stats(s) => s,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let shards = match shards.map_err(|e| e.to_string())? {
        Response::Shards(s) => s,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    Ok((conn, Answer { stats, shards }))
}

/// Every shard once, from what the members told: the leader with the highest term that
/// is up (a leader that does not answer leads nothing any more).
fn merge_shards(told: &[&ShardInfo], up: &BTreeMap<u64, bool>) -> Vec<ShardPicture> {
    let mut best: BTreeMap<u32, &ShardInfo> = BTreeMap::new();
    for info in told {
        let alive = |s: &ShardInfo| s.leader.is_some_and(|l| up.get(&l.0) == Some(&true));
        let better = match best.get(&info.shard) {
            None => true,
            Some(held) => (alive(info), info.term) > (alive(held), held.term),
        };
        if better {
            best.insert(info.shard, info);
        }
    }
    best.into_values()
        .map(|s| {
            let leader = s.leader.map(|l| l.0).filter(|l| up.get(l) == Some(&true));
            let replicas: Vec<u64> = s.replicas.iter().map(|r| r.0).collect();
            let health = match leader {
                None => "leaderless",
                Some(_) if replicas.iter().all(|r| up.get(r) == Some(&true)) => "led",
                Some(_) => "degraded",
            };
            ShardPicture {
                shard: s.shard,
                first_range: s.first_range,
                last_range: s.last_range,
                replicas,
                leader,
                term: s.term,
                health,
            }
        })
        .collect()
}

/// What changed from `before` to `now`: members gone down or back up, shards whose leader
/// changed (one line per move from one leader to another).
fn changes_between(before: Option<&Picture>, now: &Picture) -> Vec<String> {
    let Some(before) = before else {
        return vec![format!(
            "node {} began watching {} nodes",
            now.me,
            now.nodes.len()
        )];
    };
    let mut said = Vec::new();
    let was_up: HashMap<u64, bool> = before.nodes.iter().map(|n| (n.id, n.up)).collect();
    for node in &now.nodes {
        match (was_up.get(&node.id), node.up) {
            (Some(true), false) => said.push(format!(
                "node {} ({}) is down: {}",
                node.id,
                node.address,
                node.reason.as_deref().unwrap_or("no answer")
            )),
            (Some(false), true) => {
                said.push(format!("node {} ({}) is up", node.id, node.address));
            }
            _ => {}
        }
    }
    let led_before: HashMap<u32, Option<u64>> =
        before.shards.iter().map(|s| (s.shard, s.leader)).collect();
    let mut moves: BTreeMap<(Option<u64>, Option<u64>), Vec<u32>> = BTreeMap::new();
    for shard in &now.shards {
        if let Some(was) = led_before.get(&shard.shard)
            && *was != shard.leader
        {
            moves
                .entry((*was, shard.leader))
                .or_default()
                .push(shard.shard);
        }
    }
    let name = |n: Option<u64>| n.map_or("no leader".to_owned(), |n| format!("node {n}"));
    for ((from, to), shards) in moves {
        let listed: Vec<String> = shards.iter().take(8).map(u32::to_string).collect();
        let more = shards.len().saturating_sub(8);
        said.push(format!(
            "{} {}{}: {} → {}",
            if shards.len() == 1 { "shard" } else { "shards" },
            listed.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            name(from),
            name(to)
        ));
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(shard: u32, leader: Option<u64>, term: u64) -> ShardInfo {
        ShardInfo {
            shard,
            first_range: shard * 16,
            last_range: shard * 16 + 15,
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            leader: leader.map(NodeId),
            term,
        }
    }

    #[test]
    fn a_shard_is_drawn_with_the_freshest_leader_that_answers() {
        let up: BTreeMap<u64, bool> = [(1, true), (2, true), (3, false)].into();
        // Node 1 still believes node 3 leads shard 0 (term 4); node 2 knows node 2
        // leads since term 5. Shard 1's only known leader is down.
        let (a, b, c) = (
            shard(0, Some(3), 4),
            shard(0, Some(2), 5),
            shard(1, Some(3), 2),
        );
        let merged = merge_shards(&[&a, &b, &c], &up);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].leader, merged[0].term), (Some(2), 5));
        assert_eq!(merged[0].health, "degraded");
        assert_eq!(merged[1].leader, None);
        assert_eq!(merged[1].health, "leaderless");
        // A stale answer of a higher term whose leader is down loses to a live one.
        let (d, e) = (shard(0, Some(3), 9), shard(0, Some(1), 6));
        let merged = merge_shards(&[&d, &e], &up);
        assert_eq!(merged[0].leader, Some(1));
    }

    #[test]
    fn changes_name_nodes_that_went_down_and_leaders_that_moved() {
        let node = |id, up| NodePicture {
            id,
            address: format!("a{id}"),
            up,
            reason: (!up).then(|| "connection refused".to_owned()),
            ..NodePicture::default()
        };
        let led = |shard, leader| ShardPicture {
            shard,
            first_range: 0,
            last_range: 0,
            replicas: vec![1, 2, 3],
            leader,
            term: 1,
            health: "led",
        };
        let before = Picture {
            nodes: vec![node(1, true), node(2, true)],
            shards: vec![led(0, Some(2)), led(1, Some(2)), led(2, Some(1))],
            ..Picture::default()
        };
        let now = Picture {
            nodes: vec![node(1, true), node(2, false)],
            shards: vec![led(0, Some(1)), led(1, Some(1)), led(2, Some(1))],
            ..Picture::default()
        };
        let said = changes_between(Some(&before), &now);
        assert_eq!(
            said,
            vec![
                "node 2 (a2) is down: connection refused".to_owned(),
                "shards 0, 1: node 2 → node 1".to_owned()
            ]
        );
        assert!(changes_between(Some(&now), &now).is_empty());
    }
}
