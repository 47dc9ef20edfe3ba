//! Notify on the client: the endpoint nodes push events to, and subscriptions merged over
//! the nodes of a cluster.
//!
//! A client serves one endpoint ([`SubscriberService`]) for all its subscriptions. It makes
//! up a secret when it starts, hands it only to the nodes it subscribes with, and accepts a
//! connection only from a peer that presents it (compared in constant time), so nobody else
//! can push events to it. Each node keeps one connection to the endpoint for all of them.
//!
//! A subscription is registered on every member of the cluster (a *part* per node); the
//! parts push into one channel, so the user sees one stream in which every event carries
//! its node and that node's sequence number. A subscription asked for without a lease is
//! kept alive by renewing every part's lease; a member that could not be reached when it
//! subscribed, or that lost its part (a restart, or it gave up on an unreachable endpoint),
//! gets the subscription registered again on the next renewal (hurried while a node's
//! push connection has just ended, see [`keep_alive`]; a polled part a poll finds lost is
//! cancelled there and a gap told at once), and until then
//! [`Subscription::unreached`](space_core::Subscription::unreached) names it. A
//! subscription with a lease ends when the lease does: each node delivers what it matched
//! and then tells the endpoint it ended; once every part ended, the stream ends. A
//! detached subscription is no longer renewed: its nodes keep it (and queue its events for
//! whoever resumes it) for its lease at most, and the endpoint answers their pushes for it
//! for as long, then forgets it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use space_core::remote::RemoteFeed;
use space_core::wire::{self, Hello, Request, Response, SubscriberService, Welcome};
use space_core::{
    EventKinds, Lease, NodeId, Notification, PartPosition, Query, Result, SpaceError,
};
use subtle::ConstantTimeEq;
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};

use crate::connection::{ClientConfig, Connection, Delivery, Runtime};

/// Notifications buffered per subscription on the client before deliveries wait.
const FEED_CAPACITY: usize = 65_536;

/// How long a subscription with a lease waits, past the lease, for its nodes to say it
/// ended before it ends by itself (a node that cannot be reached cannot say so).
pub(crate) const END_GRACE: Duration = Duration::from_secs(10);

/// A notification on its way to the subscriber, with the count of what its registration
/// handed out (none for a gap the client announces itself).
pub(crate) struct Delivered {
    pub(crate) handed: Option<Arc<AtomicU64>>,
    pub(crate) notification: Notification,
}

/// The channel a subscription's parts push into.
pub(crate) type FeedSender = flume::Sender<Delivered>;

/// A new channel for a subscription's parts and its receiving side.
pub(crate) fn feed_channel() -> (FeedSender, flume::Receiver<Delivered>) {
    flume::bounded(FEED_CAPACITY)
}

/// A subscription's registration on one node.
pub(crate) struct Part {
    node: NodeId,
    id: u64,
    conn: Arc<Connection>,
    tx: Mutex<Option<FeedSender>>,
    /// The last sequence number received from this node: deliveries at or below it are
    /// repeats (after a retried delivery).
    last_seq: AtomicU64,
    /// Resumed on its node, which has yet to deliver again from after `last_seq`: pushes
    /// that run ahead of that were sent before the node took the resume up, and come
    /// again after its rewind (see [`Subscriber::deliver`]).
    awaits_rewind: AtomicBool,
    /// The last sequence number of this registration handed to the subscriber (what a
    /// resume picks up after; a registration made anew counts from 0 again, as the node
    /// numbers its events from 1 again).
    handed: Arc<AtomicU64>,
    /// Once its subscription is detached: when the node lets go of it (its lease there
    /// runs out), so that the endpoint may forget it too; `None` while attached, or
    /// when the node keeps it for ever.
    forget_after: Mutex<Option<Instant>>,
}

impl Part {
    /// Whether the node has let go of this detached registration by `now`.
    fn forgotten(&self, now: Instant) -> bool {
        self.forget_after.lock().is_some_and(|t| t <= now)
    }
}

/// Passes a numbered stream's `notifications` (one node's, or one shard's) on to `tx`,
/// in order: those at or below `last_seq` (the last number passed on) are repeats and
/// are dropped, a gap is cut to what was not passed on yet, and numbers skipped are told
/// as a gap rather than passed over in silence. `awaits_rewind`, while set, holds back
/// what runs ahead (see [`Part::awaits_rewind`]). `handed` counts what the subscriber
/// was handed from this stream. Returns false when the subscription's stream is gone.
pub(crate) async fn pass_in_order(
    last_seq: &AtomicU64,
    awaits_rewind: Option<&AtomicBool>,
    handed: &Arc<AtomicU64>,
    tx: &FeedSender,
    notifications: Vec<Notification>,
) -> bool {
    let pass = |notification| {
        tx.send_async(Delivered {
            handed: Some(handed.clone()),
            notification,
        })
    };
    for n in notifications {
        let (first, last) = seq_range(&n);
        let had = last_seq.load(Ordering::Acquire);
        if last <= had {
            continue; // a repeat
        }
        let skips = first > had + 1;
        if skips && awaits_rewind.is_some_and(|a| a.load(Ordering::Acquire)) {
            // Sent before the node took the resume up (a detached registration of this
            // endpoint answered for what lies between): delivered again after the node's
            // rewind. Taken now, it would make that rewind look like repeats.
            continue;
        }
        let n = match n {
            // A gap covers exactly what was not passed on up to its end.
            Notification::Gap { last_seq, .. } => Notification::Gap {
                first_seq: had + 1,
                last_seq,
            },
            n if skips => {
                // Numbers skipped are told as a gap rather than passed over in silence.
                let skipped = Notification::Gap {
                    first_seq: had + 1,
                    last_seq: first - 1,
                };
                if pass(skipped).await.is_err() {
                    return false;
                }
                n
            }
            n => n,
        };
        if let Some(a) = awaits_rewind {
            a.store(false, Ordering::Release);
        }
        last_seq.store(last, Ordering::Release);
        if pass(n).await.is_err() {
            return false;
        }
    }
    true
}

