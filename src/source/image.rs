//! A still image (PNG or JPEG) shown as a camera: the same picture, repeated at a steady rate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::pattern::Pacer;
use super::{Captured, Source};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::Result;

/// Decodes a PNG file to RGB24 (palette, grey, alpha and 16-bit PNGs are normalised).
pub fn decode_png(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().context("reading PNG header")?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).context("decoding PNG")?;
    let (w, h) = (info.width, info.height);
    let px = &buf[..info.buffer_size()];
    let rgb = match info.color_type {
        png::ColorType::Rgb => px.to_vec(),
        png::ColorType::Rgba => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => px
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => bail!("PNG palette was not expanded"),
    };
    Ok((w, h, rgb))
}

/// Loads a PNG or JPEG file (by content, not by extension) as an RGB24 frame.
pub fn load_image(path: &Path) -> Result<Frame> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let (w, h, px) = if bytes.starts_with(b"\x89PNG") {
        decode_png(&bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        crate::convert::decode_jpeg(&bytes)
    } else {
        bail!("{} is neither PNG nor JPEG", path.display())
    }
    .with_context(|| format!("decoding {}", path.display()))?;
    Frame::new(w, h, PixelFormat::Rgb24, ColorRange::Full, px)
}

/// Repeats one still image at `fps`.
#[derive(Debug)]
pub struct ImageSource {
    path: PathBuf,
    frame: Frame,
    fps: f64,
    pacer: Pacer,
    seq: u64,
    looping: bool,
}

impl ImageSource {
    /// `looping = false` emits the image once and then ends (useful for one-shot conversion).
    pub fn open(path: &Path, fps: f64, looping: bool) -> Result<Self> {
        Ok(ImageSource {
            path: path.to_path_buf(),
            frame: load_image(path)?,
            fps,
            pacer: Pacer::new(fps),
            seq: 0,
            looping,
        })
    }
}

impl Source for ImageSource {
    fn next_frame(&mut self) -> Result<Captured> {
        if !self.looping && self.seq > 0 {
            return Ok(Captured::End);
        }
        self.pacer.wait();
        let mut f = self.frame.clone();
        f.seq = self.seq;
        f.captured_at = std::time::Instant::now();
        self.seq += 1;
        Ok(Captured::Frame(f))
    }

    fn describe(&self) -> String {
        format!(
            "image {} {}x{} @ {} fps",
            self.path.display(),
            self.frame.width,
            self.frame.height,
            self.fps
        )
    }

    fn fps(&self) -> f64 {
        self.fps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_png_and_jpeg() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let png = load_image(&data.join("gradient_8x6.png")).unwrap();
        assert_eq!((png.width, png.height), (8, 6));
        assert_eq!(png.rgb_at(3, 2), [90, 80, 200]);
        let jpg = load_image(&data.join("red_16x8.jpg")).unwrap();
        assert_eq!((jpg.width, jpg.height), (16, 8));
        let e = load_image(&data.join("missing.png")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.png"));
    }

    #[test]
    fn repeats_the_image() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gradient_8x6.png");
        let mut s = ImageSource::open(&p, 1000.0, true).unwrap();
        for i in 0..3 {
            let Captured::Frame(f) = s.next_frame().unwrap() else {
                panic!()
            };
            assert_eq!(f.seq, i);
        }
        let mut once = ImageSource::open(&p, 1000.0, false).unwrap();
        assert!(matches!(once.next_frame().unwrap(), Captured::Frame(_)));
        assert!(matches!(once.next_frame().unwrap(), Captured::End));
    }
}
