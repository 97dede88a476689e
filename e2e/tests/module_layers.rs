//! The modules of every crate depend on each other in one direction only: no two modules
//! (top-level modules of a crate, or files side by side in one module's folder) reach each
//! other through `crate::…`, `super::…` or `self::…` paths, directly or round a longer loop.
//! References between a module and its own parent or children do not count, nor do tests
//! (`#[cfg(test)] mod tests`) or comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `src` folders of the workspace's crates, from the repository root.
const CRATES: &[&str] = &[
    "proto/src",
    "proto/config/src",
    "proto/domain/src",
    "proto/listener/src",
    "control-plane/src",
    "data-plane/src",
    "cli/src",
    "e2e/src",
];

type ModPath = Vec<String>;

#[test]
fn no_crate_has_a_module_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut report = Vec::new();
    let mut modules_seen = 0;
    for dir in CRATES {
        let sources = read_modules(&root.join(dir));
        modules_seen += sources.len();
        let graph = dependencies(&sources);
        for cycle in cycles(&graph) {
            report.push(format!("{dir}: {}", cycle.join(", ")));
        }
    }
    assert!(modules_seen > 50, "found only {modules_seen} modules");
    assert!(
        report.is_empty(),
        "modules that reach each other (move what they share to a module below them):\n{}",
        report.join("\n")
    );
}

/// A crate added to the workspace is checked too: `CRATES` names every member's `src`.
#[test]
fn every_workspace_member_is_checked() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("members = ["))
        .expect("the workspace's members on one line");
    let mut members: Vec<String> = members
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|m| format!("{m}/src"))
        .collect();
    members.sort();
    let mut checked: Vec<String> = CRATES.iter().map(|c| (*c).to_owned()).collect();
    checked.sort();
    assert_eq!(checked, members);
}

#[test]
fn the_check_finds_a_cycle_between_siblings_and_between_top_level_modules() {
    let sources = BTreeMap::from([
        (path(&["store"]), "use crate::metrics::Metrics;".to_owned()),
        (
            path(&["metrics"]),
            "fn f() { crate::store::open() }".to_owned(),
        ),
        (path(&["mock", "a"]), "use super::b::{X, Y};".to_owned()),
        (path(&["mock", "b"]), "use crate::mock::a::Z;".to_owned()),
        (path(&["mock"]), "mod a; mod b; use self::a::Z;".to_owned()),
        (
            path(&["mock", "c"]),
            "use super::Shared; // crate::store".to_owned(),
        ),
    ]);
    let found = cycles(&dependencies(&sources));
    assert_eq!(
        found,
        vec![vec!["metrics", "store"], vec!["mock::a", "mock::b"]]
    );
}

fn path(parts: &[&str]) -> ModPath {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

/// Every module file below `src` (binaries in `src/bin` are crates of their own) and its
/// text without comments and without its test module.
fn read_modules(src: &Path) -> BTreeMap<ModPath, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let file: PathBuf = entry.unwrap().path();
            if file.is_dir() {
                if file != src.join("bin") {
                    stack.push(file);
                }
                continue;
            }
            if file.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = file.strip_prefix(src).unwrap().with_extension("");
            let mut module: ModPath = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("lib" | "main" | "mod")
            ) {
                module.pop();
            }
            out.insert(module, code_only(&std::fs::read_to_string(&file).unwrap()));
        }
    }
    out
}

/// The text before the test module, without comment lines.
fn code_only(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Edges between sibling modules: `a -> b` when something in `a` (or below it) names
/// something in `b` (or below it), and `a` and `b` have the same parent.
fn dependencies(sources: &BTreeMap<ModPath, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, text) in sources {
        for named in named_paths(from, text) {
            // The longest prefix of the named path that is a module.
            let Some(to) = (1..=named.len())
                .rev()
                .map(|n| named[..n].to_vec())
                .find(|p| sources.contains_key(p))
            else {
                continue;
            };
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // the same module, or a parent and its child
            }
            let side = |m: &ModPath| m[..=common].join("::");
            graph.entry(side(from)).or_default().insert(side(&to));
        }
    }
    graph
}

/// The module paths that `text`, the code of module `from`, names, made absolute.
fn named_paths(from: &ModPath, text: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", from[..from.len().saturating_sub(1)].to_vec()),
        ("self::", from.clone()),
    ] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[at + prefix.len()..];
            if preceded_by_ident {
                continue;
            }
            for tail in path_tails(rest) {
                let mut full = base.clone();
                full.extend(tail);
                out.push(full);
            }
        }
    }
    out
}

/// The segments of the path that starts `text`; a `{a::b, c}` group gives one path each.
fn path_tails(text: &str) -> Vec<Vec<String>> {
    let ident_end = |s: &str| {
        s.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            return inner
                .split(',')
                .map(|item| {
                    let mut path = segments.clone();
                    path.extend(
                        item.trim()
                            .split("::")
                            .map(|s| s[..ident_end(s)].to_owned())
                            .filter(|s| !s.is_empty()),
                    );
                    path
                })
                .collect();
        }
        let end = ident_end(rest);
        if end == 0 {
            break;
        }
        segments.push(rest[..end].to_owned());
        match rest[end..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    vec![segments]
}

/// Each group of modules that reach each other (the strongly connected components of more
/// than one module, found with Tarjan's algorithm), sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, node: &'g str) {
            let i = self.index.len();
            self.index.insert(node, i);
            self.low.insert(node, i);
            self.stack.push(node);
            for next in self.graph.get(node).into_iter().flatten() {
                if !self.index.contains_key(next.as_str()) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next.as_str()]);
                    self.low.insert(node, low);
                } else if self.stack.contains(&next.as_str()) {
                    let low = self.low[node].min(self.index[next.as_str()]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let at = self.stack.iter().position(|n| *n == node).unwrap();
                let mut group: Vec<String> = self.stack.drain(at..).map(str::to_owned).collect();
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found.sort();
    walk.found
}
