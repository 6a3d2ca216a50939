"""Tensor-parallel collectives, layers and factory against their single-device references.

The checks below run twice:
- in the pytest process with ``group=None`` (tp = 1, no torch.distributed): the layers must reduce to
  the plain ones (fast, no subprocess);
- under ``torchrun`` with 2 CPU ranks on gloo (this file is also the worker script) forming one TP
  group of 2, and with 4 ranks forming two TP groups {0,1}, {2,3} fed with different data: a
  collective that used the world group instead of the given one would mix the groups and fail.

Each check builds the plain reference on every rank (same seed, same data), the parallel version, and
compares outputs, input gradients and each rank's parameter gradients with the matching slice of the
reference. Tolerances (fp32): rtol=1e-5, atol=1e-6 for single layers and the loss; rtol=1e-4, atol=1e-6
for a whole GPT (two blocks of sums in another order); exact for initial weights, embedding lookups and
gathered logits (no arithmetic differs); bf16 logits: loss at fp32 tolerance (it is computed in fp32 from
the same bf16 values), gradients at rtol=atol=1e-2 (rounded to bf16).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.config import ModelConfig
from megagpt.model import GPT, LayerFactory, language_model_loss
from megagpt.parallel import (
    ColumnParallelLinear, RowParallelLinear, TensorParallelLayerFactory, VocabParallelEmbedding, copy_to_tp,
    gather_from_tp, group_rank, group_size, reduce_from_tp, scatter_to_tp, vocab_parallel_cross_entropy,
)

TP = 2
LAYER_TOL = dict(rtol=1e-5, atol=1e-6)
MODEL_TOL = dict(rtol=1e-4, atol=1e-6)


def shard(full: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """This rank's contiguous chunk of ``full`` along ``dim`` (all of it for None)."""
    if dim is None:
        return full
    chunk = full.shape[dim] // group_size(group)
    return full.narrow(dim, group_rank(group) * chunk, chunk)


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_()


# ---- checks: each takes the TP group (None: one rank) and a seed ---------------------------------------------
def check_collectives(group, seed):
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    # scatter then gather is the identity both ways
    x_leaf = leaf(x)
    y = gather_from_tp(scatter_to_tp(x_leaf, group), group)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert torch.equal(scatter_to_tp(x, group), shard(x, -1, group))
    y.backward(dy)
    torch.testing.assert_close(x_leaf.grad, dy, rtol=0, atol=0)
    # copy: identity forward, gradients summed over the ranks
    rank, size = group_rank(group), group_size(group)
    x_leaf = leaf(x)
    (copy_to_tp(x_leaf, group) * (rank + 1)).backward(dy)
    torch.testing.assert_close(x_leaf.grad, dy * sum(range(1, size + 1)), **LAYER_TOL)
    # reduce: summed forward, identity backward
    x_leaf = leaf(x * (rank + 1))
    out = reduce_from_tp(x_leaf, group)
    torch.testing.assert_close(out, x * sum(range(1, size + 1)), **LAYER_TOL)
    out.backward(dy)
    torch.testing.assert_close(x_leaf.grad, dy, rtol=0, atol=0)


