"""QLoFT: LoFT on a 4-bit quantized base model, loaded in one call.

::

    model = load_qloft_model("path/to/llama", LoftConfig(r=16))           # a PeftModel, ready to train
    optimizer = create_loft_optimizer(model, lr=2e-4)

does what the plain route does by hand::

    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))
    base = prepare_model_for_kbit_training(base)
    model = get_peft_model(base, LoftConfig(r=16))

The linear layers are bitsandbytes ``Linear4bit`` (NF4 or FP4, with or without double quantization) and stay frozen;
LoFT's factors are float parameters beside them. bitsandbytes is optional: it is imported only here, when asked for.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from .tuner.bnb import set_cpu_inference_layout
from .tuner.config import LoftConfig

BNB_INSTALL = 'pip install bitsandbytes  (or: pip install "loft-peft[bnb]")'
QUANT_TYPES = ("nf4", "fp4")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_EIGHT_BIT_UNSUPPORTED = (
    "8-bit quantization is not supported: LoFT wraps bitsandbytes' 4-bit Linear4bit layers only. Use 4-bit "
    "(quantization: 4bit, or load_qloft_model) or an unquantized model."
)


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or say how to install it.

    Raises:
        ImportError: bitsandbytes is not installed (or cannot be imported).
    """
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            f"4-bit quantization (QLoFT) needs bitsandbytes, which is not installed: {BNB_INSTALL}."
        ) from error
    return bitsandbytes


def check_quantization(value: Any) -> Optional[str]:
    """Normalise a config's ``quantization`` field: ``None``/``"none"``/``False`` -> ``None``, ``"4bit"`` -> ``"4bit"``.

    ``4``, ``"4-bit"``, ``"int4"``, ``"nf4"`` and ``"fp4"`` also mean 4 bits.

    Raises:
        ValueError: 8-bit (not supported) or any other value.
    """
    if value is None or value is False:
        return None
    text = str(value).strip().lower().replace("-", "").replace("_", "")
    if text in ("", "none", "no", "false", "off"):
        return None
    if text in ("4bit", "4", "int4", "nf4", "fp4"):
        return "4bit"
    if text in ("8bit", "8", "int8", "llmint8"):
        raise ValueError(_EIGHT_BIT_UNSUPPORTED)
    raise ValueError(f"Unknown quantization {value!r}; use '4bit' or leave it out (none).")


def _as_dtype(value: Union[torch.dtype, str], name: str) -> torch.dtype:
    if isinstance(value, str):
        if value.lower() not in _DTYPES:
            raise ValueError(f"{name} must be bf16, fp16 or fp32; got {value!r}.")
        return _DTYPES[value.lower()]
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (or 'bf16', 'fp16', 'fp32'); got {type(value).__name__}.")
    if value not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32; got {value}.")
    return value


def bnb_4bit_config(
    *, compute_dtype: Union[torch.dtype, str] = torch.bfloat16, quant_type: str = "nf4", double_quant: bool = True
) -> Any:
    """The ``BitsAndBytesConfig`` for a 4-bit QLoFT base.

    Args:
        compute_dtype: dtype the 4-bit layers dequantize to and multiply in (``bnb_4bit_compute_dtype``).
        quant_type: ``"nf4"`` (QLoRA's NormalFloat, the default) or ``"fp4"``.
        double_quant: also quantize the block scales to 8 bits (saves about 0.37 bits per weight).

    Raises:
        ImportError: bitsandbytes is not installed.
        ValueError, TypeError: a bad option.
    """
    compute_dtype = _as_dtype(compute_dtype, "compute_dtype")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}; got {quant_type!r}.")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False; got {double_quant!r}.")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _default_device_map() -> Any:
    """The whole model on this process's GPU (``LOCAL_RANK`` under torchrun/accelerate), else on the CPU.

    Not ``"auto"``: that may offload layers to the CPU, which 4-bit training does not support.
    """
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def _check_from_pretrained_kwargs(kwargs: dict[str, Any]) -> None:
    if kwargs.get("load_in_8bit"):
        raise ValueError(_EIGHT_BIT_UNSUPPORTED)
    config = kwargs.get("quantization_config")
    if config is not None:
        wants_8bit = config.get("load_in_8bit") if isinstance(config, dict) else getattr(config, "load_in_8bit", False)
        if wants_8bit:
            raise ValueError(_EIGHT_BIT_UNSUPPORTED)
        raise ValueError(
            "load_qloft_model builds the 4-bit quantization config itself (compute_dtype, quant_type, double_quant); "
            "to pass your own quantization_config, load the model with from_pretrained and call get_peft_model."
        )
    if "load_in_4bit" in kwargs:
        raise ValueError("load_qloft_model always loads in 4 bits; remove load_in_4bit.")


