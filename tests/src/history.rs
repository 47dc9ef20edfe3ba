//! Histories of operations under faults, and the checker that reads them.
//!
//! Clients record every operation as it is invoked and how it ended: `Ok` (acknowledged),
//! `Failed` (it certainly did not take effect: refused, or it never reached a node) or
//! `Unknown` (it may or may not have: the connection broke after sending, a timeout).
//! After the faults heal, the test drains what is left and gives it to [`check`], which
//! counts what a correct space never shows:
//!
//! - **lost**: acknowledged writes that are neither taken nor left, beyond what takes of
//!   unknown outcome could account for (each of those may have taken one entry);
//! - **duplicated**: entries taken twice (by acknowledged takes), or taken and left;
//! - **unexpected**: entries taken or left that no write could have made (never written,
//!   or written by a write that certainly failed);
//! - for subscriptions: events out of order (sequence numbers must increase, with every
//!   missing one inside an announced gap), and acknowledged writes a subscription was
//!   never told of though no gap covers their time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Acknowledged.
    Ok,
    /// Certainly without effect.
    Failed,
    /// Perhaps with effect.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A write of the entry `id` (ids are unique in a test).
    Write {
        /// The entry's id.
        id: u64,
        /// How it ended.
        ended: Ended,
    },
    /// A take, and the entry it got (`None`: nothing, or not known).
    Take {
        /// The entry taken, when acknowledged with one.
        got: Option<u64>,
        /// How it ended.
        ended: Ended,
    },
    /// What a subscription was told, in order: events by sequence number and entry id,
    /// gaps by the sequence numbers they cover.
    Told {
        /// Which subscription.
        subscription: u64,
        /// Its notifications, in the order received.
        notes: Vec<Note>,
    },
}

/// A notification as a subscriber recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// An event about entry `id`, numbered `seq`.
    Event {
        /// Its sequence number.
        seq: u64,
        /// The entry it is about.
        id: u64,
    },
    /// Events `first..=last` were dropped.
    Gap {
        /// First dropped sequence number.
        first: u64,
        /// Last dropped sequence number.
        last: u64,
    },
}

/// A history being recorded by many clients at once.
#[derive(Default)]
pub struct History(Mutex<Vec<Op>>);

impl History {
    /// Records `op`.
    pub fn record(&self, op: Op) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Everything recorded.
    pub fn ops(&self) -> Vec<Op> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged writes.
    pub acknowledged: usize,
    /// Lost acknowledged writes (beyond what unknown takes account for).
    pub lost: usize,
    /// Entries taken twice, or taken and left.
    pub duplicated: usize,
    /// Entries no write could have made.
    pub unexpected: usize,
    /// Subscriptions whose sequence numbers went back or skipped without a gap.
    pub out_of_order: usize,
    /// Acknowledged writes a subscription that saw no gap was never told of.
    pub untold: usize,
    /// The acknowledged writes neither taken nor left, for the record (as many as
    /// `lost` plus what unknown takes may account for).
    pub missing: Vec<u64>,
    /// The entries taken twice, taken and left, or left twice, for the record.
    pub twice: Vec<u64>,
}

impl Verdict {
    /// Whether the history is one a correct space can show.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.out_of_order == 0
            && self.untold == 0
    }
}

