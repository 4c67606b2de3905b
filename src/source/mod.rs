//! Capture: where frames come from (camera, screen, file, synthetic pattern).
//!
//! Every source produces [`Frame`]s in whatever pixel format it natively has; conversion to the
//! model's RGB happens in the relay's pre-processing step, on the capture thread.

pub mod camera;
pub mod image;
pub mod pacer;
pub mod pattern;
pub mod screen;
pub mod y4m;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::frame::Frame;
use crate::stage::{StageInfo, StageResult};
use crate::Result;

/// Wakes a source that waits for its next frame (a pacing sleep, a camera poll), so that a stop
/// or a source change does not wait one source period (10 s at 0.1 fps). A wake is kept until
/// a wait consumes it, so one sent just before the wait starts is not lost.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<(Mutex<bool>, Condvar)>);

impl Wake {
    pub fn new() -> Self {
        Self::default()
    }

    /// Interrupts the current wait, or the next one if none is running.
    pub fn wake(&self) {
        let (pending, cv) = &*self.0;
        *pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Takes a pending wake without waiting.
    pub fn take(&self) -> bool {
        std::mem::take(&mut *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sleeps until `deadline` unless woken first; returns true when woken (the wake is used up).
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let (pending, cv) = &*self.0;
        let mut woken = pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if std::mem::take(&mut *woken) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            woken = cv
                .wait_timeout(woken, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`Wake::sleep_until`] for a duration.
    pub fn sleep(&self, d: Duration) -> bool {
        self.sleep_until(Instant::now() + d)
    }
}

/// What [`Source::next_frame`] returned.
#[derive(Debug)]
pub enum Captured {
    /// A new frame.
    Frame(Frame),
    /// The source has no more frames (end of file); the relay stops when the queue drains.
    End,
    /// The wait for the next frame was interrupted by [`Wake::wake`]: nothing was captured; look
    /// at the stop flag and control messages, then ask again.
    Interrupted,
}

/// A producer of frames. Live sources (camera, screen, pattern) pace themselves: `next_frame`
/// blocks until the next frame is due. File sources return frames as fast as they are read unless
/// asked to pace ([`Source::set_realtime`]).
pub trait Source: Send {
    /// Blocks until the next frame is available.
    ///
    /// # Errors
    /// [`crate::stage::StageError::DeviceGone`] when the device went away (the relay reconnects
    /// a source whose [`Source::info`] says so); anything else as
    /// [`crate::stage::StageError::Other`].
    fn next_frame(&mut self) -> StageResult<Captured>;
    /// Human-readable description for logs and `stats` (device, size, format, rate).
    fn describe(&self) -> String;
    /// Nominal frame rate of the source, frames per second.
    fn fps(&self) -> f64;
    /// What the source is: live or not, holding an exclusive device or not, reconnected when
    /// lost or not.
    fn info(&self) -> StageInfo;
    /// Whether the source is live (a camera or screen: frames arrive in real time, stale ones
    /// are dropped): [`StageInfo::live`] of [`Source::info`].
    fn is_live(&self) -> bool {
        self.info().live
    }
    /// For file sources: pace frames at [`Source::fps`] as a camera would. Live sources ignore it.
    fn set_realtime(&mut self, _realtime: bool) {}
    /// The [`Wake`] that interrupts this source's waits ([`Captured::Interrupted`]). Sources
    /// that never wait long ignore it.
    fn set_wake(&mut self, _wake: Wake) {}
}

/// Preferred pixel format to negotiate with a camera (`source.format` in a profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraFormat {
    /// Let sdcam choose: the uncompressed format that reaches the requested size and rate, else MJPEG.
    #[default]
    Auto,
    Yuyv,
    Mjpeg,
    Nv12,
    Rgb,
}

/// Options for opening a V4L2 camera.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraOptions {
    /// A device path (`/dev/video0`) or a (case-insensitive substring of a) card name (`"vivid"`).
    pub device: String,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub format: CameraFormat,
}

/// Options for capturing an X11 screen.
#[derive(Debug, Clone, PartialEq)]
pub struct ScreenOptions {
    /// X display name (`":0"`); `None` uses `$DISPLAY`.
    pub display: Option<String>,
    /// Region to capture (x, y, width, height); `None` captures the whole root window.
    pub region: Option<(i32, i32, u32, u32)>,
    pub fps: f64,
}

/// Which source to open, with its options (built from a profile's `[source]` table by
/// `crate::config::source_options`).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceOptions {
    /// The animated test pattern at `width`×`height` pixels and `fps` frames per second.
    Pattern {
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
        /// Frames per second.
        fps: f64,
    },
    /// A V4L2 camera.
    Camera(CameraOptions),
    /// The X11 screen or a region of it.
    Screen(ScreenOptions),
    /// A Y4M video (`-` = stdin) or a still PNG/JPEG image, told apart by the file's signature.
    File {
        /// The path; `None` is an error at open ("a file source needs `path`").
        path: Option<String>,
        /// Frames per second of a still image (a Y4M video has its own rate).
        fps: f64,
        /// Start again at the end instead of ending the stream.
        looping: bool,
    },
}

impl SourceOptions {
    /// Whether `other` opens the same kind of source (a camera for a camera, …): the relay
    /// closes an exclusive device first only when it is replaced by one of its own kind.
    pub fn same_kind(&self, other: &SourceOptions) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Opens a source.
///
/// # Errors
/// The device, display or file cannot be opened or is not usable (the message says which and
/// what to do).
pub fn open(options: &SourceOptions) -> Result<Box<dyn Source>> {
    use anyhow::Context;
    Ok(match options {
        SourceOptions::Pattern { width, height, fps } => {
            Box::new(pattern::PatternSource::new(*width, *height, *fps))
        }
        SourceOptions::Camera(o) => Box::new(camera::CameraSource::open(o)?),
        SourceOptions::Screen(o) => Box::new(screen::ScreenSource::open(o)?),
        SourceOptions::File { path, fps, looping } => {
            let path = path.as_deref().context("a file source needs `path`")?;
            if path == "-" {
                return Ok(Box::new(y4m::Y4mSource::open(y4m::Y4mInput::Stdin, false)?));
            }
            let p = std::path::Path::new(path);
            let is_y4m = std::fs::File::open(p)
                .and_then(|mut f| {
                    let mut sig = [0u8; 9];
                    std::io::Read::read_exact(&mut f, &mut sig).map(|_| &sig == b"YUV4MPEG2")
                })
                .unwrap_or(false);
            if is_y4m {
                Box::new(y4m::Y4mSource::open(
                    y4m::Y4mInput::File(p.to_path_buf()),
                    *looping,
                )?)
            } else {
                Box::new(image::ImageSource::open(p, *fps, *looping)?)
            }
        }
    })
}
