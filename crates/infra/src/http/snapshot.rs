//! The metrics snapshot: this process's recorded figures (from
//! [`crate::metrics`]) together with the system's, probed from NATS and
//! PostgreSQL when they are read. `GET /api/v1/metrics` answers it as JSON;
//! the Prometheus scrape at `/metrics` renders the same figures, with the
//! read-time gauges brought up to date first.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use super::ops::probe;
use crate::db;
use crate::event_store::EventStore;
use crate::metrics::{self, ReadTimeGauges};
use crate::projection;

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
    /// JetStream consumers the live feed holds: its reader of the stream
    /// (while any client is connected, and for 30 s after the last), and
    /// one per replay in progress.
    pub consumers: i64,
}

/// Gathers the snapshot (NATS and PostgreSQL probed concurrently, a second
/// at most each) and brings the read-time gauges up to date.
pub async fn take(pool: &PgPool, store: &EventStore) -> Snapshot {
    let ((stream, _), (checkpoint, _)) = tokio::join!(
        probe(store.stream_state()),
        probe(projection::checkpoint_with_time(pool))
    );
    let (stream, checkpoint) = (stream.ok(), checkpoint.ok());
    let checkpoint_seq = checkpoint.map(|(seq, _)| seq);
    let last_seq = stream.map(|s| s.last_sequence);
    let lag_events = match (last_seq, checkpoint_seq) {
        (Some(last), Some(cp)) => Some(last.saturating_sub(cp)),
        _ => None,
    };
    let r = metrics::recorded();
    let lag_seconds = match (lag_events, checkpoint) {
        (Some(0), _) => Some(0.0),
        (Some(_), Some((_, Some(at)))) => Some(metrics::seconds_between(at, Utc::now())),
        // Behind, and nothing applied yet: as old as the process knows.
        (Some(_), Some((_, None))) => Some(r.uptime.as_secs_f64()),
        _ => None,
    };
    let [p50, p90, p99] = r.latency_ms;
    let snap = Snapshot {
        uptime_seconds: (r.uptime.as_secs_f64() * 1e3).round() / 1e3,
        http: HttpSnapshot {
            requests_total: r.requests_total,
            in_flight: r.in_flight,
            by_status: r
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            latency_ms: Percentiles { p50, p90, p99 },
        },
        events: EventsSnapshot {
            last_seq,
            stream_messages: stream.map(|s| s.messages),
            stream_bytes: stream.map(|s| s.bytes),
            appended_total: r.appended_total,
        },
        projector: ProjectorSnapshot {
            checkpoint_seq,
            lag_events,
            lag_seconds,
            applied_total: r.applied_total,
        },
        db_pool: DbPoolSnapshot {
            size: pool.size(),
            idle: pool.num_idle() as u32,
        },
        live: LiveSnapshot {
            connections: r.live_connections,
            consumers: r.live_consumers,
        },
    };
    metrics::record_read_time(&ReadTimeGauges {
        uptime_seconds: snap.uptime_seconds,
        db_pool_connections: snap.db_pool.size,
        db_pool_idle: snap.db_pool.idle,
        live_connections: snap.live.connections,
        live_consumers: snap.live.consumers,
        stream_last_seq: snap.events.last_seq,
        stream_messages: snap.events.stream_messages,
        stream_bytes: snap.events.stream_bytes,
        projector_checkpoint: snap.projector.checkpoint_seq,
        projector_lag_events: snap.projector.lag_events,
        projector_lag_seconds: snap.projector.lag_seconds,
    });
    snap
}

/// The Prometheus text exposition, with the read-time gauges fresh.
pub async fn prometheus(pool: &PgPool, store: &EventStore) -> String {
    let snap = take(pool, store).await;
    let partitions = async {
        let mut conn = pool.acquire().await?;
        projection::partition_checkpoints_in(&mut conn, db::READ_SCHEMA).await
    };
    let ((parked, _), (partitions, _)) =
        tokio::join!(probe(projection::parked(pool)), probe(partitions));
    if let Ok(parked) = parked {
        metrics::record_parked(parked);
    }
    if let Ok(partitions) = partitions {
        metrics::record_partition_checkpoints(&partitions, snap.events.last_seq);
    }
    metrics::render()
}
