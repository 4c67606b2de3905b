#!/usr/bin/env python
"""Golden tensors of the reference StreamDiffusion (pip `streamdiffusion` 0.1.1) stream loop.

Runs `streamdiffusion.StreamDiffusion` itself (prepare() + stream(x) / txt2img / txt2img_sd_turbo)
on the tiny random-weight fixture models of make_fixtures.py, at 32x24 pixels (latent 4x3), and
writes what the Rust stream must reproduce:

    /opt/peer/bin/python scripts/reference/make_stream_goldens.py          # writes tests/fixtures/golden/stream/
    /opt/peer/bin/python scripts/reference/make_stream_goldens.py --check  # regenerate in a temp dir, compare bytes

Everything the reference draws at random is either stored (init_noise, txt2img latents, the
randn_like draws of the sequential loop) or removed (the KL-VAE latent sample: mean instead).
Patches applied to the reference are listed in PATCHES below and in the generated README.md.
Deterministic: fixed seeds, 1 torch thread, deterministic algorithms; a rerun is bit-identical.
"""
import argparse
import contextlib
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


# ---- CPU stand-in for the CUDA timing in StreamDiffusion.__call__ ---------------------------
# __call__ creates two torch.cuda.Event(enable_timing=True), records them around the work and
# calls torch.cuda.synchronize() to compute an inference-time EMA (only used by the similar-image
# filter's sleep). Neither exists without CUDA; this stand-in measures wall time instead and does
# not touch any tensor.
class _WallClockEvent:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


torch.cuda.Event = _WallClockEvent
torch.cuda.synchronize = lambda *a, **k: None

import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402
import streamdiffusion.pipeline as sdp  # noqa: E402
from streamdiffusion import StreamDiffusion  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FX = os.path.join(REPO, "tests", "fixtures")
OUT_REL = os.path.join("tests", "fixtures", "golden", "stream")

WIDTH, HEIGHT = 32, 24
N_FRAMES = 10
NUM_STEPS = 50
PROMPT = "a watercolor painting of a fox"
NEGATIVE = "blurry, low quality"
PROMPT2 = "an oil painting of a city at night"
NEGATIVE2 = "grainy, dark"
SEED = 2            # StreamDiffusion.prepare(seed=...) -> init_noise
GUIDANCE = 1.4
DELTA = 0.8
FRAMES_SEED = 1234  # synthetic input frames (numpy PCG64)
LATENTS_SEED = 3    # txt2img x_t latents (torch.Generator)
STEP_NOISE_SEED = 4  # randn_like draws of the sequential loop (torch.Generator)

MODEL_DIRS = {"tiny-sd15": os.path.join(FX, "models", "tiny-sd15"),
              "tiny-sd21": os.path.join(FX, "models", "tiny-sd21")}
TAESD_DIR = os.path.join(FX, "models", "tiny-taesd")


def log(*a):
    print(*a, flush=True)


# ============================================================================================
# Cases
# ============================================================================================


def case(model="tiny-sd15", vae="taesd", mode="img2img", t=(32, 45), fbs=1, batch=True, add_noise=True,
         cfg="none", calls=None, **extra):
    calls = calls or (8 if fbs == 1 else 5)
    c = dict(model=model, vae=vae, mode=mode, t_index_list=list(t), num_inference_steps=NUM_STEPS,
             frame_buffer_size=fbs, use_denoising_batch=batch, do_add_noise=add_noise, cfg_type=cfg,
             guidance_scale=GUIDANCE, delta=DELTA, seed=SEED, prompt=PROMPT, negative_prompt=NEGATIVE,
             width=WIDTH, height=HEIGHT, calls=calls, frames_per_call=fbs)
    c.update(extra)
    return c


CFGS = ("none", "full", "self", "initialize")
K_LISTS = {1: (35,), 2: (32, 45), 4: (0, 16, 32, 45)}


