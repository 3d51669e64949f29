//! The one HTTP error type, rendered as `application/problem+json`
//! (RFC 9457).
//!
//! A handler returns `ApiError`; its `IntoResponse` sets the status and the
//! headers and leaves the problem in the response's extensions. The request
//! context middleware then writes the body, adding `instance` and
//! `request_id`, which only it knows. The same middleware turns any other
//! error response (axum's own 404/405, a body limit, a timeout) into a
//! problem, so no error ever leaves as plain text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::event_store::StoreError;
use crate::projection::NotCaughtUp;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One entry of a problem's `errors`: a bad field, or a bad item of a bulk
/// request (by `index`), or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ProblemItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub message: String,
}

impl From<events::FieldError> for ProblemItem {
    fn from(e: events::FieldError) -> Self {
        ProblemItem {
            field: Some(e.field),
            index: None,
            message: e.message,
        }
    }
}

/// An RFC 9457 problem document, as every error is answered.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem, e.g. `urn:ymera:problem:validation`.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request path.
    pub instance: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<ProblemItem>>,
}

/// What an error response carries to the middleware that writes its body.
#[derive(Debug, Clone)]
pub(crate) struct PendingProblem {
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: Option<Vec<ProblemItem>>,
}

/// Every way a request can fail, and how each is answered.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed JSON, a bad query parameter or path segment.
    #[error("{0}")]
    BadRequest(String),
    /// 401 with `WWW-Authenticate: Bearer`: missing, malformed, expired or
    /// forged token, or wrong credentials at login.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but the role may not do this.
    #[error("your role may not do this")]
    Forbidden,
    /// 404: unknown or deleted resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: a write conflict that retries could not resolve, or a state
    /// that forbids the request.
    #[error("{0}")]
    Conflict(String),
    /// 412: `If-Match` named a version that is no longer current.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413: the body is larger than the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but invalid; `errors` names each bad field or item.
    #[error("{detail}")]
    Validation {
        detail: String,
        errors: Vec<ProblemItem>,
    },
    /// 429 with `Retry-After`.
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    /// 503 with `Retry-After`: a dependency is unreachable, or the
    /// projection has not caught up in time.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug. The detail is logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A 422 with one bad field.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::invalid(vec![ProblemItem {
            field: Some(field.to_owned()),
            index: None,
            message: message.into(),
        }])
    }

    /// A 422 listing every bad field or item.
    pub fn invalid(errors: Vec<ProblemItem>) -> Self {
        ApiError::Validation {
            detail: "the request is not valid; see errors".into(),
            errors,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The problem `type` slug and title of a status, for errors that did not
/// come from an `ApiError`.
pub(crate) fn slug_and_title(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad-request", "Bad request"),
        401 => ("unauthorized", "Unauthorized"),
        403 => ("forbidden", "Forbidden"),
        404 => ("not-found", "Not found"),
        405 => ("method-not-allowed", "Method not allowed"),
        408 => ("timeout", "Request timeout"),
        409 => ("conflict", "Conflict"),
        412 => ("precondition-failed", "Precondition failed"),
        413 => ("payload-too-large", "Payload too large"),
        431 => ("headers-too-large", "Request header fields too large"),
        415 => ("unsupported-media-type", "Unsupported media type"),
        422 => ("validation", "Validation failed"),
        429 => ("rate-limited", "Too many requests"),
        503 => ("unavailable", "Service unavailable"),
        504 => ("timeout", "Gateway timeout"),
        s if s >= 500 => ("internal", "Internal server error"),
        _ => ("error", "Request failed"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (slug, title) = slug_and_title(status);
        let mut response = status.into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        let (detail, errors) = match self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                (
                    "an unexpected error occurred; it has been logged".to_owned(),
                    None,
                )
            }
            ApiError::Validation { detail, errors } => (detail, Some(errors)),
            other => (other.to_string(), None),
        };
        response.extensions_mut().insert(PendingProblem {
            slug,
            title,
            detail,
            errors,
        });
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::Conflict(
                "the resource was changed concurrently; retry the request".into(),
            ),
            StoreError::Unavailable(reason) => {
                tracing::warn!(%reason, "event store unavailable");
                ApiError::Unavailable("the event store is unavailable; retry shortly".into())
            }
            e @ (StoreError::Corrupt { .. } | StoreError::Misconfigured(_)) => {
                ApiError::Internal(e.into())
            }
        }
    }
}

impl From<NotCaughtUp> for ApiError {
    fn from(e: NotCaughtUp) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if matches!(e, sqlx::Error::PoolTimedOut) || crate::db::is_unavailable(&e) {
            ApiError::of_database(&e)
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl ApiError {
    /// How a database error is answered, from a reference: for an error
    /// that many requests share (one read answering a batch of them).
    pub fn of_database(e: &sqlx::Error) -> ApiError {
        if matches!(e, sqlx::Error::PoolTimedOut) {
            // Every connection busy (overload) or none can be opened (an
            // outage): the pool cannot tell which. Same 503 either way.
            tracing::warn!("no database connection could be had in time");
            ApiError::Unavailable(
                "no database connection could be had in time (the server is busy or the \
                 database is down); retry shortly"
                    .into(),
            )
        } else if crate::db::is_unavailable(e) {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::Unavailable("the database is unavailable; retry shortly".into())
        } else {
            ApiError::Internal(anyhow::anyhow!("database: {e}"))
        }
    }
}

impl From<events::agent::AgentError> for ApiError {
    fn from(e: events::agent::AgentError) -> Self {
        use events::agent::AgentError;
        match e {
            AgentError::NotFound => ApiError::NotFound("no such agent".into()),
            AgentError::AlreadyExists => ApiError::Conflict("the agent already exists".into()),
        }
    }
}

impl From<events::project::ProjectError> for ApiError {
    fn from(e: events::project::ProjectError) -> Self {
        use events::project::ProjectError;
        match e {
            ProjectError::NotFound => ApiError::NotFound("no such project".into()),
            ProjectError::AlreadyExists => ApiError::Conflict("the project already exists".into()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
