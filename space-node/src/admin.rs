//! The admin listener: `/` the admin page (the cluster's picture, live), `/metrics` in
//! the Prometheus text format, and `/health/live` and `/health/ready` for orchestrators.
//!
//! The page is one HTML file embedded in the binary (its script and styles inline, nothing
//! fetched from elsewhere). It reads `/api/picture` once, then follows `/api/stream`, a
//! stream of server-sent events carrying each new picture (see `picture`).
//!
//! Metrics go through the `metrics` facade into `metrics-exporter-prometheus`, installed
//! as the process's recorder when the admin listener starts; without it every metric call
//! is a no-op. Operations are counted where every request is answered
//! ([`count_operation`]); the contents of the space (entries and bytes per entry type,
//! waiters, subscriptions, connections) are read from the node's counters at each scrape.
//! Labels are bounded: operation kinds, outcomes and entry type names, never keys or
//! queries.
//!
//! The same token rule as the data port: beyond loopback the node needs a token, and with
//! a token every admin request must carry it: `Authorization: Bearer <token>`, or, for a
//! browser, `?token=<token>` in the address (the page passes it on to its own requests).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use space_core::SpaceError;
use tokio::sync::watch;

use crate::observed::Observed;
use crate::picture::{self, Picture};

/// The admin page: one file, its script and styles inline.
const PAGE: &str = include_str!("../assets/admin.html");

/// Latency buckets of the operation histogram, in seconds (100 µs to 30 s).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Counts one answered request: its kind, whether it succeeded (the error's kind when
/// not), how long it took.
pub(crate) fn count_operation(operation: &'static str, error: Option<&SpaceError>, took: Duration) {
    let outcome = match error {
        None => "ok",
        Some(e) => {
            metrics::counter!("space_rejected_requests_total", "reason" => e.kind()).increment(1);
            "error"
        }
    };
    metrics::counter!("space_operations_total", "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("space_operation_duration_seconds", "operation" => operation)
        .record(took.as_secs_f64());
}

/// The process's Prometheus recorder, installed on first use.
fn recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            describe();
            // Histograms keep their samples until upkeep folds them in.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "space_operations_total",
        "Requests answered, by operation and outcome (ok or error)"
    );
    describe_histogram!(
        "space_operation_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its answer, by operation (blocking ones included)"
    );
    describe_gauge!("space_entries", "Entries stored, by entry type");
    describe_gauge!(
        "space_entry_bytes",
        Unit::Bytes,
        "Approximate bytes of stored entries, by entry type"
    );
    describe_gauge!(
        "space_waiters",
        "Blocked reads, takes and claims, by entry type"
    );
    describe_gauge!("space_subscriptions", "Live subscriptions");
    describe_gauge!("space_queued_events", "Events held for subscribers");
    describe_gauge!("space_connections", "Client connections open");
    describe_gauge!(
        "space_shards_led",
        "Shards this node leads (replicated nodes)"
    );
    describe_gauge!(
        "space_subscriber_lag_events",
        "The most events one subscription was told that its subscriber has not had yet"
    );
    describe_gauge!(
        "space_shard_last_log_index",
        "Index of the last entry in each shard's log on this node (replicated nodes)"
    );
    describe_gauge!(
        "space_shard_commit_index",
        "Index of the last entry of each shard this node knows committed (replicated nodes)"
    );
    describe_gauge!(
        "space_shard_applied_index",
        "Index of the last entry of each shard this node applied (replicated nodes)"
    );
    describe_gauge!(
        "space_shard_log_bytes",
        "Bytes of each shard's log entries this node keeps in memory from its purge point on (replicated nodes)"
    );
    describe_gauge!(
        "space_replication_lag_entries",
        "Entries of the leader's log a follower lacks, by shard and follower node id (reported by the shard's leader; 0 elsewhere)"
    );
    describe_gauge!(
        "space_snapshot_bytes",
        Unit::Bytes,
        "Size of the newest snapshot, by shard (\"all\" for a standalone durable node)"
    );
    describe_gauge!(
        "space_snapshot_created_timestamp_seconds",
        Unit::Seconds,
        "When the newest snapshot was made, in seconds since the Unix epoch, by shard; its age is time() minus this"
    );
    describe_histogram!(
        "space_log_fsync_seconds",
        Unit::Seconds,
        "Time to write and fdatasync one group commit of the write-ahead log"
    );
    describe_histogram!(
        "space_log_batch_bytes",
        Unit::Bytes,
        "Bytes made durable by one group commit"
    );
    describe_counter!(
        "space_events_delivered_total",
        "Notify events delivered to subscribers (pushed and acknowledged, or polled)"
    );
    describe_counter!(
        "space_event_gaps_total",
        "Gaps delivered to subscribers: events dropped for a subscriber that fell behind, or notices that events may have been missed (a shard's takeover)"
    );
    describe_counter!(
        "space_rejected_requests_total",
        "Requests answered with an error, by the error's kind (busy, full, not_found, wrong_node, query...)"
    );
    describe_counter!(
        "space_log_appends_total",
        "Records appended to the write-ahead log and made durable"
    );
    describe_counter!(
        "space_rejected_connections_total",
        "Connections refused at the handshake, by reason (token, version, protocol, connections, handshake, other_cluster, not_replicated, peers_only)"
    );
    describe_gauge!(
        "space_shard_term",
        "Each shard's Raft term as this node knows it (replicated nodes)"
    );
    describe_gauge!(
        "space_shard_leader",
        "Each shard's leader as this node knows it (its node id; 0: none known)"
    );
    describe_gauge!(
        "space_meta_group_leader",
        "The meta group's leader as this node knows it (its node id; 0: none known; replicated nodes)"
    );
    describe_gauge!(
        "space_meta_group_term",
        "The meta group's Raft term as this node knows it (replicated nodes)"
    );
    describe_gauge!(
        "space_layout_version",
        "The version of the cluster layout this node's replica of the meta group applied (0: none yet; replicated nodes)"
    );
}

