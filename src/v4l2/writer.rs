//! Is another program writing to a v4l2loopback device? (The virtual camera's own guard.)
//!
//! v4l2loopback takes any number of writers; their frames interleave and the viewer sees them
//! alternate. With `exclusive_caps=1` a device that a writer streams into offers only capture, so
//! QUERYCAP answers the question. With the module's default `exclusive_caps=0` the device always
//! offers both directions, and the driver flag that knows (`ready_for_output`, cleared by a
//! writer's STREAMON or write() and set again when a writer closes) is only reflected in QUERYCAP
//! when `exclusive_caps=1` (0.12.7 and 0.13.x: `vidioc_querycap`, `announce_all_caps`). So sdcam
//! combines three signals, cheapest first ([`decide`] is the pure rule, [`probe`] gathers them):
//!
//! 1. **sdcam's own lock**: a running sdcam holds `flock(LOCK_EX)` on the device node for as long
//!    as it writes (the lock lives on its open file, so it goes away with the process, even on
//!    SIGKILL). Another sdcam sees it at once, whatever the module options and version, even
//!    before the first one has written a frame.
//! 2. **Capabilities**: capture only (`exclusive_caps=1`) means a writer streams.
//! 3. **Frames arriving** (for other writers with `exclusive_caps=0`, e.g. ffmpeg or OBS): the
//!    probe reads the device non-blockingly with `read()` (1 byte). A fresh opener's read
//!    position starts at 0, so the first reads drain what was written since the device was last
//!    closed by everyone (`get_capture_buffer`: 0.12.7 jumps to `write_position - 1` when more
//!    than 2 frames behind, 0.13.x when more than `used_buffers` behind), then EAGAIN. A read that
//!    succeeds again within a few frame periods (the rate from VIDIOC_G_PARM) means a writer is
//!    writing now. Reading does not make the probe a reader on 0.12.x/0.13.x (`v4l2_loopback_read`
//!    goes straight to `get_capture_buffer`; no REQBUFS, no STREAMON) and costs nothing when
//!    nothing was ever written (the first read is EAGAIN: no wait). When frames are quiet the
//!    probe waits the whole window (0.3–2 s), e.g. when a viewer kept the device open across a
//!    writer's restart (the driver then keeps the old frames: `try_free_buffers` only resets
//!    when the last opener closes).
//!
//! The sink also maps a refused VIDIOC_REQBUFS on the output queue (EBUSY) to "in use": 0.13.x
//! refuses output buffers while another writer is attached (`vidioc_reqbufs`:
//! `V4L2_TYPE_IS_OUTPUT(b->type) && !dev->ready_for_output`), whatever `exclusive_caps`.
//!
//! What stays undetectable with `exclusive_caps=0`: on 0.12.x, a non-sdcam writer that has
//! opened the device and set the format but not yet written a frame, or that pauses for longer
//! than the probe window (0.13.x still refuses its buffers if it streams with mmap); a writer
//! while the `sustain_framerate` control is on (the driver repeats frames by itself, so frames
//! always arrive: reported as "cannot tell"); and on module versions after 0.13, whose `read()`
//! would claim the capture stream, the frame probe is not run (those versions refuse a second
//! writer's S_FMT/REQBUFS with EBUSY themselves).
//!
//! All of this is v4l2loopback behaviour that the `v4l` crate has no notion of: the lock is
//! `flock(2)` on the node, and the probes are VIDIOC_G_CTRL, VIDIOC_G_PARM and a non-blocking
//! `read(2)` through [`V4l2Device`] (see [`super::device`] for why those are hand-written).

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::device::{BufType, Caps, V4l2Device};

/// v4l2loopback's `sustain_framerate` control (`V4L2_CID_USER_BASE | 0xf000` + 1, 0.12.x–0.13.x).
pub const CID_SUSTAIN_FRAMERATE: u32 = 0x0098_0900 | 0xf000 | 1;
/// Reads of the probe's drain before it concludes that frames never stop coming.
const DRAIN_LIMIT: u32 = 16;
/// The sysfs file holding the loaded module's version (absent on 0.12.x).
const MODULE_VERSION_FILE: &str = "/sys/module/v4l2loopback/version";

