//! V4L2 camera capture: finds the camera (by path or card name), negotiates a pixel format, size
//! and rate, and streams frames through memory-mapped buffers.
//!
//! The format choice is a pure function ([`choose_capture_format`]) so the policy is unit-tested
//! without a device. Device access goes through [`crate::devices`]; its [`MmapQueue`] is used
//! instead of `v4l::io::mmap::Stream` because that type panics in `Drop` when STREAMOFF fails with
//! an error other than ENODEV (USB cameras can report EIO on unplug), and the relay drops and
//! re-opens the camera every second while it is gone — teardown must never panic.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{CameraFormat, CameraOptions, Captured, Source, Wake};
use crate::devices::{
    self, format_fps, fourcc_to_string, FormatInfo, FourCc, FrameRates, FrameSizes, MmapQueue,
    PixFormat, V4l2Device, VideoDevice, BUF_TYPE_CAPTURE,
};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageError, StageInfo, StageResult};
use crate::Result;

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

/// A pixel format a camera offers, with its sizes and rates (what `enum_formats` returns).
pub type OfferedFormat = FormatInfo;

/// The outcome of format negotiation.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub fourcc: FourCc,
    pub width: u32,
    pub height: u32,
    /// The rate to request; `None` when the camera does not enumerate rates (ask for the wanted one).
    pub fps: Option<f64>,
    /// An explicit format was asked for but not offered; another one was chosen.
    pub fell_back: bool,
}

/// The sdcam pixel format for a camera fourcc (YUYV, NV12, RGB3, MJPG/JPEG).
pub fn pixel_format_for(fourcc: FourCc) -> Option<PixelFormat> {
    match &fourcc {
        b"YUYV" => Some(PixelFormat::Yuyv),
        b"NV12" => Some(PixelFormat::Nv12),
        b"RGB3" => Some(PixelFormat::Rgb24),
        b"MJPG" | b"JPEG" => Some(PixelFormat::Mjpeg),
        _ => None,
    }
}

/// Preference among equally good candidates (lower is better).
fn format_rank(fourcc: FourCc) -> u8 {
    match &fourcc {
        b"YUYV" => 0,
        b"NV12" => 1,
        b"RGB3" => 2,
        b"MJPG" => 3,
        _ => 4,
    }
}

fn matches_wanted(fourcc: FourCc, want: CameraFormat) -> bool {
    match want {
        CameraFormat::Auto => true,
        CameraFormat::Yuyv => &fourcc == b"YUYV",
        CameraFormat::Nv12 => &fourcc == b"NV12",
        CameraFormat::Rgb => &fourcc == b"RGB3",
        CameraFormat::Mjpeg => matches!(&fourcc, b"MJPG" | b"JPEG"),
    }
}

struct Candidate<'a> {
    fourcc: FourCc,
    width: u32,
    height: u32,
    rates: &'a FrameRates,
    compressed: bool,
}

impl Candidate<'_> {
    /// Sort key, smallest best:
    /// 1. exact size: uncompressed reaching the rate, MJPEG reaching it, uncompressed, MJPEG;
    /// 2. otherwise the closest size, sizes covering the request (both sides >= requested)
    ///    first, then by area difference; then reaching the rate, uncompressed, format rank.
    fn key(&self, want: &CameraOptions) -> (u8, bool, u64, bool, bool, u8) {
        let exact = self.width == want.width && self.height == want.height;
        let reaches = self.rates.reaches(want.fps);
        let tier = match (exact, self.compressed, reaches) {
            (true, false, true) => 0,
            (true, true, true) => 1,
            (true, false, false) => 2,
            (true, true, false) => 3,
            (false, ..) => 4,
        };
        let covers = self.width >= want.width && self.height >= want.height;
        let area = u64::from(self.width) * u64::from(self.height);
        let want_area = u64::from(want.width) * u64::from(want.height);
        (
            tier,
            !covers,
            area.abs_diff(want_area),
            !reaches,
            self.compressed,
            format_rank(self.fourcc),
        )
    }
}

static UNKNOWN_RATES: FrameRates = FrameRates::Unknown;

