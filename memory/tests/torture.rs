//! Torture test of the remap protocol under concurrent writers.
//!
//! Writer threads store version patterns into their own guest pages through the
//! guest view (checking before each write that the page still holds their last
//! version), a thread `pread`s file pages into its guest pages (a syscall
//! writing guest memory), while a manager thread merges (many pages are
//! identical on purpose), shares, unshares, migrates, discards, device-writes
//! and protects pages as fast as it can. Afterwards every page must equal the
//! model, every still-shared frame must hold what all its mappers expect, and
//! no write may have been lost. The machinery is `common/torture.rs`.
//!
//! Runs ~3 s by default; set DENSEVM_TORTURE_SECS for longer.

mod common;

use common::torture::{assert_no_failures, print_counters_and_assert, torture_secs, Torture};
use common::*;

#[test]
fn torture_remap_under_concurrent_writers() {
    let Some(mgr) = manager_or_skip("torture_remap_under_concurrent_writers", 64) else {
        return;
    };
    let secs = torture_secs();
    let _w = Watchdog::new("torture", secs + 120);
    let mut t = Torture::start(mgr, "torture");

    // Manager thread (this one): as many operations as possible; none may fail.
    let run = t.run_ops(secs, |_, _| false);
    let expected = t.stop_and_join();

    let (fails, shared_frames) = t.check(&expected);
    let s = t.mgr.stats();
    t.print_ops(&run);
    print_counters_and_assert(&s, shared_frames);
    assert_no_failures(&fails);
}
