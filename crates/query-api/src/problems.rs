//! The problems the reads document besides their own answers: what a read
//! refuses before it reads (a bad parameter, a missing or bad token) and a
//! read that cannot be answered now (a dependency down, or the projection
//! not caught up in time).
//!
//! A variant's doc comment would become its description, and these are
//! listed bare, so the variants have none. A read with more to say about
//! one of these statuses lists it after the set, which replaces it.

use infra::http::Problem;
use utoipa::IntoResponses;

/// What a read refuses before it reads: a bad parameter (400) or a
/// missing or bad token (401).
#[derive(Debug, IntoResponses)]
pub enum RequestProblems {
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
}

/// A read that cannot be answered now (503): PostgreSQL or NATS is down,
/// or the projection has not reached `min_seq` in time.
#[derive(Debug, IntoResponses)]
pub enum Unavailable {
    #[response(status = 503, content_type = "application/problem+json")]
    ServiceUnavailable(Problem),
}
