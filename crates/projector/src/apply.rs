//! How a batch of events changes the read models.
//!
//! A batch is folded in memory first, per aggregate: whatever a row goes
//! through within the batch (created, updated many times, deleted, created
//! again), only where it ends up is written. Then every table gets at most
//! one statement of each kind for the whole batch (rows deleted, rows
//! changed, rows inserted, events recorded), whatever the batch's size or
//! mix: the cost of a batch is a handful of round trips plus what
//! PostgreSQL spends per row, as close to a COPY as a statement that can
//! update gets.
//!
//! The fold gives the rows that applying the events one by one, in order,
//! would give, row for row (`projector_fold` tests both ways): an update
//! of a row that does not exist changes nothing, a delete removes the row
//! whatever came before it in the batch, and a create after a delete
//! replaces the row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::agent::{AgentChanges, AgentCreated, AgentEvent};
use events::envelope::EventCodec;
use events::project::{ProjectChanges, ProjectCreated, ProjectEvent};
use events::{AggregateType, Envelope};
use infra::db::Tx;
use infra::event_store::TraceCarrier;
use uuid::Uuid;

/// Why an event could not be applied. Such an event is parked, never
/// retried forever nor dropped unseen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("not an event envelope: {0}")]
    Envelope(#[from] serde_json::Error),
    #[error(transparent)]
    Decode(#[from] events::DecodeError),
}

/// One message of a batch, as it came from the stream.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub seq: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// The trace context of the request that wrote the event.
    pub trace: Option<TraceCarrier<'a>>,
}

/// Applies a batch of messages inside the batch's transaction, as if one
/// by one in order, and records each in the `events` table. Returns each
/// event's `occurred_at` (`None` for a message parked because it cannot be
/// decoded). A database error aborts the batch.
///
/// Each event is new to the `events` table: a batch applies only events
/// after the checkpoint that commits with it, so their rows go in by a
/// plain insert (a unique violation would be a broken invariant, and fails
/// the batch), without the conflict check per row that costs an `events`
/// insert about a third more.
pub async fn apply_all(
    tx: &mut Tx<'_>,
    messages: &[Incoming<'_>],
) -> Result<Vec<Option<DateTime<Utc>>>, sqlx::Error> {
    apply(tx, messages, Recorded::New).await
}

/// Whether a batch's events may already have their `events` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Recorded {
    /// Never: they are after the checkpoint.
    #[default]
    New,
    /// Perhaps: a parked event, which an older version recorded when it
    /// parked it.
    MaybeAlready,
}

async fn apply(
    tx: &mut Tx<'_>,
    messages: &[Incoming<'_>],
    recorded: Recorded,
) -> Result<Vec<Option<DateTime<Utc>>>, sqlx::Error> {
    let mut occurred = Vec::with_capacity(messages.len());
    let mut batch = Batch::with_capacity(messages.len());
    batch.events.recorded = recorded;
    for m in messages {
        // Each event's span continues the trace of the request that wrote
        // it; made only when traces are exported, as they cost per event.
        let span = infra::telemetry::enabled().then(|| {
            let span = tracing::info_span!("projector.apply", otel.kind = "consumer", seq = m.seq, subject = %m.subject);
            if let Some(trace) = &m.trace {
                infra::telemetry::continue_trace(&span, trace);
            }
            span
        });
        let _entered = span.as_ref().map(|s| s.enter());
        match decode(m.payload) {
            Ok((env, event)) => {
                occurred.push(Some(env.occurred_at));
                batch.push(m.seq, env, event);
            }
            Err(e) => {
                tracing::error!(seq = m.seq, subject = m.subject, error = %e, "parking an event that cannot be applied");
                batch.parked.push(m, e.to_string());
                occurred.push(None);
            }
        }
    }
    batch.write(tx).await?;
    Ok(occurred)
}

/// Applies one message (a parked event's retry), recording it in the
/// `events` table unless it is there already.
pub async fn apply_message(
    tx: &mut Tx<'_>,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let one = Incoming {
        seq,
        subject,
        payload,
        trace: None,
    };
    Ok(apply(tx, &[one], Recorded::MaybeAlready)
        .await?
        .pop()
        .flatten())
}

