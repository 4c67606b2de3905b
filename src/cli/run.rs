//! `sdcam run`: turns the flags into a profile, builds the relay from it, streams until stopped,
//! and hands live control (stdin commands, signals) to the [`Session`] without restarting the
//! relay or dropping the output.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use crossbeam_channel::{never, select, tick};
use std::path::PathBuf;

use crate::config::every_frame;
use crate::control::session::{self, Session};
use crate::control::{self, Control};
use crate::profile::geometry;
use crate::profile::LoadedProfile;
use crate::relay::{DeviceOpener, Opener, Relay, RelayStart, Snapshot};
use crate::Result;

/// How the run reports its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMode {
    /// A one-line status refreshed every second when stderr is a terminal, else a log line
    /// every `interval`.
    Auto {
        interval: Duration,
    },
    Off,
}

/// Options of one run.
pub struct RunOptions {
    pub profile: LoadedProfile,
    /// Stop after writing this many frames.
    pub max_frames: Option<u64>,
    /// Read control commands from stdin (ignored when stdin carries the video).
    pub stdin_commands: bool,
    pub status: StatusMode,
    pub opener: Arc<dyn Opener>,
    /// The control channel, when the caller set it up first (`sdcam run` does, before loading
    /// the profile, so that a stop signal during start-up is not lost); `None` installs the
    /// signal handlers when the run starts.
    pub control: Option<Control>,
}

impl RunOptions {
    pub fn new(profile: LoadedProfile) -> Self {
        RunOptions {
            profile,
            max_frames: None,
            stdin_commands: true,
            status: StatusMode::Auto {
                interval: Duration::from_secs(5),
            },
            opener: Arc::new(DeviceOpener),
            control: None,
        }
    }
}

/// Runs the relay until the source ends, `max_frames` are written, or a stop is requested.
pub fn run(opts: RunOptions) -> Result<Snapshot> {
    // Signals first: a stop during start-up waits in the channel and ends the run cleanly.
    let control = match opts.control {
        Some(c) => c,
        None => Control::with_signals().context("installing signal handlers")?,
    };
    let lp = opts.profile;
    let p = &lp.profile;
    let every = every_frame(p);
    // The stages run the profile with its stream size resolved, once, here.
    let (running, stream_size) = geometry::running(p);
    tracing::info!("stream {stream_size}");
    if let Some(w) = geometry::unused_output_fit(p, &stream_size) {
        tracing::warn!("{w}");
    }
    // The output opens first, so a virtual camera starts streaming (placeholder frames) before
    // anything slow happens.
    let sink = opts
        .opener
        .sink(&crate::config::output_options(&p.output))
        .context("opening the output")?;
    tracing::info!("output: {}", sink.describe());
    let source = opts
        .opener
        .source(&crate::config::source_options(&p.source))
        .context("opening the source")?;
    tracing::info!("source: {}", source.describe());
    // The relay starts streaming (placeholder frames) before the transform is built, so a
    // virtual camera is up while a model loads.
    let mut relay = Relay::start(RelayStart {
        source,
        source_cfg: crate::config::source_options(&p.source),
        transform: None,
        sink,
        output_cfg: crate::config::output_options(&running.output),
        preprocess: crate::config::preprocess(&running),
        every_frame: every,
        max_frames: opts.max_frames,
        opener: opts.opener.clone(),
    })?;
    // A stop signal makes a wait for a slow stage (an apply) give up at once.
    relay.set_cancel(control.stop.clone());
    tracing::info!(
        "building the {:?} transform ({})",
        p.transform,
        if every { "every frame" } else { "real time" }
    );

    let Control {
        tx: events_tx,
        rx: mut events,
        stop,
    } = control;
    if opts.stdin_commands && !crate::config::reads_stdin(p) {
        control::spawn_stdin(events_tx.clone()).context("reading stdin")?;
    }
    drop(events_tx);

    // The status line shows only on a terminal, drawn with the logs by the one stderr writer.
    let status_line = (std::io::stderr().is_terminal()
        && matches!(opts.status, StatusMode::Auto { .. }))
    .then(crate::term::StatusLine::start);
    let ticker = tick(Duration::from_secs(1));
    let mut session = Session::new(relay, lp, session::default_builder());
    let mut failure = None;
    let mut prev = session.relay().stats().snapshot();
    let mut last_log = Instant::now();
    loop {
        select! {
            recv(events) -> ev => match ev {
                // Everything queued is handled as one batch: a stop in it preempts the rest.
                Ok(ev) => {
                    let batch = std::iter::once(ev).chain(events.try_iter()).collect();
                    if !session.handle_batch(batch, &stop) { break }
                },
                Err(_) => events = crossbeam_channel::never(),
            },
            recv(session.pending_build().unwrap_or(&never())) -> r => {
                let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("the loader thread died")));
                if let Err(e) = session.finish_build(r) {
                    failure = Some(e);
                    break;
                }
            },
            // The output stage ends last: after writing everything upstream produced (the
            // source ended), or when it failed or was told to stop.
            recv(session.relay().finished()) -> stage => match stage {
                Ok("output") | Err(_) => break,
                Ok(stage) => tracing::debug!("{stage} stage finished"),
            },
            recv(ticker) -> _ => {
                if let StatusMode::Auto { interval } = opts.status {
                    let now = session.relay().stats().snapshot();
                    if let Some(line) = &status_line {
                        line.set(now.status_line(Some(&prev)));
                        prev = now;
                    } else if last_log.elapsed() >= interval {
                        tracing::info!("status: {}", now.status_line(Some(&prev)));
                        prev = now;
                        last_log = Instant::now();
                    }
                }
            },
        }
    }
    // The last status stays on screen; the logs that follow go below it.
    drop(status_line);
    tracing::info!("stopping: draining queues");
    let relay = session.into_relay();
    relay.request_stop();
    let snap = relay.join()?;
    if let Some(e) = failure {
        return Err(e);
    }
    tracing::info!(
        "done: {} frames written ({} repeated, {} placeholders), {} captured, {} dropped{}{}",
        snap.written,
        snap.repeated,
        snap.placeholders,
        snap.captured,
        snap.input_dropped + snap.output_dropped,
        match snap.source_errors {
            0 => String::new(),
            n => format!(", {n} unreadable"),
        },
        match snap.transform_errors {
            0 => String::new(),
            n => format!(", {n} failed transform calls"),
        },
    );
    Ok(snap)
}

