//! HTTP error responses: every error, ours or axum's, leaves the server as
//! `{"fault_message": "..."}` with `Content-Type: application/json`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::channel::{ApiError, ErrorKind};
use crate::types::FaultResponse;

/// Longest plain-text error body from axum that is carried into the fault message.
const MAX_TEXT_BODY: usize = 4096;

/// An HTTP error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Error {
    /// HTTP status.
    pub status: StatusCode,
    /// Goes into `fault_message`.
    pub message: String,
}

impl Error {
    /// Builds an error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Error { status, message: message.into() }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        let status = match e.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Error::new(status, e.fault_message)
    }
}

/// Renders `{"fault_message": message}` with `status`.
pub fn fault_response(status: StatusCode, message: String) -> Response {
    let body = serde_json::to_vec(&FaultResponse { fault_message: message })
        .unwrap_or_else(|_| b"{\"fault_message\":\"internal error\"}".to_vec());
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "API request failed: {}", self.message);
        }
        fault_response(self.status, self.message)
    }
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Middleware: turns every error response that is not JSON yet (axum's 405 and
/// extractor rejections, a panic's 500, ...) into the fault shape, keeping its status
/// and other headers (e.g. `Allow` on a 405).
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match http_body_util::Limited::new(body, MAX_TEXT_BODY).collect().await {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .map(|a| format!(" (allowed: {a})"))
                .unwrap_or_default();
            format!("method {method} is not allowed on {path}{allowed}")
        }
        StatusCode::NOT_FOUND if text.is_empty() => format!("no such resource: {path}"),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("request failed").to_string(),
        _ => text,
    };
    let fault = fault_response(status, message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let (_, body) = fault.into_parts();
    Response::from_parts(parts, Body::new(body))
}

/// Fallback handler for unknown routes: 404.
pub async fn not_found(req: Request) -> Error {
    Error::new(StatusCode::NOT_FOUND, format!("no such resource: {}", req.uri().path()))
}
