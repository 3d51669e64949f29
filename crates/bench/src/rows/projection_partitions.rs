//! Partitioned catch-up: as many events as the catch-up row, applied to an
//! empty read model by the live projection split 4, 2 and 1 ways
//! (`YMERA_PARTITIONS`), every partition's projector running at once in
//! this process. The whole projection reads the catch-up row's stream; a
//! split one reads a stream of the same events published with the
//! partition in their subjects, as a split deployment's log is, so each
//! partition's consumer is delivered only its own events by the server.
//!
//! Raw limit: the 1-partition figure of the same run, so the ratio says
//! what splitting costs or gains on this machine. Every partition applies
//! and commits its own share of the events: on two cores shared with
//! PostgreSQL and NATS more partitions cannot be faster; on more cores (and
//! PostgreSQL on machines of its own) the apply work, which dominates,
//! divides.

use std::time::{Duration, Instant};

use anyhow::Context;
use infra::EventStore;
use infra::config::NatsConfig;
use infra::projection::{self, Partition};
use sqlx::PgPool;

use super::Ctx;
use super::projection_catch_up::empty_read_model;
use super::publish::publish_pipelined;
use crate::report::{Figure, Row};

pub const TARGET: &str = "4 partitions >= 0.5 of 1 (2 cores)";

/// The splits measured, the whole projection last: it leaves the read
/// model the live projection of the stream, which the rebuild row starts
/// from.
const SPLITS: [u32; 3] = [4, 2, 1];

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let target = ctx.plan.catchup_events;
    let mut figures = Vec::new();
    for count in SPLITS {
        let store = split_log(ctx, count, target).await?;
        let r = ctx.replay_filled(target).await?;
        let store = store.unwrap_or_else(|| r.store.clone());
        empty_read_model(&r.pool).await?;
        projection::ensure_layout(&r.pool, count).await?;
        let started = Instant::now();
        let applied = project_split(&store, &r.pool, count, target).await?;
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
         by every partition's projector at once, each delivered its own events only: 1 partition {:.0} events/s, 2 partitions {:.0} \
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

/// A stream of `events` events split `count` ways, filled (`None` for the
/// whole projection, which reads the replay sandbox's stream).
async fn split_log(ctx: &mut Ctx, count: u32, events: u64) -> anyhow::Result<Option<EventStore>> {
    if count == 1 {
        return Ok(None);
    }
    let (stream, prefix) = ctx.env.stream_names(&format!("_P{count}"));
    let mut cfg = NatsConfig::local(&ctx.env.nats_url, &stream, &prefix);
    cfg.partitions = count;
    let store = EventStore::connect(&cfg).await?;
    publish_pipelined(&ctx.env.js, &prefix, count, 0, events, 2_000, true)
        .await
        .context("filling the split stream")?;
    Ok(Some(store))
}

/// Runs every partition of the projection split `count` ways at once, on
/// `store`'s log of `end` events, until each has every event behind its
/// watermark; returns the events applied.
async fn project_split(
    store: &EventStore,
    pool: &PgPool,
    count: u32,
    end: u64,
) -> anyhow::Result<u64> {
    let head = (count > 1).then(|| projector::LogHead::spawn(store.clone()));
    let partitions = Partition::all(count).map(|partition| {
        let mut projector = projector::Projector::new(
            store.clone(),
            pool.clone(),
            projector::Settings::live(partition),
        );
        if let Some(head) = &head {
            projector = projector.sharing_head(head.clone());
        }
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
