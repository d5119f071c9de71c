//! Guest-physical RAM layout and the E820 memory map given to a Linux guest.
//!
//! Layout (the VMM must create its RAM memslots the same way, see [`ram_regions`]):
//! RAM starts at guest-physical 0. Up to 3 GiB it is contiguous; RAM beyond 3 GiB is
//! placed from 4 GiB upwards, leaving the 32-bit MMIO gap `[3 GiB, 4 GiB)` for
//! devices (virtio-mmio, the IOAPIC at 0xfec00000, the local APIC at 0xfee00000).
//!
//! The E820 map reports: RAM below the EBDA (`[0, 0x9fc00)`), the RAM from 1 MiB up to
//! the end of low RAM, and the RAM above 4 GiB if any. The legacy hole
//! `[0x9fc00, 1 MiB)` (EBDA, VGA, option ROMs, BIOS) is not RAM for the guest.
//! The map a Linux guest gets ([`build_boot_e820`]) also reports its BIOS area
//! `[0xe0000, 1 MiB)`, where the ACPI tables are (`crate::arch::acpi`), as reserved.

use vm_memory::GuestAddress;

use crate::arch::acpi::{ACPI_AREA_END, ACPI_AREA_START};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Start of the extended BIOS data area; RAM below it is the guest's "low memory".
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory (1 MiB): where the kernel and everything above it is loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB), where RAM beyond 3 GiB continues.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// Errors of the E820 layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The RAM size cannot hold a kernel.
    #[error("guest RAM of {0} bytes is too small for a Linux guest (need more than 1 MiB)")]
    RamTooSmall(u64),
    /// The RAM size is not a whole number of 4 KiB pages.
    #[error("guest RAM size {0:#x} is not a multiple of 4 KiB")]
    RamUnaligned(u64),
    /// The RAM size overflows the 64-bit address space once moved above the MMIO gap.
    #[error("guest RAM size {0:#x} overflows the guest-physical address space")]
    RamTooLarge(u64),
}

/// One entry of the E820 map (same fields as Linux's `boot_e820_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest-physical ranges (start, length) that hold `ram_size` bytes of RAM:
/// one range below the MMIO gap and, when `ram_size` exceeds 3 GiB, one from 4 GiB.
pub fn ram_regions(ram_size: u64) -> Result<Vec<(GuestAddress, u64)>, Error> {
    if !ram_size.is_multiple_of(4096) {
        return Err(Error::RamUnaligned(ram_size));
    }
    if ram_size <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), ram_size)]);
    }
    let high = ram_size - MMIO_GAP_START;
    MMIO_GAP_END.checked_add(high).ok_or(Error::RamTooLarge(ram_size))?;
    Ok(vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), high)])
}

/// End (exclusive) of the RAM below the 32-bit MMIO gap.
pub fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO_GAP_START)
}

/// Builds the E820 map for `ram_size` bytes of guest RAM laid out as [`ram_regions`].
pub fn build_e820(ram_size: u64) -> Result<Vec<E820Entry>, Error> {
    if ram_size <= HIGH_RAM_START {
        return Err(Error::RamTooSmall(ram_size));
    }
    let regions = ram_regions(ram_size)?;
    let mut map = vec![E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM }];
    for (start, len) in regions {
        let (addr, size) = if start.0 == 0 { (HIGH_RAM_START, len - HIGH_RAM_START) } else { (start.0, len) };
        map.push(E820Entry { addr, size, kind: E820_RAM });
    }
    Ok(map)
}

/// [`build_e820`] with the ACPI tables' area `[ACPI_AREA_START, ACPI_AREA_END)`
/// (in the legacy hole, never RAM) as [`E820_RESERVED`], in address order: the
/// map a Linux guest is given.
pub fn build_boot_e820(ram_size: u64) -> Result<Vec<E820Entry>, Error> {
    let mut map = build_e820(ram_size)?;
    let acpi = E820Entry { addr: ACPI_AREA_START, size: ACPI_AREA_END - ACPI_AREA_START, kind: E820_RESERVED };
    let at = map.iter().position(|e| e.addr > acpi.addr).unwrap_or(map.len());
    map.insert(at, acpi);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry { addr, size, kind: E820_RAM }
    }

    #[test]
    fn small_ram() {
        let map = build_e820(256 * MIB).unwrap();
        assert_eq!(map, vec![ram(0, 0x9fc00), ram(0x10_0000, 256 * MIB - 0x10_0000)]);
        assert_eq!(ram_regions(256 * MIB).unwrap(), vec![(GuestAddress(0), 256 * MIB)]);
    }

    #[test]
    fn ram_exactly_at_gap() {
        let map = build_e820(3 * GIB).unwrap();
        assert_eq!(map, vec![ram(0, 0x9fc00), ram(MIB, 3 * GIB - MIB)]);
        assert_eq!(ram_regions(3 * GIB).unwrap().len(), 1);
        assert_eq!(low_ram_end(3 * GIB), 3 * GIB);
    }

    #[test]
    fn ram_across_gap_is_split() {
        let size = 4 * GIB + 512 * MIB;
        let map = build_e820(size).unwrap();
        assert_eq!(map, vec![ram(0, 0x9fc00), ram(MIB, 3 * GIB - MIB), ram(4 * GIB, GIB + 512 * MIB)]);
        // No entry touches the gap, and the RAM adds up (less the legacy hole).
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
        let total: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(total, size - (MIB - 0x9fc00));
        assert_eq!(
            ram_regions(size).unwrap(),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB + 512 * MIB)]
        );
        assert_eq!(low_ram_end(size), 3 * GIB);
    }

    #[test]
    fn one_page_across_gap() {
        let map = build_e820(3 * GIB + 4096).unwrap();
        assert_eq!(map.last(), Some(&ram(4 * GIB, 4096)));
    }

    #[test]
    fn boot_map_reserves_the_acpi_area() {
        let reserved = E820Entry { addr: 0xe_0000, size: 0x2_0000, kind: E820_RESERVED };
        let map = build_boot_e820(256 * MIB).unwrap();
        assert_eq!(map, vec![ram(0, 0x9fc00), reserved, ram(MIB, 256 * MIB - MIB)]);
        let map = build_boot_e820(4 * GIB).unwrap();
        assert_eq!(map, vec![ram(0, 0x9fc00), reserved, ram(MIB, 3 * GIB - MIB), ram(4 * GIB, GIB)]);
        // Sorted, and the reserved area overlaps no RAM.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:x?}");
        }
        assert_eq!(build_boot_e820(MIB), Err(Error::RamTooSmall(MIB)));
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(build_e820(MIB), Err(Error::RamTooSmall(MIB)));
        assert_eq!(build_e820(0), Err(Error::RamTooSmall(0)));
        assert_eq!(build_e820(2 * MIB + 1), Err(Error::RamUnaligned(2 * MIB + 1)));
        let huge: u64 = !0xfff;
        assert_eq!(build_e820(huge), Err(Error::RamTooLarge(huge)));
    }
}
