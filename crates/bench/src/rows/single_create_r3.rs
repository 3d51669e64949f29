//! Single create on a replicated log: `POST /agents` against `ymera
//! command-api` whose stream is R3 on a three-node JetStream cluster of the
//! row's own (loopback, started and removed by the row).
//!
//! Raw limit: the same guarded publish as the single-create row
//! (`Nats-Msg-Id`, expected subject sequence 0), each awaiting its ack, to
//! an R3 stream on the same cluster at the same concurrency. Each ack waits
//! for a quorum (the leader and one follower), so both sides pay the
//! replication; the ratio is what YMERA adds on top of it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, stream::StorageType};

use super::Ctx;
use super::single_create::{creates, raw_creates};
use crate::report::{Figure, Row, ratio};
use crate::sandbox::{Server, ymera_env};

pub const TARGET: &str = ">= 0.5 of raw R3 publish";

/// Three `nats-server` processes as one JetStream cluster, killed and their
/// storage removed on drop.
struct NatsCluster {
    children: Vec<Child>,
    dir: PathBuf,
    urls: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `nats-server`: `YMERA_TEST_NATS_BIN`, else the one `scripts/setup.sh`
/// installs.
fn nats_bin() -> PathBuf {
    std::env::var_os("YMERA_TEST_NATS_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.data/venv/bin/nats-server"),
        PathBuf::from,
    )
}

impl NatsCluster {
    fn start(id: &str) -> anyhow::Result<NatsCluster> {
        let dir = std::env::temp_dir().join(format!("ymera-bench-r3-{id}"));
        std::fs::create_dir_all(&dir)?;
        let clients = [free_port()?, free_port()?, free_port()?];
        let routes = [free_port()?, free_port()?, free_port()?];
        let route_urls = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            children: vec![],
            urls: clients
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            dir,
        };
        for n in 0..3 {
            let store = cluster.dir.join(format!("n{n}"));
            let child = Command::new(nats_bin())
                .args(["-js", "-a", "127.0.0.1", "-p", &clients[n].to_string()])
                .args(["-n", &format!("bench-{id}-{n}"), "--cluster_name", "bench"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[n])])
                .args(["--routes", &route_urls, "-sd"])
                .arg(&store)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", nats_bin().display()))?;
            cluster.children.push(child);
        }
        Ok(cluster)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates the raw R3 stream, provisioned as `ymera` provisions its own,
/// once the cluster has formed (a JetStream meta leader elected).
async fn raw_stream(js: &jetstream::Context, name: &str, prefix: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let created = js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![events::all_subjects(prefix)],
                storage: StorageType::File,
                num_replicas: 3,
                duplicate_window: Duration::from_secs(120),
                allow_direct: true,
                allow_atomic_publish: true,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                bail!("the R3 stream could not be created in 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let plan = ctx.plan.clone();
    let id = ctx.env.id.clone();
    let cluster = NatsCluster::start(&id)?;
    let client = async_nats::ConnectOptions::new()
        .name("ymera-bench-r3")
        .retry_on_initial_connect()
        .connect(cluster.urls.split(',').collect::<Vec<_>>())
        .await
        .context("connecting to the R3 cluster")?;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(10));
    let raw_prefix = format!("bench_{id}_r3raw");
    raw_stream(&js, &format!("BENCH_{id}_R3RAW"), &raw_prefix).await?;

    let db_url = ctx.env.database("_r3").await?;
    let mut vars = ymera_env(
        &ctx.env,
        &format!("BENCH_{id}_R3"),
        &format!("bench_{id}_r3"),
        &db_url,
    );
    vars.retain(|(k, _)| k != "YMERA_NATS_URL");
    vars.push(("YMERA_NATS_URL".into(), cluster.urls.clone()));
    vars.push(("YMERA_STREAM_REPLICAS".into(), "3".into()));
    let writer = Server::start(&ctx.ymera, "command-api", &vars).await?;
    let ours = creates(&writer, &plan).await;
    drop(writer);
    ours.check("ours (ymera command-api, R3)")?;

    let raw = raw_creates(js, raw_prefix, &plan).await;
    raw.check("raw R3 publish")?;
    drop(cluster);
    Ok(Row::ratio(
        "single create (R3)",
        TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.5,
        true,
        format!(
            "{} clients against `ymera command-api` on an R3 stream of a three-node JetStream \
             cluster on loopback (the reads that decide a write go to the stream leader); raw = \
             the guarded publish of the single-create row to an R3 stream of the same cluster, \
             each awaiting its quorum ack; p50 {:.1} / p99 {:.1} ms ours, p50 {:.1} / p99 {:.1} \
             ms raw (p99 ratio {:.1}x)",
            plan.clients,
            ours.quantile_ms(0.5),
            ours.quantile_ms(0.99),
            raw.quantile_ms(0.5),
            raw.quantile_ms(0.99),
            ratio(ours.quantile_ms(0.99), raw.quantile_ms(0.99)),
        ),
    ))
}
