//! The on-demand virtual camera's state machine: is anybody watching, so that the pipeline
//! (camera, model) should run, or is nobody, so that sdcam idles on a hold frame?
//!
//! Pure: no threads, no I/O, no clock of its own. The relay feeds it what
//! [`crate::v4l2::clients::ClientWatcher`] observes, the periodic re-checks, clock ticks and the
//! `wake` / `sleep` commands, each with the time (`now`, from the relay's
//! [`super::clock::Clock`]), and acts on the [`Action`] it returns: [`Action::Wake`] (reopen
//! the source, resume the model) or [`Action::Sleep`] (release the source, pause the model,
//! write the hold frame at the idle rate). Between inputs the relay waits at most until
//! [`Demand::next_deadline`] (with `ClientWatcher::observe(timeout)`), then sends a
//! [`Input::Tick`], or a [`Input::Rechecked`] when [`Demand::recheck_due`].
//!
//! The rules, and why:
//! - **A streaming reader wakes at once.** The driver's count (or, without the client-usage
//!   event, a process that maps the node) means a STREAMON or mmap buffers: not a probe.
//! - **A probe never wakes.** Browsers enumerate devices by opening, querying and closing in
//!   milliseconds; that is an *opener* that never maps and never streams. Only a process that
//!   keeps the node open without mapping it for [`OPENER_AS_READER_AFTER`] counts as a reader,
//!   and only without the driver's event (a `read()`-I/O reader never maps; with the event, the
//!   driver's count is the truth).
//! - **Leaving is not instant.** With no reader, the pipeline stays live for [`LINGER`] before
//!   it sleeps: apps stop and restart streaming when they change resolution or when the user
//!   picks the camera again in a settings page, and each wake costs the camera's open time (and
//!   its light flickering).
//! - **Nothing missed lasts.** Every [`RECHECK_EVERY`] the relay asks the watcher for a full
//!   re-check (a fresh driver count, a full `/proc` scan) and feeds it as [`Input::Rechecked`];
//!   the counts it carries replace whatever the machine believed, so a missed event or inotify
//!   record costs at most one period (plus [`LINGER`] on the way down). A reader killed
//!   mid-stream closes its descriptor, which the watcher sees (the driver's event on close, or
//!   inotify), so it returns to idle after [`LINGER`].
//! - **`wake` / `sleep` pin the state** until [`Command::Auto`] (for tests and for users who
//!   want the pipeline warm): the counts keep being tracked and reported meanwhile.

use std::fmt;
use std::time::{Duration, Instant};

use crate::v4l2::clients::{CountSource, Observation};

/// How often the relay asks for a full re-check: bounds how long a missed event or inotify
/// record can keep the camera in the wrong state. A full `/proc` scan costs a few µs per open
/// descriptor on the machine (see [`crate::v4l2::clients`]): ms on a quiet machine, tens of ms
/// on a busy desktop, i.e. up to 1–2 % of a core at this period; the relay may stretch the
/// scan part where inotify works (it misses nothing but openers through another device inode).
pub const RECHECK_EVERY: Duration = Duration::from_secs(2);
/// How long the pipeline stays live after the last reader left: covers a reader's
/// STREAMOFF/STREAMON around a resolution change and a user re-picking the camera, which would
/// otherwise close and reopen the camera (seconds of black and a flickering light).
pub const LINGER: Duration = Duration::from_secs(3);
/// Without the driver's event, how long an opener that never maps the node must hold it before
/// it counts as a reader (a `read()`-I/O reader). Device enumeration (open, query, close) takes
/// milliseconds; a reader that maps does so within milliseconds of opening.
pub const OPENER_AS_READER_AFTER: Duration = Duration::from_secs(2);
/// How often to look again while an opener has not mapped the node yet (fallback only): the
/// reader's mmap follows its open by milliseconds, and the wake must come within 500 ms.
pub const PENDING_LOOK_EVERY: Duration = Duration::from_millis(100);

/// What the relay feeds the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// What the watcher saw after an event (or a wait that ended).
    Observed(Observation),
    /// A full re-check's result (see [`RECHECK_EVERY`]).
    Rechecked(Observation),
    /// Time passed (a deadline from [`Demand::next_deadline`]).
    Tick,
    /// A `wake` / `sleep` / `auto` command.
    Command(Command),
}

/// A forced state (stdin `wake` / `sleep`), or back to automatic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Live until [`Command::Auto`] or [`Command::Sleep`], viewers or not.
    Wake,
    /// Idle until [`Command::Auto`] or [`Command::Wake`], viewers or not.
    Sleep,
    /// Follow the viewers again.
    Auto,
}

/// What the relay must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reopen the source and resume the model (warm start).
    Wake,
    /// Release the source, pause the model, stream the hold frame at the idle rate.
    Sleep,
}

