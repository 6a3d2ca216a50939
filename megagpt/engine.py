"""Process setup and the DeepSpeed engine: device choice, process group, seeding, model + optimizer.

``build_engine`` is the one place where a ``Config`` becomes something that trains: the GPT on
its device, the named param groups, the client optimizer (torch AdamW or bitsandbytes 8-bit) and
``deepspeed.initialize`` with the DeepSpeed JSON derived from the same config, so the two cannot
disagree. DeepSpeed casts the model to bf16/fp16 itself when the config asks for it.
"""
from __future__ import annotations

import inspect
import os
import random
import socket
import sys
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from megagpt.config import Config, deepspeed_config

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Launch:
    """Where this process sits: read from the launcher's environment (deepspeed, torchrun) or defaults."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# (rank, world size, local rank) as each kind of launcher names them, in order of preference. Slurm's
# SLURM_PROCID/SLURM_NTASKS are not used: they are also set in a batch script outside any task launch,
# where reading them would make a single process wait for ranks that never come (use srun + torchrun).
RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, deepspeed
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI's mpirun
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI
)


def ranks_from_env(environ=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the first launcher's variables found (see ``RANK_VARIABLES``);
    (0, 1, 0) for a plain ``python`` run."""
    environ = os.environ if environ is None else environ
    for rank, size, local in RANK_VARIABLES:
        if size in environ:  # WORLD_SIZE alone: planning a layout (--dry-run) from one process
            return int(environ.get(rank, "0")), int(environ[size]), int(environ.get(local, "0"))
    return 0, 1, 0


def launch_from_env(device: str = "auto") -> Launch:
    """Rank, world size and local rank from the launcher's variables (``ranks_from_env``: torchrun,
    deepspeed, mpirun; 1 process if none), and the torch device for ``device`` in ``DEVICE_CHOICES``
    (auto: CUDA when available; which GPU: ``cuda_device_for``)."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"--device {device!r} is not one of {list(DEVICE_CHOICES)}")
    rank, world_size, local_rank = ranks_from_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
        return Launch(rank, world_size, local_rank, cuda_device_for(local_rank, torch.cuda.device_count()))
    return Launch(rank, world_size, local_rank, torch.device("cpu"))


def cuda_device_for(local_rank: int, visible_gpus: int, environ=None) -> torch.device:
    """This rank's GPU: ``cuda:<local_rank>`` when the process sees all of its node's GPUs (torchrun,
    deepspeed); ``cuda:0`` when it sees exactly one through ``CUDA_VISIBLE_DEVICES`` while its local rank is
    higher (Slurm's per-task GPU binding, ``--gpus-per-task=1``). ValueError when the rank has no GPU of its own."""
    environ = os.environ if environ is None else environ
    if local_rank < visible_gpus:
        return torch.device("cuda", local_rank)
    if visible_gpus == 1 and environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return torch.device("cuda", 0)
    raise ValueError(f"local rank {local_rank} but this process sees {visible_gpus} GPU(s) "
                     f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start at most "
                     f"{visible_gpus} rank(s) per node (deepspeed --num_gpus, torchrun --nproc_per_node), or "
                     "bind one GPU per task (srun --gpus-per-task=1)")


def _skip_shm_op_build() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory collective op at init (~60 s on a fresh
    machine) that training never uses; returning None makes it fall back to plain torch.distributed."""
    import deepspeed.comm.torch  # noqa: F401  (the attribute path is shadowed by torch; use sys.modules)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_env(launch: Launch, environ=None) -> None:
    """Fill in what torch.distributed's env:// rendezvous reads and the launcher did not set (under mpirun only
    the MPI variables are set). One process gets a free port, so that two one-GPU runs on a host do not meet
    on the same one; several ranks need one port they all know, the launchers' default 29500."""
    environ = os.environ if environ is None else environ
    port = free_port() if launch.world_size == 1 and "MASTER_PORT" not in environ else 29500
    for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", launch.local_rank),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
        environ.setdefault(key, str(value))