/// Checks `ops` against what was `left` in the space once the faults healed. Every
/// subscription is taken to match every write.
pub fn check(ops: &[Op], left: &[u64]) -> Verdict {
    let mut written: HashMap<u64, Ended> = HashMap::new();
    let mut taken: BTreeMap<u64, usize> = BTreeMap::new();
    let mut unknown_takes = 0;
    let mut told: Vec<&Vec<Note>> = Vec::new();
    for op in ops {
        match op {
            Op::Write { id, ended } => {
                written.insert(*id, *ended);
            }
            Op::Take {
                got: Some(id),
                ended: Ended::Ok,
            } => *taken.entry(*id).or_default() += 1,
            Op::Take {
                ended: Ended::Unknown,
                ..
            } => unknown_takes += 1,
            Op::Take { .. } => {}
            Op::Told { notes, .. } => told.push(notes),
        }
    }
    // How many times each entry was left.
    let mut left_count: BTreeMap<u64, usize> = BTreeMap::new();
    for id in left {
        *left_count.entry(*id).or_default() += 1;
    }
    let mut verdict = Verdict {
        acknowledged: written.values().filter(|e| **e == Ended::Ok).count(),
        ..Verdict::default()
    };
    verdict.missing = written
        .iter()
        .filter(|(id, e)| {
            **e == Ended::Ok && !taken.contains_key(id) && !left_count.contains_key(id)
        })
        .map(|(id, _)| *id)
        .collect();
    verdict.missing.sort_unstable();
    verdict.lost = verdict.missing.len().saturating_sub(unknown_takes);
    verdict.twice = taken
        .iter()
        .filter(|(id, n)| **n > 1 || left_count.contains_key(id))
        .map(|(id, _)| *id)
        .chain(
            left_count
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, _)| *id),
        )
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    verdict.duplicated = verdict.twice.len();
    let possible = |id: &u64| matches!(written.get(id), Some(Ended::Ok | Ended::Unknown));
    verdict.unexpected = taken
        .keys()
        .chain(left_count.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|id| !possible(id))
        .count();
    for notes in told {
        let mut next = None;
        let mut gapped = false;
        let mut ordered = true;
        let mut seen = BTreeSet::new();
        for note in notes {
            let (first, last) = match *note {
                Note::Event { seq, id } => {
                    seen.insert(id);
                    (seq, seq)
                }
                Note::Gap { first, last } => {
                    gapped = true;
                    (first, last)
                }
            };
            if next.is_some_and(|n| first != n) || last < first {
                ordered = false;
            }
            next = Some(last + 1);
        }
        if !ordered {
            verdict.out_of_order += 1;
        }
        if !gapped {
            verdict.untold += written
                .iter()
                .filter(|(id, e)| **e == Ended::Ok && !seen.contains(id))
                .count();
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: u64, ended: Ended) -> Op {
        Op::Write { id, ended }
    }

    fn take(got: Option<u64>, ended: Ended) -> Op {
        Op::Take { got, ended }
    }

    #[test]
    fn a_correct_history_is_clean() {
        let ops = vec![
            write(1, Ended::Ok),
            write(2, Ended::Ok),
            write(3, Ended::Unknown),
            write(4, Ended::Failed),
            take(Some(1), Ended::Ok),
            take(None, Ended::Ok),
            take(None, Ended::Failed),
        ];
        // 3 may or may not have been written; either way is fine.
        assert!(check(&ops, &[2]).is_clean());
        assert!(check(&ops, &[2, 3]).is_clean());
        assert_eq!(check(&ops, &[2]).acknowledged, 2);
    }

    #[test]
    fn each_anomaly_is_counted() {
        let base = vec![
            write(1, Ended::Ok),
            write(2, Ended::Ok),
            write(3, Ended::Failed),
        ];
        // 2 vanished.
        assert_eq!(check(&base, &[1]).lost, 1);
        // ... unless a take of unknown outcome may have it.
        let mut unknown = base.clone();
        unknown.push(take(None, Ended::Unknown));
        assert_eq!(check(&unknown, &[1]).lost, 0);
        // Taken twice; taken and left.
        let mut twice = base.clone();
        twice.extend([take(Some(1), Ended::Ok), take(Some(1), Ended::Ok)]);
        assert_eq!(check(&twice, &[2]).duplicated, 1);
        let mut and_left = base.clone();
        and_left.push(take(Some(2), Ended::Ok));
        assert_eq!(check(&and_left, &[1, 2]).duplicated, 1);
        // Left twice (written twice); each is named once.
        let left_twice = check(&base, &[1, 2, 2]);
        assert_eq!(left_twice.duplicated, 1);
        assert_eq!(left_twice.twice, vec![2]);
        assert_eq!(check(&twice, &[1, 2]).twice, vec![1]);
        // A failed write's entry, and one never written.
        assert_eq!(check(&base, &[1, 2, 3]).unexpected, 1);
        assert_eq!(check(&base, &[1, 2, 9]).unexpected, 1);
    }

    #[test]
    fn subscriptions_must_be_in_order_and_complete_unless_a_gap_says_otherwise() {
        let writes = vec![write(1, Ended::Ok), write(2, Ended::Ok)];
        let told = |notes: Vec<Note>| {
            let mut ops = writes.clone();
            ops.push(Op::Told {
                subscription: 1,
                notes,
            });
            check(&ops, &[1, 2])
        };
        let ev = |seq, id| Note::Event { seq, id };
        assert!(told(vec![ev(1, 1), ev(2, 2)]).is_clean());
        assert_eq!(told(vec![ev(2, 2), ev(1, 1)]).out_of_order, 1);
        assert_eq!(told(vec![ev(1, 1), ev(3, 2)]).out_of_order, 1);
        assert_eq!(told(vec![ev(1, 1)]).untold, 1);
        assert!(told(vec![ev(1, 1), Note::Gap { first: 2, last: 2 }]).is_clean());
    }
}
