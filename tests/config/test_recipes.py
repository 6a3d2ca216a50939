"""The shipped recipe configs follow the published recipes they are named after (docs/configs.md).

The schedules are read from the trainer's own objects (megagpt.schedule_plan steps the LRScheduler and
SeqLenWarmup that megagpt.training.build_schedules builds), never from the JSON; the re-packing of a step is
the trainer's SeqLenWarmup run on a step-sized batch; parameter counts come from the model built on the meta
device and are compared with the count the source itself reports or builds.
"""
import math
from pathlib import Path

import pytest
import torch

from megagpt.config import load_config, parameter_count
from megagpt.model.gpt import GPT
from megagpt.optim import IGNORE_INDEX
from megagpt.schedule_plan import schedule_plan
from megagpt.training import build_schedules

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def recipe(name):
    return load_config(CONFIGS / name)


def built_parameters(config) -> int:
    with torch.device("meta"):  # shapes only
        return sum(p.numel() for p in GPT(config.model).parameters())


def trained_labels_of_a_step(config, step: int) -> tuple[int, int]:
    """(labels trained, row length) when the trainer's SeqLenWarmup re-packs one global batch at ``step``
    (one rank holding the whole batch, split into its micro batches as the loader splits it)."""
    _, warmup = build_schedules(config)
    warmup.load_state_dict({"step": step, "seq_len": warmup.schedule.seq_len_at(step), "padding_positions": 0})
    length = warmup.seq_len
    full_len, micro = config.model.seq_len, config.batch.micro_batch
    samples = torch.randint(0, config.model.vocab_size, (config.batch.global_batch, full_len + 1),
                            generator=torch.Generator().manual_seed(step))
    packed = warmup.next_step(samples.split(micro))
    assert all(inputs.shape[1] == length for inputs, _ in packed)
    labels = torch.cat([labels.reshape(-1) for _, labels in packed])
    trained = labels[labels != IGNORE_INDEX]
    assert torch.equal(trained, samples[:, 1:].reshape(-1))  # every label of the step, once, in order
    return trained.numel(), length


# --- GPT-127*, GPT-303*, GPT-1B*: 512 tokens, 1024 sequences, 51,000 steps, warmup 4,000, cosine to 10 % held
#     for the final 10 % of the tokens ----------------------------------------------------------------------
ALIBI_RECIPES = [("gpt127.json", 127e6), ("gpt303.json", 303e6), ("gpt1b.json", 1.0e9)]


@pytest.mark.parametrize("name, nominal", ALIBI_RECIPES)
def test_alibi_recipe_learning_rate_and_tokens(name, nominal):
    config = recipe(name)
    plan = schedule_plan(config)
    assert len(plan.lrs) == 51_000
    assert plan.tokens_per_step == 1024 * 512 == 524_288  # ~0.5 M tokens, in every stage
    assert plan.total_tokens == 51_000 * 524_288
    peak, floor = 6e-4, 6e-5
    assert plan.lrs[0] == pytest.approx(peak / 4000, rel=1e-9)  # warmup from 0: step 0 trains at 1/4000 of it
    assert plan.warmup_end_step == 3999 and plan.lrs[3999] == pytest.approx(peak, rel=1e-12)
    assert plan.lrs[3998] < peak
    # the cosine reaches 10 % of the peak at 90 % of the training tokens and stays there
    ninety = next(step for step in range(51_000) if (step + 1) * plan.tokens_per_step >= 0.9 * plan.total_tokens)
    assert ninety == plan.decay_end_step == 45_899
    assert plan.lrs[ninety - 1] > floor and plan.lrs[ninety] == floor and plan.lrs[-1] == floor
    assert set(plan.lrs[ninety:]) == {floor}
    middle = (4000 + 45_900) // 2 - 1  # half-way through the decay: the cosine's midpoint
    assert plan.lrs[middle] == pytest.approx((peak + floor) / 2, rel=1e-9)
    assert plan.unit == "tokens" and plan.decay_style == "cosine"
    count = built_parameters(config)
    assert count == parameter_count(config.model)
    assert abs(count / nominal - 1) <= 0.03, f"{name}: {count:,} parameters"


