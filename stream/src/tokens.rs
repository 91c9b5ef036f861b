//! Single-use request tokens (kubelet's request cache): 8 characters of URL-safe
//! base64 from 6 random bytes, valid for one minute, at most 1000 waiting.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How long a token stays valid.
pub const TTL: Duration = Duration::from_secs(60);
/// Most tokens held at once.
pub const MAX_IN_FLIGHT: usize = 1000;

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// 1000 requests are already waiting (gRPC ResourceExhausted).
    #[error("maximum number of in-flight requests exceeded")]
    TooManyInFlight,
    /// The random source kept colliding.
    #[error("failed to generate unique token")]
    NoUniqueToken,
}

struct Entry<T> {
    token: String,
    req: T,
    expires: Instant,
}

/// The cache; newest entries at the front.
pub struct RequestCache<T> {
    entries: Mutex<VecDeque<Entry<T>>>,
    ttl: Duration,
}

impl<T> Default for RequestCache<T> {
    fn default() -> Self {
        RequestCache::with_ttl(TTL)
    }
}

impl<T> RequestCache<T> {
    /// A cache whose tokens live `ttl` (tests use a short one).
    pub fn with_ttl(ttl: Duration) -> RequestCache<T> {
        RequestCache {
            entries: Mutex::new(VecDeque::new()),
            ttl,
        }
    }

    /// Stores a request; returns its token.
    pub fn insert(&self, req: T) -> Result<String, TokenError> {
        let now = Instant::now();
        let mut q = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while q.back().is_some_and(|e| now > e.expires) {
            q.pop_back();
        }
        if q.len() >= MAX_IN_FLIGHT {
            return Err(TokenError::TooManyInFlight);
        }
        for _ in 0..10 {
            let bytes: [u8; 6] = rand::random();
            let token = URL_SAFE_NO_PAD.encode(bytes);
            if q.iter().all(|e| e.token != token) {
                q.push_front(Entry {
                    token: token.clone(),
                    req,
                    expires: now + self.ttl,
                });
                return Ok(token);
            }
        }
        Err(TokenError::NoUniqueToken)
    }

    /// Takes the request of a token: once only, and only before it expires.
    pub fn consume(&self, token: &str) -> Option<T> {
        let mut q = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let i = q.iter().position(|e| e.token == token)?;
        let e = q.remove(i)?;
        (Instant::now() <= e.expires).then_some(e.req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_short_and_expire() {
        let c = RequestCache::default();
        let t = c.insert(7).unwrap();
        assert_eq!(t.len(), 8);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(c.consume("nope"), None);
        assert_eq!(c.consume(&t), Some(7));
        assert_eq!(c.consume(&t), None, "reused");
        let short = RequestCache::with_ttl(Duration::from_millis(20));
        let t = short.insert(1).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(short.consume(&t), None, "expired");
    }

    #[test]
    fn at_most_1000_in_flight() {
        let c = RequestCache::default();
        for i in 0..MAX_IN_FLIGHT {
            c.insert(i).unwrap();
        }
        assert_eq!(c.insert(0), Err(TokenError::TooManyInFlight));
        let short = RequestCache::with_ttl(Duration::from_millis(10));
        for i in 0..MAX_IN_FLIGHT {
            short.insert(i).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(short.insert(0).is_ok(), "expired ones are collected");
    }
}
