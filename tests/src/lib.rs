//! End-to-end tests of densevm (they drive the real binary).
