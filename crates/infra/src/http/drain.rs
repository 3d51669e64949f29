//! Graceful drain on shutdown. When the shutdown signal comes, the process
//! stops being ready (`/readyz` answers 503) and refuses new work with a
//! 503 problem carrying `Retry-After` and `Connection: close`, so a client
//! or load balancer retries on another process. The probes and the
//! Prometheus scrape still answer. Requests already admitted, their
//! response bodies (an export download) included, get until the drain
//! timeout to finish. The drain ends when none is left or at that deadline,
//! whichever comes first; then [`Drain::stopped`] fires, which ends what
//! never ends by itself: live feeds are closed (a WebSocket close frame, the
//! end of an SSE stream), an export still running is cut off, background
//! tasks stop and the server closes its connections.
//!
//! Live feeds do not hold the drain: they never finish on their own, so
//! waiting for them would always last the whole timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ApiError;

/// The drain of one process: whether it has begun, how many admitted
/// requests are still running, and whether it has ended.
#[derive(Debug)]
pub struct Drain {
    draining: CancellationToken,
    stopped: CancellationToken,
    in_flight: watch::Sender<usize>,
}

impl Drain {
    /// A drain that begins when `shutdown` fires and lasts at most
    /// `timeout`. Spawns the task that ends it.
    pub fn spawn(shutdown: CancellationToken, timeout: Duration) -> Arc<Drain> {
        let drain = Arc::new(Drain {
            draining: CancellationToken::new(),
            stopped: CancellationToken::new(),
            in_flight: watch::Sender::new(0),
        });
        let run = drain.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            run.draining.cancel();
            let mut in_flight = run.in_flight.subscribe();
            let idle = in_flight.wait_for(|n| *n == 0);
            if tokio::time::timeout(timeout, idle).await.is_err() {
                tracing::warn!(
                    in_flight = *run.in_flight.borrow(),
                    ?timeout,
                    "drain timeout reached; cutting off the requests still running"
                );
            }
            run.stopped.cancel();
        });
        drain
    }

    /// Fires when the drain begins: the process is no longer ready.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Fires when the drain ends: live feeds, exports, background tasks and
    /// the server stop.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }
}

/// One admitted request, until its response body has been sent or dropped.
#[derive(Debug)]
struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The paths still answered while draining: the probes, so orchestrators
/// see the drain, and the Prometheus scrape.
fn answered_while_draining(path: &str) -> bool {
    let ops = path.strip_prefix("/api/v1").unwrap_or(path);
    matches!(ops, "/health" | "/livez" | "/readyz" | "/system/info") || path == "/metrics"
}

/// The middleware: refuses new work once the drain has begun, and counts
/// admitted requests until their response bodies end. Live feeds
/// (`text/event-stream`) are not counted; see the module doc.
pub async fn admit(State(drain): State<Arc<Drain>>, req: Request, next: Next) -> Response {
    if drain.draining.is_cancelled() && !answered_while_draining(req.uri().path()) {
        let mut response =
            ApiError::Unavailable("the server is shutting down; retry on another instance".into())
                .into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let in_flight = drain.enter();
    let response = next.run(req).await;
    let live_feed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if live_feed {
        return response;
    }
    response.map(|body| {
        Body::new(Counted {
            body,
            _in_flight: in_flight,
        })
    })
}

/// A response body that keeps its request counted until it ends.
struct Counted {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