def start_process_group(launch: Launch) -> str:
    """Start torch.distributed's default group for ``launch`` (a no-op when it is already started): nccl
    bound to this rank's GPU on CUDA, gloo on CPU. Returns the backend name.

    The group is started here rather than by DeepSpeed, which binds ``cuda:<LOCAL_RANK>``: that device does
    not exist when each task sees one GPU (``cuda_device_for``). Only CUDA tensors may then reach a
    collective: nccl registers no CPU backend (megagpt's own collectives use the training device)."""
    import torch.distributed as dist

    rendezvous_env(launch)
    kwargs = {}
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)
        backend = "nccl"
        # binding the device lets NCCL set up eagerly; not for one rank (no peer: DeepSpeed #8248)
        if launch.world_size > 1 and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = launch.device
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **kwargs)
    return backend


def init_distributed(launch: Launch) -> None:
    """Start the process group (``start_process_group``) and DeepSpeed's communication layer over it. A
    plain ``python`` run gets world size 1."""
    import deepspeed

    if launch.device.type == "cpu":
        _skip_shm_op_build()
    backend = start_process_group(launch)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if launch.is_main:
        print(f"started process group: world size {launch.world_size}, backend {backend}", flush=True)


def deepspeed_device_args(launch: Launch) -> SimpleNamespace | None:
    """The ``args`` for ``deepspeed.initialize``: on CUDA this rank's device index (``device_rank``), which
    DeepSpeed's engine otherwise takes from ``LOCAL_RANK`` (wrong under a per-task GPU binding, see
    ``cuda_device_for``); None on CPU."""
    return SimpleNamespace(device_rank=launch.device.index) if launch.device.type == "cuda" else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so model init and dropout repeat run to run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_device_support(config: Config, device: torch.device) -> None:
    """Refuse settings that cannot work on ``device`` (the config checks cannot know the device)."""
    if config.parallel.precision == "fp16" and device.type == "cpu":
        # DeepSpeed's CPU accelerator says so itself, but only deep inside deepspeed.initialize
        raise ValueError("parallel.precision='fp16' on CPU: DeepSpeed's CPU accelerator does not support fp16 "
                         "(loss-scaled fp16 is a CUDA mode); use precision='bf16' or 'fp32' on CPU")
    if config.parallel.compile and config.parallel.precision == "bf16" and device.type == "cpu":
        # torch 2.13's Inductor C++ backend emits invalid code for a bf16 backward reduction
        # ("conflicting declaration 'auto at_BFloat16_tmp_acc0_vec'"); CUDA uses Triton codegen instead.
        raise ValueError("parallel.compile=true with parallel.precision='bf16' on CPU: Inductor's C++ backend "
                         "fails to build bf16 backward kernels; use precision='fp32' or compile=false on CPU")


def is_pipeline_engine(engine) -> bool:
    """Whether ``engine`` is DeepSpeed's PipelineEngine (it runs micro batches and the step in ``train_batch``)."""
    return hasattr(engine, "train_batch") and hasattr(engine, "reset_activation_shape")


def build_process_groups(config: Config, launch: Launch):
    """This rank's tensor/data/pipeline-parallel groups for ``config.parallel`` (collective: every rank
    calls it after ``init_distributed``)."""
    from megagpt.parallel.topology import ProcessGroups, Topology

    par = config.parallel
    return ProcessGroups(Topology(par.tp, par.pp, par.dp_size(launch.world_size)), launch.rank)


