//! Property test of the merger's stable and unstable indexes against a model:
//! chains keep insertion order, stale frames are dropped by lookups, full ones
//! skipped, a frame lives under one key, and a lookup never returns a frame or
//! page inserted under another merge domain.

use std::collections::HashMap;

use memory::frame_table::Mapper;
use memory::merge::stable::{Key, StableIndex, Verdict};
use memory::merge::unstable::{Entry, UnstableIndex};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(Key, u32),
    Remove(Key, u32),
    Find(Key),
    UInsert(Key, u32),
    UGet(Key),
    Clear,
}

fn key() -> impl Strategy<Value = Key> {
    (0u32..3, 0u64..4).prop_map(|(domain, hash)| Key { domain, hash })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), 0u32..24).prop_map(|(k, f)| Op::Insert(k, f)),
        1 => (key(), 0u32..24).prop_map(|(k, f)| Op::Remove(k, f)),
        3 => key().prop_map(Op::Find),
        2 => (key(), 0u32..24).prop_map(|(k, p)| Op::UInsert(k, p)),
        2 => key().prop_map(Op::UGet),
        1 => Just(Op::Clear),
    ]
}

/// Fixed verdict of each frame: stale, full or usable.
fn verdict(f: u32) -> Verdict {
    match f % 5 {
        0 => Verdict::Stale,
        1 | 2 => Verdict::Full,
        _ => Verdict::Usable,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn indexes_match_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut stable = StableIndex::new();
        let mut unstable = UnstableIndex::new();
        let mut model: Vec<(Key, u32)> = Vec::new();
        let mut umodel: HashMap<Key, Entry> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k, f) => {
                    if !model.contains(&(k, f)) {
                        model.retain(|&(_, g)| g != f);
                        model.push((k, f));
                    }
                    stable.insert(k, f);
                }
                Op::Remove(k, f) => {
                    let had = model.contains(&(k, f));
                    model.retain(|&e| e != (k, f));
                    prop_assert_eq!(stable.remove(k, f), had);
                }
                Op::Find(k) => {
                    let chain: Vec<u32> = model.iter().filter(|e| e.0 == k).map(|e| e.1).collect();
                    let mut expect = None;
                    for &f in &chain {
                        match verdict(f) {
                            Verdict::Usable => { expect = Some(f); break; }
                            Verdict::Stale => model.retain(|&e| e != (k, f)),
                            Verdict::Full => {}
                        }
                    }
                    let got = stable.find(k, verdict);
                    prop_assert_eq!(got, expect);
                    if let Some(f) = got {
                        prop_assert_eq!(stable.key_of(f), Some(k), "found frame belongs to another key/domain");
                    }
                }
                Op::UInsert(k, p) => {
                    let e = Entry { mapper: Mapper { vm: k.domain, page: p }, frame: p };
                    unstable.insert(k, e);
                    umodel.insert(k, e);
                }
                Op::UGet(k) => {
                    let got = unstable.get(k);
                    prop_assert_eq!(got, umodel.get(&k).copied());
                    if let Some(e) = got {
                        prop_assert_eq!(e.mapper.vm, k.domain, "unstable entry of another domain");
                    }
                }
                Op::Clear => {
                    unstable.clear();
                    umodel.clear();
                }
            }
            prop_assert_eq!(stable.len(), model.len());
            prop_assert_eq!(unstable.len(), umodel.len());
            for &(k, f) in &model {
                prop_assert!(stable.contains(k, f));
            }
            for d in 0..3u32 {
                for h in 0..4u64 {
                    let k = Key { domain: d, hash: h };
                    let chain: Vec<u32> = model.iter().filter(|e| e.0 == k).map(|e| e.1).collect();
                    prop_assert_eq!(stable.chain(k), chain.as_slice());
                }
            }
        }
    }
}
