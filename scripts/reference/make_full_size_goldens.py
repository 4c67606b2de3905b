#!/usr/bin/env python
"""Full-size, by hub id, offline: the reference output of streamdiffusion 0.1.1 (diffusers 0.24) on
the full-size random-weight models that `sdcam dev write-random-hub` lays out in a Hugging Face
cache, for the shipped profiles `profiles/anime.toml` and `profiles/watercolor-lcm.toml`.

    target/release/sdcam dev write-random-hub --cache /tmp/fs-hub        # ~14 GB
    HF_HUB_CACHE=/tmp/fs-hub /opt/peer/bin/python scripts/reference/make_full_size_goldens.py

It loads every model the way a Python user would, by repository id from that cache with
HF_HUB_OFFLINE=1 (`StableDiffusionPipeline.from_pretrained("stabilityai/sd-turbo")`,
`AutoencoderTiny.from_pretrained("madebyollin/taesd")`,
`load_lora_weights("latent-consistency/lcm-lora-sdv1-5")` + `fuse_lora`), first checking that each
weight file holds exactly the tensors (names and shapes) of the diffusers / transformers module
(so nothing is silently left at its initialisation). Then it runs `StreamDiffusion` with the
profile's settings at 256x256 on two synthetic frames and writes, per profile,
`tests/fixtures/golden/full_size/<profile>.safetensors`: `frames_u8` [2,256,256,3] (the input),
`init_noise` (prepare()'s pre-sampled noise, which sdcam replays through `Noise::from_file`) and
`outputs` [2,3,256,256] (raw decoder output, not clamped) and `x0` [2,4,32,32] (the denoised
latents that are decoded), with the case in the metadata.

Not used here: the wrapper's similar-image filter (random skips; sdcam's filter sits outside the
stream core that the Rust test compares). Deterministic: seeds from the profile, 2 torch threads
(the float results of a rerun may differ in the last bits, far inside the 1e-3 tolerance).
"""
import argparse
import json
import os
import sys
import time
import tomllib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# diffusers 0.24 takes its default cache from the older HUGGINGFACE_HUB_CACHE only (it ignores
# HF_HUB_CACHE); every load below also passes cache_dir explicitly.
if os.environ.get("HF_HUB_CACHE"):
    os.environ["HUGGINGFACE_HUB_CACHE"] = os.environ["HF_HUB_CACHE"]
CACHE = os.environ.get("HF_HUB_CACHE")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_stream_goldens as msg  # noqa: E402  (CPU stand-in for torch.cuda.Event, save_st)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402
from streamdiffusion import StreamDiffusion  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
OUT_REL = os.path.join("tests", "fixtures", "golden", "full_size")
SIZE = 256
N_FRAMES = 2
FRAMES_SEED = 4321

# sdcam's defaults for the keys these profiles leave out (`sdcam keys`); the Rust test builds its
# stream from the profile through sdcam's own defaults, so a disagreement fails the comparison.
DEFAULTS = dict(seed=2, num_inference_steps=50, guidance_scale=1.2, delta=1.0, lora_scale=1.0)

PROFILES = ("anime", "watercolor-lcm")


def log(*a):
    print(*a, flush=True)


def make_frames():
    """Smooth synthetic frames (colour gradient + moving Gaussian blobs), uint8 [N, H, W, 3]."""
    rng = np.random.default_rng(FRAMES_SEED)
    yy, xx = np.meshgrid(np.linspace(0, 1, SIZE), np.linspace(0, 1, SIZE), indexing="ij")
    base = rng.uniform(0.2, 0.8, size=3)
    grad = rng.uniform(-0.5, 0.5, size=(3, 2))
    blobs = [(rng.uniform(0.2, 0.8, size=2), rng.uniform(-0.05, 0.05, size=2), rng.uniform(0.08, 0.2),
              rng.uniform(-0.6, 0.6, size=3)) for _ in range(4)]
    out = []
    for i in range(N_FRAMES):
        img = base + grad[:, 0] * (xx[..., None] - 0.5) + grad[:, 1] * (yy[..., None] - 0.5)
        for p0, v, s, col in blobs:
            cx, cy = p0 + i * v
            img = img + np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None] * col
        out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    u8 = np.stack(out)
    assert u8.shape == (N_FRAMES, SIZE, SIZE, 3) and u8.std() > 20
    return u8


def snapshot_file(repo, path):
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, path, cache_dir=CACHE, local_files_only=True)


def check_keys(module, repo, path, what):
    """The weight file holds exactly the module's state_dict (names and shapes)."""
    f = snapshot_file(repo, path)
    with safe_open(f, "pt") as st:
        shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        meta = st.metadata()
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    bad = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    assert not (missing or extra or bad), f"{repo}/{path} ({what}): missing {missing[:5]}, extra {extra[:5]}, shape {bad[:5]}"
    assert meta.get("format") == "pt", meta
    n = sum(int(np.prod(s)) for s in shapes.values())
    log(f"   {repo}/{path}: {len(shapes)} tensors, {n:,} parameters = the {what}'s state_dict")
    return n


def load_profile(name):
    with open(os.path.join(REPO, "profiles", f"{name}.toml"), "rb") as f:
        p = tomllib.load(f)
    s, m = p.get("stream", {}), p["model"]
    loras = m.get("lora", [])
    c = dict(profile=f"profiles/{name}.toml", model=m["id"], tiny_vae=m.get("tiny_vae"),
             loras=[dict(id=l["id"], scale=l.get("scale", DEFAULTS["lora_scale"])) for l in loras],
             prompt=p["prompt"], negative_prompt=p.get("negative_prompt", ""),
             t_index_list=list(s["t_index_list"]), cfg_type=s.get("cfg_type", "none"),
             guidance_scale=s.get("guidance_scale", DEFAULTS["guidance_scale"]),
             delta=s.get("delta", DEFAULTS["delta"]), seed=s.get("seed", DEFAULTS["seed"]),
             num_inference_steps=s.get("num_inference_steps", DEFAULTS["num_inference_steps"]),
             width=SIZE, height=SIZE, frames=N_FRAMES)
    assert c["tiny_vae"], "the full-size check runs with TAESD"
    return c


