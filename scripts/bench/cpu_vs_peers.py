#!/usr/bin/env python3
"""sdcam on the CPU next to PyTorch and OpenVINO, same machine, same run (issue 14).

Two parts, each alternating the implementations round by round (A B A B) so that drift of this
noisy machine hits all of them alike; every figure is a median over rounds of per-call medians.

  components  the U-Net (diffusers `forward` with prompt embeddings, the same work in every
              implementation) over latent sizes and batch sizes, and TAESD encode / decode over
              image sizes: `sdcam bench-unet` / `sdcam bench-taesd` for each sdcam binary given,
              `components_peer.py` for torch, OpenVINO f32 and OpenVINO bf16; plus a large torch
              GEMM as the machine's measured f32 peak, and the share of it each one reaches.
  e2e         the issue's end-to-end rows (img2img frames through the whole StreamDiffusion
              pipeline with TAESD) through `pipeline_vs_peer.py`'s two runners: each sdcam
              binary given, and the Python StreamDiffusion 0.1.1 (`../shared/peer/bench_peer.py`).

    python3 scripts/bench/cpu_vs_peers.py components --sdcam now=target/release/sdcam
    python3 scripts/bench/cpu_vs_peers.py e2e --sdcam before=/path/old --sdcam now=target/release/sdcam

Several `--sdcam NAME=PATH` compare builds (before/after, or a `--no-default-features` build for
the AVX2 path); `NAME=PATH@bf16` runs that binary with bf16 products (`--dtype bf16`,
`model.dtype = "bf16"`: f32 activations, bf16 matrix products; needs AVX512-BF16). Ratios are
against the torch / OpenVINO f32 / OpenVINO bf16 figure of the same shape.

    python3 scripts/bench/cpu_vs_peers.py e2e --sdcam f32=target/release/sdcam \
        --sdcam bf16=target/release/sdcam@bf16

The load average is printed with every table. Needs /opt/peer (../shared/peer/README.md), OpenVINO in it
(`pip install openvino`) and the random-weight models of make_models.py.

FLOP counts: TAESD's are exact (its convolutions, for the madebyollin/taesd layout); the
U-Net's scale BK-SDM's 339 G multiply-adds at a 64² latent with the latent area (attention grows
faster, so the large sizes are undercounted). Winograd convolutions do fewer operations than
counted: their GFLOP/s are "effective", which is why a share above 100 % of the GEMM peak is
possible.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER_PY = os.environ.get("PEER_PYTHON", "/opt/peer/bin/python")
COMPONENTS_PEER = os.path.join(HERE, "components_peer.py")


def _load_pipeline_runner():
    spec = importlib.util.spec_from_file_location("pvp", os.path.join(HERE, "pipeline_vs_peer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sh_json(cmd):
    """The JSON lines `cmd` prints, each as soon as it is printed (so that every row can be saved
    before the next is measured); raises CalledProcessError when `cmd` fails."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
        for line in p.stdout:
            if line.startswith("{"):
                yield json.loads(line)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)


def save(a, payload):
    """Write what has been measured so far (after every measurement: a run stopped halfway, or
    killed, keeps its rows; `--render` prints the tables from such a file)."""
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, a.out)


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


# ---- FLOP counts ----

UNET_MACS_64 = 339e9  # BK-SDM (arXiv 2305.15798), SD U-Net at 512² (64² latent)


def unet_flops(latent, batch):
    return 2 * UNET_MACS_64 * (latent / 64) ** 2 * batch


def taesd_flops(size, component):
    """Exact conv multiply-adds ×2 of madebyollin/taesd (64 channels; blocks 1,3,3,3 / 3,3,3,1)."""
    c, k9 = 64, 9
    full = c * c * k9  # MACs per output pixel of a 64→64 3×3 conv
    px = lambda s: s * s  # noqa: E731
    if component == "taesd-encode":
        macs = px(size) * (3 * c * k9 + 1 * 3 * full)
        for lvl in (1, 2, 3):
            s = size >> lvl
            macs += px(s) * (full + 3 * 3 * full)
        macs += px(size >> 3) * c * 4 * k9
    else:
        macs = px(size >> 3) * (4 * c * k9 + 3 * 3 * full)
        for lvl, blocks in ((2, 3), (1, 3), (0, 1)):
            s = size >> lvl
            macs += px(s) * (full + blocks * 3 * full)
        macs += px(size) * c * 3 * k9
    return 2 * macs


