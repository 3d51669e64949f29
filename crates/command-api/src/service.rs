//! The write model: what each write endpoint does, on top of the cached
//! repositories. Cross-aggregate rules live here: an agent may only join a
//! project that exists (decided from the project's own events), and deleting
//! a project detaches its agents.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use events::agent::{Agent, AgentChanges, AgentCommand, AgentCreated, AgentEvent, AgentState};
use events::envelope::EventCodec;
use events::project::{self, ProjectChanges, ProjectCommand, ProjectCreated, ProjectState};
use events::{AggregateType, Envelope, Recorded};
use infra::http::{ApiError, ProblemItem};
use infra::projection::ProjectionWatch;
use infra::{BatchItem, EventStore};
use sqlx::PgPool;
use uuid::Uuid;

pub use crate::repo::{Committed, Repository, WriteContext};

/// Every write the API can make.
#[derive(Debug)]
pub struct Commands {
    pub agents: Repository<AgentState>,
    pub projects: Repository<ProjectState>,
    store: EventStore,
    pool: PgPool,
    watch: ProjectionWatch,
    projection_wait: Duration,
}

/// A created, updated or deleted agent and the sequence of the last event.
pub type AgentWrite = Committed<AgentState>;

fn live(state: &AgentState) -> Result<&Agent, ApiError> {
    state
        .live()
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))
}

