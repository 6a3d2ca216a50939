"""Layout-independent ("universal") checkpoints: one consolidated copy of a training checkpoint.

``consolidate(step_dir)`` merges every tensor-parallel rank's slices (megagpt/convert/readers.py) into full
per-parameter tensors keyed by the GPT's state-dict names: fp32 master weights, optimizer moments as fp32
(8-bit ones dequantised, each element keeping its block maximum), the optimizer step, the client state
(loader, schedules, counters) and the resolved config. Split parameters are concatenated along their
``tp_split_dim`` (the QKV layout [heads, 3, head_dim] makes dim-0 concatenation right); replicated ones
must agree on every tp rank.

On disk (``save_universal`` / ``load_universal``; safetensors, no pickle)::

    out/model.safetensors      weights, fp32 or bf16
    out/optimizer.safetensors  (absent in a weights-only checkpoint) "{moment}/{name}" (exp_avg, exp_avg_sq | state1, state2, absmax1, absmax2), fp32;
                               "qmap1"/"qmap2": the bitsandbytes 8-bit codes
    out/config.json            the resolved config of the run that wrote it
    out/state.json             format, optimizer family and step, 8-bit parameters, split dims, client state,
                               the layout it was read from; written last

It is written as ``out.partial`` and renamed at the end, so a directory named ``out`` is always complete,
and ``is_universal_dir`` never accepts a half-written one. megagpt/convert/resume.py loads it into an
engine of any (tp, pp, dp) layout and ZeRO stage 0/1/2 (pipelines: ZeRO-1).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.config import Config
from megagpt.convert.readers import (Layout, ParamShard, load_model_states, param_layout, read_layout,
                                     read_tp_shards, resolve_step_dir)

FORMAT, VERSION = "megagpt-universal", 1
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.safetensors"
STATE_FILE, CONFIG_FILE = "state.json", "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Replicated (split dim None) masters must be equal on every tp rank. 8-bit optimizer state can make them
# drift apart by quantisation noise (its blocks mix them with split neighbours that differ by rank): tolerate
# differences up to this fraction of the tensor's largest magnitude (keeping tp rank 0's copy), refuse more.
REPLICA_RTOL = 1e-2
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@dataclass
class Universal:
    """A consolidated checkpoint: full tensors by GPT parameter name, independent of any layout."""

    config: dict  # the resolved config (as in a step directory's config.json)
    weights: dict[str, torch.Tensor]  # full master weights, fp32 (bf16 if saved so)
    moments: dict[str, dict[str, torch.Tensor]]  # name -> moment -> full fp32 tensor
    split_dims: dict[str, int | None]  # name -> tensor-parallel split dim (None: replicated)
    optimizer: str  # "torch" (exp_avg/exp_avg_sq), "bitsandbytes" (state1/state2) or "none" (weights only)
    step: float  # the optimizer's step counter
    client_state: dict  # the "megagpt" client state: loader, schedules, step, tokens, config
    engine_state: dict = field(default_factory=dict)  # DeepSpeed's counters (global_steps, ...)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # bitsandbytes qmap1 / qmap2
    source: dict = field(default_factory=dict)  # the layout it was read from, notes
    weights_dtype: str = "fp32"

    @property
    def eight_bit(self) -> list[str]:
        """Parameters whose moments were 8-bit (they carry per-element block maxima)."""
        return [name for name, m in self.moments.items() if "absmax1" in m]

    @property
    def training_step(self) -> int:
        return int(self.client_state.get("step", self.step))

    def nbytes(self) -> dict[str, int]:
        weights = sum(t.numel() for t in self.weights.values()) * DTYPES[self.weights_dtype].itemsize
        moments = sum(t.numel() * t.element_size() for m in self.moments.values() for t in m.values())
        return {"weights": weights, "optimizer": moments}

    def describe(self) -> str:
        elements = sum(t.numel() for t in self.weights.values())
        sizes = self.nbytes()
        return (f"{len(self.weights)} parameters ({elements:,} elements), step {self.training_step}, "
                f"{sizes['weights'] + sizes['optimizer']:,} bytes (weights {sizes['weights']:,} "
                f"{self.weights_dtype}, optimizer {sizes['optimizer']:,}; {len(self.eight_bit)} parameters with "
                f"8-bit moments), read from {self.source.get('layout', '?')}")


def _merge(name: str, parts: list, dim: int | None, notes: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full master and moments of ``name`` from its tp ranks' shards."""
    if dim is not None:
        master = torch.cat([p.master for p in parts], dim)
        return master, {key: torch.cat([p.moments[key] for p in parts], dim) for key in parts[0].moments}
    master = parts[0].master
    for rank, other in enumerate(parts[1:], start=1):
        if not torch.equal(other.master, master):
            diff = (other.master - master).abs().max().item()
            if diff > REPLICA_RTOL * max(master.abs().max().item(), 1e-12):
                raise ValueError(f"replicated parameter {name} differs between tensor-parallel ranks 0 and {rank} by "
                                 f"{diff:.3g}: the checkpoint is inconsistent")
            notes[name] = max(notes.get(name, 0.0), diff)
    return master, dict(parts[0].moments)  # moments of a replica: rank 0's


