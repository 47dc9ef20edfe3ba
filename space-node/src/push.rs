//! Pushing notify events to subscribers.
//!
//! A client serves one endpoint for all its subscriptions (the `SubscriberService`), and
//! the node keeps one [`Link`] to each endpoint: one connection, shared by every
//! subscription pushed there, opened with the endpoint's secret as the handshake token (the
//! endpoint accepts pushes only from the nodes its client subscribed with).
//!
//! Each remote subscription has a pusher task: it waits for the subscription's next events,
//! sends them in batches over its link, and moves on only when the batch is acknowledged.
//! When the endpoint cannot be reached it keeps the batch and retries with backoff, so
//! nothing is skipped; events that pile up meanwhile stay in the subscription's bounded log
//! (overflow becomes a gap). A client that comes back with `Resume` gets delivery from its
//! last sequence number on. An endpoint unreachable for longer than the node's
//! `subscriber_timeout` costs nothing any more: its subscriptions are cancelled. A
//! subscription that ends by its lease delivers what it matched and then tells the
//! endpoint it ended.
//!
//! Before a subscription is accepted, the node connects to its endpoint (or has a
//! connection to it already): an endpoint it cannot reach is refused at once with
//! [`SpaceError::EndpointUnreachable`], never accepted and then left silent. A client that
//! cannot accept connections subscribes without an endpoint and *polls* instead
//! ([`Pushers::poll`]): each poll answers the events after the sequence number the client
//! has (so an answer lost on the way is sent again), waiting for the first; a polled
//! subscription not polled for `subscriber_timeout` is cancelled.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use space_core::wire::{self, Endpoint, SubscriberServiceClient};
use space_core::{NodeId, Notification, SpaceError, Subscription};
use tarpc::{client, context};
use tokio::sync::watch;

/// Most notifications sent in one delivery.
const BATCH: usize = 256;

/// How long one delivery may take.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);

/// How long the node tries to connect to a new subscription's endpoint before it refuses
/// the subscription.
const REACH_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a node remembers that a polled subscription ended, and where (so that a poll
/// retried after the answer saying so was lost gets that answer again), and for how many
/// subscriptions at most.
const ENDED_KEPT: Duration = Duration::from_secs(60);
const ENDED_KEPT_MOST: usize = 1024;

/// How the node pushes: its id, frame limit, and how long an endpoint may stay away.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PushConfig {
    pub(crate) node: NodeId,
    pub(crate) max_frame: usize,
    /// After this long without reaching its endpoint, a subscription is cancelled.
    pub(crate) subscriber_timeout: Duration,
    /// Most subscriptions one endpoint (one client) may hold on this node.
    pub(crate) max_per_endpoint: usize,
}

/// The connection to one subscriber endpoint, shared by its subscriptions.
pub(crate) struct Link {
    endpoint: Endpoint,
    /// The connection, once made; dialled by one pusher at a time.
    client: tokio::sync::Mutex<Option<SubscriberServiceClient>>,
    /// Subscriptions pushed over this link.
    subscriptions: std::sync::atomic::AtomicUsize,
}

impl Link {
    /// The connection, dialled (as `config` says) if there is none.
    async fn client(&self, config: &PushConfig) -> std::io::Result<SubscriberServiceClient> {
        let mut client = self.client.lock().await;
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.endpoint, config).await?;
        *client = Some(c.clone());
        Ok(c)
    }

    /// Drops the connection after a failure (the next delivery dials again).
    async fn forget(&self) {
        self.client.lock().await.take();
    }
}

struct Pusher {
    subscription: Arc<Subscription>,
    delivery: Delivery,
}

/// Where a pushed subscription's events go: the link to its endpoint and, after a resume,
/// the sequence number the subscriber last had. The pusher itself rewinds the
/// subscription to it when it takes the route up, after dropping the batch it held: a
/// rewind made from outside could land before the pusher takes a batch from the rewound
/// log, and the pusher, clearing that batch for the resume, would lose it.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) link: Arc<Link>,
    pub(crate) resume_after: Option<u64>,
}

/// Why a pusher stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The subscription ended (its end told to the subscriber), or was cancelled.
    Ended,
    /// The subscriber no longer wants it.
    Unwanted,
    /// Its endpoint stayed unreachable for the subscriber timeout.
    Unreachable,
}