fn candidates<'a>(offered: &'a [OfferedFormat], want: &CameraOptions) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
    for f in offered {
        let Some(pixel) = pixel_format_for(f.fourcc) else {
            continue;
        };
        let compressed = pixel == PixelFormat::Mjpeg;
        match &f.sizes {
            // Sizes not enumerated: the driver will adjust whatever we ask for.
            FrameSizes::Discrete(list) if list.is_empty() => out.push(Candidate {
                fourcc: f.fourcc,
                width: want.width,
                height: want.height,
                rates: &UNKNOWN_RATES,
                compressed,
            }),
            FrameSizes::Discrete(list) => out.extend(list.iter().map(|s| Candidate {
                fourcc: f.fourcc,
                width: s.width,
                height: s.height,
                rates: &s.rates,
                compressed,
            })),
            FrameSizes::Stepwise(s) => {
                let (width, height) = s.clamp(want.width, want.height);
                out.push(Candidate {
                    fourcc: f.fourcc,
                    width,
                    height,
                    rates: &UNKNOWN_RATES,
                    compressed,
                });
            }
        }
    }
    out
}

/// Chooses the capture format, size and rate among what the camera offers.
///
/// With [`CameraFormat::Auto`]: an uncompressed format at exactly the requested size (that
/// reaches the requested rate), else MJPEG at that size, else the closest size in any supported
/// format (sizes at least as large as requested preferred, then by area difference). With an
/// explicit format: the best size in that format if the camera offers it, else the Auto choice
/// among the others (`fell_back` set). Stepwise/continuous sizes are clamped into their range.
/// `None` when the camera offers none of YUYV, MJPG/JPEG, NV12, RGB3.
pub fn choose_capture_format(offered: &[OfferedFormat], want: &CameraOptions) -> Option<Choice> {
    let all = candidates(offered, want);
    let wanted: Vec<&Candidate> = all
        .iter()
        .filter(|c| matches_wanted(c.fourcc, want.format))
        .collect();
    let fell_back = wanted.is_empty();
    let pool: Vec<&Candidate> = if fell_back {
        all.iter().collect()
    } else {
        wanted
    };
    let best = pool.into_iter().min_by_key(|c| c.key(want))?;
    Some(Choice {
        fourcc: best.fourcc,
        width: best.width,
        height: best.height,
        fps: best.rates.pick(want.fps),
        fell_back: fell_back && want.format != CameraFormat::Auto,
    })
}

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

/// Bytes per line of a tightly packed raw frame (Y plane for NV12).
fn packed_line(format: PixelFormat, width: u32) -> usize {
    let w = width as usize;
    match format {
        PixelFormat::Yuyv => w.div_ceil(2) * 4,
        PixelFormat::Rgb24 => w * 3,
        PixelFormat::Bgrx32 => w * 4,
        PixelFormat::Nv12 | PixelFormat::I420 | PixelFormat::Mjpeg => w,
    }
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
    let Some(len) = format.frame_len(width, height) else {
        bail!("{format} is not a raw format");
    };
    let line = packed_line(format, width);
    let stride = if bytesperline == 0 {
        line
    } else {
        bytesperline as usize
    };
    if stride < line {
        bail!("driver line length {stride} is shorter than a {width}-pixel {format} line ({line})");
    }
    let h = height as usize;
    // Rows of each plane: (bytes per row to keep, number of rows).
    let planes: &[(usize, usize)] = match format {
        PixelFormat::Nv12 => &[(line, h), (width.div_ceil(2) as usize * 2, h.div_ceil(2))],
        PixelFormat::I420 => &[
            (line, h),
            (width.div_ceil(2) as usize, h.div_ceil(2)),
            (width.div_ceil(2) as usize, h.div_ceil(2)),
        ],
        _ => &[(line, h)],
    };
    // V4L2 strides: the chroma plane of NV12 has the luma stride; I420 chroma has half of it.
    let strides: Vec<usize> = match format {
        PixelFormat::I420 => vec![stride, stride / 2, stride / 2],
        _ => vec![stride; planes.len()],
    };
    // Bytes up to the end of the last row kept.
    let mut needed = 0;
    let mut offset = 0;
    for (&(keep, rows), &s) in planes.iter().zip(&strides) {
        if rows > 0 {
            needed = offset + s * (rows - 1) + keep;
        }
        offset += s * rows;
    }
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
    let mut offset = 0;
    for (&(keep, rows), &s) in planes.iter().zip(&strides) {
        for r in 0..rows {
            let start = offset + r * s;
            out.extend_from_slice(&data[start..start + keep]);
        }
        offset += s * rows;
    }
    Ok(out)
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
            find_camera(&devices::probe_all_caps(), &opts.device)?
        };
        let dev = V4l2Device::open(&path).map_err(|e| {
            let hint = devices::open_hint(&e)
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
                if caps.effective() & v4l::v4l_sys::V4L2_CAP_VIDEO_CAPTURE_MPLANE != 0 {
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
            .enum_formats(BUF_TYPE_CAPTURE)
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
                BUF_TYPE_CAPTURE,
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
            match dev.set_frame_rate(BUF_TYPE_CAPTURE, target) {
                Ok(rate) => fps = rate,
                Err(e) => tracing::warn!(
                    "camera {}: cannot set {} fps: {e}",
                    path.display(),
                    format_fps(target)
                ),
            }
        }
        if let Ok(Some(rate)) = dev.frame_rate(BUF_TYPE_CAPTURE) {
            fps = Some(rate);
        }
        let fps = fps.unwrap_or(if target > 0.0 { target } else { 30.0 });

        let mut queue = MmapQueue::new(dev, BUF_TYPE_CAPTURE, CAPTURE_BUFFERS)?;
        for index in 0..queue.len() {
            queue
                .queue(index, 0)
                .with_context(|| format!("{}: queueing capture buffer {index}", path.display()))?;
        }
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

    /// Extracts the frame bytes of a dequeued buffer (`None`: skip this buffer).
    fn extract(&self, index: usize, bytesused: usize) -> Option<Result<Vec<u8>>> {
        let buf = self.queue.buffer(index);
        if self.format == PixelFormat::Mjpeg {
            let used = bytesused.min(buf.len());
            // Some cameras deliver empty or truncated frames while settling.
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
            self.format,
            self.width,
            self.height,
            self.bytesperline,
        ))
    }
}

