//! Get by id: `GET /agents/{id}` from many clients in a closed loop over
//! the agents in the read model, against `ymera all`.
//!
//! Raw limit: a plain one-agent `SELECT` through sqlx for each read (the
//! statement the endpoint would run per request; it shares one query among
//! the reads that arrive together instead), at the same concurrency, on a
//! pool of 16 connections (the server's default). The
//! note adds the HTTP floor: `GET /livez` from the same client, a ceiling
//! for any endpoint on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::PgPool;
use uuid::Uuid;

use super::http::{expect, http_loop};
use super::read_model::agents_count;
use super::{Ctx, Plan};
use crate::data;
use crate::load::closed_loop;
use crate::report::{Figure, Row, ratio};
use crate::sandbox::Server;

pub const TARGET: &str = ">= 0.5 ops/s";

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let mut ids = agent_ids(&main.pool).await?;
    if ids.len() < 100 {
        // Nothing written yet (the row runs alone): make some agents.
        for i in 0..200 {
            let r = main
                .server
                .post("/api/v1/agents")
                .json(&data::body(&data::agent(i)))
                .send()
                .await?;
            expect(r.status(), StatusCode::CREATED, "POST /agents")?;
        }
        let wait = Instant::now();
        while agents_count(&main.pool).await < 200 && wait.elapsed().as_secs() < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids = agent_ids(&main.pool).await?;
    }
    anyhow::ensure!(!ids.is_empty(), "no agents to read");
    let ids = Arc::new(ids);
    let base = main.server.url("/api/v1/agents/");
    let token = main.server.token.clone();
    let ids_ours = ids.clone();
    let ours = http_loop(
        &main.server,
        &plan,
        plan.clients,
        StatusCode::OK,
        1,
        "GET /agents/{id}",
        move |client, n| {
            let id = ids_ours[(n as usize * 7919) % ids_ours.len()];
            client.get(format!("{base}{id}")).bearer_auth(&token)
        },
    )
    .await;
    ours.check("ours")?;
    ctx.get_by_id_rate = Some(ours.rate());
    let main = ctx.main().await?;
    let pool = main.pool.clone();
    let raw = closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let id = ids[(n as usize * 7919) % ids.len()];
        let pool = pool.clone();
        async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(query_api::agents::GET_AGENT.as_str()))
                .bind(id)
                .fetch_one(&pool)
                .await?;
            anyhow::ensure!(!sqlx::Row::is_empty(&row), "empty row");
            Ok(1)
        }
    })
    .await;
    raw.check("raw")?;
    let floor = http_floor(&main.server, &plan).await?;
    Ok(Row::ratio(
        "get by id",
        TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.5,
        true,
        format!(
            "{} clients over {} agents; raw = a one-agent SELECT through sqlx per read, {} concurrent \
             on a pool of 16 connections (the server's default); HTTP floor: GET /livez (no \
             token, no database) from the same client answers {:.0} ops/s, a ceiling for any \
             endpoint on this machine ({:.2} of raw)",
            plan.clients,
            agents_count(&main.pool).await,
            plan.clients,
            floor,
            ratio(floor, raw.rate()),
        ),
    ))
}

/// What the HTTP layer alone costs on this machine: `GET /livez` (no
/// token, no database, a few bytes) from the same client at the same
/// concurrency, in ops/s. No endpoint can be faster than this.
async fn http_floor(server: &Server, plan: &Plan) -> anyhow::Result<f64> {
    let url = server.url("/livez");
    let run = http_loop(
        server,
        plan,
        plan.clients,
        StatusCode::OK,
        1,
        "GET /livez",
        move |client, _| client.get(&url),
    )
    .await;
    run.check("HTTP floor")?;
    Ok(run.rate())
}

/// Up to 10,000 ids of agents in the read model, the ones the row reads.
async fn agent_ids(pool: &PgPool) -> anyhow::Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar("SELECT id FROM agents LIMIT 10000")
        .fetch_all(pool)
        .await?)
}
