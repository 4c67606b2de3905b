//! Attention blocks of the U-Net: `Attention` (self / cross, diffusers `to_q`, `to_k`, `to_v`,
//! `to_out.0`), `FeedForward` with `GEGLU`, `BasicTransformerBlock` and `Transformer2DModel`
//! (continuous input, conv or linear `proj_in`/`proj_out`).
//!
//! Two StreamDiffusion seams live here:
//! * cached prompt K/V: `KvPair` holds `to_k(ehs)`/`to_v(ehs)` of one cross-attention layer,
//!   already split into heads (`[B, heads, tokens, head_dim]`, contiguous), so the U-Net can
//!   skip those projections while the prompt is unchanged;
//! * cross-frame self-attention: `SelfAttnMode::CrossFrame` lets each sample's queries attend
//!   to its own keys/values concatenated (token axis) with those of other samples of the batch.
//!
//! Attention kernel (candle's products: other devices, CPUs without AVX2; with the packed
//! ones, `model::packed_attention`): `softmax(QKᵀ·scale)·V` with gemm matmuls and the scaled softmax of
//! `model::softmax` (vectorised `exp`, the scale folded in), with queries processed in chunks of `Q_CHUNK` rows so the
//! score matrix of a 64×64 latent (4096×4096 per head) is never materialised whole. See
//! `bench_attention_kernels` (ignored test) for the measurement against candle-nn's CPU flash
//! attention.
//!
//! The projections are `model::linear` layers: packed weights on the CPU (see there), else
//! `candle_nn::Linear`, which multiplies by `weight.t()`, a strided view (candle's matmul takes
//! arbitrary strides, so there is no per-call weight copy).

use std::cell::Cell;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

use crate::model::conv::{conv2d, Conv2d};
use crate::model::geglu::geglu;
use crate::model::group_norm::{group_norm, GroupNorm};
use crate::model::linear::{linear, linear_no_bias, Linear};
use crate::model::packed_attention::PackedAttention;
use crate::model::packed_gemm::{f32_params, products_for, Kernel};
use crate::model::softmax::scaled_softmax_last_dim;

/// Query rows processed per block by the attention kernel (bounds the live score matrix to
/// `batch · heads · Q_CHUNK · kv_len` floats).
pub(crate) const Q_CHUNK: usize = 1024;

/// Which other samples of the batch a sample's self-attention also looks at in
/// [`SelfAttnMode::CrossFrame`]. A sample never references itself: its own keys/values always
/// come first, followed by those of its references in increasing batch order. A sample with no
/// reference (batch of one; sample 0 for `First` and `Previous`) gets exactly ordinary
/// self-attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameRefs {
    /// Every other sample of the batch.
    AllOthers,
    /// Sample 0 (for every sample but sample 0 itself).
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "the pipeline uses `AllOthers`; the U-Net tests check this mode"
        )
    )]
    First,
    /// Sample `i − 1` (for every sample but sample 0).
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "the pipeline uses `AllOthers`; the U-Net tests check this mode"
        )
    )]
    Previous,
}

impl FrameRefs {
    /// Batch indices sample `i` of a batch of `batch` references (never `i` itself).
    pub(crate) fn refs(self, i: usize, batch: usize) -> Vec<usize> {
        match self {
            FrameRefs::AllOthers => (0..batch).filter(|&j| j != i).collect(),
            FrameRefs::First | FrameRefs::Previous if i == 0 => Vec::new(),
            FrameRefs::First => vec![0],
            FrameRefs::Previous => vec![i - 1],
        }
    }
}

/// How the self-attention (`attn1`) layers treat the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SelfAttnMode {
    /// Ordinary per-sample self-attention.
    #[default]
    Normal,
    /// StreamBatch cross-frame attention: queries of sample `i` attend to the keys/values of
    /// sample `i` concatenated with those of the samples given by [`FrameRefs::refs`].
    CrossFrame(FrameRefs),
}

