"""The model card ``save_pretrained`` writes for a LoFT adapter says what it is, how to load it and how to export it.

A LOFT adapter loads only where ``loft_peft`` is imported (``PeftModel.from_pretrained`` elsewhere fails on the
unknown ``"peft_type": "LOFT"``), so the card says so, and names the export that any LoRA reader takes. PEFT writes
the card in ``PeftModel.create_or_update_model_card``; :func:`install` wraps that method once to add a section (and
the ``loft`` tag) when one of the saved adapters is a LoFT adapter, and leaves cards of other adapters unchanged.
"""

from __future__ import annotations

import os
from typing import Any

SECTION_TITLE = "## LoFT adapter"
TAG = "loft"


def loft_section(peft_type_name: str = "LOFT") -> str:
    return f"""{SECTION_TITLE}

This adapter was trained with LoFT (low-rank adaptation that behaves like full fine-tuning) and is saved with
`"peft_type": "{peft_type_name}"`, which PEFT reads only where `loft-peft` is installed and imported:

```python
import loft_peft  # pip install loft-peft; registers the LOFT adapter type with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "PATH_TO_THIS_FOLDER")
```

It is exactly a LoRA adapter with `lora_alpha = r`. For vLLM, TGI or any code without `loft-peft`, export it once to a
standard PEFT LoRA adapter (exact, no model needed): `loft-export-lora PATH_TO_THIS_FOLDER PATH_TO_LORA_FOLDER`, or
`loft_peft.export_lora(model, "PATH_TO_LORA_FOLDER")` from Python.
"""


def add_loft_section(readme: str) -> str:
    """``readme`` with the LoFT section after its front matter (once) and the ``loft`` tag in the front matter."""
    front, body = "", readme
    if readme.startswith("---\n"):
        end = readme.find("\n---\n", 4)
        if end != -1:
            front, body = readme[: end + 5], readme[end + 5 :]
    if front and "\ntags:\n" in front and f"\n- {TAG}\n" not in front:
        front = front.replace("\ntags:\n", f"\ntags:\n- {TAG}\n", 1)
    if SECTION_TITLE in body:
        return front + body
    return f"{front}\n{loft_section()}\n{body.lstrip(chr(10))}"


def install() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` (once) to add the LoFT section for LoFT adapters."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_loft_wrapped", False):
        return

    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        original(self, output_dir)
        from .model import PEFT_TYPE_NAME

        configs = getattr(self, "peft_config", {}) or {}
        if not any(getattr(c, "peft_type", None) == PEFT_TYPE_NAME for c in configs.values()):
            return
        filename = os.path.join(output_dir, "README.md")
        if os.path.exists(filename):
            with open(filename, encoding="utf-8") as f:
                readme = f.read()
            with open(filename, "w", encoding="utf-8") as f:
                f.write(add_loft_section(readme))

    create_or_update_model_card._loft_wrapped = True  # type: ignore[attr-defined]
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card
