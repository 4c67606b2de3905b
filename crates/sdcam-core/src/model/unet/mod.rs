//! The Stable Diffusion U-Net (`UNet2DConditionModel`, diffusers 0.24 semantics) for SD 1.x and
//! SD 2.x / sd-turbo, configured from `unet/config.json`, with `VarBuilder` paths equal to the
//! diffusers tensor names.
//!
//! Besides the plain [`UNet2DConditionModel::forward`], two StreamDiffusion seams:
//! * cached prompt K/V ([`UNet2DConditionModel::precompute_prompt_kv`] →
//!   [`UNet2DConditionModel::forward_with_kv`]): the cross-attention keys/values of every
//!   `attn2` layer are computed once per prompt (paper appendix B.2);
//! * cross-frame self-attention (`SelfAttnMode::CrossFrame` in `ForwardOptions`, per call):
//!   StreamBatch samples attend to each other's keys/values (paper Fig. 8).
//!
//! The model is immutable after loading; all per-call state lives in the arguments, so one model
//! can be shared between threads (`&self` everywhere, `Send + Sync`).
//!
//! Over 700 lines because it is the one `UNet2DConditionModel` graph (config, the down/mid/up
//! wiring and the three forward variants that share it), as diffusers keeps it in
//! `unet_2d_condition.py`; the blocks are in [`blocks`], attention in [`attention`], the tests in
//! `tests.rs`.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub(crate) use crate::model::resnet;

use crate::model::conv::{conv2d, Conv2d};
use crate::model::group_norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

pub use crate::model::config::OneOrMany;
use crate::model::config::{self, refuse_if, ComponentConfig, Unsupported};
use attention::{Cond, KvCursor};
pub(crate) use attention::{FrameRefs, KvPair, SelfAttnMode};
use blocks::{BlockCommon, DownBlock, MidBlock, StageAttn, UpBlock};
use embeddings::{TimestepEmbedding, Timesteps};

