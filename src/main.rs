//! The `sdcam` command line: run a profile, list devices, check profiles, measure the relay.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sdcam::app::{self, RunOptions, StatusMode};
use sdcam::control::Control;
use sdcam::profile::{self, LoadedProfile};

mod bench_unet;

/// mimalloc instead of glibc malloc: candle's CPU kernels allocate large temporaries per call,
/// and glibc returns them to the OS and page-faults them back in (about 30% of U-Net time).
/// Wrapped to count live heap bytes (`stats`, `scripts/soak.sh`).
#[global_allocator]
static GLOBAL: sdcam::alloc::Counting<mimalloc::MiMalloc> =
    sdcam::alloc::Counting(mimalloc::MiMalloc);

#[derive(Parser, Debug)]
#[command(
    name = "sdcam",
    version,
    about = "A real-time, Stable-Diffusion-transformed virtual camera",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream: source → transform → output (the default when no command is given).
    Run(RunArgs),
    /// List cameras (formats, sizes) and v4l2loopback devices (card labels, in use or free).
    Devices,
    /// Validate profile files and print their problems with file, line, column and key.
    CheckProfile {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List every profile key with its default value.
    Keys,
    /// Measure the relay's own per-frame cost (conversion and resizing, no model).
    BenchRelay(BenchArgs),
    /// Time the full-size U-Net (random weights, f32 CPU) at given latent sizes.
    BenchUnet(bench_unet::BenchUnetArgs),
    /// Time the StreamDiffusion pipeline by stage, and the paper's comparisons (Stream Batch vs
    /// sequential, R-CFG types) side by side, on generated frames.
    Bench(PipelineBenchArgs),
    /// Developer tools (not for streaming).
    #[command(subcommand, hide = true)]
    Dev(DevCmd),
}

#[derive(Subcommand, Debug)]
enum DevCmd {
    /// Write full-size models with deterministic random weights into a Hugging Face cache, laid
    /// out as the real repositories (real configs and file names, fp16 variants,
    /// refs/snapshots/blobs), for offline end-to-end checks by hub id.
    WriteRandomHub {
        /// The cache folder (what HF_HUB_CACHE names, e.g. ~/.cache/huggingface/hub).
        #[arg(long)]
        cache: PathBuf,
        /// Repository to write (repeatable; default: all supported).
        #[arg(long = "repo")]
        repos: Vec<String>,
        #[arg(long, default_value_t = sdcam::model::random_hub::DEFAULT_SEED)]
        seed: u64,
        /// Replace an existing cache entry of the same repository.
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Args, Debug)]
struct PipelineBenchArgs {
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

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Profile file (TOML). Without one, the built-in defaults are used.
    #[arg(short, long)]
    profile: Option<PathBuf>,
    /// Source: `pattern`, `camera[:NAME]`, `/dev/videoN`, `screen[:DISPLAY]`, a .y4m/.png/.jpg file, or `-` (Y4M on stdin).
    #[arg(long)]
    source: Option<String>,
    /// Output: `loopback[:LABEL]`, `/dev/videoN`, a .y4m file, `-` (Y4M on stdout), `png:DIR`, or `null`.
    #[arg(short, long)]
    output: Option<String>,
    /// Prompt (overrides the profile's).
    #[arg(long)]
    prompt: Option<String>,
    /// Transform: `diffusion` (the StreamDiffusion pipeline), or `tint`, `posterize`, `identity`.
    #[arg(long)]
    transform: Option<String>,
    /// Stop after writing N frames.
    #[arg(long, value_name = "N")]
    frames: Option<u64>,
    /// Frame rate of the source and the output.
    #[arg(long)]
    fps: Option<f64>,
    /// Any profile key, e.g. `--set stream.guidance_scale=1.5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Do not read control commands from stdin.
    #[arg(long)]
    no_stdin: bool,
    /// Seconds between status log lines when stderr is not a terminal (0 = none).
    #[arg(long, default_value_t = 5.0)]
    status_interval: f64,
}

