//! LCM scheduler math (diffusers 0.24 `LCMScheduler`) and the per-`t_index_list` tables that
//! StreamDiffusion 0.1.1 `prepare()` precomputes.
//!
//! Everything here is precomputed once on the host in `f32` exactly as torch does it (betas via an
//! f32 `linspace`, `alphas_cumprod` as a cumulative product), then turned into small tensors; the
//! per-frame work is `step_batch`, the `scheduler_step_batch` of StreamDiffusion:
//! `denoised = c_out · (x_t − √β·ε) / √α + c_skip · x_t`.

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::model::config::{self, refuse_if, ComponentConfig, Unsupported};

/// `sigma_data` of the LCM boundary condition (hard-coded in diffusers).
const SIGMA_DATA: f32 = 0.5;

/// `scheduler/scheduler_config.json`, read the way `LCMScheduler.from_config` reads it: the keys
/// of diffusers 0.24's `LCMScheduler.__init__`; keys of the file's own class (sd-turbo's
/// `EulerDiscreteScheduler`: `timestep_spacing`, `use_karras_sigmas`, …; SD 1.5's
/// `PNDMScheduler`: `skip_prk_steps`) are ignored, as `from_config` ignores them, and absent or
/// `null` keys take the `LCMScheduler` defaults. StreamDiffusion computes its own LCM step from
/// the betas, so `clip_sample`, `thresholding`, `timestep_spacing` and `steps_offset` do not
/// change its computation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub(crate) num_train_timesteps: usize,
    pub(crate) beta_start: f64,
    pub(crate) beta_end: f64,
    pub(crate) beta_schedule: String,
    /// Explicit betas (bypass `beta_schedule`).
    pub(crate) trained_betas: Option<Vec<f64>>,
    pub(crate) original_inference_steps: usize,
    pub(crate) timestep_scaling: f64,
    /// What the U-Net predicts; only `epsilon` (noise) is supported, anything else (e.g.
    /// `v_prediction`, stable-diffusion-2-1 at 768²) is refused by the config check.
    pub prediction_type: String,
    /// Used by diffusers' own LCM `step` only (not by StreamDiffusion's); read for completeness.
    pub(crate) set_alpha_to_one: bool,
    pub(crate) rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    /// diffusers 0.24 `LCMScheduler()` defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            prediction_type: "epsilon".into(),
            set_alpha_to_one: true,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The most training timesteps accepted (real models have 1000; the tables are per timestep).
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl ComponentConfig for SchedulerConfig {
    const KIND: &'static str = "scheduler";
    const NULL_IS_FALSE: &'static [&'static str] = &["set_alpha_to_one"];

    fn check(&self) -> std::result::Result<(), Unsupported> {
        refuse_if(
            self.prediction_type != "epsilon",
            "prediction_type",
            &self.prediction_type,
            "only epsilon is implemented (StreamDiffusion's LCM step assumes an epsilon-predicting \
             U-Net; v-prediction models such as stable-diffusion-2-1 at 768² are not supported)",
        )?;
        refuse_if(
            self.rescale_betas_zero_snr,
            "rescale_betas_zero_snr",
            true,
            "only false is implemented",
        )?;
        let n = self.num_train_timesteps;
        refuse_if(
            !(2..=MAX_TRAIN_TIMESTEPS).contains(&n),
            "num_train_timesteps",
            n,
            format!("must be from 2 to {MAX_TRAIN_TIMESTEPS}"),
        )?;
        match &self.trained_betas {
            Some(b) => refuse_if(
                b.len() != n,
                "trained_betas",
                format!("a list of {} entries", b.len()),
                format!("needs num_train_timesteps ({n}) entries"),
            )?,
            None => refuse_if(
                !matches!(
                    self.beta_schedule.as_str(),
                    "linear" | "scaled_linear" | "squaredcos_cap_v2"
                ),
                "beta_schedule",
                &self.beta_schedule,
                "only linear, scaled_linear and squaredcos_cap_v2 are implemented",
            )?,
        }
        let o = self.original_inference_steps;
        refuse_if(
            o == 0 || o > n,
            "original_inference_steps",
            o,
            format!("must be in 1..={n} (num_train_timesteps)"),
        )
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the CPU kernel computes it: `f32` step,
/// first half counted from `start`, second half from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine, max_beta 0.999), in f64 then cast to f32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The LCM scheduler: config plus precomputed `alphas_cumprod`.
#[derive(Debug, Clone)]
pub(crate) struct LcmScheduler {
    pub(crate) config: SchedulerConfig,
    /// `alphas_cumprod[t]` for every train timestep `t` (f32, as torch).
    pub(crate) alphas_cumprod: Vec<f32>,
}

impl LcmScheduler {
    /// Builds the scheduler; fails (with the reason) on configurations sdcam does not implement.
    pub(crate) fn new(config: SchedulerConfig) -> Result<Self> {
        config
            .check()
            .map_err(|u| anyhow::anyhow!("unsupported scheduler config: {u}"))?;
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = if let Some(b) = &config.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
                "scaled_linear" => linspace_f32(
                    config.beta_start.sqrt() as f32,
                    config.beta_end.sqrt() as f32,
                    n,
                )
                .into_iter()
                .map(|b| b * b)
                .collect(),
                "squaredcos_cap_v2" => betas_for_alpha_bar(n),
                other => bail!("scheduler beta_schedule {other:?} (refused by the config check)"),
            }
        };
        // torch.cumprod on the CPU accumulates float32 in double and rounds every output.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
        })
    }

    /// Reads `scheduler_config.json` ([`crate::model::config::load`]) and builds the scheduler.
    pub(crate) fn from_config_file(path: &std::path::Path) -> Result<Self> {
        Self::new(config::load(path)?)
    }

    /// `LCMScheduler.set_timesteps(n).timesteps` (diffusers 0.24, strength 1): evenly spaced
    /// indices into the reversed `original_inference_steps` schedule. n=50 → 999, 979, …, 19;
    /// n=4 → [999, 759, 499, 259].
    pub(crate) fn lcm_timesteps(&self, num_inference_steps: usize) -> Result<Vec<u32>> {
        let original = self.config.original_inference_steps;
        let train = self.config.num_train_timesteps;
        if original == 0 || original > train {
            bail!("scheduler original_inference_steps {original} must be in 1..={train}");
        }
        if num_inference_steps == 0 || num_inference_steps > original {
            bail!(
                "num_inference_steps {num_inference_steps} must be in 1..={original} \
                 (the scheduler's original_inference_steps)"
            );
        }
        let k = train / original;
        // lcm_origin_timesteps = [1..=original] * k - 1, reversed.
        let origin: Vec<u32> = (1..=original).rev().map(|i| (i * k - 1) as u32).collect();
        let len = origin.len();
        Ok((0..num_inference_steps)
            .map(|i| {
                // np.floor(np.linspace(0, len, n, endpoint=False)): i * len / n in float64.
                let idx = (i as f64 * (len as f64 / num_inference_steps as f64)).floor() as usize;
                origin[idx.min(len - 1)]
            })
            .collect())
    }

    /// `get_scalings_for_boundary_condition_discrete(t)` → `(c_skip, c_out)` in f32.
    pub(crate) fn scalings(&self, timestep: u32) -> (f32, f32) {
        let scaled = timestep as f32 * self.config.timestep_scaling as f32;
        let sd2 = SIGMA_DATA * SIGMA_DATA;
        let denom = scaled * scaled + sd2;
        (sd2 / denom, scaled / denom.sqrt())
    }

    /// `(√ᾱ_t, √(1 − ᾱ_t))` in f32.
    pub(crate) fn alpha_beta_sqrt(&self, timestep: u32) -> Result<(f32, f32)> {
        let a = *self
            .alphas_cumprod
            .get(timestep as usize)
            .with_context(|| format!("timestep {timestep} out of range"))?;
        Ok((a.sqrt(), (1.0 - a).sqrt()))
    }

    /// The tables StreamDiffusion `prepare()` builds for `t_index_list` after
    /// `set_timesteps(num_inference_steps)`.
    pub(crate) fn stream_tables(
        &self,
        num_inference_steps: usize,
        t_index_list: &[usize],
    ) -> Result<StreamTables> {
        let timesteps = self.lcm_timesteps(num_inference_steps)?;
        if t_index_list.is_empty() {
            bail!("t_index_list is empty");
        }
        let mut t = StreamTables::default();
        for &i in t_index_list {
            let ts = *timesteps.get(i).with_context(|| {
                format!(
                    "t_index_list entry {i} is out of range for {num_inference_steps} inference \
                     steps (valid: 0..{num_inference_steps})"
                )
            })?;
            let (a, b) = self.alpha_beta_sqrt(ts)?;
            let (cs, co) = self.scalings(ts);
            t.sub_timesteps.push(ts);
            t.alpha_prod_t_sqrt.push(a);
            t.beta_prod_t_sqrt.push(b);
            t.c_skip.push(cs);
            t.c_out.push(co);
        }
        Ok(t)
    }
}

