//! Resolving and loading models the way diffusers does: a Hugging Face repo id (+ revision) or a
//! local folder in diffusers layout, an optional tiny VAE (TAESD) and LoRA files.
//!
//! Hub repos are looked up in the Hugging Face cache first (the same `models--owner--name`
//! layout `huggingface_hub` writes, so anything downloaded from Python is found without
//! network: `refs/<revision>` → `snapshots/<commit>/<file>`), and only then downloaded
//! ([`super::download`]: one plan with sizes and a disk check, resumable downloads into the
//! same layout). `HF_HUB_OFFLINE=1` forbids the network.
//!
//! Weights are safetensors only; the fp16 variant (`*.fp16.safetensors`) is preferred for
//! f16/bf16 and used as a fallback for f32 (converted on load).
//!
//! Slightly over 700 lines: the resolution order (folder, cache, network) and the diffusers file
//! naming rules it applies are one decision table, kept together; downloading is [`super::download`],
//! the tests are in `tests.rs`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where and how to reach the Hugging Face hub. Built from the environment with
/// [`HubOptions::from_env`]; tests build it explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (`…/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never touch the network, use only the cache.
    pub offline: bool,
    /// Access token for gated/private repos.
    pub token: Option<String>,
    /// Hub endpoint (`HF_ENDPOINT`), default `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl HubOptions {
    /// Reads the process environment (see [`HubOptions::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Builds the options from environment variables given by `var`, with `huggingface_hub`'s
    /// precedence: cache = `HF_HUB_CACHE` > `HUGGINGFACE_HUB_CACHE` > `$HF_HOME/hub` >
    /// `$XDG_CACHE_HOME/huggingface/hub` > `~/.cache/huggingface/hub`; offline =
    /// `HF_HUB_OFFLINE` (1/ON/YES/TRUE); token = `HF_TOKEN` > `HUGGING_FACE_HUB_TOKEN` > the
    /// token file (`HF_TOKEN_PATH` or `$HF_HOME/token`); endpoint = `HF_ENDPOINT`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        Self {
            cache_dir,
            offline,
            token,
            endpoint: var("HF_ENDPOINT"),
            progress: true,
        }
    }
}

/// One model component (`unet/`, `text_encoder/`, `vae/`, or a TAESD repo root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    /// `config.json`.
    pub(crate) config: PathBuf,
    /// safetensors file(s) (several for a sharded checkpoint).
    pub weights: Vec<PathBuf>,
    /// True when the weights are the `fp16` variant.
    pub(crate) fp16_variant: bool,
}

/// Every file of a Stable Diffusion pipeline that sdcam loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// What the user asked for (repo id or folder), for messages.
    pub(crate) source: String,
    /// The local folder or the cache snapshot folder.
    pub(crate) root: PathBuf,
    /// `model_index.json`.
    pub(crate) model_index: PathBuf,
    /// `_class_name` of `model_index.json`.
    pub(crate) pipeline_class: String,
    /// `unet/`.
    pub(crate) unet: ComponentFiles,
    /// `text_encoder/`.
    pub(crate) text_encoder: ComponentFiles,
    /// The model's own AutoencoderKL; no weights when resolved for a tiny VAE
    /// ([`resolve_model_for`] without `kl_vae`).
    pub(crate) vae: ComponentFiles,
    /// The `tokenizer/` folder (vocab.json + merges.txt + jsons, or tokenizer.json).
    pub(crate) tokenizer_dir: PathBuf,
    /// `scheduler/scheduler_config.json`.
    pub(crate) scheduler_config: PathBuf,
}

/// `serde_json` config of any component, with the file named in errors.
pub(crate) fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

/// A memory-mapped `VarBuilder` over safetensors files; tensors are converted to `dtype` on
/// load (so fp16 files serve an f32 model and vice versa). The one place sdcam memory-maps
/// weights (see the SAFETY note inside).
///
/// # Errors
/// `weights` is empty, a file does not exist, or a file is not valid safetensors.
pub fn load_var_builder(
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    if weights.is_empty() {
        bail!("no weight files given");
    }
    for w in weights {
        if !w.is_file() {
            bail!("weight file {} does not exist", w.display());
        }
    }
    // SAFETY: the files are memory-mapped read-only. They live in the user's model folder or
    // the Hugging Face cache, which are not modified while sdcam runs (the cache only ever
    // adds new blobs); safetensors headers are validated by candle before use.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) };
    vb.with_context(|| {
        let names: Vec<String> = weights.iter().map(|w| w.display().to_string()).collect();
        format!("memory-mapping safetensors {}", names.join(", "))
    })
}

