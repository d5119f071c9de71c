//! The OpenAPI 3 document, generated from the handlers' annotations and the wire types.

use utoipa::OpenApi;

use crate::types::FaultResponse;

/// Document metadata; the paths are added from the handlers' annotations when the router
/// is built.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "densevm",
        description = "KVM microVM monitor with VMM-side memory merging and compaction. \
                       Errors are `{\"fault_message\": \"...\"}`.",
        license(name = "Apache-2.0"),
    ),
    components(schemas(FaultResponse)),
    tags(
        (name = "host", description = "Version, host facts, metrics, this document"),
        (name = "vms", description = "microVM life cycle"),
        (name = "memory", description = "Memory statistics, merge and compaction tuning"),
    )
)]
pub struct ApiDoc;

/// The complete OpenAPI document of the server.
pub fn openapi() -> utoipa::openapi::OpenApi {
    crate::routes::router_parts().1
}

/// The document as pretty-printed JSON with a trailing newline (the form of
/// `api/openapi.json`).
pub fn openapi_json() -> String {
    let mut s = openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize: {e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::state::{AppState, Limits};

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

    #[test]
    fn checked_in_document_is_current() {
        let generated = openapi_json();
        if std::env::var_os("DENSEVM_UPDATE_OPENAPI").is_some() {
            std::fs::write(CHECKED_IN, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(
            on_disk == generated,
            "api/openapi.json differs from the document the server generates; regenerate it \
             with:\n  DENSEVM_UPDATE_OPENAPI=1 cargo test -p api --lib openapi\nand commit it"
        );
    }

    #[test]
    fn document_basics() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for s in [
            "VmConfig",
            "Scenario",
            "HostMemoryStats",
            "MergeConfigPatch",
            "CompactionConfig",
            "CompactionConfigPatch",
            "CompactionReport",
            "CompactionStats",
            "FaultResponse",
        ] {
            assert!(schemas.contains_key(s), "schema {s} missing");
        }
        // VmConfig's required fields and ranges come from the types.
        let vm = &schemas["VmConfig"];
        assert_eq!(vm["properties"]["vcpu_count"]["maximum"], 32);
        let req: Vec<_> = vm["required"].as_array().unwrap().iter().collect();
        assert_eq!(req.len(), 3, "{req:?}");
    }

    fn documented_routes() -> BTreeSet<(String, Method)> {
        let doc: serde_json::Value = serde_json::to_value(openapi()).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for m in item.as_object().unwrap().keys() {
                if let Ok(m) = m.to_uppercase().parse::<Method>() {
                    out.insert((path.clone(), m));
                }
            }
        }
        out
    }

    /// Probes the real router: a documented (path, method) must reach a handler (not
    /// 404/405); every other method on a documented path must be 405; an undocumented
    /// path must be 404.
    #[tokio::test]
    async fn router_matches_document() {
        // The VMM end is dropped: handlers answer 503 (or 400 for a bad body), which is
        // enough to tell that the route matched.
        let (chan, end) = crate::channel::channel().unwrap();
        drop(end);
        let limits =
            Limits { max_body_bytes: 1024, body_timeout: Duration::from_secs(5), vmm_timeout: Duration::from_secs(5) };
        let app = crate::routes::app(AppState::new(chan, limits, String::new()));
        let documented = documented_routes();
        let paths: BTreeSet<String> = documented.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            paths.iter().map(String::as_str).collect::<Vec<_>>(),
            [
                "/",
                "/memory",
                "/memory/compaction",
                "/memory/compaction/actions",
                "/memory/merge",
                "/memory/merge/actions",
                "/metrics",
                "/openapi.json",
                "/vms",
                "/vms/{vm_id}",
                "/vms/{vm_id}/actions",
                "/vms/{vm_id}/memory",
            ]
        );
        let methods = [Method::GET, Method::PUT, Method::POST, Method::PATCH, Method::DELETE];
        let mut routed = BTreeSet::new();
        for path in &paths {
            let uri = path.replace("{vm_id}", "vm1");
            for m in &methods {
                let req = Request::builder().method(m.clone()).uri(&uri).body(Body::from("{}")).unwrap();
                let status = app.clone().oneshot(req).await.unwrap().status();
                match status {
                    StatusCode::METHOD_NOT_ALLOWED => {}
                    StatusCode::NOT_FOUND => panic!("{m} {uri}: 404 for a documented path"),
                    _ => {
                        routed.insert((path.clone(), m.clone()));
                    }
                }
            }
        }
        assert_eq!(routed, documented, "router (left) vs OpenAPI document (right)");
        for uri in ["/nope", "/vms/a/b/c", "/memory/merge/x", "/memory/compaction/x"] {
            let req = Request::get(uri).body(Body::empty()).unwrap();
            let status = app.clone().oneshot(req).await.unwrap().status();
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
    }
}
