//! The shard engines a request of a replicated node was handed, kept for the length of
//! the request's service (a task-local): its answer waits until what it did on each of
//! them is committed, even when a leadership ended meanwhile (docs/ARCHITECTURE.md
//! section 9, "Answers after a leadership ends").

use std::cell::RefCell;

use space_core::server::Engine;
use space_core::wire::range_of;
use space_core::{Key, SpaceError};

use crate::replica::{GroupId, ShardSet};

tokio::task_local! {
    /// The shard engines the request being served was handed: its answer waits until
    /// what it did there is committed, even if a leadership ended meanwhile.
    static USED: RefCell<Vec<(GroupId, Engine)>>;
}

/// Runs `request` (a request's whole service, answer included) keeping track of the
/// shard engines it is handed (see [`used`]).
pub(crate) async fn tracking_engines<T>(request: impl Future<Output = T>) -> T {
    USED.scope(RefCell::new(Vec::new()), request).await
}

/// Records that the request being served was handed `engine`, of shard `shard`.
pub(crate) fn note_used(shard: GroupId, engine: &Engine) {
    let _ = USED.try_with(|used| {
        let mut used = used.borrow_mut();
        if !used.iter().any(|(_, e)| e.same_as(engine)) {
            used.push((shard, engine.clone()));
        }
    });
}

/// The shard engines the request being served was handed so far, with their shards.
pub(crate) fn used() -> Vec<(GroupId, Engine)> {
    USED.try_with(|used| used.borrow().clone())
        .unwrap_or_default()
}

/// The engine serving `key` here, recorded as used by the request being served.
pub(crate) fn serving_for(shards: &ShardSet, key: &Key) -> Result<Engine, SpaceError> {
    let engine = shards.serving_for(key)?;
    note_used(shards.layout().shard_of_range(range_of(key)), &engine);
    Ok(engine)
}