/// How a subscription's events leave the node.
enum Delivery {
    /// Pushed to an endpoint, over the route the watch holds (a resume changes it).
    Push(watch::Sender<Route>),
    /// Fetched by the client's polls.
    Poll(Arc<Mutex<Polled>>),
}

/// The state of a polled subscription.
struct Polled {
    /// The last sequence number answered to a poll.
    answered_to: u64,
    /// When the last poll began or ended.
    last_poll: Instant,
    /// Polls running now (a polled subscription is not idle while one waits).
    polling: usize,
}

/// A poll under way on a polled subscription: counted from its start to its end or drop.
struct Polling<'a>(&'a Mutex<Polled>);

impl<'a> Polling<'a> {
    fn start(polled: &'a Mutex<Polled>) -> Polling<'a> {
        polled.lock().polling += 1;
        Polling(polled)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.polling -= 1;
        p.last_poll = Instant::now();
    }
}

impl Pusher {
    /// The link of a pushed subscription.
    fn link(&self) -> Option<Arc<Link>> {
        match &self.delivery {
            Delivery::Push(route) => Some(route.borrow().link.clone()),
            Delivery::Poll(_) => None,
        }
    }
}

/// The node's remote subscriptions, their pushers, and the links to their endpoints.
pub(crate) struct Pushers {
    config: PushConfig,
    map: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    pushers: HashMap<u64, Pusher>,
    links: HashMap<Endpoint, Arc<Link>>,
    /// Polled subscriptions that ended, oldest first: (id, the last sequence number
    /// answered, when).
    ended: VecDeque<(u64, u64, Instant)>,
}

impl Tables {
    /// Notes that polled subscription `id` ended after sequence number `last`.
    fn ended(&mut self, id: u64, last: u64) {
        let now = Instant::now();
        while self.ended.len() >= ENDED_KEPT_MOST
            || self
                .ended
                .front()
                .is_some_and(|(_, _, at)| now.duration_since(*at) > ENDED_KEPT)
        {
            self.ended.pop_front();
        }
        self.ended.push_back((id, last, now));
    }

    /// Where polled subscription `id` ended, if it did lately.
    fn ended_after(&self, id: u64) -> Option<u64> {
        self.ended
            .iter()
            .find(|(ended, _, at)| *ended == id && at.elapsed() <= ENDED_KEPT)
            .map(|(_, last, _)| *last)
    }

    /// The link to `endpoint` (made if missing), with room for one more subscription.
    fn link(&mut self, endpoint: Endpoint, max: usize) -> Result<Arc<Link>, SpaceError> {
        let held = self.links.get(&endpoint).map_or(0, |link| {
            link.subscriptions
                .load(std::sync::atomic::Ordering::Acquire)
        });
        if held >= max {
            return Err(SpaceError::Busy {
                node: String::new(),
                reason: format!("this client holds its maximum of {max} subscriptions on the node"),
            });
        }
        Ok(self.hold_link(endpoint))
    }

    /// The link to `endpoint` (made if missing), held once more.
    fn hold_link(&mut self, endpoint: Endpoint) -> Arc<Link> {
        let link = self
            .links
            .entry(endpoint)
            .or_insert_with(|| {
                Arc::new(Link {
                    endpoint,
                    client: tokio::sync::Mutex::new(None),
                    subscriptions: 0.into(),
                })
            })
            .clone();
        link.subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        link
    }

    /// Forgets a pusher, and its place on its link.
    fn remove(&mut self, id: u64) {
        if let Some(link) = self.pushers.remove(&id).and_then(|p| p.link()) {
            self.unlink(&link);
        }
    }

    /// Gives back a subscription's place on `link`, and the link once it has none.
    fn unlink(&mut self, link: &Link) {
        let left = link
            .subscriptions
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            - 1;
        if left == 0 {
            self.links.remove(&link.endpoint);
        }
    }
}

async fn connect(
    endpoint: &Endpoint,
    config: &PushConfig,
) -> std::io::Result<SubscriberServiceClient> {
    let hello = wire::Hello::new_pusher(Some(endpoint.token()), config.max_frame, config.node);
    let (framed, _, _) = crate::handshake::dial(endpoint.addr, hello).await?;
    Ok(SubscriberServiceClient::new(client::Config::default(), wire::transport(framed)).spawn())
}

impl Pushers {
    pub(crate) fn new(config: PushConfig) -> Pushers {
        Pushers {
            config,
            map: Mutex::new(Tables::default()),
        }
    }