impl Source for CameraSource {
    fn next_frame(&mut self) -> StageResult<Captured> {
        let mut bad = 0;
        let started = Instant::now();
        let timeout = frame_timeout(self.fps);
        loop {
            // Poll in short slices so that a wake (stop, source change) is seen promptly.
            let d = match self.queue.dequeue(POLL_SLICE) {
                Ok(d) => d,
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
            let data = if d.flags & v4l::v4l_sys::V4L2_BUF_FLAG_ERROR != 0 {
                None
            } else {
                self.extract(d.index, d.bytesused)
            };
            // Hand the buffer back before anything else can fail.
            self.queue
                .queue(d.index, 0)
                .with_context(|| format!("camera {}: re-queueing buffer", self.path.display()))?;
            let Some(data) = data else {
                bad += 1;
                tracing::debug!(
                    "camera {}: skipping a bad buffer (sequence {}, {} bytes)",
                    self.path.display(),
                    d.sequence,
                    d.bytesused
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
    use crate::devices::{DiscreteSize, StepwiseSizes};

    fn want(width: u32, height: u32, fps: f64, format: CameraFormat) -> CameraOptions {
        CameraOptions {
            device: "/dev/video0".into(),
            width,
            height,
            fps,
            format,
        }
    }

    fn webcam() -> Vec<OfferedFormat> {
        vec![
            FormatInfo::discrete(
                *b"YUYV",
                vec![
                    DiscreteSize::new(640, 480, &[30.0, 15.0]),
                    DiscreteSize::new(1280, 720, &[10.0, 5.0]),
                ],
            ),
            FormatInfo::discrete(
                *b"MJPG",
                vec![
                    DiscreteSize::new(640, 480, &[30.0]),
                    DiscreteSize::new(1280, 720, &[30.0, 15.0]),
                    DiscreteSize::new(1920, 1080, &[30.0]),
                ],
            ),
        ]
    }

    fn pick(offered: &[OfferedFormat], w: &CameraOptions) -> (String, u32, u32, Option<f64>, bool) {
        let c = choose_capture_format(offered, w).expect("a choice");
        (
            fourcc_to_string(c.fourcc),
            c.width,
            c.height,
            c.fps,
            c.fell_back,
        )
    }

    #[test]
    fn auto_prefers_uncompressed_at_exact_size() {
        let c = pick(&webcam(), &want(640, 480, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), false));
    }

    #[test]
    fn auto_takes_mjpeg_when_uncompressed_is_too_slow() {
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
        // At 10 fps YUYV is fast enough.
        let c = pick(&webcam(), &want(1280, 720, 10.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 1280, 720, Some(10.0), false));
    }

    #[test]
    fn auto_closest_size_prefers_larger() {
        // 512x512: 640x480 is closer in area but too short; 1280x720 covers it.
        let c = pick(&webcam(), &want(512, 512, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
        // 320x240 is smaller than everything: 640x480 YUYV reaches 30 fps.
        let c = pick(&webcam(), &want(320, 240, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), false));
        // Bigger than everything: the largest (closest) size.
        let c = pick(&webcam(), &want(3840, 2160, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1920, 1080, Some(30.0), false));
    }

    #[test]
    fn mjpeg_only_camera() {
        let offered = vec![
            FormatInfo::discrete(*b"H264", vec![DiscreteSize::new(1280, 720, &[30.0])]),
            FormatInfo::discrete(
                *b"MJPG",
                vec![
                    DiscreteSize::new(640, 480, &[30.0]),
                    DiscreteSize::new(1280, 720, &[30.0]),
                ],
            ),
        ];
        let c = pick(&offered, &want(640, 480, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 640, 480, Some(30.0), false));
        let c = pick(&offered, &want(640, 480, 30.0, CameraFormat::Yuyv));
        assert_eq!(c, ("MJPG".into(), 640, 480, Some(30.0), true));
    }

    #[test]
    fn jpeg_fourcc_counts_as_mjpeg() {
        let offered = vec![FormatInfo::discrete(
            *b"JPEG",
            vec![DiscreteSize::new(640, 480, &[])],
        )];
        let c = pick(&offered, &want(640, 480, 25.0, CameraFormat::Mjpeg));
        assert_eq!(c, ("JPEG".into(), 640, 480, None, false));
    }

    #[test]
    fn explicit_format_is_used_when_offered() {
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Yuyv));
        assert_eq!(c, ("YUYV".into(), 1280, 720, Some(10.0), false));
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Mjpeg));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
    }

    #[test]
    fn explicit_format_falls_back() {
        let c = pick(&webcam(), &want(640, 480, 30.0, CameraFormat::Nv12));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), true));
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Rgb));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), true));
    }

    #[test]
    fn stepwise_sizes_are_clamped() {
        let offered = vec![FormatInfo {
            fourcc: *b"YUYV",
            description: "YUYV 4:2:2".into(),
            compressed: false,
            sizes: FrameSizes::Stepwise(StepwiseSizes {
                min_width: 48,
                max_width: 1920,
                step_width: 8,
                min_height: 32,
                max_height: 1080,
                step_height: 2,
            }),
        }];
        let c = pick(&offered, &want(512, 512, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 512, 512, None, false));
        let c = pick(&offered, &want(4096, 2160, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 1920, 1080, None, false));
        let c = pick(&offered, &want(641, 479, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, None, false));
    }

    #[test]
    fn unsupported_only_gives_none() {
        let offered = vec![FormatInfo::discrete(
            *b"H264",
            vec![DiscreteSize::new(640, 480, &[30.0])],
        )];
        assert!(
            choose_capture_format(&offered, &want(640, 480, 30.0, CameraFormat::Auto)).is_none()
        );
        assert!(choose_capture_format(&[], &want(640, 480, 30.0, CameraFormat::Auto)).is_none());
    }

    #[test]
    fn nv12_and_rgb_are_ranked_after_yuyv() {
        let offered = vec![
            FormatInfo::discrete(*b"RGB3", vec![DiscreteSize::new(640, 480, &[30.0])]),
            FormatInfo::discrete(*b"NV12", vec![DiscreteSize::new(640, 480, &[30.0])]),
            FormatInfo::discrete(*b"YUYV", vec![DiscreteSize::new(640, 480, &[30.0])]),
        ];
        assert_eq!(
            pick(&offered, &want(640, 480, 30.0, CameraFormat::Auto)).0,
            "YUYV"
        );
        assert_eq!(
            pick(&offered[..2], &want(640, 480, 30.0, CameraFormat::Auto)).0,
            "NV12"
        );
    }

    fn dev(path: &str, driver: &str, card: &str, capture: bool) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: driver.into(),
            card: card.into(),
            is_loopback: driver == devices::LOOPBACK_DRIVER,
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
            dev("/dev/video10", devices::LOOPBACK_DRIVER, "sdcam", true),
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
            error: Some(devices::ProbeError {
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
