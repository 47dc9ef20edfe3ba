//! A one-shot hand-off slot that a thread can block on and a task can await.
//!
//! A waiting read, take or claim registers a [`Slot`]; the writer that brings a matching
//! entry *offers* it to the slot under the entry type's lock. Exactly one of "offer" and
//! "abandon" (the waiter giving up on timeout or cancel) wins, so an entry handed to a
//! waiter is never lost and never handed to two.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

enum State<T> {
    Waiting(Option<Waker>),
    Ready(T),
    Done,
}

/// A one-shot slot; see the module docs.
pub(crate) struct Slot<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Self {
        Slot {
            state: Mutex::new(State::Waiting(None)),
            cv: Condvar::new(),
        }
    }

    /// Hands `value` to the waiter. Fails (giving the value back) when the waiter has
    /// already given up or been served.
    pub(crate) fn offer(&self, value: T) -> Result<(), T> {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Done) {
            State::Waiting(waker) => {
                *state = State::Ready(value);
                drop(state);
                self.cv.notify_one();
                if let Some(w) = waker {
                    w.wake();
                }
                Ok(())
            }
            other => {
                *state = other;
                Err(value)
            }
        }
    }

    /// True while the waiter still wants a value.
    pub(crate) fn is_waiting(&self) -> bool {
        matches!(*self.state.lock(), State::Waiting(_))
    }

    /// Gives up: after this, offers fail. Returns a value that was offered before the
    /// waiter gave up (the caller owns it and must use or return it).
    pub(crate) fn abandon(&self) -> Option<T> {
        match std::mem::replace(&mut *self.state.lock(), State::Done) {
            State::Ready(v) => Some(v),
            _ => None,
        }
    }

    /// Blocks the thread until a value is offered or `deadline` passes (`None`: no limit).
    /// On timeout the slot is abandoned, so a late offer fails instead of being lost.
    pub(crate) fn wait_blocking(&self, deadline: Option<Instant>) -> Option<T> {
        let mut state = self.state.lock();
        loop {
            match std::mem::replace(&mut *state, State::Done) {
                State::Ready(v) => return Some(v),
                State::Done => return None,
                waiting @ State::Waiting(_) => {
                    *state = waiting;
                    match deadline {
                        None => self.cv.wait(&mut state),
                        Some(d) => {
                            if self.cv.wait_until(&mut state, d).timed_out() {
                                return match std::mem::replace(&mut *state, State::Done) {
                                    State::Ready(v) => Some(v),
                                    _ => None,
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// Polls for the value, registering the task's waker while waiting.
    pub(crate) fn poll_value(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Done) {
            State::Ready(v) => Poll::Ready(Some(v)),
            State::Done => Poll::Ready(None),
            State::Waiting(_) => {
                *state = State::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// A future that resolves when the slot is offered a value (`Some`) or abandoned (`None`).
pub(crate) struct SlotFuture<'a, T>(pub(crate) &'a Slot<T>);

impl<T> Future for SlotFuture<'_, T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_value(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn offer_wakes_a_blocked_thread() {
        let slot = Arc::new(Slot::new());
        let s2 = slot.clone();
        let t = std::thread::spawn(move || s2.wait_blocking(None));
        std::thread::sleep(Duration::from_millis(20));
        assert!(slot.offer(5).is_ok());
        assert_eq!(t.join().unwrap(), Some(5));
        assert_eq!(slot.offer(6), Err(6), "a served slot takes no second value");
    }

    #[test]
    fn timeout_abandons_so_late_offers_come_back() {
        let slot: Slot<u32> = Slot::new();
        let start = Instant::now();
        assert_eq!(
            slot.wait_blocking(Some(start + Duration::from_millis(10))),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(10));
        assert_eq!(slot.offer(1), Err(1));
    }

    #[test]
    fn abandon_returns_an_offered_value() {
        let slot = Slot::new();
        slot.offer(3).unwrap();
        assert_eq!(slot.abandon(), Some(3));
        assert_eq!(slot.abandon(), None);
    }
}
