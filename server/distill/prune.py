"""Depth pruning: a student made from a teacher by keeping a subset of its decoder layers.

The student copies the teacher's embeddings, final norm, LM head and the kept layers'
weights; its config gets the new ``num_hidden_layers`` (and ``layer_types`` where the
architecture has one), and each kept attention module is re-numbered with its new position
(``layer_idx`` is what the KV cache is indexed by).

Layer specs (``parse_keep``), for a teacher of 30 layers:

    half          15 layers evenly spaced, first and last included (the default)
    every:3       0, 3, 6, ..., 27 and the last layer, 29
    first:4       0, 1, 2, 3 and the last layer
    0,2,4-7,29    exactly these (ranges inclusive)
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

__all__ = ["PruneError", "decoder_layers", "parse_keep", "prune_layers"]


class PruneError(ValueError):
    """A layer spec is malformed or names layers the teacher does not have."""


def _evenly_spaced(n_layers: int, count: int) -> list[int]:
    """``count`` layer ids spread evenly over ``0 .. n_layers - 1``, first and last included.

    Example: ``_evenly_spaced(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]``.
    """
    if count == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def _explicit(spec: str) -> list[int]:
    ids: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise PruneError(f"layer spec {spec!r}: {part!r} is not a layer id or an inclusive range like 4-7")
        ids.update(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    return sorted(ids)


def _count_after(spec: str, prefix: str) -> int:
    value = spec.removeprefix(prefix)
    if not value.isdigit() or int(value) < 1:
        raise PruneError(f"layer spec {spec!r}: expected a positive integer after {prefix!r}")
    return int(value)


def parse_keep(spec: str, n_layers: int) -> list[int]:
    """Turn a layer spec (see the module docstring) into sorted teacher layer ids.

    Raises:
        PruneError: the spec is malformed, keeps no layer, keeps every layer, or names a
            layer id outside ``0 .. n_layers - 1``.
    """
    spec = spec.strip()
    if spec == "half":
        keep = _evenly_spaced(n_layers, max(1, n_layers // 2))
    elif spec.startswith("every:"):
        keep = sorted(set(range(0, n_layers, _count_after(spec, "every:"))) | {n_layers - 1})
    elif spec.startswith("first:"):
        keep = sorted(set(range(min(_count_after(spec, "first:"), n_layers))) | {n_layers - 1})
    else:
        keep = _explicit(spec)
    bad = [i for i in keep if i >= n_layers]
    if bad:
        raise PruneError(
            f"layer spec {spec!r}: layers {bad} do not exist (the teacher has {n_layers}: 0..{n_layers - 1})"
        )
    if not keep:
        raise PruneError(f"layer spec {spec!r} keeps no layer")
    if len(keep) == n_layers:
        raise PruneError(f"layer spec {spec!r} keeps all {n_layers} layers: that is the teacher, not a pruned student")
    return keep


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder layer list of a Llama-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PruneError(f"{type(model).__name__} has no model.layers list: depth pruning needs a Llama-family model")
    return layers


def prune_layers(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new model holding copies of the teacher's weights with only the ``keep`` layers.

    The teacher is not modified. The student's layer ``j`` is a copy of teacher layer
    ``keep[j]`` with its attention ``layer_idx`` set to ``j``.

    Args:
        teacher: A Llama-family causal LM.
        keep: Sorted, distinct teacher layer ids (see :func:`parse_keep`).

    Returns:
        The student, in eval mode, same dtype as the teacher.
    """
    layers = decoder_layers(teacher)
    if sorted(set(keep)) != list(keep) or not keep or keep[-1] >= len(layers):
        raise PruneError(f"keep must be sorted distinct ids in 0..{len(layers) - 1}, got {keep}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
        student = type(teacher)(config).to(teacher.dtype)
    renamed = {}
    for name, tensor in teacher.state_dict().items():
        new_name = _renamed(name, keep)
        if new_name is not None:
            renamed[new_name] = tensor
    student.load_state_dict(renamed, strict=True)  # copies, so the student shares no storage
    student.generation_config = copy.deepcopy(teacher.generation_config)
    for j, layer in enumerate(decoder_layers(student)):
        if hasattr(layer, "self_attn"):
            layer.self_attn.layer_idx = j
    return student.eval()


def _renamed(name: str, keep: list[int]) -> str | None:
    """``model.layers.<i>.x`` -> ``model.layers.<keep.index(i)>.x``; None if layer i is dropped."""
    prefix = "model.layers."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix) :].partition(".")
    if int(index) not in keep:
        return None
    return f"{prefix}{keep.index(int(index))}.{rest}"
