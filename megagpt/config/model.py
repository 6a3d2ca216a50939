"""The model section: ``ModelConfig`` and the analytic parameter count."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megagpt.config._fields import read_json_file, _check_positive_int, _section_from_dict

POSITION_TYPES = ("alibi", "learned", "none")
ATTENTION_BACKENDS = ("auto", "triton", "flex", "sdpa", "reference", "flash")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of the GPT decoder (see megagpt/model/gpt.py).

    ``dropout`` applies to the embedding output and to each residual branch; attention
    probabilities are never dropped, because the fused attention kernels do not support it.
    """

    vocab_size: int
    seq_len: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * d_model
    position: str = "alibi"  # one of POSITION_TYPES
    parallel_residual: bool = True  # x + attn(ln(x)) + mlp(ln(x)) instead of GPT-2's sequential form
    shared_layernorm: bool = False  # parallel residual only: one LayerNorm feeds both branches
    bias: bool = True  # biases in linears and LayerNorms
    tied_embeddings: bool = True
    dropout: float = 0.0
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS; auto = triton on CUDA where it applies, else sdpa
    fused_kernels: bool = True  # fused Triton LayerNorm and cross-entropy on CUDA (megagpt/model/fused_ops.py)
    layernorm_eps: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    init_std: float = 0.02

    def __post_init__(self) -> None:
        s = "model"
        for name in ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads",
                     "make_vocab_size_divisible_by"):
            _check_positive_int(s, name, getattr(self, name))
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"{s}.d_model={self.d_model} is not divisible by {s}.num_heads={self.num_heads}; "
                    f"set {s}.head_dim explicitly")
        else:
            _check_positive_int(s, "head_dim", self.head_dim)
        if self.position not in POSITION_TYPES:
            raise ValueError(f"{s}.position={self.position!r} is not one of {list(POSITION_TYPES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"{s}.attention_backend={self.attention_backend!r} is not one of {list(ATTENTION_BACKENDS)}")
        for name in ("parallel_residual", "shared_layernorm", "bias", "tied_embeddings", "fused_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{s}.{name} must be true or false, got {getattr(self, name)!r}")
        if self.shared_layernorm and not self.parallel_residual:
            raise ValueError(f"{s}.shared_layernorm=true needs {s}.parallel_residual=true")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) \
                or self.mlp_ratio <= 0:
            raise ValueError(f"{s}.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        hidden = self.mlp_ratio * self.d_model
        if abs(hidden - round(hidden)) > 1e-9:
            raise ValueError(f"{s}.mlp_ratio={self.mlp_ratio} * d_model={self.d_model} = {hidden} "
                             "is not a whole number of MLP units")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{s}.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layernorm_eps > 0:
            raise ValueError(f"{s}.layernorm_eps must be > 0, got {self.layernorm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"{s}.init_std must be > 0, got {self.init_std!r}")

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: ``head_dim`` if given, else ``d_model // num_heads``."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated heads (``num_heads * head_dim``); may differ from d_model."""
        return self.num_heads * self.resolved_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        """Hidden width of the MLP."""
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to ``make_vocab_size_divisible_by`` (fast matmuls, even TP shards)."""
        multiple = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / multiple) * multiple

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (e.g. parsed JSON); unknown keys raise ValueError naming them."""
        return _section_from_dict(cls, values, "model")

    def to_dict(self) -> dict[str, Any]:
        """The user inputs as a JSON-serialisable dict (round-trips through ``from_dict``)."""
        return dataclasses.asdict(self)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a ModelConfig from a JSON file.

    The file holds either the ModelConfig fields themselves or a full config whose ``"model"``
    key holds them (the layout of the complete training config).
    """
    path = Path(path)
    values = read_json_file(path, "model config file")
    if isinstance(values, dict) and isinstance(values.get("model"), dict):
        values = values["model"]
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def parameter_count(model: ModelConfig) -> int:
    """Parameters of ``megagpt.model.GPT(model)``, computed from the shape (a tied head counts once)."""
    d, width, hidden = model.d_model, model.attention_width, model.ffn_hidden_size
    bias = 1 if model.bias else 0
    layernorm = d * (1 + bias)
    count = model.padded_vocab_size * d  # token embedding
    if model.position == "learned":
        count += model.seq_len * d
    per_layer = (layernorm * (1 if model.shared_layernorm else 2)
                 + d * 3 * width + bias * 3 * width  # fused QKV
                 + width * d + bias * d  # attention output projection
                 + d * hidden + bias * hidden  # MLP up
                 + hidden * d + bias * d)  # MLP down
    count += model.num_layers * per_layer + layernorm  # blocks and the final LayerNorm
    if not model.tied_embeddings:
        count += model.padded_vocab_size * d  # untied output head (no bias)
    return count
