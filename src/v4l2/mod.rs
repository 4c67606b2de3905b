//! V4L2 device discovery (the `sdcam devices` command) and the thin ioctl layer shared by the
//! camera source ([`crate::source::camera`]) and the v4l2loopback sink ([`crate::sink::loopback`]).
//!
//! Everything that touches a device goes through [`V4l2Device`] (an owned file descriptor plus a
//! handful of safe ioctl wrappers) and [`MmapQueue`] (a memory-mapped buffer queue whose teardown
//! never panics). The rest of this module is pure logic (fourcc parsing, sorting device nodes,
//! rendering the report) and is unit-tested without devices.

use std::ffi::CString;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use v4l::v4l2::vidioc;
use v4l::v4l_sys as sys;

pub mod writer;
use crate::rate::{format_fps, fps_to_interval, interval_to_fps};
pub use writer::WriterEvidence;

/// `driver` field reported by VIDIOC_QUERYCAP for v4l2loopback devices.
pub const LOOPBACK_DRIVER: &str = "v4l2 loopback";
/// Single-planar video capture buffer type.
pub const BUF_TYPE_CAPTURE: u32 = sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE;
/// Single-planar video output buffer type.
pub const BUF_TYPE_OUTPUT: u32 = sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_OUTPUT;
/// The module parameters sdcam recommends (`card_label` is appended by [`modprobe_hint`]).
pub const MODPROBE_PARAMS: &str = "devices=1 video_nr=10";

/// A V4L2 four-character code as its four bytes (`*b"YUYV"`).
pub type FourCc = [u8; 4];

/// The numeric form of a fourcc, as V4L2 ioctls want it.
pub const fn fourcc_to_u32(code: FourCc) -> u32 {
    u32::from_le_bytes(code)
}

/// The byte form of a numeric fourcc.
pub const fn fourcc_from_u32(code: u32) -> FourCc {
    code.to_le_bytes()
}

/// Printable form of a fourcc: `"YUYV"`, trailing spaces trimmed (`"Y8"`), non-printable codes
/// in hex. The big-endian flag (bit 31) is shown as a `-BE` suffix.
pub fn fourcc_to_string(code: FourCc) -> String {
    let value = fourcc_to_u32(code);
    let be = value & (1 << 31) != 0;
    let bytes = fourcc_from_u32(value & !(1 << 31));
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        let s: String = bytes.iter().map(|&b| b as char).collect();
        let s = s.trim_end().to_string();
        if be {
            format!("{s}-BE")
        } else {
            s
        }
    } else {
        format!("0x{value:08x}")
    }
}

/// Parses a fourcc written as 1 to 4 printable ASCII characters (`"MJPG"`, `"Y8"`; shorter
/// codes are padded with spaces as V4L2 does). Case is kept: `"yuyv"` is not `"YUYV"`.
pub fn parse_fourcc(s: &str) -> Option<FourCc> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 4 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut code = [b' '; 4];
    code[..bytes.len()].copy_from_slice(bytes);
    Some(code)
}

/// Result of VIDIOC_QUERYCAP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caps {
    pub driver: String,
    pub card: String,
    pub bus_info: String,
    /// Capabilities of the whole physical device.
    pub capabilities: u32,
    /// Capabilities of this node (valid when `capabilities` has `V4L2_CAP_DEVICE_CAPS`).
    pub device_caps: u32,
}

impl Caps {
    fn from_raw(raw: &sys::v4l2_capability) -> Caps {
        Caps {
            driver: c_string_field(&raw.driver),
            card: c_string_field(&raw.card),
            bus_info: c_string_field(&raw.bus_info),
            capabilities: raw.capabilities,
            device_caps: raw.device_caps,
        }
    }

    /// The capabilities of this node: `device_caps` when the driver reports them, else `capabilities`.
    pub fn effective(&self) -> u32 {
        if self.capabilities & sys::V4L2_CAP_DEVICE_CAPS != 0 {
            self.device_caps
        } else {
            self.capabilities
        }
    }

    /// Single-planar video capture.
    pub fn can_capture(&self) -> bool {
        self.effective() & sys::V4L2_CAP_VIDEO_CAPTURE != 0
    }

    /// Single-planar video output.
    pub fn can_output(&self) -> bool {
        self.effective() & sys::V4L2_CAP_VIDEO_OUTPUT != 0
    }

    /// Streaming I/O (mmap buffers).
    pub fn can_stream(&self) -> bool {
        self.effective() & sys::V4L2_CAP_STREAMING != 0
    }

    /// Whether the node is a v4l2loopback device.
    pub fn is_loopback(&self) -> bool {
        self.driver == LOOPBACK_DRIVER
    }
}

/// A NUL-terminated fixed-size string field of a V4L2 struct.
fn c_string_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

/// Frame rates offered for one frame size.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum FrameRates {
    /// The driver does not enumerate intervals.
    #[default]
    Unknown,
    /// A list of rates, frames per second.
    Discrete(Vec<f64>),
    /// Any rate in a range (stepwise or continuous intervals).
    Range { min: f64, max: f64 },
}

impl FrameRates {
    /// The highest rate offered, if known.
    pub fn max(&self) -> Option<f64> {
        match self {
            FrameRates::Unknown => None,
            FrameRates::Discrete(list) => list.iter().copied().reduce(f64::max),
            FrameRates::Range { max, .. } => Some(*max),
        }
    }

