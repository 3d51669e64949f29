//! What every process knows about the projection's progress: the checkpoint
//! table the projector moves, and a watch on it for read-your-writes.
//!
//! The projector commits each batch together with its checkpoint and sends
//! `NOTIFY ymera_projection` in the same transaction, so a listener learns
//! of a new checkpoint exactly when its data becomes visible.
//!
//! The live projection may be split into [`Partition`]s by aggregate, each
//! with its own checkpoint row and one owner at a time. On a log split
//! that way every event's subject carries its partition, and each
//! partition's projector consumes only its own events: the server filters
//! them, so each event is delivered once, to its partition. A partition's
//! checkpoint is its applied *watermark*: every event of the partition up
//! to it is applied, and it moves past the other partitions' events too,
//! whenever the partition has nothing pending (its owner reads the end of
//! the log, then finds no event of its own after its checkpoint up to that
//! end, asking the stream's leader), so a partition whose aggregates nobody
//! writes keeps up with the log without being delivered anything. The projection as a whole has
//! applied every event up to the lowest watermark ([`checkpoint`]): that
//! is what reads are measured against (`X-Projection-Seq`,
//! `X-Min-Event-Seq`).
//!
//! Every statement on `projector_checkpoint` that more than one crate needs
//! lives here. The table itself is created by the projector's migrations,
//! not here: each read schema (the live one, a rebuild's, a replay's) has a
//! checkpoint table of its own, made with the read models it describes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The most partitions a projection may be split into.
pub const MAX_PARTITIONS: u32 = 64;

/// One partition of the live projection: the aggregates whose id falls to
/// `index` among `count` ([`events::partition_of`]). On a log split
/// `count` ways each event's subject carries its partition, and the
/// partition's projector is delivered only its own events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The unpartitioned projection: every aggregate, under the name
    /// [`MAIN`] (today's checkpoint row, unchanged).
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    /// Every partition of a projection split `count` ways.
    pub fn all(count: u32) -> impl Iterator<Item = Partition> {
        (0..count).map(move |index| Partition { index, count })
    }

    /// The name of its checkpoint row and lease: [`MAIN`] when whole,
    /// `main:<index>/<count>` otherwise, so that a different split of the
    /// log never reads another's checkpoint.
    pub fn name(&self) -> String {
        if self.count == 1 {
            MAIN.to_owned()
        } else {
            format!("{MAIN}:{}/{}", self.index, self.count)
        }
    }

    /// Whether the event on `subject`, of a log split the same way, belongs
    /// to this partition: its aggregate id's hash, not the subject's
    /// partition token, decides, so a subject whose token lies is not
    /// applied here.
    pub fn owns(&self, subject: &str) -> bool {
        self.count == 1
            || events::aggregate_id_of(subject, self.count)
                .is_some_and(|id| events::partition_of(id, self.count) == self.index)
    }
}

/// The live projection's watermark as one SQL scalar: the lowest
/// checkpoint of its partitions (the one [`MAIN`] row when whole), 0 before
/// the first batch. [`ensure_layout`] keeps only the current split's rows.
pub const WATERMARK_SQL: &str = "SELECT COALESCE(min(last_seq), 0) FROM projector_checkpoint \
     WHERE name = 'main' OR name LIKE 'main:%'";

/// The live projection's checkpoint: every event up to it is applied, in
/// every partition (0 before the first).
pub async fn checkpoint(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let seq: i64 = sqlx::query_scalar(WATERMARK_SQL).fetch_one(pool).await?;
    Ok(seq.max(0) as u64)
}

/// How many ways the live projection is split now (1 when whole, or before
/// any projector has started).
pub async fn partition_count(pool: &PgPool) -> Result<u32, sqlx::Error> {
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM projector_checkpoint WHERE name LIKE 'main:%'")
            .fetch_one(pool)
            .await?;
    Ok(n.clamp(1, i64::from(MAX_PARTITIONS)) as u32)
}

/// Each partition of the live projection: its name, its checkpoint, and
/// the process that holds its lease (`None` while nobody does), as the
/// lease's session names itself (`application_name`).
pub async fn partitions(pool: &PgPool) -> Result<Vec<PartitionState>, sqlx::Error> {
    let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT c.name, c.last_seq, \
                (SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid::int8 = $1 AND l.objid::int8 = (hashtext(c.name)::int8 & 4294967295) \
                 LIMIT 1) \
         FROM projector_checkpoint c WHERE c.name = 'main' OR c.name LIKE 'main:%' \
         ORDER BY length(c.name), c.name",
    )
    .bind(i64::from(LEASE_CLASS))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, seq, owner)| PartitionState {
            name,
            checkpoint: seq.max(0) as u64,
            owner,
        })
        .collect())
}

/// One partition of the live projection, as [`partitions`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionState {
    pub name: String,
    pub checkpoint: u64,
    pub owner: Option<String>,
}

/// The first half of every projection lease's advisory lock key (the second
/// is the projection name's `hashtext`), so that the leases stand apart
/// from the other advisory locks of the database.
pub const LEASE_CLASS: i32 = 0x796d_6c73; // "ymls"

