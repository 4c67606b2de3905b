//! The v4l2loopback sink: writes frames to a virtual camera device that video-call apps read.
//!
//! Frames go through memory-mapped output buffers (REQBUFS/QBUF/DQBUF), never write(2), which
//! leaves v4l2loopback 0.12.x in a state that breaks the next writer. STREAMON is issued after the
//! first buffer is queued: with `exclusive_caps=1` the device only turns into a capture device for
//! readers once a writer streams. The device lookup ([`lookup`]), the format arithmetic and the
//! read-back check are pure functions, tested without a device; the ioctls live in
//! [`crate::v4l2`]. Each buffer taken for a frame is a [`crate::v4l2::Buffer`] guard: one not
//! queued (a failed QBUF) goes back to the queue instead of being lost.
//!
//! **One writer.** v4l2loopback itself accepts a second writer and interleaves both writers'
//! frames. Before it sets a format, the sink takes sdcam's lock on the device node and refuses a
//! device that another writer uses ("… is in use by another writer (…)"), whatever the module
//! options: another sdcam (its lock), a writer streaming with `exclusive_caps=1` (capture only),
//! a writer whose frames keep arriving with `exclusive_caps=0` (ffmpeg, OBS: a non-blocking read
//! probe), and on 0.13.x a writer the driver refuses the output buffers for (REQBUFS: EBUSY).
//! Left undetectable with `exclusive_caps=0`: a non-sdcam writer that has opened the device but
//! not written a frame yet (or pauses longer than the probe's window of four frame periods,
//! 0.3–2 s), and any non-sdcam writer while the driver's `sustain_framerate` control is on; see
//! [`crate::v4l2::writer`] for the driver code each signal relies on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::{LoopbackFormat, LoopbackOptions, Sink};
use crate::frame::{Frame, PixelFormat};
use crate::rate::format_fps;
use crate::stage::{StageError, StageInfo, StageResult};
use crate::v4l2::{
    self, fourcc_to_string, writer, BufType, FourCc, MmapQueue, PixFormat, V4l2Device, V4l2Env,
    VideoDevice, WriterEvidence,
};
use crate::Result;

pub mod lookup;
pub use lookup::{check_loopback, find_loopback, in_use_message};

/// Card label looked for when neither a device nor a label is given.
pub const DEFAULT_LABEL: &str = "sdcam";
/// Output buffers requested (v4l2loopback grants at most its `max_buffers`).
const OUTPUT_BUFFERS: u32 = 2;
/// How long `write` waits for a buffer to come back from the driver.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The format written to the device: size, code and the byte layout V4L2 expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLayout {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub fourcc: FourCc,
    /// Bytes per line (of the Y plane for I420).
    pub bytesperline: u32,
    /// Bytes per frame.
    pub sizeimage: u32,
}

/// The layout for a requested output format and size. Odd widths are rounded up to even (4:2:2
/// and 4:2:0 chroma covers pixel pairs); I420 also needs an even height. Returns the layout and
/// warnings about such adjustments.
pub fn output_layout(
    format: LoopbackFormat,
    width: u32,
    height: u32,
) -> Result<(OutputLayout, Vec<String>)> {
    if width == 0 || height == 0 {
        bail!("output size {width}x{height} is empty");
    }
    if width > 8192 || height > 8192 {
        bail!("output size {width}x{height} is too large (max 8192x8192)");
    }
    let mut warnings = Vec::new();
    let even_w = width.next_multiple_of(2);
    if even_w != width {
        warnings.push(format!(
            "output width {width} is odd; using {even_w} (YUV needs an even width)"
        ));
    }
    let (pixel, fourcc, even_h) = match format {
        LoopbackFormat::Yuyv => (PixelFormat::Yuyv, *b"YUYV", height),
        LoopbackFormat::I420 => (PixelFormat::I420, *b"YU12", height.next_multiple_of(2)),
    };
    if even_h != height {
        warnings.push(format!(
            "output height {height} is odd; using {even_h} (I420 needs an even height)"
        ));
    }
    let layout = pixel
        .layout(even_w as usize, even_h as usize)
        .with_context(|| format!("{pixel} has no raw layout"))?;
    // Within u32: the size is at most 8192x8192 (checked above).
    let (bytesperline, sizeimage) = (layout.plane(0).row_bytes as u32, layout.len() as u32);
    Ok((
        OutputLayout {
            width: even_w,
            height: even_h,
            format: pixel,
            fourcc,
            bytesperline,
            sizeimage,
        },
        warnings,
    ))
}

