//! Unit tests of `hub` (kept in their own file so that the module itself stays readable).
use super::*;
use crate::model::testutil::fixture;
use std::collections::HashMap;

fn offline() -> HubOptions {
    HubOptions {
        cache_dir: fixture("hf-cache/hub"),
        offline: true,
        token: None,
        endpoint: None,
        progress: false,
    }
}

#[test]
fn options_from_vars() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        move |k: &str| m.get(k).map(|v| v.to_string())
    };
    let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!o.offline);
    assert_eq!(o.token, None);
    let o = HubOptions::from_vars(vars(&[
        ("HOME", "/home/u"),
        ("HF_HOME", "/data/hf"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_TOKEN", "hf_x"),
    ]));
    assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
    assert!(o.offline);
    assert_eq!(o.token.as_deref(), Some("hf_x"));
    let o = HubOptions::from_vars(vars(&[
        ("HF_HOME", "/data/hf"),
        ("HF_HUB_CACHE", "/c"),
        ("HF_HUB_OFFLINE", "0"),
        ("HF_ENDPOINT", "http://m"),
    ]));
    assert_eq!(o.cache_dir, PathBuf::from("/c"));
    assert!(!o.offline);
    assert_eq!(o.endpoint.as_deref(), Some("http://m"));
    let o = HubOptions::from_vars(vars(&[
        ("XDG_CACHE_HOME", "/x"),
        ("HF_HUB_OFFLINE", "true"),
    ]));
    assert_eq!(o.cache_dir, PathBuf::from("/x/huggingface/hub"));
    assert!(o.offline);
}

fn check_tiny(m: &ModelFiles) {
    assert_eq!(m.pipeline_class, "StableDiffusionPipeline");
    for c in [&m.unet, &m.text_encoder, &m.vae] {
        assert!(c.config.is_file(), "{c:?}");
        assert_eq!(c.weights.len(), 1);
        assert!(c.weights[0].is_file(), "{c:?}");
        assert!(!c.fp16_variant);
    }
    assert!(m.tokenizer_dir.join("vocab.json").is_file());
    assert!(m.scheduler_config.is_file());
}

#[test]
fn resolves_local_folder() {
    let m = resolve_model(
        fixture("models/tiny-sd21").to_str().unwrap(),
        None,
        DType::F32,
        &offline(),
    )
    .unwrap();
    check_tiny(&m);
    assert!(m.unet.weights[0].ends_with("unet/diffusion_pytorch_model.safetensors"));
    assert!(m.text_encoder.weights[0].ends_with("text_encoder/model.safetensors"));
    // f16 requested, no fp16 variant: plain file.
    let m16 = resolve_model(
        fixture("models/tiny-sd21").to_str().unwrap(),
        None,
        DType::F16,
        &offline(),
    )
    .unwrap();
    assert_eq!(m16.unet.weights, m.unet.weights);
}

#[test]
fn resolves_from_cache_offline() {
    let o = offline();
    let m = resolve_model("sdcam-fixtures/tiny-sd15", None, DType::F32, &o).unwrap();
    check_tiny(&m);
    assert!(m.root.starts_with(fixture(
        "hf-cache/hub/models--sdcam-fixtures--tiny-sd15/snapshots"
    )));
    // Explicit revision by branch and by commit.
    let m2 = resolve_model("sdcam-fixtures/tiny-sd15", Some("main"), DType::F16, &o).unwrap();
    assert_eq!(m2.unet.weights, m.unet.weights);
    let commit = m.root.file_name().unwrap().to_str().unwrap().to_string();
    let m3 = resolve_model("sdcam-fixtures/tiny-sd15", Some(&commit), DType::F32, &o).unwrap();
    assert_eq!(m3.vae.weights, m.vae.weights);

    let t = resolve_tiny_vae("sdcam-fixtures/tiny-taesd", None, DType::F32, &o).unwrap();
    assert!(t.config.is_file() && t.weights[0].is_file());
    assert!(t.weights[0].ends_with("diffusion_pytorch_model.safetensors"));
    // Local folder too.
    let tl = resolve_tiny_vae(
        fixture("models/tiny-taesd").to_str().unwrap(),
        None,
        DType::F16,
        &o,
    )
    .unwrap();
    assert!(tl.weights[0].is_file());
}

