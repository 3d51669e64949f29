//! The users table: who may log in, with which role, and the token epoch
//! that every token of theirs carries. Shared by the HTTP handlers
//! (`users`) and the `ymera user` commands.
//!
//! Every change of a user's role or password gives them a new token epoch
//! (from the `users_token_epoch` sequence), and deleting them removes it:
//! their older tokens are refused from then on, by every process (a trigger
//! notifies them; see `infra::sessions`). A demoted user's older tokens are
//! refused outright (401), not carried on at the new role: they log in
//! again to get a token for what they may do now.

use chrono::{DateTime, Utc};
use infra::auth::{self, Role, Username};
use infra::config::AuthConfig;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct UserView {
    pub username: String,
    #[schema(value_type = Role)]
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// What a login needs to know about a user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Credentials {
    pub password_hash: String,
    pub role: String,
    pub token_epoch: i64,
}

/// Why a change to a user was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// No user has that name. 404.
    #[error("no such user")]
    NotFound,
    /// The change would leave no admin. 409.
    #[error("the last admin cannot be deleted or demoted")]
    LastAdmin,
    /// The database failed. 503 or 500, as any query.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The user's password hash, role and token epoch, if they exist.
pub async fn credentials(
    pool: &PgPool,
    username: &Username,
) -> Result<Option<Credentials>, sqlx::Error> {
    sqlx::query_as("SELECT password_hash, role, token_epoch FROM users WHERE username = $1")
        .bind(username.as_str())
        .fetch_optional(pool)
        .await
}

/// Every user, by name. Never includes password hashes.
pub async fn list(pool: &PgPool) -> Result<Vec<UserView>, sqlx::Error> {
    sqlx::query_as("SELECT username, role, created_at, created_by FROM users ORDER BY username")
        .fetch_all(pool)
        .await
}

/// Adds a user with an Argon2id `password_hash`; `None` when the name is
/// taken.
pub async fn insert(
    pool: &PgPool,
    username: &Username,
    password_hash: &str,
    role: Role,
    by: &str,
) -> Result<Option<UserView>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO users (username, password_hash, role, created_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (username) DO NOTHING \
         RETURNING username, role, created_at, created_by",
    )
    .bind(username.as_str())
    .bind(password_hash)
    .bind(role.as_str())
    .bind(by)
    .fetch_optional(pool)
    .await
}

/// Hashes `password` (off the async workers) and adds the user. Returns
/// false when the name is taken.
pub async fn add_user(
    pool: &PgPool,
    username: &Username,
    password: &SecretString,
    role: Role,
    by: &str,
) -> anyhow::Result<bool> {
    let hash = hash(password).await?;
    Ok(insert(pool, username, &hash, role, by).await?.is_some())
}

/// An Argon2id hash of `password`, computed off the async workers.
pub async fn hash(password: &SecretString) -> anyhow::Result<String> {
    let password = password.clone();
    tokio::task::spawn_blocking(move || auth::hash_password(&password)).await?
}

/// Changes a user's role and/or password (an Argon2id hash). Either change
/// gives the user a new token epoch, so their older tokens are refused;
/// setting the role they already have changes nothing. Demoting the last
/// admin is refused.
pub async fn update(
    pool: &PgPool,
    username: &Username,
    role: Option<Role>,
    password_hash: Option<&str>,
) -> Result<UserView, AccountError> {
    let mut tx = pool.begin().await?;
    let current = lock_user(&mut tx, username).await?;
    if current == "admin" && role.is_some_and(|r| r != Role::Admin) {
        ensure_another_admin(&mut tx).await?;
    }
    let user: UserView = sqlx::query_as(
        "UPDATE users SET \
            role = coalesce($2, role), \
            password_hash = coalesce($3, password_hash), \
            token_epoch = CASE WHEN $3 IS NOT NULL OR coalesce($2, role) <> role \
                THEN nextval('users_token_epoch') ELSE token_epoch END \
         WHERE username = $1 \
         RETURNING username, role, created_at, created_by",
    )
    .bind(username.as_str())
    .bind(role.map(Role::as_str))
    .bind(password_hash)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(user)
}

/// Deletes a user, and with them every token of theirs. Deleting the last
/// admin is refused.
pub async fn delete(pool: &PgPool, username: &Username) -> Result<(), AccountError> {
    let mut tx = pool.begin().await?;
    if lock_user(&mut tx, username).await? == "admin" {
        ensure_another_admin(&mut tx).await?;
    }
    sqlx::query("DELETE FROM users WHERE username = $1")
        .bind(username.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Serializes changes to users (so two concurrent ones cannot remove both
/// of the last two admins) and answers the user's role.
async fn lock_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    username: &Username,
) -> Result<String, AccountError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ymera.users'))")
        .execute(&mut **tx)
        .await?;
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE username = $1")
        .bind(username.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    role.ok_or(AccountError::NotFound)
}

async fn ensure_another_admin(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
) -> Result<(), AccountError> {
    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin'")
        .fetch_one(&mut **tx)
        .await?;
    if admins <= 1 {
        return Err(AccountError::LastAdmin);
    }
    Ok(())
}

/// Creates the first admin when there are no users at all. Returns the
/// generated password in development mode, for the caller to print once.
pub async fn bootstrap_admin(
    pool: &PgPool,
    cfg: &AuthConfig,
) -> anyhow::Result<Option<SecretString>> {
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(pool)
        .await?;
    if users > 0 {
        return Ok(None);
    }
    let (password, generated) = match (&cfg.admin_password, cfg.dev) {
        (Some(p), _) => (p.clone(), false),
        (None, true) => (SecretString::from(auth::random_token(20)), true),
        (None, false) => {
            tracing::warn!("no users exist and no YMERA_ADMIN_PASSWORD is set: nobody can log in");
            return Ok(None);
        }
    };
    let username = Username::parse(&cfg.admin_username).ok_or_else(|| {
        anyhow::anyhow!(
            "YMERA_ADMIN_USERNAME {:?} {}",
            cfg.admin_username,
            Username::RULE
        )
    })?;
    let created = add_user(pool, &username, &password, Role::Admin, "bootstrap").await?;
    if created {
        tracing::info!(username = %username, "created the first admin");
    }
    Ok((created && generated).then_some(password))
}
