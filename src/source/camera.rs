//! V4L2 camera capture: finds the camera (by path or card name), negotiates a pixel format, size
//! and rate, and streams frames through memory-mapped buffers.
//!
//! The format choice is a pure function in [`negotiate`] ([`choose_capture_format`]) so the
//! policy is unit-tested without a device. Device access goes through [`crate::v4l2`]; its
//! [`MmapQueue`] is used instead of `v4l::io::mmap::Stream` because that type panics in `Drop`
//! when STREAMOFF fails with an error other than ENODEV (USB cameras can report EIO on unplug),
//! and the relay drops and re-opens the camera every second while it is gone — teardown must
//! never panic. Each dequeued buffer is a [`crate::v4l2::Buffer`] guard, queued again at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{CameraOptions, Captured, Source, Wake};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::rate::format_fps;
use crate::stage::{StageError, StageInfo, StageResult};
use crate::v4l2::{
    self, fourcc_to_string, BufType, FourCc, MmapQueue, PixFormat, V4l2Device, VideoDevice,
};
use crate::Result;

pub mod negotiate;
pub use negotiate::{choose_capture_format, pixel_format_for, Choice, OfferedFormat};

/// Capture buffers requested from the driver.
const CAPTURE_BUFFERS: u32 = 4;
/// How long `next_frame` waits for the camera before reporting it stalled or gone (or three
/// frame periods of a slow camera, if longer).
const FRAME_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest single poll for a frame: a stop or source change ([`Wake`]) is seen this soon.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// How long to wait for a frame from a camera running at `fps`.
fn frame_timeout(fps: f64) -> Duration {
    if fps.is_finite() && fps >= 0.01 {
        FRAME_TIMEOUT.max(Duration::from_secs_f64(3.0 / fps))
    } else {
        FRAME_TIMEOUT
    }
}
/// Consecutive bad (error-flagged or empty) buffers tolerated before giving up.
const MAX_BAD_BUFFERS: u32 = 30;

/// Picks the camera named `name` (case-insensitive substring of the card or driver name) among
/// probed devices; loopback devices and nodes without video capture are skipped.
pub fn find_camera(devices: &[VideoDevice], name: &str) -> Result<PathBuf> {
    let needle = name.to_lowercase();
    let cameras: Vec<&VideoDevice> = devices.iter().filter(|d| d.is_camera()).collect();
    if let Some(d) = cameras.iter().find(|d| {
        d.card.to_lowercase().contains(&needle) || d.driver.to_lowercase().contains(&needle)
    }) {
        return Ok(d.path.clone());
    }
    let unreadable: Vec<String> = devices
        .iter()
        .filter_map(|d| {
            d.error
                .as_ref()
                .map(|e| format!("{} ({})", d.path.display(), e.message))
        })
        .collect();
    let mut msg = if cameras.is_empty() {
        format!(
            "no camera matching \"{name}\": no V4L2 capture devices found (run `sdcam devices`; \
             check the camera is plugged in and that you may open /dev/video* — group `video`)"
        )
    } else {
        let list: Vec<String> = cameras
            .iter()
            .map(|d| format!("{} \"{}\" ({})", d.path.display(), d.card, d.driver))
            .collect();
        format!(
            "no camera matching \"{name}\"; cameras: {} (give a path or part of a name)",
            list.join(", ")
        )
    };
    if !unreadable.is_empty() {
        msg.push_str(&format!(
            "; could not open: {} (permissions? add your user to group `video`)",
            unreadable.join(", ")
        ));
    }
    bail!(msg)
}

