//! The transform stage: what turns each pre-processed RGB frame into the output picture.
//!
//! [`diffusion::DiffusionTransform`] (the StreamDiffusion stream core as a transform) implements
//! [`Transform`]; cheap built-ins (`identity`, `tint`, `posterize`) serve tests and model-free runs.
//! The stage takes [`TransformOptions`] (built from a profile by `crate::config`), not the profile.

pub mod diffusion;

use crate::frame::{Frame, PixelFormat};
use serde::{Deserialize, Serialize};

use crate::pipeline::{FilterSettings, LiveParams, StreamParams};
use crate::Result;

/// Which transform the relay runs (`transform` in a profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransformKind {
    Diffusion,
    Identity,
    Tint,
    Posterize,
}

/// What a transform is built from and what [`Transform::apply`] changes live.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformOptions {
    /// Which transform.
    pub kind: TransformKind,
    /// The prompt (diffusion) or the text whose hash picks the colour (tint).
    pub prompt: String,
    /// The negative prompt (R-CFG `full`/`initialize`/`self`).
    pub negative_prompt: String,
    /// The model a diffusion transform loads (ignored by the others).
    pub model: diffusion::ModelOptions,
    /// Settings that shape the stream (a change prepares it again).
    pub stream: StreamParams,
    /// Settings that change without preparing again (`guidance_scale` also sets the tint's
    /// strength).
    pub live: LiveParams,
    /// The similarity filter, `None` when off.
    pub filter: Option<FilterSettings>,
    /// A noise file (`.safetensors`/`.npy`) instead of seeded noise.
    pub noise_file: Option<String>,
    /// Frames over which a prompt change blends in (0 = at once).
    pub prompt_blend_frames: u32,
}

/// A frame transform running on the relay's transform thread.
pub trait Transform: Send {
    /// Short name for logs and stats.
    fn name(&self) -> String;
    /// Turns an RGB24 frame at the stream size into an RGB24 frame (any size; the output stage
    /// resizes). Must not block for long: the output keeps repeating the last frame meanwhile.
    fn process(&mut self, input: &Frame) -> Result<Frame>;
    /// Processes one input into zero or more outputs, appended to `out`: a pipeline that takes
    /// several frames per call returns nothing until it has them, then all of its outputs.
    /// The default returns [`Transform::process`]'s frame.
    fn process_into(&mut self, input: &Frame, out: &mut Vec<Frame>) -> Result<()> {
        out.push(self.process(input)?);
        Ok(())
    }
    /// Every-frame (offline) mode on or off (off, real time, by default). In every-frame mode
    /// each input yields exactly one output, in input order and made from that input; a
    /// transform whose outputs trail its inputs keeps the frames it holds until
    /// [`Transform::flush`]. In real time outputs are returned as soon as they exist.
    fn set_every_frame(&mut self, _on: bool) {}
    /// End of the input: appends the outputs of every frame still held (collected for a
    /// batch, or in flight in the pipeline) to `out`, so nothing taken is lost.
    fn flush(&mut self, _out: &mut Vec<Frame>) -> Result<()> {
        Ok(())
    }
    /// Frames taken whose outputs have not been returned yet.
    fn held(&self) -> u64 {
        0
    }
    /// How many calls so far were answered without running the model (similarity filter).
    fn skipped(&self) -> u64 {
        0
    }
    /// How many frames taken so far will never be output (a failed call's frames, or the
    /// frames in a batch that new settings replaced in real time).
    fn discarded(&self) -> u64 {
        0
    }
    /// The input resumes after a pause (the on-demand camera waking): frames collected for a
    /// call are given up (counted in [`Transform::discarded`]) and a stream with a memory of
    /// past frames starts afresh from the next frame, primed from it (no warm-up garbage).
    ///
    /// # Errors
    /// The restart fails; the transform then keeps its state.
    fn restart(&mut self) -> Result<()> {
        Ok(())
    }
    /// Applies changed live settings (prompt, stream settings).
    ///
    /// # Errors
    /// The new settings do not fit; the transform then keeps running with its previous settings.
    fn apply(&mut self, options: &TransformOptions) -> Result<()>;
}

/// Builds the transform the options ask for (loading the model for `diffusion`).
///
/// # Errors
/// The model does not load or the stream does not prepare ([`diffusion::load_model`]).
pub fn build(options: &TransformOptions) -> Result<Box<dyn Transform>> {
    let mut t: Box<dyn Transform> = match options.kind {
        TransformKind::Identity => Box::new(Identity),
        TransformKind::Tint => Box::new(Tint::default()),
        TransformKind::Posterize => Box::new(Posterize),
        TransformKind::Diffusion => Box::new(diffusion::DiffusionTransform::load(options)?),
    };
    t.apply(options)?;
    Ok(t)
}

