//! Tests of the ACPI tables: their bytes (signatures, lengths, checksums, what
//! each table says) and, where `iasl` is installed, its disassembly of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const BALLOON: VirtioMmioSlot = VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 5 };

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| b[off + i]))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(std::array::from_fn(|i| b[off + i]))
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

fn table<'a>(t: &'a AcpiTables, name: &str) -> &'a [u8] {
    &t.table(name).unwrap_or_else(|| panic!("no {name}")).bytes
}

#[test]
fn rsdp_points_to_xsdt() {
    let t = AcpiTables::build(1, &[BALLOON]).unwrap();
    let rsdp = t.table("RSDP").unwrap();
    assert_eq!(rsdp.addr, 0xe_0000);
    assert_eq!(t.rsdp_addr(), 0xe_0000);
    let b = &rsdp.bytes;
    assert_eq!(b.len(), 36);
    assert_eq!(&b[..8], b"RSD PTR ");
    assert_eq!(sum(&b[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(b), 0, "extended checksum");
    assert_eq!(&b[9..15], b"DENSVM");
    assert_eq!(b[15], 2, "revision 2: XSDT");
    assert_eq!(u32_at(b, 16), 0, "no RSDT");
    assert_eq!(u32_at(b, 20), 36);
    assert_eq!(u64_at(b, 24), t.table("XSDT").unwrap().addr);
}

#[test]
fn every_table_has_a_valid_header_and_its_place() {
    for vcpus in [1, 4, MAX_VCPUS] {
        let t =
            AcpiTables::build(vcpus, &[BALLOON, VirtioMmioSlot { addr: 0xd000_1000, size: 0x1000, irq: 6 }]).unwrap();
        let names: Vec<&str> = t.tables().iter().map(|t| t.name).collect();
        assert_eq!(names, ["RSDP", "DSDT", "FACP", "APIC", "XSDT"]);
        let mut spans = Vec::new();
        for tb in t.tables() {
            assert!(tb.addr >= ACPI_AREA_START && tb.addr + tb.bytes.len() as u64 <= ACPI_AREA_END, "{}", tb.name);
            assert_eq!(tb.addr % 16, 0, "{} aligned", tb.name);
            spans.push((tb.addr, tb.addr + tb.bytes.len() as u64));
            if tb.name == "RSDP" {
                continue;
            }
            let b = &tb.bytes;
            assert_eq!(&b[..4], tb.name.as_bytes());
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{} length", tb.name);
            assert_eq!(sum(b), 0, "{} checksum", tb.name);
            assert_eq!(&b[10..16], b"DENSVM");
            assert_eq!(&b[16..20], b"DENS");
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "tables overlap: {w:x?}");
        }
    }
}

#[test]
fn xsdt_lists_fadt_and_madt() {
    let t = AcpiTables::build(2, &[]).unwrap();
    let x = table(&t, "XSDT");
    assert_eq!(x.len(), 36 + 16);
    assert_eq!(x[8], 1, "revision");
    assert_eq!(u64_at(x, 36), t.table("FACP").unwrap().addr);
    assert_eq!(u64_at(x, 44), t.table("APIC").unwrap().addr);
}

#[test]
fn fadt_is_hw_reduced_and_points_to_dsdt() {
    let t = AcpiTables::build(1, &[BALLOON]).unwrap();
    let f = table(&t, "FACP");
    assert_eq!(f.len(), 276, "ACPI 6 FADT");
    assert_eq!((f[8], f[131]), (6, 5), "FADT 6.5");
    assert_eq!(u32_at(f, 40), 0, "no 32-bit DSDT pointer");
    assert_eq!(u64_at(f, 140), t.table("DSDT").unwrap().addr, "X_DSDT");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON");
    assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON");
    assert_eq!(u16_at(f, 109), 0x2e, "i8042, no VGA, no MSI, no CMOS RTC");
    // No SCI, SMI command port, PM1/PM timer/GPE blocks, FACS.
    assert_eq!(u16_at(f, 46), 0);
    assert!(f[36..40].iter().chain(&f[48..88]).all(|&b| b == 0));
    assert_eq!(u64_at(f, 132), 0, "no X_FIRMWARE_CTRL");
    assert_eq!(&f[268..276], b"DENSEVM\0");
    // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: system I/O, 8 bits, byte access, port 0x600.
    for off in [244, 256] {
        assert_eq!(&f[off..off + 4], &[1, 8, 0, 1], "sleep register GAS at {off}");
        assert_eq!(u64_at(f, off + 4), 0x600);
    }
}

#[test]
fn dsdt_declares_s5_for_power_off() {
    let t = AcpiTables::build(1, &[BALLOON]).unwrap();
    let d = table(&t, "DSDT");
    // Name (_S5_, Package (1) { 5 }) at the root, after the \_SB_ scope.
    let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05];
    assert!(d.ends_with(&s5), "DSDT ends with {:02x?}", &d[d.len() - s5.len()..]);
}

