"""One optimiser update, shared by every training method."""

from __future__ import annotations

import torch


def apply_gradients(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Backward (scaled when fp16 needs it), clip the gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
