//! Device discovery: which `/dev/video*` nodes exist, what each one is (camera, v4l2loopback
//! device, something else, unreadable) and whether V4L2 and v4l2loopback are there at all.
//! Probing is non-destructive: no format is set and nothing is streamed. The `sdcam devices`
//! report that prints the result is [`crate::cli::devices`].

use std::io;
use std::path::{Path, PathBuf};

use super::device::{BufType, Caps, V4l2Device};
use super::format::FormatInfo;
use super::writer::{self, LoopbackState};

/// The module parameters sdcam recommends (`card_label` is appended by [`modprobe_hint`]).
pub const MODPROBE_PARAMS: &str = "devices=1 video_nr=10";

/// Whether `/sys` says V4L2 and v4l2loopback are there (used for hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4l2Env {
    /// `/sys/class/video4linux` exists: the kernel has V4L2.
    pub v4l2_in_kernel: bool,
    /// `/sys/module/v4l2loopback` exists: the module is loaded.
    pub loopback_loaded: bool,
}

impl V4l2Env {
    /// Looks at `/sys`.
    pub fn detect() -> Self {
        V4l2Env {
            v4l2_in_kernel: Path::new("/sys/class/video4linux").exists(),
            loopback_loaded: Path::new("/sys/module/v4l2loopback").exists(),
        }
    }
}

/// The modprobe command line that creates a loopback device with this card label.
pub fn modprobe_hint(label: &str) -> String {
    let label = if label.chars().any(|c| c.is_whitespace() || c == ',') {
        format!("\"{label}\"")
    } else {
        label.to_string()
    };
    format!(
        "sudo modprobe v4l2loopback {MODPROBE_PARAMS} card_label={label} exclusive_caps=1 max_buffers=2"
    )
}

/// Why a device node could not be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    /// The OS error number, if the failure had one.
    pub errno: Option<i32>,
    /// The error as text (`"Permission denied (os error 13)"`).
    pub message: String,
}

impl ProbeError {
    fn from_io(e: &io::Error) -> Self {
        ProbeError {
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    /// Permission denied.
    pub fn is_permission(&self) -> bool {
        matches!(self.errno, Some(libc::EACCES | libc::EPERM))
    }
}

/// One `/dev/video*` node as `sdcam devices` sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VideoDevice {
    /// The device node.
    pub path: PathBuf,
    /// The driver's name (VIDIOC_QUERYCAP).
    pub driver: String,
    /// The device's name; for a loopback device its card label.
    pub card: String,
    /// Where the device sits; may be empty.
    pub bus_info: String,
    /// The driver is v4l2loopback.
    pub is_loopback: bool,
    /// Effective (per-node) single-planar capture capability.
    pub can_capture: bool,
    /// Effective (per-node) single-planar output capability.
    pub can_output: bool,
    /// Capture formats (cameras only, when probed with formats).
    pub formats: Vec<FormatInfo>,
    /// For loopback devices: whether a writer seems active.
    pub loopback_state: Option<LoopbackState>,
    /// Set when the node could not be opened or queried; the other fields are then empty.
    pub error: Option<ProbeError>,
}

impl VideoDevice {
    /// A camera: capture-capable and not a loopback.
    pub fn is_camera(&self) -> bool {
        self.error.is_none() && !self.is_loopback && self.can_capture
    }

    /// Fills the fields from QUERYCAP results.
    pub fn from_caps(path: PathBuf, caps: &Caps) -> Self {
        let is_loopback = caps.is_loopback();
        VideoDevice {
            path,
            driver: caps.driver.clone(),
            card: caps.card.clone(),
            bus_info: caps.bus_info.clone(),
            is_loopback,
            can_capture: caps.can_capture(),
            can_output: caps.can_output(),
            formats: Vec::new(),
            loopback_state: is_loopback
                .then(|| LoopbackState::from_caps(caps.can_capture(), caps.can_output())),
            error: None,
        }
    }
}

/// The `N` of `/dev/videoN`, if the name has that form.
pub fn video_index(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix("video")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sorts device paths by their number (`video2` before `video10`), others after by name.
pub fn sort_video_paths(paths: &mut [PathBuf]) {
    paths.sort_by(|a, b| {
        let ka = (video_index(a).unwrap_or(u32::MAX), a.as_os_str());
        let kb = (video_index(b).unwrap_or(u32::MAX), b.as_os_str());
        ka.cmp(&kb)
    });
}

/// `/dev/videoN` nodes, sorted numerically (none when `/dev` cannot be read).
pub fn video_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir("/dev") {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| video_index(p).is_some())
            .collect(),
        Err(e) => {
            tracing::debug!("reading /dev: {e}");
            Vec::new()
        }
    };
    sort_video_paths(&mut paths);
    paths
}

