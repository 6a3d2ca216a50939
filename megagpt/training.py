"""The training loop: data, schedules, steps, logging, evaluation, checkpoints and clean stops.

One optimizer step: the loader hands this rank its full-length micro batches; the sequence-length
warmup re-packs each into (inputs, labels) rows of the step's length, every label kept (it advances once
per step); the LR schedule sets the learning rate; then each micro batch runs forward, ``engine.backward``
and ``engine.step`` (DeepSpeed accumulates and steps the optimizer on the last one). Everything that decides what a step
computes — loader position, schedules, RNG states — is checkpointed, so a resumed run repeats the
uninterrupted one bit for bit. A step that is not finite on any rank is skipped everywhere, and loss spikes
can roll the run back to its newest checkpoint (megagpt/stability.py).
"""
from __future__ import annotations

import math
import signal
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megagpt.checkpoint import NonFiniteWeights, load_checkpoint, save_checkpoint, weights_are_finite
from megagpt.checkpoint_dir import latest_tag, tag_step
from megagpt.config import Config
from megagpt.convert.universal import is_universal_dir
from megagpt.engine import Launch, is_pipeline_engine
from megagpt.optim import LRSchedule, LRScheduler, SeqLenSchedule, SeqLenWarmup, restore_paged_state
from megagpt.stability import NonFiniteGuard, SpikeDetector, TrainingDiverged, append_recovery, read_recoveries


CLIENT_STATE_KEY = "megagpt"


@dataclass
class TrainState:
    """Counters saved in every checkpoint's client state."""

    step: int = 0
    tokens: int = 0  # label tokens trained on, all ranks


def build_datasets(config: Config, launch: Launch):
    """Train and valid datasets for ``config.data``: ``train_iters x global_batch`` train samples and
    ``eval_iters x global_batch`` valid samples (every evaluation reads the same valid batches, so
    evaluations are comparable). Rank 0 builds the index caches first; the others then read them."""
    from megagpt.data.blend import build_blended_datasets

    data, batch, stability = config.data, config.batch, config.stability
    train_steps = config.schedule.train_iters
    if stability.spike_recovery:  # batches skipped after spikes are replaced by later ones
        train_steps += stability.max_rollbacks * stability.spike_skip_batches
    num_samples = (train_steps * batch.global_batch, config.logging.eval_iters * batch.global_batch, 0)

    def build():
        return build_blended_datasets(list(data.data_path), data.split, config.model.seq_len, num_samples,
                                      data.seed, data.cache_dir)

    if launch.is_main:
        datasets = build()
    _barrier()
    if not launch.is_main:
        datasets = build()
    return datasets[0], datasets[1]


def build_schedules(config: Config) -> tuple[LRScheduler, SeqLenWarmup]:
    """The LR scheduler (in steps or tokens) and the sequence-length warmup from ``config.schedule``."""
    sched, full_len = config.schedule, config.model.seq_len
    per_unit = 1 if sched.lr_decay_unit == "steps" else config.tokens_per_step
    lr = LRScheduler(LRSchedule(peak_lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
                                warmup=sched.warmup_iters * per_unit, total=sched.train_iters * per_unit,
                                constant_fraction=sched.constant_fraction, unit=sched.lr_decay_unit,
                                decay_style=sched.lr_decay_style))
    if sched.seq_len_stages is not None:
        seq = SeqLenSchedule.from_stages(full_len, sched.seq_len_stages)
    elif sched.seq_len_ramp is not None:
        seq = SeqLenSchedule.linear_ramp(full_len, sched.seq_len_ramp["start"], sched.seq_len_ramp["steps"])
    else:
        seq = SeqLenSchedule.constant(full_len)
    return lr, SeqLenWarmup(seq)


def _barrier() -> None:
    # NCCL's barrier runs on the current CUDA device, which init_distributed set to this rank's
    if dist.is_initialized():
        dist.barrier()


