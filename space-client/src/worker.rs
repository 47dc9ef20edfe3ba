//! Worker pools: claim matching entries, run a handler on each, commit what succeeded.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use space_client::{Job, Query, Shutdown, Space, Work};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Resize { image: String }
//! space_client::entry!(Resize, "example.Resize");
//!
//! # async fn run(space: Space) -> space_client::Result<()> {
//! let shutdown = Shutdown::new();
//! let report = space
//!     .worker::<Resize>(&Query::of::<Resize>())
//!     .concurrency(8)
//!     .lease(Duration::from_secs(30))
//!     .max_attempts(5)
//!     .shutdown_on(&shutdown)
//!     .run(|job: Job<Resize>| async move {
//!         if job.entry.image.is_empty() {
//!             return Err("no image named");
//!         }
//!         Ok(())
//!     })
//!     .await?;
//! println!("{} done, {} dead-lettered", report.done, report.dead_lettered);
//! # Ok(()) }
//! ```
//!
//! Each of the `concurrency` slots claims one entry at a time (a claim hides the entry from
//! everyone else for the lease), runs the handler on it, and renews the claim every third
//! of the lease while the handler runs. Then:
//!
//! - the handler succeeded: the claim is committed (the entry is removed);
//! - it failed (an error, or a panic) and the entry has been claimed fewer than
//!   `max_attempts` times: the claim is cut short to the backoff (doubling from the first
//!   backoff with each attempt, up to the longest), after which it lapses and the entry is
//!   claimable again. A job that always fails is retried a few times, not thousands of
//!   times a second;
//! - it failed on the last attempt: a [`DeadLetter`] naming the entry, its key, the attempts
//!   and the error (with the entry as JSON) is written, and the claim committed.
//!
//! Attempts are the space's own count of the entry's claims ([`Claim::claims`]), so they
//! add up across workers and processes, and a claim that lapsed because its worker died
//! counts as an attempt. A worker that dies mid-job loses nothing: its claim lapses at the
//! end of its lease and another worker claims the entry.
//!
//! Errors that say a node could not be reached, or that the cluster could not serve the
//! call for a moment (`Down`, `Unreachable`, `TimedOut`, `Unavailable`, `Busy`), pause the
//! slot for the backoff and it claims again; any other error stops the pool and `run`
//! returns it. Stopping: [`Shutdown::stop`] stops the claiming at once; handlers that are
//! running get until the end of one lease to finish (and are committed as usual), after
//! which they are aborted and their claims released. `run` returns when every slot has
//! stopped and the claims given up on the way are released ([`Space::settle`], for a lease
//! at most).

use std::fmt::{self, Display};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use space_core::{
    BlockingSpace, Claim, ClaimTicket, Entry, Key, Lease, Query, Result, Space, SpaceError,
};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// An entry that failed `attempts` times, written by a worker pool in its place.
///
/// Find them with `Query::of::<DeadLetter>().eq("entry_type", "my.Type")`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The failed entry's type.
    pub entry_type: String,
    /// The failed entry's key.
    pub key: String,
    /// How many times it was claimed.
    pub attempts: u32,
    /// What the handler's last attempt said (its error, or its panic).
    pub error: String,
    /// The failed entry, as JSON.
    pub entry: String,
}
space_core::entry!(DeadLetter, "space.DeadLetter", index = [entry_type]);

impl DeadLetter {
    /// The failed entry, decoded.
    ///
    /// # Errors
    ///
    /// When the JSON does not decode as a `T`.
    pub fn entry<T: Entry>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.entry)
    }
}

/// One claimed entry handed to a worker's handler.
#[derive(Debug)]
#[non_exhaustive]
pub struct Job<T> {
    /// The entry.
    pub entry: T,
    /// Its key.
    pub key: Key,
    /// Which attempt this is: 1 the first time the entry is claimed.
    pub attempt: u32,
}

