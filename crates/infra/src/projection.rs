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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A projector's claim on projection `name`: where it starts, and the
/// epoch that fences every checkpoint move it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The checkpoint when the claim was made.
    pub checkpoint: u64,
    /// Raised by each claim; see [`advance`].
    pub epoch: i64,
}

/// Claims projection `name` (registered at checkpoint 0 on its first
/// start): raises its epoch, so that a projector that claimed it earlier
/// can no longer move its checkpoint. The claim waits for a batch that a
/// former owner is committing, and starts after it.
pub async fn claim(pool: &PgPool, name: &str) -> Result<Claim, sqlx::Error> {
    sqlx::query("INSERT INTO projector_checkpoint (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await?;
    let (seq, epoch): (i64, i64) = sqlx::query_as(
        "UPDATE projector_checkpoint SET epoch = epoch + 1 WHERE name = $1 \
         RETURNING last_seq, epoch",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(Claim {
        checkpoint: seq.max(0) as u64,
        epoch,
    })
}

/// Moves projection `name`'s checkpoint from `from` to `to` in the
/// transaction that applies the events between them, if the row still
/// carries `claim`'s epoch and `from`: `false` when it does not (another
/// projector has claimed the projection since, or moved it), and the
/// transaction must then be rolled back. So the checkpoint only ever moves
/// forward, by one owner's batches. Takes the row's lock until commit:
/// call it before applying the batch, so a fenced batch does no work.
/// With `notify`, every [`ProjectionWatch`] learns of the new checkpoint
/// when the transaction commits, and not before.
pub async fn advance(
    tx: &mut Tx<'_>,
    name: &str,
    claim: Claim,
    to: u64,
    notify: bool,
) -> Result<bool, sqlx::Error> {
    const MOVE: &str = "UPDATE projector_checkpoint SET last_seq = $4, updated_at = now() \
         WHERE name = $1 AND epoch = $2 AND last_seq = $3 AND $4 > last_seq RETURNING last_seq";
    // One round trip for both: a live batch waits on it.
    const MOVE_AND_NOTIFY: &str = "WITH moved AS (UPDATE projector_checkpoint \
         SET last_seq = $4, updated_at = now() \
         WHERE name = $1 AND epoch = $2 AND last_seq = $3 AND $4 > last_seq RETURNING last_seq) \
         SELECT moved.last_seq FROM moved \
         CROSS JOIN LATERAL (SELECT pg_notify($5, moved.last_seq::text)) notified";
    let mut query = sqlx::query(if notify { MOVE_AND_NOTIFY } else { MOVE })
        .bind(name)
        .bind(claim.epoch)
        .bind(claim.checkpoint as i64)
        .bind(to as i64);
    if notify {
        query = query.bind(CHANNEL);
    }
    let moved = query.fetch_optional(&mut **tx).await?.is_some();
    Ok(moved)
}

/// Whether this process's projector owns its projection (one process does;
/// any other waits as a hot standby): what `/health` and the metrics show.
#[derive(Debug, Clone, Default)]
pub struct Ownership(Arc<AtomicBool>);

impl Ownership {
    /// Records that this process now owns projection `name`, or stands by.
    pub fn set(&self, name: &str, owner: bool) {
        self.0.store(owner, Ordering::SeqCst);
        crate::metrics::record_projector_owner(name, owner);
    }

    /// Whether this process owns the projection now.
    pub fn is_owner(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
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

    /// A watch on another checkpoint that moves forward: the search
    /// index's, which its query process keeps itself.
    pub fn following(rx: watch::Receiver<u64>) -> Self {
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
    loop {
        // Listening (again): whatever was notified while not listening is
        // lost, so the checkpoint is read afresh.
        match checkpoint(pool).await {
            Ok(seq) => see(tx, seq),
            Err(e) => return e,
        }
        // `try_recv` answers `None` when the connection dropped and was
        // made again (`recv` would carry on silently, past the lost
        // notifications, and a read waiting for them would time out).
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Ok(seq) = n.payload().parse::<u64>() {
                        see(tx, seq);
                    }
                }
                Ok(None) => {
                    tracing::info!("projection listener reconnected; reading the checkpoint");
                    break;
                }
                Err(e) => return e,
            }
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
