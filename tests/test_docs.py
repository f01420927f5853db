"""The Sphinx sources document every public name, and every public docstring has an example.

Cheap checks on the ``.rst`` sources and docstrings; building the docs (``python -m sphinx``, see
README.md) is a separate CI step.
"""

import importlib
import inspect
import pathlib
import re

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
                      "recipes.common", "recipes.plots"]


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
