"""Training step time of the Phase A configs at the reference size on one GPU.

Each config in ``recipes/configs/phase_a`` (the baseline and the seven reference configurations: GPT-2
small, 12 layers, 12 heads, d_model 768, context 512, batch 32, character vocabulary of 65) is built
as ``recipes.train`` builds it: dropout 0.1, AdamW (fused) with its parameter groups, gradient clipping
at 1.0, forward and backward under ``torch.autocast(bfloat16)`` with float32 weights (what Fabric's
``bf16-mixed`` does; ``--precision 32-true`` for float32). Random tokens. The configs take turns in
``--rounds`` rounds of ``--steps`` steps after ``--warmup`` untimed steps; a step's time is the
median over rounds (CUDA events). Peak memory is the most the step adds to the memory the model and
its optimizer hold.

Run:  python benchmarks/train_gpu.py [--configs baseline layer7_32osc_K1 ...] [--precision bf16-mixed|32-true]
                                    [--rounds 10] [--steps 5] [--warmup 5] [--batch 32] [--compile]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._timing import positive_int  # noqa: E402
from recipes.common import build_model, param_groups  # noqa: E402
from recipes.config import load_config  # noqa: E402

CONFIGS = ["baseline", "layer7_32osc_K1", "layer6_32osc_K1", "layer6_16osc_K1", "layer6_32osc_K2",
           "layer6_64osc_K1", "layers6_7_32osc_K1", "layers4_7_32osc_K1"]
VOCAB = 65  # tiny-shakespeare's characters


class Run:
    """One config's model, optimizer and batch, and its timed steps."""

    def __init__(self, name, batch, precision, compile_model):
        config = load_config(ROOT / "recipes" / "configs" / "phase_a" / f"{name}.yaml")
        self.name, self.config = name, config
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, VOCAB).cuda().train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.optim.weight_decay),
                                           lr=config.optim.lr, betas=tuple(config.optim.betas), fused=True)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.bf16 = precision == "bf16-mixed"
        block = config.train.block_size
        self.tokens = batch * block
        idx = torch.randint(VOCAB, (batch, block + 1), device="cuda")
        self.x, self.y = idx[:, :-1], idx[:, 1:]
        self.ms, self.peak_bytes = [], 0

    def step(self):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.forward(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(self, steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            self.step()
        end.record()
        torch.cuda.synchronize()
        self.ms.append(start.elapsed_time(end) / steps)

    def measure_peak(self):
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.step()
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - held


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--steps", type=positive_int, default=5, help="steps per config per round")
    parser.add_argument("--warmup", type=positive_int, default=5)  # >= 1: the peak excludes AdamW's state creation
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA device (benchmarks/train_cpu.py is the CPU one)")
    # the ratios divide by the first config's time: the baseline, wherever (or whether) it was listed
    args.configs = ["baseline", *dict.fromkeys(c for c in args.configs if c != "baseline")]

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.precision}, "
          f"compile {args.compile}, batch {args.batch}; {args.rounds} rounds x {args.steps} steps, "
          f"{args.warmup} warm-up steps")
    runs = []
    for name in args.configs:  # build all first, so every config is timed under the same conditions
        run = Run(name, args.batch, args.precision, args.compile)
        for _ in range(args.warmup):
            run.step()
        run.measure_peak()
        runs.append(run)
    for _ in range(args.rounds):
        for run in runs:
            run.timed(args.steps)

    base = statistics.median(runs[0].ms)
    print("| config | phase layers | N | K | ms/step (median) | min | tokens/s | × baseline | peak step memory GiB |")
    print("|:---|:---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        m = run.config.model
        layers = m.get("phase_layer_idx", []) if m.get("use_phase_attention") else []
        median = statistics.median(run.ms)
        print(f"| {run.name} | {','.join(map(str, layers)) or '-'} | {m['num_oscillators'] if layers else '-'} "
              f"| {m['coupling_strength'] if layers else '-'} | {median:.1f} | {min(run.ms):.1f} "
              f"| {run.tokens / median * 1e3:,.0f} | {median / base:.2f} | {run.peak_bytes / 2**30:.1f} |")


if __name__ == "__main__":
    main()
