"""benchmarks/bench_train.py's accounting, without training: optimizer-state bytes (torch AdamW, bitsandbytes 8-bit,
ZeRO's fp32 masters), the baseline's FLOPs in megagpt's convention, rates, ratios and targets, the cases a run plans,
and the config each megagpt case trains. The end-to-end run is tests/benchmarks/test_gpu_check.py's (slow)."""
import json
import sys
import types

import pytest
import torch
from testing_utils import load_script

bench = load_script("benchmarks/bench_train.py")
worker = load_script("benchmarks/bench_train_worker.py")


def one_step(optimizer, params):
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_torch_adamw_state_is_two_fp32_moments_per_parameter_plus_step_counters():
    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(11))]
    optimizer = torch.optim.AdamW(params)
    one_step(optimizer, params)
    state = worker.optimizer_state_bytes(optimizer)
    n = sum(p.numel() for p in params)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert state["moments"] == 8 * n + steps and state["moments_by_dtype"] == {"float32": 8 * n + steps}
    assert state["fp32_master"] == 0 and state["optimizer"] == "AdamW"


def test_bitsandbytes_8bit_state_is_counted_with_its_quantisation_tables():
    from megagpt.optim.bitsandbytes_import import import_bitsandbytes

    AdamW8bit = import_bitsandbytes().optim.AdamW8bit
    big, small = torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(100))
    optimizer = AdamW8bit([big, small])
    one_step(optimizer, [big, small])
    state = worker.optimizer_state_bytes(optimizer)
    assert state["moments_by_dtype"]["uint8"] == 2 * big.numel()  # two 8-bit moments
    # small tensors keep 32-bit moments; block absmax (one fp32 per 256 values) and the quantile maps are counted
    assert state["moments_by_dtype"]["float32"] >= 2 * 4 * small.numel() + 2 * 4 * big.numel() // 256
    assert 2.0 < (state["moments"] - 8 * small.numel()) / big.numel() < 2.1


def test_zero_wrapper_is_unwrapped_and_its_fp32_masters_counted_apart():
    params = [torch.nn.Parameter(torch.randn(50))]
    inner = torch.optim.AdamW(params)
    one_step(inner, params)
    masters = [torch.zeros(50), torch.zeros(14)]
    wrapper = types.SimpleNamespace(optimizer=inner, single_partition_of_fp32_groups=masters)  # DeepSpeed's shape
    state = worker.optimizer_state_bytes(wrapper)
    assert state["fp32_master"] == 4 * 64
    assert state["moments"] == worker.optimizer_state_bytes(inner)["moments"]
    with pytest.raises(TypeError, match="no torch optimizer"):
        worker.optimizer_state_bytes(types.SimpleNamespace(optimizer=None))


def test_baseline_flops_follow_megagpts_convention_for_the_same_architecture():
    # A GPT-2-shaped megagpt model (learned positions, sequential residual, biases, tied head) has exactly
    # GPT2LMHeadModel's parameters, so both FLOP counts must agree.
    from transformers import GPT2Config, GPT2LMHeadModel

    from megagpt.config import ModelConfig
    from megagpt.metrics import flops_per_token

    ours = ModelConfig(vocab_size=256, seq_len=48, d_model=64, num_layers=3, num_heads=4, position="learned",
                       parallel_residual=False, make_vocab_size_divisible_by=128)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                    bos_token_id=0, eos_token_id=0))
    n = sum(p.numel() for p in hf.parameters())
    got = worker.gpt2_flops_per_token(n, hf.transformer.wpe.weight.numel(), 3, 64, 48)
    assert got == flops_per_token(ours, 48)


def make_args(**kw):
    values = dict(steps=4, grad_accum=2, dry=False, shapes=["gpt127", "gpt1b"], optimizers=["adamw8bit", "adamw"],
                  baseline=True)
    values.update(kw)
    return types.SimpleNamespace(**values)


def finished(name, kind, shape, optimizer, seconds, parameters=1000, moments=2050, seq=512, micro=8):
    return {"name": name, "kind": kind, "shape": shape, "optimizer": optimizer, "status": "ok", "seconds": seconds,
            "parameters": parameters, "flops_per_token": 6e9, "losses": [10.9, 10.8],
            "optimizer_state_bytes": {"moments": moments, "fp32_master": 4000}, "peak_memory_bytes": 3 * 2**30,
            "config": {"model": {"seq_len": seq}, "batch": {"micro_batch": micro}}}


