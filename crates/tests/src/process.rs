//! `ymera` as a real child process of a test, for what an in-process app
//! cannot show: a process killed with SIGKILL takes nothing with it but what
//! it had not made durable.

use std::path::PathBuf;
use std::process::Stdio;

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

/// Starts `ymera <role>` in `sandbox`, serving on `bind`, quiet, and killed
/// when dropped.
pub fn spawn(sandbox: &Sandbox, role: &str, bind: &str) -> Child {
    let s = &sandbox.settings;
    let mut command = Command::new(ymera_bin());
    command
        .arg(role)
        .env("YMERA_NATS_URL", &s.nats.nats_url)
        .env("YMERA_STREAM", &s.nats.stream)
        .env("YMERA_SUBJECT_PREFIX", &s.nats.subject_prefix)
        .env("YMERA_DATABASE_URL", &s.db.database_url)
        .env("YMERA_BIND", bind)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(secret) = &s.auth.jwt_secret {
        command.env("YMERA_JWT_SECRET", secret.expose_secret());
    }
    if let Some(password) = &s.auth.admin_password {
        command.env("YMERA_ADMIN_PASSWORD", password.expose_secret());
    }
    command.spawn().expect("start ymera")
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
