//! `POST/PUT/DELETE /projects`: the same rules as agents.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use events::fields::{Description, Name};
use events::project::{ProjectChanges, ProjectCreated, ProjectState};
use infra::auth::Editor;
use infra::http::{ApiError, ApiJson, ApiPath, Problem, RequestId, X_EVENT_SEQ, etag};
use infra::views::ProjectView;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::CommandState;
use crate::agents::{Verdicts, deleted_response, if_match, invalid, write_context};
use crate::service::Committed;

/// The body of `POST /projects`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    /// 1..=200 characters after trimming. Required.
    #[schema(schema_with = infra::http::schema::name, required = true)]
    pub name: Option<String>,
    /// At most 4,000 characters; default "".
    #[schema(schema_with = infra::http::schema::description)]
    pub description: Option<String>,
}

/// The body of `PUT /projects/{id}`: `name` and/or `description`. The
/// read-only fields of a project are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateProjectRequest {
    #[schema(schema_with = infra::http::schema::name)]
    pub name: Option<String>,
    #[schema(schema_with = infra::http::schema::description)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(ignore)]
    pub id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub agent_count: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub created_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub created_by: Option<serde::de::IgnoredAny>,
}

/// A written project as a response. `agent_count` comes from the read
/// model, which may not have applied the very latest writes.
async fn project_response(
    state: &CommandState,
    status: StatusCode,
    written: &Committed<ProjectState>,
) -> Result<Response, ApiError> {
    let ProjectState::Live(project) = &written.state else {
        return Err(ApiError::NotFound("no such project".into()));
    };
    let agent_count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id = $1")
        .bind(project.id)
        .fetch_one(&state.pool)
        .await?;
    let view = ProjectView::new(project, agent_count.max(0) as u64);
    let mut response = (status, Json(view)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(project.version));
    headers.insert(X_EVENT_SEQ.clone(), HeaderValue::from(written.seq));
    Ok(response)
}

/// Create a project.
#[utoipa::path(post, path = "/projects", tag = "projects",
    request_body = CreateProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = ProjectView, headers(("Location" = String), ("ETag" = String), ("X-Event-Seq" = u64))),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_project(
    State(state): State<CommandState>,
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateProjectRequest>,
) -> Result<Response, ApiError> {
    let mut v = Verdicts::default();
    let name = v
        .required("name", body.name)
        .and_then(|n| v.check(Name::parse("name", &n)));
    let description = match body.description {
        Some(d) => v.check(Description::parse(&d)),
        None => Some(Description::empty()),
    };
    let (Some(name), Some(description), true) = (name, description, v.0.is_empty()) else {
        return Err(invalid(v.0));
    };
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state
        .commands
        .create_project(&ctx, ProjectCreated { name, description })
        .await?;
    let mut response = project_response(&state, StatusCode::CREATED, &written).await?;
    if let ProjectState::Live(p) = &written.state
        && let Ok(v) = HeaderValue::from_str(&format!("/api/v1/projects/{}", p.id))
    {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Update a project.
#[utoipa::path(put, path = "/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#)),
    request_body = UpdateProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, body = ProjectView, headers(("ETag" = String), ("X-Event-Seq" = u64))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_project(
    State(state): State<CommandState>,
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateProjectRequest>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let mut v = Verdicts::default();
    let changes = ProjectChanges {
        name: v.optional(body.name, |n| Name::parse("name", &n)),
        description: v.optional(body.description, |d| Description::parse(&d)),
    };
    if !v.0.is_empty() {
        return Err(invalid(v.0));
    }
    if changes == ProjectChanges::default() {
        return Err(ApiError::invalid_field(
            "body",
            "give at least one of name, description",
        ));
    }
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state
        .commands
        .update_project(&ctx, id, expected, changes)
        .await?;
    project_response(&state, StatusCode::OK, &written).await
}

/// Delete a project. Its agents live on, detached (`project_id: null`):
/// each gets an `agent.updated` event, so the log tells the whole story.
#[utoipa::path(delete, path = "/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; its agents detached", headers(("X-Event-Seq" = u64))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_project(
    State(state): State<CommandState>,
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let seq = state.commands.delete_project(&ctx, id, expected).await?;
    Ok(deleted_response(seq))
}

pub fn router() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(create_project))
        .routes(routes!(update_project, delete_project))
}
