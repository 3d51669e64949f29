//! Appending events straight to the log, for tests of the read side that
//! need events the HTTP write side does not make (yet), or events at chosen
//! times. Every append is guarded like the command side's.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{AggregateType, Envelope, EventMeta};
use infra::EventStore;
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
