//! Client side of the densevm HTTP API (`densevm serve`), for tools, benchmarks and
//! tests.
//!
//! * [`Client`]: one keep-alive HTTP/1.1 connection over the daemon's Unix socket or
//!   its loopback TCP endpoint, built on hyper's client and driven by a private
//!   current-thread tokio runtime, so callers stay blocking.
//! * [`raw`]: bytes on a socket, for what a well-behaved client never sends (partial
//!   requests, byte-by-byte bodies, idle connections): it builds request bytes and
//!   parses whatever answer comes back into the same [`Response`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = api_client::Client::unix("/run/densevm.sock")?;
//! let r = client.request("PUT", "/vms/a/actions", Some(r#"{"action_type": "Pause"}"#))?;
//! assert_eq!(r.status, 204, "{}", r.text());
//! let memory: serde_json::Value = client.request("GET", "/memory", None)?.json_body()?;
//! # let _ = memory;
//! # Ok(()) }
//! ```

pub mod client;
pub mod raw;
mod response;

pub use client::{request, Client, Error, DEFAULT_TIMEOUT};
pub use response::Response;
