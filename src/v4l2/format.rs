//! What a V4L2 device offers and what is set on it, as plain data: pixel formats with their frame
//! sizes and rates (VIDIOC_ENUM_FMT, ENUM_FRAMESIZES, ENUM_FRAMEINTERVALS) and the single-planar
//! format (VIDIOC_G_FMT/S_FMT). Pure types and arithmetic, unit-tested without a device; the
//! ioctls that fill them are in [`super::device`].

use super::fourcc::FourCc;
use crate::rate::format_fps;

/// Frame rates offered for one frame size.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum FrameRates {
    /// The driver does not enumerate intervals.
    #[default]
    Unknown,
    /// A list of rates, frames per second.
    Discrete(Vec<f64>),
    /// Any rate in a range (stepwise or continuous intervals), frames per second.
    Range {
        /// The slowest rate.
        min: f64,
        /// The fastest rate.
        max: f64,
    },
}

impl FrameRates {
    /// The highest rate offered, if known.
    pub fn max(&self) -> Option<f64> {
        match self {
            FrameRates::Unknown => None,
            FrameRates::Discrete(list) => list.iter().copied().reduce(f64::max),
            FrameRates::Range { max, .. } => Some(*max),
        }
    }

    /// Whether `fps` can be reached (unknown rates are assumed to be reachable).
    pub fn reaches(&self, fps: f64) -> bool {
        self.max().is_none_or(|max| max + 0.01 >= fps)
    }

    /// The rate to ask for when `want` is wanted: the slowest listed rate at least as fast as
    /// `want`, else the fastest; a range is clamped. `None` when unknown.
    pub fn pick(&self, want: f64) -> Option<f64> {
        match self {
            FrameRates::Unknown => None,
            FrameRates::Discrete(list) => list
                .iter()
                .copied()
                .filter(|&f| f + 0.01 >= want)
                .reduce(f64::min)
                .or_else(|| self.max()),
            FrameRates::Range { min, max } => Some(want.clamp(*min, *max)),
        }
    }
}

/// One discrete frame size and its rates.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteSize {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// The rates offered at this size.
    pub rates: FrameRates,
}

impl DiscreteSize {
    /// Convenience constructor with a list of rates, frames per second (empty: unknown).
    pub fn new(width: u32, height: u32, fps: &[f64]) -> Self {
        let rates = if fps.is_empty() {
            FrameRates::Unknown
        } else {
            FrameRates::Discrete(fps.to_vec())
        };
        DiscreteSize {
            width,
            height,
            rates,
        }
    }
}

/// A stepwise (or, with steps of 1, continuous) range of frame sizes, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepwiseSizes {
    /// The narrowest width.
    pub min_width: u32,
    /// The widest width.
    pub max_width: u32,
    /// Widths go up in steps of this many pixels from `min_width`.
    pub step_width: u32,
    /// The lowest height.
    pub min_height: u32,
    /// The highest height.
    pub max_height: u32,
    /// Heights go up in steps of this many pixels from `min_height`.
    pub step_height: u32,
}

impl StepwiseSizes {
    /// The size in the range closest to `(width, height)`: clamped, then snapped to the step.
    pub fn clamp(&self, width: u32, height: u32) -> (u32, u32) {
        (
            clamp_step(width, self.min_width, self.max_width, self.step_width),
            clamp_step(height, self.min_height, self.max_height, self.step_height),
        )
    }
}

fn clamp_step(v: u32, min: u32, max: u32, step: u32) -> u32 {
    if max <= min {
        return min;
    }
    let step = step.max(1);
    let v = v.clamp(min, max);
    let k = (v - min + step / 2) / step;
    let r = min.saturating_add(k.saturating_mul(step));
    if r > max {
        r - step
    } else {
        r
    }
}

/// The frame sizes offered for one pixel format.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameSizes {
    /// A list of sizes (empty: the driver does not enumerate them).
    Discrete(Vec<DiscreteSize>),
    /// Any size in a range.
    Stepwise(StepwiseSizes),
}

/// One pixel format a device offers (VIDIOC_ENUM_FMT + ENUM_FRAMESIZES + ENUM_FRAMEINTERVALS).
#[derive(Debug, Clone, PartialEq)]
pub struct FormatInfo {
    /// The pixel format's code.
    pub fourcc: FourCc,
    /// The driver's description (`"YUYV 4:2:2"`); may be empty.
    pub description: String,
    /// The driver flags the format as compressed (MJPEG, H.264, …).
    pub compressed: bool,
    /// The sizes offered in this format.
    pub sizes: FrameSizes,
}

