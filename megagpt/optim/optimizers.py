"""Build the optimizer: torch AdamW or bitsandbytes AdamW8bit / PagedAdamW8bit.

The 8-bit optimizers quantise Adam's two moments to 8 bits per element. Their authors advise
keeping the word embedding's state in 32 bits (rare tokens' rows see tiny, sparse updates that
8-bit block quantisation rounds away), which ``keep_embedding_state_32bit`` does.

Works with and without DeepSpeed ZeRO: pass the optimizer built here to ``deepspeed.initialize``
as a client optimizer (it needs ``"zero_allow_untested_optimizer": true``), then call
``keep_embedding_state_32bit`` on the engine's optimizer before the first step (see its docstring).
"""
from __future__ import annotations

from typing import Callable

import torch

OPTIMIZER_KINDS = ("adamw", "adamw8bit", "paged_adamw8bit")


def _check_hyperparameters(kind: str, lr: float, betas: tuple[float, float], eps: float) -> None:
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer kind={kind!r} is not one of {list(OPTIMIZER_KINDS)}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ValueError(f"optimizer lr must be a number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optimizer betas must be two numbers in [0, 1), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"optimizer eps must be > 0, got {eps!r}")


def build_optimizer(param_groups: list[dict], kind: str, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, device: str | torch.device = "cpu", *,
                    min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """An optimizer over ``param_groups`` (from ``build_param_groups``; each keeps its weight decay).

    ``kind``: ``"adamw"`` (torch, ``fused=True`` when ``device`` is CUDA), ``"adamw8bit"`` or
    ``"paged_adamw8bit"`` (bitsandbytes; paging only acts on CUDA). ``lr`` is the initial learning
    rate of every group (the LR schedule overwrites it each step). ``min_8bit_size``: bitsandbytes
    keeps tensors with fewer elements than this in 32-bit state anyway (its own default, 4096).
    """
    _check_hyperparameters(kind, lr, betas, eps)
    if not param_groups:
        raise ValueError("build_optimizer got no param groups (does the model have trainable parameters?)")
    betas = (float(betas[0]), float(betas[1]))
    if kind == "adamw":
        fused = torch.device(device).type == "cuda"
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=fused)
    # imported here: its import is slow and adamw runs without it
    from megagpt.optim.bitsandbytes_import import import_bitsandbytes

    bnb = import_bitsandbytes()

    optimizer_class = bnb.optim.AdamW8bit if kind == "adamw8bit" else bnb.optim.PagedAdamW8bit
    # weight_decay=0.0 is only the default for groups without their own value; ours all have one.
    return optimizer_class(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                           min_8bit_size=min_8bit_size)


def find_wrapped(optimizer, matches: Callable[[object], bool], depth: int = 4):
    """The first of ``optimizer`` and the optimizers inside it (DeepSpeed's engine, ZeRO and bf16 wrappers keep
    the one they wrap as ``.optimizer``), at most ``depth`` levels down, for which ``matches`` holds; or None."""
    for _ in range(depth + 1):
        if optimizer is None or matches(optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _unwrap_bnb_optimizer(optimizer):
    """The bitsandbytes optimizer inside ``optimizer`` (a DeepSpeed ZeRO optimizer or engine wraps it
    as ``.optimizer``), or None if there is none."""
    from megagpt.optim.bitsandbytes_import import import_bitsandbytes

    Optimizer8bit = import_bitsandbytes().optim.optimizer.Optimizer8bit
    return find_wrapped(optimizer, lambda o: isinstance(o, Optimizer8bit))


def _zero3_partitions(optimizer, group_indices: list[int]) -> list[torch.Tensor]:
    """The flat fp32 partitions a DeepSpeed ZeRO-3 optimizer (``optimizer`` or one it wraps) hands the base
    optimizer for the param groups ``group_indices``. ZeRO-3 empties every group's ``params`` after setup and
    puts one sub group's partition back for the length of each ``step``, so those partitions are what the
    8-bit optimizer keys its state by. ValueError when there is no such optimizer: marking nothing would
    silently give the group 8-bit state."""
    zero3 = find_wrapped(optimizer, lambda o: hasattr(o, "fp32_partitioned_groups_flat"))
    if zero3 is None:
        raise ValueError(f"optimizer param group(s) {group_indices} hold no tensors and {type(optimizer).__name__} "
                         "is not a DeepSpeed ZeRO-3 optimizer whose partitions could be marked instead")
    tensors = [flat for sub_group, flat in enumerate(zero3.fp32_partitioned_groups_flat)
               if zero3.sub_group_to_group_id[sub_group] in group_indices]
    if not tensors:
        raise ValueError(f"the ZeRO-3 optimizer has no fp32 partition for param group(s) {group_indices}")
    return tensors


def keep_embedding_state_32bit(optimizer, group_name: str = "embedding") -> int:
    """Make a bitsandbytes optimizer keep 32-bit state for every tensor of the group ``group_name``.

    Returns the number of tensors marked. Must run before the optimizer's first step (state is
    created on the first step; a tensor that already has 8-bit state raises ValueError). On
    resume, call it on the new optimizer too; loaded state keeps the dtype it was saved with.

    How: ``GlobalOptimManager.override_config(tensor, "optim_bits", 32)`` on the group's tensors,
    keyed by the tensors' identity, which bitsandbytes consults when it creates the state.

    Plain bitsandbytes optimizer: pass it; the group's tensors are the model's embedding weights.

    DeepSpeed ZeRO-1/2: call it AFTER ``deepspeed.initialize`` with ``engine.optimizer`` (the ZeRO
    optimizer; the bitsandbytes optimizer is found as its ``.optimizer``). ZeRO has by then
    replaced each group's ``params`` with this rank's flat fp32 partition of the group
    (``single_partition_of_fp32_groups[i]``), keeping the group's other keys, ``name`` included;
    those flat partitions are what get marked. Marking the model's parameters before initialize
    does not work: the optimizer never sees them (PITFALLS.md). DeepSpeed ``BF16_Optimizer`` (bf16 +
    ZeRO-1 with fp32 gradient accumulation) does the same. ZeRO-3 empties ``params`` instead and hands the
    base optimizer one flat fp32 partition per sub group at step time: those are marked (``_zero3_partitions``).

    ``GlobalOptimManager`` is a process-wide singleton keyed by ``id(tensor)``: keep the optimizer
    alive while it is in use, and reset the manager (``GlobalOptimManager._instance = None``)
    between independent runs in one process, e.g. in tests.
    """
    bnb_optimizer = _unwrap_bnb_optimizer(optimizer)
    if bnb_optimizer is None:
        raise TypeError(f"keep_embedding_state_32bit needs a bitsandbytes optimizer (or a DeepSpeed one "
                        f"wrapping it), got {type(optimizer).__name__}; torch AdamW already keeps "
                        f"32-bit state for fp32 parameters, so do not call it for kind='adamw'")
    indices = [i for i, g in enumerate(bnb_optimizer.param_groups) if g.get("name") == group_name]
    if not indices:
        raise ValueError(f"no optimizer param group named {group_name!r}; groups present: "
                         f"{[g.get('name') for g in bnb_optimizer.param_groups]} "
                         f"(build the groups with megagpt.optim.build_param_groups)")
    tensors = [p for i in indices for p in bnb_optimizer.param_groups[i]["params"]]
    if not tensors:
        tensors = _zero3_partitions(optimizer, indices)
    for tensor in tensors:
        state = bnb_optimizer.state.get(tensor, {})
        if "state1" in state and state["state1"].dtype != torch.float32:
            raise ValueError(f"the {group_name!r} group already has {state['state1'].dtype} optimizer "
                             "state: call keep_embedding_state_32bit before the first optimizer step (or the "
                             "state was loaded from a checkpoint written without it)")
    # The manager the optimizer captured when it was built (the singleton may have been reset since).
    bnb_optimizer.mng.override_config(tensors, key_value_dict={"optim_bits": 32})
    return len(tensors)


PAGED_STATE_KEYS = ("state1", "state2")  # what bitsandbytes allocates with get_state_buffer (paged when asked)


def restore_paged_state(optimizer) -> int:
    """Put the loaded moments of a paged bitsandbytes optimizer back into paged memory; returns how many
    tensors were replaced (0 for any other optimizer).

    ``load_state_dict`` (DeepSpeed's checkpoint load, ``megagpt.zero_checkpoint.load_zero_state``) fills the
    state with ordinary device tensors, so a resumed ``paged_adamw8bit`` run would silently keep its moments
    in GPU memory for good. Each ``state1``/``state2`` is copied into a buffer from the optimizer's own
    ``get_state_buffer``, which pages exactly what a fresh run pages (CUDA tensors of >= 1e5 elements; on
    CPU bitsandbytes does not page at all). Call after every load of optimizer state."""
    bnb_optimizer = _unwrap_bnb_optimizer(optimizer)
    if bnb_optimizer is None or not bnb_optimizer.is_paged:
        return 0
    replaced = 0
    for state in bnb_optimizer.state.values():
        for key in PAGED_STATE_KEYS:
            value = state.get(key)
            # bitsandbytes never pages CPU tensors (its CPU fallback): nothing to restore there
            if (isinstance(value, torch.Tensor) and value.device.type != "cpu"
                    and not getattr(value, "is_paged", False)):
                buffer = bnb_optimizer.get_state_buffer(value, dtype=value.dtype)
                buffer.copy_(value)
                state[key] = buffer
                replaced += 1
    return replaced
