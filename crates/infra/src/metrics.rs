//! Process metrics: one Prometheus recorder behind the `metrics` facade, and
//! a few lightweight counters of our own for the JSON snapshot.
//!
//! Everything is per process. The recorder is installed once (a global
//! `OnceLock`), so several apps started in one test process share it and a
//! second [`install`] is harmless. Code that records a figure calls the
//! functions here, never the `metrics` macros directly, so names and labels
//! stay in one place.
//!
//! Two views of the same figures:
//! * `GET /metrics` (root, no auth): Prometheus text exposition, with
//!   histograms for request latency (by route and status), append latency,
//!   projector batch time and write-to-visible latency;
//! * `GET /api/v1/metrics` (viewer): the JSON [`Snapshot`] of `api.md`. Its
//!   latency percentiles come from our own log-scale histogram (about ±10%).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::event_store::EventStore;

/// Histogram buckets in seconds: 0.5 ms to 60 s.
const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0,
];

/// How long the snapshot waits for NATS or PostgreSQL before leaving a
/// figure `null`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The process's metrics: the Prometheus handle and our own counters.
#[derive(Debug)]
pub struct Registry {
    started: Instant,
    handle: PrometheusHandle,
    http: HttpStats,
    appended: AtomicU64,
    applied: AtomicU64,
    live: AtomicI64,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The process-wide registry, installing the recorder on first use.
pub fn install() -> &'static Registry {
    REGISTRY.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; Prometheus figures may be incomplete"
            );
        }
        describe();
        Registry {
            started: Instant::now(),
            handle,
            http: HttpStats::default(),
            appended: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            live: AtomicI64::new(0),
        }
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "ymera_http_requests_total",
        "HTTP requests served, by method, route and status"
    );
    describe_histogram!(
        "ymera_http_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head, by method, route and status"
    );
    describe_gauge!(
        "ymera_http_requests_in_flight",
        "HTTP requests being served"
    );
    describe_counter!(
        "ymera_events_appended_total",
        "Events appended to JetStream by this process"
    );
    describe_histogram!(
        "ymera_event_append_duration_seconds",
        Unit::Seconds,
        "Time from publish to JetStream ack"
    );
    describe_counter!(
        "ymera_projector_events_applied_total",
        "Events applied by this process's projector"
    );
    describe_histogram!(
        "ymera_projector_batch_duration_seconds",
        Unit::Seconds,
        "Time to apply and commit one projector batch"
    );
    describe_gauge!(
        "ymera_projector_checkpoint",
        "Stream sequence of the last applied event"
    );
    describe_gauge!(
        "ymera_projector_lag_events",
        "Events in the stream not yet applied"
    );
    describe_gauge!(
        "ymera_projector_lag_seconds",
        "Age of the last applied event while the projector is behind; 0 when caught up"
    );
    describe_histogram!(
        "ymera_write_to_visible_seconds",
        Unit::Seconds,
        "From an event's occurred_at to the commit that makes it visible to reads"
    );
    describe_gauge!(
        "ymera_stream_last_seq",
        "Sequence of the last event in the stream"
    );
    describe_gauge!("ymera_stream_messages", "Messages in the stream");
    describe_gauge!("ymera_stream_bytes", "Bytes in the stream");
    describe_gauge!(
        "ymera_db_pool_connections",
        "Open PostgreSQL connections of the pool"
    );
    describe_gauge!(
        "ymera_db_pool_idle",
        "Idle PostgreSQL connections of the pool"
    );
    describe_gauge!(
        "ymera_live_connections",
        "Open live-feed connections (WebSocket and SSE)"
    );
    describe_gauge!("ymera_uptime_seconds", "Seconds since the process started");
    describe_gauge!(
        "ymera_projector_parked_events",
        "Events the projector could not apply, parked for `ymera parked retry`"
    );
}

/// Drains histogram samples every few seconds, so memory stays bounded
/// even when nobody scrapes. Stops with `shutdown`.
pub fn spawn_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let registry = install();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => registry.handle.run_upkeep(),
            }
        }
    });
}

/// Counts one in-flight request while alive; dropped when the response is
/// ready or the request is abandoned.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> InFlight {
        let r = install();
        let now = r.http.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("ymera_http_requests_in_flight").set(now as f64);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let r = install();
        let now = r.http.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("ymera_http_requests_in_flight").set(now as f64);
    }
}

/// Records one served request. `route` is the matched route template
/// (bounded cardinality), never the raw path.
pub fn record_http(method: &str, route: &str, status: u16, elapsed: Duration) {
    let r = install();
    r.http.record(status, elapsed);
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("ymera_http_requests_total", &labels).increment(1);
    metrics::histogram!("ymera_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
}

/// Records one acknowledged append that was started at `started`.
pub fn record_append(started: Instant) {
    install().appended.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("ymera_events_appended_total").increment(1);
    metrics::histogram!("ymera_event_append_duration_seconds")
        .record(started.elapsed().as_secs_f64());
}

/// What one committed projector batch did.
#[derive(Debug)]
pub struct ProjectorBatch<'a> {
    /// Events applied (not counting skipped redeliveries).
    pub applied: usize,
    pub elapsed: Duration,
    pub checkpoint: u64,
    /// Messages still pending for the consumer after the batch.
    pub lag_events: u64,
    /// `occurred_at` of each applied event, oldest first.
    pub occurred_at: &'a [DateTime<Utc>],
    pub committed_at: DateTime<Utc>,
}

