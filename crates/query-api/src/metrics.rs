//! `GET /api/v1/metrics`: the process's figures as JSON, for dashboards
//! that do not speak Prometheus (the same figures are at the root
//! `/metrics` in Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use infra::http::auth::Viewer;
use infra::http::snapshot::Snapshot;
use infra::http::{ApiError, QueryPairs};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::QueryState;
use crate::problems::RequestProblems;
use crate::projection::{MinSeq, MinSeqHeader, await_min_seq, with_projection_seq};

/// A snapshot of this process's metrics.
///
/// Counters (`requests_total`, `appended_total`, `applied_total`) and
/// latency percentiles are this process's since it started; stream,
/// checkpoint and lag figures are the system's, and `null` while NATS or
/// PostgreSQL does not answer within a second. `lag_seconds` is 0 when the
/// projector has caught up, else the age of the last event it applied.
/// The Prometheus scrape at the root `/metrics` (no token) has the same
/// figures, with latency histograms by route and status.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    params(MinSeq, MinSeqHeader),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Snapshot, headers(("X-Projection-Seq" = u64))),
        RequestProblems,
    ))]
pub async fn metrics_json(
    State(state): State<QueryState>,
    _viewer: Viewer,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    query.only(&["min_seq"])?;
    await_min_seq(&state, &headers, &query).await?;
    let snapshot = infra::http::snapshot::take(&state.pool, &state.store).await;
    let seq = snapshot
        .projector
        .checkpoint_seq
        .unwrap_or_else(|| state.watch.current());
    Ok(with_projection_seq(Json(snapshot).into_response(), seq))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(metrics_json))
}
