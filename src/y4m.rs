//! The YUV4MPEG2 (Y4M) stream header, read by the Y4M source and written by the Y4M sink.
//!
//! A Y4M stream is one text line `YUV4MPEG2 W… H… F…:… I… A…:… C… X…` followed by frames,
//! each `FRAME` and the raw planes. This module is the one place that knows the tokens: the
//! size (`W`, `H`), the frame rate as a fraction (`F`), interlacing (`I`, progressive only),
//! the chroma layout and bit depth (`C420jpeg`, `C444`, `Cmono`, `C420p10`, …) and the sample
//! range (`XCOLORRANGE=FULL`); the pixel aspect (`A`) and other `X` tokens are ignored. The
//! header is untrusted input: every error names the field, quotes at most 32 characters of
//! its value, and sizes above [`crate::frame::MAX_PIXELS`] are refused before anything is
//! allocated. Hand-written because the format is one line of tokens and no maintained crate
//! covers the high-bit-depth tags and the error texts sdcam's users see.

use anyhow::{bail, Context};

use crate::frame::{ColorRange, PixelFormat};
use crate::Result;

/// Chroma layout of a Y4M stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Y4mChroma {
    /// 4:2:0: planar Y, U, V with chroma at half size rounded up (sdcam's I420).
    C420,
    /// 4:4:4: three full-size planes.
    C444,
    /// Greyscale: the Y plane only.
    Mono,
}

/// A parsed `YUV4MPEG2` stream header.
#[derive(Debug, Clone, PartialEq)]
pub struct Y4mHeader {
    /// Picture width in pixels.
    pub width: u32,
    /// Picture height in pixels.
    pub height: u32,
    /// Frame rate as a fraction (numerator, denominator).
    pub rate: (u32, u32),
    pub chroma: Y4mChroma,
    /// Bits per sample: 8, or 9–16 for the high-bit-depth tags (`C420p10`, `Cmono16`, …; two
    /// little-endian bytes a sample, reduced to 8 bits on reading).
    pub bit_depth: u8,
    /// Sample range: `XCOLORRANGE=FULL` is full range, anything else limited.
    pub range: ColorRange,
}

/// A numeric header field: `what` names it in errors (e.g. `W (width)`).
fn header_number(what: &str, val: &str) -> Result<u32> {
    val.parse::<u32>().map_err(|_| {
        anyhow::anyhow!(
            "Y4M header field {what} = {:?} is not a whole number",
            clip(val)
        )
    })
}

/// At most 32 characters of untrusted text, for messages.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(32).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// `C…` tag value → chroma layout and bit depth (`420jpeg`, `444`, `mono`, `420p10`, `mono16`).
fn parse_chroma(val: &str) -> Result<(Y4mChroma, u8)> {
    let (chroma, rest) = if let Some(r) = val.strip_prefix("420") {
        (Y4mChroma::C420, r)
    } else if let Some(r) = val.strip_prefix("444") {
        if r.starts_with("alpha") {
            bail!("Y4M chroma C{val} (with alpha) is not supported (use -pix_fmt yuv420p with ffmpeg)");
        }
        (Y4mChroma::C444, r)
    } else if let Some(r) = val.strip_prefix("mono") {
        (Y4mChroma::Mono, r)
    } else {
        bail!(
            "Y4M chroma C{} is not supported (use -pix_fmt yuv420p with ffmpeg)",
            clip(val)
        )
    };
    let depth = match rest {
        "" | "jpeg" | "mpeg2" | "paldv" if chroma == Y4mChroma::C420 => 8,
        "" => 8,
        r => {
            let digits = r.strip_prefix('p').unwrap_or(r);
            match digits.parse::<u8>() {
                Ok(d) if (9..=16).contains(&d) => d,
                _ => bail!(
                    "Y4M chroma C{} is not supported (8-bit, or 9 to 16 bits as C420p10, \
                     C444p12, Cmono16; use -pix_fmt yuv420p with ffmpeg)",
                    clip(val)
                ),
            }
        }
    };
    Ok((chroma, depth))
}

