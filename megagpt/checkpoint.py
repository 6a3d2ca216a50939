"""Checkpoints: save with DeepSpeed, publish with our own ``latest`` file, resume, keep the last K.

Layout of a save directory::

    save/step500/            DeepSpeed's model and optimizer files, plus
    save/step500/config.json the resolved config of the run
    save/step500/rng_rank{r}.pt  each rank's python/numpy/torch RNG states and its own GPU's CUDA one
    save/step500/manifest.json every file's size and checksum
    save/latest              "step500", written last

DeepSpeed would write ``latest`` itself before all ranks finished their files; we pass
``save_latest=False`` and, only after every rank has written everything (a barrier), write the
manifest and then replace ``latest`` atomically, so a crash during a save leaves ``latest`` on the
previous, whole checkpoint. The directory's conventions (tags, ``latest``, manifests, retention, which
checkpoint to resume) live in megagpt/checkpoint_dir.py; this module saves and loads.
Nothing is saved from non-finite weights (``NonFiniteWeights``).
RNG states are per rank (dropout differs by rank), so they go in per-rank files, not in
``client_state``, which DeepSpeed stores from rank 0 only.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megagpt.checkpoint_dir import (LATEST, DamagedCheckpoint, atomic_write_text, load_torch_file, prune_checkpoints,
                                    resume_tag, rng_file, saved_world_size, step_tag, tag_step, torch_save_hashed,
                                    write_hashes_part, write_manifest)
from megagpt.config import Config, save_resolved
from megagpt.convert.universal import is_universal_dir
from megagpt.zero_checkpoint import load_zero_state, read_zero_state, zero_shard_files


class NonFiniteWeights(RuntimeError):
    """Raised instead of saving a checkpoint whose weights hold NaN or inf."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj, path: Path, hashes: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch_save_hashed(obj, tmp, hashes)
    os.replace(tmp, path)
    hashes[os.fspath(path)] = hashes.pop(os.fspath(tmp))


def _save_engine_hashed(engine, directory: Path, tag: str, client_state: dict, hashes: dict) -> None:
    """``engine.save_checkpoint`` with every file DeepSpeed's torch checkpoint engine writes hashed as it is
    written (for the manifest, without reading it back). Other checkpoint engines save as they do."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    hashable = type(checkpoint_engine) is TorchCheckpointEngine
    if hashable:
        checkpoint_engine.save = lambda state_dict, path: torch_save_hashed(state_dict, path, hashes)
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    finally:
        if hashable:
            del checkpoint_engine.save  # the class's own method again


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


def weights_are_finite(engine) -> bool:
    """True when every weight this rank holds is finite (one device sync; run at saves, not per step)."""
    params = [p.detach() for p in engine.module.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all().item()) if params else True


def save_checkpoint(engine, directory: str | os.PathLike, step: int, client_state: dict, config: Config,
                    rank: int) -> str:
    """Save the engine and ``client_state`` as ``step{step}`` on every rank, then (rank 0) checksum it into its
    manifest, publish it as ``latest`` and prune to ``config.checkpoint.keep_last``. Collective: every rank
    must call it. The caller checks ``weights_are_finite`` on every rank first. Returns the tag."""
    directory = Path(directory)
    tag = step_tag(step)
    hashes = {}  # path -> manifest entry, for the files this rank writes
    _save_engine_hashed(engine, directory, tag, client_state, hashes)
    _atomic_torch_save(rng_state(engine.device), directory / tag / rng_file(rank), hashes)
    write_hashes_part(directory / tag, rank, hashes)
    _barrier()  # every rank's files are complete before the checkpoint is checksummed and published
    if rank == 0:
        save_resolved(config, directory / tag / "config.json")
        write_manifest(directory / tag)
        atomic_write_text(directory / LATEST, tag)
        prune_checkpoints(directory, config.checkpoint.keep_last)
    _barrier()
    return tag


def _choose_resume_tag(engine, directory: Path, rank: int, strict: bool) -> str | None:
    """Rank 0 verifies the checkpoints (checksums: once, not per rank) and every rank gets its choice."""
    choice, error = -1, None
    if rank == 0:
        try:
            tag, warnings = resume_tag(directory, strict)
            for warning in warnings:
                print(f"WARNING: {warning}", flush=True)
            choice = -1 if tag is None else tag_step(tag)
        except DamagedCheckpoint as err:
            choice, error = -2, err
    if dist.is_available() and dist.is_initialized():
        value = torch.tensor([choice], dtype=torch.int64, device=engine.device)
        dist.broadcast(value, src=0)
        choice = int(value.item())
    if error is not None:
        raise error
    if choice == -2:
        raise DamagedCheckpoint(f"rank 0 refused the checkpoints in {directory} (its message says why)")
    return None if choice == -1 else step_tag(choice)


def load_checkpoint(engine, directory: str | os.PathLike, rank: int, world_size: int,
                    seed: int, strict: bool = False) -> dict | None:
    """Load the checkpoint ``directory/latest`` names into ``engine``; return its client state, or None when
    the directory has no checkpoint. A damaged or incomplete one (its manifest, megagpt/checkpoint_dir.py) is
    named with what is wrong and the newest intact one is loaded instead (``strict``: ValueError).

    Written by the same number of ranks: everything, RNG states included, is restored exactly.
    Written by another data-parallel size: ZeRO-1/2 optimizer shards are resharded
    (megagpt/zero_checkpoint.py; DeepSpeed itself refuses), ZeRO-0 state is whole anyway; the RNG
    streams (dropout) of the old ranks cannot be mapped onto the new ones, so each rank is reseeded
    from (seed, step, tensor-parallel group): deterministic, but not the stream the old layout would have drawn.
    Written with another tensor- or pipeline-parallel size, or ``directory`` is a universal checkpoint
    (tools/convert_checkpoint.py): loaded through megagpt/convert (any tp, pp, dp; ZeRO 0/1/2, pp>1 ZeRO-1).
    """
    from megagpt.convert.resume import (model_parallel_layout_changed, reseed_for_new_layout,
                                        resume_converted_in_memory, resume_universal_dir)
    if is_universal_dir(directory):  # consolidated by tools/convert_checkpoint.py: resumes in any (tp, dp) layout
        return resume_universal_dir(engine, directory, rank, seed)
    tag = _choose_resume_tag(engine, Path(directory), rank, strict)
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
        path = step_dir / rng_file(rank)
        try:
            set_rng_state(load_torch_file(path), engine.device)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    else:
        reseed_for_new_layout(engine, seed, tag_step(tag), rank)
        if rank == 0:
            print(f"note: {step_dir} was written by {saved_world_size(step_dir)} ranks, this run has {world_size}"
                  f"{' (ZeRO optimizer state resharded)' if reshard else ''}; RNG streams reseeded per rank",
                  flush=True)
    return client_state
