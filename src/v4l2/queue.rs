//! Memory-mapped streaming buffers ([`MmapQueue`]) and the guard for one buffer taken from them
//! ([`Buffer`]), which hands the buffer back on drop so that no path can lose one.
//!
//! **Why hand-written instead of `v4l::io::mmap::Stream`.** That type panics in `Drop` when
//! VIDIOC_STREAMOFF fails with anything but ENODEV (an unplugged USB camera can give EIO, and a
//! relay that reconnects every second must never panic), it does not release the buffers with
//! REQBUFS(0), its output mode cannot STREAMON after the first QBUF as v4l2loopback needs, and
//! its buffers are indices the caller must remember to queue again. Teardown here is:
//! STREAMOFF, munmap, REQBUFS(0), close — errors are logged, never a panic.
//!
//! **Who holds a buffer.** Each buffer is either with the driver (queued) or with this process
//! (idle, kept in the queue's idle list). [`MmapQueue::dequeue`] hands an idle or dequeued
//! buffer out as a [`Buffer`] guard that borrows the queue; [`Buffer::queue`] gives it to the
//! driver, and dropping the guard without that returns it: a capture buffer is queued again for
//! the driver to fill, an output buffer goes back to the idle list (its payload unsent). A QBUF
//! that fails leaves the buffer idle, and the next capture `dequeue` tries to queue it again.

use std::io;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use v4l::buffer::Flags as BufFlags;
use v4l::memory::Memory;
use v4l::v4l2::vidioc;
use v4l::v4l_sys as sys;

use super::device::{is_gone, BufType, V4l2Device};

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

/// Memory-mapped streaming buffers of one device and buffer type, owning the device.
pub struct MmapQueue {
    dev: V4l2Device,
    buf_type: BufType,
    maps: Vec<Mapping>,
    /// Buffers with this process, not queued to the driver; popped from the end (lowest first).
    idle: Vec<usize>,
    requested: bool,
    streaming: bool,
}

// SAFETY: the mappings are private to this queue (no aliases escape except through borrows of
// `self`), so moving the queue to another thread is as safe as moving a Vec<u8>.
unsafe impl Send for MmapQueue {}

impl MmapQueue {
    /// VIDIOC_REQBUFS(`count`, MMAP), then QUERYBUF and mmap each buffer. The driver may grant
    /// fewer buffers than asked; at least one is required. All buffers start idle (with this
    /// process): queue capture buffers with [`MmapQueue::queue_idle`] before streaming.
    ///
    /// # Errors
    /// REQBUFS (EBUSY: another process owns the device's buffers), no buffer granted, QUERYBUF
    /// or mmap failing; each with the device path. What was set up is released.
    pub fn new(dev: V4l2Device, buf_type: BufType, count: u32) -> crate::Result<Self> {
        let mut queue = MmapQueue {
            dev,
            buf_type,
            maps: Vec::new(),
            idle: Vec::new(),
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
                raw.type_ = buf_type as u32;
                raw.memory = Memory::Mmap as u32;
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
        queue.idle = (0..queue.maps.len()).rev().collect();
        Ok(queue)
    }

    fn request(&self, count: u32) -> io::Result<u32> {
        // SAFETY: POD struct; matches VIDIOC_REQBUFS.
        unsafe {
            let mut raw: sys::v4l2_requestbuffers = std::mem::zeroed();
            raw.count = count;
            raw.type_ = self.buf_type as u32;
            raw.memory = Memory::Mmap as u32;
            self.dev.ioctl(vidioc::VIDIOC_REQBUFS, &mut raw)?;
            Ok(raw.count)
        }
    }

    fn is_output(&self) -> bool {
        matches!(self.buf_type, BufType::VideoOutput)
    }

    /// The device the buffers belong to (the reader watcher duplicates its descriptor).
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

    /// The mapped length, bytes, of buffer `index` (`None` past the end).
    pub fn buffer_len(&self, index: usize) -> Option<usize> {
        self.maps.get(index).map(|m| m.len)
    }

    /// Whether STREAMON has been issued.
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Capture: hands every idle buffer to the driver to fill (VIDIOC_QBUF), lowest index first.
    ///
    /// # Errors
    /// The first QBUF that fails, with the device path and buffer index; that buffer and the
    /// ones after it stay idle.
    pub fn queue_idle(&mut self) -> crate::Result<()> {
        while let Some(index) = self.idle.pop() {
            if let Err(e) = self.qbuf(index, 0) {
                self.idle.push(index);
                return Err(anyhow::Error::new(e).context(format!(
                    "{}: queueing capture buffer {index}",
                    self.dev.path().display()
                )));
            }
        }
        Ok(())
    }

    /// VIDIOC_QBUF of buffer `index`. For output buffers, `bytesused` is the payload and the
    /// buffer is stamped progressive with the current CLOCK_MONOTONIC time.
    fn qbuf(&mut self, index: usize, bytesused: usize) -> io::Result<()> {
        let Some(map) = self.maps.get(index) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer index {index} out of range"),
            ));
        };
        let bytesused = bytesused.min(map.len);
        let output = self.is_output();
        // SAFETY: POD struct; matches VIDIOC_QBUF; clock_gettime writes into a valid timespec.
        unsafe {
            let mut raw: sys::v4l2_buffer = std::mem::zeroed();
            raw.index = index as u32;
            raw.type_ = self.buf_type as u32;
            raw.memory = Memory::Mmap as u32;
            if output {
                raw.bytesused = bytesused as u32;
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

    /// The next buffer to use. Output: an idle buffer if there is one, else polls (POLLOUT)
    /// for up to `timeout` and takes the buffer the driver is done with (VIDIOC_DQBUF).
    /// Capture: queues idle buffers again (see the module doc), then polls (POLLIN) for up to
    /// `timeout` and takes the next filled buffer.
    ///
    /// # Errors
    /// [`io::ErrorKind::TimedOut`] when no buffer came within `timeout`; the poll, QBUF or DQBUF
    /// error otherwise (ENODEV: the device is gone).
    pub fn dequeue(&mut self, timeout: Duration) -> io::Result<Buffer<'_>> {
        if self.is_output() {
            if let Some(index) = self.idle.pop() {
                return Ok(Buffer::new(self, index, 0, 0, 0));
            }
        } else {
            while let Some(&index) = self.idle.last() {
                self.qbuf(index, 0)?;
                self.idle.pop();
            }
        }
        let events = if self.is_output() {
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
                raw.type_ = self.buf_type as u32;
                raw.memory = Memory::Mmap as u32;
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
            return Ok(Buffer::new(
                self,
                index,
                raw.bytesused as usize,
                raw.flags,
                raw.sequence,
            ));
        }
    }

    /// VIDIOC_STREAMON.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn stream_on(&mut self) -> io::Result<()> {
        self.dev.stream_on(self.buf_type)?;
        self.streaming = true;
        Ok(())
    }

    /// STREAMOFF, munmap, REQBUFS(0). Idempotent; returns the first error (all steps are tried).
    /// ENODEV (device unplugged) is not an error here.
    ///
    /// # Errors
    /// The first STREAMOFF or munmap error other than the device being gone.
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
        self.idle.clear();
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

