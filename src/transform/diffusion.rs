//! The diffusion transform: the StreamDiffusion stream core ([`crate::pipeline`]) as the relay's
//! [`Transform`]. It turns pre-processed RGB24 frames at the stream size into tensors, collects
//! `frame_buffer_size` of them per call, keeps one slot per input so that every-frame mode returns
//! exactly one output per input in order (the Stream Batch lag, warm-up outputs, similarity-filter
//! repeats, a flush at the end), and applies live settings without dropping the old stream when new
//! ones fail.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::{Transform, TransformOptions};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::model::device::{select_device, select_dtype, DeviceName, DtypeName};
use crate::model::hub::HubOptions;
use crate::model::sd::{ModelSpec, StableDiffusion};
use crate::pipeline::{stream, Noise, SimilarityFilter, StreamDiffusion, StreamMode};

/// The model a diffusion transform loads: the diffusers-layout repo or folder, the tiny
/// autoencoder, LoRAs fused at load, and where it computes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    /// Hugging Face repo id in the diffusers layout, a local folder, or `random:<arch>`.
    pub id: String,
    /// Hub revision (branch, tag or commit); `None` = `main`.
    pub revision: Option<String>,
    /// Tiny autoencoder (TAESD) repo or folder; `None` = the model's full VAE.
    pub tiny_vae: Option<String>,
    /// LoRA repos/folders/files with their scales, fused in order.
    pub loras: Vec<(String, f32)>,
    /// The compute device (`auto` chooses, see [`select_device`]).
    pub device: DeviceName,
    /// The number type (`auto` chooses, see [`select_dtype`]).
    pub dtype: DtypeName,
}

impl ModelOptions {
    /// The model in model-layer terms, for a model computing in `dtype`.
    pub fn spec(&self, dtype: candle_core::DType) -> ModelSpec {
        ModelSpec {
            id: self.id.clone(),
            revision: self.revision.clone(),
            tiny_vae: self.tiny_vae.clone(),
            loras: self.loras.clone(),
            dtype,
        }
    }
}

/// Loads the configured model (the slow part: seconds to minutes for a real model) on the device
/// and in the dtype the configuration names or, for `auto`, that this machine offers (logged with the
/// reason).
///
/// # Errors
/// No such device/dtype on this machine (bf16 on the CPU included), or the model does not
/// load (missing files, wrong configs: the message says which).
pub fn load_model(m: &ModelOptions) -> Result<StableDiffusion> {
    let (device, device_why) = select_device(m.device)?;
    let (dtype, dtype_why) = select_dtype(m.dtype, &device);
    tracing::info!(
        "model: device {} ({device_why}), dtype {dtype:?} ({dtype_why})",
        crate::model::device::device_label(&device)
    );
    if device.is_cpu() && dtype == candle_core::DType::BF16 {
        anyhow::bail!(
            "model.dtype = \"bf16\" does not run on the CPU (candle's CPU matrix product has no \
             bf16); use \"auto\" (f32 on the CPU) or \"f16\" on the CPU, bf16 on a GPU"
        );
    }
    let t0 = std::time::Instant::now();
    let model = StableDiffusion::load(&m.spec(dtype), &device, &HubOptions::from_env())
        .with_context(|| format!("loading model {}", m.id))?;
    tracing::info!(
        "model: {} loaded in {:.1} s",
        model.description,
        t0.elapsed().as_secs_f64()
    );
    if model.random_weights {
        tracing::warn!(
            "model {} has RANDOM WEIGHTS (a test/demo model): the output is abstract noise, \
             not a stylised picture; set model.id to a real model such as stabilityai/sd-turbo",
            m.id
        );
    }
    Ok(model)
}

/// The stream's noise: the file the options name, else seeded noise.
fn make_noise(o: &TransformOptions) -> Result<Noise> {
    match &o.noise_file {
        Some(f) => Noise::from_file(Path::new(f)),
        None => Ok(Noise::seeded(o.stream.seed)),
    }
}

/// What becomes of one input frame taken by [`DiffusionTransform`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    /// Denoised by the model; its output leaves the batch `lag_frames` frames later.
    Model,
    /// Skipped by the similarity filter: its output is the previous frame's.
    Repeat,
    /// Filler that completes a batch or pushes the last frames out at the end of a stream;
    /// never output.
    Pad,
}

