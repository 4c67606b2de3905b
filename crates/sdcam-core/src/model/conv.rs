//! 2-D convolution for the U-Net: on the CPU in f32, im2col straight from NCHW plus one matrix
//! product per call against the kernel as loaded, `[c_out, c_in·k·k]`, so the output comes out
//! in NCHW and neither the input nor the kernel is re-laid out per call (candle 0.11's CPU
//! `conv2d` converts the input to NHWC and copies the kernel element by element on every call,
//! which costs as much as the product itself for the 1280-channel convs at small latents).
//! 1×1 convs are a plain matrix product; 3×3 stride-1 padding-1 convs over at least
//! [`WINOGRAD_MIN_TILES`] output tiles and with at most [`WINOGRAD_MAX_CHANNEL_PAIRS`] take
//! Winograd's F(4×4, 3×3) on the f32 packed products and F(2×2, 3×3) elsewhere
//! (`model::winograd`, 4× and 2.25× fewer multiply-adds), and on the f32 packed products
//! F(2×2, 3×3) from [`WINOGRAD_F2_MIN_TILES_F32`] tiles (16×16) up too; `SDCAM_WINOGRAD=2` in
//! the environment keeps F(2×2) everywhere and `SDCAM_WINOGRAD=0` turns Winograd off, for
//! comparisons. Other
//! devices and dtypes use candle's `conv2d`. Where `packed_gemm::products_for` picks a kernel
//! (f32 on CPUs with AVX-512 or AVX2, bf16 with `model.dtype = "bf16"`) the same paths multiply
//! with `model::packed_gemm`'s packed products instead of candle's: the weight (or the Winograd
//! filter transform) is packed once, each tile of im2col (or each Winograd `V`) is packed as it
//! is made; in bf16, 3×3 stride-1 convs with few input channels (all of them on AMX, where the
//! tiles fit) run as a direct implicit GEMM instead (`model::direct_conv`). The candle-product
//! paths stay for CPUs without AVX2 (and `SDCAM_F32_KERNEL=0`).
//!
//! On the Winograd, tiled and packed paths the bias, and where the caller asks
//! ([`Conv2d::forward_fused`]) a residual and a ReLU, are applied by the kernel to each output
//! row as it is written ([`Epilogue`]), not in passes of their own over the whole output (the
//! small-im2col and 1×1 convs, one candle product each, add them as tensor ops).
//!
//! Drop-in for `candle_nn::{conv2d, Conv2d}`: same constructor, same tensor names. Used by the
//! U-Net, TAESD and the VAE.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};

use crate::model::direct_conv::{self, DirectConv3x3};
use crate::model::packed_gemm::{self, f32_params, products_for, Kernel, PackedA, PackedB};
use crate::model::winograd::{
    pack_filter_transforms, transform_filter, PackedWinograd, Tile, Winograd,
};
use crate::model::{cpu_f32, matmul_into, SendPtr};

/// Fewest 2×2 output tiles (32×32 output pixels) for which a 3×3 conv takes the Winograd path:
/// below that the filter transform and the per-block overheads outweigh the saving.
pub(crate) const WINOGRAD_MIN_TILES: usize = 256;

/// Most (output × input) channel pairs of a conv that takes the Winograd path (640 × 1920: the
/// U-Net's second level). Its cached filter transform is 16/9 of the conv's weight with
/// F(2×2, 3×3), 36/9 with F(4×4, 3×3) (at most 79 / 177 MB here), kept for the life of the
/// model; wider convs keep im2col + GEMM.
pub(crate) const WINOGRAD_MAX_CHANNEL_PAIRS: usize = 640 * 1920;

/// Which Winograd transforms may run: `SDCAM_WINOGRAD=0` none, `=2` F(2×2, 3×3) only (both
/// for comparisons), otherwise F(4×4, 3×3) too where the f32 packed products run (read once).
#[derive(Clone, Copy, PartialEq, Eq)]
enum WinogradMode {
    Off,
    F2Only,
    Both,
}

fn winograd_mode() -> WinogradMode {
    static MODE: OnceLock<WinogradMode> = OnceLock::new();
    *MODE.get_or_init(
        || match std::env::var("SDCAM_WINOGRAD").as_deref().map(str::trim) {
            Ok("0") => WinogradMode::Off,
            Ok("2") => WinogradMode::F2Only,
            _ => WinogradMode::Both,
        },
    )
}

/// Whether the Winograd path is on (`SDCAM_WINOGRAD=0` turns it off).
fn winograd_enabled() -> bool {
    winograd_mode() != WinogradMode::Off
}

/// Fewest 2×2 output tiles (16×16 output pixels) for which a 3×3 conv takes F(2×2, 3×3) on the
/// f32 packed products, where it has too few tiles for F(4×4) ([`WINOGRAD_MIN_TILES`]): the
/// U-Net's second level at a 32² latent (640 channels at 16²) and its third at a 64² latent.
/// On a 2-core Zen 4 `tests::bench_conv_paths` (best of 7) put F(2×2) at 0.28–0.51 of the
/// im2col path's time there (that test's im2col pays page faults on the system allocator that
/// the binary's mimalloc does not: 640→640 at 16² took 19.4 ms there, its bare product 10.6),
/// and the whole U-Net at a 32² latent took 0.93–0.94 of its time (fastest calls, alternating).
/// At 8² (16 tiles) im2col is faster (F(2×2) 1.21×, F(4×4) 2.9× its time).
pub(crate) const WINOGRAD_F2_MIN_TILES_F32: usize = 64;

use candle_nn::{Conv2dConfig, VarBuilder};

/// A 2-D convolution (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    /// candle's convolution over the same weight (other devices / dtypes).
    inner: candle_nn::Conv2d,
    /// The weight as `[c_out, c_in·k_h·k_w]` (a view of the loaded tensor, no copy).
    weight2d: Tensor,
    /// Bias as `[c_out, 1, 1]` (broadcast over the pixels of the NCHW output).
    bias: Option<Tensor>,
    /// The same bias as floats where it is an f32 CPU tensor (for the kernels' epilogue).
    bias_f32: Option<Arc<[f32]>>,
    k_h: usize,
    k_w: usize,
    cfg: Conv2dConfig,
    /// The Winograd filter transform `[16, c_out, c_in]`, made on first use; `None` when the
    /// conv is not 3×3 with stride 1 and padding 1.
    winograd: Option<OnceLock<Tensor>>,
    /// For the packed products: their kernel, the packed weight and filter transforms, made
    /// on first use (`None`: candle's products).
    packed: Option<Arc<PackedFilters>>,
}

/// A conv's weights packed for the products of `kernel`.
#[derive(Debug, Default)]
struct PackedFilters {
    kernel: Kernel,
    /// `[c_out, c_in·k_h·k_w]` (bf16 only: in f32 the product reads the weight as it is).
    im2col: OnceLock<Arc<PackedA>>,
    /// `U[ξ]` `[c_out, c_in]` for ξ < 16 (F(2×2, 3×3)), made where the conv first takes
    /// F(2×2) ([`Conv2d::packed_winograd_tile`]).
    winograd_f2: OnceLock<Arc<Vec<PackedA>>>,
    /// `U[ξ]` `[c_out, c_in]` for ξ < 36 (F(4×4, 3×3), f32 only), likewise. A conv that runs
    /// at both kinds of sizes (a U-Net used at two latent sizes) keeps both.
    winograd_f4: OnceLock<Arc<Vec<PackedA>>>,
    /// The nine taps `[c_out, c_in]` for `model::direct_conv`.
    direct_taps: OnceLock<Arc<Vec<PackedA>>>,
}

/// `candle_nn::conv2d` (weight `[out, in, k, k]`, bias `[out]`) as a [`Conv2d`], with the
/// packed products `packed_gemm::products_for` picks for `vb` (an error where it asks for bf16
/// on a CPU without AVX512-BF16).
pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let kernel = products_for(&vb)?;
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, f32_params(vb))?;
    Conv2d::with_products(inner, kernel)
}

