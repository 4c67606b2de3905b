//! 2-D convolution for the U-Net: on the CPU in f32, im2col straight from NCHW plus one matrix
//! product per call against the kernel as loaded, `[c_out, c_in·k·k]`, so the output comes out
//! in NCHW and neither the input nor the kernel is re-laid out per call (candle 0.11's CPU
//! `conv2d` converts the input to NHWC and copies the kernel element by element on every call,
//! which costs as much as the product itself for the 1280-channel convs at small latents).
//! 1×1 convs are a plain matrix product. Other devices and dtypes use candle's `conv2d`.
//!
//! Drop-in for `candle_nn::{conv2d, Conv2d}`: same constructor, same tensor names. Used by the
//! U-Net, TAESD and the VAE.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A 2-D convolution (see the module docs).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// candle's convolution over the same weight (other devices / dtypes).
    inner: candle_nn::Conv2d,
    /// The weight as `[c_out, c_in·k_h·k_w]` (a view of the loaded tensor, no copy).
    weight2d: Tensor,
    /// Bias as `[c_out, 1]` (broadcast over the pixels).
    bias: Option<Tensor>,
    k_h: usize,
    k_w: usize,
    cfg: Conv2dConfig,
}

/// `candle_nn::conv2d` (weight `[out, in, k, k]`, bias `[out]`) as a [`Conv2d`].
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new(candle_nn::conv2d(
        in_channels,
        out_channels,
        kernel_size,
        cfg,
        vb,
    )?)
}

impl Conv2d {
    /// Wraps a candle convolution.
    pub fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        let w = inner.weight().contiguous()?;
        let (c_out, c_in, k_h, k_w) = w.dims4()?;
        let weight2d = w.reshape((c_out, c_in * k_h * k_w))?;
        let bias = inner.bias().map(|b| b.reshape((c_out, 1))).transpose()?;
        let cfg = *inner.config();
        Ok(Self {
            inner,
            weight2d,
            bias,
            k_h,
            k_w,
            cfg,
        })
    }

    fn fast_path(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight2d.dtype() == DType::F32
            && self.cfg.groups == 1
            && self.cfg.dilation == 1
            && xs.rank() == 4
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.fast_path(xs) {
            return self.inner.forward(xs);
        }
        let (b, c_in, h, w) = xs.dims4()?;
        let p = &self.cfg;
        let (k_h, k_w) = (self.k_h, self.k_w);
        if h + 2 * p.padding < k_h || w + 2 * p.padding < k_w {
            return self.inner.forward(xs);
        }
        let oh = (h + 2 * p.padding - k_h) / p.stride + 1;
        let ow = (w + 2 * p.padding - k_w) / p.stride + 1;
        let xs = xs.contiguous()?;
        let cols = if k_h == 1 && k_w == 1 && p.stride == 1 && p.padding == 0 {
            xs.reshape((b, c_in, h * w))?
        } else {
            xs.apply_op1_no_bwd(&Im2Col {
                k_h,
                k_w,
                stride: p.stride,
                padding: p.padding,
            })?
        };
        let (c_out, _) = self.weight2d.dims2()?;
        // [c_out, K] @ [b, K, oh·ow]: the weight is broadcast over the batch (stride 0),
        // which candle's CPU matmul runs as one product per sample.
        let ys = self.weight2d.broadcast_left(b)?.matmul(&cols)?;
        let ys = match &self.bias {
            Some(bias) => ys.broadcast_add(bias)?,
            None => ys,
        };
        ys.reshape((b, c_out, oh, ow))
    }
}

/// NCHW `[b, c, h, w]` → `[b, c·k_h·k_w, oh·ow]`: row `(c, i, j)` holds input channel `c`
/// shifted by kernel tap `(i, j)` (zero outside the image), the order of the kernel's
/// `[c_out, c_in, k_h, k_w]` flattening.
struct Im2Col {
    k_h: usize,
    k_w: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn run(&self, src: &[f32], (b, c, h, w): (usize, usize, usize, usize)) -> (Vec<f32>, Shape) {
        let (k_h, k_w, s, p) = (self.k_h, self.k_w, self.stride, self.padding);
        let oh = (h + 2 * p - k_h) / s + 1;
        let ow = (w + 2 * p - k_w) / s + 1;
        let rows = c * k_h * k_w;
        let n = oh * ow;
        let mut dst = vec![0f32; b * rows * n];
        for (bi, dst_b) in dst.chunks_mut(rows * n).enumerate() {
            for (row, d) in dst_b.chunks_mut(n).enumerate() {
                let ci = row / (k_h * k_w);
                let (i, j) = ((row / k_w) % k_h, row % k_w);
                let plane = &src[(bi * c + ci) * h * w..][..h * w];
                // Output columns whose input column `ox·s + j − p` lies inside the image.
                let ox_lo = p.saturating_sub(j).div_ceil(s);
                let ox_hi = ((w + p).saturating_sub(j)).div_ceil(s).min(ow);
                if ox_lo >= ox_hi {
                    continue;
                }
                for oy in 0..oh {
                    let iy = (oy * s + i) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let src_row = &plane[iy as usize * w..][..w];
                    let d_row = &mut d[oy * ow..][..ow];
                    let ix0 = ox_lo * s + j - p;
                    if s == 1 {
                        d_row[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + (ox_hi - ox_lo)]);
                    } else {
                        for (k, v) in d_row[ox_lo..ox_hi].iter_mut().enumerate() {
                            *v = src_row[ix0 + k * s];
                        }
                    }
                }
            }
        }
        (dst, Shape::from((b, rows, n)))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sdcam-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("im2col: only f32 is implemented");
        };
        let dims = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: the input must be contiguous");
        };
        let src = &data[start..end];
        let (out, shape) = self.run(src, dims);
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Equal to candle's conv2d for every kernel/stride/padding the U-Net uses, and more.
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (k, stride, padding, bias) in [
            (3, 1, 1, true),
            (3, 2, 1, true),
            (3, 2, 0, false),
            (1, 1, 0, true),
            (1, 2, 0, true),
            (5, 1, 2, false),
            (3, 1, 0, true),
        ] {
            for (b, c_in, c_out, h, w) in [(1, 5, 7, 9, 8), (2, 3, 4, 6, 11), (3, 8, 2, 3, 3)] {
                let x = Tensor::randn(0f32, 1., (b, c_in, h, w), &dev).unwrap();
                let wt = Tensor::randn(0f32, 1., (c_out, c_in, k, k), &dev).unwrap();
                let bs = bias.then(|| Tensor::randn(0f32, 1., c_out, &dev).unwrap());
                let cfg = Conv2dConfig {
                    padding,
                    stride,
                    ..Default::default()
                };
                let inner = candle_nn::Conv2d::new(wt, bs, cfg);
                let conv = Conv2d::new(inner.clone()).unwrap();
                let want = inner.forward(&x).unwrap();
                let got = conv.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{padding}");
                let d = max_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "k{k} s{stride} p{padding} {b}x{c_in}x{h}x{w}: {d}"
                );
                // Non-contiguous input.
                let xt = x.transpose(2, 3).unwrap().contiguous().unwrap();
                let xt = xt.transpose(2, 3).unwrap();
                assert!(!xt.is_contiguous());
                let d = max_diff(&conv.forward(&xt).unwrap(), &want);
                assert!(d < 1e-4, "non-contiguous: {d}");
            }
        }
    }
}
