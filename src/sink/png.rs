//! PNG output: writes every Nth frame into a folder as `frame_000123.png` (for inspection and
//! regression pictures; also used by the `snapshot` command).

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Sink;
use crate::frame::{Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};
use crate::Result;

/// Writes an RGB24 frame as a PNG file.
pub fn write_png(path: &Path, frame: &Frame) -> Result<()> {
    let rgb = crate::convert::to_rgb(frame)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), rgb.width, rgb.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().context("writing PNG header")?;
    w.write_image_data(&rgb.data[..rgb.width as usize * rgb.height as usize * 3])
        .with_context(|| format!("writing {}", path.display()))?;
    w.finish().context("finishing PNG")?;
    Ok(())
}

/// Writes every `every`-th frame it is given to `dir`.
#[derive(Debug)]
pub struct PngSink {
    dir: PathBuf,
    every: u64,
    n: u64,
    written: u64,
}

impl PngSink {
    pub fn create(dir: &Path, every: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
        Ok(PngSink {
            dir: dir.to_path_buf(),
            every: every.max(1),
            n: 0,
            written: 0,
        })
    }
}

impl Sink for PngSink {
    fn write(&mut self, frame: &Frame) -> StageResult<()> {
        if self.n.is_multiple_of(self.every) {
            write_png(&self.dir.join(format!("frame_{:06}.png", self.n)), frame)?;
            self.written += 1;
        }
        self.n += 1;
        Ok(())
    }

    fn wants(&self) -> PixelFormat {
        PixelFormat::Rgb24
    }

    fn describe(&self) -> String {
        format!(
            "PNG every {} frame(s) into {}",
            self.every,
            self.dir.display()
        )
    }

    /// Each written frame is a finished file: nothing is buffered.
    fn info(&self) -> StageInfo {
        StageInfo {
            live: false,
            exclusive_device: false,
            reconnect_on_loss: false,
            buffers_frames: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_nth_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PngSink::create(dir.path(), 2).unwrap();
        let mut f = Frame::solid_rgb(5, 3, [1, 2, 3]);
        for i in 0..5u8 {
            f.data[0] = i;
            s.write(&f).unwrap();
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["frame_000000.png", "frame_000002.png", "frame_000004.png"]
        );
        let back = crate::source::image::load_image(&dir.path().join("frame_000004.png")).unwrap();
        assert_eq!((back.width, back.height), (5, 3));
        assert_eq!(back.rgb_at(0, 0), [4, 2, 3]);
        assert_eq!(back.rgb_at(4, 2), [1, 2, 3]);
    }
}
