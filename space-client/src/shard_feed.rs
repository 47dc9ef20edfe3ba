//! Notify on a replicated cluster: a subscription registered through every shard's log.
//!
//! The client picks the subscription's id ([`new_logged_id`]) and asks each shard's
//! leader to register it in the shard's log
//! ([`Request::SubscribeShards`](space_core::wire::Request::SubscribeShards)), with the
//! endpoint its events go to. Every replica of a shard then holds it and numbers the
//! shard's events for it alike, so the subscription is one stream per shard, numbered 1,
//! 2, 3, ... whichever node leads the shard: the leader pushes, and a new leader
//! continues the same numbers (it first sends what its replica still keeps, and what the
//! client already had is dropped here). A node that restarts has the subscription back
//! from its log; nothing is registered anew.
//!
//! A subscription without a lease of its own is kept alive by renewing it, through the
//! logs, every quarter to third of the lease the shards give it. A shard that lost it
//! (its lease ran out there while no renewal could reach the shard's leader) gets it
//! again, numbered after the last number this client had from the shard, and the
//! subscriber is told it may have missed events (`Missed`). A shard whose leader could
//! not be reached when it subscribed is named by
//! [`Subscription::unreached`](space_core::Subscription::unreached) until a renewal
//! registers it there.
//!
//! A client whose endpoint the nodes cannot reach polls each node for the shards it leads
//! ([`poll_from`]). A detached subscription stays on the shards for its lease; resumed from
//! its position ([`Cluster::resume_shards`]), it is attached to the resuming client, and
//! each shard's leader sends again what it keeps after the position.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::remote::RemoteFeed;
use space_core::server::new_logged_id;
use space_core::wire::{Request, Response, Topology, shard_of_range};
use space_core::{
    EventKinds, Lease, NodeId, Notification, PartPosition, Result, SpaceError, Subscription,
    SubscriptionPosition,
};

use crate::cluster::Cluster;
use crate::subscriber::{
    Endpoint, FeedSender, Held, Receiving, ShardSink, Spec, feed_channel, pass_in_order,
};

/// The first pause before a renewal round registers the shards still missing; it doubles
/// up to the regular pause.
const REGISTER_SOON: Duration = Duration::from_millis(250);

/// One shard's stream of a subscription.
struct ShardPart {
    /// The last number received from the shard.
    last_seq: AtomicU64,
    /// The last number handed to the subscriber.
    handed: Arc<AtomicU64>,
    /// Resumed, and the shard's leader has yet to push again from what it keeps:
    /// pushes that run ahead of `last_seq` come from its pusher of before the resume
    /// (whose events, pushed while the subscription was detached, were dropped), and
    /// come again after it.
    awaits_rewind: AtomicBool,
    /// The shard told the subscription ended there (its lease ran out).
    ended: AtomicBool,
}

/// A subscription of a replicated cluster, on every shard.
pub(crate) struct ShardState {
    id: u64,
    spec: Spec,
    /// Drawn for this attachment of the subscription (see
    /// [`Request::SubscribeShards`](space_core::wire::Request::SubscribeShards)).
    attachment: u64,
    parts: Vec<ShardPart>,
    /// Where the shards' events go; gone once every shard ended the subscription.
    tx: Mutex<Option<FeedSender>>,
    /// Shards it is not registered on (their leader could not be reached, or the shard
    /// lost it).
    unreached: Mutex<BTreeSet<u32>>,
    cancelled: AtomicBool,
    /// Detached: no longer renewed (its shards keep it for its lease).
    detached: AtomicBool,
    /// Its events are fetched from the shards' leaders ([`poll_from`]), not pushed.
    polled: AtomicBool,
    /// Made without a lease of its own: renewed while its handle lives, so a shard
    /// whose lease of it ran out lost it (it is registered there again).
    renewed: bool,
}