# ---- components ----


def components(a):
    unet_shapes = [(lat, 1) for lat in a.latents] + [(a.batch_latent, b) for b in a.batches if b > 1]
    rows = []
    peak = list(sh_json([PEER_PY, COMPONENTS_PEER, "--peak-gemm", "--iters", "5", "--json",
                         "--threads", str(a.threads)]))[0]
    try:
        _components_rounds(a, unet_shapes, rows, peak)
    except KeyboardInterrupt:
        print("cpu_vs_peers: interrupted; the tables below hold what was measured",
              file=sys.stderr)
    render_components(rows, dict(peak, override=a.peak_gflops), [n for n, _, _ in a.sdcam])


def _components_rounds(a, unet_shapes, rows, peak):
    def add(row):
        rows.append(row)
        save(a, dict(peak=peak, rows=rows))

    for rnd in range(a.rounds):
        load = loadavg()
        for name, binary, dtype in a.sdcam:
            common = ["--iters", str(a.iters), "--warmup", str(a.warmup), "--json",
                      "--idle-max-wait", str(a.idle_max_wait)]
            if dtype != "f32":
                common += ["--dtype", dtype]
            for b in sorted({b for _, b in unet_shapes}):
                lats = [lat for lat, bb in unet_shapes if bb == b]
                cmd = [binary, "bench-unet", "--mode", "embeds", "--batch", str(b)]
                for lat in lats:
                    cmd += ["--latent", str(lat)]
                for r in sh_json(cmd + common):
                    # builds older than bench-taesd print no component
                    add(dict(r, impl=name, round=rnd, load=load, component="unet"))
            cmd = [binary, "bench-taesd"] + sum((["--size", str(s)] for s in a.sizes), [])
            try:
                for r in sh_json(cmd + common):
                    add(dict(r, impl=name, round=rnd, load=load))
            except subprocess.CalledProcessError:  # a build older than `bench-taesd`
                print(f"cpu_vs_peers: {name} has no bench-taesd; no TAESD rows for it",
                      file=sys.stderr)
        if not a.engines:
            continue
        peer = [PEER_PY, COMPONENTS_PEER, "--model", a.model, "--threads", str(a.threads),
                "--iters", str(a.iters),
                "--warmup", str(a.warmup), "--json", "--idle-max-wait", str(a.idle_max_wait)]
        for e in a.engines:
            peer += ["--engine", e]
        for b in sorted({b for _, b in unet_shapes}):
            cmd = peer + ["--component", "unet", "--batch", str(b)]
            for lat in [lat for lat, bb in unet_shapes if bb == b]:
                cmd += ["--latent", str(lat)]
            for r in sh_json(cmd):
                add(dict(r, round=rnd, load=load))
        cmd = peer + ["--component", "taesd"] + sum((["--size", str(s)] for s in a.sizes), [])
        for r in sh_json(cmd):
            add(dict(r, round=rnd, load=load))


def _key(r):
    shape = (r["latent"], r["batch"]) if r["component"] == "unet" else (r["size"], r.get("batch", 1))
    return r["component"], shape


def render_components(rows, peak, sdcam_names):
    med = {}
    for r in rows:
        med.setdefault((_key(r), r["impl"]), []).append(r["median_ms"])
    med = {k: statistics.median(v) for k, v in med.items()}
    impls = sdcam_names + [i for i in ("torch", "openvino-f32", "openvino-bf16")
                           if any(k[1] == i for k in med)]
    shapes = sorted({k[0] for k in med}, key=lambda s: (s[0], s[1]))
    peak_g = peak.get("override") or peak["gflops"]
    loads = sorted({" ".join(r["load"]) for r in rows})
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    print(f"\nComponents: median ms per call (median over rounds), threads {threads}; load averages "
          f"at the start of each round: {'; '.join(loads)}")
    print(f"Measured f32 GEMM peak (torch, {peak['n']}³): {peak['gflops']:.0f} GFLOP/s"
          + (f"; shares below of {peak_g:.0f} GFLOP/s (--peak-gflops)" if peak.get("override")
             else "") + "\n")
    head = "| component | shape | " + " | ".join(impls) + " | " + " | ".join(
        f"{n} / torch | {n} / OV f32 | {n} / OV bf16" for n in sdcam_names) + " | " + " | ".join(
        f"{i} % of peak" for i in impls if i != "openvino-bf16") + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for comp, shape in shapes:
        vals = {i: med.get(((comp, shape), i)) for i in impls}
        if comp == "unet":
            label, flops = f"latent {shape[0]}², batch {shape[1]}", unet_flops(*shape)
        else:
            label, flops = f"{shape[0]}²", taesd_flops(shape[0], comp)
        cells = [f"{vals[i]:.0f}" if vals[i] else "–" for i in impls]
        ratios = []
        for n in sdcam_names:
            for ref in ("torch", "openvino-f32", "openvino-bf16"):
                ok = vals.get(n) and vals.get(ref)
                ratios.append(f"{vals[n] / vals[ref]:.2f}" if ok else "–")
        shares = [f"{100 * flops / (vals[i] * 1e-3) / 1e9 / peak_g:.0f} %" if vals[i] else "–"
                  for i in impls if i != "openvino-bf16"]
        print(f"| {comp} | {label} | " + " | ".join(cells + ratios + shares) + " |")


