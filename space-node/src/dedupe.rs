//! Answers to repeated requests, and requests given up by their callers.
//!
//! A request retried with the same [`RequestId`] (because the first reply was lost) gets the
//! first answer instead of running again, so a retried take neither loses its entry nor
//! takes a second one, and a retried write stores once. A request that is still running
//! makes its retries wait for its answer. If it is dropped before it finishes (the
//! connection went away), its slot is removed and a retry runs afresh; the engine has
//! already put back anything the dropped wait was handed.
//!
//! A caller that gives up a request ([`Request::Revoke`](space_core::wire::Request)) is
//! the other half: the request's finished [`Outcome`] is kept with what it removed, so the
//! revoke can undo it (put taken entries back, release a claim) when the caller never saw
//! the answer; a request still running is stopped; a request not seen yet is marked, and
//! refused when it arrives. Finished answers and marks are kept for the latest
//! [`Dedupe::capacity`] requests.
//!
//! A call its client would revoke (a take, a claim, the commit of a take: see
//! [`Envelope::revocable`](space_core::wire::Envelope)) whose client goes away without a
//! word (its connection closed: the client process died) after it was handed its entries,
//! while its changes are made durable, revokes itself: nobody will read its answer or
//! retry it, so what it took goes back rather than being kept for a minute and then lost
//! ([`Dedupe::on_vanished`]). A client that is alive and sends it again gets
//! [`SpaceError::Revoked`] and sends it afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use space_core::server::Taken;
use space_core::wire::{RequestId, Response};
use space_core::{Document, SpaceError};
use tokio::sync::Notify;

/// What a request did, as far as a retry or a revoke needs to know.
pub(crate) enum Outcome {
    /// A plain answer (a claim in it is released by a revoke).
    Answer(Response),
    /// Entries a take removed (answered as `Documents`; put back by a revoke).
    Taken(Vec<Taken>),
    /// The entry a commit removed (answered as `Done`; put back by a revoke).
    Committed(Option<Taken>),
}

impl Outcome {
    /// The answer the caller gets (a copy: the outcome stays for retries and revokes).
    fn response(&self) -> Response {
        match self {
            Outcome::Answer(r) => r.clone(),
            Outcome::Taken(t) => Response::Documents(t.iter().map(Taken::document).collect()),
            Outcome::Committed(_) => Response::Done,
        }
    }

    /// The bytes of the entries the outcome holds (what a take or commit removed, what a
    /// claim claimed), if it holds any: what an acknowledgement drops.
    fn held_bytes(&self) -> Option<usize> {
        let documents = |d: &[Document]| d.iter().map(|d| d.fields.approx_size()).sum();
        match self {
            Outcome::Taken(taken) => Some(taken.iter().map(Taken::approx_size).sum()),
            Outcome::Committed(taken) => Some(taken.as_ref().map_or(0, Taken::approx_size)),
            Outcome::Answer(Response::Claimed(Some(c))) => Some(c.document.fields.approx_size()),
            // Found in a shard's answers (a retry's answer).
            Outcome::Answer(Response::Documents(d)) => Some(documents(d)),
            Outcome::Answer(_) => None,
        }
    }

    /// Whether the outcome holds entries: what a take or commit removed, what a claim
    /// claimed (none when it found nothing).
    fn holds_entries(&self) -> bool {
        match self {
            Outcome::Taken(taken) => !taken.is_empty(),
            Outcome::Committed(taken) => taken.is_some(),
            Outcome::Answer(Response::Claimed(claimed)) => claimed.is_some(),
            Outcome::Answer(Response::Documents(documents)) => !documents.is_empty(),
            Outcome::Answer(_) => false,
        }
    }

    /// The answer, consuming the outcome.
    pub(crate) fn into_response(self) -> Response {
        match self {
            Outcome::Answer(r) => r,
            Outcome::Taken(t) => {
                Response::Documents(t.into_iter().map(Taken::into_document).collect())
            }
            Outcome::Committed(_) => Response::Done,
        }
    }
}

/// A request's result as kept: its outcome or its error.
pub(crate) type Finished = Result<Outcome, SpaceError>;

