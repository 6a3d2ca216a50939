"""Acceptance: tools/evaluate.py's perplexity on a raw text file equals an independent computation with the
exported Hugging Face model (transformers' own tokenizer and forward) on the same sliding windows."""
import json
import math
import subprocess
import sys

import pytest
import torch

from megagpt.config import Config, ModelConfig
from megagpt.convert.weights import save_model_weights
from megagpt.model import GPT
from testing_utils import REPO

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
        "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n") * 4


def _independent_nll(model, ids: list[int], seq_length: int, stride: int) -> tuple[float, int]:
    """Sum of next-token NLLs and their count: windows of ``seq_length`` inputs starting every ``stride`` tokens,
    each target (positions 1..n-1) scored once, in the first window that predicts it (docs/evaluation.md)."""
    n, total, count, scored_up_to = len(ids), 0.0, 0, 0  # targets 1..scored_up_to are done
    begin = 0
    while scored_up_to < n - 1:
        end = min(begin + seq_length, n - 1)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for position in range(begin + 1, end + 1):  # input index position - begin - 1 predicts ids[position]
            if position > scored_up_to:
                total -= logprobs[position - begin - 1, ids[position]].item()
                count += 1
        scored_up_to = end
        begin += stride
    return total, count


@pytest.mark.parametrize("arch, model_overrides", [
    ("custom", {"position": "alibi", "parallel_residual": True}),
    ("gpt2", {"position": "learned", "parallel_residual": False}),
])
def test_evaluate_perplexity_equals_the_hf_export_on_the_same_windows(tmp_path, gpt2_files, arch, model_overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megagpt.hf import export_hf

    vocab, merges = gpt2_files
    model_config = ModelConfig(vocab_size=50257, seq_len=64, d_model=32, num_layers=2, num_heads=2, init_std=0.1,
                               **model_overrides)
    config = Config.from_dict({
        "model": model_config.to_dict(), "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 1},
        "batch": {"micro_batch": 1, "global_batch": 1},
        "tokenizer": {"type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}})
    torch.manual_seed(0)
    checkpoint = save_model_weights(GPT(model_config).state_dict(), tmp_path / "ckpt", config=config.to_dict())
    text_file = tmp_path / "heldout.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    seq_length, stride = 48, 20
    result = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--load", str(checkpoint),
                             "--text-file", str(text_file), "--seq-length", str(seq_length), "--stride", str(stride),
                             "--output", str(tmp_path / "results.json"), "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ours = json.loads((tmp_path / "results.json").read_text())["results"][0]

    export = export_hf(checkpoint, tmp_path / "hf", arch=arch)
    hf_model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=(arch == "custom")).eval()
    assert type(hf_model).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "MegaGPTForCausalLM")
    ids = AutoTokenizer.from_pretrained(export)(TEXT)["input_ids"]
    total, count = _independent_nll(hf_model, ids, seq_length, stride)
    assert ours["tokens"] == count == len(ids) - 1
    assert abs(ours["loss"] - total / count) < 1e-5, (ours["loss"], total / count)
    assert abs(ours["perplexity"] / math.exp(total / count) - 1) < 1e-5
    assert abs(ours["bits_per_byte"] - total / math.log(2) / len(TEXT.encode())) < 1e-5