impl ShardState {
    /// Subscription `id`, numbered on each shard after `positions` (the last number had
    /// from each; `resumed`: pushes that run ahead are held back until its leader sends
    /// again), pushed, attached anew (a fresh attachment), its events going to `tx`.
    fn new(
        id: u64,
        spec: Spec,
        (positions, resumed): (&[u64], bool),
        tx: FeedSender,
        renewed: bool,
    ) -> ShardState {
        ShardState {
            id,
            spec,
            attachment: new_logged_id(),
            parts: positions
                .iter()
                .map(|at| ShardPart {
                    last_seq: AtomicU64::new(*at),
                    handed: Arc::new(AtomicU64::new(*at)),
                    awaits_rewind: AtomicBool::new(resumed),
                    ended: AtomicBool::new(false),
                })
                .collect(),
            tx: Mutex::new(Some(tx)),
            unreached: Mutex::new(BTreeSet::new()),
            cancelled: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            polled: AtomicBool::new(false),
            renewed,
        }
    }

    fn alive(&self) -> bool {
        !self.cancelled.load(Ordering::Acquire)
            && !self.detached.load(Ordering::Acquire)
            && self.tx.lock().is_some()
    }

    /// Tells the subscriber it may have missed events of unknown numbers.
    fn announce_missed(&self) {
        crate::subscriber::announce_missed(self.tx.lock().clone());
    }

    /// Notes that `shard` ended the subscription (its lease ran out there): once every
    /// shard did, the stream ends after what it holds. A subscription kept alive by
    /// renewals lost it there instead (no renewal reached the shard in time): it is
    /// registered there again, after a `Missed` notice.
    fn shard_ended(&self, shard: u32) {
        if self.renewed {
            tracing::info!(
                subscription = self.id,
                shard,
                "a shard let go of a subscription; registering it again"
            );
            self.unreached.lock().insert(shard);
            self.announce_missed();
            return;
        }
        if let Some(part) = self.parts.get(shard as usize) {
            part.ended.store(true, Ordering::Release);
        }
        if self.parts.iter().all(|p| p.ended.load(Ordering::Acquire)) {
            self.tx.lock().take();
        }
    }

    /// Every shard, and the last number had from each.
    fn positions(&self, shards: &[u32]) -> Vec<(u32, u64)> {
        shards
            .iter()
            .map(|s| {
                let part = self.parts.get(*s as usize);
                (*s, part.map_or(0, |p| p.last_seq.load(Ordering::Acquire)))
            })
            .collect()
    }
}

/// Passes `shard`'s `notifications` on to the subscription's stream, in order (each event
/// naming its shard). Returns false when the stream is gone.
async fn pass_shard(state: &ShardState, shard: u32, notifications: Vec<Notification>) -> bool {
    let (Some(part), Some(tx)) = (state.parts.get(shard as usize), state.tx.lock().clone()) else {
        return false;
    };
    let notifications = notifications
        .into_iter()
        .map(|mut n| {
            if let Notification::Event(e) = &mut n {
                e.shard = Some(shard);
            }
            n
        })
        .collect();
    pass_in_order(
        &part.last_seq,
        Some(&part.awaits_rewind),
        &part.handed,
        &tx,
        notifications,
    )
    .await
}

impl ShardSink for ShardState {
    fn pass(&self, shard: u32, notifications: Vec<Notification>) -> BoxFuture<'_, bool> {
        Box::pin(pass_shard(self, shard, notifications))
    }

    fn ended(&self, shard: u32) {
        self.shard_ended(shard);
    }
}

/// The leader of each of `shards`, as `topology` has them: by leader address.
fn leaders_of(topology: &Topology, shards: &BTreeSet<u32>) -> BTreeMap<String, Vec<u32>> {
    let mut leaders: BTreeMap<u32, String> = BTreeMap::new();
    for (range, owner) in topology.owners.iter().enumerate() {
        let shard = shard_of_range(range as u32, topology.shards);
        if !shards.contains(&shard) || leaders.contains_key(&shard) {
            continue;
        }
        if let Some(node) = topology.nodes.get(*owner as usize) {
            leaders.insert(shard, node.address.clone());
        }
    }
    let mut by_leader: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (shard, addr) in leaders {
        by_leader.entry(addr).or_default().push(shard);
    }
    by_leader
}