/// Keys and values of one cross-attention layer, `[B, heads, tokens, head_dim]` contiguous.
/// `B` is the number of prompts (1 broadcasts over the batch).
#[derive(Debug, Clone)]
pub(crate) struct KvPair {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

/// Read position in a precomputed list of [`KvPair`]s, in U-Net traversal order.
#[derive(Debug)]
pub(crate) struct KvCursor<'a> {
    items: &'a [KvPair],
    pos: Cell<usize>,
}

impl<'a> KvCursor<'a> {
    pub(crate) fn new(items: &'a [KvPair]) -> Self {
        Self {
            items,
            pos: Cell::new(0),
        }
    }

    fn next(&self) -> Result<&'a KvPair> {
        let i = self.pos.get();
        let kv = self.items.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "PromptKv has {} layers, the U-Net needs more",
                self.items.len()
            ))
        })?;
        self.pos.set(i + 1);
        Ok(kv)
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn consumed(&self) -> usize {
        self.pos.get()
    }
}

/// The conditioning for cross-attention layers: prompt embeddings, or their cached K/V.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cond<'a> {
    Embeds(&'a Tensor),
    Kv(&'a KvCursor<'a>),
}

/// Batched `softmax(q·kᵀ·scale)·v` for `q: [B, H, S, D]`, `k, v: [B, H, S_kv, D]` (contiguous)
/// → `[B, H, S, D]`. Queries are processed in blocks of [`Q_CHUNK`] rows. With `upcast` (the
/// U-Net config's `upcast_attention`, set by SD 2.x checkpoints whose f16 attention scores
/// overflow) and f16/bf16 tensors, the scores and the softmax are computed in f32, as diffusers'
/// `Attention.get_attention_scores` does; in f32 it changes nothing.
pub(crate) fn attention_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    let s = q.dim(2)?;
    let dtype = q.dtype();
    let upcast = upcast && dtype != DType::F32;
    let kt = if upcast {
        k.to_dtype(DType::F32)?.transpose(2, 3)?
    } else {
        k.transpose(2, 3)?
    };
    let block = |q: &Tensor| -> Result<Tensor> {
        if upcast {
            let w = q.to_dtype(DType::F32)?.matmul(&kt)?;
            scaled_softmax_last_dim(&w, scale)?
                .to_dtype(dtype)?
                .matmul(v)
        } else {
            scaled_softmax_last_dim(&q.matmul(&kt)?, scale)?.matmul(v)
        }
    };
    if s <= Q_CHUNK {
        return block(q);
    }
    let mut outs = Vec::with_capacity(s.div_ceil(Q_CHUNK));
    let mut start = 0;
    while start < s {
        let len = Q_CHUNK.min(s - start);
        outs.push(block(&q.narrow(2, start, len)?.contiguous()?)?);
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// diffusers `Attention` as used by `BasicTransformerBlock` (no bias on q/k/v, bias on
/// `to_out.0`, scale `head_dim^-0.5`); `upcast` = the config's `upcast_attention`
/// ([`attention_kernel`]).
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    upcast: bool,
    /// The kernel of the packed products it was built for (`packed_gemm::products_for`): the
    /// attention takes [`PackedAttention`] on it (`None`: [`attention_kernel`]).
    packed: Option<Kernel>,
}