/// How a registration's events reach the endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Attach {
    /// Fetched by the client (nothing pushes to it).
    Polled,
    /// Pushed from its first event on.
    Pushed,
    /// Pushed, resumed after the `last_seq` it is attached with: the node delivers again
    /// from there once it takes the resume up.
    Resumed,
}

/// What registers a subscription on a node.
#[derive(Clone)]
pub(crate) struct Spec {
    pub(crate) query: Query,
    pub(crate) kinds: EventKinds,
    /// The lease each node gives it.
    pub(crate) lease: Lease,
}

/// The lease the nodes give a subscription asked for with `lease`, and whether the client
/// renews it while its handle lives (one asked for without a lease: the nodes give it
/// `config`'s subscription lease, so that a client that dies stops costing them).
pub(crate) fn lease_given(lease: Lease, config: &ClientConfig) -> (Lease, bool) {
    match lease {
        Lease::Forever => (Lease::For(config.subscription_lease), true),
        finite => (finite, false),
    }
}

/// The state of one subscription across the nodes.
pub(crate) struct FeedState {
    spec: Spec,
    /// The lease the nodes hold the subscription for since it was last given or renewed.
    lease: Mutex<Lease>,
    parts: Mutex<Vec<Arc<Part>>>,
    /// Members without a part (could not be reached, or lost it).
    unreached: Mutex<Vec<String>>,
    /// Hands new parts their sender; dropped when no part may be added any more, so that
    /// the stream ends once the parts' senders are gone too.
    spare: Mutex<Option<FeedSender>>,
    closed: AtomicBool,
    detached: AtomicBool,
}

/// How long one poll of a polled subscription waits for an event.
const POLL_WAIT: Duration = Duration::from_secs(10);

/// A subscription of a replicated cluster, numbered per shard, as the endpoint passes its
/// shards' pushes to it (`shard_feed`).
pub(crate) trait ShardSink: Send + Sync {
    /// Passes `shard`'s notifications on, in order. Returns false when the stream is gone.
    fn pass(&self, shard: u32, notifications: Vec<Notification>) -> BoxFuture<'_, bool>;
    /// `shard` ended the subscription (its lease ran out there).
    fn ended(&self, shard: u32);
}

/// A subscription of a replicated cluster, as the endpoint holds it.
pub(crate) enum Held {
    /// Its handle lives: what its shards push goes to its stream.
    Attached(Weak<dyn ShardSink>),
    /// Detached: its shards keep it (and what they tell it, for whoever resumes it)
    /// until `until` (`None`: until cancelled); their pushes are wanted, and dropped.
    Detached { until: Option<Instant> },
}

/// The endpoint nodes push events to.
pub(crate) struct Endpoint {
    /// Its address and secret, as handed to nodes.
    pub(crate) advertised: wire::Endpoint,
    /// The pushed registrations, by node and subscription id: attached, or detached until
    /// the node lets go of them (a push for one is then kept by the node for a resume).
    /// Polled ones are not here: nothing pushes to them.
    feeds: Mutex<HashMap<(NodeId, u64), Arc<Part>>>,
    delivery: Delivery,
    /// A node could not reach the endpoint (with `Delivery::Auto`): later subscriptions
    /// are polled at once.
    push_refused: AtomicBool,
    /// Counts the nodes' push connections that ended, by node (a node that died or
    /// restarted drops its own): the renewals look at that node's parts at once then
    /// (`keep_alive`).
    pushes_ended: tokio::sync::watch::Sender<PushesEnded>,
    /// The subscriptions of a replicated cluster pushed here, by id: those with a handle,
    /// and the detached ones (until their shards let go of them).
    pub(crate) shard_feeds: Mutex<HashMap<u64, Held>>,
}

