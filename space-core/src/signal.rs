//! A one-shot hand-off slot that a thread can block on and a task can await.
//!
//! A waiting read, take or claim registers a [`Slot`]; the writer that brings a matching
//! entry *offers* it to the slot under the entry type's lock. Exactly one of "offer" and
//! "abandon" (the waiter giving up on timeout or cancel) wins, so an entry handed to a
//! waiter is never lost and never handed to two.
//!
//! Offering does not wake the waiter: it returns a [`Wakeup`] that the writer fires after
//! it has released the entry type's lock, so the wake-up system call is not made while
//! everyone else waits for that lock. A blocked thread spins briefly before it parks,
//! because a hand-off usually follows within microseconds and parking costs more.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set when a value has been offered: lets a spinning waiter see it without the lock.
    ready: AtomicBool,
    state: Mutex<State<T>>,
    cv: Condvar,
}

/// A wake-up owed to a waiter whose slot was just filled; fire it with
/// [`Slot::wake`] once no lock is held.
#[must_use = "a waiter stays asleep until its wake-up is fired"]
pub(crate) struct Wakeup(Option<Waker>);

/// How many rounds a blocked thread checks for a hand-off before it parks.
const SPIN_ROUNDS: u32 = 16;

impl<T> Slot<T> {
    pub(crate) fn new() -> Self {
        Slot {
            ready: AtomicBool::new(false),
            state: Mutex::new(State::Waiting(None)),
            cv: Condvar::new(),
        }
    }

    /// Hands `value` to the waiter; the caller must then fire the returned wake-up with
    /// [`wake`](Self::wake). Fails (giving the value back) when the waiter has already
    /// given up or been served.
    pub(crate) fn offer(&self, value: T) -> Result<Wakeup, T> {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Done) {
            State::Waiting(waker) => {
                *state = State::Ready(value);
                self.ready.store(true, Ordering::Release);
                Ok(Wakeup(waker))
            }
            other => {
                *state = other;
                Err(value)
            }
        }
    }

    /// Wakes the waiter after a successful [`offer`](Self::offer).
    pub(crate) fn wake(&self, wakeup: Wakeup) {
        self.cv.notify_one();
        if let Some(w) = wakeup.0 {
            w.wake();
        }
    }

    /// Spins (then yields) for a short while until a value is offered.
    fn spin_until_ready(&self) {
        for round in 0..SPIN_ROUNDS {
            if self.ready.load(Ordering::Acquire) {
                return;
            }
            if round < 6 {
                for _ in 0..(1u32 << round) {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
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
        self.spin_until_ready();
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
        let wakeup = slot.offer(5).ok().unwrap();
        slot.wake(wakeup);
        assert_eq!(t.join().unwrap(), Some(5));
        assert!(
            slot.offer(6).is_err(),
            "a served slot takes no second value"
        );
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
        assert!(slot.offer(1).is_err());
    }

    #[test]
    fn abandon_returns_an_offered_value() {
        let slot = Slot::new();
        let _ = slot.offer(3).ok().unwrap();
        assert_eq!(slot.abandon(), Some(3));
        assert_eq!(slot.abandon(), None);
    }
}
