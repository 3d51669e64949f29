//! Who is calling: Argon2id password hashes, HS256 JWTs with the algorithm
//! pinned, and roles. No HTTP here: `http::auth` finds a request's token
//! and turns these into extractors.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::AuthConfig;
use crate::sessions::Sessions;

/// What a user may do. Each role includes the ones below it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
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

/// A valid username: 1..=64 characters of `[A-Za-z0-9_.@-]`. Parsed once
/// at the edge, so a name that could not belong to any user (a 200 KiB
/// one, say) never reaches a lookup, a rate-limit key or a log line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// What [`Username::parse`] accepts, for error messages.
    pub const RULE: &'static str =
        "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-'";

    pub fn parse(name: &str) -> Option<Username> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
        valid.then(|| Username(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Username {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
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
    /// The user's token epoch when the token was issued; the token is
    /// refused once the user's epoch moves on (see [`crate::sessions`]).
    pub epoch: i64,
}

/// Issues and verifies tokens.
pub struct Auth {
    /// Whether a token's user still holds it. `None` (tools and tests
    /// that only issue tokens) checks signatures alone.
    sessions: Option<Arc<Sessions>>,
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
            sessions: None,
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// Checks every verified token against its user's current token epoch
    /// and role (a deleted or changed user's older tokens are refused).
    pub fn with_sessions(mut self, sessions: Arc<Sessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// What checks a token's user still holds it, if anything does.
    pub fn sessions(&self) -> Option<&Sessions> {
        self.sessions.as_deref()
    }

    /// A signed token for `sub` with `role` at the user's token `epoch`,
    /// and its lifetime in seconds.
    pub fn issue(&self, sub: &str, role: Role, epoch: i64) -> anyhow::Result<(String, u64)> {
        let now = now_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            epoch,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, self.ttl.as_secs()))
    }

    /// Checks signature, algorithm, expiry, issuer and audience (not whether
    /// the user still holds the token: see [`Auth::sessions`]).
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
pub struct InvalidToken(pub(crate) &'static str);

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
#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&[7u8; 32], Duration::from_secs(60), "ymera", "ymera-api")
    }

    #[test]
    fn issued_tokens_verify() {
        let a = auth();
        let (token, ttl) = a.issue("alice", Role::Editor, 1).unwrap();
        assert_eq!(ttl, 60);
        let claims = a.verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.role, Role::Editor);
    }

    #[test]
    fn foreign_secret_audience_and_alg_none_are_rejected() {
        let (token, _) = auth().issue("alice", Role::Admin, 1).unwrap();
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
            epoch: 1,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert!(matches!(a.verify(&token), Err(InvalidToken(m)) if m.contains("expired")));
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
