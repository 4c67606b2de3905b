//! The output stage: post-processes transformed frames to the sink's format and size and
//! writes them. In real time it writes at its own steady rate, repeating the last frame (or
//! showing the placeholder) when the transform is late; in every-frame mode it writes each
//! frame once. A sink that says it reconnects when lost
//! ([`crate::stage::StageInfo::reconnect_on_loss`]) is reopened in the background after a
//! failed write; a reader that went away ([`StageError::BrokenPipe`]) ends the run normally;
//! an output switch opens the new sink beside the old one ([`super::replace`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use super::clock::Clock;
use super::demand::Action;
use super::on_demand::OnDemandRun;
use super::queue::{Consumer, Taken};
use super::replace::{open_replacement, Slot};
use super::OutputOptions;
use super::{Ack, Opener, OutputMsg, Stage, Stats, STOP_SLICE};
use crate::convert::Postprocess;
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::sink::Sink;
use crate::stage::StageError;
use crate::Result;

/// Post-process + write stage.
pub(super) struct Output {
    /// The on-demand camera (real time only).
    pub(super) on_demand: Option<OnDemandRun>,
    /// While idle: the hold frame, in the sink's format and size.
    pub(super) hold: Option<Frame>,
    /// When the on-demand camera last woke, until its first live frame is written (real time,
    /// as frames' `captured_at`).
    pub(super) woke_at: Option<Instant>,
    pub(super) sink: Option<Box<dyn Sink>>,
    pub(super) cfg: OutputOptions,
    pub(super) post: Postprocess,
    pub(super) input: Consumer<Frame>,
    pub(super) ctl: Receiver<OutputMsg>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stats: Arc<Stats>,
    pub(super) opener: Arc<dyn Opener>,
    pub(super) every_frame: bool,
    pub(super) max_frames: Option<u64>,
    /// Paces the writes in real time.
    pub(super) clock: Arc<dyn Clock>,
    /// The last frame written, already in the sink's format and size.
    pub(super) last: Option<Frame>,
    pub(super) placeholder: Option<Frame>,
    pub(super) snapshots: Vec<(PathBuf, Ack<PathBuf>)>,
    /// The first output frames lost when a replaced output was closed: reported at the end.
    pub(super) lost: Option<anyhow::Error>,
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

    fn switch(&mut self, cfg: OutputOptions) -> Result<()> {
        let same_sink = self.sink.is_some()
            && (&cfg.sink, cfg.width, cfg.height, cfg.fps, cfg.fit)
                == (
                    &self.cfg.sink,
                    self.cfg.width,
                    self.cfg.height,
                    self.cfg.fps,
                    self.cfg.fit,
                );
        if same_sink {
            // Only the on-demand settings changed: the device stays open (no flicker for its
            // readers) and the on-demand state carries on.
            let now = self.clock.now();
            if let Some(d) = self.on_demand.as_mut() {
                d.set_options(cfg.on_demand.clone(), self.sink.as_deref(), now);
            }
            self.cfg = cfg;
            self.hold = None;
            return Ok(());
        }
        // The reader watcher holds a duplicate of the old writer's descriptor: let it go
        // first, so that the same device can be opened again.
        if let Some(d) = self.on_demand.as_mut() {
            d.detach();
        }
        let new = match open_replacement(self, &cfg) {
            Ok(new) => new,
            Err(e) => {
                self.sink_changed();
                return Err(e);
            }
        };
        if let Some(old) = self.sink.take() {
            self.close_old(old);
        }
        tracing::info!("output: {}", new.describe());
        self.sink = Some(new);
        self.cfg = cfg;
        self.last = None;
        self.sink_changed();
        Ok(())
    }

    /// A sink was opened (or lost): watch its readers under the current options.
    fn sink_changed(&mut self) {
        let now = self.clock.now();
        let Some(d) = self.on_demand.as_mut() else {
            return;
        };
        d.set_options(self.cfg.on_demand.clone(), None, now);
        match self.sink.as_deref() {
            Some(s) => d.attach(s, now),
            None => d.detach(),
        }
        self.hold = None;
    }

    /// Acts on an on-demand decision in the output: asleep, the hold frame is made (and written
    /// at once); awake, the next tick comes at once.
    fn demand_acted(&mut self, a: Action, next_tick: &mut Instant) {
        *next_tick = self.clock.now();
        self.woke_at = (a == Action::Wake).then(Instant::now);
        match a {
            // Made from the current picture and settings at the first idle tick.
            Action::Sleep => self.hold = None,
            // Until the first new frame, the dimmed hold goes on rather than a stale bright one.
            Action::Wake => {
                if let Some(h) = self.hold.take() {
                    self.last = Some(h);
                }
            }
        }
    }

    /// The hold frame for the current settings: `output.idle_image`, else the last output
    /// dimmed, else the last frame written, else the placeholder.
    fn make_hold(&mut self, last_rgb: &Option<Frame>) -> Result<Frame> {
        let rgb = self
            .on_demand
            .as_ref()
            .and_then(|d| d.hold_rgb(last_rgb.as_ref()));
        if let Some(rgb) = rgb {
            if let Ok(f) = self.post_process(&rgb) {
                return Ok(f);
            }
        }
        match self.last.clone() {
            Some(f) => Ok(f),
            None => self.placeholder(),
        }
    }

