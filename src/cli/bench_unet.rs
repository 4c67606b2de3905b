//! `sdcam bench-unet`: times the full-size U-Net (random weights, f32, CPU) at given latent
//! sizes, with cached prompt K/V (`forward_with_kv`, what the stream uses) and with prompt
//! embeddings (`forward`, what diffusers does), for comparison with
//! `scripts/bench/unet_peer.py` (same JSON fields).
//!
//! Before every timed iteration it waits (bounded) until the rest of the machine is idle, as the
//! Python peer's `bench_peer.py` does, because small shared machines are noisy.

use std::time::Instant;

use crate::model::arch::{random_var_builder, Arch, RandomWeights};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Context;
use candle_core::{Device, Shape, Tensor};
use clap::Args;
use serde::Serialize;

use crate::cli::timing::{Timing, TimingArgs, TimingFields};

/// The flags of `sdcam bench-unet`.
#[derive(Args, Debug)]
pub struct BenchUnetArgs {
    /// Architecture: `sd-turbo` or `sd15`.
    #[arg(long, default_value = "sd-turbo")]
    arch: Arch,
    /// Latent size (height = width), repeatable: 32 for 256² images, 64 for 512².
    #[arg(long = "latent", default_values_t = [32usize, 64])]
    latents: Vec<usize>,
    /// Samples per forward, repeatable (the scaling table runs 1 to 4).
    #[arg(long = "batch", default_values_t = [1usize])]
    batches: Vec<usize>,
    /// Diffusion timestep passed to the U-Net.
    #[arg(long, default_value_t = 500)]
    timestep: u32,
    /// Which calls to time: `kv` (forward_with_kv), `embeds` (forward), or both.
    #[arg(long = "mode", value_parser = ["kv", "embeds"], default_values_t = ["kv".to_string(), "embeds".to_string()])]
    modes: Vec<String>,
    #[command(flatten)]
    timing: TimingArgs,
    /// Print the U-Net `config.json` of `--arch` and exit (for the Python peer).
    #[arg(long)]
    print_config: bool,
}

/// One result row; the Python peer prints the same fields.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(rename = "impl")]
    implementation: &'static str,
    component: &'static str,
    arch: String,
    mode: String,
    latent: usize,
    batch: usize,
    timestep: u32,
    #[serde(flatten)]
    timing: TimingFields,
}

/// Times the U-Net as the flags say and prints one row per latent size and mode.
///
/// # Errors
/// Zero `--iters` or `--batch`, or a failed U-Net build or call.
pub fn run(a: &BenchUnetArgs) -> anyhow::Result<()> {
    if a.print_config {
        return crate::cli::print_out(a.arch.unet_config_json());
    }
    anyhow::ensure!(
        a.timing.iters > 0 && a.batches.iter().all(|&b| b > 0),
        "--iters and --batch must be > 0"
    );
    let dev = Device::Cpu;
    let cfg = a.arch.unet_config();
    let t0 = Instant::now();
    let vb = random_var_builder(a.timing.var_builder_dtype()?, &dev, a.timing.seed);
    let unet = UNet2DConditionModel::new(vb, &cfg).context("building the U-Net")?;
    let build_s = t0.elapsed().as_secs_f64();
    let cross = match cfg.cross_attention_dim {
        crate::model::unet::OneOrMany::One(c) => c,
        crate::model::unet::OneOrMany::Many(ref v) => v[0],
    };
    let threads = candle_core::utils::get_num_threads();
    eprintln!(
        "bench-unet: {} U-Net, random weights (seed {}), built in {build_s:.1} s; {} CPU, {threads} threads",
        a.arch, a.timing.seed, a.timing.dtype.name()
    );

    // Inputs with unit std, deterministic from the seed.
    let inputs = RandomWeights::new(a.timing.seed ^ 0x5eed);
    let unit = |shape: Shape, name: &str| inputs.tensor(&shape, name)? * 50.0;
    let embeds = unit(Shape::from((1, 77, cross)), "bench.encoder_hidden_states")?;
    let t1 = Instant::now();
    let kv = unet.precompute_prompt_kv(&embeds)?;
    let kv_ms = t1.elapsed().as_secs_f64() * 1e3;
    eprintln!("bench-unet: prompt K/V precomputed in {kv_ms:.0} ms");

    for &batch in &a.batches {
        let embeds_b = embeds.repeat((batch, 1, 1))?;
        let timestep = Tensor::new(vec![a.timestep as f32; batch], &dev)?;
        for &latent in &a.latents {
            let sample = unit(Shape::from((batch, 4, latent, latent)), "bench.sample")?;
            for mode in &a.modes {
                let call = || -> anyhow::Result<Tensor> {
                    Ok(match mode.as_str() {
                        "kv" => unet.forward_with_kv(&sample, &timestep, &kv)?,
                        _ => unet.forward(&sample, &timestep, &embeds_b)?,
                    })
                };
                let check = |out: &Tensor| -> anyhow::Result<()> {
                    anyhow::ensure!(
                        out.dims() == sample.dims(),
                        "unexpected output shape {:?}",
                        out.dims()
                    );
                    Ok(())
                };
                let timing = a.timing.measure(call, check)?;
                let row = Row {
                    implementation: "sdcam",
                    component: "unet",
                    arch: a.arch.name().to_string(),
                    mode: if mode == "kv" {
                        "forward_with_kv".into()
                    } else {
                        "forward".into()
                    },
                    latent,
                    batch,
                    timestep: a.timestep,
                    timing: a.timing.fields(&timing),
                };
                let label = format!(
                    "{:9} {:16} latent {latent:3}  batch {batch}",
                    row.arch, row.mode
                );
                Timing::print(&row, &row.timing, a.timing.json, &label)?;
            }
        }
    }
    Ok(())
}
