//! An idle `ymera` process gives back the memory it freed: the bench's
//! memory row (idle RSS < 50 MiB) as a test, on the part of the RSS that the
//! build profile does not change (the heap, not the mapped binary).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use tests::{Sandbox, eventually, process};

/// The heap an idle `ymera all` may keep: about 10 MiB in use once idle;
/// one Argon2id hash's 20 MiB kept resident (the regression this catches)
/// brings it to 30.
const IDLE_HEAP_BYTES: u64 = 20 * 1024 * 1024;

/// `RssAnon` of process `pid`, in bytes.
fn anonymous_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_process_gives_back_the_memory_of_its_password_hashes() {
    let sandbox = Sandbox::new().await;
    // Starting creates the first admin (one hash); each login is another.
    let (child, addr) = process::spawn(&sandbox, "all");
    let pid = child.id().unwrap();
    for _ in 0..3 {
        process::ready_admin_token(addr).await;
    }
    eventually(
        Duration::from_secs(10),
        "the idle heap to shrink under 20 MiB",
        || async { (anonymous_rss(pid) < IDLE_HEAP_BYTES).then_some(()) },
    )
    .await;
}
