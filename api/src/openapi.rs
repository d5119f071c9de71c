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
                       Errors are `{\"fault_message\": \"...\"}`.\n\n\
                       Served on a Unix socket (mode 0600: its permissions are the access \
                       control; no token) and optionally on TCP, where every request needs \
                       `Authorization: Bearer <token>` (401 otherwise) and a `Host` naming \
                       the server (421 otherwise).\n\n\
                       Request bodies are JSON objects (arrays are refused where objects are \
                       expected) sent with `Content-Type: application/json` (415 otherwise); \
                       unknown fields are refused. An integer may be written with a zero \
                       fraction (`16252.0`), as JSON Schema's `integer` allows.",
        license(name = "Apache-2.0"),
    ),
    components(schemas(FaultResponse)),
    tags(
        (name = "host", description = "Version, host facts, metrics, this document"),
        (name = "vms", description = "microVM life cycle"),
        (name = "domains", description = "Merge domains: declared with a policy before a VM may join one; \
            only VMs of one domain share frames"),
        (name = "memory", description = "Memory statistics, merge and compaction tuning"),
        (name = "balloon", description = "A VM's virtio-balloon, shaped like Firecracker's balloon API, and the host memory budget policy over every balloon"),
    )
)]
pub struct ApiDoc;

/// The complete OpenAPI document of the server.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = crate::routes::router_parts().1;
    crate::openapi_rules::complete(&mut doc);
    doc
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

    /// A schema that forbids other properties cannot be a part of an `allOf` (a
    /// `#[serde(flatten)]` of it): every value of the whole would violate it, as
    /// schemathesis found for `GET /memory/balloon-policy`.
    #[test]
    fn no_closed_schema_is_flattened_into_another() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for (name, schema) in schemas {
            for part in schema["allOf"].as_array().into_iter().flatten() {
                let Some(target) = part["$ref"].as_str().and_then(|r| r.rsplit('/').next()) else { continue };
                assert_ne!(
                    schemas[target]["additionalProperties"],
                    serde_json::Value::Bool(false),
                    "{name} flattens {target}, which allows no other properties"
                );
            }
        }
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
            "BalloonPolicyStatus",
            "BalloonPolicyPatch",
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

    /// Statuses each operation can answer: its own, plus those of the layers around it
    /// (400/401/421 from the TCP guard, 408/413/415 from the body extractor, 500/503 from
    /// the round trip to the VMM).
    #[test]
    fn every_operation_lists_the_statuses_it_can_answer() {
        const GUARD: &[u16] = &[400, 401, 421];
        const VMM: &[u16] = &[500, 503];
        const BODY: &[u16] = &[408, 413, 415];
        let table: &[(&str, &str, &[u16], bool, bool)] = &[
            // (method, path, own statuses, asks the VMM, takes a body)
            ("get", "/", &[200], true, false),
            ("get", "/vms", &[200], true, false),
            ("put", "/vms/{vm_id}", &[204, 409], true, true),
            ("get", "/vms/{vm_id}", &[200, 404], true, false),
            ("delete", "/vms/{vm_id}", &[204, 404, 409], true, false),
            ("put", "/vms/{vm_id}/actions", &[204, 404, 409], true, true),
            ("get", "/vms/{vm_id}/memory", &[200, 404], true, false),
            ("put", "/vms/{vm_id}/balloon", &[204, 404, 409], true, true),
            ("patch", "/vms/{vm_id}/balloon", &[204, 404], true, true),
            ("get", "/vms/{vm_id}/balloon", &[200, 404], true, false),
            ("get", "/vms/{vm_id}/balloon/statistics", &[200, 404], true, false),
            ("patch", "/vms/{vm_id}/balloon/statistics", &[204, 404], true, true),
            ("get", "/memory", &[200], true, false),
            ("get", "/memory/merge", &[200], true, false),
            ("patch", "/memory/merge", &[200, 409], true, true),
            ("put", "/memory/merge/actions", &[204, 409], true, true),
            ("get", "/memory/compaction", &[200], true, false),
            ("patch", "/memory/compaction", &[200], true, true),
            ("put", "/memory/compaction/actions", &[200, 409], true, true),
            ("get", "/memory/balloon-policy", &[200], true, false),
            ("patch", "/memory/balloon-policy", &[200], true, true),
            ("get", "/metrics", &[200], true, false),
            ("get", "/openapi.json", &[200], false, false),
            ("get", "/domains", &[200], true, false),
            ("put", "/domains/{domain_name}", &[204, 409], true, true),
            ("get", "/domains/{domain_name}", &[200, 404], true, false),
            ("delete", "/domains/{domain_name}", &[204, 404, 409], true, false),
        ];
        let doc: serde_json::Value = serde_json::to_value(openapi()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some((_, _, own, vmm, body)) = table.iter().find(|(m, p, ..)| m == method && p == path) else {
                    panic!("{method} {path} is not in the table");
                };
                seen += 1;
                let mut want: BTreeSet<u16> = own.iter().chain(GUARD).copied().collect();
                if *vmm {
                    want.extend(VMM);
                }
                if *body {
                    want.extend(BODY);
                }
                let documented: BTreeSet<u16> =
                    op["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
                assert_eq!(documented, want, "{method} {path}: documented (left) vs table (right)");
                for (status, r) in op["responses"].as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &r["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(schema, "#/components/schemas/FaultResponse", "{method} {path} {status}");
                    }
                }
                assert!(
                    op["responses"]["401"]["headers"].get("WWW-Authenticate").is_some(),
                    "{method} {path}: 401 without its challenge header"
                );
            }
        }
        assert_eq!(seen, table.len(), "operations in the table but not in the document");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
    }

    /// Every field the server validates carries its range in the document, with the
    /// owners' limits.
    #[test]
    fn every_validated_field_has_its_range() {
        use crate::scenario::{MAX_BALLOON_HOLD_MS, MAX_DURATION_S, MAX_FILL_MIB, MAX_WRITES_PER_S};
        use crate::types::{MAX_BOOT_ARGS_LEN, MAX_MEM_SIZE_MIB, MAX_PATH_LEN, MAX_VCPU_COUNT, MAX_VM_ID_LEN};
        let doc: serde_json::Value = serde_json::to_value(openapi()).unwrap();
        let prop = |s: &str, f: &str| doc["components"]["schemas"][s]["properties"][f].clone();
        let range = |s: &str, f: &str| {
            let p = prop(s, f);
            (p["minimum"].as_f64(), p["maximum"].as_f64())
        };
        let num = |v: u64| Some(v as f64);
        for (s, f, min, max) in [
            ("VmConfig", "vcpu_count", 1, u64::from(MAX_VCPU_COUNT)),
            ("VmConfig", "mem_size_mib", 1, u64::from(MAX_MEM_SIZE_MIB)),
            ("Scenario", "fill_mib", 1, u64::from(MAX_FILL_MIB)),
            ("Scenario", "zero_fraction", 0, 1),
            ("Scenario", "shared_fraction", 0, 1),
            ("Scenario", "write_fraction", 0, 1),
            ("Scenario", "writes_per_s", 0, MAX_WRITES_PER_S),
            ("Scenario", "duration_s", 0, MAX_DURATION_S),
            ("Scenario", "balloon_hold_ms", 0, MAX_BALLOON_HOLD_MS),
            ("Scenario", "balloon_oom_deflate_mib", 0, u64::from(MAX_FILL_MIB)),
            ("BalloonSpec", "amount_mib", 0, u64::from(MAX_MEM_SIZE_MIB)),
            ("BalloonSpec", "stats_polling_interval_s", 0, u64::from(u16::MAX)),
            ("BalloonUpdate", "amount_mib", 0, u64::from(MAX_MEM_SIZE_MIB)),
            ("BalloonStatsUpdate", "stats_polling_interval_s", 1, u64::from(u16::MAX)),
            ("DomainPolicy", "max_vms", 1, u64::from(crate::types::MAX_DOMAIN_VMS)),
        ] {
            assert_eq!(range(s, f), (num(min), num(max)), "{s}.{f}");
        }
        for (s, f, min, max) in [
            ("KernelBoot", "kernel_image_path", 1, MAX_PATH_LEN),
            ("KernelBoot", "initrd_path", 1, MAX_PATH_LEN),
            ("KernelBoot", "boot_args", 0, MAX_BOOT_ARGS_LEN),
            ("VmConfig", "memory_image_path", 1, MAX_PATH_LEN),
            ("MergeSettings", "domain", 1, MAX_VM_ID_LEN),
        ] {
            let p = prop(s, f);
            assert_eq!(
                (p["minLength"].as_u64(), p["maxLength"].as_u64()),
                (Some(min as u64), Some(max as u64)),
                "{s}.{f}"
            );
            assert!(p["pattern"].is_string(), "{s}.{f}");
        }
        // The vm_id and domain_name path parameters of every operation that has one.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for param in op["parameters"].as_array().into_iter().flatten() {
                    assert_eq!(param["schema"]["pattern"], "^[A-Za-z0-9_-]{1,64}$", "{method} {path}");
                }
            }
        }
        // (The merge and compaction tunables' ranges: types::memory's tests; the
        // balloon policy's: types::balloon's.)
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
                "/domains",
                "/domains/{domain_name}",
                "/memory",
                "/memory/balloon-policy",
                "/memory/compaction",
                "/memory/compaction/actions",
                "/memory/merge",
                "/memory/merge/actions",
                "/metrics",
                "/openapi.json",
                "/vms",
                "/vms/{vm_id}",
                "/vms/{vm_id}/actions",
                "/vms/{vm_id}/balloon",
                "/vms/{vm_id}/balloon/statistics",
                "/vms/{vm_id}/memory",
            ]
        );
        let methods = [Method::GET, Method::PUT, Method::POST, Method::PATCH, Method::DELETE];
        let mut routed = BTreeSet::new();
        for path in &paths {
            let uri = path.replace("{vm_id}", "vm1").replace("{domain_name}", "d1");
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
        for uri in ["/nope", "/vms/a/b/c", "/memory/merge/x", "/memory/compaction/x", "/domains/a/b"] {
            let req = Request::get(uri).body(Body::empty()).unwrap();
            let status = app.clone().oneshot(req).await.unwrap().status();
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
    }
}
