//! Authentication and authorization: Argon2id password hashes, HS256 JWTs
//! with the algorithm pinned, and typed extractors for each role.
//!
//! Every consumer of a request's token (the rate limiter, the idempotency
//! middleware, the role extractors, the live feed) goes through
//! [`authenticate`] or an extractor built on it: one place finds the token,
//! and its signature is verified at most once per request, by whichever
//! consumer asks first, never on a request nothing asks about.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use axum::extract::{FromRef, FromRequestParts};
use axum::http::{HeaderMap, Uri, header, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::AuthConfig;
use crate::http::{ApiError, QueryPairs};

/// What a user may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only.
    Viewer,
    /// All agent and project reads and writes.
    Editor,
    /// Everything, including user management.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The claims of our tokens. All are required on the way in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

/// Issues and verifies tokens.
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// The smallest HS256 secret we accept: as many bytes as the hash.
pub const MIN_SECRET_BYTES: usize = 32;

impl Auth {
    /// Builds from configuration. Without a secret, development mode makes a
    /// random one (tokens then die with the process); otherwise it is an
    /// error.
    pub fn from_config(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let secret = match &cfg.jwt_secret {
            Some(s) => s.expose_secret().as_bytes().to_vec(),
            None if cfg.dev => random_token(48).into_bytes(),
            None => anyhow::bail!("--jwt-secret (YMERA_JWT_SECRET) is required outside --dev"),
        };
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_BYTES,
            "the JWT secret must be at least {MIN_SECRET_BYTES} bytes"
        );
        Ok(Self::new(
            &secret,
            Duration::from_secs(cfg.jwt_ttl_secs),
            &cfg.jwt_issuer,
            &cfg.jwt_audience,
        ))
    }

    pub fn new(secret: &[u8], ttl: Duration, issuer: &str, audience: &str) -> Self {
        // Pinned to HS256: a token that names another algorithm (or `none`)
        // is rejected before its signature is looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Auth {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// A signed token for `sub` with `role`, and its lifetime in seconds.
    pub fn issue(&self, sub: &str, role: Role) -> anyhow::Result<(String, u64)> {
        let now = now_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, self.ttl.as_secs()))
    }

    /// Checks signature, algorithm, expiry, issuer and audience.
    pub fn verify(&self, token: &str) -> Result<Claims, InvalidToken> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
                    ErrorKind::InvalidSignature => "the token's signature is not valid",
                    ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                        "the token was not issued for this service"
                    }
                    _ => "the token is malformed",
                };
                InvalidToken(why)
            })
    }
}

/// Why a token was refused; answered as a 401 with the reason as detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidToken(&'static str);

impl From<InvalidToken> for ApiError {
    fn from(invalid: InvalidToken) -> Self {
        ApiError::Unauthorized(invalid.0.into())
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random URL-safe string of `len` characters, for generated secrets and
/// passwords.
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Hashes a password with Argon2id and a random salt, as a PHC string.
/// CPU-heavy: call from `spawn_blocking`.
pub fn hash_password(password: &SecretString) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.expose_secret().as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
}

/// Checks a password against a PHC hash. CPU-heavy: call from
/// `spawn_blocking`. With no hash (unknown user) it still does the work of a
/// real check, so timing does not tell which usernames exist.
pub fn verify_password(password: &SecretString, hash: Option<&str>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let (hash, real) = match hash {
        Some(h) => (h, true),
        None => (
            DUMMY
                .get_or_init(|| {
                    hash_password(&SecretString::from(random_token(24))).unwrap_or_default()
                })
                .as_str(),
            false,
        ),
    };
    let ok = Argon2::default()
        .verify_password(password.expose_secret().as_bytes(), hash)
        .is_ok();
    ok && real
}

/// Where a request carried its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `?access_token=<token>`.
    Query,
    /// The WebSocket subprotocols `bearer, <token>`.
    Subprotocol,
}

/// Where a route looks for the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenSources {
    /// The `Authorization` header alone: every route but the live feed.
    Header,
    /// The header, else `?access_token=`, else the WebSocket subprotocols
    /// `bearer, <token>`: the live feed, whose browser clients
    /// (`EventSource`, `WebSocket`) cannot set headers.
    HeaderQueryOrSubprotocol,
}

