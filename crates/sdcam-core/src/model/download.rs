//! Downloading models from the Hugging Face hub: first one plan, then the files.
//!
//! On first use of a hub repo sdcam lists the repo with sizes (`/api/models/{id}/revision/{rev}
//! ?blobs=true`), picks the files the pipeline loads ([`select_files`], a pure function: the
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

/// The public hub, when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Marker file of sdcam's random-weight test models; fetched when a repo has it so such a model
/// says so once loaded.
use super::sd::RANDOM_WEIGHTS_MARKER;

/// One file of a remote repo as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path inside the repo (`unet/config.json`).
    pub path: String,
    /// Size in bytes (the LFS size for LFS files), when known.
    pub size: Option<u64>,
    /// sha256 of an LFS file: its blob name in the cache and its checksum.
    pub sha256: Option<String>,
    /// The git blob id: the blob name of a small (non-LFS) file.
    pub blob_id: Option<String>,
}

impl RemoteFile {
    /// A file known only by path and size (tests, hand-written lists).
    pub fn new(path: &str, size: Option<u64>) -> Self {
        Self {
            path: path.to_string(),
            size,
            sha256: None,
            blob_id: None,
        }
    }

    /// The cache blob name the hub's `ETag`/`X-Linked-Etag` will give for this file.
    fn etag(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
    }
}

/// A repo's files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision resolved to.
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

/// What sdcam loads from a repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// A Stable Diffusion pipeline in diffusers layout. Without `kl_vae` (a tiny VAE is
    /// configured) only `vae/config.json` of the VAE is fetched: its weights (84–335 MB) are
    /// read only when `model.tiny_vae` is unset, and a later run without a tiny VAE fetches
    /// just them.
    Pipeline { kl_vae: bool },
    /// One model at the repo root (or under `vae/`): `config.json` + `diffusion_pytorch_model`
    /// weights (TAESD, a ControlNet).
    Single,
    /// One named file (a LoRA's `pytorch_lora_weights.safetensors`).
    File(String),
}

/// One file the plan keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub path: String,
    pub size: Option<u64>,
    /// Expected cache blob name, when the listing gives it.
    pub etag: Option<String>,
    /// Already in the cache (no bytes to fetch).
    pub cached: bool,
}

