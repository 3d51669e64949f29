//! The JetStream event store: the only source of truth.
//!
//! Every aggregate has its own subject, so every append can be guarded with
//! `Nats-Expected-Last-Subject-Sequence` (optimistic concurrency) and
//! `Nats-Msg-Id` (deduplication of retries within the stream's duplicate
//! window). Loading an aggregate reads exactly its subject.
//!
//! This module is the only one that speaks JetStream: callers ask it for
//! what they mean (append, load a subject, read the log in order, subscribe
//! durably from a sequence) and get our own types back, never a client.
//!
//! On a replicated stream (R3 on a three-node cluster) the stream's leader
//! can change at any moment (a node dies, pauses, restarts):
//!
//! - An append whose ack did not come (a timeout, or no leader to answer) is
//!   sent again a few times, unchanged: its `Nats-Msg-Id` makes a second
//!   copy within the duplicate window a duplicate, and its expected subject
//!   sequence makes a copy that landed read as a conflict, which
//!   [`EventStore::append`] resolves by finding its own event last on the
//!   subject. An append still unacknowledged after that is reported as
//!   [`StoreError::Unavailable`]: maybe stored, maybe not, never a success
//!   or a clean failure (the command side remembers it as unknown).
//! - An atomic batch carries no `Nats-Msg-Id` and is not sent again here
//!   (see [`EventStore::append_batch`]); nor is anything while the client is
//!   disconnected: both fail fast with 503.
//! - Direct gets may be answered by any replica, a lagging follower
//!   included. The reads that decide a write (an aggregate's events and its
//!   last sequence: the expected sequence of the next append and whether
//!   the aggregate exists) are therefore read from the leader when the
//!   stream has replicas; on R1 the only replica is the leader, and the
//!   cheaper direct gets are just as current. A leader cut off from the
//!   other replicas still answers from its copy until it steps down, some
//!   seconds after they have elected another: so each such read is
//!   confirmed by the leader having heard from a quorum of the replicas
//!   within a lease shorter than an election takes, else it fails with 503.

mod consumers;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::jetstream::{self, context::PublishErrorKind, stream::StorageType};
use bytes::Bytes;
use events::{AggregateType, Envelope};
use uuid::Uuid;

use crate::config::{NatsConfig, StreamStorage};
use crate::telemetry::TraceHeaders;

pub use consumers::{Reader, StoredMessage, Subscription};

/// NATS message headers as an OpenTelemetry carrier: the trace context
/// (`traceparent`, `tracestate`, `baggage`) rides on every appended event,
/// so the projection of an event continues the trace of the request that
/// wrote it.
#[derive(Debug, Clone, Copy)]
pub struct TraceCarrier<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for TraceCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes a trace context into the headers of a message to append.
struct TraceWriter<'a>(&'a mut HeaderMap);

impl opentelemetry::propagation::Injector for TraceWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// One event as it sits in the stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The stream sequence: a global, gap-free order of everything appended.
    pub seq: u64,
    pub envelope: Envelope,
}

/// Why the event store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The aggregate's subject moved on since it was loaded: someone else
    /// appended first. Reload, decide again, or answer 409.
    #[error("the aggregate changed since it was read")]
    Conflict,
    /// NATS or JetStream is unreachable or did not answer in time: 503.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The stream was made for another configuration than this process's
    /// (another partition count): the process refuses to start.
    #[error("{0}")]
    Misconfigured(String),
    /// A stored message is not an envelope. Logged; 500.
    #[error("stored message {seq} is not a valid event: {reason}")]
    Corrupt { seq: u64, reason: String },
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A handle on the stream. Cheap to clone; every clone shares one NATS
/// connection.
#[derive(Debug, Clone)]
pub struct EventStore {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    prefix: String,
    /// Whether the reads that decide a write go to the stream's leader (a
    /// replicated stream) rather than to any replica by direct get.
    leader_reads: bool,
    /// How many partitions the log is split into: part of every subject
    /// when more than one (see [`events::subject`]).
    partitions: u32,
}