#[test]
fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
    for vcpus in [1u32, 3, MAX_VCPUS] {
        let t = AcpiTables::build(vcpus, &[]).unwrap();
        let m = table(&t, "APIC");
        assert_eq!(m.len(), 44 + 8 * vcpus as usize + 12);
        assert_eq!(u32_at(m, 36), 0xfee0_0000, "local APIC address");
        let mut off = 44;
        for i in 0..vcpus {
            let e = &m[off..off + 8];
            assert_eq!((e[0], e[1], u32::from(e[2]), u32::from(e[3])), (0, 8, i, i), "local APIC {i}");
            assert_eq!(u32_at(e, 4), 1, "enabled");
            off += 8;
        }
        let io = &m[off..off + 12];
        assert_eq!((io[0], io[1], io[2]), (1, 12, 0), "IOAPIC ID 0");
        assert_eq!(u32_at(io, 4), 0xfec0_0000);
        assert_eq!(u32_at(io, 8), 0, "GSI base");
    }
}

/// `Memory32Fixed(ReadWrite, base, len)` as AML resource bytes.
fn memory32(base: u32, len: u32) -> Vec<u8> {
    let mut v = vec![0x86, 9, 0, 1];
    v.extend_from_slice(&base.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// An extended interrupt descriptor: consumer, edge, active high, exclusive.
fn ext_irq(gsi: u32) -> Vec<u8> {
    let mut v = vec![0x89, 6, 0, 0b0011, 1];
    v.extend_from_slice(&gsi.to_le_bytes());
    v
}

#[test]
fn dsdt_lists_each_device() {
    let second = VirtioMmioSlot { addr: 0xd000_1000, size: 0x200, irq: 7 };
    let t = AcpiTables::build(1, &[BALLOON, second]).unwrap();
    let d = table(&t, "DSDT");
    assert_eq!(d[8], 6, "revision: 64-bit integers");
    assert_eq!(count(d, b"LNRO0005\0"), 2);
    assert_eq!(count(d, b"VR00"), 1);
    assert_eq!(count(d, b"VR01"), 1);
    assert_eq!(count(d, &memory32(0xd000_0000, 0x1000)), 1);
    assert_eq!(count(d, &memory32(0xd000_1000, 0x200)), 1);
    assert_eq!(count(d, &ext_irq(5)), 1);
    assert_eq!(count(d, &ext_irq(7)), 1);
    // COM1: EISAID("PNP0501"), IO(Decode16, 0x3f8, 0x3f8, 1, 8), IRQ 4.
    assert_eq!(count(d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
    assert_eq!(count(d, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
    assert_eq!(count(d, &ext_irq(4)), 1);
    // The i8042: EISAID("PNP0303"), ports 0x60 and 0x64, IRQ 1.
    assert_eq!(count(d, &[0x0c, 0x41, 0xd0, 0x03, 0x03]), 1);
    assert_eq!(count(d, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]), 1);
    assert_eq!(count(d, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]), 1);
    assert_eq!(count(d, &ext_irq(1)), 1);
    assert_eq!(count(d, b"_SB_"), 1, "one scope");

    // Without virtio devices: only the legacy ones.
    let t = AcpiTables::build(1, &[]).unwrap();
    assert_eq!(count(table(&t, "DSDT"), b"LNRO0005"), 0);
    assert_eq!(count(table(&t, "DSDT"), b"COM1"), 2, "device name and _DDN");
}

#[test]
fn bad_input_is_an_error() {
    assert!(matches!(AcpiTables::build(0, &[]), Err(Error::BadVcpuCount(0))));
    assert!(matches!(AcpiTables::build(256, &[]), Err(Error::BadVcpuCount(256))));
    let bad = [
        VirtioMmioSlot { addr: 0x1_0000_0000, size: 0x1000, irq: 5 },
        VirtioMmioSlot { addr: 0xffff_f000, size: 0x2000, irq: 5 },
        VirtioMmioSlot { addr: u64::MAX, size: 2, irq: 5 },
        VirtioMmioSlot { addr: 0xd000_0000, size: 0, irq: 5 },
        VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 24 },
        VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 4 },
        VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 1 },
        VirtioMmioSlot { addr: 0xd000_0000, size: 0x1000, irq: 0 },
    ];
    for slot in bad {
        let err = AcpiTables::build(1, &[slot]).unwrap_err();
        assert!(matches!(err, Error::BadVirtioDevice { .. }), "{slot:x?}: {err}");
        assert!(err.to_string().contains("cannot be described in the DSDT"), "{err}");
    }
    // A window ending exactly at 4 GiB still fits the 32-bit descriptor.
    AcpiTables::build(1, &[VirtioMmioSlot { addr: 0xffff_f000, size: 0x1000, irq: 23 }]).unwrap();
    let many: Vec<VirtioMmioSlot> =
        (0..257u64).map(|i| VirtioMmioSlot { addr: 0xd000_0000 + i * 0x1000, size: 0x1000, irq: 5 }).collect();
    assert!(matches!(AcpiTables::build(1, &many), Err(Error::TooManyVirtioDevices(257))));
    // The most devices the DSDT names still fit the area.
    let t = AcpiTables::build(MAX_VCPUS, &many[..256]).unwrap();
    assert_eq!(count(table(&t, "DSDT"), b"LNRO0005\0"), 256);
    assert_eq!(count(table(&t, "DSDT"), b"VRFF"), 1);
}

#[test]
fn placer_refuses_past_the_area() {
    let mut p = Placer { next: ACPI_AREA_START };
    assert_eq!(p.place(1).unwrap(), ACPI_AREA_START);
    assert_eq!(p.place(1).unwrap(), ACPI_AREA_START + 16);
    assert!(matches!(p.place(0x2_0000), Err(Error::TooLarge { .. })));
    let mut p = Placer { next: ACPI_AREA_END - 16 };
    assert_eq!(p.place(16).unwrap(), ACPI_AREA_END - 16);
}

#[test]
fn written_to_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let t = AcpiTables::build(1, &[BALLOON]).unwrap();
    t.write_to(&mem).unwrap();
    for tb in t.tables() {
        let mut back = vec![0u8; tb.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(tb.addr)).unwrap();
        assert_eq!(back, tb.bytes, "{}", tb.name);
    }
    // Memory that does not reach the BIOS area: an error, not a panic.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    assert!(matches!(t.write_to(&small), Err(Error::Memory { table: "RSDP", .. })));
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("densevm-acpi-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Disassembles `file` with `iasl -d` and returns the `.dsl` text; `None` when
/// iasl is not installed.
fn iasl_disassemble(dir: &Path, file: &str) -> Option<String> {
    let out = match Command::new("iasl").arg("-d").arg(file).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "iasl -d {file} failed: {log}");
    let dsl = dir.join(Path::new(file).with_extension("dsl"));
    let text = std::fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("no {}: {e}\n{log}", dsl.display()));
    Some(text)
}

