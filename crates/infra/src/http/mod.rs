//! HTTP plumbing shared by the APIs: the error type, our extractors, the
//! request context middleware, the edge layers, the shutdown drain, the
//! operational endpoints, and serving connections with a send timeout.

pub mod auth;
pub mod context;
pub mod drain;
pub mod edge;
pub mod error;
pub mod extract;
pub mod ops;
pub mod preconditions;
pub mod ratelimit;
pub mod schema;
pub mod send_timeout;
pub mod snapshot;

pub use context::{RequestId, finish_problem, request_context};
pub use error::{ApiError, ApiResult, Problem, ProblemItem};
pub use extract::{ApiJson, ApiPath, QueryPairs};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub static X_EVENT_SEQ: HeaderName = HeaderName::from_static("x-event-seq");
pub static X_MIN_EVENT_SEQ: HeaderName = HeaderName::from_static("x-min-event-seq");
pub static X_PROJECTION_SEQ: HeaderName = HeaderName::from_static("x-projection-seq");

/// `"<version>"`, as `ETag` carries it.
pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The sequence a read must reflect: `X-Min-Event-Seq` or `?min_seq=`.
/// Malformed values are a 400, not silently ignored.
pub fn min_seq(headers: &HeaderMap, query: &QueryPairs) -> Result<Option<u64>, ApiError> {
    let from_query = query.parse::<u64>("min_seq")?;
    let from_header = headers
        .get(&X_MIN_EVENT_SEQ)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("X-Min-Event-Seq must be a non-negative integer".into())
                })
        })
        .transpose()?;
    Ok(from_header.max(from_query))
}
