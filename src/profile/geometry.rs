//! Geometry: the stream size, and the one place where the picture is fitted.
//!
//! The chain is source → pre-process (fit to the stream size, `source.fit`) → transform at the
//! stream size → post-process (to the output size, `output.fit`) → output. With the default
//! `stream.width`/`height = "auto"` the stream takes the output's aspect ratio ([`stream_size`]),
//! so the source is cropped, letterboxed or stretched once, as `source.fit` says, and the output
//! stage only scales. `output.fit` matters only for an explicit stream size whose aspect ratio
//! differs from the output's (then the picture is fitted twice, as the user asked for).
//!
//! Each fit value means the same everywhere: `crop` fills the destination and cuts the overflow
//! equally on both sides, `letterbox` shows all of the picture with black bars, `stretch` shows
//! all of it distorted.
//!
//! [`resolve`] is the one function that turns a profile's stream size into pixels: the relay's
//! pre-processing ([`crate::relay::PreprocessConfig::from_profile`]) and the pipeline
//! ([`crate::pipeline::stream_params`]) take it from there, and the run loop resolves each new
//! profile once ([`running`]), logs the result and hands the stages a profile with the sizes
//! filled in, so a live change of the output size or of a stream key prepares the stream again
//! through the same path as `set stream.width …`.

use std::fmt;

use crate::convert::Fit;
use crate::model::hub::{self, HubOptions};
use crate::model::sd::RANDOM_PREFIX;

use super::{ModelConfig, Profile, StreamDim, TransformKind};

/// The smallest stream side (explicit or auto).
pub const MIN_SIDE: u32 = 64;
/// The largest stream side (explicit or auto).
pub const MAX_SIDE: u32 = 2048;
/// An auto stream is at most this many times wider than high (or higher than wide): a more
/// extreme output gets a 4:1 (1:4) stream and `output.fit` fits it to the output.
pub const MAX_AUTO_ASPECT: f64 = 4.0;
/// The model's native side when its U-Net config cannot be read yet (a hub model not yet
/// downloaded): 512, the size of every supported SD 1.x/2.x turbo model.
pub const DEFAULT_NATIVE_SIDE: u32 = 512;
/// The most pixels an auto stream has for the built-in transforms (`identity`, `tint`,
/// `posterize`): 512², or the output's pixel count when that is smaller.
pub const BUILTIN_PIXELS: u64 = 512 * 512;

/// How many pixels an auto stream size aims at, and why (for the log).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelBudget {
    pub pixels: u64,
    /// E.g. `~512² pixels, the model's native size`.
    pub why: String,
}

impl PixelBudget {
    /// A square model size `side`² (`why` says where the side comes from).
    pub fn square(side: u32, why: &str) -> Self {
        PixelBudget {
            pixels: side as u64 * side as u64,
            why: format!("~{side}² pixels, {why}"),
        }
    }
}

/// A resolved stream size.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSize {
    pub width: u32,
    pub height: u32,
    /// How it came about: `explicit`, or how `"auto"` resolved.
    pub how: String,
    /// The stream has the output's aspect ratio (up to rounding to multiples of 8) because
    /// `"auto"` gave it that: the output stage then only scales.
    pub output_aspect: bool,
}

impl fmt::Display for StreamSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{} ({})", self.width, self.height, self.how)
    }
}

/// `16:9`, `4:3`, `9:16`, or `WxH` when the reduced ratio is unwieldy (1366x768).
pub fn aspect_label(w: u32, h: u32) -> String {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = gcd(w, h).max(1);
    let (a, b) = (w / g, h / g);
    if a <= 64 && b <= 64 {
        format!("{a}:{b}")
    } else {
        format!("{w}x{h}")
    }
}

/// The nearest multiple of 8, kept within [`MIN_SIDE`]..=[`MAX_SIDE`].
fn round8(x: f64) -> u32 {
    let v = (x / 8.0).round().max(0.0) * 8.0;
    (v.min(u32::MAX as f64) as u32).clamp(MIN_SIDE, MAX_SIDE)
}

