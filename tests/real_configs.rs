//! The real configuration files of the public models (`tests/data/hub-configs/`, copied from the
//! hub with their provenance) read by sdcam: every file of a supported repo parses, `null` and
//! absent keys take diffusers'/transformers' defaults, unknown keys are ignored, unsupported
//! values are refused with the file, key and value named, and a tiny model whose config files
//! carry the real files' keys, nulls and absences computes exactly what the fixture model does.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdcam::model::clip::ClipTextConfig;
use sdcam::model::config::{self, ComponentConfig};
use sdcam::model::hub::HubOptions;
use sdcam::model::scheduler::SchedulerConfig;
use sdcam::model::sd::{ModelSpec, StableDiffusion};
use sdcam::model::taesd::AutoencoderTinyConfig;
use sdcam::model::tokenizer::ClipTokenizer;
use sdcam::model::unet::UNetConfig;
use sdcam::model::vae::AutoencoderKLConfig;
use serde_json::{Map, Value};

fn hub_configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hub-configs")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn real(rel: &str) -> PathBuf {
    hub_configs().join(rel)
}

fn read_object(path: &Path) -> Map<String, Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match serde_json::from_str(&text) {
        Ok(Value::Object(o)) => o,
        other => panic!("{}: not a JSON object: {other:?}", path.display()),
    }
}

/// Every component config file of the supported repos, by kind.
const UNETS: &[&str] = &[
    "stabilityai--sd-turbo/unet/config.json",
    "runwayml--stable-diffusion-v1-5/unet/config.json",
];
const TEXT_ENCODERS: &[&str] = &[
    "stabilityai--sd-turbo/text_encoder/config.json",
    "runwayml--stable-diffusion-v1-5/text_encoder/config.json",
    // Components of a repo that is not supported as a whole still read as components.
    "stabilityai--sdxl-turbo/text_encoder/config.json",
];
const VAES: &[&str] = &[
    "stabilityai--sd-turbo/vae/config.json",
    "runwayml--stable-diffusion-v1-5/vae/config.json",
    "stabilityai--sdxl-turbo/vae/config.json",
];
const TINY_VAES: &[&str] = &[
    "madebyollin--taesd/config.json",
    "madebyollin--taesdxl/config.json",
    "madebyollin--taesdxl/config.pre-1.3.json",
    "IDKiro--sdxs-512-0.9/vae/config.json",
];
const SCHEDULERS: &[&str] = &[
    "stabilityai--sd-turbo/scheduler/scheduler_config.json",
    "runwayml--stable-diffusion-v1-5/scheduler/scheduler_config.json",
    "stabilityai--sdxl-turbo/scheduler/scheduler_config.json",
];

fn load<T: ComponentConfig>(rel: &str) -> T {
    config::load(&real(rel)).unwrap_or_else(|e| panic!("{rel}: {e:#}"))
}

/// Calls `$f::<Config>(file)` for every real file of every component kind.
macro_rules! for_every_real_file {
    ($f:ident) => {
        for f in UNETS {
            $f::<UNetConfig>(f);
        }
        for f in TEXT_ENCODERS {
            $f::<ClipTextConfig>(f);
        }
        for f in VAES {
            $f::<AutoencoderKLConfig>(f);
        }
        for f in TINY_VAES {
            $f::<AutoencoderTinyConfig>(f);
        }
        for f in SCHEDULERS {
            $f::<SchedulerConfig>(f);
        }
    };
}

#[test]
fn every_real_config_of_the_supported_repos_parses() {
    for_every_real_file!(load);
    // The values the loader must get right from these files.
    let turbo: UNetConfig = load(UNETS[0]);
    assert!(!turbo.upcast_attention, "upcast_attention: null is false");
    assert!(turbo.use_linear_projection);
    assert_eq!(
        turbo.mid_block_type.as_deref(),
        Some("UNetMidBlock2DCrossAttn")
    );
    let sd15: UNetConfig = load(UNETS[1]);
    assert!(!sd15.use_linear_projection && !sd15.upcast_attention);
    assert_eq!(
        sd15.mid_block_type.as_deref(),
        Some("UNetMidBlock2DCrossAttn")
    );
    let vae15: AutoencoderKLConfig = load(VAES[1]);
    assert_eq!(
        vae15.scaling_factor, 0.18215,
        "absent scaling_factor = diffusers default"
    );
    let vae_xl: AutoencoderKLConfig = load(VAES[2]);
    assert_eq!(vae_xl.scaling_factor, 0.13025);
    let te: ClipTextConfig = load(TEXT_ENCODERS[0]);
    assert_eq!(
        (te.hidden_size, te.num_hidden_layers, te.num_attention_heads),
        (1024, 23, 16)
    );
    let s15: SchedulerConfig = load(SCHEDULERS[1]);
    assert_eq!(
        s15.prediction_type, "epsilon",
        "absent prediction_type = epsilon"
    );
    let taesd: AutoencoderTinyConfig = load(TINY_VAES[0]);
    assert_eq!(
        (taesd.shift_factor, taesd.upsample_fn.as_str()),
        (0.0, "nearest")
    );
}

