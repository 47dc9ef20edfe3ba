//! The state of one log and the one function that changes it (docs/ARCHITECTURE.md
//! section 8).
//!
//! Every change of the space is a [`Command`] on one entry type's [`Store`]. The engine
//! (the executor) *decides* a command: it reads the clock, mints keys, draws claim tokens,
//! picks the oldest match and the waiter a new entry goes to, notices that a lease ran
//! out; everything it decided is in the command. [`apply`] then carries the command out.
//! It is pure: it reads no clock, draws no random numbers, spawns nothing and does no I/O,
//! so applying the same commands in the same order always gives the same state. Live
//! operations are *decide, append to the log, apply*; recovery (and, later, a replica)
//! replays the log through the same `apply`.
//!
//! The [`Outcome`] says what applying did; the engine wakes waiters and tells
//! subscriptions from it. The [`Answers`] table, also changed only by `apply`, keeps the
//! answers of recent requests by their id, so that a request retried after a lost answer
//! or a crash gets its first answer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use space_query::Query;

use crate::document::{ClaimTicket, ClaimedDocument, Document, Receipt, RequestId};
use crate::entry::NodeId;
use crate::lease::Deadline;
use crate::notify::EventKinds;
use crate::store::{ClaimState, Record, Store};

/// The number of requests whose answers the state keeps, at most.
pub(crate) const ANSWERS_KEPT: usize = 65_536;

/// Bytes of entries from which an answer is worth a logged acknowledgement
/// (`Command::Acknowledged`): the command costs a few dozen bytes in the log and an
/// apply on every replica, and frees the entries the answer held (for a minute,
/// otherwise), a hundred times as many bytes or more. Smaller answers are forgotten with
/// time.
pub const ACKNOWLEDGE_FROM_BYTES: usize = 4096;

/// The longest the answer of a request decided at a known time (every logged command
/// carries the time it was decided; a shard's, its leader's) is kept: a minute, six
/// times a client's default `retry_for`, by which a request sent again, or given up and
/// revoked, has long been asked about. Older answers are forgotten even below
/// [`ANSWERS_KEPT`] (which may forget them sooner), so a node's answer tables (one per
/// shard, two for a shard it leads) grow with its rate of requests rather than with its
/// shard count.
pub(crate) const ANSWERS_KEPT_FOR: Duration = Duration::from_secs(60);

/// Why an entry left the space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Cause {
    /// A take removed it.
    Taken,
    /// The commit of a claim removed it.
    Committed,
    /// Its lease ran out (decided by the node's timer).
    Expired,
    /// Its lease was cancelled.
    Cancelled,
}

/// Who a new entry was handed to instead of being stored: the waiting taker or claimer
/// that had waited longest, identified by its request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum HandOff {
    /// A waiting taker got it: it is not stored.
    Taken { request: Option<RequestId> },
    /// A waiting claimer got it: it is stored, claimed.
    Claimed {
        token: u64,
        expires: Deadline,
        request: Option<RequestId>,
    },
}

