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
//! the stage running as it was.

pub mod queue;
pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::convert::{Fit, Postprocess, Preprocess};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::profile::{OutputConfig, Profile, SourceConfig};
use crate::sink::{self, Sink};
use crate::source::{self, Captured, Source, Wake};
use crate::transform::{Transform, TransformOptions};
use crate::Result;
use queue::{Consumer, Producer, Pushed, Taken};
pub use stats::{Snapshot, Stage, Stats};

/// How frames are fitted on the way into the transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessConfig {
    pub width: u32,
    pub height: u32,
    pub fit: Fit,
    pub mirror: bool,
}

impl PreprocessConfig {
    /// The stream size ([`crate::profile::geometry::resolve`]), `source.fit` and the mirror.
    pub fn from_profile(p: &Profile) -> Self {
        let size = crate::profile::geometry::resolve(p);
        PreprocessConfig {
            width: size.width,
            height: size.height,
            fit: p.source.fit,
            mirror: p.source.mirror,
        }
    }
}

/// Opens sources and sinks from their profile sections; replaceable in tests.
pub trait Opener: Send + Sync {
    fn source(&self, cfg: &SourceConfig) -> Result<Box<dyn Source>>;
    fn sink(&self, cfg: &OutputConfig) -> Result<Box<dyn Sink>>;
}

/// The real devices and files.
#[derive(Debug, Default)]
pub struct DeviceOpener;

impl Opener for DeviceOpener {
    fn source(&self, cfg: &SourceConfig) -> Result<Box<dyn Source>> {
        source::open(cfg)
    }
    fn sink(&self, cfg: &OutputConfig) -> Result<Box<dyn Sink>> {
        sink::open(cfg)
    }
}

type Ack<T = ()> = Sender<Result<T>>;

enum CaptureMsg {
    Source(SourceConfig, Ack),
    Preprocess(PreprocessConfig),
}

enum TransformMsg {
    Apply(Box<TransformOptions>, Ack),
    Replace(Box<dyn Transform>, Ack),
}

enum OutputMsg {
    Output(OutputConfig, Ack),
    Snapshot(PathBuf, Ack<PathBuf>),
}

