"""`LoftConfig`: which layers get LoFT factors, and how they start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

# The paper adapts Q, K, V, Up and Down in decoders (section 3.1) and Q, K, V and Dense in ViT (section 3.2).
_DECODER_QKV_UP_DOWN = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "llama": _DECODER_QKV_UP_DOWN,
    "mistral": _DECODER_QKV_UP_DOWN,
    "mixtral": ["q_proj", "k_proj", "v_proj"],
    "qwen2": _DECODER_QKV_UP_DOWN,
    "qwen3": _DECODER_QKV_UP_DOWN,
    "gemma": _DECODER_QKV_UP_DOWN,
    "gemma2": _DECODER_QKV_UP_DOWN,
    "gemma3": _DECODER_QKV_UP_DOWN,
    "gemma3_text": _DECODER_QKV_UP_DOWN,
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    # GPT-2 fuses Q, K and V in `attn.c_attn`; Up and Down are `mlp.c_fc` and `mlp.c_proj` (attn.c_proj is left out).
    "gpt2": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"],
    # BERT: Q, K, V, the MLP's up projection (`intermediate.dense`) and down projection (the layer's `output.dense`,
    # not `attention.output.dense`), as a regular expression because the two share a suffix.
    "bert": r".*\.(query|key|value|intermediate\.dense|layer\.\d+\.output\.dense)$",
    "roberta": r".*\.(query|key|value|intermediate\.dense|layer\.\d+\.output\.dense)$",
    # ViT: Q, K, V and the dense layers (attention output, MLP up and down), under transformers 5's names (q_proj,
    # ..., o_proj, fc1, fc2) and the earlier ones (query, key, value, every `dense`).
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "query", "key", "value", "dense"],
}


@dataclass
class LoftConfig(PeftConfig):
    """Configuration of a LoFT adapter (``peft_type="LOFT"``).

    LoFT trains the same factors as LoRA, ``W = W0 + B A``, and gets its full-fine-tuning behaviour from the optimizer
    (:func:`loft_peft.create_loft_optimizer`). There is no ``lora_alpha``: the update is ``B @ A`` at scale 1. The
    paper sets alpha = 1 and removes it, because LoRA needs it only to compensate for the misalignment with full
    fine-tuning that LoFT's scaled gradients remove (section 2): rescaling B by c and A by 1/c changes nothing.

    Args:
        r: rank of the factors (an int >= 1). ``loft_A`` has shape (r, in_features), ``loft_B`` (out_features, r).
        target_modules: names (suffix match) or a regular expression of the modules to adapt. ``None`` uses the
            paper's set for known ``model_type`` s (Q, K, V, Up, Down for decoders; Q, K, V, Dense for ViT).
            ``"all-linear"`` adapts every linear layer but the output head.
        exclude_modules: names or a regular expression of modules never to adapt.
        loft_dropout: dropout on the adapter's input.
        bias: ``"none"``, ``"all"`` or ``"loft_only"``: which biases train alongside the factors.
        modules_to_save: modules, besides the LoFT layers, trained in full and saved with the adapter (e.g. a
            classifier head).
        layers_to_transform: layer indices to adapt (with ``layers_pattern`` when the layer list is not found).
        layers_pattern: the name of the layer list, e.g. ``"layers"`` or ``"h"``.
        trainable_token_indices: token indices of the input embedding (a list, or ``{"embed_tokens": [...]}``) whose
            rows train in full, as PEFT's LoRA option of the same name (TRL sets it when a chat template adds tokens).
            They are plain parameters: the LoFT optimizer gives them AdamW.
        init_weights: ``True`` initialises as LoRA does, A Kaiming-uniform and B zero, so the model starts unchanged;
            ``False`` makes both random (for tests: the model no longer starts unchanged).
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoFT factors (int >= 1)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex to adapt; None picks the paper's set for the model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    loft_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    bias: Literal["none", "all", "loft_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'loft_only'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. a classifier head."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Embedding token indices trained in full (a list, or {layer name: indices})."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: A Kaiming-uniform, B zero (LoRA's init). False: both random."}
    )

    def __post_init__(self):
        super().__post_init__()
        from .model import PEFT_TYPE_NAME

        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"LoftConfig.r must be an int >= 1; got {self.r!r} ({type(self.r).__name__}).")
        if self.r < 1:
            raise ValueError(f"LoftConfig.r must be an int >= 1; got {self.r}.")
        if not 0.0 <= self.loft_dropout < 1.0:
            raise ValueError(f"LoftConfig.loft_dropout must lie in [0, 1); got {self.loft_dropout}.")
        if self.bias not in ("none", "all", "loft_only"):
            raise ValueError(f"LoftConfig.bias must be 'none', 'all' or 'loft_only'; got {self.bias!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoftConfig.init_weights must be True or False; got {self.init_weights!r}.")
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regular expression.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`.")
