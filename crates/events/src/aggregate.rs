//! What every aggregate is: a state with a version, events it can decode and
//! encode, a pure `decide` and an infallible `evolve`. The write side loads,
//! caches and appends any aggregate through this one trait.

use crate::agent::{self, AgentCommand, AgentError, AgentEvent, AgentState};
use crate::envelope::{AggregateType, DecodeError, Envelope, EventCodec, Recorded};
use crate::project::{self, ProjectCommand, ProjectError, ProjectEvent, ProjectState};

pub trait Aggregate: Clone + Default + Send + Sync + 'static {
    type Event: EventCodec + Clone + Send + Sync + 'static;
    type Command: Send;
    type Error: std::error::Error + Send + Sync + 'static;

    const TYPE: AggregateType;

    /// How many events the aggregate has had.
    fn version(&self) -> u64;
    fn decode(envelope: &Envelope) -> Result<Self::Event, DecodeError> {
        Self::Event::decode(envelope)
    }
    fn event_type(event: &Self::Event) -> &'static str {
        event.event_type()
    }
    fn schema_version(_event: &Self::Event) -> u32 {
        Self::Event::SCHEMA_VERSION
    }
    fn to_data(event: &Self::Event) -> serde_json::Value {
        event.to_data()
    }
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    fn evolve(self, event: &Recorded<Self::Event>) -> Self;
}

impl Aggregate for AgentState {
    type Event = AgentEvent;
    type Command = AgentCommand;
    type Error = AgentError;
    const TYPE: AggregateType = AggregateType::Agent;

    fn version(&self) -> u64 {
        AgentState::version(self)
    }
    fn decide(&self, command: AgentCommand) -> Result<Vec<AgentEvent>, AgentError> {
        agent::decide(self, command)
    }
    fn evolve(self, event: &Recorded<AgentEvent>) -> Self {
        agent::evolve(self, event)
    }
}

impl Aggregate for ProjectState {
    type Event = ProjectEvent;
    type Command = ProjectCommand;
    type Error = ProjectError;
    const TYPE: AggregateType = AggregateType::Project;

    fn version(&self) -> u64 {
        ProjectState::version(self)
    }
    fn decide(&self, command: ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        project::decide(self, command)
    }
    fn evolve(self, event: &Recorded<ProjectEvent>) -> Self {
        project::evolve(self, event)
    }
}
