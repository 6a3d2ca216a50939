"""Resume training from a universal checkpoint in any (tp, pp, dp) layout, ZeRO stage 0/1/2 (pp=1) or 1 (pp>1).

Every rank cuts its tensor-parallel slice out of each full tensor (along the parameter's split dim) and
loads it into the module; in a pipeline (DeepSpeed PipelineModule) a stage loads the parameters it holds,
its names mapped onto the GPT's (``readers.PipelineNames``; the tied embedding on the first and last stage
both get the same copy). Then the optimizer:

* ZeRO-1/2: the slices become per-parameter tensors of this tp rank and go through
  ``zero_checkpoint.load_zero_state``, which cuts this data-parallel rank's flat partition out of them
  (fp32 masters, moments; 8-bit moments re-quantised);
* ZeRO-0: one torch/bitsandbytes state entry per parameter, built here.

bitsandbytes decides per optimizer tensor whether its state is 8-bit (``optim_bits`` 8, at least
``min_8bit_size`` elements, no 32-bit override such as the embedding group's); that decision is taken
again for the new layout, because ZeRO's flat partitions change size with tp and dp. 8-bit state is
quantised with each element's carried block maximum (the maximum of a new block is the largest one it
holds), so the same layout reproduces the saved codes exactly; values that were 32-bit use their own
magnitude. Moments saved by torch AdamW load into torch AdamW only, bitsandbytes ones into bitsandbytes.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from megagpt.convert.readers import PipelineNames
from megagpt.convert.universal import Universal, consolidate, load_universal
from megagpt.optim.optimizers import find_wrapped
from megagpt.zero_checkpoint import GroupState, ZeroState, _quantize, flat_groups, load_zero_state

TORCH_MOMENTS, BNB_MOMENTS = ("exp_avg", "exp_avg_sq"), ("state1", "state2")
# A checkpoint whose tensor- or pipeline-parallel size differs from the run's is consolidated in memory on EVERY rank
# (full fp32 weights + moments: ~12-20 bytes per parameter per rank). Above this many bytes of checkpoint
# files that is refused: convert once with tools/convert_checkpoint.py and resume from the result.
IN_MEMORY_LIMIT_BYTES = 4 * 2**30


def tp_coords(engine) -> tuple[int, int]:
    """(tensor-parallel rank, size) of this engine's rank."""
    mpu = engine.mpu
    if mpu is None:
        return 0, 1
    rank = getattr(mpu, "get_slice_parallel_rank", mpu.get_model_parallel_rank)()
    size = getattr(mpu, "get_slice_parallel_world_size", mpu.get_model_parallel_world_size)()
    return rank, size


