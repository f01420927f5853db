"""Run configuration: YAML files (with ``extends:``) plus dotted command-line overrides.

A run config has five sections, each a frozen dataclass (``model`` is checked by the model's own
config class, chosen by ``model.type``), three top-level keys, and an optional ``extends``::

    extends: base.yaml             # optional: merged underneath this file, section by section
    name: layer7_32osc_K1_cpu      # run name
    seed: 1337
    out_dir: runs/my_run           # optional: default runs/<name>
    model: {type: gpt, n_layers: 4, ...}            # models.GPTConfig / models.TPILMConfig
    data: {name: shakespeare, tokenizer: char, ...}  # DataConfig
    optim: {lr: 1.0e-3, weight_decay: 0.1, ...}      # OptimConfig
    train: {max_iters: 2000, batch_size: 12, ...}    # TrainConfig
    fabric: {accelerator: auto, precision: null, ...} # FabricConfig

Every key is used or rejected with an error naming it (:class:`models.config.ConfigError`).
Overrides are ``section.key=value`` strings whose value is parsed as YAML
(``train.max_iters=100``, ``model.phase_layer_idx=[2]``, ``fabric.precision=bf16-mixed``). Files and overrides
read integers as written: ``010`` is 10 (YAML 1.1 would read octal 8), ``1_000`` is 1000, and ``1:30`` is a string,
not 90 (base 60).
"""

from __future__ import annotations

import copy
import math
import os
import json
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from models import MODELS
from models.config import ConfigError, check, from_dict, to_dict

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "FabricConfig", "RunConfig", "load_config", "parse_config",
           "parse_saved_config", "load_yaml", "read_yaml", "apply_overrides", "override", "split_overrides",
           "model_config", "changed_keys", "changed_settings"]


