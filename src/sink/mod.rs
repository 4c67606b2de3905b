//! Output: where transformed frames go (v4l2loopback virtual camera, Y4M file/pipe, PNG folder, null).

pub mod loopback;
pub mod null;
pub mod png;
pub mod y4m;

use crate::frame::Frame;
use crate::stage::{StageInfo, StageResult};
use crate::Result;

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
    /// Flushes and releases the output (stream off, file flush). Called once on graceful stop.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Pixel format written to a v4l2loopback device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Opens the sink a profile's `[output]` table describes.
pub fn open(cfg: &crate::profile::OutputConfig) -> Result<Box<dyn Sink>> {
    use crate::profile::{OutputFormatName, OutputKind};
    Ok(match cfg.kind {
        OutputKind::V4l2loopback => Box::new(loopback::LoopbackSink::open(&LoopbackOptions {
            device: cfg.device.as_ref().map(std::path::PathBuf::from),
            label: Some(cfg.label.clone()),
            format: match cfg.format {
                OutputFormatName::Yuyv => LoopbackFormat::Yuyv,
                OutputFormatName::I420 => LoopbackFormat::I420,
            },
            width: cfg.width,
            height: cfg.height,
            fps: cfg.fps,
        })?),
        OutputKind::Y4m => Box::new(y4m::Y4mSink::create(
            &cfg.path, cfg.width, cfg.height, cfg.fps,
        )?),
        OutputKind::Png => Box::new(png::PngSink::create(
            std::path::Path::new(&cfg.path),
            cfg.every,
        )?),
        OutputKind::Null => Box::new(null::NullSink::new(crate::frame::PixelFormat::Yuyv)),
    })
}