/// One input frame whose output has not been returned yet.
#[derive(Debug)]
struct Slot {
    kind: SlotKind,
    seq: u64,
    captured_at: std::time::Instant,
    out: Option<Frame>,
}

impl Slot {
    fn of(kind: SlotKind, f: &Frame) -> Self {
        Slot {
            kind,
            seq: f.seq,
            captured_at: f.captured_at,
            out: None,
        }
    }
}

/// The pipeline as a relay [`Transform`].
///
/// Outputs trail inputs by the Stream Batch lag ([`StreamDiffusion::lag_frames`]). In real
/// time every output is returned at once (the warm-up ones too, so the picture appears as
/// early as possible). In every-frame mode ([`Transform::set_every_frame`]) each input gets
/// exactly one output, made from it and in input order: warm-up outputs are dropped, a frame
/// the similarity filter skips repeats the previous frame's output, and
/// [`Transform::flush`] completes an unpaired `frame_buffer_size` batch and runs the batch
/// on filler until the last real frame is out.
pub struct DiffusionTransform {
    stream: StreamDiffusion,
    prompt: String,
    negative: String,
    noise_file: Option<String>,
    blend_frames: u32,
    filter: Option<SimilarityFilter>,
    every_frame: bool,
    /// Inputs collected for a call (`frame_buffer_size` of them).
    pending: Vec<Frame>,
    /// Every frame taken whose output has not been returned yet, oldest first.
    slots: std::collections::VecDeque<Slot>,
    /// Warm-up outputs the current stream still owes before its first real one.
    warmup: usize,
    /// The newest input given to the model (the filler for a flush).
    last_input: Option<Frame>,
    /// Outputs of a stream that was flushed before being prepared again, returned next.
    ready: Vec<Frame>,
    /// The last output, re-sent when the similarity filter skips a frame.
    last: Option<Frame>,
    skipped: u64,
    discarded: u64,
    /// Scales a frame pre-processed for another stream size (a size change in flight).
    resizer: crate::convert::RgbResizer,
}

impl DiffusionTransform {
    /// Loads the configured model and prepares the stream.
    ///
    /// # Errors
    /// The model does not load (see [`load_model`]) or the stream does not prepare.
    pub fn load(o: &TransformOptions) -> Result<Self> {
        let model = Arc::new(load_model(&o.model)?);
        Self::with_model(model, o)
    }

    /// Prepares a stream over an already loaded model.
    ///
    /// # Errors
    /// The stream settings do not fit the model (e.g. a `t_index_list` entry past the
    /// schedule), or the noise file does not read.
    pub fn with_model(model: Arc<StableDiffusion>, o: &TransformOptions) -> Result<Self> {
        let stream = StreamDiffusion::prepare(
            model,
            o.stream.clone(),
            o.live,
            &o.prompt,
            &o.negative_prompt,
            make_noise(o)?,
        )?;
        Ok(Self {
            warmup: stream.lag_frames(),
            stream,
            prompt: o.prompt.clone(),
            negative: o.negative_prompt.clone(),
            noise_file: o.noise_file.clone(),
            blend_frames: o.prompt_blend_frames,
            filter: o.filter.map(|s| SimilarityFilter::new(s, o.stream.seed)),
            every_frame: false,
            pending: Vec::new(),
            slots: Default::default(),
            last_input: None,
            ready: Vec::new(),
            last: None,
            skipped: 0,
            discarded: 0,
            resizer: crate::convert::RgbResizer::new(),
        })
    }

    /// The stream core this transform drives.
    pub fn stream(&self) -> &StreamDiffusion {
        &self.stream
    }

    /// One pipeline call on the collected frames; places its outputs.
    fn run(&mut self, out: &mut Vec<Frame>) -> Result<()> {
        let p = self.stream.params().clone();
        let (device, dtype) = {
            let (d, t) = self.stream.device_dtype();
            (d.clone(), t)
        };
        let images = match p.mode {
            StreamMode::Img2img => {
                let pixels: Vec<&[u8]> = self.pending.iter().map(|f| f.data.as_slice()).collect();
                let x = stream::images_from_rgb(&pixels, p.width, p.height, dtype, &device)?;
                self.stream.img2img(&x)?
            }
            StreamMode::Txt2img => self.stream.txt2img()?,
        };
        let rgb = stream::rgb_from_images(&images)?;
        self.pending.clear();
        for data in rgb {
            let f = Frame::new(
                p.width as u32,
                p.height as u32,
                PixelFormat::Rgb24,
                ColorRange::Full,
                data,
            )?;
            self.place(f, out);
        }
        Ok(())
    }

