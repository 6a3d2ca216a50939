"""megagpt.metrics: FLOP/MFU arithmetic, StepTimer, and the MetricsLogger sinks (JSONL, TensorBoard)."""
import importlib.util
import io
import json
import math

import pytest
import torch

from megagpt.config import LoggingConfig, ModelConfig
from megagpt.metrics import (METRICS_FILENAME, MetricsLogger, StepTimer, device_peak_tflops, flops_per_token, mfu,
                             perplexity, read_metrics, resolve_peak_tflops, tflops_per_device)

TINY = dict(vocab_size=100, seq_len=16, d_model=8, num_layers=2, num_heads=2, bias=False)


def test_flops_per_token_hand_computed():
    # vocab 100 pads to 128. Per layer, no biases: 2 LayerNorms 2*8, QKV 8*24, out 8*8, MLP 8*32 + 32*8 = 784.
    # Matmul parameters: 2 layers * 784 + final LayerNorm 8 + output head 128*8 = 2600 (the embedding lookup
    # is excluded, the head counted once). Attention: 12 * L=2 * d_attn=8 * T=16 = 3072.
    expected = 6 * 2600 + 3072
    assert flops_per_token(ModelConfig(**TINY), 16) == expected
    # Tying, or a learned position table, changes the parameter count but not the matmul FLOPs.
    assert flops_per_token(ModelConfig(**TINY, tied_embeddings=False), 16) == expected
    assert flops_per_token(ModelConfig(**TINY, position="learned"), 16) == expected
    # The attention term follows the step's sequence length, not the configured maximum.
    assert flops_per_token(ModelConfig(**TINY), 4) == 6 * 2600 + 12 * 2 * 8 * 4


def test_flops_per_token_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(ModelConfig(**TINY), 0)


def test_mfu_and_tflops_numbers():
    # 8 devices at 1.6M tokens/s total with 6e9 FLOPs per token: 1.2e15 FLOP/s per device = 1200 TFLOP/s.
    assert tflops_per_device(1.6e6, 8, 6e9) == pytest.approx(1200.0)
    # 2e5 tokens/s per device * 1e9 FLOPs = 200 TFLOP/s, against an A100's 312 peak.
    assert mfu(2e5, 1e9, 312.0) == pytest.approx(200 / 312)
    assert mfu(2e5, 1e9, None) is None
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(2e5, 1e9, 0.0)


def test_device_peaks_and_resolution():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("cpu") is None
    assert resolve_peak_tflops(None, "cpu") is None
    assert resolve_peak_tflops(500.0, "NVIDIA A100-SXM4-80GB") == 500.0  # the config wins over the table
    assert resolve_peak_tflops(None, "NVIDIA H200") == 989.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),  # "L4" is not a match inside "L40"
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0),  # NVL parts are not the SXM ones
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("Tesla V100-SXM2-16GB", None),  # V100: no bf16 tensor cores
])
def test_bf16_peak_of_each_device_name(name, peak):
    assert device_peak_tflops(name) == peak


def test_an_fp32_run_is_measured_against_the_fp32_or_tf32_peak():
    matmul = torch.backends.cuda.matmul  # a torch module object whose attributes monkeypatch cannot restore
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert resolve_peak_tflops(None, "NVIDIA H100 80GB HBM3", "fp32") == 67.0
        assert resolve_peak_tflops(None, "NVIDIA A100-SXM4-80GB", "fp32") == 19.5
        assert resolve_peak_tflops(None, "NVIDIA H100 80GB HBM3", "bf16") == 989.0
        assert resolve_peak_tflops(None, "Tesla V100-SXM2-16GB", "fp16") == 125.0
        matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores
        assert resolve_peak_tflops(None, "NVIDIA H100 80GB HBM3", "fp32") == 494.0
    finally:
        matmul.allow_tf32 = before
    assert resolve_peak_tflops(123.0, "NVIDIA H100 80GB HBM3", "fp32") == 123.0
    with pytest.raises(ValueError, match="precision 'fp8'"):
        device_peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_perplexity_guards_overflow():
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf


def test_step_timer_rate_and_synchronize():
    now, syncs = [10.0], []
    timer = StepTimer(synchronize=lambda: syncs.append(now[0]), clock=lambda: now[0])
    timer.add_tokens(300)
    timer.add_tokens(500)
    now[0] = 12.0
    assert timer.lap() == (400.0, 2.0)
    now[0] = 12.5
    timer.add_tokens(100)
    assert timer.lap() == (200.0, 0.5)  # a lap starts the next interval
    assert syncs == [10.0, 12.0, 12.5]  # synchronized before every clock reading


