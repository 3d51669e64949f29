//! Partitioned catch-up: the same stream as the catch-up row, applied to an
//! empty read model by the live projection split 4, 2 and 1 ways
//! (`YMERA_PARTITIONS`), every partition's projector running at once in
//! this process, each reading the whole log and applying its own
//! aggregates' events.
//!
//! Raw limit: the 1-partition figure of the same run, so the ratio says
//! what splitting costs or gains on this machine. Every partition
//! applies a share of the rows but decodes its way through the whole log,
//! and each commits its own batches: on two cores shared with PostgreSQL
//! more partitions cannot be faster; on more cores (and PostgreSQL on
//! machines of its own) the apply work, which dominates, divides.

use std::time::{Duration, Instant};

use anyhow::Context;
use infra::projection::{self, Partition};

use super::Ctx;
use super::context::Replay;
use super::projection_catch_up::empty_read_model;
use crate::report::{Figure, Row};

pub const TARGET: &str = "4 partitions >= 0.5 of 1 (2 cores)";

/// The splits measured, the whole projection last: it leaves the read
/// model the live projection of the stream, which the rebuild row starts
/// from.
const SPLITS: [u32; 3] = [4, 2, 1];

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let target = ctx.plan.catchup_events;
    let r = ctx.replay_filled(target).await?;
    let mut figures = Vec::new();
    for count in SPLITS {
        empty_read_model(&r.pool).await?;
        projection::ensure_layout(&r.pool, count).await?;
        let started = Instant::now();
        let applied = project_split(r, count).await?;
        figures.push((
            count,
            Figure::rate_only(applied, started.elapsed().as_secs_f64(), "events/s"),
        ));
    }
    let rate = |n: u32| {
        figures
            .iter()
            .find(|(c, _)| *c == n)
            .map(|(_, f)| f.clone())
    };
    let (Some(four), Some(two), Some(one)) = (rate(4), rate(2), rate(1)) else {
        anyhow::bail!("a split was not measured");
    };
    let note = format!(
        "{target} agent.created events already in the stream, applied into an empty read model \
         by every partition's projector at once: 1 partition {:.0} events/s, 2 partitions {:.0} \
         ({:.2}x), 4 partitions {:.0} ({:.2}x); raw = the 1-partition figure",
        one.value,
        two.value,
        crate::report::ratio(two.value, one.value),
        four.value,
        crate::report::ratio(four.value, one.value),
    );
    Ok(Row::ratio(
        "partitioned catch-up",
        TARGET,
        four,
        one,
        0.5,
        true,
        note,
    ))
}

/// Runs every partition of the projection split `count` ways at once until
/// each has seen every event published; returns the events applied.
async fn project_split(r: &Replay, count: u32) -> anyhow::Result<u64> {
    let end = r.published;
    let partitions = Partition::all(count).map(|partition| {
        let mut projector = projector::Projector::new(
            r.store.clone(),
            r.pool.clone(),
            projector::Settings::live(partition),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            while projector.checkpoint() < end {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "partition {} saw {} of {end} events in ten minutes",
                    partition.name(),
                    projector.checkpoint()
                );
                projector
                    .process_next_batch(Duration::from_secs(5))
                    .await
                    .context("projector step")?;
            }
            Ok(())
        })
    });
    for done in futures::future::join_all(partitions).await {
        done??;
    }
    Ok(end)
}
