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
//!
//! The packed attention (`model::packed_attention`, CPUs with AVX-512) takes the unnormalised
//! rows instead ([`exp_row_in_place`], [`exp_row_to_bf16_pairs`]): the same `exp` written with
//! AVX-512 intrinsics (FMAs, `vscalefps` for `2ⁿ`, four vectors in flight; the compiler's
//! vectorisation of the loop above kept one vector and no FMAs), and no normalisation pass. On
//! an AMX machine this took the bf16 sd-turbo U-Net at a 64² latent from 1179 to 1097 ms, f32
//! from 2980 to 2897 ms (issue 14, same run).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::model::packed_gemm;

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
    let max = max_lanes(src);
    if !max.is_finite() {
        // All −inf (a fully masked row) or NaN/inf inputs: what candle's softmax gives.
        let sum: f32 = src.iter().map(|&x| (x - max).exp()).sum();
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x - max).exp() / sum;
        }
        return;
    }
    dst.copy_from_slice(src);
    let sum = exp_lanes_in_place(dst, scale, max * scale);
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// The largest value of `row` (−inf for an empty row), [`LANES`] at a time (vectorised by the
/// compiler in the copies made with wider instructions).
#[inline(always)]
fn max_lanes(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
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
    max
}

/// `row[i] = exp(scale · row[i] − shift)` (each `≤ 1`, [`exp_nonpos`]) and their sum,
/// [`LANES`] at a time (vectorised as [`max_lanes`]).
#[inline(always)]
fn exp_lanes_in_place(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_nonpos(c[l] * scale - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x * scale - shift);
        sum += *x;
    }
    sum
}

/// [`max_lanes`] and [`exp_lanes_in_place`] compiled for AVX2 and FMA (the unnormalised rows
/// of the f32 packed attention on CPUs without AVX-512).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(row: &[f32]) -> f32 {
        super::max_lanes(row)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        super::exp_lanes_in_place(row, scale, shift)
    }
}

/// For attention on the packed products (`model::packed_attention`): a row of scores `x` →
/// its *unnormalised* probabilities `exp(scale · (x − max x))`, in place, and their sum (≥ 1:
/// the maximum contributes 1), so that the caller divides the `d` values of the row's output by
/// it instead of the `s_kv` probabilities (one pass fewer). Where the row's maximum is not
/// finite (−inf everywhere, or NaN/inf inputs) it writes candle's softmax of the row instead and
/// returns 1. AVX-512 F (FMA, 4 vectors a step) where the CPU has it, else [`exp_nonpos`]
/// vectorised by the compiler (AVX2 and FMA where the CPU has them); both within 2 ulp of
/// `f32::exp` per value.
pub(crate) fn exp_row_in_place(row: &mut [f32], scale: f32) -> f32 {
    let Some(shift) = row_shift(row, scale) else {
        return non_finite_row(row, scale);
    };
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports avx512f (checked just above).
            return unsafe { avx512::exp_in_place(row, scale, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU reports avx2 and fma (checked just above).
            return unsafe { avx2::exp_in_place(row, scale, shift) };
        }
    }
    exp_lanes_in_place(row, scale, shift)
}

/// [`exp_row_in_place`] written as bf16 pairs (`out[p]` = values `2p` and `2p + 1`, the
/// even one in the low half; the last pair zero-padded where the row is odd; round to nearest
/// even, as `model::packed_gemm` packs its operands) instead of in place: the left operand of
/// the bf16 product with V, without a separate packing pass. `out` holds at least
/// `row.len().div_ceil(2)` slots. Returns the sum of the f32 values (before rounding).
///
/// # Panics
/// `out` is too short.
pub(crate) fn exp_row_to_bf16_pairs(row: &[f32], out: &mut [u32], scale: f32) -> f32 {
    let pairs = row.len().div_ceil(2);
    assert!(out.len() >= pairs, "exp_row_to_bf16_pairs: out too short");
    let out = &mut out[..pairs];
    #[cfg(target_arch = "x86_64")]
    if packed_gemm::bf16_available() {
        if let Some(shift) = row_shift(row, scale) {
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above); `out` holds the
            // row's pairs.
            return unsafe { avx512::exp_to_pairs(row, out, scale, shift) };
        }
    }
    // Non-finite rows, or CPUs without AVX512-BF16 (where the packed attention does not run
    // in bf16): in f32 first, then packed.
    let mut e = row.to_vec();
    let sum = exp_row_in_place(&mut e, scale);
    packed_gemm::pairs_of_row(&e, out);
    sum
}

