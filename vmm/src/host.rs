//! The host: the registry of microVMs in this process, and the event-manager
//! subscriber that reacts to their vCPU events, device events (such as reset
//! requests) and termination signals.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use memory::{ManagerConfig, MemoryManager};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::admission::{self, Admission, Limits};
use crate::control::{ControlGate, ControlOutOfMemory, VcpuEvent};
use crate::dirty_log::KvmDirtyLog;
use crate::domains::{self, Declared, DomainInfo, DomainPolicy, Domains, FIRST_NAMED_DOMAIN};
use crate::vm::{self, Vm, VmSpec, VmState};

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

/// A VM admitted by [`Host::begin_create`], to be built by [`Creation::build`]
/// (on any thread: building a big VM takes seconds, mostly in KVM's memslot
/// setup) and then handed to [`Host::finish_create`] on the event loop.
pub struct Creation {
    kvm: Arc<Kvm>,
    cpuid: CpuId,
    memory: Arc<MemoryManager>,
    mem_id: u32,
    domain: u32,
    spec: VmSpec,
}

impl Creation {
    /// The id of the VM being created.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Builds the VM: KVM VM, guest RAM, vCPUs, boot files, devices, and its
    /// registration with the memory manager.
    pub fn build(self) -> Result<Vm, Error> {
        let Creation { kvm, cpuid, memory, mem_id, domain, spec } = self;
        let merge = spec.merge.clone();
        let vm = Vm::create(&kvm, &cpuid, &memory, mem_id, spec)?;
        if vm.ram().guest_map().is_some() {
            memory.set_merge(mem_id, merge.enabled, domain)?;
            let oom = ControlOutOfMemory(vm.control().clone());
            memory.set_out_of_memory_handler(mem_id, Box::new(oom))?;
            if merge.enabled {
                let log = KvmDirtyLog::new(vm.vm_fd().clone(), 0, vm.ram().size() as usize);
                memory.set_dirty_log(mem_id, Box::new(log))?;
                memory.set_vcpu_gate(mem_id, Box::new(ControlGate(vm.control().clone())))?;
            }
        } else if merge.enabled {
            return Err(Error::Vm(vm::Error::Config(
                "densevm merging needs managed RAM; anonymous RAM is merged by the kernel's KSM".into(),
            )));
        }
        Ok(vm)
    }
}

/// A VM taken out of the host by [`Host::begin_remove`]: stop and drop it
/// with [`Removal::finish`] (on any thread: freeing a big VM's memory slots
/// takes a while), then tell the host with [`Host::finish_remove`].
pub struct Removal {
    vm: Vm,
}

impl Removal {
    /// The id of the VM being removed.
    pub fn id(&self) -> &str {
        self.vm.id()
    }

    /// Stops the VM's vCPUs and frees it.
    pub fn finish(mut self) {
        self.vm.stop();
    }
}
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

