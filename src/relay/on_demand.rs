//! The on-demand virtual camera inside the output stage: it watches who reads the output
//! ([`crate::sink::ViewerWatch`]), feeds the [`Demand`] state machine, and acts on its decisions:
//! asleep, the capture stage releases the source (the camera's light goes off) and the output
//! writes a hold frame (the last output dimmed, or `output.idle_image`) at `output.idle_fps`, so
//! the device stays listed and a starting reader gets a frame at once; awake, the capture stage
//! opens the source again and the transform restarts warm from the first new frame.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::demand::{Action, Command, Demand, Input};
use super::{OnDemand, Stats};
use crate::frame::{Frame, PixelFormat};
use crate::sink::{Sink, ViewerWatch};
use crate::source::Wake;

/// How often the watcher is looked at between output ticks while idle: bounds the wake delay
/// that polling adds (the driver's event is read at the next look).
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(100);

/// The hold frame's brightness relative to the last output (the last output, dimmed).
const DIM: u32 = 96; // of 256

/// On-demand state of a running output stage.
pub(super) struct OnDemandRun {
    /// `None`: on-demand off (`output.on_demand = false`, or not a virtual camera).
    pub(super) opts: Option<OnDemand>,
    machine: Demand,
    watch: Option<Box<dyn ViewerWatch>>,
    /// `false` releases the source, `true` opens it again (the capture stage).
    to_capture: Sender<bool>,
    /// Interrupts the capture stage's wait for a frame, so a release is not held up by a slow
    /// source's period.
    wake_capture: Wake,
    /// Set on wake: the transform restarts from the next frame.
    restart: Arc<AtomicBool>,
    stats: Arc<Stats>,
    /// `output.idle_image`, decoded once (RGB24).
    still: Option<Frame>,
    /// The capture stage was told to release the source (the last action applied was a sleep).
    asleep: bool,
    /// A state change applied outside [`OnDemandRun::poll`] (a new sink, a command), for the
    /// output stage to act on ([`OnDemandRun::take_applied`]).
    applied: Option<Action>,
}

impl OnDemandRun {
    pub(super) fn new(
        opts: Option<OnDemand>,
        now: Instant,
        to_capture: Sender<bool>,
        wake_capture: Wake,
        restart: Arc<AtomicBool>,
        stats: Arc<Stats>,
    ) -> Self {
        let still = load_still(&opts);
        OnDemandRun {
            opts,
            machine: Demand::new(now),
            watch: None,
            to_capture,
            wake_capture,
            restart,
            stats,
            still,
            asleep: false,
            applied: None,
        }
    }

    /// New options for the same sink (a live `set output.…`): a changed idle image is loaded
    /// again; the watcher and the state machine (a forced state, the linger) carry on. Turning
    /// on-demand off wakes the pipeline; turning it on starts watching `sink`.
    pub(super) fn set_options(
        &mut self,
        opts: Option<OnDemand>,
        sink: Option<&dyn Sink>,
        now: Instant,
    ) {
        let image = |o: &Option<OnDemand>| o.as_ref().and_then(|o| o.idle_image.clone());
        let reload = image(&opts) != image(&self.opts);
        let was_on = self.opts.is_some();
        self.opts = opts;
        if reload {
            self.still = load_still(&self.opts);
        }
        match (was_on, self.opts.is_some(), sink) {
            (true, false, _) => self.stop_watching(),
            (false, true, Some(s)) => self.attach(s, now),
            _ => {}
        }
    }

    /// Whether the pipeline runs: the state last applied.
    pub(super) fn live(&self) -> bool {
        !self.asleep
    }

    /// Starts watching a newly opened sink's readers. The machine starts idle: with nobody
    /// reading, the source is released at once.
    pub(super) fn attach(&mut self, sink: &dyn Sink, now: Instant) {
        self.watch = None;
        if self.opts.is_some() {
            self.watch = sink.viewers();
        }
        if self.watch.is_none() {
            // Cannot count readers: stay live, as without on-demand.
            self.stop_watching();
            return;
        }
        self.machine = Demand::new(now);
        let obs = self.watch.as_mut().map(|w| w.recheck());
        let a = obs.and_then(|o| self.machine.step(now, Input::Rechecked(o)));
        // Idle from the start unless somebody reads already.
        self.apply(a.unwrap_or(Action::Sleep));
        self.publish(now);
    }