/// Access to the files of one model: a local folder or a hub repo (cache, then network).
#[derive(Debug)]
enum Source<'a> {
    Local(PathBuf),
    Hub(HubRepo<'a>),
}

#[derive(Debug)]
struct HubRepo<'a> {
    id: String,
    revision: String,
    opts: &'a HubOptions,
    /// The cached snapshot folder, if the revision resolves in the cache.
    snapshot: Option<PathBuf>,
    /// Remote file list (filled on first need when online).
    remote_files: std::cell::OnceCell<Vec<String>>,
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl<'a> HubRepo<'a> {
    fn new(id: &str, revision: Option<&str>, opts: &'a HubOptions) -> Self {
        let revision = revision.unwrap_or("main").to_string();
        let repo_dir = opts
            .cache_dir
            .join(format!("models--{}", id.replace('/', "--")));
        let snapshot =
            if is_commit_hash(&revision) && repo_dir.join("snapshots").join(&revision).is_dir() {
                Some(repo_dir.join("snapshots").join(&revision))
            } else {
                std::fs::read_to_string(repo_dir.join("refs").join(&revision))
                    .ok()
                    .map(|c| repo_dir.join("snapshots").join(c.trim()))
                    .filter(|p| p.is_dir())
            };
        Self {
            id: id.to_string(),
            revision,
            opts,
            snapshot,
            remote_files: std::cell::OnceCell::new(),
        }
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.snapshot
            .as_ref()
            .map(|s| s.join(file))
            .filter(|p| p.is_file())
    }

    fn offline_error(&self, file: &str) -> anyhow::Error {
        if self.snapshot.is_none() {
            anyhow!(
                "model {} (revision {}) is not in the Hugging Face cache at {} and \
                 HF_HUB_OFFLINE=1: run once online or `huggingface-cli download {}`",
                self.id,
                self.revision,
                self.opts.cache_dir.display(),
                self.id
            )
        } else {
            anyhow!(
                "file {file} of model {} (revision {}) is not in the Hugging Face cache at {} and \
                 HF_HUB_OFFLINE=1: run once online or `huggingface-cli download {} {file}`",
                self.id,
                self.revision,
                self.opts.cache_dir.display(),
                self.id
            )
        }
    }

    fn network_error(&self, what: &str, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{what} of model {} (revision {}) from the Hugging Face hub failed: {e}. Check the \
             network connection and the repo id; gated or private repos need HF_TOKEN; with the \
             model already downloaded, set HF_HUB_OFFLINE=1 to use only the cache at {}",
            self.id,
            self.revision,
            self.opts.cache_dir.display()
        )
    }

    fn remote_files(&self) -> Result<&Vec<String>> {
        if let Some(f) = self.remote_files.get() {
            return Ok(f);
        }
        let listing = super::download::Client::new(self.opts)
            .listing(&self.id, &self.revision)
            .map_err(|e| self.network_error("listing the files", format!("{e:#}")))?;
        let files = listing.files.into_iter().map(|f| f.path).collect();
        Ok(self.remote_files.get_or_init(|| files))
    }

    fn download(&self, file: &str) -> Result<PathBuf> {
        tracing::info!("downloading {file} of {} ({})", self.id, self.revision);
        super::download::fetch_one(self.opts, &self.id, &self.revision, file)
            .map_err(|e| self.network_error(&format!("downloading {file}"), format!("{e:#}")))
    }
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::Local(p) => p.display().to_string(),
            Source::Hub(h) => format!("{} (revision {})", h.id, h.revision),
        }
    }

    /// Whether the file exists (locally, in the cache, or — online — in the remote repo).
    fn has(&self, file: &str) -> Result<bool> {
        match self {
            Source::Local(root) => Ok(root.join(file).is_file()),
            Source::Hub(h) => {
                if h.cached(file).is_some() {
                    Ok(true)
                } else if h.opts.offline {
                    Ok(false)
                } else {
                    Ok(h.remote_files()?.iter().any(|f| f == file))
                }
            }
        }
    }

    /// Whether the file is available without network.
    fn has_local(&self, file: &str) -> bool {
        match self {
            Source::Local(root) => root.join(file).is_file(),
            Source::Hub(h) => h.cached(file).is_some(),
        }
    }

    /// Local path of a required file, downloading it when needed and allowed.
    fn get(&self, file: &str) -> Result<PathBuf> {
        match self {
            Source::Local(root) => {
                let p = root.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    bail!(
                        "{} is missing from the model folder {}",
                        file,
                        root.display()
                    )
                }
            }
            Source::Hub(h) => {
                if let Some(p) = h.cached(file) {
                    return Ok(p);
                }
                if h.opts.offline {
                    return Err(h.offline_error(file));
                }
                h.download(file)
            }
        }
    }

    /// Local path of an optional file (None if it does not exist).
    fn get_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        if self.has_local(file) {
            return self.get(file).map(Some);
        }
        match self {
            Source::Local(_) => Ok(None),
            Source::Hub(h) if h.opts.offline => Ok(None),
            Source::Hub(_) => {
                if self.has(file)? {
                    self.get(file).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// Decides local folder vs. hub repo id.
fn open_source<'a>(spec: &str, revision: Option<&str>, opts: &'a HubOptions) -> Result<Source<'a>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Source::Local(path.to_path_buf()));
    }
    let looks_like_id = {
        let parts: Vec<&str> = spec.split('/').collect();
        (parts.len() == 1 || parts.len() == 2)
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && !p.starts_with('.')
            })
    };
    if !looks_like_id || spec.starts_with('.') || spec.starts_with('/') {
        bail!(
            "{spec:?} is neither an existing folder nor a Hugging Face repo id (like \
             `stabilityai/sd-turbo`)"
        );
    }
    let repo = HubRepo::new(spec, revision, opts);
    if repo.snapshot.is_none() && opts.offline {
        return Err(repo.offline_error(""));
    }
    Ok(Source::Hub(repo))
}

