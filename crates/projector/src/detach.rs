//! The process manager that detaches a deleted project's agents.
//!
//! Deleting a project appends `project.deleted` and nothing else. The agents
//! that were in it live on, each detached by an `agent.updated` event that
//! sets `project_id` to null, so the log tells the whole story. That reaction
//! is driven by the log, not by the request that deleted the project: a
//! durable JetStream subscription to the project subjects, whose
//! acknowledgements are its checkpoint, sees every `project.deleted` however
//! often processes restarted in between, and acknowledges one only once every
//! member is detached.
//!
//! Every append here is safe to repeat, so a redelivery (a crash between the
//! appends and the acknowledgement) or two projectors handling the same
//! deletion append nothing new:
//! * its event id (`Nats-Msg-Id`) is derived from the deletion's event id
//!   and the agent's id, so JetStream drops a copy within its duplicate
//!   window, and beyond it the agent's subject shows the event is there;
//! * it is decided against the agent's state in the log, guarded by the
//!   agent's expected subject sequence: an agent no longer in the project is
//!   left alone, and a concurrent write makes us decide again.
//!
//! The members are read from the read model once the live projection has
//! applied the deletion: every agent that joined the project before the
//! deletion is in it by then, and one that joins after is refused by the
//! command API, or detached by its own write (which checks the project again
//! after appending).

use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use events::agent::{AgentChanges, AgentCommand, AgentState};
use events::envelope::EventCodec;
use events::{Aggregate, AggregateType, Envelope, EventMeta, Recorded};
use infra::event_store::{StoredMessage, Subscription};
use infra::telemetry::TraceHeaders;
use infra::{EventStore, StoreError, StoredEvent};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The durable subscription's name: its position on the server is the
/// process manager's checkpoint.
pub const SUBSCRIPTION: &str = "ymera-detach-agents";

/// How often a write that lost a race to another writer is decided again.
const MAX_ATTEMPTS: u32 = 10;
/// How often the projection's checkpoint is read while waiting for it.
const POLL: Duration = Duration::from_millis(20);
/// How often the server is told a deletion is still being handled (well
/// within the subscription's acknowledgement wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Why detaching stopped; the loop backs off and resumes from the last
/// acknowledged deletion.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the read model could not be read: {0}")]
    ReadModel(#[from] sqlx::Error),
    #[error("the subscription ended")]
    Ended,
}

/// Detaches the agents of deleted projects, as long as the process runs.
#[derive(Debug, Clone)]
pub struct Detacher {
    store: EventStore,
    pool: PgPool,
}

impl Detacher {
    pub fn new(store: EventStore, pool: PgPool) -> Self {
        Detacher { store, pool }
    }

    /// Follows the project events until `shutdown`, backing off while a
    /// dependency is down and resuming where the subscription left off.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = tokio::select! {
                _ = shutdown.cancelled() => return,
                Err(error) = self.follow() => error,
            };
            tracing::warn!(%error, "detaching the agents of deleted projects failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn follow(&self) -> Result<(), DetachError> {
        let subjects = events::type_subjects(self.store.prefix(), AggregateType::Project);
        let mut subscription = self.store.follow(SUBSCRIPTION, &subjects).await?;
        while let Some(message) = subscription.next().await {
            let message = message?;
            match message.decode() {
                Ok(event) if event.envelope.event_type == events::project::DELETED => {
                    self.detach_members(&event, &message, &subscription).await?;
                }
                Ok(_) => {}
                // The projector parks it; there is nothing to react to.
                Err(error) => {
                    tracing::warn!(seq = message.seq, %error, "skipping an unreadable event")
                }
            }
            subscription.ack_through(&message).await?;
        }
        Err(DetachError::Ended)
    }

    /// Detaches every agent that was in the project `deletion` deleted.
    #[tracing::instrument(skip_all, fields(project = %deletion.envelope.aggregate_id, seq = deletion.seq, agents), err)]
    async fn detach_members(
        &self,
        deletion: &StoredEvent,
        message: &StoredMessage,
        subscription: &Subscription,
    ) -> Result<(), DetachError> {
        let mut progress = Instant::now();
        while infra::projection::checkpoint(&self.pool).await? < deletion.seq {
            if progress.elapsed() > PROGRESS_EVERY {
                subscription.still_working_on(message).await?;
                progress = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
        let project = deletion.envelope.aggregate_id;
        // The detaches are part of the deletion's request: same trace.
        let trace = message
            .trace()
            .map_or_else(TraceHeaders::default, |c| TraceHeaders::extract(&c));
        let members: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents WHERE project_id = $1")
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        tracing::Span::current().record("agents", members.len());
        for agent in members {
            self.detach(deletion, &trace, agent).await?;
            if progress.elapsed() > PROGRESS_EVERY {
                subscription.still_working_on(message).await?;
                progress = Instant::now();
            }
        }
        Ok(())
    }

    /// Moves `agent` out of the project `deletion` deleted, unless it has
    /// left it already (or this very detach is in the log).
    async fn detach(
        &self,
        deletion: &StoredEvent,
        trace: &TraceHeaders,
        agent: Uuid,
    ) -> Result<(), DetachError> {
        let project = deletion.envelope.aggregate_id;
        let event_id = detach_event_id(deletion.envelope.event_id, agent);
        let subject = self.store.subject(AggregateType::Agent, agent);
        for _ in 0..MAX_ATTEMPTS {
            let (stored, last) = self.store.load(&subject).await?;
            if stored.iter().any(|e| e.envelope.event_id == event_id) {
                return Ok(());
            }
            let state = fold(&stored)?;
            if state.live().is_none_or(|a| a.project_id != Some(project)) {
                return Ok(());
            }
            let update = AgentCommand::Update(AgentChanges {
                project_id: Some(None),
                ..Default::default()
            });
            // Decided on a live agent that is in the project: one event.
            let Ok(decided) = state.decide(update) else {
                return Ok(());
            };
            let Some(event) = decided.into_iter().next() else {
                return Ok(());
            };
            let meta = EventMeta {
                aggregate_id: agent,
                aggregate_version: state.version() + 1,
                occurred_at: Utc::now().trunc_subsecs(6),
                // The detach is part of what the deletion's author did.
                actor: deletion.envelope.actor.clone(),
                request_id: deletion.envelope.request_id.clone(),
            };
            let envelope = Envelope::new(
                event_id,
                AggregateType::Agent,
                &meta,
                event.event_type(),
                <AgentState as Aggregate>::Event::SCHEMA_VERSION,
                event.to_data(),
            );
            match self
                .store
                .append(&subject, last, &envelope, Some(trace))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict.into())
    }
}

/// The id of the event that detaches `agent` because of the deletion
/// `deletion`: the same on every attempt, by any process.
pub fn detach_event_id(deletion: Uuid, agent: Uuid) -> Uuid {
    Uuid::new_v5(&deletion, agent.as_bytes())
}

/// An agent's state from its events.
fn fold(stored: &[StoredEvent]) -> Result<AgentState, StoreError> {
    stored.iter().try_fold(AgentState::default(), |state, e| {
        let event = AgentState::decode(&e.envelope).map_err(|err| StoreError::Corrupt {
            seq: e.seq,
            reason: err.to_string(),
        })?;
        Ok(state.evolve(&Recorded {
            meta: e.envelope.meta(),
            event,
        }))
    })
}
