//! An open V4L2 device node ([`V4l2Device`]) and the ioctls sdcam issues on it.
//!
//! **Why hand-written instead of `v4l::Device`.** The `v4l` crate (0.14) is used where it cannot
//! fail on what a driver returns: its buffer-type enum ([`BufType`]), capability and format flag
//! sets, and its decoding of the frame-size and frame-interval unions
//! (`FrameSizeEnum`/`FrameIntervalEnum::try_from`, so no union is read here). Its device API does
//! not fit sdcam, whose relay re-opens a vanished camera every second and must never panic:
//! - `Device::with_path` opens without `O_CLOEXEC` (the loopback writer lock, an `flock` on this
//!   file, must go away with the process), panics on a path with a NUL byte (a profile string),
//!   and its handle's `Drop` panics when `close` fails; nor can it adopt a descriptor opened here.
//! - `query_caps` panics on a card name that is not UTF-8 (a 32-byte field can cut a UTF-8 name
//!   mid-character) and reports only `device_caps`, which old drivers leave at 0.
//! - `format`/`set_format` panic on a colorspace, quantization, transfer function or field value
//!   the crate does not know; `enum_formats` panics on a description that is not UTF-8.
//! - `control` asks VIDIOC_QUERY_EXT_CTRL + G_EXT_CTRLS and panics on a control type it does not
//!   know; the v4l2loopback control sdcam reads is a plain VIDIOC_G_CTRL.
//! - It has no EINTR retry, no STREAMON/STREAMOFF outside its `Stream` (see [`super::queue`] for
//!   why that does not fit either) and no non-blocking `read` or deadline-keeping `poll`.
//!
//! Each wrapper below is a zeroed kernel struct, one ioctl (retried on EINTR) and a conversion.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use v4l::capability::Flags as CapFlags;
use v4l::format::description::Flags as FormatFlags;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::v4l2::vidioc;
use v4l::v4l_sys as sys;

use super::format::{DiscreteSize, FormatInfo, FrameRates, FrameSizes, PixFormat, StepwiseSizes};
use super::fourcc::{fourcc_from_u32, fourcc_to_u32};
use crate::rate::{fps_to_interval, interval_to_fps};

/// The buffer type of a queue or format (`VideoCapture` for cameras, `VideoOutput` for the
/// loopback sink): the `v4l` crate's `enum v4l2_buf_type`.
pub use v4l::buffer::Type as BufType;

/// `driver` field reported by VIDIOC_QUERYCAP for v4l2loopback devices.
pub const LOOPBACK_DRIVER: &str = "v4l2 loopback";

/// Result of VIDIOC_QUERYCAP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caps {
    /// The driver's name (`"uvcvideo"`, [`LOOPBACK_DRIVER`]).
    pub driver: String,
    /// The device's name (for v4l2loopback: its `card_label`).
    pub card: String,
    /// Where the device sits (`"usb-0000:00:14.0-1"`); may be empty.
    pub bus_info: String,
    /// Capabilities of the whole physical device (`V4L2_CAP_*` bits).
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
        if self.capabilities & CapFlags::DEVICE_CAPS.bits() != 0 {
            self.device_caps
        } else {
            self.capabilities
        }
    }

    /// [`Caps::effective`] as the `v4l` crate's flag set.
    pub fn flags(&self) -> CapFlags {
        CapFlags::from(self.effective())
    }

    /// Single-planar video capture.
    pub fn can_capture(&self) -> bool {
        self.flags().contains(CapFlags::VIDEO_CAPTURE)
    }

    /// Single-planar video output.
    pub fn can_output(&self) -> bool {
        self.flags().contains(CapFlags::VIDEO_OUTPUT)
    }

    /// Streaming I/O (mmap buffers).
    pub fn can_stream(&self) -> bool {
        self.flags().contains(CapFlags::STREAMING)
    }

    /// Whether the node is a v4l2loopback device.
    pub fn is_loopback(&self) -> bool {
        self.driver == LOOPBACK_DRIVER
    }
}

/// A NUL-terminated fixed-size string field of a V4L2 struct (lossy: never fails on bad UTF-8).
fn c_string_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
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

/// An open V4L2 device node. Closed on drop (a failing close is ignored, never a panic).
#[derive(Debug)]
pub struct V4l2Device {
    fd: OwnedFd,
    path: PathBuf,
}