/// `candle_nn::conv2d_no_bias` as a [`Conv2d`] (see [`conv2d`]).
pub(crate) fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let kernel = products_for(&vb)?;
    let inner =
        candle_nn::conv2d_no_bias(in_channels, out_channels, kernel_size, cfg, f32_params(vb))?;
    Conv2d::with_products(inner, kernel)
}

impl Conv2d {
    /// Wraps a candle convolution (candle's f32 products).
    #[cfg(test)]
    pub(crate) fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        Self::with_products(inner, None)
    }

    /// Wraps a candle convolution, with the packed products of `kernel` on the CPU where given.
    fn with_products(inner: candle_nn::Conv2d, kernel: Option<Kernel>) -> Result<Self> {
        let w = inner.weight().contiguous()?;
        let (c_out, c_in, k_h, k_w) = w.dims4()?;
        let weight2d = w.reshape((c_out, c_in * k_h * k_w))?;
        let bias = inner.bias().map(|b| b.reshape((c_out, 1, 1))).transpose()?;
        let bias_f32 = match inner.bias() {
            Some(b) if b.device().is_cpu() && b.dtype() == DType::F32 => {
                Some(Arc::from(b.to_vec1::<f32>()?))
            }
            _ => None,
        };
        let cfg = *inner.config();
        let winograd = (k_h == 3
            && k_w == 3
            && cfg.stride == 1
            && cfg.padding == 1
            && cfg.dilation == 1
            && cfg.groups == 1)
            .then(OnceLock::new);
        Ok(Self {
            inner,
            weight2d,
            bias,
            bias_f32,
            k_h,
            k_w,
            cfg,
            winograd,
            packed: kernel.map(|kernel| {
                Arc::new(PackedFilters {
                    kernel,
                    ..Default::default()
                })
            }),
        })
    }

    /// The Winograd transform this conv takes on the packed products of `kernel` for an
    /// `h × w` input, if any: in f32, F(4×4, 3×3) from [`WINOGRAD_MIN_TILES`] 2×2 tiles up
    /// (32×32 pixels; F(4×4) took 0.59–0.84 of F(2×2)'s time there on TAESD's and the
    /// U-Net's convs, `tests::bench_conv_paths` on AVX-512, best of 7; F(2×2) with
    /// `SDCAM_WINOGRAD=2`) and F(2×2, 3×3) from [`WINOGRAD_F2_MIN_TILES_F32`] (16×16, where
    /// F(4×4)'s products are too narrow: 1.3–1.6× F(2×2)'s time); in bf16 F(2×2) from
    /// [`WINOGRAD_MIN_TILES`]. None above [`WINOGRAD_MAX_CHANNEL_PAIRS`], with
    /// `SDCAM_WINOGRAD=0`, or when the conv is not 3×3 with stride 1 and padding 1.
    fn packed_winograd_tile(&self, kernel: Kernel, h: usize, w: usize) -> Result<Option<Tile>> {
        if !self.winograd_allowed()? {
            return Ok(None);
        }
        let tiles = Tile::F2.tiles(h, w);
        Ok(match kernel {
            Kernel::F32 if tiles >= WINOGRAD_MIN_TILES && winograd_mode() == WinogradMode::Both => {
                Some(Tile::F4)
            }
            Kernel::F32 if tiles >= WINOGRAD_F2_MIN_TILES_F32 => Some(Tile::F2),
            _ if tiles >= WINOGRAD_MIN_TILES => Some(Tile::F2),
            _ => None,
        })
    }

    /// Whether Winograd may run for this conv at any size: 3×3 with stride 1 and padding 1, at
    /// most [`WINOGRAD_MAX_CHANNEL_PAIRS`], and not `SDCAM_WINOGRAD=0`.
    fn winograd_allowed(&self) -> Result<bool> {
        let (c_out, rows) = self.weight2d.dims2()?;
        Ok(self.winograd.is_some()
            && c_out * (rows / 9) <= WINOGRAD_MAX_CHANNEL_PAIRS
            && winograd_enabled())
    }

    /// Whether this conv takes the Winograd path for an `h × w` input on candle's products.
    fn takes_winograd(&self, h: usize, w: usize) -> Result<bool> {
        Ok(self.winograd_allowed()? && Tile::F2.tiles(h, w) >= WINOGRAD_MIN_TILES)
    }

    /// The Winograd filter transform, if this conv takes that path for an `h × w` input.
    fn winograd_filter(&self, h: usize, w: usize) -> Result<Option<Tensor>> {
        let Some(cell) = &self.winograd else {
            return Ok(None);
        };
        if !self.takes_winograd(h, w)? {
            return Ok(None);
        }
        if let Some(u) = cell.get() {
            return Ok(Some(u.clone()));
        }
        let (c_out, rows) = self.weight2d.dims2()?;
        let wt = self.weight2d.flatten_all()?.to_vec1::<f32>()?;
        let u = Tensor::from_vec(
            transform_filter(&wt, c_out, rows / 9, Tile::F2),
            (16, c_out, rows / 9),
            self.weight2d.device(),
        )?;
        // Two threads may both compute it; either result is the same.
        Ok(Some(cell.get_or_init(|| u).clone()))
    }

    /// The packed product for an `h × w` input (`f` this conv's packed weights): the direct 3×3
    /// conv, Winograd or tiled im2col, each's packed weights made on first use (two threads may both make one, with the same
    /// result).
    fn packed_op<'a>(
        &self,
        f: &PackedFilters,
        h: usize,
        w: usize,
        im2col: Im2Col,
        epilogue: Epilogue<'a>,
    ) -> Result<PackedOp<'a>> {
        let (c_out, rows) = self.weight2d.dims2()?;
        // 3×3, stride 1, padding 1 (what Winograd takes) as a direct conv where it is faster
        // (AMX tiles where the shapes fit, AVX-512 where the channels are few).
        if self.winograd.is_some() && direct_conv::applies(f.kernel, rows / 9, c_out, w) {
            let taps = match f.direct_taps.get() {
                Some(t) => t.clone(),
                None => {
                    let wt = self.weight2d.flatten_all()?.to_vec1::<f32>()?;
                    let taps = Arc::new(direct_conv::pack_taps(f.kernel, &wt, c_out, rows / 9));
                    f.direct_taps.get_or_init(|| taps).clone()
                }
            };
            return Ok(PackedOp::Direct(DirectConv3x3 { taps, epilogue }));
        }
        if let Some(tile) = self.packed_winograd_tile(f.kernel, h, w)? {
            let cell = match tile {
                Tile::F2 => &f.winograd_f2,
                Tile::F4 => &f.winograd_f4,
            };
            let u = match cell.get() {
                Some(u) => u.clone(),
                None => {
                    let wt = self.weight2d.flatten_all()?.to_vec1::<f32>()?;
                    let packed = pack_filter_transforms(f.kernel, &wt, c_out, rows / 9, tile, true);
                    cell.get_or_init(|| packed).clone()
                }
            };
            return Ok(PackedOp::Winograd(PackedWinograd {
                k: c_out,
                tile,
                u,
                epilogue,
            }));
        }
        // In f32 the kernel reads the weight's rows as they are: no packed copy.
        let a = if f.kernel == Kernel::F32 {
            None
        } else {
            Some(match f.im2col.get() {
                Some(a) => a.clone(),
                None => {
                    let w = self.weight2d.flatten_all()?.to_vec1::<f32>()?;
                    let a = Arc::new(PackedA::from_rows(f.kernel, &w, (c_out, rows, rows), true));
                    f.im2col.get_or_init(|| a).clone()
                }
            })
        };
        Ok(PackedOp::Im2Col(PackedConv {
            im2col,
            w: a,
            epilogue,
        }))
    }

    fn fast_path(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight2d.dtype() == DType::F32
            && self.cfg.groups == 1
            && self.cfg.dilation == 1
            && xs.rank() == 4
            && (self.bias.is_none() || self.bias_f32.is_some())
    }

    /// `relu(conv(x))` (see [`Conv2d::forward_fused`]).
    pub(crate) fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, None, true)
    }

    /// `conv(x) + residual`, then ReLU where `relu`. On the CPU's Winograd, tiled and packed
    /// paths the kernel applies the bias, the residual and the ReLU to each output row as it
    /// writes it; elsewhere (other devices and dtypes, and, without packed products, the
    /// small-im2col and 1×1 convs that are one candle product) they are tensor ops after the
    /// convolution. Same values either
    /// way: the sums are made in the same order.
    ///
    /// # Errors
    /// An input that does not fit the conv, or a residual that is not f32 of the output's
    /// shape (checked before the convolution runs) or not on the input's device.
    pub(crate) fn forward_fused(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let unfused = |ys: Tensor| -> Result<Tensor> {
            let ys = match residual {
                Some(r) => (ys + r)?,
                None => ys,
            };
            if relu {
                ys.relu()
            } else {
                Ok(ys)
            }
        };
        if !self.fast_path(xs) {
            return unfused(self.inner.forward(xs)?);
        }
        let (b, c_in, h, w) = xs.dims4()?;
        let p = &self.cfg;
        let (k_h, k_w) = (self.k_h, self.k_w);
        if h + 2 * p.padding < k_h || w + 2 * p.padding < k_w {
            return unfused(self.inner.forward(xs)?);
        }
        let oh = (h + 2 * p.padding - k_h) / p.stride + 1;
        let ow = (w + 2 * p.padding - k_w) / p.stride + 1;
        let (c_out, rows) = self.weight2d.dims2()?;
        if let Some(r) = residual {
            if r.dims() != [b, c_out, oh, ow] || r.dtype() != DType::F32 {
                candle_core::bail!(
                    "conv: residual {:?} {:?} does not fit the output [{b}, {c_out}, {oh}, {ow}] f32",
                    r.dims(),
                    r.dtype()
                );
            }
        }
        let xs = xs.contiguous()?;
        let im2col = Im2Col {
            k_h,
            k_w,
            stride: p.stride,
            padding: p.padding,
        };
        let tiled = rows * oh * ow * 4 > TILED_ABOVE_BYTES;
        if self.packed.is_none() && !tiled && !self.takes_winograd(h, w)? {
            // Small im2col or 1×1: one candle product, then the bias, residual and ReLU as
            // tensor ops.
            let cols = if k_h == 1 && k_w == 1 && p.stride == 1 && p.padding == 0 {
                xs.reshape((b, c_in, h * w))?
            } else {
                xs.apply_op1_no_bwd(&im2col)?
            };
            // [c_out, K] @ [b, K, oh·ow]: the weight is broadcast over the batch (stride 0),
            // which candle's CPU matmul runs as one product per sample.
            let ys = self
                .weight2d
                .broadcast_left(b)?
                .matmul(&cols)?
                .reshape((b, c_out, oh, ow))?;
            let ys = match &self.bias {
                Some(bias) => ys.broadcast_add(bias)?,
                None => ys,
            };
            return unfused(ys);
        }
        // The kernels' paths: the residual's floats read in place (held for the call).
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let guard = residual.as_ref().map(|r| r.storage_and_layout());
        let residual_f32 = match &guard {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                    Some(&v[layout.start_offset()..][..b * c_out * oh * ow])
                }
                _ => candle_core::bail!("conv: the residual must be on the CPU like the input"),
            },
            None => None,
        };
        let epilogue = Epilogue {
            bias: self.bias_f32.as_deref(),
            residual: residual_f32,
            relu,
            base: 0,
        };
        // Each gives `[b, c_out, oh, ow]` with the epilogue applied.
        if let Some(f) = &self.packed {
            // Built only where the CPU runs the kernel (`products_for`).
            return match self.packed_op(f, h, w, im2col, epilogue)? {
                PackedOp::Winograd(op) => xs.apply_op1_no_bwd(&op),
                PackedOp::Im2Col(op) if op.w.is_some() => xs.apply_op1_no_bwd(&op),
                PackedOp::Im2Col(op) => xs.apply_op2_no_bwd(&self.weight2d, &op),
                PackedOp::Direct(op) => xs.apply_op1_no_bwd(&op),
            };
        }
        match self.winograd_filter(h, w)? {
            Some(u) => xs.apply_op2_no_bwd(&u, &Winograd { k: c_out, epilogue }),
            // A full im2col would not fit in cache (TAESD/VAE at full resolution): tiles.
            None => xs.apply_op2_no_bwd(&self.weight2d, &TiledConv { im2col, epilogue }),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, None, false)
    }
}

