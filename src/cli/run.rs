//! `sdcam run`: turns the flags into a profile, builds the relay from it, streams until stopped,
//! and hands live control (stdin commands, signals) to the [`Session`] without restarting the
//! relay or dropping the output.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use crossbeam_channel::{bounded, never, select, tick, Receiver};
use std::path::PathBuf;

use crate::control::{self, Command, Control, Event, Work};
use crate::profile::geometry::{self, StreamSize};
use crate::profile::{
    LoadedProfile, ModelConfig, OutputKind, Pacing, Profile, SourceKind, TransformKind,
};
use crate::relay::{DeviceOpener, Opener, PreprocessConfig, Relay, RelayStart, Snapshot};
use crate::transform::{self, Transform};
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

/// Whether a profile runs in every-frame (offline) mode rather than real time.
///
/// `pacing = "auto"`: a file sink (Y4M or PNG files, the null sink) gets every frame
/// transformed, whatever the source (a live source still delivers at its own rate; a file is
/// read as fast as the transform goes); stdout does when the source is a file (a conversion
/// through a pipe) and is paced otherwise (a player); the virtual camera is always paced.
pub fn every_frame(p: &Profile) -> bool {
    match p.output.pacing {
        Pacing::Realtime => false,
        Pacing::EveryFrame => true,
        Pacing::Auto => match p.output.kind {
            OutputKind::V4l2loopback => false,
            OutputKind::Y4m if p.output.path == "-" => p.source.kind == SourceKind::File,
            OutputKind::Y4m | OutputKind::Png | OutputKind::Null => true,
        },
    }
}

fn reads_stdin(p: &Profile) -> bool {
    p.source.kind == SourceKind::File && p.source.path.as_deref() == Some("-")
}

/// A transform being built on a background thread (a model load can take minutes); the relay
/// keeps streaming the current transform's output meanwhile.
struct PendingBuild {
    rx: Receiver<Result<Box<dyn Transform>>>,
    /// What to restore in the session's profile if the build fails.
    old_transform: TransformKind,
    old_model: ModelConfig,
    /// The first build of the run: failing it ends the run.
    initial: bool,
    /// The change that started it (`set model.lora`), logged as applied once installed.
    what: String,
}

fn spawn_build(p: &Profile) -> Receiver<Result<Box<dyn Transform>>> {
    let (tx, rx) = bounded(1);
    let p = p.clone();
    let spawned = std::thread::Builder::new()
        .name("sdcam-load".into())
        .spawn(move || {
            let _ = tx.send(transform::build(&p));
        });
    if let Err(e) = spawned {
        let (tx, rx2) = bounded(1);
        let _ = tx.send(Err(anyhow::anyhow!("cannot start the loader thread: {e}")));
        return rx2;
    }
    rx
}

struct Session {
    relay: Relay,
    /// The profile as written (stream sizes may be `"auto"`).
    current: LoadedProfile,
    /// What the stages run: `current` resolved by [`geometry::running`] (sizes in pixels).
    running: Profile,
    /// How the running stream size came about (for the log and `get`).
    stream_size: StreamSize,
    /// The pre-processing the capture stage has.
    pre: PreprocessConfig,
    playlist_pos: usize,
    pending: Option<PendingBuild>,
}

impl Session {
    /// Makes `run` the running profile, logging the stream size when it changes.
    fn set_running(&mut self, run: Profile, size: StreamSize) {
        if size != self.stream_size {
            tracing::info!("stream {size}");
        }
        self.running = run;
        self.stream_size = size;
    }

    /// Sends the running profile's pre-processing to the capture stage. A new size waits while
    /// a transform is loading (`loading`): the transform that runs meanwhile was prepared for
    /// the old one; [`Session::finish_build`] sends it once the new transform is in.
    fn sync_preprocess(&mut self, loading: bool) -> Result<()> {
        let pre = PreprocessConfig::from_profile(&self.running);
        if pre == self.pre
            || (loading && (pre.width, pre.height) != (self.pre.width, self.pre.height))
        {
            return Ok(());
        }
        self.relay.set_preprocess(pre)?;
        self.pre = pre;
        Ok(())
    }