/// Records a committed projector batch.
pub fn record_projector_batch(batch: &ProjectorBatch<'_>) {
    install()
        .applied
        .fetch_add(batch.applied as u64, Ordering::Relaxed);
    metrics::counter!("ymera_projector_events_applied_total").increment(batch.applied as u64);
    metrics::histogram!("ymera_projector_batch_duration_seconds")
        .record(batch.elapsed.as_secs_f64());
    metrics::gauge!("ymera_projector_checkpoint").set(batch.checkpoint as f64);
    metrics::gauge!("ymera_projector_lag_events").set(batch.lag_events as f64);
    let visible = metrics::histogram!("ymera_write_to_visible_seconds");
    for at in batch.occurred_at {
        visible.record(seconds_between(*at, batch.committed_at));
    }
    let lag_seconds = match batch.occurred_at.last() {
        Some(last) if batch.lag_events > 0 => seconds_between(*last, Utc::now()),
        _ => 0.0,
    };
    metrics::gauge!("ymera_projector_lag_seconds").set(lag_seconds);
}

/// The number of open live-feed connections.
pub fn live_connections() -> i64 {
    install().live.load(Ordering::Relaxed)
}

/// A live-feed client connected (`+1`) or went away (`-1`).
pub fn live_connection(delta: i64) {
    install().live.fetch_add(delta, Ordering::Relaxed);
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
}

/// Request counts and a latency histogram for the JSON snapshot.
#[derive(Debug)]
struct HttpStats {
    total: AtomicU64,
    in_flight: AtomicI64,
    by_status: Mutex<BTreeMap<u16, u64>>,
    latency: LogHistogram,
}

impl Default for HttpStats {
    fn default() -> Self {
        HttpStats {
            total: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            by_status: Mutex::new(BTreeMap::new()),
            latency: LogHistogram::new(),
        }
    }
}

impl HttpStats {
    fn record(&self, status: u16, elapsed: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
        self.latency.record(elapsed);
    }
}

/// A lock-free histogram of durations in buckets a quarter of a power of two
/// wide (about ±9%), from 1 µs to more than an hour. Percentiles are
/// answered with the bucket's geometric middle.
#[derive(Debug)]
struct LogHistogram {
    buckets: Vec<AtomicU64>,
}

const LOG_BUCKETS: usize = 4 * 32;

