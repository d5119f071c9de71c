//! Request extractors whose rejections use the fault shape: a JSON body with size and
//! time limits, parse errors naming the offending field, and range validation; and
//! validated `{vm_id}` and `{domain_name}` path segments.
//!
//! A body must be sent as `Content-Type: application/json` (415 otherwise) and be a
//! JSON object; objects nested in it must be objects too (serde would also accept an
//! array for a struct, e.g. `[1, 8, {...}]` for a `VmConfig`). An integer may be written
//! with a zero fraction (`16252.0`), as JSON Schema's `integer` allows, up to 2^53.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use http_body_util::{BodyExt, LengthLimitError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::error::Category;
use serde_json::{Number, Value};

use crate::error::Error;
use crate::state::AppState;
use crate::types::{validate_vm_id, Validate};

/// A parsed and validated JSON request body.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

fn too_large(max: usize) -> Error {
    Error::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds the limit of {max} bytes"))
}

/// Largest integer an integral float (`16252.0`) is read as (2^53: every integer up to
/// it is exact in a double).
const MAX_INTEGRAL_FLOAT: f64 = 9_007_199_254_740_992.0;

/// How serde names a JSON value's type in its messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// Rewrites every integral float within ±2^53 as an integer (`16252.0` → `16252`).
fn integral_floats_to_integers(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() <= MAX_INTEGRAL_FLOAT) {
                // Exact: `f` is integral and within ±2^53.
                *n = if f >= 0.0 { Number::from(f as u64) } else { Number::from(f as i64) };
            }
        }
        Value::Array(a) => a.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(o) => o.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// The dotted path of the first array in `input` that was read as something else than
/// a sequence (i.e. as a struct), judged by where `parsed` (the value re-serialized)
/// has no array.
fn array_read_as_object(input: &Value, parsed: Option<&Value>, path: &mut Vec<String>) -> Option<String> {
    match input {
        Value::Array(items) => {
            let Some(Value::Array(out)) = parsed else {
                return Some(path.join("."));
            };
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                let found = array_read_as_object(item, out.get(i), path);
                path.pop();
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        Value::Object(fields) => {
            for (name, field) in fields {
                path.push(name.clone());
                let found = array_read_as_object(field, parsed.and_then(|p| p.get(name)), path);
                path.pop();
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        _ => None,
    }
}

/// Parses `bytes` as a `T` (a JSON object) and validates it.
pub fn parse_body<T: DeserializeOwned + Serialize + Validate>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::bad_request("request body is empty; a JSON object is expected"));
    }
    let mut input: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::bad_request(format!("malformed JSON: {e}")))?;
    if !input.is_object() {
        return Err(Error::bad_request(format!(
            "invalid request body: invalid type: {}, expected a JSON object",
            kind(&input)
        )));
    }
    integral_floats_to_integers(&mut input);
    let value: T = serde_path_to_error::deserialize(&input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => Error::bad_request(format!("malformed JSON: {inner}")),
            Category::Data if path == "." => Error::bad_request(format!("invalid request body: {inner}")),
            Category::Data => Error::bad_request(format!("invalid request body: {path}: {inner}")),
        }
    })?;
    let parsed = serde_json::to_value(&value).map_err(|e| Error::internal(format!("cannot re-serialize: {e}")))?;
    if let Some(path) = array_read_as_object(&input, Some(&parsed), &mut Vec::new()) {
        return Err(Error::bad_request(format!(
            "invalid request body: {path}: invalid type: sequence, expected a JSON object"
        )));
    }
    value.validate().map_err(|e| Error::bad_request(format!("invalid request body: {e}")))?;
    Ok(value)
}

/// Checks that the request declares a JSON body: 415 otherwise.
fn check_content_type(req: &Request) -> Result<(), Error> {
    let declared = req.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    let media_type = declared.map(|v| v.split(';').next().unwrap_or("").trim());
    if media_type.is_some_and(|m| m.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    Err(Error::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        match declared {
            Some(d) => format!("Content-Type {d:?} is not supported: send the body as application/json"),
            None => "no Content-Type: send the body as application/json".to_string(),
        },
    ))
}

impl<T> FromRequest<AppState> for JsonBody<T>
where
    T: DeserializeOwned + Serialize + Validate + Send,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        check_content_type(&req)?;
        let max = state.limits.max_body_bytes;
        let declared =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(too_large(max));
        }
        let body = http_body_util::Limited::new(req.into_body(), max);
        let bytes = match tokio::time::timeout(state.limits.body_timeout, body.collect()).await {
            Err(_) => {
                return Err(Error::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {:.1} s", state.limits.body_timeout.as_secs_f64()),
                ))
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large(max)),
            Ok(Err(e)) => return Err(Error::bad_request(format!("cannot read the request body: {e}"))),
            Ok(Ok(c)) => c.to_bytes(),
        };
        parse_body(&bytes).map(JsonBody)
    }
}

