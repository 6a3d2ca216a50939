"""build_optimizer and keep_embedding_state_32bit on CPU (bitsandbytes 8-bit state runs on CPU)."""
import contextlib
import copy
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from megagpt.config import ModelConfig
from megagpt.model import GPT, language_model_loss
from megagpt.optim import build_optimizer, build_param_groups, keep_embedding_state_32bit
from megagpt.optim.bitsandbytes_import import import_bitsandbytes
from testing_utils import REPO

bnb = import_bitsandbytes()


@pytest.fixture(autouse=True)
def fresh_global_optim_manager():
    # GlobalOptimManager is a process-wide singleton keyed by id(tensor): stale entries from
    # another test could match a new tensor that reuses a freed id.
    bnb.optim.GlobalOptimManager._instance = None
    yield
    bnb.optim.GlobalOptimManager._instance = None


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # padded vocab 128 x d_model 32 = 4096 elements: at bitsandbytes' min_8bit_size, so the
    # embedding would get 8-bit state if nothing kept it at 32 bits; so does each MLP fc weight.
    return GPT(ModelConfig(vocab_size=100, seq_len=16, d_model=32, num_layers=2, num_heads=4))


def fixed_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(seed))


def train_steps(model, optimizer, tokens, steps):
    losses = []
    for _ in range(steps):
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def adamw8bit(model):
    optimizer = build_optimizer(build_param_groups(model, 0.1), "adamw8bit", lr=3e-3)
    keep_embedding_state_32bit(optimizer)
    return optimizer


def test_adamw8bit_trains_and_keeps_embedding_state_32bit():
    model = tiny_gpt()
    optimizer = adamw8bit(model)
    losses = train_steps(model, optimizer, fixed_batch(), 30)
    # Memorising one batch: from ~ln(100) = 4.6 the loss must fall clearly (not just noise).
    assert losses[-1] < losses[0] - 1.0, losses
    word_embedding = model.embedding.word_embeddings.weight
    fc_weight = model.blocks[0].mlp.fc.weight
    assert optimizer.state[word_embedding]["state1"].dtype == torch.float32
    assert optimizer.state[word_embedding]["state2"].dtype == torch.float32
    assert optimizer.state[fc_weight]["state1"].dtype == torch.uint8
    assert optimizer.state[fc_weight]["state2"].dtype == torch.uint8


def test_without_override_the_embedding_state_is_8bit():
    # Control for the test above: the 32-bit state comes from keep_embedding_state_32bit.
    model = tiny_gpt()
    optimizer = build_optimizer(build_param_groups(model, 0.1), "adamw8bit", lr=1e-3)
    train_steps(model, optimizer, fixed_batch(), 1)
    assert optimizer.state[model.embedding.word_embeddings.weight]["state1"].dtype == torch.uint8


def test_flat_group_partitions_like_zero_get_32bit_state():
    # ZeRO-1/2 hands the optimizer one flat fp32 tensor per group (this rank's partition) and
    # keeps the group's other keys; built here by hand the same way.
    model = tiny_gpt()
    groups = build_param_groups(model, 0.1)
    flat_groups = [dict(g, params=[nn.Parameter(torch.cat([p.detach().flatten() for p in g["params"]]))])
                   for g in groups]
    # min_8bit_size=1: the small no_decay partition would otherwise be 32-bit for its size alone.
    optimizer = build_optimizer(flat_groups, "adamw8bit", lr=1e-3, min_8bit_size=1)
    assert keep_embedding_state_32bit(optimizer) == 1
    for group in optimizer.param_groups:
        group["params"][0].grad = torch.randn_like(group["params"][0])
    optimizer.step()
    dtypes = {g["name"]: optimizer.state[g["params"][0]]["state1"].dtype for g in optimizer.param_groups}
    assert dtypes == {"decay": torch.uint8, "no_decay": torch.uint8, "embedding": torch.float32}


