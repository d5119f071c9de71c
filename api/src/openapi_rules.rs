//! What the handlers' annotations cannot say, added to the generated OpenAPI document:
//! the statuses every route can answer because of the layers around it (the TCP guard,
//! the JSON body extractor, the round trip to the VMM), the bearer-token scheme of the
//! TCP endpoint, and the ranges the server enforces on fields whose types another crate
//! owns (taken from the owners' constants, so they cannot drift).

use std::collections::BTreeMap;
use utoipa::openapi::path::Operation;

use utoipa::openapi::schema::{AdditionalProperties, Object, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};
use utoipa::Number;

use crate::scenario::{MAX_BALLOON_HOLD_MS, MAX_DURATION_S, MAX_FILL_MIB, MAX_WRITES_PER_S};
use crate::types::{MAX_BOOT_ARGS_LEN, MAX_MEM_SIZE_MIB, MAX_PATH_LEN, MAX_VM_ID_LEN};

/// Name of the bearer-token security scheme.
pub const BEARER: &str = "bearer";
/// The path that answers without asking the VMM.
const STATIC_PATHS: &[&str] = &["/openapi.json"];
/// A string without NUL characters.
const NO_NUL: &str = "^[^\\u0000]*$";

fn fault(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("FaultResponse"))).build();
    ResponseBuilder::new().description(description).content("application/json", content).build().into()
}

fn unauthorized() -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("FaultResponse"))).build();
    let challenge = HeaderBuilder::new()
        .schema(Object::with_type(Type::String))
        .description(Some("`Bearer realm=\"densevm\"`"))
        .build();
    ResponseBuilder::new()
        .description("TCP only: no or a wrong bearer token")
        .content("application/json", content)
        .header("WWW-Authenticate", challenge)
        .build()
        .into()
}

/// Adds the statuses the layers around `op` can answer, keeping the handler's own.
fn add_layer_statuses(path: &str, op: &mut Operation) {
    let responses = &mut op.responses.responses;
    let mut add = |status: &str, r: RefOr<Response>| {
        responses.entry(status.to_string()).or_insert(r);
    };
    add("400", fault("Bad request (on TCP also: no Host header)"));
    add("401", unauthorized());
    add("421", fault("TCP only: the Host header does not name this server"));
    if op.request_body.is_some() {
        add("408", fault("The body did not arrive in time"));
        add("413", fault("Body too large"));
        add("415", fault("The body is not sent as application/json"));
    }
    if !STATIC_PATHS.contains(&path) {
        add("500", fault("Internal error"));
        add("503", fault("VMM unavailable or too slow to answer"));
    }
}

fn property<'a>(doc: &'a mut OpenApi, schema: &str, field: &str) -> Option<&'a mut Object> {
    let components = doc.components.as_mut()?;
    let RefOr::T(Schema::Object(object)) = components.schemas.get_mut(schema)? else {
        return None;
    };
    match object.properties.get_mut(field)? {
        RefOr::T(Schema::Object(p)) => Some(p),
        _ => None,
    }
}

/// A range to document on a property.
enum Rule {
    /// `minimum`/`maximum`.
    Range(Number, Number),
    /// `minLength`/`maxLength` and a pattern.
    Text(usize, usize, &'static str),
}

/// The ranges the server enforces on properties whose schemas other crates generate,
/// as (schema, property, rule).
fn rules() -> Vec<(&'static str, &'static str, Rule)> {
    let uint = |v: u64| Number::UInt(usize::try_from(v).unwrap_or(usize::MAX));
    let fraction = || Rule::Range(Number::Int(0), Number::Int(1));
    let path = || Rule::Text(1, MAX_PATH_LEN, NO_NUL);
    vec![
        ("Scenario", "fill_mib", Rule::Range(uint(1), uint(u64::from(MAX_FILL_MIB)))),
        ("Scenario", "zero_fraction", fraction()),
        ("Scenario", "shared_fraction", fraction()),
        ("Scenario", "write_fraction", fraction()),
        ("Scenario", "writes_per_s", Rule::Range(uint(0), uint(MAX_WRITES_PER_S))),
        ("Scenario", "duration_s", Rule::Range(uint(0), uint(MAX_DURATION_S))),
        ("Scenario", "balloon_hold_ms", Rule::Range(uint(0), uint(MAX_BALLOON_HOLD_MS))),
        ("Scenario", "balloon_oom_deflate_mib", Rule::Range(uint(0), uint(u64::from(MAX_FILL_MIB)))),
        ("KernelBoot", "kernel_image_path", path()),
        ("KernelBoot", "initrd_path", path()),
        ("KernelBoot", "boot_args", Rule::Text(0, MAX_BOOT_ARGS_LEN, NO_NUL)),
        ("VmConfig", "memory_image_path", path()),
        ("BalloonSpec", "amount_mib", Rule::Range(uint(0), uint(u64::from(MAX_MEM_SIZE_MIB)))),
        ("BalloonSpec", "stats_polling_interval_s", Rule::Range(uint(0), uint(u64::from(u16::MAX)))),
        ("MergeSettings", "domain", Rule::Text(1, MAX_VM_ID_LEN, "^[A-Za-z0-9_-]{1,64}$")),
    ]
}

/// Completes `doc`: layer statuses on every operation, the bearer scheme, the ranges.
pub fn complete(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            add_layer_statuses(path, op);
        }
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(BEARER.into(), SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    for (schema, field, rule) in rules() {
        let Some(p) = property(doc, schema, field) else {
            tracing::warn!("OpenAPI: no property {schema}.{field} to document its range on");
            continue;
        };
        match rule {
            Rule::Range(min, max) => {
                p.minimum = Some(min);
                p.maximum = Some(max);
            }
            Rule::Text(min, max, pattern) => {
                p.min_length = Some(min);
                p.max_length = Some(max);
                p.pattern = Some(pattern.into());
            }
        }
    }
    open_flattened_parts(doc);
}

/// A `#[serde(flatten)]` of a struct that denies unknown fields (a request body
/// elsewhere) comes out as an `allOf` holding a closed schema, which no value of
/// the whole satisfies: such parts are inlined as open objects.
fn open_flattened_parts(doc: &mut OpenApi) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let closed: BTreeMap<String, Object> = components
        .schemas
        .iter()
        .filter_map(|(name, schema)| match schema {
            RefOr::T(Schema::Object(o))
                if matches!(o.additional_properties.as_deref(), Some(AdditionalProperties::FreeForm(false))) =>
            {
                Some((name.clone(), o.clone()))
            }
            _ => None,
        })
        .collect();
    for schema in components.schemas.values_mut() {
        let RefOr::T(Schema::AllOf(all)) = schema else {
            continue;
        };
        for item in all.items.iter_mut() {
            let RefOr::Ref(r) = item else {
                continue;
            };
            if let Some(part) = r.ref_location.rsplit('/').next().and_then(|name| closed.get(name)) {
                let mut open = part.clone();
                open.additional_properties = None;
                *item = RefOr::T(Schema::Object(open));
            }
        }
    }
}
