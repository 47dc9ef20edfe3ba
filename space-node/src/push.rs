//! Pushing notify events to subscribers.
//!
//! Each remote subscription has a pusher task: it waits for the subscription's next events,
//! sends them in batches to the subscriber's endpoint (the `SubscriberService` the client
//! serves), and moves on only when the batch is acknowledged. When the endpoint cannot be
//! reached it keeps the batch and retries with backoff, so nothing is skipped; events that
//! pile up meanwhile stay in the subscription's bounded log (overflow becomes a gap). A
//! client that comes back with `Resume` gets delivery from its last sequence number on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use space_core::wire::{self, Hello, SubscriberServiceClient, Welcome};
use space_core::{NodeId, Notification, Subscription};
use tarpc::{client, context};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Most notifications sent in one delivery.
const BATCH: usize = 256;

/// How long one delivery may take.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);

struct Pusher {
    subscription: Arc<Subscription>,
    endpoint: watch::Sender<SocketAddr>,
}

/// The node's remote subscriptions and their pushers.
#[derive(Default)]
pub(crate) struct Pushers {
    map: Mutex<HashMap<u64, Pusher>>,
}

fn seq_of(n: &Notification) -> u64 {
    match n {
        Notification::Event(e) => e.seq,
        Notification::Gap { last_seq, .. } => *last_seq,
    }
}

async fn connect(
    endpoint: SocketAddr,
    max_frame: usize,
) -> std::io::Result<SubscriberServiceClient> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(endpoint))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to the subscriber timed out",
            )
        })??;
    stream.set_nodelay(true)?;
    let mut framed = wire::framed(stream, max_frame);
    wire::send_frame(&mut framed, &Hello::new(None)).await?;
    match wire::recv_frame::<_, Welcome>(&mut framed).await? {
        Some(Welcome::Accepted { .. }) => {}
        Some(Welcome::Refused { reason }) => return Err(std::io::Error::other(reason)),
        None => {
            return Err(std::io::Error::other(
                "the subscriber closed the connection",
            ));
        }
    }
    Ok(SubscriberServiceClient::new(client::Config::default(), wire::transport(framed)).spawn())
}

impl Pushers {
    /// Starts pushing `subscription`'s events to `endpoint`.
    pub(crate) fn start(
        self: &Arc<Self>,
        node: NodeId,
        subscription: Subscription,
        endpoint: SocketAddr,
        max_frame: usize,
    ) -> u64 {
        let id = subscription.id();
        let subscription = Arc::new(subscription);
        let (tx, rx) = watch::channel(endpoint);
        self.map.lock().insert(
            id,
            Pusher {
                subscription: subscription.clone(),
                endpoint: tx,
            },
        );
        let pushers = self.clone();
        tokio::spawn(async move {
            push(node, subscription.clone(), rx, max_frame).await;
            pushers.map.lock().remove(&id);
            subscription.cancel();
            tracing::debug!(subscription = id, "pusher finished");
        });
        id
    }

    /// Redirects a subscription to `endpoint` and re-delivers after `last_seq`.
    pub(crate) fn resume(&self, id: u64, last_seq: u64, endpoint: SocketAddr) -> bool {
        let map = self.map.lock();
        let Some(p) = map.get(&id) else {
            return false;
        };
        p.subscription.rewind(last_seq);
        p.endpoint.send_replace(endpoint);
        true
    }

    /// The subscription behind a pusher.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Subscription>> {
        self.map.lock().get(&id).map(|p| p.subscription.clone())
    }

    /// Ends a subscription (its pusher stops).
    pub(crate) fn cancel(&self, id: u64) -> bool {
        match self.map.lock().remove(&id) {
            Some(p) => {
                p.subscription.cancel();
                true
            }
            None => false,
        }
    }

    /// Ends every subscription (node shutdown).
    pub(crate) fn cancel_all(&self) {
        for (_, p) in self.map.lock().drain() {
            p.subscription.cancel();
        }
    }
}

async fn push(
    node: NodeId,
    sub: Arc<Subscription>,
    mut endpoint: watch::Receiver<SocketAddr>,
    max_frame: usize,
) {
    let id = sub.id();
    let mut client: Option<SubscriberServiceClient> = None;
    let mut batch: Vec<Notification> = Vec::new();
    let mut backoff = Duration::from_millis(20);
    loop {
        if batch.is_empty() {
            tokio::select! {
                n = sub.recv_async() => match n {
                    Some(n) => batch.push(n),
                    None => return,
                },
                changed = endpoint.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    client = None;
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
        if endpoint.has_changed().unwrap_or(false) {
            // Resumed elsewhere: the rewound log re-delivers what this batch held.
            endpoint.borrow_and_update();
            client = None;
            batch.clear();
            continue;
        }
        if client.is_none() {
            let addr = *endpoint.borrow();
            match connect(addr, max_frame).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(subscription = id, %addr, error = %e, "subscriber unreachable");
                    if sub.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let mut ctx = context::current();
        ctx.deadline = Instant::now() + DELIVERY_DEADLINE;
        let last = batch.last().map(seq_of).unwrap_or(0);
        match c.deliver(ctx, node, id, batch.clone()).await {
            Ok(true) => {
                batch.clear();
                backoff = Duration::from_millis(20);
                tracing::trace!(subscription = id, last, "delivered");
            }
            Ok(false) => {
                tracing::debug!(subscription = id, "the subscriber no longer wants it");
                return;
            }
            Err(e) => {
                tracing::debug!(subscription = id, error = %e, "delivery failed; retrying");
                client = None;
                if sub.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
