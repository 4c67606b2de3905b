//! The `sdcam` binary: parses the command line and hands it to [`sdcam::cli::main`].

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: candle's CPU kernels allocate large temporaries per call,
/// and glibc returns them to the OS and page-faults them back in (about 30% of U-Net time).
/// Wrapped to count live heap bytes (`stats`, `scripts/soak.sh`).
#[global_allocator]
static GLOBAL: sdcam::alloc::Counting<mimalloc::MiMalloc> =
    sdcam::alloc::Counting(mimalloc::MiMalloc);

fn main() -> ExitCode {
    sdcam::cli::main(sdcam::cli::Cli::parse())
}
