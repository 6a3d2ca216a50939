"""tools/convert_checkpoint.py --to hf (from a tiny training checkpoint) and --from-hf (then checkpoint.init_from)."""
import json
import subprocess
import sys

import pytest
import torch

from megagpt.convert.weights import load_gpt
from testing_utils import REPO, load_script, run_training

CONVERT = str(REPO / "tools" / "convert_checkpoint.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    """A 2-step training --save directory of the tiny config (ALiBi, parallel residual, vocab 64) and an alphabet
    of 63 characters for a CharLevelTokenizer of 64 ids."""
    root, config = tiny_run
    run_training("python", ["--config", str(config), "--train-iters", "2", "--save", str(root / "ck")], 29987)
    alphabet = root / "alphabet.json"
    alphabet.write_text(json.dumps({"chars": [chr(c) for c in range(32, 95)]}))
    return root / "ck", alphabet


def test_to_hf_from_a_training_checkpoint_and_its_refusals(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megagpt.data.tokenizers import CharLevelTokenizer

    ck, alphabet = checkpoint
    out = tmp_path / "hf"
    tokenizer_flags = ["--tokenizer-type", "CharLevelTokenizer", "--vocab-file", str(alphabet)]
    result = subprocess.run([sys.executable, CONVERT, "--load", str(ck), "--to", "hf", "--output", str(out),
                             "--quiet", *tokenizer_flags], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "verified custom export: max |logits difference|" in result.stdout
    assert "verified tokenizer" in result.stdout

    model = load_gpt(ck)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= TOL, f"max abs logits difference {diff:.3g} > {TOL}"
    text = "HELLO, WORLD! 0123 = [X]"
    ids = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)(text)["input_ids"]
    assert ids == CharLevelTokenizer(str(alphabet)).encode(text).tolist()

    convert = load_script("tools/convert_checkpoint.py")
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    for argv, message in [
        (["--load", str(ck), "--to", "hf", "--output", str(out)], "exists; pass --overwrite"),
        (["--load", str(ck), "--to", "hf", "--hf-arch", "gpt2", "--output", str(tmp_path / "gpt2")],
         "GPT2LMHeadModel cannot represent this model: model.position='alibi'"),
        (["--load", str(ck), "--to", "hf", "--tokenizer-type", "ByteLevelTokenizer", "--output",
          str(tmp_path / "bytes")], "has 257 tokens but the model's vocab_size is 64"),
        (["--load", str(ck), "--to", "consolidated", "--hf-arch", "custom", "--output", str(tmp_path / "c")],
         "--hf-arch only apply to --to hf"),
    ]:
        assert convert.main([*argv, "--quiet"]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert convert.main(["--load", str(ck), "--to", "hf", "--output", str(out), "--overwrite", "--quiet",
                         "--hf-arch", "custom", "--no-verify", *tokenizer_flags]) == 0


def test_from_hf_then_continue_pretraining_with_init_from(tiny_run, tmp_path, capsys):
    """A GPT-2 of the tiny run's shape, imported with the run's vocabulary padding, starts a new run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root, config = tiny_run
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        str(tmp_path / "gpt2"))
    convert = load_script("tools/convert_checkpoint.py")
    out = tmp_path / "megagpt"
    assert convert.main(["--from-hf", str(tmp_path / "gpt2"), "--output", str(out),
                         "--make-vocab-size-divisible-by", "64"]) == 0
    assert f"into {out}" in capsys.readouterr().out
    assert convert.main(["--from-hf", str(tmp_path / "gpt2"), "--to", "hf", "--output", str(tmp_path / "x")]) == 1
    assert "error: --from-hf goes with --to megagpt" in capsys.readouterr().err

    result = run_training("python", ["--config", str(config), "--train-iters", "2", "--save", str(tmp_path / "run"),
                                     "--set", 'model.position="learned"', "--set", "model.parallel_residual=false",
                                     "--set", f'checkpoint.init_from="{out}"'], 29988)
    assert f"initialised the weights from consolidated checkpoint {out}" in result.stdout