/// One decided change of one entry type's store. Sequence numbers name records (and give
/// the write order); deadlines are absolute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Command {
    /// A new entry, or one given back where it was (same key, place and version): the
    /// record as it is stored (unclaimed; a hand-off to a claimer claims it).
    Write {
        seq: u64,
        record: Record,
        /// The entry brings field kinds the type's schema learns.
        learn: bool,
        to: Option<HandOff>,
        request: Option<RequestId>,
        /// The entry is given back from what request `gives_back` took (a take or commit
        /// its caller gave up): the request's answer records it, so that it is given back
        /// once only, whichever leader is asked.
        gives_back: Option<RequestId>,
    },
    /// An entry leaves the space.
    Remove {
        seq: u64,
        cause: Cause,
        request: Option<RequestId>,
    },
    /// A visible entry is claimed until `expires`.
    Claim {
        seq: u64,
        token: u64,
        expires: Deadline,
        request: Option<RequestId>,
    },
    /// A claimed entry becomes visible again: released by its claimer, or its claim's
    /// lease ran out (`lapsed`, decided by the node's timer).
    Release {
        seq: u64,
        lapsed: bool,
        request: Option<RequestId>,
    },
    /// An entry's lease now ends at `expires` (`None`: never).
    Renew { seq: u64, expires: Option<Deadline> },
    /// A claim's lease now ends at `expires`.
    RenewClaim { seq: u64, expires: Deadline },
    /// The type's store indexes a top-level field.
    Index { field: String },
    /// The callers of `requests` acknowledged their answers: the entries those answers
    /// hold are dropped, and a request sent again with one of these ids is refused
    /// ([`Answers::acknowledge`]). Changes no store.
    Acknowledged { requests: Vec<RequestId> },
    /// The commands one call decided on one entry type, in order (a batch of writes):
    /// logged as one record (one replicated entry), so that a crash or a failover keeps
    /// all of them or none. Applied one after the other; the answers they record are the
    /// command's, in its one place of the log ([`BatchMarks`]). Never nested.
    Batch { commands: Vec<Command> },
    /// A subscription registered through the log (a shard's): every engine the log
    /// drives holds it, matches it and numbers its events alike, so that whichever
    /// replica leads next continues its stream (see `engine::logged`). Changes no store.
    Subscribe {
        subscription: Box<LoggedSubscription>,
    },
    /// The leases of the logged subscriptions `ids` now end at `expires` (`None`: never).
    RenewSubscriptions {
        ids: Vec<u64>,
        expires: Option<Deadline>,
    },
    /// Where the logged subscription `id`'s events go now (its subscriber resumed it
    /// elsewhere).
    Attach { id: u64, attachment: Vec<u8> },
    /// A logged subscription ends: cancelled, or its lease ran out (`expired`, decided by
    /// the leader's timer): what it told is still delivered then.
    Unsubscribe { id: u64, expired: bool },
}

/// A subscription as a log holds it (see [`Command::Subscribe`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LoggedSubscription {
    /// Chosen by its subscriber, with the engine's bit for logged subscriptions set, the
    /// same in every shard's log.
    pub(crate) id: u64,
    pub(crate) query: Query,
    pub(crate) kinds: EventKinds,
    /// When its lease ends (`None`: never).
    pub(crate) expires: Option<Deadline>,
    /// Where its events go, in the terms of whoever delivers them (a node: the endpoint
    /// to push to, or none when its subscriber polls).
    pub(crate) attachment: Vec<u8>,
    /// The number its first event gets (1, or past what its subscriber had from an
    /// earlier registration in this log that ended).
    pub(crate) first_seq: u64,
}

impl Command {
    /// Whether applying the command records an answer (it carries a request id).
    pub(crate) fn answers(&self) -> bool {
        match self {
            Command::Write {
                to,
                request,
                gives_back,
                ..
            } => {
                request.is_some()
                    || gives_back.is_some()
                    || matches!(
                        to,
                        Some(
                            HandOff::Taken { request: Some(_) }
                                | HandOff::Claimed {
                                    request: Some(_),
                                    ..
                                }
                        )
                    )
            }
            Command::Remove { request, .. }
            | Command::Claim { request, .. }
            | Command::Release { request, .. } => request.is_some(),
            Command::Acknowledged { .. } => true,
            Command::Renew { .. }
            | Command::RenewClaim { .. }
            | Command::Index { .. }
            | Command::Subscribe { .. }
            | Command::RenewSubscriptions { .. }
            | Command::Attach { .. }
            | Command::Unsubscribe { .. } => false,
            Command::Batch { commands } => commands.iter().any(Command::answers),
        }
    }

    /// The largest claim token the command carries.
    pub(crate) fn token(&self) -> Option<u64> {
        match self {
            Command::Claim { token, .. }
            | Command::Write {
                to: Some(HandOff::Claimed { token, .. }),
                ..
            } => Some(*token),
            Command::Batch { commands } => commands.iter().filter_map(Command::token).max(),
            _ => None,
        }
    }
}

/// What applying a command did.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A write was stored (claimed, when handed to a claimer).
    Stored,
    /// A write went straight to a waiting taker: here it is.
    HandedOff(Record),
    /// An entry left the space: here it is (its version bumped when it expired or was
    /// cancelled, as its last event tells).
    Removed(Record),
    /// A claim, release, renewal or index took effect.
    Changed,
    /// Nothing had the command's sequence number (or the claim it names): nothing changed.
    Missing,
}