/// The stream size for `width` × `height` (pixels or auto) and an `out_w`×`out_h` output.
///
/// * Both given: used as they are.
/// * Both auto: the output's aspect ratio (clamped to [`MAX_AUTO_ASPECT`]) at about
///   `budget.pixels` pixels, each side rounded to the nearest multiple of 8 and kept within
///   [`MIN_SIDE`]..=[`MAX_SIDE`] (scaling both up or down together first so the aspect holds):
///   16:9 at 512² is 680×384, 4:3 is 592×440, 1:1 is 512×512, 9:16 is 384×680.
/// * One given, the other auto: the other follows the output's aspect ratio (640 wide for a
///   16:9 output is 640×360).
pub fn stream_size(
    width: StreamDim,
    height: StreamDim,
    out_w: u32,
    out_h: u32,
    budget: &PixelBudget,
) -> StreamSize {
    let raw = out_w.max(1) as f64 / out_h.max(1) as f64;
    let a = raw.clamp(1.0 / MAX_AUTO_ASPECT, MAX_AUTO_ASPECT);
    let ratio = aspect_label(out_w, out_h);
    let clamped = if a != raw {
        format!(", clamped to {}", if a > 1.0 { "4:1" } else { "1:4" })
    } else {
        String::new()
    };
    // A side that follows from the other stays in range only by rounding, not by clamping.
    let in_range = |x: f64| (MIN_SIDE as f64 - 4.0..MAX_SIDE as f64 + 4.0).contains(&x) && a == raw;
    match (width.px(), height.px()) {
        (Some(w), Some(h)) => StreamSize {
            width: w,
            height: h,
            how: "explicit".into(),
            output_aspect: false,
        },
        (Some(w), None) => {
            let h = w as f64 / a;
            StreamSize {
                width: w,
                height: round8(h),
                how: format!("height auto: {ratio} output{clamped}, width {w} given"),
                output_aspect: in_range(h),
            }
        }
        (None, Some(h)) => {
            let w = h as f64 * a;
            StreamSize {
                width: round8(w),
                height: h,
                how: format!("width auto: {ratio} output{clamped}, height {h} given"),
                output_aspect: in_range(w),
            }
        }
        (None, None) => {
            let n = budget.pixels.max(1) as f64;
            let (mut w, mut h) = ((n * a).sqrt(), (n / a).sqrt());
            // With the aspect at most 4:1, growing to the smallest side and shrinking to the
            // largest never fight (2048 / 64 = 32 > 4).
            let grow = (MIN_SIDE as f64 / w.min(h)).max(1.0);
            let shrink = (MAX_SIDE as f64 / (w.max(h) * grow)).min(1.0);
            w *= grow * shrink;
            h *= grow * shrink;
            StreamSize {
                width: round8(w),
                height: round8(h),
                how: format!("auto: {ratio} output{clamped} at {}", budget.why),
                output_aspect: a == raw,
            }
        }
    }
}

/// The model's native side: the U-Net's `sample_size` × 8 (the VAE's scale), read from the
/// model folder, the Hugging Face cache (never the network) or the built-in `random:` configs.
/// `None` when the config is not on this machine (yet) or has no usable `sample_size`.
pub fn model_native_side(m: &ModelConfig) -> Option<u32> {
    let cfg: serde_json::Value = match m.id.strip_prefix(RANDOM_PREFIX) {
        Some(arch) => {
            let arch: crate::model::arch::Arch = arch.parse().ok()?;
            serde_json::from_str(arch.unet_config_json()).ok()?
        }
        None => {
            let path = hub::local_file(
                &m.id,
                m.revision.as_deref(),
                &HubOptions::from_env(),
                "unet/config.json",
            )?;
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?
        }
    };
    let latent = match cfg.get("sample_size")? {
        serde_json::Value::Number(n) => n.as_f64()?,
        // diffusers also allows [height, width]: the side of the same pixel count.
        serde_json::Value::Array(hw) if hw.len() == 2 => (hw[0].as_f64()? * hw[1].as_f64()?).sqrt(),
        _ => return None,
    };
    let side = (latent * 8.0).round();
    (8.0..=MAX_SIDE as f64)
        .contains(&side)
        .then_some(side as u32)
}

