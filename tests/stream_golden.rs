//! The stream pipeline against the Python reference: every case written by
//! `scripts/reference/make_stream_goldens.py` (streamdiffusion 0.1.1 on the tiny fixture models)
//! is replayed through sdcam's `StreamDiffusion` with the same input frames and the same noise,
//! and every output frame must match: max |Δ| / max |ref| ≤ 1e-3 (f32).
//!
//! `SDCAM_TEST_DEVICE` / `SDCAM_TEST_DTYPE` run the same replay on a GPU or in half precision
//! (`sdcam::model::testing`, `scripts/cuda/check.sh`), with the half-precision tolerance there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdcam::model::hub::HubOptions;
use sdcam::model::sd::{ModelSpec, StableDiffusion};
use sdcam::model::{rel_err, testing};
use sdcam::pipeline::stream::images_from_rgb;
use sdcam::pipeline::{LiveParams, Noise, StreamDiffusion, StreamParams};
use sdcam::profile::{CfgType, StreamMode};
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;

fn dir() -> PathBuf {
    fixture("golden/stream")
}

/// `tests/fixtures/<rel>` (of `$SDCAM_REPO` where set: `testing::fixtures_dir`).
fn fixture(rel: &str) -> PathBuf {
    testing::fixtures_dir().join(rel)
}

/// The `__metadata__` of a safetensors file (the header is JSON after a u64 length).
fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .get("__metadata__")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

struct Models {
    loaded: HashMap<(String, String), Arc<StableDiffusion>>,
    device: Device,
    dtype: DType,
}

impl Models {
    fn get(&mut self, model: &str, vae: &str) -> Arc<StableDiffusion> {
        let key = (model.to_string(), vae.to_string());
        self.loaded
            .entry(key)
            .or_insert_with(|| {
                let spec = ModelSpec {
                    id: fixture(&format!("models/{model}")).display().to_string(),
                    revision: None,
                    tiny_vae: (vae == "taesd")
                        .then(|| fixture("models/tiny-taesd").display().to_string()),
                    loras: vec![],
                    dtype: self.dtype,
                };
                let opts = HubOptions {
                    cache_dir: fixture("hf-cache/hub"),
                    offline: true,
                    token: None,
                    endpoint: None,
                    progress: false,
                };
                Arc::new(StableDiffusion::load(&spec, &self.device, &opts).unwrap())
            })
            .clone()
    }
}

fn cfg_type(s: &str) -> CfgType {
    match s {
        "none" => CfgType::None,
        "full" => CfgType::Full,
        "self" => CfgType::SelfNeg,
        "initialize" => CfgType::Initialize,
        other => panic!("unknown cfg_type {other}"),
    }
}

fn usize_of(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap_or_else(|| panic!("case.{k}")) as usize
}

