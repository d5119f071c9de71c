//! Tests of the Linux loader: synthetic ELF and bzImage kernels, the zero page, the
//! initrd placement, the boot tables, and (where /dev/kvm works) the vCPU state.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_ioctls::Kvm;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{self, BOOT_GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use super::*;

const MIB: u64 = 1 << 20;

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(bytes: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("densevm-boot-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Prints `SKIPPED: <why>` on the real stderr (the harness hides `eprintln!` output of
/// passing tests, so a skip would go unseen). Every vmm unit test that skips uses it.
pub(crate) fn skip(why: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIPPED: {why}");
}

fn guest_mem(size: u64) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("guest memory")
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at paddr 16 MiB, entry there.
fn synthetic_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let mut f = vec![0u8; 0x78];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[0x40..0x78];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&(0xffff_ffff_8100_0000u64).to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64 + 0x2000).to_le_bytes()); // p_memsz
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

/// Fields of a synthetic bzImage's setup header that tests vary.
struct BzParams {
    xloadflags: u16,
    initrd_addr_max: u32,
    cmdline_size: u32,
    init_size: u32,
}

const BZ_DEFAULT: BzParams = BzParams {
    xloadflags: 0x3, // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    initrd_addr_max: 0x7fff_ffff,
    cmdline_size: 2047,
    init_size: 0x40_0000,
};

/// A bzImage: 4 setup sectors + boot sector, then a 12 KiB "protected-mode kernel".
fn synthetic_bzimage(p: &BzParams) -> Vec<u8> {
    let mut f = vec![0u8; 5 * 512];
    let mut put = |off: usize, bytes: &[u8]| f[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[4]); // setup_sects
    put(0x1fe, &BOOT_FLAG.to_le_bytes());
    put(0x202, &HDR_MAGIC.to_le_bytes());
    put(0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(0x22c, &p.initrd_addr_max.to_le_bytes());
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x234, &[1]); // relocatable_kernel
    put(0x236, &p.xloadflags.to_le_bytes());
    put(0x238, &p.cmdline_size.to_le_bytes());
    put(0x260, &p.init_size.to_le_bytes());
    f.extend((0..0x3000u32).map(|i| (i % 251) as u8));
    f
}

fn config(kernel: &TempFile, initrd: Option<&TempFile>, cmdline: &str) -> LinuxBootConfig {
    LinuxBootConfig {
        kernel: kernel.0.clone(),
        initrd: initrd.map(|f| f.0.clone()),
        cmdline: cmdline.to_string(),
        virtio_mmio: vec![VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 5 }],
        system_map: None,
    }
}

fn read_params(mem: &GuestMemoryMmap<()>) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).expect("zero page")
}

fn read_cstr(mem: &GuestMemoryMmap<()>, addr: u64, max: usize) -> String {
    let mut buf = vec![0u8; max];
    mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
    let end = buf.iter().position(|&b| b == 0).expect("NUL");
    String::from_utf8(buf[..end].to_vec()).expect("utf8")
}

