//! The projector: folds the event log into the PostgreSQL read models,
//! exactly once in effect.
//!
//! It is a step function, [`Projector::process_next_batch`], and a loop
//! around it, [`Projector::run`]. Each step takes what JetStream has ready
//! (up to a batch size), applies it and moves the checkpoint in one
//! PostgreSQL transaction, commits, and only then acks. The checkpoint in
//! PostgreSQL, not the consumer, is the position of record: on start, and
//! after any error, the consumer is recreated to deliver from
//! `checkpoint + 1`, and any event at or below the checkpoint is skipped. So
//! a crash at any instant neither loses nor doubles an event.
//!
//! One process at a time owns a projection: [`Projector::run`] consumes only
//! while it holds the projection's [`lease::Lease`], and waits as a hot
//! standby otherwise. Each checkpoint move is fenced by the epoch the owner
//! claimed the projection with, so a former owner's late batch fails.
//!
//! The live projection may be split into partitions by aggregate
//! ([`Partition`]), each a projector of its own (its checkpoint, its lease,
//! its subscription to its own events only), shared among the projector
//! processes by [`partitions::run`]. A partition with nothing pending moves
//! its watermark to the end of the log as soon as it is idle (see
//! [`Projector::process_next_batch`] and `infra::projection`).

mod apply;
pub mod detach;
pub mod head;
pub mod lease;
pub mod parked;
pub mod partitions;
pub mod progress;
pub mod rebuild;

use std::time::Duration;

use futures::FutureExt;
use infra::db::Tx;
use infra::event_store::{StoredMessage, Subscription};
use infra::projection::{Claim, Ownership, Partition};
use infra::{EventStore, StoreError, projection};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use apply::ApplyError;
pub use head::LogHead;

/// The read-model migrations, run into the live schema (or a rebuild's).
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates or updates the live read models.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    infra::db::migrate_schema(pool, &MIGRATIONS, infra::db::READ_SCHEMA).await
}

/// How the projector consumes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Name of the checkpoint row.
    pub name: String,
    /// Name of its durable subscription to the log; several projectors of
    /// one stream (the live one, a rebuild, a replay) each need their own.
    pub consumer: String,
    /// The live projection: it notifies readers of each checkpoint, records
    /// metrics, and yields to a rebuild's swap (see [`SWAP_LOCK`]).
    pub live: bool,
    /// Apply no event after this sequence.
    pub stop_at: Option<u64>,
    /// Stop at the first event that occurred after this time.
    pub stop_after: Option<chrono::DateTime<chrono::Utc>>,
    /// The aggregates whose events it applies: the events it is delivered
    /// (all of them when whole); its checkpoint moves past the others'
    /// too (see `infra::projection`).
    pub partition: Partition,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::live(Partition::WHOLE)
    }
}

impl Settings {
    /// The live projector of `partition`, with its own checkpoint row and
    /// durable subscription (the whole projection's are `main` and
    /// `ymera-projector-main`, as before partitions).
    pub fn live(partition: Partition) -> Self {
        let consumer = if partition.count == 1 {
            format!("ymera-projector-{}", projection::MAIN)
        } else {
            format!(
                "ymera-projector-{}-{}-of-{}",
                projection::MAIN,
                partition.index,
                partition.count
            )
        };
        Settings {
            batch_size: 5_000,
            name: partition.name(),
            consumer,
            live: true,
            stop_at: None,
            stop_after: None,
            partition,
        }
    }
}

/// The advisory lock that a live projector's batch holds shared and a
/// rebuild's swap takes exclusive, so the swap happens between batches.
pub const SWAP_LOCK: i64 = 0x796d_6572_615f_7377; // "ymera_sw"

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or skipped as already applied, or parked) `events` events;
    /// the checkpoint is now `checkpoint`.
    Applied { events: usize, checkpoint: u64 },
    /// Nothing arrived within the wait.
    Idle,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// JetStream could not be reached; the step is retried from the
    /// checkpoint.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// PostgreSQL failed; the transaction rolled back, nothing was acked.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Another projector has claimed the projection since this one did (or
    /// moved its checkpoint): the batch rolled back, and this projector no
    /// longer owns the projection.
    #[error("projection {0} has been claimed by another projector")]
    Fenced(String),
}

