"""LoFT-AdamW (Algorithm 1): an optimizer for the LoFT factors that behaves like AdamW on the full weight."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from . import kernels, maths, native
from .base import (
    MOVE_A,
    MOVE_B,
    LoftOptimizerBase,
    check_common_hyperparameters,
    factor_versions,
    grad_or_zeros,
    maths_dtype,
    stack_factors,
)
from .device import StepGate, takes_device_path

VARIANTS = ("full", "simple")


def _row_index(positions: list[int], device: torch.device, cache: dict) -> Tensor:
    """The index tensor of ``positions`` on ``device``, made once: a host-to-device copy waits for the device."""
    key = (tuple(positions), device)
    if key not in cache:
        cache[key] = torch.tensor(positions, device=device)
    return cache[key]


def gather_rows(tensors: dict[str, Tensor], positions: list[int], cache: dict | None = None) -> dict[str, Tensor]:
    """Rows ``positions`` of every stacked state tensor, each indexed on its own device (the step counts and phases
    live on the CPU while the moments may be on a GPU). ``cache`` keeps the index tensors between steps."""
    cache = {} if cache is None else cache
    return {key: value.index_select(0, _row_index(positions, value.device, cache)) for key, value in tensors.items()}


def scatter_rows(tensors: dict[str, Tensor], part: dict[str, Tensor], positions: list[int],
                 cache: dict | None = None) -> None:
    """Write :func:`gather_rows`' rows back into the stacked state, each on its own device."""
    cache = {} if cache is None else cache
    for key, value in part.items():
        tensors[key].index_copy_(0, _row_index(positions, tensors[key].device, cache), value)


