//! The data every row works with, made the same way for ours and for the
//! raw limit: one deterministic agent definition per index, as an HTTP body,
//! as the event bytes the command side stores, and as a read-model row.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use events::agent::{AgentCreated, AgentEvent};
use events::envelope::EventCodec;
use events::fields::{AgentStatus, AgentType, Capabilities, Config, Description, Name, Tags};
use events::{AggregateType, Envelope, EventMeta};
use serde_json::{Value, json};
use uuid::Uuid;

const ROLES: [&str; 8] = [
    "scout",
    "planner",
    "coder",
    "reviewer",
    "crawler",
    "summarizer",
    "translator",
    "router",
];
const TYPES: [&str; 4] = ["llm", "tool", "workflow", "retriever"];
const CAPABILITIES: [&str; 6] = ["search", "code", "browse", "plan", "review", "translate"];
const TEAMS: [&str; 5] = ["atlas", "borealis", "cygnus", "draco", "eridanus"];

/// The agent number `i` of a run: realistic sizes (an envelope of about
/// 600 bytes), varied enough for searches and filters.
pub fn agent(i: u64) -> AgentCreated {
    let role = ROLES[(i % 8) as usize];
    let name = format!("{role} agent {i}");
    let description = format!(
        "A {role} that works for team {} on batch {}; it reads, plans and reports back.",
        TEAMS[(i % 5) as usize],
        i / 1000
    );
    let caps = vec![
        CAPABILITIES[(i % 6) as usize].to_owned(),
        CAPABILITIES[((i / 6) % 6) as usize].to_owned(),
    ]
    .into_iter()
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect();
    let mut tags = BTreeMap::new();
    tags.insert("env".to_owned(), "bench".to_owned());
    tags.insert("team".to_owned(), TEAMS[(i % 5) as usize].to_owned());
    let parsed = (
        Name::parse("name", &name),
        AgentType::parse(TYPES[(i % 4) as usize]),
        Description::parse(&description),
        Capabilities::parse(caps),
        Config::parse(json!({"model": "m-1", "temperature": 0.2})),
        Tags::parse(tags),
    );
    match parsed {
        (Ok(name), Ok(agent_type), Ok(description), Ok(capabilities), Ok(config), Ok(tags)) => {
            AgentCreated {
                name,
                agent_type,
                description,
                status: AgentStatus::default(),
                capabilities,
                config,
                tags,
                project_id: None,
            }
        }
        // The generator only makes valid agents; a change to the field
        // rules that breaks this is a bug in the harness.
        _ => panic!("the generated agent {i} is not valid"),
    }
}

/// The `POST /agents` body of an agent.
pub fn body(a: &AgentCreated) -> Value {
    json!({
        "name": a.name.as_str(),
        "type": a.agent_type.as_str(),
        "description": a.description.as_str(),
        "capabilities": a.capabilities.as_slice(),
        "config": a.config.as_map(),
        "tags": a.tags.as_map(),
    })
}

/// An `agent.created` event as the command side stores it.
#[derive(Debug, Clone)]
pub struct Event {
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub envelope: Envelope,
}

pub const ACTOR: &str = "admin";

pub fn event(a: &AgentCreated) -> Event {
    let aggregate_id = Uuid::now_v7();
    let meta = EventMeta {
        aggregate_id,
        aggregate_version: 1,
        occurred_at: Utc::now().trunc_subsecs(6),
        actor: ACTOR.to_owned(),
        request_id: Uuid::now_v7().to_string(),
    };
    let ev = AgentEvent::Created(a.clone());
    let envelope = Envelope::new(
        Uuid::now_v7(),
        AggregateType::Agent,
        &meta,
        ev.event_type(),
        AgentEvent::SCHEMA_VERSION,
        ev.to_data(),
    );
    Event {
        aggregate_id,
        occurred_at: meta.occurred_at,
        envelope,
    }
}

impl Event {
    /// Its subject under `prefix` on a log split `partitions` ways.
    pub fn subject(&self, prefix: &str, partitions: u32) -> String {
        events::subject(prefix, AggregateType::Agent, self.aggregate_id, partitions)
    }

