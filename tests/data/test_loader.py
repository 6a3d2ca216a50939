"""The pretraining loader: a step's samples do not depend on the data-parallel size, and resume is O(1)."""
import numpy as np
import pytest

from megagpt.data.loader import PretrainingLoader, step_sample_indices


class _Counting:
    """A dataset whose sample i is [i, i, i] and that counts reads (to show resume replays nothing)."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return np.full(3, i)


def test_step_samples_same_for_every_dp_size():
    for dp in (1, 2, 4):
        for consumed in (0, 16, 48):
            rows = [step_sample_indices(consumed, 2, 16, dp, r) for r in range(dp)]
            assert sorted(np.concatenate([x.ravel() for x in rows]).tolist()) == list(range(consumed, consumed + 16))
            assert rows[0].shape == (16 // (2 * dp), 2)


def test_resume_continues_without_replay():
    full = PretrainingLoader(_Counting(100), micro_batch=2, global_batch=8, dp_size=2, dp_rank=1)
    steps = [full.next_step() for _ in range(5)]
    ds = _Counting(100)
    resumed = PretrainingLoader(ds, micro_batch=2, global_batch=8, dp_size=2, dp_rank=1)
    resumed.load_state_dict({"consumed_samples": 24})
    assert ds.reads == 0
    for expected in steps[3:]:
        got = resumed.next_step()
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert ds.reads == 2 * 8 // 2  # two steps, this rank's half only


def test_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple of micro batch 3"):
        PretrainingLoader(_Counting(10), micro_batch=3, global_batch=8)
    loader = PretrainingLoader(_Counting(10), micro_batch=2, global_batch=8)
    loader.next_step()
    with pytest.raises(IndexError, match="holds 10 samples"):
        loader.next_step()
    with pytest.raises(ValueError, match="whole number of global batches"):
        loader.load_state_dict({"consumed_samples": 4})


def test_skipped_sample_ranges_are_jumped_over_and_kept_in_the_state():
    from megagpt.data.loader import PretrainingLoader
    loader = PretrainingLoader(np.arange(100)[:, None], micro_batch=2, global_batch=4)
    loader.skip(4, 12)
    loader.skip(12, 16)  # adjacent: one jump over both
    firsts = [int(loader.next_step()[0][0, 0]) for _ in range(3)]
    assert firsts == [0, 16, 20]
    resumed = PretrainingLoader(np.arange(100)[:, None], micro_batch=2, global_batch=4)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.skipped == [(4, 12), (12, 16)] and resumed.consumed_samples == 24
    with pytest.raises(ValueError, match="whole global batches"):
        loader.skip(5, 8)
