"""The README's Python examples run as written, and give the shapes their comments state."""

import ast
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# "name: (4, 128, 256)" at the start of a comment or after "; " (a name, attribute or index, then a
# shape); a bare "(2, 24)" or one after words ("parallel form: (4, 128, 256)"): the shape of what
# the statement assigns
STATED_SHAPE = re.compile(r"(?:^|;)\s*(?:([^:;()]+): )?\(([\d, ]+)\)")
NAME = re.compile(r"[A-Za-z_][\w.\[\]]*")


def test_readme_python_blocks_run_and_give_the_shapes_they_state():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    checked = 0
    for block in blocks:
        namespace, lines = {}, block.splitlines()
        for statement in ast.parse(block).body:  # one at a time: a name may be bound again further down
            exec(compile(ast.Module([statement], []), str(README), "exec"), namespace)
            comments = [line.partition("#")[2].strip() for line in lines[statement.lineno - 1:statement.end_lineno]]
            for name, shape in (found for comment in comments for found in STATED_SHAPE.findall(comment)):
                if not NAME.fullmatch(name):  # a bare or described shape: that of the one name assigned
                    (target,) = statement.targets
                    name = target.id
                expected = tuple(int(size) for size in shape.split(","))
                assert tuple(eval(name, namespace).shape) == expected, f"README: {name} is not {expected}"
                checked += 1
    assert checked >= 3  # the stated shapes were found and checked


def test_the_package_version_is_the_one_pyproject_declares():
    """``kuramoto_attn.__version__`` (the docs' release too) and the version pip installs are kept by hand in two
    places: a release that bumps one must bump the other."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import kuramoto_attn
    declared = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert kuramoto_attn.__version__ == declared
