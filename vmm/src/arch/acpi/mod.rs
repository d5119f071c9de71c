//! ACPI tables for a Linux guest, built with the rust-vmm `acpi_tables` crate:
//! how a stock kernel learns of the VM's CPUs, interrupt controllers and the
//! devices it cannot probe (the virtio-mmio devices above all: Debian's kernel
//! finds them only in the DSDT, `_HID "LNRO0005"`).
//!
//! Tables (all in the BIOS area `[ACPI_AREA_START, ACPI_AREA_END)`, which the
//! E820 map reports as reserved, never RAM):
//!
//! | table | content |
//! | --- | --- |
//! | RSDP (at [`RSDP_ADDR`] = 0xe0000) | revision 2, points to the XSDT; where the kernel's BIOS-area scan finds it, and given in `boot_params.acpi_rsdp_addr` too |
//! | XSDT | the FADT and the MADT |
//! | FADT (`FACP`) | HW-reduced ACPI (no PM1/GPE blocks, no SCI, no FACS, no PM timer): densevm has none of that hardware; power and sleep buttons are not fixed features; boot flags: i8042 present, no VGA, no MSI, no CMOS RTC; the sleep control and status registers at I/O port [`SLEEP_CONTROL_PORT`] (a guest's ACPI power-off ends the VM, see [`devices::acpi_sleep`]); points to the DSDT (`X_DSDT`) |
//! | MADT (`APIC`) | local APIC at 0xfee00000; one enabled local APIC per vCPU (UID = APIC ID = index); the IOAPIC (ID 0, 0xfec00000, GSI base 0, KVM's 24 pins); no interrupt source overrides: KVM's default routing sends GSI n to IOAPIC pin n |
//! | DSDT | COM1, the i8042, each virtio-mmio device and the `\_S5_` sleep type ([`dsdt`]) |
//!
//! This matches the VM a Linux guest gets: KVM's in-kernel irqchip (8259 PICs,
//! IOAPIC, local APICs; `KVM_CREATE_IRQCHIP`) and PIT. In HW-reduced mode
//! Linux does not use the PIC or the PIT; interrupts go through the IOAPIC.

pub mod dsdt;
#[cfg(test)]
mod tests;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_sleep::SLEEP_CONTROL_PORT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// First byte of the guest-physical area holding the tables (the BIOS area
/// the kernel scans for the RSDP).
pub const ACPI_AREA_START: u64 = 0xe_0000;
/// End (exclusive) of the tables' area (1 MiB, where the kernel is loaded).
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// Where the RSDP goes (16-byte aligned, in the scanned BIOS area).
pub const RSDP_ADDR: u64 = ACPI_AREA_START;
/// Guest-physical address of the IOAPIC (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Guest-physical address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`): GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// Most vCPUs the MADT can describe (8-bit xAPIC IDs, 0xff is the broadcast ID).
pub const MAX_VCPUS: u32 = 255;
/// OEM ID in every table's header.
pub const OEM_ID: [u8; 6] = *b"DENSVM";
/// FADT's hypervisor vendor identity: tells the guest it runs under densevm.
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"DENSEVM\0";
/// Revision of the DSDT (2 or more: 64-bit AML integers).
const DSDT_REVISION: u8 = 6;
/// Alignment of each table in the area.
const TABLE_ALIGN: u64 = 16;
/// Room kept for the RSDP (36 bytes) before the first table.
const RSDP_ROOM: u64 = 0x40;

