//! `GET /projects` and `GET /projects/{id}` from the read model, each with
//! `agent_count`: the live agents in the project, counted in the same
//! statement (and so the same snapshot) as the project and the checkpoint.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use infra::http::auth::Viewer;
use infra::http::{ApiError, ApiPath};
use infra::views::{Page, ProjectView};
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::conditional::{ResourceHeaders, ResourceQuery, ResourceResponses, conditional};
use crate::paging::{CreatedCursor, PageParams, PageQuery, keyset_page, newest_first};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader, projection_seq};

const PROJECT_COLUMNS: &str = "p.id, p.name, p.description, p.version, p.created_at, \
     p.updated_at, p.created_by, \
     (SELECT count(*) FROM agents ag WHERE ag.project_id = p.id) AS agent_count";

/// The project of a row from a LEFT JOIN: `None` when it found nothing.
fn project_of(row: &PgRow) -> Result<Option<ProjectView>, sqlx::Error> {
    let Some(id) = row.try_get::<Option<Uuid>, _>("id")? else {
        return Ok(None);
    };
    Ok(Some(ProjectView {
        id,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        agent_count: row.try_get::<i64, _>("agent_count")?.max(0) as u64,
        version: row.try_get::<i64, _>("version")?.max(0) as u64,
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
        updated_at: row.try_get("updated_at")?,
        created_by: row.try_get("created_by")?,
    }))
}

/// Get one project.
#[utoipa::path(get, path = "/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path), ResourceQuery, ResourceHeaders),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ProjectView, headers(("ETag" = String), ("X-Projection-Seq" = u64))),
        ResourceResponses, RequestProblems, Unavailable,
    ))]
pub async fn get_project(
    State(state): State<QueryState>,
    _viewer: Viewer,
    ApiPath(id): ApiPath<Uuid>,
    _: Fresh<()>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let sql = format!(
        "SELECT c.seq AS projection_seq, {PROJECT_COLUMNS} FROM {} \
         LEFT JOIN projects p ON p.id = $1",
        *CHECKPOINT
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&state.pool)
        .await?;
    let seq = projection_seq(&row)?;
    let project = project_of(&row)?.ok_or_else(|| ApiError::NotFound("no such project".into()))?;
    Ok(conditional(&headers, project.version, Json(project), seq))
}

/// List projects, newest first.
#[utoipa::path(get, path = "/projects", tag = "projects",
    params(PageQuery, MinSeq, MinSeqHeader),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<ProjectView>, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
    ))]
pub async fn list_projects(
    State(state): State<QueryState>,
    _viewer: Viewer,
    Fresh(page): Fresh<PageParams<CreatedCursor>>,
) -> Result<Response, ApiError> {
    let mut qb = newest_first(PROJECT_COLUMNS, "projects", "p", &page, |_| {});
    qb.push(" ORDER BY p.created_at DESC, p.id DESC");
    let rows = qb.build().fetch_all(&state.pool).await?;
    keyset_page(&rows, page.limit, project_of, |p| CreatedCursor {
        created_at: p.created_at,
        id: p.id,
    })
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_projects))
        .routes(routes!(get_project))
}
