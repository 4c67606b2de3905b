//! The time the relay paces by: the output's write ticks and the capture stage's reconnect
//! interval.
//!
//! [`SystemClock`] (the default) is the real monotonic clock. [`ManualClock`] is a virtual
//! clock for tests: its time moves only when the test steps it, one due timer at a time, and
//! each step waits until the thread it woke has finished its work and waits on the clock again
//! (or has ended). A relay test driven by it counts output ticks, not wall-clock time, so its
//! results do not depend on how loaded the machine is. Work done outside the clock (a
//! transform's compute, the queues) still runs in real time; a test that needs it finished
//! before the next tick waits for it through the relay's stats.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

/// A source of time and of timers.
pub trait Clock: Send + Sync {
    /// The current time on this clock.
    fn now(&self) -> Instant;
    /// A channel that receives one message (the time) once `deadline` has passed on this clock;
    /// a deadline already passed is received at once. Wait on it with `recv` or in a `select!`.
    fn at(&self, deadline: Instant) -> Receiver<Instant>;
}

/// The real monotonic clock ([`Instant::now`], crossbeam's `at` timers).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn at(&self, deadline: Instant) -> Receiver<Instant> {
        crossbeam_channel::at(deadline)
    }
}

/// How long (real time) a step waits for the thread it woke to wait on the clock again. A
/// thread that blocks on something else instead (a queue) lets the step go on after this.
const SETTLE: Duration = Duration::from_millis(500);

/// A pending timer of a [`ManualClock`].
struct Timer {
    deadline: Instant,
    /// The thread that waits on it.
    owner: ThreadId,
    tx: Sender<Instant>,
}

#[derive(Default)]
struct State {
    /// Virtual time elapsed since the clock was made.
    offset: Duration,
    timers: Vec<Timer>,
    /// Timers armed so far, per thread (to see a woken thread wait again).
    armed: Vec<(ThreadId, u64)>,
    /// Threads that armed a timer and have ended since.
    ended: Vec<ThreadId>,
}

impl State {
    fn armed_by(&self, t: ThreadId) -> u64 {
        self.armed
            .iter()
            .find(|(id, _)| *id == t)
            .map_or(0, |(_, n)| *n)
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tells the clock when a thread that armed one of its timers ends.
struct EndGuard(Vec<Arc<Shared>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        for shared in &self.0 {
            shared.lock().ended.push(me);
            shared.changed.notify_all();
        }
    }
}

thread_local! {
    static END_GUARD: RefCell<EndGuard> = const { RefCell::new(EndGuard(Vec::new())) };
}

/// A virtual clock for deterministic relay tests; see the module documentation.
#[derive(Clone)]
pub struct ManualClock {
    base: Instant,
    shared: Arc<Shared>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManualClock")
            .field("elapsed", &self.elapsed())
            .finish_non_exhaustive()
    }
}

impl ManualClock {
    /// A clock at its start (no virtual time elapsed), with no timers.
    pub fn new() -> ManualClock {
        ManualClock {
            base: Instant::now(),
            shared: Arc::default(),
        }
    }

