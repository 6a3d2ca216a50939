"""megagpt/hf/tokenizer.py: every megagpt tokenizer saved as a Hugging Face tokenizer gives the same ids."""
import json
from pathlib import Path

import pytest

from megagpt.data.tokenizers import ByteLevelTokenizer, GPT2BPETokenizer, HFTokenizer, build_char_vocab
from megagpt.hf.tokenizer import SAMPLE_TEXT, check_hf_tokenizer, save_hf_tokenizer


@pytest.fixture(scope="module")
def shakespeare(gpt2_files):
    """tinyshakespeare.txt from ../shared/data (beside the gpt2/ files the shared fixture found)."""
    return (Path(gpt2_files[0]).parent.parent / "tinyshakespeare.txt").read_text(encoding="utf-8")


def test_char_level_on_the_whole_shakespeare_file(tmp_path, shakespeare):
    from transformers import AutoTokenizer

    tok = build_char_vocab([shakespeare], str(tmp_path / "chars.json"))
    save_hf_tokenizer(tok, tmp_path / "hf")
    assert check_hf_tokenizer(tmp_path / "hf", tok, shakespeare) == len(shakespeare)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.decode(tok.encode(shakespeare[:500]).tolist()) == shakespeare[:500]
    assert hf.eos_token_id == tok.eod == len(tok.chars)


def test_byte_level_on_shakespeare_and_unicode(tmp_path, shakespeare):
    tok = ByteLevelTokenizer()
    save_hf_tokenizer(tok, tmp_path / "hf")
    text = shakespeare[:200_000] + SAMPLE_TEXT
    assert check_hf_tokenizer(tmp_path / "hf", tok, text) == len(text.encode("utf-8"))


def test_gpt2_bpe_including_special_token_strings_as_text(tmp_path, shakespeare, gpt2_files):
    tok = GPT2BPETokenizer(*gpt2_files)
    save_hf_tokenizer(tok, tmp_path / "hf", model_max_length=1024)
    # SAMPLE_TEXT holds "<|endoftext|>": megagpt encodes it as text, and so must the export
    check_hf_tokenizer(tmp_path / "hf", tok, shakespeare[:100_000] + SAMPLE_TEXT)
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == open(gpt2_files[0], "rb").read()
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_hf_tokenizer_json_drops_a_post_processor_megagpt_never_applied(tmp_path, gpt2_files, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.BPE.from_file(*gpt2_files))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 50256)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(str(tmp_path / "tokenizer.json"))
    save_hf_tokenizer(tok, tmp_path / "hf")
    assert "post-processor adds special tokens" in capsys.readouterr().out
    check_hf_tokenizer(tmp_path / "hf", tok)
