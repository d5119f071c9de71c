//! The module layering of `memory/src` (documented in `lib.rs`): every file
//! imports only files of its own or lower layers, and the imports between
//! files have no cycle.
//!
//! Imports are read from the source: `use` trees and inline `crate::`,
//! `super::` and `self::` paths outside comments, strings and unit tests,
//! resolved to the file of the longest module prefix. `lib.rs` (the crate
//! root's constants and public re-exports) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers, low to high; a file may import files of its layer and below.
const LAYERS: &[(&str, &[&str])] = &[
    ("syscalls", &["sys.rs"]),
    (
        "leaves",
        &[
            "uffd.rs",
            "buddy.rs",
            "frame_table.rs",
            "page_table.rs",
            "vma_budget.rs",
            "write_retry.rs",
            "vcpu_gate.rs",
            "thread_hook.rs",
            "tunable_range.rs",
            "merge/tunables.rs",
            "merge/error.rs",
            "compact/tunables.rs",
            "compact/stats.rs",
            "compact/plan.rs",
        ],
    ),
    ("pool and protector", &["pool.rs", "protector.rs"]),
    ("remap protocol", &["remap/mod.rs", "remap/tests.rs"]),
    (
        "core vocabulary",
        &["core/commit.rs", "core/error.rs", "core/counters.rs", "core/merge_settings.rs", "core/reuse_queue.rs"],
    ),
    ("core state", &["core/state.rs", "core/figures.rs"]),
    ("transaction", &["core/txn.rs", "core/unshare.rs", "core/zero_region.rs"]),
    ("core", &["core/mod.rs"]),
    (
        "core operations",
        &[
            "core/background_reuse.rs",
            "core/balloon.rs",
            "core/fault.rs",
            "core/guests.rs",
            "core/page_ops.rs",
            "core/registry.rs",
        ],
    ),
    (
        "merge indexes and batched ops",
        &[
            "merge/domains.rs",
            "merge/zero.rs",
            "merge/stable.rs",
            "merge/unstable.rs",
            "merge/pages.rs",
            "merge/stats.rs",
            "merge/ops.rs",
        ],
    ),
    ("merge scanner", &["merge/scanner.rs"]),
    ("merge scanner parts", &["merge/backoff.rs", "merge/visit.rs", "merge/decide.rs"]),
    ("merger", &["merge/mod.rs"]),
    ("compactor", &["compact/pass.rs", "compact/mod.rs"]),
    (
        "facade",
        &[
            "memory_stats/process_vmas.rs",
            "memory_stats/wire.rs",
            "memory_stats/mod.rs",
            "manager.rs",
            "guest_map.rs",
            "image_load.rs",
        ],
    ),
];

/// Module path of a source file (`core/mod.rs` -> `core`).
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel.trim_end_matches(".rs").split('/').map(String::from).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(root).expect("under src").to_string_lossy().into_owned());
        }
    }
}

