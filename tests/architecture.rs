//! The house rules of ARCHITECTURE.md, enforced: modules import only modules of lower layers
//! (the data flows one way), sibling files of a folder import each other without circles, and no
//! function is longer than 150 lines. Reads `src/` as text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import modules of lower layers only; modules of one
/// layer do not import each other. A new module must be placed here (the test says so).
const LAYERS: &[&[&str]] = &[
    // Import nothing of runner.
    &[
        "io", "metrics", "cpu", "failure", "console", "spec", "assets", "onnx",
    ],
    &["device", "fetch", "logs", "logging", "tensorboard"],
    &["backbone", "head", "data", "settings"],
    &["plan"],
    &["model", "results"],
    &["train", "plot", "report", "page"],
    &["predict", "bench"],
    &["run", "export"],
    &["sweep"],
    &["commands", "init"],
    &["cli"],
];

/// Longest function allowed, in lines (signature to closing brace).
const MAX_FUNCTION_LINES: usize = 150;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// A line without its `//` comment and with string literals emptied (so that neither a doc
/// link nor a message counts as an import, nor a brace in a string as a block).
fn code(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '\'' => {
                // A char literal ('{', '"', '\'') or a lifetime: skip a literal whole.
                let rest: String = chars.clone().take(3).collect();
                if let Some(escaped) = rest.strip_prefix('\\') {
                    let n = escaped.find('\'').map_or(0, |i| i + 2);
                    for _ in 0..n {
                        chars.next();
                    }
                    out.push_str("' '");
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                    out.push_str("' '");
                } else {
                    out.push('\'');
                }
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// `src/a/b.rs` -> `["a", "b"]`; `src/a/mod.rs` -> `["a"]`.
fn module_path(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The identifiers that follow `prefix` in `text` (`crate::` -> the top-level modules named).
fn after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c}`: the first segment of each item.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

fn sources() -> Vec<(PathBuf, Vec<String>, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|f| !matches!(module_path(f).as_slice(), [m] if m == "lib" || m == "main"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let code: String = text.lines().map(|l| code(l) + "\n").collect();
            (f.clone(), module_path(&f), code)
        })
        .collect()
}

#[test]
fn modules_import_only_lower_layers() {
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, ms)| ms.iter().map(move |m| (*m, i)))
        .collect();
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    let placed: BTreeSet<String> = layer_of.keys().map(|m| m.to_string()).collect();
    assert_eq!(
        declared, placed,
        "every module of lib.rs must have a layer in tests/architecture.rs (and ARCHITECTURE.md)"
    );
    let mut wrong = Vec::new();
    for (file, path, code) in sources() {
        let me = path[0].as_str();
        let mine = layer_of[me];
        for other in after(&code, "crate::") {
            if other == me || !layer_of.contains_key(other.as_str()) {
                continue;
            }
            if layer_of[other.as_str()] >= mine {
                wrong.push(format!(
                    "{}: `{me}` (layer {mine}) imports `{other}` (layer {})",
                    file.strip_prefix(src()).unwrap().display(),
                    layer_of[other.as_str()]
                ));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn sibling_files_import_each_other_without_circles() {
    let mut by_folder: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let all = sources();
    for (file, path, _) in &all {
        if path.len() == 2 && file.file_name().is_some_and(|n| n != "mod.rs") {
            by_folder
                .entry(path[0].clone())
                .or_default()
                .insert(path[1].clone(), BTreeSet::new());
        }
    }
    for (_, path, code) in &all {
        if path.len() != 2 {
            continue;
        }
        let Some(siblings) = by_folder.get_mut(&path[0]) else {
            continue;
        };
        let names: BTreeSet<String> = siblings.keys().cloned().collect();
        let mut uses: Vec<String> = after(code, "super::");
        uses.extend(after(code, &format!("crate::{}::", path[0])));
        let deps = siblings.get_mut(&path[1]).unwrap();
        for u in uses {
            if u != path[1] && names.contains(&u) {
                deps.insert(u);
            }
        }
    }
    // Depth-first search for a circle in each folder.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in &g[n] {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    for (folder, g) in &by_folder {
        let mut done = BTreeSet::new();
        for n in g.keys() {
            if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
                panic!("a circle of imports in src/{folder}/: {}", c.join(" -> "));
            }
        }
    }
}

#[test]
fn no_function_is_longer_than_150_lines() {
    let mut long = Vec::new();
    for (file, _, code) in sources() {
        let lines: Vec<&str> = code.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
            let t = t.strip_prefix("pub ").unwrap_or(t);
            let t = t.strip_prefix("const ").unwrap_or(t);
            let t = t.strip_prefix("unsafe ").unwrap_or(t);
            let Some(rest) = t.strip_prefix("fn ") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let (mut depth, mut opened) = (0i64, false);
            for (j, l) in lines[i..].iter().enumerate() {
                depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
                opened |= l.contains('{');
                if !opened && l.trim_end().ends_with(';') {
                    break;
                }
                if opened && depth <= 0 {
                    if j + 1 > MAX_FUNCTION_LINES {
                        long.push(format!(
                            "{}:{}: fn {name} has {} lines",
                            file.strip_prefix(src()).unwrap().display(),
                            i + 1,
                            j + 1
                        ));
                    }
                    break;
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them):\n{}",
        long.join("\n")
    );
}

/// A `Result<_, String>` in a signature or type (the error type is the last argument).
fn string_errors(code: &str) -> Vec<String> {
    code.lines()
        .filter(|l| {
            let l = l.replace(' ', "");
            l.contains("Result<") && (l.contains(",String>") || l.contains("Result<String>"))
        })
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn errors_are_typed_not_strings() {
    let mut found = Vec::new();
    for (file, _, code) in sources() {
        for l in string_errors(&code) {
            found.push(format!(
                "{}: {l}",
                file.strip_prefix(src()).unwrap().display()
            ));
        }
    }
    assert!(
        found.is_empty(),
        "errors are thiserror types that keep their cause, not strings:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    assert_eq!(
        string_errors("fn f() -> Result<(usize, usize), String> {\nfn g() -> Result<String, E> {"),
        ["fn f() -> Result<(usize, usize), String> {"]
    );
    // The parsing the tests above rely on: a comment or a string is no import, a use group is.
    assert_eq!(
        after(
            &code("use crate::{plan, train::x}; // crate::cli"),
            "crate::"
        ),
        ["plan", "train"]
    );
    assert_eq!(
        code(r#"let s = "crate::cli {"; let c = '{';"#),
        "let s = \"\"; let c = ' ';"
    );
    assert!(after(&code("/// [`crate::run`]"), "crate::").is_empty());
}