/// Applies one command to the store of `entry_type`, recording answers in `answers`
/// (needed only when [`Command::answers`]). `index` is the command's index in its log
/// (`None` for an engine without one): an answer already holding a command at or past
/// it is not recorded twice when the log is replayed over a snapshot. `at` is when the
/// command was decided, as its log holds it (`None` without a log): answers decided
/// [`ANSWERS_KEPT_FOR`] before it are forgotten. Pure: see the module documentation.
#[inline]
pub(crate) fn apply(
    entry_type: &str,
    store: &mut Store,
    answers: Option<&mut Answers>,
    index: Option<u64>,
    at: Option<Deadline>,
    command: Command,
) -> Outcome {
    let mut answers = answers;
    if let (
        Command::Write {
            gives_back: Some(id),
            record,
            ..
        },
        Some(table),
    ) = (&command, answers.as_deref_mut())
    {
        table.mark_given_back(*id, entry_type, &record.key);
    }
    // Answers are built only for requests that have an id (a node's calls), never on the
    // in-process path.
    let mut answer = |request: Option<RequestId>, part: &dyn Fn() -> Part| {
        if let (Some(id), Some(table)) = (request, answers.as_deref_mut()) {
            table.record(id, index, at, part());
        }
    };
    match command {
        Command::Write {
            seq,
            mut record,
            learn,
            to,
            request,
            gives_back: _,
        } => {
            store.skip_to(seq);
            if learn {
                store.learn_kinds(&record.fields);
            }
            record.claim = None;
            answer(request, &|| {
                Part::Receipt(Receipt {
                    node: NodeId::default(),
                    key: record.key.clone(),
                    version: record.version,
                    expires: record.expires.map(Deadline::to_system_time),
                })
            });
            match to {
                None => {
                    store.insert(seq, record);
                    Outcome::Stored
                }
                Some(HandOff::Taken { request }) => {
                    answer(request, &|| Part::Taken(held(entry_type, seq, &record)));
                    Outcome::HandedOff(record)
                }
                Some(HandOff::Claimed {
                    token,
                    expires,
                    request,
                }) => {
                    record.claim = Some(ClaimState { token, expires });
                    record.claims = record.claims.saturating_add(1);
                    record.version += 1;
                    answer(request, &|| Part::Claimed(claimed(entry_type, &record)));
                    store.insert(seq, record);
                    Outcome::Stored
                }
            }
        }
        Command::Remove {
            seq,
            cause,
            request,
        } => match store.remove(seq) {
            Some(mut record) => {
                match cause {
                    Cause::Taken => {
                        answer(request, &|| Part::Taken(held(entry_type, seq, &record)))
                    }
                    Cause::Committed => {
                        answer(request, &|| Part::Committed(held(entry_type, seq, &record)));
                    }
                    Cause::Cancelled => answer(request, &|| Part::Done),
                    Cause::Expired => {}
                }
                if matches!(cause, Cause::Expired | Cause::Cancelled) {
                    record.version += 1;
                }
                Outcome::Removed(record)
            }
            None => Outcome::Missing,
        },
        Command::Claim {
            seq,
            token,
            expires,
            request,
        } => match store.get_mut(seq) {
            Some(record) if record.claim.is_none() => {
                record.claim = Some(ClaimState { token, expires });
                record.claims = record.claims.saturating_add(1);
                record.version += 1;
                answer(request, &|| Part::Claimed(claimed(entry_type, record)));
                Outcome::Changed
            }
            _ => Outcome::Missing,
        },
        Command::Release {
            seq,
            lapsed: _,
            request,
        } => match store.get_mut(seq) {
            Some(record) if record.claim.is_some() => {
                record.claim = None;
                record.version += 1;
                answer(request, &|| Part::Done);
                Outcome::Changed
            }
            _ => Outcome::Missing,
        },
        Command::Renew { seq, expires } => match store.get_mut(seq) {
            Some(record) => {
                record.expires = expires;
                Outcome::Changed
            }
            None => Outcome::Missing,
        },
        Command::RenewClaim { seq, expires } => {
            match store.get_mut(seq).and_then(|r| r.claim.as_mut()) {
                Some(claim) => {
                    claim.expires = expires;
                    Outcome::Changed
                }
                None => Outcome::Missing,
            }
        }
        Command::Index { field } => {
            store.ensure_index(&field);
            Outcome::Changed
        }
        Command::Acknowledged { requests } => {
            if let Some(table) = answers {
                table.acknowledge(&requests);
            }
            Outcome::Changed
        }
        // The engine applies a batch's commands one by one (each tells its events), in
        // `BatchMarks::applying`.
        Command::Batch { .. } => Outcome::Missing,
        // Subscriptions are the engine's, not a store's (`Engine::apply` applies them).
        Command::Subscribe { .. }
        | Command::RenewSubscriptions { .. }
        | Command::Attach { .. }
        | Command::Unsubscribe { .. } => Outcome::Missing,
    }
}

