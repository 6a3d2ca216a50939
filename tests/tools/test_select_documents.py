"""tools/select_documents.py: the subset is byte-identical to preprocessing the chosen documents; bad input."""
import json
from pathlib import Path

import numpy as np

from megagpt.selection.scores import DocumentScores, dataset_record, write_scores
from testing_utils import load_script

preprocess_tool = load_script("tools/preprocess_data.py")
select_tool = load_script("tools/select_documents.py")


def _preprocess(texts, prefix):
    jsonl = Path(f"{prefix}.jsonl")
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert preprocess_tool.main(["--input", str(jsonl), "--tokenizer-type", "ByteLevelTokenizer", "--output-prefix",
                                 str(prefix), "--append-eod", "--no-progress"]) == 0
    return f"{prefix}_text_document"


def _select(capsys, *args):
    code = select_tool.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_subset_is_byte_identical_to_preprocessing_the_chosen_documents(tmp_path, capsys):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh ."), size=int(rng.integers(3, 60)))) + f" doc{i}" for i in range(30)]
    source = _preprocess(texts, tmp_path / "all")
    record = dataset_record(source)
    scores = rng.random(30)
    write_scores(tmp_path / "s.npz", DocumentScores({"perplexity": scores}, {"dataset": record}))
    code, err = _select(capsys, "--data-path", source, "--scores", tmp_path / "s.npz", "--keep", "high",
                        "--fraction", "0.4", "--output-prefix", tmp_path / "high")
    assert code == 0, err
    chosen = np.load(tmp_path / "high.doc_ids.npy")
    assert chosen.tolist() == sorted(np.argsort(-scores)[:12].tolist())
    expected = _preprocess([texts[i] for i in chosen], tmp_path / "expected")
    # the tokenizer record too (megagpt/data/tokenizer_record.py): the subset is that tokenizer's data
    for ext in (".bin", ".idx", ".tokenizer.json"):
        assert Path(f"{tmp_path / 'high'}{ext}").read_bytes() == Path(expected + ext).read_bytes()
    manifest = json.loads((tmp_path / "high.selection.json").read_text())
    assert manifest["counts"]["chosen_documents"] == 12 and manifest["source"]["fingerprint"] == record["fingerprint"]
    assert manifest["rule"] == {"kind": "high", "fraction": 0.4, "seed": 0}
    assert manifest["scores"]["column"] == "perplexity"

    code, err = _select(capsys, "--data-path", source, "--random", "--fraction", "0.5", "--output-prefix",
                        tmp_path / "high")
    assert code == 1 and "--overwrite" in err
    other = _preprocess(texts[:29], tmp_path / "other")
    code, err = _select(capsys, "--data-path", other, "--scores", tmp_path / "s.npz", "--keep", "low",
                        "--fraction", "0.5", "--output-prefix", tmp_path / "x")
    assert code == 1 and "does not belong to dataset" in err
    assert "30 documents in the scores, 29 in the dataset" in err
    code, err = _select(capsys, "--data-path", source, "--keep", "low", "--output-prefix", tmp_path / "y")
    assert code == 1 and "needs --scores" in err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob("y.*"))
