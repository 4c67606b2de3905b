//! Which files of a hub repo a pipeline loads ([`select_files`], a pure function over the hub's
//! listing) and how much that is.

use super::*;

/// The public hub, when `HF_ENDPOINT` is unset.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// One file of a remote repo as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteFile {
    /// Path inside the repo (`unet/config.json`).
    pub(crate) path: String,
    /// Size in bytes (the LFS size for LFS files), when known.
    pub(crate) size: Option<u64>,
    /// sha256 of an LFS file: its blob name in the cache and its checksum.
    pub(crate) sha256: Option<String>,
    /// The git blob id: the blob name of a small (non-LFS) file.
    pub(crate) blob_id: Option<String>,
}

impl RemoteFile {
    /// A file known only by path and size (tests, hand-written lists).
    #[cfg(test)]
    pub(crate) fn new(path: &str, size: Option<u64>) -> Self {
        Self {
            path: path.to_string(),
            size,
            sha256: None,
            blob_id: None,
        }
    }

    /// The cache blob name the hub's `ETag`/`X-Linked-Etag` will give for this file.
    pub(super) fn etag(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
    }
}

/// A repo's files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listing {
    /// The commit the revision resolved to.
    pub(crate) commit: String,
    pub(crate) files: Vec<RemoteFile>,
}

/// What sdcam loads from a repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Want {
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
pub(crate) struct Selected {
    pub(crate) path: String,
    pub(crate) size: Option<u64>,
    /// Expected cache blob name, when the listing gives it.
    pub(crate) etag: Option<String>,
    /// Already in the cache (no bytes to fetch).
    pub(crate) cached: bool,
}

pub(super) struct Selector<'a> {
    files: &'a [RemoteFile],
    cached: &'a HashSet<String>,
    out: Vec<Selected>,
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `base-00001-of-00002.safetensors` (diffusers/transformers shard names; `base` includes the
/// variant: `diffusion_pytorch_model.fp16`).
pub(super) fn is_shard(name: &str, base: &str) -> bool {
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
    pub(super) fn find(&self, path: &str) -> Option<&RemoteFile> {
        self.files.iter().find(|f| f.path == path)
    }

    pub(super) fn add(&mut self, path: &str) -> bool {
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

    pub(super) fn require(&mut self, path: &str) -> Result<()> {
        if self.add(path) {
            Ok(())
        } else {
            bail!("the repo has no {path}")
        }
    }

    /// The weight files of one component, in the loader's order of preference (fp16 variant
    /// first for f16/bf16, plain first for f32; single file before a sharded checkpoint); a
    /// variant already in the cache wins, as it does in the loader.
    pub(super) fn weights(&mut self, dir: &str, stem: &str, half: bool) -> Result<()> {
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

    pub(super) fn component(&mut self, dir: &str, stem: &str, half: bool) -> Result<()> {
        self.require(&join(dir, "config.json"))?;
        self.weights(dir, stem, half)
    }
}

/// The files to fetch for `want` from a repo listing: a pure function of the listing, the
/// dtype wish (`half`: f16/bf16 on a GPU) and the repo paths already in the cache (`cached`).
/// The result lists every file the loader will read, each marked cached or not, in a stable
/// order. A repo without the files sdcam needs is an error naming the missing file.
pub(crate) fn select_files(
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
#[cfg(test)]
pub(crate) fn bytes_to_fetch(files: &[Selected]) -> u64 {
    files
        .iter()
        .filter(|f| !f.cached)
        .filter_map(|f| f.size)
        .sum()
}

/// How many files to fetch have no known size.
#[cfg(test)]
pub(crate) fn unknown_sizes(files: &[Selected]) -> usize {
    files
        .iter()
        .filter(|f| !f.cached && f.size.is_none())
        .count()
}

/// Refuses a download of `needed` bytes into `cache_dir` when only `free` bytes are free.
pub(crate) fn check_disk_space(needed: u64, free: u64, cache_dir: &Path) -> Result<()> {
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
pub(crate) fn free_space(dir: &Path) -> Result<u64> {
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
