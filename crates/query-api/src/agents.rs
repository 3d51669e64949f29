//! `GET /agents` and `GET /agents/{id}` from the read model.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use events::fields::{AgentStatus, AgentType};
use infra::auth::Viewer;
use infra::http::{ApiError, ApiPath, Problem, QueryPairs, X_PROJECTION_SEQ, etag, min_seq};
use infra::views::{AgentView, Page};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Postgres, QueryBuilder, Row};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;

/// An `agents` row.
#[derive(Debug, FromRow)]
pub(crate) struct AgentRow {
    id: Uuid,
    name: String,
    #[sqlx(rename = "type")]
    agent_type: String,
    description: String,
    status: String,
    capabilities: Vec<String>,
    config: serde_json::Value,
    tags: sqlx::types::Json<BTreeMap<String, String>>,
    project_id: Option<Uuid>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    created_by: String,
}

impl From<AgentRow> for AgentView {
    fn from(r: AgentRow) -> Self {
        AgentView {
            id: r.id,
            name: r.name,
            agent_type: r.agent_type,
            description: r.description,
            status: r.status,
            capabilities: r.capabilities,
            config: r.config,
            tags: r.tags.0,
            project_id: r.project_id,
            version: r.version.max(0) as u64,
            created_at: r.created_at,
            updated_at: r.updated_at,
            created_by: r.created_by,
        }
    }
}

pub(crate) const AGENT_COLUMNS: &str = "a.id, a.name, a.type, a.description, a.status, a.capabilities, a.config, \
     a.tags, a.project_id, a.version, a.created_at, a.updated_at, a.created_by";

/// The checkpoint as one row, to join the data against so both come from
/// one snapshot.
pub(crate) const CHECKPOINT: &str = "(SELECT COALESCE((SELECT last_seq FROM projector_checkpoint WHERE name = 'main'), 0) AS seq) c";

/// Reads the agent columns of a row that came from a LEFT JOIN: `None` when
/// the join found nothing.
pub(crate) fn agent_of(row: &PgRow) -> Result<Option<AgentView>, sqlx::Error> {
    let id: Option<Uuid> = row.try_get("id")?;
    if id.is_none() {
        return Ok(None);
    }
    Ok(Some(AgentRow::from_row(row)?.into()))
}

pub(crate) fn projection_seq(row: &PgRow) -> Result<u64, sqlx::Error> {
    Ok(row.try_get::<i64, _>("projection_seq")?.max(0) as u64)
}

