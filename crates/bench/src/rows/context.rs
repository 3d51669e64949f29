//! What the rows share within one run: the plan (sizes and durations) and
//! the sandboxes, each started on first use and kept for the rows after it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use infra::EventStore;
use infra::config::NatsConfig;
use sqlx::PgPool;

use super::publish::publish_pipelined;
use crate::sandbox::{Env, Server, ymera_env};

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
    /// Agents seeded for search (as events its index reads) and export
    /// (straight into the read model).
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
    pub db_url: String,
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
    pub async fn project_to_end(&self) -> anyhow::Result<u64> {
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
    pub ymera: PathBuf,
    pub main: Option<Main>,
    /// `ymera command-api` alone, on a database and stream of its own: the
    /// write path without a projector sharing the machine.
    writer: Option<Server>,
    raw: Option<(String, String)>,
    replay: Option<Replay>,
    /// ours ops/s of single create, for write-to-visible's load.
    pub create_rate: Option<f64>,
    /// ours ops/s of get by id, the reference of search.
    pub get_by_id_rate: Option<f64>,
    pub idle_rss: Option<u64>,
    pub loaded_rss: Option<u64>,
}

impl Ctx {
    /// A run with no sandbox started yet.
    pub fn new(plan: Plan, env: Env, ymera: PathBuf) -> Ctx {
        Ctx {
            plan,
            env,
            ymera,
            main: None,
            writer: None,
            raw: None,
            replay: None,
            create_rate: None,
            get_by_id_rate: None,
            idle_rss: None,
            loaded_rss: None,
        }
    }

    /// Stops the servers, then drops every database and stream of the run
    /// (a server must be gone before its database is dropped).
    pub async fn cleanup(&mut self) {
        self.main = None;
        self.writer = None;
        self.replay = None;
        self.env.cleanup().await;
    }

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
                db_url: db_url.clone(),
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
            let last = last_seq(&js, &main.stream).await?;
            let applied = infra::projection::checkpoint(&main.pool).await?;
            if applied >= last {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the projector is at {applied} of {last} after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report_wait("the projector", started);
        Ok(())
    }

    /// Waits until the main server's search index has applied everything
    /// in the main stream (its own reader of the log, apart from the
    /// projector [`Ctx::settle`] waits for), so write-to-searchable does
    /// not pay for the index's backlog of the rows before it.
    pub async fn settle_search(&mut self) -> anyhow::Result<()> {
        let js = self.env.js.clone();
        let main = self.main().await?;
        let last = last_seq(&js, &main.stream).await?;
        let started = Instant::now();
        // A search with `X-Min-Event-Seq` answers once the index has the
        // event, or 503 when the server's wait for it runs out: ask again.
        loop {
            let r = main
                .server
                .get("/api/v1/agents/search")
                .query(&[("q", "settle")])
                .header("x-min-event-seq", last.to_string())
                .send()
                .await?;
            if r.status().is_success() {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the search index has not reached event {last} after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report_wait("the search index", started);
        Ok(())
    }

    /// Starts the write-only server (first use), for the write rows.
    pub async fn writer(&mut self) -> anyhow::Result<&Server> {
        if self.writer.is_none() {
            let db_url = self.env.database("_w").await?;
            let (stream, prefix) = self.env.stream_names("_W");
            let vars = ymera_env(&self.env, &stream, &prefix, &db_url);
            self.writer = Some(Server::start(&self.ymera, "command-api", &vars).await?);
        }
        self.writer.as_ref().context("writer")
    }

    /// The stream the raw limits of the write rows publish to: (name,
    /// subject prefix).
    pub async fn raw_stream(&mut self) -> anyhow::Result<(String, String)> {
        if self.raw.is_none() {
            self.raw = Some(self.env.raw_stream("_RAW").await?);
        }
        self.raw.clone().context("raw stream")
    }

    /// The projector's sandbox with at least `events` events in its stream.
    pub async fn replay_filled(&mut self, events: u64) -> anyhow::Result<&mut Replay> {
        let js = self.env.js.clone();
        let r = self.replay().await?;
        if r.published < events {
            publish_pipelined(
                &js,
                &r.prefix,
                1,
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

    pub async fn replay(&mut self) -> anyhow::Result<&mut Replay> {
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

/// The last sequence of `stream`.
async fn last_seq(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .last_sequence)
}

/// Says how long a settle waited for `what`, when it was noticeable.
fn report_wait(what: &str, started: Instant) {
    if started.elapsed() > Duration::from_millis(500) {
        eprintln!(
            "bench:   waited {:.1} s for {what} to catch up",
            started.elapsed().as_secs_f64()
        );
    }
}
