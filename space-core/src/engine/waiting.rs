//! Waiting: blocked reads, takes and claims, and what happens when a waiter gives up.

use super::*;

impl Engine {
    /// Registers a waiter; the caller holds the lock and has found nothing.
    pub(super) fn wait_for(
        &self,
        cell: &Arc<TypeCell>,
        st: &mut TypeState,
        query: &Query,
        mode: WaitMode,
        deadline: Option<Instant>,
    ) -> Result<WaitGuard> {
        let counted = Counted::take(&self.inner.waiters, self.inner.config.max_waiters)
            .ok_or_else(|| SpaceError::Busy {
                node: String::new(),
                reason: format!(
                    "it has its maximum of {} blocked reads, takes and claims",
                    self.inner.config.max_waiters.unwrap_or(usize::MAX)
                ),
            })?;
        let waiter = Arc::new(Waiter {
            query: query.clone(),
            mode,
            slot: Slot::new(),
            request: current_request(),
            _counted: counted,
        });
        st.waiters.push_back(waiter.clone());
        Ok(WaitGuard {
            engine: self.clone(),
            cell: cell.clone(),
            waiter,
            deadline,
            done: false,
        })
    }

    /// Puts back what was handed to a waiter that went away before using it.
    pub(super) fn restore(&self, delivery: Delivery) {
        match delivery {
            Delivery::Copy(_) => {}
            Delivery::Taken(taken) => self.untake(vec![taken]),
            Delivery::Claimed(claimed) => {
                // Still held (we just got it), so this cannot fail; if it did, the claim's
                // lease would bring the entry back anyway.
                let _ = self.release(&claimed.ticket);
            }
        }
    }
}

impl Delivery {
    pub(super) fn into_document(self) -> Option<Document> {
        match self {
            Delivery::Copy(d) => Some(d),
            Delivery::Taken(t) => Some(t.into_document()),
            Delivery::Claimed(c) => Some(c.document),
        }
    }

    pub(super) fn into_taken(self) -> Option<Taken> {
        match self {
            Delivery::Taken(t) => Some(t),
            _ => None,
        }
    }
}

impl Begun {
    pub(super) fn map<T: 'static>(
        self,
        f: impl FnOnce(Delivery) -> Option<T> + Send + 'static,
    ) -> Pending<Option<T>> {
        match self {
            Begun::Done(d) => Pending::ready(d.and_then(f)),
            Begun::Wait(guard) => Pending {
                state: PendingState::Wait {
                    guard,
                    finish: Box::new(move |d: Option<Delivery>| d.and_then(f)),
                },
            },
        }
    }
}

impl<T: 'static> Pending<T> {
    pub(crate) fn ready(value: T) -> Self {
        Pending {
            state: PendingState::Ready(value),
        }
    }

    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Pending<U> {
        match self.state {
            PendingState::Ready(v) => Pending {
                state: PendingState::Ready(f(v)),
            },
            PendingState::Wait { guard, finish } => Pending {
                state: PendingState::Wait {
                    guard,
                    finish: Box::new(move |d| f(finish(d))),
                },
            },
        }
    }

    /// Whether the result is already there (no waiting needed).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, PendingState::Ready(_))
    }

    /// Blocks the calling thread until the result is there or the timeout passes.
    pub fn wait(self) -> T {
        match self.state {
            PendingState::Ready(v) => v,
            PendingState::Wait { guard, finish } => finish(guard.wait_blocking()),
        }
    }

    /// Waits without blocking the thread. Needs a tokio runtime with the time driver when
    /// the operation has a finite timeout.
    ///
    /// # Cancel safety
    /// Dropping the future gives up the wait; an entry that was handed to it in the
    /// meantime goes back into the space (a claim is released), so nothing is lost.
    pub async fn wait_async(self) -> T {
        match self.state {
            PendingState::Ready(v) => v,
            PendingState::Wait { guard, finish } => finish(guard.wait_async().await),
        }
    }
}

impl WaitGuard {
    pub(super) fn wait_blocking(mut self) -> Option<Delivery> {
        let delivery = self.waiter.slot.wait_blocking(self.deadline);
        self.finish(delivery)
    }

    async fn wait_async(mut self) -> Option<Delivery> {
        let future = SlotFuture(&self.waiter.slot);
        let delivery = match self.deadline {
            None => future.await,
            Some(deadline) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), future)
                    .await
                {
                    Ok(d) => d,
                    Err(_) => self.waiter.slot.abandon(),
                }
            }
        };
        self.finish(delivery)
    }

    pub(super) fn finish(&mut self, delivery: Option<Delivery>) -> Option<Delivery> {
        self.done = true;
        if delivery.is_none() {
            self.remove_waiter();
        }
        delivery
    }

    pub(super) fn remove_waiter(&self) {
        let mut st = self.cell.lock();
        if let Some(i) = st.waiters.iter().position(|w| Arc::ptr_eq(w, &self.waiter)) {
            st.waiters.remove(i);
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.waiter.slot.abandon() {
            Some(delivery) => self.engine.restore(delivery),
            None => self.remove_waiter(),
        }
    }
}
