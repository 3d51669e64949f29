//! Rebuilding the read models from the log, and replaying it for analysts.
//!
//! A rebuild projects the whole log into a fresh schema while the live read
//! models keep serving, never running ahead of the live projection. Once it
//! has caught up, it takes [`SWAP_LOCK`] exclusively (the live projector
//! finishes its batch and waits), brings the new models to exactly the live
//! checkpoint, checks that both agree table by table (row counts and
//! checksums), and swaps the schemas by renaming them in one transaction.
//! Readers and the live projector then resolve their unqualified names in
//! the new schema (PostgreSQL drops cached plans when a schema is renamed);
//! the old one is dropped.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use infra::config::DbConfig;
use infra::db::{self, READ_SCHEMA};
use infra::{EventStore, projection};
use sqlx::PgPool;

use crate::{MIGRATIONS, Projector, SWAP_LOCK, Settings};

/// The gap (events) a rebuild closes while holding the live projector.
const SWAP_GAP: u64 = 1_000;

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub events: u64,
    pub checkpoint: u64,
    pub elapsed: Duration,
    pub tables: Vec<TableCheck>,
}

/// One table's agreement check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    pub table: &'static str,
    pub rows: i64,
    pub checksum: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Projector(#[from] crate::ProjectorError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Store(#[from] infra::StoreError),
    #[error(
        "the rebuilt read models differ from the live ones at event {seq}: {details}; nothing was swapped"
    )]
    Mismatch { seq: u64, details: String },
    #[error("{0}")]
    Invalid(String),
}

/// Each read-model table, the columns that must agree (not the moment a
/// row was written) and its key for ordering.
const TABLES: [(&str, &str, &str); 5] = [
    ("agents", "t.*", "id"),
    ("projects", "t.*", "id"),
    ("events", "t.*", "seq"),
    ("parked_events", "t.seq, t.subject, t.error", "seq"),
    ("projector_checkpoint", "t.name, t.last_seq", "name"),
];

/// Counts and checksums of every read-model table in `schema`.
pub async fn checksums(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<TableCheck>, sqlx::Error> {
    db::assert_identifier(schema);
    let mut out = Vec::new();
    for (table, cols, key) in TABLES {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(md5(row({cols})::text), '' ORDER BY t.{key})), '') \
             FROM {schema}.{table} t"
        );
        let (rows, checksum): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await?;
        out.push(TableCheck {
            table,
            rows,
            checksum,
        });
    }
    Ok(out)
}

/// Progress lines: a bar on a terminal, plain lines otherwise.
#[derive(Debug)]
struct Progress {
    started: Instant,
    last: Instant,
    tty: bool,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            last: now - Duration::from_secs(10),
            tty: std::io::stderr().is_terminal(),
            total,
        }
    }

    fn show(&mut self, done: u64, force: bool) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if !force && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let total = self.total.max(done).max(1);
        let left = if rate > 0.0 {
            (total - done) as f64 / rate
        } else {
            0.0
        };
        let pct = done as f64 * 100.0 / total as f64;
        if self.tty {
            let filled = (pct / 5.0) as usize;
            eprint!(
                "\r[{}{}] {pct:5.1}% {done}/{total} events, {rate:.0}/s, {left:.0}s left   ",
                "=".repeat(filled),
                " ".repeat(20 - filled.min(20))
            );
            if force {
                eprintln!();
            }
        } else {
            eprintln!(
                "rebuild: {done}/{total} events ({pct:.1}%), {rate:.0} events/s, about {left:.0}s left"
            );
        }
    }
}

/// A schema name for this run.
fn fresh_schema(prefix: &str) -> String {
    format!("{prefix}_{}", Utc::now().format("%Y%m%d%H%M%S%3f"))
}

/// Migrates the read-model tables into `schema` (created empty).
async fn prepare(live: &PgPool, schema: &str) -> Result<(), RebuildError> {
    db::assert_identifier(schema);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(live)
            .await?;
    if exists {
        return Err(RebuildError::Invalid(format!(
            "schema {schema} exists already"
        )));
    }
    db::migrate_schema(live, &MIGRATIONS, schema).await?;
    Ok(())
}

fn bounded(consumer: String, stop_at: Option<u64>, stop_after: Option<DateTime<Utc>>) -> Settings {
    Settings {
        batch_size: 1_000,
        consumer,
        live: false,
        stop_at,
        stop_after,
        ..Settings::default()
    }
}

/// Rebuilds every read model from the start of the log and swaps it in.
/// With `force`, swaps even when the new models disagree with the live ones
/// (to repair corrupted models, or to fill a read model that a migration
/// added after events were already projected); the differences are logged.
pub async fn rebuild(
    store: &EventStore,
    db_cfg: &DbConfig,
    live: &PgPool,
    force: bool,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let schema = fresh_schema("ymera_read_rebuild");
    prepare(live, &schema).await?;
    let pool = db::pool_reading(db_cfg, &schema)?;
    let consumer = format!("ymera-{schema}").replace('_', "-");
    let result = rebuild_into(store, live, &pool, &schema, &consumer, started, force).await;
    let _ = store.unsubscribe(&consumer).await;
    pool.close().await;
    if result.is_err() {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(live)
        .await;
    }
    result
}

