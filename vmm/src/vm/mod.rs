//! One microVM: its KVM VM fd, guest RAM memslot, devices, vCPU threads and
//! lifecycle (created -> running <-> paused -> stopped / exited).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memory::MemoryManager;

use crate::arch::{cpl3, cpuid};
use crate::balloon::BalloonDevice;
use crate::boot::linux;
use crate::control::{install_kick_handler, RunMode, VcpuEvent, VmControl};
use crate::device_manager::{self, DeviceManager, DeviceNotice, UnclaimedIo, WorkloadDoorbell};
use crate::guest_ram::{self, GuestRam};
use crate::vcpu::{ExitDiagnostics, VcpuContext, VcpuThread};
use crate::workload::abi::WorkloadReport;
use crate::workload::{self, WorkloadGuest};

/// The exit reason of a workload VM whose every vCPU finished.
pub const WORKLOAD_FINISHED: &str = "workload finished";

mod balloon_setup;
mod spec;
use balloon_setup::{add_balloon, balloon_slot, workload_balloon};
pub use spec::{BootSource, MergeSpec, SerialOut, VmSpec, VmState, VmTimeline};

/// Most vCPUs per VM.
pub const MAX_VCPUS: u32 = 32;
/// Address of the TSS KVM needs on Intel hosts (3 pages below 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel hosts (below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Largest RAM of a Linux guest (one memslot below the 32-bit MMIO gap).
const LINUX_MAX_MEM_MIB: u64 = 3 * 1024;