/// The key of the stream's metadata that records how many partitions its
/// log is split into; a stream without it holds a log of one.
pub const PARTITIONS_KEY: &str = "ymera.partitions";

impl EventStore {
    /// Connects and makes sure the stream exists with the configured
    /// settings. The connection reconnects by itself after an outage.
    #[tracing::instrument(skip_all, fields(url = %cfg.nats_url, stream = %cfg.stream), err)]
    pub async fn connect(cfg: &NatsConfig) -> Result<Self, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .name("ymera")
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(cfg.request_timeout()))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(cfg.nats_servers())
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.request_timeout());
        let store = EventStore {
            client,
            js,
            stream: cfg.stream.clone(),
            prefix: cfg.subject_prefix.clone(),
            leader_reads: cfg.stream_replicas > 1,
            partitions: cfg.partitions.max(1),
        };
        store.ensure_stream(cfg).await?;
        Ok(store)
    }

    /// Creates the stream, or brings a changed configuration up to date.
    /// The partition count is recorded in the stream when it is created
    /// and never changed: a process configured with another count would
    /// name another subject for the same aggregate (and so guard its
    /// appends against another sequence), so it is refused.
    async fn ensure_stream(&self, cfg: &NatsConfig) -> Result<(), StoreError> {
        let config = jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![events::all_subjects(&cfg.subject_prefix)],
            storage: match cfg.stream_storage {
                StreamStorage::File => StorageType::File,
                StreamStorage::Memory => StorageType::Memory,
            },
            num_replicas: cfg.stream_replicas,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            allow_direct: true,
            // Bulk writes are all or nothing (ADR-50 atomic batches).
            allow_atomic_publish: true,
            description: Some("YMERA event log".into()),
            metadata: [(PARTITIONS_KEY.to_owned(), cfg.partitions.max(1).to_string())].into(),
            ..Default::default()
        };
        // The first start on a fresh server may race JetStream's own start;
        // give it a few tries before giving up.
        let mut last_err = None;
        for attempt in 0..20u32 {
            match self.js.get_or_create_stream(config.clone()).await {
                Ok(stream) => {
                    let current = &stream.cached_info().config;
                    check_partitions(current, self.partitions)?;
                    if current.duplicate_window != config.duplicate_window
                        || current.num_replicas != config.num_replicas
                        || !current.allow_atomic_publish
                    {
                        self.js
                            .update_stream(config.clone())
                            .await
                            .map_err(unavailable)?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "stream not ready yet");
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt + 1))).await;
                }
            }
        }
        Err(unavailable(
            last_err.map(|e| e.to_string()).unwrap_or_default(),
        ))
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The version of the NATS server this store is connected to.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// The stream, without asking the server for its info.
    async fn stream(&self) -> Result<jetstream::stream::Stream<()>, StoreError> {
        self.js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(unavailable)
    }

    /// Fails fast while NATS is disconnected, rather than queue a publish
    /// that the client would send after reconnecting, long after the
    /// request was answered 503.
    fn connected(&self) -> Result<(), StoreError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(StoreError::Unavailable("NATS is not connected".into())),
        }
    }

    /// How many partitions the log is split into.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The subject of one aggregate.
    pub fn subject(&self, aggregate_type: AggregateType, id: Uuid) -> String {
        events::subject(&self.prefix, aggregate_type, id, self.partitions)
    }

    /// The sequence of the first message on `subjects` (one subject, or a
    /// filter with wildcards) at sequence `from` or later, as the leader
    /// has it (see the module doc); `None` when there is none yet.
    pub async fn first_from(&self, subjects: &str, from: u64) -> Result<Option<u64>, StoreError> {
        let stream = self.stream().await?;
        let message = self.next_on_subject(&stream, subjects, from).await?;
        // "None yet" lets a partition's watermark move past `from`: a
        // deposed leader must not say so of events the others now hold.
        if message.is_none() && self.leader_reads {
            self.confirm_leader(&stream).await?;
        }
        Ok(message.map(|m| m.sequence))
    }

    /// The subjects of the aggregate `id`, whatever its type.
    pub fn aggregate_subjects(&self, id: Uuid) -> String {
        events::aggregate_subjects(&self.prefix, id, self.partitions)
    }

    /// Appends one event to `subject`, provided the subject's last sequence
    /// is still `expected` (0: the subject must be empty). Returns the
    /// stream sequence of the event.
    ///
    /// The event id is the `Nats-Msg-Id`: a retry of the same append within
    /// the duplicate window is acknowledged with the first sequence and
    /// stored once.
    #[tracing::instrument(skip_all, fields(otel.kind = "producer", subject, expected, seq), err)]
    pub async fn append(
        &self,
        subject: &str,
        expected: u64,
        envelope: &Envelope,
        trace: Option<&TraceHeaders>,
    ) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        tracing::Span::current()
            .record("subject", subject)
            .record("expected", expected);
        self.connected()?;
        let payload = serde_json::to_vec(envelope).map_err(|e| StoreError::Corrupt {
            seq: 0,
            reason: e.to_string(),
        })?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.event_id.to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        // The append span's own context when tracing is on (so the
        // projection hangs under it), else the caller's as it came.
        crate::telemetry::inject_current_or(trace, &mut TraceWriter(&mut headers));
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(payload))
            .headers(headers);
        let seq = match self.publish_until_acked(subject, publish, started).await {
            Ok(ack) => ack.sequence,
            // JetStream checks the expected sequence before the duplicate
            // window, so a retry of an append that did land (its ack was
            // lost) reads as a conflict. If the subject's last event is
            // this very event, the append succeeded: answer as a duplicate.
            // The subject's last event is read from the leader (on a
            // replicated stream), which stored what it acknowledged.
            Err(StoreError::Conflict) => match self.last_on_subject(subject).await? {
                Some(last) if last.envelope.event_id == envelope.event_id => last.seq,
                _ => return Err(StoreError::Conflict),
            },
            Err(e) => return Err(e),
        };
        tracing::Span::current().record("seq", seq);
        crate::metrics::record_append(started);
        Ok(seq)
    }

    /// Publishes one append and waits for its ack, sending it again,
    /// unchanged, while the ack does not come for a reason that says
    /// nothing of whether it was stored: a timeout, or no stream leader to
    /// answer (an election in progress). Safe because the message carries
    /// its `Nats-Msg-Id` and expected subject sequence (see the module
    /// doc); bounded by [`APPEND_RETRY_BUDGET`], far inside any duplicate
    /// window. Anything else, a disconnected client included, ends at once.
    async fn publish_until_acked(
        &self,
        subject: &str,
        publish: jetstream::message::PublishMessage,
        started: Instant,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let mut pause = APPEND_RETRY_FIRST_PAUSE;
        loop {
            self.connected()?;
            let acked = async {
                self.js
                    .send_publish(subject.to_owned(), publish.clone())
                    .await?
                    .await
            };
            match acked.await {
                Ok(ack) => return Ok(ack),
                Err(e)
                    if matches!(
                        e.kind(),
                        PublishErrorKind::TimedOut | PublishErrorKind::StreamNotFound
                    ) && started.elapsed() + pause < APPEND_RETRY_BUDGET =>
                {
                    tracing::warn!(error = %e, ?pause, "append not acknowledged; sending it again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(publish_error(e)),
            }
        }
    }

    /// The sequence of the last event on `subject` (0 when there is none):
    /// one cheap get, to check a cached state is still current.
    pub async fn last_seq_of(&self, subject: &str) -> Result<u64, StoreError> {
        Ok(self.last_on_subject(subject).await?.map_or(0, |e| e.seq))
    }

    /// The last event stored on `subject`, if any, as the leader has it
    /// (see the module doc).
    pub async fn last_on_subject(&self, subject: &str) -> Result<Option<StoredEvent>, StoreError> {
        let stream = self.stream().await?;
        let message = if self.leader_reads {
            let message = match stream.get_last_raw_message_by_subject(subject).await {
                Ok(message) => Some(message),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                Err(e) => return Err(unavailable(e)),
            };
            // "Nothing there" decides as much as the last event does (no
            // such project: 422), so it is confirmed as current too.
            self.confirm_leader(&stream).await?;
            message
        } else {
            match stream.direct_get_last_for_subject(subject).await {
                Ok(message) => Some(message),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
                Err(e) => return Err(unavailable(e)),
            }
        };
        message.map(|m| decode(m.sequence, &m.payload)).transpose()
    }

    /// Makes sure that what was just read from the stream's leader was
    /// current: that the leader still hears from a quorum of the stream's
    /// replicas, each within [`LEADER_LEASE`]. A leader cut off from the
    /// others goes on answering from its copy until it steps down, seconds
    /// after they have elected another and stored more; it fails this at
    /// once, with 503.
    async fn confirm_leader(
        &self,
        stream: &jetstream::stream::Stream<()>,
    ) -> Result<(), StoreError> {
        let info = stream.get_info().await.map_err(unavailable)?;
        let Some(cluster) = info.cluster else {
            return Ok(());
        };
        let heard = cluster
            .replicas
            .iter()
            .filter(|r| r.current && !r.offline && r.active <= LEADER_LEASE)
            .count();
        // The leader itself, and the others it has heard from lately.
        if 2 * (heard + 1) > cluster.replicas.len() + 1 {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "the stream's leader has not heard from its replicas lately".into(),
            ))
        }
    }

    /// The first message on `subject` at sequence `from` or later, as the
    /// leader has it (see the module doc).
    async fn next_on_subject(
        &self,
        stream: &jetstream::stream::Stream<()>,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if self.leader_reads {
            match stream.get_first_raw_message_by_subject(subject, from).await {
                Ok(message) => Ok(Some(message)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        } else {
            match stream
                .direct_get_next_for_subject(subject, Some(from))
                .await
            {
                Ok(message) => Ok(Some(message)),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        }
    }

    /// Appends events to several subjects as one atomic batch: all are
    /// stored, with consecutive sequences, or none is. Each is guarded by its
    /// own expected subject sequence. Returns each event's sequence.
    ///
    /// JetStream refuses `Nats-Msg-Id` inside atomic batches, so a retried
    /// batch is not deduplicated by the stream. Retries are made safe one
    /// level up: under an `Idempotency-Key` a retried batch names the same
    /// new aggregates, expects their subjects empty, and so is refused (or
    /// first finds its own events there) rather than stored twice.
    #[tracing::instrument(skip_all, fields(otel.kind = "producer", events = items.len(), last_seq), err)]
    pub async fn append_batch(
        &self,
        items: &[BatchItem<'_>],
        trace: Option<&TraceHeaders>,
    ) -> Result<Vec<u64>, StoreError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        self.connected()?;
        if items.len() > MAX_BATCH {
            return Err(StoreError::Unavailable(format!(
                "a batch holds at most {MAX_BATCH} events"
            )));
        }
        let batch_id = Uuid::now_v7().simple().to_string();
        let last = items.len() - 1;
        for (i, item) in items.iter().enumerate() {
            let payload = serde_json::to_vec(item.envelope).map_err(|e| StoreError::Corrupt {
                seq: 0,
                reason: e.to_string(),
            })?;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                item.expected.to_string().as_str(),
            );
            crate::telemetry::inject_current_or(trace, &mut TraceWriter(&mut headers));
            if i == last {
                headers.insert("Nats-Batch-Commit", "1");
            }
            let subject = item.subject.to_owned();
            // Every hundredth message waits for the server (flow control,
            // and an early error when the stream refuses), and the commit
            // does. A batch of up to a hundred goes out whole before the
            // first wait, so a commit whose ack is lost was still sent: its
            // retry finds it in the log.
            if i == last || (i > 0 && i % 100 == 0) {
                let request = async_nats::Request::new()
                    .payload(Bytes::from(payload))
                    .headers(headers);
                let reply = self
                    .client
                    .send_request(subject, request)
                    .await
                    .map_err(unavailable)?;
                let ack = batch_reply(&reply.payload)?;
                if i == last {
                    let ack = ack.ok_or_else(|| {
                        StoreError::Unavailable("the batch commit was not acknowledged".into())
                    })?;
                    let count = ack.count.unwrap_or(items.len() as u64);
                    if count != items.len() as u64 {
                        return Err(StoreError::Unavailable(format!(
                            "batch committed {count} of {} events",
                            items.len()
                        )));
                    }
                    let first = ack.seq + 1 - count;
                    tracing::Span::current().record("last_seq", ack.seq);
                    return Ok((0..count).map(|k| first + k).collect());
                }
            } else {
                self.client
                    .publish_with_headers(subject, headers, Bytes::from(payload))
                    .await
                    .map_err(unavailable)?;
            }
        }
        Err(StoreError::Unavailable(
            "the batch was not committed".into(),
        ))
    }

    /// Every event of one aggregate, oldest first, with the subject's last
    /// sequence (0 when there is none): the `expected` of the next append.
    ///
    /// Most aggregates have a few events: those are read one request each
    /// (direct gets on R1, leader gets on a replicated stream), leaving no
    /// state on the server. Past [`DIRECT_LOAD_LIMIT`] events the rest
    /// streams through an ordered consumer, whose setup costs more than a
    /// handful of gets but whose reads do not. A consumer may read from a
    /// lagging replica, so on a replicated stream whatever the leader holds
    /// beyond it is read from the leader last.
    #[tracing::instrument(skip_all, fields(subject, events), err)]
    pub async fn load(&self, subject: &str) -> Result<(Vec<StoredEvent>, u64), StoreError> {
        tracing::Span::current().record("subject", subject);
        self.connected()?;
        let stream = self.stream().await?;
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            if out.len() == DIRECT_LOAD_LIMIT {
                self.load_rest(subject, from, &mut out).await?;
                from = out.last().map_or(from, |e| e.seq + 1);
                if !self.leader_reads {
                    break;
                }
            }
            match self.next_on_subject(&stream, subject, from).await? {
                Some(message) => {
                    from = message.sequence + 1;
                    out.push(decode(message.sequence, &message.payload)?);
                }
                None => break,
            }
        }
        if self.leader_reads {
            self.confirm_leader(&stream).await?;
        }
        tracing::Span::current().record("events", out.len());
        let last = out.last().map_or(0, |e| e.seq);
        Ok((out, last))
    }

    /// The sequence of the last event in the stream (0 when empty).
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.stream_state().await?.last_sequence)
    }

    /// The stream's current state: message count, bytes, last sequence,
    /// consumers.
    pub async fn stream_state(&self) -> Result<StreamState, StoreError> {
        let stream = self.stream().await?;
        let state = stream.get_info().await.map_err(unavailable)?.state;
        Ok(StreamState {
            messages: state.messages,
            bytes: state.bytes,
            last_sequence: state.last_sequence,
            consumer_count: state.consumer_count,
        })
    }

    /// One stored message by stream sequence, as it is: subject and
    /// payload, whether or not it is a valid event.
    pub async fn get_raw(&self, seq: u64) -> Result<(String, Vec<u8>), StoreError> {
        let stream = self.stream().await?;
        let message = stream.direct_get(seq).await.map_err(unavailable)?;
        Ok((message.subject.to_string(), message.payload.to_vec()))
    }

    /// One stored event by stream sequence.
    pub async fn get(&self, seq: u64) -> Result<StoredEvent, StoreError> {
        let stream = self.stream().await?;
        let message = stream.direct_get(seq).await.map_err(unavailable)?;
        decode(seq, &message.payload)
    }
}

