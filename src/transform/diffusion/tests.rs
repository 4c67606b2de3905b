//! Unit tests of `diffusion` (kept in their own file so that the module itself stays readable).
use super::*;
use crate::config;
use crate::model::rel_err;
use crate::pipeline::CfgType;
use crate::profile::{ModelConfig, Profile};
use candle_core::{DType, Device, Tensor};

fn fixture(rel: &str) -> std::path::PathBuf {
    crate::model::testing::fixtures_dir().join(rel)
}

fn model() -> Arc<StableDiffusion> {
    let mut m = ModelConfig {
        id: fixture("models/tiny-sd15").display().to_string(),
        tiny_vae: fixture("models/tiny-taesd").display().to_string(),
        ..Default::default()
    };
    m.lora.clear();
    Arc::new(load_model(&config::model_options(&m)).unwrap())
}

fn profile(t: &[u32], cfg: CfgType) -> Profile {
    let mut p = Profile::default();
    p.stream.width = crate::profile::StreamDim::Px(32);
    p.stream.height = crate::profile::StreamDim::Px(24);
    p.stream.t_index_list = t.to_vec();
    p.stream.cfg_type = cfg;
    p.stream.guidance_scale = 1.5;
    p.stream.delta = 0.8;
    p
}

fn frame(seq: u64) -> Frame {
    let data = crate::source::pattern::render(32, 24, seq);
    Frame::new(32, 24, PixelFormat::Rgb24, ColorRange::Full, data).unwrap()
}

fn image(seq: u64) -> Tensor {
    let f = frame(seq);
    stream::images_from_rgb(&[&f.data], 32, 24, DType::F32, &Device::Cpu).unwrap()
}

fn prepare(m: &Arc<StableDiffusion>, p: &Profile) -> StreamDiffusion {
    StreamDiffusion::prepare(
        m.clone(),
        config::stream_params(p),
        config::live_params(p),
        &p.prompt,
        &p.negative_prompt,
        Noise::seeded(p.stream.seed),
    )
    .unwrap()
}

#[test]
fn warm_start_first_output_is_the_cold_streams_first_real_one() {
    let m = model();
    let mut p = profile(&[20, 35, 45], CfgType::SelfNeg);
    p.stream.warm_start = false;
    let mut cold = prepare(&m, &p);
    let x = image(0);
    let c: Vec<Tensor> = (0..3).map(|_| cold.img2img(&x).unwrap()).collect();
    p.stream.warm_start = true;
    let mut warm = prepare(&m, &p);
    let w0 = warm.img2img(&x).unwrap();
    // Priming runs the same batches the cold stream ran on its first k − 1 calls, so the
    // warm first output is the cold stream's k-th.
    assert!(rel_err(&w0, &c[2]).unwrap() < 1e-5);
    // ... while the cold stream's first output came from a zero buffer and is different.
    assert!(rel_err(&c[0], &c[2]).unwrap() > 1e-2);
}

#[test]
fn prompt_update_rebuilds_both_embeddings() {
    let m = model();
    let mut p = profile(&[35], CfgType::Full);
    p.prompt = "a red fox".into();
    p.negative_prompt = "blurry".into();
    let mut a = prepare(&m, &p);
    let x = image(3);
    let before = a.img2img(&x).unwrap();
    // Only the negative prompt changes: the output must change (full CFG uses it) and must
    // equal a stream prepared with the new negative prompt from the start.
    a.set_prompts("a red fox", "grainy, dark", 0).unwrap();
    let after = a.img2img(&x).unwrap();
    let mut q = p.clone();
    q.negative_prompt = "grainy, dark".into();
    let fresh = prepare(&m, &q).img2img(&x).unwrap();
    assert!(rel_err(&after, &fresh).unwrap() < 1e-5);
    assert!(rel_err(&after, &before).unwrap() > 1e-3);
}

#[test]
fn prompt_blend_reaches_the_new_prompt() {
    let m = model();
    let mut p = profile(&[35], CfgType::None);
    p.prompt = "a red fox".into();
    let mut a = prepare(&m, &p);
    let x = image(1);
    let start = a.img2img(&x).unwrap();
    a.set_prompts("a city at night", &p.negative_prompt, 3)
        .unwrap();
    let mid = a.img2img(&x).unwrap();
    a.img2img(&x).unwrap();
    let end = a.img2img(&x).unwrap();
    let mut q = p.clone();
    q.prompt = "a city at night".into();
    let target = prepare(&m, &q).img2img(&x).unwrap();
    assert!(rel_err(&end, &target).unwrap() < 1e-5);
    // The first blended frame is neither the old nor the new picture.
    assert!(rel_err(&mid, &start).unwrap() > 1e-4);
    assert!(rel_err(&mid, &target).unwrap() > 1e-4);
}

