//! Live heap bytes: a counting wrapper around the global allocator (issue 11, "Memory over
//! time"). The process's RSS swings by tens of MB per frame (the U-Net's temporaries) and also
//! holds memory the allocator has freed but kept, so it cannot tell a leak from allocator
//! growth; the bytes allocated and not yet freed can. `stats` prints them, `scripts/soak.sh`
//! records them, and `tests/heap_soak.rs` checks them.
//!
//! The binary installs `Counting<MiMalloc>`; the cost is one relaxed atomic add per allocation
//! and per free (a few thousand per frame, next to a U-Net call of milliseconds).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Forwards every call to `A` and counts the bytes allocated and not yet freed.
pub struct Counting<A>(pub A);

#[inline]
fn grow(n: i64) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    if live > PEAK.load(Relaxed) {
        PEAK.fetch_max(live, Relaxed);
    }
    if !INSTALLED.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `A`, itself a `GlobalAlloc`; the wrapper only
// updates counters and never touches the memory.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            grow(layout.size() as i64);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size() as i64);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grow(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Heap bytes allocated through [`Counting`] and not yet freed, and the most there ever were;
/// `None` when [`Counting`] is not the global allocator (library tests, other binaries).
pub fn heap_bytes() -> Option<(u64, u64)> {
    INSTALLED.load(Relaxed).then(|| {
        (
            LIVE.load(Relaxed).max(0) as u64,
            PEAK.load(Relaxed).max(0) as u64,
        )
    })
}
