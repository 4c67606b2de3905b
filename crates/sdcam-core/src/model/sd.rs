//! One Stable Diffusion model, loaded as a whole: tokenizer, text encoder, U-Net, VAE (TAESD or
//! the full AutoencoderKL) and the LCM scheduler tables, from a diffusers folder or the Hugging
//! Face cache, with LoRAs fused at load time. This is what the stream pipeline holds.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::arch::{random_var_builder, Arch};
use super::clip::{ClipTextConfig, ClipTextModel};
use super::download;
use super::hub::{self, ComponentFiles, HubOptions};
use super::lora::{fuse_into, LoraFile, LoraTarget};
use super::scheduler::LcmScheduler;
use super::taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};

/// What to load: the profile's `[model]` table in model-layer terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Hub repo id, local diffusers folder, or `random:<arch>` ([`RANDOM_PREFIX`]).
    pub id: String,
    /// Hub revision (branch, tag or commit) of `id`; `None` is `main`.
    pub revision: Option<String>,
    /// TAESD repo/folder; `None` uses the model's own AutoencoderKL.
    pub tiny_vae: Option<String>,
    /// LoRAs (repo id, folder or `.safetensors` path) with their scales, fused in order.
    pub loras: Vec<(String, f32)>,
    /// The dtype every component computes in (and the weight variant preferred: `fp16` files
    /// for F16/BF16 when the repo has them). BF16 on the CPU computes in f32 with bf16 matrix
    /// products in the U-Net and VAE ([`compute_dtypes`]).
    pub dtype: DType,
}

/// The autoencoder in use, with StreamDiffusion's latent scaling applied on both sides.
#[derive(Debug, Clone)]
pub enum Vae {
    /// TAESD (`madebyollin/taesd`, diffusers `AutoencoderTiny`).
    Tiny(AutoencoderTiny),
    /// The model's own `AutoencoderKL` (diffusers `vae/`).
    Kl(Box<AutoencoderKL>),
}

impl Vae {
    /// Image `(b, 3, h, w)` in −1..1 → U-Net latents `(b, 4, h/8, w/8)` (`× scaling_factor`;
    /// the KL VAE uses the mean of its latent distribution).
    ///
    /// # Errors
    /// The input's shape, dtype or device does not suit the encoder.
    pub fn encode(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Vae::Tiny(t) => scale(t.encode(image)?, t.scaling_factor()),
            Vae::Kl(k) => scale(k.encode_mean(image)?, k.scaling_factor()),
        }
    }

    /// U-Net latents `(b, 4, h/8, w/8)` → image `(b, 3, h, w)`, nominally in −1..1 (not
    /// clamped).
    ///
    /// # Errors
    /// The input's shape, dtype or device does not suit the decoder.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Vae::Tiny(t) => t.decode(&scale(latents.clone(), 1.0 / t.scaling_factor())?),
            Vae::Kl(k) => k.decode(&scale(latents.clone(), 1.0 / k.scaling_factor())?),
        }
    }

    /// `"taesd"` or `"vae"`.
    #[cfg(test)]
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Vae::Tiny(_) => "taesd",
            Vae::Kl(_) => "vae",
        }
    }
}

fn scale(t: Tensor, f: f64) -> candle_core::Result<Tensor> {
    if f == 1.0 {
        Ok(t)
    } else {
        t.affine(f, 0.0)
    }
}

