//! Single create: `POST /agents` from many clients in a closed loop,
//! against `ymera command-api` (the write path alone).
//!
//! Raw limit: a JetStream publish of the same envelope bytes, guarded like
//! a create (`Nats-Msg-Id`, expected subject sequence 0 on a fresh
//! subject), each awaiting its ack, at the same concurrency. The same load
//! against `ymera all` goes in the note, and gives write-to-visible its
//! rate and memory its loaded figure.

use std::time::Duration;

use async_nats::jetstream;
use reqwest::StatusCode;

use super::http::http_loop;
use super::publish::guarded;
use super::{Ctx, Plan};
use crate::data;
use crate::load::{Run, closed_loop};
use crate::report::{Figure, Row, ratio};
use crate::sandbox::{RssSampler, Server};

pub const TARGET: &str = ">= 0.5 ops/s, p99 <= 3x raw";

/// `POST /agents` from `plan.clients` clients in a closed loop.
pub(super) async fn creates(server: &Server, plan: &Plan) -> Run {
    let url = server.url("/api/v1/agents");
    let token = server.token.clone();
    http_loop(
        server,
        plan,
        plan.clients,
        StatusCode::CREATED,
        1,
        "POST /agents",
        move |client, n| {
            client
                .post(&url)
                .bearer_auth(&token)
                .json(&data::body(&data::agent(n)))
        },
    )
    .await
}

/// The raw limit of a create: the guarded publish of a create's envelope
/// to `prefix`, each awaiting its ack, from `plan.clients` clients.
pub(super) async fn raw_creates(js: jetstream::Context, prefix: String, plan: &Plan) -> Run {
    closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let e = data::event(&data::agent(n));
        let msg = guarded(&e, true);
        let subject = e.subject(&prefix, 1);
        let js = js.clone();
        async move {
            js.send_publish(subject, msg).await?.await?;
            Ok(1)
        }
    })
    .await
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    let (_, raw_prefix) = ctx.raw_stream().await?;
    // The whole system in one process (`ymera all`): its projector applies
    // every create while they come, on the same two cores. This rate sets
    // write-to-visible's load, and its memory is the loaded figure.
    let main = ctx.main().await?;
    let sampler = RssSampler::start(main.server.pid);
    let all = creates(&main.server, &plan).await;
    let peak = sampler.finish().await;
    let (_, hwm) = main.server.memory()?;
    ctx.loaded_rss = Some(peak.max(hwm));
    all.check("ours (ymera all)")?;
    ctx.create_rate = Some(all.rate());

    // The write path alone, as the raw limit is the append alone: `ymera
    // command-api` with no projector on its stream.
    let writer = ctx.writer().await?;
    let ours = creates(writer, &plan).await;
    ours.check("ours (ymera command-api)")?;

    let raw = raw_creates(ctx.env.js.clone(), raw_prefix, &plan).await;
    raw.check("raw")?;
    let p99_ok = ours.quantile_ms(0.99) <= 3.0 * raw.quantile_ms(0.99);
    Ok(Row::ratio(
        "single create",
        TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.5,
        p99_ok,
        format!(
            "{} clients against `ymera command-api` (the write path: HTTP, token, validation, \
             decision, append, 201; no projector on its stream); raw = JetStream publish of the \
             same envelope bytes with Nats-Msg-Id and Nats-Expected-Last-Subject-Sequence 0 on a \
             fresh subject, each awaiting its ack; p99 ratio {:.1}x (target <= 3x); the whole \
             system in one process (`ymera all`, its projector applying every create on the same \
             cores): {:.0} ops/s (p50 {:.1} / p99 {:.1} ms), {:.2} of raw",
            plan.clients,
            ratio(ours.quantile_ms(0.99), raw.quantile_ms(0.99)),
            all.rate(),
            all.quantile_ms(0.5),
            all.quantile_ms(0.99),
            ratio(all.rate(), raw.rate()),
        ),
    ))
}

/// Runs this row with a 2 s measurement, for the rows that need its
/// figures (its rate, the loaded memory) when it did not run before them.
pub async fn run_briefly(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut brief = ctx.plan.clone();
    brief.measure = Duration::from_secs(2);
    let saved = std::mem::replace(&mut ctx.plan, brief);
    let r = run(ctx).await;
    ctx.plan = saved;
    r.map(|_| ())
}
