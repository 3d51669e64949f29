//! The agent aggregate: its events, state, commands, `decide` and `evolve`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::{Recorded, lifecycle_codec};
use crate::fields::{
    AgentStatus, AgentType, Capabilities, Config, Description, Name, Tags, apply_change,
};

pub const CREATED: &str = "agent.created";
pub const UPDATED: &str = "agent.updated";
pub const DELETED: &str = "agent.deleted";

/// Every agent event type, for filters and documentation.
pub const EVENT_TYPES: [&str; 3] = [CREATED, UPDATED, DELETED];

/// The full definition of a new agent. Also the body of `agent.created` v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCreated {
    pub name: Name,
    #[serde(rename = "type")]
    pub agent_type: AgentType,
    pub description: Description,
    pub status: AgentStatus,
    pub capabilities: Capabilities,
    pub config: Config,
    pub tags: Tags,
    pub project_id: Option<Uuid>,
}

/// The fields an update changed, and only those. Also the body of
/// `agent.updated` v1. `project_id: Some(None)` moves the agent out of its
/// project.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub agent_type: Option<AgentType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Description>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Config>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::agent::double_option"
    )]
    pub project_id: Option<Option<Uuid>>,
}

impl AgentChanges {
    pub fn is_empty(&self) -> bool {
        *self == AgentChanges::default()
    }
}

/// Something that happened to an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    Created(AgentCreated),
    Updated(AgentChanges),
    Deleted,
}

lifecycle_codec!(AgentEvent: CREATED, UPDATED, DELETED);

/// An agent as the log says it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agent {
    pub id: Uuid,
    pub name: Name,
    #[serde(rename = "type")]
    pub agent_type: AgentType,
    pub description: Description,
    pub status: AgentStatus,
    pub capabilities: Capabilities,
    pub config: Config,
    pub tags: Tags,
    pub project_id: Option<Uuid>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
}

impl Agent {
    fn apply(&mut self, c: &AgentChanges) {
        apply_change(&mut self.name, &c.name);
        apply_change(&mut self.agent_type, &c.agent_type);
        apply_change(&mut self.description, &c.description);
        apply_change(&mut self.status, &c.status);
        apply_change(&mut self.capabilities, &c.capabilities);
        apply_change(&mut self.config, &c.config);
        apply_change(&mut self.tags, &c.tags);
        apply_change(&mut self.project_id, &c.project_id);
    }

    /// The subset of `patch` that differs from this agent: what an update
    /// actually changes.
    pub fn diff(&self, patch: &AgentChanges) -> AgentChanges {
        fn changed<T: PartialEq + Clone>(new: &Option<T>, old: &T) -> Option<T> {
            new.as_ref().filter(|n| *n != old).cloned()
        }
        AgentChanges {
            name: changed(&patch.name, &self.name),
            agent_type: changed(&patch.agent_type, &self.agent_type),
            description: changed(&patch.description, &self.description),
            status: changed(&patch.status, &self.status),
            capabilities: changed(&patch.capabilities, &self.capabilities),
            config: changed(&patch.config, &self.config),
            tags: changed(&patch.tags, &self.tags),
            project_id: changed(&patch.project_id, &self.project_id),
        }
    }
}

/// An agent aggregate's state, rebuilt by folding its events.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AgentState {
    /// No event yet.
    #[default]
    Absent,
    Live(Agent),
    /// Deleted agents keep their last state for history and `as_of`, but no
    /// command may touch them again.
    Deleted(Agent),
}

impl AgentState {
    /// The aggregate's version: how many events it has.
    pub fn version(&self) -> u64 {
        match self {
            AgentState::Absent => 0,
            AgentState::Live(a) | AgentState::Deleted(a) => a.version,
        }
    }

    pub fn live(&self) -> Option<&Agent> {
        match self {
            AgentState::Live(a) => Some(a),
            _ => None,
        }
    }
}

/// What a writer asks of an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    Create(AgentCreated),
    Update(AgentChanges),
    Delete,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("an agent with this id already exists")]
    AlreadyExists,
    #[error("no such agent")]
    NotFound,
}

