"""Run configs × seeds one after another, then summarise them with mean ± 95% CI over seeds.

    python -m recipes.sweep recipes/configs/phase_a/cpu/sweep.yaml [key=value ...]
    python -m recipes.sweep --configs a.yaml b.yaml --seeds 1 2 3 --out runs/my_sweep [key=value ...]

Overrides (``section.key=value``) may stand anywhere on the command line.

A sweep file holds ``configs`` (paths relative to it), ``seeds``, ``out_dir`` and optional
``overrides`` (dotted strings applied to every run). Each run trains in its own process (one at a
time, so runs never compete for a GPU) into ``<out_dir>/<config name>/seed<seed>``: a run with a
``result.json`` is skipped (after checking it was trained with the same settings; those that only
change what a run shows, such as the progress bar, or on how many devices, may differ, and so may
where the corpus lives, ``data.path``, ``data.cache_dir`` and ``data.download``, when its text is
the one the run's checkpoint records, and ``fabric.precision``, when the run trained in the precision
it gives on this machine: null is 32-true on a CPU), one with a ``last.pt`` is resumed
(``recipes.train --resume`` checks the corpus). The summary goes to ``<out_dir>/summary.csv`` (every
run) and ``summary.md`` (per config: mean ± 95% CI of the best val loss over the finished or
early-stopped seeds, and of each phase layer's val R at that evaluation; diverged runs are listed in
the statuses, not averaged).
A config that trains the same runs as an earlier one of the sweep (it differs only in name, seed or
out_dir, which the sweep sets for each run) is warned of: each seed's run would be trained twice. A
config of the sweep left without any finished or early-stopped seed (every one diverged) makes the
sweep exit with status 1 once the summary is written.

The settings (from the file or the flags) and every run's config are checked before anything is
created or launched: ``configs`` a non-empty list of paths, ``seeds`` distinct integers in
[0, 2**32), ``out_dir`` a path, ``overrides`` ``key=value`` strings (not ``name``, ``seed`` or
``out_dir``, which the sweep sets for each run).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import numbers
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.config import ConfigError
from recipes import RecipeWarning
from recipes.common import (ArgumentParser, Interrupted, mean_ci95, perplexity, read_checkpoint, resolved_precision,
                            run_cli)
from recipes.config import (DATA_LOCATION, DEVICE_KEYS, DISPLAY_KEYS, DataConfig, RunConfig, changed_settings,
                            load_config, load_yaml, override, parse_saved_config, read_yaml, split_overrides)
from recipes.data import check_local_files, tokenizer_from_dict
from recipes.evaluate import load_corpus
from recipes.files import write_atomic

__all__ = ["main", "run_sweep", "summarise", "SweepRunFailed"]

_SWEEP_KEYS = {"configs", "seeds", "out_dir", "overrides"}
_PER_RUN_KEYS = ("name", "seed", "out_dir")  # the sweep sets these for each run
COUNTED = ("finished", "early_stopped")  # the statuses whose losses enter the mean ± CI


def run_sweep(configs: list[Path], seeds: list[int], out_dir: Path, overrides: list[str] = (),
              python: str = sys.executable) -> list[dict]:
    """Train every (config, seed) not finished yet; return one row per run (see :func:`summarise`)."""
    _check_settings({"seeds": list(seeds), "overrides": list(overrides)})
    # every run's config is checked before anything is created or launched
    checked = [_checked_config(c, overrides) for c in configs]
    names = [as_read.get("name", c.stem) for c, (as_read, _) in zip(configs, checked)]
    if len(set(names)) != len(names):
        raise ValueError(f"configs: run names must be distinct, got {names}")
    _warn_of_repeated_runs(configs, [run_config for _, run_config in checked])
    runs = []
    for config, name in zip(configs, names):
        for seed in seeds:
            run_dir = out_dir / name / f"seed{seed}"
            run_overrides = [*overrides, override("name", name), override("seed", seed), override("out_dir", run_dir)]
            _checked_config(config, run_overrides)
            runs.append((config, name, seed, run_dir, run_overrides))
    corpora = _Corpora()
    found = []  # (resume, done) of each run
    for config, name, seed, run_dir, run_overrides in runs:  # all of them before training any (hours later)
        resume, done = (run_dir / "last.pt").is_file(), _status(run_dir) != "unknown"
        if resume or done:
            # not only for a finished run: a resume may change train.max_iters, a sweep's runs may not
            _check_same_settings(run_dir, config, run_overrides, corpora if done else None)
        found.append((resume, done))
    out_dir.mkdir(parents=True, exist_ok=True)
    for (config, name, seed, run_dir, run_overrides), (resume, done) in zip(runs, found):
        if done:
            print(f"[sweep] {name} seed {seed}: done, skipped")
            continue
        cmd = [python, "-m", "recipes.train", "--config", str(config), *run_overrides] + (
            ["--resume"] if resume else [])
        print(f"[sweep] {name} seed {seed}: {'resuming' if resume else 'training'}", flush=True)
        try:
            code = _train(cmd)
        except Interrupted:  # the run's own message says --resume, which is the sweep's to give
            print(f"[sweep] {name} seed {seed}: stopped; rerun the same sweep command to resume it", flush=True)
            raise
        if code != 0 and (run_dir / "result.json").is_file():  # diverged, or trained and failed after (its plots)
            status = _status(run_dir)
            what = "diverged" if status == "diverged" else f"{status}, then exited with {code}"
            print(f"[sweep] {name} seed {seed}: {what} (see above)", flush=True)
            continue
        if code == 2:
            raise ValueError(f"[sweep] {name} seed {seed}: recipes.train stopped on a mistake it printed "
                             f"above (a setting, a file or a package); fix it and rerun the sweep. "
                             f"Command: {' '.join(cmd)}")
        if code != 0 and not (run_dir / "result.json").is_file():
            raise SweepRunFailed(f"[sweep] {name} seed {seed} failed (exit {code}); rerun the sweep to "
                                 f"resume it. Command: {' '.join(cmd)}")
    run_configs = {name: load_config(config, [*overrides, override("name", name)])
                   for config, name in zip(configs, names)}
    settings = {name: run_config.to_dict() for name, run_config in run_configs.items()}

    def trained_alike(name: str, run_dir: Path) -> bool:
        """Whether an earlier run of this sweep's config ``name`` has this sweep's settings."""
        try:
            changed = _changed_settings(run_dir, settings[name], ignore=_PER_RUN_KEYS,
                                        precision=resolved_precision(run_configs[name].fabric))
        except (OSError, ValueError) as err:  # ConfigError is a ValueError
            print(f"[sweep] {run_dir}: its config.yaml cannot be read ({err}), left out of the summary")
            return False
        if changed and not set(changed) - set(DATA_LOCATION):
            try:
                corpora.check(run_dir, run_configs[name].data, changed)
                return True
            except (OSError, ValueError) as err:  # e.g. the corpus is not at data.path
                print(f"{err}; left out of the summary")
                return False
        if changed:
            print(f"[sweep] {run_dir}: trained with other settings ({', '.join(changed)}), left out of the summary")
        return not changed

    rows = summarise(out_dir, names, seeds, trained_alike)
    # a config none of whose seeds has a result (every one diverged) is a hole in the study, not a
    # success: the summary is written, then the sweep exits with status 1 (from the command line)
    results = {name: [r for r in rows if r["config"] == name] for name in names}
    empty = [name for name, mine in results.items() if mine and not any(_counted(r) for r in mine)]
    if empty:
        raise SweepRunFailed(f"[sweep] no finished run of {', '.join(empty)} (see the statuses in "
                             f"{out_dir / 'summary.md'})")
    return rows


def _status(run_dir: Path) -> str:
    """The status in a run's ``result.json``; ``"unknown"`` where there is none that can be read (not
    done: a torn file, written by a version that wrote it in place, is trained again or resumed)."""
    try:
        return str(json.loads((run_dir / "result.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _a_result(r: dict) -> bool:
    """Whether ``r`` has what the summary reads of a ``result.json`` of recipes.train."""
    def number(value) -> bool:  # null: no evaluation yet
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    R = r.get("best_val_R", {})
    return (isinstance(r.get("step"), int) and "best_val_loss" in r and "final_val_loss" in r
            and number(r["best_val_loss"]) and number(r["final_val_loss"])
            and isinstance(R, dict) and all(number(value) for value in R.values()))


def _train(cmd: list[str]) -> int:
    """Run one ``recipes.train`` process to its end; return its exit status.

    It runs in a process group of its own (in the sweep's session), so that a stop reaches it once,
    from the sweep: SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal) sent to the sweep are
    passed on to it, the sweep waits while it saves ``last.pt`` and exits, then stops with the
    signal's status (130, 143, 129) by raising :class:`~recipes.common.Interrupted`; Ctrl-Z (SIGTSTP)
    suspends both, and they go on together. On Linux a sweep
    killed outright (SIGKILL) sends it SIGTERM (``PR_SET_PDEATHSIG``), so it never trains on
    unwatched. (Left to ``subprocess.call``, a SIGTERM killed the sweep alone and left its run
    training, and Ctrl-C killed the run 0.25 s into saving ``last.pt``.)
    """
    received, child = [], None

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)  # recipes.train takes a repeated SIGTERM or SIGHUP as the same stop

    def suspend(signum, frame):  # Ctrl-Z: the run stops with the sweep, and goes on when it does
        if child is not None:
            child.send_signal(signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until the shell's SIGCONT (fg, bg)
        signal.signal(signal.SIGTSTP, suspend)
        if child is not None:
            child.send_signal(signal.SIGCONT)

    stops = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    handlers = {signum: forward for signum in stops}
    if hasattr(signal, "SIGTSTP"):
        handlers[signal.SIGTSTP] = suspend
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                previous[signum] = signal.signal(signum, handler)
    posix = os.name == "posix"
    try:
        if posix:  # held back until `child` is set, then delivered to `forward`: none is lost or sent twice
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            child = subprocess.Popen(cmd, preexec_fn=(lambda: _as_sweep_child(stops)) if posix else None)
        finally:
            if posix:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Interrupted(received[0])
    return code


def _as_sweep_child(stops: list[int]) -> None:
    """In the forked training process, before it runs: its own process group (a terminal's Ctrl-C
    reaches the sweep alone, which passes it on once), the stop signals unblocked, and on Linux
    SIGTERM when the sweep dies."""
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # no prctl: the run outlives a SIGKILLed sweep, as any child would


def _checked_config(config: Path, overrides: list[str]) -> tuple[dict, RunConfig]:
    """The config file as read (for its ``name``) and the run's config with ``overrides``, once it has passed
    ``recipes.train``'s checks and its local corpus files, if any, are there; an error names the file."""
    try:
        run_config = load_config(config, overrides)
    except ConfigError as err:  # a YAML error names the file already
        raise ConfigError(str(err) if str(err).startswith(f"{config}: ") else f"{config}: {err}") from None
    try:  # else found when its turn came, hours in
        check_local_files(run_config.data.name, run_config.data.path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{config}: {err}") from None
    return load_yaml(config), run_config


def _warn_of_repeated_runs(configs: list[Path], run_configs: list[RunConfig]) -> None:
    """Warn of a config that trains the same runs as an earlier one of the sweep, differing only in what the sweep
    sets for each run (at the Phase A CPU presets' 4 layers, the reference's layers 6 and 7 are one layer): each
    seed's run would be trained twice."""
    unnamed = []  # (config, its RunConfig without the per-run keys); RunConfigs hold dicts: not hashable
    for config, run_config in zip(configs, run_configs):
        run = dataclasses.replace(run_config, name="run", seed=0, out_dir=None)  # _PER_RUN_KEYS
        same = next((earlier for earlier, other in unnamed if other == run), None)
        if same is not None:
            warnings.warn(f"configs: {config} trains the same runs as {same} (the two differ only in what the sweep "
                          "sets for each run: name, seed, out_dir); each seed's run is trained twice", RecipeWarning,
                          stacklevel=3)
        unnamed.append((config, run))


class SweepRunFailed(RuntimeError):
    """A run of the sweep stopped without a result (e.g. killed; rerunning the sweep resumes it), or a
    config of the sweep has no finished run (every seed diverged)."""


def _check_same_settings(run_dir: Path, config: Path, overrides: list[str], corpora: _Corpora | None) -> None:
    """A finished or interrupted run is only reused for the settings it was trained with (those
    that change only what a run shows, ``DISPLAY_KEYS``, or on how many devices, ``DEVICE_KEYS``,
    may differ). So may ``DATA_LOCATION``: for a finished run (``corpora`` given) when the corpus's
    text is the one its checkpoint records; a resumed run is checked by ``recipes.train --resume``."""
    wanted = load_config(config, overrides)
    # out_dir is the folder looked at: spelled otherwise (relative, from elsewhere) or moved, it is this run
    changed = _changed_settings(run_dir, wanted.to_dict(), ignore=("out_dir",),
                                precision=resolved_precision(wanted.fabric))
    if changed and not set(changed) - set(DATA_LOCATION):
        if corpora is not None:
            corpora.check(run_dir, wanted.data, changed)
        return
    if changed:
        raise ValueError(f"[sweep] {run_dir} was trained with other settings ({', '.join(changed)}); "
                         "give the sweep another out_dir, or delete that run to train it again")


class _Corpora:
    """Checks that runs trained with another ``DATA_LOCATION`` read the text this sweep's settings
    give (each corpus loaded once per sweep)."""

    def __init__(self) -> None:
        self._loaded: dict[DataConfig, Any] = {}  # frozen dataclasses: hashable
        self._passed: set[tuple[Path, DataConfig]] = set()  # the summary asks again about the runs checked

    def check(self, run_dir: Path, data: DataConfig, changed: list[str]) -> None:
        """Raise a ``ValueError`` naming ``run_dir`` unless its checkpoint records the sha256 of the
        corpus that ``data`` gives (``changed``: the run's ``DATA_LOCATION`` keys that differ)."""
        if (run_dir.resolve(), data) in self._passed:
            return
        moved = f"[sweep] {run_dir} was trained with its corpus elsewhere ({', '.join(changed)})"
        checkpoint = _run_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"{moved} and has no checkpoint recording the corpus's sha256 to check its text "
                             "against; give the sweep the data settings it was trained with, or delete that run")
        # mmap: the header only, not the weights; a torn or foreign file is an error naming it
        identity = read_checkpoint(checkpoint, moved, (), "give the sweep the data settings it was trained with, "
                                   "or delete that run", mmap=True).get("corpus")
        if identity is None:
            raise ValueError(f"{moved} and its {checkpoint.name} records no sha256 of the corpus (written by an "
                             "older version); give the sweep the data settings it was trained with")
        if data not in self._loaded:
            self._loaded[data] = load_corpus(data)
        changes = self._loaded[data].changes_since(identity)
        if changes:
            raise ValueError(f"{moved}, and not on this text: {'; '.join(changes)}; give the sweep the "
                             "corpus it was trained on, or another out_dir")
        self._passed.add((run_dir.resolve(), data))


