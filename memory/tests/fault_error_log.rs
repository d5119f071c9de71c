//! A copy-on-write that finds no free frame reaches the log (a warning naming
//! the faulting address) and the `cow_no_frame` counter, and the writer gets
//! through once the cause is gone.
//!
//! Two guest pages share a frame (merged), the pool (overcommitted: without
//! overcommit the filler guest below is refused) has no free frame left, and a
//! thread writes to the shared page: the copy-on-write finds no frame, the
//! resolver logs and counts it, marks the VM out of memory and keeps the writer
//! blocked (no retry storm; see `memory::core::commit`). Freeing a frame
//! (destroying a second, one-page guest) and retrying the VM lets the next
//! attempt copy, and the write completes.

mod common;

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use memory::manager::MergeOutcome;
use memory::PAGE_SIZE;

/// Everything the log subscriber wrote.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Polls `ready` every millisecond until it holds or `timeout` passes.
fn wait_for(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    ready()
}

#[test]
fn copy_on_write_without_a_free_frame_is_logged_and_counted() {
    let log = Capture::default();
    let writer_log = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer_log.clone())
        .finish();
    // The resolver runs on the Protector's thread: the subscriber must be global.
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber of this test binary");

    let Some(mgr) = common::manager_or_skip("copy_on_write_without_a_free_frame_is_logged_and_counted", 2) else {
        return;
    };
    let _watchdog = common::Watchdog::new("fault_error_log", 60);

    // The whole pool for one guest, then two of its pages merged: one frame free.
    let guest = mgr.create_guest(1, 2 << 20).expect("guest of the whole pool");
    let outcome = guest.manager().merge_pages((1, 0), (1, 1)).expect("merge");
    assert!(matches!(outcome, MergeOutcome::Merged { .. }), "{outcome:?}");
    assert_eq!(mgr.stats().frames_free, 1);
    // A one-page guest takes that frame (overcommit: merging freed the frame,
    // not its commitment): a copy-on-write now finds none.
    let policy = memory::manager::CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 0 };
    mgr.set_commit_policy(policy).expect("overcommit");
    let filler = mgr.create_guest(2, PAGE_SIZE as u64).expect("one-page guest");
    assert_eq!(mgr.stats().frames_free, 0);
    let errors_before = mgr.stats().counters.cow_no_frame;

    let addr = guest.page_addr(0).expect("page 0");
    let (done_tx, done_rx) = mpsc::channel();
    let writer = std::thread::spawn(move || {
        // SAFETY: page 0 of a guest the test keeps alive until this thread is
        // joined; the store blocks in the userfaultfd until it can complete.
        unsafe { std::ptr::write_volatile(addr as *mut u64, 0x5eed) };
        let _ = done_tx.send(());
    });

    let logged = wait_for(Duration::from_secs(20), || {
        mgr.stats().counters.cow_no_frame > errors_before && log.text().contains("out of memory")
    });
    let wrote_early = done_rx.try_recv().is_ok();
    let flags = (guest.page_flags(0).expect("flags"), guest.page_flags(1).expect("flags"));

    // Free a frame: the writer's next fault copies and the store completes.
    // (Before any assertion: a failing test must not unmap the page the writer
    // is blocked on.)
    drop(filler);
    assert!(mgr.retry_out_of_memory(1).expect("retry"), "the VM was not marked out of memory");
    if done_rx.recv_timeout(Duration::from_secs(20)).is_err() && !wrote_early {
        // Keep the page mapped for the blocked writer while the test fails.
        std::mem::forget(guest);
        panic!("the writer never got through after a frame was freed");
    }
    writer.join().expect("writer thread");

    let text = log.text();
    assert!(logged, "no fault error logged and counted; log:\n{text}");
    let line = text.lines().find(|l| l.contains("out of memory")).unwrap_or_default();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&format!("{addr:#x}")), "{line}");
    assert!(!wrote_early, "the write completed without a free frame");
    assert_eq!(flags.0, flags.1, "page 0 changed while no frame was free");
    let stats = mgr.stats();
    eprintln!(
        "{} copies-on-write without a frame before a frame was freed; first: {line}",
        stats.counters.cow_no_frame - errors_before
    );
    assert!(stats.counters.cow_no_frame > errors_before);
    assert_eq!(stats.counters.fault_errors, 0);
    assert_eq!(stats.counters.cow_copies, 1);
    assert_ne!(guest.frame_of(0).expect("frame"), guest.frame_of(1).expect("frame"));
    let mut word = [0u8; 8];
    guest.read_bytes(0, &mut word).expect("read page 0");
    assert_eq!(u64::from_ne_bytes(word), 0x5eed);
    guest.read_bytes(PAGE_SIZE as u64, &mut word).expect("read page 1");
    assert_eq!(u64::from_ne_bytes(word), 0);
}
