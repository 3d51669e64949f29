//! Appending events straight to the log, for tests of the read side that
//! need events the HTTP write side does not make (yet), or events at chosen
//! times. Every append is guarded like the command side's.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{AggregateType, Envelope, EventMeta};
use futures::{StreamExt, TryStreamExt};
use infra::event_store::MAX_BATCH;
use infra::{BatchItem, EventStore};
use serde_json::{Value, json};
use uuid::Uuid;

/// Appends events aggregate by aggregate, tracking each subject's last
/// sequence and each aggregate's version.
#[derive(Debug)]
pub struct Seeder {
    store: EventStore,
    last: HashMap<Uuid, (u64, u64)>,
    pub actor: String,
    pub request_id: String,
}

impl Seeder {
    pub fn new(store: &EventStore) -> Seeder {
        Seeder {
            store: store.clone(),
            last: HashMap::new(),
            actor: "seeder".into(),
            request_id: "seed-request".into(),
        }
    }

    /// Appends one event; returns its stream sequence. For an aggregate
    /// this seeder has not touched, the subject's state is read from the
    /// log first (it may have been created over HTTP).
    pub async fn append(
        &mut self,
        aggregate_type: AggregateType,
        id: Uuid,
        event_type: &str,
        data: Value,
        occurred_at: DateTime<Utc>,
    ) -> u64 {
        let subject = self.store.subject(aggregate_type, id);
        let (expected, version) = match self.last.get(&id) {
            Some(v) => *v,
            None => {
                let (events, last) = self.store.load(&subject).await.expect("load");
                (last, events.len() as u64)
            }
        };
        let meta = EventMeta {
            aggregate_id: id,
            aggregate_version: version + 1,
            occurred_at,
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
        };
        let env = Envelope::new(Uuid::now_v7(), aggregate_type, &meta, event_type, 1, data);
        let seq = self
            .store
            .append(&subject, expected, &env, None)
            .await
            .expect("append");
        self.last.insert(id, (seq, version + 1));
        seq
    }

    pub async fn agent(
        &mut self,
        id: Uuid,
        event_type: &str,
        data: Value,
        at: DateTime<Utc>,
    ) -> u64 {
        self.append(AggregateType::Agent, id, event_type, data, at)
            .await
    }

    pub async fn project(
        &mut self,
        id: Uuid,
        event_type: &str,
        data: Value,
        at: DateTime<Utc>,
    ) -> u64 {
        self.append(AggregateType::Project, id, event_type, data, at)
            .await
    }
}

/// Appends `count` `agent.created` events, each making an agent of its own,
/// in atomic batches of [`MAX_BATCH`] with a few batches in flight: the
/// quickest way to a long log. Returns the last sequence.
pub async fn agents_in_bulk(store: &EventStore, count: usize) -> u64 {
    let batches = (0..count).step_by(MAX_BATCH).map(|from| {
        let store = store.clone();
        async move {
            let made: Vec<(String, Envelope)> = (from..(from + MAX_BATCH).min(count))
                .map(|i| {
                    let id = Uuid::now_v7();
                    let meta = EventMeta {
                        aggregate_id: id,
                        aggregate_version: 1,
                        occurred_at: Utc::now(),
                        actor: "seeder".into(),
                        request_id: "seed-request".into(),
                    };
                    let data = agent_created(&format!("bulk {i}"), "seed", "active", &[], None);
                    let env = Envelope::new(
                        Uuid::now_v7(),
                        AggregateType::Agent,
                        &meta,
                        "agent.created",
                        1,
                        data,
                    );
                    (store.subject(AggregateType::Agent, id), env)
                })
                .collect();
            let items: Vec<BatchItem<'_>> = made
                .iter()
                .map(|(subject, envelope)| BatchItem {
                    subject,
                    expected: 0,
                    envelope,
                })
                .collect();
            store.append_batch(&items, None).await
        }
    });
    let seqs: Vec<Vec<u64>> = futures::stream::iter(batches)
        .buffer_unordered(4)
        .try_collect()
        .await
        .expect("append a batch");
    seqs.into_iter().flatten().max().unwrap_or(0)
}

/// The data of an `agent.created` event with every field given.
pub fn agent_created(
    name: &str,
    agent_type: &str,
    status: &str,
    capabilities: &[&str],
    project_id: Option<Uuid>,
) -> Value {
    json!({
        "name": name,
        "type": agent_type,
        "description": "",
        "status": status,
        "capabilities": capabilities,
        "config": {},
        "tags": {},
        "project_id": project_id,
    })
}

/// The data of a `project.created` event.
pub fn project_created(name: &str) -> Value {
    json!({ "name": name, "description": "" })
}
