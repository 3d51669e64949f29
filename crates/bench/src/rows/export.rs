//! Export: one `GET /agents/export?format=csv` of the whole seeded read
//! model from `ymera all`, in rows/s, and the server's RSS growth while it
//! streams.
//!
//! Raw limit: `COPY (SELECT … ORDER BY created_at DESC, id DESC) TO STDOUT`
//! as CSV, the same rows in the same order, straight from PostgreSQL.

use std::time::Instant;

use futures::StreamExt;
use reqwest::StatusCode;

use super::Ctx;
use super::http::{expect, route_built};
use super::read_model::{agents_count, seed};
use crate::report::{Figure, Row};
use crate::sandbox::RssSampler;

pub const TARGET: &str = ">= 0.5 rows/s, RSS growth < 50 MiB";

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let path = "/api/v1/agents/export";
    if let Some(why) = route_built(&main.server, path, "format=csv&status=error&type=none").await? {
        return Ok(Row::not_built("export", TARGET, why));
    }
    seed(main, plan.seed_agents).await?;
    let total = agents_count(&main.pool).await as u64;

    let (before, _) = main.server.memory()?;
    let peak_reset = main.server.reset_peak();
    let sampler = RssSampler::start(main.server.pid);
    let started = Instant::now();
    let r = main
        .server
        .get(path)
        .query(&[("format", "csv")])
        .send()
        .await?;
    expect(r.status(), StatusCode::OK, "GET /agents/export")?;
    let mut lines = 0u64;
    let mut r = r;
    while let Some(chunk) = r.chunk().await? {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let ours_secs = started.elapsed().as_secs_f64();
    let sampled = sampler.finish().await;
    let (_, hwm) = main.server.memory()?;
    let peak = if peak_reset {
        hwm.max(sampled)
    } else {
        sampled
    };
    let growth = peak.saturating_sub(before);
    let rows = lines.saturating_sub(1);

    let started = Instant::now();
    let mut conn = main.pool.acquire().await?;
    let mut out = conn
        .copy_out_raw(
            "COPY (SELECT id, name, type, description, status, capabilities, config, tags, \
             project_id, version, created_at, updated_at, created_by FROM agents \
             ORDER BY created_at DESC, id DESC) TO STDOUT (FORMAT csv, HEADER)",
        )
        .await?;
    let mut raw_lines = 0u64;
    while let Some(chunk) = out.next().await {
        raw_lines += chunk?.iter().filter(|b| **b == b'\n').count() as u64;
    }
    drop(out);
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_rows = raw_lines.saturating_sub(1);
    let mib = growth as f64 / (1024.0 * 1024.0);
    Ok(Row::ratio(
        "export",
        TARGET,
        Figure::rate_only(rows, ours_secs, "rows/s"),
        Figure::rate_only(raw_rows, raw_secs, "rows/s"),
        0.5,
        mib < 50.0 && rows + 1 >= total.min(raw_rows),
        format!(
            "CSV of {rows} rows (table: {total}; {} seeded straight into the read model); RSS \
             growth {mib:.1} MiB (peak VmHWM after clear_refs, and 50 ms samples, minus VmRSS \
             before); raw = COPY (SELECT … ORDER BY created_at DESC, id DESC) TO STDOUT CSV",
            plan.seed_agents
        ),
    ))
}