def check_factory_init(group, seed):
    """Layers from the TP factory hold exactly the plain factory's slices, and leave the RNG where it would be."""
    def build(factory):
        return [factory.column_linear(16, 48, bias=True, init_std=0.02),
                factory.row_linear(48, 16, bias=True, init_std=0.01),
                factory.vocab_embedding(64, 16, init_std=0.02)]
    torch.manual_seed(seed)
    plain, plain_next = build(LayerFactory()), torch.randn(4)
    torch.manual_seed(seed)
    factory = TensorParallelLayerFactory(group)
    parallel, parallel_next = build(factory), torch.randn(4)
    assert (factory.tp_size, factory.tp_rank) == (group_size(group), group_rank(group))
    for ref, layer in zip(plain, parallel):
        for name, param in layer.named_parameters():
            expected = shard(dict(ref.named_parameters())[name], param.tp_split_dim, group)
            assert torch.equal(param, expected), name
    assert parallel[0].weight.shape == (48 // group_size(group), 16)
    assert parallel[1].weight.shape == (16, 48 // group_size(group))
    assert parallel[1].bias.tp_split_dim is None and parallel[2].weight.tp_split_dim == 0
    assert parallel[0].weight.tensor_model_parallel and not parallel[1].bias.tensor_model_parallel
    assert torch.equal(plain_next, parallel_next)
    # a ProcessGroup cannot be deep-copied: copies of parallel layers share it
    clone = copy.deepcopy(parallel[0])
    x = torch.ones(2, 16)
    assert clone.group is parallel[0].group and torch.equal(clone(x), parallel[0](x))


def check_mlp(group, seed):
    """Column(fc) -> GELU -> Row(proj) equals the plain two-linear MLP: output, input and weight gradients."""
    d, h = 16, 48
    torch.manual_seed(seed)
    fc, proj = LayerFactory._linear(d, h, True, 0.3), LayerFactory._linear(h, d, True, 0.3)
    torch.manual_seed(seed)
    pfc, pproj = ColumnParallelLinear(d, h, True, 0.3, group), RowParallelLinear(h, d, True, 0.3, group)
    with torch.no_grad():  # non-zero biases, so that adding the row bias twice would show
        for ref, par, dim in ((fc, pfc, 0), (proj, pproj, None)):
            ref.bias.normal_(generator=torch.Generator().manual_seed(seed + 7))
            par.bias.copy_(shard(ref.bias, dim, group))
    gen = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(3, 5, d, generator=gen), torch.randn(3, 5, d, generator=gen)
    x_ref, x_par = leaf(x), leaf(x)
    y_ref = proj(F.gelu(fc(x_ref), approximate="tanh"))
    y_par = pproj(F.gelu(pfc(x_par), approximate="tanh"))
    torch.testing.assert_close(y_par, y_ref, **LAYER_TOL)
    y_ref.backward(dy)
    y_par.backward(dy)
    torch.testing.assert_close(x_par.grad, x_ref.grad, **LAYER_TOL)
    torch.testing.assert_close(pfc.weight.grad, shard(fc.weight.grad, 0, group), **LAYER_TOL)
    torch.testing.assert_close(pfc.bias.grad, shard(fc.bias.grad, 0, group), **LAYER_TOL)
    torch.testing.assert_close(pproj.weight.grad, shard(proj.weight.grad, 1, group), **LAYER_TOL)
    torch.testing.assert_close(pproj.bias.grad, proj.bias.grad, **LAYER_TOL)


def check_partial_rows(group, seed):
    """Two row linears with reduce_output=False, summed then reduced once, equal the two full outputs
    summed (each bias once); every rank's bias copy gets the full bias gradient."""
    torch.manual_seed(seed)
    ref_a, ref_b = LayerFactory._linear(24, 16, True, 0.3), LayerFactory._linear(40, 16, True, 0.3)
    torch.manual_seed(seed)
    factory = TensorParallelLayerFactory(group)
    par_a = factory.row_linear(24, 16, bias=True, init_std=0.3, reduce_output=False)
    par_b = factory.row_linear(40, 16, bias=True, init_std=0.3, reduce_output=False)
    assert par_a.output_is_partial and not RowParallelLinear(8, 4, True, 0.1, group).output_is_partial
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for ref, par in ((ref_a, par_a), (ref_b, par_b)):
            ref.bias.normal_(generator=gen)
            par.bias.copy_(ref.bias)
    xa, xb, dy = (torch.randn(2, 3, 24, generator=gen), torch.randn(2, 3, 40, generator=gen),
                  torch.randn(2, 3, 16, generator=gen))
    xa_ref, xb_ref = leaf(xa), leaf(xb)
    out_ref = ref_a(xa_ref) + ref_b(xb_ref)
    xa_par, xb_par = leaf(shard(xa, -1, group)), leaf(shard(xb, -1, group))
    out_par = factory.reduce(par_a(xa_par) + par_b(xb_par))
    torch.testing.assert_close(out_par, out_ref, **LAYER_TOL)
    out_ref.backward(dy)
    out_par.backward(dy)
    torch.testing.assert_close(xa_par.grad, shard(xa_ref.grad, -1, group), **LAYER_TOL)
    torch.testing.assert_close(xb_par.grad, shard(xb_ref.grad, -1, group), **LAYER_TOL)
    for ref, par in ((ref_a, par_a), (ref_b, par_b)):
        torch.testing.assert_close(par.weight.grad, shard(ref.weight.grad, 1, group), **LAYER_TOL)
        torch.testing.assert_close(par.bias.grad, ref.bias.grad, **LAYER_TOL)
    # the same weights with reduce_output=True give the full output on their own
    par_a.reduce_output = True
    torch.testing.assert_close(par_a(xa_par), ref_a(xa), **LAYER_TOL)


def check_embedding(group, seed):
    torch.manual_seed(seed)
    ref = LayerFactory().vocab_embedding(64, 16, init_std=0.5)
    torch.manual_seed(seed)
    par = VocabParallelEmbedding(64, 16, 0.5, group)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 64, (4, 9), generator=gen)
    tokens[0, :4] = torch.tensor([0, 31, 32, 63])  # both ends of both ranks' ranges
    dy = torch.randn(4, 9, 16, generator=gen)
    out_ref, out_par = ref(tokens), par(tokens)
    assert torch.equal(out_par, out_ref)  # each row is a lookup plus exact zeros
    out_ref.backward(dy)
    out_par.backward(dy)
    torch.testing.assert_close(par.weight.grad, shard(ref.weight.grad, 0, group), **LAYER_TOL)


def check_cross_entropy(group, seed):
    """Vocab 61 padded to 64: loss and logits gradient equal F.cross_entropy on the true-vocab logits."""
    vocab, padded = 61, 64
    gen = torch.Generator().manual_seed(seed)
    full = 3 * torch.randn(4, 7, padded, generator=gen)
    full[..., vocab:] = 50.0  # padding columns would dominate the softmax if they were not excluded
    targets = torch.randint(0, vocab, (4, 7), generator=gen)
    targets[1, :4] = torch.tensor([0, 31, 32, vocab - 1])
    targets[0, :3] = -100
    targets[3, 6] = -100
    start = group_rank(group) * (padded // group_size(group))

    logits_ref = leaf(full)
    loss_ref = F.cross_entropy(logits_ref[..., :vocab].reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    (2.5 * loss_ref).backward()
    local = leaf(shard(full, -1, group))
    loss = vocab_parallel_cross_entropy(local, targets, start, vocab, group)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (2.5 * loss).backward()
    torch.testing.assert_close(loss, loss_ref, **LAYER_TOL)
    torch.testing.assert_close(local.grad, shard(logits_ref.grad, -1, group), **LAYER_TOL)
    padding = torch.arange(start, start + local.shape[-1]) >= vocab
    assert torch.all(local.grad[..., padding] == 0)

    # through the factory; gather_logits drops the padding columns
    factory = TensorParallelLayerFactory(group, vocab_size=vocab)
    torch.testing.assert_close(factory.loss(shard(full, -1, group), targets), loss_ref, **LAYER_TOL)
    assert torch.equal(factory.gather_logits(shard(full, -1, group)), full[..., :vocab])

    # bf16 logits: fp32 loss of the same bf16 values, gradient back in bf16
    full_bf16 = full.bfloat16()
    ref16 = leaf(full_bf16.float())
    loss_ref16 = F.cross_entropy(ref16[..., :vocab].reshape(-1, vocab), targets.reshape(-1))
    loss_ref16.backward()
    local16 = leaf(shard(full_bf16, -1, group))
    loss16 = vocab_parallel_cross_entropy(local16, targets, start, vocab, group)
    loss16.backward()
    assert loss16.dtype == torch.float32 and local16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss16, loss_ref16, **LAYER_TOL)
    torch.testing.assert_close(local16.grad.float(), shard(ref16.grad, -1, group), rtol=1e-2, atol=1e-2)


GPT_CONFIGS = (
    dict(parallel_residual=True, tied_embeddings=True, position="alibi"),
    dict(parallel_residual=False, tied_embeddings=False, position="learned", shared_layernorm=False),
)


def check_gpt(group, seed):
    """A GPT built with the TP factory after the same seed holds the plain GPT's slices; gathered logits,
    the vocab-parallel loss and every parameter gradient match the plain model (dropout 0)."""
    for i, overrides in enumerate(GPT_CONFIGS):
        config = ModelConfig(vocab_size=61, seq_len=16, d_model=32, num_layers=2, num_heads=4,
                             make_vocab_size_divisible_by=64, attention_backend="sdpa", **overrides)
        torch.manual_seed(seed)
        ref = GPT(config)
        torch.manual_seed(seed)
        factory = TensorParallelLayerFactory(group)
        par = GPT(config, factory, activation_checkpointing=i == 1)
        ref_params = dict(ref.named_parameters())
        assert set(ref_params) == {name for name, _ in par.named_parameters()}
        for name, param in par.named_parameters():
            assert torch.equal(param, shard(ref_params[name], getattr(param, "tp_split_dim", None), group)), name
        gen = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, 61, (2, 16), generator=gen)
        targets = torch.randint(0, 61, (2, 16), generator=gen)
        targets[0, :5] = -100
        logits_ref = ref(tokens)
        loss_ref = language_model_loss(logits_ref, targets)
        loss_ref.backward()
        local = par(tokens)
        assert local.shape == (2, 16, config.padded_vocab_size // group_size(group))
        torch.testing.assert_close(factory.gather_logits(local), logits_ref, **MODEL_TOL)
        loss = factory.loss(local, targets)
        torch.testing.assert_close(loss, loss_ref, **MODEL_TOL)
        loss.backward()
        for name, param in par.named_parameters():
            expected = shard(ref_params[name].grad, getattr(param, "tp_split_dim", None), group)
            torch.testing.assert_close(param.grad, expected, **MODEL_TOL, msg=lambda m, n=name: f"{n}: {m}")


CHECKS = (check_collectives, check_factory_init, check_mlp, check_partial_rows, check_embedding,
          check_cross_entropy, check_gpt)


# ---- pytest -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_one_rank_equals_plain(check):
    """group=None without torch.distributed: tp = 1, every collective is the identity."""
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process: group=None would mean the world group")
    check(None, seed=0)


def test_group_none_refused_when_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="explicitly"):
        TensorParallelLayerFactory(None)


def test_deepcopy_shares_the_group():
    factory = TensorParallelLayerFactory(None)
    model = GPT(ModelConfig(vocab_size=61, seq_len=8, d_model=16, num_layers=1, num_heads=2), factory)
    clone = copy.deepcopy(model)  # a ProcessGroup itself cannot be deep-copied
    original, copied = model.layers[1].mlp.fc, clone.layers[1].mlp.fc
    assert copied._group is original._group and clone.embedding.layer_factory._group is factory._group
    assert copied.weight is not original.weight and torch.equal(copied.weight, original.weight)


def _run_ranks(nproc: int, port: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), str(Path(__file__).resolve())]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    assert result.returncode == 0, (f"{command} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("nproc, port", [(2, 29750), (4, 29751)], ids=["tp2", "2x_tp2"])
def test_ranks_equal_plain(nproc, port):
    """2 ranks: one TP group of 2. 4 ranks: two TP groups {0,1}, {2,3} with different data."""
    stdout = _run_ranks(nproc, port)
    for check in CHECKS:
        for rank in range(nproc):
            assert f"rank {rank}: {check.__name__} ok" in stdout, stdout[-3000:]


def _worker() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # every rank creates every group, in the same order (new_group is collective over the world)
    groups = [dist.new_group(list(range(first, first + TP))) for first in range(0, world, TP)]
    group = groups[rank // TP]
    assert group_size(group) == TP and group_rank(group) == rank % TP
    for check in CHECKS:
        check(group, seed=1000 * (rank // TP))  # same data within a TP group, different across groups
        print(f"rank {rank}: {check.__name__} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
