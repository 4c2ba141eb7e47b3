//! The agent's modules import each other without cycles: helpers live where their meaning is,
//! and a leaf (store, archive, restore, postgres) never reaches back into the core that drives
//! it. This reads `agent/src` (no build needed), draws the graph of `crate::`/`super::` paths
//! between modules (one node per file), and fails naming the cycle if there is one.
//!
//! Print the graph: `cargo test -p pgpilot-agent --test module_graph -- --nocapture`.
//! (`cargo modules dependencies --package pgpilot-agent --lib --acyclic`, from crates.io
//! `cargo-modules`, draws the same at item level if you have it.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `archive/mod.rs` → `archive`, `archive/push.rs` → `archive::push`, `lib.rs` → `crate`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        return "crate".into();
    }
    parts.join("::")
}

/// Module paths a file names: `crate::a::b`, `super::c`, and the members of `crate::{…}`.
fn references(text: &str, module: &str, is_mod_file: bool) -> Vec<String> {
    let mut out = Vec::new();
    // The module a `super::` in this file refers to: the parent of this module; in a mod.rs
    // file `super` is the parent of the directory's module as well.
    let parent = {
        let mut p: Vec<&str> = module.split("::").collect();
        p.pop();
        let _ = is_mod_file;
        p.join("::")
    };
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find(['c', 's']) {
            let tail = &rest[i..];
            let boundary = i == 0
                || !rest[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
            let (root, after) = if boundary && tail.starts_with("crate::") {
                (String::new(), &tail[7..])
            } else if boundary && tail.starts_with("super::") {
                (parent.clone(), &tail[7..])
            } else {
                rest = &rest[i + 1..];
                continue;
            };
            let join = |p: &str| {
                if root.is_empty() {
                    p.to_string()
                } else {
                    format!("{root}::{p}")
                }
            };
            // `a::b`, or `a::{b, c::d}`: the part before a brace is a prefix of each item.
            let path: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let prefix = path.trim_end_matches(':');
            match after[path.len()..].strip_prefix('{') {
                Some(list) => {
                    let end = list.find('}').unwrap_or(list.len());
                    for item in list[..end].split(',') {
                        let item = item.trim().split(" as ").next().unwrap_or("").trim();
                        let item = item.trim_end_matches("::{").trim_end_matches(':');
                        let full = match (prefix.is_empty(), item.is_empty() || item == "self") {
                            (_, true) => prefix.to_string(),
                            (true, false) => item.to_string(),
                            (false, false) => format!("{prefix}::{item}"),
                        };
                        if !full.is_empty() {
                            out.push(join(&full));
                        }
                    }
                }
                None => out.push(join(prefix)),
            }
            rest = &rest[i + 7..];
        }
    }
    out
}

/// The longest module of `nodes` that `path` starts with.
fn resolve<'a>(nodes: &'a BTreeSet<String>, path: &str) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|p| nodes.get(&p))
}

fn related(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x.starts_with(&format!("{y}::"));
    a == b || under(a, b) || under(b, a)
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let nodes: BTreeSet<String> = all.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &all {
        let m = module_of(&src, f);
        if m == "crate" {
            continue; // the root declares and wires every module
        }
        let text = std::fs::read_to_string(f).unwrap();
        let is_mod = f.file_name().is_some_and(|n| n == "mod.rs");
        let entry = edges.entry(m.clone()).or_default();
        for r in references(&text, &m, is_mod) {
            // Parents declare their children and children use their parent's items: only
            // edges between unrelated modules can make a cycle worth fixing.
            if let Some(to) = resolve(&nodes, &r)
                && to != "crate"
                && !related(&m, to)
            {
                entry.insert(to.clone());
            }
        }
    }
    edges
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in edges.get(n).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_agents_modules_have_no_import_cycle() {
    let edges = graph();
    for (from, to) in &edges {
        if !to.is_empty() {
            println!(
                "{from} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    // The checker itself must see the edges it is meant to judge.
    assert!(
        edges["core::executor"].contains("archive::backup"),
        "{edges:?}"
    );
    assert!(edges["http::routes::status"].contains("core"), "{edges:?}");
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle between the agent's modules: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_checker_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&edges).unwrap(),
        vec!["a".to_string(), "b".into(), "c".into(), "a".into()]
    );
    let refs = references(
        "use crate::{config::Config, store::Store};\nuse super::push::x; // crate::nope",
        "archive::fetch",
        false,
    );
    assert_eq!(
        refs,
        vec!["config::Config", "store::Store", "archive::push::x"]
    );
}
