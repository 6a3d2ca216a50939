"""megagpt.schedule_plan: the trainer's schedules stepped through a run, and the --dry-run summary."""
from pathlib import Path

import pytest

from megagpt.config import load_config
from megagpt.schedule_plan import format_plan, schedule_plan
from megagpt.training import build_schedules

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"  # seq_len 128, 16 x 1 micro batch of 16


def test_stages_padding_and_milestones_follow_the_trainer():
    config = load_config(TINY, ["schedule.train_iters=10", "schedule.warmup_iters=2", "schedule.constant_fraction=0.2",
                                "schedule.seq_len_stages=[[48, 3], [64, 2]]"])
    plan = schedule_plan(config)
    assert [(s.seq_len, s.first, s.last) for s in plan.stages] == [(48, 0, 2), (64, 3, 4), (128, 5, 9)]
    # 16 x 128 = 2048 labels: 43 rows of 48 (16 padded positions), 32 rows of 64, 16 of 128
    assert [(s.rows_per_step, s.padding_per_step) for s in plan.stages] == [(43, 16), (32, 0), (16, 0)]
    lr_scheduler, _ = build_schedules(config)
    assert list(plan.lrs) == [lr_scheduler.step(config.tokens_per_step) for _ in range(10)]
    assert (plan.warmup_end_step, plan.decay_end_step) == (1, 7)  # warmup 2 steps; the tail is the last 2
    assert plan.lrs[7] == config.optimizer.min_lr < plan.lrs[6]
    assert plan.total_tokens == 10 * 16 * 128
    text = format_plan(plan)
    assert "schedule: 10 steps x 2,048 tokens = 20,480 tokens" in text
    assert "rows of 48: steps 0-2 (3 steps, 43 rows per step, 16 padded positions per step (0.8 %))" in text
    assert "step 7 (min_lr reached, 80 % of the tokens): 0.0001" in text


def test_a_ramp_is_one_stage_per_length():
    config = load_config(TINY, ["schedule.train_iters=6", "schedule.warmup_iters=0",
                                'schedule.seq_len_ramp={"start": 64, "steps": 4}'])
    plan = schedule_plan(config)
    assert [s.seq_len for s in plan.stages] == [64, 80, 96, 112, 128]
    assert [plan.seq_len_at(step) for step in range(6)] == [64, 80, 96, 112, 128, 128]
    with pytest.raises(ValueError, match="step 6 is not in this run's steps 0..5"):
        plan.seq_len_at(6)
