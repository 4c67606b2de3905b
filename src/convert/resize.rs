//! Resizing RGB frames between source, model and output sizes with SIMD (`fast_image_resize`),
//! with a choice of how to handle a different aspect ratio: center-crop, letterbox or stretch.

use anyhow::Context;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::frame::{Frame, PixelFormat};
use crate::Result;

/// How to map a source onto a destination of another aspect ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Scale to cover the destination and cut the overflow equally on both sides (no bars).
    #[default]
    Crop,
    /// Scale to fit inside the destination and fill the rest with black bars.
    Letterbox,
    /// Scale each axis independently (distorts).
    Stretch,
}

impl std::str::FromStr for Fit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "crop" => Ok(Fit::Crop),
            "letterbox" => Ok(Fit::Letterbox),
            "stretch" => Ok(Fit::Stretch),
            _ => anyhow::bail!("unknown fit {s:?} (expected crop, letterbox or stretch)"),
        }
    }
}

/// Where the source lands: the source rectangle read (x, y, w, h) and the destination rectangle
/// written (x, y, w, h). Pure geometry, so it can be tested exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub src: (f64, f64, f64, f64),
    pub dst: (u32, u32, u32, u32),
}

/// Computes the [`Placement`] of a `sw`×`sh` source in a `dw`×`dh` destination.
pub fn placement(sw: u32, sh: u32, dw: u32, dh: u32, fit: Fit) -> Placement {
    let (swf, shf, dwf, dhf) = (sw as f64, sh as f64, dw as f64, dh as f64);
    let full_src = (0.0, 0.0, swf, shf);
    match fit {
        Fit::Stretch => Placement {
            src: full_src,
            dst: (0, 0, dw, dh),
        },
        Fit::Crop => {
            // Source region with the destination's aspect ratio, centred.
            if swf * dhf > dwf * shf {
                let w = shf * dwf / dhf;
                Placement {
                    src: ((swf - w) / 2.0, 0.0, w, shf),
                    dst: (0, 0, dw, dh),
                }
            } else {
                let h = swf * dhf / dwf;
                Placement {
                    src: (0.0, (shf - h) / 2.0, swf, h),
                    dst: (0, 0, dw, dh),
                }
            }
        }
        Fit::Letterbox => {
            let scale = (dwf / swf).min(dhf / shf);
            let w = ((swf * scale).round() as u32).clamp(1, dw);
            let h = ((shf * scale).round() as u32).clamp(1, dh);
            Placement {
                src: full_src,
                dst: ((dw - w) / 2, (dh - h) / 2, w, h),
            }
        }
    }
}

/// A reusable resizer for RGB24 frames (keeps its scratch buffers between frames).
#[derive(Default)]
pub struct RgbResizer {
    resizer: Resizer,
}

impl std::fmt::Debug for RgbResizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RgbResizer")
    }
}

impl RgbResizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resizes an RGB24 frame to `dw`×`dh` with the given fit, optionally mirrored horizontally.
    /// Returns the input unchanged (cloned) when no work is needed.
    pub fn resize(
        &mut self,
        src: &Frame,
        dw: u32,
        dh: u32,
        fit: Fit,
        mirror: bool,
    ) -> Result<Frame> {
        anyhow::ensure!(
            src.format == PixelFormat::Rgb24,
            "resize expects rgb24, got {}",
            src.format
        );
        let mut out = if src.width == dw && src.height == dh {
            src.data.clone()
        } else {
            let p = placement(src.width, src.height, dw, dh, fit);
            let view = ImageRef::new(src.width, src.height, &src.data, PixelType::U8x3)
                .context("source image buffer")?;
            let opts = ResizeOptions::new()
                .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
                .crop(p.src.0, p.src.1, p.src.2, p.src.3);
            let (x, y, w, h) = p.dst;
            if (x, y, w, h) == (0, 0, dw, dh) {
                let mut dst = Image::new(dw, dh, PixelType::U8x3);
                self.resizer
                    .resize(&view, &mut dst, &opts)
                    .context("resize")?;
                dst.into_vec()
            } else {
                let mut inner = Image::new(w, h, PixelType::U8x3);
                self.resizer
                    .resize(&view, &mut inner, &opts)
                    .context("resize")?;
                let mut out = vec![0u8; dw as usize * dh as usize * 3];
                let row = w as usize * 3;
                for (r, line) in inner.buffer().chunks_exact(row).enumerate() {
                    let at = ((y as usize + r) * dw as usize + x as usize) * 3;
                    out[at..at + row].copy_from_slice(line);
                }
                out
            }
        };
        if mirror {
            mirror_rgb(&mut out, dw as usize);
        }
        Ok(src.with_data(dw, dh, PixelFormat::Rgb24, out))
    }
}