/// What a conv's kernel does to each output row as it writes it, instead of passes of their own
/// over the whole output: `relu?(conv + bias + residual)`, summed in that order (the order of
/// the separate tensor ops, so the values are the same).
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    /// One value per output channel.
    pub(crate) bias: Option<&'a [f32]>,
    /// Of the whole output's shape (NCHW, contiguous).
    pub(crate) residual: Option<&'a [f32]>,
    pub(crate) relu: bool,
    /// Offset added to the residual offsets given to [`Epilogue::apply`] ([`Epilogue::image`]).
    base: usize,
}

impl Epilogue<'_> {
    /// Errors where the bias is not `channels` long or the residual not `len`.
    pub(crate) fn check(&self, channels: usize, len: usize, op: &str) -> Result<()> {
        if self.bias.is_some_and(|b| b.len() != channels)
            || self.residual.is_some_and(|r| r.len() != len)
        {
            candle_core::bail!("{op}: the bias or residual does not match the output");
        }
        Ok(())
    }

    /// Whether it leaves the output as it is (no bias, residual or ReLU).
    pub(crate) fn is_noop(&self) -> bool {
        self.bias.is_none() && self.residual.is_none() && !self.relu
    }

    /// The same epilogue for offsets counted from `offset` (an image of the batch).
    pub(crate) fn image(self, offset: usize) -> Self {
        Self {
            base: self.base + offset,
            ..self
        }
    }

    /// Applies the epilogue to `row`, output channel `ch`, which starts at `at` in the output
    /// (from the [`Epilogue::image`] offset).
    #[inline]
    pub(crate) fn apply(&self, ch: usize, at: usize, row: &mut [f32]) {
        let b = self.bias.map(|b| b[ch]);
        match (self.residual, self.relu) {
            (None, false) => {
                if let Some(b) = b {
                    row.iter_mut().for_each(|v| *v += b);
                }
            }
            (None, true) => {
                let b = b.unwrap_or(0.0);
                row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
            }
            (Some(r), relu) => {
                let r = &r[self.base + at..][..row.len()];
                let b = b.unwrap_or(0.0);
                for (v, &r) in row.iter_mut().zip(r) {
                    let s = *v + b + r;
                    *v = if relu { s.max(0.0) } else { s };
                }
            }
        }
    }
}

