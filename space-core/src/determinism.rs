//! The engine is a deterministic state machine over its log: random histories of every
//! operation run on a live durable engine with a manual clock; the log they leave,
//! replayed into a fresh engine through the same `apply`, must give the same state
//! (entries, versions, order, claims, deadlines, schema, indexes, answer table), the
//! same outcome for every command and the same events; and what live subscriptions
//! received must be exactly those events, in log order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use space_query::{Fields, Filter, Query, Value};

use crate::document::{ClaimTicket, RequestId};
use crate::durable::{ENGINE_LOG, decode, read_snapshot, snapshots};
use crate::engine::{Engine, EngineConfig};
use crate::entry::Key;
use crate::lease::{Clock, Deadline, Lease};
use crate::notify::{EventKind, EventKinds, Notification, Subscription};
use crate::state::Command;
use crate::wal::{ENTRY, numbered, parse_record, segment_frames};

#[derive(Clone, Debug)]
enum Op {
    Write {
        ty: u8,
        kind: u8,
        key: Option<u8>,
        lease_ms: Option<u16>,
    },
    WriteAll {
        ty: u8,
        kind: u8,
        n: u8,
    },
    Take {
        ty: u8,
        kind: Option<u8>,
    },
    TakeKey {
        ty: u8,
        key: u8,
    },
    TakeAll {
        ty: u8,
        max: u8,
    },
    /// A blocking take (or claim) that waits, then a write that is handed to it.
    HandOff {
        ty: u8,
        kind: u8,
        claim: bool,
    },
    Claim {
        ty: u8,
        kind: Option<u8>,
        lease_ms: u16,
    },
    Commit(u8),
    Release(u8),
    RenewClaim(u8, u16),
    Renew {
        ty: u8,
        key: u8,
        lease_ms: Option<u16>,
    },
    Cancel {
        ty: u8,
        key: u8,
    },
    /// Time passes; the timer expires leases and lapses claims by commands.
    Advance(u16),
    Index {
        ty: u8,
    },
    /// A snapshot in the middle of the history.
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    let ty = 0u8..2;
    let kind = 0u8..3;
    let lease = proptest::option::of(1u16..400);
    prop_oneof![
        4 => (ty.clone(), kind.clone(), proptest::option::of(0u8..6), lease.clone())
            .prop_map(|(ty, kind, key, lease_ms)| Op::Write { ty, kind, key, lease_ms }),
        1 => (ty.clone(), kind.clone(), 1u8..4).prop_map(|(ty, kind, n)| Op::WriteAll { ty, kind, n }),
        2 => (ty.clone(), proptest::option::of(kind.clone())).prop_map(|(ty, kind)| Op::Take { ty, kind }),
        1 => (ty.clone(), 0u8..6).prop_map(|(ty, key)| Op::TakeKey { ty, key }),
        1 => (ty.clone(), 1u8..4).prop_map(|(ty, max)| Op::TakeAll { ty, max }),
        2 => (ty.clone(), kind.clone(), any::<bool>()).prop_map(|(ty, kind, claim)| Op::HandOff { ty, kind, claim }),
        2 => (ty.clone(), proptest::option::of(kind), 1u16..400)
            .prop_map(|(ty, kind, lease_ms)| Op::Claim { ty, kind, lease_ms }),
        1 => (0u8..4).prop_map(Op::Commit),
        1 => (0u8..4).prop_map(Op::Release),
        1 => (0u8..4, 1u16..400).prop_map(|(i, ms)| Op::RenewClaim(i, ms)),
        1 => (ty.clone(), 0u8..6, lease).prop_map(|(ty, key, lease_ms)| Op::Renew { ty, key, lease_ms }),
        1 => (ty.clone(), 0u8..6).prop_map(|(ty, key)| Op::Cancel { ty, key }),
        2 => (1u16..300).prop_map(Op::Advance),
        1 => ty.prop_map(|ty| Op::Index { ty }),
        1 => Just(Op::Checkpoint),
    ]
}

const TYPES: [&str; 2] = ["Job", "Note"];

fn fields(kind: u8, n: u64) -> Fields {
    let mut f = Fields::new();
    f.push("kind", Value::I64(i64::from(kind)));
    f.push("n", Value::I64(n as i64));
    f
}