/// A loaded Stable Diffusion pipeline's components (what diffusers'
/// `StableDiffusionPipeline.from_pretrained` holds, with an LCM scheduler's tables), immutable
/// after loading and shared by the stream ([`crate::pipeline::StreamDiffusion`]).
#[derive(Debug)]
pub struct StableDiffusion {
    pub(crate) tokenizer: ClipTokenizer,
    pub(crate) text_encoder: ClipTextModel,
    /// The denoising U-Net.
    pub unet: UNet2DConditionModel,
    /// The autoencoder between images and latents.
    pub vae: Vae,
    pub(crate) scheduler: LcmScheduler,
    /// Image pixels per latent pixel (8 for every SD VAE and TAESD).
    pub(crate) vae_scale_factor: usize,
    /// The device every component lives on.
    pub device: Device,
    pub(crate) dtype: DType,
    /// For logs: where it came from, VAE kind, LoRAs.
    pub description: String,
    /// The model folder is marked as random weights (test fixtures, `random:` architectures).
    pub random_weights: bool,
}

/// Model ids `random:<arch>` build an architecture with random weights ([`Arch`]).
pub const RANDOM_PREFIX: &str = "random:";

/// A file in a model folder that marks its weights as random (made by the fixture script).
pub(crate) const RANDOM_WEIGHTS_MARKER: &str = "RANDOM_WEIGHTS.txt";

