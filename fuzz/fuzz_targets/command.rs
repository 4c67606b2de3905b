#![no_main]
//! `cargo +nightly fuzz run command`: the harness is `sdcam::fuzzing::command`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdcam::fuzzing::command(data));