fn query(ty: u8, kind: Option<u8>) -> Query {
    let filter = match kind {
        Some(k) => Filter::Eq("kind".into(), Value::I64(i64::from(k))),
        None => Filter::All,
    };
    Query::new(TYPES[usize::from(ty)], filter)
}

fn key(k: u8) -> Key {
    Key::Name(format!("k{k}"))
}

fn lease(ms: Option<u16>) -> Lease {
    ms.map_or(Lease::Forever, |ms| Lease::millis(u64::from(ms)))
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let path = std::env::temp_dir().join(format!(
            "space-determinism-{}-{}",
            std::process::id(),
            RequestId::new().0
        ));
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(clock: Clock) -> EngineConfig {
    EngineConfig {
        clock,
        ..EngineConfig::default()
    }
}

/// Runs `ops` on a live engine; every other op runs as a request with an id drawn from a
/// small pool, so that ids repeat (retries) and answers accumulate.
fn run(engine: &Engine, clock: &Clock, ops: &[(Op, Option<u8>)]) {
    let mut tickets: Vec<ClaimTicket> = Vec::new();
    for (i, (op, request)) in ops.iter().enumerate() {
        let n = i as u64 + 1;
        let go = || match op.clone() {
            Op::Write {
                ty,
                kind,
                key: k,
                lease_ms,
            } => {
                let _ = engine.write(
                    TYPES[usize::from(ty)],
                    fields(kind, n),
                    k.map(key),
                    lease(lease_ms),
                );
                None
            }
            Op::WriteAll { ty, kind, n: count } => {
                let entries = (0..count)
                    .map(|i| (fields(kind, n * 10 + u64::from(i)), None))
                    .collect();
                let _ = engine.write_all(TYPES[usize::from(ty)], &[], entries, Lease::Forever);
                None
            }
            Op::Take { ty, kind } => {
                let _ = engine
                    .take(&query(ty, kind), Duration::ZERO)
                    .map(|p| p.wait());
                None
            }
            Op::TakeKey { ty, key: k } => {
                let _ = engine.take_key(TYPES[usize::from(ty)], &key(k));
                None
            }
            Op::TakeAll { ty, max } => {
                let _ = engine
                    .take_all(&query(ty, None), usize::from(max), Duration::ZERO)
                    .map(|p| p.wait());
                None
            }
            Op::HandOff { ty, kind, claim } => {
                let q = query(ty, Some(kind));
                let wait = Duration::from_secs(30);
                if claim {
                    if let Ok(pending) = engine.claim(&q, Lease::millis(200), wait) {
                        let _ = engine.write(
                            TYPES[usize::from(ty)],
                            fields(kind, n),
                            None,
                            Lease::Forever,
                        );
                        if let Some(c) = pending.wait() {
                            return Some(c.ticket);
                        }
                    }
                } else if let Ok(pending) = engine.take(&q, wait) {
                    let _ = engine.write(
                        TYPES[usize::from(ty)],
                        fields(kind, n),
                        None,
                        Lease::Forever,
                    );
                    let _ = pending.wait();
                }
                None
            }
            Op::Claim { ty, kind, lease_ms } => engine
                .claim(&query(ty, kind), lease(Some(lease_ms)), Duration::ZERO)
                .ok()
                .and_then(|p| p.wait())
                .map(|c| c.ticket),
            Op::Commit(i) => {
                if let Some(t) = tickets.get(usize::from(i)) {
                    let _ = engine.commit(t);
                }
                None
            }
            Op::Release(i) => {
                if let Some(t) = tickets.get(usize::from(i)) {
                    let _ = engine.release(t);
                }
                None
            }
            Op::RenewClaim(i, ms) => {
                if let Some(t) = tickets.get(usize::from(i)) {
                    let _ = engine.renew_claim(t, Lease::millis(u64::from(ms)));
                }
                None
            }
            Op::Renew {
                ty,
                key: k,
                lease_ms,
            } => {
                let _ = engine.renew(TYPES[usize::from(ty)], &key(k), lease(lease_ms));
                None
            }
            Op::Cancel { ty, key: k } => {
                let _ = engine.cancel(TYPES[usize::from(ty)], &key(k));
                None
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(u64::from(ms)));
                engine.fire_due();
                None
            }
            Op::Index { ty } => {
                let _ = engine.create_index(TYPES[usize::from(ty)], "kind");
                None
            }
            Op::Checkpoint => {
                let _ = engine.checkpoint();
                None
            }
        };
        // Claims return their ticket; other operations nothing to keep.
        let got: Option<ClaimTicket> = match request {
            Some(id) => engine.with_request(RequestId(u128::from(*id)), go),
            None => go(),
        };
        if let Some(t) = got {
            tickets.insert(0, t);
            tickets.truncate(4);
        }
    }
}

