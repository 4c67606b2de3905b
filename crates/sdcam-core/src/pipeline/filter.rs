//! Stochastic similarity filter (paper §3.5): skip the models on a frame that is nearly the same
//! as the last one processed, with a probability that grows with the similarity, to save power
//! on static scenes.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Settings of the filter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FilterSettings {
    /// Cosine similarity at and above which a frame is always skipped (1 = never skip).
    pub threshold: f64,
    /// At most this many consecutive frames are skipped; the next one is processed.
    pub max_skip_frame: u32,
}

/// The filter's state: the last processed input and the count of frames skipped since.
#[derive(Debug)]
pub struct SimilarityFilter {
    settings: FilterSettings,
    prev: Option<Tensor>,
    skipped_in_a_row: u32,
    rng: StdRng,
}

/// max(0, 1 − (1 − cos)/(1 − threshold)): the probability of skipping a frame whose cosine
/// similarity with the last processed one is `cos`.
pub(crate) fn skip_probability(cos: f64, threshold: f64) -> f64 {
    if threshold >= 1.0 {
        0.0
    } else {
        (1.0 - (1.0 - cos) / (1.0 - threshold)).max(0.0)
    }
}

/// Cosine similarity of two tensors taken as flat vectors (as `torch.nn.CosineSimilarity` with
/// eps 1e-6 on the flattened inputs).
pub(crate) fn cosine_similarity(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.flatten_all()?.to_dtype(DType::F32)?;
    let b = b.flatten_all()?.to_dtype(DType::F32)?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()? as f64;
    let na = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let nb = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    Ok(dot / (na * nb).max(1e-6))
}

impl SimilarityFilter {
    /// A filter with no reference frame yet (the first frame is always processed); `seed` seeds
    /// the skip draws.
    pub fn new(settings: FilterSettings, seed: u64) -> Self {
        Self {
            settings,
            prev: None,
            skipped_in_a_row: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Changes the settings; the comparison frame and skip count are kept.
    pub fn set_settings(&mut self, s: FilterSettings) {
        self.settings = s;
    }

    /// Whether to run the models on `x` (the pre-processed input). A processed frame becomes
    /// the new reference; a skipped one does not, so a slow drift is still noticed.
    ///
    /// Unlike StreamDiffusion 0.1.1's `SimilarImageFilter` (whose counter is only reset after it
    /// exceeds the limit, allowing `max_skip_frame + 1` skips in a row and forcing early
    /// processing later), the count of consecutive skips restarts at every processed frame and
    /// never exceeds `max_skip_frame`.
    ///
    /// `x` is any tensor (in practice the pre-processed image `(f, 3, height, width)`); it is
    /// compared as a flat vector with the last processed one (a shape change always processes).
    ///
    /// # Errors
    /// Only when the tensors cannot be converted to f32 or read back from their device.
    pub fn should_process(&mut self, x: &Tensor) -> candle_core::Result<bool> {
        let Some(prev) = &self.prev else {
            self.prev = Some(x.clone());
            return Ok(true);
        };
        if prev.dims() != x.dims() {
            self.prev = Some(x.clone());
            self.skipped_in_a_row = 0;
            return Ok(true);
        }
        let cos = cosine_similarity(prev, x)?;
        let p = skip_probability(cos, self.settings.threshold);
        let draw: f64 = self.rng.random();
        if draw < p && self.skipped_in_a_row < self.settings.max_skip_frame {
            self.skipped_in_a_row += 1;
            Ok(false)
        } else {
            self.prev = Some(x.clone());
            self.skipped_in_a_row = 0;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn probability_formula() {
        assert_eq!(skip_probability(1.0, 0.98), 1.0);
        assert!((skip_probability(0.99, 0.98) - 0.5).abs() < 1e-9);
        assert_eq!(skip_probability(0.97, 0.98), 0.0);
        assert_eq!(skip_probability(1.0, 1.0), 0.0);
    }

    #[test]
    fn cosine_matches_hand_computation() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &d).unwrap();
        let b = Tensor::new(&[[1f32, 1.0], [0.0, 1.0]], &d).unwrap();
        // a·b = 2, |a| = √2, |b| = √3.
        let c = cosine_similarity(&a, &b).unwrap();
        assert!((c - 2.0 / 6f64.sqrt()).abs() < 1e-6, "{c}");
    }

    /// A frame made to have cosine similarity `cos` with `base` (an orthogonal mix).
    fn at_similarity(cos: f64, n: usize) -> (Tensor, Tensor) {
        let d = Device::Cpu;
        let base: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let orth: Vec<f32> = (0..n).map(|i| if i % 2 == 1 { 1.0 } else { 0.0 }).collect();
        let s = (1.0 - cos * cos).sqrt();
        let mixed: Vec<f32> = base
            .iter()
            .zip(&orth)
            .map(|(b, o)| (cos as f32) * b + (s as f32) * o)
            .collect();
        (
            Tensor::from_vec(base, (1, n), &d).unwrap(),
            Tensor::from_vec(mixed, (1, n), &d).unwrap(),
        )
    }

    #[test]
    fn skip_rate_follows_the_probability() {
        // cos 0.99 with threshold 0.98 → p = 0.5. Alternate base/mixed frames: every mixed frame
        // is compared with the processed base (and vice versa), so each draw is a fair coin.
        let (base, mixed) = at_similarity(0.99, 64);
        let mut f = SimilarityFilter::new(
            FilterSettings {
                threshold: 0.98,
                max_skip_frame: 1000,
            },
            3,
        );
        assert!(f.should_process(&base).unwrap());
        let mut skipped = 0;
        let n = 2000;
        let mut cur_is_base = true;
        for _ in 0..n {
            // Offer the other frame; if it is skipped the reference stays.
            let x = if cur_is_base { &mixed } else { &base };
            if f.should_process(x).unwrap() {
                cur_is_base = !cur_is_base;
            } else {
                skipped += 1;
            }
        }
        let rate = skipped as f64 / n as f64;
        // Binomial(2000, 0.5): σ ≈ 0.011; 5σ bounds.
        assert!((rate - 0.5).abs() < 0.056, "skip rate {rate}");
    }

    #[test]
    fn different_frames_are_never_skipped() {
        let (base, mixed) = at_similarity(0.9, 64);
        let mut f = SimilarityFilter::new(
            FilterSettings {
                threshold: 0.98,
                max_skip_frame: 10,
            },
            1,
        );
        for i in 0..100 {
            let x = if i % 2 == 0 { &base } else { &mixed };
            assert!(f.should_process(x).unwrap());
        }
    }

    #[test]
    fn identical_frames_skip_at_most_max_skip_frame_in_a_row() {
        let (base, _) = at_similarity(1.0, 64);
        for max in [0u32, 1, 4, 10] {
            let mut f = SimilarityFilter::new(
                FilterSettings {
                    threshold: 0.98,
                    max_skip_frame: max,
                },
                9,
            );
            let decisions: Vec<bool> = (0..50).map(|_| f.should_process(&base).unwrap()).collect();
            // First processed, then exactly `max` skips, one processed, and so on.
            for (i, d) in decisions.iter().enumerate() {
                let expect = i % (max as usize + 1) == 0;
                assert_eq!(*d, expect, "max {max} frame {i}: {decisions:?}");
            }
        }
    }

    #[test]
    fn threshold_one_disables_skipping() {
        let (base, _) = at_similarity(1.0, 16);
        let mut f = SimilarityFilter::new(
            FilterSettings {
                threshold: 1.0,
                max_skip_frame: 10,
            },
            0,
        );
        assert!((0..20).all(|_| f.should_process(&base).unwrap()));
    }
}
