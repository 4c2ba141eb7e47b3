//! Bearer-token authentication for routes that change state.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::core::Handle;
use crate::error::AgentError;

/// Compares digests of the presented and expected tokens in constant time, so neither the
/// content nor the length of the token leaks through timing.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

pub async fn require_token(
    State(h): State<Handle>,
    req: Request,
    next: Next,
) -> Result<Response, AgentError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .ok_or_else(|| {
            AgentError::Unauthorized(
                "this route requires an Authorization: Bearer <token> header".into(),
            )
        })?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            AgentError::Unauthorized("the Authorization header must be \"Bearer <token>\"".into())
        })?;
    if !token_matches(presented.trim(), h.ctx.api_token.expose()) {
        tracing::warn!(path = %req.uri().path(), "API request with a wrong bearer token refused");
        return Err(AgentError::Unauthorized(
            "the bearer token is not valid".into(),
        ));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn compares_tokens() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("abcd", "abc"));
        assert!(!token_matches("", "abc"));
    }
}