    /// Whether `fps` can be reached (unknown rates are assumed to be reachable).
    pub fn reaches(&self, fps: f64) -> bool {
        self.max().is_none_or(|max| max + 0.01 >= fps)
    }

    /// The rate to ask for when `want` is wanted: the slowest listed rate at least as fast as
    /// `want`, else the fastest; a range is clamped. `None` when unknown.
    pub fn pick(&self, want: f64) -> Option<f64> {
        match self {
            FrameRates::Unknown => None,
            FrameRates::Discrete(list) => list
                .iter()
                .copied()
                .filter(|&f| f + 0.01 >= want)
                .reduce(f64::min)
                .or_else(|| self.max()),
            FrameRates::Range { min, max } => Some(want.clamp(*min, *max)),
        }
    }
}

/// One discrete frame size and its rates.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteSize {
    pub width: u32,
    pub height: u32,
    pub rates: FrameRates,
}

impl DiscreteSize {
    /// Convenience constructor with a list of rates (empty: unknown).
    pub fn new(width: u32, height: u32, fps: &[f64]) -> Self {
        let rates = if fps.is_empty() {
            FrameRates::Unknown
        } else {
            FrameRates::Discrete(fps.to_vec())
        };
        DiscreteSize {
            width,
            height,
            rates,
        }
    }
}

/// A stepwise (or, with steps of 1, continuous) range of frame sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepwiseSizes {
    pub min_width: u32,
    pub max_width: u32,
    pub step_width: u32,
    pub min_height: u32,
    pub max_height: u32,
    pub step_height: u32,
}

impl StepwiseSizes {
    /// The size in the range closest to `(width, height)`: clamped, then snapped to the step.
    pub fn clamp(&self, width: u32, height: u32) -> (u32, u32) {
        (
            clamp_step(width, self.min_width, self.max_width, self.step_width),
            clamp_step(height, self.min_height, self.max_height, self.step_height),
        )
    }
}

fn clamp_step(v: u32, min: u32, max: u32, step: u32) -> u32 {
    if max <= min {
        return min;
    }
    let step = step.max(1);
    let v = v.clamp(min, max);
    let k = (v - min + step / 2) / step;
    let r = min.saturating_add(k.saturating_mul(step));
    if r > max {
        r - step
    } else {
        r
    }
}

/// The frame sizes offered for one pixel format.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameSizes {
    Discrete(Vec<DiscreteSize>),
    Stepwise(StepwiseSizes),
}

/// One pixel format a device offers (VIDIOC_ENUM_FMT + ENUM_FRAMESIZES + ENUM_FRAMEINTERVALS).
#[derive(Debug, Clone, PartialEq)]
pub struct FormatInfo {
    pub fourcc: FourCc,
    /// The driver's description (`"YUYV 4:2:2"`); may be empty.
    pub description: String,
    pub compressed: bool,
    pub sizes: FrameSizes,
}

impl FormatInfo {
    /// A format with discrete sizes, for tests and synthetic lists.
    pub fn discrete(fourcc: FourCc, sizes: Vec<DiscreteSize>) -> Self {
        FormatInfo {
            fourcc,
            description: String::new(),
            compressed: matches!(&fourcc, b"MJPG" | b"JPEG" | b"H264" | b"HEVC"),
            sizes: FrameSizes::Discrete(sizes),
        }
    }

    /// `"640x480@30,1280x720@10"` or `"16x16-1920x1080 step 2x2"`.
    pub fn sizes_summary(&self) -> String {
        match &self.sizes {
            FrameSizes::Discrete(list) if list.is_empty() => "(sizes not enumerated)".to_string(),
            FrameSizes::Discrete(list) => list
                .iter()
                .map(|s| match s.rates.max() {
                    Some(fps) => format!("{}x{}@{}", s.width, s.height, format_fps(fps)),
                    None => format!("{}x{}", s.width, s.height),
                })
                .collect::<Vec<_>>()
                .join(","),
            FrameSizes::Stepwise(s) => format!(
                "{}x{}-{}x{} step {}x{}",
                s.min_width, s.min_height, s.max_width, s.max_height, s.step_width, s.step_height
            ),
        }
    }
}

/// The single-planar pixel format fields sdcam reads and writes (`struct v4l2_pix_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixFormat {
    pub width: u32,
    pub height: u32,
    pub fourcc: FourCc,
    pub field: u32,
    pub bytesperline: u32,
    pub sizeimage: u32,
    pub colorspace: u32,
    pub quantization: u32,
}

impl PixFormat {
    /// A format request with the given size and code, progressive, everything else left to the driver.
    pub fn new(width: u32, height: u32, fourcc: FourCc) -> Self {
        PixFormat {
            width,
            height,
            fourcc,
            field: sys::v4l2_field_V4L2_FIELD_NONE,
            bytesperline: 0,
            sizeimage: 0,
            colorspace: 0,
            quantization: 0,
        }
    }
}

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

/// A hint for a failure to open a device node, by errno.
pub fn open_hint(err: &io::Error) -> Option<&'static str> {
    match err.raw_os_error()? {
        libc::EACCES | libc::EPERM => Some(
            "permission denied: add your user to the `video` group (sudo usermod -aG video $USER, \
             then log in again) or install the udev rule from udev/ (see README)",
        ),
        libc::ENOENT | libc::ENXIO | libc::ENODEV => {
            Some("the device does not exist (unplugged?); `sdcam devices` lists what is there")
        }
        libc::EBUSY => Some("the device is in use by another program"),
        _ => None,
    }
}

