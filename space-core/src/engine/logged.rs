//! Subscriptions registered through a replicated log (docs/ARCHITECTURE.md section 9).
//!
//! A subscription that must outlive its leader is registered as a
//! [`Command::Subscribe`] in the log, like any change: every engine the log drives
//! (each replica of a shard, and a durable engine replaying its own log) holds it, matches
//! the changes it applies against it, and numbers the events it tells 1, 2, 3, ... in log
//! order. Replicas that applied the same log therefore number the same events alike, and
//! an image carries each subscription with the number its next event gets, so a replica
//! started from an image continues the same numbering. Whichever replica leads next
//! continues the stream where the last one stopped: its subscriber resumes from the last
//! number it had.
//!
//! The engine that *leads* a log decides: it registers, renews, re-attaches and ends
//! logged subscriptions by proposing those commands, and its timer ends one whose lease
//! ran out (a [`Command::Unsubscribe`] like any expiry). It holds their definitions and
//! deadlines only, and tells no events for them: the replicas, which apply only
//! committed commands, do. Renewals go through the log too, so every replica knows each
//! deadline.
//!
//! A logged subscription's id is chosen by its subscriber ([`new_logged_id`]), with
//! [`LOGGED_ID_BIT`] set so that it never meets the ids an engine numbers its own
//! subscriptions with. Its *attachment* is opaque here: the node that delivers its events
//! keeps there where they go.

use super::*;
use crate::state::LoggedSubscription;

/// The bit every logged subscription's id has set (an engine's own subscription ids,
/// counted from the clock in microseconds, never reach it).
pub const LOGGED_ID_BIT: u64 = 1 << 63;

/// A fresh id for a subscription registered through logs: random, with
/// [`LOGGED_ID_BIT`] set. The same id names it in every shard's log.
pub fn new_logged_id() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 | LOGGED_ID_BIT
}

/// A logged subscription as an engine holds it.
pub(super) struct Logged {
    def: LoggedSubscription,
    /// Its events, in an engine that tells them (not one that leads the log).
    shared: Option<Arc<SubShared>>,
    /// The number its next event gets where nothing numbers them (an engine that leads
    /// the log keeps the number of the image it started from).
    next_seq: u64,
}

impl Logged {
    /// The number the subscription's next event gets.
    fn next_seq(&self) -> u64 {
        self.shared.as_ref().map_or(self.next_seq, |s| s.next_seq())
    }
}

/// What registering a logged subscription changed ([`Engine::subscribe_logged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// The log did not hold it: it is registered.
    Added,
    /// The log held it with another attachment: its events go to the new one.
    Attached,
    /// The log held it as asked: nothing changed.
    Unchanged,
}

/// A logged subscription, as [`Engine::logged`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedView {
    /// Its id (the same in every log that holds it).
    pub id: u64,
    /// The entry type its query is on.
    pub entry_type: Arc<str>,
    /// What it matches.
    pub query: Query,
    /// The kinds of events it wants.
    pub kinds: EventKinds,
    /// Where its events go (see the module documentation).
    pub attachment: Vec<u8>,
    /// When its lease ends (`None`: never).
    pub expires: Option<SystemTime>,
    /// The number its next event gets.
    pub next_seq: u64,
}

/// What keeps a logged subscription's feed: the log does, so dropping or cancelling the
/// feed lets go of nothing, and a renewal goes through the log
/// ([`Engine::renew_logged`]).
struct LogKept(NodeId);

impl Keeper for LogKept {
    fn node(&self) -> NodeId {
        self.0
    }

    fn renew_subscription(&self, sub: &Arc<SubShared>, _lease: Lease) -> Result<()> {
        Err(SpaceError::Protocol {
            reason: format!(
                "subscription {:#x} is renewed through its log, not through a feed",
                sub.id
            ),
        })
    }

    fn unsubscribe(&self, _sub: &Arc<SubShared>) {}
}

