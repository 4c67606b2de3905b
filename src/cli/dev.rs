//! `sdcam dev`: developer tools that are not for streaming (hidden from `--help`).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::cli::print_out;
use crate::model::random_hub;

/// The developer commands.
#[derive(Subcommand, Debug)]
pub enum DevCmd {
    /// Write full-size models with deterministic random weights into a Hugging Face cache, laid
    /// out as the real repositories (real configs and file names, fp16 variants,
    /// refs/snapshots/blobs), for offline end-to-end checks by hub id.
    WriteRandomHub {
        /// The cache folder (what HF_HUB_CACHE names, e.g. ~/.cache/huggingface/hub).
        #[arg(long)]
        cache: PathBuf,
        /// Repository to write (repeatable; default: all supported).
        #[arg(long = "repo")]
        repos: Vec<String>,
        #[arg(long, default_value_t = random_hub::DEFAULT_SEED)]
        seed: u64,
        /// Replace an existing cache entry of the same repository.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Runs a developer command.
///
/// # Errors
/// What the command fails with (an unknown repository, a write error).
pub fn run(cmd: DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::WriteRandomHub {
            cache,
            repos,
            seed,
            overwrite,
        } => write_random_hub(&cache, &repos, seed, overwrite),
    }
}

fn write_random_hub(
    cache: &Path,
    repos: &[String],
    seed: u64,
    overwrite: bool,
) -> anyhow::Result<()> {
    let repos: Vec<String> = if repos.is_empty() {
        random_hub::REPOS.iter().map(|s| s.to_string()).collect()
    } else {
        repos.to_vec()
    };
    for repo in &repos {
        let t0 = std::time::Instant::now();
        let r = random_hub::write_repo(cache, repo, seed, overwrite)?;
        let params: Vec<String> = r
            .parameters
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        print_out(&format!(
            "{repo}: {} files, {:.2} GB in {:.1} s -> {}\n  parameters: {}",
            r.files,
            r.bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64(),
            r.snapshot.display(),
            params.join(", ")
        ))?;
    }
    Ok(())
}