/// Loads a component's weights: memory-mapped when nothing is fused into them, else read into
/// memory and fused with every LoRA that has modules for `target`.
fn component_vb(
    files: &ComponentFiles,
    loras: &[(LoraFile, f32, String)],
    target: LoraTarget,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let relevant: Vec<_> = loras
        .iter()
        .filter(|(l, _, _)| l.num_modules(target) > 0)
        .collect();
    if relevant.is_empty() {
        return hub::load_var_builder(&files.weights, dtype, device);
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for w in &files.weights {
        let t = candle_core::safetensors::load(w, &Device::Cpu)
            .with_context(|| format!("reading {}", w.display()))?;
        tensors.extend(t);
    }
    for (lora, scale, name) in relevant {
        let report = fuse_into(&mut tensors, lora, target, *scale)
            .with_context(|| format!("fusing LoRA {name} into the {target:?}"))?;
        tracing::info!(
            "LoRA {name}: fused {} {target:?} module(s) at scale {scale}",
            report.fused
        );
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// For a model asked for in `dtype` on `device`: the dtype its activations (and its text
/// encoder, which runs once per prompt) compute in, and the dtype its U-Net and VAE are built
/// with. The same, except bf16 on the CPU: f32 activations with bf16 products in the convs and
/// linear layers of the U-Net and the VAE (TAESD or AutoencoderKL) and in the U-Net's attention
/// (`model::packed_gemm`: weights and each product's input rounded to bf16, sums in f32; norms,
/// biases, attention scores and softmax in f32), the way OpenVINO and oneDNN run bf16 on a CPU.
///
/// # Errors
/// bf16 on a CPU without AVX512-BF16.
pub(crate) fn compute_dtypes(dtype: DType, device: &Device) -> Result<(DType, DType)> {
    if !(device.is_cpu() && dtype == DType::BF16) {
        return Ok((dtype, dtype));
    }
    if !super::packed_gemm::bf16_available() {
        bail!("{}", super::packed_gemm::UNAVAILABLE);
    }
    Ok((DType::F32, DType::BF16))
}

impl StableDiffusion {
    /// Resolves (cache first, then the hub unless offline) and loads every component.
    /// `random:sd-turbo` / `random:sd15` build the full-size architecture with random weights
    /// in memory instead (benchmarks: speed does not depend on weight values).
    ///
    /// # Errors
    /// The model, its tiny VAE or a LoRA cannot be found or downloaded (offline, unknown repo,
    /// not enough disk), a config is invalid or unsupported, the components do not fit together
    /// (text width vs cross-attention width, latent channels, an inpainting U-Net), a weight
    /// file is missing a tensor, or a LoRA is given with a `random:` model.
    pub fn load(spec: &ModelSpec, device: &Device, opts: &HubOptions) -> Result<Self> {
        if let Some(arch) = spec.id.strip_prefix(RANDOM_PREFIX) {
            // Never drop a LoRA without a word: an in-memory random model has no weight files
            // to fuse it into.
            if let Some((lora, _)) = spec.loras.first() {
                bail!(
                    "LoRA {lora} cannot be used with {}: `random:` models are built in memory \
                     without LoRA support (remove model.lora, or write the model as files with \
                     `sdcam dev write-random-hub` and load it by repo id)",
                    spec.id
                );
            }
            return Self::random(arch.parse()?, spec.dtype, device);
        }
        let (dtype, products) = compute_dtypes(spec.dtype, device)?;
        // First use: one download plan for the model, its tiny VAE and LoRAs (with a disk
        // check and progress); nothing when the cache already has them or offline.
        let lora_ids: Vec<String> = spec.loras.iter().map(|(id, _)| id.clone()).collect();
        let requests = download::pipeline_requests(
            &spec.id,
            spec.revision.as_deref(),
            spec.tiny_vae.as_deref(),
            &lora_ids,
        );
        download::prefetch(&requests, spec.dtype, opts)?;
        let files = hub::resolve_model_for(
            &spec.id,
            spec.revision.as_deref(),
            spec.dtype,
            opts,
            spec.tiny_vae.is_none(),
        )?;
        let mut loras = Vec::new();
        for (id, scale) in &spec.loras {
            let path = hub::resolve_lora(id, None, None, opts)?;
            let file = LoraFile::load(&path)?;
            loras.push((file, *scale, id.clone()));
        }

        let tokenizer = ClipTokenizer::from_dir(&files.tokenizer_dir)?;
        let text_cfg = ClipTextConfig::from_file(&files.text_encoder.config)?;
        let text_vb = component_vb(
            &files.text_encoder,
            &loras,
            LoraTarget::TextEncoder,
            dtype,
            device,
        )?;
        let text_encoder = ClipTextModel::new(text_vb, &text_cfg)
            .with_context(|| in_files("text encoder", &files.text_encoder))?;

        let unet_cfg = UNetConfig::from_file(&files.unet.config)?;
        check_fit(&unet_cfg, &text_cfg, &files)?;
        let unet_vb = component_vb(&files.unet, &loras, LoraTarget::Unet, products, device)?;
        let unet = UNet2DConditionModel::new(unet_vb, &unet_cfg)
            .with_context(|| in_files("U-Net", &files.unet))?;

        let (vae, vae_desc) = match &spec.tiny_vae {
            Some(tiny) => {
                let tf = hub::resolve_tiny_vae(tiny, None, spec.dtype, opts)?;
                let cfg = AutoencoderTinyConfig::from_file(&tf.config)?;
                check_latents(&unet_cfg, cfg.latent_channels, &tf.config)?;
                let vb = hub::load_var_builder(&tf.weights, products, device)?;
                let t = AutoencoderTiny::new(vb, &cfg).with_context(|| in_files("TAESD", &tf))?;
                (Vae::Tiny(t), format!("TAESD {tiny}"))
            }
            None => {
                let cfg = AutoencoderKLConfig::from_file(&files.vae.config)?;
                check_latents(&unet_cfg, cfg.latent_channels, &files.vae.config)?;
                let vb = hub::load_var_builder(&files.vae.weights, products, device)?;
                let k =
                    AutoencoderKL::new(vb, &cfg).with_context(|| in_files("VAE", &files.vae))?;
                (Vae::Kl(Box::new(k)), "its own VAE".to_string())
            }
        };
        let scheduler = LcmScheduler::from_config_file(&files.scheduler_config)?;
        let mut description = format!("{} with {vae_desc}", files.source);
        for (id, s) in &spec.loras {
            description.push_str(&format!(", LoRA {id} ×{s}"));
        }
        let random_weights = files.root.join(RANDOM_WEIGHTS_MARKER).is_file();
        if random_weights {
            description.push_str(" [RANDOM WEIGHTS]");
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            vae_scale_factor: 8,
            device: device.clone(),
            dtype,
            description,
            random_weights,
        })
    }

    /// A full-size architecture with random weights (and a random TAESD), built in memory.
    pub(crate) fn random(arch: Arch, dtype: DType, device: &Device) -> Result<Self> {
        let seed = 0x5dca;
        let (dtype, products) = compute_dtypes(dtype, device)?;
        let vb = |t| random_var_builder(t, device, seed);
        let text_encoder = ClipTextModel::new(vb(dtype), &arch.text_config())?;
        let unet = UNet2DConditionModel::new(vb(products), &arch.unet_config())?;
        let taesd = AutoencoderTiny::new(vb(products), &arch.taesd_config())?;
        Ok(Self {
            tokenizer: arch.tokenizer()?,
            text_encoder,
            unet,
            vae: Vae::Tiny(taesd),
            scheduler: LcmScheduler::new(arch.scheduler_config())?,
            vae_scale_factor: 8,
            device: device.clone(),
            dtype,
            description: format!(
                "{RANDOM_PREFIX}{} (the {} architecture, TAESD) [RANDOM WEIGHTS]",
                arch.name(),
                arch.repo()
            ),
            random_weights: true,
        })
    }

    /// Prompt embeddings `[1, 77, cross_attention_dim]` as diffusers' `encode_prompt` makes them
    /// (no clip skip), in the model's dtype on its device.
    ///
    /// # Errors
    /// Tokenization or the text encoder fails.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        if let Some(cut) = self.tokenizer.truncated_part(prompt)? {
            tracing::warn!(
                "the prompt is longer than the text encoder's 77 tokens; this part is ignored: \
                 {cut:?}"
            );
        }
        let ids = self.tokenizer.encode(prompt)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        let emb = self
            .text_encoder
            .forward(&ids)
            .with_context(|| format!("encoding the prompt {prompt:?}"))?;
        Ok(emb.to_dtype(self.dtype)?)
    }
}

