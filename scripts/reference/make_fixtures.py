#!/usr/bin/env python
"""Generate the Python-reference fixtures for sdcam's diffusion model layer.

Everything is built locally (no Hugging Face hub): random-weight TINY models in the exact
diffusers 0.24.0 / transformers 4.35.2 on-disk layout, the real CLIP BPE tokenizer, and golden
tensors computed with the Python reference (diffusers, transformers, streamdiffusion 0.1.1).

    /opt/peer/bin/python scripts/reference/make_fixtures.py            # writes tests/fixtures/
    /opt/peer/bin/python scripts/reference/make_fixtures.py --check    # + reload & recompute checks

Environment: see scripts/reference/README.md (the venv of /work/shared/peer/README.md).
Deterministic: fixed seeds, 1 torch thread; a rerun rewrites bit-identical files.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast  # noqa: E402
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# ============================================================================================
# Model configurations
# ============================================================================================
# Channel widths are smaller than the (32, 64) first sketched so that tests/fixtures stays
# near 4 MB; norm_num_groups 8 makes every GroupNorm group hold >= 2 channels (with 32 groups on
# 32 channels each group would be ONE channel and a wrong group reshape would go unnoticed).
TINY_UNET_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=False,
    block_out_channels=[16, 32],
    layers_per_block=1,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,
    norm_eps=1e-5,
    cross_attention_dim=32,
    dual_cross_attention=False,
    num_class_embeds=None,
    resnet_time_scale_shift="default",
    upcast_attention=False,
)
# SD 1.5: attention_head_dim=8 is (diffusers naming bug) the NUMBER of heads in every block:
# 16 ch -> 8 heads x dim 2, 32 ch -> 8 heads x dim 4 (real SD1.5: 320/640/1280 ch, 8 heads).
TINY_SD15_UNET = dict(TINY_UNET_COMMON, attention_head_dim=8, use_linear_projection=False)
# SD 2.1 / sd-turbo: attention_head_dim=[5,10,20,20] = heads per block, head dim 64 everywhere.
# Mirror: [2, 4] heads on [16, 32] channels -> head dim 8 everywhere.
TINY_SD21_UNET = dict(TINY_UNET_COMMON, attention_head_dim=[2, 4], use_linear_projection=True)

TINY_N_MERGES = 500
TINY_VOCAB = 512 + TINY_N_MERGES + 2  # 1014: <|startoftext|> = 1012, <|endoftext|> = 1013
TINY_BOS, TINY_EOS = TINY_VOCAB - 2, TINY_VOCAB - 1

TINY_TEXT_SD15 = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=37,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=TINY_BOS,
    eos_token_id=TINY_EOS,
    pad_token_id=TINY_EOS,
)
TINY_TEXT_SD21 = dict(TINY_TEXT_SD15, hidden_act="gelu", pad_token_id=0)  # SD2 pads with "!" (id 0)

# 4 levels -> vae_scale_factor 8, like SD (StreamDiffusion sizes its latents with
# pipe.vae_scale_factor, computed from this config even when TAESD replaces the VAE).
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16],  # 8->16 keeps a conv_shortcut in encoder and decoder
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
    force_upcast=True,
)

# madebyollin/taesd layout, narrowed: AutoencoderTiny needs equal channels in every stage.
TINY_TAESD = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=[16, 16, 16, 16],
    decoder_block_out_channels=[16, 16, 16, 16],
    act_fn="relu",
    latent_channels=4,
    upsampling_scaling_factor=2,
    num_encoder_blocks=[1, 1, 1, 1],
    num_decoder_blocks=[1, 1, 1, 1],
    latent_magnitude=3,
    latent_shift=0.5,
    force_upcast=False,
    scaling_factor=1.0,
)

# SD1.5 + LCM: LCMScheduler with SD1.5's betas (diffusers defaults for the rest).
SCHED_SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    original_inference_steps=50,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,  # StableDiffusionPipeline.__init__ would force 1 anyway (deprecation fix-up)
    prediction_type="epsilon",
    timestep_spacing="leading",
    timestep_scaling=10.0,
    rescale_betas_zero_snr=False,
)
# stabilityai/sd-turbo scheduler/scheduler_config.json (EulerDiscreteScheduler).
SCHED_SD21 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="trailing",
    steps_offset=1,
)

SEEDS = dict(sd15_unet=101, sd15_text=102, sd15_vae=103, sd21_unet=201, sd21_text=202, sd21_vae=203,
             taesd=301, lora=401, golden=500)

# ============================================================================================
# Helpers
# ============================================================================================


def log(*a):
    print(*a, flush=True)


def randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def init_random(model, seed):
    """Overwrite EVERY parameter with non-trivial random values (no zero / identity layers).

    conv / linear weight ~ N(0, 1/fan_in); biases ~ N(0, 0.05^2); GroupNorm/LayerNorm weight
    1 + N(0, 0.1^2), bias N(0, 0.05^2); embeddings ~ N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for mname, m in model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    v = 1.0 + randn(g, *p.shape, std=0.1) if pname == "weight" else randn(g, *p.shape, std=0.05)
                elif isinstance(m, torch.nn.Embedding):
                    v = randn(g, *p.shape, std=0.2)
                elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    if pname == "weight":
                        fan_in = p[0].numel()
                        v = randn(g, *p.shape, std=fan_in ** -0.5)
                    else:
                        v = randn(g, *p.shape, std=0.05)
                else:
                    raise RuntimeError(f"unhandled parameter {full} in {type(m).__name__}")
                p.copy_(v)
                done.add(full)
    allp = {n for n, _ in model.named_parameters()}
    assert done == allp, allp - done
    model.eval()
    return model


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def check_finite(name, t, min_std=1e-3):
    t = t.float()
    assert torch.isfinite(t).all(), f"{name}: non-finite"
    s = t.std().item() if t.numel() > 1 else 1.0
    assert s > min_std, f"{name}: degenerate (std {s})"
    return s


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_st(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64, torch.float16), (k, v.dtype)
    save_file(tensors, path, metadata=metadata)


