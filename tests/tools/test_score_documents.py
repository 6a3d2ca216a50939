"""tools/score_documents.py: outputs, refusals (existing outputs, another tokenizer's data), and 2 ranks = 1 rank."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.convert.weights import save_model_weights
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.selection.scores import check_alignment, read_scores
from testing_utils import REPO, _clean_env, load_script

score_tool = load_script("tools/score_documents.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _checkpoint(out_dir):
    from megagpt.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, seq_len=32, d_model=32, num_layers=2, num_heads=2,
                         make_vocab_size_divisible_by=64, init_std=0.3)
    return str(save_model_weights(GPT(config).state_dict(), out_dir,
                                  config={"model": config.to_dict(), "tokenizer": {"type": "ByteLevelTokenizer"}}))


def _dataset(prefix, n=23, vocab=257, seed=0):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(n):
            writer.add_document(rng.integers(0, vocab, size=int(rng.integers(1, 80))))
    return str(prefix)


def test_writes_scores_summary_and_histogram(tmp_path, capsys):
    ckpt, data = _checkpoint(tmp_path / "ckpt"), _dataset(tmp_path / "d")
    out = tmp_path / "d.ppl.npz"
    args = ["--load", ckpt, "--data-path", data, "--output", str(out), "--chunk-documents", "5", "--stride", "16",
            "--quiet"]
    assert score_tool.main(args) == 0, capsys.readouterr().err
    scores = read_scores(out)
    check_alignment(scores, data)
    assert scores.meta["kind"] == "perplexity" and scores.meta["settings"] == {"seq_length": 32, "stride": 16,
                                                                              "batch_size": 16}
    assert scores.meta["checkpoint"]["dtype"] == "float32"
    assert scores.meta["tokenizer_check"]["tokenizer"]["type"] == "ByteLevelTokenizer"
    assert scores.columns["tokens"].sum() == scores.meta["summary"]["scored_tokens"]
    summary = json.loads((tmp_path / "d.ppl.summary.json").read_text())
    assert summary["summary"]["documents"] == 23
    assert (tmp_path / "d.ppl.hist.png").read_bytes()[:8] == PNG_MAGIC
    assert "corpus perplexity" in capsys.readouterr().out
    assert score_tool.main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert score_tool.main([*args, "--overwrite"]) == 0


def test_refuses_data_of_another_tokenizer(tmp_path, capsys):
    ckpt, data = _checkpoint(tmp_path / "ckpt"), _dataset(tmp_path / "gpt2ish", vocab=50257)
    code = score_tool.main(["--load", ckpt, "--data-path", data, "--output", str(tmp_path / "x.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "gpt2ish holds token id" in err and "ByteLevelTokenizer" in err and "257-token" in err
    assert not list(tmp_path.glob("x.*"))


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_file_as_one(tmp_path):
    ckpt, data = _checkpoint(tmp_path / "ckpt"), _dataset(tmp_path / "d", n=31)
    script = str(REPO / "tools" / "score_documents.py")
    common = ["--load", ckpt, "--data-path", data, "--chunk-documents", "4", "--quiet", "--device", "cpu"]
    one = subprocess.run([sys.executable, script, *common, "--output", str(tmp_path / "one.npz")], env=_clean_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29863", script, *common, "--output", str(tmp_path / "two.npz")], env=_clean_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr
    a, b = read_scores(tmp_path / "one.npz"), read_scores(tmp_path / "two.npz")
    for name in ("tokens", "nll_sum", "perplexity"):
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    assert b.meta["summary"]["this_run"]["ranks"] == 2