class LoftAdamW(LoftOptimizerBase):
    """LoFT-AdamW: alternating, scaled, calibrated Adam on ``(loft_B, loft_A)`` pairs; AdamW on everything else.

    For each layer, with ``U = loft_B`` (m, r) and ``V = loft_A^T`` (n, r), one step

    1. scales both factor gradients by the other factor's inverse Gram matrix (block 2, eq. 5);
    2. carries both first moments into the current subspaces (block 3, eq. 7) and, for ``variant="full"``, the packed
       second-moment cross terms too (block 4, eqs. 11-12);
    3. moves one factor (block 1) by the full-space Adam update rebuilt from the moments and projected back onto the
       factor (block 5, eq. 13), after decoupled weight decay ``U <- (1 - lr wd) U``. B moves first: Algorithm 1
       starts with A, but while B = 0 (LoRA's initialisation) A's gradient and step are zero.

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
        simple_rescale: LoFT-simple only: scale each factor step so that the full-space step has the norm it would
            have with an orthonormal other factor (:func:`maths.subspace_norm_scale`), independent of the other
            factor's scale. Measured (README, the comparison): it moves LoFT-simple's curve towards LoFT's but does
            not make LoFT's learning rate carry over; both forms do best at 10-30x LoFT's rate. ``False`` (the
            default) is the paper's LoFT-simple exactly.
        alternate: move one factor per step (block 1). ``False`` moves both (the paper's no-alternation ablation).
        calibrate: carry moments across subspace changes (blocks 3-4). ``False`` is the no-calibration ablation.
        foreach: step all same-shape pairs together through :mod:`loft_peft.optim.kernels` (the default), keeping
            their state in stacked tensors of which ``optimizer.state`` holds views; on x86-64 CPUs with AVX2 or
            AVX-512, in fp32, the large work runs in the fused C kernels of :mod:`loft_peft.optim.native` where a C
            compiler is found (set ``LOFT_PEFT_NATIVE=0`` to use PyTorch operations). ``False`` steps each pair as
            a batch of one (the same computation, more calls); both give the same results up to fp32 rounding, and
            their checkpoints are interchangeable.
        memory_budget: on GPUs (every device but the CPU), the bytes a step's temporaries may take beyond the state;
            row blocks are as large as this allows (default 256 MiB).
        max_consecutive_skips: steps skipped in a row for NaN or inf gradients after which ``step()`` raises an error
            naming the layers whose gradients are not finite.
        compile: with ``foreach`` on the PyTorch path (GPUs, or CPUs without the native kernels), fuse Adam's
            elementwise step of the full-space rebuild (block 5) into one pass per row block with ``torch.compile``
            instead of five eager passes. Off by default because the first step then waits for a compilation
            (seconds with a warm cache, tens of seconds cold); falls back to eager with a warning where compiling
            fails.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "full",
        simple_rescale: bool = False,
        alternate: bool = True,
        calibrate: bool = True,
        foreach: bool = True,
        compile: bool = False,
        memory_budget: int = kernels.DEFAULT_MEMORY_BUDGET,
        max_consecutive_skips: int = 20,
    ):
        check_common_hyperparameters(lr, betas, eps, weight_decay)
        if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1 << 20:
            raise ValueError(f"Invalid memory_budget: {memory_budget!r}; give a number of bytes >= 1 MiB.")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"Invalid max_consecutive_skips: {max_consecutive_skips!r}; give an integer >= 1.")
        if variant not in VARIANTS:
            raise ValueError(f"Unknown LoFT-AdamW variant {variant!r}; choose one of {VARIANTS}.")
        if simple_rescale and variant != "simple":
            raise ValueError("simple_rescale=True applies to variant='simple' (LoFT-simple) only; LoFT's full "
                             "variant already takes the projected full-space Adam step.")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            variant=variant,
            simple_rescale=bool(simple_rescale),
            alternate=bool(alternate),
            calibrate=bool(calibrate),
            foreach=bool(foreach),
            compile=bool(compile),
            memory_budget=memory_budget,
            max_consecutive_skips=max_consecutive_skips,
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

    # ------------------------------------------------------------------------------------------------- the step
    def _step_bucket(self, group: dict[str, Any], bucket: list[tuple[Tensor, Tensor]], ok: StepGate | None) -> None:
        """Step the pairs of one shape bucket that have gradients, all at once when they share phase and step."""
        active = [i for i, (b, a) in enumerate(bucket) if b.grad is not None or a.grad is not None]
        if not active:
            return
        for i in active:
            b_param, a_param = bucket[i]
            if not self.state[b_param]:
                dtype = maths_dtype(b_param)
                u, v = b_param.detach().to(dtype), a_param.detach().T.to(dtype)
                self._init_pair_state(group, b_param, a_param, u, v)
        stacked = self._stacked_state(group, bucket)
        self.note_counters(stacked.tensors["u:step"], stacked.tensors["u:moving"])
        phases, steps = stacked.tensors["u:moving"].tolist(), stacked.tensors["u:step"].tolist()  # on the CPU
        parts: dict[tuple[int, float], list[int]] = {}
        for i in active:
            position = stacked.position[i]
            parts.setdefault((phases[position], steps[position]), []).append(position)
        if len(parts) == 1 and len(active) == len(stacked.members):
            (phase, step), _ = parts.popitem()
            self._step_stacked(group, stacked, stacked.tensors, stacked.members, phase, step, whole=True, ok=ok)
            return
        # Pairs out of step with the rest (one had no gradient at some step): gather, step, scatter back.
        stacked.gram_pinv = stacked.written = None
        index_cache = self._caches().setdefault("row_index", {})
        for (phase, step), positions in parts.items():
            part = gather_rows(stacked.tensors, positions, index_cache)
            members = [stacked.members[p] for p in positions]
            self._step_stacked(group, stacked, part, members, phase, step, whole=False, ok=ok)
            scatter_rows(stacked.tensors, part, positions, index_cache)

    def _stacked_state(self, group: dict[str, Any], bucket: list[tuple[Tensor, Tensor]]) -> _StackedState:
        """The bucket's stacked state, (re)built when ``optimizer.state`` no longer holds exactly its views."""
        caches = self._caches().setdefault("stacked", {})
        key = (id(group), tuple(id(b) for b, _ in bucket))
        stacked = caches.get(key)
        if stacked is None or not stacked.is_bound(self.state, bucket):
            stacked = _StackedState(self.state, bucket, group["variant"])
            caches[key] = stacked
        return stacked

    def _step_stacked(
        self,
        group: dict[str, Any],
        stacked: _StackedState,
        t: dict[str, Tensor],
        members: list[tuple[Tensor, Tensor]],
        phase: int,
        step: float,
        whole: bool,
        ok: StepGate | None = None,
    ) -> None:
        """One step of L pairs in the same phase and step, with state ``t`` stacked along dim 0 (updated in place).

        Blocks 2-5 of the paper, each as one batched call (the functions of :mod:`.maths` they compute name the
        equations). With the native kernels an alternating step (either variant) is a single call
        (:meth:`_step_in_one_native_call`). ``whole`` says that ``t`` is the bucket's own stacked state (not a gathered
        part of it), whose cached Gram pseudo-inverses can then be used and renewed.

        On the device path (:func:`takes_device_path`) nothing is read back on the host: whether a factor changed since
        the last step comes from the parameters' version counters (and, per layer, from a comparison kept on the
        device), and with ``ok`` (the device verdict on the gradients, a :class:`StepGate`) every update is cancelled
        on the device where it is false.
        """
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        full = group["variant"] == "full"
        dtype = t["u:exp_avg"].dtype
        b_params, a_params = [b for b, _ in members], [a for _, a in members]
        # Under no_grad the parameters stack without detaching; V = A^T and its gradient are transposed views of
        # the stacked A's. One pair needs no copy at all (every read below happens before the factors are written).
        u = stack_factors(b_params, dtype)  # (L, m, r)
        v = stack_factors(a_params, dtype).transpose(1, 2)  # (L, n, r)
        grad_u = stack_factors([grad_or_zeros(b) for b in b_params], dtype)
        grad_v = stack_factors([grad_or_zeros(a) for a in a_params], dtype).transpose(1, 2)
        on_device = takes_device_path(u)
        if ok is not None:  # a non-finite gradient counts as none at all, where ok is false
            grad_u, grad_v = ok.where(grad_u, 0.0), ok.where(grad_v, 0.0)

        cache = stacked.gram_pinv if whole else None
        step += 1.0
        move_b = not group["alternate"] or phase == MOVE_B
        move_a = not group["alternate"] or phase == MOVE_A
        options = dict(
            lr=lr,
            decay=1.0 - lr * weight_decay,
            bias_correction1=1.0 - beta1**step,
            bias_correction2=1.0 - beta2**step,
            eps=eps,
        )
        workspace = self._caches().setdefault("workspace", kernels.Workspace())
        counters = t["u:step"].dtype == torch.float32 and t["u:moving"].dtype == torch.int64  # as the kernel keeps them
        rescale = not full and group.get("simple_rescale", False)
        if group["alternate"] and counters and not rescale and not on_device and native.usable(u):
            sides = {"u": (b_params, u, grad_u), "v": (a_params, v, grad_v)}
            if self._step_in_one_native_call(group, stacked, t, sides, move_b, whole, workspace, options):
                self.note_backend("native C kernels (CPU, fp32)")
                return
        self.note_backend(f"batched PyTorch, device path ({u.device.type})" if on_device
                          else f"batched PyTorch ({u.device.type})")
        t["u:step"].add_(1.0)
        # Which factors changed since the last step (the one that moved); an unchanged factor needs no calibration
        # and keeps its Gram pseudo-inverse from the last step.
        if on_device:
            written = stacked.written if whole else None
            same_u, same_u_mask = _unchanged_since_written(written, "u", b_params, t["u:prev"], u)
            same_v, same_v_mask = _unchanged_since_written(written, "v", a_params, t["v:prev"], v)
        else:
            same_u, same_u_mask = _compare(t["u:prev"], u)
            same_v, same_v_mask = _compare(t["v:prev"], v)
        # Block 3's calibration matrices: m^U is carried by C^V (V changed since the last step), m^V by C^U.
        pinv_u, calib_for_v = self._gram_pinv_and_calibration(
            group, b_params, u, t["u:prev"], cache["u"] if cache is not None and same_u else None, same_u, same_u_mask
        )
        pinv_v, calib_for_u = self._gram_pinv_and_calibration(
            group, a_params, v, t["v:prev"], cache["v"] if cache is not None and same_v else None, same_v, same_v_mask
        )
        if ok is not None:  # and no carrying either
            eye = torch.eye(u.shape[-1], dtype=dtype, device=u.device)
            calib_for_u = None if calib_for_u is None else ok.where(calib_for_u, eye)
            calib_for_v = None if calib_for_v is None else ok.where(calib_for_v, eye)
        budget = self.working_budget(group)
        # Blocks 2-4 for both sides; LoFT-simple's moving factor steps in the same pass (its step is elementwise).
        simple_steps: dict[str, Tensor | None] = {}
        for side, grad, pinv, calib, x, moves in (
            ("u", grad_u, pinv_v, calib_for_u, u, move_b),
            ("v", grad_v, pinv_u, calib_for_v, v, move_a),
        ):
            simple_steps[side] = kernels.update_moments_(
                grad,
                pinv,
                calib,
                t[side + ":exp_avg"],
                t[side + (":cross_sq" if full else ":exp_avg_sq")],
                beta1=beta1,
                beta2=beta2,
                full=full,
                workspace=workspace,
                simple_step=dict(x=x, **options) if moves and not full and not rescale else None,
                gate=ok,
                budget=budget,
            )
        for side, x, same in (("u", u, same_u), ("v", v, same_v)):
            if not same:
                t[side + ":prev"].copy_(x if ok is None else ok.where(x, t[side + ":prev"]))

        def updated(side: str, x: Tensor, other: Tensor, other_pinv: Tensor) -> Tensor:
            if rescale:
                return kernels.simple_adam_update(x, t[side + ":exp_avg"], t[side + ":exp_avg_sq"], rescale_by=other,
                                                  gate=ok, **options)
            if not full:
                return simple_steps[side]
            floor = maths.second_moment_floor(beta1, beta2)  # block 5
            return kernels.projected_adam_update(
                x,
                t[side + ":exp_avg"],
                t[side + ":cross_sq"],
                other,
                other_pinv,
                floor=floor,
                workspace=workspace,
                compiled=group.get("compile", False),
                gate=ok,
                budget=budget,
                **options,
            )

        # Both new factors are computed from the factors as they were at this step before either moves.
        new_u = updated("u", u, v, pinv_v) if move_b else None
        new_v = updated("v", v, u, pinv_u) if move_a else None
        if new_u is not None:
            torch._foreach_copy_(b_params, list(new_u.unbind(0)))
        if new_v is not None:
            torch._foreach_copy_(a_params, list(new_v.transpose(1, 2).unbind(0)))
        if group["alternate"]:
            t["u:moving"].fill_(MOVE_A if move_b else MOVE_B)
        if whole:
            stacked.gram_pinv = {"u": pinv_u, "v": pinv_v}  # the pseudo-inverses of the factors now in "prev"
            # After this step "prev" holds the factors that did not move; their versions tell if they change.
            stacked.written = {"u": None if new_u is not None else factor_versions(b_params),
                               "v": None if new_v is not None else factor_versions(a_params)}

    def _step_in_one_native_call(
        self,
        group: dict[str, Any],
        stacked: _StackedState,
        t: dict[str, Tensor],
        sides: dict[str, tuple[list[Tensor], Tensor, Tensor]],
        move_b: bool,
        whole: bool,
        workspace: kernels.Workspace,
        options: dict[str, float],
    ) -> bool:
        """The rest of :meth:`_step_stacked` (alternating, native kernels) as one call of
        :func:`kernels.alternating_step`, with the same bits. ``sides`` maps ``"u"``/``"v"`` to (parameters, stacked
        factors, stacked gradients). Returns ``False``, having written nothing, where that call declines the step."""
        beta1, beta2 = group["betas"]
        full = group["variant"] == "full"
        cache = stacked.gram_pinv if whole else None
        inputs = {
            side: dict(
                x=x,
                grad=grad,
                exp_avg=t[side + ":exp_avg"],
                second=t[side + (":cross_sq" if full else ":exp_avg_sq")],
                prev=t[side + ":prev"],
                pinv_prev=None if cache is None else cache[side],
                pinv_now=self.cached_gram_pinv(params, x),
                calibrate=group["calibrate"],
            )
            for side, (params, x, grad) in sides.items()
        }
        # fp32 parameters of one layout take the new factor directly (V's (i, b) is A's (b, i)).
        moving = sides["u" if move_b else "v"][0]
        strides = moving[0].stride() if move_b else moving[0].stride()[::-1]
        direct = all(p.dtype == torch.float32 and p.stride() == moving[0].stride() for p in moving)
        result = kernels.alternating_step(
            inputs,
            full=full,
            move_b=move_b,
            beta1=beta1,
            beta2=beta2,
            floor=maths.second_moment_floor(beta1, beta2),
            workspace=workspace,
            step=t["u:step"],
            phase=t["u:moving"],
            next_phase=MOVE_A if move_b else MOVE_B,
            destination=moving if direct else None,
            destination_strides=strides,
            **options,
        )
        if result is None:
            return False
        new, pinv_u, pinv_v = result
        if new is None:
            increment_version(moving)  # as an in-place copy would: autograd sees the change
        else:
            torch._foreach_copy_(moving, list((new if move_b else new.transpose(1, 2)).unbind(0)))
        if whole:
            stacked.gram_pinv = {"u": pinv_u, "v": pinv_v}  # the pseudo-inverses of the factors now in "prev"
        return True

    def _gram_pinv_and_calibration(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        current: Tensor,
        prev: Tensor,
        cached: Tensor | None,
        same: bool,
        same_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(y^T y)^+`` of the factors ``current`` (from ``cached``, the norm computation, or computed) and, where they
        changed since the last step and ``group["calibrate"]``, eq. (7)'s ``C`` for the other side's moments."""
        calibrate = group["calibrate"] and not same
        pinv = cached if cached is not None else self.cached_gram_pinv(params, current)
        if pinv is None and calibrate and same_mask is None:
            return kernels.gram_pinv_and_calibration(current, prev)  # one pass over both factors
        if pinv is None:
            pinv = kernels.gram_pinv(current)
        return pinv, (_calibration(prev, current, pinv, same_mask) if calibrate else None)


class _StackedState:
    """The state of a bucket's pairs in stacked tensors, (L, ...) per key; ``optimizer.state`` holds views into them.

    Keys are ``"u:<name>"`` for the state of ``loft_B`` (U) and ``"v:<name>"`` for that of ``loft_A`` (V), with the
    names and per-pair shapes :meth:`LoftAdamW._init_pair_state` gives them, so a checkpoint is the same as the
    reference path's. Only pairs that have state are members, in bucket order.
    """

    def __init__(self, state: dict, bucket: list[tuple[Tensor, Tensor]], variant: str):
        second = "cross_sq" if variant == "full" else "exp_avg_sq"
        names = {"u": ("exp_avg", second, "prev", "step", "moving"), "v": ("exp_avg", second, "prev")}
        indices = [i for i, (b, _) in enumerate(bucket) if state.get(b)]
        self.members = [bucket[i] for i in indices]
        self.position = {i: position for position, i in enumerate(indices)}
        self.tensors: dict[str, Tensor] = {}
        self.bound: list[tuple[dict, str, Tensor]] = []
        self.state_dicts: list[tuple[Tensor, dict]] = []
        for side, side_names in names.items():
            dicts = [state[b if side == "u" else a] for b, a in self.members]
            self.state_dicts.extend(zip((b if side == "u" else a for b, a in self.members), dicts))
            for name in side_names:
                stacked = torch.stack([d[name] for d in dicts])
                self.tensors[f"{side}:{name}"] = stacked
                for d, view in zip(dicts, stacked.unbind(0)):
                    d[name] = view
                    self.bound.append((d, name, view))
        # (y^T y)^+ of the factors now stored in "u:prev" / "v:prev", from the last step of the whole bucket.
        self.gram_pinv: dict[str, Tensor] | None = None
        # Device path: per side, the version counters of the factors that equal "prev" after the last whole step
        # (None for the side that moved), so that "unchanged" is known without reading a value.
        self.written: dict[str, tuple[int, ...] | None] | None = None

    def is_bound(self, state: dict, bucket: list[tuple[Tensor, Tensor]]) -> bool:
        """Whether every member's state is still these views and no other pair of the bucket has gained state."""
        if sum(1 for b, _ in bucket if state.get(b)) != len(self.members):
            return False
        return all(state.get(p) is d for p, d in self.state_dicts) and all(d.get(n) is v for d, n, v in self.bound)


def _compare(prev: Tensor, current: Tensor) -> tuple[bool, Tensor | None]:
    """(all layers unchanged, per-layer "unchanged" mask when only some are)."""
    if torch.equal(prev, current):
        return True, None
    if prev.shape[0] == 1:
        return False, None
    same = (prev == current).flatten(1).all(1)
    return False, (same if bool(same.any()) else None)


def _unchanged_since_written(
    written: dict | None, side: str, params: list[Tensor], prev: Tensor, current: Tensor
) -> tuple[bool, Tensor | None]:
    """:func:`_compare` without a host read: (all layers unchanged, per-layer "unchanged" mask on the device).

    Unchanged for certain where the factors equalled "prev" after the last step and no write has bumped their version
    counters since; otherwise a mask computed on the device gives each layer's exact answer."""
    if written is not None and written[side] is not None and written[side] == factor_versions(params):
        return True, None
    return False, (prev == current).flatten(1).all(1)


def _calibration(prev: Tensor, current: Tensor, current_pinv: Tensor, same_mask: Tensor | None) -> Tensor:
    """Eq. (7)'s ``C`` per layer, exactly the identity for layers whose factor did not change (as the reference)."""
    calib = kernels.calibration_matrices(prev, current, current_pinv)
    if same_mask is not None:
        eye = torch.eye(calib.shape[-1], dtype=calib.dtype, device=calib.device)
        calib = torch.where(same_mask[:, None, None], eye, calib)
    return calib