/// NCHW `[b, c, h, w]` → `[b, c·k_h·k_w, oh·ow]`: row `(c, i, j)` holds input channel `c`
/// shifted by kernel tap `(i, j)` (zero outside the image), the order of the kernel's
/// `[c_out, c_in, k_h, k_w]` flattening.
#[derive(Clone, Copy)]
struct Im2Col {
    k_h: usize,
    k_w: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    /// Output height and width for an `h × w` input.
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        (
            (h + 2 * p - self.k_h) / s + 1,
            (w + 2 * p - self.k_w) / s + 1,
        )
    }

    /// The im2col rows of one image `x` (`[c, h, w]` contiguous) for output rows `oy0..oy1`
    /// into `dst` (`[c·k_h·k_w, (oy1 − oy0)·ow]`, every float written: zero where a tap falls
    /// in the padding), its rows split over rayon's pool where `parallel`.
    fn gather(
        &self,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        oys: (usize, usize),
        dst: &mut [f32],
        parallel: bool,
    ) {
        let (_, ow) = self.out_size(h, w);
        let tn = (oys.1 - oys.0) * ow;
        self.gather_at(x, (c, h, w), oys, dst, (tn, 0), parallel);
    }

    /// [`Im2Col::gather`] into columns `at .. at + (oy1 − oy0)·ow` of rows `row_stride` floats
    /// apart (several images side by side, [`PackedConv::run_batched`]).
    fn gather_at(
        &self,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        oys: (usize, usize),
        dst: &mut [f32],
        (row_stride, at): (usize, usize),
        parallel: bool,
    ) {
        use rayon::prelude::*;
        let (k_h, k_w, s, p) = (self.k_h, self.k_w, self.stride, self.padding);
        let (_, ow) = self.out_size(h, w);
        let (oy0, oy1) = oys;
        let tn = (oy1 - oy0) * ow;
        let rows = c * k_h * k_w;
        if tn == 0 {
            return;
        }
        let one = |(row, d): (usize, &mut [f32])| {
            let d = &mut d[at..][..tn];
            // Zeroed here, in cache just before it is filled, not in a pass of its own.
            d.fill(0.0);
            let ci = row / (k_h * k_w);
            let (i, j) = ((row / k_w) % k_h, row % k_w);
            let plane = &x[ci * h * w..][..h * w];
            // Output columns whose input column `ox·s + j − p` lies inside the image.
            let ox_lo = p.saturating_sub(j).div_ceil(s);
            let ox_hi = ((w + p).saturating_sub(j)).div_ceil(s).min(ow);
            if ox_lo >= ox_hi {
                return;
            }
            for oy in oy0..oy1 {
                let iy = (oy * s + i) as isize - p as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let src_row = &plane[iy as usize * w..][..w];
                let d_row = &mut d[(oy - oy0) * ow..][..ow];
                let ix0 = ox_lo * s + j - p;
                if s == 1 {
                    d_row[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + (ox_hi - ox_lo)]);
                } else {
                    for (k, v) in d_row[ox_lo..ox_hi].iter_mut().enumerate() {
                        *v = src_row[ix0 + k * s];
                    }
                }
            }
        };
        let dst = &mut dst[..rows * row_stride];
        if parallel {
            dst.par_chunks_mut(row_stride).enumerate().for_each(one);
        } else {
            dst.chunks_mut(row_stride).enumerate().for_each(one);
        }
    }

    /// im2col + product tile by tile, into a new NCHW output `[b, c_out, oh, ow]`: each tile of
    /// `tile_rows` whole output rows of one image is gathered (`[c·k_h·k_w, tn]`, in cache) and
    /// handed to `product(scratch, cols, tn, dst)`, which must write the `c_out × tn` product at
    /// `dst` with rows `oh·ow` floats apart (every float, without reading it: the output is not
    /// initialised); then each of its rows gets `epilogue`. Tiles run in
    /// parallel when `parallel`, each thread with its own `scratch` from `init` (else the
    /// epilogue runs in parallel over the channels: the product is then parallel itself).
    #[allow(clippy::too_many_arguments)]
    fn tiles<S>(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        c_out: usize,
        tile_rows: usize,
        parallel: bool,
        epilogue: Epilogue,
        init: impl Fn() -> S + Sync + Send,
        product: impl Fn(&mut S, &[f32], usize, *mut f32) + Sync + Send,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        let (oh, ow) = self.out_size(h, w);
        let rows = c * self.k_h * self.k_w;
        let n = oh * ow;
        let tiles_per_image = oh.div_ceil(tile_rows);
        // Not zeroed where the products write all of it (they overwrite C, `packed_gemm::
        // matmul`, `matmul_into`; with no rows at all they write nothing): a zeroed allocation
        // was a pass of its own over the output on the calling thread (as in `winograd`).
        let len = b * c_out * n;
        let mut out: Vec<f32> = if rows == 0 {
            vec![0.0; len]
        } else {
            Vec::with_capacity(len)
        };
        let out_ptr = SendPtr(out.as_mut_ptr());
        let tile = |(cols, scratch): &mut (Vec<f32>, S), t: usize| {
            let (bi, ti) = (t / tiles_per_image, t % tiles_per_image);
            let oy0 = ti * tile_rows;
            let oy1 = (oy0 + tile_rows).min(oh);
            let tn = (oy1 - oy0) * ow;
            // Grown, never cleared: the gather writes every float of the tile.
            if cols.len() < rows * tn {
                cols.resize(rows * tn, 0.0);
            }
            let cols = &mut cols[..rows * tn];
            // Serial tiles (their products on every thread) gather on every thread too.
            self.gather(
                &x[bi * c * h * w..][..c * h * w],
                (c, h, w),
                (oy0, oy1),
                cols,
                !parallel,
            );
            let dst = out_ptr;
            // SAFETY: in bounds (image `bi`, output pixel oy0·ow); every tile writes a disjoint
            // set of output columns (`[oy0·ow, oy1·ow)` of image `bi`, for all c_out rows)
            // inside `out`, which outlives the loop.
            product(scratch, cols, tn, unsafe {
                dst.0.add(bi * c_out * n + oy0 * ow)
            });
            if epilogue.is_noop() {
                return;
            }
            let epilogue = epilogue.image(bi * c_out * n);
            let row = |ch: usize| {
                let out = dst; // the whole wrapper, not its field (Send/Sync)
                let at = ch * n + oy0 * ow;
                // SAFETY: this tile's columns of channel `ch` (see above), written by the
                // product just now and by nothing else during the loop.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(bi * c_out * n + at), tn) };
                epilogue.apply(ch, at, row);
            };
            if parallel {
                (0..c_out).for_each(row);
            } else {
                (0..c_out).into_par_iter().for_each(row);
            }
        };
        let tiles = b * tiles_per_image;
        if parallel {
            (0..tiles)
                .into_par_iter()
                .for_each_init(|| (Vec::new(), init()), tile);
        } else {
            let mut scratch = (Vec::new(), init());
            (0..tiles).for_each(|t| tile(&mut scratch, t));
        }
        // SAFETY: the tiles cover output rows 0..oh of every image, and each tile's product
        // wrote its c_out × tn block (all columns of those rows) before its epilogue read
        // them: all `len` floats (capacity `len`) are written (or zeroed above).
        unsafe { out.set_len(len) };
        out
    }

    fn run(&self, src: &[f32], (b, c, h, w): (usize, usize, usize, usize)) -> (Vec<f32>, Shape) {
        let (oh, ow) = self.out_size(h, w);
        let rows = c * self.k_h * self.k_w;
        let n = oh * ow;
        let mut dst = vec![0f32; b * rows * n];
        for (bi, dst_b) in dst.chunks_mut(rows * n).enumerate() {
            self.gather(
                &src[bi * c * h * w..][..c * h * w],
                (c, h, w),
                (0, oh),
                dst_b,
                false,
            );
        }
        (dst, Shape::from((b, rows, n)))
    }
}

/// Above this size of a whole im2col matrix, the convolution runs tile by tile.
const TILED_ABOVE_BYTES: usize = 32 << 20;
/// Floats of one im2col tile (1 MiB: stays in L2 while the product reads it).
const TILE_FLOATS: usize = 256 << 10;

/// im2col + product, one tile of output pixels at a time, tiles in parallel; the product writes
/// straight into the NCHW output (`x` NCHW contiguous, `w` `[c_out, c_in·k_h·k_w]`), then the
/// epilogue.
struct TiledConv<'a> {
    im2col: Im2Col,
    epilogue: Epilogue<'a>,
}

