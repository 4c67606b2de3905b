//! `sdcam bench`: times the StreamDiffusion pipeline stage by stage on generated frames, and the
//! paper's comparisons (Stream Batch vs sequential at 1/2/4 steps, R-CFG variants) side by side
//! in one run, as ratios.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::cli::{median, parse_size, print_out};

use crate::model::sd::StableDiffusion;
use crate::pipeline::stream::{images_from_rgb, rgb_from_images};
use crate::pipeline::{Noise, StreamDiffusion, StreamParams};
use crate::profile::{CfgType, Profile, StreamMode};

/// The flags of `sdcam bench`.
#[derive(Args, Debug)]
pub struct PipelineBenchArgs {
    /// Profile whose model and stream settings are measured (default: built-in defaults).
    #[arg(short, long)]
    profile: Option<PathBuf>,
    /// Any profile key, e.g. `--set stream.t_index_list=[32,45]` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Stream size WxH (overrides stream.width/height).
    #[arg(long)]
    size: Option<String>,
    /// Timed frames per configuration.
    #[arg(long, default_value_t = 3)]
    frames: usize,
    /// Untimed frames before timing each configuration.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Only the profile's configuration, without the comparison suite.
    #[arg(long)]
    no_compare: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `sdcam bench`: loads the profile's model and prints the report (a table, or JSON).
///
/// # Errors
/// A bad profile, size or `--set`, a model that does not load, or a failed pipeline call.
pub fn run_command(b: &PipelineBenchArgs) -> Result<()> {
    let mut sets = b.sets.clone();
    if let Some(size) = &b.size {
        let (w, h) = parse_size(size)?;
        sets.push(format!("stream.width={w}"));
        sets.push(format!("stream.height={h}"));
    }
    let lp = crate::cli::run::load_profile(&crate::cli::run::RunArgs {
        profile: b.profile.clone(),
        sets,
        ..Default::default()
    })?;
    let p = &lp.profile;
    let model = Arc::new(crate::transform::diffusion::load_model(
        &crate::config::model_options(&p.model),
    )?);
    let report = run(
        model,
        p,
        &BenchOptions {
            frames: b.frames.max(1),
            warmup: b.warmup,
            compare: !b.no_compare,
        },
    )?;
    if b.json {
        print_out(&serde_json::to_string_pretty(&report)?)
    } else {
        print_out(report.table().trim_end())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed frames per configuration (after the warm-up).
    pub frames: usize,
    /// Untimed frames first (the first call also primes the latent buffer).
    pub warmup: usize,
    /// Also run the comparison suite.
    pub compare: bool,
}

/// Median milliseconds per frame of each stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimes {
    pub preprocess: f64,
    pub encode: f64,
    pub unet: f64,
    pub decode: f64,
    pub postprocess: f64,
    pub total: f64,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub label: String,
    pub t_index_list: Vec<usize>,
    pub cfg_type: String,
    pub use_denoising_batch: bool,
    /// Rows of one U-Net call (Stream Batch) or per step (sequential).
    pub unet_batch: usize,
    pub ms: StageTimes,
    pub fps: f64,
    /// This row's ms/frame divided by its comparison base (1 for the base itself).
    pub ratio: Option<f64>,
    pub ratio_to: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub threads: usize,
    pub frames: usize,
    pub rows: Vec<BenchRow>,
}

fn cfg_name(c: CfgType) -> &'static str {
    match c {
        CfgType::None => "none",
        CfgType::Full => "full",
        CfgType::SelfNeg => "self",
        CfgType::Initialize => "initialize",
    }
}

/// Times one configuration.
fn measure(
    model: &Arc<StableDiffusion>,
    profile: &Profile,
    params: StreamParams,
    opts: &BenchOptions,
    label: String,
) -> Result<BenchRow> {
    let mut stream = StreamDiffusion::prepare(
        model.clone(),
        params.clone(),
        crate::config::live_params(profile),
        &profile.prompt,
        &profile.negative_prompt,
        Noise::seeded(profile.stream.seed),
    )?;
    let (w, h) = (params.width, params.height);
    let f = params.frame_buffer_size;
    let (device, dtype) = {
        let (d, t) = stream.device_dtype();
        (d.clone(), t)
    };
    let mut t = [
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    ];
    // A GPU runs asynchronously: each stage boundary waits for the device (a no-op on the CPU)
    // so the time lands on the stage that spent it.
    for i in 0..opts.warmup + opts.frames {
        let frames: Vec<Vec<u8>> = (0..f)
            .map(|j| crate::source::pattern::render(w as u32, h as u32, (i * f + j) as u64))
            .collect();
        let t0 = Instant::now();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let x = images_from_rgb(&refs, w, h, dtype, &device)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let x_t = match params.mode {
            StreamMode::Img2img => stream.encode_image(&x)?,
            StreamMode::Txt2img => x.zeros_like()?,
        };
        device.synchronize()?;
        let t2 = Instant::now();
        let x0 = match params.mode {
            StreamMode::Img2img => stream.predict_x0(&x_t)?,
            StreamMode::Txt2img => {
                let (lh, lw) = stream.latent_size();
                let lat = candle_core::Tensor::randn(0f32, 1f32, (f, 4, lh, lw), &device)?
                    .to_dtype(dtype)?;
                stream.predict_x0(&lat)?
            }
        };
        device.synchronize()?;
        let t3 = Instant::now();
        let img = stream.decode_image(&x0)?;
        device.synchronize()?;
        let t4 = Instant::now();
        let rgb = rgb_from_images(&img)?;
        device.synchronize()?;
        let t5 = Instant::now();
        std::hint::black_box(rgb);
        if i >= opts.warmup {
            let per = f as f64;
            for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0]
                .iter()
                .enumerate()
            {
                t[k].push(d.as_secs_f64() * 1e3 / per);
            }
        }
    }
    let [mut pre, mut enc, mut unet, mut dec, mut post, mut tot] = t;
    let ms = StageTimes {
        preprocess: median(&mut pre),
        encode: median(&mut enc),
        unet: median(&mut unet),
        decode: median(&mut dec),
        postprocess: median(&mut post),
        total: median(&mut tot),
    };
    Ok(BenchRow {
        label,
        t_index_list: params.t_index_list.clone(),
        cfg_type: cfg_name(params.cfg_type).into(),
        use_denoising_batch: params.use_denoising_batch,
        unet_batch: stream.unet_batch(),
        fps: if ms.total > 0.0 { 1e3 / ms.total } else { 0.0 },
        ms,
        ratio: None,
        ratio_to: None,
    })
}

