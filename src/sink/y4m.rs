//! Y4M output to a file or stdout (`-`): raw 4:2:0 video any ffmpeg/ffplay/mpv can read,
//! e.g. `sdcam --output - | ffplay -`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;

use super::Sink;
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::rate::fps_fraction;
use crate::stage::{StageError, StageInfo, StageResult};
use crate::y4m::Y4mHeader;
use crate::Result;

/// Writes I420 frames as a YUV4MPEG2 stream.
pub struct Y4mSink {
    target: Option<PathBuf>,
    out: Box<dyn Write + Send>,
    size: (u32, u32),
    fps: f64,
    header_written: bool,
    frames: u64,
}

impl std::fmt::Debug for Y4mSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Y4mSink")
            .field("target", &self.target)
            .finish()
    }
}

impl Y4mSink {
    /// Creates (truncates) the file, or writes to stdout when `path` is `-`.
    pub fn create(path: &str, width: u32, height: u32, fps: f64) -> Result<Self> {
        let (target, out): (_, Box<dyn Write + Send>) = if path == "-" {
            (
                None,
                Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout())),
            )
        } else {
            let p = PathBuf::from(path);
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create folder {}", dir.display()))?;
            }
            let f = File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
            (Some(p), Box::new(BufWriter::with_capacity(1 << 20, f)))
        };
        Ok(Y4mSink {
            target,
            out,
            size: (width, height),
            fps,
            header_written: false,
            frames: 0,
        })
    }
}

impl Sink for Y4mSink {
    fn write(&mut self, frame: &Frame) -> StageResult<()> {
        if frame.format != PixelFormat::I420 || (frame.width, frame.height) != self.size {
            return Err(anyhow::anyhow!(
                "y4m sink expects i420 {}x{}, got {} {}x{}",
                self.size.0,
                self.size.1,
                frame.format,
                frame.width,
                frame.height
            )
            .into());
        }
        if !self.header_written {
            let (w, h) = self.size;
            let header = Y4mHeader::i420(w, h, fps_fraction(self.fps), ColorRange::Limited);
            self.out
                .write_all(header.line().as_bytes())
                .map_err(|e| StageError::io(e, "writing the Y4M header"))?;
            self.header_written = true;
        }
        let len = PixelFormat::I420
            .frame_len(frame.width, frame.height)
            .unwrap_or(0);
        self.out
            .write_all(b"FRAME\n")
            .and_then(|()| self.out.write_all(&frame.data[..len]))
            .map_err(|e| StageError::io(e, "writing Y4M frame (is the reader still there?)"))?;
        self.frames += 1;
        Ok(())
    }

    fn wants(&self) -> PixelFormat {
        PixelFormat::I420
    }

    fn describe(&self) -> String {
        let to = self
            .target
            .as_ref()
            .map_or("stdout".to_string(), |p| p.display().to_string());
        format!(
            "Y4M {to} {}x{} @ {} fps",
            self.size.0, self.size.1, self.fps
        )
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: false,
            exclusive_device: false,
            reconnect_on_loss: false,
            buffers_frames: true,
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.out.flush().context("flushing Y4M output")
    }
}

impl Drop for Y4mSink {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}
