//! The request's token at the HTTP edge: where a request carries it, and
//! typed extractors for each role built on [`authenticate`].
//!
//! Every consumer of a request's token (the rate limiter, the idempotency
//! middleware, the role extractors, the live feed) goes through
//! [`authenticate`] or an extractor built on it: one place finds the token,
//! and its signature is verified at most once per request, by whichever
//! consumer asks first, never on a request nothing asks about.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::{HeaderMap, Uri, header, request::Parts};

use crate::auth::{Auth, Claims, InvalidToken, Role};
use crate::http::{ApiError, QueryPairs};
use crate::sessions::SessionError;

impl From<InvalidToken> for ApiError {
    fn from(invalid: InvalidToken) -> Self {
        ApiError::Unauthorized(invalid.0.into())
    }
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
/// handler's extractor checks the role), so that the signature and the
/// user's standing are checked once per request, and only when something
/// asks. Private: only this module writes it, so nothing else can plant
/// claims.
#[derive(Debug, Clone)]
struct Verified {
    token: String,
    outcome: Result<Claims, Refusal>,
}

/// Why a request's token was not accepted.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// 401: bad signature, expired, or revoked.
    Invalid(InvalidToken),
    /// 503: its user's standing could not be read.
    Unavailable,
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Invalid(invalid) => invalid.into(),
            Refusal::Unavailable => {
                ApiError::Unavailable("the token's user cannot be checked right now".into())
            }
        }
    }
}

/// The token's claims if it verifies and its user still holds it.
async fn verify(auth: &Auth, token: &str) -> Result<Claims, Refusal> {
    let claims = auth.verify(token).map_err(Refusal::Invalid)?;
    if let Some(sessions) = auth.sessions() {
        sessions.check(&claims).await.map_err(|e| match e {
            SessionError::Revoked => Refusal::Invalid(InvalidToken(
                "the token was revoked: its user was deleted or changed; log in again",
            )),
            SessionError::Unavailable => Refusal::Unavailable,
        })?;
    }
    Ok(claims)
}

/// The claims of the request's bearer token (`Authorization: Bearer`):
/// 401 when there is none, it does not verify or its user no longer holds
/// it.
pub async fn authenticate<'p>(parts: &'p mut Parts, auth: &Auth) -> Result<&'p Claims, ApiError> {
    authenticate_from(parts, auth, TokenSources::Header)
        .await
        .map(|(claims, _)| claims)
}

/// The claims of the token found in `sources`, and where it was found.
/// Verified at most once per request: later calls read the outcome the
/// first one left in the request's extensions.
async fn authenticate_from<'p>(
    parts: &'p mut Parts,
    auth: &Auth,
    sources: TokenSources,
) -> Result<(&'p Claims, TokenSource), ApiError> {
    let (token, source) = sources
        .find(&parts.headers, &parts.uri)?
        .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
    let token = token.into_owned();
    // The outcome kept is for this token only: a consumer that looks in
    // more places than an earlier one may find another.
    if parts
        .extensions
        .get::<Verified>()
        .is_none_or(|v| v.token != token)
    {
        let outcome = verify(auth, &token).await;
        parts.extensions.insert(Verified { token, outcome });
    }
    let verified = parts
        .extensions
        .get::<Verified>()
        .expect("verified just above");
    match &verified.outcome {
        Ok(claims) => Ok((claims, source)),
        Err(refusal) => Err((*refusal).into()),
    }
}

/// The claims of the token found in `sources`, if its role is at least
/// `role`: 401 without a valid token, 403 with too small a role.
async fn authorize(
    parts: &mut Parts,
    auth: &Auth,
    sources: TokenSources,
    role: Role,
) -> Result<(Claims, TokenSource), ApiError> {
    let (claims, source) = authenticate_from(parts, auth, sources).await?;
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
                let (claims, source) = authorize(parts, &auth, $sources, $role).await?;
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
    use std::time::Duration;

    use super::*;

    fn auth() -> Auth {
        Auth::new(&[7u8; 32], Duration::from_secs(60), "ymera", "ymera-api")
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[tokio::test]
    async fn a_request_verifies_its_token_once() {
        let (token, _) = auth().issue("alice", Role::Viewer, 1).unwrap();
        let bearer = format!("Bearer {token}");
        let mut first = parts("/", &[("authorization", &bearer)]);
        assert_eq!(
            authenticate(&mut first, &auth()).await.unwrap().sub,
            "alice"
        );
        // A key that would refuse it is not consulted again.
        let other = Auth::new(&[8u8; 32], Duration::from_secs(60), "ymera", "ymera-api");
        assert_eq!(authenticate(&mut first, &other).await.unwrap().sub, "alice");
        let mut fresh = parts("/", &[("authorization", &bearer)]);
        assert!(matches!(
            authenticate(&mut fresh, &other).await,
            Err(ApiError::Unauthorized(m)) if m.contains("signature")
        ));
        // A refusal is kept too.
        assert!(authenticate(&mut fresh, &auth()).await.is_err());
    }

    #[tokio::test]
    async fn the_live_feed_also_takes_the_query_and_the_subprotocol() {
        let a = auth();
        let (alice, _) = a.issue("alice", Role::Viewer, 1).unwrap();
        let (bob, _) = a.issue("bob", Role::Viewer, 1).unwrap();
        let header = format!("Bearer {alice}");
        let query = format!("/ws?access_token={bob}");
        let protocol = format!("bearer, {bob}");
        async fn found(p: &mut Parts, a: &Auth) -> Result<(String, TokenSource), ApiError> {
            authenticate_from(p, a, TokenSources::HeaderQueryOrSubprotocol)
                .await
                .map(|(c, source)| (c.sub.clone(), source))
        }

        let mut p = parts(&query, &[("authorization", &header)]);
        assert_eq!(
            found(&mut p, &a).await.unwrap(),
            ("alice".into(), TokenSource::Header)
        );
        let mut p = parts(&query, &[("sec-websocket-protocol", &protocol)]);
        assert_eq!(
            found(&mut p, &a).await.unwrap(),
            ("bob".into(), TokenSource::Query)
        );
        let mut p = parts("/ws", &[("sec-websocket-protocol", &protocol)]);
        assert_eq!(
            found(&mut p, &a).await.unwrap(),
            ("bob".into(), TokenSource::Subprotocol)
        );
        let mut p = parts(
            &format!("{query}&access_token=x"),
            &[("authorization", &header)],
        );
        assert!(matches!(
            found(&mut p, &a).await,
            Err(ApiError::BadRequest(_))
        ));
        // Other routes read the header alone.
        let mut p = parts(&query, &[("sec-websocket-protocol", &protocol)]);
        assert!(matches!(
            authenticate(&mut p, &a).await,
            Err(ApiError::Unauthorized(m)) if m.contains("required")
        ));
    }
}
