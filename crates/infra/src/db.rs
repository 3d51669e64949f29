//! The PostgreSQL pool, and how a crate runs its migrations into a schema.
//!
//! Two schemas: `ymera` holds what is not derived from the log (users,
//! idempotency keys), owned and migrated by the write side; `ymera_read`
//! holds the read models, owned and migrated by the projector. Every
//! connection searches both, so queries stay unqualified and a read model
//! schema can be rebuilt elsewhere and swapped in.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::DbConfig;

/// Schema of the state that is not derived from the event log.
pub const CORE_SCHEMA: &str = "ymera";
/// Schema of the live read models.
pub const READ_SCHEMA: &str = "ymera_read";

/// Opens a pool. It does not wait for the server: connections are made on
/// first use, so a process can start (and answer 503) while PostgreSQL is
/// down, and recovers by itself when it returns.
pub fn pool(cfg: &DbConfig) -> Result<PgPool, sqlx::Error> {
    pool_reading(cfg, READ_SCHEMA)
}

/// A pool whose unqualified names resolve in `read_schema` first: how a
/// rebuild or a replay writes read models into a schema of their own.
pub fn pool_reading(cfg: &DbConfig, read_schema: &str) -> Result<PgPool, sqlx::Error> {
    assert_identifier(read_schema);
    let options: PgConnectOptions = cfg.database_url.parse()?;
    let options = options
        .application_name("ymera")
        .options([("search_path", format!("{read_schema},{CORE_SCHEMA},public"))]);
    Ok(pool_options(
        cfg.db_max_connections,
        Duration::from_millis(cfg.db_acquire_timeout_ms),
    )
    // A couple kept open: the first requests after start (or after an
    // outage) need not all wait to connect.
    .min_connections(2.min(cfg.db_max_connections))
    .connect_lazy_with(options))
}

/// A pool of its own, on `pool`'s database with its settings, holding at
/// most `max` connections: for work that holds a connection as long as a
/// client takes (exports), so that it can never take the connections the
/// reads and the projector need.
pub fn side_pool(pool: &PgPool, max: u32) -> PgPool {
    pool_options(max, pool.options().get_acquire_timeout())
        .connect_lazy_with(pool.connect_options().as_ref().clone())
}

fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        // sqlx pings every connection it hands out by default: a second
        // round trip for every query, which under load cost as much as the
        // query itself. A connection that was busy a moment ago is alive;
        // one idle for longer (say, across an outage) is still checked
        // before use. A connection that breaks mid-burst fails its query
        // (a 503) and is discarded.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// How long a pooled connection may sit idle before it is pinged on its
/// way out of the pool.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Waits until PostgreSQL answers, logging while it does not.
pub async fn wait_ready(pool: &PgPool, deadline: Duration) -> Result<(), sqlx::Error> {
    let start = tokio::time::Instant::now();
    loop {
        match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs `migrator` into `schema`, keeping its bookkeeping table there too, so
/// that several crates' migrations live side by side.
pub async fn migrate_schema(
    pool: &PgPool,
    migrator: &Migrator,
    schema: &str,
) -> Result<(), sqlx::migrate::MigrateError> {
    assert_identifier(schema);
    let mut migrator = clone_migrator(migrator);
    migrator.create_schema(schema.to_owned());
    migrator.dangerous_set_table_name(format!("{schema}._sqlx_migrations"));
    let mut conn = pool.acquire().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET search_path TO {schema}, public"
    )))
    .execute(&mut *conn)
    .await?;
    let result = migrator.run(&mut *conn).await;
    // Put the connection back as the pool made it.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET search_path TO {READ_SCHEMA}, {CORE_SCHEMA}, public"
    )))
    .execute(&mut *conn)
    .await?;
    result
}

/// Schema names are spliced into SQL, so they must be plain identifiers;
/// they only ever come from our own constants and configuration.
pub fn assert_identifier(name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "not a safe SQL identifier: {name:?}"
    );
}

fn clone_migrator(m: &Migrator) -> Migrator {
    let mut copy = Migrator::with_migrations(m.iter().cloned().collect());
    copy.set_locking(true);
    copy
}

/// Is this error PostgreSQL being unreachable (as opposed to a bad query)?
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

/// Shorthand used by queries elsewhere.
pub type Tx<'a> = sqlx::Transaction<'a, Postgres>;
