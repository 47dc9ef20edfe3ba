//! Idle shard groups go quiet: their Raft timers stop, so that a shard nobody writes to
//! costs no CPU (openraft ticks every group every 30 ms and its leader heartbeats every
//! 150 ms, busy or not; at 64 shards that was most of what an idle node spent).
//!
//! How a group goes quiet and wakes (docs/ARCHITECTURE.md section 9):
//!
//! - Its leader looks at it once a second (`ShardSet::hush_idle`). When nothing was
//!   appended since the last look, and every replica has logged, committed and applied
//!   the whole log, it asks each follower to go quiet (`PeerService::quiesce`, naming the
//!   term, itself and the last entry). A follower agrees only when it follows that leader
//!   in that term and holds that same last entry, committed and applied, and stops its
//!   timers. Once every follower agreed, the leader stops its own, unless something
//!   happened in between ([`Hush::hush_if_still`]).
//! - Anything that touches a group wakes it ([`Hush::touch`]): a proposal, a read, a
//!   command's quorum check, a hand-over, and every message a peer sends for it (the
//!   leader's first append wakes its followers). A woken leader renews its lease (a
//!   round of heartbeats a majority answers) before it proposes: openraft refuses a
//!   proposal silently while the lease is out.
//! - A quiet follower does not notice its leader die by itself: the node's status polls
//!   do (`Members`). When a member stops answering, the shards it led wake on the other
//!   replicas, the first surviving replica at once and the next ones a little later (so
//!   that they do not split the vote); their election timers ran out long ago, so they
//!   elect at their first tick.
//! - A node that starts asks the other replicas of its shards to wake them
//!   (`PeerService::wake`), so that a quiet leader tells it at once that it leads rather
//!   than let it call an election.
//!
//! The meta group never goes quiet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use parking_lot::Mutex;

use super::ShardGroup;

/// One group's quiet state on this node. Shared by everything that touches the group.
pub struct Hush {
    raft: ShardGroup,
    /// Grows at every touch: a look that saw the group idle goes quiet only if nothing
    /// touched it since.
    activity: AtomicU64,
    /// Whether the group's timers are stopped.
    quiet: AtomicBool,
    /// When the group last woke (`None`: it never went quiet). Also the lock under which
    /// the timers are stopped and started.
    woken: Mutex<Option<Instant>>,
}

impl Hush {
    /// The quiet state of `raft`, awake.
    pub fn new(raft: ShardGroup) -> Hush {
        Hush {
            raft,
            activity: AtomicU64::new(0),
            quiet: AtomicBool::new(false),
            woken: Mutex::new(None),
        }
    }

    /// Notes activity on the group, and wakes it if it is quiet (its timers start again).
    /// Cheap when it is awake: one atomic add and one load.
    pub fn touch(&self) {
        self.activity.fetch_add(1, Ordering::SeqCst);
        if self.quiet.load(Ordering::SeqCst) {
            let mut woken = self.woken.lock();
            if self.quiet.swap(false, Ordering::SeqCst) {
                *woken = Some(Instant::now());
                self.raft.runtime_config().tick(true);
            }
        }
    }

    /// How much activity the group has seen: what [`Hush::hush_if_still`] compares.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::SeqCst)
    }

    /// Stops the group's timers, unless it was touched since [`Hush::activity`] said
    /// `seen`. Returns whether it is quiet now.
    pub fn hush_if_still(&self, seen: u64) -> bool {
        let _woken = self.woken.lock();
        // Quiet first, then the check: a touch either counted before the check (and this
        // undoes it) or sees the group quiet (and wakes it, once this lock is let go).
        self.quiet.store(true, Ordering::SeqCst);
        if self.activity.load(Ordering::SeqCst) != seen {
            self.quiet.store(false, Ordering::SeqCst);
            return false;
        }
        self.raft.runtime_config().tick(false);
        true
    }

    /// Whether the group's timers are stopped.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    /// How long ago the group last woke, if it ever went quiet.
    pub fn since_woken(&self) -> Option<Duration> {
        self.woken.lock().map(|at| at.elapsed())
    }
}

/// How recently a majority must have acknowledged a leader for it to propose without
/// renewing its lease first: openraft's lease is the longest election timeout (300 ms),
/// and a proposal made after it ran out is refused without a word.
const LEASE_FRESH: Duration = Duration::from_millis(200);

/// How long a leader waits for a majority to renew its lease before it proposes anyway
/// (a proposal the log then refuses gives the leadership up, see
/// `Session::note_committed`).
pub(super) const LEASE_RENEWAL_WAIT: Duration = Duration::from_secs(1);

/// Renews the leader's lease when a majority has not acknowledged it lately (a group that
/// was quiet): one round of heartbeats, answered by a majority. Cheap when the
/// lease is fresh (a look at the metrics).
pub(super) async fn renew_lease(raft: &ShardGroup) {
    let fresh = {
        let m = raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .voter_ids()
            .nth(1)
            .is_none()
            || m.last_quorum_acked
                .as_ref()
                .is_some_and(|at| openraft::Instant::elapsed(&**at) < LEASE_FRESH)
    };
    if !fresh {
        let renewed = raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
        let _ = tokio::time::timeout(LEASE_RENEWAL_WAIT, renewed).await;
    }
}
