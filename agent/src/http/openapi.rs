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
}