    /// Virtual time elapsed since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.shared.lock().offset
    }

    /// When the earliest pending timer is due, as virtual time since the clock was made.
    pub fn next_due(&self) -> Option<Duration> {
        let st = self.shared.lock();
        st.timers.iter().map(|t| t.deadline - self.base).min()
    }

    /// Waits (at most `timeout` of real time) until `n` timers are pending: for a test to let
    /// the threads it started reach their first wait before it moves time. Returns whether
    /// they did.
    pub fn wait_for_timers(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.timers.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Blocks the calling thread for `d` of this clock's time (for a scripted test stage that
    /// paces itself or takes time to compute).
    pub fn sleep(&self, d: Duration) {
        let _ = self.at(self.now() + d).recv();
    }

    /// Fires the earliest pending timer, moving time to its deadline, and waits (at most half
    /// a second of real time) until the thread it woke waits on the clock again or ends.
    /// Returns false when no timer is pending.
    pub fn step(&self) -> bool {
        let mut st = self.shared.lock();
        let Some(i) = (0..st.timers.len()).min_by_key(|&i| st.timers[i].deadline) else {
            return false;
        };
        let timer = st.timers.swap_remove(i);
        st.offset = st.offset.max(timer.deadline - self.base);
        let now = self.base + st.offset;
        let before = st.armed_by(timer.owner);
        if timer.tx.send(now).is_err() {
            // Nobody waits on it any more.
            return true;
        }
        let deadline = Instant::now() + SETTLE;
        while st.armed_by(timer.owner) == before && !st.ended.contains(&timer.owner) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Steps through every timer due within `d` from now, then sets the time to now + `d`.
    pub fn advance(&self, d: Duration) {
        let target = self.now() + d;
        loop {
            let due = {
                let st = self.shared.lock();
                st.timers.iter().any(|t| t.deadline <= target)
            };
            if !due {
                break;
            }
            self.step();
        }
        let mut st = self.shared.lock();
        st.offset = st.offset.max(target - self.base);
    }

    /// Steps the clock on another thread (waiting for a timer when none is pending) until the
    /// returned [`Driver`] is dropped: for a test that blocks, e.g. in [`super::Relay::join`].
    pub fn drive(&self) -> Driver {
        let clock = self.clone();
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            while let Err(crossbeam_channel::TryRecvError::Empty) = stop_rx.try_recv() {
                if !clock.step() {
                    let st = clock.shared.lock();
                    let _ = clock
                        .shared
                        .changed
                        .wait_timeout(st, Duration::from_millis(1));
                }
            }
        });
        Driver {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.shared.lock().offset
    }

    fn at(&self, deadline: Instant) -> Receiver<Instant> {
        let (tx, rx) = bounded(1);
        let me = std::thread::current().id();
        let mut st = self.shared.lock();
        let now = self.base + st.offset;
        match st.armed.iter_mut().find(|(id, _)| *id == me) {
            Some((_, n)) => *n += 1,
            None => {
                st.armed.push((me, 1));
                let shared = self.shared.clone();
                // Tell this clock when the thread ends (a woken thread that ends waits no more).
                let _ = END_GUARD.try_with(|g| g.borrow_mut().0.push(shared));
            }
        }
        if deadline <= now {
            let _ = tx.send(now);
        } else {
            st.timers.push(Timer {
                deadline,
                owner: me,
                tx,
            });
        }
        drop(st);
        self.shared.changed.notify_all();
        rx
    }
}

/// Steps a [`ManualClock`] on a thread of its own until dropped.
#[derive(Debug)]
pub struct Driver {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_time_moves_only_when_stepped() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        let timer = clock.at(t0 + Duration::from_millis(20));
        assert!(timer.try_recv().is_err());
        clock.advance(Duration::from_millis(10));
        assert!(timer.try_recv().is_err());
        assert_eq!(clock.elapsed(), Duration::from_millis(10));
        clock.advance(Duration::from_millis(10));
        assert_eq!(timer.try_recv().unwrap(), t0 + Duration::from_millis(20));
        // A deadline already passed fires at once.
        assert!(clock.at(t0).try_recv().is_ok());
    }

    #[test]
    fn a_step_waits_for_the_woken_thread_to_wait_again() {
        let clock = ManualClock::new();
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let (c, t) = (clock.clone(), ticks.clone());
        let worker = std::thread::spawn(move || {
            for _ in 0..5 {
                c.sleep(Duration::from_millis(10));
                // Work that takes real time: the step waits for it.
                std::thread::sleep(Duration::from_millis(5));
                t.lock().unwrap().push(c.elapsed());
            }
        });
        assert!(clock.wait_for_timers(1, Duration::from_secs(10)));
        clock.advance(Duration::from_millis(30));
        assert_eq!(ticks.lock().unwrap().len(), 3);
        let _driver = clock.drive();
        worker.join().unwrap();
        let ms: Vec<u128> = ticks
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(ms, [10, 20, 30, 40, 50]);
    }

    #[test]
    fn the_system_clock_is_real_time() {
        let c = SystemClock;
        let t0 = c.now();
        let at = c.at(t0 + Duration::from_millis(5)).recv().unwrap();
        assert!(at >= t0 + Duration::from_millis(5));
    }
}
