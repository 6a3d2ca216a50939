"""megagpt/hf/export.py: megagpt -> Hugging Face (built-in GPT-2 or the custom code) -> back (import_hf).

Every export kind is compared by logits against the megagpt model it came from (fp32, 1e-5), through
transformers' own loading (AutoModelForCausalLM), and by cached greedy generation."""
import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megagpt.convert.weights import load_gpt
from megagpt.generate import generate
from megagpt.hf import export_hf, import_hf
from megagpt.hf.export import choose_arch

TOL = 1e-5
# name -> (model overrides, expected architecture with arch="auto")
MODELS = {
    "gpt2-tied": ({"position": "learned", "parallel_residual": False}, "GPT2LMHeadModel"),
    "gpt2-untied": ({"position": "learned", "parallel_residual": False, "tied_embeddings": False}, "GPT2LMHeadModel"),
    "alibi-parallel": ({}, "MegaGPTForCausalLM"),
    # 3 heads (not a power of two: the interleaved ALiBi slopes), 3 x 12 = 36 != d_model 32
    "alibi-variants": ({"shared_layernorm": True, "bias": False, "tied_embeddings": False, "num_heads": 3,
                        "head_dim": 12, "mlp_ratio": 2.5}, "MegaGPTForCausalLM"),
    "none-sequential": ({"position": "none", "parallel_residual": False}, "MegaGPTForCausalLM"),
    "learned-parallel": ({"position": "learned"}, "MegaGPTForCausalLM"),
}


