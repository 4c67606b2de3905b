#!/usr/bin/env python
"""StreamDiffusion's two model components, timed side by side in PyTorch and OpenVINO on CPU.

Measures, per shape and engine (PyTorch fp32; OpenVINO with f32 or bf16 inference precision):
  unet          diffusers UNet2DConditionModel forward(sample [B,4,N,N], timestep [B] = 500,
                encoder_hidden_states [B,77,cross_attention_dim]) for each --latent N, --batch B
  taesd-encode  AutoencoderTiny encode, image [1,3,S,S] -> latents [1,4,S/8,S/8], each --size S
  taesd-decode  AutoencoderTiny decode, latents [1,4,S/8,S/8] -> image [1,3,S,S]
For each shape the engines take turns call by call (torch, ov-f32, ov-bf16, torch, ...), so drift
of the machine hits all of them alike. OpenVINO converts each component (unet, taesd-encode,
taesd-decode) once, traced at its first shape, with dynamic batch/height/width ([?,4,?,?], [?],
[?,77,C]; f32 weights kept). Each shape then reshapes a clone of that model to static shapes (shared by
f32 and bf16) and compiles it with INFERENCE_NUM_THREADS, INFERENCE_PRECISION_HINT and a LATENCY
hint; the precision the plugin really uses, the convert/reshape/compile times and, per shape and
precision, max |out - torch| / max |torch| (a wrong trace or reshape shows here; rel_err in the row)
go to stderr.

--ov-cache DIR keeps the converted models as DIR/<component>-<fingerprint>.xml/.bin (f32, ~3.5 GB
for the SD U-Net; the fingerprint covers config, weights and torch/diffusers/openvino versions), so a
later run reads them instead of converting (convert_s is then the read time, ov_model=disk). It also
sets CACHE_DIR = DIR/compiled/<precision>-t<threads> for compile_model (one folder each: OpenVINO
2026.4's blob key ignores the precision hint), so a later compile of the same shape imports its blob;
each blob holds the weights (up to ~3.5 GB per U-Net shape and precision).

The models are random-weight diffusers folders (/work/shared/peer/make_models.py: DIR/unet,
DIR/taesd); speed does not depend on weight values. --unet-config builds the U-Net from a
config.json instead; without --model, TAESD is AutoencoderTiny's default (= madebyollin/taesd) shape.

    /opt/peer/bin/python scripts/bench/components_peer.py --model /tmp/peer/models/sd-turbo-arch \
        --latent 32 --latent 64 --batch 1 --batch 2 --size 256 --size 512 --iters 4 --json
    /opt/peer/bin/python scripts/bench/components_peer.py --model /tmp/peer/models/sd-turbo-arch \
        --component unet --engine ov-f32 --latent 32 --latent 48 --ov-cache /tmp/peer/ov-cache --json
    /opt/peer/bin/python scripts/bench/components_peer.py --peak-gemm --json   # torch f32 GEMM GFLOP/s

Before each timed call it waits (at most --idle-max-wait s) until other processes use < 10 % of
the machine for two 1 s windows, as unet_peer.py does; idle_iters counts the calls that got one.
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_peer import wait_idle  # noqa: E402  (the idle gate, the same rule as sdcam's)

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside diffusers/transformers
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the parity check catches frozen shapes

IMPL = {"torch": "torch", "ov-f32": "openvino-f32", "ov-bf16": "openvino-bf16"}


class UNetFn(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class TaesdEncode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latents


class TaesdDecode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def ov_compile(core, ov_model, precision, threads, cache_dir=None):
    import openvino.properties as props
    import openvino.properties.hint as hint

    cfg = {props.inference_num_threads: threads, hint.inference_precision: precision,
           hint.performance_mode: hint.PerformanceMode.LATENCY}
    if cache_dir:
        cfg["CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    compiled = core.compile_model(ov_model, "CPU", cfg)
    compile_s = time.perf_counter() - t0
    used = compiled.get_property(hint.inference_precision)
    return compiled, compile_s, getattr(used, "get_type_name", lambda: str(used))()


def _dynamic_dims(shape):
    """Batch dynamic, and height/width too for 4-D (NCHW) inputs; other dims stay fixed."""
    dyn = {0, 2, 3} if len(shape) == 4 else {0}
    return [-1 if i in dyn else d for i, d in enumerate(shape)]


def _fingerprint(key, module):
    """Identifies a converted model: component, config, weights (sum per tensor), library versions."""
    import diffusers
    import openvino as ov

    h = hashlib.sha1(f"{key} {type(module).__name__} torch {torch.__version__} diffusers "
                     f"{diffusers.__version__} openvino {ov.get_version()}".encode())
    for child in module.children():
        cfg = {k: v for k, v in dict(getattr(child, "config", {})).items() if not k.startswith("_")}  # set order
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            h.update(f"{name} {tuple(t.shape)} {t.dtype} {t.double().sum().item():.17g}".encode())
    return h.hexdigest()[:12]


class OVModels:
    """One converted ov.Model per component, with dynamic batch/height/width; shapes reshape clones."""

    def __init__(self, core, cache_dir=None):
        self.core, self.cache_dir, self.models = core, cache_dir, {}

    def get(self, key, module, inputs):
        """(ov.Model, seconds to convert or read, "converted" | "disk") for component `key`."""
        if key in self.models:
            return self.models[key]
        import openvino as ov

        path = None
        if self.cache_dir:
            path = os.path.join(self.cache_dir, f"{key}-{_fingerprint(key, module)}.xml")
        t0 = time.perf_counter()
        if path and os.path.exists(path):
            model, source = self.core.read_model(path), "disk"
        else:
            spec = [(ov.PartialShape(_dynamic_dims(list(x.shape))), ov.Type.f32) for x in inputs]
            with torch.no_grad():
                model = ov.convert_model(module, example_input=tuple(inputs), input=spec)
            source = "converted"
        convert_s = time.perf_counter() - t0
        shapes = ", ".join(str(p.get_partial_shape()) for p in model.inputs)
        print(f"components_peer: {key}: ov.Model {source} in {convert_s:.1f} s, inputs {shapes}", file=sys.stderr)
        if source == "converted" and path:
            os.makedirs(self.cache_dir, exist_ok=True)
            t0 = time.perf_counter()
            ov.save_model(model, path, compress_to_fp16=False)
            print(f"components_peer: {key}: saved to {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        self.models[key] = (model, convert_s, source)
        return self.models[key]

    def drop(self, key):
        self.models.pop(key, None)

    def compile_dir(self, precision, threads):
        # one folder per precision and thread count: OpenVINO 2026.4's blob key ignores
        # INFERENCE_PRECISION_HINT, so a shared folder hands bf16 the f32 blob (the output is then NaN)
        return os.path.join(self.cache_dir, "compiled", f"{precision}-t{threads}") if self.cache_dir else None


def make_engines(module, inputs, engines, threads, ov_models, key, label):
    """name -> (call, extra fields); OpenVINO reshapes a clone of the component's model to this shape."""
    out = {}
    if "torch" in engines:
        def torch_call():
            with torch.inference_mode():
                return module(*inputs)
        out["torch"] = (torch_call, {})
    ov_names = [e for e in engines if e.startswith("ov-")]
    if ov_names:
        import openvino as ov

        base, convert_s, source = ov_models.get(key, module, inputs)
        t0 = time.perf_counter()
        ov_model = base.clone()  # reshape works in place; the dynamic model stays for the next shape
        ov_model.reshape({ov_model.input(i): ov.PartialShape(list(x.shape)) for i, x in enumerate(inputs)})
        reshape_s = time.perf_counter() - t0
        feed = [x.numpy() for x in inputs]
        for name in ov_names:
            compiled, compile_s, used = ov_compile(ov_models.core, ov_model, name[3:], threads,
                                                   ov_models.compile_dir(name[3:], threads))
            print(f"components_peer: {label} {IMPL[name]}: reshaped in {reshape_s:.2f} s, compiled in "
                  f"{compile_s:.1f} s, INFERENCE_PRECISION_HINT reported {used}", file=sys.stderr)
            req = compiled.create_infer_request()

            def ov_call(req=req):
                req.infer(feed, share_inputs=True)
                return req.get_output_tensor(0).data  # a view, overwritten by the next call
            out[name] = (ov_call, dict(convert_s=round(convert_s, 2), ov_model=source,
                                       reshape_s=round(reshape_s, 2), compile_s=round(compile_s, 2),
                                       inference_precision=used))
        del ov_model
    return out