/// Where the logged subscription `id`'s events go from now on.
pub(super) fn attach(st: &mut TypeState, id: u64, attachment: Vec<u8>) -> Outcome {
    match st.logged.get_mut(&id) {
        Some(logged) => {
            logged.def.attachment = attachment;
            Outcome::Changed
        }
        None => Outcome::Missing,
    }
}

impl Engine {
    /// Whether this engine tells logged subscriptions' events: every engine but one that
    /// leads a replicated log.
    fn tells_logged(&self) -> bool {
        self.inner.proposals.is_none()
    }

    /// Applies [`Command::Subscribe`]: the subscription is held from here on, its next
    /// event numbered `next_seq` (1, or what an image says). A subscription held already
    /// (a registration sent again) stays as it is.
    pub(super) fn apply_subscribe(
        &self,
        st: &mut TypeState,
        def: LoggedSubscription,
        next_seq: u64,
    ) -> Outcome {
        if st.logged.contains_key(&def.id) {
            return Outcome::Missing;
        }
        let shared = self.tells_logged().then(|| {
            Arc::new(
                SubShared::new(
                    def.id,
                    st.name.clone(),
                    Arc::new(def.query.clone()),
                    def.kinds,
                    self.inner.config.queue_capacity,
                    self.inner.events.clone(),
                    def.expires,
                )
                .numbered_from(next_seq),
            )
        });
        // A query its leader accepted compiles alike everywhere; one that does not is
        // held unmatched on every replica alike, so that images still agree.
        let shared = shared.and_then(|shared| match st.hub.add(shared.clone()) {
            Ok(()) => Some(shared),
            Err(e) => {
                tracing::warn!(id = def.id, error = %e, "a logged subscription's query does not compile");
                None
            }
        });
        self.arm_logged(&st.name, def.id, def.expires);
        self.inner.logged_count.fetch_add(1, Ordering::Relaxed);
        st.logged.insert(
            def.id,
            Logged {
                def,
                shared,
                next_seq,
            },
        );
        Outcome::Changed
    }

    /// Applies [`Command::RenewSubscriptions`].
    pub(super) fn apply_renew_subscriptions(
        &self,
        st: &mut TypeState,
        ids: &[u64],
        expires: Option<Deadline>,
    ) -> Outcome {
        let mut outcome = Outcome::Missing;
        for id in ids {
            if let Some(logged) = st.logged.get_mut(id) {
                logged.def.expires = expires;
                if let Some(shared) = &logged.shared {
                    shared.set_expires(expires);
                }
                self.arm_logged(&st.name, *id, expires);
                outcome = Outcome::Changed;
            }
        }
        outcome
    }

    /// Applies [`Command::Unsubscribe`]: matched no more; what it told is still delivered
    /// when its lease ran out (`expired`), discarded when it was cancelled.
    pub(super) fn apply_unsubscribe(&self, st: &mut TypeState, id: u64, expired: bool) -> Outcome {
        let Some(logged) = st.logged.remove(&id) else {
            return Outcome::Missing;
        };
        self.inner.logged_count.fetch_sub(1, Ordering::Relaxed);
        if let Some(shared) = logged.shared {
            st.hub.remove(id);
            if expired {
                shared.finish();
            } else {
                shared.close();
            }
        }
        Outcome::Changed
    }

    /// Arms the lease timer of a logged subscription (an engine that decides expiries).
    fn arm_logged(&self, entry_type: &Arc<str>, id: u64, expires: Option<Deadline>) {
        if let Some(at) = expires {
            self.schedule(
                at,
                TimerKind::Logged {
                    entry_type: entry_type.clone(),
                    id,
                },
            );
        }
    }

    /// Ends the logged subscription `id` if its lease ran out by `now` (its timer came
    /// due; a renewal may have moved the deadline since).
    pub(super) fn expire_logged(&self, st: &mut TypeState, id: u64, now: &Now) {
        let due = st
            .logged
            .get(&id)
            .and_then(|l| l.def.expires)
            .is_some_and(|e| e <= now.get());
        if due {
            self.execute(st, Command::Unsubscribe { id, expired: true });
        }
    }

