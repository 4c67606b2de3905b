//! The v4l2loopback sink: writes frames to a virtual camera device that video-call apps read.
//!
//! Frames go through memory-mapped output buffers (REQBUFS/QBUF/DQBUF), never write(2), which
//! leaves v4l2loopback 0.12.x in a state that breaks the next writer. STREAMON is issued after the
//! first buffer is queued: with `exclusive_caps=1` the device only turns into a capture device for
//! readers once a writer streams. The device lookup, the format arithmetic and the read-back check
//! are pure functions, tested without a device; the ioctls live in [`crate::devices`].
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
//! [`crate::devices::writer`] for the driver code each signal relies on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::{LoopbackFormat, LoopbackOptions, Sink};
use crate::devices::{
    self, format_fps, fourcc_to_string, modprobe_hint, writer, FourCc, LoopbackState, MmapQueue,
    PixFormat, V4l2Device, V4l2Env, VideoDevice, WriterEvidence, BUF_TYPE_OUTPUT,
};
use crate::frame::{Frame, PixelFormat};
use crate::stage::{StageError, StageInfo, StageResult};
use crate::Result;

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
    let (bytesperline, sizeimage) = match format {
        LoopbackFormat::Yuyv => (even_w * 2, even_w * 2 * even_h),
        LoopbackFormat::I420 => (even_w, even_w * even_h * 3 / 2),
    };
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

fn permission_hint() -> &'static str {
    "add your user to the `video` group (sudo usermod -aG video $USER, then log in again) or \
     install the udev rule from udev/ (see README)"
}

/// Checks that a probed node is a v4l2loopback device that can take a writer now.
pub fn check_loopback(dev: &VideoDevice) -> Result<(), String> {
    let path = dev.path.display();
    if let Some(e) = &dev.error {
        return Err(if e.is_permission() {
            format!("cannot open {path}: {}; {}", e.message, permission_hint())
        } else {
            format!("cannot open {path}: {}", e.message)
        });
    }
    if !dev.is_loopback {
        return Err(format!(
            "{path} is not a v4l2loopback device (driver \"{}\", card \"{}\"); give the loopback \
             device (see `sdcam devices`)",
            dev.driver, dev.card
        ));
    }
    let state = dev
        .loopback_state
        .unwrap_or_else(|| LoopbackState::from_caps(dev.can_capture, dev.can_output));
    if let LoopbackState::InUse(why) = state {
        return Err(in_use_message(&dev.path, &dev.card, why));
    }
    if !dev.can_output {
        return Err(format!(
            "{path} (\"{}\") offers no video output; give the loopback device (see `sdcam devices`)",
            dev.card
        ));
    }
    Ok(())
}

/// The error for a loopback device that another writer uses: how sdcam knows, and what to do.
pub fn in_use_message(path: &Path, card: &str, why: WriterEvidence) -> String {
    format!(
        "{} (\"{card}\") is in use by another writer ({}); close the other program writing to \
         it, or load the module with devices=2 for a second device",
        path.display(),
        why.describe()
    )
}

/// Finds the loopback device with card label `label` among probed devices; the error says
/// exactly what to do (load the module, fix permissions, free the device, pick another label).
pub fn find_loopback(
    devices: &[VideoDevice],
    label: &str,
    env: &V4l2Env,
) -> Result<PathBuf, String> {
    let labelled: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback && d.card.trim() == label.trim())
        .collect();
    let usable = |d: &&&VideoDevice| d.can_output && !d.loopback_state.is_some_and(|s| s.in_use());
    if let Some(d) = labelled.iter().find(usable) {
        return Ok(d.path.clone());
    }
    if let Some(d) = labelled.first() {
        return Err(check_loopback(d).err().unwrap_or_default());
    }
    let load = format!(
        "Load the module: {} (install it with: sudo apt install v4l2loopback-dkms), or install \
         the files from udev/ (see README)",
        modprobe_hint(label)
    );
    let not_found = format!("no v4l2loopback device with card_label \"{label}\" found");
    if !env.v4l2_in_kernel && devices.is_empty() {
        return Err(format!(
            "{not_found}: this kernel has no V4L2 support (/sys/class/video4linux is missing); \
             run sdcam on a machine whose kernel has V4L2 and v4l2loopback"
        ));
    }
    if !env.loopback_loaded {
        return Err(format!(
            "{not_found}: the v4l2loopback module is not loaded. {load}"
        ));
    }
    let denied: Vec<String> = devices
        .iter()
        .filter(|d| d.error.as_ref().is_some_and(|e| e.is_permission()))
        .map(|d| d.path.display().to_string())
        .collect();
    if !denied.is_empty() {
        return Err(format!(
            "{not_found}: permission denied on {}; {}",
            denied.join(", "),
            permission_hint()
        ));
    }
    let others: Vec<String> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback)
        .map(|d| format!("{} (\"{}\")", d.path.display(), d.card))
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "{not_found}; loopback devices with other labels: {} — pass the device path, set the \
             label to match, or reload the module: sudo modprobe -r v4l2loopback && {}",
            others.join(", "),
            modprobe_hint(label)
        ));
    }
    Err(format!("{not_found}. {load}"))
}