def run_shape(label, module, inputs, engines, a, ov_models, fields):
    """Warm up, then time the engines in turn; one row per engine."""
    eng = make_engines(module, inputs, engines, a.threads, ov_models, fields["component"], label)
    for name, (call, _) in eng.items():
        for _ in range(a.warmup):
            call()
    times = {n: [] for n in eng}
    idle = {n: 0 for n in eng}
    first = {}
    for _ in range(a.iters):
        for name, (call, _) in eng.items():
            if not a.no_gate and wait_idle(a.idle_max_wait):
                idle[name] += 1
            t = time.perf_counter()
            y = call()
            times[name].append((time.perf_counter() - t) * 1e3)
            if name not in first:
                first[name] = torch.as_tensor(y).clone()
    ref = first.get("torch")
    if ref is None:
        with torch.inference_mode():
            ref = module(*inputs)
    for name, y in first.items():
        if name != "torch":
            if tuple(y.shape) != tuple(ref.shape):
                print(f"components_peer: {label} {IMPL[name]}: output shape {tuple(y.shape)} != torch "
                      f"{tuple(ref.shape)}", file=sys.stderr)
                err = float("inf")
            else:
                err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
            eng[name][1]["rel_err"] = float(f"{err:.3g}")
            print(f"components_peer: {label} {IMPL[name]}: max |out - torch| / max |torch| = {err:.2e}",
                  file=sys.stderr)
    for name, (_, extra) in eng.items():
        ts = times[name]
        row = dict(impl=IMPL[name], **fields, threads=a.threads, iters=a.iters, warmup=a.warmup,
                   median_ms=statistics.median(ts), min_ms=min(ts), mean_ms=sum(ts) / len(ts),
                   times_ms=[round(t, 1) for t in ts], idle_iters=idle[name], **extra)
        emit(row, a.json)