    /// Gives one pipeline output to the frame it was made from (the oldest one in the batch),
    /// then returns what is complete.
    fn place(&mut self, mut f: Frame, out: &mut Vec<Frame>) {
        if self.warmup > 0 {
            self.warmup -= 1;
            if !self.every_frame {
                // Real time: show the warm-up picture at once (with a warm start it is the
                // first frame already), labelled as the oldest frame in flight.
                if let Some(s) = self.slots.front() {
                    f.seq = s.seq;
                    f.captured_at = s.captured_at;
                }
                self.last = Some(f.clone());
                out.push(f);
            }
            return;
        }
        match self
            .slots
            .iter_mut()
            .find(|s| s.kind != SlotKind::Repeat && s.out.is_none())
        {
            Some(s) => {
                f.seq = s.seq;
                f.captured_at = s.captured_at;
                s.out = Some(f);
            }
            None => tracing::debug!("a pipeline output with no frame waiting for it"),
        }
        self.release(out);
    }

    /// Returns the outputs that are complete, in input order.
    fn release(&mut self, out: &mut Vec<Frame>) {
        while let Some(front) = self.slots.front_mut() {
            let f = match (front.kind, front.out.take(), &self.last) {
                (SlotKind::Model, Some(f), _) => f,
                (SlotKind::Pad, Some(_), _) => {
                    self.slots.pop_front();
                    continue;
                }
                (SlotKind::Repeat, _, Some(last)) => {
                    let mut f = last.clone();
                    f.seq = front.seq;
                    f.captured_at = front.captured_at;
                    f
                }
                (SlotKind::Repeat, _, None) => {
                    // Repeats a frame whose call failed before any output existed: nothing
                    // to repeat, counted as lost (else it would block every later output).
                    self.slots.pop_front();
                    self.discarded += 1;
                    continue;
                }
                _ => break,
            };
            self.slots.pop_front();
            self.last = Some(f.clone());
            out.push(f);
        }
    }

    /// Takes a frame for the next call; runs the call once it has `frame_buffer_size`.
    fn take(&mut self, input: &Frame, kind: SlotKind, out: &mut Vec<Frame>) -> Result<()> {
        self.pending.push(input.clone());
        self.slots.push_back(Slot::of(kind, input));
        if kind == SlotKind::Model {
            self.last_input = Some(input.clone());
        }
        if self.pending.len() < self.stream.frames_per_call() {
            return Ok(());
        }
        let n = self.pending.len();
        let r = self.run(out);
        if r.is_err() {
            // The failed call's frames are lost (the latent buffer is unchanged): forget them
            // so later outputs still find their own frames.
            self.pending.clear();
            let mut left = n;
            let mut i = self.slots.len();
            while left > 0 && i > 0 {
                i -= 1;
                if self.slots[i].kind != SlotKind::Repeat && self.slots[i].out.is_none() {
                    if self.slots[i].kind == SlotKind::Model {
                        self.discarded += 1;
                    }
                    self.slots.remove(i);
                    left -= 1;
                }
            }
            self.release(out);
        }
        r
    }

    /// Whether a frame is still waiting for the model.
    fn model_frames_in_flight(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.kind == SlotKind::Model && s.out.is_none())
    }
}

impl Transform for DiffusionTransform {
    fn name(&self) -> String {
        let p = self.stream.params();
        format!(
            "diffusion ({}, {:?}, {} step(s) {:?}, cfg {:?}{})",
            self.stream.model().description,
            p.mode,
            p.t_index_list.len(),
            p.t_index_list,
            p.cfg_type,
            if p.use_denoising_batch {
                ""
            } else {
                ", sequential"
            }
        )
    }

    fn process(&mut self, input: &Frame) -> Result<Frame> {
        let mut out = Vec::new();
        self.process_into(input, &mut out)?;
        out.pop()
            .or_else(|| self.last.clone())
            .context("the pipeline is still collecting frames for its first call")
    }

