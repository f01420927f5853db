"""Evaluate a trained run on whole splits: loss, perplexity, bits per token and per character.

    python -m recipes.evaluate runs/layer7_32osc_K1_cpu [--checkpoint best.pt] [--splits val test]
                               [--data-path PATH] [--cache-dir DIR]

Every token of a split but its first (which has nothing before it) is predicted exactly once: the
split is cut into consecutive windows of the training context (``train.block_size``), each predicted
from the start of its window.
Bits per character divide the total by the number of characters the predicted tokens decode to
(equal to bits per token for a character tokenizer). The corpus must be the text the run was trained
on: a file changed since (its sha256, recorded in the checkpoint) is an error, not a score on other data.
A run moved to another machine finds its corpus with ``--data-path`` (and ``--cache-dir``).
The results are added to ``evaluation.json`` beside the checkpoint, under its file name, step and
which write of the file was read (``{"best.pt": {"step": 2000, "written": ..., "val": {...}}}``):
evaluating other splits or checkpoints keeps the earlier results; a checkpoint replaced while it was
evaluated (a run training there) is an error, not results recorded under the new file. Two
evaluations of one run write ``evaluation.json`` in turn: each holds a lock on the empty file
``evaluation.json.lock`` beside it, which stays (deleting it while one waits would let a third in).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from kuramoto_attn._checks import check_int
from models.sampling import eval_mode
from recipes import RecipeWarning
from recipes.common import (ArgumentParser, add_device_flag, check_count_flag, checkpoint_file, load_run, perplexity,
                            pick_device, run_cli)
from recipes.config import DataConfig
from recipes.data import prepare_corpus
from recipes.files import locked, write_atomic

__all__ = ["main", "evaluate_split", "load_corpus"]


def add_data_location_flags(parser: argparse.ArgumentParser) -> None:
    """``--data-path`` and ``--cache-dir``: where a run's corpus is now (a moved folder, another machine)."""
    parser.add_argument("--data-path", help="the run's corpus file or folder, where it is now (default: the "
                                            "run's data.path); its text must be the one the run recorded")
    parser.add_argument("--cache-dir", help="the data cache to use (default: the run's data.cache_dir)")


def run_corpus(data: DataConfig, tokenizer, state: dict, args: argparse.Namespace):
    """:func:`load_corpus` for a run's checkpoint ``state``, where ``--data-path`` / ``--cache-dir``
    say the corpus is now (where the run recorded it otherwise)."""
    moved = {key: value for key, value in (("path", args.data_path), ("cache_dir", args.cache_dir))
             if value is not None}
    if args.data_path is not None:  # download applies only without a path: a run trained offline (false) may move
        moved["download"] = DataConfig.download
    try:
        return load_corpus(dataclasses.replace(data, **moved), tokenizer, state.get("corpus"))
    except FileNotFoundError as err:
        if args.data_path is not None:  # the message names data.path, which these commands set with --data-path
            raise FileNotFoundError(f"--data-path: {args.data_path} does not hold the run's corpus ({err})") from None
        # the message names data.path, a setting of training: say how these commands move it
        raise FileNotFoundError(f"{err} (the run's corpus is not where it was trained: give --data-path "
                                "where it is now)") from None
    except OSError as err:  # the cache: its message names data.cache_dir, which these commands set with --cache-dir
        if args.cache_dir is not None and str(err).startswith("cache_dir:"):
            raise OSError(f"--cache-dir: {args.cache_dir} cannot hold the corpus cache ({err})") from None
        raise


def load_corpus(data: DataConfig, tokenizer=None, identity: dict | None = None):
    """The corpus a run was trained on (from the data cache when present).

    ``identity``: the run's record of its corpus (the checkpoint's ``"corpus"``, see
    :meth:`recipes.data.Corpus.identity`); a source file whose text changed since (another sha256)
    is an error naming it, not a silently wrong evaluation. With the run's ``tokenizer``, a corpus
    that no longer encodes the same way (e.g. other characters) is an error too; given the
    ``tokenizer`` without an ``identity`` (a checkpoint written before they were recorded), that is
    the only check, and a warning says so.
    """
    corpus = prepare_corpus(data.name, path=data.path, tokenizer=data.tokenizer,
                            bpe_vocab_size=data.bpe_vocab_size, cache_dir=data.cache_dir,
                            val_fraction=data.val_fraction, download=data.download)
    where = f"data.path={data.path}" if data.path is not None else f"data.name={data.name}"
    if identity is not None:
        changes = corpus.changes_since(identity)
        if changes:
            raise ValueError(f"data: the corpus is not the text the run was trained on: {'; '.join(changes)}; "
                             "restore the text it was trained on to evaluate it (or train a new run on this one)")
    elif tokenizer is not None:
        warnings.warn("checkpoint: written before checkpoints recorded the corpus's sha256; only its vocabulary "
                      "is checked, not that its text is the one the run was trained on", RecipeWarning, stacklevel=2)
    if tokenizer is not None and corpus.tokenizer.to_dict() != tokenizer.to_dict():
        now, then = corpus.tokenizer.vocab_size, tokenizer.vocab_size
        sizes = f"now {now} tokens, then {then}" if now != then else f"{now} tokens, but other ones"
        raise ValueError(f"data: the corpus ({where}) no longer has the vocabulary the run was trained "
                         f"with ({sizes}): its text changed since training; evaluate on the same data")
    return corpus


