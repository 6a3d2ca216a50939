"""tools/evaluate.py: training save and consolidated directories, output rules, context sweeps, data parallel."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.convert.weights import read_model_weights, save_model_weights
from megagpt.data.gpt_dataset import split_document_ranges
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from testing_utils import REPO, _clean_env, load_script, run_training

evaluate_tool = load_script("tools/evaluate.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "Grüße aus Köln! the cat sat on the mat. 日本語 ✓ naïve café.\n" * 4


def save_byte_checkpoint(out_dir, position="alibi"):
    """A random byte-level GPT (vocab 257, seq_len 32) saved as a consolidated directory that records its
    tokenizer, as tools/convert_checkpoint.py writes one."""
    from megagpt.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, seq_len=32, d_model=32, num_layers=2, num_heads=2, position=position,
                         make_vocab_size_divisible_by=64, init_std=0.3)
    return save_model_weights(GPT(config).state_dict(), out_dir,
                              config={"model": config.to_dict(), "tokenizer": {"type": "ByteLevelTokenizer"}})


def write_inputs(root):
    """A text file, a LAMBADA file, a piqa file and a byte-level indexed dataset under ``root``."""
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    lines = ["the cat sat on the mat", "a bird sang in the tree", "the dog ate the bone", "hello big world"]
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    piqa = [{"goal": f"goal {i}", "sol1": "push it" * (i % 3 + 1), "sol2": "pull", "label": i % 2} for i in range(5)]
    (root / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "bytes") as writer:
        for _ in range(30):
            writer.add_document([*rng.integers(0, 256, int(rng.integers(5, 40))), 256])
    return ["--text-file", str(root / "text.txt"), "--lambada", str(root / "lambada.jsonl"),
            "--multiple-choice", str(root / "piqa.jsonl"), "--data-path", str(root / "bytes"), "--split", "50,50"]


@pytest.fixture(scope="module")
def trained(tiny_run):
    """A 5-step tiny training run's save directory (step5 is ``latest``)."""
    root, config = tiny_run
    run_training("python", ["--config", str(config), "--save", str(root / "save"), "--train-iters", "5",
                            "--save-interval", "5"], 29852)
    return root