impl TiledConv<'_> {
    fn run(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        c_out: usize,
    ) -> (Vec<f32>, Shape) {
        let (oh, ow) = self.im2col.out_size(h, w);
        let rows = c * self.im2col.k_h * self.im2col.k_w;
        let n = oh * ow;
        // Whole output rows per tile keep the gather simple.
        let tile_rows = (TILE_FLOATS / (rows * ow)).clamp(1, oh);
        let out = self.im2col.tiles(
            x,
            (b, c, h, w),
            c_out,
            tile_rows,
            true,
            self.epilogue,
            || (),
            |_, cols, tn, dst| {
                // SAFETY: `dst` takes the c_out × tn product with rows n apart (`tiles`);
                // `wt` is `c_out × rows` and `cols` `rows × tn`.
                unsafe { matmul_into((c_out, tn, rows), dst, n, wt, cols) };
            },
        );
        (out, Shape::from((b, c_out, oh, ow)))
    }
}

/// The packed-product paths of [`Conv2d`].
enum PackedOp<'a> {
    Winograd(PackedWinograd<'a>),
    Im2Col(PackedConv<'a>),
    Direct(DirectConv3x3<'a>),
}

/// im2col + packed product, tile by tile like [`TiledConv`]: each tile's im2col (f32, in
/// cache) is packed (to bf16 pairs, or as f32) and multiplied by the weight straight into the
/// NCHW output. A candle op on the input with the weight packed (`w`, bf16), or on the input
/// and the weight `[c_out, c_in·k_h·k_w]` as it is ([`Kernel::F32`], whose microkernel reads
/// A's rows in place).
struct PackedConv<'a> {
    im2col: Im2Col,
    /// `[c_out, c_in·k_h·k_w]` packed (`None`: f32, the weight passed with the input).
    w: Option<Arc<PackedA>>,
    epilogue: Epilogue<'a>,
}

/// The weight of a [`PackedConv`] as its product reads it.
#[derive(Clone, Copy)]
enum ConvWeight<'w> {
    Packed(&'w PackedA),
    /// `[c_out, c_in·k_h·k_w]` f32, row-major.
    F32Rows(&'w [f32], usize),
}

impl ConvWeight<'_> {
    fn rows_cols(&self) -> (usize, usize) {
        match *self {
            ConvWeight::Packed(a) => (a.rows(), a.cols()),
            ConvWeight::F32Rows(w, c_out) => (c_out, w.len() / c_out.max(1)),
        }
    }
}

/// Floats of one im2col tile on the packed path (512 KiB, plus half or all of that packed), or
/// of one output row where a row is more (then [`PACKED_MIN_TILE_PIXELS`] wins).
const PACKED_TILE_FLOATS: usize = 128 << 10;
/// Most bytes of the im2col of the images that [`PackedConv::run_batched`] multiplies
/// together. Measured (`tests::bench_batched_im2col`, Ice Lake, 2 threads, best of 7), against
/// one product per image: 0.51–0.55 of the time for the U-Net's 4² convs at batch 4 (2.9 MB
/// together), 0.80–0.86 for its 8² convs at batch 2 and at batch 4 in two groups of two
/// (5.9 MB each); all four 8² images in one product (12 MB) took 1.01, the 16² ones (24 MB,
/// out of cache) 1.32.
const BATCHED_COLS_BYTES: usize = 8 << 20;
/// Fewest output pixels of a tile on the packed path: the packed weight is read once per tile,
/// and the product's panels are 32 pixels wide.
const PACKED_MIN_TILE_PIXELS: usize = 256;

impl CustomOp1 for PackedConv<'_> {
    fn name(&self) -> &'static str {
        "sdcam-packed-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(w) = &self.w else {
            candle_core::bail!("packed conv2d: an f32 weight comes with the input");
        };
        self.run(storage, layout, ConvWeight::Packed(w))
    }
}

impl CustomOp2 for PackedConv<'_> {
    fn name(&self) -> &'static str {
        "sdcam-packed-conv2d-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c_out, _) = l2.shape().dims2()?;
        let w = cpu_f32(s2, l2, "packed conv2d")?;
        self.run(s1, l1, ConvWeight::F32Rows(w, c_out))
    }
}

impl PackedConv<'_> {
    /// The convolution of the input (`storage`, `layout`: `[b, c, h, w]` f32 contiguous) with
    /// `weight`.
    fn run(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        weight: ConvWeight,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "packed conv2d")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let im = &self.im2col;
        let rows = c * im.k_h * im.k_w;
        let (c_out, cols) = weight.rows_cols();
        if rows != cols {
            candle_core::bail!("packed conv2d: kernel does not match the input channels");
        }
        let (oh, ow) = im.out_size(h, w);
        let n = oh * ow;
        self.epilogue.check(c_out, b * c_out * n, "packed conv2d")?;
        // The whole image in one product where its im2col is small enough (small latents, wide
        // layers: every tile would stream the whole packed weight again), else tiles of whole
        // output rows, at least PACKED_MIN_TILE_PIXELS each.
        let tile_rows = if rows * n * 4 <= TILED_ABOVE_BYTES {
            oh
        } else {
            (PACKED_TILE_FLOATS / (rows * ow).max(1))
                .max(PACKED_MIN_TILE_PIXELS.div_ceil(ow.max(1)))
        }
        .clamp(1, oh.max(1));
        // Whole small images of a batch: one product for as many as fit in
        // BATCHED_COLS_BYTES (the weight read once for them, not once per image).
        let per_group = BATCHED_COLS_BYTES / (rows * n * 4).max(1);
        if tile_rows == oh && b > 1 && per_group > 1 {
            let out = self.run_batched(x, (b, c, h, w), weight, per_group.min(b));
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))));
        }
        // Few tiles (small images, wide layers): one tile at a time, each product on all
        // threads; else tiles in parallel, each product on one.
        let per_tile_parallel = b * oh.div_ceil(tile_rows) < 4 * rayon::current_num_threads();
        let out = im.tiles(
            x,
            (b, c, h, w),
            c_out,
            tile_rows,
            !per_tile_parallel,
            self.epilogue,
            PackedB::default,
            |packed, cols, tn, dst| match weight {
                ConvWeight::Packed(a) => {
                    packed.repack_rows(a.kernel(), cols, (rows, tn, tn), per_tile_parallel);
                    // SAFETY: `dst` takes the c_out × tn product with rows n apart (`tiles`).
                    unsafe { packed_gemm::matmul(a, packed, dst, n, per_tile_parallel) };
                }
                ConvWeight::F32Rows(a, _) => {
                    packed.repack_rows(Kernel::F32, cols, (rows, tn, tn), per_tile_parallel);
                    // SAFETY: as above; the f32 kernel reads `a` in place (no scratch used).
                    unsafe {
                        let shape = (c_out, rows, rows);
                        let c = (dst, n);
                        let scratch = &mut PackedA::default();
                        packed_gemm::matmul_rows(scratch, a, shape, packed, c, per_tile_parallel);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))))
    }
}

