//! The `sdcam` binary: parses the command line and hands it to [`sdcam::cli::main`].

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: candle's CPU kernels allocate large temporaries per call,
/// and glibc returns them to the OS and page-faults them back in (about 30% of U-Net time).
/// Wrapped to count live heap bytes (`stats`, `scripts/soak.sh`).
#[global_allocator]
static GLOBAL: sdcam::alloc::Counting<mimalloc::MiMalloc> =
    sdcam::alloc::Counting(mimalloc::MiMalloc);

/// mimalloc's `mi_option_purge_delay` (its `mi_option_e`, the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS only after 10 s unused instead of mimalloc's 1 s (10 ms in
/// v2): a U-Net call at a 64² latent takes seconds, so with the default the large temporaries
/// of one block were returned and faulted back in (zeroed by the kernel) by the next, 9 % of
/// its samples in `perf` and 10 % of its time (issue 14). The peak RSS does not change; memory
/// is still returned when the pipeline idles. `MIMALLOC_PURGE_DELAY` in the environment wins.
fn set_allocator_options() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
}

fn main() -> ExitCode {
    set_allocator_options();
    sdcam::cli::main(sdcam::cli::Cli::parse())
}
