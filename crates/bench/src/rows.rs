//! Each row of the table: ours and its raw limit, measured back to back at
//! the same concurrency and payload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use std::future::IntoFuture;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use infra::EventStore;
use infra::config::NatsConfig;
use reqwest::StatusCode;
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::data;
use crate::load::{Run, closed_loop};
use crate::report::{Figure, Row};
use crate::sandbox::{Env, RssSampler, Server, run_with_deadline, ymera_env};

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub warmup: Duration,
    pub measure: Duration,
    /// Concurrent clients of the single-create and read rows.
    pub clients: usize,
    /// Concurrent bulk requests (and pipelined batches in the raw limit).
    pub bulk_clients: usize,
    pub catchup_events: u64,
    pub rebuild_events: u64,
    /// Agents seeded into the read model for search and export.
    pub seed_agents: u64,
    pub visible_secs: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                warmup: Duration::from_millis(300),
                measure: Duration::from_secs(2),
                clients: 32,
                bulk_clients: 2,
                catchup_events: 20_000,
                rebuild_events: 20_000,
                seed_agents: 20_000,
                visible_secs: Duration::from_secs(2),
            }
        } else {
            Plan {
                quick,
                warmup: Duration::from_secs(2),
                measure: Duration::from_secs(10),
                clients: 32,
                bulk_clients: 2,
                catchup_events: 200_000,
                rebuild_events: 1_000_000,
                seed_agents: 1_000_000,
                visible_secs: Duration::from_secs(15),
            }
        }
    }
}

/// The system under test: `ymera all` on a database and stream of its own.
#[derive(Debug)]
pub struct Main {
    pub server: Server,
    pub stream: String,
    /// A pool on the same database, for the raw limits of the read rows.
    pub pool: PgPool,
    /// Agents seeded directly into the read model so far.
    pub seeded: u64,
}

/// The projector's sandbox: a stream filled with events and a database of
/// its own, for catch-up and rebuild.
#[derive(Debug)]
pub struct Replay {
    pub stream: String,
    pub prefix: String,
    pub db_url: String,
    pub pool: PgPool,
    pub store: EventStore,
    /// Events published so far (sequences 1..=published).
    pub published: u64,
}

impl Replay {
    /// Runs the live projection of the sandbox (the projector's own step
    /// function, from its checkpoint) until it has applied every event
    /// published; returns its checkpoint.
    async fn project_to_end(&self) -> anyhow::Result<u64> {
        let mut projector = projector::Projector::new(
            self.store.clone(),
            self.pool.clone(),
            projector::Settings::default(),
        );
        let started = Instant::now();
        let deadline = Duration::from_secs(600);
        while projector.checkpoint() < self.published {
            anyhow::ensure!(
                started.elapsed() < deadline,
                "the projector applied {} of {} events in {deadline:?}",
                projector.checkpoint(),
                self.published
            );
            projector
                .process_next_batch(Duration::from_secs(5))
                .await
                .context("projector step")?;
        }
        Ok(projector.checkpoint())
    }
}

/// What the rows share within one run.
#[derive(Debug)]
pub struct Ctx {
    pub plan: Plan,
    pub env: Env,
    pub ymera: std::path::PathBuf,
    pub main: Option<Main>,
    /// `ymera command-api` alone, on a database and stream of its own: the
    /// write path without a projector sharing the machine.
    pub writer: Option<Server>,
    pub raw: Option<(String, String)>,
    pub replay: Option<Replay>,
    /// ours ops/s of single create, for write-to-visible's load.
    pub create_rate: Option<f64>,
    pub idle_rss: Option<u64>,
    pub loaded_rss: Option<u64>,
}

