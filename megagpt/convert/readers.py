"""Read a megagpt training checkpoint step directory into per-parameter tensors, one tensor-parallel rank
at a time.

``read_tp_shards`` is the seam between checkpoint layouts and the layout-independent (universal) form: it
yields ``(gpt_param_name, tp_rank, ParamShard)`` with the GPT's own state-dict names
(``layers.1.attention.qkv.weight``) and this tp rank's slice of the fp32 master weights and optimizer
moments, whatever the data-parallel size and ZeRO stage (0/1/2) were. Pipeline-parallel (pp>1, ZeRO-1)
checkpoints yield the same triples from each stage's optimizer shards, their parameter names mapped back to
the GPT's (``PipelineNames``); the merge and everything after it do not change.

Where each piece lives in a DeepSpeed checkpoint (pp=1; ``XX`` = tp rank):
  ``mp_rank_XX_model_states.pt``  ``module`` (this tp rank's weights, in the run's precision), ``megagpt``
                                 (our client state), and under ZeRO-0 ``optimizer``: the whole torch/bnb
                                 optimizer state dict (one entry per parameter, ids in param-group order)
  ``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``  ZeRO-1/2: fp32 master and moment partitions of
                                 data-parallel rank D (megagpt/zero_checkpoint.py reads them)

With pipeline parallelism (DeepSpeed PipelineModule, megagpt/parallel/pipeline.py; ZeRO-1 only) the
model-parallel rank ``XX`` is ``stage * tp + tp_rank`` (DeepSpeed's grid counts stages x tensor ranks as
"model parallel"): ``mp_rank_XX_model_states.pt`` holds no ``module`` (only the client state),
``layer_{i:02d}-model_{tp_rank:02d}-model_states.pt`` holds layer ``i``'s weights (the tied head at the last
index is the embedding again and has no file of its own), and the ZeRO shards name parameters as the
PipelineModule does: ``{i}.attention.qkv.weight`` for layer ``i`` of the list, and
``tied_modules.embedding.word_embeddings.weight`` for the embedding, which the first and the last stage both
hold and step (their copies must agree; the first stage's is kept).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from megagpt.checkpoint_dir import LATEST, latest_tag, load_torch_file, saved_world_size, verify_step_dir
from megagpt.config import Config, ModelConfig
from megagpt.model.layers import LayerFactory
from megagpt.zero_checkpoint import _dequantize, _moments_of, read_zero_state, zero_shard_files

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"


@dataclass
class ParamShard:
    """One tensor-parallel rank's slice of one parameter, in the parameter's (local) shape, fp32.

    ``moments``: ``exp_avg``/``exp_avg_sq`` (torch AdamW) or ``state1``/``state2`` (bitsandbytes), 8-bit
    state dequantised, plus ``absmax1``/``absmax2`` (each element's block maximum) when it was 8-bit."""

    master: torch.Tensor
    moments: dict[str, torch.Tensor]
    step: float
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # bnb 8-bit: qmap1 / qmap2


@dataclass(frozen=True)
class Layout:
    """How a step directory was written (from its config.json and files)."""

    step_dir: Path
    config: dict  # the resolved config, as saved
    tp: int
    pp: int
    dp: int
    zero_stage: int
    precision: str
    optimizer_kind: str

    def describe(self) -> str:
        return (f"tp={self.tp} pp={self.pp} dp={self.dp} ZeRO-{self.zero_stage} {self.precision} "
                f"{self.optimizer_kind}")


class _SplitDimFactory(LayerFactory):
    """Plain single-device layers tagged with the ``tp_split_dim`` their tensor-parallel versions
    (megagpt/parallel/layers.py) give them: column linear weight/bias 0, row linear weight 1 and bias
    None (replicated), vocab embedding 0. Needs no process group, so it also works where
    torch.distributed is initialised (there ``TensorParallelLayerFactory(group=None)`` refuses); a test
    checks it against the real tensor-parallel model."""

    @staticmethod
    def _tag(module: nn.Module, weight: int | None, bias: int | None) -> nn.Module:
        module.weight.tp_split_dim = weight
        if getattr(module, "bias", None) is not None:
            module.bias.tp_split_dim = bias
        return module

    def column_linear(self, in_features, out_features, *, bias, init_std):
        return self._tag(super().column_linear(in_features, out_features, bias=bias, init_std=init_std), 0, 0)

    def row_linear(self, in_features, out_features, *, bias, init_std, reduce_output=True):
        return self._tag(super().row_linear(in_features, out_features, bias=bias, init_std=init_std), 1, None)

    def vocab_embedding(self, num_embeddings, embedding_dim, *, init_std):
        return self._tag(super().vocab_embedding(num_embeddings, embedding_dim, init_std=init_std), 0, None)


def meta_model(model_config: ModelConfig) -> nn.Module:
    """The whole (tp=1) GPT on the meta device: names, shapes and split dims, no memory, no init cost."""
    from megagpt.model import GPT

    with torch.device("meta"):
        return GPT(model_config, _SplitDimFactory())


def param_layout(model_config: ModelConfig) -> dict[str, tuple[torch.Size, int | None]]:
    """``{name: (full shape, tp split dim or None)}`` for every parameter of the GPT, in model order."""
    model = meta_model(model_config)
    return {name: (p.shape, getattr(p, "tp_split_dim", None)) for name, p in model.named_parameters()}


def optimizer_group_names(config: Config) -> list[list[str]]:
    """Parameter names of each optimizer param group, in the order ``build_param_groups`` gives them to the
    optimizer (a ZeRO-0 state dict numbers its parameters in this order)."""
    from megagpt.optim import build_param_groups

    model = meta_model(config.model)
    names = {id(p): name for name, p in model.named_parameters()}
    opt = config.optimizer
    tensor_parallel = config.parallel.tp > 1
    if tensor_parallel:  # as TensorParallelLayerFactory marks them, for build_param_groups' separate_replicated
        for p in model.parameters():
            p.tensor_model_parallel = getattr(p, "tp_split_dim", None) is not None
    groups = build_param_groups(model, opt.weight_decay, decay_embeddings=opt.decay_embeddings,
                                decay_norms_and_biases=opt.decay_norms_and_biases,
                                separate_replicated=tensor_parallel)
    return [[names[id(p)] for p in group["params"]] for group in groups]


def resolve_step_dir(path: str | Path) -> Path:
    """A training ``--save`` directory (the step its ``latest`` names) or a step directory itself, verified against
    its manifest (ValueError naming what is damaged or missing)."""
    path = Path(path)
    if (path / LATEST).exists():
        path = path / latest_tag(path)
    if not ((path / "config.json").is_file() and any(path.glob("*model_states.pt"))):
        raise ValueError(f"{path} is neither a training save directory with a 'latest' file nor a checkpoint step "
                         "directory (config.json + DeepSpeed model-states files)")
    verify_step_dir(path)  # its manifest: every file whole (conversion, evaluation and generation read here)
    return path


def read_layout(step_dir: Path) -> Layout:
    """The layout ``step_dir`` was written with; ValueError for what cannot be read (yet)."""
    config = json.loads((step_dir / "config.json").read_text())
    par = config.get("parallel", {})
    tp, pp = int(par.get("tp", 1)), int(par.get("pp", 1))
    stage = int(par.get("zero_stage", 0))
    if pp != 1 and stage != 1:
        raise ValueError(f"{step_dir} was written with parallel.pp={pp} under ZeRO-{stage}; pipeline-parallel "
                         "checkpoints are read under ZeRO-1 only (what pipeline runs use)")
    if stage not in (0, 1, 2):
        raise ValueError(f"{step_dir} was written under ZeRO-{stage}; only ZeRO-0/1/2 checkpoints can be converted")
    missing = [MODEL_STATES.format(m) for m in range(tp * pp) if not (step_dir / MODEL_STATES.format(m)).is_file()]
    if missing:
        raise ValueError(f"{step_dir}: written with parallel.tp={tp}, parallel.pp={pp} but {', '.join(missing)} "
                         "missing")
    dp = max(1, saved_world_size(step_dir) // (tp * pp))
    if stage in (1, 2):
        dp = len(zero_shard_files(step_dir, 0)) or dp
    return Layout(step_dir, config, tp, pp, dp, stage, par.get("precision", "fp32"),
                  config.get("optimizer", {}).get("kind", "adamw"))


def load_model_states(step_dir: Path, tp_rank: int) -> dict:
    # weights_only with DeepSpeed's few types allowed; mmap: tensors are paged in when used, not read up front
    return load_torch_file(step_dir / MODEL_STATES.format(tp_rank), mmap=True)


def _as_number(step) -> float:
    return float(step.item() if torch.is_tensor(step) else step)


def _zero0_shards(states: dict, config: Config, path: Path) -> Iterator[tuple[str, ParamShard]]:
    """ZeRO-0: masters are the module weights; the optimizer state dict has one entry per parameter."""
    module, optimizer = states["module"], states.get("optimizer")
    if not (isinstance(optimizer, dict) and "state" in optimizer and "param_groups" in optimizer):
        raise ValueError(f"{path} holds no plain optimizer state dict (saved without optimizer state, or an "
                         "fp16 wrapper's format, which is not supported)")
    group_names = optimizer_group_names(config)
    saved_groups = optimizer["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(names) for names in group_names]:
        raise ValueError(f"{path}: optimizer param groups of sizes {[len(g['params']) for g in saved_groups]}, the "
                         f"model's config gives {[len(n) for n in group_names]}")
    for saved, names in zip(saved_groups, group_names):
        for param_id, name in zip(saved["params"], names):
            if param_id not in optimizer["state"]:
                raise ValueError(f"{path}: parameter {name} has no optimizer state")
            entry = optimizer["state"][param_id]
            kind, moments = _moments_of(entry)
            shape = module[name].shape
            codes = {}
            if kind == "bnb8":
                flat = {k: v.flatten() for k, v in moments.items()}
                codes = {"qmap1": moments["qmap1"].float(), "qmap2": moments["qmap2"].float()}
                moments = {}
                for index in "12":
                    values, absmax = _dequantize(flat, index)
                    moments[f"state{index}"], moments[f"absmax{index}"] = values.view(shape), absmax.view(shape)
            else:
                moments = {k: v.float().view(shape) for k, v in moments.items()}
            yield name, ParamShard(module[name].float(), moments, _as_number(entry["step"]), codes)


def _zero12_shards(states: dict, step_dir: Path, tp_rank: int) -> Iterator[tuple[str, ParamShard]]:
    """ZeRO-1/2: fp32 masters and moments from the data-parallel shards, reshaped to the parameters."""
    module = states["module"]
    for group in read_zero_state(step_dir, tp_rank).groups:
        codes = {k: v.float() for k, v in group.qmaps.items()}
        for name in group.names:
            shape = module[name].shape
            moments = {key: per_name[name].view(shape) for key, per_name in group.moments.items()}
            yield name, ParamShard(group.master[name].view(shape), moments, _as_number(group.step), codes)


class PipelineNames:
    """Maps a DeepSpeed ``PipelineModule``'s parameter names onto the plain GPT's and back.

    ``tied_keys``: the tie key of each entry of the layer list (None for untied ones), as
    ``gpt_layer_specs`` gives them. Entry ``i`` of the list is ``{i}.`` in the PipelineModule; a tied
    module is ``tied_modules.{key}.`` there, and in the GPT it is built once, at its first entry (later
    entries of the same key are skipped, so the GPT's indices close up behind them)."""

    def __init__(self, tied_keys: list[str | None]):
        self.layer_of: dict[int, int] = {}  # pipeline list index -> GPT ``layers`` index
        self.tied_layer: dict[str, int] = {}  # tie key -> GPT ``layers`` index
        for index, key in enumerate(tied_keys):
            if key is not None and key in self.tied_layer:
                continue
            self.layer_of[index] = len(self.layer_of)
            if key is not None:
                self.tied_layer[key] = self.layer_of[index]

    @classmethod
    def for_model(cls, model_config: ModelConfig) -> "PipelineNames":
        from megagpt.model.gpt import gpt_layer_specs

        return cls([spec.tied_key for spec in gpt_layer_specs(model_config)])

    @classmethod
    def for_module(cls, module) -> "PipelineNames":
        """From a built ``deepspeed.pipe.PipelineModule`` (its layer specs)."""
        from deepspeed.pipe import TiedLayerSpec

        return cls([spec.key if isinstance(spec, TiedLayerSpec) else None for spec in module._layer_specs])

    def to_gpt(self, name: str) -> str:
        """``1.attention.qkv.weight`` -> ``layers.1.attention.qkv.weight``;
        ``tied_modules.embedding.word_embeddings.weight`` -> ``layers.0.word_embeddings.weight``."""
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            if key in self.tied_layer and rest:
                return f"layers.{self.tied_layer[key]}.{rest}"
        elif head.isdigit() and int(head) in self.layer_of and rest:
            return f"layers.{self.layer_of[int(head)]}.{rest}"
        raise ValueError(f"pipeline parameter name {name!r} does not map onto the GPT's layer list")

    @staticmethod
    def is_tied(name: str) -> bool:
        return name.startswith("tied_modules.")


def local_shape(shape: torch.Size, dim: int | None, tp: int) -> torch.Size:
    """One tensor-parallel rank's shape of a parameter of full ``shape`` split along ``dim``."""
    if dim is None or tp == 1:
        return shape
    return torch.Size(s // tp if d == dim else s for d, s in enumerate(shape))


def _check_tied_copy(name: str, first: ParamShard, other: ParamShard, where: str, notes: dict | None) -> None:
    """A tied parameter's copy on a later pipeline stage must be the first stage's (both were stepped with the
    same all-reduced gradient): equal, or within the replicas' tolerance (recorded in ``notes``)."""
    from megagpt.convert.universal import REPLICA_RTOL

    if torch.equal(first.master, other.master):
        return
    diff = (other.master - first.master).abs().max().item() if first.master.shape == other.master.shape else None
    if diff is None or diff > REPLICA_RTOL * max(first.master.abs().max().item(), 1e-12):
        raise ValueError(f"tied parameter {name} differs between the first pipeline stage and {where} by "
                         f"{'shape' if diff is None else f'{diff:.3g}'}: the checkpoint is inconsistent")
    if notes is not None:
        notes[name] = max(notes.get(name, 0.0), diff)


def _pipeline_shards(layout: Layout, config: Config, tp_rank: int,
                     notes: dict | None) -> Iterator[tuple[str, ParamShard]]:
    """pp>1, ZeRO-1: this tp rank's slices from every stage's optimizer shards (model-parallel rank
    ``stage * tp + tp_rank``), under GPT names; a tied parameter once, from the first stage that holds it."""
    names = PipelineNames.for_model(config.model)
    expected = param_layout(config.model)
    tied: dict[str, ParamShard] = {}
    for stage in range(layout.pp):
        mp_rank = stage * layout.tp + tp_rank
        for group in read_zero_state(layout.step_dir, mp_rank).groups:
            codes = {k: v.float() for k, v in group.qmaps.items()}
            for pipe_name in group.names:
                name = names.to_gpt(pipe_name)
                if name not in expected:
                    raise ValueError(f"{layout.step_dir}: pipeline stage {stage} holds parameter {pipe_name!r} "
                                     f"({name}), which the model of its config.json lacks")
                full_shape, dim = expected[name]
                shape = local_shape(full_shape, dim, layout.tp)
                moments = {key: per_name[pipe_name].view(shape) for key, per_name in group.moments.items()}
                shard = ParamShard(group.master[pipe_name].view(shape), moments, _as_number(group.step), codes)
                if PipelineNames.is_tied(pipe_name):
                    if name in tied:
                        _check_tied_copy(name, tied[name], shard, f"stage {stage} (tp rank {tp_rank})", notes)
                        continue
                    tied[name] = shard
                yield name, shard


def read_tp_shards(layout: Layout, progress: bool = False,
                   notes: dict | None = None) -> Iterator[tuple[str, int, ParamShard]]:
    """``(gpt_param_name, tp_rank, ParamShard)`` for every parameter slice of every tensor-parallel rank.
    ``notes``: where tied copies of a pipeline checkpoint differed within tolerance (name -> largest difference)."""
    from tqdm import tqdm

    config = Config.from_dict(layout.config)
    for tp_rank in tqdm(range(layout.tp), desc="reading tensor-parallel ranks", unit="rank", disable=not progress):
        if layout.pp > 1:
            for name, shard in _pipeline_shards(layout, config, tp_rank, notes):
                yield name, tp_rank, shard
            continue
        states = load_model_states(layout.step_dir, tp_rank)
        if layout.zero_stage == 0:
            shards = _zero0_shards(states, config, layout.step_dir / MODEL_STATES.format(tp_rank))
        else:
            shards = _zero12_shards(states, layout.step_dir, tp_rank)
        for name, shard in shards:
            yield name, tp_rank, shard