def run(c, frames_u8):
    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(c["model"], torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, cache_dir=CACHE)
    pipe.set_progress_bar_config(disable=True)
    params = {}
    params["text_encoder"] = check_keys(pipe.text_encoder, c["model"], "text_encoder/model.safetensors", "CLIPTextModel")
    params["unet"] = check_keys(pipe.unet, c["model"], "unet/diffusion_pytorch_model.safetensors", "UNet2DConditionModel")
    params["vae"] = check_keys(pipe.vae, c["model"], "vae/diffusion_pytorch_model.safetensors", "AutoencoderKL")
    taesd = AutoencoderTiny.from_pretrained(c["tiny_vae"], torch_dtype=torch.float32, cache_dir=CACHE).eval()
    params["taesd"] = check_keys(taesd, c["tiny_vae"], "diffusion_pytorch_model.safetensors", "AutoencoderTiny")
    log(f"   loaded in {time.time() - t0:.1f} s")

    stream = StreamDiffusion(pipe, t_index_list=c["t_index_list"], torch_dtype=torch.float32, width=SIZE,
                             height=SIZE, do_add_noise=True, use_denoising_batch=True, frame_buffer_size=1,
                             cfg_type=c["cfg_type"])
    for l in c["loras"]:
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if k.endswith("to_q.weight")}
        with safe_open(snapshot_file(l["id"], "pytorch_lora_weights.safetensors"), "pt") as st:
            keys = list(st.keys())
            params["lora"] = sum(int(np.prod(st.get_slice(k).get_shape())) for k in keys)
        # With a repo id and no weight_name, diffusers 0.24 asks the hub API for the file list
        # even when offline; the file name is the real repository's.
        stream.load_lcm_lora(l["id"], cache_dir=CACHE, weight_name="pytorch_lora_weights.safetensors")
        stream.fuse_lora(lora_scale=l["scale"])
        after = pipe.unet.state_dict()
        changed = sum(not torch.equal(before[k], after[k]) for k in before)
        assert changed == len(before), f"LoRA fused into {changed} of {len(before)} to_q weights"
        n_modules = sum(k.endswith(".alpha") for k in keys)
        log(f"   LoRA {l['id']}: {n_modules} modules, {params['lora']:,} parameters, fused at {l['scale']}")
    stream.vae = taesd

    stream.prepare(c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["num_inference_steps"],
                   guidance_scale=c["guidance_scale"], delta=c["delta"], generator=torch.Generator(), seed=c["seed"])
    init_noise = stream.init_noise.clone()
    frames = torch.from_numpy(frames_u8).permute(0, 3, 1, 2).float() / 255.0
    # x0 (the denoised latent that is decoded): the output of predict_x0_batch. Compared too,
    # since TAESD with random weights passes little of its input through to the image.
    x0s = []
    pred = stream.predict_x0_batch
    stream.predict_x0_batch = lambda x: (lambda r: (x0s.append(r.detach().clone()), r)[1])(pred(x))
    outs = []
    for i in range(N_FRAMES):
        t1 = time.time()
        with torch.no_grad():
            out = stream(frames[i:i + 1])
        outs.append(out.detach().clone())
        log(f"   frame {i}: {time.time() - t1:.1f} s, max|out| {out.abs().max():.4f}, std {out.std():.4f}, "
            f"x0 max {x0s[-1].abs().max():.4f} std {x0s[-1].std():.4f}")
    outputs, x0 = torch.cat(outs), torch.cat(x0s)
    assert x0.shape == (N_FRAMES, 4, SIZE // 8, SIZE // 8), x0.shape
    assert torch.isfinite(outputs).all() and outputs.std() > 1e-2, "degenerate reference output"
    assert torch.isfinite(x0).all() and x0.std() > 1e-2, "degenerate reference latents"
    c = dict(c, sub_timesteps=[int(t) for t in stream.sub_timesteps], parameters=params,
             max_abs_output=float(outputs.abs().max()), std_output=float(outputs.std()),
             max_abs_x0=float(x0.abs().max()), std_x0=float(x0.std()))
    return dict(frames_u8=torch.from_numpy(frames_u8), init_noise=init_noise, outputs=outputs, x0=x0), c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, OUT_REL))
    ap.add_argument("--only", choices=PROFILES)
    a = ap.parse_args()
    assert CACHE, "set HF_HUB_CACHE to the cache written by sdcam dev write-random-hub"
    assert diffusers.__version__ == "0.24.0" and transformers.__version__ == "4.35.2"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    frames_u8 = make_frames()
    for name in PROFILES:
        if a.only and a.only != name:
            continue
        log(f"{name}:")
        c = load_profile(name)
        tensors, c = run(c, frames_u8)
        about = (f"streamdiffusion {msg.sdp_version()} / diffusers {diffusers.__version__} on the full-size "
                 f"random-weight cache of sdcam dev write-random-hub, profile {c['profile']} at {SIZE}x{SIZE}")
        msg.save_st(os.path.join(a.out, f"{name}.safetensors"), tensors,
                    metadata={"case": json.dumps(c), "about": about})
        log(f"   wrote {name}.safetensors: max|out| {c['max_abs_output']:.4f}")


if __name__ == "__main__":
    main()
