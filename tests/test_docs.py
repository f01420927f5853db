"""The Sphinx sources document every public name, and every public docstring has an example.

Cheap checks on the ``.rst`` sources and docstrings; building the docs (``python -m sphinx``, see
README.md) is a separate CI step.
"""

import inspect
import pathlib
import re

import pytest

import kuramoto_attn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(r"^\s*\.\. (?:auto|py:)?(class|function|data|exception|module|currentmodule)"
                       r":: +(\S+)", re.M)
OPTION_MEMBERS = re.compile(r"^\s+:members:", re.M)


def documented_names() -> set[str]:
    """Full dotted names given to autodoc or py-domain directives in the docs' sources.

    An ``automodule`` with ``:members:`` documents the names in that module's ``__all__``."""
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
                    names.update(f"{target}.{name}" for name in __import__(target, fromlist=["*"]).__all__)
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


@pytest.mark.parametrize("name", [name for name in kuramoto_attn.__all__
                                  if inspect.isclass(getattr(kuramoto_attn, name))
                                  or inspect.isfunction(getattr(kuramoto_attn, name))])
def test_every_public_docstring_has_an_example(name):
    obj = getattr(kuramoto_attn, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{name}: the docstring has no >>> example"
    if inspect.isfunction(obj):
        assert "Args:" in doc and "Returns:" in doc, f"{name}: the docstring lacks Args or Returns"