# Every tensor handed to a collective lives on the training device: a process group started for CUDA
# ("nccl") has no backend for CPU tensors ("No backend type associated with device type cpu").
def _mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    """Average a float over all ranks (gloo has no AVG reduction: sum, then divide); collective when
    ``world_size > 1``, on a tensor on ``device`` (the training device)."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size


def _any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (so all ranks stop at the same step); the
    all-reduce runs on ``device`` (the training device). A 0-d bool tensor is reduced as it is: the one
    host sync is the result's."""
    if not dist.is_initialized():
        return bool(flag)
    if torch.is_tensor(flag):
        tensor = flag.reshape(1).to(device=device, dtype=torch.int32)
    else:
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can save a checkpoint before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _plain_fp32_engine(engine) -> bool:
    """True when DeepSpeed steps the client optimizer directly (ZeRO-0, fp32): it then clips without
    keeping the norm, so ``get_global_grad_norm`` is None and we compute the norm ourselves."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def _grad_norm(module: torch.nn.Module, device: torch.device, tp_group=None) -> float:
    """L2 norm over every parameter gradient of ``module`` (on ``device``, the training device); under
    tensor parallelism the squares of split parameters (``tensor_model_parallel``) are summed over
    ``tp_group``, replicated ones counted once."""
    split, replicated = [], []
    for p in module.parameters():
        if p.grad is not None:
            (split if getattr(p, "tensor_model_parallel", False) else replicated).append(p.grad.float())

    def squares(grads):
        if not grads:  # e.g. a rank without split parameters: still joins the all-reduce, on the device
            return torch.zeros((), device=device)
        return torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum()

    split_squares = squares(split)
    if tp_group is not None:
        dist.all_reduce(split_squares, group=tp_group)
    return math.sqrt((split_squares + squares(replicated)).item())


def micro_loss(engine, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean next-token loss of one micro batch ``(inputs, labels)``, both ``[rows, seq_len]`` (the model's own
    loss: vocab-parallel under tensor parallelism; labels ``IGNORE_INDEX`` are skipped)."""
    inputs, labels = (t.to(device, non_blocking=True) for t in batch)
    return engine.module.loss(engine(inputs), labels)


