//! sdcam: a real-time, Stable-Diffusion-transformed virtual camera.
//!
//! Data flows one way: [`source`] → [`relay`] (input queue, [`transform`], output pacing) → [`sink`].
//! [`convert`] holds pixel-format conversion and resizing, [`profile`] the TOML settings, and
//! [`control`] the live control channel (stdin commands and signals) and the [`control::session`]
//! that applies it, [`cli`] the commands, and [`term`] the one writer of stderr.

pub mod alloc;
pub mod cli;
pub mod config;
pub mod control;
pub mod convert;
pub mod frame;
pub mod fuzzing;
pub mod profile;
pub mod rate;
pub mod relay;
pub mod sink;
pub mod source;
pub mod stage;
pub mod term;
pub mod transform;
pub mod v4l2;
pub mod y4m;

pub use sdcam_core::{model, pipeline};

/// The crate's error type: `anyhow` with context chains.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;
