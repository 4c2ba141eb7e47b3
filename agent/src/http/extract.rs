//! Request body extraction with errors in the API's own body. An empty body means "all
//! defaults" for routes whose request fields are all optional.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::AgentError;

/// A JSON body; an empty body yields `T::default()`. Malformed JSON, a wrong field type or an
/// unknown field get 400 with serde's message (which names the field, line and column).
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = AgentError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| AgentError::BadRequest(format!("cannot read the request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptionalJson)
            .map_err(|e| AgentError::BadRequest(format!("invalid JSON body: {e}")))
    }
}
