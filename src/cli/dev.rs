//! `sdcam dev`: developer tools that are not for streaming (hidden from `--help`).
//!
//! `watch-clients` is the real-kernel check of the on-demand camera's viewer detection
//! ([`crate::v4l2::clients`]) and state machine ([`crate::relay::demand`]): the VM test runs it
//! while readers and probes come and go and reads its lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;

use crate::cli::{parse_size, print_out};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::model::random_hub;
use crate::relay::demand::{Action, Demand, Input};
use crate::sink::loopback::LoopbackSink;
use crate::sink::{LoopbackFormat, LoopbackOptions, Sink};
use crate::v4l2::clients::{self, ClientWatcher, Observation};

/// The developer commands.
#[derive(Subcommand, Debug)]
pub enum DevCmd {
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
        #[arg(long, default_value_t = random_hub::DEFAULT_SEED)]
        seed: u64,
        /// Replace an existing cache entry of the same repository.
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a moving test pattern to a v4l2loopback device and print one line per change of
    /// its readers (`readers=N openers=M source=event|fallback mappers=K`) and per on-demand
    /// transition (`demand=live|idle`), with the module version and detection path first.
    WatchClients {
        /// The loopback device to write (`/dev/video10`).
        #[arg(long)]
        device: PathBuf,
        /// Frame size, WxH.
        #[arg(long, default_value = "320x180")]
        size: String,
        /// Frames per second written.
        #[arg(long, default_value_t = 10.0)]
        fps: f64,
        /// Stop after this many seconds (default: until killed).
        #[arg(long)]
        seconds: Option<f64>,
    },
}

/// Runs a developer command.
///
/// # Errors
/// What the command fails with (an unknown repository, a write error).
pub fn run(cmd: DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::WriteRandomHub {
            cache,
            repos,
            seed,
            overwrite,
        } => write_random_hub(&cache, &repos, seed, overwrite),
        DevCmd::WatchClients {
            device,
            size,
            fps,
            seconds,
        } => watch_clients(&device, &size, fps, seconds),
    }
}

/// A YUYV frame with a bright vertical bar at column `x` on grey (so readers see motion).
fn pattern(width: u32, height: u32, x: u32) -> anyhow::Result<Frame> {
    let (w, h) = (width as usize, height as usize);
    let mut data = vec![0u8; w * h * 2];
    for row in data.chunks_exact_mut(w * 2) {
        for (i, px) in row.chunks_exact_mut(2).enumerate() {
            let bar = (i as u32).abs_diff(x) < width.max(16) / 16;
            px[0] = if bar { 235 } else { 96 };
            px[1] = 128;
        }
    }
    Frame::new(width, height, PixelFormat::Yuyv, ColorRange::Limited, data)
}

fn print_observation(o: &Observation) -> anyhow::Result<()> {
    print_out(&format!(
        "readers={} openers={} source={} mappers={}",
        o.readers(),
        o.openers,
        o.source(),
        o.mappers
    ))
}

/// `sdcam dev watch-clients`: the writer loop with a [`ClientWatcher`] and a [`Demand`].
fn watch_clients(device: &Path, size: &str, fps: f64, seconds: Option<f64>) -> anyhow::Result<()> {
    let (width, height) = parse_size(size)?;
    anyhow::ensure!(fps > 0.0 && fps.is_finite(), "--fps must be positive");
    let mut sink = LoopbackSink::open(&LoopbackOptions {
        device: Some(device.to_path_buf()),
        label: None,
        format: LoopbackFormat::Yuyv,
        width,
        height,
        fps,
    })?;
    let (width, height) = sink.size();
    let mut frame = pattern(width, height, 0)?;
    // The first frame makes the device a capture device for readers (exclusive_caps=1).
    sink.write(&frame).map_err(anyhow::Error::from)?;
    let fd = sink.writer_fd().context("the loopback sink is closed")?;
    let mut watcher = ClientWatcher::new(device, fd)?;
    print_out(&format!(
        "module={} event={} node={}",
        clients::module_version().unwrap_or_else(|| "unknown (0.12.x or older)".into()),
        watcher
            .event_id()
            .map_or_else(|| "none".to_string(), |id| format!("{id:#x}")),
        watcher.node().display()
    ))?;
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / fps);
    let mut demand = Demand::new(start);
    let mut last = watcher.recheck();
    demand.step(start, Input::Rechecked(last));
    print_observation(&last)?;
    let mut next_frame = start + period;
    let mut n: u32 = 0;
    loop {
        let now = Instant::now();
        if seconds.is_some_and(|s| now.duration_since(start).as_secs_f64() >= s) {
            return Ok(());
        }
        if now >= next_frame {
            n = n.wrapping_add(1);
            frame = pattern(width, height, (n * 8) % width)?;
            sink.write(&frame).map_err(anyhow::Error::from)?;
            next_frame += period;
            if next_frame < now {
                next_frame = now + period;
            }
        }
        let (obs, action) = if demand.recheck_due(now) {
            let o = watcher.recheck();
            (o, demand.step(Instant::now(), Input::Rechecked(o)))
        } else {
            let until = demand.next_deadline(now).min(next_frame);
            let o = watcher.observe(until.saturating_duration_since(now))?;
            (o, demand.step(Instant::now(), Input::Observed(o)))
        };
        if obs != last {
            print_observation(&obs)?;
            last = obs;
        }
        match action {
            Some(Action::Wake) => print_out("demand=live")?,
            Some(Action::Sleep) => print_out("demand=idle")?,
            None => {}
        }
    }
}

fn write_random_hub(
    cache: &Path,
    repos: &[String],
    seed: u64,
    overwrite: bool,
) -> anyhow::Result<()> {
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
