//! Full-size models with random weights, written into a Hugging Face cache the way
//! `huggingface_hub` lays out a download of the real repositories, so that the whole default path
//! (hub id → cache → full-size weights → stream) can be run and checked offline, by sdcam and by
//! diffusers alike.
//!
//! For each supported repository ([`REPOS`]) the snapshot holds the repository's real
//! configuration files verbatim (`tests/data/hub-configs`, embedded), the real CLIP BPE files
//! as `tokenizer/vocab.json` + `merges.txt`, and every weight file under its real name, the
//! `.fp16.safetensors` variant included where the real repository has one. A weight file holds
//! exactly the tensors (names and shapes) that sdcam's model asks for when built from those
//! configs (`RandomWeights::shapes`), with [`RandomWeights`] values: deterministic from
//! `(seed, repository, component, tensor name)`; the fp16 variant holds the same values rounded.
//! `latent-consistency/lcm-lora-sdv1-5` gets a rank-64 kohya-format LoRA (fp16, like the real
//! file) over every module the LCM-LoRA training script adapts in the SD 1.5 U-Net.
//!
//! Cache layout (`huggingface_hub`'s): `models--<org>--<name>/blobs/<hash>` (sha256 of the content
//! for weight files, which the hub stores in LFS; the git blob sha1 for the other files),
//! `snapshots/<commit>/<path>` relative symlinks to the blobs, `refs/main` = `<commit>` (here a
//! hash of the file list, since the snapshot is not a real commit). Each snapshot also has a
//! `RANDOM_WEIGHTS.txt`, which sdcam reports as `[RANDOM WEIGHTS]` in its model description.
//!
//! What is not written: files no pipeline loads (README, LICENSE, images, `.gitattributes`),
//! root single-file checkpoints, `.bin` / `non_ema` / ONNX weights, the safety checker's
//! weights (its config is written; load SD 1.5 in diffusers with `safety_checker=None`) and
//! TAESD's standalone `taesd_encoder`/`taesd_decoder` files: a partial snapshot, as a download
//! with allow-patterns leaves it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::arch::{hash_name, Arch, RandomWeights};
use super::clip::ClipTextModel;
use super::sd::RANDOM_WEIGHTS_MARKER;
use super::taesd::AutoencoderTiny;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;

/// The repositories this module writes, in the order `sdcam dev write-random-hub` writes them.
pub const REPOS: [&str; 4] = [SD_TURBO, TAESD, SD15, LCM_LORA_SD15];

const SD_TURBO: &str = "stabilityai/sd-turbo";
const TAESD: &str = "madebyollin/taesd";
const SD15: &str = "runwayml/stable-diffusion-v1-5";
const LCM_LORA_SD15: &str = "latent-consistency/lcm-lora-sdv1-5";

/// The seed `sdcam dev write-random-hub` uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x5dca_f011;

/// LCM-LoRA: rank (the real file's, confirmed by its parameter count) and alpha (the
/// distillation script's default `lora_alpha`).
pub(crate) const LORA_RANK: usize = 64;
pub(crate) const LORA_ALPHA: f32 = 8.0;
/// Std of the random LoRA factors: with alpha/rank = 1/8 the fused update has a std of about
/// `LORA_STD²` per element, half the base weights' 0.02, so the LoRA visibly changes the output.
const LORA_STD: f32 = 0.1;
/// Module name suffixes the LCM-LoRA adapts (the target list of diffusers'
/// `train_lcm_distill_lora_sd*.py`, matched as peft matches them: the whole name or its tail
/// after a `.`).
pub(crate) const LORA_TARGETS: [&str; 14] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];

macro_rules! hub_file {
    ($repo:literal, $path:literal) => {
        (
            $path,
            include_bytes!(concat!(
                "../../../../tests/data/hub-configs/",
                $repo,
                "/",
                $path
            ))
            .as_slice(),
        )
    };
}

const CLIP_VOCAB: &[u8] = include_bytes!("../../../../tests/fixtures/tokenizer/clip/vocab.json");
const CLIP_MERGES: &[u8] = include_bytes!("../../../../tests/fixtures/tokenizer/clip/merges.txt");

