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
/// No such device/dtype on this machine (bf16 on a CPU without AVX512-BF16 included), or the
/// model does not load (missing files, wrong configs: the message says which).
pub fn load_model(m: &ModelOptions) -> Result<StableDiffusion> {
    let (device, device_why) = select_device(m.device)?;
    let (dtype, dtype_why) = select_dtype(m.dtype, &device);
    tracing::info!(
        "model: device {} ({device_why}), dtype {dtype:?} ({dtype_why})",
        crate::model::device::device_label(&device)
    );
    let t0 = std::time::Instant::now();
    let model = StableDiffusion::load(&m.spec(dtype), &device, &HubOptions::from_env())
        .with_context(|| format!("loading model {}", m.id))?;
    if device.is_cpu() && dtype == candle_core::DType::BF16 {
        tracing::info!(
            "model: bf16 on the CPU = f32 activations with bf16 matrix products (AVX512-BF16) in \
             the U-Net and the VAE"
        );
    }
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

    fn restart(&mut self) -> Result<()> {
        self.stream.restart_warm()?;
        // Real time (on-demand runs only in real time): what was collected for the next call
        // is stale; the slots of frames already returned need nothing more.
        self.discarded += self.pending.len() as u64;
        self.pending.clear();
        self.slots.clear();
        self.warmup = self.stream.lag_frames();
        self.last_input = None;
        Ok(())
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
mod tests;