/// What the shards' leaders answered to a request about a subscription.
#[derive(Debug, Default)]
struct Answered {
    /// Shards where it was done.
    done: BTreeSet<u32>,
    /// Shards whose leader answered that they do not hold the subscription.
    missing: BTreeSet<u32>,
    /// Shards no leader answered for in time.
    unanswered: BTreeSet<u32>,
    /// Of the shards done, those where a subscription was registered anew.
    anew: BTreeSet<u32>,
}

/// Whether a failed call is worth making again after a refresh of the topology.
fn worth_again(e: &SpaceError) -> bool {
    e.is_unreachable()
        || matches!(
            e,
            SpaceError::WrongNode { .. } | SpaceError::Unavailable { .. }
        )
}

/// Sends `request` for each group of `shards` to the group's leader, and again to the
/// new leaders of the shards a node answered it does not lead (after asking for the
/// topology), until every shard was answered by its leader or `patience` ran out.
///
/// # Errors
/// A refusal that asking again would not change (a bad query, `Busy`, an endpoint the
/// nodes cannot reach).
async fn to_leaders(
    cluster: &Cluster,
    shards: BTreeSet<u32>,
    patience: Duration,
    request: impl Fn(Vec<u32>) -> Request,
) -> Result<Answered> {
    let deadline = Instant::now() + patience;
    let mut answered = Answered {
        unanswered: shards,
        ..Answered::default()
    };
    let mut pause = Duration::from_millis(20);
    loop {
        let groups = leaders_of(&cluster.topology(), &answered.unanswered);
        let calls = groups.into_iter().map(|(addr, group)| {
            let request = request(group.clone());
            async move {
                let answer = match cluster.node(&addr).await {
                    Ok(conn) => conn.call(request).await,
                    Err(e) => Err(e),
                };
                (addr, answer)
            }
        });
        for (addr, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok(Response::OnShards {
                    done,
                    anew,
                    missing,
                    ..
                }) => {
                    // A shard led and neither done nor missing lost its leadership
                    // meanwhile: asked again.
                    answered.anew.extend(anew);
                    for shard in done {
                        answered.unanswered.remove(&shard);
                        answered.done.insert(shard);
                    }
                    for shard in missing {
                        answered.unanswered.remove(&shard);
                        answered.missing.insert(shard);
                    }
                }
                Ok(other) => {
                    return Err(SpaceError::Protocol {
                        reason: format!("unexpected answer {other:?}"),
                    });
                }
                Err(e) if worth_again(&e) => {
                    tracing::debug!(node = %addr, error = %e, "a shard leader did not answer about a subscription");
                }
                Err(e) => return Err(e),
            }
        }
        if answered.unanswered.is_empty() || Instant::now() >= deadline {
            return Ok(answered);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
        let _ = cluster.refresh().await;
    }
}

/// Registers `state` on `shards` (numbered, on each, after the last number had from
/// it), or attaches it to this client where they hold it. The shards not registered are
/// noted as unreached; those registered are not. Returns the shards where it was
/// registered anew.
///
/// # Errors
/// As [`to_leaders`].
async fn register(
    cluster: &Cluster,
    state: &ShardState,
    endpoint: &Endpoint,
    shards: BTreeSet<u32>,
    patience: Duration,
) -> Result<BTreeSet<u32>> {
    let answered = to_leaders(cluster, shards, patience, |group| {
        Request::SubscribeShards {
            id: state.id,
            query: state.spec.query.clone(),
            kinds: state.spec.kinds,
            lease: state.spec.lease,
            endpoint: (!state.polled.load(Ordering::Acquire)).then_some(endpoint.advertised),
            attachment: state.attachment,
            shards: state.positions(&group),
        }
    })
    .await?;
    let mut unreached = state.unreached.lock();
    for shard in &answered.done {
        unreached.remove(shard);
    }
    unreached.extend(answered.missing);
    unreached.extend(answered.unanswered);
    Ok(answered.anew)
}