/// Copies a raw frame out of a driver buffer whose lines are `bytesperline` apart (0: packed),
/// dropping the line padding. `data` must hold the whole frame (else an error).
pub fn unpad_frame(
    data: &[u8],
    format: PixelFormat,
    width: u32,
    height: u32,
    bytesperline: u32,
) -> Result<Vec<u8>> {
    let (w, h) = (width as usize, height as usize);
    let Some(packed) = format.layout(w, h) else {
        bail!("{format} is not a raw format");
    };
    let (len, line) = (packed.len(), packed.plane(0).row_bytes);
    let stride = if bytesperline == 0 {
        line
    } else {
        bytesperline as usize
    };
    if stride < line {
        bail!("driver line length {stride} is shorter than a {width}-pixel {format} line ({line})");
    }
    let Some(layout) = format.layout_with_stride(w, h, stride) else {
        bail!("{format} is not a raw format");
    };
    // Bytes up to the end of the last row kept.
    let needed = layout.data_end();
    if stride == line {
        if data.len() < len {
            bail!(
                "short buffer: {} bytes, a {width}x{height} {format} frame needs {len}",
                data.len()
            );
        }
        return Ok(data[..len].to_vec());
    }
    if data.len() < needed {
        bail!(
            "short buffer: {} bytes, a {width}x{height} {format} frame with {stride}-byte lines \
             needs {needed}",
            data.len()
        );
    }
    let mut out = Vec::with_capacity(len);
    for plane in layout.planes() {
        for r in 0..plane.rows {
            out.extend_from_slice(&data[plane.row(r)]);
        }
    }
    Ok(out)
}

/// The frame bytes of a filled capture buffer (`buf`: the whole mapping, of which the driver
/// says `bytesused` are used; 0: all). `None`: skip this buffer (an MJPEG frame that is empty or
/// does not start like a JPEG: some cameras deliver such while settling).
fn extract(
    buf: &[u8],
    bytesused: usize,
    format: PixelFormat,
    (width, height): (u32, u32),
    bytesperline: u32,
) -> Option<Result<Vec<u8>>> {
    if format == PixelFormat::Mjpeg {
        let used = bytesused.min(buf.len());
        if used < 4 || buf[0] != 0xFF || buf[1] != 0xD8 {
            return None;
        }
        return Some(Ok(buf[..used].to_vec()));
    }
    let used = if bytesused == 0 {
        buf.len()
    } else {
        bytesused.min(buf.len())
    };
    Some(unpad_frame(
        &buf[..used],
        format,
        width,
        height,
        bytesperline,
    ))
}

/// A V4L2 camera streaming through mmap buffers.
pub struct CameraSource {
    queue: MmapQueue,
    path: PathBuf,
    card: String,
    fourcc: FourCc,
    format: PixelFormat,
    width: u32,
    height: u32,
    bytesperline: u32,
    fps: f64,
    seq: u64,
    wake: Wake,
}

