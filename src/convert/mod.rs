//! Frame conversion: pixel formats (YUYV, NV12, I420, MJPEG, BGRX ⇄ RGB24) and resizing.
//!
//! The relay converts every captured frame to RGB24 at the model's size before the transform, and
//! the transform's RGB24 output to the sink's format and size afterwards.

pub mod resize;
pub mod yuv;

use anyhow::Context;

use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::Result;

pub use resize::{Fit, RgbResizer};

/// Decodes an MJPEG camera frame to RGB24. Returns (width, height, pixels). The size is checked
/// against [`crate::frame::MAX_PIXELS`] from the header before decoding; greyscale JPEGs come
/// out grey. (Still images go through `source::image::decode_image`, which also handles
/// orientation; this path stays on zune-jpeg directly for speed.)
pub fn decode_jpeg(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(65535)
        .set_max_height(65535);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
    dec.decode_headers()
        .map_err(|e| anyhow::anyhow!("JPEG header: {e:?}"))?;
    let (w, h) = dec.dimensions().context("JPEG has no image header")?;
    crate::frame::check_pixel_limit(w as u64, h as u64, "JPEG frame")?;
    let pixels = dec
        .decode()
        .map_err(|e| anyhow::anyhow!("JPEG decode failed: {e:?}"))?;
    let pixels = match pixels.len() {
        n if n == w * h * 3 => pixels,
        n if n == w * h => pixels.iter().flat_map(|&g| [g, g, g]).collect(),
        n => anyhow::bail!("JPEG decoder gave {n} bytes for {w}x{h} pixels"),
    };
    Ok((w as u32, h as u32, pixels))
}

/// Converts any frame to RGB24 (full range). RGB24 input is returned as a clone.
pub fn to_rgb(frame: &Frame) -> Result<Frame> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut out = vec![0u8; w * h * 3];
    match frame.format {
        PixelFormat::Rgb24 => return Ok(frame.clone()),
        PixelFormat::Bgrx32 => yuv::bgrx_to_rgb(&frame.data, &mut out),
        PixelFormat::Yuyv => yuv::yuyv_to_rgb(&frame.data, w, h, frame.range, &mut out),
        PixelFormat::Nv12 => yuv::nv12_to_rgb(&frame.data, w, h, frame.range, &mut out),
        PixelFormat::I420 => yuv::i420_to_rgb(&frame.data, w, h, frame.range, &mut out),
        PixelFormat::Mjpeg => {
            let (jw, jh, px) = decode_jpeg(&frame.data).context("decoding MJPEG frame")?;
            return Ok(frame.with_data(jw, jh, PixelFormat::Rgb24, px));
        }
    }
    Ok(frame.with_data(frame.width, frame.height, PixelFormat::Rgb24, out))
}

/// Converts an RGB24 frame to `format` with the given YUV range.
pub fn from_rgb(frame: &Frame, format: PixelFormat, range: ColorRange) -> Result<Frame> {
    anyhow::ensure!(
        frame.format == PixelFormat::Rgb24,
        "expected an rgb24 frame, got {}",
        frame.format
    );
    let (w, h) = (frame.width as usize, frame.height as usize);
    let len = format
        .frame_len(frame.width, frame.height)
        .with_context(|| format!("cannot encode frames to {format}"))?;
    let mut out = vec![0u8; len];
    match format {
        PixelFormat::Rgb24 => return Ok(frame.clone()),
        PixelFormat::Yuyv => yuv::rgb_to_yuyv(&frame.data, w, h, range, &mut out),
        PixelFormat::I420 => yuv::rgb_to_i420(&frame.data, w, h, range, &mut out),
        PixelFormat::Nv12 => yuv::rgb_to_nv12(&frame.data, w, h, range, &mut out),
        PixelFormat::Bgrx32 => {
            for (d, s) in out.chunks_exact_mut(4).zip(frame.data.chunks_exact(3)) {
                d.copy_from_slice(&[s[2], s[1], s[0], 255]);
            }
        }
        PixelFormat::Mjpeg => unreachable!("frame_len is None for mjpeg"),
    }
    let mut f = frame.with_data(frame.width, frame.height, format, out);
    f.range = if matches!(format, PixelFormat::Bgrx32) {
        ColorRange::Full
    } else {
        range
    };
    Ok(f)
}

/// Pre-processing: any source frame → RGB24 at `w`×`h` (the transform's working size).
#[derive(Debug, Default)]
pub struct Preprocess {
    resizer: RgbResizer,
}

impl Preprocess {
    pub fn run(&mut self, frame: &Frame, w: u32, h: u32, fit: Fit, mirror: bool) -> Result<Frame> {
        let rgb = to_rgb(frame)?;
        self.resizer.resize(&rgb, w, h, fit, mirror)
    }
}

/// Post-processing: an RGB24 transform output → the sink's format at `w`×`h`.
#[derive(Debug, Default)]
pub struct Postprocess {
    resizer: RgbResizer,
}

impl Postprocess {
    pub fn run(
        &mut self,
        frame: &Frame,
        w: u32,
        h: u32,
        fit: Fit,
        format: PixelFormat,
    ) -> Result<Frame> {
        let rgb = self.resizer.resize(frame, w, h, fit, false)?;
        from_rgb(&rgb, format, ColorRange::Limited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_yuyv_i420_nv12_round_trips_through_frames() {
        let mut src = Frame::solid_rgb(6, 4, [255, 0, 0]);
        src.data[..3].copy_from_slice(&[255, 255, 255]);
        for fmt in [
            PixelFormat::Yuyv,
            PixelFormat::I420,
            PixelFormat::Nv12,
            PixelFormat::Bgrx32,
        ] {
            let enc = from_rgb(&src, fmt, ColorRange::Limited).unwrap();
            assert_eq!(enc.format, fmt);
            assert_eq!(Some(enc.data.len()), fmt.frame_len(6, 4));
            let back = to_rgb(&enc).unwrap();
            // Pixels away from the white corner's chroma block come back as red (±1 code).
            let p = back.rgb_at(5, 3);
            assert!(p[0] >= 254 && p[1] <= 1 && p[2] <= 1, "{fmt}: {p:?}");
        }
    }

    #[test]
    fn jpeg_decodes() {
        // A 16×8 solid red baseline JPEG (written once with Pillow, quality 95).
        let bytes = include_bytes!("../../tests/data/red_16x8.jpg");
        let (w, h, px) = decode_jpeg(bytes).unwrap();
        assert_eq!((w, h), (16, 8));
        let p = &px[(4 * 16 + 8) * 3..][..3];
        assert!(p[0] > 240 && p[1] < 15 && p[2] < 15, "{p:?}");
        assert!(decode_jpeg(&bytes[..40]).is_err());
    }
}