fn d_true() -> bool {
    true
}
fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_1f() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_heads() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_false_many() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel` (defaults = diffusers 0.24
/// defaults). Options sdcam does not implement are kept so that `UNetConfig::validate` can
/// reject them with a clear message instead of silently ignoring them.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub(crate) in_channels: usize,
    #[serde(default = "d_4")]
    pub(crate) out_channels: usize,
    #[serde(default)]
    pub(crate) center_input_sample: bool,
    /// Timestep embedding order: `[cos, sin]` when true (every SD checkpoint), as diffusers'
    /// `get_timestep_embedding(flip_sin_to_cos=…)`.
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub(crate) freq_shift: f64,
    #[serde(default = "d_down")]
    pub(crate) down_block_types: Vec<String>,
    /// Only `UNetMidBlock2DCrossAttn` (the default) is supported; anything else, including
    /// `null` (no mid block, e.g. SDXS), is refused by the config check.
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub(crate) up_block_types: Vec<String>,
    #[serde(default = "d_false_many")]
    pub(crate) only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_boc")]
    pub(crate) block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub(crate) layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_1")]
    pub(crate) downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub(crate) mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub(crate) act_fn: String,
    #[serde(default = "d_groups")]
    pub(crate) norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub(crate) norm_eps: f64,
    /// Width of the prompt embeddings the cross-attention layers take (the text encoder's
    /// `hidden_size`: 768 for SD 1.x, 1024 for SD 2.x), one value or one per down block.
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one")]
    pub(crate) transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub(crate) reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub(crate) encoder_hid_dim_type: Option<String>,
    /// In diffusers 0.24 this is the number of attention HEADS (int, or one per down block);
    /// the head dimension is `channels / heads`.
    #[serde(default = "d_heads")]
    pub(crate) attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub(crate) num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub(crate) dual_cross_attention: bool,
    /// Transformer blocks project in and out with a linear layer (SD 2.x) instead of a 1×1
    /// convolution (SD 1.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub(crate) class_embed_type: Option<String>,
    #[serde(default)]
    pub(crate) addition_embed_type: Option<String>,
    #[serde(default)]
    pub(crate) num_class_embeds: Option<usize>,
    /// Attention scores and softmax in f32 when the model runs in f16/bf16 (SD 2.x checkpoints
    /// set it; `null` = false).
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub(crate) resnet_time_scale_shift: String,
    #[serde(default)]
    pub(crate) resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub(crate) resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub(crate) time_embedding_type: String,
    #[serde(default)]
    pub(crate) time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub(crate) time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub(crate) timestep_post_act: Option<String>,
    #[serde(default)]
    pub(crate) time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub(crate) conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub(crate) conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub(crate) attention_type: String,
    #[serde(default)]
    pub(crate) class_embeddings_concat: bool,
    #[serde(default)]
    pub(crate) cross_attention_norm: Option<String>,
    /// Not used by sdcam (the stream size is the profile's); an int or `[h, w]` in diffusers.
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "read so that a real config's `sample_size` is not reported as an unknown key"
    )]
    pub(crate) sample_size: Option<serde_json::Value>,
}

impl UNetConfig {
    /// Parses `config.json` text the way diffusers reads it ([`crate::model::config`]).
    #[cfg(test)]
    pub(crate) fn from_json(text: &str) -> anyhow::Result<Self> {
        config::parse(text, "unet/config.json")
    }

    /// Reads `unet/config.json` ([`crate::model::config::load`]).
    pub(crate) fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        config::load(path)
    }

    /// Rejects every option this implementation does not support (as a candle error).
    pub(crate) fn validate(&self) -> Result<()> {
        self.unsupported()
            .map_err(|u| candle_core::Error::Msg(format!("unsupported unet config: {u}")))
    }

    /// The first option this implementation does not support, with its key and value.
    fn unsupported(&self) -> std::result::Result<(), Unsupported> {
        let n = self.block_out_channels.len();
        refuse_if(
            n == 0,
            "block_out_channels",
            &self.block_out_channels,
            "is empty",
        )?;
        refuse_if(
            self.down_block_types.len() != n,
            "down_block_types",
            &self.down_block_types,
            format!("needs one entry per block_out_channels ({n})"),
        )?;
        refuse_if(
            self.up_block_types.len() != n,
            "up_block_types",
            &self.up_block_types,
            format!("needs one entry per block_out_channels ({n})"),
        )?;
        for t in &self.down_block_types {
            refuse_if(
                t != "CrossAttnDownBlock2D" && t != "DownBlock2D",
                "down_block_types",
                t,
                "only CrossAttnDownBlock2D and DownBlock2D are implemented",
            )?;
        }
        for t in &self.up_block_types {
            refuse_if(
                t != "CrossAttnUpBlock2D" && t != "UpBlock2D",
                "up_block_types",
                t,
                "only CrossAttnUpBlock2D and UpBlock2D are implemented",
            )?;
        }
        refuse_if(
            self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            &self.mid_block_type,
            "only UNetMidBlock2DCrossAttn is implemented (null = no mid block, e.g. SDXS, is not)",
        )?;
        refuse_if(
            self.class_embed_type.is_some(),
            "class_embed_type",
            &self.class_embed_type,
            "class embeddings are not implemented",
        )?;
        refuse_if(
            self.num_class_embeds.is_some(),
            "num_class_embeds",
            self.num_class_embeds,
            "class embeddings are not implemented",
        )?;
        refuse_if(
            self.addition_embed_type.is_some(),
            "addition_embed_type",
            &self.addition_embed_type,
            "SDXL-style added conditioning (text_time: pooled text embeddings and time ids) is \
             not implemented",
        )?;
        refuse_if(
            self.encoder_hid_dim.is_some(),
            "encoder_hid_dim",
            self.encoder_hid_dim,
            "an encoder hidden-state projection is not implemented",
        )?;
        refuse_if(
            self.encoder_hid_dim_type.is_some(),
            "encoder_hid_dim_type",
            &self.encoder_hid_dim_type,
            "an encoder hidden-state projection is not implemented",
        )?;
        refuse_if(
            self.dual_cross_attention,
            "dual_cross_attention",
            true,
            "dual cross attention is not implemented",
        )?;
        refuse_if(
            self.num_attention_heads.is_some(),
            "num_attention_heads",
            &self.num_attention_heads,
            "diffusers 0.24 refuses it too; configs give the head count as attention_head_dim",
        )?;
        refuse_if(
            self.time_embedding_type != "positional",
            "time_embedding_type",
            &self.time_embedding_type,
            "only positional is implemented",
        )?;
        refuse_if(
            self.time_cond_proj_dim.is_some(),
            "time_cond_proj_dim",
            self.time_cond_proj_dim,
            "the guidance embedding of LCM-distilled U-Nets is not implemented (use the base \
             model with an LCM-LoRA)",
        )?;
        refuse_if(
            self.act_fn != "silu",
            "act_fn",
            &self.act_fn,
            "only silu is implemented",
        )?;
        refuse_if(
            self.resnet_time_scale_shift != "default",
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "only default is implemented",
        )?;
        refuse_if(
            self.resnet_skip_time_act,
            "resnet_skip_time_act",
            true,
            "only false is implemented",
        )?;
        refuse_if(
            self.resnet_out_scale_factor != 1.0,
            "resnet_out_scale_factor",
            self.resnet_out_scale_factor,
            "only 1.0 is implemented",
        )?;
        refuse_if(
            self.time_embedding_act_fn.is_some(),
            "time_embedding_act_fn",
            &self.time_embedding_act_fn,
            "only null is implemented",
        )?;
        refuse_if(
            self.timestep_post_act.is_some(),
            "timestep_post_act",
            &self.timestep_post_act,
            "only null is implemented",
        )?;
        refuse_if(
            self.attention_type != "default",
            "attention_type",
            &self.attention_type,
            "only default is implemented",
        )?;
        refuse_if(
            self.class_embeddings_concat,
            "class_embeddings_concat",
            true,
            "class embeddings are not implemented",
        )?;
        refuse_if(
            self.cross_attention_norm.is_some(),
            "cross_attention_norm",
            &self.cross_attention_norm,
            "only null is implemented",
        )?;
        refuse_if(
            self.reverse_transformer_layers_per_block.is_some(),
            "reverse_transformer_layers_per_block",
            &self.reverse_transformer_layers_per_block,
            "only null is implemented",
        )?;
        refuse_if(
            matches!(self.cross_attention_dim, OneOrMany::Many(_)),
            "cross_attention_dim",
            &self.cross_attention_dim,
            "a per-block list is not implemented",
        )?;
        refuse_if(
            self.norm_num_groups.is_none(),
            "norm_num_groups",
            self.norm_num_groups,
            "a U-Net without its output GroupNorm is not implemented",
        )?;
        refuse_if(
            self.conv_in_kernel.is_multiple_of(2),
            "conv_in_kernel",
            self.conv_in_kernel,
            "an even kernel is not implemented",
        )?;
        refuse_if(
            self.conv_out_kernel.is_multiple_of(2),
            "conv_out_kernel",
            self.conv_out_kernel,
            "an even kernel is not implemented",
        )?;
        for (key, len) in [
            ("layers_per_block", self.layers_per_block.list_len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.list_len(),
            ),
            ("attention_head_dim", self.attention_head_dim.list_len()),
            ("only_cross_attention", self.only_cross_attention.list_len()),
        ] {
            if let Some(len) = len {
                refuse_if(
                    len != n,
                    key,
                    format!("a list of {len} entries"),
                    format!("needs one entry per down block ({n})"),
                )?;
            }
        }
        Ok(())
    }

    /// The cross-attention (text embedding) width.
    pub(crate) fn cross_attention_dim(&self) -> usize {
        match &self.cross_attention_dim {
            OneOrMany::One(v) => *v,
            OneOrMany::Many(v) => v.first().copied().unwrap_or(0),
        }
    }
}

impl ComponentConfig for UNetConfig {
    const KIND: &'static str = "U-Net";
    /// `mid_block_type: null` is "no mid block"; `norm_num_groups: null` is "no output norm".
    const NULL_IS_A_VALUE: &'static [&'static str] = &["mid_block_type", "norm_num_groups"];
    /// `Timesteps(…, flip_sin_to_cos=None)` tests it for truth.
    const NULL_IS_FALSE: &'static [&'static str] = &["flip_sin_to_cos"];
    fn check(&self) -> std::result::Result<(), Unsupported> {
        self.unsupported()
    }
}

/// Cached cross-attention keys/values for one prompt batch: one `KvPair` per cross-attention
/// layer in U-Net traversal order (down blocks, mid block, up blocks; in each transformer block
/// `attn1` when `only_cross_attention`, then `attn2`), each `[P, heads, tokens, head_dim]`.
/// `P` is the number of prompts: equal to the sample batch (one prompt per sample) or 1 (the
/// prompt is broadcast over the batch).
#[derive(Debug, Clone)]
pub struct PromptKv {
    layers: Vec<KvPair>,
    batch: usize,
}

impl PromptKv {
    /// Number of prompts (rows).
    #[cfg(test)]
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }
}

/// Cross-attention conditioning of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Conditioning<'a> {
    /// Prompt embeddings `[P, tokens, cross_attention_dim]` (K/V computed in this call).
    Embeddings(&'a Tensor),
    /// Keys/values precomputed by [`UNet2DConditionModel::precompute_prompt_kv`].
    PromptKv(&'a PromptKv),
}

/// Per-call options of [`UNet2DConditionModel::forward_ext`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ForwardOptions {
    /// Mode of every self-attention (`attn1`) layer.
    pub(crate) self_attn: SelfAttnMode,
}

/// diffusers `UNet2DConditionModel` (SD 1.x / 2.x layout; `models/unet_2d_condition.py` in
/// diffusers 0.24): noise prediction on latents `(b, 4, h/8, w/8)` conditioned on prompt
/// embeddings `(b or 1, 77, cross_attention_dim)` or their cached K/V ([`PromptKv`]).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (rooted at the `unet` weights) and a validated config.
    ///
    /// # Errors
    /// The config is unsupported (`UNetConfig::validate`) or a weight is missing or has the
    /// wrong shape.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(boc[0] * 4);
        let layers = cfg.layers_per_block.per_block(n, "layers_per_block")?;
        let tlayers = cfg
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let heads = cfg.attention_head_dim.per_block(n, "attention_head_dim")?;
        let only_cross = cfg
            .only_cross_attention
            .per_block(n, "only_cross_attention")?;
        let common = BlockCommon {
            temb_channels: time_embed_dim,
            groups,
            eps: cfg.norm_eps,
            cross_attention_dim: cfg.cross_attention_dim(),
            use_linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        };
        let conv_in = conv2d(
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            Conv2dConfig {
                padding: (cfg.conv_in_kernel - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        let time_proj = Timesteps::new(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift, vb.device())?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], time_embed_dim)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let attn = StageAttn {
                heads: heads[i],
                transformer_layers: tlayers[i],
                only_cross_attention: only_cross[i],
            };
            let attn = (ty == "CrossAttnDownBlock2D").then_some(&attn);
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i.to_string()),
                in_ch,
                out_ch,
                layers[i],
                i + 1 < n,
                cfg.downsample_padding,
                attn,
                &common,
            )?);
        }

        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            boc[n - 1],
            1,
            cfg.mid_block_scale_factor,
            &StageAttn {
                heads: heads[n - 1],
                transformer_layers: tlayers[n - 1],
                only_cross_attention: false,
            },
            &common,
        )?;

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev_boc[0];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev_boc[i];
            let in_ch = rev_boc[(i + 1).min(n - 1)];
            let r = n - 1 - i;
            let attn = StageAttn {
                heads: heads[r],
                transformer_layers: tlayers[r],
                only_cross_attention: only_cross[r],
            };
            let attn = (ty == "CrossAttnUpBlock2D").then_some(&attn);
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i.to_string()),
                in_ch,
                prev_out,
                out_ch,
                layers[r] + 1,
                i + 1 < n,
                attn,
                &common,
            )?);
        }

        let conv_norm_out = group_norm(
            groups,
            boc[0],
            cfg.norm_eps,
            crate::model::packed_gemm::f32_params(vb.pp("conv_norm_out")),
        )?;
        let conv_out = conv2d(
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            Conv2dConfig {
                padding: (cfg.conv_out_kernel - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            center_input_sample: cfg.center_input_sample,
        })
    }

    /// Noise prediction for `sample: [B, in_channels, H, W]`, `timestep` (`[B]`, `[1]` or a
    /// scalar; any numeric dtype) and `encoder_hidden_states: [B or 1, tokens, cross_dim]`;
    /// returns `[B, out_channels, H, W]`. `H` and `W` are latent sizes (image / 8), multiples of
    /// 8 for the three down-samplings.
    ///
    /// # Errors
    /// Shapes, dtypes or devices that do not fit the model.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_ext(
            sample,
            timestep,
            Conditioning::Embeddings(encoder_hidden_states),
            &ForwardOptions::default(),
        )
    }

    /// Cross-attention keys/values of every cross-attention layer for
    /// `encoder_hidden_states: [P, tokens, cross_dim]` (P prompts; see [`PromptKv`]):
    /// StreamDiffusion's pre-computation of the prompt's K/V (paper §3.4), done once per prompt.
    ///
    /// # Errors
    /// The embeddings' width is not the model's `cross_attention_dim`, or dtype/device differ.
    pub fn precompute_prompt_kv(&self, encoder_hidden_states: &Tensor) -> Result<PromptKv> {
        let batch = encoder_hidden_states.dim(0)?;
        let mut layers = Vec::new();
        for b in &self.down_blocks {
            b.collect_kv(encoder_hidden_states, &mut layers)?;
        }
        self.mid_block
            .collect_kv(encoder_hidden_states, &mut layers)?;
        for b in &self.up_blocks {
            b.collect_kv(encoder_hidden_states, &mut layers)?;
        }
        Ok(PromptKv { layers, batch })
    }

    /// [`Self::forward`] with cached prompt keys/values instead of embeddings.
    ///
    /// # Errors
    /// As [`Self::forward`], or `prompt_kv` was computed by a different U-Net.
    pub fn forward_with_kv(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        prompt_kv: &PromptKv,
    ) -> Result<Tensor> {
        self.forward_ext(
            sample,
            timestep,
            Conditioning::PromptKv(prompt_kv),
            &ForwardOptions::default(),
        )
    }

    /// The general forward: either conditioning, and per-call [`ForwardOptions`].
    pub(crate) fn forward_ext(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        cond: Conditioning,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let prompts = match cond {
            Conditioning::Embeddings(e) => e.dim(0)?,
            Conditioning::PromptKv(kv) => kv.batch,
        };
        if prompts != b && prompts != 1 {
            candle_core::bail!("{prompts} prompts for a batch of {b} samples (need {b} or 1)");
        }
        let timestep = match timestep.rank() {
            0 => timestep.reshape(1)?,
            1 => timestep.clone(),
            r => candle_core::bail!("timestep must be a scalar or a vector, got rank {r}"),
        };
        let timestep = match timestep.dim(0)? {
            n if n == b => timestep,
            1 => timestep.broadcast_as(b)?,
            n => candle_core::bail!("{n} timesteps for a batch of {b} samples"),
        };
        let t_emb = self
            .time_proj
            .forward(&timestep)?
            .to_dtype(sample.dtype())?;
        let emb = self.time_embedding.forward(&t_emb)?;

        let cursor_store;
        let cond = match cond {
            Conditioning::Embeddings(e) => Cond::Embeds(e),
            Conditioning::PromptKv(kv) => {
                cursor_store = KvCursor::new(&kv.layers);
                Cond::Kv(&cursor_store)
            }
        };
        let mode = opts.self_attn;

        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &emb, cond, mode, &mut skips)?;
        }
        xs = self.mid_block.forward(&xs, &emb, cond, mode)?;

        // diffusers: upsample to the skip connection's size when the latent size is not a
        // multiple of the overall down-sampling factor.
        let factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n_skips = block.num_skips();
            if skips.len() < n_skips {
                candle_core::bail!("internal: U-Net skip connections exhausted");
            }
            let res = skips.split_off(skips.len() - n_skips);
            let upsample_size = match skips.last() {
                Some(s) if i != last && forward_upsample_size => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = block.forward(&xs, &res, &emb, cond, mode, upsample_size)?;
        }
        if let Cond::Kv(cursor) = cond {
            if cursor.consumed() != cursor.len() {
                candle_core::bail!("PromptKv does not match this U-Net (layer count differs)");
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests;