/// The state for the status line and `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Whether the pipeline runs.
    pub live: bool,
    /// Readers counted now (see [`Observation::readers`]).
    pub viewers: u32,
    /// How long the current state has lasted.
    pub since: Duration,
    /// The state is pinned by a command.
    pub forced: bool,
    /// Where the count comes from; `None` before the first observation.
    pub source: Option<CountSource>,
}

impl fmt::Display for Status {
    /// `live (2 viewers) for 12 s`, `idle (no viewers) for 3 s`, `+ (forced)` when pinned.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let viewers = match self.viewers {
            0 => "no viewers".to_string(),
            1 => "1 viewer".to_string(),
            n => format!("{n} viewers"),
        };
        let state = if self.live { "live" } else { "idle" };
        write!(f, "{state} ({viewers}) for {} s", self.since.as_secs())?;
        if self.forced {
            f.write_str(" (forced)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Live,
    Idle,
}

/// The on-demand state machine (see the module doc for the rules).
#[derive(Debug, Clone)]
pub struct Demand {
    live: bool,
    /// When the current state (live or idle) began.
    since: Instant,
    mode: Mode,
    obs: Option<Observation>,
    /// Since when some other process holds the node (continuously).
    openers_since: Option<Instant>,
    /// Since when the pipeline is live with no reader.
    empty_since: Option<Instant>,
    last_recheck: Instant,
}

impl Demand {
    /// A machine that starts idle at `now` (the relay opens the loopback writer first and
    /// streams the hold frame until a reader comes), following the viewers.
    pub fn new(now: Instant) -> Demand {
        Demand {
            live: false,
            since: now,
            mode: Mode::Auto,
            obs: None,
            openers_since: None,
            empty_since: None,
            last_recheck: now,
        }
    }

    /// Whether the pipeline should run now.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Feeds one input at `now`; returns what the relay must do, if anything.
    pub fn step(&mut self, now: Instant, input: Input) -> Option<Action> {
        match input {
            Input::Observed(o) => self.take(now, o),
            Input::Rechecked(o) => {
                self.last_recheck = now;
                self.take(now, o);
            }
            Input::Tick => {}
            Input::Command(Command::Wake) => self.mode = Mode::Live,
            Input::Command(Command::Sleep) => self.mode = Mode::Idle,
            Input::Command(Command::Auto) => self.mode = Mode::Auto,
        }
        self.decide(now)
    }

    fn take(&mut self, now: Instant, o: Observation) {
        if o.openers == 0 {
            self.openers_since = None;
        } else if self.openers_since.is_none() {
            self.openers_since = Some(now);
        }
        self.obs = Some(o);
    }

    /// Readers counted now: the watcher's count, plus, without the driver's event, openers
    /// that never mapped once they have held on for [`OPENER_AS_READER_AFTER`].
    fn viewers(&self, now: Instant) -> u32 {
        let Some(o) = self.obs else {
            return 0;
        };
        let readers = o.readers();
        if o.source() == CountSource::Fallback
            && self
                .openers_since
                .is_some_and(|t| now.saturating_duration_since(t) >= OPENER_AS_READER_AFTER)
        {
            return readers.max(o.openers);
        }
        readers
    }

    fn decide(&mut self, now: Instant) -> Option<Action> {
        let viewers = self.viewers(now);
        let want_live = match self.mode {
            Mode::Live => true,
            Mode::Idle => false,
            Mode::Auto if viewers > 0 => {
                self.empty_since = None;
                true
            }
            Mode::Auto if !self.live => false,
            Mode::Auto => {
                let empty = *self.empty_since.get_or_insert(now);
                now.saturating_duration_since(empty) < LINGER
            }
        };
        if want_live == self.live {
            return None;
        }
        self.live = want_live;
        self.since = now;
        self.empty_since = None;
        Some(if want_live {
            Action::Wake
        } else {
            Action::Sleep
        })
    }

    /// Whether a full re-check ([`Input::Rechecked`]) is due.
    pub fn recheck_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_recheck) >= RECHECK_EVERY
    }

    /// When the relay must feed the machine again at the latest (a [`Input::Tick`], or the
    /// re-check when due): the next re-check, the end of the [`LINGER`], the moment a held
    /// opener counts as a reader, or [`PENDING_LOOK_EVERY`] while an opener has not mapped.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = self.last_recheck + RECHECK_EVERY;
        if let (true, Some(t)) = (self.live, self.empty_since) {
            next = next.min(t + LINGER);
        }
        if let Some(o) = self.obs {
            if o.source() == CountSource::Fallback && o.openers > o.mappers {
                if let Some(t) = self.openers_since {
                    let counted = t + OPENER_AS_READER_AFTER;
                    if counted > now {
                        next = next.min(counted);
                    }
                }
                next = next.min(now + PENDING_LOOK_EVERY);
            }
        }
        next.max(now)
    }

    /// The state for the status line and `stats`.
    pub fn status(&self, now: Instant) -> Status {
        Status {
            live: self.live,
            viewers: self.viewers(now),
            since: now.saturating_duration_since(self.since),
            forced: self.mode != Mode::Auto,
            source: self.obs.map(|o| o.source()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ev(readers: u32, openers: u32) -> Observation {
        Observation {
            streaming_readers: Some(readers),
            openers,
            mappers: readers,
        }
    }

    fn fb(openers: u32, mappers: u32) -> Observation {
        Observation {
            streaming_readers: None,
            openers,
            mappers,
        }
    }

    /// A machine and a clock offset: `at(ms)` is the start plus `ms` milliseconds.
    fn machine() -> (Demand, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Demand::new(t0), move |ms| t0 + MS * ms as u32)
    }

    #[test]
    fn event_reader_wakes_at_once_and_leaves_after_linger() {
        let (mut d, at) = machine();
        assert!(!d.is_live());
        assert_eq!(d.step(at(0), Input::Observed(ev(0, 0))), None);
        assert_eq!(
            d.step(at(10), Input::Observed(ev(1, 1))),
            Some(Action::Wake)
        );
        assert!(d.is_live());
        assert_eq!(d.status(at(1010)).to_string(), "live (1 viewer) for 1 s");
        assert_eq!(d.step(at(5000), Input::Rechecked(ev(0, 0))), None);
        let linger_end = at(5000) + LINGER;
        assert_eq!(d.next_deadline(at(5000)), at(5000) + RECHECK_EVERY);
        assert_eq!(d.next_deadline(at(7000)), at(7000), "the re-check is due");
        d.step(at(7000), Input::Rechecked(ev(0, 0)));
        assert_eq!(d.next_deadline(at(7000)), linger_end);
        assert_eq!(d.step(linger_end - MS, Input::Tick), None);
        assert_eq!(d.step(linger_end, Input::Tick), Some(Action::Sleep));
        assert_eq!(
            d.status(linger_end).to_string(),
            "idle (no viewers) for 0 s"
        );
    }

    #[test]
    fn restart_within_linger_stays_live() {
        let (mut d, at) = machine();
        d.step(at(0), Input::Observed(ev(1, 1)));
        assert_eq!(d.step(at(100), Input::Observed(ev(0, 1))), None);
        assert_eq!(d.step(at(600), Input::Observed(ev(1, 1))), None);
        assert_eq!(
            d.step(at(100) + LINGER + MS, Input::Tick),
            None,
            "the linger was reset"
        );
        assert!(d.is_live());
    }

    #[test]
    fn probe_never_wakes_with_events() {
        let (mut d, at) = machine();
        // `v4l2-ctl --all`: opens, queries, closes; no STREAMON, so the driver says 0.
        assert_eq!(d.step(at(0), Input::Observed(ev(0, 1))), None);
        assert_eq!(d.step(at(30), Input::Observed(ev(0, 0))), None);
        // Even a long-held opener: with the event the driver's count is the truth.
        assert_eq!(d.step(at(100), Input::Observed(ev(0, 1))), None);
        assert_eq!(
            d.step(at(100) + OPENER_AS_READER_AFTER * 3, Input::Tick),
            None
        );
        assert!(!d.is_live());
    }

    #[test]
    fn probe_never_wakes_in_fallback() {
        let (mut d, at) = machine();
        assert_eq!(d.step(at(0), Input::Observed(fb(1, 0))), None);
        // While the opener has not mapped, the relay is asked to look again soon.
        assert_eq!(d.next_deadline(at(0)), at(0) + PENDING_LOOK_EVERY);
        assert_eq!(d.step(at(100), Input::Observed(fb(1, 0))), None);
        assert_eq!(d.step(at(150), Input::Observed(fb(0, 0))), None);
        assert_eq!(d.step(at(5000), Input::Tick), None);
        assert!(!d.is_live());
    }

    #[test]
    fn fallback_mapper_wakes_and_held_opener_counts_later() {
        let (mut d, at) = machine();
        d.step(at(0), Input::Observed(fb(1, 0)));
        assert_eq!(
            d.step(at(40), Input::Observed(fb(1, 1))),
            Some(Action::Wake)
        );
        assert_eq!(d.status(at(40)).source, Some(CountSource::Fallback));
        assert_eq!(d.step(at(3000), Input::Observed(fb(0, 0))), None);
        assert_eq!(d.step(at(3000) + LINGER, Input::Tick), Some(Action::Sleep));
        // A read()-I/O reader: holds the node, never maps.
        let t = at(10_000);
        assert_eq!(d.step(t, Input::Rechecked(fb(1, 0))), None);
        assert_eq!(d.next_deadline(t), t + PENDING_LOOK_EVERY);
        assert_eq!(d.step(t + OPENER_AS_READER_AFTER - MS, Input::Tick), None);
        assert_eq!(
            d.step(t + OPENER_AS_READER_AFTER, Input::Tick),
            Some(Action::Wake)
        );
        assert_eq!(d.status(t + OPENER_AS_READER_AFTER).viewers, 1);
    }

    #[test]
    fn missed_events_are_fixed_by_the_recheck() {
        // Missed the last reader's close: the stale count says 1; the re-check says 0.
        let (mut d, at) = machine();
        d.step(at(0), Input::Observed(ev(1, 1)));
        assert!(!d.recheck_due(at(1999)));
        assert!(d.recheck_due(at(2000)));
        assert_eq!(d.next_deadline(at(500)), at(2000));
        assert_eq!(d.step(at(2000), Input::Rechecked(ev(0, 0))), None);
        assert!(!d.recheck_due(at(2001)));
        assert_eq!(d.step(at(2000) + LINGER, Input::Tick), Some(Action::Sleep));
        // Missed a reader's start: the re-check wakes within one period.
        assert_eq!(
            d.step(at(6000), Input::Rechecked(ev(1, 1))),
            Some(Action::Wake)
        );
        // Fallback: a missed inotify record; the full scan finds the mapper.
        let (mut d, at) = machine();
        d.step(at(0), Input::Observed(fb(0, 0)));
        assert_eq!(
            d.step(at(2000), Input::Rechecked(fb(1, 1))),
            Some(Action::Wake)
        );
    }

    #[test]
    fn reader_killed_mid_stream_returns_to_idle() {
        let (mut d, at) = machine();
        d.step(at(0), Input::Observed(fb(1, 1)));
        assert!(d.is_live());
        // SIGKILL: the descriptor closes, inotify triggers a scan that finds nobody.
        d.step(at(7000), Input::Observed(fb(0, 0)));
        assert_eq!(d.step(at(7000) + LINGER, Input::Tick), Some(Action::Sleep));
    }

    #[test]
    fn two_readers() {
        let (mut d, at) = machine();
        assert_eq!(d.step(at(0), Input::Observed(fb(1, 1))), Some(Action::Wake));
        assert_eq!(d.step(at(500), Input::Observed(fb(2, 2))), None);
        assert_eq!(d.status(at(500)).to_string(), "live (2 viewers) for 0 s");
        // One leaves: still live, no linger started.
        assert_eq!(d.step(at(1000), Input::Observed(fb(1, 1))), None);
        assert_eq!(d.step(at(1000) + LINGER * 2, Input::Tick), None);
        assert_eq!(d.step(at(9000), Input::Observed(fb(0, 0))), None);
        assert_eq!(d.step(at(9000) + LINGER, Input::Tick), Some(Action::Sleep));
    }

    #[test]
    fn forced_wake_and_sleep() {
        let (mut d, at) = machine();
        assert_eq!(
            d.step(at(0), Input::Command(Command::Wake)),
            Some(Action::Wake)
        );
        assert_eq!(
            d.step(at(100) + LINGER * 5, Input::Observed(ev(0, 0))),
            None
        );
        assert!(d.is_live(), "pinned live without viewers");
        assert!(d.status(at(100)).forced);
        assert_eq!(
            d.step(at(20_000), Input::Command(Command::Sleep)),
            Some(Action::Sleep)
        );
        assert_eq!(d.step(at(20_100), Input::Observed(ev(1, 1))), None);
        assert!(!d.is_live(), "pinned idle with a viewer");
        assert_eq!(
            d.status(at(21_100)).to_string(),
            "idle (1 viewer) for 1 s (forced)"
        );
        assert_eq!(
            d.step(at(21_200), Input::Command(Command::Auto)),
            Some(Action::Wake)
        );
        // Back to automatic with no viewer: the linger applies.
        d.step(at(22_000), Input::Observed(ev(0, 0)));
        assert_eq!(
            d.step(at(22_000) + LINGER, Input::Tick),
            Some(Action::Sleep)
        );
    }

    #[test]
    fn timeouts_are_deadlines() {
        let (mut d, at) = machine();
        // Nothing going on: only the re-check.
        assert_eq!(d.next_deadline(at(0)), at(0) + RECHECK_EVERY);
        d.step(at(0), Input::Observed(fb(1, 0)));
        // A held opener: looked at every PENDING_LOOK_EVERY until it counts.
        assert_eq!(d.next_deadline(at(1950)), at(2000));
        // A deadline already passed is now.
        assert_eq!(d.next_deadline(at(5000)), at(5000));
    }
}
