//! 3×3 convolutions (stride 1, padding 1) as an implicit GEMM for `model.dtype = "bf16"` on the
//! CPU, as oneDNN runs them: on AMX tiles ([`packed_gemm::Kernel::Amx`]) or with `vdpbf16ps` on
//! zmm registers ([`packed_gemm::Kernel::Avx512Bf16`]).
//!
//! The input image is converted once to bf16 channel pairs, zero-padded by one pixel:
//! `[h + 2][pairs][w + 2]`, one `u32` (two channels) per pixel, `pairs` = `c_in/2` rounded up
//! (to 16 for AMX). For an output row and a run of output pixels, kernel tap `(ky, kx)`'s pairs
//! of input channels × pixels are then read straight from that array (row stride `w + 2`
//! pairs: one tile load on AMX, one vector load per pair and 16 pixels on AVX-512), with no
//! im2col matrix and no Winograd transform: the tap's weight `[c_out, c_in]` (packed once, like
//! a product's A) times those pixels, summed over the nine taps in registers. Each block of
//! output (channels × pixels) is stored straight into the NCHW output, then the epilogue (bias,
//! residual, ReLU) runs over its rows.
//!
//! AMX takes every such conv whose output channels are a multiple of 32 and width a multiple of
//! 16 (the tile shapes). On AVX-512 the direct conv does 2.25× the multiply-adds of
//! `model::winograd`'s F(2×2, 3×3), but skips its transforms, which cost as much as the products
//! where the channels are few: it takes the convs with at most [`AVX512_MAX_CHANNELS`] input
//! channels (TAESD's 64-channel convs at full resolution), Winograd the U-Net's wider ones.
//! Other convs keep `model::conv`'s paths. Hand-written like `model::packed_gemm`, for the same
//! reason (no crate has bf16 kernels for these layouts), with the same instructions.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, Layout, Result, Shape};

use crate::model::conv::Epilogue;
use crate::model::packed_gemm::{self, Kernel, PackedA, KT, MR, MR_AMX};
use crate::model::{cpu_f32, SendPtr};

/// Pixels per run of [`row_block_avx512`] (two vectors of 16: 16 accumulators; three, with 24,
/// measured slower).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const RUN: usize = 32;

/// Most input channels of a conv that [`Kernel::Avx512Bf16`] runs directly (more go to Winograd).
pub(crate) const AVX512_MAX_CHANNELS: usize = 128;

/// Whether a 3×3, stride-1, padding-1 conv from `c_in` to `c_out` channels over images `w`
/// wide runs here with `kernel`'s products: on AMX where the shapes fit its tiles, on AVX-512
/// BF16 where the input has few channels (see the module docs), not in f32; never with
/// `SDCAM_DIRECT_CONV=0` (read once; for comparisons: Winograd or im2col then take these
/// convs).
pub(crate) fn applies(kernel: Kernel, c_in: usize, c_out: usize, w: usize) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on =
        *ON.get_or_init(|| std::env::var("SDCAM_DIRECT_CONV").map_or(true, |v| v.trim() != "0"));
    if !on || w == 0 || c_out == 0 || c_in == 0 {
        return false;
    }
    match kernel {
        Kernel::Amx => c_out.is_multiple_of(MR_AMX) && w.is_multiple_of(16),
        Kernel::Avx512Bf16 => packed_gemm::bf16_available() && c_in <= AVX512_MAX_CHANNELS,
        Kernel::F32 => false,
    }
}

/// The nine taps of a 3×3 weight `[c_out, c_in·9]` (row-major, as `Conv2d` holds it), each
/// `[c_out, c_in]` packed for `kernel` (one that [`applies`]), tap `ky·3 + kx`.
pub(crate) fn pack_taps(
    kernel: Kernel,
    weight2d: &[f32],
    c_out: usize,
    c_in: usize,
) -> Vec<PackedA> {
    (0..9)
        .map(|t| {
            let tap: Vec<f32> = (0..c_out * c_in)
                .map(|i| weight2d[(i / c_in) * c_in * 9 + (i % c_in) * 9 + t])
                .collect();
            PackedA::from_rows(kernel, &tap, (c_out, c_in, c_in), true)
        })
        .collect()
}

