"""The model weights of any megagpt checkpoint, as one full tensor per GPT parameter, and a ready GPT built from them.

Every tool that needs a model but not its optimizer (evaluation, generation, the Hugging Face export, a new run's
``checkpoint.init_from``) goes through ``read_model_weights``; it accepts:

* a consolidated (universal) directory: ``tools/convert_checkpoint.py --to consolidated``, with or without
  optimizer state, or ``--from-hf`` (a Hugging Face GPT-2 imported);
* a training ``--save`` directory (its ``latest``) or one step directory, of any (tp, pp, dp) layout and ZeRO
  stage 0/1/2: consolidated in memory, from the fp32 master weights (not the bf16 module copies);
* a state-dict file (``.safetensors``, or a torch file read ``weights_only``) with a separate model config.

``load_weights_into_module`` cuts this rank's tensor-parallel slices out of the full tensors and copies them into
a GPT or a pipeline stage; resuming (megagpt/convert/resume.py) and ``init_from`` share it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megagpt.config import Config, ModelConfig, TokenizerConfig, load_model_config
from megagpt.convert.universal import (CONFIG_FILE, DTYPES, MODEL_FILE, Universal, consolidate, is_universal_dir,
                                       save_universal)


@dataclass
class ModelWeights:
    """Full weights by GPT parameter name and the config they belong to."""

    config: dict  # the saved config: a full training config, or at least {"model": ..., "tokenizer": ...}
    weights: dict[str, torch.Tensor]
    source: str  # where they were read from, for messages

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config["model"])

    @property
    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig.from_dict(self.config.get("tokenizer") or {})

    def build_tokenizer(self, tokenizer_type: str | None = None, vocab_file: str | None = None,
                        merge_file: str | None = None, tokenizer_file: str | None = None,
                        eod_token: str | None = None, required: bool = True):
        """The tokenizer the arguments (command-line flags) describe if ``tokenizer_type`` is set, else the one
        recorded in the checkpoint's config; None when neither and not ``required``. Checks that the model covers
        the tokenizer's vocabulary."""
        if tokenizer_type is not None:
            config = TokenizerConfig(type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file,
                                     tokenizer_file=tokenizer_file, eod_token=eod_token)
        elif any(arg is not None for arg in (vocab_file, merge_file, tokenizer_file, eod_token)):
            raise ValueError("tokenizer files were given without a tokenizer type (--tokenizer-type)")
        else:
            config = self.tokenizer_config
            if config.type is None and not required:
                return None
        tokenizer = config.build()
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model of {self.source} only "
                             f"{self.model_config.vocab_size} (model.vocab_size): wrong tokenizer?")
        return tokenizer


def add_tokenizer_flags(parser) -> None:
    """The ``--tokenizer-type/--vocab-file/--merge-file/--tokenizer-file/--eod-token`` flags of a tool that reads
    a checkpoint: they replace the tokenizer its config records (``tokenizer_from_flags``)."""
    from megagpt.data.tokenizers import TOKENIZER_ALIASES

    group = parser.add_argument_group("tokenizer (default: the checkpoint config's tokenizer section)")
    group.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_ALIASES))
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-file", "--eod-token"):
        group.add_argument(flag)


def tokenizer_from_flags(weights: "ModelWeights", args, required: bool):
    """``weights.build_tokenizer`` from the ``add_tokenizer_flags`` flags in ``args``."""
    return weights.build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_file,
                                   args.eod_token, required=required)


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {path} does not hold a state dict of tensors")
    return state


