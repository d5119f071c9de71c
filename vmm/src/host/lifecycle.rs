//! Creating and removing VMs: admission on the event loop, the slow build or
//! teardown on any thread ([`Creation`], [`Removal`]).

use std::sync::Arc;

use event_manager::{EventOps, Events};
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use memory::MemoryManager;
use vmm_sys_util::epoll::EventSet;

use super::events::device_token;
use super::{Entry, Error, Host, FD_INDEX_BITS};
use crate::control::{ControlGate, ControlOutOfMemory};
use crate::dirty_log::KvmDirtyLog;
use crate::domains::FIRST_NAMED_DOMAIN;
use crate::vm::{self, Vm, VmSpec};

/// A VM admitted by [`Host::begin_create`], to be built by [`Creation::build`]
/// (on any thread: building a big VM takes seconds, mostly in KVM's memslot
/// setup) and then handed to [`Host::finish_create`] on the event loop.
pub struct Creation {
    pub(super) kvm: Arc<Kvm>,
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

impl Host {
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
}