@pytest.mark.parametrize("name, kind", [("gpt127.json", "adamw"), ("gpt303.json", "adamw"),
                                        ("gpt1b.json", "adamw8bit")])
def test_alibi_recipe_model_optimizer_and_data(name, kind):
    c = recipe(name)
    m, o = c.model, c.optimizer
    assert (m.seq_len, m.position, m.parallel_residual, m.dropout, m.vocab_size) == (512, "alibi", True, 0.0, 50257)
    assert (o.kind, o.lr, o.min_lr, o.weight_decay) == (kind, 6e-4, 6e-5, 0.1)
    assert (c.batch.global_batch, c.schedule.warmup_iters) == (1024, 4000)
    assert c.tokenizer.type == "GPT2BPETokenizer"
    # one epoch: the run asks the dataset for train_iters x global_batch samples, no more
    assert c.schedule.train_iters * c.batch.global_batch == 51_000 * 1024


def test_gpt1b_staged_sequence_length_warmup():
    config = recipe("gpt1b.json")
    plan = schedule_plan(config)
    _, warmup = build_schedules(config)
    expected = {0: 128, 3749: 128, 3750: 192, 7499: 192, 7500: 256, 11_250: 384, 14_999: 384, 15_000: 512,
                50_999: 512}
    assert {step: warmup.schedule.seq_len_at(step) for step in expected} == expected
    assert {step: plan.seq_len_at(step) for step in expected} == expected
    assert [(s.seq_len, s.first, s.last) for s in plan.stages] == [
        (128, 0, 3749), (192, 3750, 7499), (256, 7500, 11_249), (384, 11_250, 14_999), (512, 15_000, 50_999)]
    # every stage trains on all 524,288 labels of its 1024 samples: nothing dropped at 192 and 384
    for step in (0, 3750, 7500, 11_250, 15_000):
        labels, length = trained_labels_of_a_step(config, step)
        assert labels == plan.tokens_per_step == 524_288, (step, length)
    # 192 and 384 do not divide the 8 x 512 labels of a micro batch: the last row of each is part padding
    padding = {s.seq_len: s.padding_per_step for s in plan.stages}
    assert padding == {128: 0, 192: 128 * 128, 256: 0, 384: 128 * 128, 512: 0}
    assert config.optimizer.kind == "adamw8bit"
    assert built_parameters(config) == parameter_count(config.model) == 1_009_475_584


# --- pythia-50m: a Hugging Face GPT-2 under TrainingArguments defaults ---------------------------------
def test_pythia_50m_is_hugging_face_gpt2_under_trainer_defaults():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = recipe("pythia-50m.json")
    m, o = config.model, config.optimizer
    assert (m.position, m.parallel_residual, m.bias, m.tied_embeddings, m.dropout) == ("learned", False, True, True,
                                                                                      0.1)
    assert (m.d_model, m.num_layers, m.num_heads, m.seq_len, m.vocab_size) == (512, 8, 8, 1024, 50257)
    assert (o.kind, o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad) == ("adamw", 5e-5, (0.9, 0.999), 1e-8, 0.0,
                                                                          1.0)
    assert config.parallel.precision == "fp32"  # TrainingArguments: neither fp16 nor bf16
    # the same parameters as transformers' GPT-2 of that shape (our vocabulary is padded to a multiple of 128;
    # the padding rows are never read: logits are cut to vocab_size)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(n_embd=512, n_layer=8, n_head=8, n_positions=1024, vocab_size=50257))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert built_parameters(config) - (m.padded_vocab_size - m.vocab_size) * m.d_model == hf_count
    # transformers' linear schedule, no warmup: LR(step) = 5e-5 * (20000 - step) / 20000, step 0 at the peak.
    # Ours sets a step's LR after counting it (megagpt/optim/lr_schedule.py): one step ahead, 2.5e-9 lower.
    plan = schedule_plan(config)
    assert len(plan.lrs) == 20_000 and plan.tokens_per_step == 64 * 1024
    hf_lr = [5e-5 * (20_000 - step) / 20_000 for step in range(20_000)]
    assert plan.lrs[0] == pytest.approx(hf_lr[1], rel=1e-12)
    assert plan.lrs[9_999] == pytest.approx(2.5e-5, rel=1e-12) and plan.lrs[-1] == 0.0
    assert max(abs(a - b) for a, b in zip(plan.lrs, hf_lr)) == pytest.approx(5e-5 / 20_000, rel=1e-9)
    assert plan.decay_style == "linear" and plan.warmup_end_step == 0


