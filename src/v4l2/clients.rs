//! Who reads the v4l2loopback device sdcam writes? The viewer detection behind the on-demand
//! virtual camera (the state machine that acts on it is [`crate::relay::demand`]).
//!
//! [`ClientWatcher`] reports an [`Observation`]: the number of *streaming* readers according to
//! the driver, where the module can say so, and the other processes that hold the node open
//! (and how many of them have it memory-mapped), which works on every module version.
//!
//! **The driver's client-usage event.** v4l2loopback queues `V4L2_EVENT_PRI_CLIENT_USAGE` to
//! every subscribed file handle when a reader starts or stops streaming (VIDIOC_STREAMON /
//! STREAMOFF on the capture queue, or a streaming reader's close). The writer subscribes on its
//! own descriptor (VIDIOC_SUBSCRIBE_EVENT with `V4L2_EVENT_SUB_FL_SEND_INITIAL`, so the current
//! count arrives at once), waits with `poll(POLLPRI)` and reads it with VIDIOC_DQEVENT. The
//! payload is `struct v4l2_event_client_usage { __u32 count; }` at the start of the event's
//! union in every version that has it; the id and the meaning of `count` differ
//! (from the module sources, `umlaeute/v4l2loopback`; the event is defined in `v4l2loopback.c`,
//! not in the public header):
//!
//! | module | event id | `count` |
//! |---|---|---|
//! | ≤ 0.12.7 upstream (Debian 12, the VM test) | none: SUBSCRIBE_EVENT fails (EINVAL) | — |
//! | Ubuntu's 0.12.x with its `0006-UBUNTU-SAUCE-event-support-V4L2_EVENT_PRI_CLIENT_USAGE` patch; upstream git between ceed405 (Dec 2022) and c7a5cd4 (Feb 2023) | `V4L2_EVENT_PRIVATE_START` (0x0800_0000) | streaming readers (`active_readers`) |
//! | 0.13.0 – 0.13.2 | `V4L2_EVENT_PRIVATE_START + 0x08E0_0000 + 1` (0x10E0_0001) | streaming readers; 0 or 1 in practice: a second reader's STREAMON is refused (EBUSY) |
//! | git after 0.13.2 (24cc1e8, Feb 2025, "Refactor control of logical streams") | 0x10E0_0001 | 1 while some reader owns the capture stream (one owner at most), else 0 |
//!
//! So the id is tried new-first, then the legacy one; either way `count` is read as "streaming
//! readers", which is exact for every version (none lets two mmap readers stream at once where
//! the count is a flag). A module that refuses both subscriptions is left to the fallback
//! without a word above debug level.
//!
//! **The fallback: other processes holding the node.** The writer learns nothing from the
//! driver about readers on old modules, so sdcam looks at processes: `/proc/PID/fd/*` links
//! that resolve to the device node (other than our own pid) are *openers*, and an opener that
//! also has the node in `/proc/PID/maps` is a *mapper*: streaming readers map their buffers
//! (mmap I/O, what ffmpeg, GStreamer, Chrome, Firefox and `v4l2-ctl --stream-mmap` use), while
//! a program that only probes (opens, queries formats, closes: how browsers enumerate devices)
//! never maps anything. Scanning every process costs a readlink per descriptor of every process
//! we may look into (a few µs each: 2.5 ms for 85 processes with 446 descriptors on the build
//! machine, measured in Python, so an upper bound; tens of ms on a desktop with 20 000), too
//! much to do every 100 ms, so an inotify watch on the node (IN_OPEN /
//! IN_CLOSE) says *when* to scan: an open or close triggers a full scan, and while an opener is
//! known but has not mapped yet only that process is looked at again (a reader maps a moment
//! after it opens). The periodic re-check ([`ClientWatcher::recheck`]) rescans everything and
//! re-subscribes to the driver's event (a fresh SEND_INITIAL count), so nothing missed lasts.
//! Why not inotify alone: it says that *someone* opened or closed the node, not who or whether
//! they stream, and it counts sdcam's own opens. Why not `/proc` alone at a high rate: the cost.
//!
//! Limits of the fallback: only processes whose `/proc/PID/fd` we may read are seen (the same
//! user, or all with CAP_SYS_PTRACE); a reader in a container with its own device node for the
//! same device is not matched by path; a `read()`-I/O reader never maps (the state machine
//! counts a long-held opener as a reader for that reason).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use v4l::v4l2::vidioc;
use v4l::v4l_sys as sys;