def consolidate(path: str | Path, progress: bool = False, weights_only: bool = False) -> Universal:
    """Consolidate the checkpoint in ``path`` (a save directory's ``latest`` or a step directory), written with
    any tp and dp, ZeRO-0/1/2 (pp=1) or ZeRO-1 (pp>1), torch AdamW or bitsandbytes 8-bit, into a ``Universal``.
    ``weights_only``: drop each shard's optimizer moments as soon as it is read (evaluation, export: a third of
    the memory of a full consolidation); the result then has ``optimizer == "none"``."""
    from tqdm import tqdm

    layout: Layout = read_layout(resolve_step_dir(path))
    config = Config.from_dict(layout.config)
    expected = param_layout(config.model)
    parts: dict[str, list] = {}
    codes: dict[str, torch.Tensor] = {}
    tied_notes: dict[str, float] = {}  # pipeline: tied copies on later stages that differed within tolerance
    for name, tp_rank, shard in read_tp_shards(layout, progress, tied_notes):
        if name not in expected:
            raise ValueError(f"{layout.step_dir} holds parameter {name!r}, which the model of its config.json lacks")
        if weights_only:
            shard = ParamShard(shard.master, {}, shard.step)
        parts.setdefault(name, [None] * layout.tp)[tp_rank] = shard
        codes = codes or shard.codes
    missing = [n for n in expected if n not in parts or any(p is None for p in parts[n])]
    if missing:
        raise ValueError(f"{layout.step_dir}: no state for parameters {missing[:5]} on some tensor-parallel ranks")
    weights, moments, notes, steps = {}, {}, {}, set()
    for name in tqdm(expected, desc="merging parameters", unit="param", disable=not progress):
        shape, dim = expected[name]
        weights[name], moments[name] = _merge(name, parts[name], dim, notes)
        if weights[name].shape != shape:
            raise ValueError(f"parameter {name}: merged shape {tuple(weights[name].shape)}, the model's config "
                             f"gives {tuple(shape)}")
        steps.update(p.step for p in parts.pop(name))  # freed as we go: only the merged copy stays
    if len(steps) != 1:
        raise ValueError(f"{layout.step_dir}: parameters were stepped different numbers of times {sorted(steps)}")
    family = "none" if weights_only else "torch" if "exp_avg" in next(iter(moments.values())) else "bitsandbytes"
    states = load_model_states(layout.step_dir, 0)
    source = {"layout": layout.describe(), "step_dir": str(layout.step_dir)}
    for name, diff in tied_notes.items():
        notes[name] = max(notes.get(name, 0.0), diff)
    if notes:
        source["replicas_differing"] = notes
    return Universal(config=layout.config, weights=weights, moments=moments,
                     split_dims={n: d for n, (_, d) in expected.items()}, optimizer=family, step=steps.pop(),
                     client_state=states.get("megagpt", {}), codes=codes, source=source,
                     engine_state={k: states[k] for k in ENGINE_COUNTERS if k in states})


