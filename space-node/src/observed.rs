//! What the admin endpoints and the cluster's picture read of a node: a small trait the
//! server implements, so that neither depends on the server.

use futures::future::BoxFuture;
use space_core::Stats;
use space_core::wire::{MetaGroupInfo, ShardInfo, Topology};

use crate::replica::ShardProgress;

/// What the admin endpoints read of a node (the server implements it).
pub(crate) trait Observed: Send + Sync + 'static {
    /// The token admin requests must carry, if the node has one.
    fn token(&self) -> Option<&str>;
    /// The address clients reach the node at (as its topology names it).
    fn address(&self) -> &str;
    /// The cluster's topology as the node sees it.
    fn topology(&self) -> BoxFuture<'_, Option<Topology>>;
    /// The node's counters (what `Request::Stats` answers).
    fn stats(&self) -> BoxFuture<'_, Option<Stats>>;
    /// A replicated node's shards as it sees them, and how many it leads.
    fn shards(&self) -> Option<(Vec<ShardInfo>, usize)>;
    /// How far each shard this node replicates has come (empty when not replicated).
    fn progress(&self) -> Vec<ShardProgress>;
    /// Why the node is not ready to serve, if it is not.
    fn unready(&self) -> Option<String>;
    /// A replicated node's meta group as it sees it.
    fn meta_group(&self) -> Option<MetaGroupInfo>;
}
