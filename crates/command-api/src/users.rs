//! Login and user management. Users are not event-sourced: credentials are
//! not domain history, and a deleted password hash must be gone for good.
//! Passwords are stored only as Argon2id hashes.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use infra::auth::{self, Role};
use infra::config::AuthConfig;
use infra::http::auth::Admin;
use infra::http::{ApiError, ApiJson, ApiPath, Problem};
use infra::views::Page;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::CommandState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    #[schema(value_type = String, format = Password)]
    pub password: SecretString,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub role: Role,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1..=64 characters of `[A-Za-z0-9_.@-]`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub username: String,
    /// 8..=1024 characters.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024)]
    pub password: SecretString,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct UserView {
    pub username: String,
    #[schema(value_type = Role)]
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// Runs a CPU-heavy password operation off the async workers.
/// At most one password hash per core at a time: Argon2 is built to be
/// expensive, and a burst of logins must queue rather than starve the rest
/// of the process (database connections included) of CPU.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    static HASHING: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let permits = HASHING.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores.max(1))
    });
    let _permit = permits
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("password queue closed: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("password task failed: {e}")))
}

/// Exchange a username and password for a bearer token.
#[utoipa::path(post, path = "/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, description = "Unknown user or wrong password (one message for both)",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(state): State<CommandState>,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    // Attempts are limited per username and per client address, so
    // passwords cannot be guessed at speed.
    let client = state.limits.client_address(&extensions, &headers);
    if let Some(d) = state.limits.login_attempt(&body.username, &client)
        && !d.allowed
    {
        return Ok(d.refusal());
    }
    // A name with NUL cannot be looked up (PostgreSQL text cannot hold it)
    // and no user has one: it is an unknown user, with the same answer and
    // the same password hashing time as any other.
    let row: Option<(String, String)> = if !body.username.contains('\0') {
        sqlx::query_as("SELECT password_hash, role FROM users WHERE username = $1")
            .bind(&body.username)
            .fetch_optional(&state.pool)
            .await?
    } else {
        None
    };
    let (hash, role) = row.map_or((None, None), |(h, r)| (Some(h), Some(r)));
    let password = body.password;
    let ok = blocking(move || auth::verify_password(&password, hash.as_deref())).await?;
    let role = role.as_deref().and_then(Role::parse).filter(|_| ok);
    let Some(role) = role else {
        return Err(ApiError::Unauthorized(
            "invalid username or password".into(),
        ));
    };
    let (access_token, expires_in) = state.auth.issue(&body.username, role)?;
    Ok(Json(TokenResponse {
        access_token,
        token_type: "bearer".into(),
        expires_in,
        role,
    })
    .into_response())
}

/// 1..=64 characters of `[A-Za-z0-9_.@-]`.
fn valid_username(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

fn validate_user(body: &CreateUserRequest) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if !valid_username(&body.username) {
        errors.push(infra::http::ProblemItem {
            field: Some("username".into()),
            index: None,
            message: "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-'".into(),
        });
    }
    let n = body.password.expose_secret().chars().count();
    if !(8..=1024).contains(&n) {
        errors.push(infra::http::ProblemItem {
            field: Some("password".into()),
            index: None,
            message: "must be 8 to 1024 characters".into(),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(errors))
    }
}

/// Create a user (admins only).
#[utoipa::path(post, path = "/users", tag = "users",
    request_body = CreateUserRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = UserView),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Username taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_user(
    State(state): State<CommandState>,
    Admin(claims): Admin,
    ApiJson(body): ApiJson<CreateUserRequest>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    validate_user(&body)?;
    let password = body.password;
    let hash = blocking(move || auth::hash_password(&password)).await??;
    let user: Option<UserView> = sqlx::query_as(
        "INSERT INTO users (username, password_hash, role, created_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (username) DO NOTHING \
         RETURNING username, role, created_at, created_by",
    )
    .bind(&body.username)
    .bind(hash)
    .bind(body.role.as_str())
    .bind(&claims.sub)
    .fetch_optional(&state.pool)
    .await?;
    let user = user.ok_or_else(|| ApiError::Conflict("a user with this name exists".into()))?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// List users (admins only), by name. Never includes password hashes.
#[utoipa::path(get, path = "/users", tag = "users",
    security(("bearer" = [])),
    responses((status = 200, body = Page<UserView>), (status = 403, body = Problem, content_type = "application/problem+json")))]
pub async fn list_users(
    State(state): State<CommandState>,
    _admin: Admin,
) -> Result<Json<Page<UserView>>, ApiError> {
    let items: Vec<UserView> = sqlx::query_as(
        "SELECT username, role, created_at, created_by FROM users ORDER BY username",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// Delete a user (admins only). The last admin cannot be deleted (409).
#[utoipa::path(delete, path = "/users/{username}", tag = "users",
    params(("username" = String, Path, pattern = "^[A-Za-z0-9_.@-]{1,64}$")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Would leave no admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_user(
    State(state): State<CommandState>,
    _admin: Admin,
    ApiPath(username): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    // Serialize deletions so two concurrent ones cannot remove both of the
    // last two admins.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ymera.users'))")
        .execute(&mut *tx)
        .await?;
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE username = $1")
        .bind(&username)
        .fetch_optional(&mut *tx)
        .await?;
    let role = role.ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    if role == "admin" {
        let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin'")
            .fetch_one(&mut *tx)
            .await?;
        if admins <= 1 {
            return Err(ApiError::Conflict(
                "the last admin cannot be deleted".into(),
            ));
        }
    }
    sqlx::query("DELETE FROM users WHERE username = $1")
        .bind(&username)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a user directly (for `ymera user add`). Returns false when the name
/// is taken.
pub async fn add_user(
    pool: &PgPool,
    username: &str,
    password: &SecretString,
    role: Role,
    by: &str,
) -> anyhow::Result<bool> {
    let password = password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password)).await??;
    let done = sqlx::query(
        "INSERT INTO users (username, password_hash, role, created_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (username) DO NOTHING",
    )
    .bind(username)
    .bind(hash)
    .bind(role.as_str())
    .bind(by)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
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
    let created = add_user(
        pool,
        &cfg.admin_username,
        &password,
        Role::Admin,
        "bootstrap",
    )
    .await?;
    if created {
        tracing::info!(username = %cfg.admin_username, "created the first admin");
    }
    Ok((created && generated).then_some(password))
}

pub fn router() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(create_user, list_users))
        .routes(routes!(delete_user))
}
