//! The full Stable Diffusion VAE: diffusers' `AutoencoderKL` (0.24 semantics and tensor names).
//!
//! Encoder: `conv_in`, `down_blocks.N` (`DownEncoderBlock2D`: ResnetBlock2D × layers_per_block,
//! then a stride-2 `Downsample2D` with diffusers' asymmetric (0, 1, 0, 1) zero padding, except on
//! the last block), `mid_block` (resnet, single-head self-attention, resnet), GroupNorm + SiLU,
//! `conv_out` → 2 × latent_channels moments, then `quant_conv`. `AutoencoderKL::encode_mean`
//! returns the mean half of `latent_dist` (no sampling, not scaled).
//!
//! Decoder: `post_quant_conv`, `conv_in`, `mid_block`, `up_blocks.N` (`UpDecoderBlock2D`:
//! ResnetBlock2D × (layers_per_block + 1), then nearest ×2 + conv `Upsample2D` except on the last
//! block), GroupNorm + SiLU, `conv_out`.
//!
//! Scaling: StreamDiffusion multiplies the encoder mean by `AutoencoderKL::scaling_factor`
//! (0.18215 for SD 1.5) and divides latents by it before `AutoencoderKL::decode`; both methods
//! here work on unscaled latents.
//!
//! The resnets, down- and upsamplers are the U-Net's ([`crate::model::resnet`]; the resnets
//! without time embedding, eps 1e-6); the mid-block attention is the VAE flavour (one head,
//! GroupNorm, residual).

use std::path::Path;

use crate::model::conv::Conv2d;
use crate::model::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::model::group_norm::{group_norm, GroupNorm};

use crate::model::linear::{linear, Linear};
use crate::model::packed_gemm::f32_params;
use serde::Deserialize;

use crate::model::config::{self, refuse_if, refuse_unless_positive, ComponentConfig, Unsupported};

/// GroupNorm / resnet epsilon used throughout diffusers' VAE `Encoder`/`Decoder`.
const EPS: f64 = 1e-6;

/// `vae/config.json` of an `AutoencoderKL`: the keys of diffusers 0.24's `AutoencoderKL.__init__`
/// that change the computation (absent or `null` = diffusers' default). Keys of later versions
/// (`shift_factor`, `latents_mean`/`latents_std`) are used by SDXL/SD3 pipelines, not by Stable
/// Diffusion's or StreamDiffusion's, and are ignored as diffusers 0.24 ignores them; a VAE whose
/// latents do not fit the U-Net is refused by the model loader.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) down_block_types: Vec<String>,
    pub(crate) up_block_types: Vec<String>,
    pub(crate) block_out_channels: Vec<usize>,
    pub(crate) layers_per_block: usize,
    pub(crate) act_fn: String,
    pub(crate) latent_channels: usize,
    pub(crate) norm_num_groups: usize,
    /// Latents are `encoder mean × scaling_factor` (0.18215 when absent, as in SD 1.5's file).
    pub scaling_factor: f64,
    /// diffusers' SDXL pipelines run this VAE in f32 in fp16 pipelines; Stable Diffusion's and
    /// StreamDiffusion's do not, and neither does sdcam (read, not used).
    pub(crate) force_upcast: bool,
    /// The 1×1 `quant_conv` after the encoder exists (true for every SD VAE).
    pub use_quant_conv: bool,
    /// The 1×1 `post_quant_conv` before the decoder exists (true for every SD VAE).
    pub use_post_quant_conv: bool,
    /// diffusers ≥ 0.26: the mid blocks' attention (always there in 0.24).
    pub(crate) mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// diffusers `AutoencoderKL()` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl ComponentConfig for AutoencoderKLConfig {
    const KIND: &'static str = "AutoencoderKL (VAE)";
    /// `nn.Conv2d(…) if use_quant_conv else None` and the like: `null` is false.
    const NULL_IS_FALSE: &'static [&'static str] = &[
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
        "force_upcast",
    ];

    fn check(&self) -> std::result::Result<(), Unsupported> {
        let n = self.block_out_channels.len();
        refuse_if(
            n == 0,
            "block_out_channels",
            &self.block_out_channels,
            "is empty",
        )?;
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            refuse_if(
                types.len() != n,
                key,
                types,
                format!("needs one entry per block_out_channels ({n})"),
            )?;
            for t in types {
                refuse_if(t != want, key, t, format!("only {want} is implemented"))?;
            }
        }
        refuse_if(
            self.act_fn != "silu",
            "act_fn",
            &self.act_fn,
            "only silu is implemented",
        )?;
        refuse_if(
            self.norm_num_groups == 0
                || self
                    .block_out_channels
                    .iter()
                    .any(|c| c % self.norm_num_groups != 0),
            "norm_num_groups",
            self.norm_num_groups,
            "must divide every block_out_channels entry",
        )?;
        refuse_if(
            !self.mid_block_add_attention,
            "mid_block_add_attention",
            false,
            "a mid block without attention is not implemented",
        )?;
        refuse_unless_positive("scaling_factor", self.scaling_factor)
    }
}

impl AutoencoderKLConfig {
    /// Reads a diffusers `config.json` ([`crate::model::config::load`]).
    pub(crate) fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        config::load(path.as_ref())
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    crate::model::conv::conv2d(cin, cout, k, cfg, vb)
}

/// diffusers' `ResnetBlock2D` without time embedding, with the VAE's epsilon.
fn resnet(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        &ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        },
    )
}

