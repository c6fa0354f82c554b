"""A warning, once per optimizer, when an optimizer that is not LoFT's trains LoFT factors.

``SFTTrainer(model, peft_config=LoftConfig(...))`` with no optimizer, or ``torch.optim.AdamW(model.parameters())``,
trains the factors as plain AdamW: that is LoRA with alpha = r, not LoFT. The LoFT layers mark their factors
(:mod:`loft_peft.tuner.layer`), and a global ``torch.optim`` step pre-hook looks at each optimizer once, at its
first step, and warns if it steps a marked factor without being a LoFT optimizer.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..tuner.layer import is_loft_factor

_seen: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_installed = False


def warn_if_not_loft(optimizer: torch.optim.Optimizer) -> bool:
    """Warn (once per optimizer) if ``optimizer`` is not a LoFT optimizer and steps LoFT factors; True if it warned."""
    from .base import LoftOptimizerBase

    inner = optimizer
    while not isinstance(inner, LoftOptimizerBase) and isinstance(getattr(inner, "optimizer", None),
                                                                  torch.optim.Optimizer):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer and the like
    if inner in _seen:
        return False
    _seen.add(inner)
    if isinstance(inner, LoftOptimizerBase):
        return False
    factors = [p for group in inner.param_groups for p in group["params"] if is_loft_factor(p)]
    if not factors:
        return False
    warnings.warn(
        f"{type(inner).__name__} is training {len(factors)} LoFT factors (loft_A / loft_B) as plain parameters: that is "
        "LoRA with alpha = r, not LoFT. Use LoFT's optimizer: `create_loft_optimizer(model, lr=...)` (with "
        "`LoftCallback` in a Trainer), `LoftTrainer`, or `loft_peft.trl.LoftSFTTrainer` and its siblings for TRL.",
        UserWarning,
        stacklevel=3,
    )
    return True


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer not in _seen:
        warn_if_not_loft(optimizer)


def install_step_hook() -> None:
    """Register the global step pre-hook (once per process; ``import loft_peft`` does it)."""
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_step_pre_hook)
        _installed = True
