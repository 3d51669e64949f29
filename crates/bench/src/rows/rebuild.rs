//! Rebuild: `ymera rebuild --with-search` of the projector's sandbox (its
//! stream filled with `agent.created` events, its live projection at the
//! end): the PostgreSQL read models and a search index, built side by side,
//! in events/s.
//!
//! Raw limit: the slower of two, as a rebuild needs both: an
//! ordered-consumer read of the whole stream, and a COPY of the same
//! `agents` and `events` rows into fresh tables with the same indexes,
//! 5,000 rows per COPY.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;

use super::Ctx;
use super::read_model::copy_rows;
use crate::report::{Figure, Row};
use crate::sandbox::{run_with_deadline, ymera_env};

pub const TARGET: &str = ">= 50,000 events/s and >= 0.5";

/// The rate the row must reach besides its ratio to the raw limit.
const MIN_RATE: f64 = 50_000.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let help = std::process::Command::new(&ctx.ymera)
        .args(["rebuild", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !help.success() {
        return Ok(Row::not_built(
            "rebuild",
            TARGET,
            "`ymera rebuild` is not a subcommand yet",
        ));
    }
    let events = ctx.plan.rebuild_events;
    let vars = {
        let r = ctx.replay_filled(events).await?;
        // `ymera rebuild` follows the live projection (it swaps at the live
        // checkpoint): bring that to the end of the stream first.
        r.project_to_end().await.context("live projection")?;
        (r.stream.clone(), r.prefix.clone(), r.db_url.clone())
    };
    let vars = ymera_env(&ctx.env, &vars.0, &vars.1, &vars.2);
    let mut cmd = std::process::Command::new(&ctx.ymera);
    // Every read model: PostgreSQL's and the search index (a directory of
    // its own that no query process uses).
    cmd.args(["rebuild", "--with-search"]).envs(vars);
    let (status, tail, took) = run_with_deadline(cmd, Duration::from_secs(600)).await?;
    anyhow::ensure!(status.success(), "ymera rebuild failed ({status}): {tail}");
    let js = ctx.env.js.clone();
    let r = ctx.replay().await?;
    let stored = r.store.stream_state().await?.messages;

    // Raw 1: read the whole stream with an ordered consumer.
    let started = Instant::now();
    let stream = js.get_stream_no_info(&r.stream).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = 0u64;
    while read < stored {
        match messages.next().await {
            Some(m) => {
                m?;
                read += 1;
            }
            None => break,
        }
    }
    let read_secs = started.elapsed().as_secs_f64();
    drop(messages);

    // Raw 2: COPY the same number of rows into a fresh copy of the table.
    sqlx::query("DROP SCHEMA IF EXISTS bench_raw CASCADE")
        .execute(&r.pool)
        .await?;
    sqlx::query("CREATE SCHEMA bench_raw")
        .execute(&r.pool)
        .await?;
    for table in ["agents", "events"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE bench_raw.{table} (LIKE ymera_read.{table} INCLUDING ALL)"
        )))
        .execute(&r.pool)
        .await?;
    }
    let started = Instant::now();
    let mut conn = r.pool.acquire().await?;
    let mut i = 0;
    while i < stored {
        let n = (stored - i).min(5_000);
        copy_rows(&mut conn, "bench_raw.", i, n).await?;
        i += n;
    }
    let copy_secs = started.elapsed().as_secs_f64();
    sqlx::query("DROP SCHEMA bench_raw CASCADE")
        .execute(&mut *conn)
        .await?;

    let read_rate = Figure::rate_only(read, read_secs, "events/s");
    let copy_rate = Figure::rate_only(stored, copy_secs, "events/s");
    let note = format!(
        "`ymera rebuild --with-search` (PostgreSQL read models and the search index) of \
         {stored} events took {:.1} s; raw = the slower of an ordered-consumer \
         read of the stream ({:.0}/s) and a COPY of the same agents and events rows into fresh \
         tables with the same indexes, 5,000 rows per COPY ({:.0}/s)",
        took.as_secs_f64(),
        read_rate.value,
        copy_rate.value
    );
    let raw = if read_rate.value < copy_rate.value {
        read_rate
    } else {
        copy_rate
    };
    let ours = Figure::rate_only(stored, took.as_secs_f64(), "events/s");
    let fast_enough = ours.value >= MIN_RATE;
    Ok(Row::ratio(
        "rebuild",
        TARGET,
        ours,
        raw,
        0.5,
        fast_enough,
        note,
    ))
}
