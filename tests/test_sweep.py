"""``python -m recipes.sweep``: its settings (sweep file and flags) are checked before anything runs.

The sweep's training runs themselves are tested in test_recipes.py (test_sweep_runs_skips_and_summarises).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
import yaml
from helpers import assert_same_data, config_values

from models.config import ConfigError
from recipes import RecipeWarning, sweep
from recipes.common import run_cli
from recipes.config import load_config
from recipes.data import prepare_corpus


@pytest.fixture
def launched(tmp_path, monkeypatch) -> list[list[str]]:
    """The ``recipes.train`` commands the sweep launches (none is run; each exits 0 without a result).

    The sweep runs in an empty working directory ``tmp_path / "cwd"``: its default out_dir goes there.
    """
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    calls = []
    monkeypatch.setattr("recipes.sweep._train", lambda cmd: calls.append(cmd) or 0)
    return calls


@pytest.fixture
def configs(tmp_path) -> Path:
    """A folder with two valid run configs, ``a.yaml`` and ``b.yaml`` (never trained here; b's learning rate is
    half a's, so that they are two runs, not one under two names)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, lr in (("a", 1e-3), ("b", 5e-4)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "train": {"max_iters": 2},
                                                             "optim": {"lr": lr, "min_lr": 1e-4}}))
    return folder


