//! The command service: load an aggregate from the log, decide, append
//! guarded by the expected subject sequence.

use chrono::{SubsecRound, Utc};
use events::agent::{self, AgentCommand, AgentCreated, AgentError, AgentEvent, AgentState};
use events::project::{self, ProjectEvent, ProjectState};
use events::{AggregateType, Envelope, EventMeta, Recorded};
use infra::http::ApiError;
use infra::{EventStore, StoreError};
use uuid::Uuid;

/// Who is writing and on behalf of which request: recorded in every event.
#[derive(Debug, Clone)]
pub struct WriteContext {
    pub actor: String,
    pub request_id: String,
    /// The W3C trace context of the HTTP request, carried into the NATS
    /// headers so the projection continues the same trace.
    pub traceparent: Option<String>,
}

/// The outcome of a write: the agent as it now is, and the stream sequence
/// of the last event appended (or of the current state, when nothing was).
#[derive(Debug, Clone)]
pub struct Written {
    pub agent: agent::Agent,
    pub seq: u64,
}

/// Decides and appends agent commands.
#[derive(Debug)]
pub struct AgentService {
    store: EventStore,
}

impl AgentService {
    pub fn new(store: EventStore) -> Self {
        AgentService { store }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Creates a new agent with a server-made UUID v7.
    #[tracing::instrument(skip_all, fields(agent_id), err(level = "debug"))]
    pub async fn create(
        &self,
        ctx: &WriteContext,
        created: AgentCreated,
    ) -> Result<Written, ApiError> {
        if let Some(project_id) = created.project_id {
            self.require_project(project_id).await?;
        }
        let id = Uuid::now_v7();
        tracing::Span::current().record("agent_id", tracing::field::display(id));
        let state = AgentState::Absent;
        let events = agent::decide(&state, AgentCommand::Create(created)).map_err(domain_error)?;
        self.commit(id, state, 0, events, ctx).await
    }

    /// Appends `events` one by one, each guarded by the sequence the
    /// previous one got, and folds them into `state`.
    async fn commit(
        &self,
        id: Uuid,
        mut state: AgentState,
        mut expected: u64,
        events: Vec<AgentEvent>,
        ctx: &WriteContext,
    ) -> Result<Written, ApiError> {
        let subject = self.store.subject(AggregateType::Agent, id);
        for event in events {
            let meta = EventMeta {
                aggregate_id: id,
                aggregate_version: state.version() + 1,
                // PostgreSQL keeps microseconds: record no more, so the
                // write's answer and every later read agree to the digit.
                occurred_at: Utc::now().trunc_subsecs(6),
                actor: ctx.actor.clone(),
                request_id: ctx.request_id.clone(),
            };
            let envelope = Envelope::new(
                Uuid::now_v7(),
                AggregateType::Agent,
                &meta,
                event.event_type(),
                AgentEvent::SCHEMA_VERSION,
                event.to_data(),
            );
            expected = self
                .store
                .append(&subject, expected, &envelope, ctx.traceparent.as_deref())
                .await?;
            state = agent::evolve(state, &Recorded { meta, event });
        }
        match state {
            AgentState::Live(agent) | AgentState::Deleted(agent) => Ok(Written {
                agent,
                seq: expected,
            }),
            AgentState::Absent => Err(ApiError::Internal(anyhow::anyhow!(
                "commit left agent {id} absent"
            ))),
        }
    }

    /// An agent's state and its subject's last sequence, from the log.
    pub async fn load_agent(&self, id: Uuid) -> Result<(AgentState, u64), ApiError> {
        let subject = self.store.subject(AggregateType::Agent, id);
        let (stored, last) = self.store.load(&subject).await?;
        let mut state = AgentState::Absent;
        for e in &stored {
            let recorded = AgentEvent::recorded(&e.envelope).map_err(|err| corrupt(e.seq, err))?;
            state = agent::evolve(state, &recorded);
        }
        Ok((state, last))
    }

    /// A project's state, from the log.
    pub async fn load_project(&self, id: Uuid) -> Result<ProjectState, ApiError> {
        let subject = self.store.subject(AggregateType::Project, id);
        let (stored, _) = self.store.load(&subject).await?;
        let mut state = ProjectState::Absent;
        for e in &stored {
            let recorded =
                ProjectEvent::recorded(&e.envelope).map_err(|err| corrupt(e.seq, err))?;
            state = project::evolve(state, &recorded);
        }
        Ok(state)
    }

    /// 422 on `project_id` unless the log says the project exists.
    async fn require_project(&self, id: Uuid) -> Result<(), ApiError> {
        if self.load_project(id).await?.exists() {
            Ok(())
        } else {
            Err(ApiError::invalid_field("project_id", "no such project"))
        }
    }
}

fn corrupt(seq: u64, err: events::DecodeError) -> ApiError {
    ApiError::from(StoreError::Corrupt {
        seq,
        reason: err.to_string(),
    })
}

fn domain_error(e: AgentError) -> ApiError {
    match e {
        AgentError::NotFound => ApiError::NotFound("no such agent".into()),
        AgentError::AlreadyExists => ApiError::Conflict("the agent already exists".into()),
    }
}
