//! The log store and state machine against openraft's own storage suite, on a real data
//! directory (real files, real fsync).

use std::sync::Arc;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use space_core::EngineConfig;
use space_core::server::LogHost;
use space_tests::TempDir;

use super::{LogStore, Shard, StateMachine};

/// What keeps a built store's directory and host alive.
struct Guard {
    _host: Arc<LogHost>,
    _dir: TempDir,
}

struct OnDisk;

impl StoreBuilder<Shard, LogStore, StateMachine, Guard> for OnDisk {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachine), StorageError<Shard>> {
        let dir = TempDir::new("suite");
        let host = LogHost::open(&dir.0, &EngineConfig::default()).expect("host");
        let (log, image) = host.open_log(7).expect("log");
        let store = LogStore::open(log, image).expect("store");
        let machine =
            StateMachine::open(7, Some(&host), EngineConfig::default()).expect("state machine");
        Ok((
            Guard {
                _host: host,
                _dir: dir,
            },
            store,
            machine,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_and_state_machine_pass_openrafts_storage_suite() {
    Suite::test_all(OnDisk).await.expect("storage suite");
}

/// One append to a follower carries at most `APPEND_BYTES` of entries (an entry larger
/// than that alone), and never none: a follower far behind on a log of large entries
/// is fed in pieces a heartbeat does not wait behind for long, each well within a peer
/// frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_carries_a_bounded_number_of_bytes() {
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::{EntryPayload, RaftLogReader};

    use super::log_store::APPEND_BYTES;
    use super::{Entry, Proposal};

    let dir = TempDir::new("append-bound");
    let host = LogHost::open(&dir.0, &EngineConfig::default()).expect("host");
    let (log, image) = host.open_log(7).expect("log");
    let mut store = LogStore::open(log, image).expect("store");
    let entry = |index: u64, bytes: usize| Entry {
        log_id: openraft::testing::log_id::<Shard>(1, 1, index),
        payload: EntryPayload::Normal(Proposal {
            origin: None,
            command: vec![7; bytes],
        }),
    };
    // 1..=40: 16 KiB each (640 KiB in all); 41: larger than a whole append.
    let mut entries: Vec<Entry> = (1..=40).map(|i| entry(i, 16 << 10)).collect();
    entries.push(entry(41, 2 * APPEND_BYTES as usize));
    store
        .append(entries, IOFlushed::noop())
        .await
        .expect("append");
    let mut reader = store.get_log_reader().await;
    let mut sent = Vec::new();
    let mut next = 1;
    while next <= 41 {
        let got = reader
            .limited_get_log_entries(next, 42)
            .await
            .expect("read");
        assert!(!got.is_empty(), "nothing to send from {next}");
        assert_eq!(got[0].log_id.index, next, "an append starts where asked");
        let bytes: usize = got
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(p) => p.command.len(),
                _ => 0,
            })
            .sum();
        assert!(
            got.len() == 1 || bytes <= APPEND_BYTES as usize,
            "an append from {next} carries {} entries of {bytes} bytes",
            got.len()
        );
        next = got.last().map_or(next, |e| e.log_id.index + 1);
        sent.push(got.len());
    }
    // 40 entries of 16 KiB in appends of at most 256 KiB (15 entries with their
    // encoding), then the large one alone.
    assert!(sent.len() >= 4, "appends: {sent:?}");
    assert_eq!(
        sent.last(),
        Some(&1),
        "the large entry goes alone: {sent:?}"
    );
    assert_eq!(sent.iter().sum::<usize>(), 41);
    // An empty range gives nothing.
    assert!(
        reader
            .limited_get_log_entries(5, 5)
            .await
            .expect("read")
            .is_empty()
    );
}

