#!/usr/bin/env python
"""diffusers' UNet2DConditionModel forward time, the Python side of `sdcam bench-unet`.

Random weights (`UNet2DConditionModel.from_config`, diffusers' default init), fp32, CPU,
torch.no_grad, 2 threads; the same latent sizes, batch, timestep, iterations and warm-up as
`sdcam bench-unet`, and the same JSON fields (one object per line with --json).

    /opt/peer/bin/python scripts/bench/unet_peer.py --config unet.json --arch sd-turbo \
        --latent 32 --latent 64 --iters 5 --warmup 1 --json

`--config` is the U-Net config.json to build (`sdcam bench-unet --arch A --print-config` writes
the one sdcam uses, so both build the same architecture).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

_CLK = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


def _sys_busy_s():
    """Busy CPU seconds of the machine (user..steal in /proc/stat)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _CLK


def _my_cpu_s():
    t = os.times()
    return t.user + t.system


def wait_idle(max_wait, threshold=0.10, window=1.0, need=2):
    """Wait until other processes use < threshold of the machine for `need` consecutive
    windows (at most max_wait s); True when the machine was idle. Same rule as sdcam's."""
    start = time.perf_counter()
    ok = 0
    while True:
        b0, m0, w0 = _sys_busy_s(), _my_cpu_s(), time.perf_counter()
        time.sleep(window)
        others = (_sys_busy_s() - b0) - (_my_cpu_s() - m0)
        frac = others / ((time.perf_counter() - w0) * _NCPU)
        ok = ok + 1 if frac < threshold else 0
        if ok >= need:
            return True
        if time.perf_counter() - start > max_wait:
            return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="U-Net config.json")
    ap.add_argument("--arch", default="sd-turbo", help="label for the output")
    ap.add_argument("--latent", type=int, action="append", help="latent size (repeatable; default 32 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-gate", action="store_true", help="do not wait for an idle machine")
    ap.add_argument("--idle-max-wait", type=float, default=60.0)
    a = ap.parse_args()
    latents = a.latent or [32, 64]

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.config) as f:
        cfg = json.load(f)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(cfg).to(torch.float32).eval()
    build_s = time.perf_counter() - t0
    cross = cfg["cross_attention_dim"]
    nparams = sum(p.numel() for p in unet.parameters())
    print(f"unet_peer: {a.arch} U-Net, {nparams} parameters, built in {build_s:.1f} s; "
          f"torch {torch.__version__}, fp32 CPU, {torch.get_num_threads()} threads", file=sys.stderr)

    embeds = torch.randn(1, 77, cross).repeat(a.batch, 1, 1)
    timestep = torch.full((a.batch,), float(a.timestep))
    with torch.no_grad():
        for latent in latents:
            sample = torch.randn(a.batch, 4, latent, latent)

            def call():
                return unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

            for _ in range(a.warmup):
                call()
            times, idle_iters = [], 0
            for _ in range(a.iters):
                if not a.no_gate and wait_idle(a.idle_max_wait):
                    idle_iters += 1
                t = time.perf_counter()
                out = call()
                times.append((time.perf_counter() - t) * 1e3)
                assert out.shape == sample.shape, out.shape
            row = dict(
                impl="diffusers", arch=a.arch, mode="forward", latent=latent, batch=a.batch,
                timestep=a.timestep, iters=a.iters, warmup=a.warmup, threads=torch.get_num_threads(),
                median_ms=statistics.median(times), min_ms=min(times),
                mean_ms=sum(times) / len(times), times_ms=[round(t, 1) for t in times],
                idle_iters=idle_iters,
            )
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{a.arch:9} diffusers forward latent {latent:3}  batch {a.batch}  "
                      f"median {row['median_ms']:8.1f} ms  min {row['min_ms']:8.1f} ms  "
                      f"({a.iters} iters, {idle_iters} on an idle machine)", flush=True)


if __name__ == "__main__":
    main()
