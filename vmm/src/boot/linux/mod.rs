//! Linux boot: loads a kernel (ELF vmlinux or bzImage, through linux-loader) and an
//! initrd into guest RAM, writes the command line and the zero page (`boot_params`
//! with the E820 map), builds the boot GDT and identity page tables, and gives the
//! boot vCPU the state of the Linux x86-64 64-bit boot protocol.
//!
//! Guest-physical layout used (all below 1 MiB except the kernel and initrd):
//!
//! | address | what |
//! | --- | --- |
//! | 0x500 | boot GDT ([`regs::BOOT_GDT_ADDR`], 6 entries), 0x540 empty IDT |
//! | 0x7000 | zero page ([`ZERO_PAGE_ADDR`]) |
//! | 0x8ff0 | initial stack pointer |
//! | 0x9000..0xf000 | PML4, PDPT, 4 page directories (identity map of 4 GiB) |
//! | 0x20000 | command line ([`CMDLINE_ADDR`]) |
//! | 0xe0000..1 MiB | ACPI tables, RSDP first (`crate::arch::acpi`; reserved in the E820 map) |
//! | 1 MiB | bzImage (protected-mode part); an ELF vmlinux goes to its `p_paddr`s |
//! | top of low RAM | initrd, page-aligned, below the kernel's `initrd_addr_max` |
//!
//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT: `crate::arch::acpi`) describe the
//! vCPUs, KVM's IOAPIC and local APICs, COM1, the i8042 and the virtio-mmio devices
//! of [`LinuxBootConfig::virtio_mmio`] (which the command line announces too); the
//! zero page's `acpi_rsdp_addr` points to the RSDP, which also sits where the
//! kernel's BIOS-area scan finds it. A kernel with ACPI then runs HW-reduced ACPI
//! with its interrupts through the IOAPIC. A kernel without ACPI (and no MP table is
//! written) boots one CPU with the 8259 PIC in virtual-wire mode (LINT0 = ExtINT,
//! set by [`configure_boot_vcpu`]).

pub mod cmdline;
pub mod e820;
pub mod regs;
pub mod system_map;
#[cfg(test)]
pub(crate) mod tests;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::boot_file;
use crate::arch::acpi::{self, AcpiTables};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_params, setup_header, XLF_KERNEL_64};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub use cmdline::VirtioMmioSlot;
pub use e820::{E820Entry, MMIO_GAP_END, MMIO_GAP_START};
pub use regs::boot_cpuid;

/// Guest-physical address of the zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Where a bzImage's protected-mode kernel is loaded (1 MiB, its `code32_start`).
pub const BZIMAGE_LOAD_ADDR: u64 = e820::HIGH_RAM_START;
/// Offset of the 64-bit entry point from a bzImage's load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `boot_params.hdr.header` magic: "HdrS".
pub const HDR_MAGIC: u32 = 0x5372_6448;
/// `boot_params.hdr.boot_flag` magic.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` of a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Lowest boot protocol with the 64-bit entry and `xloadflags` (2.12).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `initrd_addr_max` assumed when the kernel does not give one (ELF vmlinux).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

const PAGE_SIZE: u64 = 4096;
/// Alignment of the kernel a vmlinux's zero page announces (16 MiB, as x86 defconfig).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinuxBootConfig {
    /// Kernel image: an ELF vmlinux or a bzImage (detected from its content).
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// The user's command line; see [`cmdline::build_cmdline`] for what is added.
    pub cmdline: String,
    /// virtio-mmio devices to announce on the command line and in the DSDT.
    pub virtio_mmio: Vec<VirtioMmioSlot>,
    /// The kernel's System.map: checked at load, read again to name the kernel
    /// function at RIP in the report of an exit densevm cannot handle.
    pub system_map: Option<PathBuf>,
}

/// Kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux (entered at its ELF entry point, `startup_64`).
    Elf,
    /// bzImage (entered at its 64-bit entry, load address + 0x200).
    BzImage,
}

