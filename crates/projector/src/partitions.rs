//! Sharing a partitioned projection among projector processes.
//!
//! Each process joins as a member ([`Membership`]) and, every
//! [`REBALANCE`], works out its share from the members alive now: with `m`
//! members, the one of rank `r` (in the order they joined) takes the
//! partitions `p` with `p % m == r`. So a newcomer takes partitions from
//! the others and never reorders their shares (with one partition, the
//! longest-standing member owns it and the others stand by). It runs a
//! projector for every partition: one whose partition is its share takes
//! the partition's lease (as soon as a former owner gives it up) and
//! applies its events; one whose partition is not stands by with a
//! session ready, and one whose partition stops being its share gives the
//! lease up for the new owner. A process that joins, leaves or dies changes the members, so everyone's
//! share, within a [`REBALANCE`] of PostgreSQL noticing (at once for a
//! process that exits or is killed: its sessions close with it).
//!
//! The shares are a plan, not a guarantee: what keeps one owner per
//! partition is the partition's lease and its fenced checkpoint, so members
//! that briefly disagree on the plan (one has not re-read the members yet)
//! only make a projector wait for a lease a little longer.

use std::time::Duration;

use infra::EventStore;
use infra::projection::{self, Ownership, Partition};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lease::Membership;
use crate::{LogHead, Projector, Settings};

/// How often a member re-reads who the members are.
const REBALANCE: Duration = Duration::from_millis(250);

/// How long to wait before laying the partitions out again after a
/// failure (a database outage, or an uneven change of the partition count
/// that an operator must resolve).
const LAYOUT_RETRY: Duration = Duration::from_secs(5);

/// Shows every partition of `store`'s log as stood by, in `/health` and
/// the metrics, until this process owns it; returns how many there are.
/// [`run`] does it too, but as a task of its own it may start after the
/// process already answers: call this first, so that no look at the
/// process finds it neither owning nor standing by.
pub fn stand_by(store: &EventStore, ownership: &Ownership) -> u32 {
    let count = store.partitions().clamp(1, projection::MAX_PARTITIONS);
    for partition in Partition::all(count) {
        ownership.set(partition, false);
    }
    count
}

/// Runs this process's share of the live projection, split the way the
/// store's log is ([`EventStore::partitions`]), until `shutdown`, sharing
/// it with every other process that runs this on the same log.
/// `ownership` tells `/health` and the metrics which partitions this
/// process owns.
pub async fn run(
    store: EventStore,
    pool: PgPool,
    ownership: Ownership,
    shutdown: CancellationToken,
) {
    let count = stand_by(&store, &ownership);
    loop {
        match projection::ensure_layout(&pool, count).await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(error = %e, "laying the projection's partitions out failed; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(LAYOUT_RETRY) => {}
        }
    }
    let share = Share {
        store,
        pool,
        count,
        ownership,
    };
    loop {
        let Some(member) = Membership::join(&share.pool, &shutdown).await else {
            return;
        };
        share.serve(&member, &shutdown).await;
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!("lost this projector's membership; joining again");
    }
}

/// What every partition's projector is made from.
struct Share {
    store: EventStore,
    pool: PgPool,
    count: u32,
    ownership: Ownership,
}

impl Share {
    /// Runs a projector for every partition, each told whether the
    /// partition is this member's share now (those that are not stand by
    /// with a session ready), following the members until `shutdown` or
    /// the membership is lost; stops them all (and so gives their leases
    /// up) before returning.
    async fn serve(&self, member: &Membership, shutdown: &CancellationToken) {
        let stop = shutdown.child_token();
        let mut shares = Vec::new();
        let mut tasks = Vec::new();
        // One end of the log for every partition of the process: each
        // reports the events it is delivered to the others.
        let head = (self.count > 1).then(|| LogHead::spawn(self.store.clone()));
        for partition in Partition::all(self.count) {
            let (share, mine) = watch::channel(false);
            let mut projector = Projector::new(
                self.store.clone(),
                self.pool.clone(),
                Settings::live(partition),
            );
            if let Some(head) = &head {
                projector = projector.sharing_head(head.clone());
            }
            tasks.push(tokio::spawn(projector.run(
                self.ownership.clone(),
                mine,
                stop.clone(),
            )));
            shares.push((partition, share));
        }
        let mut tick = tokio::time::interval(REBALANCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = member.lost() => break,
                _ = tick.tick() => {}
            }
            let (rank, members) = match member.rank(&self.pool).await {
                Ok(Some(place)) => place,
                // Our own lock is gone: the membership's keepalive says so
                // within a moment.
                Ok(None) => continue,
                Err(e) => {
                    // Keep the shares as they are: the leases still hold.
                    tracing::warn!(error = %e, "reading the projectors' members failed");
                    continue;
                }
            };
            for (partition, share) in &shares {
                let mine = partition.index % members == rank;
                let changed = share.send_if_modified(|m| std::mem::replace(m, mine) != mine);
                if changed {
                    tracing::info!(partition = %partition.name(), mine, rank, members, "the partition's owner changes");
                }
            }
        }
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
    }
}
