"""Sample text from a trained run (uses the model's cache: KV + phase state, or TPI's recurrent state).

    python -m recipes.generate runs/layer7_32osc_K1_cpu --prompt "ROMEO:" --max-new-tokens 300 \
        --temperature 0.8 --top-k 40 --seed 1337
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kuramoto_attn._checks import check_int
from models import GPT, TPILM
from recipes import RecipeWarning
from recipes.common import (ArgumentParser, add_device_flag, check_count_flag, checkpoint_file, load_run, pick_device,
                            run_cli)

__all__ = ["main", "generate_text"]


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 300, temperature: float = 0.8,
                  top_k: int | None = None, num_samples: int = 1, seed: int = 1337, use_cache: bool = True,
                  device="cpu", context: int | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (prompt included), decoded. Only the
    tokenizer's ids are sampled, also when the model's embedding is padded beyond them.
    ``context``: the most tokens a GPT reads (its training block size; None: ``max_seq_len``).
    A TPI model reads the whole sequence (it is recurrent: no window to crop to), so it takes
    ``context=None`` only; any other value is a ValueError."""
    try:  # a lone surrogate: bytes that are not UTF-8, as Python reads them from a command line
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # else "surrogates not allowed" from a codec, or a TypeError from BPE
        raise ValueError(f"prompt: holds {prompt[err.start]!r} at position {err.start}, which is not a character "
                         "(bytes that are not UTF-8?); give UTF-8 text") from None
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as err:  # a character or word outside the vocabulary
        raise ValueError(f"prompt: {err}") from None
    if not ids:
        raise ValueError(f"prompt: {prompt!r} has no tokens; give some text (the command line's default is a newline)")
    unknown = [w for w in prompt.split() if w not in tokenizer.index] if tokenizer.kind == "word" else []
    if unknown:  # the model sees <unk> for them: say so, as a character vocabulary's error does
        shown = ", ".join(map(repr, dict.fromkeys(unknown[:10])))
        warnings.warn(f"prompt: {len(unknown)} word(s) not in the vocabulary read as {tokenizer.unk}: {shown}",
                      RecipeWarning, stacklevel=2)
    # a batch size (torch's sizes are int64: past them a bare OverflowError); 2.5 or True were a TypeError from
    # list repetition or one sample
    num_samples = check_int("num_samples", num_samples, low=1)
    if check_int("seed", seed, low=0, size=False) >= 2**64:  # what torch.Generator takes
        raise ValueError(f"seed: must be in [0, 2**64), got {seed}")
    if context is not None and isinstance(model, TPILM):
        raise ValueError(f"context: a {type(model).__name__} reads the whole sequence (it is recurrent: no "
                         f"window to crop to); give None, not {context!r}")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    crop = {} if context is None else {"context": context}  # TPILM takes none (checked above)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         use_cache=use_cache, generator=generator, vocab_size=tokenizer.vocab_size, **crop)
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv: list[str] | None = None) -> list[str]:
    parser = ArgumentParser(prog="python -m recipes.generate", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (uses best.pt) or a checkpoint file")
    parser.add_argument("--checkpoint", help="file name inside the run directory (default: best.pt)")
    parser.add_argument("--prompt", default="\n", help="text the samples continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=300,
                        help="tokens sampled after the prompt (default: 300)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divides the logits before sampling; 0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k likeliest tokens and any tied with the k-th (default: all)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (default: 1)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling (default: 1337)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context per token")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    check_count_flag(parser, "--num-samples", args.num_samples)
    path = Path(args.run)
    model, tokenizer, config, _ = load_run(checkpoint_file(path, args.checkpoint))
    device = pick_device(args.device)
    # a GPT reads at most what it was trained on: positions beyond train.block_size never learned
    context = config.train.block_size if isinstance(model, GPT) else None
    try:
        texts = generate_text(model.to(device), tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, num_samples=args.num_samples,
                              seed=args.seed, use_cache=not args.no_cache, device=device, context=context)
    except ValueError as err:  # named as the Python argument: "top_k: ..." -> "--top-k: ..."
        name, sep, rest = str(err).partition(": ")
        if sep and name in ("prompt", "max_new_tokens", "temperature", "top_k", "num_samples", "seed"):
            raise ValueError(f"--{name.replace('_', '-')}: {rest}") from None
        raise
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    return texts


if __name__ == "__main__":
    run_cli(main)
