"""megagpt/convert/weights.py: the weights of any checkpoint, weights-only consolidated checkpoints, and
``checkpoint.init_from`` (a new run starting from them, in any tensor/pipeline-parallel layout)."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from megagpt.config import Config
from megagpt.convert import consolidate, is_universal_dir, load_into_engine, load_universal
from megagpt.convert.weights import (build_gpt, init_from_weights, load_gpt, read_model_weights,
                                     save_model_weights)
from megagpt.model import GPT
from testing_utils import REPO, losses, read_jsonl, run_training

CONVERT = str(REPO / "tools" / "convert_checkpoint.py")
MODEL = {"vocab_size": 64, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
         "make_vocab_size_divisible_by": 64}


def _config(**model) -> Config:
    return Config.from_dict({"model": {**MODEL, **model}, "data": {"data_path": ["unused"]},
                             "schedule": {"train_iters": 1}, "batch": {"micro_batch": 1, "global_batch": 1}})


def test_weights_only_checkpoints_round_trip_and_refuse_to_resume(tmp_path):
    torch.manual_seed(0)
    config = _config()
    model = GPT(config.model)
    out = save_model_weights({n: t for n, t in model.state_dict().items()}, tmp_path / "w", config=config.to_dict())
    assert is_universal_dir(out) and not (out / "optimizer.safetensors").exists()
    loaded, weights = load_gpt(out)
    tokens = torch.randint(0, 64, (2, 32))
    assert torch.equal(loaded(tokens), model.eval()(tokens))
    assert weights.model_config == config.model
    with pytest.raises(ValueError, match="holds weights only"):
        load_into_engine(None, load_universal(out))  # refused before the engine is touched
    with pytest.raises(FileExistsError):
        save_model_weights(weights, out)


def test_a_longer_seq_len_fits_an_alibi_model_but_other_shapes_are_refused(tmp_path):
    config = _config()
    out = save_model_weights(GPT(config.model).state_dict(), tmp_path / "w", config=config.to_dict())
    weights = read_model_weights(out)
    longer = build_gpt(weights, model_config=dataclasses.replace(config.model, seq_len=128))
    assert longer(torch.randint(0, 64, (1, 100))).shape == (1, 100, 64)
    with pytest.raises(ValueError, match=r"does not fit the model config.*layers.1.mlp.fc.weight"):
        build_gpt(weights, model_config=dataclasses.replace(config.model, mlp_ratio=2.0))
    with pytest.raises(ValueError, match="give its model config"):
        read_model_weights(out / "model.safetensors")


def test_init_from_loads_every_parameter_and_names_a_mismatch(tmp_path):
    config = _config()
    torch.manual_seed(1)
    source = GPT(config.model)
    out = save_model_weights(source.state_dict(), tmp_path / "w", config=config.to_dict())
    target = GPT(config.model, init_seed=5)
    note = init_from_weights(target, config, out, tp_rank=0, tp_size=1, pipeline=False)
    assert "initialised the weights from consolidated checkpoint" in note
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    wider = _config(d_model=64)
    with pytest.raises(ValueError, match=r"init_from=.*does not match model section: \['layers.0.word_embeddings"):
        init_from_weights(GPT(wider.model), wider, out, 0, 1, pipeline=False)


@pytest.mark.slow
def test_a_new_run_starts_from_a_checkpoint_in_any_layout(tiny_run):
    """A 6-step run, consolidated weights-only, starts new runs on one rank, TP=2 and PP=2: their loss curves
    agree (1e-4, the TP/PP equivalence tolerance) and start at the trained level, below a fresh run's start; a
    re-run of the same command resumes its own checkpoint instead of re-initialising."""
    root, config = tiny_run
    common = ["--config", str(config), "--train-iters", "6"]
    run_training("python", [*common, "--save", str(root / "init_src")], 29801)
    weights_dir = root / "init_weights"
    result = subprocess.run([sys.executable, CONVERT, "--load", str(root / "init_src"), "--to", "consolidated",
                             "--weights-only", "--output", str(weights_dir)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (weights_dir / "optimizer.safetensors").exists()
    trained = consolidate(root / "init_src")
    assert all(torch.equal(read_model_weights(weights_dir).weights[n], w) for n, w in trained.weights.items())

    new = [*common, "--set", f"checkpoint.init_from={str(weights_dir)!r}".replace("'", '"'),
           "--set", "parallel.zero_stage=1"]
    runs = {}
    for name, extra, launcher, port in [("one", [], "python", 29802), ("tp2", ["--set", "parallel.tp=2"],
                                        "deepspeed", 29803), ("pp2", ["--set", "parallel.pp=2"], "deepspeed", 29804)]:
        out = run_training(launcher, [*new, *extra, "--save", str(root / f"init_{name}")], port)
        assert "initialised the weights from consolidated checkpoint" in out.stdout
        runs[name] = losses(read_jsonl(root / f"init_{name}" / "metrics.jsonl"))
    np.testing.assert_allclose(runs["tp2"], runs["one"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(runs["pp2"], runs["one"], rtol=0, atol=1e-4)
    fresh = losses(read_jsonl(root / "init_src" / "metrics.jsonl"))
    # it starts where the source run ended (another batch, so not equal), well below the source's first loss
    assert abs(runs["one"][0] - fresh[-1]) < 0.1 and runs["one"][0] < fresh[0] - 0.3, (runs["one"][0], fresh)

    again = run_training("python", [*new, "--train-iters", "8", "--save", str(root / "init_one")], 29805)
    assert "initialised the weights" not in again.stdout and "resum" in again.stdout


def test_init_from_an_imported_hugging_face_gpt2_computes_its_function(tmp_path):
    """Continual pretraining of GPT-2: HF GPT-2 -> import_hf -> init_from into a freshly built GPT of the matching
    model section -> the same logits as transformers' GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from megagpt.hf import import_hf

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    imported = import_hf(tmp_path / "gpt2", tmp_path / "init")
    config = Config.from_dict({**_config().to_dict(), "model": read_model_weights(imported).config["model"]})
    model = GPT(config.model, init_seed=3)
    init_from_weights(model, config, imported, tp_rank=0, tp_size=1, pipeline=False)
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        diff = (model.eval()(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff
