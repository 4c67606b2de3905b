//! Full-size model architectures (sd-turbo, SD 1.5) with their published configs and random weights, for benchmarks and tests without downloaded checkpoints.
//!
//! The configs are the real `config.json` files of `stabilityai/sd-turbo`,
//! `runwayml/stable-diffusion-v1-5` and `madebyollin/taesd`, embedded verbatim from
//! `tests/data/hub-configs/` (nulls, absent keys and all) and read by the same code as any
//! downloaded model ([`crate::model::config`]). They build the same architectures as the Python
//! peer's `make_models.py` (`sd-turbo-arch`, `sd15-arch`), so timings can be compared.
//!
//! [`random_var_builder`] is a `VarBuilder` that makes up a tensor of the requested shape for
//! any name: deterministic from `(seed, name)`, about normal with std 0.02 (1-D `…weight`
//! tensors, i.e. norm scales, around 1), generated on all cores (a full U-Net in about a second
//! in release builds).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::clip::ClipTextConfig;
use super::config::{self, ComponentConfig};
use super::scheduler::SchedulerConfig;
use super::taesd::AutoencoderTinyConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::UNetConfig;
use super::vae::AutoencoderKLConfig;

/// A published Stable Diffusion architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `stabilityai/sd-turbo`: SD 2.1 U-Net (linear projections, 5/10/20/20 heads, 1024-wide
    /// cross attention) and the OpenCLIP ViT-H/14 text tower (23 layers).
    SdTurbo,
    /// `runwayml/stable-diffusion-v1-5`: SD 1.5 U-Net (conv projections, 8 heads, 768-wide
    /// cross attention) and the OpenAI CLIP ViT-L/14 text tower.
    Sd15,
}

impl FromStr for Arch {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "sd-turbo" => Ok(Self::SdTurbo),
            "sd15" => Ok(Self::Sd15),
            other => anyhow::bail!("unknown architecture {other:?} (expected sd-turbo or sd15)"),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The real config files of a hub repo, embedded verbatim from `tests/data/hub-configs/`
/// (copies of the hub files; provenance in that folder's README).
macro_rules! hub_file {
    ($repo:literal, $path:literal) => {
        include_str!(concat!(
            "../../../../tests/data/hub-configs/",
            $repo,
            "/",
            $path
        ))
    };
}

const SD_TURBO_UNET: &str = hub_file!("stabilityai--sd-turbo", "unet/config.json");
const SD_TURBO_TEXT: &str = hub_file!("stabilityai--sd-turbo", "text_encoder/config.json");
const SD_TURBO_VAE: &str = hub_file!("stabilityai--sd-turbo", "vae/config.json");
const SD_TURBO_SCHEDULER: &str =
    hub_file!("stabilityai--sd-turbo", "scheduler/scheduler_config.json");
const SD_TURBO_TOKENIZER_CONFIG: &str =
    hub_file!("stabilityai--sd-turbo", "tokenizer/tokenizer_config.json");
const SD_TURBO_SPECIAL_TOKENS: &str =
    hub_file!("stabilityai--sd-turbo", "tokenizer/special_tokens_map.json");
#[cfg(test)]
const SD_TURBO_MODEL_INDEX: &str = hub_file!("stabilityai--sd-turbo", "model_index.json");

const SD15_UNET: &str = hub_file!("runwayml--stable-diffusion-v1-5", "unet/config.json");
const SD15_TEXT: &str = hub_file!(
    "runwayml--stable-diffusion-v1-5",
    "text_encoder/config.json"
);
const SD15_VAE: &str = hub_file!("runwayml--stable-diffusion-v1-5", "vae/config.json");
const SD15_SCHEDULER: &str = hub_file!(
    "runwayml--stable-diffusion-v1-5",
    "scheduler/scheduler_config.json"
);
const SD15_TOKENIZER_CONFIG: &str = hub_file!(
    "runwayml--stable-diffusion-v1-5",
    "tokenizer/tokenizer_config.json"
);
const SD15_SPECIAL_TOKENS: &str = hub_file!(
    "runwayml--stable-diffusion-v1-5",
    "tokenizer/special_tokens_map.json"
);
#[cfg(test)]
const SD15_MODEL_INDEX: &str = hub_file!("runwayml--stable-diffusion-v1-5", "model_index.json");

/// `madebyollin/taesd` `config.json` (TAESD 1.3; used with both architectures).
const TAESD: &str = hub_file!("madebyollin--taesd", "config.json");

/// The real CLIP BPE vocabulary (shared by both architectures; only the padding differs).
const CLIP_VOCAB: &str = include_str!("../../../../tests/fixtures/tokenizer/clip/vocab.json");
const CLIP_MERGES: &str = include_str!("../../../../tests/fixtures/tokenizer/clip/merges.txt");

fn parse<T: ComponentConfig>(arch: Arch, what: &str, json: &str) -> T {
    config::parse(json, &format!("embedded {} {what}", arch.repo()))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

impl Arch {
    /// Every architecture.
    #[cfg(test)]
    pub(crate) const ALL: [Arch; 2] = [Arch::SdTurbo, Arch::Sd15];

    /// The command-line name (`sd-turbo`, `sd15`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SdTurbo => "sd-turbo",
            Self::Sd15 => "sd15",
        }
    }