/// Passes frames through unchanged.
#[derive(Debug, Default)]
pub struct Identity;

impl Transform for Identity {
    fn name(&self) -> String {
        "identity".into()
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        Ok(input.clone())
    }
    fn apply(&mut self, _options: &TransformOptions) -> Result<()> {
        Ok(())
    }
}

/// A colour wash whose hue is derived from the prompt, so a prompt change is visible at once.
/// `stream.guidance_scale` sets the strength (1.2 → 40 %, clamped to 0–100 %).
#[derive(Debug, Default)]
pub struct Tint {
    rgb: [u8; 3],
    strength: u32,
    prompt: String,
}

/// A saturated colour for a text (FNV-1a hash → hue).
pub fn prompt_colour(text: &str) -> [u8; 3] {
    let mut h: u32 = 0x811c9dc5;
    for b in text.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x01000193);
    }
    let hue = (h % 360) as f32 / 60.0;
    let x = (1.0 - (hue % 2.0 - 1.0).abs()) * 255.0;
    let (r, g, b) = match hue as u32 {
        0 => (255.0, x, 0.0),
        1 => (x, 255.0, 0.0),
        2 => (0.0, 255.0, x),
        3 => (0.0, x, 255.0),
        4 => (x, 0.0, 255.0),
        _ => (255.0, 0.0, x),
    };
    [r as u8, g as u8, b as u8]
}

impl Transform for Tint {
    fn name(&self) -> String {
        format!(
            "tint {:?} ({}%) for {:?}",
            self.rgb,
            self.strength * 100 / 256,
            self.prompt
        )
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        anyhow::ensure!(input.format == PixelFormat::Rgb24, "tint expects rgb24");
        let (a, k) = (256 - self.strength, self.strength);
        let mut out = input.data.clone();
        for px in out.chunks_exact_mut(3) {
            for (v, t) in px.iter_mut().zip(self.rgb) {
                *v = ((*v as u32 * a + t as u32 * k) >> 8) as u8;
            }
        }
        Ok(input.with_data(input.width, input.height, PixelFormat::Rgb24, out))
    }
    fn apply(&mut self, options: &TransformOptions) -> Result<()> {
        self.rgb = prompt_colour(&options.prompt);
        self.strength = ((options.live.guidance_scale / 3.0).clamp(0.0, 1.0) * 256.0) as u32;
        self.prompt = options.prompt.clone();
        Ok(())
    }
}

/// Reduces each channel to four levels (a cheap poster look).
#[derive(Debug, Default)]
pub struct Posterize;

impl Transform for Posterize {
    fn name(&self) -> String {
        "posterize".into()
    }
    fn process(&mut self, input: &Frame) -> Result<Frame> {
        let out = input.data.iter().map(|&v| (v & 0xC0) | 0x20).collect();
        Ok(input.with_data(input.width, input.height, input.format, out))
    }
    fn apply(&mut self, _options: &TransformOptions) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::transform_options as opts;
    use crate::profile::Profile;

    #[test]
    fn tint_follows_prompt_and_strength() {
        let mut p = Profile {
            prompt: "a red fox".into(),
            ..Default::default()
        };
        let mut t = build(&opts(&p)).unwrap();
        let grey = Frame::solid_rgb(4, 4, [128, 128, 128]);
        let a = t.process(&grey).unwrap();
        p.prompt = "a blue whale".into();
        t.apply(&opts(&p)).unwrap();
        let b = t.process(&grey).unwrap();
        assert_ne!(a.data, b.data, "a prompt change must change the picture");
        p.stream.guidance_scale = 0.0;
        t.apply(&opts(&p)).unwrap();
        assert_eq!(t.process(&grey).unwrap().data, grey.data);
        assert_ne!(prompt_colour("x"), prompt_colour("y"));
    }

    #[test]
    fn identity_and_posterize() {
        let mut p = Profile {
            transform: TransformKind::Identity,
            ..Default::default()
        };
        let f = Frame::solid_rgb(2, 2, [1, 100, 250]);
        assert_eq!(build(&opts(&p)).unwrap().process(&f).unwrap().data, f.data);
        p.transform = TransformKind::Posterize;
        assert_eq!(
            build(&opts(&p)).unwrap().process(&f).unwrap().rgb_at(0, 0),
            [0x20, 0x60, 0xE0]
        );
    }

    #[test]
    fn diffusion_with_a_missing_model_says_which() {
        let mut p = Profile {
            transform: TransformKind::Diffusion,
            ..Default::default()
        };
        p.model.id = "/nonexistent/sdcam-model".into();
        let e = format!("{:#}", build(&opts(&p)).err().unwrap());
        assert!(e.contains("/nonexistent/sdcam-model"), "{e}");
    }
}