/// The real small files of a repository, by path.
fn text_files(repo: &str) -> Result<Vec<(&'static str, &'static [u8])>> {
    Ok(match repo {
        SD_TURBO => vec![
            hub_file!("stabilityai--sd-turbo", "model_index.json"),
            hub_file!("stabilityai--sd-turbo", "scheduler/scheduler_config.json"),
            hub_file!("stabilityai--sd-turbo", "text_encoder/config.json"),
            hub_file!("stabilityai--sd-turbo", "tokenizer/special_tokens_map.json"),
            hub_file!("stabilityai--sd-turbo", "tokenizer/tokenizer_config.json"),
            ("tokenizer/vocab.json", CLIP_VOCAB),
            ("tokenizer/merges.txt", CLIP_MERGES),
            hub_file!("stabilityai--sd-turbo", "unet/config.json"),
            hub_file!("stabilityai--sd-turbo", "vae/config.json"),
        ],
        SD15 => vec![
            hub_file!("runwayml--stable-diffusion-v1-5", "model_index.json"),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "feature_extractor/preprocessor_config.json"
            ),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "safety_checker/config.json"
            ),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "scheduler/scheduler_config.json"
            ),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "text_encoder/config.json"
            ),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "tokenizer/special_tokens_map.json"
            ),
            hub_file!(
                "runwayml--stable-diffusion-v1-5",
                "tokenizer/tokenizer_config.json"
            ),
            ("tokenizer/vocab.json", CLIP_VOCAB),
            ("tokenizer/merges.txt", CLIP_MERGES),
            hub_file!("runwayml--stable-diffusion-v1-5", "unet/config.json"),
            hub_file!("runwayml--stable-diffusion-v1-5", "vae/config.json"),
            hub_file!("runwayml--stable-diffusion-v1-5", "v1-inference.yaml"),
        ],
        TAESD => vec![hub_file!("madebyollin--taesd", "config.json")],
        LCM_LORA_SD15 => vec![],
        other => bail!(
            "no full-size random model for {other:?} (supported: {})",
            REPOS.join(", ")
        ),
    })
}

/// The text of one of the embedded real files of `repo` (e.g. `vae/config.json`).
#[cfg(test)]
pub(crate) fn real_file(repo: &str, path: &str) -> Result<&'static [u8]> {
    text_files(repo)?
        .into_iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| b)
        .with_context(|| format!("{repo} has no embedded file {path}"))
}

/// The random-weight source of one component of one repository.
fn weights_for(seed: u64, repo: &str, component: &str) -> RandomWeights {
    RandomWeights::new(hash_name(seed, &format!("{repo}/{component}")))
}

/// Records the tensors (name → shape) a model asks for when `build` constructs it.
fn record(
    w: &RandomWeights,
    what: &str,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let vb = VarBuilder::from_backend(Box::new(w.clone()), DType::F32, Device::Cpu);
    build(vb).with_context(|| format!("building the {what} to list its tensors"))?;
    Ok(w.shapes())
}

/// The values of a tensor, given its name and shape.
type ValuesFn = Box<dyn Fn(&str, &[usize]) -> Vec<f32>>;

/// A weights file to write: its tensors and where their values come from.
struct WeightsPlan {
    /// Paths in the repository: f32 file and (optional) fp16 variant, or an fp16-only file.
    f32_path: Option<String>,
    f16_path: Option<String>,
    tensors: BTreeMap<String, Vec<usize>>,
    values: ValuesFn,
}

