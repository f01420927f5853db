"""Training step time of models.GPT: the plain baseline against PhaseGPT variants.

One step = forward with targets, ``loss.backward()``, ``AdamW.step()`` and ``zero_grad``; random
tokens, fp32, dropout 0 (as in the baseline config of the PhaseGPT study: 4 layers, 4 heads,
d_model 128, context 64, batch 12, vocab 65). Variants: the baseline; Kuramoto attention in layer 2
(N = 32, K = 1, ``--steps`` Euler steps: 5 as in the Phase A presets) with mean-field coupling; the
same with attention coupling.
Median (and min) ms per step over ``--iters`` interleaved rounds after ``--warmup`` untimed ones, and
the ratio to the baseline. ``--profile NAME`` prints torch.profiler's top operators for one variant
instead (eager, ``--iters`` steps, default 10, after ``--warmup``; not with ``--variants``, ``--compile`` or
``--compiled-kernels``).

``--compile`` adds a copy of each variant under ``torch.compile`` (default inductor backend; the
first step, which compiles, is part of ``--warmup``), compared with the eager baseline.
``--compiled-kernels`` adds the mean-field variant with only its fused integration's step math
compiled (``benchmarks/_compiled_euler.py``, a prototype), after checking it against the
library's path in float64.

Run:  python benchmarks/step_time.py [--threads 2] [--iters 50] [--warmup 10] [--device cpu|cuda] [--steps 5]
                                     [--batch 12] [--variants baseline mean_field attention] [--compile]
                                     [--profile baseline|mean_field|attention] [--compiled-kernels]
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks._timing import bench_ms, device_arg, non_negative_int, positive_int, sync  # noqa: E402
import kuramoto_attn.attention as attention_module  # noqa: E402
from kuramoto_attn._euler_mean_field import euler_mean_field  # noqa: E402
from models import GPT, GPTConfig  # noqa: E402

BASE = dict(vocab_size=65, max_seq_len=64, n_layers=4, n_heads=4, d_model=128, dropout=0.0)
PHASE = dict(use_phase_attention=True, phase_layer_idx=(2,), num_oscillators=32, steps=5,
             coupling_strength=1.0)
VARIANTS = {
    "baseline": BASE,
    "mean_field": {**BASE, **PHASE, "coupling": "mean_field"},
    "attention": {**BASE, **PHASE, "coupling": "attention"},
}


def make_step(settings, device, batch, compile_model=False, integration=None):
    """One training step of a fresh model; ``integration`` replaces the fused Euler mean-field
    function of ``kuramoto_attn.attention`` during the step."""
    if integration is not None:
        plain_step = make_step(settings, device, batch, compile_model)

        def patched():
            library = attention_module.euler_mean_field
            attention_module.euler_mean_field = integration
            try:
                plain_step()
            finally:
                attention_module.euler_mean_field = library

        return patched
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


def check_integration(integration, device):
    """Print the largest difference to the library's fused path (float64: phases and gradients)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 3, 4, 9, generator=g, dtype=torch.float64).to(device)
    omega, strength = 0.1 * torch.randn(3, 4, 1, dtype=torch.float64), torch.rand(3, 1, 1, dtype=torch.float64)
    weight = (torch.rand(2, 1, 1, 9, generator=g) > 0.3).to(torch.float64)
    worst = 0.0
    for causal, w, lag in ((True, None, 0.0), (True, weight, 0.3), (False, weight, 0.0)):
        results = []
        for fn in (euler_mean_field, integration):
            inputs = [x.detach().clone().to(device).requires_grad_() for x in (theta, omega, strength)]
            out = fn(*inputs, None if w is None else w.to(device), steps=5, dt=0.1, phase_lag=lag, causal=causal)
            out.pow(2).sum().backward()
            results.append([out] + [x.grad for x in inputs])
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(*results)))
    print(f"compiled step kernels vs the library's fused path (float64, phases and gradients): max |diff| {worst:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--iters", type=positive_int, default=None, help="timed steps (default 50; --profile: 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=12)
    parser.add_argument("--steps", type=positive_int, default=PHASE["steps"], help="Euler steps of the phase layer")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all (not with --profile)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd copies")
    parser.add_argument("--profile", choices=list(VARIANTS))
    parser.add_argument("--compiled-kernels", action="store_true",
                        help="also time the mean-field variant with its integration's step math compiled")
    args = parser.parse_args()
    if args.profile and (args.compile or args.compiled_kernels):  # it profiles the eager variant only
        parser.error("--profile: not with --compile or --compiled-kernels (it profiles the eager variant)")
    if args.profile and args.variants:  # it was ignored, silently
        parser.error("--variants: not with --profile (it profiles the one variant it names)")
    args.variants = args.variants or list(VARIANTS)
    args.iters = args.iters or (10 if args.profile else 50)
    if (args.compile or args.compiled_kernels) and args.warmup < 1:  # the compiling step would be timed
        parser.error("--warmup: at least 1 with --compile or --compiled-kernels (the first step compiles)")
    torch.set_num_threads(args.threads)
    for name in ("mean_field", "attention"):
        VARIANTS[name] = {**VARIANTS[name], "steps": args.steps}
    device = args.device  # a torch.device (device_arg)
    timed = f"profile of {args.iters} steps" if args.profile else f"median of {args.iters} steps"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, phase layer {args.steps} Euler steps, {timed} after {args.warmup}")

    if args.profile:
        step = make_step(VARIANTS[args.profile], device, args.batch)
        for _ in range(args.warmup):
            step()
        with torch.profiler.profile() as prof:  # CPU, and the GPU's kernels where there is one
            for _ in range(args.iters):
                step()
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        return

    # interleaved rounds (one step of each variant per round), so that load from other processes
    # on a shared machine falls on every variant alike
    names = ["baseline"] + [name for name in args.variants if name != "baseline"]
    steps = {name: make_step(VARIANTS[name], device, args.batch) for name in names}
    if args.compile:
        steps.update({f"{name} (compiled)": make_step(VARIANTS[name], device, args.batch, compile_model=True)
                      for name in names})
    if args.compiled_kernels:
        from benchmarks._compiled_euler import compiled_euler_mean_field
        check_integration(compiled_euler_mean_field, device)
        steps["mean_field (compiled step kernels)"] = make_step(VARIANTS["mean_field"], device, args.batch,
                                                                integration=compiled_euler_mean_field)
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
