"""The LOFT tuner type for PEFT: config, layers and the model that places them."""

from .config import DEFAULT_TARGET_MODULES, LoftConfig
from .layer import Linear, LoftLayer
from .model import PEFT_TYPE_NAME, LoftModel, register_loft

__all__ = ["DEFAULT_TARGET_MODULES", "Linear", "LoftConfig", "LoftLayer", "LoftModel", "PEFT_TYPE_NAME", "register_loft"]
