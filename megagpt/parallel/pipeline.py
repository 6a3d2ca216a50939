"""Pipeline parallelism: the GPT's layer list as a DeepSpeed ``PipelineModule``.

``gpt_layer_specs`` already describes the model as an ordered list (embedding, blocks, final norm,
head; the tied head is the embedding again), so each spec maps onto a DeepSpeed ``LayerSpec``, or a
``TiedLayerSpec`` for the embedding shared by the first and last stage (DeepSpeed all-reduces the
tied weight's gradient between the two). Layer ``i`` is built after seeding ``init_seed + i`` —
exactly as ``GPT(..., init_seed=...)`` builds it — so a pipeline holds the same weights as the
single-device model of the same seed, whatever the partition.

The loss is the model's own (vocab-parallel under tensor parallelism), on the last stage.
"""
from __future__ import annotations

import torch

from megagpt.config import ModelConfig
from megagpt.model.gpt import CHECKPOINTABLE_LAYERS, gpt_layer_specs
from megagpt.model.layers import LayerFactory

from megagpt.config.sections import PIPELINE_PARTITIONS


def _call_method(name: str):
    def forward(module, *inputs):
        return getattr(module, name)(*inputs)
    return forward


def build_pipeline_module(config: ModelConfig, num_stages: int, tp: int, dp: int, factory: LayerFactory,
                          init_seed: int, *, activation_checkpointing: bool = False,
                          partition_method: str = "parameters"):
    """A ``deepspeed.pipe.PipelineModule`` of the GPT for a (pp=num_stages, tp, dp) layout."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if partition_method not in PIPELINE_PARTITIONS:
        raise ValueError(f"partition method {partition_method!r} is not one of {list(PIPELINE_PARTITIONS)}")
    specs = []
    for spec in gpt_layer_specs(config, factory):
        if spec.tied_key is not None:
            forward_fn = None if spec.forward_method == "forward" else _call_method(spec.forward_method)
            specs.append(TiedLayerSpec(spec.tied_key, spec.module_class, forward_fn=forward_fn,
                                       tied_weight_attr=[spec.tied_weight_attr], **spec.kwargs))
        else:
            specs.append(LayerSpec(spec.module_class, **spec.kwargs))

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return factory.loss(logits, labels, fused=config.fused_kernels)

    return PipelineModule(
        layers=specs, loss_fn=loss_fn,
        topology=PipeModelDataParallelTopology(num_pp=num_stages, num_mp=tp, num_dp=dp),
        partition_method=partition_method,
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=list(CHECKPOINTABLE_LAYERS),
        seed_layers=True, base_seed=init_seed, seed_fn=torch.manual_seed)
