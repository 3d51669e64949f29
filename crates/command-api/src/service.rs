//! The write model: what each write endpoint does, on top of the cached
//! repositories. Cross-aggregate rules live here: an agent may only join a
//! project that exists (decided from the project's own events), and deleting
//! a project detaches its agents.

use std::collections::{BTreeMap, BTreeSet};

use events::agent::{Agent, AgentChanges, AgentCommand, AgentCreated, AgentEvent, AgentState};
use events::envelope::EventCodec;
use events::project::{self, ProjectChanges, ProjectCommand, ProjectCreated, ProjectState};
use events::{AgentId, AggregateType, Envelope, ProjectId, Recorded};
use infra::{BatchItem, EventStore, StoreError};

use crate::error::{BadField, WriteError};
pub use crate::repo::{Committed, Repository, WriteContext};

/// Every write the API can make.
#[derive(Debug)]
pub struct Commands {
    pub agents: Repository<AgentState>,
    pub projects: Repository<ProjectState>,
    store: EventStore,
}

/// A created, updated or deleted agent and the sequence of the last event.
pub type AgentWrite = Committed<AgentState>;

fn live(state: &AgentState) -> Result<&Agent, WriteError> {
    state
        .live()
        .ok_or(WriteError::NotFound(AggregateType::Agent))
}