/// Stops a worker pool: share one with [`Worker::shutdown_on`], call [`Shutdown::stop`].
/// Cloning gives another handle to the same signal.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal not yet given.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Tells every pool that shares this handle to stop; see the module docs.
    pub fn stop(&self) {
        self.0.cancel();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// What a worker pool did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Entries handled and committed.
    pub done: u64,
    /// Attempts that failed and were left to be tried again after the backoff.
    pub retried: u64,
    /// Entries moved to [`DeadLetter`]s.
    pub dead_lettered: u64,
    /// Entries whose claim ran out before the handler finished (another worker may have
    /// handled them too): a lease shorter than the handler needs, or renewals that could
    /// not reach the space.
    pub lost: u64,
    /// Handlers aborted at shutdown, their claims released.
    pub aborted: u64,
    /// Claims whose settling call (a commit, a release, a cut after a failure, or the
    /// dead letter before its commit) could not reach the space. Whether it landed is not
    /// known: if it did not, the claim lapses at the end of its lease and the entry is
    /// handled again (and counted again); if it did, the entry was settled once.
    pub unsettled: u64,
}

impl WorkerReport {
    fn add(&mut self, other: WorkerReport) {
        self.done += other.done;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.lost += other.lost;
        self.aborted += other.aborted;
        self.unsettled += other.unsettled;
    }
}

/// A worker pool's settings; see the builder methods of [`Worker`].
#[derive(Clone, Debug)]
struct Settings {
    concurrency: usize,
    lease: Duration,
    max_attempts: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 1,
            lease: Duration::from_secs(30),
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            poll: Duration::from_secs(1),
        }
    }
}

impl Settings {
    /// The pause after failed attempt `attempt` (1-based): doubling, up to the longest.
    fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.first_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// Starts a worker pool on a space handle: `space.worker::<T>(&query)`.
pub trait Work {
    /// The pool's builder.
    type Worker<T: Entry>;

    /// A worker pool for the entries of type `T` that match `query`; set it up with the
    /// builder's methods, then `run` it.
    fn worker<T: Entry>(&self, query: &Query) -> Self::Worker<T>;
}

impl Work for Space {
    type Worker<T: Entry> = Worker<T>;

    fn worker<T: Entry>(&self, query: &Query) -> Worker<T> {
        Worker {
            space: self.clone(),
            query: query.clone(),
            settings: Settings::default(),
            shutdown: Shutdown::new(),
            entry: PhantomData,
        }
    }
}

impl Work for BlockingSpace {
    type Worker<T: Entry> = BlockingWorker<T>;

    fn worker<T: Entry>(&self, query: &Query) -> BlockingWorker<T> {
        BlockingWorker(self.to_async().worker(query))
    }
}

/// A worker pool on the async [`Space`]; see the [module docs](self).
pub struct Worker<T> {
    space: Space,
    query: Query,
    settings: Settings,
    shutdown: Shutdown,
    entry: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Worker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("query", &self.query)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

type BoxedHandler<T> = Arc<
    dyn Fn(Job<T>) -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>>
        + Send
        + Sync,
>;

impl<T: Entry> Worker<T> {
    /// How many entries are handled at once (default 1; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n.max(1);
        self
    }

    /// Each claim's lease, renewed every third of it while the handler runs (default
    /// 30 s). A worker that dies holds its entry this long at most.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// How many claims of an entry may fail before it is dead-lettered (default 5; at
    /// least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// The pause after a failed attempt, doubling with each attempt from `first` up to
    /// `max` (default 100 ms up to 30 s); also the pause after a transient error.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.settings.first_backoff = first;
        self.settings.max_backoff = max.max(first);
        self
    }

    /// How long one claim call waits for a matching entry before it asks again (default
    /// 1 s). Stopping does not wait for it.
    pub fn poll(mut self, poll: Duration) -> Self {
        self.settings.poll = poll;
        self
    }

    /// Stops the pool when `shutdown` is stopped.
    pub fn shutdown_on(mut self, shutdown: &Shutdown) -> Self {
        self.shutdown = shutdown.clone();
        self
    }

