"""LoFT with TRL's trainers: ``LoftSFTTrainer``, ``LoftDPOTrainer``, ``LoftGRPOTrainer``.

Each is :class:`~loft_peft.trainer.LoftTrainerMixin` on the TRL trainer of the same name: pass
``peft_config=LoftConfig(...)`` as TRL takes one, and the trainer wraps the model with LoFT, builds LoFT's optimizer
from its arguments (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``, plus
``loft_optimizer_kwargs``), clips the effective gradient at ``max_grad_norm`` and logs it. Without the mixin,
``SFTTrainer(..., peft_config=LoftConfig(...))`` would train the factors with plain AdamW: LoRA with alpha = r, not
LoFT (``loft_peft`` warns when that happens). Any other Trainer subclass becomes a LoFT trainer the same way::

    class LoftKTOTrainer(LoftTrainerMixin, KTOTrainer):
        pass

DPO and GRPO take the reference model as the base with the adapter disabled, as they do for LoRA.
"""

from __future__ import annotations

from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from .trainer import LoftTrainerMixin


class LoftSFTTrainer(LoftTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with LoFT's optimizer, effective-gradient clipping and logs."""


class LoftDPOTrainer(LoftTrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with LoFT's optimizer, effective-gradient clipping and logs."""


class LoftGRPOTrainer(LoftTrainerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with LoFT's optimizer, effective-gradient clipping and logs."""


__all__ = ["LoftDPOTrainer", "LoftGRPOTrainer", "LoftSFTTrainer", "LoftTrainerMixin"]