@dataclass(frozen=True)
class DataConfig:
    """Which corpus and tokenizer (see ``recipes/data.py``, ``prepare_corpus``)."""

    name: str = "shakespeare"         # shakespeare (embedded) | tiny-shakespeare | wikitext-2 | enwik8 | text
    path: str | None = None           # local file or directory instead of downloading (recorded absolute)
    tokenizer: Literal["char", "byte", "word", "bpe"] | None = None  # None: the corpus's own level
    bpe_vocab_size: int = 8192
    cache_dir: str | None = None      # None: $KURAMOTO_ATTN_CACHE or ~/.cache/kuramoto-attn
    val_fraction: float = 0.1         # val = the last tenth of a single-file corpus (word/BPE: from a line start)
    download: bool = True             # fetch a known corpus missing from the cache (only without path)

    def __post_init__(self):
        from recipes.data import CORPORA

        check(self.name in CORPORA, "name", f"must be one of {', '.join(CORPORA)}", self.name)
        for key in ("path", "cache_dir"):  # "" would be the working directory, silently
            value = getattr(self, key)
            check(value is None or value.strip() != "", key, "must not be empty (null: none given)", value)
            if value is not None:  # no shell expands ~ inside a YAML file or after data.path=; and absolute, as
                # the run's config records it: evaluate, generate and resume may run from another directory
                object.__setattr__(self, key, os.path.abspath(os.path.expanduser(value)))
        source = CORPORA[self.name]
        check(self.name != "enwik8" or self.tokenizer in (None, "byte"), "tokenizer",
              "must be byte (or null) for enwik8", self.tokenizer)
        check(self.bpe_vocab_size >= 256, "bpe_vocab_size", "must be at least 256", self.bpe_vocab_size)
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)", self.val_fraction)
        # settings that would have no effect are mistakes, not silently ignored
        check(not source.fixed_splits or self.val_fraction == DataConfig.val_fraction, "val_fraction",
              f"{self.name} has its own validation split; remove the setting", self.val_fraction)
        check((self.tokenizer or source.level) == "bpe" or self.bpe_vocab_size == DataConfig.bpe_vocab_size,
              "bpe_vocab_size", "applies only with tokenizer: bpe", self.bpe_vocab_size)
        check(self.download or _reads_download(self.name, self.path), "download",
              "applies only to a known corpus read without data.path (nothing else is downloaded); "
              "remove the setting", self.download)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay; ``weight_decay`` on Linear weights only (not on biases, norms,
    embeddings, nor the phase layers' ω, β, K or a coupling module's parameters)."""

    lr: float = 1e-3
    min_lr: float = 1e-4              # where the cosine ends (read by schedule: cosine only)
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_iters: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    fused: bool = True                # AdamW's fused kernel (CPU, CUDA); false: its foreach version

    def __post_init__(self):
        check(self.lr > 0, "lr", "must be positive", self.lr)
        default_min_lr = type(self).__dataclass_fields__["min_lr"].default
        if self.schedule == "cosine":
            check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]", self.min_lr)
        else:
            check(self.min_lr in (default_min_lr, self.lr), "min_lr", f"is only read with schedule: cosine (a "
                  f"constant schedule stays at lr); remove it, or set it to its default "
                  f"(optim.min_lr={default_min_lr}) or to lr",
                  self.min_lr)
        check(self.weight_decay >= 0, "weight_decay", "must be non-negative", self.weight_decay)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              "must be two numbers in [0, 1)", self.betas)
        check(self.eps > 0, "eps", "must be positive", self.eps)
        check(self.warmup_iters >= 0, "warmup_iters", "must be non-negative", self.warmup_iters)
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null",
              self.grad_clip)


@dataclass(frozen=True)
class TrainConfig:
    """The loop: sizes, evaluation, early stopping, logging."""

    max_iters: int = 2000
    batch_size: int = 12              # sequences per optimizer step, summed over devices and micro-batches
    block_size: int = 64              # tokens per sequence (at most model.max_seq_len)
    grad_accum: int = 1               # micro-batches per optimizer step on each device
    eval_interval: int = 250          # evaluate (and save checkpoints) every N steps and at the end
    eval_iters: int = 20              # validation batches per evaluation (a fixed set of windows)
    log_interval: int = 10
    patience: int | None = None       # stop after this many evaluations without a better val loss
    progress_bar: bool = True
    plots: bool = True                # loss and R(t) PNGs at the end
    compile: bool = False             # torch.compile the model (GPU; on 2 CPU cores it was no faster)

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "block_size", "grad_accum", "eval_interval",
                     "eval_iters", "log_interval"):
            check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        check(self.patience is None or self.patience >= 1, "patience", "must be at least 1 or null",
              self.patience)


@dataclass(frozen=True)
class FabricConfig:
    """Arguments of ``lightning.fabric.Fabric``; precision ``None`` = bf16-mixed on GPU, fp32 on CPU."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"            # auto | ddp | fsdp | ... (Fabric's names)
    precision: str | int | None = None

    #: Fabric's precision settings (lightning_fabric.connector._PRECISION_INPUT), checked before Fabric starts
    PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
                  "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16)

    def __post_init__(self):
        check(self.precision is None or self.precision in self.PRECISIONS, "precision",
              f"must be one of Fabric's: {', '.join(dict.fromkeys(map(str, self.PRECISIONS)))}", self.precision)
        check(self.num_nodes >= 1, "num_nodes", "must be at least 1", self.num_nodes)
        check(not isinstance(self.devices, int) or self.devices >= 1 or self.devices == -1,
              "devices", "must be positive, -1 or a string such as 'auto'", self.devices)


@dataclass(frozen=True)
class RunConfig:
    """A whole run. ``model`` stays a mapping here; :func:`model_config` builds its dataclass."""

    name: str = "run"
    seed: int = 1337
    out_dir: str | None = None        # None: runs/<name>
    model: dict = field(default_factory=lambda: {"type": "gpt"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)

    def __post_init__(self):
        check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)", self.seed)
        # the name becomes one directory under runs/: not empty, not a path
        check(self.name.strip() not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
              "name", "must be a plain directory name (or set out_dir)", self.name)
        check(self.out_dir is None or self.out_dir.strip() != "", "out_dir", "must not be empty", self.out_dir)
        if self.out_dir is not None:  # no shell expands ~ inside a YAML file or after out_dir=
            object.__setattr__(self, "out_dir", os.path.expanduser(self.out_dir))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir if self.out_dir is not None else Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def model_config(model: dict, vocab_size: int | None = None):
    """The model's config dataclass from the ``model`` section; fills ``vocab_size`` from the data.

    A ``vocab_size`` given in the file must be at least the tokenizer's (padding the embedding is
    allowed, truncating the vocabulary is not).
    """
    values = dict(model)
    kind = values.pop("type", "gpt")
    if not isinstance(kind, str) or kind not in MODELS:  # a list or mapping is unhashable: no raw TypeError
        raise ConfigError(f"model.type: expected one of {', '.join(map(repr, MODELS))}, got {kind!r}")
    if vocab_size is not None:
        given = values.setdefault("vocab_size", vocab_size)
        if isinstance(given, int) and not isinstance(given, bool):  # another type: the model config's error
            check(given >= vocab_size, "model.vocab_size",
                  f"must be at least the tokenizer's vocabulary ({vocab_size})", given)
    _, config_cls = MODELS[kind]
    return config_cls.from_dict(values, where="model")


