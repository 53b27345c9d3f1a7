//! Keeps ARCHITECTURE.md's layering true to the code: which modules may
//! import which (read from each source file's `crate::…` paths), and a code
//! map that names every module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every library source file (relative to `src/`, `/`-separated) with the
/// top-level modules it names as `crate::<module>`: in `use` lines and in
/// paths written inline alike.
fn imports() -> Vec<(String, BTreeSet<String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&f).unwrap();
            let mut used = BTreeSet::new();
            for (at, _) in text.match_indices("crate::") {
                let name: String = text[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    used.insert(name);
                }
            }
            (rel, used)
        })
        .filter(|(rel, _)| !rel.starts_with("bin/"))
        .collect()
}

/// The files under `src/<dir>/` or the file `src/<dir>.rs`.
fn in_module(rel: &str, module: &str) -> bool {
    rel.starts_with(&format!("{module}/")) || rel == format!("{module}.rs")
}

/// Fails on every file of `modules` that imports one of `forbidden`,
/// except the (file, import) pairs in `known`.
fn check(rule: &str, modules: &[&str], forbidden: &[&str], known: &[(&str, &str)]) {
    let mut broken = Vec::new();
    let mut still_known = BTreeSet::new();
    for (rel, used) in imports() {
        if !modules.iter().any(|m| in_module(&rel, m)) {
            continue;
        }
        for f in forbidden.iter().filter(|f| used.contains(**f)) {
            if known.contains(&(rel.as_str(), *f)) {
                still_known.insert((rel.clone(), f.to_string()));
            } else {
                broken.push(format!("src/{rel} imports crate::{f}"));
            }
        }
    }
    assert!(broken.is_empty(), "{rule}, but:\n{}", broken.join("\n"));
    // A debt paid off leaves the list: it must not hide a later relapse.
    let stale: Vec<_> = known
        .iter()
        .filter(|(rel, f)| !still_known.contains(&(rel.to_string(), f.to_string())))
        .collect();
    assert!(
        stale.is_empty(),
        "{rule}: these known exceptions no longer occur; remove them from the list: {stale:?}"
    );
}

/// The two planes, and Mercure, which has a part in each.
const PLANES: &[&str] = &["control", "stream", "mercure"];
const BACKENDS: &[&str] = &["backend"];

#[test]
fn the_planes_do_not_import_each_other() {
    check(
        "the stream plane imports nothing from the control plane",
        &["stream"],
        &["control"],
        &[],
    );
    check(
        "the control plane imports nothing from the stream plane",
        &["control"],
        &["stream"],
        &[],
    );
}

#[test]
fn no_backend_imports_a_plane() {
    // Rules both a plane and a backend apply live below both (the
    // event-name rules: the wire format, `sse::check_event_name`).
    check("no backend imports a plane", BACKENDS, PLANES, &[]);
}

#[test]
fn the_hub_imports_no_plane_and_no_backend() {
    check("the hub imports no plane", &["hub"], PLANES, &[]);
    // The hub owns its bus interface (`hub/bus.rs`): backends import the
    // hub, never the reverse.
    check("the hub imports no backend", &["hub"], BACKENDS, &[]);
    // `Hub::maintain` takes a cancellation token, not a `Lifecycle`.
    check(
        "the hub does not import the lifecycle (which imports the hub)",
        &["hub"],
        &["lifecycle"],
        &[],
    );
}

#[test]
fn the_lifecycle_imports_no_plane_and_no_backend() {
    // The planes and the backends take a `Lifecycle`; it drives the hub
    // only, so the shutdown sequence knows nothing of what it stops.
    let below: Vec<&str> = PLANES.iter().chain(BACKENDS).copied().collect();
    check(
        "the lifecycle imports no plane and no backend",
        &["lifecycle"],
        &below,
        &[],
    );
}

