"""The config tree: loading, --set overrides, every validation error, DeepSpeed derivation, parameter counts."""
import json
import re

import numpy as np
import pytest
import torch

from megagpt.config import (
    Config,
    ModelConfig,
    deepspeed_config,
    format_config,
    load_config,
    parameter_count,
    parse_override,
    save_resolved,
    validate,
)
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.model.gpt import GPT


@pytest.fixture
def dataset(tmp_path):
    """A 20-document dataset prefix made with the real writer."""
    prefix = tmp_path / "data" / "tiny_text_document"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(20):
            writer.add_document(rng.integers(0, 60, size=int(rng.integers(5, 50))))
    return str(prefix)


def base_dict(data_path):
    return {
        "model": {"vocab_size": 66, "seq_len": 64, "d_model": 32, "num_layers": 4, "num_heads": 4},
        "data": {"data_path": [data_path], "split": "90,10,0"},
        "optimizer": {"kind": "adamw", "lr": 1e-3, "min_lr": 1e-4},
        "schedule": {"train_iters": 100, "warmup_iters": 10},
        "batch": {"micro_batch": 2, "global_batch": 8},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 1, "precision": "bf16"},
    }


@pytest.fixture
def config_file(tmp_path, dataset):
    def write(values=None, name="run.json"):
        path = tmp_path / name
        path.write_text(json.dumps(values if values is not None else base_dict(dataset)))
        return path
    return write


def error_of(config_file, overrides=(), values=None, world_size=1):
    with pytest.raises(ValueError) as info:
        config = load_config(config_file(values), overrides)
        validate(config, world_size)
    return str(info.value)


def test_load_types_defaults_and_round_trip(config_file, tmp_path):
    config = load_config(config_file())
    assert config.optimizer.betas == (0.9, 0.95) and isinstance(config.optimizer.betas, tuple)
    assert config.checkpoint.save is None and config.seed == 1234
    assert isinstance(config.model, ModelConfig)
    validate(config, world_size=1)
    assert Config.from_dict(json.loads(format_config(config))) == config
    out = tmp_path / "ckpt" / "config.json"
    save_resolved(config, out)
    assert load_config(out) == config
    assert [p.name for p in out.parent.iterdir()] == ["config.json"]  # no temp file left


def test_overrides_are_json_typed_and_applied_in_order(config_file):
    config = load_config(config_file(), [
        "optimizer.lr=3e-4", "optimizer.lr=5e-4", "parallel.activation_checkpointing=true",
        "optimizer.betas=[0.8,0.9]", "checkpoint.save=out/run1", "seed=7",
        "schedule.seq_len_ramp={\"start\": 16, \"steps\": 20}",
        "deepspeed.zero_optimization.overlap_comm=true"])
    assert config.optimizer.lr == 5e-4
    assert config.parallel.activation_checkpointing is True
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.checkpoint.save == "out/run1"
    assert config.seed == 7
    assert config.schedule.seq_len_ramp == {"start": 16, "steps": 20}
    assert config.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    assert parse_override("data.data_path=[\"0.7\", \"a\", \"0.3\", \"b\"]") == (
        ["data", "data_path"], ["0.7", "a", "0.3", "b"])
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("optimizer.lr")


