//! densevm API: wire types shared by the HTTP server, the CLI and the VMM.

pub mod scenario;