def is_universal_dir(path: str | Path | None) -> bool:
    """True for a complete universal checkpoint directory (its state.json, written last, names the format)."""
    if path is None:
        return False
    path = Path(path)
    if not ((path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file()):
        return False
    try:
        return json.loads((path / STATE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_universal(universal: Universal, out_dir: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write ``universal`` to ``out_dir`` (weights in ``dtype``: fp32 or bf16; moments always fp32), atomically:
    into ``out_dir.partial``, renamed at the end. An existing ``out_dir`` is refused unless ``overwrite``.
    ``universal.optimizer == "none"``: weights only, no optimizer.safetensors."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite=True "
                              "(--overwrite)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():  # left by an interrupted conversion
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    weights = {n: t.detach().to(DTYPES[dtype]).contiguous() for n, t in universal.weights.items()}
    save_file(weights, str(partial / MODEL_FILE), metadata={"format": "pt", "dtype": dtype})
    files = [MODEL_FILE]
    if universal.optimizer != "none":
        tensors = {f"{key}/{name}": t.detach().float().contiguous()
                   for name, m in universal.moments.items() for key, t in m.items()}
        tensors.update({key: t.float().contiguous() for key, t in universal.codes.items()})
        save_file(tensors, str(partial / OPTIMIZER_FILE), metadata={"format": "pt"})
        files.append(OPTIMIZER_FILE)
    _write_json(partial / CONFIG_FILE, universal.config)
    for name in files:
        _fsync(partial / name)
    _write_json(partial / STATE_FILE, {
        "format": FORMAT, "version": VERSION, "weights_dtype": dtype,
        "optimizer": {"family": universal.optimizer, "step": universal.step, "eight_bit": universal.eight_bit,
                      "moments": sorted({k for m in universal.moments.values() for k in m})},
        "split_dims": universal.split_dims, "client_state": universal.client_state,
        "engine_state": universal.engine_state, "source": universal.source})
    move_into_place(partial, out_dir)
    return out_dir


def move_into_place(partial: Path, out_dir: Path) -> None:
    """Rename the finished ``partial`` directory to ``out_dir``; an existing ``out_dir`` (overwrite) is removed only
    once the new one is in place, so a crash never leaves neither."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(out_dir, old)
        os.rename(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(partial, out_dir)


def load_universal(path: str | Path) -> Universal:
    """Read a directory ``save_universal`` wrote (weights come back as fp32 tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_universal_dir(path):
        raise ValueError(f"{path} is not a complete megagpt universal checkpoint (no {STATE_FILE} naming {FORMAT!r} "
                         f"beside {MODEL_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: universal checkpoint version {state.get('version')}, this code reads {VERSION}")
    weights = {n: t.float() for n, t in load_file(str(path / MODEL_FILE)).items()}
    moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in weights}
    codes = {}
    optimizer_tensors = load_file(str(path / OPTIMIZER_FILE)) if (path / OPTIMIZER_FILE).is_file() else {}
    for key, tensor in optimizer_tensors.items():
        moment, _, name = key.partition("/")
        if name:
            moments.setdefault(name, {})[moment] = tensor
        else:
            codes[key] = tensor
    opt = state["optimizer"]
    return Universal(config=json.loads((path / CONFIG_FILE).read_text()), weights=weights, moments=moments,
                     split_dims=state["split_dims"], optimizer=opt["family"], step=opt["step"],
                     client_state=state["client_state"], engine_state=state.get("engine_state", {}), codes=codes,
                     source=state.get("source", {}), weights_dtype=state["weights_dtype"])