    /// The logged subscriptions' definitions and next numbers, per entry type, for an
    /// image.
    pub(super) fn logged_image(st: &TypeState) -> Vec<(LoggedSubscription, u64)> {
        st.logged
            .values()
            .map(|l| (l.def.clone(), l.next_seq()))
            .collect()
    }

    /// Registers the subscription `id` (chosen by its subscriber, with
    /// [`LOGGED_ID_BIT`] set) through this engine's log: a [`Command::Subscribe`] with
    /// the lease's deadline and `attachment`, proposed (or logged) and applied; its
    /// events are numbered after `after` (0, or the last number its subscriber had
    /// from a registration in this log that ended meanwhile). A subscription the log
    /// holds already is not registered again (a registration sent again, or a
    /// subscriber that resumes it): it is attached to `attachment` if that is another
    /// one. Wait for [`flush`](Self::flush) before telling anyone what changed. Does not
    /// block beyond the entry type's lock.
    ///
    /// # Errors
    /// An id without the bit, or an engine that a log drives (it decides nothing):
    /// [`SpaceError::Protocol`]. A malformed query, a kind the type's schema does not
    /// allow, an unusable lease, or too many subscriptions (`Busy`).
    pub fn subscribe_logged(
        &self,
        id: u64,
        query: &Query,
        kinds: EventKinds,
        lease: Lease,
        attachment: Vec<u8>,
        after: u64,
    ) -> Result<Registered> {
        self.decides_logged(id)?;
        query.validate()?;
        let expires = lease.deadline(&self.now())?;
        self.locked(query.entry_type(), |_, st| {
            if let Some(held) = st.logged.get(&id) {
                if held.def.attachment == attachment {
                    return Ok(Registered::Unchanged);
                }
                self.execute(st, Command::Attach { id, attachment });
                return Ok(Registered::Attached);
            }
            Self::check_kinds(st, query)?;
            if let Some(max) = self.inner.config.max_subscriptions
                && self.inner.logged_count.load(Ordering::Relaxed) >= max
            {
                return Err(SpaceError::Busy {
                    node: String::new(),
                    reason: format!("it holds its maximum of {max} subscriptions"),
                });
            }
            let subscription = Box::new(LoggedSubscription {
                id,
                query: query.clone(),
                kinds,
                expires,
                attachment,
                first_seq: after.saturating_add(1),
            });
            self.execute(st, Command::Subscribe { subscription });
            Ok(Registered::Added)
        })?
    }

