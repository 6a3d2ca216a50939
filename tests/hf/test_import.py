"""megagpt/hf/import_hf.py: a Hugging Face GPT-2 (built locally, randomly initialised) -> megagpt, by logits."""
import json
import shutil

import pytest
import torch

from megagpt.convert.weights import load_gpt
from megagpt.hf import import_hf

TOL = 1e-5


def _gpt2_dir(path, **overrides):
    """A randomly initialised GPT2LMHeadModel saved with save_pretrained; returns the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**{"vocab_size": 100, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4,
                           "n_inner": 80, "initializer_range": 0.2, **overrides})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every mapped tensor is checked
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_imports_with_the_same_logits_and_zero_padded_vocab(tmp_path, tied, capsys):
    hf = _gpt2_dir(tmp_path / "hf", tie_word_embeddings=tied)
    out = import_hf(tmp_path / "hf", tmp_path / "megagpt")
    assert "no tokenizer" in capsys.readouterr().out
    model, weights = load_gpt(out)
    config = model.config
    assert (config.position, config.parallel_residual, config.tied_embeddings, config.ffn_hidden_size,
            config.padded_vocab_size) == ("learned", False, tied, 80, 128)
    padding = [weights.weights["layers.0.word_embeddings.weight"][100:]]
    if not tied:
        padding.append(weights.weights["layers.4.proj.weight"][100:])
    assert all(torch.all(rows == 0) for rows in padding), "padded vocabulary rows must be zeros"
    tokens = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= TOL, f"max abs logits difference {diff:.3g} > {TOL}"
    assert "tokenizer" not in json.loads((out / "config.json").read_text())


def test_gpt2_tokenizer_files_come_along_and_encode_as_transformers(tmp_path, gpt2_files):
    """vocab.json + merges.txt (as GPT-2 releases ship) -> GPT2BPETokenizer; tokenizer.json alone -> HFTokenizer."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    from megagpt.config import TokenizerConfig

    _gpt2_dir(tmp_path / "hf", vocab_size=50257, n_layer=1)
    vocab = json.loads(open(gpt2_files[0], encoding="utf-8").read())
    merges = [tuple(line.split(" ")) for line in open(gpt2_files[1], encoding="utf-8").read().splitlines()[1:] if line]
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(str(tmp_path / "hf"))  # tokenizer.json only
    text = "Hello world! Ünïcödé, numbers 1234 and    spaces.\nNew line."
    expected = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"]

    only_json = import_hf(tmp_path / "hf", tmp_path / "from_json")
    section = json.loads((only_json / "config.json").read_text())["tokenizer"]
    assert section == {"type": "HFTokenizer", "tokenizer_file": str((only_json / "tokenizer.json").resolve()),
                       "eod_token": "<|endoftext|>"}
    for name in gpt2_files:
        shutil.copy(name, tmp_path / "hf")
    with_files = import_hf(tmp_path / "hf", tmp_path / "from_files", dtype="bf16")
    section = json.loads((with_files / "config.json").read_text())["tokenizer"]
    assert section["type"] == "GPT2BPETokenizer" and section["vocab_file"] == str(with_files.resolve() / "vocab.json")
    for out in (only_json, with_files):
        tokenizer = TokenizerConfig.from_dict(json.loads((out / "config.json").read_text())["tokenizer"]).build()
        assert tokenizer.encode(text).tolist() == expected and tokenizer.eod == 50256
    assert load_gpt(with_files)[0].config.padded_vocab_size == 50304


@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                                          ("activation_function", "relu"), ("add_cross_attention", True),
                                          ("scale_attn_weights", False)])
def test_refuses_gpt2_configs_megagpt_cannot_represent(tmp_path, field, value):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=4, **{field: value}).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_other_model_types_and_existing_outputs(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        import_hf(tmp_path / "llama", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        import_hf(tmp_path / "llama", tmp_path / "out")