/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
mod iapc {
    /// An 8042 (or equivalent) keyboard controller is present.
    pub const I8042: u16 = 1 << 1;
    /// Probing for VGA is not safe: there is none.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// MSI must not be enabled (there is no PCI).
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// There is no CMOS RTC.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// The virtio-mmio devices of the guest: a register window and its interrupt.
/// The DSDT lists them, and the kernel command line announces them too
/// (`virtio_mmio.device=`, for small kernels without ACPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest-physical base address of the device's register window.
    pub addr: u64,
    /// Size of the register window in bytes (usually 4 KiB).
    pub size: u64,
    /// The GSI (IOAPIC pin, legacy IRQ number) the device interrupts on.
    pub irq: u32,
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count cannot be described.
    #[error("the MADT describes 1..={MAX_VCPUS} vCPUs, got {0}")]
    BadVcpuCount(u32),
    /// More virtio-mmio devices than the DSDT names.
    #[error("{0} virtio-mmio devices; the DSDT names at most {max}", max = dsdt::MAX_VIRTIO_DEVICES)]
    TooManyVirtioDevices(usize),
    /// A virtio-mmio device cannot be described.
    #[error("virtio-mmio device at {addr:#x} (size {size:#x}, IRQ {irq}) cannot be described in the DSDT: {why}")]
    BadVirtioDevice {
        /// Its base address.
        addr: u64,
        /// Its window's size.
        size: u64,
        /// Its interrupt.
        irq: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// The tables do not fit their area.
    #[error("the ACPI tables end at {end:#x}, past the end of their area {ACPI_AREA_END:#x}")]
    TooLarge {
        /// Where they would end.
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write the ACPI {table} to guest memory: {source}")]
    Memory {
        /// The table.
        table: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
}

/// One table, serialised, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// Its signature ("RSDP" for the RSD PTR structure, else the header's).
    pub name: &'static str,
    /// Guest-physical address.
    pub addr: u64,
    /// Its bytes, checksummed.
    pub bytes: Vec<u8>,
}

/// A guest's ACPI tables, built by [`AcpiTables::build`], written by
/// [`AcpiTables::write_to`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    tables: Vec<AcpiTable>,
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Hands out addresses in the area, each table 16-byte aligned.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize) -> Result<u64, Error> {
        let addr = self.next;
        let end = addr + len as u64;
        if end > ACPI_AREA_END {
            return Err(Error::TooLarge { end });
        }
        self.next = end.div_ceil(TABLE_ALIGN) * TABLE_ALIGN;
        Ok(addr)
    }
}

impl AcpiTables {
    /// Builds the tables of a guest with `vcpus` vCPUs and the virtio-mmio
    /// devices `virtio` (besides COM1 and the i8042 every guest has).
    pub fn build(vcpus: u32, virtio: &[VirtioMmioSlot]) -> Result<Self, Error> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::BadVcpuCount(vcpus));
        }
        let mut placer = Placer { next: ACPI_AREA_START + RSDP_ROOM };
        let mut tables = Vec::with_capacity(5);

        let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"DENSDSDT", 0);
        dsdt.append_slice(&dsdt::dsdt_body(virtio)?);
        let dsdt = bytes_of(&dsdt);
        let dsdt_addr = placer.place(dsdt.len())?;
        tables.push(AcpiTable { name: "DSDT", addr: dsdt_addr, bytes: dsdt });

        let mut fadt = FADTBuilder::new(OEM_ID, *b"DENSFACP", 0)
            .dsdt_64(dsdt_addr)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton);
        let boot_arch = iapc::I8042 | iapc::VGA_NOT_PRESENT | iapc::MSI_NOT_SUPPORTED | iapc::CMOS_RTC_NOT_PRESENT;
        fadt.iapc_boot_arch = boot_arch.into();
        fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
        // One byte-wide port for both registers (the sleep status reads 0).
        let sleep = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, SLEEP_CONTROL_PORT);
        fadt.sleep_control_reg = sleep;
        fadt.sleep_status_reg = sleep;
        let fadt = bytes_of(&fadt.finalize());
        let fadt_addr = placer.place(fadt.len())?;
        tables.push(AcpiTable { name: "FACP", addr: fadt_addr, bytes: fadt });

        let mut madt = MADT::new(OEM_ID, *b"DENSMADT", 0, LocalInterruptController::Address(LAPIC_ADDR));
        for i in 0..vcpus {
            // i < MAX_VCPUS (255): an 8-bit ID.
            madt.add_structure(ProcessorLocalApic::new(i as u8, i as u8, EnabledStatus::Enabled));
        }
        madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
        let madt = bytes_of(&madt);
        let madt_addr = placer.place(madt.len())?;
        tables.push(AcpiTable { name: "APIC", addr: madt_addr, bytes: madt });

        let mut xsdt = XSDT::new(OEM_ID, *b"DENSXSDT", 0);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let xsdt = bytes_of(&xsdt);
        let xsdt_addr = placer.place(xsdt.len())?;
        tables.push(AcpiTable { name: "XSDT", addr: xsdt_addr, bytes: xsdt });

        let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
        tables.insert(0, AcpiTable { name: "RSDP", addr: RSDP_ADDR, bytes: rsdp });
        Ok(AcpiTables { tables })
    }

    /// The tables, the RSDP first.
    pub fn tables(&self) -> &[AcpiTable] {
        &self.tables
    }

    /// The table named `name` ("RSDP", "XSDT", "FACP", "APIC", "DSDT").
    pub fn table(&self, name: &str) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Guest-physical address of the RSDP (for `boot_params.acpi_rsdp_addr`).
    pub fn rsdp_addr(&self) -> u64 {
        RSDP_ADDR
    }

    /// Writes every table to `mem` at its address.
    pub fn write_to<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), Error> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))
                .map_err(|source| Error::Memory { table: t.name, source })?;
        }
        Ok(())
    }
}
