//! The GEGLU gate of the U-Net's feed-forward (diffusers `GEGLU`, `models/activations.py`):
//! `proj(x)` `[…, 2·n]` → `a · gelu(g)` `[…, n]`, `a` the first half of the last axis and `g`
//! the second, GELU the exact (erf) one. On f32 CPU tensors one parallel pass reads the
//! projection and writes the result, with `erf` vectorised.
//!
//! Hand-written because candle 0.11's `gelu_erf` calls the scalar libm `erff` per element, on a
//! strided view of the projection (the two halves are `narrow`s), and the product is one more
//! pass and allocation: on the sd-turbo U-Net at a 64² latent this came to about 4 % of all
//! samples of `perf record` with bf16 products (issue 14). Other devices and dtypes keep
//! candle's ops.
//!
//! `erf` is odd; for `|x| < 1` its Taylor series to degree 21, above that Abramowitz & Stegun
//! 7.1.26, `1 − (a₁t + … + a₅t⁵)·e^{−x²}` with `t = 1/(1 + p·|x|)` and `e^{−x²}` from
//! `model::softmax`'s vectorised `exp`: within 2e-7 of the true value everywhere (a few ulp;
//! the test checks it against libm's `erf` in f64). GELU is `0.5 · x · (1 + erf(x/√2))` as in
//! torch. Compiled for AVX-512, AVX2 + FMA and baseline
//! x86-64 like the softmax, and picked at run time.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use crate::model::softmax::exp_nonpos;

/// `a · gelu_erf(g)` for `h = [a, g]` split on the last axis (its size must be even).
///
/// # Errors
/// An odd last axis, or a candle error from the fallback.
pub(crate) fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.dim(D::Minus1)?;
    if last % 2 != 0 {
        candle_core::bail!("geglu: the last axis ({last}) must be even");
    }
    let half = last / 2;
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let a = h.narrow(D::Minus1, 0, half)?;
    let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
    a * gate
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdcam-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = crate::model::cpu_f32(storage, layout, "geglu")?;
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("geglu: a scalar has no axis to split");
        };
        let n = *last / 2;
        *last = n;
        let mut dst = vec![0f32; src.len() / 2];
        if let Some(per_row) = 65_536usize.checked_div(n) {
            let kernel = pick_kernel();
            // Enough rows per task that a task is worth scheduling (≥ 64 K outputs).
            let rows_per_task = per_row.max(1);
            dst.par_chunks_mut(rows_per_task * n)
                .zip(src.par_chunks(rows_per_task * 2 * n))
                .for_each(|(d, s)| {
                    for (d, s) in d.chunks_exact_mut(n).zip(s.chunks_exact(2 * n)) {
                        let (a, g) = s.split_at(n);
                        kernel(a, g, d);
                    }
                });
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

/// `dst = a · gelu(g)` element-wise (equal lengths).
type RowKernel = fn(&[f32], &[f32], &mut [f32]);

/// The widest copy of [`geglu_row`] this CPU runs.
fn pick_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |a, g, d| {
                // SAFETY: the CPU reports avx512f (checked just above).
                unsafe { geglu_row_avx512(a, g, d) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |a, g, d| {
                // SAFETY: the CPU reports avx2 and fma (checked just above).
                unsafe { geglu_row_avx2(a, g, d) }
            };
        }
    }
    geglu_row
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
unsafe fn geglu_row_avx512(a: &[f32], g: &[f32], d: &mut [f32]) {
    geglu_row(a, g, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_row_avx2(a: &[f32], g: &[f32], d: &mut [f32]) {
    geglu_row(a, g, d)
}

#[inline(always)]
fn geglu_row(a: &[f32], g: &[f32], d: &mut [f32]) {
    for ((d, &a), &g) in d.iter_mut().zip(a).zip(g) {
        *d = a * gelu(g);
    }
}

/// `0.5 · x · (1 + erf(x/√2))`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` (see the module docs): both forms computed, the one for `|x|` picked, so that
/// the loop vectorises without branches.
#[inline(always)]
fn erf(x: f32) -> f32 {
    // |x| < 1: the Taylor series 2/√π · Σ (−1)ⁿ x²ⁿ⁺¹ / (n! (2n + 1)), to n = 10 (the next
    // term is below 1e-9).
    const TAYLOR: [f32; 11] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -8.548_327e-4,
        1.205_533_3e-4,
        -1.492_565e-5,
        1.646_211_4e-6,
        -1.636_556_5e-7,
        1.480_719_3e-8,
    ];
    // |x| ≥ 1: Abramowitz & Stegun 7.1.26.
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let x2 = ax * ax;
    let mut s = TAYLOR[10];
    for &c in TAYLOR[..10].iter().rev() {
        s = s * x2 + c;
    }
    let near = s * ax;
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let far = 1.0 - poly * exp_nonpos(-x2);
    (if ax < 1.0 { near } else { far }).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::max_abs_diff;
    use candle_core::Device;

    /// erf against libm's f64 `erf`, over the range where it is not yet ±1 in f32 and beyond.
    #[test]
    fn erf_is_within_its_bound() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let d = (f64::from(erf(x)) - libm::erf(f64::from(x))).abs();
            worst = worst.max(d);
        }
        eprintln!("erf: worst {worst:e}");
        assert!(worst < 2e-7, "erf: {worst}");
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    /// The op equals candle's `narrow`, `gelu_erf` and product within erf's bound, on rows
    /// that are not a multiple of the vector width, and keeps the leading axes.
    #[test]
    fn matches_candle_ops() {
        let dev = Device::Cpu;
        for shape in [(2, 7, 2 * 37), (1, 3, 2 * 1280), (1, 1, 2)] {
            let h = (Tensor::randn(0f32, 1., shape, &dev).unwrap() * 3.0).unwrap();
            let half = shape.2 / 2;
            let want = (h.narrow(2, 0, half).unwrap()
                * h.narrow(2, half, half).unwrap().gelu_erf().unwrap())
            .unwrap();
            let got = geglu(&h).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{shape:?}: {d}");
        }
        let odd = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(geglu(&odd).is_err());
    }
}
