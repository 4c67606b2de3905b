//! Timestep embeddings of the U-Net: the sinusoidal projection (`Timesteps` /
//! `get_timestep_embedding` in diffusers) and the `TimestepEmbedding` MLP
//! (`linear_1` → SiLU → `linear_2`).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::model::linear::{linear, Linear};

/// Sinusoidal timestep projection, diffusers `Timesteps(num_channels, flip_sin_to_cos,
/// downscale_freq_shift)` with `scale = 1` and `max_period = 10000`.
#[derive(Debug, Clone)]
pub(crate) struct Timesteps {
    freqs: Tensor,
    flip_sin_to_cos: bool,
    num_channels: usize,
}

impl Timesteps {
    /// Precomputes the `half_dim` frequencies `exp(-ln(10000)·i/(half_dim − shift))` in f32,
    /// as diffusers does.
    pub(crate) fn new(
        num_channels: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        let half_dim = num_channels / 2;
        // Same f32 operation order as diffusers: (−ln(max_period)·i) / (half_dim − shift).
        let neg_log = -(10000f64.ln() as f32);
        let denom = half_dim as f32 - downscale_freq_shift as f32;
        let freqs: Vec<f32> = (0..half_dim)
            .map(|i| ((neg_log * i as f32) / denom).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, half_dim, device)?;
        Ok(Self {
            freqs,
            flip_sin_to_cos,
            num_channels,
        })
    }

    /// `timesteps`: `[B]` (any numeric dtype) → `[B, num_channels]` f32.
    pub(crate) fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
        let emb = t.broadcast_mul(&self.freqs.unsqueeze(0)?)?;
        let (sin, cos) = (emb.sin()?, emb.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)?
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)?
        };
        if self.num_channels % 2 == 1 {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// diffusers `TimestepEmbedding` with the SiLU activation and no conditioning projection.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(vb: VarBuilder, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = candle_nn::ops::silu(&self.linear_1.forward(xs)?)?;
        self.linear_2.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoidal_matches_formula() {
        let dev = Device::Cpu;
        let ts = Timesteps::new(8, true, 0.0, &dev).unwrap();
        let t = Tensor::new(&[999i64, 0], &dev).unwrap();
        let e = ts.forward(&t).unwrap().to_vec2::<f32>().unwrap();
        for (row, tv) in e.iter().zip([999f32, 0.0]) {
            for i in 0..4 {
                let f = (-(10000f32.ln()) * i as f32 / 4.0).exp();
                assert!((row[i] - (tv * f).cos()).abs() < 1e-4);
                assert!((row[i + 4] - (tv * f).sin()).abs() < 1e-4);
            }
        }
    }
}
