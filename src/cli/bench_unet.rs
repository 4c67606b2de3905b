//! `sdcam bench-unet`: times the full-size U-Net (random weights, f32, CPU) at given latent
//! sizes, with cached prompt K/V (`forward_with_kv`, what the stream uses) and with prompt
//! embeddings (`forward`, what diffusers does), for comparison with
//! `scripts/bench/unet_peer.py` (same JSON fields).
//!
//! Before every timed iteration it waits (bounded) until the rest of the machine is idle, as the
//! Python peer's `bench_peer.py` does, because small shared machines are noisy.

use std::time::{Duration, Instant};

use crate::model::arch::{random_var_builder, Arch, RandomWeights};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use clap::Args;
use serde::Serialize;

use crate::cli::median;

/// The flags of `sdcam bench-unet`.
#[derive(Args, Debug)]
pub struct BenchUnetArgs {
    /// Architecture: `sd-turbo` or `sd15`.
    #[arg(long, default_value = "sd-turbo")]
    arch: Arch,
    /// Latent size (height = width), repeatable: 32 for 256² images, 64 for 512².
    #[arg(long = "latent", default_values_t = [32usize, 64])]
    latents: Vec<usize>,
    /// Samples per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed forwards per latent size and mode.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed forwards before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Diffusion timestep passed to the U-Net.
    #[arg(long, default_value_t = 500)]
    timestep: u32,
    /// Which calls to time: `kv` (forward_with_kv), `embeds` (forward), or both.
    #[arg(long = "mode", value_parser = ["kv", "embeds"], default_values_t = ["kv".to_string(), "embeds".to_string()])]
    modes: Vec<String>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Do not wait for an idle machine before each timed forward.
    #[arg(long)]
    no_gate: bool,
    /// Longest wait for an idle machine, seconds (then it times anyway and says so).
    #[arg(long, default_value_t = 60.0)]
    idle_max_wait: f64,
    /// Print the U-Net `config.json` of `--arch` and exit (for the Python peer).
    #[arg(long)]
    print_config: bool,
}

/// One result row; the Python peer prints the same fields.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(rename = "impl")]
    implementation: &'static str,
    arch: String,
    mode: String,
    latent: usize,
    batch: usize,
    timestep: u32,
    iters: usize,
    warmup: usize,
    threads: usize,
    median_ms: f64,
    min_ms: f64,
    mean_ms: f64,
    times_ms: Vec<f64>,
    /// Timed iterations that started on an idle machine.
    idle_iters: usize,
}

/// Busy CPU seconds of the whole machine (user..steal in /proc/stat).
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((v.iter().sum::<u64>() - v[3] - v[4]) as f64 / tck)
}

/// CPU seconds used by this process.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Waits until other processes use less than 10 % of the machine for two consecutive 1 s
/// windows, at most `max_wait`. Returns whether the machine was idle.
fn wait_idle(max_wait: Duration) -> bool {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let start = Instant::now();
    let mut ok = 0;
    loop {
        let (Some(b0), m0, w0) = (machine_busy_s(), own_cpu_s(), Instant::now()) else {
            return false;
        };
        std::thread::sleep(Duration::from_secs(1));
        let Some(b1) = machine_busy_s() else {
            return false;
        };
        let others = (b1 - b0) - (own_cpu_s() - m0);
        let frac = others / (w0.elapsed().as_secs_f64() * ncpu);
        ok = if frac < 0.10 { ok + 1 } else { 0 };
        if ok >= 2 {
            return true;
        }
        if start.elapsed() > max_wait {
            return false;
        }
    }
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
        a.iters > 0 && a.batch > 0,
        "--iters and --batch must be > 0"
    );
    let dev = Device::Cpu;
    let cfg = a.arch.unet_config();
    let t0 = Instant::now();
    let vb = random_var_builder(DType::F32, &dev, a.seed);
    let unet = UNet2DConditionModel::new(vb, &cfg).context("building the U-Net")?;
    let build_s = t0.elapsed().as_secs_f64();
    let cross = match cfg.cross_attention_dim {
        crate::model::unet::OneOrMany::One(c) => c,
        crate::model::unet::OneOrMany::Many(ref v) => v[0],
    };
    let threads = candle_core::utils::get_num_threads();
    eprintln!(
        "bench-unet: {} U-Net, random weights (seed {}), built in {build_s:.1} s; f32 CPU, {threads} threads",
        a.arch, a.seed
    );

    // Inputs with unit std, deterministic from the seed.
    let inputs = RandomWeights::new(a.seed ^ 0x5eed);
    let unit = |shape: Shape, name: &str| inputs.tensor(&shape, name)? * 50.0;
    let embeds = unit(Shape::from((1, 77, cross)), "bench.encoder_hidden_states")?;
    let t1 = Instant::now();
    let kv = unet.precompute_prompt_kv(&embeds)?;
    let kv_ms = t1.elapsed().as_secs_f64() * 1e3;
    eprintln!("bench-unet: prompt K/V precomputed in {kv_ms:.0} ms");
    let embeds_b = embeds.repeat((a.batch, 1, 1))?;
    let timestep = Tensor::new(vec![a.timestep as f32; a.batch], &dev)?;

    for &latent in &a.latents {
        let sample = unit(Shape::from((a.batch, 4, latent, latent)), "bench.sample")?;
        for mode in &a.modes {
            let call = || -> candle_core::Result<Tensor> {
                match mode.as_str() {
                    "kv" => unet.forward_with_kv(&sample, &timestep, &kv),
                    _ => unet.forward(&sample, &timestep, &embeds_b),
                }
            };
            for _ in 0..a.warmup {
                std::hint::black_box(call()?);
            }
            let mut times = Vec::with_capacity(a.iters);
            let mut idle_iters = 0;
            for _ in 0..a.iters {
                if !a.no_gate && wait_idle(Duration::from_secs_f64(a.idle_max_wait)) {
                    idle_iters += 1;
                }
                let t = Instant::now();
                let out = call()?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                anyhow::ensure!(
                    out.dims() == sample.dims(),
                    "unexpected output shape {:?}",
                    out.dims()
                );
            }
            let mut sorted = times.clone();
            let median_ms = median(&mut sorted);
            let row = Row {
                implementation: "sdcam",
                arch: a.arch.name().to_string(),
                mode: if mode == "kv" {
                    "forward_with_kv".into()
                } else {
                    "forward".into()
                },
                latent,
                batch: a.batch,
                timestep: a.timestep,
                iters: a.iters,
                warmup: a.warmup,
                threads,
                median_ms,
                min_ms: sorted[0],
                mean_ms: times.iter().sum::<f64>() / times.len() as f64,
                times_ms: times.iter().map(|t| (t * 10.0).round() / 10.0).collect(),
                idle_iters,
            };
            if a.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "{:9} {:16} latent {:3}  batch {}  median {:8.1} ms  min {:8.1} ms  ({} iters, {} on an idle machine)",
                    row.arch, row.mode, latent, a.batch, row.median_ms, row.min_ms, a.iters, idle_iters
                );
            }
        }
    }
    Ok(())
}
