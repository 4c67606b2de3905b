//! Relay semantics with scripted sources, transforms and sinks: the newest frame wins and drops
//! are counted, the output repeats the last frame when the transform is slow (never stalls),
//! a placeholder shows before the first frame, every-frame mode loses nothing, a graceful stop
//! drains the queues, and failed reconfigurations keep the old stage running.
//!
//! Tests whose results depend on rates (frames written per second, placeholders while a
//! transform loads, a stop's duration) run the relay, their source and (where its time matters)
//! their transform on a [`ManualClock`]: time moves only when the test steps it, so the counts
//! are the same on an idle machine and on a loaded 2-core CI runner. A stepped test lets the
//! real-time work catch up between steps ([`advance_settled`]).
//!
//! Over 700 lines in one file for the same reason as `tests/cli.rs` (one test binary, one link)
//! and because its scripted stages and clock helpers are shared by every test in it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sdcam::frame::{ColorRange, Frame, PixelFormat};
use sdcam::profile::{OutputConfig, OutputKind, Profile, SourceConfig};
use sdcam::relay::clock::{Clock, ManualClock};
use sdcam::relay::{Opener, PreprocessConfig, Relay, RelayStart, PLACEHOLDER_RGB};
use sdcam::sink::Sink;
use sdcam::source::{Captured, Source};
use sdcam::stage::{StageInfo, StageResult};
use sdcam::transform::Transform;
use sdcam::Result;

/// Emits `count` frames (seq 0..count) whose red channel is seq % 256, at `fps` (0 = unpaced),
/// paced by `clock` (the real clock when `None`).
struct Counter {
    n: u64,
    count: u64,
    fps: f64,
    live: bool,
    clock: Option<ManualClock>,
}