def _changed_settings(run_dir: Path, wanted: dict, ignore: tuple[str, ...] = (),
                      precision: str | None = None) -> list[str]:
    """The dotted keys whose values in ``run_dir``'s ``config.yaml`` differ from ``wanted``, save what
    only changes what a run shows (``DISPLAY_KEYS``: logs, plots) or on how many devices it trains
    (``DEVICE_KEYS``: the same batches) and the keys in ``ignore``. ``fabric.precision`` counts as the
    same where the run's checkpoint records that it trained in ``precision`` (as ``--resume`` compares it:
    null and 32-true are one precision on a CPU)."""
    values = load_yaml(run_dir / "config.yaml")  # its errors name the file
    try:
        done = parse_saved_config(values).to_dict()
    except ConfigError as err:  # e.g. torn by a kill mid-write (older versions wrote it in place)
        raise ConfigError(f"{run_dir / 'config.yaml'}: {err}") from None
    changed = [key for key in changed_settings(done, wanted) if key not in (*DISPLAY_KEYS, *DEVICE_KEYS, *ignore)]
    header = _checkpoint_header(run_dir) if {"fabric.precision", "model.vocab_size"} & set(changed) else {}
    if "model.vocab_size" in changed and isinstance(header.get("tokenizer"), dict):
        try:  # an omitted model.vocab_size is the run's tokenizer's: spelled out, the same model
            vocab_size = tokenizer_from_dict(header["tokenizer"]).vocab_size
        except Exception:  # a foreign or older record: the settings are compared as written
            vocab_size = None
        if vocab_size is not None and "model.vocab_size" not in changed_settings(done, wanted, vocab_size):
            changed.remove("model.vocab_size")
    if "fabric.precision" in changed and precision is not None and header.get("trained_precision") == precision:
        changed.remove("fabric.precision")
    return changed


