//! The capture stage: reads the source, pre-processes each frame to the transform's RGB input
//! (size, fit, mirror) and pushes it into the input queue. A source that says it reconnects
//! when lost ([`crate::stage::StageInfo::reconnect_on_loss`]) is dropped on failure and
//! reopened every second meanwhile; a source switch opens the new one beside the old one
//! ([`super::replace`]).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use super::clock::Clock;
use super::queue::{Producer, Pushed};
use super::replace::{open_replacement, Slot};
use super::{CaptureMsg, Opener, PreprocessConfig, Stage, Stats, RECONNECT_EVERY};
use crate::convert::Preprocess;
use crate::frame::Frame;
use crate::source::SourceOptions;
use crate::source::{Captured, Source, Wake};
use crate::Result;

/// Capture + pre-process stage.
pub(super) struct Capture {
    pub(super) source: Option<Box<dyn Source>>,
    pub(super) cfg: SourceOptions,
    pub(super) pre: PreprocessConfig,
    pub(super) prep: Preprocess,
    pub(super) out: Producer<Frame>,
    pub(super) ctl: Receiver<CaptureMsg>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stats: Arc<Stats>,
    pub(super) opener: Arc<dyn Opener>,
    pub(super) every_frame: bool,
    /// Every-frame mode: end the stream after this many frames.
    pub(super) limit: Option<u64>,
    pub(super) wake: Wake,
    /// Times the reconnects of a lost source.
    pub(super) clock: Arc<dyn Clock>,
    /// On-demand signals from the output stage: `false` releases the source (nobody watches),
    /// `true` opens it again.
    pub(super) demand: Receiver<bool>,
    /// Idle on demand: a live source is released (a file or pipe is kept, unread) and none is
    /// reopened until woken.
    pub(super) idle: bool,
    /// The source before one chosen while idle: opened on wake if the new one does not open.
    pub(super) fallback: Option<SourceOptions>,
}

impl Capture {
    fn open(&self, cfg: &SourceOptions) -> Result<Box<dyn Source>> {
        let mut s = self.opener.source(cfg)?;
        s.set_realtime(!self.every_frame);
        s.set_wake(self.wake.clone());
        Ok(s)
    }

    fn switch(&mut self, cfg: SourceOptions) -> Result<()> {
        if self.idle {
            // Nobody watches: the new source is opened on wake, not now (a camera's light
            // must mean someone is looking). If it does not open then, the one before is.
            if self.source.is_some() || self.fallback.is_none() {
                self.fallback = Some(self.cfg.clone());
            }
            self.source = None;
            self.cfg = cfg;
            return Ok(());
        }
        let new = open_replacement(self, &cfg)?;
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

    /// An on-demand signal: release the source (`false`) or open it again (`true`).
    fn on_demand(&mut self, live: bool) {
        if live != self.idle {
            return;
        }
        self.idle = !live;
        if self.idle {
            // A camera or screen is released (and reopened on wake); a file or a pipe cannot
            // be reopened where it was, so it is kept and simply not read meanwhile.
            if self.source.as_ref().is_some_and(|s| s.info().live) {
                if let Some(s) = self.source.take() {
                    tracing::info!("idle: released {}", s.describe());
                }
            }
            return;
        }
        if self.source.is_some() {
            return;
        }
        let t0 = Instant::now();
        let opened = match self.open(&self.cfg) {
            Ok(s) => Ok(s),
            Err(e) => match self.fallback.take() {
                // The source chosen while idle does not open: back to the one before.
                Some(prev) => {
                    tracing::error!(
                        "live: the source set while idle did not open ({e:#}); back to the \
                         previous one"
                    );
                    let r = self.open(&prev);
                    self.cfg = prev;
                    r
                }
                None => Err(e),
            },
        };
        match opened {
            Ok(s) => {
                tracing::info!(
                    "live: opened {} in {:.0} ms",
                    s.describe(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
                self.fallback = None;
                self.source = Some(s);
            }
            // Lost until it opens: the reconnect loop below retries every second.
            Err(e) => tracing::warn!("live: the source did not open, retrying: {e:#}"),
        }
    }

    pub(super) fn run(mut self) -> Result<()> {
        let mut last_retry = self.clock.now();
        let mut taken = 0u64;
        let (mut demand_open, mut ctl_open) = (true, true);
        while !self.stop.load(Relaxed) {
            if self.limit.is_some_and(|n| taken >= n) {
                tracing::info!("captured {taken} frames (--frames), ending the stream");
                break;
            }
            while let Ok(msg) = self.ctl.try_recv() {
                self.handle(msg);
            }
            while let Ok(live) = self.demand.try_recv() {
                self.on_demand(live);
            }
            if self.idle {
                // Nobody watches: read nothing, wait for a wake, a control message or a stop
                // (a channel whose sender is gone is waited on as never ready, not spun on).
                let never = crossbeam_channel::never();
                let demand = if demand_open { &self.demand } else { &never };
                let never_ctl = crossbeam_channel::never();
                let ctl = if ctl_open { &self.ctl } else { &never_ctl };
                select! {
                    recv(demand) -> m => match m {
                        Ok(live) => self.on_demand(live),
                        Err(_) => demand_open = false,
                    },
                    recv(ctl) -> m => match m {
                        Ok(msg) => self.handle(msg),
                        Err(_) => ctl_open = false,
                    },
                    default(Duration::from_millis(100)) => {}
                }
                last_retry = self.clock.now();
                continue;
            }
            let Some(source) = self.source.as_mut() else {
                // Lost live source: keep trying to reopen it; the output keeps streaming.
                if self.clock.now() - last_retry >= RECONNECT_EVERY {
                    last_retry = self.clock.now();
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
                Err(e) if source.info().reconnect_on_loss => {
                    self.stats.source_errors.fetch_add(1, Relaxed);
                    let e = e.into_anyhow();
                    tracing::warn!("source failed, reconnecting every second: {e:#}");
                    self.source = None;
                    last_retry = self.clock.now();
                    continue;
                }
                Err(e) => return Err(e.into_anyhow().context("reading the source")),
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

impl Slot for Capture {
    type Stage = Box<dyn Source>;
    type Config = SourceOptions;
    const WHAT: &'static str = "source";

    fn open(&self, cfg: &SourceOptions) -> Result<Box<dyn Source>> {
        Capture::open(self, cfg)
    }
    fn holds_device_for(&self, cfg: &SourceOptions) -> bool {
        self.source
            .as_ref()
            .is_some_and(|s| s.info().exclusive_device)
            && cfg.same_kind(&self.cfg)
    }
    fn close_current(&mut self) {
        self.source = None;
    }
    fn reopen_current(&mut self) {
        // A failure leaves the source lost: the run loop reconnects it in the background.
        self.source = self.open(&self.cfg).ok();
    }
}
