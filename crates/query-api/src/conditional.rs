//! Conditional GET for single resources: an `ETag` on every answer, and 304
//! when the reader already holds that version (`If-None-Match`, compared
//! weakly as RFC 9110 says: `W/"3"` matches, as does any tag of a list, and
//! `*`); and how a single resource's read documents its parameters and
//! answers.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infra::http::preconditions::EntityTags;
use infra::http::{Problem, etag};
use utoipa::{IntoParams, IntoResponses};

use crate::projection::with_projection_seq;

/// A single resource's `min_seq`, documented with a description (the
/// lists show [`MinSeq`](crate::projection::MinSeq) bare). A field's doc
/// comment is its description.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResourceQuery {
    /// Answer only once the projection has applied this event
    pub min_seq: Option<u64>,
}

/// A single resource's headers: `X-Min-Event-Seq`, described as above,
/// and `If-None-Match`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ResourceHeaders {
    /// Same as min_seq
    #[param(rename = "X-Min-Event-Seq", nullable = false)]
    pub x_min_event_seq: Option<u64>,
    /// 304 when one of the listed entity tags matches the ETag, weakly (W/"3" matches "3"), or for *; a malformed value is ignored
    #[param(rename = "If-None-Match", nullable = false)]
    pub if_none_match: Option<String>,
}

/// What a single resource's read answers besides the resource itself and
/// the [problems](crate::problems) the reads share. A variant's doc comment
/// is its description.
#[derive(Debug, IntoResponses)]
pub enum ResourceResponses {
    /// Not modified
    #[response(status = 304)]
    NotModified,
    /// Unknown or deleted
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
}

/// A single-resource answer of `version` with its `ETag` and
/// `X-Projection-Seq`, or 304 when `If-None-Match` matches the tag. A
/// malformed `If-None-Match` is ignored: the reader gets the resource.
pub(crate) fn conditional(
    headers: &HeaderMap,
    version: u64,
    body: impl IntoResponse,
    seq: u64,
) -> Response {
    let not_modified = EntityTags::from_headers(headers, &header::IF_NONE_MATCH)
        .ok()
        .flatten()
        .is_some_and(|tags| tags.matches_weakly(&version.to_string()));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    response.headers_mut().insert(header::ETAG, etag(version));
    with_projection_seq(response, seq)
}