/// Replays one case; returns the worst relative error over its frames.
fn replay(path: &Path, case: &Value, models: &mut Models, frames_u8: &Tensor) -> f32 {
    let model = models.get(
        case["model"].as_str().unwrap(),
        case["vae"].as_str().unwrap(),
    );
    let mode = case["mode"].as_str().unwrap();
    let f = usize_of(case, "frame_buffer_size");
    let (w, h) = (usize_of(case, "width"), usize_of(case, "height"));
    let params = StreamParams {
        width: w,
        height: h,
        mode: if mode == "img2img" {
            StreamMode::Img2img
        } else {
            StreamMode::Txt2img
        },
        t_index_list: case["t_index_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        num_inference_steps: usize_of(case, "num_inference_steps"),
        frame_buffer_size: f,
        use_denoising_batch: case["use_denoising_batch"].as_bool().unwrap(),
        do_add_noise: case["do_add_noise"].as_bool().unwrap(),
        cfg_type: cfg_type(case["cfg_type"].as_str().unwrap()),
        seed: case["seed"].as_u64().unwrap(),
        // The reference starts from a zero buffer.
        warm_start: false,
    };
    let live = LiveParams {
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        delta: case["delta"].as_f64().unwrap(),
        cross_frame_attention: false,
    };
    let noise = Noise::from_file(path).unwrap();
    let mut stream = StreamDiffusion::prepare(
        model,
        params,
        live,
        case["prompt"].as_str().unwrap(),
        case["negative_prompt"].as_str().unwrap(),
        noise,
    )
    .unwrap();
    let g = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let expected = &g["outputs"];
    let calls = usize_of(case, "calls");
    let update = case.get("update_before_call").and_then(Value::as_u64);
    let mut worst = 0f32;
    for call in 0..calls {
        if update == Some(call as u64) {
            stream
                .set_prompts(
                    case["prompt2"].as_str().unwrap(),
                    case["negative2"].as_str().unwrap(),
                    0,
                )
                .unwrap();
        }
        let out = if mode == "img2img" {
            let frames: Vec<Vec<u8>> = (0..f)
                .map(|j| {
                    frames_u8
                        .get(call * f + j)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<u8>()
                        .unwrap()
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            // The dtype the stream computes in (f32 for bf16 on the CPU: bf16 products only).
            let (device, dtype) = stream.device_dtype();
            let x = images_from_rgb(&refs, w, h, dtype, device).unwrap();
            stream.img2img(&x).unwrap()
        } else {
            stream.txt2img().unwrap()
        };
        let n = out.dim(0).unwrap();
        let want = expected.narrow(0, call * n, n).unwrap();
        let e = rel_err(&out, &want).unwrap();
        worst = worst.max(e);
    }
    assert_eq!(
        calls * stream.frames_per_call(),
        expected.dim(0).unwrap(),
        "{}: output frame count",
        path.display()
    );
    worst
}

#[test]
fn stream_matches_the_python_reference() {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap())
            .unwrap();
    let inputs =
        candle_core::safetensors::load(dir().join("inputs.safetensors"), &Device::Cpu).unwrap();
    let frames_u8 = &inputs["frames_u8"];
    let (device, dtype) = testing::target().unwrap();
    let tolerance = testing::tolerance(&device, dtype, TOLERANCE);
    eprintln!("stream goldens on {device:?} in {dtype:?}, tolerance {tolerance:e}");
    let mut models = Models {
        loaded: HashMap::new(),
        device,
        dtype,
    };
    let cases = manifest["cases"].as_array().unwrap();
    let mut report = Vec::new();
    let mut failed = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let path = dir().join(c["file"].as_str().unwrap());
        let meta = metadata(&path);
        let case: Value = serde_json::from_str(&meta["case"]).unwrap();
        assert!(usize_of(&case, "calls") * usize_of(&case, "frame_buffer_size") >= 8);
        let e = replay(&path, &case, &mut models, frames_u8);
        report.push(format!("{name:<28} {e:.2e}"));
        if e.is_nan() || e > tolerance {
            failed.push(name.to_string());
        }
        seen.insert(format!(
            "{}/{}/k{}/f{}/{}",
            case["mode"].as_str().unwrap(),
            case["cfg_type"].as_str().unwrap(),
            case["t_index_list"].as_array().unwrap().len(),
            usize_of(&case, "frame_buffer_size"),
            if case["use_denoising_batch"].as_bool().unwrap() {
                "batch"
            } else {
                "seq"
            }
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(failed.is_empty(), "cases over {tolerance}: {failed:?}");
    // The matrix the issue asks for is present (so this test cannot pass on a thin manifest).
    for cfg in ["none", "full", "self", "initialize"] {
        for k in [1, 2, 4] {
            let key = format!("img2img/{cfg}/k{k}/f1/batch");
            assert!(seen.contains(&key), "missing golden case {key}");
        }
        assert!(seen.contains(&format!("img2img/{cfg}/k2/f1/seq")) || cfg == "full");
    }
    assert!(
        seen.iter().any(|s| s.contains("/f2/")),
        "no frame_buffer_size 2 case"
    );
    assert!(
        seen.iter().any(|s| s.starts_with("txt2img")),
        "no txt2img case"
    );
}
