//! The architecture rules of ARCHITECTURE.md, checked on the sources (no root needed):
//! - no function in production code (the library and binary crates, tests excluded)
//!   over `MAX_FN_LINES` lines;
//! - no import cycle between the top-level modules of a crate;
//! - the OCI spec is built typed (no `json!` in the translation);
//! - no CRI config read back with `from_value(..).unwrap_or_default()`;
//! - `berth-runtime` (the shim's crate) knows nothing of CRI.
//!
//! Run alone: `cargo test -p berth-e2e --test architecture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::spanned::Spanned;

/// Longest function allowed in production code, in lines.
const MAX_FN_LINES: usize = 120;
/// The crates whose `src/` is production code.
const CRATES: &[&str] = &[
    "failpoint",
    "proto",
    "cgroups",
    "runtime",
    "stream",
    "image",
    "network",
    "cri",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn production_files(krate: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    rust_files(&workspace().join(krate).join("src"), &mut v);
    v
}

fn parse(path: &Path) -> syn::File {
    let text = std::fs::read_to_string(path).expect("read source");
    syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let p = a.path();
        if p.is_ident("test") {
            return true;
        }
        if p.is_ident("cfg") {
            let text = a.meta.to_token_stream_string();
            return text.contains("test") && !text.contains("not");
        }
        false
    })
}

trait MetaText {
    fn to_token_stream_string(&self) -> String;
}

impl MetaText for syn::Meta {
    fn to_token_stream_string(&self) -> String {
        quote::ToTokens::to_token_stream(self).to_string()
    }
}

/// (name, lines) of every function, method and default trait method outside test code.
fn functions(items: &[syn::Item], prefix: &str, out: &mut Vec<(String, usize, usize)>) {
    let lines = |s: proc_macro2::Span| s.end().line - s.start().line + 1;
    for item in items {
        match item {
            syn::Item::Fn(f) if !is_test_only(&f.attrs) => {
                out.push((
                    format!("{prefix}{}", f.sig.ident),
                    f.span().start().line,
                    lines(f.span()),
                ));
            }
            syn::Item::Impl(i) if !is_test_only(&i.attrs) => {
                for ii in &i.items {
                    if let syn::ImplItem::Fn(f) = ii {
                        if !is_test_only(&f.attrs) {
                            out.push((
                                format!("{prefix}{}", f.sig.ident),
                                f.span().start().line,
                                lines(f.span()),
                            ));
                        }
                    }
                }
            }
            syn::Item::Trait(t) if !is_test_only(&t.attrs) => {
                for ti in &t.items {
                    if let syn::TraitItem::Fn(f) = ti {
                        if f.default.is_some() {
                            out.push((
                                format!("{prefix}{}", f.sig.ident),
                                f.span().start().line,
                                lines(f.span()),
                            ));
                        }
                    }
                }
            }
            syn::Item::Mod(m) if !is_test_only(&m.attrs) => {
                if let Some((_, inner)) = &m.content {
                    functions(inner, &format!("{prefix}{}::", m.ident), out);
                }
            }
            _ => {}
        }
    }
}

#[test]
fn no_function_is_over_the_limit() {
    let mut long = Vec::new();
    for krate in CRATES {
        for path in production_files(krate) {
            let mut fns = Vec::new();
            functions(&parse(&path).items, "", &mut fns);
            for (name, line, n) in fns {
                if n > MAX_FN_LINES {
                    let rel = path
                        .strip_prefix(workspace())
                        .unwrap_or(&path)
                        .display()
                        .to_string();
                    long.push(format!("{rel}:{line} {name}: {n} lines"));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// The source of `file` with test-only items removed, as tokens.
fn non_test_tokens(file: &syn::File) -> String {
    let kept: Vec<&syn::Item> = file
        .items
        .iter()
        .filter(|i| {
            let attrs = match i {
                syn::Item::Mod(m) => &m.attrs,
                syn::Item::Fn(f) => &f.attrs,
                syn::Item::Use(u) => &u.attrs,
                syn::Item::Impl(i) => &i.attrs,
                _ => return true,
            };
            !is_test_only(attrs)
        })
        .collect();
    kept.iter()
        .map(|i| quote::ToTokens::to_token_stream(i).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a source file under `src` (`pods.rs` -> [pods], `a/b.rs` -> [a, b],
/// `a/mod.rs` -> [a]); None for binaries.
fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    Some(parts)
}

/// Edges between top-level modules: module -> modules it names.
fn module_graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = workspace().join(krate).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in production_files(krate) {
        let Some(mpath) = module_path(&src, &path) else {
            continue;
        };
        let Some(top) = mpath.first().cloned() else {
            continue;
        };
        let tokens = non_test_tokens(&parse(&path));
        let words: Vec<&str> = tokens.split_whitespace().collect();
        let mut targets = BTreeSet::new();
        for (i, w) in words.iter().enumerate() {
            // `crate :: x` or `super :: super :: x` (relative to this file's module).
            if *w == "crate" && words.get(i + 1) == Some(&"::") {
                if let Some(t) = words.get(i + 2) {
                    targets.insert(t.to_string());
                }
            } else if *w == "super" && (i == 0 || words[i - 1] != "::") {
                let mut ups = 0;
                let mut j = i;
                while words.get(j) == Some(&"super") && words.get(j + 1) == Some(&"::") {
                    ups += 1;
                    j += 2;
                }
                // Fewer `super`s stay inside `top`.
                if ups >= mpath.len() {
                    if let Some(t) = words.get(j) {
                        targets.insert(t.to_string());
                    }
                }
            }
        }
        targets.remove(&top);
        graph
            .entry(top)
            .or_default()
            .extend(targets.into_iter().filter(|t| {
                t.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            }));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// A cycle in `graph`, if any, as a path.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_cycle_between_modules() {
    let mut cycles = Vec::new();
    for krate in CRATES {
        if let Some(c) = find_cycle(&module_graph(krate)) {
            cycles.push(format!("{krate}: {}", c.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "module import cycles:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    assert!(find_cycle(&g(&[("a", "b"), ("b", "c")])).is_none());
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

/// Production code with test-only items removed, per file.
fn production_sources() -> Vec<(PathBuf, String)> {
    CRATES
        .iter()
        .flat_map(|k| production_files(k))
        .map(|p| {
            let t = non_test_tokens(&parse(&p));
            (p, t)
        })
        .collect()
}

#[test]
fn no_config_is_read_back_with_an_empty_default() {
    let bad: Vec<String> = production_sources()
        .into_iter()
        .filter(|(_, t)| {
            t.split("from_value").skip(1).any(|rest| {
                let call_end = rest.find(';').unwrap_or(rest.len());
                rest[..call_end].contains("unwrap_or_default")
            })
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "from_value(..).unwrap_or_default() in {bad:?}"
    );
}

#[test]
fn the_oci_spec_is_built_typed() {
    let bad: Vec<String> = production_sources()
        .into_iter()
        .filter(|(p, t)| {
            let s = p.display().to_string();
            (s.contains("/oci/") || s.ends_with("spec.rs")) && t.contains("json !")
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(bad.is_empty(), "json! in spec building: {bad:?}");
}

#[test]
fn the_shim_crate_knows_nothing_of_cri() {
    let manifest = std::fs::read_to_string(workspace().join("runtime/Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("k8s-cri"),
        "berth-runtime depends on k8s-cri"
    );
    for (p, t) in production_sources() {
        if p.starts_with(workspace().join("runtime")) {
            assert!(!t.contains("k8s_cri"), "{} names k8s_cri", p.display());
        }
    }
}