    /// Runs the pool until its [`Shutdown`] is stopped, or an error that is not transient
    /// stops it.
    ///
    /// Must be called inside a tokio runtime (the slots and handlers are tokio tasks).
    /// Dropping the future stops claiming; claims held by running handlers then lapse at
    /// the end of their lease (nothing is lost).
    ///
    /// # Errors
    ///
    /// The first error that is not transient (a bad query, an entry that does not decode
    /// as `T`, a refused write of a dead letter); the other slots stop too.
    pub async fn run<F, Fut, E>(self, handler: F) -> Result<WorkerReport>
    where
        F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let handler: BoxedHandler<T> = Arc::new(move |job| {
            let running = handler(job);
            Box::pin(async move { running.await.map_err(|e| e.to_string()) })
        });
        self.run_boxed(handler).await
    }

    async fn run_boxed(self, handler: BoxedHandler<T>) -> Result<WorkerReport> {
        let pool = Arc::new(Pool {
            space: self.space,
            query: self.query,
            settings: self.settings,
            shutdown: self.shutdown,
            failed: CancellationToken::new(),
            handler,
        });
        let slots: Vec<_> = (0..pool.settings.concurrency)
            .map(|_| tokio::spawn(pool.clone().slot()))
            .collect();
        let mut report = WorkerReport::default();
        let mut first_error = None;
        for slot in slots {
            match slot.await {
                Ok((done, None)) => report.add(done),
                Ok((done, Some(e))) => {
                    report.add(done);
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(SpaceError::Protocol {
                        reason: format!("a worker slot ended abnormally: {e}"),
                    });
                }
            }
        }
        // A claim under way when its slot stopped is revoked in the background: wait for
        // that (no longer than a lease, after which such a claim lapses anyway), so that a
        // process exiting once `run` returns leaves no entry hidden for a lease.
        let _ = tokio::time::timeout(pool.settings.lease, pool.space.settle()).await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// A worker pool on the [`BlockingSpace`]: the same as [`Worker`], with a handler that
/// blocks; see the [module docs](self).
pub struct BlockingWorker<T>(Worker<T>);

impl<T> fmt::Debug for BlockingWorker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BlockingWorker").field(&self.0).finish()
    }
}

impl<T: Entry> BlockingWorker<T> {
    /// See [`Worker::concurrency`].
    pub fn concurrency(self, n: usize) -> Self {
        BlockingWorker(self.0.concurrency(n))
    }

    /// See [`Worker::lease`].
    pub fn lease(self, lease: Duration) -> Self {
        BlockingWorker(self.0.lease(lease))
    }

    /// See [`Worker::max_attempts`].
    pub fn max_attempts(self, n: u32) -> Self {
        BlockingWorker(self.0.max_attempts(n))
    }

    /// See [`Worker::backoff`].
    pub fn backoff(self, first: Duration, max: Duration) -> Self {
        BlockingWorker(self.0.backoff(first, max))
    }

    /// See [`Worker::poll`].
    pub fn poll(self, poll: Duration) -> Self {
        BlockingWorker(self.0.poll(poll))
    }

    /// See [`Worker::shutdown_on`].
    pub fn shutdown_on(self, shutdown: &Shutdown) -> Self {
        BlockingWorker(self.0.shutdown_on(shutdown))
    }

    /// Runs the pool on the calling thread until its [`Shutdown`] is stopped, each
    /// handler call on a thread of its own (at most `concurrency` at once); see
    /// [`Worker::run`]. Do not call it from inside an async task.
    ///
    /// # Errors
    ///
    /// As [`Worker::run`]; also when the pool's runtime cannot start.
    pub fn run<F, E>(self, handler: F) -> Result<WorkerReport>
    where
        F: Fn(Job<T>) -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Display + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(self.0.settings.concurrency)
            .build()
            .map_err(|e| SpaceError::Protocol {
                reason: format!("starting the worker pool's runtime: {e}"),
            })?;
        let handler = Arc::new(handler);
        let boxed: BoxedHandler<T> = Arc::new(move |job| {
            let handler = handler.clone();
            Box::pin(async move {
                match tokio::task::spawn_blocking(move || handler(job)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(e) => Err(panic_text(e)),
                }
            })
        });
        runtime.block_on(self.0.run_boxed(boxed))
    }
}

