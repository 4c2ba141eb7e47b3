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
        match body(req, state).await? {
            None => Ok(OptionalJson(T::default())),
            Some(bytes) => parse(&bytes).map(OptionalJson),
        }
    }
}

/// A required JSON body: an empty one gets 400 saying a body is needed; malformed ones as
/// [`OptionalJson`].
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AgentError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match body(req, state).await? {
            None => Err(AgentError::BadRequest(
                "this route needs a JSON body (see docs/openapi.json)".into(),
            )),
            Some(bytes) => parse(&bytes).map(ApiJson),
        }
    }
}

/// The body, or `None` when it is empty or only whitespace.
async fn body<S: Send + Sync>(req: Request, state: &S) -> Result<Option<Bytes>, AgentError> {
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            AgentError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    Ok(Some(bytes).filter(|b| !b.iter().all(u8::is_ascii_whitespace)))
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AgentError::BadRequest(format!("invalid JSON body: {e}")))
}

/// The answer to a body over [`super::MAX_BODY_BYTES`].
pub fn too_large() -> AgentError {
    AgentError::PayloadTooLarge(format!(
        "the request body is larger than {} bytes",
        super::MAX_BODY_BYTES
    ))
}
