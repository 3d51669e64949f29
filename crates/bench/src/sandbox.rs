//! The harness's own place on the shared servers: databases named
//! `ymera_bench_<id>*` and streams named `BENCH_<id>*`, created here and
//! dropped at the end, and the `ymera` process under test, run as a child
//! so its memory can be read from `/proc`.
//!
//! A run that dies leaves its databases and streams behind; the next run
//! sweeps them at its start. Another run may be going on at the same time
//! (two people, or two branches, measuring on one machine), so a run marks
//! itself alive with a PostgreSQL advisory lock keyed by its id, held by a
//! connection of its own for as long as it lives, and the sweep spares
//! every id whose lock is held. The server drops the lock with the
//! connection, so a run killed with `-9` is swept like any other.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, stream::StorageType};
use futures::StreamExt;
use infra::config::DbConfig;
use serde_json::json;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

pub const ADMIN_PASSWORD: &str = "bench-admin-password";
const JWT_SECRET: &str = "a-benchmark-secret-that-is-long-enough-0123456789";
const DB_PREFIX: &str = "ymera_bench_";
const STREAM_PREFIX: &str = "BENCH_";
/// The advisory lock class of the runs' liveness locks (the key is the
/// run's id); "YB" in ASCII, apart from the projector's own classes.
const ALIVE_CLASS: i32 = 0x5942;

/// Connections to the shared servers and what this run created on them.
#[derive(Debug)]
pub struct Env {
    pub id: String,
    pub nats_url: String,
    pub admin_url: String,
    pub js: jetstream::Context,
    admin: PgPool,
    /// Holds this run's liveness lock (see the module doc) until dropped.
    _alive: sqlx::PgConnection,
    databases: Mutex<Vec<String>>,
    streams: Mutex<Vec<String>>,
}

impl Env {
    pub async fn connect() -> anyhow::Result<Env> {
        let nats_url =
            std::env::var("YMERA_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let admin_url = std::env::var("YMERA_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://ymera:ymera@127.0.0.1:5432/ymera".into());
        let client = async_nats::ConnectOptions::new()
            .name("ymera-bench")
            .connection_timeout(Duration::from_secs(2))
            .connect(&nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {nats_url}"))?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(10));
        let admin = PgPool::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {admin_url}"))?;
        let id = Uuid::now_v7().simple().to_string();
        let id = id[id.len() - 8..].to_owned();
        let mut alive = sqlx::PgConnection::connect(&admin_url).await?;
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(ALIVE_CLASS)
            .bind(run_key(&id).context("a run id is hex")?)
            .execute(&mut alive)
            .await?;
        let env = Env {
            id,
            nats_url,
            admin_url,
            js,
            admin,
            _alive: alive,
            databases: Mutex::new(vec![]),
            streams: Mutex::new(vec![]),
        };
        env.sweep().await;
        Ok(env)
    }

    /// Drops what earlier runs that are no longer alive left behind.
    async fn sweep(&self) {
        let alive: Vec<i64> = sqlx::query_scalar(
            "SELECT objid::int8 FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::int8 = $1",
        )
        .bind(i64::from(ALIVE_CLASS))
        .fetch_all(&self.admin)
        .await
        .unwrap_or_default();
        // A name whose run cannot be told (not one of ours) is left alone.
        let dead = |name: &str, prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|rest| rest.get(..8))
                .and_then(run_key)
                .is_some_and(|key| !alive.contains(&(i64::from(key) & 0xffff_ffff)))
        };
        let databases: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ymera\\_bench\\_%'",
        )
        .fetch_all(&self.admin)
        .await
        .unwrap_or_default();
        for db in databases.iter().filter(|db| dead(db, DB_PREFIX)) {
            self.drop_database(db).await;
        }
        let mut names = self.js.stream_names();
        let mut streams = vec![];
        while let Some(Ok(name)) = names.next().await {
            if dead(&name, STREAM_PREFIX) {
                streams.push(name);
            }
        }
        for s in streams {
            let _ = self.js.delete_stream(&s).await;
        }
    }

    async fn drop_database(&self, db: &str) {
        infra::db::assert_identifier(db);
        let sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.admin)
            .await
        {
            eprintln!("bench: could not drop database {db}: {e}");
        }
    }

    /// A fresh database `ymera_bench_<id><suffix>` and its URL.
    pub async fn database(&self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{DB_PREFIX}{}{suffix}", self.id);
        infra::db::assert_identifier(&name);
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&self.admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        self.databases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        Ok(url_with_database(&self.admin_url, &name))
    }

    /// Stream and subject prefix names of this run, `<suffix>` apart.
    pub fn stream_names(&self, suffix: &str) -> (String, String) {
        let stream = format!("{STREAM_PREFIX}{}{}", self.id, suffix.to_uppercase());
        let prefix = format!("bench_{}{}", self.id, suffix.to_lowercase());
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stream.clone());
        (stream, prefix)
    }

    /// A stream provisioned as `ymera` provisions its own (file storage,
    /// 120 s duplicate window, direct get, atomic batches), for the raw
    /// limits.
    pub async fn raw_stream(&self, suffix: &str) -> anyhow::Result<(String, String)> {
        let (stream, prefix) = self.stream_names(suffix);
        self.js
            .create_stream(jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![events::all_subjects(&prefix)],
                storage: StorageType::File,
                num_replicas: 1,
                duplicate_window: Duration::from_secs(120),
                allow_direct: true,
                allow_atomic_publish: true,
                ..Default::default()
            })
            .await
            .context("creating the raw stream")?;
        Ok((stream, prefix))
    }

    /// A pool on `url` configured as `ymera`'s (search path on the read
    /// models), with `max` connections.
    pub fn pool(&self, url: &str, max: u32) -> anyhow::Result<PgPool> {
        let mut cfg = DbConfig::local(url);
        cfg.db_max_connections = max;
        cfg.db_acquire_timeout_ms = 30_000;
        Ok(infra::db::pool(&cfg)?)
    }

    /// Drops every database, stream and search index this run made.
    pub async fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(search_root());
        let dbs = std::mem::take(&mut *self.databases.lock().unwrap_or_else(|p| p.into_inner()));
        for db in dbs {
            self.drop_database(&db).await;
        }
        let streams = std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner()));
        for s in streams {
            let _ = self.js.delete_stream(&s).await;
        }
    }
}