#[derive(Args, Debug)]
struct BenchArgs {
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

fn source_spec(spec: &str) -> Vec<(&'static str, toml::Value)> {
    let s = |v: &str| toml::Value::String(v.to_string());
    if spec == "pattern" {
        vec![("source.kind", s("pattern"))]
    } else if spec == "screen" {
        vec![("source.kind", s("screen"))]
    } else if let Some(d) = spec.strip_prefix("screen:") {
        vec![("source.kind", s("screen")), ("source.display", s(d))]
    } else if spec == "camera" {
        vec![("source.kind", s("camera"))]
    } else if let Some(d) = spec.strip_prefix("camera:") {
        vec![("source.kind", s("camera")), ("source.device", s(d))]
    } else if spec.starts_with("/dev/") {
        vec![("source.kind", s("camera")), ("source.device", s(spec))]
    } else {
        vec![("source.kind", s("file")), ("source.path", s(spec))]
    }
}

fn output_spec(spec: &str) -> Vec<(&'static str, toml::Value)> {
    let s = |v: &str| toml::Value::String(v.to_string());
    if spec == "null" {
        vec![("output.kind", s("null"))]
    } else if spec == "loopback" {
        vec![("output.kind", s("v4l2loopback"))]
    } else if let Some(l) = spec.strip_prefix("loopback:") {
        vec![("output.kind", s("v4l2loopback")), ("output.label", s(l))]
    } else if spec.starts_with("/dev/") {
        vec![
            ("output.kind", s("v4l2loopback")),
            ("output.device", s(spec)),
        ]
    } else if let Some(d) = spec.strip_prefix("png:") {
        vec![("output.kind", s("png")), ("output.path", s(d))]
    } else {
        vec![("output.kind", s("y4m")), ("output.path", s(spec))]
    }
}

fn load_profile(a: &RunArgs) -> anyhow::Result<LoadedProfile> {
    let mut lp = match &a.profile {
        Some(p) => LoadedProfile::load(p)?,
        None => LoadedProfile::default(),
    };
    let mut edits: Vec<(String, toml::Value)> = Vec::new();
    if let Some(s) = &a.source {
        edits.extend(source_spec(s).into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    if let Some(o) = &a.output {
        edits.extend(output_spec(o).into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    if let Some(p) = &a.prompt {
        edits.push(("prompt".into(), toml::Value::String(p.clone())));
    }
    if let Some(t) = &a.transform {
        edits.push(("transform".into(), toml::Value::String(t.clone())));
    }
    if let Some(f) = a.fps {
        edits.push(("source.fps".into(), toml::Value::Float(f)));
        edits.push(("output.fps".into(), toml::Value::Float(f)));
    }
    for kv in &a.sets {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        edits.push((k.trim().to_string(), profile::parse_value(v)));
    }
    if !edits.is_empty() {
        lp = lp.with_overrides(&edits)?;
    }
    Ok(lp)
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .with_context(|| format!("{s:?}: expected WxH"))?;
    Ok((w.parse()?, h.parse()?))
}

fn bench_relay(b: &BenchArgs) -> anyhow::Result<()> {
    use sdcam::convert::{from_rgb, Fit, Postprocess, Preprocess};
    use sdcam::frame::{ColorRange, Frame, PixelFormat};
    use std::time::Instant;
    let (iw, ih) = parse_size(&b.input)?;
    let (mw, mh) = parse_size(&b.model)?;
    let (ow, oh) = parse_size(&b.output)?;
    let rgb = Frame::new(
        iw,
        ih,
        PixelFormat::Rgb24,
        ColorRange::Full,
        sdcam::source::pattern::render(iw, ih, 1),
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
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, q) = (med(&mut t_pre), med(&mut t_post));
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

/// Prints a command's report on stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn real_main(cli: Cli, control: Option<Control>) -> anyhow::Result<()> {
    match cli.command {
        Some(Cmd::Devices) => print_out(sdcam::cli::devices::report().trim_end()),
        Some(Cmd::CheckProfile { files }) => {
            let mut bad = 0;
            for f in &files {
                match LoadedProfile::load(f) {
                    Ok(_) => println!("{}: ok", f.display()),
                    Err(e) => {
                        bad += 1;
                        eprintln!("{e:#}");
                    }
                }
            }
            anyhow::ensure!(bad == 0, "{bad} of {} profiles have problems", files.len());
            Ok(())
        }
        Some(Cmd::Keys) => {
            let lp = LoadedProfile::default();
            let lines: Vec<String> = profile::known_keys()
                .iter()
                .map(|k| lp.get(k).unwrap_or_else(|e| e))
                .collect();
            print_out(&lines.join("\n"))
        }
        Some(Cmd::BenchRelay(b)) => bench_relay(&b),
        Some(Cmd::Bench(b)) => bench_pipeline(&b),
        Some(Cmd::BenchUnet(b)) => bench_unet::run(&b),
        Some(Cmd::Run(a)) => run(&a, control),
        Some(Cmd::Dev(DevCmd::WriteRandomHub {
            cache,
            repos,
            seed,
            overwrite,
        })) => write_random_hub(&cache, &repos, seed, overwrite),
        None => run(&cli.run, control),
    }
}

fn write_random_hub(
    cache: &std::path::Path,
    repos: &[String],
    seed: u64,
    overwrite: bool,
) -> anyhow::Result<()> {
    use sdcam::model::random_hub;
    let repos: Vec<String> = if repos.is_empty() {
        random_hub::REPOS.iter().map(|s| s.to_string()).collect()
    } else {
        repos.to_vec()
    };
    for repo in &repos {
        let t0 = std::time::Instant::now();
        let r = random_hub::write_repo(cache, repo, seed, overwrite)?;
        let params: Vec<String> = r
            .parameters
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        print_out(&format!(
            "{repo}: {} files, {:.2} GB in {:.1} s -> {}\n  parameters: {}",
            r.files,
            r.bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64(),
            r.snapshot.display(),
            params.join(", ")
        ))?;
    }
    Ok(())
}

fn bench_pipeline(b: &PipelineBenchArgs) -> anyhow::Result<()> {
    let mut sets = b.sets.clone();
    if let Some(size) = &b.size {
        let (w, h) = parse_size(size)?;
        sets.push(format!("stream.width={w}"));
        sets.push(format!("stream.height={h}"));
    }
    let lp = load_profile(&RunArgs {
        profile: b.profile.clone(),
        sets,
        ..Default::default()
    })?;
    let p = &lp.profile;
    let model = std::sync::Arc::new(sdcam::pipeline::load_model(&p.model)?);
    let report = sdcam::bench::run(
        model,
        p,
        &sdcam::bench::BenchOptions {
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

/// The longest `--status-interval` (a day).
const MAX_STATUS_INTERVAL: f64 = 86_400.0;

fn run(a: &RunArgs, control: Option<Control>) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.status_interval.is_finite() && (0.0..=MAX_STATUS_INTERVAL).contains(&a.status_interval),
        "--status-interval {} is out of range (0 to {MAX_STATUS_INTERVAL} seconds)",
        a.status_interval
    );
    let lp = load_profile(a)?;
    if lp.path.is_none() && a.source.is_none() {
        tracing::info!("no --profile: using the built-in defaults (test pattern source)");
    }
    let mut opts = RunOptions::new(lp);
    opts.max_frames = a.frames;
    opts.stdin_commands = !a.no_stdin;
    opts.control = control;
    opts.status = if a.status_interval > 0.0 {
        StatusMode::Auto {
            interval: std::time::Duration::from_secs_f64(a.status_interval),
        }
    } else {
        StatusMode::Off
    };
    app::run(opts)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A run catches its stop signals before anything else (logging, the profile, devices, the
    // model): a SIGTERM in the first milliseconds waits in the control channel and stops the
    // run cleanly instead of killing the process by the default action. Other commands keep
    // the default actions (Ctrl-C ends `sdcam bench` at once).
    let control = match &cli.command {
        Some(Cmd::Run(_)) | None => match Control::with_signals() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("sdcam: error: installing signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        },
        Some(_) => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match real_main(cli, control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdcam: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