/// The event id of 0.13.0 and later: `V4L2_EVENT_PRIVATE_START + 0x08E00000 + 1`.
pub const CLIENT_USAGE_EVENT: u32 = sys::V4L2_EVENT_PRIVATE_START + 0x08E0_0000 + 1;
/// The event id of Ubuntu's patched 0.12.x and of upstream git before c7a5cd4:
/// `V4L2_EVENT_PRIVATE_START`.
pub const CLIENT_USAGE_EVENT_LEGACY: u32 = sys::V4L2_EVENT_PRIVATE_START;

/// The kernel's generic `_IOC` encoding (x86, arm, aarch64, riscv: what the `v4l` crate uses).
const fn ioc(dir: u64, nr: u64, size: usize) -> vidioc::_IOC_TYPE {
    ((dir << 30) | ((size as u64) << 16) | ((b'V' as u64) << 8) | nr) as vidioc::_IOC_TYPE
}
/// `_IOR('V', 89, struct v4l2_event)`; the `v4l` crate does not define the event ioctls.
const VIDIOC_DQEVENT: vidioc::_IOC_TYPE = ioc(2, 89, std::mem::size_of::<sys::v4l2_event>());
/// `_IOW('V', 90, struct v4l2_event_subscription)`.
const VIDIOC_SUBSCRIBE_EVENT: vidioc::_IOC_TYPE =
    ioc(1, 90, std::mem::size_of::<sys::v4l2_event_subscription>());
/// `_IOW('V', 91, struct v4l2_event_subscription)`.
const VIDIOC_UNSUBSCRIBE_EVENT: vidioc::_IOC_TYPE =
    ioc(1, 91, std::mem::size_of::<sys::v4l2_event_subscription>());

/// Where the counts of an [`Observation`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountSource {
    /// The driver's client-usage event.
    Event,
    /// Other processes' descriptors and mappings of the node.
    Fallback,
}

impl std::fmt::Display for CountSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CountSource::Event => "event",
            CountSource::Fallback => "fallback",
        })
    }
}

/// What the watcher knows about the device's other users at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    /// Streaming readers according to the driver's last client-usage event; `None` when the
    /// module has no such event.
    pub streaming_readers: Option<u32>,
    /// Other processes holding the node open (readers, probes, other writers).
    pub openers: u32,
    /// Of those, processes that have the node memory-mapped (streaming buffers).
    pub mappers: u32,
}

impl Observation {
    /// The best count of streaming readers: the driver's where it reports one, else the
    /// processes that map the node.
    pub fn readers(&self) -> u32 {
        self.streaming_readers.unwrap_or(self.mappers)
    }

    /// Where [`Observation::readers`] comes from.
    pub fn source(&self) -> CountSource {
        if self.streaming_readers.is_some() {
            CountSource::Event
        } else {
            CountSource::Fallback
        }
    }
}

/// The other processes holding a node, from `/proc` ([`scan_proc`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcScan {
    /// Pids with a descriptor on the node, ascending.
    pub openers: BTreeSet<u32>,
    /// Pids (a subset of `openers`) that map the node.
    pub mappers: BTreeSet<u32>,
}

