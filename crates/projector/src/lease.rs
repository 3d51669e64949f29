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

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFuture};

/// How often a standby asks for the lease.
const POLL: Duration = Duration::from_millis(500);
/// How often the owner checks that its session (and so its lock) is alive.
const KEEPALIVE: Duration = Duration::from_millis(500);
/// How long that check may take before the lease counts as lost.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The first half of every lease's key, so that the leases (two 32-bit
/// keys) stand apart from the other advisory locks of the database. The
/// second half is the projection name's `hashtext`: two names that
/// collided would share one lease, so one of them would wait for the other
/// to be given up, never run twice.
const LEASE_CLASS: i32 = 0x796d_6c73; // "ymls"

/// Held while this process owns a projection; dropping it gives the lease
/// up (its connection is closed, which frees the lock).
#[derive(Debug)]
pub struct Lease {
    lost: CancellationToken,
    _release: DropGuard,
}

impl Lease {
    /// Waits until this process owns projection `name`, asking every
    /// [`POLL`] while another process does; `None` once `shutdown` fires.
    pub async fn acquire(pool: &PgPool, name: &str, shutdown: &CancellationToken) -> Option<Lease> {
        let mut session: Option<PgConnection> = None;
        let mut told = false;
        loop {
            match try_lock(pool, &mut session, name).await {
                Ok(true) => {
                    if let Some(conn) = session.take() {
                        return Some(Lease::keep(conn, name));
                    }
                }
                Ok(false) if !told => {
                    tracing::info!(
                        projection = name,
                        "another process owns the projection; standing by"
                    );
                    told = true;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(projection = name, error = %e, "asking for the projection's lease failed; retrying");
                    session = None;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Resolves when the lease is lost: the owner must stop at once.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    /// Keeps `conn`'s session, and with it the lock, alive in the
    /// background until the lease is dropped or the session fails.
    fn keep(mut conn: PgConnection, name: &str) -> Lease {
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        let (on_loss, released) = (lost.clone(), release.clone());
        let name = name.to_owned();
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

/// Asks once for projection `name`'s lock on `session`, connecting it
/// first if needed.
async fn try_lock(
    pool: &PgPool,
    session: &mut Option<PgConnection>,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let conn = match session {
        Some(conn) => conn,
        None => session.insert(connect(pool).await?),
    };
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LEASE_CLASS)
        .bind(name)
        .fetch_one(conn)
        .await
}

/// A connection of its own (the lease must outlive any pooled one), to the
/// pool's database. PostgreSQL gives up on it within about ten seconds of
/// its peer falling silent (keepalives, and a limit on unacknowledged
/// data), instead of the system's default of hours, so that a lease whose
/// owner's machine vanished is freed for a standby soon too.
async fn connect(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    sqlx::raw_sql(
        "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1; \
         SET tcp_keepalives_count = 5; SET tcp_user_timeout = 10000",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}
