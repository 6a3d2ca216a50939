"""build_param_groups: every parameter in exactly one named group with the right weight decay."""
import pytest
from torch import nn

from megagpt.config import ModelConfig
from megagpt.model import GPT
from megagpt.optim import build_param_groups, classify_parameters, param_group_by_name


def tiny_gpt(**overrides) -> GPT:
    options = dict(vocab_size=100, seq_len=16, d_model=32, num_layers=2, num_heads=4, position="learned")
    options.update(overrides)
    return GPT(ModelConfig(**options))


def expected_kind(model: nn.Module, name: str) -> str:
    """Written from the model's structure, independently of classify_parameters' rules."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear) and attr == "weight":
        return "decay"
    assert isinstance(module, nn.LayerNorm) or attr == "bias", name
    return "no_decay"


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_groups_partition_parameters_exactly_once(tied, bias):
    model = tiny_gpt(tied_embeddings=tied, bias=bias)
    groups = build_param_groups(model, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}), "a parameter is in two groups"
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert expected_kind(model, name_of[id(p)]) == group["name"], name_of[id(p)]
    assert param_group_by_name(groups, "decay")["weight_decay"] == 0.1
    assert param_group_by_name(groups, "no_decay")["weight_decay"] == 0.0
    assert param_group_by_name(groups, "embedding")["weight_decay"] == 0.0
    # 4 linears per block (qkv, attention proj, fc, mlp proj) plus the untied head.
    assert len(param_group_by_name(groups, "decay")["params"]) == 2 * 4 + (0 if tied else 1)
    # word + learned position embeddings; the tied head is not a second copy.
    assert len(param_group_by_name(groups, "embedding")["params"]) == 2


def test_tied_word_embedding_is_listed_once_by_name():
    classified = classify_parameters(tiny_gpt(tied_embeddings=True))
    names = [n for n, _ in classified["embedding"]]
    assert names == ["layers.0.word_embeddings.weight", "layers.0.position_embeddings.weight"]


def test_flags_move_parameters_into_decay():
    model = tiny_gpt()
    groups = build_param_groups(model, 0.05, decay_embeddings=True, decay_norms_and_biases=True)
    assert [g["name"] for g in groups] == ["decay", "embedding"]  # empty no_decay group left out
    assert param_group_by_name(groups, "embedding")["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_bad_arguments_raise_naming_the_field():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="weight_decay"):
        build_param_groups(model, -0.1)
    with pytest.raises(ValueError, match="decay_embeddings"):
        build_param_groups(model, 0.1, decay_embeddings="yes")
    with pytest.raises(ValueError, match="'missing'.*groups present"):
        param_group_by_name(build_param_groups(model, 0.1), "missing")


def test_tensor_parallel_shards_and_replicated_tensors_get_separate_groups():
    """Under tensor parallelism an 8-bit optimizer must never quantise a replicated tensor in one block with a
    rank's shard: separate_replicated splits decay / no_decay by the layers' ``tensor_model_parallel`` flag."""
    from megagpt.config import ModelConfig
    from megagpt.model import GPT
    from megagpt.optim import build_param_groups

    model = GPT(ModelConfig(vocab_size=64, seq_len=16, d_model=32, num_layers=2, num_heads=2,
                            make_vocab_size_divisible_by=64))
    for name, p in model.named_parameters():  # mark what TensorParallelLayerFactory splits
        p.tensor_model_parallel = any(k in name for k in ("qkv", "fc", "attention.proj.weight", "mlp.proj.weight",
                                                          "word_embeddings"))
    groups = {g["name"]: g["params"] for g in build_param_groups(model, 0.1, separate_replicated=True)}
    assert sorted(groups) == ["decay", "embedding", "no_decay", "no_decay_replicated"]
    assert all(p.tensor_model_parallel for p in groups["decay"] + groups["no_decay"])
    assert groups["no_decay"] and not any(p.tensor_model_parallel for p in groups["no_decay_replicated"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in groups["no_decay_replicated"]} >= {"ln_attn", "proj"}
    plain = build_param_groups(model, 0.1)
    assert [g["name"] for g in plain] == ["decay", "no_decay", "embedding"]