    /// Starts delivering `subscription`'s events: pushed to `endpoint`, once the node
    /// has connected to it, or, without one, to the client's polls.
    ///
    /// # Errors
    /// [`SpaceError::EndpointUnreachable`] when the node cannot connect to the endpoint,
    /// and [`SpaceError::Busy`] when the endpoint's client holds its maximum of
    /// subscriptions (the subscription is then cancelled).
    pub(crate) async fn start(
        self: &Arc<Self>,
        subscription: Subscription,
        endpoint: Option<Endpoint>,
    ) -> Result<u64, SpaceError> {
        let id = subscription.id();
        let subscription = Arc::new(subscription);
        let Some(endpoint) = endpoint else {
            return Ok(self.start_polled(subscription));
        };
        let link = {
            let mut tables = self.map.lock();
            match tables.link(endpoint, self.config.max_per_endpoint) {
                Ok(link) => link,
                Err(e) => {
                    subscription.cancel();
                    return Err(e);
                }
            }
        };
        if let Err(e) = self.reach(&link).await {
            self.map.lock().unlink(&link);
            subscription.cancel();
            return Err(e);
        }
        let (tx, rx) = watch::channel(Route {
            link,
            resume_after: None,
        });
        self.map.lock().pushers.insert(
            id,
            Pusher {
                subscription: subscription.clone(),
                delivery: Delivery::Push(tx),
            },
        );
        let pushers = self.clone();
        tokio::spawn(async move {
            push(pushers.config, None, subscription.clone(), rx).await;
            pushers.map.lock().remove(id);
            subscription.cancel();
            tracing::debug!(subscription = id, "pusher finished");
        });
        Ok(id)
    }

    /// Connects `link` to its endpoint, if it is not connected, within
    /// [`REACH_TIMEOUT`].
    ///
    /// # Errors
    /// [`SpaceError::EndpointUnreachable`] when the node cannot connect to it.
    pub(crate) async fn reach(&self, link: &Link) -> Result<(), SpaceError> {
        let reached = tokio::time::timeout(REACH_TIMEOUT, link.client(&self.config))
            .await
            .map_err(|_| format!("no connection within {REACH_TIMEOUT:?}"))
            .and_then(|dialled| dialled.map_err(|e| e.to_string()));
        reached.map(drop).map_err(|reason| {
            tracing::info!(endpoint = %link.endpoint.addr, %reason, "refused a subscription whose endpoint cannot be reached");
            SpaceError::EndpointUnreachable {
                endpoint: link.endpoint.addr.to_string(),
                reason,
            }
        })
    }

    /// The link to `endpoint`, shared with the node's other pushers there, held until
    /// [`unlink`](Self::unlink): for the pushers of a replicated cluster's subscriptions,
    /// one per shard this node leads (their number per client is bounded where they
    /// are registered, not per link).
    pub(crate) fn link_for(&self, endpoint: Endpoint) -> Arc<Link> {
        self.map.lock().hold_link(endpoint)
    }

    /// Gives back a hold on a link taken with [`link_for`](Self::link_for).
    pub(crate) fn unlink(&self, link: &Link) {
        self.map.lock().unlink(link);
    }

    /// How this node pushes.
    pub(crate) fn config(&self) -> PushConfig {
        self.config
    }

