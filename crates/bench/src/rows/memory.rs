//! Memory: the RSS of the `ymera all` child, idle (after start and login)
//! and loaded (its peak during single create).
//!
//! Raw limit: none; each figure is judged against a fixed ceiling, 50 MiB
//! idle and 250 MiB loaded.

use super::{Ctx, single_create};
use crate::report::{Figure, Row, Verdict};

/// Both figures' targets, for the error line when the row fails.
pub const TARGET: &str = "idle < 50 MiB, loaded < 250 MiB";
const IDLE_TARGET: &str = "< 50 MiB";
const LOADED_TARGET: &str = "< 250 MiB";

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.main().await?;
    if ctx.loaded_rss.is_none() {
        single_create::run_briefly(ctx).await?;
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let idle = mib(ctx.idle_rss.unwrap_or(0));
    let loaded = mib(ctx.loaded_rss.unwrap_or(0));
    let row = |name, target, value: f64, limit: f64, note: &str| Row {
        name,
        verdict: if value < limit {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        ours: Some(Figure::plain(value, "MiB")),
        raw: None,
        ratio: None,
        target,
        note: note.to_owned(),
        error: None,
    };
    Ok(vec![
        row(
            "memory idle",
            IDLE_TARGET,
            idle,
            50.0,
            "VmRSS of the `ymera all` child after start and login",
        ),
        row(
            "memory loaded",
            LOADED_TARGET,
            loaded,
            250.0,
            "peak VmRSS (50 ms samples and VmHWM) of `ymera all` during single create",
        ),
    ])
}
