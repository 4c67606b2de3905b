//! The StreamDiffusion core on tensors: Stream Batch denoising with a latent buffer carried
//! between frames, residual classifier-free guidance (R-CFG), and everything pre-computed once
//! per prompt/settings (embeddings, cross-attention K/V, noise, α/β, c_skip/c_out).
//!
//! It computes what `streamdiffusion` 0.1.1's `StreamDiffusion` computes (checked against its
//! outputs in `tests/stream_golden.rs`), with these deliberate differences, each documented where
//! it happens:
//! * a prompt update rebuilds the negative prompt's embeddings too (the reference drops them);
//! * optional warm start (prime the latent buffer with the first frame instead of zeros);
//! * `frame_buffer_size > 1` with several steps, which the reference cannot run (its buffer
//!   shapes do not line up), shifts the latent buffer by whole frames.

use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::scheduler::{step_batch, StreamTensors};
use crate::model::sd::StableDiffusion;
use crate::model::unet::{Conditioning, ForwardOptions, FrameRefs, PromptKv, SelfAttnMode};
use serde::{Deserialize, Serialize};

use super::noise::Noise;

/// Residual classifier-free guidance (R-CFG, StreamDiffusion §3.3): how the negative
/// (unconditional) noise estimate is obtained. `none`: no guidance; `full`: a second U-Net pass on
/// the negative prompt per frame; `self`: the virtual residual noise from the previous step
/// (Stream Batch's own estimates); `initialize`: one negative pass at the first step, then self.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CfgType {
    /// No guidance (the guidance scale is taken as 1).
    None,
    /// Ordinary CFG: every frame also runs the U-Net on the negative prompt (twice the rows).
    Full,
    /// Self-negative R-CFG: the negative estimate is the virtual residual noise of the previous
    /// step, at no extra U-Net cost (`"self"` in profiles, as in `streamdiffusion`).
    #[serde(rename = "self")]
    SelfNeg,
    /// One negative-prompt pass for the first step's rows (`f` extra rows), then as `SelfNeg`.
    Initialize,
}

/// What the stream denoises from: the camera frame (`img2img`) or noise alone (`txt2img`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Each call encodes `f` input frames and denoises them ([`StreamDiffusion::img2img`]).
    Img2img,
    /// Each call denoises fresh noise latents ([`StreamDiffusion::txt2img`]); no input frames.
    Txt2img,
}

/// Everything that shapes a prepared stream (a change means preparing again).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamParams {
    /// Image width in pixels, a positive multiple of the model's `vae_scale_factor` (8); the
    /// latents are `width / 8` wide.
    pub width: usize,
    /// Image height in pixels, a positive multiple of the model's `vae_scale_factor` (8); the
    /// latents are `height / 8` high.
    pub height: usize,
    /// Whether calls take input frames (img2img) or only noise (txt2img).
    pub mode: StreamMode,
    /// Indices into the LCM schedule of `num_inference_steps`, one denoising step each
    /// (`k = t_index_list.len()` steps, at least one; each index `< num_inference_steps`).
    pub t_index_list: Vec<usize>,
    /// Length of the LCM timestep schedule the `t_index_list` indexes (diffusers'
    /// `LCMScheduler.set_timesteps(num_inference_steps)`).
    pub num_inference_steps: usize,
    /// Frames per call `f` (at least 1): every call takes and returns `f` images.
    pub frame_buffer_size: usize,
    /// Stream Batch (one U-Net call for all steps) or the sequential loop (for comparison).
    pub use_denoising_batch: bool,
    /// Re-noise the partially denoised latents with the pre-sampled noise (else scale only).
    pub do_add_noise: bool,
    /// How the negative (unconditional) estimate is obtained (R-CFG, paper §3.3).
    pub cfg_type: CfgType,
    /// Seed of the pre-sampled noise, the per-frame draws ([`Noise::seeded`]) and the similarity
    /// filter's skip draws.
    pub seed: u64,
    /// Fill the latent buffer from the first frame (k − 1 extra batch calls, once) so the first
    /// output is already an image; `false` starts from zeros as the reference does.
    pub warm_start: bool,
}