impl Cluster {
    /// Subscribes on a replicated cluster: registered in every shard's log (see the
    /// module documentation).
    ///
    /// # Errors
    /// A refusal (an invalid query, `Busy`, an endpoint the nodes cannot reach), or
    /// `Unreachable` when no shard's leader could be reached.
    pub(crate) async fn subscribe_shards(
        self: &Arc<Self>,
        query: space_core::Query,
        kinds: EventKinds,
        lease: Lease,
    ) -> Result<Subscription> {
        let positions = vec![0; self.topology().shards as usize];
        self.attach_shards(new_logged_id(), query, kinds, lease, (&positions, false))
            .await
    }

    /// Picks up a detached subscription of a replicated cluster where `position` says
    /// it stands: attached to this client on every shard that still holds it, where
    /// its leader sends again what it keeps after the last number handed out (nothing
    /// is lost while it keeps them); registered anew on a shard that let go of it (its
    /// lease ran out), numbered on from there, after a `Missed` notice. Kept alive from
    /// then on, as a subscription made without a lease.
    ///
    /// # Errors
    /// As [`subscribe_shards`](Self::subscribe_shards); a position that is not one of a
    /// replicated cluster's subscription (`Protocol`).
    pub(crate) async fn resume_shards(
        self: &Arc<Self>,
        position: SubscriptionPosition,
    ) -> Result<Subscription> {
        let shards = self.topology().shards as usize;
        let id = position.parts.first().map_or(0, |p| p.id);
        let mut positions = vec![0; shards];
        for part in &position.parts {
            let at = part.shard.and_then(|s| positions.get_mut(s as usize));
            match at {
                Some(at) if part.id == id => *at = part.last_seq,
                _ => {
                    return Err(SpaceError::Protocol {
                        reason: format!(
                            "the position names {part:?}, not a shard of this cluster's {shards} of subscription {id:#x}"
                        ),
                    });
                }
            }
        }
        let at = (positions.as_slice(), true);
        self.attach_shards(id, position.query, position.kinds, Lease::Forever, at)
            .await
    }

    /// Registers subscription `id` on every shard, or attaches it to this client where
    /// a shard holds it, numbered after `positions` (the last number had from each
    /// shard). A subscription `resumed` is told `Missed` when a shard had let go of
    /// it.
    async fn attach_shards(
        self: &Arc<Self>,
        id: u64,
        query: space_core::Query,
        kinds: EventKinds,
        lease: Lease,
        (positions, resumed): (&[u64], bool),
    ) -> Result<Subscription> {
        let endpoint = self.endpoint().await?;
        let (shard_lease, renewed) = crate::subscriber::lease_given(lease, self.config());
        let (tx, rx) = feed_channel();
        let spec = Spec {
            query: query.clone(),
            kinds,
            lease: shard_lease,
        };
        let state = Arc::new(ShardState::new(id, spec, (positions, resumed), tx, renewed));
        state.polled.store(endpoint.polls(), Ordering::Release);
        // Held before any shard registers it: its first events can come before the
        // answers do.
        endpoint.shard_feeds.lock().insert(
            id,
            Held::Attached(Arc::downgrade(&state) as Weak<dyn ShardSink>),
        );
        let feed = ShardFeed {
            receiving: Receiving::new(rx),
            state: state.clone(),
            cluster: Arc::downgrade(self),
            endpoint: endpoint.clone(),
            runtime: self.runtime().clone(),
        };
        let all: BTreeSet<u32> = (0..positions.len() as u32).collect();
        let patience = self.config().retry_for;
        let registered = match register(self, &state, &endpoint, all.clone(), patience).await {
            Err(SpaceError::EndpointUnreachable {
                endpoint: at,
                reason,
            }) if endpoint.refuse_push() => {
                tracing::info!(endpoint = %at, %reason, "the nodes cannot reach this client's subscriber endpoint: its events are fetched from them from now on");
                state.polled.store(true, Ordering::Release);
                register(self, &state, &endpoint, all, patience).await
            }
            registered => registered,
        };
        let anew = match registered {
            Ok(anew) => anew,
            Err(e) => {
                feed.cancel();
                return Err(e);
            }
        };
        if state.unreached.lock().len() == positions.len() {
            feed.cancel();
            return Err(SpaceError::Unreachable {
                node: String::new(),
                reason: "no shard's leader could be reached to subscribe".into(),
            });
        }
        if resumed && !anew.is_empty() {
            tracing::info!(subscription = id, shards = ?anew, "shards had let go of a resumed subscription: registered anew");
            state.announce_missed();
        }
        if state.polled.load(Ordering::Acquire) {
            for node in self.topology().nodes {
                self.runtime().handle().spawn(poll_from(
                    Arc::downgrade(self),
                    Arc::downgrade(&state),
                    node.address,
                ));
            }
        }
        if renewed {
            self.runtime().handle().spawn(keep_alive(
                Arc::downgrade(self),
                Arc::downgrade(&state),
                endpoint,
                self.config().subscription_lease,
            ));
        } else if let Lease::For(lease) = lease {
            self.runtime()
                .handle()
                .spawn(end_after(Arc::downgrade(&state), lease));
        }
        Ok(Subscription::remote(query, Box::new(feed)))
    }
}