fn history() -> impl Strategy<Value = Vec<(Op, Option<u8>)>> {
    proptest::collection::vec((op(), proptest::option::of(0u8..8)), 1..120)
}

fn check(ops: &[(Op, Option<u8>)]) {
    let dir = Dir::new();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let clock = Clock::manual(start);
    let live = Engine::open(&dir.0, config(clock.clone())).expect("open");
    let subscriptions: Vec<Subscription> = TYPES
        .iter()
        .map(|t| {
            live.subscribe(
                &Query::new(*t, Filter::All),
                EventKinds::ALL,
                Lease::Forever,
            )
            .expect("subscribe")
        })
        .collect();
    run(&live, &clock, ops);
    live.flush_blocking().expect("flush");
    // Closing stops the timer, so nothing changes the live state after this point.
    live.close();
    let live_state = live.state_digest();
    let live_applied = live.applied();
    let live_told = live.told();
    // Every subscription received exactly what applying the commands told, in order.
    for (t, sub) in TYPES.iter().zip(&subscriptions) {
        let mut received: Vec<(Key, EventKind, u64)> = Vec::new();
        while let Some(n) = sub.try_recv() {
            match n {
                Notification::Event(e) => received.push((e.key, e.kind, e.version)),
                Notification::Gap { .. } | Notification::Missed { .. } => {
                    panic!("a gap in a test this small")
                }
            }
        }
        let told: Vec<(Key, EventKind, u64)> = live_told
            .iter()
            .filter(|e| e.1 == *t)
            .map(|e| (e.2.clone(), e.3, e.4))
            .collect();
        assert_eq!(received, told, "events of {t}");
    }
    drop(subscriptions);
    drop(live);
    // Replay with a clock at the epoch: no timer is due, so the replayed state is what the
    // log says and nothing else.
    let replayed =
        Engine::open(&dir.0, config(Clock::manual(SystemTime::UNIX_EPOCH))).expect("reopen");
    let replayed_state = replayed.state_digest();
    let replayed_applied = replayed.applied();
    let replayed_told = replayed.told();
    replayed.close();
    assert_eq!(live_state, replayed_state, "replayed state differs");
    // The replay applies the commands after the last snapshot: their outcomes must be
    // those the live engine had for the same log places.
    let first = replayed_applied.first().map_or(u64::MAX, |(lsn, _)| *lsn);
    let live_tail: Vec<_> = live_applied
        .into_iter()
        .filter(|(lsn, _)| *lsn >= first)
        .collect();
    assert_eq!(live_tail, replayed_applied, "outcomes differ");
    let live_told_tail: Vec<_> = live_told.into_iter().filter(|e| e.0 >= first).collect();
    assert_eq!(live_told_tail, replayed_told, "events differ");
}

/// One entry of the engine's log as its segment holds it: index, command, and where its
/// frame starts and how long it is in the file.
struct Logged {
    index: u64,
    at: Deadline,
    entry_type: String,
    command: Command,
    start: usize,
    len: usize,
}

/// The engine's entries in the one segment of `dir`, oldest first.
fn logged(dir: &std::path::Path) -> (PathBuf, Vec<Logged>) {
    let segments = numbered(dir, "wal-", ".log").expect("list");
    let (_, path) = segments.into_iter().last().expect("a segment");
    let bytes = std::fs::read(&path).expect("read");
    let (frames, _, problem) = segment_frames(&bytes[16..]);
    assert!(problem.is_none(), "{problem:?}");
    let mut out = Vec::new();
    for (_, payload) in frames {
        let start = payload.as_ptr() as usize - bytes.as_ptr() as usize - 16;
        let (log, kind, index, data) = parse_record(payload).expect("record");
        if log == ENGINE_LOG && kind == ENTRY {
            let (at, entry_type, command) = decode(data).expect("decode");
            out.push(Logged {
                index,
                at,
                entry_type,
                command,
                start,
                len: 16 + payload.len(),
            });
        }
    }
    (path, out)
}