fn answer_of(finished: &Finished) -> Result<Response, SpaceError> {
    finished
        .as_ref()
        .map(Outcome::response)
        .map_err(Clone::clone)
}

enum Slot {
    /// Running: `done` is notified when it finishes or is dropped; `cancel` stops it.
    Running {
        done: Arc<Notify>,
        cancel: Arc<Notify>,
    },
    /// Finished, boxed so the map stays small.
    Done(Box<Finished>),
    /// Given up by its caller: a request with this id is not run.
    Revoked,
    /// Finished, and its caller acknowledged the answer: what it held is dropped, and a
    /// request with this id is not run.
    Acknowledged,
}

/// What gives back what a request took or claimed, by its id and where it may be given
/// back (see [`Dedupe::on_vanished`]).
pub(crate) type OnVanished = Box<dyn Fn(RequestId, GiveBack) + Send + Sync>;

/// Where what a request took or claimed goes back if its caller vanishes before its
/// answer (see [`Dedupe::on_vanished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveBack {
    /// Nowhere: not a call its client would revoke (a worker's commit stands; a write
    /// holds no entries).
    Never,
    /// Through this node's shards only: a call by key, which a live client whose
    /// connection broke may send, by its id, to the key's new owner after a failover, and
    /// be handed its first answer there. A revoke sent on to that owner could come after,
    /// and give back an entry the client holds.
    Here,
    /// Through every member, the shards this node no longer leads included: a call by
    /// query, whose id its client sends to no other node (a live client sends it again to
    /// this node alone, which refuses it at once).
    Everywhere,
}

/// The record of recent mutating requests.
pub(crate) struct Dedupe {
    capacity: usize,
    inner: Mutex<Inner>,
    on_vanished: OnceLock<OnVanished>,
}

struct Inner {
    slots: HashMap<RequestId, Slot, foldhash::fast::RandomState>,
    /// Ids of finished and revoked slots, oldest first (forgotten past the capacity).
    finished: VecDeque<RequestId>,
}

impl Inner {
    /// Settles `id` in `slot` (finished or revoked) and forgets the oldest past `capacity`.
    fn settle(&mut self, id: RequestId, slot: Slot, capacity: usize) {
        if !matches!(
            self.slots.insert(id, slot),
            Some(Slot::Done(_) | Slot::Revoked | Slot::Acknowledged)
        ) {
            self.finished.push_back(id);
        }
        while self.finished.len() > capacity {
            if let Some(old) = self.finished.pop_front() {
                self.slots.remove(&old);
            }
        }
    }
}

/// What to do with a request.
pub(crate) enum Begin<'a> {
    /// Run it, then [`Running::finish`].
    Run(Running<'a>),
    /// It ran already: here is its answer.
    Answered(Result<Response, SpaceError>),
    /// It is running: wait for this, then look again.
    Wait(Arc<Notify>),
}

/// A request this call runs; dropping it unfinished frees the id for a retry (or, once
/// it holds entries its caller would have been handed, revokes it: see
/// [`Dedupe::on_vanished`]).
pub(crate) struct Running<'a> {
    dedupe: &'a Dedupe,
    id: RequestId,
    done: Arc<Notify>,
    cancel: Arc<Notify>,
    settled: bool,
    /// Dropped unfinished, it gives back what it took or claimed, there.
    gives_back: Option<GiveBack>,
}