/// What an auto stream size aims at for this profile: the diffusion model's native pixel count
/// ([`model_native_side`]; [`DEFAULT_NATIVE_SIDE`] when unknown), or for the built-in
/// transforms [`BUILTIN_PIXELS`] or the output's pixel count, whichever is smaller (a cheap
/// effect gains nothing from more pixels than it shows, and 512² bounds its cost).
pub fn pixel_budget(p: &Profile) -> PixelBudget {
    if p.transform == TransformKind::Diffusion {
        return match model_native_side(&p.model) {
            Some(side) => PixelBudget::square(side, "the model's native size"),
            None => PixelBudget::square(
                DEFAULT_NATIVE_SIDE,
                "assumed (the model's unet/config.json is not on this machine yet)",
            ),
        };
    }
    let out = p.output.width as u64 * p.output.height as u64;
    if out < BUILTIN_PIXELS {
        PixelBudget {
            pixels: out,
            why: "the output's pixel count".into(),
        }
    } else {
        PixelBudget::square(512, "the built-in transforms' size")
    }
}

/// The profile's stream size in pixels: the one place it is resolved.
pub fn resolve(p: &Profile) -> StreamSize {
    let s = &p.stream;
    let budget = if s.width == StreamDim::Auto && s.height == StreamDim::Auto {
        pixel_budget(p)
    } else {
        PixelBudget {
            pixels: 0,
            why: String::new(),
        }
    };
    stream_size(s.width, s.height, p.output.width, p.output.height, &budget)
}

/// A warning when `output.fit` is set but has nothing to do (the auto stream already has the
/// output's aspect ratio), pointing at the key that decides the one fit.
pub fn unused_output_fit(p: &Profile, size: &StreamSize) -> Option<String> {
    (size.output_aspect && p.output.fit == Fit::Letterbox).then(|| {
        "output.fit = \"letterbox\" changes nothing with an auto stream size (the stream \
         already has the output's aspect ratio): set source.fit = \"letterbox\" to see all of \
         the source"
            .to_string()
    })
}

