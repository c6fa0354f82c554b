"""Finding factor pairs through the LoFT layers, and the public optimizer factory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..distributed import check_distributed_setup
from ..tuner.layer import LoftLayer


def loft_factor_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(loft_B, loft_A)`` of every LoFT layer's active, trainable adapters, in module order.

    Pairs come from the layers themselves (``LoftLayer.loft_B[name]``, ``LoftLayer.loft_A[name]``), never from
    parameter names.
    """
    pairs = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, LoftLayer):
            continue
        for name in module.active_adapters:
            if name not in module.loft_A:
                continue
            module.mark_factors(name)
            b_param, a_param = module.loft_B[name], module.loft_A[name]
            if not (b_param.requires_grad or a_param.requires_grad) or id(b_param) in seen:
                continue
            seen.add(id(b_param))
            pairs.append((b_param, a_param))
    return pairs


def loft_param_groups(model: nn.Module, **factor_group_options: Any) -> list[dict[str, Any]]:
    """Parameter groups for a LoFT optimizer: one factor group of (B, A) pairs, one plain group for the rest.

    Args:
        model: a model holding LoFT layers (a ``PeftModel`` or the model ``get_peft_model`` wrapped).
        **factor_group_options: options stored on the factor group only (e.g. a different ``lr``).

    Raises:
        ValueError: the model has no LoFT layer with an active, trainable adapter.
    """
    pairs = loft_factor_pairs(model)
    if not pairs:
        raise ValueError(
            "The model has no LoFT layer with an active, trainable adapter: wrap it with "
            "`get_peft_model(model, LoftConfig(...))` (after `import loft_peft`) before creating the optimizer."
        )
    in_pairs = {id(p) for pair in pairs for p in pair}
    for pair in pairs:
        for p in pair:
            p.requires_grad_(True)
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.loft_name = name  # for messages that name a parameter (e.g. one whose gradients are not finite)
    groups: list[dict[str, Any]] = [{"params": [p for pair in pairs for p in pair], "loft": True, **factor_group_options}]
    if plain:
        groups.append({"params": plain, "loft": False})
    return groups


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
        from .adamw import LoftAdamW

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
    from .muon import LoftMuon

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
