//! The `sdcam` commands behind `main.rs`'s argument parsing: each command's work and output.
//! The binary only parses arguments and dispatches here.

pub mod devices;
