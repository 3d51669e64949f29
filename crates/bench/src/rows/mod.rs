//! The rows of the table, one file each: ours and its raw limit, measured
//! back to back at the same concurrency and payload. This file is their
//! registry: every row's name, label and target, and the order they run in.

mod bulk_ingest;
mod context;
mod export;
mod get_by_id;
mod http;
mod memory;
mod projection_catch_up;
mod projection_partitions;
mod publish;
mod read_model;
mod rebuild;
mod search;
mod single_create;
mod single_create_r3;
mod write_to_searchable;
mod write_to_visible;

pub use context::{Ctx, Plan};

use crate::report::Row;

/// Every row, in table order: (name on the command line, label in the
/// table, target).
pub const ROWS: [(&str, &str, &str); 12] = [
    ("single-create", "single create", single_create::TARGET),
    (
        "single-create-r3",
        "single create (R3)",
        single_create_r3::TARGET,
    ),
    ("bulk-ingest", "bulk ingest", bulk_ingest::TARGET),
    (
        "projection-catch-up",
        "projection catch-up",
        projection_catch_up::TARGET,
    ),
    (
        "partitioned-catch-up",
        "partitioned catch-up",
        projection_partitions::TARGET,
    ),
    (
        "write-to-visible",
        "write-to-visible",
        write_to_visible::TARGET,
    ),
    (
        "write-to-searchable",
        "write-to-searchable",
        write_to_searchable::TARGET,
    ),
    ("get-by-id", "get by id", get_by_id::TARGET),
    ("search", "search", search::TARGET),
    ("export", "export", export::TARGET),
    ("rebuild", "rebuild", rebuild::TARGET),
    ("memory", "memory", memory::TARGET),
];

/// The first half of the memory row: starting the server, so its idle
/// memory is read before any load.
const MEMORY_IDLE: &str = "memory-idle";

/// The order the rows run in, which lets them share work: the
/// single-create rate drives write-to-visible, its load gives the loaded
/// memory, and catch-up leaves the live projection rebuild starts from.
const RUN_ORDER: [&str; 13] = [
    MEMORY_IDLE,
    "single-create",
    "single-create-r3",
    "bulk-ingest",
    "write-to-visible",
    "write-to-searchable",
    "get-by-id",
    "search",
    "export",
    "projection-catch-up",
    "partitioned-catch-up",
    "rebuild",
    "memory",
];

/// Runs the `selected` rows (names from [`ROWS`]) in [`RUN_ORDER`], and
/// returns them in table order. A row that fails becomes an error row; a
/// server that died is restarted for the rows after it.
pub async fn run(ctx: &mut Ctx, selected: &[&str]) -> Vec<Row> {
    let mut done: Vec<(&str, Vec<Row>)> = vec![];
    for name in RUN_ORDER {
        let wanted = if name == MEMORY_IDLE {
            selected.contains(&"memory")
        } else {
            selected.contains(&name)
        };
        if !wanted {
            continue;
        }
        eprintln!("bench: {name} …");
        let row_clock = std::time::Instant::now();
        let result: anyhow::Result<Vec<Row>> = match name {
            MEMORY_IDLE => ctx.main().await.map(|_| vec![]),
            "single-create" => single_create::run(ctx).await.map(|r| vec![r]),
            "single-create-r3" => single_create_r3::run(ctx).await.map(|r| vec![r]),
            "bulk-ingest" => bulk_ingest::run(ctx).await.map(|r| vec![r]),
            "write-to-visible" => write_to_visible::run(ctx).await.map(|r| vec![r]),
            "write-to-searchable" => write_to_searchable::run(ctx).await.map(|r| vec![r]),
            "get-by-id" => get_by_id::run(ctx).await.map(|r| vec![r]),
            "search" => search::run(ctx).await.map(|r| vec![r]),
            "export" => export::run(ctx).await.map(|r| vec![r]),
            "projection-catch-up" => projection_catch_up::run(ctx).await.map(|r| vec![r]),
            "partitioned-catch-up" => projection_partitions::run(ctx).await.map(|r| vec![r]),
            "rebuild" => rebuild::run(ctx).await.map(|r| vec![r]),
            "memory" => memory::run(ctx).await,
            _ => Ok(vec![]),
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                let (label, target) = if name == MEMORY_IDLE {
                    ("memory idle", "")
                } else {
                    ROWS.iter()
                        .find(|r| r.0 == name)
                        .map_or(("server start", ""), |r| (r.1, r.2))
                };
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
        .flat_map(|(name, _, _)| {
            let mut out = vec![];
            for (n, rows) in &done {
                if n == name || (*name == "memory" && *n == MEMORY_IDLE) {
                    out.extend(rows.iter().cloned());
                }
            }
            out
        })
        .collect()
}