struct Admin {
    state: Arc<dyn Observed>,
    handle: PrometheusHandle,
    /// Entry types reported at the last scrape: one gone since is reported as empty.
    types: Mutex<BTreeSet<String>>,
    /// (shard, follower) lags reported at the last scrape: one this node no longer leads
    /// is reported as 0 (its leader of the moment reports it).
    lags: Mutex<BTreeSet<(u32, u64)>>,
    /// The cluster's latest picture, drawn every second.
    picture: watch::Receiver<Arc<Picture>>,
}

/// Serves the admin endpoints on `listener` until the process ends.
///
/// # Errors
/// When the Prometheus recorder cannot be installed.
pub(crate) fn serve(listener: TcpListener, state: Arc<dyn Observed>) -> Result<(), String> {
    let admin = Arc::new(Admin {
        handle: recorder()?,
        types: Mutex::new(BTreeSet::new()),
        lags: Mutex::new(BTreeSet::new()),
        picture: picture::start(state.clone()),
        state,
    });
    let app = Router::new()
        .route("/", get(page))
        .route("/api/picture", get(current_picture))
        .route("/api/stream", get(stream))
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .layer(axum::middleware::from_fn_with_state(admin.clone(), guard))
        .with_state(admin);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the admin listener stopped");
        }
    });
    Ok(())
}