/// The projector of one projection.
pub struct Projector {
    store: EventStore,
    pool: PgPool,
    pub(crate) settings: Settings,
    checkpoint: u64,
    /// The epoch this projector claimed the projection with.
    epoch: i64,
    messages: Option<Subscription>,
    finished: bool,
    /// The end of the log, for a partition of a split one (made on first
    /// use unless shared with [`Projector::sharing_head`]).
    head: Option<LogHead>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("name", &self.settings.name)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl Projector {
    pub fn new(store: EventStore, pool: PgPool, settings: Settings) -> Self {
        Projector {
            store,
            pool,
            settings,
            checkpoint: 0,
            epoch: 0,
            messages: None,
            finished: false,
            head: None,
        }
    }

    /// Learns where the log ends from `head`, shared with the other
    /// partitions' projectors of the process, rather than from a head of
    /// its own.
    pub fn sharing_head(mut self, head: LogHead) -> Self {
        self.head = Some(head);
        self
    }

    /// The last sequence this projector has committed.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Whether a `stop_at` / `stop_after` bound has been reached: nothing
    /// more will be applied.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Claims the projection in PostgreSQL, which gives its checkpoint, and
    /// subscribes afresh from the event after it.
    #[tracing::instrument(skip_all, fields(name = %self.settings.name, checkpoint, epoch), err)]
    async fn connect(&mut self) -> Result<(), ProjectorError> {
        let claim = projection::claim(&self.pool, &self.settings.name).await?;
        self.checkpoint = claim.checkpoint;
        self.epoch = claim.epoch;
        tracing::Span::current()
            .record("checkpoint", self.checkpoint)
            .record("epoch", self.epoch);
        // The subscription replaces any left by an earlier run, which may
        // point anywhere: ours starts exactly after the checkpoint.
        let messages = self
            .store
            .subscribe(
                &self.settings.consumer,
                self.settings.partition,
                self.checkpoint + 1,
                self.settings.batch_size,
            )
            .await?;
        self.messages = Some(messages);
        Ok(())
    }

    /// One step: waits at most `wait` for the first event, takes whatever
    /// else is ready up to the batch size, and applies it all in one
    /// transaction with the checkpoint. Acks after commit.
    ///
    /// A partition of a split log is delivered only its own events; while
    /// it waits for one it moves its watermark past the others' (an
    /// `Applied` step of no events) as soon as the log is seen past its
    /// checkpoint and it has nothing pending (see [`Projector::catch_up_idle`]).
    pub async fn process_next_batch(&mut self, wait: Duration) -> Result<Outcome, ProjectorError> {
        let result = self.step(wait).await;
        if result.is_err() {
            // Unacked messages would only come back after the ack wait;
            // start over from the checkpoint instead.
            self.messages = None;
        }
        result
    }

    async fn step(&mut self, wait: Duration) -> Result<Outcome, ProjectorError> {
        if self.messages.is_none() {
            self.connect().await?;
        }
        if self.settings.partition.count > 1 && self.head.is_none() {
            self.head = Some(LogHead::spawn(self.store.clone()));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut retry_at = tokio::time::Instant::now();
        let first = loop {
            let Some(messages) = self.messages.as_mut() else {
                return Ok(Outcome::Idle);
            };
            let head = self.head.as_ref();
            let checkpoint = self.checkpoint;
            // Idle, and the log has moved past the watermark.
            let behind = async move {
                match head {
                    Some(head) => {
                        tokio::time::sleep_until(retry_at).await;
                        head.past(checkpoint).await;
                    }
                    None => std::future::pending().await,
                }
            };
            // An event at hand comes first: the idle check is for when
            // there is none.
            tokio::select! {
                biased;
                next = messages.next() => match next {
                    None => {
                        return Err(StoreError::Unavailable("the consumer stream ended".into()).into());
                    }
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(m)) => break m,
                },
                _ = tokio::time::sleep_until(deadline) => return Ok(Outcome::Idle),
                _ = behind => {
                    if let Some(checkpoint) = self.catch_up_idle().await? {
                        return Ok(Outcome::Applied { events: 0, checkpoint });
                    }
                    // Something is still on its way: look again shortly.
                    retry_at = tokio::time::Instant::now() + head::POLL;
                }
            }
        };
        let Some(messages) = self.messages.as_mut() else {
            return Ok(Outcome::Idle);
        };
        let mut batch = vec![first];
        // Take whatever else is at hand, and no more: nothing waits for a
        // batch to fill. When the log is ahead (a catch-up, a burst) the
        // client has prefetched the next pulls, batches fill and commits
        // are few; under a steady stream of writes, what arrived while the
        // last batch committed forms the next one, so the batch grows with
        // the load and an event waits at most for the batch before it.
        while batch.len() < self.settings.batch_size {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                Some(Some(Err(e))) => return Err(e.into()),
                Some(None) | None => break,
            }
        }
        let count = batch.len();
        if let (Some(head), Some(last)) = (self.head.as_ref(), batch.last()) {
            head.see(last.seq);
        }
        let (new_checkpoint, finished) = self.apply_batch(&batch).await?;
        self.checkpoint = new_checkpoint;
        self.finished = finished;
        // AckPolicy::All: acking the last applied message acks all before
        // it. A lost ack is harmless: the redelivery is at or below the
        // checkpoint and skipped. Messages past a bound are not acked, and
        // the consumer is recreated from the checkpoint, so a later, wider
        // bound gets them again at once.
        let last_applied = batch.iter().rev().find(|m| m.seq <= new_checkpoint);
        if let Some(last) = last_applied
            && let Some(messages) = self.messages.as_ref()
            && let Err(e) = messages.ack_through(last).await
        {
            tracing::warn!(error = %e, "ack failed; redelivery will be skipped");
        }
        if finished {
            self.messages = None;
        }
        Ok(Outcome::Applied {
            events: count,
            checkpoint: new_checkpoint,
        })
    }