    /// Closes an output that a live switch replaced. Its final flush failing loses frames that
    /// were counted as written: the run goes on with the new output but ends with an error.
    fn close_old(&mut self, mut old: Box<dyn Sink>) {
        if !old.info().buffers_frames {
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
            OutputMsg::Demand(c, ack) => {
                let now = self.clock.now();
                let r = match self.on_demand.as_mut() {
                    Some(d) => d.command(now, c),
                    None => Err(anyhow::anyhow!(
                        "on-demand is not active (output.on_demand = false, not a virtual \
                         camera, or every-frame pacing)"
                    )),
                };
                let _ = ack.send(r);
            }
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
                    self.sink_changed();
                }
                Err(e) => tracing::debug!("output still unavailable: {e:#}"),
            }
            return Ok(true);
        };
        let t0 = Instant::now();
        match sink.write(frame) {
            Ok(()) => {}
            Err(StageError::BrokenPipe(_)) => {
                // `sdcam --output - | ffplay -` and the player was closed: a normal end.
                tracing::info!("the reader of {} went away, stopping", sink.describe());
                self.stop.store(true, Relaxed);
                return Ok(false);
            }
            Err(e) if sink.info().reconnect_on_loss => {
                tracing::warn!(
                    "{} write failed, reopening: {:#}",
                    sink.describe(),
                    e.into_anyhow()
                );
                self.sink = None;
                self.sink_changed();
                return Ok(true);
            }
            Err(e) => {
                return Err(e
                    .into_anyhow()
                    .context(format!("writing to {}", sink.describe())))
            }
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
        if let Some(woke) = self.woke_at.filter(|w| rgb.captured_at >= *w) {
            // The wake latency, in its two parts: the source's opening and first frame, and the
            // pipeline (pre-process, transform, post-process) up to this write.
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            tracing::info!(
                "on-demand: first live frame {:.0} ms after the wake (source open and first \
                 frame {:.0} ms, pipeline {:.0} ms)",
                ms(woke.elapsed()),
                ms(rgb.captured_at - woke),
                ms(rgb.captured_at.elapsed())
            );
            self.woke_at = None;
        }
        self.stats.time(Stage::Latency, rgb.captured_at.elapsed());
        *last_rgb = Some(rgb);
        Ok(out)
    }

    pub(super) fn run(mut self) -> Result<()> {
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
        let mut next_tick = self.clock.now();
        self.sink_changed();
        // After `join` drops the control side, its channel is always "ready": wait on nothing.
        let no_ctl = crossbeam_channel::never();
        let mut ctl_open = true;
        loop {
            // Wait for the tick, serving control messages meanwhile.
            loop {
                let now = self.clock.now();
                if now >= next_tick {
                    break;
                }
                // A stop cuts a long wait short (an output at 0.1 fps would hold the drain
                // for 10 s); the wait is sliced so that the stop flag is seen.
                if self.stop.load(Relaxed) && next_tick - now > STOP_SLICE {
                    next_tick = now + STOP_SLICE;
                }
                let mut until = next_tick.min(now + STOP_SLICE);
                if let Some(look) = self.on_demand.as_ref().and_then(|d| d.next_look(now)) {
                    until = until.min(look);
                }
                let timer = self.clock.at(until);
                let ctl = if ctl_open { &self.ctl } else { &no_ctl };
                select! {
                    recv(ctl) -> msg => match msg {
                        Ok(msg) => self.handle(msg, &mut last_rgb),
                        // The control side is gone (join): wait for the ticks only.
                        Err(_) => ctl_open = false,
                    },
                    recv(timer) -> _ => {}
                }
                let now = self.clock.now();
                let acted = self.on_demand.as_mut().and_then(|d| {
                    d.poll(now);
                    d.take_applied()
                });
                if let Some(a) = acted {
                    self.demand_acted(a, &mut next_tick);
                }
            }
            let idle = self.on_demand.as_ref().is_some_and(|d| !d.live());
            let fps = match (idle, self.on_demand.as_ref()) {
                (true, Some(d)) => d.opts.as_ref().map_or(self.cfg.fps, |o| o.idle_fps),
                _ => self.cfg.fps,
            };
            let mut period = Duration::from_secs_f64(1.0 / fps);
            if self.stop.load(Relaxed) {
                // Draining after a stop: at least 10 writes a second.
                period = period.min(STOP_SLICE);
            }
            next_tick += period;
            let now = self.clock.now();
            if now > next_tick + period {
                next_tick = now + period; // fell behind: no burst
            }
            // The frame to write and whether it becomes the one repeated on later ticks. The
            // last frame is moved out and back rather than copied on every tick.
            if idle {
                // Nobody watches: frames still coming out of the pipeline are not shown.
                match self.input.try_take_newest() {
                    Taken::Item { skipped, .. } => {
                        self.stats.output_dropped.fetch_add(skipped + 1, Relaxed);
                    }
                    Taken::Closed => return Ok(()),
                    _ => {}
                }
                let hold = match self.hold.take() {
                    Some(f) => f,
                    None => self.make_hold(&last_rgb)?,
                };
                self.stats.repeated.fetch_add(1, Relaxed);
                let go_on = self.write(&hold)?;
                self.hold = Some(hold);
                if !go_on {
                    return Ok(());
                }
                continue;
            }
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

impl Slot for Output {
    type Stage = Box<dyn Sink>;
    type Config = OutputOptions;
    const WHAT: &'static str = "output";

    fn open(&self, cfg: &OutputOptions) -> Result<Box<dyn Sink>> {
        self.opener.sink(cfg)
    }
    fn holds_device_for(&self, cfg: &OutputOptions) -> bool {
        self.sink
            .as_ref()
            .is_some_and(|s| s.info().exclusive_device)
            && cfg.sink.same_kind(&self.cfg.sink)
    }
    fn close_current(&mut self) {
        if let Some(d) = self.on_demand.as_mut() {
            d.detach();
        }
        if let Some(old) = self.sink.take() {
            self.close_old(old);
        }
    }
    fn reopen_current(&mut self) {
        // A failure leaves the output lost: `write` reopens it in the background.
        self.sink = self.opener.sink(&self.cfg).ok();
    }
}
