//! Lease expiry that happens without any caller: a heap of deadlines and one reaper thread
//! per engine that fires them.
//!
//! Timers are hints. When one fires, the engine checks the current state (the lease may
//! have been renewed, the entry taken, the claim committed) and does nothing if the
//! deadline no longer holds; otherwise it decides the expiry (or lapse) as a command. Reads never rely on the reaper: an entry whose lease has run
//! out is invisible from that instant, whether or not it has been removed yet.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::lease::{Clock, Deadline};

/// How long the reaper sleeps at most between looks at a manual clock (which moves
/// without telling anyone).
const MANUAL_CLOCK_POLL: Duration = Duration::from_millis(10);

struct Timer<K> {
    at: Deadline,
    id: u64,
    kind: K,
}

impl<K> PartialEq for Timer<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl<K> Eq for Timer<K> {}
impl<K> PartialOrd for Timer<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Timer<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.id).cmp(&(other.at, other.id))
    }
}

struct Heap<K> {
    timers: BinaryHeap<Reverse<Timer<K>>>,
    next_id: u64,
    shutdown: bool,
}

/// The deadline heap shared by the engine and its reaper thread; `K` says what a timer is
/// for. Deadlines are on the engine's [`Clock`].
pub(crate) struct Timers<K> {
    heap: Mutex<Heap<K>>,
    cv: Condvar,
    clock: Clock,
}

impl<K> Timers<K> {
    pub(crate) fn new(clock: Clock) -> Self {
        Timers {
            clock,
            heap: Mutex::new(Heap {
                timers: BinaryHeap::new(),
                next_id: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Arranges for `kind` to fire at `at`.
    pub(crate) fn schedule(&self, at: Deadline, kind: K) {
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
    pub(crate) fn wait_due(&self) -> Option<Vec<K>> {
        let mut heap = self.heap.lock();
        loop {
            if heap.shutdown {
                return None;
            }
            let now = self.clock.read();
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
                    let mut sleep = at.left_from(now);
                    if self.clock.is_manual() {
                        sleep = sleep.min(MANUAL_CLOCK_POLL);
                    }
                    self.cv.wait_for(&mut heap, sleep);
                }
                None if self.clock.is_manual() => {
                    self.cv.wait_for(&mut heap, MANUAL_CLOCK_POLL);
                }
                None => self.cv.wait(&mut heap),
            }
        }
    }

    /// Takes the timers that are due now, without waiting.
    #[cfg(test)]
    pub(crate) fn take_due(&self) -> Vec<K> {
        let now = self.clock.read();
        let mut heap = self.heap.lock();
        let mut due = Vec::new();
        while heap.timers.peek().is_some_and(|Reverse(t)| t.at <= now) {
            if let Some(Reverse(t)) = heap.timers.pop() {
                due.push(t.kind);
            }
        }
        due
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
