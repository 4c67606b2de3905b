//! Scaled softmax over the last axis, `softmax(scale · x)`, for attention scores on the CPU in
//! f32: one pass for the maximum, one for `exp` and the sum, one for the normalisation, rows in
//! parallel on rayon (the pool gemm uses), `exp` vectorised.
//!
//! Hand-written because candle 0.11's CPU `softmax_last_dim` calls the scalar libm `expf` per
//! element: on the sd-turbo U-Net at a 64² latent (4096 tokens, so 4096 × 4096 scores per head
//! in the first block) that was 6.5 % of all samples of `perf record` (issue 14), more than any
//! other op outside the matrix products, and the separate `· scale` cost one more pass and one
//! more allocation. Other devices and dtypes keep candle's softmax.
//!
//! `exp` is the usual range reduction `eˣ = 2ⁿ · eʳ`, `n = round(x·log₂e)`, `|r| ≤ ln2/2`, with a
//! degree-6 polynomial for `eʳ` (Cephes' `expf` coefficients): within 2 ulp of `f32::exp` on the
//! arguments it gets here (`≤ 0`, inputs below −87.3 give 0 instead of a denormal). The code is
//! plain arrays of 16 lanes that the compiler vectorises; it is compiled three times (AVX-512,
//! AVX2 + FMA, baseline x86-64) and picked at run time by what the CPU reports, so machines
//! without AVX-512 run the AVX2 copy. A build without the `avx512` feature leaves the AVX-512
//! copy out, which is how the AVX2 path is measured on an AVX-512 machine.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Lanes of the vectorised loops (one AVX-512 register of f32).
const LANES: usize = 16;

/// `softmax(scale · xs)` over the last dimension (`scale > 0`). f32 CPU tensors take the
/// vectorised kernel of this module; anything else is `softmax_last_dim(xs · scale)` in candle.
///
/// # Errors
/// A non-positive `scale`, or a candle error from the fallback.
pub(crate) fn scaled_softmax_last_dim(xs: &Tensor, scale: f64) -> Result<Tensor> {
    if scale.is_nan() || scale <= 0.0 {
        candle_core::bail!("scaled softmax: the scale must be > 0, got {scale}");
    }
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.rank() >= 1 {
        let xs = xs.contiguous()?;
        return xs.apply_op1_no_bwd(&ScaledSoftmax {
            scale: scale as f32,
        });
    }
    candle_nn::ops::softmax_last_dim(&(xs * scale)?)
}

struct ScaledSoftmax {
    scale: f32,
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "sdcam-scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = crate::model::cpu_f32(storage, layout, "scaled softmax")?;
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        let kernel = pick_kernel();
        // Enough rows per task that a task is worth scheduling (≥ 64 K elements).
        let rows_per_task = (65_536 / n).max(1);
        dst.par_chunks_mut(rows_per_task * n)
            .zip(src.par_chunks(rows_per_task * n))
            .for_each(|(d, s)| {
                for (d, s) in d.chunks_exact_mut(n).zip(s.chunks_exact(n)) {
                    kernel(s, d, self.scale);
                }
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `dst = softmax(scale · src)` for one row (`src.len() == dst.len()`, `scale > 0`).
pub(crate) type RowKernel = fn(&[f32], &mut [f32], f32);

/// The widest copy of [`softmax_row`] this CPU runs.
pub(crate) fn pick_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |s, d, scale| {
                // SAFETY: the CPU reports avx512f (checked just above).
                unsafe { softmax_row_avx512(s, d, scale) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |s, d, scale| {
                // SAFETY: the CPU reports avx2 and fma (checked just above).
                unsafe { softmax_row_avx2(s, d, scale) }
            };
        }
    }
    softmax_row
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(src: &[f32], dst: &mut [f32], scale: f32) {
    softmax_row(src, dst, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(src: &[f32], dst: &mut [f32], scale: f32) {
    softmax_row(src, dst, scale)
}

/// One row: `dst = softmax(scale · src)` (`src.len() == dst.len()`, `scale > 0`).
#[inline(always)]
fn softmax_row(src: &[f32], dst: &mut [f32], scale: f32) {
    // max(src): scale > 0, so max(scale · x) = scale · max(x).
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = src.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut max = m
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &x in chunks.remainder() {
        max = if x > max { x } else { max };
    }
    if !max.is_finite() {
        // All −inf (a fully masked row) or NaN/inf inputs: what candle's softmax gives.
        let sum: f32 = src.iter().map(|&x| (x - max).exp()).sum();
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x - max).exp() / sum;
        }
        return;
    }
    let shift = max * scale;
    let mut acc = [0f32; LANES];
    let mut dc = dst.chunks_exact_mut(LANES);
    let mut sc = src.chunks_exact(LANES);
    for (d, s) in (&mut dc).zip(&mut sc) {
        for l in 0..LANES {
            let e = exp_nonpos(s[l] * scale - shift);
            d[l] = e;
            acc[l] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (d, &s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        let e = exp_nonpos(s * scale - shift);
        *d = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// `eˣ` for `x ≤ 0` (see the module docs); `x < −87.3` gives 0.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to the nearest integer, which its low mantissa bits hold.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.3;
    let x = if below { -87.3 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from the rounded value's bits: n + 127 in the exponent field.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if below {
        0.0
    } else {
        e * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpos(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulp);
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    /// Equal to candle's `softmax_last_dim(x · scale)` for every copy of the kernel this CPU
    /// runs, on rows shorter and longer than a vector, with and without a remainder.
    #[test]
    fn matches_candle_softmax() {
        let dev = Device::Cpu;
        for (shape, scale) in [
            (vec![3usize, 5], 1.0),
            (vec![2, 3, 77], 0.125),
            (vec![1, 5, 7, 4096], 0.125),
            (vec![4, 16], 3.0),
        ] {
            let x = (Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap() * 20.0).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&(&x * scale).unwrap()).unwrap();
            let got = scaled_softmax_last_dim(&x, scale).unwrap();
            let d = crate::model::rel_err(&got, &want).unwrap();
            assert!(d < 1e-6, "{shape:?}: {d}");
            let sums = got.sum_keepdim(candle_core::D::Minus1).unwrap();
            let err = max_abs_diff(&sums, &sums.ones_like().unwrap());
            assert!(err < 1e-5, "{shape:?}: rows sum to 1 ± {err}");
        }
        // Each compiled copy on its own (the dispatch above takes only the widest).
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0)
            .collect();
        let mut want = vec![0f32; x.len()];
        softmax_row(&x, &mut want, 0.5);
        let max_diff = |got: &[f32]| {
            got.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        #[cfg(target_arch = "x86_64")]
        {
            let mut got = vec![0f32; x.len()];
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU reports avx2 and fma.
                unsafe { softmax_row_avx2(&x, &mut got, 0.5) };
                let d = max_diff(&got);
                assert!(d < 1e-7, "avx2 copy: {d}");
            }
            #[cfg(feature = "avx512")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU reports avx512f.
                unsafe { softmax_row_avx512(&x, &mut got, 0.5) };
                let d = max_diff(&got);
                assert!(d < 1e-7, "avx512 copy: {d}");
            }
        }
    }

    /// A fully masked row (all −inf) gives NaN as candle's does; a row with one finite value
    /// gives a one-hot row.
    #[test]
    fn masked_rows() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]], &dev).unwrap();
        let got = scaled_softmax_last_dim(&x, 1.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, vec![vec![0.0, 1.0, 0.0]]);
        assert!(scaled_softmax_last_dim(&x, 0.0).is_err());
    }
}