/// StreamDiffusion's per-denoising-step tables, one entry per `t_index_list` element.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StreamTables {
    pub(crate) sub_timesteps: Vec<u32>,
    pub(crate) alpha_prod_t_sqrt: Vec<f32>,
    pub(crate) beta_prod_t_sqrt: Vec<f32>,
    pub(crate) c_skip: Vec<f32>,
    pub(crate) c_out: Vec<f32>,
}

/// [`StreamTables`] as device tensors, laid out for the denoising batch.
#[derive(Debug, Clone)]
pub(crate) struct StreamTensors {
    /// `sub_timesteps_tensor` (u32 `[k·r]`).
    pub(crate) sub_timesteps: Tensor,
    /// `[k·r, 1, 1, 1]`
    pub(crate) alpha_prod_t_sqrt: Tensor,
    /// `[k·r, 1, 1, 1]`
    pub(crate) beta_prod_t_sqrt: Tensor,
    /// `[k·r, 1, 1, 1]`
    pub(crate) c_skip: Tensor,
    /// `[k·r, 1, 1, 1]`
    pub(crate) c_out: Tensor,
}

fn repeat_interleave<T: Copy>(v: &[T], r: usize) -> Vec<T> {
    v.iter().flat_map(|&x| std::iter::repeat_n(x, r)).collect()
}