/// For every key of every real file: `null` parses like the key being absent (the library
/// default), except keys whose `null` is a value of its own or `false`, which are either
/// accepted or refused naming a key. Removing a key never turns into a parse error either.
fn null_and_absent_everywhere<T: ComponentConfig + std::fmt::Debug>(rel: &str) {
    let object = read_object(&real(rel));
    for key in object.keys() {
        let mut nulled = object.clone();
        nulled.insert(key.clone(), Value::Null);
        let mut removed = object.clone();
        removed.remove(key);
        let src = format!("{rel} with {key}");
        let parsed_null = config::parse::<T>(&Value::Object(nulled).to_string(), &src);
        let parsed_absent = config::parse::<T>(&Value::Object(removed).to_string(), &src);
        for (how, r) in [("null", &parsed_null), ("absent", &parsed_absent)] {
            if let Err(e) = r {
                let msg = format!("{e:#}");
                // A default may not fit the file's other values (hidden_size's default 512 is
                // not divisible by 12 heads): then a refusal naming a key, never a parse error.
                assert!(
                    msg.contains("configuration: key `") && msg.contains("unsupported"),
                    "{rel}: `{key}` {how} gave an error that is not a refusal of a key: {msg}"
                );
            }
        }
        if !T::NULL_IS_A_VALUE.contains(&key.as_str()) && !T::NULL_IS_FALSE.contains(&key.as_str())
        {
            assert_eq!(
                format!("{:?}", parsed_null.as_ref().map_err(|e| format!("{e:#}"))),
                format!("{:?}", parsed_absent.as_ref().map_err(|e| format!("{e:#}"))),
                "{rel}: `{key}`: null must read as absent"
            );
        }
    }
}

#[test]
fn null_means_default_for_every_key_of_every_real_file() {
    for_every_real_file!(null_and_absent_everywhere);
}

