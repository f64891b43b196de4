//! The documentation names only things that exist. README.md, docs/*.md and the
//! chart README are scanned for:
//!
//! - repository paths, in backticks (`src/ingress/sync.rs`) or as relative links
//!   (`[text](docs/operations.md)`, resolved from the file that links): each must
//!   exist. A backticked path counts when it starts with a directory of the
//!   repository (`target/` is built, not checked in, so it is not one);
//!   placeholders (`<`, `*`, `…`, `{`) and URLs are skipped; a link's
//!   `#fragment` into a Markdown file must be one of its headings;
//! - `make TARGET` (in backticks or on a line of a fenced block): TARGET must be a
//!   target of the Makefile;
//! - Helm value paths in backticks whose first segment is a top-level key of the
//!   chart's values.yaml (`webhookIngress.autoscaling.enabled`, `metrics.port=9090`):
//!   each segment must resolve; a trailing `.*` needs only its parent (file
//!   names such as `dropbox.yaml` are not value paths);
//! - Rust paths in backticks starting with `crate::`, `dropbox_operator::`,
//!   `controller::`, `ingress::` or `contract::`: the modules must be files
//!   under src/ and the last segment a module or an item defined in the module
//!   it names (`fn`, `struct`, `enum`, `const`, `static`, `type`, `trait`,
//!   `mod`; after a type, an item in that type's file).
//!
//! It fails with every miss listed, file by file.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The scanned documents, relative to the repository root.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![
        PathBuf::from("README.md"),
        PathBuf::from("charts/dropbox-operator/README.md"),
    ];
    let mut in_docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| Path::new("docs").join(p.file_name().expect("name")))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

/// The document's text outside fenced blocks, and the lines inside them.
fn split_fences(text: &str) -> (String, Vec<String>) {
    let (mut prose, mut fenced, mut inside) = (String::new(), Vec::new(), false);
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
            prose.push('\n');
        } else if inside {
            fenced.push(line.to_owned());
            prose.push('\n');
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    (prose, fenced)
}

/// Inline code spans (single backticks), whitespace collapsed.
fn code_spans(prose: &str) -> Vec<String> {
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Targets of `[text](target)` links.
fn link_targets(prose: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = prose;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_owned());
        }
    }
    out
}

/// GitHub's anchors of a Markdown file's headings: lower case, spaces to `-`,
/// other punctuation dropped.
fn anchors(text: &str) -> BTreeSet<String> {
    let (prose, _) = split_fences(text);
    prose
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.strip_prefix(' '))
        .map(|heading| {
            heading
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

fn is_placeholder(s: &str) -> bool {
    s.contains(['<', '*', '…', '{']) || s.contains("://") || s.starts_with("mailto:")
}

/// Directories at the top of the repository (what a backticked path may start with).
fn top_dirs() -> BTreeSet<String> {
    fs::read_dir(root())
        .expect("repository root")
        .map(|e| e.expect("entry"))
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target" && n != ".git")
        .collect()
}

fn make_targets() -> BTreeSet<String> {
    fs::read_to_string(root().join("Makefile"))
        .expect("Makefile")
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let ok = !name.is_empty()
                && !rest.starts_with('=')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            ok.then(|| name.to_owned())
        })
        .collect()
}

/// The word after `make` in a command such as `make e2e E2E_IMAGE=`.
fn make_target(command: &str) -> Option<&str> {
    let rest = command.trim().strip_prefix("make ")?;
    let word = rest.split_whitespace().next()?;
    (!word.starts_with('-') && !word.contains('=')).then_some(word)
}

fn values() -> serde_json::Value {
    let text = fs::read_to_string(root().join("charts/dropbox-operator/values.yaml"))
        .expect("values.yaml");
    serde_saphyr::from_str(&text).expect("values.yaml parses")
}

/// `Some(resolves)` when `span` is a value path under a top-level key of values.yaml.
fn value_path_resolves(values: &serde_json::Value, span: &str) -> Option<bool> {
    let path = span.split_once('=').map_or(span, |(p, _)| p);
    let path = path.strip_suffix(".*").unwrap_or(path);
    let file_name = [".yaml", ".yml", ".json", ".md", ".txt", ".tgz"]
        .iter()
        .any(|ext| path.ends_with(ext));
    let ok_chars = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
    if file_name || !ok_chars || !path.contains('.') || path.ends_with('.') {
        return None;
    }
    let mut segments = path.split('.');
    let first = segments.next()?;
    let mut node = values.get(first)?;
    for segment in segments {
        match node.get(segment) {
            Some(next) => node = next,
            None => return Some(false),
        }
    }
    Some(true)
}