impl PackedConv<'_> {
    /// The convolution of a batch of small images (`x` `[b, c, h, w]`), `group` images per
    /// product: their im2col side by side (`[c·k_h·k_w, group·oh·ow]`), one product into
    /// `[c_out, group·oh·ow]` on every thread, then each output row copied into the NCHW output
    /// with the epilogue. At small latents the U-Net's wide convs are bound by reading their
    /// weight (59 MB for a 1280-channel 3×3 conv), which one product per image read `b` times.
    /// Each output float is the same sum as on the per-image path (same order over k).
    fn run_batched(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        weight: ConvWeight,
        group: usize,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        let im = &self.im2col;
        let rows = c * im.k_h * im.k_w;
        let (c_out, _) = weight.rows_cols();
        let (oh, ow) = im.out_size(h, w);
        let n = oh * ow;
        let mut out = vec![0f32; b * c_out * n];
        let mut cols = Vec::new();
        let mut prod = Vec::new();
        let mut packed = PackedB::default();
        for (g, out_g) in out.chunks_mut(group * c_out * n).enumerate() {
            let images = out_g.len() / (c_out * n);
            let gn = images * n;
            // Every float of both is written (the gather, the product).
            cols.resize(rows * gn, 0.0);
            prod.resize(c_out * gn, 0.0);
            for i in 0..images {
                let bi = g * group + i;
                let image = &x[bi * c * h * w..][..c * h * w];
                im.gather_at(image, (c, h, w), (0, oh), &mut cols, (gn, i * n), true);
            }
            let kernel = match weight {
                ConvWeight::Packed(a) => a.kernel(),
                ConvWeight::F32Rows(..) => Kernel::F32,
            };
            packed.repack_rows(kernel, &cols, (rows, gn, gn), true);
            // SAFETY: `prod` holds c_out × gn floats, rows gn apart, touched by nothing else;
            // the weight is c_out × rows and `packed` rows × gn.
            unsafe {
                match weight {
                    ConvWeight::Packed(a) => {
                        packed_gemm::matmul(a, &packed, prod.as_mut_ptr(), gn, true)
                    }
                    ConvWeight::F32Rows(a, _) => packed_gemm::matmul_rows(
                        &mut PackedA::default(),
                        a,
                        (c_out, rows, rows),
                        &packed,
                        (prod.as_mut_ptr(), gn),
                        true,
                    ),
                }
            }
            let epilogue = self.epilogue.image(g * group * c_out * n);
            out_g.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
                let (i, ch) = (r / c_out, r % c_out);
                row.copy_from_slice(&prod[ch * gn + i * n..][..n]);
                epilogue.apply(ch, r * n, row);
            });
        }
        out
    }
}

