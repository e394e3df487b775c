"""Backward-only gradient scaling, as CAL and ARL use to accelerate an encoder.

Both methods reinforce a modality by multiplying the gradient that reaches its
encoder through the encoder's output feature (CAL by 1 + ρ_m, ARL by 1 + w_m).
The forward pass must not change: the fused prediction, the losses and every
statistic computed from them stay exactly those of the unscaled model, only
how hard the encoder is pushed differs. A tensor hook does that: it touches
no value in the forward pass and can be attached after the forward pass,
once the factor (which both methods compute from that same pass) is known.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.hooks import RemovableHandle


def scale_gradient_(tensor: Tensor, factor: Tensor | float) -> RemovableHandle | None:
    """Multiply the gradient flowing back through ``tensor`` by ``factor``; its value is untouched.

    The hook sees the gradient summed over every use of ``tensor``, so all
    paths into the encoder are scaled alike. ``factor`` is a float or a
    (detached) tensor broadcastable to ``tensor``. A tensor outside the graph
    (no gradient) is left alone and None is returned.
    """
    if not tensor.requires_grad:
        return None
    if isinstance(factor, Tensor):
        factor = factor.detach()
    return tensor.register_hook(lambda grad: grad * factor)