impl Endpoint {
    /// Serves the endpoint on `config.subscriber_bind`.
    pub(crate) async fn start(config: &ClientConfig) -> Result<Arc<Endpoint>> {
        let listener = TcpListener::bind(config.subscriber_bind)
            .await
            .map_err(|e| SpaceError::Protocol {
                reason: format!(
                    "cannot serve the subscriber endpoint on {}: {e}",
                    config.subscriber_bind
                ),
            })?;
        let bound = listener.local_addr().map_err(|e| SpaceError::Protocol {
            reason: e.to_string(),
        })?;
        let endpoint = Arc::new(Endpoint {
            advertised: wire::Endpoint {
                addr: config.subscriber_advertise.unwrap_or(bound),
                secret: uuid::Uuid::new_v4().as_u128(),
            },
            feeds: Mutex::new(HashMap::new()),
            delivery: config.delivery,
            push_refused: AtomicBool::new(false),
            pushes_ended: tokio::sync::watch::Sender::new(PushesEnded::default()),
            shard_feeds: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&endpoint);
        let max_frame = config.max_frame;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some(endpoint) = weak.upgrade() else {
                    return;
                };
                tokio::spawn(serve_subscriber(endpoint, stream, max_frame));
            }
        });
        Ok(endpoint)
    }

    /// Registers subscription `id` of the node behind `conn`, its events (after
    /// `last_seq`) going to `tx`; a pushed one is looked up by the pushes (and detached
    /// registrations the nodes let go of are forgotten).
    fn attach(
        &self,
        conn: Arc<Connection>,
        id: u64,
        tx: FeedSender,
        last_seq: u64,
        how: Attach,
    ) -> Arc<Part> {
        let part = Arc::new(Part {
            node: conn.node(),
            id,
            conn,
            tx: Mutex::new(Some(tx)),
            last_seq: AtomicU64::new(last_seq),
            awaits_rewind: AtomicBool::new(how == Attach::Resumed),
            handed: Arc::new(AtomicU64::new(last_seq)),
            forget_after: Mutex::new(None),
        });
        if how != Attach::Polled {
            let now = Instant::now();
            let mut feeds = self.feeds.lock();
            feeds.retain(|_, p| !p.forgotten(now));
            feeds.insert((part.node, id), part.clone());
        }
        part
    }

    /// Notes that a node could not reach the endpoint: with `Delivery::Auto`, later
    /// subscriptions are polled at once. Returns whether a subscription that was refused
    /// for it is to be polled instead.
    pub(crate) fn refuse_push(&self) -> bool {
        let auto = self.delivery == Delivery::Auto;
        if auto {
            self.push_refused.store(true, Ordering::Release);
        }
        auto
    }

    /// Passes a push of `shard`'s events for subscription `id` of a replicated cluster on
    /// to its stream. Returns false when the subscription is no longer wanted here (the
    /// shard's leader then ends it there).
    async fn deliver_shard(&self, shard: u32, id: u64, notifications: Vec<Notification>) -> bool {
        let sink = match self.shard_feeds.lock().get(&id) {
            Some(Held::Attached(sink)) => sink.upgrade(),
            Some(Held::Detached { until }) => return until.is_none_or(|t| Instant::now() < t),
            None => None,
        };
        match sink {
            Some(sink) => sink.pass(shard, notifications).await,
            None => false,
        }
    }

    /// Whether new subscriptions are polled rather than pushed.
    pub(crate) fn polls(&self) -> bool {
        match self.delivery {
            Delivery::Poll => true,
            Delivery::Push => false,
            _ => self.push_refused.load(Ordering::Acquire),
        }
    }

    /// Tells of every push connection that ends from now on.
    pub(crate) fn push_ends(&self) -> PushEnds {
        PushEnds::watching(&self.pushes_ended)
    }

    /// Whether a push for subscription `id` of `node` that cannot be passed on is still
    /// wanted: yes while its part is registered, detached (the node keeps its events in
    /// its log for a resume, which delivers them again); no once it was cancelled or
    /// forgotten (the node may drop the subscription).
    fn still_held(&self, node: NodeId, id: u64) -> bool {
        self.feeds.lock().contains_key(&(node, id))
    }

    /// Forgets a part: its pushes are no longer wanted.
    fn detach(&self, part: &Part) {
        part.tx.lock().take();
        self.feeds.lock().remove(&(part.node, part.id));
    }

    /// The registration of a subscription; waits briefly for one being registered (its
    /// first events can arrive before the answer to Subscribe does).
    async fn part(&self, node: NodeId, id: u64) -> Option<Arc<Part>> {
        for _ in 0..100 {
            if let Some(p) = self.feeds.lock().get(&(node, id)) {
                return (!p.forgotten(Instant::now())).then(|| p.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

async fn serve_subscriber(endpoint: Arc<Endpoint>, stream: TcpStream, max_frame: usize) {
    let _ = stream.set_nodelay(true);
    let mut framed = wire::framed(stream, max_frame);
    let hello = match tokio::time::timeout(
        Duration::from_secs(5),
        wire::recv_frame::<_, Hello>(&mut framed),
    )
    .await
    {
        Ok(Ok(Some(h))) => h,
        _ => return,
    };
    let expected = endpoint.advertised.token();
    let token_ok = hello
        .token
        .as_deref()
        .is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())));
    let welcome = if hello.magic != wire::MAGIC || hello.version != wire::PROTOCOL_VERSION {
        Welcome::Refused {
            reason: "not a space node of this protocol".into(),
        }
    } else if !token_ok {
        Welcome::Refused {
            reason: "wrong or missing subscriber secret".into(),
        }
    } else {
        Welcome::Accepted {
            node: NodeId(0),
            limits: wire::Limits {
                max_frame: max_frame as u64,
                max_entry_bytes: max_frame as u64,
            },
        }
    };
    let accepted = matches!(welcome, Welcome::Accepted { .. });
    if wire::send_frame(&mut framed, &welcome).await.is_err() || !accepted {
        return;
    }
    BaseChannel::with_defaults(wire::server_transport(framed))
        .execute(Subscriber(endpoint.clone()).serve())
        .for_each(|response| async move {
            tokio::spawn(response);
        })
        .await;
    endpoint
        .pushes_ended
        .send_modify(|ended| *ended.0.entry(hello.pusher).or_default() += 1);
}

pub(crate) fn seq_range(n: &Notification) -> (u64, u64) {
    match n {
        Notification::Event(e) => (e.seq, e.seq),
        Notification::Gap {
            first_seq,
            last_seq,
        } => (*first_seq, *last_seq),
        Notification::Missed { seq } => (*seq, *seq),
    }
}

#[derive(Clone)]
struct Subscriber(Arc<Endpoint>);

impl SubscriberService for Subscriber {
    async fn deliver(
        self,
        _: context::Context,
        node: NodeId,
        shard: Option<u32>,
        subscription: u64,
        notifications: Vec<Notification>,
    ) -> bool {
        if let Some(shard) = shard {
            return self
                .0
                .deliver_shard(shard, subscription, notifications)
                .await;
        }
        let Some(part) = self.0.part(node, subscription).await else {
            return false;
        };
        let Some(tx) = part.tx.lock().clone() else {
            return self.0.still_held(node, subscription);
        };
        let passed = pass_in_order(
            &part.last_seq,
            Some(&part.awaits_rewind),
            &part.handed,
            &tx,
            notifications,
        )
        .await;
        // The stream went away under this push: detached (its handle dropped) or
        // cancelled.
        passed || self.0.still_held(node, subscription)
    }

    async fn end(self, _: context::Context, node: NodeId, shard: Option<u32>, subscription: u64) {
        if let Some(shard) = shard {
            if let Some(Held::Attached(sink)) = self.0.shard_feeds.lock().get(&subscription)
                && let Some(sink) = sink.upgrade()
            {
                sink.ended(shard);
            }
            return;
        }
        let part = self.0.feeds.lock().get(&(node, subscription)).cloned();
        if let Some(part) = part {
            self.0.detach(&part);
        }
    }
}

/// Tells the subscriber of the stream `tx` feeds (if it still does) that it may have
/// missed events of unknown numbers: at once, or, when the stream is full (the subscriber
/// is behind), once it has room, without holding up the caller.
pub(crate) fn announce_missed(tx: Option<FeedSender>) {
    let Some(tx) = tx else {
        return;
    };
    let missed = Delivered {
        handed: None,
        notification: Notification::Missed { seq: 0 },
    };
    if let Err(flume::TrySendError::Full(missed)) = tx.try_send(missed) {
        tokio::spawn(async move {
            let _ = tx.send_async(missed).await;
        });
    }
}

impl FeedState {
    /// Tells the subscriber that it may have missed events (of unknown numbers): at once,
    /// or, when the stream is full (the subscriber is behind), once it has room, without
    /// holding up the caller.
    pub(crate) fn announce_missed(&self) {
        announce_missed(self.spare.lock().clone());
    }

    pub(crate) fn new(spec: Spec, spare: Option<FeedSender>) -> Arc<FeedState> {
        Arc::new(FeedState {
            lease: Mutex::new(spec.lease),
            spec,
            parts: Mutex::new(Vec::new()),
            unreached: Mutex::new(Vec::new()),
            spare: Mutex::new(spare),
            closed: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        })
    }

    /// Registers the subscription on the node behind `conn` (its pushes after `last_seq`
    /// join the stream; `resume` picks up subscription `id` there instead of registering).
    pub(crate) async fn register(
        self: &Arc<Self>,
        endpoint: &Arc<Endpoint>,
        conn: Arc<Connection>,
        resume: Option<(u64, u64)>,
    ) -> Result<()> {
        let Some(tx) = self.spare.lock().clone() else {
            return Err(SpaceError::SubscriptionClosed { id: 0 });
        };
        let mut polled = endpoint.polls();
        // A polled subscription picks up where it was by polling after `last_seq`, once a
        // renewal of its lease shows the node still has it (one it lost is found now, not
        // at the next poll).
        let resume_polled = |id: u64, last_seq: u64, tx: FeedSender| {
            let (conn, lease) = (conn.clone(), self.spec.lease);
            async move {
                conn.call(Request::RenewSubscription { id, lease }).await?;
                Ok::<_, SpaceError>(endpoint.attach(conn, id, tx, last_seq, Attach::Polled))
            }
        };
        let part = match resume {
            Some((id, last_seq)) if polled => resume_polled(id, last_seq, tx).await?,
            Some((id, last_seq)) => {
                // In place before the node re-delivers: a part this endpoint held
                // detached would otherwise take the re-delivery and drop it.
                let part = endpoint.attach(conn.clone(), id, tx.clone(), last_seq, Attach::Resumed);
                let resumed = conn
                    .call(Request::Resume {
                        id,
                        last_seq,
                        endpoint: endpoint.advertised,
                    })
                    .await;
                match resumed {
                    Ok(_) => part,
                    // Made by a client that polled: it is polled from here too. (A
                    // subscription the node pushes is not polled, and a poll of it finds
                    // it lost, see `poll`.)
                    Err(SpaceError::Protocol { reason }) => {
                        tracing::debug!(subscription = id, node = %conn.addr(), %reason, "resuming a polled subscription by polling it");
                        endpoint.detach(&part);
                        polled = true;
                        resume_polled(id, last_seq, tx).await?
                    }
                    Err(e) => {
                        endpoint.detach(&part);
                        return Err(e);
                    }
                }
            }
            None => {
                let subscribe = |endpoint| Request::Subscribe {
                    query: self.spec.query.clone(),
                    kinds: self.spec.kinds,
                    lease: self.spec.lease,
                    endpoint,
                };
                let pushed = if polled {
                    None
                } else {
                    Some(endpoint.advertised)
                };
                let answer = match conn.call(subscribe(pushed)).await {
                    Err(SpaceError::EndpointUnreachable {
                        endpoint: addr,
                        reason,
                    }) if endpoint.delivery == Delivery::Auto => {
                        tracing::info!(node = %conn.addr(), endpoint = %addr, %reason, "the node cannot reach this client's subscriber endpoint: its events come over the client's connection from now on");
                        endpoint.push_refused.store(true, Ordering::Release);
                        polled = true;
                        conn.call(subscribe(None)).await?
                    }
                    answer => answer?,
                };
                match answer {
                    Response::Subscribed(id) => {
                        let how = if polled {
                            Attach::Polled
                        } else {
                            Attach::Pushed
                        };
                        endpoint.attach(conn.clone(), id, tx, 0, how)
                    }
                    other => {
                        return Err(SpaceError::Protocol {
                            reason: format!("unexpected answer {other:?}"),
                        });
                    }
                }
            }
        };
        if polled {
            tokio::spawn(poll(part.clone(), Arc::downgrade(self), endpoint.clone()));
        }
        self.parts.lock().push(part);
        self.unreached.lock().retain(|a| a != conn.addr());
        Ok(())
    }

    /// Notes a member that has no part.
    pub(crate) fn unreached(&self, addr: &str) {
        let mut unreached = self.unreached.lock();
        if !unreached.iter().any(|a| a == addr) {
            unreached.push(addr.to_owned());
        }
    }

    /// No part will be added any more: the stream ends once the parts end.
    pub(crate) fn seal(&self) {
        self.spare.lock().take();
    }

    /// A node no longer has `part` (it restarted, its lease there ran out, or it never
    /// was the kind of subscription it was taken for): it is forgotten, and cancelled on
    /// the node in case it still runs there; the subscriber is told it may have missed
    /// events; the member is registered anew at the next renewal.
    fn lost(&self, part: &Arc<Part>, endpoint: &Endpoint) {
        let had = {
            let mut parts = self.parts.lock();
            let before = parts.len();
            parts.retain(|p| !Arc::ptr_eq(p, part));
            parts.len() < before
        };
        if !had {
            return; // cancelled, detached or lost already
        }
        tracing::info!(subscription = part.id, node = %part.node, "a node lost a subscription; registering it again");
        endpoint.detach(part);
        self.unreached(part.conn.addr());
        let (conn, id) = (part.conn.clone(), part.id);
        tokio::spawn(async move {
            let _ = conn.call(Request::CancelSubscription(id)).await;
        });
        // What that node matched meanwhile (a restarted node of a replicated cluster may
        // lead shards again before it has the subscription back) is unknown: the
        // subscriber is told so.
        self.announce_missed();
    }

    fn alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.detached.load(Ordering::Acquire)
    }
}

