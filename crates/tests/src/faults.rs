//! Faults the system never causes on its own, injected by talking to NATS
//! directly with a client of the test's own, so that the event store's API
//! carries no door meant only for tests.

use bytes::Bytes;
use infra::BatchItem;
use infra::config::NatsConfig;
use uuid::Uuid;

/// Sends the first `after` events of `items` as an atomic batch (ADR-50)
/// and abandons it before its commit, as a writer killed in the middle of a
/// bulk write would. Panics if the server refuses any part it was sent.
pub async fn abandon_batch(nats: &NatsConfig, items: &[BatchItem<'_>], after: usize) {
    let client = async_nats::connect(&nats.nats_url)
        .await
        .expect("connect to NATS");
    let batch_id = Uuid::now_v7().simple().to_string();
    for (i, item) in items[..after].iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", batch_id.as_str());
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            item.expected.to_string().as_str(),
        );
        let subject = item.subject.to_owned();
        let payload = Bytes::from(serde_json::to_vec(item.envelope).expect("an envelope"));
        // As the event store does, every hundredth message waits for the
        // server to take the batch so far.
        if i % 100 == 0 {
            let reply = client
                .request_with_headers(subject, headers, payload)
                .await
                .expect("the server answers a batch message");
            assert!(
                !String::from_utf8_lossy(&reply.payload).contains("\"error\""),
                "the server refused the batch: {}",
                String::from_utf8_lossy(&reply.payload)
            );
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .expect("publish a batch message");
        }
    }
    client.flush().await.expect("flush to NATS");
}
