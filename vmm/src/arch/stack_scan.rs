//! The kernel functions whose return addresses are on a stopped vCPU's stack: the
//! callers of the function at RIP, for the report of an exit densevm cannot handle
//! (with a System.map; `densevm run --system-map`).
//!
//! Like Linux's own `?` entries of an oops, a scan and not an unwinder: every 8-byte
//! word of the top of the stack that names a kernel function (a code symbol, less
//! than [`MAX_OFFSET`] into it) is listed, so stale words can appear too. It is what
//! found the caller of `kernel_fpu_begin_mask` that stopped the Debian kernel.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot::linux::system_map::SystemMap;

/// Stack words scanned from RSP.
pub const STACK_WORDS: usize = 64;
/// Most names listed.
pub const MAX_CALLERS: usize = 12;
/// Largest offset into a symbol a return address has (a word further from its
/// symbol is data between the kernel's code sections, not a return address).
pub const MAX_OFFSET: u64 = 0x4000;
const PAGE_SIZE: u64 = 4096;

/// Reads up to `words` 8-byte stack words from guest-virtual `rsp`, page by page
/// (`translate`: guest-virtual to guest-physical, None if unmapped); stops at the
/// first page it cannot read.
pub fn read_stack<M: GuestMemoryBackend>(
    mem: &M,
    rsp: u64,
    words: usize,
    mut translate: impl FnMut(u64) -> Option<u64>,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(words);
    let mut gva = rsp & !7;
    let mut page: Option<(u64, u64)> = None;
    while out.len() < words {
        let vpage = gva & !(PAGE_SIZE - 1);
        let base = match page {
            Some((v, p)) if v == vpage => p,
            _ => match translate(vpage) {
                Some(p) => {
                    page = Some((vpage, p));
                    p
                }
                None => break,
            },
        };
        match mem.read_obj::<u64>(GuestAddress(base + (gva - vpage))) {
            Ok(w) => out.push(w),
            Err(_) => break,
        }
        gva = gva.wrapping_add(8);
    }
    out
}

/// The `name+0xoff` of each word of `stack` that is a kernel code address by `map`
/// (at most [`MAX_CALLERS`], in stack order).
pub fn callers(map: &SystemMap, stack: &[u64]) -> Vec<String> {
    stack
        .iter()
        .filter(|&&w| w >> 47 == 0x1_ffff)
        .filter_map(|&w| map.lookup(w).filter(|s| s.offset > 0 && s.offset < MAX_OFFSET).map(|s| s.to_string()))
        .take(MAX_CALLERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::GuestMemoryMmap;

    const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81088da0 T blake2s_compress
ffffffff8103de30 T kernel_fpu_begin_mask
ffffffff81e00000 T _etext
";

    #[test]
    fn names_return_addresses_only() {
        let map = SystemMap::parse(MAP, Path::new("System.map")).unwrap();
        let stack = [
            0xffff_c900_0001_3f00, // a stack pointer
            0x1f80,                // data
            0xffff_ffff_8108_8dda, // return into blake2s_compress+0x3a
            0xffff_ffff_8103_de30, // a function's start: a pointer, not a return address
            0xffff_ffff_81d0_0000, // far past the last function start before it
            0xffff_ffff_8103_de40,
        ];
        assert_eq!(callers(&map, &stack), ["blake2s_compress+0x3a", "kernel_fpu_begin_mask+0x10"]);
    }

    #[test]
    fn reads_across_pages_and_stops_at_a_hole() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_obj(0x11u64, GuestAddress(0x1ff8)).unwrap();
        mem.write_obj(0x22u64, GuestAddress(0x3000)).unwrap();
        let map = |gva: u64| match gva {
            0x10000 => Some(0x1000),
            0x11000 => Some(0x3000),
            _ => None,
        };
        assert_eq!(read_stack(&mem, 0x10ff8, 3, map), [0x11, 0x22, 0]);
        assert_eq!(read_stack(&mem, 0x11ff8, 4, map), [0], "the next page is unmapped");
        assert!(read_stack(&mem, 0x50000, 4, map).is_empty());
    }
}
