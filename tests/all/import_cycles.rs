//! Imports run one way: no cycle between the top-level modules of `src/`
//! (`models`, `loaders`, `lora`, `data`, ...), and none between files,
//! where a module's own `mod.rs` reaching into its children does not count
//! (that is how a parent dispatches to the files it declares).
//!
//! Reads the source text: every `crate::`, `super::` and `self::` path, in
//! `use` trees and inline, resolved to the file of the module it names.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, e.g. `["loaders", "single_file", "detect"]`; the crate root is empty.
type ModPath = Vec<String>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` with its module path.
fn modules() -> BTreeMap<ModPath, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src_dir()).unwrap().with_extension("");
            let mut parts: ModPath = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            if rel == Path::new("main") {
                continue; // the binary's root only calls the library
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The source without comments and string literals, so paths in docs and
/// messages are not taken for imports.
fn code_only(text: &str) -> String {
    let bytes: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            while i + 1 < bytes.len() && !(bytes[i] == '*' && bytes[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                i += if bytes[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == 'r' && next == Some('#') || (c == 'r' && next == Some('"')) {
            // raw strings: r"..." or r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while bytes.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if bytes.get(j) != Some(&'"') || (i > 0 && (bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_')) {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let close: String = std::iter::once('"').chain(std::iter::repeat('#').take(hashes)).collect();
            let rest: String = bytes[j..].iter().collect();
            let end = rest.find(&close).map_or(bytes.len(), |k| j + rest[..k].chars().count() + close.chars().count());
            out.push_str("\"\"");
            i = end;
        } else if c == '\'' && next.is_some() && bytes.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree (`crate::a::{b, c::d}`) into whole paths.
fn expand_tree(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.to_string()] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .flat_map(|item| expand_tree(item).into_iter().map(move |p| format!("{prefix}{p}")))
        .collect()
}

/// Every path a file names that starts with `crate::`, `super::` or `self::`.
fn referenced_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // `use` trees (may span lines).
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        let after = &rest[at + 3..];
        let Some(end) = after.find(';') else { break };
        paths.extend(expand_tree(after[..end].trim()).into_iter().map(|p| p.split(" as ").next().unwrap().trim().to_string()));
        rest = &after[end..];
    }
    // Inline paths (`crate::data::decode::inspect(...)`).
    let chars: Vec<char> = code.chars().collect();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(start) {
            let at = from + k;
            let before = code[..at].chars().last();
            from = at + start.len();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(path);
        }
    }
    let _ = chars;
    paths.into_iter().filter(|p| p.starts_with("crate::") || p.starts_with("super::") || p.starts_with("self::")).collect()
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = text[from..].find(word) {
        let at = from + k;
        let before = text[..at].chars().last();
        let after = text[at + word.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if boundary(before) && after.is_some_and(char::is_whitespace) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The module a path names, as the longest prefix that is a file's module.
fn resolve(path: &str, from: &ModPath, is_dir_module: bool, known: &BTreeMap<ModPath, PathBuf>) -> Option<ModPath> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: ModPath = match segs.first().copied() {
        Some("crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some("self") | Some("super") => {
            // A file `a/b.rs` is module a::b; `self` is itself, `super` is `a`.
            // `a/mod.rs` is module a: `self` is a, `super` is the crate root.
            let mut base = from.clone();
            let _ = is_dir_module;
            while let Some(&s) = segs.first() {
                match s {
                    "self" => {}
                    "super" => {
                        base.pop();
                    }
                    _ => break,
                }
                segs.remove(0);
            }
            base
        }
        _ => return None,
    };
    let mut best = known.contains_key(&base).then(|| base.clone());
    for s in segs {
        base.push(s.to_string());
        if known.contains_key(&base) {
            best = Some(base.clone());
        } else {
            break;
        }
    }
    best
}

fn edges() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let known = modules();
    let mut graph: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (module, file) in &known {
        let is_dir_module = file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        let targets = graph.entry(module.clone()).or_default();
        for path in referenced_paths(&code) {
            if let Some(target) = resolve(&path, module, is_dir_module, &known) {
                if &target != module {
                    targets.insert(target);
                }
            }
        }
    }
    graph
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// One cycle of `graph`, if any, as the modules along it.
fn find_cycle(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &ModPath,
        graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        marks: &mut BTreeMap<ModPath, Mark>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        marks.insert(n.clone(), Mark::Open);
        stack.push(n.clone());
        for next in graph.get(n).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let at = stack.iter().position(|m| m == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn show(cycle: &[ModPath]) -> String {
    cycle.iter().map(name).collect::<Vec<_>>().join(" -> ")
}

#[test]
fn top_level_modules_import_one_way() {
    let mut top: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (from, targets) in edges() {
        let Some(a) = from.first() else { continue };
        for to in targets {
            let Some(b) = to.first() else { continue };
            if a != b {
                top.entry(vec![a.clone()]).or_default().insert(vec![b.clone()]);
            }
        }
    }
    assert!(top.len() > 5, "the scan found too few modules: {top:?}");
    if let Some(cycle) = find_cycle(&top) {
        panic!("the top-level modules import each other in a cycle: {}", show(&cycle));
    }
}

#[test]
fn files_import_one_way() {
    let mut files = edges();
    // A parent reaching into its own children is how it dispatches; not a cycle.
    for (from, targets) in files.iter_mut() {
        targets.retain(|to| !(to.len() > from.len() && to.starts_with(from)));
    }
    if let Some(cycle) = find_cycle(&files) {
        panic!("these files import each other in a cycle: {}", show(&cycle));
    }
}

#[test]
fn the_scan_sees_known_imports() {
    // Guards the test itself: known edges of the tree must be found.
    let graph = edges();
    let has = |a: &str, b: &str| {
        let a: ModPath = a.split("::").map(String::from).collect();
        let b: ModPath = b.split("::").map(String::from).collect();
        graph.get(&a).is_some_and(|t| t.contains(&b))
    };
    assert!(has("loaders::folder", "models::vae"), "use crate::models::vae::AutoencoderKL not seen");
    assert!(has("loaders::single_file::plan", "loaders::single_file::detect"), "use super::detect not seen");
    assert!(has("cli", "errors"), "inline crate::errors::one_sentence not seen");
    let cycle = find_cycle(&BTreeMap::from([
        (vec!["a".to_string()], BTreeSet::from([vec!["b".to_string()]])),
        (vec!["b".to_string()], BTreeSet::from([vec!["a".to_string()]])),
    ]));
    assert!(cycle.is_some(), "a two-module cycle must be found");
}