def cli_error(argv: list[str], capsys) -> str:
    """The one ``error:`` line ``python -m recipes.sweep ARGV`` prints, checking it exits with status 2."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: sweep.main(argv), failures=(sweep.SweepRunFailed,))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(("error: ", "python -m recipes.sweep: error: ")) and "Traceback" not in "".join(err)
    return err[-1]


def test_a_valid_sweep_file_launches_every_config_and_seed(tmp_path, configs, launched):
    spec = configs / "sweep.yaml"
    spec.write_text("configs: [a.yaml, b.yaml]\nseeds: [1, 0]\noverrides: [train.max_iters=3]\n"
                    f"out_dir: {tmp_path / 'out'}\n")
    sweep.main([str(spec)])
    run_dir = tmp_path / "out" / "{}" / "seed{}"
    assert [(c[4], c[-3:]) for c in launched] == [
        (str(configs / f"{name}.yaml"), [f'name="{name}"', f"seed={seed}", f'out_dir="{str(run_dir).format(name, seed)}"'])
        for name in "ab" for seed in (1, 0)]
    assert all("train.max_iters=3" in c for c in launched)
    assert "| a | 0 | – | – | – | not run |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_config_that_trains_the_same_runs_as_another_under_its_own_name_is_warned_of(tmp_path, configs, launched):
    (configs / "c.yaml").write_text(yaml.safe_dump(yaml.safe_load((configs / "a.yaml").read_text())
                                                   | {"name": "c", "seed": 5, "out_dir": str(tmp_path / "c")}))
    abc = ["--configs", *(str(configs / f"{n}.yaml") for n in "abc"), "--seeds", "1", "--out", str(tmp_path / "o")]
    with pytest.warns(RecipeWarning) as caught:
        sweep.main(abc)
    assert [str(w.message) for w in caught] == [
        f"configs: {configs / 'c.yaml'} trains the same runs as {configs / 'a.yaml'} (the two differ only in what "
        "the sweep sets for each run: name, seed, out_dir); each seed's run is trained twice"]
    assert len(launched) == 3  # warned of, not refused
    # with the overrides applied: the same learning rate makes a and b one run
    with pytest.warns(RecipeWarning, match=f"^configs: {configs / 'b.yaml'} trains the same runs as "):
        sweep.main(["--configs", str(configs / "a.yaml"), str(configs / "b.yaml"), "--out", str(tmp_path / "p"),
                    "optim.lr=0.002"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        sweep.main(["--configs", str(configs / "a.yaml"), str(configs / "b.yaml"), "--out", str(tmp_path / "q")])


def test_the_command_lines_seeds_out_and_overrides_win_over_the_sweep_files(tmp_path, configs, launched):
    spec = configs / "sweep.yaml"
    spec.write_text("configs: [a.yaml]\nseeds: [1, 2]\noverrides: [train.max_iters=3]\n"
                    f"out_dir: {tmp_path / 'file_out'}\n")
    sweep.main([str(spec), "--seeds", "5", "--out", str(tmp_path / "flag_out"), "train.max_iters=4"])
    assert len(launched) == 1
    config = load_config(launched[0][4], launched[0][5:])
    assert (config.seed, config.train.max_iters, config.run_dir) == (5, 4, tmp_path / "flag_out" / "a" / "seed5")
    assert not (tmp_path / "file_out").exists()


BAD_SWEEP_FILES = [
    # tracebacks before
    ("seeds: 5", "seeds: expected a non-empty list of integers in [0, 2**32), got 5"),
    ("seeds: null", "seeds: expected a non-empty list of integers in [0, 2**32), got None"),
    ("configs: null", "configs: expected a non-empty list of config paths, got None"),
    ("configs: [null]", "configs: expected a non-empty list of config paths, got [None]"),
    ("configs: [3]", "configs: expected a non-empty list of config paths, got [3]"),
    ("overrides: null", "overrides: expected a list of key=value strings, got None"),
    ("overrides: [{a: 1}]", "overrides: expected key=value strings, e.g. train.max_iters=100, got {'a': 1}"),
    ("out_dir: [a]", "out_dir: expected a directory path, got ['a']"),
    ("configs: [a.yaml", "sweep.yaml: not valid YAML: "),
    ("configs: [caf\xe9.yaml]", "sweep.yaml: not UTF-8 text (invalid continuation byte at byte 13)"),
    # misleading before (a string iterated per character, a list or scalar read as keys)
    ("configs: a.yaml", "configs: expected a non-empty list of config paths, got 'a.yaml'"),
    ("overrides: train.max_iters=2", "overrides: expected a list of key=value strings, got 'train.max_iters=2'"),
    ("[a.yaml]", "sweep.yaml: expected a mapping at the top level (configs, out_dir, overrides, seeds), got"),
    ("hello", "sweep.yaml: expected a mapping at the top level (configs, out_dir, overrides, seeds), got 'hello'"),
    ("", "sweep.yaml: configs: missing"),
    ("seed: [1, 2]", "sweep.yaml: unknown key(s) seed (known: configs, out_dir, overrides, seeds)"),  # for seeds
    # silently accepted before
    ("seeds: []", "seeds: expected a non-empty list of integers in [0, 2**32), got []"),
    ("configs: []", "configs: expected a non-empty list of config paths, got []"),
    ("out_dir: ''", "out_dir: expected a directory path, got ''"),
    ("overrides: [seed=3]", "overrides: 'seed=3': the sweep sets name, seed, out_dir for each run"),
    # checked only by the first run's recipes.train before, after creating the sweep's directory
    ("seeds: [a]", "seeds: expected a non-empty list of integers in [0, 2**32), got ['a']"),
    ("seeds: [1.5]", "seeds: expected a non-empty list of integers in [0, 2**32), got [1.5]"),
    ("seeds: [true]", "seeds: expected a non-empty list of integers in [0, 2**32), got [True]"),
    ("seeds: [-1]", "seeds: expected a non-empty list of integers in [0, 2**32), got [-1]"),
    ("seeds: [4294967296]", "seeds: expected a non-empty list of integers in [0, 2**32), got [4294967296]"),
    ("seeds: [1, 1]", "seeds: must be distinct (each is one run), got [1, 1]"),
    ("overrides: [train.max_iter=3]", "a.yaml: train.max_iter: unknown key"),
    ("configs: [a.yaml, missing.yaml]", "config: no such file"),
    ("configs: [a.yaml, orphan.yaml]", "orphan.yaml: extends: no such file"),
    ("configs: [a.yaml, broken.yaml]", "broken.yaml: not valid YAML: "),  # said once, not 'broken.yaml: broken.yaml:'
]


@pytest.mark.parametrize("text, message", BAD_SWEEP_FILES, ids=[t or "empty" for t, _ in BAD_SWEEP_FILES])
def test_sweep_file_mistakes_are_one_error_line_before_anything_is_created(tmp_path, configs, launched, capsys,
                                                                        text, message):
    values = yaml.safe_load(text) if text not in ("configs: [a.yaml", "configs: [caf\xe9.yaml]") else None
    if isinstance(values, dict):  # a valid sweep but for the key under test
        text = yaml.safe_dump({"configs": ["a.yaml"], "out_dir": str(tmp_path / "out"), **values})
    (configs / "orphan.yaml").write_text("extends: gone.yaml\n")
    (configs / "broken.yaml").write_text("train: {max_iters: 3\n")
    # latin-1: a file saved in another encoding (it was read in the locale's, or a UnicodeDecodeError traceback)
    (configs / "sweep.yaml").write_bytes(text.encode("latin-1"))
    error = cli_error([str(configs / "sweep.yaml")], capsys)
    assert error.startswith(f"error: {message}") or error.startswith(f"error: {configs / message}"), error
    assert not launched and not (tmp_path / "out").exists() and not any((tmp_path / "cwd").iterdir())


def test_a_key_given_twice_in_the_sweep_file_is_an_error(tmp_path, configs, launched, capsys):
    """PyYAML keeps the last of two equal keys silently: here the seeds 1 and 2 would never run."""
    (configs / "sweep.yaml").write_text(f"configs: [a.yaml]\nout_dir: {tmp_path / 'out'}\nseeds: [1, 2]\nseeds: [3]\n")
    error = cli_error([str(configs / "sweep.yaml")], capsys)
    assert "not valid YAML" in error and "found the key 'seeds' twice (first on line 3)" in error, error
    assert not launched and not (tmp_path / "out").exists()


def test_a_missing_sweep_file_is_named(tmp_path, launched, capsys):
    assert cli_error([str(tmp_path / "nope.yaml")], capsys) == f"error: sweep: no such file '{tmp_path / 'nope.yaml'}'"


BAD_FLAGS = [
    (["--seeds", "-1"], "error: seeds: expected a non-empty list of integers in [0, 2**32), got [-1]"),
    (["--seeds", "1", "1"], "error: seeds: must be distinct (each is one run), got [1, 1]"),
    (["--seeds", "a"], "python -m recipes.sweep: error: argument --seeds: invalid int value: 'a'"),
    (["--out", ""], "error: out_dir: expected a directory path, got ''"),
    (["seed=4"], "error: overrides: 'seed=4': the sweep sets name, seed, out_dir for each run"),
    (["train.max_iter=3"], "error: a.yaml: train.max_iter: unknown key"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
@pytest.mark.parametrize("given", ["file", "--configs"])
def test_command_line_flags_are_checked_like_the_sweep_file(tmp_path, configs, launched, capsys, monkeypatch,
                                                            given, flags, message):
    monkeypatch.chdir(configs)  # --configs paths are relative to the working directory
    (configs / "sweep.yaml").write_text(f"configs: [a.yaml]\nout_dir: {tmp_path / 'out'}\n")
    argv = ["sweep.yaml"] if given == "file" else ["--configs", "a.yaml"]
    if given == "--configs" and "--out" not in flags:  # given twice, --out would be that error
        argv += ["--out", str(tmp_path / "out")]
    assert cli_error(argv + flags, capsys).startswith(message.replace("a.yaml", str(Path("a.yaml"))))
    assert not launched and not (tmp_path / "out").exists() and not (configs / "runs").exists()
    assert sorted(p.name for p in configs.iterdir()) == ["a.yaml", "b.yaml", "sweep.yaml"]


def test_a_sweep_file_with_configs_flag_is_an_error_not_a_flag_ignored(configs, launched, capsys):
    (configs / "sweep.yaml").write_text("configs: [a.yaml]\n")
    assert cli_error([str(configs / "sweep.yaml"), "--configs", str(configs / "b.yaml")], capsys).endswith(
        "give a sweep YAML file or --configs, not both")
    assert not launched


@pytest.mark.parametrize("name", ["sweep.YAML", "my_sweep", "lr=1e-3.yaml"])
def test_a_sweep_file_named_otherwise_is_read(tmp_path, configs, launched, name):
    # only names ending in lowercase .yaml/.yml were read: anything else was taken for an override, and the
    # sweep said "give a sweep YAML file or --configs" to the user who had given one
    (configs / name).write_text(f"configs: [a.yaml]\nseeds: [4]\nout_dir: {tmp_path / 'out'}\n")
    sweep.main([str(configs / name)])
    assert [load_config(run[4], run[5:]).run_dir for run in launched] == [tmp_path / "out" / "a" / "seed4"]


def test_a_sweep_file_without_seeds_or_out_dir_runs_seed_1337_in_runs_named_after_it(configs, launched,
                                                                                     monkeypatch):
    monkeypatch.chdir(configs)
    (configs / "study.yaml").write_text("configs: [a.yaml]\n")
    sweep.main(["study.yaml"])
    assert [load_config(run[4], run[5:]).run_dir for run in launched] == [Path("runs/study/a/seed1337")]


def test_an_unknown_flag_is_reported_as_one_not_as_a_bad_override(configs, launched, capsys):
    (configs / "sweep.yaml").write_text("configs: [a.yaml]\n")
    assert cli_error([str(configs / "sweep.yaml"), "train.max_iters=3", "--bogus", "4"], capsys) == (
        "python -m recipes.sweep: error: unrecognized arguments: --bogus")
    assert not launched


def test_run_directories_and_names_reach_the_run_as_they_are(tmp_path, configs, launched):
    """The sweep passed ``out_dir=PATH`` unquoted, which recipes.train reads as YAML: a path with " #"
    was cut at the comment (the run trained outside the sweep's folder), and a config named ``1.yaml``
    became the number 1."""
    (configs / "1.yaml").write_text("train: {max_iters: 2}\n")
    out = tmp_path / "out #x: y"
    sweep.run_sweep([configs / "1.yaml"], [3], out)
    config = load_config(launched[0][4], launched[0][5:])
    assert config.name == "1" and config.run_dir == out / "1" / "seed3"


def test_a_tilde_in_the_sweep_file_is_the_home_folder_for_the_sweep_as_for_its_runs(tmp_path, configs, launched,
                                                                                     monkeypatch):
    """No shell expands ``~`` in a sweep file. The runs expanded it (out_dir) and the sweep did not: they trained in
    $HOME/... while the sweep made ./~/..., looked for finished runs and wrote its summary there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = configs / "sweep.yaml"
    spec.write_text("configs: [~/a.yaml]\nseeds: [1]\nout_dir: ~/sweeps/x\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "a.yaml").write_text((configs / "a.yaml").read_text())
    sweep.main([str(spec)])
    config = load_config(launched[0][4], launched[0][5:])
    assert launched[0][4] == str(tmp_path / "home" / "a.yaml")
    assert config.run_dir == tmp_path / "home" / "sweeps" / "x" / "a" / "seed1"
    assert (tmp_path / "home" / "sweeps" / "x" / "summary.md").is_file() and not Path("~").exists()


def test_run_sweep_checks_every_run_before_creating_or_launching_any(tmp_path, configs, launched):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"b.yaml: model.n_layer: unknown key"):
        (configs / "b.yaml").write_text(yaml.safe_dump({"name": "b", "model": {"n_layer": 2}}))
        sweep.run_sweep([configs / "a.yaml", configs / "b.yaml"], [1], out)
    with pytest.raises(ConfigError, match=r"seeds: expected a non-empty list of integers in \[0, 2\*\*32\)"):
        sweep.run_sweep([configs / "a.yaml"], [1, -1], out)
    (configs / "b.yaml").write_text(yaml.safe_dump({"name": ["b"]}))  # not a name: neither hashed nor a folder
    with pytest.raises(ConfigError, match=r"b.yaml: name: expected str, got \['b'\]"):
        sweep.run_sweep([configs / "a.yaml", configs / "b.yaml"], [1], out)
    (configs / "b.yaml").write_text(yaml.safe_dump({"name": "a"}))  # both would train into out/a/seed1
    with pytest.raises(ValueError, match=r"^configs: run names must be distinct, got \['a', 'a'\]$"):
        sweep.run_sweep([configs / "a.yaml", configs / "b.yaml"], [1], out)
    assert not launched and not out.exists()


def test_the_summary_reports_R_at_the_best_evaluation_per_layer(tmp_path):
    """From result.json files alone: R at the best evaluation (not the last), layers in numeric order,
    a run written before result.json recorded R counted in the loss but not in R."""
    runs = {("a", 1): (1.0, {"layer2": 0.2, "layer10": 0.6}, {"layer2": 0.9, "layer10": 0.9}),
            ("a", 2): (1.2, {"layer2": 0.4, "layer10": 0.8}, {"layer2": 0.9, "layer10": 0.9}),
            ("a", 3): (1.1, None, None),
            ("b", 1): (2.0, {}, {})}
    for (name, seed), (loss, best_R, final_R) in runs.items():
        run = tmp_path / name / f"seed{seed}"
        run.mkdir(parents=True)
        result = {"status": "finished", "step": 5, "best_val_loss": loss, "final_val_loss": loss + 0.5}
        if best_R is not None:
            result |= {"best_val_R": best_R, "final_val_R": final_R}
        (run / "result.json").write_text(json.dumps(result))
    sweep.summarise(tmp_path, ["a", "b"], [1, 2, 3])
    lines = (tmp_path / "summary.md").read_text().splitlines()
    loss_mean, loss_half = sweep.mean_ci95([1.0, 1.2, 1.1])
    R2, R10 = sweep.mean_ci95([0.2, 0.4]), sweep.mean_ci95([0.6, 0.8])
    assert lines[2] == (f"| a | 3 | {loss_mean:.4f} ± {loss_half:.4f} | {math.exp(loss_mean):.2f} | "
                        f"layer2 {R2[0]:.3f} ± {R2[1]:.3f} (2 runs); layer10 {R10[0]:.3f} ± {R10[1]:.3f} (2 runs) | "
                        "finished |")
    assert lines[3] == f"| b | 1 | 2.0000 | {math.exp(2.0):.2f} | – | finished |"
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-2:] == ["R_layer2", "R_layer10"]
    assert [(r["R_layer2"], r["R_layer10"]) for r in rows] == [("0.2", "0.6"), ("0.4", "0.8"), ("", ""), ("", "")]