/// A crash at any moment leaves the log cut somewhere (a record torn in half) and the
/// snapshots that were complete by then; recovery must give exactly the state the
/// commands before the cut make, applied one by one to an empty space.
fn check_crash(ops: &[(Op, Option<u8>)], cut: u32) {
    let dir = Dir::new();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let clock = Clock::manual(start);
    let live = Engine::open(&dir.0, config(clock.clone())).expect("open");
    run(&live, &clock, ops);
    live.flush_blocking().expect("flush");
    live.close();
    drop(live);
    let (segment, entries) = logged(&dir.0);
    // Writing a snapshot deletes the ones before it, and needs the log durable up to what
    // it holds: a crash can only cut the log after what the newest snapshot holds.
    let mut durable_to = 0;
    for (_, path) in snapshots(&dir.0, ENGINE_LOG).expect("list") {
        durable_to = durable_to.max(read_snapshot(&path).expect("snapshot").durable_to);
    }
    let first = entries.iter().take_while(|e| e.index <= durable_to).count();
    let kept = first + cut as usize % (entries.len() - first + 1);
    if let Some(torn) = entries.get(kept) {
        let at = torn.start + 1 + cut as usize % (torn.len - 1);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .expect("open segment");
        f.set_len(at as u64).expect("cut");
    }
    let last = kept.checked_sub(1).map_or(0, |i| entries[i].index);
    let epoch = || config(Clock::manual(SystemTime::UNIX_EPOCH));
    let recovered = Engine::open(&dir.0, epoch()).expect("recover");
    let reference_dir = Dir::new();
    let reference = Engine::open(&reference_dir.0, epoch()).expect("open");
    reference.replay(
        entries
            .into_iter()
            .take(kept)
            .map(|e| (e.index, e.at, e.entry_type, e.command))
            .collect(),
    );
    assert_eq!(
        recovered.state_digest(),
        reference.state_digest(),
        "the state recovered after a crash at entry {last} is not the state of the log up to it"
    );
    recovered.close();
    reference.close();
}

/// Cuts the last record of the engine's log in `dir` in half, as a crash in the middle of
/// its group commit does.
fn tear_last_record(dir: &Dir) {
    let (segment, entries) = logged(&dir.0);
    let last = entries.last().expect("a record is logged");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open segment");
    f.set_len((last.start + last.len / 2) as u64).expect("cut");
}

/// A batch of writes is one record of the log: a crash that tears it keeps none of the
/// batch (with a record per entry, a torn tail kept the batch's first entries, which the
/// node had never acknowledged), and a batch logged whole answers its retry with every
/// receipt after a restart.
#[test]
fn a_crash_in_the_middle_of_a_batch_keeps_none_of_it() {
    const ENTRIES: u64 = 8;
    let epoch = || config(Clock::manual(SystemTime::UNIX_EPOCH));
    let write_batch = |dir: &Dir, id: RequestId| {
        let live = Engine::open(&dir.0, epoch()).expect("open");
        let entries = (0..ENTRIES).map(|i| (fields(1, i), None)).collect();
        live.with_request(id, || {
            live.write_all(TYPES[0], &[], entries, Lease::Forever)
        })
        .expect("write the batch");
        live.flush_blocking().expect("flush");
        live.close();
    };
    let all = Query::new(TYPES[0], Filter::All);

    // Logged whole: recovered whole, its answer whole.
    let whole = Dir::new();
    let id = RequestId(7);
    write_batch(&whole, id);
    let recovered = Engine::open(&whole.0, epoch()).expect("recover");
    assert_eq!(recovered.count(&all).expect("count"), ENTRIES);
    match recovered.answer(id) {
        Some(crate::state::Answer::Receipts(receipts)) => {
            assert_eq!(
                receipts.len() as u64,
                ENTRIES,
                "the batch's answer after a restart"
            );
        }
        other => panic!("the batch's answer was not kept: {other:?}"),
    }
    recovered.close();

    // Torn in the middle of its record: none of it.
    let torn = Dir::new();
    write_batch(&torn, id);
    tear_last_record(&torn);
    let recovered = Engine::open(&torn.0, epoch()).expect("recover");
    assert_eq!(
        recovered.count(&all).expect("count"),
        0,
        "a crash in the middle of the batch's record kept part of the batch"
    );
    assert!(recovered.answer(id).is_none());
    recovered.close();

    // A take of many is one record too: torn, it took nothing.
    let taken = Dir::new();
    write_batch(&taken, id);
    let live = Engine::open(&taken.0, epoch()).expect("open");
    let took = live
        .with_request(RequestId(8), || live.take_all(&all, 100, Duration::ZERO))
        .expect("take")
        .wait();
    assert_eq!(took.len() as u64, ENTRIES);
    live.flush_blocking().expect("flush");
    live.close();
    tear_last_record(&taken);
    let recovered = Engine::open(&taken.0, epoch()).expect("recover");
    assert_eq!(
        recovered.count(&all).expect("count"),
        ENTRIES,
        "a crash in the middle of a take of many kept part of it"
    );
    recovered.close();
}

