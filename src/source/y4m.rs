//! YUV4MPEG2 (Y4M) input: raw video from a file or from stdin (`-`), e.g.
//! `ffmpeg -i clip.mp4 -f yuv4mpegpipe - | sdcam --source -`.
//!
//! Supports 4:2:0 (C420, C420jpeg, C420mpeg2, C420paldv), 4:4:4 (C444) and greyscale (Cmono),
//! in 8 bits or 9–16 bits a sample (`C420p10`, `C444p12`, `Cmono16`, …: reduced to 8 bits);
//! `XCOLORRANGE=FULL` selects full-range samples (limited range otherwise). The header is
//! untrusted: sizes above [`crate::frame::MAX_PIXELS`] are refused before anything is allocated.
//! The header itself is parsed by [`crate::y4m`], shared with the Y4M sink.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use anyhow::{bail, Context};

use super::pacer::Pacer;
use super::{Captured, Source};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};
use crate::y4m::{Y4mChroma, Y4mHeader};
use crate::Result;

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
        let reader = open_reader(&input)?;
        Self::from_reader(input, reader, looping)
    }

    /// Reads the header from `reader`, which delivers the bytes of `input` (also used by
    /// [`crate::fuzzing::y4m`] on in-memory bytes).
    pub(crate) fn from_reader(
        input: Y4mInput,
        mut reader: Box<dyn BufRead + Send>,
        looping: bool,
    ) -> Result<Self> {
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
    fn next_frame(&mut self) -> StageResult<Captured> {
        let marker = match read_line(&mut *self.reader)? {
            Some(m) => m,
            None if self.rewind()? => {
                read_line(&mut *self.reader)?.context("looped Y4M file has no frames")?
            }
            None => return Ok(Captured::End),
        };
        if !marker.starts_with("FRAME") {
            return Err(anyhow::anyhow!(
                "Y4M stream is corrupt: expected FRAME, found {:?}",
                marker.chars().take(16).collect::<String>()
            )
            .into());
        }
        // Grown as the bytes arrive (not allocated whole from the header's size first), so a
        // short stream with a huge header costs only what it holds.
        let len = self.header.frame_len();
        let mut data = Vec::with_capacity(len.min(1 << 20));
        (&mut *self.reader)
            .take(len as u64)
            .read_to_end(&mut data)
            .context("reading a Y4M frame")?;
        if data.len() < len {
            return Err(anyhow::anyhow!(
                "Y4M stream ended in the middle of a frame ({} of {len} bytes)",
                data.len()
            )
            .into());
        }
        if self.header.bit_depth > 8 {
            // Little-endian samples of `bit_depth` bits → their top 8 bits.
            let shift = self.header.bit_depth - 8;
            data = data
                .chunks_exact(2)
                .map(|s| (u16::from_le_bytes([s[0], s[1]]) >> shift).min(255) as u8)
                .collect();
        }
        if self.realtime {
            // The frame is read: a wake (stop, source change) cuts the wait short and the
            // frame goes out early rather than being lost.
            let _ = self.pacer.wait();
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

    fn info(&self) -> StageInfo {
        StageInfo {
            live: false,
            exclusive_device: false,
            reconnect_on_loss: false,
            buffers_frames: false,
        }
    }

    fn set_realtime(&mut self, realtime: bool) {
        self.realtime = realtime;
    }

    fn set_wake(&mut self, wake: super::Wake) {
        self.pacer.set_wake(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::fps_fraction;

    #[test]
    fn high_bit_depth_streams_are_read_as_8_bit() {
        // A 10-bit 4:2:0 frame: Y 940 (white, limited range) → 235; chroma 512 → 128.
        let mut bytes = b"YUV4MPEG2 W2 H2 F25:1 C420p10\nFRAME\n".to_vec();
        for v in [940u16, 940, 64, 64, 512, 512] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let mut src = Y4mSource::from_reader(
            Y4mInput::Stdin,
            Box::new(std::io::Cursor::new(bytes)),
            false,
        )
        .unwrap();
        let Captured::Frame(f) = src.next_frame().unwrap() else {
            panic!("no frame")
        };
        assert_eq!(
            (f.format, f.data.as_slice()),
            (PixelFormat::I420, &[235, 235, 16, 16, 128, 128][..])
        );
        assert!(matches!(src.next_frame().unwrap(), Captured::End));
    }

    /// Seeded mutation fuzzing of the header and frame reader (bounded: 4000 inputs, well under a
    /// second): no input may panic, and a stream that opens yields frames or an error or the end,
    /// never more bytes than it has.
    #[test]
    fn mutated_streams_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut base = b"YUV4MPEG2 W4 H2 F30000:1001 Ip A1:1 C420jpeg XCOLORRANGE=FULL\n".to_vec();
        for i in 0..3u8 {
            base.extend_from_slice(b"FRAME\n");
            base.extend(std::iter::repeat_n(i * 40, 12));
        }
        let tokens: [&[u8]; 10] = [
            b"W",
            b"H99999999",
            b" C420p10",
            b" C444",
            b"\xff",
            b"\r",
            b"FRAME",
            b"\n",
            b" F1:0",
            b" Cmono16",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5dca);
        for _ in 0..4000 {
            let mut b = base.clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..=b.len());
                match rng.random_range(0..4) {
                    0 => b.insert(at, rng.random()),
                    1 if at < b.len() => {
                        b.remove(at);
                    }
                    2 => {
                        let t = tokens[rng.random_range(0..tokens.len())];
                        b.splice(at..at, t.iter().copied());
                    }
                    _ => b.truncate(at),
                }
            }
            let total = b.len();
            let reader = Box::new(std::io::Cursor::new(b));
            let Ok(mut src) = Y4mSource::from_reader(Y4mInput::Stdin, reader, false) else {
                continue;
            };
            let mut bytes = 0;
            for _ in 0..10 {
                match src.next_frame() {
                    Ok(Captured::Frame(f)) => bytes += f.data.len().min(src.header.frame_len()),
                    Ok(_) | Err(_) => break,
                }
            }
            assert!(
                bytes <= total,
                "{bytes} frame bytes from a {total}-byte stream"
            );
        }
    }

    #[test]
    fn fps_fractions() {
        assert_eq!(fps_fraction(30.0), (30, 1));
        assert_eq!(fps_fraction(30000.0 / 1001.0), (30000, 1001));
        assert_eq!(fps_fraction(12.5), (12500, 1000));
        let line = Y4mHeader::i420(64, 48, fps_fraction(25.0), ColorRange::Limited).line();
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

    /// A tiny stream whose header claims the largest frame sdcam accepts ends with a clear
    /// error about the missing bytes (and the frame buffer grows only as bytes arrive).
    #[test]
    fn a_huge_header_over_a_few_bytes_is_a_short_frame() {
        let mut bytes = b"YUV4MPEG2 W8192 H8192 F30:1 C444p16\nFRAME\n".to_vec();
        bytes.extend_from_slice(&[7u8; 100]);
        let mut src = Y4mSource::from_reader(
            Y4mInput::Stdin,
            Box::new(std::io::Cursor::new(bytes)),
            false,
        )
        .unwrap();
        let e = format!("{:#}", src.next_frame().unwrap_err());
        assert!(
            e.contains("middle of a frame (100 of 402653184 bytes)"),
            "{e}"
        );
    }
}
