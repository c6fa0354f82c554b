"""LoFT-Muon (appendix D.1, Algorithm 5): Muon's orthogonalised momentum step on the LoFT factors, with LoRA's state."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels
from .base import (
    MOVE_A,
    MOVE_B,
    LoftOptimizerBase,
    check_common_hyperparameters,
    grad_or_zeros,
    maths_dtype,
    stack_factors,
)
from .device import StepGate, takes_device_path
from .groups import loft_param_groups

SCALES = ("none", "spectral", "rms")

# AdamW's updates have an RMS of about 0.2 in practice; Moonlight (Liu et al., 2025, "Muon is scalable for LLM
# training") scales Muon's update to that RMS so that AdamW's learning rate and weight decay carry over.
RMS_MATCH = 0.2


def update_scale(out_features: int, in_features: int, rank: int, scale: str) -> float:
    """The factor by which the Newton-Schulz output of an (out, in) layer of rank r is multiplied before ``-lr``.

    * ``"none"``: Algorithm 5 as printed; the full-space step is ``lr`` times a matrix whose singular values lie in
      about [0.7, 1.2].
    * ``"spectral"``: ``sqrt(max(1, out / in))``, the scale of Keller Jordan's Muon, so Muon's learning rates (about
      0.02) carry over: each of the r directions moves as far as in dense Muon. Equals ``"none"`` for square and wide
      layers.
    * ``"rms"``: ``0.2 * sqrt(out * in / r')`` with ``r' = min(r, out, in)``: the step's RMS over the (out, in)
      matrix is then ``0.2 lr``, AdamW's typical RMS, so AdamW's learning rates carry over (Moonlight's argument). At
      full rank this is Moonlight's ``0.2 * sqrt(max(out, in))``. At low rank Moonlight's formula itself would spread
      that RMS over min(out, in) unit directions while the step has only r, and move ``sqrt(min(out, in) / r)`` times
      too little: on SmolLM2-135M with r = 8 its steps were 20 to 35 times smaller than LoFT-AdamW's at the same rate
      (this scale's: 2.7 to 4.5 times, Adam's first steps being larger than its typical RMS).

    The scale depends on the shapes only, never on the factors' values: it multiplies a matrix whose singular values
    the Newton-Schulz iteration has already bounded, so a nearly rank-deficient factor cannot enlarge the step.
    """
    if scale == "none":
        return 1.0
    if scale == "spectral":
        return math.sqrt(max(1.0, out_features / in_features))
    if scale == "rms":
        return RMS_MATCH * math.sqrt(out_features * in_features / min(rank, out_features, in_features))
    raise ValueError(f"Unknown LoFT-Muon scale {scale!r}; choose one of {SCALES}.")


class LoftMuon(LoftOptimizerBase):
    """LoFT-Muon: alternating, scaled, calibrated Muon on ``(loft_B, loft_A)`` pairs; AdamW on everything else.

    For each layer, with ``U = loft_B`` (m, r) and ``V = loft_A^T`` (n, r), one step

    1. scales both factor gradients by the other factor's inverse Gram matrix (block 2, eq. 5);
    2. carries both momenta into the current subspaces and adds the scaled gradients,
       ``m^U <- mu m^U C^V + g~_U`` (block 3; Algorithm 5, lines 13-14);
    3. moves one factor (block 1; B first, as in :class:`LoftAdamW`) by the low-rank Newton-Schulz orthogonalisation
       of the full-space momentum ``m~ = m^U V^T`` in an r x r core (like Algorithm 4, but on orthonormal QR factors
       instead of its Gram matrices, for fp32 accuracy: :func:`~loft_peft.optim.maths.projected_muon_direction`),
       after decoupled weight decay: ``U <- (1 - lr wd) U - lr * scale * D_U`` with ``D_U V^T = NewtonSchulz5(m~)``.

    Seen in the full space, each step changes ``W`` by ``-lr * scale`` times a matrix of rank at most r whose singular
    values lie in about [0.7, 1.2], as Muon's step does (with min(m, n) of them). Algorithm 5 prints lines 17 and 21
    without the learning rate; it belongs there, as in Algorithm 2.

    The state per layer is the two momenta, (m + n) r numbers, as for LoRA trained with momentum, plus an r x r matrix
    between steps (``x_prev^T x`` of the factor that just moved, the start of the next calibration matrix, eq. 7).
    Use :meth:`clip_grad_norm_` before :meth:`step` for the paper's effective-gradient clipping (block 6).

    Args:
        params: a model holding LoFT layers (pairs are found through the layers' active adapters), or parameter groups
            as built by :func:`loft_peft.loft_param_groups` (factor groups carry ``"loft": True``).
        lr: learning rate of the factor pairs. What a good value is depends on ``scale``: about 0.02 for ``"none"``
            and ``"spectral"`` (Muon's), the AdamW rate for ``"rms"``.
        momentum: ``mu``.
        nesterov: use ``g~ + mu m`` instead of ``m`` as the matrix to orthogonalise (Keller Jordan's Muon does;
            Algorithm 5 does not).
        ns_steps: Newton-Schulz iterations (Algorithm 3's coefficients 3.4445, -4.7750, 2.0315).
        scale: ``"rms"``, ``"spectral"`` or ``"none"``; see :func:`update_scale`.
        weight_decay: decoupled weight decay, for the factors and the AdamW parameters alike.
        adamw_lr: learning rate of every parameter that is not a LoFT factor (biases, norms, heads, embeddings), which
            get AdamW. ``None`` means ``lr``, which fits ``scale="rms"``; with Muon-sized rates pass an AdamW rate.
            Stored as those groups' ``"lr"``, so learning-rate schedulers scale it along with ``lr``.
        adamw_betas, adamw_eps: AdamW's ``betas`` and ``eps`` for those parameters.
        alternate: move one factor per step (block 1). ``False`` moves both (the no-alternation ablation).
        calibrate: carry the momenta across subspace changes (block 3). ``False`` is the no-calibration ablation.
        foreach: step all same-shape pairs together with batched operations (the default; on every device but the
            CPU with no host synchronisation, and a non-finite step cancelled on the device, as :class:`LoftAdamW`);
            ``False`` steps each pair as a batch of one (the same computation, more calls).
        max_consecutive_skips: steps skipped in a row for NaN or inf gradients after which ``step()`` raises an error
            naming the layers whose gradients are not finite.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = False,
        ns_steps: int = 5,
        scale: str = "rms",
        weight_decay: float = 0.0,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        alternate: bool = True,
        calibrate: bool = True,
        foreach: bool = True,
        max_consecutive_skips: int = 20,
    ):
        adamw_lr = lr if adamw_lr is None else adamw_lr
        check_common_hyperparameters(lr, adamw_betas, adamw_eps, weight_decay)
        if not isinstance(adamw_lr, (int, float)) or adamw_lr < 0.0:
            raise ValueError(f"Invalid adamw_lr: {adamw_lr!r}; it must be a number >= 0.")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r}; it must lie in [0, 1).")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"Invalid ns_steps: {ns_steps!r}; it must be an int >= 1.")
        if scale not in SCALES:
            raise ValueError(f"Unknown LoFT-Muon scale {scale!r}; choose one of {SCALES}.")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"Invalid max_consecutive_skips: {max_consecutive_skips!r}; give an integer >= 1.")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=bool(nesterov),
            ns_steps=ns_steps,
            scale=scale,
            weight_decay=weight_decay,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            alternate=bool(alternate),
            calibrate=bool(calibrate),
            foreach=bool(foreach),
            max_consecutive_skips=max_consecutive_skips,
        )
        super().__init__(_with_adamw_lr(params, adamw_lr), defaults)

    def _plain_hyperparameters(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float, float]:
        return group["lr"], group["adamw_betas"], group["adamw_eps"], group["weight_decay"]

    # ------------------------------------------------------------------------------------------------ batched path
    def _step_bucket(self, group: dict[str, Any], bucket: list[tuple[Tensor, Tensor]], ok: StepGate | None) -> None:
        """Step the pairs of one shape bucket that have gradients, together where they share phase and state keys."""
        parts: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        for b_param, a_param in bucket:
            if b_param.grad is None and a_param.grad is None:
                continue
            if not self.state[b_param]:
                self._init_pair_state(b_param, a_param)
            state_u, state_v = self.state[b_param], self.state[a_param]
            key = (int(state_u["moving"]), "moved_cross" in state_u, "moved_cross" in state_v)  # on the CPU
            parts.setdefault(key, []).append((b_param, a_param))
        for (phase, _, _), pairs in parts.items():
            self._step_stacked(group, pairs, phase, ok)

    def _init_pair_state(self, b_param: Tensor, a_param: Tensor) -> None:
        dtype = maths_dtype(b_param)
        state_u, state_v = self.state[b_param], self.state[a_param]
        state_u["step"] = torch.tensor(0.0)
        state_u["moving"] = torch.tensor(MOVE_B)
        state_u["momentum_buffer"] = torch.zeros(b_param.shape, dtype=dtype, device=b_param.device)
        state_v["momentum_buffer"] = torch.zeros(a_param.shape[::-1], dtype=dtype, device=a_param.device)

    def _step_stacked(self, group: dict[str, Any], pairs: list[tuple[Tensor, Tensor]], phase: int,
                      ok: StepGate | None) -> None:
        """One step of L same-shape pairs in the same phase, each block one batched call; with ``ok`` (the
        device verdict on the gradients) every update is cancelled on the device where it is false."""
        mu, lr, weight_decay = group["momentum"], group["lr"], group["weight_decay"]
        b_params, a_params = [b for b, _ in pairs], [a for _, a in pairs]
        dtype = maths_dtype(b_params[0])
        states_u, states_v = [self.state[b] for b in b_params], [self.state[a] for a in a_params]
        where = b_params[0].device.type
        self.note_backend(f"batched PyTorch, device path ({where})" if takes_device_path(b_params[0])
                          else f"batched PyTorch ({where})")
        u = stack_factors(b_params, dtype)  # (L, m, r)
        v = stack_factors(a_params, dtype).transpose(1, 2)  # (L, n, r)
        grad_u = stack_factors([grad_or_zeros(b) for b in b_params], dtype)
        grad_v = stack_factors([grad_or_zeros(a) for a in a_params], dtype).transpose(1, 2)
        if ok is not None:
            grad_u, grad_v = ok.where(grad_u, 0.0), ok.where(grad_v, 0.0)
        pinv_u, pinv_v = kernels.gram_pinv(u), kernels.gram_pinv(v)
        scaled_u, scaled_v = torch.bmm(grad_u, pinv_v), torch.bmm(grad_v, pinv_u)  # block 2
        eye = torch.eye(u.shape[-1], dtype=dtype, device=u.device)
        carry = mu if ok is None else ok.choose(mu, 1.0, u)

        def momentum(states: list[dict], other_states: list[dict], other_pinv: Tensor, scaled: Tensor) -> Tensor:
            """Block 3: m <- mu m C + g~, C from the other factor's ``moved_cross`` (absent: it did not move)."""
            self.note_entries(other_states, "moved_cross")
            crosses = [state.pop("moved_cross", None) for state in other_states]
            buffer = torch.stack([state["momentum_buffer"] for state in states])
            if group["calibrate"] and crosses[0] is not None:
                calibration = torch.bmm(torch.stack(crosses), other_pinv)
                buffer = torch.bmm(buffer, calibration if ok is None else ok.where(calibration, eye))
            return torch.add(scaled, buffer * carry) if ok is not None else torch.add(scaled, buffer, alpha=mu)

        # m^U is carried by V's calibration (its moved_cross), m^V by U's.
        momentum_u = momentum(states_u, states_v, pinv_v, scaled_u)
        momentum_v = momentum(states_v, states_u, pinv_u, scaled_v)
        self.note_counters(*(state["step"] for state in states_u), *(state["moving"] for state in states_u))
        for state in states_u:
            state["step"] += 1
        move_b = not group["alternate"] or phase == MOVE_B
        move_a = not group["alternate"] or phase == MOVE_A
        step_size = lr * update_scale(u.shape[1], v.shape[1], u.shape[2], group["scale"])
        decay = 1.0 - lr * weight_decay
        if ok is not None:
            step_size, decay = ok.choose(step_size, 0.0, u), ok.choose(decay, 1.0, u)

        def new_factor(x: Tensor, moment: Tensor, scaled: Tensor, other: Tensor) -> Tensor:
            if group["nesterov"]:
                moment = torch.add(scaled, moment * carry) if ok is not None else torch.add(scaled, moment, alpha=mu)
            return x * decay - step_size * kernels.projected_muon_direction(moment, other, steps=group["ns_steps"])

        # Both new factors are computed from the factors as they were at this step before either moves.
        new_u = new_factor(u, momentum_u, scaled_u, v) if move_b else None
        new_v = new_factor(v, momentum_v, scaled_v, u) if move_a else None
        torch._foreach_copy_([state["momentum_buffer"] for state in states_u], list(momentum_u.unbind(0)))
        torch._foreach_copy_([state["momentum_buffer"] for state in states_v], list(momentum_v.unbind(0)))
        for new, x, params, states, transpose in ((new_u, u, b_params, states_u, False),
                                                  (new_v, v, a_params, states_v, True)):
            if new is None:
                continue
            stored = new.to(params[0].dtype)  # what the next step reads back
            if group["calibrate"]:
                # Formed before the copy: x may share storage with the parameters.
                for state, cross in zip(states, torch.bmm(x.transpose(1, 2), stored.to(dtype)).unbind(0)):
                    state["moved_cross"] = cross
            torch._foreach_copy_(params, [t.T if transpose else t for t in stored.unbind(0)])
        if group["alternate"]:
            for state in states_u:
                state["moving"].fill_(MOVE_A if move_b else MOVE_B)

def _with_adamw_lr(params: nn.Module | Iterable[Any], adamw_lr: float) -> list[dict[str, Any]]:
    """Give every plain group that sets no ``lr`` of its own the AdamW rate (factor groups keep the Muon default)."""
    if isinstance(params, nn.Module):
        params = loft_param_groups(params)
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [group if group.get("loft", False) or "lr" in group else {**group, "lr": adamw_lr} for group in groups]