/// Writes frames to a v4l2loopback device through mmap output buffers.
pub struct LoopbackSink {
    /// `None` once finished.
    queue: Option<MmapQueue>,
    path: PathBuf,
    card: String,
    layout: OutputLayout,
    fps: f64,
    /// Buffers not queued to the driver (all of them at first).
    free: Vec<usize>,
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
                    &devices::probe_all_loopback_writers(),
                    label,
                    &V4l2Env::detect(),
                )
                .map_err(anyhow::Error::msg)?
            }
        };
        let dev = V4l2Device::open(&path).map_err(|e| {
            let hint = devices::open_hint(&e)
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
        if let Err(e) = dev.set_format(BUF_TYPE_OUTPUT, &request) {
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
            .get_format(BUF_TYPE_OUTPUT)
            .with_context(|| format!("{}: reading back the output format", path.display()))?;
        check_readback(&layout, &got).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;

        match dev.set_frame_rate(BUF_TYPE_OUTPUT, opts.fps) {
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "loopback {}: cannot set the output rate to {} fps: {e}",
                path.display(),
                format_fps(opts.fps)
            ),
        }

        let queue = MmapQueue::new(dev, BUF_TYPE_OUTPUT, OUTPUT_BUFFERS).map_err(|e| {
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
            let len = queue.buffer(index).len();
            if len < layout.sizeimage as usize {
                bail!(
                    "{}: output buffer {index} has {len} bytes, a frame needs {}",
                    path.display(),
                    layout.sizeimage
                );
            }
        }
        let free = (0..queue.len()).rev().collect();
        let sink = LoopbackSink {
            queue: Some(queue),
            path,
            card: caps.card,
            layout,
            fps: opts.fps,
            free,
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
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                queue
                    .dequeue(WRITE_TIMEOUT)
                    .with_context(|| {
                        format!("loopback {}: waiting for a free buffer", path.display())
                    })
                    .map_err(StageError::DeviceGone)?
                    .index
            }
        };
        queue.buffer_mut(index)[..len].copy_from_slice(&frame.data[..len]);
        if let Err(e) = queue.queue(index, len) {
            self.free.push(index);
            return Err(StageError::DeviceGone(
                anyhow::Error::new(e).context(format!("loopback {}: VIDIOC_QBUF", path.display())),
            ));
        }
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
    use crate::devices::{LoopbackState, ProbeError, LOOPBACK_DRIVER};

    fn loopback(path: &str, card: &str, output: bool) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: LOOPBACK_DRIVER.into(),
            card: card.into(),
            is_loopback: true,
            can_output: output,
            can_capture: !output,
            loopback_state: Some(LoopbackState::from_caps(!output, output)),
            ..VideoDevice::default()
        }
    }

    fn camera(path: &str) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: "uvcvideo".into(),
            card: "HD Webcam".into(),
            can_capture: true,
            ..VideoDevice::default()
        }
    }

    const LOADED: V4l2Env = V4l2Env {
        v4l2_in_kernel: true,
        loopback_loaded: true,
    };

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
    fn finds_loopback_by_label() {
        let list = vec![
            camera("/dev/video0"),
            loopback("/dev/video10", "OBS Virtual Camera", true),
            loopback("/dev/video11", "sdcam", true),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
        assert_eq!(
            find_loopback(&list, "OBS Virtual Camera", &LOADED),
            Ok(PathBuf::from("/dev/video10"))
        );
    }

    #[test]
    fn busy_loopback_is_reported() {
        let list = vec![loopback("/dev/video10", "sdcam", false)];
        let err = find_loopback(&list, "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("in use by another writer"), "{err}");
        // A free one with the same label wins over a busy one.
        let list = vec![
            loopback("/dev/video10", "sdcam", false),
            loopback("/dev/video11", "sdcam", true),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
    }

    /// A loopback device with exclusive_caps=0 (both directions) in a given probe state.
    fn shared(path: &str, card: &str, state: LoopbackState) -> VideoDevice {
        VideoDevice {
            can_capture: true,
            can_output: true,
            loopback_state: Some(state),
            ..loopback(path, card, true)
        }
    }

    #[test]
    fn exclusive_caps_0_writers_are_reported() {
        for why in [
            WriterEvidence::SdcamLock,
            WriterEvidence::FramesArriving,
            WriterEvidence::OutputBusy,
        ] {
            let busy = shared("/dev/video10", "sdcam", LoopbackState::InUse(why));
            let err = find_loopback(std::slice::from_ref(&busy), "sdcam", &LOADED).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "/dev/video10 (\"sdcam\") is in use by another writer ({}); close the other \
                     program writing to it, or load the module with devices=2 for a second device",
                    why.describe()
                )
            );
            assert_eq!(check_loopback(&busy).unwrap_err(), err);
        }
        // No writer seen, or the probes cannot tell: the device is used.
        for state in [
            LoopbackState::NoWriterSeen,
            LoopbackState::Unknown("exclusive_caps=0: cannot tell"),
        ] {
            let d = shared("/dev/video10", "sdcam", state);
            assert!(check_loopback(&d).is_ok(), "{state:?}");
            assert_eq!(
                find_loopback(&[d], "sdcam", &LOADED),
                Ok(PathBuf::from("/dev/video10"))
            );
        }
        // A free one with the same label wins over one another program writes to.
        let list = vec![
            shared(
                "/dev/video10",
                "sdcam",
                LoopbackState::InUse(WriterEvidence::FramesArriving),
            ),
            shared("/dev/video11", "sdcam", LoopbackState::NoWriterSeen),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
    }

    #[test]
    fn in_use_wording_names_the_evidence() {
        let text = |why| in_use_message(Path::new("/dev/video10"), "sdcam", why);
        assert!(text(WriterEvidence::CaptureOnly).contains("(it only offers capture now)"));
        assert!(text(WriterEvidence::SdcamLock).contains("(another sdcam is writing to it)"));
        assert!(text(WriterEvidence::FramesArriving)
            .contains("(frames from another program keep arriving)"));
        assert!(text(WriterEvidence::OutputBusy).contains("EBUSY"));
    }

    #[test]
    fn module_not_loaded() {
        let env = V4l2Env {
            v4l2_in_kernel: true,
            loopback_loaded: false,
        };
        let err = find_loopback(&[camera("/dev/video0")], "sdcam", &env).unwrap_err();
        assert_eq!(
            err,
            "no v4l2loopback device with card_label \"sdcam\" found: the v4l2loopback module is \
             not loaded. Load the module: sudo modprobe v4l2loopback devices=1 video_nr=10 \
             card_label=sdcam exclusive_caps=1 max_buffers=2 (install it with: sudo apt install \
             v4l2loopback-dkms), or install the files from udev/ (see README)"
        );
    }

    #[test]
    fn no_v4l2_in_kernel() {
        let env = V4l2Env {
            v4l2_in_kernel: false,
            loopback_loaded: false,
        };
        let err = find_loopback(&[], "sdcam", &env).unwrap_err();
        assert!(err.contains("no V4L2 support"), "{err}");
    }

    #[test]
    fn permission_denied_and_other_labels() {
        let denied = VideoDevice {
            path: "/dev/video10".into(),
            error: Some(ProbeError {
                errno: Some(libc::EACCES),
                message: "Permission denied (os error 13)".into(),
            }),
            ..VideoDevice::default()
        };
        let err = find_loopback(&[denied], "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("permission denied on /dev/video10"), "{err}");
        assert!(err.contains("`video` group"), "{err}");
        let err = find_loopback(&[loopback("/dev/video10", "Dummy", true)], "sdcam", &LOADED)
            .unwrap_err();
        assert!(err.contains("/dev/video10 (\"Dummy\")"), "{err}");
        assert!(err.contains("card_label=sdcam"), "{err}");
        let err = find_loopback(&[], "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("sudo modprobe v4l2loopback"), "{err}");
    }

    #[test]
    fn explicit_path_checks() {
        assert!(check_loopback(&loopback("/dev/sdcam", "sdcam", true)).is_ok());
        let err = check_loopback(&camera("/dev/video0")).unwrap_err();
        assert!(
            err.contains("not a v4l2loopback device (driver \"uvcvideo\""),
            "{err}"
        );
        let err = check_loopback(&loopback("/dev/video10", "sdcam", false)).unwrap_err();
        assert!(err.contains("in use by another writer"), "{err}");
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
