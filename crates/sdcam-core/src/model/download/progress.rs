//! One progress display for a whole download: an `indicatif` bar on a terminal, periodic log
//! lines otherwise.

use super::*;

/// One progress display for a whole download: an `indicatif` bar when stderr is a terminal,
/// else an info log line every `log_every`.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    log_every: Duration,
    file: String,
}

impl Progress {
    pub(crate) fn new(total: u64, show: bool) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} \
                 {decimal_bytes_per_sec} ({eta})",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            total,
            done: 0,
            started: now,
            last_log: now,
            log_every: Duration::from_secs(10),
            file: String::new(),
        }
    }

    /// A download outside a plan learns its size only from the hub's answer.
    pub(super) fn ensure_total(&mut self, size: u64) {
        if self.total == 0 {
            self.total = size;
            if let Some(b) = &self.bar {
                b.set_length(size);
            }
        }
    }

    pub(super) fn file(&mut self, name: &str) {
        self.file = name.to_string();
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
        }
    }

    pub(super) fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    pub(super) fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.last_log.elapsed() >= self.log_every {
            self.last_log = Instant::now();
            let pct = if self.total > 0 {
                100.0 * self.done as f64 / self.total as f64
            } else {
                0.0
            };
            tracing::info!(
                "downloading {}: {} of {} ({pct:.0}%) at {}/s",
                self.file,
                DecimalBytes(self.done),
                DecimalBytes(self.total),
                DecimalBytes(self.rate() as u64)
            );
        }
    }

    pub(super) fn finish(&mut self, files: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.done > 0 {
            tracing::info!(
                "downloaded {files} file(s), {} in {:.1} s ({}/s)",
                DecimalBytes(self.done),
                self.started.elapsed().as_secs_f64(),
                DecimalBytes(self.rate() as u64)
            );
        }
    }
}