/// The liveness lock key of the run with id `id` (8 hex digits).
fn run_key(id: &str) -> Option<i32> {
    u32::from_str_radix(id, 16).ok().map(|k| k as i32)
}

/// `postgres://u:p@h:port/db?x` with the database replaced.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (head, query) = url
        .split_once('?')
        .map_or((url, None), |(h, q)| (h, Some(q)));
    let authority_start = head.find("//").map_or(0, |i| i + 2);
    let mut out = match head.rfind('/') {
        Some(i) if i >= authority_start => format!("{}/{db}", &head[..i]),
        _ => format!("{head}/{db}"),
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The `ymera` binary next to this one, built first when cargo is at hand
/// (`cargo build -p bench -p ymera`: the same feature set as this binary,
/// so it only links).
pub fn ymera_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let dir = exe.parent().context("bench binary has no folder")?;
    let bin = dir.join("ymera");
    if std::env::var_os("BENCH_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "bench",
            "-p",
            "ymera",
            "--manifest-path",
        ])
        .arg(&manifest);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => bail!("building the ymera binary failed ({s})"),
            Err(e) => eprintln!("bench: cargo not found ({e}); using {}", bin.display()),
        }
    }
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p bench -p ymera`",
        bin.display()
    );
    Ok(bin)
}

/// Where this run's children keep their search indexes; removed by
/// [`Env::cleanup`].
pub fn search_root() -> PathBuf {
    std::env::temp_dir().join(format!("ymera-bench-search-{}", std::process::id()))
}

/// Environment for a `ymera` child working on `stream`/`prefix` and the
/// database at `db_url`.
pub fn ymera_env(env: &Env, stream: &str, prefix: &str, db_url: &str) -> Vec<(String, String)> {
    // Each child serving reads keeps a search index of its own; a fresh
    // process builds it from the log.
    let search_dir = search_root()
        .join(format!("{stream}-{}", uuid::Uuid::now_v7().simple()))
        .display()
        .to_string();
    [
        ("YMERA_SEARCH_DIR", search_dir.as_str()),
        ("YMERA_NATS_URL", env.nats_url.as_str()),
        ("YMERA_STREAM", stream),
        ("YMERA_SUBJECT_PREFIX", prefix),
        ("YMERA_DATABASE_URL", db_url),
        ("YMERA_JWT_SECRET", JWT_SECRET),
        ("YMERA_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("YMERA_BIND", "127.0.0.1:0"),
        ("YMERA_LOG_FORMAT", "text"),
        ("RUST_LOG", "warn"),
        // The harness is one client hammering the API: limits off.
        ("YMERA_RATE_LIMIT_PER_USER", "0"),
        ("YMERA_RATE_LIMIT_PER_IP", "0"),
        ("YMERA_LOGIN_ATTEMPTS_PER_MINUTE", "1000000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `ymera <role>` running as a child process, and an HTTP client for it.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub pid: u32,
    pub base: String,
    pub client: reqwest::Client,
    pub token: String,
}

impl Server {
    pub async fn start(
        bin: &Path,
        role: &str,
        vars: &[(String, String)],
    ) -> anyhow::Result<Server> {
        Server::start_as(bin, role, vars, None).await
    }

    /// [`Server::start`] with a `token` from another server on the same
    /// database (a `query-api` serves no login), or logged in when `None`.
    pub async fn start_as(
        bin: &Path,
        role: &str,
        vars: &[(String, String)],
        token: Option<String>,
    ) -> anyhow::Result<Server> {
        let mut child = Command::new(bin)
            .arg(role)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("child stdout")?;
        // `ymera` prints "ymera <role> listening on http://<addr>" once it
        // serves; the rest of its output is drained and dropped.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Some(addr) = line.trim().split("listening on ").nth(1) {
                    let _ = tx.send(addr.to_owned());
                    break;
                }
                line.clear();
            }
            let mut sink = [0u8; 4096];
            while lines.read(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let base = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await?
            .context("ymera did not start listening within 60 s")?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut server = Server {
            child,
            pid,
            base,
            client,
            token: String::new(),
        };
        server.token = match token {
            Some(token) => token,
            None => server.login().await?,
        };
        Ok(server)
    }

    async fn login(&self) -> anyhow::Result<String> {
        let r = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "login answered {}", r.status());
        let body: serde_json::Value = r.json().await?;
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .context("login gave no access_token")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(&self.token)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.token)
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        memory_of(self.pid)
    }

    /// Resets the peak (VmHWM) to the current RSS, so a later VmHWM is the
    /// peak of what happened in between.
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (VmRSS, VmHWM) of a process, in bytes.
pub fn memory_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in /proc/{pid}/status"),
    }
}

/// Samples a process's RSS until stopped; the highest sample.
#[derive(Debug)]
pub struct RssSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                if let Ok((rss, _)) = memory_of(pid) {
                    peak = peak.max(rss);
                }
                tokio::select! {
                    _ = rx.changed() => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        RssSampler { stop, task }
    }

    pub async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(0)
    }
}

/// Runs a command to completion with a deadline; returns its exit status
/// and the tail of its combined output.
pub async fn run_with_deadline(
    mut cmd: Command,
    deadline: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String, Duration)> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let tail = std::sync::Arc::new(Mutex::new(String::new()));
    let mut readers = vec![];
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tail = tail.clone();
        readers.push(std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.push_str(&String::from_utf8_lossy(&buf[..n]));
                if t.len() > 4096 {
                    let cut = t.len() - 2048;
                    let cut = (cut..t.len()).find(|i| t.is_char_boundary(*i)).unwrap_or(0);
                    t.drain(..cut);
                }
            }
        }));
    }
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    for r in readers {
        let _ = r.join();
    }
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((status, tail, took))
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn database_is_swapped_in_urls() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5432/ymera", "b1"),
            "postgres://u:p@h:5432/b1"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h/ymera?sslmode=disable", "b1"),
            "postgres://u:p@h/b1?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h", "b1"),
            "postgres://u:p@h/b1"
        );
    }
}