@torch.no_grad()
def evaluate_split(model, tokens: np.ndarray, block_size: int, tokenizer, *, batch_size: int = 16,
                   device="cpu") -> dict[str, float]:
    """Loss (nats/token), perplexity, bits per token and bits per character over ``tokens``.

    Every token after the first is predicted once, in windows of ``block_size``. Bits per character
    divide the total by the characters of the predicted tokens decoded in one piece (independent of
    the windows): for word tokenizers that is the whitespace-normalised text (``<unk>`` counts as
    its 5 characters); for bytes, Unicode characters (bits per byte is ``bits_per_token``). The model
    runs in eval mode, and each of its modules is back in its own mode after.
    """
    if len(tokens) < 2:
        raise ValueError(f"tokens: need at least 2 tokens, got {len(tokens)}")
    block_size = check_int("block_size", block_size, low=1)  # range() and a division failed on bad ones
    batch_size = check_int("batch_size", batch_size, low=1)
    starts = range(0, len(tokens) - 1, block_size)
    full = [s for s in starts if s + block_size <= len(tokens) - 1]
    last = [[s] for s in starts if s + block_size > len(tokens) - 1]  # at most one, shorter window
    total_nats, count = 0.0, 0
    with eval_mode(model):  # a model in training mode: its dropout and phase noise would enter the loss
        for batch in [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + last:
            width = min(block_size, len(tokens) - 1 - batch[0])
            chunk = np.stack([np.asarray(tokens[s:s + width + 1], dtype=np.int64) for s in batch])
            chunk = torch.from_numpy(chunk).to(device)  # (b, width + 1)
            logits, _ = model(chunk[:, :-1])
            targets = chunk[:, 1:]
            total_nats += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    chars = len(tokenizer.decode(np.asarray(tokens[1:], dtype=np.int64).tolist()))
    loss = total_nats / count
    return {"loss": loss, "ppl": perplexity(loss), "bits_per_token": loss / math.log(2),
            "bits_per_char": total_nats / math.log(2) / max(chars, 1), "tokens": count}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = ArgumentParser(prog="python -m recipes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (uses best.pt) or a checkpoint file")
    parser.add_argument("--checkpoint", help="file name inside the run directory (default: best.pt)")
    parser.add_argument("--splits", nargs="+", help="default: val, and test where the corpus has one")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="windows per forward pass: memory, not the results (default: 16)")
    add_device_flag(parser)
    add_data_location_flags(parser)
    args = parser.parse_args(argv)
    check_count_flag(parser, "--batch-size", args.batch_size)
    checkpoint = checkpoint_file(args.run, args.checkpoint)
    written = _written(checkpoint)  # which write of the file is read (a training run may replace it)
    model, tokenizer, config, state = load_run(checkpoint)
    device = pick_device(args.device)
    model.to(device)
    corpus = run_corpus(config.data, tokenizer, state, args)
    default = [split for split in ("val", "test") if split in corpus.splits]
    splits = list(dict.fromkeys(args.splits)) if args.splits else default  # each once, in the order given
    missing = [split for split in splits if split not in corpus.splits]
    if missing:  # before anything is computed or written
        raise ValueError(f"splits: the corpus {corpus.name!r} has no split {', '.join(map(repr, missing))} "
                         f"(it has {', '.join(corpus.splits)})")
    short = [f"{split!r} has {len(corpus.splits[split])}" for split in splits if len(corpus.splits[split]) < 2]
    if short:  # also before anything is computed: the other splits' results would be lost
        raise ValueError(f"splits: {'; '.join(short)} token(s), and at least 2 are needed to predict one; "
                         "choose others with --splits")
    results = {}
    for split in splits:
        results[split] = evaluate_split(model, corpus.splits[split], config.train.block_size, tokenizer,
                                        batch_size=args.batch_size, device=device)
        r = results[split]
        print(f"{split}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/token {r['bits_per_token']:.4f}  "
              f"bits/char {r['bits_per_char']:.4f}  ({r['tokens']:,} tokens)")
    where = _record(checkpoint, state.get("progress", {}).get("step"), results, written)
    print(f"wrote {where}")
    return results


def _written(checkpoint: Path) -> str | None:
    """Which write of the file this is: inode, modification time and size (a rewrite, an atomic
    rename, gives another)."""
    try:
        st = checkpoint.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _record(checkpoint: Path, step: int, results: dict, written: str | None = None) -> Path:
    """Add ``results`` to ``evaluation.json`` beside the checkpoint, under its file name:
    ``{"best.pt": {"step": 2000, "written": ..., "val": {...}, "test": {...}}, "last.pt": {...}}``.
    Splits evaluated before for the same write of the checkpoint (``written``, see :func:`_written`)
    are kept; a checkpoint rewritten since starts its entry afresh, and one rewritten while it was
    evaluated (``written`` no longer its own) is an error: its results are not recorded under the
    new file."""
    path = checkpoint.parent / "evaluation.json"
    with locked(path.with_name(path.name + ".lock")):  # two evaluations finishing together: both kept
        if written is not None and _written(checkpoint) != written:
            raise ValueError(f"checkpoint: {checkpoint} was replaced while it was evaluated (a run training or "
                             "starting over there?); the results above are the earlier file's and are not "
                             "recorded: evaluate it again")
        try:
            recorded = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:  # not ours, or cut short: replaced
            recorded = {}
        if not isinstance(recorded, dict):
            recorded = {}
        if recorded and all(isinstance(v, dict) and "loss" in v for v in recorded.values()):
            recorded = {"unknown checkpoint": recorded}  # the flat {split: ...} of older versions, kept
        entry = recorded.get(checkpoint.name)
        if not isinstance(entry, dict) or entry.get("step") != step or entry.get("written") != written:
            entry = {"step": step, "written": written}
        recorded[checkpoint.name] = entry | results
        write_atomic(path, json.dumps(recorded, indent=2))  # a kill mid-write keeps the earlier results
    return path


if __name__ == "__main__":
    run_cli(main)