/// How long one poll of a shard leader waits for an event.
const POLL_WAIT: Duration = Duration::from_secs(10);

/// Fetches a polled subscription's events from the node at `addr`, for the shards it
/// leads (as the topology says; looked up again for every poll), until the subscription
/// ends, is cancelled or detached. A shard the node says does not hold it any more is
/// registered again (a `Missed` notice first); one whose leader moved is polled on its
/// new leader once the topology says so.
async fn poll_from(cluster: Weak<Cluster>, state: Weak<ShardState>, addr: String) {
    let mut pause = Duration::from_millis(50);
    loop {
        let (Some(c), Some(s)) = (cluster.upgrade(), state.upgrade()) else {
            return;
        };
        if !s.alive() {
            return;
        }
        let active: BTreeSet<u32> = {
            let unreached = s.unreached.lock();
            (0..s.parts.len() as u32)
                .filter(|sh| !unreached.contains(sh))
                .filter(|sh| !s.parts[*sh as usize].ended.load(Ordering::Acquire))
                .collect()
        };
        let mine = leaders_of(&c.topology(), &active)
            .remove(&addr)
            .unwrap_or_default();
        if mine.is_empty() {
            drop((c, s));
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let request = Request::PollShards {
            id: s.id,
            entry_type: s.spec.query.entry_type().to_owned(),
            positions: s.positions(&mine),
            wait: POLL_WAIT,
        };
        let answer = match c.node(&addr).await {
            Ok(conn) => conn.call(request).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Response::ShardNotifications {
                led,
                missing,
                told,
                ended,
            }) => {
                pause = Duration::from_millis(50);
                for (shard, notifications) in told {
                    if !pass_shard(&s, shard, notifications).await {
                        return;
                    }
                }
                for shard in ended {
                    s.shard_ended(shard);
                }
                if !missing.is_empty() {
                    tracing::info!(subscription = s.id, shards = ?missing, "shards lost a subscription; registering it again");
                    s.unreached.lock().extend(&missing);
                    s.announce_missed();
                }
                if mine.iter().any(|sh| !led.contains(sh)) {
                    let _ = c.refresh().await;
                }
            }
            Ok(other) => {
                tracing::warn!(node = %addr, answer = ?other, "a poll got an unexpected answer");
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                tracing::debug!(node = %addr, error = %e, "a poll failed; polling again");
                drop(s);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                if worth_again(&e) {
                    let _ = c.refresh().await;
                }
            }
        }
    }
}

/// Ends a subscription with a lease by itself a little after the lease, if its shards
/// did not all tell its end (a shard whose leader cannot reach the endpoint cannot).
async fn end_after(state: Weak<ShardState>, lease: Duration) {
    tokio::time::sleep(lease.saturating_add(crate::subscriber::END_GRACE)).await;
    if let Some(state) = state.upgrade() {
        state.tx.lock().take();
    }
}

