"""megagpt/convert + tools/convert_checkpoint.py: universal (layout-independent) checkpoints.

A checkpoint written with one (tp, dp) layout, ZeRO stage and optimizer is consolidated into full per-parameter
tensors and resumed in another layout: the loss curve continues within float-reordering noise (fp32 AdamW) or
8-bit re-quantisation noise (AdamW8bit); the same layout round trips exactly, 8-bit codes included."""
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megagpt.convert import (Universal, consolidate, is_universal_dir, load_universal, param_layout, save_universal,
                             tp_slice)
from testing_utils import REPO, SCRIPT_PYTHONPATH, losses, read_jsonl, run_training

CONVERT = str(REPO / "tools" / "convert_checkpoint.py")


# --- split dims, format, atomicity (no training) ---

@pytest.mark.parametrize("overrides", [
    {},
    {"position": "learned", "tied_embeddings": False, "parallel_residual": False, "bias": False},
    {"parallel_residual": True, "shared_layernorm": True},
], ids=["tiny-alibi-tied", "learned-untied-nobias", "shared-layernorm"])
def test_split_dims_without_process_groups_match_the_tensor_parallel_layers(overrides):
    from megagpt.config import ModelConfig
    from megagpt.model import GPT
    from megagpt.parallel import TensorParallelLayerFactory

    config = ModelConfig.from_dict({"vocab_size": 64, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
                                    "make_vocab_size_divisible_by": 64, **overrides})
    with torch.device("meta"):
        model = GPT(config, TensorParallelLayerFactory(None, vocab_size=config.vocab_size))
    real = {name: (p.shape, p.tp_split_dim if hasattr(p, "tp_split_dim") else None)
            for name, p in model.named_parameters()}
    assert param_layout(config) == real
    assert {d for _, d in real.values()} == {0, 1, None}


def _synthetic(eight_bit: bool = True) -> Universal:
    generator = torch.Generator().manual_seed(0)
    weights = {"layers.0.word_embeddings.weight": torch.randn(8, 4, generator=generator),
               "layers.1.mlp.fc.weight": torch.randn(6, 4, generator=generator)}
    moments = {name: {"state1": torch.randn(w.shape, generator=generator), "state2": torch.rand(w.shape)}
               for name, w in weights.items()}
    if eight_bit:
        moments["layers.1.mlp.fc.weight"].update(absmax1=torch.ones(6, 4), absmax2=torch.ones(6, 4))
    return Universal(config={"model": {"d_model": 4}}, weights=weights, moments=moments,
                     split_dims={"layers.0.word_embeddings.weight": 0, "layers.1.mlp.fc.weight": 0},
                     optimizer="bitsandbytes", step=7.0, client_state={"step": 7, "loader": {"consumed_samples": 56}},
                     codes={"qmap1": torch.linspace(-1, 1, 256), "qmap2": torch.linspace(0, 1, 256)},
                     source={"layout": "synthetic"})


def test_save_and_load_round_trip_fp32_exactly_and_bf16_weights_rounded(tmp_path):
    universal = _synthetic()
    save_universal(universal, tmp_path / "u")
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    back = load_universal(tmp_path / "u")
    for name, weight in universal.weights.items():
        assert torch.equal(back.weights[name], weight)
        assert back.moments[name].keys() == universal.moments[name].keys()
        assert all(torch.equal(back.moments[name][k], v) for k, v in universal.moments[name].items())
    assert back.eight_bit == ["layers.1.mlp.fc.weight"] and back.step == 7.0 and back.optimizer == "bitsandbytes"
    assert back.client_state == universal.client_state and back.split_dims == universal.split_dims
    assert all(torch.equal(back.codes[k], universal.codes[k]) for k in ("qmap1", "qmap2"))

    save_universal(universal, tmp_path / "u16", dtype="bf16")
    half = load_universal(tmp_path / "u16")
    assert half.weights_dtype == "bf16"
    for name, weight in universal.weights.items():
        assert torch.equal(half.weights[name], weight.bfloat16().float())
        assert torch.equal(half.moments[name]["state1"], universal.moments[name]["state1"])  # moments stay fp32


