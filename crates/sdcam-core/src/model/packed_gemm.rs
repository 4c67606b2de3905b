//! Matrix products on packed operands for x86-64 CPUs, with f32 sums: in bf16 on CPUs with
//! AVX512-BF16 (`vdpbf16ps`: 32 bf16 multiply-adds per instruction into 16 f32 sums, twice
//! the f32 FMA rate), for `model.dtype = "bf16"` on the CPU (see `model::device`), and in f32
//! ([`Kernel::F32`], `vfmadd231ps`) for the f32 models on any CPU with AVX-512 F, or with AVX2
//! and FMA (a copy of the microkernel on ymm registers, [`F32Isa`]) ([`products_for`]). Weights are packed once (f32 conv weights are read as they are: in f32
//! A's rows need no packing); the activations' side is packed on each call (B: im2col tiles,
//! Winograd `V`, Kᵀ and V; A: a linear layer's input, attention's queries and probabilities,
//! which f32 reads in place); in bf16 each value is rounded to bf16 (round to nearest even) as
//! it is packed, and the sums, outputs and everything around the products stay f32.
//!
//! Hand-written because no maintained Rust crate has a bf16 × bf16 → f32 product on this
//! instruction (`gemm` 0.19 computes f16 only, in f32 after conversion, and has no bf16; candle's
//! CPU matmul has no bf16 kernel at all). The f32 kernel shares the layout, tasks and
//! epilogues: against `gemm` 0.19's f32 product (which packs both operands on every call, and
//! whose edge kernels took a fifth of the U-Net's product time) it keeps the linear weights and
//! Winograd transforms packed and reads the rows of A in place; the sd-turbo U-Net took
//! 0.75–0.99 of gemm's time, side by side on a Zen 5 machine (issue 14). The layout is the usual
//! one (GotoBLAS):
//! - [`PackedA`]: `m × k`, row by row, each row as its pairs of columns `(2p, 2p + 1)` (one
//!   `u32` = two bf16, low half first), or in f32 as it is: the microkernel broadcasts each
//!   slot from its row, so nothing needs interleaving (packing an activation is one vectorised
//!   conversion per row, and [`matmul_rows`] reads an f32 one without a copy).
//! - [`PackedB`]: `k × n`, columns in panels of [`NR`]; for each panel and pair of rows
//!   `(2p, 2p + 1)`, the [`NR`] columns' pairs side by side (in f32, for each row of k, the
//!   [`NR`] columns' values).
//! - The microkernel keeps an `MR × NR` block of C in 16 zmm registers and, per pair of k (or
//!   k in f32), loads one pair from each of [`MR`] rows (broadcast) and two vectors of B. K is cut into chunks
//!   of [`KC`] slots so that one chunk of a B panel (16 KiB) stays in L1 and the task's chunk
//!   of A in L2.
//!
//! On CPUs with AMX-BF16 (Intel Sapphire Rapids and newer) the same products run on the tile
//! unit instead ([`Kernel::Amx`]: `tdpbf16ps` multiplies a 16 × 32 bf16 tile of A by a 32 × 16
//! tile of B into 16 × 16 f32 sums, 16 times the work of one `vdpbf16ps`); the operands are then
//! packed for tile loads: A row-major (pairs of k side by side, rows padded to [`MR_AMX`]), B as
//! above, and k padded with zero pairs to a multiple of [`KT`] in both. `SDCAM_AMX=0` keeps the
//! AVX-512 kernel (to compare the two). Linux hands a process the tile registers only when it
//! asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); where that fails the AVX-512
//! kernel runs. The tile instructions are written as inline assembly: Rust's AMX intrinsics
//! are not stable.
//!
//! Accuracy: exact products of bf16 values summed in f32, so against an f32 product of the
//! *rounded* inputs it differs only by summation order (tests: < 1e-5 relative); against the
//! f32 product of the unrounded inputs, by the rounding of each input to 8 significant bits
//! (about 2⁻⁹ relative per input). The f32 kernel differs from any other f32 product only by
//! summation order.

use std::sync::OnceLock;

use candle_core::DType;
use candle_nn::VarBuilder;

use crate::model::SendPtr;

/// Rows of A (and C) per microkernel call.
pub(crate) const MR: usize = 8;
/// Columns of B (and C) per panel: two vectors of 16 f32.
pub(crate) const NR: usize = 32;
/// Slots of k (bf16 pairs, or f32 values) per chunk: a B panel's chunk is `KC · NR · 4` bytes
/// = 16 KiB.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const KC: usize = 128;
/// Most rows of C per parallel task (A's chunk for them, `MC · KC · 4` = 96 KiB, stays in L2;
/// [`task_grid`] may cut finer).
const MC: usize = 192;
/// Most panels of C per parallel task ([`task_grid`] may cut finer).
const NC_PANELS: usize = 8;
/// Pairs of k per AMX tile step (a tile row holds 64 bytes: 16 pairs).
pub(crate) const KT: usize = 16;
/// Rows of C per AMX block (two tiles of A, 16 rows each).
pub(crate) const MR_AMX: usize = 32;
/// Rows of C per call of the AVX2 f32 microkernel ([`F32Isa::Avx2`]): 6 rows × 2 ymm of
/// sums, 2 of B and 1 broadcast fill 15 of the 16 registers.
pub(crate) const MR_AVX2: usize = 6;

/// Which kernel a packed operand is laid out for (both operands of a product must agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Kernel {
    /// `vdpbf16ps` on zmm registers (AVX512-BF16).
    #[default]
    Avx512Bf16,
    /// `tdpbf16ps` on tiles (AMX-BF16).
    Amx,
    /// `vfmadd231ps` on zmm registers (AVX-512 F): f32 operands as they are, no rounding (the
    /// f32 models' products on such CPUs, [`Kernel::f32`]).
    F32,
}

impl Kernel {
    /// The bf16 kernel for this process: AMX where the CPU has it, Linux grants the tiles and
    /// `SDCAM_AMX` is not `0` (decided once), else AVX-512.
    pub(crate) fn bf16() -> Self {
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            let off = std::env::var("SDCAM_AMX").is_ok_and(|v| v.trim() == "0");
            if !off && amx_available() {
                tracing::debug!("bf16 products on AMX tiles");
                Kernel::Amx
            } else {
                Kernel::Avx512Bf16
            }
        })
    }

    /// The f32 kernel where this CPU runs it ([`F32Isa::current`]: AVX-512 F, or AVX2 with
    /// FMA) and `SDCAM_F32_KERNEL` is not `0` (read once; with `0`, f32 products take candle's
    /// `gemm`, as they did before this kernel had an AVX2 copy).
    pub(crate) fn f32() -> Option<Self> {
        F32Isa::current().map(|_| Kernel::F32)
    }

    /// Whether this CPU runs the kernel.
    fn runs_here(self) -> bool {
        match self {
            Kernel::Avx512Bf16 | Kernel::Amx => bf16_available(),
            Kernel::F32 => f32_available(),
        }
    }

    /// Values of k per slot of the packed operands: a bf16 pair, or one f32.
    fn per_slot(self) -> usize {
        match self {
            Kernel::Avx512Bf16 | Kernel::Amx => 2,
            Kernel::F32 => 1,
        }
    }

    /// Slots (`u32`) stored per row (A) or per panel (B) for `k` values: pairs of k (the last
    /// zero-padded where k is odd), rounded up to whole tile steps for AMX (the extra pairs are
    /// zero); k f32 values for [`Kernel::F32`].
    fn slots(self, k: usize) -> usize {
        match self {
            Kernel::Avx512Bf16 => k.div_ceil(2),
            Kernel::Amx => k.div_ceil(2).div_ceil(KT) * KT,
            Kernel::F32 => k,
        }
    }

    /// Rows of C (and of packed A) per block.
    fn block_rows(self) -> usize {
        match self {
            Kernel::Avx512Bf16 | Kernel::F32 => MR,
            Kernel::Amx => MR_AMX,
        }
    }
}

/// Whether AMX-BF16 can run here: CPUID reports AMX-TILE and AMX-BF16 (leaf 7, EDX bits 24 and
/// 22), the AVX-512 kernels are available (for packing and the edges), and Linux grants this
/// process the tile data state (asked once; granted for every thread).
fn amx_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7 exists on every x86-64 CPU that has AVX-512 (checked first).
        let edx = bf16_available().then(|| std::arch::x86_64::__cpuid_count(7, 0).edx);
        let Some(edx) = edx else { return false };
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r != 0 {
            tracing::debug!(
                "AMX: Linux refused the tile state ({}); bf16 products on AVX-512",
                std::io::Error::last_os_error()
            );
        }
        r == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The instructions [`Kernel::F32`]'s microkernel runs on (one layout for both: A's rows as
