"""The language models' output head tied to their token embedding (``head.weight`` is ``tok_emb.weight``, one
``Parameter``), kept tied through what would untie it.

torch's ``to_empty`` (after construction on the meta device), ``.to("meta")`` and other conversions that cannot
change a tensor in place give each module a new ``Parameter`` of its own, and ``load_state_dict(assign=True)``
assigns each key its own tensor: the head was then a second parameter, trained apart from the embedding (its own
gradient, optimizer state and weight decay). A model calls :func:`tie_after_load` once and routes its ``_apply``
through :func:`apply_tied`; a head untied or replaced on purpose is left as it is.
"""

from __future__ import annotations

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
    """Register :func:`_tie_loaded` to run after every ``load_state_dict`` of ``model``."""
    model.register_load_state_dict_post_hook(_tie_loaded)


def _weights(model: nn.Module) -> tuple:
    """``(head.weight, tok_emb.weight)``, ``None`` for either that is missing (e.g. a head replaced by the user)."""
    return tuple(getattr(getattr(model, name, None), "weight", None) for name in ("head", "tok_emb"))


def _tie_loaded(model: nn.Module, incompatible_keys) -> None:
    """After ``load_state_dict(assign=True)`` of a tied model's state dict, whose two keys hold views of one
    storage: one ``Parameter`` again (a module-level function: a model with it can be pickled)."""
    head, embedding = _weights(model)
    if isinstance(head, nn.Parameter) and isinstance(embedding, nn.Parameter) and head is not embedding \
            and head.device == embedding.device and head.device.type != "meta" \
            and (head.data_ptr(), head.dtype, head.shape, head.stride()) == \
            (embedding.data_ptr(), embedding.dtype, embedding.shape, embedding.stride()):
        model.head.weight = embedding
