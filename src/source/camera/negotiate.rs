//! Camera format negotiation: which of the formats, sizes and rates a camera offers sdcam asks
//! for, given the wanted size, rate and format. A pure function ([`choose_capture_format`]) so
//! the policy is unit-tested without a device; [`super::CameraSource::open`] applies it.

use crate::frame::PixelFormat;
use crate::source::{CameraFormat, CameraOptions};
use crate::v4l2::{FormatInfo, FourCc, FrameRates, FrameSizes};

/// A pixel format a camera offers, with its sizes and rates (what `enum_formats` returns).
pub type OfferedFormat = FormatInfo;

/// The outcome of format negotiation.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The pixel format to set.
    pub fourcc: FourCc,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// The rate to request; `None` when the camera does not enumerate rates (ask for the wanted one).
    pub fps: Option<f64>,
    /// An explicit format was asked for but not offered; another one was chosen.
    pub fell_back: bool,
}

/// The sdcam pixel format for a camera fourcc (YUYV, NV12, RGB3, MJPG/JPEG).
pub fn pixel_format_for(fourcc: FourCc) -> Option<PixelFormat> {
    match &fourcc {
        b"YUYV" => Some(PixelFormat::Yuyv),
        b"NV12" => Some(PixelFormat::Nv12),
        b"RGB3" => Some(PixelFormat::Rgb24),
        b"MJPG" | b"JPEG" => Some(PixelFormat::Mjpeg),
        _ => None,
    }
}

/// Preference among equally good candidates (lower is better).
fn format_rank(fourcc: FourCc) -> u8 {
    match &fourcc {
        b"YUYV" => 0,
        b"NV12" => 1,
        b"RGB3" => 2,
        b"MJPG" => 3,
        _ => 4,
    }
}

fn matches_wanted(fourcc: FourCc, want: CameraFormat) -> bool {
    match want {
        CameraFormat::Auto => true,
        CameraFormat::Yuyv => &fourcc == b"YUYV",
        CameraFormat::Nv12 => &fourcc == b"NV12",
        CameraFormat::Rgb => &fourcc == b"RGB3",
        CameraFormat::Mjpeg => matches!(&fourcc, b"MJPG" | b"JPEG"),
    }
}

struct Candidate<'a> {
    fourcc: FourCc,
    width: u32,
    height: u32,
    rates: &'a FrameRates,
    compressed: bool,
}

impl Candidate<'_> {
    /// Sort key, smallest best:
    /// 1. exact size: uncompressed reaching the rate, MJPEG reaching it, uncompressed, MJPEG;
    /// 2. otherwise the closest size, sizes covering the request (both sides >= requested)
    ///    first, then by area difference; then reaching the rate, uncompressed, format rank.
    fn key(&self, want: &CameraOptions) -> (u8, bool, u64, bool, bool, u8) {
        let exact = self.width == want.width && self.height == want.height;
        let reaches = self.rates.reaches(want.fps);
        let tier = match (exact, self.compressed, reaches) {
            (true, false, true) => 0,
            (true, true, true) => 1,
            (true, false, false) => 2,
            (true, true, false) => 3,
            (false, ..) => 4,
        };
        let covers = self.width >= want.width && self.height >= want.height;
        let area = u64::from(self.width) * u64::from(self.height);
        let want_area = u64::from(want.width) * u64::from(want.height);
        (
            tier,
            !covers,
            area.abs_diff(want_area),
            !reaches,
            self.compressed,
            format_rank(self.fourcc),
        )
    }
}

static UNKNOWN_RATES: FrameRates = FrameRates::Unknown;

