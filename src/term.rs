//! One writer for stderr: the terminal status line of a run and everything else written to
//! stderr (`tracing` logs, the answers to `get`, `stats`, `help`) go through here, so a log line
//! never lands in the middle of the status line.
//!
//! Hand-written rather than the `tracing-indicatif` crate: that crate draws a bar per `tracing`
//! span, while sdcam has one status line and no span bars, so a small [`MakeWriter`] that prints
//! above the line with [`ProgressBar::suspend`] is all that is needed, without a new
//! dependency. `indicatif` draws the line only when stderr is a terminal (as before: off
//! otherwise, where the run logs a status line every few seconds instead).

use std::io::{self, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

/// The status line showing now, if any.
static LINE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn line() -> Option<ProgressBar> {
    LINE.lock().ok().and_then(|l| l.clone())
}

/// Writes `bytes` to stderr, above the status line when one shows.
///
/// # Errors
/// What writing to stderr fails with.
pub fn write_stderr(bytes: &[u8]) -> io::Result<()> {
    let write = || {
        let mut e = io::stderr().lock();
        e.write_all(bytes)?;
        e.flush()
    };
    match line() {
        Some(l) => l.suspend(write),
        None => write(),
    }
}

/// Prints `text` and a newline on stderr (what `eprintln!` does, without garbling the status
/// line); a failed write is ignored, as `eprintln!` would panic on it.
pub fn eprintln(text: &str) {
    let _ = write_stderr(format!("{text}\n").as_bytes());
}

/// A writer for one `tracing` event: collects it and writes it whole on flush or drop.
#[derive(Debug, Default)]
pub struct StderrWriter {
    buf: Vec<u8>,
}

impl Write for StderrWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = write_stderr(&self.buf);
        self.buf.clear();
        r
    }
}

impl Drop for StderrWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The [`MakeWriter`] of the `tracing` subscriber: stderr, above the status line.
#[derive(Debug, Default, Clone, Copy)]
pub struct MakeStderr;

impl<'a> MakeWriter<'a> for MakeStderr {
    type Writer = StderrWriter;
    fn make_writer(&'a self) -> StderrWriter {
        StderrWriter::default()
    }
}

/// Installs the `tracing` subscriber: `RUST_LOG` or `info`, on stderr through [`MakeStderr`],
/// coloured on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(MakeStderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false)
        .init();
}

/// The one-line status at the bottom of the terminal while it exists; what [`write_stderr`]
/// prints goes above it. Dropping it leaves the last status on screen.
pub struct StatusLine(ProgressBar);

impl StatusLine {
    /// Shows an (empty) status line on stderr, drawn only when stderr is a terminal.
    pub fn start() -> StatusLine {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if let Ok(mut l) = LINE.lock() {
            *l = Some(bar.clone());
        }
        StatusLine(bar)
    }

    /// Replaces the text of the line.
    pub fn set(&self, text: String) {
        self.0.set_message(text);
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        if let Ok(mut l) = LINE.lock() {
            *l = None;
        }
        self.0.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_written_whole_on_drop() {
        let mut w = MakeStderr.make_writer();
        w.write_all(b"term test: ").unwrap();
        w.write_all(b"one line\n").unwrap();
        assert_eq!(w.buf, b"term test: one line\n");
        drop(w);
    }
}