    /// Applies a new profile stage by stage; a stage that fails keeps its old settings. The
    /// stages get the profile resolved ([`geometry::running`]): with an auto stream size, an
    /// output size change prepares the stream again at the output's new aspect ratio.
    fn apply(&mut self, mut next: LoadedProfile, what: &str) {
        let old = self.current.profile.clone();
        let old_run = self.running.clone();
        let old_size = self.stream_size.clone();
        let new = &mut next.profile;
        let mut failed = Vec::new();
        let (mut loading, mut deferred) = (false, false);
        if new.source != old.source {
            if let Err(e) = self.relay.set_source(new.source.clone()) {
                failed.push(format!("source kept: {e:#}"));
                new.source = old.source.clone();
            }
        }
        let rebuild = new.transform != old.transform || new.model != old.model;
        let (new_run, size) = geometry::running(new);
        self.set_running(new_run.clone(), size);
        if let Err(e) = self.sync_preprocess(rebuild || self.pending.is_some()) {
            failed.push(format!("pre-processing kept: {e:#}"));
        }
        if rebuild {
            // Built in the background; a newer change supersedes one still loading.
            tracing::info!(
                "{what}: building the {:?} transform in the background; the output keeps the \
                 current one until it is ready",
                new.transform
            );
            // A build that supersedes the first one is the first one: nothing runs yet to
            // fall back on, so its failure ends the run (else the relay would wait forever).
            let initial = self.pending.as_ref().is_some_and(|p| p.initial);
            if let Some(p) = self.pending.as_ref().filter(|p| !p.initial) {
                tracing::info!("{}: superseded by {what}", p.what);
            }
            let (old_transform, old_model) = match self.pending.take() {
                Some(p) if !p.initial => (p.old_transform, p.old_model),
                _ => (old.transform, old.model.clone()),
            };
            self.pending = Some(PendingBuild {
                rx: spawn_build(&new_run),
                old_transform,
                old_model,
                initial,
                what: what.to_string(),
            });
            loading = true;
        } else if self.pending.is_some() {
            // The transform that is loading picks these settings up when it is ready.
            deferred = true;
        } else if new_run.prompt != old_run.prompt
            || new_run.negative_prompt != old_run.negative_prompt
            || new_run.stream != old_run.stream
        {
            if let Err(e) = self.relay.apply_transform(&new_run) {
                failed.push(format!("transform settings kept: {e:#}"));
                new.prompt = old.prompt.clone();
                new.negative_prompt = old.negative_prompt.clone();
                new.stream = old.stream.clone();
                if new_run.stream.width != old_run.stream.width
                    || new_run.stream.height != old_run.stream.height
                {
                    // The new size may have come from the output's (auto stream size): the
                    // output stays with the stream it was sized for.
                    new.output = old.output.clone();
                }
            }
        }
        let run_now = geometry::running(new).0;
        if run_now.output != old_run.output {
            if every_frame(new) != every_frame(&old) {
                tracing::warn!("output.pacing changes take effect when sdcam is restarted");
            }
            if let Err(e) = self.relay.set_output(run_now.output.clone()) {
                failed.push(format!("output kept: {e:#}"));
                new.output = old.output.clone();
            }
        }
        // A stage that kept its settings may leave the stream sized for settings that did not
        // apply (an output that failed to open): bring the others back in line.
        let (final_run, size) = geometry::running(new);
        if final_run != self.running {
            let stream_changed = final_run.stream != self.running.stream;
            self.set_running(final_run, size);
            if let Err(e) = self.sync_preprocess(self.pending.is_some()) {
                failed.push(format!("pre-processing kept: {e:#}"));
            }
            if stream_changed && self.pending.is_none() {
                if let Err(e) = self.relay.apply_transform(&self.running) {
                    failed.push(format!("transform settings kept: {e:#}"));
                }
            }
        }
        if new.prompts != old.prompts {
            self.playlist_pos = 0;
        }
        if let Some(w) = geometry::unused_output_fit(new, &self.stream_size) {
            if geometry::unused_output_fit(&old, &old_size).is_none() {
                tracing::warn!("{w}");
            }
        }
        if loading {
            // Not applied yet: `finish_build` says so once the new transform is installed.
            tracing::info!("{what}: loading; applied when the new transform is ready");
        } else if deferred {
            tracing::info!("{what}: takes effect when the transform that is loading is ready");
        } else if failed.is_empty() {
            tracing::info!("{what}: applied");
        }
        if !failed.is_empty() {
            for f in &failed {
                tracing::error!("{what}: {f}");
            }
        }
        self.current = next;
    }

