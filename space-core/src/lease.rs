//! Leases: how long an entry, claim or subscription lives.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime};

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
    pub(crate) fn deadline(self, now: &Now) -> Result<Option<Instant>> {
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
            Lease::For(d) => {
                now.get()
                    .checked_add(d)
                    .map(Some)
                    .ok_or_else(|| SpaceError::InvalidLease {
                        reason: "the lease ends beyond what the clock can represent".into(),
                    })
            }
        }
    }
}

/// "Now" for one operation, read from the clock at most once and only if needed: most
/// operations on entries without leases never look at the time.
pub(crate) struct Now(Cell<Option<Instant>>);

impl Now {
    pub(crate) fn new() -> Now {
        Now(Cell::new(None))
    }

    pub(crate) fn get(&self) -> Instant {
        match self.0.get() {
            Some(t) => t,
            None => {
                let t = Instant::now();
                self.0.set(Some(t));
                t
            }
        }
    }
}

/// Converts an internal deadline into wall-clock time for reporting.
pub(crate) fn wall_clock(deadline: Option<Instant>, now: &Now) -> Option<SystemTime> {
    deadline.map(|d| SystemTime::now() + d.saturating_duration_since(now.get()))
}

/// The deadline for a blocking call's timeout: `None` when it may wait forever.
pub(crate) fn timeout_deadline(now: &Now, timeout: Duration) -> Option<Instant> {
    now.get().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_leases_are_refused_with_a_reason() {
        let now = Now::new();
        assert!(Lease::For(Duration::ZERO).deadline(&now).is_err());
        let err = Lease::For(Duration::MAX).deadline(&now).unwrap_err();
        assert!(err.to_string().contains("Lease::Forever"), "{err}");
        assert_eq!(Lease::FOREVER.deadline(&now).unwrap(), None);
        assert_eq!(
            Lease::secs(1).deadline(&now).unwrap(),
            Some(now.get() + Duration::from_secs(1))
        );
    }
}
