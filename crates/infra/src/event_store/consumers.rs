//! Reading the log through JetStream consumers: ordered reads, whose
//! consumer is deleted from the server as soon as the read is dropped, and
//! the durable subscription that a projector acknowledges as it applies.
//!
//! Both hand out [`StoredMessage`]s, not decoded events: a projector must
//! see (and park) a payload that is not a valid event, and the live feed
//! skips one without stopping.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;

use crate::projection::Partition;

use super::{EventStore, StoreError, StoredEvent, TraceCarrier, decode, unavailable};

/// How long the server waits for a subscription's ack before it delivers
/// the message again.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// How many pulls' worth of messages a subscription may hold unacked.
const UNACKED_BATCHES: usize = 20;
/// How long the server keeps a subscription nobody pulls from.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// How often the server signals an idle pull is still alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one pull request stays open on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// One message as it is stored in the stream, whether or not its payload
/// is a valid event.
pub struct StoredMessage {
    /// The stream sequence.
    pub seq: u64,
    /// How many messages of the read or subscription the server had yet to
    /// deliver after this one.
    pub pending: u64,
    /// The consumer's count of deliveries, this one included: one more
    /// than the delivery before it unless a delivery went astray.
    delivery: u64,
    message: jetstream::Message,
}

impl std::fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredMessage")
            .field("seq", &self.seq)
            .field("pending", &self.pending)
            .field("subject", &self.subject())
            .finish_non_exhaustive()
    }
}

impl StoredMessage {
    fn new(message: jetstream::Message) -> Result<Self, StoreError> {
        let (seq, pending, delivery) = {
            let info = message.info().map_err(unavailable)?;
            (info.stream_sequence, info.pending, info.consumer_sequence)
        };
        Ok(StoredMessage {
            seq,
            pending,
            delivery,
            message,
        })
    }

    /// The subject it was appended to.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    /// The payload as it was appended.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The trace context of the request that appended it, for
    /// [`telemetry::continue_trace`](crate::telemetry::continue_trace).
    pub fn trace(&self) -> Option<TraceCarrier<'_>> {
        self.message.headers.as_ref().map(TraceCarrier)
    }

    /// The payload read as an event.
    pub fn decode(&self) -> Result<StoredEvent, StoreError> {
        decode(self.seq, &self.message.payload)
    }
}

/// The next message a consumer delivers, as a [`StoredMessage`].
async fn next_stored<E: std::fmt::Display>(
    messages: &mut (impl futures::Stream<Item = Result<jetstream::Message, E>> + Unpin),
) -> Option<Result<StoredMessage, StoreError>> {
    let message = messages.next().await?;
    Some(message.map_err(unavailable).and_then(StoredMessage::new))
}

/// An ordered read of the log: every message on its subjects from a
/// sequence on, in stream order, for as long as it is held (or, from
/// [`EventStore::read_stored`], up to the end of what is stored). Its
/// consumer is deleted from the server when it is dropped.
pub struct Reader {
    /// `None` once a read of what is stored has delivered the last of it.
    messages: Option<pull::Ordered>,
    /// Whether the read ends after the message the server had nothing more
    /// pending after.
    to_end: bool,
    /// Dropped after `messages`, which stops pulling first.
    _consumer: Ephemeral,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("consumer", &self._consumer.name)
            .field("to_end", &self.to_end)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// The next message, waiting for it to be appended if need be; `None`
    /// if the server ended the read, or a read of what is stored has
    /// delivered all of it. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<StoredMessage, StoreError>> {
        let message = next_stored(self.messages.as_mut()?).await;
        if self.to_end && matches!(&message, Some(Ok(m)) if m.pending == 0) {
            self.messages = None;
        }
        message
    }
}

/// An ordered read's consumer on the server, deleted when this is dropped.
///
/// The server would drop an ordered consumer nobody pulls from only after
/// its inactivity threshold (30 s, which `async-nats` does not let us set),
/// so readers that come and go (live-feed clients) would pile consumers up.
/// It is made before the consumer is created, under the name the consumer
/// is then created with: a read cancelled while its consumer was being
/// created leaves nothing either. A consumer the client library recreated
/// after a failure (`<name>_<n>`) is left to the threshold.
struct Ephemeral {
    js: jetstream::Context,
    stream: String,
    name: String,
}

