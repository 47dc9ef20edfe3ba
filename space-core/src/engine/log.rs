//! Opening a durable engine (recovery through the one apply), snapshots, durability
//! waits, and the answers the state keeps (docs/ARCHITECTURE.md section 8).

use super::*;

impl Engine {
    /// Opens a durable engine on a data directory (created if missing): recovers what the
    /// directory holds (snapshot, then the operation log), and logs every change from now
    /// on. Operations are durable once [`flush`](Self::flush) (or the Space handle, which
    /// waits for it) returns. Blocks while it recovers.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] naming the file, for a directory in use by another process,
    /// a foreign or corrupt file, or an I/O failure.
    pub fn open(dir: impl AsRef<std::path::Path>, config: EngineConfig) -> Result<Engine> {
        let dir = dir.as_ref();
        let started = Instant::now();
        let recovered = crate::durable::recover(dir, config.log_segment_bytes)?;
        let mut next_token = recovered.snapshot.next_token;
        for (_, _, command) in &recovered.commands {
            if let Some(token) = command.token() {
                next_token = next_token.max(token + 1);
            }
        }
        let engine = Self::build(
            config,
            Some(recovered.wal.clone()),
            Some(recovered.lock),
            next_token,
        );
        let replayed = recovered.commands.len();
        engine.recover_state(recovered.snapshot, recovered.commands);
        let entries = engine.inner.totals.entries.load(Ordering::Relaxed);
        tracing::info!(
            dir = %dir.display(),
            entries,
            replayed,
            took_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        let weak = Arc::downgrade(&engine.inner);
        let Some(checkpoints) = engine.inner.checkpoints.clone() else {
            return Ok(engine);
        };
        match std::thread::Builder::new()
            .name("space-checkpoint".into())
            .spawn(move || {
                while checkpoints.wait_due() {
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = Engine::internal(inner).checkpoint() {
                        tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds");
                    }
                }
            }) {
            Ok(t) => engine.inner.threads.lock().push(t),
            Err(e) => {
                tracing::error!(error = %e, "could not start the checkpoint thread; the log will not be compacted")
            }
        }
        Ok(engine)
    }

    /// Rebuilds the state from a snapshot and the commands logged after it, replayed
    /// through [`state::apply`] in log order, then arms the lease timers: what lapsed while
    /// the node was down is expired by commands the timer decides, like any expiry.
    pub(super) fn recover_state(&self, snapshot: Snapshot, commands: Vec<(u64, String, Command)>) {
        *self.inner.answers.lock() = snapshot.answers;
        for image in snapshot.types {
            let TypeImage {
                entry_type,
                next_seq,
                indexes,
                schema,
                records,
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
            });
        }
        for (index, entry_type, command) in commands {
            self.each_type_always(&entry_type, |_, st| {
                self.apply(st, Some(index), command);
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
        let mut answer = self.inner.answers.lock().get(id).cloned()?;
        if let Answer::Receipts(receipts) = &mut answer {
            for r in receipts {
                r.node = self.inner.config.node;
            }
        }
        Some(answer)
    }

    /// Every answer the state keeps, oldest first (see [`answer`](Self::answer)).
    pub fn answers(&self) -> Vec<(RequestId, Answer)> {
        let ids: Vec<RequestId> = self.inner.answers.lock().iter().map(|(id, _)| id).collect();
        ids.into_iter()
            .filter_map(|id| self.answer(id).map(|a| (id, a)))
            .collect()
    }

    /// Whether changes are logged to a data directory.
    pub fn is_durable(&self) -> bool {
        self.inner.wal.is_some()
    }

    /// Blocks until every change made so far is durable (no-op for an in-memory engine).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub fn flush_blocking(&self) -> Result<()> {
        match &self.inner.wal {
            Some(wal) => wal.wait_durable(wal.appended()),
            None => Ok(()),
        }
    }

    /// Waits until every change made so far is durable, without blocking a thread.
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when the log cannot be written.
    pub async fn flush(&self) -> Result<()> {
        match &self.inner.wal {
            Some(wal) => wal.durable(wal.appended()).await,
            None => Ok(()),
        }
    }

    /// Writes a snapshot of everything and drops the log segments it makes unnecessary.
    /// Runs by itself when the log has grown; callable directly (tests, shutdown).
    ///
    /// # Errors
    /// [`SpaceError::Storage`] when writing fails (the log is then kept).
    pub fn checkpoint(&self) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        let floor = wal.last_index(ENGINE_LOG);
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut types = Vec::with_capacity(cells.len());
        for cell in cells {
            let st = cell.lock();
            let cut = wal.last_index(ENGINE_LOG);
            let records = st.store.iter().map(|(seq, r)| (seq, r.clone())).collect();
            types.push(TypeImage {
                entry_type: cell.name.to_string(),
                next_seq: st.store.last_seq(),
                indexes: st.store.indexed_fields(),
                schema: st.store.schema(),
                cut,
                records,
            });
        }
        // Taken after every cut, so it holds the answers of everything under them; those
        // of commands above a cut are not recorded twice on replay (see `state::apply`).
        let answers = self.inner.answers.lock().clone();
        let durable_to = wal.last_index(ENGINE_LOG);
        // The snapshot reflects only what the log already holds durably.
        wal.wait_durable(wal.appended())?;
        let snapshot = Snapshot {
            next_token: self.inner.next_token.load(Ordering::Relaxed),
            types,
            answers,
            floor,
            durable_to,
        };
        let bytes = crate::durable::write_snapshot(wal.dir(), &snapshot, self.inner.config.node)?;
        crate::durable::compact(wal, floor)?;
        if let Some(checkpoints) = &self.inner.checkpoints {
            checkpoints.snapshot_written(bytes);
        }
        Ok(())
    }
}
