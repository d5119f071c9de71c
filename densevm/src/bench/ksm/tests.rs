//! Unit tests of the KSM knob guard, against a stand-in sysfs directory.

use super::*;

fn fake_sysfs(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("densevm-ksm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (knob, value) in [
        ("run", "0\n"),
        ("pages_to_scan", "100\n"),
        ("sleep_millisecs", "20\n"),
        ("advisor_mode", "[none] scan-time\n"),
        ("pages_shared", "3\n"),
        ("pages_sharing", "7\n"),
        ("pages_unshared", "1\n"),
        ("pages_volatile", "0\n"),
        ("full_scans", "12\n"),
    ] {
        std::fs::write(dir.join(knob), value).unwrap();
    }
    dir
}

fn read(dir: &Path, knob: &str) -> String {
    std::fs::read_to_string(dir.join(knob)).unwrap()
}

#[test]
fn selected_value_takes_the_bracketed_choice() {
    assert_eq!(selected_value("[none] scan-time\n"), "none");
    assert_eq!(selected_value("none [scan-time]"), "scan-time");
    assert_eq!(selected_value("100\n"), "100");
}

#[test]
fn set_saves_the_first_original_and_restore_writes_it_back() {
    let dir = fake_sysfs("restore");
    let mut k = KsmControl::at(&dir).unwrap();
    k.set("run", "1").unwrap();
    k.set("pages_to_scan", "10000").unwrap();
    k.set("pages_to_scan", "5000").unwrap();
    k.set("advisor_mode", "none").unwrap();
    assert_eq!(k.get_u64("pages_to_scan").unwrap(), 5000);
    assert_eq!(k.get("run").unwrap(), "1");
    let saved: Vec<_> = k.saved().iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(saved, [("run", "0"), ("pages_to_scan", "100"), ("advisor_mode", "none")]);
    k.restore().unwrap();
    assert_eq!(read(&dir, "run"), "0");
    assert_eq!(read(&dir, "pages_to_scan"), "100");
    assert_eq!(read(&dir, "sleep_millisecs"), "20\n", "untouched knobs stay as they were");
    assert!(k.saved().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn drop_restores_and_restore_reports_failures() {
    let dir = fake_sysfs("drop");
    {
        let mut k = KsmControl::at(&dir).unwrap();
        k.set("sleep_millisecs", "0").unwrap();
        assert_eq!(read(&dir, "sleep_millisecs"), "0");
    }
    assert_eq!(read(&dir, "sleep_millisecs"), "20");

    let mut k = KsmControl::at(&dir).unwrap();
    assert!(matches!(k.set("no_such_knob", "1"), Err(Error::Read { .. })));
    k.set("run", "1").unwrap();
    k.set("pages_to_scan", "9").unwrap();
    // A knob that cannot be written back: the others are still restored.
    std::fs::remove_file(dir.join("run")).unwrap();
    std::fs::create_dir(dir.join("run")).unwrap();
    assert!(matches!(k.restore(), Err(Error::Restore(_))));
    assert_eq!(read(&dir, "pages_to_scan"), "100");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn counters_and_missing_dir() {
    let dir = fake_sysfs("counters");
    let k = KsmControl::at(&dir).unwrap();
    let c = k.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing, c.full_scans), (3, 7, 12));
    assert!(k.has("advisor_mode") && !k.has("smart_scan"));
    std::fs::write(dir.join("full_scans"), "many\n").unwrap();
    assert!(matches!(k.counters(), Err(Error::Parse { .. })));
    assert!(matches!(KsmControl::at(dir.join("absent")), Err(Error::Missing(_))));
    std::fs::remove_dir_all(dir).unwrap();
}
