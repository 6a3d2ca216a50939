"""megagpt/evaluation/tasks.py: LAMBADA and the four multiple-choice layouts against independent scores."""
import json
import math

import numpy as np
import pytest

from megagpt.data.tokenizers import ByteLevelTokenizer
from megagpt.evaluation import evaluate_lambada, evaluate_multiple_choice, read_multiple_choice

TOK = ByteLevelTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))  # the byte-level tokenizer, spelled out


def test_lambada_accuracy_perplexity_and_loss(trained_byte_model, naive_logprob, tmp_path):
    texts = ["the cat sat on the mat", "the dog ate the bone", "a bird sang in the tree", "the cat ate the zebra"]
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    result = evaluate_lambada(trained_byte_model, TOK, path, seq_length=32, batch_size=3)
    expected = []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        expected.append((*naive_logprob(trained_byte_model, ids(context), ids(" " + word)), len(" " + word)))
    logprobs = np.array([e[0] for e in expected])
    greedy = [e[1] for e in expected]
    assert 0 < sum(greedy) < len(texts), f"want both right and wrong examples, got greedy hits {greedy}"
    assert result["examples"] == 4 and result["task"] == "lambada:lambada.jsonl"
    assert result["accuracy"] == sum(greedy) / 4
    assert abs(result["perplexity"] - math.exp(-logprobs.mean())) < 1e-6 * result["perplexity"]
    assert abs(result["loss"] - (-logprobs.sum() / sum(e[2] for e in expected))) < 1e-5


def mc_files(tmp_path):
    """(path, format, [(contexts, continuations, label)]) for each layout, with the strings lm-eval builds."""
    piqa = [{"goal": "the cat sat", "sol1": "on the mat.", "sol2": "qz vv kk.", "label": 0},
            {"goal": "the dog", "sol1": "xj", "sol2": "ate the bone.", "label": 1}]
    hella = [{"activity_label": "Pets", "ctx_a": "the cat sat", "ctx_b": "on the", "endings": ["mat.", "zzq [title]x"],
              "label": "0"},
             {"ctx": "a bird sang in the", "endings": ["qq", "tree. the dog ate"], "label": "1"}]
    wino = [{"sentence": "the _ ate the bone.", "option1": "dog", "option2": "tree", "answer": "1"},
            {"sentence": "a bird sang in the _.", "option1": "bone", "option2": "tree", "answer": "2"}]
    # acc and acc_norm must pick differently somewhere, on any CPU's trained model: after "the" the model cannot
    # know the noun (cat, mat, dog, bone, tree all follow it), so one letter costs ~2-3 nats in all, less than
    # the long answer's ~9, yet ~1.4 nats per character against its ~0.2
    generic = [{"context": "the", "choices": ["b", "cat sat on the mat. the dog ate the bone."], "label": 1},
               {"context": "the dog ate", "choices": ["the bone.", "qqqq"], "label": 0}]
    return [
        (write_jsonl(tmp_path / "piqa.jsonl", piqa), "piqa",
         [(["Question: the cat sat\nAnswer:"] * 2, [" on the mat.", " qz vv kk."], 0),
          (["Question: the dog\nAnswer:"] * 2, [" xj", " ate the bone."], 1)]),
        (write_jsonl(tmp_path / "hella.jsonl", hella), "hellaswag",
         [(["Pets: the cat sat On the"] * 2, [" mat.", " zzq. x"], 0),
          (["a bird sang in the"] * 2, [" qq", " tree. the dog ate"], 1)]),
        (write_jsonl(tmp_path / "wino.jsonl", wino), "winogrande",
         [(["the dog", "the tree"], [" ate the bone."] * 2, 0),
          (["a bird sang in the bone", "a bird sang in the tree"], [" ."] * 2, 1)]),
        (write_jsonl(tmp_path / "generic.jsonl", generic), "generic",
         [(["the"] * 2, [" b", " cat sat on the mat. the dog ate the bone."], 1),
          (["the dog ate"] * 2, [" the bone.", " qqqq"], 0)]),
    ]


def test_multiple_choice_layouts(trained_byte_model, naive_logprob, tmp_path):
    differs = 0
    for path, fmt, expected in mc_files(tmp_path):
        detected, examples = read_multiple_choice(path, "auto")
        assert detected == fmt
        assert [(e.contexts, e.continuations, e.label) for e in examples] == expected
        result = evaluate_multiple_choice(trained_byte_model, TOK, path, 64, batch_size=3)  # ALiBi: no truncation
        hits = np.zeros(3)
        for ex in examples:
            scored = [naive_logprob(trained_byte_model, ids(c), ids(x))[0] for c, x in zip(ex.contexts,
                                                                                          ex.continuations)]
            scored = np.array(scored)
            picks = [np.argmax(scored), np.argmax(scored / np.array(ex.norm_chars)),
                     np.argmax(scored / np.array([len(ids(x)) for x in ex.continuations]))]
            hits += [p == ex.label for p in picks]
            differs += picks[0] != picks[1]
        assert (result["format"], result["examples"]) == (fmt, 2)
        assert [result["acc"], result["acc_norm"], result["acc_per_token"]] == (hits / 2).tolist(), (fmt, result)
        if fmt == "winogrande":
            assert result["acc_norm"] == result["acc"]  # one continuation for both options
    assert differs >= 1, "no example where acc and acc_norm pick differently: the test would not tell them apart"


def test_multiple_choice_generic_answers_forced(trained_byte_model, tmp_path):
    path = write_jsonl(tmp_path / "forced.jsonl", [
        {"context": "the dog ate the", "choices": ["zebra", "bone"], "label": 1},
        {"context": "a bird sang in the", "choices": ["tree", "kkkk"], "label": 0}])
    result = evaluate_multiple_choice(trained_byte_model, TOK, path, 32, batch_size=4, fmt="generic")
    assert (result["acc"], result["acc_norm"], result["acc_per_token"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad\.jsonl:3: not valid JSON"),
    ('["a list"]', r"bad\.jsonl:3: expected a JSON object"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', r"bad\.jsonl:3: field 'label' = 2 is not a valid"),
    ('{"goal": "g", "sol1": 5, "sol2": "b", "label": 0}', r"bad\.jsonl:3: field 'sol1' must be a str"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=message):
        read_multiple_choice(path, "auto")


def test_unknown_layout_and_bad_lambada(trained_byte_model, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"odd\.jsonl:1: cannot tell the multiple-choice layout"):
        read_multiple_choice(path)
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": "fine text"}, {"text": "oneword"}])
    with pytest.raises(ValueError, match=r"lam\.jsonl:2: 'text' needs a context and a last word"):
        evaluate_lambada(trained_byte_model, TOK, path, 32, 1)
    assert evaluate_lambada(trained_byte_model, TOK, path, 32, 1, limit=1)["examples"] == 1


def test_a_byte_order_mark_keeps_the_first_example(tmp_path):
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "h", "sol1": "c", "sol2": "d", "label": 1}]
    path = tmp_path / "marked.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    fmt, examples = read_multiple_choice(path, "auto")
    assert len(examples) == 2 and examples[0].label == 0 and examples[1].label == 1
