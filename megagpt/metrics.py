"""Training metrics: FLOP/MFU accounting, a throughput timer and the rank-0 metrics logger.

The logger writes ``{save}/metrics.jsonl`` (one JSON object per line), optionally TensorBoard event
files and Weights & Biases, and prints one console line per logged step. Two record kinds share the file:

* train: ``step, loss, lr, grad_norm, seq_len, tokens, tokens_per_sec, tflops_per_device, mfu, time``
* valid: ``step, valid_loss, valid_ppl, tokens, time`` (``tokens`` is null when the caller does not know it)

Non-finite floats (a diverged loss) are written as ``null`` so that the file stays strict JSON.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from megagpt.config.model import ModelConfig, parameter_count
from megagpt.config.sections import LoggingConfig

METRICS_FILENAME = "metrics.jsonl"

# Dense (no sparsity) peaks in TFLOP/s per precision, from NVIDIA's data sheets (their headline figures are
# with 2:4 sparsity: halved here). "fp32" is plain FP32 on the CUDA cores, "tf32" the tensor cores' TF32
# (what fp32 matmuls use when torch.backends.cuda.matmul.allow_tf32 is on). Entries are checked in order, so a
# more specific name comes first; an entry matches when each of its words is a whole word of the upper-cased
# device name (torch.cuda.get_device_name()), so "L4" does not match "L40" and "H100" alone is the SXM part.
# V100 has no bf16 tensor cores: no bf16 entry (no MFU rather than one against the wrong peak).
DEVICE_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H100", "PCIE"), {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (("H100", "NVL"), {"bf16": 835.0, "fp16": 835.0, "tf32": 417.0, "fp32": 60.0}),
    (("H200", "NVL"), {"bf16": 835.0, "fp16": 835.0, "tf32": 417.0, "fp32": 60.0}),
    (("GH200",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("H200",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    (("H100",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (("L40S",), {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (("L40",), {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (("L4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (("V100",), {"fp16": 125.0, "fp32": 15.7}),
)
PEAK_PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


# ---- FLOPs and MFU -----------------------------------------------------------------------------
def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: ``6 * N + 12 * L * d_attn * T``.

    ``N`` counts the parameters that take part in a matmul: ``parameter_count(model)`` minus the
    embedding tables (a lookup costs no FLOPs: the token embedding and, for ``position="learned"``, the
    position embedding) plus the output head (``padded_vocab * d_model``), which is a matmul whether or
    not it is tied to the embedding. LayerNorm and bias parameters stay in N (a negligible over-count).
    The attention term is PaLM's (appendix B) and Megatron's/nanoGPT's: ``QK^T`` and ``AV`` cost
    ``4 * T * d_attn`` per token per layer forward, tripled for forward + backward, with ``T`` the
    sequence length of the step; it is NOT halved for the causal mask (kernels that skip the masked half
    therefore reach an MFU a little above the FLOPs they really execute, as in PaLM's convention).
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    embedding = model.padded_vocab_size * model.d_model
    if model.position == "learned":
        embedding += model.seq_len * model.d_model
    head = model.padded_vocab_size * model.d_model
    matmul_params = parameter_count(model) - embedding + (head if model.tied_embeddings else 0)
    # an untied head is already inside parameter_count; a tied one was just removed with the embedding
    attention = 12 * model.num_layers * model.attention_width * seq_len
    return float(6 * matmul_params + attention)


def device_peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s at ``precision`` (``PEAK_PRECISIONS``) of a device named like
    ``torch.cuda.get_device_name()``; None if unknown.

    CPUs, unlisted accelerators and precisions a device has no peak for get None: no MFU is reported rather
    than one against a guessed peak.
    """
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PEAK_PRECISIONS)}")
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for names, peaks in DEVICE_PEAK_TFLOPS:
        if all(name in words for name in names):
            return peaks.get(precision)
    return None


def matmul_precision(precision: str) -> str:
    """The ``PEAK_PRECISIONS`` entry the matmuls of a ``parallel.precision`` run use: fp32 runs use TF32
    tensor cores when torch allows it (``torch.backends.cuda.matmul.allow_tf32``)."""
    import torch

    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def resolve_peak_tflops(configured: float | None, device_name: str, precision: str = "bf16") -> float | None:
    """``logging.peak_tflops_per_device`` when set, else the table's peak for ``device_name`` at the matmul
    precision of a ``parallel.precision`` run (``matmul_precision``), or None."""
    return configured if configured is not None else device_peak_tflops(device_name, matmul_precision(precision))