    fn process_into(&mut self, input: &Frame, out: &mut Vec<Frame>) -> Result<()> {
        let (w, h) = {
            let p = self.stream.params();
            (p.width as u32, p.height as u32)
        };
        if input.format != PixelFormat::Rgb24 {
            anyhow::bail!("diffusion expects RGB frames, got {}", input.format);
        }
        out.append(&mut self.ready);
        let resized;
        let input = if (input.width, input.height) != (w, h) {
            // Pre-processed for the previous stream size: a size change (`set stream.width`, or
            // the output's with an auto stream size) reaches the capture and the transform a
            // frame apart. Scaled rather than lost, so the change never shows as an error.
            tracing::debug!(
                "diffusion: a {}x{} frame scaled to the stream's {w}x{h}",
                input.width,
                input.height
            );
            resized = self
                .resizer
                .resize(input, w, h, crate::convert::Fit::Stretch, false)?;
            &resized
        } else {
            input
        };
        let p = self.stream.params();
        if p.mode == StreamMode::Img2img {
            if let Some(filter) = self.filter.as_mut() {
                let (device, dtype) = self.stream.device_dtype();
                let x = stream::images_from_rgb(&[&input.data], p.width, p.height, dtype, device)?;
                // A skip repeats the previous frame's output: there must be a previous frame
                // (in every-frame mode its output may still be in the batch).
                let has_previous =
                    self.last.is_some() || (self.every_frame && !self.slots.is_empty());
                let process = filter.should_process(&x)?;
                if has_previous && !process {
                    self.skipped += 1;
                    if self.every_frame {
                        self.slots.push_back(Slot::of(SlotKind::Repeat, input));
                        self.release(out);
                    } else if let Some(last) = &self.last {
                        let mut f = last.clone();
                        f.seq = input.seq;
                        f.captured_at = input.captured_at;
                        out.push(f);
                    }
                    return Ok(());
                }
            }
        }
        self.take(input, SlotKind::Model, out)
    }

    fn input_size(&self) -> Option<(u32, u32)> {
        let p = self.stream.params();
        Some((p.width as u32, p.height as u32))
    }

    fn set_every_frame(&mut self, on: bool) {
        self.every_frame = on;
    }

    fn flush(&mut self, out: &mut Vec<Frame>) -> Result<()> {
        out.append(&mut self.ready);
        let Some(filler) = self.last_input.clone() else {
            return Ok(()); // nothing was ever given to the model
        };
        // Complete an unpaired batch with copies of its last frame.
        while !self.pending.is_empty() {
            self.take(&filler, SlotKind::Pad, out)?;
        }
        // Run the batch on filler until the last real frame has left it: `lag / f` calls.
        let f = self.stream.frames_per_call();
        let mut calls_left = self.stream.lag_frames() / f + 1;
        while self.model_frames_in_flight() && calls_left > 0 {
            calls_left -= 1;
            for _ in 0..f {
                self.take(&filler, SlotKind::Pad, out)?;
            }
        }
        if self.model_frames_in_flight() {
            anyhow::bail!("the pipeline still holds frames after a flush (a bug)");
        }
        self.slots.retain(|s| s.kind != SlotKind::Pad);
        self.release(out);
        // The batch now holds filler: start the next frames cold (primed again).
        self.stream.restart()?;
        self.warmup = self.stream.lag_frames();
        self.last_input = None;
        Ok(())
    }

