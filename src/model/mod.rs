//! Diffusion model components on candle, loaded from the diffusers layout and matching diffusers
//! numerically: tokenizer, CLIP text encoder, U-Net (with cached prompt K/V and cross-frame
//! attention), TAESD, AutoencoderKL, LCM scheduler math and LoRA fusion.
//!
//! Each component mirrors its diffusers counterpart: configs are plain structs read from the
//! component's `config.json`, and `VarBuilder` paths follow the diffusers tensor names.

pub mod arch;
pub mod clip;
pub mod conv;
pub mod hub;
pub mod lora;
pub mod scheduler;
pub mod sd;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;

use candle_core::{DType, Tensor};

/// max |a − b| / max |b|: the relative error used to compare with reference outputs.
pub fn rel_err(a: &Tensor, reference: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = reference.to_dtype(DType::F32)?;
    let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Access to the reference fixtures made by `scripts/reference/make_fixtures.py`.
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};

    /// `tests/fixtures/<rel>`.
    pub fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    /// All tensors of `tests/fixtures/golden/<name>.safetensors` on the CPU.
    pub fn golden(name: &str) -> HashMap<String, Tensor> {
        let path = fixture(&format!("golden/{name}.safetensors"));
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    }
}
