//! The three-stage frame relay (paper appendix B.1): capture + pre-process → transform →
//! post-process + write, each on its own thread, joined by bounded queues.
//!
//! In real-time mode the transform always takes the newest frame (stale ones are dropped and
//! counted) and the output writes at its own steady rate, repeating the last frame when the
//! transform is late, so a virtual camera never stalls or goes black. In every-frame mode
//! (file → file) every frame is processed and written once, as fast as possible.
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
use crate::source::{self, Captured, Source};
use crate::transform::Transform;
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
    Apply(Box<Profile>, Ack),
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
    /// Stop after writing this many frames.
    pub max_frames: Option<u64>,
    pub opener: Arc<dyn Opener>,
}

/// A running relay.
pub struct Relay {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    stats: Arc<Stats>,
    capture_ctl: Sender<CaptureMsg>,
    transform_ctl: Sender<TransformMsg>,
    output_ctl: Sender<OutputMsg>,
    finished: Receiver<()>,
    threads: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

/// How long to wait for a stage to acknowledge a reconfiguration.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a lost live source is reopened.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Sends a request carrying an acknowledgement channel and waits for the stage's answer.
fn ask<T>(send: impl FnOnce(Ack<T>) -> bool, what: &str) -> Result<T> {
    let (ack, done) = bounded(1);
    anyhow::ensure!(send(ack), "{what}: the relay has stopped");
    done.recv_timeout(ACK_TIMEOUT)
        .with_context(|| format!("{what}: no answer from the relay"))?
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
        let mut source = s.source;
        source.set_realtime(!s.every_frame);

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
        };
        let done = finished_tx.clone();
        threads.push((
            "capture",
            std::thread::Builder::new()
                .name("sdcam-capture".into())
                .spawn(move || {
                    let r = capture.run();
                    let _ = done.send(());
                    r
                })?,
        ));
        let tstage = TransformStage {
            skipped_seen: s.transform.as_ref().map_or(0, |t| t.skipped()),
            transform: s.transform,
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
                    let _ = done.send(());
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
        };
        let done = finished_tx;
        threads.push((
            "output",
            std::thread::Builder::new()
                .name("sdcam-output".into())
                .spawn(move || {
                    let r = output.run();
                    let _ = done.send(());
                    r
                })?,
        ));
        Ok(Relay {
            stop,
            paused,
            stats,
            capture_ctl,
            transform_ctl,
            output_ctl,
            finished,
            threads,
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
        ask(
            |a| self.capture_ctl.send(CaptureMsg::Source(cfg, a)).is_ok(),
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
    pub fn apply_transform(&self, profile: &Profile) -> Result<()> {
        let p = Box::new(profile.clone());
        ask(
            |a| self.transform_ctl.send(TransformMsg::Apply(p, a)).is_ok(),
            "updating the transform",
        )
    }

    /// Replaces the transform (e.g. another kind or model); the output keeps streaming meanwhile.
    pub fn replace_transform(&self, t: Box<dyn Transform>) -> Result<()> {
        ask(
            |a| self.transform_ctl.send(TransformMsg::Replace(t, a)).is_ok(),
            "replacing the transform",
        )
    }

    /// Switches the output (size, rate, device); on failure the old output is restored.
    pub fn set_output(&self, cfg: OutputConfig) -> Result<()> {
        ask(
            |a| self.output_ctl.send(OutputMsg::Output(cfg, a)).is_ok(),
            "switching output",
        )
    }

    /// Saves the next written frame as PNG; returns the path once written.
    pub fn snapshot(&self, path: PathBuf) -> Result<PathBuf> {
        ask(
            |a| self.output_ctl.send(OutputMsg::Snapshot(path, a)).is_ok(),
            "snapshot",
        )
    }

    /// Asks all stages to stop; queued frames are still drained to the sink.
    pub fn request_stop(&self) {
        self.stop.store(true, Relaxed);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// A receiver that gets a message whenever a stage thread ends (for `select!`).
    pub fn finished(&self) -> &Receiver<()> {
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
}

impl Capture {
    fn open(&self, cfg: &SourceConfig) -> Result<Box<dyn Source>> {
        let mut s = self.opener.source(cfg)?;
        s.set_realtime(!self.every_frame);
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
        while !self.stop.load(Relaxed) {
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
                }
                Pushed::Closed => break,
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
}

impl TransformStage {
    fn handle(&mut self, msg: TransformMsg) {
        match msg {
            TransformMsg::Apply(p, ack) => {
                let r = match self.transform.as_mut() {
                    Some(t) => t.apply(&p),
                    None => Err(anyhow::anyhow!("the transform is still loading")),
                };
                let _ = ack.send(r);
            }
            TransformMsg::Replace(t, ack) => {
                tracing::info!("transform: {}", t.name());
                self.skipped_seen = t.skipped();
                self.transform = Some(t);
                let _ = ack.send(Ok(()));
            }
        }
    }

    fn run(mut self) -> Result<()> {
        let mut consecutive_errors = 0u32;
        loop {
            if self.transform.is_none() {
                // Still loading: leave frames queued (every-frame mode must not lose any; in real
                // time the capture side evicts stale ones) and wait for the transform.
                if self.stop.load(Relaxed) {
                    break;
                }
                match self.ctl.recv_timeout(Duration::from_millis(100)) {
                    Ok(msg) => self.handle(msg),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
                continue;
            }
            let frame = select! {
                recv(self.ctl) -> msg => {
                    if let Ok(msg) = msg { self.handle(msg); }
                    continue;
                }
                recv(self.input.receiver()) -> f => match f {
                    Ok(f) => f,
                    Err(_) => break, // capture ended and the queue is drained
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
            let Some(transform) = self.transform.as_mut() else {
                continue;
            };
            if self.paused.load(Relaxed) {
                continue;
            }
            let t0 = Instant::now();
            let mut outs = Vec::new();
            let result = transform.process_into(&frame, &mut outs);
            let skipped = transform.skipped();
            self.stats
                .model_skipped
                .fetch_add(skipped.saturating_sub(self.skipped_seen), Relaxed);
            self.skipped_seen = skipped;
            match result {
                Ok(()) => {
                    consecutive_errors = 0;
                    self.stats.time(Stage::Transform, t0.elapsed());
                    self.stats.transformed.fetch_add(1, Relaxed);
                    for out in outs {
                        match self.out.push(out) {
                            Pushed::Ok { dropped } => {
                                self.stats.output_dropped.fetch_add(dropped, Relaxed);
                            }
                            Pushed::Closed => return Ok(()),
                        }
                    }
                }
                Err(e) => {
                    // Keep showing the last good frame; log the first and then every 100th error.
                    self.stats.transform_errors.fetch_add(1, Relaxed);
                    if consecutive_errors % 100 == 0 {
                        tracing::error!("transform failed (output keeps the last frame): {e:#}");
                    }
                    consecutive_errors += 1;
                }
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
                if let Some(mut old) = self.sink.take() {
                    if let Err(e) = old.finish() {
                        tracing::warn!("closing the old output: {e:#}");
                    }
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
        if let Some(mut old) = self.sink.take() {
            if let Err(e) = old.finish() {
                tracing::warn!("closing the old output: {e:#}");
            }
        }
        tracing::info!("output: {}", new.describe());
        self.sink = Some(new);
        self.cfg = cfg;
        self.last = None;
        Ok(())
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
        result.and(finished)
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
                if let Ok(msg) = self.ctl.recv_timeout(next_tick - now) {
                    self.handle(msg, &mut last_rgb);
                }
            }
            let period = Duration::from_secs_f64(1.0 / self.cfg.fps);
            next_tick += period;
            if Instant::now() > next_tick + period {
                next_tick = Instant::now() + period; // fell behind: no burst
            }
            // The frame to write and whether it becomes the one repeated on later ticks. The
            // last frame is moved out and back rather than copied on every tick.
            let (frame, keep) = match self.input.try_take_newest() {
                Taken::Item { item, skipped } => (self.accept(item, skipped, &mut last_rgb)?, true),
                Taken::Closed if self.stop.load(Relaxed) || self.last.is_some() => {
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
