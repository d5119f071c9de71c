//! Request extractors whose rejections use the fault shape: a JSON body with size and
//! time limits, parse errors naming the offending field, and range validation; and a
//! validated `{vm_id}` path segment.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use http_body_util::{BodyExt, LengthLimitError};
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::Error;
use crate::state::AppState;
use crate::types::{validate_vm_id, Validate};

/// A parsed and validated JSON request body.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

fn too_large(max: usize) -> Error {
    Error::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds the limit of {max} bytes"))
}

/// Parses `bytes` as a `T` and validates it.
pub fn parse_body<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::bad_request("request body is empty; a JSON object is expected"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => Error::bad_request(format!("malformed JSON: {inner}")),
            Category::Data if path == "." => Error::bad_request(format!("invalid request body: {inner}")),
            Category::Data => Error::bad_request(format!("invalid request body: {path}: {inner}")),
        }
    })?;
    de.end().map_err(|e| Error::bad_request(format!("malformed JSON: {e}")))?;
    value.validate().map_err(|e| Error::bad_request(format!("invalid request body: {e}")))?;
    Ok(value)
}

impl<T> FromRequest<AppState> for JsonBody<T>
where
    T: DeserializeOwned + Validate + Send,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MergeConfigPatch, VmConfig};

    fn msg<T: DeserializeOwned + Validate + std::fmt::Debug>(body: &str) -> String {
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
}