#[test]
fn unsupported_repos_and_values_are_refused_by_name() {
    // sdxl-turbo's U-Net: added time ids.
    let e =
        config::load::<UNetConfig>(&real("stabilityai--sdxl-turbo/unet/config.json")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("sdxl-turbo/unet/config.json")
            && msg.contains("`addition_embed_type` = \"text_time\"")
            && msg.contains("time ids"),
        "{msg}"
    );
    // sdxl-turbo as a pipeline: says what is missing, not a parse error.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        real("stabilityai--sdxl-turbo/model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let e = sdcam::model::hub::resolve_model(
        tmp.path().to_str().unwrap(),
        None,
        DType::F32,
        &offline(),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("SDXL") && msg.contains("text_encoder_2") && msg.contains("time ids"),
        "{msg}"
    );
    // A value sdcam does not implement, in an otherwise real file.
    let mut o = read_object(&real(UNETS[0]));
    o.insert("mid_block_type".into(), Value::Null);
    let e = config::parse::<UNetConfig>(&Value::Object(o).to_string(), "x/unet/config.json")
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("x/unet/config.json") && msg.contains("`mid_block_type` = null"),
        "{msg}"
    );
    let mut o = read_object(&real(SCHEDULERS[0]));
    o.insert("prediction_type".into(), "v_prediction".into());
    let e = config::parse::<SchedulerConfig>(&Value::Object(o).to_string(), "s.json").unwrap_err();
    assert!(
        format!("{e:#}").contains("`prediction_type` = \"v_prediction\""),
        "{e:#}"
    );
    let mut o = read_object(&real(TINY_VAES[0]));
    o.insert("upsample_fn".into(), "bilinear".into());
    let e = config::parse::<AutoencoderTinyConfig>(&Value::Object(o).to_string(), "t.json")
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("`upsample_fn` = \"bilinear\""),
        "{e:#}"
    );
    // Values diffusers accepts and sdcam does not use: `sample_size` as `[h, w]`.
    let mut o = read_object(&real(UNETS[0]));
    o.insert("sample_size".into(), serde_json::json!([64, 64]));
    config::parse::<UNetConfig>(&Value::Object(o).to_string(), "u.json").unwrap();
    // A boolean defaulting to true is false when null (Python tests it for truth).
    let mut o = read_object(&real(VAES[0]));
    o.insert("use_quant_conv".into(), Value::Null);
    let v: AutoencoderKLConfig = config::parse(&Value::Object(o).to_string(), "v.json").unwrap();
    assert!(!v.use_quant_conv && v.use_post_quant_conv);
    let mut o = read_object(&real(UNETS[0]));
    o.insert("flip_sin_to_cos".into(), Value::Null);
    let u: UNetConfig = config::parse(&Value::Object(o).to_string(), "u.json").unwrap();
    assert!(!u.flip_sin_to_cos);
    // Bounded table sizes: a typo'd num_train_timesteps is refused, not allocated.
    let mut o = read_object(&real(SCHEDULERS[0]));
    o.insert(
        "num_train_timesteps".into(),
        serde_json::json!(1_000_000_000_000u64),
    );
    let e = config::parse::<SchedulerConfig>(&Value::Object(o).to_string(), "s.json").unwrap_err();
    assert!(
        format!("{e:#}").contains("`num_train_timesteps` = 1000000000000"),
        "{e:#}"
    );
    // Unused keys are not judged (steps_offset is not used by the LCM tables).
    let mut o = read_object(&real(SCHEDULERS[0]));
    o.insert("steps_offset".into(), serde_json::json!(-1));
    config::parse::<SchedulerConfig>(&Value::Object(o).to_string(), "s.json").unwrap();
    // A per-block key of the wrong kind names the value and what was expected.
    let mut o = read_object(&real(UNETS[0]));
    o.insert("layers_per_block".into(), serde_json::json!(-1));
    let e = config::parse::<UNetConfig>(&Value::Object(o).to_string(), "u.json").unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("`layers_per_block`") && msg.contains("or a list of them, got -1"),
        "{msg}"
    );
    // A wrong type names the key.
    let mut o = read_object(&real(TEXT_ENCODERS[0]));
    o.insert("hidden_act".into(), "gelu_new".into());
    let e = config::parse::<ClipTextConfig>(&Value::Object(o).to_string(), "te.json").unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("te.json") && msg.contains("`hidden_act`"),
        "{msg}"
    );
}

#[test]
fn real_tokenizer_configs_string_and_added_token_forms() {
    let vocab = fixtures().join("tokenizer/clip/vocab.json");
    let merges = fixtures().join("tokenizer/clip/merges.txt");
    for (repo, pad) in [
        ("stabilityai--sd-turbo", 0), // pad "!" (dict in special_tokens_map)
        ("runwayml--stable-diffusion-v1-5", 49407), // pad "<|endoftext|>", AddedToken dicts
        ("stabilityai--sdxl-turbo", 49407), // tokenizer: pad dict with normalized
    ] {
        let dir = real(&format!("{repo}/tokenizer"));
        let tok = ClipTokenizer::from_files(
            &vocab,
            &merges,
            &[
                dir.join("tokenizer_config.json"),
                dir.join("special_tokens_map.json"),
            ],
        )
        .unwrap_or_else(|e| panic!("{repo}: {e:#}"));
        let ids = tok.encode("a photo of a cat").unwrap();
        assert_eq!(ids.len(), 77, "{repo}");
        assert_eq!(
            &ids[..7],
            &[49406, 320, 1125, 539, 320, 2368, 49407],
            "{repo}"
        );
        assert_eq!((tok.pad_id(), ids[7]), (pad, pad), "{repo}");
    }
    // sdxl-turbo's tokenizer_2: pad "!" as a plain string.
    let dir = real("stabilityai--sdxl-turbo/tokenizer_2");
    let tok = ClipTokenizer::from_files(
        &vocab,
        &merges,
        &[
            dir.join("tokenizer_config.json"),
            dir.join("special_tokens_map.json"),
        ],
    )
    .unwrap();
    assert_eq!(tok.pad_id(), 0);
}