/// The claimed copy of a record, as the claimer's answer.
pub(crate) fn claimed(entry_type: &str, record: &Record) -> ClaimedDocument {
    let (token, expires) = record
        .claim
        .map_or((0, Deadline::from_ms(0)), |c| (c.token, c.expires));
    ClaimedDocument {
        document: record.document(),
        ticket: ClaimTicket {
            entry_type: entry_type.to_owned(),
            key: record.key.clone(),
            token,
        },
        expires: expires.to_system_time(),
        claims: record.claims,
    }
}

/// The answer a request got, as the state keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// A write's receipts (one per entry written). The node id in them is the engine's.
    Receipts(Vec<Receipt>),
    /// What a take removed (oldest first).
    Documents(Vec<Document>),
    /// What a claim claimed.
    Claimed(ClaimedDocument),
    /// A commit, release or cancel took effect.
    Done,
    /// The request's caller gave it up, and what it took was given back
    /// ([`Engine::give_back`](crate::server::Engine::give_back)): a retry is answered
    /// [`SpaceError::Revoked`](crate::SpaceError::Revoked).
    Revoked,
    /// The request's caller acknowledged the answer, and what it carried is no longer
    /// kept ([`Engine::acknowledge`](crate::server::Engine::acknowledge)): a retry is
    /// answered [`SpaceError::Acknowledged`](crate::SpaceError::Acknowledged).
    Acknowledged,
}

/// An entry a request removed, kept whole with the request's answer so that the entry
/// can be given back where it was if the request's caller gives the request up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Held {
    entry_type: Arc<str>,
    seq: u64,
    record: Record,
    /// Given back already (by a command that names the request).
    given_back: bool,
}

fn held(entry_type: &str, seq: u64, record: &Record) -> Held {
    Held {
        entry_type: entry_type.into(),
        seq,
        record: record.clone(),
        given_back: false,
    }
}

/// An answer as the table keeps it: what the request removed is kept whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Kept {
    Receipts(Vec<Receipt>),
    /// What a take removed (oldest first).
    Taken(Vec<Held>),
    Claimed(ClaimedDocument),
    /// What a commit removed.
    Committed(Held),
    Done,
    /// Its caller acknowledged the answer: what the answer held is dropped.
    Acknowledged,
}

/// One command's share of a request's answer (a take of several entries, or a write of
/// several, answers with all of them).
enum Part {
    Receipt(Receipt),
    Taken(Held),
    Claimed(ClaimedDocument),
    Committed(Held),
    Done,
}

/// What giving a request up undoes, as its answer says
/// ([`Answers::to_give_back`]).
pub(crate) enum GiveBack {
    /// Entries it took (or committed) that are not given back yet.
    Entries(Vec<Taken>),
    /// The claim it made (released, if it is still held).
    Claim(ClaimTicket),
    /// Nothing: it removed and claimed nothing, all of it is back, or its answer is
    /// not kept.
    Nothing,
}

/// The answers of the last [`ANSWERS_KEPT`] requests, by request id, each with the log
/// place of the last command that added to it; the oldest are forgotten first, and
/// those older than [`ANSWERS_KEPT_FOR`] when a newer one is recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Answers {
    /// Request ids, oldest first, with the time their first command was decided (when
    /// the command carried one).
    order: VecDeque<(RequestId, Option<Deadline>)>,
    map: HashMap<RequestId, (Kept, Option<u64>), foldhash::fast::RandomState>,
}

