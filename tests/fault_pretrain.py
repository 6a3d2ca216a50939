"""megagpt/pretrain.py with a non-finite value injected at a chosen step on a chosen rank: tests of
megagpt/stability.py.

``MEGAGPT_TEST_FAULT=KIND:RANK:STEP`` (STEP counts optimizer steps from 1, as the metrics do; the fault hits
every micro batch of that step on that rank):
``nan_loss``: the loss becomes NaN, its gradients stay finite (a constant is added);
``nan_grad``: the loss stays finite, every gradient becomes NaN;
``spike``: 20 is added to the loss (gradients unchanged) of the batch that step STEP reads in an uninterrupted
run without recoveries (keyed by the loader position, so once that batch is skipped the spike is gone).
Pipeline engines compute the loss inside DeepSpeed, on the last stage: there ``nan_loss`` reaches the
PipelineModule's ``loss_fn`` (RANK then names a last-stage rank; STEP is the loader's step).
Imported by tests/sigkill_pretrain.py when ``MEGAGPT_TEST_FAULT`` is set, to kill runs that have faults.
"""
import math
import os
import sys
from pathlib import Path

import deepspeed.pipe as ds_pipe
import torch

# this checkout's megagpt, not whichever one is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megagpt import pretrain, training  # noqa: E402

from megagpt.data import loader as loader_module  # noqa: E402

KIND, RANK, STEP = os.environ["MEGAGPT_TEST_FAULT"].split(":")
RANK, STEP = int(RANK), int(STEP)
# the step (from 1) whose batch the training loader read last, counted in whole batches of its position (a
# spike recovery skips whole steps' samples, so after one this is the step that batch had in an uninterrupted run)
_loader_step = [0]
_next_step = loader_module.PretrainingLoader.next_step


def _recording_next_step(self):
    batches = _next_step(self)
    if torch.is_grad_enabled():  # the training loader, not evaluation's
        _loader_step[0] = self.consumed_samples // self.global_batch
    return batches


loader_module.PretrainingLoader.next_step = _recording_next_step


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


_micro_loss, _calls = training.micro_loss, [0]


def _faulty_micro_loss(engine, rows, device):
    loss = _micro_loss(engine, rows, device)
    if not torch.is_grad_enabled():  # evaluation
        return loss
    step = _calls[0] // engine.gradient_accumulation_steps() + 1
    _calls[0] += 1
    if KIND == "spike":
        if _loader_step[0] == STEP and int(os.environ.get("RANK", "0")) == RANK:
            return loss + 20.0
        return loss
    if step == STEP and int(os.environ.get("RANK", "0")) == RANK:
        if KIND == "nan_loss":
            return loss + torch.tensor(math.nan, device=loss.device)
        if KIND == "nan_grad":
            return _NanGradient.apply(loss)
        raise ValueError(f"unknown fault {KIND!r}")
    return loss


training.micro_loss = _faulty_micro_loss


class _FaultyPipelineModule(ds_pipe.PipelineModule):
    """DeepSpeed's PipelineModule whose loss_fn gets the fault (the pipeline engine never calls micro_loss)."""

    def __init__(self, *args, loss_fn=None, **kwargs):
        def faulty_loss_fn(logits, labels):
            loss = loss_fn(logits, labels)
            if (KIND == "nan_loss" and torch.is_grad_enabled() and _loader_step[0] == STEP
                    and int(os.environ.get("RANK", "0")) == RANK):
                return loss + torch.tensor(math.nan, device=loss.device)
            return loss

        super().__init__(*args, loss_fn=faulty_loss_fn, **kwargs)


ds_pipe.PipelineModule = _FaultyPipelineModule  # megagpt/parallel/pipeline.py imports it when it builds one

if __name__ == "__main__":
    sys.exit(pretrain.main())