def load_qloft_model(
    model_name_or_path: Union[str, os.PathLike],
    loft_config: LoftConfig,
    *,
    compute_dtype: Union[torch.dtype, str] = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    gradient_checkpointing: bool = True,
    factor_dtype: Union[torch.dtype, str] = torch.float32,
    model_class: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a model in 4 bits and wrap it with LoFT, ready to train: the QLoRA recipe with LoFT's adapter.

    Steps: ``BitsAndBytesConfig`` (:func:`bnb_4bit_config`), ``from_pretrained``, ``prepare_model_for_kbit_training``
    (freezes the base, casts its remaining fp16/bf16 parameters, i.e. norms, embeddings and the head, to fp32, and
    turns on gradient checkpointing), ``set_cpu_inference_layout(model, False)`` (so that gradients still flow through
    the 4-bit layers after an evaluation on the CPU; see :mod:`loft_peft.tuner.bnb`), ``get_peft_model``.

    Args:
        model_name_or_path: a local folder or Hub name for ``from_pretrained``.
        loft_config: the adapter's :class:`~loft_peft.LoftConfig`.
        compute_dtype: dtype the 4-bit layers compute in; also the dtype the base weights are read in before being
            quantized (unless ``dtype`` is passed).
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: store the 4-bit block scales in 8 bits too.
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant checkpointing).
        factor_dtype: dtype of ``loft_A``/``loft_B``. fp32 by default: the factors are small (``(m + n) r`` numbers
            per layer) and a bf16 factor cannot take an update smaller than 2^-8 of its entries, which a typical
            learning rate produces; the optimizer keeps fp32 state either way.
        model_class: the ``transformers`` class to load with (default ``AutoModelForCausalLM``), e.g.
            ``AutoModelForSequenceClassification``.
        **from_pretrained_kwargs: passed on (``device_map``, ``dtype``, ``trust_remote_code``, ``revision``, ...).
            Without ``device_map`` the model goes whole onto this process's GPU, or onto the CPU without one.

    Returns:
        A ``peft.PeftModel`` whose targeted ``Linear4bit`` layers are LoFT layers with trainable factors.

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
        TypeError: ``loft_config`` is not a ``LoftConfig``, or an option has the wrong type.
        ValueError: an unknown ``quant_type`` or dtype, an 8-bit request (not supported), or a conflicting
            ``quantization_config`` / ``load_in_4bit`` in ``from_pretrained_kwargs``.
    """
    if not isinstance(loft_config, LoftConfig):
        raise TypeError(f"loft_config must be a loft_peft.LoftConfig; got {type(loft_config).__name__}.")
    factor_dtype = _as_dtype(factor_dtype, "factor_dtype")
    from peft import get_peft_model

    model = load_4bit_base_model(
        model_name_or_path, compute_dtype=compute_dtype, quant_type=quant_type, double_quant=double_quant,
        gradient_checkpointing=gradient_checkpointing, model_class=model_class, **from_pretrained_kwargs,
    )
    peft_model = get_peft_model(model, loft_config)
    if factor_dtype != torch.float32:
        _cast_factors(peft_model, factor_dtype)
    return peft_model


def load_4bit_base_model(
    model_name_or_path: Union[str, os.PathLike],
    *,
    compute_dtype: Union[torch.dtype, str] = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    gradient_checkpointing: bool = True,
    model_class: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """The base of :func:`load_qloft_model`, before any adapter: for LoFT, and for LoRA / DoRA baselines alike.

    Loads in 4 bits, runs ``prepare_model_for_kbit_training`` and keeps the 4-bit layers' gradients flowing on the
    CPU (arguments and errors as for :func:`load_qloft_model`).
    """
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be True or False; got {gradient_checkpointing!r}.")
    _check_from_pretrained_kwargs(from_pretrained_kwargs)
    quantization_config = bnb_4bit_config(compute_dtype=compute_dtype, quant_type=quant_type, double_quant=double_quant)

    from peft import prepare_model_for_kbit_training

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class

    kwargs = dict(from_pretrained_kwargs)
    kwargs.setdefault("device_map", _default_device_map())
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = quantization_config.bnb_4bit_compute_dtype
    model = model_class.from_pretrained(model_name_or_path, quantization_config=quantization_config, **kwargs)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if gradient_checkpointing and getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # the cache is dropped under checkpointing anyway; this avoids the warning
    # Every 4-bit layer, targeted or not, must keep passing gradients after an evaluation (loft_peft.tuner.bnb).
    set_cpu_inference_layout(model, False)
    return model


def _cast_factors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    from .tuner.layer import LoftLayer

    for module in model.modules():
        if isinstance(module, LoftLayer):
            for factors in (module.loft_A, module.loft_B):
                for param in factors.values():
                    param.data = param.data.to(dtype)


__all__ = [
    "bnb_4bit_config",
    "check_quantization",
    "load_4bit_base_model",
    "load_qloft_model",
    "require_bitsandbytes",
    "set_cpu_inference_layout",
]
