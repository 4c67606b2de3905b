//! V4L2 for sdcam: the device layer shared by the camera source ([`crate::source::camera`]) and
//! the v4l2loopback sink ([`crate::sink::loopback`]), and device discovery for `sdcam devices`
//! ([`crate::cli::devices`]).
//!
//! - [`clients`]: who reads a loopback device sdcam writes (the on-demand camera's viewer
//!   detection);
//! - [`device`]: an open node ([`V4l2Device`]) and the ioctls sdcam issues on it;
//! - [`queue`]: memory-mapped streaming buffers ([`MmapQueue`]) and the guard for a dequeued
//!   buffer ([`Buffer`]) that hands it back on drop;
//! - [`mod@format`]: what a device offers and what is set on it, as plain data;
//! - [`fourcc`]: four-character codes;
//! - [`mod@probe`]: which nodes exist and what they are;
//! - [`writer`]: whether another program writes to a v4l2loopback device.
//!
//! The `v4l` crate (0.14) provides the kernel structs, the ioctl call, the buffer-type enum and
//! flag sets and the decoding of the frame-size/interval unions. Its device and stream types are
//! not used: they panic on data a driver may return and on teardown errors, which a relay that
//! re-opens a vanished camera every second cannot afford. [`device`] and [`queue`] say in detail
//! what each hand-written piece does that `v4l` cannot. Everything apart from the ioctls is pure
//! logic, unit-tested without devices.

pub mod clients;
pub mod device;
pub mod format;
pub mod fourcc;
pub mod probe;
pub mod queue;
pub mod writer;

pub use device::{is_gone, open_hint, BufType, Caps, V4l2Device, LOOPBACK_DRIVER};
pub use format::{DiscreteSize, FormatInfo, FrameRates, FrameSizes, PixFormat, StepwiseSizes};
pub use fourcc::{fourcc_from_u32, fourcc_to_string, fourcc_to_u32, FourCc};
pub use probe::{
    modprobe_hint, probe, probe_all, probe_all_caps, probe_all_loopback_writers, video_paths,
    ProbeError, V4l2Env, VideoDevice, MODPROBE_PARAMS,
};
pub use queue::{Buffer, MmapQueue};
pub use writer::{LoopbackState, WriterEvidence};
