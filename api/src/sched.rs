//! A short scheduler slice for the API server's threads.
//!
//! On a host whose cores are busy with guest vCPUs, a request's thread that wakes
//! up otherwise waits for a running vCPU's slice to end (milliseconds). Linux's
//! EEVDF scheduler (6.6+) lets a `SCHED_OTHER` thread ask for a shorter slice
//! (`sched_setattr` with `sched_runtime`, honoured from Linux 6.12): its deadline
//! comes sooner, so it preempts on wake-up; its share of the CPU (its weight) is
//! unchanged, so a busy client cannot take more CPU from the guests than before.
//! Older kernels ignore the value (the call succeeds) or refuse it: then nothing
//! changes and the reason is logged once per thread at debug level.

use std::io;
use std::time::Duration;

/// The slice the API threads ask for (the kernel's minimum custom slice).
pub const API_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Asks for `slice` as the calling thread's scheduler slice, keeping `SCHED_OTHER`
/// and the thread's nice value.
pub fn set_slice(slice: Duration) -> io::Result<()> {
    // SAFETY: getpriority on the calling thread (who = 0) reads its nice value; the
    // -1 ambiguity is resolved by errno, which is cleared first.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice.as_nanos() as u64,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr(pid 0 = this thread, a valid sched_attr of the size it
    // declares, flags 0); the kernel only reads the struct.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`set_slice`] with [`API_SLICE`], logging (debug) why it did not apply.
pub fn shorten_this_threads_slice() {
    if let Err(e) = set_slice(API_SLICE) {
        tracing::debug!("API thread keeps the default scheduler slice: sched_setattr: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched_getattr` of the calling thread.
    fn current() -> io::Result<SchedAttr> {
        let mut attr = SchedAttr::default();
        // SAFETY: sched_getattr writes at most `size` bytes into `attr`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut SchedAttr,
                std::mem::size_of::<SchedAttr>() as u32,
                0,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr)
    }

    #[test]
    fn a_thread_gets_the_short_slice_and_keeps_its_nice_value() {
        let got = std::thread::spawn(|| {
            // SAFETY: setpriority on this thread only.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
            set_slice(API_SLICE).map(|()| current())
        })
        .join()
        .expect("thread");
        match got {
            Ok(attr) => {
                let attr = attr.expect("sched_getattr");
                assert_eq!(attr.sched_policy, libc::SCHED_OTHER as u32);
                assert_eq!(attr.sched_nice, 3, "nice value kept");
                // Kernels before 6.12 accept the call but keep their own slice.
                if attr.sched_runtime != API_SLICE.as_nanos() as u64 {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "note: this kernel reports a slice of {} ns (custom slices need Linux 6.12)",
                        attr.sched_runtime
                    );
                }
            }
            Err(e) => panic!("sched_setattr refused: {e}"),
        }
    }
}
