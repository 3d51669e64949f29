//! Process metrics: one Prometheus recorder behind the `metrics` facade, and
//! a few lightweight counters of our own for the JSON snapshot.
//!
//! This module records and reads back; it probes nothing, so the adapters
//! it measures can record here without a circle. The snapshot that adds the
//! system's figures (from NATS and PostgreSQL) to these is `http::snapshot`.
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
//! * `GET /api/v1/metrics` (viewer): the JSON snapshot of `api.md`. Its
//!   latency percentiles come from our own log-scale histogram (about ±10%).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets in seconds: 0.5 ms to 60 s.
const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0,
];

/// The process's metrics: the Prometheus handle and our own counters.
#[derive(Debug)]
pub struct Registry {
    started: Instant,
    handle: PrometheusHandle,
    http: HttpStats,
    appended: AtomicU64,
    applied: AtomicU64,
    live: AtomicI64,
    live_consumers: AtomicI64,
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
            live_consumers: AtomicI64::new(0),
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
        "Stream sequence up to which the projection has applied the log: the lowest of its partitions' checkpoints, read from PostgreSQL when scraped (the same in every role)"
    );
    describe_gauge!(
        "ymera_projector_lag_events",
        "Events in the stream after ymera_projector_checkpoint"
    );
    describe_gauge!(
        "ymera_projector_lag_seconds",
        "Age of the event at ymera_projector_checkpoint while the projection is behind; 0 when caught up"
    );
    describe_gauge!(
        "ymera_projector_partition_checkpoint",
        "Stream sequence each partition of the projection (label `partition`) has seen up to, its watermark, read from PostgreSQL when scraped (the same in every role)"
    );
    describe_gauge!(
        "ymera_projector_partition_lag_events",
        "Events in the stream after each partition's checkpoint (label `partition`)"
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
    describe_gauge!(
        "ymera_live_consumers",
        "JetStream consumers the live feed holds: its reader of the stream, and the replays in progress"
    );
    describe_counter!(
        "ymera_agent_reads_total",
        "Agents read by id (GET /agents/{id}) from the read model"
    );
    describe_counter!(
        "ymera_agent_read_batches_total",
        "Queries that read them: reads that arrive while earlier ones are under way share one, so reads / batches is the mean batch"
    );
    describe_gauge!("ymera_uptime_seconds", "Seconds since the process started");
    describe_gauge!(
        "ymera_projector_owner",
        "1 while this process owns the projection (label `projection`), 0 while it stands by"
    );
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

/// Records one served request. Every label is bounded, because each value
/// a label takes is a series kept for the life of the process, and these
/// come from unauthenticated requests: `method` is one of the standard
/// methods or `OTHER` ([`method_label`]), `route` the matched route
/// template (or `unmatched`), never the raw path, and `status` a code this
/// server answers with.
pub fn record_http(method: &str, route: &str, status: u16, elapsed: Duration) {
    let r = install();
    r.http.record(status, elapsed);
    let labels = [
        ("method", method_label(method).to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("ymera_http_requests_total", &labels).increment(1);
    metrics::histogram!("ymera_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
}

/// How a request method is labelled: itself when standard, else `OTHER`.
/// A client may send any token as a method (`curl -X M1`), and each one
/// would otherwise make a series of its own.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "OTHER",
    }
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
    /// `occurred_at` of each applied event, oldest first.
    pub occurred_at: &'a [DateTime<Utc>],
    pub committed_at: DateTime<Utc>,
}

/// Records a committed projector batch: what it applied and how long that
/// took. Where the projection stands is not recorded here but read from
/// PostgreSQL when scraped ([`record_read_time`],
/// [`record_partition_checkpoints`]): a process owns some of the
/// partitions, each at its own checkpoint, and its batches alone would
/// make one gauge jump from one partition's checkpoint to another's.
pub fn record_projector_batch(batch: &ProjectorBatch<'_>) {
    install()
        .applied
        .fetch_add(batch.applied as u64, Ordering::Relaxed);
    metrics::counter!("ymera_projector_events_applied_total").increment(batch.applied as u64);
    metrics::histogram!("ymera_projector_batch_duration_seconds")
        .record(batch.elapsed.as_secs_f64());
    let visible = metrics::histogram!("ymera_write_to_visible_seconds");
    for at in batch.occurred_at {
        visible.record(seconds_between(*at, batch.committed_at));
    }
}

/// Records one query that read `reads` agents by id together.
pub fn record_agent_read_batch(reads: usize) {
    install();
    metrics::counter!("ymera_agent_reads_total").increment(reads as u64);
    metrics::counter!("ymera_agent_read_batches_total").increment(1);
}

/// Records a committed batch of the search index: `events` read from the
/// log, up to `checkpoint`.
pub fn record_search_batch(events: u64, checkpoint: u64, elapsed: Duration) {
    install();
    metrics::counter!("ymera_search_events_indexed_total").increment(events);
    metrics::histogram!("ymera_search_batch_duration_seconds").record(elapsed.as_secs_f64());
    metrics::gauge!("ymera_search_checkpoint").set(checkpoint as f64);
}

/// The search index committed to disk at `checkpoint`: where a restart
/// resumes (searches see further, through the in-memory overlay).
pub fn record_search_commit(checkpoint: u64, elapsed: Duration) {
    install();
    metrics::histogram!("ymera_search_commit_duration_seconds").record(elapsed.as_secs_f64());
    metrics::gauge!("ymera_search_disk_checkpoint").set(checkpoint as f64);
}

/// What a search visits now: the disk index's segments, and the pieces of
/// the in-memory overlay (each a segment too). Every search walks each
/// one's term dictionaries, so the sum is what its cost grows with.
pub fn record_search_segments(disk: usize, memory: usize) {
    install();
    metrics::gauge!("ymera_search_segments", "kind" => "disk").set(disk as f64);
    metrics::gauge!("ymera_search_segments", "kind" => "memory").set(memory as f64);
}

/// The number of open live-feed connections.
pub fn live_connections() -> i64 {
    install().live.load(Ordering::Relaxed)
}

/// A live-feed client connected (`+1`) or went away (`-1`).
pub fn live_connection(delta: i64) {
    install().live.fetch_add(delta, Ordering::Relaxed);
}

/// Counts one JetStream consumer the live feed holds (its reader of the
/// stream, or a client's replay) while alive.
#[derive(Debug)]
pub struct LiveConsumer(());

impl LiveConsumer {
    pub fn open() -> LiveConsumer {
        install().live_consumers.fetch_add(1, Ordering::Relaxed);
        LiveConsumer(())
    }
}

impl Drop for LiveConsumer {
    fn drop(&mut self) {
        install().live_consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Seconds from `from` to `to`, 0 if `to` is earlier.
pub fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
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

/// This process's own figures, as recorded since it started.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub uptime: Duration,
    /// Requests answered.
    pub requests_total: u64,
    /// Requests being served now.
    pub in_flight: i64,
    /// Requests answered, by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Request latency percentiles in milliseconds: p50, p90 and p99.
    pub latency_ms: [f64; 3],
    /// Events appended.
    pub appended_total: u64,
    /// Events applied by this process's projector.
    pub applied_total: u64,
    /// Open live-feed connections.
    pub live_connections: i64,
    /// JetStream consumers the live feed holds.
    pub live_consumers: i64,
}

/// Reads this process's figures.
pub fn recorded() -> Recorded {
    let r = install();
    Recorded {
        uptime: r.started.elapsed(),
        requests_total: r.http.total.load(Ordering::Relaxed),
        in_flight: r.http.in_flight.load(Ordering::Relaxed),
        by_status: r
            .http
            .by_status
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default(),
        latency_ms: [0.50, 0.90, 0.99].map(|q| r.http.latency.quantile_ms(q)),
        appended_total: r.appended.load(Ordering::Relaxed),
        applied_total: r.applied.load(Ordering::Relaxed),
        live_connections: r.live.load(Ordering::Relaxed),
        live_consumers: r.live_consumers.load(Ordering::Relaxed),
    }
}

/// The gauges known only when the metrics are read: the system's figures,
/// probed from NATS and PostgreSQL (`None` when the dependency did not
/// answer; the gauge keeps its last value), and a few of this process's.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeGauges {
    pub uptime_seconds: f64,
    pub db_pool_connections: u32,
    pub db_pool_idle: u32,
    pub live_connections: i64,
    pub live_consumers: i64,
    pub stream_last_seq: Option<u64>,
    pub stream_messages: Option<u64>,
    pub stream_bytes: Option<u64>,
    pub projector_checkpoint: Option<u64>,
    pub projector_lag_events: Option<u64>,
    pub projector_lag_seconds: Option<f64>,
}

/// Brings the read-time gauges up to date.
pub fn record_read_time(g: &ReadTimeGauges) {
    use metrics::gauge;
    gauge!("ymera_uptime_seconds").set(g.uptime_seconds);
    gauge!("ymera_db_pool_connections").set(f64::from(g.db_pool_connections));
    gauge!("ymera_db_pool_idle").set(f64::from(g.db_pool_idle));
    gauge!("ymera_live_connections").set(g.live_connections as f64);
    gauge!("ymera_live_consumers").set(g.live_consumers as f64);
    if let Some(v) = g.stream_last_seq {
        gauge!("ymera_stream_last_seq").set(v as f64);
    }
    if let Some(v) = g.stream_messages {
        gauge!("ymera_stream_messages").set(v as f64);
    }
    if let Some(v) = g.stream_bytes {
        gauge!("ymera_stream_bytes").set(v as f64);
    }
    if let Some(v) = g.projector_checkpoint {
        gauge!("ymera_projector_checkpoint").set(v as f64);
    }
    if let Some(v) = g.projector_lag_events {
        gauge!("ymera_projector_lag_events").set(v as f64);
    }
    if let Some(v) = g.projector_lag_seconds {
        gauge!("ymera_projector_lag_seconds").set(v);
    }
}

/// Records each partition's checkpoint (`partitions`: name and checkpoint,
/// as `projection::partition_checkpoints_in` reads them) and, with the
/// stream's last sequence, how far behind it is. One series per partition
/// (label `partition`, `main` when the projection is whole or
/// `main:<i>/<P>`): at most `projection::MAX_PARTITIONS`, a bounded label
/// set.
pub fn record_partition_checkpoints(partitions: &[(String, u64)], last_seq: Option<u64>) {
    for (name, checkpoint) in partitions {
        let label = [("partition", name.clone())];
        metrics::gauge!("ymera_projector_partition_checkpoint", &label).set(*checkpoint as f64);
        if let Some(last) = last_seq {
            metrics::gauge!("ymera_projector_partition_lag_events", &label)
                .set(last.saturating_sub(*checkpoint) as f64);
        }
    }
}

/// Records whether this process's projector owns projection `name` (1) or
/// stands by (0). One series per projection (or, later, partition): a
/// bounded label set.
pub fn record_projector_owner(name: &str, owner: bool) {
    metrics::gauge!("ymera_projector_owner", "projection" => name.to_owned()).set(if owner {
        1.0
    } else {
        0.0
    });
}

/// Records how many events the projector has parked.
pub fn record_parked(events: u64) {
    metrics::gauge!("ymera_projector_parked_events").set(events as f64);
}

/// The Prometheus text exposition of everything recorded.
pub fn render() -> String {
    let r = install();
    r.handle.run_upkeep();
    r.handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_standard_methods_are_labelled_as_themselves() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("PATCH"), "PATCH");
        assert_eq!(method_label("M1"), "OTHER");
        assert_eq!(method_label("get"), "OTHER");
    }

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
