"""Where the step runs: the CPU, whose values the host reads for free, or a device (a GPU), whose values it must not.

On a GPU every value the host reads (``.item()``, ``bool(t)``, ``torch.equal``) waits for all queued work to finish,
so the optimizer step reads none there: what it decides on the host (which factor moves, the bias corrections) comes
from step counts and phases kept on the CPU, and what depends on device values (whether the gradients are finite,
which Gram matrices need the pseudo-inverse's fallback) is decided on the device with ``torch.where``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

# Tests set this to run the device path on CPU tensors, where its values can be checked against the reference.
_DEVICE_PATH_ON_CPU = False


def takes_device_path(tensor: Tensor) -> bool:
    """Whether a step on these tensors runs as on a GPU: no value is read back on the host (no synchronisation), and a
    step on non-finite gradients is cancelled on the device. Every device but the CPU does."""
    return tensor.device.type != "cpu" or _DEVICE_PATH_ON_CPU


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """fp32 GEMMs in full precision inside the step, whatever the global setting: with TF32 on (Ampere and later
    GPUs), the rebuilt second moment was measured 6-8% off on each factor's first step."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextmanager
def autocast_disabled() -> Iterator[None]:
    """No autocast inside the optimizer: the common ``with autocast(): loss.backward(); opt.step()`` would otherwise
    run the Gram matrices and their inverses in bf16 / fp16 (``linalg.pinv`` refuses bf16; fp16 loses the inverse)."""
    active = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available()) and torch.is_autocast_enabled(d)]
    with ExitStack() as stack:  # entering autocast costs tens of microseconds: only where it is on
        for device_type in active:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


class StepGate:
    """The device path's verdict on a step's gradients: ``ok`` (0-dim bool on the device) is true where they are
    finite. Where it is false every update of the step is cancelled on the device (gradients count as 0, decays as 1,
    step sizes as 0), with no host read.

    :meth:`choose` gives the gated constants ``torch.where(ok, value, otherwise)`` as 0-dim tensors, each made once a
    step (a few launches each) rather than once per bucket and use.
    """

    def __init__(self, ok: Tensor):
        self.ok = ok
        self._constants: dict[tuple, Tensor] = {}

    def choose(self, value: float, otherwise: float, like: Tensor) -> Tensor:
        """``value`` where the gradients are finite, else ``otherwise``: 0-dim, of ``like``'s dtype and device."""
        key = (value, otherwise, like.dtype, like.device)
        constant = self._constants.get(key)
        if constant is None:
            ok = self.ok if self.ok.device == like.device else self.ok.to(like.device)
            constant = self._constants[key] = torch.where(ok, value, otherwise).to(like.dtype)
        return constant

    def where(self, value: Tensor, otherwise: Tensor | float) -> Tensor:
        """``torch.where(ok, value, otherwise)`` for tensors (on ``value``'s device)."""
        ok = self.ok if self.ok.device == value.device else self.ok.to(value.device)
        return torch.where(ok, value, otherwise)