/// Flips an RGB24 image left-to-right in place.
pub fn mirror_rgb(data: &mut [u8], width: usize) {
    for line in data.chunks_exact_mut(width * 3) {
        let (mut a, mut b) = (0, width.saturating_sub(1));
        while a < b {
            for c in 0..3 {
                line.swap(a * 3 + c, b * 3 + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_geometry() {
        // 1280×720 → 512×512: the centred 720×720 square.
        let p = placement(1280, 720, 512, 512, Fit::Crop);
        assert_eq!(p.src, (280.0, 0.0, 720.0, 720.0));
        assert_eq!(p.dst, (0, 0, 512, 512));
        // 512×512 → 1280×720: the middle 288 rows of the square.
        let p = placement(512, 512, 1280, 720, Fit::Crop);
        assert_eq!(p.src, (0.0, 112.0, 512.0, 288.0));
    }

    #[test]
    fn letterbox_geometry() {
        let p = placement(1280, 720, 512, 512, Fit::Letterbox);
        assert_eq!(p.src, (0.0, 0.0, 1280.0, 720.0));
        assert_eq!(p.dst, (0, 112, 512, 288));
        let p = placement(512, 512, 1280, 720, Fit::Letterbox);
        assert_eq!(p.dst, (280, 0, 720, 720));
    }

    #[test]
    fn stretch_geometry() {
        let p = placement(640, 480, 512, 512, Fit::Stretch);
        assert_eq!(p.src, (0.0, 0.0, 640.0, 480.0));
        assert_eq!(p.dst, (0, 0, 512, 512));
    }

    /// A frame whose left half is red and right half is blue.
    fn halves(w: u32, h: u32) -> Frame {
        let mut f = Frame::solid_rgb(w, h, [255, 0, 0]);
        for y in 0..h as usize {
            for x in (w as usize / 2)..w as usize {
                f.data[(y * w as usize + x) * 3..][..3].copy_from_slice(&[0, 0, 255]);
            }
        }
        f
    }

    #[test]
    fn letterbox_leaves_black_bars_and_keeps_content() {
        let mut r = RgbResizer::new();
        let out = r
            .resize(&halves(64, 32), 32, 32, Fit::Letterbox, false)
            .unwrap();
        assert_eq!((out.width, out.height), (32, 32));
        assert_eq!(out.rgb_at(16, 2), [0, 0, 0]); // top bar
        assert_eq!(out.rgb_at(16, 29), [0, 0, 0]); // bottom bar
        assert_eq!(out.rgb_at(2, 16), [255, 0, 0]);
        assert_eq!(out.rgb_at(29, 16), [0, 0, 255]);
    }

    #[test]
    fn crop_keeps_centre_and_mirror_flips() {
        let mut r = RgbResizer::new();
        // 64×16 → 16×16 crops the centre 16×16 of the source: left red, right blue.
        let out = r.resize(&halves(64, 16), 16, 16, Fit::Crop, false).unwrap();
        assert_eq!(out.rgb_at(1, 8), [255, 0, 0]);
        assert_eq!(out.rgb_at(14, 8), [0, 0, 255]);
        let m = r.resize(&halves(64, 16), 16, 16, Fit::Crop, true).unwrap();
        assert_eq!(m.rgb_at(1, 8), [0, 0, 255]);
        assert_eq!(m.rgb_at(14, 8), [255, 0, 0]);
    }

    #[test]
    fn uniform_colour_survives_resize() {
        let mut r = RgbResizer::new();
        let out = r
            .resize(
                &Frame::solid_rgb(1280, 720, [10, 200, 30]),
                512,
                512,
                Fit::Crop,
                false,
            )
            .unwrap();
        assert!(out.data.chunks_exact(3).all(|p| p == [10, 200, 30]));
    }
}
