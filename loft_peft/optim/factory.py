"""The public optimizer factory (the factor pairs come from :mod:`.groups`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..distributed import check_distributed_setup
from .adamw import LoftAdamW
from .groups import loft_factor_pairs, loft_param_groups
from .muon import LoftMuon

__all__ = ["OPTIMIZERS", "create_loft_optimizer", "loft_factor_pairs", "loft_param_groups"]


OPTIMIZERS = ("adamw", "muon")
# Options create_loft_optimizer passes on to each optimizer class, beyond the ones every optimizer takes.
ADAMW_OPTIONS = ("foreach", "compile", "simple_rescale", "memory_budget", "max_consecutive_skips")
MUON_OPTIONS = ("momentum", "nesterov", "ns_steps", "scale", "adamw_lr", "foreach", "max_consecutive_skips")


def create_loft_optimizer(
    model: nn.Module,
    *,
    lr: float,
    optimizer: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    variant: str = "full",
    alternate: bool = True,
    calibrate: bool = True,
    **options: Any,
) -> torch.optim.Optimizer:
    """Create the LoFT optimizer for a model wrapped with a :class:`~loft_peft.LoftConfig`.

    Each LoFT layer's ``(loft_B, loft_A)`` pair of an active adapter gets LoFT; every other trainable parameter (biases,
    heads, ``modules_to_save``) gets plain AdamW inside the same optimizer.

    Args:
        model: the ``PeftModel`` (or any module holding LoFT layers).
        lr: learning rate (for ``optimizer="muon"``, the LoFT-Muon rate of the factor pairs).
        optimizer: ``"adamw"`` (LoFT-AdamW, Algorithm 1) or ``"muon"`` (LoFT-Muon, Algorithm 5).
        betas, eps, weight_decay: AdamW's hyperparameters (for Muon: the AdamW part and the shared weight decay).
        variant: ``"full"`` (LoFT) or ``"simple"`` (LoFT-simple); AdamW only.
        alternate: move one factor per step (block 1); ``False`` is the no-alternation ablation.
        calibrate: carry moments across subspace changes (blocks 3-4); ``False`` is the no-calibration ablation.
        **options: passed to the optimizer class.

            * ``optimizer="adamw"`` (:class:`LoftAdamW`): ``simple_rescale`` (LoFT-simple's step scaled to the norm
              it would have with an orthonormal other factor; see there), ``memory_budget`` and
              ``max_consecutive_skips`` (see there), ``foreach`` (default ``True``: same-shape layers batched;
              ``False``: each layer a batch of its own; on x86-64 CPUs with AVX2 or AVX-512, in fp32, the fast path
              runs fused C kernels) and ``compile`` (default ``False``: ``torch.compile`` the elementwise part of the
              fast path's PyTorch operations, used on GPUs and where the C kernels are not used).
            * ``optimizer="muon"`` (:class:`LoftMuon`): ``momentum`` (default 0.95), ``nesterov`` (``False``),
              ``ns_steps`` (5 Newton-Schulz iterations), ``scale`` (``"rms"``, the default, so AdamW learning
              rates carry over; ``"spectral"`` or ``"none"`` for Muon rates of about 0.02) and ``adamw_lr`` (the
              rate of the parameters that get AdamW; default ``lr``).

    Returns:
        A :class:`LoftAdamW` or :class:`LoftMuon`.

    Raises:
        ValueError: an unknown optimizer or variant, a bad hyperparameter, no LoFT layer in the model, or a
            distributed set-up that breaks the factor pairs (DeepSpeed, FSDP1).
        TypeError: an option the chosen optimizer does not have.
    """
    check_distributed_setup()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    allowed = ADAMW_OPTIONS if optimizer == "adamw" else MUON_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"Unexpected options for optimizer={optimizer!r}: {unknown}; it takes {sorted(allowed)}."
        )
    if optimizer == "adamw":
        return LoftAdamW(
            loft_param_groups(model),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            variant=variant,
            alternate=alternate,
            calibrate=calibrate,
            **options,
        )
    if variant != "full":
        raise ValueError("LoFT-Muon has no 'simple' variant; leave `variant` at its default.")
    return LoftMuon(
        loft_param_groups(model),
        lr=lr,
        adamw_betas=betas,
        adamw_eps=eps,
        weight_decay=weight_decay,
        alternate=alternate,
        calibrate=calibrate,
        **options,
    )