/// Checks what G_FMT reports against what was set.
pub fn check_readback(want: &OutputLayout, got: &PixFormat) -> Result<(), String> {
    if got.fourcc != want.fourcc || got.width != want.width || got.height != want.height {
        return Err(format!(
            "the driver kept {} {}x{} instead of {} {}x{}: the format is held by a program \
             still using the device (a viewer keeps it while streaming, or another writer); \
             close it, or keep the output size",
            fourcc_to_string(got.fourcc),
            got.width,
            got.height,
            fourcc_to_string(want.fourcc),
            want.width,
            want.height
        ));
    }
    if got.bytesperline != 0 && got.bytesperline != want.bytesperline {
        return Err(format!(
            "the driver wants {}-byte lines for {} {}x{}, sdcam writes {}-byte lines",
            got.bytesperline,
            fourcc_to_string(want.fourcc),
            want.width,
            want.height,
            want.bytesperline
        ));
    }
    if got.sizeimage != 0 && got.sizeimage < want.sizeimage {
        return Err(format!(
            "the driver's frame size {} is smaller than {} bytes",
            got.sizeimage, want.sizeimage
        ));
    }
    Ok(())
}

/// Writes frames to a v4l2loopback device through mmap output buffers.
pub struct LoopbackSink {
    /// `None` once finished.
    queue: Option<MmapQueue>,
    path: PathBuf,
    card: String,
    layout: OutputLayout,
    fps: f64,
    frames: u64,
}

impl LoopbackSink {
    /// Finds and opens the loopback device, sets the output format and rate, and maps buffers.
    /// Nothing is streamed until the first [`Sink::write`].
    pub fn open(opts: &LoopbackOptions) -> Result<LoopbackSink> {
        let (layout, warnings) = output_layout(opts.format, opts.width, opts.height)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let path = match &opts.device {
            Some(path) => path.clone(),
            None => {
                let label = opts.label.as_deref().unwrap_or(DEFAULT_LABEL);
                find_loopback(
                    &v4l2::probe_all_loopback_writers(),
                    label,
                    &V4l2Env::detect(),
                )
                .map_err(anyhow::Error::msg)?
            }
        };
        let dev = V4l2Device::open(&path).map_err(|e| {
            let hint = v4l2::open_hint(&e)
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            anyhow::Error::new(e).context(format!("opening loopback {}{hint}", path.display()))
        })?;
        let caps = dev
            .query_caps()
            .with_context(|| format!("{}: VIDIOC_QUERYCAP (not a V4L2 device?)", path.display()))?;
        // Another writer? The lock taken here is sdcam's claim while `dev` stays open.
        let mut info = VideoDevice::from_caps(path.clone(), &caps);
        if info.is_loopback {
            let found = writer::probe(&dev, &caps, true);
            tracing::debug!("{}: writer probe {found:?}", path.display());
            info.loopback_state = Some(writer::decide(&found));
        }
        check_loopback(&info).map_err(anyhow::Error::msg)?;

        let mut request = PixFormat::new(layout.width, layout.height, layout.fourcc);
        request.bytesperline = layout.bytesperline;
        request.sizeimage = layout.sizeimage;
        request.colorspace = v4l::v4l_sys::v4l2_colorspace_V4L2_COLORSPACE_SMPTE170M;
        request.quantization = v4l::v4l_sys::v4l2_quantization_V4L2_QUANTIZATION_LIM_RANGE;
        if let Err(e) = dev.set_format(BufType::VideoOutput, &request) {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            let what = format!(
                "{}: setting output format {} {}x{}",
                path.display(),
                fourcc_to_string(layout.fourcc),
                layout.width,
                layout.height
            );
            return Err(anyhow::Error::new(e).context(if busy {
                format!(
                    "{what}: device busy with another format (held by a viewer that is \
                     streaming, or another writer); close it, or keep the output size"
                )
            } else {
                what
            }));
        }
        let got = dev
            .get_format(BufType::VideoOutput)
            .with_context(|| format!("{}: reading back the output format", path.display()))?;
        check_readback(&layout, &got).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;

        match dev.set_frame_rate(BufType::VideoOutput, opts.fps) {
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "loopback {}: cannot set the output rate to {} fps: {e}",
                path.display(),
                format_fps(opts.fps)
            ),
        }