/// Keeps a subscription without a lease of its own alive while its handle lives: renews
/// it on every shard every quarter to third of `lease` (drawn once), through the logs,
/// and registers it again on the shards that lost it or were not reached (sooner while
/// some are missing).
async fn keep_alive(
    cluster: Weak<Cluster>,
    state: Weak<ShardState>,
    endpoint: Arc<Endpoint>,
    lease: Duration,
) {
    let regular = lease / 4 + (lease / 12).mul_f64(crate::subscriber::random_fraction());
    let mut soon = REGISTER_SOON;
    let mut renewed_at = Instant::now();
    loop {
        let missing = state
            .upgrade()
            .is_some_and(|s| !s.unreached.lock().is_empty());
        let pause = if missing {
            soon.min(regular.saturating_sub(renewed_at.elapsed()))
        } else {
            regular.saturating_sub(renewed_at.elapsed())
        };
        tokio::time::sleep(pause).await;
        let (Some(cluster), Some(state)) = (cluster.upgrade(), state.upgrade()) else {
            return;
        };
        if !state.alive() {
            return;
        }
        if renewed_at.elapsed() >= regular {
            renewed_at = Instant::now();
            renew(&cluster, &state, Lease::For(lease), regular).await;
        }
        let missing = state.unreached.lock().clone();
        if missing.is_empty() {
            soon = REGISTER_SOON;
        } else {
            if let Err(e) = register(&cluster, &state, &endpoint, missing, regular).await {
                tracing::warn!(subscription = state.id, error = %e, "could not register a subscription on every shard");
            }
            soon = (soon * 2).min(regular);
        }
    }
}

/// Renews `state` for `lease` on every shard it is registered on; a shard that lost it
/// is noted as unreached (registered again next), and the subscriber told it may have
/// missed events.
async fn renew(cluster: &Cluster, state: &ShardState, lease: Lease, patience: Duration) {
    let registered: BTreeSet<u32> = {
        let unreached = state.unreached.lock();
        (0..state.parts.len() as u32)
            .filter(|s| !unreached.contains(s))
            .collect()
    };
    let entry_type = state.spec.query.entry_type().to_owned();
    let answered = to_leaders(cluster, registered, patience, |shards| {
        Request::RenewShards {
            id: state.id,
            entry_type: entry_type.clone(),
            lease,
            shards,
        }
    })
    .await;
    match answered {
        Ok(answered) => {
            if !answered.missing.is_empty() {
                tracing::info!(subscription = state.id, shards = ?answered.missing, "shards lost a subscription; registering it again");
                state.unreached.lock().extend(&answered.missing);
                state.announce_missed();
            }
            if !answered.unanswered.is_empty() {
                tracing::warn!(subscription = state.id, shards = ?answered.unanswered, "could not renew a subscription on every shard");
            }
        }
        Err(e) => {
            tracing::warn!(subscription = state.id, error = %e, "could not renew a subscription")
        }
    }
}

/// A subscription of a replicated cluster, from its handle's side.
struct ShardFeed {
    receiving: Receiving,
    state: Arc<ShardState>,
    cluster: Weak<Cluster>,
    endpoint: Arc<Endpoint>,
    runtime: crate::connection::Runtime,
}

impl RemoteFeed for ShardFeed {
    fn id(&self) -> u64 {
        self.state.id
    }

    fn parts(&self) -> (EventKinds, Vec<PartPosition>) {
        let position = |(shard, p): (usize, &ShardPart)| PartPosition {
            node: NodeId(0),
            id: self.state.id,
            last_seq: p.handed.load(Ordering::Acquire),
            shard: Some(shard as u32),
        };
        let parts = self.state.parts.iter().enumerate().map(position).collect();
        (self.state.spec.kinds, parts)
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        self.receiving.recv_until(deadline)
    }

    fn try_recv(&self) -> Option<Notification> {
        self.receiving.try_recv()
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.receiving.poll_recv(cx)
    }

    fn dropped(&self) -> u64 {
        self.receiving.dropped()
    }

    fn is_closed(&self) -> bool {
        self.receiving.is_closed(&self.state.cancelled)
    }

    fn unreached(&self) -> Vec<String> {
        // Named by their leaders, as the topology has them.
        let unreached = self.state.unreached.lock().clone();
        let Some(cluster) = self.cluster.upgrade() else {
            return unreached.iter().map(|s| format!("shard {s}")).collect();
        };
        leaders_of(&cluster.topology(), &unreached)
            .into_keys()
            .collect()
    }

