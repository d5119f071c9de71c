//! What kind of failure an error is, for the callers that turn errors into an
//! outcome: the API bridge (an HTTP status) and the CLI (an exit code). Both map
//! from [`ErrorKind`], so an error is classified once, here.

use crate::domains;
use crate::guest_ram;
use crate::host;
use crate::vm;

/// The class of a VMM failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is wrong: bad configuration, workload scenario or RAM
    /// size, an undeclared merge domain (HTTP 400, CLI exit 2).
    InvalidInput,
    /// The Linux kernel or initrd given cannot be loaded or booted. The API
    /// answers 400 (its client chose the kernel); `densevm run` reports it as a
    /// runtime failure (exit 1), as it always has.
    UnbootableKernel,
    /// The VM or merge domain named does not exist (HTTP 404, CLI exit 1).
    NotFound,
    /// The request does not fit the current state: the VM exists already or is
    /// being created or deleted, its state does not allow the operation, a
    /// merge domain exists with another policy, is full or still has VMs, the
    /// frame pool is full, memory commitment, the host memory budget or the
    /// daemon's maxima of VMs and vCPUs refuse a new VM, or unmerging has no
    /// room (HTTP 409, CLI exit 1).
    Conflict,
    /// Anything else: KVM, host I/O, the memory manager (HTTP 500, CLI exit 1).
    Internal,
}

/// The class of a memory manager error: the pool full, commitment refusing
/// a VM or unmerging without room are conflicts with the current state; a bad
/// commitment policy is invalid input; anything else is internal.
pub fn memory_error_kind(e: &memory::manager::Error) -> ErrorKind {
    use memory::manager::{CommitError, Error as Mem};
    match e {
        Mem::Commit(CommitError::BadRatio(_)) => ErrorKind::InvalidInput,
        Mem::PoolFull { .. } | Mem::Commit(_) | Mem::TooManyGuests(_) => ErrorKind::Conflict,
        _ => ErrorKind::Internal,
    }
}

impl vm::Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            vm::Error::Config(_) | vm::Error::Workload(_) | vm::Error::Ram(guest_ram::Error::Size(_)) => {
                ErrorKind::InvalidInput
            }
            vm::Error::Linux(_) => ErrorKind::UnbootableKernel,
            vm::Error::State { .. } => ErrorKind::Conflict,
            vm::Error::Ram(guest_ram::Error::Manager(e)) if memory_error_kind(e) == ErrorKind::Conflict => {
                ErrorKind::Conflict
            }
            _ => ErrorKind::Internal,
        }
    }
}

impl host::Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            host::Error::NoSuchVm(_) => ErrorKind::NotFound,
            host::Error::Exists(_) | host::Error::OverBudget { .. } => ErrorKind::Conflict,
            host::Error::Admission(e) if e.is_invalid_input() => ErrorKind::InvalidInput,
            host::Error::Admission(_) => ErrorKind::Conflict,
            host::Error::Domain(e) if e.is_invalid_input() => ErrorKind::InvalidInput,
            host::Error::Domain(domains::Error::NotFound(_)) => ErrorKind::NotFound,
            host::Error::Domain(_) => ErrorKind::Conflict,
            host::Error::Memory(e) => memory_error_kind(e),
            host::Error::Vm(e) => e.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmState;

    #[test]
    fn kinds() {
        let state = vm::Error::State { id: "a".into(), state: VmState::Running, what: "start" };
        assert_eq!(host::Error::Vm(state).kind(), ErrorKind::Conflict);
        assert_eq!(host::Error::NoSuchVm("a".into()).kind(), ErrorKind::NotFound);
        assert_eq!(host::Error::Exists("a".into()).kind(), ErrorKind::Conflict);
        assert_eq!(host::Error::Vm(vm::Error::Config("x".into())).kind(), ErrorKind::InvalidInput);
        assert_eq!(host::Error::Vm(vm::Error::Ram(guest_ram::Error::Size(0))).kind(), ErrorKind::InvalidInput);
        let full = memory::manager::Error::PoolFull { free: 1, needed: 2 };
        assert_eq!(host::Error::Vm(vm::Error::Ram(guest_ram::Error::Manager(full))).kind(), ErrorKind::Conflict);
        let many = memory::manager::Error::TooManyGuests(memory::write_retry::RangeTableFull);
        assert_eq!(host::Error::Vm(vm::Error::Ram(guest_ram::Error::Manager(many))).kind(), ErrorKind::Conflict);
        assert_eq!(host::Error::Io("x".into()).kind(), ErrorKind::Internal);
        let over = host::Error::OverBudget { committed_mib: 192, requested_mib: 96, budget_mib: 256 };
        assert_eq!(over.kind(), ErrorKind::Conflict);
        assert_eq!(
            over.to_string(),
            "host memory budget exceeded: 192 MiB of guest memory committed + 96 MiB requested > 256 MiB budget \
             (serve --host-budget-mib)"
        );
        use memory::manager::CommitError;
        let commit =
            CommitError::Overcommitted { committed_mib: 8, requested_mib: 4, limit_mib: 8, pool_mib: 8, ratio: 1.0 };
        let commit = memory::manager::Error::Commit(commit);
        assert_eq!(host::Error::Vm(vm::Error::Ram(guest_ram::Error::Manager(commit))).kind(), ErrorKind::Conflict);
        let room = CommitError::NoRoomToUnmerge { needed: 10, free: 4, missing: 6 };
        assert_eq!(host::Error::Memory(room.into()).kind(), ErrorKind::Conflict);
        let bad = memory::manager::Error::Commit(CommitError::BadRatio(0.5));
        assert_eq!(memory_error_kind(&bad), ErrorKind::InvalidInput);
        assert_eq!(host::Error::Vm(vm::Error::Device("x".into())).kind(), ErrorKind::Internal);
        let d = |e: domains::Error| host::Error::Domain(e).kind();
        assert_eq!(d(domains::Error::Undeclared("a".into())), ErrorKind::InvalidInput);
        assert_eq!(d(domains::Error::NotFound("a".into())), ErrorKind::NotFound);
        assert_eq!(d(domains::Error::HasMembers { name: "a".into(), vms: vec![] }), ErrorKind::Conflict);
        assert_eq!(d(domains::Error::Full { name: "a".into(), max_vms: 1 }), ErrorKind::Conflict);
        let p = domains::DomainPolicy::default();
        assert_eq!(
            d(domains::Error::PolicyConflict { name: "a".into(), existing: p, requested: p }),
            ErrorKind::Conflict
        );
    }
}