        let queue = MmapQueue::new(dev, BufType::VideoOutput, OUTPUT_BUFFERS).map_err(|e| {
            let busy = e
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::EBUSY));
            if busy {
                e.context(in_use_message(
                    &path,
                    &caps.card,
                    WriterEvidence::OutputBusy,
                ))
            } else {
                e
            }
        })?;
        for index in 0..queue.len() {
            let len = queue.buffer_len(index).unwrap_or(0);
            if len < layout.sizeimage as usize {
                bail!(
                    "{}: output buffer {index} has {len} bytes, a frame needs {}",
                    path.display(),
                    layout.sizeimage
                );
            }
        }
        let sink = LoopbackSink {
            queue: Some(queue),
            path,
            card: caps.card,
            layout,
            fps: opts.fps,
            frames: 0,
        };
        tracing::info!("{}", sink.describe());
        Ok(sink)
    }

    /// The output size actually used (the requested one, rounded up to even where needed).
    pub fn size(&self) -> (u32, u32) {
        (self.layout.width, self.layout.height)
    }

    /// The device path in use.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's descriptor, for [`crate::v4l2::clients::ClientWatcher`] (which subscribes
    /// to reader events on it); `None` once finished.
    pub fn writer_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // SAFETY: the queue's device owns the descriptor and outlives the borrow of `self`.
        self.queue
            .as_ref()
            .map(|q| unsafe { std::os::fd::BorrowedFd::borrow_raw(q.device().fd()) })
    }

    fn release(&mut self) {
        if let Some(mut queue) = self.queue.take() {
            if let Err(e) = queue.release() {
                tracing::warn!("loopback {}: closing: {e}", self.path.display());
            }
            tracing::debug!(
                "loopback {}: closed after {} frames",
                self.path.display(),
                self.frames
            );
        }
    }
}

impl Sink for LoopbackSink {
    fn viewers(&self) -> Option<Box<dyn super::ViewerWatch>> {
        let fd = self.writer_fd()?;
        match crate::v4l2::clients::ClientWatcher::new(&self.path, fd) {
            Ok(w) => Some(Box::new(w)),
            Err(e) => {
                tracing::warn!(
                    "{}: cannot count readers, staying live: {e:#}",
                    self.path.display()
                );
                None
            }
        }
    }
    fn write(&mut self, frame: &Frame) -> StageResult<()> {
        let layout = self.layout;
        if frame.format != layout.format
            || frame.width != layout.width
            || frame.height != layout.height
        {
            return Err(anyhow::anyhow!(
                "loopback {} takes {} {}x{} frames, got {} {}x{}",
                self.path.display(),
                layout.format,
                layout.width,
                layout.height,
                frame.format,
                frame.width,
                frame.height
            )
            .into());
        }
        let len = layout.sizeimage as usize;
        if frame.data.len() < len {
            return Err(anyhow::anyhow!(
                "{} frame {}x{} has {} bytes, needs {len}",
                frame.format,
                frame.width,
                frame.height,
                frame.data.len()
            )
            .into());
        }
        let path = &self.path;
        let Some(queue) = self.queue.as_mut() else {
            return Err(anyhow::anyhow!("loopback {} is closed", path.display()).into());
        };
        // An idle buffer, or the next one the driver is done with; a buffer not queued below
        // goes back to the queue when `buf` is dropped.
        let mut buf = queue
            .dequeue(WRITE_TIMEOUT)
            .with_context(|| format!("loopback {}: waiting for a free buffer", path.display()))
            .map_err(StageError::DeviceGone)?;
        buf.data_mut()[..len].copy_from_slice(&frame.data[..len]);
        buf.queue(len)
            .with_context(|| format!("loopback {}: VIDIOC_QBUF", path.display()))
            .map_err(StageError::DeviceGone)?;
        if !queue.is_streaming() {
            queue
                .stream_on()
                .with_context(|| format!("loopback {}: VIDIOC_STREAMON", path.display()))?;
            tracing::debug!("loopback {}: streaming", path.display());
        }
        self.frames += 1;
        Ok(())
    }