/// The source without unit tests, comments, strings and char literals.
fn code_of(src: &str) -> String {
    let src = src.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A char literal ('x' or an escape), not a lifetime.
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Expands a use tree (`a::{b, c::{d}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or("").trim().to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| if prefix.is_empty() { p } else { format!("{prefix}::{p}") })
        .collect()
}

/// Every path the code names: use trees and inline `crate::`/`super::`/`self::` paths.
fn paths_of(code: &str) -> Vec<String> {
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let bytes = code.as_bytes();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !is_ident(bytes[i - 1]);
        if !boundary || !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        if rest.starts_with("use ") {
            if let Some(end) = rest.find(';') {
                paths.extend(expand(&rest[4..end]));
                i += end;
                continue;
            }
        }
        if ["crate::", "super::", "self::"].iter().any(|k| rest.starts_with(k)) {
            let len = rest.bytes().position(|c| !(is_ident(c) || c == b':')).unwrap_or(rest.len());
            paths.push(rest[..len].trim_end_matches(':').to_string());
            i += len;
            continue;
        }
        i += 1;
    }
    paths
}

/// The file a path in module `module` names, if it is another file of the crate.
fn resolve(module: &[String], path: &str, files: &BTreeMap<Vec<String>, String>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut base: Vec<String> = match segs.first().copied() {
        Some("crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some("super") => {
            let mut b = module.to_vec();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop();
            }
            b
        }
        Some("self") => {
            segs.remove(0);
            module.to_vec()
        }
        Some(first) => {
            let mut child = module.to_vec();
            child.push(first.to_string());
            if !files.contains_key(&child) {
                return None;
            }
            module.to_vec()
        }
        None => return None,
    };
    let mut best = base.clone();
    for s in segs.into_iter().filter(|s| *s != "self") {
        base.push(s.to_string());
        if files.contains_key(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    if best.is_empty() || best.as_slice() == module {
        return None;
    }
    files.get(&best).cloned()
}

fn edges() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut rels = Vec::new();
    collect(&root, &root, &mut rels);
    let files: BTreeMap<Vec<String>, String> = rels.iter().map(|r| (module_of(r), r.clone())).collect();
    let mut edges = BTreeSet::new();
    for (module, rel) in &files {
        if rel == "lib.rs" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(root.join(rel)).expect("read source"));
        for path in paths_of(&code) {
            if let Some(target) = resolve(module, &path, &files).filter(|t| t != "lib.rs") {
                edges.insert((rel.clone(), target));
            }
        }
    }
    edges
}

fn layer_of(file: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, files)| files.contains(&file))
}

#[test]
fn every_file_has_a_layer_and_imports_only_downwards() {
    let edges = edges();
    let mut files: BTreeSet<&str> = BTreeSet::new();
    for (a, b) in &edges {
        files.insert(a);
        files.insert(b);
    }
    let unplaced: Vec<&&str> = files.iter().filter(|f| layer_of(f).is_none()).collect();
    assert!(unplaced.is_empty(), "files without a layer: {unplaced:?}");
    let upward: Vec<String> = edges
        .iter()
        .filter(|(a, b)| layer_of(a) < layer_of(b))
        .map(|(a, b)| format!("{a} ({}) -> {b} ({})", LAYERS[layer_of(a).unwrap()].0, LAYERS[layer_of(b).unwrap()].0))
        .collect();
    assert!(upward.is_empty(), "imports against the layering:\n{}", upward.join("\n"));
}

#[test]
fn imports_have_no_cycle() {
    let edges = edges();
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in &edges {
        graph.entry(a).or_default().push(b);
        graph.entry(b).or_default();
    }
    // Depth-first search with colours; a grey target closes a cycle.
    fn visit<'a>(
        v: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        colour.insert(v, 1);
        path.push(v);
        for &w in &graph[v] {
            match colour.get(w).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|&p| p == w).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(w);
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(w, graph, colour, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(v, 2);
        None
    }
    let mut colour = BTreeMap::new();
    for &v in graph.keys() {
        if colour.get(v).copied().unwrap_or(0) == 0 {
            let cycle = visit(v, &graph, &mut colour, &mut Vec::new());
            assert!(cycle.is_none(), "import cycle: {}", cycle.unwrap_or_default().join(" -> "));
        }
    }
}

#[test]
fn the_parser_sees_the_known_imports() {
    let edges = edges();
    for (a, b) in [
        ("core/txn.rs", "vcpu_gate.rs"),
        ("core/txn.rs", "core/state.rs"),
        ("merge/ops.rs", "core/mod.rs"),
        ("manager.rs", "core/page_ops.rs"),
        ("core/guests.rs", "write_retry.rs"),
    ] {
        assert!(edges.contains(&(a.to_string(), b.to_string())), "{a} -> {b} not found");
    }
    assert!(!edges.iter().any(|(a, b)| a == "core/txn.rs" && b.starts_with("merge/")), "txn imports merge");
}