    fn renew(&self, lease: Lease) -> Result<()> {
        let Some(cluster) = self.cluster.upgrade() else {
            return Err(SpaceError::SubscriptionClosed { id: self.state.id });
        };
        let state = self.state.clone();
        let patience = cluster.config().retry_for;
        let call = self.runtime.bind(async move {
            let answered = {
                let all = (0..state.parts.len() as u32).collect();
                let entry_type = state.spec.query.entry_type().to_owned();
                to_leaders(&cluster, all, patience, |shards| Request::RenewShards {
                    id: state.id,
                    entry_type: entry_type.clone(),
                    lease,
                    shards,
                })
                .await?
            };
            match answered.unanswered.first().or(answered.missing.first()) {
                None => Ok(()),
                Some(shard) => Err(SpaceError::Unavailable {
                    reason: format!("shard {shard} could not renew the subscription"),
                }),
            }
        });
        futures::executor::block_on(call)
    }

    fn cancel(&self) {
        if self.state.cancelled.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.tx.lock().take();
        self.receiving.discard();
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        let state = self.state.clone();
        let patience = cluster.config().retry_for;
        drop(self.runtime.handle().spawn(async move {
            let all = (0..state.parts.len() as u32).collect();
            let entry_type = state.spec.query.entry_type().to_owned();
            let _ = to_leaders(&cluster, all, patience, |shards| Request::CancelShards {
                id: state.id,
                entry_type: entry_type.clone(),
                shards,
            })
            .await;
        }));
    }

    fn detach(&self) {
        // Not renewed from here on: each shard keeps it for its lease at most, and the
        // endpoint wants their pushes as long (and drops them: a resume gets them
        // again from the shards' leaders), then forgets it.
        self.state.detached.store(true, Ordering::Release);
        self.state.tx.lock().take();
        let until = match self.state.spec.lease {
            Lease::For(lease) => Instant::now().checked_add(lease),
            Lease::Forever => None,
        };
        let mut held = self.endpoint.shard_feeds.lock();
        let now = Instant::now();
        held.retain(|_, h| !matches!(h, Held::Detached { until: Some(t) } if *t <= now));
        held.insert(self.state.id, Held::Detached { until });
    }
}

impl Drop for ShardFeed {
    fn drop(&mut self) {
        if self.state.detached.load(Ordering::Acquire) {
            return;
        }
        let mut held = self.endpoint.shard_feeds.lock();
        if matches!(held.get(&self.state.id), Some(Held::Attached(w)) if std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(&self.state)))
        {
            held.remove(&self.state.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriber::Delivered;

    /// A subscription's state over `shards` shards, nothing had from any yet.
    fn state_of(shards: u32, renewed: bool) -> (Arc<ShardState>, flume::Receiver<Delivered>) {
        let (tx, rx) = feed_channel();
        let spec = Spec {
            query: space_core::Query::for_type("job"),
            kinds: EventKinds::WRITTEN,
            lease: Lease::For(Duration::from_secs(30)),
        };
        let positions = vec![0; shards as usize];
        let state = ShardState::new(new_logged_id(), spec, (&positions, false), tx, renewed);
        (Arc::new(state), rx)
    }

    /// A shard that ends a subscription made with a lease ends its part: the stream ends
    /// once every shard did. One that ends a subscription kept alive by renewals lost it
    /// (no renewal reached it in time): the subscriber is told it may have missed events,
    /// and the shard is registered again, the stream going on.
    #[tokio::test]
    async fn a_shard_that_ends_a_renewed_subscription_lost_it() {
        let (leased, rx) = state_of(2, false);
        leased.shard_ended(0);
        assert!(leased.alive(), "one shard of two ended");
        leased.shard_ended(1);
        assert!(!leased.alive());
        assert!(rx.is_disconnected() && rx.is_empty());

        let (renewed, rx) = state_of(2, true);
        renewed.shard_ended(1);
        assert!(renewed.alive());
        assert_eq!(*renewed.unreached.lock(), BTreeSet::from([1]));
        let told = rx.try_recv().map(|d| d.notification);
        assert_eq!(told.ok(), Some(Notification::Missed { seq: 0 }));
    }
}
