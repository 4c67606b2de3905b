//! GroupNorm (torch `nn.GroupNorm`, as diffusers' resnets, transformers and output heads use
//! it), optionally with a per-channel shift added to its input first (the resnet's time
//! embedding, `norm2(h + temb)`) and with the SiLU that follows it in every resnet and before
//! the U-Net's and the VAE's `conv_out`.
//!
//! On f32 CPU tensors it is one op: for each (sample, group), which in NCHW is one contiguous
//! run of `channels/groups · h · w` floats, one pass for the mean, one for the variance (two
//! passes, as candle and torch compute it, not the one-pass formula that loses digits), and one
//! that writes `(x − mean)/√(var + eps) · γ + β`, then SiLU, with `exp` vectorised
//! (`model::softmax`); samples × groups run in parallel. Hand-written because candle 0.11's
//! `GroupNorm` is eight tensor ops (sum, subtract, square, sum, divide, sqrt, scale, shift: as
//! many passes over the activation and allocations) and its `silu` calls the scalar libm `expf`
//! per element, one more pass; on the U-Net with bf16 products these came to several percent
//! of `perf record`'s samples (issue 14). Other devices and dtypes keep candle's ops.
//!
//! Sums are made in 16 f32 lanes per channel and added up in f64, so they are no less accurate
//! than candle's; the output differs from candle's only by rounding (tests: < 1e-5 relative).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::model::softmax::exp_nonpos;

/// Lanes of the vectorised sums (one AVX-512 register of f32).
const LANES: usize = 16;

/// A GroupNorm layer: `weight` and `bias` `[channels]` read from `vb` as `candle_nn::group_norm`
/// reads them (callers pass `f32_params(vb)` on the bf16 path).
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    inner: candle_nn::GroupNorm,
    /// γ and β as floats where they are f32 CPU tensors (the fused kernel's).
    affine: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    channels: usize,
    eps: f64,
}

/// `candle_nn::group_norm` as a [`GroupNorm`].
///
/// # Errors
/// `channels` not a multiple of `groups`, or missing / misshapen tensors in `vb`.
pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    // Read as `candle_nn::group_norm` reads them (each tensor once).
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let affine = (weight.device().is_cpu() && weight.dtype() == DType::F32)
        .then(|| Ok::<_, candle_core::Error>((weight.to_vec1()?, bias.to_vec1()?)))
        .transpose()?;
    let inner = candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        affine,
        groups,
        channels,
        eps,
    })
}

impl GroupNorm {
    /// `silu?(GroupNorm(xs + shift))`: `xs` `[b, channels, …]`, `shift` `[b, channels]` added
    /// to every element of its (sample, channel) first, SiLU after where `silu`.
    ///
    /// # Errors
    /// Shapes that do not fit, or a candle error.
    pub(crate) fn forward_ext(
        &self,
        xs: &Tensor,
        shift: Option<&Tensor>,
        silu: bool,
    ) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!(
                "GroupNorm: expected [batch, {}, …], got {:?}",
                self.channels,
                dims
            );
        }
        // The shift as [b, channels] (a [1, channels] one is broadcast over the batch).
        let (b, c) = (dims[0], dims[1]);
        let shift = shift
            .map(|s| {
                s.broadcast_as((b, c)).map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "GroupNorm: shift {:?}, expected [{b}, {c}]",
                        s.dims()
                    ))
                })
            })
            .transpose()?;
        let shift = shift.as_ref();
        match &self.affine {
            Some((weight, bias))
                if xs.device().is_cpu()
                    && xs.dtype() == DType::F32
                    && shift.is_none_or(|s| s.dtype() == DType::F32 && s.device().is_cpu()) =>
            {
                let shift = shift
                    .map(|s| s.flatten_all()?.to_vec1::<f32>())
                    .transpose()?;
                xs.contiguous()?.apply_op1_no_bwd(&FusedGroupNorm {
                    weight,
                    bias,
                    shift: shift.as_deref(),
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                })
            }
            _ => {
                let xs = match shift {
                    Some(s) => {
                        // [b, c, 1, …, 1]: one value per (sample, channel), any rank.
                        let mut to = vec![1; dims.len()];
                        to[..2].copy_from_slice(&[b, c]);
                        xs.broadcast_add(&s.reshape(to)?)?
                    }
                    None => xs.clone(),
                };
                let ys = self.inner.forward(&xs)?;
                if silu {
                    candle_nn::ops::silu(&ys)
                } else {
                    Ok(ys)
                }
            }
        }
    }

    /// `silu(GroupNorm(xs))`.
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_ext(xs, None, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_ext(xs, None, false)
    }
}