#[test]
fn cross_frame_attention_is_a_no_op_for_one_sample_and_acts_on_a_batch() {
    let m = model();
    let x = image(2);
    for (t, expect_same) in [(vec![35u32], true), (vec![20, 40], false)] {
        let mut p = profile(&t, CfgType::None);
        let mut plain = prepare(&m, &p);
        p.stream.cross_frame_attention = true;
        let mut cross = prepare(&m, &p);
        let (mut a, mut b) = (None, None);
        for _ in 0..3 {
            a = Some(plain.img2img(&x).unwrap());
            b = Some(cross.img2img(&x).unwrap());
        }
        let e = rel_err(&b.unwrap(), &a.unwrap()).unwrap();
        if expect_same {
            assert!(e < 1e-5, "batch of one: {e}");
        } else {
            assert!(e > 1e-4, "batch of two: {e}");
        }
    }
}

#[test]
fn transform_collects_frame_buffer_and_keeps_settings_on_a_bad_change() {
    let m = model();
    let mut p = profile(&[35], CfgType::None);
    p.stream.frame_buffer_size = 2;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    let mut out = Vec::new();
    t.process_into(&frame(0), &mut out).unwrap();
    assert!(out.is_empty(), "one frame of two: nothing yet");
    t.process_into(&frame(1), &mut out).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].width, out[0].height), (32, 24));
    assert_eq!(out[1].seq, frame(1).seq);
    // An index past the schedule fails to prepare; the old stream keeps working.
    let mut bad = p.clone();
    bad.stream.t_index_list = vec![60];
    assert!(t.apply(&config::transform_options(&bad)).is_err());
    assert_eq!(t.stream().params().t_index_list, vec![35]);
    out.clear();
    t.process_into(&frame(2), &mut out).unwrap();
    t.process_into(&frame(3), &mut out).unwrap();
    assert_eq!(out.len(), 2);
    // A good change prepares again.
    let mut good = p.clone();
    good.stream.t_index_list = vec![30, 40];
    good.stream.frame_buffer_size = 1;
    t.apply(&config::transform_options(&good)).unwrap();
    out.clear();
    t.process_into(&frame(4), &mut out).unwrap();
    assert_eq!(out.len(), 1);
}

/// Every-frame mode as a property over N = 1..12 frames, k = 1..4 steps and
/// `frame_buffer_size` 1..3 (issue 11 §1): exactly N outputs, in input order, each made
/// from its own input. With row-independent settings (no CFG, no cross-frame attention) a
/// frame's output depends only on that frame and its row in the call (each row has its own
/// noise), so output i must equal the output of a fresh stream given frame i at the same
/// row, and be nearer to it than to any other frame's.
#[test]
fn every_frame_mode_returns_one_output_per_input_made_from_it() {
    let m = model();
    let t_lists: [&[u32]; 4] = [&[35], &[20, 35], &[10, 25, 40], &[10, 20, 30, 40]];
    let input = |i: usize| frame(i as u64 * 17 + 3);
    let run = |p: &Profile, frames: &[Frame]| -> Vec<Frame> {
        let mut t =
            DiffusionTransform::with_model(m.clone(), &config::transform_options(p)).unwrap();
        t.set_every_frame(true);
        let mut out = Vec::new();
        for f in frames {
            t.process_into(f, &mut out).unwrap();
        }
        t.flush(&mut out).unwrap();
        assert_eq!(t.held(), 0);
        out
    };
    let dist = |a: &Frame, b: &Frame| -> u64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs().pow(2))
            .sum()
    };
    for (k, t_list) in t_lists.iter().enumerate() {
        let k = k + 1;
        for fbs in 1..=3usize {
            let mut base = profile(t_list, CfgType::None);
            base.stream.similarity_filter = false;
            base.stream.cross_frame_attention = false;
            base.stream.frame_buffer_size = fbs as u32;
            // refs[i][r]: frame i's output at row r (a call of fbs copies of frame i).
            let refs: Vec<Vec<Frame>> = (0..12).map(|i| run(&base, &vec![input(i); fbs])).collect();
            for n in 1..=12usize {
                let mut p = base.clone();
                p.stream.warm_start = n % 2 == 0;
                let frames: Vec<Frame> = (0..n).map(input).collect();
                let out = run(&p, &frames);
                let what = format!("k {k}, fbs {fbs}, N {n}");
                assert_eq!(out.len(), n, "{what}");
                for (i, o) in out.iter().enumerate() {
                    assert_eq!(o.seq, frames[i].seq, "{what}: output {i} out of order");
                    let r = i % fbs;
                    let nearest = (0..n).min_by_key(|&j| dist(o, &refs[j][r])).unwrap();
                    assert_eq!(nearest, i, "{what}: output {i} looks like input {nearest}");
                    assert!(
                        dist(o, &refs[i][r]) <= o.data.len() as u64,
                        "{what}: output {i} differs from its frame's own output"
                    );
                }
            }
        }
    }
}

