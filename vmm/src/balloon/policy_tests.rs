//! Unit tests of the budget policy's decision ([`super::policy::plan`]) and settings.

use std::collections::BTreeMap;

use super::policy::{
    band, plan, BalloonPolicyConfig, BalloonPolicyPatch, BalloonTargetChange, Error, PolicyBand, VmInput,
};

const MIB: u64 = 1 << 20;

fn config(budget_mib: u64) -> BalloonPolicyConfig {
    BalloonPolicyConfig { host_budget_mib: Some(budget_mib), max_step_mib: 64, interval_ms: 1000, margin_mib: 16 }
}

fn vm(id: &str, mem_mib: u32, target_mib: u32, actual_mib: u32, free_mib: Option<u32>) -> VmInput {
    VmInput { id: id.into(), mem_mib, target_mib, actual_mib, free_mib }
}

fn change(id: &str, from_mib: u32, to_mib: u32) -> BalloonTargetChange {
    BalloonTargetChange { vm_id: id.into(), from_mib, to_mib }
}

#[test]
fn no_budget_does_nothing() {
    let c = BalloonPolicyConfig::default();
    let p = plan(&c, 100 << 30, &[vm("a", 1024, 0, 0, Some(900))], &BTreeMap::new());
    assert_eq!((p.band, p.changes.len()), (PolicyBand::Off, 0));
}

#[test]
fn bands_with_hysteresis() {
    let c = config(1000);
    assert_eq!(band(&c, 1001 * MIB), PolicyBand::Over);
    assert_eq!(band(&c, 1000 * MIB), PolicyBand::Within);
    assert_eq!(band(&c, 984 * MIB), PolicyBand::Within);
    assert_eq!(band(&c, 984 * MIB - 1), PolicyBand::Under);
    let p = plan(&c, 990 * MIB, &[vm("a", 1024, 100, 100, Some(500))], &BTreeMap::from([("a".into(), 100)]));
    assert_eq!((p.band, p.changes.len()), (PolicyBand::Within, 0), "inside the band nothing moves");
}

#[test]
fn over_budget_inflates_the_freest_vm_first_to_the_middle_of_the_band() {
    let c = config(1000);
    // 20 MiB over the budget: aim at budget - margin / 2 = 992 MiB, so 28 MiB.
    let vms = [vm("a", 256, 0, 0, Some(100)), vm("b", 256, 0, 0, Some(200)), vm("c", 256, 0, 0, Some(10))];
    let p = plan(&c, 1020 * MIB, &vms, &BTreeMap::new());
    assert_eq!(p.band, PolicyBand::Over);
    assert_eq!(p.changes, [change("b", 0, 28)]);
    // Far over: rate-limited to max_step_mib, spread from the freest down; each VM
    // keeps 1/16 of its RAM (16 MiB of 256).
    let c = BalloonPolicyConfig { max_step_mib: 300, ..c };
    let p = plan(&c, 2000 * MIB, &vms, &BTreeMap::new());
    assert_eq!(p.changes, [change("b", 0, 184), change("a", 0, 84)]);
    let total: u32 = p.changes.iter().map(|c| c.to_mib - c.from_mib).sum();
    assert_eq!(total, 268, "all they can give: less than the step");
}

#[test]
fn a_step_is_spread_over_the_freest_vms() {
    let c = config(1000);
    // Need 20 MiB (aim 992): levelled from 84, 84, 64 givable: the two top ones
    // come down to 74.
    let vms = [vm("a", 256, 0, 0, Some(100)), vm("b", 256, 0, 0, Some(100)), vm("c", 256, 0, 0, Some(80))];
    let p = plan(&c, 1012 * MIB, &vms, &BTreeMap::new());
    assert_eq!(p.changes, [change("a", 0, 10), change("b", 0, 10)]);
    // Need 31: the top two come down to 64 (40 MiB > 31): level 69, remainder 1 to `a`.
    let p = plan(&c, 1023 * MIB, &vms, &BTreeMap::new());
    assert_eq!(p.changes, [change("a", 0, 16), change("b", 0, 15)]);
    // Need 64 (the step): all three levelled to 56.
    let p = plan(&c, 1100 * MIB, &vms, &BTreeMap::new());
    assert_eq!(p.changes, [change("a", 0, 28), change("b", 0, 28), change("c", 0, 8)]);
}

#[test]
fn pending_inflation_and_ceilings_are_respected() {
    let c = BalloonPolicyConfig { max_step_mib: 1000, ..config(100) };
    // `a` was asked for 50 MiB and has inflated 10: 40 MiB are still to come out
    // of its 100 free, 16 stay reserved: 44 more.
    let a = vm("a", 256, 50, 10, Some(100));
    // Without statistics: its unballooned size less the reserve.
    let b = vm("b", 64, 40, 40, None);
    let p = plan(&c, 10_000 * MIB, &[a, b], &BTreeMap::new());
    assert_eq!(p.changes, [change("a", 50, 94), change("b", 40, 60)]);
    // A VM that can give nothing more is left out.
    let full = vm("f", 64, 60, 60, Some(64));
    assert!(plan(&c, 10_000 * MIB, &[full], &BTreeMap::new()).changes.is_empty());
}

