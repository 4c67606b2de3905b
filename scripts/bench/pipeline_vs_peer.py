#!/usr/bin/env python3
"""sdcam's StreamDiffusion pipeline next to the Python reference, same machine, same run.

For each configuration, runs `sdcam bench --no-compare --json` and the team's peer script
(`../shared/peer/bench_peer.py`, the unmodified `streamdiffusion` 0.1.1 on CPU torch) on the SAME
random-weight diffusers folder (`../shared/peer/make_models.py` builds it; TAESD as the VAE) and
prints one markdown table with both timings and the ratio sdcam / reference (below 1 = sdcam
faster). Runs alternate (sdcam, reference, next configuration) so that drift of this noisy
machine hits both sides alike.

    python3 scripts/bench/pipeline_vs_peer.py                      # sd-turbo-arch at 256 and 512
    python3 scripts/bench/pipeline_vs_peer.py --sizes 256 --frames 3 --quick

Needs: a release build of sdcam (built if missing), /opt/peer (see ../shared/peer/README.md).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "peer"))
PEER_PY = os.environ.get("PEER_PYTHON", "/opt/peer/bin/python")

# (label, t_index_list, cfg_type, use_denoising_batch, sizes it runs at)
CONFIGS = [
    ("1 step [35], cfg none", [35], "none", True, (256, 512)),
    ("2 steps [32,45], cfg none, Stream Batch", [32, 45], "none", True, (256, 512)),
    ("2 steps [32,45], cfg none, sequential", [32, 45], "none", False, (256, 512)),
    ("2 steps, cfg self", [32, 45], "self", True, (256,)),
    ("2 steps, cfg initialize", [32, 45], "initialize", True, (256,)),
    ("2 steps, cfg full", [32, 45], "full", True, (256,)),
]


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def sdcam_row(binary, folder, size, t, cfg, batch, frames, warmup, dtype="f32"):
    sets = [
        f"model.id={folder}",
        f"model.tiny_vae={folder}/taesd",
        f"stream.t_index_list={json.dumps(t)}",
        f"stream.cfg_type=\"{cfg}\"",
        f"stream.use_denoising_batch={'true' if batch else 'false'}",
        "stream.guidance_scale=1.4",
        # the reference has no warm start; its first frames are warm-up anyway
        "stream.warm_start=false",
    ]
    if dtype != "f32":  # older builds refuse bf16 on the CPU; f32 is their default there
        sets.append(f"model.dtype=\"{dtype}\"")
    cmd = [binary, "bench", "--no-compare", "--json", "--size", f"{size}x{size}",
           "--frames", str(frames), "--warmup", str(warmup)]
    for s in sets:
        cmd += ["--set", s]
    out = sh(cmd, stdout=subprocess.PIPE).stdout
    return json.loads(out)["rows"][0]


def peer_row(models_root, model, size, t, cfg, batch, frames, warmup, gate):
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = f.name
    cmd = [PEER_PY, os.path.join(PEER_DIR, "bench_peer.py"), "--model", model, "--size", str(size),
           "--t-index", ",".join(map(str, t)), "--cfg", cfg, "--guidance", "1.4",
           "--warmup", str(warmup), "--frames", str(frames), "--models-root", models_root,
           "--out", path]
    if not batch:
        cmd.append("--no-denoising-batch")
    if not gate:
        cmd.append("--no-gate")
    sh(cmd, stdout=sys.stderr)
    rows = [json.loads(line) for line in open(path) if line.strip()]
    os.unlink(path)
    return [r for r in rows if r.get("kind") != "env"][-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--model", default="sd-turbo-arch")
    ap.add_argument("--models-root", default="/tmp/peer/models")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="only the 1-step row at each size")
    ap.add_argument("--no-gate", action="store_true", help="the peer does not wait for idle")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()

    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                          "release", "sdcam")
    if not os.path.exists(binary):
        sh(["cargo", "build", "--release", "--bin", "sdcam"], cwd=ROOT)
    folder = os.path.join(a.models_root, a.model)
    if not os.path.isdir(folder):
        sh([PEER_PY, os.path.join(PEER_DIR, "make_models.py"), "--root", a.models_root,
            "--only", a.model])

    sizes = [int(s) for s in a.sizes.split(",")]
    results = []
    for size in sizes:
        for label, t, cfg, batch, at in CONFIGS:
            if size not in at or (a.quick and len(t) > 1):
                continue
            s = sdcam_row(binary, folder, size, t, cfg, batch, a.frames, a.warmup)
            p = peer_row(a.models_root, a.model, size, t, cfg, batch, a.frames, a.warmup,
                         not a.no_gate)
            results.append(dict(size=size, label=label, sdcam=s, peer=p))
            print(f"{size} {label}: sdcam {s['ms']['total']:.0f} ms, reference "
                  f"{p['ms_median']:.0f} ms", file=sys.stderr, flush=True)

    print(f"model: {a.model} (random weights, fp32, CPU, TAESD), median ms/frame of "
          f"{a.frames} frame(s) after {a.warmup} warm-up; ratio = sdcam / reference\n")
    print("| size | configuration | sdcam ms | reference ms | ratio | sdcam U-Net | ref U-Net | "
          "U-Net ratio | sdcam enc+dec | ref enc+dec | enc+dec ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, p = r["sdcam"], r["peer"]
        sm, pm = s["ms"]["total"], p["ms_median"]
        su, pu = s["ms"]["unet"], p["predict_ms"]
        se, pe = s["ms"]["encode"] + s["ms"]["decode"], p["encode_ms"] + p["decode_ms"]
        print(f"| {r['size']}² | {r['label']} | {sm:.0f} | {pm:.0f} | {sm / pm:.2f} | {su:.0f} | "
              f"{pu:.0f} | {su / pu:.2f} | {se:.0f} | {pe:.0f} | {se / pe:.2f} |")
    # the paper's comparisons inside each implementation
    print("\nWithin each implementation (ms/frame ratios):\n")
    print("| size | comparison | sdcam | reference |")
    print("|---|---|---|---|")
    by = {(r["size"], r["label"]): r for r in results}
    for size in sizes:
        base = by.get((size, "2 steps [32,45], cfg none, Stream Batch"))
        if not base:
            continue
        for label in ("2 steps [32,45], cfg none, sequential", "2 steps, cfg self",
                      "2 steps, cfg initialize", "2 steps, cfg full"):
            r = by.get((size, label))
            if r:
                print(f"| {size}² | {label} / Stream Batch cfg none | "
                      f"{r['sdcam']['ms']['total'] / base['sdcam']['ms']['total']:.2f} | "
                      f"{r['peer']['ms_median'] / base['peer']['ms_median']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
