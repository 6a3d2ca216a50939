"""Resume a DeepSpeed ZeRO-1/2 checkpoint with another data-parallel size.

DeepSpeed refuses to load ZeRO-1/2 optimizer shards written by another number of data-parallel
ranks, and its universal-checkpoint converter fails on bitsandbytes 8-bit state (PITFALLS.md). The
layout is simple enough to reshard ourselves: ZeRO flattens each param group into one vector and
rank r owns the r-th equal slice of it; the fp32 master weights and the optimizer's moments
(torch AdamW: ``exp_avg``/``exp_avg_sq``; bitsandbytes: ``state1``/``state2``, 8-bit blockwise or
32-bit) live as flat tensors over that slice. Each shard's ``param_slice_mappings`` says where each
named parameter's fragment sits in the slice.

``read_zero_state`` turns the shards into per-parameter fp32 tensors (8-bit moments dequantised),
which no longer depend on the layout; ``load_zero_state`` cuts them into the slices of an engine
built for the new world size (8-bit moments re-quantised with the same code and block size).
Everything is exact except that re-quantisation: 8-bit moments whose blocks of 256 now start at
other offsets get new block maxima, a difference well inside one quantisation step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.checkpoint_dir import load_torch_file

_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_BNB_WRAPPED = "__bnb_optimizer_quant_state__"  # bitsandbytes nests its tensors under this key
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizers quantise in blocks of 256


@dataclass
class GroupState:
    """One optimizer param group: its per-parameter tensors and how the optimizer keeps its moments."""

    names: list[str]
    master: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> flat fp32 master weights
    # key -> name -> flat fp32; bnb8 adds absmax1/absmax2: each element's block maximum
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    kind: str = "torch"  # "torch" (exp_avg/exp_avg_sq), "bnb32" or "bnb8" (state1/state2)
    step: object = None  # the optimizer's step counter for the group, as saved
    qmaps: dict[str, torch.Tensor] = field(default_factory=dict)  # bnb8: qmap1 / qmap2


@dataclass
class ZeroState:
    """Layout-independent optimizer state of a ZeRO-1/2 checkpoint."""

    groups: list[GroupState]
    loss_scaler: object = None
    dynamic_loss_scale: bool = False


def flat_groups(zero_optimizer) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Per param group: the low-precision parameters and this rank's flat fp32 master partition, of a ZeRO-1/2
    optimizer or of DeepSpeed's ``BF16_Optimizer`` (what bf16 + ZeRO-1 with fp32 gradient accumulation runs:
    the same flat layout and checkpoint keys under other attribute names, and no ``zero_stage`` key)."""
    if hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        return zero_optimizer.bf16_groups, zero_optimizer.fp32_groups_flat_partition
    return zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups


def _zero_stage_of(shard: dict) -> int:
    """The ZeRO stage a shard was written under; BF16_Optimizer (bf16 + ZeRO-1) writes none but a partition
    count, the same per-rank flat layout as ZeRO-1."""
    if "zero_stage" in shard:
        return int(shard["zero_stage"])
    return 1 if "partition_count" in shard and "single_partition_of_fp32_groups" in shard else -1


def zero_shard_files(step_dir: str | Path, mp_rank: int = 0) -> list[Path]:
    """The ZeRO-1/2 optimizer shard files of tensor-parallel rank ``mp_rank`` in a checkpoint step
    directory, by data-parallel rank (empty for ZeRO-0, whose optimizer state is in the model-states file)."""
    found = {}
    for path in Path(step_dir).iterdir():
        match = _SHARD.match(path.name)
        if match and int(match.group(2)) == mp_rank:
            found[int(match.group(1))] = path
    if found and sorted(found) != list(range(len(found))):
        raise ValueError(f"{step_dir}: ZeRO optimizer shards for ranks {sorted(found)}; some are missing")
    return [found[r] for r in range(len(found))]