/// Settings that change without preparing again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveParams {
    /// Classifier-free guidance scale (ignored, i.e. 1, with [`CfgType::None`]); the negative
    /// rows are only computed when it is above 1.
    pub guidance_scale: f64,
    /// R-CFG's residual-noise multiplier δ (paper §3.3; `streamdiffusion`'s `delta`): scales
    /// the virtual residual noise used as the negative estimate by `SelfNeg`/`Initialize`.
    pub delta: f64,
    /// StreamBatch cross-frame self-attention (each sample also attends to the other samples
    /// of the batch).
    pub cross_frame_attention: bool,
}

/// A prepared stream over a loaded model (`streamdiffusion` 0.1.1's `StreamDiffusion` after
/// `prepare`): `k` denoising steps over `f` frames per call, latents `(·, 4, height/8, width/8)`,
/// images `(f, 3, height, width)` in −1..1. Prompts and [`LiveParams`] change in place; any
/// [`StreamParams`] change means [`StreamDiffusion::prepare`] again.
pub struct StreamDiffusion {
    model: Arc<StableDiffusion>,
    p: StreamParams,
    live: LiveParams,
    noise: Noise,
    /// Denoising steps `k` and frames per call `f`.
    k: usize,
    f: usize,
    latent_h: usize,
    latent_w: usize,
    /// Rows of the denoising batch: `k·f` (Stream Batch) or `f` (sequential).
    batch: usize,
    /// Effective guidance: 1 for `cfg_type = none`, as in the reference.
    guidance: f64,
    tables: StreamTensors,
    /// The per-step table columns, unrepeated (`[k,1,1,1]`), for the sequential loop.
    step_tables: StreamTensors,
    timesteps: Vec<u32>,
    init_noise: Tensor,
    stock_noise: Tensor,
    /// Partially denoised latents of earlier frames, `[(k−1)·f, 4, h, w]`; `None` = cold.
    buffer: Option<Tensor>,
    /// Prime the buffer at the next call even without `warm_start` ([`Self::restart_warm`]).
    prime_once: bool,
    cond: Tensor,
    uncond: Tensor,
    kv: PromptKv,
    /// Prompt blend in progress: (from cond, from uncond, frames done, total).
    blend: Option<Blend>,
}

struct Blend {
    from: (Tensor, Tensor),
    to: (Tensor, Tensor),
    done: u32,
    total: u32,
}

fn repeat_rows(t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        Ok(t.clone())
    } else {
        t.repeat((n, 1, 1))
    }
}

impl StreamDiffusion {
    /// Validates the settings, encodes both prompts, pre-computes the K/V cache, the noise and
    /// the scheduler tables (`StreamDiffusion.prepare` in `streamdiffusion/pipeline.py`).
    ///
    /// # Errors
    /// The size is not a positive multiple of the VAE scale factor, `t_index_list` is empty or
    /// out of the schedule, `frame_buffer_size` is 0, a noise file lacks a tensor of the needed
    /// shape, or a prompt does not encode (tokenizer or text-encoder failure).
    pub fn prepare(
        model: Arc<StableDiffusion>,
        p: StreamParams,
        live: LiveParams,
        prompt: &str,
        negative_prompt: &str,
        noise: Noise,
    ) -> Result<Self> {
        let vsf = model.vae_scale_factor;
        if p.width == 0
            || p.height == 0
            || !p.width.is_multiple_of(vsf)
            || !p.height.is_multiple_of(vsf)
        {
            bail!(
                "stream size {}x{} must be a positive multiple of {vsf} in both directions",
                p.width,
                p.height
            );
        }
        let k = p.t_index_list.len();
        let f = p.frame_buffer_size;
        if k == 0 {
            bail!("stream.t_index_list is empty");
        }
        if f == 0 {
            bail!("stream.frame_buffer_size must be at least 1");
        }
        let st = model
            .scheduler
            .stream_tables(p.num_inference_steps, &p.t_index_list)
            .context("stream.t_index_list / num_inference_steps")?;
        let (dtype, device) = (model.dtype, model.device.clone());
        let tables = st.to_tensors(f, p.use_denoising_batch, dtype, &device)?;
        let step_tables = st.to_tensors(1, false, dtype, &device)?;
        let batch = if p.use_denoising_batch { k * f } else { f };
        let (latent_h, latent_w) = (p.height / vsf, p.width / vsf);
        let mut noise = noise;
        let init_noise = noise.init_noise([batch, 4, latent_h, latent_w], dtype, &device)?;
        let stock_noise = init_noise.zeros_like()?;
        let cond = model.encode_prompt(prompt)?;
        let uncond = model.encode_prompt(negative_prompt)?;
        let guidance = if p.cfg_type == CfgType::None {
            1.0
        } else {
            live.guidance_scale
        };
        let mut s = Self {
            kv: model.unet.precompute_prompt_kv(&cond)?,
            model,
            k,
            f,
            latent_h,
            latent_w,
            batch,
            guidance,
            tables,
            step_tables,
            timesteps: st.sub_timesteps.clone(),
            init_noise,
            stock_noise,
            buffer: None,
            prime_once: false,
            cond,
            uncond,
            blend: None,
            p,
            live,
            noise,
        };
        s.rebuild_kv()?;
        Ok(s)
    }