impl Answers {
    /// Forgets the oldest answers while more than [`ANSWERS_KEPT`] are kept, or while
    /// the oldest was decided longer than [`ANSWERS_KEPT_FOR`] before `now` (or at an
    /// unknown time, when `now` is known).
    fn forget_old(&mut self, now: Option<Deadline>) {
        let horizon = now.map(|n| {
            n.to_ms()
                .saturating_sub(ANSWERS_KEPT_FOR.as_millis() as u64)
        });
        while let Some(&(oldest, at)) = self.order.front() {
            // An answer without a time (not decided by a logged command) is as old as
            // any: it never holds younger answers back.
            let too_old = horizon.is_some_and(|h| at.is_none_or(|at| at.to_ms() < h));
            if self.order.len() <= ANSWERS_KEPT && !too_old {
                break;
            }
            self.order.pop_front();
            self.map.remove(&oldest);
        }
    }

    fn record(&mut self, id: RequestId, index: Option<u64>, at: Option<Deadline>, part: Part) {
        let already = |map: &HashMap<_, (Kept, Option<u64>), _>| matches!((index, map.get(&id)), (Some(index), Some((_, Some(last)))) if *last >= index);
        match BatchMarks::seen(id) {
            // An earlier command of the same batch recorded a part of this answer.
            Some(true) => {}
            Some(false) => return,
            None if BatchMarks::active() => {
                let fresh = !already(&self.map);
                BatchMarks::note(id, fresh);
                if !fresh {
                    return;
                }
            }
            None if already(&self.map) => return,
            None => {}
        }
        let prev = self.map.remove(&id).map(|(a, _)| a);
        if prev.is_none() {
            self.order.push_back((id, at));
            self.forget_old(at);
        }
        let kept = match (prev, part) {
            (Some(Kept::Receipts(mut v)), Part::Receipt(r)) => {
                v.push(r);
                Kept::Receipts(v)
            }
            (Some(Kept::Taken(mut v)), Part::Taken(h)) => {
                v.push(h);
                Kept::Taken(v)
            }
            (_, Part::Receipt(r)) => Kept::Receipts(vec![r]),
            (_, Part::Taken(h)) => Kept::Taken(vec![h]),
            (_, Part::Claimed(c)) => Kept::Claimed(c),
            (_, Part::Committed(h)) => Kept::Committed(h),
            (_, Part::Done) => Kept::Done,
        };
        self.map.insert(id, (kept, index));
    }

    /// The answer of request `id`, if it is still kept.
    pub(crate) fn get(&self, id: RequestId) -> Option<Answer> {
        let (kept, _) = self.map.get(&id)?;
        Some(match kept {
            Kept::Receipts(r) => Answer::Receipts(r.clone()),
            Kept::Taken(held) if held.iter().any(|h| h.given_back) => Answer::Revoked,
            Kept::Taken(held) => {
                Answer::Documents(held.iter().map(|h| h.record.document()).collect())
            }
            Kept::Claimed(c) => Answer::Claimed(c.clone()),
            Kept::Committed(h) if h.given_back => Answer::Revoked,
            Kept::Committed(_) | Kept::Done => Answer::Done,
            Kept::Acknowledged => Answer::Acknowledged,
        })
    }

    /// The entry type and the bytes of the entries the answer of request `id` holds
    /// (what it took, committed or claimed), if it holds any.
    pub(crate) fn holding(&self, id: RequestId) -> Option<(Arc<str>, usize)> {
        match &self.map.get(&id)?.0 {
            Kept::Taken(held) => Some((
                held.first()?.entry_type.clone(),
                held.iter().map(|h| h.record.fields.approx_size()).sum(),
            )),
            Kept::Committed(h) => Some((h.entry_type.clone(), h.record.fields.approx_size())),
            Kept::Claimed(c) => Some((
                c.ticket.entry_type.as_str().into(),
                c.document.fields.approx_size(),
            )),
            Kept::Receipts(_) | Kept::Done | Kept::Acknowledged => None,
        }
    }

    /// The callers of `requests` have their answers: each answer kept is replaced by a
    /// mark without the entries it held (a request sent again is refused rather than run
    /// anew, and a revoke has nothing to give back: the caller holds what was taken).
    /// The marks keep their places among the kept answers, and are forgotten as the
    /// answers would have been.
    fn acknowledge(&mut self, requests: &[RequestId]) {
        for id in requests {
            if let Some((kept, _)) = self.map.get_mut(id) {
                *kept = Kept::Acknowledged;
            }
        }
    }

