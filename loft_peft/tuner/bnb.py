"""LoFT on bitsandbytes 4-bit layers (QLoFT). bitsandbytes is imported only when a model already uses it.

The base ``Linear4bit`` stays frozen in NF4 or FP4 (with or without double quantization); ``loft_A`` and ``loft_B``
are ordinary float parameters beside it, so the LoFT optimizers, effective-gradient clipping and the Trainer callback
see the same factor pairs as on a float model.

Training on the CPU
-------------------
On CPUs with AVX512-BF16, bitsandbytes (0.50) switches a ``Linear4bit`` to an inference layout the first time it runs
in ``eval()`` mode without gradients: it repacks the codes and stores the block scales in bf16. From then on the
layer computes with the rounded scales (outputs move by about 0.4% of their largest entry) and, in ``train()`` mode
too, through a kernel without a backward, so no gradient flows through it to the layers below: training after the
first evaluation would silently go wrong. LoFT layers therefore turn that switch off for their base layer, and
:func:`loft_peft.load_qloft_model` for every 4-bit layer of the model, with :func:`set_cpu_inference_layout`; after
training, ``set_cpu_inference_layout(model, True)`` gives inference-only use the fast kernel back.

Merging into 4 bits
-------------------
A 4-bit weight is stored per block of ``blocksize`` (64) consecutive elements of the row-major weight: a scale
``a_b``, the block's largest magnitude, and for each element the code value ``c`` (one of 16 numbers in [-1, 1]) nearest
to ``w / a_b``; the layer computes with ``c * a_b``. With double quantization the scales are themselves stored in
8 bits, in groups of 256 blocks, as ``mean(a) + 8-bit code * s_g`` with ``s_g = max |a_b - mean(a)|`` over the group.

``merge`` dequantizes the base weight ``W0``, forms ``M = W0 + B A`` in fp32 and quantizes ``M`` again, so the merged
layer computes with ``W' = deq(Q(M))`` where the adapted layer computed with ``M``. For every element
(:func:`requantization_error_bound`)::

    |W' - M| <= (d4 + 4u) a_b + (1 + 2u) e_b,       e_b = d8 s_g with double quantization, else 0

* ``d4`` is half the widest gap between neighbouring 4-bit code values: 0.1519 for NF4 (between -1 and -0.6962),
  0.1667 for FP4 (between 2/3 and 1);
* ``d8 = 0.00703`` is the same for the 8-bit code of the scales (``e_b`` bounds the error of the stored scale);
* ``u`` is the unit roundoff of the dtype the weight was quantized from (2^-8 for bf16, 2^-11 for fp16, 2^-24 for
  fp32): ``M`` is rounded to it before quantization and dequantized values are returned in it;
* ``a_b`` and ``s_g`` are those of ``M``.

Without double quantization this is one 4-bit rounding step: at most 15.2% (NF4) or 16.7% (FP4) of the block's
largest magnitude, the same error the base weight took when the model was loaded in 4 bits. Double quantization adds
the error of the block's 8-bit scale, a fraction ``d8`` of the spread of scales around their mean in its group.

What that costs in practice: ``W0`` already lies on the 4-bit grid, so an element of ``B A`` smaller than half the gap
to the next code rounds straight back to ``W0``, and a merged 4-bit model keeps only the part of the update that
crosses a code boundary. Measured on SmolLM2-135M (NF4, double quantization, LoFT r=8 on Q, K, V, Up, Down after 20
LoFT-AdamW steps at lr 1e-3, ``|B A|`` about 2.3% of ``|W0|`` per layer): the error stayed within the bound (largest
error/bound 0.99), ``|W' - M|`` was 2.4% of ``|M|`` on average, and the merged weights kept 4.4% of ``B A`` (the
projection of ``W' - W0`` onto ``B A``); held-out loss was 4.30 for the base, 4.85 adapted (the steps overfit 16
training sequences) and 4.25 merged: the merged model is back near the base. For a model to deploy, merge into a float
copy of the base instead (load it unquantized, ``PeftModel.from_pretrained`` the adapter, then ``merge_and_unload``).
``unmerge`` requantizes again and so gives the base back only to within one more step, while ``unload`` (without
merging) returns the untouched 4-bit base layers.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .layer import Linear

# Half the widest gap between neighbouring code values of bitsandbytes' 4-bit types, and of the 8-bit "dynamic" code
# that double quantization stores the scales in (whose most negative value is -0.99297, so -1 is off by the same).
# Module constants rather than reads from bitsandbytes so the bound is stated, and checked by the tests, on its own.
HALF_STEP_4BIT = {"nf4": 0.151904, "fp4": 1.0 / 6.0}
HALF_STEP_8BIT_SCALES = 0.0070313
NESTED_BLOCKSIZE = 256
# Unit roundoff of the dtypes bitsandbytes quantizes from (round-to-nearest: half the spacing just above 1).
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def is_linear4bit(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit``; never imports bitsandbytes when the model does not use it."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_linear8bit(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear8bitLt``; never imports bitsandbytes when the model does not use it."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def check_bnb_layer_supported(module: nn.Module, key: str) -> None:
    """Refuse the bitsandbytes layers LoFT does not wrap, before they are mistaken for float layers.

    ``Linear8bitLt`` subclasses ``nn.Linear``: wrapped as one, it would train, but merging would add a float update to
    int8 storage. LoFT supports 4-bit (``Linear4bit``) quantization only.

    Raises:
        TypeError: ``module`` is an 8-bit bitsandbytes layer.
    """
    if is_linear8bit(module):
        raise TypeError(
            f"Target module {key!r} is a bitsandbytes 8-bit Linear8bitLt; LoFT supports 4-bit quantization only. Load "
            "the model with BitsAndBytesConfig(load_in_4bit=True) (or loft_peft.load_qloft_model), or unquantized."
        )


def make_linear4bit(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module:
    """The LoFT layer for a ``Linear4bit`` target (called by ``LoftModel`` when :func:`is_linear4bit` holds)."""
    return Linear4bit(target, adapter_name, **kwargs)


def set_cpu_inference_layout(model: nn.Module, enabled: bool) -> int:
    """Allow or forbid bitsandbytes' CPU inference layout for every ``Linear4bit`` in ``model`` (module docstring).

    Forbidding it also puts layers already switched back into the standard layout (their scales keep the bf16
    rounding the switch applied), so gradients flow through them again. Allowing it restores bitsandbytes' default
    (the fast kernel where the CPU has AVX512-BF16); do that only for a model that will not be trained any more.

    Returns:
        The number of ``Linear4bit`` layers found.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False; got {enabled!r}.")
    layers = [module for module in model.modules() if is_linear4bit(module)]
    if not layers:
        return 0
    import bitsandbytes.functional

    # Versions without the CPU inference layout have no detector, and no use for the flag.
    has_avx512bf16 = getattr(bitsandbytes.functional, "has_avx512bf16", lambda: False)
    supported = bool(has_avx512bf16()) if enabled else False
    for layer in layers:
        layer.support_avx512bf16_for_cpu = supported
        if not enabled:
            _standard_layout(layer)
    return len(layers)


