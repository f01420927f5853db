"""Benchmark HolographicPhaseMemory (TPI): generation, parallel throughput, associative recall.

Three parts (subcommands; `all` runs them in turn):

  generation   time per generated token of a 2-layer TPIBlock stack (d=256, batch 1): the
               recurrent form (one `step` per token, after a prefill through `forward(x, state)`)
               against recomputing the whole prefix with the parallel form at every token
               (what the reference did), for T = 256 ... 8192. Goal: flat per-token time.
  throughput   tokens/s of the parallel form against a causal softmax attention layer of the same
               width (torch SDPA, is_causal=True, with q/k/v/out projections) at T = 1024 ... 8192,
               forward only (inference mode), batch 1, d=256, 8 heads.
  mqar         multi-query associative recall as in Zoology (Arora et al. 2023): keys from the lower
               half of the vocabulary (8192), values from the upper half, N key-value pairs, then
               queries of those keys at power-law-distributed gaps (other positions random tokens);
               only the answer positions are scored. (T, N) in {(64, 4), (128, 8), (256, 16)};
               2-layer LMs (embedding -> 2 x [pre-norm mixer + residual, pre-norm MLP + residual]
               -> head tied to the embedding); one training run mixes the three lengths (batches of
               one length, cycled); accuracy printed per (T, N) cell. Mixers come from the MIXERS
               registry: every TPI query/kernel/state variant, causal softmax attention (with RoPE),
               and KuramotoAttention.

--quick: settings that finish within 10 minutes on 2 CPU cores (d_model 64, short training);
the default (full) settings are meant for a GPU.

Run:  python benchmarks/tpi.py {generation,throughput,mqar,all} [--quick] [--device cpu|cuda]
                               [--mixers NAME ...] [--steps N] [--d-models 64 ...]
                               [--json out.json] [--seed 0]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package
import kuramoto_attn  # noqa: E402
from benchmarks._timing import _int_at_least, bench_ms, device_arg, json_path, positive_int, seed_int, sync  # noqa: E402
from kuramoto_attn import HolographicPhaseMemory, TPIBlock  # noqa: E402

# ---------- mixers: factory(d_model) -> module mapping x (b, t, d) -> (b, t, d) ----------


class CausalSelfAttention(nn.Module):
    """Causal softmax attention (torch SDPA, is_causal=True) with rotary position embeddings."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (b, h, t, c)
        q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, c)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # (b, h, t, c) -> (b, t, d)