impl CameraSource {
    /// Opens the camera `opts.device` (a path, or part of a card/driver name), negotiates the
    /// format and rate and starts streaming. Safe to call repeatedly (reconnects).
    pub fn open(opts: &CameraOptions) -> Result<CameraSource> {
        let path = if opts.device.starts_with('/') {
            PathBuf::from(&opts.device)
        } else {
            find_camera(&v4l2::probe_all_caps(), &opts.device)?
        };
        let dev = V4l2Device::open(&path).map_err(|e| {
            let hint = v4l2::open_hint(&e)
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            anyhow::Error::new(e).context(format!("opening camera {}{hint}", path.display()))
        })?;
        let caps = dev
            .query_caps()
            .with_context(|| format!("{}: VIDIOC_QUERYCAP (not a V4L2 device?)", path.display()))?;
        if !caps.can_capture() {
            bail!(
                "{} ({}, driver {}) is not a video capture device (capabilities 0x{:08x}){}",
                path.display(),
                caps.card,
                caps.driver,
                caps.effective(),
                if caps
                    .flags()
                    .contains(v4l::capability::Flags::VIDEO_CAPTURE_MPLANE)
                {
                    "; multi-planar capture is not supported"
                } else {
                    ""
                }
            );
        }
        if !caps.can_stream() {
            bail!(
                "{} ({}) does not support streaming I/O",
                path.display(),
                caps.card
            );
        }

        let offered = dev
            .enum_formats(BufType::VideoCapture)
            .with_context(|| format!("{}: enumerating formats", path.display()))?;
        let choice = choose_capture_format(&offered, opts).ok_or_else(|| {
            let names: Vec<String> = offered.iter().map(|f| fourcc_to_string(f.fourcc)).collect();
            anyhow::anyhow!(
                "camera {} ({}) offers no format sdcam reads (offered: {}; supported: YUYV, MJPG, \
                 NV12, RGB3)",
                path.display(),
                caps.card,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })?;
        if choice.fell_back {
            tracing::warn!(
                "camera {} does not offer {:?}; using {} {}x{} instead",
                path.display(),
                opts.format,
                fourcc_to_string(choice.fourcc),
                choice.width,
                choice.height
            );
        }

        let got = dev
            .set_format(
                BufType::VideoCapture,
                &PixFormat::new(choice.width, choice.height, choice.fourcc),
            )
            .with_context(|| {
                format!(
                    "{}: setting format {} {}x{}",
                    path.display(),
                    fourcc_to_string(choice.fourcc),
                    choice.width,
                    choice.height
                )
            })?;
        let format = pixel_format_for(got.fourcc).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: asked for {}, the driver set {} which sdcam cannot read",
                path.display(),
                fourcc_to_string(choice.fourcc),
                fourcc_to_string(got.fourcc)
            )
        })?;
        if got.width == 0 || got.height == 0 {
            bail!(
                "{}: the driver set an empty frame size {}x{}",
                path.display(),
                got.width,
                got.height
            );
        }
        if (got.width, got.height) != (choice.width, choice.height) {
            tracing::info!(
                "camera {}: driver adjusted {}x{} to {}x{}",
                path.display(),
                choice.width,
                choice.height,
                got.width,
                got.height
            );
        }

        let target = choice.fps.unwrap_or(opts.fps);
        let mut fps = None;
        if target > 0.0 {
            match dev.set_frame_rate(BufType::VideoCapture, target) {
                Ok(rate) => fps = rate,
                Err(e) => tracing::warn!(
                    "camera {}: cannot set {} fps: {e}",
                    path.display(),
                    format_fps(target)
                ),
            }
        }
        if let Ok(Some(rate)) = dev.frame_rate(BufType::VideoCapture) {
            fps = Some(rate);
        }
        let fps = fps.unwrap_or(if target > 0.0 { target } else { 30.0 });

        let mut queue = MmapQueue::new(dev, BufType::VideoCapture, CAPTURE_BUFFERS)?;
        queue.queue_idle()?;
        queue
            .stream_on()
            .with_context(|| format!("{}: VIDIOC_STREAMON", path.display()))?;

        let source = CameraSource {
            queue,
            path,
            card: caps.card,
            fourcc: got.fourcc,
            format,
            width: got.width,
            height: got.height,
            bytesperline: got.bytesperline,
            fps,
            seq: 0,
            wake: Wake::new(),
        };
        tracing::info!("{}", source.describe());
        Ok(source)
    }

    /// The device path in use.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The negotiated frame size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The negotiated pixel format.
    pub fn pixel_format(&self) -> PixelFormat {
        self.format
    }
}

