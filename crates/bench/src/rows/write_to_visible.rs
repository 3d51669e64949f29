//! Write-to-visible: how long after its 201 a create becomes readable, p99
//! of open-loop writes at half the single-create rate against `ymera all`
//! (a quarter of the rate goes in the note).
//!
//! Raw limit: none measured; the figure is judged against a fixed 50 ms.
//! Visible is the projector's `NOTIFY` of a checkpoint at or past the
//! write's `X-Event-Seq`, sent in the transaction that commits the row.
//!
//! The note adds the same at half the rate on a server whose projection is
//! split four ways (`YMERA_PARTITIONS=4`), each partition delivered only
//! its own events: there a write is visible once every partition's
//! watermark has passed it (what a read with `X-Min-Event-Seq` waits for),
//! three of them by moving past an event they were never delivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;
use tokio::sync::Mutex;

use super::context::Main;
use super::http::expect;
use super::{Ctx, single_create};
use crate::data;
use crate::load::{Run, open_loop};
use crate::report::Row;
use crate::sandbox::{Server, ymera_env};

pub const TARGET: &str = "p99 < 50 ms";

/// Writes at `rate` per second for `secs`, open loop, and measures each
/// write's time from its 201 to the projector's commit of it.
async fn visible_at(main: &Main, rate: f64, secs: Duration) -> anyhow::Result<Run> {
    // The projector commits each batch with `NOTIFY ymera_projection,
    // '<checkpoint>'`: the moment a row becomes readable. A partition's
    // commit names the partition instead: the lowest watermark is read
    // then, as a query process does.
    let mut listener = sqlx::postgres::PgListener::connect_with(&main.pool).await?;
    listener.listen(infra::projection::CHANNEL).await?;
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let seen_w = seen.clone();
    let pool = main.pool.clone();
    let listen_task = tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            let seq = match n.payload().parse::<u64>() {
                Ok(seq) => seq,
                Err(_) => {
                    while listener.next_buffered().is_some() {}
                    match infra::projection::checkpoint(&pool).await {
                        Ok(seq) => seq,
                        Err(_) => continue,
                    }
                }
            };
            let mut seen = seen_w.lock().await;
            if seen.last().is_none_or(|s| s.0 < seq) {
                seen.push((seq, Instant::now()));
            }
        }
    });

    let server = &main.server;
    let gathered = open_loop(rate, secs, |n| {
        let body = serde_json::to_vec(&data::body(&data::agent(10_000_000 + n)));
        let req = server
            .post("/api/v1/agents")
            .header("content-type", "application/json");
        async move {
            let r = req.body(body?).send().await?;
            let at = Instant::now();
            expect(r.status(), StatusCode::CREATED, "POST /agents")?;
            let seq: u64 = r
                .headers()
                .get("x-event-seq")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .context("no X-Event-Seq")?;
            anyhow::Ok((seq, at))
        }
    })
    .await;
    // Let the projection catch up with the last write.
    let writes = gathered.results;
    let last = writes.iter().map(|w| w.0).max().unwrap_or(0);
    let wait = Instant::now();
    while seen.lock().await.last().is_none_or(|s| s.0 < last)
        && wait.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listen_task.abort();

    let seen = seen.lock().await.clone();
    let mut lat = Vec::with_capacity(writes.len());
    let mut invisible = 0;
    for (seq, at) in &writes {
        let k = seen.partition_point(|(s, _)| s < seq);
        match seen.get(k) {
            Some((_, visible)) => {
                let us = visible.saturating_duration_since(*at).as_micros();
                lat.push(us.min(u128::from(u32::MAX)) as u32);
            }
            None => invisible += 1,
        }
    }
    lat.sort_unstable();
    let run = Run {
        ops: lat.len() as u64,
        units: lat.len() as u64,
        errors: gathered.errors + invisible,
        first_error: gathered.first_error.or_else(|| {
            (invisible > 0).then(|| format!("{invisible} writes never became visible within 10 s"))
        }),
        secs: secs.as_secs_f64(),
        latencies_us: lat,
    };
    Ok(run)
}

/// The load of the write-to-visible and write-to-searchable rows: half the
/// single-create rate (measured first if that row did not run), with the
/// main server settled.
pub(super) async fn half_create_rate(ctx: &mut Ctx) -> anyhow::Result<f64> {
    if ctx.create_rate.is_none() {
        single_create::run_briefly(ctx).await?;
    }
    ctx.settle().await?;
    Ok((ctx.create_rate.unwrap_or(100.0) / 2.0).max(1.0))
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    let rate = half_create_rate(ctx).await?;
    let main = ctx.main().await?;
    let run = visible_at(main, rate, plan.visible_secs).await?;
    run.check("write-to-visible")?;
    // The same at a quarter of the rate: where the curve bends, for the
    // note (the target is judged at half).
    ctx.settle().await?;
    let main = ctx.main().await?;
    let quarter = visible_at(main, rate / 2.0, plan.visible_secs / 2).await?;
    quarter.check("write-to-visible at a quarter")?;
    let split = split_server(ctx).await?;
    let four = visible_at(&split, rate, plan.visible_secs / 2).await?;
    four.check("write-to-visible split four ways")?;
    drop(split);

    Ok(Row::p99_under(
        "write-to-visible",
        TARGET,
        &run,
        50.0,
        format!(
            "{} writes at {rate:.0}/s (half the single-create rate), open loop; visible = the \
             projector's NOTIFY of a checkpoint >= the write's X-Event-Seq (same transaction as \
             the row), measured from the 201; at a quarter of the single-create rate ({:.0}/s, \
             {} writes): p50 {:.1} / p99 {:.1} ms; at half the rate with the projection split \
             four ways, visible = every partition's watermark >= the write ({} writes): p50 \
             {:.1} / p99 {:.1} ms",
            run.ops,
            rate / 2.0,
            quarter.ops,
            quarter.quantile_ms(0.5),
            quarter.quantile_ms(0.99),
            four.ops,
            four.quantile_ms(0.5),
            four.quantile_ms(0.99),
        ),
    ))
}

/// `ymera all` on a database and stream of its own, its projection split
/// four ways.
async fn split_server(ctx: &mut Ctx) -> anyhow::Result<Main> {
    let db_url = ctx.env.database("_v4").await?;
    let (stream, prefix) = ctx.env.stream_names("_V4");
    let mut vars = ymera_env(&ctx.env, &stream, &prefix, &db_url);
    vars.push(("YMERA_PARTITIONS".into(), "4".into()));
    let server = Server::start(&ctx.ymera, "all", &vars).await?;
    let pool = ctx.env.pool(&db_url, 4)?;
    Ok(Main {
        server,
        stream,
        db_url,
        pool,
        seeded: 0,
    })
}
