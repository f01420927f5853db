"""Training step time of models.GPT: the plain baseline against PhaseGPT variants.

One step = forward with targets, ``loss.backward()``, ``AdamW.step()`` and ``zero_grad``; random
tokens, fp32, dropout 0 (as in the baseline config of the PhaseGPT study: 4 layers, 4 heads,
d_model 128, context 64, batch 12, vocab 65). Variants: the baseline; Kuramoto attention in layer 2
(N = 32, 10 Euler steps, K = 1) with mean-field coupling; the same with attention coupling.
Median (and min) ms per step over ``--iters`` interleaved rounds after ``--warmup`` untimed ones, and
the ratio to the baseline. ``--profile NAME`` prints torch.profiler's top operators for one variant instead.

``--compile`` adds a copy of each variant under ``torch.compile`` (default inductor backend; the
first step, which compiles, is part of ``--warmup``), compared with the eager baseline.

Run:  python benchmarks/step_time.py [--threads 2] [--iters 50] [--warmup 10] [--device cpu|cuda]
                                     [--variants baseline mean_field attention] [--compile]
                                     [--profile baseline|mean_field|attention]
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks._timing import bench_ms  # noqa: E402
from models import GPT, GPTConfig  # noqa: E402

BASE = dict(vocab_size=65, max_seq_len=64, n_layers=4, n_heads=4, d_model=128, dropout=0.0)
PHASE = dict(use_phase_attention=True, phase_layer_idx=(2,), num_oscillators=32, steps=10,
             coupling_strength=1.0)
VARIANTS = {
    "baseline": BASE,
    "mean_field": {**BASE, **PHASE, "coupling": "mean_field"},
    "attention": {**BASE, **PHASE, "coupling": "attention"},
}


def make_step(settings, device, batch, compile_model=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**settings)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compile_model else model
    t = settings["max_seq_len"]
    idx = torch.randint(settings["vocab_size"], (batch, t + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd copies")
    parser.add_argument("--profile", choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {args.iters} steps after {args.warmup}")

    if args.profile:
        step = make_step(VARIANTS[args.profile], device, args.batch)
        for _ in range(args.warmup):
            step()
        with torch.profiler.profile() as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    # interleaved rounds (one step of each variant per round), so that load from other processes
    # on a shared machine falls on every variant alike
    names = ["baseline"] + [name for name in args.variants if name != "baseline"]
    steps = {name: make_step(VARIANTS[name], device, args.batch) for name in names}
    if args.compile:
        steps.update({f"{name} (compiled)": make_step(VARIANTS[name], device, args.batch, compile_model=True)
                      for name in names})
    times = {name: [] for name in steps}
    for round_ in range(args.warmup + args.iters):
        for name, step in steps.items():
            ms = bench_ms(step, device, repeats=1, warmup=0)
            if round_ >= args.warmup:
                times[name].append(ms)
    print("| variant | ms/step (median) | min | × baseline (median) |")
    print("|:---|---:|---:|---:|")
    base = statistics.median(times["baseline"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {min(values):.1f} | {ms / base:.2f} |")

if __name__ == "__main__":
    main()
