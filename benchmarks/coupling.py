"""Benchmark MeanFieldCoupling (O(T) mean field) against the naive O(T^2) pairwise sum.

Coupling along the token axis (dim=-2) of phases theta of shape (8, 12, T, 32)
(batch, heads, tokens, oscillators), strength K=1, phase lag alpha=0.3, harmonics (1,):

    c_i = (K / N_i) * sum_{j in S_i} sin(theta_j - theta_i - alpha)

with S_i all tokens (N_i = T), or with causal=True the tokens j <= i (N_i = i + 1).
For each T and causal setting it prints the median wall time of both (float32), the speed-up
and the max abs difference in float32 (and in float64, on one batch element).
Goal: >= 50x faster at T=512 and agreement to 1e-5.

Run:  python benchmarks/coupling.py [--device cpu|cuda] [--lengths 128 256 512] [--repeats 20] [--json out.json]
                                    [--seed 0]
"""

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package
from benchmarks._timing import bench_ms, device_arg, json_path, positive_int, seed_int  # noqa: E402
from kuramoto_attn import MeanFieldCoupling  # noqa: E402

B, H, N = 8, 12, 32
STRENGTH, PHASE_LAG = 1.0, 0.3
GOAL_SPEEDUP, GOAL_DIFF = 50.0, 1e-5


def naive_coupling(theta, strength, phase_lag, causal):
    """(K / N_i) * sum_j sin(theta_j - theta_i - alpha) from the pairwise (b, h, T, T, n) differences."""
    T = theta.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool, device=theta.device).tril()  # keep[i, j] = j <= i
    out = []
    for th in theta.split(1):  # one batch element at a time to bound memory
        diff = th[..., None, :, :] - th[..., :, None, :]  # diff[..., i, j, :] = theta_j - theta_i
        s = diff.sub_(phase_lag).sin_()  # in place: the (1, h, T, T, n) buffer is the big one
        if causal:
            s.masked_fill_(~keep[:, :, None], 0.0)
        out.append(s.sum(-2))  # sum over j
    out = torch.cat(out)
    if causal:
        count = torch.arange(1, T + 1, device=theta.device, dtype=theta.dtype)[:, None]
    else:
        count = T
    return strength / count * out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed repeats (the slow naive path gets a fifth)")
    parser.add_argument("--json", type=json_path, default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args()

    device = args.device  # a torch.device (device_arg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads: {torch.get_num_threads()}")
    print(f"theta: ({B}, {H}, T, {N}), dim=-2, strength={STRENGTH}, phase_lag={PHASE_LAG}, harmonics=(1,)\n")

    torch.manual_seed(args.seed)
    rows = []
    with torch.inference_mode():
        for causal in (False, True):
            mf32 = MeanFieldCoupling(strength=STRENGTH, phase_lag=PHASE_LAG, dim=-2, causal=causal).to(device)
            mf64 = copy.deepcopy(mf32).double()  # float64 strength buffer too
            for T in args.lengths:
                theta = (torch.rand(B, H, T, N, device=device, dtype=torch.float64) * 2 - 1) * torch.pi
                theta32 = theta.float()
                # agreement (these calls also warm up both paths)
                ref32 = naive_coupling(theta32, STRENGTH, PHASE_LAG, causal)
                diff32 = (mf32(theta32) - ref32).abs().max().item()
                ref64 = naive_coupling(theta[:1], STRENGTH, PHASE_LAG, causal)  # one batch element: cheap
                diff64 = (mf64(theta[:1]) - ref64).abs().max().item()
                del ref32, ref64
                # timing, float32
                naive_ms = bench_ms(lambda: naive_coupling(theta32, STRENGTH, PHASE_LAG, causal),
                                    device, max(1, args.repeats // 5), warmup=0)
                mf_ms = bench_ms(lambda: mf32(theta32), device, args.repeats, warmup=2)
                rows.append(dict(T=T, causal=causal, naive_ms=naive_ms, mean_field_ms=mf_ms,
                                 speedup=naive_ms / mf_ms, max_abs_diff=diff32, max_abs_diff_fp64=diff64))

    print("| T | causal | naive ms | mean-field ms | speed-up | max abs diff (fp32) | max abs diff (fp64, b=1) |")
    print("|---:|:---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['causal']} | {r['naive_ms']:.2f} | {r['mean_field_ms']:.3f} | "
              f"{r['speedup']:.1f}x | {r['max_abs_diff']:.2e} | {r['max_abs_diff_fp64']:.2e} |")

    print(f"\ngoal: >= {GOAL_SPEEDUP:.0f}x faster at T=512 and agreement to {GOAL_DIFF:.0e}")
    for causal in (False, True):
        at512 = [r for r in rows if r["causal"] == causal and r["T"] == 512]
        worst = max(r["max_abs_diff"] for r in rows if r["causal"] == causal)
        if not at512:
            print(f"  causal={causal}: n/a (T=512 not benchmarked)")
            continue
        ok = at512[0]["speedup"] >= GOAL_SPEEDUP and worst <= GOAL_DIFF
        print(f"  causal={causal}: {'PASS' if ok else 'MISS'} "
              f"(speed-up {at512[0]['speedup']:.1f}x at T=512, worst max abs diff {worst:.2e})")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), device_name=name, torch=torch.__version__,
                           threads=torch.get_num_threads(), rows=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
