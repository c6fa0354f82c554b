"""What the LoFT optimizers share: factor-pair groups, effective-gradient clipping, fp32 state, plain AdamW.

A LoFT optimizer has two kinds of parameter groups:

* factor groups (``group["loft"] is True``): ``params`` lists each layer's factors as consecutive pairs
  ``[loft_B, loft_A, loft_B, loft_A, ...]`` (``U = loft_B`` of shape (m, r), ``V = loft_A^T`` of shape (n, r));
* plain groups: every other trainable parameter (biases, heads, ``modules_to_save``), stepped with AdamW.

The pairing is positional so that it survives ``state_dict()`` / ``load_state_dict()``, which identify parameters by
their position in the groups.

Pairs of the same shape are handled together: :meth:`LoftOptimizerBase.shape_buckets` groups them (with
``foreach=False`` every pair is a bucket of its own), the effective-gradient norm of a bucket is one batched
computation (:mod:`.kernels`), and a subclass steps a bucket in ``_step_bucket``. That batched implementation is the
only one: a single layer is a batch of one, on every device; the fused C kernels of :mod:`.native` are its private
backend for fp32 on CPUs (:attr:`LoftOptimizerBase.backend` says which ran).
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import check_factor_layout
from . import kernels
from .device import StepGate, autocast_disabled, full_fp32_matmuls, takes_device_path
from .groups import loft_param_groups, pair_marked_factors

# Which factor takes the next step, as stored in the optimizer state (a tensor, so that it is checkpointed).
MOVE_B = 0
MOVE_A = 1


def maths_dtype(param: Tensor) -> torch.dtype:
    """State and maths run in fp32 for fp32/bf16/fp16 factors, and in fp64 for fp64 factors."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


logger = logging.getLogger("loft_peft")

_ABSENT = object()  # a state entry that did not exist before a step (see note_entries)

# Steps skipped in a row (NaN or inf gradients) after which the optimizer stops the run with an error.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 20


class StepVerdict:
    """Whether one ``step()`` was skipped for NaN or inf gradients, read only when asked: on the device path the
    answer is copied to the host after the step, so asking at logging time (long after) costs no wait."""

    def __init__(self, skipped: bool | None = None, host: Tensor | None = None, event: Any = None):
        self._skipped, self._host, self._event = skipped, host, event

    def skipped(self) -> bool:
        if self._skipped is None:
            if self._event is not None:
                self._event.synchronize()
            self._skipped = self._host is not None and not bool(self._host)
        return self._skipped


def check_common_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    def finite_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not finite_number(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r}; it must be a finite number >= 0.")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(finite_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r}; they must be two numbers in [0, 1), e.g. (0.9, 0.999).")
    if not finite_number(eps) or eps < 0.0:
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite number >= 0.")
    if not finite_number(weight_decay) or weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; it must be a finite number >= 0.")


def _add_resting_grad(resting: list[Tensor], b_param: Tensor, a_param: Tensor, move_b: bool, move_a: bool) -> None:
    """Append the gradient of the factor that does not move at the next step, if one rests and has a gradient."""
    if move_b != move_a:
        grad = (a_param if move_b else b_param).grad
        if grad is not None:
            resting.append(grad)  # (the norm runs under no_grad)


