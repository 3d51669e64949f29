//! Rebuilding the read models from the log, and replaying it for analysts.
//!
//! A rebuild projects the whole log into a fresh schema while the live read
//! models keep serving, never running ahead of the live projection: into
//! tables with their keys only, in large batches whose commits do not wait
//! for the disk, and the filter indexes are made once the bulk of the log
//! is in (a sorted pass each, instead of an insert per row). Once it
//! has caught up, it compares the new models with the live ones table by
//! table (row counts and checksums) at one event, still without holding the
//! live projector: the live models are read in one snapshot, and the new
//! ones are brought to that snapshot's checkpoint. A checksum is a sum of
//! per-row hashes, one sequential pass per table at any size. Then it
//! takes [`SWAP_LOCK`] exclusively (the live projectors finish their
//! batches and wait), brings the new models to exactly the live checkpoint,
//! compares only the rows that the events since the comparison changed,
//! and swaps the schemas by renaming them in one transaction. So the live
//! projector is held for the last few events, whatever the size of the log.
//! Readers and the live projector then resolve their unqualified names in
//! the new schema (PostgreSQL drops cached plans when a schema is renamed);
//! the old one is dropped.
//!
//! A live projection split into partitions is followed partition by
//! partition: the bulk of the log is built by one projector of the whole
//! log up to the lowest live checkpoint, then one projector per partition
//! takes over from there (with a checkpoint row each, named as the live
//! ones) and brings each partition of the new models to the event its live
//! counterpart stands at. So the comparisons and the swap see the same
//! events applied on both sides, and after the swap each live owner finds
//! its partition's row where it left it and goes on.
//!
//! The comparison of changed rows trusts that only the projectors write
//! the read models: a row changed behind the live projector's back after
//! the full comparison is not seen (the next rebuild sees it).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use infra::EventStore;
use infra::config::DbConfig;
use infra::db::{self, READ_SCHEMA};
use infra::projection::{self, Partition};
use sqlx::{PgConnection, PgPool};

use crate::progress::Reporter;
use crate::{MIGRATIONS, Projector, SWAP_LOCK, Settings};

/// The gap (events) a rebuild closes while holding the live projector, and
/// about as many events' changed rows are compared then.
const SWAP_GAP: u64 = 1_000;

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub events: u64,
    pub checkpoint: u64,
    pub elapsed: Duration,
    /// The event at which every row of the rebuilt models was compared
    /// with the live ones (rows changed after it were compared again up to
    /// the swap).
    pub checked_at: u64,
    /// The rebuilt tables' checks at `checked_at`.
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
    #[error(transparent)]
    Layout(#[from] projection::LayoutError),
    #[error("{0}")]
    Invalid(String),
}

/// At most this many comparisons of the rows changed since the previous one
/// are made before the swap lock is taken, even if the live projection
/// keeps outrunning them (each is quicker than the last, unless writes come
/// faster than they can be compared).
const TAIL_ROUNDS: usize = 10;

/// A read-model table: the columns that must agree (not the moment a row
/// was written), its key, and the rows a comparison limited to the changes
/// after some event covers.
struct Table {
    name: &'static str,
    cols: &'static str,
    key: &'static str,
    changed: Changed,
}

