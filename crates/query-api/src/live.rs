//! The live feed: every event as it is appended, over WebSocket (`/ws`) and
//! Server-Sent Events (`/events/stream`).
//!
//! One reader per process follows the stream and fans events out through a
//! bounded broadcast ring. A client that asks for history (`since_seq`, or
//! SSE's `Last-Event-ID`) first gets it replayed from the log by its own
//! ordered consumer, then joins the live fan-out; it subscribes to the
//! fan-out *before* the replay starts and drops what the replay already
//! sent, so the hand-over has neither a gap nor a duplicate.
//!
//! The reader runs only while someone listens: the first client starts it
//! at the stream's end, and it stops once no client has been connected for
//! [`IDLE_STOP`], so a process nobody watches does not read (and NATS does
//! not deliver) every event twice.
//!
//! Memory is bounded whatever clients do: the ring holds at most
//! `YMERA_LIVE_BUFFER` events, and a client that falls further behind is
//! disconnected with a reason that says where to resume. A client that
//! takes no bytes for `YMERA_LIVE_PING_SECS` is dropped, over WebSocket by
//! a timeout on each send, over SSE by the connection's send timeout
//! ([`infra::http::send_timeout`]: hyper stops polling a body whose socket
//! is full, so the body itself cannot notice).
//!
//! A client's task ends as soon as the client goes away, whatever its
//! filter: it watches the client's end of the feed, not only its sends
//! (a filter that matches nothing never sends). A replay reads what is
//! stored and ends, however rarely its aggregate is written to. The reader
//! and each replay are consumers on the stream, deleted when they end, and
//! counted (`ymera_live_consumers`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, Stream, StreamExt};
use infra::config::HttpConfig;
use infra::http::auth::{LiveViewer, TokenSource};
use infra::http::send_timeout::SendTimeout;
use infra::http::{ApiError, Problem, QueryPairs};
use infra::{EventStore, StoreError};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;

/// One event as the feed sends it: the envelope plus its stream `seq`.
#[derive(Debug)]
pub struct LiveEvent {
    pub seq: u64,
    pub event_type: String,
    pub aggregate_id: Uuid,
    pub json: String,
}

impl LiveEvent {
    fn parse(seq: u64, payload: &[u8]) -> Option<LiveEvent> {
        let mut value: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let event_type = value.get("type")?.as_str()?.to_owned();
        let aggregate_id = value.get("aggregate_id")?.as_str()?.parse().ok()?;
        value.as_object_mut()?.insert("seq".into(), seq.into());
        Some(LiveEvent {
            seq,
            event_type,
            aggregate_id,
            json: value.to_string(),
        })
    }
}

/// The process's one follower of the stream, and its clients.
#[derive(Debug)]
pub struct LiveHub {
    store: EventStore,
    tx: broadcast::Sender<Arc<LiveEvent>>,
    /// Sequence of the last event broadcast.
    last: AtomicU64,
    connections: AtomicUsize,
    max_connections: usize,
    buffer: usize,
    ping: Duration,
    shutdown: CancellationToken,
    /// Whether the reader runs. Taken to start it, and by the reader to stop
    /// only while no client is subscribed, so a client never waits on a
    /// reader that has just decided to stop.
    following: tokio::sync::Mutex<bool>,
}

/// How long the reader goes on after the last client left (and how often it
/// checks): a client that reconnects at once finds it still running.
const IDLE_STOP: Duration = Duration::from_secs(30);

/// Why the hub's reader or a client's replay stopped reading the log.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// The event store failed or is unreachable: the reader reconnects
    /// after a backoff; a replay ends the client's feed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server ended the read, which it does not do on its own: the
    /// reader reconnects.
    #[error("the stream ended")]
    StreamEnded,
    /// The client went away during its replay.
    #[error("client gone")]
    ClientGone,
}

/// Holds one of the hub's connection slots while a client is connected.
#[derive(Debug)]
pub struct Slot(Arc<LiveHub>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        infra::metrics::live_connection(-1);
    }
}

