"""Integrate a population of Kuramoto oscillators and print the order parameter R over time.

    python -m recipes.demo                      # K = 2.0 above the threshold 2γ = 1.0
    python -m recipes.demo --strength 0.5       # below it: R stays near 0

Natural frequencies are Lorentzian with half-width γ; for K > 2γ the steady state has
R ≈ √(1 − 2γ/K) (Kuramoto 1975), printed beside the measured value.
"""

from __future__ import annotations

import math

import torch

from kuramoto_attn import KuramotoField, MeanFieldCoupling, integrate, order_parameter
from recipes.common import ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> dict:
    """Prints the table and the steady state; returns ``R`` (per step), ``steady`` and ``theory``."""
    parser = ArgumentParser(prog="python -m recipes.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--oscillators", type=int, default=2000, help="population size N (default: 2000)")
    parser.add_argument("--strength", type=float, default=2.0, help="coupling strength K (default: 2.0)")
    parser.add_argument("--gamma", type=float, default=0.5, help="Lorentzian half-width of ω (default: 0.5)")
    parser.add_argument("--dt", type=float, default=0.05, help="step size (default: 0.05)")
    parser.add_argument("--time", type=float, default=40.0,
                        help="time to integrate, round(time / dt) steps (default: 40.0)")
    parser.add_argument("--method", default="rk4", choices=["euler", "heun", "rk4"], help="solver (default: rk4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frequencies and initial phases (default: 0)")
    args = parser.parse_args(argv)
    for name, ok, rule in (("--oscillators", 1 <= args.oscillators < 2**63, "at least 1 (and below 2**63)"),
                           ("--strength", True, "a number"),
                           ("--gamma", args.gamma >= 0, ">= 0"), ("--dt", args.dt > 0, "> 0"),
                           # and fewer than 2**63 steps: --time 1e300 --dt 1e-300 was an OverflowError
                           ("--time", args.dt <= args.time < 2**63 * args.dt, "at least one step (>= --dt), "
                                                                             "fewer than 2**63"),
                           ("--seed", 0 <= args.seed < 2**63, "in [0, 2**63)")):
        if not ok or not math.isfinite(getattr(args, name[2:])):
            parser.error(f"{name}: must be {rule} and finite, got {getattr(args, name[2:])}")

    gen = torch.Generator().manual_seed(args.seed)
    n = args.oscillators
    with torch.device("cpu"):  # the generator's device, also where a notebook set a default one (cuda)
        omega = args.gamma * torch.tan(math.pi * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5))
        theta0 = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
        field = KuramotoField(omega, MeanFieldCoupling(args.strength))
        steps = round(args.time / args.dt)
        trajectory = integrate(field, theta0, dt=args.dt, steps=steps, method=args.method, return_trajectory=True)
        R = order_parameter(trajectory)[0]  # (steps + 1,)

    print(f"{n} oscillators, K = {args.strength}, Lorentzian γ = {args.gamma}, {args.method}, dt = {args.dt}")
    print(f"{'t':>6}  {'R':>6}")
    for step in range(0, steps + 1, max(1, steps // 20)):
        bar = "#" * round(40 * R[step].item())
        print(f"{step * args.dt:6g}  {R[step].item():6.3f}  {bar}")  # 6g: dt = 0.01 is not 0.0
    tail = R[-max(1, steps // 4):].mean().item()
    theory = math.sqrt(1 - 2 * args.gamma / args.strength) if args.strength > 2 * args.gamma else 0.0
    print(f"steady state: R = {tail:.3f} (mean over the last quarter); theory for N → ∞: {theory:.3f}")
    return {"R": R, "steady": tail, "theory": theory}


if __name__ == "__main__":
    run_cli(main)
