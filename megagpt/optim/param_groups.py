"""Split a model's parameters into named optimizer param groups: decay, no_decay, embedding.

Weight decay on biases and LayerNorm gains only pulls them towards zero for no benefit, and decay
on embeddings shrinks the rows of rare tokens (they get almost no gradient), so by default neither
is decayed. The embeddings always get a group of their own, even when decayed, because that group
is how the 8-bit optimizers keep the word embedding's state in 32 bits (see ``optimizers.py``):
under DeepSpeed ZeRO-1/2 each group is flattened into one tensor, so a per-group choice is the
only per-parameter choice that survives.
"""
from __future__ import annotations

from torch import nn

DECAY, NO_DECAY, EMBEDDING = "decay", "no_decay", "embedding"

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _is_embedding(module: nn.Module) -> bool:
    # Tensor-parallel vocab embeddings (e.g. a ``VocabParallelEmbedding``) are not nn.Embedding
    # subclasses, so the class name is accepted too.
    return isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def classify_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{"decay" | "no_decay" | "embedding": [(qualified name, parameter), ...]}``, each trainable
    parameter exactly once (a tied weight is listed once, under the first module that owns it).

    embedding: weights of embedding modules; no_decay: biases, norm parameters and any other
    tensor with fewer than 2 dimensions; decay: everything else (linear weights, an untied head).
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {DECAY: [], NO_DECAY: [], EMBEDDING: []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if _is_embedding(module):
                kind = EMBEDDING
            elif _is_norm(module) or param_name == "bias" or param.ndim < 2:
                kind = NO_DECAY
            else:
                kind = DECAY
            groups[kind].append((name, param))
    return groups


def _split_replicated(group: dict) -> list[dict]:
    """``group`` as two groups: tensor-parallel shards, then the tensors every tensor-parallel rank holds
    whole (``<name>_replicated``). Why: ZeRO flattens a group into one vector and an 8-bit optimizer
    quantises it in blocks of 256; a block mixing shards (different on each rank) with replicated
    tensors would give the replicated tensors slightly different updates on each rank, and the copies
    would drift apart. In a group of their own, every rank quantises identical vectors."""
    split = [p for p in group["params"] if getattr(p, "tensor_model_parallel", False)]
    whole = [p for p in group["params"] if not getattr(p, "tensor_model_parallel", False)]
    return [{**group, "params": split}, {**group, "name": f"{group['name']}_replicated", "params": whole}]


def build_param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False,
                       decay_norms_and_biases: bool = False, separate_replicated: bool = False) -> list[dict]:
    """Optimizer param groups for ``model``, each a dict with ``name``, ``params``, ``weight_decay``.

    Names: ``"decay"`` (weight decay ``weight_decay``), ``"no_decay"`` (0.0) and ``"embedding"``
    (``weight_decay`` if ``decay_embeddings`` else 0.0). With ``decay_norms_and_biases`` the
    biases and norms join the ``"decay"`` group. ``separate_replicated`` (tensor parallelism): the decay and
    no-decay groups are each split into shards and ``"<name>_replicated"`` tensors (see
    ``_split_replicated``; the embedding group keeps 32-bit state, where this cannot happen).
    Empty groups are left out (ZeRO cannot flatten an
    empty group). No ``param_names`` key is added on purpose: ZeRO replaces
    ``params`` by one flat tensor and torch checks ``param_names`` against ``params``.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    for flag_name, flag in (("decay_embeddings", decay_embeddings),
                            ("decay_norms_and_biases", decay_norms_and_biases)):
        if not isinstance(flag, bool):
            raise ValueError(f"{flag_name} must be true or false, got {flag!r}")
    classified = classify_parameters(model)
    decay_params = [p for _, p in classified[DECAY]]
    no_decay_params = [p for _, p in classified[NO_DECAY]]
    if decay_norms_and_biases:
        decay_params += no_decay_params
        no_decay_params = []
    groups = [
        {"name": DECAY, "params": decay_params, "weight_decay": float(weight_decay)},
        {"name": NO_DECAY, "params": no_decay_params, "weight_decay": 0.0},
        {"name": EMBEDDING, "params": [p for _, p in classified[EMBEDDING]],
         "weight_decay": float(weight_decay) if decay_embeddings else 0.0},
    ]
    if separate_replicated:
        groups = [*_split_replicated(groups[0]), *_split_replicated(groups[1]), groups[2]]
    return [g for g in groups if g["params"]]


def param_group_by_name(param_groups: list[dict], name: str) -> dict:
    """The group called ``name``; ValueError listing the names present if there is none."""
    for group in param_groups:
        if group.get("name") == name:
            return group
    raise ValueError(f"no optimizer param group named {name!r}; groups present: "
                     f"{[g.get('name') for g in param_groups]}")

