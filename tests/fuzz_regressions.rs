//! Replays the fuzz corpora on stable, in CI: every file in `fuzz/corpus/<target>/` (the seeds,
//! plus whatever a local fuzz run added) and `fuzz/regressions/<target>/` (each input a fuzzer
//! once broke, kept after the fix) goes through the same harness the `fuzz/` targets run
//! (`sdcam::fuzzing`). A panic names the file.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target`'s harness on every file of its corpus and regressions; returns how many.
fn replay(target: &str) -> usize {
    let (_, harness) = sdcam::fuzzing::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        for path in files(&root.join(kind).join(target)) {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| harness(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn y4m_corpus_and_regressions() {
    assert!(replay("y4m") >= 5);
}

#[test]
fn profile_corpus_and_regressions() {
    assert!(replay("profile") >= 5);
}

#[test]
fn command_corpus_and_regressions() {
    assert!(replay("command") >= 3);
}

#[test]
fn image_corpus_and_regressions() {
    assert!(replay("image") >= 3);
}

/// Every fuzz target has its seed corpus, and every corpus folder belongs to a target.
#[test]
fn every_target_has_a_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let names: Vec<&str> = sdcam::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
    for name in &names {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs"
        );
        assert!(!files(&root.join("corpus").join(name)).is_empty(), "{name}");
    }
    for kind in ["corpus", "regressions"] {
        for dir in std::fs::read_dir(root.join(kind)).into_iter().flatten() {
            let name = dir.unwrap().file_name();
            let name = name.to_string_lossy();
            assert!(names.contains(&&*name), "fuzz/{kind}/{name} has no target");
        }
    }
}
