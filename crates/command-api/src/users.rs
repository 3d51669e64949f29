//! Login, password changes and user management over HTTP; the table itself
//! is `accounts`. Users are not event-sourced: credentials are not domain
//! history, and a deleted password hash must be gone for good. Passwords
//! are stored only as Argon2id hashes.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infra::auth::{self, Role, Username};
use infra::http::auth::{Admin, Viewer};
use infra::http::{ApiError, ApiJson, ApiPath, Problem, ProblemItem};
use infra::views::Page;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::CommandState;
use crate::accounts::{self, AccountError, UserView};

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

/// A self-service password change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    #[schema(value_type = String, format = Password)]
    pub current_password: SecretString,
    /// 8..=1024 characters.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024)]
    pub new_password: SecretString,
}

/// An admin's change to a user: the role, the password, or both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateUserRequest {
    /// The new role; leave it out to keep the current one.
    #[schema(nullable = false)]
    pub role: Option<Role>,
    /// 8..=1024 characters; leave it out to keep the current password.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024, required = false)]
    pub password: Option<SecretString>,
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
        (status = 401, description = "Unknown user, wrong password or a name no user can have (one message for all)",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(state): State<CommandState>,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    // Attempts are limited per client address, then per username, so
    // passwords cannot be guessed at speed. The address goes first: a
    // refused client's username is not even looked at. A name no user can
    // have (wrong length or characters) is a failed login like any other,
    // and never becomes a key.
    let client = state.limits.client_address(&extensions, &headers);
    if let Some(refused) = state.limits.login_from(&client) {
        return Ok(refused.refusal());
    }
    let Some(username) = Username::parse(&body.username) else {
        return Err(invalid_credentials());
    };
    if let Some(refused) = state.limits.login_as(&username) {
        return Ok(refused.refusal());
    }
    let generation = state.auth.sessions().map(|s| s.generation());
    let user = accounts::credentials(&state.pool, &username).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let password = body.password;
    let ok = blocking(move || auth::verify_password(&password, hash.as_deref())).await?;
    let Some((role, epoch)) = user
        .filter(|_| ok)
        .and_then(|u| Some((Role::parse(&u.role)?, u.token_epoch)))
    else {
        return Err(invalid_credentials());
    };
    if let (Some(sessions), Some(generation)) = (state.auth.sessions(), generation) {
        sessions.learned(generation, username.as_str(), epoch, role);
    }
    let (access_token, expires_in) = state.auth.issue(username.as_str(), role, epoch)?;
    Ok(Json(TokenResponse {
        access_token,
        token_type: "bearer".into(),
        expires_in,
        role,
    })
    .into_response())
}

/// The one answer to every failed login: unknown user, wrong password or a
/// name no user can have.
fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized("invalid username or password".into())
}

/// 8..=1024 characters, or why not.
fn check_password(field: &str, password: &SecretString) -> Option<ProblemItem> {
    let n = password.expose_secret().chars().count();
    (!(8..=1024).contains(&n)).then(|| ProblemItem {
        field: Some(field.into()),
        index: None,
        message: "must be 8 to 1024 characters".into(),
    })
}

fn reject(errors: Vec<ProblemItem>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(errors))
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::NotFound => ApiError::NotFound(e.to_string()),
            AccountError::LastAdmin => ApiError::Conflict(e.to_string()),
            AccountError::Db(e) => e.into(),
        }
    }
}

/// Change your own password (any role). Every token of yours issued
/// before, this one included, stops working: log in again.
#[utoipa::path(post, path = "/auth/password", tag = "auth",
    request_body = ChangePasswordRequest,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Changed; older tokens are revoked"),
        (status = 422, description = "The current password is wrong, or the new one is not valid",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn change_password(
    State(state): State<CommandState>,
    Viewer(claims): Viewer,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> Result<Response, ApiError> {
    reject(
        check_password("new_password", &body.new_password)
            .into_iter()
            .collect(),
    )?;
    // The current password is guessed no faster here than at login.
    let client = state.limits.client_address(&extensions, &headers);
    let username = Username::parse(&claims.sub).ok_or_else(invalid_credentials)?;
    if let Some(refused) = state
        .limits
        .login_from(&client)
        .or_else(|| state.limits.login_as(&username))
    {
        return Ok(refused.refusal());
    }
    let user = accounts::credentials(&state.pool, &username)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    let (current, new) = (body.current_password, body.new_password);
    let hash = blocking(move || {
        auth::verify_password(&current, Some(&user.password_hash))
            .then(|| auth::hash_password(&new))
    })
    .await?
    .ok_or_else(|| ApiError::invalid_field("current_password", "is not your current password"))??;
    accounts::update(&state.pool, &username, None, Some(&hash)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
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
    let username = Username::parse(&body.username);
    let mut errors = Vec::new();
    if username.is_none() {
        errors.push(ProblemItem {
            field: Some("username".into()),
            index: None,
            message: Username::RULE.into(),
        });
    }
    errors.extend(check_password("password", &body.password));
    reject(errors)?;
    let username = username.expect("checked above");
    let password = body.password;
    let hash = blocking(move || auth::hash_password(&password)).await??;
    let user = accounts::insert(&state.pool, &username, &hash, body.role, &claims.sub)
        .await?
        .ok_or_else(|| ApiError::Conflict("a user with this name exists".into()))?;
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
    Ok(Json(Page {
        items: accounts::list(&state.pool).await?,
        next_cursor: None,
    }))
}

/// The user named in the path; a name no user can have is a 404.
fn path_user(username: &str) -> Result<Username, ApiError> {
    Username::parse(username).ok_or_else(|| AccountError::NotFound.into())
}

/// Change a user's role and/or password (admins only). Either change
/// revokes the user's older tokens (401 from then on, on every process):
/// they log in again, with the new role. The last admin cannot be demoted
/// (409).
#[utoipa::path(put, path = "/users/{username}", tag = "users",
    params(("username" = String, Path, pattern = "^[A-Za-z0-9_.@-]{1,64}$")),
    request_body = UpdateUserRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, body = UserView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Would leave no admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Neither role nor password, or an invalid password",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_user(
    State(state): State<CommandState>,
    _admin: Admin,
    ApiPath(username): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateUserRequest>,
) -> Result<Json<UserView>, ApiError> {
    let mut errors: Vec<ProblemItem> = body
        .password
        .as_ref()
        .and_then(|p| check_password("password", p))
        .into_iter()
        .collect();
    if body.role.is_none() && body.password.is_none() {
        errors.push(ProblemItem {
            field: None,
            index: None,
            message: "give a role, a password, or both".into(),
        });
    }
    reject(errors)?;
    let username = path_user(&username)?;
    let hash = match body.password {
        Some(password) => Some(blocking(move || auth::hash_password(&password)).await??),
        None => None,
    };
    let user = accounts::update(&state.pool, &username, body.role, hash.as_deref()).await?;
    Ok(Json(user))
}

/// Delete a user (admins only); their tokens stop working at once, on every
/// process. The last admin cannot be deleted (409).
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
    accounts::delete(&state.pool, &path_user(&username)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(change_password))
        .routes(routes!(create_user, list_users))
        .routes(routes!(update_user, delete_user))
}
