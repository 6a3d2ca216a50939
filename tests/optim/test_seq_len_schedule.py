"""SeqLenSchedule (stages / linear ramp), repack and the checkpointable SeqLenWarmup."""
import pytest
import torch

from megagpt.optim import SeqLenSchedule, SeqLenWarmup, dropped_positions, repack

STAGES = [(128, 30), (192, 30), (256, 30), (384, 30), (512, 30)]  # first 30 % of 500 steps


def test_stage_boundaries():
    s = SeqLenSchedule.from_stages(1024, STAGES)
    assert s.warmup_steps == 150
    expected = {0: 128, 29: 128, 30: 192, 59: 192, 60: 256, 90: 384, 120: 512, 149: 512, 150: 1024, 499: 1024}
    assert {step: s.seq_len_at(step) for step in expected} == expected
    assert SeqLenSchedule.constant(64).seq_len_at(0) == 64


def test_ramp_values_are_multiples_of_8_monotonic_and_reach_full_length():
    s = SeqLenSchedule.linear_ramp(full_len=500, start=64, ramp_steps=37)
    values = [s.seq_len_at(step) for step in range(60)]
    assert values[0] == 64
    assert all(v % 8 == 0 for v in values[:37])
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[36] < 500 and values[37:] == [500] * 23  # full_len need not be a multiple of 8
    assert len(set(values)) > 20  # it actually ramps rather than jumping


@pytest.mark.parametrize("seq_len, dropped", [(1, 0), (8, 0), (16, 0), (24, 16), (48, 16), (64, 0)])
def test_repack_matches_the_full_sample(seq_len, dropped):
    full_len, batch = 64, 3
    tokens = torch.randint(0, 50000, (batch, full_len + 1), generator=torch.Generator().manual_seed(seq_len))
    rows = repack(tokens, seq_len)
    k = full_len // seq_len
    assert rows.shape == (batch * k, seq_len + 1)
    # (input, label) pairs of the rows, in order, are exactly the sample's first k*L pairs
    row_pairs = torch.stack([rows[:, :-1], rows[:, 1:]], dim=-1).reshape(batch, k * seq_len, 2)
    full_pairs = torch.stack([tokens[:, :-1], tokens[:, 1:]], dim=-1)[:, : k * seq_len]
    assert torch.equal(row_pairs, full_pairs)
    # every label position is used once or counted as dropped
    assert rows[:, 1:].numel() + batch * dropped_positions(full_len, seq_len) == batch * full_len
    assert dropped_positions(full_len, seq_len) == dropped  # 64 = 2*24 + 16 = 48 + 16


def test_warmup_object_accounts_for_every_token_and_round_trips():
    full_len, batch = 40, 2
    warmup = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=16, ramp_steps=4))
    tokens = torch.arange(batch * (full_len + 1)).view(batch, full_len + 1)
    trained = 0
    for _ in range(3):
        trained += warmup.next_batch(tokens)[:, 1:].numel()
    assert trained + warmup.dropped_tokens == 3 * batch * full_len
    assert warmup.dropped_tokens > 0  # 16 and 24 do not divide 40: the remainder is counted
    state = warmup.state_dict()
    resumed = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=16, ramp_steps=4))
    resumed.load_state_dict(state)
    assert resumed.seq_len == warmup.seq_len and resumed.dropped_tokens == warmup.dropped_tokens
    assert torch.equal(resumed.next_batch(tokens), warmup.next_batch(tokens))
    changed = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=8, ramp_steps=20))
    with pytest.raises(ValueError, match="restore the warmup settings"):
        changed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[batch, 41\]"):
        warmup.next_batch(tokens[:, :20])


@pytest.mark.parametrize("make, message", [
    (lambda: SeqLenSchedule.from_stages(256, [(128, 10), (64, 10)]), r"stages\[1\].length=64 is shorter"),
    (lambda: SeqLenSchedule.from_stages(256, [(512, 10)]), r"stages\[0\].length=512 is longer"),
    (lambda: SeqLenSchedule.from_stages(256, [(128, 0)]), r"stages\[0\].steps"),
    (lambda: SeqLenSchedule.from_stages(256, [(128,)]), r"stages\[0\] must be a \(length, steps\) pair"),
    (lambda: SeqLenSchedule.linear_ramp(256, start=60, ramp_steps=10), "start=60 is not a multiple of 8"),
    (lambda: SeqLenSchedule.linear_ramp(256, start=512, ramp_steps=10), "start=512 is longer"),
    (lambda: SeqLenSchedule.linear_ramp(256, start=64, ramp_steps=0), "ramp_steps"),
    (lambda: SeqLenSchedule(256, stages=((64, 1),), ramp_start=64, ramp_steps=3), "not both"),
    (lambda: repack(torch.zeros(2, 33), 64), r"seq_len must be an integer in \[1, 32\]"),
    (lambda: repack(torch.zeros(33), 8), "expects tokens"),
])
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()
