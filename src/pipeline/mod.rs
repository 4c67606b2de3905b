//! The StreamDiffusion pipeline (arXiv 2312.12491) as the relay's transform: pre-processed RGB
//! frames in, stylised RGB frames out, with Stream Batch, R-CFG, the stochastic similarity
//! filter and live prompt/settings changes.
//!
//! * [`stream`]: the tensor pipeline (batch denoising, R-CFG, pre-computation);
//! * [`filter`]: the similarity filter;
//! * [`noise`]: seeded or file-provided noise.

pub mod filter;
pub mod noise;
pub mod stream;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::model::hub::HubOptions;
use crate::model::sd::{self, ModelSpec, StableDiffusion};
use crate::profile::{ModelConfig, Profile, StreamMode};
use crate::transform::Transform;

pub use filter::{FilterSettings, SimilarityFilter};
pub use noise::Noise;
pub use stream::{LiveParams, StreamDiffusion, StreamParams};

/// The model part of a profile in model-layer terms, for a model computing in `dtype`.
pub fn model_spec(m: &ModelConfig, dtype: candle_core::DType) -> ModelSpec {
    ModelSpec {
        id: m.id.clone(),
        revision: m.revision.clone(),
        tiny_vae: (!m.tiny_vae.is_empty()).then(|| m.tiny_vae.clone()),
        loras: m
            .lora
            .iter()
            .map(|l| (l.id.clone(), l.scale as f32))
            .collect(),
        dtype,
    }
}