@pytest.mark.parametrize("cut", ["summary.csv", "summary.md"])
def test_a_summary_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch, cut):
    run = tmp_path / "a" / "seed1"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "finished", "step": 5, "best_val_loss": 1.0,
                                                 "final_val_loss": 1.5}))
    sweep.summarise(tmp_path, ["a"], [1])
    before = {name: (tmp_path / name).read_text() for name in ("summary.md", "summary.csv")}
    (run / "result.json").write_text(json.dumps({"status": "finished", "step": 9, "best_val_loss": 0.5,
                                                 "final_val_loss": 0.7}))
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == cut:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr("recipes.files.os.replace", replace)
    with pytest.raises(OSError, match="disk full"):
        sweep.summarise(tmp_path, ["a"], [1])
    assert (tmp_path / cut).read_text() == before[cut]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "summary.csv", "summary.md"]


def test_the_mean_counts_finished_and_early_stopped_runs_only(tmp_path):
    # an early-stopped run is a complete result (its best.pt is the best it reached); a diverged one is not
    for seed, (status, loss) in enumerate([("finished", 1.0), ("early_stopped", 1.2), ("diverged", 0.5)]):
        run = tmp_path / "a" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": status, "step": 5, "best_val_loss": loss,
                                                     "final_val_loss": loss, "best_val_R": {}}))
    sweep.summarise(tmp_path, ["a"], [0, 1, 2])
    mean, half = sweep.mean_ci95([1.0, 1.2])
    assert (tmp_path / "summary.md").read_text().splitlines()[2] == (
        f"| a | 2 of 3 | {mean:.4f} ± {half:.4f} | {math.exp(mean):.2f} | – | diverged, early_stopped, finished |")