    /// The hub repository the configs come from.
    pub(crate) fn repo(self) -> &'static str {
        match self {
            Self::SdTurbo => "stabilityai/sd-turbo",
            Self::Sd15 => "runwayml/stable-diffusion-v1-5",
        }
    }

    /// `unet/config.json` text.
    pub fn unet_config_json(self) -> &'static str {
        match self {
            Self::SdTurbo => SD_TURBO_UNET,
            Self::Sd15 => SD15_UNET,
        }
    }

    /// `text_encoder/config.json` text.
    pub(crate) fn text_config_json(self) -> &'static str {
        match self {
            Self::SdTurbo => SD_TURBO_TEXT,
            Self::Sd15 => SD15_TEXT,
        }
    }

    /// `vae/config.json` text.
    pub(crate) fn vae_config_json(self) -> &'static str {
        match self {
            Self::SdTurbo => SD_TURBO_VAE,
            Self::Sd15 => SD15_VAE,
        }
    }

    /// `scheduler/scheduler_config.json` text.
    pub(crate) fn scheduler_config_json(self) -> &'static str {
        match self {
            Self::SdTurbo => SD_TURBO_SCHEDULER,
            Self::Sd15 => SD15_SCHEDULER,
        }
    }

    /// `tokenizer/tokenizer_config.json` and `tokenizer/special_tokens_map.json` texts, in the
    /// order transformers applies them.
    pub(crate) fn tokenizer_config_jsons(self) -> [&'static str; 2] {
        match self {
            Self::SdTurbo => [SD_TURBO_TOKENIZER_CONFIG, SD_TURBO_SPECIAL_TOKENS],
            Self::Sd15 => [SD15_TOKENIZER_CONFIG, SD15_SPECIAL_TOKENS],
        }
    }

    /// `model_index.json` text.
    #[cfg(test)]
    pub(crate) fn model_index_json(self) -> &'static str {
        match self {
            Self::SdTurbo => SD_TURBO_MODEL_INDEX,
            Self::Sd15 => SD15_MODEL_INDEX,
        }
    }

    /// The TAESD `config.json` text (`madebyollin/taesd`, the same for both).
    pub(crate) fn taesd_config_json(self) -> &'static str {
        TAESD
    }

    /// The U-Net config (validated).
    pub fn unet_config(self) -> UNetConfig {
        parse(self, "unet/config.json", self.unet_config_json())
    }

    /// The CLIP text encoder config.
    pub(crate) fn text_config(self) -> ClipTextConfig {
        parse(self, "text_encoder/config.json", self.text_config_json())
    }

    /// The VAE (`AutoencoderKL`) config.
    pub(crate) fn vae_config(self) -> AutoencoderKLConfig {
        parse(self, "vae/config.json", self.vae_config_json())
    }

    /// The scheduler config, read the way `LCMScheduler.from_config` reads it.
    pub(crate) fn scheduler_config(self) -> SchedulerConfig {
        parse(
            self,
            "scheduler/scheduler_config.json",
            self.scheduler_config_json(),
        )
    }

    /// The TAESD config.
    pub fn taesd_config(self) -> AutoencoderTinyConfig {
        config::parse(
            self.taesd_config_json(),
            "embedded madebyollin/taesd config.json",
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The pipeline's tokenizer: the real CLIP vocabulary with this repo's tokenizer configs
    /// (SD 2.x / sd-turbo pad with `!`, id 0; SD 1.5 with the end token).
    pub(crate) fn tokenizer(self) -> anyhow::Result<ClipTokenizer> {
        ClipTokenizer::from_strs(CLIP_VOCAB, CLIP_MERGES, &self.tokenizer_config_jsons())
    }
}

/// Std of the random weights.
const WEIGHT_STD: f32 = 0.02;
/// Elements per independently seeded chunk (the unit of parallel generation).
const CHUNK: usize = 1 << 20;

/// FNV-1a of the bytes, then a SplitMix64 finaliser.
pub(crate) fn hash_name(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(&mut h)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman & Vigna): small, fast, and fixed here so that the weights of a seed
/// never change with a dependency update.
struct Xoshiro256pp([u64; 4]);

impl Xoshiro256pp {
    fn new(mut seed: u64) -> Self {
        Self(std::array::from_fn(|_| splitmix64(&mut seed)))
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }
}

/// Fills `out` with `mean + std · z`, `z` about standard normal: the Irwin–Hall sum of the four
/// 16-bit uniforms of one 64-bit draw, centred and scaled to unit variance (|z| ≤ 2√3; every
/// value is finite and either 0 or far from the denormal range).
fn fill_normal(out: &mut [f32], seed: u64, mean: f32, std: f32) {
    // A 16-bit uniform has variance (2^32 − 1)/12; four of them (2^32 − 1)/3.
    let scale = std * (3.0f64 / (u32::MAX as f64)).sqrt() as f32;
    let mut rng = Xoshiro256pp::new(seed);
    for v in out.iter_mut() {
        let r = rng.next_u64();
        let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // Centre: 4 · 65535/2 = 131070.
        *v = mean + (sum as f32 - 131_070.0) * scale;
    }
}

/// The values of tensor `name` with `numel` elements: chunks of [`CHUNK`] elements, each seeded
/// from `(seed, name, chunk index)`, generated on all cores.
fn random_values(seed: u64, name: &str, numel: usize, mean: f32, std: f32) -> Vec<f32> {
    let base = hash_name(seed, name);
    let mut data = vec![0f32; numel];
    let chunks: Vec<(usize, &mut [f32])> = data.chunks_mut(CHUNK).enumerate().collect();
    let chunk_seed = |i: usize| {
        let mut s = base ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93);
        splitmix64(&mut s)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if chunks.len() < 2 || threads < 2 {
        for (i, c) in chunks {
            fill_normal(c, chunk_seed(i), mean, std);
        }
    } else {
        let per = chunks.len().div_ceil(threads);
        let mut chunks = chunks;
        std::thread::scope(|scope| {
            while !chunks.is_empty() {
                let rest = chunks.split_off(per.min(chunks.len()));
                let mine = std::mem::replace(&mut chunks, rest);
                scope.spawn(move || {
                    for (i, c) in mine {
                        fill_normal(c, chunk_seed(i), mean, std);
                    }
                });
            }
        });
    }
    data
}

/// A `VarBuilder` backend that returns a made-up tensor of the requested shape for any name
/// (see the module docs), recording the name and shape of every tensor it hands out.
#[derive(Debug, Clone, Default)]
pub struct RandomWeights {
    seed: u64,
    elements: Arc<AtomicUsize>,
    shapes: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl RandomWeights {
    /// A backend whose tensors are a function of `seed` and the tensor's name only.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// Total elements of all tensors requested so far (shared between clones; a name requested
    /// twice counts twice).
    #[cfg(test)]
    pub(crate) fn elements(&self) -> usize {
        self.elements.load(Ordering::Relaxed)
    }

    /// Every tensor requested so far, by name, with its shape (shared between clones): exactly
    /// the tensors a weights file must hold for the model built on this backend.
    pub(crate) fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.shapes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The values of tensor `name` of `shape` (row-major), as [`Self::tensor`] returns them.
    pub(crate) fn values(&self, shape: &[usize], name: &str) -> Vec<f32> {
        // Norm scales (the only 1-D `weight`s in these models) around 1, everything else
        // (matrices, kernels, embeddings, biases) around 0.
        let mean = if shape.len() == 1 && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        random_values(self.seed, name, shape.iter().product(), mean, WEIGHT_STD)
    }

    /// The tensor `name` of `shape` (f32, CPU): what the backend returns before the cast.
    ///
    /// # Errors
    /// Never in practice (the data always has `shape`'s element count); candle's constructor is
    /// fallible.
    pub fn tensor(&self, shape: &Shape, name: &str) -> Result<Tensor> {
        Tensor::from_vec(self.values(shape.dims(), name), shape, &Device::Cpu)
    }

    /// Standard-normal-like values scaled to `std` (mean 0) for `name`, independent of the
    /// weights' std (used for LoRA factors).
    pub(crate) fn values_with_std(&self, n: usize, name: &str, std: f32) -> Vec<f32> {
        random_values(self.seed, name, n, 0.0, std)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.elements.fetch_add(s.elem_count(), Ordering::Relaxed);
        let previous = self
            .shapes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), s.dims().to_vec());
        if let Some(p) = previous {
            if p != s.dims() {
                candle_core::bail!(
                    "random weights: {name:?} requested as {:?} and as {p:?}",
                    s.dims()
                );
            }
        }
        self.tensor(&s, name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: no shape for {name:?} (only shaped lookups work)")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A `VarBuilder` over [`RandomWeights`]: any name, any shape, deterministic from `seed`.
pub fn random_var_builder(dtype: DType, device: &Device, seed: u64) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights::new(seed)), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::unet::UNet2DConditionModel;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn names_and_configs() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            let u = a.unet_config();
            assert_eq!(u.block_out_channels, vec![320, 640, 1280, 1280]);
            let t = a.text_config();
            let s = a.scheduler_config();
            assert_eq!(
                (s.beta_start, s.beta_end, s.beta_schedule.as_str()),
                (0.00085, 0.012, "scaled_linear")
            );
            assert_eq!(s.num_train_timesteps, 1000);
            assert!(!s.set_alpha_to_one);
            let taesd = a.taesd_config();
            assert_eq!(taesd.num_encoder_blocks, vec![1, 3, 3, 3]);
            assert_eq!(taesd.num_decoder_blocks, vec![3, 3, 3, 1]);
            let tok = a.tokenizer().unwrap();
            assert_eq!(
                tok.encode("a photo of a cat").unwrap()[..8],
                [49406, 320, 1125, 539, 320, 2368, 49407, tok.pad_id()]
            );
            match a {
                Arch::SdTurbo => {
                    assert!(u.use_linear_projection);
                    assert_eq!((t.hidden_size, t.num_hidden_layers), (1024, 23));
                    assert_eq!(tok.pad_id(), 0);
                }
                Arch::Sd15 => {
                    assert!(!u.use_linear_projection);
                    assert_eq!((t.hidden_size, t.num_hidden_layers), (768, 12));
                    assert_eq!(tok.pad_id(), 49407);
                }
            }
        }
        assert!("sd21".parse::<Arch>().is_err());
    }

    #[test]
    fn random_tensors_are_deterministic() {
        let w = RandomWeights::new(7);
        let shape = Shape::from((3, 1000, 700)); // several chunks
        let a = w.tensor(&shape, "a.weight").unwrap();
        assert_eq!(a.dims(), &[3, 1000, 700]);
        let va = values(&a);
        assert_eq!(va, values(&w.tensor(&shape, "a.weight").unwrap()));
        assert_ne!(va, values(&w.tensor(&shape, "b.weight").unwrap()));
        assert_ne!(
            va,
            values(&RandomWeights::new(8).tensor(&shape, "a.weight").unwrap())
        );
        assert!(va
            .iter()
            .all(|v| v.is_finite() && (*v == 0.0 || v.abs() > 1e-30)));
        let n = va.len() as f64;
        let mean = va.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (va.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((std - 0.02).abs() < 1e-3, "std {std}");
        // Norm scales around 1.
        let g = values(&w.tensor(&Shape::from(320), "norm1.weight").unwrap());
        assert!(g.iter().all(|v| (v - 1.0).abs() < 0.1));
    }

    #[test]
    fn var_builder_shapes_dtype_device() {
        let vb = random_var_builder(DType::F16, &Device::Cpu, 1);
        let t = vb.pp("x").get((4, 5), "weight").unwrap();
        assert_eq!((t.dims(), t.dtype()), (&[4usize, 5][..], DType::F16));
        let again = vb.get((4, 5), "x.weight").unwrap();
        assert_eq!(
            values(&t.to_dtype(DType::F32).unwrap()),
            values(&again.to_dtype(DType::F32).unwrap())
        );
    }

    #[test]
    fn tiny_unet_builds_and_runs() {
        let cfg = UNetConfig::from_json(
            r#"{"block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 32}"#,
        )
        .unwrap();
        let vb = random_var_builder(DType::F32, &Device::Cpu, 0);
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let e = Tensor::ones((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(500f32, &Device::Cpu).unwrap();
        let y = unet.forward(&x, &t, &e).unwrap();
        assert_eq!(y.dims(), &[1, 4, 8, 8]);
        assert!(values(&y).iter().all(|v| v.is_finite()));
    }

    /// Parameter counts of diffusers' `UNet2DConditionModel` for these configs.
    #[test]
    fn full_unets_have_the_published_parameter_counts() {
        for (arch, expected) in [(Arch::SdTurbo, 865_910_724), (Arch::Sd15, 859_520_964)] {
            let w = RandomWeights::new(0);
            let vb = VarBuilder::from_backend(Box::new(w.clone()), DType::F32, Device::Cpu);
            let t0 = std::time::Instant::now();
            UNet2DConditionModel::new(vb, &arch.unet_config()).unwrap();
            eprintln!("{arch}: {} parameters in {:?}", w.elements(), t0.elapsed());
            assert_eq!(w.elements(), expected, "{arch}");
        }
    }

    /// Parameter counts of transformers' `CLIPTextModel` and diffusers' `AutoencoderTiny`.
    #[test]
    fn text_encoders_and_taesd_have_the_published_parameter_counts() {
        use crate::model::{clip::ClipTextModel, taesd::AutoencoderTiny};
        for (arch, expected) in [(Arch::SdTurbo, 340_387_840), (Arch::Sd15, 123_060_480)] {
            let w = RandomWeights::new(0);
            let vb = VarBuilder::from_backend(Box::new(w.clone()), DType::F32, Device::Cpu);
            ClipTextModel::new(vb, &arch.text_config()).unwrap();
            assert_eq!(w.elements(), expected, "{arch} text encoder");
        }
        let w = RandomWeights::new(0);
        let vb = VarBuilder::from_backend(Box::new(w.clone()), DType::F32, Device::Cpu);
        AutoencoderTiny::new(vb, &Arch::SdTurbo.taesd_config()).unwrap();
        assert_eq!(w.elements(), 2_445_063, "taesd");
    }

    /// Parameter count of diffusers' `AutoencoderKL` for both repos' `vae/config.json`.
    #[test]
    fn vaes_have_the_published_parameter_count() {
        use crate::model::vae::AutoencoderKL;
        for arch in Arch::ALL {
            let w = RandomWeights::new(0);
            let vb = VarBuilder::from_backend(Box::new(w.clone()), DType::F32, Device::Cpu);
            AutoencoderKL::new(vb, &arch.vae_config()).unwrap();
            assert_eq!(w.elements(), 83_653_863, "{arch} vae");
        }
    }
}