/// A decoded event of either aggregate type.
enum Event {
    Agent(AgentEvent),
    Project(ProjectEvent),
}

fn decode(payload: &[u8]) -> Result<(Envelope, Event), ApplyError> {
    let env: Envelope = serde_json::from_slice(payload)?;
    let event = match env.aggregate_type {
        AggregateType::Agent => Event::Agent(AgentEvent::decode(&env)?),
        AggregateType::Project => Event::Project(ProjectEvent::decode(&env)?),
    };
    Ok((env, event))
}

/// A batch folded in memory, ready to be written.
#[derive(Default)]
struct Batch {
    agents: Fold<AgentCreated, AgentChanges>,
    projects: Fold<ProjectCreated, ProjectChanges>,
    events: EventRows,
    parked: ParkedRows,
}

impl Batch {
    fn with_capacity(n: usize) -> Self {
        Batch {
            agents: Fold::with_capacity(n),
            events: EventRows::with_capacity(n),
            ..Batch::default()
        }
    }

    /// Folds event `seq` into the batch.
    fn push(&mut self, seq: u64, env: Envelope, event: Event) {
        let stamp = Stamp {
            version: env.aggregate_version as i64,
            at: env.occurred_at,
            seq: seq as i64,
        };
        let id = env.aggregate_id;
        match event {
            Event::Agent(AgentEvent::Created(c)) => {
                self.agents.created(id, NewRow::new(c, &env, stamp));
            }
            Event::Agent(AgentEvent::Updated(c)) => self.agents.updated(id, c, stamp),
            Event::Agent(AgentEvent::Deleted) => self.agents.deleted(id),
            Event::Project(ProjectEvent::Created(c)) => {
                self.projects.created(id, NewRow::new(c, &env, stamp));
            }
            Event::Project(ProjectEvent::Updated(c)) => self.projects.updated(id, c, stamp),
            Event::Project(ProjectEvent::Deleted) => self.projects.deleted(id),
        }
        self.events.push(seq, env);
    }

    /// Writes the batch: per table, deletes, then updates, then inserts
    /// (so a row deleted and created again in the batch is replaced).
    async fn write(self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        let agents = self.agents.into_writes();
        delete(tx, "agents", agents.deleted).await?;
        update_agents(tx, agents.changed).await?;
        insert_agents(tx, agents.inserted).await?;
        let projects = self.projects.into_writes();
        delete(tx, "projects", projects.deleted).await?;
        update_projects(tx, projects.changed).await?;
        insert_projects(tx, projects.inserted).await?;
        self.events.write(tx).await?;
        self.parked.write(tx).await
    }
}

/// What every applied event stamps on its aggregate's row.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    version: i64,
    at: DateTime<Utc>,
    /// Stream sequence of the last event applied to the row.
    seq: i64,
}

/// A row created within the batch: the create's data, with every later
/// update of the batch applied to it.
struct NewRow<T> {
    data: T,
    created_at: DateTime<Utc>,
    created_by: String,
    stamp: Stamp,
}

impl<T> NewRow<T> {
    fn new(data: T, env: &Envelope, stamp: Stamp) -> Self {
        NewRow {
            data,
            created_at: env.occurred_at,
            created_by: env.actor.clone(),
            stamp,
        }
    }
}

/// Where one aggregate's row ends up after the events of the batch so far.
enum Fate<R, C> {
    /// Created in the batch; `replace` when a delete came first, so a row
    /// from before the batch goes before this one is inserted.
    Created {
        row: NewRow<R>,
        replace: bool,
    },
    /// Changes to a row from before the batch (if there is one: an update
    /// of no row changes nothing).
    Changed {
        changes: C,
        stamp: Stamp,
    },
    Deleted,
}