def test_a_counted_status_without_a_finite_best_loss_is_listed_not_averaged(tmp_path):
    # e.g. a result.json written by hand or by an older version: no loss (null) or NaN is not a number to average
    for seed, (status, loss) in enumerate([("finished", 1.0), ("finished", None), ("early_stopped", math.nan)]):
        run = tmp_path / "a" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": status, "step": 5, "best_val_loss": loss,
                                                     "final_val_loss": loss, "best_val_R": {}}))
    sweep.summarise(tmp_path, ["a"], [0, 1, 2])
    assert (tmp_path / "summary.md").read_text().splitlines()[2] == (
        f"| a | 1 of 3 | 1.0000 | {math.exp(1.0):.2f} | – | early_stopped, finished |")


def test_folders_other_than_seed_numbers_are_not_runs_of_the_summary(tmp_path):
    # a folder a user named seed_old or seedling beside the runs: int("_old") crashed the summary
    for folder in ("seed1", "seed_old", "seedling", "seed"):
        run = tmp_path / "a" / folder
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": "finished", "step": 5, "best_val_loss": 1.0,
                                                     "final_val_loss": 1.0}))
    rows = sweep.summarise(tmp_path, ["a"], [1])
    assert [(r["config"], r["seed"]) for r in rows] == [("a", 1)]