/// Whether an I/O error means the device went away (unplugged, driver unbound).
pub fn is_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
}

/// An open V4L2 device node. Closed on drop.
#[derive(Debug)]
pub struct V4l2Device {
    fd: OwnedFd,
    path: PathBuf,
}

impl V4l2Device {
    /// Opens the node read-write and non-blocking (waits use [`V4l2Device::poll`]).
    pub fn open(path: &Path) -> io::Result<Self> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: c_path is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(V4l2Device {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw file descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Issues an ioctl, retrying on EINTR.
    ///
    /// # Safety
    /// `T` must be the argument type the kernel expects for `request`.
    unsafe fn ioctl<T>(&self, request: vidioc::_IOC_TYPE, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees that T matches the request; arg is a live &mut.
            match unsafe {
                v4l::v4l2::ioctl(self.fd(), request, arg as *mut T as *mut std::ffi::c_void)
            } {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// VIDIOC_QUERYCAP.
    pub fn query_caps(&self) -> io::Result<Caps> {
        // SAFETY: plain-old-data struct, zero is a valid value; matches VIDIOC_QUERYCAP.
        unsafe {
            let mut raw: sys::v4l2_capability = std::mem::zeroed();
            self.ioctl(vidioc::VIDIOC_QUERYCAP, &mut raw)?;
            Ok(Caps::from_raw(&raw))
        }
    }

    /// Enumerates the pixel formats of a buffer type, with their frame sizes and rates.
    /// Enumeration stops at the first error (EINVAL marks the end of each list).
    pub fn enum_formats(&self, buf_type: u32) -> io::Result<Vec<FormatInfo>> {
        let mut formats = Vec::new();
        for index in 0..64 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FMT.
            let desc = unsafe {
                let mut desc: sys::v4l2_fmtdesc = std::mem::zeroed();
                desc.index = index;
                desc.type_ = buf_type;
                match self.ioctl(vidioc::VIDIOC_ENUM_FMT, &mut desc) {
                    Ok(()) => desc,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) if index > 0 => {
                        tracing::debug!("{}: VIDIOC_ENUM_FMT {index}: {e}", self.path.display());
                        break;
                    }
                    Err(e) => return Err(e),
                }
            };
            let sizes = self.enum_sizes(desc.pixelformat);
            formats.push(FormatInfo {
                fourcc: fourcc_from_u32(desc.pixelformat),
                description: c_string_field(&desc.description),
                compressed: desc.flags & sys::V4L2_FMT_FLAG_COMPRESSED != 0,
                sizes,
            });
        }
        Ok(formats)
    }

    fn enum_sizes(&self, pixelformat: u32) -> FrameSizes {
        let mut sizes = Vec::new();
        for index in 0..256 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FRAMESIZES; the union member read is the
            // one the returned `type_` designates.
            unsafe {
                let mut raw: sys::v4l2_frmsizeenum = std::mem::zeroed();
                raw.index = index;
                raw.pixel_format = pixelformat;
                if self
                    .ioctl(vidioc::VIDIOC_ENUM_FRAMESIZES, &mut raw)
                    .is_err()
                {
                    break;
                }
                match raw.type_ {
                    sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_DISCRETE => {
                        let d = raw.__bindgen_anon_1.discrete;
                        sizes.push(DiscreteSize {
                            width: d.width,
                            height: d.height,
                            rates: self.enum_rates(pixelformat, d.width, d.height),
                        });
                    }
                    sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_CONTINUOUS
                    | sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_STEPWISE => {
                        let s = raw.__bindgen_anon_1.stepwise;
                        let continuous =
                            raw.type_ == sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_CONTINUOUS;
                        return FrameSizes::Stepwise(StepwiseSizes {
                            min_width: s.min_width,
                            max_width: s.max_width,
                            step_width: if continuous { 1 } else { s.step_width.max(1) },
                            min_height: s.min_height,
                            max_height: s.max_height,
                            step_height: if continuous { 1 } else { s.step_height.max(1) },
                        });
                    }
                    _ => break,
                }
            }
        }
        FrameSizes::Discrete(sizes)
    }

    fn enum_rates(&self, pixelformat: u32, width: u32, height: u32) -> FrameRates {
        let mut rates = Vec::new();
        for index in 0..64 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FRAMEINTERVALS; union read per `type_`.
            unsafe {
                let mut raw: sys::v4l2_frmivalenum = std::mem::zeroed();
                raw.index = index;
                raw.pixel_format = pixelformat;
                raw.width = width;
                raw.height = height;
                if self
                    .ioctl(vidioc::VIDIOC_ENUM_FRAMEINTERVALS, &mut raw)
                    .is_err()
                {
                    break;
                }
                match raw.type_ {
                    sys::v4l2_frmivaltypes_V4L2_FRMIVAL_TYPE_DISCRETE => {
                        let f = raw.__bindgen_anon_1.discrete;
                        if let Some(fps) = interval_to_fps(f.numerator, f.denominator) {
                            rates.push(fps);
                        }
                    }
                    _ => {
                        let s = raw.__bindgen_anon_1.stepwise;
                        // The longest interval is the slowest rate.
                        let slow = interval_to_fps(s.max.numerator, s.max.denominator);
                        let fast = interval_to_fps(s.min.numerator, s.min.denominator);
                        return match (slow, fast) {
                            (Some(min), Some(max)) => FrameRates::Range { min, max },
                            _ => FrameRates::Unknown,
                        };
                    }
                }
            }
        }
        if rates.is_empty() {
            FrameRates::Unknown
        } else {
            FrameRates::Discrete(rates)
        }
    }