/// Everything the relay needs to start.
pub struct RelayStart {
    pub source: Box<dyn Source>,
    pub source_cfg: SourceConfig,
    /// `None` starts the relay before the transform exists (a model still loading): frames are
    /// consumed and the output shows the placeholder until [`Relay::replace_transform`].
    pub transform: Option<Box<dyn Transform>>,
    pub sink: Box<dyn Sink>,
    pub output_cfg: OutputConfig,
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
    pub fn start(s: RelayStart) -> Result<Relay> {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (in_tx, in_rx) = queue::queue::<Frame>(2, s.every_frame);
        let (out_tx, out_rx) = queue::queue::<Frame>(2, s.every_frame);
        let (capture_ctl, capture_rx) = bounded(4);
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
        let output = Output {
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
    pub fn set_source(&self, cfg: SourceConfig) -> Result<()> {
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
    pub fn set_output(&self, cfg: OutputConfig) -> Result<()> {
        self.ask(
            |a| self.output_ctl.send(OutputMsg::Output(cfg, a)).is_ok(),
            "switching output",
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

/// Capture + pre-process stage.
struct Capture {
    source: Option<Box<dyn Source>>,
    cfg: SourceConfig,
    pre: PreprocessConfig,
    prep: Preprocess,
    out: Producer<Frame>,
    ctl: Receiver<CaptureMsg>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    opener: Arc<dyn Opener>,
    every_frame: bool,
    /// Every-frame mode: end the stream after this many frames.
    limit: Option<u64>,
    wake: Wake,
}

impl Capture {
    fn open(&self, cfg: &SourceConfig) -> Result<Box<dyn Source>> {
        let mut s = self.opener.source(cfg)?;
        s.set_realtime(!self.every_frame);
        s.set_wake(self.wake.clone());
        Ok(s)
    }

    fn switch(&mut self, cfg: SourceConfig) -> Result<()> {
        use crate::profile::SourceKind::Camera;
        // Open the new source while the old one still runs, so a failure changes nothing. A
        // camera cannot be opened twice, so camera → camera may need the old one released
        // first; it is reopened (or reconnected in the background) if the new one fails.
        let new = match self.open(&cfg) {
            Ok(s) => s,
            Err(first) if cfg.kind == Camera && self.cfg.kind == Camera => {
                self.source = None;
                match self.open(&cfg) {
                    Ok(s) => s,
                    Err(second) => {
                        // The first try failed only because the old camera was still open; the
                        // second one, with the camera free, has the real reason.
                        tracing::debug!("opening the new camera beside the old one: {first:#}");
                        self.source = self.open(&self.cfg).ok();
                        return Err(second);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        tracing::info!("source: {}", new.describe());
        self.source = Some(new);
        self.cfg = cfg;
        Ok(())
    }

    fn handle(&mut self, msg: CaptureMsg) {
        match msg {
            CaptureMsg::Source(cfg, ack) => {
                let r = self.switch(cfg);
                let _ = ack.send(r);
            }
            CaptureMsg::Preprocess(p) => self.pre = p,
        }
    }

    fn run(mut self) -> Result<()> {
        let mut last_retry = Instant::now();
        let mut taken = 0u64;
        while !self.stop.load(Relaxed) {
            if self.limit.is_some_and(|n| taken >= n) {
                tracing::info!("captured {taken} frames (--frames), ending the stream");
                break;
            }
            while let Ok(msg) = self.ctl.try_recv() {
                self.handle(msg);
            }
            let Some(source) = self.source.as_mut() else {
                // Lost live source: keep trying to reopen it; the output keeps streaming.
                if last_retry.elapsed() >= RECONNECT_EVERY {
                    last_retry = Instant::now();
                    match self.open(&self.cfg) {
                        Ok(s) => {
                            tracing::info!("source reconnected: {}", s.describe());
                            self.source = Some(s);
                        }
                        Err(e) => tracing::debug!("source still unavailable: {e:#}"),
                    }
                }
                if let Ok(msg) = self.ctl.recv_timeout(Duration::from_millis(100)) {
                    self.handle(msg);
                }
                continue;
            };
            let frame = match source.next_frame() {
                Ok(Captured::Frame(f)) => f,
                // Woken (stop, source change): look at the flag and the messages again.
                Ok(Captured::Interrupted) => continue,
                Ok(Captured::End) => {
                    tracing::info!("source ended: {}", source.describe());
                    break;
                }
                Err(e) if source.is_live() => {
                    self.stats.source_errors.fetch_add(1, Relaxed);
                    tracing::warn!("source failed, reconnecting every second: {e:#}");
                    self.source = None;
                    last_retry = Instant::now();
                    continue;
                }
                Err(e) => return Err(e.context("reading the source")),
            };
            self.stats.captured.fetch_add(1, Relaxed);
            let t0 = Instant::now();
            let p = self.pre;
            let rgb = match self.prep.run(&frame, p.width, p.height, p.fit, p.mirror) {
                Ok(f) => f,
                Err(e) => {
                    self.stats.source_errors.fetch_add(1, Relaxed);
                    tracing::warn!("dropping an unreadable frame: {e:#}");
                    continue;
                }
            };
            self.stats.time(Stage::Preprocess, t0.elapsed());
            match self.out.push(rgb) {
                Pushed::Ok { dropped } => {
                    self.stats.input_dropped.fetch_add(dropped, Relaxed);
                    taken += 1;
                }
                Pushed::Closed => {
                    // Downstream is gone (output finished or failed): this frame is lost.
                    self.stats.input_dropped.fetch_add(1, Relaxed);
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The transform stage.
struct TransformStage {
    transform: Option<Box<dyn Transform>>,
    stop: Arc<AtomicBool>,
    input: Consumer<Frame>,
    out: Producer<Frame>,
    ctl: Receiver<TransformMsg>,
    paused: Arc<AtomicBool>,
    stats: Arc<Stats>,
    every_frame: bool,
    /// The transform's skip count already added to the stats.
    skipped_seen: u64,
    /// The transform's discarded-frame count already added to the stats.
    discarded_seen: u64,
}

/// Whether the transform stage goes on after passing frames downstream.
enum Flow {
    Continue,
    /// The output stage is gone.
    Closed,
}

impl TransformStage {
    fn handle(&mut self, msg: TransformMsg) -> Flow {
        match msg {
            TransformMsg::Apply(p, ack) => {
                let r = match self.transform.as_mut() {
                    Some(t) => t.apply(&p),
                    None => Err(anyhow::anyhow!("the transform is still loading")),
                };
                self.count();
                let _ = ack.send(r);
                Flow::Continue
            }
            TransformMsg::Replace(mut t, ack) => {
                tracing::info!("transform: {}", t.name());
                t.set_every_frame(self.every_frame);
                let mut outs = Vec::new();
                if let Some(mut old) = self.transform.take() {
                    if self.every_frame {
                        // The frames the old transform holds are finished by it.
                        if let Err(e) = old.flush(&mut outs) {
                            tracing::error!("finishing the old transform's frames: {e:#}");
                            self.stats.output_dropped.fetch_add(old.held(), Relaxed);
                        }
                    } else {
                        self.stats.output_dropped.fetch_add(old.held(), Relaxed);
                    }
                    self.transform = Some(old);
                    self.count();
                }
                self.skipped_seen = t.skipped();
                self.discarded_seen = t.discarded();
                self.transform = Some(t);
                let _ = ack.send(Ok(()));
                self.send(outs)
            }
        }
    }

    /// Adds the transform's new skips and discarded frames to the stats.
    fn count(&mut self) {
        let Some(t) = self.transform.as_ref() else {
            return;
        };
        let (skipped, discarded) = (t.skipped(), t.discarded());
        self.stats
            .model_skipped
            .fetch_add(skipped.saturating_sub(self.skipped_seen), Relaxed);
        self.stats
            .output_dropped
            .fetch_add(discarded.saturating_sub(self.discarded_seen), Relaxed);
        self.skipped_seen = skipped;
        self.discarded_seen = discarded;
    }

    /// Passes outputs downstream; counts what cannot be delivered.
    fn send(&mut self, outs: Vec<Frame>) -> Flow {
        let mut outs = outs.into_iter();
        while let Some(out) = outs.next() {
            match self.out.push(out) {
                Pushed::Ok { dropped } => {
                    self.stats.output_dropped.fetch_add(dropped, Relaxed);
                }
                Pushed::Closed => {
                    let lost = 1 + outs.len() as u64;
                    self.stats.output_dropped.fetch_add(lost, Relaxed);
                    return Flow::Closed;
                }
            }
        }
        Flow::Continue
    }

    /// A stop that does not transform what is queued: counts every frame still queued, and
    /// any the capture stage pushes before it sees the stop, as dropped, until the capture
    /// stage has ended (so none is lost uncounted), or for at most [`DRAIN_WAIT`].
    fn drop_queued(&mut self) {
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.input.take_next(left.min(Duration::from_millis(50))) {
                Taken::Item { skipped, .. } => {
                    self.stats.input_dropped.fetch_add(skipped + 1, Relaxed);
                }
                Taken::Closed => return,
                Taken::Empty if left.is_zero() => return,
                Taken::Empty => {}
            }
        }
    }

    /// The end of the input (the source ended or a stop was requested): every frame mode
    /// finishes the frames the transform holds; real time counts them as dropped.
    fn finish(&mut self) -> Flow {
        let Some(t) = self.transform.as_mut() else {
            return Flow::Continue;
        };
        if !self.every_frame {
            self.stats.output_dropped.fetch_add(t.held(), Relaxed);
            return Flow::Continue;
        }
        let t0 = Instant::now();
        let mut outs = Vec::new();
        if let Err(e) = t.flush(&mut outs) {
            self.stats.transform_errors.fetch_add(1, Relaxed);
            tracing::error!("finishing the last frames failed: {e:#}");
        }
        let held = t.held();
        if held > 0 {
            tracing::error!("{held} frames could not be finished (counted as dropped)");
            self.stats.output_dropped.fetch_add(held, Relaxed);
        }
        if !outs.is_empty() {
            tracing::debug!("flushed {} frames at the end of the stream", outs.len());
            self.stats.time(Stage::Transform, t0.elapsed());
        }
        self.count();
        self.send(outs)
    }

    /// The output stage is gone: the frames still held or queued are counted as dropped.
    fn abandon(&mut self) -> Result<()> {
        if let Some(t) = self.transform.as_ref() {
            self.stats.output_dropped.fetch_add(t.held(), Relaxed);
        }
        self.drop_queued();
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        let mut consecutive_errors = 0u32;
        // After `join` drops the control side, its channel is always "ready": wait on nothing.
        let no_ctl = crossbeam_channel::never();
        let mut ctl_open = true;
        loop {
            if self.transform.is_none() {
                // Still loading: leave frames queued (every-frame mode must not lose any; in real
                // time the capture side evicts stale ones) and wait for the transform. Only a
                // stop request gives up on them (counted as dropped).
                if self.stop.load(Relaxed) {
                    self.drop_queued();
                    break;
                }
                match self.ctl.recv_timeout(Duration::from_millis(100)) {
                    Ok(msg) => {
                        if let Flow::Closed = self.handle(msg) {
                            return self.abandon();
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        self.drop_queued();
                        break;
                    }
                }
                continue;
            }
            if !self.every_frame && self.stop.load(Relaxed) {
                // Real time: a stop does not wait for queued frames to be transformed.
                self.drop_queued();
                self.finish();
                break;
            }
            let ctl = if ctl_open { &self.ctl } else { &no_ctl };
            let frame = select! {
                recv(ctl) -> msg => {
                    match msg {
                        Ok(msg) => {
                            if let Flow::Closed = self.handle(msg) {
                                return self.abandon();
                            }
                        }
                        Err(_) => ctl_open = false,
                    }
                    continue;
                }
                recv(self.input.receiver()) -> f => match f {
                    Ok(f) => f,
                    Err(_) => {
                        // Capture ended and the queue is drained.
                        self.finish();
                        break;
                    }
                },
            };
            // Take the newest frame: anything queued behind this one is fresher.
            let frame = if self.every_frame {
                frame
            } else {
                match self.input.try_take_newest() {
                    Taken::Item { item, skipped } => {
                        self.stats.input_dropped.fetch_add(skipped + 1, Relaxed);
                        item
                    }
                    _ => frame,
                }
            };
            if self.every_frame {
                // Every frame: a pause holds the frame (and so the queue behind it) back until
                // resumed or stopped, instead of dropping it.
                while self.paused.load(Relaxed) && !self.stop.load(Relaxed) {
                    if let Ok(msg) = self.ctl.recv_timeout(Duration::from_millis(50)) {
                        if let Flow::Closed = self.handle(msg) {
                            return self.abandon();
                        }
                    }
                }
            } else if self.paused.load(Relaxed) {
                // The output holds its picture; the frame is not transformed.
                self.stats.input_dropped.fetch_add(1, Relaxed);
                continue;
            }
            let Some(transform) = self.transform.as_mut() else {
                continue;
            };
            let t0 = Instant::now();
            let mut outs = Vec::new();
            let discarded_before = transform.discarded();
            let result = transform.process_into(&frame, &mut outs);
            let accounted = transform.discarded() != discarded_before;
            self.count();
            match result {
                Ok(()) => {
                    consecutive_errors = 0;
                    self.stats.time(Stage::Transform, t0.elapsed());
                    self.stats.transformed.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    if !accounted {
                        // The frame is lost; a batching transform counts its own losses.
                        self.stats.output_dropped.fetch_add(1, Relaxed);
                    }
                    // Keep showing the last good frame; log the first and then every 100th error.
                    self.stats.transform_errors.fetch_add(1, Relaxed);
                    if consecutive_errors % 100 == 0 {
                        tracing::error!("transform failed (output keeps the last frame): {e:#}");
                    }
                    consecutive_errors += 1;
                }
            }
            if let Flow::Closed = self.send(outs) {
                return self.abandon();
            }
        }
        Ok(())
    }
}

/// Post-process + write stage.
struct Output {
    sink: Option<Box<dyn Sink>>,
    cfg: OutputConfig,
    post: Postprocess,
    input: Consumer<Frame>,
    ctl: Receiver<OutputMsg>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    opener: Arc<dyn Opener>,
    every_frame: bool,
    max_frames: Option<u64>,
    /// The last frame written, already in the sink's format and size.
    last: Option<Frame>,
    placeholder: Option<Frame>,
    snapshots: Vec<(PathBuf, Ack<PathBuf>)>,
    /// The first output frames lost when a replaced output was closed: reported at the end.
    lost: Option<anyhow::Error>,
}

/// The frame shown before the first transformed frame: flat dark slate, recognisable by tests.
pub const PLACEHOLDER_RGB: [u8; 3] = [24, 28, 36];

impl Output {
    fn sink_format(&self) -> PixelFormat {
        self.sink.as_ref().map_or(PixelFormat::Yuyv, |s| s.wants())
    }

    fn placeholder(&mut self) -> Result<Frame> {
        let fmt = self.sink_format();
        let (w, h) = (self.cfg.width, self.cfg.height);
        if let Some(p) = &self.placeholder {
            if (p.width, p.height, p.format) == (w, h, fmt) {
                return Ok(p.clone());
            }
        }
        let p = crate::convert::from_rgb(
            &Frame::solid_rgb(w, h, PLACEHOLDER_RGB),
            fmt,
            ColorRange::Limited,
        )?;
        self.placeholder = Some(p.clone());
        Ok(p)
    }

    fn switch(&mut self, cfg: OutputConfig) -> Result<()> {
        use crate::profile::OutputKind::V4l2loopback;
        // Open the new output while the old one still runs, so a failure changes nothing. A
        // loopback device takes one writer, so loopback → loopback may need the old one closed
        // first; it is reopened if the new one fails.
        let new = match self.opener.sink(&cfg) {
            Ok(s) => s,
            Err(first) if cfg.kind == V4l2loopback && self.cfg.kind == V4l2loopback => {
                if let Some(old) = self.sink.take() {
                    self.close_old(old);
                }
                match self.opener.sink(&cfg) {
                    Ok(s) => s,
                    Err(second) => {
                        // The first try failed only because sdcam's own writer still held the
                        // device ("in use by another writer"); the second one, with the device
                        // free, has the real reason (e.g. a reader holds the old format).
                        tracing::debug!("opening the new output beside the old one: {first:#}");
                        self.sink = self.opener.sink(&self.cfg).ok();
                        return Err(second);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        if let Some(old) = self.sink.take() {
            self.close_old(old);
        }
        tracing::info!("output: {}", new.describe());
        self.sink = Some(new);
        self.cfg = cfg;
        self.last = None;
        Ok(())
    }

    /// Closes an output that a live switch replaced. Its final flush failing loses frames that
    /// were counted as written: the run goes on with the new output but ends with an error.
    fn close_old(&mut self, mut old: Box<dyn Sink>) {
        if self.cfg.kind == crate::profile::OutputKind::V4l2loopback {
            // A virtual camera buffers nothing: closing it loses no frame.
            if let Err(e) = old.finish() {
                tracing::warn!("closing the old output: {e:#}");
            }
            return;
        }
        if let Err(e) = old.finish() {
            let e = e.context(format!(
                "closing the previous output {} (its last buffered frames are lost)",
                old.describe()
            ));
            tracing::error!("{e:#}");
            self.lost.get_or_insert(e);
        }
    }

    fn handle(&mut self, msg: OutputMsg, last_rgb: &mut Option<Frame>) {
        match msg {
            OutputMsg::Output(cfg, ack) => {
                let r = self.switch(cfg);
                if let Some(rgb) = last_rgb.as_ref() {
                    // Show the current picture at the new size right away.
                    self.last = self.post_process(rgb).ok();
                }
                let _ = ack.send(r);
            }
            OutputMsg::Snapshot(path, ack) => self.snapshots.push((path, ack)),
        }
    }

    fn post_process(&mut self, rgb: &Frame) -> Result<Frame> {
        let t0 = Instant::now();
        let fmt = self.sink_format();
        let f = self
            .post
            .run(rgb, self.cfg.width, self.cfg.height, self.cfg.fit, fmt)?;
        self.stats.time(Stage::Postprocess, t0.elapsed());
        Ok(f)
    }

    /// Writes one frame; returns false when the relay should stop.
    fn write(&mut self, frame: &Frame) -> Result<bool> {
        for (path, ack) in self.snapshots.drain(..) {
            let r = crate::sink::png::write_png(&path, frame).map(|_| path.clone());
            let _ = ack.send(r);
        }
        let Some(sink) = self.sink.as_mut() else {
            // Output lost (device gone): try to reopen it, keep the relay running.
            match self.opener.sink(&self.cfg) {
                Ok(s) => {
                    tracing::info!("output reopened: {}", s.describe());
                    self.sink = Some(s);
                }
                Err(e) => tracing::debug!("output still unavailable: {e:#}"),
            }
            return Ok(true);
        };
        let t0 = Instant::now();
        if let Err(e) = sink.write(frame) {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                // `sdcam --output - | ffplay -` and the player was closed: a normal end.
                tracing::info!("the reader of {} went away, stopping", sink.describe());
                self.stop.store(true, Relaxed);
                return Ok(false);
            }
            if self.cfg.kind == crate::profile::OutputKind::V4l2loopback {
                tracing::warn!("virtual camera write failed, reopening: {e:#}");
                self.sink = None;
                return Ok(true);
            }
            return Err(e.context(format!("writing to {}", sink.describe())));
        }
        self.stats.time(Stage::Write, t0.elapsed());
        let n = self.stats.written.fetch_add(1, Relaxed) + 1;
        if self.max_frames.is_some_and(|m| n >= m) {
            tracing::info!("wrote {n} frames, stopping");
            self.stop.store(true, Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    fn accept(&mut self, rgb: Frame, skipped: u64, last_rgb: &mut Option<Frame>) -> Result<Frame> {
        self.stats.output_dropped.fetch_add(skipped, Relaxed);
        let out = self.post_process(&rgb)?;
        self.stats.time(Stage::Latency, rgb.captured_at.elapsed());
        *last_rgb = Some(rgb);
        Ok(out)
    }

    fn run(mut self) -> Result<()> {
        let result = if self.every_frame {
            self.run_every_frame()
        } else {
            self.run_realtime()
        };
        // The final flush writes what the sink still buffers: if it fails, frames that were
        // counted as written are lost, and the run must not end as a success.
        let finished = match self.sink.take() {
            Some(mut s) => s
                .finish()
                .map_err(|e| e.context("closing the output (its last buffered frames are lost)")),
            None => Ok(()),
        };
        for (_, ack) in self.snapshots.drain(..) {
            let _ = ack.send(Err(anyhow::anyhow!(
                "the relay stopped before the snapshot"
            )));
        }
        let lost = self.lost.take().map_or(Ok(()), Err);
        result.and(finished).and(lost)
    }

    fn run_every_frame(&mut self) -> Result<()> {
        let mut last_rgb = None;
        loop {
            while let Ok(msg) = self.ctl.try_recv() {
                self.handle(msg, &mut last_rgb);
            }
            match self.input.take_next(Duration::from_millis(100)) {
                Taken::Item { item, skipped } => {
                    let out = self.accept(item, skipped, &mut last_rgb)?;
                    if !self.write(&out)? {
                        return Ok(());
                    }
                }
                Taken::Empty => continue,
                Taken::Closed => return Ok(()),
            }
        }
    }

    fn run_realtime(&mut self) -> Result<()> {
        let mut last_rgb: Option<Frame> = None;
        let mut next_tick = Instant::now();
        loop {
            // Wait for the tick, serving control messages meanwhile.
            loop {
                let now = Instant::now();
                if now >= next_tick {
                    break;
                }
                // A stop cuts a long wait short (an output at 0.1 fps would hold the drain
                // for 10 s); the wait is sliced so that the stop flag is seen.
                if self.stop.load(Relaxed) && next_tick - now > STOP_SLICE {
                    next_tick = now + STOP_SLICE;
                }
                let slice = (next_tick - now).min(STOP_SLICE);
                match self.ctl.recv_timeout(slice) {
                    Ok(msg) => self.handle(msg, &mut last_rgb),
                    // The control side is gone (join): wait without spinning.
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(slice)
                    }
                    Err(_) => {}
                }
            }
            let mut period = Duration::from_secs_f64(1.0 / self.cfg.fps);
            if self.stop.load(Relaxed) {
                // Draining after a stop: at least 10 writes a second.
                period = period.min(STOP_SLICE);
            }
            next_tick += period;
            if Instant::now() > next_tick + period {
                next_tick = Instant::now() + period; // fell behind: no burst
            }
            // The frame to write and whether it becomes the one repeated on later ticks. The
            // last frame is moved out and back rather than copied on every tick.
            let (frame, keep) = match self.input.try_take_newest() {
                Taken::Item { item, skipped } => (self.accept(item, skipped, &mut last_rgb)?, true),
                Taken::Closed => {
                    // Upstream finished and everything queued has been written.
                    return Ok(());
                }
                _ => match self.last.take() {
                    Some(f) => {
                        self.stats.repeated.fetch_add(1, Relaxed);
                        (f, true)
                    }
                    None => {
                        self.stats.placeholders.fetch_add(1, Relaxed);
                        (self.placeholder()?, false)
                    }
                },
            };
            let go_on = self.write(&frame)?;
            if keep {
                self.last = Some(frame);
            }
            if !go_on {
                return Ok(());
            }
        }
    }
}