/// they are, B in panels of [`NR`] columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum F32Isa {
    /// [`MR`] rows × 32 columns of C in 16 zmm registers (`vfmadd231ps` on 16 lanes); only
    /// in a build with the `avx512` feature.
    #[cfg_attr(not(feature = "avx512"), allow(dead_code))]
    Avx512,
    /// [`MR_AVX2`] rows × 16 columns (half a panel) of C in 12 ymm registers
    /// (`vfmadd231ps` on 8 lanes): AMD Zen 1–3, Intel Haswell to Alder Lake.
    Avx2,
}

impl F32Isa {
    /// This process's f32 microkernel, decided once: `None` where `SDCAM_F32_KERNEL=0`
    /// (candle's `gemm`) or the CPU has neither; AVX2 where `SDCAM_F32_KERNEL=avx2` and the
    /// CPU has it (to measure the AVX2 path on an AVX-512 CPU); else the widest this CPU (and
    /// build: the `avx512` feature) runs.
    pub(crate) fn current() -> Option<Self> {
        static ISA: OnceLock<Option<F32Isa>> = OnceLock::new();
        *ISA.get_or_init(|| {
            let var = std::env::var("SDCAM_F32_KERNEL").unwrap_or_default();
            let isa = match var.trim() {
                "0" => None,
                "avx2" => Self::all_here()
                    .iter()
                    .copied()
                    .find(|&i| i == F32Isa::Avx2),
                _ => Self::all_here().first().copied(),
            };
            tracing::debug!(
                "f32 products on the CPU: {}",
                match isa {
                    Some(F32Isa::Avx512) => "packed kernel, AVX-512",
                    Some(F32Isa::Avx2) => "packed kernel, AVX2",
                    None => "gemm",
                }
            );
            isa
        })
    }

    /// Every copy this CPU (and build) runs, widest first (checked once).
    pub(crate) fn all_here() -> &'static [Self] {
        static ALL: OnceLock<Vec<F32Isa>> = OnceLock::new();
        ALL.get_or_init(|| {
            let mut v = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(feature = "avx512")]
                if is_x86_feature_detected!("avx512f") {
                    v.push(F32Isa::Avx512);
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    v.push(F32Isa::Avx2);
                }
            }
            v
        })
    }

    /// The copy the products of this process run ([`F32Isa::current`], or the widest here
    /// where `SDCAM_F32_KERNEL=0` and a test packs f32 operands anyway).
    fn for_products() -> Option<Self> {
        Self::current().or_else(|| Self::all_here().first().copied())
    }
}

/// Whether the conv and linear layers built from `vb` multiply in bf16 with these kernels:
/// `model.dtype = "bf16"` on the CPU loads the U-Net and the VAE through a bf16 `VarBuilder`
/// on the CPU, and this is how their layers know. Their parameters are still read in f32
/// ([`f32_params`]): weights are packed to bf16 (linear layers' when built, convs' on first
/// use), biases, norms and activations stay f32.
pub(crate) fn bf16_products(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && vb.dtype() == DType::BF16
}

/// The kernel the products of a layer about to be built from `vb` run on: the bf16 kernel
/// ([`Kernel::bf16`]) where [`bf16_products`] holds, the f32 one ([`Kernel::f32`]) for f32 on
/// a CPU with AVX-512 or AVX2 and FMA, else `None` (candle's products: other devices, older
/// CPUs, `SDCAM_F32_KERNEL=0`).
///
/// # Errors
/// bf16 products asked for on a CPU without AVX512-BF16 (the message says to use f32).
pub(crate) fn products_for(vb: &VarBuilder) -> candle_core::Result<Option<Kernel>> {
    if bf16_products(vb) {
        if !bf16_available() {
            candle_core::bail!("{UNAVAILABLE}");
        }
        return Ok(Some(Kernel::bf16()));
    }
    Ok(if vb.device().is_cpu() && vb.dtype() == DType::F32 {
        Kernel::f32()
    } else {
        None
    })
}

/// Why bf16 products cannot run here, and what to do.
pub(crate) const UNAVAILABLE: &str = "model.dtype = \"bf16\" on the CPU needs AVX512-BF16 (Intel \
     Cooper Lake / Sapphire Rapids or newer, AMD Zen 4 or newer), which this CPU lacks; use \
     \"auto\" or \"f32\"";

/// `vb` reading f32 where [`bf16_products`] holds (every parameter of such a model is computed
/// with in f32), else `vb` unchanged.
pub(crate) fn f32_params(vb: VarBuilder) -> VarBuilder {
    if bf16_products(&vb) {
        vb.set_dtype(DType::F32)
    } else {
        vb
    }
}

/// Every kernel this process runs, for tests: AVX-512 BF16 where the CPU has it, AMX where
/// [`Kernel::bf16`] picked it, F32 where [`Kernel::f32`] is on.
#[cfg(test)]
pub(crate) fn kernels_here() -> Vec<Kernel> {
    let mut k = Vec::new();
    if bf16_available() {
        k.push(Kernel::Avx512Bf16);
        if Kernel::bf16() == Kernel::Amx {
            k.push(Kernel::Amx);
        }
    }
    k.extend(Kernel::f32());
    k
}

/// Whether this CPU runs the bf16 kernels (AVX-512 F and BW, and AVX512-BF16; checked once).
pub(crate) fn bf16_available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU runs the f32 kernel in one of its copies ([`F32Isa::all_here`]: AVX-512 F
/// in a build with the `avx512` feature, AVX2 with FMA in any; checked once).
pub(crate) fn f32_available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !F32Isa::all_here().is_empty())
}

/// `x` rounded to bf16 (to nearest, ties to even), as its 16 bits; subnormals become zero of
/// the same sign, as `vcvtne2ps2bf16` does, so that scalar and vector packing agree; NaN stays
/// NaN.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    if b & 0x7f80_0000 == 0 {
        return (b >> 16) as u16 & 0x8000;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[cfg(test)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Two bf16 as one `u32`, `lo` (the even k) in the low half.
pub(crate) fn bf16_pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | (u32::from(bf16_bits(hi)) << 16)
}

/// `row` (k values) as [`Kernel::slots`] into `out` (its first `kernel.slots(k)`, AMX's
/// padding excluded): k/2 bf16 pairs (rounded up, the last one zero-padded), or the k f32
/// values' bits.
fn slots_of_row(kernel: Kernel, row: &[f32], out: &mut [u32]) {
    if kernel == Kernel::F32 {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = x.to_bits();
        }
    } else {
        pairs_of_row(row, out);
    }
}

/// `row` (k values) as k/2 pairs (rounded up, the last one zero-padded) into `out`.
pub(crate) fn pairs_of_row(row: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: the CPU has the features (checked); lengths as documented.
        unsafe { pairs_of_row_avx512(row, out) };
        return;
    }
    for (p, o) in out.iter_mut().enumerate() {
        let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
        *o = bf16_pair(row[2 * p], hi);
    }
}

/// [`pairs_of_row`] with AVX-512: 32 values (16 pairs) per `vcvtne2ps2bf16`, which keeps
/// their order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_of_row_avx512(row: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let k = row.len();
    let mut j = 0;
    // SAFETY: loads of 32 floats at j < k − 31 and stores of 16 u32 at j/2 < out.len() − 15.
    unsafe {
        while j + 32 <= k {
            let lo = _mm512_loadu_ps(row.as_ptr().add(j));
            let hi = _mm512_loadu_ps(row.as_ptr().add(j + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(j / 2).cast(), v);
            j += 32;
        }
    }
    for p in j / 2..k.div_ceil(2) {
        let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
        out[p] = bf16_pair(row[2 * p], hi);
    }
}

/// The rows of an `n × k` source (element `(j, i)` at `src[j·row_stride + i]`: the transpose of
/// a `k × n` B) into `dst` as [`PackedB`]'s panels: in blocks of [`NR`] rows, for each block and
/// each of `ks` slots of columns (a bf16 pair, or one f32 for [`Kernel::F32`]), the block's
/// rows' slots side by side (rows past `n` and slots past k zero).
///
/// # Panics
/// `src` is too short for the shape, or `ks` below k's slots.
fn pack_transposed_panels(
    dst: &mut Vec<u32>,
    src: &[f32],
    (n, k, row_stride): (usize, usize, usize),
    (ks, kernel): (usize, Kernel),
) {
    assert!(n == 0 || src.len() >= (n - 1) * row_stride + k);
    let kp = k.div_ceil(kernel.per_slot());
    assert!(ks >= kp);
    dst.clear();
    dst.resize(n.div_ceil(NR) * ks * NR, 0);
    if kp == 0 {
        return;
    }
    let mut row = vec![0; kp];
    for (blk, dst) in dst.chunks_mut(ks * NR).enumerate() {
        for r in 0..NR.min(n - blk * NR) {
            slots_of_row(kernel, &src[(blk * NR + r) * row_stride..][..k], &mut row);
            for (p, &v) in row.iter().enumerate() {
                dst[p * NR + r] = v;
            }
        }
    }
}

