"""megagpt -> Hugging Face: ``export_hf`` writes a directory that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

Two architectures (megagpt/hf/layouts.py):

* ``gpt2``: transformers' built-in ``GPT2LMHeadModel``, no custom code, for models that compute exactly GPT-2's
  function (learned positions, sequential residual, biases, two LayerNorms, head_dim * heads == d_model);
* ``custom``: ``MegaGPTForCausalLM`` shipped as custom code (configuration_megagpt.py, modeling_megagpt.py,
  ``auto_map`` in config.json; load with ``trust_remote_code=True``), exact for every megagpt model. ALiBi
  models need it: Falcon, BLOOM and MPT do not compute megagpt's function (docs/conversion.md).

The export is written to ``OUT.partial``, loaded back with transformers and compared with megagpt on a fixed
random batch, and only then renamed to ``OUT``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megagpt.convert.universal import move_into_place
from megagpt.convert.weights import ModelWeights, build_gpt, read_model_weights
from megagpt.hf import layouts
from megagpt.hf.tokenizer import check_hf_tokenizer, resolve_tokenizer, save_hf_tokenizer

ARCHS = ("auto", "gpt2", "custom")
HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUSTOM_CODE = ("configuration_megagpt.py", "modeling_megagpt.py")
VERIFY_BATCH = (2, 16)  # sequences x tokens (tokens capped at seq_len)


def choose_arch(mc, arch: str) -> str:
    """``gpt2`` or ``custom`` for ``arch`` (``auto``: gpt2 when GPT-2 computes the same function)."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of {list(ARCHS)}")
    problems = layouts.gpt2_problems(mc)
    if arch == "gpt2" and problems:
        raise ValueError("GPT2LMHeadModel cannot represent this model: " + "; ".join(problems)
                         + ". Export it with arch='custom' (--hf-arch custom)")
    if arch == "auto":
        return "custom" if problems else "gpt2"
    return arch


def _hf_model(arch: str, mc, weights: dict[str, torch.Tensor]):
    """The transformers model holding ``weights`` (fp32), built on the meta device (no random init)."""
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config, model_class, state = GPT2Config(**layouts.gpt2_config(mc)), GPT2LMHeadModel, layouts.to_gpt2
    else:
        from megagpt.hf.configuration_megagpt import MegaGPTConfig
        from megagpt.hf.modeling_megagpt import MegaGPTForCausalLM

        config, model_class, state = MegaGPTConfig(**layouts.custom_config(mc)), MegaGPTForCausalLM, layouts.to_custom
    with torch.device("meta"):
        model = model_class(config)
    result = model.load_state_dict(state(weights, mc), strict=False, assign=True)
    expected_missing = ["lm_head.weight"] if mc.tied_embeddings else []
    if result.unexpected_keys or sorted(result.missing_keys) != expected_missing:
        raise AssertionError(f"weight mapping for {arch} is incomplete: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise AssertionError(f"parameters left unset after loading: {meta[:5]}")
    return model.eval()


def _set_generation_defaults(model, eod: int | None) -> None:
    from transformers import GenerationConfig

    if eod is None:
        return
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's convention: one EOD token for all
        setattr(model.config, name, eod)
    model.generation_config = GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod)


def verify_export(hf_dir: Path, arch: str, weights: ModelWeights, tolerance: float) -> float:
    """Max abs difference between the logits of the export (loaded with transformers, in fp32) and of megagpt
    (with ``weights``) on a fixed random batch; ValueError above ``tolerance``."""
    from transformers import AutoModelForCausalLM

    mc = weights.model_config
    ours = build_gpt(weights)
    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=arch == "custom",
                                                  dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (VERIFY_BATCH[0], min(VERIFY_BATCH[1], mc.seq_len)),
                           generator=generator)
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    if got.shape != expected.shape:
        raise ValueError(f"verification failed: the export in {hf_dir} returns logits {tuple(got.shape)}, "
                         f"megagpt {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    print(f"verified {arch} export: max |logits difference| vs megagpt = {diff:.3g} on a {list(tokens.shape)} "
          f"random batch (tolerance {tolerance:g})")
    if not diff <= tolerance:  # also catches NaN
        raise ValueError(f"verification failed: the export in {hf_dir} differs from megagpt by {diff:.3g} "
                         f"(tolerance {tolerance:g}); it was left there unfinished for inspection")
    return diff


def export_hf(source, out_dir: str | Path, *, arch: str = "auto", dtype: str = "fp32", overwrite: bool = False,
              tokenizer=None, verify: bool = True, tolerance: float = 1e-4) -> Path:
    """Export a megagpt model to a Hugging Face directory ``out_dir``; returns its path.

    ``source``: anything ``read_model_weights`` reads (training save/step dir, consolidated dir) or a
    ``ModelWeights``. ``arch``: auto | gpt2 | custom (see the module docstring). ``dtype``: fp32 | bf16 | fp16
    weights. ``tokenizer``: a TokenizerConfig or megagpt tokenizer object; default: the config's tokenizer
    section (none recorded: the model is exported alone, with a note). ``verify``: compare the export's logits
    with megagpt's (in fp32, from the ``dtype``-rounded weights) and raise above ``tolerance``."""
    weights = source if isinstance(source, ModelWeights) else read_model_weights(source)
    mc = weights.model_config
    arch = choose_arch(mc, arch)
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(HF_DTYPES)}")
    tok = resolve_tokenizer(tokenizer, weights.tokenizer_config)
    if tok is not None and tok.vocab_size > mc.vocab_size:
        raise ValueError(f"the tokenizer ({type(tok).__name__}) has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {mc.vocab_size}: this is not the tokenizer the model was trained with")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite=True "
                              "(--overwrite)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():  # left by an interrupted or failed export
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    # The dtype-rounded weights: what the export holds, and what verification compares against.
    rounded = {name: t.to(HF_DTYPES[dtype]).float() for name, t in weights.weights.items()}
    model = _hf_model(arch, mc, rounded)
    _set_generation_defaults(model, None if tok is None else tok.eod)
    if arch == "custom":
        model.config.auto_map = {"AutoConfig": "configuration_megagpt.MegaGPTConfig",
                                 "AutoModelForCausalLM": "modeling_megagpt.MegaGPTForCausalLM"}
    model.to(HF_DTYPES[dtype]).save_pretrained(str(partial))
    if arch == "custom":
        for name in CUSTOM_CODE:
            shutil.copyfile(Path(__file__).with_name(name), partial / name)
    if tok is None:
        print("note: no tokenizer recorded in the checkpoint's config and none given: exported the model alone "
              "(give --tokenizer-type and its files to add one)")
    else:
        save_hf_tokenizer(tok, partial, mc.seq_len if mc.position == "learned" else None)
    if verify:
        verify_export(partial, arch, ModelWeights(weights.config, rounded, weights.source), tolerance)
        if tok is not None:
            count = check_hf_tokenizer(partial, tok, trust_remote_code=arch == "custom")
            print(f"verified tokenizer: AutoTokenizer gives megagpt's {type(tok).__name__} ids on a {count}-token "
                  "sample")
    move_into_place(partial, out_dir)
    return out_dir


__all__ = ["ARCHS", "HF_DTYPES", "choose_arch", "export_hf", "verify_export"]
