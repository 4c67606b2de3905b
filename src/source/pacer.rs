//! Frame pacing for sources that produce frames on a clock: the pattern, a still image, a Y4M
//! file played in real time, and the X11 screen grabber.
//!
//! One rule for all of them ([`next_due`]): frames stay on the grid started by the first one,
//! so a slightly late frame does not shift the ones after it (no drift); a frame more than a
//! whole period late restarts the grid from now instead of sending the missed frames in a
//! burst. The clock is injected ([`Clock`]), so the rule and the interrupted-wait path are
//! tested with a fake clock, without sleeping.

use std::time::{Duration, Instant};

use super::Wake;

/// Where a [`Pacer`] reads the time and how it sleeps.
pub trait Clock: std::fmt::Debug + Send {
    /// The current time.
    fn now(&self) -> Instant;

    /// Sleeps until `deadline` unless `wake` fires first; returns true when woken (the wake is
    /// used up), as [`Wake::sleep_until`] does.
    fn sleep_until(&self, deadline: Instant, wake: &Wake) -> bool;
}

/// The real clock: [`Instant::now`] and a sleep that a [`Wake`] interrupts.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant, wake: &Wake) -> bool {
        wake.sleep_until(deadline)
    }
}

/// When the frame after one taken at `taken_at` is due, given when that frame was due (`None`
/// for the first frame). Frames stay on the grid started by the first one (no drift); if a
/// frame ran late past a whole period, the grid restarts from `taken_at` rather than bursting
/// to catch up.
pub fn next_due(due: Option<Instant>, taken_at: Instant, period: Duration) -> Instant {
    let next = due.unwrap_or(taken_at) + period;
    if next < taken_at {
        taken_at + period
    } else {
        next
    }
}

/// Paces a source: [`Pacer::wait`] sleeps until the next frame is due, without drift or bursts
/// (see [`next_due`]).
#[derive(Debug)]
pub struct Pacer<C: Clock = SystemClock> {
    period: Duration,
    next: Option<Instant>,
    wake: Wake,
    clock: C,
}

impl Pacer {
    /// A pacer on the real clock at `fps` frames per second. Any rate works: NaN, zero and
    /// negative rates are taken as 0.001 fps, huge ones as no wait (the profile keeps rates
    /// within `profile::MIN_FPS..=MAX_FPS`; a Y4M header may not).
    pub fn new(fps: f64) -> Self {
        Self::with_clock(fps, SystemClock)
    }
}

impl<C: Clock> Pacer<C> {
    /// A pacer on `clock`; `fps` as in [`Pacer::new`].
    pub fn with_clock(fps: f64, clock: C) -> Self {
        let fps = if fps.is_nan() { 0.001 } else { fps.max(0.001) };
        Pacer {
            period: Duration::from_secs_f64(1.0 / fps),
            next: None,
            wake: Wake::new(),
            clock,
        }
    }

    /// The time between two frames.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The [`Wake`] that interrupts [`Pacer::wait`].
    pub fn set_wake(&mut self, wake: Wake) {
        self.wake = wake;
    }

