//! The pixel side of screen capture: how the X server lays out ZPixmap images of the root
//! visual ([`ImageLayout`]) and their conversion to tightly packed BGRX rows. Pure functions of
//! the bytes, tested without an X server.

use anyhow::{anyhow, bail};
use x11rb::protocol::xproto::{self, ImageOrder, VisualClass};

use crate::Result;

/// How the server lays out ZPixmap images of the root visual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ImageLayout {
    depth: u8,
    /// 16 or 32.
    bits_per_pixel: u8,
    /// Each scanline is padded to a multiple of this many bits.
    scanline_pad: u8,
    /// Pixel values are stored most significant byte first.
    msb_first: bool,
    red_mask: u32,
    green_mask: u32,
    blue_mask: u32,
}

impl ImageLayout {
    /// The layout of `screen`'s root visual; errors for visuals sdcam cannot convert.
    pub(super) fn for_screen(
        setup: &xproto::Setup,
        screen: &xproto::Screen,
    ) -> Result<ImageLayout> {
        let depth = screen.root_depth;
        let visual = screen
            .allowed_depths
            .iter()
            .flat_map(|d| d.visuals.iter())
            .find(|v| v.visual_id == screen.root_visual)
            .ok_or_else(|| anyhow!("the root visual of the X screen is not listed"))?;
        let format = setup
            .pixmap_formats
            .iter()
            .find(|f| f.depth == depth)
            .ok_or_else(|| anyhow!("the X server lists no pixmap format for depth {depth}"))?;
        let layout = ImageLayout {
            depth,
            bits_per_pixel: format.bits_per_pixel,
            scanline_pad: format.scanline_pad,
            msb_first: setup.image_byte_order == ImageOrder::MSB_FIRST,
            red_mask: visual.red_mask,
            green_mask: visual.green_mask,
            blue_mask: visual.blue_mask,
        };
        let true_color =
            visual.class == VisualClass::TRUE_COLOR || visual.class == VisualClass::DIRECT_COLOR;
        if !true_color || !layout.is_supported() {
            bail!(
                "unsupported screen depth {depth} ({} bits per pixel, {:?} visual); \
                 sdcam captures 15/16/24/32-bit TrueColor screens",
                layout.bits_per_pixel,
                visual.class
            );
        }
        Ok(layout)
    }

    /// Whether [`ImageLayout::convert_to_bgrx`] can convert this layout.
    fn is_supported(&self) -> bool {
        let bpp_ok = matches!(self.bits_per_pixel, 16 | 32);
        let pad_ok = matches!(self.scanline_pad, 8 | 16 | 32 | 64);
        let limit = if self.bits_per_pixel == 16 {
            0xffff
        } else {
            u32::MAX
        };
        let masks_ok = [self.red_mask, self.green_mask, self.blue_mask]
            .iter()
            .all(|&m| m != 0 && m <= limit && mask_width(m) <= 16);
        bpp_ok && pad_ok && masks_ok
    }

    /// The common case: little-endian 32-bit pixels with 8-bit channels in B, G, R, X order.
    fn is_native_bgrx(&self) -> bool {
        self.bits_per_pixel == 32
            && !self.msb_first
            && (self.red_mask, self.green_mask, self.blue_mask) == (0xff0000, 0xff00, 0xff)
    }

    /// Bytes a scanline `width` pixels wide occupies, padding included.
    pub(super) fn stride(&self, width: u32) -> usize {
        let bits = width as usize * usize::from(self.bits_per_pixel);
        let pad = usize::from(self.scanline_pad.max(8));
        bits.div_ceil(pad) * pad / 8
    }

    /// Converts a `width` x `height` ZPixmap image into tightly packed BGRX bytes.
    pub(super) fn convert_to_bgrx(&self, src: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
        let (w, h) = (width as usize, height as usize);
        let stride = self.stride(width);
        let bytes_pp = usize::from(self.bits_per_pixel / 8);
        let row_bytes = w * bytes_pp;
        let needed = if h == 0 {
            0
        } else {
            stride * (h - 1) + row_bytes
        };
        if src.len() < needed {
            bail!(
                "X image for {width}x{height} is {} bytes, expected at least {needed}",
                src.len()
            );
        }
        let mut out = Vec::with_capacity(w * h * 4);
        if self.is_native_bgrx() {
            for row in src.chunks(stride).take(h) {
                out.extend_from_slice(&row[..row_bytes]);
            }
            return Ok(out);
        }
        let channels = [
            Channel::new(self.blue_mask),
            Channel::new(self.green_mask),
            Channel::new(self.red_mask),
        ];
        for row in src.chunks(stride).take(h) {
            for px in row[..row_bytes].chunks_exact(bytes_pp) {
                let value = match (bytes_pp, self.msb_first) {
                    (2, false) => u32::from(u16::from_le_bytes([px[0], px[1]])),
                    (2, true) => u32::from(u16::from_be_bytes([px[0], px[1]])),
                    (_, false) => u32::from_le_bytes([px[0], px[1], px[2], px[3]]),
                    (_, true) => u32::from_be_bytes([px[0], px[1], px[2], px[3]]),
                };
                for c in &channels {
                    out.push(c.extract(value));
                }
                out.push(0xff);
            }
        }
        Ok(out)
    }
}

