//! 3×3, stride 1, padding 1 convolution by Winograd's minimal filtering (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015), in two sizes ([`Tile`]):
//! - F(2×2, 3×3): each 2×2 block of output pixels comes from a 4×4 input patch with 16
//!   multiplications per (input, output) channel pair instead of 36 (2.25× fewer multiply-adds
//!   than im2col + GEMM). The transforms only add, subtract and halve, so in f32 it stays within
//!   a few 1e-7 of the direct convolution relative to the output's scale.
//! - F(4×4, 3×3): each 4×4 block from a 6×6 patch with 36 multiplications instead of 144 (4×
//!   fewer), at the price of larger transforms (coefficients up to 8 and 1/24) and so more
//!   rounding: a few 1e-6 in f32 (the filter transform is made in f64), still far inside the
//!   goldens' tolerances; used only with the f32 packed products (`conv.rs` chooses), never in
//!   bf16, whose 8-bit mantissa the larger coefficients would amplify.
//!
//! This is the usual answer for the 3×3 convolutions that dominate TAESD (64 channels at full
//! image resolution) and the high-resolution levels of the U-Net, where im2col + GEMM already
//! runs at the machine's GEMM speed and only fewer operations can make it faster (issue 14).
//!
//! Per call: the input is cut into m×m-output tiles, whole rows of tiles at a time so that one
//! block's transformed input `V` (`[n², C, tiles]`, n = m + 2) and products `M` (`[n², K,
//! tiles]`) stay in the core's cache as far as they can; blocks run in parallel on rayon. For
//! each block: input transform `V = Bᵀ·d·B` (vectorised across the tiles of a row), n² matrix
//! products `M[ξ] = U[ξ]·V[ξ]` (the filter transform `U = G·g·Gᵀ` computed once per
//! convolution), output transform `Y = Aᵀ·M·A` plus the epilogue straight into the NCHW
//! output. `conv.rs` tests both sizes against candle's conv2d.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

use crate::model::conv::Epilogue;
use crate::model::packed_gemm::{self, PackedA, PackedB};
use crate::model::{cpu_f32, matmul_into, SendPtr};

/// Float budget of one block's `V` and `M` together (2 MiB: about one core's L2 on this
/// project's machines), which sets how many rows of tiles a block holds.
const BLOCK_FLOATS: usize = 512 << 10;

/// The size of Winograd's transform: F(m×m, 3×3), m output pixels a side from an n×n input
/// patch, n = m + 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2×2, 3×3): 16 products.
    F2,
    /// F(4×4, 3×3): 36 products.
    F4,
}

impl Tile {
    /// Output pixels per tile side (m).
    pub(crate) fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Input patch side (n = m + 2).
    fn n(self) -> usize {
        self.m() + 2
    }

    /// Matrix products per call (n²): the filter transform's `U[ξ]`, ξ < n².
    pub(crate) fn products(self) -> usize {
        self.n() * self.n()
    }

    /// Tiles of an `h × w` output.
    pub(crate) fn tiles(self, h: usize, w: usize) -> usize {
        h.div_ceil(self.m()) * w.div_ceil(self.m())
    }
}

/// `U = G·g·Gᵀ` for every (output, input) channel pair: `[n², k, c]` from a `[k, c, 3, 3]`
/// kernel (row-major, contiguous). F(2×2): `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`;
/// F(4×4): `G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙],
/// [0, 0, 1]]` (Lavin & Gray, section 4), computed in f64 and rounded once.
pub(crate) fn transform_filter(w: &[f32], k: usize, c: usize, tile: Tile) -> Vec<f32> {
    match tile {
        Tile::F2 => transform_filter_f2(w, k, c),
        Tile::F4 => transform_filter_f4(w, k, c),
    }
}

fn transform_filter_f2(w: &[f32], k: usize, c: usize) -> Vec<f32> {
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

/// `G·(g0, g1, g2)ᵀ` for F(4×4, 3×3).
fn g4(g0: f64, g1: f64, g2: f64) -> [f64; 6] {
    [
        g0 / 4.0,
        -(g0 + g1 + g2) / 6.0,
        -(g0 - g1 + g2) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    ]
}

fn transform_filter_f4(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 36 * k * c];
    for (kc, g) in w.chunks_exact(9).enumerate().take(k * c) {
        // t = G·g (6×3, column j from g's column j), then u = t·Gᵀ (6×6).
        let cols: [[f64; 6]; 3] =
            std::array::from_fn(|j| g4(f64::from(g[j]), f64::from(g[3 + j]), f64::from(g[6 + j])));
        for i in 0..6 {
            let row = g4(cols[0][i], cols[1][i], cols[2][i]);
            for (j, v) in row.into_iter().enumerate() {
                u[(6 * i + j) * k * c + kc] = v as f32;
            }
        }
    }
    u
}