    /// Moves the watermark of an idle partition to the end of the log, if
    /// every event of its own up to there is applied: the end is read
    /// first (the head: the stream's last sequence, or an event delivered
    /// to another partition, as seen before this call), then the first
    /// event of the partition after the checkpoint, from the stream's
    /// leader (its consumer may sit on a replica that lags behind the
    /// end); if there is none up to the end, the partition has nothing to
    /// apply there. The new checkpoint, or `None` when an event of its own
    /// is still to come or there is nothing to move over.
    #[tracing::instrument(skip_all, fields(from = self.checkpoint, to), err)]
    async fn catch_up_idle(&mut self) -> Result<Option<u64>, ProjectorError> {
        let Some(head) = self.head.as_ref() else {
            return Ok(None);
        };
        let end = head.seen();
        let end = self.settings.stop_at.map_or(end, |stop| end.min(stop));
        if end <= self.checkpoint {
            return Ok(None);
        }
        let own = events::partition_subjects(self.store.prefix(), self.settings.partition.index);
        if let Some(next) = self.store.first_from(&own, self.checkpoint + 1).await?
            && next <= end
        {
            return Ok(None);
        }
        let mut tx = self.begin().await?;
        self.advance(&mut tx, end).await?;
        tx.commit().await?;
        tracing::Span::current().record("to", end);
        self.checkpoint = end;
        Ok(Some(end))
    }