/// Fetches a polled part's events over its connection until it ends, is detached or
/// cancelled, or its node lost it (then it is registered again, after a gap).
async fn poll(part: Arc<Part>, state: Weak<FeedState>, endpoint: Arc<Endpoint>) {
    let mut pause = Duration::from_millis(50);
    loop {
        if part.tx.lock().is_none() {
            return;
        }
        let request = Request::Poll {
            id: part.id,
            after: part.last_seq.load(Ordering::Acquire),
            wait: POLL_WAIT,
        };
        match part.conn.call(request).await {
            Ok(Response::Notifications {
                notifications,
                ended,
            }) => {
                pause = Duration::from_millis(50);
                let Some(tx) = part.tx.lock().clone() else {
                    return;
                };
                for n in notifications {
                    let (_, last) = seq_range(&n);
                    if last <= part.last_seq.load(Ordering::Acquire) {
                        continue; // sent again after a lost answer
                    }
                    part.last_seq.store(last, Ordering::Release);
                    let delivered = Delivered {
                        handed: Some(part.handed.clone()),
                        notification: n,
                    };
                    if tx.send_async(delivered).await.is_err() {
                        return;
                    }
                }
                if ended {
                    part.tx.lock().take();
                    return;
                }
            }
            Err(SpaceError::SubscriptionClosed { .. }) => {
                if let Some(state) = state.upgrade() {
                    state.lost(&part, &endpoint);
                }
                return;
            }
            other => {
                tracing::debug!(subscription = part.id, node = %part.node, answer = ?other.err(), "a poll failed; polling again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Cancels parts on their nodes, in the background (their leases end them anyway).
fn cancel_parts(parts: Vec<Arc<Part>>, endpoint: &Endpoint, runtime: &Runtime) {
    for part in parts {
        endpoint.detach(&part);
        let (conn, id) = (part.conn.clone(), part.id);
        drop(runtime.handle().spawn(async move {
            let _ = conn.call(Request::CancelSubscription(id)).await;
        }));
    }
}

/// The first pause between renewals after a node's push connection ended; it doubles
/// while a member still cannot be reached or has no part, up to the regular pause.
const RENEW_SOON: Duration = Duration::from_millis(250);

/// Keeps a subscription without a lease alive while its handle lives: renews every part
/// every quarter to third of the lease (drawn once per subscription, so that subscriptions
/// hurried together, see below, do not renew in step from then on), and registers it
/// again on members that lost their part or could not be reached (`members` lists the
/// cluster's members and connects to one). When a node's push connection to the endpoint
/// ends (a node that died or restarted), that node's parts are renewed at once (every
/// part, when the node did not name itself), then again after [`RENEW_SOON`], doubling,
/// for as long as a member cannot be reached or has no part: a node that restarted (and
/// lost its parts) has the subscription back within moments of its return, not at the
/// next regular renewal. Those later rounds renew only the parts the round before could
/// not, except that every part is renewed once a regular pause has passed since they all
/// last were: the live nodes' parts do not run out while a node stays down. `ended` is
/// [`Endpoint::push_ends`], taken before the parts were registered: a connection that
/// ends before this task first runs hurries it all the same.
pub(crate) async fn keep_alive<M, F>(
    state: Weak<FeedState>,
    endpoint: Arc<Endpoint>,
    (lease, mut ended): (Duration, PushEnds),
    members: M,
) where
    M: Fn() -> F,
    F: Future<Output = Vec<(String, Result<Arc<Connection>>)>>,
{
    let regular = lease / 4 + (lease / 12).mul_f64(random_fraction());
    // While hurried: the pause before the next round should this one fall short, and the
    // nodes whose parts the next round renews: those whose push connection ended, then
    // those the last round could not renew (`None`: every part).
    let mut hurried: Option<(Duration, Option<Vec<NodeId>>)> = None;
    // When a round last renewed every part.
    let mut all_renewed = Instant::now();
    let mut next = regular;
    loop {
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            nodes = ended.next() => {
                // Nodes still to be renewed stay in the round.
                let nodes = match hurried.take() {
                    None => nodes,
                    Some((_, None)) => None,
                    Some((_, Some(mut pending))) => nodes.map(|n| {
                        pending.extend(n);
                        pending
                    }),
                };
                hurried = Some((RENEW_SOON, nodes));
            }
        }
        let Some(state) = state.upgrade() else { return };
        if !state.alive() {
            return;
        }
        let only = match &hurried {
            Some((_, Some(failed))) if all_renewed.elapsed() < regular => Some(failed.as_slice()),
            _ => {
                all_renewed = Instant::now();
                None
            }
        };
        let round = renew_round(&state, &endpoint, (lease, regular), &members, only).await;
        next = match hurried {
            Some((pause, _)) if !round.whole() => {
                hurried = Some(((pause * 2).min(regular), Some(round.failed)));
                pause
            }
            _ => {
                hurried = None;
                regular
            }
        };
    }
}

/// A random fraction in [0, 1): the random bits of a version 4 UUID (which `uuid` draws
/// from the system's generator).
pub(crate) fn random_fraction() -> f64 {
    f64::from((uuid::Uuid::new_v4().as_u128() % 1024) as u32) / 1024.0
}

/// What a round of renewals left undone.
struct Round {
    /// The nodes whose parts could not be renewed (not reached, or not answering).
    failed: Vec<NodeId>,
    /// Whether some member still has no part.
    missing: bool,
}

impl Round {
    /// Every member has a part, renewed.
    fn whole(&self) -> bool {
        self.failed.is_empty() && !self.missing
    }
}

/// Renews the parts of `state` for `lease` (only those on the nodes in `only`, when
/// given), and registers it on the members that have none. The parts are renewed all at
/// once, each given up after `limit` (the pause between regular rounds): a node that
/// died or hangs, whose call retries or waits out its timeout, holds up neither the
/// other nodes' renewals nor the next round, and the other parts' leases do not run out
/// meanwhile.
async fn renew_round<M, F>(
    state: &Arc<FeedState>,
    endpoint: &Arc<Endpoint>,
    (lease, limit): (Duration, Duration),
    members: &M,
    only: Option<&[NodeId]>,
) -> Round
where
    M: Fn() -> F,
    F: Future<Output = Vec<(String, Result<Arc<Connection>>)>>,
{
    let parts: Vec<Arc<Part>> = state
        .parts
        .lock()
        .iter()
        .filter(|part| only.is_none_or(|nodes| nodes.contains(&part.node)))
        .cloned()
        .collect();
    let renewals = parts.into_iter().map(|part| async move {
        let request = Request::RenewSubscription {
            id: part.id,
            lease: Lease::For(lease),
        };
        let renewed = tokio::time::timeout(limit, part.conn.call(request)).await;
        (part, renewed)
    });
    let mut failed = Vec::new();
    for (part, renewed) in futures::future::join_all(renewals).await {
        let error = match renewed {
            Ok(Ok(_)) => continue,
            Ok(Err(SpaceError::SubscriptionClosed { .. })) => {
                state.lost(&part, endpoint);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        failed.push(part.node);
        tracing::warn!(subscription = part.id, node = %part.node, %error, "could not renew a subscription");
    }
    let missing: Vec<String> = state.unreached.lock().clone();
    if !missing.is_empty() {
        for (addr, conn) in members().await {
            if !missing.contains(&addr) {
                continue;
            }
            let registered = match conn {
                Ok(conn) => state.register(endpoint, conn, None).await,
                Err(e) => Err(e),
            };
            if let Err(e) = registered {
                tracing::debug!(node = %addr, error = %e, "a subscription is still missing a member");
            }
        }
    }
    Round {
        failed,
        missing: !state.unreached.lock().is_empty(),
    }
}

/// Ends a subscription with a lease by itself a little after the lease, if its nodes did
/// not (a node that cannot be reached cannot tell its end).
pub(crate) async fn end_after(state: Weak<FeedState>, endpoint: Arc<Endpoint>, lease: Duration) {
    tokio::time::sleep(lease.saturating_add(END_GRACE)).await;
    if let Some(state) = state.upgrade() {
        let parts = std::mem::take(&mut *state.parts.lock());
        for part in parts {
            endpoint.detach(&part);
        }
    }
}

/// How many push connections ended, by the node that made them (`None`: a node that did
/// not name itself).
#[derive(Clone, Debug, Default)]
pub(crate) struct PushesEnded(BTreeMap<Option<NodeId>, u64>);

/// The push connections to an endpoint that end from the moment it was made
/// ([`Endpoint::push_ends`]).
pub(crate) struct PushEnds {
    rx: tokio::sync::watch::Receiver<PushesEnded>,
    /// The counts last looked at.
    seen: PushesEnded,
}

impl PushEnds {
    /// Tells of the ends counted by `ended` from now on.
    fn watching(ended: &tokio::sync::watch::Sender<PushesEnded>) -> PushEnds {
        let rx = ended.subscribe();
        let seen = rx.borrow().clone();
        PushEnds { rx, seen }
    }

    /// Waits until push connections end, and names the nodes that made them (`None` when
    /// one of them did not name itself). Never returns once the endpoint is gone.
    pub(crate) async fn next(&mut self) -> Option<Vec<NodeId>> {
        if self.rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = self.rx.borrow_and_update().clone();
        let ended = now
            .0
            .iter()
            .filter(|(node, count)| self.seen.0.get(node).is_none_or(|seen| seen < count))
            .map(|(node, _)| *node)
            .collect::<Option<Vec<NodeId>>>();
        self.seen = now;
        ended
    }
}

/// A remote subscription's receiving side: the merged stream of its parts.
pub(crate) struct Feed {
    receiving: Receiving,
    state: Arc<FeedState>,
    endpoint: Arc<Endpoint>,
    runtime: Runtime,
}

impl Feed {
    pub(crate) fn new(
        rx: flume::Receiver<Delivered>,
        state: Arc<FeedState>,
        endpoint: Arc<Endpoint>,
        runtime: Runtime,
    ) -> Feed {
        Feed {
            receiving: Receiving::new(rx),
            state,
            endpoint,
            runtime,
        }
    }
}

/// The receiving side of a remote subscription's stream, as a [`RemoteFeed`] hands it
/// out: notes each notification's number as its stream's last one handed out, counts
/// what gaps lost, and notes when the stream ended.
pub(crate) struct Receiving {
    rx: flume::Receiver<Delivered>,
    stream: Mutex<flume::r#async::RecvStream<'static, Delivered>>,
    dropped: AtomicU64,
    ended: AtomicBool,
}

impl Receiving {
    pub(crate) fn new(rx: flume::Receiver<Delivered>) -> Receiving {
        Receiving {
            stream: Mutex::new(rx.clone().into_stream()),
            rx,
            dropped: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        }
    }

    fn counted(&self, delivered: Option<Delivered>) -> Option<Notification> {
        let n = delivered.map(|d| {
            if let Some(handed) = &d.handed {
                handed.fetch_max(seq_range(&d.notification).1, Ordering::AcqRel);
            }
            d.notification
        });
        if let Some(Notification::Gap {
            first_seq,
            last_seq,
        }) = &n
        {
            self.dropped
                .fetch_add(last_seq - first_seq + 1, Ordering::Relaxed);
        }
        if n.is_none() && self.rx.is_disconnected() && self.rx.is_empty() {
            self.ended.store(true, Ordering::Release);
        }
        n
    }

    /// See [`RemoteFeed::recv_until`].
    pub(crate) fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        let n = match deadline {
            None => self.rx.recv().ok(),
            Some(d) => self.rx.recv_deadline(d).ok(),
        };
        self.counted(n)
    }

    /// See [`RemoteFeed::try_recv`].
    pub(crate) fn try_recv(&self) -> Option<Notification> {
        self.counted(self.rx.try_recv().ok())
    }

    /// See [`RemoteFeed::poll_recv`].
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.stream
            .lock()
            .poll_next_unpin(cx)
            .map(|n| self.counted(n))
    }

    /// Whether every sender is gone and everything was handed out.
    pub(crate) fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Events lost to gaps so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether the stream ended, or the subscription was cancelled (`cancelled`).
    pub(crate) fn is_closed(&self, cancelled: &AtomicBool) -> bool {
        cancelled.load(Ordering::Acquire)
            || self.ended.load(Ordering::Acquire)
            || (self.rx.is_disconnected() && self.rx.is_empty())
    }

    /// Drops what was received and not handed out (a cancelled subscription).
    pub(crate) fn discard(&self) {
        while self.rx.try_recv().is_ok() {}
    }
}

impl Feed {
    /// Passes `n` on; once the stream has ended, the subscription is closed (its
    /// renewals stop).
    fn ended_if_none(&self, n: Option<Notification>) -> Option<Notification> {
        if n.is_none() && self.receiving.has_ended() {
            self.state.closed.store(true, Ordering::Release);
        }
        n
    }
}

impl RemoteFeed for Feed {
    fn id(&self) -> u64 {
        self.state.parts.lock().first().map_or(0, |p| p.id)
    }

    fn parts(&self) -> (EventKinds, Vec<PartPosition>) {
        let parts = self.state.parts.lock();
        let position = |p: &Arc<Part>| PartPosition {
            node: p.node,
            id: p.id,
            last_seq: p.handed.load(Ordering::Acquire),
            shard: None,
        };
        (self.state.spec.kinds, parts.iter().map(position).collect())
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Option<Notification> {
        self.ended_if_none(self.receiving.recv_until(deadline))
    }

    fn try_recv(&self) -> Option<Notification> {
        self.ended_if_none(self.receiving.try_recv())
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.receiving.poll_recv(cx).map(|n| self.ended_if_none(n))
    }

    fn dropped(&self) -> u64 {
        self.receiving.dropped()
    }

    fn is_closed(&self) -> bool {
        self.receiving.is_closed(&self.state.closed)
    }

    fn unreached(&self) -> Vec<String> {
        self.state.unreached.lock().clone()
    }

    fn renew(&self, lease: Lease) -> Result<()> {
        {
            // The longest lease given is the one some node may hold it for (a renewal
            // can fail on some nodes only).
            let mut held = self.state.lease.lock();
            if let (Lease::For(given), Lease::For(before)) = (lease, *held) {
                *held = Lease::For(given.max(before));
            } else {
                *held = Lease::Forever;
            }
        }
        let parts = self.state.parts.lock().clone();
        let call = self.runtime.bind(async move {
            for part in parts {
                part.conn
                    .call(Request::RenewSubscription { id: part.id, lease })
                    .await?;
            }
            Ok(())
        });
        futures::executor::block_on(call)
    }

    fn cancel(&self) {
        if self.state.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.seal();
        let parts = std::mem::take(&mut *self.state.parts.lock());
        cancel_parts(parts, &self.endpoint, &self.runtime);
        self.receiving.discard();
    }

    fn detach(&self) {
        self.state.detached.store(true, Ordering::Release);
        self.state.seal();
        // Not renewed from here on, the subscription stays on its nodes for its lease at
        // most: the endpoint keeps its pushed parts as long (a push for one is kept by
        // the node for whoever resumes it), then forgets them, whether or not a node
        // told it the end (a node that died or restarted does not; nor does one whose
        // subscription another client resumed).
        let forget_after = match *self.state.lease.lock() {
            Lease::For(lease) => Instant::now().checked_add(lease),
            Lease::Forever => None,
        };
        for part in self.state.parts.lock().iter() {
            part.tx.lock().take();
            *part.forget_after.lock() = forget_after;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed of subscription `id` with a part on each of nodes 1 and 2, attached `how`
    /// with nothing handed out yet, as `register` leaves them.
    fn feed_of(endpoint: &Arc<Endpoint>, id: u64, lease: Lease, how: Attach) -> Feed {
        let (tx, rx) = feed_channel();
        let spec = Spec {
            query: Query::for_type("job"),
            kinds: EventKinds::WRITTEN,
            lease,
        };
        let state = FeedState::new(spec, Some(tx.clone()));
        for node in [1, 2] {
            let conn = Connection::unmade(&format!("127.0.0.1:{node}"), NodeId(node));
            let part = endpoint.attach(conn, id, tx.clone(), 0, how);
            state.parts.lock().push(part);
        }
        Feed::new(
            rx,
            state,
            endpoint.clone(),
            Runtime::Borrowed(tokio::runtime::Handle::current()),
        )
    }

    /// Only the parts nodes push to are held by the endpoint; a detached subscription's
    /// stay there (a push for them is kept by the node for a resume) for as long as the
    /// nodes hold the subscription (its lease, as last renewed), and are forgotten then,
    /// though no node said it ended (a node that restarted, or whose subscription another
    /// client resumed, never does).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_endpoint_forgets_detached_parts_once_their_nodes_let_go_of_them() {
        let endpoint = Endpoint::start(&ClientConfig::default()).await.unwrap();
        let held = || endpoint.feeds.lock().len();

        let polled = feed_of(
            &endpoint,
            1,
            Lease::For(Duration::from_secs(30)),
            Attach::Polled,
        );
        assert_eq!(held(), 0, "nothing pushes to polled parts");
        polled.detach();
        drop(polled);
        assert_eq!(held(), 0);

        let short = feed_of(
            &endpoint,
            2,
            Lease::For(Duration::from_millis(300)),
            Attach::Pushed,
        );
        // Renewed for longer (the nodes cannot be reached here: a renewal that fails on
        // some nodes may have reached others), then detached: held for the longer lease.
        let renewed = feed_of(
            &endpoint,
            3,
            Lease::For(Duration::from_millis(300)),
            Attach::Pushed,
        );
        let _ = renewed.renew(Lease::For(Duration::from_secs(60)));
        let forever = feed_of(&endpoint, 4, Lease::Forever, Attach::Pushed);
        assert_eq!(held(), 6);
        for feed in [&short, &renewed, &forever] {
            feed.detach();
        }
        drop((short, renewed, forever));
        assert_eq!(held(), 6, "detached parts stay while their nodes hold them");
        assert!(endpoint.part(NodeId(1), 2).await.is_some());

        tokio::time::sleep(Duration::from_millis(400)).await;
        // A push for a part whose lease ran out finds it gone, and the next registration
        // forgets it.
        assert!(endpoint.part(NodeId(1), 2).await.is_none());
        assert!(endpoint.part(NodeId(1), 3).await.is_some());
        let alive = feed_of(
            &endpoint,
            5,
            Lease::For(Duration::from_secs(30)),
            Attach::Pushed,
        );
        assert_eq!(
            held(),
            2 + 2 + 2,
            "the short-leased parts are forgotten; the renewed, the unleased and the new stay"
        );
        drop(alive);
    }

    /// Node 1 pushes events `seqs` of subscription `id` to the endpoint; whether the
    /// endpoint wanted them.
    async fn push(endpoint: &Arc<Endpoint>, id: u64, seqs: std::ops::RangeInclusive<u64>) -> bool {
        let event = |seq| {
            Notification::Event(space_core::Event {
                seq,
                shard: None,
                node: NodeId(1),
                entry_type: "job".into(),
                key: space_core::Key::Name(format!("job-{seq}")),
                kind: space_core::EventKind::Written,
                version: 1,
            })
        };
        let batch = seqs.map(event).collect();
        Subscriber(endpoint.clone())
            .deliver(context::current(), NodeId(1), None, id, batch)
            .await
    }

    /// A push under way when its subscription is detached (it holds the stream's sender;
    /// the stream then goes with the detached handle) is still wanted: the node keeps
    /// the subscription, and a resume gets what the push carried again. Answered "not
    /// wanted", the node ended the subscription, the resume found it gone, and what was
    /// written while it was detached was never told (seen in CI, in
    /// `a_detached_subscription_resumes_where_it_stood_on_every_node`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_under_way_when_its_subscription_is_detached_is_still_wanted() {
        let endpoint = Endpoint::start(&ClientConfig::default()).await.unwrap();
        let lease = Lease::For(Duration::from_secs(30));
        let feed = feed_of(&endpoint, 8, lease, Attach::Pushed);
        // The stream is full: the next push waits for room, its sender in hand.
        let full = FEED_CAPACITY as u64;
        assert!(push(&endpoint, 8, 1..=full).await);
        let waiting = tokio::spawn({
            let endpoint = endpoint.clone();
            async move { push(&endpoint, 8, full + 1..=full + 1).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the push waits for room");
        feed.detach();
        drop(feed);
        assert!(
            waiting.await.unwrap(),
            "a detached subscription's push is kept by its node for a resume"
        );
        // Cancelled, its pushes are no longer wanted.
        let feed = feed_of(&endpoint, 9, lease, Attach::Pushed);
        feed.cancel();
        assert!(!push(&endpoint, 9, 1..=1).await);
    }

    /// What the subscriber was told so far, as the sequence numbers each notification
    /// covers (an event's twice).
    fn told(feed: &Feed) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| feed.try_recv())
            .map(|n| seq_range(&n))
            .collect()
    }

    /// A client resuming a subscription it detached holds it again (same endpoint) before
    /// the node takes the resume up; meanwhile the node went on pushing, its detached
    /// registration answering for events 1 to 13, and the next push (14) reaches the
    /// resumed one. Taking 14 would make the rewind that follows (1 to 14 again) look
    /// like repeats, and 1 to 13 would be lost without a gap: it waits for the rewind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_sent_before_a_resume_was_taken_up_does_not_hide_the_rewind() {
        let endpoint = Endpoint::start(&ClientConfig::default()).await.unwrap();
        let lease = Lease::For(Duration::from_secs(30));
        let feed = feed_of(&endpoint, 7, lease, Attach::Resumed);
        assert!(push(&endpoint, 7, 14..=14).await, "kept for the rewind");
        assert!(push(&endpoint, 7, 1..=14).await);
        let each: Vec<(u64, u64)> = (1..=14).map(|s| (s, s)).collect();
        assert_eq!(
            told(&feed),
            each,
            "everything after the resumed position, once"
        );
        // From then on it is an ordinary part: numbers it skips are a gap.
        assert!(push(&endpoint, 7, 16..=16).await);
        assert_eq!(told(&feed), [(15, 15), (16, 16)]);
    }

    /// A push that skips sequence numbers (none should) is told as a gap first: the
    /// subscriber learns it may have missed something rather than nothing at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn numbers_a_push_skips_are_told_as_a_gap() {
        let endpoint = Endpoint::start(&ClientConfig::default()).await.unwrap();
        let feed = feed_of(&endpoint, 8, Lease::Forever, Attach::Pushed);
        assert!(push(&endpoint, 8, 1..=2).await);
        assert!(push(&endpoint, 8, 5..=5).await);
        assert!(
            push(&endpoint, 8, 2..=5).await,
            "repeats are wanted, and dropped"
        );
        assert_eq!(told(&feed), [(1, 1), (2, 2), (3, 4), (5, 5)]);
    }

    /// The nodes whose push connections ended are told once each time, counted from the
    /// moment the watch was taken; an end whose node is unknown asks for every part.
    #[tokio::test]
    async fn ended_push_connections_are_told_by_the_nodes_that_made_them() {
        let ended = tokio::sync::watch::Sender::new(PushesEnded::default());
        let end = |node: Option<u64>| {
            ended.send_modify(|e| *e.0.entry(node.map(NodeId)).or_default() += 1);
        };
        end(Some(1)); // before the subscription: not its business
        let mut ends = PushEnds::watching(&ended);
        end(Some(3));
        assert_eq!(ends.next().await, Some(vec![NodeId(3)]));
        end(Some(1));
        end(Some(2));
        assert_eq!(ends.next().await, Some(vec![NodeId(1), NodeId(2)]));
        // A node that did not name itself: every node's parts are looked at.
        end(None);
        end(Some(2));
        assert_eq!(ends.next().await, None);
        let waited = tokio::time::timeout(Duration::from_millis(50), ends.next()).await;
        assert!(
            waited.is_err(),
            "told again of what it was told: {waited:?}"
        );
    }
}
