"""LoFT adapters as standard PEFT LoRA adapters: for vLLM, TGI and any code that never imports ``loft_peft``.

A LoFT adapter is ``W = W0 + B A`` at scale 1, so it *is* a LoRA adapter with ``lora_alpha = r`` (LoRA's scale
``alpha / r = 1``), ``lora_A = loft_A`` (r, in) and ``lora_B = loft_B`` (out, r). The export is exact: the same tensors
under LoRA's key names (``<module>.lora_A.weight``), and a ``LoraConfig`` with the same rank, target modules, dropout,
bias, ``modules_to_save`` and trainable tokens.

* :func:`export_lora` writes the export of a model's adapter;
* :func:`convert_adapter_to_lora` converts a saved LoFT adapter directory without loading any model
  (``loft-export-lora ADAPTER_DIR OUTPUT_DIR`` on the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from peft import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
WRITTEN = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

# LoftConfig fields carried over to LoraConfig under another name, or with another value.
_RENAMED_FIELDS = {"loft_dropout": "lora_dropout"}
_BIAS = {"none": "none", "all": "all", "loft_only": "lora_only"}
# LoftConfig fields with no LoRA counterpart (init_weights only shapes the start of training).
_DROPPED_FIELDS = {"init_weights", "peft_type", "auto_mapping", "peft_version"}


def lora_config(loft_config: dict[str, Any], fan_in_fan_out: bool = False) -> "LoraConfig":
    """The ``LoraConfig`` of the LoRA export of a LoFT adapter config (as ``LoftConfig.to_dict()`` gives it).

    Raises:
        ValueError: the config is not a LoFT adapter's.
    """
    if loft_config.get("peft_type") != "LOFT":
        raise ValueError(f"not a LoFT adapter config: its peft_type is {loft_config.get('peft_type')!r}, not 'LOFT'")
    from peft import LoraConfig

    lora = {}
    for key, value in loft_config.items():
        if key in _DROPPED_FIELDS:
            continue
        lora[_RENAMED_FIELDS.get(key, key)] = value
    lora["bias"] = _BIAS[loft_config.get("bias", "none")]
    lora["lora_alpha"] = loft_config["r"]  # scale alpha / r = 1: W0 + B A exactly
    lora["fan_in_fan_out"] = fan_in_fan_out
    lora["inference_mode"] = True
    return LoraConfig(**lora)  # refuses what LoRA cannot express


def _warn_about_biases(loft_config: dict[str, Any]) -> None:
    if loft_config.get("bias", "none") != "none":
        warnings.warn(
            f"The adapter trains biases (bias={loft_config['bias']!r}); the LoRA export holds them (as "
            "<module>.base_layer.bias), but not every LoRA reader loads them: PEFT 0.21 does, PEFT 0.18 drops them, and "
            "LoRA servers such as vLLM serve only lora_A / lora_B. Where they are dropped the outputs differ from the "
            "LoFT model's; train with bias='none' for an adapter to serve.",
            UserWarning,
            stacklevel=3,
        )


def lora_state_dict(loft_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoFT checkpoint keys (``<module>.loft_A``, ``<module>.loft_B``) renamed to LoRA's; other keys unchanged."""
    renamed = {}
    for key, tensor in loft_tensors.items():
        for factor in ("A", "B"):
            suffix = f".loft_{factor}"
            if key.endswith(suffix):
                key = f"{key[: -len(suffix)]}.lora_{factor}.weight"
                break
        renamed[key] = tensor.contiguous()
    return renamed


def _model_card(config: "LoraConfig") -> str:
    base = config.base_model_name_or_path or "BASE_MODEL"
    return f"""---
base_model: {base}
library_name: peft
tags:
- lora
- loft
---

# LoRA export of a LoFT adapter

This is a standard PEFT LoRA adapter (`peft_type: LORA`, r = {config.r}, `lora_alpha` = r), exported from an adapter
trained with LoFT (`loft-peft`). It holds exactly the LoFT factors (`lora_A = loft_A`, `lora_B = loft_B`, scale 1), so
it gives the LoFT model's outputs. Nothing of `loft-peft` is needed to use it:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH_TO_THIS_FOLDER")
```

Serving with vLLM: `vllm serve {base} --enable-lora --max-lora-rank {max(config.r, 8)} --lora-modules
my-adapter=PATH_TO_THIS_FOLDER`.
"""


