//! `POST/PUT/DELETE /projects`: the same rules as agents.

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use events::fields::{Description, Name};
use events::project::{ProjectChanges, ProjectCreated, ProjectState};
use events::{AggregateType, FieldError};
use infra::http::{ApiError, ApiJson, ApiPath, Problem};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::CommandState;
use crate::error::{TargetProblems, WriteError};
use crate::service::Committed;
use crate::update_body::update_body;
use crate::verdicts::{Verdicts, invalid};
use crate::write_request::{IfMatch, WriteRequest};
use crate::write_response::{self, Written};

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

impl CreateProjectRequest {
    /// Parses into the domain's validated types, or lists every bad field.
    pub fn parse(self) -> Result<ProjectCreated, Vec<FieldError>> {
        let mut v = Verdicts::default();
        let name = v.required("name", self.name, |n| Name::parse("name", &n));
        let description = v.defaulted(self.description, Description::empty, |d| {
            Description::parse(&d)
        });
        v.created(|| {
            Some(ProjectCreated {
                name: name?,
                description: description?,
            })
        })
    }
}

update_body! {
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
}
read_only: id, agent_count, version, created_at, updated_at, created_by
}

impl UpdateProjectRequest {
    /// Parses into the changes asked for, or lists every bad field.
    pub fn parse(self) -> Result<ProjectChanges, Vec<FieldError>> {
        let mut v = Verdicts::default();
        let changes = ProjectChanges {
            name: v.optional(self.name, |n| Name::parse("name", &n)),
            description: v.optional(self.description, |d| Description::parse(&d)),
        };
        v.changes(changes, "name, description")
    }
}

/// A project as a write left it: what the write model knows, from the log
/// alone. Unlike a read (`ProjectView`) it has no `agent_count`: agents name
/// their project, not the other way round, so only the read model counts
/// them, and a write's answer never waits for or depends on it. Read the
/// project (with `X-Min-Event-Seq`) for its count.
#[derive(Debug, Serialize, ToSchema)]
pub struct WrittenProject {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
}

/// A written project as its endpoint answers it. The service returns only
/// live projects from a create or an update.
fn written(committed: &Committed<ProjectState>) -> Result<Written<WrittenProject>, WriteError> {
    let ProjectState::Live(project) = &committed.state else {
        return Err(WriteError::NotFound(AggregateType::Project));
    };
    Ok(Written {
        id: project.id,
        view: WrittenProject {
            id: project.id,
            name: project.name.to_string(),
            description: project.description.to_string(),
            version: project.version,
            created_at: project.created_at,
            updated_at: project.updated_at,
            created_by: project.created_by.clone(),
        },
        version: project.version,
        seq: committed.seq,
    })
}

/// Create a project.
#[utoipa::path(post, path = "/projects", tag = "projects",
    request_body = CreateProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; without `agent_count`, which only a read gives", body = WrittenProject, headers(("Location" = String), ("ETag" = String), ("X-Event-Seq" = u64))),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_project(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiJson(body): ApiJson<CreateProjectRequest>,
) -> Result<Response, ApiError> {
    let created = body.parse().map_err(invalid)?;
    let project = state.commands.create_project(&write.ctx, created).await?;
    Ok(written(&project)?.created("/api/v1/projects"))
}

/// Update a project.
#[utoipa::path(put, path = "/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path), IfMatch),
    request_body = UpdateProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The project after the update; without `agent_count`, which only a read gives", body = WrittenProject, headers(("ETag" = String), ("X-Event-Seq" = u64))),
        TargetProblems,
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_project(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateProjectRequest>,
) -> Result<Response, ApiError> {
    let expected = write.if_match();
    let changes = body.parse().map_err(invalid)?;
    let project = state
        .commands
        .update_project(&write.ctx, id.into(), expected.as_deref(), changes)
        .await?;
    Ok(written(&project)?.updated())
}

/// Delete a project. Its agents live on, detached (`project_id: null`):
/// each gets an `agent.updated` event, so the log tells the whole story.
#[utoipa::path(delete, path = "/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path), IfMatch),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; its agents detached", headers(("X-Event-Seq" = u64))),
        TargetProblems,
    ))]
pub async fn delete_project(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let expected = write.if_match();
    let seq = state
        .commands
        .delete_project(&write.ctx, id.into(), expected.as_deref())
        .await?;
    Ok(write_response::deleted(seq))
}

pub fn router() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(create_project))
        .routes(routes!(update_project, delete_project))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_fields_are_ignored_and_others_refused() {
        let body: UpdateProjectRequest = serde_json::from_value(serde_json::json!({
            "id": "x", "agent_count": 3, "version": 1, "created_at": null,
            "updated_at": 0, "created_by": [], "description": "d"
        }))
        .unwrap();
        assert_eq!(body.parse().unwrap().description.unwrap().as_str(), "d");
        let refused = serde_json::from_value::<UpdateProjectRequest>(serde_json::json!({"x": 1}))
            .unwrap_err()
            .to_string();
        assert!(refused.contains(
            "expected one of `name`, `description`, `id`, `agent_count`, `version`, \
             `created_at`, `updated_at`, `created_by`"
        ));
    }

    #[test]
    fn an_update_that_changes_nothing_is_refused() {
        let body: UpdateProjectRequest =
            serde_json::from_value(serde_json::json!({"version": 1})).unwrap();
        let errors = body.parse().unwrap_err();
        assert_eq!(errors[0].field, "body");
        assert_eq!(errors[0].message, "give at least one of name, description");
    }
}
