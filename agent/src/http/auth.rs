//! Bearer-token authentication for routes that change state, with the failures counted by
//! reason and, on the pod-IP listener, a limit on wrong tokens per peer (docs/security.md).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::tls::Peer;
use crate::core::Handle;
use crate::error::AgentError;

/// Wrong tokens a peer may present within [`FAILURE_WINDOW`] before it is refused (429)
/// until the window ends. A missing credential is not counted: it guesses nothing.
pub const MAX_WRONG_TOKENS: u32 = 30;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at most; beyond, those whose window ended are forgotten.
const MAX_PEERS: usize = 4096;

/// Wrong tokens per peer address, in fixed windows.
#[derive(Default)]
pub struct Limiter {
    peers: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Limiter {
    /// `Some(seconds left)` when `peer` is over the limit now.
    fn refused(&self, peer: IpAddr, now: Instant) -> Option<u64> {
        let peers = self.peers.lock().expect("limiter");
        let (start, n) = peers.get(&peer)?;
        let left = FAILURE_WINDOW
            .checked_sub(now.duration_since(*start))
            .filter(|l| !l.is_zero())?;
        (*n >= MAX_WRONG_TOKENS).then(|| left.as_secs().max(1))
    }

    fn wrong_token(&self, peer: IpAddr, now: Instant) {
        let mut peers = self.peers.lock().expect("limiter");
        if peers.len() >= MAX_PEERS {
            peers.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
        }
        let entry = peers.entry(peer).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// Client certificates that authenticate on the pod-IP listener (`[tls] ca_file` set).
#[derive(Debug)]
pub struct Certificates {
    /// A verified certificate carrying one of these names authenticates.
    pub names: Vec<String>,
    /// Whether the bearer token also does.
    pub accept_token: bool,
}

/// The middleware's state: the agent, and the limiter of this listener (`None` on loopback,
/// where `wal-push` must never be locked out by a misbehaving local process), and the client
/// certificates it accepts (`None`: tokens only).
#[derive(Clone)]
pub struct Auth {
    pub h: Handle,
    pub limiter: Option<Arc<Limiter>>,
    pub certificates: Option<Arc<Certificates>>,
}

pub async fn require_token(
    State(auth): State<Auth>,
    req: Request,
    next: Next,
) -> Result<Response, AgentError> {
    let h = &auth.h;
    let failed = |reason: &str| {
        h.ctx
            .metrics
            .api_auth_failures
            .with_label_values(&[reason])
            .inc()
    };
    let info = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    let peer = info.as_ref().map(|p| p.addr.ip());
    if let Some(certs) = &auth.certificates {
        let names = info.as_ref().and_then(|p| p.cert_names.clone());
        match names {
            // Verified against the CA in the handshake; here only its name is checked.
            Some(names) if names.iter().any(|n| certs.names.contains(n)) => {
                return Ok(next.run(req).await);
            }
            Some(names) => {
                failed("bad_certificate");
                tracing::warn!(path = %req.uri().path(), peer = ?peer, names = ?names, "API request with a client certificate of another name refused");
                return Err(AgentError::Unauthorized(format!(
                    "the client certificate's names ({}) are not among those accepted ({})",
                    names.join(", "),
                    certs.names.join(", ")
                )));
            }
            None if !certs.accept_token => {
                failed("no_credential");
                return Err(AgentError::Unauthorized(format!(
                    "this route requires a client certificate named {}",
                    certs.names.join(" or ")
                )));
            }
            None => {}
        }
    }
    let now = Instant::now();
    if let (Some(limiter), Some(peer)) = (&auth.limiter, peer)
        && let Some(secs) = limiter.refused(peer, now)
    {
        failed("rate_limited");
        return Err(AgentError::TooManyRequests {
            message: format!(
                "too many wrong API tokens from {peer}: refused for {secs} s more \
                 (at most {MAX_WRONG_TOKENS} per {} s)",
                FAILURE_WINDOW.as_secs()
            ),
            retry_after_secs: secs,
        });
    }
    let Some(header) = req.headers().get(AUTHORIZATION) else {
        failed("no_credential");
        return Err(AgentError::Unauthorized(
            "this route requires an Authorization: Bearer <token> header".into(),
        ));
    };
    let Some(presented) = header.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        failed("malformed");
        return Err(AgentError::Unauthorized(
            "the Authorization header must be \"Bearer <token>\"".into(),
        ));
    };
    if !h.ctx.api_token.accepts(presented.trim()) {
        failed("wrong_token");
        if let (Some(limiter), Some(peer)) = (&auth.limiter, peer) {
            limiter.wrong_token(peer, now);
        }
        tracing::warn!(path = %req.uri().path(), peer = ?peer, "API request with a wrong bearer token refused");
        return Err(AgentError::Unauthorized(
            "the bearer token is not valid".into(),
        ));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::token_matches;

    #[test]
    fn compares_tokens() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("abcd", "abc"));
        assert!(!token_matches("", "abc"));
    }

    #[test]
    fn a_peer_over_the_limit_waits_for_its_window_and_others_do_not() {
        let l = Limiter::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..MAX_WRONG_TOKENS {
            assert_eq!(l.refused(a, t0), None, "attempt {i}");
            l.wrong_token(a, t0);
        }
        let left = l
            .refused(a, t0 + Duration::from_secs(10))
            .expect("over the limit");
        assert_eq!(left, 50);
        assert_eq!(l.refused(b, t0), None, "per peer");
        // The window ends: counted afresh.
        let later = t0 + FAILURE_WINDOW;
        assert_eq!(l.refused(a, later), None);
        l.wrong_token(a, later);
        assert_eq!(l.refused(a, later), None);
    }
}