def tp_slice(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``full`` along ``dim`` (all of it for None), as the layers cut it."""
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of a {tuple(full.shape)} tensor is not divisible by the tensor-parallel "
                         f"size {size}")
    chunk = full.shape[dim] // size
    return full.narrow(dim, rank * chunk, chunk)


def _bnb_optimizer(optimizer):
    """The bitsandbytes optimizer inside ``optimizer`` (a ZeRO optimizer wraps it as ``.optimizer``), or None;
    without importing bitsandbytes for a torch optimizer."""
    return find_wrapped(optimizer, lambda o: type(o).__module__.startswith("bitsandbytes"))


def _is_8bit(bnb_optimizer, g: int, p_index: int, tensor: torch.Tensor) -> bool:
    """Whether bitsandbytes would create 8-bit state for this optimizer tensor (as its ``init_state``)."""
    config = bnb_optimizer.get_config(g, p_index, bnb_optimizer.param_groups[g])
    return config["optim_bits"] == 8 and tensor.numel() >= config["min_8bit_size"]


def _local_moments(universal: Universal, name: str, dim, rank: int, size: int, eight_bit: bool) -> dict:
    """This tp rank's slices of ``name``'s moments, in the target's form: torch ``exp_avg``/``exp_avg_sq``;
    bitsandbytes values ``state1``/``state2`` plus, for 8-bit targets, per-element maxima ``absmax1/2`` (the
    carried ones, or the values' own magnitude where the source state was 32-bit)."""
    full = universal.moments[name]
    keys = TORCH_MOMENTS if universal.optimizer == "torch" else BNB_MOMENTS
    out = {key: tp_slice(full[key], dim, rank, size) for key in keys}
    if eight_bit:
        for index in "12":
            carried = full.get(f"absmax{index}")
            out[f"absmax{index}"] = (tp_slice(carried, dim, rank, size) if carried is not None
                                     else out[f"state{index}"].abs())
    return out


def _codes(universal: Universal) -> dict[str, torch.Tensor]:
    if universal.codes:
        return universal.codes
    from megagpt.optim.bitsandbytes_import import import_bitsandbytes

    F = import_bitsandbytes().functional  # what bitsandbytes' own 8-bit state starts from

    return {"qmap1": F.create_dynamic_map(signed=True), "qmap2": F.create_dynamic_map(signed=False)}


def _step_value(universal: Universal, bnb: bool):
    return int(universal.step) if bnb else torch.tensor(float(universal.step), dtype=torch.float32)


def _check_family(universal: Universal, bnb: bool) -> None:
    wanted = "bitsandbytes" if bnb else "torch"
    if universal.optimizer != wanted:
        raise ValueError(f"the checkpoint holds {universal.optimizer} optimizer state and this run uses a {wanted} "
                         "optimizer (optimizer.kind): resume with the optimizer family it was written with")


def _load_zero12(engine, universal: Universal, rank: int, size: int, to_gpt=lambda name: name) -> None:
    """``to_gpt``: the GPT name of one of the engine's parameter names (a pipeline's differ)."""
    zero_optimizer = engine.optimizer
    bnb = _bnb_optimizer(zero_optimizer)
    _check_family(universal, bnb is not None)
    groups = []
    lp_groups, hp_groups = flat_groups(zero_optimizer)
    for g, lp_params in enumerate(lp_groups):
        names = [zero_optimizer.param_names[lp] for lp in lp_params]
        flat_partition = hp_groups[g]
        kind = "torch" if bnb is None else ("bnb8" if _is_8bit(bnb, g, 0, flat_partition) else "bnb32")
        group = GroupState(names=names, kind=kind, step=_step_value(universal, bnb is not None))
        if kind == "bnb8":
            group.qmaps = _codes(universal)
        for name in names:
            gpt_name = to_gpt(name)
            dim = universal.split_dims[gpt_name]
            group.master[name] = tp_slice(universal.weights[gpt_name], dim, rank, size).flatten()
            for key, value in _local_moments(universal, gpt_name, dim, rank, size, kind == "bnb8").items():
                group.moments.setdefault(key, {})[name] = value.flatten()
        groups.append(group)
    load_zero_state(engine, ZeroState(groups))


def _quantized_entry(values: dict, codes: dict, shape: torch.Size, device) -> dict:
    entry = {}
    for index in "12":
        code = codes[f"qmap{index}"]
        quantized, absmax = _quantize(values[f"state{index}"].flatten(), values[f"absmax{index}"].flatten(), code)
        entry.update({f"state{index}": quantized.view(shape).to(device), f"absmax{index}": absmax.to(device),
                      f"qmap{index}": code.to(device)})
    return entry


def _load_zero0(engine, universal: Universal, rank: int, size: int) -> None:
    """ZeRO-0: the engine steps the client optimizer itself; give it one state entry per parameter."""
    optimizer = engine.optimizer
    bnb = _bnb_optimizer(optimizer)
    _check_family(universal, bnb is not None)
    if bnb is not None:
        optimizer = bnb
    names = {id(p): name for name, p in engine.module.named_parameters()}
    template = optimizer.state_dict()
    state = {}
    for g, group in enumerate(optimizer.param_groups):
        for p_index, param in enumerate(group["params"]):
            name = names[id(param)]
            eight_bit = bnb is not None and _is_8bit(bnb, g, p_index, param)
            values = _local_moments(universal, name, universal.split_dims[name], rank, size, eight_bit)
            entry = {"step": _step_value(universal, bnb is not None)}
            if eight_bit:
                entry.update(_quantized_entry(values, _codes(universal), param.shape, param.device))
            else:
                # copies: a view would keep the whole (all-tp-ranks) tensor alive and be strided for split dim 1
                entry.update({k: torch.empty(param.shape, dtype=torch.float32, device=param.device).copy_(values[k])
                              for k in (BNB_MOMENTS if bnb is not None else TORCH_MOMENTS)})
            state[template["param_groups"][g]["params"][p_index]] = entry
    optimizer.load_state_dict({"state": state, "param_groups": template["param_groups"]})


def load_into_engine(engine, universal: Universal) -> None:
    """Load ``universal`` into ``engine`` (built for any tp/dp, ZeRO 0/1/2; or a pipeline, ZeRO-1): this rank's
    slices of the module weights (a pipeline stage: of the parameters it holds), the optimizer's masters and
    moments, and DeepSpeed's step counters."""
    from megagpt.convert.weights import load_weights_into_module

    if universal.optimizer == "none":
        raise ValueError("this consolidated checkpoint holds weights only (no optimizer state), so it cannot be "
                         "resumed; start a new run from it with checkpoint.init_from instead")
    pipeline = getattr(engine, "num_stages", 1) > 1
    rank, size = tp_coords(engine)
    to_gpt = PipelineNames.for_module(engine.module).to_gpt if pipeline else (lambda name: name)
    if pipeline and engine.zero_optimization_stage() != 1:
        raise ValueError(f"resuming a universal checkpoint in a pipeline needs ZeRO-1, this run has "
                         f"ZeRO-{engine.zero_optimization_stage()}")
    load_weights_into_module(engine.module, universal.weights, universal.split_dims, rank, size,
                             to_gpt if pipeline else None, source="the universal checkpoint")
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        _load_zero12(engine, universal, rank, size, to_gpt)
    elif stage == 0:
        if engine.fp16_enabled() or engine.bfloat16_enabled():  # a wrapper keeps its own fp32 masters
            raise NotImplementedError("resuming a universal checkpoint under ZeRO-0 needs parallel.precision='fp32'")
        _load_zero0(engine, universal, rank, size)
    else:
        raise ValueError(f"resuming from a universal checkpoint under ZeRO-{stage} is not supported (ZeRO-0/1/2 are)")
    for key, value in universal.engine_state.items():
        setattr(engine, key, value)


def reseed_for_new_layout(engine, seed: int, step: int, rank: int) -> None:
    """Seed python/numpy/torch RNGs from (seed, step, rank // tp) after resuming in another layout, where the
    old ranks' streams cannot be mapped onto the new ones. Tensor-parallel ranks are adjacent, so one group
    shares a stream (its ranks must draw the same dropout masks) and other groups differ."""
    value = seed * 1_000_003 + step * 1_009 + rank // tp_coords(engine)[1]
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def resume_from_universal(engine, universal: Universal, rank: int, seed: int, origin: str) -> dict:
    """``load_into_engine``, reseed the RNGs, and return the client state as ``engine.load_checkpoint`` would
    (``{"megagpt": ...}``). The old ranks' RNG streams do not map onto a new layout: each rank is reseeded from
    (seed, step, tensor-parallel group), so the ranks of one tensor-parallel group keep drawing the same dropout."""
    load_into_engine(engine, universal)
    reseed_for_new_layout(engine, seed, universal.training_step, rank)
    if rank == 0:
        drift = universal.source.get("replicas_differing")
        print(f"note: resumed from {origin} (written as {universal.source.get('layout', '?')}, "
              f"weights {universal.weights_dtype}); RNG streams reseeded per tensor-parallel group"
              + (f"; {len(drift)} replicated parameters differed between tp ranks or pipeline stages (tp rank 0's / "
                 "the first stage's kept)" if drift else ""),
              flush=True)
    return {"megagpt": universal.client_state}


def resume_universal_dir(engine, directory: str | Path, rank: int, seed: int) -> dict:
    """Resume from a universal checkpoint directory (``tools/convert_checkpoint.py --to universal``)."""
    return resume_from_universal(engine, load_universal(directory), rank, seed, f"universal checkpoint {directory}")


def _layout_changes(step_dir: Path, engine) -> list[str]:
    """``["parallel.tp=2 -> 1", ...]`` for the model-parallel sizes (tp, pp) that differ between ``step_dir``'s
    config.json and this engine."""
    saved = json.loads((Path(step_dir) / "config.json").read_text()).get("parallel", {})
    now = {"tp": tp_coords(engine)[1], "pp": getattr(engine, "num_stages", 1)}
    return [f"parallel.{key}={saved.get(key, 1)} -> {now[key]}" for key in ("tp", "pp")
            if saved.get(key, 1) != now[key]]


def model_parallel_layout_changed(step_dir: Path, engine) -> bool:
    """True when ``step_dir`` was written with another tensor- or pipeline-parallel size than this run's: then
    it is resumed through a consolidation (``resume_converted_in_memory``)."""
    return bool(_layout_changes(step_dir, engine))


def resume_converted_in_memory(engine, step_dir: Path, rank: int, seed: int) -> dict:
    """Resume a checkpoint of another tensor/pipeline-parallel size: every rank consolidates it in memory."""
    size = sum(f.stat().st_size for f in Path(step_dir).iterdir() if f.is_file())
    changes = ", ".join(_layout_changes(step_dir, engine))
    if size > IN_MEMORY_LIMIT_BYTES:
        raise ValueError(f"{step_dir} was written with another layout than this run's ({changes}); at "
                         f"{size / 2**30:.1f} GiB it is too large to convert in memory on every rank: run python "
                         f"tools/convert_checkpoint.py --load {step_dir} --to universal --output DIR once, then "
                         "resume with --load DIR")
    origin = f"{step_dir}, converted in memory on every rank ({changes})"
    return resume_from_universal(engine, consolidate(step_dir), rank, seed, origin)
