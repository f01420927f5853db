"""Order-parameter statistics of a trained PhaseGPT run on real validation text.

    python -m recipes.interpret runs/layer7_32osc_K1_cpu [--split val] [--batches 8] [--batch-size 8]
                                [--data-path PATH] [--cache-dir DIR]

For every phase layer and head: mean / std / min / max of R (each R taken over one token's N
oscillators of that head — angles are never averaged across heads), printed as a table next to
the value random phases would give, and saved to ``interpret.json`` (with the checkpoint, its step
and the windows read). Two plots, a panel per phase layer and a line per head: ``R_tokens.png`` (R
against the token position, averaged over the batch) and ``R_steps.png`` (R after each integration
step). A checkpoint other than ``best.pt`` (``--checkpoint last.pt``, or a file given directly) writes
``interpret-last.json``, ``R_tokens-last.png`` and ``R_steps-last.png`` (named after it), and a split
other than val adds its name (``interpret-test.json``, ``interpret-last-test.json``), so that none
replaces another's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kuramoto_attn import OrderParameter, order_parameter
from kuramoto_attn._checks import check_int
from models.sampling import eval_mode
from recipes.common import (ArgumentParser, add_device_flag, check_count_flag, checkpoint_file, load_run, pick_device,
                            run_cli)
from recipes.data import eval_batches
from recipes.evaluate import add_data_location_flags, run_corpus
from recipes.files import write_atomic
from recipes.plots import check_plotting, plot_R_curves

__all__ = ["main", "phase_statistics", "random_phase_R"]


def random_phase_R(num_oscillators: int) -> float:
    r"""Expected R of ``N`` independent uniform phases: the incoherent baseline to compare with (1 for
    N = 1, 2/π for N = 2, 0.1570 for N = 32).

    Exact for every N, through the mean length of a planar walk of N unit steps:

    .. math:: E[R] = \frac{1}{N}\int_0^\infty \frac{1 - J_0(t)^N}{t^2}\,dt
              \;\approx\; \frac{\sqrt\pi}{2\sqrt N}\Bigl(1 + \frac{1}{16N}\Bigr)\ \text{for large } N,

    integrated numerically for N ≤ 1024 (Simpson's rule in float64; the tail beyond t = 2000 taken as
    1/2000, J₀ⁿ's share of it being below 1e-8) and from the expansion above (relative error below
    2e-8) beyond.
    The large-N value √π / (2√N) alone is 1.5 % low at N = 4 and 0.2 % at N = 32."""
    n = check_int("num_oscillators", num_oscillators, low=1)
    if n > 1024:
        return math.sqrt(math.pi / n) / 2 * (1 + 1 / (16 * n))
    total, end = 0.0, 2000.0
    # the integrand falls from N/4 at 0 to 1/t² over t ≈ 1/√N: a finer grid there
    for lo, hi, h in ((0.0, 10.0, min(0.01, 0.05 / math.sqrt(n))), (10.0, end, 0.01)):
        intervals = 2 * math.ceil((hi - lo) / h / 2)  # even, for Simpson's rule
        t = torch.linspace(lo, hi, intervals + 1, dtype=torch.float64)
        f = (1 - torch.special.bessel_j0(t) ** n) / t**2
        f[t == 0] = n / 4  # the limit at 0 (1 - J₀(t)ⁿ ≈ N t² / 4)
        weights = torch.ones_like(t)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        total += float((f * weights).sum()) * (hi - lo) / intervals / 3
    return (total + 1 / end) / n


@torch.no_grad()
def phase_statistics(model, batches) -> dict[int, dict[str, torch.Tensor]]:
    """Per phase layer: ``stats`` (mean/std/min/max per head, each ``(h,)``), ``R_tokens`` (h, t) and
    ``R_steps`` (steps + 1, h), accumulated over ``batches`` of ``(x, y)``. The model runs in eval mode,
    and each of its modules is back in its own mode after."""
    layers = tuple(getattr(model, "phase_layers", ()))
    if not layers:
        raise ValueError("model: has no phase layers (a baseline or TPI run); nothing to interpret")
    metrics, tokens, steps, count = {}, {}, {}, 0
    with eval_mode(model):  # a model in training mode: its phase noise and jitter would enter the statistics
        for x, _ in batches:
            _, _, info = model(x, return_info=True)
            for i, layer in info.phase.items():
                phases = layer.phases.float()  # (b, h, t, n)
                if i not in metrics:
                    metrics[i] = OrderParameter(dim=-1, group_dim=1, num_groups=phases.shape[1]).to(x.device)
                    tokens[i], steps[i] = 0.0, 0.0
                metrics[i].update(phases)
                R, _ = order_parameter(phases, dim=-1)  # (b, h, t)
                tokens[i] = tokens[i] + R.sum(0)
                steps[i] = steps[i] + layer.R_steps.float().sum(1)   # (steps + 1, h)
            count += x.shape[0]
    # (h,) statistics: the metric gives 0-d ones for a single head
    return {i: {"stats": {k: v.reshape(-1) for k, v in metrics[i].compute().items()},
                "R_tokens": tokens[i] / count, "R_steps": steps[i] / count} for i in metrics}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m recipes.interpret", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (uses best.pt) or a checkpoint file")
    parser.add_argument("--checkpoint", help="file name inside the run directory (default: best.pt)")
    parser.add_argument("--split", default="val", help="the corpus split to read (default: val)")
    parser.add_argument("--batches", type=int, default=8,
                        help="batches of windows of train.block_size tokens, drawn from the run's seed: the same "
                             "windows on every call (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--out", default=None, help="output directory (default: the run directory)")
    add_device_flag(parser)
    add_data_location_flags(parser)
    args = parser.parse_args(argv)
    check_count_flag(parser, "--batches", args.batches)
    check_count_flag(parser, "--batch-size", args.batch_size)
    check_plotting("interpret")
    path = Path(args.run)
    checkpoint = checkpoint_file(path, args.checkpoint)
    model, tokenizer, config, state = load_run(checkpoint)
    # one set of files per checkpoint and split: best.pt on val keeps the plain names
    suffix = ("" if checkpoint.name == "best.pt" else f"-{checkpoint.stem}") + (
        "" if args.split == "val" else f"-{args.split}")
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {str(out)!r} is a file, not a directory")
    device = pick_device(args.device)
    model.to(device)
    # the text the run was trained on, where it is now
    corpus = run_corpus(config.data, tokenizer, state, args)
    if args.split not in corpus.splits:
        parser.error(f"--split: the corpus has no {args.split!r} split (has {', '.join(corpus.splits)})")
    tokens, block_size = len(corpus.splits[args.split]), config.train.block_size
    if tokens < block_size + 1:  # its windows are the run's training length
        parser.error(f"--split: the {args.split} split has {tokens} tokens, fewer than the run's "
                     f"train.block_size + 1 = {block_size + 1}")
    batches = eval_batches(corpus.splits[args.split], args.batch_size, block_size, args.batches,
                           seed=config.seed, device=device)
    results = phase_statistics(model, batches)

    incoherent = random_phase_R(int(config.model.get("num_oscillators", 32)))
    print(f"R per head on {args.batches}×{args.batch_size} {args.split} windows of "
          f"{config.train.block_size} tokens (random phases: {incoherent:.3f})\n")
    print("| layer | head | mean | std | min | max |\n|---:|---:|---:|---:|---:|---:|")
    report = {"checkpoint": checkpoint.name, "step": state.get("progress", {}).get("step"), "split": args.split,
              "windows": args.batches * args.batch_size, "block_size": config.train.block_size,
              "random_phase_R": incoherent, "layers": {}}
    for i, r in results.items():
        s = {k: v.cpu().tolist() for k, v in r["stats"].items()}
        for h in range(len(s["mean"])):
            print(f"| {i} | {h} | {s['mean'][h]:.3f} | {s['std'][h]:.3f} | {s['min'][h]:.3f} | {s['max'][h]:.3f} |")
        report["layers"][str(i)] = {**s, "R_tokens": r["R_tokens"].cpu().tolist(),
                                    "R_steps": r["R_steps"].cpu().tolist()}
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot be interpreted leaves no folder
    files = [out / f"interpret{suffix}.json", out / f"R_tokens{suffix}.png", out / f"R_steps{suffix}.png"]
    write_atomic(files[0], json.dumps(report, indent=2))
    token_curves = {f"layer {i}": {f"head {h}": list(enumerate(row)) for h, row in
                                   enumerate(r["R_tokens"].cpu().tolist())} for i, r in results.items()}
    step_curves = {f"layer {i}": {f"head {h}": list(enumerate(col)) for h, col in
                                  enumerate(r["R_steps"].T.cpu().tolist())} for i, r in results.items()}
    where = f"{args.split}, {checkpoint.name}"
    plot_R_curves(token_curves, files[1], xlabel="token position t", title=f"R per head over tokens ({where})")
    plot_R_curves(step_curves, files[2], xlabel="integration step",
                  title=f"R per head over integration steps ({where})")
    print(f"\nwrote {', '.join(map(str, files))}")
    return report


if __name__ == "__main__":
    run_cli(main)