/// How to find a table's rows changed after an event.
enum Changed {
    /// Rows of the aggregates that events after it belong to, taken from
    /// the `events` table (so a row deleted since counts too).
    Aggregate(&'static str),
    /// Rows keyed by a stream sequence after it.
    Seq,
    /// A table small enough to compare whole every time.
    All,
}

const TABLES: [Table; 5] = [
    Table {
        name: "agents",
        cols: "t.*",
        key: "id",
        changed: Changed::Aggregate("agent"),
    },
    Table {
        name: "projects",
        cols: "t.*",
        key: "id",
        changed: Changed::Aggregate("project"),
    },
    Table {
        name: "events",
        cols: "t.*",
        key: "seq",
        changed: Changed::Seq,
    },
    Table {
        name: "parked_events",
        cols: "t.seq, t.subject, t.error",
        key: "seq",
        changed: Changed::Seq,
    },
    Table {
        name: "projector_checkpoint",
        cols: "t.name, t.last_seq",
        key: "name",
        changed: Changed::All,
    },
];

/// Counts and checksums of every read-model table in `schema`.
pub async fn checksums(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<TableCheck>, sqlx::Error> {
    checksums_since(conn, schema, None).await
}

/// Counts and checksums of the rows of every read-model table in `schema`
/// that events after `since` changed (every row with `None`). A table's
/// checksum is the sum of a 64-bit hash of each row, twice over with two
/// seeds (128 bits in all): equal tables give equal checksums, and a sum
/// needs neither the rows in order nor a value that grows with the table,
/// so each table is one sequential pass. It used to chain MD5s over chunks
/// of rows read in key order, which cost more than loading the rows (a
/// random-order index walk of `agents` by its UUID key, an MD5 and a sort
/// per row). A row is hashed as a record (each column by its type's own
/// hash, `hash_record_extended`), not as its text: printing a million
/// `events` rows (their JSON documents above all) made their comparison
/// 2.7 s of one core, hashing the records 0.8 s, and a rebuild compares
/// every table twice, live and new.
async fn checksums_since(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    since: Option<u64>,
) -> Result<Vec<TableCheck>, sqlx::Error> {
    db::assert_identifier(schema);
    let mut out = Vec::new();
    for table in &TABLES {
        let (name, cols, key) = (table.name, table.cols, table.key);
        // `since` is a number, written into the statement as one.
        let filter = match (since, &table.changed) {
            (None, _) | (Some(_), Changed::All) => "true".to_owned(),
            (Some(s), Changed::Seq) => format!("t.{key} > {s}"),
            (Some(s), Changed::Aggregate(kind)) => format!(
                "t.{key} IN (SELECT e.aggregate_id FROM {schema}.events e \
                 WHERE e.seq > {s} AND e.aggregate_type = '{kind}')"
            ),
        };
        let (rows, checksum): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), coalesce(sum(hash_record_extended(r, 0)), 0)::text || '/' \
                    || coalesce(sum(hash_record_extended(r, 1)), 0)::text \
             FROM (SELECT row({cols}) AS r FROM {schema}.{name} t WHERE {filter}) rows"
        )))
        .fetch_one(&mut *conn)
        .await?;
        out.push(TableCheck {
            table: name,
            rows,
            checksum,
        });
    }
    Ok(out)
}

/// What differs between the live tables' checks and the rebuilt ones'.
fn differences(live: &[TableCheck], rebuilt: &[TableCheck], since: Option<u64>) -> Vec<String> {
    let which = since.map_or(String::new(), |s| {
        format!(" (rows changed after event {s})")
    });
    live.iter()
        .zip(rebuilt)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            format!(
                "{}{which}: live {} rows, rebuilt {} rows",
                a.table, a.rows, b.rows
            )
        })
        .collect()
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

/// A schema's tables while a rebuild or replay loads them in bulk: without
/// their filter indexes (every index but the primary keys and unique ones),
/// which are made again once the rows are in, each in one sorted pass
/// instead of an insert per row; and without autovacuum, which would
/// otherwise vacuum and analyze each table again and again as the rows
/// pour in, on the cores the load needs. [`BulkLoad::finish`] makes the
/// indexes and analyzes every table once.
struct BulkLoad {
    schema: String,
    /// The dropped indexes' definitions, as PostgreSQL printed them.
    indexes: Vec<String>,
    tables: Vec<String>,
}

impl BulkLoad {
    async fn start(pool: &PgPool, schema: &str) -> Result<BulkLoad, sqlx::Error> {
        db::assert_identifier(schema);
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_indexdef(c.oid) FROM pg_index x \
             JOIN pg_class c ON c.oid = x.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND NOT x.indisprimary AND NOT x.indisunique \
             ORDER BY c.relname",
        )
        .bind(schema)
        .fetch_all(pool)
        .await?;
        for (name, _) in &indexes {
            db::assert_identifier(name);
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {schema}.{name}")))
                .execute(pool)
                .await?;
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY c.relname",
        )
        .bind(schema)
        .fetch_all(pool)
        .await?;
        for table in &tables {
            db::assert_identifier(table);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {schema}.{table} SET (autovacuum_enabled = off)"
            )))
            .execute(pool)
            .await?;
        }
        Ok(BulkLoad {
            schema: schema.to_owned(),
            indexes: indexes.into_iter().map(|(_, def)| def).collect(),
            tables,
        })
    }

    /// Makes the dropped indexes, [`INDEX_BUILDERS`] at a time, each with
    /// room to sort in memory; then analyzes every table (the planner
    /// needs its statistics as soon as the tables serve) and gives it back
    /// to autovacuum.
    async fn finish(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let builders = (0..INDEX_BUILDERS).map(|_| async {
            let mut conn = pool.acquire().await?;
            sqlx::query("SET maintenance_work_mem = '256MB'")
                .execute(&mut *conn)
                .await?;
            // Each builder takes the next index still to make, so a long
            // one (the tags' GIN index) does not leave the other idle.
            while let Some(definition) = self
                .indexes
                .get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                sqlx::query(sqlx::AssertSqlSafe(definition.clone()))
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query("RESET maintenance_work_mem")
                .execute(&mut *conn)
                .await?;
            Ok::<_, sqlx::Error>(())
        });
        futures::future::try_join_all(builders).await?;
        let schema = &self.schema;
        for table in &self.tables {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {schema}.{table} RESET (autovacuum_enabled)"
            )))
            .execute(pool)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {schema}.{table}")))
                .execute(pool)
                .await?;
        }
        Ok(())
    }
}

