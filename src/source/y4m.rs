//! YUV4MPEG2 (Y4M) input: raw video from a file or from stdin (`-`), e.g.
//! `ffmpeg -i clip.mp4 -f yuv4mpegpipe - | sdcam --source -`.
//!
//! Supports 4:2:0 (C420, C420jpeg, C420mpeg2, C420paldv), 4:4:4 (C444) and greyscale (Cmono);
//! `XCOLORRANGE=FULL` selects full-range samples (limited range otherwise). [`Y4mHeader`] is shared
//! with the Y4M sink.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use anyhow::{bail, Context};

use super::pattern::Pacer;
use super::{Captured, Source};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::Result;

/// Chroma layout of a Y4M stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Y4mChroma {
    C420,
    C444,
    Mono,
}

/// A parsed `YUV4MPEG2` stream header.
#[derive(Debug, Clone, PartialEq)]
pub struct Y4mHeader {
    pub width: u32,
    pub height: u32,
    /// Frame rate as a fraction (numerator, denominator).
    pub rate: (u32, u32),
    pub chroma: Y4mChroma,
    pub range: ColorRange,
}

impl Y4mHeader {
    /// Parses the header line (without the trailing newline).
    pub fn parse(line: &str) -> Result<Self> {
        let mut parts = line.split(' ');
        if parts.next() != Some("YUV4MPEG2") {
            bail!("not a Y4M stream (missing YUV4MPEG2 signature)");
        }
        let (mut w, mut h, mut rate) = (None, None, (30, 1));
        let (mut chroma, mut range) = (Y4mChroma::C420, ColorRange::Limited);
        for p in parts.filter(|p| !p.is_empty()) {
            let (tag, val) = p.split_at(1);
            match tag {
                "W" => w = Some(val.parse::<u32>().context("bad W (width) in Y4M header")?),
                "H" => h = Some(val.parse::<u32>().context("bad H (height) in Y4M header")?),
                "F" => {
                    let (n, d) = val.split_once(':').context("bad F (rate) in Y4M header")?;
                    rate = (n.parse()?, d.parse()?);
                    if rate.0 == 0 || rate.1 == 0 {
                        bail!("Y4M frame rate {val} is not positive");
                    }
                }
                "I" if val != "p" && val != "?" => {
                    bail!("interlaced Y4M (I{val}) is not supported; deinterlace first (ffmpeg -vf yadif)")
                }
                "C" => {
                    chroma = match val {
                        v if v.starts_with("420") => Y4mChroma::C420,
                        "444" => Y4mChroma::C444,
                        "mono" => Y4mChroma::Mono,
                        other => bail!(
                        "Y4M chroma C{other} is not supported (use -pix_fmt yuv420p with ffmpeg)"
                    ),
                    }
                }
                "X" if val == "COLORRANGE=FULL" => range = ColorRange::Full,
                _ => {}
            }
        }
        let (width, height) = match (w, h) {
            (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
            _ => bail!("Y4M header lacks a valid W/H size"),
        };
        Ok(Y4mHeader {
            width,
            height,
            rate,
            chroma,
            range,
        })
    }

    /// Bytes of one frame's pixel data.
    pub fn frame_len(&self) -> usize {
        let (w, h) = (self.width as usize, self.height as usize);
        match self.chroma {
            Y4mChroma::C420 => w * h + 2 * w.div_ceil(2) * h.div_ceil(2),
            Y4mChroma::C444 => w * h * 3,
            Y4mChroma::Mono => w * h,
        }
    }

    pub fn fps(&self) -> f64 {
        self.rate.0 as f64 / self.rate.1 as f64
    }

    /// The header line for a 4:2:0 stream of the given size and rate.
    pub fn header_line(width: u32, height: u32, fps: f64, range: ColorRange) -> String {
        let (n, d) = fps_fraction(fps);
        let range = match range {
            ColorRange::Limited => "LIMITED",
            ColorRange::Full => "FULL",
        };
        format!("YUV4MPEG2 W{width} H{height} F{n}:{d} Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE={range}\n")
    }
}

/// A fraction for a frame rate: integers exactly, NTSC rates as n·1000/1001, else millis.
pub fn fps_fraction(fps: f64) -> (u32, u32) {
    if (fps - fps.round()).abs() < 1e-6 {
        return (fps.round() as u32, 1);
    }
    let ntsc = fps * 1001.0 / 1000.0;
    if (ntsc - ntsc.round()).abs() < 1e-3 {
        return (ntsc.round() as u32 * 1000, 1001);
    }
    ((fps * 1000.0).round() as u32, 1000)
}

/// Where Y4M bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Y4mInput {
    Stdin,
    File(PathBuf),
}

/// Reads frames from a Y4M stream.
pub struct Y4mSource {
    input: Y4mInput,
    reader: Box<dyn BufRead + Send>,
    header: Y4mHeader,
    looping: bool,
    realtime: bool,
    pacer: Pacer,
    seq: u64,
}

impl std::fmt::Debug for Y4mSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Y4mSource")
            .field("input", &self.input)
            .field("header", &self.header)
            .finish()
    }
}

fn open_reader(input: &Y4mInput) -> Result<Box<dyn BufRead + Send>> {
    Ok(match input {
        Y4mInput::Stdin => Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())),
        Y4mInput::File(p) => Box::new(BufReader::with_capacity(
            1 << 20,
            File::open(p).with_context(|| format!("cannot open Y4M file {}", p.display()))?,
        )),
    })
}

fn read_line(reader: &mut dyn BufRead) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = reader.take(4096).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        bail!("Y4M header or frame marker is truncated or longer than 4 KiB");
    }
    buf.pop();
    Ok(Some(
        String::from_utf8(buf).context("Y4M header is not text")?,
    ))
}

