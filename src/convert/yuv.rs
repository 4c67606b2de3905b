//! BT.601 YUV ⇄ RGB conversion in 8-bit fixed point, for limited ("TV") and full ("JPEG") range.
//!
//! Limited range follows the classic integer form of BT.601 (Y in 16..=235, chroma in 16..=240):
//! `Y = ((66R + 129G + 25B + 128) >> 8) + 16`, `R = (298(Y−16) + 409(V−128) + 128) >> 8`, etc.
//! Chroma is subsampled by averaging the covered pixels' U and V.

use crate::frame::{ColorRange, PixelFormat, PlaneLayout};

/// The plane layout of a raw (uncompressed) format, which always has one.
fn raw_layout(format: PixelFormat, width: usize, height: usize) -> PlaneLayout {
    format
        .layout(width, height)
        .unwrap_or_else(|| unreachable!("{format} is a raw format"))
}

#[inline(always)]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Y, U, V of one RGB pixel.
#[inline(always)]
pub fn rgb_to_yuv(r: u8, g: u8, b: u8, range: ColorRange) -> (u8, u8, u8) {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    match range {
        ColorRange::Limited => (
            (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8,
            clamp8(((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128),
            clamp8(((112 * r - 94 * g - 18 * b + 128) >> 8) + 128),
        ),
        ColorRange::Full => (
            ((77 * r + 150 * g + 29 * b + 128) >> 8) as u8,
            clamp8(((-43 * r - 85 * g + 128 * b + 128) >> 8) + 128),
            clamp8(((128 * r - 107 * g - 21 * b + 128) >> 8) + 128),
        ),
    }
}

/// Chroma (U, V) of one RGB pixel, scaled by 256 and not yet rounded, for averaging.
#[inline(always)]
fn rgb_to_uv_raw(r: i32, g: i32, b: i32, range: ColorRange) -> (i32, i32) {
    match range {
        ColorRange::Limited => (-38 * r - 74 * g + 112 * b, 112 * r - 94 * g - 18 * b),
        ColorRange::Full => (-43 * r - 85 * g + 128 * b, 128 * r - 107 * g - 21 * b),
    }
}

#[inline(always)]
fn luma(r: i32, g: i32, b: i32, range: ColorRange) -> u8 {
    match range {
        ColorRange::Limited => (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8,
        ColorRange::Full => ((77 * r + 150 * g + 29 * b + 128) >> 8) as u8,
    }
}

/// Averages `n` raw chroma sums (n = 2 or 4) and rounds to an 8-bit sample.
#[inline(always)]
fn chroma_avg(sum: i32, n: i32) -> u8 {
    // sum is 256 × n × (chroma − 128); round to nearest.
    // n is 2 or 4: divide by 512 or 1024 with an arithmetic shift (floor, like div_euclid).
    let shift = if n == 4 { 10 } else { 9 };
    clamp8(((sum + (1 << (shift - 1))) >> shift) + 128)
}

/// R, G, B of one YUV sample triple.
#[inline(always)]
pub fn yuv_to_rgb(y: u8, u: u8, v: u8, range: ColorRange) -> [u8; 3] {
    let (d, e) = (u as i32 - 128, v as i32 - 128);
    match range {
        ColorRange::Limited => {
            let c = 298 * (y as i32 - 16) + 128;
            [
                clamp8((c + 409 * e) >> 8),
                clamp8((c - 100 * d - 208 * e) >> 8),
                clamp8((c + 516 * d) >> 8),
            ]
        }
        ColorRange::Full => {
            let y = y as i32;
            [
                clamp8(y + ((359 * e + 128) >> 8)),
                clamp8(y - ((88 * d + 183 * e + 128) >> 8)),
                clamp8(y + ((454 * d + 128) >> 8)),
            ]
        }
    }
}

/// Packed YUYV (Y0 U Y1 V) → RGB24. Odd widths: the last pair's second pixel is dropped.
pub fn yuyv_to_rgb(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    // One instantiation per range, so the range test leaves the per-pixel code.
    match range {
        ColorRange::Limited => yuyv_to_rgb_in(src, width, height, ColorRange::Limited, dst),
        ColorRange::Full => yuyv_to_rgb_in(src, width, height, ColorRange::Full, dst),
    }
}

#[inline(always)]
fn yuyv_to_rgb_in(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let src_stride = raw_layout(PixelFormat::Yuyv, width, height).plane(0).stride;
    for row in 0..height {
        let s = &src[row * src_stride..(row + 1) * src_stride];
        let d = &mut dst[row * width * 3..(row + 1) * width * 3];
        // Whole pairs: iterator zips let the compiler drop bounds checks in the hot loop.
        for (quad, out) in s.chunks_exact(4).zip(d.chunks_exact_mut(6)) {
            let p0 = yuv_to_rgb(quad[0], quad[1], quad[3], range);
            let p1 = yuv_to_rgb(quad[2], quad[1], quad[3], range);
            out[0] = p0[0];
            out[1] = p0[1];
            out[2] = p0[2];
            out[3] = p1[0];
            out[4] = p1[1];
            out[5] = p1[2];
        }
        if width % 2 == 1 {
            let quad = &s[(width / 2) * 4..];
            d[(width - 1) * 3..].copy_from_slice(&yuv_to_rgb(quad[0], quad[1], quad[3], range));
        }
    }
}

/// Integer BT.601 forward coefficients for one range, hoisted out of the pixel loops.
#[derive(Clone, Copy)]
struct Forward {
    y: [i32; 3],
    y_off: i32,
    u: [i32; 3],
    v: [i32; 3],
}

impl Forward {
    fn new(range: ColorRange) -> Self {
        match range {
            ColorRange::Limited => Forward {
                y: [66, 129, 25],
                y_off: 16,
                u: [-38, -74, 112],
                v: [112, -94, -18],
            },
            ColorRange::Full => Forward {
                y: [77, 150, 29],
                y_off: 0,
                u: [-43, -85, 128],
                v: [128, -107, -21],
            },
        }
    }

    #[inline(always)]
    fn luma(&self, r: i32, g: i32, b: i32) -> u8 {
        (((self.y[0] * r + self.y[1] * g + self.y[2] * b + 128) >> 8) + self.y_off) as u8
    }

    #[inline(always)]
    fn uv_raw(&self, r: i32, g: i32, b: i32) -> (i32, i32) {
        (
            self.u[0] * r + self.u[1] * g + self.u[2] * b,
            self.v[0] * r + self.v[1] * g + self.v[2] * b,
        )
    }
}

/// RGB24 → packed YUYV; chroma of each pixel pair is the average of the two pixels' chroma.
pub fn rgb_to_yuyv(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let dst_stride = raw_layout(PixelFormat::Yuyv, width, height).plane(0).stride;
    let k = Forward::new(range);
    let pair = |p0: &[u8], p1: &[u8], quad: &mut [u8]| {
        let (r0, g0, b0) = (p0[0] as i32, p0[1] as i32, p0[2] as i32);
        let (r1, g1, b1) = (p1[0] as i32, p1[1] as i32, p1[2] as i32);
        let (u0, v0) = k.uv_raw(r0, g0, b0);
        let (u1, v1) = k.uv_raw(r1, g1, b1);
        quad[0] = k.luma(r0, g0, b0);
        quad[1] = chroma_avg(u0 + u1, 2);
        quad[2] = k.luma(r1, g1, b1);
        quad[3] = chroma_avg(v0 + v1, 2);
    };
    for row in 0..height {
        let s = &src[row * width * 3..(row + 1) * width * 3];
        let d = &mut dst[row * dst_stride..(row + 1) * dst_stride];
        for (px, quad) in s.chunks_exact(6).zip(d.chunks_exact_mut(4)) {
            pair(&px[..3], &px[3..], quad);
        }
        if width % 2 == 1 {
            let last = &s[(width - 1) * 3..];
            pair(last, last, &mut d[(width / 2) * 4..]);
        }
    }
}

/// Planar 4:2:0 (separate U and V planes, or interleaved UV for NV12) → RGB24.
/// `uv` addresses the chroma of chroma-sample (cx, cy) as (u_index, v_index).
fn yuv420_to_rgb(
    src: &[u8],
    width: usize,
    height: usize,
    range: ColorRange,
    dst: &mut [u8],
    uv: impl Fn(usize, usize) -> (usize, usize) + Copy,
) {
    match range {
        ColorRange::Limited => yuv420_rows(src, width, height, ColorRange::Limited, dst, uv),
        ColorRange::Full => yuv420_rows(src, width, height, ColorRange::Full, dst, uv),
    }
}

#[inline(always)]
fn yuv420_rows(
    src: &[u8],
    width: usize,
    height: usize,
    range: ColorRange,
    dst: &mut [u8],
    uv: impl Fn(usize, usize) -> (usize, usize),
) {
    for row in 0..height {
        let yrow = &src[row * width..(row + 1) * width];
        let d = &mut dst[row * width * 3..(row + 1) * width * 3];
        for x in 0..width {
            let (ui, vi) = uv(x / 2, row / 2);
            d[x * 3..x * 3 + 3].copy_from_slice(&yuv_to_rgb(yrow[x], src[ui], src[vi], range));
        }
    }
}

/// I420 (Y plane, U plane, V plane; chroma at half size rounded up) → RGB24.
pub fn i420_to_rgb(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let l = raw_layout(PixelFormat::I420, width, height);
    let (u0, v0, cw) = (l.plane(1).offset, l.plane(2).offset, l.plane(1).stride);
    yuv420_to_rgb(src, width, height, range, dst, |cx, cy| {
        (u0 + cy * cw + cx, v0 + cy * cw + cx)
    });
}

/// NV12 (Y plane, then interleaved U V at half size) → RGB24.
pub fn nv12_to_rgb(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let uv = raw_layout(PixelFormat::Nv12, width, height).plane(1);
    let (uv0, uv_stride) = (uv.offset, uv.stride);
    yuv420_to_rgb(src, width, height, range, dst, |cx, cy| {
        let i = uv0 + cy * uv_stride + cx * 2;
        (i, i + 1)
    });
}

/// Sums the raw chroma of the (up to) 2×2 block at chroma sample (cx, cy); returns (u, v, count).
#[inline(always)]
fn block_chroma(
    src: &[u8],
    width: usize,
    height: usize,
    cx: usize,
    cy: usize,
    range: ColorRange,
) -> (u8, u8) {
    let (mut su, mut sv, mut n) = (0, 0, 0);
    for y in cy * 2..(cy * 2 + 2).min(height) {
        for x in cx * 2..(cx * 2 + 2).min(width) {
            let p = &src[(y * width + x) * 3..(y * width + x) * 3 + 3];
            let (u, v) = rgb_to_uv_raw(p[0] as i32, p[1] as i32, p[2] as i32, range);
            su += u;
            sv += v;
            n += 1;
        }
    }
    (chroma_avg(su, n), chroma_avg(sv, n))
}

fn rgb_to_luma_plane(src: &[u8], range: ColorRange, dst: &mut [u8]) {
    for (d, p) in dst.iter_mut().zip(src.chunks_exact(3)) {
        *d = luma(p[0] as i32, p[1] as i32, p[2] as i32, range);
    }
}

/// RGB24 → I420; chroma is the average of each 2×2 block.
pub fn rgb_to_i420(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let l = raw_layout(PixelFormat::I420, width, height);
    let (ysz, cw, ch) = (l.plane(1).offset, l.plane(1).stride, l.plane(1).rows);
    let (yp, rest) = dst.split_at_mut(ysz);
    let (up, vp) = rest.split_at_mut(l.plane(2).offset - ysz);
    rgb_to_luma_plane(&src[..ysz * 3], range, yp);
    for cy in 0..ch {
        for cx in 0..cw {
            let (u, v) = block_chroma(src, width, height, cx, cy, range);
            up[cy * cw + cx] = u;
            vp[cy * cw + cx] = v;
        }
    }
}

/// RGB24 → NV12; chroma is the average of each 2×2 block.
pub fn rgb_to_nv12(src: &[u8], width: usize, height: usize, range: ColorRange, dst: &mut [u8]) {
    let uv = raw_layout(PixelFormat::Nv12, width, height).plane(1);
    let (ysz, cw, ch) = (uv.offset, uv.row_bytes / 2, uv.rows);
    let (yp, uvp) = dst.split_at_mut(ysz);
    rgb_to_luma_plane(&src[..ysz * 3], range, yp);
    for cy in 0..ch {
        for cx in 0..cw {
            let (u, v) = block_chroma(src, width, height, cx, cy, range);
            uvp[(cy * cw + cx) * 2] = u;
            uvp[(cy * cw + cx) * 2 + 1] = v;
        }
    }
}

/// Packed BGRX (X11's 32-bit layout) → RGB24.
pub fn bgrx_to_rgb(src: &[u8], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(4)) {
        d[0] = s[2];
        d[1] = s[1];
        d[2] = s[0];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColorRange::{Full, Limited};

    // Reference values computed by hand from the BT.601 integer formulas in the module doc.
    #[test]
    fn limited_range_primaries() {
        assert_eq!(rgb_to_yuv(255, 255, 255, Limited), (235, 128, 128));
        assert_eq!(rgb_to_yuv(0, 0, 0, Limited), (16, 128, 128));
        // Red: Y = (66·255+128)>>8 + 16 = 82; U = floor((−38·255+128)/256) + 128 = 90; V = 240.
        assert_eq!(rgb_to_yuv(255, 0, 0, Limited), (82, 90, 240));
        // Green: (129·255+128)>>8 = 128 → Y = 144 (the float formula gives 144.5).
        assert_eq!(rgb_to_yuv(0, 255, 0, Limited), (144, 54, 34));
        assert_eq!(rgb_to_yuv(0, 0, 255, Limited), (41, 240, 110));
        assert_eq!(yuv_to_rgb(235, 128, 128, Limited), [255, 255, 255]);
        assert_eq!(yuv_to_rgb(16, 128, 128, Limited), [0, 0, 0]);
        // (82, 90, 240): R = (298·66 + 409·112 + 128)>>8 = 256 → 255,
        // G = (19796 + 100·38 − 208·112)>>8 = 300>>8 = 1, B = (19796 − 516·38)>>8 = 0.
        assert_eq!(yuv_to_rgb(82, 90, 240, Limited), [255, 1, 0]);
        // Below-black and above-white codes clamp.
        assert_eq!(yuv_to_rgb(0, 128, 128, Limited), [0, 0, 0]);
        assert_eq!(yuv_to_rgb(255, 128, 128, Limited), [255, 255, 255]);
    }

    #[test]
    fn full_range_primaries() {
        assert_eq!(rgb_to_yuv(255, 255, 255, Full), (255, 128, 128));
        assert_eq!(rgb_to_yuv(255, 0, 0, Full), (77, 85, 255));
        assert_eq!(yuv_to_rgb(255, 128, 128, Full), [255, 255, 255]);
        // G = 77 − ((88·(−43) + 183·127 + 128)>>8) = 77 − 76 = 1; B = 77 + floor(−19394/256) = 1.
        assert_eq!(yuv_to_rgb(77, 85, 255, Full), [255, 1, 1]);
    }

    #[test]
    fn every_grey_round_trips_exactly_in_limited_range() {
        for g in 0..=255u8 {
            let (y, u, v) = rgb_to_yuv(g, g, g, Limited);
            assert_eq!((u, v), (128, 128));
            let back = yuv_to_rgb(y, u, v, Limited);
            // 220 luma codes for 256 greys: at most one step off.
            for c in back {
                assert!(
                    (c as i32 - g as i32).abs() <= 1,
                    "grey {g} → {y} → {back:?}"
                );
            }
        }
    }

    #[test]
    fn colour_round_trip_error_is_small() {
        let mut worst = 0;
        for r in (0..=255).step_by(15) {
            for g in (0..=255).step_by(15) {
                for b in (0..=255).step_by(15) {
                    for range in [Limited, Full] {
                        let (y, u, v) = rgb_to_yuv(r, g, b, range);
                        let back = yuv_to_rgb(y, u, v, range);
                        for (a, c) in [r, g, b].iter().zip(back) {
                            worst = worst.max((*a as i32 - c as i32).abs());
                        }
                    }
                }
            }
        }
        assert!(worst <= 3, "worst round-trip error {worst}");
    }

    #[test]
    fn yuyv_pair_layout_and_chroma_average() {
        // Red then blue: Y0 = 82, Y1 = 41; U = avg(90, 240) = 165, V = avg(240, 110) = 175.
        let rgb = [255, 0, 0, 0, 0, 255];
        let mut yuyv = [0u8; 4];
        rgb_to_yuyv(&rgb, 2, 1, Limited, &mut yuyv);
        assert_eq!(yuyv, [82, 165, 41, 175]);
        let mut back = [0u8; 6];
        yuyv_to_rgb(&[235, 128, 16, 128], 2, 1, Limited, &mut back);
        assert_eq!(back, [255, 255, 255, 0, 0, 0]);
    }

    #[test]
    fn i420_and_nv12_planes() {
        // 2×2 white block, 2×2 black block side by side (4×2 image).
        let mut rgb = vec![0u8; 4 * 2 * 3];
        for y in 0..2 {
            for x in 0..2 {
                rgb[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let mut i420 = vec![0u8; 8 + 2 + 2];
        rgb_to_i420(&rgb, 4, 2, Limited, &mut i420);
        assert_eq!(
            i420,
            [235, 235, 16, 16, 235, 235, 16, 16, 128, 128, 128, 128]
        );
        let mut nv12 = vec![0u8; 12];
        rgb_to_nv12(&rgb, 4, 2, Limited, &mut nv12);
        assert_eq!(&nv12[..8], &i420[..8]);
        let mut back = vec![0u8; 24];
        i420_to_rgb(&i420, 4, 2, Limited, &mut back);
        assert_eq!(back, rgb);
        nv12_to_rgb(&nv12, 4, 2, Limited, &mut back);
        assert_eq!(back, rgb);
    }

    #[test]
    fn nv12_chroma_is_interleaved() {
        // A 2×2 blue image: one chroma sample (240, 110).
        let rgb = [0, 0, 255].repeat(4);
        let mut nv12 = [0u8; 6];
        rgb_to_nv12(&rgb, 2, 2, Limited, &mut nv12);
        assert_eq!(nv12, [41, 41, 41, 41, 240, 110]);
        let mut i420 = [0u8; 6];
        rgb_to_i420(&rgb, 2, 2, Limited, &mut i420);
        assert_eq!(i420, [41, 41, 41, 41, 240, 110]);
    }

    #[test]
    fn odd_sizes_do_not_panic() {
        let rgb = vec![200u8; 3 * 3 * 3];
        let mut i420 = vec![0u8; 9 + 4 + 4];
        rgb_to_i420(&rgb, 3, 3, Limited, &mut i420);
        let mut back = vec![0u8; 27];
        i420_to_rgb(&i420, 3, 3, Limited, &mut back);
        assert!(back.iter().all(|&c| (c as i32 - 200).abs() <= 1));
        let mut yuyv = vec![0u8; 2 * 4 * 3];
        rgb_to_yuyv(&rgb, 3, 3, Limited, &mut yuyv);
        yuyv_to_rgb(&yuyv, 3, 3, Limited, &mut back);
        assert!(back.iter().all(|&c| (c as i32 - 200).abs() <= 1));
    }

    #[test]
    fn bgrx_swaps_channels() {
        let mut rgb = [0u8; 6];
        bgrx_to_rgb(&[1, 2, 3, 0, 4, 5, 6, 255], &mut rgb);
        assert_eq!(rgb, [3, 2, 1, 6, 5, 4]);
    }
}
