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
use rows::Ctx;

/// Every row, in table order: (name on the command line, target).
const ROWS: [(&str, &str); 9] = [
    ("single-create", rows::SINGLE_TARGET),
    ("bulk-ingest", rows::BULK_TARGET),
    ("projection-catch-up", rows::CATCHUP_TARGET),
    ("write-to-visible", rows::VISIBLE_TARGET),
    ("get-by-id", rows::GET_TARGET),
    ("search", rows::SEARCH_TARGET),
    ("export", rows::EXPORT_TARGET),
    ("rebuild", rows::REBUILD_TARGET),
    ("memory", "idle < 50 MiB, loaded < 250 MiB"),
];

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
    /// bulk-ingest, projection-catch-up, write-to-visible, get-by-id, search,
    /// export, rebuild, memory.
    rows: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut selected: Vec<&str> = vec![];
    for name in &cli.rows {
        if name == "all" {
            selected.extend(ROWS.iter().map(|r| r.0));
        } else if let Some((n, _)) = ROWS.iter().find(|r| r.0 == name) {
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
    let mut ctx = Ctx {
        plan: rows::Plan::new(cli.quick),
        env,
        ymera,
        main: None,
        writer: None,
        raw: None,
        replay: None,
        create_rate: None,
        idle_rss: None,
        loaded_rss: None,
    };
    let outcome = tokio::select! {
        rows = run_rows(&mut ctx, selected) => Ok(rows),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Stop the server before dropping its database.
    ctx.main = None;
    ctx.writer = None;
    ctx.replay = None;
    ctx.env.cleanup().await;
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

/// Runs the selected rows in an order that lets them share work (the
/// single-create rate drives write-to-visible; its load gives the loaded
/// memory), and returns them in table order.
async fn run_rows(ctx: &mut Ctx, selected: &[&str]) -> Vec<Row> {
    let order = [
        "memory-idle",
        "single-create",
        "bulk-ingest",
        "write-to-visible",
        "get-by-id",
        "search",
        "export",
        "projection-catch-up",
        "rebuild",
        "memory",
    ];
    let mut done: Vec<(&str, Vec<Row>)> = vec![];
    for name in order {
        let wanted = if name == "memory-idle" {
            selected.contains(&"memory")
        } else {
            selected.contains(&name)
        };
        if !wanted {
            continue;
        }
        eprintln!("bench: {name} …");
        let row_clock = std::time::Instant::now();
        let target = ROWS.iter().find(|r| r.0 == name).map_or("", |r| r.1);
        let result: anyhow::Result<Vec<Row>> = match name {
            // Start the server first, so its idle memory is read before
            // any load.
            "memory-idle" => ctx.main().await.map(|_| vec![]),
            "single-create" => rows::single_create(ctx).await.map(|r| vec![r]),
            "bulk-ingest" => rows::bulk_ingest(ctx).await.map(|r| vec![r]),
            "write-to-visible" => rows::write_to_visible(ctx).await.map(|r| vec![r]),
            "get-by-id" => rows::get_by_id(ctx).await.map(|r| vec![r]),
            "search" => rows::search(ctx).await.map(|r| vec![r]),
            "export" => rows::export(ctx).await.map(|r| vec![r]),
            "projection-catch-up" => rows::projection_catchup(ctx).await.map(|r| vec![r]),
            "rebuild" => rows::rebuild(ctx).await.map(|r| vec![r]),
            "memory" => rows::memory(ctx).await,
            _ => Ok(vec![]),
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                let label = ROW_LABELS
                    .iter()
                    .find(|l| l.0 == name)
                    .map_or("server start", |l| l.1);
                vec![Row::error(label, target, &e)]
            }
        };
        for r in &rows {
            eprintln!(
                "bench: {} → {:?} ({:.1} s)",
                r.name,
                r.verdict,
                row_clock.elapsed().as_secs_f64()
            );
        }
        done.push((name, rows));
        if let Some(main) = ctx.main.as_mut()
            && !main.server.alive()
        {
            eprintln!("bench: the ymera process died; restarting it for the next rows");
            ctx.main = None;
        }
    }
    ROWS.iter()
        .flat_map(|(name, _)| {
            let mut out = vec![];
            for (n, rows) in &done {
                if n == name || (*name == "memory" && *n == "memory-idle") {
                    out.extend(rows.iter().cloned());
                }
            }
            out
        })
        .collect()
}

/// The table's label of each row.
const ROW_LABELS: [(&str, &str); 10] = [
    ("memory-idle", "memory idle"),
    ("single-create", "single create"),
    ("bulk-ingest", "bulk ingest"),
    ("projection-catch-up", "projection catch-up"),
    ("write-to-visible", "write-to-visible"),
    ("get-by-id", "get by id"),
    ("search", "search"),
    ("export", "export"),
    ("rebuild", "rebuild"),
    ("memory", "memory"),
];
