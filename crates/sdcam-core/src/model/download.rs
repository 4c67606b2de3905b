//! Downloading models from the Hugging Face hub: first one plan, then the files (the plan and
//! the fetch of a whole model here; file selection, cache layout, HTTP and progress in the
//! submodules).
//!
//! On first use of a hub repo sdcam lists the repo with sizes (`/api/models/{id}/revision/{rev}
//! ?blobs=true`), picks the files the pipeline loads (`select_files`, a pure function: the
//! fp16 variant on a GPU, the plain one on the CPU, never `.bin`, ONNX, `safety_checker/`,
//! `feature_extractor/` or root single-file checkpoints), says how much it will download and
//! where, refuses when the cache's disk has less free space than that, and then fetches the
//! files with one progress display (a bar on a terminal, periodic log lines otherwise).
//!
//! Files land in the `huggingface_hub` cache layout, so Python finds them and sdcam finds what
//! Python downloaded: `blobs/<etag>` (the sha256 for LFS files), `snapshots/<commit>/<path>` as
//! relative symlinks to the blob, `refs/<revision>` holding the commit. A partial file is kept as
//! `blobs/<etag>.incomplete` (the name `huggingface_hub` uses, so either program resumes the
//! other's) and continued with an HTTP `Range` request; concurrent downloads of one blob are
//! serialised by an `flock` on `.locks/models--…/<etag>.lock`, the lock `huggingface_hub` takes.
//!
//! Why this is written here rather than taken from `hf-hub` 0.4 (whose sync API sdcam used
//! before): its `info()` drops the file sizes (its `Siblings` has only `rfilename`), so no plan
//! or disk check is possible; it resumes from `blobs/<etag>.part`, a name Python neither writes
//! nor resumes; it checks neither the size nor the sha256 of what it wrote; and its progress bar
//! is per file and invisible when stderr is not a terminal. The HTTP work uses `ureq` (the client
//! `hf-hub` itself is built on), progress `indicatif`, hashing `sha2`, locks and free space
//! `fs4`; what remains hand-written is the hub protocol (which headers mean what, as in
//! `huggingface_hub.file_download`) and the cache layout.

use std::collections::HashSet;
use std::io::{IsTerminal as _, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use candle_core::DType;
use indicatif::DecimalBytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::hub::{self, HubOptions};
/// Marker file of sdcam's random-weight test models; fetched when a repo has it so such a model
/// says so once loaded.
use super::sd::RANDOM_WEIGHTS_MARKER;

mod cache;
mod http;
mod progress;
mod select;

pub(crate) use cache::*;
pub(crate) use http::*;
pub(crate) use progress::*;
pub(crate) use select::*;

/// One repo sdcam needs files of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) id: String,
    pub(crate) revision: Option<String>,
    pub(crate) want: Want,
}

/// The hub repos a pipeline needs: the model, its tiny VAE, its LoRAs (local folders and files
/// are left out).
pub(crate) fn pipeline_requests(
    model: &str,
    revision: Option<&str>,
    tiny_vae: Option<&str>,
    loras: &[String],
) -> Vec<Request> {
    let mut out = Vec::new();
    let is_local = |s: &str| Path::new(s).exists();
    if !is_local(model) {
        out.push(Request {
            id: model.to_string(),
            revision: revision.map(str::to_string),
            want: Want::Pipeline {
                kl_vae: tiny_vae.is_none(),
            },
        });
    }
    if let Some(t) = tiny_vae.filter(|t| !is_local(t)) {
        out.push(Request {
            id: t.to_string(),
            revision: None,
            want: Want::Single,
        });
    }
    for l in loras
        .iter()
        .filter(|l| !is_local(l) && !l.ends_with(".safetensors"))
    {
        out.push(Request {
            id: l.clone(),
            revision: None,
            want: Want::File(hub::LORA_WEIGHT_NAME.to_string()),
        });
    }
    out
}

/// Whether the cache alone already serves `req` (what the loader would find offline).
fn served_by_cache(req: &Request, dtype: DType, opts: &HubOptions) -> bool {
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let rev = req.revision.as_deref();
    match &req.want {
        Want::Pipeline { kl_vae } => {
            hub::resolve_model_for(&req.id, rev, dtype, &offline, *kl_vae).is_ok()
        }
        Want::Single => hub::resolve_tiny_vae(&req.id, rev, dtype, &offline).is_ok(),
        Want::File(name) => hub::resolve_lora(&req.id, Some(name), rev, &offline).is_ok(),
    }
}

/// What to check when the hub cannot be used (the same advice as `hub`'s network errors).
fn network_hint(opts: &HubOptions) -> String {
    format!(
        "downloading from the Hugging Face hub failed: check the network connection and the \
         repo id; gated or private repos need HF_TOKEN; with the model already downloaded, set \
         HF_HUB_OFFLINE=1 to use only the cache at {}",
        opts.cache_dir.display()
    )
}

/// The files of one repo to make available.
#[derive(Debug, Clone)]
pub(crate) struct RepoPlan {
    pub(crate) id: String,
    pub(crate) revision: String,
    pub(crate) commit: String,
    pub(crate) files: Vec<Selected>,
}