/// Decides what `command` means for an agent in `state`.
///
/// An update that changes nothing yields no event, so a repeated write does
/// not grow the log.
pub fn decide(state: &AgentState, command: AgentCommand) -> Result<Vec<AgentEvent>, AgentError> {
    match (state, command) {
        (AgentState::Absent, AgentCommand::Create(c)) => Ok(vec![AgentEvent::Created(c)]),
        (_, AgentCommand::Create(_)) => Err(AgentError::AlreadyExists),
        (AgentState::Live(agent), AgentCommand::Update(patch)) => {
            let changes = agent.diff(&patch);
            Ok(if changes.is_empty() {
                vec![]
            } else {
                vec![AgentEvent::Updated(changes)]
            })
        }
        (AgentState::Live(_), AgentCommand::Delete) => Ok(vec![AgentEvent::Deleted]),
        (AgentState::Absent | AgentState::Deleted(_), _) => Err(AgentError::NotFound),
    }
}

/// Applies one recorded event. Cannot fail: events are facts. An event that
/// makes no sense in the state (which the guarded append rules out) leaves
/// the state as it was.
pub fn evolve(state: AgentState, recorded: &Recorded<AgentEvent>) -> AgentState {
    let meta = &recorded.meta;
    match (state, &recorded.event) {
        (AgentState::Absent, AgentEvent::Created(c)) => AgentState::Live(Agent {
            id: meta.aggregate_id,
            name: c.name.clone(),
            agent_type: c.agent_type.clone(),
            description: c.description.clone(),
            status: c.status,
            capabilities: c.capabilities.clone(),
            config: c.config.clone(),
            tags: c.tags.clone(),
            project_id: c.project_id,
            version: meta.aggregate_version,
            created_at: meta.occurred_at,
            updated_at: meta.occurred_at,
            created_by: meta.actor.clone(),
        }),
        (AgentState::Live(mut a), AgentEvent::Updated(changes)) => {
            a.apply(changes);
            a.version = meta.aggregate_version;
            a.updated_at = meta.occurred_at;
            AgentState::Live(a)
        }
        (AgentState::Live(mut a), AgentEvent::Deleted) => {
            a.version = meta.aggregate_version;
            a.updated_at = meta.occurred_at;
            AgentState::Deleted(a)
        }
        (state, _) => state,
    }
}

/// Folds a sequence of recorded events from the empty state.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Recorded<AgentEvent>>) -> AgentState {
    events.into_iter().fold(AgentState::Absent, evolve)
}