/// The rows of an `m × k` source (element `(i, j)` at `src[i·row_stride + j]`) into `dst`,
/// each as its [`Kernel::slots`] (bf16 pairs, or f32 values), rows `kernel.slots(k)` apart:
/// [`PackedA`]'s layout for the AVX-512 kernels, whose microkernels broadcast each slot
/// straight from its row (so nothing is interleaved). On rayon's pool when `parallel`.
///
/// # Panics
/// `src` is too short for the shape.
fn rows_as_slots(
    kernel: Kernel,
    dst: &mut Vec<u32>,
    src: &[f32],
    (m, k, row_stride): (usize, usize, usize),
    parallel: bool,
) {
    assert!(m == 0 || src.len() >= (m - 1) * row_stride + k);
    let ks = kernel.slots(k);
    dst.clear();
    dst.resize(m * ks, 0);
    if ks == 0 {
        return;
    }
    let row = |(i, out): (usize, &mut [u32])| {
        slots_of_row(kernel, &src[i * row_stride..][..k], out);
    };
    if parallel {
        use rayon::prelude::*;
        dst.par_chunks_mut(ks).enumerate().for_each(row);
    } else {
        dst.chunks_mut(ks).enumerate().for_each(row);
    }
}

/// The rows of an `m × k` source (as [`rows_as_slots`]) into `dst` in AMX tiles: rows in
/// slices of 16, each slice `ks / KT` tiles of 16 rows × [`KT`] pairs (1 KiB, row-major), so
/// that element `(i, p)` lies at `((i / 16)·ks + p − p % KT)·16 + (i % 16)·KT + p % KT`; pairs
/// past k and rows from `m` up to the next multiple of [`MR_AMX`] zero. On rayon's pool when
/// `parallel`.
///
/// # Panics
/// `src` is too short for the shape, or `ks` is below k's pairs or not a multiple of [`KT`].
fn pack_rows_amx(
    dst: &mut Vec<u32>,
    src: &[f32],
    (m, k, row_stride): (usize, usize, usize),
    ks: usize,
    parallel: bool,
) {
    assert!(m == 0 || src.len() >= (m - 1) * row_stride + k);
    let kp = k.div_ceil(2);
    assert!(ks >= kp && ks.is_multiple_of(KT));
    dst.clear();
    dst.resize(m.div_ceil(MR_AMX) * MR_AMX * ks, 0);
    if kp == 0 || m == 0 {
        return;
    }
    let slices = m.div_ceil(16);
    let pack = |(sl, dst): (usize, &mut [u32]), row: &mut Vec<u32>| {
        row.resize(kp, 0);
        for r in 0..16.min(m - sl * 16) {
            pairs_of_row(&src[(sl * 16 + r) * row_stride..][..k], row);
            store_amx_row(dst, r, row);
        }
    };
    let dst = &mut dst[..slices * 16 * ks];
    if parallel && slices > 1 {
        use rayon::prelude::*;
        dst.par_chunks_mut(16 * ks)
            .enumerate()
            .for_each_init(Vec::new, |row, job| pack(job, row));
    } else {
        let mut row = Vec::new();
        dst.chunks_mut(16 * ks)
            .enumerate()
            .for_each(|job| pack(job, &mut row));
    }
}

/// Row `r` (< 16) of a slice of 16 rows in AMX tiles (`slice`: the slice's `ks / KT` tiles,
/// see [`pack_rows_amx`]) from its pairs `row` (at most `ks`).
fn store_amx_row(slice: &mut [u32], r: usize, row: &[u32]) {
    for (t, chunk) in row.chunks(KT).enumerate() {
        slice[t * 16 * KT + r * KT..][..chunk.len()].copy_from_slice(chunk);
    }
}

/// The left operand, packed (see the module docs): `m × k`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PackedA {
    data: Vec<u32>,
    m: usize,
    k: usize,
    kernel: Kernel,
}

impl PackedA {
    /// Slots of k stored per row ([`Kernel::slots`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn slots(&self) -> usize {
        self.kernel.slots(self.k)
    }

    /// The kernel it is packed for.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Packs for `kernel` `m × k` f32 values, element `(i, j)` at `src[i·row_stride + j]` (a
    /// conv weight `[c_out, c_in·k_h·k_w]` once, or a linear layer's input on each call), on
    /// rayon's pool when `parallel`.
    ///
    /// # Panics
    /// `src` is too short for the shape.
    pub(crate) fn from_rows(
        kernel: Kernel,
        src: &[f32],
        (m, k, row_stride): (usize, usize, usize),
        parallel: bool,
    ) -> Self {
        let mut a = Self::default();
        a.repack_rows(kernel, src, (m, k, row_stride), parallel);
        a
    }

    /// [`PackedA::from_rows`] into this buffer (reusing its allocation).
    ///
    /// # Panics
    /// `src` is too short for the shape.
    pub(crate) fn repack_rows(
        &mut self,
        kernel: Kernel,
        src: &[f32],
        (m, k, row_stride): (usize, usize, usize),
        parallel: bool,
    ) {
        self.m = m;
        self.k = k;
        self.kernel = kernel;
        let ks = self.slots();
        match kernel {
            Kernel::Avx512Bf16 | Kernel::F32 => {
                rows_as_slots(kernel, &mut self.data, src, (m, k, row_stride), parallel);
            }
            Kernel::Amx => pack_rows_amx(&mut self.data, src, (m, k, row_stride), ks, parallel),
        }
    }

    /// Packs for a bf16 `kernel` an `m × k` operand whose rows `fill(i, pairs)` writes as
    /// bf16 pairs (`pairs` holds row i's `k.div_ceil(2)` slots, to be written in full; the
    /// layout's padding is this function's), on the calling thread, reusing this buffer: for
    /// a left operand computed row by row (attention's probabilities), without an f32 copy.
    ///
    /// # Panics
    /// `kernel` is [`Kernel::F32`] (whose rows [`matmul_rows`] reads in place).
    pub(crate) fn fill_bf16_rows(
        &mut self,
        kernel: Kernel,
        (m, k): (usize, usize),
        mut fill: impl FnMut(usize, &mut [u32]),
    ) {
        assert!(
            kernel != Kernel::F32,
            "fill_bf16_rows: f32 rows need no packing"
        );
        self.m = m;
        self.k = k;
        self.kernel = kernel;
        let (kp, ks) = (k.div_ceil(2), self.slots());
        match kernel {
            Kernel::Amx => {
                let padded = m.div_ceil(MR_AMX) * MR_AMX;
                self.data.resize(padded * ks, 0);
                let mut row = vec![0u32; ks];
                for i in 0..padded {
                    if i < m {
                        fill(i, &mut row[..kp]);
                    } else {
                        row.fill(0);
                    }
                    let slice = &mut self.data[(i / 16) * 16 * ks..][..16 * ks];
                    store_amx_row(slice, i % 16, &row);
                }
            }
            _ => {
                self.data.resize(m * ks, 0);
                if ks > 0 {
                    for (i, row) in self.data.chunks_mut(ks).enumerate() {
                        fill(i, row);
                    }
                }
            }
        }
    }

    /// Rows.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    /// Columns.
    pub(crate) fn cols(&self) -> usize {
        self.k
    }

    /// For operands packed for [`Kernel::Amx`]: the tiles (see [`pack_rows_amx`]) and the pairs
    /// of k per row (a multiple of [`KT`]).
    pub(crate) fn amx_tiles(&self) -> Option<(&[u32], usize)> {
        (self.kernel == Kernel::Amx).then(|| (&self.data[..], self.slots()))
    }

    /// For operands packed for [`Kernel::Avx512Bf16`]: the rows (each its pairs of k) and the
    /// pairs of k per row.
    pub(crate) fn avx512_rows(&self) -> Option<(&[u32], usize)> {
        (self.kernel == Kernel::Avx512Bf16).then(|| (&self.data[..], self.slots()))
    }
}

/// The right operand, packed (see the module docs): `k × n`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
    kernel: Kernel,
}

