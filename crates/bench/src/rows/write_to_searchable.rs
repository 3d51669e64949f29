//! Write-to-searchable: how long after its 201 a create is found by
//! search, p99 of open-loop writes at half the single-create rate against
//! `ymera all`.
//!
//! Raw limit: none measured; the figure is judged against a fixed 100 ms.
//! Each write is followed at once by a search for its agent's number with
//! `X-Min-Event-Seq` set to the write's `X-Event-Seq`, which the server
//! answers once its search index has committed the event: searchable is
//! that answer (the search's own time included, so an upper bound).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;
use tokio::sync::Mutex;

use super::context::Main;
use super::http::expect;
use super::{Ctx, single_create};
use crate::data;
use crate::load::Run;
use crate::report::{Figure, Row};

pub const TARGET: &str = "p99 < 100 ms";

/// Writes at `rate` per second for `secs`, open loop, each followed by the
/// search that finds it.
async fn searchable_at(main: &Main, rate: f64, secs: Duration) -> anyhow::Result<Run> {
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut tasks = vec![];
    let mut n = 20_000_000u64;
    while started.elapsed() < secs {
        ticker.tick().await;
        n += 1;
        let body = serde_json::to_vec(&data::body(&data::agent(n)))?;
        let create = main
            .server
            .post("/api/v1/agents")
            .header("content-type", "application/json")
            .body(body);
        let search = main
            .server
            .get("/api/v1/agents/search")
            .query(&[("q", n.to_string())]);
        let (latencies, errors, first_error) =
            (latencies.clone(), errors.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = async {
                let r = create.send().await?;
                let at = Instant::now();
                expect(r.status(), StatusCode::CREATED, "POST /agents")?;
                let seq = r
                    .headers()
                    .get("x-event-seq")
                    .and_then(|v| v.to_str().ok())
                    .context("no X-Event-Seq")?
                    .to_owned();
                let r = search.header("x-min-event-seq", seq).send().await?;
                expect(r.status(), StatusCode::OK, "GET /agents/search")?;
                let page: serde_json::Value = r.json().await?;
                let found = page["items"].as_array().map_or(0, Vec::len);
                anyhow::ensure!(
                    found == 1,
                    "the search found {found} agents, not the one written"
                );
                let us = at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                latencies.lock().await.push(us);
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = outcome {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                first_error.lock().await.get_or_insert(format!("{e:#}"));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut lat = std::mem::take(&mut *latencies.lock().await);
    lat.sort_unstable();
    Ok(Run {
        ops: lat.len() as u64,
        units: lat.len() as u64,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        first_error: first_error.lock().await.clone(),
        secs: secs.as_secs_f64(),
        latencies_us: lat,
    })
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    if ctx.create_rate.is_none() {
        single_create::run_briefly(ctx).await?;
    }
    let rate = (ctx.create_rate.unwrap_or(100.0) / 2.0).max(1.0);
    ctx.settle().await?;
    let main = ctx.main().await?;
    let run = searchable_at(main, rate, plan.visible_secs).await?;
    run.check("write-to-searchable")?;
    let p99 = run.quantile_ms(0.99);
    let mut row = Row::ratio(
        "write-to-searchable",
        TARGET,
        Figure {
            value: p99,
            unit: "ms p99",
            p50_ms: Some(run.quantile_ms(0.5)),
            p99_ms: Some(p99),
            count: run.ops,
            secs: run.secs,
        },
        Figure::plain(100.0, "ms"),
        0.0,
        p99 < 100.0,
        format!(
            "{} writes at {rate:.0}/s (half the single-create rate), open loop; searchable = \
             the answer of a search for the agent's number sent right after the 201 with \
             X-Min-Event-Seq = its X-Event-Seq (the search index's own checkpoint), measured \
             from the 201",
            run.ops,
        ),
    );
    row.raw = None;
    row.ratio = None;
    Ok(row)
}
