"""The model a ``loft-train`` run trains: loaded (4-bit through :mod:`loft_peft.quantization`), wrapped with LoFT,
LoRA or DoRA, and its rank checked against the targeted layers before anything loads.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from .config import LOFT_METHODS, ConfigError, TrainConfig


# ====================================================================================================== model
def model_path(config: TrainConfig) -> str:
    if config.model_name_or_path is not None:
        local = Path(config.model_name_or_path).expanduser()
        return str(local) if local.exists() else config.model_name_or_path
    from ..assets import smollm2_path

    return str(smollm2_path())


def _target_modules(config: TrainConfig, model) -> list[str] | str | None:
    """The same target set for every method: the config's, else the paper's for the model type."""
    if config.target_modules is not None:
        return config.target_modules
    from ..tuner.config import DEFAULT_TARGET_MODULES

    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(f"no default target_modules for model type {model_type!r}; set target_modules")
    targets = DEFAULT_TARGET_MODULES[model_type]
    return list(targets) if isinstance(targets, (list, set, tuple)) else targets


def check_rank_fits(config: TrainConfig, path: str) -> None:
    """Refuse a rank above max(in, out) of a targeted layer before any data or weights load.

    The model is built from its config on the meta device (shapes only, no memory), so that ``--rank 5000`` fails in
    a second, naming the layer, rather than after loading and allocating.

    Raises:
        ConfigError: naming the first layer that is narrower than the rank.
    """
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification
    from transformers.pytorch_utils import Conv1D

    from ..tuner.config import LoftConfig

    auto = AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForImageClassification
    with torch.device("meta"):
        skeleton = auto.from_config(AutoConfig.from_pretrained(path))
    targets = LoftConfig(r=config.rank, target_modules=_target_modules(config, skeleton))
    for name, module in skeleton.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and check_target_module_exists(targets, name):
            width = max(module.weight.shape)
            if config.rank > width:
                raise ConfigError(
                    f"rank r={config.rank} is above the width of target module {name!r} (max(in, out) = {width}); "
                    f"use a rank <= {width} (r = {width} is full rank: AdamW exactly)"
                )


def _compute_dtype(config: TrainConfig):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)


def _load_base_model(config: TrainConfig, path: str, model_kwargs: dict[str, Any], quantized: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    auto = AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForImageClassification
    if quantized:
        from ..quantization import load_4bit_base_model

        return load_4bit_base_model(path, compute_dtype=_compute_dtype(config), model_class=auto,
                                    gradient_checkpointing=config.gradient_checkpointing, **model_kwargs)
    return auto.from_pretrained(path, dtype=torch.float32, **model_kwargs)


def build_model(config: TrainConfig, path: str, model_kwargs: dict[str, Any]):
    """The model to train: wrapped with LoFT / LoRA / DoRA, or the plain model for ``full``."""
    from peft import LoraConfig, get_peft_model

    from ..tuner.config import LoftConfig

    quantized = config.quantization == "4bit"
    modules_to_save = ["classifier"] if config.task == "image-classification" else None
    if config.method in LOFT_METHODS and quantized:
        from transformers import AutoConfig

        from ..quantization import load_qloft_model

        probe = types.SimpleNamespace(config=AutoConfig.from_pretrained(path))
        loft_config = LoftConfig(r=config.rank, target_modules=_target_modules(config, probe),
                                 loft_dropout=config.dropout, modules_to_save=modules_to_save)
        from transformers import AutoModelForCausalLM, AutoModelForImageClassification

        model_class = AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForImageClassification
        return load_qloft_model(path, loft_config, compute_dtype=_compute_dtype(config), model_class=model_class,
                                gradient_checkpointing=config.gradient_checkpointing, **model_kwargs)

    model = _load_base_model(config, path, model_kwargs, quantized)
    if config.method == "full":
        return model
    targets = _target_modules(config, model)
    if config.method in LOFT_METHODS:
        peft_config = LoftConfig(r=config.rank, target_modules=targets, loft_dropout=config.dropout,
                                 modules_to_save=modules_to_save)
    else:
        alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.rank
        peft_config = LoraConfig(r=config.rank, lora_alpha=alpha, target_modules=targets,
                                 lora_dropout=config.dropout, use_dora=config.method == "dora",
                                 modules_to_save=modules_to_save)
    return get_peft_model(model, peft_config)


def loft_optimizer_kwargs(config: TrainConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"alternate": config.loft_alternate, "calibrate": config.loft_calibrate}
    if config.method == "loft-simple":
        kwargs["variant"] = "simple"
        kwargs["simple_rescale"] = config.loft_simple_rescale
    if config.method == "loft-muon":
        kwargs["optimizer"] = "muon"
    return kwargs


