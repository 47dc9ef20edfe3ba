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

use serde::{Deserialize, Serialize};

use crate::document::{ClaimTicket, ClaimedDocument, Document, Receipt, RequestId};
use crate::entry::NodeId;
use crate::lease::Deadline;
use crate::store::{ClaimState, Record, Store};

/// The number of requests whose answers the state keeps.
pub(crate) const ANSWERS_KEPT: usize = 65_536;

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
}

impl Command {
    /// Whether applying the command records an answer (it carries a request id).
    pub(crate) fn answers(&self) -> bool {
        match self {
            Command::Write { to, request, .. } => {
                request.is_some()
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
            Command::Renew { .. } | Command::RenewClaim { .. } | Command::Index { .. } => false,
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
/// it is not recorded twice when the log is replayed over a snapshot. Pure: see the
/// module documentation.
#[inline]
pub(crate) fn apply(
    entry_type: &str,
    store: &mut Store,
    answers: Option<&mut Answers>,
    index: Option<u64>,
    command: Command,
) -> Outcome {
    let mut answers = answers;
    // Answers are built only for requests that have an id (a node's calls), never on the
    // in-process path.
    let mut answer = |request: Option<RequestId>, part: &dyn Fn() -> Part| {
        if let (Some(id), Some(table)) = (request, answers.as_deref_mut()) {
            table.record(id, index, part());
        }
    };
    match command {
        Command::Write {
            seq,
            mut record,
            learn,
            to,
            request,
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
                    answer(request, &|| Part::Document(record.document()));
                    Outcome::HandedOff(record)
                }
                Some(HandOff::Claimed {
                    token,
                    expires,
                    request,
                }) => {
                    record.claim = Some(ClaimState { token, expires });
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
                    Cause::Taken => answer(request, &|| Part::Document(record.document())),
                    Cause::Committed | Cause::Cancelled => answer(request, &|| Part::Done),
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
}

/// One command's share of a request's answer (a take of several entries, or a write of
/// several, answers with all of them).
enum Part {
    Receipt(Receipt),
    Document(Document),
    Claimed(ClaimedDocument),
    Done,
}

/// The answers of the last [`ANSWERS_KEPT`] requests, by request id, each with the log
/// place of the last command that added to it; the oldest are forgotten first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Answers {
    order: VecDeque<RequestId>,
    map: HashMap<RequestId, (Answer, Option<u64>), foldhash::fast::RandomState>,
}

impl Answers {
    fn record(&mut self, id: RequestId, index: Option<u64>, part: Part) {
        if let (Some(index), Some((_, Some(last)))) = (index, self.map.get(&id))
            && *last >= index
        {
            return;
        }
        let prev = self.map.remove(&id).map(|(a, _)| a);
        if prev.is_none() {
            self.order.push_back(id);
            if self.order.len() > ANSWERS_KEPT
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
        let answer = match (prev, part) {
            (Some(Answer::Receipts(mut v)), Part::Receipt(r)) => {
                v.push(r);
                Answer::Receipts(v)
            }
            (Some(Answer::Documents(mut v)), Part::Document(d)) => {
                v.push(d);
                Answer::Documents(v)
            }
            (_, Part::Receipt(r)) => Answer::Receipts(vec![r]),
            (_, Part::Document(d)) => Answer::Documents(vec![d]),
            (_, Part::Claimed(c)) => Answer::Claimed(c),
            (_, Part::Done) => Answer::Done,
        };
        self.map.insert(id, (answer, index));
    }

    /// The answer of request `id`, if it is still kept.
    pub(crate) fn get(&self, id: RequestId) -> Option<&Answer> {
        self.map.get(&id).map(|(a, _)| a)
    }

    /// Every kept answer, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (RequestId, &Answer)> {
        self.order
            .iter()
            .filter_map(|id| self.map.get(id).map(|(a, _)| (*id, a)))
    }
}

/// An entry a take (or a commit) removed, with what it takes to put it back where it was
/// ([`Engine::untake`](crate::Engine::untake)): a node keeps these for a request whose
/// caller may still give it up, so that an answer nobody received loses nothing.
#[derive(Clone, Debug)]
pub struct Taken {
    pub(crate) entry_type: Arc<str>,
    pub(crate) seq: u64,
    pub(crate) record: Record,
}

impl Taken {
    /// The taken entry's key.
    pub fn key(&self) -> &crate::Key {
        &self.record.key
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
