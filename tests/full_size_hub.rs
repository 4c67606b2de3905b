//! Full size, by hub id, offline: the shipped profiles `profiles/anime.toml` (sd-turbo + TAESD)
//! and `profiles/watercolor-lcm.toml` (SD 1.5 + LCM-LoRA + TAESD), unchanged, load their models
//! by repository id from a Hugging Face cache with `HF_HUB_OFFLINE=1`, and the stream computes
//! what streamdiffusion 0.1.1 / diffusers 0.24 compute on the same full-size weights:
//! max |Δ| / max |ref| ≤ 1e-3 (f32, CPU) on two 256² frames, for the denoised latent `x0` and
//! the decoded image.
//!
//! The cache is the one `sdcam dev write-random-hub` writes (full-size random weights in the real
//! repositories' layout, ~14 GB); the reference output is
//! `tests/fixtures/golden/full_size/<profile>.safetensors` from
//! `scripts/reference/make_full_size_goldens.py` on that cache. Ignored by default (it needs the
//! cache and about a minute per profile in a release build): `scripts/full-size-check.sh` writes
//! the cache, runs this test with `SDCAM_FULL_SIZE_CACHE` and streams both profiles through the
//! `sdcam` binary.
//!
//! What is compared is the stream core with the profile's settings at 256² (the profiles'
//! own size is auto: 680×384 for their 16:9 output), started from a zero latent buffer
//! (`warm_start = false`, as the reference starts) and with the reference's pre-sampled noise
//! (`Noise::from_file`): the similarity filter, which skips frames at random, sits outside the
//! core and is not involved.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use sdcam::config;
use sdcam::model::hub::HubOptions;
use sdcam::model::rel_err;
use sdcam::model::sd::StableDiffusion;
use sdcam::pipeline::stream::images_from_rgb;
use sdcam::pipeline::{Noise, StreamDiffusion};
use sdcam::profile::LoadedProfile;
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;
const SIZE: usize = 256;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `__metadata__` of a safetensors file.
fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one profile against its golden; returns the relative error per frame.
fn check_profile(name: &str, cache: &Path) -> Vec<f32> {
    let golden = repo_root().join(format!(
        "tests/fixtures/golden/full_size/{name}.safetensors"
    ));
    let case: Value = serde_json::from_str(&metadata(&golden)["case"]).unwrap();
    let g = candle_core::safetensors::load(&golden, &Device::Cpu).unwrap();

    let lp = LoadedProfile::load(&repo_root().join(format!("profiles/{name}.toml"))).unwrap();
    let p = &lp.profile;
    // The reference ran this profile's model and settings.
    assert_eq!(p.model.id, case["model"].as_str().unwrap());
    assert_eq!(p.prompt, case["prompt"].as_str().unwrap());

    // By hub id from the cache, offline, as `sdcam` resolves it from its environment.
    let cache_dir = cache.display().to_string();
    let opts = HubOptions::from_vars(|k| match k {
        "HF_HUB_OFFLINE" => Some("1".into()),
        "HF_HUB_CACHE" => Some(cache_dir.clone()),
        _ => None,
    });
    let spec = config::model_options(&p.model).spec(DType::F32);
    let t0 = std::time::Instant::now();
    let model = StableDiffusion::load(&spec, &Device::Cpu, &opts)
        .unwrap_or_else(|e| panic!("{name}: loading {}: {e:#}", spec.id));
    eprintln!(
        "{name}: {} loaded in {:.1} s",
        model.description,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        model.random_weights,
        "the cache is marked as random weights"
    );

    let mut params = config::stream_params(p);
    params.width = SIZE;
    params.height = SIZE;
    params.warm_start = false;
    let mut stream = StreamDiffusion::prepare(
        Arc::new(model),
        params,
        config::live_params(p),
        &p.prompt,
        &p.negative_prompt,
        Noise::from_file(&golden).unwrap(),
    )
    .unwrap();
    let frames = &g["frames_u8"];
    let mut errs = Vec::new();
    for i in 0..g["outputs"].dim(0).unwrap() {
        let rgb: Vec<u8> = frames
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x = images_from_rgb(&[&rgb], SIZE, SIZE, DType::F32, &Device::Cpu).unwrap();
        let t1 = std::time::Instant::now();
        // `img2img`, step by step, to compare the denoised latent as well: TAESD with random
        // weights passes little of it through to the image.
        let x_t = stream.encode_image(&x).unwrap();
        let x0 = stream.predict_x0(&x_t).unwrap();
        let out = stream.decode_image(&x0).unwrap();
        for (what, got) in [("x0", &x0), ("outputs", &out)] {
            let want = g[what].narrow(0, i, 1).unwrap();
            let e = rel_err(got, &want).unwrap();
            eprintln!(
                "{name} frame {i} {what}: max|Δ|/max|ref| {e:.2e} (max|ref| {:.3}, std {:.3})",
                want.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                want.flatten_all()
                    .unwrap()
                    .var(0)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            errs.push(e);
        }
        eprintln!("{name} frame {i}: {:.1} s", t1.elapsed().as_secs_f64());
    }
    errs
}

#[test]
#[ignore = "needs the full-size random-weight cache: scripts/full-size-check.sh"]
fn shipped_profiles_match_the_reference_at_full_size_by_hub_id_offline() {
    let cache = PathBuf::from(
        std::env::var("SDCAM_FULL_SIZE_CACHE")
            .expect("SDCAM_FULL_SIZE_CACHE: the cache written by sdcam dev write-random-hub"),
    );
    let mut failed = Vec::new();
    let only = std::env::var("SDCAM_FULL_SIZE_ONLY").ok();
    for name in ["anime", "watercolor-lcm"] {
        if only.as_deref().is_some_and(|o| o != name) {
            eprintln!("{name}: skipped (SDCAM_FULL_SIZE_ONLY={only:?})");
            continue;
        }
        let errs = check_profile(name, &cache);
        assert_eq!(
            errs.len(),
            4,
            "{name}: frames in the golden (x0 and output of each)"
        );
        if errs.iter().any(|e| e.is_nan() || *e > TOLERANCE) {
            failed.push(format!("{name}: {errs:?}"));
        }
    }
    assert!(failed.is_empty(), "over {TOLERANCE}: {failed:?}");
}