def _run_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir``'s ``last.pt``, else its ``best.pt``, else ``None``."""
    return next((run_dir / f for f in ("last.pt", "best.pt") if (run_dir / f).is_file()), None)


def _checkpoint_header(run_dir: Path) -> dict:
    """``run_dir``'s checkpoint, the weights memory-mapped, not read (``{}``: no checkpoint, or an unreadable one)."""
    checkpoint = _run_checkpoint(run_dir)
    if checkpoint is None:
        return {}
    try:
        return read_checkpoint(checkpoint, "checkpoint", (), "", mmap=True)
    except ValueError:  # a torn or foreign file: the settings are compared as written
        return {}


def _trained_precision(run_dir: Path) -> str | None:
    """The precision ``run_dir``'s checkpoint says it trained in (``None``: no checkpoint, an unreadable one,
    or one written before checkpoints recorded it)."""
    return _checkpoint_header(run_dir).get("trained_precision")


def summarise(out_dir: Path, names: list[str], seeds: list[int],
              trained_alike: Callable[[str, Path], bool] | None = None) -> list[dict]:
    """Write ``summary.csv`` (one row per run) and ``summary.md`` (mean ± 95% CI per config), with
    the validation R of each phase layer at the best evaluation (columns ``R_layer<i>``).

    Every run with a result under ``out_dir`` counts: ``names`` × ``seeds`` first, then what an
    earlier sweep into the same folder left (a rerun with fewer configs or seeds keeps them). An
    earlier run of a config in ``names`` counts only if ``trained_alike(name, run_dir)`` (when
    given): another seed trained with other settings would not belong in the same mean."""
    found: dict[str, set[int]] = {}
    for path in out_dir.glob("*/seed*/result.json"):
        if path.parent.name[len("seed"):].isdigit():
            found.setdefault(path.parent.parent.name, set()).add(int(path.parent.name[len("seed"):]))
    # configs of earlier sweeps: the seeds trained as their first one was (one mean is one setting)
    runs = {name: _alike_seeds(out_dir, name, sorted(found.get(name, set())))
            for name in sorted(set(found) - set(names))}
    for name in names:
        earlier = sorted(found.get(name, set()) - set(seeds))
        if trained_alike is not None:
            earlier = [seed for seed in earlier if trained_alike(name, out_dir / name / f"seed{seed}")]
        runs[name] = sorted({*seeds, *earlier})
    names = list(names) + sorted(set(runs) - set(names))  # this sweep's configs first
    rows = []
    for name in names:
        for seed in runs[name]:
            path = out_dir / name / f"seed{seed}" / "result.json"
            if _status(path.parent) != "unknown":
                r = json.loads(path.read_text())
                if not _a_result(r):  # e.g. another tool's result.json in the folder: not a run of recipes.train
                    print(f"[sweep] {path} is not a result of recipes.train, left out of the summary")
                    continue
                rows.append({"config": name, "seed": seed, "status": r["status"], "step": r["step"],
                             "best_val_loss": r["best_val_loss"], "final_val_loss": r["final_val_loss"],
                             **{f"R_{layer}": R for layer, R in r.get("best_val_R", {}).items()}})
    R_columns = sorted({key for r in rows for key in r if key.startswith("R_layer")},
                       key=lambda k: int(k[len("R_layer"):]))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["config", "seed", "status", "step", "best_val_loss",
                                               "final_val_loss"] + R_columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "summary.csv", table.getvalue())  # a kill mid-write keeps the last summary whole
    lines = ["| config | runs | best val loss (mean ± 95% CI) | val perplexity | val R at best, per phase layer | "
             "statuses |",
             "|:---|---:|---:|---:|:---|:---|"]
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        # a diverged run's best loss is from before it failed: listed in its status, not averaged
        counted = [r for r in mine if _counted(r)]
        mean, half = mean_ci95([r["best_val_loss"] for r in counted])
        ppl = f"{perplexity(mean):.2f}" if counted else "–"
        R_cells = []
        for column in R_columns:
            values = [r[column] for r in counted if column in r]
            if values:  # a run from before result.json recorded R has none
                R_mean, R_half = mean_ci95(values)
                count = "" if len(values) == len(counted) else f" ({len(values)} runs)"
                R_cells.append(f"{column[2:]} {R_mean:.3f}{_ci(R_half, 3)}{count}")
        statuses = ", ".join(sorted({r["status"] for r in mine})) or "not run"
        runs = f"{len(counted)}" if len(counted) == len(mine) else f"{len(counted)} of {len(mine)}"
        loss = f"{mean:.4f}{_ci(half, 4)}" if counted else "–"  # not "nan": no run to average
        cell = " ".join(name.split()).replace("|", "\\|")  # a | or a line break would end the row
        lines.append(f"| {cell} | {runs} | {loss} | {ppl} | {'; '.join(R_cells) or '–'} | "
                     f"{statuses} |")
    write_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _counted(row: dict) -> bool:
    """Whether a summary row's loss enters its config's mean: a finished or early-stopped run with a
    finite best loss (a diverged run's best loss is from before it failed)."""
    loss = row["best_val_loss"]
    return row["status"] in COUNTED and loss is not None and math.isfinite(loss)


