//! `sdcam bench-relay`: the relay's own per-frame cost (YUYV → RGB pre-processing and RGB →
//! YUYV post-processing with resizing), without a transform.

use std::time::Instant;

use clap::Args;

use crate::cli::{median, parse_size};
use crate::convert::{from_rgb, Fit, Postprocess, Preprocess};
use crate::frame::{ColorRange, Frame, PixelFormat};

/// The sizes and frame count of `sdcam bench-relay`.
#[derive(Args, Debug)]
pub struct BenchRelayArgs {
    /// Input size (camera), as WxH.
    #[arg(long, default_value = "1280x720")]
    input: String,
    /// Model size, as WxH.
    #[arg(long, default_value = "512x512")]
    model: String,
    /// Output size, as WxH.
    #[arg(long, default_value = "1280x720")]
    output: String,
    /// Frames to time (after 10 warm-up frames).
    #[arg(long, default_value_t = 200)]
    frames: u32,
}

/// Times pre- and post-processing on a test pattern and prints the medians (milliseconds).
///
/// # Errors
/// A size that is not `WxH`, or a conversion error.
pub fn run(b: &BenchRelayArgs) -> anyhow::Result<()> {
    let (iw, ih) = parse_size(&b.input)?;
    let (mw, mh) = parse_size(&b.model)?;
    let (ow, oh) = parse_size(&b.output)?;
    let rgb = Frame::new(
        iw,
        ih,
        PixelFormat::Rgb24,
        ColorRange::Full,
        crate::source::pattern::render(iw, ih, 1),
    )?;
    let yuyv = from_rgb(&rgb, PixelFormat::Yuyv, ColorRange::Limited)?;
    let (mut pre, mut post) = (Preprocess::default(), Postprocess::default());
    let (mut t_pre, mut t_post) = (Vec::new(), Vec::new());
    for i in 0..b.frames + 10 {
        let t0 = Instant::now();
        let m = pre.run(&yuyv, mw, mh, Fit::Crop, false)?;
        let t1 = Instant::now();
        let o = post.run(&m, ow, oh, Fit::Crop, PixelFormat::Yuyv)?;
        let t2 = Instant::now();
        std::hint::black_box(&o);
        if i >= 10 {
            t_pre.push((t1 - t0).as_secs_f64() * 1e3);
            t_post.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let (p, q) = (median(&mut t_pre), median(&mut t_post));
    println!(
        "relay overhead, median of {} frames (no transform):",
        b.frames
    );
    println!("  pre-process  {iw}x{ih} YUYV -> {mw}x{mh} RGB   {p:7.2} ms");
    println!("  post-process {mw}x{mh} RGB -> {ow}x{oh} YUYV   {q:7.2} ms");
    println!(
        "  total                                        {:7.2} ms ({:.0} fps on one core)",
        p + q,
        1000.0 / (p + q)
    );
    Ok(())
}