impl Dedupe {
    pub(crate) fn new(capacity: usize) -> Dedupe {
        Dedupe {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::default(),
                finished: VecDeque::new(),
            }),
            on_vanished: OnceLock::new(),
        }
    }

    /// Sets what gives back what a vanished request took or claimed: a request run with
    /// a [`GiveBack`] other than `Never` (see [`run_then`](Self::run_then)) that is dropped
    /// after it was handed entries, before its answer (its connection closed while its
    /// changes were made durable). The request is marked revoked at once (a retry gets
    /// [`SpaceError::Revoked`]) and `give_back` is called with its id, from the drop: it
    /// must not block. Set once; later calls are ignored.
    pub(crate) fn on_vanished(&self, give_back: OnVanished) {
        let _ = self.on_vanished.set(give_back);
    }

    /// Records an answer given before (found in the log at recovery).
    pub(crate) fn seed(&self, id: RequestId, finished: Finished) {
        self.inner
            .lock()
            .settle(id, Slot::Done(Box::new(finished)), self.capacity);
    }

    /// How many finished answers are kept.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn begin(&self, id: RequestId) -> Begin<'_> {
        let mut inner = self.inner.lock();
        match inner.slots.get(&id) {
            Some(Slot::Done(finished)) => Begin::Answered(answer_of(finished)),
            Some(Slot::Revoked) => Begin::Answered(Err(SpaceError::Revoked)),
            Some(Slot::Acknowledged) => Begin::Answered(Err(SpaceError::Acknowledged)),
            Some(Slot::Running { done, .. }) => Begin::Wait(done.clone()),
            None => {
                let done = Arc::new(Notify::new());
                let cancel = Arc::new(Notify::new());
                inner.slots.insert(
                    id,
                    Slot::Running {
                        done: done.clone(),
                        cancel: cancel.clone(),
                    },
                );
                Begin::Run(Running {
                    dedupe: self,
                    id,
                    done,
                    cancel,
                    settled: false,
                    gives_back: None,
                })
            }
        }
    }

    /// Runs `op` once for `id`: the first call runs it, retries get its answer. A revoke
    /// that arrives while it runs stops it (`op` is dropped, which gives back anything it
    /// was handed) and it answers [`SpaceError::Revoked`].
    #[cfg(test)]
    pub(crate) async fn run<F>(
        &self,
        id: RequestId,
        op: impl FnOnce() -> F,
    ) -> Result<Response, SpaceError>
    where
        F: std::future::Future<Output = Finished>,
    {
        self.run_then(id, op, std::future::ready, GiveBack::Never)
            .await
    }

    /// As [`run`](Self::run), with `then` run on what `op` finished (making it durable)
    /// before it is answered. `then` is not stopped by a revoke: once `op` has changed
    /// the space, the change is seen through, and a revoke that arrived meanwhile gets
    /// the outcome to undo.
    ///
    /// Dropped while `then` runs, the request is forgotten (a retry runs it again, and
    /// finds what it did in the engine's answers), unless `gives_back_if_vanished` is not
    /// [`GiveBack::Never`] and `op` took or claimed entries: then it revokes itself (see
    /// [`on_vanished`](Self::on_vanished)).
    pub(crate) async fn run_then<F, G>(
        &self,
        id: RequestId,
        op: impl FnOnce() -> F,
        then: impl FnOnce(Finished) -> G,
        gives_back_if_vanished: GiveBack,
    ) -> Result<Response, SpaceError>
    where
        F: std::future::Future<Output = Finished>,
        G: std::future::Future<Output = Finished>,
    {
        let mut running = loop {
            match self.begin(id) {
                Begin::Answered(answer) => return answer,
                Begin::Run(running) => break running,
                Begin::Wait(done) => self.wait_while_running(id, &done).await,
            }
        };
        let cancel = running.cancel.clone();
        let finished = tokio::select! {
            biased;
            finished = op() => finished,
            () = cancel.notified() => {
                running.settle(Slot::Revoked);
                return Err(SpaceError::Revoked);
            }
        };
        running.gives_back = (gives_back_if_vanished != GiveBack::Never
            && finished.as_ref().is_ok_and(Outcome::holds_entries))
        .then_some(gives_back_if_vanished);
        let finished = then(finished).await;
        running.gives_back = None;
        let answer = answer_of(&finished);
        if matches!(
            answer,
            Err(SpaceError::WrongNode { .. } | SpaceError::Unavailable { .. })
        ) {
            // Not done here, or done by a shard leadership that ended (its outcome is in
            // the shard's log): the id is not kept, so a retry runs again, and finds the
            // first answer in the shard's replicated answer table if there is one.
            drop(running);
        } else {
            running.settle(Slot::Done(Box::new(finished)));
        }
        answer
    }

    /// Gives up request `id` for its caller; returns its outcome when it had finished, for
    /// the caller to undo. A running request is stopped (and has nothing left to undo); an
    /// unknown one is marked so that it does not run if it arrives later.
    pub(crate) async fn revoke(&self, id: RequestId) -> Option<Finished> {
        loop {
            let done = {
                let mut inner = self.inner.lock();
                match inner.slots.get(&id) {
                    None => {
                        inner.settle(id, Slot::Revoked, self.capacity);
                        return None;
                    }
                    // An acknowledged answer reached its caller: nothing to undo.
                    Some(Slot::Revoked | Slot::Acknowledged) => return None,
                    Some(Slot::Done(_)) => {
                        let Some(Slot::Done(finished)) = inner.slots.insert(id, Slot::Revoked)
                        else {
                            unreachable!("the slot was just seen finished");
                        };
                        return Some(*finished);
                    }
                    Some(Slot::Running { done, cancel }) => {
                        cancel.notify_one();
                        done.clone()
                    }
                }
            };
            self.wait_while_running(id, &done).await;
        }
    }

    /// The callers of `ids` acknowledged their answers: finished answers that hold
    /// entries (taken, committed or claimed) are replaced by a mark, which keeps its
    /// place among the finished slots. Running, revoked and unknown ids are passed over.
    /// Returns the ids whose answers an engine may keep with entries of `large` bytes or
    /// more: those that held that much here, and those no longer known here.
    pub(crate) fn acknowledge(&self, ids: &[RequestId], large: usize) -> Vec<RequestId> {
        let mut inner = self.inner.lock();
        let mut elsewhere = Vec::new();
        for &id in ids {
            match inner.slots.get_mut(&id) {
                None => elsewhere.push(id),
                Some(slot @ Slot::Done(_)) => {
                    let Slot::Done(finished) = &*slot else {
                        continue;
                    };
                    let Some(bytes) = finished
                        .as_ref()
                        .as_ref()
                        .ok()
                        .and_then(Outcome::held_bytes)
                    else {
                        continue;
                    };
                    *slot = Slot::Acknowledged;
                    if bytes >= large {
                        elsewhere.push(id);
                    }
                }
                Some(_) => {}
            }
        }
        elsewhere
    }

    /// Waits until the run that `done` belongs to finishes, is revoked or is dropped.
    async fn wait_while_running(&self, id: RequestId, done: &Arc<Notify>) {
        let notified = done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_running(id, done) {
            notified.await;
        }
    }

    /// Whether `id` is still the run that `done` belongs to.
    fn is_running(&self, id: RequestId, done: &Arc<Notify>) -> bool {
        matches!(
            self.inner.lock().slots.get(&id),
            Some(Slot::Running { done: d, .. }) if Arc::ptr_eq(d, done)
        )
    }
}