/// Probes one node: QUERYCAP, and for cameras (if `with_formats`) the capture formats, for
/// loopback devices (if `with_formats`) whether another writer is there ([`writer::probe`]).
/// Non-destructive: no format is set and nothing is streamed. A node that cannot be opened or
/// queried comes back with [`VideoDevice::error`] set.
pub fn probe(path: &Path, with_formats: bool) -> VideoDevice {
    probe_node(path, with_formats, with_formats)
}

fn probe_node(path: &Path, with_formats: bool, with_writer: bool) -> VideoDevice {
    let failed = |e: &io::Error| VideoDevice {
        path: path.to_path_buf(),
        error: Some(ProbeError::from_io(e)),
        ..VideoDevice::default()
    };
    let dev = match V4l2Device::open(path) {
        Ok(dev) => dev,
        Err(e) => return failed(&e),
    };
    let caps = match dev.query_caps() {
        Ok(caps) => caps,
        Err(e) => return failed(&e),
    };
    let mut info = VideoDevice::from_caps(path.to_path_buf(), &caps);
    if with_formats && info.is_camera() {
        match dev.enum_formats(BufType::VideoCapture) {
            Ok(formats) => info.formats = formats,
            Err(e) => tracing::debug!("{}: enumerating formats: {e}", path.display()),
        }
    }
    if with_writer && info.is_loopback {
        let found = writer::probe(&dev, &caps, false);
        tracing::debug!("{}: writer probe {found:?}", path.display());
        info.loopback_state = Some(writer::decide(&found));
    }
    info
}

/// Probes every `/dev/video*` node (capabilities only, no formats): cheap, for device lookup.
pub fn probe_all_caps() -> Vec<VideoDevice> {
    video_paths().iter().map(|p| probe(p, false)).collect()
}

/// Probes every `/dev/video*` node's capabilities, and for loopback devices whether another
/// writer is there (for picking a free virtual camera by label).
pub fn probe_all_loopback_writers() -> Vec<VideoDevice> {
    video_paths()
        .iter()
        .map(|p| probe_node(p, false, true))
        .collect()
}

/// Probes every `/dev/video*` node, with the formats of cameras.
pub fn probe_all() -> Vec<VideoDevice> {
    video_paths().iter().map(|p| probe(p, true)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_numerically() {
        let mut paths: Vec<PathBuf> = ["/dev/video10", "/dev/video2", "/dev/video0", "/dev/video1"]
            .iter()
            .map(PathBuf::from)
            .collect();
        sort_video_paths(&mut paths);
        let names: Vec<_> = paths.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            names,
            ["/dev/video0", "/dev/video1", "/dev/video2", "/dev/video10"]
        );
        assert_eq!(video_index(Path::new("/dev/video12")), Some(12));
        assert_eq!(video_index(Path::new("/dev/video-cam")), None);
        assert_eq!(video_index(Path::new("/dev/video")), None);
    }

    #[test]
    fn modprobe_quotes_labels_with_spaces() {
        assert!(modprobe_hint("My Cam").contains("card_label=\"My Cam\""));
    }

    #[test]
    fn probing_a_missing_node_reports_the_error() {
        let d = probe(Path::new("/dev/video-does-not-exist-sdcam"), true);
        assert_eq!(d.error.as_ref().and_then(|e| e.errno), Some(libc::ENOENT));
        assert!(!d.is_camera());
    }
}
