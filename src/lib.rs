//! sdcam: a real-time, Stable-Diffusion-transformed virtual camera.
//!
//! Data flows one way: [`source`] → [`relay`] (input queue, [`transform`], output pacing) → [`sink`].
//! [`convert`] holds pixel-format conversion and resizing, [`profile`] the TOML settings, and
//! [`control`] the live control channel (stdin commands and signals).

pub mod alloc;
pub mod app;
pub mod bench;
pub mod control;
pub mod convert;
pub mod devices;
pub mod frame;
pub mod fuzzing;
pub mod model;
pub mod pipeline;
pub mod profile;
pub mod relay;
pub mod sink;
pub mod source;
pub mod stage;
pub mod transform;

/// The crate's error type: `anyhow` with context chains.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;