/// Loads the profile's model (the slow part: seconds to minutes for a real model) on the device
/// and in the dtype the profile names or, for `auto`, that this machine offers (logged with the
/// reason).
pub fn load_model(m: &ModelConfig) -> Result<StableDiffusion> {
    let (device, device_why) = sd::select_device(m.device)?;
    let (dtype, dtype_why) = sd::select_dtype(m.dtype, &device);
    tracing::info!(
        "model: device {} ({device_why}), dtype {dtype:?} ({dtype_why})",
        device_label(&device)
    );
    if device.is_cpu() && dtype == candle_core::DType::BF16 {
        anyhow::bail!(
            "model.dtype = \"bf16\" does not run on the CPU (candle's CPU matrix product has no \
             bf16); use \"auto\" (f32 on the CPU) or \"f16\" on the CPU, bf16 on a GPU"
        );
    }
    let t0 = std::time::Instant::now();
    let model = StableDiffusion::load(&model_spec(m, dtype), &device, &HubOptions::from_env())
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

/// `cpu`, `cuda:N`, `metal:N` for logs.
fn device_label(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The stream settings of a profile (the size from [`crate::profile::geometry::resolve`]).
pub fn stream_params(p: &Profile) -> StreamParams {
    let s = &p.stream;
    let size = crate::profile::geometry::resolve(p);
    StreamParams {
        width: size.width as usize,
        height: size.height as usize,
        mode: s.mode,
        t_index_list: s.t_index_list.iter().map(|&i| i as usize).collect(),
        num_inference_steps: s.num_inference_steps as usize,
        frame_buffer_size: s.frame_buffer_size as usize,
        use_denoising_batch: s.use_denoising_batch,
        do_add_noise: s.do_add_noise,
        cfg_type: s.cfg_type,
        seed: s.seed,
        warm_start: s.warm_start,
    }
}

/// The settings that change without preparing again.
pub fn live_params(p: &Profile) -> LiveParams {
    LiveParams {
        guidance_scale: p.stream.guidance_scale,
        delta: p.stream.delta,
        cross_frame_attention: p.stream.cross_frame_attention,
    }
}

fn filter_settings(p: &Profile) -> Option<FilterSettings> {
    p.stream.similarity_filter.then_some(FilterSettings {
        threshold: p.stream.similarity_threshold,
        max_skip_frame: p.stream.max_skip_frame,
    })
}

fn make_noise(p: &Profile) -> Result<Noise> {
    match &p.stream.noise_file {
        Some(f) => Noise::from_file(Path::new(f)),
        None => Ok(Noise::seeded(p.stream.seed)),
    }
}

/// The pipeline as a relay [`Transform`].
pub struct DiffusionTransform {
    stream: StreamDiffusion,
    prompt: String,
    negative: String,
    noise_file: Option<String>,
    blend_frames: u32,
    filter: Option<SimilarityFilter>,
    /// Inputs collected for a call (`frame_buffer_size` of them).
    pending: Vec<Frame>,
    /// The last output, re-sent when the similarity filter skips a frame.
    last: Option<Frame>,
    skipped: u64,
    /// Scales a frame pre-processed for another stream size (a size change in flight).
    resizer: crate::convert::RgbResizer,
}

impl DiffusionTransform {
    /// Loads the profile's model and prepares the stream.
    pub fn load(p: &Profile) -> Result<Self> {
        let model = Arc::new(load_model(&p.model)?);
        Self::with_model(model, p)
    }

    /// Prepares a stream over an already loaded model.
    pub fn with_model(model: Arc<StableDiffusion>, p: &Profile) -> Result<Self> {
        let stream = StreamDiffusion::prepare(
            model,
            stream_params(p),
            live_params(p),
            &p.prompt,
            &p.negative_prompt,
            make_noise(p)?,
        )?;
        Ok(Self {
            stream,
            prompt: p.prompt.clone(),
            negative: p.negative_prompt.clone(),
            noise_file: p.stream.noise_file.clone(),
            blend_frames: p.stream.prompt_blend_frames,
            filter: filter_settings(p).map(|s| SimilarityFilter::new(s, p.stream.seed)),
            pending: Vec::new(),
            last: None,
            skipped: 0,
            resizer: crate::convert::RgbResizer::new(),
        })
    }

    pub fn stream(&self) -> &StreamDiffusion {
        &self.stream
    }

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
        let newest = self.pending.last().cloned();
        self.pending.clear();
        for data in rgb {
            let mut f = Frame::new(
                p.width as u32,
                p.height as u32,
                PixelFormat::Rgb24,
                ColorRange::Full,
                data,
            )?;
            if let Some(n) = &newest {
                f.seq = n.seq;
                f.captured_at = n.captured_at;
            }
            self.last = Some(f.clone());
            out.push(f);
        }
        Ok(())
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
            if let (Some(filter), Some(last)) = (self.filter.as_mut(), self.last.as_ref()) {
                let (device, dtype) = self.stream.device_dtype();
                let x = stream::images_from_rgb(&[&input.data], p.width, p.height, dtype, device)?;
                if !filter.should_process(&x)? {
                    self.skipped += 1;
                    let mut f = last.clone();
                    f.seq = input.seq;
                    f.captured_at = input.captured_at;
                    out.push(f);
                    return Ok(());
                }
            } else if let Some(filter) = self.filter.as_mut() {
                // Nothing to repeat yet: always process, but remember the frame.
                let (device, dtype) = self.stream.device_dtype();
                let x = stream::images_from_rgb(&[&input.data], p.width, p.height, dtype, device)?;
                filter.should_process(&x)?;
            }
        }
        self.pending.push(input.clone());
        if self.pending.len() < self.stream.frames_per_call() {
            return Ok(());
        }
        let r = self.run(out);
        if r.is_err() {
            self.pending.clear();
        }
        r
    }

    fn apply(&mut self, p: &Profile) -> Result<()> {
        let params = stream_params(p);
        if params != *self.stream.params() || p.stream.noise_file != self.noise_file {
            // Shape-changing settings: prepare a new stream over the same model; the old one
            // keeps running if that fails.
            let next = StreamDiffusion::prepare(
                self.stream.model().clone(),
                params,
                live_params(p),
                &p.prompt,
                &p.negative_prompt,
                make_noise(p)?,
            )?;
            self.stream = next;
            self.pending.clear();
            self.prompt = p.prompt.clone();
            self.negative = p.negative_prompt.clone();
            self.noise_file = p.stream.noise_file.clone();
            tracing::info!("stream prepared again: {}", self.name());
        } else {
            if live_params(p) != self.stream.live() {
                self.stream.set_live(live_params(p))?;
            }
            if p.prompt != self.prompt || p.negative_prompt != self.negative {
                self.stream.set_prompts(
                    &p.prompt,
                    &p.negative_prompt,
                    p.stream.prompt_blend_frames,
                )?;
                self.prompt = p.prompt.clone();
                self.negative = p.negative_prompt.clone();
            }
        }
        self.blend_frames = p.stream.prompt_blend_frames;
        match (filter_settings(p), self.filter.as_mut()) {
            (Some(s), Some(f)) => f.set_settings(s),
            (Some(s), None) => self.filter = Some(SimilarityFilter::new(s, p.stream.seed)),
            (None, _) => self.filter = None,
        }
        Ok(())
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::fixture;
    use crate::profile::CfgType;
    use candle_core::{DType, Device, Tensor};

    fn model() -> Arc<StableDiffusion> {
        let mut m = ModelConfig {
            id: fixture("models/tiny-sd15").display().to_string(),
            tiny_vae: fixture("models/tiny-taesd").display().to_string(),
            ..Default::default()
        };
        m.lora.clear();
        Arc::new(load_model(&m).unwrap())
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
            stream_params(p),
            live_params(p),
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
        let mut t = DiffusionTransform::with_model(m, &p).unwrap();
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
        assert!(t.apply(&bad).is_err());
        assert_eq!(t.stream().params().t_index_list, vec![35]);
        out.clear();
        t.process_into(&frame(2), &mut out).unwrap();
        t.process_into(&frame(3), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        // A good change prepares again.
        let mut good = p.clone();
        good.stream.t_index_list = vec![30, 40];
        good.stream.frame_buffer_size = 1;
        t.apply(&good).unwrap();
        out.clear();
        t.process_into(&frame(4), &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn similarity_filter_answers_static_frames_from_the_last_output() {
        let m = model();
        let mut p = profile(&[35], CfgType::None);
        p.stream.similarity_filter = true;
        p.stream.max_skip_frame = 3;
        let mut t = DiffusionTransform::with_model(m, &p).unwrap();
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
        t.apply(&p).unwrap();
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
        let e = format!("{:#}", load_model(&m).err().unwrap());
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
        let model = Arc::new(load_model(&m).unwrap());
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
        let mut t = DiffusionTransform::with_model(m, &p).unwrap();
        let mut out = Vec::new();
        t.process_into(&frame(0), &mut out).unwrap();
        t.process_into(&frame(0), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        // Fresh latents every call: two different pictures from the same input.
        assert_ne!(out[0].data, out[1].data);
    }
}
