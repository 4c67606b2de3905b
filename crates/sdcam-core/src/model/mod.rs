//! Diffusion model components on candle, loaded from the diffusers layout and matching diffusers
//! numerically: tokenizer, CLIP text encoder, U-Net (with cached prompt K/V and cross-frame
//! attention), TAESD, AutoencoderKL, LCM scheduler math and LoRA fusion.
//!
//! Each component mirrors its diffusers counterpart: configs are plain structs read from the
//! component's `config.json`, and `VarBuilder` paths follow the diffusers tensor names.

pub mod arch;
pub mod clip;
pub mod config;
pub mod conv;
pub mod device;
pub(crate) mod direct_conv;
pub mod download;
pub(crate) mod geglu;
pub(crate) mod group_norm;
pub mod hub;
pub(crate) mod linear;
pub mod lora;
pub(crate) mod packed_attention;
pub(crate) mod packed_gemm;
pub mod random_hub;
pub mod resnet;
pub mod scheduler;
pub mod sd;
pub(crate) mod softmax;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub(crate) mod winograd;

use candle_core::{DType, Device, Tensor};

/// The f32 data of a contiguous CPU tensor, for the CPU kernels written as candle custom ops
/// (`conv`, `winograd`, `softmax`); `op` names the op in the error.
///
/// # Errors
/// Another dtype, or a non-contiguous layout.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is implemented");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the inputs must be contiguous");
    };
    Ok(&data[start..end])
}