def read_model_weights(path: str | Path, model_config: str | Path | None = None,
                       progress: bool = False) -> ModelWeights:
    """The weights in ``path`` (any of the forms in the module docstring), as fp32 (or the saved dtype) tensors.

    ``model_config``: a JSON ModelConfig (or full config) for a bare state-dict file; for directories the saved
    config is used and ``model_config`` must be None."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_file():
        if model_config is None:
            raise ValueError(f"{path} is a bare weights file: give its model config (--model-config)")
        config = {"model": load_model_config(model_config).to_dict()}
        return ModelWeights(config, _read_state_dict_file(path), str(path))
    if model_config is not None:
        raise ValueError(f"{path} is a checkpoint directory with its own config.json; do not give --model-config")
    if is_universal_dir(path):
        from safetensors.torch import load_file

        return ModelWeights(json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / MODEL_FILE)),
                            f"consolidated checkpoint {path}")
    universal = consolidate(path, progress=progress, weights_only=True)
    return ModelWeights(universal.config, universal.weights,
                        f"{universal.source['step_dir']} ({universal.source['layout']})")


def save_model_weights(weights: ModelWeights | dict, out_dir: str | Path, config: dict | None = None,
                       dtype: str = "fp32", overwrite: bool = False, source: str = "") -> Path:
    """Write weights only as a consolidated directory (model.safetensors, config.json, state.json; no optimizer):
    what ``checkpoint.init_from``, evaluation, generation and the Hugging Face export read."""
    if isinstance(weights, ModelWeights):
        config, source, weights = weights.config, source or weights.source, weights.weights
    if config is None or "model" not in config:
        raise ValueError("save_model_weights needs the config (at least its 'model' section)")
    universal = Universal(config=config, weights=weights, moments={}, split_dims={}, optimizer="none", step=0,
                          client_state={}, source={"layout": source or "weights only"})
    return save_universal(universal, out_dir, dtype=dtype, overwrite=overwrite)


def check_weights_fit(weights: dict[str, torch.Tensor], model_config: ModelConfig, source: str) -> None:
    """Same parameter names and shapes as ``GPT(model_config)``, else ValueError listing the differences."""
    from megagpt.convert.readers import param_layout

    own = {name: shape for name, (shape, _) in param_layout(model_config).items()}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [f"{n} {tuple(weights[n].shape)} vs {tuple(s)}" for n, s in own.items()
             if n in weights and weights[n].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit the model config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes (checkpoint vs model) {wrong[:5]}")


def build_gpt(weights: ModelWeights, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              attention_backend: str | None = None, model_config: ModelConfig | None = None) -> nn.Module:
    """A single-device GPT in eval mode holding ``weights`` (``model_config`` overrides the saved one: e.g. a
    longer ``seq_len`` for an ALiBi context sweep; its parameter shapes must still fit)."""
    from megagpt.model import GPT

    config = model_config or weights.model_config
    if attention_backend is not None:
        config = dataclasses.replace(config, attention_backend=attention_backend)
    check_weights_fit(weights.weights, config, weights.source)
    model = GPT(config)  # not on the meta device: the ALiBi slopes are plain tensors computed at build time
    model.load_state_dict({n: t.float() for n, t in weights.weights.items()})
    return model.to(device=device, dtype=dtype).eval()


def load_gpt(path: str | Path, model_config: str | Path | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, attention_backend: str | None = None):
    """``read_model_weights`` + ``build_gpt``: returns ``(model, weights)``; ``weights.config`` is the saved config."""
    weights = read_model_weights(path, model_config)
    return build_gpt(weights, device, dtype, attention_backend), weights


def load_weights_into_module(module: nn.Module, weights: dict[str, torch.Tensor], split_dims: dict[str, int | None],
                             tp_rank: int = 0, tp_size: int = 1, to_gpt=None, source: str = "the checkpoint") -> None:
    """Copy this tensor-parallel rank's slice of each full tensor in ``weights`` into ``module``'s parameters.

    ``module``: a GPT (all parameters must be present) or, with ``to_gpt`` mapping its names onto the GPT's
    (``readers.PipelineNames.to_gpt``), a pipeline stage holding some of them."""
    from megagpt.convert.resume import tp_slice

    params = {}
    for name, param in module.named_parameters():
        try:
            params[name if to_gpt is None else to_gpt(name)] = param
        except ValueError as err:
            raise ValueError(f"{source} does not fit this pipeline: {err}") from None
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params)) if to_gpt is None else []
    if missing or extra:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]} "
                         "(model config changed?)")
    with torch.no_grad():
        for name, param in params.items():
            dim = split_dims[name]
            if tp_size > 1 and getattr(param, "tp_split_dim", dim) != dim:
                raise ValueError(f"parameter {name}: split dim {param.tp_split_dim} in the model, {dim} in {source}")
            local = tp_slice(weights[name], dim, tp_rank, tp_size)
            if local.shape != param.shape:
                raise ValueError(f"parameter {name}: {tuple(local.shape)} from {source} for tp rank {tp_rank} of "
                                 f"{tp_size}, {tuple(param.shape)} in the model")
            param.copy_(local.to(param.device, param.dtype))


def init_from_weights(module: nn.Module, config: Config, path: str | Path, tp_rank: int, tp_size: int,
                      pipeline: bool) -> str:
    """``checkpoint.init_from``: load the weights in ``path`` into a freshly built ``module`` (GPT or pipeline
    stage, before ``deepspeed.initialize`` copies them into the optimizer's masters). Their model config must
    describe the same parameters as the run's (``seq_len`` may differ for ALiBi; ``dropout`` and the attention
    backend are free). Returns a one-line note."""
    from megagpt.convert.readers import PipelineNames, param_layout

    weights = read_model_weights(path)
    layout = param_layout(config.model)
    theirs = param_layout(weights.model_config)
    differ = [f"{n}: {tuple(theirs[n][0]) if n in theirs else 'absent'} in {path}, {tuple(shape)} in this run"
              for n, (shape, _) in layout.items() if n not in theirs or theirs[n][0] != shape]
    if differ:
        raise ValueError(f"checkpoint.init_from={path}: its model does not match model section: {differ[:3]}")
    to_gpt = PipelineNames.for_module(module).to_gpt if pipeline else None
    load_weights_into_module(module, weights.weights, {n: d for n, (_, d) in layout.items()}, tp_rank, tp_size,
                             to_gpt, source=f"checkpoint.init_from={path}")
    return f"initialised the weights from {weights.source}"


__all__ = ["DTYPES", "ModelWeights", "add_tokenizer_flags", "build_gpt", "check_weights_fit", "init_from_weights", "load_gpt",
           "load_weights_into_module", "read_model_weights", "save_model_weights", "tokenizer_from_flags"]
