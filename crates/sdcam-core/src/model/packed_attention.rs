//! `softmax(Q·Kᵀ·scale)·V` with the packed products of `model::packed_gemm`, for the U-Net's
//! attention on the CPU where its layers take them: in bf16 with `model.dtype = "bf16"` (both
//! products take bf16 inputs with f32 sums; the scores and the softmax stay f32, the vectorised
//! kernel of `model::softmax`, as oneDNN's and OpenVINO's bf16 attention do), or in f32 on CPUs
//! with AVX-512 or AVX2.
//!
//! The heads are read where the linear layers wrote them (`[B, S, H·D]`, each head a band of
//! columns, rows `H·D` apart: no copies to split the heads and merge them again, which ran on
//! one thread in candle's strided copy), and a prompt's keys and values, shared by every
//! sample, are read once rather than broadcast into a copy per sample.
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

/// The attention as a candle op on f32 contiguous tensors, `scale > 0` multiplying the
/// scores before the softmax. Each operand is either split into heads, `[B, H, S, D]`, or
/// token-major as a linear layer writes it, `[B, S, H·D]` (head `h` in columns `h·D ..
/// (h + 1)·D`, read in place: no copy to split or merge the heads); the output takes the
/// layout of `q`. `k` and `v` (`S_kv` rows) have batch `B`, or 1 for keys and values shared
/// by every sample (a prompt's, read in place rather than broadcast).
pub(crate) struct PackedAttention {
    pub(crate) scale: f32,
    /// The kernel of both products.
    pub(crate) kernel: Kernel,
    /// `H`, for token-major operands.
    pub(crate) heads: usize,
}

/// Where one operand's rows lie: row `r` of head `h` of sample `i` starts at
/// `i·batch + h·head + r·row` (its `D` values consecutive).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Strides {
    batch: usize,
    head: usize,
    row: usize,
}

impl Strides {
    /// Start of row 0 of head `i` (= sample · H + head).
    fn at(self, i: usize, heads: usize) -> usize {
        (i / heads) * self.batch + (i % heads) * self.head
    }
}

