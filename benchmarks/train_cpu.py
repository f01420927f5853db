"""Phase A CPU presets against a nanoGPT-style training loop, side by side on this machine.

    python benchmarks/train_cpu.py [--data ../shared/data/tinyshakespeare/input.txt] [--iters 2000]
                                   [--seeds 1337 ...] [--threads 2] [--out /tmp/kuramoto-train-cpu]

Three runs of nanoGPT's CPU configuration (4 layers, 4 heads, d_model 128, context 64, batch 12,
lr 1e-3, warmup 100, dropout 0, no biases, eval every 250 steps on 20 batches) on tiny-shakespeare
with nanoGPT's 90/10 split, each in its own process, per seed:

* ``nanogpt-loop``: a plain PyTorch loop written like nanoGPT's ``train.py`` (random windows,
  AdamW with decay 0.1 on every 2-D weight, betas (0.9, 0.99), cosine to 1e-4, clip 1.0,
  ``loss.item()`` every step, train and val estimates at each evaluation and at step 0, as nanoGPT
  does: 9 evaluations of 40 batches against the recipes' 8 of 20 on val, about 2–3 % of its time)
  around a nanoGPT-shaped model defined in this file — the time to beat;
* ``recipes.train`` with ``phase_a/cpu/baseline.yaml`` (its own optimizer settings: see
  ``phase_a/cpu/base.yaml``);
* ``recipes.train`` with ``phase_a/cpu/layer7_32osc_K1.yaml`` (the "winner", one phase layer).

The runs go in rounds (one of each per seed), so that load from other processes on a shared machine
falls on every kind alike. Wall time is process start to the end of training (the recipe's final
checkpoint and plots included). Validation loss is reported twice: the run's own last estimate
(20 batches, ±0.01–0.02) and the whole validation split (every token once, consecutive windows of
64, the same function for all three), measured after the timed part. Because the whole-run wall
time moves with other load on a shared machine, each run also reports its fastest stretch between
two evaluations (ms per step over 250 steps and one evaluation; runs of fewer than 500 iterations
have no whole stretch and show "n/a" there). Prints one row per run, then per kind the mean ± 95%
CI over seeds and the median ratios (per round).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._timing import positive_int  # noqa: E402
from recipes.config import override  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12


class NanoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
        self.c_attn, self.c_proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc, self.proj = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(WIDTH, dim=2)
        q, k, v = (z.view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's model at the CPU configuration; ``forward`` returns ``(logits, loss)`` like models.GPT."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(NanoBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, vocab_size, bias=False)
        self.wte.weight = self.head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT's init: N(0, 0.02), residual projections 0.02 / sqrt(2 L)
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("c_proj.weight", ".proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def nanogpt_loop(data_path: str, iters: int, seed: int, save: str) -> None:
    """nanoGPT's CPU run, written out plainly; prints its val estimates and saves the model."""
    torch.manual_seed(seed)
    text = Path(data_path).read_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - CONTEXT, (BATCH,))
        x = torch.stack([torch.from_numpy(d[i:i + CONTEXT].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + CONTEXT].astype(np.int64)) for i in ix])
        return x, y

    model = NanoGPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def lr_at(it):
        if it < 100:
            return 1e-3 * (it + 1) / 101
        if iters <= 100:  # a run no longer than the warmup: as recipes.train, no decay (and no 0 / 0)
            return 1e-3
        ratio = (it - 100) / (iters - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {s: torch.stack([model(*batch(s))[1] for _ in range(20)]).mean().item() for s in ("train", "val")}
        model.train()
        return out

    for it in range(iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % 250 == 0 or it == iters:
            print(f"step {it} at {time.time():.3f}", flush=True)
            print(f"step {it}: val loss {estimate()['val']:.4f}", flush=True)
        if it == iters:
            break
        _, loss = model(*batch("train"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    torch.save({"model": model.state_dict(), "chars": chars}, save)


def run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """(last validation estimate printed, wall seconds, stdout) of a subprocess."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return float(re.findall(r"val loss (\d+\.\d+)", done.stdout)[-1]), wall, done.stdout


def fastest_interval_ms(kind: str, path: Path, stdout: str) -> float:
    """Milliseconds per step in the fastest stretch between two evaluations (250 steps and one
    evaluation): what the code costs when the machine's other load leaves it alone. Times are the
    nanoGPT loop's printed stamps, or the wall times of the recipe's TensorBoard ``train/loss``
    points at those steps (logged just before each evaluation)."""
    if kind == "nanogpt-loop":
        stamps = {int(s): float(t) for s, t in re.findall(r"step (\d+) at (\d+\.\d+)", stdout)
                  if int(s) % 250 == 0 and int(s) > 0}  # the recipe's stretches: from step 250 on
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        # the newest: a run killed before its first checkpoint leaves its version_* behind an --overwrite
        events = EventAccumulator(str(max((path / "tensorboard").rglob("events.*"), key=os.path.getmtime)))
        events.Reload()
        stamps = {e.step: e.wall_time for e in events.Scalars("train/loss") if e.step % 250 == 0}
    steps = sorted(stamps)
    if len(steps) < 2:  # fewer than 500 iterations: no whole stretch
        return math.nan
    return min(1e3 * (stamps[b] - stamps[a]) / (b - a) for a, b in zip(steps, steps[1:]))


def ms(value: float, spec: str = ".1f") -> str:
    """A figure of the fastest-stretch columns: "n/a" for runs too short to have a stretch."""
    return "n/a" if math.isnan(value) else format(value, spec)


def full_val_loss(kind: str, path: Path, data_path: str) -> float:
    """Loss over every token of the validation split (recipes.evaluate's windows)."""
    from recipes.common import load_run
    from recipes.evaluate import evaluate_split, load_corpus
    if kind == "nanogpt-loop":
        from recipes.data import CharTokenizer
        saved = torch.load(path, weights_only=True)  # its own file: chars and tensors
        tokenizer = CharTokenizer(saved["chars"])
        model = NanoGPT(len(saved["chars"]))
        model.load_state_dict(saved["model"])
        ids = np.array(tokenizer.encode(Path(data_path).read_text()), dtype=np.int64)
        val = ids[int(0.9 * len(ids)):]
    else:
        model, tokenizer, config, _ = load_run(path / "last.pt")
        val = load_corpus(config.data).splits["val"]
    return evaluate_split(model.eval(), val, CONTEXT, tokenizer)["loss"]


def seed_arg(text: str) -> int:
    """argparse type: a seed in [0, 2**32), as the recipes' config requires (checked before the runs: the
    nanoGPT loop took -1 and trained, then the first recipe run refused it and the loop's run was lost)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="tiny-shakespeare input.txt")
    parser.add_argument("--iters", type=positive_int, default=2000,
                        help="training iterations (at least 500 for the fastest-stretch column)")
    parser.add_argument("--seeds", type=seed_arg, nargs="+", default=[1337],
                        help="distinct seeds in [0, 2**32), one round each")
    parser.add_argument("--threads", type=positive_int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--out", default="/tmp/kuramoto-train-cpu", help="run and cache directory")
    parser.add_argument("--nanogpt-loop", metavar="SAVE", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nanogpt_loop:
        nanogpt_loop(args.data, args.iters, args.seed, args.nanogpt_loop)
        return
    if len(set(args.seeds)) < len(args.seeds):  # a seed's runs share their paths: the second round replaced
        # the first's, and both rows (the whole split's loss of the same saved model) counted in the CI
        parser.error(f"--seeds: each seed at most once (the runs of a seed share their output paths), got {args.seeds}")
    if not Path(args.data).is_file():
        sys.exit(f"--data: no such file {args.data!r} (tiny-shakespeare's input.txt; the default is the "
                 "development copy beside the checkout: pass --data PATH elsewhere)")
    # absolute: the runs start in the checkout (cwd=ROOT), not where this script was started
    args.data, out = str(Path(args.data).resolve()), Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {str(out)!r} is a file, not a directory (runs and the corpus cache go there)")
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; "
          f"{args.iters} iterations on {args.data}, seeds {args.seeds}\n")
    common = [f"train.max_iters={args.iters}", "data.name=tiny-shakespeare", override("data.path", args.data),
              override("data.cache_dir", out / "cache"), "train.progress_bar=false"]
    kinds = {"nanogpt-loop": None, "baseline": "baseline", "winner": "layer7_32osc_K1"}
    rows = []
    for seed in args.seeds:
        for kind, preset in kinds.items():
            if preset is None:
                path = out / f"nanogpt_seed{seed}.pt"
                cmd = [sys.executable, __file__, "--nanogpt-loop", str(path), "--seed", str(seed),
                       "--data", args.data, "--iters", str(args.iters)]
            else:
                path = out / f"{preset}_seed{seed}"
                cmd = [sys.executable, "-m", "recipes.train", "--config", f"recipes/configs/phase_a/cpu/{preset}.yaml",
                       *common, f"seed={seed}", override("out_dir", path), "--overwrite"]  # a fresh run each time
            estimate, wall, stdout = run(cmd, args.threads)
            fastest = fastest_interval_ms(kind, path, stdout)
            rows.append({"kind": kind, "seed": seed, "val_estimate": estimate, "wall_s": wall,
                         "fastest_ms_per_step": fastest, "path": path})
            print(f"{kind} seed {seed}: {wall:.1f} s, fastest {ms(fastest)} ms/step, val estimate {estimate:.4f}",
                  flush=True)
    torch.set_num_threads(args.threads)
    for row in rows:
        row["val_full"] = full_val_loss(row["kind"], row.pop("path"), args.data)

    print("\n| run | seed | val loss (own estimate) | val loss (whole split) | wall (s) | fastest ms/step |")
    print("|:---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['seed']} | {r['val_estimate']:.4f} | {r['val_full']:.4f} | {r['wall_s']:.1f} "
              f"| {ms(r['fastest_ms_per_step'])} |")
    from recipes.common import mean_ci95

    def per_kind(key):
        return {kind: [r[key] for r in rows if r["kind"] == kind] for kind in kinds}

    def ratio(values, kind, ref):  # per round, then the median
        return statistics.median(v / b for v, b in zip(values[kind], values[ref]))

    walls, fastest = per_kind("wall_s"), per_kind("fastest_ms_per_step")
    print("\n| run | val loss, whole split (mean ± 95% CI) | wall (s), median | wall × nanogpt-loop | "
          "wall × baseline | fastest ms/step, median | × nanogpt-loop | × baseline |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in kinds:
        mean, half = mean_ci95(per_kind("val_full")[kind])
        ci = "" if math.isnan(half) else f" ± {half:.4f}"
        print(f"| {kind} | {mean:.4f}{ci} | {statistics.median(walls[kind]):.1f} | "
              f"{ratio(walls, kind, 'nanogpt-loop'):.2f} | {ratio(walls, kind, 'baseline'):.2f} | "
              f"{ms(statistics.median(fastest[kind]))} | {ms(ratio(fastest, kind, 'nanogpt-loop'), '.2f')} | "
              f"{ms(ratio(fastest, kind, 'baseline'), '.2f')} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
