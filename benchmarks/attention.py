"""Benchmark KuramotoAttention against vanilla causal SDPA attention and the naive pairwise layer.

Forward + backward of one layer on x of shape (B, T, d_model) = (8, T, 768), 12 heads, N = 32
oscillators, Euler, dt = 0.1, causal. For each T it measures, each in a fresh subprocess:

* vanilla   -- causal multi-head attention of the same width: qkv projection, SDPA with
               is_causal=True, output projection (the baseline of every ratio);
* mean_field / attention -- KuramotoAttention with that coupling, steps = 10 and steps = 1;
* naive     -- the reference's computation: mean-field coupling and phase logits from
               (B, H, T, T, N) tensors of phase differences, explicit softmax, every step kept for
               backward (only where its estimated memory fits under --naive-max-gb).

Peak memory: on CPU the peak RSS of a worker minus its RSS after importing torch, kuramoto_attn and
torch._dynamo (which torch.utils.checkpoint imports at its first call; as "over an import-only
process"), measured with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_) so that RSS follows live tensor bytes; on CUDA
torch.cuda.max_memory_allocated minus what is allocated
after one warm-up step (weights, input and cuBLAS's workspace). Time: median over --repeats of forward + backward, after one warm-up.

Goals at T = 512, steps = 10 (ratios to vanilla in the same run): mean_field memory <= 2.5x and
time <= 2.0x; attention memory <= 3.0x (its time reported per integration step); going from
steps = 1 to steps = 10 adds at most 0.3x of vanilla's memory.

Run:  python benchmarks/attention.py [--device cpu|cuda] [--lengths 128 256 512 1024]
          [--batch 8] [--repeats 3] [--threads N] [--bf16] [--layers vanilla mean_field attention naive]
          [--naive-max-gb 8] [--json out.json]
"""

import argparse
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package
from benchmarks._timing import (bench_ms, device_arg, json_path, non_negative_float,  # noqa: E402
                                non_negative_int, positive_int)

D_MODEL, HEADS, OSC, DT = 768, 12, 32, 0.1
GOALS = {"mean_field_memory": 2.5, "mean_field_time": 2.0, "attention_memory": 3.0, "steps_memory": 0.3}


class VanillaAttention(nn.Module):
    """Causal multi-head self-attention through SDPA: the baseline."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.h = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        # (b, t, 3c) -> 3 x (b, h, t, d)
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class NaiveKuramotoAttention(nn.Module):
    """The reference's pairwise computation (made causal), with KuramotoAttention's parameters."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        L = self.layer
        b, t, _ = x.shape
        h, n, d = L.num_heads, L.num_oscillators, L.head_dim
        q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in L.qkv(x).split(L.d_model, dim=-1))
        theta = (math.pi * torch.tanh(L.phase_proj(x))).view(b, t, h, n).transpose(1, 2)
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        counts = keep.sum(-1).to(x.dtype).view(t, 1)
        for _ in range(L.steps):
            diff = theta[:, :, None, :, :] - theta[:, :, :, None, :]  # (b, h, t, t, n): θ_j − θ_i
            pull = (torch.sin(diff) * keep[..., None]).sum(-2) / counts
            theta = theta + L.dt * (L.omega.view(h, 1, n) + L.strength * pull)
        diff = theta[:, :, None, :, :] - theta[:, :, :, None, :]
        logits = q @ k.transpose(-1, -2) / math.sqrt(d) + L.beta.view(h, 1, 1) * torch.cos(diff).mean(-1)
        A = torch.softmax(logits.masked_fill(~keep, -math.inf), dim=-1)
        out = torch.cat([A @ v, A @ torch.cos(theta), A @ torch.sin(theta)], dim=-1)
        return L.out(out.transpose(1, 2).reshape(b, t, -1))