    /// VIDIOC_G_FMT for a single-planar buffer type.
    pub fn get_format(&self, buf_type: u32) -> io::Result<PixFormat> {
        // SAFETY: POD struct; matches VIDIOC_G_FMT; `pix` is the member for single-planar types.
        unsafe {
            let mut raw: sys::v4l2_format = std::mem::zeroed();
            raw.type_ = buf_type;
            self.ioctl(vidioc::VIDIOC_G_FMT, &mut raw)?;
            Ok(pix_from_raw(&raw.fmt.pix))
        }
    }

    /// VIDIOC_S_FMT for a single-planar buffer type; returns what the driver made of it.
    pub fn set_format(&self, buf_type: u32, fmt: &PixFormat) -> io::Result<PixFormat> {
        // SAFETY: POD struct; matches VIDIOC_S_FMT; `pix` is the member for single-planar types.
        unsafe {
            let mut raw: sys::v4l2_format = std::mem::zeroed();
            raw.type_ = buf_type;
            raw.fmt.pix.width = fmt.width;
            raw.fmt.pix.height = fmt.height;
            raw.fmt.pix.pixelformat = fourcc_to_u32(fmt.fourcc);
            raw.fmt.pix.field = fmt.field;
            raw.fmt.pix.bytesperline = fmt.bytesperline;
            raw.fmt.pix.sizeimage = fmt.sizeimage;
            raw.fmt.pix.colorspace = fmt.colorspace;
            raw.fmt.pix.quantization = fmt.quantization;
            self.ioctl(vidioc::VIDIOC_S_FMT, &mut raw)?;
            Ok(pix_from_raw(&raw.fmt.pix))
        }
    }

    /// VIDIOC_S_PARM with `timeperframe` for `fps`; returns the rate the driver reports back.
    pub fn set_frame_rate(&self, buf_type: u32, fps: f64) -> io::Result<Option<f64>> {
        let (numerator, denominator) = fps_to_interval(fps);
        // SAFETY: POD struct; matches VIDIOC_S_PARM; capture/output member chosen by buf_type.
        unsafe {
            let mut raw: sys::v4l2_streamparm = std::mem::zeroed();
            raw.type_ = buf_type;
            let tpf = sys::v4l2_fract {
                numerator,
                denominator,
            };
            if buf_type == BUF_TYPE_OUTPUT {
                raw.parm.output.timeperframe = tpf;
            } else {
                raw.parm.capture.timeperframe = tpf;
            }
            self.ioctl(vidioc::VIDIOC_S_PARM, &mut raw)?;
            let got = if buf_type == BUF_TYPE_OUTPUT {
                raw.parm.output.timeperframe
            } else {
                raw.parm.capture.timeperframe
            };
            Ok(interval_to_fps(got.numerator, got.denominator))
        }
    }

    /// VIDIOC_G_PARM: the current frame rate, if the driver reports one.
    pub fn frame_rate(&self, buf_type: u32) -> io::Result<Option<f64>> {
        // SAFETY: POD struct; matches VIDIOC_G_PARM; capture/output member chosen by buf_type.
        unsafe {
            let mut raw: sys::v4l2_streamparm = std::mem::zeroed();
            raw.type_ = buf_type;
            self.ioctl(vidioc::VIDIOC_G_PARM, &mut raw)?;
            let got = if buf_type == BUF_TYPE_OUTPUT {
                raw.parm.output.timeperframe
            } else {
                raw.parm.capture.timeperframe
            };
            Ok(interval_to_fps(got.numerator, got.denominator))
        }
    }

    /// VIDIOC_G_CTRL: the value of control `id`.
    pub fn get_control(&self, id: u32) -> io::Result<i32> {
        // SAFETY: POD struct; matches VIDIOC_G_CTRL.
        unsafe {
            let mut raw: sys::v4l2_control = std::mem::zeroed();
            raw.id = id;
            self.ioctl(vidioc::VIDIOC_G_CTRL, &mut raw)?;
            Ok(raw.value)
        }
    }

    /// read(2) on the (non-blocking) node: EAGAIN is an [`io::ErrorKind::WouldBlock`] error.
    pub fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: reads at most buf.len() bytes into a live, writable buffer.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// VIDIOC_STREAMON.
    pub fn stream_on(&self, buf_type: u32) -> io::Result<()> {
        let mut t = buf_type as libc::c_int;
        // SAFETY: VIDIOC_STREAMON takes a pointer to an int buffer type.
        unsafe { self.ioctl(vidioc::VIDIOC_STREAMON, &mut t) }
    }

    /// VIDIOC_STREAMOFF.
    pub fn stream_off(&self, buf_type: u32) -> io::Result<()> {
        let mut t = buf_type as libc::c_int;
        // SAFETY: VIDIOC_STREAMOFF takes a pointer to an int buffer type.
        unsafe { self.ioctl(vidioc::VIDIOC_STREAMOFF, &mut t) }
    }