impl PackedAttention {
    /// `(batch, H, rows, D)` and the strides of an operand's layout (`[B, H, S, D]` or
    /// `[B, S, H·D]`).
    fn layout(&self, l: &Layout, what: &str) -> Result<((usize, usize, usize, usize), Strides)> {
        match *l.shape().dims() {
            [b, h, s, d] => Ok((
                (b, h, s, d),
                Strides {
                    batch: h * s * d,
                    head: s * d,
                    row: d,
                },
            )),
            [b, s, hd] if self.heads > 0 && hd % self.heads == 0 => {
                let d = hd / self.heads;
                Ok((
                    (b, self.heads, s, d),
                    Strides {
                        batch: s * hd,
                        head: d,
                        row: hd,
                    },
                ))
            }
            _ => candle_core::bail!(
                "packed attention: {what} {:?} is neither [B, H, S, D] nor [B, S, {}·D]",
                l.shape(),
                self.heads
            ),
        }
    }
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
        let ((b, h, s, d), qs) = self.layout(lq, "q")?;
        let ((kb, kh, skv, kd), mut ks) = self.layout(lk, "k")?;
        let ((vb, vh, vs, vd), mut vst) = self.layout(lv, "v")?;
        if (kh, kd) != (h, d) || (vb, vh, vs, vd) != (kb, h, skv, d) || (kb != b && kb != 1) {
            candle_core::bail!(
                "packed attention: q {:?}, k {:?}, v {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        if kb != b {
            // One set of keys and values for every sample.
            ks.batch = 0;
            vst.batch = 0;
        }
        if self.scale.is_nan() || self.scale <= 0.0 {
            candle_core::bail!("packed attention: the scale must be > 0");
        }
        let heads = b * h;
        let out_shape = Shape::from(lq.shape().dims());
        if skv == 0 {
            // No keys: an empty weighted sum.
            return Ok((CpuStorage::F32(vec![0f32; heads * s * d]), out_shape));
        }
        // Kᵀ (`d × s_kv`) and V (`s_kv × d`) of every (sample, head), packed once; shared
        // keys and values once per head.
        let kv_heads = if kb == b { heads } else { h };
        let packed: Vec<(PackedB, PackedB)> = (0..kv_heads)
            .into_par_iter()
            .map(|i| {
                let ki = &k[ks.at(i, h)..];
                let kt = PackedB::from_transposed(self.kernel, ki, (skv, d, ks.row));
                let mut vp = PackedB::default();
                let vi = &v[vst.at(i, h)..];
                vp.repack_rows(self.kernel, vi, (skv, d, vst.row), false);
                (kt, vp)
            })
            .collect();
        // The output in q's layout.
        let os = qs;
        let blocks = s.div_ceil(Q_ROWS);
        let mut out: Vec<f32> = Vec::with_capacity(heads * s * d);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let kernel = self.kernel;
        (0..heads * blocks).into_par_iter().for_each_init(
            || (PackedA::default(), Vec::<f32>::new(), Vec::<f32>::new()),
            |(pa, scores, sums), t| {
                let (i, blk) = (t / blocks, t % blocks);
                let r0 = blk * Q_ROWS;
                let rows = Q_ROWS.min(s - r0);
                let (kt, vp) = &packed[if kb == b { i } else { i % h }];
                let qi = &q[qs.at(i, h) + r0 * qs.row..];
                scores.resize(rows * skv, 0.0);
                sums.clear();
                // SAFETY: `scores` holds rows × s_kv floats, written by this task alone.
                unsafe {
                    let c = (scores.as_mut_ptr(), skv);
                    packed_gemm::matmul_rows(pa, qi, (rows, d, qs.row), kt, c, false);
                }
                let dst = out_ptr;
                // SAFETY (both products): rows r0 .. r0 + rows of head i of `out` (d floats
                // each, `os.row` apart), written by this task alone; `out` outlives the
                // parallel loop.
                let c = unsafe { (dst.0.add(os.at(i, h) + r0 * os.row), os.row) };
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
                    let o = unsafe { std::slice::from_raw_parts_mut(c.0.add(r * c.1), d) };
                    for x in o {
                        *x *= inv;
                    }
                }
            },
        );
        // SAFETY: the tasks above wrote every (sample, head, query)'s d floats, all of `out`
        // (both products overwrite their C).
        unsafe { out.set_len(heads * s * d) };
        Ok((CpuStorage::F32(out), out_shape))
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
                    heads: h,
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

    /// Token-major operands (`[B, S, H·D]`, heads read in place) and keys/values shared by
    /// every sample (batch 1) give what the split layout `[B, H, S, D]` with the keys/values
    /// copied per sample gives, to the bit: the same products in the same order.
    #[test]
    fn token_major_and_shared_kv_match_split_heads() {
        use crate::model::testutil::max_abs_diff;
        let kernels = packed_gemm::kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        let dev = Device::Cpu;
        let (b, h, s, skv, d) = (3, 2, 70, 77, 40);
        let mut seed = 11u64;
        let mut t = |dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let q = t(&[b, h, s, d]);
        let (k1, v1) = (t(&[1, h, skv, d]), t(&[1, h, skv, d]));
        let tokens = |x: &Tensor| {
            let (xb, xh, xs, xd) = x.dims4().unwrap();
            x.transpose(1, 2)
                .unwrap()
                .reshape((xb, xs, xh * xd))
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let per_sample = |x: &Tensor| {
            x.broadcast_as((b, h, skv, d))
                .unwrap()
                .contiguous()
                .unwrap()
        };
        for kernel in kernels {
            let op = PackedAttention {
                scale: 0.3,
                kernel,
                heads: h,
            };
            let want = q
                .apply_op3_no_bwd(&per_sample(&k1), &per_sample(&v1), &op)
                .unwrap();
            // q token-major, prompt K/V split and shared.
            let got = tokens(&q).apply_op3_no_bwd(&k1, &v1, &op).unwrap();
            assert_eq!(got.dims(), &[b, s, h * d]);
            let diff = |x: &Tensor| max_abs_diff(x, &tokens(&want));
            assert_eq!(diff(&got), 0.0, "{kernel:?}: split K/V");
            // Everything token-major.
            let got = tokens(&q)
                .apply_op3_no_bwd(&tokens(&per_sample(&k1)), &tokens(&per_sample(&v1)), &op)
                .unwrap();
            assert_eq!(diff(&got), 0.0, "{kernel:?}: token-major K/V");
        }
    }
}