/// The profile as the stages run it: the stream size in pixels ([`resolve`]) and, when the
/// stream took the output's aspect ratio, `output.fit = stretch` (the output stage only scales;
/// the few pixels of rounding to multiples of 8 are not cropped away).
pub fn running(p: &Profile) -> (Profile, StreamSize) {
    let size = resolve(p);
    let mut r = p.clone();
    r.stream.width = StreamDim::Px(size.width);
    r.stream.height = StreamDim::Px(size.height);
    if size.output_aspect {
        r.output.fit = Fit::Stretch;
    }
    (r, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{Postprocess, Preprocess};
    use crate::frame::{ColorRange, Frame, PixelFormat};
    use crate::transform::Transform;
    use StreamDim::{Auto, Px};

    /// A `w`×`h` source whose red channel says the column and green the row (0..255 across the
    /// picture), blue 255 everywhere: a letterbox bar (black) is told apart from the content.
    fn ruler(w: u32, h: u32) -> Frame {
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let r = (255.0 * (x as f64 + 0.5) / w as f64).round() as u8;
                let g = (255.0 * (y as f64 + 0.5) / h as f64).round() as u8;
                data.extend_from_slice(&[r, g, 255]);
            }
        }
        Frame::new(w, h, PixelFormat::Rgb24, ColorRange::Full, data).unwrap()
    }

    /// What the output shows of the source: (fraction of its width, fraction of its height,
    /// fraction of the output's width and height the picture covers; the rest is bars).
    fn visible(out: &Frame) -> (f64, f64, f64, f64) {
        let (w, h) = (out.width, out.height);
        let content = |x: u32, y: u32| out.rgb_at(x, y)[2] > 128;
        let cols: Vec<u32> = (0..w).filter(|&x| content(x, h / 2)).collect();
        let rows: Vec<u32> = (0..h).filter(|&y| content(w / 2, y)).collect();
        let (x0, x1) = (cols[0], *cols.last().unwrap());
        let (y0, y1) = (rows[0], *rows.last().unwrap());
        // Read 3 pixels inside the edges (a bar's edge is blended with black) and extend the
        // span read there to the whole content.
        let span = |a: u8, b: u8, px: u32| {
            (b as f64 - a as f64) / 255.0 * (px + 1) as f64 / (px - 6) as f64
        };
        let fx = span(
            out.rgb_at(x0 + 3, h / 2)[0],
            out.rgb_at(x1 - 3, h / 2)[0],
            x1 - x0,
        );
        let fy = span(
            out.rgb_at(w / 2, y0 + 3)[1],
            out.rgb_at(w / 2, y1 - 3)[1],
            y1 - y0,
        );
        (
            fx,
            fy,
            (x1 - x0 + 1) as f64 / w as f64,
            (y1 - y0 + 1) as f64 / h as f64,
        )
    }

    /// The relay's chain for a profile: pre-process → identity → post-process, with the
    /// stage settings the run loop hands the stages.
    fn chain(p: &Profile, src: &Frame) -> Frame {
        let (run, _) = running(p);
        let pre = crate::config::preprocess(&run);
        let x = Preprocess::default()
            .run(src, pre.width, pre.height, pre.fit, pre.mirror)
            .unwrap();
        let y = crate::transform::Identity.process(&x).unwrap();
        let o = &run.output;
        let out = Postprocess::default()
            .run(&y, o.width, o.height, o.fit, PixelFormat::Yuyv)
            .unwrap();
        crate::convert::to_rgb(&out).unwrap()
    }

    fn profile(out: (u32, u32), source_fit: Fit) -> Profile {
        let mut p = Profile {
            transform: TransformKind::Identity,
            ..Default::default()
        };
        (p.output.width, p.output.height) = out;
        p.source.fit = source_fit;
        p
    }

    fn close(got: (f64, f64, f64, f64), want: (f64, f64, f64, f64), what: &str) {
        let ok = [
            (got.0, want.0),
            (got.1, want.1),
            (got.2, want.2),
            (got.3, want.3),
        ]
        .iter()
        .all(|(g, w)| (g - w).abs() < 0.025);
        assert!(ok, "{what}: visible {got:.3?}, want {want:.3?}");
    }

    #[test]
    fn the_source_is_fitted_once_from_4_3_and_16_9_into_16_9_and_4_3() {
        let (wide, four3) = ((1280, 720), (640, 480));
        for (src, out, crop) in [
            // (source, output, what crop keeps of the source: width, height)
            (four3, wide, (1.0, 0.75)),
            (wide, wide, (1.0, 1.0)),
            (wide, four3, (0.75, 1.0)),
            (four3, four3, (1.0, 1.0)),
        ] {
            let frame = ruler(src.0, src.1);
            let what = format!("{src:?} -> {out:?}");
            // crop (default): the output is filled, the source cut once to the output's aspect
            // (4:3 → 16:9 keeps 75 % of the height, not the 42 % of two crops through 512²).
            let got = chain(&profile(out, Fit::Crop), &frame);
            close(
                visible(&got),
                (crop.0, crop.1, 1.0, 1.0),
                &format!("{what} crop"),
            );
            // letterbox: all of the source, with bars where the aspects differ.
            let got = chain(&profile(out, Fit::Letterbox), &frame);
            let (bx, by) = (
                (crop.1 / crop.0).min(1.0), // a taller source: bars left and right
                (crop.0 / crop.1).min(1.0),
            );
            close(
                visible(&got),
                (1.0, 1.0, bx, by),
                &format!("{what} letterbox"),
            );
            // stretch: all of the source, no bars.
            let got = chain(&profile(out, Fit::Stretch), &frame);
            close(
                visible(&got),
                (1.0, 1.0, 1.0, 1.0),
                &format!("{what} stretch"),
            );
        }
    }

    #[test]
    fn explicit_sizes_keep_both_fits() {
        // 512² between a 4:3 source and a 16:9 output: cropped twice, as before (0.75 of the
        // width, then 0.5625 of the height: 42 % of the picture) ...
        let frame = ruler(640, 480);
        let mut p = profile((1280, 720), Fit::Crop);
        p.stream.width = Px(512);
        p.stream.height = Px(512);
        close(
            visible(&chain(&p, &frame)),
            (0.75, 0.5625, 1.0, 1.0),
            "512² crop",
        );
        // ... and output.fit letterboxes the square.
        p.output.fit = Fit::Letterbox;
        close(
            visible(&chain(&p, &frame)),
            (0.75, 1.0, 0.5625, 1.0),
            "512² letterbox",
        );
        // With an auto size the same output.fit has nothing to fit, and says so.
        let mut q = profile((1280, 720), Fit::Crop);
        q.output.fit = Fit::Letterbox;
        close(
            visible(&chain(&q, &frame)),
            (1.0, 0.75, 1.0, 1.0),
            "auto, output letterbox",
        );
        assert!(unused_output_fit(&q, &resolve(&q)).is_some());
        assert!(unused_output_fit(&p, &resolve(&p)).is_none());
    }

    fn auto(w: u32, h: u32, side: u32) -> (u32, u32) {
        let s = stream_size(Auto, Auto, w, h, &PixelBudget::square(side, "test"));
        assert!(
            s.width.is_multiple_of(8) && s.height.is_multiple_of(8),
            "{s}"
        );
        assert!((MIN_SIDE..=MAX_SIDE).contains(&s.width), "{s}");
        assert!((MIN_SIDE..=MAX_SIDE).contains(&s.height), "{s}");
        (s.width, s.height)
    }

    #[test]
    fn auto_size_takes_the_output_aspect_at_the_native_pixel_count() {
        assert_eq!(auto(1280, 720, 512), (680, 384));
        assert_eq!(auto(1920, 1080, 512), (680, 384));
        assert_eq!(auto(640, 480, 512), (592, 440));
        assert_eq!(auto(720, 720, 512), (512, 512));
        assert_eq!(auto(720, 1280, 512), (384, 680));
        assert_eq!(auto(1280, 720, 768), (1024, 576));
        // Within 1 % of the pixel count and of the aspect ratio.
        for (w, h) in [
            (1280, 720),
            (640, 480),
            (1366, 768),
            (2560, 1080),
            (1080, 1920),
        ] {
            let (sw, sh) = auto(w, h, 512);
            let px = (sw * sh) as f64 / (512.0 * 512.0);
            let aspect = (sw as f64 / sh as f64) / (w as f64 / h as f64);
            assert!((0.97..1.03).contains(&px), "{w}x{h}: {sw}x{sh}");
            assert!((0.98..1.02).contains(&aspect), "{w}x{h}: {sw}x{sh}");
        }
        // The tiny test model (sample_size 8: 64²) grows to the smallest side and keeps 16:9.
        assert_eq!(auto(1280, 720, 64), (112, 64));
        let s = stream_size(
            Auto,
            Auto,
            1280,
            720,
            &PixelBudget::square(512, "the model"),
        );
        assert_eq!(
            s.to_string(),
            "680x384 (auto: 16:9 output at ~512² pixels, the model)"
        );
        assert!(s.output_aspect);
    }

    #[test]
    fn extreme_aspects_are_clamped_to_4_to_1_and_stay_in_range() {
        assert_eq!(auto(7680, 16, 512), (1024, 256));
        assert_eq!(auto(16, 4320, 512), (256, 1024));
        assert_eq!(auto(7680, 16, 1024), (2048, 512));
        assert_eq!(auto(7680, 16, 64), (256, 64));
        let s = stream_size(Auto, Auto, 7680, 16, &PixelBudget::square(512, "m"));
        assert!(!s.output_aspect, "a clamped stream is fitted by output.fit");
        assert!(s.how.contains("7680x16 output, clamped to 4:1"), "{s}");
    }

    #[test]
    fn one_side_given_keeps_the_output_aspect_and_both_given_are_kept() {
        let b = PixelBudget::square(512, "m");
        let s = stream_size(Px(640), Auto, 1280, 720, &b);
        assert_eq!((s.width, s.height, s.output_aspect), (640, 360, true));
        let s = stream_size(Auto, Px(480), 640, 480, &b);
        assert_eq!((s.width, s.height, s.output_aspect), (640, 480, true));
        // The other side would leave the range: clamped, and then not the output's aspect.
        let s = stream_size(Px(2048), Auto, 720, 1280, &b);
        assert_eq!((s.width, s.height, s.output_aspect), (2048, 2048, false));
        let s = stream_size(Px(512), Px(512), 1280, 720, &b);
        assert_eq!((s.width, s.height, s.output_aspect), (512, 512, false));
        assert_eq!(s.to_string(), "512x512 (explicit)");
    }

    #[test]
    fn budget_comes_from_the_model_config_or_the_output() {
        let mut p = Profile {
            transform: TransformKind::Diffusion,
            ..Default::default()
        };
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // The tiny fixture model: sample_size 8 → 64².
        p.model.id = fixtures.join("models/tiny-sd15").display().to_string();
        assert_eq!(model_native_side(&p.model), Some(64));
        assert_eq!(pixel_budget(&p).pixels, 64 * 64);
        assert_eq!((resolve(&p).width, resolve(&p).height), (112, 64));
        for arch in ["random:sd-turbo", "random:sd15"] {
            p.model.id = arch.into();
            assert_eq!(model_native_side(&p.model), Some(512), "{arch}");
        }
        p.model.id = "/nonexistent/model".into();
        assert_eq!(model_native_side(&p.model), None);
        let b = pixel_budget(&p);
        assert_eq!(b.pixels, 512 * 512);
        assert!(b.why.contains("assumed"), "{}", b.why);
        // The built-in transforms: 512², or the output's pixels when fewer.
        p.transform = TransformKind::Identity;
        assert_eq!(pixel_budget(&p).pixels, 512 * 512);
        p.output.width = 320;
        p.output.height = 240;
        assert_eq!(pixel_budget(&p).pixels, 320 * 240);
        assert_eq!((resolve(&p).width, resolve(&p).height), (320, 240));
    }

    #[test]
    fn running_profile_has_pixels_and_scales_at_the_output() {
        let p = Profile::default(); // tint, 1280x720 output, auto stream
        let (r, s) = running(&p);
        assert_eq!((r.stream.width, r.stream.height), (Px(680), Px(384)));
        assert_eq!(r.output.fit, Fit::Stretch);
        assert_eq!(
            s.to_string(),
            "680x384 (auto: 16:9 output at ~512² pixels, the built-in transforms' size)"
        );
        // Resolving again changes nothing.
        assert_eq!(running(&r).0, r);
        // Explicit sizes keep output.fit as written.
        let mut q = p.clone();
        q.stream.width = Px(512);
        q.stream.height = Px(512);
        q.output.fit = Fit::Letterbox;
        let (r, _) = running(&q);
        assert_eq!(r.output.fit, Fit::Letterbox);
    }
}
