"""Adam-preconditioned training gradients (LESS, arXiv:2402.04333) in a form the projection can carry.

LESS scores a training example by the Adam update its gradient would make, ``g / (sqrt(v_hat) + eps)``, with
``v`` the checkpoint's second moment. That is elementwise on the full gradient, which the projected path never
forms. As bergson does, the second moment of each matrix ``W [rows, cols]`` is factored Adafactor-style
(Shazeer & Stern 2018)::

    v_hat = exp_avg_sq / (1 - beta2^step)          (Adam's bias correction)
    r = v_hat.mean(cols)   c = v_hat.mean(rows)   m = v_hat.mean()      v_hat ≈ r c^T / m
    D = 1 / sqrt(r c^T / m) = a ⊗ b,   a = (r + eps^2)^-1/2,   b = (m / (c + eps^2))^1/2

so that ``D ⊙ (u ⊗ v) = (a ⊙ u) ⊗ (b ⊙ v)`` and the preconditioner is folded into the projections
(projection.py). Adam's ``eps`` enters squared under each root (it only keeps rows and columns that were never
updated, such as unused vocabulary rows, finite). A linear's bias is its matrix's last column, so its moment is
that column of ``v``. The momentum term of the update is left out: it is the same for every document (a shift of
all scores by one constant per checkpoint, up to the learning-rate weights).

Only fp32 moments are accepted (torch AdamW checkpoints); 8-bit (bitsandbytes) moments are refused.
"""
from __future__ import annotations

import torch

from megagpt.selection.projection import GradientBlock


def second_moment_matrix(block: GradientBlock, moments: dict[str, dict[str, torch.Tensor]],
                         source: str) -> torch.Tensor:
    """``exp_avg_sq`` of ``block`` as ``[rows, cols]`` float64 (the bias moment as the last column)."""
    def moment(name: str) -> torch.Tensor:
        state = moments.get(name) or {}
        if "exp_avg_sq" not in state:
            kinds = sorted(state) or "none"
            raise ValueError(f"{source} has no fp32 Adam second moment (exp_avg_sq) for {name} (its optimizer state: "
                             f"{kinds}): --adam needs a checkpoint of torch AdamW with its optimizer state")
        return state["exp_avg_sq"].double()

    v = moment(block.name)
    if block.bias is not None:
        v = torch.cat([v, moment(block.bias)[:, None]], dim=1)
    if tuple(v.shape) != (block.rows, block.cols):
        raise ValueError(f"{source}: the moment of {block.name} is {tuple(v.shape)}, the model's matrix "
                         f"{(block.rows, block.cols)}")
    return v


def adam_factors(blocks: list[GradientBlock], moments: dict[str, dict[str, torch.Tensor]], step: float,
                 beta2: float, eps: float, source: str = "the checkpoint") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Parameter name -> ``(a [rows], b [cols])`` with ``a ⊗ b ≈ 1 / sqrt(v_hat)`` (module docstring)."""
    if step < 1:
        raise ValueError(f"{source}: the optimizer has taken no step (step {step}): it holds no second moment")
    correction = 1.0 - beta2 ** step
    floor = eps ** 2
    factors = {}
    for block in blocks:
        v_hat = second_moment_matrix(block, moments, source) / correction
        row_mean, col_mean, mean = v_hat.mean(dim=1), v_hat.mean(dim=0), v_hat.mean()
        factors[block.name] = ((row_mean + floor).rsqrt(), (mean / (col_mean + floor)).sqrt())
    return factors


def preconditioner_matrix(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``a ⊗ b`` as a full ``[rows, cols]`` matrix (the exact reference multiplies full gradients by it)."""
    a, b = factors
    return torch.outer(a.double(), b.double())


__all__ = ["adam_factors", "preconditioner_matrix", "second_moment_matrix"]
