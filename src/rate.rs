//! Frame rates as exact fractions: the one conversion from a rate in frames per second (how the
//! profile and the stages carry it) to the integer fraction that V4L2 (`timeperframe`, see
//! [`fps_to_interval`]) and Y4M headers (`F<n>:<d>`, see [`fps_fraction`]) want, and back.
//!
//! Integer rates stay integers (`30/1`), NTSC rates become `n·1000/1001` (29.97 → `30000/1001`),
//! anything else is kept to the millihertz (`12.5` → `12500/1000`). Rates that are not positive
//! finite numbers (which the profile never lets through) give [`FALLBACK_FPS`]; huge and tiny
//! ones are clamped so that neither side of the fraction is 0.

/// How close a rate must be to an integer (or an NTSC rate to `n·1000/1001`) to count as one.
const TOLERANCE: f64 = 1e-3;

/// The rate, frames per second, that [`fps_fraction`] gives for a rate that is not a positive
/// finite number.
pub const FALLBACK_FPS: u32 = 30;

/// The exact fraction `(frames, seconds)` for a rate in frames per second: `(30, 1)` for 30,
/// `(30000, 1001)` for 29.97, `(12500, 1000)` for 12.5, `(333, 1000)` for 1/3.
///
/// NaN, infinite, zero and negative rates give `(FALLBACK_FPS, 1)`; rates below 1/1000 fps give
/// `(1, 1000)`; rates beyond `u32::MAX` give `(u32::MAX, 1)`. Neither part is ever 0.
pub fn fps_fraction(fps: f64) -> (u32, u32) {
    if !fps.is_finite() || fps <= 0.0 {
        return (FALLBACK_FPS, 1);
    }
    let max = f64::from(u32::MAX);
    if fps >= max {
        return (u32::MAX, 1);
    }
    let rounded = fps.round();
    if (fps - rounded).abs() < TOLERANCE && rounded >= 1.0 {
        return (rounded as u32, 1);
    }
    let ntsc = fps * 1001.0 / 1000.0;
    let ntsc_rounded = ntsc.round();
    if (ntsc - ntsc_rounded).abs() < TOLERANCE && ntsc_rounded >= 1.0 {
        let frames = ntsc_rounded * 1000.0;
        if frames <= max {
            return (frames as u32, 1001);
        }
    }
    let millis = (fps * 1000.0).round();
    if millis > max {
        // Too fast for millihertz: the nearest integer rate.
        return (rounded.max(1.0) as u32, 1);
    }
    (millis.max(1.0) as u32, 1000)
}

/// The V4L2 frame interval `(numerator, denominator)`, seconds per frame, for a rate: the
/// inverse of [`fps_fraction`] (`1/30` for 30 fps, `1001/30000` for 29.97, `1/30` for rates
/// that are not positive finite numbers).
pub fn fps_to_interval(fps: f64) -> (u32, u32) {
    let (frames, seconds) = fps_fraction(fps);
    (seconds, frames)
}

/// Frames per second for a V4L2 frame interval (`numerator/denominator` seconds); `None` when
/// either part is 0.
pub fn interval_to_fps(numerator: u32, denominator: u32) -> Option<f64> {
    (numerator > 0 && denominator > 0).then(|| f64::from(denominator) / f64::from(numerator))
}

/// Formats a frame rate compactly: `30`, `29.97`, `7.5` (two decimals at most).
pub fn format_fps(fps: f64) -> String {
    let s = format!("{fps:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(fps_to_interval(30.0), (1, 30));
        assert_eq!(fps_to_interval(29.97), (1001, 30000));
        assert_eq!(fps_to_interval(12.5), (1000, 12500));
        assert_eq!(fps_to_interval(0.0), (1, 30));
        assert_eq!(interval_to_fps(1, 30), Some(30.0));
        assert_eq!(interval_to_fps(0, 30), None);
        assert_eq!(format_fps(30.0), "30");
        assert_eq!(format_fps(30000.0 / 1001.0), "29.97");
        assert_eq!(format_fps(7.5), "7.5");
    }

    #[test]
    fn common_rates() {
        assert_eq!(fps_fraction(30.0), (30, 1));
        assert_eq!(fps_fraction(25.0), (25, 1));
        assert_eq!(fps_fraction(240.0), (240, 1));
        assert_eq!(fps_fraction(30000.0 / 1001.0), (30000, 1001));
        assert_eq!(fps_fraction(29.97), (30000, 1001));
        assert_eq!(fps_fraction(59.94), (60000, 1001));
        assert_eq!(fps_fraction(23.976), (24000, 1001));
        assert_eq!(fps_fraction(12.5), (12500, 1000));
        assert_eq!(fps_fraction(7.5), (7500, 1000));
        // The profile's slowest rate and a third of a frame a second.
        assert_eq!(fps_fraction(0.1), (100, 1000));
        assert_eq!(fps_fraction(1.0 / 3.0), (333, 1000));
        // Within the tolerance of an integer.
        assert_eq!(fps_fraction(30.0004), (30, 1));
        assert_eq!(fps_fraction(29.9996), (30, 1));
    }

    #[test]
    fn interval_is_the_inverse() {
        for fps in [30.0, 29.97, 12.5, 1.0 / 3.0, 0.1, 240.0] {
            let (n, d) = fps_fraction(fps);
            assert_eq!(fps_to_interval(fps), (d, n), "{fps}");
            let back = interval_to_fps(d, n).unwrap();
            assert!((back - fps).abs() < 2e-3 * fps.max(1.0), "{fps} -> {back}");
        }
    }

    #[test]
    fn bad_and_extreme_rates_never_give_a_zero() {
        for fps in [0.0, -5.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(fps_fraction(fps), (FALLBACK_FPS, 1), "{fps}");
            assert_eq!(fps_to_interval(fps), (1, FALLBACK_FPS), "{fps}");
        }
        // Tiny rates clamp to a frame every 1000 s (before, 0.0004 gave a 0 denominator).
        assert_eq!(fps_fraction(1e-20), (1, 1000));
        assert_eq!(fps_fraction(0.0004), (1, 1000));
        assert_eq!(fps_to_interval(0.0004), (1000, 1));
        // Huge rates clamp to u32::MAX frames a second.
        assert_eq!(fps_fraction(1e12), (u32::MAX, 1));
        assert_eq!(fps_fraction(f64::MAX), (u32::MAX, 1));
        assert_eq!(fps_fraction(5_000_000.25), (5_000_000, 1));
    }
}
