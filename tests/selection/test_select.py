"""Selection rules and the token budget (the command line: tests/tools/test_select_documents.py)."""
import numpy as np
import pytest

from megagpt.selection.select import SelectionRule, select

SCORES = np.array([5.0, 1.0, np.nan, 3.0, 9.0, 7.0, 2.0, 8.0, 4.0, 6.0])  # document i's score
LENGTHS = np.full(10, 10)


def _ids(kind, **kw):
    budget = kw.pop("budget", None)
    return select(SelectionRule(kind, **kw), SCORES, LENGTHS, budget).ids.tolist()


def test_bands():
    # ascending by score: 1(1) 6(2) 3(3) 8(4) 0(5) 9(6) 5(7) 7(8) 4(9); document 2 has no score
    assert _ids("low", fraction=1 / 3) == [1, 3, 6]
    assert _ids("high", fraction=1 / 3) == [4, 5, 7]
    assert _ids("middle", fraction=1 / 3) == [0, 8, 9]
    assert _ids("quantiles", quantiles=(0.0, 0.5)) == [1, 3, 6, 8]  # round(0.5 * 9) = 4 lowest
    assert _ids("range", min_score=2.5, max_score=5.0) == [0, 3, 8]
    assert _ids("range", max_score=2.0) == [1, 6]
    assert select(SelectionRule("low"), SCORES, LENGTHS).unscored == 1


def test_token_budget_takes_the_rule_order():
    assert _ids("low", budget=30) == [1, 3, 6]  # lowest three
    assert _ids("high", budget=35) == [4, 5, 7]  # the fourth does not fit: stop
    assert _ids("middle", budget=10) == [0]  # the median first
    lengths = np.array([10, 50, 10, 10, 10, 10, 10, 10, 10, 10])
    chosen = select(SelectionRule("low"), SCORES, lengths, 65)
    assert chosen.ids.tolist() == [1, 6] and chosen.tokens == 60  # 1 (50), 6 (10); then 3 would pass 65
    chosen = select(SelectionRule("random", seed=3), None, LENGTHS, 40)
    assert chosen.tokens == 40 and len(chosen.ids) == 4
    with pytest.raises(ValueError, match="fewer than --token-budget"):
        select(SelectionRule("low", fraction=0.2), SCORES, LENGTHS, 100)
    with pytest.raises(ValueError, match="selects nothing within the budget"):
        select(SelectionRule("low"), SCORES, LENGTHS, 5)


def test_random_is_seeded_and_needs_no_scores():
    a = select(SelectionRule("random", fraction=0.5, seed=1), None, LENGTHS).ids
    assert len(a) == 5 and np.array_equal(a, select(SelectionRule("random", fraction=0.5, seed=1), None, LENGTHS).ids)
    assert not np.array_equal(a, select(SelectionRule("random", fraction=0.5, seed=2), None, LENGTHS).ids)
    assert np.all(np.diff(a) > 0)  # ascending: the source's document order


@pytest.mark.parametrize("kw, message", [
    ({"kind": "low", "fraction": 0.0}, r"outside \(0, 1\]"),
    ({"kind": "low", "fraction": 1.5}, r"outside \(0, 1\]"),
    ({"kind": "quantiles", "quantiles": (0.6, 0.2)}, "LO < HI"),
    ({"kind": "range"}, "needs --min-score"),
    ({"kind": "low", "min_score": 1.0}, "belong to the range rule"),
    ({"kind": "typo"}, "not one of"),
])
def test_bad_rules(kw, message):
    with pytest.raises(ValueError, match=message):
        SelectionRule(**kw)


def test_rule_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no documents"):
        select(SelectionRule("range", min_score=100.0), SCORES, LENGTHS)
    with pytest.raises(ValueError, match="needs a score file"):
        select(SelectionRule("low"), None, LENGTHS)