impl V4l2Device {
    /// Opens the node read-write, non-blocking (waits use [`V4l2Device::poll`]) and
    /// close-on-exec.
    ///
    /// # Errors
    /// The `open(2)` error ([`open_hint`] explains the usual ones); `InvalidInput` for a path
    /// with a NUL byte.
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

    /// The raw file descriptor (for `flock`, `mmap`).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Issues an ioctl, retrying on EINTR.
    ///
    /// # Safety
    /// `T` must be the argument type the kernel expects for `request`.
    pub(super) unsafe fn ioctl<T>(
        &self,
        request: vidioc::_IOC_TYPE,
        arg: &mut T,
    ) -> io::Result<()> {
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
    ///
    /// # Errors
    /// The ioctl's error (ENOTTY: not a V4L2 device).
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
    ///
    /// # Errors
    /// The error of the first VIDIOC_ENUM_FMT unless it is EINVAL (no formats: an empty list).
    pub fn enum_formats(&self, buf_type: BufType) -> io::Result<Vec<FormatInfo>> {
        let mut formats = Vec::new();
        for index in 0..64 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FMT.
            let desc = unsafe {
                let mut desc: sys::v4l2_fmtdesc = std::mem::zeroed();
                desc.index = index;
                desc.type_ = buf_type as u32;
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
                compressed: FormatFlags::from(desc.flags).contains(FormatFlags::COMPRESSED),
                sizes,
            });
        }
        Ok(formats)
    }

    fn enum_sizes(&self, pixelformat: u32) -> FrameSizes {
        let mut sizes = Vec::new();
        for index in 0..256 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FRAMESIZES.
            let raw = unsafe {
                let mut raw: sys::v4l2_frmsizeenum = std::mem::zeroed();
                raw.index = index;
                raw.pixel_format = pixelformat;
                if self
                    .ioctl(vidioc::VIDIOC_ENUM_FRAMESIZES, &mut raw)
                    .is_err()
                {
                    break;
                }
                raw
            };
            let continuous = raw.type_ == sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_CONTINUOUS;
            match FrameSizeEnum::try_from(raw) {
                Ok(FrameSizeEnum::Discrete(d)) => sizes.push(DiscreteSize {
                    width: d.width,
                    height: d.height,
                    rates: self.enum_rates(pixelformat, d.width, d.height),
                }),
                Ok(FrameSizeEnum::Stepwise(s)) => {
                    return FrameSizes::Stepwise(StepwiseSizes {
                        min_width: s.min_width,
                        max_width: s.max_width,
                        step_width: if continuous { 1 } else { s.step_width.max(1) },
                        min_height: s.min_height,
                        max_height: s.max_height,
                        step_height: if continuous { 1 } else { s.step_height.max(1) },
                    });
                }
                Err(e) => {
                    tracing::debug!("{}: VIDIOC_ENUM_FRAMESIZES: {e}", self.path.display());
                    break;
                }
            }
        }
        FrameSizes::Discrete(sizes)
    }

    fn enum_rates(&self, pixelformat: u32, width: u32, height: u32) -> FrameRates {
        let mut rates = Vec::new();
        for index in 0..64 {
            // SAFETY: POD struct; matches VIDIOC_ENUM_FRAMEINTERVALS.
            let raw = unsafe {
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
                raw
            };
            match FrameIntervalEnum::try_from(raw) {
                Ok(FrameIntervalEnum::Discrete(f)) => {
                    if let Some(fps) = interval_to_fps(f.numerator, f.denominator) {
                        rates.push(fps);
                    }
                }
                Ok(FrameIntervalEnum::Stepwise(s)) => {
                    // The longest interval is the slowest rate.
                    let slow = interval_to_fps(s.max.numerator, s.max.denominator);
                    let fast = interval_to_fps(s.min.numerator, s.min.denominator);
                    return match (slow, fast) {
                        (Some(min), Some(max)) => FrameRates::Range { min, max },
                        _ => FrameRates::Unknown,
                    };
                }
                Err(e) => {
                    tracing::debug!("{}: VIDIOC_ENUM_FRAMEINTERVALS: {e}", self.path.display());
                    break;
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
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn get_format(&self, buf_type: BufType) -> io::Result<PixFormat> {
        // SAFETY: POD struct; matches VIDIOC_G_FMT; `pix` is the member for single-planar types.
        unsafe {
            let mut raw: sys::v4l2_format = std::mem::zeroed();
            raw.type_ = buf_type as u32;
            self.ioctl(vidioc::VIDIOC_G_FMT, &mut raw)?;
            Ok(pix_from_raw(&raw.fmt.pix))
        }
    }

    /// VIDIOC_S_FMT for a single-planar buffer type; returns what the driver made of it.
    ///
    /// # Errors
    /// The ioctl's error (EBUSY: the format is held by a streaming reader or writer).
    pub fn set_format(&self, buf_type: BufType, fmt: &PixFormat) -> io::Result<PixFormat> {
        // SAFETY: POD struct; matches VIDIOC_S_FMT; `pix` is the member for single-planar types.
        unsafe {
            let mut raw: sys::v4l2_format = std::mem::zeroed();
            raw.type_ = buf_type as u32;
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

    /// VIDIOC_S_PARM with `timeperframe` for `fps` (see [`fps_to_interval`]); returns the rate,
    /// frames per second, that the driver reports back.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn set_frame_rate(&self, buf_type: BufType, fps: f64) -> io::Result<Option<f64>> {
        let (numerator, denominator) = fps_to_interval(fps);
        let output = matches!(buf_type, BufType::VideoOutput);
        // SAFETY: POD struct; matches VIDIOC_S_PARM; capture/output member chosen by buf_type.
        unsafe {
            let mut raw: sys::v4l2_streamparm = std::mem::zeroed();
            raw.type_ = buf_type as u32;
            let tpf = sys::v4l2_fract {
                numerator,
                denominator,
            };
            if output {
                raw.parm.output.timeperframe = tpf;
            } else {
                raw.parm.capture.timeperframe = tpf;
            }
            self.ioctl(vidioc::VIDIOC_S_PARM, &mut raw)?;
            let got = if output {
                raw.parm.output.timeperframe
            } else {
                raw.parm.capture.timeperframe
            };
            Ok(interval_to_fps(got.numerator, got.denominator))
        }
    }

    /// VIDIOC_G_PARM: the current frame rate, frames per second, if the driver reports one.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn frame_rate(&self, buf_type: BufType) -> io::Result<Option<f64>> {
        let output = matches!(buf_type, BufType::VideoOutput);
        // SAFETY: POD struct; matches VIDIOC_G_PARM; capture/output member chosen by buf_type.
        unsafe {
            let mut raw: sys::v4l2_streamparm = std::mem::zeroed();
            raw.type_ = buf_type as u32;
            self.ioctl(vidioc::VIDIOC_G_PARM, &mut raw)?;
            let got = if output {
                raw.parm.output.timeperframe
            } else {
                raw.parm.capture.timeperframe
            };
            Ok(interval_to_fps(got.numerator, got.denominator))
        }
    }

    /// VIDIOC_G_CTRL: the value of control `id`.
    ///
    /// # Errors
    /// The ioctl's error (EINVAL: no such control).
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
    ///
    /// # Errors
    /// The `read(2)` error (EINTR is retried).
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
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn stream_on(&self, buf_type: BufType) -> io::Result<()> {
        let mut t = buf_type as libc::c_int;
        // SAFETY: VIDIOC_STREAMON takes a pointer to an int buffer type.
        unsafe { self.ioctl(vidioc::VIDIOC_STREAMON, &mut t) }
    }

    /// VIDIOC_STREAMOFF.
    ///
    /// # Errors
    /// The ioctl's error (ENODEV once the device is unplugged).
    pub fn stream_off(&self, buf_type: BufType) -> io::Result<()> {
        let mut t = buf_type as libc::c_int;
        // SAFETY: VIDIOC_STREAMOFF takes a pointer to an int buffer type.
        unsafe { self.ioctl(vidioc::VIDIOC_STREAMOFF, &mut t) }
    }

    /// Waits up to `timeout` for `events` (`libc::POLLIN`, `libc::POLLOUT`). Returns the
    /// reported events, 0 on timeout. Restarts on EINTR with the remaining time.
    ///
    /// # Errors
    /// The `poll(2)` error.
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_utf8_names_do_not_panic() {
        // A fixed-size card field that cuts "Caméra" in the middle of the "é".
        assert_eq!(c_string_field(b"Cam\xc3"), "Cam\u{fffd}");
    }
}
