"""Every shipped config in configs/ loads, validates (data paths overridden to a tiny dataset) and
derives a DeepSpeed config; the presets have the sizes and settings the issue asks for."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.config import deepspeed_config, load_config, parameter_count, validate
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.model.gpt import GPT

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.json"))
DEMO_DATA = "out/demo/shakespeare_text_document"  # written by tools/demo.sh


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("data") / "tiny_text_document"
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(10):
            writer.add_document(rng.integers(0, 60, size=30))
    return str(prefix)


def load(name, dataset, *overrides):
    """The shipped config with its data (and, where set, init_from and tokenizer files: made by the user first,
    e.g. tools/convert_checkpoint.py --from-hf) pointed at files that exist here."""
    raw = json.loads((CONFIGS / name).read_text())
    stand_ins = []
    if raw.get("checkpoint", {}).get("init_from"):
        stand_ins.append(f"checkpoint.init_from={json.dumps(str(Path(dataset).parent))}")
    for key in ("vocab_file", "merge_file", "tokenizer_file"):
        if raw.get("tokenizer", {}).get(key):
            stand_ins.append(f"tokenizer.{key}={json.dumps(dataset + '.idx')}")
    return load_config(CONFIGS / name, [f"data.data_path={json.dumps([dataset])}", *stand_ins, *overrides])


def test_the_presets_are_shipped():
    assert {"gpt1b.json", "gpt127.json", "gpt303.json", "gpt2-small.json", "pythia-50m.json",
            "shakespeare-char.json", "tiny.json"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_validates_and_derives_deepspeed(name, dataset):
    config = load(name, dataset)
    model_parallel = config.parallel.tp * config.parallel.pp
    for dp_size in (1, 2, 4):
        world_size = model_parallel * dp_size
        if config.batch.global_batch % (config.batch.micro_batch * dp_size):
            continue
        validate(config, world_size)
        ds = deepspeed_config(config, world_size)
        assert (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp_size
                == ds["train_batch_size"] == config.batch.global_batch)
        assert ds["zero_optimization"]["stage"] == config.parallel.zero_stage
        if config.parallel.zero_stage >= 1:  # e.g. gpt1b on one GPU sums 128 micro batches: in fp32
            assert ds["data_types"]["grad_accum_dtype"] == ds["communication_data_type"] == "fp32"
    # the shipped data path is used only when not overridden; the override must have replaced it
    assert config.data.prefixes == [dataset]


@pytest.mark.parametrize("name", SHIPPED)
def test_parameter_count_of_shipped_config_matches_the_model(name, dataset):
    config = load(name, dataset)
    with torch.device("meta"):  # shapes only: a 1 B model costs no memory
        gpt = GPT(config.model)
    assert parameter_count(config.model) == sum(p.numel() for p in gpt.parameters())


@pytest.mark.parametrize("name, target", [
    ("gpt127.json", 127e6), ("gpt303.json", 303e6), ("gpt1b.json", 1.0e9), ("gpt2-small.json", 124e6),
    ("pythia-50m.json", 51.5e6), ("tiny.json", 1.0e6),  # pythia-50m: GPT-2's learned positions add 0.5 M
])
def test_preset_sizes_within_3_percent(name, target, dataset):
    count = parameter_count(load(name, dataset).model)
    assert abs(count / target - 1) <= 0.03, f"{name}: {count:,} parameters, target {target:,.0f} +-3%"


def test_gpt1b_settings(dataset):  # the recipe itself: tests/config/test_recipes.py
    c = load("gpt1b.json", dataset)
    m = c.model
    assert (m.position, m.parallel_residual, m.resolved_head_dim, m.seq_len) == ("alibi", True, 128, 512)
    assert m.padded_vocab_size == 50304
    assert (c.parallel.precision, c.parallel.zero_stage) == ("bf16", 1)


def test_named_shapes(dataset):
    m = load("gpt127.json", dataset).model
    assert (m.d_model, m.num_layers, m.num_heads, m.position, m.tied_embeddings) == (1024, 6, 8, "alibi", True)
    m = load("gpt2-small.json", dataset).model
    assert (m.position, m.parallel_residual, m.seq_len) == ("learned", False, 1024)
    c = load("pythia-50m.json", dataset)
    assert (c.model.d_model, c.model.num_layers, c.model.num_heads) == (512, 8, 8)
    assert (c.schedule.train_iters, c.batch.global_batch, c.model.seq_len) == (20000, 64, 1024)


@pytest.mark.parametrize("name", ["tiny.json", "shakespeare-char.json"])
def test_demo_configs_read_the_demo_corpus(name):
    config = load_config(CONFIGS / name)  # no override: the path tools/demo.sh writes
    assert config.data.prefixes == [DEMO_DATA]
    assert config.model.vocab_size == 66  # the char-level vocab of tools/demo.sh, EOD included