/// `scale · max(row)` where that is finite (`scale > 0`), else `None`.
fn row_shift(row: &[f32], scale: f32) -> Option<f32> {
    let shift = row_max(row) * scale;
    shift.is_finite().then_some(shift)
}

/// The largest value of `row` (−inf for an empty row).
fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports avx512f (checked just above).
            return unsafe { avx512::max(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU reports avx2 and fma (checked just above).
            return unsafe { avx2::max(row) };
        }
    }
    max_lanes(row)
}

/// A row whose maximum is not finite: candle's softmax of it (what [`softmax_row`] gives), in
/// place; its "sum" is 1.
fn non_finite_row(row: &mut [f32], scale: f32) -> f32 {
    let src = row.to_vec();
    softmax_row(&src, row, scale);
    1.0
}

/// The AVX-512 loops of [`exp_row_in_place`] and [`exp_row_to_bf16_pairs`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::model::packed_gemm::first_lanes;

    /// The largest value of `row` (−inf for an empty row), 4 vectors a step.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(row: &[f32]) -> f32 {
        let n = row.len();
        let p = row.as_ptr();
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut j = 0;
        // SAFETY: loads of 16 floats at j ≤ n − 16; the tail is masked to the row.
        unsafe {
            while j + 64 <= n {
                for (u, mu) in m.iter_mut().enumerate() {
                    *mu = _mm512_max_ps(*mu, _mm512_loadu_ps(p.add(j + 16 * u)));
                }
                j += 64;
            }
            while j + 16 <= n {
                m[0] = _mm512_max_ps(m[0], _mm512_loadu_ps(p.add(j)));
                j += 16;
            }
            if j < n {
                let k = first_lanes(n - j);
                let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, p.add(j));
                m[1] = _mm512_max_ps(m[1], v);
            }
        }
        let v = _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3]));
        _mm512_reduce_max_ps(v)
    }

    /// `exp(x·scale − shift)` of 16 values whose result is `≤ 1`: [`super::exp_nonpos`] with
    /// FMAs and `vscalefps` for `2ⁿ`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512, scale: __m512, shift: __m512) -> __m512 {
        let x = _mm512_fmsub_ps(x, scale, shift);
        // Below −87.3 (and NaN): 0, as the scalar version gives.
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.3));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut q = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c));
        }
        let rr = _mm512_mul_ps(r, r);
        let e = _mm512_fmadd_ps(q, rr, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_maskz_scalef_ps(keep, e, n)
    }

    /// [`super::exp_row_in_place`]'s loop, 4 vectors a step.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (sc, sh) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY: loads and stores of 16 floats at j ≤ n − 16; the tail is masked to the row.
        unsafe {
            while j + 64 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let e = exp16(_mm512_loadu_ps(p.add(j + 16 * u)), sc, sh);
                    _mm512_storeu_ps(p.add(j + 16 * u), e);
                    *a = _mm512_add_ps(*a, e);
                }
                j += 64;
            }
            while j < n {
                let k = first_lanes(n - j);
                let e = _mm512_maskz_mov_ps(k, exp16(_mm512_maskz_loadu_ps(k, p.add(j)), sc, sh));
                _mm512_mask_storeu_ps(p.add(j), k, e);
                acc[0] = _mm512_add_ps(acc[0], e);
                j += 16;
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }

    /// [`super::exp_row_to_bf16_pairs`]'s loop: 32 values (16 pairs, one `vcvtne2ps2bf16`) a
    /// step; `out` holds exactly the row's pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn exp_to_pairs(row: &[f32], out: &mut [u32], scale: f32, shift: f32) -> f32 {
        let n = row.len();
        debug_assert_eq!(out.len(), n.div_ceil(2));
        let (p, o) = (row.as_ptr(), out.as_mut_ptr());
        let (sc, sh) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut j = 0;
        // SAFETY: loads of 16 floats inside the row (the tail masked), stores of 16 pairs at
        // j/2 inside `out` (the tail masked to its pairs).
        unsafe {
            while j < n {
                let (k0, k1) = (first_lanes(n - j), first_lanes(n.saturating_sub(j + 16)));
                let lo =
                    _mm512_maskz_mov_ps(k0, exp16(_mm512_maskz_loadu_ps(k0, p.add(j)), sc, sh));
                let hi = _mm512_maskz_mov_ps(
                    k1,
                    exp16(_mm512_maskz_loadu_ps(k1, p.add(j + 16)), sc, sh),
                );
                acc[0] = _mm512_add_ps(acc[0], lo);
                acc[1] = _mm512_add_ps(acc[1], hi);
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let kp = first_lanes((n - j).div_ceil(2));
                _mm512_mask_storeu_epi32(o.add(j / 2).cast(), kp, v);
                j += 32;
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
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
        // The vector copy (exp_row_in_place; its maximum 0 makes it plain exp).
        let xs: Vec<f32> = (0..=235_000).map(|i| -(i as f32) * 0.000_37).collect();
        let mut e = xs.clone();
        exp_row_in_place(&mut e, 1.0);
        for (&x, &got) in xs.iter().zip(&e) {
            let ulp = (got.to_bits() as i64 - x.exp().to_bits() as i64).unsigned_abs();
            assert!(ulp <= 2, "exp({x}): {got} is {ulp} ulp from {}", x.exp());
        }
        let mut e = vec![0.0, -87.2, -87.4, -100.0, f32::NEG_INFINITY];
        exp_row_in_place(&mut e, 1.0);
        assert_eq!(e[0], 1.0);
        assert!(e[1] > 0.0 && e[2..] == [0.0; 3], "{e:?}");
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

    /// The unnormalised rows for attention: divided by their sums they are the softmax (within
    /// 1e-6), the bf16 pairs are exactly the in-place values rounded, the last pair of an odd
    /// row is zero-padded, and rows whose maximum is not finite give candle's softmax with sum
    /// 1; lengths around the vector steps (1, 15–17, 33, 64, 77, 4101).
    #[test]
    fn unnormalised_rows_match_the_softmax() {
        for n in [1usize, 15, 16, 17, 33, 64, 77, 4101] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 + 11) % 101) as f32 * 0.4 - 20.0)
                .collect();
            let mut want = vec![0f32; n];
            softmax_row(&x, &mut want, 0.125);
            let mut e = x.clone();
            let sum = exp_row_in_place(&mut e, 0.125);
            assert!(sum >= 1.0, "{n}: sum {sum}");
            for (got, want) in e.iter().zip(&want) {
                assert!(
                    (got / sum - want).abs() < 1e-6,
                    "{n}: {} vs {want}",
                    got / sum
                );
            }
            let mut pairs = vec![u32::MAX; n.div_ceil(2) + 1];
            let sum2 = exp_row_to_bf16_pairs(&x, &mut pairs, 0.125);
            assert!((sum2 - sum).abs() <= 1e-6 * sum, "{n}: {sum2} vs {sum}");
            for (p, &got) in pairs[..n.div_ceil(2)].iter().enumerate() {
                let hi = e.get(2 * p + 1).copied().unwrap_or(0.0);
                assert_eq!(got, packed_gemm::bf16_pair(e[2 * p], hi), "{n}: pair {p}");
            }
            assert_eq!(pairs[n.div_ceil(2)], u32::MAX, "{n}: wrote past the pairs");
        }
        let mut inf = vec![f32::NEG_INFINITY, 2.0, f32::INFINITY];
        assert_eq!(exp_row_in_place(&mut inf, 1.0), 1.0);
        let mut want = vec![0f32; 3];
        softmax_row(&[f32::NEG_INFINITY, 2.0, f32::INFINITY], &mut want, 1.0);
        assert_eq!(format!("{inf:?}"), format!("{want:?}"));
    }

    /// The AVX2 copies of the row maximum and the in-place exponentials (what CPUs without
    /// AVX-512 run; AVX-512 CPUs take their own loops) equal the portable loops exactly, for
    /// lengths around the vector steps.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_equal_the_portable_loops() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        for n in [0usize, 1, 7, 15, 16, 17, 33, 77, 4101] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 53 + 7) % 97) as f32 * 0.5 - 30.0)
                .collect();
            // SAFETY: the CPU reports avx2 and fma (checked above).
            let got_max = unsafe { avx2::max(&x) };
            assert_eq!(got_max.to_bits(), max_lanes(&x).to_bits(), "{n}: max");
            let shift = 0.25 * max_lanes(&x);
            let (mut got, mut want) = (x.clone(), x.clone());
            // SAFETY: as above.
            let s = unsafe { avx2::exp_in_place(&mut got, 0.25, shift) };
            let s0 = exp_lanes_in_place(&mut want, 0.25, shift);
            // FMA contraction may differ from the portable build's separate multiply and
            // subtract by one rounding: within 2 ulp of each other, as of f32::exp.
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w.abs(),
                    "{n}: {g} vs {w}"
                );
            }
            assert!((s - s0).abs() <= 1e-6 * s0.max(1.0), "{n}: sum {s} vs {s0}");
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
