//! `softmax(Q·Kᵀ·scale)·V` with the packed products of `model::packed_gemm`, for the U-Net's
//! attention on the CPU where its layers take them: in bf16 with `model.dtype = "bf16"` (both
//! products take bf16 inputs with f32 sums; the scores and the softmax stay f32, the vectorised
//! kernel of `model::softmax`, as oneDNN's and OpenVINO's bf16 attention do), or in f32 on CPUs
//! with AVX-512 or AVX2.
//!
//! Per (sample, head): `Kᵀ` and `V` are packed once; then blocks of [`Q_ROWS`] queries run in
//! parallel, each on one thread: scores `[Q_ROWS, S_kv]` (1 MiB at 4096 keys: stays in L2),
//! their exponentials `exp(scale · (x − max))` unnormalised (in f32 in place, read as they are
//! by the f32 product; in bf16 written as pairs straight into the product's packed operand, by
//! `model::softmax::exp_row_to_bf16_pairs`), their product with `V` straight into the output,
//! and each output row divided by its row's sum (`d` divisions instead of `S_kv`: the softmax's
//! normalisation moved past the product, as flash attention does). The full score matrix is
//! never materialised.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

use crate::model::packed_gemm::{self, Kernel, PackedA, PackedB};
use crate::model::{cpu_f32, softmax, SendPtr};

/// Queries per block.
const Q_ROWS: usize = 64;

/// The attention as a candle op on `q: [B, H, S, D]`, `k, v: [B, H, S_kv, D]` (f32,
/// contiguous) → `[B, H, S, D]` f32; `scale > 0` multiplies the scores before the softmax.
pub(crate) struct PackedAttention {
    pub(crate) scale: f32,
    /// The kernel of both products.
    pub(crate) kernel: Kernel,
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "sdcam-packed-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let q = cpu_f32(sq, lq, "packed attention")?;
        let k = cpu_f32(sk, lk, "packed attention")?;
        let v = cpu_f32(sv, lv, "packed attention")?;
        let (b, h, s, d) = lq.shape().dims4()?;
        let (kb, kh, skv, kd) = lk.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || lv.shape().dims4()? != (b, h, skv, d) {
            candle_core::bail!(
                "packed attention: q {:?}, k {:?}, v {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        if self.scale.is_nan() || self.scale <= 0.0 {
            candle_core::bail!("packed attention: the scale must be > 0");
        }
        let heads = b * h;
        if skv == 0 {
            // No keys: an empty weighted sum.
            return Ok((
                CpuStorage::F32(vec![0f32; heads * s * d]),
                Shape::from((b, h, s, d)),
            ));
        }
        // Kᵀ (`d × s_kv`) and V (`s_kv × d`) of every (sample, head), packed once.
        let packed: Vec<(PackedB, PackedB)> = (0..heads)
            .into_par_iter()
            .map(|i| {
                let ki = &k[i * skv * d..][..skv * d];
                let kt = PackedB::from_transposed(self.kernel, ki, (skv, d, d));
                let mut vp = PackedB::default();
                vp.repack_rows(
                    self.kernel,
                    &v[i * skv * d..][..skv * d],
                    (skv, d, d),
                    false,
                );
                (kt, vp)
            })
            .collect();
        let blocks = s.div_ceil(Q_ROWS);
        let mut out = vec![0f32; heads * s * d];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let kernel = self.kernel;
        (0..heads * blocks).into_par_iter().for_each_init(
            || (PackedA::default(), Vec::<f32>::new(), Vec::<f32>::new()),
            |(pa, scores, sums), t| {
                let (i, blk) = (t / blocks, t % blocks);
                let r0 = blk * Q_ROWS;
                let rows = Q_ROWS.min(s - r0);
                let (kt, vp) = &packed[i];
                let qi = &q[(i * s + r0) * d..][..rows * d];
                scores.resize(rows * skv, 0.0);
                sums.clear();
                // SAFETY: `scores` holds rows × s_kv floats, written by this task alone.
                unsafe {
                    let c = (scores.as_mut_ptr(), skv);
                    packed_gemm::matmul_rows(pa, qi, (rows, d, d), kt, c, false);
                }
                let dst = out_ptr;
                // SAFETY (both products): rows r0 .. r0 + rows of head i of `out` (d floats
                // each), written by this task alone; `out` outlives the parallel loop.
                let c = unsafe { (dst.0.add((i * s + r0) * d), d) };
                // Unnormalised probabilities (the softmax's division moves to the output's
                // rows below): f32 in place, read as they are by the f32 product, or bf16
                // pairs written straight into the packed left operand.
                if kernel == Kernel::F32 {
                    sums.extend(
                        scores
                            .chunks_exact_mut(skv)
                            .map(|row| softmax::exp_row_in_place(row, self.scale)),
                    );
                    // SAFETY: see `c`.
                    unsafe { packed_gemm::matmul_rows(pa, scores, (rows, skv, skv), vp, c, false) };
                } else {
                    pa.fill_bf16_rows(kernel, (rows, skv), |r, pairs| {
                        let row = &scores[r * skv..][..skv];
                        sums.push(softmax::exp_row_to_bf16_pairs(row, pairs, self.scale));
                    });
                    // SAFETY: see `c`.
                    unsafe { packed_gemm::matmul(pa, vp, c.0, c.1, false) };
                }
                for (r, &sum) in sums.iter().enumerate() {
                    let inv = 1.0 / sum;
                    // SAFETY: row r of this task's block of `out`, written above.
                    let o = unsafe { std::slice::from_raw_parts_mut(c.0.add(r * d), d) };
                    for x in o {
                        *x *= inv;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, h, s, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::unet::attention::attention_kernel;
    use candle_core::{Device, Tensor};

    /// Within bf16 rounding of the f32 attention kernel (below 1e-2 of the output's scale, not
    /// equal) with bf16 products, within summation order (1e-5) with f32 ones: query counts
    /// that are not multiples of the block, SD 1.5's head width 40, 77 prompt keys, several
    /// samples and heads.
    #[test]
    fn stays_within_rounding_of_the_f32_kernel() {
        let kernels: Vec<_> = packed_gemm::kernels_here()
            .into_iter()
            .map(|k| (k, if k == Kernel::F32 { 1e-5 } else { 1e-2 }))
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        let dev = Device::Cpu;
        for (b, h, s, skv, d) in [(1, 1, 1, 1, 1), (2, 3, 130, 77, 40), (1, 5, 64, 300, 64)] {
            // Seeded (candle's CPU randn is not): the bound holds for these inputs, not by luck
            // of the draw.
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
            let mut t = |n: usize| {
                let v: Vec<f32> = (0..b * h * n * d)
                    .map(|_| {
                        rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng)
                    })
                    .collect();
                Tensor::from_vec(v, (b, h, n, d), &dev).unwrap()
            };
            let (q, k, v) = (t(s), t(skv), t(skv));
            let scale = 1.0 / (d as f64).sqrt();
            let want = attention_kernel(&q, &k, &v, scale, false).unwrap();
            for &(kernel, bound) in &kernels {
                let op = PackedAttention {
                    scale: scale as f32,
                    kernel,
                };
                let got = q.apply_op3_no_bwd(&k, &v, &op).unwrap();
                assert_eq!(got.dims(), want.dims());
                let e = crate::model::rel_err(&got, &want).unwrap();
                let rounded = kernel != Kernel::F32 && d > 1;
                assert!(
                    e < bound && (e > 0.0 || !rounded),
                    "{kernel:?} {b}x{h}x{s}x{skv}x{d}: {e}"
                );
            }
        }
    }
}
