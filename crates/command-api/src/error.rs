//! How a write can fail, in the write model's own terms, and the one place
//! where that becomes an HTTP problem.
//!
//! The repository and the service return `WriteError`; only handlers and
//! middleware deal in `ApiError`. The `From` at the bottom is the edge: it
//! decides each variant's status, and the client sees the variant's text as
//! the problem's `detail` (except where a variant says otherwise). The
//! statuses a write to an existing resource documents are listed here too,
//! next to the mapping that gives them.

use events::AggregateType;
use events::agent::AgentError;
use events::project::ProjectError;
use infra::StoreError;
use infra::http::{ApiError, Problem, ProblemItem};
use utoipa::IntoResponses;

/// Every way a command can fail.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The aggregate does not exist, or was deleted. 404.
    #[error("no such {}", .0.as_str())]
    NotFound(AggregateType),
    /// A create met an aggregate that already exists. 409.
    #[error("the {} already exists", .0.as_str())]
    AlreadyExists(AggregateType),
    /// Other writers kept changing the aggregate between our read and our
    /// append, every time it was decided again. 409; the client retries.
    #[error("the resource kept changing concurrently; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// `If-Match` named no strong tag of the current version. 412.
    #[error("If-Match does not name the current version, {current}")]
    PreconditionFailed { current: u64 },
    /// The command names what does not exist (an agent joining a missing
    /// project). 422 listing each bad field, and each bad item of a bulk
    /// command.
    #[error("the command is not valid")]
    Invalid(Vec<BadField>),
    /// The event store refused an append as stale (409), could not be
    /// reached (503), or holds an event that cannot be read (500, logged):
    /// answered as every store error is.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One thing wrong with a command: the field and, in a bulk command, the
/// index of the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadField {
    pub field: &'static str,
    pub index: Option<usize>,
    pub message: &'static str,
}

impl BadField {
    /// `project_id` names a project that does not exist (or was deleted).
    pub fn no_such_project(index: Option<usize>) -> Self {
        BadField {
            field: "project_id",
            index,
            message: "no such project",
        }
    }
}

impl From<AgentError> for WriteError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::NotFound => WriteError::NotFound(AggregateType::Agent),
            AgentError::AlreadyExists => WriteError::AlreadyExists(AggregateType::Agent),
        }
    }
}

impl From<ProjectError> for WriteError {
    fn from(e: ProjectError) -> Self {
        match e {
            ProjectError::NotFound => WriteError::NotFound(AggregateType::Project),
            ProjectError::AlreadyExists => WriteError::AlreadyExists(AggregateType::Project),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotFound(_) => ApiError::NotFound(e.to_string()),
            WriteError::AlreadyExists(_) | WriteError::Conflict { .. } => {
                ApiError::Conflict(e.to_string())
            }
            WriteError::PreconditionFailed { .. } => ApiError::PreconditionFailed(e.to_string()),
            WriteError::Invalid(fields) => ApiError::invalid(
                fields
                    .into_iter()
                    .map(|f| ProblemItem {
                        field: Some(f.field.to_owned()),
                        index: f.index,
                        message: f.message.to_owned(),
                    })
                    .collect(),
            ),
            WriteError::Store(e) => e.into(),
        }
    }
}

/// The problems of a write to one existing resource, as its OpenAPI entry
/// lists them, bare: [`WriteError::NotFound`] (404) and
/// [`WriteError::PreconditionFailed`] (412). A variant's doc comment would
/// be its description; an endpoint with more to say about one lists that
/// status after this set, which replaces it.
#[derive(Debug, IntoResponses)]
pub enum TargetProblems {
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    #[response(status = 412, content_type = "application/problem+json")]
    PreconditionFailed(Problem),
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn answer(e: WriteError) -> (StatusCode, String) {
        let e = ApiError::from(e);
        (e.status(), e.to_string())
    }

    #[test]
    fn each_outcome_keeps_its_status_and_detail() {
        assert_eq!(
            answer(WriteError::NotFound(AggregateType::Agent)),
            (StatusCode::NOT_FOUND, "no such agent".into())
        );
        assert_eq!(
            answer(ProjectError::AlreadyExists.into()),
            (StatusCode::CONFLICT, "the project already exists".into())
        );
        assert_eq!(
            answer(WriteError::Conflict { attempts: 10 }),
            (
                StatusCode::CONFLICT,
                "the resource kept changing concurrently; gave up after 10 attempts".into()
            )
        );
        assert_eq!(
            answer(WriteError::PreconditionFailed { current: 4 }),
            (
                StatusCode::PRECONDITION_FAILED,
                "If-Match does not name the current version, 4".into()
            )
        );
    }

    #[test]
    fn invalid_commands_list_each_bad_item() {
        let ApiError::Validation { detail, errors } =
            WriteError::Invalid(vec![BadField::no_such_project(Some(2))]).into()
        else {
            panic!("not a 422");
        };
        assert_eq!(detail, "the request is not valid; see errors");
        assert_eq!(
            errors,
            [ProblemItem {
                field: Some("project_id".into()),
                index: Some(2),
                message: "no such project".into(),
            }]
        );
    }
}