def test_a_result_json_of_another_tool_is_left_out_of_the_summary(tmp_path, capsys):
    # another experiment's result.json under out_dir (a status, none of a run's numbers): a KeyError, no summary
    for folder, result in (("a", {"status": "finished", "step": 5, "best_val_loss": 1.0, "final_val_loss": 1.5}),
                           ("other", {"status": "finished", "accuracy": 0.9}),
                           ("odd", {"status": "finished", "step": 5, "best_val_loss": "low", "final_val_loss": 1.0})):
        (tmp_path / folder / "seed1").mkdir(parents=True)
        (tmp_path / folder / "seed1" / "result.json").write_text(json.dumps(result))
    rows = sweep.summarise(tmp_path, ["a"], [1])
    assert [(r["config"], r["best_val_loss"]) for r in rows] == [("a", 1.0)]
    out = capsys.readouterr().out
    assert all(f"[sweep] {tmp_path / name / 'seed1' / 'result.json'} is not a result of recipes.train, left out "
               "of the summary" in out for name in ("other", "odd"))
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "summary.md").is_file()


@pytest.mark.parametrize("name, where", [("tiny-shakespeare", "typo.txt"),  # no such file
                                          ("shakespeare", "a.yaml"),  # a file where a folder of plays is needed
                                          ("wikitext-2", "."),  # a folder without the corpus's files
                                          ("text", "plays")])  # a folder where a text file is needed