    /// Opens the transaction of one checkpoint move: a live one holds the
    /// swap lock shared (see [`SWAP_LOCK`]).
    ///
    /// Its commit does not wait for the disk. The log is the record of
    /// every acknowledged write, and the checkpoint commits with the rows:
    /// if PostgreSQL crashes before it has flushed the last commits, rows
    /// and checkpoint go back together, and the projector applies those
    /// events again from the log (its consumer starts at the checkpoint
    /// after every restart), so nothing is lost or doubled. What is saved
    /// is a WAL flush per batch, which a catch-up or a burst of writes
    /// otherwise waits for on every commit. (A rebuild's swap into the
    /// live schema is not one of these transactions; it waits.)
    async fn begin(&self) -> Result<Tx<'_>, ProjectorError> {
        let mut tx: Tx<'_> = self.pool.begin().await?;
        // One round trip for both (`set_config(…, true)` is `SET LOCAL`).
        let query = if self.settings.live {
            sqlx::query(
                "SELECT set_config('synchronous_commit', 'off', true), \
                 pg_advisory_xact_lock_shared($1)",
            )
            .bind(SWAP_LOCK)
        } else {
            sqlx::query("SELECT set_config('synchronous_commit', 'off', true)")
        };
        query.execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Moves the checkpoint from this projector's to `to` in `tx`, fenced
    /// by its claim (see [`projection::advance`]); rolls back and fails
    /// when another projector has claimed the projection since.
    async fn advance(&self, tx: &mut Tx<'_>, to: u64) -> Result<(), ProjectorError> {
        let claim = Claim {
            checkpoint: self.checkpoint,
            epoch: self.epoch,
        };
        let moved =
            projection::advance(tx, &self.settings.name, claim, to, self.settings.live).await?;
        if !moved {
            return Err(ProjectorError::Fenced(self.settings.name.clone()));
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(events = batch.len(), from, to), err)]
    async fn apply_batch(&self, batch: &[StoredMessage]) -> Result<(u64, bool), ProjectorError> {
        let started = std::time::Instant::now();
        let mut tx = self.begin().await?;
        let mut checkpoint = self.checkpoint;
        let mut finished = false;
        let mut incoming = Vec::with_capacity(batch.len());
        for message in batch {
            let seq = message.seq;
            if seq <= checkpoint {
                continue; // already applied: a redelivery
            }
            if self.past_the_end(seq, message.payload()) {
                finished = true;
                break;
            }
            checkpoint = seq;
            if !self.settings.partition.owns(message.subject()) {
                // Never delivered to a partition's own subscription; a
                // message that names another's aggregate is not applied.
                tracing::warn!(
                    seq,
                    subject = message.subject(),
                    "skipping another partition's event"
                );
                continue;
            }
            incoming.push(apply::Incoming {
                seq,
                subject: message.subject(),
                payload: message.payload(),
                trace: message.trace(),
            });
        }
        let applied = incoming.len();
        if checkpoint > self.checkpoint {
            // A fenced move's transaction rolls back as it is dropped.
            self.advance(&mut tx, checkpoint).await?;
        }
        let occurred: Vec<_> = apply::apply_all(&mut tx, &incoming)
            .await?
            .into_iter()
            .flatten()
            .collect();
        tx.commit().await?;
        if self.settings.live {
            infra::metrics::record_projector_batch(&infra::metrics::ProjectorBatch {
                applied,
                elapsed: started.elapsed(),
                occurred_at: &occurred,
                committed_at: chrono::Utc::now(),
            });
        }
        tracing::Span::current()
            .record("from", self.checkpoint + 1)
            .record("to", checkpoint);
        Ok((checkpoint, finished))
    }

    /// Whether event `seq` lies beyond this projector's bounds.
    fn past_the_end(&self, seq: u64, payload: &[u8]) -> bool {
        if self.settings.stop_at.is_some_and(|end| seq > end) {
            return true;
        }
        let Some(after) = self.settings.stop_after else {
            return false;
        };
        #[derive(serde::Deserialize)]
        struct When {
            occurred_at: chrono::DateTime<chrono::Utc>,
        }
        serde_json::from_slice::<When>(payload).is_ok_and(|w| w.occurred_at > after)
    }

    /// Owns the projection whenever `mine` says it is this process's to
    /// own, until `shutdown`: waits as a hot standby while another process
    /// holds the projection's lease (or while `mine` is false), applies
    /// events while this one does, and gives the lease up as soon as `mine`
    /// turns false. `ownership` says which, for `/health` and the metrics.
    pub async fn run(
        mut self,
        ownership: Ownership,
        mut mine: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let name = self.settings.name.clone();
        let partition = self.settings.partition;
        ownership.set(partition, false);
        loop {
            let Some(lease) = lease::Lease::acquire(&self.pool, &name, &mut mine, &shutdown).await
            else {
                return;
            };
            tracing::info!(projection = %name, "this process owns the projection");
            ownership.set(partition, true);
            self.own(&lease, &mut mine, &shutdown).await;
            ownership.set(partition, false);
            // Whoever owns the projection next claims it and subscribes
            // afresh, as does this process if it owns it again.
            self.messages = None;
            drop(lease);
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Applies events while `lease` holds, backing off while a dependency
    /// is down and resuming from the checkpoint when it returns. Returns
    /// at `shutdown`, or as soon as the projection is no longer this
    /// process's to apply (its lease lost, or `mine` false).
    async fn own(
        &mut self,
        lease: &lease::Lease,
        mine: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = lease.lost() => return,
                _ = mine.wait_for(|m| !*m) => return,
                step = self.process_next_batch(Duration::from_secs(1)) => step,
            };
            match step {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e @ ProjectorError::Fenced(_)) => {
                    tracing::error!(error = %e, "giving the projection up");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, checkpoint = self.checkpoint, "projector step failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = lease.lost() => return,
                        _ = mine.wait_for(|m| !*m) => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
