//! The three-stage frame relay (paper appendix B.1): capture + pre-process → transform →
//! post-process + write, each on its own thread, joined by bounded queues.
//!
//! In real-time mode the transform always takes the newest frame (stale ones are dropped and
//! counted) and the output writes at its own steady rate, repeating the last frame when the
//! transform is late, so a virtual camera never stalls or goes black. In every-frame mode
//! (a file output) every captured frame is transformed and written exactly once, in order:
//! queues block instead of dropping, and the frames a transform still holds (Stream Batch
//! lag) are flushed at the end of the stream. Every captured frame ends up written or counted
//! (dropped, unreadable, failed); an output frame lost at a final flush is an error.
//!
//! Stages are reconfigured live through control messages; a reconfiguration that fails leaves
//! the stage running as it was. How a source or sink is treated (reconnected when lost, closed
//! before another is opened on its device, its final flush counted) is what it says about
//! itself ([`crate::stage::StageInfo`]), and what a failure means is its
//! [`crate::stage::StageError`].
//!
//! This file holds the control side (starting, reconfiguring, stopping and joining the
//! stages); each stage's thread is a module of its own: `capture.rs` (source + pre-process),
//! `transform_stage.rs` and `output.rs` (post-process + write), with the live replacement of a
//! source or sink shared in `replace.rs`, and the time the stages pace by in [`clock`].

mod capture;
pub mod clock;
pub mod demand;
mod on_demand;
mod output;
pub mod queue;
mod replace;
pub mod stats;
mod transform_stage;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::convert::{Fit, Postprocess, Preprocess};
use crate::frame::Frame;
use crate::sink::{self, Sink, SinkOptions};
use crate::source::{self, Source, SourceOptions, Wake};
use crate::transform::{Transform, TransformOptions};
use crate::Result;
use capture::Capture;
use clock::{Clock, SystemClock};
use output::Output;
pub use output::PLACEHOLDER_RGB;
pub use stats::{Snapshot, Stage, Stats};
use transform_stage::TransformStage;

/// How frames are fitted on the way into the transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessConfig {
    pub width: u32,
    pub height: u32,
    pub fit: Fit,
    pub mirror: bool,
}

/// What the output stage writes: the sink, and the size, rate and fit it converts frames to.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputOptions {
    /// The sink to open.
    pub sink: SinkOptions,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Frames per second written in real time.
    pub fps: f64,
    /// How the stream's picture is fitted to the output size.
    pub fit: Fit,
    /// Work only while someone reads the output (a v4l2loopback device); `None`: always.
    pub on_demand: Option<OnDemand>,
}

/// The on-demand virtual camera's settings (`output.on_demand`, see [`demand`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OnDemand {
    /// Frames per second of the hold frame while idle.
    pub idle_fps: f64,
    /// A still shown while idle instead of the last output dimmed.
    pub idle_image: Option<PathBuf>,
}

/// Opens sources and sinks from their options; replaceable in tests.
pub trait Opener: Send + Sync {
    /// Opens a source.
    ///
    /// # Errors
    /// As [`source::open`].
    fn source(&self, options: &SourceOptions) -> Result<Box<dyn Source>>;
    /// Opens the sink of an output.
    ///
    /// # Errors
    /// As [`sink::open`].
    fn sink(&self, options: &OutputOptions) -> Result<Box<dyn Sink>>;
}

/// The real devices and files.
#[derive(Debug, Default)]
pub struct DeviceOpener;

impl Opener for DeviceOpener {
    fn source(&self, options: &SourceOptions) -> Result<Box<dyn Source>> {
        source::open(options)
    }
    fn sink(&self, options: &OutputOptions) -> Result<Box<dyn Sink>> {
        sink::open(&options.sink)
    }
}

type Ack<T = ()> = Sender<Result<T>>;

enum CaptureMsg {
    Source(SourceOptions, Ack),
    Preprocess(PreprocessConfig),
}

enum TransformMsg {
    Apply(Box<TransformOptions>, Ack),
    Replace(Box<dyn Transform>, Ack),
}

enum OutputMsg {
    Output(OutputOptions, Ack),
    Snapshot(PathBuf, Ack<PathBuf>),
    Demand(demand::Command, Ack),
}

/// Everything the relay needs to start.
pub struct RelayStart {
    pub source: Box<dyn Source>,
    pub source_cfg: SourceOptions,
    /// `None` starts the relay before the transform exists (a model still loading): frames are
    /// consumed and the output shows the placeholder until [`Relay::replace_transform`].
    pub transform: Option<Box<dyn Transform>>,
    pub sink: Box<dyn Sink>,
    pub output_cfg: OutputOptions,
    pub preprocess: PreprocessConfig,
    /// Process every frame once instead of pacing in real time.
    pub every_frame: bool,
    /// Real time: stop after writing this many frames. Every frame: capture this many frames,
    /// then end the stream, so exactly this many transformed frames are written.
    pub max_frames: Option<u64>,
    pub opener: Arc<dyn Opener>,
}

