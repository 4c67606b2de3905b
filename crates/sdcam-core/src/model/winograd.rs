//! 3×3, stride 1, padding 1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): each 2×2 block of output
//! pixels comes from a 4×4 input patch with 16 multiplications per (input, output) channel pair
//! instead of 36, i.e. 2.25× fewer multiply-adds than im2col + GEMM. This is the usual answer
//! for the 3×3 convolutions that dominate TAESD (64 channels at full image resolution) and the
//! high-resolution levels of the U-Net, where im2col + GEMM already runs at the machine's GEMM
//! speed and only fewer operations can make it faster (issue 14).
//!
//! Per call: the input is cut into 2×2-output tiles, whole rows of tiles at a time so that one
//! block's transformed input `V` (`[16, C, tiles]`) and products `M` (`[16, K, tiles]`) stay in
//! the core's cache; blocks run in parallel on rayon. For each block: input transform
//! `V = Bᵀ·d·B` (vectorised across the tiles of a row), 16 matrix products `M[ξ] = U[ξ]·V[ξ]`
//! (gemm, the filter transform `U = G·g·Gᵀ` computed once per convolution), output transform
//! `Y = Aᵀ·M·A` plus bias straight into the NCHW output.
//!
//! F(2×2, 3×3) only adds, subtracts and halves around the products, so in f32 it stays within
//! a few 1e-7 of the direct convolution relative to the output's scale (`conv.rs` tests: < 1e-5).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

use crate::model::conv::Epilogue;
use crate::model::packed_gemm::{self, PackedA, PackedB};
use crate::model::{cpu_f32, matmul_into, SendPtr};

/// Float budget of one block's `V` and `M` together (2 MiB: about one core's L2 on this
/// project's machines), which sets how many rows of tiles a block holds.
const BLOCK_FLOATS: usize = 512 << 10;

/// `U = G·g·Gᵀ` for every (output, input) channel pair: `[16, k, c]` from a `[k, c, 3, 3]`
/// kernel (row-major, contiguous). `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
pub(crate) fn transform_filter(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * k * c];
    for (kc, g) in w.chunks_exact(9).enumerate().take(k * c) {
        // t = G·g (4×3), then u = t·Gᵀ (4×4).
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for (i, row) in t.iter().enumerate() {
            let (a, b, cc) = (row[0], row[1], row[2]);
            let vals = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
            for (j, v) in vals.into_iter().enumerate() {
                u[(4 * i + j) * k * c + kc] = v;
            }
        }
    }
    u
}

/// The convolution as a candle op: input `[b, c, h, w]` (f32, contiguous), transformed filter
/// `[16, k, c]` from [`transform_filter`] → `[b, k, h, w]`, with `epilogue` applied.
pub(crate) struct Winograd<'a> {
    pub(crate) k: usize,
    pub(crate) epilogue: Epilogue<'a>,
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    k: usize,
    h: usize,
    w: usize,
    /// Tiles per row and rows of tiles.
    tw: usize,
    th: usize,
}

impl Winograd<'_> {
    fn run(&self, x: &[f32], dims: (usize, usize, usize, usize), u: &[f32]) -> Vec<f32> {
        let (c, k) = (dims.1, self.k);
        run_blocks(
            x,
            dims,
            k,
            1,
            self.epilogue,
            || (),
            |_, xi, v, m, nt| {
                // SAFETY: u[ξ] is k×c, v c×nt and m k×nt, as `run_blocks` hands them over.
                unsafe {
                    matmul_into((k, nt, c), m.as_mut_ptr(), nt, &u[xi * k * c..][..k * c], v)
                };
            },
        )
    }
}

/// The same convolution with the packed products of `model::packed_gemm` (bf16, or f32 on CPUs
/// with AVX-512 or AVX2: the kernel the filter transforms were packed for): input
/// `[b, c, h, w]` (f32, contiguous) → `[b, k, h, w]` f32 (after the epilogue), the 16 filter
/// transforms packed (`[k, c]` each); the transforms stay f32.
pub(crate) struct PackedWinograd<'a> {
    pub(crate) k: usize,
    pub(crate) u: std::sync::Arc<Vec<PackedA>>,
    pub(crate) epilogue: Epilogue<'a>,
}