fn candidates<'a>(offered: &'a [OfferedFormat], want: &CameraOptions) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
    for f in offered {
        let Some(pixel) = pixel_format_for(f.fourcc) else {
            continue;
        };
        let compressed = pixel == PixelFormat::Mjpeg;
        match &f.sizes {
            // Sizes not enumerated: the driver will adjust whatever we ask for.
            FrameSizes::Discrete(list) if list.is_empty() => out.push(Candidate {
                fourcc: f.fourcc,
                width: want.width,
                height: want.height,
                rates: &UNKNOWN_RATES,
                compressed,
            }),
            FrameSizes::Discrete(list) => out.extend(list.iter().map(|s| Candidate {
                fourcc: f.fourcc,
                width: s.width,
                height: s.height,
                rates: &s.rates,
                compressed,
            })),
            FrameSizes::Stepwise(s) => {
                let (width, height) = s.clamp(want.width, want.height);
                out.push(Candidate {
                    fourcc: f.fourcc,
                    width,
                    height,
                    rates: &UNKNOWN_RATES,
                    compressed,
                });
            }
        }
    }
    out
}

/// Chooses the capture format, size and rate among what the camera offers.
///
/// With [`CameraFormat::Auto`]: an uncompressed format at exactly the requested size (that
/// reaches the requested rate), else MJPEG at that size, else the closest size in any supported
/// format (sizes at least as large as requested preferred, then by area difference). With an
/// explicit format: the best size in that format if the camera offers it, else the Auto choice
/// among the others (`fell_back` set). Stepwise/continuous sizes are clamped into their range.
/// `None` when the camera offers none of YUYV, MJPG/JPEG, NV12, RGB3.
pub fn choose_capture_format(offered: &[OfferedFormat], want: &CameraOptions) -> Option<Choice> {
    let all = candidates(offered, want);
    let wanted: Vec<&Candidate> = all
        .iter()
        .filter(|c| matches_wanted(c.fourcc, want.format))
        .collect();
    let fell_back = wanted.is_empty();
    let pool: Vec<&Candidate> = if fell_back {
        all.iter().collect()
    } else {
        wanted
    };
    let best = pool.into_iter().min_by_key(|c| c.key(want))?;
    Some(Choice {
        fourcc: best.fourcc,
        width: best.width,
        height: best.height,
        fps: best.rates.pick(want.fps),
        fell_back: fell_back && want.format != CameraFormat::Auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4l2::{fourcc_to_string, DiscreteSize, StepwiseSizes};

    fn want(width: u32, height: u32, fps: f64, format: CameraFormat) -> CameraOptions {
        CameraOptions {
            device: "/dev/video0".into(),
            width,
            height,
            fps,
            format,
        }
    }

    fn webcam() -> Vec<OfferedFormat> {
        vec![
            FormatInfo::discrete(
                *b"YUYV",
                vec![
                    DiscreteSize::new(640, 480, &[30.0, 15.0]),
                    DiscreteSize::new(1280, 720, &[10.0, 5.0]),
                ],
            ),
            FormatInfo::discrete(
                *b"MJPG",
                vec![
                    DiscreteSize::new(640, 480, &[30.0]),
                    DiscreteSize::new(1280, 720, &[30.0, 15.0]),
                    DiscreteSize::new(1920, 1080, &[30.0]),
                ],
            ),
        ]
    }

    fn pick(offered: &[OfferedFormat], w: &CameraOptions) -> (String, u32, u32, Option<f64>, bool) {
        let c = choose_capture_format(offered, w).expect("a choice");
        (
            fourcc_to_string(c.fourcc),
            c.width,
            c.height,
            c.fps,
            c.fell_back,
        )
    }

    #[test]
    fn auto_prefers_uncompressed_at_exact_size() {
        let c = pick(&webcam(), &want(640, 480, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), false));
    }

    #[test]
    fn auto_takes_mjpeg_when_uncompressed_is_too_slow() {
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
        // At 10 fps YUYV is fast enough.
        let c = pick(&webcam(), &want(1280, 720, 10.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 1280, 720, Some(10.0), false));
    }

    #[test]
    fn auto_closest_size_prefers_larger() {
        // 512x512: 640x480 is closer in area but too short; 1280x720 covers it.
        let c = pick(&webcam(), &want(512, 512, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
        // 320x240 is smaller than everything: 640x480 YUYV reaches 30 fps.
        let c = pick(&webcam(), &want(320, 240, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), false));
        // Bigger than everything: the largest (closest) size.
        let c = pick(&webcam(), &want(3840, 2160, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 1920, 1080, Some(30.0), false));
    }

    #[test]
    fn mjpeg_only_camera() {
        let offered = vec![
            FormatInfo::discrete(*b"H264", vec![DiscreteSize::new(1280, 720, &[30.0])]),
            FormatInfo::discrete(
                *b"MJPG",
                vec![
                    DiscreteSize::new(640, 480, &[30.0]),
                    DiscreteSize::new(1280, 720, &[30.0]),
                ],
            ),
        ];
        let c = pick(&offered, &want(640, 480, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("MJPG".into(), 640, 480, Some(30.0), false));
        let c = pick(&offered, &want(640, 480, 30.0, CameraFormat::Yuyv));
        assert_eq!(c, ("MJPG".into(), 640, 480, Some(30.0), true));
    }

    #[test]
    fn jpeg_fourcc_counts_as_mjpeg() {
        let offered = vec![FormatInfo::discrete(
            *b"JPEG",
            vec![DiscreteSize::new(640, 480, &[])],
        )];
        let c = pick(&offered, &want(640, 480, 25.0, CameraFormat::Mjpeg));
        assert_eq!(c, ("JPEG".into(), 640, 480, None, false));
    }

    #[test]
    fn explicit_format_is_used_when_offered() {
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Yuyv));
        assert_eq!(c, ("YUYV".into(), 1280, 720, Some(10.0), false));
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Mjpeg));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), false));
    }

    #[test]
    fn explicit_format_falls_back() {
        let c = pick(&webcam(), &want(640, 480, 30.0, CameraFormat::Nv12));
        assert_eq!(c, ("YUYV".into(), 640, 480, Some(30.0), true));
        let c = pick(&webcam(), &want(1280, 720, 30.0, CameraFormat::Rgb));
        assert_eq!(c, ("MJPG".into(), 1280, 720, Some(30.0), true));
    }

    #[test]
    fn stepwise_sizes_are_clamped() {
        let offered = vec![FormatInfo {
            fourcc: *b"YUYV",
            description: "YUYV 4:2:2".into(),
            compressed: false,
            sizes: FrameSizes::Stepwise(StepwiseSizes {
                min_width: 48,
                max_width: 1920,
                step_width: 8,
                min_height: 32,
                max_height: 1080,
                step_height: 2,
            }),
        }];
        let c = pick(&offered, &want(512, 512, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 512, 512, None, false));
        let c = pick(&offered, &want(4096, 2160, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 1920, 1080, None, false));
        let c = pick(&offered, &want(641, 479, 30.0, CameraFormat::Auto));
        assert_eq!(c, ("YUYV".into(), 640, 480, None, false));
    }

    #[test]
    fn unsupported_only_gives_none() {
        let offered = vec![FormatInfo::discrete(
            *b"H264",
            vec![DiscreteSize::new(640, 480, &[30.0])],
        )];
        assert!(
            choose_capture_format(&offered, &want(640, 480, 30.0, CameraFormat::Auto)).is_none()
        );
        assert!(choose_capture_format(&[], &want(640, 480, 30.0, CameraFormat::Auto)).is_none());
    }

    #[test]
    fn nv12_and_rgb_are_ranked_after_yuyv() {
        let offered = vec![
            FormatInfo::discrete(*b"RGB3", vec![DiscreteSize::new(640, 480, &[30.0])]),
            FormatInfo::discrete(*b"NV12", vec![DiscreteSize::new(640, 480, &[30.0])]),
            FormatInfo::discrete(*b"YUYV", vec![DiscreteSize::new(640, 480, &[30.0])]),
        ];
        assert_eq!(
            pick(&offered, &want(640, 480, 30.0, CameraFormat::Auto)).0,
            "YUYV"
        );
        assert_eq!(
            pick(&offered[..2], &want(640, 480, 30.0, CameraFormat::Auto)).0,
            "NV12"
        );
    }
}