def _moments_of(base_state: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, flat moment tensors) from one group's saved base-optimizer state."""
    state = dict(base_state)
    state.update(state.pop(_BNB_WRAPPED, {}))
    if "exp_avg" in state:
        return "torch", {k: state[k] for k in ("exp_avg", "exp_avg_sq")}
    if "state1" not in state:
        raise ValueError(f"unknown optimizer state keys {sorted(state)}: only torch AdamW and bitsandbytes "
                         "Adam-type states can be resharded")
    if state["state1"].dtype == torch.uint8:
        return "bnb8", {k: state[k] for k in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")}
    return "bnb32", {k: state[k] for k in ("state1", "state2")}


def _dequantize(moments: dict[str, torch.Tensor], index: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, per-element block maximum) of 8-bit blockwise state ``state{index}``: bitsandbytes stores
    ``code[q] * absmax[block]``. The block maximum travels with each element so that re-quantising in
    the same blocks reproduces the same codes (a block's largest value need not sit on code +-1)."""
    q = moments[f"state{index}"].long()
    n = q.numel()
    absmax = moments[f"absmax{index}"].float().repeat_interleave(BNB_BLOCKSIZE)[:n]
    return moments[f"qmap{index}"].float()[q] * absmax, absmax


def _quantize(values: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation as bitsandbytes does it (nearest code to value / block maximum), with
    each block's maximum the largest per-element maximum carried in it."""
    n = values.numel()
    padded = -n % BNB_BLOCKSIZE
    blocks = torch.nn.functional.pad(absmax, (0, padded)).view(-1, BNB_BLOCKSIZE).amax(dim=1)
    scale = blocks.repeat_interleave(BNB_BLOCKSIZE)[:n]
    normalized = torch.where(scale > 0, values / torch.where(scale > 0, scale, 1.0), 0.0)
    code = code.float()
    upper = torch.searchsorted(code, normalized).clamp(1, code.numel() - 1)
    nearer_lower = (normalized - code[upper - 1]).abs() <= (code[upper] - normalized).abs()
    return torch.where(nearer_lower, upper - 1, upper).to(torch.uint8), blocks


def read_zero_state(step_dir: str | Path, mp_rank: int = 0) -> ZeroState:
    """Read every ZeRO-1/2 shard of tensor-parallel rank ``mp_rank`` in ``step_dir`` into per-parameter
    fp32 tensors (under tensor parallelism: this rank's slices of the parameters)."""
    files = zero_shard_files(step_dir, mp_rank)
    if not files:
        raise ValueError(f"{step_dir} holds no ZeRO-1/2 optimizer shards")
    # weights_only with the allow-list of the types DeepSpeed pickles in them (checkpoint_dir.load_torch_file)
    shards = [load_torch_file(path)["optimizer_state_dict"] for path in files]
    stage = _zero_stage_of(shards[0])
    if stage not in (1, 2):
        raise ValueError(f"{files[0]} was written under ZeRO stage {stage}; only ZeRO-1/2 optimizer state can be "
                         "resharded to another data-parallel size (resume ZeRO-3 runs with their world size)")
    groups = []
    for g in range(len(shards[0]["param_slice_mappings"])):
        names = list(dict.fromkeys(name for shard in shards for name in shard["param_slice_mappings"][g]))
        group = GroupState(names=names)
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
        for shard in shards:
            base = shard["base_optimizer_state"]  # the optimizer's state_dict, or DeepSpeed's per-group list
            group_state = base["state"][g] if isinstance(base, dict) else base[g]
            kind, moments = _moments_of(group_state)
            group.kind, group.step = kind, group_state.get("step")
            if kind == "bnb8":
                group.qmaps = {"qmap1": moments["qmap1"], "qmap2": moments["qmap2"]}
                flat = {}
                for index in "12":
                    flat[f"state{index}"], flat[f"absmax{index}"] = _dequantize(moments, index)
            else:
                flat = {key: moments[key].float() for key in moments}
            master = shard["single_partition_of_fp32_groups"][g]
            for name, address in shard["param_slice_mappings"][g].items():
                cut = slice(address.start, address.start + address.numel)
                parts = pieces.setdefault(name, {"master": []})
                parts["master"].append(master[cut])
                for key, tensor in flat.items():
                    parts.setdefault(key, []).append(tensor[cut])
        for name in names:
            group.master[name] = torch.cat(pieces[name]["master"]).float()
            for key, parts in pieces[name].items():
                if key != "master":
                    group.moments.setdefault(key, {})[name] = torch.cat(parts)
        groups.append(group)
    return ZeroState(groups, shards[0].get("loss_scaler"), shards[0].get("dynamic_loss_scale", False))


def _check_sizes(group: GroupState, g: int, params: dict[str, torch.Tensor]) -> None:
    if sorted(group.names) != sorted(params):
        raise ValueError(f"optimizer param group {g}: the checkpoint holds {sorted(group.names)}, the model has "
                         f"{sorted(params)}; resharding needs the same model and param groups")
    for name, param in params.items():
        if group.master[name].numel() != param.numel():
            raise ValueError(f"parameter {name}: {group.master[name].numel()} elements in the checkpoint, "
                             f"{param.numel()} in the model")


def _partition(zero_optimizer, g: int, per_param: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's flat slice of group ``g`` built from full per-parameter tensors (zeros in the padding)."""
    lp_groups, hp_groups = flat_groups(zero_optimizer)
    out = torch.zeros(hp_groups[g].numel(), dtype=torch.float32)
    for lp in lp_groups[g]:
        mapping = lp._hp_mapping
        if mapping is None:  # no element of this parameter lives in this rank's slice
            continue
        src, dst = mapping.lp_fragment_address, mapping.hp_fragment_address
        name = zero_optimizer.param_names[lp]
        out[dst.start:dst.start + dst.numel] = per_param[name][src.start:src.start + src.numel]
    return out


def load_zero_state(engine, state: ZeroState) -> None:
    """Write ``state`` into ``engine``'s ZeRO-1/2 optimizer: this rank's fp32 master slices and the base
    optimizer's moments. Call after ``engine.load_checkpoint(..., load_optimizer_states=False)`` has
    loaded the module weights (the low-precision copies of the same masters)."""
    zero_optimizer = engine.optimizer
    base = zero_optimizer.optimizer
    if len(state.groups) != len(base.param_groups):
        raise ValueError(f"the checkpoint has {len(state.groups)} optimizer param groups, the optimizer "
                         f"{len(base.param_groups)}")
    template = base.state_dict()  # param_groups (hyper-parameters, param ids) of the new optimizer
    lp_groups, hp_groups = flat_groups(zero_optimizer)
    new_state = {}
    for g, group in enumerate(state.groups):
        params = {zero_optimizer.param_names[lp]: lp for lp in lp_groups[g]}
        _check_sizes(group, g, params)
        flat_masters = {name: t.flatten() for name, t in group.master.items()}
        hp = hp_groups[g]
        with torch.no_grad():
            hp.copy_(_partition(zero_optimizer, g, flat_masters).to(hp.device, hp.dtype))
        moments = {key: _partition(zero_optimizer, g, per_param) for key, per_param in group.moments.items()}
        device = hp.device
        if group.kind == "bnb8":
            entry = {"step": group.step}
            for index in ("1", "2"):
                code = group.qmaps[f"qmap{index}"]
                quantized, absmax = _quantize(moments[f"state{index}"], moments[f"absmax{index}"], code)
                entry.update({f"state{index}": quantized.to(device), f"absmax{index}": absmax.to(device),
                              f"qmap{index}": code.to(device)})
        else:
            entry = {"step": group.step, **{key: value.to(device) for key, value in moments.items()}}
        (param_id,) = template["param_groups"][g]["params"]
        new_state[param_id] = entry
    base.load_state_dict({"state": new_state, "param_groups": template["param_groups"]})
    if state.loss_scaler is not None:
        zero_optimizer.loss_scaler = state.loss_scaler
        zero_optimizer.dynamic_loss_scale = state.dynamic_loss_scale