    /// Waits up to `timeout` for `events` (`libc::POLLIN`, `libc::POLLOUT`). Returns the
    /// reported events, 0 on timeout. Restarts on EINTR with the remaining time.
    pub fn poll(&self, events: i16, timeout: Duration) -> io::Result<i16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(if n == 0 { 0 } else { pfd.revents });
        }
    }
}

fn pix_from_raw(p: &sys::v4l2_pix_format) -> PixFormat {
    PixFormat {
        width: p.width,
        height: p.height,
        fourcc: fourcc_from_u32(p.pixelformat),
        field: p.field,
        bytesperline: p.bytesperline,
        sizeimage: p.sizeimage,
        colorspace: p.colorspace,
        quantization: p.quantization,
    }
}

/// A buffer handed back by VIDIOC_DQBUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dequeued {
    pub index: usize,
    pub bytesused: usize,
    pub flags: u32,
    pub sequence: u32,
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

/// Memory-mapped streaming buffers of one device and buffer type, owning the device.
///
/// We do this ourselves instead of using `v4l::io::mmap::Stream` because that type panics in
/// `Drop` when VIDIOC_STREAMOFF fails with anything but ENODEV (an unplugged USB camera can give
/// EIO, and a relay that reconnects every second must never panic), it does not release the
/// buffers with REQBUFS(0), and its output mode cannot STREAMON after the first QBUF as
/// v4l2loopback needs. Teardown here is: STREAMOFF, munmap, REQBUFS(0), close — errors are logged.
pub struct MmapQueue {
    dev: V4l2Device,
    buf_type: u32,
    maps: Vec<Mapping>,
    requested: bool,
    streaming: bool,
}

// SAFETY: the mappings are private to this queue (no aliases escape except through borrows of
// `self`), so moving the queue to another thread is as safe as moving a Vec<u8>.
unsafe impl Send for MmapQueue {}