impl TokenSources {
    /// The token from the first source that carries one. A repeated
    /// `access_token` is a 400 even when the header carries the token.
    fn find<'r>(
        self,
        headers: &'r HeaderMap,
        uri: &Uri,
    ) -> Result<Option<(Cow<'r, str>, TokenSource)>, ApiError> {
        let from_header = bearer(headers).map(|t| (Cow::Borrowed(t), TokenSource::Header));
        if self == TokenSources::Header {
            return Ok(from_header);
        }
        let query = QueryPairs::from_uri(uri);
        let from_query = query
            .one("access_token")?
            .map(|t| (Cow::Owned(t.to_owned()), TokenSource::Query));
        Ok(from_header.or(from_query).or_else(|| {
            subprotocol_bearer(headers).map(|t| (Cow::Borrowed(t), TokenSource::Subprotocol))
        }))
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of `Sec-WebSocket-Protocol: bearer, <token>`.
fn subprotocol_bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let mut protocols = value.split(',').map(str::trim);
    (protocols.next() == Some("bearer"))
        .then(|| protocols.next())
        .flatten()
}

/// The outcome of verifying a request's token, kept in the request's
/// extensions by whichever consumer needed it first (the rate limiter keys
/// on the token's subject, idempotency keys on it as the actor, the
/// handler's extractor checks the role), so that the signature is checked
/// once per request, and only when something asks. Private: only this
/// module writes it, so nothing else can plant claims.
#[derive(Debug, Clone)]
struct Verified {
    token: String,
    outcome: Result<Claims, InvalidToken>,
}

/// The claims of the request's bearer token (`Authorization: Bearer`):
/// 401 when there is none or it does not verify.
pub fn authenticate<'p>(parts: &'p mut Parts, auth: &Auth) -> Result<&'p Claims, ApiError> {
    authenticate_from(parts, auth, TokenSources::Header).map(|(claims, _)| claims)
}

/// The claims of the token found in `sources`, and where it was found.
/// Verified at most once per request: later calls read the outcome the
/// first one left in the request's extensions.
fn authenticate_from<'p>(
    parts: &'p mut Parts,
    auth: &Auth,
    sources: TokenSources,
) -> Result<(&'p Claims, TokenSource), ApiError> {
    let (token, source) = sources
        .find(&parts.headers, &parts.uri)?
        .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
    // The outcome kept is for this token only: a consumer that looks in
    // more places than an earlier one may find another.
    if parts
        .extensions
        .get::<Verified>()
        .is_some_and(|v| v.token != token)
    {
        parts.extensions.remove::<Verified>();
    }
    let verified = parts.extensions.get_or_insert_with(|| Verified {
        outcome: auth.verify(&token),
        token: token.into_owned(),
    });
    match &verified.outcome {
        Ok(claims) => Ok((claims, source)),
        Err(invalid) => Err((*invalid).into()),
    }
}

/// The claims of the token found in `sources`, if its role is at least
/// `role`: 401 without a valid token, 403 with too small a role.
fn authorize(
    parts: &mut Parts,
    auth: &Auth,
    sources: TokenSources,
    role: Role,
) -> Result<(Claims, TokenSource), ApiError> {
    let (claims, source) = authenticate_from(parts, auth, sources)?;
    if claims.role < role {
        return Err(ApiError::Forbidden);
    }
    Ok((claims.clone(), source))
}

/// Makes `$name` an extractor that admits callers with at least `$role`,
/// looking for their token in `$sources`; `$build` makes the extractor from
/// the claims and where the token was found.
macro_rules! authorizing_extractor {
    ($name:ident, $sources:expr, $role:expr, $build:expr) => {
        impl<S> FromRequestParts<S> for $name
        where
            S: Send + Sync,
            Arc<Auth>: FromRef<S>,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                let auth = Arc::<Auth>::from_ref(state);
                let (claims, source) = authorize(parts, &auth, $sources, $role)?;
                Ok($build(claims, source))
            }
        }
    };
}

macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Claims);

        authorizing_extractor!($name, TokenSources::Header, $role, |claims, _| $name(claims));
    };
}

role_extractor!(
    /// A caller with at least the `viewer` role.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// A caller with at least the `editor` role.
    Editor,
    Role::Editor
);
role_extractor!(
    /// A caller with the `admin` role.
    Admin,
    Role::Admin
);

/// A caller with at least the `viewer` role, for the live feed: besides the
/// `Authorization` header its token may come as `?access_token=` or as the
/// WebSocket subprotocols `bearer, <token>`, since browsers' `EventSource`
/// and `WebSocket` cannot set headers.
#[derive(Debug, Clone)]
pub struct LiveViewer {
    pub claims: Claims,
    /// Where the token was found: a WebSocket upgrade names the `bearer`
    /// subprotocol in its answer when the token came that way.
    pub source: TokenSource,
}