    /// The settings this stream was prepared with.
    pub fn params(&self) -> &StreamParams {
        &self.p
    }

    /// The live settings in effect (as last given to [`Self::prepare`] or [`Self::set_live`]).
    pub fn live(&self) -> LiveParams {
        self.live
    }

    /// The model the stream runs on (shared; a re-prepare can reuse it).
    pub fn model(&self) -> &Arc<StableDiffusion> {
        &self.model
    }

    /// Frames consumed and produced per call.
    pub fn frames_per_call(&self) -> usize {
        self.f
    }

    /// How many frames a call's outputs trail its inputs: `(k − 1)·f` in Stream Batch with
    /// several steps (a frame enters the batch at the first step and leaves it `k − 1` calls
    /// later, paper §3.2), 0 for one step or the sequential loop. The first `lag_frames`
    /// outputs after [`StreamDiffusion::prepare`] or [`StreamDiffusion::restart`] are warm-up:
    /// the first frame again with a warm start, the zero-initialised buffer without one.
    pub fn lag_frames(&self) -> usize {
        if self.p.use_denoising_batch {
            (self.k - 1) * self.f
        } else {
            0
        }
    }

    /// Empties the latent buffer and the stock noise, so the next call starts as after
    /// `prepare` (primed again with a warm start). Used after a flush at the end of a stream.
    ///
    /// # Errors
    /// Only a tensor allocation failure on the model's device.
    pub fn restart(&mut self) -> Result<()> {
        self.buffer = None;
        self.stock_noise = self.stock_noise.zeros_like()?;
        Ok(())
    }

    /// [`StreamDiffusion::restart`], and the next call primes the buffer from its frame as
    /// `warm_start` does, whatever `warm_start` says: a stream resuming after a pause (the
    /// on-demand camera waking) shows no zero-buffer warm-up frames.
    ///
    /// # Errors
    /// Only a tensor allocation failure on the model's device.
    pub fn restart_warm(&mut self) -> Result<()> {
        self.restart()?;
        self.prime_once = true;
        Ok(())
    }

    /// Rows of one U-Net call in Stream Batch mode, including CFG's extra rows.
    pub fn unet_batch(&self) -> usize {
        let gs = self.guidance > 1.0;
        match self.p.cfg_type {
            CfgType::Full if gs => 2 * self.batch,
            CfgType::Initialize if gs => self.batch + self.f,
            _ => self.batch,
        }
    }

    /// Whether the U-Net's negative rows are in use (R-CFG `full`/`initialize` with guidance).
    fn uses_negative_rows(&self) -> bool {
        self.guidance > 1.0 && matches!(self.p.cfg_type, CfgType::Full | CfgType::Initialize)
    }