impl Commands {
    pub fn new(
        store: EventStore,
        pool: PgPool,
        watch: ProjectionWatch,
        projection_wait: Duration,
    ) -> Self {
        Commands {
            agents: Repository::new(store.clone()),
            projects: Repository::new(store.clone()),
            store,
            pool,
            watch,
            projection_wait,
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Whether the log says `project` exists (not deleted) right now.
    async fn project_exists(&self, project: Uuid) -> Result<bool, ApiError> {
        let subject = self.store.subject(AggregateType::Project, project);
        Ok(match self.store.last_on_subject(&subject).await? {
            None => false,
            Some(last) => last.envelope.event_type != project::DELETED,
        })
    }

    /// 422 on `project_id` unless the project exists.
    async fn require_project(&self, project: Option<Uuid>) -> Result<(), ApiError> {
        match project {
            Some(p) if !self.project_exists(p).await? => {
                Err(ApiError::invalid_field("project_id", "no such project"))
            }
            _ => Ok(()),
        }
    }

    /// Closes the race between "the project exists" and our append: if the
    /// project was deleted in between, the agent is detached again, so no
    /// live agent points at a deleted project.
    async fn detach_if_project_gone(
        &self,
        ctx: &WriteContext,
        agent: Uuid,
        project: Uuid,
    ) -> Result<Option<AgentWrite>, ApiError> {
        if self.project_exists(project).await? {
            return Ok(None);
        }
        tracing::info!(%agent, %project, "project deleted while the agent joined it; detaching");
        self.detach(ctx, agent, project).await
    }

    /// Moves `agent` out of `project` if it is still in it.
    async fn detach(
        &self,
        ctx: &WriteContext,
        agent: Uuid,
        project: Uuid,
    ) -> Result<Option<AgentWrite>, ApiError> {
        let result = self
            .agents
            .execute(agent, ctx, None, |state| {
                let still_in = state.live().is_some_and(|a| a.project_id == Some(project));
                Ok(AgentCommand::Update(if still_in {
                    AgentChanges {
                        project_id: Some(None),
                        ..Default::default()
                    }
                } else {
                    AgentChanges::default()
                }))
            })
            .await;
        match result {
            Ok(w) => Ok(Some(w)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(skip_all, fields(agent_id), err(level = "debug"))]
    pub async fn create_agent(
        &self,
        ctx: &WriteContext,
        created: AgentCreated,
    ) -> Result<AgentWrite, ApiError> {
        let project = created.project_id;
        self.require_project(project).await?;
        let id = Uuid::now_v7();
        tracing::Span::current().record("agent_id", tracing::field::display(id));
        // A fresh UUID v7 has no events: nothing to load. The append still
        // expects an empty subject, so a collision would be a conflict.
        self.agents.remember(id, AgentState::Absent, 0).await;
        let written = self
            .agents
            .execute(id, ctx, None, |_| Ok(AgentCommand::Create(created.clone())))
            .await?;
        if let Some(p) = project
            && let Some(detached) = self.detach_if_project_gone(ctx, id, p).await?
        {
            return Ok(detached);
        }
        Ok(written)
    }

    #[tracing::instrument(skip_all, fields(agent_id = %id), err(level = "debug"))]
    pub async fn update_agent(
        &self,
        ctx: &WriteContext,
        id: Uuid,
        if_match: Option<u64>,
        patch: AgentChanges,
    ) -> Result<AgentWrite, ApiError> {
        let joins = patch.project_id.flatten();
        if let Some(p) = joins
            && !self.project_exists(p).await?
        {
            // Tell a missing agent (404) from a missing project (422); an
            // agent already in that project is a no-op, not an error.
            let (state, _) = self.agents.load(id).await?;
            let agent = live(&state)?;
            if agent.project_id != Some(p) {
                return Err(ApiError::invalid_field("project_id", "no such project"));
            }
        }
        let written = self
            .agents
            .execute(id, ctx, if_match, |state| {
                live(state)?;
                Ok(AgentCommand::Update(patch.clone()))
            })
            .await?;
        if let Some(p) = joins
            && written.appended
            && let Some(detached) = self.detach_if_project_gone(ctx, id, p).await?
        {
            return Ok(detached);
        }
        Ok(written)
    }

    #[tracing::instrument(skip_all, fields(agent_id = %id), err(level = "debug"))]
    pub async fn delete_agent(
        &self,
        ctx: &WriteContext,
        id: Uuid,
        if_match: Option<u64>,
    ) -> Result<AgentWrite, ApiError> {
        self.agents
            .execute(id, ctx, if_match, |_| Ok(AgentCommand::Delete))
            .await
    }

    /// Creates every agent or none, in one atomic batch.
    #[tracing::instrument(skip_all, fields(agents = items.len()), err(level = "debug"))]
    pub async fn bulk_create(
        &self,
        ctx: &WriteContext,
        items: Vec<AgentCreated>,
    ) -> Result<(Vec<Agent>, u64), ApiError> {
        // Every referenced project must exist; list each item that names a
        // missing one.
        let projects: BTreeSet<Uuid> = items.iter().filter_map(|c| c.project_id).collect();
        let mut missing = BTreeSet::new();
        for p in &projects {
            if !self.project_exists(*p).await? {
                missing.insert(*p);
            }
        }
        if !missing.is_empty() {
            let errors = items
                .iter()
                .enumerate()
                .filter(|(_, c)| c.project_id.is_some_and(|p| missing.contains(&p)))
                .map(|(index, _)| ProblemItem {
                    field: Some("project_id".into()),
                    index: Some(index),
                    message: "no such project".into(),
                })
                .collect();
            return Err(ApiError::invalid(errors));
        }

        let mut prepared = Vec::with_capacity(items.len());
        for created in items {
            let id = Uuid::now_v7();
            let meta = ctx.meta(id, 0);
            let event = AgentEvent::Created(created);
            let envelope = Envelope::new(
                Uuid::now_v7(),
                AggregateType::Agent,
                &meta,
                event.event_type(),
                AgentEvent::SCHEMA_VERSION,
                event.to_data(),
            );
            let subject = self.store.subject(AggregateType::Agent, id);
            prepared.push((id, subject, envelope, Recorded { meta, event }));
        }
        let batch: Vec<BatchItem<'_>> = prepared
            .iter()
            .map(|(_, subject, envelope, _)| BatchItem {
                subject,
                expected: 0,
                envelope,
            })
            .collect();
        let seqs = self
            .store
            .append_batch(&batch, ctx.traceparent.as_deref())
            .await?;

        let mut agents = Vec::with_capacity(prepared.len());
        let mut by_project: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
        for (i, ((id, _, _, recorded), seq)) in prepared.into_iter().zip(&seqs).enumerate() {
            let state = AgentState::Absent;
            let state = events::Aggregate::evolve(state, &recorded);
            if let Some(agent) = state.live() {
                agents.push(agent.clone());
                if let Some(p) = agent.project_id {
                    by_project.entry(p).or_default().push(i);
                }
            }
            self.agents.remember(id, state, *seq).await;
        }
        let mut last = seqs.last().copied().unwrap_or(0);
        for (project, indexes) in by_project {
            if self.project_exists(project).await? {
                continue;
            }
            for i in indexes {
                if let Some(w) = self.detach(ctx, agents[i].id, project).await? {
                    last = last.max(w.seq);
                    if let Some(a) = w.state.live() {
                        agents[i] = a.clone();
                    }
                }
            }
        }
        Ok((agents, last))
    }

    pub async fn create_project(
        &self,
        ctx: &WriteContext,
        created: ProjectCreated,
    ) -> Result<Committed<ProjectState>, ApiError> {
        let id = Uuid::now_v7();
        self.projects.remember(id, ProjectState::Absent, 0).await;
        self.projects
            .execute(id, ctx, None, |_| {
                Ok(ProjectCommand::Create(created.clone()))
            })
            .await
    }

    pub async fn update_project(
        &self,
        ctx: &WriteContext,
        id: Uuid,
        if_match: Option<u64>,
        patch: ProjectChanges,
    ) -> Result<Committed<ProjectState>, ApiError> {
        self.projects
            .execute(id, ctx, if_match, |_| {
                Ok(ProjectCommand::Update(patch.clone()))
            })
            .await
    }

    /// Deletes a project and detaches its agents (they live on with
    /// `project_id: null`, each through an `agent.updated` event, so the log
    /// stays the whole truth). The members are found in the read model once
    /// it has applied the deletion: any agent that joined before the
    /// deletion is in it by then, and any that joins after is refused or
    /// detached by its own write. Returns the sequence of the last event
    /// appended.
    pub async fn delete_project(
        &self,
        ctx: &WriteContext,
        id: Uuid,
        if_match: Option<u64>,
    ) -> Result<u64, ApiError> {
        let deleted = self
            .projects
            .execute(id, ctx, if_match, |_| Ok(ProjectCommand::Delete))
            .await?;
        match self.detach_members(ctx, id, deleted.seq).await {
            Ok(last) => Ok(last.max(deleted.seq)),
            Err(e) => {
                // The deletion stands; finish detaching in the background
                // rather than fail a request whose write already happened.
                tracing::warn!(project = %id, error = %e, "detaching agents later");
                let this = self.background();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    for attempt in 1..=30u32 {
                        match this.detach_members(&ctx, id, deleted.seq).await {
                            Ok(_) => return,
                            Err(e) => {
                                tracing::warn!(project = %id, attempt, error = %e, "detaching agents failed")
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                });
                Ok(deleted.seq)
            }
        }
    }

    async fn detach_members(
        &self,
        ctx: &WriteContext,
        project: Uuid,
        after: u64,
    ) -> Result<u64, ApiError> {
        self.watch.wait_for(after, self.projection_wait).await?;
        let members: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents WHERE project_id = $1")
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        let mut last = 0;
        for agent in members {
            if let Some(w) = self.detach(ctx, agent, project).await? {
                last = last.max(w.seq);
            }
        }
        Ok(last)
    }

    /// A copy that shares the event store and database but not the caches,
    /// for work that outlives a request.
    fn background(&self) -> Commands {
        Commands::new(
            self.store.clone(),
            self.pool.clone(),
            self.watch.clone(),
            self.projection_wait,
        )
    }
}
