"""The training sections of the config tree: data, optimizer, schedule, batch, parallel, checkpoint, logging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megagpt.config._fields import _Section, _check_positive_int

OPTIMIZER_KINDS = ("adamw", "adamw8bit", "paged_adamw8bit")
BITSANDBYTES_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")
LR_DECAY_UNITS = ("steps", "tokens")
# Megatron's --lr-decay-style names; "linear" to min_lr=0 with no warmup is Hugging Face's default schedule
LR_DECAY_STYLES = ("cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
# DeepSpeed PipelineModule partition methods; "uniform" (by layer count) is left out: with the 2-stage tiny
# test model its first training step never finished (DeepSpeed 0.19.8, CPU; not investigated further)
PIPELINE_PARTITIONS = ("parameters", "type:Block")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the tokens come from (see megagpt/data/blend.py).

    ``data_path``: Megatron's form, ``["0.7", "pathA", "0.3", "pathB"]`` (weight, prefix pairs) or
    ``["pathA"]``; each prefix names a ``.bin``/``.idx`` pair. ``split``: train,valid,test weights.
    ``seed`` shuffles the samples (independent of the model-init seed at the top level).
    """

    SECTION = "data"
    data_path: tuple[str, ...]
    split: str = "949,50,1"
    cache_dir: str | None = None  # None: beside each dataset
    num_workers: int = 2
    seed: int = 1234

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):  # "0.7 a 0.3 b", as typed on a command line
            object.__setattr__(self, "data_path", tuple(self.data_path.split()))
        super().__post_init__()

    def _check(self) -> None:
        from megagpt.data.blend import parse_data_path  # one parser for the Megatron syntax
        from megagpt.data.gpt_dataset import split_document_ranges
        try:
            parse_data_path(self.data_path)
        except ValueError as err:
            raise ValueError(f"data.data_path: {err}") from None
        try:
            split_document_ranges(self.split, 0)
        except ValueError as err:
            raise ValueError(f"data.split: {err}") from None
        self._at_least("num_workers", 0)

    @property
    def prefixes(self) -> list[str]:
        """The dataset prefixes of ``data_path`` (weights dropped)."""
        from megagpt.data.blend import parse_data_path
        return parse_data_path(self.data_path)[1]


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """Optimizer inputs (built by megagpt/optim/). ``clip_grad`` 0 disables clipping."""

    SECTION = "optimizer"
    kind: str = "adamw"  # one of OPTIMIZER_KINDS
    lr: float = 6e-4
    min_lr: float = 6e-5  # the LR at the end of the decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    clip_grad: float = 1.0

    def _check(self) -> None:
        self._choice("kind", OPTIMIZER_KINDS)
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            self._at_least(name, 0.0)
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr} must be <= optimizer.lr={self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must both be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ValueError(f"optimizer.eps must be > 0, got {self.eps!r}")

    @property
    def uses_bitsandbytes(self) -> bool:
        """True for the 8-bit optimizers (DeepSpeed then needs zero_allow_untested_optimizer)."""
        return self.kind in BITSANDBYTES_OPTIMIZERS


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """Step counts and the LR / sequence-length schedules' inputs (built by megagpt/optim/).

    ``lr_decay_style``: ``cosine`` or ``linear`` from ``optimizer.lr`` to ``optimizer.min_lr`` (Megatron's
    ``--lr-decay-style``). ``constant_fraction``: share of the training steps (or tokens) at the END of the run
    held at ``optimizer.min_lr`` (the decay ends at ``train_iters x (1 - constant_fraction)``).
    ``seq_len_stages``: ``[[length, steps], ...]`` run in order from step 0; after the last stage
    training uses ``model.seq_len``. ``seq_len_ramp``: ``{"start", "steps"}``, a linear ramp
    from ``start`` to ``model.seq_len`` over ``steps``, rounded down to multiples of 8
    (``megagpt.optim.SeqLenSchedule.linear_ramp``). At most one.
    """

    SECTION = "schedule"
    train_iters: int
    warmup_iters: int = 0
    lr_decay_unit: str = "steps"  # one of LR_DECAY_UNITS
    lr_decay_style: str = "cosine"  # one of LR_DECAY_STYLES
    constant_fraction: float = 0.0
    seq_len_stages: tuple[tuple[int, int], ...] | None = None
    seq_len_ramp: dict[str, Any] | None = None

    def _check(self) -> None:
        _check_positive_int("schedule", "train_iters", self.train_iters)
        self._at_least("warmup_iters", 0)
        if self.warmup_iters > self.train_iters:
            raise ValueError(f"schedule.warmup_iters={self.warmup_iters} must be <= "
                             f"schedule.train_iters={self.train_iters}")
        self._choice("lr_decay_unit", LR_DECAY_UNITS)
        self._choice("lr_decay_style", LR_DECAY_STYLES)
        if not 0.0 <= self.constant_fraction < 1.0:
            raise ValueError(f"schedule.constant_fraction must be in [0, 1), got {self.constant_fraction!r}")
        decay_end = self.train_iters * (1.0 - self.constant_fraction)
        if self.warmup_iters > decay_end:
            raise ValueError(f"schedule.warmup_iters={self.warmup_iters} ends after the decay ends at "
                             f"train_iters x (1 - constant_fraction) = {decay_end:g}; shorten one of them")
        if self.seq_len_stages is not None and self.seq_len_ramp is not None:
            raise ValueError("schedule.seq_len_stages and schedule.seq_len_ramp are both set; choose one")
        if self.seq_len_stages is not None:
            if not self.seq_len_stages:
                raise ValueError("schedule.seq_len_stages is empty; use null for no staging")
            previous = 0
            for i, (length, steps) in enumerate(self.seq_len_stages):
                if length <= 0 or steps <= 0:
                    raise ValueError(f"schedule.seq_len_stages[{i}]=[{length}, {steps}]: length and steps "
                                     "must be positive integers")
                if length < previous:
                    raise ValueError(f"schedule.seq_len_stages[{i}]: length {length} is shorter than the "
                                     f"stage before it ({previous}); stage lengths must not decrease")
                previous = length
            total = sum(steps for _, steps in self.seq_len_stages)
            if total > self.train_iters:
                raise ValueError(f"schedule.seq_len_stages: the stage steps sum to {total} > "
                                 f"schedule.train_iters={self.train_iters}")
        if self.seq_len_ramp is not None:
            ramp = dict(self.seq_len_ramp)
            keys = {"start", "steps"}
            if set(ramp) != keys:
                raise ValueError(f"schedule.seq_len_ramp needs exactly the keys {sorted(keys)} (it ramps to "
                                 f"model.seq_len in multiples of 8), got {sorted(self.seq_len_ramp)}")
            for key in sorted(keys):
                _check_positive_int("schedule.seq_len_ramp", key, ramp[key])
            if ramp["start"] % 8:
                raise ValueError(f"schedule.seq_len_ramp.start must be a multiple of 8, got {ramp['start']}")
            if ramp["steps"] > self.train_iters:
                raise ValueError(f"schedule.seq_len_ramp.steps={ramp['steps']} > "
                                 f"schedule.train_iters={self.train_iters}")
            object.__setattr__(self, "seq_len_ramp", ramp)

    def max_seq_len(self) -> int | None:
        """The longest length the stages ask for, or the ramp's start (None without either); the ramp ends at
        ``model.seq_len``."""
        if self.seq_len_stages is not None:
            return max(length for length, _ in self.seq_len_stages)
        if self.seq_len_ramp is not None:
            return self.seq_len_ramp["start"]
        return None


@dataclass(frozen=True)
class BatchConfig(_Section):
    """Sequences per rank per micro step, and per optimizer step over all data-parallel ranks."""

    SECTION = "batch"
    micro_batch: int
    global_batch: int

    def _check(self) -> None:
        _check_positive_int("batch", "micro_batch", self.micro_batch)
        _check_positive_int("batch", "global_batch", self.global_batch)

    def gradient_accumulation(self, dp_size: int) -> int:
        """Micro steps per optimizer step: ``global_batch / (micro_batch * dp_size)``, which must divide."""
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ValueError(
                f"batch.global_batch={self.global_batch} is not divisible by batch.micro_batch="
                f"{self.micro_batch} x data-parallel size {dp_size} = {per_step}; choose a global_batch "
                f"that is a multiple of {per_step}")
        return self.global_batch // per_step


@dataclass(frozen=True)
class ParallelConfig(_Section):
    """Parallel layout and numerics; the data-parallel size is what the world size leaves.

    ``activation_checkpointing``: recompute each transformer block during backward instead of keeping
    its activations (megagpt/model/gpt.py). ``compile``: ``torch.compile`` (Inductor) the model through
    DeepSpeed's ``engine.compile()``; refused with ZeRO-3 here and with bf16 on CPU (megagpt/engine.py).
    """

    SECTION = "parallel"
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1  # one of ZERO_STAGES
    precision: str = "bf16"  # one of PRECISIONS
    activation_checkpointing: bool = False
    pipeline_partition: str = "parameters"  # one of PIPELINE_PARTITIONS: how layers are split into stages
    compile: bool = False

    def _check(self) -> None:
        _check_positive_int("parallel", "tp", self.tp)
        _check_positive_int("parallel", "pp", self.pp)
        self._choice("zero_stage", ZERO_STAGES)
        self._choice("precision", PRECISIONS)
        self._choice("pipeline_partition", PIPELINE_PARTITIONS)
        if self.compile and self.zero_stage == 3:
            # Checked with DeepSpeed 0.19.8 on CPU: Dynamo traces ZeRO-3's partitioned (empty) parameters instead of
            # the gathered ones and fails ("size mismatch, got input (32xs94), vec (0)").
            raise ValueError("parallel.compile=true with parallel.zero_stage=3: DeepSpeed's engine.compile does "
                             "not work with ZeRO-3 partitioned parameters; use zero_stage <= 2 or compile=false")
        if self.compile and (self.tp > 1 or self.pp > 1):
            raise ValueError(f"parallel.compile=true with parallel.tp={self.tp}, parallel.pp={self.pp}: compiling "
                             "the tensor- or pipeline-parallel model is not tested yet; use compile=false")

    def dp_size(self, world_size: int) -> int:
        """Data-parallel size ``world_size / (tp * pp)``; ValueError when it does not divide."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by parallel.tp={self.tp} x "
                             f"parallel.pp={self.pp} = {model_parallel}")
        return world_size // model_parallel


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """``save``: directory for checkpoints (None: never save); ``load``: directory to resume from.
    ``save_interval``: steps between saves; ``keep_last``: checkpoints kept (0 keeps all).
    ``init_from``: start a NEW run from these weights (continual pretraining): a consolidated checkpoint
    (``tools/convert_checkpoint.py --to consolidated``, or ``--from-hf`` for Hugging Face GPT-2) or a training
    checkpoint of any layout. Only the weights are taken; optimizer, schedules and data start fresh. Ignored
    once the run has a checkpoint of its own to resume. ``strict_resume``: when the checkpoint ``latest`` names
    fails its manifest, refuse (True) instead of resuming the newest intact one with a warning (False)."""

    SECTION = "checkpoint"
    save: str | None = None
    load: str | None = None
    init_from: str | None = None
    save_interval: int = 1000
    keep_last: int = 0
    strict_resume: bool = False  # a damaged newest checkpoint stops the run instead of resuming an older one

    def _check(self) -> None:
        _check_positive_int("checkpoint", "save_interval", self.save_interval)
        self._at_least("keep_last", 0)


@dataclass(frozen=True)
class StabilityConfig(_Section):
    """What the trainer does about divergence (megagpt/stability.py). A step whose loss or gradient norm is
    not finite on any rank is skipped on every rank (weights, optimizer state and schedules unchanged);
    ``max_consecutive_skips`` such steps in a row stop the run with a non-zero exit and nothing more saved.
    ``spike_recovery``: on a loss spike (``spike_std`` deviations above the mean of the last ``spike_window`` step
    losses, or ``spike_ratio`` x that mean), roll back to the newest checkpoint and never train on the
    ``spike_skip_batches`` global batches up to the spike; at most ``max_rollbacks`` times (docs/training.md)."""

    SECTION = "stability"
    skip_non_finite: bool = True  # False: no check at all (benchmarks/bench_nonfinite_guard.py compares the two)
    max_consecutive_skips: int = 5
    spike_recovery: bool = False
    spike_window: int = 50  # recent step losses a loss is compared with
    spike_std: float = 6.0  # a spike: loss > mean + spike_std x standard deviation of the window ...
    spike_ratio: float | None = None  # ... or, when set, loss > spike_ratio x mean of the window
    spike_skip_batches: int = 20  # global batches up to and including the spike that are never trained on
    max_rollbacks: int = 5  # more spikes than this in one run: stop (TrainingDiverged)

    def _check(self) -> None:
        for name in ("max_consecutive_skips", "spike_window", "spike_skip_batches", "max_rollbacks"):
            _check_positive_int("stability", name, getattr(self, name))
        self._at_least("spike_std", 0.0)
        if self.spike_ratio is not None and self.spike_ratio <= 1:
            raise ValueError(f"stability.spike_ratio must be > 1 (a multiple of the recent mean), got {self.spike_ratio}")


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """Logging cadence and sinks; ``peak_tflops_per_device`` (None: unknown) is MFU's denominator."""

    SECTION = "logging"
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    tensorboard: str | None = None  # directory for TensorBoard event files
    wandb_project: str | None = None
    peak_tflops_per_device: float | None = None

    def _check(self) -> None:
        for name in ("log_interval", "eval_interval"):
            _check_positive_int("logging", name, getattr(self, name))
        self._at_least("eval_iters", 0)
        if self.peak_tflops_per_device is not None and self.peak_tflops_per_device <= 0:
            raise ValueError(f"logging.peak_tflops_per_device must be > 0 or null, got "
                             f"{self.peak_tflops_per_device!r}")


@dataclass(frozen=True)
class TokenizerConfig(_Section):
    """The tokenizer the data was made with (megagpt/data/tokenizers.py), recorded so that evaluation,
    generation and the Hugging Face export need no tokenizer flags. ``type`` None: not recorded (the tools
    then ask for ``--tokenizer-type``). Relative paths are relative to the working directory, as ``data_path``."""

    SECTION = "tokenizer"
    type: str | None = None
    vocab_file: str | None = None  # GPT2BPETokenizer: vocab.json; CharLevelTokenizer: the alphabet JSON
    merge_file: str | None = None  # GPT2BPETokenizer: merges.txt
    tokenizer_file: str | None = None  # HFTokenizer: tokenizer.json
    eod_token: str | None = None  # HFTokenizer: the end-of-document token (default: its own guess)

    def _check(self) -> None:
        from megagpt.data.tokenizers import TOKENIZER_ALIASES  # Megatron/NeoX names are accepted too

        if self.type is None:
            return
        if self.type not in TOKENIZER_ALIASES:
            raise ValueError(f"tokenizer.type={self.type!r} is not one of {sorted(TOKENIZER_ALIASES)}")
        needs = {"gpt2": ("vocab_file", "merge_file"), "hf": ("tokenizer_file",),
                 "char": ("vocab_file",)}.get(TOKENIZER_ALIASES[self.type], ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"tokenizer.type={self.type!r} needs tokenizer.{' and tokenizer.'.join(missing)}")

    @property
    def files(self) -> list[str]:
        """The files this tokenizer is read from."""
        return [f for f in (self.vocab_file, self.merge_file, self.tokenizer_file) if f is not None]

    def build(self):
        """The tokenizer object (megagpt.data.tokenizers); ValueError when none is recorded."""
        from megagpt.data.tokenizers import build_tokenizer

        if self.type is None:
            raise ValueError("no tokenizer recorded in the config (tokenizer.type is null): give --tokenizer-type "
                             "and its files, or add a tokenizer section to the training config")
        return build_tokenizer(self.type, vocab_file=self.vocab_file, merge_file=self.merge_file,
                               tokenizer_file=self.tokenizer_file, eod_token=self.eod_token)