    /// Keeps a polled subscription until it ends, or is not polled for the subscriber
    /// timeout.
    fn start_polled(self: &Arc<Self>, subscription: Arc<Subscription>) -> u64 {
        let id = subscription.id();
        let polled = Arc::new(Mutex::new(Polled {
            answered_to: 0,
            last_poll: Instant::now(),
            polling: 0,
        }));
        self.map.lock().pushers.insert(
            id,
            Pusher {
                subscription: subscription.clone(),
                delivery: Delivery::Poll(polled.clone()),
            },
        );
        let pushers = self.clone();
        let timeout = self.config.subscriber_timeout;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(
                    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
                )
                .await;
                if subscription.is_cancelled() || !pushers.map.lock().pushers.contains_key(&id) {
                    break;
                }
                let idle = {
                    let p = polled.lock();
                    p.polling == 0 && p.last_poll.elapsed() >= timeout
                };
                if idle {
                    tracing::info!(
                        subscription = id,
                        "a polled subscription was not polled for the subscriber timeout; cancelling it"
                    );
                    break;
                }
            }
            pushers.map.lock().remove(id);
            subscription.cancel();
        });
        id
    }

    /// Answers a poll of subscription `id`: the events after `after`, waiting up to
    /// `wait` for the first; and whether the subscription is over. A poll of a
    /// subscription that ended lately, made again after everything it was answered (the
    /// answer that said it ended was lost), is told again that it is over.
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`] when there is no such polled subscription (or
    /// the poll asks for events of one that ended that are gone with it).
    pub(crate) async fn poll(
        &self,
        id: u64,
        after: u64,
        wait: Duration,
    ) -> Result<(Vec<Notification>, bool), SpaceError> {
        let found = self
            .map
            .lock()
            .pushers
            .get(&id)
            .and_then(|p| match &p.delivery {
                Delivery::Poll(polled) => Some((p.subscription.clone(), polled.clone())),
                Delivery::Push(_) => None,
            });
        let Some((sub, polled)) = found else {
            return match self.map.lock().ended_after(id) {
                Some(last) if after >= last => Ok((Vec::new(), true)),
                _ => Err(SpaceError::SubscriptionClosed { id }),
            };
        };
        {
            let mut p = polled.lock();
            p.last_poll = Instant::now();
            if after < p.answered_to {
                // The last answer did not arrive: send it again.
                sub.rewind(after);
            }
        }
        // Counted as polling while it waits, however the wait ends: a poll whose client
        // went away is dropped here, and must not keep the subscription from going idle.
        let _polling = Polling::start(&polled);
        let mut batch = Vec::new();
        let mut ended = false;
        match tokio::time::timeout(wait.min(wire::MAX_POLL_WAIT), sub.recv_async()).await {
            Ok(Some(n)) => batch.push(n),
            Ok(None) => ended = true,
            Err(_) => {}
        }
        while !ended && batch.len() < BATCH {
            match sub.try_recv() {
                Some(n) => batch.push(n),
                None => break,
            }
        }
        let answered_to = {
            let mut p = polled.lock();
            p.answered_to = batch.last().map_or(after.max(p.answered_to), seq_of);
            p.answered_to
        };
        if ended {
            let mut tables = self.map.lock();
            tables.remove(id);
            tables.ended(id, answered_to);
        }
        count_delivered(&batch);
        Ok((batch, ended))
    }

    /// Redirects a subscription to `endpoint` and re-delivers after `last_seq`.
    ///
    /// # Errors
    /// [`SpaceError::SubscriptionClosed`] when there is no such subscription, and
    /// [`SpaceError::Busy`] when the new endpoint's client holds its maximum.
    pub(crate) fn resume(
        &self,
        id: u64,
        last_seq: u64,
        endpoint: Endpoint,
    ) -> Result<(), SpaceError> {
        let mut tables = self.map.lock();
        let Some(pusher) = tables.pushers.get(&id) else {
            return Err(SpaceError::SubscriptionClosed { id });
        };
        let Some(old) = pusher.link() else {
            return Err(SpaceError::Protocol {
                reason: format!(
                    "subscription {id} is polled: poll it after the last sequence number instead of resuming it"
                ),
            });
        };
        let link = if old.endpoint == endpoint {
            old
        } else {
            let link = tables.link(endpoint, self.config.max_per_endpoint)?;
            tables.unlink(&old);
            link
        };
        // The pusher rewinds the subscription when it takes the new route up (see
        // `Route`); it is woken even when the endpoint stayed the same.
        if let Some(Delivery::Push(tx)) = tables.pushers.get(&id).map(|p| &p.delivery) {
            tx.send_replace(Route {
                link,
                resume_after: Some(last_seq),
            });
        }
        Ok(())
    }

    /// The subscription behind a pusher.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Subscription>> {
        self.map
            .lock()
            .pushers
            .get(&id)
            .map(|p| p.subscription.clone())
    }

    /// Ends a subscription (its pusher stops).
    pub(crate) fn cancel(&self, id: u64) {
        let pusher = self
            .map
            .lock()
            .pushers
            .get(&id)
            .map(|p| p.subscription.clone());
        if let Some(sub) = pusher {
            sub.cancel();
        }
    }

    /// Ends every subscription (node shutdown).
    pub(crate) fn cancel_all(&self) {
        let subs: Vec<_> = self
            .map
            .lock()
            .pushers
            .values()
            .map(|p| p.subscription.clone())
            .collect();
        for sub in subs {
            sub.cancel();
        }
    }

    /// Endpoints (clients) with subscriptions here.
    pub(crate) fn endpoints(&self) -> usize {
        self.map.lock().links.len()
    }
}

/// Backoff between attempts to reach an endpoint.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(20))
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}

/// Counts the events and gaps a subscriber was given (pushed or polled).
fn count_delivered(batch: &[Notification]) {
    let gaps = batch
        .iter()
        .filter(|n| matches!(n, Notification::Gap { .. } | Notification::Missed { .. }))
        .count();
    metrics::counter!("space_events_delivered_total").increment((batch.len() - gaps) as u64);
    metrics::counter!("space_event_gaps_total").increment(gaps as u64);
}

fn seq_of(n: &Notification) -> u64 {
    match n {
        Notification::Event(e) => e.seq,
        Notification::Gap { last_seq, .. } => *last_seq,
        Notification::Missed { seq } => *seq,
    }
}

/// Takes up a changed route: the batch held is dropped, and after a resume the
/// subscription is rewound to where its subscriber stands, so that what the batch held is
/// delivered again from the log over the new route.
fn take_up(route: &mut watch::Receiver<Route>, sub: &Subscription, batch: &mut Vec<Notification>) {
    let resume_after = route.borrow_and_update().resume_after;
    batch.clear();
    if let Some(last_seq) = resume_after {
        sub.rewind(last_seq);
    }
}

/// Pushes `sub`'s events over the route `route` holds until it ends (its end told), its
/// subscriber no longer wants it, or its endpoint stays unreachable for the subscriber
/// timeout; returns why it stopped. `shard` names the shard a subscription of a
/// replicated cluster is numbered in (`None`: one of the node's own).
pub(crate) async fn push(
    config: PushConfig,
    shard: Option<u32>,
    sub: Arc<Subscription>,
    mut route: watch::Receiver<Route>,
) -> Stopped {
    let id = sub.id();
    let mut batch: Vec<Notification> = Vec::new();
    let mut backoff = Backoff::new();
    // Since when the endpoint has not been reached (None: it was, last time).
    let mut unreachable_since: Option<Instant> = None;
    let mut ended = false;
    loop {
        if batch.is_empty() && !ended {
            tokio::select! {
                n = sub.recv_async() => match n {
                    Some(n) => batch.push(n),
                    None if sub.is_cancelled() => return Stopped::Ended,
                    None => ended = true,
                },
                changed = route.changed() => {
                    if changed.is_err() {
                        return Stopped::Ended;
                    }
                    take_up(&mut route, &sub, &mut batch);
                    ended = false;
                    continue;
                }
            }
            while batch.len() < BATCH {
                match sub.try_recv() {
                    Some(n) => batch.push(n),
                    None => break,
                }
            }
        }
        if route.has_changed().unwrap_or(false) {
            take_up(&mut route, &sub, &mut batch);
            ended = false;
            continue;
        }
        let current = route.borrow().link.clone();
        let delivered = match current.client(&config).await {
            Ok(c) => {
                let mut ctx = context::current();
                ctx.deadline = Instant::now() + DELIVERY_DEADLINE;
                let sent = if batch.is_empty() {
                    c.end(ctx, config.node, shard, id).await.map(|()| true)
                } else {
                    c.deliver(ctx, config.node, shard, id, batch.clone()).await
                };
                match sent {
                    Ok(wanted) => Ok(wanted),
                    Err(e) => {
                        current.forget().await;
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match delivered {
            Ok(true) if batch.is_empty() => return Stopped::Ended, // the end was told
            Ok(true) => {
                count_delivered(&batch);
                tracing::trace!(
                    subscription = id,
                    last = batch.last().map(seq_of),
                    "delivered"
                );
                batch.clear();
                backoff = Backoff::new();
                unreachable_since = None;
            }
            Ok(false) => {
                tracing::debug!(subscription = id, "the subscriber no longer wants it");
                return Stopped::Unwanted;
            }
            Err(error) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= config.subscriber_timeout {
                    tracing::info!(
                        subscription = id,
                        endpoint = %current.endpoint.addr,
                        %error,
                        "the subscriber stayed unreachable; cancelling its subscription"
                    );
                    return Stopped::Unreachable;
                }
                tracing::debug!(subscription = id, %error, "delivery failed; retrying");
                if sub.is_cancelled() {
                    return Stopped::Ended;
                }
                backoff.wait().await;
            }
        }
    }
}