/// A state machine cuts its snapshot image on a blocking thread: the node's other tasks
/// (heartbeats among them) run on the node's threads while a large state is encoded. A
/// task that only counts its turns on a one-threaded runtime gets turns while the cut is
/// waited for; cut inline, it would get none.
#[tokio::test(flavor = "current_thread")]
async fn cutting_a_snapshot_leaves_the_thread_to_other_tasks() {
    use openraft::storage::RaftStateMachine;
    use std::sync::atomic::{AtomicU64, Ordering};

    let dir = TempDir::new("cut");
    let host = LogHost::open(&dir.0, &EngineConfig::default()).expect("host");
    let mut machine =
        StateMachine::open(7, Some(&host), EngineConfig::default()).expect("state machine");
    let turns = Arc::new(AtomicU64::new(0));
    let counter = tokio::spawn({
        let turns = turns.clone();
        async move {
            loop {
                turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    let before = turns.load(Ordering::Relaxed);
    let _builder = machine.get_snapshot_builder().await;
    let during = turns.load(Ordering::Relaxed) - before;
    counter.abort();
    assert!(during > 0, "no other task ran while the image was cut");
}

/// Commands as a durable engine logs them: 300 writes (some leased), 100 takes and 20
/// claims. Returns them in log order and the number of entries they leave.
fn some_commands() -> (Vec<Vec<u8>>, u64) {
    use space_core::{Fields, Filter, Lease, Query, Value};
    use std::time::Duration;
    let dir = TempDir::new("source");
    let engine = space_core::server::Engine::open(&dir.0, EngineConfig::default()).unwrap();
    let jobs = Query::new("Job", Filter::All);
    for n in 0..300 {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        let lease = if n % 5 == 0 {
            Lease::For(Duration::from_secs(3600))
        } else {
            Lease::Forever
        };
        engine.write("Job", f, None, lease).unwrap();
    }
    for _ in 0..100 {
        engine.take(&jobs, Duration::ZERO).unwrap().wait().unwrap();
    }
    for _ in 0..20 {
        engine
            .claim(&jobs, Lease::For(Duration::from_secs(600)), Duration::ZERO)
            .unwrap()
            .wait()
            .unwrap();
    }
    let left = engine.stats().entries;
    engine.close();
    drop(engine);
    let host = LogHost::open(&dir.0, &EngineConfig::default()).unwrap();
    let (_log, image) = host.open_log(0).unwrap();
    (image.entries.into_values().collect(), left)
}

/// Commands as a durable engine logs them: `n` writes of an entry holding `bytes` bytes,
/// each taken right after it was written (the state stays empty, the log grows).
fn large_writes_taken(n: usize, bytes: usize) -> Vec<Vec<u8>> {
    use space_core::{Fields, Filter, Lease, Query, Value};
    use std::time::Duration;
    let dir = TempDir::new("large");
    let engine = space_core::server::Engine::open(&dir.0, EngineConfig::default()).unwrap();
    let blobs = Query::new("Blob", Filter::All);
    for _ in 0..n {
        let mut f = Fields::new();
        f.push("body", Value::Bytes(vec![7; bytes]));
        engine.write("Blob", f, None, Lease::Forever).unwrap();
        engine.take(&blobs, Duration::ZERO).unwrap().wait().unwrap();
    }
    engine.close();
    drop(engine);
    let host = LogHost::open(&dir.0, &EngineConfig::default()).unwrap();
    let (_log, image) = host.open_log(0).unwrap();
    image.entries.into_values().collect()
}

/// One member of a test group: a data directory, its host, its Raft node and peer port.
struct TestMember {
    id: super::MemberId,
    addr: std::net::SocketAddr,
    raft: super::ShardGroup,
    slot: super::EngineSlot,
    leadership: super::Leadership,
    log: LogStore,
    router: super::PeerRouter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

const GROUP: super::GroupId = 3;
/// The layout fingerprint the one-group tests' nodes show each other.
const ONE_GROUP_CLUSTER: u64 = 7;

/// Starts member `id` on `dir`, serving peers at `addr` (port 0: any free port).
async fn start_member(id: super::MemberId, dir: &std::path::Path, addr: &str) -> TestMember {
    start_member_tuned(id, dir, addr, |_| {}, EngineConfig::default()).await
}

/// As [`start_member`], with Raft settings changed by `tune`, and its engines (and log's
/// share of bytes) configured by `engine`.
async fn start_member_tuned(
    id: super::MemberId,
    dir: &std::path::Path,
    addr: &str,
    tune: impl FnOnce(&mut openraft::Config),
    engine: EngineConfig,
) -> TestMember {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The directory may still be held for a moment by a member that was just stopped.
    let host = {
        let mut tries = 0;
        loop {
            match LogHost::open(dir, &EngineConfig::default()) {
                Ok(host) => break host,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let mut settings = (*super::raft_settings(super::SNAPSHOT_AFTER_ENTRIES).unwrap()).clone();
    // Small enough that the test's log is snapshotted and purged: a member that was away
    // catches up from a snapshot.
    settings.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(100);
    settings.max_in_snapshot_log_to_keep = 10;
    tune(&mut settings);
    let settings = Arc::new(settings.validate().unwrap());
    let router = super::PeerRouter::new(id, None, ONE_GROUP_CLUSTER);
    // Snapshots travel in many chunks.
    router.set_snapshot_chunk(512);
    let member = super::start_member(id, GROUP, &host, &router, settings, engine)
        .await
        .unwrap();
    let groups = super::Groups::default();
    groups.insert(GROUP, member.raft.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let door = super::PeerDoor {
        token: None,
        node: space_core::NodeId::default(),
        max_connections: 64,
        cluster: ONE_GROUP_CLUSTER,
    };
    let served = tokio::spawn(super::serve_peers(listener, groups, door, async {
        let _ = stopped.await;
    }));
    TestMember {
        id,
        addr,
        raft: member.raft,
        slot: member.replica,
        leadership: member.leadership,
        log: member.log,
        router,
        stop: Some(stop),
        served,
    }
}

impl TestMember {
    /// Stops the member as a crash would leave it: Raft stopped, its port closed.
    async fn stop(mut self) {
        let _ = self.raft.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.served.await;
    }
}

/// Asserts that two state digests are equal, without printing whole states.
fn same_digest(mine: &str, expected: &str, who: &str) {
    assert!(
        mine == expected,
        "{who} holds another state: {} lines against {}, first difference at line {:?}",
        mine.lines().count(),
        expected.lines().count(),
        mine.lines().zip(expected.lines()).position(|(a, b)| a != b)
    );
}

/// Asserts that `member`'s replica holds the state `digest`.
fn same_state(member: &TestMember, digest: &str) {
    same_digest(
        &member.slot.engine().state_digest(),
        digest,
        &format!("member {}", member.id),
    );
}

/// Makes `members` one group (through the first of them).
async fn form_group(members: &[TestMember]) {
    let membership: std::collections::BTreeMap<super::MemberId, super::Member> = members
        .iter()
        .map(|m| {
            let addr = m.addr.to_string();
            (m.id, super::Member { addr })
        })
        .collect();
    members[0].raft.initialize(membership).await.unwrap();
}

/// Waits until `member` has applied up to `index`.
async fn applied(member: &TestMember, index: u64) {
    member
        .raft
        .wait(Some(std::time::Duration::from_secs(10)))
        .applied_index_at_least(Some(index), "applied")
        .await
        .unwrap_or_else(|e| panic!("member {} did not apply {index}: {e}", member.id));
}

/// Waits for a leader among `members`; returns its position.
async fn leader_of(members: &[TestMember]) -> usize {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for (i, m) in members.iter().enumerate() {
            if m.raft.current_leader().await == Some(m.id)
                && m.raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
                    .await
                    .is_ok()
            {
                return i;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A leader whose starts of serving fail for a while (its leadership not confirmed by a
/// majority in time) serves once it tries again, though its Raft state does not change.
/// Before, it waited for such a change: a leader that stayed the leader never served,
/// and every call to its shard failed until the next election (the chaos test, with a
/// slow disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_start_failed_serves_once_it_tries_again() {
    let dir = TempDir::new("start-again");
    let member = start_member(1, &dir.0, "127.0.0.1:0").await;
    // Every start fails for a second: longer than the member's Raft state takes to
    // settle once it is elected, so the last change it sees comes while starts fail.
    member
        .leadership
        .fail_starts_until(std::time::Instant::now() + std::time::Duration::from_secs(1));
    form_group(std::slice::from_ref(&member)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while member.leadership.serving().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(member.raft.current_leader().await, Some(1));
    member.stop().await;
}

/// Proposes `commands` through the leader; returns the last log index.
async fn propose(leader: &TestMember, commands: &[Vec<u8>]) -> u64 {
    let mut last = 0;
    for bytes in commands {
        let written = leader
            .raft
            .client_write(super::Proposal {
                origin: None,
                command: bytes.clone(),
            })
            .await
            .unwrap();
        last = written.log_id.index;
    }
    last
}

/// Snapshots by entry count as a node in service takes them (the test members' own are
/// far more frequent).
fn service_snapshots(s: &mut openraft::Config) {
    s.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(super::SNAPSHOT_AFTER_ENTRIES);
    s.max_in_snapshot_log_to_keep = 1_000;
}

/// Starts member 1 on `dir`, its engines (and log's share) configured by `engine`,
/// snapshotting by entry count as in service; a group of its own once formed.
async fn start_lone_member(dir: &std::path::Path, engine: EngineConfig) -> TestMember {
    start_member_tuned(1, dir, "127.0.0.1:0", service_snapshots, engine).await
}

/// Engines whose log keeps a share of `bytes` beyond its snapshot.
fn log_share(bytes: u64) -> EngineConfig {
    let mut engine = EngineConfig::default();
    engine.snapshot_after_bytes = bytes;
    engine
}

/// Waits (up to 10 s) until `member` keeps at most `bytes` of log.
async fn log_settles_within(member: &TestMember, bytes: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while member.log.kept_bytes() > bytes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {} still keeps {} bytes of log, over {bytes}",
            member.id,
            member.log.kept_bytes()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A log of large entries keeps within its share of bytes beyond its snapshot: the group
/// snapshots by bytes long before the entry count (10,000) would have it, and purges
/// what lies behind the snapshot past the share (openraft alone keeps 1,000 entries
/// behind). Before, a shard kept every entry until its 10,000th: here all 400 (3.2 MiB
/// of writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_large_entries_keeps_within_its_share_of_bytes() {
    const SHARE: u64 = 256 << 10;
    let commands = large_writes_taken(200, 16 << 10);
    let dir = TempDir::new("log-bytes");
    let member = start_lone_member(&dir.0, log_share(SHARE)).await;
    form_group(std::slice::from_ref(&member)).await;
    leader_of(std::slice::from_ref(&member)).await;
    let mut most = 0;
    let mut last = 0;
    for chunk in commands.chunks(10) {
        last = propose(&member, chunk).await;
        applied(&member, last).await;
        most = most.max(member.log.kept_bytes());
    }
    // A share before the next snapshot, a share behind the last one, and what is
    // appended while a snapshot is made.
    assert!(
        most <= 4 * SHARE,
        "the log kept up to {most} bytes against a share of {SHARE}"
    );
    // Once the last snapshot lands, at most a share behind it and a share after it.
    log_settles_within(&member, 2 * SHARE).await;
    let snapshot = member
        .raft
        .watch_snapshot_progress()
        .get()
        .map_or(0, |s| s.index);
    assert!(
        snapshot > 0 && last < super::SNAPSHOT_AFTER_ENTRIES,
        "no snapshot by bytes (snapshot at {snapshot}, log at {last})"
    );
    member.stop().await;
}

/// A member that starts with more log beyond its snapshot than its share (restarted
/// with a smaller share, or after a crash) snapshots and purges at once, without waiting
/// for more appends. Before, its keeper counted only the bytes appended after it started,
/// so with nothing more appended the log stayed as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_starting_over_its_share_of_log_snapshots_at_once() {
    const SHARE: u64 = 256 << 10;
    let commands = large_writes_taken(100, 16 << 10);
    let dir = TempDir::new("log-bytes-restart");
    // The default share (64 MiB) holds the whole log.
    let member = start_lone_member(&dir.0, EngineConfig::default()).await;
    form_group(std::slice::from_ref(&member)).await;
    leader_of(std::slice::from_ref(&member)).await;
    let last = propose(&member, &commands).await;
    applied(&member, last).await;
    let before = member.log.kept_bytes();
    assert!(before > 4 * SHARE, "only {before} bytes of log");
    member.stop().await;

    let member = start_lone_member(&dir.0, log_share(SHARE)).await;
    log_settles_within(&member, 2 * SHARE).await;
    member.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_replicates_fails_over_and_brings_a_member_back() {
    let (commands, left) = some_commands();
    let (first, rest) = commands.split_at(200);
    let (second, third) = rest.split_at(120);
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("member")).collect();
    let mut members = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        members.push(start_member(i as u64 + 1, &dir.0, "127.0.0.1:0").await);
    }
    form_group(&members).await;

    // Every member applies what the leader committed, to the same state.
    let leader = leader_of(&members).await;
    let index = propose(&members[leader], first).await;
    for m in &members {
        applied(m, index).await;
    }
    let digest = members[0].slot.engine().state_digest();
    for m in &members[1..] {
        same_state(m, &digest);
    }

    // The leader dies; the other two elect a new one and go on.
    let old = members.remove(leader);
    let (old_id, old_addr) = (old.id, old.addr);
    let old_applied = old
        .raft
        .wait(None)
        .metrics(|_| true, "now")
        .await
        .unwrap()
        .last_applied
        .map_or(0, |l| l.index);
    old.stop().await;
    let leader = leader_of(&members).await;
    let index = propose(&members[leader], second).await;
    for m in &members {
        applied(m, index).await;
    }
    // The log the old leader lacks is gone from the others: only a snapshot can bring it.
    let purged = members[leader]
        .raft
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index > old_applied),
            "the log purged past what the old leader applied",
        )
        .await
        .map(|m| m.purged.map_or(0, |p| p.index))
        .unwrap_or(0);
    assert!(
        purged > old_applied,
        "the log was purged to {purged}, the old leader applied {old_applied}"
    );

    // It comes back from its directory, behind a purged log: it catches up (from a
    // snapshot) and holds the same state as the others.
    let dir = &dirs[usize::try_from(old_id - 1).unwrap()].0;
    members.push(start_member(old_id, dir, &old_addr.to_string()).await);
    let leader = leader_of(&members).await;
    let index = propose(&members[leader], third).await;
    for m in &members {
        applied(m, index).await;
    }
    let digest = members[leader].slot.engine().state_digest();
    for m in &members {
        same_state(m, &digest);
        assert_eq!(m.slot.engine().stats().entries, left, "member {}", m.id);
    }
    for m in members {
        m.stop().await;
    }
}

/// Waits (at most 10 s) until what `engine` did is committed.
async fn committed(engine: &space_core::server::Engine) -> space_core::Result<()> {
    tokio::time::timeout(std::time::Duration::from_secs(10), engine.flush())
        .await
        .expect("the engine's calls were neither committed nor failed in 10 s")
}

/// Waits until one of `members` serves the group (leads, with its serving engine up);
/// returns its position and the engine.
async fn serving(members: &[TestMember]) -> (usize, space_core::server::Engine) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for (i, m) in members.iter().enumerate() {
            if let Some(engine) = m.leadership.serving() {
                return (i, engine);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nobody serves the group"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The index of the last entry of `member`'s log.
async fn last_log_index(member: &TestMember) -> u64 {
    member
        .raft
        .wait(None)
        .metrics(|_| true, "now")
        .await
        .unwrap()
        .last_log_index
        .unwrap_or(0)
}

/// Three members, each on a directory of its own (kept while they run), in one group.
async fn group_of_three(name: &str) -> (Vec<TempDir>, Vec<TestMember>) {
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new(name)).collect();
    let mut members = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        members.push(start_member(i as u64 + 1, &dir.0, "127.0.0.1:0").await);
    }
    form_group(&members).await;
    (dirs, members)
}

/// Waits until every member applied the leader's whole log and all hold one state (at
/// most 10 s); returns its digest.
async fn converged(members: &[TestMember], leader: usize) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let last = last_log_index(&members[leader]).await;
        for m in members {
            applied(m, last).await;
        }
        let digest = members[leader].slot.engine().state_digest();
        let same = members
            .iter()
            .all(|m| m.slot.engine().state_digest() == digest);
        if same || tokio::time::Instant::now() >= deadline {
            for m in members {
                same_state(m, &digest);
            }
            return digest;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_the_leader_are_committed_everywhere_and_the_next_leader_continues() {
    use space_core::wire::RequestId;
    use space_core::{Fields, Filter, Lease, Query, Value};
    use std::time::Duration;
    let job = |n: i64| {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    };
    let jobs = Query::new("Job", Filter::All);
    let (_dirs, mut members) = group_of_three("serve").await;

    // Writes, takes and claims on the leader's engine; answered once committed.
    let (leader, engine) = serving(&members).await;
    for n in 0..100 {
        let lease = if n % 4 == 0 {
            Lease::For(Duration::from_secs(3600))
        } else {
            Lease::Forever
        };
        engine
            .with_request(RequestId::new(), || {
                engine.write("Job", job(n), None, lease)
            })
            .unwrap();
    }
    let take_id = RequestId::new();
    let taken = engine
        .with_request(take_id, || engine.take(&jobs, Duration::ZERO))
        .unwrap()
        .wait()
        .unwrap();
    for _ in 0..29 {
        engine.take(&jobs, Duration::ZERO).unwrap().wait().unwrap();
    }
    for i in 0..5 {
        let claimed = engine
            .claim(&jobs, Lease::For(Duration::from_secs(600)), Duration::ZERO)
            .unwrap()
            .wait()
            .unwrap();
        if i < 2 {
            engine.commit(&claimed.ticket).unwrap();
        }
    }
    // A blocking take is handed the write it waits for.
    let waiting = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            engine
                .take(
                    &Query::parse("Job", "n:1000").unwrap(),
                    Duration::from_secs(10),
                )
                .unwrap()
                .wait()
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.stats().waiters == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the take never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine
        .write("Job", job(1000), None, Lease::Forever)
        .unwrap();
    let handed = waiting
        .join()
        .unwrap()
        .expect("the waiting take got the write");
    assert_eq!(handed.fields.get("n"), Some(&Value::I64(1000)));
    committed(&engine).await.unwrap();

    let digest = converged(&members, leader).await;
    same_digest(&engine.state_digest(), &digest, "the leader's engine");
    assert_eq!(members[leader].slot.engine().stats().entries, 100 - 30 - 2);

    // The leader stops: its engine's unfinished calls fail (a waiting take, raced with
    // the engine's end as a server does, ends at once), and the next leader serves the
    // committed state, answers included.
    let blocked = {
        let engine = engine.clone();
        let pending = engine
            .take(
                &Query::parse("Job", "n:5000").unwrap(),
                Duration::from_secs(60),
            )
            .unwrap();
        tokio::spawn(async move {
            tokio::select! {
                taken = pending.wait_async() => Some(taken),
                () = engine.closed() => None,
            }
        })
    };
    let old = members.remove(leader);
    old.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("a take waiting on a leader that stopped went on waiting")
        .unwrap();
    assert!(ended.is_none(), "the waiting take got {ended:?}");
    engine
        .write("Job", job(2000), None, Lease::Forever)
        .unwrap();
    assert!(
        matches!(
            committed(&engine).await,
            Err(space_core::SpaceError::WrongNode { .. })
        ),
        "a call on a leadership that ended was answered as committed"
    );
    let (leader, next) = serving(&members).await;
    assert_eq!(next.stats().entries, 100 - 30 - 2);
    match next.answer(take_id) {
        Some(space_core::server::Answer::Documents(docs)) => {
            assert_eq!(docs[0], taken);
        }
        other => panic!("the take's answer did not survive the failover: {other:?}"),
    }
    // The take's caller gave it up: the next leader gives back what the first one took,
    // once however often it is asked, and a retry learns that it was given up.
    for _ in 0..2 {
        assert!(
            next.give_back(take_id),
            "the take is not known after the failover"
        );
        committed(&next).await.unwrap();
        assert_eq!(next.stats().entries, 100 - 30 - 2 + 1);
    }
    assert_eq!(
        next.answer(take_id),
        Some(space_core::server::Answer::Revoked)
    );
    assert!(
        !next.give_back(RequestId::new()),
        "an unknown request was given back"
    );
    for _ in 0..10 {
        next.take(&jobs, Duration::ZERO).unwrap().wait().unwrap();
    }
    committed(&next).await.unwrap();
    let digest = converged(&members, leader).await;
    same_digest(&next.state_digest(), &digest, "the next leader's engine");
    assert_eq!(
        members[0].slot.engine().stats().entries,
        100 - 30 - 2 + 1 - 10
    );
    for m in members {
        m.stop().await;
    }
}

/// Starts three members and a group of them, every peer link through its own proxy
/// (`links[i][j]`: what member `i` sends to member `j`).
async fn group_behind_proxies(
    dirs: &[TempDir],
) -> (Vec<TestMember>, Vec<Vec<Option<space_tests::proxy::Proxy>>>) {
    group_behind_proxies_tuned(dirs, |_| {}).await
}

/// As [`group_behind_proxies`], with every member's Raft settings changed by `tune`.
async fn group_behind_proxies_tuned(
    dirs: &[TempDir],
    tune: impl Fn(&mut openraft::Config),
) -> (Vec<TestMember>, Vec<Vec<Option<space_tests::proxy::Proxy>>>) {
    let mut members = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        members.push(
            start_member_tuned(
                i as u64 + 1,
                &dir.0,
                "127.0.0.1:0",
                &tune,
                EngineConfig::default(),
            )
            .await,
        );
    }
    let mut links = Vec::new();
    for from in &members {
        let mut row = Vec::new();
        for to in &members {
            if from.id == to.id {
                row.push(None);
                continue;
            }
            let proxy = space_tests::proxy::Proxy::start(to.addr).await.unwrap();
            from.router.route_via(to.id, proxy.addr().to_string());
            row.push(Some(proxy));
        }
        links.push(row);
    }
    form_group(&members).await;
    (members, links)
}

/// Sets every link to and from member `i`.
fn isolate(
    links: &[Vec<Option<space_tests::proxy::Proxy>>],
    i: usize,
    link: space_tests::proxy::Link,
) {
    for (j, row) in links.iter().enumerate() {
        if let Some(p) = &row[i] {
            p.set(link);
        }
        if j == i {
            for p in row.iter().flatten() {
                p.set(link);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_commits_nothing_and_the_majority_goes_on() {
    use space_core::{Fields, Lease, Value};
    use space_tests::history::{Ended, Op, check};
    let id_of = |doc: &space_core::Document| match doc.fields.get("n") {
        Some(Value::I64(n)) => *n as u64,
        other => panic!("{other:?}"),
    };
    use space_tests::proxy::Link;
    use std::time::Duration;
    let job = |n: i64| {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    };
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("partition")).collect();
    let (members, links) = group_behind_proxies(&dirs).await;
    let (old, engine) = serving(&members).await;
    let sub = engine
        .subscribe(
            &space_core::Query::for_type("Job"),
            space_core::EventKinds::ALL,
            Lease::Forever,
        )
        .unwrap();
    // Every write and take is recorded; the checker reads the history at the end.
    let history = space_tests::history::History::default();
    for n in 0..20 {
        engine.write("Job", job(n), None, Lease::Forever).unwrap();
    }
    committed(&engine).await.unwrap();
    for n in 0..20 {
        history.record(Op::Write {
            id: n as u64,
            ended: Ended::Ok,
        });
    }
    // Committed writes are told.
    let mut told = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while told < 20 && tokio::time::Instant::now() < deadline {
        match sub.try_recv() {
            Some(_) => told += 1,
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert_eq!(told, 20, "committed writes were not told");

    // The leader is cut off (a partition: connections hang, nothing passes).
    isolate(&links, old, Link::Blackhole);
    engine.write("Job", job(100), None, Lease::Forever).unwrap();
    let minority = tokio::time::timeout(Duration::from_secs(3), engine.flush()).await;
    history.record(Op::Write {
        id: 100,
        ended: if matches!(minority, Ok(Ok(()))) {
            Ended::Ok
        } else {
            Ended::Unknown
        },
    });
    // ... nor told it to a subscriber.
    assert!(
        sub.try_recv().is_none(),
        "a write that was never committed was told"
    );
    // The other two elect a leader and go on.
    let majority: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let next = loop {
        if let Some(e) = majority
            .iter()
            .find_map(|i| members[*i].leadership.serving())
        {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the majority elected nobody"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for n in 20..30 {
        next.write("Job", job(n), None, Lease::Forever).unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(
            next.take(&space_core::Query::for_type("Job"), Duration::ZERO)
                .unwrap()
                .wait()
                .expect("an entry"),
        );
    }
    committed(&next).await.unwrap();
    for n in 20..30 {
        history.record(Op::Write {
            id: n as u64,
            ended: Ended::Ok,
        });
    }
    for doc in got {
        history.record(Op::Take {
            got: Some(id_of(&doc)),
            ended: Ended::Ok,
        });
    }

    // Healed: the old leader learns of the new term, steps down, its write is never
    // acknowledged, and all three hold the majority's state.
    isolate(&links, old, Link::Open);
    let ended = tokio::time::timeout(Duration::from_secs(10), engine.flush())
        .await
        .expect("the old leader's call neither failed nor was answered");
    let leader = (0..3)
        .find(|i| members[*i].leadership.serving().is_some())
        .unwrap();
    converged(&members, leader).await;
    let left: Vec<u64> = members[0]
        .slot
        .engine()
        .contents(&space_core::Query::for_type("Job"))
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    let verdict = check(&history.ops(), &left);
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(verdict.acknowledged, 30);
    assert!(
        matches!(ended, Err(space_core::SpaceError::WrongNode { .. })),
        "the old leader's call: {ended:?}"
    );
    for m in &members {
        assert_eq!(m.slot.engine().stats().entries, 25, "member {}", m.id);
    }
    drop(links);
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ports_and_data_ports_each_refuse_the_other_kind_and_wrong_tokens() {
    use crate::handshake::dial;
    use space_core::wire::Hello;
    // A peer port with a token.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_port = listener.local_addr().unwrap();
    let door = super::PeerDoor {
        token: Some("secret".into()),
        node: space_core::NodeId::default(),
        max_connections: 8,
        cluster: ONE_GROUP_CLUSTER,
    };
    tokio::spawn(super::serve_peers(
        listener,
        super::Groups::default(),
        door,
        std::future::pending(),
    ));
    let refused = |r: std::io::Result<_>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        refused(dial(peer_port, Hello::new(Some("secret".into()), 1 << 20)).await)
            .contains("only other nodes"),
        "a client's hello was accepted on a peer port"
    );
    assert!(
        refused(
            dial(
                peer_port,
                Hello::new_peer(Some("wrong".into()), 1 << 20, ONE_GROUP_CLUSTER)
            )
            .await
        )
        .contains("token"),
        "a peer with the wrong token was accepted"
    );
    assert!(
        refused(
            dial(
                peer_port,
                Hello::new_peer(Some("secret".into()), 1 << 20, ONE_GROUP_CLUSTER + 1)
            )
            .await
        )
        .contains("another cluster"),
        "a peer of another cluster was accepted"
    );
    assert!(
        dial(
            peer_port,
            Hello::new_peer(Some("secret".into()), 1 << 20, ONE_GROUP_CLUSTER)
        )
        .await
        .is_ok()
    );
    // A node's data port.
    let node = crate::Node::bind(crate::NodeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..crate::NodeConfig::default()
    })
    .await
    .unwrap();
    let data_port = node.local_addr().unwrap();
    tokio::spawn(node.serve(std::future::pending()));
    assert!(
        refused(dial(data_port, Hello::new_peer(None, 1 << 20, ONE_GROUP_CLUSTER)).await)
            .contains("no peer connections"),
        "a peer's hello was accepted on a data port"
    );
    assert!(dial(data_port, Hello::new(None, 1 << 20)).await.is_ok());
}

#[test]
fn a_layouts_fingerprint_changes_with_its_nodes_shards_and_replication() {
    let nodes = |n: usize| {
        (1..=n)
            .map(|i| format!("10.0.0.{i}:7000"))
            .collect::<Vec<_>>()
    };
    let layout = super::Layout::new(nodes(3), 64, 3).unwrap();
    assert_eq!(
        layout.fingerprint(),
        super::Layout::new(nodes(3), 64, 3).unwrap().fingerprint(),
        "the same layout, created on another node, has another fingerprint"
    );
    for other in [
        super::Layout::new(nodes(3), 32, 3).unwrap(),
        super::Layout::new(nodes(3), 64, 1).unwrap(),
        super::Layout::new(nodes(5), 64, 3).unwrap(),
        super::Layout::new(nodes(3).into_iter().rev().collect(), 64, 3).unwrap(),
    ] {
        assert_ne!(layout.fingerprint(), other.fingerprint(), "{other:?}");
    }
}

/// One node of a sharded test cluster: its directory, host, shard set and peer port.
struct TestNode {
    set: Arc<super::ShardSet>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _host: Arc<LogHost>,
    _dir: TempDir,
}

impl TestNode {
    /// Whether this node serves shard `shard` now (leads it, its serving engine up).
    fn serves(&self, shard: super::GroupId) -> Option<space_core::server::Engine> {
        self.set.member(shard)?.leadership.serving()
    }

    async fn stop(mut self) {
        self.set.stop().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts `n` nodes holding `shards` shards of `replication` replicas, and creates them.
async fn sharded_cluster(n: usize, shards: u32, replication: usize) -> Vec<TestNode> {
    sharded_cluster_of(n, shards, replication, EngineConfig::default()).await
}

/// [`sharded_cluster`] whose engines are configured by `engine`.
async fn sharded_cluster_of(
    n: usize,
    shards: u32,
    replication: usize,
    engine: EngineConfig,
) -> Vec<TestNode> {
    let (layout, listeners) = sharded_layout(n, shards, replication).await;
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        nodes.push(start_sharded_node(&layout, i, listener, engine.clone()).await);
    }
    for node in &nodes {
        node.set.create().await.unwrap();
    }
    nodes
}

/// A layout of `n` nodes on loopback, with the listeners its nodes are to serve peers on.
async fn sharded_layout(
    n: usize,
    shards: u32,
    replication: usize,
) -> (super::Layout, Vec<tokio::net::TcpListener>) {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let layout = super::Layout::new(addrs, shards, replication).unwrap();
    (layout, listeners)
}

/// Starts node `i` (member `i + 1`) of `layout`, serving peers on `listener`; its groups
/// are not created.
async fn start_sharded_node(
    layout: &super::Layout,
    i: usize,
    listener: tokio::net::TcpListener,
    engine: EngineConfig,
) -> TestNode {
    let settings = super::raft_settings(super::SNAPSHOT_AFTER_ENTRIES).unwrap();
    let dir = TempDir::new("sharded");
    let host = LogHost::open(&dir.0, &EngineConfig::default()).unwrap();
    layout.save(&dir.0).unwrap();
    let router = super::PeerRouter::new(i as u64 + 1, None, layout.fingerprint());
    let set = super::ShardSet::start(
        layout.clone(),
        i as u64 + 1,
        &host,
        &router,
        settings,
        engine,
        &|_| None,
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let door = super::PeerDoor {
        token: None,
        node: space_core::NodeId(i as u64 + 1),
        max_connections: 64,
        cluster: layout.fingerprint(),
    };
    tokio::spawn(super::serve_peers(listener, set.groups(), door, async {
        let _ = stopped.await;
    }));
    TestNode {
        set: Arc::new(set),
        stop: Some(stop),
        _host: host,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_are_formed_only_from_the_layout_the_meta_group_committed() {
    use std::time::Duration;
    const SHARDS: u32 = 8;
    let (layout, listeners) = sharded_layout(4, SHARDS, 3).await;
    let mut listeners: Vec<Option<_>> = listeners.into_iter().map(Some).collect();
    // Node 1 (the meta group's first voter) and node 4 (not a voter) alone: the meta
    // group has no quorum, commits no layout, and no shard is formed.
    let mut nodes: Vec<Option<TestNode>> = vec![None, None, None, None];
    for i in [0, 3] {
        let listener = listeners[i].take().unwrap();
        nodes[i] = Some(start_sharded_node(&layout, i, listener, EngineConfig::default()).await);
    }
    let first = nodes[0].as_ref().unwrap().set.clone();
    let creating = tokio::time::timeout(Duration::from_millis(1500), first.create()).await;
    assert!(
        creating.is_err(),
        "shards were created without the meta group: {creating:?}"
    );
    for (shard, member) in first.members() {
        assert!(
            !member.raft.is_initialized().await.unwrap(),
            "shard {shard} was formed before the meta group committed the layout"
        );
    }
    assert_eq!(first.meta_group().layout_version, 0);

    // With nodes 2 and 3 the meta group elects a leader, which writes the layout; then
    // the shards form, and the fourth node learns the layout as a learner.
    for i in [1, 2] {
        let listener = listeners[i].take().unwrap();
        nodes[i] = Some(start_sharded_node(&layout, i, listener, EngineConfig::default()).await);
    }
    let nodes: Vec<TestNode> = nodes.into_iter().map(Option::unwrap).collect();
    for node in &nodes {
        tokio::time::timeout(Duration::from_secs(20), node.set.create())
            .await
            .expect("the meta group commits the layout")
            .unwrap();
    }
    all_served(&nodes, SHARDS).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen: Vec<_> = nodes.iter().map(|n| n.set.meta_group()).collect();
        let settled = seen.iter().all(|m| {
            m.voters == [1, 2, 3].map(space_core::NodeId)
                && m.learners == [space_core::NodeId(4)]
                && m.layout_version == 1
                && m.layout_fingerprint == layout.fingerprint()
                && m.leader.is_some()
                && m.leader == seen[0].leader
        });
        if settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the meta group did not settle: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

/// Waits until every shard is served by one of `nodes`; returns how many each serves.
async fn all_served(nodes: &[TestNode], shards: u32) -> Vec<usize> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut led = vec![0; nodes.len()];
        let mut served = 0;
        for shard in 0..shards {
            if let Some(i) = nodes.iter().position(|n| n.serves(shard).is_some()) {
                led[i] += 1;
                served += 1;
            }
        }
        if served == shards as usize {
            return led;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{served} of {shards} shards served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_their_leaders_and_move_them_when_a_node_stops() {
    use std::time::{Duration, Instant};
    const SHARDS: u32 = 24;
    let mut nodes = sharded_cluster(3, SHARDS, 3).await;
    let led = all_served(&nodes, SHARDS).await;
    assert!(
        led.iter().all(|n| *n >= SHARDS as usize / 6),
        "leaders are not spread: {led:?}"
    );
    // Every shard commits a write through its leader; the key it mints is the shard's,
    // and the other nodes send it to that leader.
    let mut keys = Vec::new();
    for shard in 0..SHARDS {
        let leader = nodes
            .iter()
            .position(|n| n.serves(shard).is_some())
            .unwrap();
        let engine = nodes[leader].serves(shard).unwrap();
        let mut f = space_core::Fields::new();
        f.push("shard", space_core::Value::I64(i64::from(shard)));
        let receipt = engine
            .write("Job", f, None, space_core::Lease::Forever)
            .unwrap();
        committed(&engine).await.unwrap();
        let layout = nodes[0].set.layout();
        assert_eq!(
            layout.shard_of_range(space_core::wire::range_of(&receipt.key)),
            shard
        );
        assert!(nodes[leader].set.serving_for(&receipt.key).is_ok());
        for (i, other) in nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
            match other.set.serving_for(&receipt.key) {
                Err(space_core::SpaceError::WrongNode { owner, .. }) => {
                    // The leader may not have told this follower yet; then it names none.
                    if let Some(owner) = owner {
                        assert_eq!(
                            Some(owner.as_str()),
                            layout.address(leader as u64 + 1),
                            "node {i}"
                        );
                    }
                }
                Err(e) => panic!("node {i}: {e}"),
                Ok(_) => panic!("node {i} served another node's shard"),
            }
        }
        keys.push(receipt.key);
    }
    // Every node's topology names each range's leader.
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in &nodes {
        loop {
            let topology = node.set.topology();
            let right = keys.iter().enumerate().all(|(shard, key)| {
                let owner = topology.owner_of(key).map(|n| n.address.clone());
                let leader = nodes.iter().position(|n| n.serves(shard as u32).is_some());
                owner.as_deref() == leader.and_then(|l| node.set.layout().address(l as u64 + 1))
            });
            if right {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a topology does not name the leaders"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let epoch_before = nodes[1].set.topology().epoch;

    // The first node stops: each shard it led gets a leader among the other two.
    // A take on a shard of the node about to stop, answered before it stops.
    let taken_shard = (0..SHARDS).find(|s| nodes[0].serves(*s).is_some()).unwrap();
    let take_id = space_core::wire::RequestId::new();
    let engine = nodes[0].serves(taken_shard).unwrap();
    let taken = engine
        .with_request(take_id, || {
            engine.take(&space_core::Query::for_type("Job"), Duration::ZERO)
        })
        .unwrap()
        .wait()
        .expect("the shard's entry");
    committed(&engine).await.unwrap();

    let gone = nodes.remove(0);
    let moved: Vec<super::GroupId> = (0..SHARDS).filter(|s| gone.serves(*s).is_some()).collect();
    let gone_addr = gone.set.layout().address(1).unwrap_or_default().to_owned();
    gone.stop().await;
    let stopped = Instant::now();
    let mut took = Vec::new();
    let mut waiting = moved.clone();
    while !waiting.is_empty() {
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "shards {waiting:?} found no new leader"
        );
        waiting.retain(|s| {
            if nodes.iter().any(|n| n.serves(*s).is_some()) {
                took.push(stopped.elapsed());
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    eprintln!(
        "failover of {} shards after a node stopped: p50 {:?}, p99 {:?}",
        took.len(),
        at(0.5),
        at(0.99)
    );
    // A survivor's topology moved them, under a higher epoch.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let topology = nodes[0].set.topology();
        let moved_right = moved.iter().all(|s| {
            let owner = topology
                .owner_of(&keys[*s as usize])
                .map(|n| n.address.clone());
            owner.as_deref() != Some(gone_addr.as_str())
        });
        if moved_right && topology.epoch > epoch_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the topology still names the stopped node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The take's retry on the shard's new leader gets its first answer.
    let new_leader = nodes
        .iter()
        .find(|n| n.serves(taken_shard).is_some())
        .unwrap();
    match new_leader.set.answer(take_id).map(|(_, _, a)| a) {
        Some(space_core::server::Answer::Documents(docs)) => assert_eq!(docs, vec![taken]),
        other => panic!("the take's answer did not move with its shard: {other:?}"),
    }
    // The moved shards serve: a write commits with two of three replicas.
    for shard in moved {
        let engine = nodes.iter().find_map(|n| n.serves(shard)).unwrap();
        let held = if shard == taken_shard { 0 } else { 1 };
        assert_eq!(engine.stats().entries, held, "shard {shard} lost its entry");
        engine
            .write(
                "Job",
                space_core::Fields::new(),
                None,
                space_core::Lease::Forever,
            )
            .unwrap();
        committed(&engine).await.unwrap();
    }
    for node in nodes {
        node.stop().await;
    }
}

/// A subscription registered through a shard's log is held by every replica of the
/// shard, which number its events alike: when the leader goes, the replica of whichever
/// node takes over holds the events the old leader's replica told, under the same
/// numbers, and numbers the next ones on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_holds_a_logged_subscription_and_numbers_its_events_alike() {
    use space_core::server::{Registered, new_logged_id};
    use space_core::{EventKinds, Fields, Filter, Lease, Notification, Query, Value};
    use std::time::Duration;
    let job = |n: i64| {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    };
    let jobs = Query::new("Job", Filter::All);
    let mut nodes = sharded_cluster(3, 1, 3).await;
    all_served(&nodes, 1).await;
    let leader = nodes.iter().position(|n| n.serves(0).is_some()).unwrap();
    let engine = nodes[leader].serves(0).unwrap();
    let id = new_logged_id();
    let registered = engine
        .subscribe_logged(
            id,
            &jobs,
            EventKinds::WRITTEN,
            Lease::Forever,
            b"there".to_vec(),
            0,
        )
        .unwrap();
    assert_eq!(registered, Registered::Added);
    for n in 0..5 {
        engine.write("Job", job(n), None, Lease::Forever).unwrap();
    }
    committed(&engine).await.unwrap();
    // Every replica applies the registration and the writes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes
        .iter()
        .any(|n| n.set.replica_engine(0).unwrap().stats().entries < 5)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replicas never applied the writes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seqs = |feed: &space_core::Subscription| -> Vec<u64> {
        std::iter::from_fn(|| feed.try_recv())
            .map(|n| match n {
                Notification::Event(e) => e.seq,
                other => panic!("a replica that applied everything told {other:?}"),
            })
            .collect()
    };
    for node in &nodes {
        let replica = node.set.replica_engine(0).unwrap();
        let held = replica.logged();
        assert_eq!(held.len(), 1, "every replica holds the subscription");
        assert_eq!(held[0].attachment, b"there");
        let feed = replica.logged_feed("Job", id).unwrap();
        assert_eq!(seqs(&feed), [1, 2, 3, 4, 5]);
        // Still kept for whoever leads next.
        feed.rewind(0);
    }

    // The leader goes; whichever node takes over holds the same five, numbered alike,
    // and numbers the next ones on.
    nodes.remove(leader).stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let engine = loop {
        if let Some(engine) = nodes.iter().find_map(|n| n.serves(0)) {
            break engine;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no follower took over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for n in 5..8 {
        engine.write("Job", job(n), None, Lease::Forever).unwrap();
    }
    committed(&engine).await.unwrap();
    let next = nodes.iter().find(|n| n.serves(0).is_some()).unwrap();
    let replica = next.set.replica_engine(0).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replica.stats().entries < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writes were not applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let feed = replica.logged_feed("Job", id).unwrap();
    feed.rewind(0);
    assert_eq!(seqs(&feed), [1, 2, 3, 4, 5, 6, 7, 8]);
    for node in nodes {
        node.stop().await;
    }
}

/// Moves the group's leadership from `members[from]` to `members[to]` and waits until
/// `to` serves it; returns its serving engine.
async fn hand_over(members: &[TestMember], from: usize, to: usize) -> space_core::server::Engine {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(engine) = members[to].leadership.serving() {
            return engine;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {} never took the leadership over",
            members[to].id
        );
        let _ = members[from]
            .raft
            .trigger()
            .transfer_leader(members[to].id)
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A leader whose leadership ended and came back to it in a later term: what its first
/// leadership's engine still decides (a late drop handing an entry back, a lease timer)
/// is never committed under the second, whose engine never decided it. Before proposals
/// were tied to their leadership, such a change entered the new term's log: the replicas
/// then held what no serving engine did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_ended_leadership_still_decides_is_not_committed_under_a_later_one() {
    use space_core::{Fields, Filter, Lease, Query, Value};
    let job = |n: i64| {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    };
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("later")).collect();
    let mut members = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        members.push(start_member(i as u64 + 1, &dir.0, "127.0.0.1:0").await);
    }
    form_group(&members).await;
    let (first, old) = serving(&members).await;
    old.write("Job", job(1), None, Lease::Forever).unwrap();
    committed(&old).await.unwrap();
    let other = (first + 1) % members.len();
    hand_over(&members, first, other).await;
    let new = hand_over(&members, other, first).await;
    assert!(!new.same_as(&old), "the leadership did not change");

    // The first leadership's engine decides a change after it ended.
    old.write("Job", job(2), None, Lease::Forever).unwrap();
    assert!(
        committed(&old).await.is_err(),
        "an ended leadership committed"
    );
    new.write("Job", job(3), None, Lease::Forever).unwrap();
    committed(&new).await.unwrap();
    converged(&members, first).await;
    let replica = members[first].slot.engine();
    let two = Query::new("Job", Filter::Eq("n".into(), Value::I64(2)));
    assert_eq!(
        replica.count(&two).unwrap(),
        0,
        "the ended leadership's write was committed under the next one"
    );
    assert_eq!(
        replica.count(&Query::new("Job", Filter::All)).unwrap(),
        new.count(&Query::new("Job", Filter::All)).unwrap(),
        "the replicas and the serving engine differ"
    );
    for m in members {
        m.stop().await;
    }
}

/// A leader that hears from no majority for longer than its lease stays the leader of
/// its term, and openraft refuses what it proposes meanwhile without a word. Once its
/// followers answer again in that term, its later proposals commit. A call the serving
/// engine decided while the lease was out was never logged: it must not be acknowledged
/// when those later proposals commit. Before, it was: a take handed out an entry the
/// replicas kept, and the entry came back after the next failover (the chaos test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_refused_while_the_lease_ran_out_is_never_acknowledged() {
    use space_core::{Fields, Filter, Lease, Query, Value};
    use space_tests::proxy::Link;
    let job = |n: i64| {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    };
    // Cut off, the followers do not start a term of their own: their pre-votes find no
    // majority.
    let pre_vote = |c: &mut openraft::Config| c.enable_pre_vote = Some(true);
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("lease")).collect();
    let (members, links) = group_behind_proxies_tuned(&dirs, pre_vote).await;
    let (leader, engine) = serving(&members).await;
    let first_term = members[leader].leadership.term().unwrap_or_default();
    engine.write("Job", job(1), None, Lease::Forever).unwrap();
    committed(&engine).await.unwrap();

    // Every link cut for longer than the lease: the leader's lease runs out.
    for proxy in links.iter().flatten().flatten() {
        proxy.set(Link::Blackhole);
    }
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    engine.write("Job", job(2), None, Lease::Forever).unwrap();
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { committed(&engine).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for proxy in links.iter().flatten().flatten() {
        proxy.set(Link::Open);
    }
    let _ = members[leader].raft.trigger().heartbeat().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    engine.write("Job", job(3), None, Lease::Forever).unwrap();
    let third = committed(&engine).await;
    let second = second.await.unwrap();
    let term = |m: &TestMember| m.leadership.term();

    // What was acknowledged is what the group holds; the group goes on, served in a
    // later term.
    let (now, serving_engine) = serving(&members).await;
    assert!(
        term(&members[now]).is_some_and(|t| t > first_term),
        "the term whose proposal was lost is served again"
    );
    serving_engine
        .write("Job", job(4), None, Lease::Forever)
        .unwrap();
    committed(&serving_engine).await.unwrap();
    let digest = converged(&members, now).await;
    let replica = members[now].slot.engine();
    for (n, answer) in [(2, second), (3, third)] {
        let held = replica
            .count(&Query::new("Job", Filter::Eq("n".into(), Value::I64(n))))
            .unwrap();
        if answer.is_ok() {
            assert_eq!(
                held, 1,
                "write {n} was acknowledged, the group does not hold it"
            );
        }
        assert!(held <= 1, "write {n} is held {held} times");
    }
    for m in &members {
        same_state(m, &digest);
    }
    for m in members {
        m.stop().await;
    }
}

/// A type's indexes, declared with a client's first write to a node (which goes to one
/// shard), reach every shard the node leads; one shard full of types does not keep them
/// from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_declared_on_a_node_reach_every_shard_it_leads() {
    let mut engine = EngineConfig::default();
    engine.max_entry_types = Some(1);
    let nodes = sharded_cluster_of(1, 4, 1, engine).await;
    all_served(&nodes, 4).await;
    let (full, engine) = nodes[0].set.serving()[0].clone();
    engine
        .write(
            "Other",
            space_core::Fields::new(),
            None,
            space_core::Lease::Forever,
        )
        .unwrap();
    nodes[0]
        .set
        .declare_indexes("Order", &["status".to_owned()])
        .unwrap();
    let led = nodes[0].set.serving();
    assert_eq!(led.len(), 4);
    for (shard, engine) in led.iter().filter(|(s, _)| *s != full) {
        let digest = engine.state_digest();
        assert!(
            digest.contains(r#"type Order next 0 indexes ["status"]"#),
            "shard {shard}: {digest}"
        );
    }
    for node in nodes {
        node.stop().await;
    }
}

/// A batch of writes on a leader is one entry of the group's log, so that a leader that
/// dies before the log committed it leaves all of it or none; every replica applies it
/// whole, and the next leader answers its retry with every receipt. (With an entry per
/// write, the log could commit the batch's first writes only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_entry_of_the_log_and_applied_whole_everywhere() {
    use space_core::wire::RequestId;
    use space_core::{Fields, Lease, Value};
    const BATCH: i64 = 50;
    let (_dirs, members) = group_of_three("batch").await;
    let (leader, engine) = serving(&members).await;
    let before = last_log_index(&members[leader]).await;
    let id = RequestId::new();
    let entries: Vec<(Fields, Option<space_core::Key>)> = (0..BATCH)
        .map(|n| {
            let mut f = Fields::new();
            f.push("n", Value::I64(n));
            (f, None)
        })
        .collect();
    let receipts = engine
        .with_request(id, || engine.write_all("Job", &[], entries, Lease::Forever))
        .unwrap();
    assert_eq!(receipts.len() as i64, BATCH);
    committed(&engine).await.unwrap();
    assert_eq!(
        last_log_index(&members[leader]).await,
        before + 1,
        "the batch took more than one entry of the log"
    );
    let digest = converged(&members, leader).await;
    same_digest(&engine.state_digest(), &digest, "the leader's engine");
    for m in &members {
        let replica = m.slot.engine();
        assert_eq!(replica.stats().entries, BATCH as u64);
        match replica.answer(id) {
            Some(space_core::server::Answer::Receipts(r)) => {
                assert_eq!(
                    r.len() as i64,
                    BATCH,
                    "member {}'s answer of the batch",
                    m.id
                );
            }
            other => panic!("member {} kept no answer of the batch: {other:?}", m.id),
        }
    }
    // Another member leads: it answers the batch's retry whole.
    let next = hand_over(&members, leader, (leader + 1) % members.len()).await;
    match next.answer(id) {
        Some(space_core::server::Answer::Receipts(r)) => assert_eq!(r.len() as i64, BATCH),
        other => panic!("the next leader kept no answer of the batch: {other:?}"),
    }
    for m in members {
        m.stop().await;
    }
}