impl Y4mSource {
    /// Opens a Y4M stream and reads its header. `looping` rewinds files at the end (not stdin).
    pub fn open(input: Y4mInput, looping: bool) -> Result<Self> {
        let mut reader = open_reader(&input)?;
        let line = read_line(&mut *reader)?.context("empty Y4M input")?;
        let header = Y4mHeader::parse(&line)?;
        Ok(Y4mSource {
            pacer: Pacer::new(header.fps()),
            input,
            reader,
            header,
            looping,
            realtime: false,
            seq: 0,
        })
    }

    pub fn header(&self) -> &Y4mHeader {
        &self.header
    }

    fn rewind(&mut self) -> Result<bool> {
        if !self.looping || self.input == Y4mInput::Stdin || self.seq == 0 {
            return Ok(false);
        }
        self.reader = open_reader(&self.input)?;
        let line = read_line(&mut *self.reader)?.context("Y4M file became empty")?;
        let header = Y4mHeader::parse(&line)?;
        if header != self.header {
            bail!("Y4M file changed while looping");
        }
        Ok(true)
    }

    fn frame_from_planes(&self, data: Vec<u8>) -> Result<Frame> {
        let h = &self.header;
        let (w, ht) = (h.width as usize, h.height as usize);
        let (format, data) = match h.chroma {
            Y4mChroma::C420 => (PixelFormat::I420, data),
            Y4mChroma::C444 => {
                let mut rgb = vec![0u8; w * ht * 3];
                let n = w * ht;
                for i in 0..n {
                    let p = crate::convert::yuv::yuv_to_rgb(
                        data[i],
                        data[n + i],
                        data[2 * n + i],
                        h.range,
                    );
                    rgb[i * 3..i * 3 + 3].copy_from_slice(&p);
                }
                (PixelFormat::Rgb24, rgb)
            }
            Y4mChroma::Mono => {
                let rgb = data
                    .iter()
                    .flat_map(|&y| crate::convert::yuv::yuv_to_rgb(y, 128, 128, h.range))
                    .collect();
                (PixelFormat::Rgb24, rgb)
            }
        };
        let mut f = Frame::new(h.width, h.height, format, h.range, data)?;
        if format == PixelFormat::Rgb24 {
            f.range = ColorRange::Full;
        }
        f.seq = self.seq;
        Ok(f)
    }
}

impl Source for Y4mSource {
    fn next_frame(&mut self) -> Result<Captured> {
        let marker = match read_line(&mut *self.reader)? {
            Some(m) => m,
            None if self.rewind()? => {
                read_line(&mut *self.reader)?.context("looped Y4M file has no frames")?
            }
            None => return Ok(Captured::End),
        };
        if !marker.starts_with("FRAME") {
            bail!(
                "Y4M stream is corrupt: expected FRAME, found {:?}",
                marker.chars().take(16).collect::<String>()
            );
        }
        let mut data = vec![0u8; self.header.frame_len()];
        self.reader
            .read_exact(&mut data)
            .context("Y4M stream ended in the middle of a frame")?;
        if self.realtime {
            self.pacer.wait();
        }
        let f = self.frame_from_planes(data)?;
        self.seq += 1;
        Ok(Captured::Frame(f))
    }

    fn describe(&self) -> String {
        let from = match &self.input {
            Y4mInput::Stdin => "stdin".to_string(),
            Y4mInput::File(p) => p.display().to_string(),
        };
        format!(
            "Y4M {from} {}x{} @ {:.3} fps{}",
            self.header.width,
            self.header.height,
            self.header.fps(),
            if self.looping { " (looped)" } else { "" }
        )
    }

    fn fps(&self) -> f64 {
        self.header.fps()
    }

    fn is_live(&self) -> bool {
        false
    }

    fn set_realtime(&mut self, realtime: bool) {
        self.realtime = realtime;
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
    fn fps_fractions() {
        assert_eq!(fps_fraction(30.0), (30, 1));
        assert_eq!(fps_fraction(30000.0 / 1001.0), (30000, 1001));
        assert_eq!(fps_fraction(12.5), (12500, 1000));
        let line = Y4mHeader::header_line(64, 48, 25.0, ColorRange::Limited);
        let h = Y4mHeader::parse(line.trim_end()).unwrap();
        assert_eq!((h.width, h.height, h.rate), (64, 48, (25, 1)));
    }

    #[test]
    fn reads_frames_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.y4m");
        let mut bytes = b"YUV4MPEG2 W2 H2 F10:1 C420jpeg\n".to_vec();
        for i in 0..3u8 {
            bytes.extend_from_slice(b"FRAME\n");
            bytes.extend_from_slice(&[i * 10, i * 10, i * 10, i * 10, 128, 128]);
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut src = Y4mSource::open(Y4mInput::File(path.clone()), false).unwrap();
        let mut n = 0;
        while let Captured::Frame(f) = src.next_frame().unwrap() {
            assert_eq!((f.format, f.seq), (PixelFormat::I420, n));
            assert_eq!(f.data[0], n as u8 * 10);
            n += 1;
        }
        assert_eq!(n, 3);
        let mut src = Y4mSource::open(Y4mInput::File(path.clone()), true).unwrap();
        for i in 0..7u64 {
            let Captured::Frame(f) = src.next_frame().unwrap() else {
                panic!("ended")
            };
            assert_eq!(f.data[0], (i % 3) as u8 * 10);
        }
        // Truncated frame is an error, not a silent end.
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let mut src = Y4mSource::open(Y4mInput::File(path), false).unwrap();
        src.next_frame().unwrap();
        src.next_frame().unwrap();
        let e = src.next_frame().unwrap_err().to_string();
        assert!(e.contains("middle of a frame"), "{e}");
    }
}
