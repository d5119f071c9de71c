//! The host: the registry of microVMs in this process ([`Host`]).
//!
//! - [`lifecycle`]: creating and removing VMs ([`Creation`], [`Removal`]);
//! - [`events`]: the event-manager subscriber that reacts to their vCPU events,
//!   device events (such as reset requests) and termination signals;
//! - [`budget`]: the host memory budget and the per-daemon maxima.

mod budget;
mod events;
mod lifecycle;

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use memory::{ManagerConfig, MemoryManager};
use vmm_sys_util::eventfd::EventFd;

use crate::admission::{self, Admission};
use crate::control::VcpuEvent;
use crate::domains::{self, Declared, DomainInfo, DomainPolicy, Domains};
use crate::vm::{self, Vm, VmState};

/// Event data of the termination-signal eventfd.
const SIGNAL_TOKEN: u32 = 0;
/// Low bits of a VM's event data: 0 for its vCPU-event fd, 1 + i for its devices'
/// event fd i (so a VM may have up to `device_manager::MAX_SUBSCRIPTIONS`).
const FD_INDEX_BITS: u32 = 8;
/// Mask of [`FD_INDEX_BITS`].
const FD_INDEX_MASK: u32 = (1 << FD_INDEX_BITS) - 1;

/// Errors of the host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you root?)")]
    Kvm(kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    /// A VM with that id exists.
    #[error("a VM with id {0} already exists")]
    Exists(String),
    /// No VM with that id.
    #[error("no VM with id {0}")]
    NoSuchVm(String),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// Host I/O failed.
    #[error("{0}")]
    Io(String),
    /// The memory manager could not start.
    #[error("memory manager: {0}")]
    Memory(#[from] memory::manager::Error),
    /// The new VM's guest memory would exceed the host memory budget.
    #[error(
        "host memory budget exceeded: {committed_mib} MiB of guest memory committed + {requested_mib} MiB \
         requested > {budget_mib} MiB budget (serve --host-budget-mib)"
    )]
    OverBudget {
        /// Guest memory of the existing VMs, in MiB.
        committed_mib: u64,
        /// The new VM's guest memory, in MiB.
        requested_mib: u64,
        /// The budget, in MiB.
        budget_mib: u64,
    },
    /// A balloon request failed.
    #[error(transparent)]
    Balloon(#[from] crate::balloon::Error),
    /// Admission control refused the VM (its maxima, or the VM is in flight).
    #[error(transparent)]
    Admission(#[from] admission::Error),
    /// A merge domain request failed (or a VM names an undeclared domain).
    #[error(transparent)]
    Domain(#[from] domains::Error),
}

/// Host-wide settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Capacity of the frame pool (address space of the pool memfd; host memory is
    /// only used for frames guests write).
    pub pool_bytes: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { pool_bytes: DEFAULT_POOL_BYTES }
    }
}

/// Default frame-pool capacity: 64 GiB of address space.
pub const DEFAULT_POOL_BYTES: u64 = 64 << 30;

/// A logged VM event, for the caller to print.
#[derive(Clone, Debug)]
pub struct HostEvent {
    /// VM id.
    pub vm_id: String,
    /// The event.
    pub event: VcpuEvent,
}

struct Entry {
    token: u32,
    vm: Vm,
}

pub use budget::mem_available_bytes;
pub use lifecycle::{Creation, Removal};

/// All microVMs of this process.
pub struct Host {
    /// The declared merge domains and their members.
    domains: Domains,
    kvm: Arc<Kvm>,
    memory: Arc<MemoryManager>,
    next_mem_id: u32,
    cpuid: CpuId,
    vms: BTreeMap<String, Entry>,
    next_token: u32,
    signal_fd: EventFd,
    terminate: bool,
    log: Vec<HostEvent>,
    unregistered: Vec<u32>,
    /// Most guest memory (all VMs, committed at creation) in bytes; `None`: no budget.
    budget_bytes: Option<u64>,
    /// The maxima and the VMs in flight.
    admission: Admission,
}

impl Host {
    /// Opens KVM, reads the supported CPUID and starts the memory manager.
    pub fn new(config: HostConfig) -> Result<Self, Error> {
        Self::new_hooked(config, None)
    }