/// A hook that tells `tx`, then waits for `rx` up to `patience`.
fn tell_then_wait(
    tx: std::sync::mpsc::Sender<()>,
    rx: std::sync::mpsc::Receiver<()>,
    patience: Duration,
) -> Arc<dyn Fn() + Send + Sync> {
    let rx = std::sync::Mutex::new(rx);
    Arc::new(move || {
        let _ = tx.send(());
        let _ = rx.lock().expect("lock").recv_timeout(patience);
    })
}

/// A snapshot whose entry types were cut before a batch began, and whose copy of the
/// answers is taken while the batch is decided, holds none of the batch's answers: the
/// batch is above its type's cut and replayed, and its answer recorded once. Copied in
/// the middle of the batch, the answer held the batch's receipts without their place in
/// the log, and the replay added them again: twice the receipts after a restart.
#[test]
fn a_snapshot_taken_while_a_batch_is_decided_keeps_its_answer_once() {
    use std::sync::mpsc;
    const ENTRIES: u64 = 8;
    let dir = Dir::new();
    let epoch = || config(Clock::manual(SystemTime::UNIX_EPOCH));
    let live = Engine::open(&dir.0, epoch()).expect("open");
    let all = Query::new(TYPES[0], Filter::All);
    // The type exists (and is cut) before the batch.
    live.write(TYPES[0], fields(1, 100), None, Lease::Forever)
        .expect("write");
    let (cut_tx, cut_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (copied_tx, copied_rx) = mpsc::channel::<()>();
    live.set_hooks(crate::engine::TestHooks {
        // The snapshot waits, its types cut, until the batch is decided.
        cut: Some(tell_then_wait(cut_tx, go_rx, Duration::from_secs(5))),
        // The batch, decided, lets the snapshot go on and gives it time to copy.
        batch_decided: Some(tell_then_wait(go_tx, copied_rx, Duration::from_millis(500))),
    });
    let checkpoint = {
        let live = live.clone();
        std::thread::spawn(move || {
            live.checkpoint().expect("checkpoint");
            let _ = copied_tx.send(());
        })
    };
    cut_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the snapshot cut its types");
    let id = RequestId(9);
    let entries = (0..ENTRIES).map(|i| (fields(1, i), None)).collect();
    live.with_request(id, || {
        live.write_all(TYPES[0], &[], entries, Lease::Forever)
    })
    .expect("write the batch");
    checkpoint.join().expect("the checkpoint");
    live.flush_blocking().expect("flush");
    live.set_hooks(crate::engine::TestHooks::default());
    live.close();
    drop(live);
    let recovered = Engine::open(&dir.0, epoch()).expect("recover");
    assert_eq!(recovered.count(&all).expect("count"), ENTRIES + 1);
    match recovered.answer(id) {
        Some(crate::state::Answer::Receipts(receipts)) => assert_eq!(
            receipts.len() as u64,
            ENTRIES,
            "the batch's answer after a restart"
        ),
        other => panic!("the batch's answer was not kept: {other:?}"),
    }
    recovered.close();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SPACE_DETERMINISM_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        .. ProptestConfig::default()
    })]

    #[test]
    fn a_replayed_log_gives_the_live_state(ops in history()) {
        check(&ops);
    }

    #[test]
    fn a_crash_recovers_the_state_of_the_durable_prefix(ops in history(), cut in any::<u32>()) {
        check_crash(&ops, cut);
    }
}