/// Index builds run at once: the sorts are CPU-bound, and one per core of
/// a small database server keeps it busy.
const INDEX_BUILDERS: usize = 2;

fn bounded(consumer: String, stop_at: Option<u64>, stop_after: Option<DateTime<Utc>>) -> Settings {
    Settings {
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
/// Reports how far it has come to `progress`.
pub async fn rebuild(
    store: &EventStore,
    db_cfg: &DbConfig,
    live: &PgPool,
    force: bool,
    progress: &Reporter,
) -> Result<RebuildReport, RebuildError> {
    let partitions = projection::partition_count(live).await?;
    let schema = fresh_schema("ymera_read_rebuild");
    prepare(live, &schema).await?;
    let pool = db::pool_reading(db_cfg, &schema)?;
    let consumer = format!("ymera-{schema}").replace('_', "-");
    let mut rebuild = Rebuilding {
        projectors: vec![Projector::new(
            store.clone(),
            pool.clone(),
            bounded(consumer.clone(), Some(0), None),
        )],
        partitions,
        store,
        consumer: &consumer,
        progress,
        live,
        pool: &pool,
        schema: &schema,
        force,
    };
    let result = rebuild.run().await;
    drop(rebuild);
    let partition_consumers = Partition::all(partitions)
        .filter(|_| partitions > 1)
        .map(|p| partition_consumer(&consumer, p));
    for name in std::iter::once(consumer.clone()).chain(partition_consumers) {
        let _ = store.unsubscribe(&name).await;
    }
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

/// The durable subscription of a rebuild's projector of `partition`.
fn partition_consumer(consumer: &str, partition: Partition) -> String {
    format!("{consumer}-{}", partition.index)
}

/// A rebuild under way: its projectors into the new schema, and what it is
/// compared with.
struct Rebuilding<'a> {
    /// One projector of the whole log, which builds the bulk of the new
    /// models; after [`Rebuilding::split`], one per partition of the live
    /// projection.
    projectors: Vec<Projector>,
    /// How many partitions the live projection has.
    partitions: u32,
    store: &'a EventStore,
    consumer: &'a str,
    progress: &'a Reporter,
    live: &'a PgPool,
    pool: &'a PgPool,
    schema: &'a str,
    force: bool,
}

impl Rebuilding<'_> {
    async fn run(&mut self) -> Result<RebuildReport, RebuildError> {
        let started = Instant::now();
        // The bulk of the log goes into tables with their keys only; the
        // filter indexes are made once it is in.
        let load = BulkLoad::start(self.pool, self.schema).await?;
        // The new models must match the live ones at one point of the log,
        // so the rebuild follows the live checkpoints and never runs past
        // them (a live projector that is behind, or not running, is caught
        // up with later, by itself, on the swapped-in models).
        self.catch_up().await?;
        load.finish(self.pool).await?;
        self.split().await?;

        // Everything but the last few events is built and compared while
        // the live projectors go on: first every row, at one point, then,
        // while many events came after, the rows those changed.
        let (checked_at, tables) = self.compare_at_live_snapshot(None).await?;
        let mut compared = checked_at;
        for _ in 0..TAIL_ROUNDS {
            let live_at = self.catch_up().await?;
            if live_at.saturating_sub(compared) <= SWAP_GAP {
                break;
            }
            compared = self.compare_at_live_snapshot(Some(compared)).await?.0;
        }
        let live_at = self.swap(compared).await?;
        Ok(RebuildReport {
            events: live_at,
            checkpoint: live_at,
            elapsed: started.elapsed(),
            checked_at,
            tables,
        })
    }

    /// Swaps the new models in, between two live batches: with every live
    /// projector held, brings each partition of the new models to exactly
    /// where its live counterpart stands, compares the rows changed since
    /// event `compared`, and renames the schemas. Returns the live
    /// projection's checkpoint (its lowest watermark) at the swap.
    async fn swap(&mut self, compared: u64) -> Result<u64, RebuildError> {
        let mut tx = self.live.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SWAP_LOCK)
            .execute(&mut *tx)
            .await?;
        // A claim of a partition (which raises its epoch) or a change of the
        // partitions waits for the swap too, so the checkpoints and epochs
        // read here stay the live ones until the new rows replace them.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {READ_SCHEMA}.projector_checkpoint IN SHARE MODE"
        )))
        .execute(&mut *tx)
        .await?;
        let stands = self.live_stands(&mut tx).await?;
        self.advance_to(&stands).await?;
        let live_at = lowest(&stands);
        let mut conn = self.pool.acquire().await?;
        let (old, new) = tokio::try_join!(
            checksums_since(&mut tx, READ_SCHEMA, Some(compared)),
            checksums_since(&mut conn, self.schema, Some(compared)),
        )?;
        drop(conn);
        if let Err(mismatch) = self.judge(live_at, &old, &new, Some(compared)) {
            tx.rollback().await?;
            return Err(mismatch);
        }
        // The live projectors go on with the new models' checkpoint rows,
        // one per partition at the event its owner has reached: each
        // carries the epoch its owner claimed it with, so the owner's next
        // batch is not taken for a former owner's. (An owner that claimed
        // it after this read finds the epoch moved on, and claims it again
        // in the new models.)
        let schema = self.schema;
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
        .execute(self.live)
        .await?;
        Ok(live_at)
    }

    /// Where each partition of the live projection stands (its checkpoint,
    /// in partition order), as `conn` sees the live models; all at 0 before
    /// anything was projected. Fails if the live projection is no longer
    /// split the way the rebuild follows it (the projectors were restarted
    /// with another `YMERA_PARTITIONS`).
    async fn live_stands(&self, conn: &mut PgConnection) -> Result<Vec<u64>, RebuildError> {
        let rows = projection::partition_checkpoints_in(conn, READ_SCHEMA).await?;
        if rows.is_empty() {
            return Ok(vec![0; self.partitions as usize]);
        }
        let stands: Option<Vec<u64>> = Partition::all(self.partitions)
            .map(|p| {
                let name = p.name();
                rows.iter().find(|(n, _)| *n == name).map(|(_, seq)| *seq)
            })
            .collect();
        match stands {
            Some(stands) if stands.len() == rows.len() => Ok(stands),
            _ => Err(RebuildError::Invalid(format!(
                "the live projection is no longer split into {} partitions \
                 (YMERA_PARTITIONS changed during the rebuild); nothing was swapped",
                self.partitions
            ))),
        }
    }

    /// Where the new models stand: every event up to the lowest of their
    /// projectors' checkpoints is applied.
    fn checkpoint(&self) -> u64 {
        self.projectors
            .iter()
            .map(Projector::checkpoint)
            .min()
            .unwrap_or(0)
    }

    /// Each projector's target for the live projection standing at
    /// `stands`: its own partition's checkpoint, or, for the one projector
    /// of the whole log before the split, the lowest of them (every event
    /// up to it is applied in every live partition).
    fn targets(&self, stands: &[u64]) -> Vec<u64> {
        if self.projectors.len() == stands.len() {
            stands.to_vec()
        } else {
            vec![lowest(stands)]
        }
    }

    /// Applies events until each projector is exactly at its target for
    /// the live projection standing at `stands` (see [`Self::targets`]).
    async fn advance_to(&mut self, stands: &[u64]) -> Result<(), RebuildError> {
        for (k, target) in self.targets(stands).into_iter().enumerate() {
            self.projectors[k].settings.stop_at = Some(target);
            while self.projectors[k].checkpoint() < target {
                self.projectors[k]
                    .process_next_batch(Duration::from_secs(2))
                    .await?;
                self.progress.done(self.checkpoint());
            }
        }
        Ok(())
    }

    /// Catches up at full speed while the live models keep serving, until
    /// every projector is close enough to its target to close the gap with
    /// the live projectors held. Returns the live checkpoint (the lowest
    /// watermark) last read.
    async fn catch_up(&mut self) -> Result<u64, RebuildError> {
        loop {
            let stands = {
                let mut conn = self.live.acquire().await?;
                self.live_stands(&mut conn).await?
            };
            self.progress.total_at_least(lowest(&stands));
            let gap = self
                .targets(&stands)
                .iter()
                .zip(&self.projectors)
                .map(|(target, p)| target.saturating_sub(p.checkpoint()))
                .max()
                .unwrap_or(0);
            if gap <= SWAP_GAP {
                return Ok(lowest(&stands));
            }
            self.advance_to(&stands).await?;
        }
    }

    /// Hands the new models over from the projector of the whole log,
    /// which built their bulk, to one projector per partition of the live
    /// projection, each starting where the bulk ends: the new models then
    /// get one checkpoint row per partition, named as the live ones, and
    /// each partition follows its live counterpart to the very event it
    /// stands at (they differ: each partition commits on its own). So the
    /// two can be compared row for row, and at the swap each live owner
    /// finds its partition's row where it left it. A projection of one
    /// partition keeps its one projector.
    async fn split(&mut self) -> Result<(), RebuildError> {
        if self.partitions == 1 {
            return Ok(());
        }
        projection::ensure_layout(self.pool, self.partitions).await?;
        self.projectors = Partition::all(self.partitions)
            .map(|partition| {
                let settings = Settings {
                    name: partition.name(),
                    partition,
                    ..bounded(partition_consumer(self.consumer, partition), None, None)
                };
                Projector::new(self.store.clone(), self.pool.clone(), settings)
            })
            .collect();
        Ok(())
    }

    /// Compares the new models with the live ones at one point of the log,
    /// without holding the live projectors: the live models are read in
    /// one snapshot (which shows the rows of the checkpoints it shows, as
    /// the projectors commit them together), and the new ones are brought
    /// to those checkpoints first. Compares the rows changed after `since`
    /// (every row with `None`). Returns the live checkpoint compared at
    /// (the lowest watermark: every event after it may have changed rows
    /// since), and the rebuilt tables' checks.
    async fn compare_at_live_snapshot(
        &mut self,
        since: Option<u64>,
    ) -> Result<(u64, Vec<TableCheck>), RebuildError> {
        let mut snapshot = self.live.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *snapshot)
            .await?;
        let stands = self.live_stands(&mut snapshot).await?;
        self.advance_to(&stands).await?;
        let at = lowest(&stands);
        let mut conn = self.pool.acquire().await?;
        let (old, new) = tokio::try_join!(
            checksums_since(&mut snapshot, READ_SCHEMA, since),
            checksums_since(&mut conn, self.schema, since),
        )?;
        snapshot.commit().await?;
        self.judge(at, &old, &new, since)?;
        Ok((at, new))
    }

    /// Refuses the swap when the checks differ, unless forced (to repair
    /// corrupted models), when the differences are logged.
    fn judge(
        &self,
        seq: u64,
        live: &[TableCheck],
        rebuilt: &[TableCheck],
        since: Option<u64>,
    ) -> Result<(), RebuildError> {
        let details = differences(live, rebuilt, since);
        if details.is_empty() {
            return Ok(());
        }
        let details = details.join("; ");
        if self.force {
            tracing::warn!(seq, differences = %details, "swapping despite differences (--force)");
            return Ok(());
        }
        Err(RebuildError::Mismatch { seq, details })
    }
}

/// The lowest of the partitions' checkpoints: the projection's.
fn lowest(stands: &[u64]) -> u64 {
    stands.iter().copied().min().unwrap_or(0)
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
/// Reports how far it has come to `progress`.
pub async fn replay(
    store: &EventStore,
    db_cfg: &DbConfig,
    live: &PgPool,
    schema: &str,
    until: Until,
    progress: &Reporter,
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
    progress.total_at_least(goal);
    let mut projector = Projector::new(
        store.clone(),
        pool.clone(),
        bounded(consumer.clone(), stop_at, stop_after),
    );
    let result = async {
        let load = BulkLoad::start(&pool, schema).await?;
        while projector.checkpoint() < goal && !projector.finished() {
            projector.process_next_batch(Duration::from_secs(2)).await?;
            progress.done(projector.checkpoint());
        }
        load.finish(&pool).await?;
        Ok::<_, RebuildError>(projector.checkpoint())
    }
    .await;
    let _ = store.unsubscribe(&consumer).await;
    pool.close().await;
    result
}
