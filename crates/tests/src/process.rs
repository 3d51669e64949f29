//! `ymera` as a real child process of a test, for what only a separate
//! process shows: a SIGKILL at any instant, two processes competing for one
//! projection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::process::{Child, Command};

use crate::Sandbox;

/// The `ymera` binary: `YMERA_BIN`, or the debug build in the target dir.
pub fn ymera_bin() -> PathBuf {
    if let Ok(p) = std::env::var("YMERA_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let bin = target.join("debug/ymera");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p ymera` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Starts `ymera <command>` (say `projector`) in `sandbox`, serving HTTP on
/// a free port, which is returned with the child. Killed on drop.
pub fn spawn(sandbox: &Sandbox, command: &str) -> (Child, SocketAddr) {
    spawn_with(sandbox, command, &[])
}

/// [`spawn`] with extra environment variables (settings such as
/// `YMERA_TRUST_FORWARDED_FOR`, or `YMERA_SEARCH_DIR` to name the search
/// index's directory rather than take a fresh one).
pub fn spawn_with(sandbox: &Sandbox, command: &str, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let s = &sandbox.settings;
    let secret = s.auth.jwt_secret.as_ref().expect("sandboxes have a secret");
    let child = Command::new(ymera_bin())
        .arg(command)
        .env("YMERA_NATS_URL", &s.nats.nats_url)
        .env("YMERA_STREAM", &s.nats.stream)
        .env("YMERA_SUBJECT_PREFIX", &s.nats.subject_prefix)
        .env("YMERA_DATABASE_URL", &s.db.database_url)
        .env("YMERA_BIND", addr.to_string())
        .env("YMERA_JWT_SECRET", secret.expose_secret())
        .env("YMERA_ADMIN_PASSWORD", crate::ADMIN_PASSWORD)
        .env("RUST_LOG", "warn")
        .env("YMERA_SEARCH_DIR", sandbox.fresh_search_dir())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ymera");
    (child, addr)
}

/// `/health` of the process serving on `addr`, whatever its status;
/// `None` when it does not answer.
pub async fn health(client: &reqwest::Client, addr: SocketAddr) -> Option<serde_json::Value> {
    let r = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Waits until the child serving on `addr` is ready, then logs in as the
/// sandbox's admin: the token.
pub async fn ready_admin_token(addr: SocketAddr) -> String {
    let client = reqwest::Client::new();
    crate::eventually(Duration::from_secs(60), "ymera to be ready", || async {
        let r = client
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let r = client
        .post(format!("http://{addr}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": crate::ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login request");
    assert_eq!(r.status(), 200, "admin login");
    let body: serde_json::Value = r.json().await.expect("login body");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}