/// The tables, written to files, parse with ACPICA's disassembler (Debian's
/// `acpica-tools`, installed by `resources/ci/install-deps.sh`), which names
/// the virtio-mmio device, its window and its interrupt.
#[test]
fn iasl_disassembles_the_tables() {
    let t = AcpiTables::build(2, &[BALLOON]).unwrap();
    let dir = TempDir::new();
    for tb in t.tables().iter().filter(|tb| tb.name != "RSDP") {
        std::fs::write(dir.0.join(format!("{}.dat", tb.name.to_lowercase())), &tb.bytes).unwrap();
    }
    let Some(dsdt) = iasl_disassemble(&dir.0, "dsdt.dat") else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "SKIPPED iasl_disassembles_the_tables: iasl not installed");
        return;
    };
    let squeezed: String = dsdt.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "Device (VR00)",
        "Name (_HID, \"LNRO0005\")",
        "Memory32Fixed (ReadWrite, 0xD0000000, // Address Base 0x00001000, // Address Length",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }",
        "Device (COM1)",
        "Name (_HID, EisaId (\"PNP0501\")",
        "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment 0x08, // Length",
        "{ 0x00000004, }",
        "Name (_HID, EisaId (\"PNP0303\")",
        "{ 0x00000001, }",
        "Scope (\\_SB)",
        "Name (_S5, Package (0x01) // _S5_: S5 System State { 0x05 })",
    ] {
        assert!(squeezed.contains(want), "DSDT disassembly lacks {want:?}:\n{dsdt}");
    }

    let facp = iasl_disassemble(&dir.0, "facp.dat").expect("iasl");
    let line = |text: &str, key: &str| {
        text.lines().rfind(|l| l.contains(key)).map(|l| l.split(':').next_back().unwrap_or("").trim().to_string())
    };
    assert_eq!(line(&facp, "Hardware Reduced (V5)").as_deref(), Some("1"), "{facp}");
    for reg in ["Sleep Control Register :", "Sleep Status Register :"] {
        let block = facp.split(reg).nth(1).unwrap_or_else(|| panic!("no {reg} in {facp}"));
        let block = block.split("\n\n").next().unwrap_or("");
        assert_eq!(line(block, "Space ID").as_deref(), Some("01 [SystemIO]"), "{reg}: {facp}");
        assert_eq!(line(block, "Address").as_deref(), Some("0000000000000600"), "{reg}: {facp}");
    }
    assert_eq!(line(&facp, "8042 Present on ports 60/64 (V2)").as_deref(), Some("1"), "{facp}");
    let dsdt_addr = format!("{:016X}", t.table("DSDT").unwrap().addr);
    assert_eq!(line(&facp, "DSDT Address").as_deref(), Some(dsdt_addr.as_str()), "{facp}");

    let apic = iasl_disassemble(&dir.0, "apic.dat").expect("iasl");
    assert_eq!(line(&apic, "Local Apic Address").as_deref(), Some("FEE00000"), "{apic}");
    assert_eq!(apic.matches("[Processor Local APIC]").count(), 2, "{apic}");
    assert_eq!(apic.matches("Processor Enabled : 1").count(), 2, "{apic}");
    let ioapic = apic.split("[I/O APIC]").nth(1).unwrap_or_else(|| panic!("no I/O APIC:\n{apic}"));
    assert_eq!(line(ioapic, "Address").as_deref(), Some("FEC00000"), "{apic}");
    assert_eq!(line(ioapic, "I/O Apic ID").as_deref(), Some("00"), "{apic}");

    let xsdt = iasl_disassemble(&dir.0, "xsdt.dat").expect("iasl");
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 2, "{xsdt}");
    // (iasl -d takes only tables with a standard header, so not the RSDP:
    // `rsdp_points_to_xsdt` checks it.)
    for text in [&dsdt, &facp, &apic, &xsdt] {
        assert!(!text.contains("Invalid") && !text.contains("**** "), "iasl warns:\n{text}");
    }
}