    /// The prompt rows the U-Net sees, in the reference's layout: `cond × batch`, preceded by
    /// `uncond × batch` (`full`) or `uncond × f` (`initialize`). Rows that are all the same
    /// prompt are kept as one (broadcast by the U-Net), which computes the same.
    fn rebuild_kv(&mut self) -> Result<()> {
        let (cond, uncond) = (&self.cond, &self.uncond);
        let kv = if self.uses_negative_rows() {
            let n_uncond = match self.p.cfg_type {
                CfgType::Full => self.batch,
                _ => self.f,
            };
            let rows = Tensor::cat(
                &[
                    repeat_rows(uncond, n_uncond)?,
                    repeat_rows(cond, self.batch)?,
                ],
                0,
            )?;
            self.model.unet.precompute_prompt_kv(&rows)?
        } else {
            self.model.unet.precompute_prompt_kv(cond)?
        };
        self.kv = kv;
        Ok(())
    }

    /// Replaces both prompts. Buffers and noise stay, so the picture morphs instead of
    /// restarting. With `blend_frames > 0` the embeddings are interpolated over that many calls.
    ///
    /// # Errors
    /// A prompt does not encode, or the cross-attention K/V cannot be rebuilt; the previous
    /// prompts then stay in effect.
    pub fn set_prompts(&mut self, prompt: &str, negative: &str, blend_frames: u32) -> Result<()> {
        let cond = self.model.encode_prompt(prompt)?;
        let uncond = self.model.encode_prompt(negative)?;
        if blend_frames > 0 {
            self.blend = Some(Blend {
                from: (self.cond.clone(), self.uncond.clone()),
                to: (cond, uncond),
                done: 0,
                total: blend_frames,
            });
            return Ok(());
        }
        let (old_c, old_u) = (
            std::mem::replace(&mut self.cond, cond),
            std::mem::replace(&mut self.uncond, uncond),
        );
        self.blend = None;
        if let Err(e) = self.rebuild_kv() {
            self.cond = old_c;
            self.uncond = old_u;
            return Err(e);
        }
        Ok(())
    }

