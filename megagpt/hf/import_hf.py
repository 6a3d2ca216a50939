"""Hugging Face -> megagpt: ``import_hf`` turns a local GPT-2 directory (``GPT2LMHeadModel``) or one of our own
custom-code exports into a weights-only consolidated megagpt checkpoint.

The output is what ``save_model_weights`` writes (model.safetensors, config.json, state.json) plus the tokenizer
files, copied from the Hugging Face directory and named in config.json's tokenizer section; evaluation,
generation and ``checkpoint.init_from`` (continued pretraining) read it like any consolidated checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megagpt.convert.universal import DTYPES, move_into_place
from megagpt.convert.weights import check_weights_fit, save_model_weights
from megagpt.hf import layouts

# Buffers older GPT-2 checkpoints saved beside the weights (the causal mask); transformers no longer uses them.
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``hf_dir``'s weights: model.safetensors or pytorch_model.bin, single or sharded (index)."""
    from safetensors.torch import load_file

    def load(path: Path):
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return load(hf_dir / name)
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load(hf_dir / shard))
            return state
    raise ValueError(f"{hf_dir} holds no model.safetensors or pytorch_model.bin (single or with an .index.json)")


def _model_config(config: dict, source: Path, make_vocab_size_divisible_by: int):
    """The megagpt ModelConfig of a Hugging Face ``config.json`` (GPT-2 or our custom-code export)."""
    model_type = config.get("model_type")
    try:
        if model_type == "gpt2":
            return layouts.model_config_from_gpt2(config, str(source), make_vocab_size_divisible_by)
        if model_type == "megagpt":
            return layouts.model_config_from_custom(config, make_vocab_size_divisible_by)
    except KeyError as err:
        raise ValueError(f"{source} has no field {err.args[0]!r}") from None
    raise ValueError(f"{source}: model_type={model_type!r}; import_hf reads GPT-2 ('gpt2') models and megagpt "
                     "custom-code exports ('megagpt') only")


def _mapped_weights(hf_dir: Path, mc, model_type: str) -> dict[str, torch.Tensor]:
    """The megagpt state dict of the Hugging Face weights in ``hf_dir``."""
    state = read_hf_state_dict(hf_dir)
    try:
        if model_type == "megagpt":
            return layouts.from_custom(state, mc)
        state = {n: t for n, t in state.items() if not n.endswith(GPT2_BUFFERS)}
        if mc.tied_embeddings:
            state.pop("lm_head.weight", None)  # some saves store the tied copy too
        return layouts.from_gpt2(state, mc)
    except KeyError as err:
        raise ValueError(f"{hf_dir}: tensor {err.args[0]} is missing from the weights") from None
    except (ValueError, RuntimeError) as err:  # RuntimeError: a tensor whose shape does not fit config.json
        raise ValueError(f"{hf_dir}: the weights do not fit config.json: {err}") from None


def _tokenizer_files(hf_dir: Path) -> tuple[dict, list[str]]:
    """The tokenizer section (bare file names, see ``_in_dir``) and the files to copy; empty when none."""
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        return {"type": "GPT2BPETokenizer", "vocab_file": "vocab.json", "merge_file": "merges.txt"}, \
            ["vocab.json", "merges.txt"]
    if (hf_dir / "tokenizer.json").is_file():
        eos = None
        if (hf_dir / "tokenizer_config.json").is_file():
            eos = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        return {"type": "HFTokenizer", "tokenizer_file": "tokenizer.json", "eod_token": eos}, ["tokenizer.json"]
    return {}, []


def _in_dir(section: dict, directory: Path) -> dict:
    """``section`` with its ``*_file`` names made paths in ``directory``."""
    return {k: str(directory / v) if k.endswith("_file") else v for k, v in section.items()}


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "fp32", overwrite: bool = False,
              make_vocab_size_divisible_by: int = 128) -> Path:
    """Import ``hf_dir`` (a local GPT-2 or megagpt custom-code export) as a megagpt consolidated checkpoint in
    ``out_dir`` (weights only, ``dtype`` fp32 | bf16); returns its path.

    The vocabulary is padded to ``make_vocab_size_divisible_by`` with zero rows. The tokenizer (vocab.json +
    merges.txt as GPT2BPETokenizer, else tokenizer.json as HFTokenizer) is copied into ``out_dir`` and recorded
    with absolute paths (tokenizer paths in a config are relative to the working directory)."""
    from megagpt.config import TokenizerConfig

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite=True "
                              "(--overwrite)")
    config = json.loads((hf_dir / "config.json").read_text())
    mc = _model_config(config, hf_dir / "config.json", make_vocab_size_divisible_by)
    weights = _mapped_weights(hf_dir, mc, config["model_type"])
    weights = {name: t.float() for name, t in weights.items()}
    check_weights_fit(weights, mc, f"{hf_dir}: the weights (vs its config.json)")

    section, files = _tokenizer_files(hf_dir)
    if section:  # built from hf_dir now, so that a tokenizer megagpt cannot read fails before anything is written
        tokenizer = TokenizerConfig.from_dict(_in_dir(section, hf_dir)).build()
        if tokenizer.vocab_size > mc.vocab_size:
            raise ValueError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size "
                             f"is {mc.vocab_size}")
        section = _in_dir(section, out_dir.resolve())
    else:
        print(f"note: {hf_dir} has no tokenizer (vocab.json + merges.txt or tokenizer.json): imported the model "
              "alone")
    megagpt_config = {"model": mc.to_dict(), **({"tokenizer": section} if section else {})}

    # save_model_weights writes OUT.partial atomically; the tokenizer files join it before the final rename.
    partial = out_dir.with_name(out_dir.name + ".partial")
    save_model_weights(weights, partial, config=megagpt_config, dtype=dtype, overwrite=True,
                       source=f"Hugging Face {config.get('model_type')} model {hf_dir}")
    for name in files:
        shutil.copyfile(hf_dir / name, partial / name)
    move_into_place(partial, out_dir)
    print(f"imported {hf_dir} ({config.get('model_type')}, {sum(t.numel() for t in weights.values()):,} parameters "
          f"with the vocabulary padded to {mc.padded_vocab_size}) into {out_dir}")
    return out_dir


__all__ = ["import_hf", "read_hf_state_dict"]