impl Y4mHeader {
    /// Parses the header line (without the trailing newline). The picture must be within
    /// [`crate::frame::MAX_PIXELS`].
    ///
    /// # Errors
    /// A line that is not a Y4M header, lacks a size, has a malformed number, a zero frame rate,
    /// an unsupported chroma tag or interlacing, ends in CR, or is over the pixel limit; the
    /// message names the field and quotes (at most 32 characters of) its value.
    pub fn parse(line: &str) -> Result<Self> {
        if line.ends_with('\r') {
            bail!(
                "Y4M header ends in CR LF: the stream was converted as text (a Windows pipe or \
                 a line-ending conversion) and its frames are damaged too; write it again as \
                 raw bytes"
            );
        }
        let mut parts = line.split(' ');
        if parts.next() != Some("YUV4MPEG2") {
            bail!("not a Y4M stream (missing YUV4MPEG2 signature)");
        }
        let (mut w, mut h, mut rate) = (None, None, (30, 1));
        let (mut chroma, mut bit_depth, mut range) = (Y4mChroma::C420, 8, ColorRange::Limited);
        for p in parts.filter(|p| !p.is_empty()) {
            let mut chars = p.chars();
            let tag = chars.next().unwrap_or(' ');
            let val = chars.as_str();
            match tag {
                'W' => w = Some(header_number("W (width)", val)?),
                'H' => h = Some(header_number("H (height)", val)?),
                'F' => {
                    let (n, d) = val.split_once(':').with_context(|| {
                        format!(
                            "Y4M header field F (frame rate) = {:?} is not N:D",
                            clip(val)
                        )
                    })?;
                    rate = (
                        header_number("F (frame rate numerator)", n)?,
                        header_number("F (frame rate denominator)", d)?,
                    );
                    if rate.0 == 0 || rate.1 == 0 {
                        bail!("Y4M frame rate {val} is not positive");
                    }
                }
                'I' if val != "p" && val != "?" => {
                    bail!(
                        "interlaced Y4M (I{}) is not supported; deinterlace first (ffmpeg -vf yadif)",
                        clip(val)
                    )
                }
                'C' => (chroma, bit_depth) = parse_chroma(val)?,
                'X' if val == "COLORRANGE=FULL" => range = ColorRange::Full,
                _ => {}
            }
        }
        let (width, height) = match (w, h) {
            (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
            _ => bail!("Y4M header lacks a valid W/H size"),
        };
        crate::frame::check_pixel_limit(width as u64, height as u64, "Y4M stream")?;
        Ok(Y4mHeader {
            width,
            height,
            rate,
            chroma,
            bit_depth,
            range,
        })
    }

    /// Samples of one frame (all planes).
    fn samples(&self) -> usize {
        let (w, h) = (self.width as usize, self.height as usize);
        match self.chroma {
            Y4mChroma::C420 => PixelFormat::I420.layout(w, h).map_or(0, |l| l.len()),
            Y4mChroma::C444 => w * h * 3,
            Y4mChroma::Mono => w * h,
        }
    }

    /// Bytes of one frame's pixel data as stored (two bytes a sample above 8 bits). Bounded by
    /// the pixel limit checked in [`Y4mHeader::parse`].
    pub fn frame_len(&self) -> usize {
        self.samples() * if self.bit_depth > 8 { 2 } else { 1 }
    }

    /// The frame rate in frames per second (`rate.0 / rate.1`).
    pub fn fps(&self) -> f64 {
        self.rate.0 as f64 / self.rate.1 as f64
    }
    /// An 8-bit 4:2:0 header (what the Y4M sink writes) of the given size, frame rate fraction
    /// (numerator, denominator) and sample range.
    pub fn i420(width: u32, height: u32, rate: (u32, u32), range: ColorRange) -> Self {
        Y4mHeader {
            width,
            height,
            rate,
            chroma: Y4mChroma::C420,
            bit_depth: 8,
            range,
        }
    }

    /// The header line, newline included, as ffmpeg writes it: progressive, square pixels,
    /// the chroma tag with ffmpeg's `XYSCSS` companion and an explicit `XCOLORRANGE`. Parsing
    /// it with [`Y4mHeader::parse`] gives the same header back.
    pub fn line(&self) -> String {
        format!("{self}\n")
    }
}

impl std::fmt::Display for Y4mHeader {
    /// The header line without its newline (see [`Y4mHeader::line`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, d) = self.rate;
        let (chroma, yscss) = match self.chroma {
            Y4mChroma::C420 => ("420", "420"),
            Y4mChroma::C444 => ("444", "444"),
            Y4mChroma::Mono => ("mono", "MONO"),
        };
        let (chroma, yscss) = match (self.bit_depth, self.chroma) {
            (8, Y4mChroma::C420) => (format!("{chroma}jpeg"), format!("{yscss}JPEG")),
            (8, _) => (chroma.to_string(), yscss.to_string()),
            (bits, _) => (format!("{chroma}p{bits}"), format!("{yscss}P{bits}")),
        };
        let range = match self.range {
            ColorRange::Limited => "LIMITED",
            ColorRange::Full => "FULL",
        };
        write!(
            f,
            "YUV4MPEG2 W{} H{} F{n}:{d} Ip A1:1 C{chroma} XYSCSS={yscss} XCOLORRANGE={range}",
            self.width, self.height
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ffmpeg_headers() {
        let h =
            Y4mHeader::parse("YUV4MPEG2 W1280 H720 F30000:1001 Ip A1:1 C420jpeg XYSCSS=420JPEG")
                .unwrap();
        assert_eq!((h.width, h.height, h.rate), (1280, 720, (30000, 1001)));
        assert_eq!((h.chroma, h.range), (Y4mChroma::C420, ColorRange::Limited));
        assert_eq!(h.frame_len(), 1280 * 720 * 3 / 2);
        let h = Y4mHeader::parse("YUV4MPEG2 W3 H3 F25:1 C444 XCOLORRANGE=FULL").unwrap();
        assert_eq!(
            (h.chroma, h.range, h.frame_len()),
            (Y4mChroma::C444, ColorRange::Full, 27)
        );
    }

    #[test]
    fn rejects_bad_headers() {
        for (line, msg) in [
            ("RIFF", "not a Y4M"),
            ("YUV4MPEG2 W10", "W/H"),
            ("YUV4MPEG2 W10 H10 C422", "C422"),
            ("YUV4MPEG2 W10 H10 It", "interlaced"),
            ("YUV4MPEG2 W10 H10 F0:1", "not positive"),
        ] {
            let e = Y4mHeader::parse(line).unwrap_err().to_string();
            assert!(e.contains(msg), "{line}: {e}");
        }
    }

    #[test]
    fn hostile_headers_are_refused_by_field_without_panic_or_allocation() {
        for (line, msg) in [
            // A tag starting with a multi-byte character (used to panic slicing the string).
            ("YUV4MPEG2 W10 H10 ÿx", ""),
            ("YUV4MPEG2 W10 H10 é", ""),
            // Sizes that overflowed the frame-size arithmetic or allocated exabytes.
            ("YUV4MPEG2 W4294967295 H4294967295", "limit"),
            ("YUV4MPEG2 W100000 H100000 C444p16", "limit"),
            ("YUV4MPEG2 W65536 H1", "limit"),
            ("YUV4MPEG2 W9000 H9000", "limit"),
            ("YUV4MPEG2 W99999999999 H10", "W (width)"),
            ("YUV4MPEG2 W64 H4x8", "H (height) = \"4x8\""),
            ("YUV4MPEG2 W64 H48 F30", "F (frame rate) = \"30\""),
            ("YUV4MPEG2 W64 H48 F30:x", "denominator"),
            ("YUV4MPEG2 W64 H48 C420p7", "C420p7"),
            ("YUV4MPEG2 W64 H48 C420p99", "C420p99"),
            ("YUV4MPEG2 W64 H48 C444alpha", "alpha"),
            ("YUV4MPEG2 W64 H48 F30:1 C420jpeg\r", "CR LF"),
        ] {
            match Y4mHeader::parse(line) {
                Ok(h) => assert!(msg.is_empty(), "{line}: accepted {h:?}"),
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(!msg.is_empty() && e.contains(msg), "{line}: {e}");
                }
            }
        }
        // The limit itself is accepted (an 8K frame fits easily).
        let h = Y4mHeader::parse("YUV4MPEG2 W7680 H4320 F30:1 C420jpeg").unwrap();
        assert_eq!(h.frame_len(), 7680 * 4320 * 3 / 2);
    }

