"""LoFT layers: a frozen base layer plus, per adapter, the factors ``loft_A`` and ``loft_B``.

Forward pass, for input ``x`` of shape (..., in_features)::

    y = base_layer(x) + dropout(x) @ loft_A^T @ loft_B^T
    loft_A: (r, in_features)    loft_B: (out_features, r)    delta W = loft_B @ loft_A   (out_features, in_features)

in ``nn.Linear`` layout, whatever the base layer stores. ``loft_A`` / ``loft_B`` are the public contract between the
tuner and the optimizer; in the paper's notation ``U = loft_B`` and ``V = loft_A^T``. There is no alpha scaling, so
the adapter is exactly a LoRA adapter with ``lora_alpha = r`` and ``lora_A = loft_A``, ``lora_B = loft_B``.

Each factor parameter also carries a mark, ``param.loft_factor`` (``"B"`` or ``"A"``) and ``param.loft_pair`` (a
token shared by the two factors of one layer and adapter), so that an optimizer handed a plain list of parameters
can still find the pairs, and so that an optimizer that is not LoFT's can be told it is training LoFT factors.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D


class FactorPairToken:
    """What the two factors of one layer's adapter share as ``param.loft_pair`` (compared by identity)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"FactorPairToken({self.name!r})"


def mark_factor_pair(b_factor: nn.Parameter, a_factor: nn.Parameter, name: str) -> None:
    """Mark ``(loft_B, loft_A)`` as one LoFT pair (see the module docstring)."""
    token = FactorPairToken(name)
    b_factor.loft_factor, b_factor.loft_pair = "B", token
    a_factor.loft_factor, a_factor.loft_pair = "A", token


def is_loft_factor(param: torch.Tensor) -> bool:
    return getattr(param, "loft_factor", None) in ("A", "B")


class LoftLayer(BaseTunerLayer):
    """Adapter bookkeeping shared by every LoFT layer type (the base classes do merging, switching and saving)."""

    adapter_layer_names = ("loft_A", "loft_B")
    other_param_names = ("r", "loft_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.loft_dropout = nn.ModuleDict({})
        self.loft_A = nn.ParameterDict({})
        self.loft_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = _in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, r: int, loft_dropout: float, init_weights: bool) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoFT rank r must be an int >= 1; got {r!r}.")
        self.r[adapter_name] = r
        self.loft_dropout[adapter_name] = nn.Dropout(p=loft_dropout) if loft_dropout > 0.0 else nn.Identity()
        self.loft_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.loft_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.reset_loft_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.mark_factors(adapter_name)
        self.set_adapter(self.active_adapters)

    def mark_factors(self, adapter_name: str) -> None:
        """Mark this adapter's factors as a pair, unless they already are (moving them to a device can replace them)."""
        b_factor, a_factor = self.loft_B[adapter_name], self.loft_A[adapter_name]
        token = getattr(b_factor, "loft_pair", None)
        if token is None or getattr(a_factor, "loft_pair", None) is not token:
            mark_factor_pair(b_factor, a_factor, adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: ``W0 + B A`` is a LoRA adapter (PEFT's ``save_as_lora`` / ``convert_to_lora`` use this)."""
        return True

    @torch.no_grad()
    def reset_loft_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """LoRA's initialisation: A Kaiming-uniform (a = sqrt(5), as ``nn.Linear``), B zero, so B A = 0 at the start.

        With ``init_weights=False`` B is Kaiming-uniform too: the adapter starts non-zero (useful in tests).
        """
        nn.init.kaiming_uniform_(self.loft_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.loft_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.loft_B[adapter_name], a=math.sqrt(5))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``loft_B @ loft_A`` in the base weight's layout and dtype ((in, out) for ``Conv1D``)."""
        weight = self.get_base_layer().weight
        b_factor, a_factor = self.loft_B[adapter], self.loft_A[adapter]
        compute_dtype = torch.promote_types(b_factor.dtype, torch.float32)
        delta = b_factor.to(compute_dtype) @ a_factor.to(compute_dtype)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype=weight.dtype, device=weight.device)

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a_factor, b_factor = self.loft_A[adapter], self.loft_B[adapter]
        x = self._cast_input_dtype(x, a_factor.dtype)
        return nn.functional.linear(nn.functional.linear(self.loft_dropout[adapter](x), a_factor), b_factor)


def _in_out_features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape  # Conv1D stores its weight as (in, out)
        return int(in_features), int(out_features)
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    raise TypeError(f"LoFT cannot wrap a {type(base).__name__}: it has no in_features/out_features.")


class Linear(nn.Module, LoftLayer):
    """LoFT on ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored as (in, out); detected, no flag needed)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        loft_dropout: float = 0.0,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoftLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, loft_dropout=loft_dropout, init_weights=init_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``B @ A`` of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.loft_A:
                continue
            delta = self.get_delta_weight(adapter)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; not merged.")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``B @ A`` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.loft_A:
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """PEFT's checks for mixed adapter batches (``adapter_names``), as LoRA makes them."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``adapter_names[i]`` (``"__base__"``: none), as LoRA's mixed batches."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.loft_A:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] += self._adapter_output(x[rows], adapter).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.loft_A:
                result = result + self._adapter_output(x, adapter).to(result_dtype)
        return result

    def __repr__(self) -> str:
        return "loft." + super().__repr__()
