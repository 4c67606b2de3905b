#![no_main]
//! `cargo +nightly fuzz run profile`: the harness is `sdcam::fuzzing::profile`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdcam::fuzzing::profile(data));
