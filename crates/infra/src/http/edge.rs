//! The layers at the edge of every role's application, outside its routes:
//! response compression, CORS, the request context, and a handler's panic
//! answered as a problem instead of a dropped connection. Public so that a
//! test can put a route of its own (one that panics) behind the very same
//! stack.

use std::any::Any;

use anyhow::Context as _;
use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::{NotForContentType, SizeAbove};
use tower_http::compression::{CompressionLayer, Predicate};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::ApiError;
use crate::config::HttpConfig;

/// Wraps `router` in the edge layers, outermost first: compression (of the
/// final bytes, problem documents included), CORS when configured, the
/// request context (id, span, access log, problem rendering), and the
/// panic catcher, innermost, so a panic's 500 still gets the request id.
pub fn layers(router: Router, http: &HttpConfig) -> anyhow::Result<Router> {
    let router = router
        .layer(CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(super::request_context));
    let router = match cors(http)? {
        Some(cors) => router.layer(cors),
        None => router,
    };
    Ok(router.layer(compression()))
}

/// gzip, Brotli or zstd, as the client's `Accept-Encoding` prefers, for
/// bodies of [`COMPRESS_ABOVE`] bytes or more and streamed ones. Never the
/// SSE live feed (an encoder holds events back until its buffer fills) nor
/// a WebSocket upgrade, nor images. A streamed export stays streamed: the
/// encoder compresses each chunk as it comes.
fn compression() -> CompressionLayer<impl Predicate> {
    let not_upgrade =
        |status: StatusCode, _: _, _: &_, _: &_| status != StatusCode::SWITCHING_PROTOCOLS;
    let worth_it = SizeAbove::new(COMPRESS_ABOVE)
        .and(NotForContentType::SSE)
        .and(NotForContentType::IMAGES)
        .and(not_upgrade);
    CompressionLayer::new().no_deflate().compress_when(worth_it)
}

/// Smaller bodies (most single resources, every problem) gain a few bytes
/// at most from compression, for the CPU it costs on every request.
const COMPRESS_ABOVE: u64 = 1024;

/// CORS, off unless `YMERA_CORS_ORIGINS` names origins (or `*`). The
/// response headers a browser client needs are exposed: `ETag`, `Location`,
/// the sequences, the request id and the rate-limit headers.
fn cors(http: &HttpConfig) -> anyhow::Result<Option<CorsLayer>> {
    if http.cors_origins.is_empty() {
        return Ok(None);
    }
    let origin = if http.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let origins = http
            .cors_origins
            .iter()
            .map(|o| HeaderValue::from_str(o).with_context(|| format!("CORS origin {o:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(origins)
    };
    let methods = http
        .cors_methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .with_context(|| format!("CORS method {m:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let headers = http
        .cors_headers
        .iter()
        .map(|h| HeaderName::try_from(h.trim()).with_context(|| format!("CORS header {h:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exposed = [
        "etag",
        "location",
        "retry-after",
        "x-request-id",
        "x-event-seq",
        "x-projection-seq",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ]
    .map(HeaderName::from_static);
    Ok(Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(methods)
            .allow_headers(headers)
            .expose_headers(exposed),
    ))
}

/// A handler's panic: logged with its message, answered as a 500 problem
/// (the request context adds the request id), the connection kept.
fn panicked(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    ApiError::Internal(anyhow::anyhow!("a handler panicked: {message}")).into_response()
}