/// What the stream holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The sequence of the last message appended (0 when none was).
    pub last_sequence: u64,
    /// Consumers reading the stream: durable subscriptions and ordered
    /// reads in progress.
    pub consumer_count: usize,
}

/// How long ago a replicated stream's leader may last have heard from a
/// replica for that replica to count towards the quorum that makes the
/// leader's reads current ([`EventStore::last_on_subject`],
/// [`EventStore::load`]). A replica that the leader heard from that lately
/// has not voted for another leader: NATS's Raft waits at least 4 s without
/// a word from the leader before it does. Under that, with room for the
/// leader's own heartbeats (every second) to be late.
const LEADER_LEASE: Duration = Duration::from_millis(2_500);

/// How many events of an aggregate are read by direct gets before the rest
/// streams through a consumer.
pub const DIRECT_LOAD_LIMIT: usize = 16;

/// How long an unacknowledged append is sent again (see
/// [`EventStore::append`]): long enough to ride out a short stall, short
/// enough that the caller still answers (503) well within its own timeout.
/// Far inside the shortest sensible duplicate window.
pub const APPEND_RETRY_BUDGET: Duration = Duration::from_secs(4);

/// The pause before the first resend of an unacknowledged append; each
/// next pause doubles.
const APPEND_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// The most events one atomic batch may hold (a JetStream limit).
pub const MAX_BATCH: usize = 1_000;