/// The convolution as a candle op: input `[b, c_in, h, w]` (f32, contiguous) → output
/// `[b, c_out, h, w]` f32 after the epilogue.
pub(crate) struct DirectConv3x3<'a> {
    /// [`pack_taps`] of the weight.
    pub(crate) taps: Arc<Vec<PackedA>>,
    pub(crate) epilogue: Epilogue<'a>,
}

impl candle_core::CustomOp1 for DirectConv3x3<'_> {
    fn name(&self) -> &'static str {
        "sdcam-direct-conv3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "direct conv")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let k = self.taps.first().map_or(0, PackedA::rows);
        let kernel = self.taps.first().map_or(Kernel::F32, PackedA::kernel);
        let (rows_per_block, tiles): (usize, Vec<(&[u32], usize)>) = match kernel {
            Kernel::Amx => (
                MR_AMX,
                self.taps.iter().filter_map(PackedA::amx_tiles).collect(),
            ),
            Kernel::Avx512Bf16 => (
                MR,
                self.taps.iter().filter_map(PackedA::avx512_rows).collect(),
            ),
            // Never packed for the direct conv (`applies`): the check below fails.
            Kernel::F32 => (MR, Vec::new()),
        };
        if tiles.len() != 9
            || self.taps.iter().any(|t| t.rows() != k || t.cols() != c)
            || !applies(kernel, c, k, w)
        {
            candle_core::bail!("direct conv: the packed taps do not match the input");
        }
        let n = h * w;
        self.epilogue.check(k, b * k * n, "direct conv")?;
        let ks = tiles[0].1;
        let w2 = w + 2;
        let blocks = k.div_ceil(rows_per_block);
        // Tasks (channel block, output row): row-major where the taps are larger than an
        // image's converted input (the U-Net: each thread keeps its channel block's taps in
        // cache across rows), else row by row with every channel block (TAESD: the few input
        // rows a row needs stay in cache for all blocks).
        let rows_inner = 9 * k * ks >= (h + 2) * ks * w2;
        let len = b * k * n;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let mut xp = Vec::new();
        for bi in 0..b {
            convert_image(&x[bi * c * n..][..c * n], (c, h, w), ks, &mut xp);
            // SAFETY: image bi of `out`'s allocation, written below by disjoint (channel block,
            // row) tasks.
            let dst = SendPtr(unsafe { out.as_mut_ptr().add(bi * k * n) });
            let epilogue = self.epilogue.image(bi * k * n);
            let xp = &xp[..];
            let tiles = &tiles[..];
            let task = move |t: usize| {
                let (blk, oy) = if rows_inner {
                    (t / h, t % h)
                } else {
                    (t % blocks, t / blocks)
                };
                let io = blk * rows_per_block;
                let r = rows_per_block.min(k - io);
                let dst = dst;
                // SAFETY: `xp` holds (h + 2)·ks·(w + 2) pairs, the taps k rows of ks pairs
                // (AMX: padded to whole blocks of rows); this task writes every pixel of channels
                // io .. io + r × output row oy of the image, which no other task writes.
                unsafe {
                    match kernel {
                        Kernel::Amx => row_block(tiles, xp, (ks, w2, h, w), (io, oy), dst.0),
                        Kernel::Avx512Bf16 => {
                            row_block_avx512(tiles, xp, (ks, w2, h, w), (io, oy, r), dst.0)
                        }
                        Kernel::F32 => unreachable!("checked by `applies`"),
                    }
                };
                for ch in io..io + r {
                    let at = ch * n + oy * w;
                    // SAFETY: this task's row of channel ch, written just now.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), w) };
                    epilogue.apply(ch, at, row);
                }
            };
            use rayon::prelude::*;
            (0..blocks * h).into_par_iter().for_each(task);
        }
        // SAFETY: the tasks wrote all b·k·h·w floats (every channel block, row and pixel).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((b, k, h, w))))
    }
}

/// One image `[c, h, w]` into `xp` as `[h + 2][ks][w + 2]` channel pairs in bf16, zero outside
/// the image and past its channels (see the module docs).
fn convert_image(x: &[f32], (c, h, w): (usize, usize, usize), ks: usize, xp: &mut Vec<u32>) {
    use rayon::prelude::*;
    let w2 = w + 2;
    let n = h * w;
    let kp = c.div_ceil(2);
    // Every element is written below (pairs or zeros), so the buffer is not cleared first.
    xp.resize((h + 2) * ks * w2, 0);
    xp.par_chunks_mut(ks * w2).enumerate().for_each(|(y, row)| {
        if y == 0 || y == h + 1 {
            row.fill(0);
            return;
        }
        let y = y - 1;
        for (p, pr) in row.chunks_exact_mut(w2).enumerate() {
            if p >= kp {
                pr.fill(0);
                continue;
            }
            let r0 = &x[2 * p * n + y * w..][..w];
            let r1 = (2 * p + 1 < c).then(|| &x[(2 * p + 1) * n + y * w..][..w]);
            pr[0] = 0;
            pr[w + 1] = 0;
            packed_gemm::interleave_pairs(r0, r1, &mut pr[1..=w]);
        }
    });
}