def all_cases():
    cases = []
    # 1. denoising batch, fbs 1, TAESD
    for k in (1, 2, 4):
        for cfg in CFGS:
            cases.append((f"b_k{k}_{cfg}", case(t=K_LISTS[k], cfg=cfg)))
    # 2. sequential (use_denoising_batch=False), fbs 1
    cases.append(("seq_k1_none", case(t=K_LISTS[1], batch=False)))
    for k in (2, 4):
        for cfg in CFGS:
            cases.append((f"seq_k{k}_{cfg}", case(t=K_LISTS[k], batch=False, cfg=cfg)))
    # 3. frame_buffer_size 2
    for cfg in ("none", "full", "self", "initialize"):
        cases.append((f"fbs2_b_k1_{cfg}", case(t=K_LISTS[1], fbs=2, cfg=cfg)))
    cases.append(("fbs2_b_k2_none", case(t=K_LISTS[2], fbs=2)))
    cases.append(("fbs2_seq_k2_none", case(t=K_LISTS[2], fbs=2, batch=False)))
    # 4. no re-noising of the latent buffer
    cases.append(("b_k2_none_noaddnoise", case(add_noise=False)))
    # 5. full AutoencoderKL instead of TAESD
    cases.append(("b_k2_none_klvae", case(vae="kl")))
    # 6. txt2img
    cases.append(("txt2img_b_k1_none", case(mode="txt2img", t=K_LISTS[1])))
    cases.append(("txt2img_b_k2_none", case(mode="txt2img")))
    cases.append(("txt2img_b_k2_self", case(mode="txt2img", cfg="self")))
    cases.append(("txt2img_sd_turbo_sd21", case(model="tiny-sd21", mode="txt2img_sd_turbo", t=(0,))))
    # 7. SD2-shaped text encoder / tokenizer
    cases.append(("sd21_b_k1_none", case(model="tiny-sd21", t=K_LISTS[1])))
    # 8. prompt + negative prompt change before call index 4
    for cfg in ("full", "self"):
        cases.append((f"prompt_update_b_k2_{cfg}",
                       case(cfg=cfg, update_before_call=4, prompt2=PROMPT2, negative2=NEGATIVE2)))
    return cases


# ============================================================================================
# Inputs
# ============================================================================================


def make_frames():
    """10 smooth moving frames: a rotating colour gradient + 3 Gaussian blobs moving on straight
    lines + a slow sine ripple. uint8 [N, H, W, 3]."""
    rng = np.random.default_rng(FRAMES_SEED)
    yy, xx = np.meshgrid(np.arange(HEIGHT, dtype=np.float64) / (HEIGHT - 1),
                         np.arange(WIDTH, dtype=np.float64) / (WIDTH - 1), indexing="ij")
    base_col = rng.uniform(0.2, 0.8, size=3)
    grad_dir = rng.uniform(-0.5, 0.5, size=(3, 2))
    blobs = [dict(p0=rng.uniform(0.15, 0.85, size=2), v=rng.uniform(-0.06, 0.06, size=2),
                  sigma=rng.uniform(0.12, 0.25), col=rng.uniform(-0.6, 0.6, size=3)) for _ in range(3)]
    frames = []
    for i in range(N_FRAMES):
        ang = 0.15 * i
        ca, sa = np.cos(ang), np.sin(ang)
        u, v = ca * (xx - 0.5) - sa * (yy - 0.5), sa * (xx - 0.5) + ca * (yy - 0.5)
        img = np.empty((HEIGHT, WIDTH, 3))
        for c in range(3):
            img[..., c] = base_col[c] + grad_dir[c, 0] * u + grad_dir[c, 1] * v
        img += 0.05 * np.sin(9.0 * xx + 5.0 * yy + 0.7 * i)[..., None]
        for b in blobs:
            cx, cy = b["p0"] + i * b["v"]
            d2 = (xx - cx) ** 2 + ((yy - cy) * HEIGHT / WIDTH) ** 2
            img += np.exp(-d2 / (2 * b["sigma"] ** 2))[..., None] * b["col"]
        frames.append(np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))
    u8 = np.stack(frames)
    assert u8.shape == (N_FRAMES, HEIGHT, WIDTH, 3)
    for i in range(N_FRAMES):
        assert u8[i].std() > 20, "frame too flat"
        if i:
            d = np.abs(u8[i].astype(np.int32) - u8[i - 1]).mean()
            assert 1.0 < d < 40.0, f"frames {i - 1},{i}: mean |diff| {d}"
    return u8


# ============================================================================================
# Patches (context managers; each one is documented in PATCHES)
# ============================================================================================