/// Lets through only requests with the node's token, when it has one (every endpoint).
async fn guard(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    match refused(&admin, request.headers(), request.uri().query()) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// Refuses a request without the node's token, when it has one: in the `Authorization`
/// header, or as `token=` in the query (for the page in a browser).
fn refused(admin: &Admin, headers: &HeaderMap, query: Option<&str>) -> Option<Response> {
    let expected = admin.state.token()?;
    let given: std::borrow::Cow<'_, [u8]> = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.as_bytes().into())
        .or_else(|| {
            // As a browser sends it: percent-encoded.
            let raw = query?
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))?;
            Some(percent_encoding::percent_decode_str(raw).into())
        })
        .unwrap_or_default();
    if bool::from(given.ct_eq(expected.as_bytes())) {
        None
    } else {
        tracing::warn!("refused an admin request without the node's token");
        Some((StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response())
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    if let Some(stats) = admin.state.stats().await {
        let mut gone = std::mem::take(&mut *admin.types.lock());
        for t in &stats.types {
            gone.remove(&t.entry_type);
            let entry_type = t.entry_type.clone();
            metrics::gauge!("space_entries", "entry_type" => entry_type.clone())
                .set(t.entries as f64);
            metrics::gauge!("space_entry_bytes", "entry_type" => entry_type.clone())
                .set(t.bytes as f64);
            metrics::gauge!("space_waiters", "entry_type" => entry_type).set(t.waiters as f64);
        }
        for entry_type in gone {
            metrics::gauge!("space_entries", "entry_type" => entry_type.clone()).set(0.0);
            metrics::gauge!("space_entry_bytes", "entry_type" => entry_type.clone()).set(0.0);
            metrics::gauge!("space_waiters", "entry_type" => entry_type).set(0.0);
        }
        *admin.types.lock() = stats.types.iter().map(|t| t.entry_type.clone()).collect();
        metrics::gauge!("space_subscriptions").set(stats.subscriptions as f64);
        metrics::gauge!("space_queued_events").set(stats.queued_events as f64);
        metrics::gauge!("space_connections").set(stats.connections as f64);
        metrics::gauge!("space_subscriber_lag_events").set(stats.subscriber_lag as f64);
    }
    report_progress(&admin);
    if let Some(meta) = admin.state.meta_group() {
        metrics::gauge!("space_meta_group_leader").set(meta.leader.map_or(0.0, |n| n.0 as f64));
        metrics::gauge!("space_meta_group_term").set(meta.term as f64);
        metrics::gauge!("space_layout_version").set(meta.layout_version as f64);
    }
    if let Some((shards, led)) = admin.state.shards() {
        metrics::gauge!("space_shards_led").set(led as f64);
        for s in shards {
            let shard = s.shard.to_string();
            metrics::gauge!("space_shard_term", "shard" => shard.clone()).set(s.term as f64);
            metrics::gauge!("space_shard_leader", "shard" => shard)
                .set(s.leader.map_or(0.0, |n| n.0 as f64));
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.handle.render(),
    )
        .into_response()
}

/// Each shard's log indexes, and each follower's lag on the shards this node leads.
fn report_progress(admin: &Admin) {
    let mut gone = std::mem::take(&mut *admin.lags.lock());
    let mut reported = BTreeSet::new();
    for p in admin.state.progress() {
        let shard = p.shard.to_string();
        metrics::gauge!("space_shard_last_log_index", "shard" => shard.clone())
            .set(p.last_log as f64);
        metrics::gauge!("space_shard_commit_index", "shard" => shard.clone())
            .set(p.committed as f64);
        metrics::gauge!("space_shard_applied_index", "shard" => shard.clone())
            .set(p.applied as f64);
        metrics::gauge!("space_shard_log_bytes", "shard" => shard.clone()).set(p.log_bytes as f64);
        for (follower, lag) in p.followers {
            gone.remove(&(p.shard, follower));
            reported.insert((p.shard, follower));
            metrics::gauge!("space_replication_lag_entries", "shard" => shard.clone(), "follower" => follower.to_string())
                .set(lag as f64);
        }
    }
    for (shard, follower) in gone {
        metrics::gauge!("space_replication_lag_entries", "shard" => shard.to_string(), "follower" => follower.to_string())
            .set(0.0);
    }
    *admin.lags.lock() = reported;
}

async fn live() -> Response {
    (StatusCode::OK, "live\n").into_response()
}

/// Ready: a standalone node always; a replicated one once its meta group has committed
/// the cluster's layout and every shard it replicates has a leader (see
/// `NodeState::unready`).
async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    match admin.state.unready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn page() -> Response {
    Html(PAGE).into_response()
}

/// The latest picture, as JSON.
async fn current_picture(State(admin): State<Arc<Admin>>) -> Response {
    let picture = admin.picture.borrow().clone();
    match serde_json::to_string(&*picture) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Each new picture as a server-sent event (`event: picture`, its JSON as data), the
/// current one first, until the viewer goes away.
async fn stream(State(admin): State<Arc<Admin>>) -> Response {
    let mut pictures = admin.picture.clone();
    pictures.mark_changed();
    let events = futures::stream::unfold(pictures, |mut pictures| async move {
        pictures.changed().await.ok()?;
        let picture = pictures.borrow_and_update().clone();
        let event = match serde_json::to_string(&*picture) {
            Ok(json) => Event::default().event("picture").data(json),
            Err(e) => Event::default().event("error").data(e.to_string()),
        };
        Some((Ok::<_, std::convert::Infallible>(event), pictures))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
