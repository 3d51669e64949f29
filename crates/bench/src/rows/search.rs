//! Search: `GET /agents/search` from many clients in a closed loop against
//! a `ymera query-api` whose search index holds the agents of a stream of
//! its own (`seed_agents` `agent.created` events: 1M in a full run), over a
//! mix of queries: a common word, a rare word, one typo, two typos, a
//! prefix and two words.
//!
//! The reference is the get-by-id row's throughput (ours, measured in the
//! same run, or here first when that row is not selected): search must
//! serve at least half as many requests per second, with p99 <= 50 ms. The
//! note gives how fast the query process built its index from the log, and
//! its RSS with every agent indexed.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;

use infra::EventStore;
use infra::config::NatsConfig;

use super::http::http_loop;
use super::publish::publish_pipelined;
use super::{Ctx, get_by_id};
use crate::report::{Figure, Row};
use crate::sandbox::{Server, ymera_env};

pub const TARGET: &str = ">= 0.5 of get by id, p99 <= 50 ms";
/// Over `data::agent`'s text: a role word (1 agent in 8), an agent's
/// number (1 agent), a swap in a role, two typos in one, a prefix of a
/// role, and a role with a team (1 in 40).
const QUERIES: [(&str, &str); 6] = [
    ("common word", "scout"),
    ("rare word", "424242"),
    ("one typo", "plannre"),
    ("two typos", "sumarizzer"),
    ("prefix", "transl"),
    ("two words", "reviewer borealis"),
];

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    if ctx.get_by_id_rate.is_none() {
        get_by_id::run(ctx).await?;
    }
    let reference = ctx.get_by_id_rate.context("the get-by-id rate")?;
    let published = plan.seed_agents;
    // The main server's database (its users, so its token), and a stream
    // of the row's own.
    let (db_url, token) = {
        let main = ctx.main().await?;
        (main.db_url.clone(), main.server.token.clone())
    };
    let (stream, prefix) = ctx.env.stream_names("_S");
    // Connecting provisions the stream.
    EventStore::connect(&NatsConfig::local(&ctx.env.nats_url, &stream, &prefix)).await?;
    publish_pipelined(&ctx.env.js, &prefix, 1, 0, published, 2_000, true)
        .await
        .context("filling the stream")?;
    let vars = ymera_env(&ctx.env, &stream, &prefix, &db_url);
    let started = Instant::now();
    let server = Server::start_as(&ctx.ymera, "query-api", &vars, Some(token)).await?;
    indexed(&server, published, Duration::from_secs(1800)).await?;
    let build_secs = started.elapsed().as_secs_f64();
    let rss = server.memory()?.0;

    // Each query alone first, for the note.
    let mut alone = Vec::new();
    for (what, q) in QUERIES {
        let t = Instant::now();
        let r = server
            .get("/api/v1/agents/search")
            .query(&[("q", q)])
            .send()
            .await?;
        anyhow::ensure!(r.status() == StatusCode::OK, "search {q:?}: {}", r.status());
        let body: serde_json::Value = r.json().await?;
        let hits = body["items"].as_array().map_or(0, Vec::len);
        alone.push(format!(
            "{what} {q:?} {:.1} ms ({hits} on the page)",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    let url = server.url("/api/v1/agents/search");
    let token = server.token.clone();
    let ours = http_loop(
        &server,
        &plan,
        plan.clients,
        StatusCode::OK,
        1,
        "GET /agents/search",
        move |client, n| {
            let q = QUERIES[n as usize % QUERIES.len()].1;
            client.get(&url).query(&[("q", q)]).bearer_auth(&token)
        },
    )
    .await;
    ours.check("ours")?;
    let p99 = ours.quantile_ms(0.99);
    Ok(Row::ratio(
        "search",
        TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::plain(reference, "ops/s"),
        0.5,
        p99 <= 50.0,
        format!(
            "{published} agents indexed by a `ymera query-api` from the log in {build_secs:.1} s \
             ({:.0} events/s, start-up included), its RSS then {:.0} MiB; {} clients cycling \
             over {}; reference = the get-by-id row's ops/s; each query alone: {}",
            published as f64 / build_secs,
            rss as f64 / 1048576.0,
            plan.clients,
            QUERIES.map(|(what, _)| what).join(", "),
            alone.join("; "),
        ),
    ))
}

/// Waits until `server`'s search index has applied event `seq`.
async fn indexed(server: &Server, seq: u64, deadline: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let h: serde_json::Value = server.get("/health").send().await?.json().await?;
        let at = h["checks"]["search"]["checkpoint_seq"]
            .as_u64()
            .unwrap_or(0);
        if at >= seq {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "the search index is at {at} of {seq} after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
