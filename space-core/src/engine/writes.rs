//! Writes: deciding a new entry's command (sequence number, key, lease deadline, the
//! waiter it is handed to) and bringing entries back; indexes.

use super::*;

impl Engine {
    /// Makes sure the store of `entry_type` indexes `fields` (existing entries are indexed
    /// on the spot). Cheap when the same static slice was declared before.
    ///
    /// # Errors
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn declare_indexes(&self, entry_type: &str, fields: &'static [&'static str]) -> Result<()> {
        self.locked(entry_type, |cell, st| self.declare(cell, st, fields))
    }

    /// Declares `fields` as indexed, unless this very slice was declared on `cell` before.
    pub(super) fn declare(
        &self,
        cell: &TypeCell,
        st: &mut TypeState,
        fields: &'static [&'static str],
    ) {
        if fields.is_empty() {
            return;
        }
        let ptr = fields.as_ptr().cast_mut();
        if cell.declared.load(Ordering::Acquire) == ptr {
            return;
        }
        for f in fields {
            self.index(st, f);
        }
        cell.declared.store(ptr, Ordering::Release);
    }

    /// Adds an index on a top-level field of `entry_type`.
    ///
    /// # Errors
    /// [`SpaceError::Query`] for a field name no query could address, and
    /// [`SpaceError::Full`] when the type is new and the engine holds its maximum of types.
    pub fn create_index(&self, entry_type: &str, field: &str) -> Result<()> {
        space_query::validate_path(field)?;
        self.locked(entry_type, |_, st| self.index(st, field))
    }

    /// Indexes `field` of the locked type, unless it is indexed already.
    pub(super) fn index(&self, st: &mut TypeState, field: &str) {
        if !st.store.has_index(field) {
            self.execute(
                st,
                Command::Index {
                    field: field.to_owned(),
                },
            );
        }
    }

    /// Stores an entry. `key` is the user's routing key, or `None` to mint a UUID v7.
    /// Never blocks beyond the entry type's lock.
    ///
    /// # Errors
    /// [`SpaceError::InvalidLease`], [`SpaceError::FieldType`] when a field's kind
    /// differs from earlier entries of the type, [`SpaceError::KeyExists`].
    pub fn write(
        &self,
        entry_type: &str,
        fields: Fields,
        key: Option<Key>,
        lease: Lease,
    ) -> Result<Receipt> {
        self.write_indexed(entry_type, &[], fields, key, lease)
    }

    /// [`write`](Self::write) for an entry type that declares indexed fields (see
    /// [`declare_indexes`](Self::declare_indexes)).
    ///
    /// # Errors
    ///
    /// A document that does not fit its type (`FieldType`, `InvalidEntryType`, `Document`)
    /// or the limits (`TooLarge`, `Full`); a key that exists (`KeyExists`); an unusable lease.
    pub fn write_indexed(
        &self,
        entry_type: &str,
        indexes: &'static [&'static str],
        fields: Fields,
        key: Option<Key>,
        lease: Lease,
    ) -> Result<Receipt> {
        let now = self.now();
        let expires = lease.deadline(&now)?;
        check_document(entry_type, &fields)?;
        self.check_limits(entry_type, &[&fields])?;
        let key = NewKey::new(key);
        self.locked(entry_type, |cell, st| {
            self.declare(cell, st, indexes);
            let learn = Self::check_new(st, entry_type, &fields, key.user())?;
            Ok(self.insert_new(cell, st, fields, key, expires, learn, &now))
        })?
    }

    /// Stores several entries of one type: all of them, or (on any error) none. Logged
    /// as one record (one proposal when leading a replicated log), so a crash keeps all
    /// of them or none.
    ///
    /// # Errors
    ///
    /// As [`write_indexed`](Self::write_indexed), for any of the documents (then none is
    /// stored).
    pub fn write_all(
        &self,
        entry_type: &str,
        indexes: &'static [&'static str],
        entries: Vec<(Fields, Option<Key>)>,
        lease: Lease,
    ) -> Result<Vec<Receipt>> {
        let now = self.now();
        let expires = lease.deadline(&now)?;
        for (fields, _) in &entries {
            check_document(entry_type, fields)?;
        }
        self.check_limits(
            entry_type,
            &entries.iter().map(|(f, _)| f).collect::<Vec<_>>(),
        )?;
        let many = entries.len() > 1;
        self.locked(entry_type, |cell, st| {
            self.declare(cell, st, indexes);
            // Check everything first, so that an error leaves the space unchanged.
            let mut batch_keys = std::collections::HashSet::new();
            let mut learn = false;
            for (fields, key) in &entries {
                learn |= Self::check_new(st, entry_type, fields, key.as_ref())?;
                if let Some(k) = key
                    && !batch_keys.insert(k)
                {
                    return Err(SpaceError::KeyExists {
                        entry_type: entry_type.to_owned(),
                        key: k.clone(),
                    });
                }
            }
            // A logged batch is one record: a crash keeps all of it or none.
            let insert = |st: &mut TypeState| -> Vec<Receipt> {
                entries
                    .into_iter()
                    .map(|(fields, key)| {
                        self.insert_new(cell, st, fields, NewKey::new(key), expires, learn, &now)
                    })
                    .collect()
            };
            Ok(if many {
                self.batched(st, insert)
            } else {
                insert(st)
            })
        })?
    }

    /// Refuses entries over the size limit, or that would take the engine over its limits.
    pub(super) fn check_limits(&self, entry_type: &str, docs: &[&Fields]) -> Result<()> {
        let config = &self.inner.config;
        if config.max_entry_bytes.is_none()
            && config.max_entries.is_none()
            && config.max_bytes.is_none()
        {
            return Ok(());
        }
        let sizes: Vec<u64> = docs.iter().map(|f| f.approx_size() as u64).collect();
        if let Some(limit) = config.max_entry_bytes
            && let Some(&size) = sizes.iter().find(|&&s| s > limit)
        {
            return Err(SpaceError::TooLarge {
                entry_type: entry_type.to_owned(),
                size,
                limit,
            });
        }
        // A leading engine of a replicated node: the node's replicas hold what counts
        // (what this engine decided and the log has not committed yet is not in them:
        // the limits may be passed by what is in flight).
        let (held, bytes, holder) = match &config.holdings {
            Some(h) if self.inner.proposals.is_some() => (h.entries(), h.bytes(), "the node"),
            _ => (
                self.inner.totals.entries.load(Ordering::Relaxed),
                self.inner.totals.bytes.load(Ordering::Relaxed),
                "it",
            ),
        };
        if let Some(max) = config.max_entries
            && held + docs.len() as u64 > max
        {
            return Err(SpaceError::Full {
                reason: format!("{holder} holds {held} entries and its limit is {max}"),
            });
        }
        let size: u64 = sizes.iter().sum();
        if let Some(max) = config.max_bytes
            && bytes + size > max
        {
            return Err(SpaceError::Full {
                reason: format!("{holder} holds {bytes} bytes of entries and its limit is {max}"),
            });
        }
        if self.inner.proposals.is_some()
            && let Some(reason) = config
                .replicas_room
                .as_ref()
                .and_then(|r| r.refusal(docs.len() as u64, size))
        {
            return Err(SpaceError::Full { reason });
        }
        Ok(())
    }

    /// Bytes of documents held now, for placement decisions.
    pub fn held_bytes(&self) -> u64 {
        self.inner.totals.bytes.load(Ordering::Relaxed)
    }

    /// Entries held now (what `max_entries` bounds).
    pub fn held_entries(&self) -> u64 {
        self.inner.totals.entries.load(Ordering::Relaxed)
    }

    /// Checks a new entry against the type's schema and keys; returns whether it has
    /// fields the schema has not seen yet.
    pub(super) fn check_new(
        st: &TypeState,
        entry_type: &str,
        fields: &Fields,
        key: Option<&Key>,
    ) -> Result<bool> {
        let learn = st
            .store
            .check_kinds(fields)
            .map_err(|c| SpaceError::FieldType {
                entry_type: entry_type.to_owned(),
                field: c.field,
                expected: c.expected,
                found: c.found,
            })?;
        match key {
            Some(k) if st.store.contains_key(k) => Err(SpaceError::KeyExists {
                entry_type: entry_type.to_owned(),
                key: k.clone(),
            }),
            _ => Ok(learn),
        }
    }

    /// Brings a checked new entry into the space (see [`bring`](Self::bring)).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn insert_new(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        fields: Fields,
        key: NewKey,
        expires: Option<Deadline>,
        learn: bool,
        now: &Now,
    ) -> Receipt {
        let seq = st.store.upcoming_seq();
        let (key, mapped_key) = key.finish(seq, self.inner.config.ranges.as_deref());
        let receipt = Receipt {
            node: self.inner.config.node,
            key: key.clone(),
            version: 1,
            expires: expires.map(Deadline::to_system_time),
        };
        let record = Record {
            key,
            mapped_key,
            version: 1,
            fields,
            expires,
            claim: None,
            claims: 0,
        };
        self.bring(
            cell,
            st,
            seq,
            record,
            Bring::New {
                learn,
                request: current_request(),
            },
            now,
        );
        receipt
    }

    /// Brings `record` into the space as `seq` (a new entry, or one given back): announces
    /// it as written, gives every waiting reader a copy, and hands it to the taker or
    /// claimer that waited longest for it (the hand-off is part of the write's command);
    /// stores it otherwise.
    #[inline]
    pub(super) fn bring(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        record: Record,
        how: Bring,
        now: &Now,
    ) {
        let (learn, request, gives_back) = match how {
            Bring::New { learn, request } => (learn, request, None),
            Bring::Back { gives_back } => (false, None, gives_back),
        };
        self.serve_readers(st, &record);
        let waiter = self.first_waiting(st, &record.fields);
        let to = waiter.as_ref().map(|(waiter, lease)| match lease {
            None => HandOff::Taken {
                request: waiter.request,
            },
            Some(lease) => {
                let (token, expires) = self.claim_terms(*lease, now);
                HandOff::Claimed {
                    token,
                    expires,
                    request: waiter.request,
                }
            }
        });
        let expires = record.expires;
        let outcome = self.execute(
            st,
            Command::Write {
                seq,
                record,
                learn,
                to,
                request,
                gives_back,
            },
        );
        self.expiry_timer(cell, seq, expires);
        if let Some((waiter, _)) = waiter {
            self.hand_over(cell, st, seq, outcome, waiter, now);
        }
    }

    /// Gives a record that is stored and visible to the waiters: every waiting reader gets
    /// a copy, and the taker or claimer that waited longest gets the record itself (for a
    /// release, or a hand-off that fell through).
    pub(super) fn offer_stored(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        now: &Now,
    ) {
        let Some(record) = st.store.get(seq) else {
            return;
        };
        if !st.waiters.is_empty() {
            let record = record.clone();
            self.serve_readers(st, &record);
            if let Some((waiter, lease)) = self.first_waiting(st, &record.fields) {
                let command = match lease {
                    None => Command::Remove {
                        seq,
                        cause: Cause::Taken,
                        request: waiter.request,
                    },
                    Some(lease) => {
                        let (token, expires) = self.claim_terms(lease, now);
                        Command::Claim {
                            seq,
                            token,
                            expires,
                            request: waiter.request,
                        }
                    }
                };
                let outcome = self.execute(st, command);
                self.hand_over(cell, st, seq, outcome, waiter, now);
            }
        }
    }

    /// Delivers what applying a hand-off (a take or claim for `waiter`) gave: the taken
    /// record, or the claimed one still in the store. A waiter that gave up just before
    /// gets nothing, and the entry comes back as it was (by a command), for the next one.
    pub(super) fn hand_over(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        seq: u64,
        outcome: Outcome,
        waiter: Arc<Waiter>,
        now: &Now,
    ) {
        match outcome {
            Outcome::HandedOff(record) | Outcome::Removed(record) => {
                let taken = Taken {
                    entry_type: st.name.clone(),
                    seq,
                    record,
                    request: waiter.request,
                };
                match waiter.slot.offer(Delivery::Taken(taken)) {
                    Ok(wakeup) => st.wakes.push((waiter, wakeup)),
                    // The taker gave up meanwhile: the entry comes back where it was (told
                    // as written again), for the next one.
                    Err(Delivery::Taken(taken)) => {
                        let back = Bring::Back {
                            gives_back: taken.request,
                        };
                        self.bring(cell, st, seq, taken.record, back, now);
                    }
                    Err(_) => unreachable!("a slot gives back what it was offered"),
                }
            }
            Outcome::Stored | Outcome::Changed => {
                let Some(record) = st.store.get(seq) else {
                    return;
                };
                let claimed = state::claimed(&st.name, record);
                if let Some(c) = record.claim {
                    self.claim_timer(cell, seq, c.token, c.expires);
                }
                match waiter.slot.offer(Delivery::Claimed(claimed)) {
                    Ok(wakeup) => st.wakes.push((waiter, wakeup)),
                    Err(_) => self.unclaim(cell, st, seq, false, now),
                }
            }
            Outcome::Missing => {}
        }
    }

    /// Gives a copy of `record` to every waiting reader whose query it matches (they stop
    /// waiting); forgets waiters that gave up.
    pub(super) fn serve_readers(&self, st: &mut TypeState, record: &Record) {
        let mut i = 0;
        while i < st.waiters.len() {
            let waiter = st.waiters[i].clone();
            let is_matching_reader =
                matches!(waiter.mode, WaitMode::Read) && waiter.query.matches(&record.fields);
            if is_matching_reader || !waiter.slot.is_waiting() {
                st.waiters.remove(i);
            } else {
                i += 1;
            }
            if is_matching_reader {
                // A reader that gave up meanwhile just does not get its copy.
                if let Ok(wakeup) = waiter.slot.offer(Delivery::Copy(record.document())) {
                    st.wakes.push((waiter, wakeup));
                }
            }
        }
    }

    /// Takes out of the queue the taker or claimer that has waited longest for an entry
    /// with these fields, with its claim's lease (`None`: a taker).
    pub(super) fn first_waiting(
        &self,
        st: &mut TypeState,
        fields: &Fields,
    ) -> Option<(Arc<Waiter>, Option<Duration>)> {
        let i = st.waiters.iter().position(|w| {
            !matches!(w.mode, WaitMode::Read) && w.slot.is_waiting() && w.query.matches(fields)
        })?;
        let waiter = st.waiters.remove(i)?;
        let lease = match waiter.mode {
            WaitMode::Claim(lease) => Some(lease),
            WaitMode::Read | WaitMode::Take => None,
        };
        Some((waiter, lease))
    }

    /// Gives back a document that was taken but could not be used (it did not decode into
    /// the caller's type): it is written again with the same key and fields, so nothing is
    /// lost. It goes to the back of the order and keeps no lease.
    ///
    /// # Errors
    ///
    /// As [`write_indexed`](Self::write_indexed).
    pub fn put_back(&self, entry_type: &str, document: Document) -> Result<Receipt> {
        self.write(
            entry_type,
            document.fields,
            Some(document.key),
            Lease::Forever,
        )
    }

    /// Undoes what request `id` took or claimed, as this engine's answers record it: puts
    /// back what it took or committed (that is not back yet), releases what it claimed
    /// (if the claim still holds). For a caller that gave the request up without its
    /// answer: on a replicated shard, the leader of the moment gives back what an earlier
    /// leader took, once, however often it is asked. Returns whether the request is known
    /// here (its answer is kept).
    ///
    /// Does not block. Only an engine that keeps answers (durable, replicated) knows
    /// requests; any other returns `false`.
    pub fn give_back(&self, id: RequestId) -> bool {
        if !self.inner.keeps_answers {
            return false;
        }
        let what = self.inner.answers.lock().to_give_back(id);
        match what {
            GiveBack::Entries(taken) => self.untake(taken),
            // Fails only if the claim already ended, and then the entry is back anyway.
            GiveBack::Claim(ticket) => drop(self.release(&ticket)),
            GiveBack::Nothing => return self.inner.answers.lock().contains(id),
        }
        true
    }

    /// The callers of `ids` acknowledged their answers: the entries those answers hold
    /// (what the requests took, committed or claimed) are dropped from this engine's
    /// answers, through a logged command so that every replica and a recovery drop them
    /// alike, and a request sent again with one of the ids is answered
    /// [`SpaceError::Acknowledged`](crate::SpaceError::Acknowledged). Ids whose answers
    /// hold less than [`ACKNOWLEDGE_FROM_BYTES`](crate::state::ACKNOWLEDGE_FROM_BYTES) of
    /// entries, or are not kept here, are passed over (kept for their usual time).
    /// Returns how many answers were acknowledged.
    ///
    /// Does not block, and waits for nothing: an acknowledgement the log never commits
    /// (its leader stepped down) leaves the answers as they were, kept for their usual
    /// time. Only an engine that decides (durable, or leading a replicated log) logs
    /// acknowledgements; any other returns 0.
    pub fn acknowledge(&self, ids: &[RequestId]) -> usize {
        let decides = self.inner.proposals.is_some() || self.log_to().is_some();
        if !self.inner.keeps_answers || !decides {
            return 0;
        }
        // One command per entry type, under that type's lock (where every command of the
        // type is logged and applied, in order).
        let mut by_type: Vec<(Arc<str>, Vec<RequestId>)> = Vec::new();
        {
            let answers = self.inner.answers.lock();
            for &id in ids {
                let Some((entry_type, bytes)) = answers.holding(id) else {
                    continue;
                };
                if bytes < crate::state::ACKNOWLEDGE_FROM_BYTES {
                    continue;
                }
                match by_type.iter_mut().find(|(t, _)| *t == entry_type) {
                    Some((_, requests)) => requests.push(id),
                    None => by_type.push((entry_type, vec![id])),
                }
            }
        }
        let mut acknowledged = 0;
        for (entry_type, requests) in by_type {
            let count = requests.len();
            // The type is there again if it was emptied and swept out meanwhile (as a
            // give-back puts it back).
            let done = self.locked_in(&entry_type, Room::Always, |_, st| {
                self.execute(st, Command::Acknowledged { requests });
            });
            if done.is_ok() {
                acknowledged += count;
            }
        }
        acknowledged
    }

    /// Puts entries that were taken back where they were (same key, place in the order,
    /// lease), announced as written and offered to waiting takers: for a take whose caller
    /// went away before it received them. An entry whose user key meanwhile belongs to a
    /// newer entry is not put back twice; that is logged. An entry that a request with an
    /// id took is noted as given back in that request's answer, and one noted so already
    /// is not put back again.
    pub fn untake(&self, taken: Vec<Taken>) {
        for Taken {
            entry_type,
            seq,
            record,
            request,
        } in taken
        {
            let put_back = self.locked_in(&entry_type, Room::Always, |cell, st| {
                // Checked under the type's lock, where giving back is applied: two give-backs
                // of one request do not both put the entry back.
                if let Some(id) = request
                    && self.inner.keeps_answers
                    && self
                        .inner
                        .answers
                        .lock()
                        .given_back(id, &entry_type, &record.key)
                {
                    return;
                }
                let mut record = record;
                record.claim = None;
                if record.mapped_key && st.store.contains_key(&record.key) {
                    tracing::error!(
                        entry_type = %entry_type,
                        key = %record.key,
                        "an entry given back is not put back: its key was written again meanwhile"
                    );
                    return;
                }
                // Back in its place, unless the type was forgotten while empty and its
                // numbers started again: then at the end, found by its key.
                let seq = if st.store.get(seq).is_some() {
                    record.mapped_key = true;
                    st.store.upcoming_seq()
                } else {
                    seq
                };
                let now = self.now();
                let back = Bring::Back {
                    gives_back: request,
                };
                self.bring(cell, st, seq, record, back, &now);
            });
            // Only a bounded creation can fail, and this one is not bounded.
            debug_assert!(put_back.is_ok());
        }
    }
}

impl NewKey {
    pub(super) fn new(user: Option<Key>) -> NewKey {
        match user {
            Some(k) => NewKey::User(k),
            None => NewKey::Minted(uuid::Uuid::now_v7()),
        }
    }

    pub(super) fn user(&self) -> Option<&Key> {
        match self {
            NewKey::User(k) => Some(k),
            NewKey::Minted(_) => None,
        }
    }

    /// The final key, and whether the store must keep it in its key map. A minted key
    /// falls inside `ranges` when the engine owns only some.
    pub(super) fn finish(self, seq: u64, ranges: Option<&crate::hash::RangeSet>) -> (Key, bool) {
        match self {
            NewKey::User(k) => (k, true),
            NewKey::Minted(base) => {
                let key = match ranges {
                    Some(r) => Key::with_seq_in(base, seq, &|range| r.contains(range)),
                    None => Key::with_seq(base, seq),
                };
                match key {
                    Some(k) => (k, false),
                    None => (Key::Id(base), true),
                }
            }
        }
    }
}