/// Picks the weight file(s) of a component folder (`""` for the repo root).
fn component_weights(
    src: &Source,
    dir: &str,
    stem: &str,
    dtype: DType,
) -> Result<(Vec<PathBuf>, bool)> {
    let join = |f: &str| {
        if dir.is_empty() {
            f.to_string()
        } else {
            format!("{dir}/{f}")
        }
    };
    let plain = join(&format!("{stem}.safetensors"));
    let fp16 = join(&format!("{stem}.fp16.safetensors"));
    let plain_idx = join(&format!("{stem}.safetensors.index.json"));
    let fp16_idx = join(&format!("{stem}.safetensors.index.fp16.json"));
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let order: [(&String, bool, bool); 4] = if half {
        [
            (&fp16, true, false),
            (&fp16_idx, true, true),
            (&plain, false, false),
            (&plain_idx, false, true),
        ]
    } else {
        [
            (&plain, false, false),
            (&plain_idx, false, true),
            (&fp16, true, false),
            (&fp16_idx, true, true),
        ]
    };
    // First what is already on disk (a model downloaded from Python in either variant), then
    // the remote repo.
    let mut pick = order.iter().find(|(f, _, _)| src.has_local(f)).copied();
    if pick.is_none() {
        for &candidate in &order {
            if src.has(candidate.0)? {
                pick = Some(candidate);
                break;
            }
        }
    }
    let Some((file, fp16_variant, is_index)) = pick else {
        let bins = [
            join(&format!("{stem}.bin")),
            join(&format!("{stem}.fp16.bin")),
        ];
        for b in &bins {
            if src.has(b).unwrap_or(false) {
                bail!(
                    "{} has only PyTorch .bin weights ({b}); sdcam loads only safetensors: \
                     convert them (e.g. diffusers' `save_pretrained(..., safe_serialization=True)`) \
                     or use a repo that ships .safetensors",
                    src.describe()
                );
            }
        }
        bail!(
            "{} has no {plain} (nor {fp16}): missing component weights",
            src.describe()
        );
    };
    if !is_index {
        return Ok((vec![src.get(file)?], fp16_variant));
    }
    let index_path = src.get(file)?;
    let index: Value = read_config(&index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{}: no weight_map", index_path.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        super::download::check_repo_path(s)
            .with_context(|| format!("{}: weight_map", index_path.display()))?;
    }
    let files = shards
        .iter()
        .map(|s| src.get(&join(s)))
        .collect::<Result<Vec<_>>>()?;
    Ok((files, fp16_variant))
}

fn component(src: &Source, dir: &str, stem: &str, dtype: DType) -> Result<ComponentFiles> {
    let config_name = if dir.is_empty() {
        "config.json".to_string()
    } else {
        format!("{dir}/config.json")
    };
    let config = src.get(&config_name).with_context(|| {
        format!(
            "loading the {} component",
            if dir.is_empty() { "model" } else { dir }
        )
    })?;
    let (weights, fp16_variant) = component_weights(src, dir, stem, dtype)?;
    Ok(ComponentFiles {
        config,
        weights,
        fp16_variant,
    })
}

