//! Leases: the timer that decides expiries and lapses as commands, renewals and cancels.

use super::*;

impl Engine {
    /// Schedules the expiry of entry `seq` of `cell`, if it has a lease.
    pub(super) fn expiry_timer(&self, cell: &Arc<TypeCell>, seq: u64, expires: Option<Deadline>) {
        if let Some(at) = expires {
            self.schedule(
                at,
                TimerKind::Entry {
                    cell: Arc::downgrade(cell),
                    seq,
                },
            );
        }
    }

    pub(super) fn claim_timer(
        &self,
        cell: &Arc<TypeCell>,
        seq: u64,
        token: u64,
        expires: Deadline,
    ) {
        self.schedule(
            expires,
            TimerKind::Claim {
                cell: Arc::downgrade(cell),
                seq,
                token,
            },
        );
    }

    /// Extends an entry's lease from now; returns the new expiry (`None`: forever).
    ///
    /// # Errors
    /// [`SpaceError::NotFound`] when no entry has this key (or it expired).
    pub fn renew(&self, entry_type: &str, key: &Key, lease: Lease) -> Result<Option<SystemTime>> {
        let now = self.now();
        let expires = lease.deadline(&now)?;
        self.with_live_entry(entry_type, key, &now, |cell, st, seq| {
            self.execute(st, Command::Renew { seq, expires });
            self.expiry_timer(cell, seq, expires);
            expires.map(Deadline::to_system_time)
        })
    }

    /// Cancels an entry's lease: the entry is removed at once, with an `Expired` event.
    ///
    /// # Errors
    ///
    /// `NotFound` when no visible entry has the key.
    pub fn cancel(&self, entry_type: &str, key: &Key) -> Result<()> {
        let now = self.now();
        self.with_live_entry(entry_type, key, &now, |_, st, seq| {
            self.expire(st, seq, Cause::Cancelled)
        })
    }

    /// Runs `f` on the entry with this key that has not expired (claimed or not).
    ///
    /// # Errors
    /// [`SpaceError::NotFound`] when there is none.
    pub(super) fn with_live_entry<R>(
        &self,
        entry_type: &str,
        key: &Key,
        now: &Now,
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState, u64) -> R,
    ) -> Result<R> {
        let not_found = || SpaceError::NotFound {
            entry_type: entry_type.to_owned(),
            key: key.clone(),
        };
        self.locked_if_exists(entry_type, |cell, st| {
            let seq = st
                .store
                .seq_of(key)
                .filter(|&seq| st.store.get(seq).is_some_and(|r| !r.expired(now)))
                .ok_or_else(not_found)?;
            Ok(f(cell, st, seq))
        })
        .unwrap_or_else(|| Err(not_found()))
    }

    /// Removes an entry whose lease ran out or was cancelled, with an `Expired` event.
    pub(super) fn expire(&self, st: &mut TypeState, seq: u64, cause: Cause) {
        let request = match cause {
            Cause::Cancelled => current_request(),
            _ => None,
        };
        self.execute(
            st,
            Command::Remove {
                seq,
                cause,
                request,
            },
        );
    }

    /// Carries out a lease timer that came due: the node's clock decides that an entry's
    /// lease or a claim ran out, and the decision enters the log as a command.
    pub(super) fn fire(&self, timer: TimerKind) {
        let now = self.now();
        match timer {
            TimerKind::Entry { cell, seq } => {
                let Some(cell) = cell.upgrade() else { return };
                let mut st = cell.lock();
                if st.store.get(seq).is_some_and(|r| r.expired(&now)) {
                    self.expire(&mut st, seq, Cause::Expired);
                }
            }
            TimerKind::Claim { cell, seq, token } => {
                let Some(cell) = cell.upgrade() else { return };
                let mut guard = cell.lock();
                let st = &mut *guard;
                let due = st
                    .store
                    .get(seq)
                    .and_then(|r| r.claim)
                    .is_some_and(|c| c.token == token && c.expires <= now.get());
                if due {
                    self.unclaim(&cell, st, seq, true, &now);
                }
            }
            TimerKind::Subscription { sub } => {
                let Some(sub) = sub.upgrade() else { return };
                if sub.expires().is_some_and(|e| e <= now.get()) {
                    self.expire_subscription(&sub);
                }
            }
            TimerKind::Logged { entry_type, id } => {
                self.locked_if_exists(&entry_type, |_, st| self.expire_logged(st, id, &now));
            }
        }
    }
}

/// The timer thread: fires every due lease timer in the engine it belongs to.
pub(super) fn reap(timers: &Timers<host::Due>) {
    while let Some(due) = timers.wait_due() {
        for (engine, timer) in due {
            if let Some(inner) = engine.upgrade() {
                Engine::internal(inner).fire(timer);
            }
        }
    }
}