impl candle_core::CustomOp1 for PackedWinograd<'_> {
    fn name(&self) -> &'static str {
        "sdcam-packed-winograd-conv3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "packed winograd conv")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let k = self.k;
        if self.u.len() != 16 || self.u.iter().any(|u| u.rows() != k || u.cols() != c) {
            candle_core::bail!(
                "packed winograd conv: the filter transform does not match the input"
            );
        }
        self.epilogue
            .check(k, b * k * h * w, "packed winograd conv")?;
        let out = run_blocks(
            x,
            (b, c, h, w),
            k,
            PACKED_MIN_BLOCK_TILES,
            self.epilogue,
            PackedB::default,
            |vb, xi, v, m, nt| {
                vb.repack_rows(self.u[xi].kernel(), v, (c, nt, nt), false);
                // SAFETY: m is k×nt, written by this block alone.
                unsafe { packed_gemm::matmul(&self.u[xi], vb, m.as_mut_ptr(), nt, false) };
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, k, h, w))))
    }
}

/// Fewest tiles per block on the packed path: each block reads all 16 packed `U[ξ]` once, and
/// the products' panels are 32 tiles wide.
const PACKED_MIN_BLOCK_TILES: usize = 64;

/// The convolution block by block (see the module docs), with `product(scratch, ξ, V[ξ], M[ξ],
/// nt)` computing `M[ξ] = U[ξ]·V[ξ]` for one block (`V[ξ]` `c × nt`, `M[ξ]` `k × nt`,
/// row-major; M is overwritten, not read), `scratch` the thread's own from `init`; blocks hold
/// at least `min_tiles` tiles (whole rows of tiles) where the image has them. Each output row
/// gets `epilogue` as it is written.
fn run_blocks<S>(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    k: usize,
    min_tiles: usize,
    epilogue: Epilogue,
    init: impl Fn() -> S + Sync + Send,
    product: impl Fn(&mut S, usize, &[f32], &mut [f32], usize) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let d = Dims {
        c,
        k,
        h,
        w,
        tw: w.div_ceil(2),
        th: h.div_ceil(2),
    };
    // Blocks small enough for the cache, and at least four per thread so that every core
    // gets work (each block's products run on one thread).
    let for_cache = BLOCK_FLOATS / (16 * (c + k) * d.tw);
    let for_threads = (b * d.th).div_ceil(4 * rayon::current_num_threads());
    let rows_per_block = for_cache
        .min(for_threads)
        .max(min_tiles.div_ceil(d.tw))
        .clamp(1, d.th);
    let blocks_per_image = d.th.div_ceil(rows_per_block);
    let mut out = vec![0f32; b * k * h * w];
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * blocks_per_image).into_par_iter().for_each_init(
        || {
            (
                Vec::<f32>::new(),
                Vec::<f32>::new(),
                Scratch::new(w),
                init(),
            )
        },
        |(v, m, scratch, state), blk| {
            let (bi, ri) = (blk / blocks_per_image, blk % blocks_per_image);
            let ty0 = ri * rows_per_block;
            let ty1 = (ty0 + rows_per_block).min(d.th);
            let nt = (ty1 - ty0) * d.tw;
            // The input transform writes all of V and the products all of M: grown, never
            // cleared (zeroing them per block cost TAESD about a tenth of its time).
            let v = grown(v, 16 * c * nt);
            let m = grown(m, 16 * k * nt);
            let image = &x[bi * c * h * w..][..c * h * w];
            input_transform(image, d, (ty0, ty1), v, scratch);
            for (xi, (vx, mx)) in v
                .chunks_exact(c * nt)
                .zip(m.chunks_exact_mut(k * nt))
                .enumerate()
            {
                product(state, xi, vx, mx, nt);
            }
            // SAFETY: `out` is `b·k·h·w` floats and outlives the parallel loop; this block
            // writes only output rows 2·ty0 .. min(2·ty1, h) of image `bi` (every channel),
            // which no other block writes.
            let dst = out_ptr; // the whole wrapper, not its field (Send/Sync)
            let image_out = unsafe { dst.0.add(bi * k * h * w) };
            let epilogue = epilogue.image(bi * k * h * w);
            output_transform(m, d, (ty0, ty1), image_out, epilogue, scratch);
        },
    );
    out
}