impl Drop for Ephemeral {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the server's threshold applies
        };
        let js = self.js.clone();
        let (stream, name) = (
            std::mem::take(&mut self.stream),
            std::mem::take(&mut self.name),
        );
        runtime.spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                tracing::debug!(error = %e, consumer = %name, "could not delete a read's consumer");
            }
        });
    }
}

/// A durable subscription to the log (or to one partition of it), delivered in pulls of up to a
/// batch and acknowledged cumulatively: the server keeps its position
/// across reconnects, and delivers again what stays unacknowledged for
/// [`ACK_WAIT`].
///
/// A delivery can go astray: the server counts a message as delivered when
/// it sends it, and a NATS server dying between the consumer and this
/// client takes the message with it, while the deliveries after it arrive
/// through the server the client reconnected to. Acknowledging one of
/// those would acknowledge the lost message too (the acknowledgement is
/// cumulative), so it would never come again. A subscription from
/// [`EventStore::subscribe`] therefore checks that the consumer's delivery
/// count goes up by exactly one from message to message, and ends with an
/// error at the first that does not: its holder subscribes afresh from
/// what it has applied.
pub struct Subscription {
    messages: pull::Stream,
    /// The delivery count of the last message handed out (0 before the
    /// first), on a subscription whose deliveries must all arrive; `None`
    /// on one from [`EventStore::follow`], which acknowledges each message
    /// on its own, so that a lost one comes again after [`ACK_WAIT`].
    last_delivery: Option<u64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// Pulls from `consumer` in batches of at most `batch_size`, with the
    /// server's heartbeat on idle pulls.
    async fn pulling(
        consumer: jetstream::consumer::PullConsumer,
        batch_size: usize,
        last_delivery: Option<u64>,
    ) -> Result<Subscription, StoreError> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch_size)
            .heartbeat(HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(unavailable)?;
        Ok(Subscription {
            messages,
            last_delivery,
        })
    }

    /// The next message, waiting for it to be appended if need be; `None`
    /// if the server ended the subscription, an error if a delivery before
    /// it went astray (see [`Subscription`]). Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<StoredMessage, StoreError>> {
        let message = next_stored(&mut self.messages).await?;
        if let (Ok(m), Some(last)) = (&message, self.last_delivery.as_mut()) {
            if m.delivery != *last + 1 {
                return Some(Err(StoreError::Unavailable(format!(
                    "delivery {} of the subscription came after delivery {last}: \
                     a message between them was lost on its way (event {} is next)",
                    m.delivery, m.seq
                ))));
            }
            *last = m.delivery;
        }
        Some(message)
    }

    /// Tells the server `message` is still being worked on, so it is not
    /// delivered again when [`ACK_WAIT`] passes before the acknowledgement.
    pub async fn still_working_on(&self, message: &StoredMessage) -> Result<(), StoreError> {
        message
            .message
            .ack_with(AckKind::Progress)
            .await
            .map_err(unavailable)
    }

    /// Acknowledges `message`, and on a subscription from
    /// [`EventStore::subscribe`] every message delivered before it.
    pub async fn ack_through(&self, message: &StoredMessage) -> Result<(), StoreError> {
        message
            .message
            .ack_with(AckKind::Ack)
            .await
            .map_err(unavailable)
    }
}

impl EventStore {
    /// Reads the messages on `subjects` (one subject, or a filter with
    /// wildcards) from sequence `from` on, in order, waiting for new ones
    /// once it has read what is stored.
    pub async fn read(&self, subjects: &str, from: u64) -> Result<Reader, StoreError> {
        let (consumer, ephemeral) = self.ordered(subjects, from).await?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok(Reader {
            messages: Some(messages),
            to_end: false,
            _consumer: ephemeral,
        })
    }

    /// Reads the whole log from sequence `from` on, in order, waiting for
    /// new messages once it has read what is stored.
    pub async fn read_log(&self, from: u64) -> Result<Reader, StoreError> {
        self.read(&events::all_subjects(&self.prefix), from).await
    }