impl CustomOp2 for TiledConv<'_> {
    fn name(&self) -> &'static str {
        "sdcam-tiled-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "tiled conv2d")?;
        let wt = cpu_f32(s2, l2, "tiled conv2d")?;
        let dims = l1.shape().dims4()?;
        let (c_out, rows) = l2.shape().dims2()?;
        if rows != dims.1 * self.im2col.k_h * self.im2col.k_w {
            candle_core::bail!("tiled conv2d: kernel does not match the input channels");
        }
        let (oh, ow) = self.im2col.out_size(dims.2, dims.3);
        self.epilogue
            .check(c_out, dims.0 * c_out * oh * ow, "tiled conv2d")?;
        let (out, shape) = self.run(x, dims, wt, c_out);
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sdcam-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = cpu_f32(storage, layout, "im2col")?;
        let (out, shape) = self.run(src, layout.shape().dims4()?);
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::testutil::{max_abs_diff, max_rel_diff};
    use candle_core::Device;

    /// A random input `[b, c_in, h, w]` and a random candle conv (`k × k`, stride, padding,
    /// with or without bias) for the comparisons below.
    pub(crate) fn random_case(
        (k, stride, padding, bias): (usize, usize, usize, bool),
        (b, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    ) -> (Tensor, candle_nn::Conv2d) {
        let dev = Device::Cpu;
        // Seeded by the case (candle's CPU randn is not): a bound that holds, holds every run.
        // (Unseeded, the one-pixel case of `bf16_direct_conv_edges` once drew a bias that
        // nearly cancelled the product, and bf16 rounding became 4 % of the tiny output.)
        let seed = [k, stride, padding, bias as usize, b, c_in, c_out, h, w]
            .iter()
            .fold(17u64, |s, &v| {
                s.wrapping_mul(1_000_003).wrapping_add(v as u64)
            });
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut t = |shape: &[usize]| {
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let x = t(&[b, c_in, h, w]);
        let wt = t(&[c_out, c_in, k, k]);
        let bs = bias.then(|| t(&[c_out]));
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        (x, candle_nn::Conv2d::new(wt, bs, cfg))
    }

    /// `forward_fused` gives exactly (bit for bit) what the separate ops give, conv without
    /// bias, then `+ bias`, `+ residual`, ReLU, on every path: in f32 the tensor-op path
    /// (small im2col, 1×1) and the kernels' epilogue (Winograd, tiled, two images each so that
    /// the second image's offsets are checked), and with the packed products (f32 and bf16),
    /// where the CPU has them, the epilogue of every case (im2col, direct and Winograd).
    #[test]
    fn fused_epilogue_equals_separate_ops() {
        let cases = [
            (3, 1, 1, 2, 8, 5, 9, 7),      // im2col (both images in one product)
            (3, 1, 1, 5, 300, 8, 14, 14),  // im2col, images in groups of 3 and 2
            (1, 1, 0, 1, 16, 6, 10, 10),   // 1×1
            (3, 1, 1, 2, 8, 12, 40, 37),   // Winograd
            (3, 2, 1, 2, 64, 8, 300, 290), // tiled
            (3, 1, 1, 2, 8, 32, 6, 48),    // direct conv (bf16: AMX tiles or AVX-512)
            (3, 1, 1, 2, 7, 13, 5, 21),    // direct on AVX-512: a partial block of channels
            (3, 1, 1, 2, 136, 8, 32, 31),  // bf16 Winograd (too wide for the AVX-512 direct)
        ];
        let kernels: Vec<_> = [None]
            .into_iter()
            .chain(packed_gemm::kernels_here().into_iter().map(Some))
            .collect();
        for (k, stride, padding, b, c_in, c_out, h, w) in cases {
            let (x, inner) = random_case((k, stride, padding, true), (b, c_in, c_out, h, w));
            let bias = inner.bias().unwrap().clone();
            let no_bias = candle_nn::Conv2d::new(inner.weight().clone(), None, *inner.config());
            for &kernel in &kernels {
                let conv = Conv2d::with_products(inner.clone(), kernel).unwrap();
                let plain = Conv2d::with_products(no_bias.clone(), kernel).unwrap();
                let ys = plain.forward(&x).unwrap();
                let residual = Tensor::randn(0f32, 1., ys.shape(), &Device::Cpu).unwrap();
                let with_bias = ys
                    .broadcast_add(&bias.reshape((c_out, 1, 1)).unwrap())
                    .unwrap();
                for (res, relu) in [(false, false), (false, true), (true, false), (true, true)] {
                    let mut want = with_bias.clone();
                    if res {
                        want = (want + &residual).unwrap();
                    }
                    if relu {
                        want = want.relu().unwrap();
                    }
                    let got = conv
                        .forward_fused(&x, res.then_some(&residual), relu)
                        .unwrap();
                    assert_eq!(
                        max_abs_diff(&got, &want),
                        0.0,
                        "k{k} s{stride} {b}x{c_in}x{h}x{w} {kernel:?} residual {res} relu {relu}"
                    );
                }
                // A residual of another shape is an error, not a read out of bounds.
                let wrong = Tensor::zeros((b, c_out + 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
                assert!(conv.forward_fused(&x, Some(&wrong), true).is_err());
            }
        }
    }

    /// The tiled path (large images) equals candle's conv2d too, with tiles that do not divide
    /// the image evenly, several images and strides.
    #[test]
    fn tiled_path_matches_candle_conv2d() {
        for (k, stride, padding, b, c_in, c_out, h, w) in [
            (3, 1, 1, 2, 64, 16, 161, 150),
            (3, 2, 1, 1, 128, 8, 257, 259),
            (1, 1, 0, 1, 600, 4, 120, 120),
        ] {
            let (x, inner) = random_case((k, stride, padding, true), (b, c_in, c_out, h, w));
            let conv = Conv2d::new(inner.clone()).unwrap();
            let rows = c_in * k * k;
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            assert!(
                rows * oh * ow * 4 > TILED_ABOVE_BYTES,
                "case must take the tiled path"
            );
            let want = inner.forward(&x).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-5, "k{k} s{stride} {b}x{c_in}x{h}x{w}: {d}");
        }
    }

    /// The Winograd path (3×3, stride 1, padding 1, at least `WINOGRAD_MIN_TILES` tiles)
    /// equals candle's conv2d within 1e-5 of the output's scale: odd and even sizes, several
    /// images, channel counts from 3 to TAESD's 64, and more rows of tiles than one block.
    #[test]
    fn winograd_path_matches_candle_conv2d() {
        for (b, c_in, c_out, h, w) in [
            (2usize, 8usize, 5usize, 33usize, 37usize),
            (1, 3, 16, 40, 31),
            (1, 64, 64, 96, 80),
            (1, 130, 7, 36, 64),
        ] {
            assert!(Tile::F2.tiles(h, w) >= WINOGRAD_MIN_TILES);
            let (x, inner) = random_case((3, 1, 1, true), (b, c_in, c_out, h, w));
            let conv = Conv2d::new(inner.clone()).unwrap();
            assert!(conv.winograd_filter(h, w).unwrap().is_some() || !winograd_enabled());
            let want = inner.forward(&x).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::model::rel_err(&got, &want).unwrap();
            assert!(d < 1e-5, "{b}x{c_in}x{h}x{w} → {c_out}: {d}");
        }
    }

    /// The bf16 products (Winograd, im2col in one product, im2col in tiles, 1×1) stay within
    /// bf16 rounding of candle's f32 conv2d: below 1e-2 of the output's scale, and not equal.
    #[test]
    fn bf16_paths_stay_within_rounding_of_candle_conv2d() {
        if !packed_gemm::bf16_available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        for (k, stride, padding, b, c_in, c_out, h, w) in [
            (3, 1, 1, 1, 64, 16, 40, 41),
            (3, 1, 1, 2, 32, 9, 20, 20),
            (3, 2, 1, 1, 128, 8, 257, 259),
            (1, 1, 0, 1, 600, 4, 120, 120),
            (3, 1, 1, 3, 5, 7, 9, 8),
            (3, 2, 0, 1, 3, 33, 11, 12),
            // AMX tiles (where the CPU has them): odd channels, a 16-pixel last block, 2 images.
            (3, 1, 1, 2, 37, 64, 7, 48),
            (3, 1, 1, 1, 64, 32, 5, 32),
            // Wider than the AVX-512 direct conv takes: Winograd.
            (3, 1, 1, 2, 136, 12, 32, 33),
        ] {
            let (x, inner) = random_case((k, stride, padding, true), (b, c_in, c_out, h, w));
            let conv = Conv2d::with_products(inner.clone(), Some(Kernel::bf16())).unwrap();
            let want = inner.forward(&x).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let e = crate::model::rel_err(&got, &want).unwrap();
            assert!(
                e > 0.0 && e < 1e-2,
                "k{k} s{stride} p{padding} {b}x{c_in}x{h}x{w} → {c_out}: {e}"
            );
        }
    }

    /// The f32 packed products (`Kernel::F32`, AVX-512 or AVX2) on every path they take (Winograd,
    /// im2col in one product and in tiles, 1×1, strided; never the direct conv) equal
    /// candle's conv2d up to summation order: within 1e-5 of the output's scale.
    #[test]
    fn f32_packed_paths_match_candle_conv2d() {
        let Some(kernel) = Kernel::f32() else {
            eprintln!("skipped: this CPU lacks AVX2 (or SDCAM_F32_KERNEL=0)");
            return;
        };
        for (k, stride, padding, b, c_in, c_out, h, w, path) in [
            (3, 1, 1, 1, 64, 16, 40, 41, "winograd F4"),
            (3, 1, 1, 2, 32, 9, 20, 20, "winograd F2"),
            (3, 1, 1, 1, 64, 8, 15, 15, "winograd F2"), // 64 tiles, odd: the F(2×2) threshold
            (3, 1, 1, 1, 16, 8, 14, 15, "im2col"),      // 56 tiles: below it
            (3, 1, 1, 3, 5, 7, 9, 8, "im2col"),
            (3, 2, 1, 1, 128, 8, 257, 259, "im2col"),
            (1, 1, 0, 1, 600, 4, 120, 120, "im2col"),
            (3, 2, 0, 1, 3, 33, 11, 12, "im2col"),
            (3, 1, 1, 2, 136, 12, 32, 33, "winograd F4"),
            (3, 1, 1, 2, 8, 32, 6, 48, "winograd F2"),
            (3, 1, 1, 5, 300, 8, 14, 14, "im2col"), // batched: groups of 3 and 2
        ] {
            let (x, inner) = random_case((k, stride, padding, true), (b, c_in, c_out, h, w));
            let conv = Conv2d::with_products(inner.clone(), Some(kernel)).unwrap();
            let path = match winograd_mode() {
                WinogradMode::Both => path.to_string(),
                WinogradMode::F2Only => path.replace("F4", "F2"),
                WinogradMode::Off => "im2col".to_string(),
            };
            assert_eq!(packed_path(&conv, h, w), path, "{c_in} channels, {h}x{w}");
            let want = inner.forward(&x).unwrap();
            // Packs the weights; then the output's size in NaNs is freed just before the
            // call, so that the allocator likely hands that memory back for its output (not
            // zeroed: the kernels must write every float; a NaN left fails the check below).
            conv.forward(&x).unwrap();
            drop(std::hint::black_box(vec![f32::NAN; want.elem_count()]));
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let values = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "k{k} s{stride} {b}x{c_in}x{h}x{w}: an output float was not written"
            );
            let e = crate::model::rel_err(&got, &want).unwrap();
            assert!(
                e < 1e-5,
                "k{k} s{stride} p{padding} {b}x{c_in}x{h}x{w} → {c_out}: {e}"
            );
        }
    }

    /// Which packed path `conv` takes for an `h × w` input.
    fn packed_path(conv: &Conv2d, h: usize, w: usize) -> &'static str {
        let im2col = Im2Col {
            k_h: conv.k_h,
            k_w: conv.k_w,
            stride: conv.cfg.stride,
            padding: conv.cfg.padding,
        };
        let epilogue = Epilogue {
            bias: None,
            residual: None,
            relu: false,
            base: 0,
        };
        let f = conv.packed.as_ref().expect("packed products");
        match conv.packed_op(f, h, w, im2col, epilogue).unwrap() {
            PackedOp::Winograd(op) => match op.tile {
                Tile::F2 => "winograd F2",
                Tile::F4 => "winograd F4",
            },
            PackedOp::Im2Col(_) => "im2col",
            PackedOp::Direct(_) => "direct",
        }
    }

    /// The AVX-512 direct 3×3 conv (`model::direct_conv`) on the edges of its runs of 32
    /// pixels (widths 1 to 49), partial blocks of 8 output channels, odd input channels (a
    /// half-empty last pair) and two images: within bf16 rounding of candle's f32 conv2d, and
    /// the path it is meant to be (TAESD's 64 channels direct, the U-Net's 320 Winograd).
    #[test]
    fn bf16_direct_conv_edges() {
        let off = |var: &str| std::env::var(var).is_ok_and(|v| v.trim() == "0");
        if !packed_gemm::bf16_available()
            || Kernel::bf16() != Kernel::Avx512Bf16
            || off("SDCAM_DIRECT_CONV")
            || off("SDCAM_WINOGRAD")
        {
            eprintln!("skipped: no AVX512-BF16, AMX in use, or a path switched off");
            return;
        }
        for (b, c_in, c_out, h, w) in [
            (1, 1, 1, 1, 1),
            (2, 3, 9, 4, 15),
            (1, 7, 8, 3, 16),
            (1, 64, 17, 2, 17),
            (2, 33, 4, 5, 31),
            (1, 128, 3, 3, 32),
            (1, 2, 24, 6, 33),
            (1, 5, 7, 2, 49),
        ] {
            let (x, inner) = random_case((3, 1, 1, true), (b, c_in, c_out, h, w));
            let conv = Conv2d::with_products(inner.clone(), Some(Kernel::Avx512Bf16)).unwrap();
            assert_eq!(
                packed_path(&conv, h, w),
                "direct",
                "{c_in} channels, {h}x{w}"
            );
            let want = inner.forward(&x).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let e = crate::model::rel_err(&got, &want).unwrap();
            assert!(e > 0.0 && e < 1e-2, "{b}x{c_in}x{h}x{w} → {c_out}: {e}");
        }
        // The wider cases of the other bf16 tests.
        for (c_in, h, w) in [(320, 32, 32), (136, 32, 33), (136, 32, 31)] {
            let (_, inner) = random_case((3, 1, 1, true), (1, c_in, 8, h, w));
            let conv = Conv2d::with_products(inner, Some(Kernel::Avx512Bf16)).unwrap();
            assert_eq!(
                packed_path(&conv, h, w),
                "winograd F2",
                "{c_in} channels, {h}x{w}"
            );
        }
    }

    /// Equal to candle's conv2d for every kernel/stride/padding the U-Net uses, and more.
    #[test]
    fn matches_candle_conv2d() {
        for (k, stride, padding, bias) in [
            (3, 1, 1, true),
            (3, 2, 1, true),
            (3, 2, 0, false),
            (1, 1, 0, true),
            (1, 2, 0, true),
            (5, 1, 2, false),
            (3, 1, 0, true),
        ] {
            for (b, c_in, c_out, h, w) in [(1, 5, 7, 9, 8), (2, 3, 4, 6, 11), (3, 8, 2, 3, 3)] {
                let (x, inner) = random_case((k, stride, padding, bias), (b, c_in, c_out, h, w));
                let conv = Conv2d::new(inner.clone()).unwrap();
                let want = inner.forward(&x).unwrap();
                let got = conv.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{padding}");
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "k{k} s{stride} p{padding} {b}x{c_in}x{h}x{w}: {d}"
                );
                // Non-contiguous input.
                let xt = x.transpose(2, 3).unwrap().contiguous().unwrap();
                let xt = xt.transpose(2, 3).unwrap();
                assert!(!xt.is_contiguous());
                let d = max_abs_diff(&conv.forward(&xt).unwrap(), &want);
                assert!(d < 1e-4, "non-contiguous: {d}");
            }
        }
    }

    /// For the benchmarks below: a random input `[b, c, hw, hw]`, the weight `[k, c·9]` of a
    /// random 3×3 conv (stride 1, padding 1) and that conv as an f32 im2col product.
    fn bench_case(
        b: usize,
        c: usize,
        k: usize,
        hw: usize,
    ) -> (Tensor, Tensor, PackedConv<'static>) {
        let (x, inner) = random_case((3, 1, 1, false), (b, c, k, hw, hw));
        let weight2d = inner.weight().reshape((k, c * 9)).unwrap();
        let im2col = PackedConv {
            im2col: Im2Col {
                k_h: 3,
                k_w: 3,
                stride: 1,
                padding: 1,
            },
            w: None,
            epilogue: Epilogue::default(),
        };
        (x, weight2d, im2col)
    }

    /// Not a check: the f32 packed products' three paths for a 3×3 conv (im2col, Winograd
    /// F(2×2) and F(4×4)) on TAESD's and the U-Net's shapes, around the thresholds that choose
    /// between them: best of 7 calls each, alternating (the minimum: a shared machine's
    /// neighbours only ever add time), in ms and in GFLOP/s of the direct conv's multiply-adds
    /// (Winograd's are "effective": it does fewer):
    /// `cargo test --release -p sdcam-core --lib bench_conv_paths -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_conv_paths() {
        let Some(kernel) = Kernel::f32() else {
            eprintln!("skipped: no f32 packed products on this CPU");
            return;
        };
        for (name, b, c, k, hw) in [
            ("taesd 32²", 1, 64, 64, 32),
            ("taesd 64²", 1, 64, 64, 64),
            ("taesd 128²", 1, 64, 64, 128),
            ("taesd 256²", 1, 64, 64, 256),
            ("taesd 512²", 1, 64, 64, 512),
            ("unet L1 16² (32² latent)", 1, 640, 640, 16),
            ("unet L1 16² b2", 2, 640, 640, 16),
            ("unet L1 16² down 320→640", 1, 320, 640, 16),
            ("unet L1 16² up 1920→640", 1, 1920, 640, 16),
            ("unet L1 16² up 960→640", 1, 960, 640, 16),
            ("unet L2 16² (64² latent)", 1, 1280, 1280, 16),
            ("unet L0 32² (32² latent)", 1, 320, 320, 32),
            ("unet L0 32² b2", 2, 320, 320, 32),
            ("unet L0 up 32² 960→320", 1, 960, 320, 32),
            ("unet L0 64² (64² latent)", 1, 320, 320, 64),
            ("unet L1 32² (64² latent)", 1, 640, 640, 32),
            ("unet L1 32² b2", 2, 640, 640, 32),
            ("unet L2 8² (32² latent)", 1, 1280, 1280, 8),
        ] {
            let (x, weight2d, im2col) = bench_case(b, c, k, hw);
            let wt = weight2d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let winograd = |tile| PackedWinograd {
                k,
                tile,
                u: pack_filter_transforms(kernel, &wt, k, c, tile, false),
                epilogue: Epilogue::default(),
            };
            let (f2, f4) = (winograd(Tile::F2), winograd(Tile::F4));
            let mut best = [f64::INFINITY; 3];
            for _ in 0..7 {
                for (i, best) in best.iter_mut().enumerate() {
                    let t = std::time::Instant::now();
                    let y = match i {
                        0 => x.apply_op2_no_bwd(&weight2d, &im2col),
                        1 => x.apply_op1_no_bwd(&f2),
                        _ => x.apply_op1_no_bwd(&f4),
                    }
                    .unwrap();
                    *best = best.min(t.elapsed().as_secs_f64());
                    drop(y);
                }
            }
            let gflops = |t: f64| 2.0 * (b * k * c * 9 * hw * hw) as f64 / t / 1e9;
            let [i, f2, f4] = best;
            eprintln!(
                "{name:26} im2col {:8.2} ms ({:4.0} GFLOP/s)  F2 {:8.2} ({:4.0}; {:.2})  \
                 F4 {:8.2} ({:4.0}; {:.2})",
                i * 1e3,
                gflops(i),
                f2 * 1e3,
                gflops(f2),
                f2 / i,
                f4 * 1e3,
                gflops(f4),
                f4 / i
            );
        }
    }

    /// Not a check: a batch of small images in one product ([`PackedConv::run_batched`])
    /// against one call per image, on the U-Net's deep levels (best of 7, ms):
    /// `cargo test --release -p sdcam-core --lib bench_batched_im2col -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_batched_im2col() {
        if Kernel::f32().is_none() {
            eprintln!("skipped: no f32 packed products on this CPU");
            return;
        }
        for (name, b, c, k, hw) in [
            ("L3 4² 1280", 4, 1280, 1280, 4),
            ("L3 4² 2560→1280", 4, 2560, 1280, 4),
            ("L2 8² 1280", 4, 1280, 1280, 8),
            ("L2 8² 1280 b2", 2, 1280, 1280, 8),
            ("L1 16² 640", 4, 640, 640, 16),
        ] {
            let (x, weight2d, op) = bench_case(b, c, k, hw);
            let images: Vec<Tensor> = (0..b)
                .map(|i| x.narrow(0, i, 1).unwrap().contiguous().unwrap())
                .collect();
            let mut best = [f64::INFINITY; 2];
            for _ in 0..7 {
                let t = std::time::Instant::now();
                drop(x.apply_op2_no_bwd(&weight2d, &op).unwrap());
                best[0] = best[0].min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for xi in &images {
                    drop(xi.apply_op2_no_bwd(&weight2d, &op).unwrap());
                }
                best[1] = best[1].min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{name:18} b{b}: batched {:7.2} ms  per image {:7.2} ms  ({:.2})",
                best[0] * 1e3,
                best[1] * 1e3,
                best[0] / best[1]
            );
        }
    }
}
