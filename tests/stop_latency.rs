//! A stop, a source change and a reconfiguration are prompt whatever the rates: a source at
//! 0.1 fps (one frame every 10 s) and an output at 0.1 fps do not hold a stop or a source change
//! for a period, and a stop signal does not wait behind a transform that is slow to acknowledge
//! a change. Bounds are generous (seconds against a 10 s period) so the tests are not flaky.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdcam::frame::{Frame, PixelFormat};
use sdcam::profile::{OutputConfig, OutputKind, Profile, SourceConfig, SourceKind};
use sdcam::relay::{DeviceOpener, PreprocessConfig, Relay, RelayStart};
use sdcam::sink::null::NullSink;
use sdcam::source::pattern::PatternSource;
use sdcam::transform::Transform;
use sdcam::Result;

/// Passes frames through after sleeping `delay` per frame.
struct Slow {
    delay: Duration,
}

impl Transform for Slow {
    fn name(&self) -> String {
        "slow".into()
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        std::thread::sleep(self.delay);
        Ok(input.clone())
    }
    fn apply(&mut self, _options: &sdcam::transform::TransformOptions) -> Result<()> {
        Ok(())
    }
}

fn start(fps: f64, delay: Duration) -> Relay {
    let source_cfg = SourceConfig {
        kind: SourceKind::Pattern,
        width: 32,
        height: 32,
        fps,
        ..Default::default()
    };
    Relay::start(RelayStart {
        source: Box::new(PatternSource::new(32, 32, fps)),
        source_cfg: sdcam::config::source_options(&source_cfg),
        transform: Some(Box::new(Slow { delay })),
        sink: Box::new(NullSink::new(PixelFormat::Rgb24)),
        output_cfg: sdcam::config::output_options(&OutputConfig {
            kind: OutputKind::Null,
            width: 32,
            height: 32,
            fps,
            ..Default::default()
        }),
        preprocess: PreprocessConfig {
            width: 32,
            height: 32,
            fit: Default::default(),
            mirror: false,
        },
        every_frame: false,
        max_frames: None,
        opener: Arc::new(DeviceOpener),
    })
    .unwrap()
}

/// Stop with `source.fps = output.fps = 0.1`: the capture stage's pacing sleep and the output's
/// wait for its tick wake at once (before: one period, 10 s, each).
#[test]
fn stop_at_a_tenth_of_a_frame_per_second_is_prompt() {
    let relay = start(0.1, Duration::ZERO);
    // Let the stages reach their long waits.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    relay.request_stop();
    relay.join().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
}

/// A source change while the current source waits a 10 s period for its next frame.
#[test]
fn source_change_at_a_tenth_of_a_frame_per_second_is_prompt() {
    let relay = start(0.1, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    relay
        .set_source(sdcam::config::source_options(&SourceConfig {
            kind: SourceKind::Pattern,
            width: 48,
            height: 32,
            fps: 0.1,
            ..Default::default()
        }))
        .unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "source change took {took:?}");
    relay.request_stop();
    relay.join().unwrap();
}

/// A change waits for the transform stage's acknowledgement, which comes only between frames:
/// with a 3 s frame it waited up to 3 s (or 120 s for a stuck stage). A stop signal (the cancel
/// flag) makes the wait give up at once, so the run loop can stop.
#[test]
fn a_stop_signal_cancels_the_wait_for_a_slow_transform() {
    let mut relay = start(30.0, Duration::from_secs(3));
    let cancel = Arc::new(AtomicBool::new(false));
    relay.set_cancel(cancel.clone());
    // The transform is inside its 3 s frame.
    std::thread::sleep(Duration::from_millis(300));
    let c = cancel.clone();
    let signal = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        c.store(true, Relaxed);
    });
    let t0 = Instant::now();
    let e = relay
        .apply_transform(&sdcam::config::transform_options(&Profile::default()))
        .unwrap_err();
    let took = t0.elapsed();
    signal.join().unwrap();
    assert!(format!("{e:#}").contains("interrupted by a stop"), "{e:#}");
    assert!(took < Duration::from_millis(1500), "gave up after {took:?}");
    relay.request_stop();
    relay.join().unwrap();
}