def _log_steps(logger, steps):
    for s in steps:
        logger.log_train(step=s, loss=5.0 - 0.1 * s, lr=1e-3, grad_norm=0.5, seq_len=16, tokens=64 * s,
                         tokens_per_sec=1000.0 + s, tflops_per_device=None, mfu=None)


def test_jsonl_records_and_console_line(tmp_path, capsys):
    with MetricsLogger(tmp_path / "run", LoggingConfig(log_interval=2), rank=0) as logger:
        _log_steps(logger, [2, 4])
        logger.log_eval(4, math.log(20.0), tokens=256)
        logger.log_train(step=6, loss=float("nan"), lr=1e-3, grad_norm=None, seq_len=8, tokens=300,
                         tokens_per_sec=10.0, tflops_per_device=0.5, mfu=0.25)
        assert logger.is_log_step(4) and not logger.is_log_step(5)
    lines = (tmp_path / "run" / METRICS_FILENAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN literals
    assert [r["step"] for r in records] == [2, 4, 4, 6]
    for key in ("step", "loss", "lr", "seq_len", "tokens", "tokens_per_sec", "grad_norm", "mfu"):
        assert key in records[0]
    assert records[1]["loss"] == pytest.approx(4.6) and records[1]["tokens"] == 256
    assert records[2]["valid_ppl"] == pytest.approx(20.0) and "loss" not in records[2]
    assert records[3]["loss"] is None and records[3]["grad_norm"] is None and records[3]["mfu"] == 0.25
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("step 2 | loss 4.8000") and "MFU n/a" in out[0]
    assert "valid ppl 20.000" in out[2] and "MFU 25.0%" in out[3]


def test_resume_drops_records_after_resumed_step(tmp_path):
    config = LoggingConfig()
    with MetricsLogger(tmp_path, config, rank=0) as logger:
        _log_steps(logger, [10, 20, 30])
        logger.log_eval(20, 2.0)
    with open(tmp_path / METRICS_FILENAME, "a") as f:
        f.write('{"step": 40, "lo')  # a crash in the middle of a write
    with MetricsLogger(tmp_path, config, rank=0, resume_step=20) as logger:
        _log_steps(logger, [30])
    steps = [r["step"] for r in read_metrics(tmp_path / METRICS_FILENAME)]
    assert steps == [10, 20, 20, 30]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_line_in_the_middle_raises_on_resume(tmp_path):
    (tmp_path / METRICS_FILENAME).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsLogger(tmp_path, LoggingConfig(), rank=0, resume_step=1)


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb_dir = tmp_path / "tb"
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=str(tb_dir)), rank=0, stream=io.StringIO()) as lg:
        _log_steps(lg, [1, 2])
        lg.log_eval(2, 1.5)
    assert list(tb_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 4.9), (2, 4.8)]
    assert [e.step for e in events.Scalars("train/loss_vs_tokens")] == [64, 128]
    assert events.Scalars("valid/ppl")[0].value == pytest.approx(math.exp(1.5), rel=1e-6)  # float32 storage
    assert "train/mfu" not in events.Tags()["scalars"]  # None is not logged as a number


def test_rank_nonzero_writes_nothing(tmp_path, capsys):
    config = LoggingConfig(tensorboard=str(tmp_path / "tb"), wandb_project="never-imported")
    with MetricsLogger(tmp_path / "run", config, rank=1) as logger:
        _log_steps(logger, [1])
        logger.log_eval(1, 2.0)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_requested_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="wandb_project"):
        MetricsLogger(tmp_path, LoggingConfig(wandb_project="demo"), rank=0)


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = LoggingConfig(tensorboard=str(tmp_path / "tb"))
    with MetricsLogger(tmp_path, config, rank=0, stream=io.StringIO()) as logger:
        _log_steps(logger, [1, 2, 3])
    with MetricsLogger(tmp_path, config, rank=0, resume_step=2, stream=io.StringIO()) as logger:
        logger.log_train(step=3, loss=1.25, lr=1e-3, grad_norm=0.5, seq_len=16, tokens=192,
                         tokens_per_sec=1.0, tflops_per_device=None, mfu=None)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 4.9), (2, 4.8), (3, 1.25)]