/// `dst = lhs · rhs` on the calling thread, for the CPU kernels that run one product per
/// parallel task: `lhs` is `m × k` and `rhs` `k × n`, both row-major and contiguous; `dst` is
/// `m × n` row-major with rows `dst_row_stride` floats apart (overwritten, not read).
///
/// # Safety
/// `lhs` must hold `m·k` floats, `rhs` `k·n`, and `dst` must be valid for writes at
/// `i·dst_row_stride + j` for all `i < m`, `j < n`, with no other thread writing there.
pub(crate) unsafe fn matmul_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: &[f32],
    rhs: &[f32],
) {
    debug_assert!(lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: the caller's contract above; gemm reads lhs/rhs within m·k and k·n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A raw output pointer handed to the parallel tasks of one CPU kernel call, each of which
/// writes a region no other task writes (the kernels' SAFETY comments say which).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only ever used for disjoint writes within one call, while the buffer is alive.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// max |a − b| / max |b|: the relative error used to compare with reference outputs (computed
/// in f32 on the CPU, whatever device and dtype `a` is in). The shapes must be equal. NaN
/// where any difference is NaN (candle's `max` skips NaNs, which let a NaN output pass).
///
/// # Errors
/// The shapes differ or a tensor cannot be copied to the CPU.
pub fn rel_err(a: &Tensor, reference: &Tensor) -> candle_core::Result<f32> {
    if a.dims() != reference.dims() {
        candle_core::bail!(
            "rel_err: shapes {:?} and {:?} differ",
            a.dims(),
            reference.dims()
        );
    }
    let values = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (a, b) = (values(a)?, values(reference)?);
    let (mut diff, mut scale) = (0f32, 0f32);
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        diff = if d.is_nan() || diff.is_nan() {
            f32::NAN
        } else {
            diff.max(d)
        };
        scale = scale.max(y.abs());
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// Where the golden tests compute: the CPU in f32 unless `SDCAM_TEST_DEVICE` (`cpu`, `cuda`,
/// `metal`) and `SDCAM_TEST_DTYPE` (`f32`, `f16`, `bf16`) say otherwise, so the same tests check
/// a GPU build on a GPU machine (`scripts/cuda/check.sh`).
pub mod testing {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use anyhow::{bail, Result};
    use candle_core::{DType, Device};

    use super::device::{DeviceName, DtypeName};

    /// `tests/fixtures` of this checkout, or of `$SDCAM_REPO` where a test binary runs away from
    /// the tree it was built in (a GPU machine, `scripts/cuda/check.sh`).
    pub fn fixtures_dir() -> PathBuf {
        std::env::var_os("SDCAM_REPO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::REPO_DIR))
            .join("tests/fixtures")
    }

    /// The device and dtype named by the environment (see the module docs). Opened once per
    /// process: every caller gets the same device, since tensors on two separately opened CUDA
    /// devices cannot meet in one operation.
    ///
    /// # Errors
    /// An unknown `SDCAM_TEST_DEVICE`/`SDCAM_TEST_DTYPE`, or the device does not open (the same
    /// error on every call).
    pub fn target() -> Result<(Device, DType)> {
        static TARGET: OnceLock<std::result::Result<(Device, DType), String>> = OnceLock::new();
        TARGET
            .get_or_init(|| open_target().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)
    }

    fn open_target() -> Result<(Device, DType)> {
        let device = match std::env::var("SDCAM_TEST_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("cpu") => DeviceName::Cpu,
            Ok("cuda") => DeviceName::Cuda,
            Ok("metal") => DeviceName::Metal,
            Ok(other) => bail!("SDCAM_TEST_DEVICE={other}: expected cpu, cuda or metal"),
        };
        let dtype = match std::env::var("SDCAM_TEST_DTYPE").as_deref() {
            Err(_) | Ok("") | Ok("f32") => DtypeName::F32,
            Ok("f16") => DtypeName::F16,
            Ok("bf16") => DtypeName::Bf16,
            Ok(other) => bail!("SDCAM_TEST_DTYPE={other}: expected f32, f16 or bf16"),
        };
        Ok((
            super::device::device_for(device)?,
            super::device::dtype_for(dtype),
        ))
    }

    /// The tolerance for max |Δ| / max |ref| when a test's f32 tolerance is `f32_tol`, on
    /// `device` in `dtype`: the same in f32 on any device; in half precision the error of 8–11
    /// significant bits that accumulates through a network:
    /// - f16: [`HALF_TOLERANCE`] (measured on the CPU: at most 3.8e-3 for the components, 1.2e-2
    ///   for the stream, on the tiny fixture models; scripts/cuda/README.md);
    /// - bf16 on the CPU (f32 with bf16 products, `model::sd::compute_dtypes`):
    ///   [`BF16_PRODUCTS_TOLERANCE`];
    /// - bf16 on a GPU (bf16 activations too): 8× [`HALF_TOLERANCE`].
    pub fn tolerance(device: &Device, dtype: DType, f32_tol: f32) -> f32 {
        match dtype {
            DType::F16 => f32_tol.max(HALF_TOLERANCE),
            DType::BF16 if device.is_cpu() => f32_tol.max(BF16_PRODUCTS_TOLERANCE),
            DType::BF16 => f32_tol.max(8.0 * HALF_TOLERANCE),
            _ => f32_tol,
        }
    }

    /// See [`tolerance`].
    pub(crate) const HALF_TOLERANCE: f32 = 3e-2;

    /// bf16 products on the CPU: every conv and linear input rounded to 8 significant bits
    /// (f16 has 11), attention included. Measured on this project's CPU (AMD Zen 4) with the
    /// tiny fixture models: at most 1.4e-2 for the components (U-Net), 4.9e-2 for the stream
    /// (the KL VAE case; f16: 7.5e-3).
    pub(crate) const BF16_PRODUCTS_TOLERANCE: f32 = 6e-2;
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Access to the reference fixtures made by `scripts/reference/make_fixtures.py`.
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{DType, Device, Tensor};

    /// The device and dtype the component tests run in ([`super::testing::target`]).
    pub(crate) fn target() -> (Device, DType) {
        super::testing::target().unwrap_or_else(|e| panic!("test target: {e:#}"))
    }

    /// A test's f32 tolerance for the target dtype ([`super::testing::tolerance`]).
    pub(crate) fn tol(f32_tol: f32) -> f32 {
        let (device, dtype) = target();
        super::testing::tolerance(&device, dtype, f32_tol)
    }

    /// max |a − b|, in f32 on the CPU (any device and dtype).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let d = (f(a).unwrap() - f(b).unwrap()).unwrap();
        d.abs()
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// max |got − want| / max |want| (the goldens' measure), in f32 on the CPU.
    pub(crate) fn max_rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        let scale = want
            .to_device(&Device::Cpu)
            .and_then(|w| w.to_dtype(DType::F32))
            .and_then(|w| w.abs())
            .and_then(|w| w.flatten_all())
            .and_then(|w| w.max(0))
            .and_then(|w| w.to_scalar::<f32>())
            .unwrap();
        max_abs_diff(got, want) / scale
    }

    /// `tests/fixtures/<rel>` ([`super::testing::fixtures_dir`]).
    pub(crate) fn fixture(rel: &str) -> PathBuf {
        super::testing::fixtures_dir().join(rel)
    }

    /// All tensors of `tests/fixtures/golden/<name>.safetensors` on the test target: floats in
    /// the dtype it computes in, integers (token ids) as stored. Compare outputs with `rel_err`, which works
    /// across devices.
    pub(crate) fn golden(name: &str) -> HashMap<String, Tensor> {
        let path = fixture(&format!("golden/{name}.safetensors"));
        let (device, dtype) = target();
        // bf16 on the CPU computes in f32 (bf16 products only): the inputs are f32 there.
        let dtype = super::sd::compute_dtypes(dtype, &device)
            .unwrap_or_else(|e| panic!("test target: {e:#}"))
            .0;
        candle_core::safetensors::load(&path, &device)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect()
    }

    /// All tensors of a golden file on the CPU as stored (for device-independent math).
    pub(crate) fn golden_cpu(name: &str) -> HashMap<String, Tensor> {
        let path = fixture(&format!("golden/{name}.safetensors"));
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN anywhere in the output makes the error NaN (so `e < tol` fails), wherever it is;
    /// otherwise max |a − b| / max |b|.
    #[test]
    fn rel_err_sees_nans() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let reference = t(&[1.0, -4.0, 2.0]);
        assert_eq!(rel_err(&t(&[1.0, -3.0, 2.0]), &reference).unwrap(), 0.25);
        for at in 0..3 {
            let mut v = [1.0, -4.0, 2.0];
            v[at] = f32::NAN;
            assert!(rel_err(&t(&v), &reference).unwrap().is_nan(), "NaN at {at}");
        }
        assert!(rel_err(&t(&[1.0, 2.0]), &reference).is_err());
    }
}
