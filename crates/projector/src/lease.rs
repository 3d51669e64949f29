//! One owner per projection: a lease that a live projector holds while it
//! consumes, so that two processes never project the same projection at
//! once (each start would take the durable consumer from the other, and
//! both would apply the same events).
//!
//! The lease is a session-level PostgreSQL advisory lock keyed by the
//! projection's name (a partition, named on its own, gets a lease of its
//! own), held on a connection of the owner's own, outside the pool. It
//! lasts as long as that session: a process killed in any way closes its
//! socket, PostgreSQL ends the session and frees the lock, and a standby
//! polling for it takes over within [`POLL`]. The owner checks its
//! connection every [`KEEPALIVE`] and stops consuming as soon as it fails,
//! since the lock may already be someone else's. The lock alone cannot stop
//! an owner that has not noticed yet from committing one last batch: the
//! checkpoint's epoch does (`infra::projection::advance`).
//!
//! Projectors that share a partitioned projection also hold a *membership*
//! lock each, the same way ([`Membership`]): the locks held are the live
//! projectors, which is how each one works out its share of the partitions.
//! Every lease's session names its process (`application_name`), so an
//! operator can see who owns what (`infra::projection::partitions`).

use std::time::Duration;

use infra::projection::LEASE_CLASS;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFuture};

/// How often a standby asks for the lease.
const POLL: Duration = Duration::from_millis(500);
/// How often the owner checks that its session (and so its lock) is alive.
const KEEPALIVE: Duration = Duration::from_millis(500);
/// How long that check may take before the lease counts as lost.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The first half of a membership lock's key; the second is the member's
/// slot.
const MEMBER_CLASS: i32 = 0x796d_6d62; // "ymmb"

/// The most projectors that can share a projection at once; more wait for
/// one to leave.
const MAX_MEMBERS: i32 = 256;
/// How soon a projector that could not join tries again: at once after a
/// lost race for a slot would do, but a full house or an outage waits.
const JOIN_RETRY: Duration = Duration::from_millis(100);

/// Which advisory lock a session asks for.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    /// The lease of the projection (or partition) of that name: the lock
    /// ([`LEASE_CLASS`], `hashtext(name)`). Two names that collided would
    /// share one lease, so one of them would wait for the other to be given
    /// up, never run twice.
    Projection(&'a str),
    /// A projector's membership, in that slot.
    Member(i32),
}

/// Held while this process owns a projection; dropping it gives the lease
/// up (its connection is closed, which frees the lock).
#[derive(Debug)]
pub struct Lease {
    lost: CancellationToken,
    _release: DropGuard,
}

impl Lease {
    /// Waits until this process owns projection `name`, asking every
    /// [`POLL`] (and at once when `mine` turns true) while `mine` says the
    /// projection is this process's to own and another process holds it;
    /// `None` once `shutdown` fires. While `mine` is false it only keeps a
    /// session ready, so that it asks without delay when its turn comes.
    pub async fn acquire(
        pool: &PgPool,
        name: &str,
        mine: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
    ) -> Option<Lease> {
        let mut session: Option<PgConnection> = None;
        let mut told = false;
        loop {
            let wanted = *mine.borrow_and_update();
            let asked = if wanted {
                try_lock(pool, &mut session, Key::Projection(name))
                    .await
                    .map(Some)
            } else if session.is_none() {
                connect(pool).await.map(|conn| {
                    session = Some(conn);
                    None
                })
            } else {
                Ok(None)
            };
            match asked {
                Ok(Some(true)) => {
                    if let Some(conn) = session.take() {
                        return Some(Lease::keep(conn, name.to_owned()));
                    }
                }
                Ok(Some(false)) if !told => {
                    tracing::info!(
                        projection = name,
                        "another process owns the projection; standing by"
                    );
                    told = true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(projection = name, error = %e, "asking for the projection's lease failed; retrying");
                    session = None;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
                changed = mine.changed() => if changed.is_err() {
                    return None;
                },
            }
        }
    }

    /// Resolves when the lease is lost: the owner must stop at once.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    /// Keeps `conn`'s session, and with it the lock, alive in the
    /// background until the lease is dropped or the session fails.
    fn keep(mut conn: PgConnection, name: String) -> Lease {
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        let (on_loss, released) = (lost.clone(), release.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = released.cancelled() => {
                        let _ = conn.close().await;
                        return;
                    }
                    _ = tick.tick() => {}
                }
                let alive = tokio::time::timeout(KEEPALIVE_TIMEOUT, conn.ping()).await;
                if !matches!(alive, Ok(Ok(()))) {
                    tracing::error!(projection = %name, "lost the connection holding the projection's lease; stopping");
                    on_loss.cancel();
                    return;
                }
            }
        });
        Lease {
            lost,
            _release: release.drop_guard(),
        }
    }
}

