"""tools/plot_metrics.py: a PNG from real MetricsLogger output, and no silent overwrite."""
import io

import pytest

from megagpt.config import LoggingConfig
from megagpt.metrics import MetricsLogger
from testing_utils import load_script

pytest.importorskip("matplotlib")
plot_metrics = load_script("tools/plot_metrics.py")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(save_dir, slope):
    with MetricsLogger(save_dir, LoggingConfig(), rank=0, stream=io.StringIO()) as logger:
        for step in range(1, 21):
            logger.log_train(step=step, loss=6.0 - slope * step, lr=1e-3, grad_norm=1.0, seq_len=32,
                             tokens=128 * step, tokens_per_sec=5000.0 + step, tflops_per_device=None, mfu=None)
            if step % 5 == 0:
                logger.log_eval(step, 6.1 - slope * step)  # no tokens: the plot takes them from train
    return save_dir / "metrics.jsonl"


def test_plot_writes_png_and_refuses_to_overwrite(tmp_path):
    a, b = _write_run(tmp_path / "a", 0.1), _write_run(tmp_path / "b", 0.05)
    out = tmp_path / "plot.png"
    plot_metrics.plot_metrics([a, b], out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 450)  # figsize (12, 4.5) at dpi 100, from the IHDR chunk
    assert len(data) > 10_000  # two axes with curves, not an empty canvas
    with pytest.raises(ValueError, match="--overwrite"):
        plot_metrics.plot_metrics([a], out)
    assert out.read_bytes() == data
    plot_metrics.plot_metrics([a], out, overwrite=True)
    assert out.read_bytes() != data
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_cli_default_output_and_errors(tmp_path, capsys):
    a = _write_run(tmp_path / "a", 0.1)
    assert plot_metrics.main(["--metrics", str(a)]) == 0
    assert (tmp_path / "a" / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_metrics.main(["--metrics", str(a)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert plot_metrics.main(["--metrics", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_valid_records_without_tokens_take_the_train_count_at_their_step():
    train = [{"step": 1, "tokens": 10}, {"step": 3, "tokens": 30}, {"step": 5, "tokens": 50}]
    valid = [{"step": 4}, {"step": 0}, {"step": 5, "tokens": 99}]
    assert [v["tokens"] for v in plot_metrics._valid_tokens(train, valid)] == [30, None, 99]
