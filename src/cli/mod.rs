//! The `sdcam` command line: the clap definitions and one dispatcher; each command lives in a
//! module of its own (`run`, `bench`, `bench_unet`, `bench_taesd`, `bench_relay`, `dev`; the logging set-up is
//! in [`crate::term`]), and `main.rs` only
//! parses and calls [`main`].

pub mod bench;
pub mod bench_relay;
pub mod bench_taesd;
pub mod bench_unet;
pub mod dev;
pub mod devices;
pub mod run;
mod timing;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::control::Control;
use crate::profile::{self, LoadedProfile};

/// The parsed command line.
#[derive(Parser, Debug)]
#[command(
    name = "sdcam",
    version,
    about = "A real-time, Stable-Diffusion-transformed virtual camera",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream: source → transform → output (the default when no command is given).
    Run(run::RunArgs),
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
    BenchRelay(bench_relay::BenchRelayArgs),
    /// Time the full-size U-Net (random weights, CPU, f32 or bf16) at given latent sizes.
    BenchUnet(bench_unet::BenchUnetArgs),
    /// Time TAESD encode and decode (random weights, CPU, f32 or bf16) at given image sizes.
    BenchTaesd(bench_taesd::BenchTaesdArgs),
    /// Time the StreamDiffusion pipeline by stage, and the paper's comparisons (Stream Batch vs
    /// sequential, R-CFG types) side by side, on generated frames.
    Bench(bench::PipelineBenchArgs),
    /// Developer tools (not for streaming).
    #[command(subcommand, hide = true)]
    Dev(dev::DevCmd),
}

/// Prints a command's report on stdout; a reader that went away (`| head`) is not an error.
///
/// # Errors
/// Any write error other than a broken pipe.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Parses a size written `WxH` (pixels).
///
/// # Errors
/// Without an `x`, or when either side is not a non-negative integer.
pub fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .with_context(|| format!("{s:?}: expected WxH"))?;
    Ok((w.parse()?, h.parse()?))
}

/// The median of `v` (sorted in place; the mean of the two middle values for an even count,
/// 0 when empty): the one median of every bench.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `sdcam check-profile`: every file's problems on stderr; fails when any file has some.
fn check_profiles(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut bad = 0;
    for f in files {
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

/// `sdcam keys`: every settable key with its default.
fn keys() -> anyhow::Result<()> {
    let lp = LoadedProfile::default();
    let lines: Vec<String> = profile::known_keys()
        .iter()
        .map(|k| lp.get(k).unwrap_or_else(|e| e))
        .collect();
    print_out(&lines.join("\n"))
}

fn dispatch(cli: Cli, control: Option<Control>) -> anyhow::Result<()> {
    match cli.command {
        Some(Cmd::Devices) => print_out(devices::report().trim_end()),
        Some(Cmd::CheckProfile { files }) => check_profiles(&files),
        Some(Cmd::Keys) => keys(),
        Some(Cmd::BenchRelay(b)) => bench_relay::run(&b),
        Some(Cmd::Bench(b)) => bench::run_command(&b),
        Some(Cmd::BenchUnet(b)) => bench_unet::run(&b),
        Some(Cmd::BenchTaesd(b)) => bench_taesd::run(&b),
        Some(Cmd::Run(a)) => run::run_command(&a, control),
        Some(Cmd::Dev(d)) => dev::run(d),
        None => run::run_command(&cli.run, control),
    }
}

/// Runs the parsed command line: stop signals first for a run, then logging, then the command.
/// Errors are printed as `sdcam: error: …` and give a failing exit status.
pub fn main(cli: Cli) -> ExitCode {
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
    crate::term::init_logging();
    match dispatch(cli, control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdcam: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
