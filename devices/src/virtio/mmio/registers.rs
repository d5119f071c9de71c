//! The register file of [`MmioTransport`]: dispatch of the guest's accesses
//! to the control registers and the configuration space.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::{MmioTransport, CONFIG_OFFSET, MAGIC_VALUE, MMIO_VERSION, VENDOR_ID};
use crate::bus::BusDevice;
use crate::virtio::VirtioDevice;

impl<D: VirtioDevice> MmioTransport<D> {
    fn read_register(&mut self, offset: u32) -> u32 {
        let sel = self.queue_sel as usize;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queues.get(sel).map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(sel).map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.bad_access(&format!("read of register {offset:#x}"), false);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        let s = self.status;
        let features_open = s & VIRTIO_CONFIG_S_DRIVER != 0 && s & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                n if v != 0 => self.refuse(&format!("driver features {v:#x} in word {n}")),
                _ => {}
            },
            VIRTIO_MMIO_DRIVER_FEATURES => self.refuse("driver features outside feature negotiation"),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_field(offset, v),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.process_queue(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.irq.status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => self.bad_access(&format!("write of {v:#x} to register {offset:#x}"), false),
        }
    }

    /// The selected queue when the driver may set it up now.
    fn queue_in_setup(&mut self, what: &str) -> Option<usize> {
        let sel = self.queue_sel as usize;
        let setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        match self.queues.get(sel) {
            Some(q) if setup && !q.ready() => Some(sel),
            _ => {
                self.refuse(&format!("{what} of queue {sel} outside its setup"));
                None
            }
        }
    }

    fn write_queue_field(&mut self, offset: u32, v: u32) {
        let Some(sel) = self.queue_in_setup("setting a field") else { return };
        let q = &mut self.queues[sel];
        let (desc, avail, used) = (q.desc_table(), q.avail_ring(), q.used_ring());
        let ok = match offset {
            VIRTIO_MMIO_QUEUE_NUM => u16::try_from(v).ok().is_some_and(|n| q.try_set_size(n).is_ok()),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.try_set_desc_table_address(GuestAddress(low(desc, v))).is_ok(),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.try_set_desc_table_address(GuestAddress(high(desc, v))).is_ok(),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.try_set_avail_ring_address(GuestAddress(low(avail, v))).is_ok(),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.try_set_avail_ring_address(GuestAddress(high(avail, v))).is_ok(),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.try_set_used_ring_address(GuestAddress(low(used, v))).is_ok(),
            _ => q.try_set_used_ring_address(GuestAddress(high(used, v))).is_ok(),
        };
        if !ok {
            self.queue_bad[sel] = true;
            if self.log.allow() {
                tracing::warn!("virtio-mmio: queue {sel}: invalid value {v:#x} for register {offset:#x}");
            }
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let sel = self.queue_sel as usize;
        if v == 0 {
            // A no-op on a queue that is not ready (drivers write it while tearing
            // down after a reset); disabling a live queue needs a device reset.
            if self.queues.get(sel).is_some_and(|q| q.ready()) {
                self.refuse(&format!("disabling live queue {sel} without a reset"));
            }
            return;
        }
        let Some(sel) = self.queue_in_setup("enabling") else { return };
        let q = &mut self.queues[sel];
        q.set_ready(true);
        if self.queue_bad[sel] || !q.is_valid(&self.mem) {
            q.set_ready(false);
            self.needs_reset(&format!("queue {sel} made ready with an invalid size or ring"));
        }
    }
}

fn low(addr: u64, v: u32) -> u64 {
    (addr & !0xffff_ffff) | u64::from(v)
}

fn high(addr: u64, v: u32) -> u64 {
    (addr & 0xffff_ffff) | (u64::from(v) << 32)
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            return self.device.read_config(offset - CONFIG_OFFSET, data);
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(&*data)) {
            (Ok(reg), Ok(_)) if reg % 4 == 0 => {
                let v = self.read_register(reg);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                data.fill(0);
                self.bad_access(&format!("{}-byte read at {offset:#x}", data.len()), true);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            let writable = self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0;
            if writable {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            } else {
                self.refuse(&format!("config write at {offset:#x} before DRIVER"));
            }
            return;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(reg), Ok(bytes)) if reg % 4 == 0 => self.write_register(reg, u32::from_le_bytes(bytes)),
            _ => self.bad_access(&format!("{}-byte write at {offset:#x}", data.len()), true),
        }
    }
}