#[test]
fn boot_params_layout_from_synthetic_bzimage() {
    let ram = 64 * MIB;
    let kernel = TempFile::new(&synthetic_bzimage(&BZ_DEFAULT));
    let initrd_bytes: Vec<u8> = (0..MIB + 123).map(|i| (i % 13) as u8).collect();
    let initrd = TempFile::new(&initrd_bytes);
    let mem = guest_mem(ram);
    let setup = load_linux(&mem, ram, 1, &config(&kernel, Some(&initrd), "quiet")).unwrap();

    assert_eq!(setup.format, KernelFormat::BzImage);
    assert_eq!(setup.kernel_load, GuestAddress(0x10_0000));
    assert_eq!(setup.entry, GuestAddress(0x10_0200));
    assert_eq!(setup.kernel_end, 0x10_0000 + 0x40_0000);
    let mut payload = [0u8; 16];
    mem.read_slice(&mut payload, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(payload[..3], [0, 1, 2]);

    let p = read_params(&mem);
    let hdr = p.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!({ hdr.cmdline_size } as usize, setup.cmdline.len() + 1);
    let cmdline = read_cstr(&mem, CMDLINE_ADDR, 4096);
    assert_eq!(cmdline, setup.cmdline);
    // Where KVM emulates guest-kernel instructions, densevm adds `noxsave clearcpuid=... nowatchdog ...`.
    let emulated = if crate::arch::cpuid::kernel_instructions_emulated() {
        " noxsave clearcpuid=smap,popcnt,ssse3,erms,fsrm nowatchdog clocksource=kvm-clock \
         initcall_blacklist=ftrace_check_for_weak_functions cryptomgr.notests"
    } else {
        ""
    };
    assert_eq!(cmdline, format!("quiet console=ttyS0 reboot=k panic=1{emulated} virtio_mmio.device=4K@0xd0000000:5"));

    // Initrd: page-aligned, at the top of RAM, content intact.
    let (addr, size) = setup.initrd.unwrap();
    assert_eq!(size, MIB + 123);
    assert_eq!(addr.0 % 4096, 0);
    assert_eq!(addr.0, (ram - size) & !0xfff);
    assert_eq!({ hdr.ramdisk_image } as u64, addr.0);
    assert_eq!({ hdr.ramdisk_size } as u64, size);
    let mut back = vec![0u8; size as usize];
    mem.read_slice(&mut back, addr).unwrap();
    assert!(back == initrd_bytes);

    // E820 in the zero page: the RAM, and the ACPI tables' BIOS area reserved.
    assert_eq!(p.e820_entries, 3);
    let e: Vec<(u64, u64, u32)> = p.e820_table[..3].iter().map(|e| ({ e.addr }, { e.size }, { e.r#type })).collect();
    assert_eq!(e, vec![(0, 0x9fc00, 1), (0xe_0000, 0x2_0000, 2), (MIB, ram - MIB, 1)]);
    // ACPI: the zero page points to the RSDP, written where the tables say.
    assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
    for t in setup.acpi.tables() {
        let mut back = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(t.addr)).unwrap();
        assert_eq!(back, t.bytes, "{} at {:#x}", t.name, t.addr);
    }
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(0xe_0000)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");

    // Registers of the 64-bit boot protocol.
    assert_eq!(setup.regs.rip, 0x10_0200);
    assert_eq!(setup.regs.rsi, ZERO_PAGE_ADDR);
    assert_eq!(setup.regs.rflags, 2);
}

#[test]
fn loads_synthetic_elf() {
    let code = [0xf4u8, 0xeb, 0xfe, 0x90];
    let kernel = TempFile::new(&synthetic_elf(&code));
    let ram = 64 * MIB;
    let mem = guest_mem(ram);
    let initrd = TempFile::new(&[7u8; 5000]);
    let setup = load_linux(&mem, ram, 1, &config(&kernel, Some(&initrd), "")).unwrap();
    assert_eq!(setup.format, KernelFormat::Elf);
    assert_eq!(setup.entry, GuestAddress(0x100_0000));
    assert_eq!(setup.kernel_end, 0x100_0000 + 4 + 0x2000);
    let mut back = [0u8; 4];
    mem.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
    assert_eq!(back, code);
    let p = read_params(&mem);
    assert_eq!({ p.hdr.header }, HDR_MAGIC);
    assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
    assert_eq!(p.hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
    assert_eq!({ p.hdr.ramdisk_image } as u64, (ram - 5000) & !0xfff);
    assert_eq!(setup.regs.rip, 0x100_0000);
    assert_eq!(setup.regs.rsi, ZERO_PAGE_ADDR);
}

#[test]
fn initrd_placement_limits() {
    // Below initrd_addr_max when that is lower than the RAM end.
    let a = place_initrd(0x1800, 0x50_0000, 0x1ff_ffff, 64 * MIB).unwrap();
    assert_eq!(a, GuestAddress(0x200_0000 - 0x2000));
    // Below the MMIO gap when RAM crosses it.
    let a = place_initrd(MIB, 0x50_0000, 0xffff_ffff, 5 << 30).unwrap();
    assert_eq!(a, GuestAddress(MMIO_GAP_START - MIB));
    // Exactly fits above the kernel.
    assert_eq!(place_initrd(MIB, 15 * MIB, u64::MAX, 16 * MIB).unwrap(), GuestAddress(15 * MIB));
    let err = place_initrd(MIB + 1, 15 * MIB, u64::MAX, 16 * MIB).unwrap_err();
    assert!(matches!(err, Error::InitrdTooBig { available, .. } if available == MIB));
    assert!(place_initrd(u64::MAX, 0, u64::MAX, 16 * MIB).is_err());
}

#[test]
fn initrd_too_big_for_ram_is_a_clear_error() {
    let ram = 16 * MIB;
    let kernel = TempFile::new(&synthetic_bzimage(&BZ_DEFAULT));
    let initrd = TempFile::new(&[]);
    std::fs::File::options().write(true).open(&initrd.0).unwrap().set_len(20 * MIB).unwrap();
    let err = load_linux(&guest_mem(ram), ram, 1, &config(&kernel, Some(&initrd), "")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InitrdTooBig { size, .. } if size == 20 * MIB), "{msg}");
    assert!(msg.contains("does not fit in guest RAM"), "{msg}");
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let ram = 64 * MIB;
    let params = BzParams { initrd_addr_max: 0x1ff_ffff, ..BZ_DEFAULT };
    let kernel = TempFile::new(&synthetic_bzimage(&params));
    let initrd = TempFile::new(&[1u8; 10000]);
    let mem = guest_mem(ram);
    let setup = load_linux(&mem, ram, 1, &config(&kernel, Some(&initrd), "")).unwrap();
    let (addr, size) = setup.initrd.unwrap();
    assert!(addr.0 + size <= 0x200_0000);
    assert_eq!(addr.0, (0x200_0000 - 10000) & !0xfff);
}

#[test]
fn kernel_errors() {
    let ram = 64 * MIB;
    let mem = guest_mem(ram);
    // Too long for the kernel's cmdline_size.
    let small = BzParams { cmdline_size: 64, ..BZ_DEFAULT };
    let kernel = TempFile::new(&synthetic_bzimage(&small));
    let err = load_linux(&mem, ram, 1, &config(&kernel, None, "x")).unwrap_err();
    assert!(matches!(err, Error::Cmdline(cmdline::Error::TooLong { max: 64, .. })), "{err}");
    // No 64-bit entry.
    let old = BzParams { xloadflags: 0, ..BZ_DEFAULT };
    let kernel = TempFile::new(&synthetic_bzimage(&old));
    let err = load_linux(&mem, ram, 1, &config(&kernel, None, "")).unwrap_err();
    assert!(matches!(err, Error::NotLongModeKernel { .. }), "{err}");
    // Not a kernel.
    let kernel = TempFile::new(&[0u8; 4096]);
    let err = load_linux(&mem, ram, 1, &config(&kernel, None, "")).unwrap_err();
    assert!(matches!(err, Error::UnknownKernelFormat(_)), "{err}");
    // Missing files.
    let cfg = LinuxBootConfig { kernel: "/nonexistent/vmlinux".into(), ..Default::default() };
    let err = load_linux(&mem, ram, 1, &cfg).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    // Kernel larger than RAM.
    let kernel = TempFile::new(&synthetic_bzimage(&BZ_DEFAULT));
    let tiny = guest_mem(MIB + 0x2000);
    let err = load_linux(&tiny, MIB + 0x2000, 1, &config(&kernel, None, "")).unwrap_err();
    assert!(matches!(err, Error::LoadKernel { .. }), "{err}");
}

#[test]
fn boot_tables_in_guest_memory() {
    let mem = guest_mem(16 * MIB);
    regs::write_boot_tables(&mem).unwrap();
    let gdt: [u64; 6] = std::array::from_fn(|i| mem.read_obj(GuestAddress(BOOT_GDT_ADDR + 8 * i as u64)).unwrap());
    assert_eq!(gdt, regs::BOOT_GDT);
    assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
    assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
    let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
    assert_eq!(pml4, PDPT_ADDR | 3);
    for gib in 0..4u64 {
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 8 * gib)).unwrap();
        assert_eq!(pdpte, (PD_ADDR + 0x1000 * gib) | 3);
        for i in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 0x1000 * gib + 8 * i)).unwrap();
            assert_eq!(pde, (gib << 30) + (i << 21) + 0x83, "gib {gib} entry {i}");
        }
    }
    let unused: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 8 * 4)).unwrap();
    assert_eq!(unused, 0);
}