/// Honour `X-Min-Event-Seq` / `?min_seq=` before reading.
pub(crate) async fn await_min_seq(
    state: &QueryState,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<(), ApiError> {
    if let Some(seq) = min_seq(headers, query)? {
        if seq > state.watch.current() {
            // A sequence past the end of the log can never be reached:
            // say so at once instead of waiting out the timeout.
            let end = state.store.last_seq().await?;
            if seq > end {
                return Err(ApiError::BadRequest(format!(
                    "min_seq {seq} is beyond the end of the log ({end})"
                )));
            }
        }
        state.watch.wait_for(seq, state.http.min_seq_wait()).await?;
    }
    Ok(())
}

pub(crate) fn with_projection_seq(mut response: Response, seq: u64) -> Response {
    response
        .headers_mut()
        .insert(X_PROJECTION_SEQ.clone(), HeaderValue::from(seq));
    response
}

/// Get one agent, as it is now or (with `as_of`) as it was at a past time.
///
/// With `as_of`, the agent is rebuilt by folding its events up to that time
/// with the same `evolve` the write side uses; 404 when it did not exist
/// then or had been deleted by then. A `+` in the offset must be sent as
/// `%2B` (a literal `+` is read back as one for convenience); `Z` needs no
/// escaping.
#[utoipa::path(get, path = "/agents/{id}", tag = "agents",
    params(
        ("id" = Uuid, Path),
        ("as_of" = Option<String>, Query, format = DateTime, description = "RFC 3339 time: the agent as it was then, rebuilt from its events"),
        ("min_seq" = Option<u64>, Query, description = "Answer only once the projection has applied this event"),
        ("X-Min-Event-Seq" = Option<u64>, Header, nullable = false, description = "Same as min_seq"),
        ("If-None-Match" = Option<String>, Header, nullable = false, description = "304 when the ETag matches"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AgentView, headers(("ETag" = String), ("X-Projection-Seq" = u64))),
        (status = 304, description = "Not modified"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or deleted", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Projection behind or database down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_agent(
    State(state): State<QueryState>,
    _viewer: Viewer,
    ApiPath(id): ApiPath<Uuid>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    query.only(&["min_seq", "as_of"])?;
    let as_of = query.one("as_of")?.map(parse_time("as_of")).transpose()?;
    await_min_seq(&state, &headers, &query).await?;
    let (agent, seq) = match as_of {
        Some(at) => crate::history::agent_as_of(&state, id, at).await?,
        None => {
            let sql = format!(
                "SELECT c.seq AS projection_seq, {AGENT_COLUMNS} FROM {CHECKPOINT} LEFT JOIN agents a ON a.id = $1"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_one(&state.pool)
                .await?;
            (agent_of(&row)?, projection_seq(&row)?)
        }
    };
    let Some(agent) = agent else {
        return Err(ApiError::NotFound(match as_of {
            Some(_) => "the agent did not exist at that time".into(),
            None => "no such agent".into(),
        }));
    };
    Ok(conditional(&headers, etag(agent.version), Json(agent), seq))
}

/// A single-resource answer with its `ETag`, or 304 when `If-None-Match`
/// names it.
pub(crate) fn conditional(
    headers: &HeaderMap,
    tag: HeaderValue,
    body: impl IntoResponse,
    seq: u64,
) -> Response {
    let not_modified = headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == tag.as_bytes() || t.trim_ascii() == b"*")
    });
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    response.headers_mut().insert(header::ETAG, tag);
    with_projection_seq(response, seq)
}

/// Parses an RFC 3339 time from a query parameter. A `+` decoded to a
/// space by form decoding is taken back as `+`.
pub(crate) fn parse_time(name: &'static str) -> impl Fn(&str) -> Result<DateTime<Utc>, ApiError> {
    move |raw| {
        DateTime::parse_from_rfc3339(raw)
            .or_else(|_| DateTime::parse_from_rfc3339(&raw.replace(' ', "+")))
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "query parameter {name:?} must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"
                ))
            })
    }
}

/// The filters shared by list, search and export.
#[derive(Debug, Default)]
pub struct Filters {
    pub status: Option<AgentStatus>,
    pub agent_type: Option<AgentType>,
    pub project_id: Option<Uuid>,
    pub tags: serde_json::Map<String, serde_json::Value>,
}

impl Filters {
    pub const PARAMS: [&'static str; 4] = ["status", "type", "project_id", "tag"];

    pub fn parse(q: &QueryPairs) -> Result<Filters, ApiError> {
        let bad = |name: &str, e: events::FieldError| {
            ApiError::BadRequest(format!("query parameter {name:?}: {}", e.message))
        };
        let status = q
            .one("status")?
            .map(AgentStatus::parse)
            .transpose()
            .map_err(|e| bad("status", e))?;
        let agent_type = q
            .one("type")?
            .map(AgentType::parse)
            .transpose()
            .map_err(|e| bad("type", e))?;
        let project_id = q.parse::<Uuid>("project_id")?;
        let mut tags = serde_json::Map::new();
        for tag in q.all("tag") {
            let (k, v) = tag
                .split_once(':')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("tag filter {tag:?} must be key:value"))
                })?;
            // PostgreSQL text and jsonb cannot hold NUL: refuse it here
            // rather than fail in the database.
            if tag.contains('\0') {
                return Err(ApiError::BadRequest(
                    "tag filters must not contain NUL".into(),
                ));
            }
            tags.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
        }
        Ok(Filters {
            status,
            agent_type,
            project_id,
            tags,
        })
    }

    /// Appends `AND ...` for each filter; every value is a bound parameter.
    pub fn push_where(&self, qb: &mut QueryBuilder<Postgres>) {
        if let Some(s) = self.status {
            qb.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = &self.agent_type {
            qb.push(" AND type = ").push_bind(t.as_str().to_owned());
        }
        if let Some(p) = self.project_id {
            qb.push(" AND project_id = ").push_bind(p);
        }
        if !self.tags.is_empty() {
            qb.push(" AND tags @> ")
                .push_bind(serde_json::Value::Object(self.tags.clone()));
        }
    }
}

