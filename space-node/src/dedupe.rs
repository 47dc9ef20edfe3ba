//! Answers to repeated requests: a request retried with the same [`RequestId`] (because the
//! first reply was lost) gets the first answer instead of running again, so a retried take
//! neither loses its entry nor takes a second one, and a retried write stores once.
//!
//! A request that is still running makes its retries wait for its answer. If it is
//! abandoned before it finishes (its future dropped), its slot is removed and a retry runs
//! afresh; the engine has already put back anything the abandoned wait was handed.
//! Finished answers are kept for the latest [`Dedupe::capacity`] requests.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use space_core::SpaceError;
use space_core::wire::{RequestId, Response};
use tokio::sync::Notify;

type Answer = Result<Response, SpaceError>;

enum Slot {
    /// Running; notified when it finishes or is abandoned.
    Running(Arc<Notify>),
    /// Finished: its answer, boxed so the map stays small.
    Done(Box<Answer>),
}

/// The record of recent mutating requests.
pub(crate) struct Dedupe {
    capacity: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    slots: HashMap<RequestId, Slot, foldhash::fast::RandomState>,
    finished: VecDeque<RequestId>,
}

/// What to do with a request.
pub(crate) enum Begin<'a> {
    /// Run it, then [`Running::finish`].
    Run(Running<'a>),
    /// It ran already: here is its answer.
    Answered(Answer),
    /// It is running: wait for this, then look again.
    Wait(Arc<Notify>),
}

/// A request this call runs; dropping it unfinished frees the id for a retry.
pub(crate) struct Running<'a> {
    dedupe: &'a Dedupe,
    id: RequestId,
    done: Arc<Notify>,
    finished: bool,
}

impl Dedupe {
    pub(crate) fn new(capacity: usize) -> Dedupe {
        Dedupe {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::default(),
                finished: VecDeque::new(),
            }),
        }
    }

    /// Records an answer given before (found in the log at recovery).
    pub(crate) fn seed(&self, id: RequestId, answer: Answer) {
        let mut inner = self.inner.lock();
        if inner
            .slots
            .insert(id, Slot::Done(Box::new(answer)))
            .is_none()
        {
            inner.finished.push_back(id);
        }
        while inner.finished.len() > self.capacity {
            if let Some(old) = inner.finished.pop_front() {
                inner.slots.remove(&old);
            }
        }
    }

    /// How many finished answers are kept.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn begin(&self, id: RequestId) -> Begin<'_> {
        let mut inner = self.inner.lock();
        match inner.slots.get(&id) {
            Some(Slot::Done(answer)) => Begin::Answered((**answer).clone()),
            Some(Slot::Running(done)) => Begin::Wait(done.clone()),
            None => {
                let done = Arc::new(Notify::new());
                inner.slots.insert(id, Slot::Running(done.clone()));
                Begin::Run(Running {
                    dedupe: self,
                    id,
                    done,
                    finished: false,
                })
            }
        }
    }

    /// Runs `op` once for `id`: the first call runs it, retries get its answer.
    pub(crate) async fn run<F>(&self, id: RequestId, op: impl FnOnce() -> F) -> Answer
    where
        F: std::future::Future<Output = Answer>,
    {
        let running = loop {
            match self.begin(id) {
                Begin::Answered(answer) => return answer,
                Begin::Run(running) => break running,
                Begin::Wait(done) => {
                    // The first run finishes (its answer is then in the map) or is
                    // abandoned (its slot is gone, and this call runs it): look again.
                    let notified = done.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if self.is_running(id, &done) {
                        notified.await;
                    }
                }
            }
        };
        let answer = op().await;
        running.finish(answer.clone());
        answer
    }
}

impl Dedupe {
    /// Whether `id` is still the run that `done` belongs to.
    fn is_running(&self, id: RequestId, done: &Arc<Notify>) -> bool {
        matches!(self.inner.lock().slots.get(&id), Some(Slot::Running(d)) if Arc::ptr_eq(d, done))
    }
}

impl Running<'_> {
    pub(crate) fn finish(mut self, answer: Answer) {
        let mut inner = self.dedupe.inner.lock();
        inner.slots.insert(self.id, Slot::Done(Box::new(answer)));
        inner.finished.push_back(self.id);
        while inner.finished.len() > self.dedupe.capacity {
            if let Some(old) = inner.finished.pop_front() {
                inner.slots.remove(&old);
            }
        }
        drop(inner);
        self.finished = true;
        self.done.notify_waiters();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Abandoned before it finished: a retry must run it again.
            self.dedupe.inner.lock().slots.remove(&self.id);
            self.done.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_retry_gets_the_first_answer() {
        let d = Dedupe::new(10);
        let runs = AtomicUsize::new(0);
        let id = RequestId::new();
        let op = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(Response::Count(runs.load(Ordering::SeqCst) as u64))
        };
        let first = d.run(id, op).await;
        let second = d.run(id, op).await;
        assert_eq!(first, second);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_abandoned_run_lets_a_retry_run() {
        let d = Dedupe::new(10);
        let id = RequestId::new();
        match d.begin(id) {
            Begin::Run(running) => drop(running),
            _ => panic!("first begin runs"),
        }
        assert!(matches!(d.begin(id), Begin::Run(_)));
    }

    #[tokio::test]
    async fn old_answers_are_forgotten() {
        let d = Dedupe::new(2);
        let ids: Vec<RequestId> = (0..3).map(|_| RequestId::new()).collect();
        for id in &ids {
            assert!(d.run(*id, || async { Ok(Response::Done) }).await.is_ok());
        }
        assert!(matches!(d.begin(ids[0]), Begin::Run(_)));
        assert!(matches!(d.begin(ids[2]), Begin::Answered(_)));
    }
}
