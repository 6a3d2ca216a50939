"""Launch configs and launch geometry of the ALiBi attention kernels (kernels/attention_configs.py).

The compile checks build the kernels for sm_80, sm_86, sm_89 and sm_90 on a CPU (compile_for_gpu, specialised
as a real launch with aligned tensors is) and run the selection rule against each architecture's shared memory
per block: at least one config of each kernel fits, and the one chosen fits. Nothing here needs a GPU; what only
a GPU can show (register spills, speed) is listed in docs/gpu.md.
"""
from __future__ import annotations

import pytest
import torch

from megagpt.kernels import alibi_attention as attention_module
from megagpt.kernels import attention_configs as configs
from megagpt.kernels.attention_configs import (CANDIDATES, SHARED_MEMORY_PER_BLOCK, BlockConfig, CompiledFacts,
                                               candidate_configs, head_chunks, needs_int64_offsets, select_config)

KERNELS = {"fwd": attention_module._alibi_attn_fwd, "dkdv": attention_module._alibi_attn_bwd_dkdv,
           "dq": attention_module._alibi_attn_bwd_dq}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = {80: (8, 0), 86: (8, 6), 89: (8, 9), 90: (9, 0)}


# ---- the rule, with made-up compile results ----------------------------------------------------------------------
def fake_compiler(shared_by_config: dict, spills_by_config: dict | None = None):
    calls = []

    def compile_config(config: BlockConfig) -> CompiledFacts:
        calls.append(config)
        return CompiledFacts(shared_by_config[config], (spills_by_config or {}).get(config))

    return compile_config, calls


def test_selection_skips_configs_that_do_not_fit():
    first, second, *rest = CANDIDATES["fwd"]["16bit"]
    shared = {first: 131072, second: 98304, **{c: 1000 for c in rest}}
    compile_config, calls = fake_compiler(shared)
    assert select_config("fwd", torch.bfloat16, 128, 2048, 101376, compile_config) == second
    assert calls == [first, second]  # stops at the first that fits


def test_selection_prefers_a_config_without_register_spills():
    first, second, third, *rest = CANDIDATES["dq"]["16bit"]
    shared = {c: 1000 for c in CANDIDATES["dq"]["16bit"]}
    compile_config, _ = fake_compiler(shared, {first: 12, second: 0})
    assert select_config("dq", torch.float16, 128, 2048, 101376, compile_config) == second
    every_one_spills, _ = fake_compiler(shared, {c: 8 for c in CANDIDATES["dq"]["16bit"]})
    assert select_config("dq", torch.float16, 128, 2048, 101376, every_one_spills) == first


def test_selection_refuses_when_nothing_fits():
    compile_config, _ = fake_compiler({c: 10**6 for c in CANDIDATES["dkdv"]["fp32"]})
    with pytest.raises(RuntimeError, match=r"no launch config of the attention kernel 'dkdv' fits .* 101376 bytes"):
        select_config("dkdv", torch.float32, 128, 2048, 101376, compile_config)


def test_selection_is_independent_of_call_history():
    # Nothing is timed: the same facts give the same choice every time, in any order of asking.
    shared = {c: 60000 - 1000 * i for i, c in enumerate(CANDIDATES["fwd"]["fp32"])}
    answers = {select_config("fwd", torch.float32, 64, 2048, 59500, fake_compiler(shared)[0]) for _ in range(3)}
    assert answers == {CANDIDATES["fwd"]["fp32"][1]}


def test_short_inputs_use_row_blocks_that_fit_them():
    decode = candidate_configs("fwd", torch.bfloat16, rows=1)
    assert decode and all(c.block_m <= 16 for c in decode)
    assert candidate_configs("fwd", torch.bfloat16, rows=2048) == CANDIDATES["fwd"]["16bit"]
    assert all(c.block_n <= 32 for c in candidate_configs("dkdv", torch.float32, rows=20))


def test_gpu_launch_key_chooses_once_per_shape_and_gpu_model(monkeypatch):
    # The GPU branch of the launcher, run here with the GPU queries replaced: one choice per launch key, reused.
    monkeypatch.setattr(configs, "interpreter_active", lambda: False)
    monkeypatch.setattr(configs, "_CHOSEN", {})
    configs._device_identity.cache_clear()  # the device queries below are fakes: keep them out of other tests
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(configs, "_gpu_shared_memory_limit", lambda device: 101376)
    compiled = []

    def facts(kernel, args, launch_args, config, limit):
        compiled.append(config)
        return CompiledFacts(200000 if config.block_m == 128 else 90000, 0)

    monkeypatch.setattr(configs, "_compile_facts", facts)
    q = torch.zeros(2, 4, 300, 64, dtype=torch.bfloat16)
    launch_args = attention_module._launch_args(q, q, q)
    args = (q, q, q, 0, 7)
    first = configs.gpu_launch_meta(None, "fwd", args, launch_args, rows=300)
    assert first["BLOCK_M"] != 128 and len(compiled) == 3  # two 128-row configs skipped
    assert configs.gpu_launch_meta(None, "fwd", args, launch_args, rows=400) == first  # same length bucket
    assert len(compiled) == 3
    configs.gpu_launch_meta(None, "fwd", args, launch_args, rows=3000)  # another length bucket
    assert len(compiled) > 3
    assert len(configs.chosen_configs()) == 2
    configs._device_identity.cache_clear()


