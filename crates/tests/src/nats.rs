//! A NATS server of one test's own, which the test can pause (`SIGSTOP`)
//! and resume (`SIGCONT`): a server that stops answering while every
//! connection to it stays open, so what was sent before the pause is stored
//! when it resumes, after the writer gave up waiting for the ack. The shared
//! server cannot be paused without stalling every other test.
//!
//! The binary is `YMERA_TEST_NATS_BIN` (set by `scripts/test.sh`), else the
//! one `scripts/setup.sh` installs in `<workspace>/.data/venv/bin`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::eventually;

/// A running `nats-server -js`, killed (and its storage removed) on drop.
#[derive(Debug)]
pub struct PrivateNats {
    pub url: String,
    /// The server's name (`-n`), unique to it.
    name: String,
    child: Child,
    dir: PathBuf,
}

/// The `nats-server` binary tests run.
pub fn binary() -> PathBuf {
    match std::env::var_os("YMERA_TEST_NATS_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.data/venv/bin/nats-server"),
    }
}

impl PrivateNats {
    /// Starts a server with JetStream on a free port and waits until it
    /// accepts connections.
    ///
    /// A port found free can be taken by another test's server before ours
    /// binds it (ours then exits, and a client would reach theirs), so each
    /// server gets a unique name, and it is ready only once a client reaches
    /// a server of that name; else it is started again on another port.
    pub async fn start() -> PrivateNats {
        for _ in 0..5 {
            let server = PrivateNats::spawn();
            let name = server.name.clone();
            let url = server.url.clone();
            let reached = eventually(Duration::from_secs(10), "the private NATS server", || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(url).await.ok()?;
                    Some(client.server_info().server_name)
                }
            })
            .await;
            if reached == name {
                return server;
            }
        }
        panic!("no free port for a private NATS server after 5 tries");
    }

    fn spawn() -> PrivateNats {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("port").port()
        };
        let id = Uuid::now_v7().simple().to_string();
        let name = format!("ymera-test-{id}");
        let dir = std::env::temp_dir().join(format!("ymera-nats-{id}"));
        std::fs::create_dir_all(&dir).expect("NATS storage dir");
        let bin = binary();
        let child = Command::new(&bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-n",
                &name,
                "-sd",
            ])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        PrivateNats {
            url: format!("nats://127.0.0.1:{port}"),
            name,
            child,
            dir,
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} the private NATS server");
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets it run again: it serves what was sent while it was paused.
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        // A paused server must run again to die of SIGKILL promptly on
        // every platform; CONT first costs nothing.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