    #[test]
    fn high_bit_depth_headers() {
        let h = Y4mHeader::parse("YUV4MPEG2 W2 H2 F25:1 C420p10 XYSCSS=420P10").unwrap();
        assert_eq!(
            (h.chroma, h.bit_depth, h.frame_len()),
            (Y4mChroma::C420, 10, 12)
        );
        let h = Y4mHeader::parse("YUV4MPEG2 W2 H2 F25:1 Cmono16").unwrap();
        assert_eq!(
            (h.chroma, h.bit_depth, h.frame_len()),
            (Y4mChroma::Mono, 16, 8)
        );
    }

    #[test]
    fn written_headers_parse_back() {
        // The sink's line, byte for byte as before the header had a module of its own.
        assert_eq!(
            Y4mHeader::i420(64, 48, (30000, 1001), ColorRange::Limited).line(),
            "YUV4MPEG2 W64 H48 F30000:1001 Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED\n"
        );
        for chroma in [Y4mChroma::C420, Y4mChroma::C444, Y4mChroma::Mono] {
            for bit_depth in [8, 10, 16] {
                for range in [ColorRange::Limited, ColorRange::Full] {
                    let h = Y4mHeader {
                        width: 5,
                        height: 3,
                        rate: (25, 2),
                        chroma,
                        bit_depth,
                        range,
                    };
                    let line = h.line();
                    let back = Y4mHeader::parse(line.trim_end_matches('\n')).unwrap();
                    assert_eq!(back, h, "{line}");
                }
            }
        }
    }
}
