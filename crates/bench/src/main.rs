//! `bench`: YMERA's benchmark harness.
//!
//! Absolute times on a shared machine are noise, so every row measures ours
//! and the raw limit of the dependency underneath (NATS JetStream or
//! PostgreSQL) back to back, at the same concurrency and payload, and
//! reports the ratio. The harness makes its own databases and streams on the
//! servers `scripts/setup.sh` starts, runs the release `ymera` binary as a
//! child (so its memory can be read), and drops everything at the end.
//!
//! `bench [--quick] [all | ROW...]`; the table goes to stdout and a JSON copy
//! to `bench-results/<timestamp>.json`.

mod data;
mod load;
mod report;
mod rows;
mod sandbox;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use report::{Row, Verdict};
use rows::{Ctx, ROWS};

/// YMERA's benchmark harness: each figure as a ratio to the raw limit.
#[derive(Debug, Parser)]
#[command(name = "bench", about)]
struct Cli {
    /// A reduced run (small counts, about two seconds a row) for a quick
    /// check; it fails only on rows that error, never on a ratio.
    #[arg(long)]
    quick: bool,
    /// Exit non-zero when a row misses its target too (not only on errors).
    #[arg(long)]
    strict: bool,
    /// Rows to run: `all` (default) or names among single-create,
    /// single-create-r3, bulk-ingest, write-to-visible, write-to-searchable,
    /// get-by-id, search, export, projection-catch-up, partitioned-catch-up,
    /// rebuild, memory.
    rows: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut selected: Vec<&str> = vec![];
    for name in &cli.rows {
        if name == "all" {
            selected.extend(ROWS.iter().map(|r| r.0));
        } else if let Some((n, _, _)) = ROWS.iter().find(|r| r.0 == name) {
            selected.push(n);
        } else {
            let names: Vec<&str> = ROWS.iter().map(|r| r.0).collect();
            eprintln!(
                "bench: unknown row {name:?}; rows: all, {}",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    if selected.is_empty() {
        selected.extend(ROWS.iter().map(|r| r.0));
    }
    match run(&cli, &selected).await {
        Ok(rows) => {
            let errored = rows.iter().any(|r| r.verdict == Verdict::Error);
            let failed = rows.iter().any(|r| r.verdict == Verdict::Fail);
            if errored || (cli.strict && failed) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli, selected: &[&str]) -> anyhow::Result<Vec<Row>> {
    let started = chrono::Utc::now();
    let clock = std::time::Instant::now();
    let ymera = sandbox::ymera_binary()?;
    let env = sandbox::Env::connect().await?;
    let mut ctx = Ctx::new(rows::Plan::new(cli.quick), env, ymera);
    let outcome = tokio::select! {
        rows = rows::run(&mut ctx, selected) => Ok(rows),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    ctx.cleanup().await;
    let rows = outcome?;

    report::print_table(&rows);
    let secs = clock.elapsed().as_secs_f64();
    println!("{} rows in {secs:.0} s", rows.len());
    let json = serde_json::json!({
        "started_at": started,
        "seconds": secs,
        "quick": cli.quick,
        "git_sha": ymera::GIT_SHA,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-results");
    std::fs::create_dir_all(&dir).context("creating bench-results")?;
    let file = dir.join(format!("{}.json", started.format("%Y%m%dT%H%M%SZ")));
    std::fs::write(&file, serde_json::to_vec_pretty(&json)?)?;
    println!(
        "written to bench-results/{}",
        file.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    );
    Ok(rows)
}
