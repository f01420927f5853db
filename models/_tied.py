"""The language models' output head tied to their token embedding (``head.weight`` is ``tok_emb.weight``, one
``Parameter``), kept tied through what would untie it.

torch's ``to_empty`` (after construction on the meta device), ``.to("meta")`` and other conversions that cannot
change a tensor in place give each module a new ``Parameter`` of its own, and ``load_state_dict(assign=True)``
assigns each key its own tensor: the head was then a second parameter, trained apart from the embedding (its own
gradient, optimizer state and weight decay). A model calls :func:`tie_after_load` once and routes its ``_apply``
through :func:`apply_tied`; a head untied or replaced on purpose is left as it is.

A tied model's state dict names the one tensor twice. One that holds it once (``safetensors``' ``save_model`` keeps
one name of a shared tensor) loads into both names, so that ``assign=True`` keeps the model tied (the other name kept
its initial weights before); the name it lacks is still reported missing, as torch reports it and as
``safetensors.torch.load_model`` expects. One whose head and embedding differ (saved from a model untied on purpose)
is an error, as the tied model cannot hold both: before, the head's values silently overwrote the embedding's.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def apply_tied(model: nn.Module, apply, fn, recurse: bool) -> nn.Module:
    """``apply(fn, recurse)`` (the model's ``nn.Module._apply``), the head tied again after it if it was before."""
    head, embedding = _weights(model)
    tied = isinstance(head, nn.Parameter) and head is embedding
    apply(fn, recurse)
    if tied:
        model.head.weight = model.tok_emb.weight
    return model


def tie_after_load(model: nn.Module) -> None:
    """Register :func:`_load_tied` to run before and :func:`_tie_loaded` after every ``load_state_dict`` of
    ``model``."""
    # the public name of the pre-hook is torch 2.5+; the private one (with_module=True) is what it calls
    register = getattr(model, "register_load_state_dict_pre_hook", None) or \
        functools.partial(model._register_load_state_dict_pre_hook, with_module=True)
    register(_load_tied)
    model.register_load_state_dict_post_hook(_tie_loaded)


def _weights(model: nn.Module) -> tuple:
    """``(head.weight, tok_emb.weight)``, ``None`` for either that is missing (e.g. a head replaced by the user)."""
    return tuple(getattr(getattr(model, name, None), "weight", None) for name in ("head", "tok_emb"))


def _load_tied(model: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
               unexpected_keys, error_msgs: list) -> None:
    """Before a tied model loads ``state_dict`` (its own copy, which torch's children are loaded from): one tensor
    under both names (a name it lacked added to ``missing_keys``), or an error in ``error_msgs`` where the two
    differ."""
    model.__dict__.pop("_tie_after_this_load", None)  # left by a load that raised midway
    head, embedding = _weights(model)
    if not (isinstance(head, nn.Parameter) and head is embedding):
        return  # untied or replaced on purpose: each key is loaded where it belongs
    names = (f"{prefix}head.weight", f"{prefix}tok_emb.weight")
    loaded = [state_dict.get(name) for name in names]
    if loaded[0] is None and loaded[1] is None:
        return  # neither: missing as any other key
    if loaded[0] is not None and loaded[1] is not None:
        if getattr(loaded[0], "shape", None) != getattr(loaded[1], "shape", None):
            return  # torch's size check names the one that does not fit
        if _differ(*loaded):
            error_msgs.append(f"{names[0]} and {names[1]} differ, but this model's head is tied to its embedding "
                              "and holds one of them; untie it first to load both (model.head.weight = "
                              "torch.nn.Parameter(model.tok_emb.weight.detach().clone()))")
            return
    missing_keys.extend(name for name, tensor in zip(names, loaded) if tensor is None)
    state_dict[names[0]] = state_dict[names[1]] = loaded[1] if loaded[1] is not None else loaded[0]
    model._tie_after_this_load = True  # assign=True gives each name a Parameter of its own: _tie_loaded ties them


def _differ(a, b) -> bool:
    """Whether two loaded tensors of one shape hold different values, also in other dtypes or on other devices (not
    comparable: on the meta device, or tensor subclasses such as sharded ones: not counted)."""
    if not {type(a), type(b)} <= {torch.Tensor, nn.Parameter} or a.is_meta or b.is_meta:
        return False
    if a.device == b.device and a.dtype == b.dtype and a.stride() == b.stride() and a.storage_offset() == \
            b.storage_offset() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
        return False  # one tensor, as a tied model's state_dict() gives it
    dtype = torch.promote_types(a.dtype, b.dtype)
    return not torch.allclose(a.to(dtype), b.to(device=a.device, dtype=dtype), rtol=0, atol=0, equal_nan=True)


def _tie_loaded(model: nn.Module, incompatible_keys) -> None:
    """After ``load_state_dict(assign=True)``: one ``Parameter`` again where :func:`_load_tied` gave both names of a
    tied model one tensor, or where the two keys of the state dict a model untied at the time loaded hold views of
    one storage (a module-level function: a model with it can be pickled)."""
    head, embedding = _weights(model)
    if model.__dict__.pop("_tie_after_this_load", False):  # _load_tied made both names one tensor (also meta ones)
        if isinstance(head, nn.Parameter) and isinstance(embedding, nn.Parameter) and head is not embedding:
            model.head.weight = embedding
        return
    if isinstance(head, nn.Parameter) and isinstance(embedding, nn.Parameter) and head is not embedding \
            and head.device == embedding.device and head.device.type != "meta" \
            and (head.data_ptr(), head.dtype, head.shape, head.stride()) == \
            (embedding.data_ptr(), embedding.dtype, embedding.shape, embedding.stride()):
        model.head.weight = embedding