impl PackedB {
    /// Packs for `kernel` `k × n` f32 values, element `(i, j)` at `src[i·row_stride + j]` (the
    /// layout of an im2col matrix or a Winograd `V`) into this buffer (reusing its
    /// allocation), on rayon's pool when `parallel`.
    ///
    /// # Panics
    /// `src` is too short for the shape.
    pub(crate) fn repack_rows(
        &mut self,
        kernel: Kernel,
        src: &[f32],
        (k, n, row_stride): (usize, usize, usize),
        parallel: bool,
    ) {
        assert!(k == 0 || src.len() >= (k - 1) * row_stride + n);
        let kp = k.div_ceil(kernel.per_slot());
        let ks = kernel.slots(k);
        let panels = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        self.kernel = kernel;
        self.data.clear();
        self.data.resize(panels * ks * NR, 0);
        if kp == 0 || n == 0 {
            return;
        }
        // Groups of panels: each reads NC_PANELS·NR consecutive columns of every row.
        let group = ks * NR * NC_PANELS;
        let pack = |(g, dst): (usize, &mut [u32])| {
            let j0 = g * NR * NC_PANELS;
            let cols = (n - j0).min(NR * NC_PANELS);
            if kernel == Kernel::F32 {
                copy_b_columns(dst, src, (k, ks), (j0, cols), row_stride);
            } else {
                pack_b_columns(dst, src, (k, kp, ks), (j0, cols), row_stride);
            }
        };
        if parallel {
            use rayon::prelude::*;
            self.data.par_chunks_mut(group).enumerate().for_each(pack);
        } else {
            self.data.chunks_mut(group).enumerate().for_each(pack);
        }
    }

    /// Packs for `kernel` the transpose of `n × k` f32 values (element `(j, i)` of the source,
    /// i.e. row `j`, at `src[j·row_stride + i]`): a linear layer's weight `[out, in]` as the
    /// `in × out` right operand of `x · Wᵀ`.
    ///
    /// # Panics
    /// `src` is too short for the shape.
    pub(crate) fn from_transposed(
        kernel: Kernel,
        src: &[f32],
        (n, k, row_stride): (usize, usize, usize),
    ) -> Self {
        // Bᵀ's rows are B's columns: packed in blocks of NR rows, they are B's panels.
        let mut data = Vec::new();
        let ks = kernel.slots(k);
        pack_transposed_panels(&mut data, src, (n, k, row_stride), (ks, kernel));
        Self { data, k, n, kernel }
    }

    /// Slots of k stored per panel ([`Kernel::slots`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn slots(&self) -> usize {
        self.kernel.slots(self.k)
    }

    /// Rows.
    pub(crate) fn rows(&self) -> usize {
        self.k
    }

    /// Columns.
    pub(crate) fn cols(&self) -> usize {
        self.n
    }
}

/// Columns `j0 .. j0 + cols` of the `k × n` f32 source into `dst`, their panels in
/// [`Kernel::F32`]'s layout (`ks` rows per panel; columns past the source's left as they are).
fn copy_b_columns(
    dst: &mut [u32],
    src: &[f32],
    (k, ks): (usize, usize),
    (j0, cols): (usize, usize),
    stride: usize,
) {
    for p in 0..k {
        let row = &src[p * stride + j0..][..cols];
        for (pan, chunk) in row.chunks(NR).enumerate() {
            let at = (pan * ks + p) * NR;
            for (d, &x) in dst[at..at + chunk.len()].iter_mut().zip(chunk) {
                *d = x.to_bits();
            }
        }
    }
}

/// Columns `j0 .. j0 + cols` of the `k × n` source (`kp` pairs of rows) into `dst`, their
/// panels in the packed layout (`ks` pairs per panel, those past `kp` left as they are).
fn pack_b_columns(
    dst: &mut [u32],
    src: &[f32],
    (k, kp, ks): (usize, usize, usize),
    (j0, cols): (usize, usize),
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: the CPU has the features (checked); the caller sized `dst` for the panels of
        // these columns and `src` for k rows of `stride`.
        unsafe { pack_b_columns_avx512(dst, src, (k, kp, ks), (j0, cols), stride) };
        return;
    }
    for p in 0..kp {
        for j in 0..cols {
            let lo = src[2 * p * stride + j0 + j];
            let hi = if 2 * p + 1 < k {
                src[(2 * p + 1) * stride + j0 + j]
            } else {
                0.0
            };
            dst[((j / NR) * ks + p) * NR + j % NR] = bf16_pair(lo, hi);
        }
    }
}

/// `out[j]` = the pair (`r0[j]`, `r1[j]`) for j < `r0.len()` (`r1` zero where `None`): two rows
/// of a source interleaved as a B operand's pairs are (a channel pair of an image row for
/// `model::direct_conv`).
///
/// # Panics
/// `r1` or `out` shorter than `r0`.
pub(crate) fn interleave_pairs(r0: &[f32], r1: Option<&[f32]>, out: &mut [u32]) {
    let n = r0.len();
    assert!(out.len() >= n && r1.is_none_or(|r1| r1.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: the CPU has the features (checked); lengths asserted.
        unsafe { interleave_pairs_avx512(r0, r1, out) };
        return;
    }
    for (j, o) in out[..n].iter_mut().enumerate() {
        *o = bf16_pair(r0[j], r1.map_or(0.0, |r1| r1[j]));
    }
}

/// [`interleave_pairs`] with AVX-512: 16 pairs per step, rounded by `vcvtne2ps2bf16` and
/// interleaved by `vpermw` (as [`pack_b_columns_avx512`]).
///
/// # Safety
/// The CPU has AVX-512 F/BW and AVX512-BF16; `r1` and `out` at least as long as `r0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_pairs_avx512(r0: &[f32], r1: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = r0.len();
    let idx: [u16; 32] = std::array::from_fn(|i| ((i % 2) * 16 + i / 2) as u16);
    // SAFETY: loads and stores masked to the lanes below n of slices at least n long.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr().cast());
        let mut j = 0;
        while j < n {
            let mask = first_lanes(n - j);
            let x0 = _mm512_maskz_loadu_ps(mask, r0.as_ptr().add(j));
            let x1 = match r1 {
                Some(r1) => _mm512_maskz_loadu_ps(mask, r1.as_ptr().add(j)),
                None => _mm512_setzero_ps(),
            };
            let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
            let v = _mm512_permutexvar_epi16(idx, bf);
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j).cast(), mask, v);
            j += 16;
        }
    }
}

/// The mask of the first `n` of 16 lanes (all of them for `n ≥ 16`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// [`pack_b_columns`] with AVX-512: 16 columns of two rows per step, rounded by
/// `vcvtne2ps2bf16` and interleaved by `vpermw`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_columns_avx512(
    dst: &mut [u32],
    src: &[f32],
    (k, kp, ks): (usize, usize, usize),
    (j0, cols): (usize, usize),
    stride: usize,
) {
    use std::arch::x86_64::*;
    // Words of [r0 c0..c15 | r1 c0..c15] → r0c0 r1c0 r0c1 r1c1 …
    let idx: [u16; 32] = std::array::from_fn(|i| ((i % 2) * 16 + i / 2) as u16);
    // SAFETY (whole body): every load reads columns j0 + j .. + 16 of a row inside `src`
    // (masked at the right edge), every store writes 16 u32 of one panel row inside `dst`.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr().cast());
        let zero = _mm512_setzero_ps();
        for p in 0..kp {
            let r0 = src.as_ptr().add(2 * p * stride + j0);
            let r1 = (2 * p + 1 < k).then(|| src.as_ptr().add((2 * p + 1) * stride + j0));
            let mut j = 0;
            while j < cols {
                let mask = first_lanes(cols - j);
                let x0 = _mm512_maskz_loadu_ps(mask, r0.add(j));
                let x1 = match r1 {
                    Some(r1) => _mm512_maskz_loadu_ps(mask, r1.add(j)),
                    None => zero,
                };
                let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                let v = _mm512_permutexvar_epi16(idx, bf);
                let at = ((j / NR) * ks + p) * NR + j % NR;
                _mm512_storeu_si512(dst.as_mut_ptr().add(at).cast(), v);
                j += 16;
            }
        }
    }
}

/// `C = A · B` (overwritten, not read), C `a.rows() × b.cols()` row-major with rows
/// `c_row_stride` floats apart, on rayon's pool when `parallel` (else on the calling thread).
///
/// # Panics
/// `a.cols() != b.rows()`, operands packed for different kernels, or a CPU without the
/// kernel's instructions ([`bf16_available`], [`f32_available`]).
///
/// # Safety
/// `c` must be valid for writes at `i·c_row_stride + j` for all `i < a.rows()`,
/// `j < b.cols()`, with no other thread touching those elements during the call.
pub(crate) unsafe fn matmul(
    a: &PackedA,
    b: &PackedB,
    c: *mut f32,
    c_row_stride: usize,
    parallel: bool,
) {
    let a = ARef {
        data: &a.data,
        m: a.m,
        k: a.k,
        lda: a.slots(),
        kernel: a.kernel,
    };
    // SAFETY: the caller's contract.
    unsafe { matmul_ref(&a, b, c, c_row_stride, parallel) };
}

