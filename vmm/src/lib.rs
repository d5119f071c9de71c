//! densevm VMM.
