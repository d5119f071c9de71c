//! Building blocks of the allow-lists: a rule set type, helpers for
//! unconditional entries and ioctl-number checks, the union of two sets, and
//! the syscalls every densevm thread makes (std, glibc, the allocator, tracing).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// An allow-list: syscall number -> rules (none: allowed whatever the arguments;
/// some: allowed when any rule matches).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// ioctl "type" byte (bits 8..16 of the request) of KVM (`KVMIO`).
pub const IOCTL_TYPE_KVM: u64 = 0xAE;
/// ioctl "type" byte of userfaultfd (`UFFDIO`).
pub const IOCTL_TYPE_UFFD: u64 = 0xAA;

/// Allows `syscalls` whatever their arguments.
pub fn allow(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        rules.insert(nr, Vec::new());
    }
}

/// Allows `ioctl` when its request's type byte is one of `types` (e.g. every KVM
/// ioctl, but no terminal or socket ioctl).
pub fn allow_ioctl_types(rules: &mut Rules, types: &[u64]) {
    add_conditional(rules, libc::SYS_ioctl, types.iter().map(|&t| masked_eq(1, 0xFF00, t << 8)).collect());
}

/// Allows `ioctl` with one of these exact request numbers.
pub fn allow_ioctl_requests(rules: &mut Rules, requests: &[u64]) {
    add_conditional(rules, libc::SYS_ioctl, requests.iter().map(|&r| eq(1, r)).collect());
}

/// Allows `syscall` when its argument `arg` equals one of `values`.
pub fn allow_arg_values(rules: &mut Rules, syscall: libc::c_long, arg: u8, values: &[u64]) {
    add_conditional(rules, syscall, values.iter().map(|&v| eq(arg, v)).collect());
}

/// Allows `syscall` when its argument `arg`, masked with `mask`, equals `value`.
pub fn allow_arg_masked(rules: &mut Rules, syscall: libc::c_long, arg: u8, mask: u64, value: u64) {
    add_conditional(rules, syscall, vec![masked_eq(arg, mask, value)]);
}

/// `a ∪ b`: a syscall allowed by either is allowed (unconditionally if either
/// allows it unconditionally).
pub fn union(mut a: Rules, b: Rules) -> Rules {
    for (nr, rs) in b {
        match a.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) if rs.is_empty() => existing.clear(),
            Some(existing) => existing.extend(rs),
            None => {
                a.insert(nr, rs);
            }
        }
    }
    a
}

/// The syscalls every thread makes: memory allocation, locks, sleeping, time,
/// logging (writes to stderr), signal return and thread exit.
pub fn common() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_madvise,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_brk,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_tgkill,
            libc::SYS_restart_syscall,
            libc::SYS_sched_getaffinity,
        ],
    );
    r
}

/// What a thread that spawns threads needs (`std::thread::spawn` and the new
/// thread's own set-up, which runs under its parent's filter).
pub fn spawning() -> Rules {
    let mut r = Rules::new();
    allow(&mut r, &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq]);
    // Naming the new thread, and the new thread installing its own filter on top of
    // the inherited one (filters only ever narrow what a thread may do).
    let prctl = [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_NO_NEW_PRIVS].map(|o| o as u64);
    allow_arg_values(&mut r, libc::SYS_prctl, 0, &prctl);
    allow_arg_values(&mut r, libc::SYS_seccomp, 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)]);
    r
}

/// What the memory manager's page operations need (remaps, protection,
/// hole punching, userfaultfd write protection and wake-ups, residency).
pub fn memory_ops() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[libc::SYS_fallocate, libc::SYS_mincore, libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_ftruncate],
    );
    allow_ioctl_types(&mut r, &[IOCTL_TYPE_UFFD]);
    r
}

fn add_conditional(rules: &mut Rules, syscall: libc::c_long, conditions: Vec<Option<SeccompCondition>>) {
    let new: Vec<SeccompRule> =
        conditions.into_iter().flatten().filter_map(|c| SeccompRule::new(vec![c]).ok()).collect();
    if new.is_empty() {
        // An empty list would allow the syscall unconditionally.
        return;
    }
    match rules.get_mut(&syscall) {
        // Already allowed whatever the arguments.
        Some(existing) if existing.is_empty() => {}
        Some(existing) => {
            for rule in new {
                if !existing.contains(&rule) {
                    existing.push(rule);
                }
            }
        }
        None => {
            rules.insert(syscall, new);
        }
    }
}

fn eq(arg: u8, value: u64) -> Option<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).ok()
}

fn masked_eq(arg: u8, mask: u64, value: u64) -> Option<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), value).ok()
}