/// One buffer taken from an [`MmapQueue`]: filled by the driver (capture) or free to fill
/// (output). Give it to the driver with [`Buffer::queue`]; dropped without that, it goes back
/// (capture: queued again to be filled; output: idle, its payload unsent).
#[must_use = "a buffer not queued goes back unused when dropped"]
pub struct Buffer<'q> {
    queue: &'q mut MmapQueue,
    index: usize,
    bytesused: usize,
    flags: u32,
    sequence: u32,
    /// Handed back already (by `queue`): nothing left for `Drop`.
    returned: bool,
}

impl<'q> Buffer<'q> {
    fn new(
        queue: &'q mut MmapQueue,
        index: usize,
        bytesused: usize,
        flags: u32,
        sequence: u32,
    ) -> Self {
        Buffer {
            queue,
            index,
            bytesused,
            flags,
            sequence,
            returned: false,
        }
    }

    /// The buffer's index in its queue.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Capture: the bytes the driver filled in (0 for drivers that do not say). Output: 0.
    pub fn bytesused(&self) -> usize {
        self.bytesused
    }

    /// The driver's frame counter for a capture buffer.
    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// The driver flagged the data as corrupted (`V4L2_BUF_FLAG_ERROR`).
    pub fn is_error(&self) -> bool {
        BufFlags::from(self.flags).contains(BufFlags::ERROR)
    }

    /// The whole mapped buffer (more than [`Buffer::bytesused`] bytes, as a rule).
    pub fn data(&self) -> &[u8] {
        let m = &self.queue.maps[self.index];
        // SAFETY: the mapping is live while the queue is (borrowed by self), and has `len` bytes.
        unsafe { std::slice::from_raw_parts(m.ptr, m.len) }
    }

    /// The whole mapped buffer, writable (for output).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let m = &self.queue.maps[self.index];
        // SAFETY: as in `data`; self borrows the queue mutably, so the slice is exclusive.
        unsafe { std::slice::from_raw_parts_mut(m.ptr, m.len) }
    }

    /// Gives the buffer to the driver (VIDIOC_QBUF): capture, to be filled again (`bytesused`
    /// is ignored); output, with `bytesused` bytes of payload (at most the buffer's length).
    ///
    /// # Errors
    /// The QBUF error; the buffer then stays with the queue (idle), not lost.
    pub fn queue(mut self, bytesused: usize) -> io::Result<()> {
        self.returned = true;
        let result = self.queue.qbuf(self.index, bytesused);
        if result.is_err() {
            self.queue.idle.push(self.index);
        }
        result
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        if !self.queue.is_output() {
            match self.queue.qbuf(self.index, 0) {
                Ok(()) => return,
                Err(e) => tracing::debug!(
                    "{}: re-queueing capture buffer {}: {e} (retried at the next dequeue)",
                    self.queue.dev.path().display(),
                    self.index
                ),
            }
        }
        self.queue.idle.push(self.index);
    }
}
