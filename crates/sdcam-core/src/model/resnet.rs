//! Convolutional blocks shared by the U-Net and the VAE: `ResnetBlock2D` (default
//! time-embedding shift, SiLU; the VAE's has no time embedding), `Downsample2D` (strided 3×3
//! conv) and `Upsample2D` (nearest upsampling to an explicit size, then 3×3 conv), with
//! diffusers tensor names (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
//! `conv_shortcut`; `conv`).
//!
//! The convolutions are `crate::model::conv::Conv2d`s (im2col + one matrix product on the
//! CPU, no per-call kernel re-layout).

use crate::model::conv::{conv2d, Conv2d};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::model::group_norm::{group_norm, GroupNorm};

use crate::model::linear::{linear, Linear};
use crate::model::packed_gemm::f32_params;

/// Hyper-parameters of one `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetBlock2DConfig {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks, which have none.
    pub(crate) temb_channels: Option<usize>,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` (time_embedding_norm "default", act "silu", no up/down), with or
/// without a time embedding.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(vb: VarBuilder, c: &ResnetBlock2DConfig) -> Result<Self> {
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                c.in_channels,
                c.out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(c.groups, c.in_channels, c.eps, f32_params(vb.pp("norm1")))?,
            conv1: conv2d(c.in_channels, c.out_channels, 3, conv3, vb.pp("conv1"))?,
            time_emb_proj: c
                .temb_channels
                .map(|t| linear(t, c.out_channels, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(c.groups, c.out_channels, c.eps, f32_params(vb.pp("norm2")))?,
            conv2: conv2d(c.out_channels, c.out_channels, 3, conv3, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `xs`: `[B, C_in, H, W]`, `temb`: `[B, temb_channels]` (when the block has a time
    /// embedding) → `[B, C_out, H, W]`.
    pub(crate) fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // Fused where the CPU kernels run (same sums as the separate ops): norm + SiLU, the
        // time embedding added inside norm2 (`norm2(h + t)`, `h + t` is used nowhere else), and
        // the shortcut added by conv2's kernel.
        let h = self.norm1.forward_silu(xs)?;
        let h = self.conv1.forward(&h)?;
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&candle_nn::ops::silu(temb)?)?),
            (None, None) => None,
            (Some(_), None) => candle_core::bail!("ResnetBlock2D: time embedding missing"),
            (None, Some(_)) => candle_core::bail!("ResnetBlock2D: block has no time embedding"),
        };
        let h = self.norm2.forward_ext(&h, t.as_ref(), true)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        if self.output_scale_factor == 1.0 {
            self.conv2.forward_fused(&h, Some(&shortcut), false)
        } else {
            (shortcut + self.conv2.forward(&h)?)? / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with `use_conv=True`: 3×3 conv, stride 2. With `padding == 0`
/// the input is first padded by one on the right and bottom, as diffusers does.
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(in_channels, out_channels, 3, cfg, vb.pp("conv"))?,
            padding,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D` with `use_conv=True`: nearest-neighbour upsampling then 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(in_channels, out_channels, 3, cfg, vb.pp("conv"))?,
        })
    }

    /// Upsamples to `size = (h, w)` when given (diffusers' `upsample_size`, used when the latent
    /// size is not a multiple of the total down-sampling factor), else by a factor of 2.
    /// PyTorch's nearest mode (`src = floor(dst · in/out)`) is what candle implements.
    pub(crate) fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_nearest2d(th, tw)?;
        self.conv.forward(&xs)
    }
}