@pytest.mark.parametrize("overrides, expected", [
    (["optimiser.lr=1e-3"], r"unknown section 'optimiser' \(did you mean 'optimizer'\?\)"),
    (["optimizer.lrr=1e-3"], r"optimizer has no field 'lrr' \(did you mean 'lr'\?\)"),
    (["optimizer.lr=fast"], r"optimizer.lr must be a number, got 'fast'"),
    (["parallel.compile=1"], r"parallel.compile must be true or false, got 1"),
    (["batch.micro_batch=2.5"], r"batch.micro_batch must be an integer, got 2.5"),
    (["model.dropout=\"high\""], r"model.dropout must be a number, got 'high'"),
    (["optimizer.kind=sgd"], r"optimizer.kind='sgd' is not one of \['adamw', 'adamw8bit', 'paged_adamw8bit'\]"),
    (["parallel.precision=fp8"], r"parallel.precision='fp8' is not one of \['fp32', 'bf16', 'fp16'\]"),
    (["parallel.zero_stage=4"], r"parallel.zero_stage=4 is not one of \[0, 1, 2, 3\]"),
    (["batch.global_batch=9"], r"batch.global_batch=9 is not divisible by batch.micro_batch=2 x data-parallel size 1"),
    (["parallel.tp=3"], r"parallel.tp=3 does not divide model.num_heads=4"),
    (["parallel.pp=5"], r"parallel.pp=5 is larger than model.num_layers=4"),
    (["parallel.pp=2", "parallel.zero_stage=2"], r"parallel.zero_stage=2 with parallel.pp=2"),
    (["parallel.zero_stage=0"], r"bf16.*zero_stage=0.*use zero_stage >= 1"),
    (["parallel.compile=true", "parallel.zero_stage=3"],
     r"parallel.compile=true with parallel.zero_stage=3: .*use zero_stage <= 2 or compile=false"),
    (["parallel.activation_checkpointing=\"yes\""], r"parallel.activation_checkpointing must be true or false"),
    (["optimizer.min_lr=1e-2"], r"optimizer.min_lr=0.01 must be <= optimizer.lr=0.001"),
    (["schedule.warmup_iters=101"], r"schedule.warmup_iters=101 must be <= schedule.train_iters=100"),
    (["schedule.seq_len_stages=[[16,60],[32,60]]"], r"stage steps sum to 120 > schedule.train_iters=100"),
    (["schedule.seq_len_stages=[[128,10]]"], r"length 128 > model.seq_len=64"),
    (["schedule.seq_len_stages=[[32,10],[16,10]]"], r"seq_len_stages\[1\]: length 16 is shorter"),
    (["schedule.constant_fraction=1.0"], r"schedule.constant_fraction must be in \[0, 1\), got 1.0"),
    (["schedule.constant_fraction=0.95"], r"schedule.warmup_iters=10 ends after the decay ends at .* = 5"),
    (["schedule.lr_decay_unit=epochs"], r"schedule.lr_decay_unit='epochs' is not one of \['steps', 'tokens'\]"),
    (["deepspeed.train_batch_size=64"], r"deepspeed.train_batch_size comes from batch.global_batch"),
    (["deepspeed.zero_optimization.stage=3"], r"deepspeed.zero_optimization.stage comes from parallel.zero_stage"),
    (["data.data_path=[\"0.5\"]"], r"data.data_path: .*holds only a number"),
    (["data.split=\"a,b\""], r"data.split: .*must be a number"),
    (["schedule.seq_len_stages=[[16]]"], r"schedule.seq_len_stages\[0\] must be a list of 2 entries"),
    (["checkpoint.save=3"], r"checkpoint.save must be a string, got 3"),
])
def test_each_error_names_the_field(config_file, overrides, expected):
    assert re.search(expected, error_of(config_file, overrides)), error_of(config_file, overrides)


def test_unknown_json_key_names_file_and_key_path(config_file, dataset):
    values = base_dict(dataset)
    values["optimizer"]["weight_decy"] = 0.1
    path = config_file(values, name="typo.json")
    message = error_of(lambda _: path)
    assert "typo.json" in message and "optimizer: unknown key(s) ['weight_decy']" in message
    assert "did you mean 'weight_decay'" in message
    values = base_dict(dataset)
    values["optimiser"] = values.pop("optimizer")
    assert "unknown top-level key(s) ['optimiser']" in error_of(config_file, values=values)


def test_missing_data_files_name_the_field_and_file(config_file, dataset, tmp_path):
    missing = str(tmp_path / "nowhere" / "corpus")
    message = error_of(config_file, [f"data.data_path=[\"0.5\", \"{dataset}\", \"0.5\", \"{missing}\"]"])
    assert message.startswith("data.data_path:") and f"{missing}.bin does not exist" in message
    (tmp_path / "half.bin").write_bytes(b"")
    message = error_of(config_file, [f"data.data_path=[\"{tmp_path / 'half'}\"]"])
    assert f"{tmp_path / 'half'}.idx does not exist" in message