class RandnLikeRecorder:
    """torch.randn_like -> draw from a seeded generator and record (the only randn_like calls made
    during a stream call are the re-noising draws of the sequential loop in predict_x0_batch)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.draws = []

    @contextlib.contextmanager
    def active(self):
        orig = torch.randn_like

        def fake(inp, *a, dtype=None, device=None, **k):
            assert not a and not k.get("generator"), (a, k)
            t = torch.randn(inp.shape, generator=self.g, dtype=torch.float32).to(
                dtype=dtype or inp.dtype, device=device or inp.device)
            self.draws.append(t.clone())
            return t

        torch.randn_like = fake
        try:
            yield
        finally:
            torch.randn_like = orig


@contextlib.contextmanager
def fixed_randn(tensor):
    """txt2img / txt2img_sd_turbo draw their x_t with an unseeded torch.randn(shape); return
    `tensor` instead (shape checked)."""
    orig = torch.randn
    used = []

    def fake(*size, **k):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)
        assert shape == tuple(tensor.shape) and "generator" not in k and not used, (shape, k)
        used.append(1)
        return tensor.clone().to(dtype=k.get("dtype") or torch.float32)

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = orig
    assert used, "torch.randn was not called"


@contextlib.contextmanager
def vae_mean_latents():
    """encode_image calls retrieve_latents(vae.encode(x), generator): for AutoencoderKL that SAMPLES
    latent_dist (mean + std * randn). Force sample_mode='argmax' (= latent_dist.mean)."""
    orig = sdp.retrieve_latents

    def argmax(encoder_output, generator=None, sample_mode="sample"):
        return orig(encoder_output, generator, sample_mode="argmax")

    sdp.retrieve_latents = argmax
    try:
        yield
    finally:
        sdp.retrieve_latents = orig


def rebuild_prompt_embeds(stream, prompt, negative):
    """prepare()'s prompt_embeds construction, verbatim, for new prompt AND negative prompt.
    (update_prompt() would drop the negative prompt and the uncond half for cfg full/initialize.)
    Touches nothing else (buffers, init_noise, stock_noise, timesteps stay)."""
    do_cfg = stream.guidance_scale > 1.0
    enc = stream.pipe.encode_prompt(prompt=prompt, device=stream.device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=do_cfg, negative_prompt=negative)
    pe = enc[0].repeat(stream.batch_size, 1, 1)
    uncond = None
    if stream.use_denoising_batch and stream.cfg_type == "full":
        uncond = enc[1].repeat(stream.batch_size, 1, 1)
    elif stream.cfg_type == "initialize":
        uncond = enc[1].repeat(stream.frame_bff_size, 1, 1)
    if stream.guidance_scale > 1.0 and stream.cfg_type in ("initialize", "full"):
        pe = torch.cat([uncond, pe], dim=0)
    assert pe.shape == stream.prompt_embeds.shape
    stream.prompt_embeds = pe


PATCHES = [
    "`torch.cuda.Event` / `torch.cuda.synchronize` (used by `StreamDiffusion.__call__` only to time "
    "itself for `inference_time_ema`) are replaced by a wall-clock stand-in (perf_counter); no tensor "
    "is touched.",
    "`stream.vae = AutoencoderTiny(tiny-taesd)` for vae `taesd`, as the streamdiffusion wrapper does for "
    "`use_tiny_vae=True`; latent size still comes from `pipe.vae_scale_factor` (8, from the KL config).",
    "vae `kl`: `streamdiffusion.pipeline.retrieve_latents` is wrapped to force `sample_mode=\"argmax\"`, "
    "i.e. `latent_dist.mean` (the reference samples `mean + std * randn(generator)` with its "
    "prepare() generator; sdcam uses the mean). TAESD cases are unpatched (`.latents` either way).",
    "sequential cases: `torch.randn_like` is replaced during each stream call by draws from "
    f"`torch.Generator().manual_seed({STEP_NOISE_SEED})` (one generator per case, shared over its calls), "
    "recorded in `step_noise`. No other case draws anything (asserted).",
    "txt2img / txt2img_sd_turbo: the methods `StreamDiffusion.txt2img()` / `txt2img_sd_turbo()` are run "
    "unmodified, with `torch.randn` patched for the duration of the call to return the stored "
    f"`latents[c]` (drawn with `torch.Generator().manual_seed({LATENTS_SEED})`, all calls at once, "
    "shape [calls,1,4,3,4]); the shape requested is asserted.",
    "`x0` is captured by wrapping the instance's `predict_x0_batch` (its return value); for "
    "txt2img_sd_turbo (which does not call it) by wrapping `decode_image` (its argument).",
    "prompt update: before call `update_before_call`, `stream.prompt_embeds` is rebuilt exactly as "
    "`prepare()` builds it (encode_prompt(prompt2, negative_prompt=negative2, do_cfg = guidance>1), "
    "`repeat(batch_size)`, uncond half prepended for cfg full/initialize); nothing else is touched. "
    "The reference's own `update_prompt()` is NOT used (it drops the negative prompt and the uncond "
    "half, and would break cfg full).",
    "`prepare()` gets an explicit fresh `torch.Generator()` (its default argument is one generator "
    "object shared by all calls; reseeded anyway).",
]

QUIRKS = [
    "Input: `stream(x)` with x float [fbs,3,H,W] in [0,1] -> `image_processor.preprocess` = `2x-1` "
    "(nearest resize to the same size is the identity; asserted bit-equal).",
    "encode_image: `x_t = alpha[0] * (vae_latent * scaling_factor) + beta[0] * init_noise[0]`; the SAME "
    "`init_noise[0]` (row 0 only) is used for every frame of an fbs batch; alpha/beta[0] are "
    "t_index_list[0]'s.",
    "cfg_type `none` forces guidance_scale to 1.0 (no CFG). CFG only when guidance_scale > 1.",
    "Batch mode, k>1: x_t_latent = cat(new x_t, x_t_latent_buffer) (buffer starts as ZEROS, so the "
    "first k-1 calls denoise zero latents in the later slots); output is `x0_batch[-1:]` (ONE frame, "
    "even when fbs>1); new buffer = alpha[1:] * x0_batch[:-1] + beta[1:] * init_noise[1:] "
    "(without the beta term when do_add_noise=False).",
    "do_add_noise=False only drops the beta*init_noise[1:] term of the batch-mode buffer update; "
    "encode_image still adds beta[0]*init_noise[0], and in sequential mode it drops the re-noising draw.",
    "Batch mode, k>1, cfg self/initialize: before the UNet, stock_noise = cat(init_noise[0:1], "
    "stock_noise[:-1]) (shift by one row, also when fbs>1). stock_noise starts as zeros.",
    "cfg self/initialize in batch mode: uncond = delta * stock_noise; eps = uncond + g*(eps_c - uncond); "
    "after the step: delta_x = step(eps, beta * stock_noise) (the c_out*F + c_skip*x formula applied to "
    "x := beta*stock_noise), delta_x *= alpha_next / beta_next with alpha_next = cat(alpha[1:], 1), "
    "beta_next = cat(beta[1:], 1); stock_noise = roll(init_noise, -1 row) + delta_x. alpha/beta are "
    "the fbs-repeated [k*fbs] tables, so with fbs 2, k 1 alpha_next = [alpha_t, 1].",
    "cfg initialize: UNet batch = cat(x_t[0:1], x_t) with t = cat(t[0:1], t) and prompt_embeds = "
    "cat(uncond x fbs, cond x batch_size); stock_noise = cat(eps[0:1], stock_noise[1:]) before use "
    "(then overwritten by the self-style update in batch mode). With fbs 2 the UNet gets 1+fbs = 3 latent "
    "rows but 2*fbs = 4 prompt_embeds rows: cross-attention crashes (fbs2_b_k1_initialize).",
    "cfg full: UNet batch = cat(x_t, x_t), prompt_embeds = cat(uncond x batch, cond x batch); "
    "eps = eps_u + g*(eps_c - eps_u); no stock_noise.",
    "c_skip / c_out are [k,1,1,1] and NOT repeated for fbs (alpha/beta ARE repeat_interleave'd by fbs in "
    "batch mode, as are the UNet timesteps); with fbs 2, k 1 they broadcast, with fbs 2, k 2 "
    "scheduler_step_batch crashes ([2,1,1,1] vs [4,...]). Were it not for that, the k>1 batch path would "
    "still return one frame per call and grow the buffer to k*fbs-1 rows (crash on the next call).",
    "fbs 2, k 1: init_noise has 2 rows but encode uses row 0 for both frames, so with cfg none/full each "
    "frame's result equals the fbs-1 result for that frame (fbs2_b_k1_none == b_k1_none on frames 0..7 up "
    "to float noise); with cfg self the 2 rows of stock_noise evolve differently (alpha_next/beta_next, "
    "rolled init_noise), so it does not.",
    "Sequential mode (use_denoising_batch=False): predict_x0_batch first sets `init_noise = x_t` (the "
    "encoded, noised latent of THIS call), so from the 2nd call on, encode_image's noise is the previous "
    "call's noised input latent row 0, not random noise. Then per step idx: x0 = step_idx(eps); "
    "x_t = alpha[idx+1]*x0 + beta[idx+1]*randn (randn = `step_noise`; no randn without do_add_noise).",
    "Sequential mode, cfg self: stock_noise is never updated (stays zeros) -> eps = g * eps_cond "
    "(guidance 1.4 scales the prediction). cfg initialize: stock_noise = eps_uncond of this UNet call, "
    "eps = delta*eps_u + g*(eps_c - delta*eps_u). cfg full: prepare() crashes (see manifest `failed`).",
    "Sequential mode: alpha/beta/c tables are NOT fbs-repeated ([k,1,1,1], indexed by step); timesteps "
    "per step are t.repeat(fbs).",
    "decode_image: `vae.decode(x0 / scaling_factor)`; outputs are raw, not clamped (the tiny random "
    "models give values well outside [-1,1], down to about -4.3).",
    "txt2img: x_t is a fresh [1,4,h,w] randn per call (stored as `latents`), through predict_x0_batch "
    "(so buffers/stock_noise evolve as in img2img). txt2img_sd_turbo: eps = unet(x_t, sub_timesteps, "
    "prompt_embeds); x0 = (x_t - beta*eps)/alpha (NO c_skip/c_out, no CFG), decoded.",
    "tiny-sd21 uses LCMScheduler.from_config(EulerDiscrete sd-turbo config) (timestep_spacing trailing "
    "ignored by LCM's own set_timesteps).",
]


# ============================================================================================
# Runner
# ============================================================================================


class Models:
    def __init__(self):
        self.pipes = {}
        for name, d in MODEL_DIRS.items():
            p = StableDiffusionPipeline.from_pretrained(d, torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False, local_files_only=True)
            p.set_progress_bar_config(disable=True)
            assert p.vae_scale_factor == 8
            self.pipes[name] = p.to("cpu")
        self.taesd = AutoencoderTiny.from_pretrained(TAESD_DIR, torch_dtype=torch.float32,
                                                     local_files_only=True).to("cpu").eval()


def run_case(models, name, c, frames):
    pipe = models.pipes[c["model"]]
    stream = StreamDiffusion(pipe, t_index_list=list(c["t_index_list"]), torch_dtype=torch.float32,
                             width=c["width"], height=c["height"], do_add_noise=c["do_add_noise"],
                             use_denoising_batch=c["use_denoising_batch"],
                             frame_buffer_size=c["frame_buffer_size"], cfg_type=c["cfg_type"])
    if c["vae"] == "taesd":
        stream.vae = models.taesd
    else:
        assert stream.vae is pipe.vae
    stage = "prepare"
    outs, x0s, lat_list, step_noise = [], [], [], []
    k, fbs, calls = len(c["t_index_list"]), c["frame_buffer_size"], c["calls"]
    try:
        stream.prepare(c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["num_inference_steps"],
                       guidance_scale=c["guidance_scale"], delta=c["delta"], generator=torch.Generator(),
                       seed=c["seed"])
        init_noise = stream.init_noise.clone()
        captured = []
        if c["mode"] == "txt2img_sd_turbo":
            dec = stream.decode_image
            stream.decode_image = lambda x0: (captured.append(x0.clone()), dec(x0))[1]
        else:
            pred = stream.predict_x0_batch
            stream.predict_x0_batch = lambda x: (lambda r: (captured.append(r.clone()), r)[1])(pred(x))
        if c["mode"] != "img2img":
            g = torch.Generator().manual_seed(LATENTS_SEED)
            latents = torch.randn((calls, fbs, 4, stream.latent_height, stream.latent_width), generator=g)
        rec = RandnLikeRecorder(STEP_NOISE_SEED)
        expect_draws = (not c["use_denoising_batch"]) and c["do_add_noise"] and k > 1
        for i in range(calls):
            stage = f"call {i}"
            if c.get("update_before_call") == i:
                rebuild_prompt_embeds(stream, c["prompt2"], c["negative2"])
            n_before = len(rec.draws)
            with torch.no_grad(), rec.active(), (vae_mean_latents() if c["vae"] == "kl" else contextlib.nullcontext()):
                if c["mode"] == "img2img":
                    x = frames[i * fbs:(i + 1) * fbs]
                    if i == 0:
                        pp = stream.image_processor.preprocess(x, stream.height, stream.width)
                        assert torch.equal(pp, 2.0 * x - 1.0), "preprocess is not 2x-1"
                    out = stream(x)
                elif c["mode"] == "txt2img":
                    with fixed_randn(latents[i]):
                        out = stream.txt2img(batch_size=fbs)
                else:
                    with fixed_randn(latents[i]):
                        out = stream.txt2img_sd_turbo(batch_size=fbs)
            new = rec.draws[n_before:]
            assert len(new) == ((k - 1) if expect_draws else 0), (name, len(new))
            if expect_draws:
                step_noise.append(torch.stack(new))
            assert out.shape == (fbs, 3, c["height"], c["width"]), f"output shape {tuple(out.shape)} at call {i}"
            assert len(captured) == i + 1 and captured[i].shape == (fbs, 4, 3, 4), \
                f"x0 shape {tuple(captured[i].shape)} at call {i}"
            outs.append(out.detach().clone())
    except Exception as e:  # the reference cannot run this configuration
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        tb = traceback.extract_tb(e.__traceback__)
        sd = [f"streamdiffusion/pipeline.py:{f.lineno} {f.name}" for f in tb if f.filename == sdp.__file__]
        where = sd[-1:] + [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in tb[-1:]
                           if f.filename != sdp.__file__]
        return None, dict(name=name, case=c, stage=stage, error=" ".join(l.strip() for l in msg), where=where,
                          completed_calls=len(outs), outputs_before_failure=[list(o.shape) for o in outs],
                          x0_before_failure=[list(x.shape) for x in captured] if stage != "prepare" else [])
    tensors = dict(init_noise=init_noise, outputs=torch.cat(outs), x0=torch.cat(captured))
    if c["mode"] != "img2img":
        tensors["latents"] = latents
    if expect_draws:
        tensors["step_noise"] = torch.stack(step_noise)
    for kname, t in tensors.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), (name, kname)
    o = tensors["outputs"]
    assert o.std() > 1e-3, (name, "degenerate output")
    return tensors, dict(sub_timesteps=[int(t) for t in stream.sub_timesteps])


ST_DTYPES = {torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}


def save_st(path, tensors, metadata):
    """safetensors writer with a byte-stable header: safetensors.torch.save_file serialises the
    metadata map in per-process hash order, so files with 2+ metadata keys are not byte-identical
    across runs. Same format: u64 LE header size, JSON header (here: `__metadata__` first, then
    tensors by name, keys sorted, compact), space-padded to 8 bytes, then the little-endian data
    in header order."""
    assert sys.byteorder == "little"
    header, blobs, off = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        b = t.numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)
    with safe_open(path, "pt") as f:  # round trip through the safetensors library
        assert f.metadata() == metadata and sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name]), name


def describe(c):
    s = f"{c['mode']} {c['model']} vae {c['vae']}, t_index_list {c['t_index_list']}, fbs {c['frame_buffer_size']}, "
    s += "denoising batch" if c["use_denoising_batch"] else "sequential (no denoising batch)"
    s += f", cfg {c['cfg_type']}"
    if not c["do_add_noise"]:
        s += ", do_add_noise False"
    if "update_before_call" in c:
        s += f", prompt+negative changed before call {c['update_before_call']}"
    return s + f"; {c['calls']} stream calls."


def generate(out_dir):
    t0 = time.time()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    models = Models()
    log(f"   models loaded in {time.time() - t0:.1f} s")

    u8 = make_frames()
    frames_u8 = torch.from_numpy(u8)
    frames = frames_u8.permute(0, 3, 1, 2).float() / 255.0
    save_st(os.path.join(out_dir, "inputs.safetensors"), {"frames_u8": frames_u8, "frames": frames},
            metadata={"about": "synthetic moving frames: frames_u8 uint8 [N,H,W,RGB]; frames = "
                               "frames_u8.permute(0,3,1,2).float()/255 (what stream(x) receives)",
                      "width": str(WIDTH), "height": str(HEIGHT)})

    manifest = dict(about="StreamDiffusion 0.1.1 reference stream goldens; see README.md",
                    inputs="inputs.safetensors", versions=dict(
                        torch=torch.__version__, diffusers=diffusers.__version__,
                        transformers=transformers.__version__, streamdiffusion=sdp_version()),
                    cases=[], failed=[])
    for name, c in all_cases():
        t1 = time.time()
        tensors, info = run_case(models, name, c, frames)
        if tensors is None:
            manifest["failed"].append(info)
            log(f"   {name}: REFERENCE FAILED at {info['stage']}: {info['error']}")
            continue
        fname = f"{name}.safetensors"
        save_st(os.path.join(out_dir, fname), tensors, metadata={"case": json.dumps(c), "about": describe(c)})
        manifest["cases"].append(dict(name=name, file=fname, case=c, sub_timesteps=info["sub_timesteps"],
                                      shapes={k: list(v.shape) for k, v in tensors.items()}))
        log(f"   {name}: {time.time() - t1:.2f} s, outputs {list(tensors['outputs'].shape)}")
    write_manifest(os.path.join(out_dir, "manifest.json"), manifest)
    write_readme(out_dir, manifest)
    log(f"   {len(manifest['cases'])} cases written, {len(manifest['failed'])} failed, "
        f"{time.time() - t0:.1f} s")
    return manifest


def write_manifest(path, manifest):
    """indent-2 JSON, but each case / failed entry on one line (keeps the file small and diffable)."""
    lines = ["{"]
    keys = list(manifest)
    for i, key in enumerate(keys):
        sep = "," if i < len(keys) - 1 else ""
        v = manifest[key]
        if isinstance(v, list):
            lines.append(f"  {json.dumps(key)}: [")
            lines += [f"    {json.dumps(e, ensure_ascii=False)}" + ("," if j < len(v) - 1 else "")
                      for j, e in enumerate(v)]
            lines.append(f"  ]{sep}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(v, ensure_ascii=False)}{sep}")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert json.load(open(path, encoding="utf-8")) == manifest


def sdp_version():
    from importlib.metadata import version
    return version("streamdiffusion")


def write_readme(out_dir, manifest):
    L = ["# StreamDiffusion stream goldens (generated by scripts/reference/make_stream_goldens.py — do not edit)",
         "",
         f"Reference: pip `streamdiffusion` {manifest['versions']['streamdiffusion']}, diffusers "
         f"{manifest['versions']['diffusers']}, transformers {manifest['versions']['transformers']}, torch "
         f"{manifest['versions']['torch']} (CPU, float32, 1 thread). Models: `tests/fixtures/models/tiny-sd15`, "
         "`tiny-sd21`, `tiny-taesd`. Image 32x24 (W x H), latent 4x3: non-square, odd latent height "
         "(UNet upsample-to-skip-size path).",
         "",
         "Defaults (every case, see each case's JSON): prompt `" + PROMPT + "`, negative `" + NEGATIVE + "`, "
         f"num_inference_steps {NUM_STEPS}, guidance_scale {GUIDANCE} (cfg `none` makes it 1.0), delta {DELTA}, "
         f"seed {SEED} (prepare). img2img fbs 1: 8 calls on frames 0..7; "
         "fbs 2: 5 calls on frames 0..9 as [2,3,24,32] batches; txt2img: 8 calls. "
         "The per-case `calls` in the case JSON is authoritative.",
         "",
         "## Files",
         "",
         "* `inputs.safetensors`: `frames_u8` uint8 [10,24,32,3] (H,W,RGB; smooth moving synthetic frames); "
         "`frames` float32 [10,3,24,32] = `frames_u8.permute(0,3,1,2).float() / 255` — the tensor passed to "
         "`stream(x)` (call c gets `frames[c*fbs:(c+1)*fbs]`).",
         "* `<case>.safetensors` (float32):",
         "  * `init_noise` [batch_size,4,3,4]: `stream.init_noise` right after `prepare()` (batch_size = "
         "k*fbs in batch mode, fbs in sequential mode).",
         "  * `outputs` [calls*fbs,3,24,32]: raw `stream(x)` / `txt2img` return values (decode_image output, "
         "not clamped), concatenated in call order.",
         "  * `x0` [calls*fbs,4,3,4]: the `x_0_pred_out` latent of each call (what is decoded).",
         "  * `latents` [calls,fbs,4,3,4] (txt2img modes only): the x_t fed to each call.",
         "  * `step_noise` [calls,k-1,fbs,4,3,4] (sequential, do_add_noise, k>1 only): the `randn_like` "
         "draws of predict_x0_batch's loop, in order (entry j re-noises towards t_index_list[j+1]).",
         "  * metadata `case` (JSON: model, vae, mode, t_index_list, num_inference_steps, frame_buffer_size, "
         "use_denoising_batch, do_add_noise, cfg_type, guidance_scale, delta, seed, prompt, negative_prompt, "
         "width, height, calls, frames_per_call [, update_before_call, prompt2, negative2]) and `about`.",
         "* `manifest.json`: `cases` (name, file, case, sub_timesteps, shapes) and `failed` "
         "(configurations the reference cannot run: name, case, stage, error, calls completed before).",
         "",
         "Tolerance: these are end-to-end (text encoder, UNet x k, VAE); compare with a relative tolerance, "
         "not bit equality: `x0` reaches |x| ~ 125 where t_index 0 (t=999, alpha ~0.07) is involved "
         "(b_k4_*, seq_k4_*, sd-turbo ~50). An independent PyTorch re-implementation of the rules below "
         "(same modules, different op order/batching) matched all cases to 1.2e-5 abs on `outputs` and "
         "5.4e-5 abs on `x0`. The init noise and all random draws are stored: load them, never regenerate RNG.",
         "",
         "## Patches applied to the reference",
         ""]
    L += [f"{i + 1}. {p}" for i, p in enumerate(PATCHES)]
    L += ["", "## Reference behaviour a re-implementation must reproduce", ""]
    L += [f"* {q}" for q in QUIRKS]
    L += ["", "## Cases", "", "| case | mode | model/vae | t_index_list | fbs | batch | cfg | notes | outputs |",
          "|---|---|---|---|---|---|---|---|---|"]
    for e in manifest["cases"]:
        c = e["case"]
        notes = []
        if not c["do_add_noise"]:
            notes.append("do_add_noise False")
        if "update_before_call" in c:
            notes.append(f"prompt update before call {c['update_before_call']}")
        if "step_noise" in e["shapes"]:
            notes.append("step_noise")
        L.append(f"| `{e['name']}` | {c['mode']} | {c['model']}/{c['vae']} | {c['t_index_list']} | "
                 f"{c['frame_buffer_size']} | {'yes' if c['use_denoising_batch'] else 'no'} | {c['cfg_type']} | "
                 f"{', '.join(notes)} | {e['shapes']['outputs']} |")
    L += ["", "## Configurations the reference cannot run (no golden; see manifest `failed`)", ""]
    for f in manifest["failed"]:
        L.append(f"* `{f['name']}` ({describe(f['case'])[:-1]}): fails at {f['stage']}, "
                 f"{' <- '.join(reversed(f['where']))}: `{f['error']}`"
                 + (f" (outputs before the failure: {f['outputs_before_failure']})" if f["completed_calls"] else ""))
    L.append("")
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


def compare_dirs(a, b):
    fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
    bad = []
    if fa != fb:
        bad.append(f"file lists differ: {sorted(set(fa) ^ set(fb))}")
    for f in sorted(set(fa) & set(fb)):
        if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False):
            msg = f"{f} differs"
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file
                ta, tb = load_file(os.path.join(a, f)), load_file(os.path.join(b, f))
                diffs = [f"{k}: max |d| {(ta[k].double() - tb[k].double()).abs().max().item():.3g}"
                         for k in sorted(set(ta) & set(tb))
                         if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
                msg += " (" + ("; ".join(diffs) or "metadata only") + ")"
            bad.append(msg)
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and verify the checked-in files are bit-identical "
                         "(writes nothing)")
    ap.add_argument("--out", default=os.path.join(REPO, OUT_REL))
    args = ap.parse_args()
    assert diffusers.__version__ == "0.24.0", diffusers.__version__
    assert transformers.__version__ == "4.35.2", transformers.__version__
    assert sdp_version() == "0.1.1", sdp_version()
    if args.check:
        if not os.path.isdir(args.out):
            sys.exit(f"--check: {args.out} does not exist")
        with tempfile.TemporaryDirectory() as td:
            log(f"== regenerating into {td}")
            generate(td)
            bad = compare_dirs(args.out, td)
        if bad:
            log("CHECK FAILED:\n  " + "\n  ".join(bad))
            sys.exit(1)
        log(f"check OK: {len(os.listdir(args.out))} files in {os.path.relpath(args.out, REPO)} bit-identical")
        return
    log(f"== writing {args.out}")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    generate(args.out)


if __name__ == "__main__":
    main()