def _standard_layout(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking (as bitsandbytes does itself before saving a layer)."""
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        layer.quant_state = weight.quant_state


def requantization_error_bound(
    weight: torch.Tensor,
    *,
    quant_type: str,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-element bound on ``|deq(Q(weight)) - weight|`` for bitsandbytes 4-bit quantization (module docstring).

    Args:
        weight: the float weight about to be quantized (for a merge, ``W0 + B A``), shape (out, in).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: elements per quantization block (the weight's ``quant_state.blocksize``).
        double_quant: whether the block scales are stored in 8 bits (``quant_state.nested``).
        dtype: the dtype the weight is quantized from and dequantized to (``quant_state.dtype``).

    Returns:
        An fp32 tensor of the weight's shape: ``(d4 + 4u) a_b + (1 + 2u) e_b`` for each element.

    Raises:
        ValueError: an unknown ``quant_type``, ``dtype`` or ``blocksize``.
    """
    if quant_type not in HALF_STEP_4BIT:
        raise ValueError(f"quant_type must be one of {sorted(HALF_STEP_4BIT)}; got {quant_type!r}.")
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"bitsandbytes quantizes from fp32, fp16 or bf16; got {dtype}.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1; got {blocksize!r}.")
    unit = _UNIT_ROUNDOFF[dtype]
    flat = weight.detach().to(dtype).float().reshape(-1)
    # bitsandbytes' last block may be partial; zero padding leaves its largest magnitude as it is.
    flat = nn.functional.pad(flat, (0, (-flat.numel()) % blocksize))
    scales = flat.reshape(-1, blocksize).abs().amax(dim=1)
    scale_error = torch.zeros_like(scales)
    if double_quant:
        deviation = (scales - scales.mean()).abs()
        pad = (-deviation.numel()) % NESTED_BLOCKSIZE
        spread = nn.functional.pad(deviation, (0, pad)).reshape(-1, NESTED_BLOCKSIZE).amax(dim=1)
        scale_error = HALF_STEP_8BIT_SCALES * spread.repeat_interleave(NESTED_BLOCKSIZE)[: scales.numel()]
    bound = (HALF_STEP_4BIT[quant_type] + 4 * unit) * scales + (1 + 2 * unit) * scale_error
    return bound.repeat_interleave(blocksize)[: weight.numel()].reshape(weight.shape)