/// The position after the last item of a page: opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        opaque_encode(&format!(
            "{}:{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    pub fn decode(s: &str) -> Result<Cursor, ApiError> {
        let bad = bad_cursor;
        let raw = opaque_decode(s)?;
        let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
        let created_at =
            DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
        Ok(Cursor {
            created_at,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

/// A cursor's 400.
pub(crate) fn bad_cursor() -> ApiError {
    ApiError::BadRequest("the cursor is not valid".into())
}

/// Cursors are opaque to clients: their text, base64url-encoded.
pub(crate) fn opaque_encode(raw: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The text inside an opaque cursor; 400 when it is not one of ours.
pub(crate) fn opaque_decode(s: &str) -> Result<String, ApiError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad_cursor())?;
    String::from_utf8(raw).map_err(|_| bad_cursor())
}

/// `limit`: 1..=500, default 50.
pub fn parse_limit(q: &QueryPairs) -> Result<i64, ApiError> {
    match q.parse::<i64>("limit")? {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        )),
    }
}

/// List agents, newest first.
#[utoipa::path(get, path = "/agents", tag = "agents",
    params(
        ("status" = inline(Option<infra::http::schema::AgentStatusName>), Query),
        ("type" = Option<String>, Query, pattern = "^[a-z0-9_-]{1,64}$"),
        ("project_id" = Option<Uuid>, Query),
        ("tag" = inline(Option<Vec<infra::http::schema::TagFilter>>), Query, description = "key:value; repeat for several (all must match)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1..=500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("min_seq" = Option<u64>, Query),
        ("X-Min-Event-Seq" = Option<u64>, Header, nullable = false),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<AgentView>, headers(("X-Projection-Seq" = u64))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    query.only(&[
        "status",
        "type",
        "project_id",
        "tag",
        "limit",
        "cursor",
        "min_seq",
    ])?;
    let filters = Filters::parse(&query)?;
    let limit = parse_limit(&query)?;
    let cursor = query.one("cursor")?.map(Cursor::decode).transpose()?;
    await_min_seq(&state, &headers, &query).await?;

    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "SELECT c.seq AS projection_seq, {AGENT_COLUMNS} FROM {CHECKPOINT} \
         LEFT JOIN LATERAL (SELECT * FROM agents WHERE true"
    ));
    filters.push_where(&mut qb);
    if let Some(c) = cursor {
        qb.push(" AND (created_at, id) < (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(c.id)
            .push(")");
    }
    qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit + 1);
    qb.push(") a ON true");
    let rows = qb.build().fetch_all(&state.pool).await?;
    keyset_page(&rows, limit, agent_of, |a| Cursor {
        created_at: a.created_at,
        id: a.id,
    })
}

/// A newest-first page from rows fetched with `LIMIT limit + 1` and joined
/// to the checkpoint: the items, the cursor after the last one when there
/// is more, and `X-Projection-Seq`.
pub(crate) fn keyset_page<T: serde::Serialize>(
    rows: &[PgRow],
    limit: i64,
    item_of: impl Fn(&PgRow) -> Result<Option<T>, sqlx::Error>,
    cursor_of: impl Fn(&T) -> Cursor,
) -> Result<Response, ApiError> {
    let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(item) = item_of(row)? {
            items.push(item);
        }
    }
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|item| cursor_of(item).encode())
    } else {
        None
    };
    Ok(with_projection_seq(
        Json(Page { items, next_cursor }).into_response(),
        seq,
    ))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(get_agent))
        .routes(routes!(crate::search::search_agents))
        .routes(routes!(crate::history::agent_history))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode("not a cursor").is_err());
        assert!(Cursor::decode("bm9wZQ").is_err());
    }
}