def test_world_size_must_fit_the_layout(config_file):
    config = load_config(config_file(), ["parallel.tp=2", "parallel.pp=2"])
    assert "world size 6 is not divisible by parallel.tp=2 x parallel.pp=2" in pytest.raises(
        ValueError, validate, config, 6).value.args[0]
    # dp = 8 / 4 = 2: micro 2 x dp 2 = 4 divides 8
    validate(config, 8)
    assert "data-parallel size 8" in pytest.raises(ValueError, validate, config, 32).value.args[0]


def test_deepspeed_derivation(config_file):
    config = load_config(config_file(), ["batch.global_batch=48", "parallel.tp=2",
                                         "optimizer.kind=adamw8bit", "optimizer.clip_grad=0.5",
                                         "deepspeed.zero_optimization.overlap_comm=true",
                                         "deepspeed.steps_per_print=5"])
    ds = deepspeed_config(config, world_size=6)  # dp = 3
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 48 // (2 * 3)
    assert ds["train_batch_size"] == 48
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 3
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["steps_per_print"] == 5  # pass-through wins where the tree does not own the key
    fp16 = deepspeed_config(load_config(config_file(), ["parallel.precision=fp16", "parallel.zero_stage=0"]), 1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling
    assert fp16["bf16"]["enabled"] is False and "zero_allow_untested_optimizer" not in fp16
    # DeepSpeed's ZeRO-0 fp16 optimizer cannot accumulate in fp32 ("unsupported mix"): its default stays
    assert "data_types" not in fp16 and fp16["communication_data_type"] == "fp32"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_runs_accumulate_and_reduce_gradients_in_fp32(config_file, stage):
    """DeepSpeed's default for bf16 sums micro-batch gradients and reduces them in bf16 (8 mantissa bits)."""
    config = load_config(config_file(), ["parallel.precision=bf16", f"parallel.zero_stage={stage}"])
    ds = deepspeed_config(config, world_size=1)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    for key in ("data_types.grad_accum_dtype=bf16", "communication_data_type=bf16"):
        with pytest.raises(ValueError, match="comes from parallel.precision"):
            load_config(config_file(), [f"deepspeed.{key}"])


@pytest.mark.parametrize("overrides", [
    {},
    {"position": "learned", "parallel_residual": False},
    {"tied_embeddings": False, "bias": False},
    {"shared_layernorm": True, "head_dim": 16, "mlp_ratio": 3.0, "vocab_size": 1000},
])
def test_parameter_count_matches_the_model(overrides):
    model = ModelConfig(**{"vocab_size": 300, "seq_len": 32, "d_model": 48, "num_layers": 3,
                           "num_heads": 4, **overrides})
    with torch.device("meta"):
        gpt = GPT(model)
    assert parameter_count(model) == sum(p.numel() for p in gpt.parameters())


def test_data_path_as_command_line_string_and_blend(config_file, dataset):
    config = load_config(config_file(), [f"data.data_path=0.7 {dataset} 0.3 {dataset}"])
    assert config.data.data_path == ("0.7", dataset, "0.3", dataset)
    assert config.data.prefixes == [dataset, dataset]
    validate(config, 1)


@pytest.mark.parametrize("ramp, expected", [
    ('{"start": 16, "end": 64, "steps": 10}', r"seq_len_ramp needs exactly the keys"),
    ('{"start": 12, "steps": 10}', r"seq_len_ramp.start must be a multiple of 8"),
    ('{"start": 16, "steps": 0}', r"schedule.seq_len_ramp.steps must be a positive integer"),
    ('{"start": 128, "steps": 10}', r"length 128 > model.seq_len=64"),
])
def test_seq_len_ramp_errors(config_file, ramp, expected):
    assert re.search(expected, error_of(config_file, [f"schedule.seq_len_ramp={ramp}"]))


def test_loading_a_config_imports_neither_torch_nor_deepspeed(tmp_path, dataset):
    import subprocess
    import sys
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base_dict(dataset)))
    code = ("import sys; from megagpt.config import load_config, validate, deepspeed_config; "
            f"c = load_config({str(path)!r}); validate(c, 1); deepspeed_config(c, 1); "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_byte_order_mark_before_the_config_is_not_data(config_file, tmp_path):
    plain = config_file()
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_config(marked) == load_config(plain)