/// Pipelines whose components sdcam implements (SD 1.x / 2.x, LCM, sd-turbo).
const SUPPORTED_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "LatentConsistencyModelImg2ImgPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
];

/// Checks `model_index.json`: pipeline class and component classes.
pub(crate) fn check_model_index(index: &Value, path: &Path) -> Result<String> {
    let class = index
        .get("_class_name")
        .and_then(Value::as_str)
        .with_context(|| format!("{}: no _class_name", path.display()))?
        .to_string();
    if class.contains("XL") || index.get("text_encoder_2").is_some_and(|v| !v.is_null()) {
        bail!(
            "{}: {class} is an SDXL model, which sdcam does not support yet: the second text \
             encoder (text_encoder_2, CLIPTextModelWithProjection) and the U-Net's added time \
             ids (addition_embed_type \"text_time\") are not implemented. Use an SD 1.5 or \
             SD 2.x model, e.g. stabilityai/sd-turbo",
            path.display()
        );
    }
    if !SUPPORTED_PIPELINES.contains(&class.as_str()) {
        bail!(
            "unsupported architecture {class} ({}): sdcam supports Stable Diffusion 1.x/2.x \
             pipelines ({})",
            path.display(),
            SUPPORTED_PIPELINES.join(", ")
        );
    }
    for (comp, want) in [
        ("unet", "UNet2DConditionModel"),
        ("text_encoder", "CLIPTextModel"),
        ("vae", "AutoencoderKL"),
        ("tokenizer", "CLIPTokenizer"),
    ] {
        let got = index
            .get(comp)
            .and_then(|v| v.get(1))
            .and_then(Value::as_str);
        match got {
            Some(g) if g == want || (comp == "tokenizer" && g == "CLIPTokenizerFast") => {}
            Some(g) => bail!(
                "unsupported architecture: {} declares {comp} = {g}, sdcam supports {want}",
                path.display()
            ),
            None => bail!("{} has no {comp} component", path.display()),
        }
    }
    Ok(class)
}

/// Resolves a Stable Diffusion pipeline from a local diffusers folder or a hub repo id (the
/// files diffusers' `StableDiffusionPipeline.from_pretrained` reads, safetensors only; weights
/// in the variant `dtype` prefers, see the module docs).
///
/// # Errors
/// The folder is not in diffusers layout, the repo or a file is not in the cache while offline
/// (or cannot be downloaded), `model_index.json` declares an unsupported architecture, or a
/// component has no safetensors weights.
pub fn resolve_model(
    spec: &str,
    revision: Option<&str>,
    dtype: DType,
    opts: &HubOptions,
) -> Result<ModelFiles> {
    resolve_model_for(spec, revision, dtype, opts, true)
}

/// [`resolve_model`]; without `kl_vae` (a tiny VAE replaces the model's own) the VAE's weights
/// are neither looked up nor downloaded and `vae.weights` is empty (`vae.config` is still read).
pub(crate) fn resolve_model_for(
    spec: &str,
    revision: Option<&str>,
    dtype: DType,
    opts: &HubOptions,
    kl_vae: bool,
) -> Result<ModelFiles> {
    let src = open_source(spec, revision, opts)?;
    let model_index = match &src {
        Source::Local(root) => {
            let p = root.join("model_index.json");
            if !p.is_file() {
                bail!(
                    "{} is not a diffusers-layout folder: model_index.json is missing (expected \
                     model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)",
                    root.display()
                );
            }
            p
        }
        Source::Hub(_) => src.get("model_index.json").with_context(|| {
            format!(
                "getting model_index.json of {} (a diffusers-layout repo has one)",
                src.describe()
            )
        })?,
    };
    let index: Value = read_config(&model_index)?;
    let pipeline_class = check_model_index(&index, &model_index)?;
    let root = model_index
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();

    let unet = component(&src, "unet", "diffusion_pytorch_model", dtype)?;
    let text_encoder = component(&src, "text_encoder", "model", dtype)?;
    let vae = if kl_vae {
        component(&src, "vae", "diffusion_pytorch_model", dtype)?
    } else {
        ComponentFiles {
            config: src.get("vae/config.json")?,
            weights: Vec::new(),
            fp16_variant: false,
        }
    };
    let scheduler_config = src.get("scheduler/scheduler_config.json")?;

    // Tokenizer: the slow-tokenizer files, or tokenizer.json alone.
    let tokenizer_dir =
        if src.has_local("tokenizer/vocab.json") || src.has("tokenizer/vocab.json")? {
            let vocab = src.get("tokenizer/vocab.json")?;
            src.get("tokenizer/merges.txt")?;
            src.get_optional("tokenizer/tokenizer_config.json")?;
            src.get_optional("tokenizer/special_tokens_map.json")?;
            vocab.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            let tj = src.get("tokenizer/tokenizer.json").with_context(|| {
                format!(
                    "{} has no tokenizer/vocab.json + merges.txt nor tokenizer/tokenizer.json",
                    src.describe()
                )
            })?;
            src.get_optional("tokenizer/tokenizer_config.json")?;
            src.get_optional("tokenizer/special_tokens_map.json")?;
            tj.parent().map(Path::to_path_buf).unwrap_or_default()
        };

    Ok(ModelFiles {
        source: src.describe(),
        root,
        model_index,
        pipeline_class,
        unet,
        text_encoder,
        vae,
        tokenizer_dir,
        scheduler_config,
    })
}