static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is an eventfd kept open for the
        // process's life once stored; the buffer is 8 valid bytes.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
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

    /// Routes SIGINT and SIGTERM to this host's event loop (a clean stop of every VM).
    pub fn handle_termination_signals(&self) -> Result<(), Error> {
        // The eventfd lives as long as the host; a second host replaces it.
        SIGNAL_EVENT_FD.store(self.signal_fd.as_raw_fd(), Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                .map_err(|e| Error::Io(format!("installing a handler for signal {sig}: {e}")))?;
        }
        Ok(())
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

    /// Sets the host memory budget: VM creation is refused when the guest
    /// memory of every VM (whole sizes, committed at creation, until deleted)
    /// would exceed `bytes`. `None` (the default): no budget, only the memory
    /// manager's commitment limit.
    pub fn set_memory_budget(&mut self, bytes: Option<u64>) {
        self.budget_bytes = bytes;
    }

    /// The host memory budget in force.
    pub fn memory_budget(&self) -> Option<u64> {
        self.budget_bytes
    }

    /// Guest memory of every VM (created until deleted, counting those being
    /// built or torn down), in bytes.
    pub fn committed_guest_bytes(&self) -> u64 {
        self.vms.values().map(|e| e.vm.ram().size()).sum::<u64>() + self.admission.pending_bytes()
    }

    /// Sets the per-daemon maxima of VMs and vCPUs (default: none).
    pub fn set_limits(&mut self, limits: Limits) {
        self.admission.set_limits(limits);
    }

    /// The per-daemon maxima in force.
    pub fn limits(&self) -> Limits {
        self.admission.limits()
    }

    /// vCPUs of every VM (created until deleted).
    fn vcpus_in_use(&self) -> u64 {
        self.vms.values().map(|e| u64::from(e.vm.spec().vcpus)).sum()
    }

    fn check_budget(&self, spec: &VmSpec) -> Result<(), Error> {
        let Some(budget) = self.budget_bytes else { return Ok(()) };
        let committed = self.committed_guest_bytes();
        let requested = spec.mem_mib.saturating_mul(1 << 20);
        if committed.saturating_add(requested) > budget {
            return Err(Error::OverBudget {
                committed_mib: committed >> 20,
                requested_mib: spec.mem_mib,
                budget_mib: budget >> 20,
            });
        }
        Ok(())
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Creates a VM (not started). Register it with the event loop through
    /// [`Host::register_new`] when the loop already runs.
    pub fn create_vm(&mut self, spec: VmSpec) -> Result<(), Error> {
        let creation = self.begin_create(spec)?;
        let id = creation.id().to_string();
        let built = creation.build();
        self.finish_create(&id, built)
    }

    /// Admits a new VM (id free, maxima, memory budget) and reserves its place
    /// until [`Host::finish_create`]; the returned [`Creation`] builds it.
    pub fn begin_create(&mut self, spec: VmSpec) -> Result<Creation, Error> {
        if self.vms.contains_key(&spec.id) {
            return Err(Error::Exists(spec.id));
        }
        self.admission.check_idle(&spec.id)?;
        self.admission.check(spec.vcpus, self.vms.len(), self.vcpus_in_use())?;
        self.check_budget(&spec)?;
        let mem_id = self.next_mem_id;
        // A VM's own merge domain is its memory-manager id: below the named domains'.
        if mem_id >= FIRST_NAMED_DOMAIN {
            return Err(Error::Io("out of memory-manager ids".into()));
        }
        let domain = match &spec.merge.domain {
            Some(name) => self.domains.join(&spec.id, name, mem_id)?,
            None => mem_id,
        };
        self.next_mem_id = mem_id + 1;
        self.admission.reserve(&spec.id, spec.vcpus, spec.mem_mib.saturating_mul(1 << 20), false);
        Ok(Creation {
            kvm: self.kvm.clone(),
            cpuid: self.cpuid.clone(),
            memory: self.memory.clone(),
            mem_id,
            domain,
            spec,
        })
    }

    /// Ends the creation of VM `id` begun by [`Host::begin_create`]: adds the
    /// built VM (it joins the event loop at the next [`Host::register_new`]) or
    /// releases its place.
    pub fn finish_create(&mut self, id: &str, built: Result<Vm, Error>) -> Result<(), Error> {
        self.admission.release(id);
        let token = self.next_token;
        let next = token.checked_add(1 << FD_INDEX_BITS);
        let vm = match (built, next) {
            (Ok(vm), Some(next)) => {
                self.next_token = next;
                vm
            }
            (built, _) => {
                // Not created: the VM leaves its merge domain (and is dropped).
                self.domains.leave(id);
                built?;
                return Err(Error::Io("out of event-loop tokens for new VMs".into()));
            }
        };
        self.unregistered.push(token);
        self.vms.insert(id.to_string(), Entry { token, vm });
        Ok(())
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

    /// Stops and removes a VM, unregistering its fds.
    pub fn remove_vm(&mut self, id: &str, ops: Option<&mut EventOps>) -> Result<(), Error> {
        let removal = self.begin_remove(id, ops)?;
        removal.finish();
        self.finish_remove(id);
        Ok(())
    }

    /// Takes VM `id` out of the host, unregistering its fds; it still counts
    /// against the maxima and the budget until [`Host::finish_remove`].
    pub fn begin_remove(&mut self, id: &str, ops: Option<&mut EventOps>) -> Result<Removal, Error> {
        self.admission.check_idle(id)?;
        let entry = self.vms.remove(id).ok_or_else(|| Error::NoSuchVm(id.to_string()))?;
        if let Some(ops) = ops {
            let _ = ops.remove(Events::with_data(entry.vm.event_fd(), entry.token, EventSet::IN));
            for (i, fd) in entry.vm.device_event_fds() {
                let _ = ops.remove(Events::with_data(fd, device_token(entry.token, i), EventSet::IN));
            }
        }
        self.unregistered.retain(|t| *t != entry.token);
        let spec = entry.vm.spec();
        self.admission.reserve(id, spec.vcpus, entry.vm.ram().size(), true);
        Ok(Removal { vm: entry.vm })
    }

    /// VM `id`, taken out by [`Host::begin_remove`], is gone.
    pub fn finish_remove(&mut self, id: &str) {
        self.admission.release(id);
        self.domains.leave(id);
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

    /// Registers the fds of VMs created since the last registration.
    pub fn register_new(&mut self, ops: &mut EventOps) {
        for token in std::mem::take(&mut self.unregistered) {
            if let Some(e) = self.vms.values().find(|e| e.token == token) {
                let _ = ops.add(Events::with_data(e.vm.event_fd(), token, EventSet::IN));
                for (i, fd) in e.vm.device_event_fds() {
                    if let Err(err) = ops.add(Events::with_data(fd, device_token(token, i), EventSet::IN)) {
                        tracing::warn!(vm = %e.vm.id(), "cannot watch device event fd {i}: {err:?}");
                    }
                }
            }
        }
    }

    fn on_vm_event(&mut self, token: u32) {
        let (vm_token, index) = split_token(token);
        if let Some(e) = self.vms.values_mut().find(|e| e.token == vm_token) {
            let events = match index {
                0 => e.vm.handle_events(),
                i => e.vm.handle_device_event(i as usize - 1),
            };
            for event in events {
                self.log.push(HostEvent { vm_id: e.vm.id().to_string(), event });
            }
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (the default host memory budget).
pub fn mem_available_bytes() -> Result<u64, Error> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::Io(format!("/proc/meminfo: {e}")))?;
    parse_mem_available(&text).ok_or_else(|| Error::Io("/proc/meminfo has no MemAvailable line".into()))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Event data of a VM's device event fd `index` (the VM's own token is `vm_token`).
fn device_token(vm_token: u32, index: usize) -> u32 {
    // The device manager caps subscriptions below the index mask.
    vm_token | ((index as u32 + 1) & FD_INDEX_MASK)
}

/// The VM token and fd index (0: vCPU events, 1 + i: device event fd i) of `token`.
fn split_token(token: u32) -> (u32, u32) {
    (token & !FD_INDEX_MASK, token & FD_INDEX_MASK)
}

impl MutEventSubscriber for Host {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == SIGNAL_TOKEN {
            let _ = self.signal_fd.read();
            self.terminate = true;
            self.stop_all();
        } else {
            self.on_vm_event(token);
        }
        self.register_new(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.signal_fd, SIGNAL_TOKEN, EventSet::IN));
        self.register_new(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_manager::MAX_SUBSCRIPTIONS;

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