    /// [`Host::new`] whose memory manager runs `memory_threads` first on each of its
    /// background threads ([`memory::ManagerConfig::thread_start`]).
    pub fn new_hooked(config: HostConfig, memory_threads: Option<memory::ThreadStartHook>) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Cpuid)?;
        let signal_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        let memory = MemoryManager::new(ManagerConfig {
            thread_start: memory_threads,
            ..ManagerConfig::with_capacity(config.pool_bytes)
        })?;
        Ok(Host {
            domains: Domains::default(),
            kvm: Arc::new(kvm),
            memory,
            next_mem_id: 1,
            cpuid,
            vms: BTreeMap::new(),
            next_token: 1 << FD_INDEX_BITS,
            signal_fd,
            terminate: false,
            log: Vec::new(),
            unregistered: Vec::new(),
            budget_bytes: None,
            admission: Admission::default(),
        })
    }

    /// Declares merge domain `name` (see [`crate::domains`]): VMs may name it
    /// from now on. Again with the same policy: nothing changes.
    pub fn declare_domain(&mut self, name: &str, policy: DomainPolicy) -> Result<Declared, Error> {
        let declared = self.domains.declare(name, policy)?;
        if declared == Declared::Created {
            tracing::info!("merge domain {name:?} declared: {policy:?}");
        }
        Ok(declared)
    }

    /// Merge domain `name`.
    pub fn domain(&self, name: &str) -> Result<DomainInfo, Error> {
        Ok(self.domains.get(name)?)
    }

    /// Every merge domain, by name.
    pub fn domains(&self) -> Vec<DomainInfo> {
        self.domains.list()
    }

    /// Deletes merge domain `name`; refused while VMs (counting those being
    /// created or deleted) are its members.
    pub fn remove_domain(&mut self, name: &str) -> Result<(), Error> {
        self.domains.remove(name)?;
        tracing::info!("merge domain {name:?} deleted");
        Ok(())
    }

    /// The memory manager that owns every VM's RAM.
    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM with `id`.
    pub fn vm(&self, id: &str) -> Result<&Vm, Error> {
        self.vms.get(id).map(|e| &e.vm).ok_or_else(|| Error::NoSuchVm(id.to_string()))
    }

    /// The VM with `id`, mutably.
    pub fn vm_mut(&mut self, id: &str) -> Result<&mut Vm, Error> {
        self.vms.get_mut(id).map(|e| &mut e.vm).ok_or_else(|| Error::NoSuchVm(id.to_string()))
    }

    /// Every VM, by id.
    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values().map(|e| &e.vm)
    }

    /// Starts every created VM.
    pub fn start_all(&mut self) -> Result<(), Error> {
        for e in self.vms.values_mut() {
            if e.vm.state() == VmState::Created {
                e.vm.start()?;
            }
        }
        Ok(())
    }

    /// Stops every VM.
    pub fn stop_all(&mut self) {
        for e in self.vms.values_mut() {
            e.vm.stop();
        }
    }

    /// True when a termination signal arrived.
    pub fn terminating(&self) -> bool {
        self.terminate
    }

    /// True when no VM is created, running or paused.
    pub fn all_finished(&self) -> bool {
        self.vms.values().all(|e| matches!(e.vm.state(), VmState::Stopped | VmState::Exited))
    }

    /// Takes the events logged since the last call.
    pub fn take_log(&mut self) -> Vec<HostEvent> {
        std::mem::take(&mut self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::budget::parse_mem_available;
    use super::events::{device_token, split_token};
    use super::*;
    use crate::device_manager::MAX_SUBSCRIPTIONS;
    use crate::vm::VmSpec;

    #[test]
    fn event_tokens_name_the_vm_and_its_fd() {
        let vm = 3 << FD_INDEX_BITS;
        assert_eq!(split_token(vm), (vm, 0));
        assert_eq!(split_token(device_token(vm, 0)), (vm, 1));
        assert_eq!(split_token(device_token(vm, MAX_SUBSCRIPTIONS - 1)), (vm, MAX_SUBSCRIPTIONS as u32));
        assert_ne!(split_token(device_token(vm, MAX_SUBSCRIPTIONS - 1)).0, SIGNAL_TOKEN);
    }

    #[test]
    fn creation_and_removal_move_to_worker_threads() {
        fn send<T: Send>() {}
        send::<Creation>();
        send::<Removal>();
        send::<Result<Vm, Error>>();
    }

    #[test]
    fn mem_available_is_parsed() {
        let text = "MemTotal:       24684100 kB\nMemFree:  1 kB\nMemAvailable:   23226880 kB\n";
        assert_eq!(parse_mem_available(text), Some(23_226_880 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        assert!(mem_available_bytes().is_ok_and(|b| b > 0));
    }

    #[test]
    fn a_device_event_reaches_its_vm_through_the_event_loop() {
        use std::sync::Mutex;

        use crate::workload::scenario::Scenario;
        use event_manager::{EventManager, SubscriberOps};

        use crate::guest_ram::RamPolicy;
        use crate::vm::{BootSource, MergeSpec, SerialOut};

        let Ok(host) = Host::new(HostConfig { pool_bytes: 1 << 30 }) else {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED a_device_event_reaches_its_vm_through_the_event_loop");
            return;
        };
        let host = Arc::new(Mutex::new(host));
        let scenario = Scenario { fill_mib: 1, ..Default::default() };
        let spec = VmSpec {
            id: "r".into(),
            vcpus: 1,
            mem_mib: crate::workload::mem_mib(scenario.fill_mib),
            boot: BootSource::Workload(scenario),
            serial: SerialOut::None,
            ram: RamPolicy::Anonymous { mergeable: false },
            pause_after_fill: false,
            merge: MergeSpec::default(),
            balloon: None,
        };
        crate::driver::lock(&host).create_vm(spec).unwrap();
        let mut em: EventManager<Arc<Mutex<Host>>> = EventManager::new().unwrap();
        em.add_subscriber(host.clone());
        // What a guest writing 0xfe to the i8042 does: the reset fd becomes readable.
        crate::driver::lock(&host).vm("r").unwrap().devices().io().pio_write(0x64, &[0xfe]);
        em.run_with_timeout(1000).unwrap();
        let h = crate::driver::lock(&host);
        let vm = h.vm("r").unwrap();
        assert_eq!(vm.state(), VmState::Exited);
        assert_eq!(vm.timeline().exit_reason.as_deref(), Some("guest requested a reset (i8042)"));
    }
}