/// Step lists used by the comparison suite for k = 1, 2, 4 (StreamDiffusion's examples).
pub fn suite_t_index(k: usize) -> Vec<usize> {
    match k {
        1 => vec![35],
        2 => vec![32, 45],
        _ => vec![0, 16, 32, 45],
    }
}

/// Runs the benchmark for `profile` on an already loaded model.
pub fn run(
    model: Arc<StableDiffusion>,
    profile: &Profile,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    // The bench always runs the pipeline: an auto stream size follows the model's native size.
    let diffusion = Profile {
        transform: crate::profile::TransformKind::Diffusion,
        ..profile.clone()
    };
    tracing::info!(
        "bench: stream {}",
        crate::profile::geometry::resolve(&diffusion)
    );
    let base = crate::config::stream_params(&diffusion);
    let mut rows = Vec::new();
    tracing::info!("bench: profile settings");
    rows.push(measure(
        &model,
        profile,
        base.clone(),
        opts,
        "profile".into(),
    )?);
    if opts.compare {
        let mut p = base.clone();
        p.mode = StreamMode::Img2img;
        p.frame_buffer_size = 1;
        for k in [1usize, 2, 4] {
            let mut batch_ms = None;
            for batch in [true, false] {
                let mut q = p.clone();
                q.t_index_list = suite_t_index(k);
                q.cfg_type = CfgType::None;
                q.use_denoising_batch = batch;
                let label = format!(
                    "{k} step(s), cfg none, {}",
                    if batch { "Stream Batch" } else { "sequential" }
                );
                tracing::info!("bench: {label}");
                let mut row = measure(&model, profile, q, opts, label)?;
                if batch {
                    batch_ms = Some(row.ms.total);
                    row.ratio = Some(1.0);
                } else if let Some(b) = batch_ms {
                    row.ratio = Some(row.ms.total / b);
                    row.ratio_to = Some(format!("{k} step(s) Stream Batch"));
                }
                rows.push(row);
            }
        }
        let mut none_ms = None;
        for cfg in [
            CfgType::None,
            CfgType::SelfNeg,
            CfgType::Initialize,
            CfgType::Full,
        ] {
            let mut q = p.clone();
            q.t_index_list = suite_t_index(2);
            q.cfg_type = cfg;
            q.use_denoising_batch = true;
            let label = format!("2 steps, cfg {}, Stream Batch", cfg_name(cfg));
            tracing::info!("bench: {label}");
            let mut row = measure(&model, profile, q, opts, label)?;
            match none_ms {
                None => {
                    none_ms = Some(row.ms.total);
                    row.ratio = Some(1.0);
                }
                Some(b) => {
                    row.ratio = Some(row.ms.total / b);
                    row.ratio_to = Some("cfg none".into());
                }
            }
            rows.push(row);
        }
    }
    Ok(BenchReport {
        model: model.description.clone(),
        width: base.width,
        height: base.height,
        threads: candle_core::utils::get_num_threads(),
        frames: opts.frames,
        rows,
    })
}

impl BenchReport {
    /// A markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "model: {}\nsize: {}x{}, {} thread(s), median of {} frame(s)\n\n",
            self.model, self.width, self.height, self.threads, self.frames
        );
        s.push_str(
            "| configuration | U-Net batch | ms/frame | fps | pre | encode | U-Net | decode | post | ratio |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let ratio = match (&r.ratio, &r.ratio_to) {
                (Some(x), Some(to)) => format!("{x:.2}× {to}"),
                (Some(x), None) => format!("{x:.2}"),
                _ => String::new(),
            };
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
                r.label,
                r.unet_batch,
                r.ms.total,
                r.fps,
                r.ms.preprocess,
                r.ms.encode,
                r.ms.unet,
                r.ms.decode,
                r.ms.postprocess,
                ratio
            ));
        }
        s
    }
}
