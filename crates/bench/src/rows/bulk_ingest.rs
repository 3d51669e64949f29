//! Bulk ingest: concurrent `POST /agents/bulk` requests of 1,000 agents
//! each (one atomic batch) against `ymera command-api`, in events/s.
//!
//! Raw limit: the same events published to JetStream pipelined, 1,000 in
//! flight per client, each guarded by expected subject sequence 0, at the
//! same concurrency.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::StatusCode;

use super::Ctx;
use super::http::http_loop;
use super::publish::guarded;
use crate::data;
use crate::load::closed_loop;
use crate::report::{Figure, Row};

pub const TARGET: &str = ">= 0.7 events/s";
const BULK_SIZE: u64 = 1_000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let (_, raw_prefix) = ctx.raw_stream().await?;
    // The write path alone, like single create: `ymera command-api`.
    let writer = ctx.writer().await?;
    let agents: Vec<_> = (0..BULK_SIZE).map(data::agent).collect();
    let body = serde_json::json!({ "agents": agents.iter().map(data::body).collect::<Vec<_>>() });
    let body = Bytes::from(serde_json::to_vec(&body)?);
    let url = writer.url("/api/v1/agents/bulk");
    let token = writer.token.clone();
    let ours = http_loop(
        writer,
        &plan,
        plan.bulk_clients,
        StatusCode::CREATED,
        BULK_SIZE,
        "POST /agents/bulk",
        move |client, _| {
            client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.clone())
        },
    )
    .await;
    ours.check("ours")?;

    let js = ctx.env.js.clone();
    let agents = Arc::new(agents);
    let raw = closed_loop(plan.bulk_clients, plan.warmup, plan.measure, move |_, _| {
        let js = js.clone();
        let agents = agents.clone();
        let prefix = raw_prefix.clone();
        async move {
            let mut acks = Vec::with_capacity(agents.len());
            for a in agents.iter() {
                let e = data::event(a);
                acks.push(
                    js.send_publish(e.subject(&prefix, 1), guarded(&e, false))
                        .await?,
                );
            }
            for ack in acks {
                ack.await?;
            }
            Ok(BULK_SIZE)
        }
    })
    .await;
    raw.check("raw")?;
    Ok(Row::ratio(
        "bulk ingest",
        TARGET,
        Figure::rate(&ours, "events/s"),
        Figure::rate(&raw, "events/s"),
        0.7,
        true,
        format!(
            "{} concurrent requests of {BULK_SIZE} agents to `ymera command-api` (ours: one atomic \
             batch each); raw = the \
             same events published pipelined, {BULK_SIZE} in flight per client, each guarded by \
             expected subject sequence 0; latencies are per request of {BULK_SIZE}",
            plan.bulk_clients
        ),
    ))
}