/// diffusers' `Attention` as used in the VAE mid block: one head over all channels, GroupNorm
/// first, residual connection, `to_q/to_k/to_v/to_out.0` linears.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, EPS, f32_params(vb.pp("group_norm")))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
            channels,
        })
    }
}

impl Module for VaeAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let dtype = xs.dtype();
        let hs = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let scale = (self.channels as f64).powf(-0.5);
        // upcast_softmax: scores and softmax in f32.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` of the VAE: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attn: VaeAttention,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet0: resnet(ch, ch, groups, vb.pp("resnets.0"))?,
            attn: VaeAttention::new(ch, groups, vb.pp("attentions.0"))?,
            resnet1: resnet(ch, ch, groups, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.resnet0.forward(xs, None)?;
        let xs = self.attn.forward(&xs)?;
        self.resnet1.forward(&xs, None)
    }
}

/// `DownEncoderBlock2D`.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Downsample2D>,
}

impl Module for DownBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs, None)?;
        }
        if let Some(d) = &self.downsample {
            xs = d.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `UpDecoderBlock2D`.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Upsample2D>,
}

impl Module for UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs, None)?;
        }
        if let Some(u) = &self.upsample {
            xs = u.forward(&xs, None)?;
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let first = *boc.first().unwrap_or(&0);
        let last = *boc.last().unwrap_or(&0);
        let conv_in = conv(cfg.in_channels, first, 3, 1, 1, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut cin = first;
        for (i, &cout) in boc.iter().enumerate() {
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    resnet(c, cout, groups, vbb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < boc.len() {
                // diffusers' padding=0: pad right and bottom by one, then a stride-2 3×3 conv.
                Some(Downsample2D::new(vbb.pp("downsamplers.0"), cout, cout, 0)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(last, groups, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(groups, last, EPS, f32_params(vb.pp("conv_norm_out")))?,
            conv_out: conv(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for b in &self.down_blocks {
            xs = b.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let first = *boc.first().unwrap_or(&0);
        let last = *boc.last().unwrap_or(&0);
        let conv_in = conv(cfg.latent_channels, last, 3, 1, 1, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(last, groups, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(boc.len());
        let mut cin = last;
        for (i, &cout) in boc.iter().rev().enumerate() {
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    resnet(c, cout, groups, vbb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < boc.len() {
                Some(Upsample2D::new(vbb.pp("upsamplers.0"), cout, cout)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, first, EPS, f32_params(vb.pp("conv_norm_out")))?,
            conv_out: conv(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for b in &self.up_blocks {
            xs = b.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// diffusers' `AutoencoderKL` (`models/autoencoder_kl.py` in diffusers 0.24): images
/// `(b, 3, h, w)` in −1..1 ↔ latents `(b, latent_channels = 4, h/8, w/8)`, unscaled (the
/// `scaling_factor` is applied by [`crate::model::sd::Vae`]).
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    latent_channels: usize,
    scaling_factor: f64,
}

impl AutoencoderKL {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint root (`encoder.…`,
    /// `decoder.…`, `quant_conv`, `post_quant_conv`).
    pub(crate) fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.check().map_err(|u| {
            candle_core::Error::Msg(format!("unsupported AutoencoderKL config: {u}"))
        })?;
        let lc = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv(2 * lc, 2 * lc, 1, 0, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(lc, lc, 1, 0, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            latent_channels: lc,
            scaling_factor: cfg.scaling_factor,
        })
    }

    /// Image [B, 3, H, W] in −1..1 → `latent_dist.mean` [B, latent_channels, H/8, W/8]
    /// (unscaled; multiply by [`Self::scaling_factor`] for the U-Net).
    pub(crate) fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        moments.narrow(1, 0, self.latent_channels)
    }

    /// Unscaled latents (divide U-Net latents by [`Self::scaling_factor`] first) → image,
    /// nominally in −1..1 (not clamped) = diffusers `decode(z).sample`.
    pub(crate) fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    /// The config's `scaling_factor` (0.18215 for SD 1.5/2.x).
    pub(crate) fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden, target, tol};

    fn load() -> AutoencoderKL {
        let dir = fixture("models/tiny-sd15").join("vae");
        let cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
        let vb = crate::model::hub::load_var_builder(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            target().1,
            &target().0,
        )
        .unwrap();
        AutoencoderKL::new(vb, &cfg).unwrap()
    }

    #[test]
    fn vae_matches_golden() {
        let vae = load();
        let g = golden("vae_sd15");
        assert!((vae.scaling_factor() - 0.18215).abs() < 1e-9);

        let mean = vae.encode_mean(&g["enc0.image"]).unwrap();
        let err = rel_err(&mean, &g["enc0.mean"]).unwrap();
        assert!(err <= tol(1e-4), "enc0.mean: rel err {err}");
        let scaled = (&mean * vae.scaling_factor()).unwrap();
        let err = rel_err(&scaled, &g["enc0.mean_scaled"]).unwrap();
        assert!(err <= tol(1e-4), "enc0.mean_scaled: rel err {err}");

        let mean = vae.encode_mean(&g["enc1.image"]).unwrap();
        assert_eq!(mean.dims(), &[1, 4, 6, 4]);
        let err = rel_err(&mean, &g["enc1.mean"]).unwrap();
        assert!(err <= tol(1e-4), "enc1.mean: rel err {err}");

        let sample = vae.decode(&g["dec0.latents"]).unwrap();
        let err = rel_err(&sample, &g["dec0.sample"]).unwrap();
        assert!(err <= tol(1e-4), "dec0.sample: rel err {err}");
    }
}