fn offline() -> HubOptions {
    HubOptions {
        cache_dir: fixtures().join("hf-cache/hub"),
        offline: true,
        token: None,
        endpoint: None,
        progress: false,
    }
}

/// Fixture models and the real repo whose config key sets they are given ([`with_real_keys`]):
/// SD 2.1 / sd-turbo shape (nulls such as `upcast_attention`, a list `attention_head_dim`, the
/// Euler scheduler config, pad "!") and SD 1.5 (19 unet keys, no vae `scaling_factor`, PNDM).
const TINY_WITH_REAL_KEYS: [(&str, &str); 2] = [
    ("tiny-sd21", "stabilityai--sd-turbo"),
    ("tiny-sd15", "runwayml--stable-diffusion-v1-5"),
];

/// `real` with the values of `tiny` for the keys both have: the real file's key set, its
/// `null`s, its absent keys and its unknown keys, at the fixture model's sizes.
fn real_keys_tiny_values(real_file: &Path, tiny_file: &Path) -> String {
    let real_obj = read_object(real_file);
    let tiny_obj = read_object(tiny_file);
    let mut out = Map::new();
    for (k, v) in real_obj {
        let keep_real_null = v.is_null();
        let v = match tiny_obj.get(&k) {
            // A null in the real file stays null: that is what is being tested. The fixture's
            // explicit value for it must be the library default for the outputs to agree.
            Some(t) if !keep_real_null && !k.starts_with('_') => t.clone(),
            _ => v,
        };
        out.insert(k, v);
    }
    serde_json::to_string_pretty(&Value::Object(out)).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = std::fs::canonicalize(e.path()).unwrap();
        let dst = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// A copy of fixture model `tiny` whose config files have the key set of real repo `repo`.
fn with_real_keys(tiny: &str, repo: &str, dst: &Path) {
    copy_dir(&fixtures().join("models").join(tiny), dst);
    for file in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let merged = real_keys_tiny_values(&real(&format!("{repo}/{file}")), &dst.join(file));
        std::fs::write(dst.join(file), merged).unwrap();
    }
    // Tokenizer configs and model_index verbatim.
    for file in [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "model_index.json",
    ] {
        std::fs::copy(real(&format!("{repo}/{file}")), dst.join(file)).unwrap();
    }
}

fn load_model(dir: &Path, tiny_vae: Option<&Path>) -> StableDiffusion {
    let spec = ModelSpec {
        id: dir.to_str().unwrap().into(),
        revision: None,
        tiny_vae: tiny_vae.map(|p| p.to_str().unwrap().to_string()),
        loras: vec![],
        dtype: DType::F32,
    };
    StableDiffusion::load(&spec, &Device::Cpu, &offline())
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn outputs(sd: &StableDiffusion) -> Vec<Tensor> {
    let emb = sd.encode_prompt("a watercolor painting of a cat").unwrap();
    let dev = &sd.device;
    let image = (Tensor::arange(0f32, (3 * 32 * 24) as f32, dev).unwrap() / (3.0 * 32.0 * 24.0))
        .unwrap()
        .reshape((1, 3, 24, 32))
        .unwrap()
        .affine(2.0, -1.0)
        .unwrap();
    let z = sd.vae.encode(&image).unwrap();
    let t = Tensor::new(&[500f32], dev).unwrap();
    let eps = sd.unet.forward(&z, &t, &emb).unwrap();
    let x = sd.vae.decode(&eps).unwrap();
    vec![emb, z, eps, x]
}

fn assert_same(a: &[Tensor], b: &[Tensor], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = sdcam::model::rel_err(x, y).unwrap();
        assert_eq!(
            e, 0.0,
            "{what}: output {i} differs ({e:e} of its largest value)"
        );
    }
}