/// A change that can be applied to a created row, and folded with a later
/// change of the same row.
trait Change<R> {
    /// Applies `self` to `row`.
    fn apply_to(self, row: &mut R);
    /// Folds `later` (made after `self`) into `self`.
    fn then(&mut self, later: Self);
}

/// The fates of one table's rows, in the order the batch first touched
/// them.
struct Fold<R, C> {
    fates: Vec<(Uuid, Fate<R, C>)>,
    index: HashMap<Uuid, usize>,
}

impl<R, C> Default for Fold<R, C> {
    fn default() -> Self {
        Fold {
            fates: Vec::new(),
            index: HashMap::new(),
        }
    }
}

/// One table's writes for a batch: every id appears in one list only,
/// except a replaced row (deleted, then inserted).
struct Writes<R, C> {
    deleted: Vec<Uuid>,
    changed: Vec<(Uuid, C, Stamp)>,
    inserted: Vec<(Uuid, NewRow<R>)>,
}

impl<R, C: Change<R>> Fold<R, C> {
    fn with_capacity(n: usize) -> Self {
        Fold {
            fates: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
        }
    }

    fn fate(&mut self, id: Uuid) -> Option<&mut Fate<R, C>> {
        let i = *self.index.get(&id)?;
        Some(&mut self.fates[i].1)
    }

    fn set(&mut self, id: Uuid, fate: Fate<R, C>) {
        match self.index.get(&id) {
            Some(&i) => self.fates[i].1 = fate,
            None => {
                self.index.insert(id, self.fates.len());
                self.fates.push((id, fate));
            }
        }
    }

    fn created(&mut self, id: Uuid, row: NewRow<R>) {
        let replace = match self.fate(id) {
            // A second create of a live aggregate changes nothing (the
            // command side never appends one).
            Some(Fate::Created { .. }) => return,
            Some(Fate::Deleted) => true,
            Some(Fate::Changed { .. }) | None => false,
        };
        self.set(id, Fate::Created { row, replace });
    }

    fn updated(&mut self, id: Uuid, change: C, at: Stamp) {
        match self.fate(id) {
            Some(Fate::Created { row, .. }) => {
                change.apply_to(&mut row.data);
                row.stamp = at;
            }
            Some(Fate::Changed { changes, stamp }) => {
                changes.then(change);
                *stamp = at;
            }
            // The row is gone: as an update of no row, nothing.
            Some(Fate::Deleted) => {}
            None => self.set(
                id,
                Fate::Changed {
                    changes: change,
                    stamp: at,
                },
            ),
        }
    }

    fn deleted(&mut self, id: Uuid) {
        self.set(id, Fate::Deleted);
    }

    fn into_writes(self) -> Writes<R, C> {
        let mut writes = Writes {
            deleted: vec![],
            changed: vec![],
            inserted: Vec::with_capacity(self.fates.len()),
        };
        for (id, fate) in self.fates {
            match fate {
                Fate::Created { row, replace } => {
                    if replace {
                        writes.deleted.push(id);
                    }
                    writes.inserted.push((id, row));
                }
                Fate::Changed { changes, stamp } => writes.changed.push((id, changes, stamp)),
                Fate::Deleted => writes.deleted.push(id),
            }
        }
        writes
    }
}

/// `to = change` where there is a change.
fn set<T>(to: &mut T, change: Option<T>) {
    if let Some(v) = change {
        *to = v;
    }
}

/// `to = later` where `later` says something.
fn overwrite<T>(to: &mut Option<T>, later: Option<T>) {
    if later.is_some() {
        *to = later;
    }
}

impl Change<AgentCreated> for AgentChanges {
    fn apply_to(self, row: &mut AgentCreated) {
        let AgentChanges {
            name,
            agent_type,
            description,
            status,
            capabilities,
            config,
            tags,
            project_id,
        } = self;
        set(&mut row.name, name);
        set(&mut row.agent_type, agent_type);
        set(&mut row.description, description);
        set(&mut row.status, status);
        set(&mut row.capabilities, capabilities);
        set(&mut row.config, config);
        set(&mut row.tags, tags);
        set(&mut row.project_id, project_id);
    }