    /// A background build finished: install it (with the latest settings) or restore the
    /// profile's transform/model keys. Returns an error only for a failed initial build.
    fn finish_build(&mut self, r: Result<Box<dyn Transform>>) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        // Resolved again: the model's config may have just been downloaded (its native size).
        let (run, size) = geometry::running(&self.current.profile);
        let installed = r.and_then(|mut t| {
            // Settings changed while it loaded (prompt, stream keys, size) apply now.
            t.apply(&run)?;
            self.relay.replace_transform(t)
        });
        match installed {
            Ok(()) => {
                self.set_running(run, size);
                if let Err(e) = self.sync_preprocess(false) {
                    tracing::error!("pre-processing kept: {e:#}");
                }
                if !p.initial {
                    tracing::info!("{}: applied", p.what);
                }
                Ok(())
            }
            Err(e) if p.initial => Err(e.context("building the transform")),
            Err(e) => {
                tracing::error!(
                    "{}: transform kept (the new one failed to build): {e:#}",
                    p.what
                );
                self.current.profile.transform = p.old_transform;
                self.current.profile.model = p.old_model;
                let (run, size) = geometry::running(&self.current.profile);
                self.set_running(run, size);
                // The running transform gets what changed while the other one loaded.
                if let Err(e) = self.relay.apply_transform(&self.running) {
                    tracing::error!("transform settings kept: {e:#}");
                }
                if let Err(e) = self.sync_preprocess(false) {
                    tracing::error!("pre-processing kept: {e:#}");
                }
                Ok(())
            }
        }
    }

    /// Advances the prompt playlist by `n` positions and applies the prompt there once.
    fn next(&mut self, n: usize) -> Result<()> {
        let list = &self.current.profile.prompts;
        if list.is_empty() {
            anyhow::bail!("the profile has no `prompts` playlist");
        }
        self.playlist_pos = (self.playlist_pos + n % list.len()) % list.len();
        let p = list[self.playlist_pos].clone();
        let next = self
            .current
            .with_value("prompt", toml::Value::String(p.clone()), "<next>")
            .map_err(|e| anyhow::anyhow!("{e}; nothing changed"))?;
        self.apply(next, &format!("prompt {p:?}"));
        Ok(())
    }

    /// Does a batch of queued events ([`control::coalesce`]); returns false when the run should
    /// stop. A stop asked for meanwhile (a signal while a change was applied) preempts the
    /// rest of the batch.
    fn handle_batch(&mut self, batch: Vec<Event>, stop: &std::sync::atomic::AtomicBool) -> bool {
        for work in control::coalesce(batch) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            let go_on = match work {
                Work::Stop => false,
                Work::Next(n) => {
                    if let Err(e) = self.next(n) {
                        tracing::error!("{e:#}");
                    }
                    true
                }
                Work::Event(ev) => self.handle(ev),
            };
            if !go_on {
                return false;
            }
        }
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For `get`: what runs, where it differs from what is written (an auto stream size, the
    /// output fit it implies).
    fn running_note(&self, key: &str) -> String {
        match crate::profile::resolve_key(key).as_deref() {
            Ok("stream.width" | "stream.height") => format!(" (running: {})", self.stream_size),
            Ok("output.fit") if self.running.output.fit != self.current.profile.output.fit => {
                format!(
                    " (running: stretch, the stream has the output's aspect: {})",
                    self.stream_size
                )
            }
            _ => String::new(),
        }
    }

    /// Handles one event; returns false when the run should stop.
    fn handle(&mut self, ev: Event) -> bool {
        let cmd = match ev {
            Event::Command(c) => c,
            Event::Invalid(msg) => {
                tracing::error!("{msg}");
                return true;
            }
            Event::InputClosed => {
                tracing::debug!("stdin closed; signals still work");
                return true;
            }
            Event::Stop => return false,
        };
        let text = |s: &str| toml::Value::String(s.to_string());
        let edit = |r: Result<LoadedProfile, crate::profile::ProfileError>| {
            r.map_err(|e| anyhow::anyhow!("{e}; nothing changed"))
        };
        let result: Result<()> = match cmd {
            Command::Prompt(p) => edit(self.current.with_value("prompt", text(&p), "<prompt>"))
                .map(|n| {
                    self.apply(n, &format!("prompt {p:?}"));
                }),
            Command::Negative(p) => edit(self.current.with_value(
                "negative_prompt",
                text(&p),
                "<negative>",
            ))
            .map(|n| self.apply(n, &format!("negative prompt {p:?}"))),
            Command::Set { key, value } => edit(self.current.with_set(&key, &value))
                .map(|n| self.apply(n, &format!("set {key}"))),
            Command::Get(key) => self
                .current
                .get(&key)
                .map(|v| eprintln!("{v}{}", self.running_note(&key)))
                .map_err(|e| anyhow::anyhow!(e)),
            Command::Profile(path) => self
                .current
                .reload(Some(&path))
                .map(|n| self.apply(n, &format!("profile {}", path.display())))
                .map_err(|e| e.context("profile switch failed; the running settings stay")),
            Command::Reload => self
                .current
                .reload(None)
                .map(|n| self.apply(n, "reload"))
                .map_err(|e| e.context("reload failed; the running settings stay")),
            Command::Next => self.next(1),
            Command::Pause => {
                self.relay.set_paused(true);
                tracing::info!("paused: the output holds the current frame");
                Ok(())
            }
            Command::Resume => {
                self.relay.set_paused(false);
                tracing::info!("resumed");
                Ok(())
            }
            Command::Snapshot(path) => self
                .relay
                .snapshot(path)
                .map(|p| tracing::info!("snapshot written to {}", p.display())),
            Command::Stats => {
                eprintln!("{}", self.relay.stats().snapshot());
                Ok(())
            }
            Command::Help => {
                eprintln!("{}", control::HELP);
                Ok(())
            }
            Command::Quit => return false,
        };
        if let Err(e) = result {
            tracing::error!("{e:#}");
        }
        true
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
    let sink = opts.opener.sink(&p.output).context("opening the output")?;
    tracing::info!("output: {}", sink.describe());
    let source = opts
        .opener
        .source(&p.source)
        .context("opening the source")?;
    tracing::info!("source: {}", source.describe());
    // The relay starts streaming (placeholder frames) before the transform is built, so a
    // virtual camera is up while a model loads.
    let mut relay = Relay::start(RelayStart {
        source,
        source_cfg: p.source.clone(),
        transform: None,
        sink,
        output_cfg: running.output.clone(),
        preprocess: PreprocessConfig::from_profile(&running),
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
    let pending = PendingBuild {
        rx: spawn_build(&running),
        old_transform: p.transform,
        old_model: p.model.clone(),
        initial: true,
        what: "start".into(),
    };

    let Control {
        tx: events_tx,
        rx: mut events,
        stop,
    } = control;
    if opts.stdin_commands && !reads_stdin(p) {
        control::spawn_stdin(events_tx.clone()).context("reading stdin")?;
    }
    drop(events_tx);

    let tty = std::io::stderr().is_terminal();
    let ticker = tick(Duration::from_secs(1));
    let mut session = Session {
        pre: PreprocessConfig::from_profile(&running),
        relay,
        current: lp,
        running,
        stream_size,
        playlist_pos: 0,
        pending: Some(pending),
    };
    let mut failure = None;
    let mut prev = session.relay.stats().snapshot();
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
            recv(session.pending.as_ref().map_or(&never(), |p| &p.rx)) -> r => {
                let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("the loader thread died")));
                if let Err(e) = session.finish_build(r) {
                    failure = Some(e);
                    break;
                }
            },
            // The output stage ends last: after writing everything upstream produced (the
            // source ended), or when it failed or was told to stop.
            recv(session.relay.finished()) -> stage => match stage {
                Ok("output") | Err(_) => break,
                Ok(stage) => tracing::debug!("{stage} stage finished"),
            },
            recv(ticker) -> _ => {
                if let StatusMode::Auto { interval } = opts.status {
                    let now = session.relay.stats().snapshot();
                    if tty {
                        eprint!("\r\x1b[2K{}", now.status_line(Some(&prev)));
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
    if tty && matches!(opts.status, StatusMode::Auto { .. }) {
        eprintln!();
    }
    tracing::info!("stopping: draining queues");
    session.relay.request_stop();
    let snap = session.relay.join()?;
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
