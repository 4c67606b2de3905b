#![no_main]
//! `cargo +nightly fuzz run y4m`: the harness is `sdcam::fuzzing::y4m`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdcam::fuzzing::y4m(data));
