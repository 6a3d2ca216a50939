"""Plain PyTorch cross-entropy with z-loss, the reference that ``megagpt.kernels.cross_entropy`` is tested against."""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per token ``logsumexp(logits) - logits[target] + z_loss * logsumexp(logits)**2``, then reduced.

    ``logits`` is ``[..., vocab]`` and ``targets`` the matching ``[...]`` integer tensor; tokens whose target is
    ``ignore_index`` contribute 0 and are not counted by ``"mean"`` (which divides by the number of the other
    tokens, giving nan when there are none, as ``torch.nn.functional.cross_entropy`` does). ``"none"`` returns the
    per-token losses with the shape of ``targets``. Computes in the dtype of ``logits``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lse = torch.logsumexp(logits, dim=-1)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    per_token = torch.where(keep, lse - target_logit + z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / keep.sum()
