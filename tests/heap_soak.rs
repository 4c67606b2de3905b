//! Live heap bytes of the diffusion transform across prompt changes and frames (issue 11, "Memory
//! over time"): a counting global allocator measures what is allocated and not freed. After a
//! warm-up, many more prompt changes and frames must leave the live heap where it was, so that
//! a cache, history or per-frame tensor that grows without bound fails here rather than in a
//! two-hour soak (`scripts/soak.sh`, which measures the process's RSS).
//!
//! The only test in this binary on purpose: the allocator counts every thread of the process.

use std::alloc::System;
use std::path::Path;

use sdcam::alloc::{heap_bytes, Counting};
use sdcam::frame::{ColorRange, Frame, PixelFormat};
use sdcam::profile::LoadedProfile;
use sdcam::transform::{self, Transform};

#[global_allocator]
static ALLOC: Counting<System> = Counting(System);

fn live() -> i64 {
    heap_bytes().expect("the counting allocator is installed").0 as i64
}

const W: u32 = 64;
const H: u32 = 64;

fn frame(n: u64) -> Frame {
    let data = sdcam::source::pattern::render(W, H, n);
    Frame::new(W, H, PixelFormat::Rgb24, ColorRange::Full, data).unwrap()
}

/// One soak round: a new prompt (a string never seen before), applied at once or, every other
/// round, blended over two frames, then three frames.
fn round(t: &mut Box<dyn Transform>, base: &LoadedProfile, n: u64) {
    let mut p = base.profile.clone();
    p.prompt = format!("{}, take {n}", base.profile.prompt);
    p.negative_prompt = format!("{}, take {n}", base.profile.negative_prompt);
    p.stream.prompt_blend_frames = if n.is_multiple_of(2) { 0 } else { 2 };
    t.apply(&sdcam::config::transform_options(&p)).unwrap();
    for i in 0..3 {
        let mut out = Vec::new();
        t.process_into(&frame(3 * n + i), &mut out).unwrap();
    }
}

#[test]
fn prompt_changes_and_frames_do_not_grow_the_live_heap() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/demo.toml");
    // The demo profile's pipeline (tiny model, 2 steps, self-negative R-CFG, similarity
    // filter) at a small stream size, to keep the test quick.
    let base = LoadedProfile::load(&demo)
        .unwrap()
        .with_set("stream.width", &W.to_string())
        .unwrap()
        .with_set("stream.height", &H.to_string())
        .unwrap();
    let mut t = transform::build(&sdcam::config::transform_options(&base.profile)).unwrap();
    for n in 0..5 {
        round(&mut t, &base, n);
    }
    let before = live();
    const ROUNDS: u64 = 30;
    for n in 5..5 + ROUNDS {
        round(&mut t, &base, n);
    }
    let after = live();
    let growth = after - before;
    eprintln!(
        "live heap {:.1} MB before, {:.1} MB after {ROUNDS} prompt changes and {} frames: \
         {growth:+} bytes",
        before as f64 / 1e6,
        after as f64 / 1e6,
        3 * ROUNDS
    );
    // Per-round state that is kept by design (the last output frame, the filter's last frame)
    // is replaced, not added to; allow a little slack for lazily created thread-locals.
    assert!(
        growth < 64 * 1024,
        "the live heap grew by {growth} bytes over {ROUNDS} rounds ({} per round)",
        growth / ROUNDS as i64
    );
}
