"""Hypothesis strategies, phase generators, module-state helpers and fakes shared by the tests."""

import io
import math

import pytest
import torch
from hypothesis import strategies as st

# a seeded torch.Generator per example: hypothesis controls (and shrinks) the seed
generators = st.integers(min_value=0, max_value=2**31 - 1).map(lambda seed: torch.Generator().manual_seed(seed))

# what a config can hold: nested lists and mappings of None, booleans, integers, floats and strings
config_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                             max_leaves=8)


def assert_same_data(got, expected):
    """``got`` is ``expected`` read back: the same types all the way down, keys in order, NaN equal to NaN."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, list):
        assert len(got) == len(expected), (got, expected)
        for a, b in zip(got, expected):
            assert_same_data(a, b)
    elif isinstance(expected, dict):
        assert list(got) == list(expected), (got, expected)
        for key in expected:
            assert_same_data(got[key], expected[key])
    else:
        assert got == expected or (got != got and expected != expected), (got, expected)


def repr_arguments(module) -> dict:
    """The keyword arguments a module's ``extra_repr`` shows (``name=value, ...``), read back as a dict."""
    return eval(f"dict({module.extra_repr()})")  # noqa: S307 (the library's own repr, in tests)


def clustered_phases(gen, shape, spread, dtype=torch.float64):
    """Rows with a random centre and Gaussian spread: R from 1 (spread 0) down to ~1/sqrt(n)."""
    centre = torch.rand(shape[:-1] + (1,), generator=gen, dtype=torch.float64) * 2 * math.pi
    theta = centre + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    return theta.to(dtype)


def materialize_like_fabric(module, device="cpu"):
    """What Lightning Fabric does to a module built on the meta device (FSDP, ``init_module(empty_init=True)``):
    every submodule that holds meta tensors of its own, parents first, gets storage (``to_empty(recurse=False)``)
    and then its ``reset_parameters()``."""
    for sub in module.modules():
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            sub.to_empty(device=device, recurse=False)
            sub.reset_parameters()
    return module


def assert_same_state(a, b):
    """Equal state dicts, exactly: the same keys, dtypes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_reset_gives_constructor_values(make, x, seed=0):
    """``make()``'s module, built on the meta device and given storage with ``to_empty`` (as FSDP and Fabric do),
    and one whose every parameter and buffer moved (as training or a load would): under ``seed``, their
    ``reset_parameters()`` gives exactly what the constructor drew (the same state, the same output on ``x``).
    Returns the module built directly."""
    torch.manual_seed(seed)
    built = make()
    with torch.device("meta"):
        empty = make()
    empty.to_empty(device="cpu")  # uninitialised memory
    torch.manual_seed(seed)
    empty.reset_parameters()
    assert_same_state(empty, built)

    trained = make()
    with torch.no_grad():
        for tensor in [*trained.parameters(), *trained.buffers()]:
            tensor.add_(0.25)
    torch.manual_seed(seed)
    trained.reset_parameters()
    assert_same_state(trained, built)
    torch.testing.assert_close(trained(x), built(x), rtol=0, atol=0)
    return built


def built_where_freed(cls, address, *args, **kwargs):
    """``cls(*args, **kwargs)`` in the memory of a freed object (whose ``id`` was ``address``), as CPython
    builds a new object wherever the next free block of its size is (so a model built again often gets
    its predecessor's id): made certain here by taking new instances until one lands there. Skips the
    test when none does within 100,000."""
    spares = []  # kept until the end, so that each try takes another free block
    for _ in range(100_000):
        instance = cls.__new__(cls)
        if id(instance) == address:
            instance.__init__(*args, **kwargs)
            return instance
        spares.append(instance)
    pytest.skip(f"no new {cls.__name__} was given the freed object's memory")


class FakeResponse(io.BytesIO):
    """What ``urllib.request.urlopen`` gives: the body, and the length the server announced (none: a chunked
    reply)."""

    def __init__(self, body: bytes, length: int | None = None):
        super().__init__(body)
        self.headers = {} if length is None else {"Content-Length": str(length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def dynamo_traces_func_transform_check() -> bool:
    """Whether dynamo traces the library's ``torch.func`` check (``peek_interpreter_stack``) into a graph:
    torch 2.4's dynamo cannot (a graph break of its own, an error under ``fullgraph=True`` and a strict
    ``torch.export``); the phase layers ask it in every forward."""
    from kuramoto_attn._checks import in_func_transform

    try:
        torch.compile(in_func_transform, backend="eager", fullgraph=True)()
    except torch._dynamo.exc.Unsupported:
        return False
    return True
