//! densevm memory crate.
