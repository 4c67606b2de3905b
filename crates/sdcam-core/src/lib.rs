//! sdcam-core: the model and the stream core of sdcam, a pure library (tensors in, tensors out;
//! no I/O beyond weight files and the hub they come from).
//!
//! * [`model`]: the diffusion model components on candle, loaded from the diffusers layout
//!   (tokenizer, CLIP text encoder, U-Net, TAESD, AutoencoderKL, LCM scheduler, LoRA, hub cache);
//! * [`pipeline`]: StreamDiffusion (arXiv 2312.12491) over a loaded model: Stream Batch, R-CFG,
//!   the stochastic similarity filter, noise.
//!
//! It knows nothing of profiles, the CLI, the relay or camera I/O: the `sdcam` app crate turns
//! its configuration into [`pipeline::StreamParams`]/[`model::sd::ModelSpec`] and feeds frames as
//! tensors.

#![warn(missing_docs, unreachable_pub)]

pub mod model;
pub mod pipeline;

/// The repository root (fixtures and real hub configs under `tests/`, embedded into the
/// random-weight model writer and read by tests).
pub(crate) const REPO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
