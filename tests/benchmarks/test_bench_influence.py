"""benchmarks/bench_influence.py runs end to end on CPU at the tiniest shape and reports what it promises (no speed
assertion: CPU figures are not GPU figures, and the ratio is a benchmark's business, not a unit test's)."""
import json

from testing_utils import load_script

bench = load_script("benchmarks/bench_influence.py")


def test_cpu_smoke_run_writes_ratio_memory_and_disk(tmp_path, capsys):
    out = tmp_path / "influence.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--doc-tokens", "16", "--documents", "8",
                       "--loop-documents", "2", "--repeats", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "CPU RUN" in report["note"] and "CPU RUN" in capsys.readouterr().out
    assert report["speedup"] == report["fast"]["documents_per_s"] / report["loop"]["documents_per_s"]
    assert report["largest_possible_speedup"] == (report["forward_only"]["documents_per_s"]
                                                  / report["loop"]["documents_per_s"])
    memory = report["memory"]
    assert memory["projected_gradient_floats_per_document"] == report["matrices"] * 16 * 16
    assert memory["projected_gradients_bytes_per_batch_fp32"] == 16 * memory["projected_gradient_bytes_per_document_fp32"]
    assert report["disk_per_million_documents"]["score_file_bytes"] == 24_000_000
    assert not list(tmp_path.glob("*.partial"))