    /// Sleeps until the next frame time (the first call returns at once) and schedules the
    /// frame after it; returns false when woken first (nothing is scheduled: the frame is still
    /// due and the next call waits for the rest of the period).
    pub fn wait(&mut self) -> bool {
        if let Some(due) = self.next {
            if due > self.clock.now() && self.clock.sleep_until(due, &self.wake) {
                return false;
            }
        }
        self.next = Some(next_due(self.next, self.clock.now(), self.period));
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A clock that only moves when told, and whose sleeps move it to their deadline at once
    /// (or are interrupted by a pending wake, like the real one). It records every sleep.
    #[derive(Debug, Clone)]
    struct FakeClock(Arc<Mutex<(Instant, Vec<Instant>)>>);

    impl FakeClock {
        fn new(t0: Instant) -> Self {
            FakeClock(Arc::new(Mutex::new((t0, Vec::new()))))
        }

        fn advance(&self, d: Duration) {
            self.0.lock().unwrap().0 += d;
        }

        fn sleeps(&self) -> Vec<Instant> {
            std::mem::take(&mut self.0.lock().unwrap().1)
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.0.lock().unwrap().0
        }

        fn sleep_until(&self, deadline: Instant, wake: &Wake) -> bool {
            let mut s = self.0.lock().unwrap();
            s.1.push(deadline);
            if wake.take() {
                return true;
            }
            s.0 = s.0.max(deadline);
            false
        }
    }

    #[test]
    fn pacing_keeps_the_grid_and_does_not_burst() {
        let t0 = Instant::now();
        let p = Duration::from_millis(10);
        // First frame starts the grid.
        assert_eq!(next_due(None, t0, p), t0 + p);
        // Slightly late: stay on the grid (no drift).
        assert_eq!(next_due(Some(t0 + p), t0 + p * 3 / 2, p), t0 + p * 2);
        // Late by more than a period: restart from the grab instead of bursting.
        assert_eq!(next_due(Some(t0 + p), t0 + p * 5, p), t0 + p * 6);
    }

    #[test]
    fn the_pacer_sleeps_to_the_grid() {
        let t0 = Instant::now();
        let clock = FakeClock::new(t0);
        let mut p = Pacer::with_clock(100.0, clock.clone());
        let ms = Duration::from_millis;
        assert_eq!(p.period(), ms(10));
        // The first frame goes at once, the next ones on the 10 ms grid.
        assert!(p.wait());
        assert!(clock.sleeps().is_empty());
        assert!(p.wait());
        assert!(p.wait());
        assert_eq!(clock.sleeps(), [t0 + ms(10), t0 + ms(20)]);
        // Work taking 4 ms between frames does not shift the grid.
        clock.advance(ms(4));
        assert!(p.wait());
        assert_eq!(clock.sleeps(), [t0 + ms(30)]);
        // A frame 5 ms late (less than a period) is not waited for, and the grid stays.
        clock.advance(ms(15));
        assert!(p.wait());
        assert!(p.wait());
        assert_eq!(clock.sleeps(), [t0 + ms(50)]);
        // 35 ms late: the grid restarts from now, with no burst of missed frames.
        clock.advance(ms(45));
        assert!(p.wait());
        assert!(clock.sleeps().is_empty());
        assert!(p.wait());
        assert_eq!(clock.sleeps(), [t0 + ms(105)]);
    }

    #[test]
    fn a_wake_interrupts_the_wait_and_the_frame_stays_due() {
        let t0 = Instant::now();
        let clock = FakeClock::new(t0);
        let wake = Wake::new();
        let mut p = Pacer::with_clock(0.5, clock.clone());
        p.set_wake(wake.clone());
        assert!(p.wait());
        wake.wake();
        assert!(!p.wait(), "woken");
        assert_eq!(clock.now(), t0, "no time passed");
        // The interrupted frame is still due at the same time.
        clock.advance(Duration::from_secs(1));
        assert!(p.wait());
        let due = t0 + Duration::from_secs(2);
        assert_eq!(clock.sleeps(), [due, due]);
        assert_eq!(clock.now(), due);
    }

    #[test]
    fn weird_rates_are_clamped() {
        let clock = FakeClock::new(Instant::now());
        for (fps, period) in [
            (f64::NAN, Duration::from_secs(1000)),
            (0.0, Duration::from_secs(1000)),
            (-1.0, Duration::from_secs(1000)),
            (f64::INFINITY, Duration::ZERO),
            (1e300, Duration::ZERO),
        ] {
            let mut p = Pacer::with_clock(fps, clock.clone());
            assert_eq!(p.period(), period, "{fps}");
            assert!(p.wait() && p.wait());
        }
    }

    #[test]
    fn pacer_keeps_rate() {
        let mut p = Pacer::new(200.0);
        let t0 = Instant::now();
        for _ in 0..11 {
            p.wait();
        }
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(45), "{el:?}");
    }
}