def read_yaml(path: Path) -> Any:
    """The value of a UTF-8 YAML file (None when empty; safe loading, a key given twice in one mapping
    refused); a file that is not UTF-8 or not valid YAML is a ConfigError naming it, on one line."""
    try:
        return _load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file as a mapping, with ``extends:`` (a path relative to the file, ``~`` expanded) merged
    underneath."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: extends: a cycle ({' -> '.join(str(p) for p in (*_seen, path.resolve()))})")
    values = read_yaml(path)
    if values is None:  # an empty file (or comments only): every setting from the base or the defaults
        values = {}
    if not isinstance(values, dict):  # also 0, false or []: not read as an empty config
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = values.pop("extends", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a path, got {base!r}")
    base = path.parent / Path(base).expanduser()
    if not base.is_file():  # named with the file that asks for it (which of a sweep's configs, ...)
        raise FileNotFoundError(f"{path}: extends: no such file {str(base)!r}")
    return _merge(load_yaml(base, (*_seen, path.resolve())), values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: a second ``train:`` section replaced the first whole, a repeated setting hid the other).
    Keys brought in by a merge (``<<: *base``) may still be set again, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 010 as octal 8 and 1:30 as 90 (base 60): a seed or a step count other than the one
# written, silently. Here integers are decimal as written (YAML 1.2, Python), 0b and 0x as marked, and base-60
# numbers are strings, which a number setting refuses. The patterns keep to YAML 1.1's numbers, so a string that
# yaml.safe_dump writes unquoted (e.g. 08) never comes back as a number.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node) -> int:
    digits = loader.construct_scalar(node).replace("_", "")
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("-+")
    base = {"0b": 2, "0x": 16}.get(digits[:2], 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:  # 0b_ or 0x_: no digits; a string, which a number setting refuses
        return loader.construct_scalar(node)


_UniqueKeyLoader.add_constructor(_INT_TAG, _construct_int)


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a copy of ``values``."""
    values = copy.deepcopy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_iters=100")
        *parents, leaf = key.split(".")
        if "" in (*parents, leaf):  # ".x", "train.", "train..max_iters": else "train.: unknown key"
            raise ConfigError(f"override {item!r}: expected a key of names joined by single dots, e.g. "
                              "train.max_iters=100")
        node = values
        for part in parents:
            if node.get(part) is None:  # missing, or left empty in the file ("train:")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            value = _load_yaml_text(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_one_line(err)}") from None
        if not parents and leaf in _SECTIONS:
            # a section given whole merges into the file's, as a file's sections do; one value instead
            # ("optim=" is null) would silently reset it to the defaults
            if not isinstance(value, dict):
                raise ConfigError(f"override {item!r}: {leaf} is a section; set its keys ({leaf}.<key>=value)")
            given = node.get(leaf)
            if given is not None and not isinstance(given, dict):
                raise ConfigError(f"{leaf}: expected a mapping of settings but the config file gives {given!r}")
            node[leaf] = _merge({leaf: given or {}}, {leaf: value})[leaf]  # as a file's section merges
        elif parents == ["model"]:
            _merge_model(node, {leaf: value})
        else:
            node[leaf] = value
    return values


#: RunConfig's sections (model, data, optim, train, fabric): its fields that hold a mapping or dataclass
_SECTIONS = tuple(f.name for f in fields(RunConfig) if f.default_factory is not MISSING)


def override(key: str, value: Any) -> str:
    """A ``key=value`` override that :func:`apply_overrides` reads back as ``value`` exactly: strings
    (paths, names) are quoted, so that ``#`` (a YAML comment), ``: `` or a name such as ``1`` or
    ``yes`` keep their meaning."""
    return f"{key}={_flow(value)}"


def _flow(value: Any) -> str:
    """``value`` as YAML flow text: JSON, except floats, which JSON writes as YAML reads strings
    (``1e+20``, ``Infinity``: PyYAML's floats need a point, ``1.0e+20``, and spell ``.inf``, ``.nan``)."""
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        mantissa, e, exponent = repr(value).partition("e")
        return f"{mantissa}{'' if '.' in mantissa else '.0'}{e}{exponent}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    # ensure_ascii=False: "\\ud835..." escapes of characters beyond the BMP come back from YAML as lone surrogates;
    # escaped instead: what YAML refuses in a file (controls, lone surrogates) or folds as a line break
    text = json.dumps(str(value) if isinstance(value, Path) else value, ensure_ascii=False)
    return _NOT_YAML_TEXT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_NOT_YAML_TEXT = re.compile("[^\t\n\r\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


_OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")  # section.key=value


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(other arguments, overrides)``: every ``section.key=value`` token is an override, wherever it
    stands (after ``--seeds 1 2`` or a list of configs too, which argparse would take for theirs), save
    the name of a file that exists (``--config lr=1e-3.yaml``: argparse said ``--config`` had no value)."""
    overrides = [a for a in argv if _OVERRIDE.match(a) and not Path(a).is_file()]
    return [a for a in argv if a not in overrides], overrides


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read, merge, override and validate a run config (``model`` is validated too)."""
    values = load_yaml(path) if path is not None else {}
    return parse_config(apply_overrides(values, list(overrides)))


def parse_config(values: dict[str, Any], vocab_size: int | None = None) -> RunConfig:
    """Validate a run config mapping (as read from YAML or stored in a checkpoint)."""
    config = from_dict(RunConfig, values)
    # fail now, not after loading the data (or hours into a sweep); the real vocabulary size is filled in
    # (and compared) later
    context = model_config(config.model, vocab_size).max_seq_len
    check(config.train.block_size <= context, "train.block_size", f"exceeds model.max_seq_len {context}",
          config.train.block_size)
    devices = config.fabric.devices
    if isinstance(devices, int) and devices >= 1:  # else the process count is known once Fabric starts
        check_batch_split(config.train, processes=devices * config.fabric.num_nodes)
    return config


def check_batch_split(train: TrainConfig, processes: int) -> None:
    """Every global batch is cut into ``processes × train.grad_accum`` equal micro-batches."""
    if train.batch_size % (processes * train.grad_accum):
        raise ConfigError(f"train.batch_size: {train.batch_size} is not divisible by processes × "
                          f"train.grad_accum = {processes} × {train.grad_accum} (processes: fabric.devices × "
                          "fabric.num_nodes)")


def _reads_download(name: str, path: str | None) -> bool:
    """Whether ``data.download`` is read: a known corpus with files to fetch, read without
    ``data.path`` (an unknown name counts as read: its own check names it)."""
    from recipes.data import CORPORA

    return name not in CORPORA or (bool(CORPORA[name].files) and path is None)


def parse_saved_config(values: dict[str, Any]) -> RunConfig:
    """:func:`parse_config` for the config a run was trained with (a checkpoint's, or a run folder's
    ``config.yaml``): settings that had no effect, which newer versions refuse, are reset to their
    defaults first (the run trained the same either way), so older runs still evaluate and resume."""
    values = copy.deepcopy(values)
    data, optim, model = (values.get(key) if isinstance(values.get(key), dict) else {}
                          for key in ("data", "optim", "model"))
    if data.get("download") is False and not _reads_download(data.get("name", DataConfig.name), data.get("path")):
        del data["download"]  # nothing was to be downloaded
    if optim.get("schedule") == "constant" and optim.get("min_lr") not in (OptimConfig.min_lr,
                                                                          optim.get("lr", OptimConfig.lr)):
        del optim["min_lr"]  # read by the cosine schedule only; the values the check accepts are kept as given
    if model.get("type") == "tpi" and model.get("num_heads", 1) != 1:
        from kuramoto_attn import HolographicPhaseMemory
        from models.tpi_lm import TPILMConfig

        variant = (model.get(key, getattr(TPILMConfig, key)) for key in ("state", "kernel", "magnitude"))
        if not HolographicPhaseMemory._reads_heads(*variant):
            model["num_heads"] = 1  # the vector state's heads grouped nothing here
    return parse_config(values)


#: every model config's other names for a setting (``n_sync_steps`` for ``steps``), by name
_ALIASES = {alias: name for _, config_cls in MODELS.values()
            for alias, name in getattr(config_cls, "ALIASES", {}).items()}


def _merge_model(model: dict, top: dict) -> None:
    """``top``'s model settings into ``model`` (in place), each replacing the base's under any of its names
    (``steps`` given as ``n_sync_steps`` by a base file): a later layer wins, whichever name each layer uses.
    Two names for one setting within ``top`` stay, for the model config to refuse."""
    names = {_ALIASES.get(key, key) for key in top}
    for key in [key for key in model if key not in top and _ALIASES.get(key, key) in names]:
        del model[key]
    model.update(copy.deepcopy(top))


def _merge(base: dict, top: dict, sections: bool = True) -> dict:
    """``top`` over ``base``: sections (``sections=True``: the top level) merge key by key; a setting
    inside one is replaced whole, a mapping too (``model.coupling_options``, one class's keyword
    arguments: merged, the base's options would reach the class a file switches to). A model setting
    replaces the base's under any of its names (``n_sync_steps`` over ``steps``)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if sections and key == "model" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            _merge_model(merged[key], value)
        elif sections and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, sections=False)
        elif sections and value is None and isinstance(merged.get(key), dict):
            # a section left empty ("train:", its keys commented out) keeps the base's, as overrides do;
            # a setting inside one (model.coupling_options: null) is set to null, as an override sets it
            continue
        else:
            merged[key] = value
    return merged


#: settings that change only what a run shows (logs, progress bar, plots), never its result
DISPLAY_KEYS = ("train.log_interval", "train.progress_bar", "train.plots")
#: settings that change only how the global batch is computed (on how many devices, in how many
#: micro-batches, compiled or not), not which batches or what is learned from them (float rounding aside)
DEVICE_KEYS = ("fabric.devices", "fabric.num_nodes", "fabric.strategy", "train.grad_accum", "train.compile")
#: where the corpus lives and whether it may be fetched, not what it is (a moved folder, another machine):
#: a run may change these when its corpus's text is the one its checkpoint records (sha256). A run read
#: from the cache with ``download: false`` then gets ``data.path``, where ``download`` must go
DATA_LOCATION = ("data.path", "data.cache_dir", "data.download")


def changed_settings(saved: dict, wanted: dict, vocab_size: int | None = None) -> list[str]:
    """:func:`changed_keys` between two whole run configs (``RunConfig.to_dict()``), with each
    ``model`` section compared as the model sees it: defaults filled in and aliases resolved (the
    other sections are dataclasses, filled in already), so ``bias: true`` spelled out, or
    ``n_sync_steps`` for ``steps``, is no change; nor is ``data.tokenizer`` null against the
    corpus's own level (``char`` for a text corpus). ``vocab_size``: the run's tokenizer's, which an
    omitted ``model.vocab_size`` is (otherwise the model config's default: spelling it out was a change)."""
    from recipes.data import CORPORA

    given = set()  # model keys either config sets (by their canonical names)

    def full(values: dict) -> dict:
        data = values.get("data")
        if isinstance(data, dict) and data.get("tokenizer") is None and data.get("name") in CORPORA:
            # null reads the corpus at its own level (prepare_corpus): the same tokens as naming that level
            values = {**values, "data": {**data, "tokenizer": CORPORA[data["name"]].level}}
        model = values.get("model")
        if not isinstance(model, dict):
            return values
        config = model_config(model, vocab_size)
        aliases = getattr(config, "ALIASES", {})
        given.update(f"model.{aliases.get(key, key)}" for key in model)
        return {**values, "model": {"type": model.get("type", "gpt"), **to_dict(config)}}
    changed = changed_keys(full(saved), full(wanted))
    # a key neither sets follows from those they set (d_ff from d_model): those are the change; a key
    # inside a mapping setting (model.coupling_options.phase_lag) is a change of that setting
    return [key for key in changed if not key.startswith("model.") or ".".join(key.split(".")[:2]) in given]


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings (nested sections compared key by key)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out