/// A running relay.
pub struct Relay {
    stop: Arc<AtomicBool>,
    /// Interrupts the capture stage's wait for a frame (stop, source change).
    wake: Wake,
    /// Set from outside (a stop signal) to give up waiting for an acknowledgement.
    cancel: Option<Arc<AtomicBool>>,
    paused: Arc<AtomicBool>,
    stats: Arc<Stats>,
    capture_ctl: Sender<CaptureMsg>,
    transform_ctl: Sender<TransformMsg>,
    output_ctl: Sender<OutputMsg>,
    finished: Receiver<&'static str>,
    threads: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

/// How long to wait for a stage to acknowledge a reconfiguration.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest the output waits between looks at the stop flag, and its longest period while
/// draining after a stop.
const STOP_SLICE: Duration = Duration::from_millis(100);
/// How often a lost live source is reopened.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping transform stage waits for the capture stage to end.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// How often a wait for an acknowledgement looks at the stop flags.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Sends a request carrying an acknowledgement channel and waits for the stage's answer; gives
/// up within [`CANCEL_POLL`] once `cancelled` says so (a stop must not wait behind a slow stage).
fn ask<T>(
    send: impl FnOnce(Ack<T>) -> bool,
    what: &str,
    cancelled: impl Fn() -> bool,
) -> Result<T> {
    let (ack, done) = bounded(1);
    anyhow::ensure!(send(ack), "{what}: the relay has stopped");
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        match done.recv_timeout(CANCEL_POLL) {
            Ok(r) => return r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
                if Instant::now() < deadline && !cancelled() => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if cancelled() => {
                anyhow::bail!("{what}: interrupted by a stop")
            }
            Err(e) => {
                return Err(
                    anyhow::Error::from(e).context(format!("{what}: no answer from the relay"))
                )
            }
        }
    }
}

impl Relay {
    /// Starts the stages' threads, paced by the real clock.
    ///
    /// # Errors
    /// A thread that cannot be spawned.
    pub fn start(s: RelayStart) -> Result<Relay> {
        Self::start_with_clock(s, Arc::new(SystemClock))
    }

    /// [`Relay::start`] paced by `clock` (the output's write ticks, the reconnect interval):
    /// a [`clock::ManualClock`] makes a test independent of the machine's load.
    ///
    /// # Errors
    /// A thread that cannot be spawned.
    pub fn start_with_clock(s: RelayStart, clock: Arc<dyn Clock>) -> Result<Relay> {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (in_tx, in_rx) = queue::queue::<Frame>(2, s.every_frame);
        let (out_tx, out_rx) = queue::queue::<Frame>(2, s.every_frame);
        let (capture_ctl, capture_rx) = bounded(4);
        // On-demand signals (output → capture): one per state change, never blocking the output.
        let (demand_tx, demand_rx) = crossbeam_channel::unbounded();
        let restart = Arc::new(AtomicBool::new(false));
        let (transform_ctl, transform_rx) = bounded(4);
        let (output_ctl, output_rx) = bounded(4);
        let (finished_tx, finished) = bounded(3);
        let wake = Wake::new();
        let mut source = s.source;
        source.set_realtime(!s.every_frame);
        source.set_wake(wake.clone());

        let mut threads = Vec::new();
        let capture = Capture {
            source: Some(source),
            cfg: s.source_cfg,
            pre: s.preprocess,
            prep: Preprocess::default(),
            out: in_tx,
            ctl: capture_rx,
            stop: stop.clone(),
            stats: stats.clone(),
            opener: s.opener.clone(),
            every_frame: s.every_frame,
            limit: s.max_frames.filter(|_| s.every_frame),
            wake: wake.clone(),
            clock: clock.clone(),
            demand: demand_rx,
            idle: false,
            fallback: None,
        };
        let done = finished_tx.clone();
        threads.push((
            "capture",
            std::thread::Builder::new()
                .name("sdcam-capture".into())
                .spawn(move || {
                    let r = capture.run();
                    let _ = done.send("capture");
                    r
                })?,
        ));
        let tstage = TransformStage {
            skipped_seen: s.transform.as_ref().map_or(0, |t| t.skipped()),
            discarded_seen: s.transform.as_ref().map_or(0, |t| t.discarded()),
            transform: s.transform.map(|mut t| {
                t.set_every_frame(s.every_frame);
                t
            }),
            stop: stop.clone(),
            input: in_rx,
            out: out_tx,
            ctl: transform_rx,
            paused: paused.clone(),
            restart: restart.clone(),
            stats: stats.clone(),
            every_frame: s.every_frame,
        };
        let done = finished_tx.clone();
        threads.push((
            "transform",
            std::thread::Builder::new()
                .name("sdcam-transform".into())
                .spawn(move || {
                    let r = tstage.run();
                    let _ = done.send("transform");
                    r
                })?,
        ));
        // Real time only: an every-frame conversion writes each frame whoever watches.
        let on_demand = (!s.every_frame).then(|| {
            on_demand::OnDemandRun::new(
                s.output_cfg.on_demand.clone(),
                clock.now(),
                demand_tx,
                wake.clone(),
                restart,
                stats.clone(),
            )
        });
        let output = Output {
            on_demand,
            hold: None,
            woke_at: None,
            sink: Some(s.sink),
            cfg: s.output_cfg,
            post: Postprocess::default(),
            input: out_rx,
            ctl: output_rx,
            stop: stop.clone(),
            stats: stats.clone(),
            opener: s.opener,
            every_frame: s.every_frame,
            max_frames: s.max_frames,
            clock,
            last: None,
            placeholder: None,
            snapshots: Vec::new(),
            lost: None,
        };
        let done = finished_tx;
        threads.push((
            "output",
            std::thread::Builder::new()
                .name("sdcam-output".into())
                .spawn(move || {
                    let r = output.run();
                    let _ = done.send("output");
                    r
                })?,
        ));
        Ok(Relay {
            stop,
            wake,
            cancel: None,
            paused,
            stats,
            capture_ctl,
            transform_ctl,
            output_ctl,
            finished,
            threads,
        })
    }