def test_rates_ratios_and_targets():
    args = make_args()
    ours = finished("megagpt_gpt1b_adamw8bit", "megagpt", "gpt1b", "adamw8bit", seconds=2.0)
    hf = finished("hf_gpt1b", "hf", "gpt1b", "adamw_fused_torch", seconds=4.0, moments=8000)
    failed = {"name": "megagpt_gpt1b_adamw", "kind": "megagpt", "shape": "gpt1b", "optimizer": "adamw",
              "status": "timeout", "reason": "killed after 300 s"}
    for case in (ours, hf, failed):
        bench.add_rates(case, args, peak_tflops=800.0)
    tokens = 4 * 2 * 8 * 512
    assert ours["tokens_per_sec"] == tokens / 2.0
    assert ours["tflops_per_device"] == pytest.approx(tokens / 2.0 * 6e9 / 1e12)
    assert ours["mfu_vs_989"] == pytest.approx(ours["tflops_per_device"] / 989.0)
    assert ours["mfu_vs_measured_peak"] == pytest.approx(ours["tflops_per_device"] / 800.0)
    assert (ours["moment_bytes_per_param"], ours["master_bytes_per_param"]) == (2.05, 4.0)
    assert ours["losses_finite"] and "tokens_per_sec" not in failed
    rows = bench.comparisons([ours, hf, failed])
    assert set(rows) == {"megagpt_gpt1b_adamw8bit"}  # failed cases and the baseline get no row
    row = rows["megagpt_gpt1b_adamw8bit"]
    assert row["tokens_per_sec_vs_hf"] == pytest.approx(2.0)
    assert row["target_met"] == {"mfu_vs_989": ours["mfu_vs_989"] >= 0.5, "tokens_per_sec_vs_hf": True,
                                 "adamw8bit_moment_bytes_per_param": True}
    table = bench.format_table({"device": "test", "note": None, "cases": [ours, hf, failed], "comparisons": rows})
    assert "2.00x" in table and "killed after 300 s" in table and " 3.0 " in table


def test_planned_cases_and_the_dry_pairing():
    names = [c["name"] for c in bench.planned_cases(make_args())]
    assert names == ["megagpt_gpt127_adamw8bit", "hf_gpt127", "megagpt_gpt127_adamw",
                     "megagpt_gpt1b_adamw8bit", "hf_gpt1b", "megagpt_gpt1b_adamw"]
    assert [c["name"] for c in bench.planned_cases(make_args(baseline=False, shapes=["gpt1b"]))] == [
        "megagpt_gpt1b_adamw8bit", "megagpt_gpt1b_adamw"]
    dry = [c["name"] for c in bench.planned_cases(make_args(dry=True))]
    assert dry == ["megagpt_gpt127_adamw8bit", "hf_gpt127", "megagpt_gpt1b_adamw", "hf_gpt1b"]


def test_worker_commands():
    args = make_args(micro_batch=None, warmup_steps=3, overrides=["optimizer.lr=1e-4"])
    command = bench.worker_command(args, "megagpt", "r.json", 29601, "gpt1b", "adamw8bit")
    assert command[1:7] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29601"]
    assert command[-3].endswith("bench_train_worker.py") and command[-2] == "--spec"
    assert json.loads(command[-1]) == {"kind": "megagpt", "shape": "gpt1b", "optimizer": "adamw8bit", "steps": 4,
                                       "warmup_steps": 3, "grad_accum": 2, "micro_batch": None, "dry": False,
                                       "overrides": ["optimizer.lr=1e-4"], "result": "r.json"}
    baseline = bench.worker_command(args, "hf", "h.json", 0, "gpt1b", "adamw_fused_torch")
    assert baseline[0] == sys.executable and baseline[1].endswith("bench_train_worker.py")


def test_megagpt_case_config():
    args = types.SimpleNamespace(dry=False, micro_batch=None, grad_accum=3, overrides=["optimizer.lr=1e-4"])
    config = worker.load_shape_config(args, "gpt1b", "adamw8bit")
    assert (config.parallel.precision, config.parallel.zero_stage, config.optimizer.kind) == ("bf16", 1, "adamw8bit")
    assert not config.parallel.activation_checkpointing and config.schedule.seq_len_stages is None
    assert config.batch.micro_batch == 8 and config.batch.global_batch == 24  # the config's micro batch x 3
    assert config.optimizer.lr == 1e-4 and config.model.d_model == 2048
    dry = worker.load_shape_config(types.SimpleNamespace(dry=True, micro_batch=None, grad_accum=2, overrides=[]),
                                   "gpt1b")
    assert dry.model.attention_backend == "triton" and dry.model.d_model == 64 and dry.model.attention_width == 64


@pytest.mark.parametrize("argv, message", [(["--shapes", "nope"], "configs/nope.json does not exist"),
                                           (["--steps", "0"], "--steps must be >= 1")])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--output", "x", *argv])
    assert message in capsys.readouterr().err