/// [`matmul`] with A given as f32 rows (`m × k`, element `(i, j)` at `a[i·lda + j]`) for B's
/// kernel: read as they are by [`Kernel::F32`]'s microkernel (a linear layer's input, or
/// attention's queries and probabilities, without a copy), packed into `scratch` (reusing its
/// allocation) for the bf16 kernels.
///
/// # Panics
/// As [`matmul`]; also `a` too short for the shape.
///
/// # Safety
/// As [`matmul`]; also C must not overlap `a` (read while C is written).
pub(crate) unsafe fn matmul_rows(
    scratch: &mut PackedA,
    a: &[f32],
    (m, k, lda): (usize, usize, usize),
    b: &PackedB,
    (c, c_row_stride): (*mut f32, usize),
    parallel: bool,
) {
    assert!(m == 0 || (lda >= k && a.len() >= (m - 1) * lda + k));
    if b.kernel != Kernel::F32 {
        scratch.repack_rows(b.kernel, a, (m, k, lda), parallel);
        // SAFETY: the caller's contract.
        unsafe { matmul(scratch, b, c, c_row_stride, parallel) };
        return;
    }
    // SAFETY: f32 and u32 have the same size and alignment; the view reads the same floats
    // (as bits).
    let data = unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u32>(), a.len()) };
    let a = ARef {
        data,
        m,
        k,
        lda,
        kernel: Kernel::F32,
    };
    // SAFETY: the caller's contract.
    unsafe { matmul_ref(&a, b, c, c_row_stride, parallel) };
}

/// The left operand of a product as the kernels read it: packed ([`PackedA`]) or, for
/// [`Kernel::F32`], f32 rows as they are.
struct ARef<'a> {
    data: &'a [u32],
    m: usize,
    k: usize,
    /// Slots from one row to the next ([`Kernel::F32`]), or slots per row of a packed block.
    lda: usize,
    kernel: Kernel,
}

/// [`matmul`] on an [`ARef`].
///
/// # Safety
/// As [`matmul`].
unsafe fn matmul_ref(a: &ARef, b: &PackedB, c: *mut f32, c_row_stride: usize, parallel: bool) {
    assert_eq!(a.k, b.rows(), "packed matmul: inner dimensions differ");
    assert_eq!(
        a.kernel, b.kernel,
        "packed matmul: operands packed for different kernels"
    );
    assert!(
        a.m <= 1 || c_row_stride >= b.cols(),
        "packed matmul: C's rows overlap"
    );
    let kernel = a.kernel;
    assert!(
        kernel.runs_here(),
        "packed matmul: this CPU lacks the instructions of {kernel:?}"
    );
    // SAFETY: the caller's contract; the copy is one this CPU runs.
    unsafe { matmul_on(a, b, (c, c_row_stride), parallel, F32Isa::for_products()) }
}

/// [`matmul_ref`] with the f32 microkernel's copy given (`isa`, for [`Kernel::F32`] operands:
/// one of [`F32Isa::all_here`]; ignored for the bf16 kernels).
///
/// # Safety
/// As [`matmul`].
unsafe fn matmul_on(
    a: &ARef,
    b: &PackedB,
    (c, c_row_stride): (*mut f32, usize),
    parallel: bool,
    isa: Option<F32Isa>,
) {
    let kernel = a.kernel;
    assert!(
        kernel != Kernel::F32 || isa.is_some_and(|i| F32Isa::all_here().contains(&i)),
        "packed matmul: f32 microkernel {isa:?} does not run here"
    );
    let (m, n) = (a.m, b.cols());
    if m == 0 || n == 0 {
        return;
    }
    if a.k == 0 {
        // An empty sum: C = 0.
        for i in 0..m {
            // SAFETY: row i of C, n floats, as the caller's contract says.
            unsafe { std::ptr::write_bytes(c.add(i * c_row_stride), 0, n) };
        }
        return;
    }
    let mr = kernel.block_rows();
    let blocks = m.div_ceil(mr);
    let panels = n.div_ceil(NR);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let (row_tasks, col_tasks) = task_grid(blocks, panels, threads, MC / mr);
    let c = SendPtr(c);
    let task = move |t: usize| {
        let (ti, tj) = (t / col_tasks, t % col_tasks);
        let rows = (even_split(blocks, row_tasks, ti) * mr)
            ..(even_split(blocks, row_tasks, ti + 1) * mr).min(m);
        let pans = even_split(panels, col_tasks, tj)..even_split(panels, col_tasks, tj + 1);
        let c = c;
        // SAFETY: the task writes the C block rows × pans·NR (clipped to n), disjoint from
        // every other task's; the caller's contract covers the whole of C. AMX operands exist
        // only where `Kernel::bf16` found the tiles usable.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match kernel {
                Kernel::Avx512Bf16 => block_avx512::<false>(a, b, c.0, c_row_stride, rows, pans),
                Kernel::F32 if isa == Some(F32Isa::Avx2) => {
                    block_avx2(a, b, c.0, c_row_stride, rows, pans)
                }
                Kernel::F32 => block_avx512::<true>(a, b, c.0, c_row_stride, rows, pans),
                Kernel::Amx => block_amx(a, b, c.0, c_row_stride, rows, pans),
            }
        }
        // Unreachable elsewhere: `bf16_available()` is false there (asserted above).
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (rows, pans, c);
    };
    let tasks = row_tasks * col_tasks;
    if parallel && tasks > 1 {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// How many parts to cut `blocks` row blocks and `panels` column panels of C into, for
/// `threads` threads: each task at most `max_blocks` row blocks ([`MC`] rows) and
/// [`NC_PANELS`] panels (its A and B in cache), and, among the few grids a little finer than that, the one whose slowest thread has
/// the least work when the tasks, cut evenly ([`even_split`]), are shared out in waves (e.g.
/// 1280 rows on 2 threads: 8 tasks of 160 rows, not 7 of up to 192, 4 against 3 on the two
/// threads).
fn task_grid(blocks: usize, panels: usize, threads: usize, max_blocks: usize) -> (usize, usize) {
    let rows0 = blocks.div_ceil(max_blocks);
    let cols0 = panels.div_ceil(NC_PANELS);
    if threads <= 1 {
        return (rows0, cols0);
    }
    let mut best = (usize::MAX, rows0, cols0);
    // A few grids finer than the coarsest are enough to even out the waves.
    let extra = threads.min(8);
    for rows in rows0..=(rows0 + extra).min(blocks) {
        for cols in cols0..=(cols0 + extra).min(panels) {
            let waves = (rows * cols).div_ceil(threads);
            let cost = waves * blocks.div_ceil(rows) * panels.div_ceil(cols);
            if cost < best.0 {
                best = (cost, rows, cols);
            }
        }
    }
    (best.1, best.2)
}

/// Start of part `i` of `n` items cut into `parts` nearly equal parts (`i = parts` gives `n`).
fn even_split(n: usize, parts: usize, i: usize) -> usize {
    i * n / parts
}

/// One task's block of C: rows `rows` (a multiple of MR from the start, clipped at m) and
/// panels `pans`, over all of K in chunks of [`KC`] slots (the first chunk overwrites C, the
/// others add to it); bf16 pairs ([`micro_bf16`]), or f32 values ([`micro_f32`]) where `F32`.
///
/// # Safety
/// As [`matmul`]; the CPU runs the operands' kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const F32: bool>(
    a: &ARef,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
) {
    let m = a.m;
    let kp = b.slots();
    for_chunks_and_panels(b, pans, |p0, pc, pan, (j0, cols)| {
        let bp = b.data[(pan * b.slots() + p0) * NR..].as_ptr();
        let mut i0 = rows.start;
        while i0 < rows.end {
            let r = MR.min(m - i0);
            let ap = a.data[i0 * a.lda + p0..].as_ptr();
            // The rows of A the next call reads (the next block of this chunk, else the first
            // block of the next chunk), for the f32 kernel to prefetch while this one runs.
            let next = if i0 + MR < rows.end {
                (i0 + MR, p0)
            } else {
                (rows.start, p0 + pc)
            };
            let next = (next.1 < kp).then(|| {
                let rn = MR.min(m - next.0);
                (
                    a.data[next.0 * a.lda + next.1..].as_ptr(),
                    rn,
                    KC.min(kp - next.1),
                )
            });
            // SAFETY: A's rows i0 .. i0 + r and B's panel hold pc slots from p0 on; C's block
            // (r rows × cols) is inside this task's region; the CPU runs the kernel. A
            // panel of 16 columns or fewer (the last, or all of a narrow C) takes one
            // vector: the upper half's products would all be discarded.
            let ci = c.add(i0 * ldc + j0);
            let acc = p0 > 0;
            unsafe {
                match (F32, cols > 16) {
                    (false, true) => micro_bf16::<2>(pc, (ap, a.lda), bp, ci, ldc, r, cols, acc),
                    (false, false) => micro_bf16::<1>(pc, (ap, a.lda), bp, ci, ldc, r, cols, acc),
                    (true, true) => {
                        micro_f32::<2>(pc, (ap, a.lda), bp, ci, ldc, r, cols, acc, next)
                    }
                    (true, false) => {
                        micro_f32::<1>(pc, (ap, a.lda), bp, ci, ldc, r, cols, acc, next)
                    }
                }
            }
            i0 += MR;
        }
    });
}

