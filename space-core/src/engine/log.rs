//! Opening a durable engine (recovery through the one apply), snapshots, durability
//! waits, and the answers the state keeps (docs/ARCHITECTURE.md section 8).

use super::*;

impl Engine {
    /// Rebuilds the state from a snapshot and the commands logged after it, replayed
    /// through [`state::apply`] in log order, then arms the lease timers: what lapsed while
    /// the node was down is expired by commands the timer decides, like any expiry.
    pub(super) fn recover_state(
        &self,
        snapshot: Snapshot,
        commands: Vec<(u64, Deadline, String, Command)>,
    ) {
        *self.inner.answers.lock() = snapshot.answers;
        for image in snapshot.types {
            let TypeImage {
                entry_type,
                next_seq,
                indexes,
                schema,
                records,
                subscriptions,
                ..
            } = image;
            self.each_type_always(&entry_type, |_, st| {
                for field in &indexes {
                    st.store.ensure_index(field);
                }
                st.store.set_schema(schema);
                st.store.skip_to(next_seq);
                for (seq, record) in records {
                    st.store.insert(seq, record);
                }
                for (subscription, next_seq) in subscriptions {
                    self.apply_subscribe(st, subscription, next_seq);
                }
            });
        }
        for (index, at, entry_type, command) in commands {
            self.each_type_always(&entry_type, |_, st| {
                self.apply(st, Some(index), Some(at), command);
            });
        }
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        for cell in cells {
            let st = cell.lock();
            for (seq, record) in st.store.iter() {
                self.expiry_timer(&cell, seq, record.expires);
                if let Some(claim) = record.claim {
                    self.claim_timer(&cell, seq, claim.token, claim.expires);
                }
            }
        }
    }

    /// Runs `f` on the locked store of `entry_type`, created past the limit of entry
    /// types if need be (what recovery brings back always has a place).
    pub(super) fn each_type_always(
        &self,
        entry_type: &str,
        f: impl FnOnce(&Arc<TypeCell>, &mut TypeState),
    ) {
        // Only a bounded creation can fail, and this one is not bounded.
        let _ = self.locked_in(entry_type, Room::Always, f);
    }

    /// The answer the request `id` got, if the state of this durable engine still keeps it
    /// (the answers of the last 65,536 requests that changed the space, across restarts):
    /// a node gives a request retried after a restart its first answer from here. An
    /// in-memory engine keeps none (its node's own table serves retries while it runs).
    pub fn answer(&self, id: RequestId) -> Option<Answer> {
        let mut answer = self.inner.answers.lock().get(id)?;
        if let Answer::Receipts(receipts) = &mut answer {
            for r in receipts {
                r.node = self.inner.config.node;
            }
        }
        Some(answer)
    }

    /// Every answer the state keeps, oldest first (see [`answer`](Self::answer)).
    pub fn answers(&self) -> Vec<(RequestId, Answer)> {
        let ids: Vec<RequestId> = self.inner.answers.lock().ids().collect();
        ids.into_iter()
            .filter_map(|id| self.answer(id).map(|a| (id, a)))
            .collect()
    }

    /// Whether changes are logged (to a data directory, or a replicated log this engine
    /// leads): calls then wait for [`flush`](Self::flush) before answering.
    pub fn is_durable(&self) -> bool {
        self.inner.durable.is_some() || self.inner.proposals.is_some()
    }

    /// Blocks until every change made so far is durable (no-op for an in-memory engine).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub fn flush_blocking(&self) -> Result<()> {
        if let Some(proposals) = &self.inner.proposals {
            return proposals.settled_blocking();
        }
        match self.durable_wal()? {
            Some(wal) => wal.wait_durable(wal.appended()),
            None => Ok(()),
        }
    }

    /// The write-ahead log to wait on: none for an in-memory engine, an error once closed.
    fn durable_wal(&self) -> Result<Option<&Arc<Wal>>> {
        match self.inner.wal() {
            Some(wal) if self.inner.closed.load(Ordering::Acquire) => Err(crate::wal::storage(
                wal.dir(),
                "the space was closed: this change is not logged",
            )),
            wal => Ok(wal),
        }
    }

    /// Waits until every change made so far is durable, without blocking a thread.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub async fn flush(&self) -> Result<()> {
        if let Some(proposals) = &self.inner.proposals {
            return proposals.settled().await;
        }
        match self.durable_wal()? {
            Some(wal) => wal.durable(wal.appended()).await,
            None => Ok(()),
        }
    }

    /// The state as a snapshot: every entry type with the log index its image is cut at
    /// (`cut()`, read under the type's lock), then the answers (taken after every cut, so
    /// they hold the answers of everything under them; those of commands above a cut are
    /// not recorded twice on replay, see `state::apply`). Floor and durable mark are 0.
    pub(super) fn capture(&self, cut: impl Fn() -> u64) -> Snapshot {
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut types = Vec::with_capacity(cells.len());
        for cell in cells {
            let st = cell.lock();
            let records = st.store.iter().map(|(seq, r)| (seq, r.clone())).collect();
            types.push(TypeImage {
                entry_type: cell.name.to_string(),
                next_seq: st.store.last_seq(),
                indexes: st.store.indexed_fields(),
                schema: st.store.schema(),
                cut: cut(),
                records,
                subscriptions: Self::logged_image(&st),
            });
        }
        #[cfg(test)]
        self.run_hook(|h| h.cut.clone());
        // Not in the middle of a batch (see `Inner::batches`).
        let answers = {
            let _no_batch = self.inner.batches.write();
            self.inner.answers.lock().clone()
        };
        Snapshot {
            next_token: self.inner.next_token.load(Ordering::Relaxed),
            types,
            answers,
            floor: 0,
            durable_to: 0,
        }
    }

    /// Writes a snapshot of everything and drops the log segments it makes unnecessary.
    /// Runs by itself when the log has grown; callable directly (tests, shutdown). Blocks
    /// while another checkpoint of the same log is being written.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when writing fails (the log is then kept).
    pub fn checkpoint(&self) -> Result<()> {
        let Some(durable) = &self.inner.durable else {
            return Ok(());
        };
        let _one_at_a_time = durable.checkpointing.lock();
        let (wal, log) = (&durable.wal, durable.log);
        let floor = wal.last_index(log);
        let mut snapshot = self.capture(|| wal.last_index(log));
        snapshot.floor = floor;
        snapshot.durable_to = wal.last_index(log);
        // The snapshot reflects only what the log already holds durably.
        wal.wait_durable(wal.appended())?;
        let bytes =
            crate::durable::write_snapshot(wal.dir(), log, &snapshot, self.inner.config.node)?;
        crate::durable::compact(wal, log, floor)?;
        self.inner.services.snapshot_written(bytes);
        Ok(())
    }
}