impl Source for Counter {
    fn next_frame(&mut self) -> StageResult<Captured> {
        if self.n >= self.count {
            return Ok(Captured::End);
        }
        if self.fps > 0.0 {
            sleep(&self.clock, Duration::from_secs_f64(1.0 / self.fps));
        }
        let mut f = Frame::solid_rgb(8, 8, [(self.n % 256) as u8, 0, 0]);
        f.seq = self.n;
        self.n += 1;
        Ok(Captured::Frame(f))
    }
    fn describe(&self) -> String {
        "counter".into()
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn info(&self) -> StageInfo {
        StageInfo {
            live: self.live,
            reconnect_on_loss: self.live,
            ..StageInfo::default()
        }
    }
}

/// Passes frames through after sleeping `delay` (on `clock`, the real clock when `None`);
/// records the sequence numbers it saw.
struct Slow {
    delay: Duration,
    seen: Arc<Mutex<Vec<u64>>>,
    fail_apply: bool,
    clock: Option<ManualClock>,
}

/// Sleeps `d` on `clock`, or in real time.
fn sleep(clock: &Option<ManualClock>, d: Duration) {
    match clock {
        Some(c) => c.sleep(d),
        None => std::thread::sleep(d),
    }
}

/// Steps `clock` through `d` one timer at a time; after each step, waits (real time) until the
/// transform stage has taken every captured frame (transformed, or dropped and counted), so
/// the next output tick sees what a transform without a clock produced meanwhile.
/// Waits until the relay's clocked threads (`n` of them: the output, the source, a clocked
/// transform with a frame) wait on `clock`, so that moving time does not outrun a thread still
/// starting.
fn started(clock: &ManualClock, n: usize) {
    assert!(
        clock.wait_for_timers(n, Duration::from_secs(10)),
        "the relay did not start"
    );
}

fn advance_settled(clock: &ManualClock, relay: &Relay, d: Duration) {
    let target = clock.elapsed() + d;
    loop {
        let t0 = Instant::now();
        loop {
            let s = relay.stats().snapshot();
            if s.captured == s.transformed + s.input_dropped {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "transform stalled");
            std::thread::sleep(Duration::from_micros(200));
        }
        match clock.next_due() {
            Some(due) if due <= target => {
                clock.step();
            }
            _ => break,
        }
    }
    clock.advance(target.saturating_sub(clock.elapsed()));
}

impl Transform for Slow {
    fn name(&self) -> String {
        "slow".into()
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        sleep(&self.clock, self.delay);
        self.seen.lock().unwrap().push(input.seq);
        Ok(input.clone())
    }
    fn apply(&mut self, _options: &sdcam::transform::TransformOptions) -> Result<()> {
        anyhow::ensure!(!self.fail_apply, "refused");
        Ok(())
    }
}

/// (sequence number, first pixel as RGB) of a written frame.
type Written = (u64, [u8; 3]);

/// Records every written frame.
#[derive(Clone, Default)]
struct Recorder {
    frames: Arc<Mutex<Vec<Written>>>,
}

impl Sink for Recorder {
    fn write(&mut self, frame: &Frame) -> StageResult<()> {
        assert_eq!(frame.format, PixelFormat::Rgb24);
        self.frames
            .lock()
            .unwrap()
            .push((frame.seq, frame.rgb_at(0, 0)));
        Ok(())
    }
    fn wants(&self) -> PixelFormat {
        PixelFormat::Rgb24
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
    fn info(&self) -> StageInfo {
        StageInfo::default()
    }
}

/// Opens nothing successfully: reconfigurations fail.
struct NoOpener;

impl Opener for NoOpener {
    fn source(&self, _cfg: &sdcam::source::SourceOptions) -> Result<Box<dyn Source>> {
        anyhow::bail!("no such source")
    }
    fn sink(&self, _cfg: &sdcam::relay::OutputOptions) -> Result<Box<dyn Sink>> {
        anyhow::bail!("no such sink")
    }
}

struct Setup {
    source: Counter,
    delay: Duration,
    out_fps: f64,
    every_frame: bool,
    max_frames: Option<u64>,
    /// The clock the relay paces by (the real one when `None`).
    clock: Option<ManualClock>,
    /// Whether the transform's delay passes on `clock` too (else in real time).
    clocked_transform: bool,
}

fn start(s: Setup) -> (Relay, Recorder, Arc<Mutex<Vec<u64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = Recorder::default();
    let output_cfg = OutputConfig {
        kind: OutputKind::Null,
        width: 8,
        height: 8,
        fps: s.out_fps,
        ..Default::default()
    };
    let clock: Arc<dyn Clock> = match &s.clock {
        Some(c) => Arc::new(c.clone()),
        None => Arc::new(sdcam::relay::clock::SystemClock),
    };
    let relay = Relay::start_with_clock(
        RelayStart {
            source: Box::new(s.source),
            source_cfg: sdcam::config::source_options(&SourceConfig::default()),
            transform: Some(Box::new(Slow {
                delay: s.delay,
                seen: seen.clone(),
                fail_apply: true,
                clock: s.clock.clone().filter(|_| s.clocked_transform),
            })),
            sink: Box::new(rec.clone()),
            output_cfg: sdcam::config::output_options(&output_cfg),
            preprocess: PreprocessConfig {
                width: 8,
                height: 8,
                fit: Default::default(),
                mirror: false,
            },
            every_frame: s.every_frame,
            max_frames: s.max_frames,
            opener: Arc::new(NoOpener),
        },
        clock,
    )
    .unwrap();
    (relay, rec, seen)
}

#[test]
fn slow_transform_takes_newest_frames_and_output_repeats() {
    // Camera at 200 fps, transform at ~20 fps, output at 50 fps, for 60 output frames; all
    // three on one manual clock.
    let clock = ManualClock::new();
    let (relay, rec, seen) = start(Setup {
        source: Counter {
            n: 0,
            count: u64::MAX,
            fps: 200.0,
            live: true,
            clock: Some(clock.clone()),
        },
        delay: Duration::from_millis(50),
        out_fps: 50.0,
        every_frame: false,
        max_frames: Some(60),
        clock: Some(clock.clone()),
        clocked_transform: true,
    });
    let t0 = clock.now();
    started(&clock, 2);
    let snap = {
        let _driver = clock.drive();
        relay.join().unwrap()
    };
    let elapsed = clock.now() - t0;
    assert_eq!(snap.written, 60);
    // Steady output rate: 60 frames at 50 fps ≈ 1.2 s, no stall behind the slow transform.
    assert!(
        elapsed < Duration::from_millis(2500),
        "output stalled: {elapsed:?}"
    );
    assert!(
        snap.repeated >= 20,
        "output must repeat frames while the transform is slow: {snap:?}"
    );
    assert!(
        snap.input_dropped > 50,
        "stale camera frames must be dropped and counted: {snap:?}"
    );
    // The transform skipped ahead: consecutive processed frames are far apart in sequence.
    let seen = seen.lock().unwrap();
    let gaps: Vec<u64> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g >= 1), "{gaps:?}");
    assert!(
        gaps.iter().filter(|&&g| g > 3).count() >= gaps.len() / 2,
        "not taking the newest: {gaps:?}"
    );
    // Written sequence numbers never go backwards.
    let written = rec.frames.lock().unwrap();
    assert!(written.windows(2).all(|w| w[1].0 >= w[0].0 || w[0].0 == 0));
}