fn model_weights(
    seed: u64,
    repo: &str,
    component: &str,
    stem: &str,
    fp16: bool,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<WeightsPlan> {
    let w = weights_for(seed, repo, component);
    let tensors = record(&w, &format!("{repo} {component}"), build)?;
    let dir = if component.is_empty() {
        String::new()
    } else {
        format!("{component}/")
    };
    Ok(WeightsPlan {
        f32_path: Some(format!("{dir}{stem}.safetensors")),
        f16_path: fp16.then(|| format!("{dir}{stem}.fp16.safetensors")),
        tensors,
        values: Box::new(move |name, shape| w.values(shape, name)),
    })
}

/// The kohya module stem of a U-Net module path (`lora_unet_` + the path with `.` → `_`).
pub(crate) fn kohya_unet_stem(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// Whether the LCM-LoRA adapts the U-Net module `module` (see [`LORA_TARGETS`]).
pub(crate) fn lora_targets_module(module: &str) -> bool {
    LORA_TARGETS
        .iter()
        .any(|t| module == *t || module.ends_with(&format!(".{t}")))
}

/// The LoRA tensors (kohya names → shapes) for a U-Net with the given weight shapes: per adapted
/// module, `lora_down.weight` `[r, in]` / `[r, in, k, k]`, `lora_up.weight` `[out, r]` /
/// `[out, r, 1, 1]` and a scalar `alpha`.
pub(crate) fn lora_tensors(unet: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for (name, shape) in unet {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !lora_targets_module(module) || shape.len() < 2 {
            continue;
        }
        let stem = kohya_unet_stem(module);
        let (down, up) = if shape.len() == 4 {
            (
                vec![LORA_RANK, shape[1], shape[2], shape[3]],
                vec![shape[0], LORA_RANK, 1, 1],
            )
        } else {
            (vec![LORA_RANK, shape[1]], vec![shape[0], LORA_RANK])
        };
        out.insert(format!("{stem}.lora_down.weight"), down);
        out.insert(format!("{stem}.lora_up.weight"), up);
        out.insert(format!("{stem}.alpha"), vec![]);
    }
    out
}

/// The tensors (name → shape) of the SD 1.5 U-Net as sdcam builds it.
fn sd15_unet_shapes(seed: u64) -> Result<BTreeMap<String, Vec<usize>>> {
    let cfg = Arch::Sd15.unet_config();
    record(&weights_for(seed, SD15, "unet"), "SD 1.5 U-Net", |vb| {
        UNet2DConditionModel::new(vb, &cfg).map(drop)
    })
}

fn plans(repo: &str, seed: u64) -> Result<Vec<WeightsPlan>> {
    // The shapes come from the architectures sdcam builds from these same embedded files.
    let sd = |arch: Arch, repo: &str| -> Result<Vec<WeightsPlan>> {
        let unet_cfg = arch.unet_config();
        let text_cfg = arch.text_config();
        let vae_cfg = arch.vae_config();
        Ok(vec![
            model_weights(seed, repo, "text_encoder", "model", true, |vb| {
                ClipTextModel::new(vb, &text_cfg).map(drop)
            })?,
            model_weights(seed, repo, "unet", "diffusion_pytorch_model", true, |vb| {
                UNet2DConditionModel::new(vb, &unet_cfg).map(drop)
            })?,
            model_weights(seed, repo, "vae", "diffusion_pytorch_model", true, |vb| {
                AutoencoderKL::new(vb, &vae_cfg).map(drop)
            })?,
        ])
    };
    match repo {
        SD_TURBO => sd(Arch::SdTurbo, SD_TURBO),
        SD15 => sd(Arch::Sd15, SD15),
        TAESD => {
            let cfg = Arch::SdTurbo.taesd_config();
            Ok(vec![model_weights(
                seed,
                TAESD,
                "",
                "diffusion_pytorch_model",
                false,
                |vb| AutoencoderTiny::new(vb, &cfg).map(drop),
            )?])
        }
        LCM_LORA_SD15 => {
            let tensors = lora_tensors(&sd15_unet_shapes(seed)?);
            let w = weights_for(seed, LCM_LORA_SD15, "");
            Ok(vec![WeightsPlan {
                f32_path: None,
                f16_path: Some("pytorch_lora_weights.safetensors".into()),
                tensors,
                values: Box::new(move |name, shape| {
                    if name.ends_with(".alpha") {
                        vec![LORA_ALPHA]
                    } else {
                        w.values_with_std(shape.iter().product(), name, LORA_STD)
                    }
                }),
            }])
        }
        other => bail!(
            "no full-size random model for {other:?} (supported: {})",
            REPOS.join(", ")
        ),
    }
}

/// What [`write_repo`] wrote.
#[derive(Debug, Clone)]
pub struct RepoReport {
    /// The snapshot folder written (`<cache>/models--<org>--<name>/snapshots/<commit>`).
    pub snapshot: PathBuf,
    /// Bytes of all blobs.
    pub bytes: u64,
    /// Files in the snapshot.
    pub files: usize,
    /// Parameters per weight file path.
    pub parameters: BTreeMap<String, usize>,
}

/// The cache folder of a model repository: `<cache>/models--<org>--<name>`.
pub(crate) fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// A blob being written: the temporary file and the running sha256 of its bytes.
struct BlobWriter {
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hash: Sha256,
    bytes: u64,
}

impl BlobWriter {
    fn create(blobs: &Path, n: usize) -> Result<Self> {
        let tmp = blobs.join(format!(".incomplete-{}-{n}", std::process::id()));
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            file: std::io::BufWriter::with_capacity(1 << 22, f),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.file
            .write_all(b)
            .with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Renames the file to `blobs/<sha256>`; returns the hash.
    fn finish(mut self, blobs: &Path) -> Result<(String, u64)> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        let h = hex(&self.hash.finalize());
        std::fs::rename(&self.tmp, blobs.join(&h))
            .with_context(|| format!("renaming {} to its hash", self.tmp.display()))?;
        Ok((h, self.bytes))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `git hash-object` of a file's bytes (the blob name `huggingface_hub` uses for non-LFS files).
fn git_blob_sha1(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

/// The safetensors header for `tensors` in `dtype` (data in the map's order, packed), padded to a
/// multiple of 8 bytes, with diffusers' / transformers' `{"format": "pt"}` metadata.
fn safetensors_header(tensors: &BTreeMap<String, Vec<usize>>, dtype: DType) -> Result<Vec<u8>> {
    let (tag, size) = match dtype {
        DType::F32 => ("F32", 4),
        DType::F16 => ("F16", 2),
        other => bail!("safetensors writer: unsupported dtype {other:?}"),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let end = offset + shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": tag, "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes one plan's files as blobs; returns (path, blob hash, bytes) per file.
fn write_weights(plan: &WeightsPlan, blobs: &Path, n: &mut usize) -> Result<Vec<(String, String)>> {
    let mut outs: Vec<(String, DType, BlobWriter)> = Vec::new();
    for (path, dtype) in [(&plan.f32_path, DType::F32), (&plan.f16_path, DType::F16)] {
        if let Some(p) = path {
            *n += 1;
            let mut w = BlobWriter::create(blobs, *n)?;
            w.write(&safetensors_header(&plan.tensors, dtype)?)?;
            outs.push((p.clone(), dtype, w));
        }
    }
    let mut buf = Vec::new();
    for (name, shape) in &plan.tensors {
        let values = (plan.values)(name, shape);
        for (_, dtype, w) in outs.iter_mut() {
            buf.clear();
            match dtype {
                DType::F32 => values.iter().for_each(|v| buf.extend(v.to_le_bytes())),
                _ => values
                    .iter()
                    .for_each(|v| buf.extend(half::f16::from_f32(*v).to_le_bytes())),
            }
            w.write(&buf)?;
        }
    }
    let mut files = Vec::new();
    for (path, _, w) in outs {
        let (h, _) = w.finish(blobs)?;
        files.push((path, h));
    }
    Ok(files)
}

/// Writes `repo` into the cache `cache` (the `hub` folder: what `HF_HUB_CACHE` names). Refuses
/// to touch an existing `models--…` folder unless `overwrite` (which deletes it first).
///
/// # Errors
/// `repo` is not one of [`REPOS`], its folder exists and `overwrite` is false, or writing to
/// the cache fails (permissions, disk space).
pub fn write_repo(cache: &Path, repo: &str, seed: u64, overwrite: bool) -> Result<RepoReport> {
    let texts = text_files(repo)?;
    let dir = repo_dir(cache, repo);
    if dir.exists() {
        if !overwrite {
            bail!(
                "{} exists; not overwriting a cache entry (pass --overwrite to replace it)",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;

    let marker = format!(
        "Random weights (sdcam dev write-random-hub, seed {seed:#x}) in the layout of {repo}: \
         not the real model.\n"
    );
    let mut files: Vec<(String, String)> = Vec::new();
    let mut small: Vec<(&str, &[u8])> = texts;
    small.push((RANDOM_WEIGHTS_MARKER, marker.as_bytes()));
    for (path, data) in &small {
        let h = git_blob_sha1(data);
        let blob = blobs.join(&h);
        std::fs::write(&blob, data).with_context(|| format!("writing {}", blob.display()))?;
        files.push((path.to_string(), h));
    }
    let mut parameters = BTreeMap::new();
    let mut n = 0;
    for plan in plans(repo, seed)? {
        let count = plan
            .tensors
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        for p in [&plan.f32_path, &plan.f16_path].into_iter().flatten() {
            parameters.insert(p.clone(), count);
        }
        files.extend(write_weights(&plan, &blobs, &mut n)?);
    }
    files.sort();

    let mut listing = String::new();
    for (p, h) in &files {
        listing.push_str(&format!("{p}\0{h}\n"));
    }
    let commit = git_blob_sha1(listing.as_bytes());
    let snapshot = dir.join("snapshots").join(&commit);
    let mut bytes = 0;
    for (path, h) in &files {
        let link = snapshot.join(path);
        let parent = link.parent().context("snapshot path without a parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let depth = path.matches('/').count() + 2;
        let target = format!("{}blobs/{h}", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} → {target}", link.display()))?;
        bytes += std::fs::metadata(blobs.join(h))?.len();
    }
    let refs = dir.join("refs");
    std::fs::create_dir_all(&refs)?;
    std::fs::write(refs.join("main"), &commit)
        .with_context(|| format!("writing {}", refs.join("main").display()))?;
    Ok(RepoReport {
        snapshot,
        bytes,
        files: files.len(),
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_covers_the_lcm_lora_modules_at_its_size() {
        let unet = sd15_unet_shapes(1).unwrap();
        let lora = lora_tensors(&unet);
        let modules = lora.keys().filter(|k| k.ends_with(".alpha")).count();
        let params: usize = lora.values().map(|s| s.iter().product::<usize>()).sum();
        eprintln!("{modules} modules, {params} parameters");
        // The real file: ~67.5M parameters, 135 MB in fp16.
        assert!((67_000_000..68_000_000).contains(&params), "{params}");
        for stem in [
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "lora_unet_down_blocks_0_resnets_0_conv1",
            "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "lora_unet_down_blocks_0_downsamplers_0_conv",
            "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_unet_mid_block_attentions_0_proj_out",
        ] {
            assert!(lora.contains_key(&format!("{stem}.alpha")), "{stem}");
        }
        assert_eq!(
            lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"],
            [64, 320, 3, 3]
        );
        assert!(!lora
            .keys()
            .any(|k| k.contains("conv_in") || k.contains("time_embedding")));
    }

    /// The written configs are the files the tensor lists were built from.
    #[test]
    fn written_configs_are_the_architectures_files() {
        for (repo, arch) in [(SD_TURBO, Arch::SdTurbo), (SD15, Arch::Sd15)] {
            let f = |p| std::str::from_utf8(real_file(repo, p).unwrap()).unwrap();
            assert_eq!(f("unet/config.json"), arch.unet_config_json());
            assert_eq!(f("text_encoder/config.json"), arch.text_config_json());
            assert_eq!(f("vae/config.json"), arch.vae_config_json());
            assert_eq!(f("model_index.json"), arch.model_index_json());
        }
        let taesd = std::str::from_utf8(real_file(TAESD, "config.json").unwrap()).unwrap();
        assert_eq!(taesd, Arch::SdTurbo.taesd_config_json());
        assert!(real_file(SD15, "unet/nothing.json").is_err());
        assert!(write_repo(Path::new("/nonexistent"), "org/unknown", 0, false).is_err());
    }

    #[test]
    fn header_is_aligned_and_packed() {
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), vec![2, 3]);
        t.insert("b".to_string(), vec![]);
        let h = safetensors_header(&t, DType::F16).unwrap();
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!((n % 8, h.len()), (0, 8 + n));
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["a"]["data_offsets"], serde_json::json!([0, 12]));
        assert_eq!(v["b"]["data_offsets"], serde_json::json!([12, 14]));
        assert_eq!(v["__metadata__"]["format"], "pt");
    }

    #[test]
    fn git_blob_hash_is_gits() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_sha1(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }
}
