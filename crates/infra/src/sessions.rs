//! Whether a token's user still holds it: tokens end when their user is
//! deleted or their role or password changes, on every process, within
//! moments.
//!
//! Each token carries its user's token epoch (`users.token_epoch`) from when
//! it was issued. Every process keeps a small cache of each user's current
//! (epoch, role), so the steady state costs a map lookup and no database
//! round trip, and listens on [`CHANNEL`], which a trigger on `users`
//! notifies with the username on every insert, update and delete: the
//! entry is forgotten and the next request reads it afresh. Each time the
//! listener (re)connects the whole cache is dropped, since what changed
//! while it was not listening is unknown; while it is disconnected, cached
//! entries keep serving (a PostgreSQL outage does not stop writes), and
//! users not cached cannot be checked (503).
//!
//! This is the one place outside the write side that reads the `users`
//! table, which `command-api`'s migrations own (`0004_token_epochs.sql`
//! adds the epoch and the trigger): every role verifies tokens, and `infra`
//! is what all of them reach.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Claims, Role};

/// The channel the `users` trigger notifies with a changed username.
pub const CHANNEL: &str = "ymera_users";
/// Most users cached per process; past it the cache starts over. Entries
/// only come from tokens whose signature verified, so only our own users
/// (and deleted ones) fill it.
const MAX_CACHED: usize = 10_000;

/// A user's standing as the users table last said: `None` when there is
/// no such user.
type Standing = Option<(i64, Role)>;

/// Why a verified token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    /// Its user was deleted, or their role or password changed since it
    /// was issued.
    Revoked,
    /// The users table cannot be read to check it.
    Unavailable,
}

#[derive(Debug, Default)]
struct Cache {
    /// Moved by every forgetting, so that a read which began before a
    /// change is not cached after it.
    generation: u64,
    users: HashMap<String, Standing>,
}

/// Misses are read in turns, by username: the burst of requests that
/// follows a change or a reconnect makes one query per user, not one per
/// request (which would empty the pool).
const READ_TURNS: usize = 64;

/// The cache of users' token epochs, kept current by a `LISTEN` task.
#[derive(Debug)]
pub struct Sessions {
    pool: PgPool,
    cache: RwLock<Cache>,
    turns: Box<[tokio::sync::Mutex<()>]>,
    turn_of: RandomState,
}

impl Sessions {
    /// Starts the listener; it reconnects by itself after an outage.
    pub fn spawn(pool: PgPool, shutdown: CancellationToken) -> Arc<Sessions> {
        let sessions = Arc::new(Sessions {
            pool,
            cache: RwLock::default(),
            turns: (0..READ_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            turn_of: RandomState::new(),
        });
        let listening = sessions.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let err = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    err = listening.listen() => err,
                };
                tracing::warn!(error = %err, "users listener lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        sessions
    }

    /// Whether `claims` (whose signature has been verified) still speak for
    /// their user: same epoch and role as the users table has now.
    pub async fn check(&self, claims: &Claims) -> Result<(), SessionError> {
        if let Some(verdict) = self.cached(claims).0 {
            return verdict;
        }
        let turn = (self.turn_of.hash_one(&claims.sub) % READ_TURNS as u64) as usize;
        let _turn = self.turns[turn].lock().await;
        // Another request may have read it while this one waited.
        let (verdict, generation) = self.cached(claims);
        if let Some(verdict) = verdict {
            return verdict;
        }
        let standing = self.read(&claims.sub).await?;
        self.remember(generation, &claims.sub, standing);
        if holds(standing, claims) {
            Ok(())
        } else {
            Err(SessionError::Revoked)
        }
    }

    /// The cache's generation now: pass it to [`Sessions::learned`] with
    /// what a read that starts after this call finds.
    pub fn generation(&self) -> u64 {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// Remembers a user's standing read elsewhere (a login reads it anyway),
    /// unless the user changed since `generation`. A login thus leaves its
    /// process able to check the new token without a query, also through a
    /// PostgreSQL outage that begins right after.
    pub fn learned(&self, generation: u64, username: &str, epoch: i64, role: Role) {
        self.remember(generation, username, Some((epoch, role)));
    }

    /// The verdict the cache gives, if it gives one, and the cache's
    /// generation.
    fn cached(&self, claims: &Claims) -> (Option<Result<(), SessionError>>, u64) {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let verdict = match cache.users.get(&claims.sub).copied() {
            Some(standing) if holds(standing, claims) => Some(Ok(())),
            // A token newer than the entry proves the entry stale (epochs
            // only grow): read again. Any other mismatch is final.
            Some(Some((epoch, _))) if claims.epoch > epoch => None,
            Some(_) => Some(Err(SessionError::Revoked)),
            None => None,
        };
        (verdict, cache.generation)
    }

    async fn read(&self, username: &str) -> Result<Standing, SessionError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT token_epoch, role FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot read a token's user");
                    SessionError::Unavailable
                })?;
        Ok(row.and_then(|(epoch, role)| Some((epoch, Role::parse(&role)?))))
    }

    fn remember(&self, generation: u64, username: &str, standing: Standing) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.generation != generation {
            return;
        }
        if cache.users.len() >= MAX_CACHED {
            cache.users.clear();
        }
        cache.users.insert(username.to_owned(), standing);
    }

    fn forget(&self, username: Option<&str>) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        match username {
            Some(u) => {
                cache.users.remove(u);
            }
            None => cache.users.clear(),
        }
    }

    /// Listens until the connection is lost; answers why.
    async fn listen(&self) -> sqlx::Error {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(l) => l,
            Err(e) => return e,
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            return e;
        }
        // Listening (again): whatever changed while not listening is lost.
        self.forget(None);
        loop {
            // `try_recv` answers `None` when the connection dropped; a new
            // listener is made then (rather than letting this one reconnect
            // silently), so that the cache is dropped once it is back.
            match listener.try_recv().await {
                Ok(Some(n)) => self.forget(Some(n.payload())),
                Ok(None) => return sqlx::Error::Protocol("the connection was lost".into()),
                Err(e) => return e,
            }
        }
    }
}

fn holds(standing: Standing, claims: &Claims) -> bool {
    standing == Some((claims.epoch, claims.role))
}
