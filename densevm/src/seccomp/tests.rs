//! Tests of the filters: every kind compiles, and in a thread of the test process
//! (thread-level filters leave the other threads alone) a forbidden syscall is
//! refused with `EPERM` while the kind's own syscalls still reach the kernel.

use super::*;

/// Runs `f` on a new thread after installing `kind`'s filter in `mode`.
fn in_filtered_thread<T: Send + 'static>(mode: Mode, kind: Kind, f: impl FnOnce() -> T + Send + 'static) -> T {
    let filters = Filters::build(mode).expect("filters compile");
    std::thread::spawn(move || {
        filters.install(kind).expect("filter installs");
        f()
    })
    .join()
    .expect("filtered thread")
}

/// The errno of a raw syscall (0 on success).
fn errno_of(ret: libc::c_long) -> i32 {
    if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn socket() -> i32 {
    // SAFETY: plain syscall, no pointers; a descriptor it returns is closed.
    let fd = unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    let err = errno_of(fd);
    if fd >= 0 {
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd as i32) };
    }
    err
}

fn execve() -> i32 {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: valid NUL-terminated strings and NULL-terminated arrays; this runs
    // only where the filter refuses it (the test fails if it ever succeeds, as the
    // process image would be replaced).
    errno_of(unsafe { libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
}

fn ioctl(request: u64) -> i32 {
    // SAFETY: an ioctl on an fd number that is not open: the kernel answers EBADF
    // if the filter lets it through.
    errno_of(unsafe { libc::syscall(libc::SYS_ioctl, 987_654, request, 0) })
}

#[test]
fn every_kind_compiles_in_every_mode() {
    for mode in [Mode::Enforce, Mode::Log] {
        let f = Filters::build(mode).expect("compiles");
        for kind in Kind::ALL {
            assert!(!f.programs[&kind].is_empty(), "{kind:?}");
        }
    }
    assert!(Filters::build(Mode::Off).expect("off").programs.is_empty());
}

#[test]
fn a_vcpu_thread_cannot_open_a_socket_or_exec() {
    let (sock, exec) = in_filtered_thread(Mode::Enforce, Kind::Vcpu, || (socket(), execve()));
    assert_eq!(sock, libc::EPERM, "socket() on a vCPU thread");
    assert_eq!(exec, libc::EPERM, "execve() on a vCPU thread");
    // The filter was the thread's own: this thread still may.
    assert_eq!(socket(), 0);
}

#[test]
fn a_vcpu_thread_opens_files_read_only_or_not_at_all() {
    let open = |flags: i32| {
        let path = c"/proc/self/status";
        // SAFETY: a NUL-terminated path; a descriptor it returns is closed.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), flags | libc::O_CLOEXEC) };
        let err = errno_of(fd.into());
        if fd >= 0 {
            // SAFETY: `fd` is ours.
            unsafe { libc::close(fd) };
        }
        err
    };
    let (ro, rw) = in_filtered_thread(Mode::Enforce, Kind::Vcpu, move || (open(libc::O_RDONLY), open(libc::O_RDWR)));
    assert_eq!(ro, 0, "read-only open (System.map for exit diagnostics)");
    assert_eq!(rw, libc::EPERM, "read-write open");
}

#[test]
fn a_vcpu_thread_may_use_kvm_ioctls_but_no_others() {
    const KVM_RUN: u64 = 0xAE80;
    const TIOCSTI: u64 = 0x5412;
    let (kvm, tty) = in_filtered_thread(Mode::Enforce, Kind::Vcpu, || (ioctl(KVM_RUN), ioctl(TIOCSTI)));
    assert_eq!(kvm, libc::EBADF, "KVM_RUN reaches the kernel");
    assert_eq!(tty, libc::EPERM, "a terminal ioctl is refused");
}

#[test]
fn memory_threads_and_the_api_cannot_exec_or_use_kvm() {
    const KVM_CREATE_VM: u64 = 0xAE01;
    for kind in [Kind::Merger, Kind::Compactor, Kind::FaultHandler, Kind::Api, Kind::VmaCounter] {
        let (exec, kvm) = in_filtered_thread(Mode::Enforce, kind, || (execve(), ioctl(KVM_CREATE_VM)));
        assert_eq!(exec, libc::EPERM, "{kind:?}: execve");
        assert_eq!(kvm, libc::EPERM, "{kind:?}: KVM ioctl");
    }
    let sock = in_filtered_thread(Mode::Enforce, Kind::Merger, socket);
    assert_eq!(sock, libc::EPERM, "merger: socket");
    // The merger reads dirty logs, and no other KVM ioctl.
    let get_dirty_log = in_filtered_thread(Mode::Enforce, Kind::Merger, || ioctl(merger::KVM_GET_DIRTY_LOG));
    assert_eq!(get_dirty_log, libc::EBADF, "merger: KVM_GET_DIRTY_LOG");
    assert_eq!(u64::from(kvm_ioctls_dirty_log_nr()), merger::KVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG number");
}

#[test]
fn the_mapping_counter_reads_its_maps_and_nothing_else() {
    let (maps, sock) = in_filtered_thread(Mode::Enforce, Kind::VmaCounter, || {
        (std::fs::read("/proc/self/maps").map(|m| m.len()).map_err(|e| e.to_string()), socket())
    });
    assert!(maps.expect("reads /proc/self/maps") > 0);
    assert_eq!(sock, libc::EPERM, "mapping counter: socket");
    // The API threads read the statistics but may not open files.
    let api_open = in_filtered_thread(Mode::Enforce, Kind::Api, || std::fs::read("/proc/self/maps").is_ok());
    assert!(!api_open, "an API thread cannot open /proc/self/maps");
}

/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)` computed from the struct's size.
fn kvm_ioctls_dirty_log_nr() -> u32 {
    let size = std::mem::size_of::<kvm_bindings::kvm_dirty_log>() as u32;
    (1 << 30) | (size << 16) | (0xAE << 8) | 0x42
}

#[test]
fn a_thread_spawned_by_the_event_loop_can_stack_its_own_filter() {
    // vCPU threads start under the event loop's filter and install theirs.
    let (vmm_sock, vcpu_sock) = in_filtered_thread(Mode::Enforce, Kind::Vmm, || {
        let filters = Filters::build(Mode::Enforce).expect("filters compile");
        let vmm_sock = socket();
        let vcpu_sock = std::thread::spawn(move || {
            filters.install(Kind::Vcpu).expect("vCPU filter on top of the event loop's");
            socket()
        })
        .join()
        .expect("child thread");
        (vmm_sock, vcpu_sock)
    });
    assert_eq!((vmm_sock, vcpu_sock), (libc::EPERM, libc::EPERM));
}

#[test]
fn the_event_loop_may_do_what_its_children_do() {
    // Threads spawned by the event loop stack their filter on its own: the event
    // loop's list must hold every syscall of theirs.
    let vmm = Kind::Vmm.rules();
    for (nr, rules) in Kind::Vcpu.rules() {
        let Some(own) = vmm.get(&nr) else { panic!("syscall {nr} of vCPU threads missing from the event loop's list") };
        assert!(
            own.is_empty() || rules.iter().all(|r| own.contains(r)),
            "syscall {nr}: vCPU rules not in the event loop's"
        );
    }
}

#[test]
fn log_mode_allows_what_it_logs() {
    // SECCOMP_RET_LOG: the syscall runs (and the kernel logs it).
    let sock = in_filtered_thread(Mode::Log, Kind::Vcpu, socket);
    assert_eq!(sock, 0);
}

#[test]
fn a_filtered_thread_keeps_working_after_the_filter() {
    // Allocation, formatting, locks, sleeping, spawning-free work: what every
    // thread does must pass every filter.
    for kind in Kind::ALL {
        let n = in_filtered_thread(Mode::Enforce, kind, || {
            let v: Vec<String> = (0..10_000).map(|i| format!("{i}")).collect();
            std::thread::sleep(std::time::Duration::from_millis(1));
            let m = std::sync::Mutex::new(v.len());
            let n = *m.lock().unwrap_or_else(|p| p.into_inner());
            n
        });
        assert_eq!(n, 10_000, "{kind:?}");
    }
}
