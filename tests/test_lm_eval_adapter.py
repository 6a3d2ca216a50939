"""The lm-evaluation-harness adapter (megagpt/lm_eval_adapter.py) and its command (tools/lm_eval.py).

A tiny GPT with the real GPT-2 vocabulary (d_model 32, 2 layers, seq_len 64) is scored on the three tiny local
tasks of tests/data/lm_eval_tasks (multiple choice, rolling perplexity, generation) offline:
* the adapter's loglikelihood / loglikelihood_rolling / generate_until against a direct forward + log_softmax
  and megagpt.generate;
* tools/lm_eval.py end to end in a subprocess;
* lm-eval's own ``hf`` model on the Hugging Face export of the same checkpoints (built-in GPT-2 for a learned
  position sequential model, custom code for ALiBi) gives the same metrics and per-document scores.
The weights are drawn with init_std 0.3 so that predictions are peaked: argmax / accuracy do not hinge on ties.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from testing_utils import REPO

TASKS_DIR = REPO / "tests" / "data" / "lm_eval_tasks"
TASKS = ["megagpt_tiny_mc", "megagpt_tiny_ppl", "megagpt_tiny_gen"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOLERANCE = 1e-4


def _save_tiny_gpt(out: Path, position: str, gpt2_files) -> Path:
    from megagpt.config import ModelConfig
    from megagpt.convert.weights import save_model_weights
    from megagpt.model import GPT

    config = ModelConfig(vocab_size=50257, seq_len=64, d_model=32, num_layers=2, num_heads=2, position=position,
                         parallel_residual=position == "alibi", init_std=0.3, make_vocab_size_divisible_by=64)
    torch.manual_seed(0)
    tokenizer = {"type": "GPT2BPETokenizer", "vocab_file": gpt2_files[0], "merge_file": gpt2_files[1]}
    return save_model_weights(GPT(config).state_dict(), out, config={"model": config.to_dict(),
                                                                     "tokenizer": tokenizer})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_files):
    """Checkpoints of an ALiBi parallel-residual and a learned-position sequential (GPT-2) model, and a copy of
    the task directory with absolute data_files (datasets resolves relative ones against the working dir)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = root / "tasks"
    shutil.copytree(TASKS_DIR, tasks)
    for yaml_file in tasks.glob("*.yaml"):
        text = yaml_file.read_text()
        for data in tasks.glob("*.jsonl"):
            text = text.replace(f"test: {data.name}", f"test: {data}")
        yaml_file.write_text(text)
    return {"root": root, "tasks": tasks, "alibi": _save_tiny_gpt(root / "alibi", "alibi", gpt2_files),
            "learned": _save_tiny_gpt(root / "learned", "learned", gpt2_files)}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access, and a private datasets cache (datasets reads both at import: patch its config too)."""
    import datasets

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def _instances(request_type, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def _score(model, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
    """log P(targets) where targets are predicted at the last len(targets) positions of inputs (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([inputs]))[0, len(inputs) - len(targets):].double()
    logprobs = F.log_softmax(logits, dim=-1)
    targets = torch.tensor(targets)
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logits.argmax(-1) == targets).all())


def _rolling(model, tokens: list[int], eod: int, window: int) -> float:
    """Whole-document log-likelihood scored in consecutive blocks of ``window`` tokens, each block predicted from
    the ``window`` inputs ending just before its last token (EOD in front of the document): what lm-eval's
    rolling windows with context_len=1 compute."""
    inputs, total = [eod] + tokens, 0.0
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        total += _score(model, inputs[max(0, end - window):end], tokens[start:end])[0]
    return total