def test_a_config_whose_local_data_is_missing_is_refused_before_any_run(tmp_path, configs, launched, name, where):
    # it was found when that config's turn came, after every earlier config's runs had trained
    (tmp_path / "plays").mkdir()
    path = configs / where if where == "a.yaml" else tmp_path / where
    (configs / "b.yaml").write_text(yaml.safe_dump({"name": "b", "data": {"name": name, "path": str(path)}}))
    with pytest.raises(FileNotFoundError) as training:  # the message the run would have given
        prepare_corpus(name, path, cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(FileNotFoundError) as sweeping:
        sweep.run_sweep([configs / "a.yaml", configs / "b.yaml"], [1], tmp_path / "out")
    assert str(sweeping.value) == f"{configs / 'b.yaml'}: {training.value}"
    assert str(path) in str(sweeping.value)
    assert not launched and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_stopped_sweep_says_how_to_go_on(tmp_path, configs, monkeypatch, capsys):
    # the run's own message says "continue with --resume", which the sweep does not take
    import signal
    from recipes.common import Interrupted

    def stopped(cmd):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr("recipes.sweep._train", stopped)
    with pytest.raises(Interrupted):
        sweep.run_sweep([configs / "a.yaml"], [1], tmp_path / "out")
    assert capsys.readouterr().out.endswith("[sweep] a seed 1: stopped; rerun the same sweep command to resume it\n")


def test_an_interrupted_run_is_resumed_and_a_new_one_trained(tmp_path, configs, launched):
    out = tmp_path / "out"
    interrupted = out / "a" / "seed1"
    interrupted.mkdir(parents=True)
    (interrupted / "last.pt").write_bytes(b"")  # only its existence is read here
    settings = load_config(configs / "a.yaml", ["name=a", "seed=1", f"out_dir={interrupted}"])
    (interrupted / "config.yaml").write_text(yaml.safe_dump(settings.to_dict()))
    sweep.run_sweep([configs / "a.yaml"], [1, 2], out)
    assert [(c[-2:] if c[-1] == "--resume" else c[-1:]) for c in launched] == [
        [f'out_dir="{interrupted}"', "--resume"], [f'out_dir="{out / "a" / "seed2"}"']]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_is_passed_to_the_training_process_and_the_sweep_waits_for_its_save(tmp_path, signum,
                                                                                  usual_signal_handlers):
    """SIGTERM to the sweep killed the sweep alone (its run trained on, unwatched), and Ctrl-C killed the
    run 0.25 s into saving last.pt. Now the run, in a process group of its own, gets the signal from the
    sweep, which waits for it and then stops with the signal's status."""
    import os
    import signal
    import sys
    import threading
    import time

    from recipes.common import Interrupted

    signum = getattr(signal, signum)
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    child = (f"import os, pathlib, signal, sys, time\n"
             f"def stop(signum, frame):\n"
             f"    time.sleep(0.5)  # a slow save\n"
             f"    pathlib.Path({str(saved)!r}).write_text(str(signum))\n"
             f"    sys.exit(128 + signum)\n"
             f"for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
             f"    signal.signal(s, stop)\n"
             f"pathlib.Path({str(ready)!r}).write_text(str(os.getpgrp()))\n"
             f"time.sleep(60)\n")

    def send():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signum)  # to the sweep only, as `kill PID` does

    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    threading.Thread(target=send, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(Interrupted) as stop:
        sweep._train([sys.executable, "-c", child])
    after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    assert stop.value.signum == signum
    assert saved.read_text() == str(int(signum))  # the run got the signal and finished its save first
    assert int(ready.read_text()) != os.getpgrp()  # its own process group: a terminal's Ctrl-C reaches the sweep only
    assert time.monotonic() - start < 30
    assert after == handlers  # restored


def test_a_diverged_run_is_called_diverged_and_has_no_mean(tmp_path, configs, monkeypatch, capsys):
    """It was reported as "finished, then exited with 1", and its summary row showed "nan"."""
    def diverge(cmd):
        run_dir = Path(json.loads(cmd[-1].partition("=")[2]))  # out_dir="..."
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "a", "train": {"max_iters": 2}}))
        (run_dir / "result.json").write_text(json.dumps({"status": "diverged", "step": 1, "best_val_loss": None,
                                                         "final_val_loss": None, "best_val_R": {}}))
        return 1

    monkeypatch.setattr("recipes.sweep._train", diverge)
    # the config has no result at all: the summary is written, then the sweep fails (exit 1)
    with pytest.raises(sweep.SweepRunFailed, match=r"^\[sweep\] no finished run of a \(see the statuses in "):
        sweep.run_sweep([configs / "a.yaml"], [1], tmp_path / "out")
    out = capsys.readouterr().out
    assert "[sweep] a seed 1: diverged (see above)" in out and "finished" not in out
    assert "| a | 0 of 1 | – | – | – | diverged |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_run_killed_without_a_result_stops_the_sweep_with_its_command(tmp_path, configs, monkeypatch, capsys):
    # e.g. the kernel's OOM killer: no result.json; the runs after it are not launched, and the sweep says how
    # to go on (rerun it: the killed run resumes from its last.pt, if it wrote one)
    launched = []

    def killed_second(cmd):
        launched.append(cmd)
        return -9 if len(launched) == 2 else 0

    monkeypatch.setattr("recipes.sweep._train", killed_second)
    argv = ["--configs", str(configs / "a.yaml"), str(configs / "b.yaml"), "--seeds", "1", "2",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: sweep.main(argv), failures=(sweep.SweepRunFailed,))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(launched) == 2 and "Traceback" not in "".join(err)
    assert err[-1].startswith("error: [sweep] a seed 2 failed (exit -9); rerun the sweep to resume it. Command: ")
    assert err[-1].endswith(" ".join(launched[1])) and "seed=2" in err[-1]
    assert not (tmp_path / "out" / "summary.md").exists()


def test_a_sweep_with_a_finished_seed_in_every_config_succeeds_beside_a_diverged_one(tmp_path, configs,
                                                                                     monkeypatch):
    def one_diverges(cmd):
        run_dir = Path(json.loads(cmd[-1].partition("=")[2]))  # out_dir="..."
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "a", "train": {"max_iters": 2}}))
        status, loss = ("diverged", None) if run_dir.name == "seed1" else ("finished", 1.5)
        (run_dir / "result.json").write_text(json.dumps({"status": status, "step": 2, "best_val_loss": loss,
                                                         "final_val_loss": loss, "best_val_R": {}}))
        return 1 if status == "diverged" else 0

    monkeypatch.setattr("recipes.sweep._train", one_diverges)
    rows = sweep.run_sweep([configs / "a.yaml"], [1, 2], tmp_path / "out")
    assert [r["status"] for r in rows] == ["diverged", "finished"]


def start_sweep_of(child: str):
    """A sweep process (``sweep._train``, from the checkout) whose training run is ``python -c child``."""
    import os
    import subprocess
    import sys
    script = f"from recipes import sweep; sweep._train({[sys.executable, '-c', child]!r})"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # its own process group, whose parent (this process) is in the same session: never an orphaned group,
    # where the kernel discards stop signals (as for pytest run by a shell that has exited, e.g. `cmd &`)
    return subprocess.Popen([sys.executable, "-c", script], cwd=checkout, preexec_fn=os.setpgrp)


