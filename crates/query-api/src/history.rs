//! An agent's past: `GET /agents/{id}/history` and `GET /agents/{id}?as_of=`.
//!
//! Both read the projected `events` table, which the projector fills in the
//! same transaction as the read models, so they agree with every other read
//! at the same `X-Projection-Seq`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use events::agent::{AgentEvent, AgentState, evolve};
use events::envelope::EventCodec;
use events::{AggregateType, Envelope};
use infra::auth::Viewer;
use infra::http::{ApiError, ApiPath, Problem, QueryPairs};
use infra::views::{AgentView, Page};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::QueryState;
use crate::agents::{CHECKPOINT, await_min_seq, parse_limit, projection_seq, with_projection_seq};

/// One event in an agent's history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HistoryItem {
    /// The event's stream sequence.
    pub seq: u64,
    /// `agent.created`, `agent.updated` (the changed fields only) or
    /// `agent.deleted`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The agent's version after this event.
    pub version: u64,
    pub occurred_at: DateTime<Utc>,
    /// Who caused it.
    pub actor: String,
    /// The HTTP request that caused it.
    pub request_id: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// The columns of `events` an envelope is rebuilt from.
const EVENT_COLUMNS: &str = "e.seq, e.event_id, e.event_type, e.schema_version, e.aggregate_id, \
     e.aggregate_version, e.occurred_at, e.actor, e.request_id, e.data";

fn envelope_of(row: &PgRow) -> Result<Envelope, sqlx::Error> {
    Ok(Envelope {
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get::<i32, _>("schema_version")?.max(0) as u32,
        aggregate_type: AggregateType::Agent,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_version: row.try_get::<i64, _>("aggregate_version")?.max(0) as u64,
        occurred_at: row.try_get("occurred_at")?,
        actor: row.try_get("actor")?,
        request_id: row.try_get("request_id")?,
        data: row.try_get("data")?,
    })
}

/// The agent as it was at `at`, folded from its events with the domain's
/// `evolve`, and the projection sequence the events were read at. `None`
/// when it did not exist then, or had been deleted.
pub(crate) async fn agent_as_of(
    state: &QueryState,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<(Option<AgentView>, u64), ApiError> {
    let sql = format!(
        "SELECT c.seq AS projection_seq, {EVENT_COLUMNS} FROM {CHECKPOINT} \
         LEFT JOIN events e ON e.aggregate_id = $1 AND e.aggregate_type = 'agent' \
           AND e.occurred_at <= $2 \
         ORDER BY e.seq"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(at)
        .fetch_all(&state.pool)
        .await?;
    let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
    let mut agent = AgentState::Absent;
    for row in &rows {
        if row.try_get::<Option<i64>, _>("seq")?.is_none() {
            continue; // the LEFT JOIN found no event
        }
        let envelope = envelope_of(row)?;
        let recorded = AgentEvent::recorded(&envelope).map_err(|e| {
            ApiError::Internal(anyhow::anyhow!("stored event cannot be decoded: {e}"))
        })?;
        agent = evolve(agent, &recorded);
    }
    Ok((agent.live().map(AgentView::from), seq))
}

fn encode_seq_cursor(seq: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("h:{seq}"))
}

fn decode_seq_cursor(s: &str) -> Result<u64, ApiError> {
    let bad = || ApiError::BadRequest("the cursor is not valid".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    raw.strip_prefix("h:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)
}

/// An agent's events, oldest first.
///
/// Paginated like every list (`limit` 1..=500, default 50, and the opaque
/// `next_cursor`). A deleted agent still has its history; an id that never
/// had an event is 404.
#[utoipa::path(get, path = "/agents/{id}/history", tag = "agents",
    params(
        ("id" = Uuid, Path),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1..=500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("min_seq" = Option<u64>, Query),
        ("X-Min-Event-Seq" = Option<u64>, Header, nullable = false),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<HistoryItem>, headers(("X-Projection-Seq" = u64))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No agent with this id ever existed", body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn agent_history(
    State(state): State<QueryState>,
    _viewer: Viewer,
    ApiPath(id): ApiPath<Uuid>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    query.only(&["limit", "cursor", "min_seq"])?;
    let limit = parse_limit(&query)?;
    let after = query
        .one("cursor")?
        .map(decode_seq_cursor)
        .transpose()?
        .unwrap_or(0);
    await_min_seq(&state, &headers, &query).await?;

    let sql = format!(
        "SELECT c.seq AS projection_seq, \
           EXISTS (SELECT 1 FROM events WHERE aggregate_id = $1 AND aggregate_type = 'agent' \
                   AND seq <= c.seq) AS known, \
           e.seq, e.event_type, e.aggregate_version, e.occurred_at, e.actor, e.request_id, e.data \
         FROM {CHECKPOINT} \
         LEFT JOIN LATERAL (SELECT * FROM events WHERE aggregate_id = $1 AND aggregate_type = 'agent' \
                            AND seq > $2 ORDER BY seq LIMIT $3) e ON true \
         ORDER BY e.seq"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(after as i64)
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
    let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
    let known = match rows.first() {
        Some(row) => row.try_get::<bool, _>("known")?,
        None => false,
    };
    if !known {
        return Err(ApiError::NotFound("no such agent".into()));
    }
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(event_seq) = row.try_get::<Option<i64>, _>("seq")? else {
            continue;
        };
        items.push(HistoryItem {
            seq: event_seq.max(0) as u64,
            event_type: row.try_get("event_type")?,
            version: row.try_get::<i64, _>("aggregate_version")?.max(0) as u64,
            occurred_at: row.try_get("occurred_at")?,
            actor: row.try_get("actor")?,
            request_id: row.try_get("request_id")?,
            data: row.try_get("data")?,
        });
    }
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|i| encode_seq_cursor(i.seq))
    } else {
        None
    };
    Ok(with_projection_seq(
        Json(Page { items, next_cursor }).into_response(),
        seq,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_cursors_round_trip() {
        assert_eq!(decode_seq_cursor(&encode_seq_cursor(42)).unwrap(), 42);
        assert!(decode_seq_cursor("garbage!").is_err());
        assert!(decode_seq_cursor(&encode_seq_cursor(1)[1..]).is_err());
    }
}
