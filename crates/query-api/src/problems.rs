//! The problems every read documents besides its own answers: a bad
//! parameter (400), a missing or bad token (401), and a dependency down or a
//! projection that has not caught up in time (503).

use infra::http::Problem;
use utoipa::IntoResponses;

/// The problem answers every read lists, bare. A variant's doc comment
/// would become its description, so they have none; a read with more to
/// say about one of them lists that status after this set, which replaces
/// it.
#[derive(Debug, IntoResponses)]
pub enum ReadProblems {
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}