def test_adamw8bit_state_dict_round_trip_is_bitwise():
    tokens = fixed_batch()
    model = tiny_gpt()
    optimizer = adamw8bit(model)
    train_steps(model, optimizer, tokens, 3)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model = tiny_gpt(seed=123)  # different init: everything must come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer = adamw8bit(resumed_model)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])

    original_losses = train_steps(model, optimizer, tokens, 3)
    resumed_losses = train_steps(resumed_model, resumed_optimizer, tokens, 3)
    assert original_losses == resumed_losses
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["adamw", "paged_adamw8bit"])
def test_other_kinds_build_and_step_on_cpu(kind):
    model = tiny_gpt()
    groups = build_param_groups(model, 0.1)
    # Paging needs CUDA; on CPU bitsandbytes warns and keeps the state in ordinary memory.
    with pytest.warns(UserWarning, match="Paged") if kind == "paged_adamw8bit" else contextlib.nullcontext():
        optimizer = build_optimizer(groups, kind, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu")
        before = copy.deepcopy(model.state_dict())
        train_steps(model, optimizer, fixed_batch(), 1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    changed = [not torch.equal(before[n], p) for n, p in model.state_dict().items()]
    assert all(changed)
    if kind == "adamw":
        assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]


def test_bad_arguments_raise():
    model = tiny_gpt()
    groups = build_param_groups(model, 0.1)
    with pytest.raises(ValueError, match="kind='sgd'"):
        build_optimizer(groups, "sgd", lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(groups, "adamw", lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(TypeError, match="bitsandbytes"):
        keep_embedding_state_32bit(build_optimizer(groups, "adamw", lr=1e-3))
    optimizer = build_optimizer(groups, "adamw8bit", lr=1e-3)
    with pytest.raises(ValueError, match="'emb'.*groups present"):
        keep_embedding_state_32bit(optimizer, group_name="emb")
    train_steps(model, optimizer, fixed_batch(), 1)
    with pytest.raises(ValueError, match="before the first optimizer step"):
        keep_embedding_state_32bit(optimizer)


_ZERO_SCRIPT = r"""
import json, sys, torch
import deepspeed
# The shared-memory comm op is never used by training and takes ~60 s to JIT-build (PITFALLS.md).
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *args, **kwargs: None
deepspeed.init_distributed(dist_backend="gloo")
from megagpt.config import ModelConfig
from megagpt.model import GPT, language_model_loss
from megagpt.optim import build_optimizer, build_param_groups, keep_embedding_state_32bit
from megagpt.optim.bitsandbytes_import import import_bitsandbytes
stage, mark = int(sys.argv[1]), sys.argv[2] == "mark"
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=100, seq_len=16, d_model=32, num_layers=2, num_heads=4))
optimizer = build_optimizer(build_param_groups(model, 0.1), "adamw8bit", lr=1e-3, min_8bit_size=1)
config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
          "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
if mark:
    keep_embedding_state_32bit(engine.optimizer)
tokens = torch.randint(0, 100, (4, 17))
engine.backward(language_model_loss(engine(tokens[:, :-1]), tokens[:, 1:]))
engine.step()
if stage == 3:  # ZeRO-3 empties the groups' params: its flat partitions, by the group each belongs to
    partitions = {g["name"]: [flat for sub, flat in enumerate(engine.optimizer.fp32_partitioned_groups_flat)
                              if engine.optimizer.sub_group_to_group_id[sub] == i]
                  for i, g in enumerate(optimizer.param_groups)}
else:
    partitions = {g["name"]: g["params"] for g in optimizer.param_groups}
print("DTYPES", json.dumps({name: [str(optimizer.state[p]["state1"].dtype) for p in params]
                            for name, params in partitions.items()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_embedding_partition_state_is_32bit_under_deepspeed_zero(stage, tmp_path):
    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # this checkout's megagpt
    dtypes = {}
    for mark in ("mark", "no_mark"):
        result = subprocess.run([sys.executable, "-c", _ZERO_SCRIPT, str(stage), mark], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        line = [ln for ln in result.stdout.splitlines() if ln.startswith("DTYPES ")][-1]
        dtypes[mark] = json.loads(line[len("DTYPES "):])
    # ZeRO gives each group one flat fp32 partition; only the marked embedding one is 32-bit.
    assert dtypes["mark"] == {"decay": ["torch.uint8"], "no_decay": ["torch.uint8"], "embedding": ["torch.float32"]}
    # Control: without the call ZeRO's flat partition gets 8-bit state like everything else.
    assert dtypes["no_mark"]["embedding"] == ["torch.uint8"]


def test_loaded_state_of_a_paged_optimizer_goes_back_into_paged_buffers(monkeypatch):
    """``load_state_dict`` leaves plain device tensors behind; bitsandbytes pages only CUDA tensors (CPU falls
    back), so the device here is ``meta`` and ``get_state_buffer`` hands out buffers marked as paged the way
    ``bitsandbytes.functional.get_paged`` marks them."""
    from megagpt.optim import restore_paged_state

    param = torch.nn.Parameter(torch.zeros(300, 400, device="meta"))
    optimizer = build_optimizer([{"params": [param], "weight_decay": 0.0, "name": "decay"}], "paged_adamw8bit",
                                lr=1e-3)
    loaded = {key: torch.empty(300, 400, dtype=torch.uint8, device="meta") for key in ("state1", "state2")}
    absmax = torch.empty(470, device="meta")
    optimizer.state[param] = {**loaded, "absmax1": absmax, "step": 7}
    handed_out = []

    def paged_buffer(value, dtype):
        buffer = torch.empty_like(value, dtype=dtype)
        buffer.is_paged = True
        handed_out.append(buffer)
        return buffer

    monkeypatch.setattr(optimizer, "get_state_buffer", paged_buffer)
    assert restore_paged_state(optimizer) == 2
    state = optimizer.state[param]
    assert state["state1"] is handed_out[0] and state["state2"] is handed_out[1]
    assert state["state1"].dtype == torch.uint8
    assert state["absmax1"] is absmax and state["step"] == 7  # bitsandbytes never pages these
    assert restore_paged_state(optimizer) == 0  # already paged
    plain = build_optimizer([{"params": [param], "weight_decay": 0.0, "name": "decay"}], "adamw8bit", lr=1e-3)
    assert restore_paged_state(plain) == 0 and restore_paged_state(torch.optim.SGD([param], lr=1.0)) == 0
