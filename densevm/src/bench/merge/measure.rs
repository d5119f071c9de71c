//! Measurements of `densevm bench merge`: CPU time of a thread, host memory of
//! anonymous guest RAM (from the page map), the kernel's KSM thread, and the
//! expected merge count of the workload guests.

use vmm::workload::scenario::Scenario;

/// `/proc/<task>/schedstat` (nanoseconds on CPU) or, without schedstats,
/// `/proc/<task>/stat` (utime + stime in clock ticks), in seconds. `task` is a
/// `/proc` directory such as `/proc/self/task/123` or `/proc/45`.
pub fn task_cpu_s(task: &str) -> Option<f64> {
    if let Some(ns) = std::fs::read_to_string(format!("{task}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
    {
        return Some(ns as f64 / 1e9);
    }
    let stat = std::fs::read_to_string(format!("{task}/stat")).ok()?;
    // After the command name: state is field 3, utime 14, stime 15 (1-based).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant; no memory is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// The nice value of a task (`/proc/<task>/stat` field 19); `task` as for
/// [`task_cpu_s`].
pub fn task_nice(task: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("{task}/stat")).ok()?;
    // After the command name, field 3 is at index 0: nice (19) is at index 16.
    stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()
}

/// Sets the nice value of thread `tid` of this process.
pub fn set_thread_nice(tid: i32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority on a thread id; no memory is involved.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Process id of the kernel's `ksmd` thread.
pub fn ksmd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

/// Host memory behind `ranges` (`(start, len)` of this process): present pages
/// and distinct physical frames among them, from `/proc/self/pagemap` (frame
/// numbers need root; without them `frames` is `None`). A KSM page mapped by
/// several guest pages is one frame.
pub fn present_and_frames(ranges: &[(u64, u64)]) -> std::io::Result<(u64, Option<u64>)> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let (mut present, mut pfns) = (0u64, Vec::new());
    for &(start, len) in ranges {
        let mut buf = vec![0u8; (len / 4096) as usize * 8];
        pagemap.read_exact_at(&mut buf, start / 4096 * 8)?;
        for e in buf.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let entry = u64::from_le_bytes(w);
            if entry >> 63 == 1 {
                present += 1;
                pfns.push(entry & ((1 << 55) - 1));
            }
        }
    }
    if pfns.contains(&0) {
        return Ok((present, None));
    }
    pfns.sort_unstable();
    pfns.dedup();
    Ok((present, Some(pfns.len() as u64)))
}

/// `/proc/self/ksm_merging_pages`: pages of this process mapped to KSM pages.
pub fn ksm_merging_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/self/ksm_merging_pages").ok()?.trim().parse().ok()
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn threshold(fraction: f64) -> u64 {
    (fraction.clamp(0.0, 1.0) * 4_294_967_296.0) as u64
}

/// How many data pages of a workload guest running `s` hold the content every
/// VM of the same `shared_seed` holds (the guest's `page_kind` == shared,
/// resources/workload/guest.c): VMs cloned from one image merge at least
/// `shared_data_pages * (vms - 1)` pages.
pub fn shared_data_pages(s: &Scenario) -> u64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let data_pages = u64::from(s.fill_mib) * 256;
    let (zero, shared) = (threshold(s.zero_fraction), threshold(s.shared_fraction));
    (0..data_pages)
        .filter(|&i| {
            let r = mix64(s.shared_seed ^ i.wrapping_mul(GOLDEN)) >> 32;
            r >= zero && r < zero + shared
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_counts_present_pages() {
        let len = 16 * 4096;
        let mut v = vec![0u8; len + 4096];
        let start = (v.as_ptr() as u64).next_multiple_of(4096);
        let off = (start - v.as_ptr() as u64) as usize;
        for i in 0..4 {
            v[off + i * 4096] = 1;
        }
        let (present, _) = present_and_frames(&[(start, 8 * 4096)]).unwrap();
        assert!(present >= 4, "{present}");
    }

    #[test]
    fn shared_fraction_is_respected() {
        let s = Scenario { fill_mib: 16, shared_fraction: 0.9, ..Scenario::default() };
        let n = shared_data_pages(&s) as f64 / (16.0 * 256.0);
        assert!((0.87..0.93).contains(&n), "{n}");
        let none = Scenario { fill_mib: 4, shared_fraction: 0.0, ..Scenario::default() };
        assert_eq!(shared_data_pages(&none), 0);
        let all = Scenario { fill_mib: 4, shared_fraction: 1.0, ..Scenario::default() };
        assert_eq!(shared_data_pages(&all), 1024);
    }

    #[test]
    fn own_nice_is_readable() {
        let tid = std::process::id();
        assert!(task_nice(&format!("/proc/self/task/{tid}")).is_some_and(|n| (-20..=19).contains(&n)));
    }

    #[test]
    fn own_thread_cpu_is_readable() {
        let tid = std::process::id();
        assert!(task_cpu_s(&format!("/proc/self/task/{tid}")).is_some());
    }
}
