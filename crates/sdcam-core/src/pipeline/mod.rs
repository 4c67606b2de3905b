//! The StreamDiffusion stream core (arXiv 2312.12491), tensor in, tensor out: Stream Batch
//! denoising, R-CFG, the stochastic similarity filter and live prompt/settings changes over a
//! loaded [`crate::model::sd::StableDiffusion`]. It knows nothing of frames, profiles or the relay:
//! the app's diffusion transform (`sdcam::transform::diffusion`) feeds it.
//!
//! * [`stream`]: the tensor pipeline (batch denoising, R-CFG, pre-computation);
//! * [`filter`]: the similarity filter;
//! * [`noise`]: seeded or file-provided noise.

pub mod filter;
pub mod noise;
pub mod stream;

pub use filter::{FilterSettings, SimilarityFilter};
pub use noise::Noise;
pub use stream::{CfgType, LiveParams, StreamDiffusion, StreamMode, StreamParams};
