//! Claim waits a client may abandon by group.
//!
//! A cross-node take waits for a claim on every node at once. When one node answers with a
//! claim, the client sends [`Request::Abandon`](space_core::wire::Request::Abandon) for the
//! group to the others: a wait still waiting there answers `Claimed(None)` at once, and one
//! that already holds a claim answers with it, so the client hears every claim made on its
//! behalf and releases the extra ones at once. (Dropping the call instead would lose a claim
//! already on its way back, and the entry would sit claimed until the lease ran out.)
//!
//! The abandon may reach the node before its wait registers (a claim retried after a
//! reconnect arrives anew, on another connection), so an abandon for a group with no wait
//! leaves a mark that the wait finds when it registers; marks older than [`MARK_LIFETIME`]
//! are swept away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use space_core::wire::WaitGroup;
use tokio::sync::Notify;

/// How long an abandon that found no wait is remembered.
const MARK_LIFETIME: Duration = Duration::from_secs(10);
/// Marks are swept when the table holds more groups than this.
const SWEEP_ABOVE: usize = 1024;

struct Group {
    /// Signalled (a stored permit if nobody waits yet) when the group is abandoned.
    abandoned: Arc<Notify>,
    /// When an abandon left this as a mark; `None` while a wait owns it.
    marked_at: Option<Instant>,
}

/// The node's table of abandonable waits.
#[derive(Default)]
pub(crate) struct Waits {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    groups: HashMap<WaitGroup, Group>,
    /// The size at which old marks are swept next (doubling, so sweeps stay amortized
    /// however many waits are live).
    sweep_at: usize,
}

/// A registered wait; leaves the table when dropped (answered or cancelled).
pub(crate) struct Registered<'a> {
    waits: &'a Waits,
    group: WaitGroup,
    /// Completes when the group is abandoned (at once if it already was).
    pub(crate) abandoned: Arc<Notify>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waits.table.lock().groups.remove(&self.group);
    }
}

impl Waits {
    /// Registers a wait of `group`.
    pub(crate) fn register(&self, group: WaitGroup) -> Registered<'_> {
        let mut table = self.table.lock();
        let entry = table.groups.entry(group).or_insert_with(|| Group {
            abandoned: Arc::new(Notify::new()),
            marked_at: None,
        });
        entry.marked_at = None;
        Registered {
            waits: self,
            group,
            abandoned: entry.abandoned.clone(),
        }
    }

    /// Abandons `group`: wakes its wait, or marks it for a wait still to come.
    pub(crate) fn abandon(&self, group: WaitGroup) {
        let mut table = self.table.lock();
        if table.groups.len() > table.sweep_at.max(SWEEP_ABOVE) {
            let now = Instant::now();
            table
                .groups
                .retain(|_, g| g.marked_at.is_none_or(|t| now - t < MARK_LIFETIME));
            table.sweep_at = table.groups.len() * 2;
        }
        let entry = table.groups.entry(group).or_insert_with(|| Group {
            abandoned: Arc::new(Notify::new()),
            marked_at: Some(Instant::now()),
        });
        entry.abandoned.notify_one();
    }

    /// Groups in the table (waiting or marked).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abandon_wakes_its_wait() {
        let waits = Waits::default();
        let group = WaitGroup::new();
        let registered = waits.register(group);
        let other = waits.register(WaitGroup::new());
        waits.abandon(group);
        tokio::time::timeout(Duration::from_secs(5), registered.abandoned.notified())
            .await
            .expect("the abandoned wait wakes");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.abandoned.notified())
                .await
                .is_err(),
            "another group's wait keeps waiting"
        );
        drop(registered);
        drop(other);
        assert_eq!(waits.len(), 0, "answered waits leave the table");
    }

    #[tokio::test]
    async fn an_abandon_that_overtakes_its_wait_is_found_by_it() {
        let waits = Waits::default();
        let group = WaitGroup::new();
        waits.abandon(group);
        let registered = waits.register(group);
        tokio::time::timeout(Duration::from_secs(5), registered.abandoned.notified())
            .await
            .expect("the mark ends the wait at once");
    }

    #[test]
    fn old_marks_are_swept() {
        let waits = Waits::default();
        for _ in 0..=SWEEP_ABOVE {
            waits.abandon(WaitGroup::new());
        }
        for g in waits.table.lock().groups.values_mut() {
            g.marked_at = Some(Instant::now() - MARK_LIFETIME * 2);
        }
        let live = waits.register(WaitGroup::new());
        waits.abandon(WaitGroup::new());
        assert_eq!(
            waits.len(),
            2,
            "only the live wait and the newest mark stay"
        );
        drop(live);
    }
}