/// The chunks of k (at most [`KC`] slots) and the panels `pans` of B, in the order the blocks
/// walk them: for each chunk from slot `p0` (`pc` slots) and each panel `pan` (its first column
/// `j0` and its `cols ≤ NR` columns within C), `f(p0, pc, pan, (j0, cols))`.
#[inline(always)]
fn for_chunks_and_panels(
    b: &PackedB,
    pans: std::ops::Range<usize>,
    mut f: impl FnMut(usize, usize, usize, (usize, usize)),
) {
    let (kp, n) = (b.slots(), b.cols());
    let mut p0 = 0;
    while p0 < kp {
        let pc = KC.min(kp - p0);
        for pan in pans.clone() {
            let j0 = pan * NR;
            f(p0, pc, pan, (j0, NR.min(n - j0)));
        }
        p0 += pc;
    }
}

/// `C[0..r, 0..cols] (+)= A_rows · B_panel` over `pc` pairs of k: `a` points at row 0's first
/// pair of A's rows (`lda` pairs apart; the `r` rows from there, of which rows past `r` repeat
/// the last so that nothing past A is read), `b` at the panel's (NR u32 per pair); `V` vectors
/// of 16 columns (2, or 1 where `cols ≤ 16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_bf16<const V: usize>(
    pc: usize,
    (a, lda): (*const u32, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    r: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(V == 2 || cols <= 16, "one vector holds 16 columns");
    debug_assert!(r >= 1);
    // SAFETY (whole body): reads pc u32 of r rows of A from `a` and pc·NR from `b`, the
    // caller's blocks; writes r rows × cols columns of C (masked), the caller's block.
    unsafe {
        let rows: [*const u32; MR] = std::array::from_fn(|i| a.add(i.min(r - 1) * lda));
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for p in 0..pc {
            let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    b.add(p * NR + 16 * v).cast(),
                ));
            }
            for (row, &ai) in acc.iter_mut().zip(&rows) {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ai.add(p) as i32));
                for (acc, &bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbf16_ps(*acc, av, bv);
                }
            }
        }
        store_block(&acc, c, ldc, r, cols, accumulate);
    }
}

/// [`micro_bf16`] in f32 ([`Kernel::F32`]) over `pc` values of k: `a` points at row 0's
/// first value of A's rows as they are (`lda` apart; the `r` rows from there, of which rows
/// past `r` repeat the last so that nothing past A is read), `b` at the panel's (NR f32 per
/// k); one broadcast per row and one `vfmadd231ps` per row and vector of B for each k.
/// `next` = (first value, rows, values of k) of the rows of A the next call reads, which it
/// prefetches one cache line per row every 16 values of k. A's rows are read where they lie
/// (an f32 conv weight, a Winograd transform, an activation): the next block's 8 rows are 8
/// streams a few lines long, which the hardware prefetchers do not pick up in time; on the
/// sd-turbo U-Net (Zen 4, alternating calls in one process) 0.94–0.95 of the time at a 32²
/// latent, 0.98 at 48².
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_f32<const V: usize>(
    pc: usize,
    (a, lda): (*const u32, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    r: usize,
    cols: usize,
    accumulate: bool,
    next: Option<(*const u32, usize, usize)>,
) {
    use std::arch::x86_64::*;
    debug_assert!(V == 2 || cols <= 16, "one vector holds 16 columns");
    debug_assert!(r >= 1);
    let b = b.cast::<f32>();
    // SAFETY (whole body): reads pc floats of r rows of A from `a` and pc·NR from `b`, the
    // caller's blocks; writes r rows × cols columns of C (masked), the caller's block.
    unsafe {
        let rows: [*const f32; MR] =
            std::array::from_fn(|i| a.cast::<f32>().add(i.min(r - 1) * lda));
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        // The next call's rows of A, one cache line of each row per 16 values of k.
        let (na, nr, npc) = next.unwrap_or((a, 0, 0));
        let na = na.cast::<i8>();
        for p in 0..pc {
            if p % 16 == 0 && p < npc {
                for i in 0..nr {
                    // Never dereferenced: a hint, in bounds of the next call's rows.
                    _mm_prefetch::<_MM_HINT_T0>(na.wrapping_add(4 * (i * lda + p)));
                }
            }
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm512_loadu_ps(b.add(p * NR + 16 * v));
            }
            for (row, &ai) in acc.iter_mut().zip(&rows) {
                let av = _mm512_set1_ps(*ai.add(p));
                for (acc, &bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
        }
        store_block(&acc, c, ldc, r, cols, accumulate);
    }
}

/// Writes (or, where `accumulate`, adds to) `C[0..r, 0..cols]` the microkernel's sums `acc`
/// (row i, vector v: columns 16·v .. 16·v + 16), masked at `cols`.
///
/// # Safety
/// C's r rows × cols columns from `c` (rows `ldc` apart) are the caller's to write; `V` is 2
/// or `cols ≤ 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_block<const V: usize>(
    acc: &[[std::arch::x86_64::__m512; V]; MR],
    c: *mut f32,
    ldc: usize,
    r: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = (first_lanes(cols), first_lanes(cols.saturating_sub(16)));
    // SAFETY: masked loads and stores within the caller's block.
    unsafe {
        for (i, row) in acc.iter().enumerate().take(r) {
            let dst = c.add(i * ldc);
            // Columns 16.. may lie past C's end where cols ≤ 16 (their mask is then empty):
            // no `add` beyond the allocation.
            let dst1 = dst.wrapping_add(16);
            let (mut v0, mut v1) = (row[0], row[V - 1]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
                if m1 != 0 {
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst1));
                }
            }
            _mm512_mask_storeu_ps(dst, m0, v0);
            if m1 != 0 {
                _mm512_mask_storeu_ps(dst1, m1, v1);
            }
        }
    }
}

/// [`block_avx512`]'s f32 loop for CPUs with AVX2 and FMA but no AVX-512 ([`F32Isa::Avx2`]):
/// the same operands and chunks of k; each panel in two halves of 16 columns (8 KiB of a
/// chunk of B, in L1), each half against the task's rows [`MR_AVX2`] at a time
/// ([`micro_f32_avx2`]).
///
/// # Safety
/// As [`block_avx512`], for [`Kernel::F32`] operands on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(
    a: &ARef,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
) {
    for_chunks_and_panels(b, pans, |p0, pc, pan, (j0, cols)| {
        for h in 0..cols.div_ceil(16) {
            let hc = 16.min(cols - 16 * h);
            let bp = b.data[(pan * b.slots() + p0) * NR + 16 * h..].as_ptr();
            let mut i0 = rows.start;
            while i0 < rows.end {
                let r = MR_AVX2.min(rows.end - i0);
                let ap = a.data[i0 * a.lda + p0..].as_ptr();
                // SAFETY: A's rows i0 .. i0 + r and B's half panel hold pc values from p0
                // on; C's block (r rows × hc columns) is inside this task's region; the CPU
                // runs AVX2 and FMA. A half of 8 columns or fewer takes one vector.
                let ci = c.add(i0 * ldc + j0 + 16 * h);
                let acc = p0 > 0;
                unsafe {
                    if hc > 8 {
                        micro_f32_avx2::<2>(pc, (ap, a.lda), bp, ci, ldc, r, hc, acc);
                    } else {
                        micro_f32_avx2::<1>(pc, (ap, a.lda), bp, ci, ldc, r, hc, acc);
                    }
                }
                i0 += MR_AVX2;
            }
        }
    });
}

