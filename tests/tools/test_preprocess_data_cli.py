"""tools/preprocess_data.py and tools/merge_datasets.py as users run them."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import ftfy
import numpy as np
import pytest

from megagpt.data.indexed import IndexedDataset
from megagpt.data.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_cli_writes_dataset_report_and_summary(tmp_path, gpt2_files):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "hello “world”"}) + "\n{broken\n")
    proc = _cli("--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "GPT2BPETokenizer",
                "--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1], "--append-eod", "--no-progress")
    assert "documents written 1" in proc.stdout and f"skipped (invalid_json) 1  first at {src}:2" in proc.stdout
    assert json.load(open(tmp_path / "o_report.json"))["documents_written"] == 1
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    assert IndexedDataset(tmp_path / "o_text_document")[0].tolist() == tok.encode('hello "world"').tolist() + [50256]
    # the same command again refuses to overwrite, and --strict turns the bad line into an exit code
    again = _cli("--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "gpt2", "--vocab-file",
                 gpt2_files[0], "--merge-file", gpt2_files[1], check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    strict = _cli("--input", src, "--output-prefix", tmp_path / "s", "--tokenizer-type", "gpt2", "--vocab-file",
                  gpt2_files[0], "--merge-file", gpt2_files[1], "--strict", check=False)
    assert strict.returncode == 1 and f"{src}:2" in strict.stderr
    assert not list(tmp_path.glob("s_*"))


def test_char_level_cli_builds_alphabet(tmp_path):
    src = tmp_path / "play.txt"
    src.write_text("To be, or not to be.\n\nThat is the question.")
    _cli("--input", src, "--output-prefix", tmp_path / "c", "--tokenizer-type", "CharLevelTokenizer",
         "--vocab-file", tmp_path / "chars.json", "--build-char-vocab", "--txt-separator", "\\n\\n", "--no-progress")
    chars = json.load(open(tmp_path / "chars.json"))["chars"]
    ds = IndexedDataset(tmp_path / "c_text_document")
    assert len(ds) == 2 and "".join(chars[i] for i in ds[1]) == "That is the question."


def test_sigkill_leaves_no_finished_dataset(tmp_path, gpt2_files, gcide_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", gcide_path,
                             "--output-prefix", str(tmp_path / "g"), "--tokenizer-type", "GPT2BPETokenizer",
                             "--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1], "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    partial = tmp_path / "g_text_document.bin.partial"
    while not (partial.exists() and partial.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "g_text_document.bin").exists() and not (tmp_path / "g_text_document.idx").exists()
    with pytest.raises(FileNotFoundError):
        IndexedDataset(tmp_path / "g_text_document")


def test_merge_cli(tmp_path):
    from megagpt.data.indexed import IndexedDatasetWriter
    for i in range(2):
        with IndexedDatasetWriter(tmp_path / "parts" / f"p{i}") as w:
            w.add_document(np.arange(3) + 10 * i)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input",
                           str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "m")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(2)] == [[0, 1, 2], [10, 11, 12]]


@pytest.mark.slow
def test_gcide_acceptance_command(tmp_path, gpt2_files, gcide_path, gcide_docs):
    """The issue's acceptance command on the whole gcide file; tokens = ftfy.fix_text + GPT-2 BPE + EOD."""
    _cli("--input", gcide_path, "--output-prefix", tmp_path / "gcide", "--tokenizer-type", "GPT2BPETokenizer",
         "--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1], "--append-eod", "--workers", "2",
         "--no-progress")
    ds = IndexedDataset(tmp_path / "gcide_text_document")
    report = json.load(open(tmp_path / "gcide_report.json"))
    assert len(ds) == report["records_read"] == report["documents_written"] == 15981
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    for i in list(range(0, 400, 7)):
        assert ds[i].tolist() == tok.encode(ftfy.fix_text(gcide_docs[i])).tolist() + [tok.eod]
