//! A still image (PNG or JPEG) shown as a camera: the same picture, repeated at a steady rate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::pacer::Pacer;
use super::{Captured, Source};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};
use crate::Result;

/// Decodes a PNG or JPEG file (by content, not by extension) to RGB24 with the `image` crate:
/// any colour type (grey, palette, alpha, 16-bit, CMYK), baseline or progressive JPEG, turned
/// upright by its EXIF orientation (phone photos). The size is checked against
/// [`crate::frame::MAX_PIXELS`] from the header, before the pixels are decoded.
pub fn decode_image(bytes: &[u8], what: &str) -> Result<(u32, u32, Vec<u8>)> {
    use image::ImageDecoder;
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("reading {what}"))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        _ => bail!("{what} is neither PNG nor JPEG"),
    }
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("reading the header of {what}"))?;
    let (w, h) = decoder.dimensions();
    crate::frame::check_pixel_limit(w as u64, h as u64, what)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        image::DynamicImage::from_decoder(decoder).with_context(|| format!("decoding {what}"))?;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    Ok((rgb.width(), rgb.height(), rgb.into_raw()))
}

/// The largest image file read (a 64 Mpx PNG of noise is about 200 MB).
const MAX_IMAGE_FILE: u64 = 256 << 20;

/// Loads a PNG or JPEG file as an RGB24 frame ([`decode_image`]).
pub fn load_image(path: &Path) -> Result<Frame> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_IMAGE_FILE {
        bail!(
            "{} is {} MiB: more than the {} MiB an image file may have",
            path.display(),
            meta.len() >> 20,
            MAX_IMAGE_FILE >> 20
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let (w, h, px) = decode_image(&bytes, &path.display().to_string())?;
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
    fn next_frame(&mut self) -> StageResult<Captured> {
        if !self.looping && self.seq > 0 {
            return Ok(Captured::End);
        }
        if !self.pacer.wait() {
            return Ok(Captured::Interrupted);
        }
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

    fn set_wake(&mut self, wake: super::Wake) {
        self.pacer.set_wake(wake);
    }

    /// Live: a still image is shown at its rate like a camera (frames are not queued), and a
    /// failure re-reads it.
    fn info(&self) -> StageInfo {
        StageInfo {
            live: true,
            exclusive_device: false,
            reconnect_on_loss: true,
            buffers_frames: false,
        }
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

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    /// Files as phones and editors write them (scripts/testdata/make_images.py).
    #[test]
    fn greyscale_progressive_and_rotated_jpegs() {
        let grey = load_image(&data("grey_16x8.jpg")).unwrap();
        assert_eq!(
            (grey.width, grey.height, grey.data.len()),
            (16, 8, 16 * 8 * 3)
        );
        let [r, g, b] = grey.rgb_at(2, 4);
        assert!(r == g && g == b, "grey stays grey: {r} {g} {b}");
        let prog = load_image(&data("progressive_16x8.jpg")).unwrap();
        assert_eq!((prog.width, prog.height), (16, 8));
        let [r, _, b] = prog.rgb_at(2, 4);
        assert!(r > 150 && b < 100, "left half red: {r} {b}");
        // EXIF orientation 6: stored 16×8, shown upright as 8×16 with the red half on top.
        let rot = load_image(&data("exif_orientation6_16x8.jpg")).unwrap();
        assert_eq!((rot.width, rot.height), (8, 16));
        let [r, _, b] = rot.rgb_at(4, 2);
        assert!(r > 150 && b < 100, "top is red: {r} {b}");
        let [r, _, b] = rot.rgb_at(4, 13);
        assert!(b > 150 && r < 100, "bottom is blue: {r} {b}");
    }

    /// A PNG or JPEG header claiming a huge picture is refused before decoding: no gigabytes.
    #[test]
    fn huge_headers_are_refused_before_decoding() {
        // PNG: signature + IHDR 20000×20000 RGB8 (CRC right) + a scrap of IDAT.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&20000u32.to_be_bytes());
        ihdr.extend_from_slice(&20000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        png.extend_from_slice(&[0, 0, 0, 2, b'I', b'D', b'A', b'T', 0x78, 0x9c, 0, 0, 0, 0]);
        let e = format!("{:#}", decode_image(&png, "big.png").unwrap_err());
        assert!(e.contains("big.png") && e.contains("limit"), "{e}");
        // JPEG: a real file whose SOF0 says 16384×16384.
        let mut jpg = std::fs::read(data("red_16x8.jpg")).unwrap();
        let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpg[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0x40, 0x00]);
        let e = format!("{:#}", decode_image(&jpg, "big.jpg").unwrap_err());
        assert!(e.contains("limit"), "{e}");
        let e = format!("{:#}", crate::convert::decode_jpeg(&jpg).unwrap_err());
        assert!(e.contains("limit"), "{e}");
        // Not an image at all.
        let e = format!("{:#}", decode_image(b"GIF89a....", "x.gif").unwrap_err());
        assert!(e.contains("neither PNG nor JPEG"), "{e}");
        let e = format!("{:#}", load_image(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }

    /// The CRC-32 of PNG chunks (ISO 3309), for building test files.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn mjpeg_frames_in_grey_decode_to_rgb() {
        let bytes = std::fs::read(data("grey_16x8.jpg")).unwrap();
        let (w, h, px) = crate::convert::decode_jpeg(&bytes).unwrap();
        assert_eq!((w, h, px.len()), (16, 8, 16 * 8 * 3));
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