/// The first `n` floats of `buf`, grown to hold them (old contents kept, new ones zero).
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Per-thread rows of the transforms.
struct Scratch {
    /// Four zero-padded input rows (x = −1 … w + 2 at index x + 1), then the same rows after
    /// the row transform; `w + 4` each.
    d: [Vec<f32>; 4],
    r: [Vec<f32>; 4],
    /// Even and odd columns of one transformed row, `tw + 1` each.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// The output transform's row stage (`[8][tw]`) and its two output rows (`[2][2·tw]`).
    s: Vec<f32>,
    y: Vec<f32>,
}

impl Scratch {
    fn new(w: usize) -> Self {
        let n = w + 4;
        let tw = w.div_ceil(2);
        let row = || vec![0f32; n];
        Self {
            d: [row(), row(), row(), row()],
            r: [row(), row(), row(), row()],
            even: vec![0.0; tw + 1],
            odd: vec![0.0; tw + 1],
            s: vec![0.0; 8 * tw],
            y: vec![0.0; 4 * tw],
        }
    }
}

/// `out[i] = f(a[i], b[i])` (lengths: `out`'s), in a form the compiler vectorises.
#[inline(always)]
fn map2(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

/// `out[i] = f(a[i], b[i], c[i])`.
#[inline(always)]
fn map3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for (((o, &x), &y), &z) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(x, y, z);
    }
}