class LoftOptimizerBase(torch.optim.Optimizer):
    """Base class: holds the groups and the state; subclasses implement ``_step_bucket`` for a bucket of pairs."""

    def __init__(self, params: nn.Module | Iterable[Any], defaults: dict[str, Any]):
        if isinstance(params, nn.Module):
            params = loft_param_groups(params)
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [part for group in groups for part in pair_marked_factors(group)]
        if not any(group.get("loft") for group in groups):
            raise ValueError(
                f"{type(self).__name__} was given no LoFT factor pair, so it would train everything as plain AdamW. "
                f"Build it from the model: `create_loft_optimizer(model, lr=...)`, `{type(self).__name__}(model, "
                "...)`, or the parameters of a model wrapped with `get_peft_model(model, LoftConfig(...))`."
            )
        super().__init__(groups, defaults)
        for group in self.param_groups:
            group.setdefault("loft", False)
            if group["loft"]:
                self._check_factor_group(group)

    def _caches(self) -> dict[str, dict]:
        """Per-step scratch that is not state: shape buckets, and Gram pseudo-inverses the norm computed for the step.

        Kept outside ``self.state`` (never checkpointed) and created lazily, because ``torch.optim.Optimizer``
        pickles and copies only ``defaults``, ``state`` and ``param_groups``.
        """
        caches = self.__dict__.get("_loft_caches")
        if caches is None:
            caches = self.__dict__["_loft_caches"] = {"buckets": {}, "gram_pinv": {}}
        return caches

    @staticmethod
    def _check_factor_group(group: dict[str, Any]) -> None:
        params = group["params"]
        if len(params) % 2:
            raise ValueError(
                "A LoFT factor group must list factors in (loft_B, loft_A) pairs; got an odd number of parameters."
            )
        for b, a in zip(params[0::2], params[1::2]):
            if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    "A LoFT factor group must list (loft_B, loft_A) pairs with loft_B of shape (out, r) and loft_A of "
                    f"shape (r, in); got shapes {tuple(b.shape)} and {tuple(a.shape)}."
                )

    # ----------------------------------------------------------------------------------------------- pairs and phase
    @staticmethod
    def factor_pairs(group: dict[str, Any]) -> Iterator[tuple[Tensor, Tensor]]:
        params = group["params"]
        return zip(params[0::2], params[1::2])

    def shape_buckets(self, group: dict[str, Any]) -> list[list[tuple[Tensor, Tensor]]]:
        """The group's pairs split by (B shape, A shape, dtype, device), each bucket in group order.

        On the device path a bucket holds at most as many pairs as a quarter of ``memory_budget`` holds six copies of
        their factors (the step stacks the factors and their gradients, and their scaled and new values), so that
        the step's temporaries stay within the budget whatever the number of layers."""
        params = group["params"]
        key = tuple(map(id, params))
        cached = self._caches()["buckets"].get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        buckets: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        for b_param, a_param in self.factor_pairs(group):
            shape_key = (tuple(b_param.shape), tuple(a_param.shape), b_param.dtype, a_param.dtype, b_param.device)
            buckets.setdefault(shape_key, []).append((b_param, a_param))
        result = []
        budget = group.get("memory_budget")
        for bucket in buckets.values():
            b_param, a_param = bucket[0]
            size = 6 * (b_param.numel() + a_param.numel()) * torch.finfo(maths_dtype(b_param)).bits // 8
            most = len(bucket) if budget is None or not takes_device_path(b_param) else max(1, budget // 4 // size)
            result += [bucket[i:i + most] for i in range(0, len(bucket), most)]
        self._caches()["buckets"][id(group)] = (key, result)
        return result

    def working_budget(self, group: dict[str, Any]) -> int:
        """The bytes of ``memory_budget`` that one bucket's step may use: the budget less the Gram pseudo-inverses
        kept for every layer of the group while the buckets step (up to four r x r matrices a layer: the last step's
        two and the norm computation's), and never less than a quarter of it."""
        budget = group.get("memory_budget", kernels.DEFAULT_MEMORY_BUDGET)
        key = (tuple(map(id, group["params"])), budget)
        cached = self._caches().setdefault("working_budget", {}).get(id(group))
        if cached is None or cached[0] != key:
            held = sum(4 * b.shape[1] ** 2 * torch.finfo(maths_dtype(b)).bits // 8 for b, _ in self.factor_pairs(group))
            cached = self._caches()["working_budget"][id(group)] = (key, max(budget - held, budget // 4))
        return cached[1]

    def buckets(self, group: dict[str, Any]) -> list[list[tuple[Tensor, Tensor]]]:
        """The buckets a factor group is stepped and clipped in: :meth:`shape_buckets` (``foreach``, the default), or
        every pair on its own (``foreach=False``: the same computation, one layer at a time)."""
        if group.get("foreach", True):
            return self.shape_buckets(group)
        return [[pair] for pair in self.factor_pairs(group)]

    def _moving(self, group: dict[str, Any], b_param: Tensor) -> tuple[bool, bool]:
        """(B moves, A moves) at the next step of this pair."""
        if not group.get("alternate", True):
            return True, True
        state = self.state.get(b_param, {})
        phase = int(state["moving"]) if "moving" in state else MOVE_B
        return phase == MOVE_B, phase == MOVE_A

    def moving_factor(self) -> str | None:
        """Which factor the next ``step()`` moves: ``"B"``, ``"A"``, ``"both"``, or ``None`` without factor pairs."""
        self._settle_skip_verdict()
        for group in self.param_groups:
            if group["loft"] and group["params"]:
                b_param = group["params"][0]
                move_b, move_a = self._moving(group, b_param)
                return "both" if (move_b and move_a) else ("B" if move_b else "A")
        return None

    # -------------------------------------------------------------------------------------------- clipping (block 6)
    @torch.no_grad()
    def effective_grad_norm(self) -> Tensor:
        """Global L2 norm of the effective gradients the next ``step()`` acts on (block 6).

        For each factor pair, the effective full-space gradient of the factor that moves next (``g~_U V^T`` when B
        moves, ``U g~_V^T`` when A moves, both when not alternating), in O((m + n) r^2) without an m x n matrix; for
        every other trainable parameter, its plain gradient. Returns an fp32 (fp64 for fp64 models) 0-dim tensor.

        The factor that does not move still feeds its moments in that step, so a non-finite gradient on it makes the
        norm non-finite too (``inf``, or ``nan``), as ``torch.nn.utils.clip_grad_norm_`` would: the step it announces
        would poison the state, and an fp16 overflow there is a skipped step whose logged norm must say so.
        """
        with autocast_disabled(), full_fp32_matmuls():
            return self._effective_grad_norm()

    def _effective_grad_norm(self) -> Tensor:
        check_factor_layout(self)
        # Which factor moves next depends on whether the last step was skipped. On a GPU that verdict was copied to
        # the host after the last step, a forward and backward ago: waiting for it costs nothing in practice.
        self._settle_skip_verdict()
        total: Tensor | None = None
        resting: list[Tensor] = []
        self._caches()["gram_pinv"].clear()
        for group in self.param_groups:
            if group["loft"]:
                for sq in self._factor_group_effective_sq_norms(group, resting):
                    total = sq if total is None else total + sq.to(total.dtype)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        sq = p.grad.detach().to(maths_dtype(p)).square().sum()
                        total = sq if total is None else total + sq.to(total.dtype)
        if total is None:
            return torch.zeros(())
        norm = total.sqrt()
        if resting:
            # One norm over the resting factors' gradients: finite exactly when all of them are (no host sync).
            guard = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(resting)).to(norm.dtype))
            norm = torch.where(torch.isfinite(guard), norm, guard.to(norm.device))
        return norm

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the effective-gradient norm (block 6); returns the norm before clipping.

        Every gradient the optimizer holds (both factors, because both factors' moments accumulate every step, and all
        plain parameters) is multiplied by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
        does. Scaling factor gradients scales their scaled and effective gradients by the same number, so after the
        call the effective norm is at most ``max_norm``. ``max_norm <= 0`` or ``None`` computes the norm only.
        """
        norm = self.effective_grad_norm()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and takes_device_path(grads[0]):
            # No value read on the host: a non-finite norm makes the gradients NaN, and step() then skips.
            finite: bool | Tensor = torch.isfinite(norm)
            if max_norm is not None and max_norm > 0:
                coef = (float(max_norm) / (norm + 1e-6)).clamp_(max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        else:
            finite = math.isfinite(float(norm))
            if max_norm is not None and max_norm > 0 and finite:
                coef = float(max_norm) / (float(norm) + 1e-6)
                if coef < 1.0 and grads:
                    torch._foreach_mul_(grads, coef)
        # The norm covers every gradient step() reads, so step() need not check again while they stay these tensors
        # with these contents (a GradScaler may skip the step, and the next backward make new ones).
        self._caches()["gradients_finite"] = (finite, self._gradient_fingerprint())
        return norm

    def _factor_group_effective_sq_norms(self, group: dict[str, Any], resting: list[Tensor]) -> list[Tensor]:
        """Block 6 for a factor group: per shape bucket and moving factor, the squared effective-gradient norm of the
        pairs that move it next, each one batched computation.

        The gradients of the factors that do not move are appended to ``resting`` (for the finiteness guard).

        The pseudo-inverse of each other factor's Gram matrix is kept (with the factors it came from) for the
        ``step()`` that follows, which needs the same matrices and reuses them if the factors have not changed. On the
        device path the Gram matrices of every bucket are inverted together (:func:`kernels.spd_pinv`), in as few
        batched calls as the memory budget allows: they are all (r, r), whatever the layers' shapes, and the
        pseudo-inverse was most of a bucket's launches.
        """
        # The moving factor's gradient g and the other factor y whose Gram matrix scales it (U = B, V = A^T), stacked
        # exactly as the step stacks them, so that the step can reuse the pseudo-inverse bit for bit. Only (r, r)
        # matrices are kept across buckets: g^T g and y^T y (device path) or (y^T y)^+ (the host's kernels).
        entries: list[tuple[list[Tensor], Tensor, Tensor]] = []  # (other factors, g^T g, y^T y or (y^T y)^+)
        for bucket in self.buckets(group):
            sides: dict[str, list[tuple[Tensor, Tensor]]] = {"B": [], "A": []}
            for b_param, a_param in bucket:
                if b_param.grad is None and a_param.grad is None:
                    continue
                move_b, move_a = self._moving(group, b_param)
                _add_resting_grad(resting, b_param, a_param, move_b, move_a)
                if move_b:
                    sides["B"].append((b_param, a_param))
                if move_a:
                    sides["A"].append((b_param, a_param))
            dtype = maths_dtype(bucket[0][0])
            for side, pairs in sides.items():
                if not pairs:
                    continue
                if side == "B":
                    grad = stack_factors([grad_or_zeros(b) for b, _ in pairs], dtype)
                    other = stack_factors([a for _, a in pairs], dtype).transpose(1, 2)
                else:
                    grad = stack_factors([grad_or_zeros(a) for _, a in pairs], dtype).transpose(1, 2)
                    other = stack_factors([b for b, _ in pairs], dtype)
                others = [a if side == "B" else b for b, a in pairs]
                square = torch.bmm(grad.transpose(1, 2), grad)
                gram = torch.bmm(other.transpose(1, 2), other) if takes_device_path(other) else kernels.gram_pinv(other)
                entries.append((others, square, gram))
        # Device path: the entries whose Gram matrices are inverted together, as many at once as a quarter of the
        # budget holds the pseudo-inverse's float64 temporaries for (about 12 r x r matrices each).
        budget = group.get("memory_budget", kernels.DEFAULT_MEMORY_BUDGET) // 4
        calls: dict[tuple, list[tuple[list[int], int]]] = {}  # kind -> [(entries, matrices in them)]
        for index, (_, _, gram) in enumerate(entries):
            if not takes_device_path(gram):
                continue
            rank, count = gram.shape[-1], gram.shape[0]
            chunks = calls.setdefault((rank, gram.dtype, gram.device), [([], 0)])
            indices, held = chunks[-1]
            if indices and held + count > max(1, budget // (12 * rank * rank * 8)):
                chunks.append(([], 0))
                indices, held = chunks[-1]
            indices.append(index)
            chunks[-1] = (indices, held + count)
        pinvs = [gram for _, _, gram in entries]
        for indices in (chunk for chunks in calls.values() for chunk, _ in chunks):
            inverted = kernels.spd_pinv(torch.cat([entries[i][2] for i in indices]))
            for i, pinv in zip(indices, inverted.split([entries[i][2].shape[0] for i in indices])):
                pinvs[i] = pinv
        cache = self._caches()["gram_pinv"]
        squares = []
        for (others, square, _), pinv in zip(entries, pinvs):
            cache[tuple(map(id, others))] = (factor_versions(others), pinv)
            squares.append(square.mul_(pinv).sum())  # maths.effective_grad_sq_norm from g^T g: sum((g^T g) ⊙ G^+)
        return squares

    def cached_gram_pinv(self, params: list[Tensor], stacked: Tensor) -> Tensor | None:
        """The Gram pseudo-inverse :meth:`effective_grad_norm` computed for these factors, if they are unchanged.

        Args:
            params: the factor parameters, in the order ``stacked`` stacks them.
            stacked: their current values as (L, rows, r) in the maths dtype (``loft_A`` transposed).
        """
        entry = self._caches()["gram_pinv"].get(tuple(map(id, params)))
        # Unchanged: no in-place write since (a version counter, read on the host with no synchronisation).
        if entry is None or entry[0] != factor_versions(params) or entry[1].shape[0] != stacked.shape[0]:
            return None
        return entry[1]

    # ------------------------------------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group; a step whose gradients hold a NaN or inf is skipped, changing nothing.

        Without a GradScaler (bf16, fp32) nothing else stops a non-finite gradient, and one step on it would turn the
        moments and factors into NaN for good (the Gram matrices and their inverses of every later step with them).
        A skipped step leaves the factors, moments, phases and step counts as they were, warns, and is counted
        (:attr:`skipped_steps`); ``max_consecutive_skips`` skips in a row raise an error naming the layers whose
        gradients are not finite.

        On the CPU the check is free after :meth:`clip_grad_norm_` (whose norm is non-finite exactly then), otherwise
        one reduction, and a skipped step does no work. On other devices nothing is read back on the host: the step
        runs with its updates cancelled on the device where the verdict is "not finite", and the host learns the
        verdict at the next step (or :meth:`last_step_was_skipped`, :meth:`state_dict`), long after it is computed,
        then puts the step counts and phases back.
        """
        check_factor_layout(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle_skip_verdict()
        caches = self._caches()
        known = caches.pop("gradients_finite", None)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device_path = bool(grads) and takes_device_path(grads[0])
        if known is not None and self._same_gradients(known[1]):
            verdict = known[0]
        else:
            verdict = self._gradients_finite(grads, on_device=device_path)
        if not device_path and not isinstance(verdict, bool):
            verdict = bool(verdict)  # a device verdict of clip_grad_norm_ where this step cannot cancel on the device
        ok = StepGate(verdict) if device_path else None
        if not device_path and not verdict:
            caches["gram_pinv"].clear()
            caches["verdict"] = StepVerdict(skipped=True)
            self._record_verdict(False)
            return loss
        caches["counters_before"] = [] if device_path else None
        caches["backends"] = set()
        with autocast_disabled(), full_fp32_matmuls():
            for group in self.param_groups:
                if group["loft"]:
                    self._step_factor_group(group, ok)
                else:
                    self._step_plain_group(group, ok)
        caches["gram_pinv"].clear()
        backend = ", ".join(sorted(caches["backends"])) or None
        if backend is not None and backend != caches.get("backend"):
            logger.info("%s: this step ran on %s.", type(self).__name__, backend)
        caches["backend"] = backend or caches.get("backend")
        if device_path:
            self._defer_verdict(verdict, caches.pop("counters_before"))
        else:
            caches["counters_before"] = None
            caches["verdict"] = StepVerdict(skipped=False)
            self._record_verdict(True)
        return loss

    @property
    def backend(self) -> str | None:
        """Which implementation ran the last step (logged at ``INFO`` on ``loft_peft`` when it changes):
        ``"native C kernels (CPU, fp32)"``, ``"batched PyTorch (<device>)"``, ``"batched PyTorch, device path (...)"``
        (no host synchronisation; every device but the CPU), or several of these joined by commas; ``None`` before
        the first step."""
        return self._caches().get("backend")

    def note_backend(self, name: str) -> None:
        """Called by a step with the name of the implementation that ran it (see :attr:`backend`)."""
        self._caches().setdefault("backends", set()).add(name)

    def note_counters(self, *tensors: Tensor) -> None:
        """Called by a step before it advances step counts or phases: keeps their values, to put back if the device
        verdict of this step turns out "not finite"."""
        before = self._caches().get("counters_before")
        if before is not None:
            before.extend((t, t.clone()) for t in tensors)

    def note_entries(self, states: list[dict], key: str) -> None:
        """Like :meth:`note_counters` for a state entry a step replaces or removes (put back as it was, or removed)."""
        before = self._caches().get("counters_before")
        if before is not None:
            before.extend((state, key, state.get(key, _ABSENT)) for state in states)

    def _defer_verdict(self, ok: Tensor, counters_before: list[tuple[Tensor, Tensor]]) -> None:
        """Start copying the device verdict to the host without waiting for it."""
        if ok.device.type == "meta":  # no values: taken as finite
            host, event = None, None
        elif ok.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = ok.to("cpu", non_blocking=True), None
        self._caches()["pending_verdict"] = (host, event, counters_before)
        self._caches()["verdict"] = StepVerdict(host=host, event=event)

    def _settle_skip_verdict(self) -> None:
        """Take in the verdict of the last device-path step, if one is pending; by now it is long computed."""
        pending = self._caches().pop("pending_verdict", None)
        if pending is None:
            return
        host, event, counters_before = pending
        if event is not None:
            event.synchronize()
        finite = True if host is None else bool(host)
        if not finite:
            for entry in reversed(counters_before):
                if len(entry) == 2:
                    entry[0].copy_(entry[1])
                elif entry[2] is _ABSENT:
                    entry[0].pop(entry[1], None)
                else:
                    entry[0][entry[1]] = entry[2]
            self._caches().pop("stacked", None)  # cached Gram pseudo-inverses describe factors the step did not write
        self._record_verdict(finite)

    def _record_verdict(self, finite: bool) -> None:
        group = self.param_groups[0]
        self._caches()["skipped"] = not finite
        if finite:
            group["consecutive_skips"] = 0
            return
        group["skipped_steps"] = group.get("skipped_steps", 0) + 1
        group["consecutive_skips"] = group.get("consecutive_skips", 0) + 1
        limit = group.get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS)
        if group["consecutive_skips"] >= limit:
            raise FloatingPointError(
                f"{type(self).__name__}: the last {group['consecutive_skips']} steps were skipped for NaN or inf "
                f"gradients{self._describe_non_finite_gradients()}. Lower the learning rate, look at the data, or use "
                "fp32/bf16 instead of fp16."
            )
        warnings.warn(
            f"{type(self).__name__}: a gradient holds NaN or inf, so this step was skipped and nothing moved (no "
            f"GradScaler does it in bf16 or fp32; {group['skipped_steps']} skipped so far). If it happens often, lower "
            "the learning rate or look at the data.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _describe_non_finite_gradients(self) -> str:
        names = []
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    names.append(getattr(p, "loft_name", None) or f"parameter {index} of shape {tuple(p.shape)}")
        if not names:
            return ""
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"; not finite now: {shown}"

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for NaN or inf gradients (checkpointed with the optimizer)."""
        self._settle_skip_verdict()
        return int(self.param_groups[0].get("skipped_steps", 0))

    def last_step_verdict(self) -> StepVerdict | None:
        """The last :meth:`step`'s :class:`StepVerdict`, to read later without waiting (``None`` before any)."""
        return self._caches().get("verdict")

    def last_step_was_skipped(self) -> bool:
        """Whether the last :meth:`step` was skipped for a NaN or inf gradient (on a GPU: waits for that step)."""
        self._settle_skip_verdict()
        return bool(self._caches().get("skipped", False))

    def state_dict(self) -> dict[str, Any]:
        self._settle_skip_verdict()
        return super().state_dict()

    def _gradient_fingerprint(self) -> list[tuple[weakref.ref, int]]:
        return [(weakref.ref(p.grad), p.grad._version) for g in self.param_groups for p in g["params"]
                if p.grad is not None]

    def _same_gradients(self, fingerprint: list[tuple[weakref.ref, int]]) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return len(grads) == len(fingerprint) and all(
            ref() is grad and grad._version == version for grad, (ref, version) in zip(grads, fingerprint)
        )

    def _gradients_finite(self, grads: list[Tensor], on_device: bool = False) -> bool | Tensor:
        """One fused pass per device and dtype, GradScaler's own check (with a scale of 1 it changes no value).

        Returns a bool, or with ``on_device`` a 0-dim bool tensor on the gradients' first device, read by nobody.
        """
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        buffers = self._caches().setdefault("finite_check", {})
        verdict: Tensor | None = None
        for (device, _), kind in by_kind.items():
            if device not in buffers:
                buffers[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
            found_inf, one = buffers[device]
            found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(kind, found_inf, one)
            if not on_device:
                if found_inf.item():
                    return False
                continue
            finite = found_inf[0] == 0
            verdict = finite if verdict is None else verdict & finite.to(verdict.device)
        return True if verdict is None else verdict

    def _step_factor_group(self, group: dict[str, Any], ok: StepGate | None = None) -> None:
        """Step a factor group bucket by bucket (:meth:`buckets`); ``ok``: the device path's verdict, or ``None``."""
        for bucket in self.buckets(group):
            self._step_bucket(group, bucket, ok)

    def _step_bucket(self, group: dict[str, Any], bucket: list[tuple[Tensor, Tensor]], ok: StepGate | None) -> None:
        """Step the pairs of one bucket that have gradients (with ``ok``, cancelled on the device where it is false)."""
        raise NotImplementedError

    def _plain_hyperparameters(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float, float]:
        return group["lr"], group["betas"], group["eps"], group["weight_decay"]

    def _step_plain_group(self, group: dict[str, Any], ok: StepGate | None = None) -> None:
        """AdamW exactly as ``torch.optim.AdamW`` (decoupled decay, eps outside the root), with fp32 state.

        With a device verdict ``ok`` (a :class:`StepGate`), the update is cancelled on the device where it is false: the
        gradient counts as 0, the decays as 1 and the learning rate as 0, so every value stays as it was, bit for bit.
        """
        lr, (beta1, beta2), eps, weight_decay = self._plain_hyperparameters(group)
        if ok is not None:
            self._step_plain_group_cancellable(group, ok, lr, beta1, beta2, eps, weight_decay)
            return
        for p in group["params"]:
            if p.grad is None:
                continue
            state, dtype = self._plain_state(p)
            state["step"] += 1
            step = float(state["step"])
            grad = p.grad.to(dtype)
            value = p.detach().to(dtype, copy=True) if p.dtype != dtype else p.data
            if weight_decay != 0.0:
                value.mul_(1.0 - lr * weight_decay)
            state["exp_avg"].lerp_(grad, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(eps)
            value.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
            if value is not p.data:
                p.data.copy_(value)

    def _plain_state(self, p: Tensor) -> tuple[dict[str, Tensor], torch.dtype]:
        """A plain parameter's AdamW state (made on its first step) and the dtype of its maths."""
        if p.grad.is_sparse:
            raise TypeError("LoFT optimizers do not support sparse gradients.")
        dtype = maths_dtype(p)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state, dtype

    def _step_plain_group_cancellable(
        self, group: dict[str, Any], ok: StepGate, lr: float, beta1: float, beta2: float, eps: float,
        weight_decay: float,
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state, dtype = self._plain_state(p)
            self.note_counters(state["step"])
            state["step"] += 1
            step = float(state["step"])
            grad = ok.where(p.grad.to(dtype), 0.0)
            value = p.detach().to(dtype, copy=True) if p.dtype != dtype else p.data
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            state["exp_avg"].lerp_(grad, ok.choose(1.0 - beta1, 0.0, grad))
            state["exp_avg_sq"].mul_(ok.choose(beta2, 1.0, grad)).addcmul_(grad, grad, value=1.0 - beta2)
            if weight_decay != 0.0:
                value.mul_(ok.choose(1.0 - lr * weight_decay, 1.0, grad))
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(eps)
            value.addcdiv_(state["exp_avg"] * ok.choose(-lr / bias_correction1, 0.0, grad), denom)
            if value is not p.data:
                p.data.copy_(value)

    # ---------------------------------------------------------------------------------------------------- checkpoint
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping every state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype; for bf16 factors
        that would round the fp32 moments and cross terms on every resume. The saved tensors are put back as saved.
        """
        saved = {index: dict(values) for index, values in state_dict["state"].items()}
        # Every cache refers to the state being replaced (the stacked state would otherwise stay alive beside the
        # loaded one): drop them all; they are rebuilt on the next step.
        self.__dict__.pop("_loft_caches", None)
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            param = params[int(index)]
            for key, value in values.items():
                if torch.is_tensor(value):
                    # Step counts and phases stay on the host (the CPU), where reading them costs no synchronisation.
                    device = torch.device("cpu") if key in ("step", "moving") else param.device
                    self.state[param][key] = value.to(device=device, dtype=value.dtype, copy=True)


def factor_versions(params: list[Tensor]) -> tuple[int, ...]:
    """The parameters' version counters, which every in-place write (``copy_``, ``mul_``, an optimizer step) bumps."""
    return tuple(p._version for p in params)


def grad_or_zeros(param: Tensor) -> Tensor:
    """The parameter's gradient, or zeros where it got none (a pair that still steps with its moments)."""
    return param.grad if param.grad is not None else torch.zeros_like(param)


def stack_factors(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """(L, ...) in ``dtype`` from L same-shape tensors: a view for one tensor of that dtype, else one copy."""
    stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
    return stacked if stacked.dtype == dtype else stacked.to(dtype)
