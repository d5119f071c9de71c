//! seccomp filters, one per thread kind, built with `seccompiler` (as Firecracker
//! does) and installed by each thread on itself at its start (thread-level: no
//! `SECCOMP_FILTER_FLAG_TSYNC`). A thread spawned by a filtered thread inherits its
//! parent's filter and stacks its own on it; the kernel applies the strictest
//! answer of the stack.
//!
//! | kind | threads | installed by |
//! | --- | --- | --- |
//! | [`Kind::Api`] | `densevm-api`, `densevm-api-rt` (tokio workers and blocking pool) | the api crate's thread-start hook |
//! | [`Kind::Vmm`] | the daemon's main thread (event loop), `run`'s main thread; inherited by `densevm-facts`, `densevm-unmerge`, `densevm-compreq` | `serve`/`run` before the loop |
//! | [`Kind::Vcpu`] | `vcpuN` | vmm's vCPU thread-start hook |
//! | [`Kind::Merger`] | `densevm-merger` | memory's thread-start hook |
//! | [`Kind::Compactor`] | `densevm-compact` | memory's thread-start hook |
//! | [`Kind::FaultHandler`] | `uffd-handler` | memory's thread-start hook |
//! | [`Kind::VmaCounter`] | `densevm-vmacount` | memory's thread-start hook |
//!
//! A syscall outside a thread's list is refused with `EPERM` ([`Mode::Enforce`]),
//! or allowed and logged by the kernel ([`Mode::Log`]: `SECCOMP_RET_LOG`, seen in
//! `dmesg` as `type=1326 audit ... comm="THREAD" ... syscall=NR`).

mod api;
mod compactor;
mod fault_handler;
mod merger;
mod rules;
mod vcpu;
mod vma_counter;
mod vmm;

use std::collections::HashMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What happens to a syscall outside a thread's allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refused with `EPERM` (the thread sees an error and carries on).
    Enforce,
    /// Allowed, and logged by the kernel (`SECCOMP_RET_LOG`).
    Log,
    /// No filter.
    Off,
}

/// The kinds of thread that get a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The API server's threads.
    Api,
    /// The VMM event loop (and the helper threads it spawns).
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The memory manager's merger (scanner).
    Merger,
    /// The memory manager's compactor.
    Compactor,
    /// The userfaultfd fault handler.
    FaultHandler,
    /// The memory manager's mapping counter (statistics).
    VmaCounter,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] =
        [Kind::Api, Kind::Vmm, Kind::Vcpu, Kind::Merger, Kind::Compactor, Kind::FaultHandler, Kind::VmaCounter];

    /// The allow-list of this kind.
    fn rules(self) -> rules::Rules {
        match self {
            Kind::Api => api::rules(),
            Kind::Vmm => vmm::rules(),
            Kind::Vcpu => vcpu::rules(),
            Kind::Merger => merger::rules(),
            Kind::Compactor => compactor::rules(),
            Kind::FaultHandler => fault_handler::rules(),
            Kind::VmaCounter => vma_counter::rules(),
        }
    }
}

impl From<memory::ThreadKind> for Kind {
    fn from(k: memory::ThreadKind) -> Self {
        match k {
            memory::ThreadKind::Merger => Kind::Merger,
            memory::ThreadKind::Compactor => Kind::Compactor,
            memory::ThreadKind::FaultHandler => Kind::FaultHandler,
            memory::ThreadKind::VmaCounter => Kind::VmaCounter,
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This architecture has no filters.
    #[error("seccomp filters are not available on {0}")]
    Arch(&'static str),
    /// A filter did not compile.
    #[error("building the {0:?} seccomp filter: {1}")]
    Build(Kind, seccompiler::Error),
    /// The kernel refused a filter.
    #[error("installing the {0:?} seccomp filter: {1}")]
    Install(Kind, seccompiler::Error),
}

/// The compiled filters of every kind, for one mode.
#[derive(Debug)]
pub struct Filters {
    mode: Mode,
    programs: HashMap<Kind, BpfProgram>,
}

impl Filters {
    /// Compiles every kind's filter for `mode` (none for [`Mode::Off`]).
    pub fn build(mode: Mode) -> Result<Arc<Self>, Error> {
        let mismatch = match mode {
            Mode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
            Mode::Log => SeccompAction::Log,
            Mode::Off => return Ok(Arc::new(Filters { mode, programs: HashMap::new() })),
        };
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| Error::Arch(std::env::consts::ARCH))?;
        let mut programs = HashMap::new();
        for kind in Kind::ALL {
            let filter = SeccompFilter::new(kind.rules(), mismatch.clone(), SeccompAction::Allow, arch)
                .map_err(|e| Error::Build(kind, e.into()))?;
            let program = BpfProgram::try_from(filter).map_err(|e| Error::Build(kind, e.into()))?;
            programs.insert(kind, program);
        }
        Ok(Arc::new(Filters { mode, programs }))
    }

    /// Installs the filter of `kind` on the calling thread (nothing in
    /// [`Mode::Off`]).
    pub fn install(&self, kind: Kind) -> Result<(), Error> {
        match self.programs.get(&kind) {
            Some(program) => seccompiler::apply_filter(program).map_err(|e| Error::Install(kind, e)),
            None => Ok(()),
        }
    }

    /// Installs the filter of `kind` on the calling thread from a thread-start hook,
    /// where an error cannot be returned: it is logged (the thread then runs under
    /// its parent's filter only).
    pub fn install_or_log(&self, kind: Kind) {
        match self.install(kind) {
            Ok(()) => tracing::debug!(?kind, mode = ?self.mode, "seccomp filter installed"),
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// The hook the memory manager runs on its background threads.
    pub fn memory_hook(self: &Arc<Self>) -> memory::ThreadStartHook {
        let filters = self.clone();
        memory::ThreadStartHook::new(move |k| filters.install_or_log(k.into()))
    }

    /// A hook installing `kind`'s filter on the thread that runs it.
    pub fn hook(self: &Arc<Self>, kind: Kind) -> Arc<dyn Fn() + Send + Sync> {
        let filters = self.clone();
        Arc::new(move || filters.install_or_log(kind))
    }
}

#[cfg(test)]
mod tests;
