//! densevm API: the wire types shared by the HTTP server, the CLI and the VMM, and the
//! HTTP server of `densevm serve` (Firecracker-style JSON over a Unix socket).
//!
//! # Wiring it to the VMM
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use api::{ApiAction, ApiError, ApiReply, ApiServer, ApiServerConfig};
//!
//! let (chan, endpoint) = api::channel()?;
//! let server = ApiServer::start(ApiServerConfig::new("/run/densevm.sock"), chan)?;
//! // In the VMM's event loop: register `endpoint.wake` (readable = requests pending);
//! // when it fires:
//! for req in endpoint.drain() {
//!     let result = match req.action {
//!         ApiAction::GetVm(id) => Err(ApiError::not_found(format!("no VM {id}"))),
//!         _ => Ok(ApiReply::Empty),
//!     };
//!     req.reply.send(result); // never blocks
//! }
//! server.shutdown()?; // joins the server thread and removes the socket
//! # Ok(()) }
//! ```

pub mod auth;
mod balloon_routes;
pub mod channel;
mod domain_routes;
mod error;
mod extract;
pub mod metrics;
pub mod openapi;
mod openapi_rules;
mod routes;
pub mod scenario;
pub mod sched;
pub mod server;
pub mod socket;
mod state;
pub mod types;

pub use channel::{
    channel, ApiAction, ApiError, ApiReply, ApiRequest, ErrorKind, ReplySender, VmmChannel, VmmEndpoint,
};
pub use server::{ApiServer, ApiServerConfig};
pub use state::HostStatsReader;