def tflops_per_device(tokens_per_sec: float, num_devices: int, flops_per_token_: float) -> float:
    """Achieved model TFLOP/s per device, from the global token rate across ``num_devices``."""
    if num_devices <= 0:
        raise ValueError(f"num_devices must be positive, got {num_devices!r}")
    return tokens_per_sec * flops_per_token_ / num_devices / 1e12


def mfu(tokens_per_sec_per_device: float, flops_per_token_: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction in [0, 1] (normally); None when the peak is unknown."""
    if peak_tflops is None:
        return None
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0 or None, got {peak_tflops!r}")
    return tokens_per_sec_per_device * flops_per_token_ / (peak_tflops * 1e12)


def perplexity(loss: float) -> float:
    """``exp(loss)``, returning inf instead of raising when the loss is too large to exponentiate."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ---- throughput --------------------------------------------------------------------------------
class StepTimer:
    """Tokens per second over the interval between two logs (wall clock).

    Call ``add_tokens`` after each step and ``lap`` when logging. ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock reading, because CUDA kernels are launched
    asynchronously and the clock would otherwise stop before the work is done.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self._synchronize = synchronize
        self._clock = clock
        self._tokens = 0
        self._start = self._now()

    def _now(self) -> float:
        if self._synchronize is not None:
            self._synchronize()
        return self._clock()

    def restart(self) -> None:
        """Start a new interval now (e.g. after an evaluation that should not count as training time)."""
        self._tokens = 0
        self._start = self._now()

    def add_tokens(self, tokens: int) -> None:
        """Count tokens processed in the current interval."""
        self._tokens += tokens

    def lap(self) -> tuple[float, float]:
        """Return ``(tokens_per_sec, seconds)`` of the interval so far and start a new one."""
        end = self._now()
        seconds = end - self._start
        rate = self._tokens / seconds if seconds > 0 else 0.0
        self._tokens, self._start = 0, end
        return rate, seconds


# ---- the metrics file --------------------------------------------------------------------------
def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Parse a metrics.jsonl file into a list of records; a malformed line raises naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{number} is not a metrics record with an integer 'step'")
            records.append(record)
    return records


def _truncate_after(path: Path, last_step: int) -> None:
    """Rewrite ``path`` atomically, keeping only records with ``step <= last_step``.

    A last line that does not parse is the trace of a crash in the middle of a write and is dropped;
    a bad line anywhere else means the file is not ours and raises.
    """
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a metrics record; move the file away to resume") from None
        if step <= last_step:
            kept.append(line + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLogger:
    """Writes training/validation metrics; every method is a no-op on ranks other than 0.

    ``resume_step``: the step of the checkpoint being resumed. Records after it are dropped from the
    JSONL file (and TensorBoard purges its events after it) so a resumed run does not duplicate steps;
    None keeps the file as it is. New records are appended and flushed line by line.
    """

    def __init__(self, save_dir: str | Path, config: LoggingConfig, rank: int, resume_step: int | None = None,
                 run_config: dict | None = None, stream: TextIO | None = None):
        self.config = config
        self.rank = rank
        self.path = Path(save_dir) / METRICS_FILENAME
        self._stream = stream
        self._file = self._tensorboard = self._wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            _truncate_after(self.path, resume_step)
        try:
            if config.tensorboard is not None:
                self._tensorboard = self._open_tensorboard(config.tensorboard, resume_step)
            if config.wandb_project is not None:
                self._wandb = self._open_wandb(config.wandb_project, save_dir, run_config)
        except BaseException:
            self.close()  # do not leave a TensorBoard writer open behind a failed wandb start
            raise
        self._file = open(self.path, "a")

    @staticmethod
    def _open_tensorboard(log_dir: str, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"logging.tensorboard={log_dir!r} needs the tensorboard package ({err}); "
                             "pip install tensorboard, or set logging.tensorboard to null") from None
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=log_dir, purge_step=purge)

    @staticmethod
    def _open_wandb(project: str, save_dir: str | Path, run_config: dict | None):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"logging.wandb_project={project!r} needs the wandb package; "
                             "pip install wandb, or set logging.wandb_project to null") from None
        wandb.init(project=project, dir=str(save_dir), config=run_config)
        return wandb

    # ---- cadence ----
    def is_log_step(self, step: int) -> bool:
        """True on the steps where a train line is due (every ``log_interval``)."""
        return step % self.config.log_interval == 0

    def is_eval_step(self, step: int) -> bool:
        """True on the steps where validation is due (every ``eval_interval``, unless ``eval_iters`` is 0)."""
        return self.config.eval_iters > 0 and step % self.config.eval_interval == 0

    # ---- records ----
    def _write(self, record: dict, scalars: dict[str, float | None], step: int, line: str) -> None:
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        present = {k: v for k, v in scalars.items() if v is not None}
        if self._tensorboard is not None:
            for tag, value in present.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(present, step=step)
        print(line, file=self._stream or sys.stdout, flush=True)

    def log_train(self, step: int, loss: float, lr: float, grad_norm: float | None, seq_len: int, tokens: int,
                  tokens_per_sec: float, tflops_per_device: float | None, mfu: float | None) -> None:
        """Record one training step; ``tokens`` is the total consumed so far, ``tokens_per_sec`` the global rate."""
        if self.rank != 0:
            return
        record = {"step": step, "loss": float(loss), "lr": float(lr),
                  "grad_norm": None if grad_norm is None else float(grad_norm), "seq_len": seq_len,
                  "tokens": tokens, "tokens_per_sec": float(tokens_per_sec),
                  "tflops_per_device": None if tflops_per_device is None else float(tflops_per_device),
                  "mfu": None if mfu is None else float(mfu), "time": time.time()}
        scalars = {f"train/{k}": record[k] for k in
                   ("loss", "lr", "grad_norm", "seq_len", "tokens_per_sec", "tflops_per_device", "mfu")}
        if self._tensorboard is not None:  # Megatron's "loss vs samples" view, here per token
            self._tensorboard.add_scalar("train/loss_vs_tokens", record["loss"], tokens)
        line = " | ".join([
            f"step {step}", f"loss {loss:.4f}", f"lr {lr:.3e}",
            "grad norm n/a" if grad_norm is None else f"grad norm {grad_norm:.3f}",
            f"seq {seq_len}", f"tokens {tokens:,}", f"{tokens_per_sec:,.0f} tok/s",
            "TFLOP/s/dev n/a" if tflops_per_device is None else f"{tflops_per_device:.1f} TFLOP/s/dev",
            "MFU n/a" if mfu is None else f"MFU {100 * mfu:.1f}%"])
        self._write(record, scalars, step, line)

    def log_skip(self, step: int, skipped_total: int, consecutive: int) -> None:
        """Record an optimizer step skipped because its loss or gradient norm was not finite."""
        if self.rank != 0:
            return
        record = {"step": step, "skipped_step": True, "skipped_total": skipped_total, "consecutive": consecutive,
                  "time": time.time()}
        self._write(record, {"train/skipped_steps": float(skipped_total)}, step,
                    f"step {step} | SKIPPED: non-finite loss or gradient norm ({consecutive} in a row, "
                    f"{skipped_total} in all); weights, optimizer and schedules unchanged")

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a spike recovery rolled the run back to it), as a resume does."""
        if self.rank != 0:
            return
        self._file.close()
        _truncate_after(self.path, step)
        self._file = open(self.path, "a")

    def log_rollback(self, step: int, recovery: dict) -> None:
        """Record a loss-spike recovery that rolled the run back to ``step``."""
        if self.rank != 0:
            return
        self._write({"step": step, "rollback": recovery, "time": time.time()}, {}, step,
                    f"step {step} | ROLLED BACK from a loss spike at step {recovery['spike_step']} (loss "
                    f"{recovery['loss']:.4f}); samples {recovery['skipped_samples']} skipped")

    def log_eval(self, step: int, loss: float, tokens: int | None = None) -> None:
        """Record a validation loss and its perplexity ``exp(loss)`` (inf when it overflows)."""
        if self.rank != 0:
            return
        ppl = perplexity(loss)
        record = {"step": step, "valid_loss": float(loss), "valid_ppl": ppl, "tokens": tokens,
                  "time": time.time()}
        self._write(record, {"valid/loss": float(loss), "valid/ppl": ppl if math.isfinite(ppl) else None},
                    step, f"step {step} | valid loss {loss:.4f} | valid ppl {ppl:.3f}")

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