struct FusedGroupNorm<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    /// `[b, channels]`.
    shift: Option<&'a [f32]>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for FusedGroupNorm<'_> {
    fn name(&self) -> &'static str {
        "sdcam-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = crate::model::cpu_f32(storage, layout, "group norm")?;
        let dims = layout.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let g = self.groups;
        if g == 0 || c % g != 0 || self.weight.len() != c || self.bias.len() != c {
            candle_core::bail!("group norm: {c} channels do not split into {g} groups");
        }
        if self.shift.is_some_and(|s| s.len() != b * c) {
            candle_core::bail!("group norm: the shift is not [{b}, {c}]");
        }
        let cg = c / g;
        let mut out = vec![0f32; x.len()];
        if cg * hw == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        let kernel = pick_kernel();
        out.par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (bi, gi) = (i / g, i % g);
                let chans = gi * cg..(gi + 1) * cg;
                let shift = self.shift.map(|s| &s[bi * c..][chans.clone()]);
                kernel(
                    src,
                    dst,
                    Group {
                        hw,
                        weight: &self.weight[chans.clone()],
                        bias: &self.bias[chans],
                        shift,
                        eps: self.eps,
                        silu: self.silu,
                    },
                );
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// One (sample, group): its channels' parameters.
#[derive(Clone, Copy)]
struct Group<'a> {
    hw: usize,
    weight: &'a [f32],
    bias: &'a [f32],
    shift: Option<&'a [f32]>,
    eps: f64,
    silu: bool,
}

type GroupKernel = fn(&[f32], &mut [f32], Group);

