"""Train a language model (PhaseGPT ``GPT`` or ``TPILM``) with Lightning Fabric.

    python -m recipes.train --config recipes/configs/phase_a/cpu/layer7_32osc_K1.yaml [key=value ...] \
        [--resume | --overwrite]

Writes into the run directory (``out_dir``, default ``runs/<name>``): ``config.yaml`` (resolved),
``last.pt`` and ``best.pt`` (model, optimizer, scheduler, step, RNG states, config, tokenizer and
the sha256 of the corpus's files; written atomically), ``logs/`` (CSV) and ``tensorboard/``,
``result.json`` (status, best and final validation loss, and R of each phase layer at both), and at
the end ``loss.png`` and, with phase layers, ``R.png`` (R of every phase layer and head on the
validation windows over training).
``--resume`` continues from ``last.pt`` exactly: batches and dropout depend only on (seed, step,
slice of the global batch), so it may also run on other devices: with devices × ``grad_accum``
unchanged it stays exact, otherwise only the random draws (dropout, phase noise) differ. Ctrl-C,
SIGTERM or SIGHUP saves ``last.pt`` before exiting with status 130, 143 or 129 (with several
processes, all stop before the next update and save together; a second Ctrl-C aborts); an
evaluation it interrupted (or
its checkpoints) is redone on resume, and an early-stopped run stays stopped (unless the resume
raises ``train.patience``). A resume may change ``train.max_iters`` (train a finished run longer:
the learning rate follows the new schedule from the next update), ``patience``, ``log_interval``,
``progress_bar``, ``plots``, ``out_dir`` (a moved run), ``data.path``, ``data.cache_dir`` and
``data.download`` (a moved corpus), and ``fabric.devices``, ``num_nodes``, ``strategy`` (but not
into ``fsdp`` from another strategy), ``train.grad_accum`` and ``train.compile``;
any other change is refused, naming the key, and so is a corpus whose text changed since (a file with
another sha256 than the checkpoint records).
``train/lr`` is logged at step ``s`` as the rate of update ``s``; ``train/ms_per_step`` and
``train/tokens_per_s`` (tokens of the global batch, every process's) time the steps since the previous
entry, evaluations and checkpoints left out. fp16
(``fabric.precision=16-mixed``, GPU) needs ``optim.fused=false``; its loss scale is checkpointed,
and the updates its scaler skips on overflow are not divergence. float16 weights
(``fabric.precision=16-true``) need an ``optim.eps`` that float16 holds (e.g. ``1e-4``; the default
``1e-8`` rounds to 0, and AdamW then divides 0 by 0).

More devices: ``fabric.devices=4 fabric.strategy=ddp`` (Fabric launches the processes);
several nodes: ``fabric.num_nodes=N`` under a cluster launcher (SLURM, torchrun).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from kuramoto_attn import CoherenceRegularizer, OrderParameter
from models.sampling import eval_mode, next_token_loss
from recipes import INSTALL_RECIPES, RecipeWarning
from recipes.common import (ArgumentParser, Interrupted, build_model, damaged_checkpoint, make_fabric, param_groups,
                            perplexity, read_checkpoint, run_cli, save_checkpoint, step_seed)
from recipes.config import (DATA_LOCATION, DEVICE_KEYS, DISPLAY_KEYS, RunConfig, changed_settings,
                            check_batch_split, load_config, parse_saved_config, split_overrides)
from recipes.data import CORPORA, eval_batches, get_batch, prepare_corpus
from recipes.files import locked, write_atomic
from recipes.plots import check_plotting, plot_history

__all__ = ["main", "train", "TrainingDiverged", "learning_rate"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


def learning_rate(step: int, optim, max_iters: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_iters`` steps, then cosine decay to ``min_lr`` at
    ``max_iters`` (or constant).

    >>> from recipes.config import OptimConfig
    >>> o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    >>> learning_rate(0, o, 110), learning_rate(10, o, 110), learning_rate(110, o, 110)
    (0.09090909090909091, 1.0, 0.1)
    """
    if step < optim.warmup_iters:
        return optim.lr * (step + 1) / (optim.warmup_iters + 1)
    if optim.schedule == "constant" or max_iters <= optim.warmup_iters:
        return optim.lr
    progress = min(1.0, (step - optim.warmup_iters) / (max_iters - optim.warmup_iters))
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def _warn_warmup_outlasts_training(optim, max_iters: int) -> None:
    """A run shorter than its warmup (e.g. a preset with ``train.max_iters`` lowered for a quick try)
    never reaches ``lr`` nor decays: legitimate for a smoke test, a surprise in a real run."""
    end = learning_rate(max_iters - 1, optim, max_iters)
    after = "the cosine decay to optim.min_lr" if optim.schedule == "cosine" else "the constant rate"
    warnings.warn(f"optim.warmup_iters={optim.warmup_iters} is not below train.max_iters={max_iters}: training "
                  f"ends during the warmup, at a learning rate of {end:.3g} (optim.lr={optim.lr:g}); "
                  f"{after} never starts", RecipeWarning, stacklevel=3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog="python -m recipes.train", description=__doc__.split("\n")[0])
    # required: without one, the defaults are the reference-size model (85 M parameters, hours on a CPU)
    parser.add_argument("--config", required=True, help="YAML run config (see recipes/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir that holds a run (what that run wrote there is deleted: "
                             "checkpoints, result, plots, logs, evaluations)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train.max_iters=100, applied in order (a key given twice "
                             "takes the last)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: give one of them")
    return train(load_config(args.config, args.overrides + overrides), resume=args.resume, overwrite=args.overwrite)