# ---- end to end ----

E2E_ROWS = [  # (model, size, t_index_list, cfg) — the table
    ("sd-turbo-arch", 256, [35], "none"),
    ("sd-turbo-arch", 512, [35], "none"),
    ("sd15-arch", 256, [32, 45], "none"),
    ("sd15-arch", 256, [32, 45], "self"),
    ("sd15-arch", 256, [32, 45], "initialize"),
    ("sd15-arch", 256, [32, 45], "full"),
]


def e2e(a):
    results = []
    try:
        _e2e_rounds(a, results)
    except KeyboardInterrupt:
        print("cpu_vs_peers: interrupted; the table below holds what was measured",
              file=sys.stderr)
    render_e2e(results, [(n, d) for n, _, d in a.sdcam], a.frames, a.warmup, a.threads)


def _e2e_rounds(a, results):
    pvp = _load_pipeline_runner()
    for rnd in range(a.rounds):
        for model, size, t, cfg in E2E_ROWS:
            if a.only and f"{model}:{size}:{cfg}" not in a.only:
                continue
            folder = os.path.join(a.models_root, model)
            load = loadavg()
            for name, binary, dtype in a.sdcam:
                s = pvp.sdcam_row(binary, folder, size, t, cfg, True, a.frames, a.warmup, dtype)
                results.append(dict(impl=name, model=model, size=size, cfg=cfg, round=rnd,
                                    load=load, total=s["ms"]["total"], unet=s["ms"]["unet"],
                                    encdec=s["ms"]["encode"] + s["ms"]["decode"],
                                    dtype=dtype, frames=a.frames, warmup=a.warmup,
                                    threads=a.threads))
                save(a, results)
            p = pvp.peer_row(a.models_root, model, size, t, cfg, True, a.frames, a.warmup, True)
            results.append(dict(impl="torch", model=model, size=size, cfg=cfg, round=rnd,
                                load=load, total=p["ms_median"], unet=p["predict_ms"],
                                encdec=p["encode_ms"] + p["decode_ms"]))
            save(a, results)
            print(f"round {rnd} {model} {size} {cfg}: " + ", ".join(
                f"{r['impl']} {r['total']:.0f}" for r in results[-len(a.sdcam) - 1:]),
                file=sys.stderr, flush=True)


