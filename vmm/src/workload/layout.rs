//! Guest-physical layout of a workload-guest VM and the structures densevm writes
//! before the first instruction: GDT, TSS, identity page tables, per-vCPU config pages.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// GDT location.
pub const GDT_GPA: u64 = 0x1000;
/// TSS location (shared by every vCPU; no privilege change ever happens).
pub const TSS_GPA: u64 = 0x2000;
/// PML4 location.
pub const PML4_GPA: u64 = 0x8000;
/// PDPT location.
pub const PDPT_GPA: u64 = 0x9000;
/// First page directory.
pub const PD_GPA: u64 = 0xa000;
/// End of the page-directory area (exclusive).
pub const PD_END: u64 = 0x40000;
/// Per-vCPU config pages (config at +0, report at +0x1000).
pub const VCPU_PAGES_GPA: u64 = 0x40000;
/// Bytes of per-vCPU pages.
pub const VCPU_PAGES_STRIDE: u64 = 0x2000;
/// Stacks area: vCPU k's stack ends at `STACKS_END - k * STACK_SIZE`.
pub const STACKS_END: u64 = 0x100000;
/// Per-vCPU stack size.
pub const STACK_SIZE: u64 = 0x4000;
/// Load address and entry point of the guest program.
pub const CODE_GPA: u64 = 0x100000;
/// Largest guest program.
pub const CODE_MAX: u64 = 0x100000;
/// Version table (u32 per data page).
pub const VERSIONS_GPA: u64 = 0x200000;
/// Most vCPUs a workload VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Selector of the 64-bit user code segment.
pub const USER_CS: u16 = 0x33;
/// Selector of the user data segment.
pub const USER_DS: u16 = 0x2b;
/// Selector of the TSS.
pub const TSS_SEL: u16 = 0x40;
/// Number of GDT entries (the TSS takes two).
pub const GDT_ENTRIES: usize = 10;

/// RAM the workload guest's balloon driver needs after the data pages (its
/// four split rings, a buffer of page frame numbers and a statistics buffer).
pub const BALLOON_SCRATCH: u64 = 16 * PAGE_SIZE;
/// The identity mapping of a guest with a balloon reaches at least this far
/// (the balloon's registers sit below 4 GiB).
const BALLOON_MAPPED: u64 = 4 << 30;

const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Errors building the layout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scenario does not fit into the VM's RAM.
    #[error("workload needs {need_mib} MiB of guest RAM but the VM has {have_mib} MiB")]
    TooSmall {
        /// MiB needed.
        need_mib: u64,
        /// MiB available.
        have_mib: u64,
    },
    /// RAM is too large for the page-table area.
    #[error("guest RAM of {0} MiB is too large for the workload guest's page tables")]
    TooLarge(u64),
    /// Too many vCPUs.
    #[error("the workload guest supports 1..={MAX_VCPUS} vCPUs, got {0}")]
    Vcpus(u32),
    /// Writing guest memory failed.
    #[error("writing guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the pieces of a workload VM live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadLayout {
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// Data pages in all.
    pub data_pages: u64,
    /// First data page.
    pub data_gpa: u64,
    /// MMIO doorbell (outside RAM).
    pub doorbell_gpa: u64,
    /// Bytes identity-mapped by the page tables.
    pub mapped_size: u64,
}

impl WorkloadLayout {
    /// Computes the layout for `data_pages` pages in `ram_size` bytes of RAM.
    pub fn new(ram_size: u64, data_pages: u64, vcpus: u32) -> Result<Self, Error> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Vcpus(vcpus));
        }
        let versions_end = VERSIONS_GPA + data_pages * 4;
        let data_gpa = versions_end.div_ceil(TWO_MIB) * TWO_MIB;
        let need = data_gpa + data_pages * PAGE_SIZE;
        if need > ram_size {
            return Err(Error::TooSmall { need_mib: need.div_ceil(1 << 20), have_mib: ram_size >> 20 });
        }
        let doorbell_gpa = ram_size.div_ceil(ONE_GIB) * ONE_GIB;
        let mapped_size = doorbell_gpa + ONE_GIB;
        if mapped_size / ONE_GIB > (PD_END - PD_GPA) / PAGE_SIZE {
            return Err(Error::TooLarge(ram_size >> 20));
        }
        Ok(WorkloadLayout { ram_size, data_pages, data_gpa, doorbell_gpa, mapped_size })
    }

    /// Maps at least the low 4 GiB (where the balloon's registers are) and
    /// returns the balloon driver's scratch area after the data pages.
    pub fn with_balloon(&mut self) -> Result<u64, Error> {
        let scratch = self.data_gpa + self.data_pages * PAGE_SIZE;
        if scratch + BALLOON_SCRATCH > self.ram_size {
            let need = scratch + BALLOON_SCRATCH;
            return Err(Error::TooSmall { need_mib: need.div_ceil(1 << 20), have_mib: self.ram_size >> 20 });
        }
        self.mapped_size = self.mapped_size.max(BALLOON_MAPPED);
        Ok(scratch)
    }

    /// The config page of vCPU `index` (its report page follows).
    pub fn config_gpa(index: u32) -> u64 {
        VCPU_PAGES_GPA + u64::from(index) * VCPU_PAGES_STRIDE
    }

    /// The report page of vCPU `index`.
    pub fn report_gpa(index: u32) -> u64 {
        Self::config_gpa(index) + PAGE_SIZE
    }

    /// The initial stack pointer of vCPU `index`.
    pub fn stack_top(index: u32) -> u64 {
        STACKS_END - u64::from(index) * STACK_SIZE - 64
    }

    /// The slice `[first, first+count)` of data pages given to vCPU `index` of `vcpus`.
    pub fn vcpu_slice(&self, index: u32, vcpus: u32) -> (u64, u64) {
        let first = self.data_pages * u64::from(index) / u64::from(vcpus);
        let end = self.data_pages * (u64::from(index) + 1) / u64::from(vcpus);
        (first, end - first)
    }

    /// Writes the identity page tables (2 MiB pages, user bit on every level).
    ///
    /// Every entry is written with its Accessed bit (and leaves with Dirty) already
    /// set, so the guest's page walks never write the page tables. That matters
    /// because page-table pages can be merged (they are identical across clones):
    /// under shadow paging (this host's kvm_pvm) KVM sets A/D bits itself with a
    /// `cmpxchg` on the host mapping, which fails on a write-protected page and
    /// turns into a guest #PF (a triple fault for this guest, which has no IDT).
    pub fn write_page_tables<M: GuestMemory>(&self, mem: &M) -> Result<(), Error> {
        const P_RW_US_A: u64 = 0x7 | 0x20;
        const LEAF: u64 = P_RW_US_A | 0x40 | 0x80; // + Dirty, PS (2 MiB)
        mem.write_obj(PDPT_GPA | P_RW_US_A, GuestAddress(PML4_GPA))?;
        let gibs = self.mapped_size / ONE_GIB;
        for g in 0..gibs {
            let pd = PD_GPA + g * PAGE_SIZE;
            mem.write_obj(pd | P_RW_US_A, GuestAddress(PDPT_GPA + g * 8))?;
            let mut entries = [0u64; 512];
            for (i, e) in entries.iter_mut().enumerate() {
                *e = (g * ONE_GIB + i as u64 * TWO_MIB) | LEAF;
            }
            mem.write_slice(as_bytes(&entries), GuestAddress(pd))?;
        }
        Ok(())
    }

    /// Writes the GDT and the TSS.
    pub fn write_gdt_and_tss<M: GuestMemory>(&self, mem: &M) -> Result<(), Error> {
        mem.write_slice(as_bytes(&gdt_entries()), GuestAddress(GDT_GPA))?;
        mem.write_slice(&[0u8; 104], GuestAddress(TSS_GPA))?;
        Ok(())
    }
}