def _write_lora(path: str | os.PathLike, config: "LoraConfig", tensors: dict[str, torch.Tensor],
                overwrite: bool) -> Path:
    """Write config, weights and model card to ``path`` atomically: into a temporary folder, then moved in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True (--overwrite) to replace its adapter files")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        (staging / CARD_NAME).write_text(_model_card(config))
        for name in WRITTEN:
            (staging / name).chmod(0o666 & ~umask)
        if not path.exists():
            staging.rename(path)
            return path
        for name in WRITTEN:
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def export_lora(model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                overwrite: bool = False) -> Path:
    """Write the LoFT adapter ``adapter_name`` of ``model`` as a standard PEFT LoRA adapter in ``path``.

    Args:
        model: a ``PeftModel`` holding a LoFT adapter.
        path: the output folder (created; written atomically).
        adapter_name: which adapter to export.
        overwrite: replace the adapter files of a folder that is not empty (other files are left alone).

    Returns:
        ``path``.

    Raises:
        ValueError: ``model`` has no LoFT adapter of that name.
        FileExistsError: ``path`` is a file, or a folder that is not empty and ``overwrite`` is False.
    """
    from peft import get_peft_model_state_dict

    from .tuner.layer import LoftLayer

    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter {adapter_name!r} (it has {sorted(configs)})")
    loft_config = configs[adapter_name].to_dict()
    _warn_about_biases(loft_config)
    fan_in_fan_out = any(m.fan_in_fan_out for m in model.modules() if isinstance(m, LoftLayer))
    config = lora_config(loft_config, fan_in_fan_out=fan_in_fan_out)
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return _write_lora(path, config, lora_state_dict({k: v.detach().cpu() for k, v in tensors.items()}), overwrite)


def convert_adapter_to_lora(adapter_dir: str | os.PathLike, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a saved LoFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) to LoRA.

    No model is loaded. GPT-2 (``Conv1D``) adapters load with PEFT's own ``fan_in_fan_out`` correction (PEFT warns
    and sets it); :func:`export_lora` from the model sets it directly.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is empty or corrupt, or the adapter is not a LoFT adapter.
        FileExistsError: as for :func:`export_lora`.
    """
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (a saved LoFT adapter has {CONFIG_NAME} and {WEIGHTS_NAME})")
        if file.stat().st_size == 0:
            raise ValueError(f"{file} is empty")
    try:
        loft_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(loft_config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")
    _warn_about_biases(loft_config)
    try:
        config = lora_config(loft_config)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_file} is corrupt or truncated ({error})") from None
    if not any(key.endswith((".loft_A", ".loft_B")) for key in tensors):
        raise ValueError(f"{weights_file} holds no loft_A / loft_B factors")
    return _write_lora(path, config, lora_state_dict(tensors), overwrite)


def main(argv: list[str] | None = None) -> int:
    """``loft-export-lora ADAPTER_DIR OUTPUT_DIR [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="loft-export-lora",
        description="Convert a saved LoFT adapter into a standard PEFT LoRA adapter (exact; no model is loaded), "
        "for vLLM, TGI and any code that does not import loft_peft.",
        epilog="example: loft-export-lora outputs/adapter outputs/adapter-lora",
    )
    parser.add_argument("adapter_dir", help="folder of a saved LoFT adapter (adapter_config.json, "
                        "adapter_model.safetensors)")
    parser.add_argument("output_dir", help="folder to write the LoRA adapter to (must be empty or new)")
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter files in a non-empty folder")
    args = parser.parse_args(argv)
    try:
        written = convert_adapter_to_lora(args.adapter_dir, args.output_dir, overwrite=args.overwrite)
    except (OSError, ValueError, TypeError) as error:
        print(f"loft-export-lora: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote a LoRA adapter to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
