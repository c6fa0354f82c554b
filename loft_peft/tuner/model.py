"""`LoftModel` (finds and replaces target layers) and the registration of the ``LOFT`` PEFT type."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.peft_types import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGET_MODULES, LoftConfig
from .layer import Linear, LoftLayer

PEFT_TYPE_NAME = "LOFT"
SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit"


class LoftModel(BaseTuner):
    """Wraps the target layers of a model with LoFT layers; created by ``get_peft_model(model, LoftConfig(...))``.

    Merging, unloading, adapter switching, ``disable_adapter`` and saving come from PEFT's ``BaseTuner``.
    """

    prefix: str = "loft_"
    tuner_layer_cls = LoftLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: LoftConfig, model_config: dict) -> LoftConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGET_MODULES:
                raise ValueError(
                    f"No default LoFT target modules for model_type {model_type!r}; pass target_modules=[...] "
                    f"(known defaults: {sorted(DEFAULT_TARGET_MODULES)})."
                )
            default = DEFAULT_TARGET_MODULES[model_type]
            peft_config.target_modules = default if isinstance(default, str) else set(default)
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: LoftConfig, adapter_name: str) -> None:
        # Every 4-bit layer, targeted or not, must keep passing gradients after an evaluation on the CPU (see bnb.py).
        from .bnb import set_cpu_inference_layout

        set_cpu_inference_layout(model, False)

    def _create_and_replace(
        self,
        loft_config: LoftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("LoftModel._create_and_replace needs the target's key.")
        kwargs = dict(r=loft_config.r, loft_dropout=loft_config.loft_dropout, init_weights=loft_config.init_weights)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            width = max(base.weight.shape)
        else:
            width = max(getattr(base, "in_features", 0), getattr(base, "out_features", 0))
        if width and loft_config.r > width:
            raise ValueError(
                f"LoFT rank r={loft_config.r} is above the width of target module {current_key!r} "
                f"(max(in, out) = {width}); use r <= {width} (r = {width} is full rank: AdamW exactly)."
            )
        if isinstance(target, LoftLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(target, adapter_name, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter does not train until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``model(..., adapter_names=[...])``: hand each LoFT layer the adapter of every row (mixed batches).

        As LoRA's: inference only, every name must be an adapter of some layer (or ``"__base__"``), and beam search
        repeats each row's name ``num_beams`` times.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {name for module in self.modules() if isinstance(module, LoftLayer) for name in module.loft_A}
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def inject(module: nn.Module, module_args: tuple, module_kwargs: dict) -> tuple[tuple, dict]:
            module_kwargs["adapter_names"] = adapter_names
            return module_args, module_kwargs

        handles = [
            module.register_forward_pre_hook(inject, with_kwargs=True)
            for module in self.modules()
            if isinstance(module, LoftLayer)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _create_new_module(target: nn.Module, adapter_name: str, key: str, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        from .bnb import check_bnb_layer_supported, is_linear4bit, make_linear4bit

        if is_linear4bit(base):
            return make_linear4bit(target, adapter_name, **kwargs)
        check_bnb_layer_supported(base, key)  # Linear8bitLt subclasses nn.Linear: refuse it before that check
        if isinstance(base, (nn.Linear, Conv1D)):
            return Linear(target, adapter_name, **kwargs)
        raise TypeError(
            f"Target module {key!r} is a {type(base).__module__}.{type(base).__name__}, which LoFT does not support; "
            f"LoFT wraps {SUPPORTED_LAYERS}. Remove it from target_modules (or add it to exclude_modules)."
        )


def _extend_peft_type() -> Any:
    """Add ``LOFT`` to PEFT's ``PeftType`` enum, which is closed.

    PEFT validates names against ``PeftType`` in ``register_peft_method`` and converts saved ``"peft_type"`` strings
    through it, so a new method needs a real member. The member is inserted the way ``Enum`` builds its own: a ``str``
    instance of the class with ``_name_``/``_value_`` set, listed in ``_member_map_``, ``_value2member_map_`` and
    ``_member_names_``. If a future PEFT ships ``LOFT`` itself, that member is used unchanged.
    """
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member.__init__(PEFT_TYPE_NAME)
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    # Python >= 3.12 looks members up as class attributes; 3.10/3.11 go through `_member_map_` but accept both.
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def register_loft() -> None:
    """Make ``LOFT`` a PEFT method: config, tuner and the ``loft_`` prefix. Safe to call more than once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .model_card import install as install_model_card

    peft_type = _extend_peft_type()
    install_model_card()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is LoftConfig:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=LoftConfig, model_cls=LoftModel, prefix="loft_")


__all__ = ["LoftModel", "register_loft", "PEFT_TYPE_NAME"]
