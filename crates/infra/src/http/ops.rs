//! Operational endpoints every role serves without auth: `/health`,
//! `/livez`, `/readyz`, `/system/info`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::event_store::EventStore;
use crate::projection;

/// How long a probe waits for a dependency before calling it down (health)
/// or leaving a figure `null` (the metrics snapshot).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the operational endpoints look at.
#[derive(Debug, Clone)]
pub struct Ops {
    pub store: EventStore,
    pub pool: PgPool,
    /// `all`, `command`, `query` or `projector`.
    pub role: &'static str,
    /// The commit the binary was built from.
    pub git_sha: &'static str,
    pub started_at: DateTime<Utc>,
    pub degraded_lag_events: u64,
    /// Whether this process's projector owns the projection; `None` in a
    /// process that runs no projector.
    pub projector: Option<projection::Ownership>,
    /// What `/readyz` asks: only the dependencies this role cannot serve
    /// without.
    pub needs: Needs,
    /// Fires when the shutdown drain begins: `/readyz` answers 503 from
    /// then on.
    pub draining: CancellationToken,
    /// The checkpoint of this process's search index; `None` in a process
    /// that serves no reads.
    pub search: Option<projection::ProjectionWatch>,
}

/// The dependencies a role cannot serve without, which `/readyz` probes.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub nats: bool,
    pub postgres: bool,
}

pub type OpsState = Arc<Ops>;

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// `ok`, `degraded` or `down`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Projector only: the checkpoint, the stream's last sequence and the
    /// difference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_events: Option<u64>,
    /// Projector only: events it could not apply, waiting for
    /// `ymera parked retry`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_events: Option<u64>,
    /// Projector, in a process that runs one: `owner` while this process
    /// applies the events, `standby` while another one does (it takes over
    /// within seconds if the owner dies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<&'static str>,
    /// Projector, in a process that runs one: the partitions of the
    /// projection (by index, among `YMERA_PARTITIONS`) this process owns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
}

impl Check {
    fn up(latency: Duration) -> Self {
        Check {
            status: "ok",
            latency_ms: Some((latency.as_secs_f64() * 1e6).round() / 1e3),
            error: None,
            checkpoint_seq: None,
            last_seq: None,
            lag_events: None,
            parked_events: None,
            lease: None,
            partitions: None,
        }
    }

    fn down(error: impl std::fmt::Display) -> Self {
        Check {
            status: "down",
            latency_ms: None,
            error: Some(error.to_string()),
            checkpoint_seq: None,
            last_seq: None,
            lag_events: None,
            parked_events: None,
            lease: None,
            partitions: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `degraded` (projector lag past the threshold) or `unavailable`
    /// (NATS or PostgreSQL down).
    pub status: &'static str,
    pub version: &'static str,
    /// `nats`, `postgres` and `projector`, and `search` (the search index's
    /// checkpoint and lag) in a process that serves reads.
    pub checks: BTreeMap<&'static str, Check>,
}

/// Runs `f` for at most [`PROBE_TIMEOUT`]: its result, an error as text,
/// and how long it took.
pub(crate) async fn probe<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> (Result<T, String>, Duration) {
    let start = Instant::now();
    let result = match tokio::time::timeout(PROBE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    (result, start.elapsed())
}

impl Ops {
    /// Probes NATS and PostgreSQL concurrently, each bounded by a second.
    pub async fn health(&self) -> Health {
        let ((nats, nats_t), (pg, pg_t), (parked, _)) = tokio::join!(
            probe(self.store.last_seq()),
            probe(projection::checkpoint(&self.pool)),
            probe(projection::parked(&self.pool)),
        );
        let mut checks = BTreeMap::new();
        let mut status = "ok";
        let projector = match (&nats, &pg) {
            (Ok(last), Ok(checkpoint)) => {
                let lag = last.saturating_sub(*checkpoint);
                let parked = parked.unwrap_or(0);
                // Parked events need an operator: degraded until retried.
                let degraded = lag > self.degraded_lag_events || parked > 0;
                if degraded {
                    status = "degraded";
                }
                Check {
                    status: if degraded { "degraded" } else { "ok" },
                    checkpoint_seq: Some(*checkpoint),
                    last_seq: Some(*last),
                    lag_events: Some(lag),
                    parked_events: Some(parked),
                    ..Check::up(Duration::ZERO)
                }
            }
            _ => Check::down("needs both NATS and PostgreSQL"),
        };
        if let (Some(search), Ok(last)) = (&self.search, &nats) {
            // The search index follows the log by itself: its lag is
            // reported beside the projector's, and degrades like it.
            let checkpoint = search.current();
            let lag = last.saturating_sub(checkpoint);
            let degraded = lag > self.degraded_lag_events;
            if degraded {
                status = "degraded";
            }
            checks.insert(
                "search",
                Check {
                    status: if degraded { "degraded" } else { "ok" },
                    latency_ms: None,
                    checkpoint_seq: Some(checkpoint),
                    last_seq: Some(*last),
                    lag_events: Some(lag),
                    ..Check::up(Duration::ZERO)
                },
            );
        }
        checks.insert("nats", nats.map_or_else(Check::down, |_| Check::up(nats_t)));
        checks.insert("postgres", pg.map_or_else(Check::down, |_| Check::up(pg_t)));
        let lease = self
            .projector
            .as_ref()
            .map(|p| if p.is_owner() { "owner" } else { "standby" });
        checks.insert(
            "projector",
            Check {
                latency_ms: None,
                lease,
                partitions: self.projector.as_ref().map(projection::Ownership::owned),
                ..projector
            },
        );
        if checks["nats"].status == "down" || checks["postgres"].status == "down" {
            status = "unavailable";
        }
        Health {
            status,
            version: env!("CARGO_PKG_VERSION"),
            checks,
        }
    }
}

/// Health of this process and its dependencies.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses(
        (status = 200, description = "Up (`ok` or `degraded`)", body = Health),
        (status = 503, description = "NATS or PostgreSQL is down", body = Health),
    ))]