impl MmapQueue {
    /// VIDIOC_REQBUFS(`count`, MMAP), then QUERYBUF and mmap each buffer. The driver may grant
    /// fewer buffers than asked; at least one is required.
    pub fn new(dev: V4l2Device, buf_type: u32, count: u32) -> crate::Result<Self> {
        let mut queue = MmapQueue {
            dev,
            buf_type,
            maps: Vec::new(),
            requested: false,
            streaming: false,
        };
        let path = queue.dev.path().display().to_string();
        let granted = queue
            .request(count)
            .with_context(|| format!("{path}: VIDIOC_REQBUFS({count} mmap buffers)"))?;
        queue.requested = true;
        if granted == 0 {
            anyhow::bail!("{path}: the driver granted no buffers (device busy?)");
        }
        for index in 0..granted {
            // SAFETY: POD struct; matches VIDIOC_QUERYBUF; `offset` is the member for MMAP.
            let (offset, length) = unsafe {
                let mut raw: sys::v4l2_buffer = std::mem::zeroed();
                raw.index = index;
                raw.type_ = buf_type;
                raw.memory = sys::v4l2_memory_V4L2_MEMORY_MMAP;
                queue
                    .dev
                    .ioctl(vidioc::VIDIOC_QUERYBUF, &mut raw)
                    .with_context(|| format!("{path}: VIDIOC_QUERYBUF {index}"))?;
                (raw.m.offset, raw.length as usize)
            };
            // SAFETY: maps `length` bytes of the device at the offset the driver gave us; the
            // result is checked against MAP_FAILED.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    queue.dev.fd(),
                    offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("{path}: mmap of buffer {index} ({length} bytes)"));
            }
            queue.maps.push(Mapping {
                ptr: ptr as *mut u8,
                len: length,
            });
        }
        Ok(queue)
    }

    fn request(&self, count: u32) -> io::Result<u32> {
        // SAFETY: POD struct; matches VIDIOC_REQBUFS.
        unsafe {
            let mut raw: sys::v4l2_requestbuffers = std::mem::zeroed();
            raw.count = count;
            raw.type_ = self.buf_type;
            raw.memory = sys::v4l2_memory_V4L2_MEMORY_MMAP;
            self.dev.ioctl(vidioc::VIDIOC_REQBUFS, &mut raw)?;
            Ok(raw.count)
        }
    }

    /// The device the buffers belong to.
    pub fn device(&self) -> &V4l2Device {
        &self.dev
    }

    /// Number of mapped buffers.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether no buffers are mapped (only after [`MmapQueue::release`]).
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Whether STREAMON has been issued.
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// The bytes of buffer `index` (its whole mapped length).
    pub fn buffer(&self, index: usize) -> &[u8] {
        let m = &self.maps[index];
        // SAFETY: the mapping is live for as long as self is, and has `len` bytes.
        unsafe { std::slice::from_raw_parts(m.ptr, m.len) }
    }

    /// The bytes of buffer `index`, writable (for output).
    pub fn buffer_mut(&mut self, index: usize) -> &mut [u8] {
        let m = &self.maps[index];
        // SAFETY: as in `buffer`; &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(m.ptr, m.len) }
    }

    /// VIDIOC_QBUF of buffer `index`. For output buffers, `bytesused` is the payload and the
    /// buffer is stamped progressive with the current CLOCK_MONOTONIC time.
    pub fn queue(&mut self, index: usize, bytesused: usize) -> io::Result<()> {
        if index >= self.maps.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer index {index} out of range"),
            ));
        }
        // SAFETY: POD struct; matches VIDIOC_QBUF; clock_gettime writes into a valid timespec.
        unsafe {
            let mut raw: sys::v4l2_buffer = std::mem::zeroed();
            raw.index = index as u32;
            raw.type_ = self.buf_type;
            raw.memory = sys::v4l2_memory_V4L2_MEMORY_MMAP;
            if self.buf_type == BUF_TYPE_OUTPUT {
                raw.bytesused = bytesused.min(self.maps[index].len) as u32;
                raw.field = sys::v4l2_field_V4L2_FIELD_NONE;
                let mut ts: libc::timespec = std::mem::zeroed();
                if libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) == 0 {
                    raw.timestamp.tv_sec = ts.tv_sec as _;
                    raw.timestamp.tv_usec = (ts.tv_nsec / 1000) as _;
                }
            }
            self.dev.ioctl(vidioc::VIDIOC_QBUF, &mut raw)
        }
    }

    /// Polls (POLLIN for capture, POLLOUT for output) for up to `timeout`, then VIDIOC_DQBUF.
    /// A timeout is an [`io::ErrorKind::TimedOut`] error.
    pub fn dequeue(&mut self, timeout: Duration) -> io::Result<Dequeued> {
        let events = if self.buf_type == BUF_TYPE_OUTPUT {
            libc::POLLOUT
        } else {
            libc::POLLIN
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let revents = self.dev.poll(events, left)?;
            if revents == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no buffer within {:.1} s", timeout.as_secs_f64()),
                ));
            }
            // SAFETY: POD struct; matches VIDIOC_DQBUF.
            let raw = unsafe {
                let mut raw: sys::v4l2_buffer = std::mem::zeroed();
                raw.type_ = self.buf_type;
                raw.memory = sys::v4l2_memory_V4L2_MEMORY_MMAP;
                match self.dev.ioctl(vidioc::VIDIOC_DQBUF, &mut raw) {
                    Ok(()) => raw,
                    // Spurious wake-up (or POLLERR before STREAMON): poll again until the deadline.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no buffer became ready",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            let index = raw.index as usize;
            if index >= self.maps.len() {
                return Err(io::Error::other(format!(
                    "driver returned buffer index {index} of {}",
                    self.maps.len()
                )));
            }
            return Ok(Dequeued {
                index,
                bytesused: raw.bytesused as usize,
                flags: raw.flags,
                sequence: raw.sequence,
            });
        }
    }

    /// VIDIOC_STREAMON.
    pub fn stream_on(&mut self) -> io::Result<()> {
        self.dev.stream_on(self.buf_type)?;
        self.streaming = true;
        Ok(())
    }

    /// STREAMOFF, munmap, REQBUFS(0). Idempotent; returns the first error (all steps are tried).
    /// ENODEV (device unplugged) is not an error here.
    pub fn release(&mut self) -> io::Result<()> {
        let mut first: Option<io::Error> = None;
        let mut note = |e: io::Error| {
            if !is_gone(&e) && first.is_none() {
                first = Some(e);
            }
        };
        if self.streaming {
            self.streaming = false;
            if let Err(e) = self.dev.stream_off(self.buf_type) {
                note(e);
            }
        }
        for m in self.maps.drain(..) {
            // SAFETY: each mapping was created by mmap with exactly this pointer and length and
            // is unmapped once (drain removes it).
            if unsafe { libc::munmap(m.ptr as *mut libc::c_void, m.len) } != 0 {
                note(io::Error::last_os_error());
            }
        }
        if self.requested {
            self.requested = false;
            if let Err(e) = self.request(0) {
                // Old drivers reject count 0; the buffers go away with the fd anyway.
                tracing::debug!("{}: VIDIOC_REQBUFS(0): {e}", self.dev.path().display());
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for MmapQueue {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("{}: releasing buffers: {e}", self.dev.path().display());
        }
    }
}

/// Whether a loopback device is being written to (see [`writer`] for how sdcam finds out).
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
        writer::decide(&writer::WriterProbe {
            can_capture,
            can_output,
            lock: writer::LockProbe::Unavailable,
            frames: writer::FrameProbe::NotProbed,
        })
    }

    /// Whether another writer was found.
    pub fn in_use(&self) -> bool {
        matches!(self, LoopbackState::InUse(_))
    }
}

/// Why a device node could not be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub errno: Option<i32>,
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
    pub path: PathBuf,
    pub driver: String,
    pub card: String,
    pub bus_info: String,
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

