"""tools/influence.py: TracInCP over a run's checkpoints equals the exact reference (projection off), the score file
feeds select_documents, an interrupted run resumes to the same file, 2 ranks = 1, and bad input is refused."""
import json
import subprocess
import sys

import numpy as np
import pytest

from influence_testing import (counting_documents, run_config, save_checkpoint, train_test_model,
                               write_dataset)
from megagpt.optim import LRSchedule
from megagpt.selection.scores import check_alignment, read_scores
from testing_utils import REPO, _clean_env, load_script

tool = load_script("tools/influence.py")
select_tool = load_script("tools/select_documents.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training dataset, a validation dataset and two checkpoints (steps 30, 60) of one run."""
    root = tmp_path_factory.mktemp("influence")
    train = write_dataset(root / "train", counting_documents(12, 2) + [np.array([3])])
    valid = write_dataset(root / "valid", [(7 + np.arange(40)) % 60])
    checkpoints = {}
    for steps in (30, 60):
        model, optimizer = train_test_model(steps)
        checkpoints[steps] = save_checkpoint(model, optimizer, root / "run" / f"step{steps}", run_config(train), steps)
    return root, train, valid, checkpoints


def _args(run, out, *extra):
    root, train, valid, checkpoints = run
    return ["--checkpoints", checkpoints[30], checkpoints[60], "--data-path", train, "--valid-data-path", valid,
            "--valid-split", "0,1,0", "--output", str(out), "--chunk-documents", "5", "--batch-size", "4", "--quiet",
            *extra]


def test_tracincp_equals_the_reference_and_feeds_select_documents(run, tmp_path, capsys):
    from megagpt.convert.weights import load_gpt
    from megagpt.selection.adam import adam_factors
    from megagpt.selection.checkpoints import list_checkpoints, load_checkpoint
    from megagpt.selection.influence_reference import ReferenceCheckpoint, reference_influence
    from megagpt.selection.perplexity import document_tokens
    from megagpt.selection.projection import gradient_blocks
    from megagpt.selection.scores import open_dataset

    root, train, valid, checkpoints = run
    out = tmp_path / "inf.npz"
    assert tool.main(_args(run, out, "--projection-dim", "0", "--adam", "--cosine")) == 0, capsys.readouterr().err
    scores = read_scores(out)
    check_alignment(scores, train)
    assert scores.meta["kind"] == "influence" and scores.meta["default_column"] == "influence"
    # learning rates: the run's schedule (warmup 5, cosine to min_lr over 60 steps) after 30 and 60 steps
    schedule = LRSchedule(peak_lr=3e-3, min_lr=3e-4, warmup=5, total=60)
    assert [c["lr"] for c in scores.meta["checkpoints"]] == [schedule.lr_at(30), schedule.lr_at(60)]
    references = []
    for ref in list_checkpoints([checkpoints[30], checkpoints[60]]):
        loaded = load_checkpoint(ref, with_moments=True)
        model, _ = load_gpt(ref.path)
        factors = adam_factors(gradient_blocks(model), loaded.moments, loaded.optimizer_step, 0.99, 1e-8)
        references.append(ReferenceCheckpoint(model, loaded.lr, factors))
    dataset = open_dataset(train)
    documents = [document_tokens(dataset, d) for d in range(dataset.num_documents)]
    exact = reference_influence(references, documents, (7 + np.arange(40)) % 60, 16, cosine=True)
    got = scores.column()
    assert np.isnan(got[-1]) and np.isnan(exact[-1]) and scores.meta["summary"]["unscored_documents"] == 1
    assert np.linalg.norm(got[:-1] - exact[:-1]) / np.linalg.norm(exact[:-1]) < 1e-5
    np.testing.assert_allclose(got, sum(c["lr"] * scores.columns[f"influence_step{c['step']}"]
                                        for c in scores.meta["checkpoints"]))
    # select_documents takes the file unchanged: the top half by influence
    prefix = tmp_path / "top"
    assert select_tool.main(["--data-path", train, "--scores", str(out), "--keep", "high", "--fraction", "0.5",
                             "--output-prefix", str(prefix)]) == 0, capsys.readouterr().err
    chosen = np.load(f"{prefix}.doc_ids.npy")
    assert set(chosen) == set(np.argsort(-np.nan_to_num(got, nan=-np.inf))[:len(chosen)])
    assert (tmp_path / "inf.summary.json").exists() and (tmp_path / "inf.hist.png").exists()


def test_an_interrupted_run_resumes_to_the_same_file(run, tmp_path, monkeypatch, capsys):
    from megagpt.selection import influence_run

    full = tmp_path / "full.npz"
    assert tool.main(_args(run, full)) == 0, capsys.readouterr().err
    calls = {"n": 0}
    original = influence_run.document_scores

    def fail_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's first chunk
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(influence_run, "document_scores", fail_on_fourth)
    resumed = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        tool.influence(_args(run, resumed))
    parts = tmp_path / "resumed.npz.parts"
    assert not resumed.exists() and len(list(parts.glob("ckpt0_chunk_*.npz"))) == 3
    monkeypatch.setattr(influence_run, "document_scores", original)
    assert tool.main(_args(run, resumed)) == 0
    a, b = read_scores(full), read_scores(resumed)
    for name in a.columns:
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    assert not parts.exists()
    assert tool.main(_args(run, resumed, "--cosine")) == 1 and "--overwrite" in capsys.readouterr().err


def test_checkpoints_of_other_shapes_or_runs_are_refused(run, tmp_path, capsys):
    root, train, valid, checkpoints = run
    model, optimizer = train_test_model(2, d_model=16)
    wider = save_checkpoint(model, optimizer, tmp_path / "narrow", run_config(train, d_model=16), 2)
    args = _args(run, tmp_path / "x.npz")
    assert tool.main([*args, "--checkpoints", checkpoints[30], wider]) == 1
    err = capsys.readouterr().err
    assert "checkpoints of different shapes" in err and "narrow" in err and "step30" in err
    other_seed = run_config(train) | {"seed": 7}
    model, optimizer = train_test_model(2)
    other = save_checkpoint(model, optimizer, tmp_path / "other", other_seed, 2)
    assert tool.main([*args, "--checkpoints", checkpoints[30], other]) == 1
    err = capsys.readouterr().err
    assert "checkpoints from different runs" in err and "['seed']" in err and "other" in err
    assert tool.main([*args, "--projection-dim", "64"]) == 1
    assert "larger than the layer it projects" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_a_validation_set_of_another_tokenizer_is_refused(run, tmp_path, capsys):
    root, train, valid, checkpoints = run
    data = tmp_path / "data"
    data.mkdir()
    for name, tokenizer in (("a", {"type": "CharLevelTokenizer", "vocab_size": 60, "eod": 59}),
                            ("b", {"type": "ByteLevelTokenizer", "vocab_size": 257, "eod": 256})):
        prefix = write_dataset(data / f"{name}_text_document", counting_documents(6, 1))
        (data / f"{name}_report.json").write_text(json.dumps({"tokenizer": tokenizer, "outputs": {
            "text": {"prefix": prefix}}}))
    args = _args(run, tmp_path / "x.npz")
    code = tool.main([*args, "--data-path", str(data / "a_text_document"), "--valid-data-path",
                      str(data / "b_text_document")])
    err = capsys.readouterr().err
    assert code == 1 and "shares no tokenizer with the training set" in err and "ByteLevelTokenizer" in err
    assert tool.main([*args, "--valid-data-path", str(data / "b_text_document"), "--data-path",
                      str(data / "b_text_document")]) == 0  # the same tokenizer on both sides is fine


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_file_as_one(run, tmp_path):
    script = str(REPO / "tools" / "influence.py")
    root, train, valid, checkpoints = run
    common = ["--checkpoints", str(root / "run"), "--steps", "30,60", "--data-path", train, "--valid-data-path", valid,
              "--valid-split", "0,1,0", "--chunk-documents", "3", "--batch-size", "4", "--quiet", "--device", "cpu"]
    one = subprocess.run([sys.executable, script, *common, "--output", str(tmp_path / "one.npz")], env=_clean_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29871", script, *common, "--output", str(tmp_path / "two.npz")], env=_clean_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = read_scores(tmp_path / "one.npz"), read_scores(tmp_path / "two.npz")
    assert b.meta["summary"]["ranks"] == 2
    for name in a.columns:  # the validation all-reduce adds in another order: last bits only
        np.testing.assert_allclose(a.columns[name], b.columns[name], rtol=1e-9, atol=0)