def rope(x, base=10000.0):
    """Rotary embedding of (b, h, t, c) over pairs (first half, second half) of the last axis."""
    t, c = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, c // 2, device=x.device, dtype=torch.float32) / (c // 2))
    angle = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freq  # (t, c/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : c // 2], x[..., c // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def heads(d):
    return max(1, d // 32)


def tpi(**options):
    """A TPI mixer factory; magnitude "sigmoid" + normalize "sqrt" as in the reference's best runs."""
    def factory(d):
        opts = dict(magnitude="sigmoid", normalize="sqrt")
        opts.update(options)
        opts.setdefault("num_heads", d if opts.get("state", "vector") == "vector" else heads(d))
        return HolographicPhaseMemory(d, **opts)
    return factory


MIXERS = {
    "attention": lambda d: CausalSelfAttention(d, heads(d)),
    # vector state (the reference), one option changed at a time from shared/unbounded
    "tpi": tpi(),
    "tpi-decoupled": tpi(query="decoupled"),
    "tpi-offset": tpi(query="offset"),
    "tpi-constrained": tpi(query="constrained"),
    "tpi-window": tpi(kernel="window", window=64),
    "tpi-decay": tpi(kernel="decay"),
    # matrix state (per-head key-value memory)
    "tpi-matrix": tpi(state="matrix"),
    "tpi-matrix-decoupled": tpi(state="matrix", query="decoupled"),
    "tpi-matrix-window": tpi(state="matrix", kernel="window", window=64),
    "tpi-matrix-decay": tpi(state="matrix", kernel="decay"),
    # phase-coupled softmax attention (its defaults: 32 oscillators, 10 Euler steps, mean field)
    "kuramoto": lambda d: kuramoto_attn.KuramotoAttention(d, heads(d)),
}

# ---------- timing ----------


# ---------- 1. generation ----------

GENERATION_VARIANTS = {
    "vector/unbounded": dict(),
    "vector/window64": dict(kernel="window", window=64),
    "matrix/decay": dict(state="matrix", kernel="decay", num_heads=8),
}


def run_generation(args, device):
    d, steps = 256, 16 if args.quick else 64
    torch.manual_seed(0)  # the same weights and inputs in every run (timings barely depend on them)
    lengths = [256, 1024, 4096, 8192]
    rows = []
    with torch.inference_mode():
        for name, opts in GENERATION_VARIANTS.items():
            stack = nn.ModuleList([TPIBlock(d, HolographicPhaseMemory(d, **opts)) for _ in range(2)]).to(device).eval()

            def prefill(x):
                states = []
                for block in stack:
                    x, state = block(x, block.init_state(1))
                    states.append(state)
                return states

            def generate(x_new, states):
                for i in range(x_new.shape[1]):
                    h = x_new[:, i]
                    for j, block in enumerate(stack):
                        h, states[j] = block.step(h, states[j])

            def recompute(x):
                for block in stack:
                    x = block(x)
                return x[:, -1]

            for T in lengths:
                x = torch.randn(1, T, d, device=device)
                # recurrent: prefill T - steps - 1 tokens, one untimed step, then `steps` timed steps
                states = prefill(x[:, : T - steps - 1])
                generate(x[:, T - steps - 1: T - steps], states)
                sync(device)
                t0 = time.perf_counter()
                generate(x[:, T - steps:], states)
                sync(device)
                step_ms = 1e3 * (time.perf_counter() - t0) / steps
                full_ms = bench_ms(lambda: recompute(x), device, 1 if args.quick else 3)
                rows.append(dict(variant=name, T=T, step_ms=step_ms, recompute_ms=full_ms,
                                 speedup=full_ms / step_ms))
                print(f"  {name} T={T}: step {step_ms:.2f} ms/token, recompute {full_ms:.1f} ms/token", flush=True)
    print("\n| variant | T | recurrent ms/token | full recompute ms/token | speed-up |")
    print("|:---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['T']} | {r['step_ms']:.2f} | {r['recompute_ms']:.1f} | {r['speedup']:.0f}x |")
    for name in GENERATION_VARIANTS:
        times = [r["step_ms"] for r in rows if r["variant"] == name]
        print(f"  {name}: recurrent per-token time max/min over T = {max(times) / min(times):.2f} (goal: ~1, flat)")
    return rows


# ---------- 2. parallel-form throughput ----------


def run_throughput(args, device):
    d, b = 256, 1
    lengths = [1024, 2048, 4096, 8192]
    torch.manual_seed(0)  # the same weights and inputs in every run
    layers = {
        "sdpa attention": CausalSelfAttention(d, 8),
        "tpi vector/unbounded": HolographicPhaseMemory(d),
        "tpi vector/decay (h=d)": HolographicPhaseMemory(d, kernel="decay", num_heads=d),
        "tpi matrix/unbounded": HolographicPhaseMemory(d, state="matrix", num_heads=8),
        "tpi matrix/decay": HolographicPhaseMemory(d, state="matrix", kernel="decay", num_heads=8),
        "tpi matrix/window64": HolographicPhaseMemory(d, state="matrix", kernel="window", num_heads=8),
    }
    rows = []
    with torch.inference_mode():
        for T in lengths:
            x = torch.randn(b, T, d, device=device)
            base = None
            for name, layer in layers.items():
                layer = layer.to(device).eval()
                ms = bench_ms(lambda: layer(x), device, 2 if args.quick else 10)
                base = ms if base is None else base
                rows.append(dict(layer=name, T=T, ms=ms, tokens_per_s=b * T / ms * 1e3, vs_sdpa=base / ms))
                print(f"  T={T} {name}: {ms:.1f} ms", flush=True)
    print("\n| T | layer | forward ms | tokens/s | speed vs SDPA |")
    print("|---:|:---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['layer']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['vs_sdpa']:.2f}x |")
    return rows


# ---------- 3. MQAR ----------

VOCAB = 8192
CELLS = [(64, 4), (128, 8), (256, 16)]


def mqar_batch(batch, T, pairs, generator, power_a=0.01):
    """Zoology's multi-query AR: inputs (batch, T) and labels (batch, T), -100 where unscored.

    The first 2N tokens are key, value pairs; query j (key k_j) sits at position
    2N + 2·gap_j with gaps drawn without replacement from p(g) ∝ (g + 1)^(a − 1), and its label is
    v_j (the answer is predicted at the query position). Other positions hold random tokens."""
    context = 2 * pairs
    keys = torch.rand(batch, VOCAB // 2 - 1, generator=generator).argsort(1)[:, :pairs] + 1  # 1 .. V/2 − 1
    values = torch.rand(batch, VOCAB // 2, generator=generator).argsort(1)[:, :pairs] + VOCAB // 2
    space = (T - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(batch, space), pairs, replacement=False, generator=generator)
    inputs = torch.randint(VOCAB, (batch, T), generator=generator)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    query_pos = context + 2 * gaps  # (batch, pairs)
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((batch, T), -100, dtype=torch.long)
    labels.scatter_(1, query_pos, values)
    return inputs, labels


class TinyLM(nn.Module):
    """embedding -> layers x [x + mixer(LN x), x + MLP(LN x)] -> LN -> tied head."""

    def __init__(self, mixer, d_model, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mixers = nn.ModuleList([MIXERS[mixer](d_model) for _ in range(layers)])
        self.norms1 = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(layers)])
        self.norms2 = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(layers)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                                 nn.Linear(4 * d_model, d_model)) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)

    def loss_and_accuracy(self, inputs, labels):
        x = self.embed(inputs)
        for mixer, norm1, norm2, mlp in zip(self.mixers, self.norms1, self.norms2, self.mlps):
            x = x + mixer(norm1(x))
            x = x + mlp(norm2(x))
        scored = labels != -100
        logits = self.norm(x[scored]) @ self.embed.weight.T  # only the answer positions: (n, V)
        target = labels[scored]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