/// The `{vm_id}` path segment, checked against the id rules.
#[derive(Debug)]
pub struct VmId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Error::bad_request(format!("invalid path: {}", e.body_text())))?;
        validate_vm_id("vm_id", &id).map_err(|e| Error::bad_request(format!("invalid {e}")))?;
        Ok(VmId(id))
    }
}

/// The `{domain_name}` path segment, checked against the id rules (those of a VM id).
#[derive(Debug)]
pub struct DomainName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for DomainName {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Error::bad_request(format!("invalid path: {}", e.body_text())))?;
        validate_vm_id("domain_name", &name).map_err(|e| Error::bad_request(format!("invalid {e}")))?;
        Ok(DomainName(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MergeConfigPatch, VmConfig};

    fn msg<T: DeserializeOwned + Serialize + Validate + std::fmt::Debug>(body: &str) -> String {
        let e = parse_body::<T>(body.as_bytes()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        e.message
    }

    #[test]
    fn messages_name_the_problem() {
        assert!(msg::<VmConfig>("").contains("empty"));
        assert!(msg::<VmConfig>("{").contains("malformed JSON"));
        assert!(msg::<MergeConfigPatch>("{} x").contains("malformed JSON"));
        assert!(msg::<VmConfig>("{}").contains("missing field"));
        let m = msg::<VmConfig>(r#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":{"fill_mb":1}}}"#);
        assert!(m.contains("boot.workload") && m.contains("unknown field"), "{m}");
        let m = msg::<VmConfig>(r#"{"vcpu_count":"two","mem_size_mib":64,"boot":{"workload":{}}}"#);
        assert!(m.contains("vcpu_count") && m.contains("invalid type"), "{m}");
        let m = msg::<VmConfig>(r#"{"vcpu_count":64,"mem_size_mib":64,"boot":{"workload":{}}}"#);
        assert!(m.contains("vcpu_count: must be in 1..=32"), "{m}");
        let m = msg::<MergeConfigPatch>(r#"{"sleep_ms": -1}"#);
        assert!(m.contains("sleep_ms"), "{m}");
        assert!(parse_body::<MergeConfigPatch>(b"{}").is_ok());
    }

    #[test]
    fn bodies_and_nested_values_must_be_objects() {
        let vm = r#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":{"fill_mib":8}}}"#;
        assert!(parse_body::<VmConfig>(vm.as_bytes()).is_ok());
        // Accepted by serde as sequences for structs before this check.
        let m = msg::<VmConfig>(r#"[1, 8, {"workload": {"fill_mib": 8}}]"#);
        assert!(m.contains("invalid type: sequence, expected a JSON object"), "{m}");
        let m = msg::<MergeConfigPatch>("[null, null]");
        assert!(m.contains("invalid type: sequence"), "{m}");
        let m = msg::<VmConfig>(r#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":[8]}}"#);
        assert!(m.contains("boot.workload: invalid type: sequence, expected a JSON object"), "{m}");
        let m = msg::<VmConfig>(r#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":{}},"merge":[true,"d1"]}"#);
        assert!(m.contains("merge: invalid type: sequence"), "{m}");
        for (body, kind) in [("null", "null"), ("true", "boolean"), ("5", "integer `5`"), ("\"x\"", "string")] {
            let m = msg::<MergeConfigPatch>(body);
            assert!(m.contains(&format!("invalid type: {kind}")) && m.contains("expected a JSON object"), "{m}");
        }
    }

    #[test]
    fn integers_may_have_a_zero_fraction() {
        let vm: VmConfig =
            parse_body(br#"{"vcpu_count":2.0,"mem_size_mib":16252.0,"boot":{"workload":{"fill_mib":8e0}}}"#).unwrap();
        assert_eq!((vm.vcpu_count, vm.mem_size_mib), (2, 16252));
        let m = msg::<VmConfig>(r#"{"vcpu_count":1.5,"mem_size_mib":64,"boot":{"workload":{}}}"#);
        assert!(m.contains("vcpu_count: invalid type: floating point `1.5`"), "{m}");
        let m = msg::<MergeConfigPatch>(r#"{"sleep_ms": -1.0}"#);
        assert!(m.contains("sleep_ms: invalid value: integer `-1`"), "{m}");
        let m = msg::<MergeConfigPatch>(r#"{"sleep_ms": 1e300}"#);
        assert!(m.contains("sleep_ms: invalid type: floating point"), "{m}");
        // Fractions stay fractions; an integral one is still a number.
        let vm: VmConfig = parse_body(
            br#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":{"fill_mib":8,"zero_fraction":1.0,"shared_fraction":0.0}}}"#,
        )
        .unwrap();
        let crate::types::BootSource::Workload(s) = vm.boot else { panic!() };
        assert_eq!(s.zero_fraction, 1.0);
    }
}
