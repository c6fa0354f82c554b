"""LoFT optimizers: the maths (`maths`), the optimizers that hold state, and the factory."""

from .adamw import LoftAdamW
from .muon import LoftMuon
from .factory import create_loft_optimizer, loft_factor_pairs, loft_param_groups

__all__ = ["LoftAdamW", "LoftMuon", "create_loft_optimizer", "loft_factor_pairs", "loft_param_groups"]