pub async fn health(State(ops): State<OpsState>) -> (StatusCode, Json<Health>) {
    let health = ops.health().await;
    let code = if health.status == "unavailable" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(health))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
    /// `/readyz` in a process that serves reads: how many events of the
    /// log its search index has yet to apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_lag_events: Option<u64>,
}

/// The process is alive. Never looks at dependencies.
#[utoipa::path(get, path = "/livez", tag = "ops", responses((status = 200, body = Status)))]
pub async fn livez() -> Json<Status> {
    Json(Status {
        status: "ok",
        search_lag_events: None,
    })
}

/// The process can serve.
///
/// `ready` when the dependencies its role cannot do without are reachable
/// and it is not shutting down; `unavailable` or `draining` (the shutdown
/// drain has begun) otherwise. A command API needs NATS (every write appends
/// to the log); a query API needs PostgreSQL (every read is served from the
/// read models); a projector, and a process playing every role, need both.
/// A process that serves reads also reports its search index's lag.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "`ready`", body = Status),
        (status = 503, description = "`unavailable` (a dependency the role needs is down) or `draining` (shutting down)", body = Status),
    ))]
pub async fn readyz(State(ops): State<OpsState>) -> (StatusCode, Json<Status>) {
    let unready = |status, search_lag_events| {
        let status = Status {
            status,
            search_lag_events,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(status))
    };
    if ops.draining.is_cancelled() {
        return unready("draining", None);
    }
    // The log's end is asked for when NATS is needed or the search index's
    // lag is to be reported; a query API that cannot reach it stays ready.
    let last_seq = async {
        if ops.needs.nats || ops.search.is_some() {
            Some(probe(ops.store.last_seq()).await.0)
        } else {
            None
        }
    };
    let postgres = async {
        if ops.needs.postgres {
            probe(projection::checkpoint(&ops.pool)).await.0.map(drop)
        } else {
            Ok(())
        }
    };
    let (last_seq, postgres) = tokio::join!(last_seq, postgres);
    let search_lag_events = match (&ops.search, &last_seq) {
        (Some(search), Some(Ok(last))) => Some(last.saturating_sub(search.current())),
        _ => None,
    };
    let nats_ok = !ops.needs.nats || matches!(last_seq, Some(Ok(_)));
    if nats_ok && postgres.is_ok() {
        let status = Status {
            status: "ready",
            search_lag_events,
        };
        (StatusCode::OK, Json(status))
    } else {
        unready("unavailable", search_lag_events)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SystemInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub git_sha: &'static str,
    pub role: &'static str,
    pub started_at: DateTime<Utc>,
    pub uptime_seconds: i64,
    pub stream: String,
    pub nats_server_version: String,
    /// `null` while PostgreSQL is unreachable.
    pub postgres_version: Option<String>,
}

/// What this process is and what it talks to.
#[utoipa::path(get, path = "/system/info", tag = "ops", responses((status = 200, body = SystemInfo)))]
pub async fn system_info(State(ops): State<OpsState>) -> Json<SystemInfo> {
    let (pg, _) =
        probe(sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(&ops.pool)).await;
    Json(SystemInfo {
        name: "ymera",
        version: env!("CARGO_PKG_VERSION"),
        git_sha: ops.git_sha,
        role: ops.role,
        started_at: ops.started_at,
        uptime_seconds: (Utc::now() - ops.started_at).num_seconds(),
        stream: ops.store.stream_name().to_owned(),
        nats_server_version: ops.store.server_version(),
        postgres_version: pg.ok(),
    })
}

/// The operational routes, at the root and under `/api/v1` alike.
pub fn router(ops: OpsState) -> OpenApiRouter {
    routes().with_state(ops)
}

/// The operational routes' part of the OpenAPI spec, relative to
/// `/api/v1`.
pub fn spec() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

fn routes() -> OpenApiRouter<OpsState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .routes(routes!(system_info))
}