def train_mqar(mixer, d_model, settings, device, seed):
    torch.manual_seed(seed)
    model = TinyLM(mixer, d_model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=settings["steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(settings["steps"]):
        T, pairs = CELLS[step % len(CELLS)]  # lengths mixed through training
        inputs, labels = mqar_batch(settings["batch"], T, pairs, gen)
        loss, _ = model.loss_and_accuracy(inputs.to(device), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    accuracy = {}
    eval_gen = torch.Generator().manual_seed(12345)  # the same test sets for every model
    with torch.no_grad():
        for T, pairs in CELLS:
            inputs, labels = mqar_batch(settings["eval"], T, pairs, eval_gen)
            accuracy[f"{T}/{pairs}"] = model.loss_and_accuracy(inputs.to(device), labels.to(device))[1].item()
    return accuracy


def check_mqar_widths(widths, mixers):
    """Exit naming --d-models if a mixer cannot take a width (heads of d // 32 channels must divide it,
    RoPE needs an even head width): found before any part runs, not after the runs before it."""
    for d_model in widths:
        for mixer in mixers:
            try:
                with torch.no_grad():
                    MIXERS[mixer](d_model)(torch.zeros(1, 4, d_model))
            except (ValueError, RuntimeError) as err:
                raise SystemExit(f"--d-models: {d_model} does not suit the {mixer} mixer ({err})") from None


def run_mqar(args, device):
    if args.quick:
        settings = dict(d_models=[64], steps=200, batch=32, lr=3e-3, eval=256)
    else:
        settings = dict(d_models=[64, 128, 256], steps=4000, batch=64, lr=1e-3, eval=1024)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.d_models is not None:
        settings["d_models"] = args.d_models
    mixers = args.mixers or list(MIXERS)
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise SystemExit(f"--mixers: unknown {unknown}; known: {list(MIXERS)}")
    print(f"MQAR: vocab {VOCAB}, cells (T/pairs) {CELLS}, {settings}")
    rows = []
    for d_model in settings["d_models"]:
        for mixer in mixers:
            t0 = time.perf_counter()
            acc = train_mqar(mixer, d_model, settings, device, args.seed)
            rows.append(dict(mixer=mixer, d_model=d_model, accuracy=acc, seconds=time.perf_counter() - t0))
            print(f"  d={d_model} {mixer}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
                  + f" ({rows[-1]['seconds']:.0f} s)", flush=True)
    cells = [f"{T}/{pairs}" for T, pairs in CELLS]
    print("\n| mixer | d_model | " + " | ".join(f"acc T/N={c}" for c in cells) + " | train s |")
    print("|:---|---:|" + "---:|" * len(cells) + "---:|")
    for r in rows:
        print(f"| {r['mixer']} | {r['d_model']} | " + " | ".join(f"{r['accuracy'][c]:.3f}" for c in cells)
              + f" | {r['seconds']:.0f} |")
    print(f"(chance: 1/{VOCAB // 2} = {2 / VOCAB:.4f} for a value guessed uniformly)")
    return dict(settings=settings, rows=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["generation", "throughput", "mqar", "all"])
    parser.add_argument("--quick", action="store_true", help="settings for <= 10 minutes on 2 CPU cores")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixers", nargs="+", choices=list(MIXERS), default=None,  # checked before any part runs
                        help=f"MQAR mixers (default: all of {list(MIXERS)})")
    # OneCycleLR's warm-up ends at step 0.1 * steps - 1: at 10 steps it has no length (ZeroDivisionError), under 10
    # it is skipped, and a single step trained at the schedule's final lr (lr / 2.5e5)
    parser.add_argument("--steps", type=_int_at_least(11), default=None,
                        help="MQAR training steps, at least 11: the one-cycle schedule warms up from step 0 "
                             "(overrides the setting)")
    parser.add_argument("--d-models", type=positive_int, nargs="+", default=None, help="MQAR widths (overrides the setting)")
    parser.add_argument("--json", type=json_path, default=None, help="also write the results as JSON to this path")
    parser.add_argument("--seed", type=seed_int, default=None, help="MQAR's seed (default 0)")
    args = parser.parse_args()
    mqar_only = [flag for flag, value in (("--mixers", args.mixers), ("--steps", args.steps),
                                          ("--d-models", args.d_models), ("--seed", args.seed)) if value is not None]
    if mqar_only and args.part not in ("mqar", "all"):  # they were ignored, silently
        parser.error(f"{', '.join(mqar_only)}: the mqar part's settings, not the {args.part} part's")
    args.seed = 0 if args.seed is None else args.seed
    for flag, values in (("--mixers", args.mixers), ("--d-models", args.d_models)):
        if values is not None and len(set(values)) < len(values):  # the same model trained twice, two rows
            parser.error(f"{flag}: each value at most once, got {values}")

    device = args.device  # a torch.device (device_arg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads: {torch.get_num_threads()}, "
          f"settings: {'quick' if args.quick else 'full'}")
    print()
    start = time.perf_counter()
    results = {}
    parts = ["generation", "throughput", "mqar"] if args.part == "all" else [args.part]
    if "mqar" in parts and args.d_models is not None:
        check_mqar_widths(args.d_models, args.mixers or list(MIXERS))
    for part in parts:
        print(f"== {part} ==")
        results[part] = dict(generation=run_generation, throughput=run_throughput, mqar=run_mqar)[part](args, device)
        print()
    total = time.perf_counter() - start
    print(f"total wall time: {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), device_name=name, torch=torch.__version__,
                           threads=torch.get_num_threads(), quick=args.quick, seconds=total,
                           results=results), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