impl Source for CameraSource {
    fn next_frame(&mut self) -> StageResult<Captured> {
        let mut bad = 0;
        let started = Instant::now();
        let timeout = frame_timeout(self.fps);
        loop {
            // Poll in short slices so that a wake (stop, source change) is seen promptly.
            let buf = match self.queue.dequeue(POLL_SLICE) {
                Ok(buf) => buf,
                Err(e)
                    if e.kind() == std::io::ErrorKind::TimedOut && started.elapsed() < timeout =>
                {
                    if self.wake.take() {
                        return Ok(Captured::Interrupted);
                    }
                    continue;
                }
                Err(e) => {
                    return Err(StageError::DeviceGone(anyhow::Error::from(e).context(
                        format!(
                            "capturing from camera {} ({}): unplugged or stalled?",
                            self.path.display(),
                            self.card
                        ),
                    )))
                }
            };
            let data = if buf.is_error() {
                None
            } else {
                extract(
                    buf.data(),
                    buf.bytesused(),
                    self.format,
                    (self.width, self.height),
                    self.bytesperline,
                )
            };
            let (sequence, bytesused) = (buf.sequence(), buf.bytesused());
            // Hand the buffer back before anything else can fail.
            buf.queue(0)
                .with_context(|| format!("camera {}: re-queueing buffer", self.path.display()))?;
            let Some(data) = data else {
                bad += 1;
                tracing::debug!(
                    "camera {}: skipping a bad buffer (sequence {sequence}, {bytesused} bytes)",
                    self.path.display(),
                );
                if bad >= MAX_BAD_BUFFERS {
                    return Err(StageError::DeviceGone(anyhow::anyhow!(
                        "camera {}: {bad} bad buffers in a row",
                        self.path.display()
                    )));
                }
                continue;
            };
            let data = data.with_context(|| format!("camera {}", self.path.display()))?;
            let range = match self.format {
                PixelFormat::Yuyv | PixelFormat::Nv12 | PixelFormat::I420 => ColorRange::Limited,
                // JPEG (JFIF) and RGB samples are full range.
                _ => ColorRange::Full,
            };
            let mut frame = Frame::new(self.width, self.height, self.format, range, data)?;
            self.seq += 1;
            frame.seq = self.seq;
            frame.captured_at = Instant::now();
            return Ok(Captured::Frame(frame));
        }
    }

    fn describe(&self) -> String {
        format!(
            "camera {} ({}): {} {}x{} @ {} fps",
            self.path.display(),
            self.card,
            fourcc_to_string(self.fourcc),
            self.width,
            self.height,
            format_fps(self.fps)
        )
    }

