"""The Sphinx sources document every public name, and every public docstring has an example.

Cheap checks on the ``.rst`` sources and docstrings; building the docs (``python -m sphinx``, see
README.md) is a separate CI step.
"""

import collections
import importlib
import importlib.util
import inspect
import pathlib
import re
import sys
import types

import pytest

import kuramoto_attn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(r"^\s*\.\. (?:auto|py:)?(class|function|data|exception|module|currentmodule)"
                       r":: +(\S+)", re.M)
# ":members:" and its list, which may go on over more-indented lines
OPTION_MEMBERS = re.compile(r"^(\s+):members:(.*(?:\n\1\s+\S.*)*)", re.M)
#: the modules outside kuramoto_attn whose public names (``__all__``) the API reference documents
DOCUMENTED_MODULES = ["models", "models.config", "models.gpt", "models.tpi_lm", "recipes.config", "recipes.data",
                      "recipes.train", "recipes.evaluate", "recipes.generate", "recipes.interpret", "recipes.sweep",
                      "recipes.common", "recipes.files", "recipes.plots"]


def documented_names() -> set[str]:
    """Full dotted names given to autodoc or py-domain directives in the docs' sources.

    An ``automodule`` with ``:members: A, B`` documents those; with a bare ``:members:``, the names
    in that module's ``__all__``."""
    names = set()
    for path in DOCS.rglob("*.rst"):
        if "_build" in path.parts:
            continue
        text = path.read_text()
        module = None
        for match in DIRECTIVE.finditer(text):
            kind, target = match.groups()
            if kind in ("module", "currentmodule"):
                module = target
                members = OPTION_MEMBERS.match(text, match.end() + 1)
                if kind == "module" and members and "auto" in match.group(0):
                    listed = [name.strip() for name in members.group(2).split(",") if name.strip()]
                    names.update(f"{target}.{name}" for name in listed or importlib.import_module(target).__all__)
                continue
            names.add(target if "." in target or module is None else f"{module}.{target}")
    return names


def test_docs_sources_exist():
    assert (DOCS / "conf.py").is_file()
    assert (DOCS / "index.rst").is_file()


def test_short_cross_references_resolve_past_aliases_and_outside_the_library(monkeypatch):
    """conf.py's fallback for ``:class:`KuramotoAttention```-style references. Sphinx records a class
    documented as ``kuramoto_attn.KuramotoAttention`` a second time, aliased, under its defining module:
    counted as two objects, the reference from models.gpt's docstring was left unresolved (plain text,
    no link), and so was ``ConfigError`` (documented in models.config, outside kuramoto_attn)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # conf.py puts the checkout on it
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    entry = collections.namedtuple("Entry", "aliased")
    objects = {"kuramoto_attn.KuramotoAttention": entry(False),
               "kuramoto_attn.attention.KuramotoAttention": entry(True),  # the same class
               "models.config.ConfigError": entry(False),
               "kuramoto_attn.HolographicPhaseMemory.step": entry(False),
               "kuramoto_attn.FixedStepSolver.step": entry(False),
               "models.gpt.GPT.generate": entry(False), "models.tpi_lm.TPILM.generate": entry(False)}
    domain = types.SimpleNamespace(objects=objects, resolve_xref=lambda *args: args[4])  # the name chosen
    env = types.SimpleNamespace(get_domain=lambda name: domain)
    app = types.SimpleNamespace(builder=None)

    def resolve(target, refdomain="py"):
        return conf._resolve_short_python_refs(app, env, {"refdomain": refdomain, "reftarget": target,
                                                          "refdoc": "api/models"}, None)

    assert resolve("KuramotoAttention") == "kuramoto_attn.KuramotoAttention"
    assert resolve("~ConfigError") == "models.config.ConfigError"
    assert resolve("kuramoto_attn.memory.HolographicPhaseMemory.step") == "kuramoto_attn.HolographicPhaseMemory.step"
    assert resolve("generate") is None  # two documented objects: no guess
    assert resolve("KuramotoAttention", refdomain="std") is None


@pytest.mark.parametrize("name", kuramoto_attn.__all__)
def test_every_public_name_is_in_the_api_reference(name):
    assert f"kuramoto_attn.{name}" in documented_names(), \
        f"kuramoto_attn.{name} is not documented in docs/**/*.rst (autoclass/autofunction/py:data)"


@pytest.mark.parametrize("module, name", [(module, name) for module in DOCUMENTED_MODULES
                                          for name in importlib.import_module(module).__all__])
def test_every_public_name_of_models_and_recipes_is_in_the_api_reference(module, name):
    # under its own name or where it is defined (models.GPT is models.gpt.GPT)
    home = getattr(getattr(importlib.import_module(module), name), "__module__", None)
    places = {f"{module}.{name}"} | ({f"{home}.{name}"} if home else set())
    assert places & documented_names(), f"{module}.{name} is not documented in docs/**/*.rst"


@pytest.mark.parametrize("name", [name for name in kuramoto_attn.__all__
                                  if inspect.isclass(getattr(kuramoto_attn, name))
                                  or inspect.isfunction(getattr(kuramoto_attn, name))])
def test_every_public_docstring_has_an_example(name):
    obj = getattr(kuramoto_attn, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{name}: the docstring has no >>> example"
    if inspect.isfunction(obj):
        assert "Args:" in doc and "Returns:" in doc, f"{name}: the docstring lacks Args or Returns"


# what docs/conf.py's doctest_global_setup binds for Sphinx, which a reader pasting a page's examples
# into Python does not have: each page imports what it uses
SETUP_NAMES = {"math", "torch", "np", *kuramoto_attn.__all__}
CODE_LINE = re.compile(r"^\s*(?:>>>|\.\.\.) ?(.*)$")


def page_code(text: str) -> list[str]:
    """The code of a page's examples, in order: ``>>>``/``...`` lines and ``testcode`` block bodies."""
    lines, in_block, indent = [], False, 0
    for line in text.splitlines():
        if re.match(r"^\s*\.\. testcode::", line):
            in_block, indent = True, len(line) - len(line.lstrip())
            continue
        if in_block:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                in_block = False
            elif line.strip() and not line.lstrip().startswith(":"):
                lines.append(line.strip())
                continue
        match = CODE_LINE.match(line)
        if match:
            lines.append(match.group(1))
    return lines


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.rst")
                                        if "_build" not in p.parts))
def test_every_page_imports_what_its_examples_use(page):
    """A page's examples ran under Sphinx only thanks to conf.py's global setup (``math``, ``torch``,
    ``from kuramoto_attn import *``); pasted into Python they stopped at a NameError."""
    bound, missing, importing = set(), [], False
    for line in page_code((DOCS / page).read_text()):
        code = re.sub(r"#.*|'[^']*'|\"[^\"]*\"", "", line)  # not in comments or strings
        if importing or re.match(r"\s*from\s+\S+\s+import\s+\(", code):  # a parenthesised list, maybe over lines
            bound |= set(re.findall(r"\w+", code.split("import", 1)[-1]))
            importing = ")" not in code
            continue
        for match in re.finditer(r"\bimport\s+([\w., ]+?)(?:\s+as\s+(\w+))?\s*$", code):
            bound |= {match.group(2)} if match.group(2) else {n.strip().split(".")[0] for n in match.group(1).split(",")}
        used = {name for name in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\b", code) if name in SETUP_NAMES}
        missing += [f"{name} in {line!r}" for name in sorted(used - bound)]
    assert not missing, f"{page}: used before an import: {missing[:5]}"
