//! `GET /agents` and `GET /agents/{id}` from the read model.

use std::sync::LazyLock;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use infra::http::auth::Viewer;
use infra::http::{ApiError, ApiPath, Problem, QueryPairs};
use infra::views::{AgentView, Page};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::conditional::{ResourceHeaders, ResourceQuery, ResourceResponses, conditional};
use crate::filters::Filters;
use crate::paging::{CreatedCursor, PageParams, PageQuery, keyset_page, newest_first};
use crate::params::{Params, parse_time};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader};
use crate::rows::{AGENT_COLUMNS, agent_of};

/// `GET /agents/{id}`'s parameter: the past time to rebuild the agent at,
/// if any.
#[derive(Debug)]
pub struct AsOf(pub Option<DateTime<Utc>>);

impl Params for AsOf {
    fn parse(query: &QueryPairs) -> Result<AsOf, ApiError> {
        query.only(&["min_seq", "as_of"])?;
        Ok(AsOf(
            query.one("as_of")?.map(parse_time("as_of")).transpose()?,
        ))
    }
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
        ResourceQuery, ResourceHeaders,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AgentView, headers(("ETag" = String), ("X-Projection-Seq" = u64))),
        ResourceResponses, RequestProblems,
        (status = 503, description = "Projection behind or database down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_agent(
    State(state): State<QueryState>,
    _viewer: Viewer,
    ApiPath(id): ApiPath<Uuid>,
    Fresh(AsOf(as_of)): Fresh<AsOf>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (agent, seq) = match as_of {
        Some(at) => crate::history::agent_as_of(&state, id, at).await?,
        None => state.lookup.get(id).await?,
    };
    let Some(agent) = agent else {
        return Err(ApiError::NotFound(match as_of {
            Some(_) => "the agent did not exist at that time".into(),
            None => "no such agent".into(),
        }));
    };
    Ok(conditional(&headers, agent.version, Json(agent), seq))
}

/// One agent by id (`$1`) with the projection's checkpoint, from one
/// snapshot: a row with a null `id` when there is no such agent. The read
/// the endpoint would make for each request without batching
/// ([`crate::lookup`]): the benchmark's raw limit runs it.
pub static GET_AGENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT c.seq AS projection_seq, {AGENT_COLUMNS} FROM {} LEFT JOIN agents a ON a.id = $1",
        *CHECKPOINT
    )
});

/// `GET /agents`' parameters: the filters and the page.
#[derive(Debug)]
pub struct AgentList {
    pub filters: Filters,
    pub page: PageParams<CreatedCursor>,
}

impl AgentList {
    /// Every parameter the list takes; search takes them too.
    pub const PARAMS: [&'static str; 7] = [
        "status",
        "type",
        "project_id",
        "tag",
        "limit",
        "cursor",
        "min_seq",
    ];
}

impl Params for AgentList {
    fn parse(query: &QueryPairs) -> Result<AgentList, ApiError> {
        query.only(&AgentList::PARAMS)?;
        Ok(AgentList {
            filters: Filters::parse(query)?,
            page: PageParams::from_query(query)?,
        })
    }
}

/// List agents, newest first.
#[utoipa::path(get, path = "/agents", tag = "agents",
    params(Filters, PageQuery, MinSeq, MinSeqHeader),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<AgentView>, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
    ))]
pub async fn list_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    Fresh(list): Fresh<AgentList>,
) -> Result<Response, ApiError> {
    let mut qb = newest_first(AGENT_COLUMNS, "agents", "a", &list.page, |qb| {
        list.filters.push_where(qb)
    });
    let rows = qb.build().fetch_all(&state.pool).await?;
    keyset_page(&rows, list.page.limit, agent_of, |a| CreatedCursor {
        created_at: a.created_at,
        id: a.id,
    })
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(get_agent))
}