    pub fn bytes(&self) -> Bytes {
        // An envelope of plain strings, maps and ids always serializes.
        Bytes::from(serde_json::to_vec(&self.envelope).unwrap_or_default())
    }
}

/// The read-model columns, in the order [`csv_row`] writes them.
pub const AGENT_COLUMNS: &str = "id, name, type, description, status, capabilities, config, tags, \
     project_id, version, created_at, updated_at, created_by, last_seq";

fn csv_field(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

fn array_literal(items: &[String]) -> String {
    let mut s = String::from("{");
    for (k, item) in items.iter().enumerate() {
        if k > 0 {
            s.push(',');
        }
        s.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// One `agents` row as the projector writes it for `a` created by `e` at
/// stream sequence `seq`, as a line of `COPY … (FORMAT csv)`.
pub fn csv_row(out: &mut String, a: &AgentCreated, e: &Event, seq: u64) {
    let _ = write!(out, "{},", e.aggregate_id);
    csv_field(out, a.name.as_str());
    out.push(',');
    csv_field(out, a.agent_type.as_str());
    out.push(',');
    csv_field(out, a.description.as_str());
    out.push(',');
    csv_field(out, a.status.as_str());
    out.push(',');
    csv_field(out, &array_literal(a.capabilities.as_slice()));
    out.push(',');
    csv_field(
        out,
        &serde_json::to_string(a.config.as_map()).unwrap_or_default(),
    );
    out.push(',');
    csv_field(
        out,
        &serde_json::to_string(a.tags.as_map()).unwrap_or_default(),
    );
    let ts = e.occurred_at.to_rfc3339();
    let _ = writeln!(out, ",,1,{ts},{ts},{ACTOR},{seq}");
}

/// The `events` columns, in the order [`csv_event_row`] writes them.
pub const EVENT_COLUMNS: &str = "seq, event_id, event_type, schema_version, aggregate_type, \
     aggregate_id, aggregate_version, occurred_at, actor, request_id, data";

/// One `events` row as the projector writes it for `e` at stream sequence
/// `seq`, as a line of `COPY … (FORMAT csv)`.
pub fn csv_event_row(out: &mut String, e: &Event, seq: u64) {
    let env = &e.envelope;
    let _ = write!(
        out,
        "{seq},{},{},{},{},{},{},{},",
        env.event_id,
        env.event_type,
        env.schema_version,
        env.aggregate_type.as_str(),
        env.aggregate_id,
        env.aggregate_version,
        env.occurred_at.to_rfc3339(),
    );
    csv_field(out, &env.actor);
    out.push(',');
    csv_field(out, &env.request_id);
    out.push(',');
    csv_field(out, &env.data.to_string());
    out.push('\n');
}

/// The `agents` and `events` rows of agents `from..from + n` (stream
/// sequences `from + 1..`), as `COPY … (FORMAT csv)` input for each table.
pub fn csv_rows(from: u64, n: u64) -> (String, String) {
    let mut agents = String::with_capacity(n as usize * 400);
    let mut events = String::with_capacity(n as usize * 700);
    for i in from..from + n {
        let a = agent(i);
        let e = event(&a);
        csv_row(&mut agents, &a, &e, i + 1);
        csv_event_row(&mut events, &e, i + 1);
    }
    (agents, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_agents_are_valid_and_csv_quotes() {
        let a = agent(7);
        let e = event(&a);
        let mut line = String::new();
        csv_row(&mut line, &a, &e, 42);
        assert!(line.starts_with(&e.aggregate_id.to_string()));
        assert!(line.ends_with(",admin,42\n"));
        assert!(line.contains(r#""{""env"":""bench"",""team"":""cygnus""}""#));
        let mut s = String::new();
        csv_field(&mut s, "a\"b");
        assert_eq!(s, "\"a\"\"b\"");
        assert_eq!(
            array_literal(&["x".into(), "y\"z".into()]),
            "{\"x\",\"y\\\"z\"}"
        );
    }
}