impl StreamTables {
    /// The tensors StreamDiffusion keeps: every table `repeat_interleave`d by `frame_buffer_size`
    /// when `use_denoising_batch` (else by 1), floats shaped `[k·r, 1, 1, 1]` in `dtype`.
    ///
    /// StreamDiffusion 0.1.1 repeats `sub_timesteps`, `alpha_prod_t_sqrt` and
    /// `beta_prod_t_sqrt` but leaves `c_skip`/`c_out` at `[k,1,1,1]`, which only broadcasts for
    /// `frame_buffer_size == 1`; here they are repeated too (identical for a buffer of 1, and
    /// usable for larger buffers).
    pub(crate) fn to_tensors(
        &self,
        frame_buffer_size: usize,
        use_denoising_batch: bool,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<StreamTensors> {
        let r = if use_denoising_batch {
            frame_buffer_size.max(1)
        } else {
            1
        };
        let col = |v: &[f32]| -> candle_core::Result<Tensor> {
            let v = repeat_interleave(v, r);
            let n = v.len();
            Tensor::from_vec(v, (n, 1, 1, 1), device)?.to_dtype(dtype)
        };
        let ts = repeat_interleave(&self.sub_timesteps, r);
        let n = ts.len();
        Ok(StreamTensors {
            sub_timesteps: Tensor::from_vec(ts, n, device)?,
            alpha_prod_t_sqrt: col(&self.alpha_prod_t_sqrt)?,
            beta_prod_t_sqrt: col(&self.beta_prod_t_sqrt)?,
            c_skip: col(&self.c_skip)?,
            c_out: col(&self.c_out)?,
        })
    }
}

/// StreamDiffusion `scheduler_step_batch(model_pred, x_t, idx=None)`:
/// `c_out · (x_t − β·ε) / α + c_skip · x_t`, all tables broadcast over `[B, C, H, W]`.
pub(crate) fn step_batch(
    x_t: &Tensor,
    model_pred: &Tensor,
    tables: &StreamTensors,
) -> candle_core::Result<Tensor> {
    let f_theta = x_t
        .broadcast_sub(&model_pred.broadcast_mul(&tables.beta_prod_t_sqrt)?)?
        .broadcast_div(&tables.alpha_prod_t_sqrt)?;
    f_theta
        .broadcast_mul(&tables.c_out)?
        .add(&x_t.broadcast_mul(&tables.c_skip)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden_cpu as golden};
    use std::collections::HashMap;

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    fn i64s(t: &Tensor) -> Vec<i64> {
        t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    /// max |a−b| / max |b| over two host vectors.
    fn vrel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let s = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
        d / s
    }

    /// Element-wise relative error (for c_skip, which spans many magnitudes).
    fn elem_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                if *y == 0.0 {
                    x.abs()
                } else {
                    ((x - y) / y).abs()
                }
            })
            .fold(0f32, f32::max)
    }

    fn check(model: &str, golden_name: &str) {
        let sched = LcmScheduler::from_config_file(&fixture(&format!(
            "models/{model}/scheduler/scheduler_config.json"
        )))
        .unwrap();
        let g: HashMap<String, Tensor> = golden(golden_name);
        let ac = f32s(&g["alphas_cumprod"]);
        let e = elem_rel(&sched.alphas_cumprod, &ac);
        assert!(e <= 1e-6, "{golden_name} alphas_cumprod rel err {e}");

        // Scalings for every train timestep (c_skip compared element-wise relatively).
        let all_t = i64s(&g["all.timestep"]);
        let (cs, co): (Vec<f32>, Vec<f32>) =
            all_t.iter().map(|&t| sched.scalings(t as u32)).unzip();
        let e = elem_rel(&cs, &f32s(&g["all.c_skip"]));
        assert!(e <= 1e-5, "{golden_name} all.c_skip rel err {e}");
        let e = vrel(&co, &f32s(&g["all.c_out"]));
        assert!(e <= 1e-6, "{golden_name} all.c_out rel err {e}");

        for n in [50usize, 4] {
            let ts = sched.lcm_timesteps(n).unwrap();
            let gts: Vec<u32> = i64s(&g[&format!("n{n}.timesteps")])
                .iter()
                .map(|&t| t as u32)
                .collect();
            assert_eq!(ts, gts, "{golden_name} n{n} timesteps");
            let all: Vec<usize> = (0..n).collect();
            let tab = sched.stream_tables(n, &all).unwrap();
            for (name, ours) in [
                ("alpha_prod_t_sqrt", &tab.alpha_prod_t_sqrt),
                ("beta_prod_t_sqrt", &tab.beta_prod_t_sqrt),
                ("c_out", &tab.c_out),
            ] {
                let e = vrel(ours, &f32s(&g[&format!("n{n}.{name}")]));
                assert!(e <= 1e-6, "{golden_name} n{n}.{name} rel err {e}");
            }
            let e = elem_rel(&tab.c_skip, &f32s(&g[&format!("n{n}.c_skip")]));
            assert!(e <= 1e-5, "{golden_name} n{n}.c_skip rel err {e}");
        }

        // Every StreamDiffusion prepare() table in the golden.
        let mut prefixes: Vec<String> = g
            .keys()
            .filter_map(|k| k.strip_suffix(".t_index_list").map(str::to_string))
            .collect();
        prefixes.sort();
        assert!(
            prefixes.len() >= 6,
            "{golden_name}: expected t_index_list cases"
        );
        for p in prefixes {
            let n: usize = p[1..p.find('.').unwrap()].parse().unwrap();
            let tl: Vec<usize> = i64s(&g[&format!("{p}.t_index_list")])
                .iter()
                .map(|&i| i as usize)
                .collect();
            let tab = sched.stream_tables(n, &tl).unwrap();
            let tens = tab.to_tensors(1, true, DType::F32, &Device::Cpu).unwrap();
            let sub: Vec<i64> = tens
                .sub_timesteps
                .to_vec1::<u32>()
                .unwrap()
                .iter()
                .map(|&t| t as i64)
                .collect();
            assert_eq!(
                sub,
                i64s(&g[&format!("{p}.sub_timesteps")]),
                "{golden_name} {p}.sub_timesteps"
            );
            for (name, ours) in [
                ("alpha_prod_t_sqrt", &tens.alpha_prod_t_sqrt),
                ("beta_prod_t_sqrt", &tens.beta_prod_t_sqrt),
                ("c_out", &tens.c_out),
                ("c_skip", &tens.c_skip),
            ] {
                let gt = &g[&format!("{p}.{name}")];
                assert_eq!(ours.dims(), gt.dims(), "{golden_name} {p}.{name} shape");
                let e = if name == "c_skip" {
                    elem_rel(&f32s(ours), &f32s(gt))
                } else {
                    rel_err(ours, gt).unwrap()
                };
                assert!(e <= 1e-5, "{golden_name} {p}.{name} rel err {e}");
            }
            if let Some(x_t) = g.get(&format!("{p}.step.x_t")) {
                let eps = &g[&format!("{p}.step.model_pred")];
                let den = step_batch(x_t, eps, &tens).unwrap();
                let e = rel_err(&den, &g[&format!("{p}.step.denoised")]).unwrap();
                assert!(e <= 1e-5, "{golden_name} {p}.step rel err {e}");
            }
        }
    }

    #[test]
    fn lcm_sd15_matches_golden() {
        check("tiny-sd15", "lcm_sd15");
    }

    #[test]
    fn lcm_sd21_from_euler_config_matches_golden() {
        check("tiny-sd21", "lcm_sd21");
    }

    #[test]
    fn lcm_timesteps_known_values() {
        let s = LcmScheduler::new(SchedulerConfig::default()).unwrap();
        assert_eq!(s.lcm_timesteps(4).unwrap(), vec![999, 759, 499, 259]);
        let t50 = s.lcm_timesteps(50).unwrap();
        assert_eq!((t50[0], t50[1], t50[49]), (999, 979, 19));
        assert!(s.lcm_timesteps(51).is_err());
        assert!(s.stream_tables(4, &[4]).is_err());
    }

    #[test]
    fn frame_buffer_repeats_tables() {
        let s = LcmScheduler::new(SchedulerConfig::default()).unwrap();
        let t = s.stream_tables(50, &[32, 45]).unwrap();
        let x = t.to_tensors(3, true, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(x.alpha_prod_t_sqrt.dims(), &[6, 1, 1, 1]);
        assert_eq!(
            x.sub_timesteps.to_vec1::<u32>().unwrap(),
            vec![359, 359, 359, 99, 99, 99]
        );
        let y = t.to_tensors(3, false, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(y.c_out.dims(), &[2, 1, 1, 1]);
    }

    #[test]
    fn rejects_unsupported_configs() {
        let c = SchedulerConfig {
            prediction_type: "v_prediction".into(),
            ..Default::default()
        };
        let e = LcmScheduler::new(c).unwrap_err().to_string();
        assert!(e.contains("v_prediction"), "{e}");
        let c = SchedulerConfig {
            beta_schedule: "foo".into(),
            ..Default::default()
        };
        assert!(LcmScheduler::new(c).is_err());
        // squaredcos and linear build.
        for s in ["linear", "squaredcos_cap_v2"] {
            let c = SchedulerConfig {
                beta_schedule: s.into(),
                ..Default::default()
            };
            let sch = LcmScheduler::new(c).unwrap();
            assert!(sch.alphas_cumprod.iter().all(|a| a.is_finite() && *a > 0.0));
        }
    }
}
