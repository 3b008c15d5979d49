//! The code's shape, checked from its imports and sizes (DEVELOPERS.md's conventions and the runtime
//! redesign's layering): `dist/` imports nothing else of the crate; `runtime/` imports nothing from `pipeline/`, `serve/` or `cli/`; `pipeline/` and
//! `serve/` never import each other; only `cli/` imports both; no two modules import each other; no
//! library file over 800 lines and no function over 150; every module opens with a `//!` line; no
//! `Result<_, String>` in library code, and anyhow only in the commands.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The source without comments (line comments and doc comments; deem has no block comments).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a file under a crate's `src` (`serve/http.rs` → `serve::http`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("lib" | "mod")) {
        parts.pop();
    }
    if parts.first().map(String::as_str) == Some("bin") {
        parts.clear();
    }
    parts
}

/// The modules each module of a crate imports (through `crate::` and `super::` paths), by module path.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = sources(src);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f).join("::")).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let text = code(f);
        let mut found = BTreeSet::new();
        for (prefix, base) in [("crate::", Vec::new()), ("super::", parent(&me, f))] {
            let mut rest = text.as_str();
            while let Some(i) = rest.find(prefix) {
                let tail = &rest[i + prefix.len()..];
                let path: Vec<&str> = tail
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or("")
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .collect();
                // The longest prefix of the path that is a module.
                for k in (1..=path.len()).rev() {
                    let mut m = base.clone();
                    m.extend(path[..k].iter().map(|s| s.to_string()));
                    let m = m.join("::");
                    if modules.contains(&m) {
                        found.insert(m);
                        break;
                    }
                }
                rest = tail;
            }
        }
        found.remove(&me.join("::"));
        out.entry(me.join("::")).or_default().extend(found);
    }
    out
}

/// What `super::` names in `file` (module `me`): the parent module (for `foo/bar.rs` and `foo.rs` alike).
fn parent(me: &[String], _file: &Path) -> Vec<String> {
    me[..me.len().saturating_sub(1)].to_vec()
}

fn is_within(module: &str, layer: &str) -> bool {
    module == layer || module.starts_with(&format!("{layer}::"))
}

#[test]
fn the_runtime_layers_import_only_downwards() {
    let src = common::root().join("actors/src");
    let deps = imports(&src);
    let mut wrong = Vec::new();
    for (m, uses) in &deps {
        for u in uses {
            let bad = (is_within(m, "dist")
                && ["runtime", "pipeline", "serve", "cli", "settings"]
                    .iter()
                    .any(|l| is_within(u, l)))
                || (is_within(m, "runtime")
                    && ["pipeline", "serve", "cli"].iter().any(|l| is_within(u, l)))
                || (is_within(m, "pipeline") && ["serve", "cli"].iter().any(|l| is_within(u, l)))
                || (is_within(m, "serve") && ["pipeline", "cli"].iter().any(|l| is_within(u, l)))
                || (!is_within(m, "cli") && is_within(u, "cli"));
            if bad {
                wrong.push(format!("{m} imports {u}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    // The check sees real imports: the commands do import both sides.
    let cli: BTreeSet<&String> = deps
        .iter()
        .filter(|(m, _)| is_within(m, "cli"))
        .flat_map(|(_, u)| u)
        .collect();
    assert!(cli.iter().any(|u| is_within(u, "pipeline")), "{cli:?}");
    assert!(cli.iter().any(|u| is_within(u, "serve")), "{cli:?}");
}

#[test]
fn no_two_modules_import_each_other() {
    for krate in ["src", "actors/src"] {
        let deps = imports(&common::root().join(krate));
        let mut cycles = Vec::new();
        for (a, uses) in &deps {
            for b in uses {
                // A parent declares its children; a child naming its parent's items is the module tree.
                let nested = is_within(a, b) || is_within(b, a);
                if a < b && !nested && deps.get(b).is_some_and(|u| u.contains(a)) {
                    cycles.push(format!("{a} ⇄ {b}"));
                }
            }
        }
        assert!(
            cycles.is_empty(),
            "{krate}: modules importing each other:\n{}",
            cycles.join("\n")
        );
    }
}

/// Lines of each top-level or impl-level `fn`, from its signature to its closing brace.
fn function_lengths(text: &str) -> Vec<(usize, usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        let sig = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "async fn ",
            "pub async fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if !sig || l.trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i..].iter().position(|x| *x == close) {
            out.push((i + 1, end + 1, t.chars().take(60).collect()));
        }
    }
    out
}

#[test]
fn library_files_and_functions_stay_small_and_say_what_they_follow() {
    let mut problems = Vec::new();
    for krate in ["src", "actors/src"] {
        for f in sources(&common::root().join(krate)) {
            let text = std::fs::read_to_string(&f).unwrap();
            let n = text.lines().count();
            if n > 800 {
                problems.push(format!("{}: {n} lines (at most 800)", f.display()));
            }
            for (at, len, sig) in function_lengths(&text) {
                if len > 150 {
                    problems.push(format!(
                        "{}:{at}: {sig}… is {len} lines (at most 150)",
                        f.display()
                    ));
                }
            }
            if !text.starts_with("//!") {
                problems.push(format!("{}: does not open with a `//!` line", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn library_errors_are_typed_and_anyhow_stays_in_the_commands() {
    let mut problems = Vec::new();
    for krate in ["src", "actors/src"] {
        let src = common::root().join(krate);
        for f in sources(&src) {
            let m = module_of(&src, &f).join("::");
            let command = krate == "actors/src" && (is_within(&m, "cli") || m.is_empty());
            let text = code(&f);
            let compact: String = text.split_whitespace().collect();
            if !command && compact.contains(",String>") && has_string_error(&compact) {
                problems.push(format!("{}: a Result<_, String>", f.display()));
            }
            if !command && text.contains("anyhow") {
                problems.push(format!("{}: uses anyhow outside the commands", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Whether `Result<…, String>` occurs (generic arguments balanced).
fn has_string_error(compact: &str) -> bool {
    let mut rest = compact;
    while let Some(i) = rest.find("Result<") {
        let tail = &rest[i + "Result<".len()..];
        let mut depth = 1;
        let mut last_comma = None;
        for (k, c) in tail.char_indices() {
            match c {
                '<' | '(' => depth += 1,
                '>' | ')' => {
                    depth -= 1;
                    if depth == 0 {
                        if let Some(j) = last_comma {
                            if &tail[j + 1..k] == "String" {
                                return true;
                            }
                        }
                        break;
                    }
                }
                ',' if depth == 1 => last_comma = Some(k),
                _ => {}
            }
        }
        rest = tail;
    }
    false
}
