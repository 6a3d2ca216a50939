"""benchmarks/bench_selection.py runs end to end on CPU at a tiny size and reports the ratio (no speed assertion:
CPU figures are not GPU figures)."""
import json

import pytest

from testing_utils import load_script

bench = load_script("benchmarks/bench_selection.py")


@pytest.mark.slow  # about a minute on a busy 2-core machine
def test_cpu_smoke_run_reports_the_ratio(tmp_path, capsys):
    output = tmp_path / "selection.json"
    rc = bench.main(["--device", "cpu", "--preset", "tiny", "--documents", "12", "--doc-median", "40",
                     "--train-steps", "1", "--train-batch", "2", "--batch-size", "4", "--min-ratio", "0",
                     "--output", str(output)])
    assert rc == 0
    report = json.loads(output.read_text())
    assert report["device_type"] == "cpu" and "NOT GPU figures" in report["note"]
    assert report["scoring_tokens_per_s"] > 0 and report["training_tokens_per_s"] > 0
    assert report["ratio"] == report["scoring_tokens_per_s"] / report["training_tokens_per_s"]
    assert report["passed"] and "ratio" in capsys.readouterr().out
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--documents", "4", "--train-steps", "1",
                       "--train-batch", "1", "--min-ratio", "1e9", "--output", str(output)]) == 1