    /// Reads what is stored on `subjects` from sequence `from` on, in
    /// order, and ends after the last of it (messages appended meanwhile
    /// may come too): a read that never waits for the next append, however
    /// rarely its subjects are written to.
    pub async fn read_stored(&self, subjects: &str, from: u64) -> Result<Reader, StoreError> {
        let (consumer, ephemeral) = self.ordered(subjects, from).await?;
        // Nothing there: done, without opening a pull that would wait.
        let messages = match consumer.cached_info().num_pending {
            0 => None,
            _ => Some(consumer.messages().await.map_err(unavailable)?),
        };
        Ok(Reader {
            messages,
            to_end: true,
            _consumer: ephemeral,
        })
    }

    /// An ordered consumer of `subjects` from sequence `from`, and what
    /// deletes it.
    async fn ordered(
        &self,
        subjects: &str,
        from: u64,
    ) -> Result<
        (
            jetstream::consumer::Consumer<pull::OrderedConfig>,
            Ephemeral,
        ),
        StoreError,
    > {
        let stream = self.stream().await?;
        let ephemeral = Ephemeral {
            js: self.js.clone(),
            stream: self.stream.clone(),
            name: format!("read-{}", uuid::Uuid::now_v7().simple()),
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                name: Some(ephemeral.name.clone()),
                filter_subject: subjects.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok((consumer, ephemeral))
    }

    /// The events of `subject` from sequence `from` on, appended to `out`:
    /// the part of a long aggregate that [`EventStore::load`] does not read
    /// with direct gets.
    pub(super) async fn load_rest(
        &self,
        subject: &str,
        from: u64,
        out: &mut Vec<StoredEvent>,
    ) -> Result<(), StoreError> {
        let mut reader = self.read_stored(subject, from).await?;
        while let Some(message) = reader.next().await {
            out.push(message?.decode()?);
        }
        Ok(())
    }

    /// Subscribes `name` durably to the events of `partition` (the whole
    /// log for [`Partition::WHOLE`]) from sequence `from` on, replacing any
    /// subscription of that name: one left by an earlier run may point
    /// anywhere. Each pull brings at most `batch_size` messages. A
    /// partition of a log split into several is read through its
    /// subjects' partition token, so the server delivers it only its own
    /// events; it must be a partition of this log's split.
    pub async fn subscribe(
        &self,
        name: &str,
        partition: Partition,
        from: u64,
        batch_size: usize,
    ) -> Result<Subscription, StoreError> {
        let filter_subject = match partition.count {
            1 => events::all_subjects(&self.prefix),
            n if n == self.partitions => events::partition_subjects(&self.prefix, partition.index),
            n => {
                return Err(StoreError::Misconfigured(format!(
                    "a partition of {n} cannot be read from a log split into {}",
                    self.partitions
                )));
            }
        };
        let stream = self.stream().await?;
        let _ = stream.delete_consumer(name).await;
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: jetstream::consumer::AckPolicy::All,
                ack_wait: ACK_WAIT,
                max_ack_pending: (batch_size * UNACKED_BATCHES) as i64,
                inactive_threshold: INACTIVE_THRESHOLD,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        // The consumer is new: its first delivery is number 1.
        Subscription::pulling(consumer, batch_size, Some(0)).await
    }

    /// Follows `subjects` durably as `name`, from where that subscription
    /// left off (or from the start of the log, the first time): the server
    /// keeps its position, so what it acknowledged is its checkpoint, across
    /// restarts of every process. Unlike [`EventStore::subscribe`], which a
    /// projector points at its own checkpoint on every start, this keeps an
    /// existing subscription as it is, and the server never drops it for
    /// being idle: a reaction must not miss an event because its process was
    /// down for a while. Messages come one at a time, each acknowledged on
    /// its own with [`Subscription::ack_through`].
    pub async fn follow(&self, name: &str, subjects: &str) -> Result<Subscription, StoreError> {
        let consumer: jetstream::consumer::PullConsumer = self
            .stream()
            .await?
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: subjects.to_owned(),
                    deliver_policy: DeliverPolicy::All,
                    // One message at a time, acknowledged on its own: when
                    // several processes follow, none acknowledges another's
                    // unfinished work.
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        Subscription::pulling(consumer, 1, None).await
    }

    /// Deletes the durable subscription `name` from the server.
    pub async fn unsubscribe(&self, name: &str) -> Result<(), StoreError> {
        self.js
            .delete_consumer_from_stream(name, &self.stream)
            .await
            .map(drop)
            .map_err(unavailable)
    }
}
