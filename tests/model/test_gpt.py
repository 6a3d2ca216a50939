"""ModelConfig validation and the GPT model's structure, initialisation, causality and swappable layers."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from megagpt.config import ModelConfig, load_model_config
from megagpt.model import GPT, LayerFactory, gpt_layer_specs
from megagpt.model.gpt import Block

TINY = dict(vocab_size=300, seq_len=32, d_model=32, num_layers=2, num_heads=2)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


# ---- config -------------------------------------------------------------------------------------
def test_config_derived_values():
    gpt2 = ModelConfig(vocab_size=50257, seq_len=1024, d_model=768, num_layers=12, num_heads=12)
    assert gpt2.padded_vocab_size == 50304  # 393 * 128, the usual padded GPT-2 vocab
    assert gpt2.resolved_head_dim == 64 and gpt2.ffn_hidden_size == 3072 and gpt2.attention_width == 768
    wide_heads = tiny(d_model=48, num_heads=2, head_dim=128, mlp_ratio=2.5)
    assert wide_heads.attention_width == 256 and wide_heads.ffn_hidden_size == 120


@pytest.mark.parametrize("field,value,message", [
    ("position", "rotary", r"model.position='rotary' is not one of \['alibi', 'learned', 'none'\]"),
    ("attention_backend", "cudnn", r"model.attention_backend='cudnn' is not one of"),
    ("num_heads", 0, "model.num_heads must be a positive integer"),
    ("num_heads", 3, "d_model=32 is not divisible by model.num_heads=3; set model.head_dim"),
    ("dropout", 1.0, r"model.dropout must be in \[0, 1\)"),
    ("mlp_ratio", 4.01, "is not a whole number of MLP units"),
    ("bias", "yes", "model.bias must be true or false"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny(**{field: value})


def test_shared_layernorm_needs_parallel_residual():
    with pytest.raises(ValueError, match="shared_layernorm=true needs model.parallel_residual=true"):
        tiny(parallel_residual=False, shared_layernorm=True)


def test_from_dict_names_unknown_and_missing_keys_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_embd', 'n_head'\]"):
        ModelConfig.from_dict({**TINY, "n_embd": 8, "n_head": 2})
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['seq_len'\]"):
        ModelConfig.from_dict({k: v for k, v in TINY.items() if k != "seq_len"})
    config = tiny(position="learned", head_dim=8)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"model": config.to_dict()}))  # the layout of a full training config
    assert load_model_config(path) == config
    path.write_text("{not json")
    with pytest.raises(ValueError, match="full.json is not valid JSON"):
        load_model_config(path)


# ---- structure and initialisation ---------------------------------------------------------------
def test_padded_vocab_entries_are_never_returned():
    model = GPT(tiny(vocab_size=300))  # padded to 384
    assert model.embedding.word_embeddings.weight.shape[0] == 384
    with torch.no_grad():
        model.embedding.word_embeddings.weight[300:] = 1e4  # padding rows that would dominate if used
    logits = model(torch.randint(0, 300, (2, 9)))
    assert logits.shape == (2, 9, 300)
    assert logits.abs().max() < 1e3


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tied):
    model = GPT(tiny(tied_embeddings=tied))
    names = set(model.state_dict())
    head_names = {n for n in names if n.startswith(f"layers.{2 + 2}.")}  # after embedding, 2 blocks, final norm
    if tied:
        assert not head_names  # the head is the embedding: stored once
        torch.testing.assert_close(model.head(torch.eye(32)), model.embedding.word_embeddings.weight[:300].T)
    else:
        assert head_names == {"layers.4.proj.weight"}
        assert model.layers[4].proj.weight is not model.embedding.word_embeddings.weight
    assert model.num_parameters() == sum(t.numel() for t in model.state_dict().values())


def test_bias_off_and_layernorm_sharing():
    no_bias = GPT(tiny(bias=False, shared_layernorm=True))
    assert not any(name.endswith("bias") for name, _ in no_bias.named_parameters())
    assert all(block.ln_mlp is None for block in no_bias.blocks)
    assert all(block.ln_mlp is not None for block in GPT(tiny()).blocks)


def test_head_dim_may_differ_from_d_model_over_heads():
    model = GPT(tiny(d_model=24, num_heads=3, head_dim=16))
    assert model.blocks[0].attention.qkv.weight.shape == (3 * 3 * 16, 24)
    assert model.blocks[0].attention.proj.weight.shape == (24, 48)
    assert model(torch.randint(0, 300, (1, 5))).shape == (1, 5, 300)


def test_gpt2_initialisation_with_scaled_residual_projections():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1000, seq_len=64, d_model=256, num_layers=8, num_heads=4, position="learned")
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith("attention.proj.weight") or name.endswith("mlp.proj.weight"):
            assert param.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif param.dim() == 2:  # qkv, fc, word and position embeddings
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name
        elif "ln" in name or name.startswith("layers.9."):  # LayerNorms: weight 1, bias 0
            assert torch.all(param == (1.0 if name.endswith("weight") else 0.0)), name
        else:  # linear biases
            assert torch.all(param == 0), name


# ---- behaviour ----------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["alibi", "learned", "none"])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_future_tokens_do_not_change_earlier_logits(position, parallel_residual):
    torch.manual_seed(0)
    model = GPT(tiny(position=position, parallel_residual=parallel_residual)).eval()
    tokens = torch.randint(0, 300, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("position,sees_order", [("alibi", True), ("learned", True), ("none", False)])
def test_only_position_options_make_the_last_token_see_the_order_of_its_prefix(position, sees_order):
    # Without positions, the last query attends to the prefix as an unordered set (one layer, so earlier
    # positions' outputs never feed it): shuffling the prefix must not change its logits.
    torch.manual_seed(0)
    model = GPT(tiny(position=position, num_layers=1)).eval()
    tokens = torch.randint(0, 300, (1, 12))
    shuffled = torch.cat([tokens[:, :-1][:, torch.randperm(11)], tokens[:, -1:]], dim=1)
    assert not torch.equal(shuffled, tokens)
    with torch.no_grad():
        last, last_shuffled = model(tokens)[0, -1], model(shuffled)[0, -1]
    assert torch.allclose(last, last_shuffled, atol=1e-5) != sees_order


@pytest.mark.parametrize("parallel_residual,shared", [(True, False), (True, True), (False, False)])
def test_block_residual_wiring(parallel_residual, shared):
    torch.manual_seed(0)
    block = Block(tiny(parallel_residual=parallel_residual, shared_layernorm=shared), LayerFactory())
    x = torch.randn(2, 7, 32)
    attn, mlp, ln1 = block.attention, block.mlp, block.ln_attn
    ln2 = ln1 if shared else block.ln_mlp
    if parallel_residual:
        want = x + attn(ln1(x)) + mlp(ln2(x))
    else:
        h = x + attn(ln1(x))
        want = h + mlp(ln2(h))
    torch.testing.assert_close(block(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_layer_specs_run_in_order_equal_the_model(tied):
    """The ordered layer list (what a pipeline wrapper consumes) computes the same function as GPT."""
    torch.manual_seed(0)
    config = tiny(tied_embeddings=tied)
    model = GPT(config).eval()
    specs = gpt_layer_specs(config)
    assert len(specs) == config.num_layers + 3
    built, layers = {}, []
    for spec in specs:
        if spec.tied_key is not None and spec.tied_key in built:
            module = built[spec.tied_key]
        else:
            module = spec.build()
            built.setdefault(spec.tied_key, module)
        layers.append(getattr(module, spec.forward_method))
    if tied:
        assert specs[0].tied_key == specs[-1].tied_key == "embedding"
        assert specs[-1].forward_method == "logits" and specs[0].tied_weight_attr == "word_embeddings.weight"
    distinct = list(dict.fromkeys(m.__self__ for m in layers))
    nn.ModuleList(distinct).load_state_dict(model.layers.state_dict())
    tokens = torch.randint(0, 300, (2, 11))
    hidden = tokens
    with torch.no_grad():
        for layer in layers:
            hidden = layer(hidden)
        torch.testing.assert_close(hidden, model(tokens), atol=0, rtol=0)


def test_a_custom_layer_factory_supplies_every_linear_and_the_embedding():
    class TaggedLinear(nn.Linear):
        pass

    class TaggedEmbedding(nn.Embedding):
        pass

    class Tagged(LayerFactory):
        def __init__(self):
            self.calls = []

        def column_linear(self, in_features, out_features, *, bias, init_std):
            self.calls.append("column")
            return TaggedLinear(in_features, out_features, bias=bias)

        def row_linear(self, in_features, out_features, *, bias, init_std, reduce_output=True):
            self.calls.append(f"row reduce={reduce_output}")
            return TaggedLinear(in_features, out_features, bias=bias)

        def vocab_embedding(self, num_embeddings, embedding_dim, *, init_std):
            self.calls.append("embedding")
            return TaggedEmbedding(num_embeddings, embedding_dim)

    factory = Tagged()
    model = GPT(tiny(tied_embeddings=False), layers=factory)
    # parallel residual (tiny's default): the block's two row linears leave the reduction to the block
    assert sorted(factory.calls) == sorted(["embedding"] + ["column", "row reduce=False"] * 2 * 2 + ["column"])
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert model(torch.randint(0, 300, (1, 4))).shape == (1, 4, 300)


def test_model_package_does_not_import_deepspeed():
    code = "import sys, megagpt.model, megagpt.generate; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    tokens = torch.randint(0, 300, (2, 8))
    assert not torch.allclose(model.train()(tokens), model(tokens))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), atol=0, rtol=0)


# ---- activation checkpointing -------------------------------------------------------------------
def loss_and_grads(config: ModelConfig, tokens: torch.Tensor, activation_checkpointing: bool, count_saved=None):
    """Loss and parameter gradients of one training step of a freshly seeded model; the dropout seed is
    reset before the forward so both runs draw the same masks. ``count_saved(tensor)`` sees every tensor
    autograd keeps for backward."""
    from megagpt.model import language_model_loss

    torch.manual_seed(0)
    model = GPT(config, activation_checkpointing=activation_checkpointing).train()
    torch.manual_seed(1)
    hooks = torch.autograd.graph.saved_tensors_hooks(count_saved or (lambda t: t), lambda t: t)
    with hooks:
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_activation_checkpointing_gives_bitwise_the_same_loss_and_gradients(dropout, parallel_residual):
    # The recompute runs the same fp32 CPU ops in the same order with the same RNG state (preserve_rng_state),
    # so the results are bitwise equal, not merely close.
    config = tiny(dropout=dropout, parallel_residual=parallel_residual)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    loss, grads = loss_and_grads(config, tokens, activation_checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_grads(config, tokens, activation_checkpointing=True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    if dropout:  # dropout really acted: the loss differs from the dropout-free model's
        assert not torch.equal(loss, loss_and_grads(tiny(parallel_residual=parallel_residual), tokens, False)[0])


def test_activation_checkpointing_keeps_only_each_blocks_input():
    """Per extra Block, autograd keeps at most one hidden state (the block input that checkpoint stores for
    the recompute) instead of every intermediate activation, so this fails if checkpointing is silently off."""
    batch, seq = 2, 16
    tokens = torch.randint(0, 300, (batch, seq + 1), generator=torch.Generator().manual_seed(2))
    hidden_numel = batch * seq * TINY["d_model"]

    def saved_numel(num_layers, activation_checkpointing):
        total = [0]

        def count(tensor):
            total[0] += tensor.numel()
            return tensor

        loss_and_grads(tiny(num_layers=num_layers, dropout=0.1), tokens, activation_checkpointing, count)
        return total[0]

    per_block_checkpointed = (saved_numel(4, True) - saved_numel(2, True)) / 2
    per_block_plain = (saved_numel(4, False) - saved_numel(2, False)) / 2
    assert 0 < per_block_checkpointed <= hidden_numel
    assert per_block_plain > 10 * hidden_numel


def test_activation_checkpointing_only_in_training_with_grad_and_without_kv_cache(monkeypatch):
    from megagpt import generate as generation
    from megagpt.model import gpt as gpt_module

    calls = []
    real_checkpoint = gpt_module.checkpoint
    monkeypatch.setattr(gpt_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.1), activation_checkpointing=True)
    plain = GPT(tiny(dropout=0.1))
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 300, (2, 8))

    model.train()(tokens)
    assert len(calls) == 2  # one per Block
    with torch.no_grad():
        model(tokens)
    model(tokens, kv_cache=generation.KVCache(2, 8))  # a cache is appended to in forward: never recomputed
    model.eval()
    eval_logits = model(tokens)
    assert len(calls) == 2
    torch.testing.assert_close(eval_logits, plain.eval()(tokens), atol=0, rtol=0)
    assert (generation.generate(model, [1, 2, 3], 5, temperature=0) ==
            generation.generate(plain, [1, 2, 3], 5, temperature=0))
    assert len(calls) == 2


@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_training_forward_compiles_to_one_graph(position, activation_checkpointing):
    """``parallel.compile`` only pays off without graph breaks. A side effect inside a checkpointed block (such
    as filling a cache) makes Dynamo give up on the whole forward and run it eagerly, silently."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = GPT(tiny(position=position, dropout=0.1), activation_checkpointing=activation_checkpointing).train()
    counter = torch._dynamo.testing.CompileCounter()  # counts the graphs Dynamo hands to the backend
    compiled = torch.compile(model, backend=counter)
    for _ in range(2):
        compiled(torch.randint(0, 300, (2, 16))).sum().backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()
