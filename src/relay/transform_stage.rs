//! The transform stage: takes frames from the input queue (the newest one in real time, each
//! one in order in every-frame mode), runs the [`Transform`] on them and passes its outputs to
//! the output queue; serves live transform changes (new settings, a replaced transform) and
//! accounts for every frame it drops or still holds at the end.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use super::queue::{Consumer, Producer, Pushed, Taken};
use super::{Stage, Stats, TransformMsg, DRAIN_WAIT};
use crate::frame::Frame;
use crate::transform::Transform;
use crate::Result;

/// The transform stage.
pub(super) struct TransformStage {
    pub(super) transform: Option<Box<dyn Transform>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) input: Consumer<Frame>,
    pub(super) out: Producer<Frame>,
    pub(super) ctl: Receiver<TransformMsg>,
    pub(super) paused: Arc<AtomicBool>,
    /// Set by the output stage when the on-demand camera wakes: the next frame starts the
    /// transform afresh ([`Transform::restart`]).
    pub(super) restart: Arc<AtomicBool>,
    pub(super) stats: Arc<Stats>,
    pub(super) every_frame: bool,
    /// The transform's skip count already added to the stats.
    pub(super) skipped_seen: u64,
    /// The transform's discarded-frame count already added to the stats.
    pub(super) discarded_seen: u64,
}

/// Whether the transform stage goes on after passing frames downstream.
pub(super) enum Flow {
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

    pub(super) fn run(mut self) -> Result<()> {
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
            if self.restart.swap(false, Relaxed) {
                if let Err(e) = transform.restart() {
                    tracing::warn!("restarting the transform after idle: {e:#}");
                }
                self.count();
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
            let transformed = result.is_ok();
            match result {
                Ok(()) => {
                    consecutive_errors = 0;
                    self.stats.time(Stage::Transform, t0.elapsed());
                }
                Err(e) => {
                    if !accounted {
                        // The frame is lost; a batching transform counts its own losses.
                        self.stats.output_dropped.fetch_add(1, Relaxed);
                    }
                    // Keep showing the last good frame; log the first and then every 100th error.
                    self.stats.transform_errors.fetch_add(1, Relaxed);
                    if consecutive_errors.is_multiple_of(100) {
                        tracing::error!("transform failed (output keeps the last frame): {e:#}");
                    }
                    consecutive_errors += 1;
                }
            }
            let flow = self.send(outs);
            if transformed {
                // Counted once its outputs are queued downstream: whoever sees the count (a
                // test stepping a manual clock) finds them there.
                self.stats.transformed.fetch_add(1, Relaxed);
            }
            if let Flow::Closed = flow {
                return self.abandon();
            }
        }
        Ok(())
    }
}