impl Attention {
    pub(crate) fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let packed = products_for(&vb)?;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
            packed,
        })
    }

    /// `softmax(q·kᵀ·scale)·v` per head, on token-major `q: [B, S, H·D]` (a linear layer's
    /// output) → `[B, S, H·D]`; `k`, `v` token-major `[B', S_kv, H·D]` or split into heads
    /// (`[B', H, S_kv, D]`, the precomputed prompt K/V), with `B'` = `B` or 1 (shared by every
    /// sample). With the packed products (bf16 or f32) on f32 CPU tensors for a model built
    /// for them, [`PackedAttention`] reads the heads in place; else the heads are split for
    /// [`attention_kernel`] and merged again.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Some(kernel) = self
            .packed
            .filter(|_| q.device().is_cpu() && q.dtype() == DType::F32)
        {
            let op = PackedAttention {
                scale: self.scale as f32,
                kernel,
                heads: self.heads,
            };
            return q
                .contiguous()?
                .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
        }
        let (b, s, _) = q.dims3()?;
        let heads = |t: &Tensor| -> Result<Tensor> {
            let t = if t.rank() == 3 {
                self.split_heads(t)?
            } else {
                t.clone()
            };
            // Batch b, or 1 shared by every sample (the callers check which).
            if t.dim(0)? == b {
                return Ok(t);
            }
            let (_, h, skv, d) = t.dims4()?;
            t.broadcast_as((b, h, skv, d))?.contiguous()
        };
        let out = attention_kernel(
            &self.split_heads(q)?,
            &heads(k)?,
            &heads(v)?,
            self.scale,
            self.upcast,
        )?;
        out.transpose(1, 2)?
            .reshape((b, s, self.heads * self.head_dim))
    }

    /// `[B, S, H·D]` → `[B, H, S, D]` contiguous.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// K/V of `context: [B, S_kv, context_dim]`, split into heads.
    pub(crate) fn project_kv(&self, context: &Tensor) -> Result<KvPair> {
        Ok(KvPair {
            k: self.split_heads(&self.to_k.forward(context)?)?,
            v: self.split_heads(&self.to_v.forward(context)?)?,
        })
    }

    /// Attention of `xs: [B, S, query_dim]` to precomputed keys/values (batch `B` or 1), plus
    /// `residual` (`[B, S, query_dim]`, added with `to_out`'s bias).
    pub(crate) fn forward_kv(&self, xs: &Tensor, kv: &KvPair, residual: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        let (b, kb) = (q.dim(0)?, kv.k.dim(0)?);
        if kb != b && kb != 1 {
            candle_core::bail!("prompt K/V batch {kb} does not match sample batch {b}");
        }
        self.to_out
            .forward_add(&self.attend(&q, &kv.k, &kv.v)?, residual)
    }

    /// Self-attention of `xs: [B, S, query_dim]` in the given mode, plus `residual` (as in
    /// [`Self::forward_kv`]).
    pub(crate) fn forward_self(
        &self,
        xs: &Tensor,
        mode: SelfAttnMode,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(xs)?;
        let v = self.to_v.forward(xs)?;
        let b = q.dim(0)?;
        let refs = match mode {
            SelfAttnMode::CrossFrame(r) if b > 1 => r,
            _ => return self.to_out.forward_add(&self.attend(&q, &k, &v)?, residual),
        };
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let mut ks = vec![k.narrow(0, i, 1)?];
            let mut vs = vec![v.narrow(0, i, 1)?];
            for j in refs.refs(i, b) {
                ks.push(k.narrow(0, j, 1)?);
                vs.push(v.narrow(0, j, 1)?);
            }
            let (ki, vi) = if ks.len() == 1 {
                (ks.remove(0), vs.remove(0))
            } else {
                (Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?)
            };
            let qi = q.narrow(0, i, 1)?;
            outs.push(self.attend(&qi, &ki, &vi)?);
        }
        self.to_out.forward_add(&Tensor::cat(&outs, 0)?, residual)
    }
}

/// diffusers `FeedForward` with `GEGLU` (`net.0.proj`, exact-erf GELU gate) and `net.2`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub(crate) fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }
}

impl FeedForward {
    /// `net.2(GEGLU(net.0.proj(xs))) + residual`.
    fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = geglu(&self.proj.forward(xs)?)?;
        self.out.forward_add(&h, residual)
    }
}

