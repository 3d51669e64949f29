//! Publishing generated `agent.created` events straight to JetStream,
//! guarded like a create: the raw limit of the write rows, and the fill of
//! the projector's sandbox.

use std::future::IntoFuture;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::data;

/// `e` as the message a create appends: expected subject sequence 0 (a
/// fresh subject), and its event id as `Nats-Msg-Id` when `msg_id`.
pub fn guarded(e: &data::Event, msg_id: bool) -> PublishMessage {
    let mut headers = HeaderMap::new();
    if msg_id {
        headers.insert("Nats-Msg-Id", e.envelope.event_id.to_string().as_str());
    }
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    PublishMessage::build().payload(e.bytes()).headers(headers)
}

/// Publishes `count` generated `agent.created` events to `prefix` (a log
/// split `partitions` ways), `window` acks in flight, each [`guarded`].
pub async fn publish_pipelined(
    js: &jetstream::Context,
    prefix: &str,
    partitions: u32,
    from: u64,
    count: u64,
    window: usize,
    msg_id: bool,
) -> anyhow::Result<()> {
    let mut inflight = FuturesUnordered::new();
    for i in from..from + count {
        let e = data::event(&data::agent(i));
        let msg = guarded(&e, msg_id);
        inflight.push(
            js.send_publish(e.subject(prefix, partitions), msg)
                .await?
                .into_future(),
        );
        while inflight.len() >= window {
            if let Some(ack) = inflight.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = inflight.next().await {
        ack?;
    }
    Ok(())
}
