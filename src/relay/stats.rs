//! Relay measurements: frame counters, per-stage timings and end-to-end latency, shared by the
//! stages and read by the status line and the `stats` command.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Exponentially weighted moving average plus the extremes, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    pub avg_ms: f64,
    pub max_ms: f64,
    pub count: u64,
}

impl Timing {
    fn add(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.avg_ms = if self.count == 0 {
            ms
        } else {
            self.avg_ms * 0.9 + ms * 0.1
        };
        self.max_ms = self.max_ms.max(ms);
        self.count += 1;
    }
}

/// Which timing a measurement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Conversion to RGB and resize to the model size (capture thread).
    Preprocess,
    /// The transform itself.
    Transform,
    /// Resize to the output size and conversion to the sink's format.
    Postprocess,
    /// The sink's write.
    Write,
    /// Capture time of the frame → first written to the sink.
    Latency,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Timings {
    pub preprocess: Timing,
    pub transform: Timing,
    pub postprocess: Timing,
    pub write: Timing,
    pub latency: Timing,
}

/// Counters shared between the stages.
#[derive(Debug)]
pub struct Stats {
    pub captured: AtomicU64,
    /// Input frames dropped because a newer one arrived before the transform took them.
    pub input_dropped: AtomicU64,
    pub transformed: AtomicU64,
    /// Transform calls answered without running the model (similarity filter skips).
    pub model_skipped: AtomicU64,
    pub transform_errors: AtomicU64,
    /// Transformed frames dropped because a newer one arrived before the output tick.
    pub output_dropped: AtomicU64,
    pub written: AtomicU64,
    /// Output ticks that re-sent the previous frame because no new one was ready.
    pub repeated: AtomicU64,
    /// Output ticks that sent the placeholder (nothing transformed yet).
    pub placeholders: AtomicU64,
    pub source_errors: AtomicU64,
    /// The on-demand state, `None` when on-demand is not active.
    pub demand: Mutex<Option<super::demand::Status>>,
    timings: Mutex<Timings>,
    pub started: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            captured: AtomicU64::new(0),
            input_dropped: AtomicU64::new(0),
            transformed: AtomicU64::new(0),
            model_skipped: AtomicU64::new(0),
            transform_errors: AtomicU64::new(0),
            output_dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            repeated: AtomicU64::new(0),
            placeholders: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            demand: Mutex::new(None),
            timings: Mutex::new(Timings::default()),
            started: Instant::now(),
        }
    }
}

