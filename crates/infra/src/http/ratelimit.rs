//! Rate limits: per token on the API (per client address before login),
//! and on login attempts (per client address, then per valid username).
//! Token buckets kept in this process, so with N copies of an API behind a
//! balancer a client gets up to N times the limit; that is a deliberate
//! trade for no shared state on the hot path. Every limiter's table is
//! bounded whatever clients send (see [`RateLimiter`]).
//!
//! Every limited response carries the `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers (IETF draft); a
//! refusal is a 429 problem with `Retry-After`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth::{Auth, Username};
use crate::config::HttpConfig;
use crate::http::auth;

static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Each limiter's table is split in this many shards, each behind its own
/// lock, so that concurrent requests rarely wait on one another.
const SHARDS: usize = 16;

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
///
/// Bounded by construction: keys are kept as a keyed 64-bit hash (a
/// client's key costs 8 bytes whatever its length, and a client cannot
/// aim collisions at another's bucket without the process's random hash
/// key), and at most `max_keys` buckets are kept (`YMERA_RATE_LIMIT_MAX_KEYS`).
/// A shard that is full first drops its buckets that have refilled to the
/// brim (they say nothing a fresh bucket would not), then, during a flood
/// of distinct keys, the least recently used ones: those keys start again
/// with a full burst, the price of a bounded table. Each clean-up leaves a
/// quarter of the shard free, so its cost is spread over many requests.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    keys: RandomState,
    shard_capacity: usize,
    shards: Box<[Mutex<HashMap<u64, Bucket>>]>,
}

impl RateLimiter {
    /// `None` when `per_sec` is 0: no limit. At most `max_keys` buckets.
    pub fn new(per_sec: f64, burst: f64, max_keys: usize) -> Option<Self> {
        (per_sec > 0.0).then(|| RateLimiter {
            per_sec,
            burst: burst.max(1.0),
            keys: RandomState::new(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(4),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    pub fn check(&self, key: impl Hash) -> Decision {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: impl Hash, now: Instant) -> Decision {
        let key = self.keys.hash_one(key);
        let shard = &self.shards[(key % SHARDS as u64) as usize];
        let mut buckets = shard.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.shard_capacity && !buckets.contains_key(&key) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
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

    /// Brings a full shard down to three quarters of its capacity: buckets
    /// that have refilled go first, then the least recently used.
    fn make_room(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        buckets.retain(|_, b| {
            b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec < self.burst
        });
        let keep = self.shard_capacity * 3 / 4;
        if buckets.len() > keep {
            let mut last_used: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            let evicted = last_used.len() - keep;
            let (_, cutoff, _) = last_used.select_nth_unstable(evicted - 1);
            let cutoff = *cutoff;
            buckets.retain(|_, b| b.at > cutoff);
        }
    }

    /// How many buckets are kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
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
    login_per_ip: Option<RateLimiter>,
    login_per_user: Option<RateLimiter>,
    trust_forwarded_for: bool,
}

impl Limits {
    pub fn new(auth: Arc<Auth>, cfg: &HttpConfig) -> Self {
        let per_min = f64::from(cfg.login_attempts_per_minute);
        let max_keys = cfg.rate_limit_max_keys;
        let login = || RateLimiter::new(per_min / 60.0, per_min, max_keys);
        Limits {
            auth,
            per_token: RateLimiter::new(
                f64::from(cfg.rate_limit_per_token),
                2.0 * f64::from(cfg.rate_limit_per_token),
                max_keys,
            ),
            per_ip: RateLimiter::new(
                f64::from(cfg.rate_limit_per_ip),
                2.0 * f64::from(cfg.rate_limit_per_ip),
                max_keys,
            ),
            login_per_ip: login(),
            login_per_user: login(),
            trust_forwarded_for: cfg.trust_forwarded_for,
        }
    }

    /// A login attempt (or another password check) from `client`: the
    /// refusal when that address has used up its attempts. Checked first,
    /// before anything the client sent is looked at, so that a refused
    /// client costs nothing more.
    pub fn login_from(&self, client: &str) -> Option<Decision> {
        let limiter = self.login_per_ip.as_ref()?;
        Some(limiter.check(client)).filter(|d| !d.allowed)
    }

    /// A password check for `username`: the refusal when that user's
    /// attempts are used up. Takes a [`Username`] only: a name that is not
    /// valid never becomes a key.
    pub fn login_as(&self, username: &Username) -> Option<Decision> {
        let limiter = self.login_per_user.as_ref()?;
        Some(limiter.check(username.as_str())).filter(|d| !d.allowed)
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
    let decision = match auth::authenticate(&mut parts, &limits.auth).await {
        Ok(claims) => limits
            .per_token
            .as_ref()
            .map(|l| l.check(claims.sub.as_str())),
        Err(_) => limits
            .per_ip
            .as_ref()
            .map(|l| l.check(limits.client_address(&parts.extensions, &parts.headers))),
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_refill() {
        let l = RateLimiter::new(2.0, 4.0, 100).unwrap();
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
        assert!(
            RateLimiter::new(0.0, 10.0, 100).is_none(),
            "0 means no limit"
        );
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_busiest_buckets() {
        let l = RateLimiter::new(1.0, 2.0, 1_600).unwrap();
        let t0 = Instant::now();
        // A drained bucket, touched last.
        for _ in 0..3 {
            l.check_at("victim", t0 + Duration::from_secs(1));
        }
        for i in 0..100_000u32 {
            l.check_at(i, t0);
        }
        assert!(l.len() <= 1_600, "{} buckets", l.len());
        assert!(
            !l.check_at("victim", t0 + Duration::from_secs(1)).allowed,
            "a recently used bucket survives a flood of others"
        );
    }
}