/// The convolution as a candle op with candle's products (F(2×2, 3×3) only): input
/// `[b, c, h, w]` (f32, contiguous), transformed filter `[16, k, c]` from [`transform_filter`]
/// → `[b, k, h, w]`, with `epilogue` applied.
pub(crate) struct Winograd<'a> {
    pub(crate) k: usize,
    pub(crate) epilogue: Epilogue<'a>,
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    tile: Tile,
    c: usize,
    k: usize,
    h: usize,
    w: usize,
    /// Tiles per row and rows of tiles.
    tw: usize,
    th: usize,
}

impl Dims {
    /// One call's shapes: `c → k` channels, an `h × w` image, tiles of `tile`.
    fn new(tile: Tile, (c, k, h, w): (usize, usize, usize, usize)) -> Self {
        Self {
            tile,
            c,
            k,
            h,
            w,
            tw: w.div_ceil(tile.m()),
            th: h.div_ceil(tile.m()),
        }
    }
}

impl Winograd<'_> {
    fn run(&self, x: &[f32], dims: (usize, usize, usize, usize), u: &[f32]) -> Vec<f32> {
        let (c, k) = (dims.1, self.k);
        run_blocks(
            x,
            dims,
            k,
            (Tile::F2, 1),
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

/// The filter transforms of a 3×3 conv's weight `w` (`[k, c, 3, 3]` row-major, f32) packed for
/// `kernel`: `tile.products()` operands `[k, c]`, the `u` of a [`PackedWinograd`] (packing on
/// rayon's pool when `parallel`).
///
/// # Panics
/// `w` is shorter than `k·c·9`.
pub(crate) fn pack_filter_transforms(
    kernel: packed_gemm::Kernel,
    w: &[f32],
    k: usize,
    c: usize,
    tile: Tile,
    parallel: bool,
) -> std::sync::Arc<Vec<PackedA>> {
    std::sync::Arc::new(
        transform_filter(w, k, c, tile)
            .chunks_exact(k * c)
            .map(|ux| PackedA::from_rows(kernel, ux, (k, c, c), parallel))
            .collect(),
    )
}

/// The same convolution with the packed products of `model::packed_gemm` (bf16, or f32 on CPUs
/// with AVX-512 or AVX2: the kernel the filter transforms were packed for): input
/// `[b, c, h, w]` (f32, contiguous) → `[b, k, h, w]` f32 (after the epilogue), the
/// `tile.products()` filter transforms packed (`[k, c]` each); the transforms stay f32.
pub(crate) struct PackedWinograd<'a> {
    pub(crate) k: usize,
    pub(crate) tile: Tile,
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
        if self.u.len() != self.tile.products()
            || self.u.iter().any(|u| u.rows() != k || u.cols() != c)
        {
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
            (self.tile, PACKED_MIN_BLOCK_TILES),
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

/// Fewest tiles per block on the packed path: each block reads all the packed `U[ξ]` once, and
/// the products' panels are 32 tiles wide.
const PACKED_MIN_BLOCK_TILES: usize = 64;

/// The convolution block by block (see the module docs) with tiles of `tile`, with
/// `product(scratch, ξ, V[ξ], M[ξ], nt)` computing `M[ξ] = U[ξ]·V[ξ]` for one block (`V[ξ]`
/// `c × nt`, `M[ξ]` `k × nt`, row-major; M is overwritten, not read), `scratch` the thread's
/// own from `init`; blocks hold at least `min_tiles` tiles (whole rows of tiles) where the
/// image has them. Each output row gets `epilogue` as it is written.
fn run_blocks<S>(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    k: usize,
    (tile, min_tiles): (Tile, usize),
    epilogue: Epilogue,
    init: impl Fn() -> S + Sync + Send,
    product: impl Fn(&mut S, usize, &[f32], &mut [f32], usize) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let d = Dims::new(tile, (c, k, h, w));
    let np = tile.products();
    let (input, output) = transforms(tile);
    // Blocks small enough for the cache and at least four per thread so that every core
    // gets work (each block's products run on one thread), but not narrower than `min_tiles`
    // unless that would leave a thread idle (one F(4×4) block held all of a 32×32 image).
    let threads = rayon::current_num_threads();
    let for_cache = BLOCK_FLOATS / (np * (c + k) * d.tw);
    let for_threads = (b * d.th).div_ceil(4 * threads);
    let rows_per_block = for_cache
        .min(for_threads)
        .max(min_tiles.div_ceil(d.tw))
        .min((b * d.th).div_ceil(threads))
        .clamp(1, d.th);
    let blocks_per_image = d.th.div_ceil(rows_per_block);
    // Not zeroed: the blocks write every float of it ([`write_rows`]). A zeroed allocation
    // was a pass of its own over the whole output on the calling thread while the others
    // waited (TAESD's 64 MB outputs at 512²: 4 % of its samples in `memset`).
    let len = b * k * h * w;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * blocks_per_image).into_par_iter().for_each_init(
        || {
            (
                Vec::<f32>::new(),
                Vec::<f32>::new(),
                Scratch::new(tile, w),
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
            let v = grown(v, np * c * nt);
            let m = grown(m, np * k * nt);
            let image = &x[bi * c * h * w..][..c * h * w];
            // SAFETY: `transforms` picked copies this CPU runs.
            unsafe { input(image, d, (ty0, ty1), v, scratch) };
            for (xi, (vx, mx)) in v
                .chunks_exact(c * nt)
                .zip(m.chunks_exact_mut(k * nt))
                .enumerate()
            {
                product(state, xi, vx, mx, nt);
            }
            // SAFETY: `out` is `b·k·h·w` floats and outlives the parallel loop; this block
            // writes only output rows m·ty0 .. min(m·ty1, h) of image `bi` (every channel),
            // which no other block writes.
            let dst = out_ptr; // the whole wrapper, not its field (Send/Sync)
            let image_out = unsafe { dst.0.add(bi * k * h * w) };
            let epilogue = epilogue.image(bi * k * h * w);
            // SAFETY: as above; `image_out` as the comment above says.
            unsafe { output(m, d, (ty0, ty1), image_out, epilogue, scratch) };
        },
    );
    // SAFETY: the blocks cover the tile rows 0..th of every image, and the output transform
    // of a block writes all `w` floats of each of its output rows (m·ty0 .. min(m·ty1, h))
    // of every channel (`write_rows`), so all `len` floats (capacity `len`) are written.
    unsafe { out.set_len(len) };
    out
}

/// An input transform: `(image, dims, tile rows, V, scratch)`.
type InputTransform = unsafe fn(&[f32], Dims, (usize, usize), &mut [f32], &mut Scratch);
/// An output transform: `(M, dims, tile rows, image output, epilogue, scratch)`.
type OutputTransform = unsafe fn(&[f32], Dims, (usize, usize), *mut f32, Epilogue, &mut Scratch);

/// The transforms of `tile` compiled for the widest vectors this CPU has (AVX-512, AVX2 + FMA,
/// or the baseline's SSE2, which the rest of the crate is built for: 4 lanes, where the
/// transforms took a third of TAESD's time against the products' quarter).
fn transforms(tile: Tile) -> (InputTransform, OutputTransform) {
    transforms_here(tile)[0]
}

/// Every copy of `tile`'s transforms this CPU runs, widest first (the last is the portable one).
fn transforms_here(tile: Tile) -> Vec<(InputTransform, OutputTransform)> {
    let mut copies: Vec<(InputTransform, OutputTransform)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            copies.push(match tile {
                Tile::F2 => (isa_avx512::input::<false>, isa_avx512::output::<false>),
                Tile::F4 => (isa_avx512::input::<true>, isa_avx512::output::<true>),
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            copies.push(match tile {
                Tile::F2 => (isa_avx2::input::<false>, isa_avx2::output::<false>),
                Tile::F4 => (isa_avx2::input::<true>, isa_avx2::output::<true>),
            });
        }
    }
    copies.push(match tile {
        Tile::F2 => (input_transform_f2, output_transform_f2),
        Tile::F4 => (input_transform_f4, output_transform_f4),
    });
    copies
}

/// A module of the transforms compiled with `$features` (callers check the CPU has them);
/// `F4` picks F(4×4, 3×3) over F(2×2, 3×3).
macro_rules! transforms_compiled_for {
    ($module:ident, $features:literal) => {
        mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            pub(super) unsafe fn input<const F4: bool>(
                x: &[f32],
                d: Dims,
                rows: (usize, usize),
                v: &mut [f32],
                s: &mut Scratch,
            ) {
                if F4 {
                    input_transform_f4(x, d, rows, v, s)
                } else {
                    input_transform_f2(x, d, rows, v, s)
                }
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn output<const F4: bool>(
                m: &[f32],
                d: Dims,
                rows: (usize, usize),
                out: *mut f32,
                e: Epilogue,
                s: &mut Scratch,
            ) {
                if F4 {
                    output_transform_f4(m, d, rows, out, e, s)
                } else {
                    output_transform_f2(m, d, rows, out, e, s)
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
transforms_compiled_for!(isa_avx2, "avx2,fma");
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
transforms_compiled_for!(isa_avx512, "avx512f");

/// The first `n` floats of `buf`, grown to hold them (old contents kept, new ones zero).
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Per-thread rows of the transforms (F(2×2) uses the first 4 of `d` and `r`, the first 2 of
/// `phase`).
struct Scratch {
    /// n input rows, column x at index x + 1 and zero outside the image (x = −1, x ≥ w), then
    /// the same rows after the row transform; `m·(tw + 1)` (≥ w + 2) each.
    d: [Vec<f32>; 6],
    r: [Vec<f32>; 6],
    /// Columns x ≡ j (mod m) of one transformed row (`phase[j][tx]` = column m·tx + j),
    /// `tw + 1` each.
    phase: [Vec<f32>; 4],
    /// The output transform's row stage (F(2×2): `[2][4][tw]`, F(4×4): `[6][4][tw]`) and its m
    /// output rows (`[m][m][tw]`: row, column mod m, tile).
    s: Vec<f32>,
    y: Vec<f32>,
}

impl Scratch {
    fn new(tile: Tile, w: usize) -> Self {
        let (m, n) = (tile.m(), tile.n());
        let tw = w.div_ceil(m);
        let row = || vec![0f32; m * (tw + 1)];
        Self {
            d: std::array::from_fn(|_| row()),
            r: std::array::from_fn(|_| row()),
            phase: std::array::from_fn(|_| vec![0.0; tw + 1]),
            s: vec![0.0; m * n * tw],
            y: vec![0.0; m * m * tw],
        }
    }

    /// Input rows `first … first + n − 1` of `plane` (`h × w`) into `d`, zero outside the
    /// image; column x at index x + 1.
    fn load_rows(&mut self, plane: &[f32], (h, w): (usize, usize), first: isize, n: usize) {
        for (r, row) in self.d.iter_mut().take(n).enumerate() {
            let iy = first + r as isize;
            if iy >= 0 && (iy as usize) < h {
                row[1..1 + w].copy_from_slice(&plane[iy as usize * w..][..w]);
                row[0] = 0.0;
                row[1 + w..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
    }

    /// Splits transformed row `i` into its M phases (`phase[j][tx]` = `r[i][M·tx + j]`).
    fn split_phases<const M: usize>(&mut self, i: usize) {
        for (t, group) in self.r[i].chunks_exact(M).enumerate() {
            for (j, &x) in group.iter().enumerate() {
                self.phase[j][t] = x;
            }
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

/// Six disjoint `len`-long slices of `v`, the i-th starting at `first + i·stride` (`stride ≥
/// len`; panics where `v` is too short, which `run_blocks`' sizes rule out). Written out, not
/// with `array::from_fn`, whose closure the compiler left as a call per row.
#[inline(always)]
fn strided6(v: &mut [f32], first: usize, stride: usize, len: usize) -> [&mut [f32]; 6] {
    let (a, r) = v[first..].split_at_mut(stride);
    let (b, r) = r.split_at_mut(stride);
    let (c, r) = r.split_at_mut(stride);
    let (d, r) = r.split_at_mut(stride);
    let (e, r) = r.split_at_mut(stride);
    [
        &mut a[..len],
        &mut b[..len],
        &mut c[..len],
        &mut d[..len],
        &mut e[..len],
        &mut r[..len],
    ]
}

/// Four disjoint `len`-long slices of `v` (see [`strided6`]).
#[inline(always)]
fn strided4(v: &mut [f32], first: usize, stride: usize, len: usize) -> [&mut [f32]; 4] {
    let (a, r) = v[first..].split_at_mut(stride);
    let (b, r) = r.split_at_mut(stride);
    let (c, r) = r.split_at_mut(stride);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut r[..len]]
}

/// `o = Bᵀ·d` for F(4×4, 3×3), all six rows at once, element-wise over the slices (length:
/// `o[0]`'s), with `Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0],
/// [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]` (Lavin & Gray, section 4).
#[inline(always)]
fn bt4(o: [&mut [f32]; 6], d: [&[f32]; 6]) {
    let n = o[0].len();
    let [o0, o1, o2, o3, o4, o5] = o;
    let (o0, o1, o2, o3, o4, o5) = (
        &mut o0[..n],
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    let [d0, d1, d2, d3, d4, d5] = d;
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    for i in 0..n {
        let (x0, x1, x2, x3, x4, x5) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
        let (t1, t2) = (x4 - 4.0 * x2, x3 - 4.0 * x1);
        let (t3, t4) = (x4 - x2, 2.0 * (x3 - x1));
        o0[i] = 4.0 * x0 - 5.0 * x2 + x4;
        o1[i] = t1 + t2;
        o2[i] = t1 - t2;
        o3[i] = t3 + t4;
        o4[i] = t3 - t4;
        o5[i] = 4.0 * x1 - 5.0 * x3 + x5;
    }
}

/// `o = Aᵀ·m` for F(4×4, 3×3), all four rows at once, element-wise over the slices (length:
/// `o[0]`'s), with `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0],
/// [0, 1, −1, 8, −8, 1]]`.
#[inline(always)]
fn at4(o: [&mut [f32]; 4], m: [&[f32]; 6]) {
    let n = o[0].len();
    let [o0, o1, o2, o3] = o;
    let (o0, o1, o2, o3) = (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n]);
    let [m0, m1, m2, m3, m4, m5] = m;
    let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
    for i in 0..n {
        let (a, b) = (m1[i] + m2[i], m1[i] - m2[i]);
        let (c, d) = (m3[i] + m4[i], m3[i] - m4[i]);
        o0[i] = m0[i] + a + c;
        o1[i] = b + 2.0 * d;
        o2[i] = a + 4.0 * c;
        o3[i] = b + 8.0 * d + m5[i];
    }
}

/// F(2×2, 3×3): `V = Bᵀ·d·B` for tile rows `ty0..ty1` of one image into `v` (`[16, c, nt]`),
/// with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`. Rows first (whole
/// padded image rows), then columns (even/odd columns of those rows), both across the tiles.
#[inline(always)]
fn input_transform_f2(
    x: &[f32],
    d: Dims,
    (ty0, ty1): (usize, usize),
    v: &mut [f32],
    s: &mut Scratch,
) {
    let Dims { c, h, w, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ci in 0..c {
        let plane = &x[ci * h * w..][..h * w];
        for ty in ty0..ty1 {
            // Input rows 2ty − 1 … 2ty + 2.
            s.load_rows(plane, (h, w), 2 * ty as isize - 1, 4);
            // Row transform (Bᵀ·d), element-wise over whole rows.
            let [d0, d1, d2, d3, ..] = &s.d;
            let [r0, r1, r2, r3, ..] = &mut s.r;
            map2(r0, d0, d2, |a, b| a - b);
            map2(r1, d1, d2, |a, b| a + b);
            map2(r2, d2, d1, |a, b| a - b);
            map2(r3, d1, d3, |a, b| a - b);
            // Column transform (·B) of each transformed row: tile tx covers padded columns
            // 2tx … 2tx + 3, i.e. even[tx], odd[tx], even[tx + 1], odd[tx + 1].
            let base = (ty - ty0) * tw;
            for i in 0..4 {
                s.split_phases::<2>(i);
                let [e, o, ..] = &s.phase;
                let at = |j: usize| ((4 * i + j) * c + ci) * nt + base;
                map2(&mut v[at(0)..][..tw], e, &e[1..], |a, b| a - b);
                map2(&mut v[at(1)..][..tw], o, &e[1..], |a, b| a + b);
                map2(&mut v[at(2)..][..tw], &e[1..], o, |a, b| a - b);
                map2(&mut v[at(3)..][..tw], o, &o[1..], |a, b| a - b);
            }
        }
    }
}

/// F(4×4, 3×3): `V = Bᵀ·d·B` (see [`bt4`]) for tile rows `ty0..ty1` of one image into `v`
/// (`[36, c, nt]`): rows first (whole padded image rows), then columns (the four phases of
/// each transformed row: tile tx covers padded columns 4tx … 4tx + 5).
#[inline(always)]
fn input_transform_f4(
    x: &[f32],
    d: Dims,
    (ty0, ty1): (usize, usize),
    v: &mut [f32],
    s: &mut Scratch,
) {
    let Dims { c, h, w, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ci in 0..c {
        let plane = &x[ci * h * w..][..h * w];
        for ty in ty0..ty1 {
            // Input rows 4ty − 1 … 4ty + 4, then Bᵀ·d over whole rows.
            s.load_rows(plane, (h, w), 4 * ty as isize - 1, 6);
            let [d0, d1, d2, d3, d4, d5] = &s.d;
            let [r0, r1, r2, r3, r4, r5] = &mut s.r;
            bt4([r0, r1, r2, r3, r4, r5], [d0, d1, d2, d3, d4, d5]);
            // ·B over the columns of each transformed row.
            let base = (ty - ty0) * tw;
            for i in 0..6 {
                s.split_phases::<4>(i);
                let [p0, p1, p2, p3] = &s.phase;
                let cols = [&p0[..], &p1[..], &p2[..], &p3[..], &p0[1..], &p1[1..]];
                bt4(strided6(v, (6 * i * c + ci) * nt + base, c * nt, tw), cols);
            }
        }
    }
}

/// One output row of a tile row: `phases[j·tw + tx]` is column M·tx + j; the row is cropped
/// to its length, and every element of it is written.
#[inline(always)]
fn interleave<const M: usize>(row: &mut [MaybeUninit<f32>], phases: &[f32], tw: usize) {
    let full = row.len() / M;
    for (t, group) in row.chunks_exact_mut(M).enumerate() {
        for (j, o) in group.iter_mut().enumerate() {
            o.write(phases[j * tw + t]);
        }
    }
    for (j, o) in row[full * M..].iter_mut().enumerate() {
        o.write(phases[j * tw + full]);
    }
}

/// F(2×2, 3×3): `Y = Aᵀ·M·A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]` for tile rows
/// `ty0..ty1` from `m` (`[16, k, nt]`) into the image's output (`[k, h, w]`), cropping the last
/// row/column of tiles where h or w is odd. `out` points at the image's output; only the rows
/// of these tile rows are written, each through a slice of its own, and each gets `epilogue`
/// (offsets within the image) once written.
#[inline(always)]
fn output_transform_f2(
    m: &[f32],
    d: Dims,
    (ty0, ty1): (usize, usize),
    out: *mut f32,
    epilogue: Epilogue,
    s: &mut Scratch,
) {
    let Dims { k, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ki in 0..k {
        for ty in ty0..ty1 {
            let base = (ty - ty0) * tw;
            let ms = |xi: usize| &m[(xi * k + ki) * nt + base..][..tw];
            // Rows: s0_j = m0j + m1j + m2j, s1_j = m1j − m2j − m3j.
            let (s0, s1) = s.s[..8 * tw].split_at_mut(4 * tw);
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
            // Columns, the same, giving even and odd output columns of the two output rows
            // (`y[half][parity][tx]`).
            for (half, sr) in [&*s0, &*s1].into_iter().enumerate() {
                let col = |j: usize| &sr[j * tw..][..tw];
                let (ye, yo) = s.y[half * 2 * tw..][..2 * tw].split_at_mut(tw);
                map3(ye, col(0), col(1), col(2), |a, b, c| a + b + c);
                map3(yo, col(1), col(2), col(3), |b, c, e| b - c - e);
            }
            write_rows(&s.y, (ki, ty), d, out, epilogue);
        }
    }
}

/// F(4×4, 3×3): `Y = Aᵀ·M·A` (see [`at4`]) for tile rows `ty0..ty1` from `m` (`[36, k, nt]`)
/// into the image's output, as [`output_transform_f2`] does.
#[inline(always)]
fn output_transform_f4(
    m: &[f32],
    d: Dims,
    (ty0, ty1): (usize, usize),
    out: *mut f32,
    epilogue: Epilogue,
    s: &mut Scratch,
) {
    let Dims { k, tw, .. } = d;
    let nt = (ty1 - ty0) * tw;
    for ki in 0..k {
        for ty in ty0..ty1 {
            let base = (ty - ty0) * tw;
            let ms = |xi: usize| &m[(xi * k + ki) * nt + base..][..tw];
            // Rows: s[j][r] = Σ_i Aᵀ[r][i]·m[i][j] (`s[(4j + r)·tw ..]`).
            for j in 0..6 {
                let col = [
                    ms(j),
                    ms(6 + j),
                    ms(12 + j),
                    ms(18 + j),
                    ms(24 + j),
                    ms(30 + j),
                ];
                at4(strided4(&mut s.s, 4 * j * tw, tw, tw), col);
            }
            // Columns: y[r][c] = Σ_j s[j][r]·A[j][c] (`y[(4r + c)·tw ..]`).
            for r in 0..4 {
                let sj = |j: usize| &s.s[(4 * j + r) * tw..][..tw];
                let row = [sj(0), sj(1), sj(2), sj(3), sj(4), sj(5)];
                at4(strided4(&mut s.y, 4 * r * tw, tw, tw), row);
            }
            write_rows(&s.y, (ki, ty), d, out, epilogue);
        }
    }
}

/// Output rows m·ty … of channel `ki` from `y` (`[m][m][tw]`: row in the tile, column mod m,
/// tile), cropped to the image, each with `epilogue` applied once written.
fn write_rows(y: &[f32], (ki, ty): (usize, usize), d: Dims, out: *mut f32, epilogue: Epilogue) {
    let Dims { tile, h, w, tw, .. } = d;
    let m = tile.m();
    for r in 0..m {
        let oy = m * ty + r;
        if oy >= h {
            break;
        }
        // SAFETY: row `oy` of channel `ki` lies inside the image's `k·h·w` floats (`oy < h`),
        // and the caller gives this block these rows alone; they may be uninitialised
        // (`run_blocks`), hence `MaybeUninit` until `interleave` has written all `w`.
        let dst = unsafe { out.add((ki * h + oy) * w) };
        let uninit = unsafe { std::slice::from_raw_parts_mut(dst.cast::<MaybeUninit<f32>>(), w) };
        let phases = &y[r * m * tw..][..m * tw];
        match tile {
            Tile::F2 => interleave::<2>(uninit, phases, tw),
            Tile::F4 => interleave::<4>(uninit, phases, tw),
        }
        // SAFETY: the same `w` floats, every one written just now.
        let row = unsafe { std::slice::from_raw_parts_mut(dst, w) };
        epilogue.apply(ki, (ki * h + oy) * w, row);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use candle_nn::Module;

    /// A seeded random `[b, c, h, w]` input and a 3×3, padding-1 candle conv `c → k` with bias.
    fn case(b: usize, c: usize, k: usize, h: usize, w: usize) -> (Tensor, candle_nn::Conv2d) {
        crate::model::conv::tests::random_case((3, 1, 1, true), (b, c, k, h, w))
    }

    fn with_bias(bias: &[f32]) -> Epilogue<'_> {
        let mut e = Epilogue::default();
        e.bias = Some(bias);
        e
    }

    /// Both transform sizes on the packed f32 products (and F(2×2) on bf16 where the CPU has
    /// it), called directly (whatever `conv.rs` would choose), against candle's conv2d: every
    /// residue of h and w mod 4 (a last tile row/column cropped by 1–3 pixels), images smaller
    /// than one tile, one channel, two images, blocks of several tile rows. f32: within 1e-5
    /// (F(2×2)) and 3e-5 (F(4×4), whose transforms round more) of the output's scale; bf16
    /// within 1e-2.
    #[test]
    fn both_tiles_match_candle_conv2d() {
        let mut kernels: Vec<(packed_gemm::Kernel, Tile, f32)> = Vec::new();
        if let Some(f32k) = packed_gemm::Kernel::f32() {
            kernels.push((f32k, Tile::F2, 1e-5));
            kernels.push((f32k, Tile::F4, 3e-5));
        }
        if packed_gemm::bf16_available() {
            kernels.push((packed_gemm::Kernel::bf16(), Tile::F2, 1e-2));
        }
        if kernels.is_empty() {
            eprintln!("skipped: no packed products on this CPU");
            return;
        }
        let shapes = [
            (1, 1, 1, 1, 1),
            (1, 2, 3, 3, 2),
            (2, 3, 5, 5, 6),
            (1, 4, 4, 7, 9),
            (2, 8, 16, 16, 16),
            (1, 16, 8, 33, 34),
            (1, 5, 9, 35, 39),
            (2, 64, 32, 44, 41),
            (1, 24, 40, 130, 12),
        ];
        for (b, c, k, h, w) in shapes {
            let (x, conv) = case(b, c, k, h, w);
            let want = conv.forward(&x).unwrap();
            let bias = conv.bias().unwrap().to_vec1::<f32>().unwrap();
            let wt = conv
                .weight()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for &(kernel, tile, tol) in &kernels {
                let op = PackedWinograd {
                    k,
                    tile,
                    u: pack_filter_transforms(kernel, &wt, k, c, tile, false),
                    epilogue: with_bias(&bias),
                };
                let got = x.apply_op1_no_bwd(&op).unwrap();
                assert_eq!(got.dims(), want.dims());
                let e = crate::model::rel_err(&got, &want).unwrap();
                assert!(
                    e < tol,
                    "{kernel:?} {tile:?} {b}x{c}x{h}x{w} → {k}: {e} (bound {tol})"
                );
            }
        }
    }

    /// Every compiled copy of the transforms (AVX-512, AVX2, portable: whichever this CPU runs)
    /// gives the same bits as the portable one (no FMA contraction, same order of operations),
    /// so the goldens that run on one copy vouch for the others; odd sizes, two tile rows.
    #[test]
    fn transform_copies_agree_bit_for_bit() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
                .collect()
        };
        for tile in [Tile::F2, Tile::F4] {
            for (c, k, h, w) in [(3, 2, 9, 37), (2, 3, 16, 61), (1, 1, 5, 3)] {
                let d = Dims::new(tile, (c, k, h, w));
                let rows = (0, d.th.min(2));
                let nt = rows.1 * d.tw;
                let x = rand(c * h * w);
                let m = rand(tile.products() * k * nt);
                let bias = rand(k);
                let mut results = Vec::new();
                for (input, output) in transforms_here(tile) {
                    let mut s = Scratch::new(tile, w);
                    let mut v = vec![0f32; tile.products() * c * nt];
                    let mut y = vec![0f32; k * h * w];
                    // SAFETY: `transforms_here` lists copies this CPU runs; `y` is the image's
                    // whole `k·h·w` output.
                    unsafe {
                        input(&x, d, rows, &mut v, &mut s);
                        output(&m, d, rows, y.as_mut_ptr(), with_bias(&bias), &mut s);
                    }
                    results.push((v, y));
                }
                let (portable, copies) = results.split_last().unwrap();
                for (i, r) in copies.iter().enumerate() {
                    assert!(
                        r == portable,
                        "{tile:?} copy {i} differs, {c}x{h}x{w} → {k}"
                    );
                }
            }
        }
    }

    /// The F(4×4) filter transform of a kernel that is one tap (`g[i][j] = 1`, the rest 0) is
    /// the outer product of G's column i and G's column j (a check of `G` itself, independent
    /// of the convolution tests).
    #[test]
    fn f4_filter_transform_is_g_g_gt() {
        let g = [
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        for tap in 0..9 {
            let mut w = [0f32; 9];
            w[tap] = 1.0;
            let u = transform_filter(&w, 1, 1, Tile::F4);
            let (i, j) = (tap / 3, tap % 3);
            for a in 0..6 {
                for b in 0..6 {
                    let want = (g[a][i] * g[b][j]) as f32;
                    assert!((u[6 * a + b] - want).abs() < 1e-7, "tap {tap} u[{a}][{b}]");
                }
            }
        }
    }
}