/// diffusers `BasicTransformerBlock` (layer_norm, `attn1` self or only-cross, `attn2` cross,
/// GEGLU feed-forward).
#[derive(Debug, Clone)]
pub(crate) struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        only_cross_attention: bool,
        upcast_attention: bool,
    ) -> Result<Self> {
        let attn1_ctx = if only_cross_attention {
            cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, f32_params(vb.pp("norm1")))?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                attn1_ctx,
                heads,
                head_dim,
                upcast_attention,
            )?,
            norm2: layer_norm(dim, 1e-5, f32_params(vb.pp("norm2")))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                cross_attention_dim,
                heads,
                head_dim,
                upcast_attention,
            )?,
            norm3: layer_norm(dim, 1e-5, f32_params(vb.pp("norm3")))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention,
        })
    }

    /// Cross-attention in traversal order (`attn1` when only-cross, then `attn2`).
    pub(crate) fn collect_kv(&self, ehs: &Tensor, out: &mut Vec<KvPair>) -> Result<()> {
        if self.only_cross_attention {
            out.push(self.attn1.project_kv(ehs)?);
        }
        out.push(self.attn2.project_kv(ehs)?);
        Ok(())
    }

    /// Cross-attention of `xs` plus `residual`.
    fn cross(attn: &Attention, xs: &Tensor, cond: Cond, residual: &Tensor) -> Result<Tensor> {
        match cond {
            Cond::Embeds(ehs) => attn.forward_kv(xs, &attn.project_kv(ehs)?, residual),
            Cond::Kv(cursor) => attn.forward_kv(xs, cursor.next()?, residual),
        }
    }

    /// Each residual connection is added by the layer before it (`to_out`, `ff.net.2`).
    pub(crate) fn forward(&self, xs: &Tensor, cond: Cond, mode: SelfAttnMode) -> Result<Tensor> {
        let n = self.norm1.forward(xs)?;
        let xs = if self.only_cross_attention {
            Self::cross(&self.attn1, &n, cond, xs)?
        } else {
            self.attn1.forward_self(&n, mode, xs)?
        };
        let xs = Self::cross(&self.attn2, &self.norm2.forward(&xs)?, cond, &xs)?;
        self.ff.forward_add(&self.norm3.forward(&xs)?, &xs)
    }
}

