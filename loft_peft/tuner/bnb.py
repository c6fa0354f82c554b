"""LoFT on bitsandbytes 4-bit layers (QLoFT). bitsandbytes is imported only when a model already uses it.

The base ``Linear4bit`` stays frozen in NF4/FP4; ``loft_A`` and ``loft_B`` train in the compute dtype (or fp32).
Merging dequantizes the base weight, adds ``B @ A`` and quantizes again, so a merged 4-bit model differs from the
adapted one by the 4-bit rounding of ``W0 + B A`` (about one quantization step, not more); ``unload`` returns the
untouched 4-bit base.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .layer import Linear


def is_linear4bit(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit``; never imports bitsandbytes when the model does not use it."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def make_linear4bit(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module:
    return Linear4bit(target, adapter_name, **kwargs)


def _requantize(weight: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    params = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
    params.pop("data", None)
    params["requires_grad"] = False
    if "bnb_quantized" in params:
        params["bnb_quantized"] = False
    return bnb.nn.Params4bit(data.to("cpu"), **params).to(weight.device)


class Linear4bit(Linear):
    """LoFT on ``bitsandbytes.nn.Linear4bit``: ``y = base_4bit(x) + dropout(x) @ A^T @ B^T``."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        b_factor, a_factor = self.loft_B[adapter], self.loft_A[adapter]
        return b_factor.float() @ a_factor.float()

    def _dequantized(self) -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight

        weight = self.get_base_layer().weight
        return dequantize_bnb_weight(weight, state=weight.quant_state).float()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.loft_A:
                continue
            warnings.warn("Merging into a 4-bit layer re-quantizes W0 + B A: outputs change by the 4-bit rounding.")
            merged = self._dequantized() + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; not merged.")
            base = self.get_base_layer()
            base.weight = _requantize(base.weight, merged.to(base.compute_dtype or torch.float32))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.loft_A:
                base = self.get_base_layer()
                restored = self._dequantized() - self.get_delta_weight(adapter)
                base.weight = _requantize(base.weight, restored.to(base.compute_dtype or torch.float32))
