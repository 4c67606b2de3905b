//! `sdcam dev write-random-hub` on the small repositories (TAESD, the LCM-LoRA): the cache
//! layout huggingface_hub writes, read back by sdcam's own resolver offline, and no silent
//! overwrite of an existing cache entry. (The full-size models and their parity with diffusers:
//! tests/full_size_hub.rs through scripts/full-size-check.sh.)

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use sdcam::model::hub::{self, HubOptions};
use sdcam::model::lora::{LoraFile, LoraTarget};
use sha2::{Digest, Sha256};

fn write(cache: &Path, repo: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdcam"))
        .args(["dev", "write-random-hub", "--cache"])
        .arg(cache)
        .args(["--repo", repo])
        .args(extra)
        .output()
        .unwrap()
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: true,
        token: None,
        endpoint: None,
        progress: false,
    }
}

#[test]
fn writes_the_hub_cache_layout_that_sdcam_resolves_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    for repo in ["madebyollin/taesd", "latent-consistency/lcm-lora-sdv1-5"] {
        let out = write(cache, repo, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // refs/main → snapshots/<commit>/<file> → relative symlink into blobs/, weight blobs named
    // by the sha256 of their bytes.
    let repo = cache.join("models--madebyollin--taesd");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit.len(), 40, "{commit:?}");
    let weights = repo.join(format!(
        "snapshots/{commit}/diffusion_pytorch_model.safetensors"
    ));
    let link = std::fs::read_link(&weights).unwrap();
    assert!(link.starts_with("../../blobs"), "{}", link.display());
    let bytes = std::fs::read(&weights).unwrap();
    let sha = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(link.file_name().unwrap().to_str().unwrap(), sha);

    // sdcam's resolver finds and loads them by repo id.
    let tiny =
        hub::resolve_tiny_vae("madebyollin/taesd", None, DType::F32, &offline(cache)).unwrap();
    let vb = hub::load_var_builder(&tiny.weights, DType::F32, &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("decoder.layers.0.weight"));
    let lora_path = hub::resolve_lora(
        "latent-consistency/lcm-lora-sdv1-5",
        None,
        None,
        &offline(cache),
    )
    .unwrap();
    let lora = LoraFile::load(&lora_path).unwrap();
    assert_eq!(lora.num_modules(LoraTarget::Unet), 278);
    assert_eq!(lora.num_modules(LoraTarget::TextEncoder), 0);
    let m = lora
        .module(
            LoraTarget::Unet,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        )
        .unwrap();
    assert_eq!((m.rank().unwrap(), m.alpha), (64, Some(8.0)));
    assert_eq!(m.down.dtype(), DType::F16);

    // Never over an existing entry without --overwrite; with it, the same bytes again.
    let again = write(cache, "madebyollin/taesd", &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let again = write(cache, "madebyollin/taesd", &["--overwrite"]);
    assert!(again.status.success());
    assert_eq!(std::fs::read(&weights).unwrap(), bytes);
    let other = write(cache, "org/unknown", &[]);
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("org/unknown"));
}