#[test]
fn placeholder_streams_before_the_first_frame() {
    // The transform takes 300 ms for the first frame; the output must already be streaming.
    let clock = ManualClock::new();
    let (relay, rec, _) = start(Setup {
        source: Counter {
            n: 0,
            count: u64::MAX,
            fps: 30.0,
            live: true,
            clock: Some(clock.clone()),
        },
        delay: Duration::from_millis(300),
        out_fps: 50.0,
        every_frame: false,
        max_frames: Some(10),
        clock: Some(clock.clone()),
        clocked_transform: true,
    });
    started(&clock, 2);
    let snap = {
        let _driver = clock.drive();
        relay.join().unwrap()
    };
    assert!(snap.placeholders >= 5, "{snap:?}");
    let frames = rec.frames.lock().unwrap();
    assert_eq!(frames[0].1, PLACEHOLDER_RGB);
}

#[test]
fn every_frame_mode_loses_nothing_and_drains_on_end() {
    // A file-like source of 40 frames, a transform slower than the source: all 40 come out, in order.
    let (relay, rec, _) = start(Setup {
        source: Counter {
            n: 0,
            count: 40,
            fps: 0.0,
            live: false,
            clock: None,
        },
        delay: Duration::from_millis(2),
        out_fps: 30.0,
        every_frame: true,
        max_frames: None,
        clock: None,
        clocked_transform: false,
    });
    let snap = relay.join().unwrap();
    let frames = rec.frames.lock().unwrap();
    let seqs: Vec<u64> = frames.iter().map(|f| f.0).collect();
    assert_eq!(seqs, (0..40).collect::<Vec<_>>());
    assert_eq!(
        (snap.input_dropped, snap.output_dropped, snap.repeated),
        (0, 0, 0)
    );
    // Colours survive the RGB path untouched.
    assert!(frames
        .iter()
        .all(|(s, rgb)| rgb == &[(*s % 256) as u8, 0, 0]));
}

#[test]
fn graceful_stop_drains_queued_frames() {
    let clock = ManualClock::new();
    let (relay, rec, seen) = start(Setup {
        source: Counter {
            n: 0,
            count: u64::MAX,
            fps: 100.0,
            live: true,
            clock: Some(clock.clone()),
        },
        delay: Duration::from_millis(20),
        out_fps: 100.0,
        every_frame: false,
        max_frames: None,
        clock: Some(clock.clone()),
        clocked_transform: true,
    });
    started(&clock, 2);
    clock.advance(Duration::from_millis(400));
    relay.request_stop();
    let t0 = clock.now();
    let snap = {
        let _driver = clock.drive();
        relay.join().unwrap()
    };
    let elapsed = || clock.now() - t0;
    assert!(
        elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        elapsed()
    );
    // The last frame the transform produced reached the sink.
    let last_seen = *seen.lock().unwrap().last().unwrap();
    let frames = rec.frames.lock().unwrap();
    assert_eq!(
        frames.last().unwrap().0,
        last_seen,
        "the drained frame was not written"
    );
    assert_eq!(snap.written as usize, frames.len());
}

