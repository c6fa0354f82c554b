"""loft_peft: LoFT (low-rank adaptation that behaves like full fine-tuning) for the Hugging Face ecosystem.

``import loft_peft`` registers the ``LOFT`` PEFT type, so ``get_peft_model(model, LoftConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelFor*.from_pretrained`` work as they do for LoRA.
"""

import logging as _logging
import warnings as _warnings


class _DropMessage(_logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# Two messages that every user of this package would see and none can act on: bitsandbytes (0.50, CPU) reports that
# the optional `kernels` package could not fetch its Hub kernel (it falls back to its own CPU kernel; offline, `kernels`
# says it skips a check for it), and PEFT's
# get_peft_model reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning about PEFT's own code).
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
_logging.getLogger("kernels._internals.hf_hub").addFilter(_DropMessage("Skipping publisher trust check"))
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .tuner import LoftConfig, LoftModel, register_loft  # noqa: E402

register_loft()

from .optim import LoftAdamW, create_loft_optimizer, loft_factor_pairs, loft_param_groups  # noqa: E402
from .optim.muon import LoftMuon  # noqa: E402
from .quantization import load_qloft_model  # noqa: E402
from .trainer import LoftCallback, LoftOptimizerFactory, LoftTrainer, LoftTrainerMixin  # noqa: E402
from .export import convert_adapter_to_lora, export_lora  # noqa: E402
from .optim.guard import install_step_hook  # noqa: E402
from .trainer import install_trainer_guard  # noqa: E402

# No silent LoRA: warn when another optimizer trains LoFT factors, and clip LoFT's way in a Trainer that forgot to.
install_step_hook()
install_trainer_guard()

__version__ = "0.1.0"

__all__ = [
    "LoftAdamW",
    "LoftCallback",
    "LoftConfig",
    "LoftModel",
    "LoftMuon",
    "LoftOptimizerFactory",
    "LoftTrainer",
    "LoftTrainerMixin",
    "convert_adapter_to_lora",
    "create_loft_optimizer",
    "export_lora",
    "load_qloft_model",
    "loft_factor_pairs",
    "loft_param_groups",
]
