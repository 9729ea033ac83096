//! keyfront's layers, kept by a test (docs/ARCHITECTURE.md): every `crate::…` path in `src/`
//! names a module at or below its own layer, never above, and no two files of one folder import
//! each other through `super::`, even by way of others. Read from the source text, so a new
//! import that breaks the order fails here with the file and the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of lower layers only; modules of one
/// layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &["ids", "clock", "failpoint", "metrics"],
    &["crypto"],
    &["hsm"],
    &["audit"],
    &["keystore"],
    // `crate::Error` is the domain's error, `kms::Error`.
    &["kms", "Error"],
    &["backup", "config"],
    &["service"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text without comments (line comments, doc comments and block comments).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if rest.starts_with('"') {
            // Skip string literals: messages may quote paths.
            let mut chars = rest.char_indices().skip(1);
            let mut end = rest.len();
            while let Some((i, c)) = chars.next() {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    end = i + 1;
                    break;
                }
            }
            out.push_str("\"\"");
            rest = &rest[end..];
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first path segment of every path that starts with `prefix` (`crate::`, `super::`),
/// including each member of a `{…}` group.
fn roots(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let trimmed = rest.trim_start();
        if let Some(group) = trimmed.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item = String::new();
            let mut members = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => members.push(std::mem::take(&mut item)),
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            members.push(item);
            for member in members {
                let name = ident(member.trim());
                if !name.is_empty() && name != "self" {
                    found.insert(name.to_owned());
                }
            }
        } else {
            let name = ident(trimmed);
            if !name.is_empty() {
                found.insert(name.to_owned());
            }
        }
    }
    found
}

/// `src/kms/mod.rs` and `src/kms/lifecycle.rs` are in module `kms`; `src/lib.rs` in none.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        let own = layer(&module)
            .unwrap_or_else(|| panic!("src/{module} is in no layer: add it to LAYERS"));
        let text = std::fs::read_to_string(file).expect("read");
        for target in roots(&code(&text), "crate::") {
            if target == module {
                continue;
            }
            let theirs = layer(&target)
                .unwrap_or_else(|| panic!("{}: crate::{target} is in no layer", file.display()));
            if theirs >= own {
                upward.push(format!(
                    "{}: crate::{target} (layer {theirs}) from {module} (layer {own})",
                    file.strip_prefix(&src).expect("under src").display()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up or sideways:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_two_files_of_a_folder_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // folder -> file stem -> the sibling stems it names through `super::`.
    let mut folders: BTreeMap<PathBuf, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let stem = file.file_stem().and_then(|s| s.to_str()).expect("stem");
        if stem == "mod" || stem == "lib" || stem == "main" {
            continue;
        }
        let folder = file.parent().expect("parent").to_path_buf();
        let siblings: BTreeSet<String> = std::fs::read_dir(&folder)
            .expect("read folder")
            .filter_map(|e| {
                let path = e.ok()?.path();
                let name = path.file_stem()?.to_str()?.to_owned();
                (name != "mod").then_some(name)
            })
            .collect();
        let text = std::fs::read_to_string(file).expect("read");
        let named: BTreeSet<String> = roots(&code(&text), "super::")
            .into_iter()
            .filter(|name| siblings.contains(name) && name != stem)
            .collect();
        folders
            .entry(folder)
            .or_default()
            .insert(stem.to_owned(), named);
    }
    let mut circles = Vec::new();
    for (folder, graph) in &folders {
        for start in graph.keys() {
            // Depth-first from `start`: reaching it again is a circle.
            let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((node, path)) = stack.pop() {
                for next in graph.get(&node).into_iter().flatten() {
                    if next == start {
                        let mut circle = path.clone();
                        circle.push(next.clone());
                        circles.push(format!(
                            "{}: {}",
                            folder.strip_prefix(&src).unwrap_or(folder).display(),
                            circle.join(" -> ")
                        ));
                    } else if seen.insert(next.clone()) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push((next.clone(), longer));
                    }
                }
            }
        }
    }
    circles.sort();
    circles.dedup();
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_parser_sees_groups_and_skips_comments_and_strings() {
    let text = "use crate::{kms::Error, hsm::{self, Hsm}};\n// crate::cli in a comment\nlet x = \"crate::service\"; crate::audit::Log::new();";
    let found = roots(&code(text), "crate::");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["audit", "hsm", "kms"]
    );
}
