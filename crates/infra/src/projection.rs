//! What every process knows about the projection's progress: the checkpoint
//! table the projector moves, and a watch on it for read-your-writes.
//!
//! The projector commits each batch together with its checkpoint and sends
//! `NOTIFY ymera_projection, '<seq>'` in the same transaction, so a listener
//! learns of a new checkpoint exactly when its data becomes visible.
//!
//! Every statement on `projector_checkpoint` that more than one crate needs
//! lives here. The table itself is created by the projector's migrations,
//! not here: each read schema (the live one, a rebuild's, a replay's) has a
//! checkpoint table of its own, made with the read models it describes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgExecutor, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::db::{self, Tx};

/// The channel the projector notifies on after each committed batch.
pub const CHANNEL: &str = "ymera_projection";
/// The projection whose checkpoint reads are measured against.
pub const MAIN: &str = "main";

/// The live projection's checkpoint: the stream sequence of the last event
/// applied (0 before the first).
pub async fn checkpoint(pool: &PgPool) -> Result<u64, sqlx::Error> {
    checkpoint_of(pool, MAIN).await
}

/// The checkpoint of projection `name` (0 before its first batch).
pub async fn checkpoint_of(conn: impl PgExecutor<'_>, name: &str) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT last_seq FROM projector_checkpoint WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// The checkpoint of projection `name` among the read models of `schema`,
/// whatever the connection's search path: how a rebuild reads the live
/// projection's while it builds its own.
pub async fn checkpoint_in(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<u64, sqlx::Error> {
    db::assert_identifier(schema);
    let seq: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT coalesce((SELECT last_seq FROM {schema}.projector_checkpoint WHERE name = $1), 0)"
    )))
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok(seq.max(0) as u64)
}

/// The live projection's checkpoint and when the event at it occurred
/// (`None` before the first): how far behind the projection is, in time.
pub async fn checkpoint_with_time(
    pool: &PgPool,
) -> Result<(u64, Option<DateTime<Utc>>), sqlx::Error> {
    let row: Option<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT c.last_seq, e.occurred_at FROM projector_checkpoint c \
         LEFT JOIN events e ON e.seq = c.last_seq WHERE c.name = $1",
    )
    .bind(MAIN)
    .fetch_optional(pool)
    .await?;
    let (seq, at) = row.unwrap_or((0, None));
    Ok((seq.max(0) as u64, at))
}

/// Where projection `name` starts: its checkpoint, which is registered at
/// 0 on its first start.
pub async fn start(pool: &PgPool, name: &str) -> Result<u64, sqlx::Error> {
    sqlx::query("INSERT INTO projector_checkpoint (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await?;
    checkpoint_of(pool, name).await
}

/// Moves projection `name`'s checkpoint to `seq` in the transaction that
/// applies the events up to it. With `notify`, every [`ProjectionWatch`]
/// learns of it when the transaction commits, and not before.
pub async fn advance(
    tx: &mut Tx<'_>,
    name: &str,
    seq: u64,
    notify: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projector_checkpoint SET last_seq = $2, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(seq as i64)
    .execute(&mut **tx)
    .await?;
    if notify {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(seq.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// How many events the projector has parked as impossible to apply.
pub async fn parked(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

/// The latest checkpoint this process has seen, kept current by a
/// `LISTEN` task.
#[derive(Debug, Clone)]
pub struct ProjectionWatch {
    rx: watch::Receiver<u64>,
}

impl ProjectionWatch {
    /// Starts the listener. It reconnects by itself after a database outage
    /// and re-reads the checkpoint on every (re)connect, so no notification
    /// missed while disconnected is lost.
    pub fn spawn(pool: PgPool, shutdown: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(0u64);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let run = listen(&pool, &tx);
                let err = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    err = run => err,
                };
                tracing::warn!(error = %err, "projection listener lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        ProjectionWatch { rx }
    }

    /// The newest checkpoint seen.
    pub fn current(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Waits until the projection has applied event `seq`, at most
    /// `timeout`, so a client never reads older data than it asked for.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<u64, NotCaughtUp> {
        if self.current() >= seq {
            return Ok(self.current());
        }
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|v| *v >= seq)).await {
            Ok(Ok(v)) => Ok(*v),
            _ => Err(NotCaughtUp {
                wanted: seq,
                current: self.current(),
            }),
        }
    }
}

/// The projection did not reach an event in time: a 503, to retry shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the projection has not reached event {wanted} yet (it is at {current}); retry shortly")]
pub struct NotCaughtUp {
    /// The event the reader asked for.
    pub wanted: u64,
    /// The projection's checkpoint when the wait gave up.
    pub current: u64,
}

async fn listen(pool: &PgPool, tx: &watch::Sender<u64>) -> sqlx::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    if let Err(e) = listener.listen(CHANNEL).await {
        return e;
    }
    match checkpoint(pool).await {
        Ok(seq) => see(tx, seq),
        Err(e) => return e,
    }
    loop {
        match listener.recv().await {
            Ok(n) => {
                if let Ok(seq) = n.payload().parse::<u64>() {
                    see(tx, seq);
                }
            }
            Err(e) => return e,
        }
    }
}

/// Moves the watch to `seq` unless it has seen a later checkpoint.
fn see(tx: &watch::Sender<u64>, seq: u64) {
    tx.send_if_modified(|cur| {
        let moved = seq > *cur;
        if moved {
            *cur = seq;
        }
        moved
    });
}