authorizing_extractor!(
    LiveViewer,
    TokenSources::HeaderQueryOrSubprotocol,
    Role::Viewer,
    |claims, source| LiveViewer { claims, source }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&[7u8; 32], Duration::from_secs(60), "ymera", "ymera-api")
    }

    #[test]
    fn issued_tokens_verify() {
        let a = auth();
        let (token, ttl) = a.issue("alice", Role::Editor).unwrap();
        assert_eq!(ttl, 60);
        let claims = a.verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.role, Role::Editor);
    }

    #[test]
    fn foreign_secret_audience_and_alg_none_are_rejected() {
        let (token, _) = auth().issue("alice", Role::Admin).unwrap();
        let other = Auth::new(&[8u8; 32], Duration::from_secs(60), "ymera", "ymera-api");
        assert!(other.verify(&token).is_err());
        let other_aud = Auth::new(&[7u8; 32], Duration::from_secs(60), "ymera", "elsewhere");
        assert!(other_aud.verify(&token).is_err());
        // Same claims, header rewritten to alg "none" with no signature.
        let payload = token.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(auth().verify(&none).is_err());
    }

    #[test]
    fn expired_tokens_are_rejected() {
        let a = Auth::new(&[7u8; 32], Duration::from_secs(0), "ymera", "ymera-api");
        let claims = Claims {
            sub: "a".into(),
            role: Role::Viewer,
            iss: "ymera".into(),
            aud: "ymera-api".into(),
            iat: 1,
            exp: 2,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert!(matches!(a.verify(&token), Err(InvalidToken(m)) if m.contains("expired")));
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_request_verifies_its_token_once() {
        let (token, _) = auth().issue("alice", Role::Viewer).unwrap();
        let bearer = format!("Bearer {token}");
        let mut first = parts("/", &[("authorization", &bearer)]);
        assert_eq!(authenticate(&mut first, &auth()).unwrap().sub, "alice");
        // A key that would refuse it is not consulted again.
        let other = Auth::new(&[8u8; 32], Duration::from_secs(60), "ymera", "ymera-api");
        assert_eq!(authenticate(&mut first, &other).unwrap().sub, "alice");
        let mut fresh = parts("/", &[("authorization", &bearer)]);
        assert!(matches!(
            authenticate(&mut fresh, &other),
            Err(ApiError::Unauthorized(m)) if m.contains("signature")
        ));
        // A refusal is kept too.
        assert!(authenticate(&mut fresh, &auth()).is_err());
    }

    #[test]
    fn the_live_feed_also_takes_the_query_and_the_subprotocol() {
        let a = auth();
        let (alice, _) = a.issue("alice", Role::Viewer).unwrap();
        let (bob, _) = a.issue("bob", Role::Viewer).unwrap();
        let live = TokenSources::HeaderQueryOrSubprotocol;
        let header = format!("Bearer {alice}");
        let query = format!("/ws?access_token={bob}");
        let protocol = format!("bearer, {bob}");
        let found = |p: &mut Parts| {
            authenticate_from(p, &a, live).map(|(c, source)| (c.sub.clone(), source))
        };

        let mut p = parts(&query, &[("authorization", &header)]);
        assert_eq!(
            found(&mut p).unwrap(),
            ("alice".into(), TokenSource::Header)
        );
        let mut p = parts(&query, &[("sec-websocket-protocol", &protocol)]);
        assert_eq!(found(&mut p).unwrap(), ("bob".into(), TokenSource::Query));
        let mut p = parts("/ws", &[("sec-websocket-protocol", &protocol)]);
        assert_eq!(
            found(&mut p).unwrap(),
            ("bob".into(), TokenSource::Subprotocol)
        );
        let mut p = parts(
            &format!("{query}&access_token=x"),
            &[("authorization", &header)],
        );
        assert!(matches!(found(&mut p), Err(ApiError::BadRequest(_))));
        // Other routes read the header alone.
        let mut p = parts(&query, &[("sec-websocket-protocol", &protocol)]);
        assert!(matches!(
            authenticate(&mut p, &a),
            Err(ApiError::Unauthorized(m)) if m.contains("required")
        ));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let pw = SecretString::from("correct horse");
        let hash = hash_password(&pw).unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&pw, Some(&hash)));
        assert!(!verify_password(&SecretString::from("wrong"), Some(&hash)));
        assert!(!verify_password(&pw, None));
    }
}
