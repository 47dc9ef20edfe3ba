//! Lease expiry that happens without any caller: a heap of deadlines and one reaper thread
//! per engine that fires them.
//!
//! Timers are hints. When one fires, the engine checks the current state (the lease may
//! have been renewed, the entry taken, the claim committed) and does nothing if the
//! deadline no longer holds. Reads never rely on the reaper: an entry whose lease has run
//! out is invisible from that instant, whether or not it has been removed yet.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Weak;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::engine::Shard;
use crate::notify::SubShared;

/// What a timer is for.
pub(crate) enum TimerKind {
    /// An entry's lease.
    Entry { shard: Weak<Shard>, seq: u64 },
    /// A claim's lease.
    Claim {
        shard: Weak<Shard>,
        seq: u64,
        token: u64,
    },
    /// A subscription's lease.
    Subscription { sub: Weak<SubShared> },
}

struct Timer {
    at: Instant,
    id: u64,
    kind: TimerKind,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.id).cmp(&(other.at, other.id))
    }
}

struct Heap {
    timers: BinaryHeap<Reverse<Timer>>,
    next_id: u64,
    shutdown: bool,
}

/// The deadline heap shared by the engine and its reaper thread.
pub(crate) struct Timers {
    heap: Mutex<Heap>,
    cv: Condvar,
}

impl Timers {
    pub(crate) fn new() -> Self {
        Timers {
            heap: Mutex::new(Heap {
                timers: BinaryHeap::new(),
                next_id: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Arranges for `kind` to fire at `at`.
    pub(crate) fn schedule(&self, at: Instant, kind: TimerKind) {
        let mut heap = self.heap.lock();
        heap.next_id += 1;
        let id = heap.next_id;
        let earliest = heap.timers.peek().is_none_or(|Reverse(t)| at < t.at);
        heap.timers.push(Reverse(Timer { at, id, kind }));
        drop(heap);
        if earliest {
            self.cv.notify_one();
        }
    }

    /// Blocks until at least one timer is due and returns all due ones; `None` once the
    /// engine has shut down.
    pub(crate) fn wait_due(&self) -> Option<Vec<TimerKind>> {
        let mut heap = self.heap.lock();
        loop {
            if heap.shutdown {
                return None;
            }
            let now = Instant::now();
            match heap.timers.peek().map(|Reverse(t)| t.at) {
                Some(at) if at <= now => {
                    let mut due = Vec::new();
                    while heap.timers.peek().is_some_and(|Reverse(t)| t.at <= now) {
                        if let Some(Reverse(t)) = heap.timers.pop() {
                            due.push(t.kind);
                        }
                    }
                    return Some(due);
                }
                Some(at) => {
                    self.cv.wait_until(&mut heap, at);
                }
                None => self.cv.wait(&mut heap),
            }
        }
    }

    /// Stops the reaper thread.
    pub(crate) fn shutdown(&self) {
        self.heap.lock().shutdown = true;
        self.cv.notify_all();
    }

    /// Number of pending timers (for statistics and tests).
    pub(crate) fn len(&self) -> usize {
        self.heap.lock().timers.len()
    }
}
