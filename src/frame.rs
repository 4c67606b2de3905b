//! The one frame type that travels through sdcam: pixels with an explicit pixel format and colour range.

use std::time::Instant;

/// The largest picture sdcam accepts from a file or stream, checked from the header before
/// anything is allocated: 8192 × 8192 pixels (64 Mpx; an 8K UHD frame is 33 Mpx). A 4:2:0 frame
/// of that size is 96 MiB, its RGB copy 192 MiB, so a hostile header cannot make sdcam allocate
/// without bound.
pub const MAX_PIXELS: u64 = 8192 * 8192;

/// Refuses a `width × height` picture above [`MAX_PIXELS`] (or of zero size); `what` names it.
pub fn check_pixel_limit(width: u64, height: u64, what: &str) -> anyhow::Result<()> {
    if width == 0 || height == 0 {
        anyhow::bail!("{what}: size {width}x{height} is empty");
    }
    if width.saturating_mul(height) > MAX_PIXELS || width > 65535 || height > 65535 {
        anyhow::bail!(
            "{what}: {width}x{height} pixels is more than sdcam's limit of {} Mpx (8192x8192); \
             scale it down first (e.g. ffmpeg -vf scale=1920:-2)",
            MAX_PIXELS / (1 << 20)
        );
    }
    Ok(())
}

/// How the bytes of a [`Frame`] are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Packed 8-bit R, G, B (3 bytes a pixel). The format the transform stage works in.
    Rgb24,
    /// Packed 8-bit B, G, R, X (4 bytes a pixel), as X11 delivers 24-bit screens.
    Bgrx32,
    /// Packed 4:2:2 Y0 U Y1 V (2 bytes a pixel); the common webcam and v4l2loopback format.
    Yuyv,
    /// Planar Y then interleaved UV at half resolution in both directions (4:2:0).
    Nv12,
    /// Planar Y, U, V, chroma at half resolution in both directions (4:2:0), a.k.a. YU12.
    I420,
    /// A complete JPEG image (Motion-JPEG camera frame); size is that of the decoded image.
    Mjpeg,
}

impl PixelFormat {
    /// Bytes a frame of this format and size occupies (`None` for compressed formats).
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        Some(match self {
            PixelFormat::Rgb24 => w * h * 3,
            PixelFormat::Bgrx32 => w * h * 4,
            PixelFormat::Yuyv => w.div_ceil(2) * 4 * h,
            PixelFormat::Nv12 => w * h + cw * 2 * ch,
            PixelFormat::I420 => w * h + 2 * cw * ch,
            PixelFormat::Mjpeg => return None,
        })
    }

    /// Short lower-case name used in profiles and logs.
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb24 => "rgb24",
            PixelFormat::Bgrx32 => "bgrx32",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::I420 => "i420",
            PixelFormat::Mjpeg => "mjpeg",
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantisation range of YUV samples. RGB frames are always full range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ColorRange {
    /// BT.601 "TV" range: Y in 16..=235, Cb/Cr in 16..=240. What cameras and v4l2loopback consumers use.
    #[default]
    Limited,
    /// "PC"/JPEG range: every component in 0..=255.
    Full,
}

/// A video frame: pixel data plus the bookkeeping the relay needs to measure latency and drops.
#[derive(Debug, Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub range: ColorRange,
    pub data: Vec<u8>,
    /// Sequence number given by the source (monotonic per source).
    pub seq: u64,
    /// When the source produced the frame; end-to-end latency is measured from here.
    pub captured_at: Instant,
}

impl Frame {
    /// A frame from raw bytes; checks that the buffer is large enough for the format and size.
    pub fn new(
        width: u32,
        height: u32,
        format: PixelFormat,
        range: ColorRange,
        data: Vec<u8>,
    ) -> crate::Result<Self> {
        if width == 0 || height == 0 {
            anyhow::bail!("frame size {width}x{height} is empty");
        }
        if let Some(len) = format.frame_len(width, height) {
            if data.len() < len {
                anyhow::bail!(
                    "{format} frame {width}x{height} needs {len} bytes, got {}",
                    data.len()
                );
            }
        }
        Ok(Frame {
            width,
            height,
            format,
            range,
            data,
            seq: 0,
            captured_at: Instant::now(),
        })
    }

    /// An RGB frame filled with one colour.
    pub fn solid_rgb(width: u32, height: u32, rgb: [u8; 3]) -> Self {
        let data = rgb
            .iter()
            .copied()
            .cycle()
            .take(width as usize * height as usize * 3)
            .collect();
        Frame {
            width,
            height,
            format: PixelFormat::Rgb24,
            range: ColorRange::Full,
            data,
            seq: 0,
            captured_at: Instant::now(),
        }
    }

    /// Same timing metadata, new pixels.
    pub fn with_data(&self, width: u32, height: u32, format: PixelFormat, data: Vec<u8>) -> Self {
        Frame {
            width,
            height,
            format,
            range: if format == PixelFormat::Rgb24 || format == PixelFormat::Bgrx32 {
                ColorRange::Full
            } else {
                self.range
            },
            data,
            seq: self.seq,
            captured_at: self.captured_at,
        }
    }

    /// RGB value of pixel (x, y) of an `Rgb24` frame.
    pub fn rgb_at(&self, x: u32, y: u32) -> [u8; 3] {
        debug_assert_eq!(self.format, PixelFormat::Rgb24);
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths() {
        assert_eq!(PixelFormat::Yuyv.frame_len(4, 2), Some(16));
        assert_eq!(PixelFormat::I420.frame_len(4, 2), Some(8 + 2 + 2));
        assert_eq!(PixelFormat::Nv12.frame_len(3, 3), Some(9 + 8));
        assert_eq!(PixelFormat::Mjpeg.frame_len(4, 4), None);
    }

    #[test]
    fn short_buffer_is_rejected() {
        let err = Frame::new(4, 4, PixelFormat::Rgb24, ColorRange::Full, vec![0; 47]).unwrap_err();
        assert!(err.to_string().contains("needs 48 bytes"), "{err}");
    }
}