    fn wants(&self) -> PixelFormat {
        self.layout.format
    }

    fn describe(&self) -> String {
        format!(
            "loopback {} (\"{}\"): {} {}x{} @ {} fps",
            self.path.display(),
            self.card,
            fourcc_to_string(self.layout.fourcc),
            self.layout.width,
            self.layout.height,
            format_fps(self.fps)
        )
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: true,
            exclusive_device: true,
            reconnect_on_loss: true,
            buffers_frames: false,
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.release();
        Ok(())
    }
}

impl Drop for LoopbackSink {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_yuyv_and_i420() {
        let (l, w) = output_layout(LoopbackFormat::Yuyv, 640, 480).unwrap();
        assert!(w.is_empty());
        assert_eq!(
            (l.width, l.height, l.bytesperline, l.sizeimage),
            (640, 480, 1280, 614_400)
        );
        assert_eq!(l.fourcc, *b"YUYV");
        assert_eq!(l.format, PixelFormat::Yuyv);
        let (l, _) = output_layout(LoopbackFormat::I420, 512, 512).unwrap();
        assert_eq!((l.bytesperline, l.sizeimage), (512, 512 * 512 * 3 / 2));
        assert_eq!(l.fourcc, *b"YU12");
        assert_eq!(
            l.sizeimage as usize,
            PixelFormat::I420.frame_len(512, 512).unwrap()
        );
    }

    #[test]
    fn layout_rounds_odd_sizes() {
        let (l, w) = output_layout(LoopbackFormat::Yuyv, 641, 481).unwrap();
        assert_eq!((l.width, l.height), (642, 481));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("641"), "{w:?}");
        assert_eq!(
            l.sizeimage as usize,
            PixelFormat::Yuyv.frame_len(642, 481).unwrap()
        );
        let (l, w) = output_layout(LoopbackFormat::I420, 641, 481).unwrap();
        assert_eq!((l.width, l.height), (642, 482));
        assert_eq!(w.len(), 2);
        assert!(output_layout(LoopbackFormat::Yuyv, 0, 480).is_err());
    }

    #[test]
    fn readback_mismatch_is_explained() {
        let (l, _) = output_layout(LoopbackFormat::Yuyv, 640, 480).unwrap();
        let mut got = PixFormat::new(640, 480, *b"YUYV");
        got.bytesperline = 1280;
        got.sizeimage = 614_400;
        assert!(check_readback(&l, &got).is_ok());
        let other = PixFormat {
            width: 1280,
            height: 720,
            ..got
        };
        let err = check_readback(&l, &other).unwrap_err();
        assert!(
            err.contains("held by a program still using the device"),
            "{err}"
        );
        assert!(err.contains("YUYV 1280x720"), "{err}");
        let padded = PixFormat {
            bytesperline: 1344,
            ..got
        };
        assert!(check_readback(&l, &padded).unwrap_err().contains("1344"));
    }

    #[test]
    fn opening_a_missing_device_fails_cleanly() {
        let err = LoopbackSink::open(&LoopbackOptions {
            device: Some("/dev/video-missing-sdcam".into()),
            label: None,
            format: LoopbackFormat::Yuyv,
            width: 640,
            height: 480,
            fps: 30.0,
        })
        .err()
        .expect("no such device");
        let text = format!("{err:#}");
        assert!(
            text.contains("opening loopback /dev/video-missing-sdcam"),
            "{text}"
        );
    }
}