impl Stats {
    pub fn time(&self, stage: Stage, d: Duration) {
        let mut t = self.timings.lock().unwrap_or_else(|e| e.into_inner());
        match stage {
            Stage::Preprocess => t.preprocess.add(d),
            Stage::Transform => t.transform.add(d),
            Stage::Postprocess => t.postprocess.add(d),
            Stage::Write => t.write.add(d),
            Stage::Latency => t.latency.add(d),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            captured: self.captured.load(Relaxed),
            input_dropped: self.input_dropped.load(Relaxed),
            transformed: self.transformed.load(Relaxed),
            model_skipped: self.model_skipped.load(Relaxed),
            transform_errors: self.transform_errors.load(Relaxed),
            output_dropped: self.output_dropped.load(Relaxed),
            written: self.written.load(Relaxed),
            repeated: self.repeated.load(Relaxed),
            placeholders: self.placeholders.load(Relaxed),
            source_errors: self.source_errors.load(Relaxed),
            timings: *self.timings.lock().unwrap_or_else(|e| e.into_inner()),
            uptime: self.started.elapsed(),
            heap: crate::alloc::heap_bytes(),
            demand: *self.demand.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub at: Instant,
    pub captured: u64,
    pub input_dropped: u64,
    pub transformed: u64,
    pub model_skipped: u64,
    pub transform_errors: u64,
    pub output_dropped: u64,
    pub written: u64,
    pub repeated: u64,
    pub placeholders: u64,
    pub source_errors: u64,
    pub timings: Timings,
    pub uptime: Duration,
    /// Live and peak heap bytes, where the binary counts them ([`crate::alloc`]).
    pub heap: Option<(u64, u64)>,
    /// The on-demand state (`idle (no viewers) for 12 s`), `None` when not active.
    pub demand: Option<super::demand::Status>,
}

impl Snapshot {
    /// A one-line status: rates since `prev` (or since start), latency and loss counters.
    pub fn status_line(&self, prev: Option<&Snapshot>) -> String {
        let (dt, c0, t0, s0, w0) = match prev {
            Some(p) => (
                (self.at - p.at).as_secs_f64(),
                p.captured,
                p.transformed,
                p.model_skipped,
                p.written,
            ),
            None => (self.uptime.as_secs_f64(), 0, 0, 0, 0),
        };
        let rate = |a: u64, b: u64| if dt > 0.0 { (a - b) as f64 / dt } else { 0.0 };
        let calls = self.transformed.saturating_sub(t0);
        let skipped = self.model_skipped.saturating_sub(s0).min(calls);
        let skip = if skipped > 0 {
            format!(" (skip {:.0}%)", 100.0 * skipped as f64 / calls as f64)
        } else {
            String::new()
        };
        let demand = self.demand.map(|d| format!("{d} | ")).unwrap_or_default();
        format!(
            "{demand}in {:.1} fps | model {:.1} fps{skip} | out {:.1} fps | latency {:.0} ms | dropped {} | repeated {}",
            rate(self.captured, c0),
            if dt > 0.0 { (calls - skipped) as f64 / dt } else { 0.0 },
            rate(self.written, w0),
            self.timings.latency.avg_ms,
            self.input_dropped + self.output_dropped,
            self.repeated,
        )
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.timings;
        writeln!(f, "uptime        {:.1} s", self.uptime.as_secs_f64())?;
        writeln!(f, "captured      {}", self.captured)?;
        writeln!(
            f,
            "input dropped {} (stale frames skipped for a newer one)",
            self.input_dropped
        )?;
        writeln!(
            f,
            "transformed   {} ({} errors, {} answered by the similarity filter)",
            self.transformed, self.transform_errors, self.model_skipped
        )?;
        writeln!(f, "output drops  {}", self.output_dropped)?;
        writeln!(
            f,
            "written       {} ({} repeats, {} placeholders)",
            self.written, self.repeated, self.placeholders
        )?;
        writeln!(f, "source errors {}", self.source_errors)?;
        if let Some(d) = self.demand {
            let how = match d.source {
                Some(crate::v4l2::clients::CountSource::Event) => "the driver's client-usage event",
                Some(crate::v4l2::clients::CountSource::Fallback) => "the /proc openers",
                None => "not counted yet",
            };
            writeln!(f, "on demand     {d} (readers from {how})")?;
        }
        for (name, tm) in [
            ("pre-process", t.preprocess),
            ("transform", t.transform),
            ("post-process", t.postprocess),
            ("write", t.write),
            ("latency", t.latency),
        ] {
            writeln!(
                f,
                "{name:<13} {:.2} ms avg, {:.2} ms max",
                tm.avg_ms, tm.max_ms
            )?;
        }
        if let Some((live, peak)) = self.heap {
            const MIB: f64 = 1024.0 * 1024.0;
            writeln!(
                f,
                "heap live     {:.2} MiB ({:.2} MiB peak; RSS also holds freed memory the allocator keeps)",
                live as f64 / MIB,
                peak as f64 / MIB
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_average_and_status_rates() {
        let s = Stats::default();
        s.time(Stage::Transform, Duration::from_millis(10));
        s.time(Stage::Transform, Duration::from_millis(20));
        let a = s.snapshot();
        assert!((a.timings.transform.avg_ms - 11.0).abs() < 0.01);
        assert!((a.timings.transform.max_ms - 20.0).abs() < 0.01);
        s.written.fetch_add(30, Relaxed);
        let mut b = s.snapshot();
        b.at = a.at + Duration::from_secs(1);
        assert!(
            b.status_line(Some(&a)).contains("out 30.0 fps"),
            "{}",
            b.status_line(Some(&a))
        );
        assert!(b.to_string().contains("written       30"));
        // Similarity-filter skips lower the model rate and show as a share.
        s.transformed.fetch_add(10, Relaxed);
        s.model_skipped.fetch_add(4, Relaxed);
        let mut c = s.snapshot();
        c.at = b.at + Duration::from_secs(2);
        let line = c.status_line(Some(&b));
        assert!(line.contains("model 3.0 fps (skip 40%)"), "{line}");
    }

    #[test]
    fn stats_show_the_live_heap_where_it_is_counted() {
        let mut s = Stats::default().snapshot();
        // Library tests run on the plain system allocator: nothing counted, no line.
        assert_eq!(s.heap, None);
        assert!(!s.to_string().contains("heap"));
        s.heap = Some((3 << 20, 10 << 20));
        assert!(
            s.to_string()
                .contains("heap live     3.00 MiB (10.00 MiB peak;"),
            "{s}"
        );
    }
}