#[test]
fn a_model_with_the_real_files_keys_nulls_and_absences_computes_as_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    for (tiny, repo) in TINY_WITH_REAL_KEYS {
        let dst = tmp.path().join(tiny);
        with_real_keys(tiny, repo, &dst);
        let unet_text = std::fs::read_to_string(dst.join("unet/config.json")).unwrap();
        if repo.contains("turbo") {
            assert!(
                unet_text.contains("\"upcast_attention\": null"),
                "{unet_text}"
            );
        } else {
            assert!(!unet_text.contains("upcast_attention"), "{unet_text}");
        }
        let ours = outputs(&load_model(&dst, None));
        let fixture = outputs(&load_model(&fixtures().join("models").join(tiny), None));
        assert_same(&ours, &fixture, tiny);
    }
    // TAESD 1.3's file (shift_factor, upsample_fn) at the fixture's sizes.
    let taesd = tmp.path().join("tiny-taesd");
    copy_dir(&fixtures().join("models/tiny-taesd"), &taesd);
    let merged = real_keys_tiny_values(
        &real("madebyollin--taesd/config.json"),
        &taesd.join("config.json"),
    );
    assert!(merged.contains("upsample_fn"));
    std::fs::write(taesd.join("config.json"), merged).unwrap();
    let sd15 = tmp.path().join("tiny-sd15");
    let ours = outputs(&load_model(&sd15, Some(&taesd)));
    let fixture = outputs(&load_model(
        &fixtures().join("models/tiny-sd15"),
        Some(&fixtures().join("models/tiny-taesd")),
    ));
    assert_same(&ours, &fixture, "tiny-taesd");
}

/// A Y4M file of `n` 64×48 4:2:0 frames with moving gradients.
fn write_y4m(path: &Path, n: usize) {
    let (w, h) = (64usize, 48usize);
    let mut out = format!("YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n").into_bytes();
    for i in 0..n {
        out.extend_from_slice(b"FRAME\n");
        for y in 0..h {
            for x in 0..w {
                out.push((16 + (x * 3 + y * 2 + i * 7) % 220) as u8);
            }
        }
        out.extend(std::iter::repeat_n(128u8, w * h / 2));
    }
    std::fs::write(path, out).unwrap();
}

/// `sdcam` streams a file through a diffusion profile on `model` (+ `tiny_vae`, "" = its own
/// VAE) and returns the output bytes.
fn stream_through_binary(dir: &Path, name: &str, model: &Path, tiny_vae: &str) -> Vec<u8> {
    let input = dir.join("in.y4m");
    if !input.exists() {
        write_y4m(&input, 6);
    }
    let out = dir.join(format!("{name}.y4m"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdcam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--profile", "profiles/demo.toml", "--no-stdin", "--source"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .args(["--set", "source.loop=false", "--set", "output.width=64"])
        .args(["--set", "output.height=48", "--set", "stream.width=64"])
        .args([
            "--set",
            "stream.height=64",
            "--set",
            "stream.similarity_filter=false",
        ])
        .arg("--set")
        .arg(format!("model.id={}", model.display()))
        .arg("--set")
        .arg(format!("model.tiny_vae={tiny_vae}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name}: {stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let frames = bytes.windows(6).filter(|w| w == b"FRAME\n").count();
    assert!(frames >= 1, "{name}: no frame written: {stderr}");
    // Transformed by the model: not the input, not a flat placeholder.
    let input = std::fs::read(&input).unwrap();
    let first = |b: &[u8]| {
        let start = b.windows(6).position(|w| w == b"FRAME\n").unwrap() + 6;
        b[start..start + 64 * 48].to_vec()
    };
    let luma = first(&bytes);
    assert_ne!(
        luma,
        first(&input),
        "{name}: the input came out untransformed"
    );
    let (lo, hi) = (luma.iter().min().unwrap(), luma.iter().max().unwrap());
    assert!(hi - lo > 10, "{name}: a flat frame (placeholder?)");
    bytes
}

/// The reproduction through the binary: a model folder whose config files are the real
/// ones (with `"upcast_attention": null` and the rest) streams, byte for byte as the fixture.
#[test]
fn the_binary_streams_a_model_with_the_real_files_keys() {
    let tmp = tempfile::tempdir().unwrap();
    for (tiny, repo) in TINY_WITH_REAL_KEYS {
        let dst = tmp.path().join(tiny);
        with_real_keys(tiny, repo, &dst);
        let ours = stream_through_binary(tmp.path(), &format!("{tiny}-real-keys"), &dst, "");
        let fixture = stream_through_binary(
            tmp.path(),
            &format!("{tiny}-fixture"),
            &fixtures().join("models").join(tiny),
            "",
        );
        assert_eq!(
            ours, fixture,
            "{tiny}: output differs from the fixture model's"
        );
    }
}