#[test]
fn failed_reconfiguration_keeps_the_stage_running() {
    let clock = ManualClock::new();
    let (relay, rec, _) = start(Setup {
        source: Counter {
            n: 0,
            count: u64::MAX,
            fps: 100.0,
            live: true,
            clock: Some(clock.clone()),
        },
        delay: Duration::from_millis(1),
        out_fps: 50.0,
        every_frame: false,
        max_frames: None,
        clock: Some(clock.clone()),
        clocked_transform: false,
    });
    started(&clock, 2);
    advance_settled(&clock, &relay, Duration::from_millis(200));
    // The capture stage serves the switch between two frames: the clock runs meanwhile.
    let driver = clock.drive();
    // Source and sink cannot be opened, the transform refuses the settings: all report errors...
    assert!(relay
        .set_source(sdcam::config::source_options(&SourceConfig::default()))
        .is_err());
    let y4m = OutputConfig {
        kind: OutputKind::Y4m,
        width: 8,
        height: 8,
        ..Default::default()
    };
    assert!(relay
        .set_output(sdcam::config::output_options(&y4m))
        .is_err());
    assert!(relay
        .apply_transform(&sdcam::config::transform_options(&Profile::default()))
        .is_err());
    drop(driver);
    advance_settled(&clock, &relay, Duration::ZERO);
    let before = rec.frames.lock().unwrap().len();
    advance_settled(&clock, &relay, Duration::from_millis(300));
    // ...and frames keep flowing from the old source through the old transform to the old sink.
    let frames = rec.frames.lock().unwrap().clone();
    assert!(
        frames.len() >= before + 8,
        "output stopped: {before} → {}",
        frames.len()
    );
    assert!(
        frames.last().unwrap().0 > frames[before.saturating_sub(1)].0,
        "source stopped"
    );
    relay.request_stop();
    let _driver = clock.drive();
    relay.join().unwrap();
}

#[test]
fn pause_holds_the_last_frame() {
    let clock = ManualClock::new();
    let (relay, rec, _) = start(Setup {
        source: Counter {
            n: 0,
            count: u64::MAX,
            fps: 100.0,
            live: true,
            clock: Some(clock.clone()),
        },
        delay: Duration::from_millis(1),
        out_fps: 50.0,
        every_frame: false,
        max_frames: None,
        clock: Some(clock.clone()),
        clocked_transform: false,
    });
    started(&clock, 2);
    advance_settled(&clock, &relay, Duration::from_millis(200));
    relay.set_paused(true);
    advance_settled(&clock, &relay, Duration::from_millis(100));
    let n = rec.frames.lock().unwrap().len();
    advance_settled(&clock, &relay, Duration::from_millis(300));
    let frames = rec.frames.lock().unwrap().clone();
    assert!(
        frames.len() >= n + 10,
        "output must keep streaming while paused"
    );
    assert!(
        frames[n..].iter().all(|f| f.0 == frames[n].0),
        "paused output changed"
    );
    relay.set_paused(false);
    advance_settled(&clock, &relay, Duration::from_millis(200));
    assert!(
        rec.frames.lock().unwrap().last().unwrap().0 > frames[n].0,
        "resume did not resume"
    );
    relay.request_stop();
    let _driver = clock.drive();
    relay.join().unwrap();
}

