//! Walking a descriptor chain the guest offered, refusing broken ones.
//!
//! `virtio-queue`'s chain iterator stops quietly on a loop (after queue-size
//! descriptors), a `next` index past the table, an unreadable descriptor or a chain
//! longer than 4 GiB; [`collect`] turns each of those into an error so the device
//! can count and refuse the chain instead of acting on a truncated one.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

/// Why a chain or one of its descriptors was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The chain has no descriptor (its head lies past the table or is unreadable).
    #[error("empty descriptor chain (head {0})")]
    Empty(u16),
    /// The chain ends on a descriptor that still points to a next one: a loop, a
    /// `next` past the table or an unreadable descriptor.
    #[error("descriptor chain {0} is broken (a loop or a bad next index)")]
    Broken(u16),
    /// A descriptor's buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// A descriptor is device-writable where the device expects to read it.
    #[error("descriptor buffer {0:#x} is write-only where the device reads")]
    WriteOnly(u64),
    /// A descriptor's length is not what the queue's protocol allows.
    #[error("descriptor buffer {addr:#x} has a bad length {len}")]
    BadLength {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
}

/// Every descriptor of `chain`, each checked to lie inside guest memory.
pub fn collect<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, Error>
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    let mut chain = chain;
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut broken = false;
    let mut outside = None;
    while let Some(d) = chain.next() {
        broken = d.has_next();
        let inside = d.len() == 0 || GuestMemoryBackend::check_range(chain.memory(), d.addr(), d.len() as usize);
        if !inside && outside.is_none() {
            outside = Some(Error::OutsideMemory { addr: d.addr().0, len: d.len() });
        }
        descs.push(d);
    }
    if descs.is_empty() {
        return Err(Error::Empty(head));
    }
    if broken {
        return Err(Error::Broken(head));
    }
    if let Some(e) = outside {
        return Err(e);
    }
    Ok(descs)
}

/// Refuses device-writable descriptors and lengths that are not a positive
/// multiple of `unit` (for queues the device only reads).
pub fn check_readable(descs: &[Descriptor], unit: u32) -> Result<(), Error> {
    for d in descs {
        if d.is_write_only() {
            return Err(Error::WriteOnly(d.addr().0));
        }
        if d.len() == 0 || d.len() % unit != 0 {
            return Err(Error::BadLength { addr: d.addr().0, len: d.len() });
        }
    }
    Ok(())
}