# --- nanoGPT: train_shakespeare_char.py and train_gpt2.py ------------------------------------------------
def nanogpt_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def nanogpt_parameters(vocab, n_layer, n_embd, bias):
    """nanoGPT's get_num_params() (position embeddings left out, as it reports)."""
    b = 1 if bias else 0
    per_layer = 2 * n_embd * (1 + b) + n_embd * 3 * n_embd + 3 * n_embd * b + n_embd * n_embd + n_embd * b \
        + 2 * 4 * n_embd * n_embd + 4 * n_embd * b + n_embd * b
    return vocab * n_embd + n_layer * per_layer + n_embd * (1 + b)


@pytest.mark.parametrize("name, source, nanogpt_vocab, reported", [
    ("shakespeare-char.json", dict(learning_rate=1e-3, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4), 65,
     10.65e6),
    ("gpt2-small.json", dict(learning_rate=6e-4, warmup_iters=2000, lr_decay_iters=600_000, min_lr=6e-5), 50304,
     123.59e6),
])
def test_nanogpt_recipes(name, source, nanogpt_vocab, reported):
    config = recipe(name)
    m, o = config.model, config.optimizer
    assert (m.bias, m.position, m.parallel_residual, o.decay_embeddings, o.weight_decay) == (False, "learned", False,
                                                                                          True, 0.1)
    assert (config.seed, o.clip_grad, o.betas[0]) == (1337, 1.0, 0.9)
    # nanoGPT reports this count (10.65M, 123.59M) when it builds the model
    count = nanogpt_parameters(nanogpt_vocab, m.num_layers, m.d_model, m.bias)
    assert round(count / 1e4) == round(reported / 1e4)
    ours = built_parameters(config) - m.seq_len * m.d_model  # without the position embedding, as nanoGPT counts
    assert ours - (m.padded_vocab_size - nanogpt_vocab) * m.d_model == count
    plan = schedule_plan(config)
    assert len(plan.lrs) == source["lr_decay_iters"]
    peak, warmup = source["learning_rate"], source["warmup_iters"]
    checked = [*range(warmup + 2), *range(warmup, len(plan.lrs), 97), len(plan.lrs) - 1]
    # the same curve; ours reaches the peak one step sooner in warmup ((it+1)/warmup, not (it+1)/(warmup+1)) and
    # evaluates the cosine after the step rather than before it (megagpt/optim/lr_schedule.py)
    assert max(abs(plan.lrs[it] - nanogpt_lr(it, **source)) for it in checked) <= peak / warmup
    assert plan.lrs[plan.warmup_end_step] == peak and plan.warmup_end_step == source["warmup_iters"] - 1
    assert plan.lrs[-1] == source["min_lr"]


def test_shakespeare_char_shape_and_batch():
    c = recipe("shakespeare-char.json")
    assert (c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.seq_len, c.model.dropout) == (
        6, 6, 384, 256, 0.2)
    assert (c.batch.global_batch, c.optimizer.betas, c.logging.eval_iters) == (64, (0.9, 0.99), 200)


def test_gpt2_small_batch_and_evaluation():
    c = recipe("gpt2-small.json")
    # 12 x 1024 tokens x 40 accumulation steps (5 x 8 GPUs) = 491,520 tokens per step
    assert (c.batch.micro_batch, c.batch.global_batch, c.tokens_per_step) == (12, 480, 491_520)
    assert c.optimizer.betas == (0.9, 0.95) and c.model.padded_vocab_size == 50304
    # nanoGPT estimates the loss on 200 batches of 12: 2,400 sequences = 5 of our global batches
    assert c.logging.eval_iters * c.batch.global_batch == 200 * 12
    assert c.logging.eval_interval == 1000