def dequantize_4bit_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight a ``Linear4bit`` computes with, as (out, in) in its quantization dtype.

    A layer in bitsandbytes' CPU inference layout (module docstring) is put back in the standard layout first, the
    only one ``dequantize_4bit`` reads.
    """
    import bitsandbytes as bnb

    _standard_layout(layer)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _quantize_into(layer: nn.Module, value: torch.Tensor) -> None:
    """Replace ``layer.weight`` by the 4-bit quantization of ``value`` with the layer's own format.

    Block size, code type, double quantization, storage dtype and the dtype quantized from are kept, so the layer
    (and a checkpoint saved from it) looks exactly as one loaded from a float model holding ``value``.
    """
    import bitsandbytes as bnb

    old = layer.weight
    layer.weight = bnb.nn.Params4bit(
        value.to(old.quant_state.dtype).contiguous(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=layer,
    ).to(value.device)  # moving an unquantized Params4bit to a device is what quantizes it


class Linear4bit(Linear):
    """LoFT on ``bitsandbytes.nn.Linear4bit``: ``y = base_4bit(x) + dropout(x) @ loft_A^T @ loft_B^T``.

    ``base_4bit`` computes ``x @ deq(W0)^T`` in the layer's compute dtype; the factors keep their own dtype (fp32 by
    default; they are created before any cast) and the adapter's output is cast to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # Keep gradients flowing through the base after an evaluation (module docstring, "Training on the CPU").
        set_cpu_inference_layout(self.get_base_layer(), False)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``loft_B @ loft_A`` in fp32, (out, in): merging adds it to the dequantized weight before requantizing."""
        return self.loft_B[adapter].float() @ self.loft_A[adapter].float()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Dequantize, add ``B @ A``, requantize (error bound: module docstring)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.loft_A:
                continue
            warnings.warn(
                "Merging LoFT into a 4-bit layer requantizes W0 + B A: each weight moves by up to one 4-bit step, "
                "and updates smaller than that round away (see loft_peft.tuner.bnb)."
            )
            merged = dequantize_4bit_weight(base).float() + self.get_delta_weight(adapter).to(base.weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; not merged.")
            _quantize_into(base, merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged ``B @ A`` again; this requantizes too, so the base is restored to within one step."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.loft_A:
                warnings.warn(
                    "Unmerging LoFT from a 4-bit layer requantizes the base: it comes back to within one more 4-bit "
                    "step of the original, not exactly (see loft_peft.tuner.bnb)."
                )
                restored = dequantize_4bit_weight(base).float() - self.get_delta_weight(adapter).to(base.weight.device)
                _quantize_into(base, restored)
