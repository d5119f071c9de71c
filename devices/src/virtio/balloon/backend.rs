//! Where the balloon's pages go: the VMM implements [`BalloonBackend`] over its
//! memory manager (discarding the frames of inflated and reported pages, giving
//! deflated pages back on their next touch).

use super::pages::Range;

/// A backend's failure; the device counts and logs it and carries on (the
/// pages keep their frames).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("balloon backend: {0}")]
pub struct BackendError(pub String);

/// The memory behind the balloon. Ranges are page-aligned, sorted, disjoint and
/// inside guest memory; each call carries one batch (one notification's worth).
pub trait BalloonBackend: Send {
    /// The guest gave these ranges to the balloon (inflate): their contents are
    /// dead and their frames may be returned to the host.
    fn discard(&mut self, ranges: &[Range]) -> Result<(), BackendError>;
    /// The guest took these ranges back (deflate); they must read as some content
    /// (zeros after a discard) on their next access.
    fn reclaim(&mut self, ranges: &[Range]) -> Result<(), BackendError>;
    /// The guest reported these ranges free (free page reporting): they are
    /// discarded like inflated ones, but the guest may reuse them without telling.
    fn report(&mut self, ranges: &[Range]) -> Result<(), BackendError> {
        self.discard(ranges)
    }
}
