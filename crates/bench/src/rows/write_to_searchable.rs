//! Write-to-searchable: how long after its 201 a create is found by
//! search, p99 of open-loop writes at half the single-create rate against
//! `ymera all`.
//!
//! Raw limit: none measured; the figure is judged against a fixed 100 ms.
//! The load is the write-to-visible row's: creates at half the
//! single-create rate. One create in [`PROBE_EVERY`] is followed at once by
//! a search for its agent's number with `X-Min-Event-Seq` set to the
//! write's `X-Event-Seq`, which the server answers once its search index
//! holds the event: searchable is that answer (the search's own time
//! included, so an upper bound). Probing every create would double the
//! request rate the row is defined at, so it is sampled, evenly; the note
//! gives the figure with every create probed too.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;

use super::context::Main;
use super::http::expect;
use super::{Ctx, write_to_visible};
use crate::data;
use crate::load::{Run, open_loop};
use crate::report::Row;

pub const TARGET: &str = "p99 < 100 ms";

/// One create in this many is followed by its search (see the module doc).
pub const PROBE_EVERY: u64 = 8;

/// Writes at `rate` per second for `secs`, open loop, agents numbered from
/// `first`, one in `every` followed by the search that finds it.
async fn searchable_at(main: &Main, rate: f64, secs: Duration, first: u64, every: u64) -> Run {
    let server = &main.server;
    let gathered = open_loop(rate, secs, |n| {
        let probe = n % every == 0;
        let n = first + n;
        let body = serde_json::to_vec(&data::body(&data::agent(n)));
        let create = server
            .post("/api/v1/agents")
            .header("content-type", "application/json");
        let search = server
            .get("/api/v1/agents/search")
            .query(&[("q", n.to_string())]);
        async move {
            let r = create.body(body?).send().await?;
            let at = Instant::now();
            expect(r.status(), StatusCode::CREATED, "POST /agents")?;
            if !probe {
                return anyhow::Ok(None);
            }
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
            anyhow::Ok(Some(
                at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
            ))
        }
    })
    .await;
    let writes = gathered.results.len() as u64;
    let mut lat: Vec<u32> = gathered.results.into_iter().flatten().collect();
    lat.sort_unstable();
    Run {
        ops: lat.len() as u64,
        units: writes,
        errors: gathered.errors,
        first_error: gathered.first_error,
        secs: secs.as_secs_f64(),
        latencies_us: lat,
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    let rate = write_to_visible::half_create_rate(ctx).await?;
    ctx.settle_search().await?;
    let main = ctx.main().await?;
    let run = searchable_at(main, rate, plan.visible_secs, 20_000_000, PROBE_EVERY).await;
    run.check("write-to-searchable")?;
    // The same with a search after every create: twice the requests.
    ctx.settle_search().await?;
    let main = ctx.main().await?;
    let every = searchable_at(main, rate, plan.visible_secs / 2, 30_000_000, 1).await;
    every.check("write-to-searchable, every create probed")?;
    Ok(Row::p99_under(
        "write-to-searchable",
        TARGET,
        &run,
        100.0,
        format!(
            "{} writes at {rate:.0}/s (half the single-create rate), open loop, {} of them (one \
             in {PROBE_EVERY}) probed; searchable = the answer of a search for the agent's number \
             sent right after the 201 with X-Min-Event-Seq = its X-Event-Seq (the search index's \
             own checkpoint), measured from the 201; with every create probed (twice the \
             requests, {} probes): p50 {:.1} / p99 {:.1} ms",
            run.units,
            run.ops,
            every.ops,
            every.quantile_ms(0.5),
            every.quantile_ms(0.99),
        ),
    ))
}