/// `/dev/videoN` nodes, sorted numerically.
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
/// Non-destructive: no format is set and nothing is streamed.
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
        match dev.enum_formats(BUF_TYPE_CAPTURE) {
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

/// The `sdcam devices` listing for the devices present now.
pub fn report() -> String {
    render_report(&probe_all(), &V4l2Env::detect())
}

/// Renders the `sdcam devices` listing for a list of probed devices.
pub fn render_report(devices: &[VideoDevice], env: &V4l2Env) -> String {
    let mut out = String::new();
    let cameras: Vec<&VideoDevice> = devices.iter().filter(|d| d.is_camera()).collect();
    let loopbacks: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback)
        .collect();
    let others: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && !d.is_loopback && !d.can_capture)
        .collect();
    let failed: Vec<&VideoDevice> = devices.iter().filter(|d| d.error.is_some()).collect();

    out.push_str("Cameras:\n");
    if cameras.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in &cameras {
        let _ = writeln!(
            out,
            "  {}  {} ({}{})",
            d.path.display(),
            d.card,
            d.driver,
            if d.bus_info.is_empty() {
                String::new()
            } else {
                format!(", {}", d.bus_info)
            }
        );
        if d.formats.is_empty() {
            out.push_str("    (no formats reported)\n");
        }
        for f in &d.formats {
            let _ = writeln!(
                out,
                "    {} {}",
                fourcc_to_string(f.fourcc),
                f.sizes_summary()
            );
        }
    }

    out.push_str("Loopback devices:\n");
    if loopbacks.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in &loopbacks {
        let state = match d.loopback_state {
            Some(LoopbackState::Free) => "free".to_string(),
            Some(LoopbackState::InUse(why)) => format!("in use by a writer ({})", why.describe()),
            Some(LoopbackState::NoWriterSeen) => {
                "free (exclusive_caps=0: no other sdcam, no frames arriving)".to_string()
            }
            Some(LoopbackState::Unknown(why)) => format!("free or in use ({why})"),
            None => "free or in use (not probed)".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}  card label \"{}\": {state}",
            d.path.display(),
            d.card
        );
    }

    if !others.is_empty() {
        out.push_str("Other video devices:\n");
        for d in &others {
            let _ = writeln!(
                out,
                "  {}  {} ({}): no video capture",
                d.path.display(),
                d.card,
                d.driver
            );
        }
    }
    if !failed.is_empty() {
        out.push_str("Unreadable devices:\n");
        for d in &failed {
            let err = d.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
            let _ = writeln!(out, "  {}: {err}", d.path.display());
        }
    }

    let mut hints = Vec::new();
    if !env.v4l2_in_kernel && devices.is_empty() {
        hints.push(
            "no /sys/class/video4linux: this kernel has no V4L2 support (containers and some \
             cloud kernels lack it); run sdcam on the machine with the camera"
                .to_string(),
        );
    } else if devices.is_empty() {
        hints.push("no /dev/video* nodes (check with `ls -l /dev/video*`)".to_string());
    }
    if failed
        .iter()
        .any(|d| d.error.as_ref().is_some_and(|e| e.is_permission()))
    {
        hints.push(
            "permission denied: add your user to the `video` group (sudo usermod -aG video \
             $USER, then log in again) or install the udev rule from udev/ (see README)"
                .to_string(),
        );
    }
    if loopbacks.is_empty() {
        let load = modprobe_hint("sdcam");
        if env.loopback_loaded {
            hints.push(format!(
                "v4l2loopback is loaded but has no readable device; reload it: sudo modprobe -r \
                 v4l2loopback && {load}"
            ));
        } else {
            hints.push(format!(
                "no virtual camera: load the module with: {load} (install it with: sudo apt \
                 install v4l2loopback-dkms), or install the files from udev/ (see README)"
            ));
        }
    }
    for h in hints {
        let _ = writeln!(out, "Hint: {h}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fourcc_round_trip_and_parse() {
        assert_eq!(fourcc_to_u32(*b"YUYV"), 0x5659_5559);
        assert_eq!(fourcc_from_u32(0x5659_5559), *b"YUYV");
        assert_eq!(fourcc_to_string(*b"MJPG"), "MJPG");
        assert_eq!(fourcc_to_string(*b"Y8  "), "Y8");
        assert_eq!(fourcc_to_string([1, 2, 3, 4]), "0x04030201");
        assert_eq!(parse_fourcc("RGB3"), Some(*b"RGB3"));
        assert_eq!(parse_fourcc("Y8"), Some(*b"Y8  "));
        assert_eq!(parse_fourcc(""), None);
        assert_eq!(parse_fourcc("TOOLONG"), None);
        assert_eq!(parse_fourcc("A B"), None);
    }

    #[test]
    fn rates_pick_and_reach() {
        let r = FrameRates::Discrete(vec![30.0, 15.0, 60.0]);
        assert_eq!(r.pick(25.0), Some(30.0));
        assert_eq!(r.pick(90.0), Some(60.0));
        assert!(r.reaches(60.0) && !r.reaches(61.0));
        let r = FrameRates::Range {
            min: 5.0,
            max: 60.0,
        };
        assert_eq!(r.pick(30.0), Some(30.0));
        assert_eq!(r.pick(100.0), Some(60.0));
        assert!(FrameRates::Unknown.reaches(1000.0));
        assert_eq!(FrameRates::Unknown.pick(30.0), None);
    }

    #[test]
    fn stepwise_clamp() {
        let s = StepwiseSizes {
            min_width: 16,
            max_width: 1920,
            step_width: 8,
            min_height: 16,
            max_height: 1080,
            step_height: 2,
        };
        assert_eq!(s.clamp(640, 480), (640, 480));
        assert_eq!(s.clamp(643, 479), (640, 480));
        assert_eq!(s.clamp(4000, 3000), (1920, 1080));
        assert_eq!(s.clamp(1, 1), (16, 16));
        // Snapping never leaves the range: 1917 would snap to 1920 > 1919, so 1912.
        assert_eq!(clamp_step(1917, 16, 1919, 8), 1912);
    }

    #[test]
    fn caps_effective() {
        let caps = Caps {
            driver: LOOPBACK_DRIVER.into(),
            card: "sdcam".into(),
            bus_info: String::new(),
            capabilities: sys::V4L2_CAP_DEVICE_CAPS
                | sys::V4L2_CAP_VIDEO_CAPTURE
                | sys::V4L2_CAP_VIDEO_OUTPUT,
            device_caps: sys::V4L2_CAP_VIDEO_OUTPUT | sys::V4L2_CAP_STREAMING,
        };
        assert!(caps.can_output() && !caps.can_capture() && caps.can_stream());
        assert!(caps.is_loopback());
        let old = Caps {
            capabilities: sys::V4L2_CAP_VIDEO_CAPTURE,
            device_caps: 0,
            ..caps
        };
        assert!(old.can_capture() && !old.can_output());
        assert_eq!(c_string_field(b"uvcvideo\0\0\0junk"), "uvcvideo");
    }

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

    fn camera() -> VideoDevice {
        VideoDevice {
            path: "/dev/video0".into(),
            driver: "uvcvideo".into(),
            card: "HD Webcam".into(),
            bus_info: "usb-0000:00:14.0-1".into(),
            can_capture: true,
            formats: vec![
                FormatInfo::discrete(
                    *b"YUYV",
                    vec![
                        DiscreteSize::new(640, 480, &[30.0, 15.0]),
                        DiscreteSize::new(1280, 720, &[10.0]),
                    ],
                ),
                FormatInfo::discrete(*b"MJPG", vec![DiscreteSize::new(1280, 720, &[30.0])]),
            ],
            ..VideoDevice::default()
        }
    }

    #[test]
    fn report_lists_cameras_and_loopbacks() {
        let loopback = VideoDevice {
            path: "/dev/video10".into(),
            driver: LOOPBACK_DRIVER.into(),
            card: "sdcam".into(),
            is_loopback: true,
            can_output: true,
            loopback_state: Some(LoopbackState::Free),
            ..VideoDevice::default()
        };
        let busy = VideoDevice {
            path: "/dev/video11".into(),
            card: "other".into(),
            can_capture: true,
            can_output: false,
            loopback_state: Some(LoopbackState::InUse(WriterEvidence::CaptureOnly)),
            ..loopback.clone()
        };
        let denied = VideoDevice {
            path: "/dev/video3".into(),
            error: Some(ProbeError {
                errno: Some(libc::EACCES),
                message: "Permission denied (os error 13)".into(),
            }),
            ..VideoDevice::default()
        };
        let env = V4l2Env {
            v4l2_in_kernel: true,
            loopback_loaded: true,
        };
        let writing = VideoDevice {
            path: "/dev/video12".into(),
            card: "ec0".into(),
            can_capture: true,
            loopback_state: Some(LoopbackState::InUse(WriterEvidence::FramesArriving)),
            ..loopback.clone()
        };
        let quiet = VideoDevice {
            path: "/dev/video13".into(),
            card: "ec0-quiet".into(),
            can_capture: true,
            loopback_state: Some(LoopbackState::NoWriterSeen),
            ..loopback.clone()
        };
        let text = render_report(&[camera(), denied, loopback, busy, writing, quiet], &env);
        assert!(
            text.contains(
                "/dev/video12  card label \"ec0\": in use by a writer (frames from another \
                 program keep arriving)"
            ),
            "{text}"
        );
        assert!(
            text.contains("/dev/video13  card label \"ec0-quiet\": free (exclusive_caps=0"),
            "{text}"
        );
        assert!(
            text.contains("/dev/video0  HD Webcam (uvcvideo, usb-0000:00:14.0-1)"),
            "{text}"
        );
        assert!(text.contains("    YUYV 640x480@30,1280x720@10\n"), "{text}");
        assert!(text.contains("    MJPG 1280x720@30\n"), "{text}");
        assert!(
            text.contains("/dev/video10  card label \"sdcam\": free"),
            "{text}"
        );
        assert!(
            text.contains(
                "/dev/video11  card label \"other\": in use by a writer (it only offers capture now)"
            ),
            "{text}"
        );
        assert!(text.contains("/dev/video3: Permission denied"), "{text}");
        assert!(text.contains("`video` group"), "{text}");
        assert!(!text.contains("modprobe"), "{text}");
    }

    #[test]
    fn report_hints_when_nothing_found() {
        let text = render_report(
            &[],
            &V4l2Env {
                v4l2_in_kernel: false,
                loopback_loaded: false,
            },
        );
        assert!(text.contains("Cameras:\n  (none)"), "{text}");
        assert!(text.contains("no V4L2 support"), "{text}");
        assert!(
            text.contains("sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=sdcam exclusive_caps=1 max_buffers=2"),
            "{text}"
        );
        let text = render_report(
            &[camera()],
            &V4l2Env {
                v4l2_in_kernel: true,
                loopback_loaded: false,
            },
        );
        assert!(!text.contains("V4L2 support"), "{text}");
        assert!(text.contains("v4l2loopback-dkms"), "{text}");
    }

    #[test]
    fn stepwise_summary() {
        let f = FormatInfo {
            fourcc: *b"YUYV",
            description: String::new(),
            compressed: false,
            sizes: FrameSizes::Stepwise(StepwiseSizes {
                min_width: 16,
                max_width: 1920,
                step_width: 2,
                min_height: 16,
                max_height: 1080,
                step_height: 2,
            }),
        };
        assert_eq!(f.sizes_summary(), "16x16-1920x1080 step 2x2");
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