/// The GDT: Linux's selector layout (user data 0x2b, user code 0x33) plus a TSS at 0x40.
pub fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let tss_limit: u64 = 103;
    let base = TSS_GPA;
    let tss_low = (tss_limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let tss_high = base >> 32;
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10: kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18: kernel data
        0x00cf_fb00_0000_ffff, // 0x23: user code, 32-bit
        0x00cf_f300_0000_ffff, // 0x2b: user data
        0x00af_fb00_0000_ffff, // 0x33: user code, 64-bit
        0,
        tss_low, // 0x40: TSS
        tss_high,
    ]
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: any u64 slice is a valid byte slice of 8x its length, with the same
    // lifetime; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn layout_places_data_after_versions_and_doorbell_outside_ram() {
        let l = WorkloadLayout::new(256 << 20, 16384, 2).unwrap();
        assert_eq!(l.data_gpa, 4 << 20);
        assert_eq!(l.doorbell_gpa, 1 << 30);
        assert!(l.doorbell_gpa >= l.ram_size);
        assert_eq!(l.vcpu_slice(0, 2), (0, 8192));
        assert_eq!(l.vcpu_slice(1, 2), (8192, 8192));
        let l = WorkloadLayout::new(1 << 30, 1000, 1).unwrap();
        assert_eq!(l.doorbell_gpa, 1 << 30);
    }

    #[test]
    fn too_small_ram_is_a_clear_error() {
        let e = WorkloadLayout::new(16 << 20, 16384, 1).unwrap_err();
        assert!(e.to_string().contains("needs 68 MiB"), "{e}");
        assert!(WorkloadLayout::new(16 << 20, 1, 0).is_err());
        assert!(WorkloadLayout::new(16 << 20, 1, 33).is_err());
        assert!(matches!(WorkloadLayout::new(1 << 40, 1, 1), Err(Error::TooLarge(_))));
    }

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let l = WorkloadLayout::new(8 << 20, 16, 1).unwrap();
        l.write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_GPA)).unwrap();
        assert_eq!(pml4, PDPT_GPA | 0x27, "present, writable, user, accessed");
        let pdpt1: u64 = mem.read_obj(GuestAddress(PDPT_GPA + 8)).unwrap();
        assert_eq!(pdpt1, (PD_GPA + PAGE_SIZE) | 0x27);
        // The doorbell's 2 MiB page (1 GiB) is mapped, user-accessible.
        let pde: u64 = mem.read_obj(GuestAddress(PD_GPA + PAGE_SIZE)).unwrap();
        assert_eq!(pde, (1 << 30) | 0xe7, "2 MiB leaf, accessed and dirty preset");
        let pde3: u64 = mem.read_obj(GuestAddress(PD_GPA + 3 * 8)).unwrap();
        assert_eq!(pde3, (3 * TWO_MIB) | 0xe7);
    }

    #[test]
    fn gdt_has_user_segments_and_tss() {
        let g = gdt_entries();
        assert_eq!(g[(USER_CS >> 3) as usize] >> 40 & 0xff, 0xfb); // P, DPL3, code
        assert_eq!(g[(USER_CS >> 3) as usize] >> 53 & 1, 1); // L
        assert_eq!(g[(USER_DS >> 3) as usize] >> 40 & 0xff, 0xf3); // P, DPL3, data
        let tss = g[(TSS_SEL >> 3) as usize];
        assert_eq!(tss >> 40 & 0xff, 0x89);
        assert_eq!((tss >> 16) & 0xff_ffff, TSS_GPA);
    }
}