# ============================================================================================
# CLIP BPE tokenizer
# ============================================================================================


def find_bpe(path_arg):
    if path_arg:
        return path_arg
    cached = "/tmp/peer/dl/bpe_simple_vocab_16e6.txt.gz"
    if os.path.exists(cached):
        return cached
    wheels = sorted(glob.glob("/tmp/peer/dl/open_clip_torch-*.whl"))
    if not wheels:
        sys.exit("need bpe_simple_vocab_16e6.txt.gz: run\n"
                 "  /opt/peer/bin/pip download --no-deps open_clip_torch -d /tmp/peer/dl")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = [n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")][0]
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(cached, "wb") as f:
            f.write(z.read(name))
    return cached


def clip_bpe(bpe_gz, n_merges=None):
    """(vocab list, merges list) exactly as openai CLIP SimpleTokenizer / open_clip build them."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]  # 48894 merges
    if n_merges is not None:
        merges = merges[:n_merges]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    for m in merges:
        a, b = m.split()
        vocab.append(a + b)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    if n_merges is not None:  # truncated BPE must stay valid: both halves of a merge exist earlier
        known = set()
        known.update(vocab[:512])
        for m in merges:
            a, b = m.split()
            assert a in known and b in known, m
            known.add(a + b)
    assert len(set(vocab)) == len(vocab)
    return vocab, merges


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def tokenizer_jsons(pad_token):
    """tokenizer_config.json / special_tokens_map.json as in runwayml/stable-diffusion-v1-5
    (pad <|endoftext|>) and stabilityai/stable-diffusion-2-1 (pad "!")."""
    cfg = {
        "add_prefix_space": False,
        "bos_token": _added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": _added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added("<|endoftext|>"),
    }
    stm = {k: {kk: vv for kk, vv in v.items() if kk != "__type"} for k, v in cfg.items()
           if k in ("bos_token", "eos_token", "unk_token")}
    stm["pad_token"] = pad_token if pad_token == "<|endoftext|>" else {
        "content": pad_token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    stm = {k: stm[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return cfg, stm


def write_tokenizer_dir(out_dir, vocab, merges, pad_token, with_vocab=True):
    os.makedirs(out_dir, exist_ok=True)
    if with_vocab:
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, separators=(",", ":"))
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg, stm = tokenizer_jsons(pad_token)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), cfg)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), stm)


PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on the moon, highly detailed, 8k",
    "",
    "   leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs\nand newlines",
    "(masterpiece:1.2), best quality, [ugly:0.8], {wings}",
    "anime girl, ((blue hair)), <lora:foo:0.7>",
    "don't stop! it's 3:45pm... we're here; they'll see? I'd, you've",
    "1girl 2boys 1234567890 3.14159 1e-5 100%",
    "café naïve résumé façade Ångström",
    "ÉCOLE ÜBER STRAẞE",
    "東京タワーの夜景 cyberpunk",
    "一只可爱的猫",
    "고양이 사진",
    "смешной кот в шляпе",
    "🐱 cat emoji 🚀🔥 ❤️",
    "smiley :-) <3 $$$ #hashtag @user a&b 50/50",
    "hello\u00a0world\u200bzero-width",
    "fullwidth ＡＢＣ１２３ and ﬁ ligature",
    "photorealistic portrait of an elderly fisherman, weathered skin, deep wrinkles, "
    "piercing blue eyes, wool cap, golden hour lighting, shallow depth of field, 85mm lens, "
    "bokeh background, film grain, kodak portra 400, award winning photography, trending on "
    "artstation, ultra detailed, sharp focus, cinematic composition, rule of thirds, "
    "volumetric light, rim light, dramatic shadows",
    " ".join(["word"] * 100),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<|startoftext|>explicit special tokens<|endoftext|> in text",
    "a-b_c/d\\e|f~g`h^i",
]

TEXT_PROMPTS = ["a photo of a cat", "an astronaut riding a horse, highly detailed", ""]


def tokenize_all(tok):
    return [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]


def open_clip_ids(args):
    """Optional cross-check against open_clip's own tokenizer (needs ftfy, e.g.
    pip install --target /tmp/ftfy_pkg ftfy; and open_clip/tokenizer.py unzipped from the wheel)."""
    if not args.open_clip_dir:
        return None
    sys.path[:0] = [p for p in args.open_clip_dir.split(":") if p]
    try:
        from open_clip.tokenizer import SimpleTokenizer  # noqa
    except Exception as e:  # pragma: no cover
        log("open_clip cross-check skipped:", e)
        return None
    st = SimpleTokenizer()
    return [st(p, context_length=77)[0].tolist() for p in PROMPTS]


def build_tokenizer_fixtures(fx, bpe_gz, args, report):
    log("== tokenizer")
    vocab, merges = clip_bpe(bpe_gz)
    assert len(vocab) == 49408 and len(merges) == 48894
    clip_dir = os.path.join(fx, "tokenizer", "clip")
    sd2_dir = os.path.join(fx, "tokenizer", "clip-sd2")
    write_tokenizer_dir(clip_dir, vocab, merges, "<|endoftext|>")
    write_tokenizer_dir(sd2_dir, vocab, merges, "!", with_vocab=False)

    tok15 = CLIPTokenizer.from_pretrained(clip_dir)
    with tempfile.TemporaryDirectory() as td:  # SD2 = clip/{vocab,merges} + clip-sd2/*.json
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(clip_dir, f), td)
        for f in os.listdir(sd2_dir):
            shutil.copy(os.path.join(sd2_dir, f), td)
        tok2 = CLIPTokenizer.from_pretrained(td)
        fast15 = CLIPTokenizerFast.from_pretrained(clip_dir, from_slow=True)
    assert tok15("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok15.pad_token_id == 49407 and tok2.pad_token_id == 0
    ids15, ids2, idsfast = tokenize_all(tok15), tokenize_all(tok2), tokenize_all(fast15)
    assert ids15[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ids2[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    n_tokens = [len(tok15(p).input_ids) for p in PROMPTS]  # untruncated, incl. bos/eos
    fast_diff = [i for i in range(len(PROMPTS)) if ids15[i] != idsfast[i]]
    oc = open_clip_ids(args)
    oc_diff = None
    if oc is not None:  # open_clip pads with 0: compare up to and including the first <|endoftext|>
        cut = lambda ids: ids[: ids.index(49407) + 1]  # noqa: E731
        oc = [cut(x) for x in oc]
        oc_diff = [i for i in range(len(PROMPTS)) if cut(ids15[i]) != oc[i]]
        report["open_clip_differs_at"] = [PROMPTS[i] for i in oc_diff]
    report["fast_differs_at"] = [PROMPTS[i] for i in fast_diff]
    out = {
        "about": "transformers.CLIPTokenizer (slow, as diffusers' StableDiffusionPipeline loads it) "
                 "from tests/fixtures/tokenizer/clip (sd15) and clip + clip-sd2 jsons (sd2); "
                 "tokenizer(prompt, padding='max_length', max_length=77, truncation=True).input_ids. "
                 "ftfy NOT installed (as in the reference venv), so text cleanup is transformers' "
                 "BasicTokenizer(strip_accents=False, do_split_on_punc=False) path: control chars "
                 "dropped, whitespace collapsed, NFC, lower-case, spaces around CJK ideographs. "
                 "'fast' = CLIPTokenizerFast(from_slow) (tokenizers 0.15.2), only listed where it differs.",
        "versions": {"transformers": transformers.__version__, "tokenizers": __import__("tokenizers").__version__},
        "cases": [],
    }
    for i, p in enumerate(PROMPTS):
        c = {"prompt": p, "n_tokens_untruncated": n_tokens[i], "sd15": ids15[i], "sd2": ids2[i]}
        if i in fast_diff:
            c["fast_sd15"] = idsfast[i]
        out["cases"].append(c)
    os.makedirs(os.path.join(fx, "golden"), exist_ok=True)
    write_json(os.path.join(fx, "golden", "tokens.json"), out)
    log(f"   {len(PROMPTS)} prompts; fast tokenizer differs on {len(fast_diff)}; "
        f"open_clip differs on {None if oc_diff is None else len(oc_diff)}")
    return vocab, merges


def tiny_tokenizer_dir(out_dir, bpe_gz, pad_token):
    vocab, merges = clip_bpe(bpe_gz, TINY_N_MERGES)
    assert len(vocab) == TINY_VOCAB
    write_tokenizer_dir(out_dir, vocab, merges, pad_token)
    tok = CLIPTokenizer.from_pretrained(out_dir)
    assert tok.bos_token_id == TINY_BOS and tok.eos_token_id == TINY_EOS
    assert tok.pad_token_id == (TINY_EOS if pad_token != "!" else 0)
    return tok


# ============================================================================================
# Models
# ============================================================================================


def build_pipeline(kind, out_dir, bpe_gz, stage):
    unet_cfg, text_cfg, sched = {
        "sd15": (TINY_SD15_UNET, TINY_TEXT_SD15, LCMScheduler(**SCHED_SD15)),
        "sd21": (TINY_SD21_UNET, TINY_TEXT_SD21, EulerDiscreteScheduler(**SCHED_SD21)),
    }[kind]
    unet = init_random(UNet2DConditionModel(**unet_cfg), SEEDS[f"{kind}_unet"])
    text = init_random(CLIPTextModel(CLIPTextConfig(**text_cfg)), SEEDS[f"{kind}_text"])
    vae = init_random(AutoencoderKL(**TINY_VAE), SEEDS[f"{kind}_vae"])
    tok_dir = os.path.join(stage, f"tok-{kind}")
    tok = tiny_tokenizer_dir(tok_dir, bpe_gz, "<|endoftext|>" if kind == "sd15" else "!")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # replace the re-serialised tokenizer by the hub-style files (same tokens, real-repo json format)
    shutil.rmtree(os.path.join(out_dir, "tokenizer"))
    shutil.copytree(tok_dir, os.path.join(out_dir, "tokenizer"))
    mark_random(out_dir)
    log(f"   {kind}: unet {nparams(unet)}, text {nparams(text)}, vae {nparams(vae)} params")
    return pipe


RANDOM_WEIGHTS_NOTE = (
    "Random weights, made by sdcam's scripts/reference/make_fixtures.py for tests and the offline\n"
    "demo. Not a trained model: its pictures are abstract noise. sdcam labels any model folder\n"
    "holding this file as RANDOM WEIGHTS in its log.\n"
)


def mark_random(out_dir):
    with open(os.path.join(out_dir, "RANDOM_WEIGHTS.txt"), "w") as f:
        f.write(RANDOM_WEIGHTS_NOTE)


def build_taesd(out_dir):
    taesd = init_random(AutoencoderTiny(**TINY_TAESD), SEEDS["taesd"])
    taesd.save_pretrained(out_dir, safe_serialization=True)
    mark_random(out_dir)
    log(f"   taesd: {nparams(taesd)} params")
    return taesd


# ---- LoRA (kohya key format, as latent-consistency/lcm-lora-sdv1-5) ----
LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                     "time_emb_proj")
# diffusers 0.24 (no peft) needs q/k/v/out_proj in EVERY text layer, and fc1/fc2 in every layer
# once any mlp key is present -- as in real kohya LoRAs that train the text encoder.
LORA_TE_TARGETS = tuple(f"text_model.encoder.layers.{i}.{m}" for i in range(2)
                        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))
LORA_RANK = 4
LORA_SCALE = 0.7


def build_lora(pipe, path):
    """Returns {kohya_name: (module_path_in_pipe, alpha)} and writes the fp16 safetensors."""
    g = torch.Generator().manual_seed(SEEDS["lora"])
    sd, index = {}, {}
    mods = [("unet", n, m) for n, m in pipe.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(LORA_UNET_TARGETS)]
    mods += [("text_encoder", n, dict(pipe.text_encoder.named_modules())[n]) for n in LORA_TE_TARGETS]
    for comp, n, m in mods:
        key = ("lora_unet_" if comp == "unet" else "lora_te_") + n.replace(".", "_")
        if isinstance(m, torch.nn.Conv2d):
            down_shape = (LORA_RANK, m.in_channels, *m.kernel_size)
            up_shape = (m.out_channels, LORA_RANK, 1, 1)
            alpha = 4.0  # conv: alpha/rank = 1
        else:
            down_shape = (LORA_RANK, m.in_features)
            up_shape = (m.out_features, LORA_RANK)
            alpha = 2.0 if comp == "unet" else 8.0  # alpha/rank = 0.5 (unet linear), 2 (text)
        fan_in = int(torch.tensor(down_shape[1:]).prod())
        down = randn(g, *down_shape, std=fan_in ** -0.5)
        up = randn(g, *up_shape, std=0.5)
        sd[key + ".lora_down.weight"] = down.half()
        sd[key + ".lora_up.weight"] = up.half()
        sd[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        index[key] = (comp, n, alpha)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(dict(sorted(sd.items())), path)
    log(f"   lora: {len(index)} modules ({sum(1 for v in index.values() if v[0] == 'unet')} unet), "
        f"{sum(v.numel() for v in sd.values())} params")
    return index, sd


# ============================================================================================
# Hugging Face hub cache
# ============================================================================================


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def to_hf_cache(src_dir, cache_hub, repo_id):
    """Move src_dir into a huggingface_hub cache: blobs/<hash> (sha256 for LFS-style
    *.safetensors, git blob sha1 for the small text files), snapshots/<commit>/<path> relative
    symlinks to the blobs, refs/main = <commit>.  Returns the snapshot path."""
    repo_dir = os.path.join(cache_hub, "models--" + repo_id.replace("/", "--"))
    if os.path.lexists(repo_dir):
        shutil.rmtree(repo_dir)
    files = sorted(os.path.relpath(os.path.join(d, f), src_dir) for d, _, fs in os.walk(src_dir) for f in fs)
    entries = []
    for rel in files:
        data = open(os.path.join(src_dir, rel), "rb").read()
        h = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else git_blob_sha1(data)
        entries.append((rel, h, data))
    commit = hashlib.sha1(json.dumps([(r, h) for r, h, _ in entries]).encode()).hexdigest()
    os.makedirs(os.path.join(repo_dir, "blobs"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)  # no trailing newline, as huggingface_hub writes it
    snap = os.path.join(repo_dir, "snapshots", commit)
    for rel, h, data in entries:
        blob = os.path.join(repo_dir, "blobs", h)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snap, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return snap, commit


# ============================================================================================
# Goldens
# ============================================================================================


@torch.no_grad()
def golden_text(pipe, path):
    ids = pipe.tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    emb = pipe.encode_prompt(TEXT_PROMPTS, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=False)[0]
    direct = pipe.text_encoder(ids)[0]
    assert torch.equal(emb, direct)
    check_finite(path, emb)
    save_st(path, {"input_ids": ids.to(torch.int64), "prompt_embeds": emb},
            {"prompts": json.dumps(TEXT_PROMPTS)})
    return ids, emb


UNET_CASES = [  # (name, batch, h, w, timesteps)
    ("case0", 2, 8, 8, [999, 999]),
    ("case1", 2, 8, 8, [500, 500]),
    ("case2", 1, 16, 12, [37]),
    ("case3", 2, 8, 8, [999, 37]),   # per-sample timesteps (StreamDiffusion denoising batch)
    ("case4", 1, 7, 5, [500]),       # odd size: forward_upsample_size path
]


def unet_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    cases = {}
    for name, b, h, w, ts in UNET_CASES:
        cases[name] = dict(sample=randn(g, b, 4, h, w), timestep=torch.tensor(ts, dtype=torch.int64),
                           encoder_hidden_states=randn(g, b, 77, 32))
    return cases


@torch.no_grad()
def golden_unet(unet, cases, path):
    out = {}
    for name, c in cases.items():
        y = unet(c["sample"], c["timestep"], encoder_hidden_states=c["encoder_hidden_states"], return_dict=False)[0]
        check_finite(f"{path}:{name}", y)
        for k, v in c.items():
            out[f"{name}.{k}"] = v
        out[f"{name}.out"] = y
    save_st(path, out)
    return out


@torch.no_grad()
def golden_taesd(taesd, path):
    g = torch.Generator().manual_seed(SEEDS["golden"] + 30)
    out = {}
    for name, shape in (("enc0", (1, 3, 64, 64)), ("enc1", (2, 3, 32, 48))):
        x = torch.rand(*shape, generator=g) * 2 - 1
        lat = taesd.encode(x).latents
        check_finite(name, lat)
        out[f"{name}.image"] = x
        out[f"{name}.latents"] = lat
        # StreamDiffusion.encode_image multiplies by scaling_factor (1.0 here): not stored twice
    for name, shape in (("dec0", (1, 4, 8, 8)), ("dec1", (2, 4, 4, 6))):
        z = randn(g, *shape)
        img = taesd.decode(z).sample
        check_finite(name, img)
        out[f"{name}.latents"] = z
        out[f"{name}.sample"] = img
    save_st(path, out)


@torch.no_grad()
def golden_vae(vae, path):
    g = torch.Generator().manual_seed(SEEDS["golden"] + 40)
    out = {}
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    dist = vae.encode(x).latent_dist
    out["enc0.image"] = x
    out["enc0.mean"] = dist.mean
    out["enc0.std"] = dist.std
    out["enc0.mean_scaled"] = dist.mean * vae.config.scaling_factor
    check_finite("vae enc", dist.mean)
    x1 = torch.rand(1, 3, 48, 32, generator=g) * 2 - 1
    out["enc1.image"] = x1
    out["enc1.mean"] = vae.encode(x1).latent_dist.mean
    z = randn(g, 1, 4, 8, 8)
    out["dec0.latents"] = z
    out["dec0.sample"] = vae.decode(z).sample
    check_finite("vae dec", out["dec0.sample"])
    save_st(path, out)


T_INDEX_LISTS = {50: [[32, 45], [35], [0, 16, 32, 45], [0]], 4: [[0, 1, 2, 3], [2], [1, 3]]}


@torch.no_grad()
def golden_lcm(pipe, path):
    from streamdiffusion import StreamDiffusion

    sched = LCMScheduler.from_config(pipe.scheduler.config)  # what StreamDiffusion.__init__ does
    out = {"alphas_cumprod": sched.alphas_cumprod.clone()}
    cfg = {k: v for k, v in sched.config.items() if not k.startswith("_")}  # _use_default_values is a set
    meta = {"scheduler_config": json.dumps(cfg, sort_keys=True, default=str)}
    # c_skip / c_out for EVERY train timestep (0-d int64 tensors, as StreamDiffusion passes them):
    # with timestep_scaling 10 c_skip is < 1e-5 for t >= 19, so also compare these relatively.
    all_t = torch.arange(1000, dtype=torch.int64)
    sc = [sched.get_scalings_for_boundary_condition_discrete(t) for t in all_t]
    out["all.timestep"] = all_t
    out["all.c_skip"] = torch.stack([c[0] for c in sc]).float()
    out["all.c_out"] = torch.stack([c[1] for c in sc]).float()
    for n in (50, 4):
        sched.set_timesteps(n, "cpu")
        ts = sched.timesteps.clone()
        out[f"n{n}.timesteps"] = ts
        a, b, cs, co = [], [], [], []
        for t in ts:
            a.append(sched.alphas_cumprod[t].sqrt())
            b.append((1 - sched.alphas_cumprod[t]).sqrt())
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            cs.append(c_skip)
            co.append(c_out)
        out[f"n{n}.alpha_prod_t_sqrt"] = torch.stack(a)
        out[f"n{n}.beta_prod_t_sqrt"] = torch.stack(b)
        out[f"n{n}.c_skip"] = torch.stack(cs).float()
        out[f"n{n}.c_out"] = torch.stack(co).float()
        for tl in T_INDEX_LISTS[n]:
            stream = StreamDiffusion(pipe, t_index_list=tl, torch_dtype=torch.float32, width=64, height=64,
                                     do_add_noise=True, use_denoising_batch=True, frame_buffer_size=1,
                                     cfg_type="none")
            stream.prepare("a photo of a cat", num_inference_steps=n, guidance_scale=1.0)
            p = f"n{n}.t" + "_".join(map(str, tl))
            out[p + ".t_index_list"] = torch.tensor(tl, dtype=torch.int64)
            out[p + ".sub_timesteps"] = stream.sub_timesteps_tensor.clone()
            for k in ("alpha_prod_t_sqrt", "beta_prod_t_sqrt", "c_skip", "c_out"):
                out[p + "." + k] = getattr(stream, k).clone()
            assert torch.equal(stream.timesteps, ts)
            if tl == [32, 45] or tl == [0, 1, 2, 3]:
                g = torch.Generator().manual_seed(SEEDS["golden"] + 50 + n)
                k = len(tl)
                x_t = randn(g, k, 4, 8, 8)
                eps = randn(g, k, 4, 8, 8)
                den = stream.scheduler_step_batch(eps, x_t, None)
                out[p + ".step.x_t"] = x_t
                out[p + ".step.model_pred"] = eps
                out[p + ".step.denoised"] = den
    save_st(path, out, meta)


@torch.no_grad()
def golden_lora(model_dir, lora_dir, lora_index, lora_sd, unet_cases, path):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    before = {}
    for key, (comp, n, alpha) in lora_index.items():
        before[key] = dict(getattr(pipe, comp).named_modules())[n].weight.detach().clone()
    pipe.load_lora_weights(lora_dir, weight_name="pytorch_lora_weights.safetensors")
    # reference for the fused weights: W + scale * alpha/rank * up @ down (conv: flattened)
    pipe.fuse_lora(lora_scale=LORA_SCALE)
    max_err = 0.0
    for key, (comp, n, alpha) in lora_index.items():
        m = dict(getattr(pipe, comp).named_modules())[n]
        m = getattr(m, "regular_linear_layer", m)  # text encoder: PatchedLoraProjection (no peft)
        w = m.weight.detach()
        up = lora_sd[key + ".lora_up.weight"].float()
        down = lora_sd[key + ".lora_down.weight"].float()
        delta = (up.flatten(1) * (alpha / LORA_RANK)) @ down.flatten(1)
        ref = before[key] + LORA_SCALE * delta.reshape(before[key].shape)
        assert not torch.equal(w, before[key]), f"LoRA not applied to {key}"
        max_err = max(max_err, (w - ref).abs().max().item())
    assert max_err < 1e-5, max_err
    out = {}
    c = unet_cases["case0"]
    for name in ("case0", "case3"):
        c = unet_cases[name]
        y = pipe.unet(c["sample"], c["timestep"], encoder_hidden_states=c["encoder_hidden_states"],
                      return_dict=False)[0]
        check_finite("lora unet", y)
        for k, v in c.items():
            out[f"{name}.{k}"] = v
        out[f"{name}.out"] = y
    ids = pipe.tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    emb = pipe.encode_prompt(TEXT_PROMPTS, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=False)[0]
    out["text.input_ids"] = ids.to(torch.int64)
    out["text.prompt_embeds"] = emb
    save_st(path, out, {"lora_scale": str(LORA_SCALE), "prompts": json.dumps(TEXT_PROMPTS)})
    return max_err


# ============================================================================================
# README table for goldens
# ============================================================================================

GOLDEN_DOC = {
    "text_sd15.safetensors": "tiny-sd15 text encoder: `pipe.encode_prompt(prompts, do_classifier_free_guidance=False)[0]` "
                             "(= `text_encoder(input_ids)[0]`, last_hidden_state after final_layer_norm, no attention mask). "
                             "Prompts in the safetensors metadata `prompts`.",
    "text_sd21.safetensors": "same for tiny-sd21 (pad id 0 = '!').",
    "unet_sd15.safetensors": "tiny-sd15 UNet: `unet(sample, timestep, encoder_hidden_states).sample` per case; "
                             "timestep is an int64 vector (one per batch item).",
    "unet_sd21.safetensors": "same inputs (different draws) for tiny-sd21.",
    "vae_sd15.safetensors": "tiny-sd15 AutoencoderKL: encode -> latent_dist.mean/std (+ mean x 0.18215); "
                            "decode(z).sample and decode(z / 0.18215).sample.",
    "taesd.safetensors": "tiny-taesd AutoencoderTiny: encode(x).latents (scaling_factor 1.0 so *_scaled == raw); "
                         "decode(z).sample; *_streamdiffusion = decode(z / scaling_factor).",
    "lcm_sd15.safetensors": "LCMScheduler.from_config(tiny-sd15 scheduler config) tables and StreamDiffusion 0.1.1 "
                            "`prepare()` tables per t_index_list; `*.step.*` = `scheduler_step_batch`.",
    "lcm_sd21.safetensors": "same from the sd-turbo-like EulerDiscrete config (LCMScheduler.from_config).",
    "lora_sd15.safetensors": "tiny-sd15 after `load_lora_weights(tiny-lora)` + `fuse_lora(lora_scale=0.7)`: UNet "
                             "output for unet_sd15 case0/case3 inputs, text encoder output.",
}


def golden_readme(gdir):
    from safetensors import safe_open

    lines = ["# Golden tensors (generated by scripts/reference/make_fixtures.py — do not edit)", "",
             "All float tensors are float32 little-endian safetensors; ids/timesteps are int64.",
             "Inputs are stored next to outputs: load them, never regenerate RNG.", ""]
    lines += ["Naming: `<case>.<input>` and `<case>.out` / `.sample` / `.latents` / `.prompt_embeds`.",
              "",
              "* `unet_*`: `caseN.sample` [B,4,H,W] latents, `caseN.timestep` int64 [B] (one per batch item, "
              "as StreamDiffusion passes `sub_timesteps_tensor`), `caseN.encoder_hidden_states` [B,77,32], "
              "`caseN.out` = `unet(...).sample` (epsilon). case0 t=999, case1 t=500, case2 non-square 16x12 t=37, "
              "case3 mixed t=[999,37], case4 odd 7x5 (upsample-to-skip-size path).",
              "* `text_*`: `input_ids` int64 [3,77] from the model's tiny tokenizer, `prompt_embeds` [3,77,32].",
              "* `vae_sd15`: `enc*.image` in [-1,1]; `enc*.mean`/`.std` of latent_dist (no sampling); "
              "`enc0.mean_scaled` = mean x 0.18215; `dec0.latents` -> `dec0.sample` = `vae.decode(z).sample` "
              "(StreamDiffusion decodes `z / scaling_factor`; divide before calling).",
              "* `taesd`: `enc*.image` -> `enc*.latents` = `encode(x).latents` (raw encoder output; TAESD's "
              "scaling_factor is 1.0 so StreamDiffusion's `x scaling_factor` is a no-op); "
              "`dec*.latents` -> `dec*.sample` = `decode(z).sample` (tanh(z/3)*3 clamp inside, output x2-1).",
              "* `lcm_*`: `alphas_cumprod` [1000]; `n{50,4}.timesteps` int64 from `set_timesteps(n)`, and per "
              "entry `alpha_prod_t_sqrt`, `beta_prod_t_sqrt`, `c_skip`, `c_out`; `all.timestep` 0..999 with "
              "`all.c_skip`/`all.c_out`; `n{N}.t{i_j_k}.*` = tables StreamDiffusion.prepare() builds for that "
              "t_index_list (`sub_timesteps` int64 [k], the others [k,1,1,1]); `.step.x_t`/`.step.model_pred` "
              "-> `.step.denoised` = `scheduler_step_batch` "
              "(`c_out * (x_t - beta*eps)/alpha + c_skip * x_t`).",
              "* `lora_sd15`: same layout as unet/text, computed after fusing tiny-lora at scale 0.7.",
              ""]
    lines += ["`tokens.json`: real CLIP tokenizer ids (77, padded/truncated) for SD1.5 (pad `<|endoftext|>`=49407) "
              "and SD2 (pad `!`=0) configs; see its `about` field.", ""]
    for fname in sorted(GOLDEN_DOC):
        lines += [f"## `{fname}`", "", GOLDEN_DOC[fname], "", "| tensor | dtype | shape |", "|---|---|---|"]
        with safe_open(os.path.join(gdir, fname), "pt") as f:
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                lines.append(f"| `{k}` | {str(t.dtype).replace('torch.', '')} | {list(t.shape)} |")
            md = f.metadata() or {}
            md = {k: v for k, v in md.items() if k != "format"}
        if md:
            lines += ["", "metadata: " + ", ".join(f"`{k}`" for k in sorted(md))]
        lines.append("")
    with open(os.path.join(gdir, "README.md"), "w") as fh:
        fh.write("\n".join(lines))


# ============================================================================================


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--bpe", default="", help="path to bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--open-clip-dir", default=os.environ.get("OPEN_CLIP_DIR", ""),
                    help="colon-separated sys.path entries providing open_clip.tokenizer + ftfy (optional check)")
    ap.add_argument("--check", action="store_true", help="reload every artefact and recompute goldens")
    args = ap.parse_args()
    assert diffusers.__version__ == "0.24.0" and transformers.__version__ == "4.35.2", "wrong versions"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    fx = os.path.abspath(args.out)
    bpe = find_bpe(args.bpe)
    for d in ("tokenizer", "models", "hf-cache", "golden"):
        p = os.path.join(fx, d)
        if os.path.lexists(p):
            shutil.rmtree(p)
    os.makedirs(os.path.join(fx, "golden"))
    os.makedirs(os.path.join(fx, "models"))
    gdir = os.path.join(fx, "golden")
    report = {}

    build_tokenizer_fixtures(fx, bpe, args, report)

    log("== models")
    stage = tempfile.mkdtemp(prefix="sdcam-fixtures-")
    try:
        sd15_stage = os.path.join(stage, "tiny-sd15")
        taesd_stage = os.path.join(stage, "tiny-taesd")
        pipe15 = build_pipeline("sd15", sd15_stage, bpe, stage)
        sd21_dir = os.path.join(fx, "models", "tiny-sd21")
        pipe21 = build_pipeline("sd21", sd21_dir, bpe, stage)
        taesd = build_taesd(taesd_stage)
        lora_dir = os.path.join(fx, "models", "tiny-lora")
        lora_index, lora_sd = build_lora(pipe15, os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))

        log("== hf cache")
        hub = os.path.join(fx, "hf-cache", "hub")
        snaps = {}
        for repo, src, name in (("sdcam-fixtures/tiny-sd15", sd15_stage, "tiny-sd15"),
                                ("sdcam-fixtures/tiny-taesd", taesd_stage, "tiny-taesd")):
            snap, commit = to_hf_cache(src, hub, repo)
            snaps[name] = snap
            link = os.path.join(fx, "models", name)  # convenience link, no bytes duplicated
            os.symlink(os.path.relpath(snap, os.path.dirname(link)), link)
            log(f"   {repo}: commit {commit}")
    finally:
        shutil.rmtree(stage)

    log("== goldens")
    golden_text(pipe15, os.path.join(gdir, "text_sd15.safetensors"))
    golden_text(pipe21, os.path.join(gdir, "text_sd21.safetensors"))
    cases15 = unet_inputs(SEEDS["golden"] + 10)
    golden_unet(pipe15.unet, cases15, os.path.join(gdir, "unet_sd15.safetensors"))
    golden_unet(pipe21.unet, unet_inputs(SEEDS["golden"] + 20), os.path.join(gdir, "unet_sd21.safetensors"))
    golden_taesd(taesd, os.path.join(gdir, "taesd.safetensors"))
    golden_vae(pipe15.vae, os.path.join(gdir, "vae_sd15.safetensors"))
    golden_lcm(pipe15, os.path.join(gdir, "lcm_sd15.safetensors"))
    golden_lcm(pipe21, os.path.join(gdir, "lcm_sd21.safetensors"))
    err = golden_lora(os.path.join(fx, "models", "tiny-sd15"), lora_dir, lora_index, lora_sd, cases15,
                      os.path.join(gdir, "lora_sd15.safetensors"))
    log(f"   lora fused-weight check max err {err:.2e}")
    golden_readme(gdir)
    # The stream pipeline's goldens run the reference on these models: regenerate them too.
    import subprocess
    log("== stream goldens (make_stream_goldens.py)")
    subprocess.run([sys.executable, os.path.join(HERE, "make_stream_goldens.py")], check=True)
    log(f"generated in {time.time() - t0:.1f} s")
    if report.get("fast_differs_at") is not None:
        log("fast tokenizer differs on:", report["fast_differs_at"])
    if report.get("open_clip_differs_at") is not None:
        log("open_clip (ftfy) differs on:", report["open_clip_differs_at"])

    if args.check:
        check(fx, gdir)


# ============================================================================================
# --check: reload everything from disk and recompute
# ============================================================================================


def assert_same(name, a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    d = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    status = "bit-equal" if torch.equal(a, b) else f"max diff {d:.3g}"
    log(f"   {name}: {status}")
    assert d < 1e-5, name


@torch.no_grad()
def check(fx, gdir):
    from huggingface_hub import snapshot_download

    log("== check")
    t0 = time.time()
    cache = os.path.join(fx, "hf-cache", "hub")
    snap = snapshot_download("sdcam-fixtures/tiny-sd15", cache_dir=cache, local_files_only=True)
    snap_t = snapshot_download("sdcam-fixtures/tiny-taesd", cache_dir=cache, local_files_only=True)
    log(f"   snapshot_download -> {os.path.relpath(snap, fx)}, {os.path.relpath(snap_t, fx)}")
    pipe15 = StableDiffusionPipeline.from_pretrained("sdcam-fixtures/tiny-sd15", cache_dir=cache,
                                                     local_files_only=True, safety_checker=None)
    pipe21 = StableDiffusionPipeline.from_pretrained(os.path.join(fx, "models", "tiny-sd21"), safety_checker=None)
    taesd = AutoencoderTiny.from_pretrained("sdcam-fixtures/tiny-taesd", cache_dir=cache, local_files_only=True)
    assert isinstance(pipe15.scheduler, LCMScheduler) and isinstance(pipe21.scheduler, EulerDiscreteScheduler)
    for kind, pipe in (("sd15", pipe15), ("sd21", pipe21)):
        g = load_file(os.path.join(gdir, f"text_{kind}.safetensors"))
        emb = pipe.encode_prompt(TEXT_PROMPTS, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
        ids = pipe.tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(ids, g["input_ids"])
        assert_same(f"text_{kind}", emb, g["prompt_embeds"])
        g = load_file(os.path.join(gdir, f"unet_{kind}.safetensors"))
        for name, *_ in UNET_CASES:
            y = pipe.unet(g[f"{name}.sample"], g[f"{name}.timestep"],
                          encoder_hidden_states=g[f"{name}.encoder_hidden_states"]).sample
            assert_same(f"unet_{kind}.{name}", y, g[f"{name}.out"])
    g = load_file(os.path.join(gdir, "taesd.safetensors"))
    assert_same("taesd.enc0", taesd.encode(g["enc0.image"]).latents, g["enc0.latents"])
    assert_same("taesd.dec1", taesd.decode(g["dec1.latents"]).sample, g["dec1.sample"])
    g = load_file(os.path.join(gdir, "vae_sd15.safetensors"))
    assert_same("vae.enc0", pipe15.vae.encode(g["enc0.image"]).latent_dist.mean, g["enc0.mean"])
    assert_same("vae.dec0", pipe15.vae.decode(g["dec0.latents"]).sample, g["dec0.sample"])
    g = load_file(os.path.join(gdir, "lcm_sd15.safetensors"))
    s = LCMScheduler.from_config(pipe15.scheduler.config)
    s.set_timesteps(50, "cpu")
    assert torch.equal(s.timesteps, g["n50.timesteps"]) and torch.equal(s.alphas_cumprod, g["alphas_cumprod"])
    log("   lcm_sd15 timesteps/alphas_cumprod: bit-equal")
    # LoRA through the cache copy of tiny-sd15 and the fixture LoRA file
    pipe15.load_lora_weights(os.path.join(fx, "models", "tiny-lora"))
    pipe15.fuse_lora(lora_scale=LORA_SCALE)
    g = load_file(os.path.join(gdir, "lora_sd15.safetensors"))
    y = pipe15.unet(g["case0.sample"], g["case0.timestep"], encoder_hidden_states=g["case0.encoder_hidden_states"]).sample
    assert_same("lora.case0", y, g["case0.out"])
    emb = pipe15.encode_prompt(TEXT_PROMPTS, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)[0]
    assert_same("lora.text", emb, g["text.prompt_embeds"])
    base = load_file(os.path.join(gdir, "unet_sd15.safetensors"))["case0.out"]
    log(f"   lora changes unet case0 by mean |d| {(y - base).abs().mean():.3g} (|out| {base.abs().mean():.3g})")
    log(f"check done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
