//! Unit tests of `unet` (kept in their own file so that the module itself stays readable).
use super::*;
use crate::model::rel_err;
use crate::model::testutil::{fixture, golden, max_abs_diff, target, tol};

fn load(name: &str) -> UNet2DConditionModel {
    let dir = fixture(&format!("models/{name}/unet"));
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = UNetConfig::from_json(&text).unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let vb = crate::model::hub::load_var_builder(&[weights], target().1, &target().0).unwrap();
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

fn check_golden(model: &str, golden_name: &str) {
    let unet = load(model);
    let g = golden(golden_name);
    for case in 0..5 {
        let get = |k: &str| g[&format!("case{case}.{k}")].clone();
        let out = unet
            .forward(
                &get("sample"),
                &get("timestep"),
                &get("encoder_hidden_states"),
            )
            .unwrap();
        let err = rel_err(&out, &get("out")).unwrap();
        // Tolerance: max|Δ|/max|ref| ≤ 1e-4 (f32).
        assert!(err <= tol(1e-4), "{golden_name} case{case}: rel err {err}");
        eprintln!("{golden_name} case{case}: rel err {err:.2e}");
    }
}

#[test]
fn golden_sd15() {
    check_golden("tiny-sd15", "unet_sd15");
}

#[test]
fn golden_sd21() {
    check_golden("tiny-sd21", "unet_sd21");
}

#[test]
fn forward_with_kv_matches_forward() {
    let unet = load("tiny-sd21");
    let g = golden("unet_sd21");
    let sample = &g["case3.sample"];
    let t = &g["case3.timestep"];
    let ehs = &g["case3.encoder_hidden_states"]; // two different prompts
    let other = &g["case0.encoder_hidden_states"];

    // Batch of two prompts.
    let kv = unet.precompute_prompt_kv(ehs).unwrap();
    assert_eq!(kv.batch(), 2);
    let a = unet.forward(sample, t, ehs).unwrap();
    let b = unet.forward_with_kv(sample, t, &kv).unwrap();
    assert!(max_abs_diff(&a, &b) <= tol(1e-6), "batched prompts differ");

    // One prompt broadcast over the batch.
    let one = ehs.narrow(0, 1, 1).unwrap();
    let kv1 = unet.precompute_prompt_kv(&one).unwrap();
    let rep = Tensor::cat(&[&one, &one], 0).unwrap();
    let a1 = unet.forward(sample, t, &rep).unwrap();
    let b1 = unet.forward_with_kv(sample, t, &kv1).unwrap();
    assert!(
        max_abs_diff(&a1, &b1) <= tol(1e-6),
        "broadcast prompt differs"
    );
    assert!(
        max_abs_diff(&a1, &a) > 1e-3,
        "prompt change must change the output"
    );

    // The cache is really used: PromptKv of `ehs` gives `ehs`'s output, whatever
    // embeddings are around (forward_with_kv never sees `other`).
    let c = unet.forward(sample, t, other).unwrap();
    assert!(max_abs_diff(&c, &a) > 1e-3);
    let kv_other = unet.precompute_prompt_kv(other).unwrap();
    let d = unet.forward_with_kv(sample, t, &kv_other).unwrap();
    assert!(max_abs_diff(&c, &d) <= tol(1e-6));
    assert!(max_abs_diff(&d, &b) > 1e-3);

    // Mismatched prompt batch is an error.
    let three = Tensor::cat(&[ehs, &one], 0).unwrap();
    let kv3 = unet.precompute_prompt_kv(&three).unwrap();
    assert!(unet.forward_with_kv(sample, t, &kv3).is_err());
}

#[test]
fn cross_frame_attention() {
    let unet = load("tiny-sd15");
    let g = golden("unet_sd15");
    let sample = &g["case3.sample"];
    let t = &g["case3.timestep"];
    let ehs = &g["case3.encoder_hidden_states"];
    let normal = unet.forward(sample, t, ehs).unwrap();
    let run = |s: &Tensor, t: &Tensor, e: &Tensor, refs| {
        let opts = ForwardOptions {
            self_attn: SelfAttnMode::CrossFrame(refs),
        };
        unet.forward_ext(s, t, Conditioning::Embeddings(e), &opts)
            .unwrap()
    };
    // Batch of one: identical to ordinary self-attention, for every variant.
    let s0 = sample.narrow(0, 0, 1).unwrap();
    let t0 = t.narrow(0, 0, 1).unwrap();
    let e0 = ehs.narrow(0, 0, 1).unwrap();
    let n0 = unet.forward(&s0, &t0, &e0).unwrap();
    for refs in [FrameRefs::AllOthers, FrameRefs::First, FrameRefs::Previous] {
        assert_eq!(
            max_abs_diff(&run(&s0, &t0, &e0, refs), &n0),
            0.0,
            "{refs:?}"
        );
    }
    // Batch of two: differs from normal and is deterministic.
    for refs in [FrameRefs::AllOthers, FrameRefs::First, FrameRefs::Previous] {
        let x = run(sample, t, ehs, refs);
        let y = run(sample, t, ehs, refs);
        assert_eq!(max_abs_diff(&x, &y), 0.0, "{refs:?} not deterministic");
        assert!(max_abs_diff(&x, &normal) > 1e-4, "{refs:?} equals normal");
        let x1 = x.narrow(0, 1, 1).unwrap();
        let n1 = normal.narrow(0, 1, 1).unwrap();
        assert!(
            max_abs_diff(&x1, &n1) > 1e-4,
            "{refs:?}: sample 1 unchanged"
        );
        if refs != FrameRefs::AllOthers {
            // Sample 0 has no reference: ordinary self-attention.
            let x0 = x.narrow(0, 0, 1).unwrap();
            let n0 = normal.narrow(0, 0, 1).unwrap();
            assert!(
                max_abs_diff(&x0, &n0) <= tol(1e-6),
                "{refs:?}: sample 0 changed"
            );
        }
    }
    // Cross-frame also works with cached prompt K/V.
    let kv = unet.precompute_prompt_kv(ehs).unwrap();
    let opts = ForwardOptions {
        self_attn: SelfAttnMode::CrossFrame(FrameRefs::Previous),
    };
    let a = unet
        .forward_ext(sample, t, Conditioning::PromptKv(&kv), &opts)
        .unwrap();
    let b = run(sample, t, ehs, FrameRefs::Previous);
    assert!(max_abs_diff(&a, &b) <= tol(1e-6));
}

#[test]
fn frame_refs_rule() {
    assert_eq!(FrameRefs::AllOthers.refs(1, 3), vec![0, 2]);
    assert_eq!(FrameRefs::First.refs(0, 3), Vec::<usize>::new());
    assert_eq!(FrameRefs::First.refs(2, 3), vec![0]);
    assert_eq!(FrameRefs::Previous.refs(0, 3), Vec::<usize>::new());
    assert_eq!(FrameRefs::Previous.refs(2, 3), vec![1]);
}

#[test]
fn unsupported_config_is_rejected() {
    let dir = fixture("models/tiny-sd15/unet");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["class_embed_type"] = serde_json::json!("timestep");
    let err = UNetConfig::from_json(&v.to_string()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("class_embed_type") || msg.contains("class embeddings"),
        "{msg}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["dual_cross_attention"] = serde_json::json!(true);
    let msg = format!("{:#}", UNetConfig::from_json(&v.to_string()).unwrap_err());
    assert!(msg.contains("dual_cross_attention"), "{msg}");

    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["time_embedding_type"] = serde_json::json!("fourier");
    let msg = format!("{:#}", UNetConfig::from_json(&v.to_string()).unwrap_err());
    assert!(msg.contains("fourier"), "{msg}");
}
