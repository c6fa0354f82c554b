"""The test suite's per-layer references: LoFT-AdamW and LoFT-Muon stepped one factor pair at a time, straight from the
functions of :mod:`loft_peft.optim.maths` (the paper's equations), with none of the batched path's arrangement (no
stacked state, no folded constants, no tiles, no native kernels).

The product has one implementation, the batched one (:mod:`loft_peft.optim.kernels`, with the C kernels as its CPU
backend); ``foreach=False`` there steps each pair as a bucket of one. These classes are a second implementation
written for reading, against which ``tests/test_fast_path.py`` and ``tests/test_muon.py`` check the batched one over
many steps, shapes and options. They reuse the product's state layout, phases and plain-parameter AdamW, so their
checkpoints are the product's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from loft_peft.optim import device, maths
from loft_peft.optim.adamw import LoftAdamW
from loft_peft.optim.base import MOVE_A, MOVE_B, maths_dtype
from loft_peft.optim.muon import LoftMuon, update_scale


@contextlib.contextmanager
def _host_path() -> Iterator[None]:
    saved, device._DEVICE_PATH_ON_CPU = device._DEVICE_PATH_ON_CPU, False
    try:
        yield
    finally:
        device._DEVICE_PATH_ON_CPU = saved


def _factors(b_param: Tensor, a_param: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """U = B (m, r), V = A^T (n, r) and their gradients in the maths dtype (zeros where a factor has none)."""
    dtype = maths_dtype(b_param)
    u = b_param.detach().to(dtype)
    v = a_param.detach().T.to(dtype)
    grad_u = b_param.grad.to(dtype) if b_param.grad is not None else torch.zeros_like(u)
    grad_v = a_param.grad.T.to(dtype) if a_param.grad is not None else torch.zeros_like(v)
    return u, v, grad_u, grad_v


class _PerPair:
    """Steps factor groups one pair at a time through ``_step_pair``, reading on the host what it needs (also where
    the tests run the product's device path on CPU tensors)."""

    def step(self, closure=None):
        with _host_path():
            return super().step(closure)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        with _host_path():
            return super().clip_grad_norm_(max_norm)

    def _step_factor_group(self, group: dict[str, Any], ok=None) -> None:
        assert ok is None, "the reference steps on the host"
        self.note_backend("per-layer reference (tests)")
        for b_param, a_param in self.factor_pairs(group):
            if b_param.grad is not None or a_param.grad is not None:
                self._step_pair(group, b_param, a_param)


def reference_effective_grad_norm(optimizer) -> Tensor:
    """Block 6 pair by pair from :func:`maths.effective_grad_sq_norm`, plus every plain gradient's squared norm."""
    total = torch.zeros((), dtype=torch.float64)
    for group in optimizer.param_groups:
        if not group["loft"]:
            for p in group["params"]:
                if p.grad is not None:
                    total += p.grad.detach().double().square().sum()
            continue
        for b_param, a_param in optimizer.factor_pairs(group):
            if b_param.grad is None and a_param.grad is None:
                continue
            u, v, _, _ = _factors(b_param, a_param)
            move_b, move_a = optimizer._moving(group, b_param)
            if move_b and b_param.grad is not None:
                total += maths.effective_grad_sq_norm(b_param.grad.to(u.dtype), maths.gram_pinv(v)).double()
            if move_a and a_param.grad is not None:
                total += maths.effective_grad_sq_norm(a_param.grad.T.to(u.dtype), maths.gram_pinv(u)).double()
    return total.sqrt()


class ReferenceLoftAdamW(_PerPair, LoftAdamW):
    """LoFT-AdamW (both variants, every option) one pair at a time from :mod:`loft_peft.optim.maths`."""

    def _step_pair(self, group: dict[str, Any], b_param: Tensor, a_param: Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        u, v, grad_u, grad_v = _factors(b_param, a_param)
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
        state_u["exp_avg"].copy_(maths.update_first_moment(state_u["exp_avg"], calib_for_u, scaled_u, beta1))
        state_v["exp_avg"].copy_(maths.update_first_moment(state_v["exp_avg"], calib_for_v, scaled_v, beta1))
        if group["variant"] == "full":  # block 4
            cong_u = None if calib_for_u is None else maths.packed_congruence(calib_for_u)
            cong_v = None if calib_for_v is None else maths.packed_congruence(calib_for_v)
            state_u["cross_sq"].copy_(maths.update_cross_terms(state_u["cross_sq"], cong_u, scaled_u, beta2))
            state_v["cross_sq"].copy_(maths.update_cross_terms(state_v["cross_sq"], cong_v, scaled_v, beta2))
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
                    state["exp_avg"], state["cross_sq"], other, other_gram_pinv,
                    bias_correction1=bias_correction1, bias_correction2=bias_correction2, eps=eps,
                    floor=maths.second_moment_floor(beta1, beta2),
                )
            simple = maths.simple_adam_direction(
                state["exp_avg"], state["exp_avg_sq"],
                bias_correction1=bias_correction1, bias_correction2=bias_correction2, eps=eps,
            )
            return simple * maths.subspace_norm_scale(simple, other) if group.get("simple_rescale") else simple

        # Both directions are computed from the factors as they were at this step before either moves.
        delta_u = direction(state_u, v, gram_pinv_v) if move_b else None
        delta_v = direction(state_v, u, gram_pinv_u) if move_a else None
        decay = 1.0 - lr * weight_decay
        if delta_u is not None:
            b_param.copy_((u * decay).sub_(delta_u, alpha=lr))
        if delta_v is not None:
            a_param.copy_(((v * decay).sub_(delta_v, alpha=lr)).T)
        if group["alternate"]:
            state_u["moving"].fill_(MOVE_A if move_b else MOVE_B)


class ReferenceLoftMuon(_PerPair, LoftMuon):
    """LoFT-Muon one pair at a time from :mod:`loft_peft.optim.maths` (SVD pseudo-inverses, eigh Gram inverses)."""

    def _step_pair(self, group: dict[str, Any], b_param: Tensor, a_param: Tensor) -> None:
        mu, lr, weight_decay = group["momentum"], group["lr"], group["weight_decay"]
        u, v, grad_u, grad_v = _factors(b_param, a_param)
        if not self.state[b_param]:
            self._init_pair_state(b_param, a_param)
        state_u, state_v = self.state[b_param], self.state[a_param]

        gram_pinv_u, gram_pinv_v = maths.gram_pinv(u), maths.gram_pinv(v)
        scaled_u = maths.scaled_gradient(grad_u, gram_pinv_v)  # block 2
        scaled_v = maths.scaled_gradient(grad_v, gram_pinv_u)

        # Block 3: a factor that moved at the last step left ``x_prev^T x``; times ``(x^T x)^+`` it is eq. (7)'s C.
        # A factor that did not move needs no calibration (C = I), and skipping it avoids the rounding of x x^+.
        cross_u, cross_v = state_u.pop("moved_cross", None), state_v.pop("moved_cross", None)
        calib_for_u = cross_v @ gram_pinv_v if group["calibrate"] and cross_v is not None else None
        calib_for_v = cross_u @ gram_pinv_u if group["calibrate"] and cross_u is not None else None
        state_u["momentum_buffer"] = maths.update_momentum(state_u["momentum_buffer"], calib_for_u, scaled_u, mu)
        state_v["momentum_buffer"] = maths.update_momentum(state_v["momentum_buffer"], calib_for_v, scaled_v, mu)
        state_u["step"] += 1
        move_b, move_a = self._moving(group, b_param)

        def direction(state: dict[str, Tensor], scaled: Tensor, other: Tensor) -> Tensor:
            momentum = state["momentum_buffer"]
            if group["nesterov"]:
                momentum = torch.add(scaled, momentum, alpha=mu)
            return maths.projected_muon_direction(momentum, other, steps=group["ns_steps"])

        # Both directions are computed from the factors as they were at this step before either moves.
        delta_u = direction(state_u, scaled_u, v) if move_b else None
        delta_v = direction(state_v, scaled_v, u) if move_a else None
        step_size = lr * update_scale(u.shape[0], v.shape[0], u.shape[1], group["scale"])
        decay = 1.0 - lr * weight_decay
        # Each cross term is formed from the new factor as it will be stored (rounded to the parameter's dtype), which
        # is what the next step reads.
        if delta_u is not None:
            new_b = (u * decay).sub_(delta_u, alpha=step_size).to(b_param.dtype)
            if group["calibrate"]:
                state_u["moved_cross"] = u.T @ new_b.to(u.dtype)
            b_param.copy_(new_b)
        if delta_v is not None:
            new_a = (v * decay).sub_(delta_v, alpha=step_size).T.to(a_param.dtype)
            if group["calibrate"]:
                state_v["moved_cross"] = v.T @ new_a.T.to(u.dtype)
            a_param.copy_(new_a)
        if group["alternate"]:
            state_u["moving"].fill_(MOVE_A if move_b else MOVE_B)