    /// Renews, through the log, the leases of the logged subscriptions `ids` on
    /// `entry_type` to `lease` from now. Returns the ids this log holds (and renewed).
    ///
    /// # Errors
    /// An engine that a log drives ([`SpaceError::Protocol`]), or an unusable lease.
    pub fn renew_logged(&self, entry_type: &str, ids: &[u64], lease: Lease) -> Result<Vec<u64>> {
        self.decides_logged(LOGGED_ID_BIT)?;
        let expires = lease.deadline(&self.now())?;
        let renewed = self.locked_if_exists(entry_type, |_, st| {
            let held: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| st.logged.contains_key(id))
                .collect();
            if !held.is_empty() {
                let ids = held.clone();
                self.execute(st, Command::RenewSubscriptions { ids, expires });
            }
            held
        });
        Ok(renewed.unwrap_or_default())
    }

    /// Sends the logged subscription `id`'s events to `attachment` from now on, through
    /// the log. Returns `false` when the log does not hold it (it ended).
    ///
    /// # Errors
    /// An engine that a log drives ([`SpaceError::Protocol`]).
    pub fn attach_logged(&self, entry_type: &str, id: u64, attachment: Vec<u8>) -> Result<bool> {
        self.decides_logged(id)?;
        let attached = self.locked_if_exists(entry_type, |_, st| {
            let held = st.logged.contains_key(&id);
            if held {
                self.execute(st, Command::Attach { id, attachment });
            }
            held
        });
        Ok(attached.unwrap_or(false))
    }

    /// Cancels the logged subscription `id`, through the log. Returns `false` when the
    /// log does not hold it.
    ///
    /// # Errors
    /// An engine that a log drives ([`SpaceError::Protocol`]).
    pub fn unsubscribe_logged(&self, entry_type: &str, id: u64) -> Result<bool> {
        self.decides_logged(id)?;
        let ended = self.locked_if_exists(entry_type, |_, st| {
            let held = st.logged.contains_key(&id);
            if held {
                self.execute(st, Command::Unsubscribe { id, expired: false });
            }
            held
        });
        Ok(ended.unwrap_or(false))
    }

    /// Refuses what only the engine that decides may do, and an id without
    /// [`LOGGED_ID_BIT`].
    fn decides_logged(&self, id: u64) -> Result<()> {
        if id & LOGGED_ID_BIT == 0 {
            return Err(SpaceError::Protocol {
                reason: format!("{id:#x} is not the id of a logged subscription"),
            });
        }
        if self.inner.replica {
            return Err(SpaceError::Protocol {
                reason: "a replica applies its log's subscriptions and decides none".into(),
            });
        }
        Ok(())
    }

    /// Whether this engine holds the logged subscription `id` on `entry_type`.
    pub fn holds_logged(&self, entry_type: &str, id: u64) -> bool {
        self.locked_if_exists(entry_type, |_, st| st.logged.contains_key(&id))
            .unwrap_or(false)
    }

    /// Every logged subscription this engine holds (none without looking at a type when
    /// it holds none).
    pub fn logged(&self) -> Vec<LoggedView> {
        if self.inner.logged_count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let cells: Vec<Arc<TypeCell>> = self.inner.cells.load().values().cloned().collect();
        let mut all = Vec::new();
        for cell in cells {
            let st = cell.lock();
            all.extend(st.logged.values().map(|l| LoggedView {
                id: l.def.id,
                entry_type: st.name.clone(),
                query: l.def.query.clone(),
                kinds: l.def.kinds,
                attachment: l.def.attachment.clone(),
                expires: l.def.expires.map(Deadline::to_system_time),
                next_seq: l.next_seq(),
            }));
        }
        all
    }

    /// The events this engine told the logged subscription `id` on `entry_type`, as a
    /// [`Subscription`] to receive them from (`None` when it holds no such subscription,
    /// or tells no events: an engine that leads its log). What is received there is
    /// received once, whoever holds the feed; [`Subscription::rewind`] delivers again
    /// from a number (what the engine no longer keeps comes as one gap). Dropping or
    /// cancelling the feed does not end the subscription: only its log does.
    pub fn logged_feed(&self, entry_type: &str, id: u64) -> Option<Subscription> {
        let shared = self
            .locked_if_exists(entry_type, |_, st| {
                st.logged.get(&id).and_then(|l| l.shared.clone())
            })
            .flatten()?;
        Some(Subscription::local(
            shared,
            Box::new(LogKept(self.inner.config.node)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use space_query::{Fields, Filter, Value};

    use super::*;
    use crate::notify::{EventKind, Notification};

    /// A log as a leading engine sees it: what it proposes is committed at once, in the
    /// order of its numbers.
    #[derive(Default)]
    struct InstantLog(Mutex<Vec<Option<Vec<u8>>>>);

    impl InstantLog {
        /// The commands proposed so far, in log order (from index 1).
        fn commands(&self) -> Vec<Vec<u8>> {
            self.0
                .lock()
                .iter()
                .map(|c| c.clone().unwrap_or_default())
                .collect()
        }
    }

    impl Proposals for InstantLog {
        fn propose(&self, command: Vec<u8>) -> u64 {
            let mut log = self.0.lock();
            log.push(Some(command));
            log.len() as u64
        }

        fn reserve(&self) -> u64 {
            let mut log = self.0.lock();
            log.push(None);
            log.len() as u64
        }

        fn fill(&self, seq: u64, command: Vec<u8>) {
            self.0.lock()[usize::try_from(seq).unwrap_or(usize::MAX) - 1] = Some(command);
        }

        fn settled(
            &self,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> {
            Box::pin(async { Ok(()) })
        }

        fn settled_blocking(&self) -> Result<()> {
            Ok(())
        }
    }

    fn config(clock: &Clock) -> EngineConfig {
        EngineConfig {
            clock: clock.clone(),
            ..EngineConfig::default()
        }
    }

    /// An engine leading an [`InstantLog`], from an empty state.
    fn leader(clock: &Clock) -> (Engine, Arc<InstantLog>) {
        let log = Arc::new(InstantLog::default());
        let empty = Engine::replica(None, config(clock)).image(0);
        let engine = Engine::leading(None, config(clock), &empty, log.clone()).unwrap();
        (engine, log)
    }

    /// Applies `commands` (log indexes from `first`) to `replica`.
    fn apply(replica: &Engine, first: u64, commands: &[Vec<u8>]) {
        for (index, command) in (first..).zip(commands) {
            replica.apply_logged(index, command).unwrap();
        }
    }

    fn job(n: i64) -> Fields {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    }

    /// Every notification the feed has now, as (number, key, kind) for events.
    fn drain(feed: &Subscription) -> Vec<(u64, String, EventKind)> {
        std::iter::from_fn(|| feed.try_recv())
            .map(|n| match n {
                Notification::Event(e) => (e.seq, e.key.to_string(), e.kind),
                other => panic!("a feed of a replica that applied every command told {other:?}"),
            })
            .collect()
    }

    #[test]
    fn replicas_number_a_logged_subscriptions_events_alike() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let (leading, log) = leader(&clock);
        let id = new_logged_id();
        let odd = Query::new(
            "Job",
            Filter::Eq("n".into(), Value::I64(1)).or(Filter::Gt("n".into(), Value::I64(20))),
        );
        let register = |attachment: &[u8]| {
            leading
                .subscribe_logged(
                    id,
                    &odd,
                    EventKinds::ALL,
                    Lease::Forever,
                    attachment.to_vec(),
                    0,
                )
                .unwrap()
        };
        assert_eq!(register(b"a"), Registered::Added);
        // Sent again, it changes nothing.
        assert_eq!(register(b"a"), Registered::Unchanged);
        // Sent with another attachment (a subscriber that resumed it), it moves there.
        assert_eq!(register(b"b"), Registered::Attached);
        for n in 0..40 {
            leading.write("Job", job(n), None, Lease::Forever).unwrap();
        }
        let all = Query::new("Job", Filter::All);
        for _ in 0..30 {
            leading.take(&all, Duration::ZERO).unwrap().wait().unwrap();
        }
        // The engine that decides tells nothing itself.
        assert!(leading.logged_feed("Job", id).is_none());

        let commands = log.commands();
        let whole = Engine::replica(None, config(&clock));
        apply(&whole, 1, &commands);
        let told = drain(&whole.logged_feed("Job", id).unwrap());
        // n = 1 and n = 21..40: each written, and the first ten of them taken.
        assert_eq!(told.len(), 20 + 10, "{told:?}");
        assert!(told.iter().map(|t| t.0).eq(1..=30), "{told:?}");

        // A replica that starts from an image cut halfway continues the same numbers.
        let half = commands.len() / 2;
        let first = Engine::replica(None, config(&clock));
        apply(&first, 1, &commands[..half]);
        let before = drain(&first.logged_feed("Job", id).unwrap());
        let image = first.image(half as u64);
        let late = Engine::replica_from_image(None, config(&clock), &image).unwrap();
        apply(&late, half as u64 + 1, &commands[half..]);
        let after = drain(&late.logged_feed("Job", id).unwrap());
        assert!(!before.is_empty() && !after.is_empty());
        assert_eq!([before, after].concat(), told);

        // Every engine holds the subscription where it was attached last.
        let held = late.logged();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].id, held[0].attachment.as_slice()), (id, &b"b"[..]));
        assert_eq!(held[0].next_seq, 31);
        assert_eq!(late.state_digest(), whole.state_digest());
        assert_eq!(leading.state_digest(), whole.state_digest());
    }

    #[test]
    fn a_logged_subscription_ends_when_its_leaders_timer_says_so() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let (leading, log) = leader(&clock);
        let replica = Engine::replica(None, config(&clock));
        let mut applied = 0;
        let mut catch_up = || {
            let commands = log.commands();
            apply(&replica, applied as u64 + 1, &commands[applied..]);
            applied = commands.len();
        };
        let all = Query::new("Job", Filter::All);
        let (leased, cancelled) = (new_logged_id(), new_logged_id());
        let lease = Lease::For(Duration::from_secs(1));
        leading
            .subscribe_logged(leased, &all, EventKinds::ALL, lease, Vec::new(), 0)
            .unwrap();
        leading
            .subscribe_logged(
                cancelled,
                &all,
                EventKinds::ALL,
                Lease::Forever,
                Vec::new(),
                0,
            )
            .unwrap();
        leading.write("Job", job(1), None, Lease::Forever).unwrap();
        catch_up();
        let leased_feed = replica.logged_feed("Job", leased).unwrap();
        let cancelled_feed = replica.logged_feed("Job", cancelled).unwrap();

        // Renewed half way, through the log; re-attached elsewhere.
        clock.advance(Duration::from_millis(500));
        assert_eq!(
            leading
                .renew_logged("Job", &[leased, 7 | LOGGED_ID_BIT], lease)
                .unwrap(),
            [leased]
        );
        assert!(
            leading
                .attach_logged("Job", leased, b"elsewhere".to_vec())
                .unwrap()
        );
        clock.advance(Duration::from_millis(700));
        leading.fire_due();
        catch_up();
        assert!(!leased_feed.is_closed(), "it ended at its first deadline");
        let held = replica.logged();
        assert_eq!(held.len(), 2);
        assert!(
            held.iter()
                .any(|h| h.id == leased && h.attachment == b"elsewhere")
        );

        // Past the renewed deadline the leader's timer ends it: what it told is still
        // delivered, then its stream ends.
        clock.advance(Duration::from_millis(400));
        leading.fire_due();
        catch_up();
        assert_eq!(drain(&leased_feed).len(), 1);
        assert!(leased_feed.is_closed());
        assert!(!leased_feed.is_cancelled());

        // A cancel discards what was told.
        assert!(leading.unsubscribe_logged("Job", cancelled).unwrap());
        assert!(!leading.unsubscribe_logged("Job", cancelled).unwrap());
        catch_up();
        assert!(cancelled_feed.is_closed() && cancelled_feed.is_cancelled());
        assert!(cancelled_feed.try_recv().is_none());
        assert!(replica.logged().is_empty());
        // Dropping a feed lets go of nothing: the log holds what it holds.
        assert_eq!(leading.state_digest(), replica.state_digest());
    }

    #[test]
    fn only_the_engine_that_decides_registers_and_only_logged_ids() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let (leading, _log) = leader(&clock);
        let all = Query::new("Job", Filter::All);
        let err = leading
            .subscribe_logged(42, &all, EventKinds::ALL, Lease::Forever, Vec::new(), 0)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("not the id of a logged subscription"),
            "{err}"
        );
        let replica = Engine::replica(None, config(&clock));
        let err = replica
            .subscribe_logged(
                new_logged_id(),
                &all,
                EventKinds::ALL,
                Lease::Forever,
                Vec::new(),
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("decides none"), "{err}");
        assert!(replica.logged().is_empty());
    }
}
