"""LRSchedule (warmup -> cosine or linear decay -> constant tail) and the checkpointable LRScheduler."""
import math

import pytest
import torch

from megagpt.optim import LRSchedule, LRScheduler

PEAK, MIN = 6e-4, 6e-5


def schedule(**overrides) -> LRSchedule:
    options = dict(peak_lr=PEAK, min_lr=MIN, warmup=100, total=1000, constant_fraction=0.2, unit="steps")
    options.update(overrides)
    return LRSchedule(**options)


def test_values_at_key_points():
    s = schedule()  # cosine from step 100 to 800, then constant
    assert s.lr_at(0) == 0.0
    assert s.lr_at(50) == pytest.approx(PEAK / 2, rel=1e-12)
    assert s.lr_at(100) == pytest.approx(PEAK, rel=1e-12)
    assert s.lr_at(450) == pytest.approx((PEAK + MIN) / 2, rel=1e-12)  # cosine midpoint
    # a quarter into the decay the cosine factor is (1 + cos(pi/4)) / 2
    assert s.lr_at(275) == pytest.approx(MIN + (PEAK - MIN) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert s.lr_at(800) == MIN  # start of the constant tail
    assert s.lr_at(799.999) == pytest.approx(MIN, rel=1e-9)  # continuous into the tail
    assert s.lr_at(1000) == MIN and s.lr_at(5000) == MIN


def test_linear_decay_to_zero_without_warmup():
    # Hugging Face's default: linear from the peak at progress 0 to 0 at the end, no warmup, no tail
    s = schedule(min_lr=0.0, warmup=0, constant_fraction=0.0, decay_style="linear")
    assert s.lr_at(0) == PEAK
    assert s.lr_at(250) == pytest.approx(PEAK * 0.75, rel=1e-12)
    assert s.lr_at(500) == pytest.approx(PEAK / 2, rel=1e-12)
    assert s.lr_at(999) == pytest.approx(PEAK / 1000, rel=1e-9)
    assert s.lr_at(1000) == 0.0


def test_linear_decay_after_warmup_into_the_tail():
    s = schedule(decay_style="linear")  # warmup to 100, straight line to MIN at 800, then MIN
    assert s.lr_at(50) == pytest.approx(PEAK / 2, rel=1e-12)
    assert s.lr_at(450) == pytest.approx((PEAK + MIN) / 2, rel=1e-12)
    assert s.lr_at(275) == pytest.approx(MIN + (PEAK - MIN) * 0.75, rel=1e-12)  # the cosine would give 0.854
    assert s.lr_at(800) == MIN and s.lr_at(1000) == MIN


def test_rises_during_warmup_then_never_increases():
    s = schedule()
    values = [s.lr_at(p) for p in range(0, 1001)]
    assert all(a < b for a, b in zip(values[:100], values[1:101]))
    assert all(a >= b for a, b in zip(values[100:], values[101:]))
    assert min(values[100:]) == MIN


def test_tokens_unit_equals_steps_unit_at_constant_tokens_per_step():
    tokens_per_step = 4 * 512
    by_steps = LRScheduler(schedule())
    by_tokens = LRScheduler(schedule(unit="tokens", warmup=100 * tokens_per_step, total=1000 * tokens_per_step))
    for _ in range(1000):
        assert by_steps.step(tokens_per_step) == pytest.approx(by_tokens.step(tokens_per_step), rel=1e-12, abs=0)


def test_tokens_unit_follows_tokens_when_steps_are_shorter():
    # Sequence-length warmup: the first steps carry fewer tokens, so the token schedule lags.
    scheduler = LRScheduler(schedule(unit="tokens", warmup=1000, total=10000, constant_fraction=0.0))
    assert scheduler.step(100) == pytest.approx(PEAK * 0.1, rel=1e-12)
    assert scheduler.step(400) == pytest.approx(PEAK * 0.5, rel=1e-12)
    assert scheduler.steps == 2 and scheduler.tokens == 500


def test_step_sets_the_optimizer_groups_lr():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=1.0)
    lr = LRScheduler(schedule()).step(10, optimizer)
    assert lr == pytest.approx(PEAK / 100, rel=1e-12)  # the first step uses progress 1, not 0
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]


def test_state_round_trip_continues_identically():
    original = LRScheduler(schedule(unit="tokens", warmup=500, total=5000))
    for n in (64, 64, 128, 128):
        original.step(n)
    resumed = LRScheduler(schedule(unit="tokens", warmup=500, total=5000))
    resumed.load_state_dict(original.state_dict())
    assert [original.step(256) for _ in range(5)] == [resumed.step(256) for _ in range(5)]
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"steps": 3})


@pytest.mark.parametrize("field, value, message", [
    ("unit", "epochs", "unit"),
    ("decay_style", "exponential", "decay_style"),
    ("peak_lr", 0.0, "peak_lr"),
    ("min_lr", 1e-3, "min_lr"),
    ("min_lr", -1e-5, "min_lr"),
    ("warmup", -1, "warmup"),
    ("warmup", 10.5, "warmup"),
    ("total", 0, "total"),
    ("constant_fraction", 1.0, "constant_fraction"),
    ("warmup", 900, "warmup=900 ends after"),
])
def test_bad_arguments_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        schedule(**{field: value})


def test_negative_progress_and_tokens_raise():
    with pytest.raises(ValueError, match="progress"):
        schedule().lr_at(-1)
    with pytest.raises(ValueError, match="tokens"):
        LRScheduler(schedule()).step(-5)