struct Selector<'a> {
    files: &'a [RemoteFile],
    cached: &'a HashSet<String>,
    out: Vec<Selected>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `base-00001-of-00002.safetensors` (diffusers/transformers shard names; `base` includes the
/// variant: `diffusion_pytorch_model.fp16`).
fn is_shard(name: &str, base: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let mut parts = rest.split("-of-");
    let num =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    num(parts.next()) && num(parts.next()) && parts.next().is_none()
}

impl Selector<'_> {
    fn find(&self, path: &str) -> Option<&RemoteFile> {
        self.files.iter().find(|f| f.path == path)
    }

    fn add(&mut self, path: &str) -> bool {
        let Some(f) = self.find(path) else {
            return false;
        };
        if !self.out.iter().any(|s| s.path == path) {
            self.out.push(Selected {
                path: f.path.clone(),
                size: f.size,
                etag: f.etag().map(str::to_string),
                cached: self.cached.contains(path),
            });
        }
        true
    }

    fn require(&mut self, path: &str) -> Result<()> {
        if self.add(path) {
            Ok(())
        } else {
            bail!("the repo has no {path}")
        }
    }

    /// The weight files of one component, in the loader's order of preference (fp16 variant
    /// first for f16/bf16, plain first for f32; single file before a sharded checkpoint); a
    /// variant already in the cache wins, as it does in the loader.
    fn weights(&mut self, dir: &str, stem: &str, half: bool) -> Result<()> {
        let candidate = |variant: &str, sharded: bool| -> Vec<String> {
            let base = if variant.is_empty() {
                stem.to_string()
            } else {
                format!("{stem}.{variant}")
            };
            if !sharded {
                return vec![join(dir, &format!("{base}.safetensors"))];
            }
            let index = if variant.is_empty() {
                format!("{stem}.safetensors.index.json")
            } else {
                format!("{stem}.safetensors.index.{variant}.json")
            };
            let mut files = vec![join(dir, &index)];
            let mut shards: Vec<String> = self
                .files
                .iter()
                .filter(|f| {
                    let name = if dir.is_empty() {
                        Some(f.path.as_str())
                    } else {
                        f.path.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
                    };
                    name.is_some_and(|n| is_shard(n, &base))
                })
                .map(|f| f.path.clone())
                .collect();
            shards.sort();
            files.extend(shards);
            files
        };
        let fp16 = [candidate("fp16", false), candidate("fp16", true)];
        let plain = [candidate("", false), candidate("", true)];
        let order: Vec<&Vec<String>> = if half {
            fp16.iter().chain(plain.iter()).collect()
        } else {
            plain.iter().chain(fp16.iter()).collect()
        };
        let available: Vec<&Vec<String>> = order
            .into_iter()
            // A sharded checkpoint counts only with its shards listed.
            .filter(|c| self.find(&c[0]).is_some() && (!c[0].ends_with(".json") || c.len() > 1))
            .collect();
        let pick = available
            .iter()
            .find(|c| self.cached.contains(&c[0]))
            .or_else(|| available.first())
            .copied();
        let Some(pick) = pick else {
            let bins = [
                join(dir, &format!("{stem}.bin")),
                join(dir, &format!("{stem}.fp16.bin")),
            ];
            if let Some(b) = bins.iter().find(|b| self.find(b).is_some()) {
                bail!(
                    "the repo has only PyTorch .bin weights ({b}); sdcam loads only safetensors: \
                     convert them (e.g. diffusers' `save_pretrained(..., \
                     safe_serialization=True)`) or use a repo that ships .safetensors"
                );
            }
            bail!(
                "the repo has no {} (nor its fp16 variant)",
                join(dir, &format!("{stem}.safetensors"))
            );
        };
        for f in pick.clone() {
            self.add(&f);
        }
        Ok(())
    }

    fn component(&mut self, dir: &str, stem: &str, half: bool) -> Result<()> {
        self.require(&join(dir, "config.json"))?;
        self.weights(dir, stem, half)
    }
}

/// The files to fetch for `want` from a repo listing: a pure function of the listing, the
/// dtype wish (`half`: f16/bf16 on a GPU) and the repo paths already in the cache (`cached`).
/// The result lists every file the loader will read, each marked cached or not, in a stable
/// order. A repo without the files sdcam needs is an error naming the missing file.
pub fn select_files(
    files: &[RemoteFile],
    want: &Want,
    half: bool,
    cached: &HashSet<String>,
) -> Result<Vec<Selected>> {
    let mut s = Selector {
        files,
        cached,
        out: Vec::new(),
    };
    match want {
        Want::Pipeline { kl_vae } => {
            s.require("model_index.json")?;
            s.require("scheduler/scheduler_config.json")?;
            if s.find("tokenizer/vocab.json").is_some() {
                s.require("tokenizer/vocab.json")?;
                s.require("tokenizer/merges.txt")?;
                for f in [
                    "tokenizer/tokenizer_config.json",
                    "tokenizer/special_tokens_map.json",
                    "tokenizer/added_tokens.json",
                ] {
                    s.add(f);
                }
            } else {
                s.require("tokenizer/tokenizer.json").context(
                    "a tokenizer needs tokenizer/vocab.json + merges.txt or tokenizer/tokenizer.json",
                )?;
                // The fast tokenizer takes its pad token and length from these, as transformers'.
                for f in [
                    "tokenizer/tokenizer_config.json",
                    "tokenizer/special_tokens_map.json",
                ] {
                    s.add(f);
                }
            }
            s.component("unet", "diffusion_pytorch_model", half)?;
            s.component("text_encoder", "model", half)?;
            if *kl_vae {
                s.component("vae", "diffusion_pytorch_model", half)?;
            } else {
                s.require("vae/config.json")?;
            }
            s.add(RANDOM_WEIGHTS_MARKER);
        }
        Want::Single => {
            let dir = if s.find("config.json").is_some() {
                ""
            } else if s.find("vae/config.json").is_some() {
                "vae"
            } else {
                bail!("the repo has no config.json (nor vae/config.json)");
            };
            s.component(dir, "diffusion_pytorch_model", half)?;
        }
        Want::File(name) => {
            if !s.add(name) {
                let bin = name.replace(".safetensors", ".bin");
                if bin != *name && s.find(&bin).is_some() {
                    bail!("the repo has only {bin}; sdcam loads only safetensors");
                }
                bail!("the repo has no {name}");
            }
        }
    }
    Ok(s.out)
}