/// Whether a loopback device is being written to (see the module doc for how sdcam finds out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopbackState {
    /// Output only (exclusive_caps=1 and no writer yet).
    Free,
    /// Another writer is there; how sdcam knows.
    InUse(WriterEvidence),
    /// Both directions advertised (exclusive_caps=0), no other sdcam and no frames arriving: no
    /// writer seen (one that has not written yet cannot be seen).
    NoWriterSeen,
    /// The probes cannot tell; why.
    Unknown(&'static str),
}

impl LoopbackState {
    /// From a loopback node's effective capabilities alone.
    pub fn from_caps(can_capture: bool, can_output: bool) -> Self {
        decide(&WriterProbe {
            can_capture,
            can_output,
            lock: LockProbe::Unavailable,
            frames: FrameProbe::NotProbed,
        })
    }

    /// Whether another writer was found.
    pub fn in_use(&self) -> bool {
        matches!(self, LoopbackState::InUse(_))
    }
}

/// How sdcam knows that another writer is there (worded to follow "in use by another writer").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEvidence {
    /// The device offers only capture (`exclusive_caps=1` and a writer streams).
    CaptureOnly,
    /// Another sdcam holds its lock on the device node.
    SdcamLock,
    /// Frames keep arriving from a writer (`exclusive_caps=0`).
    FramesArriving,
    /// The driver refused the output buffers with EBUSY (0.13.x: another writer is attached).
    OutputBusy,
}

impl WriterEvidence {
    /// The parenthesised reason in "is in use by another writer (…)".
    pub fn describe(self) -> &'static str {
        match self {
            WriterEvidence::CaptureOnly => "it only offers capture now",
            WriterEvidence::SdcamLock => "another sdcam is writing to it",
            WriterEvidence::FramesArriving => "frames from another program keep arriving",
            WriterEvidence::OutputBusy => "the driver refused the output buffers: EBUSY",
        }
    }
}

/// Whether another process holds sdcam's lock on the device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockProbe {
    /// Nobody else holds it (and, in the sink, this process now does).
    Free,
    /// Another process holds it.
    Held,
    /// flock is not supported on this node (or failed otherwise): no information.
    Unavailable,
}

/// What reading the device non-blockingly showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameProbe {
    /// Not run (the caps already decide, module after 0.13, or read() failed).
    NotProbed,
    /// Nothing was written since everyone last closed the device (first read EAGAIN).
    NothingWritten,
    /// Old frames only: no new frame within the window.
    Quiet,
    /// A new frame arrived within the window.
    Arriving,
    /// Frames arrive but the driver's `sustain_framerate` repeats them by itself.
    Ambiguous,
}

/// Everything the probes found on one loopback node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterProbe {
    /// The node offers single-planar capture now.
    pub can_capture: bool,
    /// The node offers single-planar output now.
    pub can_output: bool,
    /// What sdcam's lock showed.
    pub lock: LockProbe,
    /// What reading the node showed.
    pub frames: FrameProbe,
}

/// The rule: is another writer there? `Free` only when the capabilities say so
/// (`exclusive_caps=1`); with both directions advertised the answer is at best "no writer seen".
pub fn decide(p: &WriterProbe) -> LoopbackState {
    if p.lock == LockProbe::Held {
        return LoopbackState::InUse(WriterEvidence::SdcamLock);
    }
    match (p.can_capture, p.can_output) {
        (true, false) => LoopbackState::InUse(WriterEvidence::CaptureOnly),
        (false, true) => LoopbackState::Free,
        (false, false) => LoopbackState::Unknown("it offers neither capture nor output"),
        (true, true) => match p.frames {
            FrameProbe::Arriving => LoopbackState::InUse(WriterEvidence::FramesArriving),
            FrameProbe::NothingWritten | FrameProbe::Quiet => LoopbackState::NoWriterSeen,
            FrameProbe::Ambiguous => {
                LoopbackState::Unknown("sustain_framerate is on: the driver repeats frames")
            }
            FrameProbe::NotProbed => LoopbackState::Unknown("exclusive_caps=0: cannot tell"),
        },
    }
}