def build_engine(config: Config, launch: Launch, groups=None, init_weights: bool = True):
    """The DeepSpeed engine for ``config``: GPT + param groups + client optimizer + ``deepspeed.initialize``.

    Call after ``init_distributed``; ``groups`` (``build_process_groups``) is needed when
    ``parallel.tp > 1``: the model is then built from tensor-parallel layers and DeepSpeed gets the
    groups as its ``mpu`` (gradients averaged over the data-parallel group only; gradient norms summed
    over tensor-parallel shards). Every rank seeds alike, so each holds exactly its slice of the
    single-device model. Returns the engine (``engine.module`` is the GPT). The 8-bit
    optimizers get 32-bit state for the embedding group, marked on the engine's optimizer after
    initialize (ZeRO replaces the parameters by flat partitions, see megagpt/optim/optimizers.py).

    ``parallel.activation_checkpointing`` is a GPT switch; ``parallel.compile`` calls
    ``engine.compile()`` after initialize, which compiles ``engine.module`` in place
    (``nn.Module.compile``): the engine keeps its hooks around the compiled forward, and state dict
    keys and checkpoints stay those of the plain model. Dynamo compiles lazily, on the first forward.

    ``checkpoint.init_from`` (with ``init_weights``; the trainer passes False when it will resume a checkpoint
    anyway): the built model's weights are replaced by that checkpoint's before ``deepspeed.initialize``, so
    the optimizer's fp32 masters start from them too.
    """
    import deepspeed

    from megagpt.model import GPT
    from megagpt.model.attention import resolve_backend
    from megagpt.optim import build_optimizer, build_param_groups, keep_embedding_state_32bit

    par = config.parallel
    tensor_parallel = par.tp > 1
    if (tensor_parallel or par.pp > 1) and groups is None:
        raise ValueError("build_engine needs the process groups (build_process_groups) when parallel.tp or pp > 1")
    check_device_support(config, launch.device)
    seed_everything(config.seed)
    factory = None
    if tensor_parallel:
        from megagpt.parallel import TensorParallelLayerFactory
        factory = TensorParallelLayerFactory(groups.tp_group, vocab_size=config.model.vocab_size)
    if par.pp > 1:
        from megagpt.model.layers import LayerFactory
        from megagpt.parallel.pipeline import build_pipeline_module
        model = build_pipeline_module(config.model, par.pp, par.tp, groups.topology.dp, factory or LayerFactory(),
                                      config.seed, activation_checkpointing=par.activation_checkpointing,
                                      partition_method=par.pipeline_partition)
    else:
        model = GPT(config.model, factory, activation_checkpointing=par.activation_checkpointing,
                    init_seed=config.seed)
    if init_weights and config.checkpoint.init_from is not None:
        from megagpt.convert.weights import init_from_weights

        tp_rank = groups.tp_rank if tensor_parallel else 0
        note = init_from_weights(model, config, config.checkpoint.init_from, tp_rank, par.tp, pipeline=par.pp > 1)
        if launch.is_main:
            print(note, flush=True)
    model = model.to(launch.device)
    # layer seeding moved the RNGs: start dropout and everything after from one known state on every layout
    seed_everything(config.seed + 1)
    opt = config.optimizer
    param_groups = build_param_groups(model, opt.weight_decay, decay_embeddings=opt.decay_embeddings,
                                      decay_norms_and_biases=opt.decay_norms_and_biases,
                                      separate_replicated=tensor_parallel)
    optimizer = build_optimizer(param_groups, opt.kind, opt.lr, opt.betas, opt.eps, device=launch.device)
    engine, _, _, _ = deepspeed.initialize(args=deepspeed_device_args(launch), model=model, optimizer=optimizer,
                                           config=deepspeed_config(config, launch.world_size),
                                           mpu=groups if tensor_parallel and par.pp == 1 else None)
    if opt.uses_bitsandbytes and any(g["name"] == "embedding" for g in param_groups):  # not on middle stages
        keep_embedding_state_32bit(engine.optimizer)
    if config.parallel.compile:
        if resolve_backend(config.model.attention_backend, launch.device,
                           config.model.resolved_head_dim) == "triton":
            warnings.warn("parallel.compile with the triton attention backend: Dynamo cannot trace the kernel, so "
                          "every attention call is a graph break (with activation checkpointing the blocks then "
                          "run mostly eagerly); see docs/model.md", stacklevel=2)
        engine.compile()
    return engine