/// One event of an atomic batch: where it goes and what its subject's last
/// sequence must be.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub subject: &'a str,
    pub expected: u64,
    pub envelope: &'a Envelope,
}

#[derive(Debug, serde::Deserialize)]
struct BatchAck {
    seq: u64,
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum BatchReply {
    Error { error: ApiErrorBody },
    Ack(BatchAck),
}

/// JetStream's answer to a batch message: empty (flow control), an ack
/// (commit), or an error. 10071 is "wrong last sequence".
fn batch_reply(payload: &[u8]) -> Result<Option<BatchAck>, StoreError> {
    if payload.is_empty() {
        return Ok(None);
    }
    match serde_json::from_slice::<BatchReply>(payload) {
        Ok(BatchReply::Ack(ack)) => Ok(Some(ack)),
        Ok(BatchReply::Error { error }) if error.err_code == 10071 => Err(StoreError::Conflict),
        Ok(BatchReply::Error { error }) => Err(StoreError::Unavailable(format!(
            "JetStream refused the batch ({}): {}",
            error.err_code, error.description
        ))),
        Err(e) => Err(StoreError::Unavailable(format!(
            "unreadable batch reply: {e}"
        ))),
    }
}

/// Refuses a stream whose log is split another way than `partitions`.
fn check_partitions(stream: &jetstream::stream::Config, partitions: u32) -> Result<(), StoreError> {
    let recorded = stream.metadata.get(PARTITIONS_KEY);
    let theirs = match recorded {
        None => Some(1),
        Some(n) => n.parse::<u32>().ok(),
    };
    if theirs == Some(partitions) {
        return Ok(());
    }
    let theirs = match recorded {
        Some(n) => n.clone(),
        None => "1 (it records no partition count: it was made before partitions)".into(),
    };
    Err(StoreError::Misconfigured(format!(
        "stream {} holds a log split for YMERA_PARTITIONS={theirs}, but this process is \
         configured with YMERA_PARTITIONS={partitions}: every process of a stream must be given \
         the partition count the stream was created with",
        stream.name
    )))
}

/// Reads a stored message's payload as an envelope.
pub fn decode(seq: u64, payload: &[u8]) -> Result<StoredEvent, StoreError> {
    serde_json::from_slice(payload)
        .map(|envelope| StoredEvent { seq, envelope })
        .map_err(|e| StoreError::Corrupt {
            seq,
            reason: e.to_string(),
        })
}

fn publish_error(e: jetstream::context::PublishError) -> StoreError {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => StoreError::Conflict,
        _ => StoreError::Unavailable(e.to_string()),
    }
}
