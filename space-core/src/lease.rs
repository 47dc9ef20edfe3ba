//! Leases: how long an entry, claim or subscription lives.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SpaceError};

/// A time limit on an entry, a claim or a subscription. Leases can be renewed and
/// cancelled; expiry has the effect of cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lease {
    /// Lives until taken or cancelled.
    Forever,
    /// Lives for this long from the moment the space accepts the operation.
    For(Duration),
}

/// The longest finite lease accepted; anything longer is almost certainly a unit mistake
/// (use [`Lease::Forever`] to mean "no limit").
pub const MAX_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Lease {
    /// No time limit.
    pub const FOREVER: Lease = Lease::Forever;

    /// A lease of `secs` seconds.
    pub fn secs(secs: u64) -> Lease {
        Lease::For(Duration::from_secs(secs))
    }

    /// A lease of `ms` milliseconds.
    pub fn millis(ms: u64) -> Lease {
        Lease::For(Duration::from_millis(ms))
    }

    /// Checks the lease and turns it into a deadline from `now` (`None` for forever).
    ///
    /// # Errors
    /// [`SpaceError::InvalidLease`] for a zero lease or one longer than [`MAX_LEASE`].
    pub(crate) fn deadline(self, now: &Now) -> Result<Option<Deadline>> {
        match self {
            Lease::Forever => Ok(None),
            Lease::For(d) if d.is_zero() => Err(SpaceError::InvalidLease {
                reason: "a lease of zero would expire at once; give a positive duration".into(),
            }),
            Lease::For(d) if d > MAX_LEASE => Err(SpaceError::InvalidLease {
                reason: format!(
                    "a lease of {}s is longer than the maximum of {}s; use Lease::Forever for no limit",
                    d.as_secs(),
                    MAX_LEASE.as_secs()
                ),
            }),
            Lease::For(d) => now
                .after(d)
                .map(Some)
                .ok_or_else(|| SpaceError::InvalidLease {
                    reason: "the lease ends beyond what the clock can represent".into(),
                }),
        }
    }
}

/// A point in time on the wall clock, in milliseconds since the Unix epoch: how the state
/// and the log keep deadlines, so that they mean the same after a restart and on another
/// node. Deadlines are decided once (by the node's clock, when a command is decided) and
/// only compared afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct Deadline(u64);

impl Deadline {
    /// The deadline `ms` milliseconds after the Unix epoch.
    pub(crate) fn from_ms(ms: u64) -> Deadline {
        Deadline(ms)
    }

    /// The deadline in milliseconds after the Unix epoch.
    pub(crate) fn to_ms(self) -> u64 {
        self.0
    }

    /// The deadline as a wall-clock time, for reporting.
    pub(crate) fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    /// The time left from `now` until this deadline (zero once it passed).
    pub(crate) fn left_from(self, now: Deadline) -> Duration {
        Duration::from_millis(self.0.saturating_sub(now.0))
    }
}

/// Where the engine reads the time for the deadlines it decides (leases, claims) and the
/// expiries its timer proposes.
///
/// [`Clock::system`] (the default) reads the system's wall clock. [`Clock::manual`] stands
/// still until [`advance`](Clock::advance)d, for tests that must control when leases run
/// out. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that shows `start` until it is advanced.
    pub fn manual(start: SystemTime) -> Clock {
        let ms = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Clock(Some(Arc::new(AtomicU64::new(ms))))
    }

    /// Moves a manual clock forward by `by` (whole milliseconds); returns whether this clock
    /// is manual (the system clock cannot be moved).
    pub fn advance(&self, by: Duration) -> bool {
        match &self.0 {
            Some(ms) => {
                let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
                let _ = ms.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                    Some(m.saturating_add(by))
                });
                true
            }
            None => false,
        }
    }

    /// Whether this clock only moves when advanced.
    pub fn is_manual(&self) -> bool {
        self.0.is_some()
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        self.read().to_system_time()
    }

    pub(crate) fn read(&self) -> Deadline {
        match &self.0 {
            Some(ms) => Deadline(ms.load(Ordering::Acquire)),
            None => Deadline(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            ),
        }
    }
}

/// "Now" for one operation, read from the clock at most once and only if needed: most
/// operations on entries without leases never look at the time.
pub(crate) struct Now<'a> {
    clock: &'a Clock,
    at: Cell<Option<Deadline>>,
}

impl<'a> Now<'a> {
    pub(crate) fn new(clock: &'a Clock) -> Now<'a> {
        Now {
            clock,
            at: Cell::new(None),
        }
    }

    pub(crate) fn get(&self) -> Deadline {
        match self.at.get() {
            Some(t) => t,
            None => {
                let t = self.clock.read();
                self.at.set(Some(t));
                t
            }
        }
    }

    /// The deadline `d` from now, if the clock can represent it.
    pub(crate) fn after(&self, d: Duration) -> Option<Deadline> {
        let ms = u64::try_from(d.as_millis()).ok()?;
        self.get().0.checked_add(ms).map(Deadline)
    }
}

/// The deadline for a blocking call's timeout, on the monotonic clock (waiting is not part
/// of the state): `None` when it may wait forever.
pub(crate) fn timeout_deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_leases_are_refused_with_a_reason() {
        let clock = Clock::manual(SystemTime::now());
        let now = Now::new(&clock);
        assert!(Lease::For(Duration::ZERO).deadline(&now).is_err());
        let err = Lease::For(Duration::MAX).deadline(&now).unwrap_err();
        assert!(err.to_string().contains("Lease::Forever"), "{err}");
        assert_eq!(Lease::FOREVER.deadline(&now).unwrap(), None);
        assert_eq!(
            Lease::secs(1).deadline(&now).unwrap(),
            Some(Deadline(now.get().0 + 1000))
        );
    }
}