/// [`micro_f32`] on ymm registers: `C[0..r, 0..cols] (+)= A_rows · B_half` over `pc` values of
/// k, `r ≤ MR_AVX2` rows (rows past `r` repeat the last, so nothing past A is read), `b` at
/// the half panel's first value (rows of B [`NR`] floats apart), `V` vectors of 8 columns (2,
/// or 1 where `cols ≤ 8`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_f32_avx2<const V: usize>(
    pc: usize,
    (a, lda): (*const u32, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    r: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(V == 2 || cols <= 8, "one vector holds 8 columns");
    debug_assert!((1..=MR_AVX2).contains(&r) && cols <= 16);
    let b = b.cast::<f32>();
    // SAFETY (whole body): reads pc floats of r rows of A from `a` and 8·V of each of pc rows
    // of B from `b`, the caller's blocks; writes r rows × cols columns of C, the caller's
    // block (whole vectors only where all 8 columns are C's, else element by element).
    unsafe {
        let rows: [*const f32; MR_AVX2] =
            std::array::from_fn(|i| a.cast::<f32>().add(i.min(r - 1) * lda));
        let mut acc = [[_mm256_setzero_ps(); V]; MR_AVX2];
        for p in 0..pc {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm256_loadu_ps(b.add(p * NR + 8 * v));
            }
            for (row, &ai) in acc.iter_mut().zip(&rows) {
                let av = _mm256_broadcast_ss(&*ai.add(p));
                for (acc, &bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(av, bv, *acc);
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(r) {
            let dst = c.add(i * ldc);
            for (v, &sum) in row.iter().enumerate() {
                let n = cols.saturating_sub(8 * v).min(8);
                if n == 8 {
                    let d = dst.add(8 * v);
                    let s = if accumulate {
                        _mm256_add_ps(sum, _mm256_loadu_ps(d))
                    } else {
                        sum
                    };
                    _mm256_storeu_ps(d, s);
                } else {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
                    for (j, &x) in lanes.iter().enumerate().take(n) {
                        let d = dst.add(8 * v + j);
                        *d = if accumulate { *d + x } else { x };
                    }
                }
            }
        }
    }
}

/// The tile configuration `ldtilecfg` reads (palette 1): all eight tiles 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
pub(crate) const TILES_16X64: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// [`block_avx512`] on AMX tiles: for each panel and each block of [`MR_AMX`] rows, the
/// 32 × 32 block of C in tiles 0–3, over all of k in steps of [`KT`] pairs (tiles 4–5 the two
/// 16-row slices of A, each one contiguous KiB; 6–7 the panel's two halves of 16 columns), then
/// stored to C (straight where the block is whole, else through a scratch block clipped to C's
/// edge).
///
/// # Safety
/// As [`block_avx512`], with operands packed for [`Kernel::Amx`] (so the process holds the tile
/// permission).
#[cfg(target_arch = "x86_64")]
unsafe fn block_amx(
    a: &ARef,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
) {
    use std::arch::asm;
    /// 64-byte aligned block of 32 × 32 floats (scratch for a block at C's edge).
    #[repr(C, align(64))]
    struct Block([f32; MR_AMX * NR]);
    let ks = a.lda;
    debug_assert_eq!(ks, b.slots());
    debug_assert_eq!(ks % KT, 0);
    let (m, n) = (a.m, b.cols());
    let mut edge = Block([0.0; MR_AMX * NR]);
    // SAFETY (whole body): tile loads read 1 KiB tiles of A (rows i0 .. i0 + 32 exist: packed A
    // pads to MR_AMX rows; steps of KT pairs below ks) and 16 rows of 64 bytes of B's panel
    // (pairs s .. s + KT, all NR columns, padded); stores write C's block inside this task's
    // region (whole blocks only) or the scratch block.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &TILES_16X64, options(nostack, readonly));
        for pan in pans {
            let j0 = pan * NR;
            let cols = NR.min(n - j0);
            let bp = b.data.as_ptr().add(pan * ks * NR);
            let mut i0 = rows.start;
            while i0 < rows.end {
                let r = MR_AMX.min(m - i0);
                // Two 16-row slices, each ks/KT tiles of 16 × 16 u32.
                let ap0 = a.data.as_ptr().add(i0 * ks);
                let ap1 = ap0.add(16 * ks);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                let mut s = 0;
                while s < ks {
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
                        b0 = in(reg) bp.add(s * NR),
                        b1 = in(reg) bp.add(s * NR + 16),
                        lda = in(reg) 64usize,
                        ldb = in(reg) NR * 4,
                        options(nostack, readonly)
                    );
                    s += KT;
                }
                let whole = r == MR_AMX && cols == NR;
                let (cp, ldcb) = if whole {
                    (c.add(i0 * ldc + j0), ldc * 4)
                } else {
                    (edge.0.as_mut_ptr(), NR * 4)
                };
                asm!(
                    "tilestored [{c0} + {ldc}*1], tmm0",
                    "tilestored [{c1} + {ldc}*1], tmm1",
                    "tilestored [{c2} + {ldc}*1], tmm2",
                    "tilestored [{c3} + {ldc}*1], tmm3",
                    c0 = in(reg) cp,
                    c1 = in(reg) cp.add(16),
                    c2 = in(reg) cp.byte_add(16 * ldcb),
                    c3 = in(reg) cp.byte_add(16 * ldcb).add(16),
                    ldc = in(reg) ldcb,
                    options(nostack)
                );
                if !whole {
                    for i in 0..r {
                        std::ptr::copy_nonoverlapping(
                            edge.0.as_ptr().add(i * NR),
                            c.add((i0 + i) * ldc + j0),
                            cols,
                        );
                    }
                }
                i0 += MR_AMX;
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn round(x: f32) -> f32 {
        bf16_to_f32(bf16_bits(x))
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 1.0);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties to the even (1.0).
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round(-2.5), -2.5);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert_eq!(round(1e-40).to_bits(), 0);
        assert_eq!(round(-1e-40).to_bits(), 0x8000_0000);
    }

    /// The task grid cuts C into non-empty parts within MC rows and NC_PANELS panels that
    /// cover it, and evens out the waves where the coarsest grid would not.
    #[test]
    fn task_grid_covers_c_in_cache_sized_balanced_tasks() {
        for (blocks, panels, threads) in [(160, 1, 2), (8, 40, 2), (1, 1, 2), (33, 9, 3), (5, 7, 1)]
        {
            let (rows, cols) = task_grid(blocks, panels, threads, MC / MR);
            assert!(rows >= 1 && rows <= blocks && cols >= 1 && cols <= panels);
            for (parts, n, most) in [(rows, blocks, MC / MR), (cols, panels, NC_PANELS)] {
                assert_eq!(even_split(n, parts, 0), 0);
                assert_eq!(even_split(n, parts, parts), n);
                for i in 0..parts {
                    let len = even_split(n, parts, i + 1) - even_split(n, parts, i);
                    assert!(
                        len >= 1 && len <= most,
                        "{blocks}x{panels}: part {i} of {parts}"
                    );
                }
            }
        }
        // 1280 rows, one panel, two threads: 8 tasks of 20 blocks (4 + 4), not 7 (4 + 3).
        assert_eq!(task_grid(160, 1, 2, MC / MR), (8, 1));
    }

    /// The product equals an f32 product of the inputs (bf16-rounded for the bf16 kernels) up
    /// to summation order, for shapes that are not multiples of the blocks, odd k, k over
    /// several chunks, row strides larger than the rows, and both ways of packing B; on every
    /// kernel this CPU runs.
    #[test]
    fn matches_f32_product_of_rounded_inputs() {
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        let mut seed = 7;
        for (m, n, k) in [
            (3, 5, 0),
            (1, 1, 1),
            (8, 32, 2),
            (9, 33, 3),
            (64, 100, 576),
            (77, 320, 1024),
            (200, 70, 301),
            (3, 500, 2880),
            (400, 16, 130),
            (250, 12, 40),
            (24, 600, 64),
        ] {
            let lda = k + 3;
            let ldb = n + 5;
            let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..k * ldb).map(|_| lcg(&mut seed)).collect();
            for &kernel in &kernels {
                let round = |x: f32| if kernel == Kernel::F32 { x } else { round(x) };
                let mut want = vec![0f64; m * n];
                for i in 0..m {
                    for p in 0..k {
                        let x = f64::from(round(a[i * lda + p]));
                        for j in 0..n {
                            want[i * n + j] += x * f64::from(round(b[p * ldb + j]));
                        }
                    }
                }
                let pa = PackedA::from_rows(kernel, &a, (m, k, lda), true);
                let pa1 = PackedA::from_rows(kernel, &a, (m, k, lda), false);
                assert_eq!(pa.data, pa1.data);
                let mut pb = PackedB::default();
                pb.repack_rows(kernel, &b, (k, n, ldb), true);
                let mut pb1 = PackedB::default();
                pb1.repack_rows(kernel, &b, (k, n, ldb), false);
                assert_eq!(pb.data, pb1.data);
                // B given transposed, as a linear weight.
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * ldb + i / k]).collect();
                let pbt = PackedB::from_transposed(kernel, &bt, (n, k, k));
                assert_eq!(pb.data, pbt.data, "{m}x{n}x{k}: the two packings differ");
                check_product(&pa, &pb, &want, (m, n, k), kernel);
            }
        }
    }

    /// `a · b` (serial and parallel) against `want` (`m × n`, f64), C's padding untouched.
    fn check_product(
        pa: &PackedA,
        pb: &PackedB,
        want: &[f64],
        (m, n, k): (usize, usize, usize),
        kernel: Kernel,
    ) {
        let ldc = n + 2;
        for parallel in [false, true] {
            let mut c = vec![f32::NAN; m * ldc];
            // SAFETY: c holds m rows of ldc ≥ n floats.
            unsafe { matmul(pa, pb, c.as_mut_ptr(), ldc, parallel) };
            check_c(&c, want, (m, n, k, ldc), kernel);
        }
        // Each copy of the f32 microkernel this CPU runs (the process uses one).
        if kernel == Kernel::F32 {
            for &isa in F32Isa::all_here() {
                let a = ARef {
                    data: &pa.data,
                    m: pa.m,
                    k: pa.k,
                    lda: pa.slots(),
                    kernel,
                };
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: c holds m rows of ldc ≥ n floats; the CPU runs `isa`.
                unsafe { matmul_on(&a, pb, (c.as_mut_ptr(), ldc), true, Some(isa)) };
                check_c(&c, want, (m, n, k, ldc), kernel);
            }
        }
    }

    /// C (`m` rows `ldc` apart, NaN past column `n`) against `want` (`m × n`, f64): within
    /// 1e-5 of its scale, the padding untouched.
    fn check_c(
        c: &[f32],
        want: &[f64],
        (m, n, k, ldc): (usize, usize, usize, usize),
        kernel: Kernel,
    ) {
        let scale = want.iter().fold(0f64, |s, v| s.max(v.abs())).max(1e-30);
        for i in 0..m {
            for j in 0..n {
                let d = (f64::from(c[i * ldc + j]) - want[i * n + j]).abs() / scale;
                assert!(d < 1e-5, "{kernel:?} {m}x{n}x{k} ({i},{j}): {d}");
            }
            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
        }
    }

    /// [`matmul_rows`] (A as rows `lda` > k apart, read in place in f32 or packed into a
    /// scratch that held another operand, for bf16) equals the product of the same values,
    /// on every kernel, serial and parallel.
    #[test]
    fn matmul_rows_reads_strided_rows() {
        let mut seed = 11;
        for (m, n, k) in [(1, 1, 1), (9, 33, 3), (77, 70, 301), (200, 40, 1030)] {
            let lda = k + 5;
            let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            for kernel in kernels_here() {
                let round = |x: f32| if kernel == Kernel::F32 { x } else { round(x) };
                let mut want = vec![0f64; m * n];
                for i in 0..m {
                    for p in 0..k {
                        let x = f64::from(round(a[i * lda + p]));
                        for j in 0..n {
                            want[i * n + j] += x * f64::from(round(b[p * n + j]));
                        }
                    }
                }
                let mut pb = PackedB::default();
                pb.repack_rows(kernel, &b, (k, n, n), false);
                let mut scratch = PackedA::from_rows(kernel, &[0.5; 21], (3, 7, 7), false);
                let ldc = n + 2;
                for parallel in [false, true] {
                    let mut c = vec![f32::NAN; m * ldc];
                    // SAFETY: c holds m rows of ldc ≥ n floats, apart from `a`.
                    unsafe {
                        let c = (c.as_mut_ptr(), ldc);
                        matmul_rows(&mut scratch, &a, (m, k, lda), &pb, c, parallel);
                    }
                    check_c(&c, &want, (m, n, k, ldc), kernel);
                }
            }
        }
    }

    /// Not a check: each copy of the f32 kernel on the U-Net's product shapes at a 32² latent
    /// (`m × k · k × n`, A read in place with rows k apart), in GFLOP/s:
    /// `cargo test --release -p sdcam-core --lib bench_f32_shapes -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_f32_shapes() {
        if !f32_available() {
            return;
        }
        let mut seed = 5;
        for (what, m, k, n) in [
            ("2048³", 2048, 2048, 2048),
            ("2048³, lda 2064", 2048, 2064, 2048),
            ("level 0 Winograd ξ", 320, 320, 256),
            ("level 1 im2col", 640, 5760, 256),
            ("level 2 im2col", 1280, 11520, 64),
            ("level 3 im2col", 1280, 11520, 16),
            ("linear 1024×320→1280", 1024, 320, 1280),
            ("linear 256×640→640", 256, 640, 640),
            ("linear 64×1280→1280", 64, 1280, 1280),
            ("linear 1024×320→2560", 1024, 320, 2560),
            ("F(2×2) ξ at 16², one thread", 640, 640, 32),
            ("sd15 GEGLU 2048×320→2560", 2048, 320, 2560),
            ("sd15 GEGLU cold 2048×320→2560", 2048, 320, 2560),
        ] {
            // "cold": before each call the caches are flushed (64 MiB written) and C is a new
            // allocation, as in a U-Net forward; "one thread": not on rayon's pool, as the
            // Winograd products run (one task each).
            let cold = what.contains("cold");
            let mut flush = vec![0f32; if cold { 16 << 20 } else { 0 }];
            let parallel = !what.ends_with("one thread");
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let mut c0 = vec![0f32; m * n];
            let mut pb = PackedB::default();
            pb.repack_rows(Kernel::F32, &b, (k, n, n), true);
            // SAFETY: f32 and u32 have the same size and alignment.
            let data = unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u32>(), a.len()) };
            let ar = ARef {
                data,
                m,
                k,
                lda: k,
                kernel: Kernel::F32,
            };
            for &isa in F32Isa::all_here() {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    for (i, x) in flush.iter_mut().enumerate() {
                        *x += i as f32;
                    }
                    let mut c = vec![0f32; if cold { m * n } else { 0 }];
                    let t = std::time::Instant::now();
                    let cp = if cold {
                        c.as_mut_ptr()
                    } else {
                        c0.as_mut_ptr()
                    };
                    // SAFETY: c holds m × n floats, touched by nothing else; the CPU runs `isa`.
                    unsafe { matmul_on(&ar, &pb, (cp, n), parallel, Some(isa)) };
                    drop(c);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
                eprintln!(
                    "{what} ({m}×{k}·{n}) {isa:?}: {:.2} ms, {gflops:.0} GFLOP/s",
                    best * 1e3
                );
            }
        }
    }

    /// Not a check: each kernel's rate on a 2048³ product (A packed, or read in place by the
    /// f32 kernel, on every call; B packed beforehand; rayon's pool), in GFLOP/s, to set next to
    /// the machine's peak that `scripts/bench/cpu_vs_peers.py` measures with torch:
    /// `cargo test --release -p sdcam-core --lib bench_kernels -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_kernels() {
        let n = 2048;
        let mut seed = 3;
        let a: Vec<f32> = (0..n * n).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..n * n).map(|_| lcg(&mut seed)).collect();
        let mut c = vec![0f32; n * n];
        for kernel in kernels_here() {
            let mut pb = PackedB::default();
            pb.repack_rows(kernel, &b, (n, n, n), true);
            let mut scratch = PackedA::default();
            let isas: Vec<Option<F32Isa>> = if kernel == Kernel::F32 {
                F32Isa::all_here().iter().copied().map(Some).collect()
            } else {
                vec![None]
            };
            for isa in isas {
                let mut best = f64::MAX;
                for _ in 0..4 {
                    let t = std::time::Instant::now();
                    // SAFETY: c holds n × n floats, touched by nothing else; the CPU runs `isa`.
                    unsafe {
                        if kernel == Kernel::F32 {
                            let data = std::slice::from_raw_parts(a.as_ptr().cast::<u32>(), n * n);
                            let ar = ARef {
                                data,
                                m: n,
                                k: n,
                                lda: n,
                                kernel,
                            };
                            matmul_on(&ar, &pb, (c.as_mut_ptr(), n), true, isa);
                        } else {
                            let c = (c.as_mut_ptr(), n);
                            matmul_rows(&mut scratch, &a, (n, n, n), &pb, c, true);
                        }
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let gflops = 2.0 * (n as f64).powi(3) / best / 1e9;
                eprintln!(
                    "{kernel:?} {isa:?}: {n}³ in {:.1} ms, {gflops:.0} GFLOP/s",
                    best * 1e3
                );
            }
        }
    }
}
