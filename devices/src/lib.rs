//! densevm devices crate.