/// Errors creating or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Ram(#[from] guest_ram::Error),
    /// The workload guest could not be prepared.
    #[error(transparent)]
    Workload(#[from] workload::Error),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Cpl3(#[from] cpl3::Error),
    /// The Linux kernel could not be loaded or its vCPU configured.
    #[error(transparent)]
    Linux(#[from] linux::Error),
    /// Device setup failed.
    #[error("device setup: {0}")]
    Device(String),
    /// The device manager could not build or wire a device.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    /// The request does not fit the VM's state.
    #[error("VM {id} is {state:?}; cannot {what}")]
    State {
        /// VM id.
        id: String,
        /// Current state.
        state: VmState,
        /// Refused operation.
        what: &'static str,
    },
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Host I/O failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A microVM.
pub struct Vm {
    spec: VmSpec,
    state: VmState,
    // Field order matters for teardown: threads stop first, then fds, then RAM.
    threads: Vec<VcpuThread>,
    pending: Vec<VcpuFd>,
    control: Arc<VmControl>,
    devices: DeviceManager,
    workload: Option<WorkloadGuest>,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    created: Instant,
    started: Option<Instant>,
    fill_done: Vec<bool>,
    first_report: Option<Instant>,
    done: Vec<bool>,
    timeline: VmTimeline,
    balloon: Option<BalloonDevice>,
}

impl Vm {
    /// Creates a VM (RAM, memslot, devices, configured vCPUs); it does not run yet.
    pub fn create(
        kvm: &Kvm,
        supported_cpuid: &CpuId,
        manager: &Arc<MemoryManager>,
        mem_id: u32,
        spec: VmSpec,
    ) -> Result<Self, Error> {
        if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("vcpu count must be 1..={MAX_VCPUS}, got {}", spec.vcpus)));
        }
        let is_linux = matches!(spec.boot, BootSource::Linux(_));
        if is_linux && spec.vcpus != 1 {
            return Err(Error::Config("a Linux guest runs on exactly one vCPU (the MADT lists every vCPU, but starting secondary vCPUs (INIT/SIPI) is not built yet)".into()));
        }
        if is_linux && spec.mem_mib > LINUX_MAX_MEM_MIB {
            return Err(Error::Config(format!("a Linux guest may have at most {LINUX_MAX_MEM_MIB} MiB of RAM")));
        }
        install_kick_handler().map_err(Error::Device)?;
        let vm_fd = kvm.create_vm().map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        vm_fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        if is_linux {
            vm_fd
                .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
                .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
            vm_fd.create_irq_chip().map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            vm_fd.create_pit2(pit).map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        }
        let ram = GuestRam::new(manager, mem_id, spec.mem_mib, spec.ram)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            // Dirty logging feeds the merger's change detection.
            flags: if spec.merge.enabled && ram.guest_map().is_some() { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: the region is a live mapping of ram.size() bytes owned by `ram`, which
        // outlives the VM fd (field order in `Vm` drops the fd first).
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;

        let mut pending = Vec::new();
        for i in 0..spec.vcpus {
            let vcpu = vm_fd.create_vcpu(u64::from(i)).map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(supported_cpuid, i as u8)).map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
            pending.push(vcpu);
        }

        let workload = match &spec.boot {
            BootSource::Workload(scenario) => {
                let tsc_khz = pending[0].get_tsc_khz().map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))?;
                let seed = scenario.seed.unwrap_or_else(|| workload::seed_for(&spec.id));
                let printing = spec.serial != SerialOut::None;
                let guest = WorkloadGuest::prepare(
                    ram.memory(),
                    ram.size(),
                    scenario,
                    seed,
                    spec.vcpus,
                    u64::from(tsc_khz),
                    printing,
                )?;
                let mut guest = guest;
                if let Some(ms) = scenario.balloon_hold_ms {
                    workload_balloon(&mut guest, &spec, ram.memory(), ms)?;
                }
                for (i, vcpu) in pending.iter().enumerate() {
                    cpl3::configure(vcpu, &guest.start(i as u32, false))?;
                }
                Some(guest)
            }
            BootSource::Linux(cfg) => {
                let cfg = &balloon_slot(cfg, spec.balloon.is_some());
                let setup = linux::load_linux(ram.memory(), ram.size(), spec.vcpus, cfg)?;
                linux::configure_boot_vcpu(&pending[0], &setup)?;
                None
            }
        };
        let control = VmControl::new().map_err(|e| Error::Io("event fd".into(), e))?;
        let vm_fd = Arc::new(vm_fd);
        // The devices of the boot source: the serial console and i8042 for every
        // guest (interrupts through the in-kernel irqchip of a Linux guest) and the
        // workload guest's doorbell.
        let doorbell = workload.as_ref().map(|w| {
            WorkloadDoorbell::new(w.layout.doorbell_gpa, control.clone(), ram.memory().clone(), spec.pause_after_fill)
        });
        let mut devices = DeviceManager::new(vm_fd.clone(), &spec.id, is_linux);
        devices.add_boot_devices(&spec.serial, doorbell)?;
        let balloon = match &spec.balloon {
            Some(b) => Some(add_balloon(&mut devices, b, &spec, &ram)?),
            None => None,
        };
        Ok(Vm {
            fill_done: vec![false; spec.vcpus as usize],
            first_report: None,
            done: vec![false; spec.vcpus as usize],
            spec,
            state: VmState::Created,
            threads: Vec::new(),
            pending,
            control,
            devices,
            workload,
            vm_fd,
            ram,
            created: Instant::now(),
            started: None,
            timeline: VmTimeline::default(),
            balloon,
        })
    }

    /// The VM's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The VM's spec.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The eventfd that is readable when vCPU events are pending.
    pub fn event_fd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.control.event_fd()
    }

    /// The VM's devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The devices' event fds the host's event loop watches, with their indices
    /// (for [`Vm::handle_device_event`]).
    pub fn device_event_fds(&self) -> impl Iterator<Item = (usize, &vmm_sys_util::eventfd::EventFd)> {
        self.devices.event_fds()
    }

    /// Guest I/O accesses no device claimed so far.
    pub fn unclaimed_io(&self) -> UnclaimedIo {
        self.devices.unclaimed()
    }

    fn refuse(&self, what: &'static str) -> Error {
        Error::State { id: self.spec.id.clone(), state: self.state, what }
    }

    /// The run control shared with the vCPU threads.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.state != VmState::Created {
            return Err(self.refuse("start"));
        }
        for (i, vcpu) in self.pending.drain(..).enumerate() {
            let system_map = match &self.spec.boot {
                BootSource::Linux(cfg) => cfg.system_map.clone(),
                BootSource::Workload(_) => None,
            };
            let diag = ExitDiagnostics { memory: self.ram.memory().clone(), system_map };
            let complete_syscalls =
                matches!(self.spec.boot, BootSource::Linux(_)) && crate::arch::cpuid::kernel_instructions_emulated();
            let ctx = VcpuContext {
                index: i as u32,
                control: self.control.clone(),
                io: self.devices.io().clone(),
                diag,
                complete_syscalls,
            };
            let t = VcpuThread::spawn(vcpu, ctx).map_err(|e| Error::Io("spawning a vCPU thread".into(), e))?;
            self.threads.push(t);
        }
        self.control.set_mode(RunMode::Run);
        self.started = Some(Instant::now());
        self.timeline.start_s = Some(self.created.elapsed().as_secs_f64());
        self.state = VmState::Running;
        Ok(())
    }

    fn live_threads(&self) -> u32 {
        self.threads.iter().filter(|t| !t.is_finished()).count() as u32
    }

    /// Parks every vCPU outside KVM_RUN.
    pub fn pause(&mut self) -> Result<(), Error> {
        if self.state != VmState::Running {
            return Err(self.refuse("pause"));
        }
        self.control.set_mode(RunMode::Pause);
        let n = self.live_threads();
        let threads = &self.threads;
        if !self.control.wait_paused(n, Duration::from_secs(10), || threads.iter().for_each(VcpuThread::kick)) {
            return Err(Error::Device("vCPUs did not pause within 10 s".into()));
        }
        self.state = VmState::Paused;
        Ok(())
    }

    /// Resumes paused vCPUs.
    pub fn resume(&mut self) -> Result<(), Error> {
        if self.state != VmState::Paused {
            return Err(self.refuse("resume"));
        }
        self.control.set_mode(RunMode::Run);
        self.state = VmState::Running;
        Ok(())
    }

    /// Stops every vCPU thread and joins it. Idempotent for stopped/exited VMs.
    pub fn stop(&mut self) {
        self.control.set_mode(RunMode::Stop);
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.threads.iter().for_each(VcpuThread::kick);
            std::thread::sleep(Duration::from_micros(200));
        }
        for t in self.threads.drain(..) {
            t.join();
        }
        self.pending.clear();
        if matches!(self.state, VmState::Created | VmState::Running | VmState::Paused) {
            self.state = VmState::Stopped;
        }
    }

    /// Processes pending vCPU and device events (every device handler polls its
    /// fd: a reset request ends the VM); returns the vCPU events for the caller to log.
    pub fn handle_events(&mut self) -> Vec<VcpuEvent> {
        let notices = self.devices.process_all();
        self.apply_events(notices)
    }

    /// Processes the device event fd `index` (readable in the event loop) and the
    /// pending vCPU events; returns the vCPU events for the caller to log.
    pub fn handle_device_event(&mut self, index: usize) -> Vec<VcpuEvent> {
        let notices = self.devices.process_event(index).into_iter().collect();
        self.apply_events(notices)
    }

    fn apply_events(&mut self, notices: Vec<DeviceNotice>) -> Vec<VcpuEvent> {
        let events = self.control.take_events();
        let mut finished: Option<String> = None;
        for e in &events {
            match e {
                VcpuEvent::FillDone { vcpu, at } => {
                    self.first_report.get_or_insert(*at);
                    if self.spec.pause_after_fill && self.state == VmState::Running {
                        self.state = VmState::Paused;
                    }
                    self.fill_done[*vcpu as usize] = true;
                    if self.fill_done.iter().all(|d| *d) && self.timeline.fill_done_s.is_none() {
                        self.timeline.fill_done_s = self.started.map(|s| s.elapsed().as_secs_f64());
                    }
                }
                VcpuEvent::Done { vcpu } => {
                    self.done[*vcpu as usize] = true;
                    if self.done.iter().all(|d| *d) {
                        finished = Some(WORKLOAD_FINISHED.into());
                    }
                }
                VcpuEvent::Mismatch { .. } => self.timeline.mismatch_events += 1,
                VcpuEvent::Shutdown { reason, .. } => finished = Some(reason.clone()),
                VcpuEvent::Error { message, .. } => finished = Some(format!("error: {message}")),
            }
        }
        for notice in notices {
            match notice {
                DeviceNotice::Reset(reason) | DeviceNotice::PowerOff(reason) => finished = Some(reason),
            }
        }
        if let Some(reason) = self.control.take_out_of_memory() {
            tracing::warn!(vm = %self.spec.id, "stopping the VM: {reason}");
            finished = Some(reason);
        }
        if let Some(reason) = finished {
            self.exit(reason);
        }
        events
    }

    fn exit(&mut self, reason: String) {
        if matches!(self.state, VmState::Stopped | VmState::Exited) {
            return;
        }
        self.timeline.exited_s = self.started.map(|s| s.elapsed().as_secs_f64());
        self.timeline.exit_reason = Some(reason);
        self.stop();
        self.state = VmState::Exited;
    }

    /// The workload guest's summed report, if this VM runs it.
    pub fn workload_report(&self) -> Option<WorkloadReport> {
        self.workload.as_ref().and_then(|w| w.read_report(self.ram.memory()).ok())
    }

    /// When the guest first reported (its first fill-done doorbell).
    pub fn first_report_at(&self) -> Option<Instant> {
        self.first_report
    }

    /// The KVM VM fd (shared with the dirty-log reader).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The workload guest's layout, if this VM runs it.
    pub fn workload(&self) -> Option<&WorkloadGuest> {
        self.workload.as_ref()
    }

    /// The VM's timeline.
    pub fn timeline(&self) -> &VmTimeline {
        &self.timeline
    }

    /// The VM's balloon, if it has one.
    pub fn balloon(&self) -> Option<&BalloonDevice> {
        self.balloon.as_ref()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
