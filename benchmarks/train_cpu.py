"""Phase A CPU presets against a nanoGPT-style training loop, side by side on this machine.

    python benchmarks/train_cpu.py [--data ../shared/data/tinyshakespeare/input.txt] [--iters 2000]

Three runs of nanoGPT's CPU configuration (4 layers, 4 heads, d_model 128, context 64, batch 12,
lr 1e-3 → 1e-4 cosine, warmup 100, dropout 0, no biases, eval every 250 steps on 20 batches) on
tiny-shakespeare with nanoGPT's 90/10 split, each in its own process:

* ``nanogpt-loop``: a plain PyTorch loop written like nanoGPT's ``train.py`` (random windows,
  AdamW, ``loss.item()`` every step, train and val estimates at each evaluation) around a
  nanoGPT-shaped model defined in this file — the time to beat;
* ``recipes.train`` with ``phase_a/cpu/baseline.yaml``;
* ``recipes.train`` with ``phase_a/cpu/layer7_32osc_K1.yaml`` (the "winner", one phase layer).

Prints final validation loss, wall time (process start to exit) and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def nanogpt_loop(data_path: str, iters: int) -> float:
    """nanoGPT's CPU run, written out plainly; returns the last validation loss."""
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(1337)
    text = Path(data_path).read_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}
    V, L, H, D, T, B = len(chars), 4, 4, 128, 64, 12

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - T, (B,))
        x = torch.stack([torch.from_numpy(d[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
            self.c_attn, self.c_proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
            self.fc, self.proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, D))
            return x + self.proj(F.gelu(self.fc(self.ln_2(x))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(D, bias=False)
            self.head = nn.Linear(D, V, bias=False)
            self.wte.weight = self.head.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = Model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def lr_at(it):
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / (iters - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {s: torch.stack([model(*batch(s)) for _ in range(20)]).mean().item() for s in ("train", "val")}
        model.train()
        return out

    val = math.nan
    for it in range(iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % 250 == 0 or it == iters:
            val = estimate()["val"]
            print(f"step {it}: val loss {val:.4f}", flush=True)
        if it == iters:
            break
        loss = model(*batch("train"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    return val


def run(cmd: list[str]) -> tuple[float, float]:
    """(last validation loss printed, wall seconds) of a subprocess."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    losses = re.findall(r"val loss (\d+\.\d+)", done.stdout)
    return float(losses[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="tiny-shakespeare input.txt")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/kuramoto-train-cpu", help="run and cache directory")
    parser.add_argument("--nanogpt-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nanogpt_loop:
        nanogpt_loop(args.data, args.iters)
        return
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{args.iters} iterations on {args.data}\n")
    common = [f"train.max_iters={args.iters}", "data.name=tiny-shakespeare", f"data.path={args.data}",
              f"data.cache_dir={args.out}/cache", "train.progress_bar=false"]
    rows = {"nanogpt-loop (reference)": run([sys.executable, __file__, "--nanogpt-loop", "--data", args.data,
                                             "--iters", str(args.iters)])}
    for name in ("baseline", "layer7_32osc_K1"):
        cfg = f"recipes/configs/phase_a/cpu/{name}.yaml"
        rows[f"recipes.train {name}"] = run([sys.executable, "-m", "recipes.train", "--config", cfg, *common,
                                             f"out_dir={args.out}/{name}"])
    ref = rows["nanogpt-loop (reference)"][1]
    base = rows["recipes.train baseline"][1]
    print("| run | val loss | wall (s) | × nanogpt-loop | × recipes baseline |")
    print("|:---|---:|---:|---:|---:|")
    for name, (loss, wall) in rows.items():
        print(f"| {name} | {loss:.4f} | {wall:.1f} | {wall / ref:.2f} | {wall / base:.2f} |")
    print(json.dumps({k: {"val_loss": v[0], "wall_s": v[1]} for k, v in rows.items()}))


if __name__ == "__main__":
    main()