fn module_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn defines(source: &str, name: &str) -> bool {
    [
        "fn", "struct", "enum", "const", "static", "type", "trait", "mod",
    ]
    .iter()
    .any(|kw| {
        let needle = format!("{kw} {name}");
        source.match_indices(&needle).any(|(i, _)| {
            let after = source[i + needle.len()..].chars().next();
            !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

/// `Some(resolves)` when `span` is a Rust path into this crate.
fn rust_path_resolves(span: &str) -> Option<bool> {
    let path = span.split(['(', '<', ' ']).next()?;
    let roots = [
        "crate::",
        "dropbox_operator::",
        "controller::",
        "ingress::",
        "contract::",
    ];
    let rest = roots.iter().find_map(|r| path.strip_prefix(r).map(|_| r))?;
    let segments: Vec<&str> = match *rest {
        "crate::" | "dropbox_operator::" => path[rest.len()..].split("::").collect(),
        _ => path.split("::").collect(),
    };
    if segments
        .iter()
        .any(|s| s.is_empty() || !s.chars().all(|c| c.is_alphanumeric() || c == '_'))
    {
        return Some(false);
    }
    let src = root().join("src");
    let (mut dir, mut file) = (src.clone(), src.join("lib.rs"));
    let (last, modules) = segments.split_last()?;
    for segment in modules {
        match module_file(&dir, segment) {
            Some(f) => {
                dir = dir.join(segment);
                file = f;
            }
            // A type: its items are in the file it is defined in.
            None => {
                let source = fs::read_to_string(&file).unwrap_or_default();
                return Some(defines(&source, segment) && defines(&source, last));
            }
        }
    }
    let source = fs::read_to_string(&file).unwrap_or_default();
    Some(module_file(&dir, last).is_some() || defines(&source, last))
}

#[test]
fn docs_name_only_what_exists() {
    let root = root();
    let dirs = top_dirs();
    let targets = make_targets();
    let values = values();
    let mut misses = Vec::new();
    for doc in documents() {
        let text = fs::read_to_string(root.join(&doc)).expect("document");
        let (prose, fenced) = split_fences(&text);
        let mut miss =
            |what: &str, name: &str| misses.push(format!("{}: {what} `{name}`", doc.display()));

        for target in link_targets(&prose) {
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            if is_placeholder(path) {
                continue;
            }
            let base = doc.parent().unwrap_or(Path::new(""));
            let file = if path.is_empty() {
                root.join(&doc)
            } else {
                root.join(base).join(path)
            };
            if !file.exists() {
                miss("link to a missing path", &target);
            } else if !fragment.is_empty()
                && file.extension().is_some_and(|e| e == "md")
                && !anchors(&fs::read_to_string(&file).unwrap_or_default()).contains(fragment)
            {
                miss("link to a missing heading", &target);
            }
        }

        for span in code_spans(&prose) {
            let first = span.split(' ').next().unwrap_or_default();
            let top = first.split('/').next().unwrap_or_default();
            if first.contains('/')
                && dirs.contains(top)
                && !is_placeholder(first)
                && !root.join(first).exists()
            {
                miss("missing path", first);
            }
            if let Some(target) = make_target(&span)
                && !targets.contains(target)
            {
                miss("missing make target", target);
            }
            if value_path_resolves(&values, &span) == Some(false) {
                miss("Helm value not in values.yaml", &span);
            }
            if rust_path_resolves(&span) == Some(false) {
                miss("Rust item not in src/", &span);
            }
        }

        for line in &fenced {
            if let Some(target) = make_target(line)
                && !targets.contains(target)
            {
                miss("missing make target", target);
            }
        }
    }
    assert!(
        misses.is_empty(),
        "{} thing(s) the docs name do not exist:\n{}",
        misses.len(),
        misses.join("\n")
    );
}

/// The rules catch what they are for (and pass what is right).
#[test]
fn the_rules_tell_real_from_missing() {
    let values = values();
    assert_eq!(
        value_path_resolves(&values, "webhookIngress.autoscaling.enabled"),
        Some(true)
    );
    assert_eq!(
        value_path_resolves(&values, "metrics.serviceMonitor.*"),
        Some(true)
    );
    assert_eq!(
        value_path_resolves(&values, "metrics.prometheusRule.enabled=true"),
        Some(true)
    );
    assert_eq!(
        value_path_resolves(&values, "webhookIngress.noSuchValue"),
        Some(false)
    );
    assert_eq!(value_path_resolves(&values, "spec.events.source"), None);
    assert_eq!(value_path_resolves(&values, "dropbox.yaml"), None);
    assert_eq!(
        rust_path_resolves("crate::store::wait_until_ready"),
        Some(true)
    );
    assert_eq!(
        rust_path_resolves("dropbox_operator::ingress::payload"),
        Some(true)
    );
    assert_eq!(
        rust_path_resolves("controller::events::wait_until_ready"),
        Some(false)
    );
    assert_eq!(rust_path_resolves("kube::runtime::Controller"), None);
    assert!(make_targets().contains("test"));
    assert_eq!(make_target("make e2e E2E_IMAGE="), Some("e2e"));
    assert!(is_placeholder("tests/*/node_modules"));
    assert!(
        anchors("# T\n## Side by side with Knative's GitHubSource adapter\n")
            .contains("side-by-side-with-knatives-githubsource-adapter")
    );
}