/// Serde support for `Option<Option<T>>`: absent, `null`, or a value.
pub mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    //! Given / when / then: given past events, when a command is decided,
    //! then these events (or this error) follow; and folding them gives the
    //! expected state.
    use super::*;
    use crate::envelope::{AggregateType, DecodeError, Envelope, EventCodec, EventMeta};

    fn meta(version: u64) -> EventMeta {
        EventMeta {
            aggregate_id: Uuid::nil(),
            aggregate_version: version,
            occurred_at: DateTime::from_timestamp(1_700_000_000 + version as i64, 0).unwrap(),
            actor: "alice".into(),
            request_id: format!("req-{version}"),
        }
    }

    fn created() -> AgentCreated {
        AgentCreated {
            name: Name::parse("name", "Scout").unwrap(),
            agent_type: AgentType::parse("llm").unwrap(),
            description: Description::empty(),
            status: AgentStatus::Active,
            capabilities: Capabilities::parse(vec!["search".into()]).unwrap(),
            config: Config::default(),
            tags: Tags::default(),
            project_id: None,
        }
    }

    /// Given these events, when `command`, then the outcome.
    fn given(events: Vec<AgentEvent>) -> AgentState {
        let recorded: Vec<_> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Recorded {
                meta: meta(i as u64 + 1),
                event,
            })
            .collect();
        fold(&recorded)
    }

    #[test]
    fn create_on_nothing_yields_created() {
        let state = given(vec![]);
        let events = decide(&state, AgentCommand::Create(created())).unwrap();
        assert_eq!(events, vec![AgentEvent::Created(created())]);
    }

    #[test]
    fn create_twice_is_refused() {
        let state = given(vec![AgentEvent::Created(created())]);
        assert_eq!(
            decide(&state, AgentCommand::Create(created())),
            Err(AgentError::AlreadyExists)
        );
    }

    #[test]
    fn update_emits_only_changed_fields() {
        let state = given(vec![AgentEvent::Created(created())]);
        let patch = AgentChanges {
            name: Some(Name::parse("name", "Scout").unwrap()),
            status: Some(AgentStatus::Paused),
            ..Default::default()
        };
        let events = decide(&state, AgentCommand::Update(patch)).unwrap();
        assert_eq!(
            events,
            vec![AgentEvent::Updated(AgentChanges {
                status: Some(AgentStatus::Paused),
                ..Default::default()
            })]
        );
    }

    #[test]
    fn update_that_changes_nothing_yields_no_event() {
        let state = given(vec![AgentEvent::Created(created())]);
        let patch = AgentChanges {
            status: Some(AgentStatus::Active),
            ..Default::default()
        };
        assert_eq!(decide(&state, AgentCommand::Update(patch)), Ok(vec![]));
    }

    #[test]
    fn deleted_agents_refuse_every_command() {
        let state = given(vec![AgentEvent::Created(created()), AgentEvent::Deleted]);
        assert_eq!(
            decide(&state, AgentCommand::Delete),
            Err(AgentError::NotFound)
        );
        assert_eq!(
            decide(&state, AgentCommand::Update(AgentChanges::default())),
            Err(AgentError::NotFound)
        );
        assert_eq!(given(vec![]).version(), 0);
        assert_eq!(
            decide(&given(vec![]), AgentCommand::Delete),
            Err(AgentError::NotFound)
        );
    }

    #[test]
    fn evolve_tracks_version_times_and_actor() {
        let state = given(vec![
            AgentEvent::Created(created()),
            AgentEvent::Updated(AgentChanges {
                project_id: Some(Some(Uuid::from_u128(7))),
                ..Default::default()
            }),
        ]);
        let agent = state.live().unwrap();
        assert_eq!(agent.version, 2);
        assert_eq!(agent.created_at, meta(1).occurred_at);
        assert_eq!(agent.updated_at, meta(2).occurred_at);
        assert_eq!(agent.created_by, "alice");
        assert_eq!(agent.project_id, Some(Uuid::from_u128(7)));
    }

    #[test]
    fn events_round_trip_through_the_envelope() {
        let cases = vec![
            AgentEvent::Created(created()),
            AgentEvent::Updated(AgentChanges {
                project_id: Some(None),
                ..Default::default()
            }),
            AgentEvent::Deleted,
        ];
        for event in cases {
            let env = Envelope::new(
                Uuid::now_v7(),
                AggregateType::Agent,
                &meta(1),
                event.event_type(),
                AgentEvent::SCHEMA_VERSION,
                event.to_data(),
            );
            let bytes = serde_json::to_vec(&env).unwrap();
            let back: Envelope = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(AgentEvent::decode(&back).unwrap(), event);
        }
    }

    #[test]
    fn update_can_clear_the_project() {
        let json = serde_json::json!({ "project_id": null });
        let changes: AgentChanges = serde_json::from_value(json).unwrap();
        assert_eq!(changes.project_id, Some(None));
        let absent: AgentChanges = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(absent.project_id, None);
    }

    #[test]
    fn unknown_types_and_versions_are_decode_errors() {
        let mut env = Envelope::new(
            Uuid::now_v7(),
            AggregateType::Agent,
            &meta(1),
            "agent.renamed",
            1,
            serde_json::json!({}),
        );
        assert!(matches!(
            AgentEvent::decode(&env),
            Err(DecodeError::UnknownType(_))
        ));
        env.event_type = CREATED.into();
        env.schema_version = 9;
        assert!(matches!(
            AgentEvent::decode(&env),
            Err(DecodeError::UnknownVersion { .. })
        ));
        env.schema_version = 1;
        assert!(matches!(
            AgentEvent::decode(&env),
            Err(DecodeError::BadData { .. })
        ));
    }
}
