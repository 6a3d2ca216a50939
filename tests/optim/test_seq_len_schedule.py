"""SeqLenSchedule (stages / linear ramp), repack and the checkpointable SeqLenWarmup."""
import pytest
import torch

from megagpt.optim import IGNORE_INDEX, SeqLenSchedule, SeqLenWarmup, padding_positions, repack

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


def _pairs(inputs, labels):
    """The (input, label) pairs of rows, in order, ignored labels left out."""
    keep = labels.reshape(-1) != IGNORE_INDEX
    return torch.stack([inputs.reshape(-1)[keep], labels.reshape(-1)[keep]], dim=-1)


@pytest.mark.parametrize("seq_len, padding", [(1, 0), (8, 0), (16, 0), (24, 0), (40, 8), (56, 32), (64, 0)])
def test_repack_trains_every_pair_of_the_samples_once(seq_len, padding):
    full_len, batch = 64, 3  # 192 pairs: 24, 40, 56 do not divide 64; 40 and 56 leave a part row
    tokens = torch.randint(0, 50000, (batch, full_len + 1), generator=torch.Generator().manual_seed(seq_len))
    inputs, labels = repack(tokens, seq_len)
    rows = -(-batch * full_len // seq_len)
    assert inputs.shape == labels.shape == (rows, seq_len)
    # the rows' pairs, in order, are exactly the samples' pairs: nothing dropped, nothing twice
    full_pairs = torch.stack([tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)], dim=-1)
    assert torch.equal(_pairs(inputs, labels), full_pairs)
    assert padding_positions(batch, full_len, seq_len) == padding == int((labels == IGNORE_INDEX).sum())
    assert (labels.reshape(-1)[batch * full_len:] == IGNORE_INDEX).all()  # padding only after the last pair


def test_repack_at_a_dividing_length_keeps_every_row_inside_its_sample():
    tokens = torch.arange(2 * 17).view(2, 17)  # full_len 16
    inputs, labels = repack(tokens, 4)
    assert torch.equal(inputs[4], tokens[1, 0:4]) and torch.equal(labels[4], tokens[1, 1:5])
    assert torch.equal(torch.cat([inputs[:, :1], labels], dim=1), tokens.unfold(1, 5, 4).reshape(-1, 5))
    full = repack(tokens, 16)
    assert torch.equal(full[0], tokens[:, :-1]) and torch.equal(full[1], tokens[:, 1:])


def test_repacked_loss_equals_the_full_length_mean():
    # the model's loss skips the padded labels: a per-position loss summed over the rows is the samples' sum
    full_len, batch, vocab = 24, 5, 11
    tokens = torch.randint(0, vocab, (batch, full_len + 1), generator=torch.Generator().manual_seed(3))
    logit_of = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(4))  # logits of the input
    inputs, labels = repack(tokens, 7)  # 120 pairs in 18 rows, 6 padded positions
    packed = torch.nn.functional.cross_entropy(logit_of[inputs].reshape(-1, vocab), labels.reshape(-1))
    full = torch.nn.functional.cross_entropy(logit_of[tokens[:, :-1]].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    assert torch.allclose(packed, full, rtol=1e-6, atol=0)


def test_warmup_object_accounts_for_every_token_and_round_trips():
    full_len, micro, grad_accum = 40, 3, 2
    warmup = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=16, ramp_steps=4))
    step = [torch.arange(micro * (full_len + 1)).view(micro, full_len + 1) + 1000 * i for i in range(grad_accum)]
    for _ in range(3):
        packed = warmup.next_step(step)
        assert len(packed) == grad_accum
        for (inputs, labels), samples in zip(packed, step):  # each micro batch keeps its own samples' labels
            assert torch.equal(_pairs(inputs, labels)[:, 1], samples[:, 1:].reshape(-1))
    assert warmup.padding_positions > 0  # 16 and 24 do not divide 3 x 40: the last rows are padded
    state = warmup.state_dict()
    resumed = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=16, ramp_steps=4))
    resumed.load_state_dict(state)
    assert resumed.seq_len == warmup.seq_len and resumed.padding_positions == warmup.padding_positions
    for (a_in, a_lab), (b_in, b_lab) in zip(resumed.next_step(step), warmup.next_step(step)):
        assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)
    changed = SeqLenWarmup(SeqLenSchedule.linear_ramp(full_len, start=8, ramp_steps=20))
    with pytest.raises(ValueError, match="restore the warmup settings"):
        changed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[batch, 41\]"):
        warmup.next_step([step[0][:, :20]])


def test_a_checkpoint_from_the_dropping_repack_resumes_only_where_nothing_changes():
    old_state = {"step": 2, "seq_len": 16, "dropped_tokens": 0}  # the state before re-packing kept every label
    dividing = SeqLenWarmup(SeqLenSchedule.from_stages(32, [(16, 4), (32, 4)]))
    dividing.load_state_dict(old_state)
    assert dividing.step_count == 2 and dividing.padding_positions == 0
    with pytest.raises(ValueError, match=r"lengths \[24\] that do not divide 32"):
        SeqLenWarmup(SeqLenSchedule.from_stages(32, [(16, 4), (24, 4)])).load_state_dict(old_state)
    finished = SeqLenWarmup(SeqLenSchedule.from_stages(32, [(24, 2)]))  # its 24 stage is over: same rows ahead
    finished.load_state_dict({"step": 2, "seq_len": 32, "dropped_tokens": 16})
    assert finished.seq_len == 32


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
