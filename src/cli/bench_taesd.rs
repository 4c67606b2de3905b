//! `sdcam bench-taesd`: times TAESD (`AutoencoderTiny`, the madebyollin/taesd config, random
//! weights, f32 CPU) encode and decode separately at given image sizes, for comparison with
//! `scripts/bench/components_peer.py` (same JSON fields: `component` is `taesd-encode` or
//! `taesd-decode`, `size` the image side in pixels).

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Shape, Tensor};
use clap::Args;
use serde::Serialize;

use crate::cli::timing::{Timing, TimingArgs, TimingFields};
use crate::model::arch::{random_var_builder, Arch, RandomWeights};
use crate::model::taesd::AutoencoderTiny;

/// The flags of `sdcam bench-taesd`.
#[derive(Args, Debug)]
pub struct BenchTaesdArgs {
    /// Image size (height = width, a multiple of 8), repeatable.
    #[arg(long = "size", default_values_t = [256usize, 512])]
    sizes: Vec<usize>,
    /// Images per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    timing: TimingArgs,
}

/// One result row; the Python peer prints the same fields.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(rename = "impl")]
    implementation: &'static str,
    component: &'static str,
    size: usize,
    batch: usize,
    #[serde(flatten)]
    timing: TimingFields,
}

/// Times TAESD as the flags say and prints one row per size and direction.
///
/// # Errors
/// Zero `--iters`/`--batch`, a size that is not a positive multiple of 8, or a failed call.
pub fn run(a: &BenchTaesdArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.timing.iters > 0 && a.batch > 0,
        "--iters and --batch must be > 0"
    );
    if let Some(s) = a.sizes.iter().find(|&&s| s == 0 || s % 8 != 0) {
        anyhow::bail!("--size {s}: TAESD needs a positive multiple of 8");
    }
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let vb = random_var_builder(a.timing.var_builder_dtype()?, &dev, a.timing.seed);
    let taesd =
        AutoencoderTiny::new(vb, &Arch::SdTurbo.taesd_config()).context("building TAESD")?;
    eprintln!(
        "bench-taesd: TAESD, random weights (seed {}), built in {:.2} s; {} CPU, {} threads",
        a.timing.seed,
        t0.elapsed().as_secs_f64(),
        a.timing.dtype.name(),
        candle_core::utils::get_num_threads()
    );
    let inputs = RandomWeights::new(a.timing.seed ^ 0x5eed);
    for &size in &a.sizes {
        // An image in about −1..1 and latents with unit spread.
        let image = (inputs.tensor(&Shape::from((a.batch, 3, size, size)), "bench.image")? * 25.0)?;
        let latents = (inputs.tensor(
            &Shape::from((a.batch, 4, size / 8, size / 8)),
            "bench.latents",
        )? * 50.0)?;
        let shape_is = |want: Vec<usize>| {
            move |out: &Tensor| -> anyhow::Result<()> {
                anyhow::ensure!(
                    out.dims() == want,
                    "unexpected output shape {:?}",
                    out.dims()
                );
                Ok(())
            }
        };
        for component in ["taesd-encode", "taesd-decode"] {
            let timing = if component == "taesd-encode" {
                a.timing.measure(
                    || Ok(taesd.encode(&image)?),
                    shape_is(latents.dims().to_vec()),
                )?
            } else {
                a.timing.measure(
                    || Ok(taesd.decode(&latents)?),
                    shape_is(image.dims().to_vec()),
                )?
            };
            let row = Row {
                implementation: "sdcam",
                component,
                size,
                batch: a.batch,
                timing: a.timing.fields(&timing),
            };
            let label = format!("{component:13} size {size:4}  batch {}", a.batch);
            Timing::print(&row, &row.timing, a.timing.json, &label)?;
        }
    }
    Ok(())
}