impl FormatInfo {
    /// A format with discrete sizes, for tests and synthetic lists.
    pub fn discrete(fourcc: FourCc, sizes: Vec<DiscreteSize>) -> Self {
        FormatInfo {
            fourcc,
            description: String::new(),
            compressed: matches!(&fourcc, b"MJPG" | b"JPEG" | b"H264" | b"HEVC"),
            sizes: FrameSizes::Discrete(sizes),
        }
    }

    /// `"640x480@30,1280x720@10"` or `"16x16-1920x1080 step 2x2"`.
    pub fn sizes_summary(&self) -> String {
        match &self.sizes {
            FrameSizes::Discrete(list) if list.is_empty() => "(sizes not enumerated)".to_string(),
            FrameSizes::Discrete(list) => list
                .iter()
                .map(|s| match s.rates.max() {
                    Some(fps) => format!("{}x{}@{}", s.width, s.height, format_fps(fps)),
                    None => format!("{}x{}", s.width, s.height),
                })
                .collect::<Vec<_>>()
                .join(","),
            FrameSizes::Stepwise(s) => format!(
                "{}x{}-{}x{} step {}x{}",
                s.min_width, s.min_height, s.max_width, s.max_height, s.step_width, s.step_height
            ),
        }
    }
}

/// The single-planar pixel format fields sdcam reads and writes (`struct v4l2_pix_format`).
///
/// `field`, `colorspace` and `quantization` stay raw numbers: `v4l::Format` turns them into
/// enums and panics on a value it does not know, and drivers report newer ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixFormat {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// The pixel format's code.
    pub fourcc: FourCc,
    /// `enum v4l2_field` (progressive: `V4L2_FIELD_NONE`).
    pub field: u32,
    /// Bytes per line (of the first plane); 0 in a request: the driver chooses.
    pub bytesperline: u32,
    /// Bytes per frame; 0 in a request: the driver chooses.
    pub sizeimage: u32,
    /// `enum v4l2_colorspace`; 0: the driver's default.
    pub colorspace: u32,
    /// `enum v4l2_quantization`; 0: the driver's default.
    pub quantization: u32,
}

impl PixFormat {
    /// A format request with the given size and code, progressive, everything else left to the driver.
    pub fn new(width: u32, height: u32, fourcc: FourCc) -> Self {
        PixFormat {
            width,
            height,
            fourcc,
            field: v4l::v4l_sys::v4l2_field_V4L2_FIELD_NONE,
            bytesperline: 0,
            sizeimage: 0,
            colorspace: 0,
            quantization: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_pick_and_reach() {
        let r = FrameRates::Discrete(vec![30.0, 15.0, 60.0]);
        assert_eq!(r.pick(25.0), Some(30.0));
        assert_eq!(r.pick(90.0), Some(60.0));
        assert!(r.reaches(60.0) && !r.reaches(61.0));
        let r = FrameRates::Range {
            min: 5.0,
            max: 60.0,
        };
        assert_eq!(r.pick(30.0), Some(30.0));
        assert_eq!(r.pick(100.0), Some(60.0));
        assert!(FrameRates::Unknown.reaches(1000.0));
        assert_eq!(FrameRates::Unknown.pick(30.0), None);
    }

    #[test]
    fn stepwise_clamp() {
        let s = StepwiseSizes {
            min_width: 16,
            max_width: 1920,
            step_width: 8,
            min_height: 16,
            max_height: 1080,
            step_height: 2,
        };
        assert_eq!(s.clamp(640, 480), (640, 480));
        assert_eq!(s.clamp(643, 479), (640, 480));
        assert_eq!(s.clamp(4000, 3000), (1920, 1080));
        assert_eq!(s.clamp(1, 1), (16, 16));
        // Snapping never leaves the range: 1917 would snap to 1920 > 1919, so 1912.
        assert_eq!(clamp_step(1917, 16, 1919, 8), 1912);
    }

    #[test]
    fn stepwise_summary() {
        let f = FormatInfo {
            fourcc: *b"YUYV",
            description: String::new(),
            compressed: false,
            sizes: FrameSizes::Stepwise(StepwiseSizes {
                min_width: 16,
                max_width: 1920,
                step_width: 2,
                min_height: 16,
                max_height: 1080,
                step_height: 2,
            }),
        };
        assert_eq!(f.sizes_summary(), "16x16-1920x1080 step 2x2");
    }
}