def _diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, make_tiny_gpt):
    """name -> (megagpt GPT, export dir), each written with arch="auto" (and verified by export_hf itself)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for seed, (name, (overrides, _)) in enumerate(MODELS.items()):
        model, weights = make_tiny_gpt(seed, **overrides)
        out[name] = (model, export_hf(weights, root / name))
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_with_transformers_and_gives_megagpt_logits(exports, name, tokens, capsys):
    model, path = exports[name]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [MODELS[name][1]]
    custom = MODELS[name][1] == "MegaGPTForCausalLM"
    assert ((path / "modeling_megagpt.py").exists(), (path / "configuration_megagpt.py").exists()) == (custom, custom)
    if custom:
        assert config["model_type"] == "megagpt" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # the head is stored only when untied
        assert ("lm_head.weight" in f.keys()) == (not model.config.tied_embeddings)
    hf = _load(path)
    assert type(hf).__name__ == MODELS[name][1]
    with torch.no_grad():
        diff = _diff(hf(tokens).logits, model(tokens))
    assert diff <= TOL, f"{name}: max abs logits difference {diff:.3g} > {TOL}"


@pytest.mark.parametrize("name", list(MODELS))
def test_import_hf_brings_every_export_back_to_the_same_megagpt_function(exports, name, tokens, tmp_path):
    model, path = exports[name]
    back, weights = load_gpt(import_hf(path, tmp_path / "back", make_vocab_size_divisible_by=64))
    assert back.config.padded_vocab_size == model.config.padded_vocab_size == 128
    assert torch.all(weights.weights["layers.0.word_embeddings.weight"][100:] == 0), "padded rows must be zeros"
    with torch.no_grad():
        diff = _diff(back(tokens), model(tokens))
    assert diff <= TOL, f"{name}: round trip max abs logits difference {diff:.3g} > {TOL}"


@pytest.mark.parametrize("name", ["gpt2-tied", "alibi-parallel", "alibi-variants", "none-sequential"])
def test_cached_greedy_generate_equals_megagpt_generate(exports, name):
    model, path = exports[name]
    hf = _load(path)
    prompt = [5, 17, 42, 3]
    ours = generate(model, prompt, 12, temperature=0.0)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True)
    assert theirs[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("name", ["alibi-parallel", "learned-parallel"])
def test_left_padded_batch_generation_equals_each_prompt_alone(exports, name):
    model, path = exports[name]
    hf = _load(path)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [60]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
                          pad_token_id=0)[:, width:].tolist()
    assert batched == [generate(model, p, 8, temperature=0.0)[0] for p in prompts]


def test_custom_model_cache_labels_and_tuples(exports, tokens):
    """Prefill + cached decoding gives the full forward's logits; labels give megagpt's loss."""
    model, path = exports["alibi-variants"]
    hf = _load(path)
    with torch.no_grad():
        full = hf(tokens, use_cache=False).logits
        prefill = hf(tokens[:, :20], use_cache=True)
        # the cache under both argument names: `past_key_values` (every transformers 5) and the field name the
        # installed release declares (`cache` since 5.2x, where generate() passes it so)
        field = sys.modules[type(hf).__module__].CACHE_FIELD
        cache, steps = getattr(prefill, field), []
        for i in range(20, 24):
            step = hf(tokens[:, i:i + 1], use_cache=True, **{("past_key_values", field)[i % 2]: cache})
            cache = getattr(step, field)
            steps.append(step.logits)
        diff = _diff(torch.cat([prefill.logits, *steps], dim=1), full[:, :24])
        loss = hf(tokens, labels=tokens).loss
        expected = model.loss(model(tokens)[:, :-1], tokens[:, 1:])
        logits_tuple = hf(tokens, return_dict=False, use_cache=False)
    assert diff <= TOL, f"cached decoding differs from the full forward by {diff:.3g}"
    assert abs(loss.item() - expected.item()) <= TOL, (loss.item(), expected.item())
    assert isinstance(logits_tuple, tuple) and torch.equal(logits_tuple[0], full)


def test_auto_picks_gpt2_only_for_exact_models_and_gpt2_refuses_naming_the_field(make_tiny_gpt, tmp_path):
    from megagpt.config import ModelConfig

    base = {"vocab_size": 64, "seq_len": 8, "d_model": 16, "num_layers": 1, "num_heads": 2}
    gpt2_like = {"position": "learned", "parallel_residual": False}
    assert choose_arch(ModelConfig(**base, **gpt2_like), "auto") == "gpt2"
    for overrides, field in [({}, "model.position='alibi'"), ({"position": "learned"}, "model.parallel_residual"),
                             ({**gpt2_like, "bias": False}, "model.bias=false"),
                             ({**gpt2_like, "head_dim": 4}, "model.head_dim=4")]:
        config = ModelConfig(**{**base, **overrides})
        assert choose_arch(config, "auto") == "custom"
        with pytest.raises(ValueError, match=field.replace("(", r"\(")):
            choose_arch(config, "gpt2")
    _, weights = make_tiny_gpt()
    with pytest.raises(ValueError, match="arch='custom'"):
        export_hf(weights, tmp_path / "out", arch="gpt2")
    assert not any(tmp_path.iterdir())


def test_bf16_export_and_overwrite(make_tiny_gpt, tmp_path, capsys):
    model, weights = make_tiny_gpt(**MODELS["gpt2-tied"][0])
    out = export_hf(weights, tmp_path / "out", dtype="bf16")
    assert "verified gpt2 export: max |logits difference|" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(weights, out)
    export_hf(weights, out, arch="custom", overwrite=True)
    assert (out / "modeling_megagpt.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial or .old left


def test_an_export_that_fails_verification_never_looks_finished(make_tiny_gpt, tmp_path, monkeypatch):
    from megagpt.hf import layouts

    real = layouts.to_custom

    def swapped_qk(weights, mc):  # a layout bug: q and k exchanged in the fused QKV
        state = real(weights, mc)
        w = state["model.layers.0.attention.qkv.weight"].view(mc.num_heads, 3, -1, mc.d_model)
        state["model.layers.0.attention.qkv.weight"] = w[:, [1, 0, 2]].reshape(-1, mc.d_model)
        return state

    monkeypatch.setattr(layouts, "to_custom", swapped_qk)
    _, weights = make_tiny_gpt()
    with pytest.raises(ValueError, match="verification failed"):
        export_hf(weights, tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").exists()


def test_shipped_code_imports_only_torch_and_transformers():
    import megagpt.hf

    for name in ("modeling_megagpt.py", "configuration_megagpt.py"):
        tree = ast.parse((Path(megagpt.hf.__file__).parent / name).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                roots.add("." if node.level else node.module.split(".")[0])
        assert roots <= {"math", "torch", "transformers", "."}, f"{name} imports {sorted(roots)}"
