"""Per-example gradients of a GPT's weight matrices, projected LoGra-style: the full gradient is never formed.

Every covered parameter is a matrix ``W [rows, cols]`` whose gradient for one example (a row of a batch) is a sum
of outer products over its positions::

    dL/dW = sum_t u_t ⊗ v_t
    linear      u_t = dL/d(output_t)          v_t = [input_t, 1]   (the bias is W's last column)
    embedding   u_t = onehot(token_t)         v_t = dL/d(embedding output_t)
    tied head   u_t = dL/d(logits_t)          v_t = final hidden_t  (the same W as the embedding: the two add up)
    untied head u_t = dL/d(logits_t)          v_t = final hidden_t

With random projections ``P_r [k, rows]``, ``P_c [k, cols]`` the projected gradient is
``P_r dL/dW P_c^T = sum_t (P_r u_t) ⊗ (P_c v_t)``: ``[k, k]`` per matrix from two ``[positions, k]`` products,
never ``[rows, cols]`` (LoGra, arXiv:2405.13954; EleutherAI's bergson). ``P = N(0, 1) / sqrt(k)`` keeps inner
products in expectation (Johnson-Lindenstrauss). Each matrix's two projections are drawn from a generator seeded
with ``(seed, parameter name, side)``: every rank, every checkpoint and every call builds the same ones.

A factored preconditioner ``D = a ⊗ b`` (``adam.py``: Adam's second moment, Adafactor-style) scales ``u`` by ``a``
and ``v`` by ``b`` before projecting: it is folded into the projection matrices (``M_r = (P_r diag(a))^T``).
``projection_dim=None`` keeps the full gradient (``M = diag(a)``, identity without a preconditioner): a check
against the exact reference on tiny models, not a mode for real ones.

LayerNorm gains and biases are not covered (they are vectors, a small share of the parameters; bergson also skips
them). Only single-device GPTs (no tensor parallelism): influence scoring is data-parallel only.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Without a projection every side is a dense [side, side] matrix: refuse sides that would not fit comfortably.
MAX_UNPROJECTED_SIDE = 4096


@dataclass(frozen=True)
class GradientBlock:
    """One covered weight matrix: ``name`` its parameter in ``GPT.state_dict()``; ``cols`` counts the bias column."""

    name: str
    kind: str  # "linear", "embedding" (word embedding, and the tied head), "position", "head" (untied)
    rows: int
    cols: int
    bias: str | None = None  # the bias parameter, stored as the last column

    @property
    def features(self) -> tuple[int, int]:
        """(rows, columns) of the layer itself, without the bias column: what a projection may not exceed."""
        return self.rows, self.cols - (self.bias is not None)


def _head_module(model) -> nn.Module | None:
    """The untied output head (its ``proj`` is applied with F.linear, so its forward hooks never fire)."""
    return None if model._tied_head else model.layers[2 + model._num_blocks]


def gradient_blocks(model) -> list[GradientBlock]:
    """The matrices whose per-example gradients influence scoring covers, in a fixed order."""
    if getattr(model.layer_factory, "tp_size", 1) != 1:
        raise ValueError("influence scoring needs a single-device GPT (tensor parallelism is not supported)")
    embedding = model.embedding
    word = embedding.word_embeddings.weight
    blocks = [GradientBlock("layers.0.word_embeddings.weight", "embedding", word.shape[0], word.shape[1])]
    if embedding.position_embeddings is not None:
        pos = embedding.position_embeddings.weight
        blocks.append(GradientBlock("layers.0.position_embeddings.weight", "position", pos.shape[0], pos.shape[1]))
    head = _head_module(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (head is None or module is not head.proj):
            bias = f"{name}.bias" if module.bias is not None else None
            blocks.append(GradientBlock(f"{name}.weight", "linear", module.out_features,
                                        module.in_features + (bias is not None), bias))
    if head is not None:
        index = 2 + model._num_blocks
        blocks.append(GradientBlock(f"layers.{index}.proj.weight", "head", *head.proj.weight.shape))
    return blocks


def _seed_of(seed: int, name: str, side: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{side}".encode())) % (2**63 - 1)


def projection_matrix(size: int, dim: int, seed: int, name: str, side: str) -> torch.Tensor:
    """``P^T``: ``[size, dim]``, N(0, 1/dim) entries drawn on the CPU from a generator seeded by (seed, name, side),
    so that every rank and device gets the same matrix."""
    generator = torch.Generator().manual_seed(_seed_of(seed, name, side))
    return torch.randn(size, dim, generator=generator, dtype=torch.float32) / dim ** 0.5


def check_projection_dim(blocks: list[GradientBlock], projection_dim: int | None) -> None:
    """Refuse a projection wider than a layer it projects (it would add dimensions, not remove them)."""
    if projection_dim is None:
        too_big = [f"{b.name} {b.rows}x{b.cols}" for b in blocks if max(b.rows, b.cols) > MAX_UNPROJECTED_SIDE]
        if too_big:
            raise ValueError(f"without a projection every matrix's gradient is kept whole; {too_big[:3]} have a side "
                             f"over {MAX_UNPROJECTED_SIDE}: give a projection size (--projection-dim)")
        return
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
        raise ValueError(f"--projection-dim must be an integer >= 1, got {projection_dim!r}")
    for block in blocks:
        rows, cols = block.features
        if projection_dim > min(rows, cols):
            raise ValueError(f"--projection-dim {projection_dim} is larger than the layer it projects: {block.name} is "
                             f"{rows} x {cols}; use at most {min(rows, cols)}")


class ProjectedGradients:
    """Projected per-row gradients of a GPT for a weighted next-token loss.

    ``preconditioner``: parameter name -> ``(a [rows], b [cols])`` (``adam.adam_factors``), or None.
    ``dim``: the length of each row's vector, ``sum over blocks of k_rows * k_cols``.
    """

    def __init__(self, model, projection_dim: int | None, seed: int = 0,
                 preconditioner: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.model = model
        self.blocks = gradient_blocks(model)
        check_projection_dim(self.blocks, projection_dim)
        self.projection_dim = projection_dim
        device = next(model.parameters()).device
        self.sides: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for block in self.blocks:
            a, b = (None, None) if preconditioner is None else preconditioner[block.name]
            self.sides[block.name] = (self._side(block.rows, block.name, "rows", seed, a).to(device),
                                      self._side(block.cols, block.name, "cols", seed, b).to(device))
        self.dim = sum(r.shape[1] * c.shape[1] for r, c in self.sides.values())

    def _side(self, size: int, name: str, side: str, seed: int, scale: torch.Tensor | None) -> torch.Tensor:
        """``M [size, k]``: ``u @ M`` is the (preconditioned) projection of a side vector ``u``."""
        if self.projection_dim is None:
            matrix = torch.eye(size)
        else:
            matrix = projection_matrix(size, self.projection_dim, seed, name, side)
        return matrix if scale is None else matrix * scale.float()[:, None]

    def _capture(self):
        """Forward hooks: each linear's input and output, the embedding's output, the final hidden states."""
        captured: dict[str, tuple] = {}
        handles = []
        modules = dict(self.model.named_modules())
        for block in self.blocks:
            if block.kind == "linear":
                module = modules[block.name.rsplit(".", 1)[0]]
                handles.append(module.register_forward_hook(
                    lambda m, args, out, key=block.name: captured.__setitem__(key, (args[0].detach(), out))))
        handles.append(self.model.embedding.register_forward_hook(
            lambda m, args, out: captured.__setitem__("embedding", (None, out))))
        handles.append(self.model.final_norm.register_forward_hook(
            lambda m, args, out: captured.__setitem__("final", (out.detach(), None))))
        return captured, handles

    def per_row(self, tokens: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Projected gradient of ``sum_t weights[b, t] * nll(targets[b, t])`` for each row ``b`` of ``tokens``
        ``[batch, seq]``; returns ``[batch, dim]`` float32. Rows are independent (causal attention, per-token
        norms), and a position of weight 0 contributes nothing: right padding is free."""
        captured, handles = self._capture()
        try:
            with torch.enable_grad():
                logits = self.model(tokens)  # [b, s, vocab]
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                      reduction="none").view(targets.shape)
                loss = (nll * weights).sum()
                keys = [b.name for b in self.blocks if b.kind == "linear"]
                outputs = [captured[k][1] for k in keys] + [captured["embedding"][1], logits]
                grads = torch.autograd.grad(loss, outputs)
        finally:
            for handle in handles:
                handle.remove()
        out_grads = dict(zip(keys, grads))
        embedding_grad, logits_grad = grads[-2].float(), grads[-1].float()
        final_hidden = captured["final"][0].float()
        batch, seq = tokens.shape
        parts = []
        for block in self.blocks:
            rows_m, cols_m = self.sides[block.name]
            if block.kind == "linear":
                inputs = captured[block.name][0].float()
                if block.bias is not None:
                    inputs = torch.cat([inputs, inputs.new_ones(batch, seq, 1)], dim=-1)
                pairs = [(out_grads[block.name].float() @ rows_m, inputs @ cols_m)]
            elif block.kind == "embedding":
                pairs = [(rows_m[tokens], embedding_grad @ cols_m)]
                if self.model._tied_head:
                    pairs.append((logits_grad @ rows_m[:logits_grad.shape[-1]], final_hidden @ cols_m))
            elif block.kind == "position":
                positions = torch.arange(seq, device=tokens.device)
                pairs = [(rows_m[positions].expand(batch, seq, -1), embedding_grad @ cols_m)]
            else:  # untied head
                pairs = [(logits_grad @ rows_m[:logits_grad.shape[-1]], final_hidden @ cols_m)]
            # sum over positions of outer products: [b, k_r, s] @ [b, s, k_c]
            projected = sum(torch.bmm(u.transpose(1, 2), v) for u, v in pairs)
            parts.append(projected.reshape(batch, -1))
        return torch.cat(parts, dim=1)

    def bytes_per_row(self, dtype: torch.dtype = torch.float32) -> int:
        """Memory of one row's projected gradient."""
        return self.dim * torch.empty(0, dtype=dtype).element_size()


__all__ = ["GradientBlock", "MAX_UNPROJECTED_SIDE", "ProjectedGradients", "check_projection_dim",
           "gradient_blocks", "projection_matrix"]