#[test]
fn yuv_sink_gets_converted_frames() {
    // Post-processing converts to whatever the sink wants, at the output size.
    struct Yuyv(Arc<Mutex<Vec<Frame>>>);
    impl Sink for Yuyv {
        fn write(&mut self, f: &Frame) -> StageResult<()> {
            self.0.lock().unwrap().push(f.clone());
            Ok(())
        }
        fn wants(&self) -> PixelFormat {
            PixelFormat::Yuyv
        }
        fn describe(&self) -> String {
            "yuyv".into()
        }
        fn info(&self) -> StageInfo {
            StageInfo::default()
        }
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let relay = Relay::start(RelayStart {
        source: Box::new(Counter {
            n: 255,
            count: 256,
            fps: 0.0,
            live: false,
            clock: None,
        }),
        source_cfg: sdcam::config::source_options(&SourceConfig::default()),
        transform: Some(Box::new(Slow {
            delay: Duration::ZERO,
            seen: Default::default(),
            fail_apply: false,
            clock: None,
        })),
        sink: Box::new(Yuyv(got.clone())),
        output_cfg: sdcam::config::output_options(&OutputConfig {
            width: 16,
            height: 4,
            ..Default::default()
        }),
        preprocess: PreprocessConfig {
            width: 8,
            height: 8,
            fit: Default::default(),
            mirror: false,
        },
        every_frame: true,
        max_frames: None,
        opener: Arc::new(NoOpener),
    })
    .unwrap();
    relay.join().unwrap();
    let frames = got.lock().unwrap();
    assert_eq!(frames.len(), 1);
    let f = &frames[0];
    assert_eq!(
        (f.format, f.width, f.height, f.range),
        (PixelFormat::Yuyv, 16, 4, ColorRange::Limited)
    );
    // Pure red in BT.601 limited range: Y 82, U 90, V 240.
    assert_eq!(&f.data[..4], &[82, 90, 82, 240]);
}

#[test]
fn relay_streams_placeholders_until_the_transform_arrives() {
    for every_frame in [false, true] {
        let rec = Recorder::default();
        let clock = ManualClock::new();
        let source = Counter {
            n: 0,
            count: 30,
            fps: 100.0,
            live: !every_frame,
            clock: Some(clock.clone()),
        };
        let relay = rig(
            source,
            None,
            Box::new(rec.clone()),
            null_output(100.0),
            every_frame,
            None,
            Arc::new(NoOpener),
        );
        // A model "loading" for 150 ms.
        started(&clock, if every_frame { 1 } else { 2 });
        clock.advance(Duration::from_millis(150));
        let early = relay.stats().snapshot();
        assert_eq!(early.transformed, 0);
        if !every_frame {
            assert!(
                early.placeholders >= 5,
                "no placeholder while loading: {early:?}"
            );
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        relay
            .replace_transform(Box::new(Slow {
                delay: Duration::ZERO,
                seen: seen.clone(),
                fail_apply: false,
                clock: None,
            }))
            .unwrap();
        let snap = {
            let _driver = clock.drive();
            relay.join().unwrap()
        };
        assert!(snap.transformed > 0);
        if every_frame {
            // Nothing was lost while the transform was loading.
            assert_eq!(*seen.lock().unwrap(), (0..30).collect::<Vec<_>>());
            assert_eq!(snap.written, 30);
        }
    }
}

/// Returns each frame `lag` frames later, like Stream Batch with `lag + 1` steps; `flush`
/// releases the frames it holds.
struct Lag {
    lag: usize,
    held: std::collections::VecDeque<Frame>,
}

impl Lag {
    fn boxed(lag: usize) -> Box<Lag> {
        Box::new(Lag {
            lag,
            held: Default::default(),
        })
    }
}

impl Transform for Lag {
    fn name(&self) -> String {
        format!("lag {}", self.lag)
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        Ok(input.clone())
    }
    fn process_into(&mut self, input: &Frame, out: &mut Vec<Frame>) -> Result<()> {
        self.held.push_back(input.clone());
        while self.held.len() > self.lag {
            out.extend(self.held.pop_front());
        }
        Ok(())
    }
    fn flush(&mut self, out: &mut Vec<Frame>) -> Result<()> {
        out.extend(self.held.drain(..));
        Ok(())
    }
    fn held(&self) -> u64 {
        self.held.len() as u64
    }
    fn apply(&mut self, _options: &sdcam::transform::TransformOptions) -> Result<()> {
        Ok(())
    }
}

/// A relay over 8×8 frames from `source` into `sink` (output `output`, pre-processing 8×8),
/// paced by the source's clock.
fn rig(
    source: Counter,
    transform: Option<Box<dyn Transform>>,
    sink: Box<dyn Sink>,
    output: OutputConfig,
    every_frame: bool,
    max_frames: Option<u64>,
    opener: Arc<dyn Opener>,
) -> Relay {
    let clock: Arc<dyn Clock> = match source.clock.clone() {
        Some(c) => Arc::new(c),
        None => Arc::new(sdcam::relay::clock::SystemClock),
    };
    Relay::start_with_clock(
        RelayStart {
            source: Box::new(source),
            source_cfg: sdcam::config::source_options(&SourceConfig::default()),
            transform,
            sink,
            output_cfg: sdcam::config::output_options(&output),
            preprocess: PreprocessConfig {
                width: 8,
                height: 8,
                fit: Default::default(),
                mirror: false,
            },
            every_frame,
            max_frames,
            opener,
        },
        clock,
    )
    .unwrap()
}

/// An 8×8 null output at `fps`.
fn null_output(fps: f64) -> OutputConfig {
    OutputConfig {
        kind: OutputKind::Null,
        width: 8,
        height: 8,
        fps,
        ..Default::default()
    }
}

/// An unpaced file-like source of `count` frames.
fn file_like(count: u64) -> Counter {
    Counter {
        n: 0,
        count,
        fps: 0.0,
        live: false,
        clock: None,
    }
}

/// An every-frame relay over `count` frames at `fps` (0 = as fast as the relay takes them).
fn every_frame_relay(
    count: u64,
    fps: f64,
    transform: Option<Box<dyn Transform>>,
) -> (Relay, Recorder) {
    let rec = Recorder::default();
    let relay = rig(
        Counter {
            fps,
            ..file_like(count)
        },
        transform,
        Box::new(rec.clone()),
        null_output(30.0),
        true,
        None,
        Arc::new(NoOpener),
    );
    (relay, rec)
}

/// Issue 11 §1: a source that ends before the transform is built still has every frame
/// written, and the frames a lagging transform holds are flushed at the end of the stream.
#[test]
fn every_frame_mode_writes_frames_of_a_source_that_ended_before_the_transform() {
    for count in [1, 2] {
        let (relay, rec) = every_frame_relay(count, 0.0, None);
        let t0 = Instant::now();
        while relay.stats().snapshot().captured < count {
            assert!(t0.elapsed() < Duration::from_secs(10), "capture stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The source has ended (its stage may already be gone): the model arrives late.
        std::thread::sleep(Duration::from_millis(100));
        relay.replace_transform(Lag::boxed(3)).unwrap();
        let snap = relay.join().unwrap();
        let seqs: Vec<u64> = rec.frames.lock().unwrap().iter().map(|f| f.0).collect();
        assert_eq!(seqs, (0..count).collect::<Vec<_>>(), "{snap:?}");
        assert_eq!((snap.written, snap.output_dropped), (count, 0));
    }
}

/// A transform replaced mid-stream in every-frame mode finishes the frames it holds first;
/// `--frames` (max_frames) ends the stream after that many captured frames, all written.
#[test]
fn every_frame_mode_flushes_a_replaced_transform_and_counts_captured_frames() {
    // Paced (1 ms a frame), so that the replace comes mid-stream.
    let (relay, rec) = every_frame_relay(200, 1000.0, Some(Lag::boxed(2)));
    let t0 = Instant::now();
    while relay.stats().snapshot().written < 5 {
        assert!(t0.elapsed() < Duration::from_secs(10), "nothing written");
        std::thread::sleep(Duration::from_millis(1));
    }
    relay.replace_transform(Lag::boxed(3)).unwrap();
    let snap = relay.join().unwrap();
    let seqs: Vec<u64> = rec.frames.lock().unwrap().iter().map(|f| f.0).collect();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    assert_eq!(snap.written, 200);

    let rec = Recorder::default();
    let relay = rig(
        file_like(u64::MAX),
        Some(Lag::boxed(3)),
        Box::new(rec.clone()),
        null_output(30.0),
        true,
        Some(7),
        Arc::new(NoOpener),
    );
    let snap = relay.join().unwrap();
    let seqs: Vec<u64> = rec.frames.lock().unwrap().iter().map(|f| f.0).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert_eq!((snap.captured, snap.written), (7, 7));
}

/// Real time: a stop does not wait for queued frames, and every captured frame is written or
/// counted (dropped at the input, held by the transform, or failed).
#[test]
fn real_time_accounts_for_every_captured_frame() {
    let rec = Recorder::default();
    let clock = ManualClock::new();
    let source = Counter {
        n: 0,
        count: u64::MAX,
        fps: 500.0,
        live: true,
        clock: Some(clock.clone()),
    };
    let relay = rig(
        source,
        Some(Lag::boxed(2)),
        Box::new(rec.clone()),
        null_output(1000.0),
        false,
        None,
        Arc::new(NoOpener),
    );
    started(&clock, 2);
    clock.advance(Duration::from_millis(300));
    relay.request_stop();
    let snap = {
        let _driver = clock.drive();
        relay.join().unwrap()
    };
    let fresh = snap.written - snap.repeated - snap.placeholders;
    assert_eq!(
        snap.captured,
        fresh + snap.input_dropped + snap.output_dropped,
        "{snap:?}"
    );
    assert!(snap.captured > 20, "{snap:?}");
}

/// A file output replaced live whose final flush fails (frames counted as written are lost):
/// the relay keeps running on the new output and ends with an error, not a success.
#[test]
fn a_lost_flush_of_a_replaced_output_is_an_error_at_the_end() {
    struct FailingFinish;
    impl Sink for FailingFinish {
        fn write(&mut self, _frame: &Frame) -> StageResult<()> {
            Ok(())
        }
        fn wants(&self) -> PixelFormat {
            PixelFormat::Rgb24
        }
        fn describe(&self) -> String {
            "full disk".into()
        }
        /// A file output: its final flush writes buffered frames.
        fn info(&self) -> StageInfo {
            StageInfo {
                buffers_frames: true,
                ..StageInfo::default()
            }
        }
        fn finish(&mut self) -> Result<()> {
            anyhow::bail!("No space left on device")
        }
    }
    struct RecorderOpener(Recorder);
    impl Opener for RecorderOpener {
        fn source(&self, _cfg: &sdcam::source::SourceOptions) -> Result<Box<dyn Source>> {
            anyhow::bail!("no such source")
        }
        fn sink(&self, _cfg: &sdcam::relay::OutputOptions) -> Result<Box<dyn Sink>> {
            Ok(Box::new(self.0.clone()))
        }
    }
    let rec = Recorder::default();
    let cfg = OutputConfig {
        kind: OutputKind::Y4m,
        width: 8,
        height: 8,
        ..Default::default()
    };
    let clock = ManualClock::new();
    let source = Counter {
        n: 0,
        count: 50,
        fps: 200.0,
        live: false,
        clock: Some(clock.clone()),
    };
    let relay = rig(
        source,
        Some(Lag::boxed(0)),
        Box::new(FailingFinish),
        cfg.clone(),
        true,
        None,
        Arc::new(RecorderOpener(rec.clone())),
    );
    started(&clock, 1);
    clock.advance(Duration::from_millis(50));
    relay
        .set_output(sdcam::config::output_options(&OutputConfig {
            path: "other.y4m".into(),
            ..cfg
        }))
        .unwrap();
    let err = {
        let _driver = clock.drive();
        format!("{:#}", relay.join().unwrap_err())
    };
    assert!(
        err.contains("previous output") && err.contains("No space"),
        "{err}"
    );
    assert!(
        !rec.frames.lock().unwrap().is_empty(),
        "the new output got no frames"
    );
}
