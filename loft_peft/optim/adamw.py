"""LoFT-AdamW (Algorithm 1): an optimizer for the LoFT factors that behaves like AdamW on the full weight."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import maths
from .base import MOVE_A, MOVE_B, LoftOptimizerBase, check_common_hyperparameters, maths_dtype

VARIANTS = ("full", "simple")


class LoftAdamW(LoftOptimizerBase):
    """LoFT-AdamW: alternating, scaled, calibrated Adam on ``(loft_B, loft_A)`` pairs; AdamW on everything else.

    For each layer, with ``U = loft_B`` (m, r) and ``V = loft_A^T`` (n, r), one step

    1. scales both factor gradients by the other factor's inverse Gram matrix (block 2, eq. 5);
    2. carries both first moments into the current subspaces (block 3, eq. 7) and, for ``variant="full"``, the packed
       second-moment cross terms too (block 4, eqs. 11-12);
    3. moves one factor (block 1; B first, as it starts at zero) by the full-space Adam update rebuilt from the moments
       and projected back onto the factor (block 5, eq. 13), after decoupled weight decay ``U <- (1 - lr wd) U``.

    With ``r = m = n`` and full-rank factors this is ``torch.optim.AdamW`` on ``W = W0 + U V^T``.
    Use :meth:`clip_grad_norm_` before :meth:`step` for the paper's effective-gradient clipping (block 6).

    Args:
        params: a model holding LoFT layers (pairs are found through the layers' active adapters), or parameter groups
            as built by :func:`loft_peft.loft_param_groups` (factor groups carry ``"loft": True``).
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: added to ``sqrt(v^)``, as in ``torch.optim.AdamW``.
        weight_decay: decoupled weight decay.
        variant: ``"full"`` (cross-term second moments, projected full update) or ``"simple"`` (LoFT-simple: calibrated
            first moment, elementwise second moment of the scaled gradient, Adam step applied to the factor).
        alternate: move one factor per step (block 1). ``False`` moves both (the paper's no-alternation ablation).
        calibrate: carry moments across subspace changes (blocks 3-4). ``False`` is the no-calibration ablation.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "full",
        alternate: bool = True,
        calibrate: bool = True,
    ):
        check_common_hyperparameters(lr, betas, eps, weight_decay)
        if variant not in VARIANTS:
            raise ValueError(f"Unknown LoFT-AdamW variant {variant!r}; choose one of {VARIANTS}.")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            variant=variant,
            alternate=bool(alternate),
            calibrate=bool(calibrate),
        )
        super().__init__(params, defaults)

    def _init_pair_state(
        self, group: dict[str, Any], b_param: Tensor, a_param: Tensor, u: Tensor, v: Tensor
    ) -> None:
        rank = u.shape[1]
        second = "cross_sq" if group["variant"] == "full" else "exp_avg_sq"
        for state, x in ((self.state[b_param], u), (self.state[a_param], v)):
            state["exp_avg"] = torch.zeros_like(x)
            if second == "cross_sq":
                state["cross_sq"] = x.new_zeros(x.shape[0], maths.packed_size(rank))
            else:
                state["exp_avg_sq"] = torch.zeros_like(x)
            state["prev"] = x.clone()
        self.state[b_param]["step"] = torch.tensor(0.0)
        self.state[b_param]["moving"] = torch.tensor(MOVE_B)

    def _step_pair(self, group: dict[str, Any], b_param: Tensor, a_param: Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        dtype = maths_dtype(b_param)
        u = b_param.detach().to(dtype)  # (m, r)
        v = a_param.detach().T.to(dtype)  # (n, r)
        grad_u = b_param.grad.to(dtype) if b_param.grad is not None else torch.zeros_like(u)
        grad_v = a_param.grad.T.to(dtype) if a_param.grad is not None else torch.zeros_like(v)

        if not self.state[b_param]:
            self._init_pair_state(group, b_param, a_param, u, v)
        state_u, state_v = self.state[b_param], self.state[a_param]

        gram_pinv_u, gram_pinv_v = maths.gram_pinv(u), maths.gram_pinv(v)
        scaled_u = maths.scaled_gradient(grad_u, gram_pinv_v)  # block 2
        scaled_v = maths.scaled_gradient(grad_v, gram_pinv_u)

        # Block 3: m^U is carried by C^V (V changed since the last step), m^V by C^U. A factor that did not move
        # gives C = I exactly, so skip it.
        calib_for_u = calib_for_v = None
        if group["calibrate"]:
            if not torch.equal(state_v["prev"], v):
                calib_for_u = maths.calibration_matrix(state_v["prev"], v, gram_pinv_v)
            if not torch.equal(state_u["prev"], u):
                calib_for_v = maths.calibration_matrix(state_u["prev"], u, gram_pinv_u)
        state_u["exp_avg"] = maths.update_first_moment(state_u["exp_avg"], calib_for_u, scaled_u, beta1)
        state_v["exp_avg"] = maths.update_first_moment(state_v["exp_avg"], calib_for_v, scaled_v, beta1)
        if group["variant"] == "full":  # block 4
            cong_u = None if calib_for_u is None else maths.packed_congruence(calib_for_u)
            cong_v = None if calib_for_v is None else maths.packed_congruence(calib_for_v)
            state_u["cross_sq"] = maths.update_cross_terms(state_u["cross_sq"], cong_u, scaled_u, beta2)
            state_v["cross_sq"] = maths.update_cross_terms(state_v["cross_sq"], cong_v, scaled_v, beta2)
        else:
            state_u["exp_avg_sq"].mul_(beta2).addcmul_(scaled_u, scaled_u, value=1.0 - beta2)
            state_v["exp_avg_sq"].mul_(beta2).addcmul_(scaled_v, scaled_v, value=1.0 - beta2)

        state_u["step"] += 1
        step = float(state_u["step"])
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        move_b, move_a = self._moving(group, b_param)
        state_u["prev"].copy_(u)
        state_v["prev"].copy_(v)

        def direction(state: dict[str, Tensor], other: Tensor, other_gram_pinv: Tensor) -> Tensor:
            if group["variant"] == "full":  # block 5
                return maths.projected_adam_direction(
                    state["exp_avg"],
                    state["cross_sq"],
                    other,
                    other_gram_pinv,
                    bias_correction1=bias_correction1,
                    bias_correction2=bias_correction2,
                    eps=eps,
                    floor=maths.second_moment_floor(beta1, beta2),
                )
            return maths.simple_adam_direction(
                state["exp_avg"],
                state["exp_avg_sq"],
                bias_correction1=bias_correction1,
                bias_correction2=bias_correction2,
                eps=eps,
            )

        # Both directions are computed from the factors as they were at this step before either moves.
        delta_u = direction(state_u, v, gram_pinv_v) if move_b else None
        delta_v = direction(state_v, u, gram_pinv_u) if move_a else None
        decay = 1.0 - lr * weight_decay
        if delta_u is not None:
            b_param.copy_((u * decay).sub_(delta_u, alpha=lr))
        if delta_v is not None:
            a_param.copy_(((v * decay).sub_(delta_v, alpha=lr)).T)
        if group["alternate"]:
            state_u["moving"] = torch.tensor(MOVE_A if move_b else MOVE_B)