# ---- launch geometry ---------------------------------------------------------------------------------------------
def test_head_chunks_stay_within_the_grid_limit():
    chunks = list(head_chunks(2 * 65535 + 3))
    assert chunks == [(0, 65535), (65535, 65535), (131070, 3)]
    assert list(head_chunks(12)) == [(0, 12)]
    with pytest.raises(ValueError, match="batch \\* heads"):
        list(head_chunks(0))


def strided_qkv(seq: int, heads: int, head_dim: int) -> torch.Tensor:
    """q as the model slices it from a fused [batch, seq, heads, 3, head_dim] QKV; meta tensors hold no memory."""
    qkv = torch.empty(1, seq, heads, 3, head_dim, device="meta")
    return qkv.permute(3, 0, 2, 1, 4)[0]


def test_int64_offsets_only_where_rows_pass_int32():
    assert not needs_int64_offsets(strided_qkv(2048, 16, 128))
    assert not needs_int64_offsets(torch.empty(64, 32, 8192, 128, device="meta"))  # batch/head offsets are int64
    long_fused = strided_qkv(90_000, 64, 128)  # d_model 8192: 24576 elements per row
    assert long_fused.stride(2) * 90_000 > 2**31
    assert needs_int64_offsets(long_fused)


# ---- compile checks ---------------------------------------------------------------------------------------------
def pointer_types(dtype_name: str) -> dict:
    types = {name: f"*{dtype_name}" for name in
             ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    types.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr", "slopes_log2_ptr")})
    return types


def compile_facts_for(compile_for_gpu, kernel_name: str, dtype_name: str, head_dim: int, arch: int):
    def compile_config(config: BlockConfig) -> CompiledFacts:
        constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim, UPCAST=False,
                          DOT_PRECISION="ieee" if dtype_name == "fp32" else "tf32", INT64_OFFSETS=False)
        compiled = compile_for_gpu(KERNELS[kernel_name], pointer_types(dtype_name), constexprs,
                                   num_warps=config.num_warps, num_stages=config.num_stages, arch=arch)
        return CompiledFacts(compiled.metadata.shared)

    return compile_config


def check_selection_fits(compile_for_gpu, kernel_name, dtype_name, head_dim, arch):
    limit = SHARED_MEMORY_PER_BLOCK[ARCHS[arch]]
    compile_config = compile_facts_for(compile_for_gpu, kernel_name, dtype_name, head_dim, arch)
    chosen = select_config(kernel_name, DTYPES[dtype_name], head_dim, 2048, limit, compile_config)
    assert compile_config(chosen).shared <= limit, (kernel_name, dtype_name, head_dim, arch, chosen)


def test_unspecialised_compile_underreports_shared_memory(compile_for_gpu):
    # The fixture specialises pointers and strides as aligned, as a real launch is: the forward's first config
    # at head_dim 128 (bf16, sm_90) needs 131,072 bytes so, not the 65,536 an unspecialised compile reports.
    compiled = compile_for_gpu(KERNELS["fwd"], pointer_types("bf16"),
                               dict(BLOCK_M=128, BLOCK_N=64, HEAD_DIM=128, UPCAST=False, DOT_PRECISION="tf32",
                                    INT64_OFFSETS=False), num_warps=8, num_stages=3, arch=90)
    assert compiled.metadata.shared == 131072


@pytest.mark.parametrize("kernel_name", ["fwd", "dkdv", "dq"])
def test_bf16_head_dim_128_fits_an_rtx_3090(kernel_name, compile_for_gpu):
    # The case that failed: sm_86's 101,376 bytes, the largest supported head dim.
    check_selection_fits(compile_for_gpu, kernel_name, "bf16", 128, 86)


def test_int64_offsets_and_preprocess_compile(compile_for_gpu):
    constexprs = dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM=64, UPCAST=False, DOT_PRECISION="tf32", INT64_OFFSETS=True)
    for kernel in KERNELS.values():
        compile_for_gpu(kernel, pointer_types("bf16"), constexprs, num_warps=4, num_stages=3, arch=90)
    compile_for_gpu(attention_module._alibi_attn_bwd_preprocess, pointer_types("bf16"),
                    {"HEAD_DIM": 128, "INT64_OFFSETS": True, "BLOCK_M": 64}, arch=86)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
def test_every_head_dim_fits_every_architecture(arch, dtype_name, compile_for_gpu):
    # Minutes on a CPU (fp32 "ieee" dots compile slowly): every kernel, head dim and dtype on each architecture.
    for head_dim in attention_module.SUPPORTED_HEAD_DIMS:
        for kernel_name in KERNELS:
            check_selection_fits(compile_for_gpu, kernel_name, dtype_name, head_dim, arch)
