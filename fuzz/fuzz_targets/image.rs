#![no_main]
//! `cargo +nightly fuzz run image`: the harness is `sdcam::fuzzing::image`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdcam::fuzzing::image(data));