/// What a handler task that did not finish says: its panic message if it panicked.
fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        let panic = e.into_panic();
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        format!("the handler panicked: {text}")
    } else {
        "the handler was cancelled".to_owned()
    }
}

/// Errors after which a slot pauses and claims again.
fn is_transient(e: &SpaceError) -> bool {
    e.is_unreachable() || matches!(e, SpaceError::Unavailable { .. } | SpaceError::Busy { .. })
}

struct Pool<T> {
    space: Space,
    query: Query,
    settings: Settings,
    shutdown: Shutdown,
    /// Cancelled when a slot stops on an error that is not transient.
    failed: CancellationToken,
    handler: BoxedHandler<T>,
}

/// How a handler's run ended.
enum Ran {
    Finished(std::result::Result<(), String>),
    /// Aborted at the end of the shutdown's grace.
    Aborted,
}

impl<T: Entry> Pool<T> {
    fn stopping(&self) -> bool {
        self.shutdown.is_stopped() || self.failed.is_cancelled()
    }

    /// Resolves when the pool should stop claiming.
    async fn stopped(&self) {
        tokio::select! {
            _ = self.shutdown.0.cancelled() => {}
            _ = self.failed.cancelled() => {}
        }
    }

    /// Waits `pause`, or less if the pool stops.
    async fn pause(&self, pause: Duration) {
        tokio::select! {
            _ = sleep(pause) => {}
            _ = self.stopped() => {}
        }
    }

    /// One slot: claim, handle, settle, until the pool stops.
    async fn slot(self: Arc<Self>) -> (WorkerReport, Option<SpaceError>) {
        let mut report = WorkerReport::default();
        let mut transient_failures = 0;
        while !self.stopping() {
            let claimed = tokio::select! {
                c = self.space.claim::<T>(&self.query, Lease::For(self.settings.lease), self.settings.poll) => c,
                // A claim call given up is released by the client (nothing is lost).
                _ = self.stopped() => break,
            };
            match claimed {
                Ok(None) => transient_failures = 0,
                Ok(Some(claim)) => {
                    transient_failures = 0;
                    if let Err(e) = self.handle(claim, &mut report).await {
                        self.failed.cancel();
                        return (report, Some(e));
                    }
                }
                Err(e) if is_transient(&e) => {
                    transient_failures += 1;
                    tracing::debug!(error = %e, "worker: the space could not be reached; claiming again after a pause");
                    self.pause(self.settings.backoff(transient_failures)).await;
                }
                Err(e) => {
                    self.failed.cancel();
                    return (report, Some(e));
                }
            }
        }
        (report, None)
    }