#[test]
fn uncached_offline_error() {
    let o = offline();
    let e = resolve_model("stabilityai/sd-turbo", None, DType::F16, &o).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("not in the Hugging Face cache"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
    assert!(
        msg.contains("huggingface-cli download stabilityai/sd-turbo"),
        "{msg}"
    );
    assert!(msg.contains(&o.cache_dir.display().to_string()), "{msg}");
    // Unknown revision of a cached repo is not cached either.
    let e = resolve_model("sdcam-fixtures/tiny-sd15", Some("v2"), DType::F32, &o).unwrap_err();
    assert!(format!("{e:#}").contains("not in the Hugging Face cache"));
    // A LoRA repo that is not cached.
    let e = resolve_lora("latent-consistency/lcm-lora-sdv1-5", None, None, &o).unwrap_err();
    assert!(
        format!("{e:#}").contains("huggingface-cli download latent-consistency/lcm-lora-sdv1-5")
    );
}

#[test]
fn folder_without_model_index() {
    let dir = fixture("models/tiny-sd21/unet");
    let e = resolve_model(dir.to_str().unwrap(), None, DType::F32, &offline()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("not a diffusers-layout folder"), "{msg}");
    assert!(msg.contains("model_index.json"), "{msg}");
    let e = resolve_model("./no/such/dir", None, DType::F32, &offline()).unwrap_err();
    assert!(format!("{e:#}").contains("neither an existing folder"));
}

#[test]
fn missing_component_and_bad_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("models/tiny-sd21");
    for sub in ["unet", "text_encoder", "vae", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap();
            if sub == "vae" && f.file_name() == "diffusion_pytorch_model.safetensors" {
                continue;
            }
            std::fs::copy(f.path(), tmp.path().join(sub).join(f.file_name())).unwrap();
        }
    }
    std::fs::copy(
        src.join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let p = tmp.path().to_str().unwrap();
    let msg = format!(
        "{:#}",
        resolve_model(p, None, DType::F32, &offline()).unwrap_err()
    );
    assert!(
        msg.contains("vae/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );

    std::fs::write(tmp.path().join("vae/diffusion_pytorch_model.bin"), b"x").unwrap();
    let msg = format!(
        "{:#}",
        resolve_model(p, None, DType::F32, &offline()).unwrap_err()
    );
    assert!(msg.contains(".bin") && msg.contains("safetensors"), "{msg}");

    std::fs::write(
        tmp.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
    )
    .unwrap();
    let msg = format!(
        "{:#}",
        resolve_model(p, None, DType::F32, &offline()).unwrap_err()
    );
    assert!(
        msg.contains("SDXL") && msg.contains("text_encoder_2") && msg.contains("time ids"),
        "{msg}"
    );

    std::fs::write(
        tmp.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusion3Pipeline"}"#,
    )
    .unwrap();
    let msg = format!(
        "{:#}",
        resolve_model(p, None, DType::F32, &offline()).unwrap_err()
    );
    assert!(
        msg.contains("unsupported architecture StableDiffusion3Pipeline"),
        "{msg}"
    );
}

#[test]
fn fp16_variant_preference() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("unet");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), "{}").unwrap();
    std::fs::write(d.join("diffusion_pytorch_model.fp16.safetensors"), b"").unwrap();
    let src = Source::Local(tmp.path().to_path_buf());
    // f32 falls back to the fp16 variant.
    let c = component(&src, "unet", "diffusion_pytorch_model", DType::F32).unwrap();
    assert!(c.fp16_variant);
    std::fs::write(d.join("diffusion_pytorch_model.safetensors"), b"").unwrap();
    let c = component(&src, "unet", "diffusion_pytorch_model", DType::F32).unwrap();
    assert!(!c.fp16_variant);
    let c = component(&src, "unet", "diffusion_pytorch_model", DType::F16).unwrap();
    assert!(c.fp16_variant);
    let c = component(&src, "unet", "diffusion_pytorch_model", DType::BF16).unwrap();
    assert!(c.weights[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
}

#[test]
fn lora_resolution() {
    let o = offline();
    let f = fixture("models/tiny-lora/pytorch_lora_weights.safetensors");
    assert_eq!(
        resolve_lora(f.to_str().unwrap(), None, None, &o).unwrap(),
        f
    );
    let d = fixture("models/tiny-lora");
    assert_eq!(
        resolve_lora(d.to_str().unwrap(), None, None, &o).unwrap(),
        d.join(LORA_WEIGHT_NAME)
    );
    let e = resolve_lora("/nope/x.safetensors", None, None, &o).unwrap_err();
    assert!(e.to_string().contains("does not exist"));
}

#[test]
fn var_builder_reads_tensor() {
    let m = resolve_model("sdcam-fixtures/tiny-sd15", None, DType::F32, &offline()).unwrap();
    let vb = load_var_builder(&m.unet.weights, DType::F32, &Device::Cpu).unwrap();
    let w = vb.get((16, 4, 3, 3), "conv_in.weight").unwrap();
    assert_eq!(w.dims(), &[16, 4, 3, 3]);
    let vb16 = load_var_builder(&m.unet.weights, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(vb16.get(16, "conv_in.bias").unwrap().dtype(), DType::F16);
    #[derive(serde::Deserialize)]
    struct U {
        cross_attention_dim: usize,
    }
    let u: U = read_config(&m.unet.config).unwrap();
    assert_eq!(u.cross_attention_dim, 32);
    assert!(load_var_builder(
        &[PathBuf::from("/nope.safetensors")],
        DType::F32,
        &Device::Cpu
    )
    .is_err());
}