/// What a client is sent.
#[derive(Debug)]
enum Item {
    Event(Arc<LiveEvent>),
    /// The client fell too far behind; `resume` is the last sequence it got.
    TooSlow {
        resume: u64,
    },
}

/// Which events a client wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    types: Option<HashSet<String>>,
    aggregate_id: Option<Uuid>,
}

impl Filter {
    fn matches(&self, e: &LiveEvent) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.contains(&e.event_type))
            && self.aggregate_id.is_none_or(|id| id == e.aggregate_id)
    }
}

impl LiveHub {
    /// The hub of a process; its reader starts with the first client.
    pub fn spawn(store: EventStore, cfg: &HttpConfig, shutdown: CancellationToken) -> Arc<LiveHub> {
        let (tx, _) = broadcast::channel(cfg.live_buffer.max(1));
        Arc::new(LiveHub {
            store,
            tx,
            last: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            max_connections: cfg.live_max_connections,
            buffer: cfg.live_buffer.max(1),
            ping: Duration::from_secs(cfg.live_ping_secs.max(1)),
            shutdown,
            following: tokio::sync::Mutex::new(false),
        })
    }

    /// Starts the reader at the stream's current end unless it runs;
    /// returns once its start is fixed (`last`), so a client that has
    /// subscribed gets every event after `last` from the ring.
    async fn ensure_following(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut running = self.following.lock().await;
        if !*running {
            let end = self.store.last_seq().await?;
            self.last.store(end, Ordering::SeqCst);
            *running = true;
            tokio::spawn(self.clone().follow());
        }
        Ok(())
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Takes a connection slot, or 503 when all are taken.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, ApiError> {
        let taken = self.connections.fetch_add(1, Ordering::SeqCst);
        infra::metrics::live_connection(1);
        let slot = Slot(self.clone());
        if taken >= self.max_connections {
            return Err(ApiError::Unavailable(format!(
                "the live feed is full ({} clients); retry later",
                self.max_connections
            )));
        }
        Ok(slot)
    }

    /// Follows the stream while clients listen, reconnecting after
    /// outages from where it left off.
    async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let run = self.follow_once();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = run => match result {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, "live feed lost the stream; reconnecting"),
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Broadcasts events after `last` until the stream fails (an error) or
    /// no client has listened for a while (`Ok`, with `following` cleared).
    async fn follow_once(&self) -> Result<(), FeedError> {
        let start = self.last.load(Ordering::SeqCst) + 1;
        let mut messages = self.store.read_log(start).await?;
        let _counted = infra::metrics::LiveConsumer::open();
        let mut idle_check = tokio::time::interval(IDLE_STOP);
        idle_check.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(FeedError::StreamEnded);
                    };
                    let message = message?;
                    let seq = message.seq;
                    // Update `last` before sending: a client that reads
                    // `last` after subscribing then gets every later event
                    // from the ring (and drops those its replay already had).
                    let event = LiveEvent::parse(seq, message.payload());
                    self.last.store(seq, Ordering::SeqCst);
                    if let Some(event) = event {
                        let _ = self.tx.send(Arc::new(event));
                    }
                }
                _ = idle_check.tick() => {
                    if self.tx.receiver_count() == 0 {
                        let mut running = self.following.lock().await;
                        if self.tx.receiver_count() == 0 {
                            *running = false;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// A client's feed: history after `since` (if asked) from the log, then
    /// live events, filtered. Ends on shutdown, on a client that is too
    /// slow, or when the receiver is dropped.
    ///
    /// The feed is in effect when this returns (before the response or the
    /// upgrade): every event appended afterwards reaches the client. 503
    /// when the stream cannot be followed (NATS down).
    async fn feed(
        self: &Arc<Self>,
        filter: Filter,
        since: Option<u64>,
    ) -> Result<mpsc::Receiver<Item>, ApiError> {
        // Subscribed first, so the reader cannot stop for lack of clients
        // once it is known to run.
        let live = self.tx.subscribe();
        self.ensure_following().await.map_err(|e| {
            tracing::warn!(error = %e, "live feed cannot follow the stream");
            ApiError::Unavailable("the event stream cannot be followed right now".into())
        })?;
        let sent = self.last.load(Ordering::SeqCst);
        let (out, rx) = mpsc::channel(64);
        let hub = self.clone();
        tokio::spawn(async move {
            let client = out.clone();
            let work = hub.clone().pump(filter, since, out, live, sent);
            tokio::select! {
                _ = hub.shutdown.cancelled() => {}
                // The client went away (its session dropped `rx`): noticed
                // here, not only when a send fails.
                _ = client.closed() => {}
                _ = work => {}
            }
        });
        Ok(rx)
    }

    async fn pump(
        self: Arc<Self>,
        filter: Filter,
        since: Option<u64>,
        out: mpsc::Sender<Item>,
        mut live: broadcast::Receiver<Arc<LiveEvent>>,
        mut sent: u64,
    ) {
        if let Some(since) = since {
            sent = since;
            match self.replay(&filter, since, &out).await {
                Ok(last) => sent = sent.max(last),
                Err(e) => {
                    tracing::warn!(error = %e, "live feed replay failed");
                    return;
                }
            }
        }
        loop {
            match live.recv().await {
                Ok(event) if event.seq <= sent => {}
                Ok(event) => {
                    sent = event.seq;
                    if filter.matches(&event) && out.send(Item::Event(event)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = out.send(Item::TooSlow { resume: sent }).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Replays the stored events after `since` that `filter` may match, up
    /// to the stream's end or the filtered subject's (whichever comes
    /// first); returns the last sequence read.
    async fn replay(
        &self,
        filter: &Filter,
        since: u64,
        out: &mpsc::Sender<Item>,
    ) -> Result<u64, FeedError> {
        let subject = match filter.aggregate_id {
            Some(id) => self.store.aggregate_subjects(id),
            None => events::all_subjects(self.store.prefix()),
        };
        let end = self.store.last_seq().await?;
        if end <= since {
            return Ok(since);
        }
        let mut messages = self.store.read_stored(&subject, since + 1).await?;
        let _counted = infra::metrics::LiveConsumer::open();
        let mut last = since;
        while let Some(message) = messages.next().await {
            let message = message?;
            let seq = message.seq;
            last = seq;
            if let Some(event) = LiveEvent::parse(seq, message.payload())
                && filter.matches(&event)
                && out.send(Item::Event(Arc::new(event))).await.is_err()
            {
                return Err(FeedError::ClientGone);
            }
            if seq >= end {
                break;
            }
        }
        Ok(last)
    }
}

/// The feed's query parameters: `types`, `aggregate_id`, `since_seq`, and
/// the token as `access_token` for clients that cannot set headers.
fn parse_filter(q: &QueryPairs) -> Result<(Filter, Option<u64>), ApiError> {
    q.only(&["types", "aggregate_id", "since_seq", "access_token"])?;
    let types = match q.one("types")? {
        None => None,
        Some(list) => {
            let known: HashSet<&str> = events::agent::EVENT_TYPES
                .into_iter()
                .chain(events::project::EVENT_TYPES)
                .collect();
            let mut set = HashSet::new();
            for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !known.contains(t) {
                    return Err(ApiError::BadRequest(format!(
                        "unknown event type {t:?} in types"
                    )));
                }
                set.insert(t.to_owned());
            }
            Some(set)
        }
    };
    let aggregate_id = q.parse::<Uuid>("aggregate_id")?;
    let since = q.parse::<u64>("since_seq")?;
    Ok((
        Filter {
            types,
            aggregate_id,
        },
        since,
    ))
}

/// The live feed over WebSocket.
#[utoipa::path(get, path = "/ws", tag = "live",
    params(
        ("types" = Option<String>, Query, description = "Comma-separated event types, e.g. agent.created,agent.deleted"),
        ("aggregate_id" = Option<Uuid>, Query),
        ("since_seq" = Option<u64>, Query, description = "Replay events after this sequence from the log first"),
        ("access_token" = Option<String>, Query, description = "The token, for clients that cannot set headers; or send subprotocols `bearer, <token>`"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Upgraded: text frames, each an event envelope with its `seq`. Pings every YMERA_LIVE_PING_SECS; a client that falls YMERA_LIVE_BUFFER events behind is closed with code 1008 and a reason naming the sequence to resume from"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many live clients", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn websocket(
    State(state): State<QueryState>,
    viewer: LiveViewer,
    query: QueryPairs,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (filter, since) = parse_filter(&query)?;
    let upgrade = upgrade
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    let slot = state.live.admit()?;
    let feed = state.live.feed(filter, since).await?;
    let upgrade = if viewer.source == TokenSource::Subprotocol {
        upgrade.protocols(["bearer"])
    } else {
        upgrade
    };
    let hub = state.live.clone();
    Ok(upgrade
        .on_upgrade(move |socket| ws_session(socket, hub, feed, slot))
        .into_response())
}

async fn ws_session(
    socket: WebSocket,
    hub: Arc<LiveHub>,
    mut feed: mpsc::Receiver<Item>,
    _slot: Slot,
) {
    let (mut sink, mut incoming) = socket.split();
    let mut ping = tokio::time::interval(hub.ping);
    ping.tick().await;
    let mut unanswered = 0u32;
    let close = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }))
    };
    loop {
        tokio::select! {
            item = feed.recv() => match item {
                Some(Item::Event(e)) => {
                    let send = sink.send(Message::Text(Utf8Bytes::from(e.json.clone())));
                    // A client that does not take a frame within a ping
                    // interval is not reading: drop it.
                    match tokio::time::timeout(hub.ping, send).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                Some(Item::TooSlow { resume }) => {
                    let reason = format!("too slow: fell more than {} events behind; reconnect with since_seq={resume}", hub.buffer);
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(1008, reason))).await;
                    break;
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(1001, "server shutting down".into()))).await;
                    break;
                }
            },
            message = incoming.next() => match message {
                Some(Ok(Message::Pong(_))) => unanswered = 0,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if unanswered >= 2 {
                    break; // dead: two pings without a pong
                }
                unanswered += 1;
                if tokio::time::timeout(hub.ping, sink.send(Message::Ping(Default::default()))).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The live feed as Server-Sent Events.
#[utoipa::path(get, path = "/events/stream", tag = "live",
    params(
        ("types" = Option<String>, Query),
        ("aggregate_id" = Option<Uuid>, Query),
        ("since_seq" = Option<u64>, Query),
        ("access_token" = Option<String>, Query),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence (wins over since_seq)"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "text/event-stream: `id` is the sequence, `event` the type, `data` the envelope with its `seq`; a comment every YMERA_LIVE_PING_SECS keeps it alive. A client that falls too far behind gets an `error` event and the stream ends; reconnect with Last-Event-ID. A client that takes no bytes for YMERA_LIVE_PING_SECS is disconnected.", content_type = "text/event-stream"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn event_stream(
    State(state): State<QueryState>,
    _viewer: LiveViewer,
    send_timeout: SendTimeout,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (filter, since) = parse_filter(&query)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be an event sequence".into())
                })
        })
        .transpose()?;
    let slot = state.live.admit()?;
    let buffer = state.live.buffer;
    let ping = state.live.ping;
    let feed = state.live.feed(filter, last_event_id.or(since)).await?;
    // The same bound as a WebSocket send: a client that takes nothing for
    // a ping interval is not reading.
    send_timeout.set(ping);
    let stream = futures::stream::unfold((feed, Some(slot)), move |(mut feed, slot)| async move {
        let slot = slot?;
        match feed.recv().await {
            Some(Item::Event(e)) => {
                let event = Event::default()
                    .id(e.seq.to_string())
                    .event(e.event_type.clone())
                    .data(e.json.clone());
                Some((Ok(event), (feed, Some(slot))))
            }
            Some(Item::TooSlow { resume }) => {
                let data = serde_json::json!({
                    "reason": format!("too slow: fell more than {buffer} events behind"),
                    "resume_after": resume,
                });
                // Sent, then the stream ends (the slot is released).
                Some((
                    Ok(Event::default().event("error").data(data.to_string())),
                    (feed, None),
                ))
            }
            None => None,
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(ping)))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(websocket))
        .routes(routes!(event_stream))
}