/// How long the frame probe waits for a new frame: four frame periods of the writer's rate,
/// between 0.3 and 2 s (30 fps when the driver reports no rate).
pub fn frame_window(fps: Option<f64>) -> Duration {
    let fps = fps.filter(|f| f.is_finite() && *f > 0.0).unwrap_or(30.0);
    Duration::from_secs_f64((4.0 / fps).clamp(0.3, 2.0))
}

/// Whether the read() probe is safe on this module version: 0.12.x has no version file
/// (`None`), 0.13.x reads without side effects; later versions turn a reader's read() into a
/// capture stream (`start_fileio`), so they are left alone.
pub fn read_probe_applies(module_version: Option<&str>) -> bool {
    let Some(v) = module_version else {
        return true;
    };
    let mut parts = v.trim().split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((major, minor), (Some(0), Some(m)) if m <= 13)
}

/// flock on the node: `exclusive` takes sdcam's writer lock and keeps it (until the file is
/// closed); otherwise a shared lock is taken and dropped at once, only to see whether another
/// process holds the writer lock.
pub fn lock(dev: &V4l2Device, exclusive: bool) -> LockProbe {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // A `sdcam devices` probe holds its shared lock for microseconds: retry a few times.
    for attempt in 0..5 {
        // SAFETY: flock on a file descriptor this process owns.
        if unsafe { libc::flock(dev.fd(), op) } == 0 {
            if !exclusive {
                // SAFETY: as above.
                unsafe { libc::flock(dev.fd(), libc::LOCK_UN) };
            }
            return LockProbe::Free;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::debug!("{}: flock: {e}", dev.path().display());
            return LockProbe::Unavailable;
        }
        if !exclusive || attempt == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    LockProbe::Held
}

/// The loaded v4l2loopback's version from sysfs (`None` on 0.12.x, which does not publish it).
pub fn module_version() -> Option<String> {
    std::fs::read_to_string(Path::new(MODULE_VERSION_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Reads the device non-blockingly to see whether frames are arriving (see the module doc).
pub fn probe_frames(dev: &V4l2Device) -> FrameProbe {
    let path = dev.path().display();
    let sustain = dev.get_control(CID_SUSTAIN_FRAMERATE).unwrap_or(0) != 0;
    let mut byte = [0u8; 1];
    let mut drained = 0;
    loop {
        match dev.read_nonblocking(&mut byte) {
            Ok(_) => {
                drained += 1;
                if drained >= DRAIN_LIMIT {
                    tracing::debug!("{path}: frames never stop coming ({drained} reads)");
                    return if sustain {
                        FrameProbe::Ambiguous
                    } else {
                        FrameProbe::Arriving
                    };
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::debug!("{path}: read probe: {e}");
                return FrameProbe::NotProbed;
            }
        }
    }
    if drained == 0 {
        return FrameProbe::NothingWritten;
    }
    if sustain {
        return FrameProbe::Ambiguous;
    }
    let window = frame_window(dev.frame_rate(BufType::VideoOutput).ok().flatten());
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        match dev.read_nonblocking(&mut byte) {
            Ok(_) => {
                tracing::debug!(
                    "{path}: a new frame after {:.0} ms",
                    start.elapsed().as_secs_f64() * 1000.0
                );
                return FrameProbe::Arriving;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() >= window {
                    tracing::debug!(
                        "{path}: {drained} old frame(s), none new in {} ms",
                        window.as_millis()
                    );
                    return FrameProbe::Quiet;
                }
            }
            Err(e) => {
                tracing::debug!("{path}: read probe: {e}");
                return FrameProbe::NotProbed;
            }
        }
    }
}

/// Gathers the signals for an open loopback node. `take_lock`: the sink takes sdcam's writer
/// lock (kept while `dev` stays open); a listing only looks. Frames are probed only when the
/// capabilities and the lock leave the question open.
pub fn probe(dev: &V4l2Device, caps: &Caps, take_lock: bool) -> WriterProbe {
    let mut p = WriterProbe {
        can_capture: caps.can_capture(),
        can_output: caps.can_output(),
        lock: lock(dev, take_lock),
        frames: FrameProbe::NotProbed,
    };
    if matches!(decide(&p), LoopbackState::Unknown(_))
        && p.can_capture
        && p.can_output
        && read_probe_applies(module_version().as_deref())
    {
        p.frames = probe_frames(dev);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(capture: bool, output: bool, lock: LockProbe, frames: FrameProbe) -> WriterProbe {
        WriterProbe {
            can_capture: capture,
            can_output: output,
            lock,
            frames,
        }
    }

    #[test]
    fn exclusive_caps_decide_alone() {
        use FrameProbe::*;
        use LockProbe::*;
        assert_eq!(
            decide(&probe(true, false, Free, NotProbed)),
            LoopbackState::InUse(WriterEvidence::CaptureOnly)
        );
        assert_eq!(
            decide(&probe(false, true, Free, NotProbed)),
            LoopbackState::Free
        );
        assert_eq!(
            decide(&probe(false, true, Unavailable, NotProbed)),
            LoopbackState::Free
        );
    }

    #[test]
    fn the_lock_wins_in_every_module_mode() {
        use FrameProbe::*;
        // Another sdcam that opened the device but has not streamed yet (output only), one that
        // streams (capture only), and one with exclusive_caps=0 whose frames are quiet.
        for (c, o, f) in [
            (false, true, NotProbed),
            (true, false, NotProbed),
            (true, true, Quiet),
            (true, true, NothingWritten),
        ] {
            assert_eq!(
                decide(&probe(c, o, LockProbe::Held, f)),
                LoopbackState::InUse(WriterEvidence::SdcamLock),
                "{c} {o} {f:?}"
            );
        }
    }

    #[test]
    fn exclusive_caps_0_goes_by_the_frames() {
        use FrameProbe::*;
        use LockProbe::*;
        assert_eq!(
            decide(&probe(true, true, Free, Arriving)),
            LoopbackState::InUse(WriterEvidence::FramesArriving)
        );
        assert_eq!(
            decide(&probe(true, true, Unavailable, Arriving)),
            LoopbackState::InUse(WriterEvidence::FramesArriving)
        );
        assert_eq!(
            decide(&probe(true, true, Free, Quiet)),
            LoopbackState::NoWriterSeen
        );
        assert_eq!(
            decide(&probe(true, true, Free, NothingWritten)),
            LoopbackState::NoWriterSeen
        );
        assert!(matches!(
            decide(&probe(true, true, Free, Ambiguous)),
            LoopbackState::Unknown(r) if r.contains("sustain_framerate")
        ));
        // Before the frames are probed the question is open: that is what makes `probe` read.
        assert!(matches!(
            decide(&probe(true, true, Free, NotProbed)),
            LoopbackState::Unknown(_)
        ));
        assert!(matches!(
            decide(&probe(false, false, Free, NotProbed)),
            LoopbackState::Unknown(_)
        ));
    }

    #[test]
    fn window_follows_the_rate() {
        assert_eq!(frame_window(Some(10.0)), Duration::from_millis(400));
        assert_eq!(frame_window(Some(30.0)), Duration::from_millis(300));
        assert_eq!(frame_window(Some(60.0)), Duration::from_millis(300));
        assert_eq!(frame_window(Some(1.0)), Duration::from_secs(2));
        assert_eq!(frame_window(None), Duration::from_millis(300));
        assert_eq!(frame_window(Some(0.0)), Duration::from_millis(300));
        assert_eq!(frame_window(Some(f64::NAN)), Duration::from_millis(300));
    }

    #[test]
    fn read_probe_only_on_known_versions() {
        assert!(read_probe_applies(None));
        assert!(read_probe_applies(Some("0.13.2\n")));
        assert!(read_probe_applies(Some("0.13.1-2-gdeadbee")));
        assert!(read_probe_applies(Some("0.12.7")));
        assert!(!read_probe_applies(Some("0.14.0")));
        assert!(!read_probe_applies(Some("0.15.1")));
        assert!(!read_probe_applies(Some("1.0")));
        assert!(!read_probe_applies(Some("snapshot")));
        assert!(!read_probe_applies(Some("")));
    }

    #[test]
    fn sustain_control_id() {
        assert_eq!(CID_SUSTAIN_FRAMERATE, 0x0098_f901);
    }
}
