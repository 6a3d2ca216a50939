"""Checkpoints: save with DeepSpeed, publish with our own ``latest`` file, resume, keep the last K.

Layout of a save directory::

    save/step500/            DeepSpeed's model and optimizer files, plus
    save/step500/config.json the resolved config of the run
    save/step500/rng_rank{r}.pt  each rank's python/numpy/torch RNG states and its own GPU's CUDA one
    save/latest              "step500", written last

DeepSpeed would write ``latest`` itself before all ranks finished their files; we pass
``save_latest=False`` and replace ``latest`` atomically only after every rank has written
everything (a barrier), so a crash during a save leaves ``latest`` on the previous, whole checkpoint.
RNG states are per rank (dropout differs by rank), so they go in per-rank files, not in
``client_state``, which DeepSpeed stores from rank 0 only.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megagpt.config import Config, save_resolved
from megagpt.convert.universal import is_universal_dir
from megagpt.zero_checkpoint import load_zero_state, read_zero_state, zero_shard_files

LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")
_RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")


def step_tag(step: int) -> str:
    """The checkpoint tag (directory name) of optimizer step ``step``."""
    return f"step{step}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states: python, numpy, torch CPU, and the CUDA generator of ``device`` (the rank's
    own GPU) when it is a CUDA device.

    One device only: ``get_rng_state_all`` would open a CUDA context on every visible GPU and save a list
    indexed by device number, which a resume with fewer GPUs per node cannot restore and one where the rank
    landed on another local rank would restore into the wrong device's stream."""
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` returned; its CUDA generator goes to ``device`` (this rank's GPU, whatever
    its index was when saved). A state saved on CPU leaves the CUDA generator as seeded; one saved on a GPU
    restored on CPU has no CUDA generator to go to."""
    cuda = state["cuda"]
    if isinstance(cuda, (list, tuple)):
        raise ValueError(f"the RNG state holds {len(cuda)} CUDA generators (one per visible GPU, by index): it "
                         "cannot say which was this rank's; save with megagpt's per-device rng_state")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def latest_tag(directory: str | os.PathLike) -> str | None:
    """The tag named by ``directory/latest``, or None when there is no checkpoint yet.

    ValueError when ``latest`` names a directory that does not exist (it was deleted by hand)."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (Path(directory) / tag).is_dir():
        raise ValueError(f"{path} names checkpoint {tag!r} but {Path(directory) / tag} does not exist; "
                         f"point {path} at an existing step directory or delete it to start afresh")
    return tag


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` step directories (0 keeps all); never the one ``latest``
    names. Returns the tags removed."""
    if keep_last <= 0:
        return []
    directory = Path(directory)
    tags = sorted((int(m.group(1)), p.name) for p in directory.iterdir()
                  if p.is_dir() and (m := _TAG.match(p.name)))
    current = latest_tag(directory)
    removed = []
    for _, tag in tags[:-keep_last]:
        if tag != current:
            shutil.rmtree(directory / tag)
            removed.append(tag)
    return removed


def save_checkpoint(engine, directory: str | os.PathLike, step: int, client_state: dict, config: Config,
                    rank: int) -> str:
    """Save the engine and ``client_state`` as ``step{step}`` on every rank, then publish it as ``latest``
    and prune to ``config.checkpoint.keep_last``. Collective: every rank must call it. Returns the tag."""
    directory = Path(directory)
    tag = step_tag(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    _atomic_torch_save(rng_state(engine.device), directory / tag / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are complete before the checkpoint is published
    if rank == 0:
        save_resolved(config, directory / tag / "config.json")
        _atomic_write_text(directory / LATEST, tag)
        prune_checkpoints(directory, config.checkpoint.keep_last)
    _barrier()
    return tag


def saved_world_size(step_dir: str | os.PathLike) -> int:
    """How many ranks wrote the checkpoint in ``step_dir`` (one RNG file each)."""
    return sum(1 for p in Path(step_dir).iterdir() if _RNG_FILE.match(p.name))


def load_checkpoint(engine, directory: str | os.PathLike, rank: int, world_size: int,
                    seed: int) -> dict | None:
    """Load the checkpoint ``directory/latest`` names into ``engine``; return its client state, or None when
    the directory has no checkpoint.

    Written by the same number of ranks: everything, RNG states included, is restored exactly.
    Written by another data-parallel size: ZeRO-1/2 optimizer shards are resharded
    (megagpt/zero_checkpoint.py; DeepSpeed itself refuses), ZeRO-0 state is whole anyway; the RNG
    streams (dropout) of the old ranks cannot be mapped onto the new ones, so each rank is reseeded
    from (seed, step, tensor-parallel group): deterministic, but not the stream the old layout would have drawn.
    Written with another tensor- or pipeline-parallel size, or ``directory`` is a universal checkpoint
    (tools/convert_checkpoint.py): loaded through megagpt/convert (any tp, pp, dp; ZeRO 0/1/2, pp>1 ZeRO-1).
    """
    from megagpt.convert.resume import (model_parallel_layout_changed, resume_converted_in_memory,
                                        resume_universal_dir)
    if is_universal_dir(directory):  # consolidated by tools/convert_checkpoint.py: resumes in any (tp, dp) layout
        return resume_universal_dir(engine, directory, rank, seed)
    tag = latest_tag(directory)
    if tag is None:
        return None
    step_dir = Path(directory) / tag
    if model_parallel_layout_changed(step_dir, engine):  # another tp/pp: consolidated in memory (megagpt/convert)
        return resume_converted_in_memory(engine, step_dir, rank, seed)
    mp_rank = engine.mpu.get_model_parallel_rank() if engine.mpu is not None else 0
    shards = zero_shard_files(step_dir, mp_rank)
    dp_size = engine.dp_world_size
    reshard = bool(shards) and len(shards) != dp_size
    if bool(shards) != bool(engine.zero_optimization()):
        raise ValueError(f"{step_dir} was written {'with' if shards else 'without'} ZeRO optimizer shards and this "
                         f"run has parallel.zero_stage={engine.zero_optimization_stage()}; resume with the "
                         "zero_stage the checkpoint was written with (see its config.json)")
    if reshard:
        if engine.zero_optimization_stage() not in (1, 2):
            raise ValueError(f"{step_dir} was written by {len(shards)} data-parallel ranks and this run has "
                             f"{dp_size} under ZeRO-{engine.zero_optimization_stage()}: only ZeRO-1/2 checkpoints "
                             "change their data-parallel size; resume with the same world size")
        path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=False)
        load_zero_state(engine, read_zero_state(step_dir, mp_rank))
    else:
        path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag!r} from {directory}")
    if saved_world_size(step_dir) == world_size:
        rng_file = step_dir / f"rng_rank{rank}.pt"
        try:
            set_rng_state(torch.load(rng_file, weights_only=False), engine.device)
        except ValueError as err:
            raise ValueError(f"{rng_file}: {err}") from err
    else:
        reseed_for_new_layout(engine, seed, int(_TAG.match(tag).group(1)), rank)
        if rank == 0:
            print(f"note: {step_dir} was written by {saved_world_size(step_dir)} ranks, this run has {world_size}"
                  f"{' (ZeRO optimizer state resharded)' if reshard else ''}; RNG streams reseeded per rank",
                  flush=True)
    return client_state


def reseed_for_new_layout(engine, seed: int, step: int, rank: int) -> None:
    """Seed python/numpy/torch RNGs from (seed, step, rank // tp) after resuming in another layout, where the
    old ranks' streams cannot be mapped onto the new ones. Tensor-parallel ranks are adjacent, so one group
    shares a stream (its ranks must draw the same dropout masks) and other groups differ."""
    from megagpt.convert.resume import tp_coords

    value = seed * 1_000_003 + step * 1_009 + rank // tp_coords(engine)[1]
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def resolve_model_states(path: str | os.PathLike) -> tuple[Path, Path]:
    """For a training ``--save`` directory (its ``latest``) or one step directory: the DeepSpeed model-states
    file and the resolved config beside it. Only single-shard (tp = pp = 1) checkpoints hold the whole model."""
    path = Path(path)
    step_dir = path
    if (path / LATEST).exists():
        step_dir = path / latest_tag(path)
    states = step_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ValueError(f"{path} is neither a training save directory with a 'latest' file nor a step directory "
                         f"holding mp_rank_00_model_states.pt")
    return states, step_dir / "config.json"
