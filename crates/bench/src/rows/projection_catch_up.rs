//! Projection catch-up: the projector's own step function
//! (`projector::Projector::process_next_batch`) applying `agent.created`
//! events already in the stream to an empty read model, in events/s.
//!
//! Raw limit: COPY of the same `agents` and `events` rows into the same
//! tables, which carry their primary keys and filter indexes only (search
//! is not PostgreSQL's), a projector batch per transaction with a
//! checkpoint update, as the projector commits.

use std::time::Instant;

use sqlx::PgPool;

use super::Ctx;
use super::read_model::copy_rows;
use crate::report::{Figure, Row};

pub const TARGET: &str = ">= 50,000 events/s and >= 0.5";

/// The rate the row must reach besides its ratio to the raw limit.
const MIN_RATE: f64 = 50_000.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let target = ctx.plan.catchup_events;
    let r = ctx.replay_filled(target).await?;
    // Raw first, into the very tables the projector writes (keys and
    // filter indexes): the same rows of agents and events, a batch per
    // transaction with a checkpoint update, as COPY.
    let batch = projector::Settings::default().batch_size as u64;
    empty_read_model(&r.pool).await?;
    let started = Instant::now();
    let mut conn = r.pool.acquire().await?;
    let mut seq = 0;
    while seq < target {
        let n = (target - seq).min(batch);
        let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
        copy_rows(&mut tx, "", seq, n).await?;
        sqlx::query(
            "INSERT INTO projector_checkpoint (name, last_seq) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()",
        )
        .bind(infra::projection::MAIN)
        .bind((seq + n) as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        seq += n;
    }
    drop(conn);
    let raw_secs = started.elapsed().as_secs_f64();

    // Ours: the projector's own step function, from an empty read model;
    // it leaves the read model the live projection of the stream, which
    // the rebuild row starts from.
    empty_read_model(&r.pool).await?;
    let started = Instant::now();
    let applied = r.project_to_end().await?;
    let ours = Figure::rate_only(applied, started.elapsed().as_secs_f64(), "events/s");
    let fast_enough = ours.value >= MIN_RATE;
    Ok(Row::ratio(
        "projection catch-up",
        TARGET,
        ours,
        Figure::rate_only(applied, raw_secs, "events/s"),
        0.5,
        fast_enough,
        format!(
            "{applied} agent.created events already in the stream, applied by \
             projector::Projector::process_next_batch (batches of up to {batch}) into an empty \
             read model; raw = COPY of the same agents and events rows into the same tables \
             (primary keys and filter indexes only), {batch} per transaction with a checkpoint \
             update"
        ),
    ))
}

/// Empties the replay sandbox's read model and sets its checkpoint back to
/// the start of the stream.
pub(super) async fn empty_read_model(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE agents, events, parked_events")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM projector_checkpoint")
        .execute(pool)
        .await?;
    Ok(())
}