/// Output row `oy`, channels `io .. io + 32`, all of its pixels in blocks of 32 (or 16 at the
/// end): per block, tiles 0–3 sum the nine taps × `ks / KT` steps (tiles 4–5 the tap's two
/// 16-row slices of weight, 6–7 two 16-pixel tiles of the converted input), then are stored
/// into the NCHW output at `dst` (row stride `h·w` floats).
///
/// # Safety
/// As the caller states: `xp` and the taps hold what the shapes say, `dst` the whole image's
/// output, and the process holds the tile permission ([`Kernel::Amx`]).
#[cfg(target_arch = "x86_64")]
unsafe fn row_block(
    taps: &[(&[u32], usize)],
    xp: &[u32],
    (ks, w2, h, w): (usize, usize, usize, usize),
    (io, oy): (usize, usize),
    dst: *mut f32,
) {
    use std::arch::asm;
    let ldb = w2 * 4;
    let ldc = h * w * 4;
    // SAFETY (whole body): every load reads 16 rows of 64 bytes inside the taps' tiles (rows
    // io .. io + 32, steps below ks) or inside `xp` (rows oy .. oy + 2 of the padded image,
    // pairs below ks, pixels x0 + kx .. + 16 ≤ w + 2); every store writes 16 channels × 16
    // pixels of row oy inside the image's output.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &packed_gemm::TILES_16X64, options(nostack, readonly));
        let mut x0 = 0;
        while x0 < w {
            let two = x0 + 32 <= w;
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for (t, &(a, _)) in taps.iter().enumerate() {
                let (ky, kx) = (t / 3, t % 3);
                let ap0 = a.as_ptr().add(io * ks);
                let ap1 = ap0.add(16 * ks);
                let bp = xp.as_ptr().add((oy + ky) * ks * w2 + x0 + kx);
                let mut s = 0;
                while s < ks {
                    let b0 = bp.add(s * w2);
                    if two {
                        asm!(
                            "tileloadd tmm4, [{a0} + {lda}*1]",
                            "tileloadd tmm6, [{b0} + {ldb}*1]",
                            "tileloadd tmm7, [{b1} + {ldb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm5, [{a1} + {lda}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) ap0.add(s * 16),
                            a1 = in(reg) ap1.add(s * 16),
                            b0 = in(reg) b0,
                            b1 = in(reg) b0.add(16),
                            lda = in(reg) 64usize,
                            ldb = in(reg) ldb,
                            options(nostack, readonly)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {lda}*1]",
                            "tileloadd tmm6, [{b0} + {ldb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm5, [{a1} + {lda}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            a0 = in(reg) ap0.add(s * 16),
                            a1 = in(reg) ap1.add(s * 16),
                            b0 = in(reg) b0,
                            lda = in(reg) 64usize,
                            ldb = in(reg) ldb,
                            options(nostack, readonly)
                        );
                    }
                    s += KT;
                }
            }
            let c0 = dst.add(io * h * w + oy * w + x0);
            let c2 = c0.byte_add(16 * ldc);
            if two {
                asm!(
                    "tilestored [{c0} + {ldc}*1], tmm0",
                    "tilestored [{c1} + {ldc}*1], tmm1",
                    "tilestored [{c2} + {ldc}*1], tmm2",
                    "tilestored [{c3} + {ldc}*1], tmm3",
                    c0 = in(reg) c0,
                    c1 = in(reg) c0.add(16),
                    c2 = in(reg) c2,
                    c3 = in(reg) c2.add(16),
                    ldc = in(reg) ldc,
                    options(nostack)
                );
                x0 += 32;
            } else {
                asm!(
                    "tilestored [{c0} + {ldc}*1], tmm0",
                    "tilestored [{c2} + {ldc}*1], tmm2",
                    c0 = in(reg) c0,
                    c2 = in(reg) c2,
                    ldc = in(reg) ldc,
                    options(nostack)
                );
                x0 += 16;
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Output row `oy`, channels `io .. io + r` (`r` ≤ [`MR`]), all of its pixels in runs of 32
/// (the last one shorter): per run, the [`MR`] × 32 block of output in 16 zmm registers sums
/// the nine taps × `kp` pairs (per pair: the tap's [`MR`] weights broadcast, two vectors of 16
/// pixels of the converted input), then is stored into the NCHW output at `dst` (row stride
/// `h·w` floats).
///
/// # Safety
/// As the caller states: `xp` and the taps hold what the shapes say (taps packed for
/// [`Kernel::Avx512Bf16`]), `dst` the whole image's output, and the CPU has AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn row_block_avx512(
    taps: &[(&[u32], usize)],
    xp: &[u32],
    (ks, w2, h, w): (usize, usize, usize, usize),
    (io, oy, r): (usize, usize, usize),
    dst: *mut f32,
) {
    let ldc = h * w;
    let mut x0 = 0;
    while x0 < w {
        let cols = (w - x0).min(RUN);
        // SAFETY: as the caller states; the run x0 .. x0 + cols lies inside row oy.
        unsafe {
            let c = dst.add(io * ldc + oy * w + x0);
            if cols > 16 {
                run_avx512::<2>(taps, xp, (ks, w2), (io, oy, x0), c, ldc, r, cols);
            } else {
                run_avx512::<1>(taps, xp, (ks, w2), (io, oy, x0), c, ldc, r, cols);
            }
        }
        x0 += RUN;
    }
}

/// One run of `cols` pixels (`V` vectors of 16) of [`row_block_avx512`], stored at `c`.
///
/// # Safety
/// As [`row_block_avx512`]'s; `V` = ⌈`cols`/16⌉ and the run inside the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_avx512<const V: usize>(
    taps: &[(&[u32], usize)],
    xp: &[u32],
    (ks, w2): (usize, usize),
    (io, oy, x0): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    r: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(
        cols.div_ceil(16) == V,
        "one vector per 16 pixels of the run"
    );
    let m: [u16; V] =
        std::array::from_fn(|v| packed_gemm::first_lanes(cols.saturating_sub(16 * v)));
    // SAFETY (whole body): tap t holds rows io .. io + r of kp pairs each (r ≥ 1); the masked
    // loads read pixels x0 + kx .. x0 + kx + cols ≤ w + 2 of padded rows oy + ky < h + 2, pairs
    // below kp ≤ ks; the masked stores write r rows × cols pixels of the output.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for (t, &(a, kp)) in taps.iter().enumerate() {
            let (ky, kx) = (t / 3, t % 3);
            // Output channel io + i's pairs of this tap (rows past r repeat the last).
            let rows: [*const u32; MR] =
                std::array::from_fn(|i| a.as_ptr().add((io + i.min(r - 1)) * kp));
            let bp = xp.as_ptr().add((oy + ky) * ks * w2 + x0 + kx);
            for p in 0..kp {
                let b = bp.add(p * w2);
                let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi32(
                        m[v],
                        b.add(16 * v).cast(),
                    ));
                }
                for (row, &ai) in acc.iter_mut().zip(&rows) {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ai.add(p) as i32));
                    for (acc, &bv) in row.iter_mut().zip(&bv) {
                        *acc = _mm512_dpbf16_ps(*acc, av, bv);
                    }
                }
            }
        }
        // V = ⌈cols / 16⌉ (the caller's choice), so no mask is empty and every vector's
        // first pixel lies inside the run.
        for (i, row) in acc.iter().enumerate().take(r) {
            let d = c.add(i * ldc);
            for (v, &x) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(d.add(16 * v), m[v], x);
            }
        }
    }
}

/// Unreachable elsewhere: [`applies`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_block_avx512(
    _: &[(&[u32], usize)],
    _: &[u32],
    _: (usize, usize, usize, usize),
    _: (usize, usize, usize),
    _: *mut f32,
) {
    unreachable!("AVX-512 is x86-64 only")
}

/// Unreachable elsewhere: [`applies`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_block(
    _: &[(&[u32], usize)],
    _: &[u32],
    _: (usize, usize, usize, usize),
    _: (usize, usize),
    _: *mut f32,
) {
    unreachable!("AMX is x86-64 only")
}