def full_rows(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length samples ``[b, seq_len + 1]`` as ``(inputs, labels)``."""
    return samples[:, :-1], samples[:, 1:]


def _pipeline_batches(micro_batches, device: torch.device):
    """What a DeepSpeed pipeline engine pulls per micro batch: (inputs, labels); the first stage reads the
    inputs, the last the labels."""
    return iter([(inputs.to(device), labels.to(device)) for inputs, labels in micro_batches])


@torch.no_grad()
def evaluate(engine, valid_dataset, config: Config, launch: Launch, groups) -> float:
    """Mean validation loss over ``eval_iters`` global batches at the full length, averaged over ranks."""
    from megagpt.data.loader import PretrainingLoader

    loader = PretrainingLoader(valid_dataset, config.batch.micro_batch, config.batch.global_batch,
                               groups.topology.dp, groups.dp_rank)
    if is_pipeline_engine(engine):
        # the pipeline's activation buffers are shaped for the training length: reset around full-length eval
        engine.reset_activation_shape()
        micro = [[full_rows(torch.from_numpy(m)) for m in loader.next_step()]
                 for _ in range(config.logging.eval_iters)]
        losses = [engine.eval_batch(_pipeline_batches(step, launch.device)).item() for step in micro]
        engine.reset_activation_shape()
    else:
        engine.eval()
        losses = [micro_loss(engine, full_rows(torch.from_numpy(m)), launch.device).item()
                  for _ in range(config.logging.eval_iters) for m in loader.next_step()]
        engine.train()
    return _mean_over_ranks(float(np.mean(losses)), launch.world_size, launch.device)


def train(config: Config, engine, launch: Launch, groups, exit_interval: int | None = None) -> TrainState:
    """Train ``engine`` per ``config`` from the latest checkpoint in ``checkpoint.load`` (or ``save``),
    or from scratch. Stops after ``train_iters``, on SIGTERM/SIGINT, or at a multiple of
    ``exit_interval``; saves a checkpoint whenever it stops (when ``checkpoint.save`` is set)."""
    from megagpt.data.loader import PretrainingLoader
    from megagpt.metrics import (MetricsLogger, flops_per_token, mfu, resolve_peak_tflops, StepTimer,
                                 tflops_per_device)

    # tensor-parallel ranks of one data-parallel replica read the same samples
    dp_size = groups.topology.dp
    train_ds, valid_ds = build_datasets(config, launch)
    loader = PretrainingLoader(train_ds, config.batch.micro_batch, config.batch.global_batch, dp_size,
                               groups.dp_rank)
    lr_scheduler, warmup = build_schedules(config)
    state = TrainState()
    save_dir = config.checkpoint.save
    stability = config.stability
    detector = SpikeDetector(stability.spike_window, stability.spike_std,
                             stability.spike_ratio) if stability.spike_recovery else None
    resume_step = _resume(engine, config, launch, loader, lr_scheduler, warmup, state, detector)

    metrics_dir = save_dir or tempfile.mkdtemp(prefix="megagpt-metrics-")
    device_name = torch.cuda.get_device_name(launch.device) if launch.device.type == "cuda" else "cpu"
    peak = resolve_peak_tflops(config.logging.peak_tflops_per_device, device_name, config.parallel.precision)
    sync = torch.cuda.synchronize if launch.device.type == "cuda" else None

    guard = NonFiniteGuard(engine, stability.max_consecutive_skips, lambda flag: _any_rank(flag, launch.device),
                           enabled=stability.skip_non_finite)

    def save() -> None:
        if save_dir is not None:
            # never write, and never rotate in, a broken state
            if _any_rank(not weights_are_finite(engine), launch.device):
                raise NonFiniteWeights(f"the weights at step {state.step} are not finite on some rank: no checkpoint "
                                       f"written; the last good one is {_last_good(save_dir)}")
            # one key of our own: DeepSpeed drops client keys that clash with its own (e.g. "lr_scheduler")
            client_state = {CLIENT_STATE_KEY: {
                "loader": loader.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "seq_len_warmup": warmup.state_dict(), "step": state.step, "tokens": state.tokens,
                "config": config.to_dict()}}
            if detector is not None:
                client_state[CLIENT_STATE_KEY]["spike_detector"] = detector.state_dict()
            save_checkpoint(engine, save_dir, state.step, client_state, config, launch.rank)

    with MetricsLogger(metrics_dir, config.logging, launch.rank, resume_step=resume_step,
                       run_config=config.to_dict()) as logger, StopSignal() as stop:
        if launch.is_main and save_dir is None:
            print(f"checkpoint.save is not set: no checkpoints; metrics go to {metrics_dir}", flush=True)
        timer, losses = StepTimer(sync), []
        saved_at = state.step
        pipeline, pipeline_len = is_pipeline_engine(engine), None
        step_starts = {}  # step -> the loader position its batch starts at (what a spike recovery skips)
        while state.step < config.schedule.train_iters:
            seq_len, warmup_state = warmup.seq_len, warmup.state_dict()
            batches = loader.next_step()
            if detector is not None:  # only a spike recovery reads it
                step_starts[state.step + 1] = loader.consumed_samples - config.batch.global_batch
            # each micro batch keeps its own samples' labels, every one of them (megagpt/optim/seq_len_schedule.py)
            micro_batches = warmup.next_step([torch.from_numpy(m) for m in batches])
            step_tokens = config.tokens_per_step  # every label of the step's samples, whatever the row length
            schedules_before = (lr_scheduler.state_dict(), warmup_state)  # restored if the step is skipped
            lr = lr_scheduler.step(step_tokens, engine.optimizer)
            step_losses, plain_norm = [], None
            if pipeline:
                if seq_len != pipeline_len:  # activation shapes change with the sequence length
                    engine.reset_activation_shape()
                    pipeline_len = seq_len
                # all micro batches, forward and backward through the stages, and the optimizer step
                step_losses.append(engine.train_batch(_pipeline_batches(micro_batches, launch.device)))
            for batch in (() if pipeline else micro_batches):
                loss = micro_loss(engine, batch, launch.device)
                engine.backward(loss)
                guard.observe_loss(loss)
                if engine.is_gradient_accumulation_boundary():
                    guard.decide()  # once per optimizer step: any rank non-finite -> every rank skips
                    if logger.is_log_step(state.step + 1) and _plain_fp32_engine(engine):
                        # reduced, not yet clipped: what ZeRO reports
                        plain_norm = _grad_norm(engine.module, launch.device,
                                                groups.tp_group if groups.topology.tp > 1 else None)
                engine.step()
                step_losses.append(loss.detach())
            state.step += 1
            if guard.finish_step():
                # weights and optimizer untouched; the schedules go back to where this step found them
                lr_scheduler.load_state_dict(schedules_before[0])
                warmup.load_state_dict(schedules_before[1])
                logger.log_skip(state.step, guard.skipped_total, guard.consecutive)
                guard.raise_if_diverged(state.step, _last_good(save_dir))
            else:
                state.tokens += step_tokens
                timer.add_tokens(step_tokens)
                # kept on the device: reading it back (.item()) every step would sync the GPU each step
                losses.append(torch.stack(step_losses).float().mean())
                if detector is not None:  # the one host sync per step that spike recovery costs
                    loss_now = _mean_over_ranks(losses[-1].item(), launch.world_size, launch.device)
                    if detector.is_spike(loss_now):
                        _roll_back(engine, config, launch, loader, lr_scheduler, warmup, state, detector, logger,
                                   step_starts, loss_now)
                        losses, step_starts = [], {}
                        saved_at = state.step
                        timer.restart()
                        continue
                    detector.add(loss_now)

            if logger.is_log_step(state.step):
                # a window of skipped steps only has no loss to report
                loss_avg = _mean_over_ranks(float(np.mean([x.item() for x in losses])) if losses else math.nan,
                                            launch.world_size, launch.device)
                tokens_per_sec, _ = timer.lap()
                fpt = flops_per_token(config.model, seq_len)
                tflops = tflops_per_device(tokens_per_sec, launch.world_size, fpt)
                grad_norm = engine.get_global_grad_norm()
                grad_norm = plain_norm if grad_norm is None else float(grad_norm)
                logger.log_train(state.step, loss_avg, lr, grad_norm, seq_len, state.tokens, tokens_per_sec,
                                 tflops, mfu(tokens_per_sec / launch.world_size, fpt, peak))
                losses = []
            if logger.is_eval_step(state.step) and valid_ds is not None:
                logger.log_eval(state.step, evaluate(engine, valid_ds, config, launch, groups), state.tokens)
                pipeline_len = None
                timer.restart()
            stopping = _any_rank(stop.received is not None, launch.device) or (
                exit_interval is not None and state.step % exit_interval == 0)
            if state.step % config.checkpoint.save_interval == 0 or stopping:
                save()
                saved_at = state.step
            if stopping:
                if launch.is_main:
                    print(f"stopping at step {state.step} (checkpoint saved: {save_dir is not None})", flush=True)
                break
        if saved_at != state.step:
            save()
    return state


def _last_good(save_dir: str | None) -> str | None:
    """The checkpoint a diverged or stopped run can resume from (the one ``latest`` names)."""
    tag = latest_tag(save_dir) if save_dir is not None else None
    return None if tag is None else f"{save_dir}/{tag}"


def resume_directory(config: Config) -> str | None:
    """The directory a run resumes from: ``checkpoint.save`` if it has a checkpoint (re-running the same command
    continues), else ``checkpoint.load`` if it has one; None for a fresh start."""
    candidates = [d for d in (config.checkpoint.save, config.checkpoint.load) if d is not None]
    # a save directory with a 'latest' checkpoint, or a universal one (tools/convert_checkpoint.py)
    return next((d for d in candidates if latest_tag(d) is not None or is_universal_dir(d)), None)


def _roll_back(engine, config: Config, launch: Launch, loader, lr_scheduler, warmup, state: TrainState, detector,
               logger, step_starts: dict, loss: float) -> None:
    """Loss spike at ``state.step``: record the samples of the ``spike_skip_batches`` steps up to it (those
    after the newest checkpoint) in ``recoveries.json``, reload that checkpoint, and go on without them."""
    stability, save_dir, spike_step = config.stability, config.checkpoint.save, state.step
    tag = latest_tag(save_dir) if save_dir is not None else None
    recoveries = read_recoveries(save_dir)
    if tag is None or len(recoveries) >= stability.max_rollbacks:
        why = ("there is no checkpoint to roll back to" if tag is None else
               f"stability.max_rollbacks={stability.max_rollbacks} recoveries were made already")
        raise TrainingDiverged(f"loss spike at step {spike_step} (loss {loss:.4f}, recent mean "
                               f"{np.mean(detector.recent):.4f}) and {why}; nothing more was saved. Last good "
                               f"checkpoint: {_last_good(save_dir)}")
    good_step = tag_step(tag)
    first = max(spike_step - stability.spike_skip_batches + 1, good_step + 1)
    record = {"spike_step": spike_step, "loss": loss, "rolled_back_to": good_step,
              "skipped_samples": [step_starts[first], loader.consumed_samples]}
    if launch.is_main:
        append_recovery(save_dir, record)  # before the rollback: a run killed from here on skips them too
        print(f"loss spike at step {spike_step} (loss {loss:.4f}, recent mean {np.mean(detector.recent):.4f}): "
              f"rolling back to {save_dir}/{tag} and skipping samples {record['skipped_samples']} (the batches of "
              f"steps {first}-{spike_step})", flush=True)
    _barrier()
    _resume(engine, config, launch, loader, lr_scheduler, warmup, state, detector)
    logger.rewind(good_step)
    logger.log_rollback(good_step, record)


def _resume(engine, config: Config, launch: Launch, loader, lr_scheduler, warmup, state: TrainState,
            detector=None) -> int | None:
    """Load the latest checkpoint and restore every counter; returns the resumed step, or None for a fresh
    start. ``checkpoint.save`` is looked at first (this run's own newer checkpoints, so re-running the same
    command continues), then ``checkpoint.load`` (where a new run starts from)."""
    directory = resume_directory(config)
    if directory is None:
        if config.checkpoint.load is not None and launch.is_main:
            print(f"checkpoint.load={config.checkpoint.load} has no checkpoint: starting from scratch", flush=True)
        return None
    client_state = load_checkpoint(engine, directory, launch.rank, launch.world_size, config.seed,
                                   strict=config.checkpoint.strict_resume)
    restore_paged_state(engine.optimizer)  # loading fills a paged 8-bit optimizer's state with plain tensors
    if CLIENT_STATE_KEY not in client_state:
        raise ValueError(f"the checkpoint in {directory} has no {CLIENT_STATE_KEY!r} state: it was not written by "
                         "megagpt/pretrain.py; start a fresh run with another --save directory")
    client_state = client_state[CLIENT_STATE_KEY]
    loader.load_state_dict(client_state["loader"])
    lr_scheduler.load_state_dict(client_state["lr_scheduler"])
    warmup.load_state_dict(client_state["seq_len_warmup"])
    state.step, state.tokens = int(client_state["step"]), int(client_state["tokens"])
    for recovery in read_recoveries(config.checkpoint.save):  # spike recoveries after this checkpoint was taken
        loader.skip(*recovery["skipped_samples"])
    if detector is not None and "spike_detector" in client_state:
        detector.load_state_dict(client_state["spike_detector"])
    changed = _changed_fields(client_state["config"], config.to_dict())
    if changed and launch.is_main:
        print(f"note: resuming with config values changed since the checkpoint: {', '.join(changed)}", flush=True)
    if launch.is_main:
        print(f"resumed from {directory} at step {state.step} ({state.tokens:,} tokens)", flush=True)
    return state.step


def _changed_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names whose values differ between two config dicts."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


__all__ = ["TrainState", "StopSignal", "build_datasets", "build_schedules", "evaluate", "full_rows", "micro_loss",
           "train"]