/// The text encoder's width must be the U-Net's cross-attention width (a text encoder from
/// another model family would fail deep inside the first frame otherwise).
fn check_fit(unet: &UNetConfig, text: &ClipTextConfig, files: &hub::ModelFiles) -> Result<()> {
    if unet.cross_attention_dim() != text.hidden_size {
        bail!(
            "{} and {} do not fit together: the U-Net's cross_attention_dim is {} but the text \
             encoder's hidden_size is {}",
            files.unet.config.display(),
            files.text_encoder.config.display(),
            unet.cross_attention_dim(),
            text.hidden_size
        );
    }
    if unet.out_channels != unet.in_channels {
        bail!(
            "{}: in_channels {} ≠ out_channels {}: an inpainting or otherwise conditioned U-Net \
             (StreamDiffusion needs a plain text-to-image U-Net)",
            files.unet.config.display(),
            unet.in_channels,
            unet.out_channels
        );
    }
    Ok(())
}

/// The (tiny) VAE's latents must be the U-Net's input (e.g. a 16-channel SD3/Flux VAE is not).
fn check_latents(
    unet: &UNetConfig,
    latent_channels: usize,
    config: &std::path::Path,
) -> Result<()> {
    if latent_channels != unet.in_channels {
        bail!(
            "{}: latent_channels is {latent_channels} but the U-Net takes {} channels: this \
             autoencoder belongs to another model family",
            config.display(),
            unet.in_channels
        );
    }
    Ok(())
}