async fn rebuild_into(
    store: &EventStore,
    live: &PgPool,
    pool: &PgPool,
    schema: &str,
    consumer: &str,
    started: Instant,
    force: bool,
) -> Result<RebuildReport, RebuildError> {
    // The new models must match the live ones at one sequence, so the
    // rebuild follows the live checkpoint and never runs past it (a live
    // projector that is behind, or not running, is caught up with later,
    // by itself, on the swapped-in models).
    let mut live_at = projection::checkpoint(live).await?;
    let mut progress = Progress::new(live_at);
    let mut projector = Projector::new(
        store.clone(),
        pool.clone(),
        bounded(consumer.to_owned(), Some(live_at), None),
    );

    // Catch up at full speed while the live models keep serving, until
    // the gap is small enough to close with the live projector held.
    loop {
        while projector.checkpoint() < live_at {
            projector.process_next_batch(Duration::from_secs(2)).await?;
            progress.show(projector.checkpoint(), false);
        }
        live_at = projection::checkpoint(live).await?;
        progress.total = progress.total.max(live_at);
        if live_at.saturating_sub(projector.checkpoint()) <= SWAP_GAP {
            break;
        }
        projector.settings.stop_at = Some(live_at);
    }

    // Swap, between two live batches: with the live projector held, bring
    // the new models to exactly its checkpoint.
    let mut tx = live.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SWAP_LOCK)
        .execute(&mut *tx)
        .await?;
    let live_at = projection::checkpoint_in(&mut tx, READ_SCHEMA, projection::MAIN).await?;
    projector.settings.stop_at = Some(live_at);
    while projector.checkpoint() < live_at {
        projector.process_next_batch(Duration::from_secs(2)).await?;
        progress.show(projector.checkpoint(), false);
    }
    progress.show(projector.checkpoint(), true);

    let old = checksums(&mut tx, READ_SCHEMA).await?;
    let new = checksums(&mut tx, schema).await?;
    if old != new {
        let details: Vec<String> = old
            .iter()
            .zip(&new)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("{}: live {} rows, rebuilt {} rows", a.table, a.rows, b.rows))
            .collect();
        if force {
            tracing::warn!(seq = live_at, differences = %details.join("; "), "swapping despite differences (--force)");
        } else {
            tx.rollback().await?;
            return Err(RebuildError::Mismatch {
                seq: live_at,
                details: details.join("; "),
            });
        }
    }
    // The live projector goes on with the new models' checkpoint row: it
    // carries the epoch the live owner claimed the projection with, so the
    // owner's next batch is not taken for a former owner's.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {schema}.projector_checkpoint n SET epoch = l.epoch \
         FROM {READ_SCHEMA}.projector_checkpoint l WHERE n.name = l.name"
    )))
    .execute(&mut *tx)
    .await?;
    let retired = fresh_schema("ymera_read_retired");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER SCHEMA {READ_SCHEMA} RENAME TO {retired}"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER SCHEMA {schema} RENAME TO {READ_SCHEMA}"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(seq = live_at, %retired, "swapped the rebuilt read models in");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA {retired} CASCADE"
    )))
    .execute(live)
    .await?;
    Ok(RebuildReport {
        events: live_at,
        checkpoint: live_at,
        elapsed: started.elapsed(),
        tables: new,
    })
}

/// Where a replay stops.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// After this stream sequence.
    Seq(u64),
    /// Before the first event that occurred after this time.
    Time(DateTime<Utc>),
    /// At the end of the log as it is now.
    End,
}

/// Replays the log from the start into `schema` (which must not exist),
/// leaving the live read models alone. Returns the last sequence applied.
pub async fn replay(
    store: &EventStore,
    db_cfg: &DbConfig,
    live: &PgPool,
    schema: &str,
    until: Until,
) -> Result<u64, RebuildError> {
    if schema == READ_SCHEMA
        || schema == db::CORE_SCHEMA
        || schema == "public"
        || schema.starts_with("pg_")
    {
        return Err(RebuildError::Invalid(format!(
            "{schema} is not a schema to replay into"
        )));
    }
    if !schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || schema.is_empty()
        || schema.len() > 63
    {
        return Err(RebuildError::Invalid(
            "a schema name is 1 to 63 characters of a-z, 0-9 and _".into(),
        ));
    }
    prepare(live, schema).await?;
    let pool = db::pool_reading(db_cfg, schema)?;
    let consumer = format!("ymera-replay-{}", schema.replace('_', "-"));
    let end = store.last_seq().await?;
    let (stop_at, stop_after) = match until {
        Until::Seq(s) => (Some(s.min(end)), None),
        Until::Time(t) => (Some(end), Some(t)),
        Until::End => (Some(end), None),
    };
    let goal = stop_at.unwrap_or(end);
    let mut progress = Progress::new(goal);
    let mut projector = Projector::new(
        store.clone(),
        pool.clone(),
        bounded(consumer.clone(), stop_at, stop_after),
    );
    let result = async {
        while projector.checkpoint() < goal && !projector.finished() {
            projector.process_next_batch(Duration::from_secs(2)).await?;
            progress.show(projector.checkpoint(), false);
        }
        progress.show(projector.checkpoint(), true);
        Ok::<_, RebuildError>(projector.checkpoint())
    }
    .await;
    let _ = store.unsubscribe(&consumer).await;
    pool.close().await;
    result
}