/// Scans `proc_root` (`/proc`) for processes other than `own_pid` whose descriptors resolve to
/// `node` (an absolute, canonical path), and which of them map it. With `only`, looks at those
/// pids alone (the cheap re-look at known openers). Processes we may not look into, or that
/// end during the scan, are skipped.
pub fn scan_proc(proc_root: &Path, node: &Path, own_pid: u32, only: Option<&[u32]>) -> ProcScan {
    let mut scan = ProcScan::default();
    let pids: Vec<u32> = match only {
        Some(p) => p.to_vec(),
        None => match std::fs::read_dir(proc_root) {
            Ok(dir) => dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(e) => {
                tracing::debug!("{}: {e}", proc_root.display());
                return scan;
            }
        },
    };
    let node_bytes = node.as_os_str().as_bytes();
    for pid in pids {
        if pid == own_pid {
            continue;
        }
        let base = proc_root.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        let holds = fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str().as_bytes() == node_bytes)
        });
        if !holds {
            continue;
        }
        scan.openers.insert(pid);
        if let Ok(maps) = std::fs::read(base.join("maps")) {
            if maps_contain(&maps, node_bytes) {
                scan.mappers.insert(pid);
            }
        }
    }
    scan
}

/// Whether a `/proc/PID/maps` text has a mapping of `node`
/// (`start-end perms offset dev inode path`).
pub fn maps_contain(maps: &[u8], node: &[u8]) -> bool {
    maps.split(|&b| b == b'\n').any(|line| {
        line.split(|&b| b == b' ')
            .filter(|f| !f.is_empty())
            .nth(5)
            .is_some_and(|path| path == node)
    })
}

/// The count in a client-usage event's payload (the union's first four bytes, native
/// endianness), if the event is one of the two client-usage ids.
pub fn client_usage_count(event_type: u32, data: &[u8; 64]) -> Option<u32> {
    if event_type != CLIENT_USAGE_EVENT && event_type != CLIENT_USAGE_EVENT_LEGACY {
        return None;
    }
    Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]))
}