    /// The sink is gone or being replaced: stop watching (the watcher holds a duplicate of its
    /// descriptor, which must go before the device is opened again). The state stays as it is
    /// until the next sink is attached: a switch or a lost output does not turn the camera on.
    pub(super) fn detach(&mut self) {
        self.watch = None;
    }

    /// On-demand is off (or readers cannot be counted): live, and nothing reported.
    fn stop_watching(&mut self) {
        self.watch = None;
        self.apply(Action::Wake);
        if let Ok(mut s) = self.stats.demand.lock() {
            *s = None;
        }
    }

    /// The state change applied since the last call (by a poll, a new sink or a command), for
    /// the output stage to act on.
    pub(super) fn take_applied(&mut self) -> Option<Action> {
        self.applied.take()
    }

    /// Looks at the readers (a full re-check when due) and acts on the state machine's
    /// decision ([`OnDemandRun::take_applied`]).
    pub(super) fn poll(&mut self, now: Instant) {
        let Some(w) = self.watch.as_mut() else {
            return;
        };
        let input = if self.machine.recheck_due(now) {
            Input::Rechecked(w.recheck())
        } else {
            match w.observe(Duration::ZERO) {
                Ok(o) => Input::Observed(o),
                Err(e) => {
                    tracing::debug!("counting readers: {e:#}");
                    Input::Tick
                }
            }
        };
        if let Some(a) = self.machine.step(now, input) {
            self.apply(a);
        }
        self.publish(now);
    }

    /// A `wake` / `sleep` / `auto` command.
    ///
    /// # Errors
    /// The output's readers cannot be counted (not a virtual camera).
    pub(super) fn command(&mut self, now: Instant, c: Command) -> crate::Result<()> {
        anyhow::ensure!(
            self.watch.is_some(),
            "on-demand is not active on this output (not a v4l2loopback device, or its readers \
             cannot be counted)"
        );
        if let Some(a) = self.machine.step(now, Input::Command(c)) {
            self.apply(a);
        }
        self.publish(now);
        Ok(())
    }

    /// When the output stage must look again at the latest.
    pub(super) fn next_look(&self, now: Instant) -> Option<Instant> {
        self.watch.as_ref()?;
        Some(self.machine.next_deadline(now).min(now + LOOK_EVERY))
    }

    /// Applies a state change, unless it is the state already applied (a wake of a running
    /// pipeline does not restart its transform in front of its viewers).
    fn apply(&mut self, a: Action) {
        let sleep = a == Action::Sleep;
        if sleep == self.asleep {
            return;
        }
        self.asleep = sleep;
        self.applied = Some(a);
        match a {
            Action::Wake => {
                tracing::info!("on-demand: a reader started, waking");
                self.restart.store(true, Relaxed);
                let _ = self.to_capture.send(true);
            }
            Action::Sleep => {
                tracing::info!("on-demand: no readers, idle (source released, model paused)");
                let _ = self.to_capture.send(false);
                self.wake_capture.wake();
            }
        }
    }

    fn publish(&self, now: Instant) {
        if let Ok(mut s) = self.stats.demand.lock() {
            *s = self.watch.as_ref().map(|_| self.machine.status(now));
        }
    }

    /// The hold frame's picture (RGB24): the idle image, else the last output dimmed, else
    /// `None` (the placeholder).
    pub(super) fn hold_rgb(&self, last_rgb: Option<&Frame>) -> Option<Frame> {
        if let Some(s) = &self.still {
            return Some(s.clone());
        }
        let last = last_rgb?;
        if last.format != PixelFormat::Rgb24 {
            return None;
        }
        let data = last
            .data
            .iter()
            .map(|&v| ((v as u32 * DIM) >> 8) as u8)
            .collect();
        Some(last.with_data(last.width, last.height, PixelFormat::Rgb24, data))
    }
}

/// Decodes `output.idle_image` (PNG/JPEG) to RGB24; a file that does not read is logged and
/// the dimmed last output is used instead.
fn load_still(opts: &Option<OnDemand>) -> Option<Frame> {
    let path = opts.as_ref()?.idle_image.as_ref()?;
    match crate::source::image::load_image(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("output.idle_image: {e:#}; showing the last output dimmed instead");
            None
        }
    }
}