/// Number of bits between the lowest and highest set bit of `mask`.
fn mask_width(mask: u32) -> u32 {
    if mask == 0 {
        0
    } else {
        32 - mask.leading_zeros() - mask.trailing_zeros()
    }
}

/// One colour channel of a TrueColor pixel: where it sits and how to scale it to 8 bits.
#[derive(Debug, Clone, Copy)]
struct Channel {
    mask: u32,
    shift: u32,
    max: u32,
}

impl Channel {
    fn new(mask: u32) -> Channel {
        let shift = mask.trailing_zeros().min(31);
        let max = (mask >> shift).max(1);
        Channel { mask, shift, max }
    }

    /// The channel of `pixel`, scaled to 0..=255 with rounding.
    fn extract(&self, pixel: u32) -> u8 {
        let v = (pixel & self.mask) >> self.shift;
        if self.max == 0xff {
            v as u8
        } else {
            ((u64::from(v) * 255 + u64::from(self.max) / 2) / u64::from(self.max)) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bgrx_layout() -> ImageLayout {
        ImageLayout {
            depth: 24,
            bits_per_pixel: 32,
            scanline_pad: 32,
            msb_first: false,
            red_mask: 0xff0000,
            green_mask: 0xff00,
            blue_mask: 0xff,
        }
    }

    #[test]
    fn padded_rows_are_stripped() {
        // 16 bpp, 3 pixels wide: 6 bytes of pixels, padded to 8 per row.
        let layout = ImageLayout {
            depth: 16,
            bits_per_pixel: 16,
            scanline_pad: 32,
            msb_first: false,
            red_mask: 0xf800,
            green_mask: 0x07e0,
            blue_mask: 0x001f,
        };
        assert_eq!(layout.stride(3), 8);
        let red = 0xf800u16.to_le_bytes();
        let green = 0x07e0u16.to_le_bytes();
        let blue = 0x001fu16.to_le_bytes();
        let mut src = Vec::new();
        for _ in 0..2 {
            src.extend_from_slice(&red);
            src.extend_from_slice(&green);
            src.extend_from_slice(&blue);
            src.extend_from_slice(&[0xaa, 0xbb]); // padding
        }
        let out = layout.convert_to_bgrx(&src[..14], 3, 2).unwrap();
        let px = [0, 0, 255, 255, 0, 255, 0, 255, 255, 0, 0, 255];
        assert_eq!(out, [px, px].concat());
    }

    #[test]
    fn native_bgrx_rows_are_copied_without_padding() {
        let layout = ImageLayout {
            scanline_pad: 64,
            ..bgrx_layout()
        };
        // 1 pixel wide, padded to 8 bytes.
        assert_eq!(layout.stride(1), 8);
        let src = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8];
        assert_eq!(
            layout.convert_to_bgrx(&src, 1, 2).unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(bgrx_layout().stride(5), 20);
    }

    #[test]
    fn big_endian_and_short_images() {
        let layout = ImageLayout {
            msb_first: true,
            ..bgrx_layout()
        };
        // XRGB in memory order: x=0, r=0x11, g=0x22, b=0x33.
        let out = layout
            .convert_to_bgrx(&[0, 0x11, 0x22, 0x33], 1, 1)
            .unwrap();
        assert_eq!(out, [0x33, 0x22, 0x11, 0xff]);
        let err = bgrx_layout().convert_to_bgrx(&[0; 7], 1, 2).unwrap_err();
        assert!(err.to_string().contains("expected at least 8"), "{err}");
    }

    #[test]
    fn unsupported_layouts_are_detected() {
        assert!(bgrx_layout().is_supported());
        let packed24 = ImageLayout {
            bits_per_pixel: 24,
            ..bgrx_layout()
        };
        assert!(!packed24.is_supported());
        let eight = ImageLayout {
            depth: 8,
            bits_per_pixel: 8,
            ..bgrx_layout()
        };
        assert!(!eight.is_supported());
    }

    #[test]
    fn channel_scaling() {
        let five = Channel::new(0x001f);
        assert_eq!(five.extract(0x1f), 255);
        assert_eq!(five.extract(0), 0);
        assert_eq!(five.extract(0x10), 132);
        assert_eq!(Channel::new(0xff00).extract(0xab00), 0xab);
    }
}
