//! Answers to repeated requests: a request retried with the same [`RequestId`] (because the
//! first reply was lost) gets the first answer instead of running again, so a retried take
//! neither loses its entry nor takes a second one, and a retried write stores once.
//!
//! A request that is still running makes its retries wait for its answer. If it is
//! abandoned before it finishes (its future dropped), its slot is removed and a retry runs
//! afresh; the engine has already put back anything the abandoned wait was handed.
//! Finished answers are kept for the latest [`Dedupe::capacity`] requests.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use space_core::SpaceError;
use space_core::wire::{RequestId, Response};
use tokio::sync::watch;

type Answer = Result<Response, SpaceError>;

enum Slot {
    Running(watch::Receiver<Option<Answer>>),
    Done(Answer),
}

/// The record of recent mutating requests.
pub(crate) struct Dedupe {
    capacity: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    slots: HashMap<RequestId, Slot>,
    finished: VecDeque<RequestId>,
}

/// What to do with a request.
pub(crate) enum Begin<'a> {
    /// Run it, then [`Running::finish`].
    Run(Running<'a>),
    /// It ran already: here is its answer.
    Answered(Answer),
    /// It is running: wait for this.
    Wait(watch::Receiver<Option<Answer>>),
}

/// A request this call runs; dropping it unfinished frees the id for a retry.
pub(crate) struct Running<'a> {
    dedupe: &'a Dedupe,
    id: RequestId,
    sender: Option<watch::Sender<Option<Answer>>>,
}

impl Dedupe {
    pub(crate) fn new(capacity: usize) -> Dedupe {
        Dedupe {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                finished: VecDeque::new(),
            }),
        }
    }

    /// How many finished answers are kept.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn begin(&self, id: RequestId) -> Begin<'_> {
        let mut inner = self.inner.lock();
        match inner.slots.get(&id) {
            Some(Slot::Done(answer)) => Begin::Answered(answer.clone()),
            Some(Slot::Running(rx)) => Begin::Wait(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                inner.slots.insert(id, Slot::Running(rx));
                Begin::Run(Running {
                    dedupe: self,
                    id,
                    sender: Some(tx),
                })
            }
        }
    }

    /// Runs `op` once for `id`: the first call runs it, retries get its answer.
    pub(crate) async fn run<F>(&self, id: RequestId, op: impl Fn() -> F) -> Answer
    where
        F: std::future::Future<Output = Answer>,
    {
        loop {
            match self.begin(id) {
                Begin::Answered(answer) => return answer,
                Begin::Run(running) => {
                    let answer = op().await;
                    running.finish(answer.clone());
                    return answer;
                }
                Begin::Wait(mut rx) => {
                    // The first run finishes (then its answer is in the channel) or is
                    // abandoned (the sender is dropped): then run again ourselves.
                    loop {
                        if let Some(answer) = rx.borrow().clone() {
                            return answer;
                        }
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Running<'_> {
    pub(crate) fn finish(mut self, answer: Answer) {
        let mut inner = self.dedupe.inner.lock();
        inner.slots.insert(self.id, Slot::Done(answer.clone()));
        inner.finished.push_back(self.id);
        while inner.finished.len() > self.dedupe.capacity {
            if let Some(old) = inner.finished.pop_front() {
                inner.slots.remove(&old);
            }
        }
        drop(inner);
        if let Some(tx) = self.sender.take() {
            let _ = tx.send(Some(answer));
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.sender.is_some() {
            // Abandoned before it finished: a retry must run it again.
            self.dedupe.inner.lock().slots.remove(&self.id);
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
