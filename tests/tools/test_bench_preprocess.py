"""benchmarks/bench_preprocess.py runs end to end on a small cut (no speed assertions), and its unicode corpus is
deterministic and keeps ftfy busy."""
import json
import subprocess
import sys
from pathlib import Path

import ftfy
import pytest
import zstandard
from testing_utils import load_script

REPO = Path(__file__).resolve().parents[2]


unicode_corpus = load_script("benchmarks/unicode_corpus.py")


def _read_zst(path) -> bytes:
    with open(path, "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def test_unicode_corpus_is_deterministic_and_sized(tmp_path):
    a = unicode_corpus.write_unicode_corpus(str(tmp_path / "a.jsonl.zst"), 150_000, seed=3)
    b = unicode_corpus.write_unicode_corpus(str(tmp_path / "b.jsonl.zst"), 150_000, seed=3)
    c = unicode_corpus.write_unicode_corpus(str(tmp_path / "c.jsonl.zst"), 150_000, seed=4)
    data = _read_zst(tmp_path / "a.jsonl.zst")
    assert data == _read_zst(tmp_path / "b.jsonl.zst") != _read_zst(tmp_path / "c.jsonl.zst")
    assert a == b | {"path": a["path"]} and a["input_bytes"] == len(data)
    # Whole documents until the target is passed: over it by less than one document (a few KB at most).
    assert 150_000 <= len(data) < 150_000 + 20_000
    assert data.count(b"\n") == a["documents"] and not list(tmp_path.glob("*.partial"))
    assert c["documents"] > 0


def test_unicode_corpus_needs_ftfy_on_most_lines(tmp_path):
    path = tmp_path / "u.jsonl"
    unicode_corpus.write_unicode_corpus(str(path), 200_000, seed=0)
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line]
    lines = [line for doc in docs for line in doc.split("\n")]
    changed = sum(ftfy.fix_text(line) != line for line in lines)
    assert changed > 0.8 * len(lines), f"only {changed} of {len(lines)} lines need ftfy"
    text = "".join(docs)
    for feature in ["\r\n", "“", "’", "—", "–", "&amp;", "Ã©", "é", "ﬁ"]:
        assert feature in text, f"the corpus has no {feature!r}"
    # Mojibake is really there to fix: ftfy turns some "Ã©" back into "é".
    assert sum(d.count("Ã©") for d in docs) > sum(ftfy.fix_text(d).count("Ã©") for d in docs)


def test_unicode_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="must end in .jsonl"):
        unicode_corpus.write_unicode_corpus(str(tmp_path / "u.txt"), 1000)
    with pytest.raises(ValueError, match="target_bytes"):
        unicode_corpus.write_unicode_corpus(str(tmp_path / "u.jsonl"), 0)


@pytest.mark.slow  # a dozen short preprocessing runs, some with a 2-process pool: ~10 s
def test_benchmark_smoke_run(tmp_path, gcide_path, gpt2_files):
    out = tmp_path / "results" / "preprocess_smoke.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_preprocess.py"), "--corpus", "both", "--max-mb", "0.25",
         "--repeat", "1", "--gcide", gcide_path, "--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1],
         "--output", str(out), "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert "CPU" in result["note"] and result["machine"]["cpu_count"] >= 1
    assert set(result["machine"]["versions"]) >= {"ftfy", "tokenizers", "tiktoken", "numpy"}
    assert set(result["corpora"]) == {"gcide", "unicode"}
    for name, corpus in result["corpora"].items():
        # gcide is cut at whole lines below --max-mb; the generator stops at the first document past it
        assert 100_000 < corpus["input_bytes"] <= 250_000 if name == "gcide" else 250_000 <= corpus["input_bytes"] < 270_000
        assert all(result["checks"][name].values()), result["checks"][name]
    configs = {(r["corpus"], r["config"]) for r in result["results"]}
    assert len(configs) == 12  # 2 corpora x (baseline + megagpt w1, w2) x ftfy on/off
    for r in result["results"]:
        assert len(r["seconds_runs"]) == 1 and r["mb_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["documents"] == result["corpora"][r["corpus"]]["documents"]
    for r in result["results"]:
        if r["impl"] == "baseline":
            assert r["ratio_vs_baseline"] == 1.0
    # The table lists every configuration; the temporary corpora and outputs are gone.
    assert all(config in proc.stdout for _, config in configs) and "vs baseline" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