#[test]
fn under_budget_deflates_only_owned_targets_within_the_room() {
    let c = config(1000);
    let vms = [
        vm("a", 256, 40, 40, Some(50)),
        vm("b", 256, 30, 30, Some(20)),
        // Its target was changed by PATCH: not the policy's (owned 10, now 30).
        vm("user", 256, 30, 30, Some(5)),
        vm("none", 256, 0, 0, Some(1)),
    ];
    let owned = BTreeMap::from([("a".into(), 40), ("b".into(), 30), ("user".into(), 10)]);
    // 984 - 950 = 34 MiB of room: the VM with least free memory first.
    let p = plan(&c, 950 * MIB, &vms, &owned);
    assert_eq!(p.band, PolicyBand::Under);
    assert_eq!(p.changes, [change("b", 30, 0), change("a", 40, 36)]);
    // Lots of room: limited by the step (64) and by what the policy owns (70).
    let p = plan(&c, 0, &vms, &owned);
    assert_eq!(p.changes, [change("b", 30, 0), change("a", 40, 6)]);
}

#[test]
fn repeated_steps_converge() {
    // A toy fleet whose use is its guests' memory minus their balloons: the
    // policy brings it under the budget, then back out when the budget rises.
    let c = BalloonPolicyConfig { max_step_mib: 32, ..config(300) };
    let mut vms: Vec<VmInput> = (0..4).map(|i| vm(&format!("v{i}"), 128, 0, 0, Some(100))).collect();
    let mut owned = BTreeMap::new();
    let use_of = |vms: &[VmInput]| vms.iter().map(|v| u64::from(128 - v.actual_mib) * MIB).sum::<u64>();
    let run = |c: &BalloonPolicyConfig, vms: &mut Vec<VmInput>, owned: &mut BTreeMap<String, u32>| {
        for _ in 0..100 {
            let p = plan(c, use_of(vms), vms, owned);
            for ch in &p.changes {
                let v = vms.iter_mut().find(|v| v.id == ch.vm_id).unwrap();
                v.free_mib = Some(100u32.saturating_sub(ch.to_mib));
                v.target_mib = ch.to_mib;
                v.actual_mib = ch.to_mib;
                owned.insert(ch.vm_id.clone(), ch.to_mib);
            }
        }
    };
    run(&c, &mut vms, &mut owned);
    let used = use_of(&vms);
    assert!((284 * MIB..=300 * MIB).contains(&used), "{}", used >> 20);
    let c = config(1000);
    run(&c, &mut vms, &mut owned);
    assert!(vms.iter().all(|v| v.target_mib == 0), "{vms:?}");
}

#[test]
fn settings_ranges_and_patches() {
    assert!(BalloonPolicyConfig::default().validate().is_ok());
    let bad = [
        (r#"{"host_budget_mib": 0}"#, "host_budget_mib"),
        (r#"{"max_step_mib": 0}"#, "max_step_mib"),
        (r#"{"interval_ms": 199}"#, "interval_ms"),
        (r#"{"interval_ms": 600001}"#, "interval_ms"),
        (r#"{"margin_mib": 65537}"#, "margin_mib"),
    ];
    for (body, field) in bad {
        let p: BalloonPolicyPatch = serde_json::from_str(body).unwrap();
        match p.validate() {
            Err(Error::OutOfRange { field: f, .. }) => assert_eq!(f, field, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    let on: BalloonPolicyPatch = serde_json::from_str(r#"{"host_budget_mib": 512, "interval_ms": 500}"#).unwrap();
    let c = on.apply(&BalloonPolicyConfig::default());
    assert_eq!((c.host_budget_mib, c.interval_ms, c.max_step_mib), (Some(512), 500, 128));
    let off: BalloonPolicyPatch = serde_json::from_str(r#"{"host_budget_mib": null}"#).unwrap();
    assert_eq!(off.apply(&c).host_budget_mib, None);
    let keep: BalloonPolicyPatch = serde_json::from_str(r#"{"margin_mib": 0}"#).unwrap();
    assert_eq!(keep.apply(&c).host_budget_mib, Some(512), "an absent budget stays");
    assert!(serde_json::from_str::<BalloonPolicyPatch>(r#"{"budget": 1}"#).is_err());
    assert!(serde_json::from_str::<BalloonPolicyPatch>(r#"{"max_step_mib": -1}"#).is_err());
}