def test_training_save_dir_and_consolidated_dir(trained, capsys):
    root = trained
    args = ["--load", str(root / "save"), "--data-path", str(root / "counting"), "--quiet", "--batch-size", "3"]
    report = evaluate_tool.evaluate(args)
    output = root / "save" / "step5" / "eval_results.json"  # beside the checkpoint: the step `latest` names
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert report["step"] == 5 and report["settings"]["split"] == "90,10,0"  # the training config's split
    assert report["model"]["d_model"] == 32 and report["tokenizer"] is None
    data = IndexedDataset(root / "counting")
    begin, end = split_document_ranges("90,10,0", data.num_documents)[1]
    (result,) = report["results"]
    assert result["task"] == "data:counting:valid"
    assert result["tokens"] == int(data.sequence_lengths[begin:end].sum()) - 1
    assert 0.0 < result["loss"] < np.log(64) and result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert "data:counting:valid" in capsys.readouterr().out  # the table

    # the same weights consolidated: the same numbers (both hold the fp32 masters)
    consolidated = save_model_weights(read_model_weights(root / "save"), root / "consolidated")
    other = evaluate_tool.evaluate(["--load", str(consolidated), *args[2:]])
    assert (consolidated / "eval_results.json").is_file() and other["step"] is None
    assert other["results"] == report["results"], (other["results"], report["results"])

    # an existing output is refused before anything runs, and left as it was
    before = output.read_text()
    assert evaluate_tool.main(args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_text() == before
    assert evaluate_tool.main([*args, "--overwrite"]) == 0


def test_tokenizer_flags_and_missing_tokenizer(trained, tmp_path, capsys):
    root = trained
    alphabet = sorted(set(TEXT))
    (tmp_path / "chars.json").write_text(json.dumps({"chars": alphabet}, ensure_ascii=False))
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    common = ["--load", str(root / "save"), "--text-file", str(tmp_path / "t.txt"), "--quiet"]
    assert evaluate_tool.main([*common, "--output", str(tmp_path / "none.json")]) == 1
    assert "no tokenizer recorded" in capsys.readouterr().err
    report = evaluate_tool.evaluate([*common, "--tokenizer-type", "CharLevelTokenizer", "--vocab-file",
                                     str(tmp_path / "chars.json"), "--output", str(tmp_path / "r.json")])
    (result,) = report["results"]
    assert (result["tokens"], result["chars"], result["bytes"]) == (len(TEXT) - 1, len(TEXT), len(TEXT.encode()))
    assert result["bits_per_char"] == pytest.approx(result["loss"] * (len(TEXT) - 1) / np.log(2) / len(TEXT))


def test_context_sweep_writes_json_and_png(tmp_path):
    checkpoint = save_byte_checkpoint(tmp_path / "alibi")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    report = evaluate_tool.evaluate(["--load", str(checkpoint), "--text-file", str(tmp_path / "text.txt"),
                                     "--seq-lengths", "16,32,64", "--quiet", "--output", str(tmp_path / "r.json")])
    assert [r["seq_length"] for r in report["results"]] == [16, 32, 64]  # 64: past the model's seq_len (ALiBi)
    assert [r["stride"] for r in report["results"]] == [16, 32, 64]
    assert all(r["tokens"] == len(TEXT.encode()) - 1 for r in report["results"])
    assert len({r["loss"] for r in report["results"]}) == 3  # more context, other numbers
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["seq_lengths"] == [16, 32, 64]
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000

    learned = save_byte_checkpoint(tmp_path / "learned", position="learned")
    with pytest.raises(ValueError, match="64 is longer than the model's seq_len=32, which learned position"):
        evaluate_tool.evaluate(["--load", str(learned), "--text-file", str(tmp_path / "text.txt"),
                                "--seq-lengths", "16,64", "--quiet"])
    assert not (learned / "eval_results.json").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    checkpoint = save_byte_checkpoint(tmp_path / "ckpt")
    good = json.dumps({"context": "a b", "choices": ["c", "d"], "label": 0})
    (tmp_path / "mc.jsonl").write_text(f"{good}\n{good}\n{{'single': 'quotes'}}\n")
    assert evaluate_tool.main(["--load", str(checkpoint), "--multiple-choice", str(tmp_path / "mc.jsonl"),
                               "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mc.jsonl'}:3: not valid JSON" in err, err
    assert not (checkpoint / "eval_results.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    checkpoint = save_byte_checkpoint(tmp_path / "ckpt")
    tasks = write_inputs(tmp_path)
    common = ["--load", str(checkpoint), *tasks, "--stride", "12", "--seq-length", "24", "--batch-size", "3",
              "--quiet"]
    one = evaluate_tool.evaluate([*common, "--output", str(tmp_path / "one.json")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29851",
               str(REPO / "tools" / "evaluate.py"), *common, "--output", str(tmp_path / "two.json")]
    run = subprocess.run(command, env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert [r["task"] for r in two["results"]] == [r["task"] for r in one["results"]]
    worst = {}  # (task, metric) -> |difference|; perplexities relative (LAMBADA's is exp of a summed NLL)
    for a, b in zip(one["results"], two["results"]):
        for key, value in a.items():
            if isinstance(value, float):
                scale = value if key == "perplexity" else 1.0
                worst[a["task"], key] = abs(value - b[key]) / scale
            else:
                assert value == b[key], (a["task"], key)
    (task, key), diff = max(worst.items(), key=lambda item: item[1])
    print(f"largest difference, 2 ranks vs 1 process: {diff:.3g} ({task} {key})")
    assert diff <= 1e-6, f"2 ranks differ from 1 process by up to {diff:.3g} ({task} {key})"