/// `V = Bᵀ·d·B` for tile rows `ty0..ty1` of one image into `v` (`[16, c, nt]`), with
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`. Rows first (whole
/// padded image rows), then columns (even/odd columns of those rows), both across the tiles.
fn input_transform(x: &[f32], d: Dims, (ty0, ty1): (usize, usize), v: &mut [f32], s: &mut Scratch) {
    let Dims { c, h, w, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ci in 0..c {
        let plane = &x[ci * h * w..][..h * w];
        for ty in ty0..ty1 {
            // Input rows 2ty − 1 … 2ty + 2, zero outside the image; column x at index x + 1.
            for (r, row) in s.d.iter_mut().enumerate() {
                let iy = (2 * ty + r) as isize - 1;
                if iy >= 0 && (iy as usize) < h {
                    row[1..1 + w].copy_from_slice(&plane[iy as usize * w..][..w]);
                    row[0] = 0.0;
                    row[1 + w..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
            }
            // Row transform (Bᵀ·d), element-wise over whole rows.
            let [d0, d1, d2, d3] = &s.d;
            let [r0, r1, r2, r3] = &mut s.r;
            map2(r0, d0, d2, |a, b| a - b);
            map2(r1, d1, d2, |a, b| a + b);
            map2(r2, d2, d1, |a, b| a - b);
            map2(r3, d1, d3, |a, b| a - b);
            // Column transform (·B) of each transformed row: tile tx covers padded columns
            // 2tx … 2tx + 3, i.e. even[tx], odd[tx], even[tx + 1], odd[tx + 1].
            let base = (ty - ty0) * tw;
            for (i, row) in s.r.iter().enumerate() {
                for ((e, o), pair) in s
                    .even
                    .iter_mut()
                    .zip(s.odd.iter_mut())
                    .zip(row.chunks_exact(2))
                {
                    *e = pair[0];
                    *o = pair[1];
                }
                let (e, o) = (&s.even[..], &s.odd[..]);
                let at = |j: usize| ((4 * i + j) * c + ci) * nt + base;
                map2(&mut v[at(0)..][..tw], e, &e[1..], |a, b| a - b);
                map2(&mut v[at(1)..][..tw], o, &e[1..], |a, b| a + b);
                map2(&mut v[at(2)..][..tw], &e[1..], o, |a, b| a - b);
                map2(&mut v[at(3)..][..tw], o, &o[1..], |a, b| a - b);
            }
        }
    }
}

/// `Y = Aᵀ·M·A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]` for tile rows `ty0..ty1` from `m`
/// (`[16, k, nt]`) into the image's output (`[k, h, w]`), cropping the last row/column of tiles
/// where h or w is odd. `out` points at the image's output; only the rows of these tile rows
/// are written, each through a slice of its own, and each gets `epilogue` (offsets within the
/// image) once written.
fn output_transform(
    m: &[f32],
    d: Dims,
    (ty0, ty1): (usize, usize),
    out: *mut f32,
    epilogue: Epilogue,
    s: &mut Scratch,
) {
    let Dims { k, h, w, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ki in 0..k {
        for ty in ty0..ty1 {
            let base = (ty - ty0) * tw;
            let ms = |xi: usize| &m[(xi * k + ki) * nt + base..][..tw];
            // Rows: s0_j = m0j + m1j + m2j, s1_j = m1j − m2j − m3j.
            let (s0, s1) = s.s.split_at_mut(4 * tw);
            for j in 0..4 {
                map3(
                    &mut s0[j * tw..][..tw],
                    ms(j),
                    ms(4 + j),
                    ms(8 + j),
                    |a, b, c| a + b + c,
                );
                map3(
                    &mut s1[j * tw..][..tw],
                    ms(4 + j),
                    ms(8 + j),
                    ms(12 + j),
                    |b, c, e| b - c - e,
                );
            }
            // Columns, the same, giving even and odd output columns of the two output rows.
            let (ye, yo) = s.y.split_at_mut(2 * tw);
            for (half, sr) in [&*s0, &*s1].into_iter().enumerate() {
                let col = |j: usize| &sr[j * tw..][..tw];
                map3(
                    &mut ye[half * tw..][..tw],
                    col(0),
                    col(1),
                    col(2),
                    |a, b, c| a + b + c,
                );
                map3(
                    &mut yo[half * tw..][..tw],
                    col(1),
                    col(2),
                    col(3),
                    |b, c, e| b - c - e,
                );
            }
            for half in 0..2 {
                let oy = 2 * ty + half;
                if oy >= h {
                    break;
                }
                // SAFETY: row `oy` of channel `ki` lies inside the image's `k·h·w` floats
                // (`oy < h`), and the caller gives this block these rows alone.
                let row = unsafe { std::slice::from_raw_parts_mut(out.add((ki * h + oy) * w), w) };
                let (e, o) = (&ye[half * tw..][..tw], &yo[half * tw..][..tw]);
                for ((pair, &a), &b) in row.chunks_exact_mut(2).zip(e).zip(o) {
                    pair[0] = a;
                    pair[1] = b;
                }
                if w % 2 == 1 {
                    row[w - 1] = e[tw - 1];
                }
                epilogue.apply(ki, (ki * h + oy) * w, row);
            }
        }
    }
}

impl CustomOp2 for Winograd<'_> {
    fn name(&self) -> &'static str {
        "sdcam-winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "winograd conv")?;
        let u = cpu_f32(s2, l2, "winograd conv")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (sixteen, k, uc) = l2.shape().dims3()?;
        if sixteen != 16 || k != self.k || uc != c {
            candle_core::bail!("winograd conv: the filter transform does not match the input");
        }
        self.epilogue.check(k, b * k * h * w, "winograd conv")?;
        let out = self.run(x, (b, c, h, w), u);
        Ok((CpuStorage::F32(out), Shape::from((b, k, h, w))))
    }
}