/// In every-frame mode a frame the similarity filter skips repeats the previous frame's
/// output, in order, even while that output is still in the batch.
#[test]
fn every_frame_mode_keeps_order_with_the_similarity_filter() {
    let m = model();
    let mut p = profile(&[20, 35], CfgType::None);
    p.stream.similarity_filter = true;
    p.stream.max_skip_frame = 10;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    t.set_every_frame(true);
    // A, A, A, B, B, A with B the negative of A (cosine similarity −1: always processed).
    let inputs: Vec<Frame> = [false, false, false, true, true, false]
        .iter()
        .enumerate()
        .map(|(i, &negative)| {
            let mut f = frame(5);
            if negative {
                f.data.iter_mut().for_each(|v| *v = 255 - *v);
            }
            f.seq = i as u64;
            f
        })
        .collect();
    let mut out = Vec::new();
    for f in &inputs {
        t.process_into(f, &mut out).unwrap();
    }
    t.flush(&mut out).unwrap();
    let seqs: Vec<u64> = out.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(t.skipped(), 3, "the repeats of A and of B are skipped");
    assert_eq!(
        out[1].data, out[0].data,
        "a skipped frame repeats the previous output"
    );
    assert_eq!(out[2].data, out[0].data);
    assert_eq!(out[4].data, out[3].data);
    assert_ne!(out[3].data, out[0].data);
    assert_ne!(out[5].data, out[3].data);
}

/// Real time: outputs come at once (the warm-up ones too, so the first picture is early):
/// one output per frame given to the model, so only a frame still collected for the next
/// call is held, and a stream prepared again counts just that one as discarded.
#[test]
fn real_time_counts_the_frames_a_new_stream_drops() {
    let m = model();
    let mut p = profile(&[10, 20, 30], CfgType::None);
    p.stream.frame_buffer_size = 2;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    let mut out = Vec::new();
    for i in 0..5 {
        t.process_into(&frame(i), &mut out).unwrap();
    }
    assert_eq!(
        out.len(),
        4,
        "real time returns an output per frame of each call"
    );
    assert_eq!(t.held(), 1, "the fifth frame waits for its pair");
    let mut q = p.clone();
    q.stream.t_index_list = vec![20, 30];
    t.apply(&config::transform_options(&q)).unwrap();
    assert_eq!((t.held(), t.discarded()), (0, 1));
}

/// Every-frame mode: a frame the similarity filter skips right after a frame whose call
/// failed has nothing to repeat; it is counted as lost and later frames still come out.
#[test]
fn a_repeat_of_a_failed_frame_does_not_block_later_outputs() {
    let m = model();
    let mut p = profile(&[35], CfgType::None);
    p.stream.frame_buffer_size = 2;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    t.set_every_frame(true);
    // The state a failed first call leaves: its frames are forgotten, the frame the filter
    // skipped after them (a Repeat) remains, and no output exists yet.
    t.slots.push_back(Slot::of(SlotKind::Repeat, &frame(5)));
    assert!(t.last.is_none());
    let mut out = Vec::new();
    for i in [20u64, 40] {
        t.process_into(&frame(i), &mut out).unwrap();
    }
    t.flush(&mut out).unwrap();
    assert_eq!((t.held(), t.discarded()), (0, 1));
    assert_eq!(out.len(), 2, "outputs after the failure never came out");
}