    /// Every kept answer as it is kept (given-back marks included), oldest first: for
    /// comparing states.
    pub(crate) fn describe(&self) -> impl Iterator<Item = String> + '_ {
        self.order.iter().filter_map(|(id, at)| {
            self.map
                .get(id)
                .map(|(k, _)| format!("answer {id:?} at {at:?} {k:?}"))
        })
    }

    /// Whether the answer of request `id` is kept.
    pub(crate) fn contains(&self, id: RequestId) -> bool {
        self.map.contains_key(&id)
    }

    /// The ids of every kept answer, oldest first.
    pub(crate) fn ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.order
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.map.contains_key(id))
    }

    /// What giving request `id` up undoes: the entries it removed that are not back yet,
    /// or the claim it made.
    pub(crate) fn to_give_back(&self, id: RequestId) -> GiveBack {
        let taken = |h: &Held| Taken {
            entry_type: h.entry_type.clone(),
            seq: h.seq,
            record: h.record.clone(),
            request: Some(id),
        };
        match self.map.get(&id) {
            Some((Kept::Taken(held), _)) => {
                GiveBack::Entries(held.iter().filter(|h| !h.given_back).map(taken).collect())
            }
            Some((Kept::Committed(h), _)) if !h.given_back => GiveBack::Entries(vec![taken(h)]),
            Some((Kept::Claimed(c), _)) => GiveBack::Claim(c.ticket.clone()),
            _ => GiveBack::Nothing,
        }
        .nothing_if_empty()
    }

    /// Whether the entry `key` of `entry_type` that request `id` removed is not to be
    /// given back: it was given back already, or the request's caller acknowledged the
    /// answer (and holds the entry).
    pub(crate) fn given_back(&self, id: RequestId, entry_type: &str, key: &crate::Key) -> bool {
        matches!(self.map.get(&id), Some((Kept::Acknowledged, _)))
            || self
                .held(id)
                .any(|h| h.given_back && *h.entry_type == *entry_type && h.record.key == *key)
    }

    fn held(&self, id: RequestId) -> impl Iterator<Item = &Held> {
        let held: &[Held] = match self.map.get(&id) {
            Some((Kept::Taken(held), _)) => held,
            Some((Kept::Committed(h), _)) => std::slice::from_ref(h),
            _ => &[],
        };
        held.iter()
    }

    /// Notes that the entry `key` of `entry_type` that request `id` removed is back.
    fn mark_given_back(&mut self, id: RequestId, entry_type: &str, key: &crate::Key) {
        let held: &mut [Held] = match self.map.get_mut(&id) {
            Some((Kept::Taken(held), _)) => held,
            Some((Kept::Committed(h), _)) => std::slice::from_mut(h),
            _ => &mut [],
        };
        for h in held {
            if *h.entry_type == *entry_type && h.record.key == *key {
                h.given_back = true;
            }
        }
    }
}

/// The answers recorded while one [`Command::Batch`] is applied, on this thread. All its
/// commands share the batch's one place in the log, so an answer is recorded twice on
/// replay only if it already held that place before the batch began (a snapshot cut above
/// it holds its answers): each request's first part decides whether its other parts are
/// recorded too.
#[derive(Default)]
pub(crate) struct BatchMarks {
    /// Requests whose answers this batch records (`true`), or finds recorded (`false`).
    seen: HashMap<RequestId, bool>,
}

thread_local! {
    static BATCH: std::cell::RefCell<Option<BatchMarks>> = const { std::cell::RefCell::new(None) };
}

impl BatchMarks {
    /// Runs `f`, the applying of one batch's commands, with the marks of a new batch, and
    /// returns with its result the requests whose answers the batch recorded: applied
    /// live, before the batch was logged, they get the batch's place in the log once it
    /// is known ([`Answers::place`]).
    pub(crate) fn applying<T>(f: impl FnOnce() -> T) -> (T, Vec<RequestId>) {
        let outer = BATCH.with(|b| b.replace(Some(BatchMarks::default())));
        let result = f();
        let marks = BATCH.with(|b| b.replace(outer)).unwrap_or_default();
        let recorded = marks
            .seen
            .into_iter()
            .filter_map(|(id, fresh)| fresh.then_some(id))
            .collect();
        (result, recorded)
    }