/// Resolves a tiny VAE (TAESD, `AutoencoderTiny`): `config.json` + weights at the root of the
/// folder/repo (or under `vae/`).
///
/// # Errors
/// The folder/repo cannot be reached (offline and not cached), has no `config.json`, its
/// `_class_name` is not `AutoencoderTiny`, or it has no safetensors weights.
pub fn resolve_tiny_vae(
    spec: &str,
    revision: Option<&str>,
    dtype: DType,
    opts: &HubOptions,
) -> Result<ComponentFiles> {
    let src = open_source(spec, revision, opts)?;
    let dir = if src.has_local("config.json")
        || (!src.has_local("vae/config.json") && src.has("config.json")?)
    {
        ""
    } else if src.has_local("vae/config.json") || src.has("vae/config.json")? {
        "vae"
    } else {
        bail!(
            "{} has no config.json: expected an AutoencoderTiny (TAESD) in diffusers layout, \
             e.g. madebyollin/taesd",
            src.describe()
        );
    };
    let files = component(&src, dir, "diffusion_pytorch_model", dtype)?;
    let cfg: Value = read_config(&files.config)?;
    if let Some(class) = cfg.get("_class_name").and_then(Value::as_str) {
        if class != "AutoencoderTiny" {
            bail!(
                "{} is a {class}, expected an AutoencoderTiny (TAESD)",
                files.config.display()
            );
        }
    }
    Ok(files)
}

/// The default LoRA file name diffusers' `load_lora_weights` looks for.
pub(crate) const LORA_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// Resolves a LoRA: a local `.safetensors` file, a folder holding `weight_name`, or a hub repo
/// id (its `weight_name`, default `pytorch_lora_weights.safetensors`, as diffusers'
/// `load_lora_weights`).
///
/// # Errors
/// A local file is not `.safetensors` or does not exist, the repo cannot be reached, or it has
/// no such file (with a hint when it only has a `.bin`).
pub fn resolve_lora(
    spec: &str,
    weight_name: Option<&str>,
    revision: Option<&str>,
    opts: &HubOptions,
) -> Result<PathBuf> {
    let name = weight_name.unwrap_or(LORA_WEIGHT_NAME);
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            bail!(
                "LoRA {} is not a .safetensors file; sdcam loads only safetensors",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    if spec.ends_with(".safetensors") && !path.exists() {
        bail!("LoRA file {} does not exist", path.display());
    }
    let src = open_source(spec, revision, opts)?;
    if !src.has(name)? {
        let bin = name.replace(".safetensors", ".bin");
        if bin != name && src.has(&bin).unwrap_or(false) {
            bail!(
                "{} has only {bin}; sdcam loads only safetensors LoRAs",
                src.describe()
            );
        }
        bail!("{} has no LoRA file {name}", src.describe());
    }
    src.get(name)
}

/// A file of a local model folder or of a repo's cached snapshot, never touching the network:
/// `None` when it is not on this machine (yet).
pub fn local_file(
    spec: &str,
    revision: Option<&str>,
    opts: &HubOptions,
    file: &str,
) -> Option<PathBuf> {
    match open_source(spec, revision, opts).ok()? {
        Source::Local(root) => Some(root.join(file)).filter(|p| p.is_file()),
        Source::Hub(h) => h.cached(file),
    }
}

#[cfg(test)]
mod tests;
