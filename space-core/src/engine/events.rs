//! Notify: subscriptions of an entry type and the events told to them.

use super::*;

/// Tells the subscriptions of an entry type that want to hear `kind` about `record`
/// (numbered in the order the commands are applied, which is the log's order).
pub(super) fn announce(inner: &Inner, hub: &mut Hub, kind: EventKind, record: &Record) {
    let node = inner.config.node;
    hub.each_interested(kind, &record.fields, |sub| {
        let mark = EVENT_MARK.with(std::cell::Cell::get);
        sub.push(node, &record.key, kind, record.version, mark)
    });
}

thread_local! {
    /// The proposal whose commit releases the events told now (a serving engine of a
    /// replicated log sets it around applying each command it proposed; 0: none).
    pub(super) static EVENT_MARK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The event a command's outcome tells once it is applied, with the sequence number of
/// the record it concerns (a write is also told as written, before it is applied).
pub(super) fn after(command: &Command) -> Option<(EventKind, u64)> {
    match command {
        Command::Write {
            seq,
            to: Some(HandOff::Taken { .. }),
            ..
        } => Some((EventKind::Taken, *seq)),
        Command::Write {
            seq,
            to: Some(HandOff::Claimed { .. }),
            ..
        } => Some((EventKind::Claimed, *seq)),
        Command::Remove {
            seq,
            cause: Cause::Taken | Cause::Committed,
            ..
        } => Some((EventKind::Taken, *seq)),
        Command::Remove {
            seq,
            cause: Cause::Expired | Cause::Cancelled,
            ..
        } => Some((EventKind::Expired, *seq)),
        Command::Claim { seq, .. } => Some((EventKind::Claimed, *seq)),
        Command::Release { seq, .. } => Some((EventKind::Released, *seq)),
        Command::Write { to: None, .. }
        | Command::Renew { .. }
        | Command::RenewClaim { .. }
        | Command::Index { .. }
        | Command::Acknowledged { .. }
        | Command::Subscribe { .. }
        | Command::RenewSubscriptions { .. }
        | Command::Attach { .. }
        | Command::Unsubscribe { .. } => None,
        // Each of its commands tells its own (see `Engine::apply`).
        Command::Batch { .. } => None,
    }
}

impl Engine {
    /// Registers a subscription: every later change of a matching entry whose kind is in
    /// `kinds` is queued for it, numbered 1, 2, 3, ...
    ///
    /// # Errors
    ///
    /// A malformed query, an unusable lease, or too many subscriptions (`Busy`).
    pub fn subscribe(
        &self,
        query: &Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> Result<Subscription> {
        query.validate()?;
        let now = self.now();
        let expires = lease.deadline(&now)?;
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(
            SubShared::new(
                id,
                Arc::from(query.entry_type()),
                Arc::new(query.clone()),
                kinds,
                self.inner.config.queue_capacity,
                self.inner.events.clone(),
                expires,
            )
            .with_gate(self.inner.gate.clone()),
        );
        {
            let mut all = self.inner.subscriptions.lock();
            if let Some(max) = self.inner.config.max_subscriptions
                && all.len() >= max
            {
                return Err(SpaceError::Busy {
                    node: String::new(),
                    reason: format!("it holds its maximum of {max} subscriptions"),
                });
            }
            all.insert(id, shared.clone());
        }
        let added = self.locked(query.entry_type(), |_, st| {
            Self::check_kinds(st, query)?;
            st.hub.add(shared.clone())?;
            Ok(())
        });
        if let Err(e) = added.and_then(|r| r) {
            self.inner.subscriptions.lock().remove(&id);
            return Err(e);
        }
        if let Some(at) = expires {
            self.schedule(
                at,
                TimerKind::Subscription {
                    sub: Arc::downgrade(&shared),
                },
            );
        }
        Ok(Subscription::local(shared, Box::new(self.clone())))
    }

    /// Ends a subscription whose lease ran out: it is matched no more, but what it was
    /// told while alive is still delivered, and then its stream ends.
    pub(super) fn expire_subscription(&self, sub: &Arc<SubShared>) {
        self.remove_subscription(sub);
        sub.finish();
    }

    pub(super) fn remove_subscription(&self, sub: &Arc<SubShared>) {
        self.locked_if_exists(&sub.entry_type, |_, st| st.hub.remove(sub.id));
        let mut all = self.inner.subscriptions.lock();
        all.remove(&sub.id);
        crate::shrink_if_sparse(&mut all);
    }

    /// Picks up a subscription that was [detached](Subscription::detach) (a subscriber
    /// that went away): delivery restarts after `last_seq`, the last sequence number the
    /// subscriber saw (0 if none); events no longer in the subscription's log come back as
    /// one [`Notification::Gap`](crate::Notification::Gap).
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`] when no live subscription has this id (it was
    /// cancelled, or its lease ran out).
    pub fn resume(&self, id: u64, last_seq: u64) -> Result<Subscription> {
        let shared = self
            .inner
            .subscriptions
            .lock()
            .get(&id)
            .cloned()
            .ok_or(SpaceError::SubscriptionClosed { id })?;
        shared.rewind(last_seq);
        Ok(Subscription::local(shared, Box::new(self.clone())))
    }
}

impl Keeper for Engine {
    fn node(&self) -> NodeId {
        Engine::node(self)
    }

    fn renew_subscription(&self, sub: &Arc<SubShared>, lease: Lease) -> Result<()> {
        let expires = lease.deadline(&self.now())?;
        if sub.is_closed() {
            return Err(SpaceError::SubscriptionClosed { id: sub.id });
        }
        sub.set_expires(expires);
        if let Some(at) = expires {
            self.schedule(
                at,
                TimerKind::Subscription {
                    sub: Arc::downgrade(sub),
                },
            );
        }
        Ok(())
    }

    fn unsubscribe(&self, sub: &Arc<SubShared>) {
        self.remove_subscription(sub);
        sub.close();
    }
}