/// Plans the downloads for `requests` (those the cache does not already serve): lists each
/// repo, checks a pipeline's `model_index.json` (read into memory, not written), selects the
/// files. Nothing is written to the cache.
pub(crate) fn plan(
    client: &Client,
    requests: &[Request],
    dtype: DType,
    opts: &HubOptions,
) -> Result<Vec<RepoPlan>> {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let mut plans = Vec::new();
    for req in requests {
        if served_by_cache(req, dtype, opts) {
            tracing::debug!("{} is in the cache", req.id);
            continue;
        }
        let revision = req.revision.clone().unwrap_or_else(|| "main".to_string());
        let listing = client
            .listing(&req.id, &revision)
            .with_context(|| network_hint(opts))?;
        let ctx = || format!("planning the download of {} (revision {revision})", req.id);
        if matches!(req.want, Want::Pipeline { .. }) {
            if listing.files.iter().all(|f| f.path != "model_index.json") {
                bail!(
                    "{}: {} has no model_index.json; sdcam loads Stable Diffusion pipelines in \
                     diffusers layout",
                    ctx(),
                    req.id
                );
            }
            let bytes = client
                .get_bytes(&req.id, &listing.commit, "model_index.json", 1 << 20)
                .with_context(|| network_hint(opts))?;
            let index: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: parsing model_index.json", ctx()))?;
            hub::check_model_index(&index, Path::new(&format!("{}/model_index.json", req.id)))
                .with_context(ctx)?;
        }
        let repo = RepoCache::new(&opts.cache_dir, &req.id);
        let cached = cached_paths(&repo, &listing);
        let files = select_files(&listing.files, &req.want, half, &cached)
            .with_context(|| format!("{}: {}", ctx(), req.id))?;
        plans.push(RepoPlan {
            id: req.id.clone(),
            revision,
            commit: listing.commit,
            files,
        });
    }
    Ok(plans)
}

/// Makes every file `requests` need available in the cache: one plan, one disk check, one
/// progress display. Does nothing (and no network) when the cache already serves them all or
/// `HF_HUB_OFFLINE` is set.
pub(crate) fn prefetch(requests: &[Request], dtype: DType, opts: &HubOptions) -> Result<()> {
    prefetch_with(requests, dtype, opts, &free_space, &mut Client::new(opts))
}

pub(crate) fn prefetch_with(
    requests: &[Request],
    dtype: DType,
    opts: &HubOptions,
    free: &dyn Fn(&Path) -> Result<u64>,
    client: &mut Client,
) -> Result<()> {
    if opts.offline {
        return Ok(());
    }
    let plans = plan(client, requests, dtype, opts)?;
    let mut to_fetch = 0;
    let mut needed = 0u64;
    let mut unknown = 0;
    for p in &plans {
        let repo = RepoCache::new(&opts.cache_dir, &p.id);
        for f in p.files.iter().filter(|f| !f.cached) {
            to_fetch += 1;
            let have = f
                .etag
                .as_ref()
                .and_then(|e| std::fs::metadata(repo.incomplete(e)).ok())
                .map_or(0, |m| m.len());
            match f.size {
                Some(s) => needed += s.saturating_sub(have),
                None => unknown += 1,
            }
        }
    }
    if plans.is_empty() {
        return Ok(());
    }
    let avail = free(&opts.cache_dir)?;
    let names: Vec<&str> = plans.iter().map(|p| p.id.as_str()).collect();
    let unknown_note = if unknown > 0 {
        format!(" (+{unknown} of unknown size)")
    } else {
        String::new()
    };
    check_disk_space(needed, avail, &opts.cache_dir)
        .with_context(|| format!("downloading {}", names.join(", ")))?;
    if to_fetch > 0 {
        tracing::info!(
            "downloading {to_fetch} file(s) of {}, {}{unknown_note}, to {} ({} free)",
            names.join(", "),
            DecimalBytes(needed),
            opts.cache_dir.display(),
            DecimalBytes(avail)
        );
    }
    let mut progress = Progress::new(needed, opts.progress);
    for p in &plans {
        let repo = RepoCache::new(&opts.cache_dir, &p.id);
        for f in &p.files {
            if f.cached {
                if repo.pointer(&p.commit, &f.path)?.is_file() {
                    continue;
                }
                if let Some(e) = f.etag.as_deref().filter(|e| repo.blob(e).is_file()) {
                    repo.link(&p.commit, &f.path, e)?;
                    continue;
                }
            }
            let (_, commit) = client
                .fetch(&repo, &p.commit, &f.path, &mut progress)
                .with_context(|| format!("downloading {} of {}", f.path, p.id))
                .with_context(|| network_hint(opts))?;
            if commit != p.commit {
                bail!(
                    "{} changed while downloading (commit {} then {commit}); run again",
                    p.id,
                    p.commit
                );
            }
        }
        repo.write_ref(&p.revision, &p.commit)?;
    }
    progress.finish(to_fetch);
    Ok(())
}

/// Fetches one file outside a plan (a file the loader asks for that the plan did not foresee).
pub(crate) fn fetch_one(
    opts: &HubOptions,
    id: &str,
    revision: &str,
    file: &str,
) -> Result<PathBuf> {
    let client = Client::new(opts);
    let repo = RepoCache::new(&opts.cache_dir, id);
    let mut progress = Progress::new(0, opts.progress);
    let (path, commit) = client.fetch(&repo, revision, file, &mut progress)?;
    repo.write_ref(revision, &commit)?;
    progress.finish(1);
    Ok(path)
}

#[cfg(test)]
mod tests;