impl LogHistogram {
    fn new() -> Self {
        LogHistogram {
            buckets: (0..LOG_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(d: Duration) -> usize {
        let micros = d.as_micros().max(1) as f64;
        ((micros.log2() * 4.0).floor() as usize).min(LOG_BUCKETS - 1)
    }

    fn record(&self, d: Duration) {
        self.buckets[Self::index(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q`-quantile in milliseconds; 0 when nothing was recorded.
    fn quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let micros = 2f64.powf((i as f64 + 0.5) / 4.0);
                return (micros / 1e3 * 1000.0).round() / 1000.0;
            }
        }
        0.0
    }
}

/// `GET /api/v1/metrics`: the figures `api.md` lists. Figures that need
/// NATS or PostgreSQL are `null` while that dependency is unreachable.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Snapshot {
    pub uptime_seconds: f64,
    pub http: HttpSnapshot,
    pub events: EventsSnapshot,
    pub projector: ProjectorSnapshot,
    pub db_pool: DbPoolSnapshot,
    pub live: LiveSnapshot,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HttpSnapshot {
    /// Requests answered by this process since it started.
    pub requests_total: u64,
    /// Requests being served now (this one included).
    pub in_flight: i64,
    /// Requests by status code.
    pub by_status: BTreeMap<String, u64>,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventsSnapshot {
    /// Sequence of the last event in the stream.
    pub last_seq: Option<u64>,
    pub stream_messages: Option<u64>,
    pub stream_bytes: Option<u64>,
    /// Events appended by this process since it started.
    pub appended_total: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectorSnapshot {
    /// Sequence of the last event applied to the read models.
    pub checkpoint_seq: Option<u64>,
    /// Events in the stream not yet applied.
    pub lag_events: Option<u64>,
    /// 0 when caught up; else how old the last applied event is.
    pub lag_seconds: Option<f64>,
    /// Events applied by this process's projector since it started (0 in
    /// a process that does not run the projector).
    pub applied_total: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DbPoolSnapshot {
    pub size: u32,
    pub idle: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LiveSnapshot {
    /// Open live-feed connections.
    pub connections: i64,
}

async fn bounded<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
    tokio::time::timeout(PROBE_TIMEOUT, f).await.ok()?.ok()
}

/// Gathers the snapshot (NATS and PostgreSQL probed concurrently, a second
/// at most each) and brings the scrape-time gauges up to date.
pub async fn snapshot(pool: &PgPool, store: &EventStore) -> Snapshot {
    let r = install();
    let checkpoint_query = sqlx::query_as::<_, (i64, Option<DateTime<Utc>>)>(
        "SELECT c.last_seq, e.occurred_at FROM projector_checkpoint c \
         LEFT JOIN events e ON e.seq = c.last_seq WHERE c.name = $1",
    )
    .bind(crate::projection::MAIN)
    .fetch_optional(pool);
    let (stream, checkpoint) =
        tokio::join!(bounded(store.stream_state()), bounded(checkpoint_query));
    let checkpoint = checkpoint.map(|row| row.unwrap_or((0, None)));
    let checkpoint_seq = checkpoint.map(|(seq, _)| seq.max(0) as u64);
    let last_seq = stream.as_ref().map(|s| s.last_sequence);
    let lag_events = match (last_seq, checkpoint_seq) {
        (Some(last), Some(cp)) => Some(last.saturating_sub(cp)),
        _ => None,
    };
    let lag_seconds = match (lag_events, checkpoint) {
        (Some(0), _) => Some(0.0),
        (Some(_), Some((_, Some(at)))) => Some(seconds_between(at, Utc::now())),
        // Behind, and nothing applied yet: as old as the process knows.
        (Some(_), Some((_, None))) => Some(r.started.elapsed().as_secs_f64()),
        _ => None,
    };
    let by_status = r
        .http
        .by_status
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        .unwrap_or_default();
    let snap = Snapshot {
        uptime_seconds: (r.started.elapsed().as_secs_f64() * 1e3).round() / 1e3,
        http: HttpSnapshot {
            requests_total: r.http.total.load(Ordering::Relaxed),
            in_flight: r.http.in_flight.load(Ordering::Relaxed),
            by_status,
            latency_ms: Percentiles {
                p50: r.http.latency.quantile_ms(0.50),
                p90: r.http.latency.quantile_ms(0.90),
                p99: r.http.latency.quantile_ms(0.99),
            },
        },
        events: EventsSnapshot {
            last_seq,
            stream_messages: stream.as_ref().map(|s| s.messages),
            stream_bytes: stream.as_ref().map(|s| s.bytes),
            appended_total: r.appended.load(Ordering::Relaxed),
        },
        projector: ProjectorSnapshot {
            checkpoint_seq,
            lag_events,
            lag_seconds,
            applied_total: r.applied.load(Ordering::Relaxed),
        },
        db_pool: DbPoolSnapshot {
            size: pool.size(),
            idle: pool.num_idle() as u32,
        },
        live: LiveSnapshot {
            connections: r.live.load(Ordering::Relaxed),
        },
    };
    set_gauges(&snap);
    snap
}

fn set_gauges(s: &Snapshot) {
    use metrics::gauge;
    gauge!("ymera_uptime_seconds").set(s.uptime_seconds);
    gauge!("ymera_db_pool_connections").set(f64::from(s.db_pool.size));
    gauge!("ymera_db_pool_idle").set(f64::from(s.db_pool.idle));
    gauge!("ymera_live_connections").set(s.live.connections as f64);
    if let Some(v) = s.events.last_seq {
        gauge!("ymera_stream_last_seq").set(v as f64);
    }
    if let Some(v) = s.events.stream_messages {
        gauge!("ymera_stream_messages").set(v as f64);
    }
    if let Some(v) = s.events.stream_bytes {
        gauge!("ymera_stream_bytes").set(v as f64);
    }
    if let Some(v) = s.projector.checkpoint_seq {
        gauge!("ymera_projector_checkpoint").set(v as f64);
    }
    if let Some(v) = s.projector.lag_events {
        gauge!("ymera_projector_lag_events").set(v as f64);
    }
    if let Some(v) = s.projector.lag_seconds {
        gauge!("ymera_projector_lag_seconds").set(v);
    }
}

/// The Prometheus text exposition, with the scrape-time gauges fresh.
pub async fn render(pool: &PgPool, store: &EventStore) -> String {
    snapshot(pool, store).await;
    if let Some(parked) = bounded(crate::projection::parked(pool)).await {
        metrics::gauge!("ymera_projector_parked_events").set(parked as f64);
    }
    let r = install();
    r.handle.run_upkeep();
    r.handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_bucket() {
        let h = LogHistogram::new();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5);
        let p99 = h.quantile_ms(0.99);
        assert!((45.0..=56.0).contains(&p50), "p50 {p50}");
        assert!((90.0..=110.0).contains(&p99), "p99 {p99}");
        assert_eq!(LogHistogram::new().quantile_ms(0.5), 0.0);
    }
}