    fn held(&self) -> u64 {
        if self.every_frame {
            self.slots.len() as u64
        } else {
            // Real time returns one output per frame given to the model (warm-up included).
            self.pending.len() as u64
        }
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    fn discarded(&self) -> u64 {
        self.discarded
    }

    fn apply(&mut self, o: &TransformOptions) -> Result<()> {
        let params = o.stream.clone();
        if params != *self.stream.params() || o.noise_file != self.noise_file {
            // Shape-changing settings: prepare a new stream over the same model; the old one
            // keeps running if that fails.
            let next = StreamDiffusion::prepare(
                self.stream.model().clone(),
                params,
                o.live,
                &o.prompt,
                &o.negative_prompt,
                make_noise(o)?,
            )?;
            if self.every_frame {
                // Every frame taken is output: the old stream finishes its frames first (what
                // it returned before an error is kept too).
                let mut done = std::mem::take(&mut self.ready);
                let r = self.flush(&mut done);
                self.ready = done;
                r?;
            } else {
                // Real time: each call returned an output per frame it took (the warm-up ones
                // too), so only the frames collected for the next call are lost.
                self.discarded += self.pending.len() as u64;
                self.slots.clear();
                self.pending.clear();
            }
            self.stream = next;
            self.warmup = self.stream.lag_frames();
            self.last_input = None;
            self.prompt = o.prompt.clone();
            self.negative = o.negative_prompt.clone();
            self.noise_file = o.noise_file.clone();
            tracing::info!("stream prepared again: {}", self.name());
        } else {
            if o.live != self.stream.live() {
                self.stream.set_live(o.live)?;
            }
            if o.prompt != self.prompt || o.negative_prompt != self.negative {
                self.stream
                    .set_prompts(&o.prompt, &o.negative_prompt, o.prompt_blend_frames)?;
                self.prompt = o.prompt.clone();
                self.negative = o.negative_prompt.clone();
            }
        }
        self.blend_frames = o.prompt_blend_frames;
        match (o.filter, self.filter.as_mut()) {
            (Some(s), Some(f)) => f.set_settings(s),
            (Some(s), None) => self.filter = Some(SimilarityFilter::new(s, o.stream.seed)),
            (None, _) => self.filter = None,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::model::rel_err;
    use crate::pipeline::CfgType;
    use crate::profile::{ModelConfig, Profile};
    use candle_core::{DType, Device, Tensor};

    fn fixture(rel: &str) -> std::path::PathBuf {
        crate::model::testing::fixtures_dir().join(rel)
    }

    fn model() -> Arc<StableDiffusion> {
        let mut m = ModelConfig {
            id: fixture("models/tiny-sd15").display().to_string(),
            tiny_vae: fixture("models/tiny-taesd").display().to_string(),
            ..Default::default()
        };
        m.lora.clear();
        Arc::new(load_model(&config::model_options(&m)).unwrap())
    }

    fn profile(t: &[u32], cfg: CfgType) -> Profile {
        let mut p = Profile::default();
        p.stream.width = crate::profile::StreamDim::Px(32);
        p.stream.height = crate::profile::StreamDim::Px(24);
        p.stream.t_index_list = t.to_vec();
        p.stream.cfg_type = cfg;
        p.stream.guidance_scale = 1.5;
        p.stream.delta = 0.8;
        p
    }

    fn frame(seq: u64) -> Frame {
        let data = crate::source::pattern::render(32, 24, seq);
        Frame::new(32, 24, PixelFormat::Rgb24, ColorRange::Full, data).unwrap()
    }

    fn image(seq: u64) -> Tensor {
        let f = frame(seq);
        stream::images_from_rgb(&[&f.data], 32, 24, DType::F32, &Device::Cpu).unwrap()
    }

    fn prepare(m: &Arc<StableDiffusion>, p: &Profile) -> StreamDiffusion {
        StreamDiffusion::prepare(
            m.clone(),
            config::stream_params(p),
            config::live_params(p),
            &p.prompt,
            &p.negative_prompt,
            Noise::seeded(p.stream.seed),
        )
        .unwrap()
    }

    #[test]
    fn warm_start_first_output_is_the_cold_streams_first_real_one() {
        let m = model();
        let mut p = profile(&[20, 35, 45], CfgType::SelfNeg);
        p.stream.warm_start = false;
        let mut cold = prepare(&m, &p);
        let x = image(0);
        let c: Vec<Tensor> = (0..3).map(|_| cold.img2img(&x).unwrap()).collect();
        p.stream.warm_start = true;
        let mut warm = prepare(&m, &p);
        let w0 = warm.img2img(&x).unwrap();
        // Priming runs the same batches the cold stream ran on its first k − 1 calls, so the
        // warm first output is the cold stream's k-th.
        assert!(rel_err(&w0, &c[2]).unwrap() < 1e-5);
        // ... while the cold stream's first output came from a zero buffer and is different.
        assert!(rel_err(&c[0], &c[2]).unwrap() > 1e-2);
    }

    #[test]
    fn prompt_update_rebuilds_both_embeddings() {
        let m = model();
        let mut p = profile(&[35], CfgType::Full);
        p.prompt = "a red fox".into();
        p.negative_prompt = "blurry".into();
        let mut a = prepare(&m, &p);
        let x = image(3);
        let before = a.img2img(&x).unwrap();
        // Only the negative prompt changes: the output must change (full CFG uses it) and must
        // equal a stream prepared with the new negative prompt from the start.
        a.set_prompts("a red fox", "grainy, dark", 0).unwrap();
        let after = a.img2img(&x).unwrap();
        let mut q = p.clone();
        q.negative_prompt = "grainy, dark".into();
        let fresh = prepare(&m, &q).img2img(&x).unwrap();
        assert!(rel_err(&after, &fresh).unwrap() < 1e-5);
        assert!(rel_err(&after, &before).unwrap() > 1e-3);
    }

    #[test]
    fn prompt_blend_reaches_the_new_prompt() {
        let m = model();
        let mut p = profile(&[35], CfgType::None);
        p.prompt = "a red fox".into();
        let mut a = prepare(&m, &p);
        let x = image(1);
        let start = a.img2img(&x).unwrap();
        a.set_prompts("a city at night", &p.negative_prompt, 3)
            .unwrap();
        let mid = a.img2img(&x).unwrap();
        a.img2img(&x).unwrap();
        let end = a.img2img(&x).unwrap();
        let mut q = p.clone();
        q.prompt = "a city at night".into();
        let target = prepare(&m, &q).img2img(&x).unwrap();
        assert!(rel_err(&end, &target).unwrap() < 1e-5);
        // The first blended frame is neither the old nor the new picture.
        assert!(rel_err(&mid, &start).unwrap() > 1e-4);
        assert!(rel_err(&mid, &target).unwrap() > 1e-4);
    }

    #[test]
    fn cross_frame_attention_is_a_no_op_for_one_sample_and_acts_on_a_batch() {
        let m = model();
        let x = image(2);
        for (t, expect_same) in [(vec![35u32], true), (vec![20, 40], false)] {
            let mut p = profile(&t, CfgType::None);
            let mut plain = prepare(&m, &p);
            p.stream.cross_frame_attention = true;
            let mut cross = prepare(&m, &p);
            let (mut a, mut b) = (None, None);
            for _ in 0..3 {
                a = Some(plain.img2img(&x).unwrap());
                b = Some(cross.img2img(&x).unwrap());
            }
            let e = rel_err(&b.unwrap(), &a.unwrap()).unwrap();
            if expect_same {
                assert!(e < 1e-5, "batch of one: {e}");
            } else {
                assert!(e > 1e-4, "batch of two: {e}");
            }
        }
    }

    #[test]
    fn transform_collects_frame_buffer_and_keeps_settings_on_a_bad_change() {
        let m = model();
        let mut p = profile(&[35], CfgType::None);
        p.stream.frame_buffer_size = 2;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        let mut out = Vec::new();
        t.process_into(&frame(0), &mut out).unwrap();
        assert!(out.is_empty(), "one frame of two: nothing yet");
        t.process_into(&frame(1), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].width, out[0].height), (32, 24));
        assert_eq!(out[1].seq, frame(1).seq);
        // An index past the schedule fails to prepare; the old stream keeps working.
        let mut bad = p.clone();
        bad.stream.t_index_list = vec![60];
        assert!(t.apply(&config::transform_options(&bad)).is_err());
        assert_eq!(t.stream().params().t_index_list, vec![35]);
        out.clear();
        t.process_into(&frame(2), &mut out).unwrap();
        t.process_into(&frame(3), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        // A good change prepares again.
        let mut good = p.clone();
        good.stream.t_index_list = vec![30, 40];
        good.stream.frame_buffer_size = 1;
        t.apply(&config::transform_options(&good)).unwrap();
        out.clear();
        t.process_into(&frame(4), &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    /// Every-frame mode as a property over N = 1..12 frames, k = 1..4 steps and
    /// `frame_buffer_size` 1..3 (issue 11 §1): exactly N outputs, in input order, each made
    /// from its own input. With row-independent settings (no CFG, no cross-frame attention) a
    /// frame's output depends only on that frame and its row in the call (each row has its own
    /// noise), so output i must equal the output of a fresh stream given frame i at the same
    /// row, and be nearer to it than to any other frame's.
    #[test]
    fn every_frame_mode_returns_one_output_per_input_made_from_it() {
        let m = model();
        let t_lists: [&[u32]; 4] = [&[35], &[20, 35], &[10, 25, 40], &[10, 20, 30, 40]];
        let input = |i: usize| frame(i as u64 * 17 + 3);
        let run = |p: &Profile, frames: &[Frame]| -> Vec<Frame> {
            let mut t =
                DiffusionTransform::with_model(m.clone(), &config::transform_options(p)).unwrap();
            t.set_every_frame(true);
            let mut out = Vec::new();
            for f in frames {
                t.process_into(f, &mut out).unwrap();
            }
            t.flush(&mut out).unwrap();
            assert_eq!(t.held(), 0);
            out
        };
        let dist = |a: &Frame, b: &Frame| -> u64 {
            a.data
                .iter()
                .zip(&b.data)
                .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs().pow(2))
                .sum()
        };
        for (k, t_list) in t_lists.iter().enumerate() {
            let k = k + 1;
            for fbs in 1..=3usize {
                let mut base = profile(t_list, CfgType::None);
                base.stream.similarity_filter = false;
                base.stream.cross_frame_attention = false;
                base.stream.frame_buffer_size = fbs as u32;
                // refs[i][r]: frame i's output at row r (a call of fbs copies of frame i).
                let refs: Vec<Vec<Frame>> =
                    (0..12).map(|i| run(&base, &vec![input(i); fbs])).collect();
                for n in 1..=12usize {
                    let mut p = base.clone();
                    p.stream.warm_start = n % 2 == 0;
                    let frames: Vec<Frame> = (0..n).map(input).collect();
                    let out = run(&p, &frames);
                    let what = format!("k {k}, fbs {fbs}, N {n}");
                    assert_eq!(out.len(), n, "{what}");
                    for (i, o) in out.iter().enumerate() {
                        assert_eq!(o.seq, frames[i].seq, "{what}: output {i} out of order");
                        let r = i % fbs;
                        let nearest = (0..n).min_by_key(|&j| dist(o, &refs[j][r])).unwrap();
                        assert_eq!(nearest, i, "{what}: output {i} looks like input {nearest}");
                        assert!(
                            dist(o, &refs[i][r]) <= o.data.len() as u64,
                            "{what}: output {i} differs from its frame's own output"
                        );
                    }
                }
            }
        }
    }

    /// In every-frame mode a frame the similarity filter skips repeats the previous frame's
    /// output, in order, even while that output is still in the batch.
    #[test]
    fn every_frame_mode_keeps_order_with_the_similarity_filter() {
        let m = model();
        let mut p = profile(&[20, 35], CfgType::None);
        p.stream.similarity_filter = true;
        p.stream.max_skip_frame = 10;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        t.set_every_frame(true);
        // A, A, A, B, B, A with B the negative of A (cosine similarity −1: always processed).
        let inputs: Vec<Frame> = [false, false, false, true, true, false]
            .iter()
            .enumerate()
            .map(|(i, &negative)| {
                let mut f = frame(5);
                if negative {
                    f.data.iter_mut().for_each(|v| *v = 255 - *v);
                }
                f.seq = i as u64;
                f
            })
            .collect();
        let mut out = Vec::new();
        for f in &inputs {
            t.process_into(f, &mut out).unwrap();
        }
        t.flush(&mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(t.skipped(), 3, "the repeats of A and of B are skipped");
        assert_eq!(
            out[1].data, out[0].data,
            "a skipped frame repeats the previous output"
        );
        assert_eq!(out[2].data, out[0].data);
        assert_eq!(out[4].data, out[3].data);
        assert_ne!(out[3].data, out[0].data);
        assert_ne!(out[5].data, out[3].data);
    }

    /// Real time: outputs come at once (the warm-up ones too, so the first picture is early):
    /// one output per frame given to the model, so only a frame still collected for the next
    /// call is held, and a stream prepared again counts just that one as discarded.
    #[test]
    fn real_time_counts_the_frames_a_new_stream_drops() {
        let m = model();
        let mut p = profile(&[10, 20, 30], CfgType::None);
        p.stream.frame_buffer_size = 2;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        let mut out = Vec::new();
        for i in 0..5 {
            t.process_into(&frame(i), &mut out).unwrap();
        }
        assert_eq!(
            out.len(),
            4,
            "real time returns an output per frame of each call"
        );
        assert_eq!(t.held(), 1, "the fifth frame waits for its pair");
        let mut q = p.clone();
        q.stream.t_index_list = vec![20, 30];
        t.apply(&config::transform_options(&q)).unwrap();
        assert_eq!((t.held(), t.discarded()), (0, 1));
    }

    /// Every-frame mode: a frame the similarity filter skips right after a frame whose call
    /// failed has nothing to repeat; it is counted as lost and later frames still come out.
    #[test]
    fn a_repeat_of_a_failed_frame_does_not_block_later_outputs() {
        let m = model();
        let mut p = profile(&[35], CfgType::None);
        p.stream.frame_buffer_size = 2;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        t.set_every_frame(true);
        // The state a failed first call leaves: its frames are forgotten, the frame the filter
        // skipped after them (a Repeat) remains, and no output exists yet.
        t.slots.push_back(Slot::of(SlotKind::Repeat, &frame(5)));
        assert!(t.last.is_none());
        let mut out = Vec::new();
        for i in [20u64, 40] {
            t.process_into(&frame(i), &mut out).unwrap();
        }
        t.flush(&mut out).unwrap();
        assert_eq!((t.held(), t.discarded()), (0, 1));
        assert_eq!(out.len(), 2, "outputs after the failure never came out");
    }

    #[test]
    fn similarity_filter_answers_static_frames_from_the_last_output() {
        let m = model();
        let mut p = profile(&[35], CfgType::None);
        p.stream.similarity_filter = true;
        p.stream.max_skip_frame = 3;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        let mut out = Vec::new();
        let still = frame(5);
        for _ in 0..9 {
            t.process_into(&still, &mut out).unwrap();
        }
        assert_eq!(out.len(), 9);
        // Identical frames: processed, 3 skipped, processed, 3 skipped, processed.
        assert_eq!(t.skipped(), 6);
        assert!(out.windows(2).all(|w| w[0].data == w[1].data));
        // Switching the filter off processes every frame.
        p.stream.similarity_filter = false;
        t.apply(&config::transform_options(&p)).unwrap();
        for _ in 0..3 {
            t.process_into(&still, &mut out).unwrap();
        }
        assert_eq!(t.skipped(), 6);
    }

    #[test]
    fn bf16_on_the_cpu_is_refused_with_what_to_do() {
        let m = ModelConfig {
            id: fixture("models/tiny-sd15").display().to_string(),
            dtype: crate::profile::DtypeName::Bf16,
            ..Default::default()
        };
        let e = format!(
            "{:#}",
            load_model(&config::model_options(&m)).err().unwrap()
        );
        assert!(e.contains("bf16") && e.contains("f32"), "{e}");
    }

    #[test]
    fn f16_runs_on_the_cpu() {
        let m = ModelConfig {
            id: fixture("models/tiny-sd15").display().to_string(),
            tiny_vae: fixture("models/tiny-taesd").display().to_string(),
            dtype: crate::profile::DtypeName::F16,
            ..Default::default()
        };
        let model = Arc::new(load_model(&config::model_options(&m)).unwrap());
        let p = profile(&[32, 45], CfgType::SelfNeg);
        let mut s = prepare(&model, &p);
        let x = image(0).to_dtype(candle_core::DType::F16).unwrap();
        let out = s.img2img(&x).unwrap();
        assert_eq!(out.dtype(), candle_core::DType::F16);
        let rgb = stream::rgb_from_images(&out).unwrap();
        assert_eq!(rgb[0].len(), 32 * 24 * 3);
    }

    #[test]
    fn txt2img_streams_without_using_the_input() {
        let m = model();
        let mut p = profile(&[0], CfgType::None);
        p.stream.mode = StreamMode::Txt2img;
        let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
        let mut out = Vec::new();
        t.process_into(&frame(0), &mut out).unwrap();
        t.process_into(&frame(0), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        // Fresh latents every call: two different pictures from the same input.
        assert_ne!(out[0].data, out[1].data);
    }
}