impl Ctx {
    pub async fn main(&mut self) -> anyhow::Result<&mut Main> {
        if self.main.is_none() {
            let db_url = self.env.database("").await?;
            let (stream, prefix) = self.env.stream_names("");
            let vars = ymera_env(&self.env, &stream, &prefix, &db_url);
            let server = Server::start(&self.ymera, "all", &vars).await?;
            let pool = self.env.pool(&db_url, 16)?;
            // Idle: started, logged in, nothing else, after a breath.
            tokio::time::sleep(if self.plan.quick {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3)
            })
            .await;
            self.idle_rss = Some(server.memory()?.0);
            self.main = Some(Main {
                server,
                stream,
                pool,
                seeded: 0,
            });
        }
        self.main.as_mut().context("main sandbox")
    }

    /// Waits until the projector has applied everything in the main
    /// stream, so a row does not pay for the backlog of the one before.
    pub async fn settle(&mut self) -> anyhow::Result<()> {
        let js = self.env.js.clone();
        let main = self.main().await?;
        let started = Instant::now();
        loop {
            let last = js
                .get_stream(&main.stream)
                .await?
                .info()
                .await?
                .state
                .last_sequence;
            let applied = infra::projection::checkpoint(&main.pool).await?;
            if applied >= last {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the projector is at {applied} of {last} after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if started.elapsed() > Duration::from_millis(500) {
            eprintln!(
                "bench:   waited {:.1} s for the projector to catch up",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Starts the write-only server (first use), for the write rows.
    async fn writer(&mut self) -> anyhow::Result<&Server> {
        if self.writer.is_none() {
            let db_url = self.env.database("_w").await?;
            let (stream, prefix) = self.env.stream_names("_W");
            let vars = ymera_env(&self.env, &stream, &prefix, &db_url);
            self.writer = Some(Server::start(&self.ymera, "command-api", &vars).await?);
        }
        self.writer.as_ref().context("writer")
    }

    async fn raw_stream(&mut self) -> anyhow::Result<(String, String)> {
        if self.raw.is_none() {
            self.raw = Some(self.env.raw_stream("_RAW").await?);
        }
        self.raw.clone().context("raw stream")
    }

    /// The projector's sandbox with at least `events` events in its stream.
    async fn replay_filled(&mut self, events: u64) -> anyhow::Result<&mut Replay> {
        let js = self.env.js.clone();
        let r = self.replay().await?;
        if r.published < events {
            publish_pipelined(
                &js,
                &r.prefix,
                r.published,
                events - r.published,
                2_000,
                true,
            )
            .await
            .context("filling the stream")?;
            r.published = events;
        }
        Ok(r)
    }

    async fn replay(&mut self) -> anyhow::Result<&mut Replay> {
        if self.replay.is_none() {
            let db_url = self.env.database("_p").await?;
            let (stream, prefix) = self.env.stream_names("_P");
            let cfg = NatsConfig::local(&self.env.nats_url, &stream, &prefix);
            let store = EventStore::connect(&cfg).await?;
            let pool = self.env.pool(&db_url, 16)?;
            ymera::migrate(&pool).await?;
            self.replay = Some(Replay {
                stream,
                prefix,
                db_url,
                pool,
                store,
                published: 0,
            });
        }
        self.replay.as_mut().context("replay sandbox")
    }
}

fn expect(status: StatusCode, want: StatusCode, what: &str) -> anyhow::Result<()> {
    if status != want {
        bail!("{what} answered {status}");
    }
    Ok(())
}

fn create_headers(msg_id: Uuid) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id.to_string().as_str());
    h.insert("Nats-Expected-Last-Subject-Sequence", "0");
    h
}

/// Publishes `count` generated `agent.created` events to `prefix`,
/// `window` acks in flight, guarded like a create (fresh subject each,
/// expected subject sequence 0).
async fn publish_pipelined(
    js: &jetstream::Context,
    prefix: &str,
    from: u64,
    count: u64,
    window: usize,
    msg_id: bool,
) -> anyhow::Result<()> {
    let mut inflight = FuturesUnordered::new();
    for i in from..from + count {
        let e = data::event(&data::agent(i));
        let mut headers = HeaderMap::new();
        if msg_id {
            headers.insert("Nats-Msg-Id", e.envelope.event_id.to_string().as_str());
        }
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let msg = jetstream::message::PublishMessage::build()
            .payload(e.bytes())
            .headers(headers);
        inflight.push(js.send_publish(e.subject(prefix), msg).await?.into_future());
        while inflight.len() >= window {
            if let Some(ack) = inflight.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = inflight.next().await {
        ack?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// single create
// ---------------------------------------------------------------------------

pub const SINGLE_TARGET: &str = ">= 0.5 ops/s, p99 <= 3x raw";

/// `clients` clients in a closed loop, each operation the request
/// `request(client, n)` builds, which must answer `want`; each counts
/// `units` (events in a bulk request, else 1).
async fn http_loop<F>(
    server: &Server,
    plan: &Plan,
    clients: usize,
    want: StatusCode,
    units: u64,
    what: &'static str,
    request: F,
) -> Run
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let client = server.client.clone();
    closed_loop(clients, plan.warmup, plan.measure, move |_, n| {
        let req = request(&client, n);
        async move {
            let r = req.send().await?;
            expect(r.status(), want, what)?;
            r.bytes().await?;
            Ok(units)
        }
    })
    .await
}

/// `POST /agents` from `plan.clients` clients in a closed loop.
async fn creates(server: &Server, plan: &Plan) -> Run {
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

pub async fn single_create(ctx: &mut Ctx) -> anyhow::Result<Row> {
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

    let js = ctx.env.js.clone();
    let raw = closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let e = data::event(&data::agent(n));
        let msg = jetstream::message::PublishMessage::build()
            .payload(e.bytes())
            .headers(create_headers(e.envelope.event_id));
        let subject = e.subject(&raw_prefix);
        let js = js.clone();
        async move {
            js.send_publish(subject, msg).await?.await?;
            Ok(1)
        }
    })
    .await;
    raw.check("raw")?;
    let p99_ok = ours.quantile_ms(0.99) <= 3.0 * raw.quantile_ms(0.99);
    Ok(Row::ratio(
        "single create",
        SINGLE_TARGET,
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

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

// ---------------------------------------------------------------------------
// bulk ingest
// ---------------------------------------------------------------------------

pub const BULK_TARGET: &str = ">= 0.7 events/s";
const BULK_SIZE: u64 = 1_000;

pub async fn bulk_ingest(ctx: &mut Ctx) -> anyhow::Result<Row> {
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
                let mut h = HeaderMap::new();
                h.insert("Nats-Expected-Last-Subject-Sequence", "0");
                let msg = jetstream::message::PublishMessage::build()
                    .payload(e.bytes())
                    .headers(h);
                acks.push(js.send_publish(e.subject(&prefix), msg).await?);
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
        BULK_TARGET,
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

// ---------------------------------------------------------------------------
// projection catch-up
// ---------------------------------------------------------------------------

pub const CATCHUP_TARGET: &str = ">= 0.5 events/s";

pub async fn projection_catchup(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let target = ctx.plan.catchup_events;
    let r = ctx.replay_filled(target).await?;
    // Raw first, into the very tables the projector writes (same indexes,
    // same triggers): the same rows of agents and events, 1,000 per
    // transaction with a checkpoint update, as COPY.
    empty_read_model(&r.pool).await?;
    let started = Instant::now();
    let mut conn = r.pool.acquire().await?;
    let mut seq = 0;
    while seq < target {
        let n = (target - seq).min(1_000);
        let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
        copy_rows(&mut tx, "", seq, n).await?;
        sqlx::query(
            "INSERT INTO projector_checkpoint (name, last_seq) VALUES ('main', $1) \
             ON CONFLICT (name) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()",
        )
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
    let ours_secs = started.elapsed().as_secs_f64();
    Ok(Row::ratio(
        "projection catch-up",
        CATCHUP_TARGET,
        Figure::rate_only(applied, ours_secs, "events/s"),
        Figure::rate_only(applied, raw_secs, "events/s"),
        0.5,
        true,
        format!(
            "{applied} agent.created events already in the stream, applied by \
             projector::Projector::process_next_batch (batches of 1,000) into an empty read \
             model; raw = COPY of the same agents and events rows into the same tables, 1,000 \
             per transaction with a checkpoint update"
        ),
    ))
}

/// COPYs the `agents` and `events` rows of agents `from..from + n` into
/// `{schema}agents` and `{schema}events`.
async fn copy_rows(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    from: u64,
    n: u64,
) -> anyhow::Result<()> {
    let (agents, events) = data::csv_rows(from, n);
    for (table, columns, csv) in [
        ("agents", data::AGENT_COLUMNS, &agents),
        ("events", data::EVENT_COLUMNS, &events),
    ] {
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY {schema}{table} ({columns}) FROM STDIN (FORMAT csv)"
            ))
            .await?;
        copy.send(csv.as_bytes()).await?;
        copy.finish().await?;
    }
    Ok(())
}

/// Empties the replay sandbox's read model and sets its checkpoint back to
/// the start of the stream.
async fn empty_read_model(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE agents, events, search_words, parked_events")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM projector_checkpoint")
        .execute(pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// write-to-visible
// ---------------------------------------------------------------------------

pub const VISIBLE_TARGET: &str = "p99 < 50 ms";

/// Writes at `rate` per second for `secs`, open loop, and measures each
/// write's time from its 201 to the projector's commit of it.
async fn visible_at(main: &Main, rate: f64, secs: Duration) -> anyhow::Result<Run> {
    // The projector commits each batch with `NOTIFY ymera_projection,
    // '<checkpoint>'`: the moment a row becomes readable.
    let mut listener = sqlx::postgres::PgListener::connect_with(&main.pool).await?;
    listener.listen(infra::projection::CHANNEL).await?;
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let seen_w = seen.clone();
    let listen_task = tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            if let Ok(seq) = n.payload().parse::<u64>() {
                seen_w.lock().await.push((seq, Instant::now()));
            }
        }
    });

    let writes: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut tasks = vec![];
    let mut n = 10_000_000u64;
    while started.elapsed() < secs {
        ticker.tick().await;
        n += 1;
        let body = serde_json::to_vec(&data::body(&data::agent(n)))?;
        let req = main
            .server
            .post("/api/v1/agents")
            .header("content-type", "application/json")
            .body(body);
        let writes = writes.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = async {
                let r = req.send().await?;
                let at = Instant::now();
                expect(r.status(), StatusCode::CREATED, "POST /agents")?;
                let seq: u64 = r
                    .headers()
                    .get("x-event-seq")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .context("no X-Event-Seq")?;
                writes.lock().await.push((seq, at));
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
    // Let the projection catch up with the last write.
    let last = writes.lock().await.iter().map(|w| w.0).max().unwrap_or(0);
    let wait = Instant::now();
    while seen.lock().await.last().is_none_or(|s| s.0 < last)
        && wait.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listen_task.abort();

    let seen = seen.lock().await.clone();
    let writes = writes.lock().await.clone();
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
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    let run = Run {
        ops: lat.len() as u64,
        units: lat.len() as u64,
        errors: errors + invisible,
        first_error: first_error.lock().await.clone().or_else(|| {
            (invisible > 0).then(|| format!("{invisible} writes never became visible within 10 s"))
        }),
        secs: secs.as_secs_f64(),
        latencies_us: lat,
    };
    Ok(run)
}

pub async fn write_to_visible(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    if ctx.create_rate.is_none() {
        // The load is half the single-create rate: measure that first.
        let mut quick = plan.clone();
        quick.measure = Duration::from_secs(2);
        let saved = std::mem::replace(&mut ctx.plan, quick);
        let r = single_create(ctx).await;
        ctx.plan = saved;
        r?;
    }
    let rate = (ctx.create_rate.unwrap_or(100.0) / 2.0).max(1.0);
    ctx.settle().await?;
    let main = ctx.main().await?;
    let run = visible_at(main, rate, plan.visible_secs).await?;
    run.check("write-to-visible")?;
    // The same at a quarter of the rate: where the curve bends, for the
    // note (the target is judged at half).
    ctx.settle().await?;
    let main = ctx.main().await?;
    let quarter = visible_at(main, rate / 2.0, plan.visible_secs / 2).await?;
    quarter.check("write-to-visible at a quarter")?;

    let p99 = run.quantile_ms(0.99);
    let mut row = Row::ratio(
        "write-to-visible",
        VISIBLE_TARGET,
        Figure {
            value: p99,
            unit: "ms p99",
            p50_ms: Some(run.quantile_ms(0.5)),
            p99_ms: Some(p99),
            count: run.ops,
            secs: run.secs,
        },
        Figure::plain(50.0, "ms"),
        0.0,
        p99 < 50.0,
        format!(
            "{} writes at {rate:.0}/s (half the single-create rate), open loop; visible = the \
             projector's NOTIFY of a checkpoint >= the write's X-Event-Seq (same transaction as \
             the row), measured from the 201; at a quarter of the single-create rate ({:.0}/s, \
             {} writes): p50 {:.1} / p99 {:.1} ms",
            run.ops,
            rate / 2.0,
            quarter.ops,
            quarter.quantile_ms(0.5),
            quarter.quantile_ms(0.99),
        ),
    );
    row.raw = None;
    row.ratio = None;
    Ok(row)
}

// ---------------------------------------------------------------------------
// get by id
// ---------------------------------------------------------------------------

pub const GET_TARGET: &str = ">= 0.5 ops/s";

/// The statement `GET /agents/{id}` runs (crates/query-api/src/agents.rs).
const GET_SQL: &str = "SELECT c.seq AS projection_seq, a.id, a.name, a.type, a.description, \
     a.status, a.capabilities, a.config, a.tags, a.project_id, a.version, a.created_at, \
     a.updated_at, a.created_by FROM (SELECT COALESCE((SELECT last_seq FROM projector_checkpoint \
     WHERE name = 'main'), 0) AS seq) c LEFT JOIN agents a ON a.id = $1";

pub async fn get_by_id(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let mut ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents LIMIT 10000")
        .fetch_all(&main.pool)
        .await?;
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
        while ids_len(&main.pool).await < 200 && wait.elapsed().as_secs() < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids = sqlx::query_scalar("SELECT id FROM agents LIMIT 10000")
            .fetch_all(&main.pool)
            .await?;
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
    let pool = main.pool.clone();
    let raw = closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let id = ids[(n as usize * 7919) % ids.len()];
        let pool = pool.clone();
        async move {
            let row = sqlx::query(GET_SQL).bind(id).fetch_one(&pool).await?;
            anyhow::ensure!(!sqlx::Row::is_empty(&row), "empty row");
            Ok(1)
        }
    })
    .await;
    raw.check("raw")?;
    let floor = http_floor(&main.server, &plan).await?;
    Ok(Row::ratio(
        "get by id",
        GET_TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.5,
        true,
        format!(
            "{} clients over {} agents; raw = the endpoint's SELECT through sqlx, {} concurrent \
             on a pool of 16 connections (the server's default); HTTP floor: GET /livez (no \
             token, no database) from the same client answers {:.0} ops/s, a ceiling for any \
             endpoint on this machine ({:.2} of raw)",
            plan.clients,
            ids_len(&main.pool).await,
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

async fn ids_len(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// search and export: seeded read model
// ---------------------------------------------------------------------------

/// Whether a route exists: a 404 or 405, or a 400 from the `{id}` route
/// swallowing the path while the spec does not list it, means not yet.
async fn route_built(server: &Server, path: &str, query: &str) -> anyhow::Result<Option<String>> {
    let r = server.get(&format!("{path}?{query}")).send().await?;
    let status = r.status();
    if status.is_success() {
        return Ok(None);
    }
    let body = r.text().await.unwrap_or_default();
    let spec: serde_json::Value = server
        .client
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default();
    let listed = spec["paths"].get(path).is_some();
    match status.as_u16() {
        404 | 405 => Ok(Some(format!("{path} answered {status}"))),
        400 if !listed => Ok(Some(format!(
            "{path} is not in the OpenAPI spec (answered {status})"
        ))),
        _ => bail!("{path}?{query} answered {status}: {body}"),
    }
}

/// Fills the read model with `count` agents straight in SQL (not through
/// the API): search and export read them; the log does not have them.
async fn seed(main: &mut Main, count: u64) -> anyhow::Result<()> {
    if main.seeded >= count {
        return Ok(());
    }
    let chunk = 100_000;
    let mut from = main.seeded;
    while from < count {
        let to = (from + chunk).min(count);
        sqlx::query(
            "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
             project_id, version, created_at, updated_at, created_by, last_seq) \
             SELECT gen_random_uuid(), \
               (ARRAY['scout','planner','coder','reviewer','crawler','summarizer','translator','router'])[1 + i % 8] || ' agent ' || i, \
               (ARRAY['llm','tool','workflow','retriever'])[1 + i % 4], \
               'A ' || (ARRAY['scout','planner','coder','reviewer','crawler','summarizer','translator','router'])[1 + i % 8] \
                 || ' that works for team ' || (ARRAY['atlas','borealis','cygnus','draco','eridanus'])[1 + i % 5] \
                 || ' on batch ' || (i / 1000) || '; it reads, plans and reports back.', \
               (ARRAY['active','inactive','paused','error'])[1 + (i / 7) % 4], \
               ARRAY[(ARRAY['search','code','browse','plan','review','translate'])[1 + i % 6]], \
               '{\"model\": \"m-1\", \"temperature\": 0.2}'::jsonb, \
               jsonb_build_object('env', 'bench', 'team', (ARRAY['atlas','borealis','cygnus','draco','eridanus'])[1 + i % 5]), \
               NULL, 1, now() - i * interval '1 second', now() - i * interval '1 second', 'bench', 0 \
             FROM generate_series($1::bigint, $2::bigint - 1) AS i",
        )
        .bind(from as i64)
        .bind(to as i64)
        .execute(&main.pool)
        .await
        .context("seeding the read model")?;
        from = to;
    }
    sqlx::query("ANALYZE agents").execute(&main.pool).await?;
    main.seeded = count;
    Ok(())
}

pub const SEARCH_TARGET: &str = ">= 0.6 ops/s";
const SEARCH_TERMS: [&str; 6] = [
    "scout",
    "planer",
    "summar",
    "translator",
    "cygnus",
    "review",
];

pub async fn search(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let path = "/api/v1/agents/search";
    if let Some(why) = route_built(&main.server, path, "q=scout").await? {
        return Ok(Row::not_built("search", SEARCH_TARGET, why));
    }
    seed(main, plan.seed_agents).await?;
    let url = main.server.url(path);
    let token = main.server.token.clone();
    let ours = http_loop(
        &main.server,
        &plan,
        plan.clients,
        StatusCode::OK,
        1,
        "GET /agents/search",
        move |client, n| {
            let q = SEARCH_TERMS[n as usize % SEARCH_TERMS.len()];
            client.get(&url).query(&[("q", q)]).bearer_auth(&token)
        },
    )
    .await;
    ours.check("ours")?;
    let pool = main.pool.clone();
    let raw = closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let q = SEARCH_TERMS[n as usize % SEARCH_TERMS.len()];
        let pool = pool.clone();
        async move {
            // The endpoint's own statements: the dictionary lookup, then
            // the search itself.
            let pairs = infra::http::QueryPairs(vec![("q".to_owned(), q.to_owned())]);
            let mut search =
                query_api::search::Search::parse(&pairs).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            search.expand(&pool).await?;
            search.build("").build().fetch_all(&pool).await?;
            Ok(1)
        }
    })
    .await;
    raw.check("raw")?;
    Ok(Row::ratio(
        "search",
        SEARCH_TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.6,
        true,
        format!(
            "{} agents seeded straight into the read model with INSERT … SELECT generate_series \
             (not through the API); {} clients cycling q over {SEARCH_TERMS:?}; raw = the \
             endpoint's own two statements (query_api::search: the dictionary lookup for typos, \
             then the ranked full-text query) through sqlx, same concurrency, 50 per page",
            plan.seed_agents, plan.clients,
        ),
    ))
}

pub const EXPORT_TARGET: &str = ">= 0.5 rows/s, RSS growth < 50 MiB";

pub async fn export(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let path = "/api/v1/agents/export";
    if let Some(why) = route_built(&main.server, path, "format=csv&status=error&type=none").await? {
        return Ok(Row::not_built("export", EXPORT_TARGET, why));
    }
    seed(main, plan.seed_agents).await?;
    let total = ids_len(&main.pool).await as u64;

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
        EXPORT_TARGET,
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

// ---------------------------------------------------------------------------
// rebuild
// ---------------------------------------------------------------------------

pub const REBUILD_TARGET: &str = ">= 0.5 events/s";

pub async fn rebuild(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let help = std::process::Command::new(&ctx.ymera)
        .args(["rebuild", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !help.success() {
        return Ok(Row::not_built(
            "rebuild",
            REBUILD_TARGET,
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
    cmd.arg("rebuild").envs(vars);
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
        "`ymera rebuild` of {stored} events took {:.1} s; raw = the slower of an ordered-consumer \
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
    Ok(Row::ratio(
        "rebuild",
        REBUILD_TARGET,
        Figure::rate_only(stored, took.as_secs_f64(), "events/s"),
        raw,
        0.5,
        true,
        note,
    ))
}

// ---------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------

pub const IDLE_TARGET: &str = "< 50 MiB";
pub const LOADED_TARGET: &str = "< 250 MiB";

pub async fn memory(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.main().await?;
    if ctx.loaded_rss.is_none() {
        let mut quick = ctx.plan.clone();
        quick.measure = Duration::from_secs(2);
        let saved = std::mem::replace(&mut ctx.plan, quick);
        let r = single_create(ctx).await;
        ctx.plan = saved;
        r?;
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let idle = mib(ctx.idle_rss.unwrap_or(0));
    let loaded = mib(ctx.loaded_rss.unwrap_or(0));
    let row = |name, target, value: f64, limit: f64, note: &str| Row {
        name,
        verdict: if value < limit {
            crate::report::Verdict::Pass
        } else {
            crate::report::Verdict::Fail
        },
        ours: Some(Figure::plain(value, "MiB")),
        raw: None,
        ratio: None,
        target,
        note: note.to_owned(),
        error: None,
    };
    Ok(vec![
        row(
            "memory idle",
            IDLE_TARGET,
            idle,
            50.0,
            "VmRSS of the `ymera all` child after start and login",
        ),
        row(
            "memory loaded",
            LOADED_TARGET,
            loaded,
            250.0,
            "peak VmRSS (50 ms samples and VmHWM) of `ymera all` during single create",
        ),
    ])
}
