//! An agent's past: `GET /agents/{id}/history` and `GET /agents/{id}?as_of=`.
//!
//! Both read the projected `events` table, which the projector fills in the
//! same transaction as the read models, so they agree with every other read
//! at the same `X-Projection-Seq`.

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use events::agent::{AgentEvent, AgentState, evolve};
use events::envelope::EventCodec;
use events::{AggregateType, Envelope};
use infra::http::auth::Viewer;
use infra::http::{ApiError, ApiPath, Problem};
use infra::views::{AgentView, Page};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::paging::{Cursor, PageParams, PageQuery, keyset_page};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader, projection_seq};

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
        "SELECT c.seq AS projection_seq, {EVENT_COLUMNS} FROM {} \
         LEFT JOIN events e ON e.aggregate_id = $1 AND e.aggregate_type = 'agent' \
           AND e.occurred_at <= $2 \
         ORDER BY e.seq",
        *CHECKPOINT
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

/// The position in an agent's history: the sequence of the last event
/// sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqCursor(pub u64);

impl Cursor for SeqCursor {
    fn to_text(&self) -> String {
        format!("h:{}", self.0)
    }

    fn from_text(text: &str) -> Option<SeqCursor> {
        text.strip_prefix("h:")?.parse().ok().map(SeqCursor)
    }
}

/// The history item of a row from the history statement; `None` for the
/// row of a join that found no event.
fn item_of(row: &PgRow) -> Result<Option<HistoryItem>, sqlx::Error> {
    let Some(seq) = row.try_get::<Option<i64>, _>("seq")? else {
        return Ok(None);
    };
    let event = envelope_of(row)?;
    Ok(Some(HistoryItem {
        seq: seq.max(0) as u64,
        event_type: event.event_type,
        version: event.aggregate_version,
        occurred_at: event.occurred_at,
        actor: event.actor,
        request_id: event.request_id,
        data: event.data,
    }))
}

/// An agent's events, oldest first.
///
/// Paginated like every list (`limit` 1..=500, default 50, and the opaque
/// `next_cursor`). A deleted agent still has its history; an id that never
/// had an event is 404.
#[utoipa::path(get, path = "/agents/{id}/history", tag = "agents",
    params(("id" = Uuid, Path), PageQuery, MinSeq, MinSeqHeader),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<HistoryItem>, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
        (status = 404, description = "No agent with this id ever existed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn agent_history(
    State(state): State<QueryState>,
    _viewer: Viewer,
    ApiPath(id): ApiPath<Uuid>,
    Fresh(page): Fresh<PageParams<SeqCursor>>,
) -> Result<Response, ApiError> {
    let after = page.cursor.map_or(0, |c| c.0);
    let sql = format!(
        "SELECT c.seq AS projection_seq, \
           EXISTS (SELECT 1 FROM events WHERE aggregate_id = $1 AND aggregate_type = 'agent' \
                   AND seq <= c.seq) AS known, \
           {EVENT_COLUMNS} \
         FROM {} \
         LEFT JOIN LATERAL (SELECT * FROM events WHERE aggregate_id = $1 AND aggregate_type = 'agent' \
                            AND seq > $2 ORDER BY seq LIMIT $3) e ON true \
         ORDER BY e.seq",
        *CHECKPOINT
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(after as i64)
        .bind(page.limit + 1)
        .fetch_all(&state.pool)
        .await?;
    let known = match rows.first() {
        Some(row) => row.try_get::<bool, _>("known")?,
        None => false,
    };
    if !known {
        return Err(ApiError::NotFound("no such agent".into()));
    }
    keyset_page(&rows, page.limit, item_of, |i| SeqCursor(i.seq))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(agent_history))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_cursors_round_trip() {
        assert_eq!(
            SeqCursor::decode(&SeqCursor(42).encode()).unwrap(),
            SeqCursor(42)
        );
        assert!(SeqCursor::decode("garbage!").is_err());
        assert!(SeqCursor::decode(&SeqCursor(1).encode()[1..]).is_err());
    }
}