/// Hyper-parameters of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transformer2DConfig {
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) in_channels: usize,
    pub(crate) num_layers: usize,
    pub(crate) cross_attention_dim: usize,
    pub(crate) norm_num_groups: usize,
    pub(crate) use_linear_projection: bool,
    pub(crate) only_cross_attention: bool,
    pub(crate) upcast_attention: bool,
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` for continuous (latent) input: GroupNorm (eps 1e-6),
/// `proj_in`, `transformer_blocks`, `proj_out`, residual.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2DModel {
    pub(crate) fn new(vb: VarBuilder, c: &Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(linear(c.in_channels, inner, vb.pp("proj_in"))?),
                Proj::Linear(linear(inner, c.in_channels, vb.pp("proj_out"))?),
            )
        } else {
            let cfg = Conv2dConfig::default();
            (
                Proj::Conv(conv2d(c.in_channels, inner, 1, cfg, vb.pp("proj_in"))?),
                Proj::Conv(conv2d(inner, c.in_channels, 1, cfg, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..c.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    inner,
                    c.heads,
                    c.head_dim,
                    c.cross_attention_dim,
                    c.only_cross_attention,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(
                c.norm_num_groups,
                c.in_channels,
                1e-6,
                f32_params(vb.pp("norm")),
            )?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub(crate) fn collect_kv(&self, ehs: &Tensor, out: &mut Vec<KvPair>) -> Result<()> {
        for b in &self.blocks {
            b.collect_kv(ehs, out)?;
        }
        Ok(())
    }

    /// `xs: [B, C, H, W]` → `[B, C, H, W]`.
    pub(crate) fn forward(&self, xs: &Tensor, cond: Cond, mode: SelfAttnMode) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let hs = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut hs = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&hs)?)?,
            Proj::Linear(lin) => lin.forward(&to_tokens(&hs)?.contiguous()?)?,
        };
        for block in &self.blocks {
            hs = block.forward(&hs, cond, mode)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let hs = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_image(&hs)?)?,
            Proj::Linear(lin) => to_image(&lin.forward(&hs)?)?,
        };
        debug_assert_eq!(hs.dims(), &[b, c, h, w]);
        hs + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `upcast_attention`: f16 scores that overflow (|q·k| > 65504) turn into NaN without it and
    /// equal the f32 result with it.
    #[test]
    fn upcast_attention_keeps_f16_scores_finite() {
        let dev = Device::Cpu;
        let q = (Tensor::ones((1, 1, 4, 64), DType::F32, &dev).unwrap() * 40.0).unwrap();
        let k = (Tensor::arange(0f32, 256.0, &dev)
            .unwrap()
            .reshape((1, 1, 4, 64))
            .unwrap()
            / 8.0)
            .unwrap();
        let v = Tensor::arange(0f32, 256.0, &dev)
            .unwrap()
            .reshape((1, 1, 4, 64))
            .unwrap();
        let scale = 0.125;
        let want = attention_kernel(&q, &k, &v, scale, false).unwrap();
        let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let plain16 = attention_kernel(&h(&q), &h(&k), &h(&v), scale, false)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let nan = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .any(|x| !x.is_finite())
        };
        assert!(nan(&plain16), "the scores were meant to overflow f16");
        let up16 = attention_kernel(&h(&q), &h(&k), &h(&v), scale, true).unwrap();
        assert_eq!(up16.dtype(), DType::F16);
        let up16 = up16.to_dtype(DType::F32).unwrap();
        assert!(!nan(&up16));
        let d = (up16 - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 0.5, "{d}");
        // In f32 the flag changes nothing.
        let up32 = attention_kernel(&q, &k, &v, scale, true).unwrap();
        let d = (up32 - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// Unchunked reference: `softmax(QKᵀ·scale)·V` in one go.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let w = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&w)?.matmul(v)
    }

    #[test]
    fn chunked_kernel_matches_plain() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 2, Q_CHUNK + 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 2, 300, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 2, 300, 8), &dev).unwrap();
        let a = attention_kernel(&q, &k, &v, 0.3, false).unwrap();
        let b = plain(&q, &k, &v, 0.3).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// Timings of the attention kernels for full-size SD shapes (run with
    /// `cargo test --release --lib bench_attention_kernels -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bench_attention_kernels() {
        let dev = Device::Cpu;
        let time = |f: &dyn Fn() -> Tensor| {
            let _ = f(); // warm-up
            let reps = 2;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                let _ = f();
            }
            t0.elapsed().as_secs_f64() * 1000.0 / reps as f64
        };
        for (tokens, heads, d) in [(4096, 8, 40), (4096, 5, 64), (1024, 8, 40), (1024, 5, 64)] {
            for b in [1usize, 2] {
                // q, k, v in the (B, S, H, D) layout the linear layers produce.
                let q = Tensor::randn(0f32, 1., (b, tokens, heads, d), &dev).unwrap();
                let k = Tensor::randn(0f32, 1., (b, tokens, heads, d), &dev).unwrap();
                let v = Tensor::randn(0f32, 1., (b, tokens, heads, d), &dev).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let bh = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
                let plain_ms = time(&|| plain(&bh(&q), &bh(&k), &bh(&v), scale).unwrap());
                let chunked_ms =
                    time(&|| attention_kernel(&bh(&q), &bh(&k), &bh(&v), scale, false).unwrap());
                let flash_ms = time(&|| {
                    candle_nn::attention::flash_attn::<f32>(
                        &q,
                        &k,
                        &v,
                        scale as f32,
                        candle_nn::attention::AttnMask::None,
                        None,
                        None,
                    )
                    .unwrap()
                });
                eprintln!(
                    "tokens {tokens} heads {heads}x{d} batch {b}: plain {plain_ms:.1} ms, \
                     chunked({Q_CHUNK}) {chunked_ms:.1} ms, candle flash_attn {flash_ms:.1} ms"
                );
            }
        }
    }
}