def build(kind, steps):
    from kuramoto_attn import KuramotoAttention
    if kind == "vanilla":
        return VanillaAttention(D_MODEL, HEADS)
    coupling = "mean_field" if kind == "naive" else kind
    layer = KuramotoAttention(D_MODEL, HEADS, num_oscillators=OSC, steps=steps, dt=DT,
                              integrator="euler", coupling=coupling)
    return NaiveKuramotoAttention(layer) if kind == "naive" else layer


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """This process's peak RSS (VmHWM: of this program only; ``ru_maxrss`` starts at the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(spec):
    """Measure one (kind, T, steps) in this fresh process; print a JSON line."""
    import kuramoto_attn  # noqa: F401  (before the base: its imports are not the layer's memory)
    # torch.utils.checkpoint imports torch._dynamo (sympy, inductor: about 71 MB) at its first call: only the
    # checkpointed layers (attention coupling) would count it
    import torch._dynamo  # noqa: F401
    base_rss = rss_bytes()  # after importing torch and the library: the "import-only process"
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build(spec["kind"], spec["steps"]).to(device)
    x = torch.randn(spec["batch"], spec["T"], D_MODEL, device=device, requires_grad=True)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            y = model(x)
        y.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    if cuda:  # the base after one step: it holds cuBLAS's workspace, which is not the layer's memory
        step()
        torch.cuda.synchronize(device)
        base_cuda = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = bench_ms(step, device, spec["repeats"])
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base_cuda
    else:
        peak = peak_rss_bytes() - base_rss
    print(json.dumps({**spec, "ms": ms, "peak_mb": peak / 2**20}))


def run_worker(spec, env):
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        status = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
        if out.stderr.strip():  # the whole tail here; its last line (the exception) goes in the table
            print(f"worker {spec} failed ({status}); its stderr ends:\n{out.stderr[-3000:]}", file=sys.stderr)
        lines = out.stderr.strip().splitlines()
        return {**spec, "error": f"{lines[-1].strip() if lines else 'no stderr'} ({status})"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(spec, threads):
    """Time in one fresh worker; on CPU, peak memory in a second one with a pinned mmap threshold.

    With glibc's default (dynamic) mmap threshold, freed blocks stay in the heap and peak RSS
    depends on the order of allocations (it moved by +-100 MB between identical runs here);
    pinning the threshold makes every large tensor its own mapping, so peak RSS follows the peak
    of live tensor bytes."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    row = run_worker(spec, env)
    if spec["device"] == "cpu" and "error" not in row:
        memory = run_worker({**spec, "repeats": 1}, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if "error" in memory:  # keep the time; the row fails with the memory worker's reason
            row = {**row, "peak_mb": float("nan"), "error": f"memory worker: {memory['error']}"}
        else:
            row = {**row, "peak_mb": memory["peak_mb"]}
    return row


def naive_estimate_gb(batch, T, steps):
    """Peak bytes of the naive layer: one pairwise float32 tensor kept per step, about 3 live at once."""
    return (steps + 3) * batch * HEADS * T * T * OSC * 4 / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=non_negative_int, default=0, help="OMP_NUM_THREADS of the workers (0: default)")
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast(bfloat16)")
    parser.add_argument("--naive-max-gb", type=non_negative_float, default=8.0)
    parser.add_argument("--layers", nargs="+", default=["vanilla", "mean_field", "attention", "naive"],
                        choices=["vanilla", "mean_field", "attention", "naive"],
                        help="which layers to run (vanilla is the baseline of the ratios)")
    parser.add_argument("--json", type=json_path, help="write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    device = args.device  # a torch.device (device_arg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}; torch {torch.__version__}; threads per worker: {args.threads or 'default'}; "
          f"bf16 autocast: {args.bf16}; B={args.batch}, d_model={D_MODEL}, H={HEADS}, N={OSC}")
    rows = []
    header = "| T | layer | steps | fwd+bwd ms | peak MB | time / vanilla | memory / vanilla |"
    print(header + "\n|---:|:---|---:|---:|---:|---:|---:|")
    for T in args.lengths:
        runs = [("vanilla", 1), ("mean_field", 10), ("mean_field", 1), ("attention", 10), ("attention", 1)]
        runs = [run for run in runs if run[0] in args.layers]
        estimate = naive_estimate_gb(args.batch, T, 10)
        if "naive" in args.layers and estimate <= args.naive_max_gb:
            runs.append(("naive", 10))
        base = None
        for kind, steps in runs:
            spec = dict(kind=kind, T=T, steps=steps, batch=args.batch, repeats=args.repeats,
                        device=str(device), bf16=args.bf16)
            row = measure(spec, args.threads)
            if "error" in row:
                if "ms" in row:  # timed, but the memory worker failed
                    print(f"| {T} | {kind} | {steps} | {row['ms']:.1f} | failed: {row['error']} | | |")
                else:
                    print(f"| {T} | {kind} | {steps} | failed: {row['error']} | | | |")
                rows.append(row)
                continue
            base = row if kind == "vanilla" else base
            row["time_ratio"] = row["ms"] / base["ms"] if base else float("nan")
            row["memory_ratio"] = row["peak_mb"] / base["peak_mb"] if base else float("nan")
            rows.append(row)
            ratios = [f"{r:.2f}x" if math.isfinite(r) else "–" for r in (row["time_ratio"], row["memory_ratio"])]
            # "–" without vanilla in --layers (the ratios' baseline), or where it failed: "nanx" before
            print(f"| {T} | {kind} | {steps} | {row['ms']:.1f} | {row['peak_mb']:.0f} | "
                  f"{ratios[0]} | {ratios[1]} |", flush=True)
        if "naive" in args.layers and estimate > args.naive_max_gb:  # a row asked for is not left out without a word
            print(f"| {T} | naive | 10 | not run: needs about {estimate:.2g} GB, over --naive-max-gb "
                  f"{args.naive_max_gb:g} | | | |")
        summarise(rows, T)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def summarise(rows, T):
    """Per-step time of the attention coupling and memory growth from steps=1 to 10, at this T."""
    get = {(r["kind"], r["steps"]): r for r in rows if r["T"] == T and "error" not in r}
    if ("vanilla", 1) not in get:
        return
    vanilla = get[("vanilla", 1)]
    for kind in ("mean_field", "attention"):
        if (kind, 10) in get and (kind, 1) in get:
            grow = (get[(kind, 10)]["peak_mb"] - get[(kind, 1)]["peak_mb"]) / vanilla["peak_mb"]
            per_step = (get[(kind, 10)]["ms"] - get[(kind, 1)]["ms"]) / 9
            print(f"|   T={T} {kind}: steps 1 -> 10 adds {grow:.2f}x vanilla memory "
                  f"(goal <= {GOALS['steps_memory']}x); {per_step:.1f} ms per extra step "
                  f"({per_step / vanilla['ms']:.2f}x vanilla) |")


if __name__ == "__main__":
    main()
