//! The MIT-SHM side of screen capture: a System V shared-memory segment that the X server
//! writes captured images into, so no pixels travel through the X socket. Hand-written on
//! `libc` because x11rb only sends the requests; the segment itself is the client's to create,
//! map, and remove.

use anyhow::{bail, Context};
use x11rb::protocol::shm;

use crate::Result;

/// A System V shared-memory segment mapped into this process, optionally attached to the X server.
pub(super) struct ShmSegment {
    pub(super) id: libc::c_int,
    addr: *mut u8,
    size: usize,
    /// The X resource the server knows the segment by, once attached.
    pub(super) seg: Option<shm::Seg>,
    removed: bool,
}

// SAFETY: the mapping is owned exclusively by this value and only read through `&self` after a
// completed (synchronous) ShmGetImage; moving it to another thread is sound.
unsafe impl Send for ShmSegment {}

impl ShmSegment {
    /// Creates and maps a private segment of `size` bytes (readable and writable by this user only).
    pub(super) fn create(size: usize) -> Result<ShmSegment> {
        if size == 0 {
            bail!("cannot create an empty shared-memory segment");
        }
        // SAFETY: plain System V IPC calls; the returned id and address are checked.
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, size, libc::IPC_CREAT | 0o600);
            if id < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("shmget of {size} bytes failed"));
            }
            let addr = libc::shmat(id, std::ptr::null(), 0);
            if addr as isize == -1 {
                let err = std::io::Error::last_os_error();
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                return Err(err).context("shmat failed");
            }
            Ok(ShmSegment {
                id,
                addr: addr.cast(),
                size,
                seg: None,
                removed: false,
            })
        }
    }

    /// Marks the segment for destruction once every process has detached it.
    pub(super) fn remove(&mut self) {
        if !self.removed {
            // SAFETY: `id` is a segment this value created.
            unsafe {
                libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut());
            }
            self.removed = true;
        }
    }

    /// The mapped bytes.
    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `addr` maps `size` bytes for as long as `self` lives; the server writes into it
        // only while a ShmGetImage request is in flight, and callers read after its reply.
        unsafe { std::slice::from_raw_parts(self.addr, self.size) }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        self.remove();
        // SAFETY: `addr` came from shmat and is detached exactly once, here.
        unsafe {
            libc::shmdt(self.addr.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_segment_lifecycle() {
        let mut seg = ShmSegment::create(4096).unwrap();
        assert_eq!(seg.as_slice().len(), 4096);
        seg.remove();
        drop(seg);
    }
}