    fn fps(&self) -> f64 {
        self.fps
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: true,
            exclusive_device: true,
            reconnect_on_loss: true,
            buffers_frames: false,
        }
    }

    fn set_wake(&mut self, wake: Wake) {
        self.wake = wake;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::CameraFormat;

    fn dev(path: &str, driver: &str, card: &str, capture: bool) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: driver.into(),
            card: card.into(),
            is_loopback: driver == v4l2::LOOPBACK_DRIVER,
            can_capture: capture,
            ..VideoDevice::default()
        }
    }

    #[test]
    fn camera_lookup_by_name() {
        let list = vec![
            dev(
                "/dev/video0",
                "uvcvideo",
                "Integrated Camera: Integrated C",
                true,
            ),
            dev(
                "/dev/video1",
                "uvcvideo",
                "Integrated Camera: Integrated C",
                false,
            ),
            dev("/dev/video2", "vivid", "vivid", true),
            dev("/dev/video10", v4l2::LOOPBACK_DRIVER, "sdcam", true),
        ];
        assert_eq!(
            find_camera(&list, "integrated").unwrap(),
            PathBuf::from("/dev/video0")
        );
        assert_eq!(
            find_camera(&list, "VIVID").unwrap(),
            PathBuf::from("/dev/video2")
        );
        assert_eq!(
            find_camera(&list, "uvc").unwrap(),
            PathBuf::from("/dev/video0")
        );
        let err = find_camera(&list, "sdcam").unwrap_err().to_string();
        assert!(err.contains("no camera matching \"sdcam\""), "{err}");
        assert!(err.contains("/dev/video0 \"Integrated Camera"), "{err}");
        assert!(err.contains("/dev/video2 \"vivid\""), "{err}");
        assert!(!err.contains("/dev/video10"), "{err}");
    }

    #[test]
    fn camera_lookup_with_no_cameras() {
        let denied = VideoDevice {
            path: "/dev/video0".into(),
            error: Some(v4l2::ProbeError {
                errno: Some(libc::EACCES),
                message: "Permission denied (os error 13)".into(),
            }),
            ..VideoDevice::default()
        };
        let err = find_camera(&[denied], "cam").unwrap_err().to_string();
        assert!(err.contains("no V4L2 capture devices found"), "{err}");
        assert!(err.contains("sdcam devices"), "{err}");
        assert!(err.contains("/dev/video0 (Permission denied"), "{err}");
        let err = find_camera(&[], "cam").unwrap_err().to_string();
        assert!(err.contains("group `video`"), "{err}");
    }

    #[test]
    fn unpad_packed_and_padded() {
        // 2x2 YUYV packed: 4 bytes a line.
        let data: Vec<u8> = (0..8).collect();
        assert_eq!(
            unpad_frame(&data, PixelFormat::Yuyv, 2, 2, 4).unwrap(),
            data
        );
        assert_eq!(
            unpad_frame(&data, PixelFormat::Yuyv, 2, 2, 0).unwrap(),
            data
        );
        // Extra bytes after the frame are dropped.
        let long: Vec<u8> = (0..12).collect();
        assert_eq!(
            unpad_frame(&long, PixelFormat::Yuyv, 2, 2, 4).unwrap(),
            data
        );
        // 6-byte lines: two padding bytes each.
        let padded = [0, 1, 2, 3, 99, 99, 4, 5, 6, 7, 99, 99];
        assert_eq!(
            unpad_frame(&padded, PixelFormat::Yuyv, 2, 2, 6).unwrap(),
            data
        );
        // Too short.
        let err = unpad_frame(&data[..7], PixelFormat::Yuyv, 2, 2, 4).unwrap_err();
        assert!(err.to_string().contains("short buffer"), "{err}");
        // Stride shorter than a line.
        assert!(unpad_frame(&data, PixelFormat::Yuyv, 2, 2, 2).is_err());
    }

    #[test]
    fn unpad_nv12() {
        // 2x2 NV12 with 4-byte stride: Y rows [1,2,_,_][3,4,_,_], UV row [5,6,_,_].
        let padded = [1, 2, 0, 0, 3, 4, 0, 0, 5, 6];
        assert_eq!(
            unpad_frame(&padded, PixelFormat::Nv12, 2, 2, 4).unwrap(),
            vec![1, 2, 3, 4, 5, 6]
        );
        let rgb: Vec<u8> = (0..12).collect();
        assert_eq!(unpad_frame(&rgb, PixelFormat::Rgb24, 2, 2, 6).unwrap(), rgb);
        assert!(unpad_frame(&rgb, PixelFormat::Mjpeg, 2, 2, 0).is_err());
    }

    #[test]
    fn extract_skips_bad_mjpeg_and_unpads_raw() {
        let jpeg = [0xFF, 0xD8, 1, 2, 3, 0, 0, 0];
        let got = extract(&jpeg, 5, PixelFormat::Mjpeg, (2, 2), 0);
        assert_eq!(got.unwrap().unwrap(), vec![0xFF, 0xD8, 1, 2, 3]);
        assert!(extract(&jpeg, 3, PixelFormat::Mjpeg, (2, 2), 0).is_none());
        assert!(extract(&[0u8; 8], 8, PixelFormat::Mjpeg, (2, 2), 0).is_none());
        // bytesused 0: the whole buffer; padding dropped.
        let padded = [0, 1, 2, 3, 99, 99, 4, 5, 6, 7, 99, 99];
        let got = extract(&padded, 0, PixelFormat::Yuyv, (2, 2), 6);
        assert_eq!(got.unwrap().unwrap(), (0..8).collect::<Vec<u8>>());
    }

    #[test]
    fn opening_a_missing_camera_fails_cleanly() {
        let err = CameraSource::open(&CameraOptions {
            device: "/dev/video-missing-sdcam".into(),
            width: 640,
            height: 480,
            fps: 30.0,
            format: CameraFormat::Auto,
        })
        .err()
        .expect("no such device");
        let text = format!("{err:#}");
        assert!(
            text.contains("opening camera /dev/video-missing-sdcam"),
            "{text}"
        );
    }
}
