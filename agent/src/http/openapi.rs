//! The OpenAPI document of the agent's API, generated from the route annotations and the API
//! types in `pgpilot-common`. Committed as docs/openapi.json; a test fails when the committed
//! copy differs from what the code generates (`UPDATE_OPENAPI=1` rewrites it).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes::{
    backups, drain, lifecycle, metrics, probes, replication, restore, status, wal,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "pgpilot-agent API", description = "The HTTP API of pgpilot-agent. Probes, /metrics and \
        /v1/status are open; routes that change state need `Authorization: Bearer <token>`. Every error \
        has the ErrorBody shape."),
    paths(
        probes::healthz, probes::readyz, probes::startupz, probes::primary, probes::replica,
        metrics::metrics, status::status,
        lifecycle::stop, lifecycle::start, lifecycle::restart, lifecycle::reload,
        wal::push, wal::fetch, wal::switch, restore::restore,
        backups::start, backups::list, backups::get,
        replication::register, replication::switchover, replication::promote,
        replication::demote, replication::follow, replication::reinitialize,
        drain::start, drain::get, drain::cancel,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every route that takes the token may answer 429: too many wrong tokens from the
        // peer (pod-IP listener), with Retry-After; the body is the 401's ErrorBody.
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                if let Some(unauthorized) = op.responses.responses.get("401").cloned() {
                    op.responses
                        .responses
                        .entry("429".into())
                        .or_insert(unauthorized);
                }
            }
        }
    }
}

/// The document as pretty JSON, with a trailing newline (as committed).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut s = doc.to_pretty_json().expect("OpenAPI document serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = super::document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p pgpilot-agent openapi` and commit it"
        );
    }

    /// `http::extract` refuses an array anywhere in a request body (serde would read a struct
    /// from one); that holds only while no request schema has a list in it.
    #[test]
    fn request_schemas_hold_no_list() {
        use serde_json::Value;
        let doc: Value = serde_json::from_str(&super::document()).unwrap();
        fn walk(doc: &Value, v: &Value, at: &str, seen: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    assert_ne!(
                        m.get("type"),
                        Some(&Value::from("array")),
                        "{at} holds a list"
                    );
                    if let Some(Value::Array(types)) = m.get("type") {
                        assert!(!types.contains(&Value::from("array")), "{at} holds a list");
                    }
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let name = r.trim_start_matches("#/components/schemas/").to_string();
                        if !seen.contains(&name) {
                            seen.push(name.clone());
                            walk(doc, &doc["components"]["schemas"][&name], &name, seen);
                        }
                    }
                    for (k, x) in m {
                        walk(doc, x, &format!("{at}.{k}"), seen);
                    }
                }
                Value::Array(xs) => xs.iter().for_each(|x| walk(doc, x, at, seen)),
                _ => {}
            }
        }
        let mut bodies = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                if let Some(body) = op.get("requestBody") {
                    bodies += 1;
                    walk(&doc, body, &format!("{method} {path}"), &mut Vec::new());
                }
            }
        }
        assert!(bodies >= 10, "only {bodies} request bodies found");
    }
}