def test_adapter_matches_direct_forward(setup):
    """loglikelihood (with left truncation and an empty context), loglikelihood_rolling (several windows) and
    generate_until (batched, KV-cached, context truncated) against the model called directly."""
    from megagpt.generate import generate
    from megagpt.lm_eval_adapter import MegaGPTLM

    max_length = 16
    lm = MegaGPTLM(load=str(setup["alibi"]), device="cpu", batch_size=3, max_length=max_length)
    model, tok = lm.model, lm.tokenizer_object
    encode = lambda text: tok.encode(text).tolist()  # noqa: E731
    long_context = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    pairs = [("Question: Is water wet?\nAnswer:", " yes"), ("Question: Is water wet?\nAnswer:", " no"),
             ("The quick brown fox", " jumps over the lazy dog"), (long_context, " You are all resolved"),
             ("", "Hello world")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    diffs = []
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            context_ids = encode(context)
            continuation_ids = encode(context + continuation)[len(context_ids):]
        else:
            context_ids, continuation_ids = [tok.eod], encode(continuation)
        sequence = (context_ids + continuation_ids)[-(max_length + 1):]  # the long context is cut on the left
        want, want_greedy = _score(model, sequence[:-1], continuation_ids)
        diffs.append(abs(logprob - want))
        assert greedy == want_greedy, (context, continuation)
    assert len(encode(long_context)) > max_length
    assert max(diffs) < TOLERANCE, f"loglikelihood max abs diff {max(diffs):.2e}"

    docs = ["Short.", "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
                      "the slings and arrows of outrageous fortune, or to take arms."]
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    want = [_rolling(model, encode(d), tok.eod, max_length) for d in docs]
    assert len(encode(docs[1])) > 2 * max_length  # three windows
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff < TOLERANCE, f"loglikelihood_rolling {got} vs direct {want}: max abs diff {diff:.2e}"

    # Two contexts of one token length share a batch; 10 new tokens leave 6 context tokens within max_length.
    # The stop string is cut from the first greedy continuation itself, so that the cut is exercised.
    contexts = ["The capital of France is", "The opposite of hot is", "Roses are red, violets are"]
    assert len(encode(contexts[0])) == len(encode(contexts[1]))
    plain = [tok.decode(generate(model, encode(c)[-6:], 10, temperature=0.0, eod=tok.eod)[0]) for c in contexts]
    stop = tok.decode(encode(plain[0])[3:5])
    gen_kwargs = {"until": ["\n", stop], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until(_instances("generate_until", [(c, gen_kwargs) for c in contexts]), disable_tqdm=True)
    want = [text.split("\n")[0].split(stop)[0] for text in plain]
    assert got == want, f"generate_until {got} vs megagpt.generate {want} (stop {stop!r})"
    assert len(got[0]) < len(plain[0])
    # sampling: the same draws as megagpt.generate with the same seed (one request: one generator stream)
    lm.seed = 7
    sampled = lm.generate_until(_instances("generate_until", [(contexts[2], {"do_sample": True, "temperature": 1.0,
                                                                             "max_gen_toks": 10})]), True)
    want = tok.decode(generate(model, encode(contexts[2])[-6:], 10, temperature=1.0, seed=7, eod=tok.eod)[0])
    assert sampled == [want] and want != plain[2], (sampled, want, plain[2])

    # ALiBi runs past its training length (seq_len 64): one 96-token window
    longer = MegaGPTLM(load=str(setup["alibi"]), device="cpu", max_length=96)
    doc = " ".join(docs * 2)
    got = longer.loglikelihood_rolling(_instances("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)[0]
    want = _rolling(model, encode(doc), tok.eod, 96)
    assert 64 < len(encode(doc)) <= 96 and abs(got - want) < TOLERANCE, (len(encode(doc)), got, want)


def test_adapter_rejects_bad_model_args(setup):
    from megagpt.lm_eval_adapter import MegaGPTLM

    with pytest.raises(ValueError, match="unknown"):
        MegaGPTLM(load=str(setup["alibi"]), device="cpu", pretrained="gpt2")
    with pytest.raises(ValueError, match="learned positions"):
        MegaGPTLM(load=str(setup["learned"]), device="cpu", max_length=65)
    with pytest.raises(ValueError, match="batch_size=auto"):
        MegaGPTLM(load=str(setup["alibi"]), device="cpu", batch_size="auto")


def _results_json(out_dir: Path) -> dict:
    found = sorted(out_dir.rglob("results_*.json"))
    assert len(found) == 1, f"expected one results JSON under {out_dir}, found {found}"
    return json.loads(found[0].read_text())


def test_cli_end_to_end(setup, tmp_path, gpt2_files):
    """tools/lm_eval.py with every task type; bits_per_byte checked against the model called directly."""
    out = tmp_path / "out"
    env = dict(os.environ, **OFFLINE, HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    command = [sys.executable, str(REPO / "tools" / "lm_eval.py"), "--model", "megagpt", "--model_args",
               f"load={setup['alibi']}", "--device", "cpu", "--batch_size", "4", "--include_path",
               str(setup["tasks"]), "--tasks", ",".join(TASKS), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = _results_json(out)["results"]
    assert set(TASKS) <= set(results), sorted(results)
    assert 0.0 <= results["megagpt_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["megagpt_tiny_gen"]["exact_match,none"] <= 1.0
    assert len(list(out.rglob("samples_megagpt_tiny_gen_*.jsonl"))) == 1

    from megagpt.convert.weights import load_gpt
    from megagpt.data.tokenizers import GPT2BPETokenizer

    model, _ = load_gpt(setup["alibi"])
    tok = GPT2BPETokenizer(*gpt2_files)
    docs = [json.loads(line)["text"] for line in (TASKS_DIR / "ppl.jsonl").read_text().splitlines()]
    logprob = sum(_rolling(model, tok.encode(d).tolist(), tok.eod, 64) for d in docs)
    want = -logprob / sum(len(d.encode("utf-8")) for d in docs) / math.log(2)
    got = results["megagpt_tiny_ppl"]["bits_per_byte,none"]
    assert abs(got - want) < TOLERANCE, f"bits_per_byte {got} vs direct {want}: diff {abs(got - want):.2e}"


@pytest.fixture(scope="module")
def task_manager(setup):
    """Our three tasks only: indexing lm-eval's thousands of built-in task YAMLs takes ~6 s per TaskManager."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(setup["tasks"]), include_defaults=False)


def _evaluate(model: str, model_args: dict, task_manager) -> dict:
    import megagpt.lm_eval_adapter  # noqa: F401  registers "megagpt"
    from lm_eval import simple_evaluate

    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=4, device="cpu",
                           task_manager=task_manager, bootstrap_iters=0, log_samples=True)


def _compare(ours: dict, theirs: dict) -> list[str]:
    """Differences beyond TOLERANCE between two simple_evaluate results: every metric (perplexities in log
    space) and every document's scores / generated text."""
    problems, worst = [], 0.0
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if "," not in metric or "stderr" in metric or not isinstance(value, float):
                continue
            other = theirs["results"][task][metric]
            diff = abs(math.log(value) - math.log(other)) if "perplexity" in metric else abs(value - other)
            worst = max(worst, diff)
            if diff > TOLERANCE:
                problems.append(f"{task} {metric}: megagpt {value} vs hf {other}")
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for x, y in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                if isinstance(x, str) or isinstance(y, str):
                    if x != y:
                        problems.append(f"{task} doc {a['doc_id']}: generated {x!r} vs hf {y!r}")
                else:
                    worst = max(worst, abs(x - y))
                    if abs(x - y) > TOLERANCE:
                        problems.append(f"{task} doc {a['doc_id']}: log-likelihood {x} vs hf {y}")
    print(f"max abs diff megagpt vs hf: {worst:.2e}")
    return problems


@pytest.mark.parametrize("kind", ["learned", "alibi"])
def test_same_metrics_as_hf_export(setup, task_manager, offline, kind):
    """lm-eval's hf model on the export (GPT-2 built in for the learned model, custom code for ALiBi) and the
    megagpt model agree on every metric and every document within 1e-4."""
    from megagpt.hf.export import export_hf

    exported = setup["root"] / f"hf_{kind}"
    if not exported.exists():
        export_hf(setup[kind], exported)
    # the export's tokenizer adds no BOS and its BOS is <|endoftext|>, as megagpt scores: no extra knob needed
    hf_args = {"pretrained": str(exported), "dtype": "float32", "trust_remote_code": kind == "alibi"}
    theirs = _evaluate("hf", hf_args, task_manager)
    ours = _evaluate("megagpt", {"load": str(setup[kind])}, task_manager)
    problems = _compare(ours, theirs)
    assert not problems, "\n".join(problems)