def wait_for(condition, seconds: float) -> bool:
    import time
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_sweep_killed_outright_stops_its_training_process(tmp_path):
    """Killed with SIGKILL (no handler runs), the sweep cannot pass a stop on: the run gets SIGTERM from the
    kernel (Linux's parent-death signal) instead of training on unwatched, holding its run directory."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = (f"import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda s, f: (pathlib.Path({str(stopped)!r}).write_text('TERM'), "
             f"sys.exit(143)))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\n"
             f"time.sleep(60)\n")
    parent = start_sweep_of(child)
    try:
        assert wait_for(ready.exists, 30)
        parent.kill()
        parent.wait()
        assert wait_for(stopped.exists, 10) and stopped.read_text() == "TERM"
    finally:
        parent.kill()


def test_ctrl_z_suspends_the_training_process_with_the_sweep(tmp_path):
    """Ctrl-Z reaches the sweep's process group, not its run's: the run trained on while the sweep was stopped."""
    import signal
    import time

    ticks = tmp_path / "ticks"
    child = (f"import time\n"
             f"with open({str(ticks)!r}, 'a') as f:\n"
             f"    for _ in range(600):\n"
             f"        f.write('.'); f.flush(); time.sleep(0.02)\n")
    parent = start_sweep_of(child)

    def size_after(seconds):
        time.sleep(seconds)
        return ticks.stat().st_size if ticks.exists() else 0

    try:
        assert wait_for(lambda: size_after(0) >= 5, 30)
        parent.send_signal(signal.SIGTSTP)  # as the terminal does, to the sweep
        stopped = size_after(0.5)
        assert size_after(0.5) == stopped  # the run is suspended too
        parent.send_signal(signal.SIGCONT)  # fg / bg
        assert size_after(0.5) > stopped  # and goes on with the sweep
    finally:
        parent.kill()
        parent.wait()


def test_a_torn_result_json_is_not_taken_for_a_done_run(tmp_path, configs, launched):
    """A result.json cut short (older versions wrote it in place; a kill midway) was "done, skipped" on
    every rerun, and the summary then failed on it, naming no file."""
    run_dir = tmp_path / "out" / "a" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "a", "train": {"max_iters": 2}}))
    (run_dir / "result.json").write_text('{"name": "a", "seed": 1, "status": "fini')
    sweep.run_sweep([configs / "a.yaml"], [1], tmp_path / "out")
    assert len(launched) == 1  # trained again, not skipped
    assert "| a | 0 | – | – | – | not run |" in (tmp_path / "out" / "summary.md").read_text()
    (run_dir / "result.json").write_text('["finished"]')  # JSON, but not a result: not done either
    sweep.run_sweep([configs / "a.yaml"], [1], tmp_path / "out")
    assert len(launched) == 2


def test_a_torn_config_yaml_is_named(tmp_path, configs, launched):
    run_dir = tmp_path / "out" / "a" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    (run_dir / "config.yaml").write_text("optim: 3\n")  # valid YAML, not a config: named too
    with pytest.raises(ConfigError, match=f"^{run_dir / 'config.yaml'}: "):
        sweep.run_sweep([configs / "a.yaml"], [1], tmp_path / "out")


def _finished_run(run_dir: Path, config: Path, loss: float, overrides: list[str] = ()) -> None:
    """A run folder as recipes.train leaves it: config.yaml (with ``overrides``) and result.json."""
    run_dir.mkdir(parents=True)
    values = load_config(config, [*overrides, f"out_dir={run_dir}"]).to_dict()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(values))
    (run_dir / "result.json").write_text(json.dumps({"status": "finished", "step": 2, "best_val_loss": loss,
                                                     "final_val_loss": loss}))


def test_an_earlier_sweeps_config_is_summarised_over_the_seeds_trained_alike(tmp_path, configs, capsys):
    # a config not in this sweep took every seed in its folder: runs of 2 and 6 iterations in one mean ± CI
    out = tmp_path / "out"
    _finished_run(out / "b" / "seed1", configs / "b.yaml", 1.0)
    _finished_run(out / "b" / "seed2", configs / "b.yaml", 1.2)
    _finished_run(out / "b" / "seed3", configs / "b.yaml", 0.5, ["train.max_iters=6"])
    rows = sweep.summarise(out, ["a"], [1])
    assert [(r["config"], r["seed"]) for r in rows] == [("b", 1), ("b", 2)]
    assert "b/seed3: trained with other settings than b's first seed (train.max_iters)" in capsys.readouterr().out
    mean, half = sweep.mean_ci95([1.0, 1.2])
    assert f"| b | 2 | {mean:.4f} ± {half:.4f} |" in (out / "summary.md").read_text()


def test_a_huge_loss_and_a_name_with_a_bar_keep_the_summary_whole(tmp_path):
    # exp(14813284.0) raised OverflowError (and every rerun did again); a | in a name split its cell
    for name, loss in (("lr|1e-3", 2.0), ("hot", 14813284.0)):
        run = tmp_path / name / "seed1"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": "finished", "step": 5, "best_val_loss": loss,
                                                     "final_val_loss": loss}))
    sweep.summarise(tmp_path, ["lr|1e-3", "hot"], [1])
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[2] == f"| lr\\|1e-3 | 1 | 2.0000 | {math.exp(2.0):.2f} | – | finished |"
    assert lines[3] == "| hot | 1 | 14813284.0000 | inf | – | finished |"


def test_runs_trained_with_other_settings_are_found_before_anything_trains(tmp_path, configs, launched):
    # the check came when the loop reached the run: b's seeds trained (hours), then the sweep stopped at a's
    out = tmp_path / "out"
    _finished_run(out / "a" / "seed1", configs / "a.yaml", 1.0, ["name=a", "seed=1", "train.max_iters=5"])
    with pytest.raises(ValueError, match=r"a/seed1 was trained with other settings \(train.max_iters\)"):
        sweep.run_sweep([configs / "b.yaml", configs / "a.yaml"], [1, 2], out)
    assert not launched and not (out / "b").exists()


def test_a_null_tokenizer_and_the_corpuss_own_level_are_the_same_settings(tmp_path, configs, launched):
    # a run trained with data.tokenizer char (the embedded corpus's level) was "trained with other settings"
    # than a config leaving it null, which reads the same characters
    out = tmp_path / "out"
    _finished_run(out / "a" / "seed1", configs / "a.yaml", 1.0, ["name=a", "seed=1", "data.tokenizer=char"])
    sweep.run_sweep([configs / "a.yaml"], [1], out)
    assert not launched  # finished with the same settings: skipped
    _finished_run(out / "a" / "seed2", configs / "a.yaml", 1.0, ["name=a", "seed=2", "data.tokenizer=byte"])
    with pytest.raises(ValueError, match=r"a/seed2 was trained with other settings \(data.tokenizer\)"):
        sweep.run_sweep([configs / "a.yaml"], [2], out)


def test_model_vocab_size_spelled_out_as_the_runs_tokenizers_is_the_same_settings(tmp_path, configs, launched):
    # an omitted vocab_size is the tokenizer's (as --resume compares it): spelled out it was "other settings"
    from recipes.data import CharTokenizer

    out = tmp_path / "out"
    tokenizer = CharTokenizer.from_text("abcde")
    for seed in (1, 2):
        _finished_run(out / "a" / f"seed{seed}", configs / "a.yaml", 1.0, ["name=a", f"seed={seed}"])
    torch.save({"tokenizer": tokenizer.to_dict()}, out / "a" / "seed1" / "last.pt")
    sweep.run_sweep([configs / "a.yaml"], [1], out, ["model.vocab_size=5"])
    assert not launched  # finished with the same settings: skipped
    with pytest.raises(ValueError, match=r"a/seed1 was trained with other settings \(model.vocab_size\)"):
        sweep.run_sweep([configs / "a.yaml"], [1], out, ["model.vocab_size=6"])
    with pytest.raises(ValueError, match=r"a/seed2 was trained with other settings \(model.vocab_size\)"):
        sweep.run_sweep([configs / "a.yaml"], [2], out, ["model.vocab_size=5"])  # no checkpoint: as written
    assert not launched


def test_precision_null_and_the_precision_it_trained_in_are_the_same_settings(tmp_path, configs, launched, capsys):
    # as --resume compares them: a run of precision null on a CPU trained in 32-true, which the sweep refused
    out = tmp_path / "out"
    cpu = ["fabric.accelerator=cpu"]
    for seed, trained in ((1, "32-true"), (2, "bf16-true"), (3, None)):
        _finished_run(out / "a" / f"seed{seed}", configs / "a.yaml", 1.0, ["name=a", f"seed={seed}", *cpu])
        torch.save({"trained_precision": trained} if trained else {}, out / "a" / f"seed{seed}" / "last.pt")
    sweep.run_sweep([configs / "a.yaml"], [1], out, [*cpu, "fabric.precision=32-true"])
    assert not launched and "a seed 1: done, skipped" in capsys.readouterr().out
    sweep.run_sweep([configs / "a.yaml"], [1], out, [*cpu, "fabric.precision=32"])  # Fabric's short name
    for seed in (2, 3):  # trained in another precision, or recorded none (an older checkpoint)
        with pytest.raises(ValueError, match=rf"a/seed{seed} was trained with other settings \(fabric.precision\)"):
            sweep.run_sweep([configs / "a.yaml"], [seed], out, [*cpu, "fabric.precision=32-true"])
    assert not launched

    # the summary counts the runs of another config trained alike with the first seed's trained precision
    _finished_run(out / "b" / "seed1", configs / "b.yaml", 2.0, ["name=b", "seed=1", *cpu])
    torch.save({"trained_precision": "32-true"}, out / "b" / "seed1" / "last.pt")
    _finished_run(out / "b" / "seed2", configs / "b.yaml", 4.0, ["name=b", "seed=2", *cpu, "fabric.precision=32-true"])
    torch.save({"trained_precision": "32-true"}, out / "b" / "seed2" / "last.pt")
    rows = sweep.run_sweep([configs / "a.yaml"], [1], out, [*cpu, "fabric.precision=32-true"])
    assert sorted(row["seed"] for row in rows if row["config"] == "b") == [1, 2]


def test_names_beyond_the_basic_plane_reach_the_run_as_they_are():
    # json.dumps wrote "\ud835\udf05" for 𝜅, which YAML read back as two lone surrogates (an encoding error later)
    from recipes.config import apply_overrides, override
    for value in ("K𝜅1", "run😀", "café", 'quote " and # hash'):
        assert apply_overrides({}, [override("name", value)])["name"] == value


@given(config_values)
def test_override_reads_back_as_the_value_it_was_given(value):
    """json.dumps wrote 1e+20, Infinity and NaN, which YAML reads as strings (they reached a user's coupling
    class through coupling_options as strings)."""
    from recipes.config import apply_overrides, override
    assert_same_data(apply_overrides({}, [override("model.coupling_options", value)])["model"]["coupling_options"],
                     value)