    fn active() -> bool {
        BATCH.with(|b| b.borrow().is_some())
    }

    fn seen(id: RequestId) -> Option<bool> {
        BATCH.with(|b| b.borrow().as_ref().and_then(|m| m.seen.get(&id).copied()))
    }

    fn note(id: RequestId, fresh: bool) {
        BATCH.with(|b| {
            if let Some(m) = b.borrow_mut().as_mut() {
                m.seen.insert(id, fresh);
            }
        });
    }
}

impl Answers {
    /// Gives the answers of `recorded` (a batch's, applied before it was logged) the
    /// batch's place in the log.
    pub(crate) fn place(&mut self, recorded: &[RequestId], index: u64) {
        for id in recorded {
            if let Some((_, place)) = self.map.get_mut(id) {
                *place = Some(index);
            }
        }
    }
}

impl GiveBack {
    fn nothing_if_empty(self) -> GiveBack {
        match self {
            GiveBack::Entries(e) if e.is_empty() => GiveBack::Nothing,
            other => other,
        }
    }
}

/// An entry a take (or a commit) removed, with what it takes to put it back where it was
/// ([`Engine::untake`](crate::server::Engine::untake)): a node keeps these for a request whose
/// caller may still give it up, so that an answer nobody received loses nothing.
#[derive(Clone, Debug)]
pub struct Taken {
    pub(crate) entry_type: Arc<str>,
    pub(crate) seq: u64,
    pub(crate) record: Record,
    /// The request that removed it, when it had an id: giving the entry back notes it in
    /// that request's answer.
    pub(crate) request: Option<RequestId>,
}

impl Taken {
    /// The taken entry's key.
    pub fn key(&self) -> &crate::Key {
        &self.record.key
    }

    /// The taken entry's size in bytes, roughly.
    pub fn approx_size(&self) -> usize {
        self.record.fields.approx_size()
    }

    /// A copy of the entry, as a take hands it out.
    pub fn document(&self) -> Document {
        self.record.document()
    }

    /// The entry, as a take hands it out.
    pub fn into_document(self) -> Document {
        self.record.into_document()
    }

    /// The entry's type.
    pub fn entry_type(&self) -> &str {
        &self.entry_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers decided more than [`ANSWERS_KEPT_FOR`] before the newest are forgotten
    /// when it is recorded; younger ones stay.
    #[test]
    fn answers_older_than_the_window_are_forgotten() {
        let start = 1_000_000_000;
        let at = |secs: u64| Some(Deadline::from_ms(start + secs * 1000));
        let window = ANSWERS_KEPT_FOR.as_secs();
        let mut answers = Answers::default();
        let untimed = RequestId::new();
        answers.record(untimed, Some(1), None, Part::Done);
        let ids: Vec<RequestId> = (0..4).map(|_| RequestId::new()).collect();
        answers.record(ids[0], Some(2), at(0), Part::Done);
        // An answer without a time holds no younger one back: it goes first.
        assert!(!answers.contains(untimed));
        answers.record(ids[1], Some(3), at(window / 2), Part::Done);
        // Exactly the window after the first: still kept.
        answers.record(ids[2], Some(4), at(window), Part::Done);
        assert!(answers.contains(ids[0]));
        // Past it: the first goes.
        answers.record(ids[3], Some(5), at(window + 1), Part::Done);
        assert!(!answers.contains(ids[0]));
        assert!(ids[1..].iter().all(|id| answers.contains(*id)));
        assert_eq!(answers.ids().count(), 3);
    }

    /// Without times, only the count bounds the answers kept.
    #[test]
    fn untimed_answers_are_bounded_by_count() {
        let mut answers = Answers::default();
        let first = RequestId::new();
        answers.record(first, None, None, Part::Done);
        for _ in 0..ANSWERS_KEPT - 1 {
            answers.record(RequestId::new(), None, None, Part::Done);
        }
        assert!(answers.contains(first));
        answers.record(RequestId::new(), None, None, Part::Done);
        assert!(!answers.contains(first));
        assert_eq!(answers.ids().count(), ANSWERS_KEPT);
    }
}