/// Makes the checkpoint rows of the live projection split `count` ways, if
/// they are not there yet, and removes any other split's. A new split
/// starts where the old one stands, which must be one event for all its
/// partitions (a partition starting behind another would apply some events
/// twice): true once the projectors of the old split have caught up with
/// the log, since every partition's watermark then reaches its end.
/// Raising a removed row's owners' epoch is not needed: their checkpoint
/// moves find no row and fail.
pub async fn ensure_layout(pool: &PgPool, count: u32) -> Result<(), LayoutError> {
    let wanted: Vec<String> = Partition::all(count).map(|p| p.name()).collect();
    let mut tx = pool.begin().await?;
    // One starter at a time decides; checkpoint moves go on meanwhile.
    sqlx::query("LOCK TABLE projector_checkpoint IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, last_seq FROM projector_checkpoint WHERE name = 'main' OR name LIKE 'main:%'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut have: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    have.sort_unstable();
    let mut want: Vec<&str> = wanted.iter().map(String::as_str).collect();
    want.sort_unstable();
    if have == want {
        return Ok(());
    }
    let at = rows.first().map_or(0, |r| r.1);
    if rows.iter().any(|r| r.1 != at) {
        let stands: Vec<String> = rows.iter().map(|(n, s)| format!("{n} at {s}")).collect();
        return Err(LayoutError::Uneven(stands.join(", ")));
    }
    sqlx::query("DELETE FROM projector_checkpoint WHERE name = 'main' OR name LIKE 'main:%'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO projector_checkpoint (name, last_seq) SELECT n, $2 FROM unnest($1::text[]) n",
    )
    .bind(&wanted)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        partitions = count,
        at,
        "the projection's partitions start here"
    );
    Ok(())
}

/// Why the projection's partitions could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The checkpoints are of another partition count, and those
    /// partitions stood at different events: the read models were not made
    /// from a log split as this one is (the stream records its count, and
    /// every process of it is given that count).
    #[error(
        "the projection's checkpoints are of another partition count and stand at different \
         events ({0}): these read models were made from a log split another way; rebuild them \
         from an empty database"
    )]
    Uneven(String),
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

/// The live projection's checkpoint rows among the read models of
/// `schema` (the one [`MAIN`] row when whole, one per partition when
/// split, at most [`MAX_PARTITIONS`]), whatever the connection's search
/// path, by name in partition order: where each partition stands, as a
/// rebuild reads it to follow the live projection, and as the metrics show
/// it.
pub async fn partition_checkpoints_in(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Vec<(String, u64)>, sqlx::Error> {
    db::assert_identifier(schema);
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT name, last_seq FROM {schema}.projector_checkpoint \
         WHERE name = 'main' OR name LIKE 'main:%' \
         ORDER BY length(name), name LIMIT {MAX_PARTITIONS}"
    )))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, seq)| (name, seq.max(0) as u64))
        .collect())
}

/// The live projection's checkpoint and when the event at it occurred
/// (`None` before the first): how far behind the projection is, in time.
pub async fn checkpoint_with_time(
    pool: &PgPool,
) -> Result<(u64, Option<DateTime<Utc>>), sqlx::Error> {
    let (seq, at): (i64, Option<DateTime<Utc>>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.seq, e.occurred_at FROM ({WATERMARK_SQL}) c(seq) \
         LEFT JOIN events e ON e.seq = c.seq"
    )))
    .fetch_one(pool)
    .await?;
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
///
/// A partition's row is made by [`ensure_layout`] only: a projector of a
/// split that has since been replaced finds no row (an error) rather than
/// making one at 0, which would hold every read back.
pub async fn claim(pool: &PgPool, name: &str) -> Result<Claim, sqlx::Error> {
    if !name.starts_with(&format!("{MAIN}:")) {
        sqlx::query("INSERT INTO projector_checkpoint (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(pool)
            .await?;
    }
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
/// when the transaction commits, and not before: the notification carries
/// it when `name` is the whole projection ([`MAIN`]), and only says that a
/// partition moved otherwise (the listener then reads the lowest
/// watermark: one partition's own says nothing of the others').
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
         SELECT moved.last_seq FROM moved CROSS JOIN LATERAL \
         (SELECT pg_notify($5, CASE WHEN $1 = 'main' THEN moved.last_seq::text ELSE $1 END)) notified";
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

/// Which partitions of the projection this process's projector owns (each
/// is owned by one process; the others stand by for it): what `/health`
/// and the metrics show.
#[derive(Debug, Clone, Default)]
pub struct Ownership(Arc<AtomicU64>);

impl Ownership {
    /// Records that this process now owns `partition`, or stands by for it.
    pub fn set(&self, partition: Partition, owner: bool) {
        let bit = 1u64 << partition.index.min(MAX_PARTITIONS - 1);
        if owner {
            self.0.fetch_or(bit, Ordering::SeqCst);
        } else {
            self.0.fetch_and(!bit, Ordering::SeqCst);
        }
        crate::metrics::record_projector_owner(&partition.name(), owner);
    }

    /// Whether this process owns any partition now.
    pub fn is_owner(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    /// The partitions this process owns now, by index.
    pub fn owned(&self) -> Vec<u32> {
        let mask = self.0.load(Ordering::SeqCst);
        (0..MAX_PARTITIONS)
            .filter(|i| mask & (1u64 << i) != 0)
            .collect()
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
                        continue;
                    }
                    // A partition moved: the watermark is read after its
                    // commit, and so after every commit notified before
                    // (those already here are taken with it), so the last
                    // read follows the last commit.
                    while listener.next_buffered().is_some() {}
                    match checkpoint(pool).await {
                        Ok(seq) => see(tx, seq),
                        Err(e) => return e,
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
