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

use std::collections::HashMap;
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
struct Link {
    endpoint: Endpoint,
    /// The connection, once made; dialled by one pusher at a time.
    client: tokio::sync::Mutex<Option<SubscriberServiceClient>>,
    /// Subscriptions pushed over this link.
    subscriptions: std::sync::atomic::AtomicUsize,
}

impl Link {
    /// The connection, dialled if there is none.
    async fn client(&self, max_frame: usize) -> std::io::Result<SubscriberServiceClient> {
        let mut client = self.client.lock().await;
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.endpoint, max_frame).await?;
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
    link: watch::Sender<Arc<Link>>,
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
}

impl Tables {
    /// The link to `endpoint` (made if missing), with room for one more subscription.
    fn link(&mut self, endpoint: Endpoint, max: usize) -> Result<Arc<Link>, SpaceError> {
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
        let held = link
            .subscriptions
            .load(std::sync::atomic::Ordering::Acquire);
        if held >= max {
            return Err(SpaceError::Busy {
                node: String::new(),
                reason: format!("this client holds its maximum of {max} subscriptions on the node"),
            });
        }
        link.subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(link)
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
    max_frame: usize,
) -> std::io::Result<SubscriberServiceClient> {
    let hello = wire::Hello::new(Some(endpoint.token()), max_frame);
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

    /// Starts pushing `subscription`'s events to `endpoint`.
    ///
    /// # Errors
    /// [`SpaceError::Busy`] when the endpoint's client holds its maximum of subscriptions
    /// (the subscription is then cancelled).
    pub(crate) fn start(
        self: &Arc<Self>,
        subscription: Subscription,
        endpoint: Endpoint,
    ) -> Result<u64, SpaceError> {
        let id = subscription.id();
        let subscription = Arc::new(subscription);
        let rx = {
            let mut tables = self.map.lock();
            let link = tables.link(endpoint, self.config.max_per_endpoint)?;
            let (tx, rx) = watch::channel(link);
            tables.pushers.insert(
                id,
                Pusher {
                    subscription: subscription.clone(),
                    link: tx,
                },
            );
            rx
        };
        let pushers = self.clone();
        tokio::spawn(async move {
            push(pushers.config, subscription.clone(), rx).await;
            {
                let mut tables = pushers.map.lock();
                if let Some(p) = tables.pushers.remove(&id) {
                    let link = p.link.borrow().clone();
                    tables.unlink(&link);
                }
            }
            subscription.cancel();
            tracing::debug!(subscription = id, "pusher finished");
        });
        Ok(id)
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
        let Some(old) = tables.pushers.get(&id).map(|p| p.link.borrow().clone()) else {
            return Err(SpaceError::SubscriptionClosed { id });
        };
        if old.endpoint != endpoint {
            let link = tables.link(endpoint, self.config.max_per_endpoint)?;
            tables.unlink(&old);
            if let Some(p) = tables.pushers.get(&id) {
                p.link.send_replace(link);
            }
        }
        if let Some(p) = tables.pushers.get(&id) {
            p.subscription.rewind(last_seq);
            // Wake the pusher even when the endpoint stayed the same.
            p.link.send_modify(|_| {});
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

fn seq_of(n: &Notification) -> u64 {
    match n {
        Notification::Event(e) => e.seq,
        Notification::Gap { last_seq, .. } => *last_seq,
    }
}

async fn push(config: PushConfig, sub: Arc<Subscription>, mut link: watch::Receiver<Arc<Link>>) {
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
                    None if sub.is_cancelled() => return,
                    None => ended = true,
                },
                changed = link.changed() => {
                    if changed.is_err() {
                        return;
                    }
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
        if link.has_changed().unwrap_or(false) {
            // Resumed (elsewhere): the rewound log re-delivers what this batch held.
            link.borrow_and_update();
            batch.clear();
            ended = false;
            continue;
        }
        let current = link.borrow().clone();
        let delivered = match current.client(config.max_frame).await {
            Ok(c) => {
                let mut ctx = context::current();
                ctx.deadline = Instant::now() + DELIVERY_DEADLINE;
                let sent = if batch.is_empty() {
                    c.end(ctx, config.node, id).await.map(|()| true)
                } else {
                    c.deliver(ctx, config.node, id, batch.clone()).await
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
            Ok(true) if batch.is_empty() => return, // the end was told
            Ok(true) => {
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
                return;
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
                    return;
                }
                tracing::debug!(subscription = id, %error, "delivery failed; retrying");
                if sub.is_cancelled() {
                    return;
                }
                backoff.wait().await;
            }
        }
    }
}