/// Bytes still to download for `files` (unknown sizes count as 0; see [`unknown_sizes`]).
pub fn bytes_to_fetch(files: &[Selected]) -> u64 {
    files
        .iter()
        .filter(|f| !f.cached)
        .filter_map(|f| f.size)
        .sum()
}

/// How many files to fetch have no known size.
pub fn unknown_sizes(files: &[Selected]) -> usize {
    files
        .iter()
        .filter(|f| !f.cached && f.size.is_none())
        .count()
}

/// Refuses a download of `needed` bytes into `cache_dir` when only `free` bytes are free.
pub fn check_disk_space(needed: u64, free: u64, cache_dir: &Path) -> Result<()> {
    if needed > free {
        bail!(
            "not enough disk space: the download needs {} in {} but only {} is free; free some \
             space or point HF_HUB_CACHE (or HF_HOME) to a larger disk",
            DecimalBytes(needed),
            cache_dir.display(),
            DecimalBytes(free)
        );
    }
    Ok(())
}

/// Free bytes on the disk that holds `dir` (or its nearest existing ancestor).
pub fn free_space(dir: &Path) -> Result<u64> {
    let mut p = dir;
    loop {
        if p.exists() {
            return fs4::available_space(p)
                .with_context(|| format!("reading the free disk space of {}", p.display()));
        }
        p = p
            .parent()
            .with_context(|| format!("no existing folder above {}", dir.display()))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Cache layout.

/// One repo's folder in the hub cache (`models--owner--name`).
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub cache_dir: PathBuf,
    pub id: String,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, id: &str) -> Self {
        Self {
            cache_dir: cache_dir.to_path_buf(),
            id: id.to_string(),
        }
    }
    fn folder(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }
    pub fn dir(&self) -> PathBuf {
        self.cache_dir.join(self.folder())
    }
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(etag)
    }
    fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(format!("{etag}.incomplete"))
    }
    fn lock_path(&self, etag: &str) -> PathBuf {
        self.cache_dir
            .join(".locks")
            .join(self.folder())
            .join(format!("{etag}.lock"))
    }
    /// `snapshots/<commit>/<file>`. The commit and the file name come from the hub's answers
    /// and from index files, so both are checked (a 40-digit hex commit, a plain relative path)
    /// and the pointer always lies inside the repo's `snapshots/` (as `huggingface_hub`'s
    /// `_get_pointer_path` insists).
    pub fn pointer(&self, commit: &str, file: &str) -> Result<PathBuf> {
        if !is_commit_hash(commit) {
            bail!(
                "the hub answered with commit {:?} for {}, which is not a 40-digit commit hash",
                commit.chars().take(64).collect::<String>(),
                self.id
            );
        }
        check_repo_path(file)?;
        Ok(self.dir().join("snapshots").join(commit).join(file))
    }
    /// Writes `refs/<revision>` (nothing for a revision that is a commit hash).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        check_repo_path(revision).context("the revision name")?;
        let path = self.dir().join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, commit).with_context(|| format!("writing {}", path.display()))
    }

    /// Links `snapshots/<commit>/<file>` to `blobs/<etag>` with a relative symlink (what
    /// `huggingface_hub` does; a copy where symlinks are not available).
    fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.pointer(commit, file)?;
        let blob = self.blob(etag);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let parent = pointer
            .parent()
            .with_context(|| format!("bad repo path {file}"))?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        // A dangling link (its blob was deleted) is replaced.
        let _ = std::fs::remove_file(&pointer);
        let depth = file.split('/').count() + 1; // snapshots/<commit>/<dirs…>/<name>
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let linked: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
        if linked.is_err() {
            std::fs::copy(&blob, &pointer)
                .with_context(|| format!("copying {} to {}", blob.display(), pointer.display()))?;
        }
        Ok(pointer)
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file path inside a repo (from a listing, an index file's `weight_map`, or a revision name):
/// only plain relative components: no `..`, `.`, empty part, absolute path or backslash, so that
/// nothing a hub or a model file says can reach outside the repo's folder.
pub fn check_repo_path(file: &str) -> Result<()> {
    let bad = file.is_empty()
        || file.starts_with('/')
        || file.contains('\\')
        || file.contains('\0')
        || file
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        bail!(
            "refusing the repo path {:?}: not a plain relative path",
            file.chars().take(200).collect::<String>()
        );
    }
    Ok(())
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Repo paths of `listing` already in the cache: in the commit's snapshot, or as a blob with
/// the etag the listing gives (then only a link is missing).
pub fn cached_paths(repo: &RepoCache, listing: &Listing) -> HashSet<String> {
    listing
        .files
        .iter()
        .filter(|f| {
            repo.pointer(&listing.commit, &f.path)
                .is_ok_and(|p| p.is_file())
                || f.etag().is_some_and(|e| repo.blob(e).is_file())
        })
        .map(|f| f.path.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Progress.

/// One progress display for a whole download: an `indicatif` bar when stderr is a terminal,
/// else an info log line every `log_every`.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    log_every: Duration,
    file: String,
}

impl Progress {
    pub(crate) fn new(total: u64, show: bool) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} \
                 {decimal_bytes_per_sec} ({eta})",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            total,
            done: 0,
            started: now,
            last_log: now,
            log_every: Duration::from_secs(10),
            file: String::new(),
        }
    }

    /// A download outside a plan learns its size only from the hub's answer.
    fn ensure_total(&mut self, size: u64) {
        if self.total == 0 {
            self.total = size;
            if let Some(b) = &self.bar {
                b.set_length(size);
            }
        }
    }

    fn file(&mut self, name: &str) {
        self.file = name.to_string();
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.last_log.elapsed() >= self.log_every {
            self.last_log = Instant::now();
            let pct = if self.total > 0 {
                100.0 * self.done as f64 / self.total as f64
            } else {
                0.0
            };
            tracing::info!(
                "downloading {}: {} of {} ({pct:.0}%) at {}/s",
                self.file,
                DecimalBytes(self.done),
                DecimalBytes(self.total),
                DecimalBytes(self.rate() as u64)
            );
        }
    }

    fn finish(&mut self, files: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.done > 0 {
            tracing::info!(
                "downloaded {files} file(s), {} in {:.1} s ({}/s)",
                DecimalBytes(self.done),
                self.started.elapsed().as_secs_f64(),
                DecimalBytes(self.rate() as u64)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// Characters escaped in one URL path segment (what Python's `quote(s, safe="")` leaves is
/// unreserved: letters, digits, `-._~`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// What the hub says about a file (the headers `huggingface_hub` reads).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMeta {
    commit: String,
    etag: String,
    size: u64,
    /// Where the bytes are (the CDN for LFS files), absolute.
    location: String,
}

#[derive(Deserialize)]
struct ApiInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: String,
    size: u64,
}

/// HTTP access to one hub endpoint.
pub(crate) struct Client {
    /// Never follows redirects itself (the hub's `Location` and `X-Linked-*` headers of an
    /// LFS file are on its 302).
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    /// Reconnections after a dropped connection, per file.
    pub(crate) retries: u32,
}

fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn status_error(code: u16, resp: ureq::Response, what: &str, has_token: bool) -> anyhow::Error {
    let hub_code = resp.header("X-Error-Code").map(str::to_string);
    let hub_msg = resp.header("X-Error-Message").map(str::to_string);
    let detail = match (code, hub_code.as_deref()) {
        (401 | 403, _) if has_token => {
            "access denied: the token (HF_TOKEN) has no access to this repo (gated: accept its \
             conditions on its hub page)"
                .to_string()
        }
        (401 | 403, _) => "access denied: the repo is gated or private; set HF_TOKEN".to_string(),
        (_, Some("RepoNotFound")) => "repo not found".to_string(),
        (_, Some("RevisionNotFound")) => "revision not found".to_string(),
        (_, Some("EntryNotFound")) => "file not found in the repo".to_string(),
        (404, _) => "not found".to_string(),
        _ => String::new(),
    };
    let mut msg = format!("{what}: HTTP {code}");
    if !detail.is_empty() {
        msg.push_str(&format!(" ({detail})"));
    }
    if let Some(m) = hub_msg {
        msg.push_str(&format!(": {m}"));
    }
    anyhow!(msg)
}

impl Client {
    pub(crate) fn new(opts: &HubOptions) -> Self {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("sdcam/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent,
            endpoint: opts
                .endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token: opts.token.clone(),
            retries: 3,
        }
    }

    /// A request with the token, sent only to the hub endpoint itself (never to the CDN a
    /// download is redirected to).
    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut r = self
            .agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        if let Some(t) = &self.token {
            if origin(url) == origin(&self.endpoint) {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
        }
        r
    }

    fn call(&self, req: ureq::Request, what: &str) -> Result<ureq::Response> {
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, resp)) => {
                Err(status_error(code, resp, what, self.token.is_some()))
            }
            Err(ureq::Error::Transport(t)) => {
                Err(anyhow!("{what}: cannot reach {}: {t}", self.endpoint))
            }
        }
    }

    /// The repo's files with sizes at `revision`.
    pub(crate) fn listing(&self, id: &str, revision: &str) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{id}/revision/{}?blobs=true",
            self.endpoint,
            utf8_percent_encode(revision, SEGMENT)
        );
        let what = format!("listing the files of {id} (revision {revision})");
        let resp = self.call(self.request("GET", &url), &what)?;
        let info: ApiInfo = resp
            .into_json()
            .with_context(|| format!("{what}: unexpected answer from {url}"))?;
        let commit = info
            .sha
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{what}: the answer has no commit (sha)"))?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| RemoteFile {
                path: s.rfilename,
                size: s.lfs.as_ref().map(|l| l.size).or(s.size),
                sha256: s.lfs.map(|l| l.sha256),
                blob_id: s.blob_id,
            })
            .collect();
        Ok(Listing { commit, files })
    }

    fn resolve_url(&self, id: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{id}/resolve/{}/{}",
            self.endpoint,
            utf8_percent_encode(revision, SEGMENT),
            encode_path(file)
        )
    }

    /// Small files read into memory (model_index.json before planning).
    fn get_bytes(&self, id: &str, revision: &str, file: &str, limit: u64) -> Result<Vec<u8>> {
        let what = format!("downloading {file} of {id} (revision {revision})");
        let mut url = self.resolve_url(id, revision, file);
        for _ in 0..5 {
            let resp = self.call(self.request("GET", &url), &what)?;
            if (300..400).contains(&resp.status()) {
                let loc = resp
                    .header("Location")
                    .with_context(|| format!("{what}: redirect without Location"))?;
                url = if loc.starts_with('/') {
                    format!("{}{loc}", origin(&url))
                } else {
                    loc.to_string()
                };
                continue;
            }
            let mut buf = Vec::new();
            resp.into_reader()
                .take(limit)
                .read_to_end(&mut buf)
                .with_context(|| format!("{what}: reading the answer"))?;
            return Ok(buf);
        }
        bail!("{what}: too many redirects")
    }

    /// `HEAD` on the resolve URL, following only relative redirects (a renamed repo), as
    /// `huggingface_hub.get_hf_file_metadata` does.
    fn metadata(&self, id: &str, revision: &str, file: &str) -> Result<FileMeta> {
        let what = format!("looking up {file} of {id} (revision {revision})");
        let mut url = self.resolve_url(id, revision, file);
        for _ in 0..5 {
            let resp = self.call(self.request("HEAD", &url), &what)?;
            let location = resp.header("Location").map(|l| {
                if l.starts_with('/') {
                    format!("{}{l}", origin(&url))
                } else {
                    l.to_string()
                }
            });
            let redirect = (300..400).contains(&resp.status());
            if redirect && resp.header("X-Repo-Commit").is_none() {
                url = location.with_context(|| format!("{what}: redirect without Location"))?;
                continue;
            }
            let commit = resp
                .header("X-Repo-Commit")
                .with_context(|| {
                    format!("{what}: the answer has no X-Repo-Commit header (is {} a Hugging Face hub?)", self.endpoint)
                })?
                .trim()
                .to_string();
            let etag = resp
                .header("X-Linked-Etag")
                .or_else(|| resp.header("ETag"))
                .map(normalize_etag)
                .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
                .with_context(|| format!("{what}: the answer has no usable ETag"))?;
            let size = resp
                .header("X-Linked-Size")
                .or_else(|| resp.header("Content-Length"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .with_context(|| format!("{what}: the answer gives no file size"))?;
            let location = if redirect {
                location.with_context(|| format!("{what}: redirect without Location"))?
            } else {
                url
            };
            return Ok(FileMeta {
                commit,
                etag,
                size,
                location,
            });
        }
        bail!("{what}: too many redirects")
    }

    /// Makes `file` available in the cache at the commit `revision` resolves to and returns its
    /// snapshot path.
    pub(crate) fn fetch(
        &self,
        repo: &RepoCache,
        revision: &str,
        file: &str,
        progress: &mut Progress,
    ) -> Result<(PathBuf, String)> {
        if is_commit_hash(revision) {
            let p = repo.pointer(revision, file)?;
            if p.is_file() {
                return Ok((p, revision.to_string()));
            }
        }
        let meta = self.metadata(&repo.id, revision, file)?;
        let pointer = repo.pointer(&meta.commit, file)?;
        if pointer.is_file() {
            return Ok((pointer, meta.commit));
        }
        if !repo.blob(&meta.etag).is_file() {
            progress.ensure_total(meta.size);
            progress.file(file);
            self.download_blob(repo, file, &meta, progress)?;
        }
        let p = repo.link(&meta.commit, file, &meta.etag)?;
        Ok((p, meta.commit))
    }

    fn download_blob(
        &self,
        repo: &RepoCache,
        file: &str,
        meta: &FileMeta,
        progress: &mut Progress,
    ) -> Result<()> {
        let blob = repo.blob(&meta.etag);
        let partial = repo.incomplete(&meta.etag);
        let lock_path = repo.lock_path(&meta.etag);
        for dir in [blob.parent(), lock_path.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("creating the lock file {}", lock_path.display()))?;
        fs4::FileExt::lock(&lock).with_context(|| format!("locking {}", lock_path.display()))?;
        if blob.is_file() {
            return Ok(()); // another process finished it while we waited
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        let mut attempt = 0;
        loop {
            match self.continue_download(&mut out, &partial, file, meta, progress) {
                Ok(()) => break,
                Err(e) if attempt < self.retries && e.is::<Interrupted>() => {
                    attempt += 1;
                    tracing::warn!("{e:#}; resuming ({attempt}/{})", self.retries);
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
                Err(e) => return Err(e),
            }
        }
        drop(out);
        let len = std::fs::metadata(&partial)
            .with_context(|| format!("reading {}", partial.display()))?
            .len();
        if len != meta.size {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "downloading {file} of {}: got {len} bytes, the hub announced {}",
                repo.id,
                meta.size
            );
        }
        if is_sha256(&meta.etag) {
            let digest = sha256_file(&partial)?;
            if !digest.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&partial);
                bail!(
                    "downloading {file} of {}: the sha256 of the data ({digest}) is not the \
                     hub's ({}); the partial file was removed, run again",
                    repo.id,
                    meta.etag
                );
            }
        }
        std::fs::rename(&partial, &blob)
            .with_context(|| format!("moving {} to {}", partial.display(), blob.display()))?;
        drop(lock);
        Ok(())
    }

    /// One request for the bytes after what `out` holds.
    fn continue_download(
        &self,
        out: &mut std::fs::File,
        partial: &Path,
        file: &str,
        meta: &FileMeta,
        progress: &mut Progress,
    ) -> Result<()> {
        let what = format!("downloading {file}");
        let mut start = out
            .metadata()
            .with_context(|| format!("reading {}", partial.display()))?
            .len();
        if start > meta.size {
            out.set_len(0)
                .with_context(|| format!("truncating {}", partial.display()))?;
            start = 0;
        }
        if start == meta.size {
            return Ok(());
        }
        if start > 0 {
            tracing::info!(
                "resuming {file} at {} of {}",
                DecimalBytes(start),
                DecimalBytes(meta.size)
            );
        }
        let mut req = self.request("GET", &meta.location);
        if start > 0 {
            req = req.set("Range", &format!("bytes={start}-"));
        }
        // The CDN may redirect again (absolute URLs, no token).
        let mut resp = self.call(req, &what)?;
        for _ in 0..5 {
            if !(300..400).contains(&resp.status()) {
                break;
            }
            let loc = resp
                .header("Location")
                .with_context(|| format!("{what}: redirect without Location"))?
                .to_string();
            let mut r = self.request("GET", &loc);
            if start > 0 {
                r = r.set("Range", &format!("bytes={start}-"));
            }
            resp = self.call(r, &what)?;
        }
        match resp.status() {
            206 => {
                let ok = resp
                    .header("Content-Range")
                    .is_some_and(|cr| cr.trim().starts_with(&format!("bytes {start}-")));
                if !ok {
                    bail!("{what}: the server answered a different range than bytes={start}-");
                }
            }
            200 if start > 0 => {
                // The server ignored the range: start over.
                out.set_len(0)
                    .with_context(|| format!("truncating {}", partial.display()))?;
            }
            200 => {}
            s => bail!("{what}: unexpected HTTP status {s}"),
        }
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let have = out.metadata().map(|m| m.len()).unwrap_or(0);
                    return Err(anyhow::Error::new(Interrupted).context(format!(
                        "{what}: connection lost after {} of {} ({e}); the partial file {} is \
                         kept and the next run resumes it",
                        DecimalBytes(have),
                        DecimalBytes(meta.size),
                        partial.display()
                    )));
                }
            };
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", partial.display()))?;
            progress.add(n as u64);
        }
        out.flush()
            .with_context(|| format!("writing {}", partial.display()))?;
        Ok(())
    }
}

/// A download that stopped midway (resumable).
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("download interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

// ---------------------------------------------------------------------------------------------
// Planning and fetching a whole model.

/// One repo sdcam needs files of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub revision: Option<String>,
    pub want: Want,
}

/// The hub repos a pipeline needs: the model, its tiny VAE, its LoRAs (local folders and files
/// are left out).
pub fn pipeline_requests(
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
pub struct RepoPlan {
    pub id: String,
    pub revision: String,
    pub commit: String,
    pub files: Vec<Selected>,
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
pub fn prefetch(requests: &[Request], dtype: DType, opts: &HubOptions) -> Result<()> {
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