def test_an_existing_output_is_refused_and_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "u"
    save_universal(_synthetic(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = _synthetic()
    changed.step = 8.0
    with pytest.raises(FileExistsError, match="overwrite"):
        save_universal(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    save_universal(changed, out, overwrite=True)
    assert load_universal(out).step == 8.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]  # no .partial, no .old left behind

    result = subprocess.run([sys.executable, CONVERT, "--load", str(tmp_path), "--output", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "exists; pass --overwrite" in result.stderr


def test_an_interrupted_save_never_looks_finished(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []
    real_save = safetensors.torch.save_file

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt  # killed half way through
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_universal(_synthetic(), tmp_path / "u")
    assert not (tmp_path / "u").exists()
    assert (tmp_path / "u.partial" / "model.safetensors").exists()
    assert not is_universal_dir(tmp_path / "u.partial")  # state.json is written last
    with pytest.raises(ValueError, match="not a complete megagpt universal checkpoint"):
        load_universal(tmp_path / "u.partial")
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_universal(_synthetic(), tmp_path / "u")  # a stale .partial is cleared, not mistaken for output
    assert is_universal_dir(tmp_path / "u") and not (tmp_path / "u.partial").exists()


def test_replicated_parameters_must_agree_across_tensor_parallel_ranks():
    from megagpt.convert.readers import ParamShard
    from megagpt.convert.universal import _merge

    a = ParamShard(torch.ones(4), {"exp_avg": torch.zeros(4)}, 1.0)
    b = ParamShard(torch.ones(4) * 2, {"exp_avg": torch.ones(4)}, 1.0)
    full, moments = _merge("w", [a, b], 0, {})
    assert torch.equal(full, torch.tensor([1.0] * 4 + [2.0] * 4)) and moments["exp_avg"].shape == (8,)
    with pytest.raises(ValueError, match="replicated parameter w differs between tensor-parallel ranks 0 and 1"):
        _merge("w", [a, b], None, {})
    notes = {}
    _merge("w", [a, ParamShard(torch.ones(4) + 1e-5, {"exp_avg": torch.zeros(4)}, 1.0)], None, notes)
    assert list(notes) == ["w"]  # within noise: kept rank 0's copy, recorded


def test_incomplete_pipeline_checkpoints_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"parallel": {"pp": 2, "tp": 2, "zero_stage": 1}}))
    for name in ("layer_00-model_00-model_states.pt", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="parallel.pp=2 but mp_rank_02_model_states.pt, mp_rank_03_model_states.pt "
                                         "missing"):
        consolidate(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"parallel": {"pp": 2, "tp": 2, "zero_stage": 0}}))
    with pytest.raises(ValueError, match="parallel.pp=2 under ZeRO-0"):
        consolidate(tmp_path)


def test_pipeline_parameter_names_map_onto_the_gpts():
    """DeepSpeed names layer ``i`` of a PipelineModule ``{i}.`` and a tied module ``tied_modules.{key}.``; the GPT
    builds a tied module once, at its first entry (the real names are checked against a pipeline checkpoint by
    test_tp2_pp2_checkpoint_resumes_in_other_layouts)."""
    from megagpt.config import ModelConfig
    from megagpt.convert import PipelineNames

    base = {"vocab_size": 64, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
            "make_vocab_size_divisible_by": 64}
    tied = PipelineNames.for_model(ModelConfig.from_dict(base))
    assert tied.tied_layer == {"embedding": 0} and tied.layer_of == {0: 0, 1: 1, 2: 2, 3: 3}
    assert tied.to_gpt("tied_modules.embedding.word_embeddings.weight") == "layers.0.word_embeddings.weight"
    assert tied.to_gpt("2.attention.qkv.weight") == "layers.2.attention.qkv.weight"
    assert tied.to_gpt("3.weight") == "layers.3.weight"
    untied = PipelineNames.for_model(ModelConfig.from_dict({**base, "tied_embeddings": False}))
    assert untied.tied_layer == {} and untied.to_gpt("4.weight") == "layers.4.weight"
    # a tied entry in the middle: the GPT's indices close up behind the skipped copy
    middle = PipelineNames(["a", None, "a", None])
    assert middle.to_gpt("3.w") == "layers.2.w" and middle.to_gpt("tied_modules.a.w") == "layers.0.w"
    for bad in ("4.weight", "tied_modules.other.weight", "layers.0.weight", "3"):
        with pytest.raises(ValueError, match="does not map onto"):
            tied.to_gpt(bad)


# --- resuming in another layout: loss curves ---