/// The widest copy of [`normalize_group`] this CPU runs.
fn pick_kernel() -> GroupKernel {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |s, d, g| {
                // SAFETY: the CPU reports avx512f (checked just above).
                unsafe { normalize_group_avx512(s, d, g) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |s, d, g| {
                // SAFETY: the CPU reports avx2 and fma (checked just above).
                unsafe { normalize_group_avx2(s, d, g) }
            };
        }
    }
    normalize_group
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
unsafe fn normalize_group_avx512(src: &[f32], dst: &mut [f32], g: Group) {
    normalize_group(src, dst, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normalize_group_avx2(src: &[f32], dst: &mut [f32], g: Group) {
    normalize_group(src, dst, g)
}

/// `Σ f(x)` over `xs` in [`LANES`] f32 lanes, returned in f64.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            acc[l] += f(ch[l]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

/// `x · σ(x)`, `σ` from `e^{−|x|}` so that `exp` only sees arguments ≤ 0.
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_nonpos(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * sigmoid
}

/// One (sample, group): `src`/`dst` its channels' `hw` floats each, one after another.
#[inline(always)]
fn normalize_group(src: &[f32], dst: &mut [f32], g: Group) {
    let Group { hw, .. } = g;
    let n = src.len() as f64;
    let shift = |ci: usize| g.shift.map_or(0.0, |s| s[ci]);
    let mut sum = 0f64;
    for (ci, x) in src.chunks_exact(hw).enumerate() {
        let t = shift(ci);
        sum += lane_sum(x, |v| v + t);
    }
    let mean = (sum / n) as f32;
    let mut sq = 0f64;
    for (ci, x) in src.chunks_exact(hw).enumerate() {
        let t = shift(ci);
        sq += lane_sum(x, |v| {
            let d = v + t - mean;
            d * d
        });
    }
    let inv = (1.0 / (sq / n + g.eps).sqrt()) as f32;
    for (ci, (x, y)) in src
        .chunks_exact(hw)
        .zip(dst.chunks_exact_mut(hw))
        .enumerate()
    {
        let (t, scale, beta) = (shift(ci), g.weight[ci] * inv, g.bias[ci]);
        if g.silu {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = silu((v + t - mean) * scale + beta);
            }
        } else {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = (v + t - mean) * scale + beta;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{max_abs_diff, max_rel_diff};
    use candle_core::{Device, D};
    use candle_nn::VarMap;

    /// The fused op against candle's GroupNorm, `+ shift` and `silu` in f64, with a random γ, β,
    /// an offset input (where the one-pass variance would lose digits), 1-D and 2-D spatial
    /// sizes that are not multiples of the vector width.
    #[test]
    fn matches_candle_ops() {
        let dev = Device::Cpu;
        for (dims, groups) in [
            (vec![2, 64, 9, 7], 32),
            (vec![1, 320, 16, 16], 32),
            (vec![2, 6, 5], 3),
        ] {
            let c = dims[1];
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            // Create γ and β, give them random values, then build the layer over them.
            group_norm(groups, c, 1e-5, vb.clone()).unwrap();
            for v in map.data().lock().unwrap().values() {
                v.set(&Tensor::randn(0f32, 1., c, &dev).unwrap()).unwrap();
            }
            let gn = group_norm(groups, c, 1e-5, vb).unwrap();
            let (w, b) = gn.affine.clone().unwrap();
            let reference = candle_nn::GroupNorm::new(
                Tensor::new(w, &dev).unwrap().to_dtype(DType::F64).unwrap(),
                Tensor::new(b, &dev).unwrap().to_dtype(DType::F64).unwrap(),
                c,
                groups,
                1e-5,
            )
            .unwrap();
            let x = (Tensor::randn(0f32, 2., dims.as_slice(), &dev).unwrap() + 100.0).unwrap();
            let shift = Tensor::randn(0f32, 1., (dims[0], c), &dev).unwrap();
            let shifted = {
                let mut s = shift.clone();
                for _ in 2..dims.len() {
                    s = s.unsqueeze(D::Minus1).unwrap();
                }
                x.broadcast_add(&s).unwrap()
            };
            for (with_shift, silu) in [(false, false), (false, true), (true, false), (true, true)] {
                // candle's ops in f64 (in f32 its own sums of the offset input are off by more
                // than the fused op's).
                let input = if with_shift { &shifted } else { &x };
                let mut want = reference
                    .forward(&input.to_dtype(DType::F64).unwrap())
                    .unwrap();
                if silu {
                    want = candle_nn::ops::silu(&want).unwrap();
                }
                let want = want.to_dtype(DType::F32).unwrap();
                let got = gn
                    .forward_ext(&x, with_shift.then_some(&shift), silu)
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = max_rel_diff(&got, &want);
                assert!(d < 1e-5, "{dims:?} shift {with_shift} silu {silu}: {d}");
            }
        }
    }

    /// Other dtypes take candle's ops, the shift broadcast over every spatial axis (rank 3 and
    /// 5 too) and over the batch when it is `[1, channels]`.
    #[test]
    fn fallback_takes_any_rank_and_a_batch_wide_shift() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let gn = group_norm(2, 4, 1e-5, vb).unwrap();
        assert!(gn.affine.is_none(), "f64 parameters take the fallback");
        for dims in [vec![2, 4, 6], vec![2, 4, 3, 5], vec![2, 4, 2, 3, 2]] {
            let x = Tensor::randn(0f64, 1., dims.as_slice(), &dev).unwrap();
            let shift = Tensor::randn(0f64, 1., (1, 4), &dev).unwrap();
            let got = gn.forward_ext(&x, Some(&shift), true).unwrap();
            let mut s = shift.clone();
            for _ in 2..dims.len() {
                s = s.unsqueeze(D::Minus1).unwrap();
            }
            let want =
                candle_nn::ops::silu(&gn.inner.forward(&x.broadcast_add(&s).unwrap()).unwrap())
                    .unwrap();
            assert_eq!(got.dims(), dims.as_slice());
            assert!(
                max_abs_diff(
                    &got.to_dtype(DType::F32).unwrap(),
                    &want.to_dtype(DType::F32).unwrap()
                ) < 1e-6
            );
        }
        let x = Tensor::zeros((2, 4, 3), DType::F64, &dev).unwrap();
        let wrong = Tensor::zeros((3, 4), DType::F64, &dev).unwrap();
        assert!(gn.forward_ext(&x, Some(&wrong), false).is_err());
    }

    #[test]
    fn silu_matches_its_definition() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.05;
            let want = x / (1.0 + (-x).exp());
            let d = (silu(x) - want).abs();
            // Below x ≈ −87.3 `exp` gives 0 instead of a denormal: SiLU is then 0, not ~1e-37.
            assert!(d <= 4.0 * f32::EPSILON * want.abs() + 1e-35, "{x}: {d}");
        }
        assert_eq!(silu(-200.0), 0.0);
        assert_eq!(silu(200.0), 200.0);
    }
}
