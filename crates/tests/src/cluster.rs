//! The production shape on loopback, as `scripts/cluster.sh` runs it, for a
//! test of its own: three NATS nodes (the stream R3), two copies of each
//! API role, two projectors sharing the projection's partitions, and nginx,
//! on ports, data directories and a database of the test's own. The test drives it through the script
//! itself (`up`, `restart NAME`, `down`) and its pid files, so what is
//! tested is what an operator runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use infra::EventStore;
use infra::config::NatsConfig;
use uuid::Uuid;

/// The projection's partitions the cluster's two projectors share.
pub const PARTITIONS: u32 = 4;

/// A cluster brought up by `scripts/cluster.sh up`, brought down (its
/// processes stopped, its data and database removed) on drop. When the
/// test is failing, the processes' logs are copied next to its history
/// first.
#[derive(Debug)]
pub struct Cluster {
    /// nginx: the one address clients use.
    pub url: String,
    pub admin_username: String,
    pub admin_password: String,
    /// The cluster's PostgreSQL database.
    pub database_url: String,
    dir: PathBuf,
    keep_logs_in: PathBuf,
    port_base: u16,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster.sh")
}

impl Cluster {
    /// Brings a cluster up under `work` (its logs are copied there if the
    /// test fails). A port range found taken is given up for another.
    pub fn up(work: &Path) -> Cluster {
        let id = Uuid::now_v7().simple().to_string();
        let database = format!("ymera_test_cluster_{}", &id[id.len() - 12..]);
        let mut last_error = String::new();
        for attempt in 0..5u16 {
            // Below the ephemeral range, so that no test's port 0 lands in it.
            let seed = u16::from_le_bytes([id.as_bytes()[30], id.as_bytes()[31]]);
            let port_base = 20_000 + (seed.wrapping_add(attempt * 997) % 250) * 40;
            let cluster = Cluster {
                url: format!("http://127.0.0.1:{port_base}"),
                admin_username: String::new(),
                admin_password: String::new(),
                database_url: crate::url_with_database(&crate::admin_database_url(), &database),
                dir: work.join("cluster"),
                keep_logs_in: work.to_owned(),
                port_base,
            };
            let out = cluster
                .command("up")
                .env("YMERA_CLUSTER_DB", &database)
                .env("YMERA_CLUSTER_PORT_BASE", port_base.to_string())
                .env("YMERA_DATABASE_URL", crate::admin_database_url())
                .env("YMERA_BIN", crate::process::ymera_bin())
                .env("YMERA_CLUSTER_NATS_BIN", crate::nats::binary())
                .env("YMERA_CLUSTER_PARTITIONS", PARTITIONS.to_string())
                .env("RUST_LOG", "info")
                .output()
                .expect("run scripts/cluster.sh up");
            if out.status.success() {
                return cluster.with_credentials();
            }
            last_error = String::from_utf8_lossy(&out.stderr).into_owned();
            // Drop brings down what started before the failure.
            drop(cluster);
            if !last_error.contains("is taken") {
                break;
            }
        }
        panic!("scripts/cluster.sh up failed: {last_error}");
    }

    fn with_credentials(mut self) -> Cluster {
        let env = std::fs::read_to_string(self.dir.join("env")).expect("the cluster's env file");
        for line in env.lines() {
            match line.split_once('=') {
                Some(("YMERA_URL", v)) => self.url = v.to_owned(),
                Some(("YMERA_ADMIN_USERNAME", v)) => self.admin_username = v.to_owned(),
                Some(("YMERA_ADMIN_PASSWORD", v)) => self.admin_password = v.to_owned(),
                _ => {}
            }
        }
        self
    }

    fn command(&self, what: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(script())
            .arg(what)
            .env("YMERA_CLUSTER_DIR", &self.dir);
        command
    }

    /// The NATS nodes' client URLs, comma-separated.
    pub fn nats_urls(&self) -> String {
        (1..=3)
            .map(|n| format!("nats://127.0.0.1:{}", self.port_base + 10 + n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The HTTP address of one ymera copy (say `projector-1`).
    pub fn process_url(&self, name: &str) -> String {
        let offset = match name {
            "command-api-1" => 1,
            "command-api-2" => 2,
            "query-api-1" => 3,
            "query-api-2" => 4,
            "projector-1" => 5,
            "projector-2" => 6,
            _ => panic!("no ymera copy named {name}"),
        };
        format!("http://127.0.0.1:{}", self.port_base + offset)
    }

    /// The monitoring address of NATS node `n` (1..=3).
    pub fn nats_monitor_url(&self, n: u16) -> String {
        format!("http://127.0.0.1:{}", self.port_base + 30 + n)
    }

    /// The event store, as the cluster's processes see it.
    pub async fn store(&self) -> EventStore {
        let mut cfg = NatsConfig::local(self.nats_urls(), "YMERA", "ymera");
        cfg.stream_replicas = 3;
        cfg.partitions = PARTITIONS;
        EventStore::connect(&cfg)
            .await
            .expect("the cluster's stream")
    }

    fn pid(&self, name: &str) -> String {
        let file = self.dir.join("pids").join(format!("{name}.pid"));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .to_owned()
    }

    fn signal(&self, name: &str, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid(name)])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {name}");
    }

    /// `kill -9`: the process dies at once, whatever it was doing.
    pub fn kill(&self, name: &str) {
        self.signal(name, "-KILL");
    }

    /// `SIGSTOP`: the process freezes; its connections stay open.
    pub fn pause(&self, name: &str) {
        self.signal(name, "-STOP");
    }

    /// `SIGCONT` after [`Cluster::pause`].
    pub fn resume(&self, name: &str) {
        self.signal(name, "-CONT");
    }

    /// `scripts/cluster.sh restart NAME`: (re)starts it with the same
    /// settings and waits until it is healthy. Blocking: call it from
    /// `spawn_blocking`.
    pub fn restart(&self, name: &str) {
        let out = self
            .command("restart")
            .arg(name)
            .output()
            .expect("run scripts/cluster.sh restart");
        assert!(
            out.status.success(),
            "restart {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.dir.join("logs"))
                .arg(self.keep_logs_in.join("logs"))
                .status();
        }
        let _ = self.command("down").output();
    }
}
