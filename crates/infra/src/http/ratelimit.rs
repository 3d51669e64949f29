//! Rate limits: per token on the API (per client address before login),
//! and on login attempts. Token buckets kept in this process, so with N
//! copies of an API behind a balancer a client gets up to N times the
//! limit; that is a deliberate trade for no shared state on the hot path.
//!
//! Every limited response carries the `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers (IETF draft); a
//! refusal is a 429 problem with `Retry-After`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth::Auth;
use crate::config::HttpConfig;
use crate::http::auth;

static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Entries idle this long are dropped when the table grows.
const IDLE: Duration = Duration::from_secs(120);
const SWEEP_AT: usize = 50_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size.
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until a request would be allowed again (0 when allowed) or,
    /// when allowed, until the bucket is full.
    pub reset_secs: u64,
}

/// Token buckets by key: `per_sec` sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `None` when `per_sec` is 0: no limit.
    pub fn new(per_sec: f64, burst: f64) -> Option<Self> {
        (per_sec > 0.0).then(|| RateLimiter {
            per_sec,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub fn check(&self, key: &str) -> Decision {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Decision {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > SWEEP_AT {
            buckets.retain(|_, b| now.duration_since(b.at) < IDLE);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        let reset = if allowed {
            (self.burst - bucket.tokens) / self.per_sec
        } else {
            (1.0 - bucket.tokens) / self.per_sec
        };
        Decision {
            allowed,
            limit: self.burst as u64,
            remaining: bucket.tokens.floor().max(0.0) as u64,
            reset_secs: reset.ceil().max(if allowed { 0.0 } else { 1.0 }) as u64,
        }
    }
}

impl Decision {
    fn write(&self, headers: &mut HeaderMap) {
        headers.insert(LIMIT.clone(), HeaderValue::from(self.limit));
        headers.insert(REMAINING.clone(), HeaderValue::from(self.remaining));
        headers.insert(RESET.clone(), HeaderValue::from(self.reset_secs));
    }

    /// The 429 for a refused request.
    pub fn refusal(&self) -> Response {
        let mut response = ApiError::RateLimited {
            retry_after_secs: self.reset_secs.max(1),
        }
        .into_response();
        self.write(response.headers_mut());
        response
    }
}

/// The API's request limits.
#[derive(Debug)]
pub struct Limits {
    auth: Arc<Auth>,
    per_token: Option<RateLimiter>,
    per_ip: Option<RateLimiter>,
    login: Option<RateLimiter>,
    trust_forwarded_for: bool,
}

impl Limits {
    pub fn new(auth: Arc<Auth>, cfg: &HttpConfig) -> Self {
        let per_min = f64::from(cfg.login_attempts_per_minute);
        Limits {
            auth,
            per_token: RateLimiter::new(
                f64::from(cfg.rate_limit_per_token),
                2.0 * f64::from(cfg.rate_limit_per_token),
            ),
            per_ip: RateLimiter::new(
                f64::from(cfg.rate_limit_per_ip),
                2.0 * f64::from(cfg.rate_limit_per_ip),
            ),
            login: RateLimiter::new(per_min / 60.0, per_min),
            trust_forwarded_for: cfg.trust_forwarded_for,
        }
    }

    /// Login attempts, by username and by client address: the stricter
    /// verdict wins. `None` when login is not limited.
    pub fn login_attempt(&self, username: &str, client: &str) -> Option<Decision> {
        let limiter = self.login.as_ref()?;
        let by_user = limiter.check(&format!("user:{username}"));
        let by_ip = limiter.check(&format!("ip:{client}"));
        Some(if !by_user.allowed || by_user.remaining < by_ip.remaining {
            by_user
        } else {
            by_ip
        })
    }
}

impl Limits {
    /// The client's address: the peer's, or behind a trusted reverse proxy
    /// (`YMERA_TRUST_FORWARDED_FOR`), the last address of
    /// `X-Forwarded-For`: the one that proxy saw (earlier entries are the
    /// client's own say and can be forged).
    pub fn client_address(
        &self,
        extensions: &axum::http::Extensions,
        headers: &HeaderMap,
    ) -> String {
        if self.trust_forwarded_for
            && let Some(ip) = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
        {
            return ip.to_string();
        }
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
    }
}

/// Middleware: limits each token (or, without a valid one, each address).
/// With no limit set it leaves the token alone: the handler's extractor
/// verifies it if the route needs one.
pub async fn rate_limit(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if limits.per_token.is_none() && limits.per_ip.is_none() {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let decision = match auth::authenticate(&mut parts, &limits.auth) {
        Ok(claims) => limits
            .per_token
            .as_ref()
            .map(|l| l.check(&format!("sub:{}", claims.sub))),
        Err(_) => limits.per_ip.as_ref().map(|l| {
            l.check(&format!(
                "ip:{}",
                limits.client_address(&parts.extensions, &parts.headers)
            ))
        }),
    };
    let req = Request::from_parts(parts, body);
    match decision {
        None => next.run(req).await,
        Some(d) if !d.allowed => d.refusal(),
        Some(d) => {
            let mut response = next.run(req).await;
            d.write(response.headers_mut());
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_refill() {
        let l = RateLimiter::new(2.0, 4.0).unwrap();
        let t0 = Instant::now();
        for i in 0..4 {
            let d = l.check_at("k", t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 3 - i);
        }
        let refused = l.check_at("k", t0);
        assert!(!refused.allowed);
        assert_eq!(refused.reset_secs, 1);
        assert!(l.check_at("other", t0).allowed, "keys are independent");
        assert!(
            l.check_at("k", t0 + Duration::from_millis(600)).allowed,
            "refilled at 2/s"
        );
        assert!(RateLimiter::new(0.0, 10.0).is_none(), "0 means no limit");
    }
}