/// Issues an ioctl on `fd`, retrying on EINTR.
///
/// # Safety
/// `T` must be the argument type the kernel expects for `request`.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: vidioc::_IOC_TYPE, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees that T matches the request; arg is a live &mut.
        match unsafe {
            v4l::v4l2::ioctl(
                fd.as_raw_fd(),
                request,
                arg as *mut T as *mut std::ffi::c_void,
            )
        } {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn subscription(event: u32, flags: u32) -> sys::v4l2_event_subscription {
    // SAFETY: plain-old-data struct; zero is valid.
    let mut sub: sys::v4l2_event_subscription = unsafe { std::mem::zeroed() };
    sub.type_ = event;
    sub.flags = flags;
    sub
}

/// Watches a v4l2loopback device's readers from the writer's side (see the module doc).
///
/// It holds a duplicate of the writer's descriptor (events are per open file, so they arrive
/// on the duplicate too), which keeps the writer's open file, its lock and its place as the
/// device's writer alive: drop the watcher together with the sink, before the device is opened
/// again.
#[derive(Debug)]
pub struct ClientWatcher {
    /// The duplicate of the writer's descriptor: events.
    fd: OwnedFd,
    /// The subscribed event id, `None` without event support.
    event: Option<u32>,
    /// The last count the driver sent.
    event_count: Option<u32>,
    /// inotify watching the node (`None` when inotify is unavailable).
    inotify: Option<OwnedFd>,
    /// The node's canonical path, as `/proc/PID/fd` links and maps show it.
    node: PathBuf,
    proc_root: PathBuf,
    own_pid: u32,
    last: ProcScan,
}

impl ClientWatcher {
    /// Starts watching `device_path` (the node sdcam writes; a symlink such as `/dev/sdcam` is
    /// resolved) through the writer's descriptor `writer_fd`: subscribes to the client-usage
    /// event (new id, then the legacy one; neither is fine), sets up the inotify watch, and scans
    /// `/proc` once.
    ///
    /// # Errors
    /// The path cannot be resolved, or the descriptor cannot be duplicated.
    pub fn new(device_path: &Path, writer_fd: BorrowedFd<'_>) -> anyhow::Result<ClientWatcher> {
        let node = std::fs::canonicalize(device_path)
            .with_context(|| format!("resolving {}", device_path.display()))?;
        let fd = writer_fd
            .try_clone_to_owned()
            .with_context(|| format!("{}: duplicating the writer's descriptor", node.display()))?;
        let mut w = ClientWatcher {
            fd,
            event: None,
            event_count: None,
            inotify: None,
            node,
            proc_root: PathBuf::from("/proc"),
            own_pid: std::process::id(),
            last: ProcScan::default(),
        };
        w.subscribe();
        w.inotify = w.watch_node();
        w.drain_events();
        w.last = scan_proc(&w.proc_root, &w.node, w.own_pid, None);
        tracing::debug!(
            "{}: watching readers (event {:?}, inotify {})",
            w.node.display(),
            w.event.map(|e| format!("{e:#x}")),
            w.inotify.is_some()
        );
        Ok(w)
    }

    /// The client-usage event id the module accepted ([`CLIENT_USAGE_EVENT`] or
    /// [`CLIENT_USAGE_EVENT_LEGACY`]), `None` when it has none (the fallback alone counts).
    pub fn event_id(&self) -> Option<u32> {
        self.event
    }

    /// The node watched (canonical path).
    pub fn node(&self) -> &Path {
        &self.node
    }

    fn subscribe(&mut self) {
        for id in [CLIENT_USAGE_EVENT, CLIENT_USAGE_EVENT_LEGACY] {
            let mut sub = subscription(id, sys::V4L2_EVENT_SUB_FL_SEND_INITIAL);
            // SAFETY: VIDIOC_SUBSCRIBE_EVENT takes a struct v4l2_event_subscription.
            match unsafe { ioctl(self.fd.as_fd(), VIDIOC_SUBSCRIBE_EVENT, &mut sub) } {
                Ok(()) => {
                    self.event = Some(id);
                    return;
                }
                Err(e) => tracing::debug!(
                    "{}: VIDIOC_SUBSCRIBE_EVENT {id:#x}: {e}",
                    self.node.display()
                ),
            }
        }
        self.event = None;
        self.event_count = None;
    }

    fn unsubscribe(&mut self) {
        if let Some(id) = self.event.take() {
            let mut sub = subscription(id, 0);
            // SAFETY: VIDIOC_UNSUBSCRIBE_EVENT takes a struct v4l2_event_subscription.
            if let Err(e) = unsafe { ioctl(self.fd.as_fd(), VIDIOC_UNSUBSCRIBE_EVENT, &mut sub) } {
                tracing::debug!("{}: VIDIOC_UNSUBSCRIBE_EVENT: {e}", self.node.display());
            }
        }
    }

    fn watch_node(&self) -> Option<OwnedFd> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            tracing::debug!("inotify_init1: {}", io::Error::last_os_error());
            return None;
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(self.node.as_os_str().as_bytes()).ok()?;
        // SAFETY: valid inotify descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                path.as_ptr(),
                libc::IN_OPEN | libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE,
            )
        };
        if wd < 0 {
            tracing::debug!(
                "{}: inotify_add_watch: {}",
                self.node.display(),
                io::Error::last_os_error()
            );
            return None;
        }
        Some(fd)
    }

    /// Reads every pending client-usage event; the last count wins. Returns whether any came.
    fn drain_events(&mut self) -> bool {
        let Some(id) = self.event else {
            return false;
        };
        let mut got = false;
        loop {
            // SAFETY: POD struct; zero is valid; VIDIOC_DQEVENT fills a struct v4l2_event.
            let mut ev: sys::v4l2_event = unsafe { std::mem::zeroed() };
            // The descriptor is non-blocking (the sink opens with O_NONBLOCK): ENOENT when empty.
            // SAFETY: VIDIOC_DQEVENT takes a struct v4l2_event.
            match unsafe { ioctl(self.fd.as_fd(), VIDIOC_DQEVENT, &mut ev) } {
                Ok(()) => {
                    // SAFETY: every member of the union is plain bytes; `data` covers it all.
                    let data = unsafe { ev.u.data };
                    match client_usage_count(ev.type_, &data) {
                        Some(n) if ev.type_ == id => {
                            self.event_count = Some(n);
                            got = true;
                        }
                        _ => tracing::debug!(
                            "{}: event {:#x} ignored",
                            self.node.display(),
                            ev.type_
                        ),
                    }
                }
                Err(e) => {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        tracing::debug!("{}: VIDIOC_DQEVENT: {e}", self.node.display());
                    }
                    return got;
                }
            }
        }
    }

    /// Reads every pending inotify record. Returns whether any came (an open or close of the
    /// node by anyone, or a queue overflow).
    fn drain_inotify(&mut self) -> bool {
        let Some(fd) = &self.inotify else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut got = false;
        loop {
            // SAFETY: reads at most buf.len() bytes into a live buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                got = true;
                continue;
            }
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return got;
        }
    }

    /// Waits up to `timeout` (zero: no wait) for a client-usage event or an open/close of the
    /// node, then reports. Scans all of `/proc` after an open or close, and only the known
    /// openers otherwise (while some opener has not mapped the node yet).
    ///
    /// # Errors
    /// `poll(2)` failing (not EINTR).
    pub fn observe(&mut self, timeout: Duration) -> anyhow::Result<Observation> {
        self.wait(timeout)?;
        let changed = self.drain_inotify();
        self.drain_events();
        if changed {
            self.last = scan_proc(&self.proc_root, &self.node, self.own_pid, None);
        } else if self.last.openers.len() > self.last.mappers.len() {
            let known: Vec<u32> = self.last.openers.iter().copied().collect();
            self.last = scan_proc(&self.proc_root, &self.node, self.own_pid, Some(&known));
        }
        Ok(self.observation())
    }

    /// The periodic re-check: re-subscribes to the driver's event (which sends the current
    /// count again) and, where that gives no count, scans all of `/proc`, so a missed event or
    /// inotify record does not last.
    pub fn recheck(&mut self) -> Observation {
        self.drain_inotify();
        if self.event.is_some() {
            // A module that does not send the current count on subscribing must not leave an
            // old count standing: without a fresh one, the scan below decides.
            self.event_count = None;
            self.unsubscribe();
            self.subscribe();
        }
        self.drain_events();
        if self.event.is_none() || self.event_count.is_none() {
            // The full scan (a few ms on a busy desktop) only where the driver's count is
            // missing: with the event, the driver's count is the truth.
            self.last = scan_proc(&self.proc_root, &self.node, self.own_pid, None);
        }
        self.observation()
    }

    /// The counts as last seen, without looking again.
    pub fn observation(&self) -> Observation {
        Observation {
            streaming_readers: self.event.and(self.event_count),
            openers: self.last.openers.len() as u32,
            mappers: self.last.mappers.len() as u32,
        }
    }

    fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        if timeout.is_zero() {
            return Ok(());
        }
        let mut fds = Vec::with_capacity(2);
        if self.event.is_some() {
            fds.push(libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            });
        }
        if let Some(i) = &self.inotify {
            fds.push(libc::pollfd {
                fd: i.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let deadline = std::time::Instant::now() + timeout;
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return Ok(());
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is a live array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(anyhow::Error::new(e).context(format!(
                    "{}: waiting for reader events",
                    self.node.display()
                )));
            }
        }
    }
}