fn in_files(what: &str, files: &ComponentFiles) -> String {
    let w: Vec<String> = files
        .weights
        .iter()
        .map(|p: &PathBuf| p.display().to_string())
        .collect();
    format!(
        "loading the {what} from {} ({})",
        w.join(", "),
        files.config.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden, target, tol};

    fn offline_cache() -> HubOptions {
        HubOptions {
            cache_dir: fixture("hf-cache/hub"),
            offline: true,
            token: None,
            endpoint: None,
            progress: false,
        }
    }

    fn spec(id: &str, tiny: Option<&str>) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            revision: None,
            tiny_vae: tiny.map(str::to_string),
            loras: vec![],
            dtype: target().1,
        }
    }

    #[test]
    fn loads_from_the_cache_and_matches_components() {
        let sd = StableDiffusion::load(
            &spec(
                "sdcam-fixtures/tiny-sd15",
                Some("sdcam-fixtures/tiny-taesd"),
            ),
            &target().0,
            &offline_cache(),
        )
        .unwrap();
        assert_eq!(sd.vae.kind(), "taesd");
        // The U-Net computes what diffusers computes (the same check as the component test, but
        // through the whole-model loader).
        let g = golden("unet_sd15");
        let out = sd
            .unet
            .forward(
                &g["case0.sample"],
                &g["case0.timestep"],
                &g["case0.encoder_hidden_states"],
            )
            .unwrap();
        assert!(rel_err(&out, &g["case0.out"]).unwrap() <= tol(1e-4));
        // TAESD encode with the pipeline's scaling (TAESD's factor is 1).
        let t = golden("taesd");
        let z = sd.vae.encode(&t["enc0.image"]).unwrap();
        assert!(rel_err(&z, &t["enc0.latents"]).unwrap() <= tol(1e-4));
    }

    #[test]
    fn loads_a_local_folder_with_its_own_vae_and_lora() {
        let dir = fixture("models/tiny-sd15");
        let mut s = spec(dir.to_str().unwrap(), None);
        s.loras = vec![(
            fixture("models/tiny-lora/pytorch_lora_weights.safetensors")
                .display()
                .to_string(),
            0.7,
        )];
        let sd = StableDiffusion::load(&s, &target().0, &offline_cache()).unwrap();
        assert_eq!(sd.vae.kind(), "vae");
        // LoRA fused into both U-Net and text encoder = diffusers' fuse_lora at 0.7.
        let g = golden("lora_sd15");
        let emb = sd.text_encoder.forward(&g["text.input_ids"]).unwrap();
        assert!(rel_err(&emb, &g["text.prompt_embeds"]).unwrap() <= tol(1e-4));
        let out = sd
            .unet
            .forward(
                &g["case0.sample"],
                &g["case0.timestep"],
                &g["case0.encoder_hidden_states"],
            )
            .unwrap();
        assert!(rel_err(&out, &g["case0.out"]).unwrap() <= tol(1e-4));
        // The KL VAE's encode is the scaled mean.
        let v = golden("vae_sd15");
        let z = sd.vae.encode(&v["enc0.image"]).unwrap();
        assert!(rel_err(&z, &v["enc0.mean_scaled"]).unwrap() <= tol(1e-4));
    }

    #[test]
    fn a_random_model_refuses_a_lora_instead_of_dropping_it() {
        let mut s = spec("random:sd15", None);
        s.loras = vec![("latent-consistency/lcm-lora-sdv1-5".into(), 1.0)];
        let e = StableDiffusion::load(&s, &Device::Cpu, &offline_cache()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("latent-consistency/lcm-lora-sdv1-5"), "{msg}");
    }

    #[test]
    fn a_missing_model_says_what_to_do() {
        let e = StableDiffusion::load(
            &spec("sdcam-fixtures/not-there", None),
            &target().0,
            &offline_cache(),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("not-there"), "{msg}");
    }

    #[test]
    fn prompt_embeddings_match_the_text_encoder_golden() {
        let sd = StableDiffusion::load(
            &spec(
                "sdcam-fixtures/tiny-sd15",
                Some("sdcam-fixtures/tiny-taesd"),
            ),
            &target().0,
            &offline_cache(),
        )
        .unwrap();
        let ids = sd.tokenizer.encode("a photo of a cat").unwrap();
        assert_eq!(ids.len(), 77);
        let e = sd.encode_prompt("a photo of a cat").unwrap();
        assert_eq!(e.dims(), &[1, 77, 32]);
    }
}