    /// A flag that, once set (by a stop signal), makes every wait for a stage's acknowledgement
    /// give up at once, so a stop is not held behind a slow reconfiguration.
    pub fn set_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    /// Waits for a stage's answer unless the relay stops or the cancel flag is set.
    fn ask<T>(&self, send: impl FnOnce(Ack<T>) -> bool, what: &str) -> Result<T> {
        ask(send, what, || {
            self.stop.load(Relaxed) || self.cancel.as_ref().is_some_and(|c| c.load(Relaxed))
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Pauses the transform: the output keeps showing the last frame.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Relaxed)
    }

    /// Switches to another source; on failure the current one keeps running.
    pub fn set_source(&self, cfg: SourceOptions) -> Result<()> {
        self.ask(
            |a| {
                let sent = self.capture_ctl.send(CaptureMsg::Source(cfg, a)).is_ok();
                // The capture stage may be waiting a whole source period for a frame.
                self.wake.wake();
                sent
            },
            "switching source",
        )
    }

    pub fn set_preprocess(&self, cfg: PreprocessConfig) -> Result<()> {
        self.capture_ctl
            .send(CaptureMsg::Preprocess(cfg))
            .ok()
            .context("the relay has stopped")
    }

    /// Passes changed settings to the running transform; on failure it keeps its old settings.
    pub fn apply_transform(&self, options: &TransformOptions) -> Result<()> {
        let p = Box::new(options.clone());
        self.ask(
            |a| self.transform_ctl.send(TransformMsg::Apply(p, a)).is_ok(),
            "updating the transform",
        )
    }

    /// Replaces the transform (e.g. another kind or model); the output keeps streaming meanwhile.
    pub fn replace_transform(&self, t: Box<dyn Transform>) -> Result<()> {
        self.ask(
            |a| self.transform_ctl.send(TransformMsg::Replace(t, a)).is_ok(),
            "replacing the transform",
        )
    }

    /// Switches the output (size, rate, device); on failure the old output is restored.
    pub fn set_output(&self, cfg: OutputOptions) -> Result<()> {
        self.ask(
            |a| self.output_ctl.send(OutputMsg::Output(cfg, a)).is_ok(),
            "switching output",
        )
    }

    /// Forces the on-demand state (`wake`, `sleep`) or returns to following the readers
    /// (`auto`).
    ///
    /// # Errors
    /// On-demand is not active on this output, or the relay has stopped.
    pub fn demand(&self, c: demand::Command) -> Result<()> {
        self.ask(
            |a| self.output_ctl.send(OutputMsg::Demand(c, a)).is_ok(),
            "on-demand command",
        )
    }

    /// Saves the next written frame as PNG; returns the path once written.
    pub fn snapshot(&self, path: PathBuf) -> Result<PathBuf> {
        self.ask(
            |a| self.output_ctl.send(OutputMsg::Snapshot(path, a)).is_ok(),
            "snapshot",
        )
    }

    /// Asks all stages to stop; queued frames are still drained to the sink.
    pub fn request_stop(&self) {
        self.stop.store(true, Relaxed);
        self.wake.wake();
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// A receiver that gets the stage's name whenever a stage thread ends (for `select!`).
    /// The output stage ends last (after writing everything upstream produced) unless a
    /// stage failed.
    pub fn finished(&self) -> &Receiver<&'static str> {
        &self.finished
    }

    /// Waits for all stages to finish; returns the first stage error.
    pub fn join(self) -> Result<Snapshot> {
        let Relay {
            threads,
            stats,
            stop,
            capture_ctl,
            transform_ctl,
            output_ctl,
            ..
        } = self;
        // Closing the control channels lets stages that wait on them (a transform still
        // loading) see the end.
        drop((capture_ctl, transform_ctl, output_ctl));
        let mut first_err = None;
        for (name, t) in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop.store(true, Relaxed);
                    if first_err.is_none() {
                        first_err = Some(e.context(format!("{name} stage failed")));
                    }
                }
                Err(_) => {
                    if first_err.is_none() {
                        first_err = Some(anyhow::anyhow!("{name} stage panicked"));
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats.snapshot()),
        }
    }
}