    /// Changes guidance scale, delta and the attention mode.
    ///
    /// # Errors
    /// Rebuilding the K/V cache fails (only when the guidance scale crosses 1, which adds or
    /// drops the negative rows); the previous live settings then stay in effect.
    pub fn set_live(&mut self, live: LiveParams) -> Result<()> {
        let before = self.uses_negative_rows();
        let old = (self.live, self.guidance);
        self.live = live;
        self.guidance = if self.p.cfg_type == CfgType::None {
            1.0
        } else {
            live.guidance_scale
        };
        if before != self.uses_negative_rows() {
            if let Err(e) = self.rebuild_kv() {
                (self.live, self.guidance) = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Advances a prompt blend by one frame.
    fn step_blend(&mut self) -> Result<()> {
        let Some(b) = &mut self.blend else {
            return Ok(());
        };
        b.done += 1;
        let t = (b.done as f64 / b.total as f64).min(1.0);
        let lerp =
            |a: &Tensor, z: &Tensor| -> candle_core::Result<Tensor> { (a * (1.0 - t))? + (z * t)? };
        let cond = lerp(&b.from.0, &b.to.0)?;
        let uncond = lerp(&b.from.1, &b.to.1)?;
        if b.done >= b.total {
            self.blend = None;
        }
        self.cond = cond;
        self.uncond = uncond;
        self.rebuild_kv()
    }

    fn forward_opts(&self) -> ForwardOptions {
        ForwardOptions {
            self_attn: if self.live.cross_frame_attention {
                SelfAttnMode::CrossFrame(FrameRefs::AllOthers)
            } else {
                SelfAttnMode::Normal
            },
        }
    }

    /// Encodes images `[f, 3, H, W]` in −1..1 and noises them to the first step:
    /// `√ᾱ₀·z + √(1−ᾱ₀)·ε₀` with the first pre-sampled noise row for every frame (as the
    /// reference does). Returns latents `(f, 4, height/8, width/8)`.
    ///
    /// # Errors
    /// The VAE encoder fails (wrong shape, dtype or device).
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let z = self.model.vae.encode(&images.to_dtype(self.model.dtype)?)?;
        let a = self.tables.alpha_prod_t_sqrt.get(0)?;
        let b = self.tables.beta_prod_t_sqrt.get(0)?;
        let eps = self.init_noise.get(0)?;
        Ok(z.broadcast_mul(&a)?
            .add(&eps.broadcast_mul(&b)?.broadcast_as(z.shape())?)?)
    }

    /// Decodes latents `(n, 4, height/8, width/8)` to images `(n, 3, height, width)`, nominally
    /// in −1..1 (not clamped).
    ///
    /// # Errors
    /// The VAE decoder fails (wrong shape, dtype or device).
    pub fn decode_image(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.model.vae.decode(latents)?)
    }

    /// One img2img call: `f` images `(f, 3, height, width)` in −1..1 → `f` images of the same
    /// shape (the first [`Self::lag_frames`] outputs are warm-up).
    ///
    /// # Errors
    /// The input's shape is not `(f, 3, height, width)`, or a model call fails.
    pub fn img2img(&mut self, images: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = images.dims4()?;
        if n != self.f || c != 3 || h != self.p.height || w != self.p.width {
            bail!(
                "img2img input is {n}x{c}x{h}x{w}; this stream takes {}x3x{}x{}",
                self.f,
                self.p.height,
                self.p.width
            );
        }
        let x_t = self.encode_image(images)?;
        let x0 = self.predict_x0(&x_t)?;
        self.decode_image(&x0)
    }

    /// One txt2img call: fresh random latents (or the noise file's) → `f` images
    /// `(f, 3, height, width)` in −1..1.
    ///
    /// # Errors
    /// The noise file has no usable `latents`, or a model call fails.
    pub fn txt2img(&mut self) -> Result<Tensor> {
        let x_t = self.noise.latents(
            [self.f, 4, self.latent_h, self.latent_w],
            self.model.dtype,
            &self.model.device,
        )?;
        let x0 = self.predict_x0(&x_t)?;
        self.decode_image(&x0)
    }

    /// `predict_x0_batch` (`streamdiffusion/pipeline.py`, paper §3.2), with the warm start and
    /// the prompt blend around it: noisy latents `(f, 4, height/8, width/8)` at the first step →
    /// denoised latents of the same shape (those of the frame leaving the batch).
    ///
    /// # Errors
    /// `x_t` does not match the buffer's shape, or a U-Net/scheduler call fails.
    pub fn predict_x0(&mut self, x_t: &Tensor) -> Result<Tensor> {
        self.step_blend()?;
        if !self.p.use_denoising_batch {
            return self.predict_sequential(x_t);
        }
        if self.k > 1 && self.buffer.is_none() && (self.p.warm_start || self.prime_once) {
            self.prime_once = false;
            // Prime: run the batch k − 1 times on the first frame so every buffer row holds
            // that frame at its own noise level; the output that follows is already an image.
            self.buffer = Some(Tensor::zeros(
                ((self.k - 1) * self.f, 4, self.latent_h, self.latent_w),
                self.model.dtype,
                &self.model.device,
            )?);
            for _ in 0..self.k - 1 {
                self.predict_batch(x_t)?;
            }
        }
        self.predict_batch(x_t)
    }

    /// Stream Batch: the new frames enter at step 0, the buffer holds steps 1..k of earlier
    /// frames, and one U-Net call denoises all of them.
    fn predict_batch(&mut self, x_t: &Tensor) -> Result<Tensor> {
        let (k, f) = (self.k, self.f);
        let x = if k > 1 {
            let buf = match &self.buffer {
                Some(b) => b.clone(),
                None => Tensor::zeros(
                    ((k - 1) * f, 4, self.latent_h, self.latent_w),
                    self.model.dtype,
                    &self.model.device,
                )?,
            };
            // The stock noise moves on with its frames (the reference shifts by one row, which
            // is one frame for f = 1; it cannot run f > 1 with several steps).
            self.stock_noise = Tensor::cat(
                &[
                    self.init_noise.narrow(0, 0, f)?,
                    self.stock_noise.narrow(0, 0, self.batch - f)?,
                ],
                0,
            )?;
            Tensor::cat(&[x_t, &buf], 0)?
        } else {
            x_t.clone()
        };
        let t = self.tables.sub_timesteps.clone();
        let (x0, _) = self.unet_step(&x, &t, None)?;
        let n = x0.dim(0)?;
        if k > 1 {
            let a = self.tables.alpha_prod_t_sqrt.narrow(0, f, n - f)?;
            let mut next = x0.narrow(0, 0, n - f)?.broadcast_mul(&a)?;
            if self.p.do_add_noise {
                let b = self.tables.beta_prod_t_sqrt.narrow(0, f, n - f)?;
                next = next.add(&self.init_noise.narrow(0, f, n - f)?.broadcast_mul(&b)?)?;
            }
            self.buffer = Some(next);
            Ok(x0.narrow(0, n - f, f)?)
        } else {
            Ok(x0)
        }
    }

    /// The sequential loop (`use_denoising_batch = false`): one U-Net call per step, as the
    /// reference does it — including that it stores each call's input latent as `init_noise`,
    /// so the next frame's encode noise is the previous frame's noisy latent.
    fn predict_sequential(&mut self, x_t: &Tensor) -> Result<Tensor> {
        self.init_noise = x_t.clone();
        let mut x = x_t.clone();
        let mut x0 = None;
        for idx in 0..self.k {
            let t = Tensor::from_vec(
                vec![self.timesteps[idx]; self.f],
                self.f,
                &self.model.device,
            )?;
            let (pred_x0, _) = self.unet_step(&x, &t, Some(idx))?;
            if idx + 1 < self.k {
                let a = self.step_tables.alpha_prod_t_sqrt.get(idx + 1)?;
                x = pred_x0.broadcast_mul(&a)?;
                if self.p.do_add_noise {
                    let b = self.step_tables.beta_prod_t_sqrt.get(idx + 1)?;
                    let eps = self.noise.step_noise(
                        idx,
                        [self.f, 4, self.latent_h, self.latent_w],
                        self.model.dtype,
                        &self.model.device,
                    )?;
                    x = x.add(&eps.broadcast_mul(&b)?)?;
                }
            }
            x0 = Some(pred_x0);
        }
        x0.context("no denoising steps")
    }

    /// One U-Net call with R-CFG and the LCM boundary-condition step. `idx` selects one step's
    /// tables (sequential mode); `None` uses the whole batch's. Returns (x0, model_pred).
    fn unet_step(
        &mut self,
        x: &Tensor,
        t: &Tensor,
        idx: Option<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let f = self.f;
        let gs = self.guidance > 1.0;
        let cfg = self.p.cfg_type;
        let (x_in, t_in) = match cfg {
            CfgType::Initialize if gs => (
                Tensor::cat(&[&x.narrow(0, 0, f)?, x], 0)?,
                Tensor::cat(&[&t.narrow(0, 0, f)?, t], 0)?,
            ),
            CfgType::Full if gs => (Tensor::cat(&[x, x], 0)?, Tensor::cat(&[t, t], 0)?),
            _ => (x.clone(), t.clone()),
        };
        let pred = self
            .model
            .unet
            .forward_ext(
                &x_in,
                &t_in,
                Conditioning::PromptKv(&self.kv),
                &self.forward_opts(),
            )
            .context("U-Net")?;
        let rows = x.dim(0)?;
        let text = match cfg {
            CfgType::Initialize if gs => {
                // The unconditional prediction of the newest frame becomes its stock noise.
                let first = pred.narrow(0, 0, f)?;
                let rest_n = self.stock_noise.dim(0)? - f;
                self.stock_noise = if rest_n > 0 {
                    Tensor::cat(&[&first, &self.stock_noise.narrow(0, f, rest_n)?], 0)?
                } else {
                    first
                };
                pred.narrow(0, f, rows)?
            }
            CfgType::Full if gs => pred.narrow(0, rows, rows)?,
            _ => pred.clone(),
        };
        let model_pred = if gs && cfg != CfgType::None {
            let uncond = match cfg {
                CfgType::Full => pred.narrow(0, 0, rows)?,
                _ => self.stock_noise.affine(self.live.delta, 0.0)?,
            };
            (&uncond + ((&text - &uncond)? * self.guidance)?)?
        } else {
            text
        };

        let tables = match idx {
            Some(i) => self.step_row(i)?,
            None => self.tables.clone(),
        };
        let denoised = step_batch(x, &model_pred, &tables)?;
        if idx.is_none() && matches!(cfg, CfgType::SelfNeg | CfgType::Initialize) {
            self.update_stock_noise(&model_pred, &tables)?;
        }
        Ok((denoised, model_pred))
    }

    /// The residual-noise update of self-negative / one-time-negative R-CFG (reference
    /// `unet_step`): the stock noise for the next call is the next step's pre-sampled noise plus
    /// the part of this step's prediction it did not explain, rescaled to the next noise level.
    /// Rows shift by one, as in the reference (= one frame for `frame_buffer_size = 1`); with
    /// several steps and several frames per call, by one frame.
    fn update_stock_noise(&mut self, model_pred: &Tensor, tables: &StreamTensors) -> Result<()> {
        let n = self.batch;
        let s = if self.k > 1 { self.f } else { 1 };
        let scaled = self.stock_noise.broadcast_mul(&tables.beta_prod_t_sqrt)?;
        let delta_x = step_batch(&scaled, model_pred, tables)?;
        let ones = Tensor::ones((s, 1, 1, 1), self.model.dtype, &self.model.device)?;
        let next = |col: &Tensor| -> candle_core::Result<Tensor> {
            Tensor::cat(&[&col.narrow(0, s, n - s)?, &ones], 0)
        };
        let alpha_next = next(&tables.alpha_prod_t_sqrt)?;
        let beta_next = next(&tables.beta_prod_t_sqrt)?;
        let delta_x = delta_x
            .broadcast_mul(&alpha_next)?
            .broadcast_div(&beta_next)?;
        let rolled = Tensor::cat(
            &[
                &self.init_noise.narrow(0, s, n - s)?,
                &self.init_noise.narrow(0, 0, s)?,
            ],
            0,
        )?;
        self.stock_noise = (rolled + delta_x)?;
        Ok(())
    }

    /// One step's tables as `[1,1,1,1]` columns (broadcast over the frames).
    fn step_row(&self, i: usize) -> Result<StreamTensors> {
        let st = &self.step_tables;
        Ok(StreamTensors {
            sub_timesteps: st.sub_timesteps.narrow(0, i, 1)?,
            alpha_prod_t_sqrt: st.alpha_prod_t_sqrt.narrow(0, i, 1)?,
            beta_prod_t_sqrt: st.beta_prod_t_sqrt.narrow(0, i, 1)?,
            c_skip: st.c_skip.narrow(0, i, 1)?,
            c_out: st.c_out.narrow(0, i, 1)?,
        })
    }

    /// Latent size `(height / 8, width / 8)` (height first).
    pub fn latent_size(&self) -> (usize, usize) {
        (self.latent_h, self.latent_w)
    }

    /// The device and dtype the stream computes in.
    pub fn device_dtype(&self) -> (&Device, DType) {
        (&self.model.device, self.model.dtype)
    }
}

/// RGB24 pixels (`H·W·3`, row-major) of `n` frames → `(n, 3, H, W)` in −1..1, in `dtype` on
/// `device` (diffusers' `VaeImageProcessor.preprocess`: `x / 255 · 2 − 1`).
///
/// # Errors
/// A frame is not exactly `width · height · 3` bytes, or the tensor cannot be moved to `device`.
pub fn images_from_rgb(
    frames: &[&[u8]],
    width: usize,
    height: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = frames.len();
    let mut data = Vec::with_capacity(n * 3 * width * height);
    for f in frames {
        if f.len() != width * height * 3 {
            bail!(
                "frame has {} bytes, expected {}x{}x3",
                f.len(),
                width,
                height
            );
        }
        data.extend(f.iter().map(|&v| v as f32 / 255.0));
    }
    let t = Tensor::from_vec(data, (n, height, width, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .affine(2.0, -1.0)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok(t)
}

/// `[n, 3, H, W]` in −1..1 → RGB24 pixels per frame, as diffusers' postprocess does:
/// `(x/2 + 0.5).clamp(0, 1) · 255`, rounded.
///
/// # Errors
/// `images` is not 4-dimensional with 3 channels, or cannot be read back to the CPU.
pub fn rgb_from_images(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (n, c, _, _) = images.dims4()?;
    if c != 3 {
        bail!("expected 3 channels, got {c}");
    }
    let x = images
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let v = x.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        out.push(v.iter().map(|&p| (p * 255.0).round() as u8).collect());
    }
    Ok(out)
}