/// Result of [`load_linux`]: where things went and the boot vCPU's registers.
#[derive(Debug, Clone)]
pub struct LinuxBootSetup {
    /// Kind of kernel loaded.
    pub format: KernelFormat,
    /// 64-bit entry point (RIP of the boot vCPU).
    pub entry: GuestAddress,
    /// Address of the zero page (RSI of the boot vCPU).
    pub boot_params: GuestAddress,
    /// Where the kernel image starts.
    pub kernel_load: GuestAddress,
    /// End (exclusive) of the memory the kernel needs (for a bzImage: load address +
    /// `init_size`, room to decompress in place).
    pub kernel_end: u64,
    /// Address and size of the initrd, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// The command line written to [`CMDLINE_ADDR`].
    pub cmdline: String,
    /// The E820 map written to the zero page.
    pub e820: Vec<E820Entry>,
    /// The ACPI tables written to guest memory.
    pub acpi: AcpiTables,
    /// General registers of the boot vCPU.
    pub regs: kvm_regs,
}

/// Errors of the Linux boot path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel or initrd path is refused or cannot be opened ([`boot_file`]).
    #[error(transparent)]
    File(#[from] boot_file::Error),
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("{0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    UnknownKernelFormat(PathBuf),
    /// linux-loader could not load the kernel.
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: linux_loader::loader::Error,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage uses boot protocol {version:#x} with xloadflags {xloadflags:#x}: no 64-bit entry (needs protocol >= 2.12 and XLF_KERNEL_64)")]
    NotLongModeKernel {
        /// Boot protocol version.
        version: u16,
        /// Its xloadflags.
        xloadflags: u16,
    },
    /// The initrd does not fit between the kernel and the top of usable low RAM.
    #[error("initrd of {size} bytes does not fit in guest RAM: only {available} bytes free between the kernel end {kernel_end:#x} and {top:#x} (low RAM end or initrd_addr_max)")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Bytes free for it.
        available: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Upper bound (exclusive) for the initrd.
        top: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the {what} to guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// The RAM size is not usable.
    #[error(transparent)]
    E820(#[from] e820::Error),
    /// The command line is not usable.
    #[error(transparent)]
    Cmdline(#[from] cmdline::Error),
    /// The boot CPU state could not be set.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// The System.map is not usable.
    #[error(transparent)]
    SystemMap(#[from] system_map::Error),
    /// The ACPI tables cannot be built or written.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Detects ELF vmlinux vs bzImage from the file's content.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, Error> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(io_err("kernel", path))?;
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && u32::from_le_bytes(magic) == HDR_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::UnknownKernelFormat(path.to_path_buf()))
}

/// Where the initrd goes: as high as possible below `min(initrd_addr_max + 1, low RAM
/// end)`, page-aligned, and not below `kernel_end`.
pub fn place_initrd(size: u64, kernel_end: u64, initrd_addr_max: u64, ram_size: u64) -> Result<GuestAddress, Error> {
    let top = e820::low_ram_end(ram_size).min(initrd_addr_max.saturating_add(1));
    let floor = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_big = || Error::InitrdTooBig { size, available: top.saturating_sub(floor), kernel_end, top };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < floor {
        return Err(too_big());
    }
    Ok(GuestAddress(addr))
}

/// Loads the kernel, initrd, command line, zero page, ACPI tables (for `vcpus`
/// vCPUs), GDT and page tables into `mem`, which holds `ram_size` bytes of RAM laid
/// out as [`e820::ram_regions`].
pub fn load_linux<M: GuestMemoryBackend>(
    mem: &M,
    ram_size: u64,
    vcpus: u32,
    cfg: &LinuxBootConfig,
) -> Result<LinuxBootSetup, Error> {
    let e820_map = e820::build_boot_e820(ram_size)?;
    // Built (so checked) before any file is opened.
    let acpi_tables = AcpiTables::build(vcpus, &cfg.virtio_mmio)?;
    if let Some(path) = &cfg.system_map {
        system_map::SystemMap::load(path)?;
    }
    // Both files are checked before either is read.
    let kernel = boot_file::open("kernel", &cfg.kernel, boot_file::MAX_KERNEL_BYTES)?;
    // Capped here; place_initrd also refuses one that does not fit in guest RAM,
    // with where it would have to go, before a byte of it is read.
    let initrd_file =
        cfg.initrd.as_deref().map(|p| boot_file::open("initrd", p, boot_file::MAX_INITRD_BYTES)).transpose()?;
    let path = kernel.path.as_path();
    let mut file = kernel.file;
    let format = detect_format(&mut file, path)?;
    let highmem = Some(GuestAddress(e820::HIGH_RAM_START));
    let load_err = |source| Error::LoadKernel { path: path.to_path_buf(), source };
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, highmem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?,
    };

    let mut params = boot_params::default();
    let (entry, kernel_end, initrd_addr_max, cmdline_max) = match loaded.setup_header {
        Some(hdr) => {
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::NotLongModeKernel { version, xloadflags });
            }
            params.hdr = hdr;
            let load = loaded.kernel_load.0;
            let end = loaded.kernel_end.max(load + u64::from(hdr.init_size));
            let max = match hdr.cmdline_size as usize {
                0 => cmdline::DEFAULT_CMDLINE_MAX,
                n => n.min((e820::EBDA_START - CMDLINE_ADDR - 1) as usize),
            };
            let entry = GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET);
            (entry, end, u64::from(hdr.initrd_addr_max), max)
        }
        None => {
            params.hdr = setup_header {
                boot_flag: BOOT_FLAG,
                header: HDR_MAGIC,
                kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
                ..Default::default()
            };
            let max = cmdline::DEFAULT_CMDLINE_MAX;
            (loaded.kernel_load, loaded.kernel_end, DEFAULT_INITRD_ADDR_MAX, max)
        }
    };

    let extra = if crate::arch::cpuid::kernel_instructions_emulated() { cmdline::EMULATED_KERNEL_PARAMS } else { &[] };
    let cmdline = cmdline::build_cmdline_with(&cfg.cmdline, &cfg.virtio_mmio, extra, cmdline_max)?;
    let mut bytes = cmdline.clone().into_bytes();
    bytes.push(0);
    let mem_err = |what| move |source| Error::Memory { what, source };
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR)).map_err(mem_err("command line"))?;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    let initrd = match initrd_file {
        Some(initrd) => {
            let (mut f, size) = (initrd.file, initrd.size);
            let addr = place_initrd(size, kernel_end, initrd_addr_max, ram_size)?;
            let len = usize::try_from(size).map_err(|_| Error::InitrdTooBig {
                size,
                available: 0,
                kernel_end,
                top: addr.0,
            })?;
            mem.read_exact_volatile_from(addr, &mut f, len).map_err(mem_err("initrd"))?;
            // place_initrd keeps it below 4 GiB, so it fits the 32-bit fields.
            params.hdr.ramdisk_image = addr.0 as u32;
            params.hdr.ramdisk_size = size as u32;
            Some((addr, size))
        }
        None => None,
    };

    for (slot, e) in params.e820_table.iter_mut().zip(&e820_map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820_map.len() as u8;
    acpi_tables.write_to(mem)?;
    params.acpi_rsdp_addr = acpi_tables.rsdp_addr();
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(mem_err("zero page"))?;
    regs::write_boot_tables(mem)?;

    let boot_params = GuestAddress(ZERO_PAGE_ADDR);
    Ok(LinuxBootSetup {
        format,
        entry,
        boot_params,
        kernel_load: loaded.kernel_load,
        kernel_end,
        initrd,
        cmdline,
        e820: e820_map,
        acpi: acpi_tables,
        regs: regs::boot_regs(entry, boot_params),
    })
}

/// Gives the boot vCPU the 64-bit boot state for `setup`: long-mode sregs (GDT, page
/// tables, CR0/CR3/CR4/EFER), RIP = entry, RSI = zero page, FPU, boot MSRs, and the
/// local APIC's LINT0/LINT1 as ExtINT/NMI.
///
/// The VM must have an in-kernel irqchip (`create_irq_chip`) created before the vCPU,
/// and the vCPU should have its CPUID set (`set_cpuid2` with [`boot_cpuid`]) first.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, setup: &LinuxBootSetup) -> Result<(), Error> {
    regs::configure_vcpu(vcpu, &setup.regs)?;
    Ok(())
}