impl Running<'_> {
    /// Ends the run with its finished (or revoked) slot.
    fn settle(mut self, slot: Slot) {
        self.dedupe
            .inner
            .lock()
            .settle(self.id, slot, self.dedupe.capacity);
        self.settled = true;
        self.done.notify_waiters();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(reach) = self.gives_back {
            // Its caller went away after it took or claimed entries: revoked before anything
            // else can ask for it, then given back.
            self.dedupe
                .inner
                .lock()
                .settle(self.id, Slot::Revoked, self.dedupe.capacity);
            if let Some(give_back) = self.dedupe.on_vanished.get() {
                give_back(self.id, reach);
            }
        } else {
            // Dropped before it finished: a retry must run it again.
            self.dedupe.inner.lock().slots.remove(&self.id);
        }
        self.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_wrong_node_answer_is_not_kept_so_a_retry_runs_again() {
        let d = Dedupe::new(10);
        let runs = AtomicUsize::new(0);
        let id = RequestId::new();
        let op = || async {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(SpaceError::WrongNode {
                    epoch: 2,
                    owner: None,
                })
            } else {
                Ok(Outcome::Answer(Response::Done))
            }
        };
        assert!(matches!(
            d.run(id, op).await,
            Err(SpaceError::WrongNode { .. })
        ));
        assert_eq!(d.run(id, op).await, Ok(Response::Done));
        assert_eq!(d.run(id, op).await, Ok(Response::Done));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_retry_gets_the_first_answer() {
        let d = Dedupe::new(10);
        let runs = AtomicUsize::new(0);
        let id = RequestId::new();
        let op = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Answer(Response::Count(
                runs.load(Ordering::SeqCst) as u64,
            )))
        };
        let first = d.run(id, op).await;
        let second = d.run(id, op).await;
        assert_eq!(first, second);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_run_lets_a_retry_run() {
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
            let answer = d.run(*id, || async { Ok(Outcome::Answer(Response::Done)) });
            assert!(answer.await.is_ok());
        }
        assert!(matches!(d.begin(ids[0]), Begin::Run(_)));
        assert!(matches!(d.begin(ids[2]), Begin::Answered(_)));
    }

    #[tokio::test]
    async fn an_acknowledged_answer_is_dropped_and_refuses_retries_and_revokes() {
        let d = Dedupe::new(10);
        let (take, count) = (RequestId::new(), RequestId::new());
        let taken = d.run(take, || async { Ok(Outcome::Taken(Vec::new())) });
        assert_eq!(taken.await, Ok(Response::Documents(Vec::new())));
        let counted = d.run(count, || async { Ok(Outcome::Answer(Response::Count(3))) });
        assert_eq!(counted.await, Ok(Response::Count(3)));
        let unknown = RequestId::new();
        // Only the id not known here may be kept large elsewhere (the take held nothing).
        assert_eq!(d.acknowledge(&[take, count, unknown], 1), vec![unknown]);
        // The take's answer held entries: dropped, and the take is not run again.
        let again = d.run(take, || async { panic!("an acknowledged take ran again") });
        assert_eq!(again.await, Err(SpaceError::Acknowledged));
        assert!(d.revoke(take).await.is_none());
        // An answer that holds no entry is kept as it was.
        let again = d.run(count, || async { panic!("a finished count ran again") });
        assert_eq!(again.await, Ok(Response::Count(3)));
        // An answer holding entries of `large` bytes or more is for the engines to drop.
        let large = RequestId::new();
        let mut fields = space_core::Fields::new();
        fields.push("body", space_core::Value::Str("x".repeat(100)));
        let document = Document {
            key: space_core::Key::Name("k".into()),
            version: 1,
            fields,
        };
        let found = d.run(large, || async {
            Ok(Outcome::Answer(Response::Documents(vec![document])))
        });
        assert!(found.await.is_ok());
        assert_eq!(d.acknowledge(&[large], 100), vec![large]);
        assert_eq!(
            d.run(large, || async { panic!() }).await,
            Err(SpaceError::Acknowledged)
        );
    }

    #[tokio::test]
    async fn a_revoke_hands_back_a_finished_outcome_once() {
        let d = Dedupe::new(10);
        let id = RequestId::new();
        let answer = d.run(id, || async { Ok(Outcome::Answer(Response::Count(7))) });
        assert_eq!(answer.await, Ok(Response::Count(7)));
        assert!(matches!(
            d.revoke(id).await,
            Some(Ok(Outcome::Answer(Response::Count(7))))
        ));
        assert!(d.revoke(id).await.is_none(), "undone once only");
        let retry = d.run(id, || async { Ok(Outcome::Answer(Response::Done)) });
        assert_eq!(retry.await, Err(SpaceError::Revoked));
    }

    #[tokio::test]
    async fn a_revoke_stops_a_running_request() {
        let d = Arc::new(Dedupe::new(10));
        let id = RequestId::new();
        let running = tokio::spawn({
            let d = d.clone();
            async move { d.run(id, std::future::pending::<Finished>).await }
        });
        while !matches!(d.inner.lock().slots.get(&id), Some(Slot::Running { .. })) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(d.revoke(id).await.is_none(), "nothing finished to undo");
        assert_eq!(running.await.unwrap(), Err(SpaceError::Revoked));
    }

    #[tokio::test]
    async fn a_revoke_while_a_change_is_made_durable_gets_it_to_undo() {
        let d = Arc::new(Dedupe::new(10));
        let id = RequestId::new();
        let (durable, made_durable) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn({
            let d = d.clone();
            async move {
                d.run_then(
                    id,
                    || async { Ok(Outcome::Answer(Response::Count(3))) },
                    |finished| async move {
                        let _ = made_durable.await;
                        finished
                    },
                    GiveBack::Never,
                )
                .await
            }
        });
        while !matches!(d.inner.lock().slots.get(&id), Some(Slot::Running { .. })) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let revoke = tokio::spawn({
            let d = d.clone();
            async move { d.revoke(id).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = durable.send(());
        assert_eq!(running.await.unwrap(), Ok(Response::Count(3)));
        assert!(
            matches!(
                revoke.await.unwrap(),
                Some(Ok(Outcome::Answer(Response::Count(3))))
            ),
            "the revoke did not get the change to undo"
        );
    }

    /// Runs a request of id `id` whose op finishes with `outcome` and whose changes are
    /// never made durable, with `gives_back_if_vanished`, and drops it once it waits for
    /// them.
    async fn dropped_while_made_durable(
        d: &Arc<Dedupe>,
        id: RequestId,
        outcome: Outcome,
        gives_back_if_vanished: GiveBack,
    ) {
        let running = tokio::spawn({
            let d = d.clone();
            async move {
                d.run_then(
                    id,
                    || async { Ok(outcome) },
                    |_| std::future::pending::<Finished>(),
                    gives_back_if_vanished,
                )
                .await
            }
        });
        while !matches!(d.inner.lock().slots.get(&id), Some(Slot::Running { .. })) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        running.abort();
        let _ = running.await;
    }

    /// Records the ids, and where to give back, given to [`Dedupe::on_vanished`].
    fn watch_vanished(d: &Dedupe) -> Arc<Mutex<Vec<(RequestId, GiveBack)>>> {
        let vanished = Arc::new(Mutex::new(Vec::new()));
        let seen = vanished.clone();
        d.on_vanished(Box::new(move |id, reach| seen.lock().push((id, reach))));
        vanished
    }

    #[tokio::test]
    async fn a_take_dropped_while_made_durable_revokes_itself() {
        let d = Arc::new(Dedupe::new(10));
        let vanished = watch_vanished(&d);
        let id = RequestId::new();
        let taken = Outcome::Answer(Response::Documents(vec![Document {
            key: space_core::Key::Name("a".into()),
            version: 1,
            fields: space_core::Fields::new(),
        }]));
        dropped_while_made_durable(&d, id, taken, GiveBack::Everywhere).await;
        assert_eq!(
            *vanished.lock(),
            vec![(id, GiveBack::Everywhere)],
            "the take was not given back, or not where it may be"
        );
        let retried = d.run(id, || async { Ok(Outcome::Answer(Response::Done)) });
        assert_eq!(retried.await, Err(SpaceError::Revoked));
    }

    #[tokio::test]
    async fn a_request_dropped_while_made_durable_that_holds_nothing_is_forgotten() {
        let d = Arc::new(Dedupe::new(10));
        let vanished = watch_vanished(&d);
        // A take that found nothing, and a write (which never gives back).
        let (found_nothing, write) = (RequestId::new(), RequestId::new());
        dropped_while_made_durable(
            &d,
            found_nothing,
            Outcome::Answer(Response::Documents(Vec::new())),
            GiveBack::Here,
        )
        .await;
        dropped_while_made_durable(
            &d,
            write,
            Outcome::Answer(Response::Receipts(Vec::new())),
            GiveBack::Never,
        )
        .await;
        assert!(vanished.lock().is_empty());
        for id in [found_nothing, write] {
            let retried = d.run(id, || async { Ok(Outcome::Answer(Response::Done)) });
            assert_eq!(retried.await, Ok(Response::Done), "a retry runs again");
        }
    }

    #[tokio::test]
    async fn a_revoke_that_overtakes_its_request_keeps_it_from_running() {
        let d = Dedupe::new(10);
        let id = RequestId::new();
        assert!(d.revoke(id).await.is_none());
        let ran = AtomicUsize::new(0);
        let answer = d.run(id, || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Answer(Response::Done))
        });
        assert_eq!(answer.await, Err(SpaceError::Revoked));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}