#[test]
fn similarity_filter_answers_static_frames_from_the_last_output() {
    let m = model();
    let mut p = profile(&[35], CfgType::None);
    p.stream.similarity_filter = true;
    p.stream.max_skip_frame = 3;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    let mut out = Vec::new();
    let still = frame(5);
    for _ in 0..9 {
        t.process_into(&still, &mut out).unwrap();
    }
    assert_eq!(out.len(), 9);
    // Identical frames: processed, 3 skipped, processed, 3 skipped, processed.
    assert_eq!(t.skipped(), 6);
    assert!(out.windows(2).all(|w| w[0].data == w[1].data));
    // Switching the filter off processes every frame.
    p.stream.similarity_filter = false;
    t.apply(&config::transform_options(&p)).unwrap();
    for _ in 0..3 {
        t.process_into(&still, &mut out).unwrap();
    }
    assert_eq!(t.skipped(), 6);
}

/// `model.dtype = "bf16"` on the CPU: f32 frames in and out, within bf16 rounding of the f32
/// pipeline (the stream's bf16-products tolerance, `sdcam::model::testing`) and not equal to
/// it; on a CPU without AVX512-BF16, a clear refusal that says what to use.
#[test]
fn bf16_on_the_cpu_runs_close_to_f32_or_says_what_to_do() {
    let config = |dtype| ModelConfig {
        id: fixture("models/tiny-sd15").display().to_string(),
        tiny_vae: fixture("models/tiny-taesd").display().to_string(),
        dtype,
        lora: Vec::new(),
        ..Default::default()
    };
    let loaded = load_model(&config::model_options(&config(
        crate::profile::DtypeName::Bf16,
    )));
    if !crate::model::device::cpu_runs_bf16() {
        let e = format!("{:#}", loaded.err().unwrap());
        assert!(e.contains("AVX512-BF16") && e.contains("f32"), "{e}");
        return;
    }
    let bf16 = Arc::new(loaded.unwrap());
    let f32 = Arc::new(
        load_model(&config::model_options(&config(
            crate::profile::DtypeName::F32,
        )))
        .unwrap(),
    );
    let p = profile(&[32, 45], CfgType::SelfNeg);
    let (mut a, mut b) = (prepare(&bf16, &p), prepare(&f32, &p));
    assert_eq!(
        a.device_dtype().1,
        DType::F32,
        "bf16 on the CPU computes in f32"
    );
    for seq in 0..3 {
        let x = image(seq);
        let (ya, yb) = (a.img2img(&x).unwrap(), b.img2img(&x).unwrap());
        assert_eq!(ya.dtype(), DType::F32);
        let e = crate::model::rel_err(&ya, &yb).unwrap();
        let tol = crate::model::testing::tolerance(&Device::Cpu, DType::BF16, 1e-3);
        assert!(
            e > 0.0 && e <= tol,
            "frame {seq}: rel err {e} (tolerance {tol})"
        );
    }
}

#[test]
fn f16_runs_on_the_cpu() {
    let m = ModelConfig {
        id: fixture("models/tiny-sd15").display().to_string(),
        tiny_vae: fixture("models/tiny-taesd").display().to_string(),
        dtype: crate::profile::DtypeName::F16,
        ..Default::default()
    };
    let model = Arc::new(load_model(&config::model_options(&m)).unwrap());
    let p = profile(&[32, 45], CfgType::SelfNeg);
    let mut s = prepare(&model, &p);
    let x = image(0).to_dtype(candle_core::DType::F16).unwrap();
    let out = s.img2img(&x).unwrap();
    assert_eq!(out.dtype(), candle_core::DType::F16);
    let rgb = stream::rgb_from_images(&out).unwrap();
    assert_eq!(rgb[0].len(), 32 * 24 * 3);
}

#[test]
fn txt2img_streams_without_using_the_input() {
    let m = model();
    let mut p = profile(&[0], CfgType::None);
    p.stream.mode = StreamMode::Txt2img;
    let mut t = DiffusionTransform::with_model(m, &config::transform_options(&p)).unwrap();
    let mut out = Vec::new();
    t.process_into(&frame(0), &mut out).unwrap();
    t.process_into(&frame(0), &mut out).unwrap();
    assert_eq!(out.len(), 2);
    // Fresh latents every call: two different pictures from the same input.
    assert_ne!(out[0].data, out[1].data);
}
