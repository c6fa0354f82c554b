"""``loft-train``: the run from a validated config to the saved adapter, and the command's exit codes."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .config import LOFT_METHODS, ConfigError, TrainConfig, check_inputs, config_to_yaml, one_line, resolve_config
from .data import accuracy, build_image_data, build_lm_data
from .metrics import StepTimer, readable_logs, run_metrics
from .model import build_model, check_rank_fits, loft_optimizer_kwargs, model_path
from .outputs import (
    CONFIG_FILE,
    check_output_dir,
    clear_previous_run,
    last_complete_checkpoint,
    remove_incomplete_checkpoints,
    save_outputs,
    write_atomic,
)


# ====================================================================================================== run
def run(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, callbacks: tuple = ()) -> dict | None:
    """Train as ``config`` says and write the run's files.

    Under ``accelerate launch`` every process trains and the main process writes. Returns the metrics written to
    ``metrics.json`` on the main process, ``None`` on the others.

    Raises:
        ConfigError: bad input, found before ``output_dir`` is touched.
    """
    check_inputs(config)
    checkpoint = check_output_dir(config, resume=resume, overwrite=overwrite)

    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    if not sys.stderr.isatty():  # a log file: lines only, no progress bars and their escape codes
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    out = Path(config.output_dir)
    existed = out.exists()
    try:
        trainer, timer, model, path, sizes, related = _prepare(config, callbacks)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        # The Trainer creates output_dir when it is built; a run that fails before training leaves nothing.
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(err, ConfigError):
            raise
        # Setting up fails on the user's input or environment (a missing file, an offline Hub, a missing package).
        raise ConfigError(f"{type(err).__name__}: {one_line(err)}") from err

    main_process = trainer.is_world_process_zero()
    if main_process:
        if checkpoint is not None:
            remove_incomplete_checkpoints(out)  # a save cut short after the checkpoint this run resumes from
        if overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / CONFIG_FILE, config_to_yaml(config))
    trainer.accelerator.wait_for_everyone()

    related_before = None  # (the Trainer starts a new log at train(), so this is kept here)
    if related is not None and config.eval_on_start and checkpoint is None:
        related_before = trainer.evaluate(related, metric_key_prefix="related_eval")["related_eval_loss"]
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # When the Trainer's schedule already evaluated at the last step, that is the final evaluation.
    final_eval = next((h for h in reversed(trainer.state.log_history)
                       if "eval_loss" in h and h.get("step") == trainer.state.global_step), None)
    if final_eval is None:
        final_eval = trainer.evaluate()

    metrics = run_metrics(config, trainer, model, result, final_eval, timer, path, *sizes, resumed=checkpoint is not None)
    if related is not None:
        from ..data import perplexity

        after = trainer.evaluate(related, metric_key_prefix="related_eval")["related_eval_loss"]
        metrics.update(related_eval_data=list(config.related_eval_data_files), related_eval_examples=len(related),
                       related_eval_loss=after, related_eval_perplexity=perplexity(after),
                       related_eval_loss_before_training=related_before)
    if main_process:
        save_outputs(trainer, out, metrics, config.export_lora and config.method in LOFT_METHODS)
    trainer.accelerator.wait_for_everyone()
    return metrics if main_process else None


def _prepare(config: TrainConfig, callbacks: tuple):
    """Load data and model and build the Trainer; everything that can fail on bad input fails here."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

    from ..trainer import LoftTrainer

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
        raise ConfigError(f"TrainingArguments: {one_line(err)}") from err
    path = model_path(config)
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
    if config.model_name_or_path is None:
        # The offline copy of the default model lives in a local cache; the adapter and its card name the model.
        from ..assets import SMOLLM2_HUB_ID

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.name_or_path = base.name_or_path = SMOLLM2_HUB_ID
        for peft_config in getattr(model, "peft_config", {}).values():
            peft_config.base_model_name_or_path = SMOLLM2_HUB_ID
        # PEFT, saving, looks the name up on the (offline) Hub to see whether the vocabulary changed; it did not.
        warnings.filterwarnings("ignore", message=f"Could not find a config file in {SMOLLM2_HUB_ID}")
    if config.gradient_checkpointing and config.quantization == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    timer = StepTimer()
    trainer_kwargs = dict(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        processing_class=processor,
        callbacks=[timer.callback(), *callbacks],
        compute_metrics=accuracy if config.task == "image-classification" else None,
    )
    if config.method in LOFT_METHODS:
        trainer = LoftTrainer(loft_optimizer_kwargs=loft_optimizer_kwargs(config), **trainer_kwargs)
        # Build the optimizer now, so that a model without LoFT layers fails here rather than mid-run; under FSDP the
        # Trainer must build it itself, after sharding the model.
        if not trainer.is_fsdp_enabled:
            trainer.create_optimizer()
    else:
        trainer = Trainer(**trainer_kwargs)
    readable_logs(trainer)
    related = None
    if config.related_eval_data_files:
        from .data import held_out_blocks

        related = held_out_blocks(config, processor, config.related_eval_data_files)
    return trainer, timer, model, path, (len(train_ds), len(eval_ds)), related


def main(argv: list[str] | None = None) -> int:
    """The ``loft-train`` command. Returns the exit code: 0, 2 for bad input, 130 when interrupted."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config, flags = resolve_config(argv)
    except ConfigError as err:
        print(f"loft-train: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nloft-train: interrupted", file=sys.stderr)
        return 130
    try:
        metrics = run(config, resume=flags.resume, overwrite=flags.overwrite)
    except KeyboardInterrupt:
        removed = remove_incomplete_checkpoints(Path(config.output_dir))
        checkpoint = last_complete_checkpoint(Path(config.output_dir))
        where = f"; resume from {checkpoint} with --resume" if checkpoint else ""
        cut = f" (removed {', '.join(removed)}, whose writing was cut short)" if removed else ""
        print(f"\nloft-train: interrupted{cut}{where}", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"loft-train: error: {one_line(err)}", file=sys.stderr)
        return 2
    if metrics is None:
        return 0
    summary = {k: metrics[k] for k in ("method", "rank", "steps", "train_loss", "eval_loss") if k in metrics}
    if "eval_perplexity" in metrics:
        summary["eval_perplexity"] = round(metrics["eval_perplexity"], 3)
    print(f"loft-train: wrote {config.output_dir} {json.dumps(summary)}")
    return 0



def command() -> int:
    """``loft-train`` and ``python -m loft_peft.train``: :func:`main`, then the end of the process group if a launcher
    (``accelerate launch``, ``torchrun``) started one, so that no process is left to abort on its threads at exit."""
    code = main()
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code