    fn then(&mut self, later: Self) {
        overwrite(&mut self.name, later.name);
        overwrite(&mut self.agent_type, later.agent_type);
        overwrite(&mut self.description, later.description);
        overwrite(&mut self.status, later.status);
        overwrite(&mut self.capabilities, later.capabilities);
        overwrite(&mut self.config, later.config);
        overwrite(&mut self.tags, later.tags);
        overwrite(&mut self.project_id, later.project_id);
    }
}

impl Change<ProjectCreated> for ProjectChanges {
    fn apply_to(self, row: &mut ProjectCreated) {
        set(&mut row.name, self.name);
        set(&mut row.description, self.description);
    }

    fn then(&mut self, later: Self) {
        overwrite(&mut self.name, later.name);
        overwrite(&mut self.description, later.description);
    }
}

/// A `text[]` literal of `items`, every item quoted: capabilities travel as
/// one text each, since an array of arrays cannot be unnested row by row.
fn text_array(items: &[String]) -> String {
    let mut out = String::with_capacity(2 + items.iter().map(|s| s.len() + 3).sum::<usize>());
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// JSON text, for a `jsonb` column (what PostgreSQL parses, as from a COPY).
fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

async fn delete(tx: &mut Tx<'_>, table: &str, ids: Vec<Uuid>) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    // `table` is one of two names written in this file.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {table} WHERE id = ANY($1)"
    )))
    .bind(ids)
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn insert_agents(
    tx: &mut Tx<'_>,
    rows: Vec<(Uuid, NewRow<AgentCreated>)>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut id = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut agent_type = Vec::with_capacity(n);
    let mut description = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut capabilities = Vec::with_capacity(n);
    let mut config = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut project_id = Vec::with_capacity(n);
    let mut version = Vec::with_capacity(n);
    let mut created_at = Vec::with_capacity(n);
    let mut updated_at = Vec::with_capacity(n);
    let mut created_by = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    for (row_id, row) in rows {
        let c = row.data;
        id.push(row_id);
        capabilities.push(text_array(c.capabilities.as_slice()));
        config.push(json_text(&c.config));
        tags.push(json_text(&c.tags));
        name.push(c.name.into_inner());
        agent_type.push(c.agent_type.into_inner());
        description.push(c.description.into_inner());
        status.push(c.status.as_str());
        project_id.push(c.project_id);
        version.push(row.stamp.version);
        created_at.push(row.created_at);
        updated_at.push(row.stamp.at);
        created_by.push(row.created_by);
        seq.push(row.stamp.seq);
    }
    sqlx::query(
        "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
         project_id, version, created_at, updated_at, created_by, last_seq) \
         SELECT u.id, u.name, u.type, u.description, u.status, u.caps::text[], u.config::jsonb, \
                u.tags::jsonb, u.project_id, u.version, u.created_at, u.updated_at, u.created_by, u.seq \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::text[], $9::uuid[], $10::int8[], $11::timestamptz[], \
                     $12::timestamptz[], $13::text[], $14::int8[]) \
           AS u(id, name, type, description, status, caps, config, tags, project_id, version, \
                created_at, updated_at, created_by, seq)",
    )
    .bind(id)
    .bind(name)
    .bind(agent_type)
    .bind(description)
    .bind(status)
    .bind(capabilities)
    .bind(config)
    .bind(tags)
    .bind(project_id)
    .bind(version)
    .bind(created_at)
    .bind(updated_at)
    .bind(created_by)
    .bind(seq)
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn update_agents(
    tx: &mut Tx<'_>,
    rows: Vec<(Uuid, AgentChanges, Stamp)>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut id = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut agent_type = Vec::with_capacity(n);
    let mut description = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut capabilities = Vec::with_capacity(n);
    let mut config = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut moves_project = Vec::with_capacity(n);
    let mut project_id = Vec::with_capacity(n);
    let mut version = Vec::with_capacity(n);
    let mut updated_at = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    for (row_id, c, stamp) in rows {
        id.push(row_id);
        name.push(c.name.map(|v| v.into_inner()));
        agent_type.push(c.agent_type.map(|v| v.into_inner()));
        description.push(c.description.map(|v| v.into_inner()));
        status.push(c.status.map(|v| v.as_str()));
        capabilities.push(c.capabilities.map(|v| text_array(v.as_slice())));
        config.push(c.config.map(|v| json_text(&v)));
        tags.push(c.tags.map(|v| json_text(&v)));
        moves_project.push(c.project_id.is_some());
        project_id.push(c.project_id.flatten());
        version.push(stamp.version);
        updated_at.push(stamp.at);
        seq.push(stamp.seq);
    }
    // NULL means "unchanged" for every column but project_id, whose change
    // is flagged separately because NULL is a real value.
    sqlx::query(
        "UPDATE agents a SET \
           name = COALESCE(u.name, a.name), type = COALESCE(u.type, a.type), \
           description = COALESCE(u.description, a.description), \
           status = COALESCE(u.status, a.status), \
           capabilities = COALESCE(u.caps::text[], a.capabilities), \
           config = COALESCE(u.config::jsonb, a.config), tags = COALESCE(u.tags::jsonb, a.tags), \
           project_id = CASE WHEN u.moves THEN u.project_id ELSE a.project_id END, \
           version = u.version, updated_at = u.at, last_seq = u.seq \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::text[], $9::bool[], $10::uuid[], $11::int8[], \
                     $12::timestamptz[], $13::int8[]) \
           AS u(id, name, type, description, status, caps, config, tags, moves, project_id, \
                version, at, seq) \
         WHERE a.id = u.id",
    )
    .bind(id)
    .bind(name)
    .bind(agent_type)
    .bind(description)
    .bind(status)
    .bind(capabilities)
    .bind(config)
    .bind(tags)
    .bind(moves_project)
    .bind(project_id)
    .bind(version)
    .bind(updated_at)
    .bind(seq)
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn insert_projects(
    tx: &mut Tx<'_>,
    rows: Vec<(Uuid, NewRow<ProjectCreated>)>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut cols: (Vec<Uuid>, Vec<String>, Vec<String>, Vec<i64>) = Default::default();
    let mut times: (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = Default::default();
    let (mut created_by, mut seq) = (vec![], vec![]);
    for (id, row) in rows {
        cols.0.push(id);
        cols.1.push(row.data.name.into_inner());
        cols.2.push(row.data.description.into_inner());
        cols.3.push(row.stamp.version);
        times.0.push(row.created_at);
        times.1.push(row.stamp.at);
        created_by.push(row.created_by);
        seq.push(row.stamp.seq);
    }
    sqlx::query(
        "INSERT INTO projects (id, name, description, version, created_at, updated_at, created_by, last_seq) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[], \
                              $6::timestamptz[], $7::text[], $8::int8[])",
    )
    .bind(cols.0)
    .bind(cols.1)
    .bind(cols.2)
    .bind(cols.3)
    .bind(times.0)
    .bind(times.1)
    .bind(created_by)
    .bind(seq)
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn update_projects(
    tx: &mut Tx<'_>,
    rows: Vec<(Uuid, ProjectChanges, Stamp)>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let (mut id, mut name, mut description) = (vec![], vec![], vec![]);
    let (mut version, mut at, mut seq) = (vec![], vec![], vec![]);
    for (row_id, c, stamp) in rows {
        id.push(row_id);
        name.push(c.name.map(|v| v.into_inner()));
        description.push(c.description.map(|v| v.into_inner()));
        version.push(stamp.version);
        at.push(stamp.at);
        seq.push(stamp.seq);
    }
    sqlx::query(
        "UPDATE projects p SET name = COALESCE(u.name, p.name), \
           description = COALESCE(u.description, p.description), \
           version = u.version, updated_at = u.at, last_seq = u.seq \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[], $6::int8[]) \
           AS u(id, name, description, version, at, seq) \
         WHERE p.id = u.id",
    )
    .bind(id)
    .bind(name)
    .bind(description)
    .bind(version)
    .bind(at)
    .bind(seq)
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// `events` rows waiting for their one insert: the events themselves, for
/// history, `as_of` and analytics.
#[derive(Default)]
struct EventRows {
    recorded: Recorded,
    seq: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    aggregate_type: Vec<&'static str>,
    aggregate_id: Vec<Uuid>,
    aggregate_version: Vec<i64>,
    occurred_at: Vec<DateTime<Utc>>,
    actor: Vec<String>,
    request_id: Vec<String>,
    data: Vec<String>,
}

impl EventRows {
    fn with_capacity(n: usize) -> Self {
        EventRows {
            recorded: Recorded::New,
            seq: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            schema_version: Vec::with_capacity(n),
            aggregate_type: Vec::with_capacity(n),
            aggregate_id: Vec::with_capacity(n),
            aggregate_version: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            actor: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, seq: u64, env: Envelope) {
        self.seq.push(seq as i64);
        self.event_id.push(env.event_id);
        self.schema_version.push(env.schema_version as i32);
        self.aggregate_type.push(env.aggregate_type.as_str());
        self.aggregate_id.push(env.aggregate_id);
        self.aggregate_version.push(env.aggregate_version as i64);
        self.occurred_at.push(env.occurred_at);
        self.data.push(json_text(&env.data));
        self.event_type.push(env.event_type);
        self.actor.push(env.actor);
        self.request_id.push(env.request_id);
    }

    async fn write(self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        if self.seq.is_empty() {
            return Ok(());
        }
        macro_rules! insert {
            () => {
                "INSERT INTO events (seq, event_id, event_type, schema_version, \
             aggregate_type, aggregate_id, aggregate_version, occurred_at, actor, request_id, data) \
             SELECT u.seq, u.event_id, u.event_type, u.schema_version, u.aggregate_type, \
                    u.aggregate_id, u.aggregate_version, u.occurred_at, u.actor, u.request_id, \
                    u.data::jsonb \
             FROM UNNEST($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::text[], \
                         $6::uuid[], $7::int8[], $8::timestamptz[], $9::text[], $10::text[], \
                         $11::text[]) \
               AS u(seq, event_id, event_type, schema_version, aggregate_type, aggregate_id, \
                    aggregate_version, occurred_at, actor, request_id, data)"
            };
        }
        sqlx::query(match self.recorded {
            Recorded::New => insert!(),
            Recorded::MaybeAlready => concat!(insert!(), " ON CONFLICT (seq) DO NOTHING"),
        })
        .bind(self.seq)
        .bind(self.event_id)
        .bind(self.event_type)
        .bind(self.schema_version)
        .bind(self.aggregate_type)
        .bind(self.aggregate_id)
        .bind(self.aggregate_version)
        .bind(self.occurred_at)
        .bind(self.actor)
        .bind(self.request_id)
        .bind(self.data)
        .execute(&mut **tx)
        .await
        .map(drop)
    }
}

/// Messages that cannot be applied, kept with the reason.
#[derive(Default)]
struct ParkedRows {
    seq: Vec<i64>,
    subject: Vec<String>,
    payload: Vec<Vec<u8>>,
    error: Vec<String>,
}

impl ParkedRows {
    fn push(&mut self, m: &Incoming<'_>, error: String) {
        self.seq.push(m.seq as i64);
        self.subject.push(m.subject.to_owned());
        self.payload.push(m.payload.to_vec());
        self.error.push(error);
    }

    async fn write(self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        if self.seq.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO parked_events (seq, subject, payload, error) \
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::bytea[], $4::text[]) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(self.seq)
        .bind(self.subject)
        .bind(self.payload)
        .bind(self.error)
        .execute(&mut **tx)
        .await
        .map(drop)
    }
}
