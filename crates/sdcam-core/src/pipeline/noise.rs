//! Where the pipeline's random numbers come from: a seeded Gaussian generator, or tensors loaded
//! from a safetensors file so a run can be compared exactly with the Python reference.
//!
//! File layout (the one `scripts/reference/make_stream_goldens.py` writes):
//! `init_noise` `[batch, 4, h, w]` (pre-sampled once per prepare), `latents`
//! `[calls, frames, 4, h, w]` (txt2img inputs, one entry per call, cycled) and `step_noise`
//! `[calls, steps − 1, frames, 4, h, w]` (sequential mode's re-noising draws, cycled).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The source of every random tensor the stream uses.
#[derive(Debug)]
pub enum Noise {
    /// Standard normal from a seeded generator. `init` (re-seeded at every prepare) gives the
    /// pre-sampled noise, `live` the per-frame draws.
    Seeded {
        /// The seed (the pre-sampled noise is drawn from a generator seeded with it).
        seed: u64,
        /// The generator of the per-frame draws (txt2img latents, sequential re-noising).
        live: Box<StdRng>,
    },
    /// Tensors from a file, cycled.
    File {
        /// The file (for messages).
        path: PathBuf,
        /// `init_noise`, and optionally `latents` and `step_noise` (see the module docs).
        tensors: HashMap<String, Tensor>,
        /// Next entry of `latents` (dimension 0), wrapping around.
        latents_pos: usize,
        /// Next entry of `step_noise` (dimension 0), wrapping around.
        step_pos: usize,
    },
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

impl Noise {
    /// Standard-normal noise from `seed`: the pre-sampled noise is the same at every prepare,
    /// the per-frame draws come from a second stream derived from the same seed.
    pub fn seeded(seed: u64) -> Self {
        Noise::Seeded {
            seed,
            // A separate stream from the pre-sampled noise, so that changing how many frames
            // were drawn never changes `init_noise`.
            live: Box::new(StdRng::seed_from_u64(seed ^ 0x5dca_u64.rotate_left(40))),
        }
    }

    /// Loads `path` (see the module docs for its tensors; float tensors of any dtype, converted
    /// to the stream's dtype when drawn).
    ///
    /// # Errors
    /// The file cannot be read as safetensors, or has no `init_noise` tensor.
    pub fn from_file(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading noise file {}", path.display()))?;
        if !tensors.contains_key("init_noise") {
            bail!(
                "noise file {} has no `init_noise` tensor (expected init_noise, and optionally \
                 latents and step_noise)",
                path.display()
            );
        }
        Ok(Noise::File {
            path: path.to_path_buf(),
            tensors,
            latents_pos: 0,
            step_pos: 0,
        })
    }

    /// The pre-sampled noise `[batch, c, h, w]` (the same every time for the same seed/file).
    pub(crate) fn init_noise(
        &mut self,
        shape: [usize; 4],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self {
            Noise::Seeded { seed, .. } => {
                let mut rng = StdRng::seed_from_u64(*seed);
                let n = shape.iter().product();
                Tensor::from_vec(normal(&mut rng, n), shape.to_vec(), &Device::Cpu)?
            }
            Noise::File { path, tensors, .. } => {
                let t = tensors["init_noise"].clone();
                if t.dims() != shape {
                    bail!(
                        "noise file {}: init_noise is {:?} but this stream needs {:?} \
                         (batch, 4, height/8, width/8)",
                        path.display(),
                        t.dims(),
                        shape
                    );
                }
                t
            }
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// A txt2img input latent `[frames, c, h, w]`.
    pub(crate) fn latents(
        &mut self,
        shape: [usize; 4],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.draw("latents", &[], shape, dtype, device)
    }

    /// Sequential mode's re-noising draw before step `step + 1` (`step` counts from 0).
    pub(crate) fn step_noise(
        &mut self,
        step: usize,
        shape: [usize; 4],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.draw("step_noise", &[step], shape, dtype, device)
    }

    fn draw(
        &mut self,
        name: &str,
        inner: &[usize],
        shape: [usize; 4],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self {
            Noise::Seeded { live, .. } => {
                let n = shape.iter().product();
                Tensor::from_vec(normal(live.as_mut(), n), shape.to_vec(), &Device::Cpu)?
            }
            Noise::File {
                path,
                tensors,
                latents_pos,
                step_pos,
            } => {
                let all = tensors.get(name).with_context(|| {
                    format!("noise file {} has no `{name}` tensor", path.display())
                })?;
                let calls = all.dim(0)?;
                if calls == 0 {
                    bail!("noise file {}: `{name}` is empty", path.display());
                }
                // Latents advance per call; step noise advances per call after its last step.
                let pos = if name == "latents" {
                    latents_pos
                } else {
                    step_pos
                };
                let mut t = all.get(*pos % calls)?;
                for &i in inner {
                    t = t.get(i)?;
                }
                let last_step = name != "step_noise" || inner.first() == Some(&(all.dim(1)? - 1));
                if last_step {
                    *pos += 1;
                }
                if t.dims() != shape {
                    bail!(
                        "noise file {}: `{name}` entries are {:?} but this stream needs {:?}",
                        path.display(),
                        t.dims(),
                        shape
                    );
                }
                t
            }
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard_normal() {
        let mut a = Noise::seeded(7);
        let mut b = Noise::seeded(7);
        let x = a
            .init_noise([2, 4, 8, 8], DType::F32, &Device::Cpu)
            .unwrap();
        let y = b
            .init_noise([2, 4, 8, 8], DType::F32, &Device::Cpu)
            .unwrap();
        let (xv, yv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(xv, yv);
        let n = xv.len() as f32;
        let mean = xv.iter().sum::<f32>() / n;
        let var = xv.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.2, "{mean} {var}");
        // Drawing live noise does not change the pre-sampled noise.
        a.latents([1, 4, 8, 8], DType::F32, &Device::Cpu).unwrap();
        let x2 = a
            .init_noise([2, 4, 8, 8], DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(x2.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xv);
        // Another seed gives other noise.
        let z = Noise::seeded(8)
            .init_noise([2, 4, 8, 8], DType::F32, &Device::Cpu)
            .unwrap();
        assert_ne!(z.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xv);
    }

    #[test]
    fn file_noise_cycles_and_checks_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.safetensors");
        let init = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let lat = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 1, 4, 4))
            .unwrap();
        let step = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 1, 1, 4, 4))
            .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([
                ("init_noise".to_string(), init),
                ("latents".to_string(), lat),
                ("step_noise".to_string(), step),
            ]),
            &path,
        )
        .unwrap();
        let mut n = Noise::from_file(&path).unwrap();
        let d = Device::Cpu;
        let first = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(
            first(n.init_noise([1, 1, 4, 4], DType::F32, &d).unwrap()),
            0.0
        );
        assert!(n.init_noise([2, 1, 4, 4], DType::F32, &d).is_err());
        let l: Vec<f32> = (0..3)
            .map(|_| first(n.latents([1, 1, 4, 4], DType::F32, &d).unwrap()))
            .collect();
        assert_eq!(l, vec![0.0, 16.0, 0.0]);
        let s: Vec<f32> = (0..2)
            .flat_map(|_| {
                (0..2)
                    .map(|i| first(n.step_noise(i, [1, 1, 4, 4], DType::F32, &d).unwrap()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(s, vec![0.0, 16.0, 32.0, 48.0]);
    }
}
