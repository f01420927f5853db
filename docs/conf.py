"""Sphinx configuration for kuramoto-attn.

Build (from the repository root):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import os
import sys

# document the checkout's library (not an installed copy elsewhere)
sys.path.insert(0, os.path.abspath(".."))

import kuramoto_attn  # noqa: E402

project = "kuramoto-attn"
author = "kuramoto-attn developers"
copyright = "kuramoto-attn developers"
release = version = kuramoto_attn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"kuramoto-attn {release}"

# ---- autodoc and napoleon (Google-style docstrings, as in the code)
autodoc_member_order = "bysource"
autoclass_content = "class"
autodoc_typehints = "signature"
# members are listed per class in the pages; nn.Module.extra_repr is not part of the API
autodoc_default_options = {"show-inheritance": True, "exclude-members": "extra_repr"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as :ivar: fields: NamedTuple and dataclass fields are then not described twice
napoleon_use_ivar = True
napoleon_custom_sections = ["Shapes"]

# ---- doctest: ``>>>`` blocks in the pages and in the docstrings autodoc pulls in
doctest_global_setup = """
import math
import torch
torch.set_num_threads(1)
from kuramoto_attn import *
# the models' and recipes' docstring examples use their own module's names, as under pytest
import numpy as np
from models import *
from models.config import *
from recipes.common import *
from recipes.data import *
from recipes.train import learning_rate
"""


def _resolve_short_python_refs(app, env, node, contnode):
    """Resolve a Python cross-reference that names an object by a path other than the one it is
    documented under (e.g. ``kuramoto_attn.couplings.Coupling`` for ``kuramoto_attn.Coupling``,
    ``TPIState`` from inside :mod:`kuramoto_attn`, ``ConfigError`` from :mod:`models.gpt`), when
    exactly one documented object has that last name component (the library's own first).
    Aliases do not count: a class documented as ``kuramoto_attn.KuramotoAttention`` is also
    recorded under its defining module, ``kuramoto_attn.attention.KuramotoAttention``, and the
    same object twice is no ambiguity."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    last = target.rsplit(".", 1)[-1]
    domain = env.get_domain("py")
    matches = [name for name, entry in domain.objects.items()
               if name.rsplit(".", 1)[-1] == last and not getattr(entry, "aliased", False)]
    # the library's own objects first (models and recipes reuse names such as main, step, train)
    matches = [name for name in matches if name.startswith("kuramoto_attn")] or matches
    # a method or attribute name (e.g. "step") is ambiguous across classes: prefer a match that
    # shares the class part of the target, else give up unless it is unique
    if len(matches) > 1 and "." in target:
        parent = target.rsplit(".", 2)[-2]
        matches = [name for name in matches if name.rsplit(".", 2)[-2] == parent]
    if len(matches) != 1:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", matches[0], node, contnode)


def _public_bases(app, name, obj, options, bases):
    """Leave private bases (``kuramoto_attn._owner.OwnedCache`` of the caches) out of "Bases:"."""
    public = [base for base in bases if not any(part.startswith("_") for part in base.__module__.split("."))]
    bases[:] = public or [object]


def setup(app):
    app.connect("missing-reference", _resolve_short_python_refs)
    app.connect("autodoc-process-bases", _public_bases)
