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
    /// Bytes a frame of this format and size occupies (`None` for compressed formats): the
    /// length of its tightly packed [`PlaneLayout`].
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        self.layout(width as usize, height as usize)
            .map(|l| l.len())
    }

    /// The byte layout of a tightly packed `width × height` frame (pixels; `None` for
    /// compressed formats). The one place that knows where each plane of a raw frame lies:
    /// 4:2:0 chroma is half the size rounded up in both directions, a YUYV line covers
    /// whole pixel pairs (an odd width is padded by one pixel).
    pub fn layout(self, width: usize, height: usize) -> Option<PlaneLayout> {
        self.layout_with_stride(width, height, 0)
    }

    /// Like [`PixelFormat::layout`], with the first plane's lines `stride` bytes apart as a
    /// V4L2 driver's `bytesperline` gives them (0: tightly packed; a stride shorter than a
    /// line is taken as packed too, callers check it). The other planes follow V4L2's rule
    /// for single-buffer formats: NV12's UV plane has the luma stride, I420's U and V planes
    /// half of it. Rows keep their tight `row_bytes`; only the distance between rows grows.
    pub fn layout_with_stride(
        self,
        width: usize,
        height: usize,
        stride: usize,
    ) -> Option<PlaneLayout> {
        let (w, h) = (width, height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        // (bytes of pixel data in a row, rows, stride divisor relative to the first plane)
        let rows: &[(usize, usize, usize)] = match self {
            PixelFormat::Rgb24 => &[(w * 3, h, 1)],
            PixelFormat::Bgrx32 => &[(w * 4, h, 1)],
            PixelFormat::Yuyv => &[(cw * 4, h, 1)],
            PixelFormat::Nv12 => &[(w, h, 1), (cw * 2, ch, 1)],
            PixelFormat::I420 => &[(w, h, 1), (cw, ch, 2), (cw, ch, 2)],
            PixelFormat::Mjpeg => return None,
        };
        let packed = stride <= rows[0].0;
        let mut layout = PlaneLayout {
            planes: [Plane::default(); 3],
            count: rows.len(),
        };
        let mut offset = 0;
        for (plane, &(row_bytes, rows, div)) in layout.planes.iter_mut().zip(rows) {
            let stride = if packed { row_bytes } else { stride / div };
            *plane = Plane {
                offset,
                row_bytes,
                stride,
                rows,
            };
            offset += stride * rows;
        }
        Some(layout)
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

/// One plane of a raw frame inside the frame's bytes (all in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plane {
    /// Where the plane's first row starts.
    pub offset: usize,
    /// Bytes of pixel data in a row (what a tightly packed frame keeps of it).
    pub row_bytes: usize,
    /// Distance from one row's start to the next (`row_bytes` when tightly packed).
    pub stride: usize,
    /// Number of rows.
    pub rows: usize,
}

impl Plane {
    /// Where the plane's last row of pixel data ends (`offset` for an empty plane).
    pub fn data_end(&self) -> usize {
        match self.rows {
            0 => self.offset,
            n => self.offset + self.stride * (n - 1) + self.row_bytes,
        }
    }

    /// Byte range of row `r` (its pixel data only, without stride padding).
    pub fn row(&self, r: usize) -> std::ops::Range<usize> {
        let start = self.offset + r * self.stride;
        start..start + self.row_bytes
    }
}

/// Where the planes of a raw frame lie: one plane for packed formats (RGB24, BGRX, YUYV), two
/// for NV12 (Y, interleaved UV), three for I420 (Y, U, V). Built by [`PixelFormat::layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneLayout {
    planes: [Plane; 3],
    count: usize,
}

impl PlaneLayout {
    /// The planes in memory order.
    pub fn planes(&self) -> &[Plane] {
        &self.planes[..self.count]
    }

    /// Plane `i` (0: Y or the packed pixels; 1, 2: chroma). Panics past [`PlaneLayout::planes`].
    pub fn plane(&self, i: usize) -> Plane {
        self.planes()[i]
    }

    /// Bytes of the whole frame, stride padding included (the tight frame length when packed).
    pub fn len(&self) -> usize {
        self.planes()
            .last()
            .map_or(0, |p| p.offset + p.stride * p.rows)
    }

    /// Whether the frame has no bytes (a zero width or height).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes a buffer needs to hold every row's pixel data: [`PlaneLayout::len`] less the
    /// padding after the last row.
    pub fn data_end(&self) -> usize {
        self.planes().last().map_or(0, Plane::data_end)
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
    fn plane_layouts_round_odd_sizes_up() {
        let l = PixelFormat::I420.layout(5, 3).unwrap();
        let at = |p: Plane| (p.offset, p.row_bytes, p.stride, p.rows);
        assert_eq!(l.planes().len(), 3);
        assert_eq!(at(l.plane(0)), (0, 5, 5, 3));
        assert_eq!(at(l.plane(1)), (15, 3, 3, 2));
        assert_eq!(at(l.plane(2)), (21, 3, 3, 2));
        assert_eq!((l.len(), l.data_end()), (27, 27));
        let l = PixelFormat::Nv12.layout(3, 3).unwrap();
        assert_eq!(at(l.plane(1)), (9, 4, 4, 2));
        assert_eq!(l.len(), 17);
        let l = PixelFormat::Yuyv.layout(3, 2).unwrap();
        assert_eq!((l.planes().len(), at(l.plane(0))), (1, (0, 8, 8, 2)));
        assert_eq!(PixelFormat::Rgb24.layout(2, 2).unwrap().len(), 12);
        assert_eq!(PixelFormat::Bgrx32.layout(2, 2).unwrap().len(), 16);
        assert!(PixelFormat::Mjpeg.layout(2, 2).is_none());
        assert!(PixelFormat::I420.layout(0, 4).unwrap().is_empty());
    }

    #[test]
    fn strided_layouts_follow_v4l2() {
        // I420 4x2 with 8-byte luma lines: chroma lines are 4 bytes apart.
        let l = PixelFormat::I420.layout_with_stride(4, 2, 8).unwrap();
        let at = |p: Plane| (p.offset, p.row_bytes, p.stride, p.rows);
        assert_eq!(at(l.plane(0)), (0, 4, 8, 2));
        assert_eq!(at(l.plane(1)), (16, 2, 4, 1));
        assert_eq!(at(l.plane(2)), (20, 2, 4, 1));
        assert_eq!((l.len(), l.data_end()), (24, 22));
        assert_eq!(l.plane(0).row(1), 8..12);
        // NV12: the UV plane has the luma stride.
        let l = PixelFormat::Nv12.layout_with_stride(2, 2, 4).unwrap();
        assert_eq!(at(l.plane(1)), (8, 2, 4, 1));
        // A stride of 0 (or one no longer than a line) is the packed layout.
        assert_eq!(
            PixelFormat::Yuyv.layout_with_stride(2, 2, 0),
            PixelFormat::Yuyv.layout(2, 2)
        );
    }

    #[test]
    fn short_buffer_is_rejected() {
        let err = Frame::new(4, 4, PixelFormat::Rgb24, ColorRange::Full, vec![0; 47]).unwrap_err();
        assert!(err.to_string().contains("needs 48 bytes"), "{err}");
    }
}