#[test]
fn boot_sregs_are_long_mode() {
    let mut sregs = kvm_bindings::kvm_sregs::default();
    regs::apply_boot_sregs(&mut sregs);
    assert_eq!(sregs.cs.selector, 0x10);
    assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.present, sregs.cs.dpl), (1, 0, 1, 0));
    assert_eq!((sregs.cs.base, sregs.cs.limit, sregs.cs.type_), (0, 0xffff_ffff, 0xb));
    for seg in [sregs.ds, sregs.es, sregs.ss] {
        assert_eq!((seg.selector, seg.type_, seg.db, seg.s), (0x18, 3, 1, 1));
    }
    assert_eq!((sregs.tr.selector, sregs.tr.type_, sregs.tr.s), (0x20, 0xb, 0));
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 47));
    assert_eq!(sregs.cr3, PML4_ADDR);
    assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
    assert_eq!(sregs.cr4 & 0x20, 0x20);
    assert_eq!(sregs.efer, 0x500);
}

#[test]
fn configure_boot_vcpu_on_kvm() {
    let Ok(kvm) = Kvm::new() else {
        skip("configure_boot_vcpu_on_kvm: /dev/kvm not usable");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&boot_cpuid(&kvm, 0).unwrap()).unwrap();
    let kernel = TempFile::new(&synthetic_bzimage(&BZ_DEFAULT));
    let mem = guest_mem(64 * MIB);
    let setup = load_linux(&mem, 64 * MIB, 1, &config(&kernel, None, "")).unwrap();
    configure_boot_vcpu(&vcpu, &setup).unwrap();
    let r = vcpu.get_regs().unwrap();
    assert_eq!((r.rip, r.rsi, r.rflags), (0x10_0200, ZERO_PAGE_ADDR, 2));
    let s = vcpu.get_sregs().unwrap();
    assert_eq!((s.cs.selector, s.cs.l, s.cr3, s.efer & 0x500), (0x10, 1, PML4_ADDR, 0x500));
    let lapic = vcpu.get_lapic().unwrap();
    let lvt = |off: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
    assert_eq!((lvt(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
    assert_eq!((lvt(0x360) >> 8) & 7, 4, "LINT1 NMI");

    // Without an irqchip the error says what to do.
    let vm2 = kvm.create_vm().unwrap();
    let vcpu2 = vm2.create_vcpu(0).unwrap();
    let err = configure_boot_vcpu(&vcpu2, &setup).unwrap_err();
    assert!(err.to_string().contains("create_irq_chip"), "{err}");
}

/// The real Debian kernel, if `resources/linux/build-guest.sh` has been run.
#[test]
fn loads_real_bzimage_when_built() {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/out");
    let (kernel, initrd) = (out.join("bzImage"), out.join("initramfs.cpio.gz"));
    if !kernel.exists() || !initrd.exists() {
        skip(&format!(
            "loads_real_bzimage_when_built: {} not built (run resources/linux/build-guest.sh)",
            kernel.display()
        ));
        return;
    }
    let ram = 256 * MIB;
    let mem = guest_mem(ram);
    let cfg = LinuxBootConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: "console=ttyS0".into(),
        virtio_mmio: vec![],
        system_map: None,
    };
    let setup = load_linux(&mem, ram, 1, &cfg).unwrap();
    assert_eq!(setup.format, KernelFormat::BzImage);
    assert_eq!(setup.entry, GuestAddress(0x10_0200));
    let p = read_params(&mem);
    assert!({ p.hdr.version } >= MIN_BOOT_PROTOCOL);
    let (addr, size) = setup.initrd.unwrap();
    assert!(addr.0 >= setup.kernel_end && addr.0 + size <= ram);
}

#[test]
fn low_memory_layout_does_not_overlap() {
    let gdt_end = BOOT_GDT_ADDR + std::mem::size_of_val(&regs::BOOT_GDT) as u64;
    let areas = [
        (BOOT_GDT_ADDR, gdt_end),
        (regs::BOOT_IDT_ADDR, regs::BOOT_IDT_ADDR + 8),
        (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 4096),
        (regs::BOOT_STACK_POINTER - 0x800, regs::BOOT_STACK_POINTER),
        (PML4_ADDR, PML4_ADDR + 4096),
        (PDPT_ADDR, PDPT_ADDR + 4096),
        (PD_ADDR, PD_ADDR + 4096 * regs::IDENTITY_MAPPED_GIB),
        (CMDLINE_ADDR, e820::EBDA_START),
        (crate::arch::acpi::ACPI_AREA_START, crate::arch::acpi::ACPI_AREA_END),
    ];
    for (i, a) in areas.iter().enumerate() {
        for b in &areas[i + 1..] {
            assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
        }
    }
}

#[test]
fn acpi_tables_list_the_virtio_devices_and_refuse_bad_ones() {
    let ram = 64 * MIB;
    let kernel = TempFile::new(&synthetic_bzimage(&BZ_DEFAULT));
    let mem = guest_mem(ram);
    let setup = load_linux(&mem, ram, 1, &config(&kernel, None, "")).unwrap();
    let dsdt = &setup.acpi.table("DSDT").unwrap().bytes;
    assert_eq!(dsdt.windows(9).filter(|w| w == b"LNRO0005\0").count(), 1);
    // The command line still announces the device, for kernels without ACPI.
    assert!(setup.cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"), "{}", setup.cmdline);

    // A device the DSDT cannot describe, or no vCPU: a clear error, nothing loaded.
    let mut cfg = config(&kernel, None, "");
    cfg.virtio_mmio[0].addr = 0x1_0000_0000;
    let err = load_linux(&guest_mem(ram), ram, 1, &cfg).unwrap_err();
    assert!(matches!(err, Error::Acpi(crate::arch::acpi::Error::BadVirtioDevice { .. })), "{err}");
    assert!(err.to_string().contains("0x100000000"), "{err}");
    let err = load_linux(&guest_mem(ram), ram, 0, &config(&kernel, None, "")).unwrap_err();
    assert!(matches!(err, Error::Acpi(crate::arch::acpi::Error::BadVcpuCount(0))), "{err}");
}
