//! Where a model computes: the device and dtype names a configuration gives (`auto`, `cpu`,
//! `cuda`, `metal`; `auto`, `f32`, `f16`, `bf16`) and the candle [`Device`]/[`DType`] they select on
//! this machine, with the reason for the choice (for the log).

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The compute device a model runs on, as a profile names it (`model.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceName {
    /// CUDA when built with `cuda` and a GPU opens, else Metal when built with `metal`, else the
    /// CPU ([`select_device`]).
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0 (needs a build with the `cuda` feature).
    Cuda,
    /// Metal device 0 (needs a build with the `metal` feature).
    Metal,
}

/// The number type a model computes in, as a profile names it (`model.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    /// f16 on a GPU, f32 on the CPU ([`select_dtype`]).
    Auto,
    /// 32-bit float.
    F32,
    /// IEEE half precision (the fp16 weight variant is preferred).
    F16,
    /// bfloat16 (the fp16 weight variant is preferred and converted on load). On the CPU: f32
    /// activations with bf16 matrix products in the U-Net and the VAE (needs AVX512-BF16).
    Bf16,
}

/// The candle device for a profile's `model.device`, with the reason for the choice (for the
/// log). `auto`: CUDA device 0 when this build has CUDA and the device opens, else Metal device 0
/// when it has Metal and the device opens, else the CPU. An explicit `cuda`/`metal` that cannot
/// be had is an error saying what to do.
///
/// # Errors
/// `cuda`/`metal` was asked for and this build lacks the feature or the device does not open.
pub fn select_device(name: DeviceName) -> Result<(Device, String)> {
    match name {
        DeviceName::Auto => {
            let mut why = Vec::new();
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok((d, "auto: CUDA device 0 opened".into())),
                    Err(e) => why.push(format!("CUDA device 0 did not open ({e})")),
                }
            } else {
                why.push("built without CUDA".to_string());
            }
            if candle_core::utils::metal_is_available() {
                match Device::new_metal(0) {
                    Ok(d) => return Ok((d, "auto: Metal device 0 opened".into())),
                    Err(e) => why.push(format!("Metal device 0 did not open ({e})")),
                }
            } else {
                why.push("built without Metal".to_string());
            }
            Ok((Device::Cpu, format!("auto: {}", why.join(", "))))
        }
        explicit => Ok((device_for(explicit)?, "set in the profile".into())),
    }
}

/// The candle dtype for a profile's `model.dtype` on `device`, with the reason: `auto` is f16
/// on a GPU (half the memory and traffic, what StreamDiffusion runs in) and f32 on the CPU
/// (candle's CPU kernels are fastest and exact in f32).
pub fn select_dtype(name: DtypeName, device: &Device) -> (DType, &'static str) {
    match name {
        DtypeName::Auto if device.is_cpu() => (DType::F32, "auto: f32 on the CPU"),
        DtypeName::Auto => (DType::F16, "auto: f16 on a GPU"),
        explicit => (dtype_for(explicit), "set in the profile"),
    }
}

/// Whether `model.dtype = "bf16"` runs on this machine's CPU (it needs AVX512-BF16: f32
/// activations with bf16 matrix products, see `model::sd::compute_dtypes`).
pub fn cpu_runs_bf16() -> bool {
    crate::model::packed_gemm::bf16_available()
}

/// The candle device for an explicit `model.device` (`auto` is [`select_device`]'s).
pub(crate) fn device_for(name: DeviceName) -> Result<Device> {
    match name {
        DeviceName::Auto => Ok(select_device(name)?.0),
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "model.device = \"cuda\" but this sdcam was built without CUDA; rebuild with \
                     `cargo build --release --features cuda`, or set model.device = \"auto\" or \
                     \"cpu\""
                );
            }
            Device::new_cuda(0).context(
                "opening CUDA device 0 (is an NVIDIA GPU with its driver there? `nvidia-smi` \
                 should list it; else set model.device = \"auto\" or \"cpu\")",
            )
        }
        DeviceName::Metal => {
            if !candle_core::utils::metal_is_available() {
                bail!(
                    "model.device = \"metal\" but this sdcam was built without Metal; rebuild \
                     with `cargo build --release --features metal`, or set model.device = \
                     \"auto\" or \"cpu\""
                );
            }
            Device::new_metal(0).context("opening Metal device 0")
        }
    }
}

/// The candle dtype for an explicit `model.dtype` (`auto` means f32 here: the CPU's choice;
/// use [`select_dtype`] where the device is known).
pub(crate) fn dtype_for(name: DtypeName) -> DType {
    match name {
        DtypeName::Auto | DtypeName::F32 => DType::F32,
        DtypeName::F16 => DType::F16,
        DtypeName::Bf16 => DType::BF16,
    }
}

/// `cpu`, `cuda:N`, `metal:N` for logs.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_device_and_dtype_choose_themselves_and_say_why() {
        let (device, why) = select_device(DeviceName::Auto).unwrap();
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(device.is_cpu());
            assert!(
                why.contains("built without CUDA") && why.contains("built without Metal"),
                "{why}"
            );
        }
        assert_eq!(select_dtype(DtypeName::Auto, &Device::Cpu).0, DType::F32);
        assert_eq!(select_dtype(DtypeName::F16, &Device::Cpu).0, DType::F16);
        let (cpu, why) = select_device(DeviceName::Cpu).unwrap();
        assert!(cpu.is_cpu() && why.contains("profile"));
        if !candle_core::utils::cuda_is_available() {
            // An explicit cuda without the feature keeps its clear error.
            let msg = format!("{:#}", select_device(DeviceName::Cuda).unwrap_err());
            assert!(
                msg.contains("--features cuda") && msg.contains("auto"),
                "{msg}"
            );
        }
    }
}