#[test]
fn the_wire_format_ids_and_topics_import_no_plane_hub_or_backend() {
    let above: Vec<&str> = PLANES
        .iter()
        .chain(BACKENDS)
        .chain(&["hub", "lifecycle"])
        .copied()
        .collect();
    check(
        "sse.rs, id.rs and topic.rs import no plane, hub or backend",
        &["sse", "id", "topic"],
        &above,
        &[],
    );
}

/// Every module file and directory is in the code map: a top-level one as a
/// heading, one inside a directory by its file name.
#[test]
fn the_code_map_names_every_module() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-docs/ARCHITECTURE.md"),
    )
    .unwrap();
    let map = doc
        .split("\n## Code map")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Code map section");
    let mut missing = Vec::new();
    for (rel, _) in imports() {
        let (top, inner) = match rel.split_once('/') {
            Some((dir, _)) => (format!("`src/{dir}/"), rel.rsplit('/').next().unwrap()),
            None => (format!("`src/{rel}`"), rel.as_str()),
        };
        let headed = map
            .lines()
            .any(|l| l.starts_with("### ") && l.contains(&top));
        if !headed || !map.contains(&format!("{inner}`")) {
            missing.push(format!("src/{rel}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's code map: {missing:?}"
    );
}

/// ARCHITECTURE.md's error section names every code of PROTOCOL.md's error
/// table (which tests/docs.rs checks against the source).
#[test]
fn the_error_section_names_every_code() {
    let read = |rel: &str| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
    };
    let protocol = read("proto-docs/PROTOCOL.md");
    let table = protocol
        .split("\n## Errors")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("PROTOCOL.md's error table");
    let codes: BTreeSet<&str> = table
        .lines()
        .filter_map(|l| l.split('|').nth(2))
        .map(str::trim)
        .filter(|c| c.starts_with('`'))
        .collect();
    assert!(codes.len() >= 20, "found only {codes:?}");
    let doc = read("proto-docs/ARCHITECTURE.md");
    let section = doc
        .split("\n### `src/error.rs`")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("ARCHITECTURE.md's error section");
    let missing: Vec<_> = codes.iter().filter(|c| !section.contains(**c)).collect();
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's error section: {missing:?}"
    );
}

/// ARCHITECTURE.md's metrics section names every series src/metrics.rs
/// exports (a name is the string literal before its help text).
#[test]
fn the_metrics_section_names_every_series() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
    let doc = std::fs::read_to_string(root.join("proto-docs/ARCHITECTURE.md")).unwrap();
    let section = doc
        .split("\n### `src/metrics.rs`")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("ARCHITECTURE.md's metrics section");
    let lines: Vec<&str> = src.lines().map(str::trim).collect();
    let names: BTreeSet<&str> = lines
        .windows(2)
        .filter(|w| {
            w[1].starts_with('"') && w[1][1..].starts_with(|c: char| c.is_ascii_uppercase())
        })
        .filter_map(|w| w[0].strip_prefix('"')?.strip_suffix("\","))
        .filter(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(names.len() >= 20, "found only {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !section.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's metrics section: {missing:?}"
    );
}

/// The bench (`bench/`, the workspace's other crate) measures the gateway
/// only over HTTP: it depends on no crate of the gateway and names none.
#[test]
fn the_bench_uses_the_gateway_only_over_http() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench");
    let manifest = std::fs::read_to_string(bench.join("Cargo.toml")).unwrap();
    let deps: Vec<&str> = manifest
        .lines()
        .skip_while(|l| !l.starts_with("[dependencies]"))
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    assert!(!deps.is_empty(), "no [dependencies] in bench/Cargo.toml");
    assert!(
        !deps.contains(&"streamline") && !manifest.contains("path = \".."),
        "bench/Cargo.toml depends on the gateway: {deps:?}"
    );
    let mut files = Vec::new();
    rs_files(&bench.join("src"), &mut files);
    let naming: Vec<_> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains("streamline::"))
        .collect();
    assert!(
        naming.is_empty(),
        "these bench files name the gateway's library: {naming:?}"
    );
}
