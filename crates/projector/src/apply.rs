//! How a batch of events changes the read models.
//!
//! A batch is folded in memory first, per aggregate: whatever a row goes
//! through within the batch (created, updated many times, deleted, created
//! again), only where it ends up is written. Then every table gets at most
//! one statement of each kind for the whole batch (rows deleted, rows
//! changed, rows inserted, events recorded), whatever the batch's size or
//! mix: the cost of a batch is a handful of round trips plus what
//! PostgreSQL spends per row. Rows inserted and events recorded go in by a
//! binary COPY ([`crate::copy`]), the events' while the batch is still being
//! decoded; changes by one `UPDATE … FROM UNNEST` per table.
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

use crate::copy::{self, CopyRows};

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
/// The `events` rows stream into one COPY while the messages are decoded
/// (PostgreSQL inserts a chunk while the next is decoded); the rows of the
/// other tables follow, once the batch is folded.
pub async fn apply_all(
    tx: &mut Tx<'_>,
    messages: &[Incoming<'_>],
) -> Result<Vec<Option<DateTime<Utc>>>, sqlx::Error> {
    if messages.is_empty() {
        return Ok(vec![]);
    }
    let mut occurred = Vec::with_capacity(messages.len());
    let mut batch = Batch::with_capacity(messages.len());
    let mut events = tx.copy_in_raw(EVENTS_COPY).await?;
    let mut rows = CopyRows::with_capacity(COPY_CHUNK + 4_096);
    for m in messages {
        let decoded = {
            // Each event's span continues the trace of the request that
            // wrote it; made only when traces are exported, as they cost
            // per event.
            let span = infra::telemetry::enabled().then(|| {
                let span = tracing::info_span!("projector.apply", otel.kind = "consumer", seq = m.seq, subject = %m.subject);
                if let Some(trace) = &m.trace {
                    infra::telemetry::continue_trace(&span, trace);
                }
                span
            });
            let _entered = span.as_ref().map(|s| s.enter());
            let decoded = decode(m.payload);
            if let Err(e) = &decoded {
                tracing::error!(seq = m.seq, subject = m.subject, error = %e, "parking an event that cannot be applied");
            }
            decoded
        };
        match decoded {
            Ok((env, event)) => {
                occurred.push(Some(env.occurred_at));
                event_row(&mut rows, m.seq, &env);
                batch.push(m.seq, env, event);
            }
            Err(e) => {
                batch.parked.push(m, e.to_string());
                occurred.push(None);
            }
        }
        if rows.len() >= COPY_CHUNK {
            events.send(rows.take()).await?;
        }
    }
    events.send(rows.finish()).await?;
    events.finish().await?;
    batch.write(tx).await?;
    Ok(occurred)
}

/// Applies one message: a parked event's retry, below the checkpoint. Its
/// `events` row may be there already (an older version recorded the event
/// and parked it), so unlike a batch's, it is recorded only if absent.
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
    let (env, event) = match decode(payload) {
        Ok(decoded) => decoded,
        Err(e) => {
            let mut batch = Batch::default();
            batch.parked.push(&one, e.to_string());
            batch.write(tx).await?;
            return Ok(None);
        }
    };
    sqlx::query(
        "INSERT INTO events (seq, event_id, event_type, schema_version, aggregate_type, \
         aggregate_id, aggregate_version, occurred_at, actor, request_id, data) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb) \
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(seq as i64)
    .bind(env.event_id)
    .bind(&env.event_type)
    .bind(env.schema_version as i32)
    .bind(env.aggregate_type.as_str())
    .bind(env.aggregate_id)
    .bind(env.aggregate_version as i64)
    .bind(env.occurred_at)
    .bind(&env.actor)
    .bind(&env.request_id)
    .bind(json_text(&env.data))
    .execute(&mut **tx)
    .await?;
    let occurred_at = env.occurred_at;
    let mut batch = Batch::default();
    batch.push(seq, env, event);
    batch.write(tx).await?;
    Ok(Some(occurred_at))
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
    parked: ParkedRows,
}

impl Batch {
    fn with_capacity(n: usize) -> Self {
        Batch {
            agents: Fold::with_capacity(n),
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
    }

    /// Writes the batch's rows (its `events` rows are written already):
    /// per table, deletes, then updates, then inserts (so a row deleted and
    /// created again in the batch is replaced).
    async fn write(self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        let agents = self.agents.into_writes();
        delete(tx, "agents", agents.deleted).await?;
        update_agents(tx, agents.changed).await?;
        insert_agents(tx, agents.inserted).await?;
        let projects = self.projects.into_writes();
        delete(tx, "projects", projects.deleted).await?;
        update_projects(tx, projects.changed).await?;
        insert_projects(tx, projects.inserted).await?;
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
    let mut copy = CopyRows::with_capacity(rows.len() * 400);
    for (id, row) in rows {
        let c = row.data;
        copy.row(14)
            .uuid(id)
            .text(c.name.as_str())
            .text(c.agent_type.as_str())
            .text(c.description.as_str())
            .text(c.status.as_str())
            .text_array(c.capabilities.as_slice())
            .jsonb(&json_text(&c.config))
            .jsonb(&json_text(&c.tags))
            .opt_uuid(c.project_id)
            .int8(row.stamp.version)
            .timestamptz(row.created_at)
            .timestamptz(row.stamp.at)
            .text(&row.created_by)
            .int8(row.stamp.seq);
    }
    copy::copy_all(
        tx,
        "COPY agents (id, name, type, description, status, capabilities, config, tags, \
         project_id, version, created_at, updated_at, created_by, last_seq) \
         FROM STDIN (FORMAT binary)",
        copy,
    )
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
    let mut copy = CopyRows::with_capacity(rows.len() * 200);
    for (id, row) in rows {
        copy.row(8)
            .uuid(id)
            .text(row.data.name.as_str())
            .text(row.data.description.as_str())
            .int8(row.stamp.version)
            .timestamptz(row.created_at)
            .timestamptz(row.stamp.at)
            .text(&row.created_by)
            .int8(row.stamp.seq);
    }
    copy::copy_all(
        tx,
        "COPY projects (id, name, description, version, created_at, updated_at, created_by, \
         last_seq) FROM STDIN (FORMAT binary)",
        copy,
    )
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

/// The COPY of a batch's `events` rows: the events themselves, for
/// history, `as_of` and analytics.
///
/// A plain COPY, which cannot skip a row whose `seq` is there already (as
/// the `ON CONFLICT DO NOTHING` of an insert could), and need not: events
/// at or below the checkpoint never get here, and the checkpoint moves in
/// the transaction that records them, so each event is recorded once. A
/// conflict would mean the table was written behind the projector's back,
/// and fails the batch rather than hiding it. (The check an `ON CONFLICT`
/// makes per row cost a fifth of the table's insert.)
const EVENTS_COPY: &str = "COPY events (seq, event_id, event_type, schema_version, \
     aggregate_type, aggregate_id, aggregate_version, occurred_at, actor, request_id, data) \
     FROM STDIN (FORMAT binary)";

/// Bytes of `events` rows sent to the server at a time, while the next are
/// decoded: large enough that the sends are few, small enough that the
/// server starts early.
const COPY_CHUNK: usize = 256 * 1024;

/// The `events` row of event `seq`.
fn event_row(rows: &mut CopyRows, seq: u64, env: &Envelope) {
    rows.row(11)
        .int8(seq as i64)
        .uuid(env.event_id)
        .text(&env.event_type)
        .int4(env.schema_version as i32)
        .text(env.aggregate_type.as_str())
        .uuid(env.aggregate_id)
        .int8(env.aggregate_version as i64)
        .timestamptz(env.occurred_at)
        .text(&env.actor)
        .text(&env.request_id)
        .jsonb(&json_text(&env.data));
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