/// A projector's place among those sharing a partitioned projection: held
/// for as long as the process runs (and its session lives), like a lease.
#[derive(Debug)]
pub struct Membership {
    slot: i32,
    lease: Lease,
}

impl Membership {
    /// Joins as the newest member: takes the slot one above every slot
    /// held now, waiting while [`MAX_MEMBERS`] are; `None` once `shutdown`
    /// fires.
    ///
    /// Slots so taken rise in the order their locks were granted (a slot
    /// read from a view another member has since overtaken is already held,
    /// so the lock is refused and the next look goes higher), which is the
    /// order [`Membership::rank`] sorts by. A session's start time would not
    /// do: two processes starting together can connect in one order and
    /// lock in the other, and the one that locked first would then hand its
    /// partitions over moments after taking them.
    pub async fn join(pool: &PgPool, shutdown: &CancellationToken) -> Option<Membership> {
        let mut session: Option<PgConnection> = None;
        loop {
            match Self::try_join(pool, &mut session).await {
                Ok(Some(membership)) => return Some(membership),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "joining the projectors failed; retrying");
                    session = None;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(JOIN_RETRY) => {}
            }
        }
    }

    /// One attempt at [`Membership::join`]: `None` when the slot it chose
    /// was taken meanwhile, or every slot is.
    async fn try_join(
        pool: &PgPool,
        session: &mut Option<PgConnection>,
    ) -> Result<Option<Membership>, sqlx::Error> {
        let conn = match session {
            Some(conn) => conn,
            None => session.insert(connect(pool).await?),
        };
        let (next, members): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(max(l.objid::int8) + 1, 0), count(*) FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.classid::int8 = $1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(MEMBER_CLASS))
        .fetch_one(&mut *conn)
        .await?;
        let Ok(slot) = i32::try_from(next) else {
            return Ok(None);
        };
        if members >= i64::from(MAX_MEMBERS) {
            return Ok(None);
        }
        if !try_lock(pool, session, Key::Member(slot)).await? {
            return Ok(None);
        }
        Ok(session.take().map(|conn| Membership {
            slot,
            lease: Lease::keep(conn, format!("member {slot}")),
        }))
    }

    /// This member's place among the live members, in the order they
    /// joined (0 for the longest-standing: a newcomer takes its share from
    /// the others without reshuffling theirs), and how many there are now;
    /// `None` if its own lock is not among them (its session is gone).
    pub async fn rank(&self, pool: &PgPool) -> Result<Option<(u32, u32)>, sqlx::Error> {
        let slots: Vec<i64> = sqlx::query_scalar(
            "SELECT l.objid::int8 FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.classid::int8 = $1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY l.objid::int8",
        )
        .bind(i64::from(MEMBER_CLASS))
        .fetch_all(pool)
        .await?;
        let me = i64::from(self.slot);
        Ok(slots
            .iter()
            .position(|s| *s == me)
            .map(|rank| (rank as u32, slots.len() as u32)))
    }

    /// Resolves when the membership is lost (its session failed): the
    /// member must give up every partition at once, and join again.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.lease.lost()
    }
}

/// Asks once for the advisory lock `key` on `session`, connecting it first
/// if needed.
async fn try_lock(
    pool: &PgPool,
    session: &mut Option<PgConnection>,
    key: Key<'_>,
) -> Result<bool, sqlx::Error> {
    let conn = match session {
        Some(conn) => conn,
        None => session.insert(connect(pool).await?),
    };
    let query = match key {
        Key::Projection(name) => {
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LEASE_CLASS)
                .bind(name)
        }
        Key::Member(slot) => sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(MEMBER_CLASS)
            .bind(slot),
    };
    query.fetch_one(conn).await
}

/// How a lease's session names itself to PostgreSQL (`application_name`,
/// which `pg_stat_activity` shows beside the locks): this process's host and
/// id.
fn session_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name = format!("ymera-projector {} pid {}", host.trim(), std::process::id());
    // PostgreSQL keeps 63 bytes of it; ASCII is cut on a character.
    name.retain(|c| c.is_ascii_graphic() || c == ' ');
    name.truncate(63);
    name
}

/// A connection of its own (the lease must outlive any pooled one), to the
/// pool's database. PostgreSQL gives up on it within about ten seconds of
/// its peer falling silent (keepalives, and a limit on unacknowledged
/// data), instead of the system's default of hours, so that a lease whose
/// owner's machine vanished is freed for a standby soon too.
async fn connect(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name(&session_name());
    let mut conn = PgConnection::connect_with(&options).await?;
    sqlx::raw_sql(
        "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1; \
         SET tcp_keepalives_count = 5; SET tcp_user_timeout = 10000",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}