def _whole_and_stopped(root, name, common, launcher, port, ranks=2):
    """The uninterrupted 12-step run and one stopped after step 6, under the same layout."""
    run_training(launcher, [*common, "--save", str(root / f"{name}_whole")], port, ranks=ranks)
    run_training(launcher, [*common, "--save", str(root / f"{name}_half"), "--exit-interval", "6"], port + 1,
                 ranks=ranks)
    whole = read_jsonl(root / f"{name}_whole" / "metrics.jsonl")
    assert losses(read_jsonl(root / f"{name}_half" / "metrics.jsonl")) == losses(whole)[:6]
    return whole


def _convert(source, output, *extra):
    result = subprocess.run([sys.executable, CONVERT, "--load", str(source), "--to", "consolidated", "--output",
                             str(output), *extra],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def _continues(whole, resumed_dir, tolerance):
    resumed = read_jsonl(resumed_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == list(range(7, 13))
    np.testing.assert_allclose(losses(resumed), losses(whole)[6:], rtol=0, atol=tolerance)
    np.testing.assert_allclose(losses(resumed, "valid_loss"), losses(whole, "valid_loss")[-1:], rtol=0, atol=tolerance)
    return resumed


@pytest.mark.slow
@pytest.mark.parametrize("kind, tolerance, port", [("adamw", 1e-4, 29780), ("adamw8bit", 5e-3, 29785)])
def test_tp2_checkpoint_resumes_as_tp1_with_dp2_and_dp1(tiny_run, kind, tolerance, port):
    """TP=2 ZeRO-1 stopped at step 6 -> tools/convert_checkpoint.py -> TP=1 x DP=2 (deepspeed) and TP=1 x DP=1
    (python); and the same TP=2 save directory resumed with tp=1 directly (converted in memory)."""
    root, config = tiny_run
    name = f"uc_tp2_{kind}"
    common = ["--config", str(config), "--train-iters", "12", "--set", "parallel.zero_stage=1",
              "--set", f"optimizer.kind={kind}"]
    whole = _whole_and_stopped(root, name, [*common, "--set", "parallel.tp=2"], "deepspeed", port)
    summary = _convert(root / f"{name}_half", root / f"{name}_universal")
    assert "27 parameters" in summary and "read from tp=2 pp=1 dp=1 ZeRO-1 fp32" in summary
    assert ("8 parameters with 8-bit moments" in summary) == (kind == "adamw8bit")

    result = run_training("deepspeed", [*common, "--load", str(root / f"{name}_universal"),
                                        "--save", str(root / f"{name}_dp2")], port + 2)
    assert "resumed from universal checkpoint" in result.stdout and "at step 6" in result.stdout
    _continues(whole, root / f"{name}_dp2", tolerance)
    run_training("python", [*common, "--load", str(root / f"{name}_universal"), "--save", str(root / f"{name}_dp1")],
                 port + 3)
    dp1 = _continues(whole, root / f"{name}_dp1", tolerance)

    automatic = root / f"{name}_automatic"
    shutil.copytree(root / f"{name}_half", automatic)
    result = run_training("python", [*common, "--save", str(automatic)], port + 4)
    assert "converted in memory on every rank (parallel.tp=2 -> 1)" in result.stdout
    assert losses(read_jsonl(automatic / "metrics.jsonl"))[6:] == losses(dp1)  # the same numbers as via the files


@pytest.mark.slow
def test_dp2_checkpoint_resumes_as_tp2(tiny_run):
    root, config = tiny_run
    common = ["--config", str(config), "--train-iters", "12", "--set", "parallel.zero_stage=1"]
    whole = _whole_and_stopped(root, "uc_dp2", common, "deepspeed", 29790)
    _convert(root / "uc_dp2_half" / "step6", root / "uc_dp2_universal")
    run_training("deepspeed", [*common, "--set", "parallel.tp=2", "--load", str(root / "uc_dp2_universal"),
                               "--save", str(root / "uc_dp2_tp2")], 29792)
    _continues(whole, root / "uc_dp2_tp2", 1e-4)


@pytest.mark.slow
def test_tp2_pp2_checkpoint_resumes_in_other_layouts(tiny_run):
    """TP=2 x PP=2 (4 ranks, fp32 AdamW, ZeRO-1, across a seq-len stage) stopped at step 6 continues within 1e-4
    of the uninterrupted run as TP=1 x DP=2 (tools/convert_checkpoint.py), as TP=2 x DP=2 (the same --save,
    converted in memory) and, back into a pipeline, as PP=2 x DP=2 (from the universal checkpoint)."""
    root, config = tiny_run
    common = ["--config", str(config), "--train-iters", "12", "--set", "parallel.zero_stage=1",
              "--set", "schedule.seq_len_stages=[[16, 5]]"]
    tp2pp2 = [*common, "--set", "parallel.tp=2", "--set", "parallel.pp=2"]
    run_training("deepspeed", [*tp2pp2, "--save", str(root / "up_whole")], 29791, ranks=4, timeout=300)
    run_training("deepspeed", [*tp2pp2, "--save", str(root / "up_half"), "--exit-interval", "6"], 29794, ranks=4,
                 timeout=300)
    whole = read_jsonl(root / "up_whole" / "metrics.jsonl")
    assert [r["seq_len"] for r in whole if "loss" in r] == [16] * 5 + [32] * 7
    assert losses(read_jsonl(root / "up_half" / "metrics.jsonl")) == losses(whole)[:6]
    # DeepSpeed's pipeline files: a layer file per layer and tp rank, client state and ZeRO shards per (stage, tp)
    step6 = root / "up_half" / "step6"
    assert len(list(step6.glob("layer_*-model_states.pt"))) == 8 and len(list(step6.glob("zero_pp_rank_*"))) == 4

    summary = _convert(root / "up_half", root / "up_universal")
    assert "27 parameters" in summary and "read from tp=2 pp=2 dp=1 ZeRO-1 fp32 adamw" in summary
    universal = load_universal(root / "up_universal")
    for path in step6.glob("layer_*-model_states.pt"):  # the layer files hold the merged masters' slices
        layer, tp_rank = (int(part.split("_")[1]) for part in path.name.split("-")[:2])
        for key, value in torch.load(path, weights_only=False).items():
            name = f"layers.{layer}.{key}"
            assert torch.equal(tp_slice(universal.weights[name], universal.split_dims[name], tp_rank, 2), value), name

    result = run_training("deepspeed", [*common, "--load", str(root / "up_universal"), "--save", str(root / "up_tp1")],
                          29791)
    assert "resumed from universal checkpoint" in result.stdout
    _continues(whole, root / "up_tp1", 1e-4)

    automatic = root / "up_tp2"
    shutil.copytree(root / "up_half", automatic)
    result = run_training("deepspeed", [*common, "--set", "parallel.tp=2", "--save", str(automatic)], 29794, ranks=4,
                          timeout=300)
    assert "converted in memory on every rank (parallel.pp=2 -> 1)" in result.stdout
    resumed = read_jsonl(automatic / "metrics.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 13))  # steps 1-6 from the stopped run
    np.testing.assert_allclose(losses(resumed)[6:], losses(whole)[6:], rtol=0, atol=1e-4)
    np.testing.assert_allclose(losses(resumed, "valid_loss"), losses(whole, "valid_loss"), rtol=0, atol=1e-4)

    result = run_training("deepspeed", [*common, "--set", "parallel.pp=2", "--load", str(root / "up_universal"),
                                        "--save", str(root / "up_pp2")], 29791, ranks=4, timeout=300)
    assert "resumed from universal checkpoint" in result.stdout
    _continues(whole, root / "up_pp2", 1e-4)


@pytest.mark.slow
def test_merged_tensor_parallel_state_equals_the_one_rank_runs(tiny_run):
    """The TP=2 checkpoint at step 6 (written by the test above), consolidated, against the same steps on one
    rank: concatenation order and dims are right when the full tensors agree to float-reordering noise."""
    root, config = tiny_run
    tp2 = root / "uc_tp2_adamw_half"
    if not (tp2 / "latest").exists():
        pytest.skip("needs test_tp2_checkpoint_resumes_as_tp1_with_dp2_and_dp1[adamw]")
    run_training("python", ["--config", str(config), "--train-iters", "12", "--set", "parallel.zero_stage=1",
                            "--exit-interval", "6", "--save", str(root / "uc_one_half")], 29793)
    merged, one = consolidate(tp2), consolidate(root / "uc_one_half")
    assert merged.weights.keys() == one.weights.keys() and merged.step == one.step == 6
    for name, weight in one.weights.items():
        # A wrong merge (order, dim) is off by the weights' own size (~0.02). Within 1e-6 except where a gradient
        # is only float noise (the key third of a QKV bias has an analytically zero gradient): Adam's
        # normalisation turns that noise into steps of up to lr, so those few elements agree to 1e-5 only.
        diff = (merged.weights[name] - weight).abs()
        assert diff.max() <= 1e-5, (name, diff.max())
        if not name.endswith("qkv.bias"):
            assert (diff > 1e-6).float().mean() <= 1e-3, (name, (diff > 1e-6).sum())
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(merged.moments[name][key], one.moments[name][key], rtol=0, atol=1e-7,
                                       msg=f"{name} {key}")
    assert {k: v for k, v in merged.client_state.items() if k != "config"} == {
        k: v for k, v in one.client_state.items() if k != "config"}


# --- same layout: universal -> resume -> save -> consolidate is exact ---

ROUND_TRIP = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from pathlib import Path
    from megagpt.checkpoint import save_checkpoint
    from megagpt.config import Config
    from megagpt.convert import consolidate, load_into_engine
    from testing_utils import assert_same_optimizer_state
    from megagpt.engine import build_engine, build_process_groups, init_distributed, launch_from_env

    save, tp, stage, precision, kind = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    config = Config.from_dict({
        "model": {"vocab_size": 512, "seq_len": 16, "d_model": 64, "num_layers": 2, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 3}, "optimizer": {"kind": kind, "lr": 1e-2},
        "batch": {"micro_batch": 2, "global_batch": 2 * int(os.environ.get("WORLD_SIZE", "1")) // tp},
        "parallel": {"tp": tp, "zero_stage": stage, "precision": precision}, "checkpoint": {"save": str(save)}})
    launch = launch_from_env("cpu")
    init_distributed(launch)
    groups = build_process_groups(config, launch)
    trained = build_engine(config, launch, groups)
    generator = torch.Generator().manual_seed(groups.dp_rank)  # the ranks of a tp group see the same rows
    for _ in range(3):
        rows = torch.randint(0, 512, (2, 17), generator=generator)
        trained.backward(trained.module.loss(trained(rows[:, :-1]), rows[:, 1:]))
        trained.step()
    save_checkpoint(trained, save, 3, {"megagpt": {"step": 3}}, config, launch.rank)
    universal = consolidate(save)

    fresh = build_engine(config, launch, groups)
    load_into_engine(fresh, universal)
    for (name, a), b in zip(trained.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a, b), f"module weight {name} differs"
    checked, dtypes = assert_same_optimizer_state(trained, fresh, stage)

    save_checkpoint(fresh, save, 4, {"megagpt": {"step": 3}}, config, launch.rank)  # the same state as step 3
    again = consolidate(save / "step4")
    for name, weight in universal.weights.items():
        assert torch.equal(again.weights[name], weight), name
        assert again.moments[name].keys() == universal.moments[name].keys(), name
        for key, value in universal.moments[name].items():
            assert torch.equal(again.moments[name][key], value), (name, key)
    assert again.step == universal.step == 3 and again.eight_bit == universal.eight_bit
    print(f"rank {launch.rank}: {checked} state tensors equal; state dtypes {sorted(dtypes)}; "
          f"{len(universal.eight_bit)} 8-bit parameters", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("launcher, tp, stage, precision, kind, port", [
    ("python", 1, 0, "fp32", "adamw8bit", 29795),
    ("python", 1, 1, "fp32", "adamw8bit", 29796),
    ("torchrun", 2, 1, "bf16", "adamw8bit", 29797),
    ("torchrun", 1, 2, "bf16", "adamw8bit", 29798),
    ("torchrun", 2, 0, "fp32", "adamw", 29799),
], ids=["1rank-zero0-8bit", "1rank-zero1-8bit", "tp2-zero1-bf16-8bit", "dp2-zero2-bf16-8bit", "tp2-zero0-adamw"])
def test_same_layout_round_trip_through_universal_is_exact(tmp_path, launcher, tp, stage, precision, kind, port):
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    result = run_training(launcher, [str(tmp_path / "save"), str(tp), str(stage), precision, kind], port,
                          script=str(script), timeout=240, env={"PYTHONPATH": SCRIPT_PYTHONPATH})
    ranks = 1 if launcher == "python" else 2
    for rank in range(ranks):
        assert f"rank {rank}: " in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    if kind == "adamw8bit":  # 8-bit moments for the matrices, 32-bit for the embedding and small tensors
        assert "'torch.float32', 'torch.uint8'" in result.stdout
        assert " 0 8-bit parameters" not in result.stdout