/// The flags of `sdcam run` (also the flags without a command).
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Profile file (TOML). Without one, the built-in defaults are used.
    #[arg(short, long)]
    pub(crate) profile: Option<PathBuf>,
    /// Source: `pattern`, `camera[:NAME]`, `/dev/videoN`, `screen[:DISPLAY]`, a .y4m/.png/.jpg file, or `-` (Y4M on stdin).
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// Output: `loopback[:LABEL]`, `/dev/videoN`, a .y4m file, `-` (Y4M on stdout), `png:DIR`, or `null`.
    #[arg(short, long)]
    pub(crate) output: Option<String>,
    /// Prompt (overrides the profile's).
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// Transform: `diffusion` (the StreamDiffusion pipeline), or `tint`, `posterize`, `identity`.
    #[arg(long)]
    pub(crate) transform: Option<String>,
    /// Stop after writing N frames.
    #[arg(long, value_name = "N")]
    pub(crate) frames: Option<u64>,
    /// Frame rate of the source and the output.
    #[arg(long)]
    pub(crate) fps: Option<f64>,
    /// Any profile key, e.g. `--set stream.guidance_scale=1.5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) sets: Vec<String>,
    /// Do not read control commands from stdin.
    #[arg(long)]
    pub(crate) no_stdin: bool,
    /// Seconds between status log lines when stderr is not a terminal (0 = none).
    #[arg(long, default_value_t = 5.0)]
    pub(crate) status_interval: f64,
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

/// The profile a run uses: the file (or the defaults) with the flags applied as overrides.
///
/// # Errors
/// An unreadable or invalid profile, or a bad `--set`.
pub fn load_profile(a: &RunArgs) -> anyhow::Result<LoadedProfile> {
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
        edits.push((k.trim().to_string(), crate::profile::parse_value(v)));
    }
    if !edits.is_empty() {
        lp = lp.with_overrides(&edits)?;
    }
    Ok(lp)
}

/// The longest `--status-interval` (a day).
const MAX_STATUS_INTERVAL: f64 = 86_400.0;

/// `sdcam run`: checks the flags, loads the profile and streams until stopped.
///
/// # Errors
/// A bad flag or profile, or what [`run`] fails with.
pub fn run_command(a: &RunArgs, control: Option<Control>) -> anyhow::Result<()> {
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
    run(opts)?;
    Ok(())
}
