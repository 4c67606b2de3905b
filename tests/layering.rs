//! The crate's layering, checked on the source text: data and dependencies flow one way.
//!
//! The model and the stream core are a crate of their own (`crates/sdcam-core`), so the compiler
//! keeps them free of the app. Inside the app crate the stages (source, conversion, relay,
//! transform, sink, V4L2) take typed options and must not name the configuration layer above them:
//! the profile schema, the config conversion, the live-control session or the CLI. This test reads
//! every stage file (test code excluded) and fails on such a path, naming file and line.

use std::path::{Path, PathBuf};

/// Paths a stage must not name: the layers above the stages.
const ABOVE: &[&str] = &[
    "crate::profile",
    "crate::config",
    "crate::control",
    "crate::cli",
];

/// The stage modules (folders and files under `src/`).
const STAGES: &[&str] = &[
    "source",
    "sink",
    "relay",
    "transform",
    "v4l2",
    "convert",
    "frame.rs",
    "y4m.rs",
    "rate.rs",
    "stage.rs",
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            rust_files(&e, out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// The lines of a file that are not test code (`tests.rs` files, and everything from a
/// `#[cfg(test)]` item on, where the crate keeps its unit-test modules).
fn non_test_lines(path: &Path) -> Vec<(usize, String)> {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return Vec::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        out.push((i + 1, code.to_string()));
    }
    out
}

#[test]
fn stages_do_not_name_the_layers_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for s in STAGES {
        let p = src.join(s);
        assert!(p.exists(), "stage {s} is missing: update STAGES");
        rust_files(&p, &mut files);
    }
    assert!(files.len() > 20, "only {} stage files found", files.len());
    let mut bad = Vec::new();
    for f in &files {
        for (n, code) in non_test_lines(f) {
            for above in ABOVE {
                if code.contains(above) {
                    bad.push(format!("{}:{n}: {}", f.display(), code.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "stages naming the layers above them:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_core_crate_depends_on_no_app_crate() {
    let toml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/sdcam-core/Cargo.toml"),
    )
    .unwrap();
    let deps = toml.split("[dependencies]").nth(1).unwrap_or("");
    assert!(
        !deps
            .lines()
            .any(|l| l.trim_start().starts_with("sdcam ") || l.trim_start().starts_with("sdcam=")),
        "sdcam-core must not depend on the app crate"
    );
}