def _alike_seeds(out_dir: Path, name: str, seeds: list[int]) -> list[int]:
    """Of the ``seeds`` of a config that is not in this sweep, those trained with the settings of the
    first one whose ``config.yaml`` reads; the others are left out of the summary, with a message. A
    run whose ``config.yaml`` does not read is kept (nothing to compare)."""
    reference, kept = None, []
    for seed in seeds:
        run_dir = out_dir / name / f"seed{seed}"
        try:
            if reference is None:
                reference = parse_saved_config(load_yaml(run_dir / "config.yaml")).to_dict()
                reference_precision, changed = _trained_precision(run_dir), []
            else:
                changed = _changed_settings(run_dir, reference, ignore=_PER_RUN_KEYS, precision=reference_precision)
        except (OSError, ValueError):  # ConfigError is a ValueError
            changed = []
        if changed:
            print(f"[sweep] {run_dir}: trained with other settings than {name}'s first seed ({', '.join(changed)}), "
                  "left out of the summary")
        else:
            kept.append(seed)
    return kept


def _ci(half: float, digits: int) -> str:
    """`` ± half`` (nothing for one value, whose interval is NaN)."""
    return "" if math.isnan(half) else f" ± {half:.{digits}f}"


def _read_sweep(path: str | Path) -> dict:
    """A sweep file's settings (``configs``, ``seeds``, ``out_dir``, ``overrides``), checked by
    :func:`_check_settings`; ``configs`` stay as written (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep: no such file {str(path)!r}")
    spec = read_yaml(path)  # a key given twice is an error, not the last one kept
    if spec is None:  # an empty file
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level ({', '.join(sorted(_SWEEP_KEYS))}), "
                          f"got {spec!r}")
    unknown = set(map(str, spec)) - _SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_SWEEP_KEYS))})")
    if "configs" not in spec:
        raise ConfigError(f"{path}: configs: missing (the run configs, paths relative to the sweep file)")
    _check_settings(spec)
    return spec


def _check_settings(settings: dict) -> None:
    """Raise :class:`ConfigError` naming the key unless each setting given is of its type:
    ``configs`` a non-empty list of paths, ``seeds`` a non-empty list of distinct integers in
    [0, 2**32) (a run's ``seed``), ``out_dir`` a path, ``overrides`` a list of ``key=value``
    strings (not for ``name``, ``seed`` or ``out_dir``, which the sweep sets for each run)."""
    def is_path(value):
        return isinstance(value, str) and value != ""

    if "configs" in settings:
        configs = settings["configs"]
        if not (isinstance(configs, list) and configs and all(map(is_path, configs))):
            raise ConfigError(f"configs: expected a non-empty list of config paths, got {configs!r}")
    if "seeds" in settings:
        seeds = settings["seeds"]
        if not (isinstance(seeds, list) and seeds and all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)):
            raise ConfigError(f"seeds: expected a non-empty list of integers in [0, 2**32), got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: must be distinct (each is one run), got {seeds}")
    if "out_dir" in settings and not is_path(settings["out_dir"]):
        raise ConfigError(f"out_dir: expected a directory path, got {settings['out_dir']!r}")
    if "overrides" in settings:
        overrides = settings["overrides"]
        if not isinstance(overrides, list):
            raise ConfigError(f"overrides: expected a list of key=value strings, got {overrides!r}")
        for item in overrides:
            if not (isinstance(item, str) and item.partition("=")[0] and "=" in item):
                raise ConfigError(f"overrides: expected key=value strings, e.g. train.max_iters=100, got {item!r}")
            if item.partition("=")[0] in _PER_RUN_KEYS:
                raise ConfigError(f"overrides: {item!r}: the sweep sets {', '.join(_PER_RUN_KEYS)} for each run "
                                  "(give the sweep's seeds and out_dir instead)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(prog="python -m recipes.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", nargs="?", help="sweep YAML (configs, seeds, out_dir, overrides)")
    parser.add_argument("--configs", nargs="+", help="run configs, instead of a sweep file")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="seeds of every config (default: the sweep file's seeds, else 1337)")
    parser.add_argument("--out", help="sweep directory (default: the sweep file's out_dir, else runs/<its name>; "
                                       "with --configs, runs/sweep)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides for every run, applied in order (a key given twice takes the last)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(rest)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:  # an unknown flag, as argparse says it (not a malformed override)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(args.overrides) + extra + overrides
    # a sweep file whatever its name (s.YAML, mysweep): overrides were split off above
    if args.sweep and ("=" not in args.sweep or Path(args.sweep).is_file()):
        if args.configs:
            parser.error("give a sweep YAML file or --configs, not both")
        spec = _read_sweep(args.sweep)
        base = Path(args.sweep).parent
        configs = spec.get("configs", [])
        seeds = args.seeds or spec.get("seeds", [1337])
        out_dir = args.out if args.out is not None else spec.get("out_dir", f"runs/{Path(args.sweep).stem}")
        overrides = spec.get("overrides", []) + overrides
    else:
        if args.sweep:
            overrides.insert(0, args.sweep)
        if not args.configs:
            parser.error("give a sweep YAML file or --configs")
        base, configs, seeds = Path(), args.configs, args.seeds or [1337]
        out_dir = args.out if args.out is not None else "runs/sweep"
    _check_settings({"configs": configs, "seeds": seeds, "out_dir": out_dir, "overrides": overrides})
    # no shell expands ~ inside a sweep file (nor after --out=): expanded as run configs expand theirs, so the
    # sweep looks for its runs (skip, resume, summary) where they train
    return run_sweep([base / Path(c).expanduser() for c in configs], seeds, Path(out_dir).expanduser(), overrides)


if __name__ == "__main__":
    run_cli(main, failures=(SweepRunFailed,))