/// The loaded v4l2loopback module's version (`/sys/module/v4l2loopback/version`; absent on
/// 0.12.x, which does not set MODULE_VERSION).
pub fn module_version() -> Option<String> {
    std::fs::read_to_string("/sys/module/v4l2loopback/version")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    // The ioctl request type is `c_ulong` here but `c_int` on musl: the casts are for those.
    #[allow(clippy::unnecessary_cast)]
    fn event_ids_and_ioctl_numbers() {
        assert_eq!(CLIENT_USAGE_EVENT, 0x10E0_0001);
        assert_eq!(CLIENT_USAGE_EVENT, 283_115_521);
        assert_eq!(CLIENT_USAGE_EVENT_LEGACY, 0x0800_0000);
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(VIDIOC_DQEVENT as u64, 0x8088_5659);
            assert_eq!(VIDIOC_SUBSCRIBE_EVENT as u64, 0x4020_565a);
            assert_eq!(VIDIOC_UNSUBSCRIBE_EVENT as u64, 0x4020_565b);
        }
    }

    #[test]
    fn payload_count() {
        let mut data = [0u8; 64];
        data[..4].copy_from_slice(&2u32.to_ne_bytes());
        assert_eq!(client_usage_count(CLIENT_USAGE_EVENT, &data), Some(2));
        assert_eq!(
            client_usage_count(CLIENT_USAGE_EVENT_LEGACY, &data),
            Some(2)
        );
        assert_eq!(client_usage_count(sys::V4L2_EVENT_CTRL, &data), None);
    }

    #[test]
    fn observation_prefers_the_driver() {
        let o = Observation {
            streaming_readers: Some(1),
            openers: 3,
            mappers: 0,
        };
        assert_eq!((o.readers(), o.source()), (1, CountSource::Event));
        let o = Observation {
            streaming_readers: None,
            openers: 3,
            mappers: 2,
        };
        assert_eq!((o.readers(), o.source()), (2, CountSource::Fallback));
    }

    #[test]
    fn maps_lines() {
        let maps = b"55d0-55d1 r--p 00000000 08:01 1234 /usr/bin/ffmpeg\n\
7f00-7f10 rw-s 00000000 00:05 321 /dev/video10\n\
7f20-7f30 rw-p 00000000 00:00 0 \n";
        assert!(maps_contain(maps, b"/dev/video10"));
        assert!(!maps_contain(maps, b"/dev/video1"));
        assert!(!maps_contain(b"", b"/dev/video10"));
    }

    /// A fake `/proc`: pid 10 probes (fd only), 11 streams (fd + maps), 12 holds another node,
    /// 13 is us, `self` and junk are not pids.
    #[test]
    fn fake_proc_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let node = tmp.path().join("video10");
        std::fs::write(&node, b"").unwrap();
        let other = tmp.path().join("video11");
        std::fs::write(&other, b"").unwrap();
        let mk = |pid: u32, target: &Path, maps: &str| {
            let fd = proc_root.join(pid.to_string()).join("fd");
            std::fs::create_dir_all(&fd).unwrap();
            symlink("/dev/null", fd.join("0")).unwrap();
            symlink(target, fd.join("3")).unwrap();
            std::fs::write(proc_root.join(pid.to_string()).join("maps"), maps).unwrap();
        };
        let mapped = format!("7f00-7f10 rw-s 00000000 00:05 9 {}\n", node.display());
        mk(10, &node, "");
        mk(11, &node, &mapped);
        mk(12, &other, &mapped);
        mk(13, &node, &mapped);
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        std::fs::create_dir_all(proc_root.join("junk")).unwrap();
        let s = scan_proc(&proc_root, &node, 13, None);
        assert_eq!(s.openers.into_iter().collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(s.mappers.into_iter().collect::<Vec<_>>(), vec![11]);
        let s = scan_proc(&proc_root, &node, 13, Some(&[10, 99]));
        assert_eq!(s.openers.into_iter().collect::<Vec<_>>(), vec![10]);
        assert!(s.mappers.is_empty());
    }

    /// The real `/proc` and inotify: a child process holding a plain file open is an opener
    /// (never a mapper); our own descriptor is not counted; its exit is seen at once.
    #[test]
    fn real_proc_and_inotify_see_a_child() {
        let tmp = tempfile::tempdir().unwrap();
        let node = tmp.path().join("node");
        std::fs::write(&node, b"").unwrap();
        let ours = std::fs::File::open(&node).unwrap();
        let mut w = ClientWatcher::new(&node, ours.as_fd()).unwrap();
        assert_eq!(w.event_id(), None, "a plain file has no V4L2 events");
        assert_eq!(
            w.observation().openers,
            0,
            "our own descriptors do not count"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&node).unwrap())
            .spawn()
            .unwrap();
        let o = w.observe(Duration::from_secs(2)).unwrap();
        assert_eq!(
            (o.streaming_readers, o.openers, o.mappers, o.source()),
            (None, 1, 0, CountSource::Fallback)
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let o = w.observe(Duration::from_secs(2)).unwrap();
        assert_eq!(o.openers, 0, "{o:?}");
        assert_eq!(w.recheck().openers, 0);
    }
}