def render_e2e(results, sdcam, frames, warmup, threads):
    names = [n for n, _ in sdcam]
    dtypes = ", ".join(f"{n} {d}" for n, d in sdcam)
    print(f"\nEnd to end: ms per frame (median of {frames} frames after {warmup} warm-up, "
          f"per round: round 1 / round 2), TAESD, {threads} threads, {dtypes}, torch f32; "
          f"ratio = sdcam / torch")
    head = ("| row | load (1/5/15 min) | " + " | ".join(f"{n} total" for n in names)
            + " | torch total | " + " | ".join(f"{n} / torch" for n in names)
            + " | " + " | ".join(f"{n} U-Net" for n in names) + " | torch U-Net | "
            + " | ".join(f"{n} enc+dec" for n in names) + " | torch enc+dec |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for model, size, t, cfg in E2E_ROWS:
        sel = [r for r in results if (r["model"], r["size"], r["cfg"]) == (model, size, cfg)]
        if not sel:
            continue

        def per_round(impl, field):
            return [r[field] for r in sorted(sel, key=lambda r: r["round"]) if r["impl"] == impl]

        def fmt(v):
            return " / ".join(f"{x:.0f}" for x in v)

        loads = " ; ".join(sorted({" ".join(r["load"]) for r in sel}))
        torch_t = per_round("torch", "total")
        cells = [fmt(per_round(n, "total")) for n in names] + [fmt(torch_t)]
        cells += [" / ".join(f"{x / y:.2f}" for x, y in zip(per_round(n, "total"), torch_t))
                  for n in names]
        cells += [fmt(per_round(n, "unet")) for n in names] + [fmt(per_round("torch", "unet"))]
        cells += [fmt(per_round(n, "encdec")) for n in names] + [fmt(per_round("torch", "encdec"))]
        label = f"{model} {size}², {len(t)} step{'s' if len(t) > 1 else ''}, cfg {cfg}"
        print(f"| {label} | {loads} | " + " | ".join(cells) + " |")


def render_saved(a):
    """`--render FILE`: the tables of a saved run; the sdcam names are those in the file."""
    data = json.load(open(a.render))
    if a.part == "components":
        peers = {"torch", "openvino-f32", "openvino-bf16"}
        names = list(dict.fromkeys(r["impl"] for r in data["rows"] if r["impl"] not in peers))
        render_components(data["rows"], dict(data["peak"], override=a.peak_gflops), names)
    else:
        sdcam = list(dict.fromkeys((r["impl"], r.get("dtype", "?")) for r in data
                                   if r["impl"] != "torch"))
        r0 = next((r for r in data if "frames" in r), {})
        render_e2e(data, sdcam, r0.get("frames", a.frames), r0.get("warmup", a.warmup),
                   r0.get("threads", a.threads))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["components", "e2e"])
    ap.add_argument("--render", metavar="JSON", help="print the tables of an --out file "
                    "(complete or partial) instead of measuring")
    ap.add_argument("--sdcam", action="append", metavar="NAME=PATH",
                    help="an sdcam binary to measure (repeatable; default now=target/release/sdcam)")
    ap.add_argument("--models-root", default="/tmp/peer/models")
    ap.add_argument("--model", default=None, help="components: the diffusers folder "
                    "(default MODELS_ROOT/sd-turbo-arch)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--frames", type=int, default=3, help="e2e: timed frames per run")
    ap.add_argument("--latents", default="32,48,64,96")
    ap.add_argument("--batches", default="1,2,3,4", help="U-Net batch sizes, at --batch-latent")
    ap.add_argument("--batch-latent", type=int, default=32)
    ap.add_argument("--sizes", default="256,384,512,768", help="TAESD image sizes")
    ap.add_argument("--engines", default="torch,ov-f32,ov-bf16", help="peers, or none")
    ap.add_argument("--idle-max-wait", type=float, default=20.0)
    ap.add_argument("--only", action="append", help="e2e: MODEL:SIZE:CFG rows to run")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads of every implementation (RAYON_NUM_THREADS for sdcam)")
    ap.add_argument("--out", help="write the raw rows as JSON here")
    ap.add_argument("--peak-gflops", type=float, help="components: the f32 peak (GFLOP/s) to "
                    "take shares of, where a faster GEMM than torch's was measured (default: "
                    "torch's 2048³ GEMM in the same run)")
    a = ap.parse_args()
    a.sdcam = [tuple(s.split("=", 1)) for s in (a.sdcam or
               [f"now={os.path.join(ROOT, 'target', 'release', 'sdcam')}"])]
    a.sdcam = [(n, *(p.rsplit("@", 1) if p.endswith("@bf16") else (p, "f32"))) for n, p in a.sdcam]
    a.latents = [int(x) for x in a.latents.split(",")]
    a.batches = [int(x) for x in a.batches.split(",")]
    a.sizes = [int(x) for x in a.sizes.split(",")]
    a.engines = [] if a.engines == "none" else a.engines.split(",")
    a.model = a.model or os.path.join(a.models_root, "sd-turbo-arch")
    # sdcam's candle and rayon pools read this; the peers get --threads (bench_peer.py uses 2)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    if a.render:
        render_saved(a)
    elif a.part == "components":
        components(a)
    else:
        e2e(a)


if __name__ == "__main__":
    main()