    /// Runs the handler on one claimed entry and settles the claim.
    async fn handle(&self, claim: Claim<T>, report: &mut WorkerReport) -> Result<()> {
        let ticket = claim.ticket().clone();
        let attempt = claim.claims;
        let entry_json = if attempt >= self.settings.max_attempts {
            // Kept for the dead letter the last attempt may need.
            serde_json::to_string(&claim.entry).ok()
        } else {
            None
        };
        let job = Job {
            entry: claim.entry,
            key: claim.key.clone(),
            attempt,
        };
        let (ran, lost) = self.run_renewing(job, &ticket).await;
        match ran {
            Ran::Aborted => {
                report.aborted += 1;
                self.settle(self.space.release(&ticket).await, report)
            }
            Ran::Finished(_) if lost => {
                report.lost += 1;
                tracing::warn!(key = %claim.key, "worker: the claim ran out before the handler finished; another worker may handle the entry again");
                Ok(())
            }
            Ran::Finished(Ok(())) => {
                let committed = self.space.commit(&ticket).await;
                if committed.is_ok() {
                    report.done += 1;
                }
                self.settle(committed, report)
            }
            Ran::Finished(Err(error)) if attempt >= self.settings.max_attempts => {
                let letter = DeadLetter {
                    entry_type: ticket.entry_type.clone(),
                    key: claim.key.to_string(),
                    attempts: attempt,
                    error,
                    entry: entry_json.unwrap_or_default(),
                };
                tracing::warn!(key = %claim.key, attempts = attempt, error = %letter.error, "worker: moving an entry that kept failing to the dead letters");
                if let Err(e) = self.space.write(&letter).await {
                    // Not written: the claim lapses and the entry, claimed again, is
                    // dead-lettered then (a space out of reach pauses nothing else).
                    return self.settle(Err(e), report);
                }
                let committed = self.space.commit(&ticket).await;
                if committed.is_ok() {
                    report.dead_lettered += 1;
                }
                self.settle(committed, report)
            }
            Ran::Finished(Err(error)) => {
                tracing::debug!(key = %claim.key, attempt, %error, "worker: the handler failed; the entry comes back after the backoff");
                // Cut the claim short: it lapses after the backoff, and the entry is
                // claimable again (a worker that dies now loses nothing either).
                let backoff = self.settings.backoff(attempt).max(Duration::from_millis(1));
                let cut = self.space.renew_claim(&ticket, Lease::For(backoff)).await;
                if cut.is_ok() {
                    report.retried += 1;
                }
                self.settle(cut.map(|_| ()), report)
            }
        }
    }

    /// What settling a claim (commit, release, cut, or its dead letter) that failed means: a claim that ran
    /// out, or a space out of reach, is counted and the slot goes on (the claim lapses and
    /// the entry comes back); anything else stops the pool.
    fn settle(&self, result: Result<()>, report: &mut WorkerReport) -> Result<()> {
        match result {
            Ok(()) => Ok(()),
            Err(SpaceError::ClaimLost { .. }) => {
                report.lost += 1;
                Ok(())
            }
            Err(e) if is_transient(&e) => {
                report.unsettled += 1;
                tracing::warn!(error = %e, "worker: could not settle a claim; it lapses at the end of its lease");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the handler on `job` as a task of its own, renewing the claim every third of
    /// the lease; returns how it ended and whether the claim was lost meanwhile.
    async fn run_renewing(&self, job: Job<T>, ticket: &ClaimTicket) -> (Ran, bool) {
        let lease = self.settings.lease;
        let mut task = tokio::spawn((self.handler)(job));
        let every = (lease / 3).max(Duration::from_millis(1));
        let mut next_renewal = Instant::now() + every;
        let mut lost = false;
        let grace = async {
            self.stopped().await;
            sleep(lease).await;
        };
        tokio::pin!(grace);
        loop {
            tokio::select! {
                finished = &mut task => {
                    let ran = match finished {
                        Ok(result) => result,
                        Err(e) => Err(panic_text(e)),
                    };
                    return (Ran::Finished(ran), lost);
                }
                _ = tokio::time::sleep_until(next_renewal), if !lost => {
                    next_renewal = Instant::now() + every;
                    match self.space.renew_claim(ticket, Lease::For(lease)).await {
                        Ok(_) => {}
                        Err(SpaceError::ClaimLost { .. }) => lost = true,
                        Err(e) => tracing::warn!(error = %e, "worker: could not renew a claim; trying again"),
                    }
                }
                _ = &mut grace => {
                    task.abort();
                    return (Ran::Aborted, lost);
                }
            }
        }
    }
}

impl Display for WorkerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} done, {} retried, {} dead-lettered, {} lost, {} aborted, {} unsettled",
            self.done, self.retried, self.dead_lettered, self.lost, self.aborted, self.unsettled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_up_to_the_longest() {
        let s = Settings {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..Settings::default()
        };
        let pauses: Vec<_> = (1..=6).map(|a| s.backoff(a).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(s.backoff(u32::MAX), Duration::from_secs(1));
    }
}