impl Commands {
    pub fn new(store: EventStore) -> Self {
        Commands {
            agents: Repository::new(store.clone()),
            projects: Repository::new(store.clone()),
            store,
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Whether the log says `project` exists (not deleted) right now.
    async fn project_exists(&self, project: ProjectId) -> Result<bool, WriteError> {
        let subject = self.store.subject(AggregateType::Project, project.into());
        Ok(match self.store.last_on_subject(&subject).await? {
            None => false,
            Some(last) => last.envelope.event_type != project::DELETED,
        })
    }

    /// 422 on `project_id` unless the project exists.
    async fn require_project(&self, project: Option<ProjectId>) -> Result<(), WriteError> {
        match project {
            Some(p) if !self.project_exists(p).await? => {
                Err(WriteError::Invalid(vec![BadField::no_such_project(None)]))
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
        agent: AgentId,
        project: ProjectId,
    ) -> Result<Option<AgentWrite>, WriteError> {
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
        agent: AgentId,
        project: ProjectId,
    ) -> Result<Option<AgentWrite>, WriteError> {
        let result = self
            .agents
            .execute(agent, ctx, None, |state| {
                let still_in = state
                    .live()
                    .is_some_and(|a| a.project_id == Some(project.into()));
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
            Err(WriteError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(skip_all, fields(agent_id), err(level = "debug"))]
    pub async fn create_agent(
        &self,
        ctx: &WriteContext,
        created: AgentCreated,
    ) -> Result<AgentWrite, WriteError> {
        let project = created.project_id.map(ProjectId::from);
        let id = AgentId::from(ctx.new_id(0));
        tracing::Span::current().record("agent_id", tracing::field::display(id));
        let written = match self.agents.stored_before(id, ctx).await? {
            Some(stored) => stored,
            None => {
                self.require_project(project).await?;
                self.agents
                    .create(id, ctx, AgentCommand::Create(created))
                    .await?
            }
        };
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
        id: AgentId,
        if_match: Option<&[u64]>,
        patch: AgentChanges,
    ) -> Result<AgentWrite, WriteError> {
        let joins = patch.project_id.flatten().map(ProjectId::from);
        let written = match self.agents.stored_before(id, ctx).await? {
            Some(stored) => stored,
            None => {
                if let Some(p) = joins
                    && !self.project_exists(p).await?
                {
                    // Tell a missing agent (404) from a missing project
                    // (422); an agent already in that project is a no-op,
                    // not an error.
                    let (state, _) = self.agents.load(id).await?;
                    let agent = live(&state)?;
                    if agent.project_id != Some(p.into()) {
                        return Err(WriteError::Invalid(vec![BadField::no_such_project(None)]));
                    }
                }
                self.agents
                    .execute(id, ctx, if_match, |state| {
                        live(state)?;
                        Ok(AgentCommand::Update(patch.clone()))
                    })
                    .await?
            }
        };
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
        id: AgentId,
        if_match: Option<&[u64]>,
    ) -> Result<AgentWrite, WriteError> {
        if let Some(stored) = self.agents.stored_before(id, ctx).await? {
            return Ok(stored);
        }
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
    ) -> Result<(Vec<Agent>, u64), WriteError> {
        let ids: Vec<AgentId> = (0..items.len())
            .map(|i| AgentId::from(ctx.new_id(i)))
            .collect();
        let stored = if ctx.is_retry() {
            self.bulk_stored(ctx, &ids).await?
        } else {
            None
        };
        let written = match stored {
            Some(written) => written,
            None => match self.append_bulk(ctx, &ids, items).await {
                // A keyed batch meets its own agents when an earlier
                // attempt was stored after all: answer with them.
                Err(WriteError::Store(StoreError::Conflict)) if ctx.keyed.is_some() => self
                    .bulk_stored(ctx, &ids)
                    .await?
                    .ok_or(WriteError::Store(StoreError::Conflict))?,
                outcome => outcome?,
            },
        };

        let mut agents = Vec::with_capacity(written.len());
        let mut by_project: BTreeMap<ProjectId, Vec<usize>> = BTreeMap::new();
        let mut last = 0;
        for w in &written {
            last = last.max(w.seq);
            if let Some(agent) = w.state.live() {
                if let Some(p) = agent.project_id {
                    by_project.entry(p.into()).or_default().push(agents.len());
                }
                agents.push(agent.clone());
            }
        }
        for (project, indexes) in by_project {
            if self.project_exists(project).await? {
                continue;
            }
            for i in indexes {
                if let Some(w) = self.detach(ctx, agents[i].id.into(), project).await? {
                    last = last.max(w.seq);
                    if let Some(a) = w.state.live() {
                        agents[i] = a.clone();
                    }
                }
            }
        }
        Ok((agents, last))
    }

    /// Appends one `agent.created` per item, named `ids`, as one atomic
    /// batch, after checking every referenced project exists.
    async fn append_bulk(
        &self,
        ctx: &WriteContext,
        ids: &[AgentId],
        items: Vec<AgentCreated>,
    ) -> Result<Vec<AgentWrite>, WriteError> {
        // Every referenced project must exist; list each item that names a
        // missing one.
        let projects: BTreeSet<ProjectId> = items
            .iter()
            .filter_map(|c| c.project_id.map(ProjectId::from))
            .collect();
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
                .filter(|(_, c)| {
                    c.project_id
                        .is_some_and(|p| missing.contains(&ProjectId::from(p)))
                })
                .map(|(index, _)| BadField::no_such_project(Some(index)))
                .collect();
            return Err(WriteError::Invalid(errors));
        }

        let mut prepared = Vec::with_capacity(items.len());
        for (created, id) in items.into_iter().zip(ids) {
            let meta = ctx.meta((*id).into(), 0);
            let event = AgentEvent::Created(created);
            let envelope = Envelope::new(
                ctx.next_event_id((*id).into()),
                AggregateType::Agent,
                &meta,
                event.event_type(),
                AgentEvent::SCHEMA_VERSION,
                event.to_data(),
            );
            let subject = self.store.subject(AggregateType::Agent, (*id).into());
            prepared.push((*id, subject, envelope, Recorded { meta, event }));
        }
        let batch: Vec<BatchItem<'_>> = prepared
            .iter()
            .map(|(_, subject, envelope, _)| BatchItem {
                subject,
                expected: 0,
                envelope,
            })
            .collect();
        let seqs = self.store.append_batch(&batch, Some(&ctx.trace)).await?;

        let mut written = Vec::with_capacity(prepared.len());
        for ((id, _, _, recorded), seq) in prepared.into_iter().zip(seqs) {
            ctx.appended(id.into());
            let state = events::Aggregate::evolve(AgentState::Absent, &recorded);
            self.agents.remember(id, state.clone(), seq).await;
            written.push(AgentWrite {
                state,
                seq,
                appended: true,
            });
        }
        Ok(written)
    }

    /// What an earlier attempt at this keyed bulk stored: each agent as
    /// that attempt left it, or `None` when its batch is not in the log. The
    /// batch was atomic, so its first agent tells.
    async fn bulk_stored(
        &self,
        ctx: &WriteContext,
        ids: &[AgentId],
    ) -> Result<Option<Vec<AgentWrite>>, WriteError> {
        let Some((first, rest)) = ids.split_first() else {
            return Ok(None);
        };
        let Some(stored) = self.agents.stored(*first, ctx).await? else {
            return Ok(None);
        };
        let mut written = Vec::with_capacity(ids.len());
        written.push(stored);
        for id in rest {
            let stored = self.agents.stored(*id, ctx).await?.ok_or_else(|| {
                StoreError::Unavailable(format!("agent {id} of a stored batch is not in the log"))
            })?;
            written.push(stored);
        }
        Ok(Some(written))
    }

    pub async fn create_project(
        &self,
        ctx: &WriteContext,
        created: ProjectCreated,
    ) -> Result<Committed<ProjectState>, WriteError> {
        let id = ProjectId::from(ctx.new_id(0));
        if let Some(stored) = self.projects.stored_before(id, ctx).await? {
            return Ok(stored);
        }
        self.projects
            .create(id, ctx, ProjectCommand::Create(created))
            .await
    }

    pub async fn update_project(
        &self,
        ctx: &WriteContext,
        id: ProjectId,
        if_match: Option<&[u64]>,
        patch: ProjectChanges,
    ) -> Result<Committed<ProjectState>, WriteError> {
        if let Some(stored) = self.projects.stored_before(id, ctx).await? {
            return Ok(stored);
        }
        self.projects
            .execute(id, ctx, if_match, |_| {
                Ok(ProjectCommand::Update(patch.clone()))
            })
            .await
    }

    /// Deletes a project. Its agents live on, detached (`project_id: null`)
    /// by the projector's process manager (`projector::detach`), which
    /// reacts to the deletion in the log: durably, whatever happens to this
    /// process after it answers. Returns the deletion's sequence.
    pub async fn delete_project(
        &self,
        ctx: &WriteContext,
        id: ProjectId,
        if_match: Option<&[u64]>,
    ) -> Result<u64, WriteError> {
        let deleted = match self.projects.stored_before(id, ctx).await? {
            Some(stored) => stored,
            None => {
                self.projects
                    .execute(id, ctx, if_match, |_| Ok(ProjectCommand::Delete))
                    .await?
            }
        };
        Ok(deleted.seq)
    }
}
