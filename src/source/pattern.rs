//! The synthetic test pattern: colour bars, a moving ball and a frame counter, paced like a camera.
//!
//! It needs no hardware, so it is the default source and the one the offline demo and the
//! end-to-end tests use. Rendering is deterministic: frame `n` always looks the same.

use super::pacer::Pacer;
use super::{Captured, Source, Wake};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};

/// 75% colour bars (white, yellow, cyan, green, magenta, red, blue), as in SMPTE/EBU test charts.
const BARS: [[u8; 3]; 7] = [
    [191, 191, 191],
    [191, 191, 0],
    [0, 191, 191],
    [0, 191, 0],
    [191, 0, 191],
    [191, 0, 0],
    [0, 0, 191],
];

/// 3×5 bitmaps of the digits 0–9, one row per 3 bits (MSB left).
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b010, 0b010],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// Renders pattern frame `n` at `width`×`height` as RGB24.
pub fn render(width: u32, height: u32, n: u64) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut px = vec![0u8; w * h * 3];
    let bars_h = h * 2 / 3;
    for y in 0..h {
        for x in 0..w {
            let c = if y < bars_h {
                BARS[x * BARS.len() / w]
            } else {
                // A grey ramp that scrolls with time, so even a still crop changes.
                let v = ((x as u64 * 255 / w.max(1) as u64 + n * 4) % 256) as u8;
                [v, v, v]
            };
            px[(y * w + x) * 3..][..3].copy_from_slice(&c);
        }
    }
    // A ball bouncing around the frame.
    let r = (w.min(h) / 10).max(2) as i64;
    let t = n as f64 / 30.0;
    let cx = r + ((w as i64 - 2 * r) as f64 * (0.5 + 0.5 * (t * 1.3).sin())) as i64;
    let cy = r + ((h as i64 - 2 * r) as f64 * (0.5 + 0.5 * (t * 0.9).cos())) as i64;
    for y in (cy - r).max(0)..(cy + r).min(h as i64) {
        for x in (cx - r).max(0)..(cx + r).min(w as i64) {
            if (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                px[(y as usize * w + x as usize) * 3..][..3].copy_from_slice(&[255, 140, 0]);
            }
        }
    }
    draw_number(&mut px, w, h, n, (h / 60).max(1));
    px
}

/// Draws `n` in white on black in the top-left corner with `scale`-pixel blocks.
fn draw_number(px: &mut [u8], w: usize, h: usize, n: u64, scale: usize) {
    let text = n.to_string();
    let (cw, ch) = (4 * scale, 7 * scale);
    let box_w = (text.len() * cw + scale).min(w);
    for y in 0..ch.min(h) {
        for x in 0..box_w {
            px[(y * w + x) * 3..][..3].copy_from_slice(&[0, 0, 0]);
        }
    }
    for (i, d) in text.bytes().enumerate() {
        let glyph = DIGITS[(d - b'0') as usize];
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..3 {
                if bits & (0b100 >> gx) == 0 {
                    continue;
                }
                for sy in 0..scale {
                    for sx in 0..scale {
                        let x = scale + i * cw + gx * scale + sx;
                        let y = scale + gy * scale + sy;
                        if x < w && y < h {
                            px[(y * w + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
                        }
                    }
                }
            }
        }
    }
}

/// The animated test pattern as a live [`Source`].
#[derive(Debug)]
pub struct PatternSource {
    width: u32,
    height: u32,
    fps: f64,
    n: u64,
    pacer: Pacer,
}

impl PatternSource {
    pub fn new(width: u32, height: u32, fps: f64) -> Self {
        PatternSource {
            width,
            height,
            fps,
            n: 0,
            pacer: Pacer::new(fps),
        }
    }
}

impl Source for PatternSource {
    fn next_frame(&mut self) -> StageResult<Captured> {
        if !self.pacer.wait() {
            return Ok(Captured::Interrupted);
        }
        let data = render(self.width, self.height, self.n);
        let mut f = Frame::new(
            self.width,
            self.height,
            PixelFormat::Rgb24,
            ColorRange::Full,
            data,
        )?;
        f.seq = self.n;
        self.n += 1;
        Ok(Captured::Frame(f))
    }

    fn describe(&self) -> String {
        format!(
            "test pattern {}x{} @ {} fps",
            self.width, self.height, self.fps
        )
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: true,
            exclusive_device: false,
            reconnect_on_loss: true,
            buffers_frames: false,
        }
    }

    fn fps(&self) -> f64 {
        self.fps
    }

    fn set_wake(&mut self, wake: Wake) {
        self.pacer.set_wake(wake);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn pattern_is_deterministic_and_animated() {
        let a = render(64, 48, 5);
        assert_eq!(a, render(64, 48, 5));
        assert_ne!(a, render(64, 48, 6));
        assert_eq!(a.len(), 64 * 48 * 3);
    }

    #[test]
    fn pattern_has_bars_and_counter() {
        let px = render(140, 120, 7);
        // Bottom-right corner of the bar area: blue bar (the ball may not be there: check two rows).
        let at = |x: usize, y: usize| &px[(y * 140 + x) * 3..][..3];
        assert!(at(139, 70) == [0, 0, 191] || at(139, 10) == [0, 0, 191]);
        // The counter box is in the top-left corner: black background with white strokes.
        assert_eq!(at(0, 0), [0, 0, 0]);
        // Digit 7's top stroke: first glyph starts at (scale, scale) = (2, 2).
        assert_eq!(at(2, 2), [255, 255, 255]);
    }

    /// A wake interrupts a source's pacing sleep at once (a stop at 0.1 fps does not wait
    /// 10 s), a wake sent before the wait is not lost, and the interrupted frame is still due.
    #[test]
    fn a_wake_interrupts_the_pacing_of_a_slow_source() {
        let wake = Wake::new();
        let mut src = PatternSource::new(32, 16, 0.1);
        src.set_wake(wake.clone());
        assert!(matches!(src.next_frame().unwrap(), Captured::Frame(_)));
        let w = wake.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake();
        });
        let t0 = Instant::now();
        assert!(matches!(src.next_frame().unwrap(), Captured::Interrupted));
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        t.join().unwrap();
        wake.wake();
        let t0 = Instant::now();
        assert!(matches!(src.next_frame().unwrap(), Captured::Interrupted));
        assert!(t0.elapsed() < Duration::from_secs(3));
        // Weird rates never panic.
        for fps in [f64::NAN, 0.0, -1.0, f64::INFINITY, 1e300, 1e-300] {
            let mut p = Pacer::new(fps);
            p.set_wake(wake.clone());
            wake.wake();
            p.wait();
            p.wait();
        }
    }
}
