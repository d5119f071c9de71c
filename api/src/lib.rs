//! densevm api crate.