def emit(row, as_json):
    if as_json:
        print(json.dumps(row), flush=True)
        return
    if row["component"] == "gemm-peak":
        print(f"torch gemm-peak n {row['n']}: {row['gflops']:.1f} GFLOP/s (median {row['median_ms']:.1f} ms, "
              f"best {row['gflops_best']:.1f} GFLOP/s)", flush=True)
        return
    shape = f"latent {row['latent']:3} batch {row['batch']}" if "latent" in row else f"size {row['size']:4}"
    conv = f"  convert {row['convert_s']:.1f} s" if "convert_s" in row else ""
    conv += f"  compile {row['compile_s']:.1f} s  rel_err {row['rel_err']:.1e}" if "rel_err" in row else ""
    print(f"{row['component']:13} {shape:20} {row['impl']:14} median {row['median_ms']:9.1f} ms  "
          f"min {row['min_ms']:9.1f} ms  ({row['iters']} iters, {row['idle_iters']} idle){conv}", flush=True)


def peak_gemm(a):
    n = a.gemm_n
    x, y = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        for _ in range(max(a.warmup, 1)):
            x @ y
        times, idle = [], 0
        for _ in range(a.iters):
            if not a.no_gate and wait_idle(a.idle_max_wait):
                idle += 1
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    emit(dict(impl="torch", component="gemm-peak", n=n, threads=a.threads, iters=a.iters, warmup=a.warmup,
              median_ms=med * 1e3, min_ms=min(times) * 1e3, gflops=2 * n**3 / med / 1e9,
              gflops_best=2 * n**3 / min(times) / 1e9, idle_iters=idle), a.json)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers-layout folder with unet/ and taesd/")
    ap.add_argument("--unet-config", help="U-Net config.json (random weights) instead of MODEL/unet")
    ap.add_argument("--component", action="append", choices=["unet", "taesd"], help="default both")
    ap.add_argument("--engine", action="append", choices=list(IMPL), help="default all three")
    ap.add_argument("--latent", type=int, action="append", help="U-Net latent size (default 32 64)")
    ap.add_argument("--batch", type=int, action="append", help="U-Net batch (default 1)")
    ap.add_argument("--size", type=int, action="append", help="TAESD image size (default 256 512)")
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--no-gate", action="store_true", help="do not wait for an idle machine")
    ap.add_argument("--idle-max-wait", type=float, default=60.0)
    ap.add_argument("--peak-gemm", action="store_true", help="only time a torch f32 n×n GEMM")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--ov-cache", metavar="DIR", help="keep converted models (and compile_model's CACHE_DIR) here")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    print(f"components_peer: torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    if a.peak_gemm:
        return peak_gemm(a)

    components = a.component or ["unet", "taesd"]
    engines = [e for e in IMPL if e in (a.engine or list(IMPL))]
    core = ov_models = None
    if any(e.startswith("ov-") for e in engines):  # torch alone needs no OpenVINO
        import openvino as ov
        core = ov.Core()
        ov_models = OVModels(core, a.ov_cache)
        print(f"components_peer: openvino {ov.get_version()}, CPU capabilities "
              f"{core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}", file=sys.stderr)
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    if "unet" in components:
        if a.unet_config:
            with open(a.unet_config) as f:
                unet = UNet2DConditionModel.from_config(json.load(f))
        elif a.model:
            unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"))
        else:
            ap.error("the U-Net needs --model or --unet-config")
        fn = UNetFn(unet.to(torch.float32).eval())
        cross = unet.config.cross_attention_dim
        for latent in a.latent or [32, 64]:
            for batch in a.batch or [1]:
                inputs = [torch.randn(batch, 4, latent, latent), torch.full((batch,), float(a.timestep)),
                          torch.randn(1, 77, cross).repeat(batch, 1, 1)]
                run_shape(f"unet latent {latent} batch {batch}", fn, inputs, engines, a, ov_models,
                          dict(component="unet", latent=latent, batch=batch))
        if ov_models:
            ov_models.drop("unet")
        del fn, unet
    if "taesd" in components:
        if a.model:
            vae = AutoencoderTiny.from_pretrained(os.path.join(a.model, "taesd"))
        else:
            vae = AutoencoderTiny()
        vae = vae.to(torch.float32).eval()
        encode, decode = TaesdEncode(vae), TaesdDecode(vae)
        for size in a.size or [256, 512]:
            image = torch.rand(1, 3, size, size) * 2 - 1
            run_shape(f"taesd-encode size {size}", encode, [image], engines, a, ov_models,
                      dict(component="taesd-encode", size=size, batch=1))
            latents = torch.randn(1, vae.config.latent_channels, size // 8, size // 8)
            run_shape(f"taesd-decode size {size}", decode, [latents], engines, a, ov_models,
                      dict(component="taesd-decode", size=size, batch=1))


if __name__ == "__main__":
    main()
