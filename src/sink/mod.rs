//! Output: where transformed frames go (v4l2loopback virtual camera, Y4M file/pipe, PNG folder, null).

pub mod loopback;
pub mod null;
pub mod png;
pub mod y4m;

use crate::frame::Frame;
use crate::stage::{StageInfo, StageResult};
pub use crate::v4l2::clients::Observation;
use crate::Result;

/// Counts the programs reading an output (see [`crate::v4l2::clients::ClientWatcher`]).
pub trait ViewerWatch: Send {
    /// Waits up to `timeout` (zero: no wait) for a change, then reports the counts.
    ///
    /// # Errors
    /// The wait itself fails (`poll(2)`).
    fn observe(&mut self, timeout: std::time::Duration) -> Result<Observation>;
    /// A full re-check (fresh driver count, full scan), so that a missed event does not last.
    fn recheck(&mut self) -> Observation;
}

impl ViewerWatch for crate::v4l2::clients::ClientWatcher {
    fn observe(&mut self, timeout: std::time::Duration) -> Result<Observation> {
        crate::v4l2::clients::ClientWatcher::observe(self, timeout)
    }
    fn recheck(&mut self) -> Observation {
        crate::v4l2::clients::ClientWatcher::recheck(self)
    }
}

/// A consumer of frames at the output size. The relay's output stage calls [`Sink::write`] at a
/// steady rate, repeating the last frame when the transform is late.
pub trait Sink: Send {
    /// Writes one frame (already converted to [`Sink::wants`] and to the output size).
    ///
    /// # Errors
    /// [`crate::stage::StageError::BrokenPipe`] when the reader of a pipe went away (the relay
    /// stops normally), [`crate::stage::StageError::DeviceGone`] when the device went away,
    /// anything else as [`crate::stage::StageError::Other`].
    fn write(&mut self, frame: &Frame) -> StageResult<()>;
    /// The pixel format this sink wants frames in.
    fn wants(&self) -> crate::frame::PixelFormat;
    /// Human-readable description for logs.
    fn describe(&self) -> String;
    /// What the sink is: live or not, holding an exclusive device or not, reconnected when lost
    /// or not, buffering frames or not.
    fn info(&self) -> StageInfo;
    /// Who reads this output, for the on-demand virtual camera: `None` for a sink without
    /// readers to count (files, null). Called when the sink opens; the watcher is dropped with
    /// the sink.
    fn viewers(&self) -> Option<Box<dyn ViewerWatch>> {
        None
    }
    /// Flushes and releases the output (stream off, file flush). Called once on graceful stop.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Pixel format written to a v4l2loopback device (`output.format` in a profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopbackFormat {
    #[default]
    Yuyv,
    I420,
}

/// Options for opening a v4l2loopback output device.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopbackOptions {
    /// Device path (`/dev/video10`, `/dev/sdcam`); takes precedence over `label`.
    pub device: Option<std::path::PathBuf>,
    /// The module's `card_label` to look for among `/dev/video*` (default `"sdcam"`).
    pub label: Option<String>,
    pub format: LoopbackFormat,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

/// Which sink to open, with its options (built from a profile's `[output]` table by
/// `crate::config::output_options`).
#[derive(Debug, Clone, PartialEq)]
pub enum SinkOptions {
    /// A v4l2loopback virtual camera.
    V4l2loopback(LoopbackOptions),
    /// A Y4M file, or stdout for `-`.
    Y4m {
        /// File path or `-`.
        path: String,
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
        /// Frames per second written into the header.
        fps: f64,
    },
    /// PNG files in a folder, every `every`-th frame.
    Png {
        /// The folder.
        dir: std::path::PathBuf,
        /// Write every Nth frame.
        every: u64,
    },
    /// Discards frames (benchmarks).
    Null,
}

impl SinkOptions {
    /// Whether `other` opens the same kind of sink (see [`crate::source::SourceOptions::same_kind`]).
    pub fn same_kind(&self, other: &SinkOptions) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Opens a sink.
///
/// # Errors
/// The device or file cannot be opened (the message says which and what to do).
pub fn open(options: &SinkOptions) -> Result<Box<dyn Sink>> {
    Ok(match options {
        SinkOptions::V4l2loopback(o) => Box::new(loopback::LoopbackSink::open(o)?),
        SinkOptions::Y4m {
            path,
            width,
            height,
            fps,
        } => Box::new(y4m::Y4mSink::create(path, *width, *height, *fps)?),
        SinkOptions::Png { dir, every } => Box::new(png::PngSink::create(dir, *every)?),
        SinkOptions::Null => Box::new(null::NullSink::new(crate::frame::PixelFormat::Yuyv)),
    })
}