# what --overwrite deletes of an earlier run in the same out_dir (glob patterns): everything that run
# wrote there (train, evaluate and interpret) except config.yaml, which the new run writes again
# (interpret's files are "NAME.EXT" or "NAME-CHECKPOINT[-SPLIT].EXT": a user's "interpret_notes.json" is not one)
OLD_RUN_OUTPUTS = ("last.pt", "best.pt", "loss.png", "R.png", "logs/version_*", "tensorboard/version_*",
                   "evaluation.json", "evaluation.json.lock", "interpret.json", "interpret-*.json", "R_tokens.png",
                   "R_tokens-*.png", "R_steps.png", "R_steps-*.png")


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the contents of ``result.json``.

    A new run refuses an ``out_dir`` that already holds one (any of ``RUN_MARKERS``: ``last.pt``,
    ``best.pt``, ``result.json``, ``evaluation.json``, ``interpret[-*].json``): rerunning a command
    without ``--resume`` would otherwise replace its checkpoints. ``overwrite`` deletes what that run
    wrote (checkpoints, ``result.json``, plots, logs, evaluations: ``OLD_RUN_OUTPUTS``) once the new
    run is set up, and starts over. A run killed before its first checkpoint left no marker, only its
    ``config.yaml`` and logs: the next run there removes those (saying so); a ``config.yaml`` that is not a
    run's is refused, not replaced. While it trains, the run holds a lock on ``out_dir/.lock``: a
    second process training into the same directory is an error (exit 2), not two runs writing one
    set of files.
    """
    if resume and overwrite:  # --overwrite would delete the checkpoints the resume continues from
        raise ValueError("resume and overwrite: give one of them (resume continues the run in out_dir, "
                         "overwrite deletes it and starts over)")
    with contextlib.ExitStack() as held:  # the run directory's lock, once taken
        return _train(config, resume, overwrite, held)


def _train(config: RunConfig, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> dict[str, Any]:
    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir: {str(run_dir)!r} is a file, not a directory")
    if not resume and not overwrite:
        _refuse_a_run_in(run_dir)  # now, before the data; again once the directory is locked
    if config.train.plots:
        check_plotting("train.plots (or set train.plots=false)")
    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):  # every run logs there
        raise ModuleNotFoundError("recipes.train logs to TensorBoard, which needs the `tensorboard` package (the "
                                  f"`recipes` extra): {INSTALL_RECIPES}", name="tensorboard")
    fabric = make_fabric(config.fabric, loggers=[CSVLogger(run_dir, name="logs"),
                                                 TensorBoardLogger(run_dir, name="tensorboard")])
    fabric.launch()
    tc = config.train
    world = fabric.world_size
    check_batch_split(tc, processes=world)  # parse_config could not, with fabric.devices "auto" or -1
    shards = world * tc.grad_accum  # every global batch is cut into this many equal micro-batches

    with fabric.rank_zero_first():
        d = config.data
        corpus = prepare_corpus(d.name, path=d.path, tokenizer=d.tokenizer,
                                bpe_vocab_size=d.bpe_vocab_size, cache_dir=d.cache_dir,
                                val_fraction=d.val_fraction, download=d.download)
    cut = not CORPORA[d.name].fixed_splits  # train and val cut from one text by data.val_fraction
    for split in ("train", "val"):  # fail now, not at the first evaluation
        if len(corpus.splits[split]) < tc.block_size + 1:
            share = f", {'raise' if split == 'val' else 'lower'} data.val_fraction ({d.val_fraction})" if cut else ""
            raise ValueError(f"train.block_size: the {split} split has {len(corpus.splits[split]):,} tokens, "
                             f"fewer than block_size + 1 = {tc.block_size + 1}; lower it{share} or use more text")

    fabric.seed_everything(config.seed)  # same initial weights on every rank
    model = build_model(config.model, corpus.tokenizer.vocab_size)
    parameters = _count(model)  # now: under FSDP, each rank's parameters are views of its shard
    # Fabric compiles again after wrapping (DDP) and saves the uncompiled module: same checkpoints
    model = fabric.setup_module(torch.compile(model) if tc.compile else model)
    if fabric._precision.precision == "16-true" and float(torch.tensor(config.optim.eps, dtype=torch.float16)) == 0:
        # float16 weights: AdamW's state and update are float16 too, and a parameter whose gradient is 0 gets 0 / 0
        raise ValueError(f"optim.eps: {config.optim.eps:g} rounds to 0 in float16 (fabric.precision=16-true), so AdamW "
                         "divides 0 by 0 for a parameter without gradient and the loss turns NaN within a few steps; "
                         "set optim.eps=1e-4 or use fabric.precision=bf16-true or 32-true")
    if config.optim.fused and getattr(fabric._precision, "scaler", None) is not None:
        raise ValueError(f"optim.fused: with fabric.precision={fabric._precision.precision} (loss scaling) Fabric "
                         "cannot clip the gradients of fused AdamW; set optim.fused=false")
    try:
        optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                      betas=tuple(config.optim.betas), eps=config.optim.eps,
                                      fused=config.optim.fused)
    except RuntimeError as err:  # a device without the fused kernel
        raise ValueError(f"optim.fused: {err}; set optim.fused=false") from err
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, config.optim, tc.max_iters) / config.optim.lr)

    # eval_due: the evaluation after the last update has not been saved (redone on resume);
    # stopped: early stopping ended the run (a resume ends it again)
    # shards: the global batch's slices (devices × grad_accum), each with its own random draws
    progress = {"step": 0, "best_val": math.inf, "bad_evals": 0, "history": [], "eval_due": False,
                "stopped": False, "shards": shards}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
             "config": config.to_dict(), "tokenizer": corpus.tokenizer.to_dict(), "corpus": corpus.identity()}
    if resume:
        _resume(fabric, run_dir / "last.pt", state, config, corpus)
        progress = state["progress"]
    failure = None
    if fabric.is_global_zero:  # set up without an error: only now is an old run's state let go
        try:
            _claim_run_dir(run_dir, config, resume, overwrite, held)
        except OSError as err:  # refused (another process trains there) or not writable
            failure = err
    if world > 1:  # every rank stops, not rank 0 alone (the others would wait in the first all-reduce)
        failure = fabric.broadcast(failure, src=0)
        if failure is not None:  # all have it before rank 0 exits: a gloo receive from a closed peer fails
            fabric.barrier()
    if failure is not None:
        raise failure
    # warned once the run is set to start, not above the error of a setting that stops it
    if config.optim.warmup_iters >= tc.max_iters and fabric.is_global_zero:
        _warn_warmup_outlasts_training(config.optim, tc.max_iters)
    fabric.print(f"{config.name}: {parameters:,} parameters, {len(corpus.splits['train']):,} "
                 f"training tokens, world size {world}, precision {fabric._precision.precision}")

    status = None
    try:
        # asked of the model, whichever settings (a target, or a band in band mode) gave it one
        regularized = any(isinstance(module, CoherenceRegularizer) for module in model.modules())
        with _interrupt_at_an_update(fabric, state):  # also while an interrupt's save runs
            try:
                status = _loop(fabric, model, optimizer, scheduler, state, corpus, config, regularized)
            except KeyboardInterrupt:
                state["_stopping"] = True  # more SIGTERMs now are this stop (a second Ctrl-C aborts it)
                if not state.get("_in_update"):
                    _save(fabric, run_dir / "last.pt", state)
                    fabric.print(f"interrupted at step {progress['step']}: saved last.pt; continue with --resume")
                else:  # an exception inside the update, or a second Ctrl-C: weights may be half updated
                    kept = ("last.pt keeps the last saved state; continue with --resume"
                            if (run_dir / "last.pt").is_file() else "no checkpoint was saved yet; train again to "
                                                                    "start over")
                    fabric.print(f"interrupted during update {progress['step'] + 1}: not saved ({kept})")
                _flush_logs(fabric)
                raise
    except TrainingDiverged as err:
        _write_result(fabric, config, progress, "diverged", str(err))
        _flush_logs(fabric)
        _plot(fabric, config, progress)  # the curves up to the divergence: where one looks first
        if world > 1:  # every rank diverged together; Fabric's launcher kills rank 0 once another exits with an
            fabric.barrier()  # error: the others exit only after rank 0 has written its result and plots
        raise
    finally:
        _close_logs(fabric, failed=status is None)
    result = _write_result(fabric, config, progress, status)
    _plot(fabric, config, progress)
    return result


def _plot(fabric, config: RunConfig, progress: dict) -> None:
    if fabric.is_global_zero and config.train.plots and progress["history"]:
        plot_history(progress["history"], config.run_dir)


#: what marks a directory as holding a run (glob patterns): not only last.pt (a user may delete it to
#: save space and keep best.pt; a run that diverged before its first checkpoint leaves only
#: result.json), and any report of interpret, whichever checkpoint it read (interpret-last.json)
RUN_MARKERS = ("last.pt", "best.pt", "result.json", "evaluation.json", "interpret.json", "interpret-*.json")


def _run_outputs_in(run_dir: Path) -> list[str]:
    return [path.name for pattern in RUN_MARKERS for path in sorted(run_dir.glob(pattern)) if path.is_file()]


def _refuse_a_run_in(run_dir: Path) -> None:
    found = _run_outputs_in(run_dir)
    if found:
        go_on = "continue it with --resume, " if (run_dir / "last.pt").is_file() else ""  # none: nothing to resume
        raise FileExistsError(f"out_dir: {run_dir} already holds a run ({', '.join(found)}); {go_on}start over "
                              "with --overwrite, or give this run another name or out_dir")


def _holds_a_run_config(run_dir: Path) -> bool:
    """Whether ``run_dir/config.yaml`` is one a run wrote (every section of a run's config), not a user's own."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and set(RunConfig().to_dict()) <= set(saved)


def _claim_run_dir(run_dir: Path, config: RunConfig, resume: bool, overwrite: bool,
                   held: contextlib.ExitStack) -> None:
    """Create the run directory, lock it (``.lock``, holding this process's pid, held until ``held``
    closes; unlocked where there is no ``flock``), clear what must not survive into the new run and
    write ``config.yaml``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"out_dir: cannot create the run directory {run_dir} ({err.strerror})") from err
    try:  # before anything in it is deleted or written
        lock = held.enter_context(locked(run_dir / ".lock", wait=False))
    except BlockingIOError:
        owner = (run_dir / ".lock").read_text().strip() or "?"
        raise FileExistsError(f"out_dir: another process (pid {owner}) is training into {run_dir}; let it "
                              "end (or stop it) first, or give this run another name or out_dir") from None
    if lock is not None:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    if not resume and not overwrite:  # a run that another process finished since the first check
        _refuse_a_run_in(run_dir)
    markers = _run_outputs_in(run_dir)
    # without a marker, a config.yaml may be the user's own: not replaced (nothing is lost)
    if not markers and (run_dir / "config.yaml").exists() and not _holds_a_run_config(run_dir):
        raise FileExistsError(f"out_dir: {run_dir / 'config.yaml'} is not a run's config (a run writes its own "
                              "there); give this run another out_dir, or move the file")
    # overwrite, where a run was (RUN_MARKERS; other directories keep their files):
    # nothing of it stays to be mistaken for the new run's (a best.pt if the new run stops early,
    # plots, evaluations, log versions); always: no result.json of a shorter run while this one
    # trains (a sweep would take it for done), no .tmp of a write cut short
    old_run = overwrite and bool(markers)
    # a run killed (SIGKILL, out of memory) before its first checkpoint left its config.yaml (a run's, as just
    # checked) and log versions, no marker: nothing to resume, and the new run's curves (logs/version_1) would
    # sit beside its partial ones
    killed = not resume and not markers and (run_dir / "config.yaml").exists()
    for pattern in (OLD_RUN_OUTPUTS if old_run or killed else ()) + ("result.json", "last.pt.tmp", "best.pt.tmp"):
        for path in run_dir.glob(pattern):
            if killed:
                print(f"out_dir: removing {path.relative_to(run_dir)}, left by a run there that stopped before "
                      "its first checkpoint", flush=True)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def _loop(fabric, model, optimizer, scheduler, state, corpus, config, regularized) -> str:
    tc, progress = config.train, state["progress"]
    train_data = corpus.splits["train"]
    rank, world, shards = fabric.global_rank, fabric.world_size, fabric.world_size * tc.grad_accum
    bar = None
    if tc.progress_bar and fabric.is_global_zero:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_iters, initial=progress["step"], dynamic_ncols=True, file=sys.stderr)
    model.train()
    # throughput is timed between the log entries' loss reductions (each .item() waits for the steps before
    # it), without evaluations: (start, step) of the stretch the next entry reports
    timed = (time.perf_counter(), progress["step"])
    try:
        while True:
            if progress.get("eval_due"):
                _evaluate_and_save(fabric, model, state, corpus.splits["val"], config)
                timed = (time.perf_counter(), progress["step"])
            if progress["step"] >= tc.max_iters:  # every step trained, even if patience ran out at the last
                return "finished"
            if progress.get("stopped"):
                return "early_stopped"
            step = progress["step"]
            total_loss, total_aux = 0.0, 0.0
            for micro in range(tc.grad_accum):
                shard = micro * world + rank  # this micro-batch's slice of the global batch
                # dropout and phase noise seeded per slice, as the batch is: N devices draw what one
                # device with grad_accum N does (and a resume on other devices can stay exact)
                _seed_draws(step_seed(config.seed, step, shard), fabric.device)
                x, y = get_batch(train_data, tc.batch_size, tc.block_size, seed=config.seed, step=step,
                                 rank=shard, world_size=shards, device=fabric.device)
                with fabric.no_backward_sync(model, enabled=micro < tc.grad_accum - 1):
                    if regularized:  # diagnostics cost time: ask for them only for the coherence loss
                        _, loss, info = model(x, y, return_info=True)
                        aux = info.coherence_loss
                    else:
                        (_, loss), aux = model(x, y), None
                    fabric.backward((loss if aux is None else loss + aux) / tc.grad_accum)
                total_loss += loss.detach() / tc.grad_accum
                if aux is not None:
                    total_aux = total_aux + aux.detach() / tc.grad_accum
            norm = fabric.clip_gradients(model, optimizer, max_norm=config.optim.grad_clip or math.inf,
                                         error_if_nonfinite=False)
            _check_finite(fabric, total_loss, norm, step, config, state.get("_interrupted", 0))
            lr = optimizer.param_groups[0]["lr"]  # the rate of this update
            # a stop waits for the update: stopping inside saved nothing, and lost every update since the
            # last checkpoint
            with _stop_waits(state):
                # the update's log entry, logged before it and added to the history with it (logged after it,
                # an interrupt in between saved the step without its entry, in the history and the logs)
                logged = None
                if (step + 1) % tc.log_interval == 0 or step + 1 == tc.max_iters:
                    loss_value = fabric.all_reduce(total_loss, reduce_op="mean").item()
                    metrics = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": float(norm)}
                    now = time.perf_counter()  # one reading ends this stretch and starts the next
                    seconds, steps = now - timed[0], step + 1 - timed[1]
                    metrics["train/ms_per_step"] = 1e3 * seconds / steps
                    metrics["train/tokens_per_s"] = steps * tc.batch_size * tc.block_size / seconds
                    timed = (now, step + 1)
                    if torch.is_tensor(total_aux):
                        metrics["train/coherence_loss"] = fabric.all_reduce(total_aux, reduce_op="mean").item()
                    fabric.log_dict(metrics, step=step + 1)
                    logged = {"step": step + 1, "train_loss": loss_value}
                state["_in_update"] = True
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] = step = step + 1
                progress["eval_due"] = step % tc.eval_interval == 0 or step == tc.max_iters
                if logged is not None:
                    progress["history"].append(logged)
                state["_in_update"] = False
            if bar is not None:
                bar.update(1)
                if logged is not None:
                    bar.set_postfix(loss=f"{logged['train_loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()


def _evaluate_and_save(fabric, model, state, val_data, config: RunConfig) -> None:
    """Evaluate after the last update, then save best.pt (when better) and last.pt. ``progress``
    changes only once both are written: an interrupt before that leaves ``eval_due`` set, so a
    resume evaluates again (deterministic) instead of skipping the evaluation."""
    tc, progress = config.train, state["progress"]
    step = progress["step"]
    val = evaluate(fabric, model, val_data, config)
    if not math.isfinite(val["val/loss"]):
        kept = ("last.pt / best.pt keep the last good state" if (config.run_dir / "last.pt").is_file()
                else "no checkpoint has been written yet")
        raise TrainingDiverged(f"step {step}: validation loss {val['val/loss']} is not finite; {kept}")
    with _stop_waits(state):  # for the checkpoints that go with this log entry
        fabric.log_dict(val, step=step)
        layer_R = "".join(f", R {layer} {R:.3f}" for layer, R in _layer_R(val).items())
        fabric.print(f"step {step}: val loss {val['val/loss']:.4f}{layer_R}")
        new = dict(progress, eval_due=False, history=progress["history"] + [
            {"step": step, **{k.replace("/", "_", 1): v for k, v in val.items()}}])
        improved = val["val/loss"] < progress["best_val"]
        new["best_val"], new["bad_evals"] = (val["val/loss"], 0) if improved else (progress["best_val"],
                                                                                   progress["bad_evals"] + 1)
        new["stopped"] = _out_of_patience(new["bad_evals"], tc.patience)
        if improved:
            _save(fabric, config.run_dir / "best.pt", dict(state, progress=new))
        _save(fabric, config.run_dir / "last.pt", dict(state, progress=new))
        progress.update(new)  # one call: an interrupt finds the old or the new progress, never a mix
        _flush_logs(fabric)
    if new["stopped"] and step < tc.max_iters:
        fabric.print(f"early stopping at step {step}: no better val loss in {tc.patience} evaluations")


@torch.no_grad()
def evaluate(fabric, model, data, config: RunConfig) -> dict[str, float]:
    """Mean loss over a fixed set of validation windows, plus R statistics of every phase layer
    (per head, pooled over tokens and batch) as ``val/R/layer{i}/head{j}`` and ``val/R/layer{i}``."""
    tc = config.train
    metrics = {}  # phase layer -> OrderParameter over its heads, made when its phases first arrive
    losses = []
    # the same windows whatever the device count and grad_accum (comparable val losses), in
    # micro-batches of the training micro-batch's size (the memory a step is known to fit)
    batches = eval_batches(data, tc.batch_size, tc.block_size, tc.eval_iters, seed=config.seed,
                           rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device)
    with eval_mode(model):  # each module back in its own mode after, also when evaluation fails
        for x_rank, y_rank in batches:
            for x, y in zip(x_rank.chunk(tc.grad_accum), y_rank.chunk(tc.grad_accum)):  # equal sizes
                logits, _, info = model(x, return_info=True)  # no targets: the model's loss would go unused
                # from the logits, in float32: the model's loss is in its own dtype (bf16-true: a bfloat16 number,
                # 1/32 apart from 4 to 8, which best.pt and patience compared)
                losses.append(next_token_loss(logits.float(), y))
                for i, layer_info in getattr(info, "phase", {}).items():  # GPTInfo only: TPI has no oscillators
                    if i not in metrics:
                        heads = layer_info.phases.shape[1]  # phases (b, h, t, n)
                        metrics[i] = OrderParameter(dim=-1, group_dim=1, num_groups=heads).to(fabric.device)
                    metrics[i].update(layer_info.phases.float())
    loss = fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()
    out = {"val/loss": loss, "val/ppl": perplexity(loss)}
    for i, metric in metrics.items():
        mean = metric.compute()["mean"].cpu().reshape(-1)  # (heads,); one head comes back 0-d
        out[f"val/R/layer{i}"] = mean.mean().item()
        out.update({f"val/R/layer{i}/head{h}": r.item() for h, r in enumerate(mean)})
    return out


@contextlib.contextmanager
def _stop_waits(state: dict):
    """A signal to one process (:func:`_interrupt_at_an_update`'s ``stop``) waits for the end of this
    block, then stops the run: work whose log entry and checkpoint belong together is not cut in two.
    (Several processes stop together before the next update anyway.)"""
    state["_deferring"] = True
    yield
    state["_deferring"] = False
    if state.get("_deferred"):
        raise Interrupted(state.pop("_deferred"))


@contextlib.contextmanager
def _interrupt_at_an_update(fabric, state: dict):
    """With several processes, Ctrl-C marks ``state["_interrupted"]``; the ranks agree on it before
    the next update (:func:`_check_finite`) and stop there together. A rank interrupted at once,
    inside a collective, would leave the others waiting in theirs (for gloo's 30 minutes). A second
    Ctrl-C interrupts at once. One process stops at once, except from the update's log entry to the
    update's end, and from an evaluation's log entry to its checkpoints, which it finishes first. Once
    a stop is under way, a repeated SIGTERM or SIGHUP is the same stop and a second Ctrl-C aborts (the
    save too: the previous ``last.pt`` stays whole). SIGTERM (a
    scheduler's preemption, ``kill``) and SIGHUP (a closed terminal) are handled as Ctrl-C, so
    ``last.pt`` is saved before exiting;
    a signal the process was started to ignore stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def again(signum) -> None:
        # a stop is under way: a repeated SIGTERM or SIGHUP is the same stop (a scheduler signals every
        # process of a job, and recipes.sweep passes its own copy on: it killed the save); Ctrl-C aborts
        if signum == signal.SIGINT:
            raise Interrupted(signum)

    def mark(signum, frame):
        if state.get("_interrupted") or state.get("_stopping"):
            return again(signum)
        state["_interrupted"] = signum
        fabric.print(f"{signal.Signals(signum).name}: every process stops before the next update "
                     "(Ctrl-C again to abort)")

    def stop(signum, frame):
        if state.get("_stopping") or state.get("_deferred"):
            return again(signum)
        if state.get("_deferring"):
            state["_deferred"] = signum  # raised at the end of _stop_waits' block
            return
        state["_stopping"] = True
        raise Interrupted(signum)

    # SIGHUP (a closed terminal; recipes.sweep passes it on) as SIGTERM: it would kill the run without its save
    ends = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    handlers = {s: stop if fabric.world_size == 1 else mark for s in ends}
    previous = {}
    for signum, handler in handlers.items():
        # not over an ignored signal, nor over a handler installed outside Python (None: not restorable)
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _seed_draws(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a step draws from: the CPU's, and those of the device type it
    runs on. torch.manual_seed also seeds every other accelerator type torch has, each not initialised here, so it
    formats the call stack for each to replay later: about 0.2 ms, 0.5 % of a CPU preset's step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    # every device of the type, as torch.manual_seed seeds them (mps has one); a type without a torch module
    # (xla): torch.manual_seed itself
    getattr(backend, "manual_seed_all", getattr(backend, "manual_seed", torch.manual_seed))(seed)


def _check_optimizer_state(optimizer, model, path: Path, updated_at: int) -> None:
    """Each loaded state tensor (AdamW's moments) has its parameter's shape. torch's load checks only the
    number of parameters per group, and the fused kernel reads the moments as flat buffers: a damaged or
    edited checkpoint's wrong shape was used as it was, or read and written out of bounds (a crash). A run that
    has updated its weights (``updated_at``: its step; 0 when it may not have) has moments: an empty state
    (stripped to save space) restarted them from zero, silently not the run it continues."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # (a rank can hold no elements at all: FSDP's shards of a tiny model over many ranks)
    if updated_at > 0 and any(p.numel() for p in params) and not any(optimizer.state.get(p) for p in params):
        raise ValueError(f"--resume: {str(path)!r} holds no optimizer state (AdamW's moments), but the run is at "
                         f"step {updated_at}: resuming would restart them from zero, not continue the run; restore it, "
                         "or start over with --overwrite")
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"--resume: {str(path)!r} holds an optimizer state {key} of shape "
                                 f"{tuple(value.shape)} for {names.get(id(p), 'a parameter')} of shape "
                                 f"{tuple(p.shape)}; restore it, or start over with --overwrite")


def _check_finite(fabric, loss, norm, step, config: RunConfig, interrupted: int = 0) -> None:
    # (any rank's loss not finite, gradient norm not finite, any rank interrupted), decided together
    # so that no rank waits alone; ``interrupted``: the signal this rank received, 0 if none (the
    # maximum over ranks: every rank stops with SIGTERM's status if any got it)
    bad = torch.tensor([float(not torch.isfinite(loss)), float(not torch.isfinite(norm)), float(interrupted)],
                       device=fabric.device)
    if fabric.world_size > 1:
        bad = fabric.all_reduce(bad, reduce_op="max")
    bad_loss, bad_norm, signum = bool(bad[0]), bool(bad[1]), int(bad[2])
    if signum:  # on every rank, before the update: they save last.pt together
        raise Interrupted(signum)
    if not bad_loss and bad_norm and getattr(fabric._precision, "scaler", None) is not None:
        return  # fp16 loss scaling: an overflow is normal, the scaler skips this update and lowers its scale
    if bad_loss or bad_norm:
        if fabric.world_size > 1:  # the mean over ranks, which train/loss logs: every rank's error line alike
            loss = fabric.all_reduce(loss.detach().clone(), reduce_op="mean")
        first = min(config.train.eval_interval, config.train.max_iters)
        kept = ("last.pt / best.pt keep the last good state" if (config.run_dir / "last.pt").is_file()
                else f"no checkpoint yet (the first is written at step {first})")
        hints = ["a lower optim.lr", "optim.grad_clip"]
        if fabric._precision.precision not in ("32-true", "64-true"):  # not to a run in float64 already
            hints.append("fabric.precision=32-true")
        what = {(True, False): "the loss is", (False, True): "the gradient norm is",
                (True, True): "the loss and the gradient norm are"}[bad_loss, bad_norm]
        raise TrainingDiverged(f"update {step + 1}: {what} not finite (loss {float(loss):.4g}, gradient norm "
                               f"{float(norm):.4g}); stopped before the update, {kept}. Try "
                               f"{', '.join(hints[:-1])} or {hints[-1]}.")


def _write_result(fabric, config: RunConfig, progress: dict, status: str, message: str = "") -> dict:
    evals = [h for h in progress["history"] if "val_loss" in h]
    # the evaluation best.pt holds: the first with the best loss (an equal loss is no improvement)
    best = next((h for h in evals if h["val_loss"] == progress["best_val"]), None)
    result = {"name": config.name, "seed": config.seed, "status": status, "step": progress["step"],
              "best_val_loss": progress["best_val"] if evals else None,
              "final_val_loss": evals[-1]["val_loss"] if evals else None,
              "best_val_R": _layer_R(best), "final_val_R": _layer_R(evals[-1] if evals else None),
              "message": message}
    if fabric.is_global_zero:
        write_atomic(config.run_dir / "result.json", json.dumps(result, indent=2))  # a sweep reads it
    return result


def _layer_R(evaluation: dict | None) -> dict[str, float]:
    """``{"layer<i>": R}`` of an evaluation (as :func:`evaluate` returns it, or as the history keeps
    it): each phase layer's R, the mean over its heads of the per-head R (empty without phase layers
    or evaluation)."""
    if evaluation is None:
        return {}
    return {key.split("/")[-1]: value for key, value in evaluation.items() if re.fullmatch(r"val[/_]R/layer\d+", key)}


def _save(fabric, path: Path, state: dict[str, Any]) -> None:
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    # fp16's loss scale (Fabric saves none), and the precision trained in (fabric.precision null resolves per machine)
    extra = {"rng": rng, "precision": fabric._precision.state_dict(), "trained_precision": fabric._precision.precision}
    save_checkpoint(fabric, path, {k: v for k, v in state.items() if not k.startswith("_")} | extra)


def _flush_logs(fabric) -> None:
    # Fabric's CSVLogger writes only every 100th step (never, for steps logged at multiples of 10)
    # and at finalize: flush with every checkpoint, so an interrupted run keeps its logs
    for logger in fabric.loggers:
        logger.save()


def _close_logs(fabric, failed: bool) -> None:
    # however the run ends: TensorBoard's event file and its writer thread were closed only by a run that
    # finished (each that raised left one more running in the process), and the CSV log is written out
    for logger in fabric.loggers:
        with contextlib.suppress(Exception) if failed else contextlib.nullcontext():  # the run's own error
            logger.finalize("failed" if failed else "success")                      # is the one to report


#: what ``--resume`` may change: how long to train, when to stop early, what to show, where the run
#: and its corpus live (a moved directory, another machine: the corpus's text is checked by its
#: sha256 instead), and on how many devices (the global batch stays the same: a job restarted on
#: another allocation). Everything else (model, data, optimizer, batch size, precision) would make
#: the resumed run a different experiment.
RESUMABLE_CHANGES = ("train.max_iters", "train.patience", *DISPLAY_KEYS, "out_dir", *DATA_LOCATION, *DEVICE_KEYS)


def _refuse_a_change_into_fsdp(saved_config: dict, config: RunConfig) -> None:
    """A checkpoint not written under FSDP keys its optimizer state by position; Fabric's FSDP load
    maps positions to parameters in ``model.parameters()`` order, but the optimizer numbers them by
    group (decay first, see ``param_groups``): every parameter would get another's Adam moments."""
    trained = str(saved_config.get("fabric", {}).get("strategy"))
    if str(config.fabric.strategy).startswith("fsdp") and not trained.startswith("fsdp"):
        raise ValueError(f"fabric.strategy: the run trained with {trained}, and its checkpoint cannot resume under "
                         f"fsdp (its optimizer state is keyed by position, which FSDP's load would give to other "
                         f"parameters); resume with fabric.strategy={trained} or ddp")


def _resume(fabric, path: Path, state: dict[str, Any], config: RunConfig, corpus) -> None:
    if not path.is_file():
        found = _run_outputs_in(path.parent)
        if "best.pt" in found:  # last.pt deleted (to save space): the best one is a whole checkpoint too
            raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}; the run's best.pt is there: copy it "
                                    "to last.pt to go on from its step, or start over with --overwrite (which "
                                    "deletes it)")
        if found:  # e.g. diverged at its first steps: a result, no checkpoint to go on from
            raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}: the run there stopped before its "
                                    f"first one ({', '.join(found)}); start it over with --overwrite")
        raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r} (train without --resume first)")
    # compare before loading the weights: a changed model would fail there with a size mismatch
    header = read_checkpoint(path, "--resume", ("model", "config", "tokenizer", "progress"),
                             "restore it, or start over with --overwrite", mmap=True)
    # defaults filled in: keys added since are no change; settings that had no effect are dropped
    saved_config = parse_saved_config(header["config"]).to_dict()
    changed = changed_settings(saved_config, state["config"], vocab_size=corpus.tokenizer.vocab_size)
    trained, now = header.get("trained_precision"), fabric._precision.precision  # recorded since 2026-12-04
    if trained is not None:  # the precision trained in is compared, not the setting (null resolves per machine)
        if trained != now:  # e.g. precision null: bf16-mixed on a GPU, 32-true on a CPU
            raise ValueError(f"fabric.precision: the run trained in {trained} but would resume in {now} "
                             f"(fabric.precision={config.fabric.precision}); set fabric.precision={trained} to "
                             "resume it")
        changed = [key for key in changed if key != "fabric.precision"]
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        raise ValueError(f"--resume: the config differs from the checkpoint's in {', '.join(refused)}; "
                         f"resume with the same config (only {', '.join(RESUMABLE_CHANGES)} may change) "
                         "or start a new out_dir")
    _refuse_a_change_into_fsdp(saved_config, config)
    if header.get("corpus") is None:  # written before checkpoints recorded it: the new ones will
        fabric.print(f"{path} records no sha256 of the corpus (written by an older version): only its "
                     "vocabulary is checked, not that its text is the one the run was trained on")
    else:
        changes = corpus.changes_since(header["corpus"])
        if changes:
            raise ValueError(f"--resume: the corpus is not the text the run was trained on: "
                             f"{'; '.join(changes)}; restore the text it was trained on to resume it exactly, "
                             "or train on this one in a new run (--overwrite, or another out_dir)")
    if header["tokenizer"] != state["tokenizer"]:
        raise ValueError("--resume: the tokenizer differs from the checkpoint's (data settings changed?)")
    del header
    with damaged_checkpoint(path, "--resume", "restore it, or start over with --overwrite"):
        saved = fabric.load(path, {k: state[k] for k in ("model", "optimizer", "scheduler")}, strict=True)
    # a run past step 0 has updated its weights, unless a loss scaler (fp16, state saved) skipped every update so far
    _check_optimizer_state(state["optimizer"], state["model"], path,
                           0 if saved.get("precision") else saved["progress"]["step"])
    if saved.get("precision"):
        fabric._precision.load_state_dict(saved["precision"])
    shards = state["progress"]["shards"]
    state["progress"] = progress = {**state["progress"], **saved["progress"]}  # keys added since keep defaults
    if progress.get("shards") != shards:
        before = f"{progress['shards']} slices" if progress.get("shards") else "another split"
        fabric.print(f"the global batch is split into {shards} slices (devices × train.grad_accum), not {before} as "
                     "before: the same batches, but dropout and phase noise draw other numbers than the run "
                     "would have (keep devices × grad_accum to resume exactly)")
        progress["shards"] = shards
    if config.train.max_iters < progress["step"]:
        raise ValueError(f"train.max_iters: {config.train.max_iters} is below the step the run is at "
                         f"({progress['step']}); --resume can only train longer")
    # as when it was saved, unless train.patience changed (more patience: an early-stopped run goes on)
    progress["stopped"] = _out_of_patience(progress["bad_evals"], config.train.patience)
    # a run ends with an evaluation: also one resumed at a new train.max_iters, at a step it had not evaluated
    evaluated = [h["step"] for h in progress["history"] if "val_loss" in h]
    if progress["step"] == config.train.max_iters and evaluated[-1:] != [progress["step"]]:
        progress["eval_due"] = True
    torch.set_rng_state(saved["rng"]["torch"])
    scheduler = state["scheduler"]
    # the loaded rate is the old schedule's: the next update already takes the new max_iters' rate
    for group, base, rate in zip(state["optimizer"].param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rate(scheduler.last_epoch)
    fabric.print(f"resumed from {path} at step {saved['progress']['step']}" + "".join(
        f"; {key}: {_dotted(saved_config, key)} -> {_dotted(state['config'], key)}" for key in changed))
    if not progress["eval_due"] and (progress["stopped"] or progress["step"] >= config.train.max_iters):
        limits = ([(f"at train.max_iters={config.train.max_iters}", "train.max_iters")]
                  if progress["step"] >= config.train.max_iters else []) + (
                 [("out of patience", "train.patience")] if progress["stopped"] else [])
        fabric.print(f"nothing to train: the run is {' and '.join(why for why, _ in limits)}; raise "
                     f"{' and '.join(knob for _, knob in limits)} to go on")


def _out_of_patience(bad_evals: int, patience: int | None) -> bool:
    return patience is not None and bad_evals >= patience


def _dotted(mapping: dict, key: str):
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    run_cli(main, failures=(TrainingDiverged,))
