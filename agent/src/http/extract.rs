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

/// The body, or `None` when it is empty, only whitespace or JSON `null` (the OpenAPI document
/// offers `null` for every optional body).
async fn body<S: Send + Sync>(req: Request, state: &S) -> Result<Option<Bytes>, AgentError> {
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            AgentError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    Ok(Some(bytes).filter(|b| {
        let text = b.trim_ascii();
        !text.is_empty() && text != b"null"
    }))
}

/// Parses a body. No request in this API holds a list, and serde would read a struct (or an
/// internally tagged enum) from an array of its fields in order, so `[]` would pass as "all
/// defaults" and `["x"]` as `{"path": "x"}`: an array anywhere in a body is refused, naming
/// where. `request_schemas_hold_no_list` in the OpenAPI tests keeps this true.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AgentError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AgentError::BadRequest(format!("invalid JSON body: {e}")))?;
    if let Some(at) = array_in(&value, "") {
        return Err(AgentError::BadRequest(format!(
            "invalid JSON body: {} is an array; request bodies and their fields are objects \
             or single values (see docs/openapi.json)",
            if at.is_empty() {
                "the body".to_string()
            } else {
                format!("field `{at}`")
            }
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| AgentError::BadRequest(format!("invalid JSON body: {e}")))
}

/// The path of the first array in `value`, `""` for the value itself.
fn array_in(value: &serde_json::Value, at: &str) -> Option<String> {
    match value {
        serde_json::Value::Array(_) => Some(at.to_string()),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            array_in(
                v,
                &if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                },
            )
        }),
        _ => None,
    }
}

/// The answer to a body over [`super::MAX_BODY_BYTES`].
pub fn too_large() -> AgentError {
    AgentError::PayloadTooLarge(format!(
        "the request body is larger than {} bytes",
        super::MAX_BODY_BYTES
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgpilot_common::api::{RestoreRequest, ShutdownRequest, WalPushRequest};

    fn message(r: Result<impl std::fmt::Debug, AgentError>) -> String {
        match r {
            Err(AgentError::BadRequest(m)) => m,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn arrays_are_refused_where_serde_would_read_them_as_structs() {
        let m = message(parse::<ShutdownRequest>(b"[]"));
        assert!(m.contains("the body is an array"), "{m}");
        let m = message(parse::<WalPushRequest>(br#"["pg_wal/x"]"#));
        assert!(m.contains("the body is an array"), "{m}");
        let m = message(parse::<RestoreRequest>(br#"{"target": ["latest"]}"#));
        assert!(m.contains("field `target` is an array"), "{m}");
        let m = message(parse::<Option<ShutdownRequest>>(br#"{"mode": ["fast"]}"#));
        assert!(m.contains("field `mode` is an array"), "{m}");
    }

    #[test]
    fn objects_and_null_still_parse() {
        let r: ShutdownRequest = parse(br#"{"mode":"immediate"}"#).unwrap();
        assert_eq!(r.mode, pgpilot_common::api::ShutdownMode::Immediate);
        let m = message(parse::<WalPushRequest>(br#"{"path": 1}"#));
        assert!(m.contains("invalid type"), "{m}");
    }
}
